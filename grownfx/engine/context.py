"""The state every task-aware layer shares: which task computes, channel widths and births, gates, policy.

Layers hold an unregistered reference to one `TaskContext`; `GrowableNet` owns it.  Keeping this state in
one object (instead of threading `task=` through every call in the graph) leaves the fx graph's call
signatures exactly as torchvision wrote them.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from grownfx.engine import masks as M

SEL, DENSE, ATT, OFF = 0, 1, 2, 3


@dataclass
class MaskPolicy:
    """Which masks the task being learned puts on which units (the method's switches live here).

    frozen_kind:   units owned by finished tasks: SEL (learned selective mask) | DENSE (use all) | OFF (ignore)
    released_kind: free units on channels older than this task: DENSE (re-train them) | OFF (leave them)
    grown_kind:    units on channels born for this task: ATT (attentive mask) | DENSE
    gates:         channel-wise grown-mask (continuous sparsification) on channels born for this task
    """

    frozen_kind: int = SEL
    released_kind: int = DENSE
    grown_kind: int = ATT
    gates: bool = True
    selective_kind: str = "gumbel"  # 'gumbel' (GROWN) | 'ste' (Piggyback/KSM straight-through)
    selective: M.GumbelConfig = field(default_factory=M.GumbelConfig)
    selective_ste: M.STEConfig = field(default_factory=M.STEConfig)
    attentive_kind: str = "ste"  # 'ste' | 'gumbel'
    attentive: M.STEConfig = field(default_factory=M.STEConfig)
    attentive_gumbel: M.GumbelConfig = field(default_factory=M.GumbelConfig)
    cs: M.CSConfig = field(default_factory=M.CSConfig)

    @property
    def attentive_init(self) -> float:
        return self.attentive.init if self.attentive_kind == "ste" else self.attentive_gumbel.init


class TaskContext:
    def __init__(self):
        self.task: int | None = None
        self.num_tasks = 0
        self.frozen: set[int] = set()
        self.widths: dict[int, int] = {}  # growable group -> width
        self.births: dict[int, torch.Tensor] = {}  # growable group -> task each channel was born for (-1: seed)
        self.layouts: dict[tuple[str, str], tuple] = {}  # (module, role) -> ((group, factor, fixed_width), ...)
        self.gates: dict[int, torch.nn.Parameter] = {}  # group -> grown-mask scores of its newest channels
        self.policy = MaskPolicy()
        self.beta = 1.0  # continuous-sparsification temperature (annealed by the learner)
        self.temperature: float | None = None  # Gumbel temperature override (annealed by the learner)
        self.hard_gates = False  # train with binarised gates (straight-through), as they will be kept
        self.fuse_masks = False  # compute masked weights with one torch.compile'd expression (training.compile)
        self.version = 0  # bumped on every structural change
        self._vis: dict = {}

    # -- tasks ----------------------------------------------------------------------------------------------
    def require_task(self) -> int:
        if self.task is None:
            raise RuntimeError("no task to compute: call net.add_task(num_classes) first, then net(x, task=t)")
        return self.task

    def is_learning(self, task: int) -> bool:
        return task == self.num_tasks - 1 and task not in self.frozen

    @property
    def learning_task(self) -> int | None:
        t = self.num_tasks - 1
        return t if t >= 0 and t not in self.frozen else None

    @property
    def birth_task(self) -> int:
        """The task that channels added now belong to: the one being learned, else the next one."""
        t = self.learning_task
        return t if t is not None else self.num_tasks

    def bump(self) -> None:
        self.version += 1
        self._vis.clear()

    # -- channels -------------------------------------------------------------------------------------------
    def _channel_select(self, target: str, role: str, task: int, pick) -> torch.Tensor | None:
        layout = self.layouts.get((target, role))
        if layout is None:
            return None
        key = (target, role, task, pick.__name__, self.version)
        if key in self._vis:
            return self._vis[key]
        parts, pos, trivial = [], 0, True
        for gid, factor, fixed in layout:
            w = self.widths.get(gid, fixed)
            births = self.births.get(gid)
            sel = pick(births, task) if births is not None else None
            if sel is None:
                sel = pick(torch.full((w,), -1, dtype=torch.long), task)
            trivial &= bool(sel.all()) if pick is _visible else not bool(sel.any())
            parts.append((sel, factor, pos))
            pos += w * factor
        if pick is _visible:
            out = None if trivial else torch.cat(
                [((s.nonzero().squeeze(1)[:, None] * f + torch.arange(f)).reshape(-1) + p) for s, f, p in parts])
        else:
            out = None if trivial else torch.cat([s.repeat_interleave(f) for s, f, _ in parts])
        self._vis[key] = out
        return out

    def visible(self, target: str, role: str, task: int) -> torch.Tensor | None:
        """Positions on a layer axis that exist for `task` (None: all of them)."""
        return self._channel_select(target, role, task, _visible)

    def born(self, target: str, role: str, task: int) -> torch.Tensor | None:
        """Bool per position on a layer axis: the channel was born for `task` (None: none was)."""
        return self._channel_select(target, role, task, _born)

    # -- grown-mask gates -----------------------------------------------------------------------------------
    def gate_vector(self, target: str, role: str, training: bool) -> torch.Tensor | None:
        if not self.gates or not self.policy.gates:
            return None
        layout = self.layouts.get((target, role))
        if layout is None or not any(gid in self.gates for gid, _, _ in layout):
            return None
        parts = []
        for gid, factor, fixed in layout:
            w = self.widths.get(gid, fixed)
            s = self.gates.get(gid)
            if s is None:
                parts.append(torch.ones(w * factor, device=_dev(self.gates)))
                continue
            if not training:
                g = M.cs_hard(s, self.beta, self.policy.cs)
            elif self.hard_gates:
                soft = M.cs_gate(s, self.beta, self.policy.cs)
                g = M.cs_hard(s.detach(), self.beta, self.policy.cs) + (soft - soft.detach())
            else:
                g = M.cs_gate(s, self.beta, self.policy.cs)
            vec = torch.cat([torch.ones(w - s.numel(), device=s.device, dtype=g.dtype), g])
            parts.append(vec.repeat_interleave(factor) if factor > 1 else vec)
        return torch.cat(parts)

    def gate_versions(self) -> list:
        return [(gid, id(s), s._version) for gid, s in sorted(self.gates.items())] + [self.beta, self.hard_gates]


def _visible(births: torch.Tensor, task: int) -> torch.Tensor:
    return births <= task


def _born(births: torch.Tensor, task: int) -> torch.Tensor:
    return births == task


def _dev(gates: dict) -> torch.device:
    return next(iter(gates.values())).device
