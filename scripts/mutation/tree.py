"""The project's files: which ones (git), copies of them that tests can run in, their content hash, and the lines a
change touched.  The developer's working tree is only ever read."""

from __future__ import annotations

import fnmatch
import hashlib
import os
import re
import shutil
import subprocess
from pathlib import Path

from scripts.mutation.config import ToolError

HERE = Path(__file__).resolve().parent
PLUGIN_NAME = "_grownfx_mutation_plugin"
SERVER_NAME = "_grownfx_mutation_server"
ALWAYS_SKIPPED = (".mutation/", ".git/", ".venv/", "venv/")


def git(root: Path, *args: str) -> str:
    proc = subprocess.run(["git", "-C", str(root), *args], capture_output=True, text=True)
    if proc.returncode != 0:
        raise ToolError(f"git {' '.join(args)} failed in {root}: {proc.stderr.strip() or proc.stdout.strip()}")
    return proc.stdout


def project_files(root: Path) -> list[str]:
    """Tracked and untracked-but-not-ignored files that exist now (what a clean clone plus the edits holds)."""
    out = git(root, "ls-files", "-z", "--cached", "--others", "--exclude-standard")
    files = []
    for rel in sorted(set(p for p in out.split("\0") if p)):
        if rel.startswith(ALWAYS_SKIPPED) or "__pycache__/" in rel or rel.endswith(".pyc"):
            continue
        p = root / rel
        if p.is_file():
            files.append(rel)
    return files


def head_commit(root: Path) -> str:
    try:
        return git(root, "rev-parse", "HEAD").strip()
    except ToolError:
        return "(no commit)"


def copy_project(root: Path, files: list[str], dest: Path) -> dict[str, str]:
    """Copy `files` into dest (a fresh folder) and return {path: sha1 of its content} of what was copied.  The
    content is read once and both hashed and written, so the hash is exactly what the copy holds."""
    if dest.exists():
        shutil.rmtree(dest)
    dest.mkdir(parents=True)
    hashes = {}
    for rel in files:
        try:
            data = (root / rel).read_bytes()
        except OSError:  # deleted while we copied: the copy is the tree as it was a moment ago
            continue
        target = dest / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(data)
        mode = (root / rel).stat().st_mode if (root / rel).exists() else 0o644
        os.chmod(target, mode & 0o777)
        hashes[rel] = hashlib.sha1(data).hexdigest()
    return hashes


def clone_copy(src: Path, dest: Path) -> None:
    if dest.exists():
        shutil.rmtree(dest)
    shutil.copytree(src, dest, symlinks=True)


def install_boot(copy: Path, packages: dict[str, str]) -> None:
    """sitecustomize.py (the import redirection) and the pytest plugin, at the copy's root."""
    boot = (HERE / "boot.py").read_text()
    boot = re.sub(r"^_PACKAGES = \{\}.*$", lambda m: f"_PACKAGES = {packages!r}", boot, count=1, flags=re.M)
    (copy / "sitecustomize.py").write_text(boot)
    shutil.copyfile(HERE / "pytest_plugin.py", copy / f"{PLUGIN_NAME}.py")
    shutil.copyfile(HERE / "server.py", copy / f"{SERVER_NAME}.py")


def pycache(copy: Path) -> Path:
    """The worker's own bytecode cache (PYTHONPYCACHEPREFIX), outside the copy."""
    return copy.parent / (copy.name + ".pycache")


def forget_bytecode(copy: Path, source: Path) -> None:
    """Delete the cached bytecode of `source`: a mutant and the original can have the same size and the same
    mtime (to the second), and Python would then run the stale one."""
    import sys

    cached = pycache(copy) / str(source.resolve().parent).lstrip(os.sep) / (
        f"{source.stem}.{sys.implementation.cache_tag}.pyc")
    cached.unlink(missing_ok=True)
    for opt in cached.parent.glob(f"{source.stem}.{sys.implementation.cache_tag}.opt-*.pyc"):
        opt.unlink(missing_ok=True)


def worker_env(copy: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("GROWNFX_MUTATION_")}
    env["PYTHONPATH"] = str(copy) + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    env["PYTHONPYCACHEPREFIX"] = str(pycache(copy))  # per worker; the mutated file's entry is deleted each time
    env.pop("PYTHONDONTWRITEBYTECODE", None)
    env.pop("PYTEST_ADDOPTS", None)
    env.pop("COVERAGE_PROCESS_START", None)
    return env


def normalize_pyproject(copy: Path, hashes: dict[str, str]) -> None:
    """pyproject.toml's hash without [tool.grownfx.mutation]: editing the tool's own settings keeps the coverage
    map (a changed pyproject.toml otherwise rebuilds it whole)."""
    path = copy / "pyproject.toml"
    if "pyproject.toml" not in hashes or not path.exists():
        return
    import json
    import tomllib

    try:
        doc = tomllib.loads(path.read_text())
    except tomllib.TOMLDecodeError:
        return
    doc.get("tool", {}).get("grownfx", {}).pop("mutation", None)
    hashes["pyproject.toml"] = hashlib.sha1(json.dumps(doc, sort_keys=True).encode()).hexdigest()


def content_key(hashes: dict[str, str], exclude: list[str]) -> tuple[str, dict[str, str]]:
    kept = {p: h for p, h in hashes.items() if not any(fnmatch.fnmatch(p, g) for g in exclude)}
    h = hashlib.sha1()
    for p in sorted(kept):
        h.update(f"{p}\0{kept[p]}\n".encode())
    return h.hexdigest()[:16], kept


_HUNK = re.compile(r"^@@ -\d+(?:,\d+)? \+(\d+)(?:,(\d+))? @@")


def changed_lines(root: Path, base: str) -> tuple[str, dict[str, set[int]]]:
    """Lines of the working tree that differ from the merge-base of `base` and HEAD: {path: {line numbers}}.
    Untracked files count as wholly new; a pure deletion marks the lines on both sides of the gap."""
    try:
        git(root, "rev-parse", "--verify", "--quiet", base + "^{commit}")
    except ToolError:
        raise ToolError(f"--changed: no commit or branch named {base!r} in {root}") from None
    mb = git(root, "merge-base", base, "HEAD").strip()
    diff = git(root, "diff", "-U0", "--no-color", "--no-ext-diff", "--no-renames", mb, "--")
    lines: dict[str, set[int]] = {}
    current = None
    for row in diff.splitlines():
        if row.startswith("+++ "):
            path = row[4:]
            current = path[2:] if path.startswith("b/") else None
            continue
        m = _HUNK.match(row)
        if m and current:
            start, count = int(m.group(1)), int(m.group(2) if m.group(2) is not None else 1)
            touched = range(start, start + count) if count else range(max(1, start), start + 2)
            lines.setdefault(current, set()).update(touched)
    for rel in git(root, "ls-files", "-z", "--others", "--exclude-standard").split("\0"):
        if rel.endswith(".py") and (root / rel).is_file():
            n = len((root / rel).read_text(errors="replace").splitlines())
            lines.setdefault(rel, set()).update(range(1, n + 1))
    return mb, lines
