"""Issue 2 property sweep on a representative set of backbones covering every coupling pattern."""

import pytest

from engine_checks import check_backbone

REPRESENTATIVE = [
    "lenet5", "small_cnn",  # the seed paper's LeNet-5 (20-50-800-500) and a BN CNN
    "resnet18", "resnet50",  # residual add, bottleneck, downsample
    "vgg16_bn",  # the seed paper's VGG16-BN: flatten -> Linear with a spatial factor
    "mobilenet_v2", "mobilenet_v3_small", "efficientnet_b0",  # depthwise, squeeze-excitation multiply
    "densenet121", "googlenet", "squeezenet1_0",  # concatenation with offsets, conv classifier
    "regnet_x_400mf",  # grouped convolutions
    "shufflenet_v2_x0_5",  # chunk + channel shuffle
    "convnext_tiny",  # LayerNorm2d, NHWC permutes, MLP hidden dims
    # torchvision's ViT and Swin classes at a test's size (vit_b_16 and swin_t themselves: the slow zoo test)
    "vit_small_test", "swin_small_test",  # class token, attention, shifted windows, relative position bias
]


@pytest.mark.parametrize("name", REPRESENTATIVE)
def test_backbone_properties(name):
    report = check_backbone(name, seed_width=0.25 if name == "vgg16_bn" else 0.5)
    assert report["growable"] > 0


@pytest.mark.parametrize("name", ["lenet5", "vgg16_bn_cifar"])
def test_channel_granularity_keeps_every_property(name):
    """granularity 'channel' (a Linear's unit: a flattened channel's columns, or a block of input neurons that
    grow together): growth, old tasks, exports and counts hold as with one unit per weight."""
    report = check_backbone(name, seed_width=0.5, granularity="channel")
    assert report["growable"] > 0


def test_a_channel_unit_is_kept_or_dropped_whole():
    import torch

    import grownfx
    from grownfx.engine import masks as M
    from grownfx.models import build_backbone

    torch.manual_seed(0)
    net = grownfx.prepare(build_backbone("lenet5", 4), torch.randn(2, 3, 32, 32), 0.5, granularity="channel")
    fc = [m for m in net.masked_layers() if m.weight.dim() == 2]
    # fc1 reads 25 flattened channels of 25 positions; fc2 reads fc1's neurons, in blocks of 16 (LINEAR_BLOCK)
    assert [m.unit_cols for m in fc] == [25, 16] and all(m.owner.shape[1] * m.unit_cols == m.weight.shape[1] for m in fc)
    net.add_task(4)
    net.freeze_task(0)
    net.add_task(4)  # selective masks on task 0's units
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for m in fc:
            m.score.copy_(torch.rand(m.score.shape, generator=g) * 0.01)  # about half the units dropped
    net.freeze_task(1)
    for m in fc:
        used = M.unpack_bits(getattr(m, "mask_1"), m.mask_shapes[1])
        assert 0 < float(used.float().mean()) < 1
        with torch.no_grad(), net.computing(1):
            w = m.effective_weight()
        blocks = (w != 0).view(w.shape[0], -1, m.unit_cols)
        assert torch.equal(blocks.any(-1), used) and torch.equal(blocks.all(-1), used)  # whole blocks


def test_prepare_leaves_the_callers_model_untouched():
    import torch
    import torchvision

    import grownfx

    model = torchvision.models.resnet18(num_classes=10)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    net = grownfx.prepare(model, torch.randn(2, 3, 32, 32), seed_width=0.5)
    net.add_task(10)
    net.grow(ratio=0.25)
    after = model.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
