"""Seeds that vary one thing at a time (`data.seed` apart from the training seed), CPU seconds beside wall time in
every record, and `summary.json` saying whether the run is complete."""

from __future__ import annotations

import json

import pytest
from grownfx.data import data_seed, stream_for
from grownfx.recipe.schema import Recipe
from grownfx.report.compare_report import beside_published, seeds_line
from grownfx.run.compare import run_compare, run_folder
from grownfx.run.runner import run


def recipe(tmp_path, **changes) -> Recipe:
    d = {"name": "seeds", "seed": 0, "device": "cpu",
         "model": {"builder": "small_cnn", "kwargs": {"in_channels": 1, "width": 4, "hidden": 8}},
         "data": {"name": "digits", "num_tasks": 2, "limit_per_task": 40},
         "method": {"name": "finetune", "keep_copies": False},
         "training": {"epochs": 2, "batch_size": 16, "num_threads": 1},
         "output": {"dir": str(tmp_path / "{name}"), "tensorboard": False, "export_format": "none"}}
    for key, value in changes.items():
        section, _, field = key.partition("__")
        if field:
            d[section] = {**d[section], field: value}
        else:
            d[section] = value
    return Recipe.model_validate(d)


def ids(stream) -> list:
    return [(t.train.ids.tolist(), t.val.ids.tolist(), t.test.ids.tolist()) for t in stream.tasks]


def test_data_seed_is_its_own_and_a_recipe_without_one_keeps_its_old_meaning(tmp_path):
    old = [recipe(tmp_path, seed=s) for s in (0, 1)]
    assert [data_seed(r) for r in old] == [0, 1]  # no data.seed: the data follows the seed, as it always did
    assert ids(stream_for(old[0])) != ids(stream_for(old[1]))
    pinned = [recipe(tmp_path, seed=s, data__seed=0) for s in (0, 1, 2)]
    assert [data_seed(r) for r in pinned] == [0, 0, 0]
    streams = [ids(stream_for(r)) for r in pinned]
    assert streams[0] == streams[1] == streams[2] == ids(stream_for(old[0]))
    assert ids(stream_for(recipe(tmp_path, seed=0, data__seed=1))) == ids(stream_for(old[1]))


def test_compare_varies_the_training_seed_or_the_data_seed_and_says_which(tmp_path):
    out = run_compare(recipe(tmp_path, seed=0), ["finetune[forgetting]"], seeds=[0, 1], out_dir=tmp_path / "c")
    index = json.loads((out / "compare.json").read_text())
    assert (index["seeds"], index["data_seeds"]) == ([0, 1], [0])
    assert "training seeds 0, 1; data seed 0 (fixed): varied training" in seeds_line(index)
    runs = {r["seed"]: json.loads((out / r["dir"] / "summary.json").read_text()) for r in index["runs"]}
    assert {s: (r["seed"], r["data_seed"]) for s, r in runs.items()} == {0: (0, 0), 1: (1, 0)}
    streams = [json.loads((out / "finetune-forgetting" / run_folder(s, 0) / "stream.json").read_text())["tasks"] for s in (0, 1)]
    assert streams[0] == streams[1]  # the same data; only the training seed differs
    assert (tmp_path / "c" / "finetune-forgetting" / "seed1-data0" / "summary.json").is_file()

    out = run_compare(recipe(tmp_path, seed=0), ["finetune[forgetting]"], seeds=[0], data_seeds=[1, 2],
                      out_dir=tmp_path / "d")
    index = json.loads((out / "compare.json").read_text())
    assert (index["seeds"], index["data_seeds"]) == ([0], [1, 2])
    assert "training seed 0 (fixed); data seeds 1, 2: varied data" in seeds_line(index)
    streams = [json.loads((out / "finetune-forgetting" / run_folder(0, d) / "stream.json").read_text())["tasks"] for d in (1, 2)]
    assert streams[0] != streams[1]
    report = (__import__("grownfx.report.compare_report", fromlist=["x"]).write_compare_report(out) / "compare.md")
    assert "varied data" in report.read_text()


def test_an_index_from_before_data_seeds_says_seed_and_data_varied_together():
    assert "training and data varied together" in seeds_line({"seeds": [0, 1, 2]})


def test_published_rows_stand_beside_the_method_they_publish():
    own = {m: [m] for m in ("scratch", "den", "grown", "grown[+lsg]", "ewc")}
    published = {f"{n} (published)": [f"{n} (published)"] for n in ("Scratch", "DEN", "CPG", "GROWN", "Fine-tune")}
    rows = [r[0] for r in beside_published(own, published)]
    assert rows == ["scratch", "Scratch (published)", "den", "DEN (published)", "grown", "grown[+lsg]",
                    "GROWN (published)", "ewc", "CPG (published)", "Fine-tune (published)"]
    own = {"finetune": ["finetune"], "finetune[forgetting]": ["finetune[forgetting]"]}
    assert [r[0] for r in beside_published(own, {"Fine-tune (published)": ["Fine-tune (published)"]})] == \
        ["finetune", "finetune[forgetting]", "Fine-tune (published)"]


class _StopAt:
    """A progress display that stops the run (Ctrl-C) in task `task`'s first epoch."""

    def __init__(self, task: int):
        self.task = task

    def start_task(self, *a, **k):
        pass

    def end_task(self, *a, **k):
        pass

    def epoch(self, info: dict) -> None:
        if info["task"] == self.task:
            raise KeyboardInterrupt


def test_summary_says_whether_the_run_is_complete_and_records_cpu_time(tmp_path):
    r = recipe(tmp_path, training__checkpoint_every=1)
    with pytest.raises(KeyboardInterrupt):
        run(r, echo=lambda m: None, progress=_StopAt(task=1))
    out = tmp_path / "seeds"
    partial = json.loads((out / "summary.json").read_text())
    assert (partial["complete"], partial["tasks_done"], partial["num_tasks"]) == (False, 1, 2)
    whole = run(r, resume=True, echo=lambda m: None).summary
    assert (whole["complete"], whole["tasks_done"]) == (True, 2)
    assert json.loads((out / "summary.json").read_text())["complete"] is True
    for t in whole["tasks"]:  # CPU seconds beside wall seconds, per task and per epoch
        assert t["cpu_s"] > 0 and t["cpu_s_per_epoch"] == pytest.approx(t["cpu_s"] / t["epochs"])
    assert whole["total_cpu_s"] == pytest.approx(sum(t["cpu_s"] for t in whole["tasks"]))
    # each task's accuracy when learned and at the end are the accuracy matrix's, across the resume too
    R = json.loads((out / "acc_matrix.json").read_text())["matrix"]
    assert [(t["acc_when_learned"], t["acc_final"]) for t in whole["tasks"]] == [(R[0][0], R[1][0]), (R[1][1], R[1][1])]
    epochs = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    epochs = [e for e in epochs if e["event"] == "epoch"]
    assert epochs and all(e["cpu_seconds"] >= 0 for e in epochs)


def test_a_resumed_task_counts_its_cpu_time_before_the_interruption(tmp_path, monkeypatch):
    """A clock of the test's own: 50 CPU seconds pass in task 2 before its first mid-task checkpoint and the run
    stops there; none pass after the resume.  The task's record must say 50."""
    import time

    import grownfx.run.runner as runner

    clock = [0.0]
    monkeypatch.setattr(time, "process_time", lambda: clock[0])
    r = recipe(tmp_path, training__checkpoint_every=1, training__epochs=3)
    original = runner._Run.mid_task_checkpoint

    def stop_in_task_2(self, *args):
        if len(self.records) == 1:
            clock[0] += 50.0
        original(self, *args)
        if len(self.records) == 1:  # task 2's first mid-task checkpoint is on disk: stop like a kill would
            raise KeyboardInterrupt

    monkeypatch.setattr(runner._Run, "mid_task_checkpoint", stop_in_task_2)
    with pytest.raises(KeyboardInterrupt):
        run(r, echo=lambda m: None)
    monkeypatch.setattr(runner._Run, "mid_task_checkpoint", original)
    whole = run(r, resume=True, echo=lambda m: None).summary
    assert whole["tasks"][1]["cpu_s"] == 50.0 and whole["tasks"][1]["cpu_s_per_epoch"] == pytest.approx(50.0 / 3)
