"""Task streams for task-incremental continual learning, read from local files (never downloaded).

    stream = build_stream({"name": "cifar100_split", "root": "data"}, seed=0)
    for task in stream:
        for x, y in task.train.loader(128, shuffle=True, device="cuda"):
            ...
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Callable

from grownfx.data.config import (
    Cifar100SplitConfig,
    Cifar100SuperclassConfig,
    DataConfig,
    DigitsConfig,
    FashionMNISTConfig,
    HuggingFaceConfig,
    ImageFolderConfig,
    ImageFoldersConfig,
    MiniImageNetConfig,
    PythonConfig,
    SyntheticConfig,
    TorchvisionConfig,
    parse_data_config,
)
from grownfx.data.errors import DatasetError

if TYPE_CHECKING:
    from grownfx.data.core import (
        BatchLoader,
        Task,
        TaskData,
        TaskDataset,
        TaskStream,
        crop_flip,
        hflip,
    )

# grownfx.data.core imports torch; its names load on first use (PEP 562) so that the recipe schema, which
# imports grownfx.data.config, and `grownfx validate` stay free of torch.
_CORE = {"BatchLoader", "Task", "TaskData", "TaskDataset", "TaskStream", "crop_flip", "hflip"}


def __getattr__(name: str):
    if name in _CORE:
        from grownfx.data import core

        value = getattr(core, name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'grownfx.data' has no attribute {name!r}")
from grownfx.data.safe_pickle import safe_load

__all__ = [
    "BatchLoader",
    "Cifar100SplitConfig",
    "Cifar100SuperclassConfig",
    "DataConfig",
    "DatasetError",
    "DigitsConfig",
    "FashionMNISTConfig",
    "HuggingFaceConfig",
    "ImageFolderConfig",
    "ImageFoldersConfig",
    "MiniImageNetConfig",
    "PythonConfig",
    "SyntheticConfig",
    "Task",
    "TaskData",
    "TaskDataset",
    "TaskStream",
    "TorchvisionConfig",
    "build_stream",
    "data_seed",
    "stream_for",
    "crop_flip",
    "hflip",
    "parse_data_config",
    "safe_load",
]


def _builders() -> dict[str, Callable[[Any, int], TaskStream]]:
    # Imported on use so that `import grownfx.data` does not pull in PIL, sklearn or torchvision datasets.
    from grownfx.data.cifar import build_cifar100_split, build_cifar100_superclass
    from grownfx.data.digits import build_digits
    from grownfx.data.factory import build_python
    from grownfx.data.fashion_mnist import build_fashion_mnist
    from grownfx.data.folder import build_imagefolder, build_imagefolders
    from grownfx.data.huggingface import build_huggingface
    from grownfx.data.miniimagenet import build_miniimagenet
    from grownfx.data.synthetic import build_synthetic
    from grownfx.data.tvision import build_torchvision

    return {
        "cifar100_split": build_cifar100_split,
        "cifar100_superclass": build_cifar100_superclass,
        "miniimagenet": build_miniimagenet,
        "imagefolder": build_imagefolder,
        "imagefolders": build_imagefolders,
        "torchvision": build_torchvision,
        "digits": build_digits,
        "fashion_mnist": build_fashion_mnist,
        "synthetic": build_synthetic,
        "python": build_python,
        "huggingface": build_huggingface,
    }


def build_stream(cfg: DataConfig | dict[str, Any], seed: int, *, code_dir: str | None = None) -> TaskStream:
    """Build the task stream `cfg` describes; the same (cfg, seed) always gives identical tensors.

    `code_dir`: where a `python` kind's factory module is looked for first (then the working folder, sys.path).
    Building a `python` stream imports and runs the factory: the user's code."""
    cfg = parse_data_config(cfg)
    if cfg.name == "python":
        return _builders()["python"](cfg, seed, code_dir)
    return _builders()[cfg.name](cfg, seed)


def data_seed(recipe: Any) -> int:
    """The seed of a recipe's data: class order, hold-outs, subsets and a python factory's `seed`.  Every stream a
    run, a comparison, a reference or `load_run` builds takes it from here: `data.seed`, or the recipe's `seed`
    when the recipe does not set one (what every recipe meant before `data.seed` existed)."""
    own = getattr(recipe.data, "seed", None)
    return int(recipe.seed if own is None else own)


def stream_for(recipe: Any) -> TaskStream:
    """The task stream of a recipe (a `grownfx.recipe.Recipe`): its data section, data seed and code folder."""
    return build_stream(recipe.data, data_seed(recipe), code_dir=getattr(recipe, "code_dir", None))
