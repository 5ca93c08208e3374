"""The public registry (issue 12): a custom module or function is fixed by default, growable once registered."""

from __future__ import annotations

import pytest
import torch
from torch import fx, nn

import grownfx
from engine_checks import StemConvHead
from test_silent_cases import lifecycle, stem_group


class ChannelScale(nn.Module):
    """A per-channel scale whose forward fx cannot trace (a data-dependent branch)."""

    def __init__(self, c):
        super().__init__()
        self.g = nn.Parameter(torch.rand(c) + 0.5)

    def forward(self, x):
        if bool(x.abs().sum() > 0):
            return x * self.g.view(1, -1, 1, 1)
        return x


def soft_clip(x):
    """Untraceable too: a Python branch on a value."""
    return x if float(x.detach().abs().max()) < 1e6 else x.clamp(-1e6, 1e6)


def shrink(x):
    return torch.where(x.abs() > 0.01, x, torch.zeros_like(x)) if x.dim() == 4 else x


fx.wrap("soft_clip")  # unregistered, a user must wrap it for fx; registered functions are kept whole anyway


class Custom(nn.Module):
    def __init__(self, c=8):
        super().__init__()
        self.stem = nn.Conv2d(3, c, 3, padding=1)
        self.scale = ChannelScale(c)
        self.conv = nn.Conv2d(c, c, 3, padding=1)
        self.head = nn.Linear(c, 5)

    def forward(self, x):
        x = soft_clip(self.scale(self.stem(x)))
        return self.head(self.conv(x).mean((2, 3)))


class CustomFn(StemConvHead):
    def forward(self, x):  # here, not in the base class: fx wraps the registered `shrink` in this module's globals
        return self.tail(shrink(self.stem(x)))


def resize_scale(m, role, src, generator=None):
    m.g = nn.Parameter(grownfx.remap(m.g.data, 0, src, 1.0))  # new channels: scale 1, the identity


X = torch.randn(4, 3, 6, 6)


@pytest.fixture
def clean_registry():
    yield
    for key in (ChannelScale, soft_clip, shrink):
        grownfx.unregister(key)


def test_custom_module_is_fixed_by_default_and_growable_once_registered(clean_registry):
    net = grownfx.prepare(Custom(), X, leaf_modules=[ChannelScale])
    stem = stem_group(net)
    assert not stem.growable and any("not in the coupling registry" in r for r in stem.reasons), stem.reasons

    grownfx.register_module(ChannelScale, "per_channel", resize=resize_scale)  # a leaf from now on
    grownfx.register_function(soft_clip, "pass")
    net = lifecycle(Custom(), X)
    assert stem_group(net).growable, stem_group(net).reasons
    assert net.graph_module.get_submodule("scale").copies[1].g.shape == (18,)


def test_registered_function_is_kept_whole_and_elementwise(clean_registry):
    with pytest.raises(grownfx.TraceError):  # unregistered and unwrapped: fx cannot branch on `x.dim() == 4`
        grownfx.prepare(CustomFn(), X)
    grownfx.register_function(shrink, "elementwise")
    net = lifecycle(CustomFn(), X)
    assert stem_group(net).growable
    assert any(n.target is shrink for n in net.graph_module.graph.nodes)


def test_fixed_rule_shows_its_reason_and_custom_rules_run(clean_registry):
    grownfx.register_module(ChannelScale, "fixed", reason="mixes channels in a way the engine cannot see")
    net = grownfx.prepare(Custom(), X)
    assert any("mixes channels" in r for r in stem_group(net).reasons)

    calls = []

    def rule(analysis, node, module):
        calls.append(node.name)
        x = analysis.val(node.args[0])
        analysis.bind(node.target, "feat", analysis.ensure(x, 1, node), node)
        return x

    grownfx.register_module(ChannelScale, rule, resize=resize_scale)
    grownfx.register_function(soft_clip, "pass")
    net = lifecycle(Custom(), X)
    assert calls and stem_group(net).growable


def test_registry_rejects_bad_rules():
    with pytest.raises(ValueError):
        grownfx.register_module(ChannelScale, "sideways")
    with pytest.raises(ValueError):
        grownfx.register_module(ChannelScale, "fixed")  # no reason
    with pytest.raises(ValueError):
        grownfx.register_module(ChannelScale, "per_channel")  # no resize
    with pytest.raises(ValueError):
        grownfx.register_function(soft_clip, "per_channel")


class FeatureScale(nn.Module):
    """A per-feature scale of (N, C) features, untraceable like ChannelScale."""

    def __init__(self, c):
        super().__init__()
        self.g = nn.Parameter(torch.rand(c) + 0.5)

    def forward(self, x):
        return x * self.g if bool(x.abs().sum() > 0) else x


class FeatureHead(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.fc = nn.Linear(8, 8)
        self.scale = FeatureScale(8)
        self.head = nn.Linear(8, 5)

    def forward(self, x):
        return self.head(self.scale(torch.relu(self.fc(self.stem(x).mean((2, 3))))))


def test_a_per_channel_module_on_features_without_spatial_axes_grows():
    grownfx.register_module(FeatureScale, "per_channel", resize=resize_scale)
    try:
        net = lifecycle(FeatureHead(), X)
        g = next(g for g in net.coupling_groups if any(b.target == "scale" for b in g.members))
        assert g.growable and any(b.target == "fc" and b.role == "out" for b in g.members), g.reasons
    finally:
        grownfx.unregister(FeatureScale)
