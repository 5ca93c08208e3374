"""Coupling rules on small models built to show one pattern each."""

import pytest
import torch
from torch import nn

import grownfx
from grownfx.engine.coupling import analyze
from grownfx.engine.tracing import trace


def groups_of(model, x):
    res = analyze(trace(model, x))
    by_member = {}
    for g in res.groups:
        for b in g.members:
            by_member.setdefault((b.target, b.role), g)
    return res, by_member


def grow_preserves(model, x, **grow):
    net = grownfx.prepare(model, x)
    net.add_task(5)
    net.eval()
    before = net(x)
    net.grow(**grow)
    after = net(x)
    assert (before - after).abs().max() <= 1e-6 * before.abs().max()
    return net


class Residual(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.a = nn.Conv2d(8, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)
        self.head = nn.Linear(8, 5)

    def forward(self, x):
        x = self.stem(x)
        x = x + self.bn(self.a(x))
        return self.head(x.mean((2, 3)))


def test_residual_add_ties_producers_and_norms():
    res, g = groups_of(Residual(), torch.randn(2, 3, 8, 8))
    stream = g[("stem", "out")]
    assert g[("a", "out")] is stream and g[("bn", "feat")] is stream and g[("head", "in")] is stream
    assert g[("a", "in")] is stream and stream.growable and stream.width == 8
    assert not g[("head", "out")].growable and "logits" in g[("head", "out")].reasons[0]
    assert not g[("stem", "in")].growable and "input" in " ".join(g[("stem", "in")].reasons)
    grow_preserves(Residual(), torch.randn(2, 3, 8, 8), channels=3)


class Concat(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(3, 8, 1)
        self.b = nn.Conv2d(3, 4, 1)
        self.c = nn.Conv2d(12, 6, 1)
        self.head = nn.Linear(6, 5)

    def forward(self, x):
        return self.head(self.c(torch.cat([self.a(x), self.b(x)], 1)).mean((2, 3)))


def test_concat_keeps_offsets_and_grows_in_the_middle():
    res, g = groups_of(Concat(), torch.randn(2, 3, 8, 8))
    binding = next(b for b in res.bindings if b.target == "c" and b.role == "in")
    assert [(res.var_group[s.var], s.width) for s in binding.layout] == [(g[("a", "out")].id, 8), (g[("b", "out")].id, 4)]
    net = grow_preserves(Concat(), torch.randn(2, 3, 8, 8), channels=2, groups=[g[("a", "out")].id])
    c = net.graph_module.get_submodule("c")
    assert c.weight.shape[1] == 14
    assert torch.all(c.weight[:, 8:10] == 0) and torch.any(c.weight[:, 10:] != 0)  # new columns inserted after 8


class Chunked(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(3, 8, 1)
        self.b = nn.Conv2d(4, 4, 1)
        self.head = nn.Linear(8, 5)

    def forward(self, x):
        x1, x2 = self.a(x).chunk(2, dim=1)
        return self.head(torch.cat([x1, self.b(x2)], 1).mean((2, 3)))


def test_chunk_fixes_the_split_group():
    res, g = groups_of(Chunked(), torch.randn(2, 3, 8, 8))
    assert not g[("a", "out")].growable and "sliced" in " ".join(g[("a", "out")].reasons)
    # b reads a slice of a but produces channels of its own: its output grows, placed in head's input after x1
    assert g[("b", "out")].growable and g[("b", "out")] is not g[("a", "out")]
    assert ("head", "in") in [(m.target, m.role) for m in g[("b", "out")].members]


class Shuffle(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(3, 8, 1)
        self.b = nn.Conv2d(8, 6, 1)
        self.head = nn.Linear(6, 5)

    def forward(self, x):
        y = self.a(x)
        n, c, h, w = y.shape
        y = y.view(n, 2, c // 2, h, w).transpose(1, 2).reshape(n, c, h, w)  # channel shuffle
        return self.head(self.b(y).mean((2, 3)))


def test_channel_shuffle_is_fixed_but_downstream_still_grows():
    res, g = groups_of(Shuffle(), torch.randn(2, 3, 8, 8))
    assert not g[("a", "out")].growable
    # the view into (2, c // 2) is two parts, but the shuffle interleaves them and `c` read from the shape
    # counts them in their first order: the layouts meet at the last reshape
    assert any("reshape" in r for r in g[("a", "out")].reasons)
    assert g[("b", "out")].growable


class Depthwise(nn.Module):
    def __init__(self, groups=8):
        super().__init__()
        self.a = nn.Conv2d(3, 16, 1)
        self.dw = nn.Conv2d(16, 16, 3, padding=1, groups=groups)
        self.bn = nn.BatchNorm2d(16)
        self.b = nn.Conv2d(16, 6, 1)
        self.head = nn.Linear(6, 5)

    def forward(self, x):
        return self.head(self.b(self.bn(self.dw(self.a(x)))).mean((2, 3)))


@pytest.mark.parametrize("groups,gran", [(16, 1), (4, 4)])
def test_depthwise_and_grouped_convs_follow_their_group(groups, gran):
    res, g = groups_of(Depthwise(groups), torch.randn(2, 3, 8, 8))
    grp = g[("a", "out")]
    assert g[("dw", "grouped")] is grp and g[("b", "in")] is grp and grp.granularity == gran
    net = grow_preserves(Depthwise(groups), torch.randn(2, 3, 8, 8), channels=1, groups=[grp.id])
    dw = net.graph_module.get_submodule("dw")
    assert dw.weight.shape[0] == 16 + gran and dw.groups == (16 + gran) // (16 // groups)


class SE(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(3, 8, 1)
        self.fc1 = nn.Conv2d(8, 4, 1)
        self.fc2 = nn.Conv2d(4, 8, 1)
        self.b = nn.Conv2d(8, 6, 1)
        self.head = nn.Linear(6, 5)

    def forward(self, x):
        y = self.a(x)
        s = torch.sigmoid(self.fc2(torch.relu(self.fc1(y.mean((2, 3), keepdim=True)))))
        return self.head(self.b(y * s).mean((2, 3)))


def test_squeeze_excitation_multiply_ties_scale_to_channels():
    res, g = groups_of(SE(), torch.randn(2, 3, 8, 8))
    assert g[("fc2", "out")] is g[("a", "out")] and g[("a", "out")].growable
    assert g[("fc1", "out")].growable and g[("fc1", "out")] is not g[("a", "out")]
    grow_preserves(SE(), torch.randn(2, 3, 8, 8), ratio=0.5)


class FlattenLinear(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(3, 8, 3, padding=1)
        self.pool = nn.AdaptiveAvgPool2d(2)
        self.fc = nn.Linear(32, 10)
        self.head = nn.Linear(10, 5)

    def forward(self, x):
        return self.head(torch.relu(self.fc(torch.flatten(self.pool(self.a(x)), 1))))


def test_flatten_to_linear_carries_the_spatial_factor():
    res, g = groups_of(FlattenLinear(), torch.randn(2, 3, 8, 8))
    binding = next(b for b in res.bindings if b.target == "fc" and b.role == "in")
    assert binding.layout[0].factor == 4 and g[("fc", "in")] is g[("a", "out")]
    net = grow_preserves(FlattenLinear(), torch.randn(2, 3, 8, 8), channels=2, groups=[g[("a", "out")].id])
    assert net.graph_module.get_submodule("fc").weight.shape[1] == 40


class LN(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Linear(6, 8)
        self.ln = nn.LayerNorm(8)
        self.hidden = nn.Linear(8, 16)
        self.b = nn.Linear(16, 8)
        self.head = nn.Linear(8, 5)

    def forward(self, x):
        x = self.ln(self.a(x))
        return self.head(x + self.b(torch.nn.functional.gelu(self.hidden(x))))


def test_layernorm_stream_grows_with_the_mlp_hidden():
    # a layer norm over the channel axis is a feature binding: its statistics are taken over the channels born
    # before the computing task (docs/architecture.md §5), so growth keeps the learning task's outputs
    res, g = groups_of(LN(), torch.randn(2, 6))
    stream = g[("a", "out")]
    assert stream.growable and g[("ln", "feat")] is stream and g[("b", "out")] is stream
    assert g[("hidden", "out")].growable and g[("b", "in")] is g[("hidden", "out")]
    grow_preserves(LN(), torch.randn(2, 6), channels=3, groups=[stream.id])


class LN2d(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Linear(6, 8)
        self.ln = nn.LayerNorm((4, 8))  # over two axes: tokens and channels
        self.head = nn.Linear(8, 5)

    def forward(self, x):
        return self.head(self.ln(self.a(x)).mean(1))


def test_layernorm_over_several_axes_fixes_the_stream():
    res, g = groups_of(LN2d(), torch.randn(2, 4, 6))
    assert not g[("a", "out")].growable and "LayerNorm" in " ".join(g[("a", "out")].reasons)


class FlattenedSum(nn.Module):
    """Two convs flattened to 32 features each (2 channels x 16 pixels, 8 channels x 4 pixels), then added."""

    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(3, 2, 1)
        self.b = nn.Conv2d(3, 8, 2, stride=2)
        self.head = nn.Linear(32, 5)

    def forward(self, x):
        return self.head(self.a(x).flatten(1) + self.b(x).flatten(1))


def test_channels_of_different_layouts_that_meet_are_one_fixed_group():
    # the add mixes a's channels with b's pixel by pixel: neither can grow, and both (and the head's input, which
    # reads the sum) are one group, so what `explain` shows names every layer the add couples
    res, g = groups_of(FlattenedSum(), torch.randn(2, 3, 4, 4))
    group = g[("a", "out")]
    assert g[("b", "out")] is group and g[("head", "in")] is group
    assert not group.growable and "different layouts meet at 'add'" in " ".join(group.reasons)


class Tokens(nn.Module):
    """A conv's feature map read as tokens: flatten the pixels, transpose to (N, pixels, channels), a Linear."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.fc = nn.Linear(8, 12)
        self.head = nn.Linear(12, 5)

    def forward(self, x):
        t = self.stem(x).flatten(2).transpose(1, 2)
        return self.head(torch.relu(self.fc(t)).mean(1))


def test_transposed_channels_feed_the_linear_that_reads_them():
    x = torch.randn(2, 3, 6, 5)  # 30 pixels, 8 channels: the two axes cannot be mistaken for each other
    res, g = groups_of(Tokens(), x)
    assert g[("stem", "out")] is g[("fc", "in")] and g[("stem", "out")].growable
    grow_preserves(Tokens(), x, channels=3)


class ScaledFunctionalLinear(nn.Module):
    """`F.linear(tokens, self.w * 2)`: a weight computed from a parameter, inside the network."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 1)
        self.w = nn.Parameter(torch.randn(6, 8) * 0.3)
        self.head = nn.Linear(6, 5)

    def forward(self, x):
        t = torch.nn.functional.linear(self.stem(x).permute(0, 2, 3, 1), self.w * 2.0)
        return self.head(t.mean((1, 2)))


def test_a_linear_weight_computed_from_a_parameter_fixes_its_inputs():
    # new input columns of w would pass through `* 2` (or a normalize) before meeting the new channels: zero
    # columns may not keep the function, so the channels the weight reads stay as they are
    res, g = groups_of(ScaledFunctionalLinear(), torch.randn(2, 3, 4, 4))
    stem = g[("stem", "out")]
    assert not stem.growable and "computed from parameter 'w'" in " ".join(stem.reasons)


class ActivationWeightedLinear(nn.Module):
    """`F.linear(tokens, g.T @ g)`: a weight computed from activations (a Gram matrix of the pooled features)."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 1)
        self.head = nn.Linear(8, 5)

    def forward(self, x):
        f = self.stem(x)
        g = f.mean((2, 3))
        t = torch.nn.functional.linear(f.permute(0, 2, 3, 1), g.t() @ g)
        return self.head(t.mean((1, 2)))


def test_a_linear_weight_computed_from_activations_fixes_its_inputs():
    res, g = groups_of(ActivationWeightedLinear(), torch.randn(2, 3, 4, 4))
    assert not g[("stem", "out")].growable
    assert "is not a parameter" in " ".join(g[("stem", "out")].reasons)


class Unknown(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(3, 8, 1)
        self.head = nn.Linear(8, 5)

    def forward(self, x):
        y = torch.fft.fft2(self.a(x)).real  # an op the registry does not know
        return self.head(y.mean((2, 3)))


def test_unknown_op_fixes_what_it_touches_instead_of_passing_through():
    res, g = groups_of(Unknown(), torch.randn(2, 3, 8, 8))
    assert not g[("a", "out")].growable and "registry" in " ".join(g[("a", "out")].reasons)


def test_dimension_graph_is_networkx_with_labels():
    res, _ = groups_of(Residual(), torch.randn(2, 3, 8, 8))
    graph = res.dim_graph()
    assert "stem.out" in graph.nodes and "a.out" in graph.nodes
    assert graph.has_edge("stem.out", "a.out")
