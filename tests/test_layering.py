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
"""

from __future__ import annotations

import ast
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
