"""The run folder: which folder a run writes to (`runs/NAME`, `runs/NAME-2`, ...), its lock, and what is in it
before the loop starts (config.resolved.yaml with provenance and an empty metrics.jsonl, or the checkpoint a resumed
run continues from).  Used by grownfx.run.runner and grownfx.run.compare.
"""

from __future__ import annotations

import platform
import subprocess
import sys
from pathlib import Path
from typing import Any, Optional

import torch
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from grownfx.version import __version__
from grownfx import files
from grownfx.errors import UserError
from grownfx.recipe.loading import dump_resolved, recipe_diff
from grownfx.recipe.schema import Recipe

# recipe fields that may differ when resuming (they do not change what is learned)
# (training.num_threads is not among them: CPU kernels reduce in a thread-dependent order, so 1 and 2 threads
# learn slightly different weights)
RESUME_FREE = ("output.", "training.checkpoint_every", "device", "description", "code_dir")
RUN_MARKERS, holds_run = files.RUN_MARKERS, files.holds_run


class RunError(UserError, RuntimeError):
    """A run that cannot start or continue, with the reason (e.g. an incompatible resume)."""


class ExportError(UserError, ValueError):
    """A user's mistake in an export request (a task the run did not learn); the CLI exits 2 with it."""


def numbered_folders(base: Path) -> list[tuple[int, Path]]:
    """`base` (number 1) and its siblings `base-2`, `base-3`, ... that exist, by number."""
    found = [(1, base)] if base.exists() else []
    if base.parent.is_dir():
        for p in base.parent.glob(base.name + "-*"):
            suffix = p.name[len(base.name) + 1:]
            if suffix.isdigit() and int(suffix) >= 2 and p.is_dir():
                found.append((int(suffix), p))
    return sorted(found)


def claim_out(recipe: Recipe, out_dir, resume: bool) -> tuple[Path, files.FolderLock]:
    """The run folder, locked: `out_dir` when given; else, resuming, the latest of the recipe's numbered folders
    (`runs/NAME`, `runs/NAME-2`, ...) that holds a run; else the first that does not (a second run of the same
    command gets `runs/NAME-2`).  RunError when another process holds the folder's lock."""
    if out_dir is not None or resume:
        if out_dir is not None:
            out = Path(out_dir)
        else:
            base = Path(recipe.output.dir.format(name=recipe.name))
            runs = [p for _, p in numbered_folders(base) if holds_run(p)]
            if not runs:
                raise RunError(f"nothing to resume: no run folder {base} (or {base.name}-N) holds a run")
            out = runs[-1]
        return out, _lock(out)
    base = Path(recipe.output.dir.format(name=recipe.name))
    n = 1
    while True:
        out = base if n == 1 else base.with_name(f"{base.name}-{n}")
        n += 1
        if holds_run(out):
            continue
        try:
            lock = files.FolderLock(out).acquire()
        except files.LockedError:  # another process is starting a run there right now
            continue
        if holds_run(out):
            lock.release()
            continue
        return out, lock


def _lock(out: Path) -> files.FolderLock:
    try:
        return files.FolderLock(out).acquire()
    except files.LockedError as exc:
        raise RunError(str(exc)) from None


class _Checkpoint(BaseModel):
    """What the runner relies on in checkpoints/last.pt (the tensors are the method's own to check)."""

    model_config = ConfigDict(extra="allow", arbitrary_types_allowed=True)
    format: int
    recipe: dict
    completed: int = Field(ge=0)
    records: list[dict]
    matrix: list[list[Optional[float]]]
    targets: dict[str, dict]
    metrics_lines: int = Field(ge=0)
    metrics: list[str] = Field(default_factory=list)
    method: dict
    position: Optional[dict] = None
    optim: Any = None


def checkpoint_state(state: Any, path: Path) -> dict:
    """`state` (a loaded checkpoint) when it has the checkpoint's shape; CorruptFileError naming the field else."""
    try:
        header = _Checkpoint.model_validate(state)
    except ValidationError as exc:
        first = exc.errors(include_url=False)[0]
        where = ".".join(str(p) for p in first["loc"]) or "the top level"
        raise files.CorruptFileError(f"{path} is not a grownfx checkpoint ({where}: {first['msg'].lower()})") from None
    if not header.completed == len(header.records) == len(header.matrix):
        raise files.CorruptFileError(f"{path} is not a consistent checkpoint: it says {header.completed} tasks are "
                                     f"done but holds {len(header.records)} records and {len(header.matrix)} rows")
    return state


def _load_checkpoint(path: Path, verify: bool = True) -> dict:
    try:
        return checkpoint_state(files.load(path, verify=verify), path)
    except files.CorruptFileError as exc:
        raise RunError(f"cannot resume: {exc}") from None


RESULTS = ("summary.json", "acc_matrix.json", "acc_matrix.csv", "exports")


def results_in(folder: Path) -> list[str]:
    """The result files a run folder holds (summary, accuracy matrix, exports); written only after the
    checkpoint of the task they report, so a folder holding them held a checkpoint."""
    found = []
    for name in RESULTS:
        p = folder / name
        if p.is_file() or (p.is_dir() and any(q.is_file() for q in p.rglob("*"))):
            found.append(name + ("/" if p.is_dir() else ""))
    return found


def _prepare_out(out: Path, recipe: Recipe, resume: bool, last: Path, explicit: bool = True,
                 verify: bool = True) -> Optional[dict]:
    """The checkpoint to resume from (None: a new run).  The checkpoint is the source of truth: a deleted
    config.resolved.yaml is rebuilt from it, and a run killed before its first checkpoint starts again; a folder
    holding results but no checkpoint is refused (starting again would overwrite them)."""
    files.clean_stale_temps(out)  # temp files of a writer killed mid-write (we hold the folder's lock)
    if resume:
        if last.exists():
            state = _load_checkpoint(last, verify)
            _check_compatible(state["recipe"], recipe)
            if not (out / "config.resolved.yaml").exists():
                saved = Recipe.model_validate(state["recipe"])
                files.atomic_write_text(dump_resolved(saved) + "\n" + _provenance(), out / "config.resolved.yaml")
            return state
        if not holds_run(out):
            raise RunError(f"nothing to resume: {last} does not exist")
        found = results_in(out)
        if found:
            raise RunError(f"cannot resume {out}: it holds results ({', '.join(found)}) but no checkpoint ({last} is "
                           "missing), and starting the run again would overwrite them; restore the checkpoint, or "
                           "run into another folder (--out)")
        # killed before its first checkpoint: nothing was learned yet, start it again in the same folder
    elif holds_run(out):
        raise RunError(f"{out} already holds a run; continue it with --resume or choose another --out")
    elif explicit and any(p.name != files.FolderLock.NAME for p in out.iterdir()):
        raise RunError(f"{out} is not empty and holds no grownfx run; refusing to write into it "
                       "(choose an empty or new folder for --out)")
    files.ensure_dir(out)
    text = dump_resolved(recipe) + "\n" + _provenance()
    files.atomic_write_text(text, out / "config.resolved.yaml")
    files.atomic_write_text("", out / "metrics.jsonl")
    return None


def _check_compatible(saved: dict, recipe: Recipe) -> None:
    now = recipe.model_dump(mode="json")
    try:
        diffs = [p for p in recipe_diff(saved, now) if not p.startswith(RESUME_FREE)]
    except ValidationError as exc:  # written by another grownfx version, or edited
        first = exc.errors(include_url=False)[0]
        raise RunError(f"cannot resume: the recipe stored in the checkpoint does not validate "
                       f"({'.'.join(map(str, first['loc']))}: {first['msg']})") from None
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
