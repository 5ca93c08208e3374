"""Shared pieces of the benchmarks: setup, interleaved timing, task streams learned briefly, reports.

Timing hygiene.  On a shared CPU an absolute time means little and drifts over a run, so every comparison
runs its variants interleaved in one process (A B, B A, A B, ... after a warm-up), takes the median of each
and reports the ratio of the medians.  `torch.set_num_threads(1)` and OMP_NUM_THREADS=1 keep one core per
benchmark.  Absolute times are reported only from a GPU.

Reports.  Every benchmark builds a `Report`: rows of (name, goal, measured, pass) plus details, printed as a
Markdown table and written as JSON (default `benchmarks/results/<name>.json`).

Nothing here imports pydantic-based modules (config, data, learner) at import time, so the benchmarks that
only need the engine run on a machine that has torch, torchvision and networkx alone.
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import os
import platform
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn

RESULTS = Path(__file__).resolve().parent / "results"

# Backbones of train_step / inference at CIFAR size, with the seed width GROWN starts them at
# (the recipes: LeNet-5 0.5, VGG16-BN 0.3, ResNet-18 0.5; MobileNetV2 has no recipe, 0.5).
MODELS: dict[str, dict] = {
    "resnet18": {"seed_width": 0.5, "input": (3, 32, 32)},
    # the seed paper's VGG16-BN: CPG's CIFAR network (512 -> 4096 -> 4096 classifier, grownfx.models.vgg_cifar)
    "vgg16_bn": {"seed_width": 0.3, "input": (3, 32, 32), "builder": "vgg16_bn_cifar"},
    "mobilenet_v2": {"seed_width": 0.5, "input": (3, 32, 32)},
    "lenet5": {"seed_width": 0.5, "input": (3, 32, 32)},
    "small_cnn": {"seed_width": 0.5, "input": (3, 32, 32), "kwargs": {"in_channels": 3}},
}

# The method's optimisers (recipe defaults, grownfx/config.py): SGD Nesterov 0.9 for weights, Adam for mask
# scores (KSM: 2e-4), SGD 0.1 momentum 0.9 for grown-mask gates (continuous sparsification).
WEIGHT_LR, MASK_LR, GATE_LR = 1e-2, 2e-4, 0.1


# --- setup and environment -------------------------------------------------------------------------------


def setup(threads: int = 1, seed: int = 0) -> None:
    torch.set_num_threads(threads)
    torch.manual_seed(seed)


def environment() -> dict:
    env = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "machine": platform.machine(),
        "processor": _cpu_model(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS"),
        "cuda": torch.cuda.is_available(),
        "device_name": torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu",
    }
    try:
        env["load_average"] = [round(v, 2) for v in os.getloadavg()]
    except OSError:  # pragma: no cover - not on Linux
        pass
    return env


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:  # pragma: no cover
        pass
    return platform.processor() or "unknown"


# --- command line and reports ----------------------------------------------------------------------------


def parser(name: str, doc: str | None) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=f"python -m benchmarks.{name}", description=(doc or "").split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="tiny sizes and a few iterations (for the tests)")
    p.add_argument("--json", type=Path, default=None, help=f"where to write the results (default: "
                   f"benchmarks/results/{name}.json; with --quick benchmarks/results/quick/{name}.json)")
    return p


@dataclass
class Report:
    """Rows of one benchmark: each with a goal, a measured value and whether the goal holds (None: no goal)."""

    name: str
    quick: bool = False
    rows: list[dict] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    extra: dict = field(default_factory=dict)
    columns: Sequence[str] = ()  # detail columns shown in the table, beside name / goal / measured / pass
    column_units: dict = field(default_factory=dict)  # a detail column's unit, as `add`'s (default: none)

    def add(self, name: str, goal: str, measured: Any, passed: Optional[bool], unit: str = "", **details) -> dict:
        row = {"name": name, "goal": goal, "measured": _plain(measured), "unit": unit,
               "pass": None if passed is None else bool(passed), **{k: _plain(v) for k, v in details.items()}}
        self.rows.append(row)
        return row

    def note(self, text: str) -> None:
        self.notes.append(text)

    def to_dict(self) -> dict:
        return {"benchmark": self.name, "quick": self.quick, "created": time.strftime("%Y-%m-%d %H:%M:%S"),
                "environment": environment(), "rows": self.rows, "notes": self.notes, **self.extra}

    def markdown(self) -> str:
        cols = list(self.columns)
        head = ["case", "goal", "measured", *cols, "pass"]
        lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        for r in self.rows:
            cells = [str(r["name"]), str(r["goal"]), fmt_value(r["measured"], r.get("unit", ""))]
            cells += [fmt_value(r.get(c), self.column_units.get(c, "")) for c in cols]
            cells.append(verdict(r["pass"]))
            lines.append("| " + " | ".join(cells) + " |")
        return "\n".join(lines)

    def emit(self, path: Path | None) -> Path:
        default = (RESULTS / "quick" if self.quick else RESULTS) / f"{self.name}.json"  # quick never overwrites
        path = Path(path) if path is not None else default
        path.parent.mkdir(parents=True, exist_ok=True)
        data = self.to_dict()
        data["markdown"] = self.markdown()
        path.write_text(json.dumps(data, indent=1, default=str) + "\n")
        env = data["environment"]
        where = env["device_name"] if env["cuda"] else f"CPU ({env['processor']}), {env['torch_threads']} thread(s)"
        print(f"\n## {self.name}{' (quick)' if self.quick else ''} — {where}, torch {env['torch']}\n")
        print(self.markdown())
        for n in self.notes:
            print(f"\n- {n}")
        print(f"\n(written to {path})", flush=True)
        return path


def verdict(passed: Optional[bool]) -> str:
    return "—" if passed is None else ("pass" if passed else "FAIL")


def fmt_value(v: Any, unit: str) -> str:
    if v is None:
        return "—"
    if isinstance(v, bool):
        return str(v)
    if isinstance(v, float):
        if unit == "x":
            return f"{v:.3f}×"
        if unit == "%":
            return f"{v:.1f}%"
        if unit == "bit":
            return f"{v:.4f} bit"
        s = f"{v:.3g}" if abs(v) < 1000 else f"{v:,.0f}"
        return f"{s} {unit}".strip()
    if isinstance(v, int):
        return f"{v:,} {unit}".strip()
    return f"{v} {unit}".strip()


def _plain(v):
    if isinstance(v, torch.Tensor):
        return v.item() if v.numel() == 1 else v.tolist()
    if isinstance(v, float) and (math.isnan(v) or math.isinf(v)):
        return None
    return v


# --- timing ----------------------------------------------------------------------------------------------


CLOCKS = {"cpu": time.thread_time, "wall": time.perf_counter}


def interleaved(variants: dict[Any, Callable[[], Any]], reps: int, warmup: int = 2, inner: int = 1,
                sync: Callable[[], None] | None = None, clock: str = "auto",
                wall: dict | None = None) -> dict[Any, list[float]]:
    """Seconds per call of each variant, measured interleaved: A B, B A, A B, ... after `warmup` rounds.

    Alternating the order cancels a linear drift of the machine's speed; each sample is the mean of `inner`
    calls.  `clock`: "cpu" = this thread's CPU time (time.thread_time: with one intra-op thread all the work
    runs on the calling thread, and time during which other processes of a shared machine hold the core is not
    counted), "wall" = time.perf_counter (needed when work runs elsewhere: DataLoader workers, a GPU);
    "auto" = "wall" when `sync` is given (GPU), else "cpu".  `wall`, if given, receives the wall-clock samples
    too.  `sync` (torch.cuda.synchronize on a GPU) runs before each clock read.
    """
    if clock == "auto":
        clock = "wall" if sync is not None else "cpu"
    now = CLOCKS[clock]
    names = list(variants)
    sync = sync or (lambda: None)
    for _ in range(warmup):
        for n in names:
            variants[n]()
    sync()
    times: dict[Any, list[float]] = {n: [] for n in names}
    walls: dict[Any, list[float]] = {n: [] for n in names}
    gc.collect()
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        for r in range(reps):
            for n in (names if r % 2 == 0 else names[::-1]):
                fn = variants[n]
                sync()
                w0, t0 = time.perf_counter(), now()
                for _ in range(inner):
                    fn()
                sync()
                times[n].append((now() - t0) / inner)
                walls[n].append((time.perf_counter() - w0) / inner)
    finally:
        if was_enabled:
            gc.enable()
    if wall is not None:
        wall.update(walls)
    return times


def median(xs: Iterable[float]) -> float:
    return statistics.median(list(xs))


def ratio_stats(a: list[float], b: list[float], wall_a: list[float] | None = None,
                wall_b: list[float] | None = None) -> dict:
    """Ratio of medians a/b, plus the quartiles of the paired ratios (a spread for the JSON), and the ratio of
    the wall-clock medians when those samples are given."""
    paired = sorted(x / y for x, y in zip(a, b))
    q = statistics.quantiles(paired, n=4) if len(paired) >= 2 else [paired[0]] * 3
    out = {"ratio": median(a) / median(b), "paired_q1": q[0], "paired_median": q[1], "paired_q3": q[2],
           "samples": len(paired)}
    if wall_a and wall_b:
        out["wall_ratio"] = median(wall_a) / median(wall_b)
    return out


# --- models and task streams -----------------------------------------------------------------------------


def build_model(name: str, num_classes: int = 10, seed: int = 0) -> tuple[nn.Module, tuple[int, int, int]]:
    from grownfx.models import build_backbone

    spec = MODELS[name]
    torch.manual_seed(seed)
    return build_backbone(spec.get("builder", name), num_classes, spec.get("kwargs")), spec["input"]


def count_tensor_bytes(tensors: Iterable[torch.Tensor]) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def module_bytes(m: nn.Module) -> int:
    """Bytes of a module's parameters and buffers (each tensor once)."""
    seen, total = set(), 0
    for t in list(m.parameters()) + list(m.buffers()):
        if id(t) not in seen:
            seen.add(id(t))
            total += t.numel() * t.element_size()
    return total


def random_batch(batch: int, shape: tuple, num_classes: int, gen: torch.Generator | None = None,
                 device: str | torch.device = "cpu") -> tuple[torch.Tensor, torch.Tensor]:
    x = torch.randn(batch, *shape, generator=gen)
    y = torch.randint(0, num_classes, (batch,), generator=gen)
    return x.to(device), y.to(device)


@dataclass
class TaskStats:
    """What one briefly learned task left behind."""

    task: int
    grew: dict
    selective_zero_frac: Optional[float]
    mask_zero_frac: float  # fraction of the units visible to the task that its frozen mask drops
    mask_bytes: int


def full_widths(net) -> dict[int, int]:
    """Widths of the growable groups in the full backbone (the analysis widths), like GrownLearner's."""
    return {g.id: g.width for g in net.coupling.groups if g.growable}


def gate_config():
    """GROWN's candidate gates' default configuration (continuous sparsification)."""
    from grownfx.engine import masks as M

    return M.CSConfig()


def trainable(net) -> dict[str, list]:
    """The learning task's parameters by optimiser, as the learner collects them: the engine's weights and mask
    scores, and the candidate gates (GROWN's channel scale) when installed."""
    p = net.trainable_parameters()
    return {**p, "gates": list(net.channel_scale.parameters()) if net.channel_scale is not None else []}


def lsg_grow(net, pool: float = 0.25) -> dict[int, int]:
    """GROWN's learnable sparse growth: a gated candidate pool of `pool` x the full width at every site."""
    from grownfx.learn.gates import CandidateGates  # torch-heavy: imported where used, like the other helpers

    added = {}
    for gid, full in full_widths(net).items():
        gran = net.coupling.groups[gid].granularity
        n = math.ceil(pool * full / gran) * gran
        added.update(CandidateGates.of(net).grow(net, channels=n, groups=[gid]))
    return added


def learn_task(net, num_classes: int, steps: int, batch: int, input_shape: tuple, *, grow: bool = False,
               mask_lr: float = 5e-3, gen: torch.Generator | None = None, device="cpu") -> TaskStats:
    """Learn one task briefly, as GROWN does (add, [LSG growth,] train masks/weights/gates, freeze).

    The policy is GROWN's full one (MaskPolicy's defaults: selective Gumbel masks on owned units, re-training
    of released units, attentive masks and gates on grown ones).  The mask learning rate is raised from KSM's
    2e-4 so that a few steps leave zeros in the masks, as a fully trained task's masks have.  With `grow` the
    task starts with a learnable sparse growth round (GROWN's task 1); the gates are annealed like the learner's
    (beta 1 -> 200 over the steps, hard on the last step) and settled when the task is frozen.
    """
    from grownfx.engine import masks as M
    from grownfx.engine.banks import MaskedLayer

    t = net.add_task(num_classes)
    grew = lsg_grow(net) if grow else {}
    params = trainable(net)
    gates = net.channel_scale
    opts = [torch.optim.SGD(params["weights"], lr=WEIGHT_LR, momentum=0.9, nesterov=True)] if params["weights"] else []
    if params["masks"]:
        opts.append(torch.optim.Adam(params["masks"], lr=mask_lr))
    if params["gates"]:
        opts.append(torch.optim.SGD(params["gates"], lr=GATE_LR, momentum=0.9, nesterov=True))
    net.train()
    for s in range(steps):
        if params["gates"]:  # the learner's schedule: beta 1 -> final, binarised on the last step
            gates.beta = M.anneal(1.0, gates.cs.final_beta, s / max(steps - 1, 1))
            gates.hard = s == steps - 1
        x, y = random_batch(batch, input_shape, num_classes, gen, device)
        for o in opts:
            o.zero_grad(set_to_none=True)
        F.cross_entropy(net(x, task=t), y).backward()
        for o in opts:
            o.step()
    if gates is not None:
        gates.hard = False
    sel_zero = net.unit_stats()["selective_zero_frac"]
    net.freeze_task(t)  # settles the gates at the last beta, as the learner does
    if gates is not None:
        gates.beta = 1.0
    from grownfx.engine.masks import unpack_bits

    dropped = total = 0
    for m in net.modules():
        if isinstance(m, MaskedLayer):
            mask = unpack_bits(getattr(m, f"mask_{t}"), m.mask_shapes[t])
            dropped += int((~mask).sum())
            total += mask.numel()
    return TaskStats(t, grew, sel_zero, dropped / max(total, 1), net.mask_bytes(t))


def learned_net(name: str, tasks: int, *, steps: int = 4, batch: int = 32, grow_tasks: Sequence[int] = (0,),
                seed_width: float | None = None, num_classes: int = 10, seed: int = 0, device="cpu",
                input_shape: tuple | None = None, granularity: str = "kernel"):
    """A GrowableNet of backbone `name` after `tasks` briefly learned, frozen tasks; returns (net, stats, shape)."""
    import grownfx

    model, shape = build_model(name, num_classes, seed)
    shape = tuple(input_shape or shape)
    width = MODELS[name]["seed_width"] if seed_width is None else seed_width
    net = grownfx.prepare(model, torch.randn(2, *shape), width, seed=seed, granularity=granularity).to(device)
    gen = torch.Generator().manual_seed(seed)
    stats = [learn_task(net, num_classes, steps, batch, shape, grow=t in grow_tasks, gen=gen, device=device)
             for t in range(tasks)]
    return net, stats, shape


def plain_of_learning_task(net) -> nn.Module:
    """The plain model of the width the learning task computes with: its export, every channel kept, trainable.

    Standard torch.nn layers in the backbone's own fx graph; at task 1 with no growth it is exactly the
    backbone sliced to the seed width (`grownfx.engine.prepare.slim`).
    """
    t = net.learning_task
    plain = net.export(t, prune_unused=False)
    for p in plain.parameters():
        p.requires_grad_(True)
    return plain.train()


# --- the training step -----------------------------------------------------------------------------------


def make_step(forward: Callable[[torch.Tensor], torch.Tensor], weights: list, masks: list | None = None,
              gates: list | None = None, ranges: bool = False) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    """One training step: zero grads, forward, cross-entropy, backward, optimiser steps.

    Weights: SGD Nesterov momentum 0.9 (both models); mask scores: Adam (task-aware only); gates: SGD; built by
    grownfx.learn.training.make_optimizer, as the library trains (fused kernels where torch has them).
    With `ranges`, each phase runs inside a torch.profiler.record_function range (for profile_step).
    """
    import contextlib

    from torch.profiler import record_function

    from grownfx.learn.training import make_optimizer  # the library's optimisers (fused kernels), both models
    from grownfx.recipe.schema import OptimConfig

    sgd = lambda lr: OptimConfig(name="sgd", lr=lr, momentum=0.9, nesterov=True)  # noqa: E731
    opts = [(name, make_optimizer(params, cfg)) for name, params, cfg in (
        ("sgd:weights", weights, sgd(WEIGHT_LR)), ("adam:masks", masks or [], OptimConfig(name="adam", lr=MASK_LR)),
        ("sgd:gates", gates or [], sgd(GATE_LR)))]
    opts = [(name, o) for name, o in opts if o is not None]
    rng = record_function if ranges else (lambda name: contextlib.nullcontext())

    def step(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        with rng("zero_grad"):
            for _, o in opts:
                o.zero_grad(set_to_none=True)
        with rng("forward"):
            loss = F.cross_entropy(forward(x), y)
        with rng("backward"):
            loss.backward()
        for name, o in opts:
            with rng(name):
                o.step()
        return loss

    return step


def aware_step(net, task: int | None = None, forward=None, ranges: bool = False):
    """The training step of the task-aware model for its learning task (SGD weights, Adam masks, SGD gates)."""
    t = net.learning_task if task is None else task
    p = trainable(net)
    net.train()
    fwd = forward if forward is not None else (lambda x: net(x, task=t))
    return make_step(fwd, p["weights"], p["masks"], p["gates"], ranges=ranges)


def plain_step(model: nn.Module, forward=None, ranges: bool = False):
    model.train()
    return make_step(model if forward is None else forward, list(model.parameters()), ranges=ranges)


def cli_main(main: Callable[[argparse.Namespace], Report], name: str, doc: str | None,
             add_args: Callable[[argparse.ArgumentParser], None] | None = None,
             argv: Sequence[str] | None = None) -> Report:
    p = parser(name, doc)
    if add_args is not None:
        add_args(p)
    args = p.parse_args(argv)
    setup(getattr(args, "threads", 1))
    report = main(args)
    report.emit(args.json)
    return report


def die(msg: str) -> None:  # pragma: no cover
    print(msg, file=sys.stderr)
    raise SystemExit(2)
