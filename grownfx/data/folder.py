"""ImageFolder-style roots (one sub-folder of images per class), decoded by threads into one uint8 array."""

from __future__ import annotations

import hashlib
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np

from grownfx.data.config import ImageFolderConfig, ImageFoldersConfig
from grownfx.data.core import Task, TaskStream
from grownfx.data.errors import DatasetError, abspath, describe_dir
from grownfx.data.splits import Holdout, Pool, Sampling, assemble, class_order, group_classes

__all__ = ["IMG_EXTENSIONS", "build_imagefolder", "build_imagefolders", "read_images", "scan_class_folders"]

IMG_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")
_HOWTO = "Arrange the images as <root>/<class name>/<image>, optionally under <root>/train/ and <root>/test/."


def scan_class_folders(root: Path, howto: str = _HOWTO) -> tuple[list[str], list[Path], np.ndarray]:
    """(sorted class names, files sorted by class then name, class index per file)."""
    if not root.is_dir():
        raise DatasetError(
            f"expected a folder of class sub-folders at {root}; found instead: {describe_dir(root)}. {howto}"
        )
    classes = sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not classes:
        raise DatasetError(f"expected class sub-folders in {root}; found instead: {describe_dir(root)}. {howto}")
    files: list[Path] = []
    labels: list[int] = []
    for c, name in enumerate(classes):
        found = sorted(p for p in (root / name).rglob("*") if p.suffix.lower() in IMG_EXTENSIONS and p.is_file())
        if not found:
            raise DatasetError(f"class folder {root / name} holds no images ({', '.join(IMG_EXTENSIONS)}); "
                               f"found instead: {describe_dir(root / name)}. {howto}")
        files += found
        labels += [c] * len(found)
    return classes, files, np.asarray(labels, dtype=np.int64)


def read_images(paths: list[Path], size: tuple[int, int] | None, channels: int, workers: int = 8) -> np.ndarray:
    """Decode `paths` to uint8 (N, C, H, W), resizing to `size` = (H, W) when given."""
    from PIL import Image, UnidentifiedImageError

    mode = "RGB" if channels == 3 else "L"

    def decode(path: Path) -> np.ndarray:
        try:
            with Image.open(path) as im:
                im = _to_8bit(im).convert(mode)
                if size is not None and im.size != (size[1], size[0]):
                    im = im.resize((size[1], size[0]), Image.BILINEAR)
                return np.asarray(im, dtype=np.uint8)
        except Image.DecompressionBombError as e:
            raise DatasetError(f"refusing image {path}: {e}") from None
        except (UnidentifiedImageError, OSError) as e:
            raise DatasetError(f"cannot decode image {path}: {e}") from None

    with ThreadPoolExecutor(max_workers=workers) as pool:
        arrays = list(pool.map(decode, paths))
    if not arrays:
        return np.zeros((0, channels, *(size or (1, 1))), dtype=np.uint8)
    shapes = {a.shape for a in arrays}
    if len(shapes) > 1:
        odd = next(p for p, a in zip(paths, arrays) if a.shape != arrays[0].shape)
        raise DatasetError(
            f"images differ in size ({sorted(shapes)[:4]}, e.g. {odd} vs {paths[0]}); set image_size to resize them"
        )
    x = np.stack(arrays)
    return x[:, None] if channels == 1 else np.ascontiguousarray(x.transpose(0, 3, 1, 2))


def _to_8bit(im):
    """16-bit (and 32-bit integer) grayscale images scaled to 8 bits: PIL's convert("L") clips them at 255, so
    almost every pixel of a 16-bit PNG would read as white."""
    from PIL import Image

    if im.mode not in ("I;16", "I;16L", "I;16B", "I;16N", "I"):
        return im
    a = np.asarray(im).astype(np.float64)
    top = 65535.0 if a.max(initial=0) <= 65535 else float(a.max())
    return Image.fromarray(np.clip(np.rint(a * (255.0 / top)), 0, 255).astype(np.uint8), "L")


def files_digest(root: Path, files: list[Path]) -> str:
    listing = "\n".join(str(p.relative_to(root)) for p in files)
    return hashlib.sha1(listing.encode()).hexdigest()[:16]


def _decode_used(files: list[Path], labels: np.ndarray, used: np.ndarray, offset: int, cfg: ImageFolderConfig,
                 size: tuple[int, int] | None) -> Pool:
    rows = np.flatnonzero(np.isin(labels, used))  # classes outside every task are never decoded
    x = read_images([files[i] for i in rows], size, cfg.channels, cfg.workers)
    return Pool(x, labels[rows], offset + rows)


def build_imagefolder(cfg: ImageFolderConfig, seed: int) -> TaskStream:
    root = abspath(cfg.root)
    split_dirs = (root / "train").is_dir() and (root / "test").is_dir()
    train_root = root / "train" if split_dirs else root
    classes, files, labels = scan_class_folders(train_root)
    order_seed = seed if cfg.class_order_seed is None else cfg.class_order_seed
    order = class_order(len(classes), cfg.class_order == "shuffled", order_seed)
    task_classes = group_classes(order, cfg.classes_per_task, cfg.num_tasks)
    used = np.asarray(sum(task_classes, []))

    train = _decode_used(files, labels, used, 0, cfg, cfg.image_size)
    test = None
    sources: dict[str, Any] = {
        "train_root": str(train_root),
        "train_files": len(files),
        "train_digest": files_digest(train_root, files),
    }
    if split_dirs:
        test_classes, test_files, test_labels = scan_class_folders(root / "test")
        if test_classes != classes:
            raise DatasetError(
                f"{root / 'test'} has classes {test_classes[:5]}..., {train_root} has {classes[:5]}...; "
                f"they must match. {_HOWTO}"
            )
        test = _decode_used(test_files, test_labels, used, len(files), cfg, cfg.image_size or tuple(train.x.shape[2:]))
        digest = files_digest(root / "test", test_files)
        sources.update(test_root=str(root / "test"), test_files=len(test_files), test_digest=digest)

    return assemble(
        name=f"imagefolder:{root.name}",
        train=train,
        test=test,
        class_names=classes,
        task_classes=task_classes,
        task_names=[f"{root.name}/task{t + 1}" for t in range(len(task_classes))],
        seed=seed,
        val=Holdout(fraction=cfg.val_fraction),
        test_holdout=None if split_dirs else Holdout(fraction=cfg.test_fraction),
        sampling=Sampling.of(cfg),
        mean=cfg.mean,
        std=cfg.std,
        meta={
            "kind": cfg.name,
            "config": cfg.model_dump(mode="json"),
            "root": str(root),
            "sources": sources,
            "id_space": "id i = i-th image of the train listing (classes sorted, files sorted by path), "
            "then the test listing",
            "class_order": [int(c) for c in order],
            "class_order_seed": order_seed,
        },
    )


def build_imagefolders(cfg: ImageFoldersConfig, seed: int) -> TaskStream:
    """One task per root: each root read as an `imagefolder` of one task holding all its classes, the tasks
    chained in the order of `roots` (their sample ids stay each root's own: stream.json names the root per task)."""
    tasks, metas = [], []
    for t, root in enumerate(cfg.roots):
        path = abspath(root)
        split_dirs = (path / "train").is_dir() and (path / "test").is_dir()
        classes, _, _ = scan_class_folders(path / "train" if split_dirs else path)
        one = build_imagefolder(ImageFolderConfig(
            name="imagefolder", root=path, classes_per_task=len(classes), num_tasks=1, image_size=cfg.image_size,
            channels=cfg.channels, val_fraction=cfg.val_fraction, test_fraction=cfg.test_fraction,
            workers=cfg.workers, mean=cfg.mean, std=cfg.std, limit_per_task=cfg.limit_per_task,
            limit_test=cfg.limit_test, train_per_class=cfg.train_per_class, augment=cfg.augment), seed)
        task = one.tasks[0]
        tasks.append(Task(t, path.name, task.classes, task.num_classes, task.train, task.val, task.test))
        metas.append(one.meta)
    meta = dict(metas[0])
    meta.update({
        "kind": cfg.name, "config": cfg.model_dump(mode="json"), "stream": "imagefolders",
        "roots": [m["root"] for m in metas], "sources": [m["sources"] for m in metas],
        "class_names": [f"{tasks[t].name}/{c}" for t, m in enumerate(metas) for c in m["class_names"]],
        "unused_classes": [], "id_space": "per task: its root's ids (" + metas[0]["id_space"] + ")",
        "tasks": [{**m["tasks"][0], "index": t, "name": tasks[t].name, "root": m["root"]}
                  for t, m in enumerate(metas)],
    })
    for key in ("class_order", "class_order_seed", "root"):
        meta.pop(key, None)
    return TaskStream("imagefolders", tasks, tuple(metas[0]["input_shape"]), one.mean, one.std, meta)
