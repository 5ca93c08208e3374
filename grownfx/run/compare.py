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
import sys
import time
from pathlib import Path
from typing import Callable, Optional, Sequence

import torch

from grownfx.data import stream_for
from grownfx.files import atomic_write_text
from grownfx.learn.training import resolve_device
from grownfx.recipe.loading import load_recipe, validate_recipe
from grownfx import files
from grownfx.learn.guards import NonFiniteError
from grownfx.run.export import export_complete, task_folder
from grownfx.run.folder import RunError, _lock, holds_run
from grownfx.run.runner import RunInterrupted, run
from grownfx.run import targets as T
from grownfx.recipe.schema import ABLATIONS, METHODS, Recipe, parse_method_spec, target_sources

__all__ = ["ABLATIONS", "METHODS", "method_config", "run_compare", "slug"]


def method_config(recipe: Recipe, spec: str) -> dict:
    """The `method:` section for `spec` ('packnet', 'grown[+lsg]', ...), based on the recipe's own if it matches."""
    name, ablation = parse_method_spec(spec)
    cfg = recipe.method.model_dump(mode="json") if recipe.method.name == name else {"name": name}
    if name == "finetune":  # the paper's Fine-tune keeps a copy per task; finetune[forgetting] shares one net
        cfg["keep_copies"] = ablation != "forgetting"
    elif ablation is not None:  # a Table 5 row: the ablation decides the switches
        cfg.update(ablation=ablation, selective_mask=None, lsg=None, retrain_released=None)
    return cfg


def slug(spec: str) -> str:
    """Folder name of a method: 'grown[+lsg]' -> 'grown-plus_lsg'."""
    name, ablation = parse_method_spec(spec)
    return name if ablation is None else f"{name}-{ablation.replace('+', 'plus_')}"


def _load(recipe_or_path, overrides: Sequence[str]) -> Recipe:
    if isinstance(recipe_or_path, Recipe):
        if not overrides:
            return recipe_or_path
        return validate_recipe(recipe_or_path.model_dump(mode="json"), list(overrides), source=recipe_or_path.name)
    return load_recipe(recipe_or_path, list(overrides))


def _variant(recipe: Recipe, spec: str, seed: int, run_dir: Path, targets: Optional[list[float]]) -> Recipe:
    d = recipe.model_dump(mode="json")
    d.update(name=f"{recipe.name}-{slug(spec)}-s{seed}", seed=seed, method=method_config(recipe, spec))
    d["output"]["dir"] = str(run_dir)
    if targets is not None and d["method"]["name"] in T.TARGETED:
        d["target"]["rule"] = targets
    return Recipe.model_validate(d)


def _scratch_epochs_match(recipe: Recipe) -> bool:
    """Whether the `scratch` run trains the epochs of the scratch targets (an epoch budget changes its own)."""
    own = recipe.training.epoch_budget or recipe.training.epochs
    return T.scratch_epochs(recipe) == own


def scratch_targets(recipe: Recipe, seed: int, progress=None) -> list[float]:
    """Scratch's reference accuracy on each task (grownfx.run.targets.scratch_accuracy, as a run trains it).
    `progress`: a display its tasks and epochs show on ("scratch reference")."""
    recipe = recipe.model_copy(update={"seed": seed})
    if recipe.training.num_threads:
        torch.set_num_threads(recipe.training.num_threads)
    device = resolve_device(recipe.device)
    torch.manual_seed(seed)
    stream = stream_for(recipe)
    out = []
    for t, task in enumerate(stream.tasks):
        if progress is not None:
            progress.start_task(t, len(stream.tasks), f"{task.name} (scratch target, seed {seed})")
        out.append(T.scratch_accuracy(recipe, task, device, on_epoch=progress.epoch if progress is not None else None))
    return out


def _finished(run_dir: Path, export_format: str = "none") -> bool:
    """All tasks learned (and, with `export_format`, the last one exported: a kill can come between)."""
    summary = run_dir / "summary.json"
    if not summary.is_file():
        return False
    try:
        s = files.read_json(summary)
    except files.CorruptFileError:  # torn by an older grownfx's in-place write: resume the run, which rewrites it
        return False
    done = len(s.get("tasks", [])) == s.get("num_tasks", -1)
    if done and export_format != "none":
        return export_complete(task_folder(run_dir, len(s["tasks"]) - 1), export_format)
    return done


def run_compare(recipe_or_path, methods: list[str], seeds: list[int] = [0], overrides=(),  # noqa: B006
                out_dir=None, equal_budget: Optional[int] = None, progress=None,
                echo: Optional[Callable[[str], None]] = None) -> Path:
    """Run every method on every seed (same stream, schedule, validation split); returns the comparison folder.

    `equal_budget` N sets `training.epoch_budget`: every method then trains exactly N epochs per task.

    A finished run folder is reused and an interrupted one resumed, so a comparison can be continued, or
    extended with more methods and seeds, by calling this again with the same recipe and folder.  A method
    that fails is recorded in compare.json and the others still run; the failures are raised at the end.
    `progress`: a grownfx.report.progress display each run shows its tasks and phases on; `echo`: where lines go.
    Ctrl-C raises RunInterrupted naming the comparison folder (calling this again continues it).
    """
    echo = echo or (lambda msg: print(msg, flush=True))
    recipe = _load(recipe_or_path, overrides)
    if equal_budget is not None:
        d = recipe.model_dump(mode="json")
        d["training"]["epoch_budget"] = equal_budget
        recipe = Recipe.model_validate(d)
    specs = list(dict.fromkeys(methods))
    if not specs or not seeds:
        raise ValueError("give at least one method and one seed")
    for spec in specs:  # every variant must validate before hours of training start
        _variant(recipe, spec, seeds[0], Path("."), None)
    # scratch (and fine-tune) first: their validation accuracies are the targets
    specs.sort(key=lambda s: (s != "scratch", parse_method_spec(s)[0] != "finetune"))
    out, lock = _claim(recipe, out_dir, echo)
    try:
        return _compare(recipe, specs, seeds, out, progress, echo)
    except KeyboardInterrupt:
        if isinstance(sys.exc_info()[1], RunInterrupted) and sys.exc_info()[1].out_dir == out:
            raise
        raise RunInterrupted(out) from None
    finally:
        lock.release()


def _claim(recipe: Recipe, out_dir, echo: Callable[[str], None] = print) -> tuple[Path, files.FolderLock]:
    """The comparison folder, locked against a second writer: `out_dir` when given (refused when it holds a
    comparison of another recipe); else the first of `runs/NAME_compare`, `runs/NAME_compare-2`, ... that is
    new or holds this same comparison (so an override that changes what is learned gets a new folder)."""
    if out_dir is not None:
        out = Path(out_dir)
        if _other_recipe(out, recipe):
            raise RunError(f"{out} holds a comparison of another recipe; choose another --out")
        return out, _lock(out)
    own = Path(recipe.output.dir.format(name=recipe.name))
    base = own.with_name(own.name + "_compare")
    n = 1
    while True:
        out = base if n == 1 else base.with_name(f"{base.name}-{n}")
        n += 1
        if _other_recipe(out, recipe):
            continue
        if out.is_dir() and not (out / "compare.json").is_file() and any(
                p.name != files.FolderLock.NAME for p in out.iterdir()):
            continue  # something else lives there
        echo(f"comparison folder {out}")
        return out, _lock(out)


def _other_recipe(out: Path, recipe: Recipe) -> bool:
    path = out / "compare.json"
    if not path.is_file():
        return False
    try:
        old = json.loads(path.read_text())
    except ValueError:
        return False  # a torn compare.json (an older grownfx wrote it in place) is rewritten
    return _what_is_learned(old.get("recipe_config", {})) != _what_is_learned(recipe.model_dump(mode="json"))


def _compare(recipe: Recipe, specs: list[str], seeds: Sequence[int], out: Path, progress=None,
             echo: Callable[[str], None] = print) -> Path:
    out.mkdir(parents=True, exist_ok=True)
    rule = recipe.target.rule
    index = _index(out, recipe, specs, seeds)
    wants = isinstance(rule, str) and any(parse_method_spec(s)[0] in T.TARGETED for s in specs)
    failures = []
    for seed in seeds:
        targets: Optional[list[float]] = None
        for spec in specs:
            name, _ = parse_method_spec(spec)
            if wants and targets is None and name in T.TARGETED:
                try:
                    references, source = _references(recipe, seed, out, specs, progress)
                except NonFiniteError as exc:  # no target: never let a diverged reference set one
                    entry = _record_failure(out, index, spec, seed, f"no target: the reference diverged ({exc})")
                    failures.append(f"{spec} seed {seed}: {entry['error']}")
                    continue
                targets = [T.task_target(rule, t, ref) for t, ref in enumerate(references)]
                index["targets"][str(seed)] = {"values": targets, "source": source}
            entry = _run_one(recipe, spec, seed, out, targets, index, progress, echo)
            if entry["status"] != "ok":
                failures.append(f"{spec} seed {seed}: {entry['error']}")
    if failures:
        raise RuntimeError(f"{len(failures)} run(s) failed (see {out / 'compare.json'}):\n" + "\n".join(failures))
    return out


def _record_failure(out: Path, index: dict, spec: str, seed: int, error: str) -> dict:
    entry = {"method": spec, "seed": seed, "dir": str(Path(slug(spec)) / f"seed{seed}"), "status": "failed",
             "error": error}
    index["runs"] = [r for r in index["runs"] if (r["method"], r["seed"]) != (spec, seed)] + [entry]
    _write(out, index)
    return entry


def _run_one(recipe: Recipe, spec: str, seed: int, out: Path, targets, index: dict, progress=None,
             echo: Callable[[str], None] = print) -> dict:
    """Run (or reuse, or resume) one method and seed; record it in compare.json."""
    run_dir = out / slug(spec) / f"seed{seed}"
    before = next((r for r in index["runs"] if (r["method"], r["seed"]) == (spec, seed)), {})
    entry = {"method": spec, "seed": seed, "dir": str(run_dir.relative_to(out)), "status": "ok"}
    start = time.perf_counter()
    try:
        if _finished(run_dir, recipe.output.export_format):
            entry.update(reused=True, wall_s=before.get("wall_s"))
        else:
            # an explicit folder (never renumbered); resumed when it holds a run, even one killed before its
            # first checkpoint (the runner starts that one again)
            run(_variant(recipe, spec, seed, run_dir, targets), out_dir=run_dir, resume=holds_run(run_dir),
                progress=progress, echo=lambda msg: echo(f"[{spec} seed {seed}] {msg}"))
    except KeyboardInterrupt:
        _write(out, index)
        raise
    except Exception as exc:  # keep comparing; the caller reports the failure at the end
        entry.update(status="failed", error=f"{type(exc).__name__}: {exc}")
    if entry.get("wall_s") is None:
        entry["wall_s"] = time.perf_counter() - start
    index["runs"] = [r for r in index["runs"] if r is not before] + [entry]
    _write(out, index)
    return entry


def _references(recipe: Recipe, seed: int, out: Path, specs: Sequence[str] = (), progress=None
                ) -> tuple[list[float], str]:
    """Each task's reference accuracy (grownfx.run.targets.reference_accuracy): scratch's validation accuracy,
    from this comparison's scratch run when it is the same computation (same seed and epochs), else trained here
    once for every targeted method of this seed; with `best(scratch, finetune)`, fine-tune's when it learned the
    task (the same with and without keep_copies), read from a fine-tune run of this comparison or trained."""
    run_dir = out / slug("scratch") / f"seed{seed}"
    if _scratch_epochs_match(recipe) and _finished(run_dir):
        tasks = json.loads((run_dir / "summary.json").read_text())["tasks"]
        values, source = [float(t["val_acc"]) for t in tasks], "scratch run"
    else:
        values, source = scratch_targets(recipe, seed, progress), "scratch trained once for this comparison"
    rule = recipe.target.rule
    if "finetune" not in target_sources(rule):
        return [T.reference_accuracy(rule, v, None) for v in values], source
    ft = [out / slug(s) / f"seed{seed}" for s in specs if parse_method_spec(s)[0] == "finetune"]
    ft = [d for d in ft if _finished(d)]
    if ft:
        tasks = json.loads((ft[0] / "summary.json").read_text())["tasks"]
        fine, where = [float(t["val_acc"]) for t in tasks], "fine-tune run"
    else:
        fine = T.finetune_references(recipe.model_copy(update={"seed": seed}),
                                     progress.epoch if progress is not None else None)
        where = "fine-tune trained once"
    return [T.reference_accuracy(rule, a, b) for a, b in zip(values, fine)], f"best of {source} and {where}"


def _index(out: Path, recipe: Recipe, specs: list[str], seeds: Sequence[int]) -> dict:
    """compare.json's content: a new one, or the folder's own extended (a comparison can grow over calls)."""
    index = {"recipe": recipe.name, "methods": [], "seeds": [], "target_rule": recipe.target.rule, "runs": [],
             "targets": {}, "recipe_config": recipe.model_dump(mode="json")}
    path = out / "compare.json"
    old = None
    if path.is_file():
        try:
            old = json.loads(path.read_text())
        except ValueError:  # torn by an older grownfx's in-place write: the run folders are the record
            old = None
    if old is not None:
        if _what_is_learned(old.get("recipe_config", {})) != _what_is_learned(index["recipe_config"]):
            raise RunError(f"{out} holds a comparison of another recipe; choose another out_dir")
        index.update(methods=old["methods"], seeds=old["seeds"], runs=old["runs"], targets=old.get("targets", {}))
    index["methods"] = sorted(dict.fromkeys(index["methods"] + specs), key=lambda s: s != "scratch")
    index["seeds"] = list(dict.fromkeys(index["seeds"] + list(seeds)))
    return index


def _what_is_learned(config: dict) -> dict:
    return {k: v for k, v in config.items() if k not in ("output", "description", "code_dir")}


def _write(out: Path, index: dict) -> None:
    atomic_write_text(json.dumps(index, indent=1), out / "compare.json")
