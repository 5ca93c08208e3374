"""timm backbones out of the box (timm is optional: `pip install -e ".[timm]"`; skipped without it).

One tiny model runs in the fast suite; the architectures of issue 11 (norm-act layers, timm's Linear head,
Conv2dSame, numeric channel slices, distillation heads) are marked slow.  `scripts/timm_coverage.py` sweeps one
architecture per family and writes docs/coverage.md."""

from __future__ import annotations

import gc

import pytest
import torch

from engine_checks import check_backbone

timm = pytest.importorskip("timm")


def _build(size: int, **kw):
    def builder(name):
        return timm.create_model(name, pretrained=False, num_classes=10, **kw), torch.randn(2, 3, size, size)

    return builder


def test_tiny_timm_model_batchnormact_and_timm_linear():
    # lcnet_035: BatchNormAct2d everywhere, a timm Linear classifier after a conv_head
    report = check_backbone("lcnet_035", 0.5, builder=_build(32))
    assert report["growable"] >= 10
    assert sorted(report["fixed_reasons"]) == ["touches the logits", "touches the network input"]


def test_timm_vgg_conv_mlp_is_traced_not_a_leaf():
    # timm's VGG pre_logits (ConvMlp) branches on its input's shape: traced as tracing.traced_forward's equivalent
    # (probed against this timm's own forward), its fc1 and fc2 grow; as an automatic leaf they stayed fixed
    from timm.models.vgg import VGG

    def builder(name):
        return VGG([8, "M", 16, "M"], num_classes=10, mlp_ratio=1 / 64), torch.randn(2, 3, 8, 8)

    report = check_backbone("vgg", 0.5, builder=builder, auto_leaves=True)
    assert report["growable"] == 4  # conv1 -> conv2, conv2 -> fc1, fc1 -> fc2, fc2 -> head
    assert sorted(report["fixed_reasons"]) == ["touches the logits", "touches the network input"]


SLOW = [
    ("cspresnet50", 64, {}),  # BatchNormAct2d: no growth site before
    ("dpn68", 32, {}),  # + numeric channel slices of a conv's output
    ("repvgg_a0", 32, {}),
    ("mobilenetv3_large_100", 32, {}),  # timm Linear classifier after conv_head
    ("ghostnet_050", 32, {}),  # out[:, :self.out_chs]
    ("tf_mixnet_s", 32, {}),  # Conv2dSame, split([...]) of mixed depthwise convs
    ("efficientnet_b0", 32, {}),
    ("levit_128s", 64, {"img_size": 64}),  # head + head_dist
    ("efficientformer_l1", 224, {}),  # attention biases are fixed at 7x7 cells
]


@pytest.mark.slow
@pytest.mark.parametrize("name,size,kw", SLOW, ids=[s[0] for s in SLOW])
def test_timm_architectures(name, size, kw):
    try:
        report = check_backbone(name, 0.5, builder=_build(size, **kw))
    finally:
        gc.collect()
    assert report["growable"] > 0
