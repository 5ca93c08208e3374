"""VGG16-BN for 32x32 inputs exactly as CPG's CIFAR experiments build it (ivclab/CPG `models/vgg.py`:
`custom_vgg_cifar100`, `make_layers_cifar100`), the backbone of the seed paper's Superclass-20 tables.

Configuration D: 13 convs 3x3, padding 1, no bias, each followed by BatchNorm2d and ReLU, max-pools after
conv 2, 4, 7, 10, 13; a 32x32 input leaves 512x1x1, viewed as 512 features; then Linear 512->4096, ReLU,
Linear 4096->4096, ReLU, and the task head Linear 4096->classes.  No dropout, no adaptive pooling (CPG has it
commented out).  Init as CPG: kaiming_normal (fan_out, relu) for convs, N(0, 0.01) and zero bias for linears,
BatchNorm weight 1 / bias 0.  About 33.6 M parameters before the head (torchvision's ImageNet `vgg16_bn`,
with its 25088->4096 classifier and dropout, has 134.3 M).
"""

from __future__ import annotations

from torch import nn

__all__ = ["CFG_D", "VGGCifar", "vgg16_bn_cifar"]

CFG_D: tuple = (64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M")


def make_layers(cfg, in_channels: int = 3) -> nn.Sequential:
    layers: list[nn.Module] = []
    c = in_channels
    for v in cfg:
        if v == "M":
            layers.append(nn.MaxPool2d(kernel_size=2, stride=2))
        else:
            layers += [nn.Conv2d(c, v, kernel_size=3, padding=1, bias=False), nn.BatchNorm2d(v), nn.ReLU(inplace=True)]
            c = v
    return nn.Sequential(*layers)


class VGGCifar(nn.Module):
    """features (config D, BN) -> flatten (512) -> FC 4096 -> ReLU -> FC 4096 -> ReLU -> classifier."""

    def __init__(self, num_classes: int = 5, in_channels: int = 3, cfg=CFG_D, hidden: int = 4096):
        super().__init__()
        self.features = make_layers(cfg, in_channels)
        last = [v for v in cfg if v != "M"][-1]
        self.shared = nn.Sequential(nn.Flatten(), nn.Linear(last, hidden), nn.ReLU(inplace=True),
                                    nn.Linear(hidden, hidden), nn.ReLU(inplace=True))
        self.classifier = nn.Linear(hidden, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, 0, 0.01)
                nn.init.zeros_(m.bias)

    def forward(self, x):
        return self.classifier(self.shared(self.features(x)))


def vgg16_bn_cifar(num_classes: int = 5, **kwargs) -> VGGCifar:
    """CPG's CIFAR VGG16-BN (expects 32x32 inputs: five 2x2 pools leave 1x1)."""
    return VGGCifar(num_classes=num_classes, **kwargs)


vgg16_bn_cifar.input_shape = (3, 32, 32)  # what `grownfx inspect vgg16_bn_cifar` feeds it
