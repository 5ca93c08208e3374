"""Dataset configuration: a pydantic discriminated union on `name`; unknown keys are errors."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, ClassVar, Literal, Optional, Union

from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    NonNegativeInt,
    PositiveInt,
    TypeAdapter,
    field_validator,
    model_validator,
)

__all__ = [
    "Cifar100SplitConfig",
    "Cifar100SuperclassConfig",
    "DataConfig",
    "DigitsConfig",
    "FashionMNISTConfig",
    "HuggingFaceConfig",
    "ImageFolderConfig",
    "ImageFoldersConfig",
    "MiniImageNetConfig",
    "PythonConfig",
    "SyntheticConfig",
    "TorchvisionConfig",
    "parse_data_config",
]

CIFAR100_HOWTO = (
    "Download cifar-100-python.tar.gz from https://www.cs.toronto.edu/~kriz/cifar.html and extract it so that "
    "<root>/cifar-100-python/train, test and meta exist."
)
MINIIMAGENET_HOWTO = (
    "Put the mini-imagenet-cache-train.pkl, -val.pkl and -test.pkl files (the few-shot learning cache of "
    "Ravi & Larochelle's split, 84x84) in <root>, or one folder of images per class (100 folders) in <root>. "
    "The pickles: on a machine with internet access, `pip install learn2learn` and run "
    "learn2learn.vision.datasets.MiniImagenet(root, mode=m, download=True) for m in train, validation, test "
    "(it writes mini-imagenet-cache-<mode>.pkl; rename -validation to -val), then copy them here. The folders: "
    "ImageNet ILSVRC-2012 train images (image-net.org, registered account) of the 100 classes listed in "
    "github.com/twitterresearch/meta-learning-lstm data/miniImagenet/{train,val,test}.csv. See docs/data.md."
)
Fraction = Annotated[float, Field(ge=0.0, lt=1.0)]


def _square(value: Any) -> Any:
    return (value, value) if isinstance(value, int) else value


ImageSize = Annotated[tuple[PositiveInt, PositiveInt], BeforeValidator(_square)]  # (H, W); one int n means (n, n)
_VAL_FRACTION = "Fraction of each class's train images held out for validation (seeded)."
_AUTO_TASKS = "Number of tasks; None = as many full tasks as classes allow."


class _Base(BaseModel):
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)
    howto: ClassVar[str] = "Copy the dataset files to this machine yourself."

    download: Literal[False] = Field(
        False, description="Always false: grownfx only reads files already on disk and never downloads anything."
    )
    seed: Optional[NonNegativeInt] = Field(
        None,
        description="Seed of the data alone: class order, validation and test hold-outs, train_per_class and "
        "limit_per_task subsets, a python factory's `seed`. Fixed while the recipe's `seed` (initialisation and "
        "training) varies, so `grownfx compare --seeds` varies one thing at a time; `--data-seeds` varies this. "
        "None: the recipe's `seed`, as before this field existed (a run's data follows its seed).",
    )
    limit_per_task: Optional[PositiveInt] = Field(
        None,
        description="Cap on a task's train split and on its validation split (each at most this many samples, "
        "class-balanced, seeded), for quick runs; the test split keeps every sample unless limit_test is true. "
        "None keeps all.",
    )
    limit_test: bool = Field(
        False, description="Also cap each task's test split at limit_per_task (test accuracies then come from "
        "fewer samples and are not comparable with full-test-set numbers)."
    )
    train_per_class: Optional[PositiveInt] = Field(
        None, description="Keep only this many (seeded, random) training samples per class, before the validation "
        "hold-out: the low-data setting. The test split is never subsampled by it. None keeps all."
    )
    augment: Literal["none", "crop_flip", "flip"] = Field(
        "none",
        description="Default train-split augmentation, done batched per batch: 'crop_flip' = random crop with "
        "4-pixel zero padding + horizontal flip; 'flip' = horizontal flip only.",
    )

    @field_validator("download", mode="before")
    @classmethod
    def _never_download(cls, value: Any) -> Any:
        if value is True or value in (1, "true", "True", "yes"):
            raise ValueError(
                f"download must be false: grownfx never downloads datasets, it reads local files. {cls.howto}"
            )
        return value


class _Normalised(_Base):
    mean: Optional[tuple[float, ...]] = Field(
        None, description="Per-channel mean in [0, 1] scale; None = this kind's default."
    )
    std: Optional[tuple[float, ...]] = Field(
        None, description="Per-channel std in [0, 1] scale; None = this kind's default."
    )

    @model_validator(mode="after")
    def _check_stats(self) -> "_Normalised":
        if (self.mean is None) != (self.std is None):
            raise ValueError("give both mean and std, or neither")
        if self.std is not None and (len(self.std) != len(self.mean) or min(self.std) <= 0):
            raise ValueError(f"mean and std need the same length and std > 0, got {self.mean} / {self.std}")
        return self


class _Ordered(BaseModel):
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)
    class_order: Literal["fixed", "shuffled"] = Field(
        "fixed", description="'fixed' = class ids ascending; 'shuffled' = a permutation drawn from class_order_seed."
    )
    class_order_seed: Optional[int] = Field(None, description="Seed of the shuffled class order; None = the data seed.")


class Cifar100SplitConfig(_Ordered, _Normalised):
    """CIFAR-100 Split-N: task k holds fine classes order[k*c:(k+1)*c] (default 10 tasks of 10, 10k..10k+9)."""

    howto: ClassVar[str] = CIFAR100_HOWTO
    name: Literal["cifar100_split"] = Field(description="Dataset kind.")
    root: Path = Field(description="Folder holding cifar-100-python/ (or that folder itself).")
    num_tasks: PositiveInt = Field(10, description="Number of tasks N.")
    classes_per_task: Optional[PositiveInt] = Field(None, description="Classes per task; None = 100 // num_tasks.")
    val_per_task: NonNegativeInt = Field(
        1000, description="Validation samples per task carved (class-stratified, seeded) from the official train set."
    )

    @model_validator(mode="after")
    def _check_size(self) -> "Cifar100SplitConfig":
        cpt = self.classes_per_task or 100 // self.num_tasks
        if cpt < 1 or cpt * self.num_tasks > 100:
            raise ValueError(f"{self.num_tasks} tasks x {cpt} classes do not fit in CIFAR-100's 100 classes")
        return self


class Cifar100SuperclassConfig(_Normalised):
    """CIFAR-100 superclasses: one task per coarse label with its 5 fine classes (20 tasks)."""

    howto: ClassVar[str] = CIFAR100_HOWTO
    name: Literal["cifar100_superclass"] = Field(description="Dataset kind.")
    root: Path = Field(description="Folder holding cifar-100-python/ (or that folder itself).")
    num_tasks: Annotated[int, Field(ge=1, le=20)] = Field(20, description="Keep the first N superclass tasks.")
    task_order: Literal["alphabetical", "coarse_id", "shuffled"] = Field(
        "alphabetical",
        description="Task order: by superclass name (CPG), by coarse label id, or shuffled with the data seed.",
    )
    val_fraction: Fraction = Field(0.1, description=_VAL_FRACTION)


class MiniImageNetConfig(_Ordered, _Normalised):
    """MiniImageNet-20: 100 classes x 600 images at 84x84, classes permuted and cut into 20 tasks of 5."""

    howto: ClassVar[str] = MINIIMAGENET_HOWTO
    name: Literal["miniimagenet"] = Field(description="Dataset kind.")
    root: Path = Field(
        description="Folder with mini-imagenet-cache-{train,val,test}.pkl, or with one image folder per class."
    )
    num_tasks: PositiveInt = Field(20, description="Number of tasks.")
    classes_per_task: PositiveInt = Field(5, description="Classes per task.")
    class_order: Literal["fixed", "shuffled"] = Field(
        "shuffled",
        description="'shuffled' = permutation of the sorted class ids drawn from class_order_seed; 'fixed' = sorted.",
    )
    class_order_seed: Optional[int] = Field(
        0, description="Seed of the class permutation, fixed by default so all runs share tasks; None = the data seed."
    )
    train_per_class: PositiveInt = Field(500, description="Images per class used for training (+validation).")
    test_per_class: PositiveInt = Field(
        100, description="Images per class held out as the test set (fixed, seed-independent)."
    )
    val_fraction: Fraction = Field(0.1, description=_VAL_FRACTION)
    image_size: PositiveInt = Field(
        84, description="Side of the square images; images of a class folder are resized to it."
    )


class ImageFolderConfig(_Ordered, _Normalised):
    """Any ImageFolder root (root/<class>/*.png, or root/train/<class> + root/test/<class>) split by class groups."""

    name: Literal["imagefolder"] = Field(description="Dataset kind.")
    root: Path = Field(
        description="Folder with one sub-folder per class, or with train/ and test/ sub-folders of those."
    )
    classes_per_task: PositiveInt = Field(description="Classes per task.")
    num_tasks: Optional[PositiveInt] = Field(None, description=_AUTO_TASKS)
    image_size: Optional[ImageSize] = Field(
        None, description="(H, W) to resize every image to; None = keep sizes (they must then all agree)."
    )
    channels: Literal[1, 3] = Field(3, description="1 = convert to grayscale, 3 = RGB.")
    val_fraction: Fraction = Field(0.1, description=_VAL_FRACTION)
    test_fraction: Fraction = Field(
        0.2, description="Fraction of each class held out for testing when there is no test/ folder."
    )
    workers: PositiveInt = Field(8, description="Threads decoding images.")


class ImageFoldersConfig(_Normalised):
    """A stream of datasets, one task each: every root an ImageFolder (root/<class>/*, or root/train/<class> +
    root/test/<class>) holding all of that task's classes (the fine-grained benchmark: CUBS-200, Stanford Cars,
    Oxford Flowers, WikiArt, Sketch; docs/data.md)."""

    name: Literal["imagefolders"] = Field(description="Dataset kind.")
    roots: list[Path] = Field(min_length=1, description="One folder per task, in the stream's order; the task is "
                              "named after the folder.")
    image_size: ImageSize = Field(description="(H, W) every image is resized to (the "
                                                        "tasks share one input shape).")
    channels: Literal[1, 3] = Field(3, description="1 = convert to grayscale, 3 = RGB.")
    val_fraction: Fraction = Field(0.1, description=_VAL_FRACTION)
    test_fraction: Fraction = Field(
        0.2, description="Fraction of each class held out for testing, for a root without a test/ folder."
    )
    workers: PositiveInt = Field(8, description="Threads decoding images.")

    @model_validator(mode="after")
    def _shared_stats(self) -> "ImageFoldersConfig":
        if self.mean is None:  # one normalisation for every task (pretrained networks expect their own)
            raise ValueError("give mean and std (e.g. ImageNet's [0.485, 0.456, 0.406] / [0.229, 0.224, 0.225] for "
                             "ImageNet-pretrained weights): every task of the stream is normalised alike")
        return self


class TorchvisionConfig(_Ordered, _Normalised):
    """Any torchvision.datasets class (CIFAR10, MNIST, FashionMNIST, SVHN, ...) read with download=False."""

    name: Literal["torchvision"] = Field(description="Dataset kind.")
    dataset: str = Field(description="Class name in torchvision.datasets, e.g. 'CIFAR10', 'MNIST', 'SVHN'.")
    root: Path = Field(description="The root argument of the torchvision dataset class.")
    classes_per_task: PositiveInt = Field(description="Classes per task.")
    num_tasks: Optional[PositiveInt] = Field(None, description=_AUTO_TASKS)
    kwargs: dict[str, Any] = Field(
        default_factory=dict, description="Extra constructor arguments, e.g. {'split': 'letters'} for EMNIST."
    )
    train_split: str = Field(
        "train", description="split= value of the training set, for classes taking `split` rather than `train`."
    )
    test_split: str = Field(
        "test", description="split= value of the test set, for classes taking `split` rather than `train`."
    )
    val_fraction: Fraction = Field(0.1, description=_VAL_FRACTION)
    test_fraction: Fraction = Field(
        0.2, description="Fraction of each class held out for testing when the class has no test split."
    )

    howto: ClassVar[str] = (
        "Run torchvision.datasets.<dataset>(root, download=True) on a machine with internet access and copy the "
        "root folder here."
    )

    @field_validator("dataset")
    @classmethod
    def _exists(cls, value: str) -> str:
        import torchvision.datasets

        if not isinstance(getattr(torchvision.datasets, value, None), type):
            raise ValueError(f"torchvision.datasets has no dataset class {value!r}")
        return value

    @field_validator("kwargs")
    @classmethod
    def _no_reserved(cls, value: dict[str, Any]) -> dict[str, Any]:
        reserved = {"root", "train", "split", "download", "transform", "target_transform"} & set(value)
        if reserved:
            raise ValueError(f"kwargs may not set {sorted(reserved)}: grownfx sets them itself")
        return value


class DigitsConfig(_Ordered, _Normalised):
    """scikit-learn's bundled digits (1797 8x8 images, 10 classes), split into tasks of classes_per_task."""

    howto: ClassVar[str] = "The digits ship with scikit-learn."
    name: Literal["digits"] = Field(description="Dataset kind.")
    classes_per_task: PositiveInt = Field(2, description="Classes per task.")
    num_tasks: Optional[PositiveInt] = Field(None, description="Number of tasks; None = 10 // classes_per_task.")
    val_fraction: Fraction = Field(0.2, description="Fraction of each class held out for validation (seeded).")
    test_fraction: Fraction = Field(0.2, description="Fraction of each class held out for testing (seeded).")


class FashionMNISTConfig(_Ordered, _Normalised):
    """Fashion-MNIST from its four IDX files (10 classes, 60000 train / 10000 test, 28x28 grey)."""

    howto: ClassVar[str] = "apt-get install dataset-fashion-mnist (Debian/Ubuntu), or copy the four IDX files."
    name: Literal["fashion_mnist"] = Field(description="Dataset kind.")
    root: Path = Field(
        Path("/usr/share/datasets/fashion-mnist"),
        description="Folder with the four IDX files (.gz or not), or a torchvision root holding FashionMNIST/raw/. "
        "Default: where Debian's dataset-fashion-mnist package puts them.",
    )
    classes_per_task: PositiveInt = Field(2, description="Classes per task.")
    num_tasks: Optional[PositiveInt] = Field(None, description="Number of tasks; None = 10 // classes_per_task.")
    val_fraction: Fraction = Field(0.1, description=_VAL_FRACTION)
    pad_to: Optional[Annotated[int, Field(ge=28)]] = Field(
        None, description="Zero-pad the 28x28 images, centred and before normalisation (the padding is black "
        "background, as the images' own border), to pad_to x pad_to: 32 for 32x32 CIFAR backbones such as "
        "vgg16_bn_cifar (five 2x2 pools need 32). None keeps 28."
    )
    channels: Literal[1, 3] = Field(
        1, description="1 = the grey images as they are; 3 = the grey channel copied into R, G and B, for "
        "backbones whose first layer takes RGB (torchvision's ResNet-18): the same function class as one channel "
        "into the summed kernel."
    )

    @model_validator(mode="after")
    def _stats_per_channel(self) -> "FashionMNISTConfig":
        if self.mean is not None and len(self.mean) not in (1, self.channels):
            raise ValueError(f"mean/std have {len(self.mean)} values; give 1 or channels={self.channels}")
        return self


class PythonConfig(_Ordered, _Normalised):
    """Your own data from Python: `factory` returns the tasks as (x, y) arrays or tensors, or torch Datasets, of any
    input rank (docs/data.md#your-own-data-from-python)."""

    howto: ClassVar[str] = "The factory makes the data; see docs/data.md#your-own-data-from-python."
    name: Literal["python"] = Field(description="Dataset kind.")
    factory: str = Field(
        description="'module:callable' returning the tasks: a list with one dict per task ({'train': (x, y), "
        "'test': (x, y), 'val': (x, y), 'classes': [...], 'name': ...}; only 'train' is required), or one dict "
        "{'train', 'test', 'classes'} cut into tasks of classes_per_task. The module is looked for in the "
        "recipe's code_dir (default: the recipe's folder), then the working folder, then sys.path."
    )
    kwargs: dict[str, Any] = Field(
        default_factory=dict, description="Keyword arguments for the factory. A factory taking `seed` also gets "
        "the data seed (unless kwargs sets it)."
    )
    classes_per_task: Optional[PositiveInt] = Field(
        None, description="When the factory returns one dataset: classes per task. Leave out for a list of tasks."
    )
    num_tasks: Optional[PositiveInt] = Field(None, description=_AUTO_TASKS + " (one dataset only)")
    val_fraction: Fraction = Field(0.1, description=_VAL_FRACTION + " Used for tasks without a 'val' split.")
    test_fraction: Fraction = Field(
        0.2, description="Fraction of each class held out for testing (seeded), for tasks without a 'test' split."
    )
    normalize: bool = Field(
        True, description="Subtract the per-channel (dimension 1: a tabular input's features) mean and divide by "
        "the std of the training splits; false feeds the inputs as they are (mean 0, std 1). Explicit mean/std win."
    )

    @field_validator("factory")
    @classmethod
    def _module_callable(cls, value: str) -> str:
        module, sep, attr = value.partition(":")
        if not sep or not module.strip() or not attr.strip():
            raise ValueError(f"expected 'module:callable' (e.g. 'my_data:make_tasks'), got {value!r}")
        return value


class HuggingFaceConfig(_Ordered, _Normalised):
    """A Hugging Face `datasets` folder written by `save_to_disk` (a Dataset or a DatasetDict), read offline with
    `load_from_disk`: an image column or an array column, and a label column; cut into tasks of classes_per_task.
    Needs the `datasets` package (`pip install "grownfx[hf]"`)."""

    howto: ClassVar[str] = ("On a machine that has the dataset, save it with ds.save_to_disk(path) (a Dataset or a "
                            "DatasetDict) and copy that folder here; reading it needs `pip install datasets`.")
    name: Literal["huggingface"] = Field(description="Dataset kind.")
    root: Path = Field(description="The folder `save_to_disk` wrote (dataset_dict.json or dataset_info.json in it).")
    input_column: Optional[str] = Field(
        None, description="The column holding the inputs: images (an Image feature, decoded to C, H, W) or arrays "
        "(Array2D/3D/..., Sequence, numbers) of any rank. None: the first Image or array column."
    )
    label_column: str = Field("label", description="The column of integer (or ClassLabel) labels.")
    train_split: str = Field("train", description="The DatasetDict split to train on (and hold validation out of).")
    test_split: Optional[str] = Field(
        "test", description="The DatasetDict split to test on; null (or a plain Dataset) holds out test_fraction."
    )
    classes_per_task: PositiveInt = Field(description="Classes per task.")
    num_tasks: Optional[PositiveInt] = Field(None, description=_AUTO_TASKS)
    val_fraction: Fraction = Field(0.1, description=_VAL_FRACTION)
    test_fraction: Fraction = Field(
        0.2, description="Fraction of each class held out for testing when there is no test split."
    )
    normalize: bool = Field(
        True, description="Normalise with the per-channel mean/std of the training splits; false: mean 0, std 1 "
        "(uint8 images are still scaled to [0, 1]). Explicit mean/std win."
    )


class SyntheticConfig(_Base):
    """Generated class-conditional Gaussian patterns, for tests and benchmarks."""

    howto: ClassVar[str] = "Synthetic data is generated."
    name: Literal["synthetic"] = Field(description="Dataset kind.")
    num_tasks: PositiveInt = Field(5, description="Number of tasks.")
    classes_per_task: Annotated[int, Field(ge=2)] = Field(2, description="Classes per task.")
    input_shape: tuple[PositiveInt, PositiveInt, PositiveInt] = Field((3, 16, 16), description="(C, H, W) of an input.")
    samples_per_class: PositiveInt = Field(100, description="Training samples per class.")
    val_per_class: NonNegativeInt = Field(20, description="Validation samples per class.")
    test_per_class: PositiveInt = Field(50, description="Test samples per class.")
    noise: Annotated[float, Field(ge=0.0)] = Field(
        1.0, description="Std of the per-sample Gaussian noise around unit-variance class patterns: higher is harder."
    )
    interfere: bool = Field(
        False,
        description="Every task reuses task 0's inputs with its labels permuted (each class's label changes from "
        "one task to the next), so fine-tuning forgets.",
    )
    data_seed: Optional[int] = Field(None, description="Seed of the generated data; None = the data seed.")


DataConfig = Annotated[
    Union[
        Cifar100SplitConfig,
        Cifar100SuperclassConfig,
        MiniImageNetConfig,
        ImageFolderConfig,
        ImageFoldersConfig,
        TorchvisionConfig,
        DigitsConfig,
        FashionMNISTConfig,
        PythonConfig,
        HuggingFaceConfig,
        SyntheticConfig,
    ],
    Field(discriminator="name"),
]

_ADAPTER: TypeAdapter[Any] = TypeAdapter(DataConfig)


def parse_data_config(value: Any) -> Any:
    """Validate a mapping (e.g. a recipe's `data:` section) into the matching config model."""
    return value if isinstance(value, BaseModel) else _ADAPTER.validate_python(value)
