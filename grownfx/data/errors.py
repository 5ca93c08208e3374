"""The one error a missing or malformed dataset raises, with messages that say what to do."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Iterable

from grownfx.errors import UserError

__all__ = ["DatasetError", "abspath", "describe_dir", "missing_files_error"]


class DatasetError(UserError, ValueError):
    """A dataset is missing, incomplete, malformed or unsafe to read. Nothing is ever downloaded."""


def abspath(path: str | os.PathLike) -> Path:
    return Path(path).expanduser().absolute()


def describe_dir(path: Path, limit: int = 12) -> str:
    """What is actually at `path` (or at its nearest existing parent), for error messages."""
    path = abspath(path)
    if path.is_file():
        return f"{path} is a file ({path.stat().st_size} bytes), not a folder"
    if path.is_dir():
        entries = sorted(os.listdir(path))
        if not entries:
            return f"{path} exists but is empty"
        shown = ", ".join(e + ("/" if (path / e).is_dir() else "") for e in entries[:limit])
        more = f" and {len(entries) - limit} more" if len(entries) > limit else ""
        return f"{path} contains: {shown}{more}"
    parent = path.parent
    while not parent.exists() and parent != parent.parent:
        parent = parent.parent
    return f"{path} does not exist (nearest existing folder: {parent})"


def missing_files_error(expected: Iterable[Path], look_in: Path, howto: str) -> DatasetError:
    names = ", ".join(str(abspath(p)) for p in expected)
    return DatasetError(f"expected {names}; found instead: {describe_dir(look_in)}. {howto} Nothing is downloaded.")
