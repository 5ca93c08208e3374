"""A GrowableNet's structure and state, for checkpoints.

A GrowableNet's shapes change as it learns (growth, per-task copies, packed masks), so its state is its
*structure* (tasks, channel births, which layers have masks) next to its state dict.  Restoring rebuilds that
structure on a freshly prepared net from the same recipe, then loads the tensors strictly.
"""

from __future__ import annotations

import dataclasses
import math

import torch
from torch import nn

from grownfx.engine import masks as M
from grownfx.engine.context import MaskPolicy
from grownfx.engine.layers import FREE, PerTask, TaskParameter
from grownfx.engine.net import GrowableNet
from grownfx.engine.surgery import apply_changes, grow_change

FORMAT = 1
# Checkpoints written before issue 21 name the channel scale `gates` (in the structure and in state-dict keys):
# mapped on reading.  They also carry the learner's schedule (`beta`, `temperature`), the method's now: ignored
# (the learner sets it again before every epoch, from its position).
_OLD_SCALE_KEY = "gates"


def net_structure(net: GrowableNet) -> dict:
    structure = net.structure
    layers = {}
    for m in net.masked_layers():
        layers[m.target] = {"score": m.score is not None, "kind": m.kind is not None,
                            "masks": {str(t): list(s) for t, s in m.mask_shapes.items()}}
    scale = net.channel_scale
    return {
        "format": FORMAT,
        "num_classes": list(net.num_classes),
        "frozen": sorted(structure.frozen),
        "births": {str(g): b.tolist() for g, b in structure.births.items()},
        "channel_scale": scale.structure() if scale is not None else {},  # the method's, opaque here
        "policy": _policy_to_dict(net.policy),
        "layers": layers,
        "generator": net.generator.get_state(),
    }


def restore_net(net: GrowableNet, structure: dict, state: dict) -> GrowableNet:
    """Rebuild `structure` on a freshly prepared `net` (same recipe), then load `state` strictly.

    A net saved with a channel scale (GROWN's candidate gates) needs the method's scale installed first
    (`net.set_channel_scale`); the engine does not know the method."""
    if structure.get("format") != FORMAT:
        raise ValueError(f"checkpoint format {structure.get('format')} is not {FORMAT}")
    scale_structure = structure.get("channel_scale", structure.get(_OLD_SCALE_KEY, {}))
    if scale_structure and net.channel_scale is None:
        raise ValueError("the checkpoint has a channel scale (GROWN's candidate gates): install the method's "
                         "channel scale (net.set_channel_scale) before restoring")
    if _OLD_SCALE_KEY in structure:
        state = {("channel_scale." + k[len("gates."):] if k.startswith("gates.") else k): v for k, v in state.items()}
    ctx, struct = net.ctx, net.structure
    births = {int(g): torch.tensor(b, dtype=torch.long) for g, b in structure["births"].items()}
    device = net._device()
    for k, nc in enumerate(structure["num_classes"]):
        struct.num_tasks = k + 1
        net.num_classes.append(nc)
        for m in net.task_modules():
            if isinstance(m, (PerTask, TaskParameter)):
                m.add_task(num_classes=nc, generator=net.generator)
        changes = {g: grow_change(struct.widths[g], int((b == k).sum())) for g, b in births.items() if (b == k).any()}
        if changes:
            apply_changes(net.graph_module, net.coupling, struct.widths, changes, net.generator, birth=k)
        if k in structure["frozen"]:
            for m in net.task_modules():
                if isinstance(m, (PerTask, TaskParameter)):
                    m.freeze(k)
            struct.frozen.add(k)
    # channels born for a task not added yet (grown after the last freeze)
    k = struct.num_tasks
    changes = {g: grow_change(struct.widths[g], int((b == k).sum())) for g, b in births.items() if (b == k).any()}
    if changes:
        apply_changes(net.graph_module, net.coupling, struct.widths, changes, net.generator, birth=k)
    struct.births = births
    ctx.masks.policy = _policy_from_dict(structure["policy"])
    for m in net.masked_layers():
        spec = structure["layers"].get(m.target, {})
        for t, shape in spec.get("masks", {}).items():
            m.register_buffer(f"mask_{t}", torch.zeros((math.prod(shape) + 7) // 8, dtype=torch.uint8))
            m.mask_shapes[int(t)] = tuple(shape)
        unit = m.owner.shape
        m.kind = torch.zeros(unit, dtype=torch.int8) if spec.get("kind") else None
        m.score = nn.Parameter(torch.zeros(unit)) if spec.get("score") else None
        if spec.get("masks") and m.frozen.shape != m.weight.shape:
            m.frozen = torch.zeros_like(m.weight)
    if net.channel_scale is not None:
        net.channel_scale.load_structure(scale_structure)
    net.to(device)
    net.load_state_dict(state, strict=True)
    for m in net.masked_layers():
        m.weight.requires_grad_(bool((m.owner == FREE).any()))
    net.generator.set_state(structure["generator"])
    ctx.bump()
    return net


def reload_state(net: GrowableNet, state: dict) -> None:
    """Load a state dict of the net's current structure in place (a snapshot taken earlier, e.g. CPG's
    compaction rollback); derived tensors are invalidated through the one path, ctx.bump()."""
    net.load_state_dict(state, strict=True)
    net.ctx.bump()


def _policy_to_dict(p: MaskPolicy) -> dict:
    return dataclasses.asdict(p)


def _policy_from_dict(d: dict) -> MaskPolicy:
    # an older policy also held the channel gates' switch and configuration (`gates`, `cs`): the method's now
    return MaskPolicy(
        frozen_kind=d["frozen_kind"], released_kind=d["released_kind"], grown_kind=d["grown_kind"],
        selective_kind=d["selective_kind"], selective=M.GumbelConfig(**d["selective"]),
        selective_ste=M.STEConfig(**d["selective_ste"]), attentive_kind=d["attentive_kind"],
        attentive=M.STEConfig(**d["attentive"]), attentive_gumbel=M.GumbelConfig(**d["attentive_gumbel"]))
