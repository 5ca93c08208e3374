"""Your own data from Python: a recipe's `data: {name: python, factory: "my_data:make_tasks"}`.

The factory returns the data in the shapes a user already has; grownfx does the rest exactly as for its own
datasets (validation hold-out, `train_per_class` / `limit_per_task` subsets of the train split, normalisation,
seeds, stream.json):

    def make_tasks(seed=0):                  # `seed`, when the factory takes it, is the run's data seed
        return [                             # one entry per task ...
            {"train": (x, y), "test": (x_test, y_test), "classes": ["walk", "run"]},
            ...
        ]

or one dataset to cut into tasks of `classes_per_task` classes, as the built-in kinds do:

        return {"train": (x, y), "test": (x_test, y_test), "classes": names}

A split is a pair `(x, y)` of numpy arrays or tensors, or any `torch.utils.data.Dataset` (or sequence) of
`(x, y)` items.  `x` has the samples first and the channel (or feature) second, of any rank: (N, F) tabular,
(N, C, L) sequences, (N, C, H, W) images, (N, C, T, H, W) clips; uint8 inputs are scaled by 1/255, anything
else is used as float32.  `y` holds integer labels 0..k-1 naming `classes[y]`, or any sortable labels (ints,
strings) when `classes` is left out.  `val` (optional) gives a validation split; without it `val_fraction` of
each class's train samples is held out.  `test` (optional) likewise, with `test_fraction`.
"""

from __future__ import annotations

import hashlib
import inspect
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Optional

import numpy as np

from grownfx.data.config import PythonConfig
from grownfx.data.core import TaskStream
from grownfx.data.errors import DatasetError
from grownfx.data.splits import Holdout, Pool, Sampling, assemble, class_order, group_classes
from grownfx.usercode import UserCodeError, import_callable

__all__ = ["build_python", "cut_dataset", "split_arrays"]

SPLITS = ("train", "val", "test")


def build_python(cfg: PythonConfig, seed: int, code_dir: Optional[str | Path] = None) -> TaskStream:
    try:
        factory = import_callable(cfg.factory, code_dir, what="data.factory")
    except UserCodeError as exc:
        raise DatasetError(str(exc)) from None
    kwargs = dict(cfg.kwargs)
    if "seed" not in kwargs and _takes_seed(factory):
        kwargs["seed"] = seed
    try:
        returned = factory(**kwargs)
    except Exception as exc:  # noqa: BLE001 - the user's code failed: say whose, keep the type and message
        raise DatasetError(f"data.factory {cfg.factory!r} raised {type(exc).__name__}: {exc}") from exc
    source = _source(factory)
    if isinstance(returned, Mapping) and "train" in returned:
        return _one_dataset(cfg, seed, returned, source)
    if isinstance(returned, (Mapping, str, bytes)) or not isinstance(returned, Sequence) or not returned:
        raise DatasetError(f"data.factory {cfg.factory!r} returned {_what(returned)}; expected a list of tasks "
                           "(each a dict with 'train' and optionally 'test', 'val', 'classes', 'name') or one "
                           "dict with 'train' (and 'test', 'classes') to cut into tasks of data.classes_per_task")
    if cfg.classes_per_task is not None or cfg.num_tasks is not None:
        raise DatasetError(f"data.factory {cfg.factory!r} returned a list of {len(returned)} tasks: leave out "
                           "data.classes_per_task and data.num_tasks (they cut one dataset into tasks)")
    return _task_list(cfg, seed, list(returned), source)


def _takes_seed(fn: Any) -> bool:
    try:
        params = inspect.signature(fn).parameters
    except (TypeError, ValueError):
        return False
    return "seed" in params or any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())


def _source(factory: Any) -> dict[str, Any]:
    """Which file the factory came from and its SHA-256: stream.json records what code made the data."""
    try:
        path = Path(inspect.getsourcefile(factory) or "")
    except TypeError:
        return {}
    if not path.is_file():
        return {}
    return {"file": str(path.resolve()), "sha256": hashlib.sha256(path.read_bytes()).hexdigest()}


def _what(value: Any) -> str:
    if isinstance(value, Mapping):
        return f"a dict with keys {sorted(map(str, value))[:6]}"
    return f"a {type(value).__name__}" + (" (empty)" if isinstance(value, Sequence) and not value else "")


# --- one split -> arrays ----------------------------------------------------------------------------------------


def _as_array(value: Any) -> np.ndarray:
    if hasattr(value, "detach"):  # a torch tensor, without importing torch here
        return value.detach().cpu().numpy()
    return np.asarray(value)


def _item_input(x: Any) -> np.ndarray:
    a = _as_array(x)
    if a.ndim == 3 and a.shape[-1] in (1, 3, 4) and a.shape[0] not in (1, 3, 4) and not hasattr(x, "detach"):
        a = a.transpose(2, 0, 1)  # a PIL image or an HWC array: channels first, as everywhere in grownfx
    elif a.ndim == 2 and type(x).__module__.startswith("PIL"):
        a = a[None]  # a greyscale PIL image: one channel
    return a


def split_arrays(split: Any, where: str) -> tuple[np.ndarray, np.ndarray]:
    """(x, y) numpy arrays of one split: a pair of arrays/tensors, or a Dataset/sequence of (x, y) items."""
    if isinstance(split, tuple) and len(split) == 2:
        x, y = _as_array(split[0]), _as_array(split[1])
    else:
        if not (hasattr(split, "__len__") and hasattr(split, "__getitem__")) and not hasattr(split, "__iter__"):
            raise DatasetError(f"{where}: expected (x, y) arrays or a Dataset of (x, y) items, got {_what(split)}")
        items = [split[i] for i in range(len(split))] if hasattr(split, "__len__") else list(split)
        if not items:
            raise DatasetError(f"{where}: the dataset is empty")
        bad = next((i for i, it in enumerate(items) if not (isinstance(it, (tuple, list)) and len(it) >= 2)), None)
        if bad is not None:
            raise DatasetError(f"{where}: item {bad} is {_what(items[bad])}, not an (x, y) pair")
        inputs = [_item_input(it[0]) for it in items]
        shapes = {a.shape for a in inputs}
        if len(shapes) > 1:
            raise DatasetError(f"{where}: items differ in shape ({sorted(shapes)[:3]}); every input needs one shape")
        x = np.stack(inputs)
        y = np.asarray([_as_array(it[1]).item() if np.ndim(_as_array(it[1])) == 0 else it[1] for it in items])
    if y.ndim != 1:
        y = y.reshape(-1) if y.size == len(y) else y
    if x.ndim < 2 or y.ndim != 1 or len(x) != len(y):
        raise DatasetError(f"{where}: x {tuple(x.shape)} and y {tuple(y.shape)} do not match: x needs the samples "
                           "first and at least one more dimension ((N, F), (N, C, L), (N, C, H, W), ...), y one "
                           "label per sample")
    if x.dtype.kind not in "biuf":
        raise DatasetError(f"{where}: x has dtype {x.dtype}; inputs must be numbers")
    return x, y


def _common_dtype(arrays: list[np.ndarray], what: str) -> np.dtype:
    kinds = {a.dtype == np.uint8 for a in arrays}
    if kinds == {True}:
        return np.dtype(np.uint8)
    if len(kinds) > 1:
        raise DatasetError(f"{what}: some splits are uint8 (pixels 0..255, scaled by 1/255) and others are not; "
                           "give every split the same kind of values")
    return np.dtype(np.float32)


def _check_finite(x: np.ndarray, where: str) -> None:
    if x.dtype.kind == "f" and not np.isfinite(x).all():
        raise DatasetError(f"{where}: x holds NaN or inf values")


# --- the two shapes a factory returns ---------------------------------------------------------------------------


def _labels(ys: list[np.ndarray], classes: Optional[Sequence], where: str) -> tuple[list[np.ndarray], list[str]]:
    """Labels as 0..k-1 and the k class names: `classes[y]` when classes are given, else the sorted labels."""
    if classes is not None:
        names = [str(c) for c in classes]
        out = []
        for y in ys:
            if y.dtype.kind not in "iub" or (len(y) and (y.min() < 0 or y.max() >= len(names))):
                raise DatasetError(f"{where}: with 'classes' ({len(names)} names) the labels must be integers "
                                   f"0..{len(names) - 1}, got {_range(y)}")
            out.append(y.astype(np.int64))
        return out, names
    found = np.unique(np.concatenate([y for y in ys]))
    return [np.searchsorted(found, y).astype(np.int64) for y in ys], [str(v) for v in found]


def _range(y: np.ndarray) -> str:
    return f"{y.dtype} values {y.min()}..{y.max()}" if y.dtype.kind in "iuf" and len(y) else f"{y.dtype} values"


def _task_list(cfg: PythonConfig, seed: int, tasks: list[Any], source: dict) -> TaskStream:
    per_task: list[dict[str, Any]] = []
    for t, task in enumerate(tasks):
        where = f"data.factory {cfg.factory!r}, task {t + 1}"
        if not isinstance(task, Mapping) or "train" not in task:
            raise DatasetError(f"{where}: expected a dict with 'train' (and optionally 'test', 'val', 'classes', "
                               f"'name'), got {_what(task)}")
        unknown = set(map(str, task)) - {*SPLITS, "classes", "name"}
        if unknown:
            raise DatasetError(f"{where}: unknown key(s) {sorted(unknown)}; a task has train, val, test, classes, "
                               "name")
        splits = {s: split_arrays(task[s], f"{where}, {s}") for s in SPLITS if task.get(s) is not None}
        ys, names = _labels([y for _, y in splits.values()], task.get("classes"), where)
        unseen = sorted(set(range(len(names))) - set(ys[0].tolist()))
        if unseen:
            raise DatasetError(f"{where}: class(es) {[names[c] for c in unseen][:5]} have no training samples")
        per_task.append({"name": str(task.get("name") or f"task{t + 1}"), "classes": names,
                         "splits": {s: (x, y) for (s, (x, _)), y in zip(splits.items(), ys)}})
    for s in ("val", "test"):
        have = [s in p["splits"] for p in per_task]
        if any(have) and not all(have):
            raise DatasetError(f"data.factory {cfg.factory!r}: task(s) {[i + 1 for i, h in enumerate(have) if h]} "
                               f"give a '{s}' split and the others do not; give it for every task or for none")
    shapes = {p["splits"]["train"][0].shape[1:] for p in per_task}
    if len(shapes) > 1:
        raise DatasetError(f"data.factory {cfg.factory!r}: the tasks' inputs differ in shape ({sorted(shapes)}); one "
                           "model takes one input shape")
    arrays = [x for p in per_task for x, _ in p["splits"].values()]
    dtype = _common_dtype(arrays, f"data.factory {cfg.factory!r}")
    # One stream of global classes: task t's label j is class offset_t + j; ids number the factory's rows task by
    # task, split by split (train, val, test), so id - ranges[split][0] is the row in the array the factory gave.
    pools: dict[str, list[tuple[np.ndarray, np.ndarray, np.ndarray]]] = {s: [] for s in SPLITS}
    class_names, task_classes, ranges = [], [], []
    next_id = 0
    for t, p in enumerate(per_task):
        offset = len(class_names)
        class_names += p["classes"]
        task_classes.append(list(range(offset, offset + len(p["classes"]))))
        r = {}
        for s, (x, y) in p["splits"].items():
            _check_finite(x, f"data.factory {cfg.factory!r}, task {t + 1}, {s}")
            pools[s].append((x.astype(dtype, copy=False), y + offset, next_id + np.arange(len(y))))
            r[s] = [next_id, next_id + len(y)]
            next_id += len(y)
        ranges.append(r)

    def pool(s: str) -> Optional[Pool]:
        if not pools[s]:
            return None
        xs, ys, ids = zip(*pools[s])
        return Pool(np.concatenate(xs), np.concatenate(ys), np.concatenate(ids))

    return _assemble(cfg, seed, train=pool("train"), test=pool("test"), val=pool("val"), class_names=class_names,
                     task_classes=task_classes, task_names=[p["name"] for p in per_task], name=f"python:{cfg.factory}",
                     extra={"factory": {"spec": cfg.factory, **source},
                            "id_space": "id = running number of the factory's rows, task by task, each task's "
                                        "train, val (when given) and test (when given) rows in order; "
                                        "tasks[k].id_ranges[split] = [first id, end): row = id - first",
                            "id_ranges": ranges})


def _one_dataset(cfg: PythonConfig, seed: int, data: Mapping, source: dict) -> TaskStream:
    where = f"data.factory {cfg.factory!r}"
    unknown = set(map(str, data)) - {"train", "test", "classes"}
    if unknown:
        raise DatasetError(f"{where}: unknown key(s) {sorted(unknown)} in the dataset dict; it has train, test, "
                           "classes (a 'val' split needs a list of tasks; one dataset holds out val_fraction)")
    if cfg.classes_per_task is None:
        raise DatasetError(f"{where} returned one dataset: set data.classes_per_task to cut it into tasks (or "
                           "return a list of tasks)")
    splits = {s: split_arrays(data[s], f"{where}, {s}") for s in ("train", "test") if data.get(s) is not None}
    return cut_dataset(cfg, seed, splits, data.get("classes"), where=where, name=f"python:{cfg.factory}",
                       stem=cfg.factory.partition(":")[2],
                       meta={"factory": {"spec": cfg.factory, **source},
                             "id_space": "id i = row i of train, then len(train) + j for row j of test"})


def cut_dataset(cfg: Any, seed: int, splits: dict[str, tuple[np.ndarray, np.ndarray]], classes: Optional[Sequence],
                *, where: str, name: str, stem: str, meta: dict) -> TaskStream:
    """One labelled dataset (`splits`: train and optionally test arrays) cut into tasks of `cfg.classes_per_task`
    classes in `cfg.class_order`, as the built-in kinds are: the python factory's one-dataset form, and the
    Hugging Face kind."""
    ys, names = _labels([y for _, y in splits.values()], classes, where)
    if len({x.shape[1:] for x, _ in splits.values()}) > 1:
        raise DatasetError(f"{where}: train and test inputs differ in shape")
    dtype = _common_dtype([x for x, _ in splits.values()], where)
    x_train = splits["train"][0].astype(dtype, copy=False)
    _check_finite(x_train, f"{where}, train")
    train = Pool(x_train, ys[0], np.arange(len(ys[0])))
    test = None
    if "test" in splits:
        x_test = splits["test"][0].astype(dtype, copy=False)
        _check_finite(x_test, f"{where}, test")
        test = Pool(x_test, ys[1], len(ys[0]) + np.arange(len(ys[1])))
    order_seed = seed if cfg.class_order_seed is None else cfg.class_order_seed
    order = class_order(len(names), cfg.class_order == "shuffled", order_seed)
    try:
        task_classes = group_classes(order, cfg.classes_per_task, cfg.num_tasks)
    except ValueError as exc:
        raise DatasetError(f"{where}: {exc}") from None
    return _assemble(cfg, seed, train=train, test=test, val=None, class_names=names, task_classes=task_classes,
                     task_names=[f"{stem}/task{t + 1}" for t in range(len(task_classes))], name=name,
                     extra={**meta, "class_order": [int(c) for c in order], "class_order_seed": order_seed})


def _assemble(cfg: Any, seed: int, *, train: Pool, test: Optional[Pool], val: Optional[Pool],
              class_names: list[str], task_classes: list[list[int]], task_names: list[str], name: str,
              extra: dict) -> TaskStream:
    channels = train.x.shape[1]
    mean, std = cfg.mean, cfg.std
    if mean is not None and len(mean) != channels:
        raise DatasetError(f"data.mean/std have {len(mean)} values, but the inputs {tuple(train.x.shape[1:])} have "
                           f"{channels} channels (dimension 1)")
    if mean is None and not cfg.normalize:
        mean, std = (0.0,) * channels, (1.0,) * channels
    ranges = extra.pop("id_ranges", None)
    stream = assemble(
        name=name,
        train=train,
        test=test,
        val=val if val is not None else Holdout(fraction=cfg.val_fraction),
        test_holdout=None if test is not None else Holdout(fraction=cfg.test_fraction),
        class_names=class_names,
        task_classes=task_classes,
        task_names=task_names,
        seed=seed,
        sampling=Sampling.of(cfg),
        mean=mean,
        std=std,
        meta={"kind": cfg.name, "config": cfg.model_dump(mode="json"), **extra},
    )
    for t, (entry, task) in enumerate(zip(stream.meta["tasks"], stream.tasks)):
        if ranges is not None:
            entry["id_ranges"] = ranges[t]
        # the ids only number the rows: a digest of the values themselves tells a resume (and load_run) whether
        # the source still gives the data the run learned
        entry["content_digests"] = {s: _content_digest(getattr(task, s)) for s in SPLITS}
    return stream


def _content_digest(data: Any) -> str:
    h = hashlib.sha1()
    for t in (data.x, data.y):
        h.update(str(tuple(t.shape)).encode() + str(t.dtype).encode())
        h.update(t.contiguous().numpy().tobytes())
    return h.hexdigest()[:16]
