"""Progress display for runs: rich bars on a terminal, one plain line per stage/epoch otherwise.

    with progress(total_tasks=10) as p:
        p.task_bar(0, "task 0")              # a task starts (tasks bar: 0/10)
        p.stage_bar("stage 1", epochs=20)    # a stage of that task (epochs bar)
        p.epoch_bar(total=125)               # an epoch of 125 batches (batches bar)
        p.update(loss=0.51)                  # one batch done; a finished epoch advances the epochs bar
        p.log("task 1: val 61.2, no growth")

The runner's hooks are also understood: `start_task(t, n, name)`, `epoch(info)` (one finished epoch, with
the learner's info dict) and `end_task(t, record, row)`.  `enabled=False` (non-zero ranks) prints nothing.
"""

from __future__ import annotations

import sys
from contextlib import contextmanager
from typing import Any, Iterator, Optional

__all__ = ["Progress", "phase_label", "progress"]


class Progress:
    def __init__(self, total_tasks: int, *, enabled: bool = True, plain: Optional[bool] = None, console=None,
                 file=None, verbose: bool = False):
        self.total_tasks, self.enabled, self.verbose = int(total_tasks), enabled, verbose
        self.file = file
        self.plain = (not _is_tty(file)) if plain is None else plain
        self.task_index, self.task_name, self.stage = -1, "", ""
        self.epochs, self.epoch_no, self.batches, self.batch_no = 0, 0, 0, 0
        self.metrics: dict[str, Any] = {}
        self._rich = None
        self._bars: dict[str, Any] = {}
        if enabled and not self.plain:
            self._start_rich(console)

    # -- generic API --------------------------------------------------------------------------------------------
    def task_bar(self, index: int, name: str = "") -> None:
        """Task `index` (0-based) starts; earlier tasks count as done."""
        self.task_index, self.task_name, self.stage = int(index), name, ""
        if self._rich is not None:
            self._set("tasks", completed=index, description=f"task {index + 1}/{self.total_tasks} {name}".strip())
        elif self.enabled:
            self._print(f"task {index + 1}/{self.total_tasks}" + (f": {name}" if name else ""))

    def stage_bar(self, name: str, epochs: Optional[int] = None) -> None:
        """A stage of the current task starts (stage 1, a growth round, the scratch reference...)."""
        self.stage, self.epochs, self.epoch_no = str(name), int(epochs or 0), 0
        if self._rich is not None:
            self._rich.reset(self._bars["stage"], total=self.epochs or None, description=f"  {name}", visible=True,
                             info="")
        elif self.enabled and self.verbose:  # otherwise the stage's line comes when it ends
            self._print(f"  {self._where()}" + (f" ({self.epochs} epochs)" if self.epochs else ""))

    def epoch_bar(self, total: int, description: str = "batches") -> None:
        """An epoch of `total` steps starts; `update()` advances it."""
        self.batches, self.batch_no = int(total), 0
        if self._rich is not None:
            self._rich.reset(self._bars["epoch"], total=self.batches or None, description=f"    {description}",
                             visible=True)

    def update(self, advance: int = 1, **metrics: Any) -> None:
        """`advance` steps of the current epoch done; a finished epoch advances the stage's epochs."""
        self.metrics.update(metrics)
        self.batch_no += advance
        if self._rich is not None:
            self._set("epoch", completed=self.batch_no, info=_fmt(self.metrics, short=True))
        if self.batches and self.batch_no >= self.batches:
            self._epoch_done(self.epoch_no + 1, self.epochs)

    def phase(self, name: str) -> None:
        """A step of the current task without epochs (the export): its label on the stage bar, or one line."""
        self.stage, self.epochs, self.epoch_no = str(name), 0, 0
        if self._rich is not None:
            self._rich.reset(self._bars["stage"], total=None, description=f"  {name}", visible=True, info="")
            self._set("epoch", visible=False)
        elif self.enabled:
            self._print(f"  {self._where()}")

    def log(self, msg: str) -> None:
        """A line of text, printed above the bars."""
        if self._rich is not None:
            self._rich.console.print(msg, highlight=False, markup=False)
        elif self.enabled:
            self._print(msg)

    # -- the runner's hooks -------------------------------------------------------------------------------------
    def start_task(self, t: int, n: int, name: str = "") -> None:
        self.total_tasks = int(n)
        if self._rich is not None:
            self._set("tasks", total=self.total_tasks)
        self.task_bar(t, name)

    def epoch(self, info: dict) -> None:
        """One finished epoch: info has stage, round, epoch, epochs and metrics (loss, train_acc, ...)."""
        stage = phase_label(info)
        if stage != self.stage:
            self.stage_bar(stage, info.get("epochs"))
        self.epochs = int(info.get("epochs") or self.epochs)
        self.metrics = {k: info[k] for k in ("loss", "train_acc", "images_per_s") if info.get(k) is not None}
        self._epoch_done(int(info.get("epoch", self.epoch_no + 1)), self.epochs)

    def end_task(self, t: int, record: Any = None, row: Optional[list] = None) -> None:
        if self._rich is not None:
            self._set("tasks", completed=t + 1)
            self._set("stage", visible=False)
            self._set("epoch", visible=False)

    # -- internals ----------------------------------------------------------------------------------------------
    def _epoch_done(self, epoch: int, epochs: int) -> None:
        self.epoch_no, self.batch_no = epoch, 0
        if self._rich is not None:
            self._set("stage", completed=epoch, total=epochs or None, info=_fmt(self.metrics, short=True))
        elif self.enabled and self.verbose:
            of = f"/{epochs}" if epochs else ""
            self._print(f"    {self._where()} epoch {epoch}{of}: {_fmt(self.metrics)}".rstrip(": "))
        elif self.enabled and epochs and epoch >= epochs:  # one line per stage: its last epoch
            self._print(f"  {self._where()} {epochs} epoch{'s' if epochs != 1 else ''}: "
                        f"{_fmt(self.metrics, short=True)}".rstrip(": "))

    def _where(self) -> str:
        task = f"task {self.task_index + 1}/{self.total_tasks}" if self.task_index >= 0 else ""
        return f"{task} [{self.stage}]" if self.stage else task

    def _start_rich(self, console) -> None:
        from rich.console import Console
        from rich.progress import BarColumn, MofNCompleteColumn, Progress as RichProgress, TextColumn
        from rich.progress import TimeElapsedColumn
        from rich.table import Column

        console = console or Console(file=self.file)
        fixed = Column(width=26, no_wrap=True, overflow="ellipsis")
        rest = Column(no_wrap=True, overflow="ellipsis")
        self._rich = RichProgress(TextColumn("{task.description}", table_column=fixed), BarColumn(bar_width=16),
                                  MofNCompleteColumn(), TimeElapsedColumn(),
                                  TextColumn("{task.fields[info]}", table_column=rest), console=console)
        # before the first task the stream loads and the model is traced: say so rather than "tasks 0/0"
        first = ("tasks", self.total_tasks) if self.total_tasks else ("preparing (data, model)", None)
        self._bars = {"tasks": self._rich.add_task(first[0], total=first[1], info=""),
                      "stage": self._rich.add_task("  stage", total=None, info="", visible=False),
                      "epoch": self._rich.add_task("    batches", total=None, info="", visible=False)}

    def _set(self, bar: str, **kw: Any) -> None:
        self._rich.update(self._bars[bar], **kw)

    def _print(self, msg: str) -> None:
        print(msg, file=self.file or sys.stdout, flush=True)

    def __enter__(self) -> "Progress":
        if self._rich is not None:
            self._rich.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        if self._rich is not None:
            self._rich.stop()


@contextmanager
def progress(total_tasks: int, *, enabled: bool = True, plain: Optional[bool] = None, console=None,
             file=None, verbose: bool = False) -> Iterator[Progress]:
    """Progress bars for a run of `total_tasks` tasks; `plain` forces (or forbids) line output, which is a
    line per task and per stage, or also one per epoch with `verbose`."""
    with Progress(total_tasks, enabled=enabled, plain=plain, console=console, file=file, verbose=verbose) as p:
        yield p


def _is_tty(file) -> bool:
    stream = file or sys.stdout
    return bool(getattr(stream, "isatty", lambda: False)())


def phase_label(info: dict, short: bool = False) -> str:
    """A learner's epoch info -> the phase people read: "stage 1", "growth round 2", "scratch reference".

    GROWN learns its net's first task by sparse growth from the seed (learner stage "grow", round 1, `from_seed`;
    task 1 in logs that predate the key): that is its stage 1, and its later rounds are growth rounds 1, 2, ...
    After a pretrained task 0 the stream's task 1 is not learned from the seed.  `short` drops the explanation
    (TensorBoard tags)."""
    stage, rnd = info.get("stage", ""), int(info.get("round") or 0)
    if stage == "scratch":
        return "scratch reference"
    if stage == "finetune_reference":  # best(scratch, finetune): fine-tune learns every task once, up front
        return "fine-tune reference" + ("" if short else f" (task {int(info.get('task', 0)) + 1})")
    if stage == "grow":
        if info.get("from_seed", info.get("task") == 0):
            if rnd <= 1:
                return "stage 1" if short else "stage 1 (sparse growth from the seed)"
            rnd -= 1
        return f"growth round {rnd}"
    text = str(stage)
    if text.startswith("stage") and text[5:].isdigit():
        return f"stage {text[5:]}"
    name = f"stage {stage}" if text.isdigit() else text
    return f"{name} round {rnd}" if rnd else name


def _fmt(metrics: dict, short: bool = False) -> str:
    parts = []
    for key, value in metrics.items():
        if short and key not in ("loss", "train_acc", "acc"):
            continue
        if isinstance(value, float):
            value = f"{value:.1f}" if key.endswith(("acc", "_per_s")) else f"{value:.4g}"
        parts.append(f"{key} {value}")
    return ", ".join(parts)
