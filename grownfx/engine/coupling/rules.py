"""Which ops tie channels and which fix them: the op registry of the coupling analysis."""

from __future__ import annotations

import math
import operator
from typing import Any, Iterable

import networkx as nx
from torch import fx, nn

from grownfx.engine.tracing import (head_attention_kind, is_plain_group_norm, layer_kind, layer_norm_axis,
                                    tensor_shape)
from grownfx.engine.coupling.custom import RegisteredOps
from grownfx.engine.coupling.functional import AXIS_OPS, LIKE, PAD_MODULES, FunctionalOps, node_arg, touched_dims
from grownfx.engine.coupling.layouts import OTHER, LayoutOps, Opaque, Seq, TVal, Width, direct_param, nodes_in, op_name
from grownfx.engine.coupling.reshapes import ReshapeOps
from grownfx.engine.coupling.refine import Refinement
from grownfx.engine.coupling.types import Binding, CouplingGroup, CouplingResult, Layout, Seg
from grownfx.engine.faithful import autograd_function_of

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
            "adaptive_max_pool2d": 2, "interpolate": 2, "upsample": 2,
            "pool_to_min_size": 2}  # tracing.pool_to_min_size: adaptive_avg_pool2d where the input is small
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


def is_stochastic_depth(m: nn.Module) -> bool:
    return type(m).__name__ == "StochasticDepth"


class CouplingAnalysis(RegisteredOps, LayoutOps, ReshapeOps, FunctionalOps, Refinement):
    """Abstract interpretation of the graph that records dimension variables, ties and bindings."""
    """Abstract interpretation of the graph that records dimension variables, ties and bindings."""

    def __init__(self, gm: fx.GraphModule):
        self.gm = gm
        self.modules = dict(gm.named_modules())
        self.ties = nx.Graph()
        self.bindings: list[Binding] = []
        self.opaque_params: list[tuple[str, str]] = []  # (a parameter an opaque op reads, why it is opaque)
        self.values: dict[str, Any] = {}
        self.output_vars: set[int] = set()
        self.input_vars: set[int] = set()
        self.head_nodes: list[str] = []
        self.output_axes: tuple = ()  # the logits' layout per axis
        self.mode_leaves = set(getattr(gm, "mode_leaves", ()))  # leaves because their forward depends on the mode
        self._n = 0

    # -- tie graph ----------------------------------------------------------------------------------------
    def new_var(self, width: int, label: str, fixed: str | None = None, gran: int = 1) -> int:
        v = self._n
        self._n += 1
        self.ties.add_node(v, width=width, label=label, reasons=[fixed] if fixed else [], gran=gran)
        return v

    def fix(self, layout_or_vars: Iterable, reason: str) -> None:
        for v in self.fix_targets(layout_or_vars):
            self.ties.nodes[v]["reasons"].append(reason)

    def tie(self, a: Layout, b: Layout, where: str) -> None:
        """Channels of layouts `a` and `b` are the same channels (residual add, norm, ...)."""
        a, b = self.expand_layout(a), self.expand_layout(b)
        if len(a) == len(b) and all(x.width == y.width and x.factor == y.factor for x, y in zip(a, b)):
            for x, y in zip(a, b):
                self.ties.add_edge(x.var, y.var, via=where)
            return
        if self.refine_tie(a, b, where):  # the same channels cut differently (GhostNet's cat + shortcut)
            return
        if self.factor_tie(a, b, where):  # a channel multiplier's output meets one variable (FastViT)
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

    def bind(self, target: str, role: str, layout: Layout, node: fx.Node, axis: int = 0, per: int = 1) -> None:
        self.bindings.append(Binding(target, role, layout, axis, node.name, per=per))

    # -- walk ---------------------------------------------------------------------------------------------
    def run(self) -> "CouplingResult":
        for node in self.gm.graph.nodes:
            try:
                self.values[node.name] = self.visit(node)
            except Opaque as op:
                self.values[node.name] = self.opaque(node, str(op))
        return self.finish()

    def val(self, a: Any) -> Any:
        if isinstance(a, fx.Node):
            return self.expand_value(self.values.get(a.name, OTHER))
        if isinstance(a, (list, tuple)):
            return Seq([self.val(x) for x in a])
        return OTHER

    def widths_in(self, args: Any) -> list:
        return [v for a in nodes_in(args) if isinstance(v := self.values.get(a.name), Width)]

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
        """An op the analysis cannot see through: every channel it reads is fixed, and every axis of its output
        (but the batch) is new, fixed channels.  Nothing is tied: fixed channels never change, so ties would only
        merge unrelated groups (and spatial axes with channels) under one reason."""
        ins = self.tensors_in(self.val(list(node.args) + list(node.kwargs.values())))
        vars_ = [s.var for t in ins for lay in t.axes if lay for s in lay]
        # a channel count read from a shape and given to an op we cannot follow (a reshape that splits heads with
        # `C` of another tensor): the channels it counts are fixed with the op's
        vars_ += [s.var for w in self.widths_in(list(node.args) + list(node.kwargs.values()))
                  for lay in w.layouts for s in self.expand_layout(lay)]
        self.fix(vars_, reason)
        # a layer's own parameter read here too: its layer's channels are fixed with the op (finish)
        self.opaque_params += [(o[0], reason) for t in ins for o in t.origin if o]
        tracked = bool(vars_)

        def mk(shape, batch):
            batch = (0,) if batch is None else batch  # axes that follow the batch size (tracing's batch_axes)
            axes = []
            for i, n in enumerate(shape):
                if not tracked or i in batch or n <= 1:
                    axes.append(None)
                else:
                    axes.append((Seg(self.new_var(n, f"{node.name}.{i}", fixed=reason), n),))
            return TVal(tuple(axes), shape)

        meta, batch = node.meta.get("tensor_meta"), node.meta.get("batch_axes")
        if meta is None:
            return OTHER
        if hasattr(meta, "shape"):
            return mk(tuple(int(s) for s in meta.shape), batch if isinstance(batch, tuple) else None)
        if isinstance(meta, (list, tuple)):
            per = batch if isinstance(batch, list) and len(batch) == len(meta) else [None] * len(meta)
            return Seq([mk(tuple(int(s) for s in m.shape), b if isinstance(b, tuple) else None)
                        if hasattr(m, "shape") else OTHER for m, b in zip(meta, per)])
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
            outs = self.tensors_in(self.val(node.args[0]))
            for t in outs:
                for lay in t.axes:
                    for s in lay or ():
                        self.output_vars.add(s.var)
            self.output_axes = outs[0].axes if len(outs) == 1 else ()
            return OTHER
        name = op_name(node.target)
        self.check_width_uses(node, "getitem" if node.target is operator.getitem else name)
        registered = self.registered_rule(node)
        if registered is not None:
            return self.apply_registered(node, *registered)
        if node.op == "call_module":
            return self.visit_module(node, self.modules[node.target])
        if node.op == "call_function" and node.target is operator.getitem:
            return self.getitem(node)
        read = self.shape_read(node, name)
        if read is not None:
            return read
        if name in _IGNORE or not self.tensors_in(self.val(list(node.args) + list(node.kwargs.values()))):
            return self.from_meta(node, lambda shape: TVal((None,) * len(shape), shape))
        return self.visit_function(node, name)

    # -- modules ------------------------------------------------------------------------------------------
    def visit_module(self, node: fx.Node, m: nn.Module) -> Any:
        x = self.val(node.args[0]) if node.args else OTHER
        if isinstance(m, _PASS_MODULES) or is_stochastic_depth(m):
            return x
        if node.target in self.mode_leaves and isinstance(x, TVal) and len(node.args) == 1 and not node.kwargs:
            return self.mode_leaf(node, m, x)
        if isinstance(m, tuple(_POOL_MODULES)):
            return self.pool(node, x, _POOL_MODULES[type(m)] if type(m) in _POOL_MODULES else 2)
        if isinstance(m, nn.Flatten):
            return self.reshape(node, x)
        if isinstance(m, PAD_MODULES) and isinstance(x, TVal):
            return self.axis_op(node, x, type(m).__name__, list(range(len(x.shape) - len(m.padding) // 2,
                                                                      len(x.shape))))
        if not isinstance(x, TVal):
            raise Opaque(f"module '{node.target}' ({type(m).__name__}) takes no single tensor")
        heads = head_attention_kind(m)
        if heads is not None:
            return self.head_attention(node, m, x, heads)
        kind = layer_kind(m)
        if kind == "other":
            raise Opaque(f"layer subclass '{node.target}' ({type(m).__name__}) computes from more than its weight")
        if isinstance(m, _CONV):
            out = self.conv(node, m, x)
            if kind == "std":
                self.fix(self.ensure(x, 1, node), f"'{node.target}' ({type(m).__name__}) standardises each filter "
                                                  "over its input channels")
            return out
        if isinstance(m, nn.Linear):
            lay_in = self.ensure(x, -1 % len(x.shape), node)
            self.bind(node.target, "in", lay_in, node)
            out = (Seg(self.new_var(m.out_features, f"{node.target}.out"), m.out_features),)
            self.bind(node.target, "out", out, node)
            if kind == "std":
                self.fix(lay_in, f"'{node.target}' ({type(m).__name__}) standardises its weight over its inputs")
            return TVal(x.axes[:-1] + (out,), x.shape[:-1] + (m.out_features,))
        if isinstance(m, _BN + _IN):
            lay = self.ensure(x, 1, node)
            self.bind(node.target, "feat", lay, node)
            return TVal(x.axes[:1] + (lay,) + x.axes[2:], x.shape, x.origin)
        if isinstance(m, nn.GroupNorm) and m.num_groups == 1 and len(x.shape) >= 3 and is_plain_group_norm(m, x.shape):
            # one group: a layer norm over the channels and the positions together; growable like one (§5): a
            # task's statistics are taken over the channels born before it (a negative binding axis says so)
            lay = self.ensure(x, 1, node)
            self.bind(node.target, "feat", lay, node, axis=1 - len(x.shape))
            return TVal(x.axes[:1] + (lay,) + x.axes[2:], x.shape, x.origin)
        if isinstance(m, nn.GroupNorm):
            lay = self.ensure(x, 1, node)
            self.bind(node.target, "feat", lay, node)
            if len(lay) == 1 and lay[0].factor == 1:
                self.ties.nodes[lay[0].var]["gran"] = math.lcm(self.ties.nodes[lay[0].var]["gran"],
                                                           m.num_channels // m.num_groups)
            else:
                self.fix(lay, f"GroupNorm '{node.target}' over several channel groups")
            return TVal(x.axes[:1] + (lay,) + x.axes[2:], x.shape, x.origin)
        if isinstance(m, nn.LayerNorm):
            # Normalising across one channel axis is growable: a task's statistics are taken over the channels
            # born before it (context.norm_stats), so channels added for the task being learned never enter
            # them, and a finished task computes on exactly the channels it had (docs/architecture.md, §5).
            axis = layer_norm_axis(m, x.shape)
            if axis is not None:  # the binding's axis, counted from the end, tells the rewrite it is a layer norm
                self.bind(node.target, "feat", self.ensure(x, axis, node), node, axis=axis - len(x.shape))
                return x
            if type(m) is not nn.LayerNorm:  # a subclass that is no plain layer norm over one axis (LayerNormAct2d:
                # permute, norm, activation): which axes it normalises is not known, so all its channels are fixed
                raise Opaque(f"LayerNorm subclass '{node.target}' ({type(m).__name__}) computes more than a layer "
                             "norm over one axis")
            k = len(m.normalized_shape)
            for ax in range(len(x.shape) - k, len(x.shape)):
                if x.axes[ax]:
                    self.fix(x.axes[ax], f"LayerNorm '{node.target}' normalises across several axes or is not a "
                                         "plain layer norm")
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
            # One width E serves input, q/k/v and output: they are one group, grown by whole heads (granularity
            # head_dim), so head_dim and the scores' scale never change (engine/attention.py).
            head_dim = m.embed_dim // m.num_heads
            whole = len(lays) == 3 and len(lays[0]) == 1 and lays[0][0].factor == 1
            if whole and m._qkv_same_embed_dim and m.bias_k is None and m.bias_v is None:
                v = lays[0][0].var
                self.ties.nodes[v]["gran"] = math.lcm(self.ties.nodes[v]["gran"], head_dim)
            else:
                self.fix(lays[0], f"attention '{node.target}': only self-/cross-attention over one channel "
                                  "segment with packed projections (kdim == vdim == embed_dim) grows")
            self.bind(node.target, "attn", lays[0], node)
            out = TVal(x.axes[:-1] + (lays[0],), x.shape, ())
            return Seq([out, OTHER])
        raise Opaque(f"module '{node.target}' ({type(m).__name__}) is not in the coupling registry")

    def head_attention(self, node: fx.Node, m: nn.Module, x: TVal, kind: str) -> TVal:
        """An attention module kept a leaf (tracing.head_attention_kind): its q/k/v channels are `num_heads`
        heads of `head_dim`; growth adds whole heads at the end of q, k and v (granularity head_dim), so head_dim
        and the scores' scale never change.  A 'heads' binding keeps the head count and per-head tensors (Swin's
        relative position bias table) in step.

        * 'swin' (torchvision's ShiftedWindowAttention): the function reads C from its input and computes with
          C // num_heads channels per head: input, q/k/v and output are one group.
        * 'timm' (timm's Attention): the embedding (qkv's input, proj's output) and the heads (qkv's output, proj's
          input, `attn_dim`) are two groups, each growable on its own."""
        t = node.target
        lay = self.ensure(x, len(x.shape) - 1, node)
        hd = m.qkv.out_features // 3 // m.num_heads
        if len(lay) != 1 or lay[0].factor != 1:
            raise Opaque(f"attention '{t}' over channels of several segments")
        self.bind(t + ".qkv", "in", lay, node)
        if kind == "swin":
            v = lay[0].var
            self.ties.nodes[v]["gran"] = math.lcm(self.ties.nodes[v]["gran"], hd)
            heads, out = lay, lay
        else:
            width = m.qkv.out_features // 3
            heads = (Seg(self.new_var(width, f"{t}.heads", gran=hd), width),)
            out = (Seg(self.new_var(m.proj.out_features, f"{t}.proj.out"), m.proj.out_features),)
        self.bind(t + ".qkv", "out", heads * 3, node)
        self.bind(t + ".proj", "in", heads, node)
        self.bind(t + ".proj", "out", out, node)
        self.bind(t, "heads", heads, node, axis=1, per=hd)
        return TVal(x.axes[:-1] + (out,), x.shape[:-1] + (m.proj.out_features,))

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
        # segments of whole conv groups (a depthwise conv, one channel per group, takes any layout)
        whole = per_group == 1 or all(s.factor == 1 and s.width % per_group == 0 for s in lay_in)
        if m.in_channels == m.out_channels and whole:
            # in and out are the same channels (each segment grows by whole conv groups; DenseNet-style inputs of
            # several segments too)
            for s in lay_in if per_group > 1 else ():
                self.ties.nodes[s.var]["gran"] = math.lcm(self.ties.nodes[s.var]["gran"], per_group)
            self.bind(node.target, "grouped", lay_in, node)
            return TVal((None, lay_in) + spatial_none, out_shape)
        if per_group == 1 and m.out_channels % m.in_channels == 0 and whole:
            # a depthwise conv with a channel multiplier: input channel c gives outputs c*k .. c*k + k-1, the
            # layout of a flatten factor (MobileOne's and FastViT's convs, MobileNet's multiplier)
            k = m.out_channels // m.in_channels
            out = tuple(Seg(s.var, s.width, s.factor * k) for s in lay_in)
            self.bind(node.target, "grouped", out, node)
            return TVal((None, out) + spatial_none, out_shape)
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
        if name in LIKE and isinstance(x, TVal):  # a new tensor laid out like x: the same channel positions
            return TVal(x.axes, tensor_shape(node) or x.shape)
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
        if name in ("max", "min", "median", "nanmedian", "mode") and isinstance(x, TVal):
            other = node.kwargs.get("other", args[1] if len(args) > 1 else None)
            if isinstance(self.val(other), TVal):  # torch.max(a, b): elementwise
                return self.elementwise(node)
            dim = node.kwargs.get("dim", other)
            if not isinstance(dim, int):  # over every axis: one value
                return self.reduce_like(node, x, list(range(len(x.shape))), keep=False,
                                        what=f"'{name}' over a channel axis")
            keep = bool(node.kwargs.get("keepdim", args[2] if len(args) > 2 else False))
            self.reduce_like(node, x, [dim], keep=True, what=f"'{name}' over a channel axis")  # fixes channels
            d = dim % len(x.shape)
            axes = tuple(None if i == d else a for i, a in enumerate(x.axes) if keep or i != d)
            shape = tuple(1 if i == d else n for i, n in enumerate(x.shape) if keep or i != d)
            values = TVal(axes, shape)
            return Seq([values, values])  # (values, indices), laid out alike
        if name in ("softmax", "log_softmax", "softmin", "cumsum", "cumprod", "argsort", "sort"):
            dim = node.kwargs.get("dim", args[1] if len(args) > 1 else -1)
            return self.reduce_like(node, x, [dim], keep=True, what=f"'{name}' along a channel axis")
        if name in _POOL_FN and isinstance(x, TVal):
            return self.pool(node, x, _POOL_FN[name])
        if name == "linear" and isinstance(x, TVal) and len(x.shape) >= 1:
            return self.functional_linear(node, x, node_arg(node, 1, "weight"), node_arg(node, 2, "bias"))
        if name in AXIS_OPS and isinstance(x, TVal):
            return self.axis_op(node, x, name, touched_dims(node, name, len(x.shape)))
        if name == "_patch_merging_pad" and isinstance(x, TVal) and len(x.shape) >= 3:
            # torchvision Swin's PatchMerging: pad H, W to even, then cat the four 2x2 neighbours on channels
            lay = self.ensure(x, len(x.shape) - 1, node)
            shape = tensor_shape(node) or x.shape
            return TVal(x.axes[:-3] + (None, None, lay * 4), shape)
        if name == "layer_norm" and isinstance(x, TVal):
            shape = node.kwargs.get("normalized_shape", args[1] if len(args) > 1 else None)
            k = len(shape) if isinstance(shape, (list, tuple)) else 1
            lay = x.axes[-1] if x.axes else None
            affine = [(node.kwargs.get(kw, args[i] if len(args) > i else None), fill)
                      for i, kw, fill in ((2, "weight", 1.0), (3, "bias", 0.0))]
            affine = [(a, fill) for a, fill in affine if a is not None]
            vals = [self.val(a) for a, _ in affine]
            if k == 1 and lay and isinstance(shape, (list, tuple)) and all(
                    isinstance(v, TVal) and len(v.shape) == 1 and v.origin and v.origin[0] and direct_param(a)
                    for v, (a, _) in zip(vals, affine)):
                # over the last axis with γ, β given as parameters: a layer norm over one channel axis (§5); the
                # task-aware graph computes it per task (rewrite.make_layer_norms_task_aware)
                for v, (_, fill) in zip(vals, affine):
                    self.bindings.append(Binding(v.origin[0][0], "param", lay, v.origin[0][1], node.name, fill))
                for w in self.widths_in(shape):  # (C,) read from a shape: that count must stay this width
                    for wl in w.layouts:
                        self.tie(wl, lay, node.name)
                self.bind(node.name, "lnfn", lay, node)
                return TVal(x.axes, tensor_shape(node) or x.shape)
            for ax in range(len(x.shape) - k, len(x.shape)):
                if x.axes[ax]:
                    self.fix(x.axes[ax], f"layer_norm at '{node.name}' normalises across channels")
            return TVal(x.axes, tensor_shape(node) or x.shape)
        cls = autograd_function_of(node.target)
        if cls is not None:
            raise Opaque(f"custom autograd Function '{cls.__name__}' at '{node.name}' (kept whole; "
                         f"grownfx.register_function({cls.__name__}, 'pass') if its channels pass unchanged)")
        raise Opaque(f"'{name}' at node '{node.name}' is not in the coupling registry")

    # -- result -------------------------------------------------------------------------------------------
    def tie_reused(self) -> None:
        """A module (or parameter) used at several places has one tensor: the channels it meets at each place are
        the same channels (a conv applied twice reads its own output), so they are tied; calls with layouts of
        different structure are tied and fixed by `tie`."""
        first: dict[tuple, Binding] = {}
        for b in self.bindings:
            if b.role not in ("in", "out", "grouped", "feat", "param"):
                continue
            key = (b.target, b.role, b.axis)
            if key not in first:
                first[key] = b
            elif self.expand_layout(b.layout) != self.expand_layout(first[key].layout):
                self.tie(first[key].layout, b.layout, f"{b.node} (a second use of '{b.target}')")

    def finish(self) -> "CouplingResult":
        for param, reason in self.opaque_params:
            owner = param.rpartition(".")[0]
            for b in self.bindings:
                if b.target == owner and b.role != "param":
                    self.fix(b.layout, f"'{param}' is also read outside its layer: {reason}")
        self.tie_reused()
        self.finish_refinement()
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
            groups.append(CouplingGroup(gid, max(widths), [], False, math.lcm(*[d["gran"] for d in data]), reasons,
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
            fn = [b.target for b in g.members if b.role == "fnout"]
            if fn:  # rows of a parameter used as a functional linear's weight: not resized by growth
                g.reasons.append(f"produced by a functional linear of parameter '{fn[0]}'")
            if not g.producers and not g.reasons:
                g.reasons.append("no layer produces these channels")
            g.growable = not g.reasons and g.width % g.granularity == 0
        return CouplingResult(self.gm, groups, var_group, self.ties, self.bindings, self.output_vars,
                              tuple(self.expand_layout(lay) for lay in self.output_axes))
