"""LeNet-5 as used by the seed paper on CIFAR-100 Split (APD's 20-50-800-500 variant)."""

from __future__ import annotations

from torch import nn


class LeNet5(nn.Module):
    """conv5x5(20) -> pool -> conv5x5(50) -> pool -> FC(800) -> FC(500) -> classifier."""

    def __init__(self, num_classes: int = 10, in_channels: int = 3, input_size: int = 32,
                 widths: tuple[int, int, int, int] = (20, 50, 800, 500)):
        super().__init__()
        c1, c2, f1, f2 = widths
        spatial = ((input_size - 4) // 2 - 4) // 2
        self.features = nn.Sequential(
            nn.Conv2d(in_channels, c1, 5), nn.ReLU(inplace=True), nn.MaxPool2d(2),
            nn.Conv2d(c1, c2, 5), nn.ReLU(inplace=True), nn.MaxPool2d(2),
        )
        self.classifier = nn.Sequential(
            nn.Flatten(), nn.Linear(c2 * spatial * spatial, f1), nn.ReLU(inplace=True),
            nn.Linear(f1, f2), nn.ReLU(inplace=True), nn.Linear(f2, num_classes),
        )

    def forward(self, x):
        return self.classifier(self.features(x))


def lenet5(num_classes: int = 10, **kwargs) -> LeNet5:
    return LeNet5(num_classes=num_classes, **kwargs)


lenet5.input_shape = (3, 32, 32)  # what `grownfx inspect lenet5` feeds it (the CIFAR LeNet)
