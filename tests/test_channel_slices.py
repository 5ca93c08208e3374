"""Channels cut into parts by numbers (found by the timm sweep: DPN, ReXNet, SKNet).

`x[:, :c]` cuts a conv's output into parts that go different ways: DPN's dual-path block adds the first `c`
channels to the residual stream and concatenates the rest to the dense stream; ReXNet adds its shortcut to the
first `c` channels only.  The slice is the piece of a numeric split, so its bounds follow growth; before, the
whole producer was fixed ("channels sliced at ..."), and DPN's seed was half its parameters.  SKNet's attention
over k paths views a conv's k·C outputs as (k, C) and softmaxes over k: the k parts are cut apart and tied, so
they grow alike (before: "reshape splits or interleaves channels", and `C // k` fixed them as a value use).
"""

from __future__ import annotations

import torch
from torch import nn

from model_frames import groups_of, reasons
from test_silent_cases import lifecycle

X = torch.randn(4, 3, 8, 8)


class DualPath(nn.Module):
    """DPN's block: one conv's output sliced into a residual part and a dense part."""

    def __init__(self, res=8, inc=4, classes=5):
        super().__init__()
        self.res = res
        self.stem = nn.Conv2d(3, res + inc, 3, padding=1)
        self.proj = nn.Conv2d(res + inc, res + inc, 1)
        self.body = nn.Conv2d(res + inc, res + inc, 3, padding=1)
        self.head = nn.Linear(res + 2 * inc, classes)

    def forward(self, x):
        x = torch.relu(self.stem(x))
        s = self.proj(x)
        s_res, s_dense = s[:, :self.res], s[:, self.res:]
        o = torch.relu(self.body(x))
        resid = s_res + o[:, :self.res, :, :]
        dense = torch.cat([s_dense, o[:, self.res:]], dim=1)
        return self.head(torch.cat([resid, dense], 1).mean((2, 3)))


class PartialShortcut(nn.Module):
    """ReXNet's block: the shortcut is added to the first channels of a wider output, the middle ones pass."""

    def __init__(self, c=6, extra=4, classes=5):
        super().__init__()
        self.c = c
        self.stem = nn.Conv2d(3, c, 3, padding=1)
        self.conv = nn.Conv2d(c, c + extra, 3, padding=1)
        self.head = nn.Linear(c + extra, classes)

    def forward(self, x):
        x = torch.relu(self.stem(x))
        y = self.conv(x)
        y = torch.cat([y[:, 0:self.c] + x, y[:, self.c:self.c + 2], y[:, self.c + 2:]], dim=1)
        return self.head(y.mean((2, 3)))


def test_dual_path_slices_grow_with_their_parts():
    net = lifecycle(DualPath(), X, seed_width=0.5)
    assert all(g.growable for g in groups_of(net, "proj")), reasons(net)
    assert all(g.growable for g in groups_of(net, "body")), reasons(net)
    assert "sliced" not in reasons(net)


def test_partial_shortcut_grows_each_part():
    net = lifecycle(PartialShortcut(), X, seed_width=0.5)
    assert all(g.growable for g in groups_of(net, "conv")), reasons(net)
    assert len(groups_of(net, "conv")) == 3  # the shortcut's part, and the two slices after it


class SelectiveKernel(nn.Module):
    """SKNet's block: two paths stacked, a per-path per-channel softmax from one conv's 2·C outputs."""

    def __init__(self, c=8, classes=5):
        super().__init__()
        self.stem = nn.Conv2d(3, c, 3, padding=1)
        self.paths = nn.ModuleList([nn.Conv2d(c, c, 3, padding=1), nn.Conv2d(c, c, 5, padding=2)])
        self.reduce = nn.Conv2d(c, 4, 1)
        self.select = nn.Conv2d(4, 2 * c, 1)
        self.head = nn.Linear(c, classes)

    def forward(self, x):
        x = torch.relu(self.stem(x))
        x = torch.stack([p(x) for p in self.paths], dim=1)
        a = self.select(torch.relu(self.reduce(x.sum(1).mean((2, 3), keepdim=True))))
        b, c, h, w = a.shape
        a = torch.softmax(a.view(b, 2, c // 2, h, w), dim=1)
        return self.head((x * a).sum(1).mean((2, 3)))


def test_selective_kernel_parts_grow_alike():
    net = lifecycle(SelectiveKernel(), X, seed_width=0.5)
    assert all(g.growable for g in groups_of(net, "select")), reasons(net)
    assert len(groups_of(net, "select")) == 1  # both parts in the paths' group
    assert groups_of(net, "select") == groups_of(net, "paths.0")


class MultiplierResidual(nn.Module):
    """FastViT's stage: a depthwise conv with channel multiplier 2 starts a residual stream that a 1x1 conv's
    output (one variable of twice the width) is added to."""

    def __init__(self, c=4, classes=5):
        super().__init__()
        self.stem = nn.Conv2d(3, c, 3, padding=1)
        self.embed = nn.Conv2d(c, 2 * c, 3, padding=1, groups=c)
        self.norm = nn.BatchNorm2d(2 * c)
        self.mlp = nn.Conv2d(2 * c, 2 * c, 1)
        self.head = nn.Linear(2 * c, classes)

    def forward(self, x):
        x = self.norm(self.embed(torch.relu(self.stem(x))))
        x = x + self.mlp(torch.relu(x))
        return self.head(x.mean((2, 3)))


def test_multiplier_output_and_one_variable_grow_together():
    net = lifecycle(MultiplierResidual(), X, seed_width=0.5)
    assert all(g.growable for g in groups_of(net, "mlp")), reasons(net)
    assert groups_of(net, "mlp") == groups_of(net, "stem")  # two channels of mlp per channel of stem
    assert "different layouts" not in reasons(net)


class OffsetSlice(nn.Module):
    """A slice that starts at channel 1: the piece after a one-channel first piece."""

    def __init__(self, classes=5):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.conv = nn.Conv2d(5, 6, 1)
        self.head = nn.Linear(6 + 2, classes)

    def forward(self, x):
        x = torch.relu(self.stem(x))
        y = torch.cat([self.conv(x[:, 1:6]), x[:, 6:]], 1)
        return self.head(y.mean((2, 3)))


def test_slice_from_channel_one_reads_its_own_piece():
    net = lifecycle(OffsetSlice(), X, seed_width=0.5)
    fed = [g for g in net.coupling_groups if any(b.target == "conv" and b.role == "in" for b in g.members)]
    assert [sum(1 for b in g.members if b.target == "conv" and b.role == "in") for g in fed] == [1]
    assert fed[0].growable, reasons(net)
