"""The one training loop of grownfx, and its primitives: optimisers, one epoch, accuracy.

`train_stage(stage, training, device, dist)` serves the GROWN learner, every baseline and the scratch reference
that sets GROWN's targets.  A `Stage` says what one stage is: the module and its forward, the optimisers, the
data, the epochs and the seed, a penalty, and `StageHooks` (what the method does around each epoch: its schedule,
the epoch's facts, progress, a stop request, mid-stage checkpoints).  Each epoch re-seeds torch and the loader from
(seed..., epoch), so a run resumed at an epoch boundary (`start_epoch`, the optimisers' and the GradScaler's state)
continues exactly as if never stopped; fp16 trains with a GradScaler; a `Dist` makes it data-parallel
(grownfx.learn.distributed).
"""

from __future__ import annotations

import contextlib
import hashlib
import math
import time
from dataclasses import dataclass, field
from typing import Callable, Iterable

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from grownfx.data import TaskData
from grownfx.engine.net import GrowableNet
from grownfx.files import CorruptFileError
from grownfx.learn.guards import check_epoch
from grownfx.recipe.schema import OptimConfig, TrainingConfig


def derive_seed(*parts) -> int:
    """A stable 63-bit seed from any tuple of ints/strings."""
    digest = hashlib.blake2b(repr(parts).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & (2**63 - 1)


def make_optimizer(params: list[nn.Parameter], cfg: OptimConfig) -> torch.optim.Optimizer | None:
    """The optimiser of `cfg` over the parameters that train, with torch's fused kernels where they exist
    (CPU and CUDA floating-point tensors): one pass per step instead of one per operation (benchmarks: SGD
    Nesterov 6.6x, Adam 6x faster on CPU), which matters most for GROWN's mask scores (one per kernel)."""
    params = [p for p in params if p.requires_grad]
    if not params:
        return None
    fused = {"fused": True} if _fusable(params) else {}
    if cfg.name == "sgd":
        return torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum, nesterov=cfg.nesterov and cfg.momentum > 0,
                               weight_decay=cfg.weight_decay, **fused)
    cls = torch.optim.Adam if cfg.name == "adam" else torch.optim.AdamW
    return cls(params, lr=cfg.lr, weight_decay=cfg.weight_decay, **fused)


def _fusable(params: list[nn.Parameter]) -> bool:
    devices = {p.device.type for p in params}
    return len(devices) == 1 and devices <= {"cpu", "cuda"} and all(p.is_floating_point() for p in params)


def lr_factor(schedule: str, progress: float, milestones: Iterable[float] = (0.5, 0.8)) -> float:
    """Learning-rate multiplier at `progress` in [0, 1) of a stage."""
    if schedule == "cosine":
        return 0.5 * (1.0 + math.cos(math.pi * progress))
    if schedule == "step":
        return 0.1 ** sum(progress >= m for m in milestones)
    return 1.0


@dataclass
class StageOptim:
    """The optimisers of one stage (weights, masks, gates) with their base learning rates."""

    optimizers: list[torch.optim.Optimizer]
    schedule: str = "cosine"
    milestones: tuple = (0.5, 0.8)
    base_lrs: list[list[float]] = field(default_factory=list)
    scaler: "torch.amp.GradScaler | None" = None  # fp16's loss scaler; its state travels with the optimisers'

    def __post_init__(self):
        self.base_lrs = [[g["lr"] for g in o.param_groups] for o in self.optimizers]

    def set_progress(self, progress: float) -> None:
        f = lr_factor(self.schedule, progress, self.milestones)
        for o, lrs in zip(self.optimizers, self.base_lrs):
            for g, lr in zip(o.param_groups, lrs):
                g["lr"] = lr * f

    def zero_grad(self) -> None:
        for o in self.optimizers:
            o.zero_grad(set_to_none=True)

    def step(self, scaler=None) -> None:
        for o in self.optimizers:
            if scaler is not None:
                scaler.step(o)
            else:
                o.step()

    def state_dict(self) -> list | dict:
        states = [o.state_dict() for o in self.optimizers]
        if self.scaler is None:
            return states
        return {"optimizers": states, "scaler": self.scaler.state_dict()}

    def load_state_dict(self, states: list | dict) -> None:
        if isinstance(states, dict):
            if self.scaler is not None and states.get("scaler"):
                self.scaler.load_state_dict(states["scaler"])
            states = states["optimizers"]
        if len(states) != len(self.optimizers):
            raise CorruptFileError(f"the checkpoint holds {len(states)} optimiser states where this stage has "
                                   f"{len(self.optimizers)}: it was written by other code or for another network")
        for o, s in zip(self.optimizers, states):
            o.load_state_dict(s)
            # torch loads state of any shape and a fused step then reads out of bounds (a crash, not an error)
            for group in o.param_groups:
                for p in group["params"]:
                    for name, v in o.state.get(p, {}).items():
                        if isinstance(v, torch.Tensor) and v.dim() > 0 and v.shape != p.shape:
                            raise CorruptFileError(
                                f"the checkpoint's optimiser state '{name}' has shape {tuple(v.shape)} for a parameter "
                                f"of shape {tuple(p.shape)}: it was written by other code or for another network")


def make_scaler(precision: str, device: torch.device) -> "torch.amp.GradScaler | None":
    """fp16 trains with a GradScaler (its gradients would underflow unscaled); fp32 and bf16 need none."""
    if precision != "fp16":
        return None
    return torch.amp.GradScaler(torch.device(device).type)


def autocast(device: torch.device, precision: str):
    if precision == "fp32":
        return contextlib.nullcontext()
    dtype = torch.bfloat16 if precision == "bf16" else torch.float16
    return torch.autocast(device_type=device.type, dtype=dtype)


def in_layout(x: torch.Tensor, channels_last: bool) -> torch.Tensor:
    """A batch in the memory layout the model trains with (`training.channels_last` for image batches)."""
    return x.contiguous(memory_format=torch.channels_last) if channels_last and x.dim() == 4 else x


@dataclass
class EpochResult:
    epoch: int
    loss: float
    penalty: float
    train_acc: float
    seconds: float
    images: int


def run_epoch(
    model: Callable[[torch.Tensor], torch.Tensor],
    loader: Iterable,
    optim: StageOptim,
    device: torch.device,
    *,
    precision: str = "fp32",
    penalty: Callable[[], torch.Tensor] | None = None,
    channels_last: bool = False,
    scaler=None,
    criterion: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None,
    after_step: Callable[[], None] | None = None,
) -> tuple[float, float, float, int]:
    """One pass: `criterion(logits, y)` (default cross-entropy) + `penalty()` per batch, then the optimiser step
    and `after_step()`.  Returns (mean loss, mean penalty, accuracy %, images).

    A stop request is honoured between epochs, never inside one, so a checkpoint always holds whole epochs.
    """
    total = correct = 0
    loss_sum = pen_sum = 0.0
    batches = 0
    for x, y in loader:
        x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        x = in_layout(x, channels_last)
        optim.zero_grad()
        with autocast(device, precision):
            out = model(x)
            loss = criterion(out, y) if criterion is not None else F.cross_entropy(out, y)
        pen = penalty() if penalty is not None else None
        full = loss + pen if pen is not None else loss
        if scaler is not None:
            scaler.scale(full).backward()
            optim.step(scaler)
            scaler.update()
        else:
            full.backward()
            optim.step()
        if after_step is not None:
            after_step()
        batches += 1
        loss_sum += float(loss.detach())
        pen_sum += float(pen.detach()) if pen is not None else 0.0
        correct += int((out.detach().argmax(1) == y).sum())
        total += int(y.numel())
    return loss_sum / max(batches, 1), pen_sum / max(batches, 1), 100.0 * correct / max(total, 1), total


@torch.no_grad()
def accuracy(model: Callable[[torch.Tensor], torch.Tensor], loader: Iterable, device: torch.device,
             precision: str = "fp32", channels_last: bool = False) -> float:
    """Top-1 accuracy (%) of `model` over `loader` (the caller puts the model in eval mode)."""
    correct = total = 0
    for x, y in loader:
        x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        x = in_layout(x, channels_last)
        with autocast(device, precision):
            out = model(x)
        correct += int((out.argmax(1) == y).sum())
        total += int(y.numel())
    return 100.0 * correct / max(total, 1)


class Timer:
    """Wall seconds and this process's CPU seconds (all its threads) since it was made.  CPU time is what a
    reader compares across runs on a shared machine, where wall time swings with the other jobs."""

    def __init__(self):
        self.start = time.perf_counter()
        self.cpu_start = time.process_time()

    @property
    def seconds(self) -> float:
        return time.perf_counter() - self.start

    @property
    def cpu_seconds(self) -> float:
        return time.process_time() - self.cpu_start


def resolve_device(spec: str) -> torch.device:
    if spec == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(spec)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError(f"device {spec!r} was asked for but CUDA is not available on this machine")
    return dev


def _nothing(*_args) -> None:
    return None


def _never() -> bool:
    return False


@dataclass
class StageHooks:
    """What a method does around each epoch of a stage (each optional).

    before_epoch(epoch, epochs): per-epoch settings, after the epoch's seeding (GROWN's schedule);
    after_epoch(done): facts that join the event of the epoch just done (`done` epochs of the stage);
    on_epoch(event): the epoch's event (progress display, metrics);
    should_stop(): a stop request, read between epochs only;
    checkpoint(optim, stopping): a mid-stage checkpoint, on a stop request and every `training.checkpoint_every`.
    """

    before_epoch: Callable[[int, int], None] = _nothing
    after_epoch: Callable[[int], dict | None] = _nothing
    on_epoch: Callable[[dict], None] = _nothing
    should_stop: Callable[[], bool] = _never
    checkpoint: Callable[[StageOptim, bool], None] | None = None


@dataclass
class Stage:
    """One training stage: epochs `start_epoch`..`epochs`-1 of `module` over `data`.

    forward(module, x): the logits of `module` (or of the stage's data-parallel wrapper around it);
    seed: epoch e re-seeds torch and the loader from derive_seed(*seed, e);
    event: what every epoch event carries (task, stage, round);
    trainable: {group: parameters} the optimisers hold (a data-parallel run checks that nothing else trains);
    penalty(): joins the loss of every step; criterion(logits, y): a step's task loss (default cross-entropy);
    after_step(): runs after every optimiser step (a method's running statistics)."""

    module: nn.Module
    forward: Callable[[nn.Module, torch.Tensor], torch.Tensor]
    optim: StageOptim
    data: TaskData
    epochs: int
    seed: tuple
    event: dict = field(default_factory=dict)
    start_epoch: int = 0
    trainable: dict | None = None
    penalty: Callable[[], torch.Tensor] | None = None
    criterion: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None
    after_step: Callable[[], None] | None = None
    hooks: StageHooks = field(default_factory=StageHooks)


def train_stage(stage: Stage, training: TrainingConfig, device: torch.device, dist) -> int:
    """Train `stage` (`dist`: grownfx.learn.distributed.Dist, the single-process one or DDP); returns the epochs
    run.  PreciseBN (`training.precise_bn`) recomputes the norms' statistics after the last epoch, before
    `after_epoch` (whose callers evaluate the network); non-finite training stops with a NonFiniteError."""
    if not stage.optim.optimizers or stage.epochs <= stage.start_epoch:
        return 0
    hooks, event = stage.hooks, stage.event
    net = stage.module if isinstance(stage.module, GrowableNet) else None
    if net is not None:  # `training.compile`: the learning task's masked weights in one compiled graph
        net.ctx.masks.fuse_masks = training.compile
    model = dist.wrap(stage.module, trainable=stage.trainable)
    for epoch in range(stage.start_epoch, stage.epochs):
        last = epoch + 1 == stage.epochs
        compiled = dict(net.ctx.cache.compile_stats) if net is not None and training.compile else None
        info = {**event, "epoch": epoch + 1, "epochs": stage.epochs,
                **_train_epoch(stage, model, epoch, training, device, dist)}
        if compiled is not None:  # graphs compiled in this epoch (a new layout: growth, a new task) and their time
            now = net.ctx.cache.compile_stats
            info.update(compiles=now["compiles"] - compiled["compiles"],
                        compile_seconds=round(now["compile_seconds"] - compiled["compile_seconds"], 3))
        if training.precise_bn and last:
            # several processes: each passes over its share of every batch while the stage's BatchNorm is still
            # synchronised, so the statistics are the single-process batches'
            recompute_norm_stats(lambda x: stage.forward(stage.module, x), stage.module,
                                 dist.stats_loader(stage.data, training.batch_size, device), device,
                                 training.precision, training.channels_last)
        info.update(hooks.after_epoch(epoch + 1) or {})
        hooks.on_epoch(info)
        check_epoch(info["loss"], stage.module.parameters(), task=event.get("task"),
                    stage=event.get("stage", "train"), round=event.get("round", 0), epoch=epoch + 1)
        if hooks.should_stop():  # between epochs; the checkpoint saves where the stage stands
            if hooks.checkpoint is not None and not last:
                hooks.checkpoint(stage.optim, True)
            raise KeyboardInterrupt
        every = training.checkpoint_every
        if hooks.checkpoint is not None and every and (epoch + 1) % every == 0 and not last:
            hooks.checkpoint(stage.optim, False)
    model = None  # drop the stage's DDP wrapper (and its gradient hooks) before `end_stage` collects it
    dist.end_stage(stage.module)  # rank 0's buffers (BatchNorm statistics) on every rank
    return stage.epochs - stage.start_epoch


def _train_epoch(stage: Stage, model: nn.Module, epoch: int, training: TrainingConfig, device, dist) -> dict:
    """One epoch of `stage`, seeded from (seed, epoch); its numbers, reduced over the processes."""
    s = derive_seed(*stage.seed, epoch)
    torch.manual_seed(s)
    gen = torch.Generator().manual_seed(s)
    stage.hooks.before_epoch(epoch, stage.epochs)
    stage.optim.set_progress(epoch / max(stage.epochs, 1))
    stage.module.train()
    loader = dist.train_loader(stage.data, training.batch_size, gen, device)  # this rank's shard of every batch
    timer = Timer()
    step = dist.step_forward(lambda x: stage.forward(model, x), loader)
    loss, pen, acc, n = run_epoch(step, loader, stage.optim, device, precision=training.precision,
                                  penalty=stage.penalty, channels_last=training.channels_last,
                                  scaler=stage.optim.scaler, criterion=stage.criterion, after_step=stage.after_step)
    loss, pen, acc, n = dist.reduce_epoch(loss, pen, acc, n)
    return {"loss": loss, "penalty": pen, "train_acc": acc, "seconds": timer.seconds,
            "cpu_seconds": timer.cpu_seconds, "images_per_s": n / max(timer.seconds, 1e-9)}


def inference_scope(module: nn.Module):
    """The `inference()` scope of the GrowableNet that `module` is or holds (its masked weights are computed once
    while parameters do not change, then dropped); nothing to enter for a plain model."""
    net = next((m for m in module.modules() if isinstance(m, GrowableNet)), None)
    return net.inference() if net is not None else contextlib.nullcontext()


@torch.no_grad()
def recompute_norm_stats(forward: Callable[[torch.Tensor], torch.Tensor], net: nn.Module, loader: Iterable,
                         device: torch.device, precision: str = "fp32", channels_last: bool = False) -> int:
    """PreciseBN: replace the running statistics of every BatchNorm that trains (in training mode under
    `net.train()`: a finished task's copy is not) and that `forward` reaches, with their average over the
    batches of `loader` (unaugmented), the rest of the network in evaluation mode.  Returns how many layers
    were recomputed.  A layer `forward` never calls (a per-task template) keeps what it had."""
    net.train()
    norms = [m for m in net.modules() if isinstance(m, _BatchNorm) and m.training and m.track_running_stats]
    net.eval()
    if not norms:
        return 0
    momenta = {m: m.momentum for m in norms}
    reached: set[nn.Module] = set()

    def first_call(m: nn.Module, _args) -> None:
        if m not in reached:  # this pass's first batch through the layer: forget the running averages
            reached.add(m)
            m.reset_running_stats()
            m.momentum = None  # cumulative average: every batch counts the same
            m.train()

    handles = [m.register_forward_pre_hook(first_call) for m in norms]
    try:
        with inference_scope(net):
            for x, _ in loader:
                x = in_layout(x, channels_last)
                with autocast(device, precision):
                    forward(x)
    finally:
        for h in handles:
            h.remove()
        for m in norms:
            m.momentum = momenta[m]
            m.train(False)
    return len(reached)
