"""Issue 14: the run folder survives kills, second writers, corrupt files and diverged training.

Every run here is tiny (digits, 2 tasks of 5 classes, 60 samples per split, 1 epoch): a few seconds each.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from grownfx import files
from grownfx.recipe.schema import Recipe
from grownfx.run import runner
from grownfx.run.export import export_complete, export_run, task_folder
from grownfx.run.runner import RunError, run


def tiny(out: Path | None, **changes) -> Recipe:
    d = {"name": "tiny", "seed": 0, "model": {"builder": "small_cnn", "seed_width": 0.5, "kwargs": {"in_channels": 1}},
         "data": {"name": "digits", "classes_per_task": 5, "limit_per_task": 60},
         "training": {"epochs": 1, "stage2_epochs": 1, "num_threads": 1,
                      "optimizer": {"name": "adam", "lr": 1e-3, "momentum": 0.0}},
         "growth": {"max_rounds": 1}, "target": {"rule": 0.0},
         "output": {"dir": str(out), "tensorboard": False, "export_format": "pt2"}}
    for key, value in changes.items():
        node = d
        *parents, last = key.split("__")
        for p in parents:
            node = node.setdefault(p, {})
        node[last] = value
    return Recipe.model_validate(d)


def quiet(msg):
    pass


SCRIPT = """
import sys
from grownfx.recipe.schema import Recipe
from grownfx.run.runner import run
run(Recipe.model_validate_json(sys.argv[1]), resume=sys.argv[2] == '1', echo=lambda m: print(m, flush=True))
"""


def _subprocess_run(r: Recipe, kill_at: str, resume: bool = False) -> subprocess.CompletedProcess:
    env = dict(os.environ, OMP_NUM_THREADS="1", GROWNFX_TEST_KILL_AT=kill_at)
    return subprocess.run([sys.executable, "-c", SCRIPT, r.model_dump_json(), "1" if resume else "0"], env=env,
                          capture_output=True, text=True, timeout=300)


# --- 1. a kill between a task's checkpoint and its export ---------------------------------------------------


def test_kill_between_checkpoint_and_export_is_finished_by_resume(tmp_path):
    r = tiny(tmp_path / "run")
    proc = _subprocess_run(r, "after_checkpoint")
    assert proc.returncode == 137, proc.stdout + proc.stderr
    out = tmp_path / "run"
    assert (out / "checkpoints/last.pt").exists() and not export_complete(task_folder(out, 0), "pt2")
    result = run(r, resume=True, echo=quiet)
    assert len(result.records) == 2
    for t in range(2):
        assert export_complete(task_folder(out, t), "pt2"), t
    meta = json.loads((task_folder(out, 0) / "meta.json").read_text())
    # `grownfx export` writes the same meta as the run (mean, std, classes, input shape, ...)
    export_run(out, 0, "pt2")
    again = json.loads((task_folder(out, 0) / "meta.json").read_text())
    for key in ("mean", "std", "classes", "input_shape", "num_classes", "preprocessing", "macs", "name"):
        assert again[key] == meta[key], key


def test_export_writes_the_run_meta_after_the_export_folder_is_deleted(tmp_path):
    out = tmp_path / "run"
    run(tiny(out), echo=quiet)
    meta = json.loads((task_folder(out, 1) / "meta.json").read_text())
    for p in task_folder(out, 1).iterdir():
        p.unlink()
    export_run(out, 1, "pt2")
    again = json.loads((task_folder(out, 1) / "meta.json").read_text())
    assert {k: v for k, v in again.items() if k != "formats"} == {k: v for k, v in meta.items() if k != "formats"}
    assert again["formats"]["pt2"]["sha256"] == files.file_sha256(task_folder(out, 1) / "model.pt2")


# --- 2. one writer per run folder ---------------------------------------------------------------------------


def test_a_second_writer_is_refused_and_a_stale_lock_is_taken_over(tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    with files.FolderLock(out):  # another process writing the folder
        with pytest.raises(RunError, match="in use by another grownfx process"):
            run(tiny(out), out_dir=out, echo=quiet)
        with pytest.raises(RunError, match="in use"):
            run(tiny(out), out_dir=out, resume=True, echo=quiet)
    # a lock file left by a process that died (its pid written, no flock held) does not block
    (out / ".lock").write_text("999999")
    run(tiny(out), out_dir=out, echo=quiet)
    assert (out / "summary.json").exists()


# --- 3. --out holding something else ------------------------------------------------------------------------


def test_out_that_is_not_empty_and_not_a_run_is_refused(tmp_path):
    out = tmp_path / "mine"
    out.mkdir()
    (out / "summary.csv").write_text("precious")
    with pytest.raises(RunError, match="not empty"):
        run(tiny(out), out_dir=out, echo=quiet)
    assert (out / "summary.csv").read_text() == "precious" and not (out / "config.resolved.yaml").exists()


def test_same_command_twice_makes_numbered_folders_and_resume_takes_the_latest(tmp_path):
    base = tmp_path / "tiny"
    lines: list[str] = []
    first = run(tiny(base), echo=lines.append)
    second = run(tiny(base), echo=lines.append)
    assert first.out_dir == base and second.out_dir == tmp_path / "tiny-2"
    assert f"writing run folder {tmp_path / 'tiny-2'}" in lines
    resumed = run(tiny(base), resume=True, echo=lines.append)
    assert resumed.out_dir == tmp_path / "tiny-2"
    with pytest.raises(RunError, match="already holds a run"):  # an explicit --out is never renumbered
        run(tiny(base), out_dir=base, echo=quiet)


# --- 4. the checkpoint is the source of truth ---------------------------------------------------------------


class Crash(Exception):
    pass


def crash_after_each_checkpoint(monkeypatch):
    """Every mid-task checkpoint is written, then the run stops as a kill right after it would; returns the real
    checkpoint method (to put back)."""
    original = runner._Run.mid_task_checkpoint

    def crash_after(self, *args):
        original(self, *args)
        raise Crash

    monkeypatch.setattr(runner._Run, "mid_task_checkpoint", crash_after)
    return original


def test_resume_keeps_the_checkpoint_event_and_rebuilds_deleted_files(tmp_path, monkeypatch):
    r = tiny(tmp_path / "run", training__epochs=3, training__checkpoint_every=1)
    original = crash_after_each_checkpoint(monkeypatch)
    with pytest.raises(Crash):
        run(r, echo=quiet)  # a kill right after the first mid-task checkpoint
    monkeypatch.setattr(runner._Run, "mid_task_checkpoint", original)
    out = tmp_path / "run"
    (out / "metrics.jsonl").unlink()
    (out / "config.resolved.yaml").unlink()
    run(r, resume=True, echo=quiet)
    events = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [e["event"] for e in events[:2]] == ["epoch", "checkpoint"], events[:3]
    assert sum(e["event"] == "task" for e in events) == 2
    assert "seed_width: 0.5" in (out / "config.resolved.yaml").read_text()


def test_a_task_killed_after_a_checkpoint_counts_its_seconds_before_the_kill(tmp_path, monkeypatch):
    """time_s after a kill and a resume is the time before the kill (as of the checkpoint) plus the time after:
    a frozen clock that always reads 7 s gives 14 s, not 7 (the checkpoint used to carry the seconds of a stop
    only)."""
    import grownfx.learn.learner as learner_module

    class FrozenClock:
        seconds = cpu_seconds = 7.0

    monkeypatch.setattr(learner_module, "Timer", FrozenClock)
    r = tiny(tmp_path / "run", training__epochs=3, training__checkpoint_every=1)
    original = crash_after_each_checkpoint(monkeypatch)
    with pytest.raises(Crash):
        run(r, echo=quiet)  # a kill right after the first task's first mid-task checkpoint
    monkeypatch.setattr(runner._Run, "mid_task_checkpoint", original)
    run(r, resume=True, echo=quiet)
    tasks = json.loads((tmp_path / "run" / "summary.json").read_text())["tasks"]
    assert [t["time_s"] for t in tasks] == [14.0, 7.0]


def test_a_run_killed_before_its_first_checkpoint_starts_again_with_a_clean_log(tmp_path, monkeypatch):
    r = tiny(tmp_path / "run", training__epochs=2, training__checkpoint_every=1)

    def crash_before(self, *args):
        raise Crash  # like a kill after the first epoch was logged, before any checkpoint was written

    monkeypatch.setattr(runner._Run, "mid_task_checkpoint", crash_before)
    with pytest.raises(Crash):
        run(r, echo=quiet)
    out = tmp_path / "run"
    assert not (out / "checkpoints" / "last.pt").exists() and (out / "metrics.jsonl").read_text()
    monkeypatch.undo()  # the real checkpoint method again, then a kill right after it
    crash_after_each_checkpoint(monkeypatch)
    with pytest.raises(Crash):
        run(r, resume=True, echo=quiet)  # started again, up to its first checkpoint
    events = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    # the killed attempt's epoch is not in the log twice: it holds what an uninterrupted run's holds there
    assert [e["event"] for e in events] == ["epoch", "checkpoint"], events


def test_resuming_a_checkpoint_that_predates_its_log_lines_cuts_the_log_back_to_it(tmp_path, monkeypatch):
    r = tiny(tmp_path / "run", training__epochs=3, training__checkpoint_every=1)
    crash_after_each_checkpoint(monkeypatch)
    with pytest.raises(Crash):
        run(r, echo=quiet)
    out = tmp_path / "run"
    last = out / "checkpoints" / "last.pt"
    state = files.load(last)
    del state["metrics"]  # written by a grownfx that kept only the count of lines the checkpoint covers
    files.atomic_save(state, last)
    logged = (out / "metrics.jsonl").read_text().splitlines()
    assert len(logged) == state["metrics_lines"] == 2
    files.append_line(json.dumps({"event": "epoch", "task": 0, "after": "the checkpoint"}), out / "metrics.jsonl")
    with pytest.raises(Crash):
        run(r, resume=True, echo=quiet)  # resumed, up to its next checkpoint
    lines = (out / "metrics.jsonl").read_text().splitlines()
    assert lines[:2] == logged and "the checkpoint" not in "".join(lines)
    assert [json.loads(line)["event"] for line in lines[2:]] == ["epoch", "checkpoint"], lines


# --- 5. atomic writes with the user's umask -----------------------------------------------------------------


def test_result_files_get_the_umask_mode_and_stale_temps_are_removed(tmp_path):
    old = os.umask(0o022)
    try:
        out = tmp_path / "run"
        run(tiny(out), echo=quiet)
        for name in ("checkpoints/last.pt", "summary.json", "stream.json", "acc_matrix.csv", "config.resolved.yaml",
                     "exports/task_1/meta.json"):
            assert (out / name).stat().st_mode & 0o777 == 0o644, name
        stale = out / "summary.json.k2j3h4.tmp"
        stale.write_text("{")
        run(tiny(out), resume=True, echo=quiet)
        assert not stale.exists()
    finally:
        os.umask(old)


def test_full_disk_names_the_path_and_leaves_no_temp(tmp_path, monkeypatch):
    import errno

    def full(fd):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(files.os, "fsync", full)
    with pytest.raises(OSError, match="no space left on the device writing .*summary.json"):
        files.atomic_write_json({"a": 1}, tmp_path / "summary.json")
    assert list(tmp_path.iterdir()) == []


# --- 6. divergence ------------------------------------------------------------------------------------------


def test_diverged_training_stops_with_a_clear_error_and_writes_no_checkpoint_or_export(tmp_path):
    out = tmp_path / "run"
    with pytest.raises(RunError, match=r"training diverged: .* in task 1, stage \w+( round \d)?, epoch \d+"):
        run(tiny(out, training__optimizer={"name": "sgd", "lr": 1e30, "momentum": 0.0}), echo=quiet)
    assert not (out / "checkpoints/last.pt").exists() and not (out / "exports").exists()


def test_diverged_scratch_reference_stops_the_run(tmp_path):
    with pytest.raises(RunError, match="stage scratch"):
        run(tiny(tmp_path / "run", target={"rule": "scratch - 1.0"},
                 training__optimizer={"name": "sgd", "lr": 1e30, "momentum": 0.0}), echo=quiet)


@pytest.mark.parametrize("value", [float("inf"), float("nan"), float("-inf")])
def test_recipes_reject_non_finite_numbers(tmp_path, value):
    from pydantic import ValidationError

    with pytest.raises(ValidationError, match="finite"):
        tiny(tmp_path, training__optimizer={"name": "sgd", "lr": value})


# --- 7. checkpoint integrity --------------------------------------------------------------------------------


@pytest.mark.parametrize("damage", ["truncate", "empty", "flip"])
def test_corrupt_checkpoint_is_one_clear_error_naming_the_file(tmp_path, damage):
    out = tmp_path / "run"
    run(tiny(out), echo=quiet)
    last = out / "checkpoints" / "last.pt"
    data = last.read_bytes()
    if damage == "truncate":
        last.write_bytes(data[: len(data) // 2])
    elif damage == "empty":
        last.write_bytes(b"")
    else:
        last.write_bytes(data[:100] + bytes([data[100] ^ 1]) + data[101:])
    with pytest.raises(RunError, match=f"{last}.*(corrupt|empty)") as info:
        run(tiny(out), resume=True, echo=quiet)
    assert "weights_only" not in str(info.value)
    with pytest.raises(files.CorruptFileError, match=str(last)):
        export_run(out, 0, "pt2")


# --- 8. num_threads changes what is learned -----------------------------------------------------------------


def test_resume_with_another_thread_count_is_refused(tmp_path):
    out = tmp_path / "run"
    run(tiny(out), echo=quiet)
    with pytest.raises(RunError, match="training.num_threads"):
        run(tiny(out, training__num_threads=2), resume=True, echo=quiet)


# --- compare: folders, and a diverged reference -------------------------------------------------------------


def test_compare_marks_a_diverged_reference_failed_instead_of_setting_targets(tmp_path):
    from grownfx.run.compare import run_compare

    r = tiny(tmp_path / "c", target={"rule": "scratch - 1.0"},
             training__optimizer={"name": "sgd", "lr": 1e30, "momentum": 0.0})
    with pytest.raises(RuntimeError, match="2 run"):
        run_compare(r, ["scratch", "grown"], out_dir=tmp_path / "cmp")
    index = json.loads((tmp_path / "cmp" / "compare.json").read_text())
    assert {(e["method"], e["status"]) for e in index["runs"]} == {("scratch", "failed"), ("grown", "failed")}
    assert "diverged" in next(e["error"] for e in index["runs"] if e["method"] == "grown")
    assert not index["targets"]


def test_compare_with_an_override_gets_a_new_folder_and_explicit_out_is_refused(tmp_path):
    from grownfx.run.compare import run_compare

    first = run_compare(tiny(tmp_path / "c"), ["finetune"])
    assert first == tmp_path / "c_compare"
    again = run_compare(tiny(tmp_path / "c"), ["finetune"])  # the same comparison: continued (reused)
    assert again == first
    other = run_compare(tiny(tmp_path / "c", training__epochs=2), ["finetune"])
    assert other == tmp_path / "c_compare-2"
    with pytest.raises(RunError, match="another recipe"):
        run_compare(tiny(tmp_path / "c", training__epochs=3), ["finetune"], out_dir=first)


# --- 9. decisions need validation data ----------------------------------------------------------------------


def test_recipe_whose_decisions_have_no_validation_data_is_refused(tmp_path):
    from pydantic import ValidationError

    with pytest.raises(ValidationError, match="val_fraction is 0"):
        tiny(tmp_path, data={"name": "digits", "classes_per_task": 5, "val_fraction": 0.0})
    tiny(tmp_path, data={"name": "digits", "classes_per_task": 5, "val_fraction": 0.0},
         method={"name": "finetune"})  # reports val accuracy, decides nothing on it


def test_a_tiny_or_empty_validation_split_is_warned_or_refused(tmp_path):
    from types import SimpleNamespace

    def stream(n_val):
        return SimpleNamespace(tasks=[SimpleNamespace(val=[0] * n_val, num_classes=5)])

    lines: list[str] = []
    runner.check_validation(tiny(tmp_path), stream(12), lines.append)
    assert lines and "fewer than 10 per class" in lines[0] and "noisy" in lines[0]
    with pytest.raises(RunError, match="task 1 has no validation samples"):
        runner.check_validation(tiny(tmp_path), stream(0), lines.append)
    lines.clear()
    runner.check_validation(tiny(tmp_path), stream(50), lines.append)
    assert not lines


def test_a_run_warns_about_the_small_validation_splits_of_the_stream_it_builds(tmp_path, monkeypatch):
    def learn(*args):
        raise Crash  # the warnings come before anything is learned

    lines: list[str] = []
    monkeypatch.setattr(runner, "_Run", learn)
    with pytest.raises(Crash):
        run(tiny(tmp_path / "run", data__val_fraction=0.01), echo=lines.append)  # 10 validation samples, 5 classes
    warned = [line for line in lines if "validation samples" in line]
    assert [line.split(" has ")[0] for line in warned] == ["warning: task 1", "warning: task 2"], lines
    assert "10 validation samples for 5 classes" in warned[0] and "noisy" in warned[0]


# --- 10. 16-bit PNGs, decompression bombs -------------------------------------------------------------------


def test_16_bit_png_is_scaled_not_clipped(tmp_path):
    import numpy as np
    from PIL import Image

    from grownfx.data.folder import read_images

    a = (np.arange(64, dtype=np.uint16).reshape(8, 8) * 1000)
    Image.fromarray(a).save(tmp_path / "g16.png")
    x = read_images([tmp_path / "g16.png"], None, 1)
    assert x.dtype == np.uint8 and x.max() == 245 and x[0, 0, 0, 1] == 4  # 1000/65535*255, not 255


def test_decompression_bomb_names_the_file(tmp_path, monkeypatch):
    import numpy as np
    from PIL import Image

    from grownfx.data import DatasetError
    from grownfx.data.folder import read_images

    Image.fromarray(np.zeros((8, 8), dtype=np.uint8)).save(tmp_path / "bomb.png")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 10)
    with pytest.raises(DatasetError, match="bomb.png"):
        read_images([tmp_path / "bomb.png"], None, 1)


def test_a_builder_returning_a_tuple_is_a_clear_error(tmp_path, monkeypatch):
    import types

    import torch

    from grownfx.models import BuilderError, build_backbone

    mod = types.ModuleType("my_models")
    mod.pair = lambda num_classes: (torch.nn.Linear(4, num_classes), "info")
    monkeypatch.setitem(sys.modules, "my_models", mod)
    with pytest.raises(BuilderError, match="'my_models:pair' returned a tuple, not a torch.nn.Module"):
        build_backbone("my_models:pair", 3)


@pytest.mark.parametrize("content", ["empty_split", "empty_file", "missing"])
def test_empty_or_missing_cifar_splits_name_the_file(tmp_path, content):
    import pickle

    import numpy as np

    from grownfx.data import DatasetError
    from grownfx.data.cifar import load_cifar100

    folder = tmp_path / "cifar-100-python"
    folder.mkdir()
    split = {b"data": np.zeros((0, 3072), np.uint8), b"fine_labels": [], b"coarse_labels": []}
    for name in ("train", "test", "meta"):
        (folder / name).write_bytes(pickle.dumps(split if name != "meta" else {}))
    if content == "empty_file":
        (folder / "train").write_bytes(b"")
    elif content == "missing":
        (folder / "train").unlink()
    with pytest.raises(DatasetError, match="train"):
        load_cifar100(tmp_path)


# --- a resumed run is the run never interrupted --------------------------------------------------------------


@pytest.mark.parametrize("crash_at", ["mid_task", "after_checkpoint"])
def test_resume_after_a_crash_ends_bit_identical(tmp_path, monkeypatch, crash_at):
    import torch

    changes = dict(training__epochs=2, training__checkpoint_every=1, data={"name": "digits", "classes_per_task": 5,
                                                                           "limit_per_task": 60})
    reference = run(tiny(tmp_path / "ref", **changes), echo=quiet)
    r = tiny(tmp_path / "run", **changes)
    calls = []
    if crash_at == "mid_task":
        original = runner._Run.mid_task_checkpoint

        def crash(self, *args):
            original(self, *args)
            calls.append(1)
            if len(calls) == 2:  # the first mid-task checkpoint of task 2
                raise Crash

        monkeypatch.setattr(runner._Run, "mid_task_checkpoint", crash)
    else:
        def crash(name):
            calls.append(name)
            if name == "after_checkpoint" and calls.count(name) == 1:  # task 1 checkpointed, not exported
                raise Crash

        monkeypatch.setattr(runner.files, "kill_point", crash)
    with pytest.raises(Crash):
        run(r, echo=quiet)
    monkeypatch.undo()  # the real checkpoint method again, then a kill right after it
    resumed = run(r, resume=True, echo=quiet)
    assert resumed.acc_matrix == reference.acc_matrix
    for t in range(2):
        a = torch.export.load(str(task_folder(tmp_path / "run", t) / "model.pt2")).module().state_dict()
        b = torch.export.load(str(task_folder(tmp_path / "ref", t) / "model.pt2")).module().state_dict()
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), t


def test_a_corrupt_export_is_detected_on_load(tmp_path):
    from grownfx.run.opening import load_export as load_exported

    out = tmp_path / "run"
    run(tiny(out), echo=quiet)
    model = task_folder(out, 1) / "model.pt2"
    load_exported(model)
    data = model.read_bytes()
    model.write_bytes(data[:-10])
    with pytest.raises(files.CorruptFileError, match="model.pt2 is corrupt"):
        load_exported(model)
    assert not export_complete(task_folder(out, 1), "pt2")
    run(tiny(out), resume=True, echo=quiet)  # the last task's export is re-created
    load_exported(model)


def test_a_crash_between_the_checksum_and_the_checkpoint_still_loads(tmp_path, monkeypatch):
    path = tmp_path / "x.pt"
    files.atomic_save({"v": 1}, path)

    def die(name):
        if name == "write:x.pt":
            raise Crash  # the new checksum is on disk, the new checkpoint is not

    monkeypatch.setattr(files, "_kill_point", die)
    for _ in range(2):  # twice: the checksum file must still vouch for the file actually on disk
        with pytest.raises(Crash):
            files.atomic_save({"v": 2}, path)
        assert files.load(path) == {"v": 1}
    monkeypatch.undo()  # the real checkpoint method again, then a kill right after it
    files.atomic_save({"v": 3}, path)
    assert files.load(path) == {"v": 3}
