"""train_step: a training step of the task-aware model vs the plain model of the same width.

For each backbone, at task 1 and at task 10, batch 32 (the paper's setting) and batch 128, CIFAR-size inputs:
forward, cross-entropy, backward and optimiser steps of

  * the task-aware model for its learning task: SGD (Nesterov 0.9) on its trainable weights, Adam on its mask
    scores (the real method's step), and
  * the plain model of the same width: the learning task's export with every channel kept (standard torch.nn
    layers in the backbone's fx graph; at task 1 exactly the backbone sliced to the seed width), SGD on all
    its weights.

Task 1: a fresh net at the seed width, no growth: every unit dense, no masks (the engine's own overhead).
Task 10: nine earlier tasks learned briefly with GROWN's policy (task 1 with learnable sparse growth, task 9
growing too so that task 10 has released weights to re-train), frozen, masks with zeros; task 10 in stage 1
(selective Gumbel masks on the units earlier tasks own, released units re-trained).

Goals (issue 16), at batch 32: task 1 <= 1.05x; task 10 <= 1.10x for ResNet-18 and MobileNetV2, <= 1.30x for
the Linear-heavy LeNet-5 and VGG16-BN (CPG's CIFAR network, 512 -> 4096 -> 4096), which are measured again
with granularity 'channel' (a Linear's mask unit is a block of input columns instead of one weight).  The
batch-128 rows show how the overhead (per weight, not per image) shrinks as compute grows; same goals.
"""

from __future__ import annotations

import gc

import torch

import grownfx

from . import common as C

GOAL = 1.10  # task 10, ResNet-18 and MobileNetV2 (issue 16)
GOAL_TASK1 = 1.05  # task 1: the engine alone (no masks) costs nothing measurable
# the Linear-heavy backbones: <= 1.30x (issue 16); their rows with granularity 'channel' are reported too
CHANNEL_GOALS = {"lenet5": 1.30, "vgg16_bn": 1.30}


def scenario(name: str, task: int, steps: int, device="cpu", granularity: str = "kernel"):
    """(net with its learning task at index task-1, plain model of the same width, input shape, facts)."""
    if task == 1:
        model, shape = C.build_model(name)
        net = grownfx.prepare(model, torch.randn(2, *shape), C.MODELS[name]["seed_width"],
                              granularity=granularity).to(device)
        net.add_task(10)
        earlier = []
    else:
        net, earlier, shape = C.learned_net(name, task - 1, steps=steps, grow_tasks=(0, task - 2), device=device,
                                            granularity=granularity)
        net.add_task(10)
    plain = C.plain_of_learning_task(net).to(device)
    p = net.trainable_parameters()
    bank = sum(m.weight.numel() for m in net.masked_layers())
    facts = {
        "plain_params": sum(q.numel() for q in plain.parameters()),
        "bank_weights": bank,
        "released_frac": net.free_weights() / max(bank, 1),
        "mask_scores": sum(q.numel() for q in p["masks"]),
        "earlier_zero_frac": (sum(s.mask_zero_frac for s in earlier[1:]) / max(len(earlier) - 1, 1)
                              if earlier else None),
    }
    return net, plain, shape, facts


def measure(net, plain, shape, batch: int, reps: int, warmup: int, device="cpu") -> dict:
    x, y = C.random_batch(batch, shape, 10, torch.Generator().manual_seed(batch), device)
    a, b = C.aware_step(net), C.plain_step(plain)
    cuda = torch.device(device).type == "cuda"
    wall = {}
    times = C.interleaved({"aware": lambda: a(x, y), "plain": lambda: b(x, y)}, reps=reps, warmup=warmup,
                          sync=torch.cuda.synchronize if cuda else None, wall=wall)
    out = C.ratio_stats(times["aware"], times["plain"], wall["aware"], wall["plain"])
    if cuda:  # absolute times only from a GPU
        out.update(aware_ms=1e3 * C.median(times["aware"]), plain_ms=1e3 * C.median(times["plain"]))
    return out


def run(args) -> C.Report:
    cols = ("paired_q1", "paired_q3", "wall_ratio", "released_frac", "mask_scores")
    if torch.device(args.device).type == "cuda":
        cols += ("aware_ms", "plain_ms")
    rep = C.Report("train_step", quick=args.quick, columns=cols)
    models = args.models or (["lenet5"] if args.quick else ["resnet18", "vgg16_bn", "mobilenet_v2", "lenet5"])
    tasks = (1, 3) if args.quick else (1, args.tasks)
    batches = (8, 16) if args.quick else (32, 128)
    steps = 2 if args.quick else args.steps
    cases = [(name, task, "kernel") for name in models for task in tasks]
    # the Linear-heavy backbones again with granularity 'channel' (a Linear's unit: a block of input columns)
    cases += [(name, tasks[-1], "channel") for name in models if name in CHANNEL_GOALS and not args.quick]
    for name, task, granularity in cases:
        net, plain, shape, facts = scenario(name, task, steps, args.device, granularity)
        goal = CHANNEL_GOALS.get(name, GOAL) if task > 1 else GOAL_TASK1
        tag = "" if granularity == "kernel" else ", granularity channel"
        for batch in batches:
            reps = args.reps if batch == batches[0] else max(4, args.reps // 2)
            if args.quick:
                reps = 3
            s = measure(net, plain, shape, batch, reps, warmup=1 if args.quick else 3, device=args.device)
            rep.add(f"{name} task {task} batch {batch}{tag}", f"≤ {goal:.2f}×", s["ratio"], s["ratio"] <= goal, "x",
                    model=name, task=task, batch=batch, granularity=granularity,
                    **{k: v for k, v in s.items() if k != "ratio"}, **facts)
        del net, plain
        gc.collect()
    rep.note("ratio = median step time of the task-aware model / median of the plain model of the same width, "
             "interleaved in one process; on a CPU the step time is the thread's CPU time (time.thread_time; one "
             "intra-op thread), wall_ratio the same from wall-clock time; paired_q1/q3 = quartiles of the "
             "per-pair ratios.")
    rep.note("released_frac: share of the weight bank the learning task re-trains (free units); mask_scores: "
             "mask scores Adam updates (one per conv kernel, one per linear weight).")
    return rep


def add_args(p):
    p.add_argument("--models", nargs="*", default=None, choices=sorted(C.MODELS))
    p.add_argument("--tasks", type=int, default=10, help="the later task measured (default 10)")
    p.add_argument("--reps", type=int, default=20, help="interleaved pairs at the first batch size")
    p.add_argument("--steps", type=int, default=4, help="training steps of each earlier task")
    p.add_argument("--device", default="cpu", help="cpu (default) or cuda (then absolute step times are reported too)")


def main(argv=None):
    return C.cli_main(run, "train_step", __doc__, add_args, argv)


if __name__ == "__main__":
    main()
