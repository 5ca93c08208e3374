"""Step 3 (part 2): rewrite a plain traced graph into a task-aware one, and back (export).

Every module or tensor a task computes with is replaced by a task-aware counterpart, so that no parameter
is ever shared mutably between tasks:

    conv / linear (not the head)      -> MaskedConv / MaskedLinear   (shared bank, per-task masks)
    classifier head                   -> PerTask('head')              (one head per task)
    norms, other modules with params  -> PerTask('norm' / 'module')   (per-task copies and statistics)
    nn.MultiheadAttention             -> HeadGrowingAttention         (masked projection banks, grows by heads)
    get_attr of a parameter           -> TaskParameter / WeightOf     (per-task copy / the layer's weight)
"""

from __future__ import annotations

import copy
import operator
import re

import torch
from torch import fx, nn

from grownfx.engine.attention import HeadAttention, HeadGrowingAttention
from grownfx.engine.banks import MaskedConv, MaskedLinear
from grownfx.engine.context import TaskContext
from grownfx.engine.layers import (PerTask, TaskLayerNorm, TaskLiteral, TaskMode, TaskParameter, WeightOf,
                                   _TaskModule)
from grownfx.engine.splits import TaskSizes
from grownfx.engine.surgery import attribute_holder
from grownfx.engine.tracing import head_attention_kind, layer_kind

_NORMS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.SyncBatchNorm, nn.GroupNorm, nn.LayerNorm,
          nn.InstanceNorm1d, nn.InstanceNorm2d, nn.InstanceNorm3d, nn.LocalResponseNorm)
_CONVS = (nn.Conv1d, nn.Conv2d, nn.Conv3d)


def set_submodule(root: fx.GraphModule, path: str, module: nn.Module) -> None:
    """Install `module` at `path`, creating empty parents (fx's `GraphModule.add_submodule`)."""
    if not root.add_submodule(path, module):
        raise AttributeError(f"cannot install a module at '{path}': a parent is not a module")


def _param_holder_name(target: str) -> str:
    return "task_params." + re.sub(r"[^0-9a-zA-Z_]", "_", target)


def make_task_aware(
    gm: fx.GraphModule, heads: list[str], ctx: TaskContext, granularity: str = "kernel", per_task: set = frozenset()
) -> tuple[fx.GraphModule, dict[str, str]]:
    """Replace modules and parameters in place; returns the graph module and a map param path -> holder path.

    Parameters and float buffers get one copy per task; a buffer of another dtype (an index table) stays shared
    and immutable unless it is in `per_task` (a bool or int per-channel mask of a growable group, a per-class
    tensor): resized for one task, it must not change for the others."""
    replaced: dict[str, nn.Module] = {}
    for node in gm.graph.nodes:
        if node.op != "call_module" or node.target in replaced:
            continue
        m = gm.get_submodule(node.target)
        new = _task_module(m, node.target, heads, ctx, granularity)
        if new is not None:
            set_submodule(gm, node.target, new)
            replaced[node.target] = new
    holders: dict[str, str] = {}
    for node in list(gm.graph.nodes):
        if node.op == "get_attr" and node.target == "training":  # the mode, read by the graph (engine/modes.py)
            set_submodule(gm, "task_mode", TaskMode(ctx, "task_mode"))
            with gm.graph.inserting_before(node):
                node.replace_all_uses_with(gm.graph.call_module("task_mode"))
            gm.graph.erase_node(node)
            continue
        if node.op != "get_attr":
            continue
        owner_path, _, attr = node.target.rpartition(".")
        trainable = True
        if not (owner_path in replaced and attr in ("weight", "bias")):  # else a layer replaced above: its tensor
            try:
                value = gm.get_parameter(node.target)
            except AttributeError:
                value = _float_buffer(gm, node.target, node.target in per_task)
                if value is None:
                    continue  # an integer buffer (an index table) or a constant: shared and immutable
                # a float buffer (a per-channel scale): per-task copies, so growth never resizes one all tasks share
                trainable = False
        owner = replaced.get(owner_path) if trainable else None
        if owner is None and owner_path and trainable:
            try:
                m = gm.get_submodule(owner_path)
            except AttributeError:
                m = None
            if isinstance(m, _CONVS + (nn.Linear,)) and attr in ("weight", "bias"):
                owner = MaskedConv(m, ctx, owner_path, granularity) if isinstance(m, _CONVS) else \
                    MaskedLinear(m, ctx, owner_path, granularity)
                set_submodule(gm, owner_path, owner)
                replaced[owner_path] = owner
        if owner is not None:
            holder_path = owner_path + "__" + attr
            new: nn.Module = WeightOf(owner, attr, ctx, holder_path)
        else:
            holder_path = _param_holder_name(node.target)
            new = TaskParameter(value, ctx, holder_path, trainable=trainable)
        holder_path = holder_path.replace(".", "_") if owner is not None else holder_path
        set_submodule(gm, holder_path, new)
        holders[node.target] = holder_path
        with gm.graph.inserting_before(node):
            call = gm.graph.call_module(holder_path)
        node.replace_all_uses_with(call)
        gm.graph.erase_node(node)
    gm.graph.lint()
    gm.recompile()
    return gm, holders


def make_literals_task_aware(gm: fx.GraphModule, literals: list[tuple[str, int, tuple]], ctx: TaskContext) -> None:
    """Each (view/reshape node, argument position, layout): the channel count written there becomes a
    `TaskLiteral`, so every task reshapes with the width it was learned with."""
    nodes = {n.name: n for n in gm.graph.nodes}
    for name, axis, layout in literals:
        node = nodes[name]
        path = "task_literals." + name + f"_{axis}"
        set_submodule(gm, path, TaskLiteral(layout, ctx, path))
        with gm.graph.inserting_before(node):
            value = gm.graph.call_module(path)
        args = list(node.args)
        if len(args) == 2 and isinstance(args[1], (list, tuple)):
            inner = list(args[1])
            inner[axis] = value
            args[1] = type(args[1])(inner)
        else:
            args[axis + 1] = value
        node.args = tuple(args)
    if literals:
        gm.graph.lint()
        gm.recompile()


def _float_buffer(gm: fx.GraphModule, target: str, any_dtype: bool = False) -> torch.Tensor | None:
    try:
        value = gm.get_buffer(target)
    except AttributeError:
        try:  # a tensor attribute that is neither (fx's `_tensor_constant0`)
            value = getattr(*attribute_holder(gm, target))
        except AttributeError:
            return None
        if not isinstance(value, torch.Tensor) or not any_dtype:
            return None
    return value if value.is_floating_point() or any_dtype else None


def _task_module(m: nn.Module, target: str, heads: list[str], ctx: TaskContext, granularity: str):
    if isinstance(m, _TaskModule):
        return None
    if target in heads:
        return PerTask(m, ctx, target, "head")
    if layer_kind(m) == "other":  # a layer subclass with more than a weight (given as a leaf): copied per task
        return PerTask(m, ctx, target, "module")
    if isinstance(m, _CONVS):
        return MaskedConv(m, ctx, target, granularity)
    if isinstance(m, nn.Linear):
        return MaskedLinear(m, ctx, target, granularity)
    if head_attention_kind(m) is not None:
        return HeadAttention(m, ctx, target, granularity)
    if isinstance(m, nn.MultiheadAttention):
        return HeadGrowingAttention(m, ctx, target, granularity)
    if isinstance(m, _NORMS):
        return PerTask(m, ctx, target, "norm") if any(True for _ in m.parameters()) or _has_stats(m) else None
    if any(True for _ in m.parameters()):
        return PerTask(m, ctx, target, "module")
    return None


def _has_stats(m: nn.Module) -> bool:
    return getattr(m, "running_mean", None) is not None


def export_graph(gm: fx.GraphModule, task: int) -> fx.GraphModule:
    """A plain GraphModule computing what `gm` computes for `task`: standard layers, that task's tensors only."""
    root = fx.GraphModule(nn.Module(), fx.Graph())  # an empty one, for its add_submodule
    graph = copy.deepcopy(gm.graph)
    plain_cache: dict[str, nn.Module] = {}

    def plain_of(path: str) -> nn.Module:
        if path not in plain_cache:
            m = gm.get_submodule(path)
            if hasattr(m, "to_plain"):
                plain_cache[path] = m.to_plain(task)
            else:
                plain_cache[path] = copy.deepcopy(m)
            set_submodule(root, path, plain_cache[path])
        return plain_cache[path]

    for node in list(graph.nodes):
        if node.op == "call_module":
            m = gm.get_submodule(node.target)
            if isinstance(m, TaskSizes):  # the task's split sizes, as numbers again (engine/splits.py)
                sizes = m.sizes_for(task)
                for user in list(node.users):
                    user.args = fx.node.map_arg(user.args, lambda a: sizes if a is node else a)
                    user.kwargs = fx.node.map_arg(user.kwargs, lambda a: sizes if a is node else a)
                graph.erase_node(node)
            elif isinstance(m, TaskLiteral):  # the number this task reshapes with, written back as a constant
                value = m.value_for(task)
                for user in list(node.users):
                    user.args = fx.node.map_arg(user.args, lambda a: value if a is node else a)
                graph.erase_node(node)
            elif isinstance(m, TaskMode):  # a plain module's own mode again
                node.op, node.target = "get_attr", "training"
            elif isinstance(m, TaskParameter):
                value = m.copy_for(task).detach().clone()
                if value.is_floating_point():
                    _set_param(root, node.target, nn.Parameter(value))
                else:  # a bool or integer per-channel mask: a buffer again
                    _set_param(root, node.target, value, buffer=True)
                node.op = "get_attr"
            elif isinstance(m, WeightOf):
                layer = m.__dict__["layer"]
                plain_of(layer.target)  # the plain layer whose weight the node now reads
                node.op, node.target = "get_attr", layer.target + "." + m.which
            elif isinstance(m, TaskLayerNorm):
                _export_task_layer_norm(root, graph, node, m, task)
            elif isinstance(m, PerTask) and m.norm_axis is not None and \
                    m.ctx.norm_stats(node.target, task) is not None:
                _stats_layer_norm_nodes(root, graph, node, m, task)
            else:
                plain_of(node.target)
        elif node.op == "get_attr":
            value = getattr(*attribute_holder(gm, node.target))
            _set_param(root, node.target, value.detach().clone() if isinstance(value, torch.Tensor) else value,
                       buffer=True)
    out = fx.GraphModule(root, graph, gm.__class__.__name__ + f"_task{task}")
    return out.eval()


def _stats_layer_norm_nodes(root: fx.GraphModule, graph: fx.Graph, node: fx.Node, m: PerTask, task: int) -> None:
    """Replace a call of a layer norm whose statistics cover only some channels (layers.stats_layer_norm) by the
    same torch ops in the graph; its weight, bias and channel index live in a plain `nn.Module` at its path."""
    norm = m.copies[task]
    holder = nn.Module()
    for name in ("weight", "bias"):
        t = getattr(norm, name, None)
        holder.register_parameter(name, nn.Parameter(t.detach().clone()) if t is not None else None)
    index = m.ctx.norm_stats(node.target, task).to(next(norm.parameters()).device)
    holder.register_buffer("stat_index", index.clone())
    set_submodule(root, node.target, holder)
    with graph.inserting_before(node):
        weight, bias = (graph.get_attr(f"{node.target}.{n}") if getattr(holder, n) is not None else None
                        for n in ("weight", "bias"))
    _emit_stats_layer_norm(graph, node, node.args[0], weight, bias, node.target + ".stat_index", norm.eps,
                           m.norm_axis, isinstance(norm, nn.GroupNorm))


def _emit_stats_layer_norm(graph: fx.Graph, node: fx.Node, x, weight, bias, index_path: str, eps: float,
                           axis: int, joint: bool = False) -> None:
    """`layers.stats_layer_norm` written into `graph` in place of `node` (the same ops, in the same order)."""
    dims = tuple(range(axis, 0)) if joint else axis
    with graph.inserting_before(node):
        sel = graph.call_function(torch.index_select, (x, axis, graph.get_attr(index_path)))
        var_mean = graph.call_function(torch.var_mean, (sel,), {"dim": dims, "correction": 0, "keepdim": True})
        var = graph.call_function(operator.getitem, (var_mean, 0))
        mean = graph.call_function(operator.getitem, (var_mean, 1))
        y = graph.call_function(torch.mul, (graph.call_function(torch.sub, (x, mean)), graph.call_function(
            torch.rsqrt, (graph.call_function(torch.add, (var, eps)),))))
        for param, op in ((weight, torch.mul), (bias, torch.add)):
            if param is not None:
                y = graph.call_function(op, (y, graph.call_method("reshape", (param, (-1,) + (1,) * (-axis - 1)))))
    node.replace_all_uses_with(y)
    graph.erase_node(node)


def _export_task_layer_norm(root: fx.GraphModule, graph: fx.Graph, node: fx.Node, m: TaskLayerNorm,
                            task: int) -> None:
    """A functional layer norm of the traced graph, as task `task` computes it: `F.layer_norm` over its width, or
    the written-out statistics over the channels born before it."""
    x = node.args[0]
    weight = node.args[1] if len(node.args) > 1 else None
    bias = node.args[2] if len(node.args) > 2 else None
    index = m.ctx.norm_stats(m.key, task)
    if index is None:
        with graph.inserting_before(node):
            new = graph.call_function(torch.nn.functional.layer_norm, (x, (m.width_for(task),), weight, bias, m.eps))
        node.replace_all_uses_with(new)
        graph.erase_node(node)
        return
    holder = nn.Module()
    holder.register_buffer("stat_index", index.clone())
    set_submodule(root, node.target, holder)
    _emit_stats_layer_norm(graph, node, x, weight, bias, node.target + ".stat_index", m.eps, -1)


def make_layer_norms_task_aware(gm: fx.GraphModule, names: list[str], ctx: TaskContext) -> None:
    """Each functional `layer_norm(x, shape, weight, bias, eps)` node named in `names` becomes a `TaskLayerNorm`
    call: every task normalises its own width, with the statistics of docs/architecture.md §5."""
    nodes = {n.name: n for n in gm.graph.nodes}
    for name in names:
        node = nodes[name]
        args = dict(zip(("input", "normalized_shape", "weight", "bias", "eps"), node.args))
        args.update(node.kwargs)
        path = "task_norms." + name
        set_submodule(gm, path, TaskLayerNorm(ctx, path, "fn:" + name, float(args.get("eps", 1e-5))))
        with gm.graph.inserting_before(node):
            call = gm.graph.call_module(path, (args["input"], args.get("weight"), args.get("bias")))
        node.replace_all_uses_with(call)
        gm.graph.erase_node(node)
    if names:
        gm.graph.lint()
        gm.recompile()


def _set_param(root: fx.GraphModule, path: str, value, buffer: bool = False) -> None:
    obj, last = attribute_holder(root, path, create=True)
    if isinstance(value, nn.Parameter) or not buffer:
        obj.register_parameter(last, value if isinstance(value, nn.Parameter) else nn.Parameter(value))
    elif isinstance(value, torch.Tensor):
        obj.register_buffer(last, value)
    else:
        setattr(obj, last, value)
