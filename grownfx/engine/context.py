"""The state every task-aware layer shares: which task computes, channel widths and births, gates, policy.

Layers hold an unregistered reference to one `TaskContext`; `GrowableNet` owns it.  Keeping this state in
one object (instead of threading `task=` through every call in the graph) leaves the fx graph's call
signatures exactly as torchvision wrote them.
"""

from __future__ import annotations

from collections import OrderedDict
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch

from grownfx.engine import masks as M

SEL, DENSE, ATT, OFF = 0, 1, 2, 3
FINISHED_CACHE_SIZE = 4  # default of TaskContext.finished_cache_size (docs/performance.md §2)


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
        self.channel_scale: "ChannelScale | None" = None  # a method's multipliers on consumer inputs (gates)
        self.policy = MaskPolicy()
        self.beta = 1.0  # continuous-sparsification temperature (annealed by the learner)
        self.temperature: float | None = None  # Gumbel temperature override (annealed by the learner)
        self.hard_gates = False  # train with binarised gates (straight-through), as they will be kept
        self.fuse_masks = False  # compute masked weights with one torch.compile'd expression (training.compile)
        self.unit_cols: dict[str, int] = {}  # granularity 'channel': a Linear's input columns per mask unit
        self.version = 0  # bumped on every structural change
        self._cache: dict = {}  # (owner, name) -> (key, derived tensor); see cached() and cached_lru()
        self._inference: dict | None = None  # the learning task's derived tensors, inside an inference() scope
        self._compiled: dict = {}  # function -> its torch.compile'd form (fuse_masks), compiled on first use
        # finished tasks whose effective weights each masked layer keeps (least recently used evicted): memory
        # up to this many weight-sized tensors per layer; serving that many tasks in turn rebuilds nothing
        self.finished_cache_size = FINISHED_CACHE_SIZE

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
        """The one invalidation path: a structural change happened, every derived tensor is stale."""
        self.version += 1
        self._cache.clear()
        if self._inference is not None:
            self._inference.clear()

    # -- channels -------------------------------------------------------------------------------------------
    def _channel_select(self, target: str, role: str, task: int, pick) -> torch.Tensor | None:
        layout = self.layouts.get((target, role))
        if layout is None:
            return None
        return self.cached(target, f"{role}.{pick.__name__}.{task}", (),
                           lambda: self._select(layout, task, pick))

    def _select(self, layout: tuple, task: int, pick) -> torch.Tensor | None:
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
        return out

    def visible(self, target: str, role: str, task: int) -> torch.Tensor | None:
        """Positions on a layer axis that exist for `task` (None: all of them)."""
        return self._channel_select(target, role, task, _visible)

    def born(self, target: str, role: str, task: int) -> torch.Tensor | None:
        """Bool per position on a layer axis: the channel was born for `task` (None: none was)."""
        return self._channel_select(target, role, task, _born)

    def norm_stats(self, target: str, task: int) -> torch.Tensor | None:
        """Positions, among the channels a layer norm `target` sees when `task` computes, that its statistics are
        taken over: the channels born before `task` (None: every channel it sees, a standard layer norm).

        Channels born for a task never enter that task's statistics, so adding (or pruning) them while it is
        learned leaves its normalisation of the other channels unchanged; a finished task's set never changes."""
        layout = self.layouts.get((target, "feat"))
        if layout is None:
            return None
        return self.cached(target, f"norm_stats.{task}", (), lambda: self._norm_stats(layout, task))

    def _norm_stats(self, layout: tuple, task: int) -> torch.Tensor | None:
        parts = []
        for gid, factor, fixed in layout:
            births = self.births.get(gid)
            if births is None:
                births = torch.full((self.widths.get(gid, fixed),), -1, dtype=torch.long)
            seen = births[births <= task]
            parts.append((seen < task).repeat_interleave(factor))
        keep = torch.cat(parts)
        return None if bool(keep.all()) else keep.nonzero().squeeze(1)

    # -- consumer-input channel scales (a method's gates) ---------------------------------------------------
    def input_scale(self, target: str, training: bool) -> torch.Tensor | None:
        """Multiplier over the input axis of consumer `target` (None: all ones), from the installed ChannelScale.

        Every layer that consumes a group's channels (a masked bank's columns, a per-task head's columns) calls
        this, so a gate acts wherever its channels are consumed, whatever the consumer is."""
        scale = self.channel_scale
        layout = self.layouts.get((target, "in")) if scale is not None else None
        if layout is None:
            return None
        parts = [(scale.vector(gid, self.widths.get(gid, fixed), self, training), factor, self.widths.get(gid, fixed))
                 for gid, factor, fixed in layout]
        ref = next((v for v, _, _ in parts if v is not None), None)
        if ref is None:
            return None
        return torch.cat([torch.ones(w * f, device=ref.device, dtype=ref.dtype) if v is None
                          else (v.repeat_interleave(f) if f > 1 else v) for v, f, w in parts])

    def scale_version(self) -> tuple:
        return self.channel_scale.version_key(self) if self.channel_scale is not None else ()

    # -- derived tensors: one cache, invalidated by bump() ---------------------------------------------------
    @contextmanager
    def inference(self):
        """A scope in which the parameters do not change: the learning task's derived tensors (its masked weights,
        a function of trainable parameters) are computed once and reused until the scope ends, then dropped.

        Outside such a scope they are recomputed at every forward, whatever optimiser stepped in between: torch's
        fused optimisers update parameters in place without bumping `_version`, so no key a parameter carries
        can tell that it moved.  Finished tasks' tensors derive from buffers no optimiser holds and are cached
        always.  Re-entrant: the outermost scope drops the tensors."""
        outer = self._inference is None
        if outer:
            self._inference = {}
        try:
            yield
        finally:
            if outer:
                self._inference = None

    def cached_in_inference(self, owner: str, name: str, key: tuple, build):
        """`build()`, memoised per (owner, name) while `key` holds inside an `inference()` scope; outside one,
        built at every call."""
        store = self._inference
        if store is None:
            return build()
        hit = store.get((owner, name))
        if hit is not None and hit[0] == key:
            return hit[1]
        value = build()
        store[(owner, name)] = (key, value)
        return value

    def compiled(self, fn):
        """`torch.compile(fn)`, made once for this net (torch keeps the compiled code per function)."""
        out = self._compiled.get(fn)
        if out is None:
            out = self._compiled[fn] = torch.compile(fn, dynamic=True)
        return out

    def cached(self, owner: str, name: str, key: tuple, build):
        """`build()` memoised per (owner, name) while `key` holds; every entry dies at the next `bump()`.

        The only cache of derived tensors (masked layers' weights and mask plans, channel selections):
        anything that changes the net's structure (growth, pruning, task switch of the learner, freezing,
        kinds, restoring) calls `bump()`, so no layer keeps a private cache to clear."""
        slot = (owner, name)
        hit = self._cache.get(slot)
        if hit is not None and hit[0] == key:
            return hit[1]
        value = build()
        self._cache[slot] = (key, value)
        return value

    def cached_lru(self, owner: str, name: str, item, key: tuple, build, limit: int):
        """`build()` memoised per (owner, name, item) while `key` holds, keeping at most `limit` items per (owner,
        name): the least recently used one is dropped first.  Cleared by `bump()` like every other entry."""
        slot = (owner, name, "lru")
        lru = self._cache.get(slot)
        if lru is not None:  # the hot path (a served task's weight): one lookup, one move
            hit = lru.get(item)
            if hit is not None and hit[0] == key and len(lru) <= limit:
                lru.move_to_end(item)
                return hit[1]
        else:
            lru = self._cache[slot] = OrderedDict()
        hit = lru.get(item)
        if hit is not None and hit[0] == key:
            value = hit[1]
        else:
            value = build()
            lru[item] = (key, value)
        lru.move_to_end(item)
        while len(lru) > max(1, int(limit)):  # also when the limit was lowered since
            lru.popitem(last=False)
        return value


class ChannelScale:
    """What a method installs to multiply channels at their consumers' inputs (GROWN's candidate gates).

    The engine calls `vector` for each group on a consumer's input axis and keys its cached weights on
    `version_key`; `GrowableNet.freeze_task` calls `on_freeze` first; checkpoints call `structure` and
    `load_structure` (the method installs its scale with `net.set_channel_scale` before restoring)."""

    def vector(self, gid: int, width: int, ctx: TaskContext, training: bool) -> torch.Tensor | None:
        raise NotImplementedError

    def version_key(self, ctx: TaskContext) -> tuple:
        raise NotImplementedError

    def on_freeze(self, net) -> None:
        raise NotImplementedError

    def structure(self) -> dict:
        raise NotImplementedError

    def load_structure(self, structure: dict) -> None:
        raise NotImplementedError


def _visible(births: torch.Tensor, task: int) -> torch.Tensor:
    return births <= task


def _born(births: torch.Tensor, task: int) -> torch.Tensor:
    return births == task


