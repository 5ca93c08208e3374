"""`grownfx compare`: one recipe, several methods and seeds, the same stream, schedule and validation split.

    run_compare("digits_quickstart", ["scratch", "finetune", "pnn", "grown", "grown[+lsg]"], seeds=[0, 1])

writes one run folder per method and seed (`<out>/<method>/seed<k>/`, each a normal `grownfx run` folder) and
`<out>/compare.json` listing them; `grownfx report <out>` turns that into the paper's tables.

Seeds vary one thing at a time: `seeds` are training seeds (initialisation, batches, masks, growth) and the data
(class order, hold-outs, low-data subsets) stays at the recipe's data seed (`data.seed`, or its `seed` when the
recipe sets none); `data_seeds` varies the data instead (or as well: every pair is run).  A run whose data seed
differs from its training seed lives in `<method>/seed<k>-data<d>/`; `seed<k>` is training and data seed k, which
is also what a comparison made before data seeds existed holds.

Methods: every name of grownfx.recipe.schema.METHODS (scratch, finetune, pnn, grow, packnet, piggyback, cpg, grown,
ewc, si, mas, lwf, er, den, apd), and GROWN's ablation rows
grown[grow_only], grown[+selective_mask], grown[+lsg], grown[+retrain_released] (the paper's Table 5).
A method the recipe itself names keeps the recipe's settings for it; the others take their defaults.

Scratch targets are trained once per seed: GROWN and CPG use "the validation accuracy of a full backbone
trained from scratch" as their target; that is exactly what the `scratch` run computes (same seed, same
function), so when `scratch` is in the comparison with the same epochs its validation accuracies become the
targets of the other runs (as a per-task list), else they are computed once per seed here.
"""

from __future__ import annotations

import json
import signal
import time
from pathlib import Path
from typing import Callable, Optional, Sequence

import torch

from grownfx.data import data_seed, stream_for
from grownfx.files import atomic_write_text
from grownfx.learn.training import resolve_device
from grownfx.recipe.loading import load_recipe, validate_recipe
from grownfx import files
from grownfx.learn.guards import NonFiniteError
from grownfx.report.formats import CompareIndex, Summary, read_model
from grownfx.run.export import export_complete, task_folder
from grownfx.run.folder import RunError, _lock, holds_run
from grownfx.run.runner import RunInterrupted, run
from grownfx.run import targets as T
from grownfx.recipe.schema import ABLATIONS, METHODS, Recipe, parse_method_spec, target_sources

__all__ = ["ABLATIONS", "METHODS", "method_config", "run_compare", "run_folder", "seeded", "slug"]


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


def run_folder(seed: int, data: int) -> str:
    """A run's folder under its method: `seed<k>` when training and data seed are both k (what every comparison
    held before data seeds were separate), else `seed<k>-data<d>`."""
    return f"seed{seed}" if seed == data else f"seed{seed}-data{data}"


def seeded(recipe: Recipe, seed: int, data: Optional[int] = None) -> Recipe:
    """`recipe` with training seed `seed` and, when given, data seed `data` (else its own data seed rule)."""
    d = recipe.model_dump(mode="json")
    d["seed"] = seed
    if data is not None:
        d["data"]["seed"] = data
    return Recipe.model_validate(d)


def _variant(recipe: Recipe, spec: str, seed: int, run_dir: Path, targets: Optional[list[float]],
             data: Optional[int] = None) -> Recipe:
    d = seeded(recipe, seed, data).model_dump(mode="json")
    name = f"{recipe.name}-{slug(spec)}-s{seed}" + ("" if data in (None, seed) else f"-d{data}")
    d.update(name=name, method=method_config(recipe, spec))
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
        s = read_model(summary, Summary)
    except files.CorruptFileError:  # torn (an older grownfx wrote in place) or edited: resume, which rewrites it
        return False
    done = len(s.get("tasks", [])) == s.get("num_tasks", -1)
    if done and export_format != "none":
        return export_complete(task_folder(run_dir, len(s["tasks"]) - 1), export_format)
    return done


def run_compare(recipe_or_path, methods: list[str], seeds: list[int] = [0], overrides=(),  # noqa: B006
                out_dir=None, equal_budget: Optional[int] = None, progress=None,
                echo: Optional[Callable[[str], None]] = None, data_seeds: Optional[list[int]] = None) -> Path:
    """Run every method on every seed (same stream, schedule, validation split); returns the comparison folder.

    `seeds`: training seeds; `data_seeds`: data seeds (default: the recipe's own, `data.seed` or else its `seed`,
    fixed across `seeds`).  Every (training seed, data seed) pair runs.

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
    data_seeds = list(dict.fromkeys(data_seeds if data_seeds else [data_seed(recipe)]))
    if not specs or not seeds:
        raise ValueError("give at least one method and one seed")
    for spec in specs:  # every variant must validate before hours of training start
        _variant(recipe, spec, seeds[0], Path("."), None, data_seeds[0])
    # scratch (and fine-tune) first: their validation accuracies are the targets
    specs.sort(key=lambda s: (s != "scratch", parse_method_spec(s)[0] != "finetune"))
    out, lock = _claim(recipe, out_dir, echo)
    try:
        return _compare(recipe, specs, [(s, d) for d in data_seeds for s in dict.fromkeys(seeds)], out, progress,
                        echo)
    except KeyboardInterrupt as exc:  # the comparison folder is what continues (its runs resume themselves)
        if isinstance(exc, RunInterrupted) and exc.out_dir == out:
            raise
        raise RunInterrupted(out, getattr(exc, "signum", signal.SIGINT), checkpointed=True) from None
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
        old = read_model(path, CompareIndex)
    except files.CorruptFileError:
        return False  # a torn compare.json (an older grownfx wrote it in place) is rewritten
    return _what_is_learned(old.get("recipe_config", {})) != _what_is_learned(recipe.model_dump(mode="json"))


def _compare(recipe: Recipe, specs: list[str], pairs: Sequence[tuple[int, int]], out: Path, progress=None,
             echo: Callable[[str], None] = print) -> Path:
    """Every method on every (training seed, data seed) pair."""
    out.mkdir(parents=True, exist_ok=True)
    rule = recipe.target.rule
    index = _index(out, recipe, specs, pairs)
    wants = isinstance(rule, str) and any(parse_method_spec(s)[0] in T.TARGETED for s in specs)
    failures = []
    for seed, data in pairs:
        label = _label(seed, data)
        targets: Optional[list[float]] = None
        for spec in specs:
            name, _ = parse_method_spec(spec)
            if wants and targets is None and name in T.TARGETED:
                try:
                    references, source = _references(recipe, seed, out, specs, progress, data)
                except NonFiniteError as exc:  # no target: never let a diverged reference set one
                    entry = _record_failure(out, index, spec, seed, data,
                                            f"no target: the reference diverged ({exc})")
                    failures.append(f"{spec} {label}: {entry['error']}")
                    continue
                targets = [T.task_target(rule, t, ref) for t, ref in enumerate(references)]
                index["targets"][_target_key(seed, data)] = {"values": targets, "source": source, "seed": seed,
                                                             "data_seed": data}
            entry = _run_one(recipe, spec, seed, data, out, targets, index, progress, echo)
            if entry["status"] != "ok":
                failures.append(f"{spec} {label}: {entry['error']}")
    if failures:
        raise RuntimeError(f"{len(failures)} run(s) failed (see {out / 'compare.json'}):\n" + "\n".join(failures))
    return out


def _label(seed: int, data: int) -> str:
    return f"seed {seed}" if seed == data else f"seed {seed}, data seed {data}"


def _target_key(seed: int, data: int) -> str:
    return str(seed) if seed == data else f"{seed}-data{data}"


def _same_run(entry: dict, spec: str, seed: int, data: int) -> bool:
    # an entry written before data seeds were separate ran with its data seed equal to its seed
    return (entry["method"], entry["seed"], entry.get("data_seed", entry["seed"])) == (spec, seed, data)


def _record_failure(out: Path, index: dict, spec: str, seed: int, data: int, error: str) -> dict:
    entry = {"method": spec, "seed": seed, "data_seed": data, "dir": str(Path(slug(spec)) / run_folder(seed, data)),
             "status": "failed", "error": error}
    index["runs"] = [r for r in index["runs"] if not _same_run(r, spec, seed, data)] + [entry]
    _write(out, index)
    return entry


def _run_one(recipe: Recipe, spec: str, seed: int, data: int, out: Path, targets, index: dict, progress=None,
             echo: Callable[[str], None] = print) -> dict:
    """Run (or reuse, or resume) one method on one (training seed, data seed); record it in compare.json."""
    run_dir = out / slug(spec) / run_folder(seed, data)
    before = next((r for r in index["runs"] if _same_run(r, spec, seed, data)), {})
    entry = {"method": spec, "seed": seed, "data_seed": data, "dir": str(run_dir.relative_to(out)), "status": "ok"}
    start = time.perf_counter()
    try:
        if _finished(run_dir, recipe.output.export_format):
            entry.update(reused=True, wall_s=before.get("wall_s"))
        else:
            # an explicit folder (never renumbered); resumed when it holds a run, even one killed before its
            # first checkpoint (the runner starts that one again)
            run(_variant(recipe, spec, seed, run_dir, targets, data), out_dir=run_dir, resume=holds_run(run_dir),
                progress=progress, echo=lambda msg: echo(f"[{spec} {_label(seed, data)}] {msg}"))
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


def _references(recipe: Recipe, seed: int, out: Path, specs: Sequence[str] = (), progress=None,
                data: Optional[int] = None) -> tuple[list[float], str]:
    """Each task's reference accuracy (grownfx.run.targets.reference_accuracy): scratch's validation accuracy,
    from this comparison's scratch run when it is the same computation (same seeds and epochs), else trained here
    once for every targeted method of this seed pair; with `best(scratch, finetune)`, fine-tune's when it learned
    the task (the same with and without keep_copies), read from a fine-tune run of this comparison or trained.
    `data`: the data seed (None: the recipe's rule with training seed `seed`)."""
    pinned = seeded(recipe, seed, data)
    folder = run_folder(seed, data_seed(pinned))
    run_dir = out / slug("scratch") / folder
    if _scratch_epochs_match(recipe) and _finished(run_dir):
        tasks = read_model(run_dir / "summary.json", Summary)["tasks"]
        values, source = [float(t["val_acc"]) for t in tasks], "scratch run"
    else:
        values, source = scratch_targets(pinned, seed, progress), "scratch trained once for this comparison"
    rule = recipe.target.rule
    if "finetune" not in target_sources(rule):
        return [T.reference_accuracy(rule, v, None) for v in values], source
    ft = [out / slug(s) / folder for s in specs if parse_method_spec(s)[0] == "finetune"]
    ft = [d for d in ft if _finished(d)]
    if ft:
        tasks = read_model(ft[0] / "summary.json", Summary)["tasks"]
        fine, where = [float(t["val_acc"]) for t in tasks], "fine-tune run"
    else:
        fine = T.finetune_references(pinned, progress.epoch if progress is not None else None)
        where = "fine-tune trained once"
    return [T.reference_accuracy(rule, a, b) for a, b in zip(values, fine)], f"best of {source} and {where}"


def _index(out: Path, recipe: Recipe, specs: list[str], pairs: Sequence[tuple[int, int]]) -> dict:
    """compare.json's content: a new one, or the folder's own extended (a comparison can grow over calls).
    `seeds` and `data_seeds` list the training and data seeds run so far (an index written before data seeds
    were separate ran each seed on its own data seed)."""
    index = {"recipe": recipe.name, "methods": [], "seeds": [], "data_seeds": [], "target_rule": recipe.target.rule,
             "runs": [], "targets": {}, "recipe_config": recipe.model_dump(mode="json")}
    path = out / "compare.json"
    old = None
    if path.is_file():
        try:
            old = read_model(path, CompareIndex)
        except files.CorruptFileError:  # torn or edited: the run folders are the record
            old = None
    if old is not None:
        if _what_is_learned(old.get("recipe_config", {})) != _what_is_learned(index["recipe_config"]):
            raise RunError(f"{out} holds a comparison of another recipe; choose another out_dir")
        index.update(methods=old["methods"], seeds=old["seeds"], runs=old["runs"], targets=old.get("targets", {}),
                     data_seeds=old.get("data_seeds", list(old["seeds"])))
    index["methods"] = sorted(dict.fromkeys(index["methods"] + specs), key=lambda s: s != "scratch")
    index["seeds"] = list(dict.fromkeys(index["seeds"] + [s for s, _ in pairs]))
    index["data_seeds"] = list(dict.fromkeys(index["data_seeds"] + [d for _, d in pairs]))
    return index


def _what_is_learned(config: dict) -> dict:
    return {k: v for k, v in config.items() if k not in ("output", "description", "code_dir")}


def _write(out: Path, index: dict) -> None:
    atomic_write_text(json.dumps(index, indent=1), out / "compare.json")
