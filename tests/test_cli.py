"""The `grownfx` command line (typer.testing.CliRunner) and the progress display."""

from __future__ import annotations

import io
import json
import subprocess
import sys
import types
from pathlib import Path

import pytest
from typer.testing import CliRunner

from grownfx.cli.app import app
from grownfx.report.progress import Progress, progress
from grownfx.recipe.loading import builtin_recipes_dir

COMMANDS = ["run", "validate", "ls", "cp", "inspect", "export", "report", "compare"]


def invoke(*args: str):
    return CliRunner().invoke(app, list(args))


def fake_module(monkeypatch, name: str, **attrs) -> types.ModuleType:
    """Stand in for a module the lead writes (runner, export_formats, compare...)."""
    mod = types.ModuleType(name)
    for k, v in attrs.items():
        setattr(mod, k, v)
    monkeypatch.setitem(sys.modules, name, mod)
    return mod


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
    assert "lenet5" in result.output and "input 3x32x32, seed width 0.5" in result.output
    assert "growable coupling groups (4)" in result.output


def test_inspect_bad_input_shape():
    result = invoke("inspect", "resnet18", "--input-shape", "3,32")
    assert result.exit_code == 2 and "C,H,W" in result.output


# --- commands that call the lead's modules ------------------------------------------------------------------


def test_run_calls_the_runner(monkeypatch, tmp_path):
    calls = {}

    def run(recipe, out_dir=None, resume=False, progress=None, echo=None):
        calls.update(recipe=recipe, out_dir=out_dir, resume=resume)
        progress.start_task(0, 1, "t0")
        echo("task 1: done")
        return types.SimpleNamespace(out_dir=out_dir, summary={"avg_acc": 97.5})

    fake_module(monkeypatch, "grownfx.run.runner", run=run)
    result = invoke("run", "digits_quickstart", "training.epochs=2", "--out", str(tmp_path / "r"), "--resume")
    assert result.exit_code == 0, result.output
    assert calls["recipe"].training.epochs == 2 and calls["out_dir"] == tmp_path / "r" and calls["resume"]
    assert "task 1: done" in result.output and "97.50" in result.output


def test_export_report_compare_call_through(monkeypatch, tmp_path):
    seen = {}
    fake_module(monkeypatch, "grownfx.run.export",
                export_run=lambda run_dir, task, fmt, verify: seen.update(export=(run_dir, task, fmt, verify)) or
                tmp_path / "model.onnx")
    result = invoke("export", str(tmp_path), "--task", "1", "--format", "onnx", "--verify")
    assert result.exit_code == 0 and seen["export"] == (tmp_path, 1, "onnx", True)
    assert invoke("export", str(tmp_path), "--task", "1", "--format", "tflite").exit_code == 2

    (tmp_path / "compare.json").write_text("{}")
    fake_module(monkeypatch, "grownfx.report.compare_report",
                write_compare_report=lambda d: seen.update(compare_report=d) or d / "report")
    assert invoke("report", str(tmp_path)).exit_code == 0 and seen["compare_report"] == tmp_path

    def run_compare(recipe, methods, seeds, out_dir=None):
        seen["compare"] = (recipe.training.epochs, methods, seeds)
        return tmp_path

    fake_module(monkeypatch, "grownfx.run.compare", run_compare=run_compare)
    result = invoke("compare", "digits_quickstart", "--methods", "grown,scratch", "--seeds", "0,1",
                    "training.epochs=1")
    assert result.exit_code == 0, result.output
    assert seen["compare"] == (1, ["grown", "scratch"], [0, 1])
    result = invoke("compare", "digits_quickstart", "--methods", "grown,nope")
    assert result.exit_code == 2 and "unknown method 'nope'" in result.output


def test_missing_lead_module_is_reported(monkeypatch, tmp_path):
    (tmp_path / "compare.json").write_text("{}")
    monkeypatch.setitem(sys.modules, "grownfx.report.compare_report", None)  # import fails
    result = invoke("report", str(tmp_path))
    assert result.exit_code == 1 and "grownfx.report.compare_report" in result.output and "Traceback" not in result.output


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
        assert result.exit_code == 2 and f"{type(exc).__name__}: {exc}" in result.output
        assert "Traceback" not in result.output
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
    buf = io.StringIO()
    with progress(2, file=buf) as p:  # a StringIO is not a TTY: plain lines
        p.task_bar(0, "digits/task0")
        p.stage_bar("stage 1", epochs=2)
        p.epoch_bar(3)
        for _ in range(3):
            p.update(loss=0.5)
        p.epoch({"task": 0, "stage": "grow", "round": 1, "epoch": 1, "epochs": 4, "loss": 0.25, "train_acc": 91.0})
        p.log("task 1: done")
    lines = buf.getvalue().splitlines()
    assert lines == ["task 1/2: digits/task0", "  task 1/2 [stage 1] (2 epochs)",
                     "    task 1/2 [stage 1] epoch 1/2: loss 0.5", "  task 1/2 [grow round 1] (4 epochs)",
                     "    task 1/2 [grow round 1] epoch 1/4: loss 0.25, train_acc 91.0", "task 1: done"]


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
