"""Serve every task of a grownfx run from one file, with nothing but torch installed.

This file imports only the standard library and torch: `grownfx export RUN --all-tasks` copies it beside the
artifact (exports/all_tasks/multitask.py), so that a serving environment without grownfx runs

    import sys; sys.path.insert(0, "runs/NAME/exports/all_tasks")
    from multitask import load
    model = load("runs/NAME/exports/all_tasks/model.pt")
    logits = model(x, task=0)        # task: the 0-based index (exports/task_1 is task=0), any batch size

`load` first checks the file's SHA-256 against the `sha256` of the meta.json beside it (a damaged or altered file
is refused: `IntegrityError`), then reads it with `torch.load(weights_only=True)`, so no pickled code runs; each
graph is a `torch.export` archive, checked by `check_archive` before `torch.export.load` reads it (torch.export.load
unpickles parts of an archive without weights_only and loads AOTInductor libraries: an archive holding anything
grownfx never writes is refused).  The checksum says the file is the one the export wrote, not who wrote it:
load files from people you trust.

The file holds

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

import hashlib
import io
import json
import lzma
import warnings
import zipfile
from collections import OrderedDict
from pathlib import Path

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
    check_archive(archive, "a program of the file")
    ep = torch.export.load(io.BytesIO(archive))
    return ep.graph_module if mode != "static" else _Checked(ep.module())


class IntegrityError(ValueError):
    """A file that is not what its meta.json says (damaged or altered), or holds what no grownfx export holds."""


# What a torch.export archive written by grownfx holds, below its root folder: graphs (JSON), raw tensor payloads
# with their JSON configs, the example inputs (a torch.save file) and torch's bookkeeping.  Anything else
# (data/aotinductor/: a compiled library torch would load; custom or opaque objects: pickles with code) is refused.
_ARCHIVE_PARTS = ("archive_format", "archive_version", "byteorder", ".data/", "models/", "data/weights/",
                  "data/constants/", "data/sample_inputs/", "extra/")


def check_archive(archive: bytes, name: str = "archive") -> None:
    """IntegrityError unless the torch.export archive `archive` holds only what grownfx's exports hold, and each
    part torch.export.load would unpickle loads with `torch.load(weights_only=True)` (torch's loader falls back to
    weights_only=False: a pickle that needs it could run any code)."""
    try:
        zf = zipfile.ZipFile(io.BytesIO(archive))
    except (zipfile.BadZipFile, OSError, ValueError) as exc:
        raise IntegrityError(f"{name} is not a torch.export archive ({exc})") from None
    with zf:
        members = [m for m in zf.namelist() if not m.endswith("/")]
        roots = {m.split("/", 1)[0] for m in members}
        if len(roots) != 1 or any("/" not in m for m in members):
            raise IntegrityError(f"{name} is not a torch.export archive grownfx writes (parts {sorted(members)[:4]})")
        root = roots.pop() + "/"
        raw, pickled = set(), set()
        for m in members:
            part = m[len(root):]
            if not part.startswith(_ARCHIVE_PARTS):
                raise IntegrityError(f"{name} holds {part}, which no grownfx export holds (torch.export.load would "
                                     "load it as code): refused")
            if part.startswith(("data/weights/", "data/constants/")) and part.endswith("_config.json"):
                folder = root + part.rsplit("/", 1)[0] + "/"
                try:
                    config = json.loads(zf.read(m)).get("config", {})
                    entries = list(config.values())
                except (ValueError, AttributeError):
                    raise IntegrityError(f"{name}: {part} is not a valid payload config") from None
                for entry in entries:
                    path = str(entry.get("path_name", "")) if isinstance(entry, dict) else ""
                    if path.startswith(("custom_obj_", "opaque_obj_")):
                        raise IntegrityError(f"{name} holds a pickled object ({path}), which no grownfx export "
                                             "holds (unpickling it could run any code): refused")
                    (pickled if entry.get("use_pickle") else raw).add(folder + path)
        for m in members:
            part = m[len(root):]
            if not (m in pickled or part.startswith("data/sample_inputs/")
                    or (part.startswith(("data/weights/", "data/constants/")) and part.endswith(".pt"))):
                continue
            if m in raw:
                continue
            data = zf.read(m)
            if not data:
                continue
            try:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
            except Exception:
                raise IntegrityError(f"{name} holds {part}, a pickle that only loads by running code it names "
                                     "(no grownfx export holds one): refused") from None


def file_sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def check_sha256(data: bytes, path, meta_name: str = "meta.json") -> None:
    """IntegrityError unless `data` (the bytes of `path`) has the SHA-256 recorded for it: by the meta.json beside
    `path` (`sha256` with `file` its name, or `formats.<fmt>.sha256` of the entry whose `file` is its name), else by
    its checksum file `<path>.sha256` (`{"sha256": ..., "previous": [...]}`, as grownfx writes for checkpoints)."""
    path = Path(path)
    meta_path, sidecar = path.parent / meta_name, path.with_name(path.name + ".sha256")
    recorded: list = []
    source = meta_name  # the record the SHA-256 was read from, named in the error
    try:
        meta = json.loads(meta_path.read_text()) if meta_path.exists() else None
    except (OSError, ValueError) as exc:
        raise IntegrityError(f"{path} cannot be checked: {meta_path} is unreadable ({exc})") from None
    if isinstance(meta, dict):
        if meta.get("file") == path.name:
            recorded = [meta.get("sha256")]
        formats = meta.get("formats") if isinstance(meta.get("formats"), dict) else {}
        for entry in formats.values():
            if isinstance(entry, dict) and entry.get("file") == path.name:
                recorded = [entry.get("sha256")]
    if not recorded and sidecar.exists():
        source = sidecar.name
        try:
            d = json.loads(sidecar.read_text())
            recorded = [d["sha256"], *d.get("previous", [])]
        except (OSError, ValueError, KeyError, TypeError, AttributeError):
            raise IntegrityError(f"{path} cannot be checked: its checksum file {sidecar.name} is unreadable") from None
    recorded = [r for r in recorded if isinstance(r, str)]
    if not recorded:
        raise IntegrityError(f"{path} cannot be checked: no {meta_name} beside it records its SHA-256 (nor a "
                             f"{sidecar.name}), so a damaged or altered file would load silently; restore it, or "
                             "load with verify=False if you know the file is intact")
    if file_sha256(data) not in recorded:
        raise IntegrityError(f"{path} is corrupt: its SHA-256 does not match the one in {source} (damaged, altered, "
                             "or replaced without its record); re-create it with grownfx export")


def load(path, cache_tasks: int | None = None, map_location="cpu", verify: bool = True) -> MultiTaskModel:
    """Read a file written by `grownfx export RUN --all-tasks`; `cache_tasks` bounds the tasks kept built.
    `verify` (default) checks the file's SHA-256 against its meta.json first (IntegrityError when they differ or
    meta.json is missing); verify=False skips that check, never the archive checks."""
    path = Path(path)
    data = path.read_bytes()
    if verify:
        check_sha256(data, path)
    if data[:4] != b"PK\x03\x04":
        raise IntegrityError(f"{path} is not a file `grownfx export --all-tasks` writes (not a torch zip archive)")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            blob = torch.load(io.BytesIO(data), map_location=map_location, weights_only=True)
    except Exception as exc:
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        why = ("it holds objects other than tensors and plain containers (refused: loading them would run code)"
               if "weights_only" in str(exc) or "Weights only" in str(exc) else f"truncated or corrupt: {first[:120]}")
        raise IntegrityError(f"{path} is not a readable multi-task file ({why})") from None
    if not isinstance(blob, dict):
        raise IntegrityError(f"{path} is not a file `grownfx export --all-tasks` writes")
    return MultiTaskModel(blob, cache_tasks=cache_tasks)
