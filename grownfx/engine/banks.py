"""Step 4 (part 2): masked weight banks, the layers that share weights across tasks.

* `MaskedConv` / `MaskedLinear`: one weight bank shared by all tasks.  Each mask unit (a kernel of a conv, an
  element of a linear) has an owner: the task that trained it, or FREE.  A finished task keeps a bit-packed
  mask over the units it could see; it computes with `where(mask, frozen, 0)` restricted to the channels that
  existed for it, so its computation never changes.  The task being learned computes with
  `where(trainable, weight, frozen) * unit_mask * channel_scale` (unit_weight.MaskedWeight): units it may not
  train are read from `frozen`, a buffer no optimiser holds.
`HeadGrowingAttention` (nn.MultiheadAttention over masked projection banks) is in attention.py.
"""

from __future__ import annotations

import copy
import math
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn

from grownfx.engine import masks as M
from grownfx.engine.context import ATT, OFF, SEL
from grownfx.engine.layers import FREE, TaskParameter, _TaskModule
from grownfx.engine.surgery import random_fill, remap, set_conv_width, set_linear_width
from grownfx.engine.tracing import bare_layer, call_with_weight, out_channel_params
from grownfx.engine.unit_weight import MaskedWeight, MaskPlan

if TYPE_CHECKING:  # pragma: no cover
    from grownfx.engine.context import TaskContext


class MaskedLayer(_TaskModule):
    """Weight bank with per-unit ownership and per-task bit-packed masks (see module docstring)."""

    def __init__(self, src: nn.Module, ctx: "TaskContext", target: str, granularity: str = "kernel",
                 unit_cols: int = 1):
        super().__init__()
        self._attach(ctx, target)
        self.granularity = granularity
        self.unit_cols = unit_cols  # a Linear's unit: this many consecutive input columns (one flattened channel)
        self.weight = nn.Parameter(src.weight.detach().clone())
        self.register_buffer("frozen", torch.zeros_like(self.weight.detach()))
        self.register_buffer("owner", torch.full(self._unit_shape(self.weight.shape), FREE, dtype=torch.int16))
        self.bias_bank = TaskParameter(src.bias.detach(), ctx, target + ".bias") if src.bias is not None else None
        self.mask_shapes: dict[int, tuple[int, int]] = {}
        self.score: nn.Parameter | None = None
        self.register_buffer("kind", None)
        # derived tensors (the learning task's weight, a finished task's weight, the mask plan) live in the
        # context's one cache (ctx.cache), which every structural change clears with ctx.bump()

    # -- shapes ---------------------------------------------------------------------------------------------
    def _unit_shape(self, wshape) -> tuple:
        if self.granularity == "element":
            return tuple(wshape)
        if self.unit_cols > 1:
            return (wshape[0], wshape[1] // self.unit_cols)
        return tuple(wshape[:2])

    def _expand(self, unit: torch.Tensor) -> torch.Tensor:
        """A unit-shaped tensor made to broadcast against the weight (a channel unit's columns repeated)."""
        if self.unit_cols > 1:
            return unit.repeat_interleave(self.unit_cols, dim=1)
        return unit.view(unit.shape + (1,) * (self.weight.dim() - unit.dim()))

    def _unit_view(self, w: torch.Tensor) -> torch.Tensor:
        """The weight with each unit's weights on trailing axes (a channel unit's columns: a view, no copy)."""
        return w.view(w.shape[0], -1, self.unit_cols) if self.unit_cols > 1 else w

    def unit_sum(self, t: torch.Tensor) -> torch.Tensor:
        """A weight-shaped tensor summed over each unit's weights (unit-shaped)."""
        v = self._unit_view(t)
        return v.sum(dim=tuple(range(self.owner.dim(), v.dim()))) if v.dim() > self.owner.dim() else v

    def _unit_index(self, idx: torch.Tensor) -> torch.Tensor:
        """Positions on the input axis (whole channels of unit_cols columns each) -> positions of their units."""
        return idx.view(-1, self.unit_cols)[:, 0] // self.unit_cols if self.unit_cols > 1 else idx

    @property
    def unit_size(self) -> int:
        if self.granularity == "element":
            return 1
        return self.unit_cols if self.unit_cols > 1 else math.prod(self.weight.shape[2:])

    def in_role(self) -> str:
        return "grouped" if getattr(self, "groups", 1) > 1 else "in"

    # -- the weight a task computes with --------------------------------------------------------------------
    def effective_weight(self, training: bool | None = None) -> torch.Tensor:
        """The weight the computing task computes with (`training`: with the masks' training-time noise;
        default: this module's mode)."""
        task = self.ctx.task
        if self.ctx.is_learning(task):
            return self._learning_weight(self.training if training is None else training)
        return self._finished_weight(task)

    def effective_bias(self) -> torch.Tensor | None:
        bank = self._modules.get("bias_bank")  # direct lookups: this runs per layer per forward (batch-1 serving)
        if bank is None:
            return None
        return bank.copy_for(self.ctx.task)

    def _learning_weight(self, training: bool) -> torch.Tensor:
        if not training and not torch.is_grad_enabled():
            # detached like a finished task's weight: some kernels (attention) pick their path by requires_grad;
            # reused only inside net.inference(), where parameters do not change (TaskContext.inference)
            return self.ctx.cache.get_in_inference(self.target, "learning", self._version_key(),
                                                   lambda: self._compute_learning_weight(False).detach())
        return self._compute_learning_weight(training)

    def _compute_learning_weight(self, training: bool) -> torch.Tensor:
        step = self.ctx.cache.step if training else None  # the training forward's pass (engine/weight_pass.py)
        w = step.get(self.target) if step is not None else None
        if w is None:
            plan = self._mask_plan()
            w = self.masked_weight(plan, self._unit_multiplier(plan, training))
        scale = self.ctx.input_scale(self.target, training) if self.in_role() == "in" else None
        if scale is not None:
            w = w * scale.view((1, -1) + (1,) * (w.dim() - 2))
        return w

    def masked_weight(self, plan: "MaskPlan", mult: torch.Tensor | None) -> torch.Tensor:
        """`where(trainable, weight, frozen) * mult` (mult: unit-shaped, None: 1), before any channel scale."""
        w = self.weight
        if plan.none_trainable:
            return self.frozen if mult is None else self.frozen * self._expand(mult)
        if plan.rows is None and mult is None:
            return w
        rows = self.owner.numel()
        return MaskedWeight.apply(w.reshape(rows, -1), self.frozen.reshape(rows, -1), plan.rows,
                                  None if mult is None else mult.reshape(rows), plan.plain_rows).view(w.shape)

    def _version_key(self) -> tuple:
        parts = [self.weight._version, id(self.weight), self.weight.device, self.ctx.masks.temperature]
        if self.score is not None:
            parts += [self.score._version, id(self.score)]
        return tuple(parts) + self.ctx.scale_version()

    def _mask_plan(self) -> "MaskPlan":
        """Per-unit constants of the learning task's masks, rebuilt only when kinds, the temperature or the
        noise switch change."""
        key = (self.weight.device, self.ctx.masks.temperature, self.ctx.masks.noise, id(self.ctx.masks.policy))
        return self.ctx.cache.get(self.target, "plan", key, lambda: MaskPlan.build(self, key))

    def _unit_multiplier(self, plan: "MaskPlan", training: bool) -> torch.Tensor | None:
        """const (1 for dense units) + a straight-through binary mask on units with a learned mask; selective
        (Gumbel-Sigmoid: scale beta/T, noise 1/T while training) and attentive (threshold: no noise) units in one
        call."""
        if not plan.masked or self.score is None:
            return plan.const
        st = M.binary_concrete(self.score, plan.scale, plan.threshold, plan.noise, training)
        if plan.active is None:  # every unit carries a learned mask
            return st
        return st * plan.active if plan.const is None else torch.addcmul(plan.const, st, plan.active)

    def _finished_weight(self, task: int) -> torch.Tensor:
        frozen = self._buffers["frozen"]  # one lookup (nn.Module.__getattr__ is slow at batch 1)
        key = (frozen.device, frozen.dtype, frozen._version, id(frozen))
        # up to cache.finished_cache_size finished tasks per layer (LRU; memory: that many of a bank's size), so
        # serving tasks in turn does not rebuild the weights at every switch
        cache = self.ctx.cache
        return cache.get_lru(self.target, "finished", task, key, lambda: self._compute_finished_weight(task),
                             cache.finished_cache_size)

    def _compute_finished_weight(self, task: int) -> torch.Tensor:
        w = self._visible_bank(task)
        mask = M.unpack_bits(getattr(self, f"mask_{task}"), self._unit_shape(w.shape)).to(w.device)
        return torch.where(self._expand(mask), w, torch.zeros((), dtype=w.dtype, device=w.device))

    def _visible_bank(self, task: int) -> torch.Tensor:
        """The slice of the bank a finished task sees (its stored mask not yet applied)."""
        w = self.frozen
        out_idx = self.ctx.visible(self.target, "grouped" if self.in_role() == "grouped" else "out", task)
        if out_idx is not None:
            w = w.index_select(0, out_idx.to(w.device))
        if self.in_role() == "in":
            in_idx = self.ctx.visible(self.target, "in", task)
            if in_idx is not None:
                w = w.index_select(1, in_idx.to(w.device))
        return w

    # -- task lifecycle -------------------------------------------------------------------------------------
    def configure(self, task: int) -> None:
        """Assign unit kinds for the task being learned from ownership, channel births and the policy."""
        pol = self.ctx.masks.policy
        owned = self.owner != FREE
        kind = torch.where(owned, torch.tensor(pol.frozen_kind), torch.where(
            self.grown_units(task), torch.tensor(pol.grown_kind), torch.tensor(pol.released_kind)))
        self.kind = kind.to(torch.int8).to(self.owner.device)
        old = self.score
        sel_init = pol.selective_ste.init if pol.selective_kind == "ste" else pol.selective.init
        fresh = torch.where(kind == SEL, sel_init, pol.attentive_init).to(self.weight.dtype)
        if old is not None and old.shape == fresh.shape:
            fresh = old.detach()  # keep what stage 1 learned
        needs = bool(((kind == SEL) | (kind == ATT)).any())
        self.score = nn.Parameter(fresh.to(self.weight.device)) if needs else None
        self.ctx.bump()
        self._mask_plan()  # built now, outside any compiled region

    def _owned(self) -> torch.Tensor:
        """Bool, broadcastable to the weight: the units finished tasks own (kept while `owner` is unchanged; a
        channel unit's is weight-sized)."""
        owner = self._buffers["owner"]
        return self.ctx.cache.get(self.target, "owned", (id(owner), owner._version, owner.device),
                                  lambda: self._expand(owner != FREE))

    def grown_units(self, task: int) -> torch.Tensor:
        """Bool per unit: its output or input channel was born for `task` (a grown unit, not an old one)."""
        new_out = self.ctx.born(self.target, "grouped" if self.in_role() == "grouped" else "out", task)
        new = new_out[:, None] if new_out is not None else torch.zeros(self.owner.shape[:1] + (1,), dtype=torch.bool)
        if self.in_role() == "in":
            new_in = self.ctx.born(self.target, "in", task)
            if new_in is not None:
                if self.unit_cols > 1:  # a channel's columns are born together
                    new_in = new_in.view(-1, self.unit_cols)[:, 0]
                new = new | new_in[None, :]
        new = new.to(self.owner.device)
        if self.granularity == "element":
            new = self._expand(new)
        return new.expand(self.owner.shape)

    def set_kind(self, units: torch.Tensor, kind: int) -> None:
        """Override the kind of some units of the learning task (e.g. PackNet/CPG prune units with OFF)."""
        if self.kind is None:
            raise RuntimeError(f"'{self.target}' has no task being learned")
        self.kind[units.to(self.kind.device)] = kind
        self.ctx.bump()
        self._mask_plan()

    def used_units(self) -> torch.Tensor:
        """Units the task being learned uses, as its final hard mask (no noise)."""
        with torch.no_grad():
            mult = self._unit_multiplier(self._mask_plan(), training=False) if self.kind is not None else None
        if mult is None:
            return torch.ones(self.owner.shape, dtype=torch.bool, device=self.owner.device)
        return mult > 0

    def freeze(self, task: int) -> None:
        """The units the task trained and uses become its own: their values move into `frozen` (what every later
        task reads them from), whatever an optimiser does to the Parameter's entries afterwards."""
        used = self.used_units()
        trainable = (self.owner == FREE) & (self.kind != OFF if self.kind is not None else True)
        with torch.no_grad():
            self.frozen.copy_(torch.where(self._expand(trainable & used), self.weight, self.frozen))
        self.owner[trainable & used] = task
        self.register_buffer(f"mask_{task}", M.pack_bits(used))
        self.mask_shapes[task] = tuple(used.shape)
        self.score, self.kind = None, None
        self.weight.requires_grad_(bool((self.owner == FREE).any()))
        self.weight.grad = None  # the next task's optimiser starts from nothing; no stale gradient memory
        self.ctx.bump()

    def mask_bytes(self, task: int) -> int:
        return getattr(self, f"mask_{task}").numel()

    # -- what a checkpoint holds: the bank once ------------------------------------------------------------
    def owner_from_masks(self, masks: dict | None = None) -> torch.Tensor:
        """Each unit's owner rebuilt from the finished tasks' masks: the first task that used it, FREE if none.
        (freeze() gives a used unit to the task only when it was free, and a task uses only free or owned units,
        so the owner is the first user.)  `masks`: {task: packed mask} (default: this layer's)."""
        owner = torch.full(self.owner.shape, FREE, dtype=self.owner.dtype, device=self.owner.device)
        for t in sorted(self.mask_shapes):
            packed = masks[t] if masks is not None else getattr(self, f"mask_{t}")
            used = M.unpack_bits(packed.to(owner.device), self.mask_shapes[t])
            rows = self.ctx.visible(self.target, "grouped" if self.in_role() == "grouped" else "out", t)
            cols = self.ctx.visible(self.target, "in", t) if self.in_role() == "in" else None
            rows = torch.arange(owner.shape[0]) if rows is None else rows
            cols = torch.arange(owner.shape[1]) if cols is None else self._unit_index(cols)
            placed = torch.zeros(owner.shape, dtype=torch.bool, device=owner.device)
            placed.index_put_((rows.to(owner.device)[:, None], cols.to(owner.device)[None, :]), used)
            owner[placed & (owner == FREE)] = t
        return owner

    def bank(self) -> torch.Tensor:
        """The bank as one tensor: the frozen values on owned units, the Parameter's elsewhere (what the learning
        task reads; an optimiser may have moved the Parameter's entries on owned units, which nothing reads)."""
        owned = self._owned()
        w = self.weight.detach()
        return torch.where(owned, self.frozen, w) if bool(owned.any()) else w

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        super()._save_to_state_dict(destination, prefix, keep_vars)
        if not keep_vars:
            destination[prefix + "weight"] = self.bank()
        # `owner` follows from the masks and `frozen` from the bank (frozen on owned units, 0 elsewhere): dropped
        # when they do, so a checkpoint holds the bank once; kept whenever they do not (never lossy)
        if torch.equal(self.owner, self.owner_from_masks()):
            del destination[prefix + "owner"]
            if torch.equal(self.frozen, torch.where(self._owned(), destination[prefix + "weight"].detach(), 0)):
                del destination[prefix + "frozen"]

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):
        masks = {t: state_dict.get(prefix + f"mask_{t}") for t in self.mask_shapes}
        if prefix + "owner" not in state_dict and all(v is not None for v in masks.values()):
            state_dict[prefix + "owner"] = self.owner_from_masks(masks)
        weight = state_dict.get(prefix + "weight")
        if prefix + "frozen" not in state_dict and prefix + "owner" in state_dict and weight is not None:
            owned = self._expand(state_dict[prefix + "owner"] != FREE).to(weight.device)
            state_dict[prefix + "frozen"] = torch.where(owned, weight, torch.zeros((), dtype=weight.dtype,
                                                                                   device=weight.device))
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                      error_msgs)

    def used_count(self, task: int) -> int:
        """Weights task `task` computes with (units selected by its mask times the unit size)."""
        if self.ctx.is_learning(task):
            return int(self.used_units().sum()) * self.unit_size
        mask = getattr(self, f"mask_{task}")
        return int(M.unpack_bits(mask, self.mask_shapes[task]).sum()) * self.unit_size

    # -- growth and pruning ---------------------------------------------------------------------------------
    def resize_axis(self, role: str, src: torch.Tensor, generator=None, birth: int = 0, **_) -> None:
        w = self.weight.data
        n = int(src.numel())
        if role in ("out", "grouped"):
            axis, fan_in = 0, math.prod(w.shape[1:])
            fill = random_fill((n,) + tuple(w.shape[1:]), fan_in, generator, w)
        else:
            axis, fill = 1, 0.0
        self.weight = nn.Parameter(remap(w, axis, src, fill), requires_grad=True)
        self.frozen = remap(self.frozen, axis, src, 0.0)
        unit_axis = axis
        if axis == 1 and self.unit_cols > 1:  # whole channels come and go: their units with them
            first = src.view(-1, self.unit_cols)[:, 0]
            src = torch.where(first >= 0, first // self.unit_cols, first)
        self.owner = remap(self.owner, unit_axis, src, FREE)
        if self.kind is not None:
            self.kind = remap(self.kind, unit_axis, src, ATT)
        if self.score is not None:
            self.score = nn.Parameter(remap(self.score.data, unit_axis, src, self.ctx.masks.policy.attentive_init))
        if self.bias_bank is not None and role in ("out", "grouped"):
            self.bias_bank.resize_axis(role, src, birth=birth)
        self._update_shape_attrs(role, n)
        self.ctx.bump()

    def _update_shape_attrs(self, role: str, n: int) -> None:
        pass


class MaskedConv(MaskedLayer):
    def __init__(self, src: nn.Module, ctx: "TaskContext", target: str, granularity: str = "kernel"):
        super().__init__(src, ctx, target, granularity)
        self.conv_type = type(src)
        self.in_channels, self.out_channels = src.in_channels, src.out_channels
        self.kernel_size, self.stride, self.padding = src.kernel_size, src.stride, src.padding
        self.dilation, self.groups, self.padding_mode = src.dilation, src.groups, src.padding_mode
        self._fn = {nn.Conv1d: F.conv1d, nn.Conv2d: F.conv2d, nn.Conv3d: F.conv3d}.get(type(src))
        # a subclass (timm's Conv2dSame, StdConv2d) runs its own forward on the masked weight
        self.__dict__["_bare"] = None if self._fn is not None else bare_layer(src)
        self.out_params = nn.ModuleDict()  # per-output-channel parameters of a subclass (gain): like the bias
        for name in out_channel_params(src) if self._fn is None else ():
            self.out_params[name] = TaskParameter(getattr(src, name).detach(), ctx, f"{target}.{name}")
            self.__dict__["_bare"]._parameters.pop(name)
        # padding_mode 'reflect'/'replicate'/'circular': the input is padded first, as torch's own conv does
        self._pad = src._reversed_padding_repeated_twice if src.padding_mode != "zeros" else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.effective_weight()
        groups = self.groups
        if self.groups > 1:
            groups = w.shape[0] // (self.out_channels // self.groups)
        if self._fn is None:
            task = self.ctx.task
            extra = {n: p.copies[task] for n, p in self.out_params.items()}
            return call_with_weight(self.__dict__["_bare"], x, w, self.effective_bias(), groups, extra)
        if self._pad is not None:
            return self._fn(F.pad(x, self._pad, mode=self.padding_mode), w, self.effective_bias(), self.stride, 0,
                            self.dilation, groups)
        return self._fn(x, w, self.effective_bias(), self.stride, self.padding, self.dilation, groups)

    def _update_shape_attrs(self, role: str, n: int) -> None:
        set_conv_width(self, role, n)

    def resize_axis(self, role: str, src: torch.Tensor, generator=None, birth: int = 0, **kw) -> None:
        super().resize_axis(role, src, generator=generator, birth=birth, **kw)
        if role in ("out", "grouped"):
            for p in self.out_params.values():  # new channels start at 1, as timm initialises a gain
                p.resize_axis(role, src, birth=birth, fill=1.0)

    def to_plain(self, task: int) -> nn.Module:
        w = export_weight(self, task)
        groups = self.groups if self.groups == 1 else w.shape[0] // (self.out_channels // self.groups)
        if self._fn is None:
            return _plain_subclass(self.__dict__["_bare"], w, self.bias_bank, task,
                                   {n: p.copies[task] for n, p in self.out_params.items()},
                                   in_channels=w.shape[1] * groups, out_channels=w.shape[0], groups=groups)
        m = self.conv_type(w.shape[1] * groups, w.shape[0], self.kernel_size, self.stride, self.padding,
                           self.dilation, groups, bias=self.bias_bank is not None, padding_mode=self.padding_mode)
        return _load_plain(m, w, self.bias_bank, task)

    def extra_repr(self) -> str:
        return f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, groups={self.groups}"


class MaskedLinear(MaskedLayer):
    def __init__(self, src: nn.Linear, ctx: "TaskContext", target: str, granularity: str = "kernel"):
        super().__init__(src, ctx, target, granularity, _channel_columns(ctx, target, src, granularity))
        self.in_features, self.out_features = src.in_features, src.out_features
        self.__dict__["_bare"] = None if type(src) is nn.Linear else bare_layer(src)  # timm's Linear

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.__dict__.get("_bare") is not None:
            return call_with_weight(self.__dict__["_bare"], x, self.effective_weight(), self.effective_bias())
        return F.linear(x, self.effective_weight(), self.effective_bias())

    def _update_shape_attrs(self, role: str, n: int) -> None:
        set_linear_width(self, role, n)

    def to_plain(self, task: int) -> nn.Module:
        w = export_weight(self, task)
        if self.__dict__.get("_bare") is not None:
            return _plain_subclass(self.__dict__["_bare"], w, self.bias_bank, task, {},
                                   in_features=w.shape[1], out_features=w.shape[0])
        m = nn.Linear(w.shape[1], w.shape[0], bias=self.bias_bank is not None)
        return _load_plain(m, w, self.bias_bank, task)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}"


def _channel_columns(ctx: "TaskContext", target: str, src: nn.Linear, granularity: str) -> int:
    """granularity 'channel': a Linear's unit is (output, block of input columns), the block prepare chose
    (engine.prepare._linear_unit_columns: a flattened channel, or LINEAR_BLOCK neurons); 1 elsewhere (per weight)."""
    c = ctx.structure.unit_cols.get(target, 1) if granularity == "channel" else 1
    return c if c > 1 and src.in_features % c == 0 else 1


def _plain_subclass(bare: nn.Module, w: torch.Tensor, bias_bank, task: int, params: dict, **attrs) -> nn.Module:
    """The layer subclass (timm's Conv2dSame, Linear, ...) again, holding task `task`'s weight and bias."""
    m = copy.deepcopy(bare)
    m.__dict__.update(attrs)
    for name, value in params.items():
        m.register_parameter(name, nn.Parameter(value.detach().clone()))
    m.register_parameter("weight", nn.Parameter(w.detach().clone()))
    bias = bias_bank.copies[task].detach().clone() if bias_bank is not None else None
    m.register_parameter("bias", nn.Parameter(bias) if bias is not None else None)
    return m


def export_weight(layer: MaskedLayer, task: int) -> torch.Tensor:
    """The weight `task` computes with, in evaluation mode (no Gumbel noise, the channel scale's evaluation
    values)."""
    with torch.no_grad(), layer.ctx.computing(task):
        return layer.effective_weight(training=False).detach().clone()


def _load_plain(m: nn.Module, w: torch.Tensor, bias_bank, task: int) -> nn.Module:
    m = m.to(device=w.device, dtype=w.dtype)
    with torch.no_grad():
        m.weight.copy_(w)
        if bias_bank is not None:
            m.bias.copy_(bias_bank.copies[task].detach())
    return m
