"""Guards the stage loops call after every epoch: a diverged run stops with a clear error instead of learning NaN.

    check_epoch(loss, parameters, task=1, stage="stage1", round=0, epoch=3)   # NonFiniteError when not finite

`check_tensors` is the runner's last line of defence: nothing non-finite is checkpointed or exported.
"""

from __future__ import annotations

import math
from typing import Any, Iterable, Optional

import torch

from grownfx.errors import UserError


class NonFiniteError(UserError, RuntimeError):
    """Training diverged: a loss or a weight became NaN or infinite."""


_ADVICE = ("lower training.optimizer.lr (or use a warm-up/scheduler); nothing from this state is checkpointed or "
           "exported")


def check_epoch(loss: float, parameters: Optional[Iterable[torch.Tensor]], *, task: Any, stage: str, epoch: int,
                round: int = 0) -> None:
    """NonFiniteError naming task, stage, round and epoch when `loss` or any of `parameters` is NaN/inf.
    `task`: the 0-based index (printed 1-based, like every task number grownfx prints)."""
    number = task + 1 if isinstance(task, int) else task
    where = f"task {number}, stage {stage}" + (f" round {round}" if round else "") + f", epoch {epoch}"
    if not math.isfinite(float(loss)):
        raise NonFiniteError(f"training diverged: the loss is {loss} in {where}; {_ADVICE}")
    bad = first_nonfinite(parameters or [])
    if bad is not None:
        raise NonFiniteError(f"training diverged: weights became NaN/inf in {where} (tensor {bad}); {_ADVICE}")


def first_nonfinite(tensors: Iterable[Any]) -> Optional[str]:
    """The index (or name, for (name, tensor) pairs) of the first floating tensor with a NaN/inf, else None."""
    items = [(str(i), t) if isinstance(t, torch.Tensor) else (str(t[0]), t[1]) for i, t in enumerate(tensors)]
    items = [(n, t) for n, t in items if isinstance(t, torch.Tensor) and t.is_floating_point() and t.numel()]
    if not items:
        return None
    with torch.no_grad():
        flags = torch.stack([torch.isfinite(t.detach()).all().to("cpu") for _, t in items])
    if bool(flags.all()):
        return None
    return items[int((~flags).nonzero()[0])][0]


def check_tensors(obj: Any, what: str) -> None:
    """NonFiniteError when any floating tensor inside `obj` (nested dicts, lists, tuples) is NaN/inf."""
    found: list[tuple[str, torch.Tensor]] = []

    def walk(o: Any, path: str) -> None:
        if isinstance(o, torch.Tensor):
            found.append((path, o))
        elif isinstance(o, dict):
            for k, v in o.items():
                walk(v, f"{path}.{k}" if path else str(k))
        elif isinstance(o, (list, tuple)):
            for i, v in enumerate(o):
                walk(v, f"{path}[{i}]")

    walk(obj, "")
    bad = first_nonfinite(found)
    if bad is not None:
        raise NonFiniteError(f"refusing to write {what}: tensor {bad} is NaN/inf (training diverged); {_ADVICE}")
