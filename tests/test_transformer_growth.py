"""Transformers grow their residual stream (issue 11): LayerNorm-coupled groups and attention embeddings.

A tiny hand-written pre-norm block (LayerNorm -> nn.MultiheadAttention -> residual, LayerNorm -> MLP -> residual)
shows what docs/architecture.md §5 states for layer norms: a task's statistics are taken over the channels born
before it, so growth for the task being learned keeps its outputs (to rounding), a finished task computes bit for
bit as it did, and the export computes what the task-aware net computes.  Attention grows by whole heads."""

from __future__ import annotations

import pytest
import torch
import torchvision
from torch import nn

import grownfx
from grownfx.engine.layers import stats_layer_norm

D, HEADS, HIDDEN, TOKENS = 16, 4, 32, 5


class Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.ln1 = nn.LayerNorm(D)
        self.attn = nn.MultiheadAttention(D, HEADS, batch_first=True)
        self.ln2 = nn.LayerNorm(D)
        self.fc1, self.fc2 = nn.Linear(D, HIDDEN), nn.Linear(HIDDEN, D)

    def forward(self, x):
        y = self.ln1(x)
        x = x + self.attn(y, y, y, need_weights=False)[0]
        return x + self.fc2(torch.relu(self.fc1(self.ln2(x))))


class TinyTransformer(nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = nn.Linear(8, D)
        self.pos = nn.Parameter(torch.randn(1, TOKENS, D))
        self.blocks = nn.Sequential(Block(), Block())
        self.norm = nn.LayerNorm(D)
        self.head = nn.Linear(D, 4)

    def forward(self, x):
        x = self.blocks(self.embed(x) + self.pos)
        return self.head(self.norm(x)[:, 0])


def _net(dtype=torch.float32):
    torch.manual_seed(0)
    x = torch.randn(3, TOKENS, 8, dtype=dtype)
    return grownfx.prepare(TinyTransformer().to(dtype), x, seed_width=0.5), x


def _stream(net):
    """The residual stream: the group of the blocks' layer norms and attentions."""
    return next(g for g in net.growable_groups if any(b.target == "blocks.0.ln1" for b in g.members))


def _train(net, x, task, steps=3):
    net.train()
    opt = torch.optim.SGD([p for p in net.parameters() if p.requires_grad], lr=0.1, momentum=0.9)
    for _ in range(steps):
        opt.zero_grad()
        net(x, task=task).logsumexp(1).mean().backward()
        opt.step()
    net.eval()


def _grow_in_two_tasks(net, x, first: dict, second: dict) -> None:
    """Growth (`first`) while task 0 learns keeps its outputs; after task 1 grows (`second`) and trains, task 0
    and its export are bit for bit what task 0 froze with, and task 1's export equals it up to rounding."""
    t0 = net.add_task(4)
    net.eval()
    with torch.no_grad():
        before = net(x)
    net.grow(**first)
    with torch.no_grad():
        assert rel(net(x), before) <= 1e-5
    _train(net, x, t0)
    net.freeze_task(t0)
    with torch.no_grad():
        ref0 = net(x, task=t0)
    t1 = net.add_task(2)
    net.grow(**second)
    _train(net, x, t1)
    with torch.no_grad():
        assert torch.equal(net(x, task=t0), ref0)
        out1 = net(x, task=t1)
        assert torch.equal(net.export(t0)(x), ref0)
        assert rel(net.export(t1)(x), out1) <= 1e-6


def rel(a, b):
    return float((a - b).abs().max() / b.abs().max())


def test_residual_stream_and_attention_embedding_are_one_growable_group_of_whole_heads():
    net, _ = _net()
    g = _stream(net)
    roles = {(b.target, b.role) for b in g.members}
    assert {("blocks.0.ln1", "feat"), ("blocks.1.ln2", "feat"), ("norm", "feat"), ("blocks.0.attn", "attn"),
            ("embed", "out"), ("blocks.0.fc2", "out"), ("head", "in")} <= roles
    assert g.granularity == D // HEADS  # whole heads: head_dim never changes
    assert g.width == D // 2  # seed width 0.5: 2 of 4 heads
    assert net.graph_module.get_submodule("blocks.0.attn").num_heads == HEADS // 2


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.float64, 1e-12)])
def test_growth_keeps_the_learning_task_outputs(dtype, tol):
    net, x = _net(dtype)
    t = net.add_task(4)
    net.eval()
    with torch.no_grad():
        before = net(x, task=t)
    added = net.grow(ratio=1.0)
    assert added[_stream(net).id] == D // 2  # two whole heads
    with torch.no_grad():
        after = net(x, task=t)
    assert rel(after, before) <= tol
    # the statement of docs/architecture.md: task t's norms take their statistics over the channels born before t
    births = net.structure.births[_stream(net).id]
    assert torch.equal(net.ctx.norm_stats("blocks.0.ln1", t), (births < t).nonzero().squeeze(1))


def test_a_layer_norm_over_all_channels_would_change_the_learning_task():
    """What the statistics rule buys: normalising over the grown channels too changes the outputs at growth."""
    net, x = _net()
    t = net.add_task(4)
    net.eval()
    with torch.no_grad():
        before = net(x, task=t)
        net.grow(ratio=1.0)
        layouts = {k: v for k, v in net.structure.layouts.items() if k[1] == "feat"}
        for k in layouts:
            del net.structure.layouts[k]
        net.ctx.bump()
        changed = rel(net(x, task=t), before)
    assert changed > 1e-2


def test_old_tasks_exact_and_exports_equal_after_growth_and_training():
    net, x = _net()
    t0 = net.add_task(4)
    net.grow(ratio=0.5)  # growth while task 0 learns: its own channels stay out of its statistics
    _train(net, x, t0)
    net.freeze_task(t0)
    with torch.no_grad():
        ref0 = net(x, task=t0)
    t1 = net.add_task(3)
    net.grow(ratio=1.0)
    with torch.no_grad():
        assert torch.equal(net(x, task=t0), ref0)
    _train(net, x, t1)
    with torch.no_grad():
        assert torch.equal(net(x, task=t0), ref0)
        out1 = net(x, task=t1)
    for t, ref in ((t0, ref0), (t1, out1)):
        sub = net.export(t)
        assert not any(type(m).__module__.startswith("grownfx") for m in sub.modules())
        with torch.no_grad():
            out = sub(x)
        # a finished task: the same ops on the same tensors, bit for bit; the learning task's export folds its
        # masks into the weights, which may round differently
        assert torch.equal(out, ref) if t == t0 else rel(out, ref) <= 1e-6
    heads0 = net.export(t0).get_submodule("blocks.0.attn").num_heads
    heads1 = net.export(t1).get_submodule("blocks.0.attn").num_heads
    assert heads0 < heads1 == net.structure.widths[_stream(net).id] // (D // HEADS)


def test_stats_layer_norm_is_layer_norm_over_its_channels():
    torch.manual_seed(0)
    x = torch.randn(2, 3, 6, dtype=torch.float64)
    w, b = torch.rand(6, dtype=torch.float64), torch.randn(6, dtype=torch.float64)
    ref = nn.functional.layer_norm(x[..., :4], (4,), w[:4], b[:4], 1e-5)
    out = stats_layer_norm(x, torch.arange(4), w, b, 1e-5, -1)
    assert torch.allclose(out[..., :4], ref, atol=1e-12)
    full = stats_layer_norm(x, torch.arange(6), w, b, 1e-5, -1)
    assert torch.allclose(full, nn.functional.layer_norm(x, (6,), w, b, 1e-5), atol=1e-12)


class ConvNeXtLike(nn.Module):
    """torchvision's LayerNorm2d (an nn.LayerNorm subclass over NCHW channels) on a residual stream."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 2, 2)
        self.ln = torchvision.models.convnext.LayerNorm2d(8)
        self.dw = nn.Conv2d(8, 8, 3, padding=1, groups=8)
        self.ln2 = torchvision.models.convnext.LayerNorm2d(8)
        self.head = nn.Linear(8, 5)

    def forward(self, x):
        x = self.ln(self.stem(x))
        x = x + self.dw(x)
        return self.head(self.ln2(x).mean((2, 3)))


def test_layernorm2d_subclass_is_a_growable_norm_over_channels():
    torch.manual_seed(0)
    x = torch.randn(2, 3, 8, 8)
    net = grownfx.prepare(ConvNeXtLike(), x, seed_width=0.5)
    g = next(g for g in net.growable_groups if any(b.target == "ln" for b in g.members))
    assert net.graph_module.ln.norm_axis == -3  # found by probing the subclass
    _grow_in_two_tasks(net, x, dict(channels=4, groups=[g.id]), dict(channels=4, groups=[g.id]))


def test_timm_vit_attention_grows_by_heads_and_embedding():
    """timm's Attention (ViT, DeiT): the embedding and the heads are two growable groups."""
    timm = pytest.importorskip("timm")
    from engine_checks import check_backbone

    def builder(name):
        torch.manual_seed(0)
        model = timm.models.vision_transformer.VisionTransformer(img_size=16, patch_size=8, embed_dim=32, depth=2,
                                                                  num_heads=4, num_classes=5)
        return model, torch.randn(2, 3, 16, 16)

    report = check_backbone("tiny_vit", 0.5, builder=builder)
    assert sorted(report["fixed_reasons"]) == ["touches the logits", "touches the network input"]
    net = grownfx.prepare(*builder(""), seed_width=0.5)
    heads = next(g for g in net.growable_groups if any(b.role == "heads" for b in g.members) and g.width == 16)
    assert heads.granularity == 8  # whole heads of head_dim 8
    net.add_task(5)
    net.grow(channels=8, groups=[heads.id])
    attn = net.export(0).get_submodule("blocks.0.attn")
    assert (attn.num_heads, attn.attn_dim, attn.qkv.out_features) == (3, 24, 72)


class FunctionalNorm(nn.Module):
    """A user's own norm calling `F.layer_norm` over the last axis with its parameters."""

    def __init__(self, d, literal, keywords=False):
        super().__init__()
        self.weight, self.bias = nn.Parameter(torch.rand(d) + 0.5), nn.Parameter(torch.randn(d))
        self.d, self.literal, self.keywords = d, literal, keywords

    def forward(self, x):
        shape = (self.d,) if self.literal else (x.shape[-1],)  # a number in the graph, or read from the shape
        if self.keywords:
            return torch.layer_norm(x, normalized_shape=shape, weight=self.weight, bias=self.bias, eps=1e-6)
        return nn.functional.layer_norm(x, shape, self.weight, self.bias, 1e-6)


class FunctionalNormNet(nn.Module):
    def __init__(self, literal, keywords=False):
        super().__init__()
        self.embed, self.norm = nn.Linear(8, D), FunctionalNorm(D, literal, keywords)
        self.fc, self.head = nn.Linear(D, D), nn.Linear(D, 4)

    def forward(self, x):
        x = self.embed(x)
        x = x + self.fc(self.norm(x))
        return self.head(self.norm(x).mean(1))


@pytest.mark.parametrize("literal", [True, False])
def test_functional_layer_norm_grows_with_per_task_statistics(literal):
    torch.manual_seed(0)
    x = torch.randn(3, TOKENS, 8)
    net = grownfx.prepare(FunctionalNormNet(literal), x, seed_width=0.5)
    g = next(g for g in net.growable_groups if any(b.role == "lnfn" for b in g.members))
    assert g.width == D // 2
    _grow_in_two_tasks(net, x, dict(ratio=1.0, groups=[g.id]), dict(ratio=0.5, groups=[g.id]))


def test_functional_layer_norm_with_its_shape_given_by_keyword_grows():
    """`torch.layer_norm(x, normalized_shape=(16,), ...)`: the number written as a keyword follows the width too."""
    torch.manual_seed(0)
    x = torch.randn(3, TOKENS, 8)
    net = grownfx.prepare(FunctionalNormNet(True, keywords=True), x, seed_width=0.5)
    g = next(g for g in net.growable_groups if any(b.role == "lnfn" for b in g.members))
    assert g.width == D // 2
    _grow_in_two_tasks(net, x, dict(ratio=1.0, groups=[g.id]), dict(ratio=0.5, groups=[g.id]))


def test_grown_gates_settle_through_attention_projections():
    """GROWN's candidate gates act on nn.MultiheadAttention's projections too: settling them (kept gates folded
    into the consumer columns, dropped heads removed) keeps the learning task's outputs."""
    from grownfx.engine.banks import MaskedLayer
    from grownfx.learn.gates import CandidateGates

    net, x = _net()
    net.add_task(4)
    gates = CandidateGates.of(net)
    gid = _stream(net).id
    gates.grow(net, 8, [gid])
    with torch.no_grad():
        for m in net.modules():  # as if trained: the candidates' columns are no longer zero
            if isinstance(m, MaskedLayer):
                m.weight.add_(torch.randn_like(m.weight) * 0.1)
        gates[str(gid)].copy_(torch.tensor([1.0, 2.0, -1.0, 0.5, -3.0, -0.2, -0.3, -0.4]))  # keep 1 head, drop 1
    net.ctx.bump()
    net.eval()
    with torch.no_grad():
        before = net(x)
    assert gates.settle(net) == {gid: D // HEADS}
    with torch.no_grad():
        assert rel(net(x), before) <= 1e-6


def test_swin_growth_keeps_every_existing_heads_relative_position_bias():
    """Swin's relative position bias has one column per head: growth adds zero columns for the new heads and keeps
    every existing head's column, the first included.  The biases are drawn large here (at init they are ~0.02
    and move the logits by less than rounding), so a head's lost bias shows in the outputs."""
    from engine_checks import build, rel_err
    from grownfx.engine.layers import TaskParameter

    torch.manual_seed(0)
    model, x = build("swin_small_test")
    net = grownfx.prepare(model, x, seed_width=0.5)
    t0 = net.add_task(10)
    tables = [m for n, m in net.named_modules()
              if isinstance(m, TaskParameter) and n.endswith("relative_position_bias_table")]
    assert tables
    with torch.no_grad():
        for t in tables:
            t.copy_for(t0).normal_(0, 2.0)
        net.eval()
        before = net(x, task=t0)
        net.grow(ratio=0.25)
        assert rel_err(net(x, task=t0), before) < 1e-5


class AttentionThenLinear(nn.Module):
    """Embedding -> attention -> a Linear reading the attention's output directly (no residual add around it)."""

    def __init__(self):
        super().__init__()
        self.embed = nn.Linear(8, D)
        self.attn = nn.MultiheadAttention(D, HEADS, batch_first=True)
        self.fc = nn.Linear(D, D)
        self.head = nn.Linear(D, 4)

    def forward(self, x):
        y = self.embed(x)
        return self.head(torch.relu(self.fc(self.attn(y, y, y, need_weights=False)[0])).mean(1))


def test_a_layer_reading_the_attention_output_grows_with_the_attention():
    """The attention's output has its embedding's channels: the Linear reading it is in the embedding's group
    and widens with it (whole heads), keeping the outputs."""
    torch.manual_seed(0)
    x = torch.randn(3, TOKENS, 8)
    net = grownfx.prepare(AttentionThenLinear(), x, seed_width=0.5)
    g = next(g for g in net.coupling_groups if any(b.target == "attn" for b in g.members))
    assert g.growable and {(b.target, b.role) for b in g.members} >= {("embed", "out"), ("fc", "in")}
    net.add_task(4)
    net.eval()
    with torch.no_grad():
        before = net(x)
        net.grow(ratio=0.5)
        assert net.graph_module.fc.weight.shape[1] == net.graph_module.embed.weight.shape[0] > D // 2
        assert rel(net(x), before) <= 1e-5


class AttentionWeightsRead(nn.Module):
    """The attention's weights (need_weights=True, no channel axis), broadcast like a token-by-token tensor (an
    op of the weights and a tensor the analysis follows), used too."""

    def __init__(self):
        super().__init__()
        self.embed = nn.Linear(8, D)
        self.attn = nn.MultiheadAttention(D, HEADS, batch_first=True)
        self.head = nn.Linear(D, 4)

    def forward(self, x):
        y = self.embed(x)
        out, weights = self.attn(y, y, y)
        pair = x.mean(-1, keepdim=True)  # the input's features: fixed anyway
        return self.head((out + weights.expand_as(pair * pair.transpose(1, 2)).sum(-1, keepdim=True)).mean(1))


def test_attention_weights_read_beside_the_output_leave_the_embedding_growable():
    torch.manual_seed(0)
    x = torch.randn(3, TOKENS, 8)
    net = grownfx.prepare(AttentionWeightsRead(), x, seed_width=0.5)
    g = next(g for g in net.coupling_groups if any(b.target == "attn" for b in g.members))
    assert g.growable, g.reasons


class Attention(nn.Module):
    """A stand-in for timm's `Attention` (ViT, DeiT; its non-fused path), under the module and class name the
    engine recognises it by, so its growth is tested where timm is not installed."""

    __module__ = "timm.layers.attention"

    def __init__(self, dim, num_heads):
        super().__init__()
        self.num_heads, self.head_dim, self.attn_dim = num_heads, dim // num_heads, dim
        self.scale = self.head_dim ** -0.5
        self.qkv = nn.Linear(dim, dim * 3)
        self.q_norm, self.k_norm, self.norm = nn.Identity(), nn.Identity(), nn.Identity()
        self.attn_drop, self.proj_drop = nn.Dropout(0.0), nn.Dropout(0.0)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x):
        B, N, C = x.shape
        qkv = self.qkv(x).reshape(B, N, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        q, k = self.q_norm(q), self.k_norm(k)
        x = self.attn_drop(((q * self.scale) @ k.transpose(-2, -1)).softmax(dim=-1)) @ v
        x = x.transpose(1, 2).reshape(B, N, self.attn_dim)
        return self.proj_drop(self.proj(self.norm(x)))


class TimmLikeBlock(nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = nn.Linear(8, 32)
        self.attn = Attention(32, 4)
        self.head = nn.Linear(32, 5)

    def forward(self, x):
        x = self.embed(x)
        return self.head((x + self.attn(x)).mean(1))


def test_timm_attention_is_kept_whole_and_grows_by_heads():
    torch.manual_seed(0)
    x = torch.randn(3, TOKENS, 8)
    net = grownfx.prepare(TimmLikeBlock(), x, seed_width=0.5)
    heads = next(g for g in net.growable_groups if any(b.role == "heads" for b in g.members))
    assert (heads.width, heads.granularity) == (16, 8)  # 2 of 4 heads of head_dim 8 at the seed
    net.add_task(5)
    net.eval()
    with torch.no_grad():
        before = net(x)
        net.grow(channels=8, groups=[heads.id])
        assert rel(net(x), before) <= 1e-6
        attn = net.export(0).get_submodule("attn")
        assert (attn.num_heads, attn.attn_dim, attn.qkv.out_features) == (3, 24, 72)
        assert rel(net.export(0)(x), net(x)) <= 1e-6
