"""Step 6 (every task): one artifact serving all tasks of a net, read back by `multitask_runtime` with torch alone.

`build(net, example)` exports each task's plain model (`net.export(t, prune_unused=False)`: every channel the task
sees) as a `torch.export` program whose weights are inputs, so the programs hold no tensors, and stores

  * a masked layer's weight of task t as a reference into the layer's frozen bank (stored once): the channels t
    sees (`ctx.visible`) and one bit per unit (a kernel; a weight at element granularity), set where the task's
    weight is non-zero: its mask, less units whose frozen values are all zero (they compute the same).
    where(bits, bank[visible], 0) is checked bit for bit against the task's plain weight when built; a weight
    that does not match (a task still being learned) is stored whole,
  * every other tensor as it is, once for all tasks holding the same bytes (a norm, head or bias per task),
  * the graphs: one program (batch size dynamic) per graph and shapes, checked to compute the task's plain model
    bit for bit; all programs and the index are compressed together (lzma).  An nn.MultiheadAttention that runs
    torch's fused inference kernel eagerly calls the same kernel in its program (`_fused_attentions`).

All tensors live in one flat buffer per dtype (`storage`), referenced as (dtype, offset, shape).
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import lzma
import types
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

from grownfx import files
from grownfx.engine import multitask_runtime as R


class _Storage:
    """Flat per-dtype buffers; a tensor with the same dtype, shape and bytes as an earlier one is stored once."""

    def __init__(self):
        self.parts: dict[str, list[torch.Tensor]] = {}
        self.sizes: dict[str, int] = {}
        self.seen: dict[tuple, list] = {}

    def add(self, t: torch.Tensor) -> list:
        t = t.detach().cpu().contiguous()
        name = str(t.dtype).removeprefix("torch.")
        digest = hashlib.sha256(t.reshape(-1).view(torch.uint8).numpy().tobytes()).hexdigest()
        key = (name, tuple(t.shape), digest)
        if key in self.seen:
            return self.seen[key]
        offset = self.sizes.get(name, 0)
        self.parts.setdefault(name, []).append(t.reshape(-1))
        self.sizes[name] = offset + t.numel()
        ref = [name, offset, [int(s) for s in t.shape]]
        self.seen[key] = ref
        return ref

    def finish(self) -> dict[str, torch.Tensor]:
        return {name: torch.cat(parts) for name, parts in self.parts.items()}


class _Bound(nn.Module):
    """A plain model whose tensors are inputs: forward(x, tensors) (torch.export then stores no weights)."""

    def __init__(self, plain: nn.Module, names: list[str], preprocess: bool):
        super().__init__()
        self.__dict__["plain"] = plain  # unregistered: its tensors must not become the program's state
        self.names, self.preprocess = names, preprocess

    def forward(self, x: torch.Tensor, tensors: list[torch.Tensor]) -> torch.Tensor:
        n = len(self.names)
        if self.preprocess:  # the same expression as grownfx.run.export.Preprocessed
            x = x * tensors[n] - tensors[n + 1]
        return torch.func.functional_call(self.__dict__["plain"], dict(zip(self.names, tensors[:n])), (x,),
                                          tie_weights=False, strict=True)


class _SeenOps(TorchDispatchMode):
    """Records which attention modules ran torch's fused attention kernel (`aten._native_multi_head_attention`): the
    module entered last (`running`, kept by its forward hooks) when the kernel is dispatched."""

    def __init__(self):
        super().__init__()
        self.running: list[nn.Module] = []
        self.fused: set[int] = set()

    def __torch_dispatch__(self, func, types_, args=(), kwargs=None):
        if func is torch.ops.aten._native_multi_head_attention.default and self.running:
            self.fused.add(id(self.running[-1]))
        return func(*args, **(kwargs or {}))


def _fused_attentions(plain: nn.Module, example: torch.Tensor) -> list[nn.Module]:
    """The nn.MultiheadAttention modules of `plain` that take torch's fused inference kernel (MHA's "fast path")
    when `plain` runs eagerly without grad, as the artifact's programs run.  torch.export never takes that path (it
    is blocked while tracing) and its decomposed attention differs in the last bits, so where the eager model
    fuses, the program calls the same kernel (`_fused_attention`)."""
    mods = [m for m in plain.modules() if isinstance(m, nn.MultiheadAttention)]
    if not mods:
        return []
    seen = _SeenOps()

    def enter(m, _):
        seen.running.append(m)

    def leave(m, _, __):  # returns None: the output stays the module's
        seen.running.pop()

    hooks = [h for m in mods for h in (m.register_forward_pre_hook(enter), m.register_forward_hook(leave))]
    try:
        with torch.no_grad(), seen:
            plain(example)
    finally:
        for h in hooks:
            h.remove()
    return [m for m in mods if id(m) in seen.fused]


def _native_attention(self, query, key, value, key_padding_mask=None, need_weights=True, attn_mask=None,
                      average_attn_weights=True, is_causal=False):
    """nn.MultiheadAttention.forward's fast path, as torch writes it (its checks passed in the eager run): the masks
    made canonical (a bool mask becomes -inf where True), merged, and the fused kernel.  `is_causal` is not read,
    as torch's fast path does not read it."""
    key_padding_mask = F._canonical_mask(mask=key_padding_mask, mask_name="key_padding_mask",
                                         other_type=F._none_or_dtype(attn_mask), other_name="attn_mask",
                                         target_type=query.dtype)
    attn_mask = F._canonical_mask(mask=attn_mask, mask_name="attn_mask", other_type=None, other_name="",
                                  target_type=query.dtype, check_other=False)
    merged_mask, mask_type = self.merge_masks(attn_mask, key_padding_mask, query)
    return torch._native_multi_head_attention(query, key, value, self.embed_dim, self.num_heads, self.in_proj_weight,
                                              self.in_proj_bias, self.out_proj.weight, self.out_proj.bias,
                                              merged_mask, need_weights, average_attn_weights, mask_type)


@contextmanager
def _fused_attention(mods: list[nn.Module]):
    """While exporting: `mods` call the fused kernel directly (their own forward again after)."""
    for m in mods:
        m.forward = types.MethodType(_native_attention, m)
    try:
        yield
    finally:
        for m in mods:
            del m.forward


# the batch dimension dynamic, else none (tried in this order).  Every dimension dynamic ("shapes": one program for
# tasks of different widths) was measured at 40x the export time on ResNet-18 (102 s) for no gain in size: the
# programs are compressed together, so a second program of the same graph costs a few hundred bytes.
MODES = ("batch", "static")
_DROPPED_META = ("stack_trace", "nn_module_stack", "source_fn_stack", "from_node", "torch_fn")


def _program(module: nn.Module, example: torch.Tensor, tensors: list[torch.Tensor], mode: str) -> bytes:
    """The torch.export archive of `module` (no weights, no source locations) with `mode`'s dynamic dimensions."""
    import warnings

    auto = torch.export.Dim.AUTO
    shapes = {"shapes": ({0: auto}, [{i: auto for i in range(v.dim())} for v in tensors]),
              "batch": ({0: auto}, [None] * len(tensors)), "static": None}[mode]
    loggers = [logging.getLogger(n) for n in ("torch._export", "torch.export", "torch.fx.experimental.symbolic_shapes")]
    levels = [lg.level for lg in loggers]
    try:  # Dim.AUTO's notes ("0/1 specialized") are about our own choice of dimensions
        for lg in loggers:
            lg.setLevel(logging.ERROR)
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            ep = torch.export.export(module, (example, tensors), dynamic_shapes=shapes)
    finally:
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)
    if ep.state_dict or any(isinstance(v, torch.Tensor) and v.numel() > 64 for v in ep.constants.values()):
        raise RuntimeError("the exported program kept weights of its own; the multi-task artifact would hold "
                           "them once per task")
    ep._example_inputs = None  # torch.export.save would store them: the weights again
    for node in ep.graph.nodes:  # where each op came from: a third of the archive, not needed to run it
        for key in _DROPPED_META:
            node.meta.pop(key, None)
    buf = io.BytesIO()
    torch.export.save(ep, buf)
    return buf.getvalue()


def _runs_as(blob: bytes, mode: str, plain: nn.Module, example: torch.Tensor, tensors: list, pre) -> bool:
    """Whether program `blob`, loaded back as the runtime loads it, computes `plain` bit for bit (batch sizes 1, 2,
    3 when its batch is dynamic)."""
    program = R.load_program(blob, mode)
    batches = [example] if mode == "static" else [example[:1], example, torch.cat([example, example[:1]])]
    try:
        with torch.no_grad():
            for x in batches:
                want = plain(x * pre[0] - pre[1] if pre is not None else x)
                if not torch.equal(program(x, *tensors)[0], want):
                    return False
    except Exception:
        return False
    return True


def _layer_of(layers: dict, name: str):
    """The masked layer whose weight the plain model's tensor `name` is (None: an ordinary tensor)."""
    path, _, last = name.rpartition(".")
    if last == "weight" and path in layers:
        return layers[path]
    if last == "in_proj_weight":  # nn.MultiheadAttention's packed projection (HeadGrowingAttention.in_proj)
        return layers.get(f"{path}.in_proj" if path else "in_proj")
    return None


def _nonzero_units(w: torch.Tensor, unit_dims: int) -> torch.Tensor:
    """Bool per unit: some weight of it is not +0.0 (a -0.0 counts: the bits are reproduced exactly)."""
    nz = (w != 0) | torch.signbit(w)
    return nz if nz.dim() == unit_dims else nz.flatten(unit_dims).any(dim=unit_dims)


def _masked_entry(layer, t: int, w: torch.Tensor, store: _Storage, banks: dict) -> list | None:
    """The reference that rebuilds `w` (task t's weight of `layer`) from the bank, or None when none does."""
    ctx, target = layer.ctx, layer.target
    grouped = getattr(layer, "groups", 1) > 1
    out_idx = ctx.visible(target, "grouped" if grouped else "out", t)
    in_idx = None if grouped else ctx.visible(target, "in", t)
    bank = layer.frozen.detach().cpu()
    vis = bank
    if out_idx is not None:
        vis = vis.index_select(0, out_idx.cpu())
    if in_idx is not None:
        vis = vis.index_select(1, in_idx.cpu())
    w = w.detach().cpu()
    if vis.shape != w.shape or vis.dtype != w.dtype:
        return None
    unit_dims = w.dim() if getattr(layer, "granularity", "kernel") == "element" else min(2, w.dim())
    units = _nonzero_units(w, unit_dims)
    m = units.view(tuple(units.shape) + (1,) * (w.dim() - units.dim()))
    if not torch.equal(torch.where(m, vis, torch.zeros((), dtype=w.dtype)), w):
        return None
    if target not in banks:
        banks[target] = store.add(bank)
    packed = R.pack_bits(units)
    return ["masked", banks[target], None if out_idx is None else store.add(out_idx.to(torch.int32)),
            None if in_idx is None else store.add(in_idx.to(torch.int32)), store.add(packed),
            [int(s) for s in units.shape]]


def build(net, example: torch.Tensor, preprocess: tuple[torch.Tensor, torch.Tensor] | None = None,
          names: list[str] | None = None, num_tasks: int | None = None) -> dict:
    """The multi-task artifact of the first `num_tasks` (default: all) tasks of `net` (a GrowableNet), as the dict
    `multitask_runtime` loads.  `preprocess`: (scale, shift) put in front of every task's graph
    (`x * scale - shift`: the artifact takes raw inputs); `names`: a name per task, kept in the file."""
    layers = {m.target: m for m in net.masked_layers()}
    store, banks = _Storage(), {}
    programs: list = []  # (blob, mode)
    by_graph: dict = {}  # (graph code, tensor names, shapes) -> its program
    tasks, stats = [], {"masked": 0, "dense_masked": 0, "exports": 0}
    example = example.detach().cpu()
    for t in range(net.num_tasks if num_tasks is None else num_tasks):
        plain = net.export(t, prune_unused=False).cpu().eval()
        named = list(plain.named_parameters(remove_duplicate=False)) + list(plain.named_buffers(remove_duplicate=False))
        inputs, tensors = [], []
        for name, value in named:
            layer = _layer_of(layers, name)
            entry = _masked_entry(layer, t, value, store, banks) if layer is not None else None
            if layer is not None:
                stats["masked" if entry is not None else "dense_masked"] += 1
            inputs.append(entry if entry is not None else ["tensor", store.add(value)])
            tensors.append(value.detach())
        if preprocess is not None:
            for v in preprocess:
                inputs.append(["tensor", store.add(v)])
                tensors.append(v.detach())
        # one program per graph and shapes: tasks learned between two growths share theirs
        key = (plain.code, tuple(n for n, _ in named), tuple(tuple(v.shape) for v in tensors))
        if key not in by_graph:
            bound = _Bound(plain, [n for n, _ in named], preprocess is not None)
            fused = _fused_attentions(plain, example)
            for mode in MODES:
                try:
                    with _fused_attention(fused):
                        blob = _program(bound, example, tensors, mode)
                except Exception:
                    if mode == MODES[-1]:
                        raise
                    continue
                stats["exports"] += 1
                if _runs_as(blob, mode, plain, example, tensors, preprocess):
                    break
                if mode == MODES[-1]:
                    raise RuntimeError(f"task {t}'s exported program does not reproduce its plain model")
            by_graph[key] = len(programs)
            programs.append((blob, mode))
        tasks.append({"name": names[t] if names else f"task{t}", "program": by_graph[key], "inputs": inputs})
    # the index and every program in one lzma stream: programs of one graph at other widths differ in a few bytes
    index = json.dumps({"tasks": tasks, "programs": [[len(b), mode] for b, mode in programs]},
                       separators=(",", ":")).encode()
    packed = lzma.compress(b"".join([len(index).to_bytes(8, "little"), index] + [b for b, _ in programs]), preset=9)
    index_ref = store.add(torch.frombuffer(bytearray(packed), dtype=torch.uint8))
    return {"format": R.FORMAT, "version": R.VERSION, "index": index_ref, "storage": store.finish(),
            "stats": {**stats, "programs": len(programs), "tasks": len(tasks)}}


def save(net, example: torch.Tensor, path, **kw) -> dict:
    """Write `build(net, example, **kw)` to `path` (torch.save, atomically, with its checksum file
    `<path>.sha256`; `multitask_runtime.load` reads and checks them)."""
    blob = build(net, example, **kw)
    files.atomic_save(blob, path)
    return blob


def runtime_source() -> str:
    """The torch-only loader's source, written beside the artifact (exports/all_tasks/multitask.py)."""
    from pathlib import Path

    return Path(R.__file__).read_text()
