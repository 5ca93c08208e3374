"""Opening what a run folder holds, safely: its method (to export a task) and its exports (to use them).

    model = load_export("runs/digits_quickstart/exports/task_1")     # model.pt2, checked, as a callable
    model = load_export("runs/digits_quickstart/exports/all_tasks")  # every task: model(x, task=t)

Three rules, whoever made the folder:
* checksums: a checkpoint is loaded only against its `.sha256` file, an export only against the SHA-256 its
  meta.json records (`verify=False`, the command line's `--no-verify`, skips a check that cannot be made, never
  one that fails);
* no pickled code: tensors are read with `torch.load(weights_only=True)`, and a torch.export archive is checked
  (`multitask_runtime.check_archive`) before torch.export.load reads it, since torch.export.load unpickles parts
  of an archive without weights_only and loads AOTInductor libraries;
* the trust rule (grownfx.recipe.trust): a checkpoint whose recipe names code (`module:callable`) is rebuilt
  only with `trust=True` (`--trust`); a TorchScript file, which holds code, is loaded only with `trust=True`.
"""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any, Callable, Optional

import torch
from pydantic import ValidationError

from grownfx import files
from grownfx.errors import UserError
from grownfx.engine import multitask_runtime
from grownfx.learn.methods import make_method
from grownfx.recipe.schema import Recipe
from grownfx.recipe.trust import UntrustedCodeError, require_trust, trusted
from grownfx.report.formats import ExportMeta, StreamMeta, read_model
from grownfx.run.folder import ExportError, checkpoint_state

__all__ = ["load_export", "read_stream", "restore_method"]


class _StreamInfo:
    """What building a method needs from a stream, read back from a run's stream.json (no dataset needed)."""

    def __init__(self, meta: dict):
        from types import SimpleNamespace

        self.input_shape = tuple(meta["input_shape"])
        self.mean, self.std = tuple(meta["mean"]), tuple(meta["std"])
        self.tasks = [SimpleNamespace(index=t["index"], name=t["name"], classes=t["classes"],
                                      num_classes=len(t["classes"])) for t in meta["tasks"]]


def read_stream(run_dir: str | Path) -> tuple[_StreamInfo, dict]:
    """A run's stream.json, validated: (what building a method needs, the file's content)."""
    meta = read_model(Path(run_dir) / "stream.json", StreamMeta)
    return _StreamInfo(meta), meta


def restore_method(run_dir: str | Path, trust: Optional[bool] = None, verify: bool = True,
                   code_dir: Optional[str] = None):
    """The method of a finished (or interrupted) run, rebuilt from its recipe and last checkpoint, on the CPU.

    The recipe is the checkpoint's, written by whoever made the folder: a builder naming code (`module:callable`)
    is refused unless `trust` (grownfx.recipe.trust), and then imported from `code_dir` when given, else the
    recipe's.  `verify=False` loads a checkpoint whose checksum file is missing."""
    run_dir = Path(run_dir)
    last = run_dir / "checkpoints" / "last.pt"
    if not last.exists():
        raise ExportError(f"{run_dir} holds no checkpoint (expected {last}); is it a run folder? "
                          "(`grownfx run` prints the folder it writes)")
    state = checkpoint_state(files.load(last, verify=verify), last)
    require_trust(state["recipe"], f"{last} (its recipe)", trust)
    try:
        recipe = Recipe.model_validate(state["recipe"])
    except ValidationError as exc:
        first = exc.errors(include_url=False)[0]
        where = ".".join(str(p) for p in first["loc"])
        raise files.CorruptFileError(f"{last} holds a recipe grownfx cannot read ({where}: {first['msg']})") from None
    if code_dir is not None:
        recipe = recipe.model_copy(update={"code_dir": code_dir})
    stream, _ = read_stream(run_dir)
    method = make_method(recipe, stream, torch.device("cpu"))
    method.load_state(state["method"])
    return method, recipe, stream, state


def _export_file(path: Path) -> Path:
    """The model file an export folder holds (pt2 first), or `path` itself when it is a file."""
    if not path.is_dir():
        return path
    meta = read_model(path / "meta.json", ExportMeta)
    if meta.get("file"):
        return path / meta["file"]
    entries = meta.get("formats") or {}
    for fmt in ("pt2", "onnx", "torchscript", *entries):
        entry = entries.get(fmt) or {}
        if entry.get("file"):
            return path / entry["file"]
    raise files.CorruptFileError(f"{path / 'meta.json'} names no exported file")


def load_export(path: str | Path, verify: bool = True, trust: Optional[bool] = None) -> Callable[..., Any]:
    """An export written by grownfx as a callable: `x -> logits` for one task (`exports/task_K/model.pt2`, `.onnx`,
    `.ts`), `(x, task=t) -> logits` for every task (`exports/all_tasks/model.pt`); `path` is the file or its
    folder.

    The file's SHA-256 must equal the one its meta.json records (CorruptFileError otherwise, also when meta.json is
    missing; `verify=False` skips this check).  A `.pt2` is checked for pickles that need code and for compiled
    libraries before torch.export.load reads it; the all-tasks file is read with weights_only=True and its graphs
    checked the same way; ONNX files are data for onnxruntime.  A TorchScript file holds TorchScript code that
    runs when the model is called: it loads only with `trust=True` (or GROWNFX_TRUST=1)."""
    path = _export_file(Path(path))
    try:
        if path.suffix == ".pt":
            return multitask_runtime.load(path, verify=verify)
        data = files.read_bytes(path)
        if verify:
            multitask_runtime.check_sha256(data, path)
        elif not data:
            raise files.CorruptFileError(f"{path} is empty (0 bytes): the export is corrupt; re-create it with "
                                         "grownfx export")
        if path.suffix == ".pt2":
            multitask_runtime.check_archive(data, str(path))
            return torch.export.load(io.BytesIO(data)).module()
        if path.suffix == ".onnx":
            import onnx  # noqa: F401  (checked so the error names the missing package)
            import onnxruntime as ort  # type: ignore

            session = ort.InferenceSession(data, providers=["CPUExecutionProvider"])

            def run(x: torch.Tensor) -> torch.Tensor:
                return torch.from_numpy(session.run(None, {"input": x.detach().cpu().numpy()})[0])

            return run
        if path.suffix == ".ts":
            if not trusted(trust):
                raise UntrustedCodeError(f"{path} is TorchScript, which holds code that runs when the model runs: "
                                         "load it only from someone you trust, with trust=True (scripts: "
                                         "GROWNFX_TRUST=1)")
            return torch.jit.load(io.BytesIO(data))
    except FileNotFoundError:
        raise files.CorruptFileError(f"{path} does not exist") from None
    except multitask_runtime.IntegrityError as exc:
        raise files.CorruptFileError(str(exc)) from None
    except (RuntimeError, ValueError, EOFError) as exc:
        if isinstance(exc, UserError):
            raise
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:160]
        raise files.CorruptFileError(f"{path} is not a readable export ({first})") from None
    raise ValueError(f"not an exported model: {path}")
