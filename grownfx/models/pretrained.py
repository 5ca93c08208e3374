"""Pretrained weights (`model.weights`): a state-dict file, or a torchvision weights name from the local cache.

Nothing is downloaded and nothing a file names is run: a file is read with `torch.load(weights_only=True)` and only
after its SHA-256 matched the one the recipe gives (`model.weights_sha256`) or the `<file>.sha256` beside it.  A
torchvision name (`ResNet18_Weights.IMAGENET1K_V1`) is looked for where torch.hub keeps it,
`$TORCH_HOME/hub/checkpoints/<torchvision's file name>`, and checked against the SHA-256 prefix that file name
carries (torch.hub's own check).

The classifier is found without tracing: the parameters whose shapes change when the builder is called with one
more class are the head's.  Every other key of the file must match the model's by name and shape.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from functools import lru_cache
from pathlib import Path
from typing import Callable, Optional

import torch
from torch import nn

from grownfx.errors import UserError

__all__ = ["WeightsError", "check_weights_file", "class_axes", "is_torchvision_name", "load_weights", "read_state_dict",
           "sha256_of", "torchvision_cache_path"]

_TV_NAME = re.compile(r"[A-Za-z][A-Za-z0-9_]*_Weights\.[A-Za-z0-9_]+")
_HASH_IN_NAME = re.compile(r"-([a-f0-9]+)\.")  # torch.hub's HASH_REGEX: resnet18-f37072fd.pth
_SHOWN = 4  # keys named in a mismatch message


class WeightsError(UserError, ValueError):
    """`model.weights` names a file that is missing, unchecked, unreadable or does not fit the model."""


def is_torchvision_name(spec: str) -> bool:
    return bool(_TV_NAME.fullmatch(spec))


def normalise_sha256(value: Optional[str]) -> Optional[str]:
    """'sha256:ABC...' or 'abc...' -> 'abc...' (None stays None)."""
    if value is None:
        return None
    value = value.strip()
    return (value[len("sha256:"):] if value.lower().startswith("sha256:") else value).lower()


def sha256_of(path: str | os.PathLike) -> str:
    p = Path(path)
    st = p.stat()
    return _sha256_cached(str(p.resolve()), st.st_size, st.st_mtime_ns)


@lru_cache(maxsize=16)
def _sha256_cached(path: str, size: int, mtime_ns: int) -> str:  # one hash per file version, not per build
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def torchvision_cache_path(name: str) -> Path:
    """Where torch.hub keeps the file of torchvision weights `name` (not downloaded: only the path)."""
    import torchvision

    try:
        weight = torchvision.models.get_weight(name)
    except (ValueError, KeyError, AttributeError):
        raise WeightsError(f"{name!r}: torchvision has no such weights (e.g. "
                           "ResNet18_Weights.IMAGENET1K_V1)") from None
    return Path(torch.hub.get_dir()) / "checkpoints" / weight.url.rsplit("/", 1)[-1]


def _sidecar_sha256(path: Path) -> Optional[str]:
    side = path.with_name(path.name + ".sha256")
    if not side.is_file():
        return None
    text = side.read_text(encoding="utf-8", errors="replace").strip()
    if text.startswith("{"):  # grownfx's own sidecars (files.atomic_save): {"sha256": ...}
        try:
            return normalise_sha256(str(json.loads(text)["sha256"]))
        except (ValueError, KeyError, TypeError):
            return ""
    words = text.split()  # `sha256sum` output: HASH  NAME
    return normalise_sha256(words[0]) if words else ""


def check_weights_file(spec: str, sha256: Optional[str] = None, verify: bool = True) -> tuple[Path, Optional[str]]:
    """The file `model.weights` names, checked: (path, its SHA-256 when the caller should record it, else None).

    A file's checksum is the recipe's `sha256` or its `<file>.sha256`; with neither it is refused unless `verify`
    is False, and then its hash is returned for the resolved recipe to record what was used.  A mismatch is
    always refused.  A torchvision name is checked against the hash prefix in torchvision's file name."""
    if is_torchvision_name(spec):
        path = torchvision_cache_path(spec)
        if not path.is_file():
            raise WeightsError(
                f"{spec!r}: not in the local torch cache, looked for {path} (grownfx never downloads). "
                f"On a connected machine run `python -c \"import torchvision; torchvision.models.get_weight('{spec}')"
                f".get_state_dict()\"` and copy ~/.cache/torch/hub/checkpoints/{path.name} to {path} here (or set "
                "TORCH_HOME to a folder holding hub/checkpoints/)")
        m = _HASH_IN_NAME.search(path.name)
        if m and not sha256_of(path).startswith(m.group(1)):
            raise WeightsError(f"{spec!r}: {path} is damaged or not torchvision's file: its SHA-256 "
                               f"does not start with {m.group(1)}, the prefix its name carries")
        return path, None
    path = Path(spec)
    if not path.is_file():
        raise WeightsError(f"no file {path}" + (" (a folder)" if path.is_dir() else ""))
    expected = normalise_sha256(sha256) or _sidecar_sha256(path)
    actual = sha256_of(path)
    if expected is None:
        if verify:
            raise WeightsError(f"{path} has no checksum: give model.weights_sha256 (sha256:<hex>) or "
                               f"put its SHA-256 in {path.name}.sha256 beside it; to load it unchecked pass "
                               "--no-verify (Python: verify=False)")
        return path, actual
    if actual != expected:
        raise WeightsError(f"{path} does not match its checksum (expected {expected[:16]}..., the "
                           f"file has {actual[:16]}...): the file changed or is not the one the recipe names")
    return path, None


def read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """The tensors of a state-dict file (a `{'state_dict': ...}` or `{'model': ...}` wrapper is opened)."""
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # an unpickler refusal, a truncated file: one line either way
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise WeightsError(f"{path} is not a state dict torch can load with weights_only=True "
                           f"({first[:200]})") from None
    for key in ("state_dict", "model"):
        if isinstance(obj, dict) and isinstance(obj.get(key), dict) and not isinstance(obj.get(key), torch.Tensor):
            obj = obj[key]
            break
    if not isinstance(obj, dict) or not obj or not all(isinstance(k, str) and isinstance(v, torch.Tensor)
                                                       for k, v in obj.items()):
        raise WeightsError(f"{path} does not hold a state dict (a mapping of names to tensors)")
    return obj


def class_axes(build: Callable[[int], nn.Module]) -> dict[str, int]:
    """{state-dict key: axis} of the tensors whose size follows the number of classes (the classifier's)."""
    with torch.random.fork_rng():
        a, b = build(2).state_dict(), build(3).state_dict()
    out = {}
    for k, t in a.items():
        if k in b and t.shape != b[k].shape:
            diff = [i for i, (x, y) in enumerate(zip(t.shape, b[k].shape)) if x != y]
            out[k] = diff[0] if len(diff) == 1 and t.dim() == b[k].dim() else -1
    return out


def _few(keys) -> str:
    keys = sorted(keys)
    return ", ".join(keys[:_SHOWN]) + (f" and {len(keys) - _SHOWN} more" if len(keys) > _SHOWN else "")


def file_classes(state: dict[str, torch.Tensor], axes: dict[str, int], path) -> Optional[int]:
    """The number of classes of the file's own classifier (None when it has none: a backbone without head)."""
    sizes = {state[k].shape[a] for k, a in axes.items() if k in state and 0 <= a < state[k].dim()}
    if not sizes:
        return None
    if len(sizes) > 1:
        raise WeightsError(f"{path}: the classifier's tensors disagree on the number of classes "
                           f"({sorted(sizes)})")
    return sizes.pop()


def load_weights(model: nn.Module, state: dict[str, torch.Tensor], axes: dict[str, int], path,
                 head: bool) -> None:
    """Copy `state` into `model`: every non-classifier key must be there with the model's shape; the classifier's
    too when `head` (the model was built with the file's classes), else the model keeps its fresh head."""
    own = model.state_dict()
    body = {k for k in own if k not in axes}
    missing = body - state.keys()
    unexpected = state.keys() - own.keys()
    wrong = [k for k in body & state.keys() if state[k].shape != own[k].shape]
    problems = []
    if missing:
        problems.append(f"missing {_few(missing)}")
    if unexpected:
        problems.append(f"not in the model {_few(unexpected)}")
    if wrong:
        problems.append("other shapes " + _few(f"{k} {tuple(state[k].shape)} vs {tuple(own[k].shape)}" for k in wrong))
    if problems:
        raise WeightsError(f"{path} does not fit the builder's model: " + "; ".join(problems))
    keys = set(body) | ({k for k in axes if k in state} if head else set())
    if head:
        wrong_head = [k for k in axes if k in state and state[k].shape != own[k].shape]
        if wrong_head:
            raise WeightsError(f"{path}: classifier shapes {_few(wrong_head)} do not fit the model")
    with torch.no_grad():
        for k in keys:
            own[k].copy_(state[k])
