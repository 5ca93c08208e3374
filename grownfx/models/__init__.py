"""Backbones: any torchvision classifier, grownfx's own small ones, or a user's `module:callable`."""

from __future__ import annotations

from typing import Callable, Optional

from torch import nn

from grownfx.errors import UserError
from grownfx.usercode import import_callable, is_user_code

from grownfx.models import pretrained as P
from grownfx.models.lenet import LeNet5, lenet5
from grownfx.models.small_cnn import SmallCNN, small_cnn
from grownfx.models.vgg_cifar import VGGCifar, vgg16_bn_cifar

BUILDERS: dict[str, Callable[..., nn.Module]] = {"lenet5": lenet5, "small_cnn": small_cnn,
                                                 "vgg16_bn_cifar": vgg16_bn_cifar}

# torchvision builders whose auxiliary heads only exist in training mode; a continual learner needs none
_NO_AUX = {"googlenet", "inception_v3"}


class BuilderError(UserError, TypeError):
    """A model builder that does not return an nn.Module (a user's `package.module:callable`)."""


def build_backbone(builder: str, num_classes: int, kwargs: dict | None = None,
                   code_dir: Optional[str] = None) -> nn.Module:
    """Instantiate a backbone with `num_classes` outputs (the head is replaced per task later).  A `module:callable`
    builder is the user's code, its module looked for in `code_dir` first (grownfx.usercode)."""
    kwargs = dict(kwargs or {})
    if builder in BUILDERS:
        return BUILDERS[builder](num_classes=num_classes, **kwargs)
    if is_user_code(builder):
        fn = import_callable(builder, code_dir, what="model.builder")
        model = fn(num_classes=num_classes, **kwargs)
        if not isinstance(model, nn.Module):
            hint = " (return the model alone, not a tuple)" if isinstance(model, tuple) else ""
            raise BuilderError(f"model builder {builder!r} returned a {type(model).__name__}, not a "
                               f"torch.nn.Module{hint}")
        return model
    import torchvision

    if builder not in torchvision.models.list_models(module=torchvision.models):
        raise ValueError(f"unknown model builder {builder!r}")
    if builder in _NO_AUX:
        kwargs.setdefault("aux_logits", False)
        kwargs.setdefault("init_weights", True)
    return torchvision.models.get_model(builder, weights=None, num_classes=num_classes, **kwargs)


def build_pretrained(builder: str, num_classes: Optional[int], kwargs: dict | None, code_dir: Optional[str],
                     weights: str, sha256: Optional[str] = None) -> tuple[nn.Module, Optional[int]]:
    """The backbone with the weights `weights` names (grownfx.models.pretrained), checked against `sha256` or the
    file's `.sha256` (always: a recipe loaded with --no-verify carries the hash it was loaded with).

    `num_classes` None: the model is built with the file's own classifier (its classes returned), for a method
    that keeps the pretrained network as a task; a number: the classifier is left fresh with that many classes
    (returned as None).  A file without a classifier gives a model with `num_classes or 1` fresh classes."""
    try:
        path, _ = P.check_weights_file(weights, sha256, verify=True)
        state = P.read_state_dict(path)
        axes = P.class_axes(lambda k: build_backbone(builder, k, kwargs, code_dir))
        classes = P.file_classes(state, axes, path)
        keep = num_classes is None and classes is not None
        model = build_backbone(builder, classes if keep else (num_classes or 1), kwargs, code_dir)
        P.load_weights(model, state, axes, path, head=keep)
    except P.WeightsError as exc:
        raise P.WeightsError(f"model.weights: {exc}") from None
    return model, classes if keep else None


__all__ = ["BUILDERS", "BuilderError", "LeNet5", "SmallCNN", "VGGCifar", "build_backbone", "build_pretrained", "lenet5", "small_cnn", "vgg16_bn_cifar"]
