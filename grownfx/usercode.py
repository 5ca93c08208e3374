"""The user's own code a recipe names as `module:callable` (`model.builder`, `data.factory`), and where it is found.

A console script's `sys.path` holds neither the working folder nor the recipe's, so a `my_data.py` beside the
recipe would not import.  Modules are looked up in the recipe's `code_dir` (by default the recipe file's folder),
then the working folder, then `sys.path`; the error names every folder it looked in.

Importing a module runs its code: grownfx imports what a recipe names only for a recipe the user gave on the
command line (or, for a run folder reopened from Python, with `trust=True`; see `grownfx.load_run`).
"""

from __future__ import annotations

import importlib
import importlib.util
import os
import sys
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

from grownfx.errors import UserError

__all__ = ["UserCodeError", "import_callable", "is_user_code", "search_dirs"]


class UserCodeError(UserError, ValueError):
    """A `module:callable` that does not import or is not callable; the message says where it was looked for."""


def is_user_code(spec: object) -> bool:
    """Whether a recipe value names user code (`module:callable`) rather than a built-in name."""
    return isinstance(spec, str) and ":" in spec


def search_dirs(code_dir: Optional[os.PathLike | str] = None) -> list[Path]:
    """The folders a `module:callable` is looked up in before `sys.path`: `code_dir`, then the working folder."""
    dirs = [Path(code_dir).resolve()] if code_dir is not None else []
    cwd = Path.cwd().resolve()
    return dirs + ([cwd] if cwd not in dirs else [])


def import_callable(spec: str, code_dir: Optional[os.PathLike | str] = None, what: Optional[str] = None) -> Callable:
    """The callable `package.module:attr.path` names, its module looked up in `search_dirs(code_dir)` first.
    `what` ("data.factory") starts the messages of errors not already located by the caller."""
    prefix = f"{what} {spec!r}: " if what else ""
    module_name, sep, attr = spec.partition(":")
    if not sep or not module_name or not attr:
        raise UserCodeError(f"{prefix}expected 'module:callable', e.g. 'my_data:make_tasks'")
    module = _import(module_name, search_dirs(code_dir), prefix)
    obj: Any = module
    for part in attr.split("."):
        if not hasattr(obj, part):
            where = getattr(module, "__file__", None) or module_name
            raise UserCodeError(f"{prefix}module {module_name!r} has no attribute {attr!r} ({where})")
        obj = getattr(obj, part)
    if not callable(obj):
        raise UserCodeError(f"{what + ' ' if what else ''}{spec!r} is a {type(obj).__name__}, not a callable")
    return obj


def _file_in(top: str, dirs: Sequence[Path]) -> Optional[Path]:
    """The file `import top` finds in the first of `dirs` that holds it (a module file or a package)."""
    for d in dirs:
        for candidate in (d / f"{top}.py", d / top / "__init__.py"):
            if candidate.is_file():
                return candidate.resolve()
    return None


def _import(module_name: str, dirs: Sequence[Path], prefix: str):
    top = module_name.split(".")[0]
    loaded = sys.modules.get(module_name)
    if loaded is not None:
        wanted = _file_in(top, dirs)
        cached = sys.modules.get(top)
        if wanted is None or Path(getattr(cached, "__file__", "") or "").resolve() == wanted:
            return loaded
        # another folder's module of the same name was imported before (two recipes, one process): import this one
        for name in [n for n in sys.modules if n == top or n.startswith(top + ".")]:
            del sys.modules[name]
    # The search folders go in front of sys.path for this import only; a module already imported stays cached.
    added = [str(d) for d in dirs if str(d) not in sys.path]
    sys.path[:0] = added
    try:
        return importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        if exc.name is not None and not module_name.startswith(exc.name) and exc.name != top:
            raise UserCodeError(f"{prefix}cannot import module {module_name!r}: it imports {exc.name!r}, which is not "
                                f"installed ({exc})") from None
        looked = ", ".join(str(d) for d in dirs)
        raise UserCodeError(
            f"{prefix}cannot import module {module_name!r}: no {top}.py (or {top}/ package) in {looked}, nor on "
            f"sys.path (PYTHONPATH). Put it beside the recipe, set the recipe's code_dir to its folder, or "
            f"pip-install it") from None
    except Exception as exc:  # noqa: BLE001 - an error inside the user's module: name it, with the module's file
        where = importlib.util.find_spec(top)
        origin = f" ({where.origin})" if where is not None and where.origin else ""
        raise UserCodeError(f"{prefix}cannot import module {module_name!r}{origin}: {type(exc).__name__}: "
                            f"{exc}") from None
    finally:
        for d in added:
            if d in sys.path:
                sys.path.remove(d)
