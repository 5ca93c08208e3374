"""What the task-aware layers of one net share, split by concern; each part has one owner.

    part             holds                                                 changed by
    structure        tasks, finished tasks, channel widths and births,     GrowableNet's methods (add_task, grow,
    (NetStructure)   layouts, a Linear's unit columns, a version           keep_channels, freeze_task, restore)
    computing task   the task the forward being run computes (a stack:     net(x, task=t) and net.computing(t),
                     the previous task is back when a scope ends)          for the duration of one call
    cache            derived tensors: masked weights, mask plans,          the engine: cleared by every structural
    (DerivedCache)   channel selections                                    change (TaskContext.bump)
    mask settings    the mask policy, the Gumbel temperature, a channel    the method: net.set_policy,
    (MaskSettings)   scale installed by the method                         set_mask_temperature, set_channel_scale

The method's own schedule (GROWN's gate temperature beta, its binarised last epoch) lives with the method
(grownfx/learn/gates.py); the engine holds only the values a forward needs.  Layers hold an unregistered
reference to the one `TaskContext`; `GrowableNet` owns it.  The computing task travels here rather than as an
argument of every call in the graph, so the fx graph's call signatures stay exactly as the backbone wrote them.
docs/architecture.md §4 ("The context") draws the same table.
"""

from __future__ import annotations

from collections import OrderedDict
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch

from grownfx.engine import masks as M

SEL, DENSE, ATT, OFF = 0, 1, 2, 3
FINISHED_CACHE_SIZE = 4  # default of DerivedCache.finished_cache_size (docs/performance.md §2)
SEED = -1  # the birth of a channel of the seed network (born before any task)


@dataclass
class MaskPolicy:
    """Which masks the task being learned puts on which units (the method's switches live here).

    frozen_kind:   units owned by finished tasks: SEL (learned selective mask) | DENSE (use all) | OFF (ignore)
    released_kind: free units on channels older than this task: DENSE (re-train them) | OFF (leave them)
    grown_kind:    units on channels born for this task: ATT (attentive mask) | DENSE
    """

    frozen_kind: int = SEL
    released_kind: int = DENSE
    grown_kind: int = ATT
    selective_kind: str = "gumbel"  # 'gumbel' (GROWN) | 'ste' (Piggyback/KSM straight-through)
    selective: M.GumbelConfig = field(default_factory=M.GumbelConfig)
    selective_ste: M.STEConfig = field(default_factory=M.STEConfig)
    attentive_kind: str = "ste"  # 'ste' | 'gumbel'
    attentive: M.STEConfig = field(default_factory=M.STEConfig)
    attentive_gumbel: M.GumbelConfig = field(default_factory=M.GumbelConfig)

    @property
    def attentive_init(self) -> float:
        return self.attentive.init if self.attentive_kind == "ste" else self.attentive_gumbel.init


# -- structure ------------------------------------------------------------------------------------------------


@dataclass
class NetStructure:
    """The net's structure: which tasks exist and are finished, and which channels exist for each task.

    A layout is a layer axis as segments ((group, factor, fixed width), ...): a growable group's channels, each
    repeated `factor` times (a flattened channel), or `fixed width` channels of a group that never grows."""

    num_tasks: int = 0
    frozen: set[int] = field(default_factory=set)
    widths: dict[int, int] = field(default_factory=dict)  # growable group -> width
    births: dict[int, torch.Tensor] = field(default_factory=dict)  # group -> task each channel was born for
    layouts: dict[tuple[str, str], tuple] = field(default_factory=dict)  # (module, role) -> layout
    unit_cols: dict[str, int] = field(default_factory=dict)  # granularity 'channel': a Linear's columns per unit
    version: int = 0  # bumped on every structural change

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

    def channel_births(self, gid: int, fixed: int) -> torch.Tensor:
        """The task each channel of segment (gid, fixed width) was born for (a fixed group: the seed's)."""
        births = self.births.get(gid)
        return births if births is not None else torch.full((self.widths.get(gid, fixed),), SEED, dtype=torch.long)

    def segment_widths(self, layout: tuple, task: int) -> list[int]:
        """Positions each segment of `layout` has for `task`: the channels born no later than it, times the
        segment's factor.  The one rule behind every per-task width (TaskLiteral, TaskLayerNorm, split sizes)."""
        return [int((self.channel_births(gid, fixed) <= task).sum()) * factor for gid, factor, fixed in layout]

    def width(self, layout: tuple, task: int) -> int:
        return sum(self.segment_widths(layout, task))

    def visible_positions(self, layout: tuple, task: int) -> torch.Tensor | None:
        """Positions on an axis of `layout` that exist for `task` (None: all of them)."""
        parts, pos, every = [], 0, True
        for gid, factor, fixed in layout:
            births = self.channel_births(gid, fixed)
            seen = births <= task
            every &= bool(seen.all())
            parts.append((seen.nonzero().squeeze(1)[:, None] * factor + torch.arange(factor)).reshape(-1) + pos)
            pos += self.widths.get(gid, fixed) * factor
        return None if every else torch.cat(parts)

    def born_flags(self, layout: tuple, task: int) -> torch.Tensor | None:
        """Bool per position on an axis of `layout`: its channel was born for `task` (None: none was)."""
        flags = [(self.channel_births(gid, fixed) == task).repeat_interleave(factor) for gid, factor, fixed in layout]
        out = torch.cat(flags)
        return out if bool(out.any()) else None

    def stats_positions(self, layout: tuple, task: int) -> torch.Tensor | None:
        """Positions, among those of `layout` that exist for `task`, of the channels born before `task` (None:
        every one of them): what a layer norm's statistics are taken over (§5 of docs/architecture.md)."""
        parts = []
        for gid, factor, fixed in layout:
            births = self.channel_births(gid, fixed)
            parts.append((births[births <= task] < task).repeat_interleave(factor))
        keep = torch.cat(parts)
        return None if bool(keep.all()) else keep.nonzero().squeeze(1)


# -- cache ----------------------------------------------------------------------------------------------------


class DerivedCache:
    """The one cache of derived tensors (masked layers' weights and mask plans, channel selections).

    Everything in it is cleared at once by `clear()`, which every structural change calls (TaskContext.bump), so
    no layer keeps a private cache to clear.  The learning task's weights derive from parameters an optimiser
    moves without a trace (torch's fused optimisers do not bump a tensor's version): they are kept only inside
    an `inference()` scope and recomputed at every forward otherwise."""

    def __init__(self):
        self._entries: dict = {}  # (owner, name) -> (key, value); (owner, name, "lru") -> OrderedDict
        self._inference: dict | None = None  # the learning task's derived tensors, inside an inference() scope
        # the learning task's masked weights of the training forward being run (engine/weight_pass.py)
        self.step: dict | None = None
        # compiled passes (MaskSettings.fuse_masks), per layout of the masked weights: kept across clear() (a
        # state reload does not change the layout), the last `compiled_keep` layouts
        self.compiled_passes: dict = {}
        self.compiled_keep = 2
        self.compile_stats = {"compiles": 0, "compile_seconds": 0.0}
        # finished tasks whose effective weights each masked layer keeps (least recently used evicted): memory
        # up to this many weight-sized tensors per layer; serving that many tasks in turn rebuilds nothing
        self.finished_cache_size = FINISHED_CACHE_SIZE

    def clear(self) -> None:
        self._entries.clear()
        if self._inference is not None:
            self._inference.clear()

    def get(self, owner: str, name: str, key: tuple, build):
        """`build()` memoised per (owner, name) while `key` holds; every entry dies at the next `clear()`."""
        slot = (owner, name)
        hit = self._entries.get(slot)
        if hit is not None and hit[0] == key:
            return hit[1]
        value = build()
        self._entries[slot] = (key, value)
        return value

    def get_lru(self, owner: str, name: str, item, key: tuple, build, limit: int):
        """`build()` memoised per (owner, name, item) while `key` holds, keeping at most `limit` items per (owner,
        name): the least recently used one is dropped first.  Cleared by `clear()` like every other entry."""
        slot = (owner, name, "lru")
        lru = self._entries.get(slot)
        if lru is not None:  # the hot path (a served task's weight): one lookup, one move
            hit = lru.get(item)
            if hit is not None and hit[0] == key and len(lru) <= limit:
                lru.move_to_end(item)
                return hit[1]
        else:
            lru = self._entries[slot] = OrderedDict()
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

    @contextmanager
    def inference(self):
        """A scope in which the parameters do not change: `get_in_inference` keeps what it builds until the
        outermost scope ends.  Re-entrant."""
        outer = self._inference is None
        if outer:
            self._inference = {}
        try:
            yield
        finally:
            if outer:
                self._inference = None

    def get_in_inference(self, owner: str, name: str, key: tuple, build):
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


# -- mask settings --------------------------------------------------------------------------------------------


class ChannelScale:
    """What a method installs to multiply channels at their consumers' inputs (GROWN's candidate gates).

    The engine calls `vector` for each group on a consumer's input axis and keys its cached weights on
    `version_key`; `GrowableNet.freeze_task` calls `on_freeze` first; checkpoints call `structure` and
    `load_structure` (the method installs its scale with `net.set_channel_scale` before restoring).  Whatever
    schedule shapes the vector (GROWN's beta) is the method's: the scale holds it, the engine never sets it."""

    def vector(self, gid: int, width: int, training: bool) -> torch.Tensor | None:
        raise NotImplementedError

    def version_key(self) -> tuple:
        raise NotImplementedError

    def on_freeze(self, net) -> None:
        raise NotImplementedError

    def structure(self) -> dict:
        raise NotImplementedError

    def load_structure(self, structure: dict) -> None:
        raise NotImplementedError


@dataclass
class MaskSettings:
    """How the task being learned masks its units, as the method set it."""

    policy: MaskPolicy = field(default_factory=MaskPolicy)
    temperature: float | None = None  # the method's current Gumbel temperature (None: the policy's own)
    noise: bool = True  # Gumbel masks draw their noise in training forwards (False: they train in their eval form)
    channel_scale: ChannelScale | None = None  # a method's multipliers on consumer inputs
    fuse_masks: bool = False  # compute the learning task's masked weights in one torch.compile'd graph


# -- the context: the parts, and the queries that combine them ------------------------------------------------


class TaskContext:
    """The parts above, grouped for the layers of one net (module docstring: who owns each)."""

    def __init__(self):
        self.structure = NetStructure()
        self.cache = DerivedCache()
        self.masks = MaskSettings()
        self._computing: list[int] = []

    # -- the computing task ---------------------------------------------------------------------------------
    @property
    def task(self) -> int:
        """The task the forward being run computes."""
        if not self._computing:
            raise RuntimeError("no task is being computed: call net(x, task=t), or enter net.computing(t) to "
                               "call a task-aware layer directly")
        return self._computing[-1]

    @contextmanager
    def computing(self, task: int):
        """Compute `task` inside this scope; the previous task (if any) again when it ends."""
        self._computing.append(int(task))
        try:
            yield
        finally:
            self._computing.pop()

    def is_learning(self, task: int) -> bool:
        return self.structure.is_learning(task)

    def bump(self) -> None:
        """The one invalidation path: a structural change happened, every derived tensor is stale."""
        self.structure.version += 1
        self.cache.clear()

    # -- channels of a layer axis, per task (cached) ---------------------------------------------------------
    def visible(self, target: str, role: str, task: int) -> torch.Tensor | None:
        """Positions on a layer axis that exist for `task` (None: all of them)."""
        layout = self.structure.layouts.get((target, role))
        if layout is None:
            return None
        return self.cache.get(target, f"{role}.visible.{task}", (),
                              lambda: self.structure.visible_positions(layout, task))

    def born(self, target: str, role: str, task: int) -> torch.Tensor | None:
        """Bool per position on a layer axis: the channel was born for `task` (None: none was)."""
        layout = self.structure.layouts.get((target, role))
        if layout is None:
            return None
        return self.cache.get(target, f"{role}.born.{task}", (), lambda: self.structure.born_flags(layout, task))

    def norm_stats(self, target: str, task: int) -> torch.Tensor | None:
        """Positions, among the channels a layer norm `target` sees when `task` computes, that its statistics are
        taken over: the channels born before `task` (None: every channel it sees, a standard layer norm).

        Channels born for a task never enter that task's statistics, so adding (or pruning) them while it is
        learned leaves its normalisation of the other channels unchanged; a finished task's set never changes."""
        layout = self.structure.layouts.get((target, "feat"))
        if layout is None:
            return None
        return self.cache.get(target, f"norm_stats.{task}", (), lambda: self.structure.stats_positions(layout, task))

    # -- consumer-input channel scales (a method's) ----------------------------------------------------------
    def input_scale(self, target: str, training: bool) -> torch.Tensor | None:
        """Multiplier over the input axis of consumer `target` (None: all ones), from the installed ChannelScale.

        Every layer that consumes a group's channels (a masked bank's columns, a per-task head's columns) calls
        this, so a scale acts wherever its channels are consumed, whatever the consumer is."""
        scale = self.masks.channel_scale
        layout = self.structure.layouts.get((target, "in")) if scale is not None else None
        if layout is None:
            return None
        widths = self.structure.widths
        parts = [(scale.vector(gid, widths.get(gid, fixed), training), factor, widths.get(gid, fixed))
                 for gid, factor, fixed in layout]
        ref = next((v for v, _, _ in parts if v is not None), None)
        if ref is None:
            return None
        return torch.cat([torch.ones(w * f, device=ref.device, dtype=ref.dtype) if v is None
                          else (v.repeat_interleave(f) if f > 1 else v) for v, f, w in parts])

    def scale_version(self) -> tuple:
        scale = self.masks.channel_scale
        return scale.version_key() if scale is not None else ()
