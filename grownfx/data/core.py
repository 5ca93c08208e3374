"""Tasks held in memory as tensors, and loaders that batch them by indexing (no per-sample collate)."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator, Sequence, Union

import torch
import torch.nn.functional as F
from torch import Tensor

from grownfx import files

__all__ = [
    "Augment",
    "IMAGE_AUGMENTS",
    "check_augment",
    "channel_view",
    "BatchLoader",
    "Task",
    "TaskData",
    "TaskDataset",
    "TaskStream",
    "crop_flip",
    "hflip",
]

Augment = Union[str, Callable[[Tensor, "torch.Generator | None"], Tensor], None]
_DEFAULT = "default"


def crop_flip(x: Tensor, generator: torch.Generator | None = None, padding: int = 4) -> Tensor:
    """Per-sample random crop of the zero-padded batch plus random horizontal flip, batched on x's device.

    `x` is a float batch (N, C, H, W) before normalisation, so the padding is black as in
    torchvision's RandomCrop(padding=4) followed by Normalize.
    """
    n, c, h, w = x.shape
    dev = x.device
    offsets = torch.randint(0, 2 * padding + 1, (2, n), generator=generator).to(dev)
    flip = (torch.rand(n, generator=generator) < 0.5).to(dev)
    padded = F.pad(x, (padding, padding, padding, padding))
    rows = offsets[0][:, None] + torch.arange(h, device=dev)
    cols = offsets[1][:, None] + torch.arange(w, device=dev)
    cols = torch.where(flip[:, None], cols.flip(1), cols)  # a flip is the crop's columns read backwards
    return padded[
        torch.arange(n, device=dev)[:, None, None, None],
        torch.arange(c, device=dev)[None, :, None, None],
        rows[:, None, :, None],
        cols[:, None, None, :],
    ]


def hflip(x: Tensor, generator: torch.Generator | None = None) -> Tensor:
    """Per-sample random horizontal flip of an image batch (N, C, H, W)."""
    flip = (torch.rand(x.shape[0], generator=generator) < 0.5).to(x.device)
    return torch.where(flip[:, None, None, None], x.flip(3), x)


_AUGMENTS: dict[str, Callable[[Tensor, torch.Generator | None], Tensor]] = {"crop_flip": crop_flip, "flip": hflip}
IMAGE_AUGMENTS = ("crop_flip", "flip")  # they crop and flip (H, W): image batches only


def channel_view(values: Sequence[float], ndim: int, device: torch.device | str | None = None) -> Tensor:
    """Per-channel values shaped to broadcast over a batch of rank `ndim` whose dimension 1 is the channel:
    (1, C) for tabular (N, F), (1, C, 1) for sequences (N, C, L), (1, C, 1, 1) for images, and so on."""
    return torch.tensor(tuple(values), dtype=torch.float32, device=device).view(1, -1, *([1] * (ndim - 2)))


def check_augment(augment: Augment, input_shape: Sequence[int]) -> None:
    """ValueError when a named image augmentation is asked of inputs that are not images (C, H, W)."""
    if augment in IMAGE_AUGMENTS and len(input_shape) != 3:
        raise ValueError(f"augment {augment!r} crops and flips images (C, H, W); these inputs are "
                         f"{tuple(input_shape)}: use augment 'none' or a callable")


def _resolve_augment(augment: Augment) -> Callable | None:
    if augment is None or augment == "none":
        return None
    if callable(augment):
        return augment
    if augment not in _AUGMENTS:
        raise ValueError(
            f"unknown augment {augment!r}; expected one of {sorted(_AUGMENTS)}, 'none', None or a callable"
        )
    return _AUGMENTS[augment]


@dataclass(eq=False)
class TaskData:
    """One split of one task: `x` uint8 (0..255) or float of any rank with the samples first and the channel
    (or feature) second: (N, F) tabular, (N, C, L) sequences, (N, C, H, W) images, (N, C, T, H, W) clips;
    `y` (N,) int64 per-task labels, `ids` (N,) int64 row ids in the stream's source (see meta["id_space"]).
    `mean`/`std` hold one value per channel (dimension 1), in [0, 1] scale for uint8 inputs.

    `augment` is what `loader()` applies by default ("crop_flip" on train splits when configured).
    """

    x: Tensor
    y: Tensor
    mean: tuple[float, ...]
    std: tuple[float, ...]
    ids: Tensor | None = None
    augment: str | None = None

    def __post_init__(self) -> None:
        if self.x.ndim < 2 or self.y.ndim != 1 or self.x.shape[0] != self.y.shape[0]:
            raise ValueError(
                f"TaskData needs x (N, C, ...) with at least 2 dimensions and y (N,), got {tuple(self.x.shape)} "
                f"and {tuple(self.y.shape)}"
            )
        if self.ids is None:
            self.ids = torch.arange(len(self.y))
        if len(self.mean) != self.x.shape[1] or len(self.std) != self.x.shape[1]:
            raise ValueError(f"mean/std need {self.x.shape[1]} channels, got {self.mean} / {self.std}")

    def __len__(self) -> int:
        return int(self.y.shape[0])

    @property
    def device(self) -> torch.device:
        return self.x.device

    def normalize(self, x: Tensor, augment: Augment = None, generator: torch.Generator | None = None) -> Tensor:
        """Raw batch -> float model input: scale uint8 to [0, 1], augment, subtract mean, divide by std."""
        fn = _resolve_augment(augment)
        out = x.float()
        scale = channel_view(self.std, x.ndim, out.device).reciprocal()
        bias = channel_view(self.mean, x.ndim, out.device) * -scale
        if x.dtype == torch.uint8:
            if fn is None:  # one fused pass: x * (1 / (255 std)) - mean / std
                return torch.addcmul(bias, out, scale / 255.0)
            out = out.mul_(1.0 / 255.0)
        if fn is not None:
            out = fn(out, generator)
        return torch.addcmul(bias, out, scale)

    def loader(
        self,
        batch_size: int,
        shuffle: bool = False,
        generator: torch.Generator | None = None,
        device: torch.device | str | None = None,
        augment: Augment = _DEFAULT,
        drop_last: bool = False,
    ) -> BatchLoader:
        """Batches `(x_float_normalised, y)` on `device`; re-iterable, one epoch per iteration.

        `augment="default"` uses `self.augment`; pass None (or "none") to switch it off, or a name
        ("crop_flip", "flip") or a callable `(x01, generator) -> x01`.
        """
        aug = self.augment if augment == _DEFAULT else augment
        return BatchLoader(
            self, batch_size, shuffle=shuffle, generator=generator, device=device, augment=aug, drop_last=drop_last
        )

    def dataset(self, normalize: bool = True) -> TaskDataset:
        """A per-item `torch.utils.data.Dataset` view, for DataLoader / DistributedSampler users."""
        return TaskDataset(self, normalize)

    def to(self, device: torch.device | str) -> TaskData:
        """A copy whose tensors live on `device` (small streams fit on a GPU whole; batches then never cross PCIe)."""
        return TaskData(self.x.to(device), self.y.to(device), self.mean, self.std, self.ids, self.augment)

    def subset(self, index: Tensor) -> TaskData:
        index = torch.as_tensor(index, device=self.x.device)
        return TaskData(self.x[index], self.y[index], self.mean, self.std, self.ids[index.cpu()], self.augment)


class TaskDataset(torch.utils.data.Dataset):
    def __init__(self, data: TaskData, normalize: bool = True) -> None:
        self.data = data
        self.normalize = normalize

    def __len__(self) -> int:
        return len(self.data)

    def __getitem__(self, i: int) -> tuple[Tensor, Tensor]:
        x = self.data.x[i]
        if self.normalize:
            x = self.data.normalize(x[None], augment=None)[0]
        return x, self.data.y[i]


class BatchLoader:
    """Iterates one epoch of `(x, y)` batches by slicing a (shuffled) index and gathering whole batches."""

    def __init__(
        self,
        data: TaskData,
        batch_size: int,
        *,
        shuffle: bool = False,
        generator: torch.Generator | None = None,
        device: torch.device | str | None = None,
        augment: Augment = None,
        drop_last: bool = False,
    ) -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.data = data
        self.batch_size = batch_size
        self.shuffle = shuffle
        self.generator = generator
        self.device = torch.device(device) if device is not None else data.device
        self.augment = augment
        self.drop_last = drop_last
        _resolve_augment(augment)  # fail now, not mid-epoch
        check_augment(augment, tuple(data.x.shape[1:]))

    def _num_samples(self) -> int:
        return len(self.data)

    def _order(self) -> Tensor:
        n = len(self.data)
        return torch.randperm(n, generator=self.generator) if self.shuffle else torch.arange(n)

    def _aug_generator(self) -> torch.Generator | None:
        return self.generator

    def __len__(self) -> int:
        n = self._num_samples()
        return n // self.batch_size if self.drop_last else math.ceil(n / self.batch_size)

    def __iter__(self) -> Iterator[tuple[Tensor, Tensor]]:
        # The order is drawn here, eagerly, so that an epoch's randomness is fixed when iteration starts.
        return self._batches(self._order().to(self.data.device), self._aug_generator())

    def _batches(self, order: Tensor, gen: torch.Generator | None) -> Iterator[tuple[Tensor, Tensor]]:
        stop = len(self) * self.batch_size
        for start in range(0, min(stop, len(order)), self.batch_size):
            idx = order[start : start + self.batch_size]
            xb = self.data.x[idx].to(self.device, non_blocking=True)
            yb = self.data.y[idx].to(self.device, non_blocking=True)
            yield self.data.normalize(xb, self.augment, gen), yb


@dataclass(eq=False)
class Task:
    index: int
    name: str
    classes: list[str]
    num_classes: int
    train: TaskData
    val: TaskData
    test: TaskData

    def to(self, device: torch.device | str) -> Task:
        return Task(self.index, self.name, self.classes, self.num_classes,
                    self.train.to(device), self.val.to(device), self.test.to(device))


@dataclass(eq=False)
class TaskStream:
    name: str
    tasks: list[Task]
    input_shape: tuple[int, ...]  # one input without the batch dimension: (F,), (C, L), (C, H, W), ...
    mean: tuple[float, ...]
    std: tuple[float, ...]
    meta: dict = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.tasks)

    def __iter__(self) -> Iterator[Task]:
        return iter(self.tasks)

    def __getitem__(self, i: int) -> Task:
        return self.tasks[i]

    @property
    def num_tasks(self) -> int:
        return len(self.tasks)

    @property
    def classes_per_task(self) -> list[int]:
        return [t.num_classes for t in self.tasks]

    def to(self, device: torch.device | str) -> TaskStream:
        tasks = [t.to(device) for t in self.tasks]
        return TaskStream(self.name, tasks, self.input_shape, self.mean, self.std, self.meta)

    def save_meta(self, path: str | Path) -> None:
        files.atomic_write_json(self.meta, path)
