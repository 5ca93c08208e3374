"""The recipe-level loop behind `grownfx run`: stream -> method -> per-task results, checkpoints and exports.

    for each task:
        target  <- recipe rule (a number, or the val accuracy of a full backbone trained from scratch)
        learn   <- the method (GROWN by default)
        row     <- test accuracy on every task seen so far (the accuracy matrix)
        write   metrics.jsonl, acc_matrix.{csv,json}, summary.json, checkpoints/last.pt, exports/task_K/

Launched by torchrun (WORLD_SIZE > 1), every rank runs this loop in step (grownfx.learn.distributed): training and
evaluation are data-parallel, rank 0 alone writes files and prints, the others wait for it at barriers.

The run folder (which one, its lock, what a resume must match) is grownfx.run.folder; the per-task console
line and the TensorBoard writer are grownfx.run.console.
"""

from __future__ import annotations

import json
import signal
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

import torch

from grownfx.engine import state as net_state
from grownfx import files
from grownfx.errors import Interrupted
from grownfx.learn import distributed
from grownfx.recipe.loading import load_recipe
from grownfx.recipe.schema import Recipe, target_sources
from grownfx.data import TaskStream, data_seed, stream_for
from grownfx.run.console import _task_line, _tensorboard
from grownfx.run.pretrained_eval import PretrainedEvaluation
from grownfx.run.folder import RunError, _load_checkpoint, _prepare_out, claim_out
from grownfx.run.export import export_complete, preprocessing, record_export, save_module, task_folder, task_meta
from grownfx.learn.guards import NonFiniteError, check_tensors
from grownfx.learn.records import LearnerPosition, TaskRecord
from grownfx.report.metrics import stream_metrics
from grownfx.report.progress import phase_label
from grownfx.learn.methods import make_method
from grownfx.models.pretrained import check_weights_file
from grownfx.learn.methods.base import example_input
from grownfx.run import targets


@dataclass
class RunResult:
    out_dir: Path
    records: list[TaskRecord] = field(default_factory=list)
    acc_matrix: list[list[float]] = field(default_factory=list)
    summary: dict = field(default_factory=dict)


class RunInterrupted(Interrupted):
    """SIGINT (Ctrl-C) or SIGTERM stopped a run (or a comparison) after it chose its folder `out_dir`: exit code
    130 or 143.  `checkpointed`: the folder holds a checkpoint, and `run(recipe, out_dir=out_dir, resume=True)`
    continues it; `started`: it holds a run, which `resume=True` starts again (the CLI prints the command line)."""

    def __init__(self, out_dir: Path, signum: int = signal.SIGINT, checkpointed: Optional[bool] = None):
        self.out_dir = Path(out_dir)
        self.checkpointed = (self.out_dir / "checkpoints" / "last.pt").exists() if checkpointed is None \
            else checkpointed
        self.started = files.holds_run(self.out_dir)
        where = (f"the last checkpoint is in {self.out_dir / 'checkpoints'}; continue it with out_dir="
                 f"{str(self.out_dir)!r} and resume=True" if self.checkpointed
                 else f"stopped before the first checkpoint of {self.out_dir} (nothing learned yet)")
        super().__init__(signum, where)


class StopFlag:
    """SIGINT/SIGTERM ask the loop to checkpoint and stop (after the current epoch); a second signal stops at
    once.  `signum` is the first signal received."""

    def __init__(self):
        self.requested = False
        self.signum: Optional[int] = None
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
            raise Interrupted(signum)
        self.requested, self.signum = True, signum

    def __exit__(self, *exc):
        for sig, old in self._old.items():
            signal.signal(sig, old)


def run(recipe: Recipe | str, out_dir: str | Path | None = None, resume: bool = False, overrides=(),
        progress=None, echo: Callable[[str], None] | None = None,
        dist: Optional[distributed.Dist] = None, verify: bool = True, trust: Optional[bool] = None) -> RunResult:
    """Run a recipe end to end (or continue it with `resume`); returns the results also written to disk.

    `dist`: this process's place in a data-parallel run; None reads torchrun's environment (one process when
    it is not set) and joins the process group, closing it at the end.  `verify=False` resumes from a checkpoint
    whose checksum file is missing; `trust`: see grownfx.recipe.trust (a recipe given by name or path is loaded
    with it).  SIGINT/SIGTERM end the current epoch, checkpoint and raise RunInterrupted.
    """
    if not isinstance(recipe, Recipe):
        recipe = load_recipe(recipe, list(overrides), trust=trust, verify=verify)
    elif not verify and recipe.model.weights and not recipe.model.weights_sha256:
        pinned = check_weights_file(recipe.model.weights, None, verify=False)[1]
        if pinned is not None:  # unchecked weights: the run records the hash of the file it used
            recipe = recipe.model_copy(deep=True)
            recipe.model.weights_sha256 = "sha256:" + pinned
    started = time.perf_counter()
    echo = echo or (lambda msg: print(msg, flush=True))
    own = dist is None
    dist = distributed.setup(recipe.device) if dist is None else dist
    lock: Optional[files.FolderLock] = None
    out: Optional[Path] = None
    try:
        check_distributed(recipe, dist.world_size)
        claimed = dist.main_first(lambda: claim_out(recipe, out_dir, resume))  # rank 0 picks and locks the folder
        if dist.is_main:
            out, lock = claimed
        out = Path(dist.broadcast_object(str(out) if dist.is_main else None))
        last = out / "checkpoints" / "last.pt"
        state = dist.main_first(lambda: _prepare_out(out, recipe, resume, last, explicit=out_dir is not None,
                                                     verify=verify))
        if dist.is_main:  # only once the folder is accepted: a refused folder was never written
            echo(f"{'resuming' if state is not None else 'writing'} run folder {out}")
        resumed = dist.broadcast_object(state is not None) if dist.enabled else state is not None
        if resumed and not dist.is_main:  # every rank restores the checkpoint itself
            if not last.exists():
                raise RunError(f"rank {dist.rank} cannot read {last}: resuming a run on several machines needs "
                               "its folder on a filesystem every machine sees")
            state = _load_checkpoint(last, verify)
        if recipe.training.num_threads:
            torch.set_num_threads(recipe.training.num_threads)
        device = dist.device
        torch.manual_seed(recipe.seed)
        stream = stream_for(recipe)
        if resumed and dist.is_main and (out / "stream.json").is_file():
            check_same_data(files.read_json(out / "stream.json"), stream.meta, out)
        check_validation(recipe, stream, echo if dist.is_main else (lambda msg: None))
        if dist.is_main:
            if stream.meta.get("unused_classes"):
                unused = stream.meta["unused_classes"]
                echo(f"warning: {len(unused)} class(es) of the data are in no task: {', '.join(unused[:8])}"
                     f"{', ...' if len(unused) > 8 else ''} (data.classes_per_task x data.num_tasks covers "
                     f"{len(stream.meta['class_names']) - len(unused)} of {len(stream.meta['class_names'])})")
            files.atomic_write_json(stream.meta, out / "stream.json")
        with StopFlag() as stop:
            return _Run(recipe, stream, out, device, state, stop, progress, echo, dist, started).loop()
    except NonFiniteError as exc:  # a user's hyperparameters, not a bug: one clear line (exit 2 in the CLI)
        raise RunError(str(exc)) from exc
    except KeyboardInterrupt as exc:  # SIGINT/SIGTERM before or after the loop's own handling
        if out is None or isinstance(exc, RunInterrupted):
            raise
        raise RunInterrupted(out, getattr(exc, "signum", signal.SIGINT)) from None
    finally:
        if lock is not None:
            lock.release()
        if own:
            dist.close()


def check_same_data(saved: dict, now: dict, out: Path) -> None:
    """RunError when the stream rebuilt for a resume differs from the one the run learned (stream.json): other
    classes, other sample ids, or (a python factory) other values."""
    old_tasks, new_tasks = saved.get("tasks", []), now.get("tasks", [])
    if len(old_tasks) != len(new_tasks):
        raise RunError(f"cannot resume {out}: the data now has {len(new_tasks)} tasks, the run learned "
                       f"{len(old_tasks)} (stream.json)")
    for t, (a, b) in enumerate(zip(old_tasks, new_tasks)):
        for key in ("classes", "digests", "content_digests"):
            if key in a and key in b and a[key] != b[key]:
                what = [s for s in a[key] if a[key].get(s) != b[key].get(s)] if isinstance(a[key], dict) else []
                raise RunError(f"cannot resume {out}: task {t + 1}'s data differs from the run's ({key}"
                               f"{' of ' + ', '.join(what) if what else ''}; stream.json records what it learned): "
                               "did the dataset or the data factory change?")


MIN_VAL_PER_CLASS = 10  # below this a task's validation accuracy moves in steps too coarse to decide on


def check_validation(recipe: Recipe, stream: TaskStream, echo: Callable[[str], None]) -> None:
    """RunError when a method that decides on validation accuracy (GROWN's growth and target, CPG) gets a task
    with no validation samples; a warning when a task has fewer than MIN_VAL_PER_CLASS per class."""
    decides = recipe.method.name == "cpg" or (recipe.method.name == "grown" and recipe.growth.when == "necessary")
    knobs = (f"data.val_fraction {getattr(recipe.data, 'val_fraction', '-')}, "
             f"data.limit_per_task {recipe.data.limit_per_task}")
    for t, task in enumerate(stream.tasks):
        train = getattr(task, "train", None)
        if train is not None and len(train) < recipe.training.batch_size:
            echo(f"warning: task {t + 1} has {len(train)} training samples, fewer than training.batch_size "
                 f"{recipe.training.batch_size}: every epoch is one partial batch")
        n = len(task.val)
        if n == 0 and decides:
            raise RunError(f"task {t + 1} has no validation samples ({knobs}); {recipe.method.name} decides growth "
                           "and its target on validation accuracy: raise data.val_fraction or data.limit_per_task")
        if n < MIN_VAL_PER_CLASS * task.num_classes:
            echo(f"warning: task {t + 1} has {n} validation samples for {task.num_classes} classes (fewer than "
                 f"{MIN_VAL_PER_CLASS} per class; {knobs}): its validation accuracy moves in steps of "
                 f"{100 / max(n, 1):.1f} points" + (", so growth decisions on it are noisy" if decides else ""))


def check_distributed(recipe: Recipe, world_size: int) -> None:
    """RunError when `recipe` cannot run in `world_size` data-parallel processes."""
    if world_size == 1:
        return
    if recipe.method.name not in distributed.DISTRIBUTED_METHODS:
        raise RunError(f"method {recipe.method.name!r} runs in one process only; data-parallel runs "
                       f"({world_size} processes here) support {', '.join(distributed.DISTRIBUTED_METHODS)}")
    if recipe.training.batch_size % world_size:
        raise RunError(f"training.batch_size {recipe.training.batch_size} is the global batch size and must be "
                       f"divisible by the number of processes ({world_size})")


class _Run:
    def __init__(self, recipe: Recipe, stream: TaskStream, out: Path, device, state, stop: StopFlag, progress, echo,
                 dist: Optional[distributed.Dist] = None, started: Optional[float] = None):
        self.recipe, self.stream, self.out, self.device = recipe, stream, out, device
        self.started = time.perf_counter() if started is None else started
        self.wall_before = 0.0  # wall time of the run's earlier processes (a resumed run), from the checkpoint
        self.dist = dist if dist is not None else distributed.Dist(device)
        main = self.dist.is_main  # only rank 0 writes files, prints and shows progress
        self.stop, self.progress, self.echo = stop, progress if main else None, echo if main else (lambda msg: None)
        self.records: list[TaskRecord] = []
        self.matrix: list[list[float]] = []
        self.targets: dict[int, dict] = {}  # task -> its reference accuracies (a string target rule's)
        self.finetune_refs: Optional[list[float]] = None  # fine-tune's accuracies, trained once when a rule reads them
        self.metrics_lines = 0
        self.metrics: list[str] = []  # every event line so far (rank 0): checkpointed, metrics.jsonl rebuilt from it
        self.task_cpu = (time.process_time(), 0.0)  # (process time when learn() began, CPU s of it before a resume)
        self.task_cpu_before = 0.0  # a resumed task's CPU seconds before its mid-task checkpoint
        self.writer = _tensorboard(out) if recipe.output.tensorboard and main else None
        extra = {"dist": self.dist}  # every method trains through the one stage loop, data-parallel with `dist`
        # a stop request counts when any rank has one, so all ranks stop after the same epoch
        self.method = make_method(recipe, stream, device, on_epoch=self.on_epoch, checkpoint=self.mid_task_checkpoint,
                                  should_stop=lambda: self.dist.any(self.stop.requested), **extra)
        self.pretrained = PretrainedEvaluation(recipe, self.method, stream, self.echo)  # `model.weights_data`
        self.resume_position = None
        if state is not None:
            self._restore(state)

    # -- events ---------------------------------------------------------------------------------------------
    def log(self, event: dict) -> None:
        self.metrics_lines += 1
        if not self.dist.is_main:
            return
        line = json.dumps(event)
        self.metrics.append(line)
        files.append_line(line, self.out / "metrics.jsonl")

    def show_epoch(self, info: dict) -> None:
        """An epoch of a reference run (a target's scratch or fine-tune training): shown, not logged as the
        method's own epoch."""
        if self.progress is not None:
            self.progress.epoch(info)

    def on_epoch(self, info: dict) -> None:
        if not self.dist.is_main:
            return
        self.log({"event": "epoch", **info})
        files.kill_point("epoch")
        if self.writer is not None:
            step = info["epoch"]
            # task1/stage_1/loss, task2/growth_round_1/loss: tasks count from 1, as everywhere a person reads them
            tag = f"task{info['task'] + 1}/{phase_label(info, short=True).replace(' ', '_')}"
            self.writer.add_scalar(f"{tag}/loss", info["loss"], step)
            self.writer.add_scalar(f"{tag}/train_acc", info["train_acc"], step)
        if self.progress is not None:
            self.progress.epoch(info)

    # -- loop -----------------------------------------------------------------------------------------------
    def loop(self) -> RunResult:
        tasks = self.stream.tasks
        if self.dist.is_main and self.records:
            self.finish_undone()
        self.dist.barrier()
        try:
            if not self.records and not self.pretrained.acc:  # task 0 as loaded, before the stream changes the net
                self.pretrained.evaluate(self.method)
            for t in range(len(self.records), len(tasks)):
                task = tasks[t]
                if self.progress is not None:
                    self.progress.start_task(t, len(tasks), task.name)
                target = self.target(t)
                resume, self.resume_position = self.resume_position, None
                self.task_cpu = (time.process_time(), self.task_cpu_before if resume is not None else 0.0)
                record = self.method.learn(task, target, resume)
                record.cpu_s = self.learning_cpu_s()
                record.cpu_s_per_epoch = record.cpu_s / record.epochs if record.epochs else None
                row = [self.method.evaluate(j, tasks[j].test) for j in range(t + 1)]
                acc0 = self.pretrained.evaluate(self.method)
                self.matrix.append(row)
                self.records.append(record)
                self.log({"event": "task", **record.to_dict(), "test_row": row,
                          **({"pretrained_acc": acc0} if acc0 is not None else {})})
                if self.writer is not None:
                    self.writer.add_scalar("stream/avg_acc", sum(row) / len(row), t + 1)  # step = task number
                    self.writer.add_scalar("stream/params_stored", record.params_stored, t + 1)
                if self.dist.is_main:  # a task is done when its checkpoint, results and export are on disk
                    # the checkpoint first: results on disk then always have one (a folder holding results
                    # but no checkpoint was tampered with, and is refused rather than overwritten)
                    self.save_checkpoint(None, None)
                    files.kill_point("after_checkpoint")
                    self.write_results()
                    self.export(t)
                self.dist.barrier()  # the task's files exist before any rank goes on (or exits)
                self.echo(_task_line(record, row, self.full_params,
                                     self.recipe.growth if self.recipe.method.name == "grown" else None))
                if self.progress is not None:
                    self.progress.end_task(t, record, row)
            if self.dist.is_main and self.records:  # the wall time up to the end, the last export included
                files.atomic_write_text(json.dumps(self.summary(), indent=1), self.out / "summary.json")
        except KeyboardInterrupt as exc:
            raise RunInterrupted(self.out, getattr(exc, "signum", None) or self.stop.signum or signal.SIGINT) \
                from None
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
        """Task t's target (grownfx.run.targets); a string rule's reference is trained once and checkpointed."""
        if not targets.wants_target(self.recipe):
            return None
        rule = self.recipe.target.rule
        if not isinstance(rule, str):
            return targets.task_target(rule, t)
        if t not in self.targets:
            # every rank trains the reference (same seed, same data); rank 0's value decides, so ranks agree
            self.targets[t] = self.dist.broadcast_object(self.reference(t))
            self.log({"event": "scratch_reference", "task": t, **self.targets[t]})
        return targets.task_target(rule, t, self.targets[t]["val_acc"])

    def reference(self, t: int) -> dict:
        """Task t's reference accuracies: scratch's, fine-tune's when the rule reads it, and the one the rule
        uses (`val_acc`)."""
        rule = self.recipe.target.rule
        scratch = targets.scratch_accuracy(self.recipe, self.stream.tasks[t], self.device, self.dist,
                                           on_epoch=self.show_epoch)
        out = {"epochs": targets.scratch_epochs(self.recipe)}
        if "finetune" not in target_sources(rule):
            return {"val_acc": scratch, **out}
        if self.finetune_refs is None:
            self.finetune_refs = targets.finetune_references(self.recipe, self.show_epoch)
        finetune = self.finetune_refs[t]
        return {"val_acc": targets.reference_accuracy(rule, scratch, finetune), "scratch_val_acc": scratch,
                "finetune_val_acc": finetune, **out}

    # -- outputs --------------------------------------------------------------------------------------------
    def summary(self) -> dict:
        R, full = self.matrix, self.full_params
        final = R[-1] if R else []
        metrics = stream_metrics(R)  # average accuracy, BWT, forgetting (grownfx.report.metrics)
        tasks = []
        for r in self.records:
            d = r.to_dict()
            d.update(acc_when_learned=R[r.index][r.index], acc_final=final[r.index],
                     model_size=r.params_stored / full if full else None,
                     memory_size=(r.params_stored + r.stored_values) / full if full else None)
            tasks.append(d)
        cpu, epochs = sum(r.cpu_s for r in self.records), sum(r.epochs for r in self.records)
        done, total = len(self.records), len(self.stream.tasks)
        return {"name": self.recipe.name, "method": self.method.name, "full_params": full,
                "complete": done == total, "tasks_done": done, "num_tasks": total,
                "seed": self.recipe.seed, "data_seed": data_seed(self.recipe),
                "avg_acc": metrics["avg_acc"], "bwt": metrics["bwt"], "forgetting": metrics["forgetting"],
                "total_time_s": sum(r.time_s for r in self.records), "wall_time_s": self.wall_time(),
                "total_cpu_s": cpu, "cpu_s_per_epoch": cpu / epochs if epochs else None,
                **({"pretrained": {**self.method.pretrained_summary(), **self.pretrained.summary()}}
                   if getattr(self.method, "offset", 0) else {}),
                "tasks": tasks}

    def learning_cpu_s(self) -> float:
        """CPU seconds of the task being learned, its part before a mid-task resume included."""
        return self.task_cpu[1] + time.process_time() - self.task_cpu[0]

    def wall_time(self) -> float:
        """Seconds from the start of `run` (of each process, for a resumed run) to now."""
        return self.wall_before + time.perf_counter() - self.started

    def write_results(self) -> None:
        names = [t.name for t in self.stream.tasks[: len(self.matrix)]]
        padded = [row + [None] * (len(self.matrix) - len(row)) for row in self.matrix]
        files.atomic_write_text(json.dumps({"tasks": names, "matrix": padded}, indent=1), self.out / "acc_matrix.json")
        lines = ["after_task," + ",".join(names)]
        lines += [f"{names[i]}," + ",".join("" if v is None else f"{v:.2f}" for v in row) for i, row in enumerate(padded)]
        files.atomic_write_text("\n".join(lines) + "\n", self.out / "acc_matrix.csv")
        files.atomic_write_text(json.dumps(self.summary(), indent=1), self.out / "summary.json")

    def finish_undone(self) -> None:
        """On resume: rewrite the results of the finished tasks from the checkpoint, and re-export every finished
        task whose export is missing, incomplete or does not match the SHA-256 its meta.json records (a kill
        between a checkpoint and its export, or a damaged file)."""
        self.write_results()
        fmt = self.recipe.output.export_format
        if fmt == "none":
            return
        for t in range(len(self.records)):
            if not export_complete(task_folder(self.out, t), fmt):
                self.echo(f"task {t + 1}'s export is missing, incomplete or does not match its meta.json; "
                          "exporting it again")
                self.export(t)

    def export(self, t: int) -> None:
        """exports/task_<t+1>/: the task's subnetwork in the recipe's format and meta.json (the same meta
        `grownfx export` writes); with the first task, exports/pretrained/ when the net's task 0 is the
        pretrained network."""
        fmt = self.recipe.output.export_format
        if fmt == "none":
            return
        if t == 0 and getattr(self.method, "offset", 0):
            self.export_pretrained()
        folder = task_folder(self.out, t)
        if self.progress is not None:
            self.progress.phase(f"export ({fmt})")
        sub = self.method.export(t).cpu().eval()
        check_tensors(sub.state_dict(), f"the export of task {t + 1}")  # never export a diverged network
        example = example_input(self.stream.input_shape)
        base = task_meta(self.stream, self.stream.meta, t, sub, self.out / "checkpoints" / "last.pt")
        self._write_export(sub, example, fmt, folder, base, f"task {t + 1}")

    def export_pretrained(self) -> None:
        """exports/pretrained/: the pretrained network as the net's frozen task 0 computes it (its own classifier
        and classes), exported like a task; its meta.json names the weights it came from."""
        fmt, folder = self.recipe.output.export_format, self.out / "exports" / "pretrained"
        sub = self.method.net.export(0).cpu().eval()
        example = example_input(self.stream.input_shape)
        base = {"task": 0, "name": "pretrained", **self.method.pretrained_summary(),
                "input_shape": list(self.stream.input_shape), "preprocessing": preprocessing(self.stream.meta),
                "parameters": sum(p.numel() for p in sub.parameters()),
                "source_checkpoint_sha256": files.file_sha256(self.out / "checkpoints" / "last.pt")}
        self._write_export(sub, example, fmt, folder, base, "the pretrained task 0")

    def _write_export(self, sub, example, fmt: str, folder, base: dict, what: str) -> None:
        """`sub` saved in `fmt` into `folder` and its meta.json entry recorded; an export that fails is recorded with
        its error and the run goes on (the weights are in the checkpoint), except for a full or read-only disk."""
        entry: dict = {"parameters": base["parameters"], "preprocessing_baked": False,
                       "expects": "preprocessed inputs (see preprocessing)"}
        try:
            path = save_module(sub, example, fmt, folder)
            entry.update(file=path.name, sha256=files.file_sha256(path))
        except (files.DiskFullError, files.NotWritableError):
            raise  # the machine's problem, not the export's: stop (the checkpoint is on disk; --resume exports)
        except Exception as exc:  # keep the run going; the weights are in the checkpoint
            entry["error"] = f"{type(exc).__name__}: {exc}"
            self.echo(f"warning: exporting {what} as {fmt} failed ({entry['error']}); see {folder}/meta.json")
        record_export(folder, base, fmt, entry)

    # -- checkpoints ----------------------------------------------------------------------------------------
    def save_checkpoint(self, position: Optional[LearnerPosition], optim) -> None:
        from dataclasses import asdict

        payload = {
            "format": net_state.FORMAT, "recipe": self.recipe.model_dump(mode="json"),
            "completed": len(self.records), "records": [r.to_dict() for r in self.records],
            "matrix": self.matrix, "pretrained_acc": self.pretrained.acc, "targets": {str(k): v for k, v in self.targets.items()},
            "metrics_lines": self.metrics_lines, "metrics": list(self.metrics), "method": self.method.state(),
            "wall_s": self.wall_time(),
            "task_cpu_s": self.learning_cpu_s() if position is not None else 0.0,
            "position": asdict(position) if position is not None else None,
            "optim": optim.state_dict() if optim is not None else None,
        }
        check_tensors(payload["method"], "a checkpoint")  # never checkpoint a diverged network
        files.atomic_save(payload, self.out / "checkpoints" / "last.pt")

    def mid_task_checkpoint(self, learner, position: LearnerPosition, optim) -> None:
        # logged first, so that the checkpoint's own event is among the lines it holds (and survives a resume)
        self.log({"event": "checkpoint", "task": len(self.records), "stage": position.stage, "epoch": position.epoch})
        if self.dist.is_main:
            self.save_checkpoint(position, optim)
        self.dist.barrier()  # no rank stops (or goes on) before the checkpoint is on disk

    def _restore(self, state: dict) -> None:
        self.records = [TaskRecord(**r) for r in state["records"]]
        self.matrix = [list(r) for r in state["matrix"]]
        self.pretrained.acc = [float(a) for a in state.get("pretrained_acc") or []]
        self.targets = {int(k): v for k, v in state["targets"].items()}
        self.wall_before = float(state.get("wall_s", 0.0))
        self.task_cpu_before = float(state.get("task_cpu_s") or 0.0)
        self.method.load_state(state["method"])
        if self.dist.is_main:  # metrics.jsonl as of the checkpoint, rebuilt from it (the file may be gone)
            if "metrics" in state:
                lines = list(state["metrics"])
            else:  # a checkpoint from before grownfx kept the lines: cut the file back to the checkpoint
                path = self.out / "metrics.jsonl"
                lines = path.read_text().splitlines()[: state["metrics_lines"]] if path.exists() else []
            files.atomic_write_text("".join(line + "\n" for line in lines), self.out / "metrics.jsonl")
            self.metrics, self.metrics_lines = lines, len(lines)
        else:
            self.metrics_lines = state["metrics_lines"]
        if state["position"] is not None:
            self.resume_position = (LearnerPosition(**state["position"]), state["optim"])
        self.echo(f"resuming {self.out} after {len(self.records)} finished tasks"
                  + (f" (task {len(self.records) + 1} from epoch {state['position']['epoch']})"
                     if state["position"] else ""))
