"""Step 6: write an exported per-task subnetwork to disk (pt2, ONNX, TorchScript) with its meta.json."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from grownfx import files
from grownfx.learn.methods import make_method
from grownfx.recipe.schema import Recipe

FILES = {"pt2": "model.pt2", "onnx": "model.onnx", "torchscript": "model.ts"}


def count_macs(module: nn.Module, example: torch.Tensor) -> int:
    """Multiply-accumulates of one forward pass on `example` (FlopCounterMode counts every op, masks folded)."""
    module.eval()
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        module(example)
    return int(counter.get_total_flops() // 2)


def save_module(module: nn.Module, example: torch.Tensor, fmt: str, folder: str | Path) -> Path:
    """Write `module` in `fmt` under `folder`; returns the file."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / FILES[fmt]
    module = module.eval()
    with torch.no_grad():
        if fmt == "pt2":
            try:  # a dynamic batch dimension when the graph allows one
                program = torch.export.export(module, (example,), dynamic_shapes=({0: torch.export.Dim.AUTO},))
            except Exception:
                program = torch.export.export(module, (example,))
            torch.export.save(program, str(path))
        elif fmt == "onnx":
            torch.onnx.export(module, (example,), str(path), input_names=["input"], output_names=["logits"],
                              dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}}, dynamo=False)
        elif fmt == "torchscript":
            torch.jit.trace(module, example).save(str(path))
        else:
            raise ValueError(f"unknown export format {fmt!r}; choose pt2, onnx or torchscript")
    return path


def load_exported(path: str | Path):
    """A callable `x -> logits` for a file written by `save_module`."""
    path = Path(path)
    if path.suffix == ".pt2":
        return torch.export.load(str(path)).module()
    if path.suffix == ".ts":
        return torch.jit.load(str(path))
    if path.suffix == ".onnx":
        import onnx  # noqa: F401  (checked so the error names the missing package)
        import onnxruntime as ort  # type: ignore

        session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])

        def run(x: torch.Tensor) -> torch.Tensor:
            return torch.from_numpy(session.run(None, {"input": x.detach().cpu().numpy()})[0])

        return run
    raise ValueError(f"not an exported model: {path}")


def write_meta(folder: str | Path, meta: dict) -> Path:
    path = Path(folder) / "meta.json"
    path.write_text(json.dumps(meta, indent=2))
    return path


class _StreamInfo:
    """What building a method needs from a stream, read back from a run's stream.json (no dataset needed)."""

    def __init__(self, meta: dict):
        from types import SimpleNamespace

        self.input_shape = tuple(meta["input_shape"])
        self.mean, self.std = tuple(meta["mean"]), tuple(meta["std"])
        self.tasks = [SimpleNamespace(index=t["index"], name=t["name"], classes=t["classes"],
                                      num_classes=len(t["classes"])) for t in meta["tasks"]]


def restore_method(run_dir: str | Path):
    """The method of a finished (or interrupted) run, rebuilt from its recipe and last checkpoint, on the CPU."""
    run_dir = Path(run_dir)
    last = run_dir / "checkpoints" / "last.pt"
    if not last.exists():
        raise FileNotFoundError(f"{run_dir} holds no checkpoint (expected {last})")
    state = files.load(last)
    recipe = Recipe.model_validate(state["recipe"])
    stream = _StreamInfo(json.loads((run_dir / "stream.json").read_text()))
    method = make_method(recipe, stream, torch.device("cpu"))
    method.load_state(state["method"])
    return method, recipe, stream, state


def export_run(run_dir: str | Path, task: int, fmt: str = "pt2", verify: bool = False) -> Path:
    """Export task `task` of a run to `fmt` under exports/task_<task>/; `verify` re-loads the file and
    compares it with the task-aware model on random inputs (relative error <= 1e-4, ONNX runs in float32)."""
    run_dir = Path(run_dir)
    method, recipe, stream, state = restore_method(run_dir)
    if not 0 <= task < state["completed"]:
        raise ValueError(f"task {task} was not learned in {run_dir} (it finished {state['completed']} tasks)")
    sub = method.export(task).cpu().eval()
    example = torch.randn(2, *stream.input_shape)
    folder = run_dir / "exports" / f"task_{task}"
    path = save_module(sub, example, fmt, folder)
    meta_path = folder / "meta.json"
    meta = json.loads(meta_path.read_text()) if meta_path.exists() else {"task": task}
    meta.update(format=fmt, file=path.name, parameters=sum(p.numel() for p in sub.parameters()))
    if verify:
        x = torch.randn(8, *stream.input_shape, generator=torch.Generator().manual_seed(task))
        with torch.no_grad():
            ref = method.predict(x, task) if hasattr(method, "predict") else sub(x)
            got = load_exported(path)(x)
        err = float((got - ref).abs().max() / ref.abs().max().clamp_min(1e-12))
        meta["verified_max_rel_error"] = err
        if err > 1e-4:
            raise RuntimeError(f"exported task {task} differs from the task-aware model: relative error {err:.2e}")
    write_meta(folder, meta)
    return path
