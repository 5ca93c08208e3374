"""`ProcessGroupDist`: one rank of a torch.distributed process group, what a training stage calls on it."""

from __future__ import annotations

import gc
import os
import pickle
from typing import Any, Callable, Optional, Sequence

import torch
import torch.distributed as td
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP

from grownfx.data.core import BatchLoader, TaskData
from grownfx.learn.distributed import batchnorm, divergence
from grownfx.learn.distributed.ddp import ddp_kwargs
from grownfx.learn.distributed.divergence import DivergenceError
from grownfx.learn.distributed.sharding import EvalShard, ScaleGrad, StridedShardLoader
from grownfx.learn.distributed.single import Dist
from grownfx.learn.training import accuracy

# dtypes NCCL and gloo cannot move (GROWN's unit-owner buffers are int16): sent as a wider type
_TRANSPORT = {torch.int16: torch.int32, torch.uint16: torch.int32, torch.uint32: torch.int64}


class ProcessGroupDist(Dist):
    """One rank of a torch.distributed process group (already initialised, or joined by `setup`)."""

    def __init__(self, device: torch.device, owns_group: bool = False, sync_bn: bool = True):
        super().__init__(device)
        self.world_size = td.get_world_size()
        self.rank = td.get_rank()
        self.local_rank = int(os.environ.get("LOCAL_RANK", self.rank))
        self.owns_group = owns_group
        self._ddp_kwargs = ddp_kwargs()
        # BatchNorm over the global batch (the statistics of all ranks' samples), as one process computes it
        self.sync_bn = sync_bn
        self._patched: list[nn.Module] = []

    # -- collectives ------------------------------------------------------------------------------------------
    def all_reduce_sum(self, values: Sequence[float]) -> list[float]:
        t = torch.tensor([float(v) for v in values], dtype=torch.float64, device=self.device)
        td.all_reduce(t)
        return t.tolist()

    def any(self, flag: bool) -> bool:
        return self.all_reduce_sum([1.0 if flag else 0.0])[0] > 0

    def broadcast_object(self, obj: Any) -> Any:
        box = [obj if self.rank == 0 else None]
        td.broadcast_object_list(box, src=0, device=self._object_device())
        return box[0]

    def barrier(self) -> None:
        if self.device.type == "cuda":
            td.barrier(device_ids=[self.device.index])
        else:
            td.barrier()

    def main_first(self, fn: Callable[[], Any]) -> Any:
        outcome: tuple = (True, None)
        result = None
        if self.is_main:
            try:
                result = fn()
            except Exception as exc:  # every rank must learn that the run cannot start
                outcome = (False, exc)
        ok, exc = self.broadcast_object(_picklable(outcome))
        if not ok:
            if self.is_main:
                raise outcome[1]
            raise exc
        return result

    def _object_device(self) -> torch.device:
        return self.device if self.device.type == "cuda" else torch.device("cpu")

    def reduce_epoch(self, loss: float, penalty: float, acc: float, images: int) -> tuple[float, float, float, int]:
        # every rank runs the same number of steps: the mean of the ranks' mean losses is the epoch's mean loss
        # (exactly so when every batch splits evenly; an uneven last batch is weighted by rank, for the log only)
        loss_sum, pen_sum, correct, total = self.all_reduce_sum([loss, penalty, round(acc * images / 100.0), images])
        return loss_sum / self.world_size, pen_sum / self.world_size, 100.0 * correct / max(total, 1), int(total)

    # -- modules ----------------------------------------------------------------------------------------------
    def wrap(self, module: nn.Module, trainable: Optional[dict] = None) -> nn.Module:
        """Rank 0's parameters and buffers on every rank, then DDP over the parameters that require grad.

        `trainable` ({group: [parameters]}, what the stage's optimisers get): any other parameter that requires
        a gradient (a finished task's copy, a template) would be reduced by DDP every step for nothing, and
        means that something was not frozen: an error.
        """
        if trainable is not None:
            ids = {id(p) for ps in trainable.values() for p in ps}
            stray = [n for n, p in module.named_parameters() if p.requires_grad and id(p) not in ids]
            if stray:
                raise RuntimeError("parameters that no optimiser trains still require gradients (finished tasks' "
                                   f"copies and templates must be frozen): {', '.join(stray[:5])}"
                                   + (f" and {len(stray) - 5} more" if len(stray) > 5 else ""))
        self._verify_structure(module)
        self._broadcast(list(module.parameters()) + list(module.buffers()))
        if self.sync_bn:
            self._patched = batchnorm.patch(module)
        ids = [self.device.index] if self.device.type == "cuda" else None
        return DDP(module, device_ids=ids, output_device=ids[0] if ids else None, **self._ddp_kwargs)

    def end_stage(self, module: nn.Module) -> None:
        # the caller has dropped the stage's DDP wrapper; collecting it removes its reducer's gradient hooks
        # before the next stage wraps parameters that may be the same objects
        batchnorm.unpatch(self._patched)
        self._patched = []
        gc.collect()
        self.broadcast_buffers(module)

    def broadcast_buffers(self, module: nn.Module) -> None:
        self._broadcast(list(module.buffers()))

    @torch.no_grad()
    def _broadcast(self, tensors: list[torch.Tensor]) -> None:
        """Broadcast from rank 0, one flat message per dtype (int16 and co. travel as a wider integer type)."""
        by_dtype: dict[torch.dtype, list[torch.Tensor]] = {}
        for t in tensors:
            by_dtype.setdefault(t.dtype, []).append(t)
        for dtype, group in by_dtype.items():
            wire = _TRANSPORT.get(dtype, dtype)
            flat = torch.cat([t.detach().reshape(-1).to(device=self.device, dtype=wire) for t in group])
            if flat.numel() == 0:
                continue
            td.broadcast(flat, src=0)
            if self.rank == 0:
                continue
            pos = 0
            for t in group:
                n = t.numel()
                t.data.copy_(flat[pos:pos + n].view(t.shape).to(device=t.device, dtype=t.dtype))
                pos += n

    def _verify_structure(self, module: nn.Module) -> None:
        """Every rank must hold the same tensors (names, shapes, dtypes) before rank 0's values are broadcast."""
        mine = divergence.structure(module)
        ref = self.broadcast_object(mine)
        diff = divergence.first_difference(ref, mine)
        bad = self.all_reduce_sum([0.0 if diff is None else 1.0])[0]
        if bad:
            raise DivergenceError(
                "ranks hold different network structures before a training stage"
                + (f"; rank {self.rank} differs from rank 0 at {diff}" if diff is not None else "")
                + ": growth, gate settling or freezing made different changes on different ranks")

    def check_in_sync(self, module: nn.Module, what: str, extra: Optional[dict] = None) -> None:
        """All-gather a hash of every parameter and buffer (and `extra` values); raise on the first difference."""
        gathered: list = [None] * self.world_size
        td.all_gather_object(gathered, divergence.digests(module, extra))
        divergence.raise_on_divergence(gathered, what)

    # -- data -------------------------------------------------------------------------------------------------
    def train_loader(self, data: TaskData, batch_size: int, generator: torch.Generator, device) -> BatchLoader:
        return StridedShardLoader(data, batch_size, rank=self.rank, world_size=self.world_size,
                                  generator=generator, device=device)

    def stats_loader(self, data: TaskData, batch_size: int, device) -> BatchLoader:
        """This rank's share of each global batch of `data`, in order, unaugmented, whole batches: with the
        stage's BatchNorm synchronised, every batch's statistics are those of the single-process batch."""
        return StridedShardLoader(data, batch_size, rank=self.rank, world_size=self.world_size, generator=None,
                                  device=device, augment=None, shuffle=False, drop_last=True)

    def step_forward(self, forward: Callable[[torch.Tensor], torch.Tensor], loader) -> Callable:
        def step(x: torch.Tensor) -> torch.Tensor:
            out = forward(x)
            scale = getattr(loader, "grad_scale", 1.0)
            return out if scale == 1.0 else ScaleGrad.apply(out, scale)

        return step

    def evaluate(self, model: Callable, data: TaskData, batch_size: int, device, precision: str = "fp32",
                 channels_last: bool = False) -> float:
        loader = EvalShard(data, batch_size, self.rank, self.world_size, device)
        n = loader._num_samples()
        acc = accuracy(model, loader, device, precision, channels_last)
        correct, total = self.all_reduce_sum([round(acc * n / 100.0), n])
        return 100.0 * correct / max(total, 1)

    def close(self) -> None:
        if self.owns_group and td.is_initialized():
            # every rank reaches this point before any tears the group down: gloo aborts a process whose peer
            # closes the connection while it still has a collective in flight
            td.barrier()
            td.destroy_process_group()


def _picklable(outcome: tuple) -> tuple:
    ok, exc = outcome
    if exc is None:
        return outcome
    try:
        pickle.loads(pickle.dumps(exc))
        return outcome
    except Exception:
        return ok, RuntimeError(f"{type(exc).__name__}: {exc}")
