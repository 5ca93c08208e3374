"""Every benchmark runs with --quick and writes the rows it promises; no timing is asserted (timings never go into
tests).  Run in-process (one torch import for all), each into a temporary JSON file."""

from __future__ import annotations

import importlib
import json

import pytest
import torch

# the rows each benchmark's --quick run must produce (names exactly as written)
EXPECTED = {
    "train_step": ["lenet5 task 1 batch 8", "lenet5 task 1 batch 16", "lenet5 task 3 batch 8",
                   "lenet5 task 3 batch 16"],
    "inference": [f"lenet5 {v} batch {b}" for b in (1, 8)
                  for v in ("export/dense", "aware-eval/dense", "export(pruned)/dense",
                            "aware-eval alternating 2 tasks/dense", "all-tasks artifact alternating 2 tasks/dense")],
    "storage": [f"small_cnn: {r}" for n in (2, 4)
                for r in (f"mask bits/kernel, worst of {n} tasks", f"bytes task {n} stores",
                          f"serving {n} tasks / backbone", f"checkpoint after {n} tasks / backbone",
                          f"checkpoint / serving after {n} tasks")],
    "scale_tasks": ["task 2 step / task 2 step", "task 4 step / task 2 step", "task 4 step / task 1 step",
                    "task 4 step peak memory / task 2", "live tensor bytes per task, tasks 2->4 / stored per task",
                    "stale .grad bytes per task on frozen parameters, tasks 2->4",
                    "resnet18 task 1 step / task 2 step", "resnet18 task 4 step / task 2 step",
                    "resnet18 task 4 step / task 3 step (same widths)", "resnet18 checkpoint after 4 tasks / backbone",
                    "resnet18 serving 4 tasks / backbone"],
    "method_cost": ["CPG / GROWN wall time", "CPG / GROWN learning time", "CPG / GROWN epochs learned",
                    "GROWN / SCRATCH wall time", "GROWN final average accuracy", "SCRATCH final average accuracy"],
    "method_cost_real": ["CPG / GROWN wall time", "CPG / GROWN learning time", "CPG / GROWN epochs learned",
                         "CPG / GROWN wall time, references shared", "GROWN / SCRATCH wall time",
                         "GROWN final average accuracy", "CPG final average accuracy"],
    "data_pipeline": ["batched crop_flip / small_cnn training step (images/s)",
                      "batched no augment / small_cnn training step (images/s)",
                      "DataLoader 0 workers / small_cnn training step (images/s)"],
    "compile_amp": ["lenet5 task 3: dynamo graphs / graph breaks (task-aware forward)",
                    "lenet5 task 3 batch 8, eager: task-aware / plain",
                    "lenet5 task 3 batch 8, compiled (aot_eager): task-aware / plain"],
    "profile_step": ["lenet5 task 3 batch 8: task-aware / plain step (profiled, 2 steps each)"],
    "mask_arith": ["lenet5 task 3 batch 8: task-aware step / plain step",
                   "lenet5 task 3 batch 8: mask arithmetic fwd+bwd, eager / plain step",
                   "lenet5 task 3 batch 8: mask arithmetic fwd+bwd, compiled (aot_eager) / plain step",
                   "lenet5 task 3 batch 8: predicted step ratio with fused mask arithmetic"],
}
# goals every full run reports a pass/fail for (rows whose pass must be a bool, not None)
WITH_GOAL = {
    "train_step": EXPECTED["train_step"],
    "inference": [r for r in EXPECTED["inference"] if "pruned" not in r and "alternating" not in r],
    "storage": ["small_cnn: mask bits/kernel, worst of 2 tasks", "small_cnn: mask bits/kernel, worst of 4 tasks",
                "small_cnn: checkpoint / serving after 2 tasks", "small_cnn: checkpoint / serving after 4 tasks"],
    "scale_tasks": ["task 4 step / task 2 step", "resnet18 task 4 step / task 3 step (same widths)"],
    "data_pipeline": EXPECTED["data_pipeline"],
    "compile_amp": EXPECTED["compile_amp"],
}


@pytest.fixture(autouse=True)
def _restore_threads():
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


@pytest.mark.parametrize("name", list(EXPECTED))
def test_quick_run_writes_expected_rows(name, tmp_path, capsys):
    module = importlib.import_module(f"benchmarks.{name}")
    out = tmp_path / f"{name}.json"
    module.main(["--quick", "--json", str(out)])
    data = json.loads(out.read_text())
    assert data["benchmark"] == name and data["quick"] is True
    assert data["environment"]["torch_threads"] == 1
    rows = {r["name"]: r for r in data["rows"]}
    expected = EXPECTED[name]
    if name == "method_cost" and any("CPG is pending" in n for n in data["notes"]):
        expected = [r for r in expected if "CPG" not in r]  # the baseline is allowed to be unfinished
    if name == "method_cost_real" and any(n.startswith("skipped:") for n in data["notes"]):
        expected = ["skipped: Fashion-MNIST missing"]  # the real-data benchmark needs the dataset installed
    missing = [r for r in expected if r not in rows]
    assert not missing, f"{name}: missing rows {missing}; got {list(rows)}"
    for r in data["rows"]:
        assert "goal" in r and "measured" in r and "pass" in r, r
        assert r["goal"] not in (None, ""), r
        assert r["measured"] is not None, r
    for r in WITH_GOAL.get(name, []):
        assert isinstance(rows[r]["pass"], bool), rows[r]
    if name == "train_step":  # the later task's rows carry the floor measured beside them
        assert all(rows[r]["floor"] > 0 for r in rows if " task 3 " in r), rows
    assert "| case | goal | measured |" in data["markdown"]
    assert "| case | goal | measured |" in capsys.readouterr().out


def test_all_writes_a_summary(tmp_path, monkeypatch):
    from benchmarks import all as run_all

    monkeypatch.setattr(run_all, "run_one", lambda name, out, quick, extra: (_fake(name, out), 0.0))
    assert run_all.main(["--quick", "--out", str(tmp_path)]) == 0
    text = (tmp_path / "summary.md").read_text()
    for name in run_all.BENCHMARKS:
        assert f"## {name}" in text
    assert "| benchmark | rows with a goal | pass | fail |" in text


def _fake(name, out) -> int:
    from benchmarks.common import Report

    rep = Report(name, quick=True)
    rep.add("a row", "≤ 1.10×", 1.0, True, "x")
    data = rep.to_dict()
    data["markdown"] = rep.markdown()
    out.write_text(json.dumps(data))
    return 0


def test_all_prints_failed_goals_formatted(tmp_path, monkeypatch, capsys):
    """`benchmarks.all --quick` ends with the failed goals as the tables show them, not raw floats."""
    from benchmarks import all as run_all
    from benchmarks.common import Report

    def fake(name, out, quick, extra):
        rep = Report(name, quick=True)
        rep.add("step ratio", "≤ 1.10×", 1.2345678901, False, "x")
        out.write_text(json.dumps({**rep.to_dict(), "markdown": rep.markdown()}))
        return 0, 0.0

    monkeypatch.setattr(run_all, "run_one", fake)
    run_all.main(["--quick", "--only", "train_step", "--out", str(tmp_path)])
    out = capsys.readouterr().out
    assert "FAIL: step ratio (goal ≤ 1.10×, measured 1.235×)" in out and "1.2345678901" not in out


def test_cli_startup_benchmark_table(tmp_path, monkeypatch, capsys):
    """`python -m benchmarks.cli_startup` prints a table; none of its commands imports torch (no timing asserted)."""
    import sys

    from benchmarks import cli_startup

    out = tmp_path / "startup.json"
    monkeypatch.setattr(sys, "argv", ["cli_startup", "--quick", "--json", str(out)])
    cli_startup.main()
    text = capsys.readouterr().out
    assert "median s  imports torch" in text and "grownfx --help" in text
    results = json.loads(out.read_text())["results"]
    assert len(results) == 5 and not any(r["imports_torch"] for r in results.values())


def test_the_floor_step_trains_the_plain_model_exactly_as_the_plain_step_and_leaves_the_net_alone():
    """train_step's floor variant adds work beside the plain step, never a different step: the same losses and
    the same weights as the plain step on a copy, and the task-aware net's banks and scores untouched."""
    import copy

    from benchmarks import common as C
    from benchmarks.train_step import floor_step, scenario

    net, plain, shape, _ = scenario("lenet5", 3, 2)
    twin = copy.deepcopy(plain)
    before = {k: v.clone() for k, v in net.state_dict().items()}
    x, y = C.random_batch(8, shape, 10, torch.Generator().manual_seed(0))
    floor, ref = floor_step(net, plain), C.plain_step(twin)
    for _ in range(3):
        assert floor(x, y).item() == ref(x, y).item()
    for (name, a), b in zip(plain.named_parameters(), twin.parameters()):
        assert torch.equal(a, b), name
    after = net.state_dict()
    assert all(torch.equal(after[k], v) for k, v in before.items())
