"""Growing `nn.MultiheadAttention` by whole heads (the residual stream of torchvision's ViT and of user models).

`nn.MultiheadAttention` computes with one width E everywhere: its input, the q/k/v projections (`num_heads` heads
of `head_dim = E / num_heads` channels each, head h on channels [h·head_dim, (h+1)·head_dim) of each of q, k and
v) and its output.  The coupling analysis therefore puts its input, its q/k/v channels and its output in one
group (the residual stream it reads and writes) whose granularity is `head_dim`: growth adds whole heads at the
end of q, k and v, and `head_dim` (hence the 1/sqrt(head_dim) scale of the scores) never changes.

* A new head's q/k/v rows are random, its columns of `out_proj` zero: it adds exactly 0 to the output of the
  task being learned until that task trains it; the old heads' scores gain only 0·x terms from the new input
  channels.  So growth keeps the learning task's outputs up to rounding, like every other growth.
* A finished task computes with the heads it had: its projection banks are restricted (`index_select`) to its
  visible channels, and the number of heads it runs is its width / `head_dim`, so its computation is the one it
  finished with, bit for bit.
"""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch import nn

from grownfx.engine.banks import MaskedLinear
from grownfx.engine.layers import TaskParameter, _TaskModule
from grownfx.engine.surgery import qkv_map


class HeadGrowingAttention(_TaskModule):
    """`nn.MultiheadAttention` over masked projection banks that grows by whole heads: each task runs the heads
    that exist for it (its width / head_dim)."""

    def __init__(self, src: nn.MultiheadAttention, ctx, target: str, granularity: str = "kernel"):
        super().__init__()
        self._attach(ctx, target)
        if not src._qkv_same_embed_dim or src.bias_k is not None:
            raise NotImplementedError(f"'{target}': only MultiheadAttention with kdim == vdim == embed_dim")
        proj = nn.Linear(src.embed_dim, 3 * src.embed_dim, bias=src.in_proj_bias is not None)
        proj.weight, proj.bias = src.in_proj_weight, src.in_proj_bias
        self.in_proj = MaskedLinear(proj, ctx, target + ".in_proj", granularity)
        self.out_proj = MaskedLinear(src.out_proj, ctx, target + ".out_proj", granularity)
        self.embed_dim, self.num_heads, self.dropout = src.embed_dim, src.num_heads, src.dropout
        self.batch_first, self.add_zero_attn = src.batch_first, src.add_zero_attn
        self.head_dim = src.embed_dim // src.num_heads

    def forward(self, query, key, value, key_padding_mask=None, need_weights=True, attn_mask=None,
                average_attn_weights=True, is_causal=False):
        # nn.MultiheadAttention's own forward, on the computing task's weights: it picks the same kernel (its
        # fused fast path in eval without grad, or the composite) as the exported nn.MultiheadAttention does, so
        # a finished task's export computes bit for bit what the task-aware net computes
        width = query.shape[-1]  # the channels that exist for the computing task
        view = _MultiheadAttentionView(width, width // self.head_dim, self.in_proj.effective_weight(),
                                       self.in_proj.effective_bias(), self.out_proj.effective_weight(),
                                       self.out_proj.effective_bias(), self.dropout, self.add_zero_attn,
                                       self.batch_first, self.training)
        return nn.MultiheadAttention.forward(view, query, key, value, key_padding_mask=key_padding_mask,
                                             need_weights=need_weights, attn_mask=attn_mask,
                                             average_attn_weights=average_attn_weights, is_causal=is_causal)

    def resize_axis(self, role: str, src: torch.Tensor, generator=None, birth: int = 0, **kw) -> None:
        if role != "attn":
            raise ValueError(f"role {role!r} does not apply to attention '{self.target}'")
        old = self.embed_dim
        self.in_proj.resize_axis("out", qkv_map(src, old), generator=generator, birth=birth, **kw)
        self.in_proj.resize_axis("in", src, generator=generator, birth=birth, **kw)
        self.out_proj.resize_axis("out", src, generator=generator, birth=birth, **kw)
        self.out_proj.resize_axis("in", src, generator=generator, birth=birth, **kw)
        self.embed_dim = int(src.numel())
        self.num_heads = self.embed_dim // self.head_dim

    def to_plain(self, task: int) -> nn.Module:
        inp, outp = self.in_proj.to_plain(task), self.out_proj.to_plain(task)
        width = inp.weight.shape[1]
        m = nn.MultiheadAttention(width, width // self.head_dim, dropout=self.dropout,
                                  bias=self.in_proj.bias_bank is not None, add_zero_attn=self.add_zero_attn,
                                  batch_first=self.batch_first)
        m = m.to(device=inp.weight.device, dtype=inp.weight.dtype)
        with torch.no_grad():
            m.in_proj_weight.copy_(inp.weight)
            if inp.bias is not None:
                m.in_proj_bias.copy_(inp.bias)
            m.out_proj.weight.copy_(outp.weight)
            if outp.bias is not None:
                m.out_proj.bias.copy_(outp.bias)
        return m


class _MultiheadAttentionView:
    """The attributes `nn.MultiheadAttention.forward` reads, holding one task's tensors (not a module: nothing is
    registered, saved or moved)."""

    _qkv_same_embed_dim = True
    bias_k = bias_v = q_proj_weight = k_proj_weight = v_proj_weight = None
    merge_masks = nn.MultiheadAttention.merge_masks

    def __init__(self, embed_dim, num_heads, in_w, in_b, out_w, out_b, dropout, add_zero_attn, batch_first,
                 training):
        self.embed_dim, self.num_heads, self.head_dim = embed_dim, num_heads, embed_dim // num_heads
        self.in_proj_weight, self.in_proj_bias = in_w, in_b
        self.out_proj = _Projection(out_w, out_b)
        self.dropout, self.add_zero_attn, self.batch_first, self.training = dropout, add_zero_attn, batch_first, training


class _Projection:
    def __init__(self, weight, bias):
        self.weight, self.bias = weight, bias


def attention_layouts(target: str, layout: tuple) -> dict[tuple[str, str], tuple]:
    """The layouts of the projection banks of attention `target` whose embedding has `layout`."""
    return {(target + ".in_proj", "in"): layout, (target + ".in_proj", "out"): layout * 3,
            (target + ".out_proj", "in"): layout, (target + ".out_proj", "out"): layout}



class _LinearView:
    """What an attention module's forward sees as its `qkv`/`proj`: the computing task's weight and bias."""

    def __init__(self, layer: MaskedLinear):
        self.weight, self.bias = layer.effective_weight(), layer.effective_bias()

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight, self.bias)


class HeadAttention(_TaskModule):
    """A leaf attention module (tracing.head_attention_kind: torchvision's ShiftedWindowAttention, timm's
    Attention) whose qkv and proj are masked banks; each task runs the heads that exist for it.

    The module's own forward runs unchanged (`inner`), with the computing task's head count (and `attn_dim`) set
    just before, its banks' effective weights, and its own copy of the per-head relative position bias table."""

    def __init__(self, src: nn.Module, ctx, target: str, granularity: str = "kernel"):
        super().__init__()
        self._attach(ctx, target)
        self.head_dim = src.qkv.out_features // 3 // src.num_heads
        self.qkv = MaskedLinear(src.qkv, ctx, target + ".qkv", granularity)
        self.proj = MaskedLinear(src.proj, ctx, target + ".proj", granularity)
        del src._modules["qkv"], src._modules["proj"]
        table = src._parameters.pop("relative_position_bias_table", None)
        self.has_table = table is not None
        if self.has_table:
            self.relative_position_bias_table = TaskParameter(table.data, ctx, target + ".relative_position_bias_table")
        if any(True for _ in src.parameters()):
            raise NotImplementedError(f"'{target}': attention with parameters besides qkv, proj and the bias table")
        self.inner = src  # its buffers (relative_position_index) move with the net; no parameter is left in it

    def heads_for(self, task: int) -> int:
        idx = self.ctx.visible(self.qkv.target, "out", task)
        rows = self.qkv.weight.shape[0] if idx is None else int(idx.numel())
        return rows // (3 * self.head_dim)

    def forward(self, x, *args, **kwargs):
        t = self.ctx.task
        inner = self.inner
        inner.num_heads = self.heads_for(t)
        if hasattr(inner, "attn_dim"):
            inner.attn_dim = inner.num_heads * self.head_dim
        d = inner.__dict__
        if self.has_table:
            d["relative_position_bias_table"] = self.relative_position_bias_table()
        # Swin passes `self.qkv.weight` to a function, timm calls `self.qkv(x)`: both see the task's weights
        d["qkv"], d["proj"] = _LinearView(self.qkv), _LinearView(self.proj)
        try:
            return inner(x, *args, **kwargs)
        finally:  # nothing of this call stays behind (a deepcopy of the net would meet non-leaf tensors)
            for k in ("qkv", "proj", "relative_position_bias_table"):
                d.pop(k, None)

    def resize_heads(self, hsrc: torch.Tensor, generator=None, birth: int = 0, **_) -> None:
        """The heads changed (coupling 'heads' binding): new columns of the learning task's table are 0."""
        if self.has_table:
            self.relative_position_bias_table.resize_axis("param", hsrc, birth=birth, axis=1, fill=0.0)

    def to_plain(self, task: int) -> nn.Module:
        plain = copy.deepcopy(self.inner)
        plain.qkv, plain.proj = self.qkv.to_plain(task), self.proj.to_plain(task)
        plain.num_heads = self.heads_for(task)
        if hasattr(plain, "attn_dim"):
            plain.attn_dim = plain.num_heads * self.head_dim
        if self.has_table:
            table = self.relative_position_bias_table.copy_for(task).detach().clone()
            plain.relative_position_bias_table = nn.Parameter(table)
        return plain
