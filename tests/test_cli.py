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


def fake_module(monkeypatch, name: str, **attrs) -> None:
    """Replace functions of the real module `name` (imported as the CLI imports it), not the module itself:
    a command importing a name the module lacks, or a module that fails to import, still fails here."""
    for k, v in attrs.items():
        monkeypatch.setattr(f"{name}.{k}", v)  # raises AttributeError when `name` has no such function


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
    def export_run(run_dir, task, fmt, verify, bake_preprocessing=False):
        seen.update(export=(run_dir, task, fmt, verify, bake_preprocessing))
        return tmp_path / "model.onnx", {"verified_max_rel_error": 2e-7}

    fake_module(monkeypatch, "grownfx.run.export", export_run=export_run)
    result = invoke("export", str(tmp_path), "--task", "2", "--format", "onnx", "--verify")
    # --task counts from 1 like the console and exports/task_K; the Python API takes the 0-based index
    assert result.exit_code == 0 and seen["export"] == (tmp_path, 1, "onnx", True, False)
    assert "exported task 2 as onnx" in result.output and "max relative error 2.0e-07" in result.output
    result = invoke("export", str(tmp_path), "--task", "1", "--bake-preprocessing")
    assert seen["export"] == (tmp_path, 0, "pt2", False, True) and "takes raw inputs" in result.output
    assert invoke("export", str(tmp_path), "--task", "1", "--format", "tflite").exit_code == 2
    result = invoke("export", str(tmp_path), "--task", "0")
    assert result.exit_code == 2 and "--task counts from 1" in result.output and "Traceback" not in result.output

    (tmp_path / "compare.json").write_text("{}")
    fake_module(monkeypatch, "grownfx.report.compare_report",
                write_compare_report=lambda d: seen.update(compare_report=d) or d / "report")
    assert invoke("report", str(tmp_path)).exit_code == 0 and seen["compare_report"] == tmp_path

    def run_compare(recipe, methods, seeds, out_dir=None, equal_budget=None):
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
                      pruned_candidates=12)
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


# --- start-up (issue 15): commands that need no model never import torch -------------------------------------

_NO_TORCH_PROBE = ("import sys\nfrom grownfx.cli.app import app\n"
                   "try:\n    app(sys.argv[1:], prog_name='grownfx')\nexcept SystemExit:\n    pass\n"
                   "assert 'torch' not in sys.modules, 'torch was imported'\nprint('NO-TORCH')\n")


@pytest.mark.parametrize("args", [["--help"], ["ls"], ["validate", "digits_quickstart", "--no-data-check"],
                                  ["run", "--help"]])
def test_startup_does_not_import_torch(args, tmp_path):
    result = subprocess.run([sys.executable, "-c", _NO_TORCH_PROBE, *args], capture_output=True, text=True,
                            timeout=120, cwd=Path(__file__).resolve().parents[1])
    assert result.returncode == 0 and "NO-TORCH" in result.stdout, result.stderr


def test_recipe_schema_does_not_import_torch():
    code = "import sys, grownfx.recipe.schema, grownfx.recipe.loading; assert 'torch' not in sys.modules"
    assert subprocess.run([sys.executable, "-c", code], timeout=120).returncode == 0


def test_validate_knows_grownfx_builders_by_name():
    from grownfx.models import BUILDERS
    from grownfx.recipe.checks import _GROWNFX_FALLBACK

    assert set(_GROWNFX_FALLBACK) == set(BUILDERS)


# --- issue 14: the run folder's guarantees, as the command line shows them -----------------------------------


def _one_error_line(result) -> str:
    lines = [ln for ln in result.output.strip().splitlines() if ln.strip()]
    assert "Traceback" not in result.output and "weights_only" not in result.output, result.output
    return " ".join(lines)


def test_cli_second_writer_is_refused_with_exit_2(tmp_path):
    from grownfx import files

    out = tmp_path / "r"
    with files.FolderLock(out):
        result = invoke("run", "digits_quickstart", "--out", str(out), "--resume")
    assert result.exit_code == 2, result.output
    assert "in use by another grownfx process" in _one_error_line(result)


def test_cli_out_holding_other_files_is_refused(tmp_path):
    (tmp_path / "notes.txt").write_text("mine")
    result = invoke("run", "digits_quickstart", "--out", str(tmp_path))
    assert result.exit_code == 2, result.output
    assert "not empty" in _one_error_line(result) and (tmp_path / "notes.txt").read_text() == "mine"


def test_cli_corrupt_checkpoint_is_one_line_naming_the_file(tmp_path):
    last = tmp_path / "checkpoints" / "last.pt"
    last.parent.mkdir(parents=True)
    last.write_bytes(b"PK\x03\x04 truncated")
    result = invoke("export", str(tmp_path), "--task", "1")
    assert result.exit_code == 2, result.output
    assert "last.pt" in _one_error_line(result) and "corrupt" in result.output


def test_cli_validate_refuses_infinite_learning_rate():
    result = invoke("validate", "digits_quickstart", "training.optimizer.lr=.inf")
    assert result.exit_code == 2 and "finite" in result.output, result.output


# --- user mistakes: exit 2, one clear line, "did you mean" (issue 15) ----------------------------------------


def test_inspect_unknown_builder_suggests_names():
    result = invoke("inspect", "resnt18")
    assert result.exit_code == 2 and "did you mean 'resnet18'?" in result.output
    result = invoke("inspect", "resnet_typo")
    assert result.exit_code == 2 and "did you mean 'resnet50'" in result.output and "Traceback" not in result.output


def test_inspect_wrong_input_shape_is_one_clear_error(capfd):
    result = invoke("inspect", "small_cnn", "--input-shape", "3,224,224")
    assert result.exit_code == 2 and "expected input[1, 3, 224, 224] to have 1 channels" in result.output
    captured = capfd.readouterr()
    assert "Traceback" not in result.output + captured.err + captured.out  # ShapeProp's print_exc is silenced
    assert invoke("inspect", "small_cnn").exit_code == 0  # its own input shape (1x8x8) by default


@pytest.mark.parametrize("content", [bytes(range(256)) * 2, b"name: x\n\x01\x02 junk\n"])
def test_binary_recipe_is_a_recipe_error(tmp_path, content):
    bad = tmp_path / "bad.yaml"
    bad.write_bytes(content)
    result = invoke("validate", str(bad))
    assert result.exit_code == 2 and f"{bad}: not a YAML text file" in result.output


def test_recipe_name_typo_suggests():
    result = invoke("validate", "digits_quikstart")
    assert result.exit_code == 2 and "did you mean 'digits_quickstart'?" in result.output
    result = invoke("cp", "digits_quikstart")
    assert result.exit_code == 2 and "did you mean 'digits_quickstart'?" in result.output


def test_switching_method_by_override():
    result = invoke("validate", "digits_quickstart", "method.name=scratch")
    assert result.exit_code == 0, result.output
    assert "scratch" in result.output and "ablation" not in result.output


# --- output for people (issue 15) ----------------------------------------------------------------------------


def test_cp_destination_defaults_to_the_current_folder(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert invoke("cp", "digits_quickstart").exit_code == 0
    assert (tmp_path / "digits_quickstart.yaml").is_file()
    # the README's commands run twice: an unedited copy is left as it is and the second `cp` succeeds
    again = invoke("cp", "digits_quickstart")
    assert again.exit_code == 0 and "already a copy" in again.output


def test_help_has_plain_placeholders_and_the_ablation_rows():
    out = invoke("run", "--help").output
    assert "RECIPE [OVERRIDES]..." in out and "{recipe}" not in out and "<bool>" not in out
    out = invoke("export", "--help").output
    assert "<bool>" not in out and "--bake-preprocessing" in out
    out = invoke("compare", "--help").output
    for row in ("grown[grow_only]", "grown[+selective_mask]", "grown[+lsg]", "grown[+retrain_released]"):
        assert row in out


def test_results_table_keeps_task_names_whole(monkeypatch, tmp_path):
    tasks = [{"name": f"miniimagenet/task{k}", "val_acc": 70.0, "target": 69.0, "acc_when_learned": 71.0,
              "acc_final": 71.0, "growth": {"1": 8}, "model_size": 0.5, "time_s": 12.0} for k in range(1, 11)]
    summary = {"name": "r", "method": "grown", "avg_acc": 71.0, "bwt": 0.0, "tasks": tasks}

    def run(recipe, out_dir=None, resume=False, progress=None, echo=None):
        return types.SimpleNamespace(out_dir=out_dir, summary=summary)

    fake_module(monkeypatch, "grownfx.run.runner", run=run)
    result = invoke("run", "digits_quickstart", "--out", str(tmp_path / "r"))
    assert result.exit_code == 0, result.output
    assert "miniimagenet/task10" in result.output and "…" not in result.output


def test_cli_report_of_a_truncated_summary_is_one_line(tmp_path):
    (tmp_path / "summary.json").write_text('{"name": "x", "tasks": [')
    result = invoke("report", str(tmp_path))
    assert result.exit_code == 2, result.output
    assert "summary.json is not valid JSON" in _one_error_line(result)


def test_cli_validate_warns_about_absurd_values():
    result = invoke("validate", "digits_quickstart", "training.epochs=1000000000", "data.limit_per_task=8")
    assert result.exit_code == 0, result.output
    assert "training.epochs = 1,000,000,000" in result.output and "larger than data.limit_per_task 8" in result.output


def test_cli_validate_catches_too_many_imagefolder_tasks(tmp_path):
    for c in ("a", "b", "c"):
        (tmp_path / c).mkdir()
    result = invoke("validate", "digits_quickstart", "data=null", "+data.name=imagefolder", f"+data.root={tmp_path}",
                    "+data.classes_per_task=2", "+data.num_tasks=2", "model.kwargs.in_channels=3")
    assert result.exit_code == 2, result.output
    assert "need 4 class folders" in result.output and "has 3" in result.output


# --- exports carry their preprocessing (issue 15) -------------------------------------------------------------


def test_export_meta_lists_formats_and_bakes_preprocessing(tmp_path):
    import torch

    from grownfx.recipe.loading import load_recipe
    from grownfx.run.runner import run

    rec = load_recipe("digits_quickstart", ["training.epochs=1", "training.stage2_epochs=1", "growth.max_rounds=0",
                                            "data.classes_per_task=5"], check_data=False)
    out = tmp_path / "run"
    run(rec, out_dir=out, echo=lambda msg: None)
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(out / "tb"))
    events.Reload()
    tags = events.Tags()["scalars"]
    assert "task1/stage_1/loss" in tags and "task2/stage_1/loss" in tags and not any("task0" in t for t in tags)
    assert [e.step for e in events.Scalars("stream/avg_acc")] == [1, 2]  # TensorBoard counts tasks from 1 too
    folder = out / "exports" / "task_1"  # tasks count from 1
    meta = json.loads((folder / "meta.json").read_text())
    assert meta["task"] == 1 and meta["task_index"] == 0 and meta["name"] == "digits/task1"
    prep = meta["preprocessing"]
    assert prep["pixel_scale"] == 1 / 16 and prep["mean"] == [0.3053] and "formula" in prep
    assert meta["formats"]["pt2"]["preprocessing_baked"] is False

    result = invoke("export", str(out), "--task", "1", "--format", "onnx", "--verify")
    assert result.exit_code == 0, result.output
    assert "verified: max relative error" in result.output
    plain = torch.export.load(str(folder / "model.pt2")).module()
    result = invoke("export", str(out), "--task", "1", "--bake-preprocessing", "--verify")
    assert result.exit_code == 0 and "takes raw inputs" in result.output, result.output
    meta = json.loads((folder / "meta.json").read_text())
    assert sorted(meta["formats"]) == ["onnx", "pt2"]  # one meta for all formats: onnx's entry kept
    assert meta["formats"]["pt2"]["preprocessing_baked"] and not meta["formats"]["onnx"]["preprocessing_baked"]
    assert meta["formats"]["onnx"]["verified_max_rel_error"] < 1e-4
    baked = torch.export.load(str(folder / "model.pt2")).module()
    raw = torch.randint(0, 17, (4, 1, 8, 8)).float()  # digits pixels are 0..16
    pre = (raw / 16 - 0.3053) / 0.376
    assert torch.allclose(baked(raw), plain(pre), atol=1e-5)

    result = invoke("export", str(out), "--task", "3")
    assert result.exit_code == 2 and "--task takes 1..2" in result.output and "Traceback" not in result.output


# --- missing data says where it comes from (issue 15) ---------------------------------------------------------


@pytest.mark.parametrize("recipe, source", [("resnet18_miniimagenet", "learn2learn"),
                                            ("lenet_cifar100_split10", "https://www.cs.toronto.edu/~kriz/cifar.html")])
def test_missing_data_names_its_source_and_a_command_that_works(recipe, source, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    for command in ("validate", "run"):
        result = invoke(command, recipe)
        assert result.exit_code == 2 and source in result.output, result.output
        assert "grownfx validate RECIPE --no-data-check" in result.output  # not an option `run` lacks


def test_data_docs_say_where_every_kind_comes_from():
    from typing import get_args

    from grownfx.data.config import DataConfig
    from grownfx.recipe.checks import unwrap

    doc = (Path(__file__).resolve().parents[1] / "docs" / "data.md").read_text()
    section = doc.split("## Getting the files", 1)[1].split("\n## ", 1)[0]
    for member in get_args(unwrap(DataConfig)):
        for name in get_args(member.model_fields["name"].annotation):  # name: Literal["cifar100_split"]
            assert f"`{name}`" in section, f"docs/data.md, Getting the files: no row for {name}"
    reproducing = (Path(__file__).resolve().parents[1] / "docs" / "reproducing.md").read_text()
    assert "grownfx compare resnet18_miniimagenet" in reproducing


def test_inspect_groups_repeated_reasons():
    from grownfx.cli.inspect_model import group_reasons, render

    reasons = [f"LayerNorm 'encoder.layer_{i}.ln' normalises across channels" for i in range(25)]
    reasons += [f"attention 'encoder.layer_{i}.attn' splits channels into heads" for i in range(12)]
    reasons += ["a channel count (768) is written into the graph at 'reshape' (read it from the shape)"]
    lines = group_reasons(reasons)
    assert lines == ["LayerNorm normalises across channels (25 modules: encoder.layer_0.ln, encoder.layer_1.ln, ...)",
                     "attention splits channels into heads "
                     "(12 modules: encoder.layer_0.attn, encoder.layer_1.attn, ...)",
                     reasons[-1]]
    data = {"builder": "vit", "input_shape": [3, 8, 8], "seed_width": 0.5, "num_classes": 10, "full_params": 10,
            "seed_params": 5, "seed_fraction": 0.5, "growth_sites": [], "notes": [],
            "groups": [{"id": 3, "width": 768, "seed_width": 768, "growable": False, "growth_site": False,
                        "granularity": 1, "reasons": reasons, "members": []}]}
    from rich.console import Console

    console = Console(file=io.StringIO(), width=120)
    console.print(render(data)[0])
    text = console.file.getvalue()
    assert "group 3: width 768, fixed, for 3 reasons:" in text and len(text.splitlines()) < 10


def test_resume_without_a_checkpoint_says_what_to_do(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    result = invoke("run", "digits_quickstart", "training.epochs=1", "--out", str(tmp_path / "none"), "--resume")
    assert result.exit_code == 2 and "nothing to resume" in result.output, result.output
    assert f"grownfx run digits_quickstart training.epochs=1 --out {tmp_path / 'none'}` (without --resume)" in \
        result.output.replace("\n", "")


def test_export_of_a_folder_without_a_run_is_a_user_error(tmp_path):
    result = invoke("export", str(tmp_path), "--task", "1")
    assert result.exit_code == 2 and "holds no checkpoint" in result.output and "Traceback" not in result.output
    result = invoke("export", str(tmp_path / "nope"), "--task", "1")
    assert result.exit_code == 2 and "is not a run folder" in result.output


def test_progress_says_preparing_before_the_first_task():
    from rich.console import Console

    console = Console(file=io.StringIO(), force_terminal=True, width=100)
    with Progress(0, plain=False, console=console) as p:
        p._rich.refresh()
        p.start_task(0, 5, "digits/task1")
        p._rich.refresh()
    text = console.file.getvalue()
    assert "preparing (data, model)" in text and "0/0" not in text and "task 1/5 digits/task1" in text


def test_compare_method_typo_suggests():
    result = invoke("compare", "digits_quickstart", "--methods", "grwn,scratch")
    assert result.exit_code == 2 and "did you mean 'grown'?" in result.output
    result = invoke("compare", "digits_quickstart", "--methods", "grown[+lgs]")
    assert result.exit_code == 2 and "did you mean 'grown[+lsg]'?" in result.output


def test_ctrl_c_while_the_command_line_starts_is_one_line_and_exit_130():
    # a KeyboardInterrupt before any command's handler runs (e.g. while importing): no traceback through importlib
    code = "import sys; sys.argv[0] = 'grownfx'; import grownfx.cli; raise KeyboardInterrupt"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 130 and proc.stderr.strip() == "interrupted" and "Traceback" not in proc.stderr


def test_cli_same_run_twice_gets_a_numbered_folder_and_resume_takes_the_latest(tmp_path):
    args = ["run", "digits_quickstart", "training.epochs=1", "training.stage2_epochs=1", "growth.max_rounds=0",
            "data.classes_per_task=5", "data.limit_per_task=60", "target.rule=0", "output.tensorboard=false",
            "output.export_format=none", f"output.dir={tmp_path}/q"]
    first, second = invoke(*args), invoke(*args)
    assert first.exit_code == 0 and second.exit_code == 0, second.output
    assert f"{tmp_path}/q-2" in second.output and (tmp_path / "q-2" / "summary.json").exists()
    resumed = invoke(*args, "--resume")
    assert resumed.exit_code == 0 and f"resuming run folder {tmp_path}/q-2" in resumed.output, resumed.output


@pytest.mark.parametrize("args, text", [
    (["inspect", "resnet18", "--input-shape", "3,32"], "--input-shape: expected C,H,W"),
    (["export", ".", "--task", "1", "--format", "onxx"], "did you mean 'onnx'?"),
    (["compare", "digits_quickstart", "--methods", "grown", "--seeds", "0,x"], "--seeds: comma-separated integers"),
])
def test_option_mistakes_are_one_line(args, text):
    result = invoke(*args)
    assert result.exit_code == 2 and text in result.output and "Usage:" not in result.output
    assert len(result.output.strip().splitlines()) == 1, result.output
