"""Step 1 of the pipeline: trace a backbone into a torch.fx graph and give every node its shape.

trace -> couple -> rewrite -> mask/grow -> export.  This module knows nothing about channels; it only
produces a `GraphModule` whose nodes carry `meta["tensor_meta"]` from shape propagation on an example input.
"""

from __future__ import annotations

import fnmatch
from typing import Iterable, Sequence

import torch
from torch import fx, nn
from torch.fx.passes.shape_prop import ShapeProp


class TraceError(RuntimeError):
    """A model that torch.fx cannot trace (or run on the example input), with the module/node named."""


def _default_leaf_types() -> tuple[type, ...]:
    # StochasticDepth reads `self.training` inside its forward: traced through, the train/eval flag would be
    # frozen into the graph as a constant.  Keeping it a leaf keeps `.train()`/`.eval()` meaningful.
    leaves: list[type] = []
    try:
        from torchvision.ops import StochasticDepth

        leaves.append(StochasticDepth)
    except ImportError:  # pragma: no cover - torchvision is a dependency, but keep tracing usable without it
        pass
    return tuple(leaves)


class GrownTracer(fx.Tracer):
    """`fx.Tracer` with extra leaf modules: by type, or by qualified-name glob (`layer4.*.attn`)."""

    def __init__(self, leaf_modules: Sequence[str | type] = ()):
        super().__init__()
        self.leaf_types = _default_leaf_types() + tuple(m for m in leaf_modules if isinstance(m, type))
        self.leaf_globs = tuple(m for m in leaf_modules if isinstance(m, str))

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        if isinstance(m, self.leaf_types):
            return True
        if any(fnmatch.fnmatchcase(qualname, g) for g in self.leaf_globs):
            return True
        return super().is_leaf_module(m, qualname)


def _innermost_module(exc: BaseException, model: nn.Module) -> str | None:
    """Best effort: name the submodule whose forward raised, from the traceback's `self` frames."""
    names = {id(m): n for n, m in model.named_modules()}
    tb = exc.__traceback__
    found = None
    while tb is not None:
        obj = tb.tb_frame.f_locals.get("self")
        if isinstance(obj, nn.Module) and id(obj) in names:
            found = names[id(obj)] or "<root>"
        tb = tb.tb_next
    return found


def trace(
    model: nn.Module,
    example_input: torch.Tensor,
    leaf_modules: Iterable[str | type] = (),
) -> fx.GraphModule:
    """Trace `model` (in eval mode, so train-only branches like auxiliary heads are left out) and propagate shapes.

    Raises `TraceError` naming the module or node when fx cannot trace the model or the traced graph
    cannot run on `example_input`; declare such modules as `leaf_modules` to keep them opaque.
    """
    if not isinstance(example_input, torch.Tensor):
        raise TraceError(f"example_input must be a tensor, got {type(example_input).__name__}")
    was_training = model.training
    model.eval()
    tracer = GrownTracer(tuple(leaf_modules))
    try:
        graph = tracer.trace(model)
    except Exception as exc:  # fx raises many types (TraceError, TypeError from Proxy iteration, ...)
        where = _innermost_module(exc, model)
        hint = f" in module '{where}'" if where else ""
        raise TraceError(
            f"torch.fx cannot trace {type(model).__name__}{hint}: {exc}. "
            f"Declare the offending module as a leaf (recipe field `model.leaf_modules`) to keep it opaque."
        ) from exc
    finally:
        model.train(was_training)
    gm = fx.GraphModule(tracer.root, graph, type(model).__name__)
    gm.eval()
    propagate_shapes(gm, example_input)
    return gm


def propagate_shapes(gm: fx.GraphModule, example_input: torch.Tensor) -> None:
    """Run ShapeProp; a failure names the graph node (and its module) that could not run."""
    with torch.no_grad():
        try:
            ShapeProp(gm).propagate(example_input)
        except Exception as exc:
            node = _failing_node(exc)
            raise TraceError(
                f"the traced graph of {gm._get_name()} fails on an input of shape {tuple(example_input.shape)}"
                f"{' at node ' + node if node else ''}: {exc}"
            ) from exc


def _failing_node(exc: BaseException) -> str | None:
    tb = exc.__traceback__
    node = None
    while tb is not None:
        n = tb.tb_frame.f_locals.get("n")
        if isinstance(n, fx.Node):
            node = f"'{n.name}' ({n.op} {n.target})"
        tb = tb.tb_next
    return node


def tensor_shape(node: fx.Node) -> tuple[int, ...] | None:
    """Shape of a node's tensor output from shape propagation, or None when it is not a single tensor."""
    meta = node.meta.get("tensor_meta")
    if meta is None or not hasattr(meta, "shape"):
        return None
    return tuple(int(s) for s in meta.shape)
