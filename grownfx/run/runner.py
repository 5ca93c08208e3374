"""The recipe-level loop behind `grownfx run`: stream -> method -> per-task results, checkpoints and exports.

    for each task:
        target  <- recipe rule (a number, or the val accuracy of a full backbone trained from scratch)
        learn   <- the method (GROWN by default)
        row     <- test accuracy on every task seen so far (the accuracy matrix)
        write   metrics.jsonl, acc_matrix.{csv,json}, summary.json, checkpoints/last.pt, exports/task_K/

Launched by torchrun (WORLD_SIZE > 1), every rank runs this loop in step (grownfx.learn.distributed): training and
evaluation are data-parallel, rank 0 alone writes files and prints, the others wait for it at barriers.
"""

from __future__ import annotations

import json
import platform
import signal
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

import torch

from grownfx.version import __version__
from grownfx.engine import state as net_state
from grownfx import files
from grownfx.learn import distributed
from grownfx.recipe.loading import load_recipe
from grownfx.recipe.schema import Recipe, parse_target
from grownfx.data import TaskStream, build_stream
from grownfx.run.export import count_macs, save_module, write_meta
from grownfx.learn.learner import LearnerPosition, TaskRecord
from grownfx.learn.methods import make_method
from grownfx.learn.methods.base import example_input
from grownfx.learn.methods.scratch import fresh_backbone, train_plain
from grownfx.recipe.loading import dump_resolved, recipe_diff

# recipe fields that may differ when resuming (they do not change what is learned)
RESUME_FREE = ("output.", "training.checkpoint_every", "training.num_threads", "device", "description")


class RunError(RuntimeError):
    """A run that cannot start or continue, with the reason (e.g. an incompatible resume)."""


@dataclass
class RunResult:
    out_dir: Path
    records: list[TaskRecord] = field(default_factory=list)
    acc_matrix: list[list[float]] = field(default_factory=list)
    summary: dict = field(default_factory=dict)


class StopFlag:
    """SIGINT/SIGTERM ask the loop to checkpoint and stop; a second signal stops at once."""

    def __init__(self):
        self.requested = False
        self._old = {}

    def __enter__(self):
        try:
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._old[sig] = signal.signal(sig, self._handle)
        except ValueError:  # not the main thread: signals stay with the caller
            pass
        return self

    def _handle(self, signum, frame):
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True

    def __exit__(self, *exc):
        for sig, old in self._old.items():
            signal.signal(sig, old)


def run(recipe: Recipe | str, out_dir: str | Path | None = None, resume: bool = False, overrides=(),
        progress=None, echo: Callable[[str], None] | None = None,
        dist: Optional[distributed.Dist] = None) -> RunResult:
    """Run a recipe end to end (or continue it with `resume`); returns the results also written to disk.

    `dist`: this process's place in a data-parallel run; None reads torchrun's environment (one process when
    it is not set) and joins the process group, closing it at the end.
    """
    if not isinstance(recipe, Recipe):
        recipe = load_recipe(recipe, list(overrides))
    out = Path(out_dir or recipe.output.dir.format(name=recipe.name))
    echo = echo or (lambda msg: print(msg, flush=True))
    last = out / "checkpoints" / "last.pt"
    own = dist is None
    dist = distributed.setup(recipe.device) if dist is None else dist
    try:
        check_distributed(recipe, dist.world_size)
        state = dist.main_first(lambda: _prepare_out(out, recipe, resume, last))
        if resume and not dist.is_main:  # every rank restores the checkpoint itself
            if not last.exists():
                raise RunError(f"rank {dist.rank} cannot read {last}: resuming a run on several machines needs "
                               "its folder on a filesystem every machine sees")
            state = files.load(last)
        if recipe.training.num_threads:
            torch.set_num_threads(recipe.training.num_threads)
        device = dist.device
        torch.manual_seed(recipe.seed)
        stream = build_stream(recipe.data, recipe.seed)
        if dist.is_main:
            (out / "stream.json").write_text(json.dumps(stream.meta, indent=1, default=str))
        with StopFlag() as stop:
            return _Run(recipe, stream, out, device, state, stop, progress, echo, dist).loop()
    finally:
        if own:
            dist.close()


def check_distributed(recipe: Recipe, world_size: int) -> None:
    """RunError when `recipe` cannot run in `world_size` data-parallel processes."""
    if world_size == 1:
        return
    if recipe.method.name not in distributed.DISTRIBUTED_METHODS:
        raise RunError(f"method {recipe.method.name!r} runs in one process only; data-parallel runs "
                       f"({world_size} processes here) support {' and '.join(distributed.DISTRIBUTED_METHODS)}")
    if recipe.training.batch_size % world_size:
        raise RunError(f"training.batch_size {recipe.training.batch_size} is the global batch size and must be "
                       f"divisible by the number of processes ({world_size})")


def _prepare_out(out: Path, recipe: Recipe, resume: bool, last: Path) -> Optional[dict]:
    if resume:
        if not last.exists():
            raise RunError(f"nothing to resume: {last} does not exist")
        state = files.load(last)
        _check_compatible(state["recipe"], recipe)
        return state
    if last.exists():
        raise RunError(f"{out} already holds a run; continue it with --resume or choose another --out")
    out.mkdir(parents=True, exist_ok=True)
    text = dump_resolved(recipe) + "\n" + _provenance()
    files.atomic_write_text(text, out / "config.resolved.yaml")
    (out / "metrics.jsonl").write_text("")
    return None


def _check_compatible(saved: dict, recipe: Recipe) -> None:
    now = recipe.model_dump(mode="json")
    diffs = [p for p in recipe_diff(saved, now) if not p.startswith(RESUME_FREE)]
    if diffs:
        raise RunError("cannot resume with a different recipe; these fields differ from the checkpoint: "
                       + ", ".join(diffs))


def _provenance() -> str:
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5,
                                cwd=Path(__file__).parent).stdout.strip()
    except Exception:
        commit = ""
    import torchvision

    lines = {"grownfx": __version__, "torch": torch.__version__, "torchvision": torchvision.__version__,
             "python": platform.python_version(), "git_commit": commit or "unknown",
             "command": " ".join(sys.argv)}
    return "# provenance\n" + "\n".join(f"# {k}: {v}" for k, v in lines.items()) + "\n"


class _Run:
    def __init__(self, recipe: Recipe, stream: TaskStream, out: Path, device, state, stop: StopFlag, progress, echo,
                 dist: Optional[distributed.Dist] = None):
        self.recipe, self.stream, self.out, self.device = recipe, stream, out, device
        self.dist = dist if dist is not None else distributed.Dist(device)
        main = self.dist.is_main  # only rank 0 writes files, prints and shows progress
        self.stop, self.progress, self.echo = stop, progress if main else None, echo if main else (lambda msg: None)
        self.records: list[TaskRecord] = []
        self.matrix: list[list[float]] = []
        self.targets: dict[int, dict] = {}
        self.metrics_lines = 0
        self.writer = _tensorboard(out) if recipe.output.tensorboard and main else None
        extra = {"dist": self.dist} if recipe.method.name in distributed.DISTRIBUTED_METHODS else {}
        # a stop request counts when any rank has one, so all ranks stop after the same epoch
        self.method = make_method(recipe, stream, device, on_epoch=self.on_epoch, checkpoint=self.mid_task_checkpoint,
                                  should_stop=lambda: self.dist.any(self.stop.requested), **extra)
        self.resume_position = None
        if state is not None:
            self._restore(state)

    # -- events ---------------------------------------------------------------------------------------------
    def log(self, event: dict) -> None:
        self.metrics_lines += 1
        if not self.dist.is_main:
            return
        with open(self.out / "metrics.jsonl", "a") as f:
            f.write(json.dumps(event) + "\n")

    def on_epoch(self, info: dict) -> None:
        if not self.dist.is_main:
            return
        self.log({"event": "epoch", **info})
        if self.writer is not None:
            step = info["epoch"]
            tag = f"task{info['task']}/{info['stage']}{info.get('round', 0)}"
            self.writer.add_scalar(f"{tag}/loss", info["loss"], step)
            self.writer.add_scalar(f"{tag}/train_acc", info["train_acc"], step)
        if self.progress is not None:
            self.progress.epoch(info)

    # -- loop -----------------------------------------------------------------------------------------------
    def loop(self) -> RunResult:
        tasks = self.stream.tasks
        try:
            for t in range(len(self.records), len(tasks)):
                task = tasks[t]
                if self.progress is not None:
                    self.progress.start_task(t, len(tasks), task.name)
                target = self.target(t)
                resume, self.resume_position = self.resume_position, None
                record = self.method.learn(task, target, resume)
                row = [self.method.evaluate(j, tasks[j].test) for j in range(t + 1)]
                self.matrix.append(row)
                self.records.append(record)
                self.log({"event": "task", **record.to_dict(), "test_row": row})
                if self.writer is not None:
                    self.writer.add_scalar("stream/avg_acc", sum(row) / len(row), t)
                    self.writer.add_scalar("stream/params_stored", record.params_stored, t)
                if self.dist.is_main:
                    self.write_results()
                    self.save_checkpoint(None, None)
                    self.export(t)
                self.dist.barrier()  # the task's files exist before any rank goes on (or exits)
                self.echo(_task_line(record, row, self.full_params))
                if self.progress is not None:
                    self.progress.end_task(t, record, row)
        except KeyboardInterrupt:
            self.echo(f"interrupted: the last checkpoint is in {self.out / 'checkpoints'}; continue with --resume")
            raise
        finally:
            if self.writer is not None:
                self.writer.close()
        return RunResult(self.out, self.records, self.matrix, self.summary())

    @property
    def full_params(self) -> int:
        method = self.method
        return getattr(getattr(method, "net", None), "full_params", None) or getattr(method, "full_params", 0)

    # -- targets --------------------------------------------------------------------------------------------
    def target(self, t: int) -> Optional[float]:
        if self.recipe.method.name not in ("grown", "cpg"):
            return None
        rule = self.recipe.target.rule
        if isinstance(rule, (int, float)):
            return float(rule)
        if isinstance(rule, list):
            return float(rule[t])
        margin = parse_target(rule)
        if t not in self.targets:
            # every rank trains the reference (same seed, same data); rank 0's value decides, so ranks agree
            self.targets[t] = self.dist.broadcast_object(self.scratch_reference(t))
            self.log({"event": "scratch_reference", "task": t, **self.targets[t]})
        return self.targets[t]["val_acc"] - margin

    def scratch_reference(self, t: int) -> dict:
        """Val accuracy of the full backbone trained from scratch on task t (the paper's target)."""
        task = self.stream.tasks[t]
        seed = (self.recipe.seed, "scratch", t)
        model = fresh_backbone(self.recipe, task, seed)
        epochs = self.recipe.target.scratch_epochs or self.recipe.training.epochs
        val = train_plain(model, task, self.recipe.training, self.device, seed, epochs)
        return {"val_acc": val, "epochs": epochs}

    # -- outputs --------------------------------------------------------------------------------------------
    def summary(self) -> dict:
        R, full = self.matrix, self.full_params
        T = len(R)
        final = R[-1] if R else []
        bwt = sum(R[-1][j] - R[j][j] for j in range(T - 1)) / (T - 1) if T > 1 else 0.0
        forgetting = (sum(max(R[i][j] for i in range(j, T - 1)) - R[-1][j] for j in range(T - 1)) / (T - 1)
                      if T > 1 else 0.0)
        tasks = []
        for r in self.records:
            d = r.to_dict()
            d.update(acc_when_learned=R[r.index][r.index], acc_final=final[r.index],
                     model_size=r.params_stored / full if full else None)
            tasks.append(d)
        return {"name": self.recipe.name, "method": self.method.name, "full_params": full,
                "avg_acc": sum(final) / len(final) if final else 0.0, "bwt": bwt, "forgetting": forgetting,
                "total_time_s": sum(r.time_s for r in self.records), "num_tasks": len(self.stream.tasks),
                "tasks": tasks}

    def write_results(self) -> None:
        names = [t.name for t in self.stream.tasks[: len(self.matrix)]]
        padded = [row + [None] * (len(self.matrix) - len(row)) for row in self.matrix]
        files.atomic_write_text(json.dumps({"tasks": names, "matrix": padded}, indent=1), self.out / "acc_matrix.json")
        lines = ["after_task," + ",".join(names)]
        lines += [f"{names[i]}," + ",".join("" if v is None else f"{v:.2f}" for v in row) for i, row in enumerate(padded)]
        files.atomic_write_text("\n".join(lines) + "\n", self.out / "acc_matrix.csv")
        files.atomic_write_text(json.dumps(self.summary(), indent=1), self.out / "summary.json")

    def export(self, t: int) -> None:
        fmt = self.recipe.output.export_format
        if fmt == "none":
            return
        folder = self.out / "exports" / f"task_{t}"
        sub = self.method.export(t).cpu()
        example = example_input(self.stream.input_shape)
        meta = {"task": t, "name": self.stream.tasks[t].name, "format": fmt, "input_shape": list(self.stream.input_shape),
                "mean": list(self.stream.mean), "std": list(self.stream.std),
                "classes": self.stream.tasks[t].classes, "num_classes": self.stream.tasks[t].num_classes,
                "parameters": sum(p.numel() for p in sub.parameters()), "macs": count_macs(sub, example[:1]),
                "source_checkpoint_sha256": files.file_sha256(self.out / "checkpoints" / "last.pt"),
                "grownfx": __version__, "torch": torch.__version__}
        try:
            meta["file"] = save_module(sub, example, fmt, folder).name
        except Exception as exc:  # keep the run going; the weights are in the checkpoint
            meta["error"] = f"{type(exc).__name__}: {exc}"
            self.echo(f"warning: exporting task {t} as {fmt} failed ({meta['error']}); see {folder}/meta.json")
        folder.mkdir(parents=True, exist_ok=True)
        write_meta(folder, meta)

    # -- checkpoints ----------------------------------------------------------------------------------------
    def save_checkpoint(self, position: Optional[LearnerPosition], optim) -> None:
        from dataclasses import asdict

        payload = {
            "format": net_state.FORMAT, "recipe": self.recipe.model_dump(mode="json"),
            "completed": len(self.records), "records": [r.to_dict() for r in self.records],
            "matrix": self.matrix, "targets": {str(k): v for k, v in self.targets.items()},
            "metrics_lines": self.metrics_lines, "method": self.method.state(),
            "position": asdict(position) if position is not None else None,
            "optim": optim.state_dict() if optim is not None else None,
        }
        files.atomic_save(payload, self.out / "checkpoints" / "last.pt")

    def mid_task_checkpoint(self, learner, position: LearnerPosition, optim) -> None:
        if self.dist.is_main:
            self.save_checkpoint(position, optim)
        self.log({"event": "checkpoint", "task": len(self.records), "stage": position.stage, "epoch": position.epoch})
        self.dist.barrier()  # no rank stops (or goes on) before the checkpoint is on disk

    def _restore(self, state: dict) -> None:
        self.records = [TaskRecord(**r) for r in state["records"]]
        self.matrix = [list(r) for r in state["matrix"]]
        self.targets = {int(k): v for k, v in state["targets"].items()}
        self.method.load_state(state["method"])
        if self.dist.is_main:
            lines = (self.out / "metrics.jsonl").read_text().splitlines()[: state["metrics_lines"]]
            (self.out / "metrics.jsonl").write_text("".join(line + "\n" for line in lines))
            self.metrics_lines = len(lines)
        else:
            self.metrics_lines = state["metrics_lines"]
        if state["position"] is not None:
            self.resume_position = (LearnerPosition(**state["position"]), state["optim"])
        self.echo(f"resuming {self.out} after {len(self.records)} finished tasks"
                  + (f" (task {len(self.records)} from epoch {state['position']['epoch']})" if state["position"] else ""))


def _task_line(r: TaskRecord, row: list[float], full: int) -> str:
    size = f"{r.params_stored / full:.2f}x" if full else f"{r.params_stored} params"
    grew = f"grew {sum(r.growth.values())} ch in {r.growth_rounds} round(s)" if r.grew else "no growth"
    target = f" target {r.target:.1f}" if r.target is not None else ""
    return (f"task {r.index + 1}: val {r.val_acc:.1f}{target}, test {row[-1]:.1f}, avg {sum(row) / len(row):.1f}, "
            f"{grew}, model {size}, {r.time_s:.1f}s")


def _tensorboard(out: Path):
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:  # tensorboard is a dependency, but a run should not die without it
        return None
    return SummaryWriter(log_dir=str(out / "tb"))
