"""Files that survive a crash: atomic writes (temp file, fsync, rename), checksums, safe tensor loads.

The one place grownfx writes result files; every layer may use it.
"""

from __future__ import annotations

import csv
import errno
import fcntl
import io
import hashlib
import json
import os
import tempfile
from pathlib import Path
from typing import Any, Iterable

import torch


def atomic_save(obj: Any, path: str | Path) -> None:
    """torch.save to a temp file beside `path`, fsync, rename: a crash never leaves half a checkpoint.

    The SHA-256 of the bytes goes to `<path>.sha256` (with the digest of the file it replaces, so that a crash
    between the two renames leaves a pair that still verifies); `load` checks it.
    """
    path = Path(path)
    buf = io.BytesIO()
    torch.save(obj, buf)
    data = buf.getvalue()
    digest = hashlib.sha256(data).hexdigest()
    sidecar = checksum_path(path)
    previous = [file_sha256(path)] if path.is_file() else []
    atomic_write_bytes(json.dumps({"sha256": digest, "previous": previous}).encode(), sidecar)
    atomic_write_bytes(data, path)


def atomic_write_bytes(data: bytes, path: str | Path) -> None:
    """Write `data` to a temp file beside `path`, fsync, rename, fsync the folder; the file gets the mode a plain
    open() would (the user's umask), and a failure (a full disk: OSError naming `path`) leaves no temp file."""
    path = Path(path)
    _kill_point("write:" + path.name)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=path.name + ".", suffix=TMP_SUFFIX, dir=path.parent)
    try:
        os.fchmod(fd, _default_mode())
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        _fsync_dir(path.parent)
    except BaseException as exc:
        if os.path.exists(tmp):
            os.unlink(tmp)
        if isinstance(exc, OSError) and exc.errno == errno.ENOSPC:
            raise DiskFullError(exc.errno, f"no space left on the device writing {path}", str(path)) from None
        raise


def append_line(line: str, path: str | Path) -> None:
    """Append one line (metrics.jsonl); a full disk is a DiskFullError naming the file."""
    try:
        with open(path, "a") as f:
            f.write(line + "\n")
    except OSError as exc:
        if exc.errno == errno.ENOSPC:
            raise DiskFullError(exc.errno, f"no space left on the device writing {path}", str(path)) from None
        raise


def atomic_write_text(text: str, path: str | Path) -> None:
    atomic_write_bytes(text.encode("utf-8"), path)


def atomic_write_json(obj: Any, path: str | Path, indent: int | None = 1) -> None:
    atomic_write_text(json.dumps(obj, indent=indent, default=str), path)


def atomic_write_csv(rows: Iterable[Iterable[Any]], path: str | Path) -> None:
    """rows (the header first) as CSV, written atomically."""
    buf = io.StringIO(newline="")
    csv.writer(buf).writerows(rows)
    atomic_write_text(buf.getvalue(), path)


def load(path: str | Path) -> dict:
    """A checkpoint written by `atomic_save`, its checksum verified: CorruptFileError (one line naming the file)
    for a missing, empty, truncated or altered file, never torch's unpickling advice."""
    path = Path(path)
    if not path.is_file():
        raise CorruptFileError(f"{path} does not exist")
    if path.stat().st_size == 0:
        raise CorruptFileError(f"{path} is empty (0 bytes): the checkpoint is corrupt")
    digests = _recorded_digests(checksum_path(path))
    if digests and file_sha256(path) not in digests:
        raise CorruptFileError(f"{path} is corrupt: its SHA-256 does not match {checksum_path(path).name} "
                               "(truncated or altered)")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - torch's errors are pages of advice that does not apply here
        reason = str(exc).strip().splitlines()[0][:160] if str(exc).strip() else type(exc).__name__
        raise CorruptFileError(f"{path} is not a readable checkpoint (truncated or corrupt: {reason})") from None


def read_json(path: str | Path) -> Any:
    """json.loads of a result file; CorruptFileError naming it when it is truncated or not JSON."""
    path = Path(path)
    try:
        return json.loads(path.read_text())
    except ValueError as exc:  # JSONDecodeError, UnicodeDecodeError
        raise CorruptFileError(f"{path} is not valid JSON (truncated or corrupt: {exc})") from None


def file_sha256(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


TMP_SUFFIX = ".tmp"


class CorruptFileError(RuntimeError):
    """A result file (checkpoint, export) that is missing, empty, truncated or fails its checksum."""


class DiskFullError(OSError):
    """ENOSPC while writing a result file; the message names the file."""

    def __str__(self) -> str:
        return str(self.strerror)


class LockedError(RuntimeError):
    """Another process writes this run folder."""


def checksum_path(path: str | Path) -> Path:
    path = Path(path)
    return path.with_name(path.name + ".sha256")


def _recorded_digests(sidecar: Path) -> list[str]:
    try:
        d = json.loads(sidecar.read_text())
        return [d["sha256"], *d.get("previous", [])]
    except (OSError, ValueError, KeyError, TypeError):
        return []


def _default_mode() -> int:
    """0o666 less the umask: what open(path, "w") would give (mkstemp alone gives 0o600)."""
    mask = os.umask(0)
    os.umask(mask)
    return 0o666 & ~mask


def _fsync_dir(folder: Path) -> None:
    try:
        dir_fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(dir_fd)
    except OSError:
        pass
    finally:
        os.close(dir_fd)


def clean_stale_temps(folder: str | Path) -> list[Path]:
    """Remove temp files a killed writer left under `folder` (`<name>.<random>.tmp`); returns them."""
    removed = []
    for p in Path(folder).rglob("*" + TMP_SUFFIX):
        if p.is_file() and p.name.count(".") >= 2:
            try:
                p.unlink()
                removed.append(p)
            except OSError:
                pass
    return removed


class FolderLock:
    """An exclusive lock on a folder (fcntl.flock on `<folder>/.lock`, holding the owner's pid).

    The kernel releases it when the process exits or is killed, so a lock file left by a dead process is stale and
    simply taken over.  `acquire` raises LockedError when another live process holds it.
    """

    NAME = ".lock"

    def __init__(self, folder: str | Path):
        self.folder = Path(folder)
        self.path = self.folder / self.NAME
        self._fd: int | None = None

    def acquire(self) -> "FolderLock":
        self.folder.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o666)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            try:
                owner = os.pread(fd, 64, 0).decode(errors="replace").strip()
            except OSError:
                owner = ""
            os.close(fd)
            raise LockedError(f"{self.folder} is in use by another grownfx process"
                              + (f" (pid {owner})" if owner else "")
                              + "; wait for it to finish, or choose another --out") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, str(os.getpid()).encode(), 0)
        self._fd = fd
        return self

    def release(self) -> None:
        if self._fd is not None:
            try:
                fcntl.flock(self._fd, fcntl.LOCK_UN)
            finally:
                os.close(self._fd)
                self._fd = None

    def __enter__(self) -> "FolderLock":
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


def _kill_point(name: str) -> None:
    """Test hook: GROWNFX_TEST_KILL_AT=<name> makes the process die at once (like SIGKILL) when it reaches the
    point `name` (e.g. `after_checkpoint`, `write:meta.json`); unset, it costs one dict lookup."""
    if os.environ.get("GROWNFX_TEST_KILL_AT") == name:
        os._exit(137)


kill_point = _kill_point
