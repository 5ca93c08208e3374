"""data_pipeline: images/s of the data loaders vs images/s of the training step.

A CIFAR-like split held in memory as grownfx holds it (uint8 3x32x32 images, int64 labels; synthetic values),
batch 32, shuffled, read by

  * `TaskData.loader` (batched: one index gather, then normalisation and augmentation on the whole batch), with
    the CIFAR training augmentation (random crop with 4-pixel padding + flip) and without,
  * `torch.utils.data.DataLoader` over `TaskData.dataset()` (per item, default collate, pin_memory off), with
    0 and with 2 worker processes (workers start every epoch, the DataLoader default),

and the training step of the task-aware model (task 1 at the seed width, SGD + Adam, the fastest step grownfx
takes, so the strictest comparison) for small_cnn and ResNet-18 on the same batches.  All variants are timed
interleaved in one process.  Goal: every loader's images/s >= 5x the training step's (loading never dominates).
"""

from __future__ import annotations

import torch

import grownfx
from grownfx.data.core import TaskData

from . import common as C

GOAL = 5.0
CIFAR_MEAN, CIFAR_STD = (0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)


def make_data(n: int) -> TaskData:
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, 256, (n, 3, 32, 32), dtype=torch.uint8, generator=g)
    y = torch.randint(0, 10, (n,), generator=g)
    return TaskData(x, y, CIFAR_MEAN, CIFAR_STD)


def epoch(loader) -> int:
    n = 0
    for x, y in loader:
        n += x.shape[0]
    return n


def run(args) -> C.Report:
    rep = C.Report("data_pipeline", quick=args.quick)
    n = 256 if args.quick else args.images
    batch = 32
    data = make_data(n)
    gen = torch.Generator().manual_seed(0)
    loaders = {
        "batched crop_flip": data.loader(batch, shuffle=True, generator=gen, augment="crop_flip"),
        "batched no augment": data.loader(batch, shuffle=True, generator=gen, augment=None),
        "DataLoader 0 workers": torch.utils.data.DataLoader(data.dataset(), batch_size=batch, shuffle=True,
                                                            num_workers=0, pin_memory=False),
    }
    if not args.quick:
        loaders["DataLoader 2 workers"] = torch.utils.data.DataLoader(data.dataset(), batch_size=batch, shuffle=True,
                                                                      num_workers=2, pin_memory=False)
    models = ["small_cnn"] if args.quick else ["small_cnn", "resnet18"]
    steps_per_sample = 2 if args.quick else args.steps
    variants, images = {}, {}
    for name, loader in loaders.items():
        variants[name] = (lambda ld=loader: epoch(ld))
        images[name] = n
    xb, yb = next(iter(data.loader(batch, shuffle=True, generator=torch.Generator().manual_seed(1),
                                   augment="crop_flip")))
    for m in models:
        model, shape = C.build_model(m)
        net = grownfx.prepare(model, torch.randn(2, *shape), C.MODELS[m]["seed_width"])
        net.add_task(10)
        step = C.aware_step(net)

        def train(step=step):
            for _ in range(steps_per_sample):
                step(xb, yb)

        variants[f"step {m}"] = train
        images[f"step {m}"] = steps_per_sample * batch
    # wall-clock: the DataLoader's workers run in other processes
    times = C.interleaved(variants, reps=2 if args.quick else args.reps, warmup=1, clock="wall")
    rate = {k: images[k] / C.median(v) for k, v in times.items()}
    for m in models:
        for ld in loaders:
            r = rate[ld] / rate[f"step {m}"]
            rep.add(f"{ld} / {m} training step (images/s)", f"≥ {GOAL:g}×", r, r >= GOAL, "x", loader=ld, model=m)
    base = rate["DataLoader 0 workers"]
    for ld in loaders:
        if ld != "DataLoader 0 workers":
            rep.add(f"{ld} / DataLoader 0 workers (images/s)", "info", rate[ld] / base, None, "x", loader=ld)
    rep.note("ratios of images per second (wall-clock), medians of interleaved samples (a loader sample = one epoch of "
             f"{n} images; a step sample = {steps_per_sample} steps of batch {batch}).")
    rep.note("DataLoader with workers restarts them every epoch (persistent_workers=False, the default); "
             "on this shared 2-core machine 2 workers compete with the main process.")
    return rep


def add_args(p):
    p.add_argument("--images", type=int, default=4096, help="images per loader epoch")
    p.add_argument("--reps", type=int, default=7)
    p.add_argument("--steps", type=int, default=8, help="training steps per timed sample")


def main(argv=None):
    return C.cli_main(run, "data_pipeline", __doc__, add_args, argv)


if __name__ == "__main__":
    main()
