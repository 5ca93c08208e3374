"""The command line in a newcomer's first hour and under the run folder's guarantees: start-up without torch,
user mistakes as one line with exit 2, output for people, exports that carry their preprocessing, data that is
missing (split from test_cli.py, which covers each command's basic behaviour)."""

from __future__ import annotations

import io
import json
import subprocess
import sys
import types
from pathlib import Path

import pytest

from cli_helpers import fake_module, invoke
from grownfx.report.progress import Progress


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

    def run(recipe, out_dir=None, resume=False, progress=None, echo=None, verify=True):
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
    assert result.exit_code == 2 and "does not exist" in result.output


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


@pytest.mark.parametrize("stop, code, line", [
    ("raise KeyboardInterrupt", 130, "interrupted (SIGINT)"),
    ("import os, signal, time; os.kill(os.getpid(), signal.SIGTERM); time.sleep(30)", 143, "interrupted (SIGTERM)"),
])
def test_ctrl_c_or_sigterm_while_the_command_line_starts_is_one_line(stop, code, line):
    # a signal before any command's handler runs (e.g. while importing torch): no traceback through importlib, and
    # SIGTERM is not a silent death with exit 143 (issue 24, cause 14)
    script = f"import sys; sys.argv[0] = 'grownfx'; import grownfx.cli; {stop}"
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
    assert proc.returncode == code and proc.stderr.strip() == line and "Traceback" not in proc.stderr


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
    (["inspect", "resnet18", "--input-shape", "3,0"], "--input-shape: expected one input's sizes"),
    (["export", ".", "--task", "1", "--format", "onxx"], "did you mean 'onnx'?"),
    (["compare", "digits_quickstart", "--methods", "grown", "--seeds", "0,x"], "--seeds: comma-separated integers"),
])
def test_option_mistakes_are_one_line(args, text):
    result = invoke(*args)
    assert result.exit_code == 2 and text in result.output and "Usage:" not in result.output
    assert len(result.output.strip().splitlines()) == 1, result.output
