"""Step 6: write an exported per-task subnetwork to disk (pt2, ONNX, TorchScript) with its meta.json."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

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
