"""Rank r's share of each global batch (training) and of a split (evaluation)."""

from __future__ import annotations

import math
from typing import Iterator

import torch

from grownfx.data.core import BatchLoader, TaskData


class StridedShardLoader(BatchLoader):
    """Rank r's share of the single-process epoch: entries r, r + world, ... of each global batch.

    The epoch order is the one the single-process loader draws (`randperm(n, generator)`; the loop re-seeds the
    generator from (seed, task, stage, round, epoch) every epoch, which is what DistributedSampler's `set_epoch`
    does).  Each global batch of the recipe's size is split across ranks with a stride, so rank r sees exactly
    `order[r::world]` over the epoch (DistributedSampler's split) and the ranks' batches at step k together are
    the single-process batch k.  A last, partial global batch may split unevenly; `grad_scale` (read by
    `step_forward`) then weights each rank's mean loss by its share, so that the averaged gradient is still that
    of the global batch's mean loss.  Only a last batch with fewer samples than ranks is dropped.

    Augmentation: every rank augments the whole global batch with the epoch's generator, in the single-process
    order, and keeps its strided rows, so each sample gets the crop and flip the single process gives it (the
    augmentations draw per-sample parameters for the batch at once; drawing them per shard would give rank r
    other samples' draws).  That is `world` times the augmentation work, which is small next to a training step.
    """

    def __init__(self, data: TaskData, global_batch: int, *, rank: int, world_size: int,
                 generator: torch.Generator | None, device=None, augment="default", shuffle: bool = True,
                 drop_last: bool = False):
        if global_batch % world_size:
            raise ValueError(f"the batch size {global_batch} is global and must be divisible by the number of "
                             f"processes ({world_size})")
        aug = data.augment if augment == "default" else augment
        super().__init__(data, global_batch // world_size, shuffle=shuffle, generator=generator, device=device,
                         augment=aug)
        self.rank, self.world_size, self.global_batch = rank, world_size, global_batch
        n = len(data)
        tail = n % global_batch
        # every rank gets at least one sample per step; `drop_last`: whole global batches only (when there is one)
        self.usable = n - tail if (0 < tail < world_size or (drop_last and n > global_batch)) else n
        self.grad_scale = 1.0

    def __len__(self) -> int:
        return math.ceil(self.usable / self.global_batch)  # the same on every rank

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        order = self._order()[: self.usable].to(self.data.device)  # drawn eagerly, as BatchLoader does
        return self._shard_batches(order, self.generator)

    def _shard_batches(self, order: torch.Tensor, gen) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        for start in range(0, len(order), self.global_batch):
            batch = order[start: start + self.global_batch]
            rows = slice(self.rank, None, self.world_size)
            idx = batch[rows]
            self.grad_scale = self.world_size * len(idx) / len(batch)
            yb = self.data.y[idx].to(self.device, non_blocking=True)
            if self.augment is None:
                xb = self.data.x[idx].to(self.device, non_blocking=True)
                yield self.data.normalize(xb, None, gen), yb
            else:  # the single-process draws for the whole global batch, then this rank's rows
                xb = self.data.x[batch].to(self.device, non_blocking=True)
                yield self.data.normalize(xb, self.augment, gen)[rows], yb


class ScaleGrad(torch.autograd.Function):
    """Identity forward; multiplies the gradient by `scale` (a rank's share of an uneven last batch)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, scale: float) -> torch.Tensor:  # noqa: D102
        ctx.scale = scale
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):  # noqa: D102
        return grad * ctx.scale, None


class EvalShard(BatchLoader):
    """Rows rank, rank + world, ... of a split, in order, without augmentation."""

    def __init__(self, data: TaskData, batch_size: int, rank: int, world_size: int, device=None):
        super().__init__(data, batch_size, shuffle=False, device=device, augment=None)
        self.rank, self.world_size = rank, world_size

    def _num_samples(self) -> int:
        return len(range(self.rank, len(self.data), self.world_size))

    def _order(self) -> torch.Tensor:
        return torch.arange(self.rank, len(self.data), self.world_size)
