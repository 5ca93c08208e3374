"""The `grownfx` command line (typer.testing.CliRunner) and the progress display."""

from __future__ import annotations

import io
import json
import subprocess
import sys
import types
from pathlib import Path

import pytest

from cli_helpers import fake_module, invoke
from grownfx.report.progress import Progress, progress
from grownfx.recipe.loading import builtin_recipes_dir

COMMANDS = ["run", "validate", "ls", "cp", "inspect", "export", "report", "compare"]



# --- validate / ls / cp ------------------------------------------------------------------------------------


def test_validate_good_recipe_prints_summary():
    result = invoke("validate", "digits_quickstart", "training.epochs=3")
    assert result.exit_code == 0, result.output
    out = result.output
    assert out.startswith("ok") and "small_cnn" in out and "digits" in out and "scratch - 1.0" in out
    assert "3 epochs" in out and "grown (full)" in out


def test_validate_bad_recipe_exits_2_with_located_errors(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: b\nmodel:\n  builder: small_cnn\n  seed_width: 1.5\ndata: {name: synthtic}\n")
    result = invoke("validate", str(bad), "training.epochs=-1")
    assert result.exit_code == 2
    assert f"{bad}:4: model.seed_width: Input should be less than or equal to 1 (got 1.5)" in result.output
    assert f"{bad}:5: data.name: unknown dataset 'synthtic'; did you mean 'synthetic'?" in result.output
    assert "override 'training.epochs=-1': training.epochs: Input should be greater than 0" in result.output
    assert "Traceback" not in result.output


def test_validate_data_check_switch(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    result = invoke("validate", "lenet_cifar100_split10")
    assert result.exit_code == 2 and f"data.root: dataset folder {tmp_path / 'data'}" in result.output
    assert invoke("validate", "lenet_cifar100_split10", "--no-data-check").exit_code == 0


def test_ls_lists_builtin_recipes():
    result = invoke("ls")
    assert result.exit_code == 0
    for name in ("digits_quickstart", "lenet_cifar100_split10", "resnet18_miniimagenet",
                 "vgg16bn_cifar100_superclass20"):
        assert name in result.output
    assert "One-minute CPU demo" in result.output


def test_cp_copies_and_refuses_to_overwrite(tmp_path):
    dest = tmp_path / "mine.yaml"
    assert invoke("cp", "digits_quickstart", str(dest)).exit_code == 0
    assert dest.read_text() == (builtin_recipes_dir() / "digits_quickstart.yaml").read_text()
    dest.write_text("edited")
    result = invoke("cp", "digits_quickstart", str(dest))
    assert result.exit_code != 0 and "--force" in result.output and dest.read_text() == "edited"
    assert invoke("cp", "digits_quickstart", str(dest), "--force").exit_code == 0
    assert dest.read_text().startswith("# A one-minute GROWN run")
    assert invoke("cp", "lenet_cifar100_split10", str(tmp_path)).exit_code == 0  # into a folder
    assert (tmp_path / "lenet_cifar100_split10.yaml").is_file()
    result = invoke("cp", "no_such_recipe", str(tmp_path / "x.yaml"))
    assert result.exit_code == 2 and "digits_quickstart" in result.output


# --- inspect -----------------------------------------------------------------------------------------------


def test_inspect_torchvision_model(tmp_path):
    out_json = tmp_path / "groups.json"
    result = invoke("inspect", "resnet18", "--seed-width", "0.5", "--input-shape", "3,32,32", "--json",
                    str(out_json))
    assert result.exit_code == 0, result.output
    out = result.output
    assert "growable coupling groups (12)" in out and "fixed coupling groups (2)" in out
    assert "group 3: width 64, seed width 32" in out and "layer1.0.conv1 (in)" in out
    assert "touches the network input" in out
    assert "parameters: full backbone 11,181,642, seed" in out and "growth sites: 12 of 12" in out
    data = json.loads(out_json.read_text())
    assert data["full_params"] == 11_181_642 and len(data["growth_sites"]) == 12
    growable = [g for g in data["groups"] if g["growable"]]
    assert data["groups"][: len(growable)] == growable, "growable groups come first"
    assert all(g["seed_width"] * 2 == g["width"] for g in growable)


def test_inspect_recipe_uses_its_settings():
    result = invoke("inspect", "lenet_cifar100_split10")
    assert result.exit_code == 0, result.output
    # the recipe sets model.seed_size 0.45 (a parameter fraction): the seed holds 0.45x the backbone's parameters
    assert "lenet5" in result.output and "input 3x32x32, seed width" in result.output and "(0.45x)" in result.output
    assert "growable coupling groups (4)" in result.output


def test_inspect_bad_input_shape():
    result = invoke("inspect", "resnet18", "--input-shape", "3,0")
    assert result.exit_code == 2 and "C,H,W" in result.output and "C,L" in result.output
    result = invoke("inspect", "resnet18", "--input-shape", "3,32")  # a valid shape, not this model's: it says so
    assert result.exit_code == 2 and "input of shape (1, 3, 32)" in result.output


# --- commands that call the lead's modules ------------------------------------------------------------------


def test_run_calls_the_runner(monkeypatch, tmp_path):
    calls = {}

    def run(recipe, out_dir=None, resume=False, progress=None, echo=None, verify=True):
        calls.update(recipe=recipe, out_dir=out_dir, resume=resume, verify=verify)
        progress.start_task(0, 1, "t0")
        echo("task 1: done")
        return types.SimpleNamespace(out_dir=out_dir, summary={"avg_acc": 97.5})

    fake_module(monkeypatch, "grownfx.run.runner", run=run)
    result = invoke("run", "digits_quickstart", "training.epochs=2", "--out", str(tmp_path / "r"), "--resume")
    assert result.exit_code == 0, result.output
    assert calls["recipe"].training.epochs == 2 and calls["out_dir"] == tmp_path / "r" and calls["resume"]
    assert "task 1: done" in result.output and "97.50" in result.output and calls["verify"]
    result = invoke("run", "digits_quickstart", "--out", str(tmp_path / "r"), "--resume", "--no-verify")
    assert result.exit_code == 0 and calls["verify"] is False and "warning: --no-verify" in result.output


def test_export_report_compare_call_through(monkeypatch, tmp_path):
    seen = {}
    def export_run(run_dir, task, fmt, verify, bake_preprocessing=False, trust=None, check_sha256=True):
        seen.update(export=(run_dir, task, fmt, verify, bake_preprocessing), trust=trust, check=check_sha256)
        return tmp_path / "model.onnx", {"verified_max_rel_error": 2e-7}

    fake_module(monkeypatch, "grownfx.run.export", export_run=export_run)
    result = invoke("export", str(tmp_path), "--task", "2", "--format", "onnx", "--verify")
    # --task counts from 1 like the console and exports/task_K; the Python API takes the 0-based index
    assert result.exit_code == 0 and seen["export"] == (tmp_path, 1, "onnx", True, False)
    assert "exported task 2 as onnx" in result.output and "max relative error 2.0e-07" in result.output
    result = invoke("export", str(tmp_path), "--task", "1", "--bake-preprocessing")
    assert seen["export"] == (tmp_path, 0, "pt2", False, True) and "takes raw inputs" in result.output
    assert seen["trust"] is None and seen["check"]  # untrusted unless GROWNFX_TRUST=1; checksums checked
    invoke("export", str(tmp_path), "--task", "1", "--trust", "--no-verify")
    assert seen["trust"] is True and seen["check"] is False
    assert invoke("export", str(tmp_path), "--task", "1", "--format", "tflite").exit_code == 2
    result = invoke("export", str(tmp_path), "--task", "0")
    assert result.exit_code == 2 and "--task counts from 1" in result.output and "Traceback" not in result.output

    (tmp_path / "compare.json").write_text("{}")
    fake_module(monkeypatch, "grownfx.report.compare_report",
                write_compare_report=lambda d: seen.update(compare_report=d) or d / "report")
    assert invoke("report", str(tmp_path)).exit_code == 0 and seen["compare_report"] == tmp_path

    def run_compare(recipe, methods, seeds, out_dir=None, equal_budget=None, progress=None, echo=None, data_seeds=None):
        seen["compare"] = (recipe.training.epochs, methods, seeds)
        seen["equal_budget"] = equal_budget
        return tmp_path

    fake_module(monkeypatch, "grownfx.run.compare", run_compare=run_compare)
    result = invoke("compare", "digits_quickstart", "--methods", "grown,scratch", "--seeds", "0,1",
                    "training.epochs=1")
    assert result.exit_code == 0, result.output
    assert seen["compare"] == (1, ["grown", "scratch"], [0, 1]) and seen["equal_budget"] is None
    assert invoke("compare", "digits_quickstart", "--methods", "grown", "--equal-budget", "3").exit_code == 0
    assert seen["equal_budget"] == 3
    result = invoke("compare", "digits_quickstart", "--methods", "grown,nope")
    assert result.exit_code == 2 and "unknown method 'nope'" in result.output


def test_report_on_a_run_folder(tmp_path):
    from tests.test_report import make_run

    result = invoke("report", str(make_run(tmp_path / "run")))
    assert result.exit_code == 0 and "report.md" in result.output and "acc_matrix.png" in result.output
    result = invoke("report", str(tmp_path))
    assert result.exit_code == 2 and "not a run folder" in result.output


# --- global error handling -----------------------------------------------------------------------------------


def _raising(exc):
    def fn(*_a, **_k):
        raise exc
    return fn


@pytest.mark.parametrize("exc, code, text", [
    (KeyboardInterrupt(), 130, "interrupted"),
    (RuntimeError("boom"), 1, "rerun with --debug"),
])
def test_exit_codes(monkeypatch, tmp_path, exc, code, text):
    from tests.test_report import make_run

    monkeypatch.setattr("grownfx.report.run_report.write_report", _raising(exc))
    result = invoke("report", str(make_run(tmp_path / "run")))
    assert result.exit_code == code and text in result.output and "Traceback" not in result.output


def test_user_errors_exit_2_and_debug_shows_tracebacks(monkeypatch, tmp_path):
    from grownfx import SurgeryError, TraceError
    from grownfx.data import DatasetError
    from tests.test_report import make_run

    run = str(make_run(tmp_path / "run"))
    for exc in (DatasetError("no files here"), TraceError("cannot trace"), SurgeryError("cannot cut")):
        monkeypatch.setattr("grownfx.report.run_report.write_report", _raising(exc))
        result = invoke("report", run)
        # one style for every user error (grownfx.errors): `error: <message>`, exit 2
        assert result.exit_code == 2 and result.output.strip() == f"error: {exc}", result.output
    monkeypatch.setattr("grownfx.report.run_report.write_report", _raising(RuntimeError("boom")))
    result = invoke("--debug", "report", run)
    assert result.exit_code == 1 and "Traceback" in result.output and "RuntimeError: boom" in result.output


@pytest.mark.parametrize("command", COMMANDS)
def test_help_shows_an_example(command):
    result = invoke(command, "--help")
    assert result.exit_code == 0 and "Example" in result.output and f"grownfx {command}" in result.output


def test_python_dash_m_grownfx():
    result = subprocess.run([sys.executable, "-m", "grownfx", "--help"], capture_output=True, text=True,
                            timeout=60, cwd=Path(__file__).resolve().parents[1])
    assert result.returncode == 0 and "validate" in result.stdout and "inspect" in result.stdout


# --- progress ------------------------------------------------------------------------------------------------


def test_progress_plain_lines():
    """Without a TTY: a line per task and one per finished stage; -v (verbose) adds a line per epoch."""
    def feed(p):
        p.task_bar(0, "digits/task1")
        for e in (1, 2):
            p.epoch({"task": 0, "stage": "grow", "round": 1, "epoch": e, "epochs": 2, "loss": 0.5, "train_acc": 90.0})
        p.epoch({"task": 0, "stage": "grow", "round": 2, "epoch": 1, "epochs": 1, "loss": 0.25, "train_acc": 91.0})
        p.task_bar(1, "digits/task2")
        p.epoch({"task": 1, "stage": "stage1", "round": 0, "epoch": 1, "epochs": 1, "loss": 0.3, "train_acc": 92.0})
        p.epoch({"task": 1, "stage": "grow", "round": 1, "epoch": 1, "epochs": 1, "loss": 0.2, "train_acc": 93.0})
        p.log("task 2: done")

    buf = io.StringIO()
    with progress(2, file=buf) as p:  # a StringIO is not a TTY: plain lines
        feed(p)
    assert buf.getvalue().splitlines() == [
        "task 1/2: digits/task1",
        "  task 1/2 [stage 1 (sparse growth from the seed)] 2 epochs: loss 0.5, train_acc 90.0",
        "  task 1/2 [growth round 1] 1 epoch: loss 0.25, train_acc 91.0",
        "task 2/2: digits/task2",
        "  task 2/2 [stage 1] 1 epoch: loss 0.3, train_acc 92.0",
        "  task 2/2 [growth round 1] 1 epoch: loss 0.2, train_acc 93.0",
        "task 2: done"]
    buf = io.StringIO()
    with progress(2, file=buf, verbose=True) as p:
        feed(p)
    lines = buf.getvalue().splitlines()
    assert lines[:4] == ["task 1/2: digits/task1", "  task 1/2 [stage 1 (sparse growth from the seed)] (2 epochs)",
                         "    task 1/2 [stage 1 (sparse growth from the seed)] epoch 1/2: loss 0.5, train_acc 90.0",
                         "    task 1/2 [stage 1 (sparse growth from the seed)] epoch 2/2: loss 0.5, train_acc 90.0"]
    assert len(lines) == 12


def test_phase_labels_and_tensorboard_tags():
    from grownfx.report.progress import phase_label

    assert phase_label({"task": 0, "stage": "grow", "round": 1}) == "stage 1 (sparse growth from the seed)"
    assert phase_label({"task": 0, "stage": "grow", "round": 1}, short=True) == "stage 1"
    assert phase_label({"task": 0, "stage": "grow", "round": 3}) == "growth round 2"
    assert phase_label({"task": 4, "stage": "stage1", "round": 0}) == "stage 1"
    assert phase_label({"task": 4, "stage": "grow", "round": 2}) == "growth round 2"
    assert phase_label({"stage": "scratch"}) == "scratch reference"


def test_task_line_says_why_a_task_below_target_did_not_grow():
    from grownfx.learn.records import TaskRecord
    from grownfx.recipe.schema import GrowthConfig
    from grownfx.run.console import _task_line

    cfg = GrowthConfig(max_rounds=2, max_width=1.5)
    spent = TaskRecord(index=2, name="t", num_classes=2, target=95.0, val_acc=90.0, growth_rounds=2, grew=True,
                       growth={"1": 4})
    line = _task_line(spent, [90.0, 91.0, 92.0], 1000, cfg)
    assert line.startswith("task 3: ") and "grew 4 ch in 2 growth rounds" in line
    assert "below target: growth budget spent (growth.max_rounds=2)" in line
    capped = TaskRecord(index=1, name="t", num_classes=2, target=95.0, val_acc=90.0, growth_rounds=0)
    assert "no growth; below target: every growth site is at its width cap (growth.max_width=1.5x" in \
        _task_line(capped, [90.0, 90.0], 1000, cfg)
    seed = TaskRecord(index=0, name="t", num_classes=2, target=90.0, val_acc=99.0, growth_rounds=1,
                      pruned_candidates=12, from_seed=True)
    line = _task_line(seed, [99.0], 1000, cfg)
    assert "kept the seed width (sparse growth pruned all 12 candidate channels)" in line and "below" not in line


def test_progress_disabled_and_rich():
    buf = io.StringIO()
    with progress(2, enabled=False, file=buf) as p:
        p.start_task(0, 2, "a")
        p.epoch({"stage": 1, "epoch": 1, "epochs": 1, "loss": 1.0})
        p.log("hidden")
    assert buf.getvalue() == ""
    from rich.console import Console

    console = Console(file=io.StringIO(), force_terminal=True, width=100)
    with Progress(2, plain=False, console=console) as p:
        p.start_task(0, 2, "a")
        p.epoch_bar(2)
        p.update(2, loss=0.1)
        p.epoch({"stage": 1, "epoch": 2, "epochs": 2, "loss": 0.1})
        p.log("task 1: done")
        p.end_task(0)
    assert "task 1: done" in console.file.getvalue()


# --- issue 21: the command line through typer's public API, one error style ---------------------------------


def test_parser_mistakes_print_the_one_error_style():
    for args, text in ((["run"], "error: Missing argument 'RECIPE'."), (["nope"], "error: No such command 'nope'."),
                       (["export", "x", "--task", "abc"], "error: Invalid value for '--task'")):
        result = invoke(*args)
        assert result.exit_code == 2 and result.output.startswith(text), result.output
        assert "Usage:" not in result.output and "╭" not in result.output


def test_the_cli_leaves_typer_alone_and_errors_live_in_grownfx_errors():
    # importing the app changes no class of typer's (help comes from TyperCommand/TyperGroup subclasses)
    code = ("import typer.core as c\n"
            "names = [n for n in dir(c) if isinstance(getattr(c, n), type)]\n"
            "before = {n: dict(vars(getattr(c, n))) for n in names}\n"
            "import grownfx.cli.app\n"
            "changed = [n for n in names if dict(vars(getattr(c, n))) != before[n]]\n"
            "assert not changed, changed\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    # no module of the command line imports back from the app (inspect_model took UserError from it)
    import ast

    for path in (Path(__file__).resolve().parents[1] / "cli").glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom):
                assert node.module != "grownfx.cli.app", f"{path.name} imports from grownfx.cli.app"
