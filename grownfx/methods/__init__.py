"""Continual-learning methods, all run by the same runner on the same stream: GROWN and the paper's baselines."""

from __future__ import annotations

import torch

from ..config import Recipe
from ..data import TaskStream
from .base import ContinualMethod
from .cpg import CPGContinual
from .finetune import FinetuneContinual
from .grown import GrownContinual, build_net
from .packnet import PackNetContinual
from .piggyback import PiggybackContinual
from .pnn import PNNContinual
from .scratch import ScratchContinual, train_plain

_REGISTRY = {
    "grown": GrownContinual,
    "grow": GrownContinual,
    "scratch": ScratchContinual,
    "finetune": FinetuneContinual,
    "pnn": PNNContinual,
    "packnet": PackNetContinual,
    "piggyback": PiggybackContinual,
    "cpg": CPGContinual,
}


def make_method(recipe: Recipe, stream: TaskStream, device: torch.device, **hooks) -> ContinualMethod:
    name = recipe.method.name
    if name not in _REGISTRY:
        raise NotImplementedError(f"method {name!r} is not available yet")
    return _REGISTRY[name](recipe, stream, device, **hooks)


__all__ = ["CPGContinual", "ContinualMethod", "FinetuneContinual", "GrownContinual", "PNNContinual",
           "PackNetContinual", "PiggybackContinual", "ScratchContinual", "build_net", "make_method", "train_plain"]
