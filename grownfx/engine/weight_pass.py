"""Step 4 (part 4): the learning task's unit masks of every masked layer in one pass per training forward.

A training forward of the learning task needs, for each masked layer, the unit multiplier
`const + active * binary_concrete(score)` and then the weight `where(trainable, weight, frozen) * multiplier`.
Layer by layer that is a chain of small ops per layer (the score's shift and scale, its noise, the step, their
backward), launched from Python once per layer.  `learning_pass` computes them for all layers together, once per
forward, before the graph runs:

* eager (default): the scores of all layers concatenated, one Gumbel (logistic) noise draw for all of them, one
  straight-through step, one multiplier; then each layer's masked weight from its slice (`MaskedLayer.
  masked_weight`: the gather of the trainable rows stays per layer, where eager PyTorch is fastest), all before
  the graph runs, so the mask arithmetic does not interleave with the convolutions (their activations stay in
  cache) and autograd runs the masks' backward after the convolutions';
* compiled (`training.compile: true`, `MaskSettings.fuse_masks`): the whole computation, multipliers and the
  weights of every layer, is one `torch.compile`d graph (forward and backward), compiled once per layout of the
  masked weights (their shapes and which units are trainable, selective, attentive, dense: it changes when the
  net grows or a task starts) and reused for every step of that layout.  Compiles are counted
  (`DerivedCache.compile_stats`) and the run reports them.

The noise stream (both modes): one `torch.rand` of all the learning task's mask units per training forward, in
the order of `net.masked_layers()` (before issue 28: one draw per layer, in the order the graph called them), so
eager and compiled steps see the same noise.  A layer called twice in one forward uses one mask (one noise draw).
"""

from __future__ import annotations

import time
import types
from contextlib import contextmanager

import torch

from grownfx.engine import masks as M
from grownfx.engine.context import OFF
from grownfx.engine.layers import FREE


class PassPlan:
    """The per-unit constants of every masked layer of the learning task, flattened in `masked_layers()` order."""

    def __init__(self, layers):
        self.layers = layers
        self.plans = plans = [m._mask_plan() for m in layers]
        self.targets = [m.target for m in layers]
        self.sizes = [m.owner.numel() for m in layers]
        self.unit_shapes = [tuple(m.owner.shape) for m in layers]
        w = layers[0].weight
        dtype, device = w.dtype, w.device
        self.scale = _flat([p.scale for p in plans], self.sizes, 0.0, dtype, device)
        self.threshold = _flat([p.threshold for p in plans], self.sizes, 0.0, dtype, device)
        self.noise = _flat([p.noise for p in plans], self.sizes, 0.0, dtype, device)  # None: no layer has noise
        self.active = _flat([p.active for p in plans], self.sizes, 1.0, dtype, device)
        # const only matters where `active` is given (a layer with active None has no dense unit): 0 elsewhere
        consts = [p.const if p.active is not None else None for p in plans]
        self.const = _flat(consts, self.sizes, 0.0, dtype, device)
        # compiled mode: the trainable units of each layer, (units, 1) bool (None: all trainable), and the layers
        # with none trainable
        self.none_trainable = [p.none_trainable for p in plans]
        self.trainable = [None if p.rows is None or p.none_trainable
                          else ((m.owner == FREE) & (m.kind != OFF)).reshape(-1, 1) for p, m in zip(plans, layers)]

    def signature(self) -> tuple:
        """What a compiled graph is specialised on: shapes and which per-unit tensors exist (their values are
        inputs).  Equal signatures share one compiled graph."""
        def kind(v):
            return None if v is None else ("t", tuple(v.shape)) if isinstance(v, torch.Tensor) else ("f",)
        return (tuple((t, tuple(m.weight.shape), m.weight.dtype, str(m.weight.device), n, tr is None)
                      for t, m, n, tr in zip(self.targets, self.layers, self.none_trainable, self.trainable)),
                kind(self.scale), kind(self.threshold), kind(self.noise), kind(self.active), kind(self.const))

    def uniform(self) -> torch.Tensor | None:
        """The step's noise: one uniform sample per unit of every layer (None: no layer has noise)."""
        if self.noise is None:
            return None
        w = self.layers[0].weight
        return torch.rand(sum(self.sizes), dtype=w.dtype, device=w.device)

    def multiplier(self, scores: list[torch.Tensor], uniform: torch.Tensor | None) -> torch.Tensor:
        """const + active * binary_concrete(score), for every unit of every layer (flat)."""
        flat = torch.cat([s.reshape(-1) for s in scores])
        st = M.binary_concrete(flat, self.scale, self.threshold, self.noise, uniform=uniform)
        if self.active is None:
            return st
        return st * self.active if self.const is None else torch.addcmul(self.const, st, self.active)


def _flat(values, sizes, fill: float, dtype, device):
    """One per-unit value per layer (a float, a unit tensor or None) as a float when all layers share it, else
    a flat tensor (None where every layer has None; None counts as `fill` when some layer has a value)."""
    if all(v is None for v in values):
        return None
    if all(isinstance(v, float) for v in values) and len(set(values)) == 1:
        return values[0]
    return torch.cat([torch.full((n,), fill if v is None else v, dtype=dtype, device=device)
                      if not isinstance(v, torch.Tensor) else v.reshape(-1).to(dtype=dtype, device=device)
                      for v, n in zip(values, sizes)])


def _all_weights(plan_sig, weights, frozens, scores, uniform, scale, threshold, noise, active, const, trainables):
    """Every layer's `where(trainable, weight, frozen) * (const + active * binary_concrete(score))` as one
    expression (the function torch.compile turns into one graph; `plan_sig`: per layer (units, none trainable))."""
    flat = torch.cat([s.reshape(-1) for s in scores])
    z = (flat - threshold) * scale
    if noise is not None:
        z = z + noise * torch.logit(uniform, eps=1e-6)
    soft = torch.sigmoid(z)
    mult = (z >= 0).to(z.dtype) + (soft - soft.detach())
    if active is not None:
        mult = mult * active if const is None else const + mult * active
    outs, start = [], 0
    for w, f, t, (units, none_trainable) in zip(weights, frozens, trainables, plan_sig):
        m = mult[start:start + units].view(units, 1)
        start += units
        w2, f2 = w.reshape(units, -1), f.reshape(units, -1)
        base = f2 if none_trainable else (w2 if t is None else torch.where(t, w2, f2))
        outs.append((base * m).view(w.shape))
    return outs


BACKEND = "inductor"  # torch.compile's backend for the pass (tests use dynamo's "eager": the wiring, not codegen)


def _fresh_compiled(fn):
    """torch.compile of a fresh copy of `fn`: dynamo keeps its compiled graphs (and its recompile limit) per code
    object, so each layout gets its own and never meets the limit, and its graphs go when it is dropped."""
    copy = types.FunctionType(fn.__code__.replace(), fn.__globals__, fn.__name__, fn.__defaults__, fn.__closure__)
    return torch.compile(copy, backend=BACKEND, dynamic=False, fullgraph=True)


def compiled_weights(ctx, plan: PassPlan):
    """The compiled `_all_weights` for `plan`'s layout (compiled at its first call; kept for the last few layouts)."""
    cache = ctx.cache
    sig = plan.signature()
    hit = cache.compiled_passes.get(sig)
    if hit is None:
        hit = cache.compiled_passes[sig] = (_fresh_compiled(_all_weights),)
        while len(cache.compiled_passes) > cache.compiled_keep:
            cache.compiled_passes.pop(next(iter(cache.compiled_passes)))
    return sig, hit


def _graph_count() -> int:
    from torch._dynamo.utils import counters

    return int(counters["stats"]["unique_graphs"])


def learning_layers(net_layers, ctx, task: int) -> list:
    """The layers whose learning-task weight the pass computes: in training mode, with a learned mask."""
    if not ctx.is_learning(task):
        return []
    out = []
    for m in net_layers:
        if m.training and m.score is not None and m.kind is not None and m._mask_plan().masked:
            out.append(m)
    return out


@contextmanager
def learning_pass(net, task: int):
    """A training forward of `task`: when it is the learning task, its masked layers' weights are computed here,
    all together before the graph runs, and each layer takes its own inside the scope."""
    ctx = net.ctx
    cache = ctx.cache
    if not net.training or cache.step is not None or not ctx.is_learning(task):
        yield
        return
    probe = next(net.parameters(), None)  # a move to another device or dtype rebuilds the plan's tensors
    where = None if probe is None else (probe.device, probe.dtype)
    plan = cache.get("net", "pass_plan", (ctx.masks.temperature, ctx.masks.noise, id(ctx.masks.policy), where),
                     lambda: _build_plan(net, ctx, task))
    if plan is None:
        yield
        return
    cache.step = _run(plan, ctx)
    try:
        yield
    finally:
        cache.step = None


def _build_plan(net, ctx, task):
    layers = learning_layers(net.masked_layers(), ctx, task)
    return PassPlan(layers) if layers else None


def _run(plan: PassPlan, ctx) -> dict:
    uniform = plan.uniform()
    scores = [m.score for m in plan.layers]
    if not ctx.masks.fuse_masks:
        mults = plan.multiplier(scores, uniform).split(plan.sizes)
        return {m.target: m.masked_weight(p, v.view(s))
                for m, p, v, s in zip(plan.layers, plan.plans, mults, plan.unit_shapes)}
    _, (fn,) = compiled_weights(ctx, plan)
    stats = ctx.cache.compile_stats
    graphs, t0 = _graph_count(), time.perf_counter()
    outs = fn(tuple(zip(plan.sizes, plan.none_trainable)), [m.weight for m in plan.layers],
              [m.frozen for m in plan.layers], scores, uniform, plan.scale, plan.threshold, plan.noise, plan.active,
              plan.const, plan.trainable)
    new = _graph_count() - graphs
    if new:  # this call compiled (the first of a layout, or a recompile: a guard of the graph failed)
        stats["compiles"] += new
        stats["compile_seconds"] += time.perf_counter() - t0
    return dict(zip(plan.targets, outs))
