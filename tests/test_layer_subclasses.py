"""Patterns timm models are made of, in small torch-only models: subclasses of the standard layers and norms,
channel slices and splits written as numbers, opaque ops with the batch off axis 0, several logit layers."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import grownfx
from grownfx.engine.tracing import TraceError, layer_kind, trace
from engine_checks import check_backbone


class SameConv(nn.Conv2d):
    """timm's Conv2dSame: padding computed from the input in forward (control flow fx cannot trace)."""

    def forward(self, x):
        ih, iw = x.shape[-2:]
        ph = max((-(-ih // self.stride[0]) - 1) * self.stride[0] + self.kernel_size[0] - ih, 0)
        pw = max((-(-iw // self.stride[1]) - 1) * self.stride[1] + self.kernel_size[1] - iw, 0)
        if ph > 0 or pw > 0:
            x = F.pad(x, [pw // 2, pw - pw // 2, ph // 2, ph - ph // 2])
        return F.conv2d(x, self.weight, self.bias, self.stride, 0, self.dilation, self.groups)


class StdConv(nn.Conv2d):
    """Weight standardisation (timm's StdConv2d)."""

    def forward(self, x):
        w = F.batch_norm(self.weight.reshape(1, self.out_channels, -1), None, None, training=True,
                         momentum=0.0, eps=1e-6).reshape_as(self.weight)
        return F.conv2d(x, w, self.bias, self.stride, self.padding, self.dilation, self.groups)


class GainConv(nn.Conv2d):
    """A conv with a parameter besides weight, bias and per-filter values: a layer we cannot follow."""

    def __init__(self, *a, **k):
        super().__init__(*a, **k)
        self.gain = nn.Parameter(torch.ones(()))

    def forward(self, x):
        return F.conv2d(x, self.weight * self.gain, self.bias, self.stride, self.padding)


class BNAct(nn.BatchNorm2d):
    """timm's BatchNormAct2d: functional batch_norm, then an activation."""

    def __init__(self, c):
        super().__init__(c)
        self.act = nn.ReLU()

    def forward(self, x):
        x = F.batch_norm(x, self.running_mean, self.running_var, self.weight, self.bias,
                         self.training, self.momentum, self.eps)
        return self.act(x)


class TLinear(nn.Linear):
    def forward(self, x):
        return F.linear(x, self.weight, self.bias)


class SubclassNet(nn.Module):
    def __init__(self, conv=SameConv, classes=10):
        super().__init__()
        self.stem = conv(3, 16, 3, stride=2)
        self.bn1 = BNAct(16)
        self.conv = conv(16, 16, 3, padding=1)
        self.bn2 = BNAct(16)
        self.head = TLinear(16, classes)

    def forward(self, x):
        x = self.bn1(self.stem(x))
        x = x + self.bn2(self.conv(x))
        return self.head(x.mean((2, 3)))


def _builder(model_fn, shape=(4, 3, 16, 16)):
    return lambda name: (model_fn(), torch.randn(*shape))


def test_layer_kinds():
    assert layer_kind(nn.Conv2d(3, 4, 3)) == "plain"
    assert layer_kind(SameConv(3, 4, 3)) == "plain"
    assert layer_kind(TLinear(3, 4)) == "plain"
    assert layer_kind(StdConv(3, 4, 3)) == "std"
    assert layer_kind(GainConv(3, 4, 3)) == "other"
    assert layer_kind(nn.ReLU()) is None


def test_conv_and_norm_subclasses_grow_and_export():
    report = check_backbone("subclasses", 0.5, builder=_builder(SubclassNet))
    assert report["growable"] == 1  # the residual stream: nothing lost to a functional batch_norm
    assert sorted(report["fixed_reasons"]) == ["touches the logits", "touches the network input"]
    net = grownfx.prepare(SubclassNet(), torch.randn(2, 3, 16, 16), seed_width=0.5)
    t = net.add_task(10)
    sub = net.export(t)
    assert isinstance(sub.get_submodule("stem"), SameConv) and isinstance(sub.get_submodule("bn1"), BNAct)


class StdLinear(nn.Linear):
    """Weight standardisation of a Linear: each output's weights normalised, reshaped by `self.out_features`."""

    def forward(self, x):
        w = F.batch_norm(self.weight.reshape(1, self.out_features, -1), None, None, training=True,
                         momentum=0.0, eps=1e-6).reshape_as(self.weight)
        return F.linear(x, w, self.bias)


class StdMlp(nn.Module):
    def __init__(self, classes=10):
        super().__init__()
        self.stem = nn.Conv2d(3, 16, 3, stride=2)
        self.fc = StdLinear(16, 24)
        self.head = nn.Linear(24, classes)

    def forward(self, x):
        return self.head(torch.relu(self.fc(self.stem(x).mean((2, 3)))))


def test_std_linear_grows_its_outputs_and_sees_its_own_widths():
    # the masked layer runs StdLinear's own forward: its out_features must be the weight's rows (24 -> 12 at the
    # seed, more after growth, never its 16 inputs), or the export (a plain StdLinear) computes something else
    report = check_backbone("std_linear", 0.5, builder=_builder(StdMlp))
    assert report["growable"] == 1


class StdThenPlain(nn.Module):
    def __init__(self):
        super().__init__()
        self.std, self.bn = StdConv(3, 16, 3, padding=1), BNAct(16)
        self.std2 = StdConv(16, 16, 3, padding=1)
        self.plain = nn.Conv2d(16, 8, 1)
        self.head = nn.Linear(8, 10)

    def forward(self, x):
        return self.head(self.plain(self.std2(self.bn(self.std(x)))).mean((2, 3)))


def test_std_conv_keeps_its_inputs_fixed():
    net = grownfx.prepare(StdThenPlain(), torch.randn(2, 3, 16, 16), seed_width=0.5)
    by_producer = {b.target: g for g in net.coupling_groups for b in g.members if b.role == "out"}
    assert not by_producer["std"].growable and "standardises" in " ".join(by_producer["std"].reasons)
    assert by_producer["std2"].growable and by_producer["plain"].growable  # std convs' outputs grow
    check_backbone("std", 0.5, builder=_builder(StdThenPlain))


def test_conv_with_extra_parameter_is_opaque():
    net = grownfx.prepare(SubclassNet(GainConv), torch.randn(2, 3, 16, 16), seed_width=0.5,
                          leaf_modules=[GainConv])
    t = net.add_task(10)
    x = torch.randn(2, 3, 16, 16)
    net.eval()
    with torch.no_grad():
        assert torch.allclose(net.export(t)(x), net(x, task=t), atol=1e-5)


class CatSlice(nn.Module):
    """GhostNet: cat of two producers, then a numeric slice that keeps every channel (or cuts some)."""

    def __init__(self, keep=None):
        super().__init__()
        self.a, self.b = nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(3, 8, 3, padding=1)
        self.keep = keep
        self.c = nn.Conv2d(16 if keep is None else keep, 8, 1)
        self.head = nn.Linear(8, 10)

    def forward(self, x):
        y = torch.cat([self.a(x), self.b(x)], 1)
        y = y[:, :16] if self.keep is None else y[:, :self.keep]
        return self.head(self.c(y).mean((2, 3)))


class CatSplit(nn.Module):
    def __init__(self, chunk=False, dim_positional=False):
        super().__init__()
        self.chunk, self.dim_positional = chunk, dim_positional
        self.a, self.b = nn.Conv2d(3, 16, 1), nn.Conv2d(3, 24 if not chunk else 16, 1)
        self.c = nn.Conv2d(3, 8, 1)
        self.d = nn.Conv2d(16, 8, 1)
        self.head = nn.Linear(8, 10)

    def forward(self, x):
        if self.chunk:
            p, q = torch.chunk(torch.cat([self.a(x), self.b(x)], 1), 2, dim=1)
        elif self.dim_positional:  # `t.split(sizes, 1)`: the axis as a positional argument
            p, q, r = torch.cat([self.a(x), self.b(x), self.c(x)], 1).split([16, 24, 8], 1)
        else:
            p, q, r = torch.split(torch.cat([self.a(x), self.b(x), self.c(x)], 1), [16, 24, 8], dim=1)
        return self.head(self.d(p + q[:, :16] if not self.chunk else p * q).mean((2, 3)))


@pytest.mark.parametrize("make", [lambda: CatSlice(), lambda: CatSlice(12), lambda: CatSplit(),
                                  lambda: CatSplit(dim_positional=True), lambda: CatSplit(chunk=True)],
                         ids=["full-slice", "cut-slice", "split", "split-axis-positional", "chunk"])
def test_numeric_slices_and_splits(make):
    report = check_backbone("slices", 0.5, builder=_builder(make))
    assert report["growable"] >= 1


def test_a_split_reads_its_axis_given_positionally_as_by_keyword():
    def groups(**kw):
        net = grownfx.prepare(CatSplit(**kw), torch.randn(4, 3, 16, 16), seed_width=0.5)
        return sorted((sorted((b.target, b.role) for b in g.members), g.growable, g.width) for g in net.coupling_groups)

    assert groups(dim_positional=True) == groups()


def test_cut_slice_refines_what_it_cuts_and_grows():
    # the slice is the first piece of split(y, [12, 4]) (DPN, ReXNet): b is cut at the bound and every part grows
    net = grownfx.prepare(CatSlice(12), torch.randn(2, 3, 8, 8), seed_width=0.5)
    reasons = [r for g in net.coupling_groups for r in g.reasons]
    assert not any("sliced" in r for r in reasons)
    producers = [g for g in net.coupling_groups if any(b.target in ("a", "b") and b.role == "out" for b in g.members)]
    assert all(g.growable for g in producers) and len(producers) == 3  # a, and b's two parts


class StridedSlice(CatSlice):
    def forward(self, x):
        y = torch.cat([self.a(x), self.b(x)], 1)[:, ::2]
        return self.head(self.c(torch.cat([y, y[:, :4]], 1)).mean((2, 3)))


def test_strided_slice_fixes_the_whole_axis_with_reason():
    net = grownfx.prepare(StridedSlice(12), torch.randn(2, 3, 8, 8), seed_width=0.5)
    reasons = [r for g in net.coupling_groups for r in g.reasons]
    assert any("strided channel slice" in r for r in reasons)
    assert not any(g.growable and any(b.target in ("a", "b") for b in g.members) for g in net.coupling_groups)


def test_chunk_of_cat_ties_its_pieces():
    net = grownfx.prepare(CatSplit(chunk=True), torch.randn(2, 3, 8, 8), seed_width=0.5)
    g = next(g for g in net.coupling_groups if any(b.target == "a" and b.role == "out" for b in g.members))
    assert g.growable and any(b.target == "b" and b.role == "out" for b in g.members)


class GRUNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.proj = nn.Linear(8, 16)
        self.gru = nn.GRU(16, 12, num_layers=2, batch_first=True)
        self.head = nn.Linear(12, 10)

    def forward(self, x):
        _, h = self.gru(self.proj(x))
        return self.head(h[-1])


def test_opaque_op_batch_axis_does_not_depend_on_example_batch():
    structure = []
    for b in (1, 2, 12):
        net = grownfx.prepare(GRUNet(), torch.randn(b, 5, 8), seed_width=0.5)
        structure.append(sorted((g.width, g.growable) for g in net.coupling_groups))
    assert structure[0] == structure[1] == structure[2]


class Distilled(nn.Module):
    """LeViT / EfficientFormer: a classifier and a distillation head, averaged in eval mode."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 16, 3, padding=1)
        self.head, self.head_dist = nn.Linear(16, 10), nn.Linear(16, 10)

    def forward(self, x):
        x = self.conv(x).mean((2, 3))
        return (self.head(x) + self.head_dist(x)) / 2


def test_several_logit_layers_each_task_gets_all():
    report = check_backbone("distilled", 0.5, builder=_builder(Distilled))
    assert report["growable"] == 1
    net = grownfx.prepare(Distilled(), torch.randn(2, 3, 8, 8))
    assert sorted(net.head_targets) == ["head", "head_dist"]
    net.add_task(3)
    assert net(torch.randn(2, 3, 8, 8)).shape == (2, 3)


def test_trace_error_names_the_python_argument():
    class Bad(nn.Module):
        def forward(self, x):
            return x if x.sum() > 0 else -x

    with pytest.raises(TraceError, match=r"leaf_modules=\[\.\.\.\]"):
        grownfx.prepare(Bad(), torch.randn(2, 3))


class ScaledStd(nn.Conv2d):
    """timm's ScaledStdConv2d: weight standardisation with a per-filter gain."""

    def __init__(self, *a, **k):
        super().__init__(*a, **k)
        self.gain = nn.Parameter(torch.rand(self.out_channels, 1, 1, 1) + 0.5)

    def forward(self, x):
        w = F.batch_norm(self.weight.reshape(1, self.out_channels, -1), None, None,
                         weight=self.gain.view(-1), training=True, momentum=0.0, eps=1e-6).reshape_as(self.weight)
        return F.conv2d(x, w, self.bias, self.stride, self.padding, self.dilation, self.groups)


class ScaledNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b = ScaledStd(3, 16, 3, padding=1), ScaledStd(16, 16, 3, padding=1)
        self.c = nn.Conv2d(16, 8, 1)
        self.head = nn.Linear(8, 10)

    def forward(self, x):
        return self.head(self.c(F.gelu(self.b(F.gelu(self.a(x))))).mean((2, 3)))


def test_scaled_std_conv_gain_follows_its_filters():
    assert layer_kind(ScaledStd(3, 4, 3)) == "std"
    report = check_backbone("scaled", 0.5, builder=_builder(ScaledNet))
    assert report["growable"] == 2  # b's and c's outputs; a's outputs feed b's standardised inputs


class ShapeBranch(nn.Module):
    """Control flow on a shape, which fx cannot trace (like timm's VGG pre_logits, but a class the tracer does not
    know: ConvMlp below)."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Conv2d(8, 8, 1)

    def forward(self, x):
        if x.shape[-1] < 4:
            x = F.adaptive_avg_pool2d(x, 4)
        return self.fc(x)


class WithShapeBranch(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv, self.mid, self.pre = nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(8, 8, 1), ShapeBranch()
        self.head = nn.Linear(8, 10)

    def forward(self, x):
        return self.head(self.pre(self.mid(self.conv(x))).mean((2, 3)))


def test_auto_leaves_keep_untraceable_modules_opaque():
    with pytest.raises(TraceError):
        grownfx.prepare(WithShapeBranch(), torch.randn(2, 3, 8, 8))
    net = grownfx.prepare(WithShapeBranch(), torch.randn(2, 3, 8, 8), auto_leaves=True)
    assert net.graph_module.auto_leaves == ["pre"]
    report = check_backbone("auto", 0.5, builder=_builder(WithShapeBranch, (2, 3, 8, 8)), auto_leaves=True)
    assert report["growable"] == 1  # conv -> mid; mid's output meets the opaque leaf and stays fixed


class ConvMlp(nn.Module):
    """timm's VGG pre_logits (timm.models.vgg.ConvMlp, forward as in timm 1.0): a shape test fx cannot trace;
    the tracer knows a shape-free equivalent (tracing.traced_forward), so fc1 and fc2 are seen."""

    __module__ = "timm.models.vgg"  # the class the tracer knows by name

    def __init__(self, cin=8, cout=16, k=4):
        super().__init__()
        self.input_kernel_size = k
        self.fc1, self.act1, self.drop = nn.Conv2d(cin, cout, k), nn.ReLU(True), nn.Dropout(0.2)
        self.fc2, self.act2 = nn.Conv2d(cout, cout, 1), nn.ReLU(True)

    def forward(self, x):
        if x.shape[-2] < self.input_kernel_size or x.shape[-1] < self.input_kernel_size:
            output_size = (max(self.input_kernel_size, x.shape[-2]), max(self.input_kernel_size, x.shape[-1]))
            x = F.adaptive_avg_pool2d(x, output_size)
        return self.act2(self.fc2(self.drop(self.act1(self.fc1(x)))))


class OtherConvMlp(ConvMlp):
    """The same name with another forward (pooled up to 2k x 2k): the tracer's equivalent does not hold."""

    __module__ = "timm.models.vgg"

    def forward(self, x):
        k = 2 * self.input_kernel_size
        if x.shape[-2] < k or x.shape[-1] < k:
            x = F.adaptive_avg_pool2d(x, (max(k, x.shape[-2]), max(k, x.shape[-1])))
        return self.act2(self.fc2(self.drop(self.act1(self.fc1(x)))))


OtherConvMlp.__name__ = "ConvMlp"


class VggLike(nn.Module):
    def __init__(self, mlp=ConvMlp):
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.MaxPool2d(4))
        self.pre_logits = mlp()
        self.head = nn.Linear(16, 10)

    def forward(self, x):
        return self.head(self.pre_logits(self.features(x)).mean((2, 3)))


def test_vgg_conv_mlp_traced_through_its_shape_test():
    report = check_backbone("vgg", 0.5, builder=_builder(VggLike, (2, 3, 8, 8)), auto_leaves=True)
    # features -> fc1, fc1 -> fc2, fc2 -> head: as a leaf, ConvMlp kept all three fixed (growable 0)
    assert report["growable"] == 3
    assert sorted(report["fixed_reasons"]) == ["touches the logits", "touches the network input"]
    model = VggLike().eval()
    gm = trace(model, torch.randn(2, 3, 8, 8))
    assert gm.auto_leaves == [] and "pool_to_min_size" in gm.code
    for h, w in ((8, 8), (8, 24), (24, 8), (16, 16), (40, 28)):  # features 2x2 .. 10x7: pooled where under 4x4
        x = torch.randn(2, 3, h, w)
        with torch.no_grad():
            assert torch.equal(gm(x), model(x)), (h, w)  # one graph serves every input size


def test_conv_mlp_with_another_forward_stays_a_leaf():
    net = grownfx.prepare(VggLike(OtherConvMlp), torch.randn(2, 3, 8, 8), auto_leaves=True)
    assert net.graph_module.auto_leaves == ["pre_logits"]


class GhostLike(nn.Module):
    """GhostNet: cat([primary, cheap(primary)]) added to a shortcut conv and gated by one SE conv."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.primary, self.cheap = nn.Conv2d(8, 8, 1), nn.Conv2d(8, 8, 3, padding=1, groups=8)
        self.shortcut = nn.Conv2d(8, 16, 1)
        self.se = nn.Conv2d(16, 16, 1)
        self.bn = nn.BatchNorm2d(16)
        self.out = nn.Conv2d(16, 8, 1)
        self.head = nn.Linear(8, 10)

    def forward(self, x):
        x = self.stem(x)
        p = self.primary(x)
        y = torch.cat([p, self.cheap(p)], 1)
        y = y * torch.sigmoid(self.se(y.mean((2, 3), keepdim=True)))
        y = self.bn(y + self.shortcut(x))
        return self.head(self.out(y).mean((2, 3)))


def test_single_producer_refined_to_match_a_concatenation():
    report = check_backbone("ghost", 0.5, builder=_builder(GhostLike, (4, 3, 8, 8)))
    net = grownfx.prepare(GhostLike(), torch.randn(2, 3, 8, 8), seed_width=0.5)
    g = next(g for g in net.coupling_groups if any(b.target == "primary" and b.role == "out" for b in g.members))
    assert g.growable and {"shortcut", "se"} <= {b.target for b in g.members if b.role == "out"}
    assert report["growable"] == 3  # stem, the ghost stream (shortcut and SE refined into 8 + 8), out


class Res2Like(nn.Module):
    """Res2Net / FasterNet: one conv's output split by sizes written as numbers, pieces processed apart."""

    def __init__(self, sizes=(8, 8), as_int=True):
        super().__init__()
        self.sizes, self.as_int = list(sizes), as_int
        self.conv1 = nn.Conv2d(3, sum(sizes), 1)
        self.convs = nn.ModuleList(nn.Conv2d(s, s, 3, padding=1) for s in sizes[:-1])
        self.conv3 = nn.Conv2d(sum(sizes), 8, 1)
        self.head = nn.Linear(8, 10)

    def forward(self, x):
        y = self.conv1(x)
        parts = torch.split(y, self.sizes[0] if self.as_int else self.sizes, 1)
        out = [c(parts[i]) for i, c in enumerate(self.convs)] + [parts[len(self.sizes) - 1]]
        return self.head(self.conv3(torch.cat(out, 1)).mean((2, 3)))


@pytest.mark.parametrize("sizes,as_int", [((8, 8), True), ((4, 12, 8), False)], ids=["int", "list"])
def test_numeric_split_sizes_follow_growth_per_task(sizes, as_int):
    report = check_backbone("res2", 0.5, builder=_builder(lambda: Res2Like(sizes, as_int), (4, 3, 8, 8)))
    net = grownfx.prepare(Res2Like(sizes, as_int), torch.randn(2, 3, 8, 8), seed_width=0.5)
    by_producer = {b.target: g for g in net.coupling_groups for b in g.members if b.role == "out"}
    assert by_producer["conv1"].growable  # conv1's output, refined into one piece per split part
    assert report["growable"] >= len(sizes)
