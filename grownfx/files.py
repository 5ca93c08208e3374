"""Files that survive a crash: atomic writes (temp file, fsync, rename), checksums, safe tensor loads.

The one place grownfx writes result files; every layer may use it.  A write that the system refuses (a full disk,
a quota, a read-only folder) is a one-line `UserError` naming the file or folder (DiskFullError,
NotWritableError); no temp file is left behind.
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
import warnings
from pathlib import Path
from typing import Any, Iterable

from grownfx.errors import UserError

# torch is imported by the functions that save or load tensors: `grownfx cp` and `validate` write files without it


def atomic_save(obj: Any, path: str | Path) -> None:
    """torch.save to a temp file beside `path`, fsync, rename: a crash never leaves half a checkpoint.

    The SHA-256 of the bytes goes to `<path>.sha256` (with the digest of the file it replaces, so that a crash
    between the two renames leaves a pair that still verifies); `load` checks it.
    """
    import torch

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
    ensure_dir(path.parent)
    try:
        fd, tmp = tempfile.mkstemp(prefix=path.name + ".", suffix=TMP_SUFFIX, dir=path.parent)
    except OSError as exc:
        raise write_error(exc, path) from None
    try:
        os.fchmod(fd, _default_mode())
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        _kill_point("rename:" + path.name)  # the temp file is complete, the old file still in place
        os.replace(tmp, path)
        _fsync_dir(path.parent)
    except BaseException as exc:
        if os.path.exists(tmp):
            os.unlink(tmp)
        if isinstance(exc, OSError) and not isinstance(exc, UserError):
            raise write_error(exc, path) from None
        raise


def append_line(line: str, path: str | Path) -> None:
    """Append one line (metrics.jsonl); a full disk is a DiskFullError naming the file."""
    try:
        with open(path, "a") as f:
            f.write(line + "\n")
    except OSError as exc:
        raise write_error(exc, path) from None


def atomic_write_text(text: str, path: str | Path) -> None:
    atomic_write_bytes(text.encode("utf-8"), path)


def atomic_write_json(obj: Any, path: str | Path, indent: int | None = 1) -> None:
    atomic_write_text(json.dumps(obj, indent=indent, default=str), path)


def atomic_write_csv(rows: Iterable[Iterable[Any]], path: str | Path) -> None:
    """rows (the header first) as CSV, written atomically."""
    buf = io.StringIO(newline="")
    csv.writer(buf).writerows(rows)
    atomic_write_text(buf.getvalue(), path)


def load(path: str | Path, verify: bool = True) -> dict:
    """A checkpoint written by `atomic_save`, its checksum verified: CorruptFileError (one line naming the file)
    for a missing, empty, truncated or altered file, or one without its checksum file, never torch's unpickling
    advice.  `verify=False` (the command line's loud `--no-verify`) loads a file whose checksum file is missing
    or unreadable; a checksum that is there and does not match is refused either way."""
    path = Path(path)
    if not path.is_file():
        raise CorruptFileError(f"{path} does not exist")
    data = read_bytes(path)
    if not data:
        raise CorruptFileError(f"{path} is empty (0 bytes): the checkpoint is corrupt")
    sidecar = checksum_path(path)
    digests = _recorded_digests(sidecar)
    if digests is None and verify:
        what = "is missing" if not sidecar.exists() else "is unreadable"
        raise CorruptFileError(f"{path} cannot be checked: its checksum file {sidecar.name} {what}, so a damaged "
                               "or altered checkpoint would load silently; restore the file, or load it unchecked "
                               "with --no-verify (Python: verify=False) if you know it is intact")
    if digests and hashlib.sha256(data).hexdigest() not in digests:
        raise CorruptFileError(f"{path} is corrupt: its SHA-256 does not match {sidecar.name} "
                               "(truncated or altered)")
    return load_tensors(data, path, "checkpoint")


def load_tensors(data: bytes, path: str | Path, what: str = "file") -> Any:
    """`torch.load(weights_only=True)` of the bytes of a file grownfx wrote (a zip archive of tensors and plain
    containers): CorruptFileError naming `path` for anything else, in one line, never torch's warnings or its
    advice to load with weights_only=False (which would run the code a file names)."""
    if data[:4] != b"PK\x03\x04":
        kind = "a legacy (non-zip) torch pickle" if data[:1] == b"\x80" else "not a torch zip archive"
        raise CorruptFileError(f"{path} is not a {what} grownfx writes ({kind}); refusing to load it")
    import torch

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - torch's errors are pages of advice that does not apply here
        raise CorruptFileError(f"{path} is not a readable {what} ({_load_failure(exc)})") from None


def _load_failure(exc: Exception) -> str:
    """Why torch.load failed, in a few words and without torch's advice about weights_only."""
    text = str(exc)
    if "Weights only load failed" in text or "weights_only" in text:
        import re

        found = re.search(r"(?:Unsupported global|unsupported global|GLOBAL)\s*:?\s*(?:GLOBAL\s+)?([\w.]+)", text)
        asks = f" ({found.group(1)})" if found else ""
        return (f"it holds an object other than tensors and plain containers{asks}, which no grownfx file holds; "
                "loading it would run code it names: refused")
    first = text.strip().splitlines()[0][:160] if text.strip() else type(exc).__name__
    return f"truncated or corrupt: {first}"


def read_bytes(path: str | Path) -> bytes:
    """The bytes of `path`; NotWritableError-style one line when it cannot be read."""
    try:
        return Path(path).read_bytes()
    except PermissionError as exc:
        raise NotWritableError(exc.errno, f"cannot read {path}: permission denied", str(path)) from None


def read_json(path: str | Path) -> Any:
    """json.loads of a result file; CorruptFileError naming it when it is truncated or not JSON."""
    path = Path(path)
    try:
        return json.loads(read_bytes(path))
    except FileNotFoundError:
        raise CorruptFileError(f"{path} does not exist") from None
    except ValueError as exc:  # JSONDecodeError, UnicodeDecodeError
        raise CorruptFileError(f"{path} is not valid JSON (truncated or corrupt: {exc})") from None


def file_sha256(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


TMP_SUFFIX = ".tmp"


class CorruptFileError(UserError, RuntimeError):
    """A result file (checkpoint, export, JSON) that is missing, empty, truncated, of the wrong shape or fails its
    checksum."""


class DiskFullError(UserError, OSError):
    """No room to write a result file (a full disk, a quota, a file-size limit); the message names the file."""

    def __str__(self) -> str:
        return str(self.strerror)


class NotWritableError(UserError, OSError):
    """A folder grownfx must write (or a file it must read) that the system refuses: permission or a read-only
    filesystem; the message names the folder and what is missing."""

    def __str__(self) -> str:
        return str(self.strerror)


class LockedError(UserError, RuntimeError):
    """Another process writes this run folder."""


_FULL = {errno.ENOSPC: "no space left on the device", errno.EDQUOT: "disk quota exceeded",
         errno.EFBIG: "file too large (a filesystem or process file-size limit)"}
_DENIED = (errno.EACCES, errno.EPERM, errno.EROFS)


def write_error(exc: OSError, path: str | Path) -> OSError:
    """`exc`, raised writing `path`, as the one-line error a user can act on (DiskFullError, NotWritableError),
    or `exc` itself when it is neither."""
    path = Path(path)
    if exc.errno in _FULL:
        return DiskFullError(exc.errno, f"{_FULL[exc.errno]} writing {path}", str(path))
    if exc.errno in _DENIED:
        folder = path if path.is_dir() else path.parent
        why = ("is on a read-only filesystem" if exc.errno == errno.EROFS
               else "is not writable by this user (permission denied)")
        return NotWritableError(exc.errno, f"cannot write {path}: the folder {folder} {why}; grownfx needs write "
                                "permission there (copy the folder somewhere writable, or fix its permissions)",
                                str(path))
    return exc


def ensure_dir(folder: str | Path) -> Path:
    """mkdir -p `folder`; a refusal is a one-line NotWritableError/DiskFullError naming it."""
    folder = Path(folder)
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise write_error(exc, folder) from None
    return folder


# files whose presence means a folder holds a run (started, perhaps killed before its first checkpoint)
RUN_MARKERS = ("config.resolved.yaml", "metrics.jsonl", "checkpoints/last.pt", "summary.json")


def holds_run(folder: str | Path) -> bool:
    """Whether `folder` holds a grownfx run (finished, interrupted, or killed before its first checkpoint)."""
    return any((Path(folder) / m).exists() for m in RUN_MARKERS)


def checksum_path(path: str | Path) -> Path:
    path = Path(path)
    return path.with_name(path.name + ".sha256")


def _recorded_digests(sidecar: Path) -> list[str] | None:
    """The digests a checksum file vouches for (its own and the previous file's); None when it is missing or
    unreadable."""
    try:
        d = json.loads(sidecar.read_text())
        digests = [d["sha256"], *d.get("previous", [])]
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return None
    if not all(isinstance(x, str) and len(x) == 64 for x in digests):
        return None
    return digests


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
        ensure_dir(self.folder)
        try:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o666)
        except OSError as exc:
            raise write_error(exc, self.path) from None
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
    point `name` (e.g. `after_checkpoint`, `write:meta.json` before a file is written, `rename:model.pt2` between
    a complete temp file and its rename); `<name>:TERM` (or `:INT`) sends the process that signal there instead
    and goes on.  Unset, it costs one dict lookup."""
    at = os.environ.get("GROWNFX_TEST_KILL_AT")
    if at is None:
        return
    point, _, sig = at.rpartition(":") if at.endswith((":TERM", ":INT")) else (at, "", "")
    if point != name:
        return
    if sig:
        import signal

        os.kill(os.getpid(), getattr(signal, "SIG" + sig))
        return
    os._exit(137)


kill_point = _kill_point
