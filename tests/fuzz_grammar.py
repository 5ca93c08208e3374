"""The grammar of the model fuzzer (tests/model_fuzzer.py): small blocks, heads and top-level patterns that compose a
random classifier.  Pure torch: nothing here imports grownfx.

`build(seed)` composes a random classifier from the op kinds of `GRAMMAR`: convolutions of every dimension and
grouping, norms, pools, residual adds, concatenations, splits and chunks, reshapes, attention, gating multiplies,
one-channel broadcasts, slices, in-place updates, dropout and drop paths, custom autograd Functions, shared modules,
buffers of several dtypes, spatial flips and pads, ops the engine cannot follow, and heads of every kind (cosine,
logit adjustment, tuple and dict outputs, concatenated heads, a flatten factor).  One small class per op kind: the
file is long because the grammar is.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

CONV = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}
BN = {1: nn.BatchNorm1d, 2: nn.BatchNorm2d, 3: nn.BatchNorm3d}
INORM = {1: nn.InstanceNorm1d, 2: nn.InstanceNorm2d, 3: nn.InstanceNorm3d}
MAXPOOL = {1: nn.MaxPool1d, 2: nn.MaxPool2d, 3: nn.MaxPool3d}
AVGPOOL = {1: nn.AvgPool1d, 2: nn.AvgPool2d, 3: nn.AvgPool3d}
ACTS = [nn.ReLU, nn.GELU, nn.SiLU, nn.Hardswish, nn.Tanh, nn.LeakyReLU, nn.Mish, nn.ELU]


# --- blocks: each maps a (B, C, *spatial) stream to another; `out` is its output width -------------------------

class Block(nn.Module):
    out: int


class ConvAct(Block):
    def __init__(self, d, c, rng, out=None, k=None, groups=1, inplace=False):
        super().__init__()
        self.out = out or c
        k = k or rng.choice((1, 3))
        self.conv = CONV[d](c, self.out, k, padding=k // 2, groups=groups, bias=rng.random() < 0.5)
        self.act = nn.ReLU(inplace=True) if inplace else rng.choice(ACTS)()

    def forward(self, x):
        return self.act(self.conv(x))


class Norm(Block):
    def __init__(self, d, c, rng):
        super().__init__()
        self.out = c
        kind = rng.choice(("bn", "gn", "in", "ln"))
        self.kind = kind
        g = next(g for g in (4, 2, 1) if c % g == 0)
        self.norm = {"bn": lambda: BN[d](c), "gn": lambda: nn.GroupNorm(g, c),
                     "in": lambda: INORM[d](c, affine=True), "ln": lambda: nn.LayerNorm(c)}[kind]()

    def forward(self, x):
        if self.kind == "ln":  # over the channels, channels-last
            return self.norm(x.movedim(1, -1)).movedim(-1, 1)
        return self.norm(x)


class Residual(Block):
    def __init__(self, inner: Block, c):
        super().__init__()
        self.inner, self.out = inner, c

    def forward(self, x):
        return x + self.inner(x)


class Concat(Block):
    def __init__(self, d, c, rng):
        super().__init__()
        a, b = rng.choice((2, 4, c)), rng.choice((2, 4, 6))
        self.a, self.b = CONV[d](c, a, 1), CONV[d](c, b, 3, padding=1)
        self.out = a + b

    def forward(self, x):
        return torch.cat([self.a(x), torch.relu(self.b(x))], dim=1)


class ChunkAdd(Block):
    def __init__(self, d, c, rng):
        super().__init__()
        self.conv = CONV[d](c, 2 * c, 1)
        self.glu = rng.random() < 0.5
        self.out = c

    def forward(self, x):
        a, b = self.conv(x).chunk(2, dim=1)
        return a * torch.sigmoid(b) if self.glu else a + b


class SplitNumeric(Block):
    def __init__(self, d, c, rng):
        super().__init__()
        self.sizes = [c // 2, c - c // 2]
        self.a, self.b = CONV[d](self.sizes[0], self.sizes[0], 3, padding=1), CONV[d](self.sizes[1], 4, 1)
        self.out = self.sizes[0] + 4

    def forward(self, x):
        p, q = torch.split(x, self.sizes, dim=1)
        return torch.cat([self.a(p), self.b(q)], 1)


class ReshapeSoftmax(Block):
    def __init__(self, d, c, rng):
        super().__init__()
        self.out, self.c, self.literal = c, c, rng.random() < 0.5

    def forward(self, x):
        b = x.shape[0]
        c = self.c if self.literal else x.shape[1]
        return x.view(b, c, -1).softmax(-1).view_as(x) * x


class Attention(Block):
    def __init__(self, d, c, rng):
        super().__init__()
        heads = next(h for h in (2, 1) if c % h == 0)
        self.attn = nn.MultiheadAttention(c, heads, batch_first=True)
        self.out = c

    def forward(self, x):
        t = x.flatten(2).transpose(1, 2)
        y = self.attn(t, t, t, need_weights=False)[0]
        return x + y.transpose(1, 2).reshape(x.shape)


class SqueezeExcite(Block):
    def __init__(self, d, c, rng):
        super().__init__()
        self.fc1, self.fc2 = CONV[d](c, 4, 1), CONV[d](4, c, 1)
        self.out, self.spatial = c, tuple(range(2, 2 + d))

    def forward(self, x):
        s = x.mean(self.spatial, keepdim=True)
        return x * torch.sigmoid(self.fc2(torch.relu(self.fc1(s))))


class SpatialGate(Block):
    def __init__(self, d, c, rng):
        super().__init__()
        self.gate = CONV[d](c, 1, 3, padding=1)
        self.out = c

    def forward(self, x):
        return x * torch.sigmoid(self.gate(x))


class SliceNumeric(Block):
    def __init__(self, d, c, rng):
        super().__init__()
        self.keep = max(1, c // 2)
        self.conv = CONV[d](self.keep, c, 1)
        self.out = c

    def forward(self, x):
        return self.conv(x[:, : self.keep])


class SliceByShape(Block):
    def __init__(self, d, c, rng):
        super().__init__()
        self.conv = CONV[d](c - c // 2, c, 1)
        self.out = c

    def forward(self, x):
        return self.conv(x[:, x.shape[1] // 2:])


class InplaceAdd(Block):
    def __init__(self, d, c, rng):
        super().__init__()
        self.conv, self.side = CONV[d](c, c, 3, padding=1), CONV[d](c, c, 1)
        self.alias = rng.random() < 0.5
        self.out = c

    def forward(self, x):
        z = self.conv(x)
        if self.alias:  # eager: identity sees the update
            identity = z
            z += self.side(x)
            return identity + z
        z += x
        return z


class InplaceRelu(Block):
    def __init__(self, d, c, rng):
        super().__init__()
        self.conv = CONV[d](c, c, 3, padding=1)
        self.method = rng.random() < 0.5
        self.act = nn.ReLU(inplace=True)
        self.out = c

    def forward(self, x):
        y = self.conv(x)
        return y.relu_() if self.method else self.act(y)


class Dropout(Block):
    def __init__(self, d, c, rng):
        super().__init__()
        self.kind = rng.choice(("module", "functional", "channels"))
        self.drop = nn.Dropout(0.3) if self.kind == "module" else nn.Dropout2d(0.3) if d == 2 else nn.Dropout(0.2)
        self.out = c

    def forward(self, x):
        if self.kind == "functional":
            return F.dropout(x, 0.3, training=self.training)
        return self.drop(x)


class DropPath(nn.Module):
    def __init__(self, p):
        super().__init__()
        self.p = p

    def forward(self, x):
        if not self.training or self.p == 0.0:
            return x
        keep = 1.0 - self.p
        mask = x.new_empty((x.shape[0],) + (1,) * (x.dim() - 1)).bernoulli_(keep)
        return x * mask / keep


class DropPathBlock(Block):
    def __init__(self, d, c, rng):
        super().__init__()
        self.conv = CONV[d](c, c, 3, padding=1)
        self.drop_path = DropPath(0.25)
        self.out = c

    def forward(self, x):
        return x + self.drop_path(torch.tanh(self.conv(x)))


class StraightThrough(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        return torch.round(x * 4) / 4

    @staticmethod
    def backward(ctx, g):
        return g


class Quantize(Block):
    def __init__(self, d, c, rng):
        super().__init__()
        self.out = c

    def forward(self, x):
        return StraightThrough.apply(x)


class SharedConv(Block):
    def __init__(self, d, c, rng):
        super().__init__()
        self.conv = CONV[d](c, c, 3, padding=1)
        self.out = c

    def forward(self, x):
        return self.conv(torch.relu(self.conv(x)))


class BufferScale(Block):
    def __init__(self, d, c, rng):
        super().__init__()
        self.register_buffer("scale", torch.rand((1, c) + (1,) * d) + 0.5)
        self.out = c

    def forward(self, x):
        return x * self.scale


class MaskBuffer(Block):
    def __init__(self, d, c, rng):
        super().__init__()
        self.dtype = rng.choice((torch.bool, torch.int64, torch.uint8))
        self.register_buffer("keep", (torch.arange(c) % 3 != 1).to(self.dtype).view((1, c) + (1,) * d))
        self.out = c

    def forward(self, x):
        if self.keep.dtype == torch.bool:
            return torch.where(self.keep, x, 0.0)
        return x * self.keep


class ParamAffine(Block):
    def __init__(self, d, c, rng):
        super().__init__()
        self.g = nn.Parameter(torch.rand((1, c) + (1,) * d) + 0.5)
        self.b = nn.Parameter(torch.randn(c).view((1, c) + (1,) * d) * 0.1)
        self.divide = rng.random() < 0.3
        self.out = c

    def forward(self, x):
        return (x / self.g if self.divide else x * self.g) + self.b


class FlipRoll(Block):
    def __init__(self, d, c, rng):
        super().__init__()
        self.kind = rng.choice(("flip", "roll", "flip_channels"))
        self.out = c

    def forward(self, x):
        if self.kind == "flip":
            return x + torch.flip(x, dims=[-1])
        if self.kind == "roll":
            return torch.roll(x, 1, dims=-1)
        return x + torch.flip(x, dims=[1])


class PadCrop(Block):
    def __init__(self, d, c, rng):
        super().__init__()
        mode = rng.choice(("zeros", "reflect", "circular", "replicate"))
        self.conv = CONV[d](c, c, 3, padding=1, padding_mode=mode)
        self.functional = rng.random() < 0.5
        self.out, self.d = c, d

    def forward(self, x):
        if self.functional:
            x = F.pad(x, (1, 1) * self.d)
            x = x[(slice(None), slice(None)) + (slice(1, -1),) * self.d]
        return self.conv(x)


class UpDown(Block):
    def __init__(self, d, c, rng):
        super().__init__()
        self.pool = AVGPOOL[d](2)
        self.out = c

    def forward(self, x):
        return self.pool(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class ChannelsLastMLP(Block):
    def __init__(self, d, c, rng):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(c, 2 * c), nn.Linear(2 * c, c)
        self.functional_norm = rng.random() < 0.5
        self.w, self.b = nn.Parameter(torch.ones(c)), nn.Parameter(torch.zeros(c))
        self.out = c

    def forward(self, x):
        t = x.movedim(1, -1)
        if self.functional_norm:
            t = F.layer_norm(t, (t.shape[-1],), self.w, self.b)
        return x + self.fc2(F.gelu(self.fc1(t))).movedim(-1, 1)


class ChannelShuffle(Block):
    def __init__(self, d, c, rng):
        super().__init__()
        self.groups = 2 if c % 2 == 0 else 1
        self.out = c

    def forward(self, x):
        b, c = x.shape[0], x.shape[1]
        return x.reshape(b, self.groups, c // self.groups, -1).transpose(1, 2).reshape(x.shape)


class ChannelSoftmax(Block):
    def __init__(self, d, c, rng):
        super().__init__()
        self.out = c

    def forward(self, x):
        return x * torch.softmax(x, dim=1)


class ChannelMean(Block):
    def __init__(self, d, c, rng):
        super().__init__()
        self.out = c

    def forward(self, x):
        return x - x.mean(1, keepdim=True)


class Einsum(Block):
    def __init__(self, d, c, rng):
        super().__init__()
        self.w = nn.Parameter(torch.randn(c, c) / c ** 0.5)
        self.out = c

    def forward(self, x):
        return torch.einsum("bc...,dc->bd...", x, self.w)


class Constant(Block):
    def __init__(self, d, c, rng):
        super().__init__()
        self.out = c

    def forward(self, x):
        return x * torch.tensor(0.5) + torch.ones_like(x) * 0.1


class Transposed(Block):
    def __init__(self, d, c, rng):
        super().__init__()
        tconv = {1: nn.ConvTranspose1d, 2: nn.ConvTranspose2d, 3: nn.ConvTranspose3d}[d]
        self.up = tconv(c, c, 2, stride=2)
        self.pool = MAXPOOL[d](2)
        self.out = c

    def forward(self, x):
        return self.pool(self.up(x))


class FunctionalNorm(Block):
    """A hand-written batch norm: `F.batch_norm(..., training=self.training)` with its own running statistics."""

    def __init__(self, d, c, rng):
        super().__init__()
        self.w, self.b = nn.Parameter(torch.ones(c)), nn.Parameter(torch.zeros(c))
        self.register_buffer("mean", torch.zeros(c))
        self.register_buffer("var", torch.ones(c))
        self.out = c

    def forward(self, x):
        return F.batch_norm(x, self.mean, self.var, self.w, self.b, self.training, 0.1, 1e-5)


def _conv(d, c, rng):
    return ConvAct(d, c, rng, out=rng.choice((c, 4, 8, 12)))


def _grouped(d, c, rng):
    g = rng.choice([g for g in (2, 4) if c % g == 0] or [1])
    return ConvAct(d, c, rng, k=3, groups=g)


def _depthwise(d, c, rng):
    return ConvAct(d, c, rng, k=3, groups=c)


def _pool(d, c, rng):
    return _Wrap(rng.choice((MAXPOOL, AVGPOOL))[d](2, ceil_mode=True), c)


class _Wrap(Block):
    def __init__(self, m, c):
        super().__init__()
        self.m, self.out = m, c

    def forward(self, x):
        return self.m(x)


_KEEPS_WIDTH = ("grouped_conv", "depthwise_conv", "norm", "chunk", "reshape", "attention", "squeeze_excite",
                "one_channel_gate", "slice_numeric", "slice_by_shape", "inplace_add", "dropout", "drop_path",
                "autograd_function", "shared_module", "float_buffer", "mask_buffer", "param_affine", "flip_roll",
                "pad", "interpolate", "channels_last_mlp", "channel_shuffle", "channel_softmax", "channel_mean",
                "einsum", "constant", "transposed_conv", "sdpa")


def _residual(d, c, rng):
    """x + f(x) for a random width-keeping kind f (a conv most often)."""
    kind = rng.choice(("conv3",) * 4 + _KEEPS_WIDTH)
    inner = ConvAct(d, c, rng, k=3) if kind == "conv3" else KINDS[kind](d, c, rng)
    return Residual(inner, c)


class Downsample(Block):
    def __init__(self, d, c, rng):
        super().__init__()
        self.out = rng.choice((c, 2 * c))
        self.conv = CONV[d](c, self.out, 3, stride=2, padding=1)
        self.bn = BN[d](self.out)

    def forward(self, x):
        return F.relu(self.bn(self.conv(x)), inplace=True)


class WideGrouped(Block):
    """A grouped conv that changes the width (fixed by the analysis)."""

    def __init__(self, d, c, rng):
        super().__init__()
        g = 2 if c % 2 == 0 else 1
        self.out = 2 * c
        self.conv = CONV[d](c, self.out, 3, padding=1, groups=g)

    def forward(self, x):
        return self.conv(x)


class SDPA(Block):
    """Attention written out with scaled_dot_product_attention over the spatial positions."""

    def __init__(self, d, c, rng):
        super().__init__()
        self.qkv = nn.Linear(c, 3 * c)
        self.out = c

    def forward(self, x):
        t = x.flatten(2).transpose(1, 2)
        q, k, v = self.qkv(t).chunk(3, dim=-1)
        y = F.scaled_dot_product_attention(q, k, v)
        return x + y.transpose(1, 2).reshape(x.shape)


def _inplace_act(d, c, rng):
    return ConvAct(d, c, rng, inplace=True)


KINDS = {
    "conv": _conv, "grouped_conv": _grouped, "depthwise_conv": _depthwise, "norm": Norm, "pool": _pool,
    "residual": _residual, "concat": Concat, "chunk": ChunkAdd, "split": SplitNumeric, "reshape": ReshapeSoftmax,
    "attention": Attention, "squeeze_excite": SqueezeExcite, "one_channel_gate": SpatialGate,
    "slice_numeric": SliceNumeric, "slice_by_shape": SliceByShape, "inplace_add": InplaceAdd,
    "inplace_relu": InplaceRelu, "inplace_act_module": _inplace_act, "dropout": Dropout, "drop_path": DropPathBlock,
    "autograd_function": Quantize, "shared_module": SharedConv, "float_buffer": BufferScale,
    "mask_buffer": MaskBuffer, "param_affine": ParamAffine, "flip_roll": FlipRoll, "pad": PadCrop,
    "interpolate": UpDown, "channels_last_mlp": ChannelsLastMLP, "channel_shuffle": ChannelShuffle,
    "channel_softmax": ChannelSoftmax, "channel_mean": ChannelMean, "einsum": Einsum, "constant": Constant,
    "transposed_conv": Transposed, "downsample": Downsample, "wide_grouped_conv": WideGrouped, "sdpa": SDPA,
    "functional_norm": FunctionalNorm,
}


# --- heads ---------------------------------------------------------------------------------------------------

HEADS = ("linear", "conv1x1", "cosine", "logit_bias", "logit_bias_buffer", "tuple", "dict_logits", "dict_other",
         "two_heads_cat", "distilled", "einsum_declared", "view_literal", "flatten_linear")
# drawn with these weights: heads that must be refused (a buffer per class, concatenated heads, a class count written
# into the graph) and top-level train-only code or a hook on the model (refused too) now and then
HEAD_WEIGHTS = (6, 2, 2, 2, 1, 1, 1, 1, 1, 1, 1, 1, 3)
ROOT = ("plain", "train_noise", "model_hook")
ROOT_WEIGHTS = (36, 1, 1)
# kinds counted in the grammar: blocks, heads and root-level patterns
GRAMMAR = sorted(set(KINDS) | {f"head:{h}" for h in HEADS} | {"root:train_noise", "root:model_hook",
                                                               "conv1d", "conv2d", "conv3d"})


class FuzzNet(nn.Module):
    def __init__(self, d, c_in, blocks, c, head, classes, root, rng):
        super().__init__()
        self.stem = CONV[d](c_in, blocks[0][1] if blocks else c, 3, padding=1)
        self.blocks = nn.ModuleList(b for b, _ in blocks)
        self.head_kind, self.root = head, root
        self.spatial = tuple(range(2, 2 + d))
        k = classes
        if head in ("linear", "logit_bias", "logit_bias_buffer", "tuple", "dict_logits", "dict_other", "view_literal"):
            self.head = nn.Linear(c, k)
        elif head == "flatten_linear":  # a flatten factor: 2 positions per spatial axis per channel
            self.pool = {1: nn.AdaptiveAvgPool1d, 2: nn.AdaptiveAvgPool2d, 3: nn.AdaptiveAvgPool3d}[d](2)
            self.head = nn.Linear(c * 2 ** d, k)
        elif head == "conv1x1":
            self.head = CONV[d](c, k, 1)
        elif head == "cosine":
            self.weight = nn.Parameter(torch.randn(k, c))
            self.scale = nn.Parameter(torch.tensor(8.0))
        elif head == "two_heads_cat":
            self.head, self.head2 = nn.Linear(c, k), nn.Linear(c, k)
        elif head == "distilled":
            self.head, self.head_dist = nn.Linear(c, k), nn.Linear(c, k)
        elif head == "einsum_declared":
            self.protos = nn.Parameter(torch.randn(c, k))
        if head == "logit_bias":
            self.logit_bias = nn.Parameter(torch.randn(k) * 0.1)
        if head == "logit_bias_buffer":
            self.register_buffer("log_prior", torch.randn(k))
        self.classes = k

    def forward(self, x):
        if self.root == "train_noise" and self.training:
            x = x + 0.01 * torch.randn_like(x)
        x = self.stem(x)
        for b in self.blocks:
            x = b(x)
        h = self.head_kind
        if h == "conv1x1":
            return self.head(x).mean(self.spatial)
        if h == "flatten_linear":
            return self.head(torch.flatten(self.pool(x), 1))
        f = x.mean(self.spatial)
        if h == "cosine":
            return self.scale * F.linear(F.normalize(f), F.normalize(self.weight))
        if h == "two_heads_cat":
            return torch.cat([self.head(f), self.head2(f)], 1)
        if h == "distilled":
            return (self.head(f) + self.head_dist(f)) / 2
        if h == "einsum_declared":
            return torch.einsum("bc,ck->bk", f, self.protos)
        logits = self.head(f)
        if h == "logit_bias":
            return logits + self.logit_bias
        if h == "logit_bias_buffer":
            return logits + self.log_prior
        if h == "tuple":
            return logits, f
        if h == "dict_logits":
            return {"logits": logits, "features": f}
        if h == "dict_other":
            return {"scores": logits, "features": f}
        if h == "view_literal":
            return logits.view(-1, self.classes)
        return logits


@dataclass
class Spec:
    seed: int
    dims: int
    kinds: list
    head: str
    root: str
    output: object = None  # prepare(output=)
    head_name: object = None  # prepare(head=)
    seed_width: float = 1.0


def build(seed: int):
    """A random classifier, its example input and how to prepare it (Spec)."""
    rng = random.Random(seed)
    torch.manual_seed(seed)
    d = rng.choice((1, 2, 2, 2, 3))
    size = {1: 16, 2: 8, 3: 4}[d]
    c = rng.choice((4, 6, 8, 8, 12))
    n = rng.randint(1, 7)
    blocks, kinds = [], []
    for _ in range(n):
        kind = rng.choice(list(KINDS))
        if kind in ("pool", "interpolate", "transposed_conv", "downsample") and size < 4:
            kind = "conv"
        b = KINDS[kind](d, c, rng)
        blocks.append((b, c))
        kinds.append(kind)
        c = b.out
        if kind in ("pool", "downsample"):
            size = (size + 1) // 2
    head = rng.choices(HEADS, HEAD_WEIGHTS)[0]
    root = rng.choices(ROOT, ROOT_WEIGHTS)[0]
    # the stem's width is the first block's input width
    c0 = blocks[0][1] if blocks else c
    model = FuzzNet(d, 3, blocks, c, head, rng.choice((5, 10)), root, rng)
    model.stem = CONV[d](3, c0, 3, padding=1)
    if root == "model_hook":
        model.register_forward_hook(_scale_output)
    x = torch.randn((rng.choice((2, 3, 4)), 3) + ({1: 16, 2: 8, 3: 4}[d],) * d)
    spec = Spec(seed, d, kinds, head, root, seed_width=rng.choice((1.0, 0.5)))
    if head == "tuple":
        spec.output = 0
    if head == "dict_other":
        spec.output = "scores"
    if head == "einsum_declared":
        spec.head_name = "protos"
    return model, x, spec


def _scale_output(module, args, out):
    if isinstance(out, dict):
        return {k: v * 2.0 for k, v in out.items()}
    if isinstance(out, tuple):
        return tuple(v * 2.0 for v in out)
    return out * 2.0
