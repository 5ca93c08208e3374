"""storage: bytes stored per task and in total, against the backbone's own size.

A stream of briefly learned tasks (GROWN's policy; growth on tasks 1, 11, 21, ... so that tasks see different
widths) on small_cnn with 16x16 inputs (50 tasks) and on ResNet-18 at 32x32 (10 tasks).  For each finished
task t, what it alone stores:

  masks   its bit-packed masks, one bit per mask unit (`net.mask_bytes(t)`),
  norms   its copies of the normalisation layers (affine parameters and running statistics),
  head    its classifier,
  biases  its copies of conv/linear biases (and any other per-task parameter or module).

Goals: a frozen task's masks cost 1 bit per kernel, bits/kernel = 8 * mask_bytes / kernels visible to the
task (the kernels of the masked layers of its export with every channel kept; a linear layer's unit is one
weight); a task's layers are packed into one bit string, so the only excess is the padding of its last byte
(< 8 bits per task, whatever the number of layers).  A checkpoint (`net.state_dict()`) holds <= 1.05x what
serving every task needs (the shared frozen bank + every task's own state).  Totals after 10 and 50 tasks
against the backbone's own size.
"""

from __future__ import annotations

import gc

import torch

import grownfx
from grownfx.engine.layers import PerTask, TaskParameter

from . import common as C

GOAL_BITS = 1.0
GOAL_CHECKPOINT = 1.05


def per_task_bytes(net, t: int) -> dict:
    out = {"masks": net.mask_bytes(t), "norms": 0, "head": 0, "biases": 0, "other": 0}
    for m in net.task_modules():
        if isinstance(m, PerTask):
            key = {"norm": "norms", "head": "head"}.get(m.kind, "other")
            out[key] += C.module_bytes(m.copies[t])
        elif isinstance(m, TaskParameter):
            v = m.copies[t]
            out["biases" if m.target.endswith(".bias") else "other"] += v.numel() * v.element_size()
    out["total"] = sum(out.values())
    return out


def visible_kernels(net, t: int) -> int:
    """Mask units of task t's masked layers at the widths the task sees (its export, every channel kept)."""
    sub = net.export(t, prune_unused=False)
    total = 0
    for m in net.masked_layers():
        w = sub.get_submodule(m.target).weight
        total += w.numel() if m.granularity == "element" else w.shape[0] * w.shape[1]
    return total


def state_dict_bytes(net) -> int:
    seen, total = set(), 0
    for v in net.state_dict().values():
        if isinstance(v, torch.Tensor) and v.data_ptr() not in seen:
            seen.add(v.data_ptr())
            total += v.numel() * v.element_size()
    return total


def serving_bytes(net) -> int:
    """The shared frozen bank every finished task reads, plus every finished task's own state."""
    bank = sum(m.frozen.numel() * m.frozen.element_size() for m in net.masked_layers())
    return bank + sum(per_task_bytes(net, t)["total"] for t in sorted(net.structure.frozen))


def stream(rep: C.Report, name: str, shape: tuple, checkpoints: tuple[int, ...], steps: int, batch: int,
           grow_every: int) -> None:
    model, _ = C.build_model(name)
    backbone = C.module_bytes(model)
    net = grownfx.prepare(model, torch.randn(2, *shape), C.MODELS[name]["seed_width"])
    gen = torch.Generator().manual_seed(0)
    bits, rows = [], []
    for t in range(max(checkpoints)):
        C.learn_task(net, 10, steps, batch, shape, grow=t % grow_every == 0, gen=gen)
        b = per_task_bytes(net, t)
        kernels = visible_kernels(net, t)
        bits.append(8 * b["masks"] / kernels)
        rows.append({**b, "kernels": kernels})
        if t + 1 in checkpoints:
            n = t + 1
            worst = max(range(n), key=lambda i: bits[i])
            padding = 8 * rows[worst]["masks"] - rows[worst]["kernels"]
            rep.add(f"{name}: mask bits/kernel, worst of {n} tasks", f"{GOAL_BITS:g} bit + last byte",
                    bits[worst], 0 <= padding < 8, "bit", worst_task=worst + 1, padding_bits=padding,
                    mean_bits=sum(bits[:n]) / n, kernels=rows[worst]["kernels"],
                    mask_bytes=rows[worst]["masks"])
            last = rows[t]
            rep.add(f"{name}: bytes task {n} stores", "info", last["total"], None, "B",
                    of_backbone=last["total"] / backbone,
                    **{k: last[k] for k in ("masks", "norms", "head", "biases", "other")})
            serve, ckpt = serving_bytes(net), state_dict_bytes(net)
            rep.add(f"{name}: serving {n} tasks / backbone", "info", serve / backbone, None, "x",
                    bytes=serve, backbone_bytes=backbone, scratch_x=float(n),
                    per_task_mean=sum(r["total"] for r in rows[:n]) / n)
            rep.add(f"{name}: checkpoint after {n} tasks / backbone", "info", ckpt / backbone, None, "x",
                    bytes=ckpt, backbone_bytes=backbone,
                    widths=sum(net.structure.widths.values()))
            rep.add(f"{name}: checkpoint / serving after {n} tasks", f"≤ {GOAL_CHECKPOINT:.2f}×", ckpt / serve,
                    ckpt / serve <= GOAL_CHECKPOINT, "x", bytes=ckpt, serving_bytes=serve)
    rep.extra.setdefault("per_task", {})[name] = [{"task": i + 1, "bits_per_kernel": bits[i], **r}
                                                  for i, r in enumerate(rows)]
    del net
    gc.collect()


def run(args) -> C.Report:
    rep = C.Report("storage", quick=args.quick,
                   columns=("mean_bits", "masks", "norms", "head", "biases", "of_backbone"))
    if args.quick:
        stream(rep, "small_cnn", (3, 16, 16), (2, 4), steps=1, batch=8, grow_every=3)
    else:
        stream(rep, "small_cnn", (3, 16, 16), (10, 50), steps=args.steps, batch=32, grow_every=10)
        stream(rep, "resnet18", (3, 32, 32), (10,), steps=1, batch=8, grow_every=5)
    rep.note("bits/kernel = 8 x mask bytes of the task / mask units (kernels; linear weights) visible to it; a "
             "task's masks are one bit string (`task_masks.t` in the state dict), padded to a whole byte once.")
    rep.note("serving = shared frozen weight bank (fp32) + every task's masks, norms, head and biases; checkpoint "
             "= every tensor of net.state_dict(): the bank once (`weight`; `frozen` and `owner` follow from it and "
             "the masks and are rebuilt on load), the norm templates and the generator.  Scratch would store n x "
             "the backbone.")
    return rep


def add_args(p):
    p.add_argument("--steps", type=int, default=3, help="training steps of each task")


def main(argv=None):
    return C.cli_main(run, "storage", __doc__, add_args, argv)


if __name__ == "__main__":
    main()
