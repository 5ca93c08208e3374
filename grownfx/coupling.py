"""Step 2: channel-coupling analysis over a traced, shape-propagated graph.

Every tensor axis that carries channels gets a *layout*: an ordered list of segments, each naming a channel
*dimension variable* (created by a producing layer, a parameter, the input, or an op we cannot see through)
and a factor (`flatten` folds spatial positions into the channel axis: index = channel * factor + position).
Ops tie dimension variables together (a residual add, a depthwise conv, a norm, a squeeze-excitation
multiply); the connected components of that tie graph (networkx) are the coupling groups.

A group is growable only when every place its channels appear is understood exactly: whole segments in
natural order, consumed by conv/linear layers, normalised per channel.  Anything else (LayerNorm across
channels, channel shuffle, attention heads, an op not in the registry) ties every channel it touches into a
group marked fixed, with the reason.  Fixed groups are never resized, so conservatism is always safe.
"""

from __future__ import annotations

import math
import operator
from dataclasses import dataclass, field
from typing import Any, Iterable

import networkx as nx
import torch
from torch import fx, nn

from .tracing import tensor_shape


@dataclass(frozen=True)
class Seg:
    var: int  # dimension variable id (a node of the tie graph)
    width: int  # channels of that variable in this segment
    factor: int = 1  # trailing elements per channel on this axis (flatten -> Linear)


Layout = tuple  # tuple[Seg, ...]


def layout_size(layout: Layout) -> int:
    return sum(s.width * s.factor for s in layout)


@dataclass
class Binding:
    """One place where channels meet a resizable thing: a layer axis, a parameter axis or a graph literal."""

    target: str  # module path, parameter path (role 'param') or node name (role 'literal')
    role: str  # 'in' | 'out' | 'grouped' | 'feat' | 'param' | 'literal' | 'attn'
    layout: Layout
    axis: int = 0  # parameter axis for role 'param'; arg position for role 'literal'
    node: str = ""  # the graph node that created the binding


@dataclass
class CouplingGroup:
    """Channels that must change width together."""

    id: int
    width: int
    members: list[Binding]
    growable: bool
    granularity: int = 1
    reasons: list[str] = field(default_factory=list)  # why the group is fixed
    vars: frozenset = frozenset()

    @property
    def producers(self) -> list[Binding]:
        return [b for b in self.members if b.role in ("out", "grouped")]

    @property
    def consumers(self) -> list[Binding]:
        return [b for b in self.members if b.role in ("in", "grouped")]

    def describe(self) -> str:
        kind = "growable" if self.growable else f"fixed ({'; '.join(self.reasons[:2])})"
        return f"group {self.id}: width {self.width}, {len(self.members)} members, {kind}"


# --- abstract values -------------------------------------------------------------------------------------


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

_UNARY = {
    "relu", "relu_", "relu6", "gelu", "silu", "sigmoid", "tanh", "hardswish", "hardsigmoid", "leaky_relu",
    "elu", "selu", "celu", "mish", "softplus", "hardtanh", "dropout", "dropout1d", "dropout2d", "alpha_dropout",
    "contiguous", "clone", "detach", "float", "half", "double", "bfloat16", "to", "type", "type_as", "abs", "neg",
    "exp", "log", "sqrt", "rsqrt", "clamp", "clamp_min", "clamp_max", "clip", "stochastic_depth", "pow", "square",
    "sin", "cos", "erf", "sign", "round", "floor", "ceil", "reciprocal", "cpu", "cuda", "requires_grad_",
    "silu_", "hardswish_", "relu6_", "sigmoid_", "tanh_", "logsigmoid", "softsign", "tanhshrink", "threshold",
}
_BINARY = {"add", "sub", "mul", "truediv", "div", "iadd", "isub", "imul", "itruediv", "radd", "rsub", "rmul",
           "maximum", "minimum", "add_", "mul_", "sub_", "div_", "floordiv", "mod"}
_RESHAPE = {"view", "reshape", "flatten", "unflatten", "squeeze", "unsqueeze", "view_as", "reshape_as", "ravel"}
_PERMUTE = {"permute", "transpose", "swapaxes", "swapdims", "movedim", "t"}
_REDUCE = {"mean", "sum", "amax", "amin", "std", "var", "logsumexp", "norm", "prod"}
_SPLIT = {"chunk", "split", "tensor_split", "unbind", "split_with_sizes"}
_POOL_FN = {"adaptive_avg_pool1d": 1, "adaptive_avg_pool2d": 2, "adaptive_avg_pool3d": 3, "avg_pool1d": 1,
            "avg_pool2d": 2, "avg_pool3d": 3, "max_pool1d": 1, "max_pool2d": 2, "max_pool3d": 3,
            "adaptive_max_pool2d": 2, "interpolate": 2, "upsample": 2}
_IGNORE = {"size", "dim", "getattr", "numel", "_assert", "eq", "ne", "lt", "gt", "le", "ge", "len", "item",
           "is_floating_point", "_set_grad_enabled"}

_PASS_MODULES = (
    nn.ReLU, nn.ReLU6, nn.GELU, nn.SiLU, nn.Sigmoid, nn.Tanh, nn.Hardswish, nn.Hardsigmoid, nn.LeakyReLU, nn.ELU,
    nn.SELU, nn.CELU, nn.Mish, nn.Softplus, nn.Hardtanh, nn.Identity, nn.Dropout, nn.Dropout1d, nn.Dropout2d,
    nn.Dropout3d, nn.AlphaDropout, nn.LogSigmoid, nn.Softsign, nn.Tanhshrink,
)
_POOL_MODULES = {
    nn.MaxPool1d: 1, nn.MaxPool2d: 2, nn.MaxPool3d: 3, nn.AvgPool1d: 1, nn.AvgPool2d: 2, nn.AvgPool3d: 3,
    nn.AdaptiveAvgPool1d: 1, nn.AdaptiveAvgPool2d: 2, nn.AdaptiveAvgPool3d: 3, nn.AdaptiveMaxPool1d: 1,
    nn.AdaptiveMaxPool2d: 2, nn.AdaptiveMaxPool3d: 3, nn.Upsample: 2, nn.UpsamplingNearest2d: 2,
    nn.UpsamplingBilinear2d: 2,
}
_BN = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.SyncBatchNorm)
_IN = (nn.InstanceNorm1d, nn.InstanceNorm2d, nn.InstanceNorm3d)
_CONV = (nn.Conv1d, nn.Conv2d, nn.Conv3d)


def _name(target: Any) -> str:
    if isinstance(target, str):
        return target
    return getattr(target, "__name__", str(target))


def _is_stochastic_depth(m: nn.Module) -> bool:
    return type(m).__name__ == "StochasticDepth"


def _norm_dim(d: int, ndim: int) -> int:
    return d + ndim if d < 0 else d


class CouplingAnalysis:
    """Abstract interpretation of the graph that records dimension variables, ties and bindings."""

    def __init__(self, gm: fx.GraphModule):
        self.gm = gm
        self.modules = dict(gm.named_modules())
        self.ties = nx.Graph()
        self.bindings: list[Binding] = []
        self.values: dict[str, Any] = {}
        self.output_vars: set[int] = set()
        self.input_vars: set[int] = set()
        self.head_nodes: list[str] = []
        self._n = 0

    # -- tie graph ----------------------------------------------------------------------------------------
    def new_var(self, width: int, label: str, fixed: str | None = None, gran: int = 1) -> int:
        v = self._n
        self._n += 1
        self.ties.add_node(v, width=width, label=label, reasons=[fixed] if fixed else [], gran=gran)
        return v

    def fix(self, layout_or_vars: Iterable, reason: str) -> None:
        for x in layout_or_vars:
            v = x.var if isinstance(x, Seg) else x
            self.ties.nodes[v]["reasons"].append(reason)

    def tie(self, a: Layout, b: Layout, where: str) -> None:
        """Channels of layouts `a` and `b` are the same channels (residual add, norm, ...)."""
        if len(a) == len(b) and all(x.width == y.width and x.factor == y.factor for x, y in zip(a, b)):
            for x, y in zip(a, b):
                self.ties.add_edge(x.var, y.var, via=where)
            return
        vars_ = [s.var for s in a] + [s.var for s in b]
        for u, w in zip(vars_, vars_[1:]):
            self.ties.add_edge(u, w, via=where)
        self.fix(vars_, f"channels of different layouts meet at '{where}'")

    def fresh_layout(self, size: int, label: str, reason: str) -> Layout:
        return (Seg(self.new_var(size, label, fixed=reason), size),)

    def ensure(self, val: TVal, axis: int, node: fx.Node) -> Layout:
        """The layout of `axis`, creating a fixed dimension variable for channels we did not track."""
        lay = val.axes[axis]
        if lay is None:
            lay = self.fresh_layout(val.shape[axis], f"{node.name}.untracked", f"untracked channels at '{node.name}'")
        return lay

    def bind(self, target: str, role: str, layout: Layout, node: fx.Node, axis: int = 0) -> None:
        self.bindings.append(Binding(target, role, layout, axis, node.name))

    # -- walk ---------------------------------------------------------------------------------------------
    def run(self) -> "CouplingResult":
        for node in self.gm.graph.nodes:
            try:
                self.values[node.name] = self.visit(node)
            except _Opaque as op:
                self.values[node.name] = self.opaque(node, str(op))
        return self.finish()

    def val(self, a: Any) -> Any:
        if isinstance(a, fx.Node):
            return self.values.get(a.name, OTHER)
        if isinstance(a, (list, tuple)):
            return Seq([self.val(x) for x in a])
        return OTHER

    def tensors_in(self, obj: Any) -> list[TVal]:
        out: list[TVal] = []

        def walk(x):
            if isinstance(x, TVal):
                out.append(x)
            elif isinstance(x, Seq):
                for y in x.items:
                    walk(y)

        walk(obj)
        return out

    def from_meta(self, node: fx.Node, axes_fn) -> Any:
        meta = node.meta.get("tensor_meta")
        if meta is None:
            return OTHER
        if hasattr(meta, "shape"):
            shape = tuple(int(s) for s in meta.shape)
            return axes_fn(shape)
        return OTHER

    def opaque(self, node: fx.Node, reason: str) -> Any:
        ins = self.tensors_in(self.val(list(node.args) + list(node.kwargs.values())))
        vars_ = [s.var for t in ins for lay in t.axes if lay for s in lay]
        for u, w in zip(vars_, vars_[1:]):
            self.ties.add_edge(u, w, via=node.name)
        self.fix(vars_, reason)
        anchor = vars_[0] if vars_ else None

        def mk(shape):
            axes = []
            for i, n in enumerate(shape):
                if anchor is None or i == 0 or n <= 1:
                    axes.append(None)
                else:
                    v = self.new_var(n, f"{node.name}.{i}", fixed=reason)
                    self.ties.add_edge(anchor, v, via=node.name)
                    axes.append((Seg(v, n),))
            return TVal(tuple(axes), shape)

        meta = node.meta.get("tensor_meta")
        if meta is None:
            return OTHER
        if hasattr(meta, "shape"):
            return mk(tuple(int(s) for s in meta.shape))
        if isinstance(meta, (list, tuple)):
            return Seq([mk(tuple(int(s) for s in m.shape)) if hasattr(m, "shape") else OTHER for m in meta])
        return OTHER

    def visit(self, node: fx.Node) -> Any:
        if node.op == "placeholder":
            return self.from_meta(node, lambda shape: TVal(
                tuple(None if i == 0 else (Seg(self.new_var(n, f"input.{i}", fixed="touches the network input"), n),)
                      for i, n in enumerate(shape)), shape))
        if node.op == "get_attr":
            return self.from_meta(node, lambda shape: TVal((None,) * len(shape), shape,
                                                           tuple((node.target, i) for i in range(len(shape)))))
        if node.op == "output":
            for t in self.tensors_in(self.val(node.args[0])):
                for lay in t.axes:
                    for s in lay or ():
                        self.output_vars.add(s.var)
            return OTHER
        if node.op == "call_module":
            return self.visit_module(node, self.modules[node.target])
        name = _name(node.target)
        if node.op == "call_function" and node.target is operator.getitem:
            return self.getitem(node)
        if name in _IGNORE or not self.tensors_in(self.val(list(node.args) + list(node.kwargs.values()))):
            return self.from_meta(node, lambda shape: TVal((None,) * len(shape), shape))
        return self.visit_function(node, name)

    # -- modules ------------------------------------------------------------------------------------------
    def visit_module(self, node: fx.Node, m: nn.Module) -> Any:
        x = self.val(node.args[0]) if node.args else OTHER
        if isinstance(m, _PASS_MODULES) or _is_stochastic_depth(m):
            return x
        if isinstance(m, tuple(_POOL_MODULES)):
            return self.pool(node, x, _POOL_MODULES[type(m)] if type(m) in _POOL_MODULES else 2)
        if isinstance(m, nn.Flatten):
            return self.reshape(node, x)
        if not isinstance(x, TVal):
            raise _Opaque(f"module '{node.target}' ({type(m).__name__}) takes no single tensor")
        if isinstance(m, _CONV):
            return self.conv(node, m, x)
        if isinstance(m, nn.Linear):
            lay_in = self.ensure(x, -1 % len(x.shape), node)
            self.bind(node.target, "in", lay_in, node)
            out = (Seg(self.new_var(m.out_features, f"{node.target}.out"), m.out_features),)
            self.bind(node.target, "out", out, node)
            return TVal(x.axes[:-1] + (out,), x.shape[:-1] + (m.out_features,))
        if isinstance(m, _BN + _IN):
            lay = self.ensure(x, 1, node)
            self.bind(node.target, "feat", lay, node)
            return TVal(x.axes[:1] + (lay,) + x.axes[2:], x.shape, x.origin)
        if isinstance(m, nn.GroupNorm):
            lay = self.ensure(x, 1, node)
            self.bind(node.target, "feat", lay, node)
            if len(lay) == 1 and lay[0].factor == 1:
                self.ties.nodes[lay[0].var]["gran"] = _lcm(self.ties.nodes[lay[0].var]["gran"],
                                                           m.num_channels // m.num_groups)
            else:
                self.fix(lay, f"GroupNorm '{node.target}' over several channel groups")
            return TVal(x.axes[:1] + (lay,) + x.axes[2:], x.shape, x.origin)
        if isinstance(m, nn.LayerNorm):
            k = len(m.normalized_shape)
            for ax in range(len(x.shape) - k, len(x.shape)):
                if x.axes[ax]:
                    self.fix(x.axes[ax], f"LayerNorm '{node.target}' normalises across channels")
            if k == 1:
                self.bind(node.target, "feat", self.ensure(x, len(x.shape) - 1, node), node)
            return x
        if isinstance(m, (nn.Softmax, nn.LogSoftmax, nn.Softmin)):
            dim = m.dim if m.dim is not None else -1
            return self.reduce_like(node, x, [dim], keep=True, what=f"softmax '{node.target}'")
        if isinstance(m, nn.MultiheadAttention):
            ins = [self.val(a) for a in node.args[:3]]
            lays = [self.ensure(t, len(t.shape) - 1, node) for t in ins if isinstance(t, TVal)]
            for lay in lays[1:]:
                self.tie(lays[0], lay, node.name)
            self.fix(lays[0], f"attention '{node.target}' splits channels into heads")
            self.bind(node.target, "attn", lays[0], node)
            out = TVal(x.axes, x.shape, ())
            return Seq([out, OTHER])
        raise _Opaque(f"module '{node.target}' ({type(m).__name__}) is not in the coupling registry")

    def conv(self, node: fx.Node, m: nn.Module, x: TVal) -> TVal:
        lay_in = self.ensure(x, 1, node)
        nsp = len(x.shape) - 2
        out_shape = tensor_shape(node) or ()
        spatial_none = (None,) * nsp
        if m.groups == 1:
            self.bind(node.target, "in", lay_in, node)
            out = (Seg(self.new_var(m.out_channels, f"{node.target}.out"), m.out_channels),)
            self.bind(node.target, "out", out, node)
            return TVal((None, out) + spatial_none, out_shape)
        per_group = m.in_channels // m.groups
        if m.in_channels == m.out_channels and len(lay_in) == 1 and lay_in[0].factor == 1:
            v = lay_in[0].var
            self.ties.nodes[v]["gran"] = _lcm(self.ties.nodes[v]["gran"], per_group)
            self.bind(node.target, "grouped", lay_in, node)
            return TVal((None, lay_in) + spatial_none, out_shape)
        self.fix(lay_in, f"grouped conv '{node.target}' with {m.in_channels}->{m.out_channels} channels")
        out = (Seg(self.new_var(m.out_channels, f"{node.target}.out", fixed=f"grouped conv '{node.target}'"),
                   m.out_channels),)
        self.ties.add_edge(lay_in[0].var, out[0].var, via=node.name)
        self.bind(node.target, "grouped", lay_in, node)
        return TVal((None, out) + spatial_none, out_shape)

    # -- functions ----------------------------------------------------------------------------------------
    def visit_function(self, node: fx.Node, name: str) -> Any:
        args = node.args
        x = self.val(args[0]) if args else OTHER
        if name in _UNARY:
            return x if isinstance(x, TVal) else self.elementwise(node)
        if name in _BINARY or name in ("where", "addcmul", "lerp"):
            return self.elementwise(node)
        if name in ("cat", "concat", "concatenate", "stack"):
            return self.cat(node, name == "stack")
        if name in _RESHAPE:
            return self.reshape(node, x)
        if name in ("expand", "expand_as", "broadcast_to", "repeat"):
            return self.expand(node, x, name)
        if name in _PERMUTE:
            return self.permute(node, x, name)
        if name in _SPLIT:
            return self.split(node, x, name)
        if name in _REDUCE:
            dims = node.kwargs.get("dim", args[1] if len(args) > 1 else None)
            keep = bool(node.kwargs.get("keepdim", args[2] if len(args) > 2 else False))
            if dims is None:
                dims = list(range(len(x.shape)))
            dims = [dims] if isinstance(dims, int) else list(dims)
            return self.reduce_like(node, x, dims, keep=keep, what=f"'{name}' over a channel axis")
        if name in ("softmax", "log_softmax", "softmin", "cumsum", "cumprod", "argsort", "sort"):
            dim = node.kwargs.get("dim", args[1] if len(args) > 1 else -1)
            return self.reduce_like(node, x, [dim], keep=True, what=f"'{name}' along a channel axis")
        if name in _POOL_FN and isinstance(x, TVal):
            return self.pool(node, x, _POOL_FN[name])
        if name == "layer_norm" and isinstance(x, TVal):
            shape = node.kwargs.get("normalized_shape", args[1] if len(args) > 1 else None)
            k = len(shape) if isinstance(shape, (list, tuple)) else 1
            for ax in range(len(x.shape) - k, len(x.shape)):
                if x.axes[ax]:
                    self.fix(x.axes[ax], f"layer_norm at '{node.name}' normalises across channels")
            return self.passthrough_with_params(node, x)
        raise _Opaque(f"'{name}' at node '{node.name}' is not in the coupling registry")

    def passthrough_with_params(self, node: fx.Node, x: TVal) -> TVal:
        """Ops like layer_norm(x, shape, weight, bias): parameters bind to the last axis."""
        return TVal(x.axes, tensor_shape(node) or x.shape)

    def elementwise(self, node: fx.Node) -> Any:
        out_shape = tensor_shape(node)
        if out_shape is None:
            return OTHER
        nd = len(out_shape)
        operands = [self.val(a) for a in list(node.args) + list(node.kwargs.values())]
        ts = [t for t in operands if isinstance(t, TVal)]
        axes: list = [None] * nd
        origin: list = [None] * nd
        for k in range(nd):
            entries = []
            for t in ts:
                j = k - (nd - len(t.shape))
                if j >= 0 and t.shape[j] > 1:
                    entries.append((t.axes[j], t.origin[j]))
            lays = [lay for lay, _ in entries if lay is not None]
            if lays:
                for lay in lays[1:]:
                    self.tie(lays[0], lay, node.name)
                axes[k] = lays[0]
                for lay, org in entries:
                    if lay is None and org is not None:
                        self.bindings.append(Binding(org[0], "param", lays[0], org[1], node.name))
                    elif lay is None:
                        self.fix(lays[0], f"channels combined with an untracked tensor at '{node.name}'")
            elif len(entries) == 1 or (entries and all(o == entries[0][1] for _, o in entries)):
                origin[k] = entries[0][1] if entries else None
        return TVal(tuple(axes), out_shape, tuple(origin))

    def cat(self, node: fx.Node, stack: bool) -> Any:
        items = self.val(node.args[0])
        out_shape = tensor_shape(node)
        if not isinstance(items, Seq) or out_shape is None:
            raise _Opaque(f"cat at '{node.name}' of unknown inputs")
        ts = [t for t in items.items if isinstance(t, TVal)]
        if len(ts) != len(items.items):
            raise _Opaque(f"cat at '{node.name}' mixes tensors and other values")
        dim = node.kwargs.get("dim", node.args[1] if len(node.args) > 1 else 0)
        dim = _norm_dim(dim, len(out_shape))
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
            lays = [t.axes[j] for t in ts if t.axes[j] is not None and t.shape[j] > 1]
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
        if not isinstance(src, TVal):
            return OTHER
        out_shape = tensor_shape(node)
        if out_shape is None:
            return OTHER
        idx = idx if isinstance(idx, tuple) else (idx,)
        if any(isinstance(i, fx.Node) or isinstance(i, (list, torch.Tensor)) for i in idx):
            raise _Opaque(f"advanced indexing at '{node.name}'")
        n_real = sum(1 for i in idx if i is not None and i is not Ellipsis)
        expanded: list = []
        for i in idx:
            if i is Ellipsis:
                expanded.extend([slice(None)] * (len(src.shape) - n_real))
            else:
                expanded.append(i)
        expanded.extend([slice(None)] * (len(src.shape) - sum(1 for i in expanded if i is not None)))
        axes, origin, j = [], [], 0
        for i in expanded:
            if i is None:
                axes.append(None)
                origin.append(None)
                continue
            lay, org, n = src.axes[j], src.origin[j], src.shape[j]
            j += 1
            if isinstance(i, int):
                if lay:
                    self.fix(lay, f"a single channel is picked at '{node.name}'")
                continue
            start, stop, step = i.indices(n)
            if lay and (step != 1 or (start, stop) != (0, n)):
                if step != 1:
                    self.fix(lay, f"strided channel slice at '{node.name}'")
                    lay = self.fresh_layout(len(range(start, stop, step)), node.name, "strided slice")
                else:
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
            raise _Opaque(f"'{name}' at '{node.name}'")
        dim = node.kwargs.get("dim", node.args[2] if len(node.args) > 2 else 0)
        if name == "unbind":
            dim = node.kwargs.get("dim", node.args[1] if len(node.args) > 1 else 0)
        dim = _norm_dim(dim, len(x.shape))
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
        return Seq(items)

    def permute(self, node: fx.Node, x: Any, name: str) -> Any:
        out_shape = tensor_shape(node)
        if not isinstance(x, TVal) or out_shape is None:
            raise _Opaque(f"'{name}' at '{node.name}'")
        nd = len(x.shape)
        a = [arg for arg in node.args[1:]]
        if name == "permute":
            dims = node.kwargs.get("dims", a[0] if len(a) == 1 and isinstance(a[0], (list, tuple)) else a)
            order = [_norm_dim(d, nd) for d in dims]
        elif name == "t":
            order = [1, 0] if nd == 2 else list(range(nd))
        elif name == "movedim":
            src, dst = [_norm_dim(int(a[0]), nd)], [_norm_dim(int(a[1]), nd)]
            rest = [i for i in range(nd) if i not in src]
            order = rest[:]
            order.insert(dst[0], src[0])
        else:
            d0, d1 = _norm_dim(int(a[0]), nd), _norm_dim(int(a[1]), nd)
            order = list(range(nd))
            order[d0], order[d1] = order[d1], order[d0]
        return TVal(tuple(x.axes[i] for i in order), out_shape, tuple(x.origin[i] for i in order))

    def reshape(self, node: fx.Node, x: Any) -> Any:
        out_shape = tensor_shape(node)
        if not isinstance(x, TVal) or out_shape is None:
            raise _Opaque(f"reshape at '{node.name}' of an unknown value")
        blocks = _reshape_blocks(x.shape, out_shape)
        if blocks is None:
            raise _Opaque(f"reshape at '{node.name}' from {x.shape} to {out_shape}")
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
            raise _Opaque(f"reshape at '{node.name}' splits or interleaves channels ({x.shape} -> {out_shape})")
        for i, n in enumerate(x.shape):
            if n == 1 and x.axes[i] and all(i not in b[0] for b in blocks):
                self.fix(x.axes[i], f"a one-channel axis is squeezed at '{node.name}'")
        self.literal_bindings(node, out_shape, axes)
        return TVal(tuple(axes), out_shape, tuple(origin))

    def literal_bindings(self, node: fx.Node, out_shape: tuple, axes: list) -> None:
        """`x.reshape(n, 768, -1)`: a width written into the graph must follow the channels it counts."""
        if _name(node.target) not in ("view", "reshape"):
            return
        args = list(node.args[1:])
        if len(args) == 1 and isinstance(args[0], (list, tuple)):
            args = list(args[0])
        if len(args) != len(out_shape):
            return
        for k, a in enumerate(args):
            if isinstance(a, int) and a == out_shape[k] and axes[k] and a > 1:
                self.bindings.append(Binding(node.name, "literal", axes[k], k, node.name))

    def expand(self, node: fx.Node, x: Any, name: str) -> Any:
        out_shape = tensor_shape(node)
        if not isinstance(x, TVal) or out_shape is None:
            raise _Opaque(f"'{name}' at '{node.name}'")
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
            raise _Opaque(f"pooling at '{node.name}'")
        out_shape = tensor_shape(node) or x.shape
        nd = len(x.shape)
        for ax in range(nd - k, nd):
            if x.axes[ax]:
                self.fix(x.axes[ax], f"pooling over a channel axis at '{node.name}'")
        return TVal(x.axes[: nd - k] + (None,) * k, out_shape)

    def reduce_like(self, node: fx.Node, x: Any, dims: list, keep: bool, what: str) -> Any:
        if not isinstance(x, TVal):
            raise _Opaque(what)
        nd = len(x.shape)
        dims = [_norm_dim(int(d), nd) for d in dims]
        for d in dims:
            if x.axes[d]:
                self.fix(x.axes[d], f"{what} at '{node.name}'")
        out_shape = tensor_shape(node) or x.shape
        if keep or len(out_shape) == nd:
            return TVal(tuple(None if i in dims and out_shape[i] == 1 else x.axes[i] for i in range(nd)), out_shape)
        return TVal(tuple(x.axes[i] for i in range(nd) if i not in dims), out_shape)

    # -- result -------------------------------------------------------------------------------------------
    def finish(self) -> "CouplingResult":
        groups: list[CouplingGroup] = []
        var_group: dict[int, int] = {}
        for vars_ in sorted(nx.connected_components(self.ties), key=min):
            gid = len(groups)
            for v in vars_:
                var_group[v] = gid
            data = [self.ties.nodes[v] for v in vars_]
            reasons = sorted({r for d in data for r in d["reasons"]})
            if vars_ & self.output_vars:
                reasons.insert(0, "touches the logits")
            widths = {d["width"] for d in data}
            groups.append(CouplingGroup(gid, max(widths), [], False, _lcm(*[d["gran"] for d in data]), reasons,
                                        frozenset(vars_)))
            if len(widths) > 1:
                groups[-1].reasons.append(f"members of different widths {sorted(widths)}")
        for b in self.bindings:
            gids = []
            for s in b.layout:
                g = var_group[s.var]
                if g not in gids:
                    gids.append(g)
            for g in gids:
                groups[g].members.append(b)
        for g in groups:
            if not g.producers and not g.reasons:
                g.reasons.append("no layer produces these channels")
            if any(b.role == "attn" for b in g.members) and not g.reasons:
                g.reasons.append("attention embedding")
            g.growable = not g.reasons and g.width % g.granularity == 0
        return CouplingResult(self.gm, groups, var_group, self.ties, self.bindings, self.output_vars)


class _Opaque(Exception):
    pass


def _lcm(*xs: int) -> int:
    out = 1
    for x in xs:
        out = out * x // math.gcd(out, x)
    return out


def _reshape_blocks(a: tuple, b: tuple) -> list | None:
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


@dataclass
class CouplingResult:
    gm: fx.GraphModule
    groups: list[CouplingGroup]
    var_group: dict[int, int]
    ties: nx.Graph
    bindings: list[Binding]
    output_vars: set

    def group_of(self, seg: Seg) -> CouplingGroup:
        return self.groups[self.var_group[seg.var]]

    @property
    def growable(self) -> list[CouplingGroup]:
        return [g for g in self.groups if g.growable]

    def head_targets(self) -> list[str]:
        """Modules that produce the logits: they become one head per task."""
        out = []
        for b in self.bindings:
            if b.role == "out" and any(s.var in self.output_vars or self.var_group[s.var] in self._logit_groups()
                                       for s in b.layout):
                if b.target not in out:
                    out.append(b.target)
        return out

    def _logit_groups(self) -> set:
        return {self.var_group[v] for v in self.output_vars}

    def dim_graph(self) -> nx.Graph:
        """The tie graph with readable node labels, for inspection and docs."""
        return nx.relabel_nodes(self.ties, {v: d["label"] for v, d in self.ties.nodes(data=True)}, copy=True)


def analyze(gm: fx.GraphModule) -> CouplingResult:
    """Find the coupling groups of a traced, shape-propagated GraphModule."""
    return CouplingAnalysis(gm).run()
