"""A stand-in for the fine-grained pretrained benchmark, on this machine: LeNet-5 pretrained on Fashion-MNIST
classes 0-5, then a stream of the other four classes (two tasks of two) learned from it.

    python scripts/pretrained_standin.py --out runs/pretrained_standin    # pretrain, write the recipe
    grownfx compare runs/pretrained_standin/recipe.yaml --methods grown,piggyback,finetune,scratch,packnet \
        --seeds 0,1,2 --out runs/pretrained_standin/cmp
    (docs/results/pretrained_and_scarce.md lists every command that ran)

A harder stand-in (the default one saturates near 99.8 %): pretrain on the six easy classes, stream the four
confusable upper-body classes, T-shirt/Shirt then Pullover/Coat, with fewer images:

    python scripts/pretrained_standin.py --out runs/pre_hard --pretrain-classes 1,3,5,7,8,9 --stream 0/6,2/4 \
        --per-class 100

The recipe's data is the `python` kind with `rest_tasks` below as its factory: classes 6/7 and 8/9 of the
training file, `per_class` training and `val_per_class` validation images per class (seeded), every test image
of the four classes.  Inputs are x/255 normalised with Fashion-MNIST's mean and std, in pretraining too.
"""

from __future__ import annotations

import argparse
import hashlib
from pathlib import Path

import numpy as np
import torch
import yaml

from grownfx.data.fashion_mnist import find_idx, read_idx
from grownfx.models import lenet5

ROOT = Path("/usr/share/datasets/fashion-mnist")
MEAN, STD = 0.2860, 0.3530
PRETRAIN_CLASSES = tuple(range(6))
STREAM = ((6, 7), (8, 9))
NAMES = ("T-shirt", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot")


def _split(split: str) -> tuple[np.ndarray, np.ndarray]:
    files = find_idx(ROOT)
    x = read_idx(files[f"{split}_x"]).astype(np.float32)[:, None] / 255.0
    y = read_idx(files[f"{split}_y"]).astype(np.int64)
    return x, y


def rest_tasks(seed: int = 0, per_class: int = 200, val_per_class: int = 50, stream=STREAM) -> list[dict]:
    """The stream's tasks (default: classes (6, 7) then (8, 9)), labels 0, 1, ... in each task's class order;
    seeded train and validation subsets."""
    (xtr, ytr), (xte, yte) = _split("train"), _split("test")
    rng = np.random.default_rng(seed)
    tasks = []
    for classes in stream:
        train, val = [], []
        for c in classes:
            idx = rng.permutation(np.flatnonzero(ytr == c))
            val.append(idx[:val_per_class])
            train.append(idx[val_per_class:val_per_class + per_class])
        remap = {c: i for i, c in enumerate(classes)}
        label = np.vectorize(remap.get)
        tr, va = np.concatenate(train), np.concatenate(val)
        te = np.flatnonzero(np.isin(yte, classes))
        tasks.append({"name": "/".join(NAMES[c] for c in classes), "classes": [NAMES[c] for c in classes],
                      "train": (xtr[tr], label(ytr[tr])), "val": (xtr[va], label(ytr[va])),
                      "test": (xte[te], label(yte[te]))})
    return tasks


def pretrain(out: Path, epochs: int, seed: int, per_class: int,
             classes: tuple[int, ...] = PRETRAIN_CLASSES) -> tuple[Path, float]:
    """LeNet-5 on `classes` (default 0-5; `per_class` training images of each, at most 6000), Adam 1e-3, batch
    64; its state dict and .sha256 in `out`; returns (file, test accuracy on those classes)."""
    torch.manual_seed(seed)
    (xtr, ytr), (xte, yte) = _split("train"), _split("test")
    rng = np.random.default_rng(seed)
    keep = np.zeros(len(ytr), dtype=bool)
    for c in classes:
        keep[rng.permutation(np.flatnonzero(ytr == c))[:per_class]] = True
    keep_te = np.isin(yte, classes)
    label = np.vectorize({c: i for i, c in enumerate(classes)}.get)  # the head's outputs in `classes` order
    x, y = (torch.from_numpy(xtr[keep]) - MEAN) / STD, torch.from_numpy(label(ytr[keep]))
    model = lenet5(num_classes=len(classes), in_channels=1, input_size=28)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    for _ in range(epochs):
        model.train()
        for idx in torch.randperm(len(x)).split(64):
            opt.zero_grad()
            torch.nn.functional.cross_entropy(model(x[idx]), y[idx]).backward()
            opt.step()
    model.eval()
    with torch.no_grad():
        xt = (torch.from_numpy(xte[keep_te]) - MEAN) / STD
        acc = float((model(xt).argmax(1) == torch.from_numpy(label(yte[keep_te]))).float().mean()) * 100
    path = out / ("lenet5_fashion_0to5.pt" if classes == PRETRAIN_CLASSES else
                  f"lenet5_fashion_{''.join(map(str, classes))}.pt")
    torch.save(model.state_dict(), path)
    (out / (path.name + ".sha256")).write_text(hashlib.sha256(path.read_bytes()).hexdigest() + f"  {path.name}\n")
    return path, acc


SEED_RULES = ("first", "magnitude", "taylor")


def seed_selection(weights: Path, widths=(0.75, 0.5, 0.3), classes: tuple[int, ...] = PRETRAIN_CLASSES,
                   stream=STREAM) -> list[tuple[float, ...]]:
    """Test accuracy on the pretraining classes of the pretrained net slimmed to each width, no training after:
    (width, first-k, magnitude, taylor) -- how much of the loaded function each seed rule keeps.  Taylor scores on
    256 training images of the stream's task 1 (a seeded subset), as a run does (TAYLOR_SAMPLES)."""
    from grownfx.engine.prepare import prepare

    model = lenet5(num_classes=len(classes), in_channels=1, input_size=28)
    model.load_state_dict(torch.load(weights, weights_only=True))
    xte, yte = _split("test")
    keep = np.isin(yte, classes)
    label = np.vectorize({c: i for i, c in enumerate(classes)}.get)
    x, y = (torch.from_numpy(xte[keep]) - MEAN) / STD, torch.from_numpy(label(yte[keep]))
    task1 = torch.from_numpy(rest_tasks(stream=stream)[0]["train"][0])
    pick = torch.randperm(len(task1), generator=torch.Generator().manual_seed(0))[:256]
    task1 = (task1[pick.sort().values] - MEAN) / STD
    rows = []
    for width in widths:
        accs = []
        for rule in SEED_RULES:
            net = prepare(model, x[:1], width, seed_channels=rule, seed_data=task1)
            net.add_task(len(classes), keep_head=True)
            net.eval()
            with torch.no_grad():
                accs.append(float((net(x, task=0).argmax(1) == y).float().mean()) * 100)
        rows.append((width, *accs))
    return rows


def recipe(weights: Path, per_class: int, val_per_class: int, classes: tuple[int, ...] = PRETRAIN_CLASSES,
           stream=STREAM) -> dict:
    kwargs = {"per_class": per_class, "val_per_class": val_per_class}
    if tuple(map(tuple, stream)) != STREAM:
        kwargs["stream"] = [list(c) for c in stream]
    return {
        "name": "pretrained_standin",
        "description": f"LeNet-5 pretrained on Fashion-MNIST {','.join(map(str, classes))} (task 0), then "
                       f"{' and '.join('/'.join(map(str, c)) for c in stream)} (scripts/pretrained_standin.py)",
        "seed": 0, "code_dir": str(Path(__file__).resolve().parent),
        "model": {"builder": "lenet5", "kwargs": {"in_channels": 1, "input_size": 28}, "weights": weights.name,
                  "seed_size": 0.45},
        "data": {"name": "python", "factory": "pretrained_standin:rest_tasks", "seed": 0,
                 "kwargs": kwargs, "mean": [MEAN], "std": [STD]},
        "method": {"name": "grown"},
        "masks": {"grown": {"lam": 1.0e-6}},  # as lenet_fashion_split5_lowdata
        "target": {"rule": "best(scratch, finetune) - 0.5"},
        "training": {"epochs": 20, "stage2_epochs": 5, "batch_size": 32, "scheduler": "none", "num_threads": 1,
                     "optimizer": {"name": "adam", "lr": 1.0e-3, "momentum": 0.0, "nesterov": False}},
        "output": {"dir": "runs/pretrained_standin", "tensorboard": False, "export_format": "none"},
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=Path("runs/pretrained_standin"))
    ap.add_argument("--epochs", type=int, default=3, help="pretraining epochs")
    ap.add_argument("--pretrain-per-class", type=int, default=6000, help="pretraining images per class (0-5)")
    ap.add_argument("--per-class", type=int, default=200, help="training images per class of the stream")
    ap.add_argument("--val-per-class", type=int, default=50)
    ap.add_argument("--pretrain-classes", default=",".join(map(str, PRETRAIN_CLASSES)),
                    help="classes the backbone is pretrained on, comma-separated")
    ap.add_argument("--stream", default=",".join("/".join(map(str, c)) for c in STREAM),
                    help="the stream's tasks: comma-separated, each task's classes joined by /")
    args = ap.parse_args()
    classes = tuple(int(c) for c in args.pretrain_classes.split(","))
    stream = tuple(tuple(int(c) for c in task.split("/")) for task in args.stream.split(","))
    if set(classes) & {c for task in stream for c in task}:
        raise SystemExit("--pretrain-classes and --stream share a class")
    args.out.mkdir(parents=True, exist_ok=True)
    weights, acc = pretrain(args.out, args.epochs, seed=0, per_class=args.pretrain_per_class, classes=classes)
    (args.out / "recipe.yaml").write_text(yaml.safe_dump(
        recipe(weights, args.per_class, args.val_per_class, classes, stream), sort_keys=False))
    print(f"pretrained LeNet-5 on classes {args.pretrain_classes}: test accuracy {acc:.2f} %; wrote {weights} and "
          f"{args.out / 'recipe.yaml'}")
    print("| seed width | first-k | magnitude | taylor |\n| --- | --- | --- | --- |")
    for width, *accs in seed_selection(weights, classes=classes, stream=stream):
        print(f"| {width:.2f} | " + " | ".join(f"{a:.2f}" for a in accs) + " |")


if __name__ == "__main__":
    main()
