"""docs/recipe.md, generated from the pydantic schema: every field with its type, default, the methods that read it
and its description.  `grownfx schema` prints it, `grownfx schema --out docs/recipe.md` rewrites the file, and
tests/test_recipe_reference.py checks that the file is what the schema gives today.
"""

from __future__ import annotations

import json
import re
from typing import Any, Iterator, Literal, Union, get_args, get_origin

from pydantic import BaseModel
from pydantic.fields import FieldInfo
from pydantic_core import PydanticUndefined

from grownfx.recipe.checks import is_union, unwrap
from grownfx.recipe.schema import Recipe

__all__ = ["READ_BY", "reference_markdown", "schema_fields"]

_GROWN = ("grown", "grow")
# Which methods read a field, by dotted path prefix (the longest match wins); a field under none is read by every
# method.  `method.<name>.*` fields belong to their method.  tests/test_recipe_reference.py checks every key names
# a field of the schema.
READ_BY: dict[str, tuple[str, ...]] = {
    "model.seed_width": _GROWN,
    "model.seed_size": _GROWN,
    "model.granularity": _GROWN,
    "growth": _GROWN,
    "masks": _GROWN,
    "target": ("grown", "cpg"),
    "training.stage2_epochs": (*_GROWN, "cpg"),
    "training.mask_optimizer": _GROWN,
    "training.gate_optimizer": _GROWN,
    "training.compile": ("grown", "piggyback", "cpg"),  # the methods whose learning task has learned unit masks
}

_INTRO = """\
# Recipe reference

<!-- generated from grownfx/recipe/schema.py by `grownfx schema --out docs/recipe.md`; do not edit by hand
     (tests/test_recipe_reference.py fails when this file and the schema differ) -->

A recipe is a YAML file of the sections below; unknown keys are errors, and `grownfx validate RECIPE` reports
every problem with its file and line. `grownfx run RECIPE key.sub=value` overrides a field, `+key.sub=value`
adds one (inside a free mapping such as `model.kwargs`), `~key.sub` deletes one. `grownfx cp NAME` copies a
built-in recipe to edit. **Read by** names the methods a field changes anything for (`all`: every method).

```yaml
name: my_run
model: {builder: resnet18, seed_width: 0.5}
data: {name: cifar100_split, root: data}
method: {name: grown}
training: {epochs: 20, batch_size: 32}
```

## Your own code: `module:callable`

`model.builder` and `data.factory` take your own Python as `module:callable`. The module is looked for in
`code_dir` (by default the folder of the recipe file), then the working folder, then `sys.path`; nothing has to be
installed or put on `PYTHONPATH`. With `my_models.py` beside the recipe:

```python
# my_models.py
from torch import nn

def conv1d_net(num_classes, width=32):      # grownfx passes num_classes (each task's head is sized per task)
    return nn.Sequential(nn.Conv1d(2, width, 5, padding=2), nn.ReLU(), nn.AdaptiveAvgPool1d(1), nn.Flatten(),
                         nn.Linear(width, num_classes))
```

```yaml
model: {builder: "my_models:conv1d_net", kwargs: {width: 64}}
```

`docs/examples/own_data/` holds two complete recipes with their factories and models (a Conv1d on sequences, an
MLP on tabular rows); [docs/data.md](data.md#your-own-data-from-python) walks through them. A run folder records
the code's folder (`code_dir` in `config.resolved.yaml`) and the factory file's SHA-256 (`stream.json`);
`grownfx.load_run(path)` imports that code again only with `trust=True`.
"""


def _read_by(path: str) -> str:
    best = max((k for k in READ_BY if path == k or path.startswith(k + ".")), key=len, default=None)
    if best is None:
        return "all"
    return ", ".join(READ_BY[best]) or "nothing yet"


_BOUNDS = (("gt", ">"), ("ge", ">="), ("lt", "<"), ("le", "<="))


def _bounds(metadata: list) -> list[str]:
    return [f"{sym} {getattr(m, op)}" for m in metadata for op, sym in _BOUNDS if getattr(m, op, None) is not None]


def _type(tp: Any, info: FieldInfo | None = None) -> str:
    limits = _bounds(info.metadata) if info is not None else []
    return _type_text(tp) + (f" ({', '.join(limits)})" if limits else "")


def _type_text(tp: Any) -> str:
    origin, args = get_origin(tp), get_args(tp)
    if origin is not None and str(origin) == "typing.Annotated":
        return _type_text(args[0])
    if hasattr(tp, "__metadata__"):  # Annotated[...] (PositiveInt, Fraction)
        bounds = _bounds([m for x in tp.__metadata__ for m in getattr(x, "metadata", [x])])
        return _type_text(tp.__origin__) + (f" ({', '.join(bounds)})" if bounds else "")
    if origin is Literal:
        return " or ".join(json.dumps(a) for a in args)
    if origin in (Union,) or is_union(tp):
        members = [a for a in args if a is not type(None)]
        text = " or ".join(_type_text(a) for a in members)
        return text + (" or null" if type(None) in args else "")
    if origin in (list, set):
        return f"list of {_type_text(args[0])}" if args else "list"
    if origin is tuple:
        if len(args) == 2 and args[1] is Ellipsis:
            return f"list of {_type_text(args[0])}"
        return f"[{', '.join(_type_text(a) for a in args)}]"
    if origin is dict or tp is dict:
        return "mapping"
    if isinstance(tp, type) and issubclass(tp, BaseModel):
        return "section"
    name = getattr(tp, "__name__", str(tp))
    return {"str": "string", "int": "int", "float": "number", "bool": "bool", "Path": "path"}.get(name, name)


_NO_DEFAULT = object()


def _default(info: FieldInfo, value: Any = _NO_DEFAULT) -> str:
    """The default as YAML would write it; `value`: the field's value inside its section's default."""
    if value is _NO_DEFAULT:
        if info.default_factory is not None:
            value = info.default_factory()
        elif info.default is PydanticUndefined:
            return "**required**"
        else:
            value = info.default
    if isinstance(value, BaseModel):
        return "(section)"
    return f"`{json.dumps(value, default=str)}`"


def schema_fields(model: type[BaseModel] = Recipe, prefix: str = "",
                  within: BaseModel | None = None) -> Iterator[tuple[str, FieldInfo, Any, str]]:
    """(dotted path, field, annotation, default text) of every field under `model`, sections expanded (not the
    `data`/`method` unions).  `within`: the section's own default, whose values are its fields' defaults
    (training.mask_optimizer.lr defaults to 2e-4, not OptimConfig's 0.01)."""
    for name, info in model.model_fields.items():
        path = f"{prefix}{name}"
        tp = unwrap(info.annotation)
        value = getattr(within, name) if within is not None else _NO_DEFAULT
        yield path, info, info.annotation, _default(info, value)
        if isinstance(tp, type) and issubclass(tp, BaseModel):
            if value is _NO_DEFAULT:
                value = info.default_factory() if info.default_factory is not None else None
            yield from schema_fields(tp, path + ".", value if isinstance(value, BaseModel) else None)


def _union_members(model: type[BaseModel], field: str) -> list[type[BaseModel]]:
    return [m for m in get_args(unwrap(model.model_fields[field].annotation)) if isinstance(m, type)]


def _cell(text: str) -> str:
    return " ".join(str(text).split()).replace("|", "\\|")


def _table(rows: list[tuple[str, FieldInfo, Any, str]], read_by: str | None = None) -> list[str]:
    out = ["| field | type | default | read by | meaning |", "| --- | --- | --- | --- | --- |"]
    for path, info, tp, default in rows:
        sub = unwrap(tp)
        kind = "one of the kinds below (by `name`)" if is_union(sub) else "section (below)" if (
            isinstance(sub, type) and issubclass(sub, BaseModel)) else _type(tp, info)
        out.append(f"| `{path}` | {_cell(kind)} | {_cell(default)} | {read_by or _read_by(path)} | "
                   f"{_cell((info.description or '').strip())} |")
    return out


def reference_markdown() -> str:
    """The whole of docs/recipe.md."""
    lines = [_INTRO]
    top = [row for row in schema_fields(Recipe) if "." not in row[0]]
    lines += ["## Top level", "", *_table(top), ""]
    for section in Recipe.model_fields:
        tp = unwrap(Recipe.model_fields[section].annotation)
        if section in ("data", "method"):
            lines += _union_section(section)
        elif isinstance(tp, type) and issubclass(tp, BaseModel):
            rows = [row for row in schema_fields(Recipe) if row[0].startswith(section + ".")]
            lines += [f"## `{section}`", "", _cell(Recipe.model_fields[section].description or ""), "", *_table(rows),
                      ""]
    return re.sub(r"\n{3,}", "\n\n", "\n".join(lines)).rstrip() + "\n"


_UNION_INTRO = {
    "data": "The dataset, by `name`; grownfx never downloads (docs/data.md says where each kind's files come "
            "from). Fields every kind has are listed once; each kind's own follow.",
    "method": "The continual-learning method, by `name` (docs/baselines.md); `grownfx compare --methods` runs "
              "several on one recipe.",
}


def _union_section(section: str) -> list[str]:
    members = _union_members(Recipe, section)
    first = members[0].model_fields
    common = [n for n in first if n != "name" and all(  # the same field (default, meaning) in every kind
        n in m.model_fields and _default(m.model_fields[n]) == _default(first[n])
        and m.model_fields[n].description == first[n].description for m in members)]
    lines = [f"## `{section}`", "", _UNION_INTRO[section], ""]
    if common:
        rows = [(f"{section}.{n}", members[0].model_fields[n], members[0].model_fields[n].annotation,
                 _default(members[0].model_fields[n])) for n in common]
        lines += [f"Every `{section}` kind:", "", *_table(rows), ""]
    for member in members:
        name = get_args(member.model_fields["name"].annotation)[0]
        own = [(f"{section}.{n}", i, i.annotation, _default(i)) for n, i in member.model_fields.items()
               if n not in common and n != "name"]
        lines += [f"### `{section}.name: {name}`", ""]
        if member.__doc__ and not member.__doc__.startswith(("Usage docs", "A base class")):
            lines += [_cell(member.__doc__.strip()), ""]
        reader = name if section == "method" else None
        lines += [*_table(own, reader), ""] if own else ["No other fields.", ""]
    return lines
