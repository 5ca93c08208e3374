"""`grownfx compare`: one recipe, several methods and seeds, the same stream, schedule and validation split.

    run_compare("digits_quickstart", ["scratch", "finetune", "pnn", "grown", "grown[+lsg]"], seeds=[0, 1])

writes one run folder per method and seed (`<out>/<method>/seed<k>/`, each a normal `grownfx run` folder) and
`<out>/compare.json` listing them; `grownfx report <out>` turns that into the paper's tables.

Methods: scratch, finetune, pnn, grow, packnet, piggyback, cpg, grown, and GROWN's ablation rows
grown[grow_only], grown[+selective_mask], grown[+lsg], grown[+retrain_released] (the paper's Table 5).
A method the recipe itself names keeps the recipe's settings for it; the others take their defaults.

Scratch targets are trained once per seed: GROWN and CPG use "the validation accuracy of a full backbone
trained from scratch" as their target; that is exactly what the `scratch` run computes (same seed, same
function), so when `scratch` is in the comparison with the same epochs its validation accuracies become the
targets of the other runs (as a per-task list), else they are computed once per seed here.
"""

from __future__ import annotations

import json
import re
import time
from pathlib import Path
from typing import Optional, Sequence

import torch

from .config import Recipe, parse_target

__all__ = ["ABLATIONS", "METHODS", "method_config", "run_compare", "slug"]

METHODS = ("scratch", "finetune", "pnn", "grow", "packnet", "piggyback", "cpg", "grown")
ABLATIONS = ("grow_only", "+selective_mask", "+lsg", "+retrain_released")
TARGETED = ("grown", "cpg")  # methods the runner gives a target (grownfx.runner._Run.target)


def _parse(spec: str) -> tuple[str, Optional[str]]:
    m = re.fullmatch(r"\s*(\w+)\s*(?:\[\s*([^\]]+?)\s*\])?\s*", spec)
    if not m or m.group(1) not in METHODS:
        raise ValueError(f"unknown method {spec!r}; expected one of {', '.join(METHODS)} or "
                         f"grown[{'|'.join(ABLATIONS)}]")
    name, ablation = m.group(1), m.group(2)
    if ablation is not None and (name != "grown" or ablation not in ABLATIONS):
        raise ValueError(f"unknown ablation {spec!r}; the ablation rows are "
                         + ", ".join(f"grown[{a}]" for a in ABLATIONS))
    return name, ablation


def method_config(recipe: Recipe, spec: str) -> dict:
    """The `method:` section for `spec` ('packnet', 'grown[+lsg]', ...), based on the recipe's own if it matches."""
    name, ablation = _parse(spec)
    cfg = recipe.method.model_dump(mode="json") if recipe.method.name == name else {"name": name}
    if ablation is not None:  # a Table 5 row: the ablation decides the switches
        cfg.update(ablation=ablation, selective_mask=None, lsg=None, retrain_released=None)
    return cfg


def slug(spec: str) -> str:
    """Folder name of a method: 'grown[+lsg]' -> 'grown-plus_lsg'."""
    name, ablation = _parse(spec)
    return name if ablation is None else f"{name}-{ablation.replace('+', 'plus_')}"


def _load(recipe_or_path, overrides: Sequence[str]) -> Recipe:
    from .recipes import load_recipe, validate_recipe

    if isinstance(recipe_or_path, Recipe):
        if not overrides:
            return recipe_or_path
        return validate_recipe(recipe_or_path.model_dump(mode="json"), list(overrides), source=recipe_or_path.name)
    return load_recipe(recipe_or_path, list(overrides))


def _variant(recipe: Recipe, spec: str, seed: int, run_dir: Path, targets: Optional[list[float]]) -> Recipe:
    d = recipe.model_dump(mode="json")
    d.update(name=f"{recipe.name}-{slug(spec)}-s{seed}", seed=seed, method=method_config(recipe, spec))
    d["output"]["dir"] = str(run_dir)
    if targets is not None and d["method"]["name"] in TARGETED:
        d["target"]["rule"] = targets
    return Recipe.model_validate(d)


def _scratch_epochs_match(recipe: Recipe) -> bool:
    return recipe.target.scratch_epochs in (None, recipe.training.epochs)


def scratch_targets(recipe: Recipe, seed: int) -> list[float]:
    """Validation accuracy of a full backbone trained from scratch on each task: runner._Run.scratch_reference."""
    from .data import build_stream
    from .methods.scratch import fresh_backbone, train_plain
    from .training import resolve_device

    recipe = recipe.model_copy(update={"seed": seed})
    if recipe.training.num_threads:
        torch.set_num_threads(recipe.training.num_threads)
    device = resolve_device(recipe.device)
    torch.manual_seed(seed)
    stream = build_stream(recipe.data, seed)
    epochs = recipe.target.scratch_epochs or recipe.training.epochs
    out = []
    for t, task in enumerate(stream.tasks):
        parts = (seed, "scratch", t)
        out.append(train_plain(fresh_backbone(recipe, task, parts), task, recipe.training, device, parts, epochs))
    return out


def _finished(run_dir: Path) -> bool:
    summary = run_dir / "summary.json"
    if not summary.is_file():
        return False
    s = json.loads(summary.read_text())
    return len(s.get("tasks", [])) == s.get("num_tasks", -1)


def run_compare(recipe_or_path, methods: list[str], seeds: list[int] = [0], overrides=(),  # noqa: B006
                out_dir=None) -> Path:
    """Run every method on every seed (same stream, schedule, validation split); returns the comparison folder.

    A finished run folder is reused and an interrupted one resumed, so a comparison can be continued by
    calling this again.  A method that fails is recorded in compare.json and the others still run; the
    failures are raised together at the end.
    """
    from .runner import run

    recipe = _load(recipe_or_path, overrides)
    specs = list(dict.fromkeys(methods))
    for spec in specs:
        _parse(spec)
    if not specs or not seeds:
        raise ValueError("give at least one method and one seed")
    specs.sort(key=lambda s: s != "scratch")  # scratch first: its validation accuracies are the targets
    out = Path(out_dir or recipe.output.dir.format(name=f"{recipe.name}_compare"))
    out.mkdir(parents=True, exist_ok=True)
    rule = recipe.target.rule
    margin = parse_target(rule) if isinstance(rule, str) else None
    wants = margin is not None and any(_parse(s)[0] in TARGETED for s in specs)
    index = {"recipe": recipe.name, "methods": specs, "seeds": list(seeds), "target_rule": rule, "runs": [],
             "targets": {}, "recipe_config": recipe.model_dump(mode="json")}
    failures = []
    for seed in seeds:
        targets: Optional[list[float]] = None
        for spec in specs:
            name, _ = _parse(spec)
            if wants and targets is None and name in TARGETED:
                targets, source = _targets(recipe, seed, out, "scratch" in specs and _scratch_epochs_match(recipe))
                targets = [v - margin for v in targets]
                index["targets"][str(seed)] = {"values": targets, "source": source}
            run_dir = out / slug(spec) / f"seed{seed}"
            entry = {"method": spec, "seed": seed, "dir": str(run_dir.relative_to(out))}
            start = time.perf_counter()
            try:
                if _finished(run_dir):
                    entry["reused"] = True
                else:
                    resume = (run_dir / "checkpoints" / "last.pt").exists()
                    run(_variant(recipe, spec, seed, run_dir, targets), resume=resume,
                        echo=lambda msg, s=spec, k=seed: print(f"[{s} seed {k}] {msg}", flush=True))
                entry["status"] = "ok"
            except KeyboardInterrupt:
                _write(out, index)
                raise
            except Exception as exc:  # keep comparing; report the failure at the end
                entry.update(status="failed", error=f"{type(exc).__name__}: {exc}")
                failures.append(f"{spec} seed {seed}: {entry['error']}")
            entry["wall_s"] = time.perf_counter() - start
            index["runs"].append(entry)
            _write(out, index)
    if failures:
        raise RuntimeError(f"{len(failures)} run(s) failed (see {out / 'compare.json'}):\n" + "\n".join(failures))
    return out


def _targets(recipe: Recipe, seed: int, out: Path, from_scratch_run: bool) -> tuple[list[float], str]:
    """Scratch validation accuracies per task: from this comparison's scratch run when it is the same
    computation, else trained here once for every targeted method of this seed."""
    run_dir = out / slug("scratch") / f"seed{seed}"
    if from_scratch_run and _finished(run_dir):
        tasks = json.loads((run_dir / "summary.json").read_text())["tasks"]
        return [float(t["val_acc"]) for t in tasks], "scratch run"
    return scratch_targets(recipe, seed), "trained once for this comparison"


def _write(out: Path, index: dict) -> None:
    from .checkpoint import atomic_write_text

    atomic_write_text(json.dumps(index, indent=1), out / "compare.json")
