"""Recipes: YAML file + command-line overrides -> a validated `Recipe`, or every problem located.

    recipe = load_recipe("digits_quickstart", ["training.epochs=3", "~model.kwargs"])

Each error names where it comes from: `recipes/x.yaml:12: model.seed_width: ...` for the file, or
`override 'model.seed_width=2': ...` for a command-line override, and all errors are reported together.
"""

from __future__ import annotations

import copy
import importlib.resources
import os
import re
from pathlib import Path
from typing import Any, Mapping, Optional, Sequence, get_origin

import yaml
from pydantic import BaseModel, ValidationError

from grownfx.errors import UserError
from grownfx.recipe.schema import Recipe
from grownfx.recipe.checks import resolve_builder
from grownfx.recipe.trust import names_user_code, require_trust, run_folder_of
from grownfx.recipe.checks import (child_type, is_union, pick_member, resolve_weights, schema_errors, semantic_errors,
                                   unwrap)

__all__ = ["RecipeError", "builtin_recipes_dir", "dump_resolved", "list_builtin_recipes", "load_recipe",
           "names_user_code", "recipe_diff", "resolve_builder", "resolve_recipe_path", "shadowed_recipe_warning",
           "validate_recipe"]


class RecipeError(UserError, ValueError):
    """A recipe that does not load; `errors` holds one located message per problem."""

    def __init__(self, errors: Sequence[str], source: str = ""):
        self.errors = list(errors)
        self.source = source
        super().__init__("\n".join(self.errors))

    def lines(self) -> list[str]:
        return list(self.errors)


# --- finding recipes --------------------------------------------------------------------------------------


def builtin_recipes_dir() -> Path:
    """The folder of built-in recipes: package data when installed, the repo's `recipes/` in a checkout."""
    try:
        found = Path(str(importlib.resources.files("grownfx.builtin_recipes")))
        if found.is_dir():
            return found
    except (ModuleNotFoundError, TypeError, ValueError):
        pass
    here = Path(__file__).resolve().parent
    for candidate in (here / "builtin_recipes", here.parent / "recipes"):
        if candidate.is_dir():
            return candidate
    raise FileNotFoundError(f"no built-in recipes folder next to {here}")


def list_builtin_recipes() -> dict[str, str]:
    """Built-in recipe name -> first line of its `description`."""
    out = {}
    for path in sorted(builtin_recipes_dir().glob("*.yaml")):
        try:
            raw = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError:
            raw = {}
        desc = str(raw.get("description", "")) if isinstance(raw, dict) else ""
        out[path.stem] = desc.strip().splitlines()[0] if desc.strip() else ""
    return out


def resolve_recipe_path(path_or_name: str | os.PathLike) -> Path:
    """A recipe file, or a built-in recipe by name (`digits_quickstart`)."""
    path = Path(path_or_name)
    if path.is_file():
        return path
    text = str(path_or_name)
    if "/" not in text and os.sep not in text:
        stem = text[:-5] if text.endswith(".yaml") else text[:-4] if text.endswith(".yml") else text
        builtin = builtin_recipes_dir() / f"{stem}.yaml"
        if builtin.is_file():
            return builtin
    import difflib

    close = difflib.get_close_matches(Path(text).stem, list(list_builtin_recipes()), n=1, cutoff=0.6)
    hint = f"did you mean {close[0]!r}? " if close else ""
    names = ", ".join(list_builtin_recipes())
    raise RecipeError([f"{text} does not exist (absolute path {path.absolute()}), and there is no built-in recipe "
                       f"of that name; {hint}built-in recipes: {names}"], text)


# --- loading and validation -------------------------------------------------------------------------------


def load_recipe(path_or_name: str | os.PathLike, overrides: Sequence[str] = (), *,
                check_data: bool = True, trust: Optional[bool] = None, verify: bool = True) -> Recipe:
    """Load, override and validate a recipe; raise `RecipeError` with every problem located.

    A recipe file lying in a run folder (its config.resolved.yaml) is that folder's, not the user's: when its
    builder names code (`module:callable`), nothing is imported unless `trust` (or GROWNFX_TRUST=1) says so
    (grownfx.recipe.trust); UntrustedCodeError otherwise.  `verify=False` accepts a `model.weights` file without
    a checksum (--no-verify) and records the hash of the file in `model.weights_sha256`."""
    path = resolve_recipe_path(path_or_name)
    source = _display(path)
    data = _read_capped(path, source)
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise RecipeError([f"{source}: not a YAML text file (byte {data[exc.start]:#04x} at offset {exc.start} "
                           "is not UTF-8)"], source) from None
    raw, lines = parse_yaml(text, source)
    folder = run_folder_of(path)
    if folder is not None and isinstance(raw, dict):
        require_trust(raw, f"{source} (a file of the run folder {folder})", trust)
    return validate_recipe(raw, overrides, source=source, lines=lines, check_data=check_data,
                           recipe_dir=path.resolve().parent, verify=verify)


def validate_recipe(raw: Any, overrides: Sequence[str] = (), *, source: str = "<recipe>",
                    lines: Mapping[str, int] | None = None, check_data: bool = True,
                    recipe_dir: str | os.PathLike | None = None, verify: bool = True) -> Recipe:
    """Validate an already parsed recipe (a dict), after applying `overrides`.  `recipe_dir`: the recipe file's
    folder, where its own code (`module:callable`) is looked for and relative `code_dir` values start."""
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise RecipeError([f"{source}:1: a recipe is a mapping of sections (name, model, data, ...), "
                           f"got a {type(raw).__name__}"], source)
    raw = copy.deepcopy(raw)
    where = _Where(source, dict(lines or {}), {}, {})
    problems = _apply_overrides(raw, list(overrides), where)
    _fill_code_dir(raw, recipe_dir)
    problems += [(where(path), path, msg) for path, msg in resolve_weights(raw, recipe_dir, verify)]
    recipe = None
    try:
        recipe = Recipe.model_validate(raw)
    except ValidationError as exc:
        problems += [(where(path), path, msg) for path, msg in schema_errors(exc)]
    problems += [(where(path), path, msg) for path, msg in semantic_errors(raw, check_data)]
    if problems:
        raise RecipeError([_format(w, p, m) for w, p, m in sorted(problems, key=lambda x: x[0][0])], source)
    return recipe


def _fill_code_dir(raw: dict, recipe_dir: str | os.PathLike | None) -> None:
    """An absolute `code_dir`: a relative one starts at the recipe's folder; a recipe naming its own code without
    one gets the recipe's folder, so that config.resolved.yaml records where that code came from."""
    value = raw.get("code_dir")
    base = Path(recipe_dir) if recipe_dir is not None else Path.cwd()
    if isinstance(value, str) and value:
        raw["code_dir"] = str((base / value).resolve())
    elif value is None and recipe_dir is not None and names_user_code(raw):
        raw["code_dir"] = str(Path(recipe_dir).resolve())


def shadowed_recipe_warning(path_or_name: str | os.PathLike) -> str | None:
    """A bare name (`digits_quickstart`) runs the built-in recipe even when ./digits_quickstart.yaml (a copy the
    user edited, from `grownfx cp`) is here: say which one runs and how to run the other."""
    text = str(path_or_name)
    if "/" in text or os.sep in text or text.endswith((".yaml", ".yml")) or Path(text).is_file():
        return None
    local = next((Path(text + ext) for ext in (".yaml", ".yml") if Path(text + ext).is_file()), None)
    if local is None or not (builtin_recipes_dir() / f"{text}.yaml").is_file():
        return None
    return (f"{text!r} is the built-in recipe {text} ({builtin_recipes_dir() / (text + '.yaml')}); your "
            f"./{local} is not used. To run your copy, pass the file: ./{local}")
# A recipe is a few kilobytes and a few hundred values; these caps refuse, at once, a file that is something else
# (a 50 MB file, a "billion laughs" of nested aliases) instead of working on it for minutes.
MAX_RECIPE_BYTES = 1 << 20
MAX_RECIPE_VALUES = 100_000


def _read_capped(path: Path, source: str) -> bytes:
    try:
        size = path.stat().st_size
        if size > MAX_RECIPE_BYTES:
            raise RecipeError([f"{source}: {size / 1e6:.1f} MB is not a recipe (a recipe is a small YAML file; "
                               f"grownfx reads at most {MAX_RECIPE_BYTES >> 20} MB): is this the right file?"], source)
        with open(path, "rb") as f:
            return f.read(MAX_RECIPE_BYTES + 1)[: MAX_RECIPE_BYTES + 1]
    except OSError as exc:
        raise RecipeError([f"{source}: cannot read it ({exc.strerror or exc})"], source) from None


def _expanded_values(root: yaml.Node, source: str) -> int:
    """How many values `root` holds once every alias is expanded (counted on the node graph, each node once):
    RecipeError past MAX_RECIPE_VALUES, or for an alias that contains itself."""
    sizes: dict[int, int] = {}
    stack: list[tuple[yaml.Node, bool]] = [(root, False)]
    on_path: set[int] = set()
    while stack:
        node, done = stack.pop()
        key = id(node)
        children = ([v for pair in node.value for v in pair] if isinstance(node, yaml.MappingNode)
                    else list(node.value) if isinstance(node, yaml.SequenceNode) else [])
        if done:
            on_path.discard(key)
            sizes[key] = 1 + sum(sizes[id(c)] for c in children)
            if sizes[key] > MAX_RECIPE_VALUES:
                raise RecipeError([f"{source}:{node.start_mark.line + 1}: the YAML expands to more than "
                                   f"{MAX_RECIPE_VALUES:,} values through its aliases (*name of an &name): refusing "
                                   "it (a recipe holds a few hundred)"], source)
            continue
        if key in sizes:
            continue
        if key in on_path:
            raise RecipeError([f"{source}:{node.start_mark.line + 1}: an alias that contains itself (a recursive "
                               "&anchor): a recipe cannot hold one"], source)
        on_path.add(key)
        stack.append((node, True))
        stack.extend((c, False) for c in children if id(c) not in sizes)
    return sizes[id(root)]


def parse_yaml(text: str, source: str) -> tuple[Any, dict[str, int]]:
    """`yaml.safe_load(text)` plus a map dotted path -> 1-based line; errors become `RecipeError`.  Text over
    MAX_RECIPE_BYTES and aliases expanding past MAX_RECIPE_VALUES values are refused before anything is built."""
    if len(text) > MAX_RECIPE_BYTES:
        raise RecipeError([f"{source}: {len(text) / 1e6:.1f} MB of YAML is not a recipe (at most "
                           f"{MAX_RECIPE_BYTES >> 20} MB)"], source)
    try:
        loader = yaml.SafeLoader(text)
    except yaml.reader.ReaderError as exc:  # control characters: not a text recipe
        code = exc.character if isinstance(exc.character, int) else ord(exc.character)
        raise RecipeError([f"{source}: not a YAML text file (character {code:#04x} at position "
                           f"{exc.position} cannot appear in YAML)"], source) from None
    try:
        node = loader.get_single_node()
        if node is not None:
            _expanded_values(node, source)
        raw = loader.construct_document(node) if node is not None else None
    except RecursionError:
        raise RecipeError([f"{source}: the YAML is nested too deeply to be a recipe"], source) from None
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        line = f":{mark.line + 1}" if mark else ""
        what = str(exc.problem or exc.context)
        if exc.context and exc.context_mark and exc.problem:
            what += f", {exc.context} that starts at line {exc.context_mark.line + 1}"
        raise RecipeError([f"{source}{line}: YAML syntax error: {what}"], source) from None
    except yaml.YAMLError as exc:
        raise RecipeError([f"{source}: YAML error: {exc}"], source) from None
    finally:
        loader.dispose()
    lines: dict[str, int] = {}
    dups: list[str] = []
    if node is not None:
        _map_lines(node, (), lines, dups)
    if dups:
        raise RecipeError([f"{source}:{lines[d]}: {d}: duplicate key (the later one would silently win)"
                           for d in dups], source)
    return raw, lines


def _map_lines(node: yaml.Node, path: tuple, out: dict[str, int], dups: list[str]) -> None:
    if isinstance(node, yaml.MappingNode):
        seen = set()
        for key_node, value_node in node.value:
            sub = path + (str(key_node.value),)
            dotted = ".".join(sub)
            if dotted in seen:
                dups.append(dotted)
            seen.add(dotted)
            out[dotted] = key_node.start_mark.line + 1
            _map_lines(value_node, sub, out, dups)
    elif isinstance(node, yaml.SequenceNode):
        for i, item in enumerate(node.value):
            sub = path + (str(i),)
            out[".".join(sub)] = item.start_mark.line + 1
            _map_lines(item, sub, out, dups)


class _Where:
    """Where a dotted path's value came from: the last override that set it or a parent, else its file line."""

    def __init__(self, source: str, lines: dict[str, int], overrides: dict[str, str], order: dict[str, int]):
        self.source, self.lines, self.overrides, self.order = source, lines, overrides, order

    def __call__(self, path: str) -> tuple[tuple, str]:
        """((sort key), location text)."""
        for p in _self_and_ancestors(path):
            if p in self.overrides:
                text = self.overrides[p]
                return (1, self.order[text], 0), f"override {text!r}"
        below = [t for p, t in self.overrides.items() if path and p.startswith(path + ".")]
        after = f" (after override {below[-1]!r})" if below else ""  # e.g. a section-level check an override broke
        for p in _self_and_ancestors(path):
            if p in self.lines:
                return (0, self.lines[p], 0), f"{self.source}:{self.lines[p]}{after}"
        return (0, 0, 0), f"{self.source}{after}"

    def override(self, text: str) -> tuple[tuple, str]:
        return (1, self.order[text], 0), f"override {text!r}"


def _self_and_ancestors(path: str) -> list[str]:
    parts = path.split(".") if path else []
    return [".".join(parts[:i]) for i in range(len(parts), 0, -1)]


def _format(where: tuple, path: str, msg: str) -> str:
    return f"{where[1]}: {path}: {msg}" if path else f"{where[1]}: {msg}"


# --- overrides --------------------------------------------------------------------------------------------

_OVERRIDE = re.compile(r"(?P<op>[+~]?)(?P<key>[A-Za-z_][\w-]*(?:\.[\w-]+)*)(?:=(?P<value>.*))?", re.S)
_OVERRIDE_HELP = "write key.sub=value, +key.sub=value (add a key) or ~key.sub (delete a key)"


def _apply_overrides(raw: dict, overrides: list[str], where: _Where) -> list[tuple]:
    problems = []
    for i, text in enumerate(overrides):
        where.order.setdefault(text, i)
        trial = copy.deepcopy(raw)  # a failed override leaves nothing behind (no half-made sections)
        try:
            path = _apply_one(trial, text)
        except ValueError as exc:
            problems.append((where.override(text), "", str(exc)))
            continue
        raw.clear()
        raw.update(trial)
        where.overrides[path] = text
        for p in [p for p in where.overrides if p.startswith(path + ".")]:
            del where.overrides[p]  # this override replaced what earlier ones set below it
    return problems


def _apply_one(raw: dict, text: str) -> str:
    m = _OVERRIDE.fullmatch(text.strip())
    if not m:
        raise ValueError(f"cannot parse: {_OVERRIDE_HELP}")
    op, key, value = m.group("op"), m.group("key"), m.group("value")
    if op == "~" and value is not None:
        raise ValueError(f"~{key} deletes a key and takes no value")
    if op != "~" and value is None:
        raise ValueError(f"missing '=value': {_OVERRIDE_HELP}")
    parts = key.split(".")
    parent = _container(raw, parts[:-1], create=op != "~")
    last = parts[-1]
    exists = _has(parent, last)
    if op == "~":
        if not exists:
            raise ValueError(f"{key} is not set in the recipe, nothing to delete")
        del parent[int(last) if isinstance(parent, list) else last]
        return key
    try:
        parsed = parse_yaml(value, "value")[0] if value.strip() else None
    except RecipeError as exc:  # "value:1: YAML syntax error: ..." -> "YAML syntax error: ..."
        why = exc.errors[0].removeprefix("value").lstrip(":0123456789 ")
        raise ValueError(f"value {value!r} is not valid YAML: {why}") from None
    if op == "+" and exists:
        raise ValueError(f"{key} is already set; drop the '+' to change it")
    if op == "" and not exists and _is_free_mapping(raw, parts[:-1]):
        raise ValueError(f"{'.'.join(parts[:-1])} has no key {last!r}; add it with '+{key}={value}'")
    if isinstance(parent, list):
        if not last.isdigit() or int(last) >= len(parent):
            raise ValueError(f"{'.'.join(parts[:-1])} is a list of {len(parent)} items; no index {last}")
        parent[int(last)] = parsed
    else:
        old = parent.get(last)
        parent[last] = parsed
        if last == "name" and old != parsed:
            _drop_foreign_keys(parent, parts[:-1])
    return key


def _drop_foreign_keys(section: dict, path: list[str]) -> None:
    """`method.name=scratch` switches a discriminated section (method:, data:) to another kind: the keys that
    only the old kind has (method.ablation of grown) go, so the switch validates."""
    tp: Any = Recipe
    for part in path:
        tp = child_type(tp, part)
        if tp is None:
            return
    member = pick_member(unwrap(tp), section) if is_union(unwrap(tp)) else None
    if member is None:
        return
    for key in [k for k in section if k not in member.model_fields]:
        del section[key]


def _has(container: Any, key: str) -> bool:
    if isinstance(container, list):
        return key.isdigit() and int(key) < len(container)
    return key in container


def _container(raw: dict, parts: list[str], create: bool) -> Any:
    node: Any = raw
    for i, part in enumerate(parts):
        here = ".".join(parts[: i + 1])
        if isinstance(node, list):
            if not part.isdigit() or int(part) >= len(node):
                raise ValueError(f"{'.'.join(parts[:i])} is a list of {len(node)} items; no index {part}")
            node = node[int(part)]
        elif part not in node or (node[part] is None and create):
            if not create:
                raise ValueError(f"{here} is not set in the recipe, nothing to delete")
            node[part] = {}
            node = node[part]
        else:
            node = node[part]
        if not isinstance(node, (dict, list)):
            raise ValueError(f"{here} is a {type(node).__name__} ({node!r}), not a mapping")
    return node


def _is_free_mapping(raw: dict, parts: list[str]) -> bool:
    """True where the schema takes arbitrary keys (a `dict` field such as model.kwargs)."""
    tp: Any = Recipe
    node: Any = raw
    for part in parts:
        tp = pick_member(unwrap(tp), node) if is_union(unwrap(tp)) else tp
        tp = child_type(tp, part) if tp is not None else None
        node = node.get(part) if isinstance(node, dict) else None
    tp = unwrap(tp) if tp is not None else None
    return tp is dict or get_origin(tp) is dict


# --- resolved recipes -------------------------------------------------------------------------------------


def dump_resolved(recipe: Recipe) -> str:
    """The recipe as YAML with every default filled in; `load_recipe` of it gives the same recipe."""
    body = yaml.safe_dump(recipe.model_dump(mode="json"), sort_keys=False, allow_unicode=True, width=100)
    return f"# resolved recipe {recipe.name!r}: every default filled in\n{body}"


def recipe_diff(a: Recipe | Mapping, b: Recipe | Mapping) -> list[str]:
    """Dotted paths whose values differ between two recipes (lists compare whole)."""
    fa, fb = _flatten(_as_dict(a)), _flatten(_as_dict(b))
    missing = object()
    return sorted(k for k in fa.keys() | fb.keys() if fa.get(k, missing) != fb.get(k, missing))


def _as_dict(x: Recipe | Mapping) -> dict:
    if isinstance(x, BaseModel):
        return x.model_dump(mode="json")
    return Recipe.model_validate(dict(x)).model_dump(mode="json")


def _flatten(d: Mapping, prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, Mapping) and v:
            out.update(_flatten(v, key + "."))
        else:
            out[key] = v
    return out


def _display(path: Path) -> str:
    """A path as the user would write it: relative to the working folder when inside it."""
    try:
        return str(path.resolve().relative_to(Path.cwd().resolve()))
    except ValueError:
        return str(path)
