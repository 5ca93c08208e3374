"""inference: a finished task served three ways vs a dense model of the same width.

For each backbone: three tasks learned briefly with GROWN's policy and no growth (so every task sees exactly
the seed-width network), task 2 (a frozen task with selective masks) is computed by

  * aware:  the task-aware model, `net.eval()` and `net(x, task=t)` under no_grad (effective weights cached),
  * export: `net.export(t, prune_unused=False)` (every visible channel kept: same widths as the seed),
  * dense:  `grownfx.engine.prepare.slim(model, x, seed_width)`, the backbone sliced to the seed width (the reference),

at batch 1 and batch 64.  Goals: export <= 1.02x dense, task-aware eval <= 1.15x dense.
Informational rows: the export with unused channels pruned (the default `export(t)`), and the task-aware
model when consecutive batches alternate between two tasks (each layer keeps up to
`ctx.cache.finished_cache_size` finished tasks' weights, LRU, so a switch between two tasks rebuilds nothing).

The all-tasks artifact (`grownfx export RUN --all-tasks`: grownfx.engine.multitask, served by the torch-only
multitask_runtime) alternating between tasks 2 and 3, per batch vs the dense model: goals <= 1.30x at batch 1 and
<= 1.05x at batch 64 (the per-batch cost of a task switch, issue 16).
"""

from __future__ import annotations

import gc
import tempfile
import time
from pathlib import Path

import torch

from grownfx.engine import multitask, multitask_runtime
from grownfx.engine.prepare import slim

from . import common as C

GOAL_EXPORT, GOAL_AWARE = 1.02, 1.15
GOAL_SWITCH = {1: 1.30, 64: 1.05}  # the all-tasks artifact alternating tasks, per batch / dense, by batch size


def calls_per_sample(fn, target_s: float) -> int:
    t0 = time.perf_counter()
    fn()
    dt = max(time.perf_counter() - t0, 1e-6)
    return max(1, int(target_s / dt))


def run(args) -> C.Report:
    rep = C.Report("inference", quick=args.quick, columns=("paired_q1", "paired_q3", "wall_ratio", "max_abs_diff"))
    models = args.models or (["lenet5"] if args.quick else ["resnet18", "vgg16_bn", "mobilenet_v2", "lenet5"])
    batches = (1, 8) if args.quick else (1, 64)
    tasks, t = 3, 1
    for name in models:
        net, stats, shape = C.learned_net(name, tasks, steps=2 if args.quick else args.steps, grow_tasks=())
        model, _ = C.build_model(name)
        width = C.MODELS[name]["seed_width"]
        dense = slim(model, torch.randn(2, *shape), width)[0].eval()
        export = net.export(t, prune_unused=False)
        pruned = net.export(t)
        with tempfile.TemporaryDirectory() as tmp:  # written and read back as a user serves it
            multitask.save(net, torch.randn(2, *shape), Path(tmp) / "model.pt")
            artifact = multitask_runtime.load(Path(tmp) / "model.pt")
        net.eval()
        for batch in batches:
            x = torch.randn(batch, *shape, generator=torch.Generator().manual_seed(batch))
            with torch.no_grad():
                diff = float((net(x, task=t) - export(x)).abs().max())
                art_diff = max(float((artifact(x, task=k) - net(x, task=k)).abs().max()) for k in (t, t + 1))
                variants = {
                    "aware": lambda: net(x, task=t),
                    "export": lambda: export(x),
                    "dense": lambda: dense(x),
                    "pruned": lambda: pruned(x),
                }
                inner = 1 if args.quick else calls_per_sample(variants["dense"], 0.02)
                reps, warmup = (3, 1) if args.quick else (args.reps, 3)
                wall = {}
                times = C.interleaved(variants, reps=reps, warmup=warmup, inner=inner, wall=wall)
                # a separate group: switching tasks evicts the cached weights the "aware" variant relies on
                wall2 = {}
                alt = C.interleaved({"alternating": lambda: (net(x, task=t), net(x, task=t + 1)),
                                     "artifact": lambda: (artifact(x, task=t), artifact(x, task=t + 1)),
                                     "dense": lambda: dense(x)}, reps=reps, warmup=warmup, inner=inner, wall=wall2)
            # "alternating" and "artifact" compute two batches per call: per batch it is half
            for k in ("alternating", "artifact"):
                times[k] = [v / 2 for v in alt[k]]
                wall[k] = [v / 2 for v in wall2[k]]
            common = {"model": name, "task": t, "batch": batch, "max_abs_diff": diff, "inner": inner}
            s = C.ratio_stats(times["export"], times["dense"], wall["export"], wall["dense"])
            rep.add(f"{name} export/dense batch {batch}", f"≤ {GOAL_EXPORT:.2f}×", s["ratio"],
                    s["ratio"] <= GOAL_EXPORT, "x", **common, **_spread(s))
            s = C.ratio_stats(times["aware"], times["dense"], wall["aware"], wall["dense"])
            rep.add(f"{name} aware-eval/dense batch {batch}", f"≤ {GOAL_AWARE:.2f}×", s["ratio"],
                    s["ratio"] <= GOAL_AWARE, "x", **common, **_spread(s))
            s = C.ratio_stats(times["pruned"], times["dense"], wall["pruned"], wall["dense"])
            rep.add(f"{name} export(pruned)/dense batch {batch}", "info", s["ratio"], None, "x", **common,
                    pruned_params=sum(p.numel() for p in pruned.parameters()),
                    dense_params=sum(p.numel() for p in dense.parameters()), **_spread(s))
            s = C.ratio_stats(times["alternating"], alt["dense"], wall["alternating"], wall2["dense"])
            rep.add(f"{name} aware-eval alternating 2 tasks/dense batch {batch}", "info", s["ratio"], None, "x",
                    **common, **_spread(s))
            s = C.ratio_stats(times["artifact"], alt["dense"], wall["artifact"], wall2["dense"])
            goal = GOAL_SWITCH.get(batch)
            rep.add(f"{name} all-tasks artifact alternating 2 tasks/dense batch {batch}",
                    f"≤ {goal:.2f}×" if goal else "info", s["ratio"], s["ratio"] <= goal if goal else None, "x",
                    **{**common, "max_abs_diff": art_diff}, **_spread(s))
        del net, dense, export, pruned, artifact
        gc.collect()
    rep.note("ratio = median forward time (no_grad, eval mode; the thread's CPU time) of the variant / median of "
             "the dense model, interleaved; each sample averages `inner` calls; wall_ratio: the same from wall-clock "
             "time.  max_abs_diff: task-aware vs export logits.")
    rep.note("alternating: consecutive batches for tasks 2 and 3 (each layer caches up to ctx.cache.finished_cache_size "
             "finished tasks' weights, LRU: a switch between two tasks rebuilds nothing); per-batch time; timed in "
             "its own interleaved group with the dense model.")
    rep.note("all-tasks artifact: grownfx.engine.multitask.save then multitask_runtime.load (torch only), the same "
             "tasks 2 and 3 alternating, per batch; each task's weights are built on its first call and kept. "
             "max_abs_diff: artifact vs task-aware logits over both tasks (0: bit for bit).")
    return rep


def _spread(s: dict) -> dict:
    return {k: v for k, v in s.items() if k != "ratio"}


def add_args(p):
    p.add_argument("--models", nargs="*", default=None, choices=sorted(C.MODELS))
    p.add_argument("--reps", type=int, default=15)
    p.add_argument("--steps", type=int, default=4, help="training steps of each earlier task")


def main(argv=None):
    return C.cli_main(run, "inference", __doc__, add_args, argv)


if __name__ == "__main__":
    main()
