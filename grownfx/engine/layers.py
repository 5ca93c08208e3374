"""Step 4: task-aware layers that the rewriting engine puts in place of standard ones.

* `PerTask`: one copy of a module per task (norms with their statistics, heads, modules we cannot mask).
* `TaskParameter`: one copy of a free-standing parameter per task (class tokens, position embeddings).
* `WeightOf`: stands in for `get_attr layer.weight` where a replaced layer's tensor is used directly.
The shared, masked weight banks are in `banks.py`.
"""

from __future__ import annotations

import copy
import math
from typing import TYPE_CHECKING

import torch
from torch import nn

from grownfx.engine.surgery import random_fill, remap, resize_plain

if TYPE_CHECKING:  # pragma: no cover
    from grownfx.engine.context import TaskContext


FREE = -1  # owner of a unit no finished task uses


def _ctx_of(module: nn.Module) -> "TaskContext":
    return module.__dict__["_ctx"]


class _TaskModule(nn.Module):
    """Base: holds an unregistered reference to the shared TaskContext (so it is not saved per layer)."""

    def _attach(self, ctx: "TaskContext", target: str) -> None:
        self.__dict__["_ctx"] = ctx
        self.target = target

    @property
    def ctx(self) -> "TaskContext":
        return _ctx_of(self)


# --- per-task copies -------------------------------------------------------------------------------------


class PerTask(_TaskModule):
    """One copy of `template` per task; the task being learned trains its copy, finished copies are frozen."""

    def __init__(self, template: nn.Module, ctx: "TaskContext", target: str, kind: str):
        super().__init__()
        self._attach(ctx, target)
        self.kind = kind  # 'norm' | 'head' | 'module'
        self.pending = template.requires_grad_(False)  # what the next task starts from
        self.copies = nn.ModuleList()
        self.norm_axis: int | None = None  # a layer norm: the (negative) axis it normalises (rewrite sets it)

    def forward(self, *args, **kwargs):
        ctx = self.__dict__["_ctx"]  # direct lookups: this runs per norm per forward (batch-1 serving)
        t = ctx.task
        copy_t = self._modules["copies"]._modules[str(t)]  # ModuleList keeps copy t under the name str(t)
        if self.norm_axis is not None:
            index = ctx.norm_stats(self.target, t)
            if index is not None:  # statistics over the channels born before task t only
                return stats_layer_norm(args[0], index.to(args[0].device), copy_t.weight, copy_t.bias, copy_t.eps,
                                        self.norm_axis, isinstance(copy_t, nn.GroupNorm))
        scale = ctx.input_scale(self.target, self.training) if ctx.is_learning(t) else None
        if scale is None:
            return copy_t(*args, **kwargs)
        # a consumer of scaled channels (the task's head): the scale multiplies its input columns, as in a bank
        return torch.func.functional_call(copy_t, {"weight": scaled_columns(copy_t.weight, scale)}, args, kwargs)

    def add_task(self, num_classes: int | None = None, generator: torch.Generator | None = None,
                 keep_head: bool = False) -> None:
        new = copy.deepcopy(self.pending)
        if self.kind == "head" and not keep_head:
            _reset_head(new, num_classes, generator)
        new.requires_grad_(True)
        self.copies.append(new)

    def train(self, mode: bool = True) -> "PerTask":
        """A finished task's copy stays in eval mode whatever the net's mode: its norm statistics never update."""
        super().train(mode)
        for t in self.ctx.structure.frozen:
            self.copies[t].train(False)
        return self

    def freeze(self, task: int) -> None:
        self.copies[task].requires_grad_(False)
        for p in self.copies[task].parameters():
            p.grad = None  # a frozen copy keeps no gradient memory
        if self.kind != "head":
            self.pending = copy.deepcopy(self.copies[task])  # later tasks start from the latest (warm start)
            self.pending.requires_grad_(False)
        self.copies[task].train(False)

    def resize_axis(self, role: str, src: torch.Tensor, generator=None, birth: int = 0, **_) -> None:
        # channels born for task `birth` exist in that task's copy (if it is being learned) and in the template
        targets = [self.pending]
        if birth < len(self.copies):
            targets.append(self.copies[birth])
        for m in targets:  # a norm_axis: the coupling read a layer norm (a GroupNorm of one group at any width)
            resize_plain(m, role, src, generator, joint_norm=self.norm_axis is not None)

    def copy_for(self, task: int) -> nn.Module:
        return self.copies[task]

    def to_plain(self, task: int) -> nn.Module:
        """A standalone copy of task `task`'s module, with the hard input scale folded in (export)."""
        out = copy.deepcopy(self.copies[task])
        scale = self.ctx.input_scale(self.target, False) if self.ctx.is_learning(task) else None
        if scale is not None:
            with torch.no_grad():
                out.weight.copy_(scaled_columns(out.weight, scale))
        return out

    def accepts_input_scale(self) -> bool:
        return isinstance(getattr(self.pending, "weight", None), torch.Tensor) and self.pending.weight.dim() >= 2


def stats_layer_norm(x: torch.Tensor, index: torch.Tensor, weight: torch.Tensor | None, bias: torch.Tensor | None,
                     eps: float, axis: int, joint: bool = False) -> torch.Tensor:
    """Layer norm over `axis` (negative) whose mean and variance are taken over the channels `index` only, then applied to
    every channel: `(x - mean_S) / sqrt(var_S + eps) * weight + bias`.  `joint`: the statistics are taken over the
    channels and every axis after them together (a GroupNorm with one group).  Export writes the same torch ops
    into the exported graph (`rewrite.export_graph`), so the two compute bit for bit alike."""
    dims = tuple(range(axis, 0)) if joint else axis
    var, mean = torch.var_mean(torch.index_select(x, axis, index), dim=dims, correction=0, keepdim=True)
    y = torch.mul(torch.sub(x, mean), torch.rsqrt(torch.add(var, eps)))
    shape = (-1,) + (1,) * (-axis - 1)  # `axis` counts from the end: the affine broadcasts from the right
    if weight is not None:
        y = torch.mul(y, weight.reshape(shape))
    if bias is not None:
        y = torch.add(y, bias.reshape(shape))
    return y


def scaled_columns(weight: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """`weight` (out, in, *kernel) with input column i multiplied by scale[i]."""
    return weight * scale.to(weight.dtype).view((1, -1) + (1,) * (weight.dim() - 2))


def _reset_head(head: nn.Module, num_classes: int | None, generator) -> None:
    """A fresh head with `num_classes` outputs, initialised as torch initialises the layer."""
    if num_classes is None:
        return
    w = head.weight
    shape = (num_classes,) + tuple(w.shape[1:])
    head.weight = nn.Parameter(random_fill(shape, math.prod(w.shape[1:]), generator, w))
    if getattr(head, "bias", None) is not None:
        head.bias = nn.Parameter(random_fill((num_classes,), math.prod(w.shape[1:]), generator, w))
    if isinstance(head, nn.Linear):
        head.out_features = num_classes
    else:
        head.out_channels = num_classes


class TaskParameter(_TaskModule):
    """A free-standing parameter (get_attr in the graph) with one copy per task."""

    def __init__(self, value: torch.Tensor, ctx: "TaskContext", target: str, trainable: bool = True):
        super().__init__()
        self._attach(ctx, target)
        self.trainable = trainable  # False: a buffer of the backbone, copied per task but never trained
        self.pending = nn.Parameter(value.detach().clone(), requires_grad=False)
        self.copies = nn.ParameterList()
        # one entry per class along `class_axis` (a functional classifier's weight, a per-class logit bias): each
        # task's copy has its own number of classes, filled with `class_init` (the op's identity, or
        # ("uniform", fan_in): nn.Linear's initialisation)
        self.class_axis: int | None = None
        self.class_init: float | tuple = 0.0

    def forward(self):
        return self.copies[self.ctx.task]

    def add_task(self, num_classes: int | None = None, generator: torch.Generator | None = None,
                 keep_head: bool = False, **_) -> None:
        value = self.pending.detach().clone()
        if self.class_axis is not None and num_classes is not None and not keep_head:
            shape = list(value.shape)
            shape[self.class_axis] = num_classes
            if isinstance(self.class_init, tuple):
                value = random_fill(tuple(shape), self.class_init[1], generator, value)
            else:
                value = torch.full(shape, self.class_init, dtype=value.dtype, device=value.device)
        self.copies.append(nn.Parameter(value, requires_grad=self.trainable and value.is_floating_point()))

    def freeze(self, task: int) -> None:
        self.copies[task].requires_grad_(False)
        self.copies[task].grad = None
        self.pending = nn.Parameter(self.copies[task].detach().clone(), requires_grad=False)

    def resize_axis(self, role: str, src: torch.Tensor, generator=None, birth: int = 0, axis: int = 0,
                    fill: float = 0.0, **_):
        self.pending = nn.Parameter(remap(self.pending.data, axis, src, fill), requires_grad=False)
        if birth < len(self.copies):
            self.copies[birth] = nn.Parameter(remap(self.copies[birth].data, axis, src, fill),
                                              requires_grad=self.copies[birth].requires_grad)

    def copy_for(self, task: int) -> torch.Tensor:
        # ParameterList registers copy i as parameter str(i): a direct lookup, not __getitem__ (per forward)
        return self.copies._parameters[str(task)] if task >= 0 else self.copies[task]


# --- numbers and norms that depend on the computing task's channels ----------------------------------------


class TaskMode(_TaskModule):
    """The model's `self.training`, read by a node of the graph (`F.dropout(x, p, training=self.training)`,
    engine/modes.py): true only while the net is in train mode *and* computes the task being learned -- a finished
    task computes as in eval mode (no dropout, no statistics updated), like its norm copies."""

    def __init__(self, ctx: "TaskContext", target: str):
        super().__init__()
        self._attach(ctx, target)

    def forward(self) -> bool:
        ctx = self.ctx
        return self.training and ctx.is_learning(ctx.task)


class TaskLiteral(_TaskModule):
    """A channel count written into the graph (`x.view(b, 64, -1)`): the width the computing task sees.

    One graph serves every task, so the number cannot be rewritten on growth; each task gets the count of the
    channels that exist for it (births <= task), which is the number it was learned with."""

    def __init__(self, layout: tuple, ctx: "TaskContext", target: str):
        super().__init__()
        self._attach(ctx, target)
        self.layout = layout  # ((group, factor, fixed_width), ...)

    def forward(self) -> int:
        return self.value_for(self.ctx.task)

    def value_for(self, task: int) -> int:
        return self.ctx.structure.width(self.layout, task)


class TaskLayerNorm(_TaskModule):
    """A functional `layer_norm(x, shape, weight, bias, eps)` over the last axis of the traced graph, per task: the
    computing task's width, and statistics over the channels born before it (`stats_layer_norm`, §5 of
    docs/architecture.md).  `weight` and `bias` arrive as the graph's (per-task) parameters."""

    def __init__(self, ctx: "TaskContext", target: str, key: str, eps: float):
        super().__init__()
        self._attach(ctx, target)
        self.key, self.eps = key, eps  # key: this norm's layout in the structure's layouts, as (key, 'feat')

    def forward(self, x: torch.Tensor, weight: torch.Tensor | None = None, bias: torch.Tensor | None = None):
        index = self.ctx.norm_stats(self.key, self.ctx.task)
        if index is None:
            return torch.nn.functional.layer_norm(x, (x.shape[-1],), weight, bias, self.eps)
        return stats_layer_norm(x, index.to(x.device), weight, bias, self.eps, -1)

    def width_for(self, task: int) -> int:
        structure = self.ctx.structure
        return structure.width(structure.layouts[(self.key, "feat")], task)


class WeightOf(_TaskModule):
    """Stands in for `get_attr layer.weight` where a replaced layer's tensor is used directly (Swin's qkv)."""

    def __init__(self, layer: nn.Module, which: str, ctx: "TaskContext", target: str):
        super().__init__()
        self._attach(ctx, target)
        self.__dict__["layer"] = layer
        self.which = which

    def forward(self):
        layer = self.__dict__["layer"]
        if isinstance(layer, PerTask):
            return getattr(layer.copies[self.ctx.task], self.which)
        return layer.effective_weight() if self.which == "weight" else layer.effective_bias()
