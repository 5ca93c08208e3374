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
    "convnext_tiny", "vit_b_16", "swin_t",  # LayerNorm, NHWC permutes, attention, MLP hidden dims
]


@pytest.mark.parametrize("name", REPRESENTATIVE)
def test_backbone_properties(name):
    report = check_backbone(name, seed_width=0.25 if name == "vgg16_bn" else 0.5)
    assert report["growable"] > 0


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
