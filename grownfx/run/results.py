"""A run folder opened from Python: `grownfx.load_run(path)`.

    run = grownfx.load_run("runs/digits_quickstart")
    run.acc_matrix[-1]                  # test accuracy (%) of every task after the last one
    run.stream_info["tasks"][0]["test_ids"]
    p = run.predictions(task=0)         # per-sample: ids, labels, predicted classes, logits
    method = run.method()               # the method in its final state (GROWN: method.net)

Reading results (summary, accuracy matrix, stream.json, exports' meta.json) reads files only.  Rebuilding the
method or the data runs code the run names when it names the user's own (`model.builder` or `data.factory` as
`module:callable`): a run folder may come from someone else, so that needs `load_run(path, trust=True)`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch
from pydantic import ValidationError

from grownfx import files
from grownfx.data import TaskStream, stream_for
from grownfx.recipe.trust import UntrustedCodeError, names_user_code, trusted
from grownfx.recipe.loading import parse_yaml
from grownfx.recipe.schema import Recipe
from grownfx.report.formats import ExportMeta, StreamMeta, read_model
from grownfx.report.run_report import read_run
from grownfx.run.export import ExportError, restore_method
from grownfx.run.folder import RunError
from grownfx.run.runner import check_same_data

__all__ = ["LoadedRun", "Predictions", "UntrustedCodeError", "load_run"]


@dataclass
class Predictions:
    """One split of one task, sample by sample: `ids` as in stream.json (meta["id_space"] says what an id is),
    `labels` and `predicted` as task label indices (classes[i] names label i), `logits` (N, classes)."""

    task: int
    split: str
    classes: list[str]
    ids: np.ndarray
    labels: np.ndarray
    predicted: np.ndarray
    logits: np.ndarray

    @property
    def accuracy(self) -> float:
        """Percentage of correct predictions (what the accuracy matrix holds for the test split)."""
        return float((self.predicted == self.labels).mean() * 100) if len(self.labels) else 0.0

    def rows(self) -> list[dict[str, Any]]:
        """One dict per sample: id, label, predicted (class names), correct."""
        return [{"id": int(i), "label": self.classes[a], "predicted": self.classes[b], "correct": bool(a == b)}
                for i, a, b in zip(self.ids, self.labels, self.predicted)]


@dataclass
class LoadedRun:
    """What a run folder holds; see `load_run`."""

    path: Path
    recipe: Recipe
    summary: dict
    acc_matrix: list[list[Optional[float]]]
    task_names: list[str]
    stream_info: dict
    exports: dict[int, dict] = field(default_factory=dict)
    trusted: Optional[bool] = None  # the user's word: True/False, None = GROWNFX_TRUST decides
    _method: Any = field(default=None, repr=False)
    _stream: Optional[TaskStream] = field(default=None, repr=False)

    @property
    def user_code(self) -> list[str]:
        """The `module:callable` values of the run's recipe: rebuilding runs them."""
        return names_user_code(self.recipe)

    def _need_trust(self, doing: str, code: list[str]) -> None:
        """The trust rule (grownfx.recipe.trust) with load_run's own wording: `trust=True`, or GROWNFX_TRUST=1."""
        if code and not trusted(self.trusted):
            factory = self.stream_info.get("factory", {})
            origin = f" (file {factory['file']}, sha256 {factory.get('sha256', '?')[:12]}...)" if "file" in factory \
                else ""
            raise UntrustedCodeError(
                f"{doing} {self.path} imports and runs code its recipe names: {', '.join(code)}{origin}. Only if you "
                f"trust where this run folder comes from: grownfx.load_run({str(self.path)!r}, trust=True). "
                "Its results (acc_matrix, summary, stream_info, exports) need no code.")

    def _code_dir(self) -> Optional[str]:
        code_dir = self.recipe.code_dir
        if code_dir is not None and Path(code_dir).is_dir():
            return code_dir
        factory_file = self.stream_info.get("factory", {}).get("file")  # the run folder moved: the factory's folder
        return str(Path(factory_file).parent) if factory_file else code_dir

    def stream(self) -> TaskStream:
        """The task stream rebuilt from the recipe (the dataset must be on disk), checked against stream.json:
        RunError when the data is not the data the run learned."""
        if self._stream is None:
            self._need_trust("building the data of", [c for c in self.user_code if c.startswith("data.")])
            recipe = self.recipe.model_copy(update={"code_dir": self._code_dir()})
            stream = stream_for(recipe)
            check_same_data(self.stream_info, stream.meta, self.path)
            self._stream = stream
        return self._stream

    def method(self):
        """The method in its final state (as of the last checkpoint), on the CPU: `evaluate`, `export`, and for
        GROWN `method.net`, the task-aware network."""
        if self._method is None:
            self._need_trust("rebuilding the model of", [c for c in self.user_code if c.startswith("model.")])
            self._method = restore_method(self.path, trust=True, code_dir=self._code_dir())[0]  # checked above
        return self._method

    @torch.no_grad()
    def predictions(self, task: int, split: str = "test", batch_size: int = 256) -> Predictions:
        """Per-sample predictions of the final model on `split` ('train', 'val' or 'test') of `task` (0-based)."""
        if split not in ("train", "val", "test"):
            raise ValueError(f"split must be 'train', 'val' or 'test', got {split!r}")
        done = len(self.acc_matrix)
        if not 0 <= task < done:
            raise ExportError(f"no task {task} in {self.path}: it finished {done} task(s); task takes 0..{done - 1}")
        data = getattr(self.stream()[task], split)
        method = self.method()
        forward = (lambda x: method.predict(x, task)) if hasattr(method, "predict") else method.export(task).eval()
        logits = [forward(x) for x, _ in data.loader(batch_size, device="cpu", augment=None)]
        out = torch.cat(logits) if logits else torch.zeros(0, self.stream()[task].num_classes)
        return Predictions(task, split, list(self.stream()[task].classes), data.ids.numpy().copy(),
                           data.y.numpy().copy(), out.argmax(1).numpy(), out.numpy())


def load_run(path: str | Path, trust: Optional[bool] = None) -> LoadedRun:
    """Open a run folder (`grownfx run` or one run of `grownfx compare`): its recipe, results, stream.json and
    exports' meta.json, read from files.  `trust=True` allows `stream()`, `method()` and `predictions()` to
    import the `module:callable` code its recipe names (your own model builder or data factory); None (default)
    trusts it only when the environment says GROWNFX_TRUST=1 (grownfx.recipe.trust).  Every JSON file is read
    through its pydantic model (grownfx.report.formats): a wrong shape is one CorruptFileError naming the field."""
    path = Path(path)
    if not path.exists():
        raise RunError(f"{path} does not exist")
    if not (path / "summary.json").is_file():
        raise RunError(f"{path} is not a run folder (no summary.json); `grownfx run` prints the folder it writes")
    results = read_run(path)
    resolved = path / "config.resolved.yaml"
    if not resolved.is_file():
        raise RunError(f"{resolved} does not exist: the run folder is incomplete")
    raw, _ = parse_yaml(files.read_bytes(resolved).decode("utf-8", errors="replace"), str(resolved))
    try:
        recipe = Recipe.model_validate(raw)  # validation imports no user code
    except ValidationError as exc:
        first = exc.errors(include_url=False)[0]
        raise files.CorruptFileError(f"{resolved} is not a recipe grownfx can read "
                                     f"({'.'.join(map(str, first['loc']))}: {first['msg']})") from None
    stream_info = read_model(path / "stream.json", StreamMeta) if (path / "stream.json").is_file() else {}
    exports = {}
    for meta_path in sorted((path / "exports").glob("task_*/meta.json")):
        number = meta_path.parent.name.removeprefix("task_")
        if number.isdigit():
            exports[int(number)] = {**read_model(meta_path, ExportMeta), "folder": str(meta_path.parent)}
    return LoadedRun(path, recipe, results["summary"], results["matrix"], list(results["names"]), stream_info,
                     exports, trust)
