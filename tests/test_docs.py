"""The README and docs/ say only what is true of this repository: every path, link and `grownfx.` name they
mention exists, and every ```bash / ```python block runs (or says in its info string why it is not run).

The quick blocks run here, in-process (a `grownfx ...` line through the CLI app, a python block with exec), so
that the suite pays for one torch import; `python scripts/doc_blocks.py [--slow]` runs them as a user would, in a
shell, and tests/test_docs.py::test_slow_blocks (marked slow) runs that."""

from __future__ import annotations

import contextlib
import importlib
import importlib.util
import io
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from cli_helpers import invoke

REPO = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("doc_blocks", REPO / "scripts" / "doc_blocks.py")
doc_blocks = importlib.util.module_from_spec(_spec)
sys.modules["doc_blocks"] = doc_blocks  # dataclasses look their module up while the class is made
_spec.loader.exec_module(doc_blocks)

DOCS = doc_blocks.doc_files()
_PATH = re.compile(r"(?<![\w/.-])((?:grownfx|cli|tests|docs|recipes|benchmarks|scripts|\.ci)/[\w./\-]*[\w/])")
_LINK = re.compile(r"\]\(([^)#\s]+)(?:#[^)]*)?\)")
_DOTTED = re.compile(r"(?<![\w./])(grownfx(?:\.[A-Za-z_]\w*)+)")
WRITTEN_BY_COMMANDS = {"benchmarks/results/quick/"}  # a path a documented command creates


def _resolves(dotted: str) -> bool:
    parts = dotted.split(".")
    for i in range(len(parts), 0, -1):
        try:
            obj = importlib.import_module(".".join(parts[:i]))
        except ImportError:
            continue
        for attr in parts[i:]:
            if not hasattr(obj, attr):
                return False
            obj = getattr(obj, attr)
        return True
    return False


def test_every_repository_path_link_and_grownfx_name_in_the_docs_exists():
    missing = []
    for doc in DOCS:
        text = doc.read_text()
        where = doc.relative_to(REPO)
        missing += [f"{where}: {p}" for p in {m.split("#")[0] for m in _PATH.findall(text)}
                    if p not in WRITTEN_BY_COMMANDS and not (REPO / p).exists()]
        missing += [f"{where}: link {t}" for t in set(_LINK.findall(text))
                    if not t.startswith(("http:", "https:", "mailto:")) and not (doc.parent / t).exists()]
        missing += [f"{where}: {name}" for name in set(_DOTTED.findall(text)) if not _resolves(name)]
    assert not missing, "the docs name things that do not exist:\n" + "\n".join(sorted(missing))


def test_every_code_block_is_run_or_says_why_not():
    blocks = [b for b in doc_blocks.all_blocks() if b.lang in doc_blocks.RUNNABLE]
    assert len(blocks) > 20
    for b in blocks:
        assert b.skip is None or len(b.skip) > 10, f"{b.where}: skip needs a reason"
        assert set(b.needs) <= set(doc_blocks.FIXTURES), f"{b.where}: unknown fixture {b.needs}"
        if b.lang == "python":
            compile(b.code, b.where, "exec")  # even a block not run here is valid Python
    fences = [ln for doc in DOCS for ln in doc.read_text().splitlines() if ln.startswith("```") and ln != "```"]
    for line in fences:  # a typo in an info string (skip='...', slwo) would silently run or skip a block
        info = re.sub(r'\w+="[^"]*"', "", line[3:]).split()
        assert info[0] in ("bash", "python", "yaml", "text", "json") and set(info[1:]) <= {"slow"}, line


def _run_bash(block, folder: Path) -> None:
    """A quick bash block line by line: `grownfx ...` through the app in-process, anything else in a shell."""
    for line in block.code.replace("\\\n", " ").splitlines():
        line = line.split(" #")[0].strip()
        if not line or line.startswith("#"):
            continue
        argv = shlex.split(line)
        if argv[0] == "grownfx" and not set(argv) & {"|", ">", "&&"}:
            result = invoke(*argv[1:])
            assert result.exit_code == 0, f"{block.where}: {line}\n{result.output}"
        else:
            proc = subprocess.run(["bash", "-e", "-c", line], cwd=folder, capture_output=True, text=True, timeout=600)
            assert proc.returncode == 0, f"{block.where}: {line}\n{proc.stdout}{proc.stderr}"


def _run_python(block) -> None:
    with contextlib.redirect_stdout(io.StringIO()):
        exec(compile(block.code, block.where, "exec"), {"__name__": "__doc_block__"})  # noqa: S102


_QUICK_DOCS = sorted({b.path for b in doc_blocks.all_blocks()
                      if b.lang in doc_blocks.RUNNABLE and b.skip is None and not b.slow})


@pytest.mark.parametrize("doc", _QUICK_DOCS, ids=[str(d.relative_to(REPO)) for d in _QUICK_DOCS])
def test_quick_blocks_run(doc, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    doc_blocks.prepare(tmp_path)
    monkeypatch.syspath_prepend(str(REPO))
    saved_path = list(sys.path)
    for block in doc_blocks.blocks(doc):
        if block.lang not in doc_blocks.RUNNABLE or block.skip is not None or block.slow:
            continue
        for need in block.needs:
            if not (tmp_path / need).exists():
                result = invoke(*doc_blocks.FIXTURES[need][1:])
                assert result.exit_code == 0, result.output
        if block.lang == "bash":
            _run_bash(block, tmp_path)
        else:
            _run_python(block)
    sys.path[:] = saved_path


@pytest.mark.slow
def test_slow_blocks():
    proc = subprocess.run([sys.executable, str(REPO / "scripts" / "doc_blocks.py"), "--slow"], capture_output=True,
                          text=True, timeout=3 * 3600)
    assert proc.returncode == 0, proc.stdout[-5000:] + proc.stderr[-2000:]


def test_outputs_md_shows_comparing_exports_by_weights_with_code_that_runs():
    # the page said `torch.export.load(f).state_dict()`, but an ExportedProgram's state_dict is a dict attribute
    doc = REPO / "docs" / "outputs.md"
    assert ".state_dict()" not in doc.read_text()
    runnable = [b for b in doc_blocks.blocks(doc) if b.lang == "python" and b.skip is None and not b.slow]
    assert any("torch.export.load" in b.code and ".state_dict" in b.code for b in runnable)  # run above
