"""Channel splits whose sizes are written as numbers (`torch.split(x, [16, 24, 8], 1)`, Res2Net's
`split(out, self.width, 1)`, FasterNet's partial conv, MixNet's mixed depthwise convs).

The coupling analysis refines the variables the split cuts, so each piece is whole segments, and records a
binding of role 'split' on the node.  On a plain graph (seed slimming, export pruning) `apply_split_sizes`
rewrites the numbers.  On the task-aware graph the sizes depend on the task (a finished task computes with the
channels it had), so `install_task_splits` replaces them by a `TaskSizes` node that computes them for the current
task from the channel births; `export` puts that task's numbers back.
"""

from __future__ import annotations

import bisect

import torch
from torch import fx, nn


def sizes_arg(node: fx.Node) -> tuple[str, int | str]:
    """Where the sizes of a split node are: ('arg', position) or ('kw', name)."""
    for kw in ("split_size_or_sections", "split_size", "sections"):
        if kw in node.kwargs:
            return "kw", kw
    return "arg", 1


def get_sizes(node: fx.Node):
    where, key = sizes_arg(node)
    return node.kwargs[key] if where == "kw" else node.args[key]


def set_sizes(node: fx.Node, value) -> None:
    where, key = sizes_arg(node)
    if where == "kw":
        node.kwargs = {**node.kwargs, key: value}
    else:
        args = list(node.args)
        args[key] = value
        node.args = tuple(args)


def apply_split_sizes(gm: fx.GraphModule, node_name: str, src: torch.Tensor) -> bool:
    """New sizes of a plain graph's split after an axis map (new channels belong to the piece before them)."""
    node = next((n for n in gm.graph.nodes if n.name == node_name), None)
    if node is None:
        return False
    sizes = get_sizes(node)
    if not isinstance(sizes, (list, tuple)) or not all(isinstance(s, int) for s in sizes):
        return False  # a task-aware size node computes them
    bounds, acc = [], 0
    for s in sizes:
        acc += s
        bounds.append(acc)
    new = [0] * len(sizes)
    piece = 0
    for o in src.tolist():
        if o >= 0:
            piece = bisect.bisect_right(bounds, o)
        new[piece] += 1
    set_sizes(node, list(new))
    return True


class TaskSizes(nn.Module):
    """The sizes of a split for the current task: per piece, the channels of its segments the task sees."""

    def __init__(self, layout: tuple, counts: list[int], ctx, target: str):
        super().__init__()
        self.__dict__["_ctx"] = ctx
        self.layout = tuple(layout)  # ((group id, factor, fixed width), ...)
        self.counts = list(counts)  # segments per piece
        self.target = target

    def sizes_for(self, task: int) -> list[int]:
        widths = self.__dict__["_ctx"].structure.segment_widths(self.layout, task)
        out, i = [], 0
        for c in self.counts:
            out.append(sum(widths[i:i + c]))
            i += c
        return out

    def forward(self):
        return self.sizes_for(self.__dict__["_ctx"].task)


def install_task_splits(gm: fx.GraphModule, bindings: list, layout_of, ctx) -> None:
    """Replace the numeric sizes of every bound split by a `TaskSizes` node (after seed slimming)."""
    nodes = {n.name: n for n in gm.graph.nodes}
    changed = False
    for b in bindings:
        if b.role != "split" or b.target not in nodes:
            continue
        node = nodes[b.target]
        sizes = get_sizes(node)
        if not isinstance(sizes, (list, tuple)):
            continue
        layout = layout_of(b)
        widths = [ctx.structure.widths.get(gid, fixed) * factor for gid, factor, fixed in layout]
        counts, i = [], 0
        for s in sizes:
            c, acc = 0, 0
            while acc < s and i < len(widths):
                acc, c, i = acc + widths[i], c + 1, i + 1
            if acc != s:
                raise RuntimeError(f"split '{b.target}' does not cut at segment boundaries")  # pragma: no cover
            counts.append(c)
        path = "task_splits." + b.target
        if not hasattr(gm, "task_splits"):
            gm.add_module("task_splits", nn.Module())
        gm.task_splits.add_module(b.target, TaskSizes(layout, counts, ctx, b.target))
        with gm.graph.inserting_before(node):
            size_node = gm.graph.call_module(path)
        set_sizes(node, size_node)
        changed = True
    if changed:
        gm.graph.lint()
        gm.recompile()
