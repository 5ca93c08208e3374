"""What a GrowableNet's state dict holds for masks: a finished task's masks as one bit string.

Each masked layer keeps its own packed mask per task in memory (`mask_<t>`, fast to read); in the state dict the
layers' masks of task t are joined into `task_masks.<t>` (module order), so a task costs exactly one bit per unit
plus the padding of one last byte, however many layers it has.  (A layer's `frozen` and `owner` are rebuilt from
its weight and these masks: `MaskedLayer._save_to_state_dict` / `_load_from_state_dict`.)
"""

from __future__ import annotations

import math

import torch
from torch import nn

from grownfx.engine import masks as M
from grownfx.engine.banks import MaskedLayer


def _masked_by_name(net: nn.Module) -> list[tuple[str, MaskedLayer]]:
    return [(name, m) for name, m in net.named_modules() if isinstance(m, MaskedLayer)]


def join_task_masks(net: nn.Module, state: dict, prefix: str, _meta) -> None:
    """State dict: every layer's packed mask of task t -> one bit string `task_masks.t` (layers in module order)."""
    layers = _masked_by_name(net)
    for t in sorted({t for _, m in layers for t in m.mask_shapes}):
        bits = []
        for name, m in layers:
            key = f"{prefix}{name}.mask_{t}"
            if t in m.mask_shapes and key in state:
                bits.append(M.unpack_bits(state.pop(key), m.mask_shapes[t]).reshape(-1))
        if bits:
            state[f"{prefix}task_masks.{t}"] = M.pack_bits(torch.cat([b.cpu() for b in bits]))


def split_task_masks(net: nn.Module, state: dict, prefix: str, *_args) -> None:
    """The inverse of join_task_masks, before the layers load (they need their masks to rebuild owners)."""
    layers = _masked_by_name(net)
    for key in [k for k in state if k.startswith(prefix + "task_masks.")]:
        t = int(key[len(prefix + "task_masks."):])
        shapes = [(name, m.mask_shapes[t]) for name, m in layers if t in m.mask_shapes]
        total = sum(math.prod(shape) for _, shape in shapes)
        packed = state.pop(key)
        if packed.numel() != (total + 7) // 8:
            raise ValueError(f"'{key}': {packed.numel()} bytes for {total} mask bits of task {t}")
        flat, pos = M.unpack_bits(packed, (total,)), 0
        for name, shape in shapes:
            n = math.prod(shape)
            state[f"{prefix}{name}.mask_{t}"] = M.pack_bits(flat[pos:pos + n]).to(packed.device)
            pos += n
