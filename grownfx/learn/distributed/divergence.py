"""Checks that ranks which should hold identical networks do: structure before a stage, values after a task."""

from __future__ import annotations

import hashlib
from typing import Iterable, Optional

import torch
from torch import nn


class DivergenceError(RuntimeError):
    """Ranks that should hold identical networks do not."""


def named_tensors(module: nn.Module) -> Iterable[tuple[str, torch.Tensor]]:
    yield from module.named_parameters()
    yield from module.named_buffers()


def structure(module: nn.Module) -> list[tuple]:
    """(name, shape, dtype, requires_grad) of every parameter and buffer."""
    return [(n, tuple(t.shape), str(t.dtype), bool(getattr(t, "requires_grad", False)))
            for n, t in named_tensors(module)]


def digest(t: torch.Tensor) -> str:
    t = t.detach().cpu().contiguous()
    h = hashlib.blake2b(digest_size=16)
    h.update(f"{t.dtype}{tuple(t.shape)}".encode())
    h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def digests(module: nn.Module, extra: Optional[dict] = None) -> list[tuple[str, str]]:
    """A hash of every parameter and buffer, then of every `extra` value (tensor or repr), in a fixed order."""
    entries = [(name, digest(t)) for name, t in named_tensors(module)]
    for name, value in sorted((extra or {}).items()):
        entries.append((name, digest(value) if isinstance(value, torch.Tensor)
                        else hashlib.blake2b(repr(value).encode(), digest_size=16).hexdigest()))
    return entries


def first_difference(a: list, b: list) -> Optional[str]:
    for x, y in zip(a, b):
        if x != y:
            return f"'{x[0]}' {x[1:]} vs '{y[0]}' {y[1:]}"
    if len(a) != len(b):
        return f"{len(a)} vs {len(b)} tensors"
    return None


def raise_on_divergence(gathered: list[list[tuple[str, str]]], what: str) -> None:
    """`gathered[r]`: rank r's `digests`; DivergenceError naming the first tensor where a rank differs from 0."""
    ref = gathered[0]
    for r in range(1, len(gathered)):
        other = gathered[r]
        if other == ref:
            continue
        for i in range(max(len(ref), len(other))):
            a = ref[i] if i < len(ref) else ("<none>", None)
            b = other[i] if i < len(other) else ("<none>", None)
            if a != b:
                name = a[0] if a[0] == b[0] else f"{a[0]}' on rank 0, '{b[0]}' on rank {r}"
                raise DivergenceError(f"ranks diverged {what}: rank {r} differs from rank 0 first at tensor "
                                      f"'{name}' ({len(ref)} tensors compared)")
