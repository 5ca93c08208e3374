"""The JSON files grownfx writes and reads back, as pydantic models: what a reader may rely on.

    summary = read_model(run_dir / "summary.json", Summary)   # a dict, every field of the right type

A file of the wrong shape (a list where a mapping belongs, text where a number belongs) is a one-line
CorruptFileError naming the file and the field, never an AttributeError three calls later.  Fields a model does not
list are kept as they are (newer grownfx versions add fields); `read_model` returns the validated dict with every
field the model lists (a default where the file has none).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Optional, TypeVar, Union

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from grownfx import files

__all__ = ["AccMatrix", "CompareIndex", "CompareRun", "ExportMeta", "FormatEntry", "StreamMeta", "Summary",
           "TaskSummary", "read_model", "validated"]

M = TypeVar("M", bound=BaseModel)


class _Open(BaseModel):
    model_config = ConfigDict(extra="allow")


class TaskSummary(_Open):
    index: int = 0
    name: str = ""
    num_classes: Optional[int] = None
    target: Optional[float] = None
    val_acc: Optional[float] = None
    val_history: list[float] = Field(default_factory=list)
    acc_when_learned: Optional[float] = None
    acc_final: Optional[float] = None
    grew: bool = False
    growth: dict[str, int] = Field(default_factory=dict)
    growth_rounds: int = 0
    pruned_candidates: int = 0
    params_stored: Optional[int] = None
    params_task: Optional[int] = None
    model_size: Optional[float] = None
    mask_bytes: Optional[int] = None
    time_s: Optional[float] = None
    epochs: Optional[int] = None
    selective_zero_frac: Optional[float] = None
    released: Optional[int] = None
    retrained: Optional[int] = None
    extra: dict[str, Any] = Field(default_factory=dict)
    stage_s: dict[str, float] = Field(default_factory=dict)


class Summary(_Open):
    """summary.json."""

    name: str = "run"
    method: str = "?"
    full_params: Optional[int] = None
    avg_acc: Optional[float] = None
    bwt: Optional[float] = None
    forgetting: Optional[float] = None
    total_time_s: Optional[float] = None
    num_tasks: Optional[int] = None
    tasks: list[TaskSummary] = Field(default_factory=list)


class AccMatrix(_Open):
    """acc_matrix.json: R[i][j], the test accuracy on task j after learning task i (None for j > i)."""

    tasks: list[str] = Field(default_factory=list)
    matrix: list[list[Optional[float]]] = Field(default_factory=list)


class CompareRun(_Open):
    method: str
    seed: int
    dir: str
    status: str = "ok"
    wall_s: Optional[float] = None
    error: Optional[str] = None

    @field_validator("dir")
    @classmethod
    def _inside(cls, v: str) -> str:
        if Path(v).is_absolute() or ".." in Path(v).parts:
            raise ValueError(f"{v!r} is not a folder inside the comparison folder")
        return v


class CompareIndex(_Open):
    """compare.json."""

    recipe: str = ""
    methods: list[str] = Field(default_factory=list)
    seeds: list[int] = Field(default_factory=list)
    runs: list[CompareRun] = Field(default_factory=list)
    targets: dict[str, Any] = Field(default_factory=dict)
    recipe_config: dict[str, Any] = Field(default_factory=dict)


class StreamTask(_Open):
    index: int
    name: str
    classes: list[Union[int, str]]


class StreamMeta(_Open):
    """stream.json: how the task stream was built (what an export needs of it: shapes, normalisation, tasks)."""

    input_shape: list[int] = Field(min_length=1, max_length=8)
    mean: list[float]
    std: list[float]
    pixel_scale: float = 1.0
    tasks: list[StreamTask]


class FormatEntry(_Open):
    file: Optional[str] = None
    sha256: Optional[str] = None
    error: Optional[str] = None


class ExportMeta(_Open):
    """exports/task_K/meta.json (one entry per format) or exports/all_tasks/meta.json (`file`, `sha256`)."""

    formats: dict[str, FormatEntry] = Field(default_factory=dict)
    file: Optional[str] = None
    sha256: Optional[str] = None


def validated(raw: Any, model: type[M], path: str | Path) -> dict:
    """`raw` (parsed JSON of `path`) checked against `model`: the dict, or CorruptFileError naming the field."""
    try:
        return model.model_validate(raw).model_dump()
    except ValidationError as exc:
        errors = exc.errors(include_url=False)
        first = errors[0]
        where = ".".join(str(p) for p in first["loc"]) or "the top level"
        got = repr(first.get("input"))
        got = "" if first.get("type") == "missing" else f", got {got if len(got) <= 40 else got[:37] + '...'}"
        more = f" (and {len(errors) - 1} more problem{'s' if len(errors) > 2 else ''})" if len(errors) > 1 else ""
        what = (model.__doc__ or model.__name__).strip().splitlines()[0].split(":")[0].rstrip(".")
        raise files.CorruptFileError(f"{path} is not a valid {what}: {where}: {first['msg'].lower()}{got}"
                                     f"{more}; it was not written by grownfx or was edited") from None


def read_model(path: str | Path, model: type[M]) -> dict:
    """read_json(path), validated against `model` (see `validated`)."""
    return validated(files.read_json(path), model, path)
