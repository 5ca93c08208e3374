"""The newcomer's second round of frictions (issue 26, item 5), each a command-line test that failed before its fix:
a local copy shadowed by a built-in name, the resume command after Ctrl-C, progress labels and wall time, the end
of `compare`, paths that do not exist, a refused folder never announced, a missing data folder before torch, no
deprecation warnings of grownfx's own making, and the report's plots."""

from __future__ import annotations

import shlex
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch

from cli_helpers import invoke
from tests.test_report import make_run

REPO = Path(__file__).resolve().parents[1]
QUICK = ["training.epochs=1", "training.stage2_epochs=1", "growth.max_rounds=0", "data.classes_per_task=5",
         "data.limit_per_task=40", "output.tensorboard=false", "training.num_threads=1"]


def test_a_local_copy_shadowed_by_the_builtin_name_is_warned_and_the_one_that_runs_is_named(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert invoke("cp", "digits_quickstart").exit_code == 0
    (tmp_path / "digits_quickstart.yaml").write_text(
        (tmp_path / "digits_quickstart.yaml").read_text().replace("epochs: 10", "epochs: 3"))
    result = invoke("validate", "digits_quickstart")
    assert result.exit_code == 0
    assert "is the built-in recipe digits_quickstart" in result.output
    assert "./digits_quickstart.yaml is not used" in result.output and "pass the file" in result.output
    assert "warning" not in invoke("validate", "./digits_quickstart.yaml").output  # the file itself: no doubt


def test_ctrl_c_prints_the_whole_resume_command_with_its_folder_and_that_command_finishes(tmp_path, monkeypatch):
    from grownfx.learn.methods.grown import GrownContinual

    learn = GrownContinual.learn

    def interrupted_at_task_2(self, task, target, resume=None):
        if task.index == 1:
            raise KeyboardInterrupt
        return learn(self, task, target, resume)

    monkeypatch.setattr(GrownContinual, "learn", interrupted_at_task_2)
    out = tmp_path / "my run"  # a space: the printed command quotes it
    result = invoke("run", "digits_quickstart", *QUICK, "target.rule=0", "--out", str(out))
    assert result.exit_code == 130
    line = next(ln.strip() for ln in result.output.splitlines() if ln.strip().startswith("grownfx run"))
    args = shlex.split(line)
    assert args[-3:] == ["--out", str(out), "--resume"] and args[2:-3] == ["digits_quickstart", *QUICK, "target.rule=0"]
    monkeypatch.setattr(GrownContinual, "learn", learn)
    again = invoke(*args[1:])
    assert again.exit_code == 0 and "resuming run folder" in again.output, again.output


def test_progress_labels_the_reference_runs_and_the_export_and_report_gives_the_wall_time(tmp_path):
    out = tmp_path / "run"
    result = invoke("run", "digits_quickstart", *QUICK, "data.num_tasks=1", "target.rule=best(scratch, finetune)",
                    "--out", str(out))
    assert result.exit_code == 0, result.output
    assert "[scratch reference]" in result.output
    assert "[fine-tune reference (task 1)]" in result.output
    assert "[export (pt2)]" in result.output
    assert invoke("report", str(out)).exit_code == 0
    report = (out / "report" / "report.md").read_text()
    assert "- wall time: " in report and "- wall time: -" not in report


def test_compare_ends_with_its_table_and_the_report_hint(tmp_path):
    out = tmp_path / "cmp"
    result = invoke("compare", "digits_quickstart", *QUICK, "data.num_tasks=1", "target.rule=0",
                    "--methods", "scratch,grown", "--out", str(out))
    assert result.exit_code == 0, result.output
    table = result.output[result.output.index("average %"):]
    assert "scratch" in table and "grown" in table and "wall time" in result.output
    assert result.output.rstrip().splitlines()[-1] == f"report: grownfx report {out}"


@pytest.mark.parametrize("command", [["report", "{p}"], ["export", "{p}", "--task", "1"],
                                     ["export", "{p}", "--all-tasks"], ["run", "{p}.yaml"]])
def test_a_path_that_does_not_exist_is_said_to_not_exist(tmp_path, command):
    missing = str(tmp_path / "no_such_thing")
    result = invoke(*[c.format(p=missing) for c in command])
    assert result.exit_code == 2 and "does not exist" in result.output, result.output
    assert "Traceback" not in result.output


def test_a_refused_run_folder_is_never_announced_as_written(tmp_path):
    (tmp_path / "notes.txt").write_text("mine")
    result = invoke("run", "digits_quickstart", *QUICK, "--out", str(tmp_path))
    assert result.exit_code == 2 and "refusing to write into it" in result.output
    assert "writing run folder" not in result.output


def test_a_missing_data_folder_is_reported_before_torch_is_imported(tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text(f"name: r\nmodel: {{builder: resnet18}}\ndata: {{name: cifar100_split, root: {tmp_path}/gone}}\n")
    probe = ("import sys\nfrom grownfx.cli.app import app\n"
             "try:\n    app(sys.argv[1:], prog_name='grownfx')\nexcept SystemExit as e:\n    print('EXIT', e.code)\n"
             "print('TORCH' if 'torch' in sys.modules else 'NO-TORCH')\n")
    for command in ("run", "validate"):
        proc = subprocess.run([sys.executable, "-c", probe, command, str(recipe)], capture_output=True, text=True,
                              timeout=120, cwd=REPO)
        assert "EXIT 2" in proc.stdout and "NO-TORCH" in proc.stdout, (proc.stdout, proc.stderr)
        assert f"{tmp_path}/gone does not exist" in proc.stderr.replace("\n", "")


def _grownfx_deprecations(caught) -> list[str]:
    return [f"{w.category.__name__}: {w.message} ({w.filename})" for w in caught
            if issubclass(w.category, (DeprecationWarning, FutureWarning))]


def test_no_deprecation_warnings_from_the_onnx_export(tmp_path):
    pytest.importorskip("onnxscript")
    from grownfx.run.export import save_module
    from grownfx.run.opening import load_export

    model = torch.nn.Sequential(torch.nn.Conv2d(1, 4, 3), torch.nn.ReLU(), torch.nn.Flatten(),
                                torch.nn.Linear(4 * 6 * 6, 3)).eval()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        path = save_module(model, torch.randn(2, 1, 8, 8), "onnx", tmp_path)
    assert not _grownfx_deprecations(caught), _grownfx_deprecations(caught)
    x = torch.randn(5, 1, 8, 8)  # another batch size: the batch dimension stays dynamic
    assert torch.allclose(load_export(path, verify=False)(x), model(x), atol=1e-5)


def test_no_deprecation_warnings_from_the_cpu_global_batchnorm(tmp_path):
    from grownfx.learn.distributed import batchnorm

    torch.distributed.init_process_group("gloo", init_method=f"file://{tmp_path}/store", rank=0, world_size=1)
    try:
        bn = torch.nn.BatchNorm1d(3)
        x = torch.randn(8, 3, 5, requires_grad=True)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            y = batchnorm._cpu(bn, x)
            y.square().sum().backward()
        assert not _grownfx_deprecations(caught), _grownfx_deprecations(caught)
        reference = torch.nn.BatchNorm1d(3).train()
        x2 = x.detach().clone().requires_grad_(True)
        reference(x2).square().sum().backward()
        assert torch.allclose(y, reference(x.detach()), atol=1e-5) and torch.allclose(x.grad, x2.grad, atol=1e-5)
    finally:
        torch.distributed.destroy_process_group()


def _plot(name: str, tmp_path: Path):
    from grownfx.report import run_report

    fig = run_report._figure()
    getattr(run_report, name)(fig, run_report.read_run(make_run(tmp_path / "run")))
    return fig


def test_final_accuracy_plot_draws_targets_only_against_validation_accuracy(tmp_path):
    fig = _plot("_plot_final", tmp_path)
    for ax in fig.axes:
        labels = [t.get_text() for t in ax.get_legend().get_texts()]
        if any("target" in label for label in labels):  # a target is a validation accuracy
            assert all("validation" in label for label in labels), labels
            assert "validation" in ax.get_ylabel()
    test_axes = [ax for ax in fig.axes if "test" in ax.get_ylabel()]
    assert len(test_axes) == 1 and len(fig.axes) == 2  # the test accuracies stay, on their own


def test_accuracy_matrix_colours_use_one_fixed_scale(tmp_path):
    fig = _plot("_plot_matrix", tmp_path)
    assert fig.axes[0].images[0].get_clim() == (0.0, 100.0)
