"""A pickle reader that can rebuild numpy arrays and plain containers, and nothing else.

Dataset pickles (CIFAR's python version, the mini-imagenet caches) only need numpy's array
reconstruction and a few builtins; anything else a pickle asks for (os.system, eval, ...) is refused.
"""

from __future__ import annotations

import importlib
import pickle
import warnings
from pathlib import Path
from typing import Any

from grownfx.data.errors import DatasetError, abspath

__all__ = ["safe_load", "RestrictedUnpickler"]

_NUMPY = {
    ("multiarray", "_reconstruct"),
    ("multiarray", "scalar"),
    ("numeric", "_frombuffer"),
}
_NUMPY_TOP = {"ndarray", "dtype"}
_BROKEN = (pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError, IndexError, KeyError, OSError)
_BUILTINS = {"set", "frozenset", "bytearray", "complex", "slice", "range"}


def _numpy_attr(submodule: str, name: str) -> Any:
    # numpy 2 moved numpy.core to numpy._core; pickles written by either version name either one.
    for module in (f"numpy._core.{submodule}", f"numpy.core.{submodule}"):
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                return getattr(importlib.import_module(module), name)
        except (ImportError, AttributeError):
            continue
    raise pickle.UnpicklingError(f"numpy has no {submodule}.{name}")


class RestrictedUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        if module in ("numpy.core.multiarray", "numpy._core.multiarray", "numpy.core.numeric", "numpy._core.numeric"):
            sub = module.rsplit(".", 1)[1]
            if (sub, name) in _NUMPY:
                return _numpy_attr(sub, name)
        elif module == "numpy" and name in _NUMPY_TOP:
            import numpy

            return getattr(numpy, name)
        elif module in ("builtins", "__builtin__") and name in _BUILTINS:
            import builtins

            return getattr(builtins, name)
        elif module == "_codecs" and name == "encode":
            # Python 3 pickles of bytes at protocol <= 2 go through _codecs.encode(str, "latin1").
            import _codecs

            return _codecs.encode
        raise _Refused(f"{module}.{name}")


class _Refused(Exception):
    pass


def safe_load(path: str | Path, howto: str, encoding: str = "bytes") -> Any:
    """Unpickle `path` with `RestrictedUnpickler`; every failure becomes a DatasetError naming the file."""
    path = abspath(path)
    try:
        with open(path, "rb") as f:
            return RestrictedUnpickler(f, encoding=encoding).load()
    except _Refused as e:
        raise DatasetError(
            f"refusing to read {path}: the pickle asks for {e}, which no dataset file needs "
            f"(only numpy arrays and plain containers are allowed). Replace it with the original file. {howto}"
        ) from None
    except FileNotFoundError:
        raise DatasetError(f"expected {path} but it does not exist. {howto} Nothing is downloaded.") from None
    except _BROKEN as e:
        raise DatasetError(
            f"{path} is not a readable pickle ({type(e).__name__}: {e}); it is probably truncated or "
            f"corrupt. {howto}"
        ) from None
