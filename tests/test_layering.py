"""The layering contract: data flows one way through the pipeline, and the import graph shows it.

    errors                  the error classes and exit codes; imports nothing, every layer may import it
    data, models            import no other part of grownfx (but errors)
    engine                  tracing -> coupling -> surgery -> rewrite -> net; imports only itself (and files)
    recipe                  the schema; imports data and models
    learn                   stage loop, learner, methods; imports engine, data, models, recipe
    run                     runner, compare, export; imports everything below it and report
    report                  reads run folders; imports data, recipe
    cli                     the command line; imports anything

Every import counts, top-level or inside a function: a function-level import cannot hide a cycle.  Function-level
imports of grownfx modules are allowed only where they keep start-up fast (the CLI, which must not import torch
for --help) or keep optional dataset readers off `import grownfx.data`; DEFERRED lists them.

The engine holds no process-wide state: what a net computes depends on the net and its inputs only, never on
which optimiser a user built or what else ran in the process.  So grownfx/engine has no optimiser hooks nor
torch's global module hooks, no `global` statement, no module-level container that its code mutates, and no
module-level instance of a grownfx class except those in PROCESS_STATE, each with its reason.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

# layer -> the layers it may import (itself always allowed)
ALLOWED = {
    "errors": set(),  # the error classes and exit codes (standard library only): every layer may raise them
    "files": {"errors"},
    "version": set(),
    "usercode": {"errors"},  # importing the user's `module:callable` code (model.builder, data.factory)
    "data": {"files", "usercode", "errors"},
    "models": {"usercode", "errors"},
    "engine": {"files", "errors"},
    "recipe": {"data", "models", "files", "usercode", "errors"},
    "learn": {"engine", "data", "models", "recipe", "files", "errors"},
    "report": {"data", "recipe", "files", "errors"},
    "run": {"engine", "data", "models", "recipe", "learn", "report", "files", "version", "usercode", "errors"},
    "cli": {"engine", "data", "models", "recipe", "learn", "report", "run", "files", "top", "version", "usercode",
            "errors"},
    # grownfx/__init__.py re-exports the engine's public API, `load_run` (grownfx.run.results) and `load_export`
    # (grownfx.run.opening)
    "top": {"engine", "version", "run"},
    "main": {"cli"},
    "builtin_recipes": set(),
}
# Layers whose function-level imports of grownfx modules are deliberate: the CLI defers everything that imports
# torch (`grownfx --help` must start instantly), data defers its dataset readers (PIL, sklearn, torchvision).
DEFERRED = {"cli", "data"}
# Single files with one deliberate deferral each, and why.
DEFERRED_FILES = {
    "grownfx/recipe/checks.py": "grownfx.models imports torch; `validate` without a model check must not",
}


# The engine's only module-level objects, and why each may exist.
PROCESS_STATE = {
    ("grownfx/engine/registry.py", "DEFAULT_REGISTRY"):
        "the documented extension point: `grownfx.register_module` / `register_function` declare a layer type or "
        "function once per process (like torch.fx.wrap and timm's register_notrace_module), before nets are "
        "prepared; it also memoises what probing a class found (a fact about the class's code), invalidated "
        "explicitly by every registration",
    ("grownfx/engine/coupling/layouts.py", "OTHER"): "a sentinel with no state (a layout the analysis cannot see)",
    ("grownfx/engine/faithful.py", "_FUNCTION_CALLS"):
        "a memo keyed by an autograd Function class: the one graph target that calls `cls.apply`, so two traces "
        "of the same class give the same target (a fact about the class, never a net's state)",
    ("grownfx/engine/tracing.py", "_GN_CACHE"):
        "a memo of probing a GroupNorm subclass once per (class, shape, groups): whether it computes plain "
        "F.group_norm (a fact about the class's code, never a net's state)",
}


def _modules():
    for path in sorted((REPO / "grownfx").rglob("*.py")):
        parts = path.relative_to(REPO / "grownfx").with_suffix("").parts
        yield path, ("top" if parts == ("__init__",) else "main" if parts == ("__main__",)
                     else parts[0])
    for path in sorted((REPO / "cli").glob("*.py")):
        yield path, "cli"


def _imports(path: Path, layer: str):
    """(line, imported grownfx layer, is top-level) for every grownfx import in `path`."""
    tree = ast.parse(path.read_text(), filename=str(path))
    top_level = set()

    def mark(body):
        for node in body:
            top_level.add(node)
            for field in ("body", "orelse", "finalbody"):
                if isinstance(node, (ast.If, ast.Try)):
                    mark(getattr(node, field, []))
            for handler in getattr(node, "handlers", []):
                mark(handler.body)

    mark(tree.body)
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            assert node.level == 0, f"{path}:{node.lineno}: relative import; grownfx uses absolute imports"
            names = [node.module or ""]
            if node.module == "grownfx":
                names = [f"grownfx.{a.name}" for a in node.names]
        elif isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        else:
            continue
        for name in names:
            parts = name.split(".")
            if parts[0] != "grownfx":
                continue
            target = parts[1] if len(parts) > 1 else "top"
            if target not in ALLOWED:  # `from grownfx import prepare`: a name of the top-level package
                target = "top"
            yield node.lineno, target, node in top_level


def test_every_layer_is_known():
    layers = {layer for _, layer in _modules()}
    assert layers <= set(ALLOWED), f"new top-level part(s) of grownfx need a place here: {layers - set(ALLOWED)}"


@pytest.mark.parametrize("path,layer", list(_modules()), ids=lambda v: str(v.relative_to(REPO)) if isinstance(v, Path) else v)
def test_imports_follow_the_pipeline(path, layer):
    bad = []
    for line, target, top in _imports(path, layer):
        if target != layer and target not in ALLOWED[layer]:
            bad.append(f"{path.relative_to(REPO)}:{line}: {layer} imports grownfx.{target}")
        if (not top and target != "files" and layer not in DEFERRED
                and str(path.relative_to(REPO)) not in DEFERRED_FILES):
            bad.append(f"{path.relative_to(REPO)}:{line}: function-level import of grownfx.{target} "
                       f"(import at the top; a cycle it would hide is a layering defect)")
    assert not bad, "\n".join(bad)


def test_the_contract_is_checked(tmp_path):
    """The check itself can fail: an engine module importing the learner, at the top or hidden in a function."""
    probe = tmp_path / "probe.py"
    probe.write_text("from grownfx.learn import learner\n\ndef f():\n    from grownfx.run import runner\n")
    found = sorted((target, top) for _, target, top in _imports(probe, "engine"))
    assert found == [("learn", True), ("run", False)]
    assert "learn" not in ALLOWED["engine"]


# -- no process-wide state in the engine ---------------------------------------------------------------------------

_CONTAINERS = {"dict", "list", "set", "bytearray", "OrderedDict", "defaultdict", "deque", "Counter",
               "WeakKeyDictionary", "WeakValueDictionary", "WeakIdKeyDictionary", "WeakSet"}
_MUTATORS = {"append", "extend", "insert", "add", "update", "setdefault", "pop", "popitem", "remove", "discard",
             "clear", "move_to_end", "appendleft", "__setitem__", "__delitem__"}


def _name(node) -> str | None:
    if isinstance(node, ast.Name):
        return node.id
    if isinstance(node, ast.Attribute):
        return node.attr
    return None


def process_state(source: str, path: str = "probe.py", grownfx_classes: set[str] = frozenset()) -> list[str]:
    """Every piece of process-wide state in one engine module's source: optimiser or global module hooks,
    `global` statements, module-level containers its code mutates, module-level instances of grownfx classes
    (those in PROCESS_STATE excepted).  `grownfx_classes`: class names defined in grownfx."""
    tree = ast.parse(source)
    found = []
    containers: dict[str, int] = {}
    local_classes = {n.name for n in tree.body if isinstance(n, ast.ClassDef)} | set(grownfx_classes)
    for node in tree.body:
        targets = node.targets if isinstance(node, ast.Assign) else [node.target] if isinstance(
            node, ast.AnnAssign) and node.value is not None else []
        value = getattr(node, "value", None)
        for target in targets:
            if not isinstance(target, ast.Name):
                continue
            if isinstance(value, (ast.Dict, ast.List, ast.Set, ast.DictComp, ast.ListComp, ast.SetComp)) or (
                    isinstance(value, ast.Call) and _name(value.func) in _CONTAINERS):
                if (path, target.id) not in PROCESS_STATE:
                    containers[target.id] = node.lineno
            elif isinstance(value, ast.Call) and _name(value.func) in local_classes \
                    and (path, target.id) not in PROCESS_STATE:
                found.append(f"{path}:{node.lineno}: module-level instance '{target.id}' of "
                             f"{_name(value.func)} (process-wide state)")
    for node in ast.walk(tree):
        if isinstance(node, ast.Global):
            found.append(f"{path}:{node.lineno}: `global {', '.join(node.names)}` rebinds module state")
        elif isinstance(node, ast.Call):
            fn = _name(node.func) or ""
            if re.fullmatch(r"register_(optimizer_step|module)_\w*hook", fn):
                found.append(f"{path}:{node.lineno}: {fn}: a hook on every optimiser or module of the process")
            if isinstance(node.func, ast.Attribute) and node.func.attr in _MUTATORS \
                    and _name(node.func.value) in containers and isinstance(node.func.value, ast.Name):
                found.append(f"{path}:{node.lineno}: module-level '{node.func.value.id}' mutated "
                             f"(.{node.func.attr}): a process-wide registry or cache")
        elif isinstance(node, (ast.Assign, ast.AugAssign, ast.Delete)):
            targets = node.targets if isinstance(node, (ast.Assign, ast.Delete)) else [node.target]
            for t in targets:
                base = t.value if isinstance(t, ast.Subscript) else t if isinstance(node, ast.AugAssign) else None
                if isinstance(base, ast.Name) and base.id in containers and not (
                        isinstance(node, ast.Assign) and node in tree.body):
                    found.append(f"{path}:{node.lineno}: module-level '{base.id}' mutated: a process-wide "
                                 "registry or cache")
    return found


def _engine_files():
    return sorted((REPO / "grownfx" / "engine").rglob("*.py"))


def _grownfx_classes() -> set[str]:
    names = set()
    for path in sorted((REPO / "grownfx").rglob("*.py")):
        names |= {n.name for n in ast.walk(ast.parse(path.read_text())) if isinstance(n, ast.ClassDef)}
    return names


def test_the_engine_holds_no_process_wide_state():
    classes = _grownfx_classes()
    found = [f for path in _engine_files()
             for f in process_state(path.read_text(), str(path.relative_to(REPO)), classes)]
    assert not found, "\n".join(found)
    for path, name in PROCESS_STATE:  # every exception names something that exists
        assert re.search(rf"^{name}\b.*=", (REPO / path).read_text(), re.M), (path, name)


def test_the_process_state_check_can_fail():
    probe = """
import torch
from torch.optim.optimizer import register_optimizer_step_post_hook
_STEPS = [0]
_CACHE: dict = {}
_SEEN = set()
TABLE = {"a": 1}                     # a constant table: read, never written
ONE = torch.ones(())


class Bank:
    pass


BANK = Bank()


def count(*a):
    _STEPS[0] += 1
    _CACHE[a] = 1
    _SEEN.add(a)
    global ONE
    return TABLE["a"]


register_optimizer_step_post_hook(count)
torch.nn.modules.module.register_module_forward_hook(count)
"""
    found = process_state(probe)
    assert len(found) == 7, found
    assert any("'_STEPS' mutated" in f for f in found) and any("'_CACHE' mutated" in f for f in found)
    assert any("'_SEEN' mutated" in f for f in found) and any("global ONE" in f for f in found)
    assert any("instance 'BANK'" in f for f in found)
    assert any("register_optimizer_step_post_hook" in f for f in found)
    assert any("register_module_forward_hook" in f for f in found)
    assert not any("TABLE" in f for f in found)
