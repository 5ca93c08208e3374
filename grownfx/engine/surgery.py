"""Step 3 (part 1): resize channel groups.  One operation serves seed slimming, growth, pruning and export.

A change to a group is an *index map* over its channels: `src[j]` is the old channel that new channel `j`
comes from, or -1 for a new channel.  Slicing to a seed keeps a prefix, growth appends -1s, pruning and
export drop indices.  Each binding of the group (a layer axis, a parameter axis, a graph literal) turns the
group map into a map over its own axis (segments, flatten factors) and applies it with the fill that keeps
the network's function: new producer rows random, new consumer columns zero, new norm entries identity.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import fx, nn

from grownfx.engine import registry
from grownfx.engine.coupling import Binding, CouplingResult
from grownfx.engine.splits import apply_split_sizes
from grownfx.engine.tracing import out_channel_params

_CONV = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
_NORM = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.SyncBatchNorm, nn.GroupNorm, nn.LayerNorm,
         nn.InstanceNorm1d, nn.InstanceNorm2d, nn.InstanceNorm3d)


@dataclass
class GroupChange:
    """New channel order of one group: `src[j]` = old index, or -1 for a channel added here."""

    src: torch.Tensor  # int64 (new_width,)

    @property
    def new_width(self) -> int:
        return int(self.src.numel())


def grow_change(width: int, n: int) -> GroupChange:
    return GroupChange(torch.cat([torch.arange(width), torch.full((n,), -1, dtype=torch.long)]))


def keep_change(keep: torch.Tensor) -> GroupChange:
    return GroupChange(keep.to(torch.long))


def axis_map(layout: tuple, changes: dict[int, GroupChange], widths: dict[int, int]) -> torch.Tensor | None:
    """Index map over a whole axis whose layout is `((group_id, factor, fixed_width), ...)`; None if unchanged."""
    parts, pos, touched = [], 0, False
    for gid, factor, fixed in layout:
        w = widths.get(gid, fixed)
        if gid in changes:
            touched = True
            src = changes[gid].src
            expanded = src[:, None] * factor + torch.arange(factor)
            expanded = torch.where(src[:, None] >= 0, expanded + pos, torch.full_like(expanded, -1))
            parts.append(expanded.reshape(-1))
        else:
            parts.append(torch.arange(pos, pos + w * factor))
        pos += w * factor
    return torch.cat(parts) if touched else None


def remap(t: torch.Tensor, axis: int, src: torch.Tensor, fill: torch.Tensor | float) -> torch.Tensor:
    """`out.select(axis, j) = t.select(axis, src[j])` where src[j] >= 0, else `fill` (a tensor of out's shape or a scalar)."""
    shape = list(t.shape)
    shape[axis] = int(src.numel())
    if isinstance(fill, torch.Tensor):
        out = fill.to(device=t.device, dtype=t.dtype).clone()
    else:
        out = torch.full(shape, fill, dtype=t.dtype, device=t.device)
    kept = (src >= 0).nonzero().squeeze(1).to(t.device)
    if kept.numel():
        out.index_copy_(axis, kept, t.index_select(axis, src.to(t.device)[kept]))
    return out


def random_fill(shape: tuple, fan_in: int, generator: torch.Generator | None, like: torch.Tensor) -> torch.Tensor:
    """PyTorch's default conv/linear init (kaiming_uniform with a=sqrt(5)): U(-1/sqrt(fan_in), 1/sqrt(fan_in))."""
    bound = 1.0 / math.sqrt(max(fan_in, 1))
    r = torch.rand(shape, generator=generator, dtype=torch.float32)
    return ((r * 2 - 1) * bound).to(device=like.device, dtype=like.dtype)


def _set(module: nn.Module, name: str, value: torch.Tensor) -> None:
    old = getattr(module, name)
    if isinstance(old, nn.Parameter):
        setattr(module, name, nn.Parameter(value, requires_grad=old.requires_grad))
    else:
        setattr(module, name, value)


def resize_plain(module: nn.Module, role: str, src: torch.Tensor, generator: torch.Generator | None = None,
                 joint_norm: bool = False) -> None:
    """Apply an axis map to a standard torch layer, keeping its attributes (in_channels, ...) in step; a module
    type with a registered resize function (grownfx.register_module / register_resize) uses that instead.
    `joint_norm`: the coupling read this GroupNorm as one group over every channel (a layer norm, growable at
    any width); any other GroupNorm keeps its channels per group, even when slimmed to a single group."""
    n = int(src.numel())
    rule = registry.module_rule(module)
    if rule is not None and rule.resize is not None:
        rule.resize(module, role, src, generator)
    elif isinstance(module, _CONV + (nn.Linear,)):
        w = module.weight
        if role in ("out", "grouped"):
            for name in out_channel_params(module):  # ScaledStdConv2d's gain: new channels start at 1
                _set(module, name, remap(getattr(module, name).data, 0, src, 1.0))
            fan_in = math.prod(w.shape[1:])
            fill = random_fill((n,) + tuple(w.shape[1:]), fan_in, generator, w)
            _set(module, "weight", remap(w.data, 0, src, fill))
            if module.bias is not None:
                _set(module, "bias", remap(module.bias.data, 0, src, 0.0))
        elif role == "in":
            _set(module, "weight", remap(w.data, 1, src, 0.0))
        else:
            raise ValueError(f"role {role!r} does not apply to {type(module).__name__}")
        _update_attrs(module, role, n)
    elif isinstance(module, nn.MultiheadAttention) and role == "attn":
        resize_multihead_attention(module, src, generator)
    elif isinstance(module, _NORM):
        for name, fill in (("weight", 1.0), ("bias", 0.0), ("running_mean", 0.0), ("running_var", 1.0)):
            t = getattr(module, name, None)
            if isinstance(t, torch.Tensor):
                _set(module, name, remap(t.data, 0, src, fill))
        _update_attrs(module, role, n, joint_norm)
    else:
        raise TypeError(f"cannot resize a {type(module).__name__} (grownfx.register_module(..., resize=fn))")


def qkv_map(src: torch.Tensor, width: int) -> torch.Tensor:
    """The index map over packed q/k/v rows (3 sections of `width`) for a map `src` over the embedding."""
    return torch.cat([torch.where(src >= 0, src + i * width, torch.full_like(src, -1)) for i in range(3)])


def resize_multihead_attention(m: nn.MultiheadAttention, src: torch.Tensor, generator=None) -> None:
    """Apply a map over the embedding E of a plain `nn.MultiheadAttention` (one group: input, q/k/v and output;
    engine/attention.py): whole heads only, head_dim unchanged.  New q/k/v rows and out_proj rows random,
    new input columns and out_proj columns zero, new biases zero."""
    head_dim = m.embed_dim // m.num_heads
    old, n = m.embed_dim, int(src.numel())
    if n % head_dim:
        raise ValueError(f"MultiheadAttention keeps whole heads of {head_dim} channels, got width {n}")
    rows = qkv_map(src, old)
    w = m.in_proj_weight
    w_new = remap(remap(w.data, 0, rows, random_fill((3 * n, old), old, generator, w)), 1, src, 0.0)
    m.in_proj_weight = nn.Parameter(w_new, requires_grad=w.requires_grad)
    if m.in_proj_bias is not None:
        m.in_proj_bias = nn.Parameter(remap(m.in_proj_bias.data, 0, rows, 0.0),
                                      requires_grad=m.in_proj_bias.requires_grad)
    lin = m.out_proj
    fill = random_fill((n, old), old, generator, lin.weight)
    lin.weight = nn.Parameter(remap(remap(lin.weight.data, 0, src, fill), 1, src, 0.0),
                              requires_grad=lin.weight.requires_grad)
    if lin.bias is not None:
        lin.bias = nn.Parameter(remap(lin.bias.data, 0, src, 0.0), requires_grad=lin.bias.requires_grad)
    lin.in_features = lin.out_features = n
    m.embed_dim = m.kdim = m.vdim = n
    m.num_heads, m.head_dim = n // head_dim, head_dim


def head_map(src: torch.Tensor, per: int) -> torch.Tensor:
    """A map over heads from a map `src` over channels that keeps or adds whole heads of `per` channels."""
    first = src.view(-1, per)[:, 0]
    return torch.where(first >= 0, torch.div(first, per, rounding_mode="floor"), torch.full_like(first, -1))


def resize_heads_plain(module: nn.Module, hsrc: torch.Tensor) -> None:
    """A plain attention module (torchvision's ShiftedWindowAttention, timm's Attention) after its heads changed:
    its head count, its `attn_dim`, and the columns of its relative position bias table (new heads: 0)."""
    n = int(hsrc.numel())
    table = getattr(module, "relative_position_bias_table", None)
    if isinstance(table, torch.Tensor):
        _set(module, "relative_position_bias_table", remap(table.data, 1, hsrc, 0.0))
    module.num_heads = n
    if hasattr(module, "attn_dim"):
        module.attn_dim = n * module.head_dim


def set_conv_width(conv, role: str, n: int) -> None:
    """A conv's in/out channels (and groups, for a grouped conv whose in and out are one group) after a resize;
    also used by the task-aware MaskedConv, which carries the same attributes."""
    if role == "in":
        conv.in_channels = n
    elif role == "out":
        conv.out_channels = n
    else:  # `n` output channels of a grouped conv: whole groups of the same in and out channels per group
        in_per_group, out_per_group = conv.in_channels // conv.groups, conv.out_channels // conv.groups
        conv.groups = n // out_per_group
        conv.out_channels, conv.in_channels = n, conv.groups * in_per_group


def set_linear_width(linear, role: str, n: int) -> None:
    if role == "in":
        linear.in_features = n
    else:
        linear.out_features = n


def _update_attrs(module: nn.Module, role: str, n: int, joint_norm: bool = False) -> None:
    if isinstance(module, _CONV):
        set_conv_width(module, role, n)
    elif isinstance(module, nn.Linear):
        set_linear_width(module, role, n)
    elif isinstance(module, nn.GroupNorm) and joint_norm:  # one group at any width (a layer norm)
        module.num_channels = n
    elif isinstance(module, nn.GroupNorm):
        per_group = module.num_channels // module.num_groups
        module.num_channels, module.num_groups = n, n // per_group
    elif isinstance(module, nn.LayerNorm):
        module.normalized_shape = (n,)
    elif hasattr(module, "num_features"):
        module.num_features = n


def attribute_holder(root: nn.Module, path: str, create: bool = False) -> tuple[nn.Module, str]:
    """(the module holding attribute `path` of `root`, the attribute's name).  `create`: a missing holder is
    installed as an empty module (what a graph being built needs), else it is an error."""
    holder_path, _, name = path.rpartition(".")
    if not holder_path:
        return root, name
    try:
        return root.get_submodule(holder_path), name
    except AttributeError:
        if not create:
            raise
    holder = nn.Module()
    if not root.add_submodule(holder_path, holder):
        raise AttributeError(f"cannot install a module at '{holder_path}': a parent is not a module")
    return holder, name


def apply_binding(gm: fx.GraphModule, b: Binding, src: torch.Tensor, generator=None, **kw) -> bool:
    """Resize one binding in `gm`; returns True when the graph itself changed (a literal)."""
    if b.role == "split":  # numeric split sizes (engine/splits.py)
        return apply_split_sizes(gm, b.target, src)
    if b.role == "literal":
        node = next(n for n in gm.graph.nodes if n.name == b.target)
        args = list(node.args)
        nested = len(args) == 2 and isinstance(args[1], (list, tuple))
        if isinstance(list(args[1])[b.axis] if nested else args[b.axis + 1], fx.Node):
            return False  # a task-aware graph computes the number per task (layers.TaskLiteral)
        if nested:
            inner = list(args[1])
            inner[b.axis] = int(src.numel())
            args[1] = type(args[1])(inner)
        else:
            args[b.axis + 1] = int(src.numel())
        node.args = tuple(args)
        return True
    if b.role == "lnfn":  # a functional layer_norm over the last axis: its normalized_shape in a plain graph
        node = next((n for n in gm.graph.nodes if n.name == b.target and n.op == "call_function"), None)
        if node is None:
            return False  # a task-aware graph computes it per task (rewrite.TaskLayerNorm)
        shape = node.kwargs.get("normalized_shape", node.args[1] if len(node.args) > 1 else None)
        if not all(isinstance(d, int) for d in shape):
            return False  # read from the input's shape: it follows the width
        if "normalized_shape" in node.kwargs:
            node.kwargs = {**node.kwargs, "normalized_shape": (int(src.numel()),)}
        else:
            node.args = node.args[:1] + ((int(src.numel()),),) + node.args[2:]
        return True
    if b.role == "heads":  # an attention's head count and per-head tensors (coupling `head_attention`)
        module = gm.get_submodule(b.target)
        hsrc = head_map(src, b.per)
        if hasattr(module, "resize_heads"):
            module.resize_heads(hsrc, generator=generator, **kw)
        else:
            resize_heads_plain(module, hsrc)
        return False
    if b.role == "param":
        holder, name = attribute_holder(gm, b.target)
        t = getattr(holder, name)
        if hasattr(t, "resize_axis"):  # a task-aware parameter holder
            t.resize_axis(b.role, src, generator=generator, axis=b.axis, fill=b.fill, **kw)
        else:  # a plain parameter or buffer (seed slimming, export)
            _set(holder, name, remap(t.data, b.axis, src, b.fill))
        return False
    module = gm.get_submodule(b.target)
    if hasattr(module, "resize_axis"):
        module.resize_axis(b.role, src, generator=generator, **kw)
    else:  # a feature binding on a negative axis: the coupling read a layer norm (one group over every channel)
        resize_plain(module, b.role, src, generator, joint_norm=b.role == "feat" and b.axis < 0)
    return False


def binding_layout(result: CouplingResult, b: Binding) -> tuple:
    """A binding's layout as ((group_id, factor, fixed_width), ...)."""
    return tuple((result.var_group[s.var], s.factor, s.width) for s in b.layout)


def apply_changes(
    gm: fx.GraphModule,
    result: CouplingResult,
    widths: dict[int, int],
    changes: dict[int, GroupChange],
    generator: torch.Generator | None = None,
    **kw,
) -> None:
    """Apply group changes to every binding they touch (each binding once), then update `widths`."""
    for gid in changes:
        group = result.groups[gid]
        if not group.growable:
            raise ValueError(f"group {gid} is fixed ({'; '.join(group.reasons)}) and cannot be resized")
        gran = group.granularity
        if changes[gid].new_width % gran:
            raise ValueError(f"group {gid} must keep a multiple of {gran} channels, got {changes[gid].new_width}")
    # A module called at several sites (a shared conv or BN) has one binding per call but one tensor: resize
    # it once.  Its calls have the same layout (else `_fix_reused_modules` fixed the group).  Every axis map
    # is computed before anything changes, so a failure leaves the graph whole.
    seen: set[tuple] = set()
    todo = []
    for gid in changes:
        for b in result.groups[gid].members:
            key = (b.target, b.role, b.axis) if b.role != "literal" else (id(b),)
            if key in seen:
                continue
            seen.add(key)
            src = axis_map(binding_layout(result, b), changes, widths)
            if src is not None:
                todo.append((b, src))
    graph_changed = False
    for b, src in todo:
        graph_changed |= apply_binding(gm, b, src, generator, **kw)
    for gid, ch in changes.items():
        widths[gid] = ch.new_width
    if graph_changed:
        gm.recompile()
