"""Hand-written patterns the engine used to get silently wrong (issue 11).

The rule: an op or value the coupling analysis cannot prove safe fixes its group with a reason that
`grownfx inspect` shows; anything it keeps growable must grow exactly, keep old tasks bit-exact and export
faithfully.  One small model per pattern, then a seeded property sweep over random compositions of them.
"""

from __future__ import annotations

import hashlib
import random

import pytest
import torch
from torch import nn

import grownfx
from engine_checks import StemConvHead


def _fingerprint(module) -> dict:
    return {k: (tuple(v.shape), hashlib.sha1(v.detach().contiguous().numpy().tobytes()).hexdigest())
            for k, v in module.state_dict().items()}


def _rel(a, b) -> float:
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-12))


def _step(net, x, task):
    net.train()
    opt = torch.optim.SGD([p for p in net.parameters() if p.requires_grad], lr=1e-2, momentum=0.9)
    for _ in range(2):
        opt.zero_grad()
        net(x, task=task).logsumexp(1).mean().backward()
        opt.step()
    net.eval()


def lifecycle(model, x, ratio=0.5, seed_width=1.0):
    """prepare -> task 0 -> grow -> train -> freeze -> task 1 -> grow -> train; old task exact, export faithful."""
    torch.manual_seed(0)
    net = grownfx.prepare(model, x, seed_width=seed_width)
    t0 = net.add_task(5)
    net.eval()
    with torch.no_grad():
        before = net(x, task=t0)
        if net.growable_groups:
            net.grow(ratio=ratio)
        assert torch.isfinite(net(x, task=t0)).all(), "growth made the outputs non-finite"
        assert _rel(net(x, task=t0), before) < 1e-5, "growth changed the current task's function"
    _step(net, x, t0)
    net.freeze_task(t0)
    with torch.no_grad():
        ref0 = net(x, task=t0)
    exp0 = _fingerprint(net.export(t0))
    t1 = net.add_task(3)
    if net.growable_groups:
        net.grow(ratio=ratio)
    with torch.no_grad():
        assert torch.equal(net(x, task=t0), ref0), "growth changed a frozen task"
        net.train()
        net(x, task=t0)  # a forward of a frozen task in train mode must not touch its state
        net.eval()
        assert torch.equal(net(x, task=t0), ref0), "a train-mode forward changed a frozen task"
    _step(net, x, t1)
    with torch.no_grad():
        assert torch.equal(net(x, task=t0), ref0), "learning task 1 changed task 0"
        out1 = net(x, task=t1)
    assert _fingerprint(net.export(t0)) == exp0, "task 0's export changed"
    for t, ref in ((t0, ref0), (t1, out1)):
        sub = net.export(t)
        assert not any(type(m).__module__.startswith("grownfx") for m in sub.modules())
        with torch.no_grad():
            assert _rel(sub(x), ref) <= 1e-5, f"export of task {t} differs from the task-aware model"
    return net


def stem_group(net):
    return next(g for g in net.coupling_groups if any(b.target == "stem" and b.role == "out" for b in g.members))


def _reasons(net) -> str:
    return " | ".join(r for g in net.coupling_groups for r in g.reasons)


# --- one model per pattern --------------------------------------------------------------------------------


class ViewLiteral(StemConvHead):
    """Case 1: a channel count written into view() arguments."""

    def __init__(self, c=8):
        super().__init__(c)
        self.c = c

    def forward(self, x):
        x = self.stem(x)
        b = x.size(0)
        x = x.view(b, self.c, -1).softmax(-1).view_as(x)
        return self.tail(x)


class ShapeRead(StemConvHead):
    """Case 2: a width read from the shape feeds arithmetic."""

    def forward(self, x):
        x = self.stem(x)
        x = x * x.shape[1] ** -0.5
        return self.tail(x)


class ShapeView(StemConvHead):
    """A width read from the shape that only feeds view(): safe, stays growable."""

    def forward(self, x):
        x = self.stem(x)
        b, c, h, w = x.shape
        x = x.view(b, c, h * w).softmax(-1).view(b, c, h, w)
        return self.tail(x)


class Temperature(nn.Module):
    """Case 3: a per-channel parameter used as a divisor (and a multiplier, and an offset)."""

    def __init__(self, c=8):
        super().__init__()
        self.stem = nn.Conv2d(3, c, 3, padding=1)
        self.temp = nn.Parameter(torch.rand(1, c, 1, 1) + 0.5)
        self.gain = nn.Parameter(torch.rand(1, c, 1, 1) + 0.5)
        self.shift = nn.Parameter(torch.randn(1, c, 1, 1))
        self.conv = nn.Conv2d(c, c, 3, padding=1)
        self.head = nn.Linear(c, 5)

    def forward(self, x):
        x = torch.relu(self.stem(x))
        x = (x / self.temp) * self.gain + self.shift
        x = torch.tanh(x)  # NaN anywhere would show in the logits
        return self.head(self.conv(x).mean((2, 3)))


class ParamNumerator(nn.Module):
    """A per-channel parameter divided by the channels: no fill makes new channels safe, so the group is fixed."""

    def __init__(self, c=8):
        super().__init__()
        self.stem = nn.Conv2d(3, c, 3, padding=1)
        self.k = nn.Parameter(torch.rand(1, c, 1, 1))
        self.conv = nn.Conv2d(c, c, 3, padding=1)
        self.head = nn.Linear(c, 5)

    def forward(self, x):
        x = self.k / (self.stem(x).abs() + 1)
        return self.head(self.conv(x).mean((2, 3)))


class TransformedParam(nn.Module):
    """A parameter transformed before it meets the channels: a 0 fill would give log(0) = -inf, so it is fixed."""

    def __init__(self, c=8):
        super().__init__()
        self.stem = nn.Conv2d(3, c, 3, padding=1)
        self.b = nn.Parameter(torch.rand(1, c, 1, 1) + 0.5)
        self.conv = nn.Conv2d(c, c, 3, padding=1)
        self.head = nn.Linear(c, 5)

    def forward(self, x):
        x = self.stem(x) + torch.log(self.b)
        return self.head(self.conv(x).mean((2, 3)))


class BNNet(nn.Module):
    """Case 4: BatchNorm copies of a frozen task must not update in train mode."""

    def __init__(self, c=8):
        super().__init__()
        self.stem = nn.Conv2d(3, c, 3, padding=1)
        self.bn = nn.BatchNorm2d(c)
        self.conv = nn.Conv2d(c, c, 3, padding=1)
        self.head = nn.Linear(c, 5)

    def forward(self, x):
        return self.head(self.conv(torch.relu(self.bn(self.stem(x)))).mean((2, 3)))


class BufferScale(nn.Module):
    """Case 5: a per-channel registered buffer."""

    def __init__(self, c=8):
        super().__init__()
        self.stem = nn.Conv2d(3, c, 3, padding=1)
        self.register_buffer("scale", torch.rand(1, c, 1, 1) + 0.5)
        self.conv = nn.Conv2d(c, c, 3, padding=1)
        self.head = nn.Linear(c, 5)

    def forward(self, x):
        x = self.stem(x) * self.scale
        return self.head(self.conv(x).mean((2, 3)))


class SharedConvBN(nn.Module):
    """Case 6: one conv and one BN called at two sites of the same group."""

    def __init__(self, c=8):
        super().__init__()
        self.stem = nn.Conv2d(3, c, 3, padding=1)
        self.conv = nn.Conv2d(c, c, 3, padding=1)
        self.bn = nn.BatchNorm2d(c)
        self.head = nn.Linear(c, 5)

    def forward(self, x):
        x = self.stem(x)
        x = x + torch.relu(self.bn(self.conv(x)))
        x = x + torch.relu(self.bn(self.conv(x)))
        return self.head(x.mean((2, 3)))


X = torch.randn(4, 3, 6, 6)


def test_view_literal_keeps_old_tasks_arguments():
    net = lifecycle(ViewLiteral(), X, ratio=0.375)  # 8 -> 11 -> 16: a width that does not divide evenly
    assert stem_group(net).growable, stem_group(net).reasons
    # each task reshapes with the width it was learned with; the export writes that number back
    lit = next(m for n, m in net.graph_module.named_modules() if n.startswith("task_literals."))
    assert (lit.value_for(0), lit.value_for(1)) == (11, 16)
    view = next(n for n in net.export(0, prune_unused=False).graph.nodes if n.target == "view")
    assert 11 in view.args


def test_view_literal_in_a_plain_graph_is_rewritten():
    from grownfx.engine.prepare import slim

    gm, coupling, widths, _ = slim(ViewLiteral(), X, 0.5)
    view = next(n for n in gm.graph.nodes if n.target == "view")
    assert 4 in view.args and gm(X).shape == (4, 5)


def test_width_read_from_shape_in_arithmetic_fixes_the_group():
    net = lifecycle(ShapeRead(), X)
    stem = stem_group(net)
    assert not stem.growable and any("read from the shape" in r for r in stem.reasons), stem.reasons


def test_width_read_from_shape_for_view_stays_growable():
    net = lifecycle(ShapeView(), X)
    stem = stem_group(net)
    assert stem.growable, stem.reasons


def test_per_channel_divisor_grows_with_identity_fill():
    net = lifecycle(Temperature(), X)
    stem = stem_group(net)
    assert stem.growable, stem.reasons


def test_parameter_divided_by_channels_fixes_the_group():
    net = lifecycle(ParamNumerator(), X)
    stem = stem_group(net)
    assert not stem.growable and any("divisor" in r for r in stem.reasons), stem.reasons


def test_transformed_parameter_fixes_the_group():
    net = lifecycle(TransformedParam(), X)
    stem = stem_group(net)
    assert not stem.growable and any("transformed" in r for r in stem.reasons), stem.reasons


def test_frozen_batchnorm_does_not_update_in_train_mode():
    torch.manual_seed(0)
    net = grownfx.prepare(BNNet(), X)
    t0 = net.add_task(5)
    _step(net, X, t0)
    net.freeze_task(t0)
    net.add_task(5)
    net.eval()
    with torch.no_grad():
        ref = net(X, task=t0)
        net.train()
        net(X * 3 + 1, task=t0)
        net.eval()
        assert torch.equal(net(X, task=t0), ref)
    lifecycle(BNNet(), X)


def test_per_channel_buffer_is_per_task():
    lifecycle(BufferScale(), X)


def test_shared_conv_and_bn_grow_prune_and_export():
    net = lifecycle(SharedConvBN(), X)
    stem = stem_group(net)
    assert stem.growable
    # pruning non-trailing channels of a group whose conv and BN are called twice (export drops unused ones)
    t = net.learning_task
    born = (net.structure.births[stem.id] == t).nonzero().squeeze(1)
    drop = born[[0, 2]]  # two of the channels task 1 grew, not the last ones
    with torch.no_grad():
        net.graph_module.get_submodule("head").copies[t].weight[:, drop] = 0
        net.graph_module.get_submodule("conv").weight[:, drop] = 0
    with torch.no_grad():
        ref = net(X, task=t)
    sub = net.export(t)
    with torch.no_grad():
        assert _rel(sub(X), ref) <= 1e-5
    assert sub.get_submodule("conv").weight.shape[0] < net.structure.widths[stem.id]


def test_shared_module_pruning_is_applied_once():
    from grownfx.engine.prepare import slim
    from grownfx.engine.surgery import apply_changes, keep_change

    gm, coupling, widths, _ = slim(SharedConvBN(), X)
    gid = next(g.id for g in coupling.groups if any(b.target == "stem" and b.role == "out" for b in g.members))
    apply_changes(gm, coupling, widths, {gid: keep_change(torch.tensor([0, 2, 3, 5, 7]))})
    assert gm.conv.weight.shape[:2] == (5, 5) and gm.bn.running_mean.shape == (5,)
    gm(X)


# --- property sweep: random compositions of the patterns ----------------------------------------------------


class Block(nn.Module):
    """One randomly chosen pattern applied to a C-channel stream (residual where it keeps the group whole)."""

    KINDS = ("literal", "shape_arith", "shape_view", "divisor", "numerator", "bn", "buffer", "shared", "plain")

    def __init__(self, kind: str, c: int, shared: nn.Module | None):
        super().__init__()
        self.kind, self.c = kind, c
        self.conv = nn.Conv2d(c, c, 3, padding=1)
        if kind == "divisor":
            self.p = nn.Parameter(torch.rand(1, c, 1, 1) + 0.5)
        if kind == "numerator":
            self.p = nn.Parameter(torch.rand(1, c, 1, 1))
        if kind == "bn":
            self.bn = nn.BatchNorm2d(c)
        if kind == "buffer":
            self.register_buffer("s", torch.rand(1, c, 1, 1) + 0.5)
        self.__dict__["shared"] = shared

    def forward(self, x):
        k = self.kind
        y = self.conv(x)
        if k == "literal":
            y = y.view(y.size(0), self.c, -1).softmax(-1).view_as(y)
        elif k == "shape_arith":
            y = y * y.shape[1] ** -0.5
        elif k == "shape_view":
            b, c, h, w = y.shape
            y = y.reshape(b, c, h * w).softmax(-1).reshape(b, c, h, w)
        elif k == "divisor":
            y = y / self.p
        elif k == "numerator":
            y = self.p / (y.abs() + 1)
        elif k == "bn":
            y = self.bn(y)
        elif k == "buffer":
            y = y * self.s
        elif k == "shared":
            y = self.shared(y)
        return x + torch.tanh(y)


class RandomNet(nn.Module):
    def __init__(self, rng: random.Random):
        super().__init__()
        c = rng.choice((4, 6, 8))
        self.stem = nn.Conv2d(3, c, 3, padding=1)
        self.shared = nn.Sequential(nn.Conv2d(c, c, 1), nn.BatchNorm2d(c))
        kinds = [rng.choice(Block.KINDS) for _ in range(rng.randint(1, 4))]
        self.blocks = nn.ModuleList(Block(k, c, self.shared) for k in kinds)
        self.head = nn.Linear(c, 5)

    def forward(self, x):
        x = self.stem(x)
        for b in self.blocks:
            x = b(x)
        return self.head(x.mean((2, 3)))


@pytest.mark.parametrize("seed", range(20))
def test_random_compositions(seed):
    rng = random.Random(seed)
    torch.manual_seed(seed)
    model = RandomNet(rng)
    kinds = [b.kind for b in model.blocks]
    net = lifecycle(model, torch.randn(3, 3, 5, 5), ratio=rng.choice((0.25, 0.5, 0.75)))
    stem = stem_group(net)
    unsafe = {"shape_arith", "numerator"} & set(kinds)
    if not unsafe:
        assert stem.growable, (kinds, stem.reasons)
    else:
        assert not stem.growable and stem.reasons, kinds


def test_a_plain_tensor_attribute_of_a_graph_module_is_read_like_a_buffer():
    """make_task_aware reads a get_attr that is no parameter through _float_buffer; a tensor set on the graph module
    after tracing is a plain attribute, not a buffer (its lookup once named a helper that no longer existed)."""
    from torch import fx

    from grownfx.engine.rewrite import _float_buffer

    gm = fx.symbolic_trace(nn.Sequential(nn.Linear(3, 3)))
    gm.scale, gm.index = torch.ones(3), torch.arange(3)
    assert "scale" not in gm._buffers
    assert _float_buffer(gm, "scale") is None  # a constant: shared and immutable
    assert _float_buffer(gm, "scale", any_dtype=True) is gm.scale  # declared per task: copied per task
    assert _float_buffer(gm, "index", any_dtype=True) is gm.index
    assert _float_buffer(gm, "missing") is None


class _ConvReadTwice(nn.Module):
    """`conv` is called as a layer and its weight and bias are also given to a functional conv2d (an op the coupling
    registry does not know): both of the layer's groups must be fixed, not only the ones that op's tensors carry."""

    def __init__(self, read_first: bool = False):
        super().__init__()
        self.pre, self.stem = nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(8, 8, 3, padding=1)
        self.conv, self.fc = nn.Conv2d(8, 8, 3, padding=1), nn.Linear(8, 4)
        self.read_first = read_first  # the functional read before the layer's own call in the graph

    def forward(self, x):
        x = self.stem(self.pre(x))
        if self.read_first:
            x = torch.nn.functional.conv2d(x, self.conv.weight, self.conv.bias, padding=1) + self.conv(x)
        else:
            x = self.conv(x)
            x = x + torch.nn.functional.conv2d(x, self.conv.weight, self.conv.bias, padding=1)
        return self.fc(x.mean((2, 3)))


@pytest.mark.parametrize("read_first", [False, True])
def test_a_layer_whose_weight_an_unknown_op_also_reads_keeps_its_channels_and_learns_and_grows(read_first):
    import grownfx

    x = torch.randn(2, 3, 8, 8)
    net = grownfx.prepare(_ConvReadTwice(read_first), x, seed_width=0.5)
    stem_out = next(g for g in net.coupling_groups if any(b.target == "stem" and b.role == "out" for b in g.members))
    assert not stem_out.growable and any("'conv.weight' is also read outside its layer" in r for r in stem_out.reasons)
    pre_out = next(g for g in net.coupling_groups if any(b.target == "pre" and b.role == "out" for b in g.members))
    assert pre_out.growable  # only the reading layer's own groups are fixed
    t = net.add_task(4)
    net.eval()
    before = net(x, task=t)
    net.grow(ratio=0.5)
    assert torch.equal(net(x, task=t), before)
    assert torch.equal(net.export(task=t)(x), before)  # the export reads the layer's own weight and bias too
