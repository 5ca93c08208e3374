"""How `prepare` reads hand-written models' ops (issue 22): one-channel producers that broadcast (class 2),
non-float per-channel constants (class 3), slice bounds computed in the graph (class 4), and what it must not
refuse or fix more than it must (class 6, and what the timm sweep found): padding, flips and rotations, dead
code, a module applied twice, opaque ops, group norms, heads over tokens, depthwise multipliers, grouped convs,
concatenations and unbinds."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import grownfx
from test_silent_cases import lifecycle

from model_frames import X, Frame, groups_of, reasons


# --- class 2: one-channel producers that broadcast --------------------------------------------------------


class SpatialAttention(Frame):
    """CBAM's spatial attention / scSE's spatial squeeze: `x * sigmoid(conv_to_1_channel(x))`."""

    def __init__(self):
        super().__init__()
        self.gate = nn.Conv2d(8, 1, 7, padding=3)

    def mid(self, x):
        return x * torch.sigmoid(self.gate(x))


class OneChannelSum(Frame):
    """Two one-channel maps added (the same channel), then broadcast."""

    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Conv2d(8, 1, 1), nn.Conv2d(8, 1, 1)

    def mid(self, x):
        return x * torch.sigmoid(self.a(x) + self.b(x))


@pytest.mark.parametrize("model", [SpatialAttention, OneChannelSum])
def test_one_channel_broadcast_is_fixed_and_the_rest_grows(model):
    # before: the 1-channel output was growable, and the first grow() broke the forward
    net = lifecycle(model(), X)
    gate = groups_of(net, "gate" if model is SpatialAttention else "a")
    assert gate and not gate[0].growable and "one channel is broadcast over 8" in gate[0].reasons[0]
    assert all(g.growable for g in groups_of(net, "stem")), reasons(net)


# --- class 3: non-float per-channel constants ----------------------------------------------------------------


class BatchContext(Frame):
    """A context vector of the whole batch (1-d: one value per channel) through a functional linear, added to the
    conv's channels."""

    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.randn(8, 8) * 0.3)

    def forward(self, x):
        s = torch.relu(self.stem(x))
        context = F.linear(s.mean((0, 2, 3)), self.w)
        return self.head((self.conv(s) + context.view(1, -1, 1, 1)).mean((2, 3)))


def test_a_functional_linear_on_a_vector_grows_its_inputs():
    # as on a batch of rows: the weight's input columns follow the stem's channels; its outputs, made by a
    # parameter the analysis does not own as a layer, are fixed with that reason
    net = lifecycle(BatchContext(), X)
    assert all(g.growable for g in groups_of(net, "stem")), reasons(net)
    assert not any(g.growable for g in groups_of(net, "conv"))
    assert "functional linear of parameter 'w'" in reasons(net)


class ChannelMask(Frame):
    def __init__(self, dtype):
        super().__init__()
        self.register_buffer("keep", (torch.arange(8) % 3 != 0).to(dtype).view(1, 8, 1, 1))

    def mid(self, x):
        if self.keep.dtype == torch.bool:
            return torch.where(self.keep, x, 0.0)
        return x * self.keep


@pytest.mark.parametrize("dtype", [torch.bool, torch.int64, torch.uint8], ids=str)
def test_integer_and_bool_channel_masks_are_copied_per_task(dtype):
    # before: one mask for every task, resized by growth for all at once: a finished task crashed after growth
    net = lifecycle(ChannelMask(dtype), X)
    assert all(g.growable for g in groups_of(net, "stem")), reasons(net)
    holder = net.graph_module.get_submodule("task_params.keep")
    assert holder.copies[0].dtype == dtype and holder.copies[0].shape[1] < holder.copies[1].shape[1]


# --- class 4: slice bounds computed in the graph -------------------------------------------------------------


class ColumnScale(Frame):
    """A (C, 1) parameter flattened to (C,), then viewed to broadcast over the channels: two widths written."""

    def __init__(self):
        super().__init__()
        self.scale = nn.Parameter(torch.rand(8, 1) + 0.5)

    def mid(self, x):
        return x * self.scale.reshape(8).view(1, 8, 1, 1)


def test_a_width_written_as_a_reshape_s_only_number_follows_the_channels():
    net = grownfx.prepare(ColumnScale(), X, seed_width=0.5)
    assert all(g.growable for g in groups_of(net, "stem")), reasons(net)
    assert net.graph_module.scale.shape == (4, 1)
    lifecycle(ColumnScale(), X)


class SpatialSoftmax(Frame):
    """Each channel's softmax over its pixels, the shape given as one tuple: `x.reshape((n, 8, -1))`."""

    def mid(self, x):
        return x * x.reshape((x.size(0), 8, -1)).softmax(-1).reshape(x.shape)


def test_a_width_written_in_a_shape_tuple_follows_the_channels():
    net = grownfx.prepare(SpatialSoftmax(), X, seed_width=0.5)
    assert all(g.growable for g in groups_of(net, "stem")), reasons(net)
    assert net.graph_module.stem.out_channels == 4
    lifecycle(SpatialSoftmax(), X)


class HalfChannels(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.conv = nn.Conv2d(4, 8, 3, padding=1)
        self.head = nn.Linear(8, 5)

    def forward(self, x):
        x = self.stem(x)
        x = x[:, : x.shape[1] // 2]
        y = x[..., : x.shape[-1] // 2]  # a spatial slice by the shape: no channel is touched
        return self.head(self.conv(y).mean((2, 3)))


def test_slice_bounds_read_from_the_shape_fix_the_channels():
    # before: TypeError inside prepare
    net = lifecycle(HalfChannels(), X)
    stem = groups_of(net, "stem")[0]
    assert not stem.growable and any("bounds computed in the graph" in r for r in stem.reasons)
    assert all(g.growable for g in groups_of(net, "conv")), reasons(net)


# --- class 6: needless refusals and over-fixing ------------------------------------------------------------


class Padded(Frame):
    def __init__(self, mode):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1, padding_mode=mode)
        self.conv = nn.Conv2d(8, 8, 3, padding=2, dilation=2, padding_mode=mode)

    def mid(self, x):
        return x


@pytest.mark.parametrize("mode", ["reflect", "circular", "replicate"])
def test_padding_modes_grow(mode):
    # before: NotImplementedError in prepare (and leaf_modules did not help)
    net = lifecycle(Padded(mode), X)
    assert len(net.growable_groups) == 2
    assert net.export(0).get_submodule("stem").padding_mode == mode


class ChannelPad(Frame):
    """`F.pad(x, (0, 0, 0, 0, 1, 1))` on NCHW: the third pair pads the channel axis (2 constant channels)."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(10, 8, 3, padding=1)

    def mid(self, x):
        return F.pad(x, (0, 0, 0, 0, 1, 1))


def test_padding_the_channel_axis_fixes_its_channels():
    # a pad of 3 (left, right) pairs reaches back to the channels: they cannot grow under it
    net = grownfx.prepare(ChannelPad(), X)
    assert not any(g.growable for g in groups_of(net, "stem")) and "'pad'" in reasons(net)


class SizeScaled(Frame):
    """`x * x.size(1) ** -0.5`: a value computed from the channel count."""

    def mid(self, x):
        return x * x.size(1) ** -0.5


def test_a_channel_count_read_with_size_that_scales_values_fixes_the_channels():
    # growing would change the scale, and with it the outputs of the task being learned
    net = grownfx.prepare(SizeScaled(), X)
    assert not any(g.growable for g in groups_of(net, "stem"))
    assert "channel count read from the shape at 'size'" in reasons(net)


class Flipped(Frame):
    def __init__(self, dims):
        super().__init__()
        self.dims = dims

    def mid(self, x):
        return x + torch.flip(x, dims=self.dims) + torch.roll(x, 1, dims=2) + F.pad(x, (1, 1, 1, 1))[..., 1:-1, 1:-1]


def test_spatial_flip_roll_pad_keep_channels_growable():
    # before: `flip` on a spatial axis fixed the channel group ("not in the coupling registry")
    net = lifecycle(Flipped([3]), X)
    assert all(g.growable for g in groups_of(net, "stem")), reasons(net)
    net = lifecycle(Flipped([1]), X)  # flipping the channels themselves: fixed, with the reason
    assert "'flip' moves channels" in reasons(net)


class Rotated(Frame):
    def mid(self, x):
        return x + torch.rot90(x, 1, (2, 3))


def test_a_spatial_rotation_keeps_channels_growable():
    net = lifecycle(Rotated(), X)
    assert all(g.growable for g in groups_of(net, "stem")), reasons(net)


class AssertedDeadCode(Frame):
    """A value computed and never read (an op the registry does not know), then an assert on the input's rank."""

    def mid(self, x):
        spectrum = torch.fft.fft2(x).real  # noqa: F841 - dead code, as users leave it
        torch._assert(x.dim() == 4, "an NCHW input")
        return x


def test_dead_code_is_dropped_around_an_assert_that_is_kept():
    # the assert has a side effect and stays; the unread fft before it is dropped, so it fixes nothing
    net = grownfx.prepare(AssertedDeadCode(), X)
    assert all(g.growable for g in groups_of(net, "stem")), reasons(net)
    targets = [n.target for n in net.graph_module.graph.nodes]
    assert torch._assert in targets and torch.fft.fft2 not in targets


class TwiceApplied(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.conv = nn.Conv2d(8, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)
        self.down = nn.Conv2d(8, 16, 3, padding=1, stride=2)
        self.conv2 = nn.Conv2d(16, 16, 3, padding=1)
        self.head = nn.Linear(16, 5)

    def forward(self, x):
        x = torch.relu(self.stem(x))
        x = torch.relu(self.bn(self.conv(x)))
        x = torch.relu(self.bn(self.conv(x)))  # the same conv (and BN) applied to its own output
        x = torch.relu(self.conv2(torch.relu(self.down(x))))
        return self.head(x.mean((2, 3)))


def test_module_applied_twice_ties_instead_of_fixing():
    # before: "module 'conv' is called with different channel layouts" fixed every group it touched
    net = lifecycle(TwiceApplied(), X)
    assert len(net.growable_groups) == 3, reasons(net)  # stem = conv (tied), down, conv2
    assert groups_of(net, "stem")[0].id == groups_of(net, "conv")[0].id


class Spectral(Frame):
    """An op the analysis cannot follow (an FFT over the spatial axes)."""

    def __init__(self):
        super().__init__(c=16)
        self.conv = nn.Conv2d(16, 32, 3, padding=1)
        self.head = nn.Linear(32, 5)
        self.stem = nn.Conv2d(3, 16, 3, padding=1)

    def mid(self, x):
        return torch.fft.rfft2(x).abs()[..., :4] + x[..., :4]


def test_opaque_op_does_not_tie_spatial_axes_into_its_group():
    # before: the op's spatial axes were tied into the channel group: "members of different widths [16, 32]"
    net = lifecycle(Spectral(), torch.randn(4, 3, 8, 8))
    stem = groups_of(net, "stem")[0]
    assert not stem.growable and stem.reasons[0].startswith("'fft_rfft2' at node")
    assert "different widths" not in reasons(net)
    assert all(g.growable for g in groups_of(net, "conv")), reasons(net)


class OneGroupNorm(Frame):
    """GroupNorm with one group (PoolFormer's GroupNorm1): a layer norm over the channels and positions."""

    def __init__(self, norm=None):
        super().__init__()
        self.norm = norm or nn.GroupNorm(1, 8)

    def mid(self, x):
        return x + self.norm(x)


class GroupNormAct(nn.GroupNorm):
    def forward(self, x):
        return F.relu(super().forward(x))


def test_one_group_norm_slims_and_grows_like_a_layer_norm():
    # before: its granularity was all its channels, so the seed kept them all (poolformerv2's seed ratio 0.59)
    net = lifecycle(OneGroupNorm(), X, seed_width=0.5)
    stem = groups_of(net, "stem")[0]
    assert stem.growable and stem.granularity == 1 and net.structure.widths[stem.id] > 4  # 8 -> seed 4 -> grown
    # a subclass that computes more than the norm keeps the old rule: whole groups
    net = grownfx.prepare(OneGroupNorm(GroupNormAct(1, 8)), X, seed_width=0.5)
    assert groups_of(net, "stem")[0].granularity == 8


class ShiftOnlyGroupNorm(nn.GroupNorm):
    """Normalises, then adds its bias but never multiplies by its weight: equal to a group norm while the weight
    is still at its initial 1, not after training moves it."""

    def forward(self, x):
        return F.group_norm(x, self.num_groups, None, self.bias, self.eps)


def test_a_group_norm_subclass_is_judged_on_weights_other_than_its_initial_ones():
    # judged a plain one-group norm (a layer norm, one channel per unit) only if it computes one for any weight
    net = grownfx.prepare(OneGroupNorm(ShiftOnlyGroupNorm(1, 8)), X, seed_width=0.5)
    assert groups_of(net, "stem")[0].granularity == 8


class TwoGroupNorm(Frame):
    """GroupNorm(2, 6): slimmed to seed width 0.5 it is one group of 3 channels, yet not a layer norm."""

    def __init__(self):
        super().__init__(c=6)
        self.norm = nn.GroupNorm(2, 6)

    def mid(self, x):
        return self.norm(x)


def test_group_norm_slimmed_to_one_group_keeps_its_channels_per_group():
    # found by the model fuzzer (seed 1587): GroupNorm(2, 6) slimmed to GroupNorm(1, 3) grew as a layer norm, to
    # GroupNorm(1, 6), so its statistics took in the new channels and growth changed the task's outputs by 0.19
    net = lifecycle(TwoGroupNorm(), X, seed_width=0.5)
    stem = groups_of(net, "stem")[0]
    assert stem.growable and stem.granularity == 3 and net.structure.widths[stem.id] > 3, reasons(net)
    for t in range(net.structure.num_tasks):  # every copy and export keeps 3 channels per group
        norms = [net.graph_module.norm.copy_for(t)] + [m for m in net.export(t).modules()
                                                        if isinstance(m, nn.GroupNorm)]
        assert all(m.num_channels == 3 * m.num_groups for m in norms), norms
    # and a one-group norm (a layer norm) stays one group when growth doubles it: 8 -> seed 4 -> 8
    net = grownfx.prepare(OneGroupNorm(), X, seed_width=0.5)
    net.add_task(5)
    net.grow(ratio=1.0)
    norm = net.graph_module.norm
    assert norm.copy_for(0).num_channels == 8 and norm.copy_for(0).num_groups == norm.pending.num_groups == 1


# --- found by the timm sweep ---------------------------------------------------------------------------------


class TokenHeads(nn.Module):
    """VOLO's heads: a class-token head plus an auxiliary head over the other tokens, reduced by `max`."""

    def __init__(self):
        super().__init__()
        self.embed = nn.Linear(6, 8)
        self.head, self.aux_head = nn.Linear(8, 5), nn.Linear(8, 5)

    def forward(self, x):
        t = torch.relu(self.embed(x))
        return self.head(t[:, 0]) + 0.5 * self.aux_head(t[:, 1:]).max(1)[0]


def test_heads_reduced_over_tokens_are_heads():
    # before (with opaque ops no longer tying their outputs): `max` was opaque, the auxiliary head was not found
    net = lifecycle(TokenHeads(), torch.randn(4, 5, 6))
    assert sorted(net.head_targets) == ["aux_head", "head"]
    assert all(g.growable for g in groups_of(net, "embed")), reasons(net)


class LayerNormAct2d(nn.LayerNorm):
    """timm's LayerNormAct2d: permute, layer norm over the channels, activation."""

    def forward(self, x):
        return F.relu(F.layer_norm(x.permute(0, 2, 3, 1), self.normalized_shape, self.weight, self.bias,
                                   self.eps).permute(0, 3, 1, 2))


def test_layer_norm_subclass_that_is_no_plain_layer_norm_fixes_its_channels():
    # before: bound to the last (spatial) axis, its channels were slimmed under it: vitamin_small_224 crashed
    net = lifecycle(OneGroupNorm(LayerNormAct2d(8)), X, seed_width=0.5)
    stem = groups_of(net, "stem")[0]
    assert not stem.growable and "LayerNormAct2d" in stem.reasons[0]


class DepthwiseKinds(nn.Module):
    """A depthwise conv with a channel multiplier (FastViT's, MobileOne's) and one over a concatenation (RDNet's)."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.mult = nn.Conv2d(8, 16, 3, padding=1, groups=8)
        self.bn = nn.BatchNorm2d(16)
        self.side = nn.Conv2d(16, 4, 1)
        self.dw = nn.Conv2d(20, 20, 3, padding=1, groups=20)
        self.head = nn.Linear(20, 5)

    def forward(self, x):
        x = torch.relu(self.bn(self.mult(torch.relu(self.stem(x)))))
        x = torch.cat([x, self.side(x)], 1)
        return self.head(self.dw(x).mean((2, 3)))


def test_depthwise_multiplier_and_concatenated_depthwise_grow():
    # before: both fixed everything they touched (fastvit_t8's seed ratio 0.56, rdnet_tiny's 0.53)
    net = lifecycle(DepthwiseKinds(), X, seed_width=0.5)
    assert all(g.growable for g in groups_of(net, "stem") + groups_of(net, "side")), reasons(net)
    mult = net.export(1).get_submodule("mult")
    assert mult.out_channels == 2 * mult.in_channels == 2 * mult.groups


class GroupedWider(nn.Module):
    """A grouped conv 8 -> 16 with 4 groups: two input channels per group, no channel multiplier."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.grouped = nn.Conv2d(8, 16, 3, padding=1, groups=4)
        self.head = nn.Linear(16, 5)

    def forward(self, x):
        return self.head(self.grouped(torch.relu(self.stem(x))).mean((2, 3)))


def test_a_grouped_conv_that_widens_groups_of_several_channels_fixes_its_input():
    # only a depthwise conv (one channel per group) maps input c to outputs c*k .. c*k + k-1
    net = grownfx.prepare(GroupedWider(), X)
    assert not any(g.growable for g in groups_of(net, "stem"))
    assert "grouped conv 'grouped' with 8->16 channels" in reasons(net)


class CatUntracked(Frame):
    """A row of channel sums broadcast to 8 channels, concatenated along the height: the row's channels are
    none of x's (no layout, no parameter)."""

    def mid(self, x):
        return torch.cat([x, x[:, :, :1].sum(1, keepdim=True).expand(-1, 8, -1, -1)], 2)


def test_a_concatenation_with_a_tensor_of_untracked_channels_fixes_the_channels():
    net = grownfx.prepare(CatUntracked(), X)
    assert not any(g.growable for g in groups_of(net, "stem"))
    assert "channels concatenated with an untracked tensor at 'cat'" in reasons(net)


class UnbindBatch(Frame):
    """The batch unbound and stacked again (`unbind` with its default dim, 0)."""

    def mid(self, x):
        return torch.stack(x.unbind(), 0)


def test_unbinding_the_batch_leaves_the_channels_growable():
    net = lifecycle(UnbindBatch(), X)
    assert all(g.growable for g in groups_of(net, "stem")) and "unbind" not in reasons(net)
