"""profile_step: where the task-10 training step spends its time (torch.profiler), beside the plain model's.

The train_step scenario (a briefly learned stream, task 10 in stage 1, batch 32 at 32x32) profiled with
torch.profiler over a few steps of the task-aware model and of the plain model of the same width.  Each phase
of the step runs in a `record_function` range (zero_grad, forward, backward, sgd:weights, adam:masks); inside
forward and backward the operators are split into convolution/linear, normalisation and the rest (for the
task-aware model: the mask arithmetic, `where(trainable, weight, frozen) * unit mask`, its Gumbel noise and
their backward).  Rows: each (phase, kind) as a share of the task-aware step, the plain step's share, and the
extra time over the plain step as % of the plain step (the extra column sums to (ratio - 1) x 100); then the
top operators by self time.  Shares only.
"""

from __future__ import annotations

from collections import defaultdict

import torch
from torch.profiler import ProfilerActivity, profile

from . import common as C
from .train_step import scenario

PHASES = ("zero_grad", "forward", "backward", "sgd:weights", "adam:masks", "sgd:gates")
_CONV = {"convolution", "_convolution", "conv2d", "mkldnn_convolution", "convolution_backward", "addmm", "mm",
         "linear", "matmul", "bmm", "_slow_conv2d_forward", "_slow_conv2d_backward", "thnn_conv2d"}


def kind(op: str) -> str:
    base = op.split("::")[-1]
    if base in _CONV:
        return "conv/linear"
    if "batch_norm" in base:
        return "norms"
    if base in ("max_pool2d_with_indices", "max_pool2d_with_indices_backward", "relu", "relu_", "threshold_backward",
                "adaptive_avg_pool2d", "_adaptive_avg_pool2d", "_adaptive_avg_pool2d_backward", "avg_pool2d",
                "log_softmax", "_log_softmax", "nll_loss", "nll_loss_forward", "_log_softmax_backward_data",
                "nll_loss_backward", "hardtanh", "hardtanh_", "hardtanh_backward", "clamp_min"):
        return "pool/activation/loss"
    return "elementwise & other"


def attribute(prof) -> tuple[dict, dict, float]:
    """(self time per (phase, kind), self time per op, total self time) from the profiler's event tree."""
    per_pk: dict[tuple[str, str], float] = defaultdict(float)
    per_op: dict[str, float] = defaultdict(float)
    total = 0.0

    def walk(e, phase):
        nonlocal total
        if e.name in PHASES:
            phase = e.name
        elif not e.name.startswith(("autograd::engine", "Optimizer.")) and not e.name.startswith("ProfilerStep"):
            per_op[e.name] += e.self_cpu_time_total
        per_pk[(phase, kind(e.name) if e.name not in PHASES else "python/dispatch")] += e.self_cpu_time_total
        total += e.self_cpu_time_total
        for c in e.cpu_children:
            walk(c, phase)

    for e in prof.events():
        if e.cpu_parent is None:
            walk(e, "outside")
    return per_pk, per_op, total


def profiled(step, reps: int):
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(reps):
            step()
    return attribute(prof)


def run(args) -> C.Report:
    rep = C.Report("profile_step", quick=args.quick, columns=("plain_share", "extra_vs_plain_step"))
    name = args.model or ("lenet5" if args.quick else "resnet18")
    task = 3 if args.quick else args.task
    batch = 8 if args.quick else args.batch
    net, plain, shape, facts = scenario(name, task, 2 if args.quick else 4)
    x, y = C.random_batch(batch, shape, 10, torch.Generator().manual_seed(0))
    sa, sp = C.aware_step(net, ranges=True), C.plain_step(plain, ranges=True)
    for _ in range(2 if args.quick else 3):
        sa(x, y)
        sp(x, y)
    reps = 2 if args.quick else args.reps
    pk_a, op_a, ta = profiled(lambda: sa(x, y), reps)
    pk_p, op_p, tp = profiled(lambda: sp(x, y), reps)
    rep.extra["facts"] = facts
    rep.add(f"{name} task {task} batch {batch}: task-aware / plain step (profiled, {reps} steps each)", "info",
            ta / tp, None, "x")
    keys = sorted(set(pk_a) | set(pk_p), key=lambda k: -pk_a.get(k, 0.0))
    for k in keys:
        a, p = pk_a.get(k, 0.0), pk_p.get(k, 0.0)
        if max(a / ta, p / tp) < 0.005:
            continue
        rep.add(f"{k[0]}: {k[1]}", "info", 100 * a / ta, None, "%", plain_share=100 * p / tp,
                extra_vs_plain_step=100 * (a - p) / tp)
    for op, v in sorted(op_a.items(), key=lambda kv: -kv[1])[: args.top]:
        rep.add(f"top op {op}", "info", 100 * v / ta, None, "%", plain_share=100 * op_p.get(op, 0.0) / tp,
                extra_vs_plain_step=100 * (v - op_p.get(op, 0.0)) / tp)
    rep.note("measured = share of the task-aware step's self CPU time; plain_share = the same for the plain step; "
             "extra_vs_plain_step = (task-aware - plain) self time as % of the plain step.  'python/dispatch' is "
             "time in a phase outside any operator (Python, the fx graph, the engine's per-layer logic).")
    return rep


def add_args(p):
    p.add_argument("--model", default=None, choices=sorted(C.MODELS))
    p.add_argument("--task", type=int, default=10)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--reps", type=int, default=10)
    p.add_argument("--top", type=int, default=15)


def main(argv=None):
    return C.cli_main(run, "profile_step", __doc__, add_args, argv)


if __name__ == "__main__":
    main()
