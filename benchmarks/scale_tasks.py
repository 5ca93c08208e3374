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

ResNet-18 with growth (`--resnet18-tasks 20`, on by default; `--only-resnet18` skips the small_cnn stream):
20 tasks at MiniImageNet-like shapes (3x84x84, batch 16, synthetic data) with an LSG growth round on tasks 1,
5, 10 and 15.  Every task's own training steps are timed interleaved with a fixed reference (task 1 of a second
ResNet-18 at the seed width); after each task: its step time / task 2's, the step's peak memory, the checkpoint
(`net.state_dict()` tensor bytes) and serving bytes, and the widths; plotted to
docs/performance/scale_resnet18.png.  Goal: between growth rounds (same widths) the step costs <= 1.10x.
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
            ptr = st.data_ptr()
        except Exception:  # noqa: BLE001 - some tensor subclasses refuse (FakeTensors left by torch.export)
            continue
        if ptr in seen:
            continue
        seen.add(ptr)
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
            stored[k] = sum(per_task_bytes(net, t)["total"] for t in sorted(net.structure.frozen))
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
    if not args.only_resnet18:
        small_cnn_stream(rep, args)
    if args.resnet18_tasks:
        resnet18_stream(rep, args)
    return rep


def small_cnn_stream(rep: C.Report, args) -> None:
    """50 tasks on small_cnn without growth: step time and memory against the number of earlier tasks."""
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


# --- ResNet-18, 20 tasks with growth ---------------------------------------------------------------------

RESNET18_PLOT = Path(__file__).resolve().parent.parent / "docs" / "performance" / "scale_resnet18.png"


def _sum_widths(net) -> int:
    return int(sum(net.structure.widths.values()))


def resnet18_stream(rep: C.Report, args) -> None:
    """ResNet-18 over a stream of tasks with LSG growth on some: step time, step peak memory, checkpoint and
    serving bytes and widths after every task (the cost of scale when the network grows)."""
    from .storage import serving_bytes, state_dict_bytes

    n = 4 if args.quick else args.resnet18_tasks
    shape = (3, 16, 16) if args.quick else (3, args.resnet18_size, args.resnet18_size)
    batch = 4 if args.quick else args.resnet18_batch
    grow_tasks = sorted({1, 2} if args.quick else set(args.resnet18_grow))
    reps, warmup = (2, 1) if args.quick else (args.resnet18_reps, 2)
    width = C.MODELS["resnet18"]["seed_width"]

    def prepared():
        model, _ = C.build_model("resnet18")
        backbone = C.module_bytes(model)
        return grownfx.prepare(model, torch.randn(2, *shape), width, seed=0), backbone

    # the reference: task 1 of a second net at the seed width, no growth, no masks; its cost never changes, so
    # every task's step is timed interleaved with it and the ratios to task 2 are ratios of those ratios
    ref, _ = prepared()
    ref.add_task(10)
    s_ref = C.aware_step(ref)
    net, backbone = prepared()
    x, y = C.random_batch(batch, shape, 10, torch.Generator().manual_seed(1))
    final_beta = C.gate_config().final_beta
    per_task = []
    for k in range(1, n + 1):
        t = net.add_task(10)
        grew = C.lsg_grow(net) if k in grow_tasks else {}
        learning_widths = _sum_widths(net)  # with a growth round: every candidate, before the gates settle
        sk = C.aware_step(net)
        wall = {}
        times = C.interleaved({"k": lambda: sk(x, y), "ref": lambda: s_ref(x, y)}, reps=reps, warmup=warmup,
                              wall=wall)
        peak = step_peak_bytes(sk, x, y)
        if grew:  # the last step with hard gates at the final temperature, as learn_task anneals them
            gates = net.channel_scale
            gates.beta, gates.hard = final_beta, True
            sk(x, y)
            gates.hard = False
        del sk
        net.freeze_task(t)  # the timed steps were its training; settles a growth round's gates
        if net.channel_scale is not None:
            net.channel_scale.beta = 1.0
        st = C.ratio_stats(times["k"], times["ref"], wall["k"], wall["ref"])
        per_task.append({
            "task": k, "grew": bool(grew), "candidates_added": int(sum(grew.values())),
            "step_over_ref": st["ratio"], "paired_q1": st["paired_q1"], "paired_q3": st["paired_q3"],
            "wall_over_ref": st.get("wall_ratio"), "step_cpu_s_median": C.median(times["k"]),
            "peak_step_bytes": peak, "checkpoint_bytes": state_dict_bytes(net), "serving_bytes": serving_bytes(net),
            "task_bytes": per_task_bytes(net, t)["total"], "widths_learning": learning_widths,
            "widths_after": _sum_widths(net), "widths": {int(g): int(w) for g, w in net.structure.widths.items()}})
        print(f"resnet18 task {k}/{n}{' (grew)' if grew else ''}: step / ref {st['ratio']:.3f}, peak step "
              f"{(peak or 0) / 2**20:.1f} MiB, checkpoint {per_task[-1]['checkpoint_bytes'] / 2**20:.1f} MiB, "
              f"widths {per_task[-1]['widths_after']}", flush=True)
        gc.collect()
    r2 = per_task[1] if n >= 2 else per_task[0]
    for r in per_task:
        r["step_over_task2"] = r["step_over_ref"] / r2["step_over_ref"]
        r["q1_over_task2"] = r["paired_q1"] / r2["step_over_ref"]
        r["q3_over_task2"] = r["paired_q3"] / r2["step_over_ref"]
        r["wall_over_task2"] = (r["wall_over_ref"] / r2["wall_over_ref"]
                                if r["wall_over_ref"] and r2["wall_over_ref"] else None)
        if r["peak_step_bytes"] and r2["peak_step_bytes"]:
            r["peak_over_task2"] = r["peak_step_bytes"] / r2["peak_step_bytes"]
        rep.add(f"resnet18 task {r['task']} step / task 2 step", "info (grows)" if r["grew"] else "info",
                r["step_over_task2"], None, "x", task=r["task"], paired_q1=r["q1_over_task2"],
                paired_q3=r["q3_over_task2"], wall_ratio=r["wall_over_task2"], peak_over_task2=r.get("peak_over_task2"),
                checkpoint_bytes=r["checkpoint_bytes"], serving_bytes=r["serving_bytes"],
                widths=r["widths_after"])
    last_growth = max([g for g in grow_tasks if g <= n], default=0)
    first = max(last_growth + 1, 2)
    if n > first:  # a span of tasks at one width: the step must not grow with the number of earlier tasks
        a, b = per_task[first - 1], per_task[n - 1]
        ratio = b["step_over_ref"] / a["step_over_ref"]
        rep.add(f"resnet18 task {n} step / task {first} step (same widths)", f"≤ {GOAL:.2f}×", ratio,
                ratio <= GOAL, "x", widths=b["widths_after"], widths_first=a["widths_after"],
                same_widths=a["widths"] == b["widths"])
        if a["peak_step_bytes"] and b["peak_step_bytes"]:
            pr = b["peak_step_bytes"] / a["peak_step_bytes"]
            rep.add(f"resnet18 task {n} step peak memory / task {first} (same widths)", f"≤ {GOAL:.2f}×", pr,
                    pr <= GOAL, "x", peak_bytes=b["peak_step_bytes"], first_peak_bytes=a["peak_step_bytes"])
    last = per_task[-1]
    rep.add(f"resnet18 checkpoint after {n} tasks / backbone", "info", last["checkpoint_bytes"] / backbone, None,
            "x", bytes=last["checkpoint_bytes"], backbone_bytes=backbone)
    rep.add(f"resnet18 serving {n} tasks / backbone", "info", last["serving_bytes"] / backbone, None, "x",
            bytes=last["serving_bytes"], backbone_bytes=backbone)
    rep.extra["resnet18"] = {"tasks": n, "input": list(shape), "batch": batch, "grow_tasks": grow_tasks,
                             "reps": reps, "seed_width": width, "backbone_bytes": backbone,
                             "full_widths": int(sum(C.full_widths(net).values())), "per_task": per_task}
    out = (Path(args.json).parent if args.json else C.RESULTS / "quick") / "scale_resnet18.png" if args.quick \
        else Path(args.resnet18_plot)
    try:
        plot_resnet18(rep.extra["resnet18"], out)
        rep.note(f"ResNet-18 plot: {out}")
    except ImportError as exc:  # pragma: no cover - matplotlib is an optional dependency
        rep.note(f"ResNet-18 plot not drawn ({exc})")
    rep.note(f"ResNet-18 stream: {n} tasks, input {'x'.join(map(str, shape))}, batch {batch}, seed width {width}, "
             f"LSG growth (candidate pool 0.25x the full width at every site, gates settled at freeze) on tasks "
             f"{', '.join(map(str, grow_tasks))}.  Task k's step is one of its own training steps (after its "
             f"growth round, gates still soft on a growth task), timed interleaved with a fixed reference (task 1 of "
             f"a second ResNet-18 at the seed width) {reps} times; step / task 2 = (task k / ref) / (task 2 / ref). "
             f"Checkpoint = tensor bytes of net.state_dict(); serving = frozen bank + every finished task's state, "
             f"both after task k is frozen.")
    del net, ref
    gc.collect()


def plot_resnet18(data: dict, out: Path) -> Path:
    """Four panels against the task: step time / task 2, step peak memory, checkpoint and serving bytes, widths;
    growth tasks marked.  Drawn on an Agg figure (no display needed)."""
    from matplotlib.figure import Figure

    rows = data["per_task"]
    x = [r["task"] for r in rows]
    grew = [r["task"] for r in rows if r["grew"]]
    mb = 1 / 2**20
    fig = Figure(figsize=(10, 7), layout="constrained")
    axes = fig.subplots(2, 2, sharex=True)
    (a_step, a_peak), (a_bytes, a_width) = axes

    def mark(ax, label=False):
        for i, g in enumerate(grew):
            ax.axvline(g, color="tab:red", alpha=0.25, linewidth=6, zorder=0,
                       label="growth (LSG) task" if label and i == 0 else None)

    y = [r["step_over_task2"] for r in rows]
    lo = [r["step_over_task2"] - r["q1_over_task2"] for r in rows]
    hi = [r["q3_over_task2"] - r["step_over_task2"] for r in rows]
    a_step.errorbar(x, y, yerr=[[max(v, 0) for v in lo], [max(v, 0) for v in hi]], marker="o", capsize=3,
                    label="median (bars: quartiles of paired ratios)")
    a_step.axhline(1.0, color="black", linewidth=0.8, linestyle=":")
    a_step.set_ylabel("step CPU time / task-2 step")
    a_step.set_title("Training step time (ratio, 1 thread)")
    mark(a_step, label=True)
    a_step.legend(fontsize=8, loc="upper left", frameon=False)

    peaks = [(r["task"], r["peak_step_bytes"] * mb) for r in rows if r["peak_step_bytes"]]
    if peaks:
        a_peak.plot(*zip(*peaks), marker="o", color="tab:purple")
    a_peak.set_ylabel("peak tensor memory of a step (MiB)")
    a_peak.set_title("Step peak memory (torch CPU allocator)")
    mark(a_peak)

    a_bytes.plot(x, [r["checkpoint_bytes"] * mb for r in rows], marker="o", label="checkpoint (state_dict)")
    a_bytes.plot(x, [r["serving_bytes"] * mb for r in rows], marker="s", markersize=4, linestyle="--",
                 label="serving (bank + tasks' state)")
    a_bytes.axhline(data["backbone_bytes"] * mb, color="gray", linewidth=0.8, linestyle=":",
                    label="full ResNet-18")
    a_bytes.set_ylabel("size (MiB)")
    a_bytes.set_title("Checkpoint and serving size after task")
    a_bytes.set_ylim(bottom=0)
    mark(a_bytes)
    a_bytes.legend(fontsize=8, loc="lower right", frameon=False)

    a_width.plot(x, [r["widths_after"] for r in rows], marker="o", color="tab:green", label="after the task")
    a_width.scatter([r["task"] for r in rows if r["grew"]], [r["widths_learning"] for r in rows if r["grew"]],
                    marker="^", color="tab:red", zorder=3, label="while learning (with every candidate)")
    a_width.axhline(data["full_widths"], color="gray", linewidth=0.8, linestyle=":", label="full ResNet-18")
    a_width.set_ylabel("channels (sum over growable groups)")
    a_width.set_title("Width")
    a_width.set_ylim(bottom=0)
    mark(a_width)
    a_width.legend(fontsize=8, loc="lower right", frameon=False)

    for ax in axes.flat:
        ax.grid(axis="y", alpha=0.3)
        ax.set_xticks(x if len(x) <= 20 else x[::2])
    for ax in axes[1]:
        ax.set_xlabel("task")
    c, h, w = data["input"]
    fig.suptitle(f"ResNet-18, {len(x)} tasks, {c}×{h}×{w} inputs, batch {data['batch']}, growth on tasks "
                 f"{', '.join(map(str, grew))}")
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=150, bbox_inches="tight")
    return out


def add_args(p):
    p.add_argument("--tasks", type=int, default=50)
    p.add_argument("--reps", type=int, default=20)
    p.add_argument("--steps", type=int, default=3, help="training steps of each earlier task")
    p.add_argument("--resnet18-tasks", type=int, default=20, help="tasks of the ResNet-18 stream (0: skip it)")
    p.add_argument("--resnet18-size", type=int, default=84, help="input height = width (MiniImageNet: 84)")
    p.add_argument("--resnet18-batch", type=int, default=16)
    p.add_argument("--resnet18-grow", type=int, nargs="*", default=[1, 5, 10, 15],
                   help="tasks that start with an LSG growth round")
    p.add_argument("--resnet18-reps", type=int, default=10, help="interleaved timed steps per task")
    p.add_argument("--resnet18-plot", type=Path, default=RESNET18_PLOT)
    p.add_argument("--only-resnet18", action="store_true", help="skip the small_cnn stream")


def main(argv=None):
    return C.cli_main(run, "scale_tasks", __doc__, add_args, argv)


if __name__ == "__main__":
    main()
