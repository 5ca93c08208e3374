"""Step 6: write an exported per-task subnetwork to disk (pt2, ONNX, TorchScript) with its meta.json."""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import tempfile
from pathlib import Path
from typing import Optional

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from grownfx import files
from grownfx.engine import multitask
from grownfx.engine.banks import MaskedLayer
from grownfx.engine.layers import PerTask, TaskParameter
from grownfx.report.formats import ExportMeta, read_model
from grownfx.run.folder import ExportError
from grownfx.run.opening import load_export, read_stream, restore_method
from grownfx.version import __version__

FILES = {"pt2": "model.pt2", "onnx": "model.onnx", "torchscript": "model.ts"}
# torch 2.9 made the torch.export-based ONNX exporter the default and deprecated the TorchScript one
_TORCH_EXPORT_ONNX = tuple(int(v) for v in torch.__version__.split("+")[0].split(".")[:2]) >= (2, 9)


def count_macs(module: nn.Module, example: torch.Tensor) -> int:
    """Multiply-accumulates of one forward pass on `example` (FlopCounterMode counts every op, masks folded)."""
    module.eval()
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        module(example)
    return int(counter.get_total_flops() // 2)


def serialize_module(module: nn.Module, example: torch.Tensor, fmt: str) -> bytes:
    """`module` in `fmt` (pt2, onnx, torchscript), as the bytes of its file."""
    buf = io.BytesIO()
    module = module.eval()
    with torch.no_grad():
        if fmt == "pt2":
            try:  # a dynamic batch dimension when the graph allows one
                program = torch.export.export(module, (example,), dynamic_shapes=({0: torch.export.Dim.AUTO},))
            except Exception:
                program = torch.export.export(module, (example,))
            torch.export.save(program, buf)
        elif fmt == "onnx":  # to a scratch file (the exporter deprecates file objects), read back
            with tempfile.TemporaryDirectory(prefix="grownfx_onnx_") as scratch:
                target = str(Path(scratch) / FILES[fmt])
                if _TORCH_EXPORT_ONNX:  # the current exporter (torch.export-based); the TorchScript one is deprecated
                    torch.onnx.export(module, (example,), target, input_names=["input"], output_names=["logits"],
                                      dynamic_shapes=({0: torch.export.Dim.AUTO},), dynamo=True, verbose=False,
                                      external_data=False)
                else:
                    torch.onnx.export(module, (example,), target, input_names=["input"], output_names=["logits"],
                                      dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}})
                buf.write(Path(target).read_bytes())
        elif fmt == "torchscript":
            torch.jit.save(torch.jit.trace(module, example), buf)
        else:
            raise ValueError(f"unknown export format {fmt!r}; choose pt2, onnx or torchscript")
    return buf.getvalue()


def save_module(module: nn.Module, example: torch.Tensor, fmt: str, folder: str | Path) -> Path:
    """Write `module` in `fmt` under `folder` (temp file, fsync, rename: the file is whole, old or new, at any
    kill); returns the file.  Its meta.json is the caller's to write, after it."""
    if fmt not in FILES:
        raise ValueError(f"unknown export format {fmt!r}; choose pt2, onnx or torchscript")
    path = Path(folder) / FILES[fmt]
    files.atomic_write_bytes(serialize_module(module, example, fmt), path)
    return path


def write_meta(folder: str | Path, meta: dict) -> Path:
    path = Path(folder) / "meta.json"
    files.atomic_write_text(json.dumps(meta, indent=2), path)
    return path


def task_folder(run_dir: str | Path, index: int) -> Path:
    """exports/task_<k>/ of the task with 0-based `index`: folders count tasks from 1, like every printed place."""
    return Path(run_dir) / "exports" / f"task_{index + 1}"


def preprocessing(stream_meta: dict) -> dict:
    """How a raw input becomes the model's input, from a stream's meta (stream.json)."""
    scale = float(stream_meta.get("pixel_scale", 1.0))
    return {"input_shape": list(stream_meta["input_shape"]), "pixel_scale": scale,
            "mean": list(stream_meta["mean"]), "std": list(stream_meta["std"]),
            "formula": "model_input = (raw * pixel_scale - mean) / std, per channel: dimension 1 of a batch "
                       "(N, C, ...) shaped (N, *input_shape)"}


class Preprocessed(nn.Module):
    """`module` behind its preprocessing, so that the exported graph takes raw inputs."""

    def __init__(self, module: nn.Module, prep: dict):
        super().__init__()
        self.module = module
        shape = (1, -1, *([1] * (len(prep["input_shape"]) - 1)))  # channel = dimension 1, any input rank
        std = torch.tensor(prep["std"], dtype=torch.float32).view(shape)
        self.register_buffer("scale", (prep["pixel_scale"] / std))
        self.register_buffer("shift", torch.tensor(prep["mean"], dtype=torch.float32).view(shape) / std)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.module(x * self.scale - self.shift)


def record_export(folder: str | Path, base: dict, fmt: str, entry: dict) -> dict:
    """Merge one format's entry into the folder's single meta.json: `base` (task, preprocessing, ...) and
    `formats[fmt]` = entry; the entries of formats exported earlier are kept."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "meta.json"
    try:
        meta = files.read_json(path) if path.exists() else {}
    except files.CorruptFileError:  # torn (written in place by an older grownfx): this export rewrites it
        meta = {}
    if not isinstance(meta, dict) or not isinstance(meta.get("formats", {}), dict):
        meta = {}  # not a meta.json grownfx wrote: this export rewrites it
    formats = meta.get("formats", {})
    for stale in ("format", "file", "verified_max_rel_error", "error"):  # single-format meta of older versions
        meta.pop(stale, None)
    meta.update(base)
    formats[fmt] = entry
    meta["formats"] = dict(sorted(formats.items()))
    write_meta(folder, meta)
    return meta


def task_meta(stream, stream_meta: dict, t: int, sub: nn.Module, checkpoint: str | Path) -> dict:
    """The task part of an export's meta.json, the same whether the run or `grownfx export` writes it: the task,
    its class map, input shape and normalisation, parameters, MACs, the checkpoint it came from, versions.
    `stream`: a TaskStream or the _StreamInfo read back from stream.json; `stream_meta`: stream.json's content."""
    task = stream.tasks[t]
    example = torch.zeros(1, *stream.input_shape)
    return {"task": t + 1, "task_index": t, "name": task.name, "classes": list(task.classes),
            "num_classes": task.num_classes, "input_shape": list(stream.input_shape), "mean": list(stream.mean),
            "std": list(stream.std), "preprocessing": preprocessing(stream_meta),
            "parameters": sum(p.numel() for p in sub.parameters()), "macs": count_macs(sub, example),
            "source_checkpoint_sha256": files.file_sha256(checkpoint), "grownfx": __version__,
            "torch": torch.__version__}


def export_complete(folder: str | Path, fmt: str) -> bool:
    """Whether `folder` holds a finished export in `fmt`: a readable meta.json whose entry for `fmt` names a file
    that exists with the SHA-256 it records (or records why exporting failed)."""
    try:
        meta = read_model(Path(folder) / "meta.json", ExportMeta)
    except files.CorruptFileError:
        return False
    entry = meta["formats"].get(fmt)
    if not isinstance(entry, dict) or "preprocessing" not in meta:
        return False
    if entry.get("error"):
        return True
    path = Path(folder) / str(entry.get("file") or "")
    return path.is_file() and entry.get("sha256") is not None and entry["sha256"] == files.file_sha256(path)


def export_run(run_dir: str | Path, task: int, fmt: str = "pt2", verify: bool = False,
               bake_preprocessing: bool = False, trust: Optional[bool] = None,
               check_sha256: bool = True) -> tuple[Path, dict]:
    """Export the task with 0-based index `task` (the CLI's --task is 1-based) of a run to `fmt` under
    exports/task_<task + 1>/; returns (file, that format's meta entry).  `bake_preprocessing` puts
    `(raw * pixel_scale - mean) / std` into the graph, so the file takes raw inputs.  `verify` re-loads the file
    and compares it with the task-aware model on random inputs (relative error <= 1e-4, ONNX runs in float32).

    The run folder is locked while exporting (a run writing it is waited for by no one: refused); the model file
    is written atomically and meta.json after it.  `trust` and `check_sha256` (False: a checkpoint without its
    checksum file loads unchecked): grownfx.run.opening.restore_method."""
    run_dir = Path(run_dir)
    with _locked(run_dir):
        method, recipe, stream, state = restore_method(run_dir, trust=trust, verify=check_sha256)
        if not 0 <= task < state["completed"]:
            raise ExportError(f"no task {task + 1} in {run_dir}: it finished {state['completed']} task(s); "
                              f"--task takes 1..{state['completed']}")
        _, meta_stream = read_stream(run_dir)
        prep = preprocessing(meta_stream)
        sub = method.export(task).cpu().eval()
        if bake_preprocessing:
            sub = Preprocessed(sub, prep).eval()
        example = torch.randn(2, *stream.input_shape)
        folder = task_folder(run_dir, task)
        path = save_module(sub, example, fmt, folder)
        entry: dict = {"file": path.name, "parameters": sum(p.numel() for p in sub.parameters()),
                       "preprocessing_baked": bake_preprocessing,
                       "expects": "raw inputs" if bake_preprocessing else "preprocessed inputs (see preprocessing)"}
        if verify:
            x = torch.randn(8, *stream.input_shape, generator=torch.Generator().manual_seed(task))
            with torch.no_grad():
                ref = method.predict(x, task) if hasattr(method, "predict") else method.export(task).eval()(x)
                raw = (x + sub.shift) / sub.scale if bake_preprocessing else x  # the raw input behind x
                # just written by this process (meta.json still has the old file's digest): no checks to make
                got = load_export(path, verify=False, trust=True)(raw)
            err = float((got - ref).abs().max() / ref.abs().max().clamp_min(1e-12))
            entry["verified_max_rel_error"] = err
            if err > 1e-4:
                raise RuntimeError(f"exported task {task + 1} differs from the task-aware model: relative error "
                                   f"{err:.2e}")
        entry["sha256"] = files.file_sha256(path)
        # the same task meta the run writes (mean, std, classes, input shape, ...), from the plain subnetwork
        base = task_meta(stream, meta_stream, task, method.export(task).cpu().eval(),
                         run_dir / "checkpoints" / "last.pt")
        record_export(folder, base, fmt, entry)  # meta.json last
    return path, entry


@contextlib.contextmanager
def _locked(run_dir: Path):
    """The run folder's lock (one writer at a time): LockedError while a run writes it, NotWritableError when it
    is read-only; temp files a killed export left are removed."""
    if not run_dir.is_dir():
        raise ExportError(f"{run_dir} is not a run folder")
    try:
        lock = files.FolderLock(run_dir).acquire()
    except files.LockedError as exc:
        raise ExportError(f"cannot export now: {exc}") from None
    try:
        files.clean_stale_temps(run_dir / "exports")
        yield
    finally:
        lock.release()


# --- every task in one artifact (`grownfx export RUN --all-tasks`) ----------------------------------------------

ALL_TASKS_DIR, ALL_TASKS_FILE, ALL_TASKS_LOADER = "all_tasks", "model.pt", "multitask.py"


def multitask_reference_bytes(net, num_tasks: int) -> dict:
    """What serving `num_tasks` tasks must store at least, counted from the net: each masked layer's frozen bank,
    every per-task copy (norms, heads, biases, per-task parameters) of those tasks, and 1 bit per unit (a kernel; a
    weight at element granularity) of each bank per task.  The size goal of the artifact is <= 1.10x their sum."""
    def nbytes(x) -> int:
        if isinstance(x, torch.Tensor):
            return x.numel() * x.element_size()
        return sum(nbytes(v) for v in list(x.parameters()) + list(x.buffers()))

    bank = masks = per_task = 0
    for m in net.modules():
        if isinstance(m, MaskedLayer):
            bank += nbytes(m.frozen)
            masks += num_tasks * -(-m.owner.numel() // 8)
        elif isinstance(m, (PerTask, TaskParameter)):
            per_task += sum(nbytes(m.copies[t]) for t in range(min(num_tasks, len(m.copies))))
    return {"bank": bank, "per_task": per_task, "masks": masks, "total": bank + per_task + masks}


def export_all_tasks(run_dir: str | Path, verify: bool = False, bake_preprocessing: bool = False,
                     trust: Optional[bool] = None, check_sha256: bool = True) -> tuple[Path, dict]:
    """Every finished task of a run in one file, exports/all_tasks/model.pt, with its torch-only loader
    (multitask.py, `load(path)(x, task=t)`, t 0-based) and meta.json; returns (file, meta).  A run whose net's
    task 0 is its pretrained weights (`model.weights_task`) keeps the net's indices: t = 0 is the pretrained
    network, t = k the stream's task k (meta.json labels each).  The frozen banks are stored once, each task as its channel indices, 1 bit per kernel and its own norms/heads (grownfx.engine.
    multitask).  `verify` loads the file as the copied loader does and compares every task with the task-aware
    model (bit for bit is expected; relative error <= 1e-5 accepted).  Every file is written atomically, meta.json
    last; `trust`, `check_sha256`: as in `export_run`."""
    run_dir = Path(run_dir)
    with _locked(run_dir):
        method, recipe, stream, state = restore_method(run_dir, trust=trust, verify=check_sha256)
        net = getattr(method, "net", None)
        if net is None or not hasattr(net, "masked_layers"):
            raise ExportError(f"--all-tasks needs a method whose tasks share one task-aware net (GROWN, PackNet, "
                              f"Piggyback, ...); {recipe.method.name} keeps a model per task: export each with --task")
        offset = getattr(method, "offset", 0)  # 1: the net's task 0 is the pretrained network
        done = int(state["completed"])
        if done < 1:
            raise ExportError(f"{run_dir} has no finished task to export")
        _, meta_stream = read_stream(run_dir)
        prep = preprocessing(meta_stream)
        pre = None
        if bake_preprocessing:
            p = Preprocessed(nn.Identity(), prep)
            pre = (p.scale, p.shift)
        net = net.cpu().eval()
        example = torch.randn(2, *stream.input_shape)
        labels = _all_tasks_labels(stream, done, offset, method)
        n = len(labels)  # the net's tasks in the file: the pretrained one (offset 1), then the stream's
        blob = multitask.build(net, example, preprocess=pre, names=[e["name"] for e in labels], num_tasks=n)
        folder = Path(run_dir) / "exports" / ALL_TASKS_DIR
        path = folder / ALL_TASKS_FILE
        buf = io.BytesIO()
        torch.save(blob, buf)
        data = buf.getvalue()
        files.atomic_write_bytes(data, path)
        files.atomic_write_text(multitask.runtime_source(), folder / ALL_TASKS_LOADER)
        ref = multitask_reference_bytes(net, n)
        size = len(data)
        meta = {"format": blob["format"], "format_version": blob["version"], "file": path.name,
                "loader": ALL_TASKS_LOADER, "sha256": hashlib.sha256(data).hexdigest(), "bytes": size,
                "usage": (f"import sys; sys.path.insert(0, '<this folder>'); from multitask import load; "
                          f"model = load('<this folder>/{path.name}'); logits = model(x, task=t)  # t: 0..{n - 1}"
                          + ("; t = 0 is the pretrained network, t = k the stream's task k" if offset else "")),
                "tasks": labels,
                "input_shape": list(stream.input_shape), "mean": list(stream.mean), "std": list(stream.std),
                "preprocessing": prep, "preprocessing_baked": bake_preprocessing,
                "expects": "raw inputs" if bake_preprocessing else "preprocessed inputs (see preprocessing)",
                "reference_bytes": ref, "size_ratio": size / max(ref["total"], 1),
                "masked_weights_stored_whole": blob["stats"]["dense_masked"], "programs": blob["stats"]["programs"],
                "source_checkpoint_sha256": files.file_sha256(run_dir / "checkpoints" / "last.pt"),
                "grownfx": __version__, "torch": torch.__version__}
        if verify:  # the copied loader is this module's source, byte for byte (runtime_source): load as it loads
            model = multitask.R.load(path, verify=False)  # just written; its meta.json comes next
            worst = 0.0
            for t in range(n):
                x = torch.randn(8, *stream.input_shape, generator=torch.Generator().manual_seed(t))
                with torch.no_grad():
                    want = net(x, task=t)
                    got = model((x + pre[1]) / pre[0] if pre else x, task=t)
                err = float((got - want).abs().max() / want.abs().max().clamp_min(1e-12))
                worst = max(worst, err)
                if err > 1e-5:
                    raise RuntimeError(f"the all-tasks export differs from the task-aware model on "
                                       f"{labels[t]['name'] if t < offset else f'task {t + 1 - offset}'}: "
                                       f"relative error {err:.2e}")
            meta["verified_max_rel_error"] = worst
        write_meta(folder, meta)  # last: a kill before it leaves the previous meta.json, which no longer matches
    return path, meta


def _all_tasks_labels(stream, done: int, offset: int, method) -> list[dict]:
    """meta.json's `tasks`: one entry per task of the file, in the loader's order (`task_index`); with a pretrained
    task 0 (offset 1) it comes first, labelled `pretrained`, and the stream's task k has index k."""
    out = []
    if offset:
        summary = method.pretrained_summary()
        out.append({"task": 0, "task_index": 0, "name": "pretrained", "pretrained": True,
                    "num_classes": summary["num_classes"], "weights": summary["weights"],
                    "weights_sha256": summary["weights_sha256"],
                    **({} if summary["num_classes"] else {"note": "the weights file has no classifier: this "
                                                                  "task's head is untrained"})})
    out += [{"task": t + 1, "task_index": t + offset, "name": stream.tasks[t].name,
             "classes": list(stream.tasks[t].classes), "num_classes": stream.tasks[t].num_classes}
            for t in range(done)]
    return out
