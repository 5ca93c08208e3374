"""`prepare()`: trace -> couple -> slim -> make task-aware, the way into the engine; `slim()`: the plain graph sliced
to a seed width (the first half of `prepare`, used alone by the baselines that need no task-aware layers).

    net = grownfx.prepare(model, example_input, seed_width=0.5)   # a GrowableNet (engine/net.py)
"""

from __future__ import annotations

import copy
import math
from typing import Iterable, Sequence

import torch
from torch import fx, nn

from grownfx.engine.attention import attention_layouts
from grownfx.engine.context import SEED, TaskContext
from grownfx.engine.coupling import CouplingResult, analyze
from grownfx.engine.errors import SurgeryError
from grownfx.engine.heads import check_class_count, find_heads
from grownfx.engine.layers import PerTask, TaskParameter
from grownfx.engine.net import GrowableNet, count_parameters
from grownfx.engine.rewrite import make_layer_norms_task_aware, make_literals_task_aware, make_task_aware
from grownfx.engine.seed_selection import SEED_CHANNELS, channel_scores, keep_indices, taylor_scores
from grownfx.engine.selfcheck import check_graph
from grownfx.engine.splits import install_task_splits
from grownfx.engine.surgery import apply_changes, binding_layout, keep_change
from grownfx.engine.tracing import trace

__all__ = ["LINEAR_BLOCK", "prepare", "seed_channels", "slim"]


def prepare(
    model: nn.Module,
    example_input: torch.Tensor,
    seed_width: float = 1.0,
    *,
    leaf_modules: Iterable[str | type] = (),
    granularity: str = "kernel",
    seed: int = 0,
    auto_leaves: bool = False,
    output: int | str | None = None,
    head: str | Sequence[str] | None = None,
    check: bool = True,
    seed_channels: str = "first",
    seed_data: torch.Tensor | None = None,
) -> GrowableNet:
    """Trace `model`, find its coupling groups, slim every growable group to `seed_width`, make it task-aware.

    `auto_leaves`: a submodule torch.fx cannot trace is kept opaque (a leaf) instead of raising TraceError;
    `net.graph_module.auto_leaves` names them.
    `output`: which of the values a model returns are the logits (an index, a dict key or a namedtuple field), for
    a model that returns several; a dict key or field `logits` is taken without it.
    `head`: the classifier when the analysis cannot find it -- a module, or a parameter used by a functional
    head (`F.linear(f, self.W)`: `head="W"`); every task gets its own copy with its own number of classes.
    `check`: compare the traced graph with `model` on `example_input` before anything is changed
    (`engine/selfcheck.py`: outputs in eval and train mode, input and parameter gradients; `ModelCheckError` on a
    difference).  Always on for users; internal callers that already checked the same model may pass False.
    `seed_channels`: which channels a seed narrower than the backbone keeps: `first`, `magnitude` or `taylor`
    (engine/seed_selection.py; for pretrained weights); `taylor` scores them on the inputs `seed_data`.
    `net.check_report` says what was compared."""
    if not isinstance(seed_width, (int, float)) or not 0 < seed_width <= 1:
        raise SurgeryError(f"seed_width must be in (0, 1], got {seed_width!r}")
    if seed_channels not in SEED_CHANNELS:
        raise SurgeryError(f"seed_channels must be one of {', '.join(SEED_CHANNELS)}, got {seed_channels!r}")
    if seed_channels == "taylor" and seed_data is None:
        raise SurgeryError("seed_channels 'taylor' scores channels on inputs: give seed_data (task 1's)")
    if granularity not in ("kernel", "element", "channel"):
        raise SurgeryError(f"granularity must be 'kernel', 'element' or 'channel', got {granularity!r}")
    gm, coupling, widths, full_params = slim(model, example_input, seed_width, leaf_modules=leaf_modules, seed=seed,
                                             auto_leaves=auto_leaves,
                                             linear_block=LINEAR_BLOCK if granularity == "channel" else 1,
                                             output=output, check=check, head=head, select=seed_channels,
                                             select_data=seed_data)
    report, spec = gm.check_report, gm.head_spec
    heads = spec.modules
    ctx = TaskContext()
    structure = ctx.structure
    structure.widths = widths
    structure.births = {gid: torch.full((w,), SEED, dtype=torch.long) for gid, w in widths.items()}
    for b in coupling.bindings:
        if b.role in ("in", "out", "grouped", "feat"):
            structure.layouts[(b.target, b.role)] = binding_layout(coupling, b)
        elif b.role == "lnfn":  # a functional layer_norm: its statistics (context.norm_stats)
            structure.layouts[("fn:" + b.target, "feat")] = binding_layout(coupling, b)
        elif b.role == "attn":  # nn.MultiheadAttention: its projection banks (engine/attention.py)
            structure.layouts.update(attention_layouts(b.target, binding_layout(coupling, b)))
    if granularity == "channel":
        structure.unit_cols = _linear_unit_columns(gm, coupling, heads)
    growable_params = {b.target for b in coupling.bindings
                       if b.role == "param" and all(coupling.groups[g].growable for g, _, _ in binding_layout(coupling, b))}
    gm, holders = make_task_aware(gm, heads, ctx, granularity, per_task=growable_params | set(spec.params))
    for target, (axis, init) in spec.params.items():  # per-class tensors: each task's copy has its own classes
        holder = gm.get_submodule(holders[target]) if target in holders else None
        if not isinstance(holder, TaskParameter):
            raise SurgeryError(f"the classifier parameter '{target}' is also a layer's own weight; make the "
                               "classifier one module or one parameter")
        holder.class_axis, holder.class_init = axis, init
    for b in coupling.bindings:
        if b.role == "feat" and b.axis < 0:  # a layer norm over one channel axis (coupling rules)
            norm = gm.get_submodule(b.target)
            if isinstance(norm, PerTask):
                norm.norm_axis = b.axis
    install_task_splits(gm, coupling.bindings, lambda b: binding_layout(coupling, b), ctx)
    make_layer_norms_task_aware(gm, [b.target for b in coupling.bindings if b.role == "lnfn" and any(
        coupling.groups[g].growable for g, _, _ in binding_layout(coupling, b))], ctx)
    make_literals_task_aware(gm, [(b.target, b.axis, binding_layout(coupling, b)) for b in coupling.bindings
                                  if b.role == "literal" and all(coupling.groups[g].growable
                                                                 for g, _, _ in binding_layout(coupling, b))], ctx)
    for b in coupling.bindings:
        if b.role == "param" and b.target in holders:
            b.target = holders[b.target]
    net = GrowableNet(gm, coupling, ctx, full_params=full_params, seed=seed, heads=heads, head=spec.first,
                      input_shape=tuple(example_input.shape[1:]))
    net.head_params = dict(spec.params)  # per-class parameters (a functional classifier's weight, a logit bias)
    net.class_axis, net.input_dtype = spec.class_axis, example_input.dtype
    net.check_report = report
    net.seed_selection = dict(gm.seed_selection)  # {group: 'first' | 'magnitude' | 'taylor'}, seed narrower than 1
    return net


LINEAR_BLOCK = 16  # granularity 'channel': a Linear's input neurons (no flatten before it) in blocks of this many


def _linear_inputs(gm: fx.GraphModule, coupling: CouplingResult, heads: list[str]):
    """The input bindings of the masked (non-head) Linear layers."""
    for b in coupling.bindings:
        if b.role == "in" and b.target not in heads and isinstance(gm.get_submodule(b.target), nn.Linear):
            yield b


def _linear_unit_columns(gm: fx.GraphModule, coupling: CouplingResult, heads: list[str]) -> dict[str, int]:
    """granularity 'channel': the input columns of one mask unit of each masked Linear -- the largest block that
    every segment of its input keeps whole as channels come and go (a flattened channel's spatial positions, or
    LINEAR_BLOCK neurons of a group that grows by whole blocks)."""
    out = {}
    for b in _linear_inputs(gm, coupling, heads):
        sizes = [f * (coupling.groups[g].granularity if coupling.groups[g].growable else fixed)
                 for g, f, fixed in binding_layout(coupling, b)]
        out[b.target] = math.gcd(*sizes) if sizes else 1
    return out


def slim(model: nn.Module, example_input: torch.Tensor, width: float = 1.0, *,
         leaf_modules: Iterable[str | type] = (), seed: int = 0, auto_leaves: bool = False, linear_block: int = 1,
         output: int | str | None = None, check: bool = False, head: str | Sequence[str] | None = None,
         select: str = "first", select_data: torch.Tensor | None = None):
    """Trace and analyse `model`, and slice every growable group to `width` of its channels (a plain graph).

    `select`: which channels stay (engine/seed_selection.py): the first ones, by `magnitude` of their
    producing weights, or by `taylor` importance on the inputs `select_data` (for pretrained weights); the graph
    module's `seed_selection` says, per group, which rule picked them.

    `linear_block` > 1: groups read by a masked Linear without a flatten factor change width by whole blocks of
    that many channels (granularity 'channel': the Linear's mask units are such blocks).
    `check`: compare the traced, analysed graph at full width with the model first (`selfcheck.check_graph`);
    the graph module's `check_report` says what was compared (None when not checked).  `head`: the declared
    classifier (`heads.find_heads`); the graph module's `heads` says what the heads are.

    Returns (graph module, coupling result, {group: width}, parameters of the full-width model).
    The caller's model is left untouched (the graph module works on a copy).
    """
    eager = copy.deepcopy(model)
    gm = trace(eager, example_input, leaf_modules, auto_leaves=auto_leaves, output=output)
    coupling = analyze(gm)
    gm.check_report = check_graph(eager, gm, example_input, output) if check else None
    del eager
    gm.head_spec = find_heads(gm, coupling, head)
    check_class_count(gm, gm.head_spec, example_input)
    heads = gm.head_spec.modules
    if linear_block > 1:
        for b in _linear_inputs(gm, coupling, heads):
            for g, factor, _ in binding_layout(coupling, b):
                if factor == 1 and coupling.groups[g].growable:
                    coupling.groups[g].granularity = math.lcm(coupling.groups[g].granularity, linear_block)
    full_params = count_parameters(gm)
    widths = {g.id: g.width for g in coupling.groups if g.growable}
    gm.seed_selection = {}
    if width < 1:
        changes = {}
        taylor = taylor_scores(gm, coupling, list(widths), select_data) if select == "taylor" else {}
        for gid, w in widths.items():
            gran = coupling.groups[gid].granularity
            scores = channel_scores(gm, coupling, gid) if select == "magnitude" else taylor.get(gid)
            gm.seed_selection[gid] = select if scores is not None else "first"
            changes[gid] = keep_change(keep_indices(scores, w, seed_channels(w, width, gran), gran))
        apply_changes(gm, coupling, widths, changes, torch.Generator().manual_seed(seed))
    return gm, coupling, widths, full_params


def seed_channels(width: int, fraction: float, granularity: int) -> int:
    return max(granularity, int(round(width * fraction / granularity)) * granularity)
