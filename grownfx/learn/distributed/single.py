"""The single-process `Dist`: every collective is the identity, `wrap` returns the module itself.

Every training loop takes a `Dist`; with this one it is the plain single-process loop.
"""

from __future__ import annotations

from typing import Any, Callable, Optional, Sequence

import torch
from torch import nn

from grownfx.data.core import BatchLoader, TaskData
from grownfx.learn.training import accuracy

# Every method trains through grownfx.learn.training.train_stage and runs data-parallel, except CPG, whose
# pruning search (grownfx.learn.methods.cpg) has loops of its own that are not rank-aware.
DISTRIBUTED_METHODS = ("grown", "grow", "scratch", "finetune", "pnn", "packnet", "piggyback")


class Dist:
    """One process: every collective is the identity, `wrap` returns the module itself."""

    world_size = 1
    rank = 0
    local_rank = 0

    def __init__(self, device: torch.device | str = "cpu"):
        self.device = torch.device(device)

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    # collectives
    def all_reduce_sum(self, values: Sequence[float]) -> list[float]:
        return list(values)

    def any(self, flag: bool) -> bool:
        return bool(flag)

    def broadcast_object(self, obj: Any) -> Any:
        return obj

    def barrier(self) -> None:
        pass

    def main_first(self, fn: Callable[[], Any]) -> Any:
        """Run `fn` on rank 0; other ranks get its result, or raise its exception."""
        return fn()

    def reduce_epoch(self, loss: float, penalty: float, acc: float, images: int) -> tuple[float, float, float, int]:
        """An epoch's (mean loss, mean penalty, accuracy %, images) over all ranks."""
        return loss, penalty, acc, images

    # modules
    def wrap(self, module: nn.Module, trainable: Optional[dict] = None) -> nn.Module:
        """What a training stage calls: the module itself here, DDP around it with several processes."""
        return module

    def stats_loader(self, data: TaskData, batch_size: int, device) -> BatchLoader:
        """`data` in order, unaugmented, whole batches only when there is one (a batch of one has no variance):
        what PreciseBN (training.recompute_norm_stats) passes over."""
        return data.loader(batch_size, device=device, augment=None, drop_last=len(data) > batch_size)

    def end_stage(self, module: nn.Module) -> None:
        """After a stage (its wrapper dropped): rank 0's buffers everywhere."""

    def broadcast_buffers(self, module: nn.Module) -> None:
        pass

    def check_in_sync(self, module: nn.Module, what: str, extra: Optional[dict] = None) -> None:
        pass

    # data
    def train_loader(self, data: TaskData, batch_size: int, generator: torch.Generator, device) -> BatchLoader:
        return data.loader(batch_size, shuffle=True, generator=generator, device=device)

    def step_forward(self, forward: Callable[[torch.Tensor], torch.Tensor], loader) -> Callable:
        """The training step's `x -> logits`: `forward` itself here (several ranks weight uneven shards)."""
        return forward

    def evaluate(self, model: Callable, data: TaskData, batch_size: int, device, precision: str = "fp32",
                 channels_last: bool = False) -> float:
        loader = data.loader(batch_size, shuffle=False, device=device, augment=None)
        return accuracy(model, loader, device, precision, channels_last)

    def close(self) -> None:
        pass
