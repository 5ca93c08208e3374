"""Continual-learning methods, all run by the same runner on the same stream: GROWN and the paper's baselines."""

from __future__ import annotations

import torch

from grownfx.recipe.schema import Recipe
from grownfx.data import TaskStream
from grownfx.learn.methods.apd import APDContinual
from grownfx.learn.methods.base import ContinualMethod
from grownfx.learn.methods.cpg import CPGContinual
from grownfx.learn.methods.den import DENContinual
from grownfx.learn.methods.finetune import FinetuneContinual
from grownfx.learn.methods.grown import GrownContinual, build_net
from grownfx.learn.methods.lwf import LwFContinual
from grownfx.learn.methods.regularisation import EWCContinual, MASContinual, SIContinual
from grownfx.learn.methods.replay import ERContinual
from grownfx.learn.methods.packnet import PackNetContinual
from grownfx.learn.methods.piggyback import PiggybackContinual
from grownfx.learn.methods.pnn import PNNContinual
from grownfx.learn.methods.scratch import ScratchContinual, train_plain

_REGISTRY = {
    "grown": GrownContinual,
    "grow": GrownContinual,
    "scratch": ScratchContinual,
    "finetune": FinetuneContinual,
    "pnn": PNNContinual,
    "packnet": PackNetContinual,
    "piggyback": PiggybackContinual,
    "cpg": CPGContinual,
    "ewc": EWCContinual,
    "si": SIContinual,
    "mas": MASContinual,
    "lwf": LwFContinual,
    "er": ERContinual,
    "den": DENContinual,
    "apd": APDContinual,
}


def make_method(recipe: Recipe, stream: TaskStream, device: torch.device, **hooks) -> ContinualMethod:
    name = recipe.method.name
    if name not in _REGISTRY:
        raise NotImplementedError(f"method {name!r} is not available yet")
    return _REGISTRY[name](recipe, stream, device, **hooks)


__all__ = ["APDContinual", "CPGContinual", "ContinualMethod", "DENContinual", "ERContinual", "EWCContinual", "FinetuneContinual", "GrownContinual",
           "LwFContinual", "MASContinual", "PNNContinual", "PackNetContinual", "PiggybackContinual", "SIContinual",
           "ScratchContinual", "build_net", "make_method", "train_plain"]
