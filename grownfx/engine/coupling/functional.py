"""Ops that keep some axes and touch others, functional layers, and leaves kept for the mode: a mixin of
`CouplingAnalysis` (issue 22's rules, beside `LayoutOps` and `ReshapeOps`).

* `flip`, `roll`, `rot90`, `pad` and the padding modules: channels on an untouched axis pass, channels on a touched
  axis are fixed;
* `F.linear(x, W, b)` with W a parameter: W's columns consume x's channels, its rows are a functional producer (a
  functional classifier is found as the head, `engine/heads.py`);
* a module kept a leaf because its forward depends on `self.training` (`engine/modes.py`): its channels pass when it
  computes each channel from the same channel alone, else it is opaque.
"""

from __future__ import annotations

from typing import Any

from torch import fx, nn

from grownfx.engine.coupling.layouts import Opaque, TVal, direct_param, nodes_in, norm_dim
from grownfx.engine.coupling.types import Binding, Seg
from grownfx.engine.modes import passes_channels
from grownfx.engine.tracing import tensor_shape

LIKE = {"zeros_like", "ones_like", "empty_like", "full_like", "rand_like", "randn_like", "randint_like"}
AXIS_OPS = {"flip", "fliplr", "flipud", "roll", "rot90", "pad", "constant_pad_nd", "reflection_pad1d",
             "reflection_pad2d", "reflection_pad3d", "replication_pad1d", "replication_pad2d", "replication_pad3d"}
PAD_MODULES = (nn.modules.padding._ConstantPadNd, nn.modules.padding._ReflectionPadNd,
                nn.modules.padding._ReplicationPadNd, nn.modules.padding._CircularPadNd)
def node_arg(node: fx.Node, i: int, key: str, default=None):
    return node.kwargs.get(key, node.args[i] if len(node.args) > i else default)


def touched_dims(node: fx.Node, name: str, nd: int) -> list | None:
    """The axes an axis op moves or pads (None: all of them, e.g. `roll` without dims flattens)."""
    if name in ("flip",):
        d = node_arg(node, 1, "dims")
        return [d] if isinstance(d, int) else list(d) if d is not None else None
    if name == "fliplr":
        return [1]
    if name == "flipud":
        return [0]
    if name == "roll":
        d = node_arg(node, 2, "dims")
        return None if d is None else [d] if isinstance(d, int) else list(d)
    if name == "rot90":
        d = node_arg(node, 2, "dims", (0, 1))
        return list(d)
    pad = node_arg(node, 1, "pad")
    if not isinstance(pad, (list, tuple)) or not all(isinstance(p, int) for p in pad):
        return None
    return list(range(nd - len(pad) // 2, nd))  # (left, right) pairs from the last axis backwards


def param_source(arg: Any) -> str | None:
    """The parameter (get_attr target) a value is computed from through ops of one tensor input each
    (`normalize(self.W)`, `self.W.t()`), or None."""
    while isinstance(arg, fx.Node):
        if arg.op == "get_attr":
            return arg.target
        if arg.op not in ("call_function", "call_method"):
            return None
        inputs = list(nodes_in(list(arg.args) + list(arg.kwargs.values())))
        if len(inputs) != 1:
            return None
        arg = inputs[0]
    return None



class FunctionalOps:
    def axis_op(self, node: fx.Node, x: Any, name: str, dims: list | None) -> Any:
        """Ops that move or pad entries along some axes and leave the others alone (`flip`, `roll`, `rot90`, `pad`):
        channels on an untouched axis pass unchanged; channels on a touched axis are fixed (reversed, rolled or
        padded channels would not stay where growth appends).  `dims` None: every axis is touched."""
        out_shape = tensor_shape(node)
        if not isinstance(x, TVal) or out_shape is None or len(out_shape) != len(x.shape):
            raise Opaque(f"'{name}' at '{node.name}'")
        nd = len(x.shape)
        touched = set(range(nd)) if dims is None else {norm_dim(int(d), nd) for d in dims}
        axes, origin = [], []
        for k in range(nd):
            lay = x.axes[k]
            if k in touched and lay:
                self.fix(lay, f"'{name}' moves channels at '{node.name}'")
                lay = self.fresh_layout(out_shape[k], node.name, f"'{name}' at '{node.name}'") \
                    if out_shape[k] != x.shape[k] else lay
            axes.append(lay)
            origin.append(x.origin[k] if k not in touched else None)
        return TVal(tuple(axes), out_shape, tuple(origin))

    def mode_leaf(self, node: fx.Node, m: nn.Module, x: TVal) -> TVal:
        """A module kept whole because its forward depends on `self.training` (`engine/modes.py`): its channels
        pass when it computes each channel from the same channel alone (a drop path), else it is opaque."""
        meta = node.args[0].meta.get("tensor_meta") if isinstance(node.args[0], fx.Node) else None
        axes = [i for i, lay in enumerate(x.axes) if lay and x.shape[i] > 1]
        if meta is not None and hasattr(meta, "dtype") and tensor_shape(node) == x.shape and \
                passes_channels(m, x.shape, axes, meta.dtype, "cpu"):
            return x
        raise Opaque(f"module '{node.target}' ({type(m).__name__}) computes differently in train and eval mode and "
                     "mixes channels (kept whole; grownfx.register_module(type, 'pass') if its channels pass)")

    def functional_linear(self, node: fx.Node, x: TVal, weight: Any, bias: Any) -> TVal:
        """`F.linear(x, W, b)`: W's columns consume x's last axis (a parameter binding: new columns 0 keep the
        function, when W is used as it is); its rows are new channels, bound as a *functional producer* ('fnout')
        so that a functional classifier (a cosine classifier's `F.linear(normalize(f), normalize(W))`) is found as
        the head.  A weight computed from activations fixes the input channels."""
        out_shape = tensor_shape(node)
        if out_shape is None:
            raise Opaque(f"linear at '{node.name}'")
        lay_in = self.ensure(x, len(x.shape) - 1, node)
        k = out_shape[-1]
        out = (Seg(self.new_var(k, f"{node.name}.out"), k),)
        src = param_source(weight)
        if src is None:
            self.fix(lay_in, f"the weight of the linear at '{node.name}' is not a parameter")
        else:
            if direct_param(weight):
                self.bindings.append(Binding(src, "param", lay_in, 1, node.name, 0.0))
            else:  # normalize(W), W * s: new columns 0 may not keep the function: the input channels stay
                self.fix(lay_in, f"the weight of the linear at '{node.name}' is computed from parameter '{src}'")
            self.bindings.append(Binding(src, "fnout", out, 0, node.name))
        bsrc = param_source(bias) if isinstance(bias, fx.Node) else None
        if bsrc is not None:
            self.bindings.append(Binding(bsrc, "fnout", out, 0, node.name))
        return TVal(x.axes[:-1] + (out,), out_shape)
