"""The `grownfx` command line: run, validate, inspect, report, compare and export GROWN continual learning runs."""

from __future__ import annotations

import difflib
import functools
import signal
import sys
import traceback
from pathlib import Path
from typing import Any, Callable, List, Optional

import typer
from rich.markup import escape
from rich.table import Table


from grownfx.cli.help_style import Command, Group, err_console, out_console
from grownfx.cli.tables import compare_table, results_table, summary_table
from grownfx.errors import EXIT_BUG, Interrupted, UserError, exit_code, message_lines


app = typer.Typer(
    cls=Group, name="grownfx", no_args_is_help=True, add_completion=False, pretty_exceptions_enable=False,
    help="GROWN (grow only when necessary) continual learning for any torchvision backbone.\n\n"
         "Start with:  grownfx run digits_quickstart",
)
command = functools.partial(app.command, cls=Command)
_state = {"debug": False}


@app.callback()
def _global(debug: bool = typer.Option(False, "--debug", help="Show full tracebacks for unexpected errors.")):
    _state["debug"] = debug


def _terminated(signum, frame) -> None:
    raise Interrupted(signum)


def main() -> None:
    """Console-script entry point (`grownfx`)."""
    signal.signal(signal.SIGTERM, _terminated)  # SIGTERM: like Ctrl-C, one line and exit 143, not a silent death
    try:
        app()
    except SystemExit as exc:
        # Only a process that loaded grownfx.learn.distributed can hold a process group; importing it here for
        # every command would pull in torch (`grownfx --help` must not).
        dist = sys.modules.get("grownfx.learn.distributed")
        if dist is not None and dist.launched():  # a torchrun worker: leave without C++ finalisers (gloo aborts)
            dist.exit_worker(exc.code)
        raise


# --- error handling ---------------------------------------------------------------------------------------


def guarded(fn: Callable) -> Callable:
    """Run a command under grownfx's one error style (grownfx.errors): a UserError is `error: ...` and exit 2,
    SIGINT/SIGTERM one line and exit 130/143, anything else `error: Type: ...` and exit 1 (the traceback with
    --debug)."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except (typer.Exit, typer.Abort, typer.BadParameter.__mro__[1]):  # typer's own (Exit, Abort, UsageError)
            raise
        except KeyboardInterrupt as exc:
            for line in message_lines(exc):
                err_console().print(f"[yellow]{escape(line)}[/]")
            raise typer.Exit(exit_code(exc))
        except Exception as exc:  # noqa: BLE001 - the CLI's last line of defence
            if _state["debug"] and not isinstance(exc, UserError):
                err_console().print(escape(traceback.format_exc()))
                raise typer.Exit(EXIT_BUG)
            for line in message_lines(exc):
                err_console().print(f"[red bold]error:[/] [red]{escape(line.removeprefix('error: '))}[/]")
            if not isinstance(exc, UserError):
                err_console().print("[dim]rerun with --debug (grownfx --debug ...) for the traceback[/]")
            raise typer.Exit(exit_code(exc))

    return wrapper


def _lazy(module: str, attr: str) -> Callable:
    """A function from a module written elsewhere in grownfx, with a clear message when it is missing."""
    try:
        mod = __import__(module, fromlist=[attr])
    except ModuleNotFoundError as exc:
        if exc.name and module.startswith(exc.name):
            raise RuntimeError(f"{module} is not part of this grownfx build (missing {module}.{attr})") from None
        raise
    if not hasattr(mod, attr):
        raise RuntimeError(f"{module} has no {attr} in this grownfx build")
    return getattr(mod, attr)


_RECIPE_ARG = typer.Argument(..., help="A recipe file, or the name of a built-in recipe (see `grownfx ls`).")
_OVERRIDES_ARG = typer.Argument(None, help="Overrides: key.sub=value, +key.sub=value (add), ~key.sub (delete).",
                                show_default=False)
_TRUST = typer.Option(False, "--trust", help="Run code that a run folder's files name (a model builder "
                      "`module:callable`, a torch.hub reference). Only for folders from someone you trust; "
                      "GROWNFX_TRUST=1 does the same for scripts. (docs/outputs.md#trust)")
_NO_VERIFY = typer.Option(False, "--no-verify", help="Load a checkpoint (or a model.weights file) whose checksum "
                          "file (.sha256) is missing or unreadable, unchecked (a checksum that does not match is refused either way).")


# --- commands ---------------------------------------------------------------------------------------------


@command(epilog="Example: grownfx run digits_quickstart training.epochs=3 --out runs/quick\n\n"
                "Several processes (data-parallel, one per GPU): grownfx run RECIPE --nproc-per-node 4, or "
                "torchrun --nproc-per-node 4 -m grownfx run RECIPE (docs/distributed.md)\n\n"
                "Ctrl-C or SIGTERM: the current epoch ends, a checkpoint is written, exit 130 (SIGINT) or 143 "
                "(SIGTERM); --resume continues.")
@guarded
def run(recipe: str = _RECIPE_ARG, overrides: Optional[List[str]] = _OVERRIDES_ARG,
        out: Optional[Path] = typer.Option(None, "--out", help="Run folder (default: the recipe's output.dir, or "
                                           "output.dir-2, -3, ... when that holds a run; must be empty or new)."),
        resume: bool = typer.Option(False, "--resume", help="Continue the run in the folder from its checkpoint "
                                    "(without --out: the recipe's latest run)."),
        verbose: bool = typer.Option(False, "--verbose", "-v", help="Without a terminal (logs, CI): a line per "
                                     "epoch, not only per task and stage."),
        nproc_per_node: Optional[int] = typer.Option(
            None, "--nproc-per-node", min=1,
            help="Train data-parallel in N processes on this machine (one per GPU), launched through "
                 "torch.distributed.run; the recipe's batch size is global. For several machines use torchrun."),
        trust: bool = _TRUST, no_verify: bool = _NO_VERIFY):
    """Run a recipe: learn its tasks one after the other, writing checkpoints, metrics and exports."""
    from grownfx.recipe.loading import load_recipe

    _warn_shadowed(recipe)
    # recipe errors (a missing dataset folder among them) are reported here, once, before any launch and before
    # torch is imported (seconds on a laptop)
    rec = load_recipe(recipe, overrides or [], trust=trust or None, verify=not no_verify)
    from grownfx.learn import distributed
    from grownfx.report.progress import progress

    if nproc_per_node is not None and nproc_per_node > 1:
        if distributed.launched():
            raise UserError("--nproc-per-node: this process was already launched by torchrun; drop the option")
        _lazy("grownfx.run.runner", "check_distributed")(rec, nproc_per_node)  # one clear error, before launching
        argv = (["--debug"] if _state["debug"] else []) + ["run", recipe, *(overrides or [])]
        argv += (["--out", str(out)] if out is not None else []) + (["--resume"] if resume else [])
        argv += (["--verbose"] if verbose else []) + (["--trust"] if trust else [])
        argv += ["--no-verify"] if no_verify else []
        raise typer.Exit(distributed.launch(argv, nproc_per_node))
    if no_verify and resume:
        _warn_no_verify()
    main_rank = distributed.env_rank() == 0  # under torchrun only rank 0 prints and shows progress
    run_fn = _lazy("grownfx.run.runner", "run")
    with progress(0, enabled=main_rank, verbose=verbose) as bars:
        try:
            result = run_fn(rec, out_dir=out, resume=resume, progress=bars, echo=bars.log, verify=not no_verify)
        except KeyboardInterrupt as exc:
            folder = getattr(exc, "out_dir", None)
            if folder is None or not main_rank:
                raise
            bars.__exit__(None, None, None)
            again = ["--resume"] if getattr(exc, "checkpointed", True) or getattr(exc, "started", True) else []
            flags = (["--trust"] if trust else []) + (["--no-verify"] if no_verify else [])
            _interrupted(exc, _command_line("run", recipe, overrides, "--out", str(folder), *again, *flags))
        except UserError as exc:
            if resume and str(exc).startswith("nothing to resume"):  # the runner's RunError: say what to do
                start = _command_line("run", recipe, overrides, *(["--out", str(out)] if out else []))
                raise UserError(f"{exc}. Nothing was learned yet: start it with `{start}` (without --resume)") \
                    from None
            raise
    if not main_rank:
        return
    summary = getattr(result, "summary", {}) or {}
    out_dir = getattr(result, "out_dir", out)
    if summary.get("tasks"):
        out_console().print(results_table(summary))
    avg = summary.get("avg_acc")
    accuracy = f", average accuracy {avg:.2f} %" if avg is not None else ""
    out_console().print(f"[green]done[/]: {escape(str(out_dir))}{accuracy}")
    out_console().print(f"report: grownfx report {escape(str(out_dir))}", soft_wrap=True)


@command(epilog="Example: grownfx validate my_recipe.yaml training.epochs=3 --no-data-check")
@guarded
def validate(recipe: str = _RECIPE_ARG, overrides: Optional[List[str]] = _OVERRIDES_ARG,
             no_data_check: bool = typer.Option(False, "--no-data-check",
                                                help="Do not check that dataset folders exist."),
             trust: bool = _TRUST, no_verify: bool = _NO_VERIFY):
    """Check a recipe (and overrides) without running it: print a summary, or every error with its line."""
    from grownfx.recipe.loading import load_recipe

    _warn_shadowed(recipe)
    rec = load_recipe(recipe, overrides or [], check_data=not no_data_check, trust=trust or None,
                      verify=not no_verify)
    con = out_console()
    con.print("[green bold]ok[/]")
    con.print(summary_table(rec))
    from grownfx.recipe.checks import recipe_warnings

    for line in recipe_warnings(rec):
        err_console().print(f"[yellow]warning:[/] {escape(line)}")


@app.command(epilog="Examples: grownfx schema | less\n\ngrownfx schema --out docs/recipe.md")
@guarded
def schema(out: Optional[Path] = typer.Option(None, "--out", help="Write the reference to this file instead of "
                                              "printing it.")):
    """The recipe reference: every field of a recipe with its type, default, the methods that read it and what it
    means (markdown; docs/recipe.md is this output)."""
    from grownfx.recipe.reference import reference_markdown

    text = reference_markdown()
    if out is None:
        sys.stdout.write(text)
        return
    from grownfx.files import atomic_write_text

    atomic_write_text(text, out)
    out_console().print(f"wrote {escape(str(out))}")


def _warn_shadowed(recipe: str) -> None:
    """A bare recipe name runs the built-in recipe even when ./NAME.yaml is here: say which one runs."""
    from grownfx.recipe.loading import shadowed_recipe_warning

    warning = shadowed_recipe_warning(recipe)
    if warning:
        err_console().print(f"[yellow]warning:[/] {escape(warning)}")


def _command_line(*args: Any) -> str:
    """The grownfx command line that runs `args` (each quoted for a POSIX shell where it needs it)."""
    import shlex

    flat = [str(a) for arg in args for a in (arg if isinstance(arg, (list, tuple)) else [arg]) if a is not None]
    return shlex.join(["grownfx", *flat])


def _interrupted(exc: BaseException, command: str) -> None:
    """SIGINT (Ctrl-C) or SIGTERM stopped a run or a comparison (a RunInterrupted naming its folder): what was kept
    and the exact command that continues it, then exit 130 (SIGINT) or 143 (SIGTERM)."""
    name = exc.signal_name if isinstance(exc, Interrupted) else "SIGINT"
    if getattr(exc, "checkpointed", True):
        head = f"interrupted ({name}): the last checkpoint is in {exc.out_dir}; continue with:"
    else:
        head = f"interrupted ({name}) before the first checkpoint (nothing learned yet); start it again with:"
    err_console().print(f"[yellow]{escape(head)}[/]")
    err_console().print(f"  {escape(command)}", soft_wrap=True)
    raise typer.Exit(exit_code(exc))


@command("ls", epilog="Example: grownfx ls")
@guarded
def ls_():
    """List the built-in recipes with their descriptions."""
    from grownfx.recipe.loading import builtin_recipes_dir, list_builtin_recipes

    table = Table(title=f"built-in recipes ({escape(str(builtin_recipes_dir()))})")
    table.add_column("name", style="bold")
    table.add_column("description")
    for name, desc in list_builtin_recipes().items():
        table.add_row(name, escape(desc))
    out_console().print(table)


@command("cp", epilog="Examples: grownfx cp digits_quickstart   (writes ./digits_quickstart.yaml)\n\n"
                          "grownfx cp digits_quickstart my_recipe.yaml")
@guarded
def cp_(name: str = typer.Argument(..., help="A built-in recipe name (see `grownfx ls`)."),
        dest: Path = typer.Argument(Path("."), help="Destination file, or a folder to copy it into "
                                    "(default: NAME.yaml in the current folder).", show_default=False),
        force: bool = typer.Option(False, "--force", help="Overwrite an existing file.")):
    """Copy a built-in recipe to edit it."""
    from grownfx.recipe.loading import RecipeError, builtin_recipes_dir, list_builtin_recipes

    src = builtin_recipes_dir() / f"{name.removesuffix('.yaml')}.yaml"
    if not src.is_file():
        names = list(list_builtin_recipes())
        close = difflib.get_close_matches(name.removesuffix(".yaml"), names, n=1, cutoff=0.6)
        hint = f"did you mean {close[0]!r}? " if close else ""
        raise RecipeError([f"no built-in recipe {name!r}; {hint}built-in recipes: {', '.join(names)}"])
    target = dest / src.name if dest.is_dir() else dest
    if target.exists() and not force:
        # Running the same `cp` twice just works; a copy the user has edited is never overwritten silently.
        if target.is_file() and target.read_bytes() == src.read_bytes():
            out_console().print(f"{escape(str(target))} is already a copy of {src.stem}")
            return
        raise UserError(f"{target} exists and differs from {src.stem} (your edits?); pass --force to overwrite it")
    from grownfx.files import atomic_write_bytes

    atomic_write_bytes(src.read_bytes(), target)
    out_console().print(f"copied {src.stem} to {escape(str(target))}")


@command(epilog="Examples: grownfx inspect resnet18 --seed-width 0.5\n\n"
                    "grownfx inspect vgg16bn_cifar100_superclass20 --json groups.json")
@guarded
def inspect(target: str = typer.Argument(..., help="A recipe (file or built-in name), a run folder, or a model "
                                         "builder name (torchvision like resnet18, grownfx like lenet5, or "
                                         "module:callable)."),
            seed_width: Optional[float] = typer.Option(None, "--seed-width", help="Seed width (default: the "
                                                       "recipe's, or 0.5)."),
            input_shape: Optional[str] = typer.Option(None, "--input-shape", help="One input's shape, any rank: "
                                                      "C,H,W (images), C,L (sequences), F (tabular), C,T,H,W "
                                                      "(clips). Default: from the recipe's data, or the grownfx "
                                                      "builder's own (small_cnn 1,8,8); else 3,224,224."),
            json_file: Optional[Path] = typer.Option(None, "--json", help="Also write the data as JSON here."),
            trust: bool = _TRUST):
    """Show how grownfx sees a backbone: coupling groups (what grows together), growth sites, parameters."""
    from grownfx.cli.inspect_model import inspect_data, render

    shape = _parse_shape(input_shape) if input_shape else None
    data = inspect_data(target, seed_width=seed_width, input_shape=shape, trust=trust or None)
    tree, footer = render(data)
    out_console().print(tree)
    for line in footer:
        out_console().print(line, soft_wrap=True)
    if json_file is not None:
        from grownfx.files import atomic_write_json

        atomic_write_json(data, json_file)
        out_console().print(f"wrote {escape(str(json_file))}")


def _warn_no_verify() -> None:
    err_console().print("[yellow]warning:[/] --no-verify: a checkpoint without its checksum file is loaded unchecked")


def _check_run_dir(run_dir: Path) -> None:
    if not run_dir.exists():
        raise UserError(f"{run_dir} does not exist (`grownfx run` prints the run folder it writes)")
    if not run_dir.is_dir():
        raise UserError(f"{run_dir} is a file, not a run folder")


def _parse_shape(text: str) -> tuple[int, ...]:
    try:
        shape = tuple(int(v) for v in text.replace("x", ",").split(",") if v.strip())
    except ValueError:
        shape = ()
    if not shape or min(shape) < 1:
        raise UserError(f"--input-shape: expected one input's sizes, comma-separated: C,H,W like 3,32,32 for images, "
                        f"C,L like 2,128 for sequences, F like 12 for tabular rows; got {text!r}")
    return shape


@command(epilog="Example: grownfx export runs/digits_quickstart --task 1 --format onnx --verify\n\n"
                    "Tasks count from 1, as in the console, the report and exports/task_1/.\n\n"
                    "grownfx export runs/digits_quickstart --all-tasks: every task in one file "
                    "(exports/all_tasks/), served with torch alone.")
@guarded
def export(run_dir: Path = typer.Argument(..., help="A run folder."),
           task: Optional[int] = typer.Option(None, "--task",
                                              help="Task number, counting from 1 (exports/task_1/...)."),
           all_tasks: bool = typer.Option(
               False, "--all-tasks",
               help="Every finished task in one file sharing the weight bank (exports/all_tasks/model.pt, with "
                    "its torch-only loader multitask.py: load(path)(x, task=t), t from 0)."),
           fmt: str = typer.Option("pt2", "--format", help="pt2, onnx or torchscript."),
           verify: bool = typer.Option(False, "--verify", help="Check the exported model against the run's."),
           bake_preprocessing: bool = typer.Option(
               False, "--bake-preprocessing",
               help="Put the input scaling and normalisation into the graph: the file then takes raw inputs "
                    "(meta.json says which a file expects)."),
           trust: bool = _TRUST, no_verify: bool = _NO_VERIFY):
    """Export the subnetwork of one task as a standalone model (torch.export, ONNX or TorchScript), or every task
    in one multi-task file (--all-tasks)."""
    if all_tasks:
        if task is not None:
            raise UserError("--all-tasks exports every task: leave out --task")
        if fmt != "pt2":
            raise UserError(f"--all-tasks writes its own format (torch.export programs sharing one weight bank); "
                            f"--format {fmt} is for one task (--task)")
        _check_run_dir(run_dir)
        if no_verify:
            _warn_no_verify()
        path, meta = _lazy("grownfx.run.export", "export_all_tasks")(
            run_dir, verify, bake_preprocessing=bake_preprocessing, trust=trust or None, check_sha256=not no_verify)
        out_console().print(f"exported {len(meta['tasks'])} task(s) in one file: {escape(str(path))} "
                            f"({meta['bytes'] / 1e6:.2f} MB, {meta['size_ratio']:.3f}x bank + per-task state + "
                            f"masks); load it with {escape(str(path.parent / meta['loader']))}", soft_wrap=True)
        if verify and meta.get("verified_max_rel_error") is not None:
            out_console().print(f"verified: max relative error {meta['verified_max_rel_error']:.1e} against the "
                                "run's task-aware model (limit 1e-5)", soft_wrap=True)
        return
    if task is None:
        raise UserError("give --task N (counting from 1) or --all-tasks")
    if fmt not in ("pt2", "onnx", "torchscript"):
        close = difflib.get_close_matches(fmt, ["pt2", "onnx", "torchscript"], n=1, cutoff=0.5)
        raise UserError(f"--format: {f'did you mean {close[0]!r}? ' if close else ''}"
                        f"the formats are pt2, onnx and torchscript, got {fmt!r}")
    _check_run_dir(run_dir)
    if task < 1:
        raise UserError(f"--task counts from 1 (the first task is --task 1, exports/task_1/); got {task}")
    if no_verify:
        _warn_no_verify()
    result = _lazy("grownfx.run.export", "export_run")(run_dir, task - 1, fmt, verify,
                                                       bake_preprocessing=bake_preprocessing, trust=trust or None,
                                                       check_sha256=not no_verify)
    path, entry = result if isinstance(result, tuple) else (result, {})
    inputs = "raw inputs" if bake_preprocessing else "preprocessed inputs (see preprocessing in meta.json)"
    out_console().print(f"exported task {task} as {fmt}: {escape(str(path))} (takes {inputs})", soft_wrap=True)
    if verify and entry.get("verified_max_rel_error") is not None:
        out_console().print(f"verified: max relative error {entry['verified_max_rel_error']:.1e} against the "
                            "run's task-aware model (limit 1e-4)", soft_wrap=True)


@command(epilog="Example: grownfx report runs/digits_quickstart")
@guarded
def report(run_dir: Path = typer.Argument(..., help="A run folder, or a folder written by `grownfx compare`.")):
    """Write tables (markdown, CSV) and plots for a run, in the seed paper's formats, to RUN_DIR/report."""
    if not run_dir.exists():
        raise UserError(f"{run_dir} does not exist (`grownfx run` and `grownfx compare` print the folder they "
                        "write)")
    if not (run_dir / "summary.json").is_file() and not (run_dir / "compare.json").is_file():
        raise UserError(f"{run_dir} is not a run folder (no summary.json) nor a comparison folder (no compare.json)")
    if (run_dir / "compare.json").is_file():
        where = _lazy("grownfx.report.compare_report", "write_compare_report")(run_dir)
    else:
        from grownfx.report.run_report import write_report

        where = write_report(run_dir)
    folder = Path(where)
    folder = folder.parent if folder.is_file() else folder
    out_console().print(f"report written to {escape(str(folder))}/")
    for f in sorted(folder.glob("*")):
        out_console().print(f"  {escape(f.name)}")


@command(epilog="Example: grownfx compare digits_quickstart --methods grown,scratch,packnet --seeds 0,1,2")
@guarded
def compare(recipe: str = _RECIPE_ARG, overrides: Optional[List[str]] = _OVERRIDES_ARG,
            methods: str = typer.Option(..., "--methods", help="Comma-separated method names."),
            seeds: str = typer.Option("0", "--seeds", help="Comma-separated training seeds (initialisation, "
                                      "batches, masks); the data stays at the recipe's data seed."),
            data_seeds: Optional[str] = typer.Option(None, "--data-seeds", help="Comma-separated data seeds (class "
                                                     "order, hold-outs, low-data subsets); default: the recipe's "
                                                     "data.seed, else its seed. With --seeds, every pair runs."),
            out: Optional[Path] = typer.Option(None, "--out", help="Comparison folder."),
            equal_budget: Optional[int] = typer.Option(None, "--equal-budget", min=1, help="Every method trains "
                                                       "exactly N epochs per task, all its phases together "
                                                       "(sets training.epoch_budget)."),
            trust: bool = _TRUST):
    """Run one recipe with several methods and seeds, then compare them (grownfx report DIR makes the tables).

    Methods: scratch, finetune, pnn, grow, packnet, piggyback, cpg, grown, ewc, si, mas, lwf, er, and the GROWN
    ablation rows grown\\[grow_only], grown\\[+selective_mask], grown\\[+lsg], grown\\[+retrain_released]; every
    variant is validated before any training starts.  --seeds varies the training seed with the data fixed,
    --data-seeds the data."""
    from grownfx.recipe.loading import load_recipe

    _warn_shadowed(recipe)
    rec = load_recipe(recipe, overrides or [], trust=trust or None)
    method_list = [m.strip() for m in methods.split(",") if m.strip()]
    try:
        seed_list = [int(s) for s in seeds.split(",") if s.strip()]
    except ValueError:
        raise UserError(f"--seeds: comma-separated integers like 0,1,2, got {seeds!r}") from None
    try:
        data_list = [int(s) for s in data_seeds.split(",") if s.strip()] if data_seeds is not None else None
    except ValueError:
        raise UserError(f"--data-seeds: comma-separated integers like 0,1,2, got {data_seeds!r}") from None
    if any(v < 0 for v in seed_list + (data_list or [])):
        raise UserError("--seeds/--data-seeds: seeds are integers >= 0")
    from grownfx.recipe.schema import ABLATIONS, METHODS, parse_method_spec

    valid = [*METHODS, "finetune[forgetting]", *(f"grown[{a}]" for a in ABLATIONS)]
    for m in method_list:  # a typo fails here, not after hours of training
        try:
            parse_method_spec(m)
        except ValueError as exc:
            close = difflib.get_close_matches(m, valid, n=1, cutoff=0.6)
            hint = f"did you mean {close[0]!r}? " if close else ""
            raise UserError(f"--methods: {hint}{exc}") from None
    from grownfx.report.progress import progress

    try:
        with progress(0) as bars:
            result = _lazy("grownfx.run.compare", "run_compare")(rec, methods=method_list, seeds=seed_list,
                                                                      out_dir=out, equal_budget=equal_budget,
                                                                      progress=bars, echo=bars.log,
                                                                      data_seeds=data_list)
    except KeyboardInterrupt as exc:
        folder = getattr(exc, "out_dir", None)
        if folder is None:
            raise
        budget = ["--equal-budget", str(equal_budget)] if equal_budget is not None else []
        budget += ["--data-seeds", data_seeds] if data_seeds is not None else []
        _interrupted(exc, _command_line("compare", recipe, overrides, "--methods", methods, "--seeds", seeds,
                                        *budget, "--out", str(folder), *(["--trust"] if trust else [])))
    table = compare_table(Path(result))
    if table is not None:
        out_console().print(table)
    out_console().print(f"[green]done[/]: {escape(str(result))}")
    out_console().print(f"report: grownfx report {escape(str(result))}", soft_wrap=True)


if __name__ == "__main__":
    main()
