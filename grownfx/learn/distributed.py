"""Multi-process (data-parallel) GROWN: one process per GPU (or CPU worker), PyTorch's DDP for the gradients.

    torchrun --nproc-per-node 4 -m grownfx run RECIPE ...     # any torchrun launch, one node or several
    grownfx run RECIPE --nproc-per-node 4                      # the same, handed to torch.distributed.run

`setup(device_spec)` reads torchrun's environment (WORLD_SIZE, RANK, LOCAL_RANK) and returns a `Dist`:
the single-process no-op version when WORLD_SIZE is unset or 1, else `ProcessGroupDist`, which joins the
process group (NCCL on CUDA, gloo on CPU) with its device picked by LOCAL_RANK.

What is synchronised, and when (docs/distributed.md has the long version):

* every training stage: `wrap(net)` checks that every rank holds the same tensors (names, shapes), broadcasts
  rank 0's parameters and buffers, and wraps the net in PyTorch's `DistributedDataParallel` over the parameters
  that require gradients (the learning task's weights, masks and gates); the learner builds the stage's optimiser
  as before.  Growth, gate settling, mask binarisation and freezing happen between stages, identically on every
  rank (same seeded generator; decisions from replicated parameters or all-reduced statistics), then a new wrap.
* every step: rank r trains on entries r, r + world, ... of the single-process run's global batch (the recipe's
  batch size is global; each rank gets batch // world); DDP averages the gradients; BatchNorm normalises with the
  statistics of the whole global batch (all-reduced sums; `GROWNFX_SYNC_BN=0` keeps per-rank statistics).  The
  step is then the single-process step on the global batch, up to float summation order.
* end of every stage: `end_stage(net)` drops the wrapper and copies rank 0's buffers (BatchNorm running
  statistics) to every rank.
* validation and test accuracy: each rank evaluates a strided shard; correct and total counts are all-reduced, so
  growth decisions (val accuracy < target) are the same everywhere.
* after every task: `check_in_sync(net, ...)` all-gathers a hash of every parameter and buffer (masks included)
  and raises `DivergenceError` naming the first tensor that differs between ranks.
"""

from __future__ import annotations

import datetime
import gc
import hashlib
import inspect
import math
import os
import pickle
from typing import Any, Callable, Iterable, Iterator, Optional, Sequence

import torch
from torch import nn

from grownfx.data.core import BatchLoader, TaskData
from grownfx.learn.training import accuracy, derive_seed, resolve_device

__all__ = ["DivergenceError", "Dist", "ProcessGroupDist", "launch", "launched", "setup", "env_rank",
           "exit_worker", "StridedShardLoader"]

# The methods that run data-parallel; the baselines are single-process.
DISTRIBUTED_METHODS = ("grown", "grow")


class DivergenceError(RuntimeError):
    """Ranks that should hold identical networks do not."""


def launched() -> bool:
    """True when this process was started by torchrun (or another launcher setting WORLD_SIZE)."""
    return "WORLD_SIZE" in os.environ and "RANK" in os.environ


def exit_worker(code) -> None:
    """End a torchrun worker once its process group is closed: flush and `os._exit`.

    At interpreter exit, torch's gloo backend sometimes destroys a thread that is still joinable and the process
    aborts ("terminate called without an active exception", SIGABRT) after all work and files are done; torchrun
    then reports the run as failed.  Leaving with `os._exit` skips those finalisers; everything the run writes
    is already closed and fsynced by then.
    """
    import sys

    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code if isinstance(code, int) else (0 if code is None else 1))


def env_rank() -> int:
    """This process's global rank from the launcher's environment (0 when not launched)."""
    return int(os.environ.get("RANK", "0")) if launched() else 0


# --- the single-process no-op ----------------------------------------------------------------------------


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

    def end_stage(self, module: nn.Module) -> None:
        """After a stage (its wrapper dropped): rank 0's buffers everywhere."""

    def broadcast_buffers(self, module: nn.Module) -> None:
        pass

    def check_in_sync(self, module: nn.Module, what: str, extra: Optional[dict] = None) -> None:
        pass

    # data
    def train_loader(self, data: TaskData, batch_size: int, generator: torch.Generator, device) -> BatchLoader:
        return data.loader(batch_size, shuffle=True, generator=generator, device=device)

    def step_model(self, model: Callable, loader, task: int) -> Callable[[torch.Tensor], torch.Tensor]:
        """The training step's `x -> logits` for `model` fed by `loader`."""
        return lambda x: model(x, task=task)

    def evaluate(self, model: Callable, data: TaskData, batch_size: int, device, precision: str = "fp32",
                 channels_last: bool = False) -> float:
        loader = data.loader(batch_size, shuffle=False, device=device, augment=None)
        return accuracy(model, loader, device, precision, channels_last)

    def close(self) -> None:
        pass


# --- data sharding -------------------------------------------------------------------------------------------


class StridedShardLoader(BatchLoader):
    """Rank r's share of the single-process epoch: entries r, r + world, ... of each global batch.

    The epoch order is the one the single-process loader draws (`randperm(n, generator)`; the learner re-seeds
    the generator from (seed, task, stage, round, epoch) every epoch, which is what DistributedSampler's
    `set_epoch` does).  Each global batch of the recipe's size is split across ranks with a stride, so rank r
    sees exactly `order[r::world]` over the epoch (DistributedSampler's split) and the ranks' batches at step k
    together are the single-process batch k.  A last, partial global batch may split unevenly; `grad_scale` (read
    by `Dist.step_model`) then weights each rank's mean loss by its share, so that the averaged gradient is still
    that of the global batch's mean loss.  Only a last batch with fewer samples than ranks is dropped.
    Augmentation randomness is drawn per rank.
    """

    def __init__(self, data: TaskData, global_batch: int, *, rank: int, world_size: int,
                 generator: torch.Generator | None, device=None, augment="default", shuffle: bool = True):
        if global_batch % world_size:
            raise ValueError(f"the batch size {global_batch} is global and must be divisible by the number of "
                             f"processes ({world_size})")
        aug = data.augment if augment == "default" else augment
        super().__init__(data, global_batch // world_size, shuffle=shuffle, generator=generator, device=device,
                         augment=aug)
        self.rank, self.world_size, self.global_batch = rank, world_size, global_batch
        n = len(data)
        tail = n % global_batch
        self.usable = n - tail if 0 < tail < world_size else n  # every rank gets at least one sample per step
        self.grad_scale = 1.0
        self.aug_generator = torch.Generator().manual_seed(
            derive_seed(generator.initial_seed(), "augment", rank)) if generator is not None else None

    def __len__(self) -> int:
        return math.ceil(self.usable / self.global_batch)  # the same on every rank

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        order = self._order()[: self.usable].to(self.data.device)  # drawn eagerly, as BatchLoader does
        return self._shard_batches(order, self.aug_generator)

    def _shard_batches(self, order: torch.Tensor, gen) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        for start in range(0, len(order), self.global_batch):
            batch = order[start: start + self.global_batch]
            idx = batch[self.rank::self.world_size]
            self.grad_scale = self.world_size * len(idx) / len(batch)
            xb = self.data.x[idx].to(self.device, non_blocking=True)
            yb = self.data.y[idx].to(self.device, non_blocking=True)
            yield self.data.normalize(xb, self.augment, gen), yb


class _ScaleGrad(torch.autograd.Function):
    """Identity forward; multiplies the gradient by `scale` (a rank's share of an uneven last batch)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, scale: float) -> torch.Tensor:  # noqa: D102
        ctx.scale = scale
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):  # noqa: D102
        return grad * ctx.scale, None


class _EvalShard(BatchLoader):
    """Rows rank, rank + world, ... of a split, in order, without augmentation."""

    def __init__(self, data: TaskData, batch_size: int, rank: int, world_size: int, device=None):
        super().__init__(data, batch_size, shuffle=False, device=device, augment=None)
        self.rank, self.world_size = rank, world_size

    def _num_samples(self) -> int:
        return len(range(self.rank, len(self.data), self.world_size))

    def _order(self) -> torch.Tensor:
        return torch.arange(self.rank, len(self.data), self.world_size)


# --- several processes ---------------------------------------------------------------------------------------

# dtypes NCCL and gloo cannot move (GROWN's unit-owner buffers are int16): sent as a wider type
_TRANSPORT = {torch.int16: torch.int32, torch.uint16: torch.int32, torch.uint32: torch.int64}


class ProcessGroupDist(Dist):
    """One rank of a torch.distributed process group (already initialised, or joined by `setup`)."""

    def __init__(self, device: torch.device, owns_group: bool = False, sync_bn: bool = True):
        import torch.distributed as td

        super().__init__(device)
        self._td = td
        self.world_size = td.get_world_size()
        self.rank = td.get_rank()
        self.local_rank = int(os.environ.get("LOCAL_RANK", self.rank))
        self.owns_group = owns_group
        self._ddp_kwargs = _ddp_kwargs()
        # BatchNorm over the global batch (the statistics of all ranks' samples), as one process computes it
        self.sync_bn = sync_bn
        self._patched: list[nn.Module] = []

    # -- collectives ------------------------------------------------------------------------------------------
    def all_reduce_sum(self, values: Sequence[float]) -> list[float]:
        t = torch.tensor([float(v) for v in values], dtype=torch.float64, device=self.device)
        self._td.all_reduce(t)
        return t.tolist()

    def any(self, flag: bool) -> bool:
        return self.all_reduce_sum([1.0 if flag else 0.0])[0] > 0

    def broadcast_object(self, obj: Any) -> Any:
        box = [obj if self.rank == 0 else None]
        self._td.broadcast_object_list(box, src=0, device=self._object_device())
        return box[0]

    def barrier(self) -> None:
        if self.device.type == "cuda":
            self._td.barrier(device_ids=[self.device.index])
        else:
            self._td.barrier()

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
        from torch.nn.parallel import DistributedDataParallel as DDP

        if self.sync_bn:
            self._patched = _sync_batchnorm(module, self._td)
        ids = [self.device.index] if self.device.type == "cuda" else None
        return DDP(module, device_ids=ids, output_device=ids[0] if ids else None, **self._ddp_kwargs)

    def end_stage(self, module: nn.Module) -> None:
        # the caller has dropped the stage's DDP wrapper; collecting it removes its reducer's gradient hooks
        # before the next stage wraps parameters that may be the same objects
        _unsync_batchnorm(self._patched)
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
            self._td.broadcast(flat, src=0)
            if self.rank == 0:
                continue
            pos = 0
            for t in group:
                n = t.numel()
                t.data.copy_(flat[pos:pos + n].view(t.shape).to(device=t.device, dtype=t.dtype))
                pos += n

    def _verify_structure(self, module: nn.Module) -> None:
        """Every rank must hold the same tensors (names, shapes, dtypes) before rank 0's values are broadcast."""
        mine = [(n, tuple(t.shape), str(t.dtype), bool(getattr(t, "requires_grad", False)))
                for n, t in _named_tensors(module)]
        ref = self.broadcast_object(mine)
        diff = _first_difference(ref, mine)
        bad = self.all_reduce_sum([0.0 if diff is None else 1.0])[0]
        if bad:
            raise DivergenceError(
                "ranks hold different network structures before a training stage"
                + (f"; rank {self.rank} differs from rank 0 at {diff}" if diff is not None else "")
                + ": growth, gate settling or freezing made different changes on different ranks")

    def check_in_sync(self, module: nn.Module, what: str, extra: Optional[dict] = None) -> None:
        """All-gather a hash of every parameter and buffer (and `extra` tensors); raise on the first difference."""
        entries = [(name, _digest(t)) for name, t in _named_tensors(module)]
        for name, value in sorted((extra or {}).items()):
            entries.append((name, _digest(value) if isinstance(value, torch.Tensor)
                            else hashlib.blake2b(repr(value).encode(), digest_size=16).hexdigest()))
        gathered: list = [None] * self.world_size
        self._td.all_gather_object(gathered, entries)
        ref = gathered[0]
        for r in range(1, self.world_size):
            other = gathered[r]
            if other == ref:
                continue
            for i in range(max(len(ref), len(other))):
                a = ref[i] if i < len(ref) else ("<none>", None)
                b = other[i] if i < len(other) else ("<none>", None)
                if a != b:
                    name = a[0] if a[0] == b[0] else f"{a[0]}' on rank 0, '{b[0]}' on rank {r}"
                    raise DivergenceError(f"ranks diverged {what}: rank {r} differs from rank 0 first at tensor "
                                          f"'{name}' ({len(ref)} tensors compared)")

    # -- data -------------------------------------------------------------------------------------------------
    def train_loader(self, data: TaskData, batch_size: int, generator: torch.Generator, device) -> BatchLoader:
        return StridedShardLoader(data, batch_size, rank=self.rank, world_size=self.world_size,
                                  generator=generator, device=device)

    def step_model(self, model: Callable, loader, task: int) -> Callable[[torch.Tensor], torch.Tensor]:
        def step(x: torch.Tensor) -> torch.Tensor:
            out = model(x, task=task)
            scale = getattr(loader, "grad_scale", 1.0)
            return out if scale == 1.0 else _ScaleGrad.apply(out, scale)

        return step

    def evaluate(self, model: Callable, data: TaskData, batch_size: int, device, precision: str = "fp32",
                 channels_last: bool = False) -> float:
        loader = _EvalShard(data, batch_size, self.rank, self.world_size, device)
        n = loader._num_samples()
        acc = accuracy(model, loader, device, precision, channels_last)
        correct, total = self.all_reduce_sum([round(acc * n / 100.0), n])
        return 100.0 * correct / max(total, 1)

    def close(self) -> None:
        if self.owns_group and self._td.is_initialized():
            # every rank reaches this point before any tears the group down: gloo aborts a process whose peer
            # closes the connection while it still has a collective in flight
            self._td.barrier()
            self._td.destroy_process_group()


class _AllReduceSum(torch.autograd.Function):
    """Sum over ranks; the gradient of each rank's input is the sum over ranks of the output's gradients."""

    @staticmethod
    def forward(ctx, t: torch.Tensor, td) -> torch.Tensor:  # noqa: D102
        ctx.td = td
        out = t.clone()
        td.all_reduce(out)
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor):  # noqa: D102
        grad = grad.contiguous().clone()
        ctx.td.all_reduce(grad)
        return grad, None


def _sync_batchnorm(module: nn.Module, td) -> list[nn.Module]:
    """Make every BatchNorm of `module` normalise training batches with global-batch statistics (until
    `end_stage` removes the instance-level `forward`).  CPU and CUDA alike (torch's SyncBatchNorm is CUDA only)."""
    from torch.nn.modules.batchnorm import _BatchNorm

    patched = []
    for m in module.modules():
        if not isinstance(m, _BatchNorm):
            continue
        own = m.__dict__.get("forward")
        if own is None or isinstance(own, _SyncBNForward):  # (an inactive one comes from a mid-stage deep copy)
            m.forward = _SyncBNForward(m, td)
            patched.append(m)
    return patched


def _unsync_batchnorm(patched: list[nn.Module]) -> None:
    for m in patched:
        f = m.__dict__.pop("forward", None)
        if isinstance(f, _SyncBNForward):
            f.active = False


class _SyncBNForward:
    """`forward` of one BatchNorm: in training mode, mean and variance over every rank's samples."""

    def __init__(self, bn: nn.Module, td, active: bool = True):
        self.bn, self.td, self.active = bn, td, active

    def __deepcopy__(self, memo):
        # a deep copy of the layer made mid-stage (a task's template) computes as a plain BatchNorm
        return _SyncBNForward(memo.get(id(self.bn), self.bn), None, active=False)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        bn = self.bn
        if not self.active or not bn.training:  # evaluation uses the running statistics: nothing to share
            return type(bn).forward(bn, x)
        bn._check_input_dim(x)
        c = x.shape[1]
        dims = [0] + list(range(2, x.dim()))
        shape = (1, c) + (1,) * (x.dim() - 2)
        xf = x.float()
        # sums in float64: exact counts, and E[x^2] - E[x]^2 without fp32 cancellation
        count = torch.tensor([x.numel() // c], dtype=torch.float64, device=x.device)
        local = torch.cat([xf.sum(dims, dtype=torch.float64), (xf * xf).sum(dims, dtype=torch.float64), count])
        stats = _AllReduceSum.apply(local, self.td)
        n = stats[-1]
        mean64 = stats[:c] / n
        var = (stats[c:2 * c] / n - mean64 * mean64).clamp_min(0.0).float()
        mean = mean64.float()
        y = (xf - mean.view(shape)) * torch.rsqrt(var + bn.eps).view(shape)
        if bn.affine:
            y = y * bn.weight.view(shape) + bn.bias.view(shape)
        if bn.track_running_stats and bn.running_mean is not None:
            with torch.no_grad():
                bn.num_batches_tracked.add_(1)
                m = (1.0 / float(bn.num_batches_tracked)) if bn.momentum is None else bn.momentum
                # no host sync (`float(n)`) on CUDA: the unbiased correction stays a tensor expression
                unbiased = var.detach() * (n / (n - 1.0).clamp_min(1.0)).float()
                bn.running_mean.mul_(1 - m).add_(mean.detach().to(bn.running_mean.dtype), alpha=m)
                bn.running_var.mul_(1 - m).add_(unbiased.to(bn.running_var.dtype), alpha=m)
        return y.to(x.dtype)


def _ddp_kwargs() -> dict:
    """DDP options: a static graph, no per-forward buffer broadcast, our own (dtype-safe) initial sync.

    `static_graph=True`: within a stage the set of parameters that get gradients never changes (the structure
    changes only between stages, and every stage wraps anew), but it need not be every parameter that requires
    one: a masked layer whose free units are all switched off for this task computes with its frozen bank alone,
    so its `weight` gets no gradient, and the growth penalty reaches the gates outside the forward.  A static
    graph lets DDP learn the unused ones in the first step instead of failing (the default) or walking the
    autograd graph after every forward (`find_unused_parameters=True`, which would also be correct).
    """
    sig = inspect.signature(torch.nn.parallel.DistributedDataParallel.__init__).parameters
    kw: dict = {"static_graph": True}
    if "forward_sync_buffers" in sig:  # torch >= 2.13
        kw["forward_sync_buffers"] = False
    else:
        kw["broadcast_buffers"] = False
    if "init_sync" in sig:
        kw["init_sync"] = False  # `wrap` has just verified the structure and broadcast rank 0's state
    return kw


def _named_tensors(module: nn.Module) -> Iterable[tuple[str, torch.Tensor]]:
    yield from module.named_parameters()
    yield from module.named_buffers()


def _digest(t: torch.Tensor) -> str:
    t = t.detach().cpu().contiguous()
    h = hashlib.blake2b(digest_size=16)
    h.update(f"{t.dtype}{tuple(t.shape)}".encode())
    h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def _first_difference(a: list, b: list) -> Optional[str]:
    for x, y in zip(a, b):
        if x != y:
            return f"'{x[0]}' {x[1:]} vs '{y[0]}' {y[1:]}"
    if len(a) != len(b):
        return f"{len(a)} vs {len(b)} tensors"
    return None


def _picklable(outcome: tuple) -> tuple:
    ok, exc = outcome
    if exc is None:
        return outcome
    try:
        pickle.loads(pickle.dumps(exc))
        return outcome
    except Exception:
        return ok, RuntimeError(f"{type(exc).__name__}: {exc}")


# --- joining and launching -----------------------------------------------------------------------------------


def setup(device_spec: str = "auto", timeout_s: Optional[float] = None) -> Dist:
    """The `Dist` of this process: single-process unless launched with WORLD_SIZE > 1 (torchrun).

    Under torchrun the device is `cuda:LOCAL_RANK` when the recipe's device resolves to CUDA (backend NCCL),
    else the CPU (backend gloo).  An already initialised default process group is reused (and left open).
    """
    world = int(os.environ.get("WORLD_SIZE", "1")) if launched() else 1
    if world <= 1:
        return Dist(resolve_device(device_spec))
    import torch.distributed as td

    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    base = resolve_device(device_spec)
    if base.type == "cuda":
        if local_rank >= torch.cuda.device_count():
            raise RuntimeError(f"LOCAL_RANK {local_rank} needs a GPU of its own but this node has "
                               f"{torch.cuda.device_count()}; launch at most that many processes per node")
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
        backend = "nccl"
    elif base.type == "cpu":
        device, backend = torch.device("cpu"), "gloo"
    else:
        raise RuntimeError(f"distributed runs support CUDA (NCCL) and CPU (gloo), not {base.type!r}")
    sync_bn = os.environ.get("GROWNFX_SYNC_BN", "1") not in ("0", "false", "no")
    owns = False
    if not td.is_initialized():
        timeout = timeout_s if timeout_s is not None else float(os.environ.get("GROWNFX_DIST_TIMEOUT", 1800))
        td.init_process_group(backend, timeout=datetime.timedelta(seconds=timeout))
        owns = True
    return ProcessGroupDist(device, owns_group=owns, sync_bn=sync_bn)


def launch(argv: Sequence[str], nproc: int, extra: Sequence[str] = ()) -> int:
    """Run `python -m grownfx *argv` in `nproc` processes on this machine through torch.distributed.run.

    The equivalent of `torchrun --standalone --nproc-per-node NPROC -m grownfx ARGV`; returns an exit code
    (0, or the first failed worker's).  `extra` adds torchrun options before the script.
    """
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import main as torchrun

    if nproc < 1:
        raise ValueError(f"--nproc-per-node must be at least 1, got {nproc}")
    args = ["--standalone", "--nproc-per-node", str(nproc), *extra, "-m", "grownfx", *argv]
    try:
        torchrun(args)
    except ChildFailedError as exc:
        codes = [f.exitcode for f in exc.failures.values() if f.exitcode not in (None, 0)]
        return next((c for c in codes if c > 0), 1)
    return 0
