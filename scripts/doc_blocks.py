"""Run the fenced code blocks of README.md and docs/: every ```bash and ```python block is either run or says why not.

    python scripts/doc_blocks.py              # the quick blocks (what tests/test_docs.py runs)
    python scripts/doc_blocks.py --slow       # also the ones marked slow (minutes each): run before a release
    python scripts/doc_blocks.py --list       # every block and what happens to it

A block's info string says what it needs:

    ```bash                          run (seconds)
    ```bash slow                     run with --slow (minutes)
    ```python skip="needs CIFAR-100 on disk"       never run; the reason is printed
    ```bash needs="runs/digits_quickstart"         run after making that folder with a quick run (FIXTURES)

The blocks of one file run in order in one scratch folder (with links to the repository's recipes/, docs/,
benchmarks/, scripts/ and tests/), so a block can use what an earlier block of the same file wrote.  Blocks of
other languages (yaml, text) are not run.  Exit status 1 when a block fails.
"""

from __future__ import annotations

import argparse
import os
import re
import shlex
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
RUNNABLE = ("bash", "python")
LINKED = ("recipes", "docs", "benchmarks", "scripts", "tests")
# folders a block may name with needs="...": a quick digits run makes each (the blocks show the full-size commands)
_QUICK = ["digits_quickstart", "training.epochs=1", "training.stage2_epochs=1", "target.scratch_epochs=1",
          "growth.max_rounds=1", "data.limit_per_task=60", "output.tensorboard=false"]
FIXTURES = {
    "runs/digits_quickstart": ["grownfx", "run", *_QUICK, "data.num_tasks=2", "--out", "runs/digits_quickstart"],
    "runs/tiny": ["grownfx", "run", *_QUICK, "data.classes_per_task=5", "--out", "runs/tiny"],  # small_cnn, 2 tasks
}


@dataclass
class Block:
    path: Path
    line: int
    lang: str
    code: str
    skip: str | None = None
    slow: bool = False
    needs: tuple[str, ...] = ()

    @property
    def where(self) -> str:
        return f"{self.path.relative_to(REPO)}:{self.line}"


_FENCE = re.compile(r"^```(\w+)(.*)$")


def doc_files() -> list[Path]:
    return [REPO / "README.md", *sorted((REPO / "docs").rglob("*.md"))]


def blocks(path: Path) -> list[Block]:
    """The fenced blocks of a markdown file, with the attributes of their info strings."""
    out: list[Block] = []
    lines = path.read_text().splitlines()
    i = 0
    while i < len(lines):
        m = _FENCE.match(lines[i])
        if not m:
            i += 1
            continue
        start, lang, info = i + 1, m.group(1), m.group(2)
        j = i + 1
        while j < len(lines) and not lines[j].startswith("```"):
            j += 1
        attrs = dict(re.findall(r'(\w+)="([^"]*)"', info))
        words = set(re.sub(r'\w+="[^"]*"', "", info).split())
        out.append(Block(path, start, lang, "\n".join(lines[i + 1 : j]) + "\n", attrs.get("skip"),
                         "slow" in words, tuple(attrs["needs"].split(",")) if "needs" in attrs else ()))
        i = j + 1
    return out


def all_blocks() -> list[Block]:
    return [b for f in doc_files() for b in blocks(f)]


def _scripts_of_torch() -> list[str]:
    """The bin/ folder holding torch's console scripts (torchrun), when it is not this interpreter's (torch shared
    from another environment)."""
    import importlib.util

    spec = importlib.util.find_spec("torch")
    origin = Path(spec.origin) if spec is not None and spec.origin else None
    found = [p / "bin" for p in (origin.parents if origin else []) if (p / "bin" / "torchrun").is_file()]
    return [str(found[0])] if found else []


def _environment() -> dict[str, str]:
    env = dict(os.environ)
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), *_scripts_of_torch(), env.get("PATH", "")])
    env["PYTHONPATH"] = f"{REPO}{os.pathsep}{env.get('PYTHONPATH', '')}"  # `python -m benchmarks.x`, tests.*
    env.setdefault("OMP_NUM_THREADS", "1")
    return env


def prepare(folder: Path) -> None:
    for name in LINKED:
        link = folder / name
        if not link.exists():
            link.symlink_to(REPO / name)


def run_block(block: Block, folder: Path, timeout: float = 1800) -> tuple[bool, str, float]:
    """(passed, output, seconds) of one block run in `folder`."""
    env = _environment()
    start = time.perf_counter()
    for need in block.needs:
        if not (folder / need).exists():
            made = subprocess.run(FIXTURES[need], cwd=folder, env=env, capture_output=True, text=True,
                                  timeout=timeout)
            if made.returncode != 0:
                return False, f"fixture {need}: {shlex.join(FIXTURES[need])}\n{made.stdout}{made.stderr}", 0.0
    if block.lang == "bash":
        cmd = ["bash", "-e", "-o", "pipefail", "-c", block.code]
    else:
        cmd = [sys.executable, "-c", block.code]
    proc = subprocess.run(cmd, cwd=folder, env=env, capture_output=True, text=True, timeout=timeout)
    return proc.returncode == 0, proc.stdout + proc.stderr, time.perf_counter() - start


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("files", nargs="*", help="markdown files (default: README.md and docs/)")
    parser.add_argument("--slow", action="store_true", help="also run the blocks marked slow")
    parser.add_argument("--list", action="store_true", help="list the blocks and what happens to each")
    args = parser.parse_args(argv)
    files = [Path(f).resolve() for f in args.files] or doc_files()
    failed = 0
    for path in files:
        todo = [b for b in blocks(path) if b.lang in RUNNABLE]
        if not todo:
            continue
        with tempfile.TemporaryDirectory(prefix="grownfx-docs-") as tmp:
            folder = Path(tmp)
            prepare(folder)
            for b in todo:
                if b.skip is not None:
                    print(f"skip  {b.where}: {b.skip}", flush=True)
                    continue
                if b.slow and not args.slow:
                    print(f"slow  {b.where}: run with --slow", flush=True)
                    continue
                if args.list:
                    print(f"run   {b.where}", flush=True)
                    continue
                ok, output, seconds = run_block(b, folder)
                print(f"{'ok  ' if ok else 'FAIL'}  {b.where} ({seconds:.0f} s)", flush=True)
                if not ok:
                    failed += 1
                    print("    " + output.strip().replace("\n", "\n    "), flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
