"""mask_arith: how much of the task-10 step overhead is the mask arithmetic, and how much fusing it would save.

The train_step scenario (task 10 in stage 1, batch 32).  Timed interleaved against the plain step:

  * the task-aware step and the plain step (as in train_step),
  * the mask arithmetic alone, eager: every masked layer's effective weight for the learning task
    (`where(trainable, weight, frozen) * unit mask`, the mask's Gumbel noise and straight-through threshold) and
    its backward into the weights and mask scores, given a fixed upstream gradient (no convolutions),
  * the same arithmetic compiled by torch.compile (inductor fuses it into a few loops): what a fused
    implementation of the engine's effective weight would cost.

Rows (shares of the plain step, informational): the step's overhead, the eager mask arithmetic, the compiled
one, and the step ratio predicted if the engine's mask arithmetic were fused (the overhead with the eager
arithmetic replaced by the compiled one).  Uses the private `MaskedLayer._learning_weight`.
"""

from __future__ import annotations

import gc

import torch

from . import common as C
from .train_step import scenario


def run(args) -> C.Report:
    rep = C.Report("mask_arith", quick=args.quick, columns=("wall_ratio",))
    models = args.models or (["lenet5"] if args.quick else ["resnet18", "vgg16_bn"])
    task = 3 if args.quick else 10
    backend = args.backend or ("aot_eager" if args.quick else "inductor")
    batch = 8 if args.quick else 32
    for name in models:
        net, plain, shape, facts = scenario(name, task, 2 if args.quick else 4)
        layers = net.masked_layers()
        net.train()

        def effective(layers=layers):
            return [m._learning_weight(True) for m in layers]

        grads = [torch.randn_like(w) for w in effective()]
        ceff = torch.compile(effective, backend=backend)
        x, y = C.random_batch(batch, shape, 10, torch.Generator().manual_seed(0))
        sa, sp = C.aware_step(net), C.plain_step(plain)
        variants = {
            "aware": lambda: sa(x, y),
            "plain": lambda: sp(x, y),
            "eager": lambda: torch.autograd.backward(effective(), grad_tensors=grads),
            "compiled": lambda: torch.autograd.backward(ceff(), grad_tensors=grads),
        }
        wall = {}
        t = C.interleaved(variants, reps=3 if args.quick else args.reps, warmup=2 if args.quick else 3, wall=wall)
        med = {k: C.median(v) for k, v in t.items()}
        wmed = {k: C.median(v) for k, v in wall.items()}
        share = lambda k, m=med: m[k] / m["plain"]  # noqa: E731
        head = f"{name} task {task} batch {batch}"
        rep.add(f"{head}: task-aware step / plain step", "info", share("aware"), None, "x",
                wall_ratio=wmed["aware"] / wmed["plain"], **facts)
        rep.add(f"{head}: mask arithmetic fwd+bwd, eager / plain step", "info", share("eager"), None, "x",
                wall_ratio=wmed["eager"] / wmed["plain"])
        rep.add(f"{head}: mask arithmetic fwd+bwd, compiled ({backend}) / plain step", "info", share("compiled"),
                None, "x", wall_ratio=wmed["compiled"] / wmed["plain"])
        predicted = share("aware") - share("eager") + share("compiled")
        rep.add(f"{head}: predicted step ratio with fused mask arithmetic", "≤ 1.10× (train_step's goal)",
                predicted, predicted <= 1.10, "x")
        del net, plain, sa, sp, variants, ceff
        torch._dynamo.reset()
        gc.collect()
    rep.note("shares of the plain step's median (the thread's CPU time), all variants interleaved in one process; "
             "the prediction assumes the rest of the step is unchanged.")
    return rep


def add_args(p):
    p.add_argument("--models", nargs="*", default=None, choices=sorted(C.MODELS))
    p.add_argument("--reps", type=int, default=15)
    p.add_argument("--backend", default=None, help="torch.compile backend (default inductor; aot_eager with --quick)")


def main(argv=None):
    return C.cli_main(run, "mask_arith", __doc__, add_args, argv)


if __name__ == "__main__":
    main()
