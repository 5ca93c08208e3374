"""The small models and helpers of the model-reading tests (tests/test_model_reading*.py): a conv frame whose
middle a test fills in, one input, and what the coupling analysis says about a prepared net."""

from __future__ import annotations

import torch
from torch import nn

X = torch.randn(4, 3, 8, 8)


def groups_of(net, target, role="out"):
    return [g for g in net.coupling_groups if any(b.target == target and b.role == role for b in g.members)]


def reasons(net) -> str:
    return " | ".join(r for g in net.coupling_groups for r in g.reasons)


class Frame(nn.Module):
    """stem conv -> pattern (the subclass's `mid`) -> conv -> pooled linear head."""

    def __init__(self, c=8, classes=5):
        super().__init__()
        self.stem = nn.Conv2d(3, c, 3, padding=1)
        self.conv = nn.Conv2d(c, c, 3, padding=1)
        self.head = nn.Linear(c, classes)

    def forward(self, x):
        return self.head(self.conv(self.mid(torch.relu(self.stem(x)))).mean((2, 3)))


class Plain(Frame):
    """Nothing in the middle."""

    def mid(self, x):
        return x
