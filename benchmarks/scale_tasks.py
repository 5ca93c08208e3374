"""scale_tasks: does the current task's step cost or memory grow with the number of earlier tasks?

50 tasks on small_cnn (32x32 inputs, batch 32), each learned briefly with GROWN's policy and no growth, so that
every task computes at the same width and only the number of earlier tasks changes.  At tasks 2, 10, 25 and 50
the learning task's training step (forward, backward, SGD + Adam) is timed interleaved with two reference nets
kept alive beside it: one at task 2 (same mask structure: selective masks on the units task 1 owns) and one at
task 1 (no masks at all).

Goals: the task-k step costs <= 1.10x the task-2 step (time and peak step memory), and the memory the process
holds grows per task only by what a task stores (its masks, norms, head, biases).

Memory is measured two ways: the peak of the torch CPU allocator's tensor bytes during one step (from
torch.profiler's memory profile: tensors created minus destroyed, preexisting ones excluded), and the bytes of
every live torch tensor in the process (each storage once, found through the garbage collector), whose growth
from task 2 to task 50 is compared with the state those tasks store.  Process RSS is reported beside them
(coarse: the allocator keeps freed pages).
"""

from __future__ import annotations

import gc
import warnings
from pathlib import Path

import torch

import grownfx

from . import common as C
from .storage import per_task_bytes

GOAL = 1.10


def live_tensor_bytes() -> int:
    gc.collect()
    seen, total = set(), 0
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        objects = [o for o in gc.get_objects() if isinstance(o, torch.Tensor)]
    for obj in objects:
        try:
            if obj.device.type != "cpu":
                continue
            st = obj.untyped_storage()
        except Exception:  # noqa: BLE001 - some tensor subclasses refuse
            continue
        if st.data_ptr() in seen:
            continue
        seen.add(st.data_ptr())
        total += st.nbytes()
    return total


def rss_bytes() -> int | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    except OSError:  # pragma: no cover
        return None
    return None


def step_peak_bytes(step, x, y) -> int | None:
    """Peak tensor bytes allocated (and not yet freed) during one step, from torch.profiler's memory profile."""
    try:
        from torch.profiler import ProfilerActivity, profile
        from torch.profiler._memory_profiler import Action

        with profile(activities=[ProfilerActivity.CPU], profile_memory=True, record_shapes=True,
                     with_stack=True) as prof:
            step(x, y)
        cur = peak = 0
        for _, action, (key, _), size in prof._memory_profile().timeline:
            if key.device.type != "cpu":
                continue
            if action == Action.CREATE:
                cur += size
            elif action == Action.DESTROY:
                cur -= size
            peak = max(peak, cur)
        return peak
    except Exception as exc:  # noqa: BLE001 - a private profiler API: report, do not fail
        print(f"(memory profile unavailable: {type(exc).__name__}: {exc})")
        return None


def stale_grad_bytes(net) -> int:
    """Bytes of .grad tensors still held by parameters that no longer train (finished tasks' copies, a bank
    whose units are all owned)."""
    return sum(p.grad.numel() * p.grad.element_size() for p in net.parameters()
               if p.grad is not None and not p.requires_grad)


def memory_stream(shape, width, checkpoints, steps):
    """The task stream alone (no profiler, no timing): memory held at each checkpoint, before its task starts."""
    model, _ = C.build_model("small_cnn")
    net = grownfx.prepare(model, torch.randn(2, *shape), width)
    gen = torch.Generator().manual_seed(0)
    live, rss, stored, stale, objects = {}, {}, {}, {}, {}
    for k in range(1, max(checkpoints) + 1):
        if k in checkpoints:
            live[k], rss[k] = live_tensor_bytes(), rss_bytes()
            stored[k] = sum(per_task_bytes(net, t)["total"] for t in sorted(net.ctx.frozen))
            stale[k] = stale_grad_bytes(net)
            objects[k] = len(gc.get_objects())
        C.learn_task(net, 10, steps, 32, shape, gen=gen)
    del net
    gc.collect()
    return live, rss, stored, stale, objects


def fresh(shape, width, tasks_before: int, steps: int, gen):
    model, _ = C.build_model("small_cnn")
    net = grownfx.prepare(model, torch.randn(2, *shape), width)
    for _ in range(tasks_before):
        C.learn_task(net, 10, steps, 32, shape, gen=gen)
    net.add_task(10)
    return net


def run(args) -> C.Report:
    rep = C.Report("scale_tasks", quick=args.quick, columns=("paired_q1", "paired_q3", "wall_ratio"))
    shape, width = C.MODELS["small_cnn"]["input"], C.MODELS["small_cnn"]["seed_width"]
    checkpoints = (2, 4) if args.quick else (2, 10, 25, args.tasks)
    steps = 1 if args.quick else args.steps
    reps = 3 if args.quick else args.reps
    batch = 8 if args.quick else 32
    live, rss, stored, stale, objects = memory_stream(shape, width, checkpoints, steps)
    gen = torch.Generator().manual_seed(0)
    x, y = C.random_batch(batch, shape, 10, torch.Generator().manual_seed(1))
    ref1 = fresh(shape, width, 0, steps, gen)
    ref2 = fresh(shape, width, 1, steps, gen)
    s1, s2 = C.aware_step(ref1), C.aware_step(ref2)
    peak1, peak2 = step_peak_bytes(s1, x, y), step_peak_bytes(s2, x, y)

    model, _ = C.build_model("small_cnn")
    net = grownfx.prepare(model, torch.randn(2, *shape), width)
    for k in range(1, max(checkpoints) + 1):
        if k not in checkpoints:
            C.learn_task(net, 10, steps, 32, shape, gen=gen)
            continue
        t = net.add_task(10)
        sk = C.aware_step(net)
        wall = {}
        times = C.interleaved({"k": lambda: sk(x, y), "ref2": lambda: s2(x, y), "ref1": lambda: s1(x, y)},
                              reps=reps, warmup=1 if args.quick else 3, wall=wall)
        peak = step_peak_bytes(sk, x, y)
        st = C.ratio_stats(times["k"], times["ref2"], wall["k"], wall["ref2"])
        rep.add(f"task {k} step / task 2 step", f"≤ {GOAL:.2f}×", st["ratio"], st["ratio"] <= GOAL, "x",
                task=k, **{a: b for a, b in st.items() if a != "ratio"})
        st1 = C.ratio_stats(times["k"], times["ref1"], wall["k"], wall["ref1"])
        rep.add(f"task {k} step / task 1 step", "info (task 1 has no masks)", st1["ratio"], None, "x", task=k,
                **{a: b for a, b in st1.items() if a != "ratio"})
        if peak is not None and peak2:
            rep.add(f"task {k} step peak memory / task 2", f"≤ {GOAL:.2f}×", peak / peak2, peak / peak2 <= GOAL, "x",
                    task=k, peak_bytes=peak, task2_peak_bytes=peak2, task1_peak_bytes=peak1)
        else:
            rep.add(f"task {k} step peak memory / task 2", f"≤ {GOAL:.2f}×",
                    "not measured (torch.profiler memory profile unavailable)", None, "", task=k)
        del sk
        net.freeze_task(t)  # the timed steps were its training
    first, last = min(live), max(live)
    n = last - first
    if n > 0:
        grew = (live[last] - live[first]) / n
        per_task = (stored[last] - stored[first]) / n
        rep.add(f"live tensor bytes per task, tasks {first}->{last} / stored per task", "≤ 1.10×",
                grew / per_task, grew / per_task <= GOAL, "x", live_growth_per_task=grew, stored_per_task=per_task,
                live_first=live[first], live_last=live[last])
        stale_grew = (stale[last] - stale[first]) / n
        rep.add(f"stale .grad bytes per task on frozen parameters, tasks {first}->{last}", "info", stale_grew, None,
                "B", stored_per_task=per_task, live_minus_stale_over_stored=(grew - stale_grew) / per_task)
        if rss[first] is not None:
            rss_grew = (rss[last] - rss[first]) / n
            rep.add(f"process RSS per task, tasks {first}->{last}", "info (coarse)", rss_grew, None, "B",
                    stored_per_task=per_task)
        rep.add(f"Python objects per task, tasks {first}->{last}", "info", (objects[last] - objects[first]) / n,
                None, "")
    rep.extra["live_tensor_bytes"] = live
    rep.extra["stored_task_bytes"] = stored
    rep.extra["stale_grad_bytes"] = stale
    rep.note("Step ratios: median step time (the thread's CPU time) at task k / at the reference, interleaved "
             "k, task 2, task 1 in one process; wall_ratio: the same from wall-clock time; peak memory: "
             "torch.profiler memory profile of one step (torch CPU allocator, tensors).")
    rep.note("Memory rows come from a first pass over the same stream with no profiler and no timing (so the "
             "profiler's own allocations stay out of the process RSS); live tensor bytes = every torch tensor "
             "storage alive in the process, found through the garbage collector.")
    rep.note("No growth in this stream: every task computes at the seed width, so only the number of earlier "
             "tasks differs between the compared steps.  Tasks >= 2 put selective masks on every unit task 1 "
             "owns; task 1 has none, so task k / task 1 includes the mask arithmetic itself (see train_step).")
    return rep


def add_args(p):
    p.add_argument("--tasks", type=int, default=50)
    p.add_argument("--reps", type=int, default=20)
    p.add_argument("--steps", type=int, default=3, help="training steps of each earlier task")


def main(argv=None):
    return C.cli_main(run, "scale_tasks", __doc__, add_args, argv)


if __name__ == "__main__":
    main()
