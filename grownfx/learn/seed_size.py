"""`model.seed_size`: the seed network's size as a fraction of the backbone's *parameters* (the paper's unit).

The engine slims by a channel fraction (`seed_width`); parameters scale about as its square (0.5 of the
channels of LeNet-5 keeps 0.25 of its parameters).  `width_for_size` finds the channel fraction whose slimmed
network (with the first task's head, as every model-size column counts it) is closest to the requested size.
"""

from __future__ import annotations

from typing import Iterable

import torch
from torch import nn

from grownfx.engine.net import count_parameters
from grownfx.engine.prepare import slim

__all__ = ["size_at_width", "width_for_size"]


def size_at_width(model: nn.Module, example_input: torch.Tensor, width: float, *,
                  leaf_modules: Iterable[str | type] = (), **model_kw) -> float:
    """Parameters of `model` slimmed to `width` (channel fraction) / parameters of `model`.  `model_kw`: the
    recipe's `output` and `head` (engine.prepare.slim)."""
    gm, _, _, full = slim(model, example_input, width, leaf_modules=leaf_modules, **model_kw)
    return count_parameters(gm) / full


def width_for_size(model: nn.Module, example_input: torch.Tensor, size: float, *,
                   leaf_modules: Iterable[str | type] = (), tol: float = 2e-3, steps: int = 14, **model_kw) -> float:
    """The channel fraction in (0, 1] whose slimmed model has `size` x the parameters (bisection; sizes are
    monotone in the width up to channel rounding).  Returns the width of the closest size found."""
    if not 0 < size <= 1:
        raise ValueError(f"seed_size must be in (0, 1], got {size!r}")
    if size == 1:
        return 1.0
    lo, hi = 0.0, 1.0
    best, best_err = 1.0, 1.0 - size
    for _ in range(steps):
        mid = (lo + hi) / 2
        got = size_at_width(model, example_input, mid, leaf_modules=leaf_modules, **model_kw)
        if abs(got - size) < best_err:
            best, best_err = mid, abs(got - size)
        if best_err <= tol:
            break
        lo, hi = (mid, hi) if got < size else (lo, mid)
    return round(best, 6)
