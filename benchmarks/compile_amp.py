"""compile_amp: torch.compile of the training step; mixed precision and channels_last where CUDA is available.

The train_step comparison (task 10 of a briefly learned stream, stage 1, vs the plain model of the same width),
with the model's forward compiled by `torch.compile` (inductor; backward through AOTAutograd; optimiser steps
eager) for both the task-aware and the plain model.  Rows: compiled task-aware / compiled plain (goal <= 1.10x,
as in train_step), and each model compiled / eager (informational).  `torch._dynamo.explain` on the task-aware
forward gives the number of graphs and graph breaks.

CPU: compile only; AMP and channels_last are CUDA measurements here and print "not measured (no GPU)".
CUDA (when `torch.cuda.is_available()`): eager, compiled, bf16 autocast and channels_last steps of both models,
with absolute step times (GPU timings are absolute; synchronised before each clock read).
"""

from __future__ import annotations

import torch

from . import common as C

GOAL = 1.10


def explain(net, x, task):
    try:
        import torch._dynamo as dynamo

        dynamo.reset()
        out = dynamo.explain(lambda inp: net(inp, task=task))(x)
        return {"graphs": out.graph_count, "graph_breaks": out.graph_break_count,
                "break_reasons": [str(b.reason)[:200] for b in out.break_reasons][:5]}
    except Exception as exc:  # noqa: BLE001
        return {"error": f"{type(exc).__name__}: {exc}"[:300]}


def build(name: str, task: int, steps: int, device):
    if task == 1:
        import grownfx

        model, shape = C.build_model(name)
        net = grownfx.prepare(model, torch.randn(2, *shape), C.MODELS[name]["seed_width"]).to(device)
    else:
        net, _, shape = C.learned_net(name, task - 1, steps=steps, grow_tasks=(0, task - 2), device=device)
    net.add_task(10)
    return net, C.plain_of_learning_task(net).to(device), shape


def variants_for(net, plain, x, y, t, *, compile_backend: str | None, amp: bool = False,
                 channels_last: bool = False):
    """A (task-aware step, plain step) pair under the given compile / autocast / memory-format settings."""
    fa = lambda inp: net(inp, task=t)  # noqa: E731
    fp = plain
    if compile_backend:
        ca, cp = torch.compile(net, backend=compile_backend), torch.compile(plain, backend=compile_backend)
        fa = lambda inp: ca(inp, task=t)  # noqa: E731
        fp = cp
    if channels_last:
        net.to(memory_format=torch.channels_last)
        plain.to(memory_format=torch.channels_last)
        x = x.contiguous(memory_format=torch.channels_last)
    if amp:
        dev = x.device.type
        fa0, fp0 = fa, fp
        fa = lambda inp: _autocast(dev, fa0, inp)  # noqa: E731
        fp = lambda inp: _autocast(dev, fp0, inp)  # noqa: E731
    sa = C.aware_step(net, t, forward=fa)
    sp = C.plain_step(plain, forward=fp)
    return (lambda: sa(x, y)), (lambda: sp(x, y))


def _autocast(device_type: str, fn, inp):
    with torch.autocast(device_type=device_type, dtype=torch.bfloat16):
        return fn(inp).float()


def run(args) -> C.Report:
    cuda = torch.cuda.is_available() and not args.cpu
    device = torch.device("cuda" if cuda else "cpu")
    rep = C.Report("compile_amp", quick=args.quick,
                   columns=("paired_q1", "paired_q3", "wall_ratio", "aware_ms", "plain_ms"))
    name = args.model or ("lenet5" if args.quick else "resnet18")
    task = 3 if args.quick else args.task
    backend = args.backend or ("aot_eager" if args.quick else "inductor")
    net, plain, shape = build(name, task, 2 if args.quick else 4, device)
    t = net.learning_task
    batch = 8 if args.quick else args.batch
    x, y = C.random_batch(batch, shape, 10, torch.Generator().manual_seed(0), device)
    net.train()
    info = explain(net, x, t)
    rep.extra["explain"] = info
    rep.add(f"{name} task {task}: dynamo graphs / graph breaks (task-aware forward)", "1 graph, 0 breaks",
            f"{info.get('graphs')} / {info.get('graph_breaks')}",
            info.get("graphs") == 1 and info.get("graph_breaks") == 0, "", **info)
    sync = torch.cuda.synchronize if cuda else None
    reps = 3 if args.quick else args.reps
    warm = 2 if args.quick else 4
    # one interleaved group (same memory format): eager, compiled [, bf16, compiled + bf16 on CUDA]
    configs = [("eager", None, False), (f"compiled ({backend})", backend, False)]
    if cuda:
        configs += [("bf16 autocast", None, True), (f"compiled ({backend}) + bf16", backend, True)]
    torch._dynamo.reset()
    variants = {}
    for label, be, amp in configs:
        a, p = variants_for(net, plain, x, y, t, compile_backend=be, amp=amp)
        variants[(label, "aware")], variants[(label, "plain")] = a, p
    wall = {}
    times = C.interleaved(variants, reps=reps, warmup=warm, sync=sync, wall=wall)
    groups = [[label for label, _, _ in configs]]
    if cuda:  # channels_last changes the modules' memory format: its own interleaved group
        a, p = variants_for(net, plain, x, y, t, compile_backend=None, channels_last=True)
        times.update(C.interleaved({("channels_last", "aware"): a, ("channels_last", "plain"): p}, reps=reps,
                                   warmup=warm, sync=sync))
        net.to(memory_format=torch.contiguous_format)
        plain.to(memory_format=torch.contiguous_format)
        groups.append(["channels_last"])
    for group in groups:
        for label in group:
            ta, tp = times[(label, "aware")], times[(label, "plain")]
            s = C.ratio_stats(ta, tp, wall.get((label, "aware")), wall.get((label, "plain")))
            abs_ms = {"aware_ms": 1e3 * C.median(ta), "plain_ms": 1e3 * C.median(tp)} if cuda else {}
            rep.add(f"{name} task {task} batch {batch}, {label}: task-aware / plain", f"≤ {GOAL:.2f}×", s["ratio"],
                    s["ratio"] <= GOAL, "x", **{k: v for k, v in s.items() if k != "ratio"}, **abs_ms)
    for label in [c for g in groups for c in g if c != "eager"]:
        for which in ("aware", "plain"):
            r = C.median(times[(label, which)]) / C.median(times[("eager", which)])
            note = "info" if label != "channels_last" else "info (separate interleaved group)"
            w = {}
            if (label, which) in wall:
                w["wall_ratio"] = C.median(wall[(label, which)]) / C.median(wall[("eager", which)])
            rep.add(f"{name} {'task-aware' if which == 'aware' else 'plain'}: {label} / eager", note, r, None, "x", **w)
    if not cuda:
        for label in ("bf16 autocast", "channels_last", "compiled + bf16"):
            rep.add(f"{name} {label}: task-aware / plain", "≤ 1.10× (GPU)", "not measured (no GPU)", None, "")
        rep.note("AMP and channels_last are GPU optimisations; this machine has no CUDA device, so they are not "
                 "measured here (the script measures them when torch.cuda.is_available()).")
    rep.note(f"compile: torch.compile(model, backend='{backend}') on the forward; backward via AOTAutograd; "
             "optimiser steps eager; compile time excluded (warm-up).  Ratios are medians of interleaved steps "
             "(CPU: the thread's CPU time, wall_ratio from wall-clock time; GPU: wall-clock, synchronised).")
    return rep


def add_args(p):
    p.add_argument("--model", default=None, choices=sorted(C.MODELS))
    p.add_argument("--task", type=int, default=10)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--reps", type=int, default=15)
    p.add_argument("--backend", default=None, help="torch.compile backend (default inductor; aot_eager with --quick)")
    p.add_argument("--cpu", action="store_true", help="measure on the CPU even where CUDA is available")


def main(argv=None):
    return C.cli_main(run, "compile_amp", __doc__, add_args, argv)


if __name__ == "__main__":
    main()
