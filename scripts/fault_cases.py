"""Fault cases against a grownfx checkout, as an attacker and a clumsy user would try them (issue 24).

    python scripts/fault_cases.py                        # every case with this interpreter's grownfx
    python scripts/fault_cases.py --python /path/to/other/.venv/bin/python --only A,B --out faults.json

Each case starts from a copy of one finished tiny run (digits, 2 tasks, 1 epoch: seconds), breaks one thing, runs
the command line (or a few lines of Python) in a fresh process and judges the outcome from outside: the exit code,
whether the output is one clear line (no traceback, never torch's `weights_only=False` advice), whether a marker
file that the planted code would write exists, and whether files that must survive are intact (and, after a
kill, whether resuming ends with the uninterrupted run's accuracy matrix and export weights).  The judge imports
only torch and yaml, so the same script runs against an older checkout (`--python`).  Prints a table per category
and the counts; exit code 1 when a case is not clean.
"""

from __future__ import annotations

import argparse
import gzip
import hashlib
import io
import json
import os
import pickle
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

import torch
import yaml

PY = sys.executable
TIMEOUT = 240
# children run in a scratch folder: `python -m grownfx` puts its working folder first on sys.path, and a checkout's
# own grownfx/ there would shadow the interpreter's (the checkout under test)
CWD = tempfile.gettempdir()
CATEGORIES = {"A": "security (code a folder names)", "B": "silently wrong (checksums, lost results)",
              "C": "half-written (kills mid-write)", "D": "disk full / read-only", "E": "bad input",
              "F": "signals"}


def tiny(out: Path, epochs: int = 1) -> dict:
    return {"name": "tiny", "seed": 0, "model": {"builder": "small_cnn", "seed_width": 0.5, "kwargs": {"in_channels": 1}},
            "data": {"name": "digits", "classes_per_task": 5, "limit_per_task": 60},
            "training": {"epochs": epochs, "stage2_epochs": 1, "num_threads": 1,
                         "optimizer": {"name": "adam", "lr": 1e-3, "momentum": 0.0}},
            "growth": {"max_rounds": 1}, "target": {"rule": 0.0},
            "output": {"dir": str(out), "tensorboard": False, "export_format": "pt2"}}


@dataclass
class Res:
    rc: int
    out: str
    err: str
    secs: float

    @property
    def text(self) -> str:
        return self.out + self.err

    def error_lines(self) -> list[str]:
        info = ("resuming run folder", "writing run folder", "warning:", "resuming ", "task ", "see grownfx")
        return [ln for ln in self.err.strip().splitlines() if ln.strip() and not ln.startswith(info)]


@dataclass
class Outcome:
    clean: bool | None  # None: the case cannot be made on this checkout (a kill point it does not have)
    what: str
    res: Res | None = None
    notes: list[str] = field(default_factory=list)


def _child(preexec=None):
    """In the child: SIGINT back to its default (a script started in the background inherits it ignored, and
    Python then never raises KeyboardInterrupt), then `preexec`."""
    def run():
        signal.signal(signal.SIGINT, signal.SIG_DFL)
        if preexec is not None:
            preexec()
    return run


def sh(args, env=None, timeout=TIMEOUT, preexec=None, cwd=None) -> Res:
    full = dict(os.environ, OMP_NUM_THREADS="1", **(env or {}))
    full.pop("GROWNFX_TRUST", None) if "GROWNFX_TRUST" not in (env or {}) else None
    t = time.time()
    try:
        p = subprocess.run(args, env=full, capture_output=True, text=True, timeout=timeout,
                           preexec_fn=_child(preexec), cwd=cwd or CWD)
        return Res(p.returncode, p.stdout, p.stderr, time.time() - t)
    except subprocess.TimeoutExpired as exc:
        return Res(-9, str(exc.stdout or ""), f"TIMEOUT after {timeout}s", time.time() - t)


def cli(*args, **kw) -> Res:
    return sh([PY, "-m", "grownfx", *map(str, args)], **kw)


def py(code: str, *args, **kw) -> Res:
    return sh([PY, "-c", code, *map(str, args)], **kw)


def one_line_error(res: Res, rc: int = 2, must: str = "") -> Outcome:
    lines = res.error_lines()
    bad = []
    if res.rc != rc:
        bad.append(f"exit {res.rc} (want {rc})")
    if "Traceback" in res.text:
        bad.append("traceback")
    if "weights_only=False" in res.text or "weights_only` set to `False" in res.text:
        bad.append("quotes weights_only=False")
    if len(lines) != 1:
        bad.append(f"{len(lines)} error lines")
    if must and must.lower() not in res.text.lower():
        bad.append(f"does not say {must!r}")
    return Outcome(not bad, "; ".join(bad) or (lines[0][:160] if lines else ""), res)


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def snapshot(folder: Path) -> dict:
    return {str(p.relative_to(folder)): sha(p.read_bytes()) for p in sorted(folder.rglob("*"))
            if p.is_file() and p.name != ".lock" and not p.name.endswith(".tmp")}


def save_checkpoint(path: Path, state) -> None:
    buf = io.BytesIO()
    torch.save(state, buf)
    path.write_bytes(buf.getvalue())
    path.with_name(path.name + ".sha256").write_text(json.dumps({"sha256": sha(buf.getvalue()), "previous": []}))


def flip(data: bytes, member: str, count: int) -> bytes:
    zf = zipfile.ZipFile(io.BytesIO(data))
    info = next(i for i in zf.infolist() if i.filename.endswith(member))
    h = data[info.header_offset: info.header_offset + 30]
    start = info.header_offset + 30 + int.from_bytes(h[26:28], "little") + int.from_bytes(h[28:30], "little")
    out = bytearray(data)
    for k in range(count):
        out[start + info.file_size // 2 + k] ^= 0x5A
    return bytes(out)


class Touch:
    def __init__(self, path):
        self.path = str(path)

    def __reduce__(self):
        return (os.system, (f"touch {self.path}",))


MARKER_MODULE = """
import os, pathlib
pathlib.Path(os.environ["FAULT_MARKER"]).write_text("imported")
def build(num_classes=10, **kwargs):
    pathlib.Path(os.environ["FAULT_MARKER"]).write_text("called")
    from grownfx.models import small_cnn
    return small_cnn(num_classes=num_classes, **kwargs)
"""


class Workspace:
    def __init__(self, root: Path, finished: Path):
        self.root = root
        self.run = root / "run"
        shutil.copytree(finished, self.run)
        self.recipe = root / "tiny.yaml"
        self.recipe.write_text(yaml.safe_dump(tiny(self.run)))
        self.marker = root / "marker"
        (root / "mods").mkdir()
        (root / "mods" / "fault_marker_mod.py").write_text(MARKER_MODULE)
        (root / "hub").mkdir()
        (root / "hub" / "hubconf.py").write_text(MARKER_MODULE)
        self.env = {"FAULT_MARKER": str(self.marker), "PYTHONPATH": str(root / "mods")}

    @property
    def last(self) -> Path:
        return self.run / "checkpoints" / "last.pt"

    def state(self):
        return torch.load(self.last, weights_only=True)

    def tamper(self, model: dict) -> None:
        state = self.state()
        state["recipe"]["model"].update(model)
        save_checkpoint(self.last, state)
        resolved = yaml.safe_load((self.run / "config.resolved.yaml").read_text())
        resolved["model"].update(model)
        (self.run / "config.resolved.yaml").write_text(yaml.safe_dump(resolved))


CASES: list = []


def case(cat: str, name: str):
    def deco(fn):
        CASES.append((cat, name, fn))
        return fn
    return deco


# --- A. security ---------------------------------------------------------------------------------------------

BUILDERS = {
    "module:callable": {"builder": "fault_marker_mod:build"},
    "torch.hub local repo": None,  # filled per workspace (the repo path)
    "import-only module": {"builder": "fault_marker_mod:nothing_here"},
}
OPENERS = {
    "export --task 1": lambda ws: ["export", ws.run, "--task", "1"],
    "export --all-tasks": lambda ws: ["export", ws.run, "--all-tasks"],
    "inspect RUN": lambda ws: ["inspect", ws.run],
    "inspect RUN/config.resolved.yaml": lambda ws: ["inspect", ws.run / "config.resolved.yaml"],
    "validate RUN/config.resolved.yaml": lambda ws: ["validate", ws.run / "config.resolved.yaml", "--no-data-check"],
    "run RUN/config.resolved.yaml --resume": lambda ws: ["run", ws.run / "config.resolved.yaml", "--resume", "--out",
                                                          ws.run],
    "run own recipe --resume": lambda ws: ["run", ws.recipe, "--resume", "--out", ws.run],
    "report": lambda ws: ["report", ws.run],
}

for _b in BUILDERS:
    for _o in OPENERS:
        def _fn(ws, b=_b, o=_o):
            model = BUILDERS[b] or {"builder": "torch.hub:load", "kwargs": {
                "repo_or_dir": str(ws.root / "hub"), "model": "build", "source": "local", "in_channels": 1}}
            ws.tamper(model)
            res = cli(*OPENERS[o](ws), env=ws.env)
            if ws.marker.exists():
                return Outcome(False, f"RAN the folder's code (marker written), exit {res.rc}", res)
            if o == "report":
                return Outcome(res.rc == 0, f"exit {res.rc}, no code run", res)
            return one_line_error(res)
        case("A", f"tampered builder ({_b}) + {_o}")(_fn)


@case("A", "checkpoint pickle calling os.system (checksum updated) + export")
def _(ws):
    state = ws.state()
    state["evil"] = Touch(ws.marker)
    save_checkpoint(ws.last, state)
    res = cli("export", ws.run, "--task", "1")
    return Outcome(False, "RAN os.system", res) if ws.marker.exists() else one_line_error(res)


@case("A", "checkpoint pickle calling os.system (checksum updated) + run --resume")
def _(ws):
    state = ws.state()
    state["evil"] = Touch(ws.marker)
    save_checkpoint(ws.last, state)
    res = cli("run", ws.recipe, "--resume", "--out", ws.run)
    return Outcome(False, "RAN os.system", res) if ws.marker.exists() else one_line_error(res)


@case("A", "legacy (non-zip) malicious pickle as last.pt + export")
def _(ws):
    ws.last.write_bytes(pickle.dumps({"w": Touch(ws.marker)}, protocol=2))
    ws.last.with_name("last.pt.sha256").write_text(json.dumps({"sha256": sha(ws.last.read_bytes())}))
    res = cli("export", ws.run, "--task", "1")
    return Outcome(False, "RAN os.system", res) if ws.marker.exists() else one_line_error(res)


@case("A", "legacy (non-zip) tensors-only pickle as last.pt + export")
def _(ws):
    torch.save({"w": torch.ones(2)}, ws.last, _use_new_zipfile_serialization=False)
    ws.last.with_name("last.pt.sha256").write_text(json.dumps({"sha256": sha(ws.last.read_bytes())}))
    return one_line_error(cli("export", ws.run, "--task", "1"))


LOAD_EXPORT = """
import sys
try:
    from grownfx import load_export
except ImportError:
    from grownfx.run.export import load_exported as load_export  # an older checkout
try:
    load_export(sys.argv[1])
    print("LOADED")
except Exception as e:
    print("REFUSED", type(e).__name__, str(e).splitlines()[0][:150])
"""


def _replace_member(archive: bytes, suffix: str, payload: bytes) -> bytes:
    src = zipfile.ZipFile(io.BytesIO(archive))
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_STORED) as out:
        for info in src.infolist():
            out.writestr(info.filename, payload if info.filename.endswith(suffix) else src.read(info.filename))
        if suffix.startswith("+"):
            root = src.namelist()[0].split("/")[0]
            out.writestr(f"{root}/{suffix[1:]}", payload)
    return buf.getvalue()


def _plant_pt2(ws, suffix: str, payload: bytes) -> Path:
    model = ws.run / "exports/task_1/model.pt2"
    bad = _replace_member(model.read_bytes(), suffix, payload)
    model.write_bytes(bad)
    meta = json.loads((model.parent / "meta.json").read_text())
    meta["formats"]["pt2"]["sha256"] = sha(bad)
    (model.parent / "meta.json").write_text(json.dumps(meta))
    return model


def _evil_torch_save(marker) -> bytes:
    buf = io.BytesIO()
    torch.save(Touch(marker), buf)
    return buf.getvalue()


@case("A", "pt2 whose sample inputs run os.system (meta sha updated), grownfx's loader")
def _(ws):
    model = _plant_pt2(ws, "data/sample_inputs/model.pt", _evil_torch_save(ws.marker))
    res = py(LOAD_EXPORT, model)
    if ws.marker.exists():
        return Outcome(False, "RAN os.system while loading", res)
    return Outcome("REFUSED" in res.out, res.out.strip()[:110], res)


@case("A", "pt2 holding an AOTInductor library, grownfx's loader")
def _(ws):
    model = _plant_pt2(ws, "+data/aotinductor/model/model.so", b"\x7fELF not really")
    res = py(LOAD_EXPORT, model)
    return Outcome("REFUSED" in res.out and "aotinductor" in res.out.lower(), res.out.strip()[:110], res)


@case("A", "all-tasks file whose program archive runs os.system (meta sha updated), its own loader")
def _(ws):
    assert cli("export", ws.run, "--all-tasks").rc == 0
    folder = ws.run / "exports/all_tasks"
    blob = torch.load(folder / "model.pt", weights_only=True)
    import lzma

    dtype, offset, shape = blob["index"]
    n = 1
    for s in shape:
        n *= s
    packed = lzma.decompress(blob["storage"][dtype][offset: offset + n].numpy().tobytes())
    size = int.from_bytes(packed[:8], "little")
    index = json.loads(packed[8: 8 + size])
    first = packed[8 + size: 8 + size + index["programs"][0][0]]
    evil = _replace_member(first, "data/sample_inputs/model.pt", _evil_torch_save(ws.marker))
    if not any(n.endswith("sample_inputs/model.pt") for n in zipfile.ZipFile(io.BytesIO(first)).namelist()):
        evil = _replace_member(first, "+data/sample_inputs/model.pt", _evil_torch_save(ws.marker))
    index["programs"][0][0] = len(evil)
    new_index = json.dumps(index).encode()
    rest = packed[8 + size + len(first):]
    repacked = lzma.compress(len(new_index).to_bytes(8, "little") + new_index + evil + rest)
    storage = dict(blob["storage"])
    storage["uint8"] = torch.cat([storage.get("uint8", torch.zeros(0, dtype=torch.uint8)),
                                  torch.frombuffer(bytearray(repacked), dtype=torch.uint8)])
    blob["index"] = ["uint8", len(storage["uint8"]) - len(repacked), [len(repacked)]]
    blob["storage"] = storage
    buf = io.BytesIO()
    torch.save(blob, buf)
    (folder / "model.pt").write_bytes(buf.getvalue())
    meta = json.loads((folder / "meta.json").read_text())
    meta["sha256"] = sha(buf.getvalue())
    (folder / "meta.json").write_text(json.dumps(meta))
    code = ("import sys, torch; sys.path.insert(0, sys.argv[1]); from multitask import load\n"
            "try:\n    load(sys.argv[2])(torch.zeros(1, 1, 8, 8), task=0); print('LOADED')\n"
            "except Exception as e:\n    print('REFUSED', type(e).__name__, str(e)[:120])\n")
    res = py(code, folder, folder / "model.pt")
    if ws.marker.exists():
        return Outcome(False, "RAN os.system while loading", res)
    return Outcome("REFUSED" in res.out, res.out.strip()[:110], res)


@case("A", "TorchScript export loaded by grownfx's loader without trust")
def _(ws):
    assert cli("export", ws.run, "--task", "1", "--format", "torchscript").rc == 0
    res = py(LOAD_EXPORT, ws.run / "exports/task_1/model.ts")
    return Outcome("REFUSED" in res.out, res.out.strip()[:110], res)


# --- B. silently wrong ------------------------------------------------------------------------------------------


def _flip_last(ws, keep_sidecar: str) -> None:
    ws.last.write_bytes(flip(ws.last.read_bytes(), "data/0", 4))
    side = ws.last.with_name("last.pt.sha256")
    if keep_sidecar == "missing":
        side.unlink()
    elif keep_sidecar == "garbled":
        side.write_text("{not json")
    elif keep_sidecar == "empty":
        side.write_text("")


for _side in ("kept", "missing", "garbled", "empty"):
    for _cmd in ("export", "resume"):
        def _fn(ws, side=_side, cmd=_cmd):
            _flip_last(ws, side)
            args = (["export", ws.run, "--task", "2"] if cmd == "export"
                    else ["run", ws.recipe, "--resume", "--out", ws.run])
            return one_line_error(cli(*args))
        case("B", f"4 flipped bytes in last.pt, checksum file {_side}, {_cmd}")(_fn)


@case("B", "checksum file missing, export --no-verify (loud, on request)")
def _(ws):
    ws.last.with_name("last.pt.sha256").unlink()
    res = cli("export", ws.run, "--task", "1", "--no-verify")
    return Outcome(res.rc == 0 and "warning" in res.err, f"exit {res.rc}", res)


MT_LOAD = """
import sys, torch
from grownfx.engine import multitask_runtime as R
try:
    m = R.load(sys.argv[1])
    print("LOADED", float(m(torch.ones(2, 1, 8, 8), task=1).abs().sum()))
except Exception as e:
    print("REFUSED", type(e).__name__, str(e)[:120])
"""


for _meta in ("kept", "missing", "sha edited"):
    def _fn(ws, meta=_meta):
        assert cli("export", ws.run, "--all-tasks").rc == 0
        path = ws.run / "exports/all_tasks/model.pt"
        path.write_bytes(flip(path.read_bytes(), "data/0", 16))
        if meta == "missing":
            (path.parent / "meta.json").unlink()
        elif meta == "sha edited":
            m = json.loads((path.parent / "meta.json").read_text())
            m["sha256"] = "0" * 64
            (path.parent / "meta.json").write_text(json.dumps(m))
        res = py(MT_LOAD, path)
        return Outcome("REFUSED" in res.out, res.out.strip()[:110], res)
    case("B", f"16 flipped bytes in all_tasks/model.pt, meta.json {_meta}, multitask.load")(_fn)


@case("B", "8 flipped bytes in exports/task_1/model.pt2, grownfx's loader")
def _(ws):
    model = ws.run / "exports/task_1/model.pt2"
    model.write_bytes(flip(model.read_bytes(), "weights/weight_0", 8))
    res = py(LOAD_EXPORT, model)
    return Outcome("REFUSED" in res.out, res.out.strip()[:110], res)


def _resume_fixes_exports(ws, damage) -> Outcome:
    damage()
    res = cli("run", ws.recipe, "--resume", "--out", ws.run)
    bad = []
    for k in (1, 2):
        folder = ws.run / f"exports/task_{k}"
        meta = json.loads((folder / "meta.json").read_text())
        entry = meta["formats"]["pt2"]
        if sha((folder / entry["file"]).read_bytes()) != entry["sha256"]:
            bad.append(f"task_{k} export still corrupt")
    return Outcome(res.rc == 0 and not bad, "; ".join(bad) or f"exit {res.rc}, every export matches", res)


@case("B", "earlier task's export corrupt, run --resume")
def _(ws):
    p = ws.run / "exports/task_1/model.pt2"
    return _resume_fixes_exports(ws, lambda: p.write_bytes(flip(p.read_bytes(), "weights/weight_0", 8)))


@case("B", "earlier task's export deleted, run --resume")
def _(ws):
    return _resume_fixes_exports(ws, lambda: (ws.run / "exports/task_1/model.pt2").unlink())


@case("B", "last task's export truncated, run --resume")
def _(ws):
    p = ws.run / "exports/task_2/model.pt2"
    return _resume_fixes_exports(ws, lambda: p.write_bytes(p.read_bytes()[:100]))


for _gone in ("last.pt", "last.pt and last.pt.sha256", "the checkpoints folder"):
    def _fn(ws, gone=_gone):
        if gone == "the checkpoints folder":
            shutil.rmtree(ws.run / "checkpoints")
        else:
            ws.last.unlink()
            if "sha256" in gone:
                ws.last.with_name("last.pt.sha256").unlink()
        before = snapshot(ws.run)
        out = one_line_error(cli("run", ws.recipe, "--resume", "--out", ws.run), must="no checkpoint")
        if snapshot(ws.run) != before:
            out.clean, out.what = False, "results overwritten; " + out.what
        return out
    case("B", f"finished run with {_gone} deleted, run --resume")(_fn)


for _deleted in ("summary.json", "metrics.jsonl", "config.resolved.yaml"):
    def _fn(ws, deleted=_deleted):
        ref = json.loads((ws.run / "acc_matrix.json").read_text())
        (ws.run / deleted).unlink()
        res = cli("run", ws.recipe, "--resume", "--out", ws.run)
        ok = res.rc == 0 and (ws.run / deleted).exists() and json.loads((ws.run / "acc_matrix.json").read_text()) == ref
        return Outcome(ok, f"exit {res.rc}, {deleted} {'rebuilt' if (ws.run / deleted).exists() else 'missing'}", res)
    case("B", f"{_deleted} deleted from a finished run, run --resume (rebuilt from the checkpoint)")(_fn)


# --- C. half-written ------------------------------------------------------------------------------------------


def _reference_weights(folder: Path) -> dict:
    return {k: torch.export.load(str(folder / f"exports/task_{k}/model.pt2")).module().state_dict() for k in (1, 2)}


def _same_weights(a: dict, b: dict) -> bool:
    return all(a[k].keys() == b[k].keys() and all(torch.equal(a[k][n], b[k][n]) for n in a[k]) for k in a)


EXPORT_POINTS = ["write:model.pt2", "rename:model.pt2", "write:meta.json", "rename:meta.json"]
for _point in EXPORT_POINTS:
    def _fn(ws, point=_point):
        folder = ws.run / "exports/task_2"
        killed = cli("export", ws.run, "--task", "2", env={"GROWNFX_TEST_KILL_AT": point})
        notes = [f"kill exit {killed.rc}"]
        if killed.rc == 0:
            return Outcome(None, "n/a: this checkout has no such kill point", killed)
        try:
            torch.export.load(str(folder / "model.pt2"))
            whole = True
        except Exception:
            whole = False
        if not whole:
            return Outcome(False, "model.pt2 half-written after the kill", killed, notes)
        again = cli("export", ws.run, "--task", "2")
        meta = json.loads((folder / "meta.json").read_text())
        paired = sha((folder / "model.pt2").read_bytes()) == meta["formats"]["pt2"]["sha256"]
        temps = list(folder.glob("*.tmp"))
        ok = again.rc == 0 and paired and not temps
        return Outcome(ok, f"killed {'(no such point)' if killed.rc == 0 else ''}: files whole; re-export "
                           f"{'pairs' if paired else 'does NOT pair'} model and meta" + (", temp left" if temps else ""),
                       again, notes)
    case("C", f"kill during export --task 2 at {_point}")(_fn)


ALL_POINTS = ["write:model.pt", "rename:model.pt", "rename:multitask.py", "rename:meta.json"]
for _point in ALL_POINTS:
    def _fn(ws, point=_point):
        assert cli("export", ws.run, "--all-tasks").rc == 0
        folder = ws.run / "exports/all_tasks"
        killed = cli("export", ws.run, "--all-tasks", env={"GROWNFX_TEST_KILL_AT": point})
        if killed.rc == 0:
            return Outcome(None, "n/a: this checkout has no such kill point", killed)
        try:
            torch.load(folder / "model.pt", weights_only=True)
            whole = True
        except Exception:
            whole = False
        again = cli("export", ws.run, "--all-tasks")
        meta = json.loads((folder / "meta.json").read_text())
        paired = sha((folder / "model.pt").read_bytes()) == meta["sha256"]
        ok = whole and again.rc == 0 and paired and not list(folder.glob("*.tmp"))
        return Outcome(ok, f"kill exit {killed.rc}; model.pt {'whole' if whole else 'HALF-WRITTEN'}; re-export "
                           f"{'pairs' if paired else 'does not pair'}", again)
    case("C", f"kill during export --all-tasks at {_point}")(_fn)


RUN_POINTS = ["after_checkpoint", "write:summary.json", "rename:summary.json", "rename:last.pt",
              "rename:last.pt.sha256", "write:acc_matrix.json", "rename:model.pt2", "rename:meta.json"]
for _point in RUN_POINTS:
    def _fn(ws, point=_point):
        ref_matrix = json.loads((ws.run / "acc_matrix.json").read_text())["matrix"]
        ref_weights = _reference_weights(ws.run)
        fresh = ws.root / "fresh"
        recipe = ws.root / "fresh.yaml"
        recipe.write_text(yaml.safe_dump(tiny(fresh)))
        killed = cli("run", recipe, "--out", fresh, env={"GROWNFX_TEST_KILL_AT": point})
        if killed.rc == 0:
            return Outcome(None, "n/a: this checkout has no such kill point", killed)
        resumed = cli("run", recipe, "--resume", "--out", fresh)
        if resumed.rc != 0:
            return Outcome(False, f"kill exit {killed.rc}, resume exit {resumed.rc}", resumed)
        same = (json.loads((fresh / "acc_matrix.json").read_text())["matrix"] == ref_matrix
                and _same_weights(_reference_weights(fresh), ref_weights))
        return Outcome(same and killed.rc == 137, f"kill exit {killed.rc}; resumed run "
                                                  f"{'bit-identical' if same else 'DIFFERS'}", resumed)
    case("C", f"kill during run at {_point}, then --resume")(_fn)


FAIL_MID_WRITE = """
import io, os, sys, torch
real = torch.export.save
def half(program, f, **kw):
    buf = io.BytesIO(); real(program, buf, **kw); data = buf.getvalue()
    if isinstance(f, (str, os.PathLike)):
        open(f, "wb").write(data[: len(data) // 2])
    else:
        f.write(data[: len(data) // 2])
    raise OSError(5, "the machine went down")
torch.export.save = half
from grownfx.run.export import export_run
try:
    export_run(sys.argv[1], 1, "pt2")
except OSError:
    pass
"""


@case("C", "I/O error half-way through writing model.pt2 (export --task 2)")
def _(ws):
    folder = ws.run / "exports/task_2"
    before = snapshot(folder)
    res = py(FAIL_MID_WRITE, ws.run)
    after = snapshot(folder)
    return Outcome(after == before, "previous export intact" if after == before else "previous export DESTROYED", res)


# --- D. disk full / read-only -------------------------------------------------------------------------------


def _fsize(limit):
    def f():
        import resource

        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
    return f


DISK = {
    "export --task 1 (model.pt2 over the limit)": (lambda ws: ["export", ws.run, "--task", "1"], 20_000),
    "export --all-tasks (model.pt over the limit)": (lambda ws: ["export", ws.run, "--all-tasks"], 40_000),
    "report (a plot over the limit)": (lambda ws: ["report", ws.run], 30_000),
    "run into a new folder (checkpoint over the limit)": (lambda ws: ["run", ws.recipe, "--out", ws.root / "new"],
                                                          60_000),
    "run --resume of a finished run (export over the limit)": (
        lambda ws: ["run", ws.recipe, "--resume", "--out", ws.run], 20_000),
}
for _name, (_args, _limit) in DISK.items():
    def _fn(ws, args=_args, limit=_limit):
        if "all-tasks" in str(args(ws)):
            assert cli("export", ws.run, "--all-tasks").rc == 0
        if "--resume" in map(str, args(ws)):
            (ws.run / "exports/task_2/model.pt2").unlink()  # the resume must write it again
        before = snapshot(ws.run)
        out = one_line_error(cli(*args(ws), preexec=_fsize(limit)))
        temps = list(ws.root.rglob("*.tmp"))
        lost = [k for k, v in before.items() if (ws.run / k).is_file() and sha((ws.run / k).read_bytes()) != v
                and not k.startswith(("report/", "metrics.jsonl", "summary.json", "acc_matrix", "stream.json"))]
        if temps or lost:
            out.clean = False
            out.what += f"; temp files {len(temps)}; changed {lost[:3]}"
        return out
    case("D", f"file-size limit (EFBIG): {_name}")(_fn)


READ_ONLY = {
    "run --resume": lambda ws: ["run", ws.recipe, "--resume", "--out", ws.run],
    "export --task 1": lambda ws: ["export", ws.run, "--task", "1"],
    "export --all-tasks": lambda ws: ["export", ws.run, "--all-tasks"],
    "report": lambda ws: ["report", ws.run],
}
for _name, _args in READ_ONLY.items():
    def _fn(ws, args=_args):
        for p in [ws.run, *ws.run.rglob("*")]:
            p.chmod(0o555 if p.is_dir() else 0o444)
        before = snapshot(ws.run)
        if os.geteuid() == 0:  # root ignores permissions: run the command without the capabilities that do so
            if not shutil.which("setpriv"):
                return Outcome(None, "n/a: running as root without setpriv")
            res = sh(["setpriv", "--bounding-set=-dac_override,-dac_read_search,-fowner", "--", PY, "-m", "grownfx",
                      *map(str, args(ws))])
        else:
            res = cli(*args(ws))
        out = one_line_error(res, must=str(ws.run))
        if snapshot(ws.run) != before:
            out.clean, out.what = False, "the folder changed; " + out.what
        return out
    case("D", f"read-only run folder (no write permission): {_name}")(_fn)


# --- E. bad input ---------------------------------------------------------------------------------------------

HEAD = "name: bad\nmodel: {builder: small_cnn}\ndata: {name: digits}\n"
BOMB = "".join(f"{a}: &{a} [{', '.join(['*' + p] * 9 if p else ['lol'] * 9)}]\n"
               for p, a in zip(["", "a", "b", "c", "d", "e", "f", "g", "h"], "abcdefghi"))
RECIPES = {
    "alias bomb (billion laughs, 9 levels)": HEAD + BOMB + "description: *i\n",
    "alias bomb under model.kwargs": HEAD.replace("{builder: small_cnn}", "{builder: small_cnn, kwargs: {x: *i}}")
    .replace("model:", BOMB + "model:"),
    "recursive alias": HEAD + "description: &r [*r]\n",
    "nested 5000 deep": HEAD + "description: " + "[" * 5000 + "]" * 5000 + "\n",
    "50 MB of comments": HEAD + "# padding padding padding padding padding padding padding\n" * 900_000,
    "2 MB of description": HEAD + "description: '" + "x" * 2_000_000 + "'\n",
    "name ../../../../tmp/x": HEAD.replace("name: bad", "name: ../../../../tmp/x"),
    "name a/b": HEAD.replace("name: bad", "name: a/b"),
    "name ..": HEAD.replace("name: bad", "name: '..'"),
    "name with a space": HEAD.replace("name: bad", "name: 'a b'"),
    "output.dir with {0}": HEAD + "output: {dir: 'runs/{0}'}\n",
    "output.dir with an unclosed brace": HEAD + "output: {dir: 'runs/{name'}\n",
    "binary file": None,
    "empty file": "",
    "a list at the top": "- 1\n- 2\n",
    "duplicate key": HEAD + "seed: 1\nseed: 2\n",
}
for _name, _text in RECIPES.items():
    def _fn(ws, name=_name, text=_text):
        path = ws.root / "bad.yaml"
        if text is None:
            path.write_bytes(bytes(range(256)) * 40)
        else:
            path.write_text(text)
        res = cli("validate", path, "--no-data-check", timeout=60)
        if res.rc == -9:
            return Outcome(False, "HANGS (killed after 60 s)", res)
        out = one_line_error(res)
        if res.rc == 2 and "Traceback" not in res.text and len(res.error_lines()) > 1 and name == "empty file":
            out.clean, out.what = True, f"{len(res.error_lines())} located errors (missing sections)"
        if res.secs > 20:
            out.clean, out.what = False, f"took {res.secs:.0f} s; " + out.what
        return out
    case("E", f"recipe: {_name}")(_fn)


@case("E", "override value that is an alias bomb")
def _(ws):
    value = "[" + ", ".join(["&a [lol, lol, lol, lol, lol, lol, lol, lol, lol]"] + ["*a"] * 8) + "]"
    bomb = "&b [" + ", ".join(["*a"] * 9) + "]"
    res = cli("validate", "digits_quickstart", f"+model.kwargs.x=[{value}, {bomb}, [*b, *b, *b, *b, *b, *b, *b, *b, *b]]",
              "--no-data-check", timeout=60)
    return Outcome(res.rc in (0, 2) and res.secs < 20 and "Traceback" not in res.text,
                   f"exit {res.rc} in {res.secs:.0f} s", res)


def _idx(array) -> bytes:
    import numpy as np

    a = np.asarray(array, dtype=np.uint8)
    return bytes([0, 0, 0x08, a.ndim]) + b"".join(d.to_bytes(4, "big") for d in a.shape) + a.tobytes()


def _fashion(ws, damage) -> Outcome:
    import numpy as np

    root = ws.root / "fashion"
    root.mkdir()
    rng = np.random.default_rng(0)
    for split, n in (("train", 200), ("t10k", 100)):
        (root / f"{split}-images-idx3-ubyte.gz").write_bytes(gzip.compress(_idx(rng.integers(0, 255, (n, 28, 28)))))
        (root / f"{split}-labels-idx1-ubyte.gz").write_bytes(gzip.compress(_idx(np.arange(n) % 10)))
    bad = damage(root)
    recipe = tiny(ws.root / "f")
    recipe["data"] = {"name": "fashion_mnist", "root": str(root), "classes_per_task": 5, "limit_per_task": 20}
    (ws.root / "f.yaml").write_text(yaml.safe_dump(recipe))
    return one_line_error(cli("run", ws.root / "f.yaml"), must=bad.name)


DATA = {
    "train images .gz cut in half": lambda r: _cut(r / "train-images-idx3-ubyte.gz", 0.5),
    "labels .gz cut to 10 bytes": lambda r: _cut(r / "train-labels-idx1-ubyte.gz", 10),
    "images .gz replaced by random bytes": lambda r: _put(r / "t10k-images-idx3-ubyte.gz", os.urandom(5000)),
    "empty .gz": lambda r: _put(r / "t10k-labels-idx1-ubyte.gz", b""),
    "IDX with a wrong magic": lambda r: _put(r / "train-labels-idx1-ubyte.gz", gzip.compress(b"\x01\x02\x03\x04abc")),
    "IDX header cut short": lambda r: _put(r / "train-labels-idx1-ubyte.gz", gzip.compress(b"\x00\x00\x08\x03\x00")),
    "IDX with fewer bytes than its header says": lambda r: _put(
        r / "train-images-idx3-ubyte.gz", gzip.compress(_idx([[1, 2], [3, 4]])[:-2])),
}


def _cut(path: Path, keep) -> Path:
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep) if isinstance(keep, float) else keep])
    return path


def _put(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path


for _name, _damage in DATA.items():
    case("E", f"Fashion-MNIST: {_name}")(lambda ws, d=_damage: _fashion(ws, d))


def _edit_json(ws, rel: str, edit) -> None:
    path = ws.run / rel
    obj = json.loads(path.read_text()) if path.exists() else None
    new = edit(obj)
    path.write_text(new if isinstance(new, str) else json.dumps(new))


JSONS = {
    "summary.json: tasks is a mapping": ("summary.json", lambda s: {**s, "tasks": {"0": 1}}, "report"),
    "summary.json: acc_final is text": ("summary.json", lambda s: {**s, "tasks": [{**s["tasks"][0], "acc_final": "high"}]},
                                        "report"),
    "summary.json: growth is a list": ("summary.json", lambda s: {**s, "tasks": [{**s["tasks"][0], "growth": [1]}]},
                                       "report"),
    "summary.json: a list at the top": ("summary.json", lambda s: [1, 2], "report"),
    "summary.json: truncated": ("summary.json", lambda s: json.dumps(s)[:50], "report"),
    "acc_matrix.json: matrix is text": ("acc_matrix.json", lambda a: {**a, "matrix": "none"}, "report"),
    "acc_matrix.json: rows of text": ("acc_matrix.json", lambda a: {**a, "matrix": [["x"]]}, "report"),
    "stream.json: input_shape is text": ("stream.json", lambda s: {**s, "input_shape": "1x8x8"}, "export"),
    "stream.json: no tasks": ("stream.json", lambda s: {k: v for k, v in s.items() if k != "tasks"}, "export"),
    "exports/task_1/meta.json: formats is a list": ("exports/task_1/meta.json", lambda m: {**m, "formats": [1]},
                                                    "resume"),
    "checkpoint: records is text": (None, None, "export"),
}
for _name, (_rel, _edit, _cmd) in JSONS.items():
    def _fn(ws, rel=_rel, edit=_edit, cmd=_cmd):
        if rel is None:
            state = ws.state()
            state["records"] = "none"
            save_checkpoint(ws.last, state)
        else:
            _edit_json(ws, rel, edit)
        args = {"report": ["report", ws.run], "export": ["export", ws.run, "--task", "1"],
                "resume": ["run", ws.recipe, "--resume", "--out", ws.run]}[cmd]
        res = cli(*args)
        if cmd == "resume":  # a meta.json of the wrong shape is rewritten by the re-export
            return Outcome(res.rc == 0 and "Traceback" not in res.text, f"exit {res.rc}", res)
        return one_line_error(res)
    case("E", f"{_name} ({_cmd})")(_fn)


@case("E", "compare.json: runs is a mapping (report)")
def _(ws):
    folder = ws.root / "cmp"
    folder.mkdir()
    (folder / "compare.json").write_text(json.dumps({"recipe": "x", "methods": ["grown"], "seeds": [0],
                                                     "runs": {"a": 1}}))
    return one_line_error(cli("report", folder))


# --- F. signals -------------------------------------------------------------------------------------------------


def _signal_case(ws, signame: str, where: str) -> Outcome:
    fresh = ws.root / "fresh"
    recipe = ws.root / "fresh.yaml"
    recipe.write_text(yaml.safe_dump(tiny(fresh, epochs=3)))
    code = {"TERM": 143, "INT": 130}[signame]
    if where == "start":  # as soon as the run folder is named (data loading, tracing, first epoch)
        env = dict(os.environ, OMP_NUM_THREADS="1")
        env.pop("GROWNFX_TEST_KILL_AT", None)
        p = subprocess.Popen([PY, "-m", "grownfx", "run", str(recipe), "--out", str(fresh)], env=env,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, preexec_fn=_child(), cwd=CWD)
        for line in p.stdout:
            if "run folder" in line:
                p.send_signal(getattr(signal, "SIG" + signame))
                break
        out, err = p.communicate(timeout=TIMEOUT)
        res = Res(p.returncode, out, err, 0.0)
    else:
        res = cli("run", recipe, "--out", fresh, env={"GROWNFX_TEST_KILL_AT": f"{where}:{signame}"})
        if res.rc == 0:
            return Outcome(None, "n/a: this checkout cannot signal itself at a point", res)
    lines = [ln.strip() for ln in res.err.strip().splitlines() if ln.strip()]
    hint = [ln for ln in lines if ln.startswith("grownfx run ")]  # the command, on a line of its own
    bad = []
    if res.rc != code:
        bad.append(f"exit {res.rc} (want {code})")
    if not lines or not lines[0].startswith("interrupted") or not hint or len(lines) > 2:
        bad.append(f"{len(lines)} lines, {'a' if hint else 'no'} command to continue")
    if hint:
        import shlex

        resumed = cli(*shlex.split(hint[0])[1:])  # "grownfx run ..." -> python -m grownfx run ...
        if resumed.rc != 0:
            bad.append(f"the printed command exits {resumed.rc}")
    return Outcome(not bad, "; ".join(bad) or lines[0][:110], res)


for _sig in ("TERM", "INT"):
    for _where in ("start", "epoch", "after_checkpoint", "write:summary.json", "write:config.resolved.yaml"):
        case("F", f"SIG{_sig} at {_where}")(lambda ws, s=_sig, w=_where: _signal_case(ws, s, w))


# --- driver -----------------------------------------------------------------------------------------------------


def make_finished(root: Path) -> Path:
    out = root / "finished"
    (root / "finished.yaml").write_text(yaml.safe_dump(tiny(out)))
    res = cli("run", root / "finished.yaml", "--out", out)
    if res.rc != 0:
        raise SystemExit(f"the reference run failed:\n{res.text}")
    return out


def main() -> int:
    global PY, CWD
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--python", default=sys.executable, help="the interpreter whose grownfx to test")
    ap.add_argument("--only", default="", help="categories (A,B,...) or substrings of case names, comma-separated")
    ap.add_argument("--out", type=Path, default=None, help="also write every outcome as JSON here")
    args = ap.parse_args()
    PY = args.python
    picks = [p.strip() for p in args.only.split(",") if p.strip()]
    chosen = [c for c in CASES if not picks or c[0] in picks or any(p in c[1] for p in picks)]
    root = Path(tempfile.mkdtemp(prefix="grownfx_faults_"))
    os.chmod(root, 0o755)
    CWD = str(root)
    which = py("import grownfx, grownfx.cli; print(grownfx.__file__, grownfx.cli.__file__)").out.strip()
    print(f"grownfx under test: {which}", flush=True)
    finished = make_finished(root)
    rows = []
    for k, (cat, name, fn) in enumerate(chosen):
        ws_root = root / f"case{k}"
        ws_root.mkdir()
        ws = Workspace(ws_root, finished)
        t = time.time()
        try:
            out = fn(ws)
        except Exception as exc:  # a case that cannot even be set up on this checkout
            out = Outcome(False, f"case error: {type(exc).__name__}: {str(exc)[:100]}")
        out.what = out.what.replace(str(ws_root), "CASE")
        rows.append({"category": cat, "case": name, "clean": out.clean, "outcome": out.what,
                     "exit": out.res.rc if out.res else None, "seconds": round(time.time() - t, 1)})
        verdict = {True: "clean", False: "NOT CLEAN", None: "n/a"}[out.clean]
        print(f"[{k + 1}/{len(chosen)}] {cat} {verdict}: {name}: {out.what}", flush=True)
        shutil.rmtree(ws_root, ignore_errors=True)
    print()
    for cat, title in CATEGORIES.items():
        mine = [r for r in rows if r["category"] == cat]
        if not mine:
            continue
        tried = [r for r in mine if r["clean"] is not None]
        na = len(mine) - len(tried)
        print(f"\n### {cat}. {title}: {sum(bool(r['clean']) for r in tried)}/{len(tried)} clean"
              + (f" ({na} n/a on this checkout)" if na else "") + "\n")
        print("| case | outcome | clean |\n| --- | --- | --- |")
        for r in mine:
            mark = {True: "yes", False: "**no**", None: "n/a"}[r["clean"]]
            print(f"| {r['case']} | {r['outcome'].replace('|', '/')} | {mark} |")
    tried = [r for r in rows if r["clean"] is not None]
    total = sum(bool(r["clean"]) for r in tried)
    print(f"\n{total}/{len(tried)} cases clean, {len(rows) - len(tried)} n/a ({args.python})")
    if args.out:
        args.out.write_text(json.dumps(rows, indent=1))
    shutil.rmtree(root, ignore_errors=True)
    return 0 if total == len(tried) else 1


if __name__ == "__main__":
    sys.exit(main())
