"""How channel layouts move through tensor-manipulation ops (reshape, permute, cat, split, indexing, broadcast).

A mixin of `CouplingAnalysis`: each method maps the layouts of an op's inputs to its output's, tying or fixing
channel groups where the op mixes them.  Anything these rules cannot follow exactly raises `Opaque`, and the
analysis then ties and fixes every channel the op touches.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import fx

from grownfx.engine.tracing import tensor_shape
from grownfx.engine.coupling.types import Binding, Layout, Seg


@dataclass
class TVal:
    """A tensor: per-axis layouts (None: the axis carries no channels) and per-axis parameter origins."""

    axes: tuple
    shape: tuple
    origin: tuple = ()  # per axis: (param_target, param_axis) or None

    def __post_init__(self):
        if not self.origin:
            self.origin = (None,) * len(self.axes)


@dataclass
class Seq:
    items: list


class _Other:
    pass


OTHER = _Other()


class Opaque(Exception):
    pass


@dataclass
class ShapeOf:
    """`x.shape` / `x.size()`: reading one of its channel entries gives a `Width`."""

    of: TVal


@dataclass
class Width:
    """A channel count read from a shape (`x.shape[1]`, `x.size(1)`, `x.numel()`), and the layouts it counts."""

    layouts: tuple
    source: str  # the node that read it


# ops that may take a Width without making the network's values depend on it: they only shape a tensor
# (not `full`/`new_full`: their fill value could be the width)
_SHAPE_USES = {"view", "reshape", "expand", "broadcast_to", "unflatten", "new_zeros", "new_ones", "new_empty",
               "zeros", "ones", "empty", "rand", "randn", "getitem", "len", "_assert"}


# binary ops whose identity element is 1: a parameter's new entries are filled with it (0 would divide by zero)
_MULTIPLY = {"mul", "imul", "rmul", "mul_"}
_DIVIDE = {"truediv", "div", "true_divide", "itruediv", "div_", "floordiv", "mod", "floor_divide", "remainder", "fmod"}


# ops that only move a parameter's entries (a parameter reaching an op through them is used "directly")
_MOVE_ONLY = {"view", "reshape", "unsqueeze", "squeeze", "flatten", "unflatten", "expand", "expand_as", "broadcast_to",
              "permute", "transpose", "contiguous", "to", "type_as", "float", "half", "double", "bfloat16", "view_as",
              "bool", "long", "int", "short", "byte",  # conversions keep the fills 0 and 1
              "reshape_as", "clone", "detach", "getitem"}


def direct_param(arg: Any) -> bool:
    """`arg` is a parameter or buffer (get_attr), possibly reshaped or moved, with no arithmetic on it."""
    while isinstance(arg, fx.Node):
        if arg.op == "get_attr":
            return True
        if arg.op not in ("call_function", "call_method") or op_name(arg.target) not in _MOVE_ONLY or not arg.args:
            return False
        arg = arg.args[0]
    return False


def nodes_in(a: Any):
    """Every fx node in `a` and in the lists, tuples and dicts nested in it (not inside slices)."""
    if isinstance(a, fx.Node):
        yield a
    elif isinstance(a, (list, tuple)):
        for y in a:
            yield from nodes_in(y)
    elif isinstance(a, dict):
        for y in a.values():
            yield from nodes_in(y)


def op_name(target: Any) -> str:
    if isinstance(target, str):
        return target
    return getattr(target, "__name__", str(target))


def norm_dim(d: int, ndim: int) -> int:
    return d + ndim if d < 0 else d


class LayoutOps:
    """Layout rules for ops that move, split or merge axes; mixed into CouplingAnalysis."""

    # -- widths read from shapes ----------------------------------------------------------------------------
    def shape_read(self, node: fx.Node, name: str) -> Any:
        """`x.shape`, `x.size()`, `x.size(d)`, `x.numel()`: a ShapeOf / Width, or None when `node` is no such read."""
        args = node.args
        x = self.val(args[0]) if args else OTHER
        if not isinstance(x, TVal):
            return None
        if name == "getattr" and len(args) > 1 and args[1] == "shape":
            return ShapeOf(x)
        if name == "size":
            d = node.kwargs.get("dim", args[1] if len(args) > 1 else None)
            return ShapeOf(x) if d is None else self.width_at(x, d, node)
        if name == "numel":
            lays = tuple(lay for lay in x.axes if lay)
            return Width(lays, node.name) if lays else OTHER
        return None

    def width_at(self, x: TVal, d: Any, node: fx.Node) -> Any:
        if not isinstance(d, int):
            return OTHER
        lay = x.axes[norm_dim(d, len(x.shape))]
        return Width((lay,), node.name) if lay else OTHER

    def check_width_uses(self, node: fx.Node, name: str) -> None:
        """A channel count read from a shape may only shape tensors (view, expand, zeros); any other use (a
        `c ** -0.5` scale, a comparison) makes values depend on the width, so growth would change them."""
        found: list[tuple] = []

        def visit(a: fx.Node) -> None:
            v = self.values.get(a.name)
            if isinstance(v, Width):
                found.append((v.layouts, v.source))
            elif isinstance(v, ShapeOf):
                found.append((tuple(lay for lay in v.of.axes if lay), a.name))
            elif isinstance(v, Seq):
                for item in v.items:
                    if isinstance(item, Width):
                        found.append((item.layouts, item.source))

        def walk(args: Any) -> None:
            for a in nodes_in(args):
                visit(a)

        if name in _SHAPE_USES:
            return
        if name in ("floordiv", "mul") and all(isinstance(a, (fx.Node, int)) for a in node.args) and node.users and all(
                u.op in ("call_function", "call_method") and op_name(u.target) in ("view", "reshape")
                for u in node.users):
            return  # `x.view(B, k, C // k)`: a count derived from the width that only shapes a tensor
        if name == "layer_norm":  # normalized_shape read from the input's shape follows the width it normalises
            walk([node.args[0]] + list(node.args[2:]) + [v for k, v in node.kwargs.items() if k != "normalized_shape"])
        else:
            walk(list(node.args) + list(node.kwargs.values()))
        for lays, source in found:
            for lay in lays:
                self.fix(lay, f"the channel count read from the shape at '{source}' is used by '{name}' at "
                              f"'{node.name}' (values would change with the width)")

    def elementwise(self, node: fx.Node) -> Any:
        out_shape = tensor_shape(node)
        if out_shape is None:
            return OTHER
        nd = len(out_shape)
        operands = [self.val(a) for a in list(node.args) + list(node.kwargs.values())]
        name = op_name(node.target)
        if name in _DIVIDE and len(operands) > 1 and isinstance(operands[1], TVal):
            for lay in operands[1].axes:
                if lay:  # a new channel's value could be 0: inf, then NaN through the zero consumer columns
                    self.fix(lay, f"channels are the divisor at '{node.name}'")
        axes: list = [None] * nd
        origin: list = [None] * nd
        for k in range(nd):
            entries, ones = [], []
            for pos, t in enumerate(operands):
                if not isinstance(t, TVal):
                    continue
                j = k - (nd - len(t.shape))
                if j >= 0 and t.shape[j] > 1:
                    entries.append((t.axes[j], t.origin[j], pos))
                elif j >= 0 and t.axes[j]:
                    ones.append(t.axes[j])  # channels of width 1 (a conv to one channel)
            if ones:
                self.one_channel_axes(node, ones, out_shape[k])
                if out_shape[k] == 1:
                    axes[k] = ones[0]
                    continue
            lays = [lay for lay, _, _ in entries if lay is not None]
            if lays:
                for lay in lays[1:]:
                    self.tie(lays[0], lay, node.name)
                axes[k] = lays[0]
                for lay, org, pos in entries:
                    if lay is None and org is not None:
                        if not direct_param((list(node.args) + list(node.kwargs.values()))[pos]):
                            # `x + self.b.log()`: the fill below is the op's identity only for the raw value
                            self.fix(lays[0], f"parameter '{org[0]}' is transformed before it meets the "
                                              f"channels at '{node.name}' (no fill keeps new channels finite)")
                        fill = 1.0 if name in _MULTIPLY or (name in _DIVIDE and pos == 1) else 0.0
                        self.bindings.append(Binding(org[0], "param", lays[0], org[1], node.name, fill))
                        self.param_literals((list(node.args) + list(node.kwargs.values()))[pos], org, lays[0])
                    elif lay is None:
                        self.fix(lays[0], f"channels combined with an untracked tensor at '{node.name}'")
            elif len(entries) == 1 or (entries and all(o == entries[0][1] for _, o, _ in entries)):
                origin[k] = entries[0][1] if entries else None
        return TVal(tuple(axes), out_shape, tuple(origin))

    def one_channel_axes(self, node: fx.Node, lays: list, size: int) -> None:
        """Operands whose axis holds one channel of a group.  Broadcast against `size` > 1 entries (CBAM's spatial
        attention `x * sigmoid(conv_to_1(x))`), the channel is repeated: grown to two it would no longer broadcast,
        so it is fixed.  Met by other one-channel axes only, they are the same channel: tied."""
        if size > 1:
            for lay in lays:
                self.fix(lay, f"one channel is broadcast over {size} at '{node.name}'")
        else:
            for lay in lays[1:]:
                self.tie(lays[0], lay, node.name)

    def cat(self, node: fx.Node, stack: bool) -> Any:
        items = self.val(node.args[0])
        out_shape = tensor_shape(node)
        if not isinstance(items, Seq) or out_shape is None:
            raise Opaque(f"cat at '{node.name}' of unknown inputs")
        ts = [t for t in items.items if isinstance(t, TVal)]
        if len(ts) != len(items.items):
            raise Opaque(f"cat at '{node.name}' mixes tensors and other values")
        dim = node.kwargs.get("dim", node.args[1] if len(node.args) > 1 else 0)
        dim = norm_dim(dim, len(out_shape))
        nd = len(out_shape)
        axes: list = [None] * nd
        origin: list = [None] * nd
        in_nd = len(ts[0].shape)
        for k in range(nd):
            if stack and k == dim:
                continue
            j = k if not stack or k < dim else k - 1
            if not stack and k == dim:
                if any(t.axes[j] for t in ts):
                    axes[k] = tuple(s for t in ts for s in self.ensure(t, j, node))
                continue
            lays = [t.axes[j] for t in ts if t.axes[j] is not None]  # one-channel axes too: the same channel
            if lays:
                for lay in lays[1:]:
                    self.tie(lays[0], lay, node.name)
                axes[k] = lays[0]
                for t in ts:
                    if t.axes[j] is None and t.shape[j] > 1:
                        if t.origin[j] is not None:
                            self.bindings.append(Binding(t.origin[j][0], "param", lays[0], t.origin[j][1], node.name))
                        else:
                            self.fix(lays[0], f"channels concatenated with an untracked tensor at '{node.name}'")
        del in_nd
        return TVal(tuple(axes), out_shape, tuple(origin))

    def getitem(self, node: fx.Node) -> Any:
        src = self.val(node.args[0])
        idx = node.args[1]
        if isinstance(src, Seq):
            return src.items[idx] if isinstance(idx, int) and -len(src.items) <= idx < len(src.items) else OTHER
        if isinstance(src, ShapeOf):
            if isinstance(idx, int):
                return self.width_at(src.of, idx, node)
            if isinstance(idx, slice):
                return Seq([self.width_at(src.of, d, node) for d in range(len(src.of.shape))[idx]])
            return OTHER
        if not isinstance(src, TVal):
            return OTHER
        out_shape = tensor_shape(node)
        if out_shape is None:
            return OTHER
        idx = idx if isinstance(idx, tuple) else (idx,)
        if any(isinstance(i, fx.Node) or isinstance(i, (list, torch.Tensor)) for i in idx):
            raise Opaque(f"advanced indexing at '{node.name}'")
        idx = self.drop_full_slice_bounds(node, src, idx)
        n_real = sum(1 for i in idx if i is not None and i is not Ellipsis)
        expanded: list = []
        for i in idx:
            if i is Ellipsis:
                expanded.extend([slice(None)] * (len(src.shape) - n_real))
            else:
                expanded.append(i)
        expanded.extend([slice(None)] * (len(src.shape) - sum(1 for i in expanded if i is not None)))
        as_split = self.slice_by_numbers(node, src, expanded)  # DPN's `x[:, :c]`: bounds that follow growth
        if as_split is not None:
            return as_split
        axes, origin, j = [], [], 0
        for i in expanded:
            if i is None:
                axes.append(None)
                origin.append(None)
                continue
            lay, org, n = src.axes[j], src.origin[j], src.shape[j]
            j += 1
            if isinstance(i, slice) and any(isinstance(b, fx.Node) for b in (i.start, i.stop, i.step)):
                # bounds computed in the graph (`x[:, : x.shape[1] // 2]`): which channels they keep at another
                # width is not known here, so the channels are fixed and the slice is new, fixed channels
                if lay:
                    self.fix(lay, f"channels sliced at '{node.name}' by bounds computed in the graph")
                    size = out_shape[len(axes)]
                    lay = self.fresh_layout(size, node.name, f"sliced at '{node.name}' by computed bounds")
                axes.append(lay)
                origin.append(None)
                continue
            if isinstance(i, int):
                if lay:
                    self.fix(lay, f"a single channel is picked at '{node.name}'")
                continue
            start, stop, step = i.indices(n)
            if lay and (step != 1 or (start, stop) != (0, n)):
                if step != 1:
                    self.fix(lay, f"strided channel slice at '{node.name}'")
                    lay = self.fresh_layout(len(range(start, stop, step)), node.name, "strided slice")
                else:  # the bounds are numbers: they would not follow any segment of the axis that grows
                    self.fix(lay, f"channels sliced at '{node.name}' by bounds written as numbers")
                    lay = self.sub_layout(lay, start, stop, node)
            axes.append(lay)
            origin.append(org if (start, stop, step) == (0, n, 1) else None)
        return TVal(tuple(axes), out_shape, tuple(origin))

    def sub_layout(self, lay: Layout, start: int, stop: int, node: fx.Node) -> Layout:
        out, pos = [], 0
        for s in lay:
            ext = s.width * s.factor
            lo, hi = max(start, pos), min(stop, pos + ext)
            if lo < hi:
                if (lo, hi) == (pos, pos + ext):
                    out.append(s)
                else:
                    self.fix([s], f"channels sliced at '{node.name}'")
                    out.append(Seg(s.var, hi - lo, 1))
            pos += ext
        return tuple(out)

    def split(self, node: fx.Node, x: Any, name: str) -> Any:
        meta = node.meta.get("tensor_meta")
        if not isinstance(x, TVal) or not isinstance(meta, (list, tuple)):
            raise Opaque(f"'{name}' at '{node.name}'")
        dim = node.kwargs.get("dim", node.args[2] if len(node.args) > 2 else 0)
        if name == "unbind":
            dim = node.kwargs.get("dim", node.args[1] if len(node.args) > 1 else 0)
        dim = norm_dim(dim, len(x.shape))
        if name in ("split", "split_with_sizes") and x.axes[dim] and len(meta) > 1:
            refined = self.split_by_numbers(node, x, dim, meta)  # pieces whose sizes follow growth
            if refined is not None:
                return refined
        items, pos = [], 0
        for m in meta:
            shape = tuple(int(s) for s in m.shape)
            if name == "unbind":
                if x.axes[dim]:
                    self.fix(x.axes[dim], f"unbind over channels at '{node.name}'")
                items.append(TVal(x.axes[:dim] + x.axes[dim + 1:], shape))
                continue
            n = shape[dim]
            lay = self.sub_layout(x.axes[dim], pos, pos + n, node) if x.axes[dim] else None
            pos += n
            items.append(TVal(x.axes[:dim] + (lay,) + x.axes[dim + 1:], shape))
        if name != "unbind" and x.axes[dim] and len(items) > 1:
            self.split_channels(node, name, x.axes[dim], [t.axes[dim] for t in items])
        return Seq(items)

    def split_channels(self, node: fx.Node, name: str, lay: Layout, pieces: list) -> None:
        """Channels split into pieces.  `chunk(cat(a, b), 2)` cuts at whole segments of the same widths: tying
        the pieces keeps them equal when they grow.  Any other split (sizes or a size written as numbers,
        `split([16, 24, 8])`) would cut at the old positions once a segment grew: the whole axis is fixed."""
        whole = set(lay)
        shapes = [tuple((s.width, s.factor) for s in p) for p in pieces]
        if name == "chunk" and all(s in whole for p in pieces for s in p) and len(set(shapes)) == 1:
            for p in pieces[1:]:
                self.tie(pieces[0], p, node.name)
            return
        self.fix(lay, f"channels split at '{node.name}' ('{name}') at positions written as numbers")

    def drop_full_slice_bounds(self, node: fx.Node, src: "TVal", idx: tuple) -> tuple:
        """`out[:, :self.out_chs]` that keeps every channel (GhostNet) is `out[:, :]` for the traced model; written
        as a number it would cut away grown channels, so the graph gets the open slice instead."""
        n_real = sum(1 for i in idx if i is not None and i is not Ellipsis)
        new, j, changed = [], 0, False
        for i in idx:
            if i is Ellipsis:
                j += len(src.shape) - n_real
            elif i is not None:
                if (isinstance(i, slice) and src.axes[j] and (i.step in (None, 1))
                        and (i.start is not None or i.stop is not None)
                        and all(isinstance(b, int) or b is None for b in (i.start, i.stop))
                        and i.indices(src.shape[j])[:2] == (0, src.shape[j])):
                    i, changed = slice(None), True
                j += 1
            new.append(i)
        if not changed:
            return idx
        node.args = (node.args[0], tuple(new) if isinstance(node.args[1], tuple) else new[0]) + tuple(node.args[2:])
        self.gm.recompile()
        return tuple(new)

    def permute(self, node: fx.Node, x: Any, name: str) -> Any:
        out_shape = tensor_shape(node)
        if not isinstance(x, TVal) or out_shape is None:
            raise Opaque(f"'{name}' at '{node.name}'")
        nd = len(x.shape)
        a = [arg for arg in node.args[1:]]
        if name == "permute":
            dims = node.kwargs.get("dims", a[0] if len(a) == 1 and isinstance(a[0], (list, tuple)) else a)
            order = [norm_dim(d, nd) for d in dims]
        elif name == "t":
            order = [1, 0] if nd == 2 else list(range(nd))
        elif name == "movedim":
            src, dst = [norm_dim(int(a[0]), nd)], [norm_dim(int(a[1]), nd)]
            rest = [i for i in range(nd) if i not in src]
            order = rest[:]
            order.insert(dst[0], src[0])
        else:
            d0, d1 = norm_dim(int(a[0]), nd), norm_dim(int(a[1]), nd)
            order = list(range(nd))
            order[d0], order[d1] = order[d1], order[d0]
        return TVal(tuple(x.axes[i] for i in order), out_shape, tuple(x.origin[i] for i in order))

    def expand(self, node: fx.Node, x: Any, name: str) -> Any:
        out_shape = tensor_shape(node)
        if not isinstance(x, TVal) or out_shape is None:
            raise Opaque(f"'{name}' at '{node.name}'")
        nd, off = len(out_shape), len(out_shape) - len(x.shape)
        axes, origin = [None] * nd, [None] * nd
        for k in range(off, nd):
            j = k - off
            if x.shape[j] == out_shape[k]:
                axes[k], origin[k] = x.axes[j], x.origin[j]
            elif x.axes[j]:
                self.fix(x.axes[j], f"channels repeated at '{node.name}'")
        return TVal(tuple(axes), out_shape, tuple(origin))

    def pool(self, node: fx.Node, x: Any, k: int) -> Any:
        if not isinstance(x, TVal):
            raise Opaque(f"pooling at '{node.name}'")
        out_shape = tensor_shape(node) or x.shape
        nd = len(x.shape)
        for ax in range(nd - k, nd):
            if x.axes[ax]:
                self.fix(x.axes[ax], f"pooling over a channel axis at '{node.name}'")
        return TVal(x.axes[: nd - k] + (None,) * k, out_shape)

    def reduce_like(self, node: fx.Node, x: Any, dims: list, keep: bool, what: str) -> Any:
        if not isinstance(x, TVal):
            raise Opaque(what)
        nd = len(x.shape)
        dims = [norm_dim(int(d), nd) for d in dims]
        for d in dims:
            if x.axes[d]:
                self.fix(x.axes[d], f"{what} at '{node.name}'")
        out_shape = tensor_shape(node) or x.shape
        if keep or len(out_shape) == nd:
            return TVal(tuple(None if i in dims and out_shape[i] == 1 else x.axes[i] for i in range(nd)), out_shape)
        return TVal(tuple(x.axes[i] for i in range(nd) if i not in dims), out_shape)
