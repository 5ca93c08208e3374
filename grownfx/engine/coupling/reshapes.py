"""How channel layouts move through `view` / `reshape` (a mixin of `CouplingAnalysis`, beside `LayoutOps`).

A reshape keeps a channel axis when it maps to one output axis (flattening trailing positions into it multiplies
its factor); anything that splits or interleaves channels raises `Opaque`.  Widths written into a reshape's
arguments become literal bindings (they follow the channels), and widths read from another tensor's shape tie
the two groups.
"""

from __future__ import annotations

import math
from typing import Any

from torch import fx

from grownfx.engine.coupling.layouts import Opaque, TVal, Width, op_name
from grownfx.engine.coupling.types import Binding, Seg
from grownfx.engine.tracing import tensor_shape


def reshape_blocks(a: tuple, b: tuple) -> list | None:
    """Split a reshape into blocks of input axes and output axes with equal products (size-1 axes dropped)."""
    A = [(i, n) for i, n in enumerate(a) if n != 1]
    B = [(i, n) for i, n in enumerate(b) if n != 1]
    blocks, i, j = [], 0, 0
    while i < len(A) and j < len(B):
        ins, outs = [A[i][0]], [B[j][0]]
        pa, pb = A[i][1], B[j][1]
        i += 1
        j += 1
        while pa != pb:
            if pa < pb:
                if i >= len(A):
                    return None
                ins.append(A[i][0])
                pa *= A[i][1]
                i += 1
            else:
                if j >= len(B):
                    return None
                outs.append(B[j][0])
                pb *= B[j][1]
                j += 1
        blocks.append((ins, outs))
    if i != len(A) or j != len(B):
        return None
    return blocks


def size_args(node: fx.Node) -> list:
    """The sizes a `view` / `reshape` node is given: `x.view(a, b)` and `x.view((a, b))` alike."""
    args = list(node.args[1:])
    if len(args) == 1 and isinstance(args[0], (list, tuple)):
        args = list(args[0])
    return args


class ReshapeOps:
    def reshape(self, node: fx.Node, x: Any) -> Any:
        out_shape = tensor_shape(node)
        if not isinstance(x, TVal) or out_shape is None:
            raise Opaque(f"reshape at '{node.name}' of an unknown value")
        blocks = reshape_blocks(x.shape, out_shape)
        if blocks is None:
            raise Opaque(f"reshape at '{node.name}' from {x.shape} to {out_shape}")
        axes: list = [None] * len(out_shape)
        origin: list = [None] * len(out_shape)
        for ins, outs in blocks:
            lays = [(i, x.axes[i]) for i in ins if x.axes[i]]
            if len(ins) == 1 and len(outs) == 1:
                axes[outs[0]], origin[outs[0]] = x.axes[ins[0]], x.origin[ins[0]]
                continue
            if not lays:
                continue
            if len(outs) == 1 and len(lays) == 1 and lays[0][0] == ins[0]:
                inner = math.prod(x.shape[i] for i in ins[1:])
                axes[outs[0]] = tuple(Seg(s.var, s.width, s.factor * inner) for s in lays[0][1])
                continue
            if len(outs) == 2 and len(ins) == 1 and self.channels_into_parts(x.axes[ins[0]], out_shape, outs, axes,
                                                                             node):
                continue
            raise Opaque(f"reshape at '{node.name}' splits or interleaves channels ({x.shape} -> {out_shape})")
        for i, n in enumerate(x.shape):
            if n == 1 and x.axes[i] and all(i not in b[0] for b in blocks):
                self.fix(x.axes[i], f"a one-channel axis is squeezed at '{node.name}'")
        self.literal_bindings(node, out_shape, axes)
        self.width_ties(node, out_shape, axes)
        return TVal(tuple(axes), out_shape, tuple(origin))

    def channels_into_parts(self, lay, out_shape: tuple, outs: list, axes: list, node: fx.Node) -> bool:
        """`x.view(B, k, C // k, H, W)` (SKNet's and ResNeSt's attention over k paths): the channels are k parts
        of C // k, part i the i-th run of channels.  The parts are cut apart (variables refined) and tied, so they
        grow alike; the k axis carries no channels and the second axis has part 0's layout.  False (the caller
        fixes them) when the parts cannot be whole, equal segments."""
        k, w = out_shape[outs[0]], out_shape[outs[1]]
        pieces = self.cut_layout(lay, [w] * k) if k > 1 else None
        if pieces is None or any([s.width for s in p] != [s.width for s in pieces[0]] for p in pieces):
            return False
        for p in pieces[1:]:
            self.tie(pieces[0], p, node.name)
        axes[outs[1]] = pieces[0]
        return True

    def width_ties(self, node: fx.Node, out_shape: tuple, axes: list) -> None:
        """`y.reshape(B, N, C)` with C read from another tensor's shape (timm's PVT: `C` of the residual stream
        shapes the attention's output): the two counts must stay equal, so their channels are tied (one group;
        fixed with the other if that one is)."""
        args = size_args(node) if op_name(node.target) in ("view", "reshape") else None
        if args is None or len(args) != len(out_shape):
            return
        for k, a in enumerate(args):
            w = self.values.get(a.name) if isinstance(a, fx.Node) else None
            if not isinstance(w, Width):
                continue
            if axes[k] and len(w.layouts) == 1 and self.expand_layout(w.layouts[0]) != self.expand_layout(axes[k]):
                self.tie(w.layouts[0], axes[k], node.name)
            elif len(w.layouts) != 1 or not axes[k]:
                for lay in w.layouts + ((axes[k],) if axes[k] else ()):
                    self.fix(lay, f"a channel count read at '{w.source}' shapes other channels at '{node.name}'")

    def param_literals(self, arg: Any, org: tuple, lay: tuple) -> None:
        """`x * self.scale.view(320, 1, 1)` (timm's Scale): a width written where the parameter is reshaped on its
        way to the channels follows the channels too (a literal binding, like a view of the channels)."""
        while isinstance(arg, fx.Node) and arg.op in ("call_function", "call_method") and arg.args:
            v = self.values.get(arg.name)
            if op_name(arg.target) in ("view", "reshape") and isinstance(v, TVal) and org in v.origin:
                k = v.origin.index(org)
                args = size_args(arg)
                if len(args) == len(v.shape) and isinstance(args[k], int) and args[k] == v.shape[k] > 1:
                    self.bindings.append(Binding(arg.name, "literal", lay, k, arg.name))
            arg = arg.args[0]

    def literal_bindings(self, node: fx.Node, out_shape: tuple, axes: list) -> None:
        """`x.reshape(n, 768, -1)`: a width written into the graph must follow the channels it counts."""
        args = size_args(node) if op_name(node.target) in ("view", "reshape") else None
        if args is None or len(args) != len(out_shape):
            return
        for k, a in enumerate(args):
            if isinstance(a, int) and a == out_shape[k] and axes[k] and a > 1:
                # resized with the group: in a plain graph the number is rewritten; in a task-aware one it
                # becomes a per-task value (rewrite.make_literals_task_aware), the width each task sees
                self.bindings.append(Binding(node.name, "literal", axes[k], k, node.name))
