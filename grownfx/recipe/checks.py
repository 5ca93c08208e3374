"""What is wrong with a recipe, and where: pydantic errors mapped to dotted paths, checks beyond the schema.

Pydantic locations name union members (`data.cifar100_split.root`, `target.rule.list[float].0`); walking the
schema's types along a location turns it into the path the user wrote (`data.root`) and tells which model
sits there, so an unknown key can be answered with the valid ones.
"""

from __future__ import annotations

import difflib
import functools
import os
import re
import types
from pathlib import Path
from typing import Annotated, Any, Callable, Literal, Union, get_args, get_origin

from pydantic import BaseModel, ValidationError

from grownfx.recipe.schema import Recipe
from grownfx.data.config import DataConfig
from grownfx.data.errors import abspath, describe_dir
from grownfx.usercode import import_callable, is_user_code

# = grownfx.models.BUILDERS (tests/test_cli.py checks): `validate` trusts these names without importing torch
_GROWNFX_FALLBACK = ("lenet5", "small_cnn", "vgg16_bn_cifar")

# --- schema types -----------------------------------------------------------------------------------------


def unwrap(tp: Any) -> Any:
    """Strip Annotated[...] and Optional[...]."""
    while True:
        if get_origin(tp) is Annotated:
            tp = get_args(tp)[0]
        elif is_union(tp) and type(None) in get_args(tp):
            args = [a for a in get_args(tp) if a is not type(None)]
            if len(args) != 1:
                return Union[tuple(args)]
            tp = args[0]
        else:
            return tp


def is_union(tp: Any) -> bool:
    return get_origin(tp) in (Union, types.UnionType)


def _is_model(tp: Any) -> bool:
    return isinstance(tp, type) and issubclass(tp, BaseModel)


def child_type(tp: Any, key: Any) -> Any:
    """The type of `key` inside a value of type `tp`; None when unknown."""
    tp = unwrap(tp)
    if _is_model(tp):
        field = tp.model_fields.get(str(key))
        return field.annotation if field else None
    origin, args = get_origin(tp), get_args(tp)
    if origin in (list, set, frozenset) and args:
        return args[0]
    if origin is tuple and args:
        if len(args) == 2 and args[1] is Ellipsis:
            return args[0]
        return args[int(key)] if str(key).isdigit() and int(key) < len(args) else None
    if origin is dict and args:
        return args[1]
    return None


def _tags(member: Any, field: str = "name") -> tuple:
    """Discriminator values (a Literal `name` field) of a union member model."""
    f = member.model_fields.get(field) if _is_model(member) else None
    return get_args(f.annotation) if f is not None and get_origin(f.annotation) is Literal else ()


def pick_member(union: Any, node: Any) -> Any:
    """The member of a discriminated union that a raw mapping selects via its `name`."""
    if isinstance(node, dict):
        for member in get_args(union):
            if node.get("name") in _tags(member):
                return member
    return None


def _member_for_tag(union: Any, tag: Any) -> Any:
    for member in get_args(union):
        if tag in _tags(member) or getattr(member, "__name__", None) == tag or _type_name(member) == tag:
            return member
    return None


def _type_name(tp: Any) -> str:
    return str(tp).replace("typing.", "") if get_origin(tp) else getattr(tp, "__name__", str(tp))


def _walk(loc: tuple) -> tuple[list[str], Any, Any, tuple | None]:
    """Pydantic loc (with union tags) -> (data path, parent type, type, (union path, tag) of the last union)."""
    tp: Any = Recipe
    parent: Any = None
    parts: list[str] = []
    union_at = None
    i = 0
    while i < len(loc):
        if tp is not None and is_union(unwrap(tp)):
            union_at = (tuple(parts), loc[i])
            tp = _member_for_tag(unwrap(tp), loc[i])
            i += 1
            continue
        parent, tp = tp, (child_type(tp, loc[i]) if tp is not None else None)
        parts.append(str(loc[i]))
        i += 1
    return parts, parent, tp, union_at


def schema_errors(exc: ValidationError) -> list[tuple[str, str]]:
    """(dotted path as written in the recipe, message) for each pydantic error, union branches merged."""
    errors = exc.errors(include_url=False)
    walked = [_walk(tuple(e["loc"])) for e in errors]
    keep = _drop_losing_union_branches(errors, walked)
    out: list[tuple[str, str]] = []
    merged: dict[tuple, int] = {}
    for err, (parts, parent, tp, union_at), k in zip(errors, walked, keep):
        if k == "drop":
            continue
        path, msg = _describe(err, parts, parent, tp)
        if k == "merge":
            key = union_at[0]
            if key in merged:
                p, m = out[merged[key]]
                out[merged[key]] = (p, f"{m}, or {msg.removeprefix('Input should be ')}")
                continue
            merged[key] = len(out)
            path = ".".join(union_at[0])
        out.append((path, msg))
    return out


def _drop_losing_union_branches(errors: list[dict], walked: list[tuple]) -> list[str]:
    """A value matching no member of a plain union gives one error per member: keep the branch that got
    deepest into the value (a list of bad numbers), or merge them into one message ("a number, or a string")."""
    groups: dict[tuple, list[int]] = {}
    for i, (_, _, _, union_at) in enumerate(walked):
        if union_at is not None:
            groups.setdefault(union_at[0], []).append(i)
    verdict = ["keep"] * len(errors)
    for upath, idx in groups.items():
        tags = {walked[i][3][1] for i in idx}
        if len(tags) < 2:
            continue
        depth = {i: len(walked[i][0]) - len(upath) for i in idx}
        deepest = max(depth.values())
        for i in idx:
            verdict[i] = "merge" if deepest == 0 else ("keep" if depth[i] == deepest else "drop")
    return verdict


def _describe(err: dict, parts: list[str], parent: Any, tp: Any) -> tuple[str, str]:
    kind, msg, ctx = err["type"], err["msg"], err.get("ctx") or {}
    path = ".".join(parts)
    if kind == "extra_forbidden":
        valid = list(unwrap(parent).model_fields) if _is_model(unwrap(parent)) else []
        return path, _unknown(f"key {parts[-1]!r}", parts[-1], valid, "valid keys")
    if kind in ("union_tag_invalid", "union_tag_not_found"):
        disc = str(ctx.get("discriminator", "name")).strip("'")
        valid = list(dict.fromkeys(t for m in get_args(unwrap(tp)) for t in _tags(m, disc)))
        if kind == "union_tag_not_found":
            return f"{path}.{disc}", f"missing; one of: {', '.join(valid)}"
        tag, what = str(ctx.get("tag")), {"data": "dataset"}.get(path, parts[-1] if parts else "name")
        return f"{path}.{disc}", _unknown(f"{what} {tag!r}", tag, valid, "valid names", always_list=True)
    if not parts:  # a model-level validator on the whole recipe: locate it at the path its message names
        found = re.findall(r"\b[a-z_]+(?:\.[a-z_0-9]+)+\b", msg)
        path = found[0] if found else ""
    msg = re.sub(r"^(Value|Assertion) error, ", "", msg)
    if kind not in ("missing", "value_error") and not isinstance(err.get("input"), (dict, list)):
        msg += f" (got {_short(err.get('input'))})"
    return path, msg


def _unknown(what: str, given: str, valid: list[str], label: str, always_list: bool = False) -> str:
    close = difflib.get_close_matches(str(given), valid, n=1, cutoff=0.6)
    hint = f"; did you mean {close[0]!r}?" if close else ""
    listing = f" ({label}: {', '.join(valid)})" if always_list or not close else ""
    return f"unknown {what}{hint}{listing}"


def _short(value: Any, limit: int = 60) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


# --- checks beyond the schema -----------------------------------------------------------------------------


def semantic_errors(raw: dict, check_data: bool) -> list[tuple[str, str]]:
    """What the schema cannot see: a missing dataset folder, a data factory or model builder that does not import.

    The data is checked first: a missing folder is reported without importing torch (a model check imports
    torchvision, seconds on a laptop), so the builder is checked only when the data is in place."""
    out = data_errors(raw) if check_data else []
    model = raw.get("model")
    if not out and isinstance(model, dict) and isinstance(model.get("builder"), str):
        problem = _builder_problem(model["builder"], _code_dir(raw))
        if problem:
            out.append(("model.builder", problem))
    return out


def resolve_weights(raw: dict, recipe_dir: str | os.PathLike | None, verify: bool = True) -> list[tuple[str, str]]:
    """`model.weights`: a relative file made absolute (it starts at the recipe's folder), the file checked against
    its checksum (`verify=False`: a file without one is accepted and its hash recorded in `weights_sha256`), and,
    when the builder resolves, loaded into the builder's model to see every key fit.  Imports torch (only for a
    recipe with weights)."""
    model = raw.get("model")
    if not isinstance(model, dict) or not isinstance(model.get("weights"), str) or not model["weights"].strip():
        return []
    from grownfx.models import build_pretrained  # deferred: torch
    from grownfx.models.pretrained import WeightsError, check_weights_file, is_torchvision_name  # deferred: torch

    spec = model["weights"].strip()
    if not is_torchvision_name(spec):
        spec = str((Path(recipe_dir) if recipe_dir is not None else Path.cwd()) / Path(spec).expanduser())
        model["weights"] = spec = os.path.normpath(spec)
    sha = model.get("weights_sha256") if isinstance(model.get("weights_sha256"), str) else None
    try:
        _, pinned = check_weights_file(spec, sha, verify)
    except WeightsError as exc:
        return [("model.weights", str(exc))]
    if pinned is not None:
        model["weights_sha256"] = sha = "sha256:" + pinned
    builder, kwargs = model.get("builder"), model.get("kwargs", {})
    if not isinstance(builder, str) or not isinstance(kwargs, dict) or _builder_problem(builder, _code_dir(raw)):
        return []  # the builder's own error says what is wrong
    try:
        build_pretrained(builder, None, kwargs, _code_dir(raw), spec, sha)
    except WeightsError as exc:
        return [("model.weights", str(exc).removeprefix("model.weights: "))]
    except Exception as exc:  # noqa: BLE001 - a builder failing on its kwargs: reported, never a traceback
        return [("model.weights", f"building the model to load them failed: {type(exc).__name__}: {exc}")]
    return []


def _code_dir(raw: dict) -> str | None:
    value = raw.get("code_dir")
    return value if isinstance(value, str) else None


def data_errors(raw: dict) -> list[tuple[str, str]]:
    """A dataset folder that does not exist, more tasks than class folders, a python factory that does not import:
    of the stream (`data`) and of the pretrained task 0 (`model.weights_data`)."""
    model = raw.get("model")
    task0 = model.get("weights_data") if isinstance(model, dict) else None
    return _data_errors(raw.get("data"), "data", raw) + _data_errors(task0, "model.weights_data", raw)


def _data_errors(data: Any, where: str, raw: dict) -> list[tuple[str, str]]:
    out: list[tuple[str, str]] = []
    if not isinstance(data, dict):
        return out
    if data.get("name") == "python" and is_user_code(data.get("factory")):
        try:  # imports the module (the user's recipe names it); the factory itself runs with the stream
            import_callable(data["factory"], _code_dir(raw))
        except ValueError as exc:
            out.append((f"{where}.factory", str(exc)))
    if data.get("name") == "imagefolders" and isinstance(data.get("roots"), list):
        for i, root in enumerate(data["roots"]):
            if isinstance(root, (str, Path)) and not abspath(root).is_dir():
                out.append((f"{where}.roots[{i}]", f"dataset folder {describe_dir(abspath(root))}. "
                            "docs/data.md#the-fine-grained-benchmark says where to get it and how to lay it out "
                            "(to check the rest of the recipe without the data: grownfx validate RECIPE "
                            "--no-data-check)"))
                break  # one line: the first missing folder (a benchmark's folders are usually all missing)
    if isinstance(data.get("root"), (str, Path)):
        kind = pick_member(unwrap(DataConfig), data)
        root = abspath(data["root"])
        if kind is not None and "root" in kind.model_fields and not root.is_dir():
            out.append((f"{where}.root", f"dataset folder {describe_dir(root)}. {kind.howto} "
                        "(to check the rest of the recipe without the data: grownfx validate RECIPE "
                        "--no-data-check; from Python, check_data=False)"))
        elif data.get("name") == "imagefolder" and root.is_dir():
            problem = _imagefolder_tasks_problem(root, data, where)
            if problem:
                out.append((f"{where}.num_tasks", problem))
    return out


def _imagefolder_tasks_problem(root: Path, data: dict, where: str) -> str | None:
    """num_tasks x classes_per_task more than the class folders under `root` (listed, not decoded)."""
    per, tasks = data.get("classes_per_task"), data.get("num_tasks")
    if not isinstance(per, int) or per < 1:
        return None
    train = root / "train" if (root / "train").is_dir() and (root / "test").is_dir() else root
    classes = [p for p in train.iterdir() if p.is_dir() and not p.name.startswith(".")]
    need = per * (tasks if isinstance(tasks, int) else 1)
    if need > len(classes):
        return (f"{tasks or 1} task(s) of {per} classes need {need} class folders, but {train} has {len(classes)}; "
                f"lower {where}.num_tasks or {where}.classes_per_task")
    return None


MAX_SENSIBLE_EPOCHS = 10_000


def recipe_warnings(recipe: Recipe) -> list[str]:
    """Values that validate but are almost surely mistakes (a stray exponent, a batch no task can fill)."""
    out = []
    tr = recipe.training
    for key, value in (("training.epochs", tr.epochs), ("training.stage2_epochs", getattr(tr, "stage2_epochs", None)),
                       ("target.scratch_epochs", recipe.target.scratch_epochs), ("training.epoch_budget",
                                                                                  tr.epoch_budget)):
        if isinstance(value, int) and value > MAX_SENSIBLE_EPOCHS:
            out.append(f"{key} = {value:,}: more than {MAX_SENSIBLE_EPOCHS:,} epochs per stage would take ages; "
                       "a typo?")
    limit = recipe.data.limit_per_task
    if limit is not None and tr.batch_size > limit:
        out.append(f"training.batch_size {tr.batch_size} is larger than data.limit_per_task {limit}: every epoch is "
                   "one partial batch")
    left_out = _classes_left_out(recipe.data)
    if left_out:
        out.append(left_out)
    if tr.optimizer.lr > 10:
        out.append(f"training.optimizer.lr = {tr.optimizer.lr:g} is far above any usual learning rate; training "
                   "will likely diverge (a run stops at the first NaN/inf)")
    return out


_CLASSES = {"digits": 10, "fashion_mnist": 10, "cifar100_split": 100, "miniimagenet": 100}


def _classes_left_out(data: Any) -> str | None:
    """A warning when the tasks leave some of the dataset's classes out (10 digits cut into tasks of 3: the 10th
    is in no task), for the kinds whose class count the recipe alone tells (the runner warns for all kinds)."""
    total = _CLASSES.get(data.name)
    if data.name == "imagefolder" and Path(data.root).is_dir():
        root = Path(data.root)
        train = root / "train" if (root / "train").is_dir() and (root / "test").is_dir() else root
        total = sum(1 for p in train.iterdir() if p.is_dir() and not p.name.startswith("."))
    per = getattr(data, "classes_per_task", None) or (total // data.num_tasks if total and data.name ==
                                                      "cifar100_split" else None)
    if not total or not per:
        return None
    tasks = getattr(data, "num_tasks", None) or total // per
    used = min(tasks * per, total)
    if used >= total:
        return None
    return (f"data: {tasks} task(s) of {per} classes use {used} of the {total} classes of {data.name}: "
            f"{total - used} class(es) are in no task (change data.classes_per_task or data.num_tasks to use them)")


@functools.lru_cache(maxsize=None)
def _torchvision_builders() -> tuple[tuple[str, ...], tuple[str, ...]]:
    """(classification builders, all builders) of torchvision."""
    import torchvision

    return (tuple(torchvision.models.list_models(module=torchvision.models)),
            tuple(torchvision.models.list_models()))


def _grownfx_builders() -> dict[str, Callable | None]:
    try:
        from grownfx.models import BUILDERS
    except ImportError:
        return dict.fromkeys(_GROWNFX_FALLBACK)
    return dict(BUILDERS)


def resolve_builder(name: str, code_dir: str | None = None) -> Callable:
    """The callable a `model.builder` names: grownfx's, torchvision's, or the user's `module:callable` (its module
    looked for in `code_dir`, the working folder, then sys.path)."""
    if is_user_code(name):
        return import_callable(name, code_dir)
    ours = _grownfx_builders()
    if name in ours:
        if ours[name] is None:
            raise ValueError(f"grownfx builder {name!r} needs grownfx.models, which does not import")
        return ours[name]
    classification, everything = _torchvision_builders()
    if name in classification:
        import torchvision

        return torchvision.models.get_model_builder(name)
    if name in everything:
        raise ValueError(f"{name!r} is a torchvision model, but not a classification backbone (detection, "
                         "segmentation, video and optical-flow models are not supported)")
    names = list(classification) + list(ours)
    close = difflib.get_close_matches(name, names, n=1, cutoff=0.7) or difflib.get_close_matches(name, names, n=3,
                                                                                                  cutoff=0.6)
    names_text = (", ".join(map(repr, close[:-1])) + (" or " if len(close) > 1 else "") + repr(close[-1])
                  if close else "")
    hint = f"; did you mean {names_text}?" if close else ""
    raise ValueError(f"unknown model builder {name!r}{hint} Use a torchvision classification builder (e.g. "
                     f"resnet18), a grownfx one ({', '.join(ours)}) or 'package.module:callable'")


def _builder_problem(name: str, code_dir: str | None = None) -> str | None:
    if name in _GROWNFX_FALLBACK:  # grownfx's own builders are known by name: validating needs no torch
        return None
    try:
        resolve_builder(name, code_dir)
    except ValueError as exc:
        return str(exc)
    except Exception as exc:  # noqa: BLE001 - grownfx.models is still being written; never crash validation
        return f"{type(exc).__name__}: {exc}"
    return None
