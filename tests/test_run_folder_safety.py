"""Issue 24: a run folder from anyone is safe to open, and no file grownfx writes is ever half-written or silently
wrong.  One test (or a few) per numbered cause of the issue, named `test_<N>_...`; docs/outputs.md#guarantees
names them.  Each was run on the code before the fix and failed there (the issue's note says how).

Every run here is the tiny 2-task digits run of test_reliability.py (a few seconds), made once and copied.
"""

from __future__ import annotations

import errno
import hashlib
import io
import json
import os
import shlex
import shutil
import signal
import subprocess
import sys
import uuid
import zipfile
from pathlib import Path

import pytest
import torch
import yaml

from cli_helpers import invoke
from grownfx import files
from grownfx.engine import multitask_runtime as R
from grownfx.run.export import export_complete, export_run, task_folder
from test_reliability import quiet, tiny

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def finished(tmp_path_factory) -> Path:
    from grownfx.run.runner import run

    out = tmp_path_factory.mktemp("finished") / "run"
    run(tiny(out), echo=quiet)
    return out


@pytest.fixture
def run_dir(finished, tmp_path) -> Path:
    """A copy of a finished 2-task run, with the recipe file a user would resume it with (tmp_path/tiny.yaml)."""
    out = tmp_path / "run"
    shutil.copytree(finished, out)
    recipe = tiny(out).model_dump(mode="json")
    (tmp_path / "tiny.yaml").write_text(yaml.safe_dump(recipe))
    return out


def _one_line(result) -> str:
    """The one line a refused command prints (besides `run`'s own "resuming run folder ..."), no traceback."""
    lines = [ln for ln in result.output.strip().splitlines() if ln.strip() and "ing run folder " not in ln]
    assert len(lines) == 1 and "Traceback" not in result.output, result.output
    return lines[0]


def _flip(data: bytes, member: str, count: int, zip_member: bool = True) -> bytes:
    """`data` (a zip archive) with `count` bytes flipped in the middle of `member`'s stored payload: the archive
    still opens and torch still loads it; only the values change."""
    zf = zipfile.ZipFile(io.BytesIO(data))
    info = next(i for i in zf.infolist() if i.filename.endswith(member))
    assert info.compress_type == zipfile.ZIP_STORED
    header = data[info.header_offset: info.header_offset + 30]
    start = info.header_offset + 30 + int.from_bytes(header[26:28], "little") + int.from_bytes(header[28:30], "little")
    mid = start + info.file_size // 2
    out = bytearray(data)
    for k in range(count):
        out[mid + k] ^= 0x5A
    return bytes(out)


# --- 1. opening a run folder runs no code it names ----------------------------------------------------------


MARKER_BUILDER = """
import os, pathlib
pathlib.Path(os.environ["GROWNFX_TEST_MARKER"]).write_text("imported")

def build(num_classes=10, **kwargs):
    pathlib.Path(os.environ["GROWNFX_TEST_MARKER"]).write_text("called")
    from grownfx.models import small_cnn
    return small_cnn(num_classes=num_classes, **kwargs)
"""


def _tamper(run_dir: Path, model: dict) -> None:
    """What an attacker does: the checkpoint's stored recipe (and config.resolved.yaml) name their builder, and
    the checksum file is updated to match."""
    state = files.load(run_dir / "checkpoints/last.pt")
    state["recipe"]["model"].update(model)
    files.atomic_save(state, run_dir / "checkpoints/last.pt")
    resolved = yaml.safe_load((run_dir / "config.resolved.yaml").read_text())
    resolved["model"].update(model)
    (run_dir / "config.resolved.yaml").write_text(yaml.safe_dump(resolved))


@pytest.fixture(params=["module", "torch.hub"])
def tampered(request, run_dir, tmp_path, monkeypatch) -> tuple[Path, Path]:
    marker = tmp_path / "marker"
    monkeypatch.setenv("GROWNFX_TEST_MARKER", str(marker))
    monkeypatch.delenv("GROWNFX_TRUST", raising=False)
    if request.param == "module":
        name = f"grownfx_marker_{uuid.uuid4().hex[:8]}"
        (tmp_path / "mods").mkdir()
        (tmp_path / "mods" / f"{name}.py").write_text(MARKER_BUILDER)
        monkeypatch.syspath_prepend(str(tmp_path / "mods"))
        _tamper(run_dir, {"builder": f"{name}:build"})
    else:  # a local torch.hub repo: its hubconf.py runs when torch.hub.load reads it
        (tmp_path / "hub").mkdir()
        (tmp_path / "hub" / "hubconf.py").write_text(MARKER_BUILDER)
        _tamper(run_dir, {"builder": "torch.hub:load", "kwargs": {
            "repo_or_dir": str(tmp_path / "hub"), "model": "build", "source": "local", "in_channels": 1}})
    return run_dir, marker


def test_1_opening_a_tampered_run_folder_runs_no_code_it_names(tampered, tmp_path):
    run_dir, marker = tampered
    refused = [["export", str(run_dir), "--task", "1"], ["export", str(run_dir), "--all-tasks"],
               ["inspect", str(run_dir)], ["inspect", str(run_dir / "config.resolved.yaml")],
               ["validate", str(run_dir / "config.resolved.yaml")],
               ["run", str(run_dir / "config.resolved.yaml"), "--resume", "--out", str(run_dir)]]
    for args in refused:
        result = invoke(*args)
        line = _one_line(result)
        assert result.exit_code == 2 and "names code" in line and "--trust" in line, (args, result.output)
        assert not marker.exists(), args
    assert invoke("report", str(run_dir)).exit_code == 0  # report reads JSON and YAML only
    # the user's own recipe resumes nothing the folder names: its builder differs from the stored one
    result = invoke("run", str(tmp_path / "tiny.yaml"), "--resume", "--out", str(run_dir))
    assert result.exit_code == 2 and "model.builder" in result.output
    assert not marker.exists()
    # the threat is real: trusting the folder runs what it names
    result = invoke("export", str(run_dir), "--task", "1", "--trust")
    assert result.exit_code == 0, result.output
    assert marker.exists()


def test_1_trust_from_the_environment_and_python(tampered, monkeypatch):
    from grownfx.recipe.trust import UntrustedCodeError
    from grownfx.run.opening import restore_method

    run_dir, marker = tampered
    with pytest.raises(UntrustedCodeError, match="names code"):
        restore_method(run_dir)
    monkeypatch.setenv("GROWNFX_TRUST", "1")
    with pytest.raises(UntrustedCodeError):
        restore_method(run_dir, trust=False)  # an explicit False wins over the environment
    assert not marker.exists()
    restore_method(run_dir)
    assert marker.exists()


# --- 2. the export format runs code on load: grownfx's loader checks before torch reads ---------------------


class _Touch:
    def __init__(self, path: Path):
        self.path = str(path)

    def __reduce__(self):
        return (os.system, (f"touch {self.path}",))


def _with_member(archive: bytes, suffix: str, payload: bytes) -> bytes:
    src = zipfile.ZipFile(io.BytesIO(archive))
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_STORED) as out:
        for info in src.infolist():
            out.writestr(info.filename, payload if info.filename.endswith(suffix) else src.read(info.filename))
    return buf.getvalue()


def test_2_a_pt2_whose_pickles_run_code_is_refused_before_torch_reads_it(run_dir, tmp_path):
    from grownfx import load_export

    marker = tmp_path / "pwned"
    model = task_folder(run_dir, 0) / "model.pt2"
    load_export(model)  # the run's own export loads
    evil = io.BytesIO()
    torch.save(_Touch(marker), evil)
    bad = _with_member(model.read_bytes(), "data/sample_inputs/model.pt", evil.getvalue())
    model.write_bytes(bad)
    meta = json.loads((model.parent / "meta.json").read_text())
    meta["formats"]["pt2"]["sha256"] = hashlib.sha256(bad).hexdigest()  # the attacker updates the checksum too
    (model.parent / "meta.json").write_text(json.dumps(meta))
    with pytest.raises(files.CorruptFileError, match="sample_inputs/model.pt, a pickle that only loads by running"):
        load_export(model)
    with pytest.raises(files.CorruptFileError, match="refused"):
        load_export(model, verify=False)
    assert not marker.exists()
    # the threat is real: torch.export.load falls back to weights_only=False and runs it
    try:
        torch.export.load(str(model))
    except Exception:
        pass
    assert marker.exists()


def test_2_archive_parts_grownfx_never_writes_are_refused(run_dir):
    archive = (task_folder(run_dir, 0) / "model.pt2").read_bytes()
    root = zipfile.ZipFile(io.BytesIO(archive)).namelist()[0].split("/")[0]
    buf = io.BytesIO(archive)
    with zipfile.ZipFile(buf, "a") as zf:  # an AOTInductor library, which torch.export.load would load
        zf.writestr(f"{root}/data/aotinductor/model/model.so", b"\x7fELF")
    with pytest.raises(R.IntegrityError, match="aotinductor"):
        R.check_archive(buf.getvalue(), "x.pt2")
    with pytest.raises(R.IntegrityError, match="refused"):
        R.load_program(buf.getvalue(), "batch")  # the all-tasks loader checks each of its programs the same way


def test_2_torchscript_loads_only_when_trusted(run_dir, monkeypatch):
    from grownfx import load_export
    from grownfx.recipe.trust import UntrustedCodeError

    monkeypatch.delenv("GROWNFX_TRUST", raising=False)
    export_run(run_dir, 1, "torchscript")
    with pytest.raises(UntrustedCodeError, match="TorchScript"):
        load_export(task_folder(run_dir, 1) / "model.ts")
    x = torch.randn(2, 1, 8, 8)
    assert torch.allclose(load_export(task_folder(run_dir, 1) / "model.ts", trust=True)(x),
                          load_export(task_folder(run_dir, 1))(x), atol=1e-5)


# --- 3. a checkpoint without its checksum file is not loaded unchecked --------------------------------------


@pytest.mark.parametrize("sidecar", ["missing", "unreadable"])
def test_3_flipped_bytes_with_the_checksum_file_gone_are_refused(run_dir, tmp_path, sidecar):
    last = run_dir / "checkpoints/last.pt"
    good = files.load(last)
    last.write_bytes(_flip(last.read_bytes(), "data/0", 4))
    flipped = torch.load(last, weights_only=True)  # it still loads, with other weights: silently wrong
    assert not all(torch.equal(a, b) for a, b in zip(_tensors(good), _tensors(flipped)))
    if sidecar == "missing":
        files.checksum_path(last).unlink()
    else:
        files.checksum_path(last).write_text("{not json")
    before = {p: p.read_bytes() for p in run_dir.rglob("*") if p.is_file()}
    for args in (["export", str(run_dir), "--task", "1"],
                 ["run", str(tmp_path / "tiny.yaml"), "--resume", "--out", str(run_dir)]):
        result = invoke(*args)
        line = _one_line(result)
        assert result.exit_code == 2 and "cannot be checked" in line and "--no-verify" in line, result.output
    assert {p: p.read_bytes() for p in run_dir.rglob("*") if p.is_file() and p.name != ".lock"} == \
        {p: b for p, b in before.items() if p.name != ".lock"}
    # loudly, on request
    result = invoke("export", str(run_dir), "--task", "1", "--no-verify")
    assert result.exit_code == 0 and "warning: --no-verify" in result.output, result.output


def _tensors(state) -> list[torch.Tensor]:
    out = []

    def walk(v):
        if isinstance(v, torch.Tensor):
            out.append(v)
        elif isinstance(v, dict):
            for x in v.values():
                walk(x)
        elif isinstance(v, (list, tuple)):
            for x in v:
                walk(x)

    walk(state)
    return out


# --- 4. the all-tasks file is checked against its meta.json --------------------------------------------------


def test_4_multitask_load_checks_the_sha256_in_meta_json(run_dir):
    result = invoke("export", str(run_dir), "--all-tasks")
    assert result.exit_code == 0, result.output
    folder = run_dir / "exports/all_tasks"
    path = folder / "model.pt"
    x = torch.randn(3, 1, 8, 8)
    want = R.load(path)(x, task=1)
    path.write_bytes(_flip(path.read_bytes(), "data/0", 16))
    assert not torch.equal(R.load(path, verify=False)(x, task=1), want)  # silently wrong without the check
    with pytest.raises(R.IntegrityError, match="does not match the one in meta.json"):
        R.load(path)
    (folder / "meta.json").unlink()
    with pytest.raises(R.IntegrityError, match="cannot be checked"):
        R.load(path)
    # the copy beside the file (what a serving machine without grownfx imports) checks the same
    code = ("import sys; sys.path.insert(0, sys.argv[1]); from multitask import load, IntegrityError\n"
            "try:\n    load(sys.argv[2])\nexcept IntegrityError as e:\n    print('refused:', e)\n")
    proc = subprocess.run([sys.executable, "-c", code, str(folder), str(path)], capture_output=True, text=True,
                          timeout=120)
    assert "refused:" in proc.stdout and "cannot be checked" in proc.stdout, proc.stdout + proc.stderr


# --- 5. results without a checkpoint are refused, never overwritten -----------------------------------------


def test_5_a_folder_with_results_but_no_checkpoint_is_refused(run_dir, tmp_path):
    (run_dir / "checkpoints/last.pt").unlink()
    before = {p: p.read_bytes() for p in run_dir.rglob("*") if p.is_file()}
    result = invoke("run", str(tmp_path / "tiny.yaml"), "--resume", "--out", str(run_dir))
    line = _one_line(result)
    assert result.exit_code == 2 and "holds results" in line and "no checkpoint" in line, result.output
    after = {p: p.read_bytes() for p in run_dir.rglob("*") if p.is_file()}
    assert {p: b for p, b in after.items() if p.name != ".lock"} == {p: b for p, b in before.items()
                                                                     if p.name != ".lock"}


# --- 6. an export is never half-written ----------------------------------------------------------------------


def test_6_a_failure_while_writing_an_export_keeps_the_previous_file(run_dir, monkeypatch):
    model = task_folder(run_dir, 1) / "model.pt2"
    old = model.read_bytes()
    meta = (model.parent / "meta.json").read_bytes()
    real = torch.export.save

    def dies_half_way(program, f, **kw):
        buf = io.BytesIO()
        real(program, buf, **kw)
        data = buf.getvalue()
        if isinstance(f, (str, os.PathLike)):
            with open(f, "wb") as out:
                out.write(data[: len(data) // 2])
        else:
            f.write(data[: len(data) // 2])
        raise OSError(errno.EIO, "the machine went down")

    monkeypatch.setattr(torch.export, "save", dies_half_way)
    with pytest.raises(OSError):
        export_run(run_dir, 1, "pt2")
    assert model.read_bytes() == old and (model.parent / "meta.json").read_bytes() == meta
    assert not list(model.parent.glob("*.tmp")) and export_complete(model.parent, "pt2")


_EXPORT = "import sys\nfrom grownfx.run.export import export_run\nexport_run(sys.argv[1], 1, 'pt2')\n"


@pytest.mark.parametrize("point", [pytest.param("rename:model.pt2", marks=pytest.mark.slow), "rename:meta.json"])
def test_6_a_kill_between_the_renames_of_an_export_leaves_whole_files(run_dir, point):
    from grownfx import load_export

    folder = task_folder(run_dir, 1)
    old = (folder / "model.pt2").read_bytes()
    env = dict(os.environ, OMP_NUM_THREADS="1", GROWNFX_TEST_KILL_AT=point)
    proc = subprocess.run([sys.executable, "-c", _EXPORT, str(run_dir)], env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 137, proc.stdout + proc.stderr  # killed (os._exit) with a complete temp file
    assert list(folder.glob("*.tmp"))
    x = torch.randn(2, 1, 8, 8)
    want = load_export(task_folder(run_dir, 0).parent / "task_2", verify=False)(x)
    if point == "rename:model.pt2":  # before the first rename: the old pair, untouched
        assert (folder / "model.pt2").read_bytes() == old and export_complete(folder, "pt2")
    else:  # between the two: a whole new model.pt2 and the old meta.json, which does not vouch for it
        assert (folder / "model.pt2").read_bytes() != old and not export_complete(folder, "pt2")
        with pytest.raises(files.CorruptFileError, match="does not match"):
            load_export(folder)
    assert torch.allclose(load_export(folder, verify=False)(x), want)  # the model file itself is whole
    result = invoke("export", str(run_dir), "--task", "2")  # the next export removes the temp and re-pairs
    assert result.exit_code == 0 and not list(folder.glob("*.tmp")) and export_complete(folder, "pt2")
    load_export(folder)


# --- 7. a full disk during an export -------------------------------------------------------------------------


@pytest.fixture
def file_size_limit():
    """The process's file-size limit (RLIMIT_FSIZE) lowered for the test: every writer, torch's C++ ones included,
    then gets a real EFBIG from the kernel past it (Python ignores SIGXFSZ), as on a full disk."""
    import resource

    old = resource.getrlimit(resource.RLIMIT_FSIZE)

    def lower(limit) -> None:  # None: back to the old limit
        resource.setrlimit(resource.RLIMIT_FSIZE, old if limit is None else (limit, old[1]))

    yield lower
    resource.setrlimit(resource.RLIMIT_FSIZE, old)


def test_7_a_full_disk_during_export_all_tasks_is_one_line_and_leaves_nothing(run_dir, file_size_limit):
    assert invoke("export", str(run_dir), "--all-tasks").exit_code == 0
    path = run_dir / "exports/all_tasks/model.pt"
    old = {p.name: p.read_bytes() for p in path.parent.iterdir()}
    assert len(old[path.name]) > 40_000
    file_size_limit(40_000)
    result = invoke("export", str(run_dir), "--all-tasks")
    file_size_limit(None)
    line = _one_line(result)
    assert result.exit_code == 2 and line.startswith("error: file too large") and f"writing {path}" in line, line
    assert {p.name: p.read_bytes() for p in path.parent.iterdir()} == old  # nothing lost, no temp file


def test_7_no_space_left_names_the_file(run_dir, monkeypatch):
    from grownfx.run.export import export_all_tasks

    def full(fd):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(files.os, "fsync", full)
    with pytest.raises(files.DiskFullError, match="no space left on the device writing .*all_tasks/model.pt"):
        export_all_tasks(run_dir)
    assert not list((run_dir / "exports/all_tasks").glob("*")) or not list((run_dir / "exports").rglob("*.tmp"))


# --- 8. resume re-checks every export -----------------------------------------------------------------------


def test_8_resume_re_exports_a_corrupt_earlier_task(run_dir, tmp_path):
    model = task_folder(run_dir, 0) / "model.pt2"
    model.write_bytes(_flip(model.read_bytes(), "weights/weight_0", 8))
    assert not export_complete(model.parent, "pt2")
    result = invoke("run", str(tmp_path / "tiny.yaml"), "--resume", "--out", str(run_dir))
    assert result.exit_code == 0, result.output
    assert "task 1's export is missing, incomplete or does not match" in result.output
    assert export_complete(model.parent, "pt2") and export_complete(task_folder(run_dir, 1), "pt2")


# --- 9. recipes that are not recipes are refused at once ------------------------------------------------------

BOMB = "".join(f"{a}: &{a} [{', '.join(['*' + p] * 9 if p else ['lol'] * 9)}]\n"
               for p, a in zip(["", "a", "b", "c", "d", "e", "f", "g", "h"], "abcdefghi"))


@pytest.mark.timeout(60)  # the fix answers at once; before it, validate worked on this for minutes
def test_9_an_alias_bomb_is_refused(tmp_path):
    path = tmp_path / "bomb.yaml"
    path.write_text("name: bomb\nmodel: {builder: small_cnn}\ndata: {name: digits}\n" + BOMB + "description: *i\n")
    result = invoke("validate", str(path), "--no-data-check")
    assert result.exit_code == 2 and "expands to more than 100,000 values" in _one_line(result)
    result = invoke("validate", "digits_quickstart", f"+model.kwargs.x={BOMB.splitlines()[0].split(': ', 1)[1]}")
    assert result.exit_code == 0, result.output  # an alias-free override value is fine


@pytest.mark.timeout(60)
def test_9_a_huge_recipe_is_refused(tmp_path):
    path = tmp_path / "huge.yaml"
    path.write_text("name: huge\nmodel: {builder: small_cnn}\ndata: {name: digits}\n" + "# padding\n" * 200_000)
    result = invoke("validate", str(path), "--no-data-check")
    assert result.exit_code == 2 and "is not a recipe" in _one_line(result) and "MB" in result.output


# --- 10. a name is a plain name ----------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["../../../../tmp/x", "a/b", ".hidden", ""])
def test_10_a_name_that_is_a_path_is_refused(tmp_path, name, monkeypatch):
    monkeypatch.chdir(tmp_path)
    result = invoke("validate", "digits_quickstart", f"name={name}" if name else "name=''", "--no-data-check")
    assert result.exit_code == 2 and "name:" in result.output and "plain name" in result.output, result.output


# --- 11. a damaged dataset file is named ---------------------------------------------------------------------


def _idx(array) -> bytes:
    import numpy as np

    array = np.asarray(array, dtype=np.uint8)
    return bytes([0, 0, 0x08, array.ndim]) + b"".join(d.to_bytes(4, "big") for d in array.shape) + array.tobytes()


def test_11_a_truncated_gz_names_the_file(tmp_path):
    import gzip

    import numpy as np

    root = tmp_path / "fashion"
    root.mkdir()
    rng = np.random.default_rng(0)
    for split, n in (("train", 200), ("t10k", 100)):
        (root / f"{split}-images-idx3-ubyte.gz").write_bytes(gzip.compress(_idx(rng.integers(0, 255, (n, 28, 28)))))
        (root / f"{split}-labels-idx1-ubyte.gz").write_bytes(gzip.compress(_idx(np.arange(n) % 10)))
    bad = root / "train-images-idx3-ubyte.gz"
    bad.write_bytes(bad.read_bytes()[: bad.stat().st_size // 2])
    recipe = tiny(tmp_path / "r").model_dump(mode="json")
    recipe["data"] = {"name": "fashion_mnist", "root": str(root), "classes_per_task": 5, "limit_per_task": 20}
    recipe["model"]["kwargs"] = {"in_channels": 1}
    (tmp_path / "f.yaml").write_text(yaml.safe_dump(recipe))
    result = invoke("run", str(tmp_path / "f.yaml"))
    lines = [ln for ln in result.output.strip().splitlines() if ln.startswith("error")]
    assert result.exit_code == 2 and len(lines) == 1, result.output
    assert str(bad) in lines[0] and "truncated" in lines[0]


# --- 12. a read-only run folder ----------------------------------------------------------------------------


@pytest.fixture(params=[errno.EROFS, errno.EACCES])
def read_only(request, monkeypatch):
    """Make every write under a folder fail as the kernel fails it (read-only filesystem, or permission denied:
    the tests run as root too, where chmod would not stop a write)."""
    import builtins
    import tempfile

    folder: list[Path] = []
    code = request.param

    def inside(path) -> bool:
        try:
            return any(Path(os.fspath(path)).absolute().is_relative_to(f) for f in folder)
        except TypeError:
            return False

    def refuse(path):
        raise OSError(code, os.strerror(code), os.fspath(path))

    real_open, real_os_open, real_mkstemp = builtins.open, os.open, tempfile.mkstemp
    real_mkdir, real_replace = os.mkdir, os.replace

    def _open(file, mode="r", *a, **kw):
        if any(c in mode for c in "wax+") and inside(file):
            refuse(file)
        return real_open(file, mode, *a, **kw)

    def _os_open(path, flags, *a, **kw):
        if flags & (os.O_WRONLY | os.O_RDWR | os.O_CREAT) and inside(path):
            refuse(path)
        return real_os_open(path, flags, *a, **kw)

    def _mkstemp(*a, dir=None, **kw):
        if dir is not None and inside(dir):
            refuse(dir)
        return real_mkstemp(*a, dir=dir, **kw)

    def _mkdir(path, *a, **kw):
        if inside(path):
            if Path(path).exists():
                raise FileExistsError(errno.EEXIST, "File exists", os.fspath(path))
            refuse(path)
        return real_mkdir(path, *a, **kw)

    def _replace(src, dst, *a, **kw):
        if inside(dst):
            refuse(dst)
        return real_replace(src, dst, *a, **kw)

    monkeypatch.setattr(builtins, "open", _open)
    monkeypatch.setattr(os, "open", _os_open)
    monkeypatch.setattr(tempfile, "mkstemp", _mkstemp)
    monkeypatch.setattr(os, "mkdir", _mkdir)
    monkeypatch.setattr(os, "replace", _replace)
    return folder


def test_12_a_read_only_run_folder_is_one_line_naming_it(run_dir, tmp_path, read_only):
    before = {p: p.read_bytes() for p in run_dir.rglob("*") if p.is_file()}
    read_only.append(run_dir.absolute())
    for args in (["run", str(tmp_path / "tiny.yaml"), "--resume", "--out", str(run_dir)],
                 ["export", str(run_dir), "--task", "1"], ["export", str(run_dir), "--all-tasks"],
                 ["report", str(run_dir)]):
        result = invoke(*args)
        line = _one_line(result)
        assert result.exit_code == 2 and line.startswith("error: cannot write"), (args, result.output)
        assert "read-only filesystem" in line or "permission denied" in line, line
        assert str(run_dir) in line
    read_only.clear()
    assert {p: p.read_bytes() for p in run_dir.rglob("*") if p.is_file()} == before


# --- 13. grownfx's own JSON is validated when read ------------------------------------------------------------


@pytest.mark.parametrize("edit, field", [
    (lambda s: s.update(tasks={"0": 1}), "tasks"),
    (lambda s: s["tasks"][0].update(acc_final="high"), "tasks.0.acc_final"),
    (lambda s: s["tasks"][0].update(growth=[1, 2]), "tasks.0.growth"),
])
def test_13_report_on_a_summary_of_the_wrong_types_is_one_line(run_dir, edit, field):
    summary = json.loads((run_dir / "summary.json").read_text())
    edit(summary)
    (run_dir / "summary.json").write_text(json.dumps(summary))
    result = invoke("report", str(run_dir))
    line = _one_line(result)
    assert result.exit_code == 2 and "summary.json" in line and f": {field}:" in line, result.output


def test_13_wrong_types_in_stream_json_and_the_checkpoint_are_one_line(run_dir):
    stream = json.loads((run_dir / "stream.json").read_text())
    stream["input_shape"] = "1x8x8"
    (run_dir / "stream.json").write_text(json.dumps(stream))
    result = invoke("export", str(run_dir), "--task", "1")
    assert result.exit_code == 2 and "stream.json" in _one_line(result) and "input_shape" in result.output
    state = files.load(run_dir / "checkpoints/last.pt")
    state["records"] = "none"
    files.atomic_save(state, run_dir / "checkpoints/last.pt")
    result = invoke("export", str(run_dir), "--task", "1")
    assert result.exit_code == 2 and "is not a grownfx checkpoint (records" in _one_line(result)


# --- 14. SIGTERM -------------------------------------------------------------------------------------------


def _cli(*args, kill_at: str | None = None) -> subprocess.Popen:
    env = dict(os.environ, OMP_NUM_THREADS="1")
    env.pop("GROWNFX_TEST_KILL_AT", None)
    if kill_at:
        env["GROWNFX_TEST_KILL_AT"] = kill_at
    return subprocess.Popen([sys.executable, "-m", "grownfx", *args], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, cwd=REPO)


@pytest.mark.slow  # the fast suite has the deterministic one below and test_cli_first_hour's start-up signals
def test_14_sigterm_at_any_moment_exits_143_with_the_resume_hint(tmp_path):
    (tmp_path / "tiny.yaml").write_text(yaml.safe_dump(tiny(tmp_path / "r").model_dump(mode="json")))
    proc = _cli("run", str(tmp_path / "tiny.yaml"), "--out", str(tmp_path / "r"))
    for line in proc.stdout:  # the run has started (before, during or after loading data and the first epoch)
        if "writing run folder" in line:
            proc.send_signal(signal.SIGTERM)
            break
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 143, err
    lines = [ln.strip() for ln in err.strip().splitlines() if ln.strip()]
    assert len(lines) == 2 and lines[0].startswith("interrupted (SIGTERM)"), err
    again = shlex.split(lines[1])  # the command it prints continues the run (or starts it again)
    assert again[:2] == ["grownfx", "run"] and ("--resume" in again or "nothing learned yet" in lines[0])
    resumed = _cli(*again[1:])
    out, err = resumed.communicate(timeout=300)
    assert resumed.returncode == 0 and (tmp_path / "r/summary.json").exists(), out + err


def test_14_sigterm_during_training_checkpoints_first(tmp_path):
    recipe = tiny(tmp_path / "r", training__epochs=3).model_dump(mode="json")
    (tmp_path / "tiny.yaml").write_text(yaml.safe_dump(recipe))
    proc = _cli("run", str(tmp_path / "tiny.yaml"), "--out", str(tmp_path / "r"), kill_at="epoch:TERM")
    _, err = proc.communicate(timeout=300)
    lines = [ln.strip() for ln in err.strip().splitlines() if ln.strip()]
    assert proc.returncode == 143 and "interrupted (SIGTERM): the last checkpoint is in" in lines[0], err
    assert shlex.split(lines[1])[-1] == "--resume" and len(lines) == 2, err
    state = files.load(tmp_path / "r/checkpoints/last.pt")
    assert state["position"] is not None and state["completed"] == 0  # mid-task, after the signalled epoch


# --- 15. a legacy pickle -----------------------------------------------------------------------------------


@pytest.mark.parametrize("payload, legacy, says", [
    ("tensors", True, "legacy (non-zip) torch pickle"), ("code", True, "legacy (non-zip) torch pickle"),
    ("code", False, "holds an object other than tensors and plain containers (posix.system)"),
])
def test_15_a_legacy_or_code_pickle_is_one_line_without_torch_advice(run_dir, tmp_path, payload, legacy, says):
    last = run_dir / "checkpoints/last.pt"
    marker = tmp_path / "pwned"
    obj = {"w": torch.ones(2)} if payload == "tensors" else {"w": _Touch(marker)}
    torch.save(obj, last, _use_new_zipfile_serialization=not legacy)
    digest = hashlib.sha256(last.read_bytes()).hexdigest()
    files.checksum_path(last).write_text(json.dumps({"sha256": digest}))
    result = invoke("export", str(run_dir), "--task", "1")
    line = _one_line(result)
    assert result.exit_code == 2 and says in line, result.output
    assert "weights_only" not in result.output and "Warning" not in result.output
    assert not marker.exists()
