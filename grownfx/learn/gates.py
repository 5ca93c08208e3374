"""GROWN's candidate gates: the channel-wise grown-mask of learnable sparse growth (continuous sparsification).

The engine grows, prunes and applies a method's channel scale at every consumer input; the gates themselves
are GROWN's, and live here:

    gates = CandidateGates.of(net)               # installed once per net (GrownLearner.install does it)
    gates.beta, gates.hard = 20.0, False         # the schedule: the learner sets it before every epoch
    gates.grow(net, channels=n, groups=[gid])    # net.grow + one gate score per new channel
    costs = gates.costs(net)                     # weights each candidate channel brings (Eq. 3's penalty)
    gates.penalty(costs)                         # sum over candidates of gate * weights it brings
    gates.settle(net)                            # drop candidates whose gate is off, fold the kept gates

A gate multiplies its channel wherever the channel is consumed: the input columns of the next masked banks
and of the task's head (engine: `TaskContext.input_scale`), so a candidate feeding the head is trained like
any other.  `settle` folds the kept gates into those same columns, so the settled network computes what the
last (binarised) epoch computed.

The gates' schedule is GROWN's, so it lives here, not in the engine: `beta` (continuous sparsification's
temperature, annealed over a round) and `hard` (the last epoch of a round trains the binarised gates).  They are
not saved: the learner sets them before every epoch from where the task's training stands.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from grownfx.engine import masks as M
from grownfx.engine.banks import MaskedLayer
from grownfx.engine.context import ChannelScale
from grownfx.engine.layers import PerTask, scaled_columns
from grownfx.engine.net import GrowableNet, SurgeryError
from grownfx.engine.surgery import binding_layout


class CandidateGates(nn.ParameterDict, ChannelScale):
    """Per growth site (group id as a string), one score s per candidate: the group's newest channels.

    cs: continuous sparsification's configuration (s0, the final beta); beta, hard: the schedule (module
    docstring)."""

    def __init__(self, cs: M.CSConfig = M.CSConfig()):
        super().__init__()
        self.cs = cs
        self.beta = 1.0
        self.hard = False

    @classmethod
    def of(cls, net: GrowableNet, cs: M.CSConfig | None = None) -> "CandidateGates":
        """The net's candidate gates, installed (`net.set_channel_scale`) on first use; `cs` sets their
        configuration."""
        if net.channel_scale is None:
            net.set_channel_scale(cls())
        gates = net.channel_scale
        if not isinstance(gates, cls):
            raise TypeError(f"the net carries another channel scale ({type(gates).__name__})")
        if cs is not None:
            gates.cs = cs
        return gates

    # -- the engine's ChannelScale hook ---------------------------------------------------------------------
    def vector(self, gid: int, width: int, training: bool) -> torch.Tensor | None:
        s = self[str(gid)] if str(gid) in self else None
        if s is None:
            return None
        if not training:
            g = M.cs_hard(s, self.beta, self.cs)
        elif self.hard:  # the last epoch of a round: binarised forward, soft gradient (straight-through)
            soft = M.cs_gate(s, self.beta, self.cs)
            g = M.cs_hard(s.detach(), self.beta, self.cs) + (soft - soft.detach())
        else:
            g = M.cs_gate(s, self.beta, self.cs)
        return torch.cat([torch.ones(width - s.numel(), device=s.device, dtype=g.dtype), g])

    def version_key(self) -> tuple:
        return tuple((k, id(s), s._version) for k, s in self.items()) + (self.beta, self.hard)

    def on_freeze(self, net: GrowableNet) -> None:
        self.settle(net)

    def structure(self) -> dict:
        return {k: int(v.numel()) for k, v in self.items()}

    def load_structure(self, structure: dict) -> None:
        self.clear()
        for k, n in structure.items():
            self[k] = nn.Parameter(torch.zeros(n))

    # -- GROWN's use of them --------------------------------------------------------------------------------
    def grow(self, net: GrowableNet, channels: int, groups: list[int]) -> dict[int, int]:
        """Add `channels` gated candidates to each group (for the task being learned)."""
        if net.learning_task is None:
            raise ValueError("gated growth needs a task being learned")
        for gid in groups:
            _check_consumers(net, gid)
        added = net.grow(channels=channels, groups=groups)
        device = net._device()
        for gid, n in added.items():
            key = str(gid)
            old = self[key].data if key in self else torch.empty(0, device=device)
            self[key] = nn.Parameter(torch.cat([old, torch.full((n,), self.cs.init, device=device)]))
        return added

    def costs(self, net: GrowableNet) -> dict[int, float]:
        """Weights each channel of a gated group brings (producer rows, consumer columns)."""
        costs: dict[int, float] = {}
        for key in self.keys():
            gid, total = int(key), 0.0
            for b in net.coupling.groups[gid].members:
                if b.role not in ("in", "out", "grouped"):
                    continue
                m = net.graph_module.get_submodule(b.target)
                w = m.copies[-1].weight if isinstance(m, PerTask) else m.weight
                reps = sum(f for g2, f, _ in binding_layout(net.coupling, b) if g2 == gid)
                if b.role == "in":
                    total += w.shape[0] * math.prod(w.shape[2:]) * reps
                else:  # rows per channel: a depthwise conv with a multiplier has several
                    total += math.prod(w.shape[1:]) * reps
            costs[gid] = total
        return costs

    def penalty(self, costs: dict[int, float]) -> torch.Tensor | None:
        """Sum over candidate channels of gate * weights it brings (the L0 relaxation of Eq. 3), before lambda."""
        total = None
        for key, s in self.items():
            g = M.cs_gate(s, self.beta, self.cs).sum() * costs[int(key)]
            total = g if total is None else total + g
        return total

    def settle(self, net: GrowableNet) -> dict[int, int]:
        """End of a learnable growth round: fold each kept gate (at its binarised value) into the consumer
        columns, drop candidates whose gate is off from every layer; returns {group: candidates dropped}."""
        if not len(self):
            return {}
        keep: dict[int, torch.Tensor] = {}
        for key, s in self.items():
            gid = int(key)
            hard = M.cs_hard(s.detach(), self.beta, self.cs)
            _scale_consumer_columns(net, gid, hard)
            w, n = net.structure.widths[gid], s.numel()
            kept = net.round_to_granularity(gid, hard > 0)
            keep[gid] = torch.cat([torch.arange(w - n), (w - n) + kept.nonzero().squeeze(1).cpu()])
        self.clear()
        return net.keep_channels(keep)


def settle_gates(net: GrowableNet) -> dict[int, int]:
    """Settle the net's candidate gates, if it has any (see CandidateGates.settle)."""
    return net.channel_scale.settle(net) if isinstance(net.channel_scale, CandidateGates) else {}


def _check_consumers(net: GrowableNet, gid: int) -> None:
    """Every layer consuming the group must apply the gate: a gate no consumer applies would never be trained."""
    consumers = [b for b in net.coupling.groups[gid].members if b.role == "in"]
    if not consumers:
        raise SurgeryError(f"group {gid} has no consuming layer: a gate on it would act on nothing")
    for b in consumers:
        m = net.graph_module.get_submodule(b.target)
        if not (isinstance(m, MaskedLayer) and m.in_role() == "in" or isinstance(m, PerTask)
                and m.accepts_input_scale()):
            raise SurgeryError(f"group {gid}: consumer '{b.target}' ({type(m).__name__}) cannot apply a channel gate")


def _scale_consumer_columns(net: GrowableNet, gid: int, hard: torch.Tensor) -> None:
    """Multiply the input columns of the group's newest channels by their hard gate value (every consumer:
    masked banks and the learning task's copy of a per-task head)."""
    structure = net.structure
    w, n = structure.widths[gid], hard.numel()
    consumers = []
    for b in net.coupling.groups[gid].members:
        if b.role == "in":
            consumers.append((b.target, binding_layout(net.coupling, b)))
        elif b.role == "attn":  # nn.MultiheadAttention: its projections consume the group (engine/attention.py)
            consumers += [(b.target + p, binding_layout(net.coupling, b)) for p in (".in_proj", ".out_proj")]
    for target, layout in consumers:
        scale = torch.ones(sum(structure.widths.get(g, fixed) * f for g, f, fixed in layout), device=hard.device)
        pos = 0
        for g2, factor, fixed in layout:
            if g2 == gid:
                scale[pos + (w - n) * factor: pos + w * factor] = hard.repeat_interleave(factor)
            pos += structure.widths.get(g2, fixed) * factor
        module = net.graph_module.get_submodule(target)
        weight = module.copies[structure.learning_task].weight if isinstance(module, PerTask) else module.weight
        with torch.no_grad():
            weight.copy_(scaled_columns(weight, scale.to(weight.device)))
