"""Serve every task of a grownfx run from one file, with nothing but torch installed.

This file imports only the standard library and torch: `grownfx export RUN --all-tasks` copies it beside the
artifact (exports/all_tasks/multitask.py), so that a serving environment without grownfx runs

    import sys; sys.path.insert(0, "runs/NAME/exports/all_tasks")
    from multitask import load
    model = load("runs/NAME/exports/all_tasks/model.mt")
    logits = model(x, task=0)        # task: the 0-based index (exports/task_1 is task=0), any batch size

The file (`torch.save`, read with `weights_only=True`: no pickled code runs) holds

  * each masked layer's frozen weight bank once,
  * per task and masked layer: the channels that task sees (index lists) and its bit-packed mask, one bit per
    kernel (per weight for element-granularity layers),
  * per task: every other tensor of its plain model (norms, heads, biases), stored once when tasks share it,
  * the graphs: `torch.export` programs taking (input, tensors...) and holding no weights, one per graph and
    shapes (tasks learned between two growths share one), and an index (JSON): per task, its program and where
    each of its tensors comes from; the index and the programs are compressed together (lzma).

Task t's weights are built on its first call, bit for bit as the task-aware model builds them
(`where(mask, bank[visible], 0)`), and kept: `cache_tasks` (default: every task) bounds how many tasks' weights
stay in memory, least recently used dropped first.  Memory: the file's tensors plus each cached task's plain
weights.  A call for a cached task runs its program directly: a task switch costs no rebuild.
"""

from __future__ import annotations

import io
import json
import lzma
from collections import OrderedDict

import torch

FORMAT = "grownfx-multitask"
VERSION = 1
_BIT_WEIGHTS = torch.tensor([128, 64, 32, 16, 8, 4, 2, 1], dtype=torch.uint8)


def pack_bits(mask: torch.Tensor) -> torch.Tensor:
    """Bool tensor -> uint8 tensor of ceil(numel / 8) bytes (big-endian within a byte, like numpy.packbits)."""
    flat = mask.reshape(-1).to(torch.uint8)
    pad = (-flat.numel()) % 8
    if pad:
        flat = torch.cat([flat, flat.new_zeros(pad)])
    return (flat.view(-1, 8) * _BIT_WEIGHTS.to(flat.device)).sum(dim=1, dtype=torch.uint8)


def unpack_bits(packed: torch.Tensor, shape) -> torch.Tensor:
    """uint8 bytes (big-endian within a byte, like numpy.packbits) -> bool tensor of `shape`."""
    n = 1
    for s in shape:
        n *= int(s)
    bits = packed.unsqueeze(1).bitwise_and(_BIT_WEIGHTS.to(packed.device)).ne(0)
    return bits.reshape(-1)[:n].reshape(tuple(shape))


class MultiTaskModel:
    """`model(x, task=t)`: the logits of task t (0-based), computed by that task's program on its weights."""

    def __init__(self, blob: dict, cache_tasks: int | None = None):
        if blob.get("format") != FORMAT:
            raise ValueError(f"not a {FORMAT} file (format {blob.get('format')!r})")
        if int(blob.get("version", 0)) > VERSION:
            raise ValueError(f"{FORMAT} version {blob['version']} is newer than this loader ({VERSION})")
        self.storage: dict = blob["storage"]
        packed = lzma.decompress(self.tensor(blob["index"]).cpu().numpy().tobytes())
        n = int.from_bytes(packed[:8], "little")
        index = json.loads(packed[8: 8 + n])
        self.tasks: list = index["tasks"]
        self.names = [t.get("name", f"task{i}") for i, t in enumerate(self.tasks)]
        self._blobs, pos = [], 8 + n  # (archive bytes, mode) of each program
        for size, mode in index["programs"]:
            self._blobs.append((packed[pos: pos + size], mode))
            pos += size
        self._programs: dict = {}
        self.cache_tasks = cache_tasks
        self._cache: OrderedDict = OrderedDict()  # task -> callable x -> logits

    @property
    def num_tasks(self) -> int:
        return len(self.tasks)

    def tensor(self, ref) -> torch.Tensor:
        """The stored tensor `ref` = (dtype name, offset, shape): a view into its dtype's flat storage."""
        dtype, offset, shape = ref
        n = 1
        for s in shape:
            n *= int(s)
        return self.storage[dtype][offset: offset + n].view(tuple(shape))

    def program(self, index: int):
        """Stored program `index` as a callable (x, *tensors) -> (logits,), loaded on first use."""
        if index not in self._programs:
            self._programs[index] = load_program(*self._blobs[index])
        return self._programs[index]

    def weights(self, task: int) -> list:
        """Task `task`'s tensors in its program's input order, built from the bank and its mask."""
        out = []
        for entry in self.tasks[task]["inputs"]:
            if entry[0] == "tensor":
                out.append(self.tensor(entry[1]).clone())  # its own (aligned) memory, as a plain model has
                continue
            _, bank, out_idx, in_idx, mask, unit_shape = entry
            w = self.tensor(bank)
            if out_idx is not None:
                w = w.index_select(0, self.tensor(out_idx).long())
            if in_idx is not None:
                w = w.index_select(1, self.tensor(in_idx).long())
            m = unpack_bits(self.tensor(mask), unit_shape)
            m = m.view(tuple(m.shape) + (1,) * (w.dim() - m.dim()))
            out.append(torch.where(m, w, torch.zeros((), dtype=w.dtype, device=w.device)))
        return out

    def runner(self, task: int):
        """The callable x -> logits of `task`, built on first use and kept (LRU of `cache_tasks` tasks)."""
        run = self._cache.get(task)
        if run is not None:
            self._cache.move_to_end(task)
            return run
        if not 0 <= task < len(self.tasks):
            raise IndexError(f"task {task} does not exist (tasks 0..{len(self.tasks) - 1}, 0-based)")
        program = self.program(self.tasks[task]["program"])
        ws = self.weights(task)

        def run(x, _program=program, _ws=ws):
            return _program(x, *_ws)[0]

        self._cache[task] = run
        limit = self.cache_tasks
        while limit is not None and len(self._cache) > max(1, int(limit)):
            self._cache.popitem(last=False)
        return run

    def __call__(self, x: torch.Tensor, task: int) -> torch.Tensor:
        run = self._cache.get(task)
        if run is None:
            run = self.runner(int(task))
        elif self.cache_tasks is not None:
            self._cache.move_to_end(task)
        return run(x)

    def clear_cache(self) -> None:
        self._cache.clear()


class _Checked:
    """A fixed-shape program's checked module called like a graph: (x, *tensors) -> (logits,)."""

    def __init__(self, module):
        self.module = module

    def __call__(self, x, *tensors):
        return (self.module(x, list(tensors)),)


def load_program(archive: bytes, mode: str):
    """A stored program (a torch.export archive) as a callable (x, *tensors) -> (logits,).  A dynamic-batch program
    ("batch") runs its graph directly, as a plain GraphModule runs (no per-call input checks: the exporter checked
    it computes its tasks bit for bit at batch sizes 1 to 3); a "static" one keeps its checks."""
    ep = torch.export.load(io.BytesIO(archive))
    return ep.graph_module if mode != "static" else _Checked(ep.module())


def load(path, cache_tasks: int | None = None, map_location="cpu") -> MultiTaskModel:
    """Read a file written by `grownfx export RUN --all-tasks`; `cache_tasks` bounds the tasks kept built."""
    blob = torch.load(path, map_location=map_location, weights_only=True)
    return MultiTaskModel(blob, cache_tasks=cache_tasks)
