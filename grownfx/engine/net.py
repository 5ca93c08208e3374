"""`GrowableNet`: the public face of the surgery engine (`prepare()`, engine/prepare.py, builds one).

    net = grownfx.prepare(model, example_input, seed_width=0.5)   # trace -> couple -> slim -> rewrite
    t = net.add_task(num_classes)                                  # new head, per-task norms; t is learned
    net.grow(ratio=0.25)                                           # every growth site gains channels
    y = net(x, task=t)                                             # the task is named (optional with one task)
    net.freeze_task(t)                                             # t's weights, masks, norms, head immutable
    sub = net.export(task=t)                                       # plain fx.GraphModule for task t
"""

from __future__ import annotations

import dataclasses
import fnmatch
import math
from typing import Iterable, Sequence

import torch
from torch import fx, nn

from grownfx.engine.banks import MaskedLayer
from grownfx.engine.context import DENSE, SEL, ChannelScale, MaskPolicy, NetStructure, TaskContext
from grownfx.engine.coupling import CouplingGroup, CouplingResult
from grownfx.engine.errors import ModelCheckError, SurgeryError
from grownfx.engine.layers import FREE, PerTask, TaskParameter
from grownfx.engine.mask_storage import join_task_masks, split_task_masks
from grownfx.engine.rewrite import export_graph
from grownfx.engine.surgery import GroupChange, apply_changes, binding_layout, grow_change, keep_change
from grownfx.engine.weight_pass import learning_pass

__all__ = ["GrowableNet", "ModelCheckError", "SurgeryError", "count_parameters"]


def count_parameters(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


class GrowableNet(nn.Module):
    """A traced backbone whose conv/linear weights are shared across tasks under per-task masks."""

    def __init__(self, gm: fx.GraphModule, coupling: CouplingResult, ctx: TaskContext, *, full_params: int,
                 seed: int, heads: Sequence[str], input_shape: tuple, head: str | None = None):
        super().__init__()
        self.graph_module = gm
        self.channel_scale: ChannelScale | None = None  # a method's channel scale (set_channel_scale), saved with us
        self.ctx = ctx
        self.coupling = coupling
        self.full_params = full_params
        self.head_targets = list(heads)  # every layer producing the logits (a distillation head too): one per task
        # the classifier: its first module, or the parameter of a functional classifier (`F.linear(f, self.W)`)
        self.head_target = head if head is not None else self.head_targets[0]
        self.input_shape = input_shape
        self.num_classes: list[int] = []
        self.generator = torch.Generator().manual_seed(seed)
        # a finished task's masks are stored as one bit string (exactly 1 bit per unit, no per-layer padding)
        self.register_state_dict_post_hook(join_task_masks)
        self.register_load_state_dict_pre_hook(split_task_masks)

    # -- structure ------------------------------------------------------------------------------------------
    @property
    def structure(self) -> NetStructure:
        """Tasks, finished tasks, channel widths and births, layouts (read it; the net's methods change it)."""
        return self.ctx.structure

    @property
    def policy(self) -> MaskPolicy:
        """The mask policy of the task being learned (`set_policy` changes it)."""
        return self.ctx.masks.policy

    @property
    def coupling_groups(self) -> list[CouplingGroup]:
        """Coupling groups with their current widths."""
        return [dataclasses.replace(g, width=self.structure.widths.get(g.id, g.width)) for g in self.coupling.groups
                if g.members]

    @property
    def growable_groups(self) -> list[CouplingGroup]:
        return [g for g in self.coupling_groups if g.growable]

    def groups_matching(self, include: Sequence[str] = ("*",), exclude: Sequence[str] = (),
                        layer_types: Sequence[str] = ()) -> list[int]:
        """Growable groups with a member module matching `include` (globs) and none matching `exclude`."""
        out = []
        for g in self.growable_groups:
            targets = [b.target for b in g.members if b.role in ("in", "out", "grouped", "feat")]
            if not any(fnmatch.fnmatchcase(t, p) for t in targets for p in include):
                continue
            if any(fnmatch.fnmatchcase(t, p) for t in targets for p in exclude):
                continue
            if layer_types:
                types = {self._layer_type_name(t) for t in targets}
                if not types & set(layer_types):
                    continue
            out.append(g.id)
        return out

    def _layer_type_name(self, target: str) -> str:
        m = self.graph_module.get_submodule(target)
        if isinstance(m, PerTask):
            return type(m.pending).__name__
        if hasattr(m, "conv_type"):
            return m.conv_type.__name__
        return "Linear" if isinstance(m, MaskedLayer) else type(m).__name__

    def task_modules(self):
        for m in self.modules():
            if isinstance(m, (MaskedLayer, PerTask, TaskParameter)):
                yield m

    def masked_layers(self) -> list[MaskedLayer]:
        return [m for m in self.modules() if isinstance(m, MaskedLayer)]

    @property
    def num_tasks(self) -> int:
        return self.structure.num_tasks

    @property
    def learning_task(self) -> int | None:
        return self.structure.learning_task

    # -- forward --------------------------------------------------------------------------------------------
    def forward(self, x: torch.Tensor, task: int | None = None) -> torch.Tensor:
        """Task `task`'s output (0-based); `task` may be left out only when the net has exactly one task."""
        n = self.structure.num_tasks
        if task is None:
            if n != 1:
                raise ValueError(f"name the task to compute: net(x, task=t) (the net has {n} tasks; only a net with "
                                 "exactly one task computes it without being told)")
            task = 0
        t = int(task)
        if not 0 <= t < n:
            raise IndexError(f"task {task} does not exist (the net has {n} tasks)")
        with self.ctx.computing(t), learning_pass(self, t):
            return self.graph_module(x)

    def computing(self, task: int):
        """A scope in which task-aware layers called directly compute `task` (the previous task is back when it
        ends); `net(x, task=t)` enters one itself."""
        if not 0 <= int(task) < self.structure.num_tasks:
            raise IndexError(f"task {task} does not exist (the net has {self.structure.num_tasks} tasks)")
        return self.ctx.computing(task)

    def inference(self):
        """A scope in which the parameters do not change (evaluation, PreciseBN's pass, serving): the learning
        task's masked weights are computed once and reused by every forward in evaluation mode without grad, and
        dropped when the scope ends.  Outside one they are recomputed at every forward, so any optimiser (torch's
        fused ones do not bump a tensor's version) and any user loop is seen at once.  Finished tasks' weights
        are cached always: they derive from buffers no optimiser holds.

            with net.inference(), torch.no_grad():
                acc = accuracy(lambda x: net.eval()(x, task=t), loader)
        """
        return self.ctx.cache.inference()

    # -- task lifecycle -------------------------------------------------------------------------------------
    def add_task(self, num_classes: int, keep_head: bool = False) -> int:
        """Add a task with its own head and norm state; the previous task is frozen first.  `keep_head`: the
        task's classifier is the backbone's own (pretrained) one, not a fresh one: only for the first task, and
        only with the classifier's own number of classes."""
        if not isinstance(num_classes, int) or num_classes < 1:
            raise ValueError(f"num_classes must be a positive int, got {num_classes!r}")
        if keep_head and self.structure.num_tasks:
            raise ValueError("keep_head: only the first task has the backbone's own classifier")
        if self.structure.learning_task is not None:
            self.freeze_task(self.structure.learning_task)
        t = self.structure.num_tasks
        self.structure.num_tasks += 1
        self.num_classes.append(num_classes)
        device = self._device()
        for m in list(self.task_modules()):
            keep = {"keep_head": True} if keep_head else {}  # only when asked: add_task overrides need not know it
            if isinstance(m, PerTask):
                m.add_task(num_classes=num_classes, generator=self.generator, **keep)
                m.copies[-1].to(device)
            elif isinstance(m, TaskParameter):
                m.add_task(num_classes=num_classes, generator=self.generator, **keep)
        self.ctx.bump()
        self.configure()
        self._check_logits(t, num_classes)
        return t

    def _check_logits(self, t: int, num_classes: int) -> None:
        """Task t's logits have its number of classes (prepare's `check_class_count` proved the logits follow the
        classifier; this confirms it on the task-aware net with one example of zeros)."""
        x = torch.zeros((1,) + tuple(self.input_shape), dtype=getattr(self, "input_dtype", torch.float32),
                        device=self._device())
        was = self.training
        self.eval()
        try:
            with torch.no_grad(), self.ctx.computing(t):
                out = self.graph_module(x)
        finally:
            self.train(was)
        axis = getattr(self, "class_axis", 1)
        if out.dim() <= axis or out.shape[axis] != num_classes:
            raise SurgeryError(f"task {t} has {num_classes} classes but the net gives logits of shape "
                               f"{tuple(out.shape)}")

    def set_policy(self, policy: MaskPolicy) -> None:
        """The masks the task being learned puts on which units (a method's choice; saved with the net)."""
        self.ctx.masks.policy = policy
        self.configure()

    def set_mask_temperature(self, temperature: float | None) -> None:
        """The Gumbel temperature of the learning task's masks from now on (a method's schedule anneals it;
        None: the policy's own).  Not saved: the method sets it again before each epoch."""
        self.ctx.masks.temperature = temperature

    def set_mask_noise(self, on: bool) -> None:
        """Whether the learning task's Gumbel masks draw their noise in training forwards from now on (off: a
        training forward masks exactly as evaluation does).  Not saved: the method sets it before each epoch."""
        self.ctx.masks.noise = bool(on)

    def configure(self) -> None:
        """Recompute which masks the learning task puts on which units (after a policy change or growth)."""
        t = self.structure.learning_task
        if t is None:
            return
        layers = self.masked_layers()
        for m in layers:
            m.configure(t)  # each bumps the context: derived tensors are rebuilt from the new kinds
        for m in layers:
            m._mask_plan()  # built now, outside any compiled region

    def set_channel_scale(self, scale: ChannelScale) -> None:
        """Install a method's multipliers on consumer inputs (GROWN's candidate gates); it is saved with the net
        (`net.channel_scale`), and its parameters are the method's to train."""
        if not isinstance(scale, nn.Module) or not isinstance(scale, ChannelScale):
            raise TypeError("a channel scale is an nn.Module implementing engine.context.ChannelScale")
        self.channel_scale = scale.to(self._device())
        self.ctx.masks.channel_scale = scale
        self.ctx.bump()

    def freeze_task(self, task: int) -> None:
        """Binarise the task's masks, drop its pruned candidate channels, and make everything it owns immutable."""
        if task != self.structure.learning_task:
            raise ValueError(f"task {task} is not the task being learned ({self.structure.learning_task})")
        if self.channel_scale is not None:
            self.channel_scale.on_freeze(self)  # e.g. GROWN settles its candidate gates
        for m in list(self.task_modules()):
            m.freeze(task)
        self.structure.frozen.add(task)
        self.ctx.bump()

    # -- growth ---------------------------------------------------------------------------------------------
    def grow(self, ratio: float | None = None, channels: int | None = None,
             groups: Iterable[int] | None = None) -> dict[int, int]:
        """Add channels to growable groups (all by default), keeping every task's outputs unchanged.

        `ratio` is relative to each group's current width; `channels` is an absolute count.  Counts round up
        to a group's granularity (grouped convs grow by whole groups).  New channels are appended at the end of
        each group; a method that gates them (GROWN's grown-mask) does so through its channel scale.
        """
        if (ratio is None) == (channels is None):
            raise ValueError("give exactly one of ratio= or channels=")
        if ratio is not None and ratio <= 0 or channels is not None and channels <= 0:
            raise ValueError("growth must add at least one channel")
        gids = list(groups) if groups is not None else [g.id for g in self.growable_groups]
        structure = self.structure
        birth = structure.birth_task
        changes: dict[int, GroupChange] = {}
        added: dict[int, int] = {}
        for gid in gids:
            g = self.coupling.groups[gid]
            if not g.growable:
                raise SurgeryError(f"group {gid} is fixed: {'; '.join(g.reasons)}")
            w = structure.widths[gid]
            n = channels if channels is not None else math.ceil(ratio * w)
            n = math.ceil(n / g.granularity) * g.granularity
            changes[gid], added[gid] = grow_change(w, n), n
        apply_changes(self.graph_module, self.coupling, structure.widths, changes, self.generator, birth=birth)
        device = self._device()
        for gid, n in added.items():
            structure.births[gid] = torch.cat([structure.births[gid], torch.full((n,), birth, dtype=torch.long)])
        self.to(device)
        self.ctx.bump()
        self.configure()
        return added

    def keep_channels(self, keep: dict[int, torch.Tensor]) -> dict[int, int]:
        """Prune: each group keeps the channels `keep[gid]` (old indices, in order); returns {group: removed}."""
        structure = self.structure
        changes = {gid: keep_change(k.cpu()) for gid, k in keep.items() if k.numel() < structure.widths[gid]}
        removed = {gid: structure.widths[gid] - keep[gid].numel() for gid in changes}
        if changes:
            apply_changes(self.graph_module, self.coupling, structure.widths, changes, self.generator,
                          birth=structure.birth_task)
            for gid, ch in changes.items():
                structure.births[gid] = structure.births[gid][ch.src]
        self.ctx.bump()
        self.configure()
        return removed

    def round_to_granularity(self, gid: int, keep: torch.Tensor) -> torch.Tensor:
        """A bool per channel of group `gid`, widened so that whole granularity blocks are kept or dropped."""
        gran = self.coupling.groups[gid].granularity
        if gran == 1:
            return keep
        blocks = keep.view(-1, gran).any(dim=1, keepdim=True)
        return blocks.expand(-1, gran).reshape(-1)

    # -- what the learner trains ----------------------------------------------------------------------------
    def trainable_parameters(self) -> dict[str, list[nn.Parameter]]:
        """The learning task's parameters, split by optimiser: weights, masks (unit scores).  A channel scale's
        parameters are its method's to collect and train."""
        t = self.structure.learning_task
        out: dict[str, list[nn.Parameter]] = {"weights": [], "masks": []}
        if t is None:
            return out
        for m in self.task_modules():
            if isinstance(m, MaskedLayer):
                if m.weight.requires_grad:
                    out["weights"].append(m.weight)
                if m.score is not None:
                    out["masks"].append(m.score)
            elif isinstance(m, PerTask):
                out["weights"] += [p for p in m.copies[t].parameters() if p.requires_grad]
            elif m.copies[t].requires_grad:
                out["weights"].append(m.copies[t])
        return out

    def unit_stats(self) -> dict:
        """For the learning task: fraction of old units its selective mask drops, re-trained released weights."""
        sel = sel_zero = retrained = 0
        t = self.structure.learning_task
        for m in self.masked_layers():
            if m.kind is None:
                continue
            used = m.used_units()
            is_sel = m.kind == SEL
            sel += int(is_sel.sum())
            sel_zero += int((is_sel & ~used).sum())
            released = (m.kind == DENSE) & (m.owner == FREE) & ~m.grown_units(t)  # old channels, free units
            retrained += int((released & used).sum()) * m.unit_size
        return {"selective_zero_frac": sel_zero / sel if sel else None, "retrained": retrained}

    def free_weights(self) -> int:
        """Weights in the banks that no finished task uses (released, available to the next task)."""
        return sum(int((m.owner == FREE).sum()) * m.unit_size for m in self.masked_layers())

    # -- export and accounting ------------------------------------------------------------------------------
    def export(self, task: int, prune_unused: bool = True) -> fx.GraphModule:
        """A plain `fx.GraphModule` of standard layers computing task `task`, unused channels removed."""
        if not 0 <= task < self.structure.num_tasks:
            raise IndexError(f"task {task} does not exist")
        sub = export_graph(self.graph_module, task)  # every task-aware module gives its evaluation-mode plain form
        widths = {gid: int((b <= task).sum()) for gid, b in self.structure.births.items()}
        if prune_unused:
            changes = self._unused_channel_changes(sub, widths)
            if changes:
                apply_changes(sub, self.coupling, widths, changes)
        # an inference network, as a finished task's weights in the task-aware net are: tensors that do not
        # require grad (torch's matmul picks its kernel, hence its rounding, by requires_grad; torch.equal with
        # the task-aware net depends on it).  `requires_grad_(True)` makes it trainable.
        return sub.eval().requires_grad_(False)

    def _unused_channel_changes(self, sub: fx.GraphModule, widths: dict[int, int]) -> dict[int, GroupChange]:
        changes = {}
        for gid, w in widths.items():
            consumers = [b for b in self.coupling.groups[gid].members if b.role == "in"]
            if not consumers or w == 0 or self._layer_normed(gid):
                continue  # a layer norm's statistics read every channel, used by a consumer or not
            alive = torch.zeros(w, dtype=torch.bool)
            for b in consumers:
                weight = sub.get_submodule(b.target).weight.detach()
                used = weight.ne(0).transpose(0, 1).reshape(weight.shape[1], -1).any(dim=1).cpu()
                pos = 0
                for g2, factor, fixed in binding_layout(self.coupling, b):
                    w2 = widths.get(g2, fixed)
                    if g2 == gid:
                        alive |= used[pos: pos + w2 * factor].view(w2, factor).any(dim=1)
                    pos += w2 * factor
            alive = self.round_to_granularity(gid, alive)
            if not alive.any():
                alive[: self.coupling.groups[gid].granularity] = True
            if not alive.all():
                changes[gid] = keep_change(alive.nonzero().squeeze(1))
        return changes

    def _layer_normed(self, gid: int) -> bool:
        """A layer norm normalises across the channels of group `gid`, or attention heads are made of them (an
        unused channel may still be read by a norm's statistics or an attention's q/k/v)."""
        for b in self.coupling.groups[gid].members:
            if b.role in ("attn", "heads", "lnfn"):
                return True
            if b.role == "feat":
                m = self.graph_module.get_submodule(b.target)
                if isinstance(m, PerTask) and m.norm_axis is not None:
                    return True
        return False

    def num_parameters(self, task: int | None = None) -> int:
        """Parameters stored (task=None) or the parameters task `task` computes with."""
        total = 0
        for m in self.task_modules():
            if isinstance(m, MaskedLayer):
                total += m.weight.numel() if task is None else m.used_count(task)
            else:  # per-task copies
                copies = m.copies if task is None else [m.copies[task]]
                total += sum(_numel(c) for c in copies)
        return total

    def mask_bytes(self, task: int | None = None) -> int:
        """Bytes of bit-packed masks stored for one finished task, or for all (one bit string per task)."""
        tasks = sorted(self.structure.frozen) if task is None else [task]
        return sum((sum(math.prod(m.mask_shapes[t]) for m in self.masked_layers() if t in m.mask_shapes) + 7) // 8
                   for t in tasks)

    def _device(self) -> torch.device:
        return next(self.graph_module.parameters()).device

    def extra_repr(self) -> str:
        g = self.growable_groups
        return (f"tasks={self.structure.num_tasks}, coupling_groups={len(self.coupling_groups)}, growable={len(g)}, "
                f"parameters={self.num_parameters()}")


def _numel(x) -> int:
    if isinstance(x, torch.Tensor):  # a bool or integer mask copied per task is no parameter
        return x.numel() if x.is_floating_point() else 0
    return count_parameters(x)
