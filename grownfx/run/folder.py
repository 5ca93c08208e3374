"""The run folder: which folder a run writes to (`runs/NAME`, `runs/NAME-2`, ...), its lock, and what is in it
before the loop starts (config.resolved.yaml with provenance and an empty metrics.jsonl, or the checkpoint a resumed
run continues from).  Used by grownfx.run.runner and grownfx.run.compare.
"""

from __future__ import annotations

import platform
import subprocess
import sys
from pathlib import Path
from typing import Optional

import torch

from grownfx.version import __version__
from grownfx import files
from grownfx.recipe.loading import dump_resolved, recipe_diff
from grownfx.recipe.schema import Recipe

# recipe fields that may differ when resuming (they do not change what is learned)
# (training.num_threads is not among them: CPU kernels reduce in a thread-dependent order, so 1 and 2 threads
# learn slightly different weights)
RESUME_FREE = ("output.", "training.checkpoint_every", "device", "description", "code_dir")
# files whose presence means a folder holds a run (started, perhaps killed before its first checkpoint)
RUN_MARKERS = ("config.resolved.yaml", "metrics.jsonl", "checkpoints/last.pt", "summary.json")


class RunError(RuntimeError):
    """A run that cannot start or continue, with the reason (e.g. an incompatible resume)."""


def holds_run(folder: Path) -> bool:
    """Whether `folder` holds a grownfx run (finished, interrupted, or killed before its first checkpoint)."""
    return any((Path(folder) / m).exists() for m in RUN_MARKERS)


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


def _load_checkpoint(path: Path) -> dict:
    try:
        return files.load(path)
    except files.CorruptFileError as exc:
        raise RunError(f"cannot resume: {exc}") from None


def _prepare_out(out: Path, recipe: Recipe, resume: bool, last: Path, explicit: bool = True) -> Optional[dict]:
    """The checkpoint to resume from (None: a new run).  The checkpoint is the source of truth: a deleted
    config.resolved.yaml is rebuilt from it, and a run killed before its first checkpoint starts again."""
    files.clean_stale_temps(out)  # temp files of a writer killed mid-write (we hold the folder's lock)
    if resume:
        if last.exists():
            state = _load_checkpoint(last)
            _check_compatible(state["recipe"], recipe)
            if not (out / "config.resolved.yaml").exists():
                saved = Recipe.model_validate(state["recipe"])
                files.atomic_write_text(dump_resolved(saved) + "\n" + _provenance(), out / "config.resolved.yaml")
            return state
        if not holds_run(out):
            raise RunError(f"nothing to resume: {last} does not exist")
        # killed before its first checkpoint: nothing was learned yet, start it again in the same folder
    elif holds_run(out):
        raise RunError(f"{out} already holds a run; continue it with --resume or choose another --out")
    elif explicit and any(p.name != files.FolderLock.NAME for p in out.iterdir()):
        raise RunError(f"{out} is not empty and holds no grownfx run; refusing to write into it "
                       "(choose an empty or new folder for --out)")
    out.mkdir(parents=True, exist_ok=True)
    text = dump_resolved(recipe) + "\n" + _provenance()
    files.atomic_write_text(text, out / "config.resolved.yaml")
    files.atomic_write_text("", out / "metrics.jsonl")
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
