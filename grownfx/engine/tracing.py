"""Step 1 of the pipeline: trace a backbone into a torch.fx graph and give every node its shape.

trace -> couple -> rewrite -> mask/grow -> export.  This module knows nothing about channels; it only
produces a `GraphModule` whose nodes carry `meta["tensor_meta"]` from shape propagation on an example input.
"""

from __future__ import annotations

import contextlib
import copy
import fnmatch
import functools
import inspect
import io
from typing import Callable, Iterable, Sequence

import torch
import torch.nn.functional as F
from torch import fx, nn
from torch.fx.passes.shape_prop import ShapeProp

from grownfx.engine import registry
from grownfx.engine.errors import ModelCheckError
from grownfx.engine.faithful import FaithfulProxy, functionalize_augmented, functions_kept_whole, has_hooks
from grownfx.engine.modes import differing_scopes, flag_positions, install_flags, root_difference, select_output
from grownfx.errors import UserError


class TraceError(UserError, RuntimeError):
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
    """`fx.Tracer` with extra leaf modules (by type, or by qualified-name glob `layer4.*.attn`) that records what
    eager PyTorch runs (`engine/faithful.py`): augmented assignments in place, custom autograd Functions whole,
    modules with forward hooks as leaves."""

    record_inplace = True  # class switches, so that tests can show what the differential check catches without
    keep_functions = True  # them
    both_modes = True

    def __init__(self, leaf_modules: Sequence[str | type] = ()):
        super().__init__(autowrap_functions=registry.wrapped_functions())  # registered functions stay one node
        self.leaf_types = (_default_leaf_types() + registry.leaf_types()
                           + tuple(m for m in leaf_modules if isinstance(m, type)))
        self.leaf_globs = tuple(m for m in leaf_modules if isinstance(m, str))

    def trace(self, root, concrete_args=None):
        if isinstance(root, nn.Module):
            for m in root.modules():  # probe layer subclasses now: a probe run while fx traces would be recorded
                layer_kind(m)
                traced_forward(m)
        with functions_kept_whole(self, self.keep_functions):
            return super().trace(root, concrete_args)

    def proxy(self, node: fx.Node) -> fx.Proxy:
        return FaithfulProxy(node, self) if self.record_inplace else super().proxy(node)

    def call_module(self, m: nn.Module, forward, args, kwargs):
        fn = traced_forward(m)
        if fn is not None:  # a forward that branches on a shape, traced as its shape-free equivalent
            forward = functools.partial(fn, m)
        return super().call_module(m, forward, args, kwargs)

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        if isinstance(m, self.leaf_types) or has_hooks(m):
            return True
        if any(fnmatch.fnmatchcase(qualname, g) for g in self.leaf_globs):
            return True
        if is_norm_subclass(m) or layer_kind(m) in ("plain", "std") or head_attention_kind(m) is not None:
            return True  # timm's BatchNormAct2d, Conv2dSame, StdConv2d, Linear: analysed and rewritten as layers
        return super().is_leaf_module(m, qualname)


# --- modules whose forward branches on a shape, traced as a shape-free equivalent --------------------------------

def pool_to_min_size(x: torch.Tensor, size: int) -> torch.Tensor:
    """Average-pool the last two axes up to `size` x `size` where they are smaller (timm's VGG ConvMlp keeps its 7x7
    conv's input at least 7x7), the identity elsewhere.  One graph node (`fx.wrap`): the branch reads the input's
    shape when the graph runs, so the graph is right for every input size; the coupling analysis treats it as
    pooling (channels pass unchanged)."""
    h, w = x.shape[-2], x.shape[-1]
    if h < size or w < size:
        x = F.adaptive_avg_pool2d(x, (max(size, h), max(size, w)))
    return x


fx.wrap("pool_to_min_size")


def _timm_vgg_conv_mlp(m: nn.Module, x):
    """timm's VGG `ConvMlp.forward` with its shape test moved into `pool_to_min_size`: fc1 and fc2 are seen."""
    x = pool_to_min_size(x, m.input_kernel_size)
    return m.act2(m.fc2(m.drop(m.act1(m.fc1(x)))))


_TRACED_FORWARDS: dict[tuple[str, str], Callable] = {("timm.models.vgg", "ConvMlp"): _timm_vgg_conv_mlp}


def traced_forward(m: nn.Module) -> Callable | None:
    """The traceable equivalent `fn(module, x)` of a known module's forward that fx cannot trace (control flow on a
    shape), or None.  It is used only if it computes what the module's own forward computes on inputs on both sides
    of the branch (probed once per class, `_probe_forward`): a library version whose forward differs stays
    untraceable (an automatic leaf, its channels fixed) rather than being traced wrong."""
    fn = _TRACED_FORWARDS.get((type(m).__module__, type(m).__name__))
    if fn is None:
        return None
    return fn if registry.probed(("traced_forward", type(m)), lambda: _probe_forward(m, fn)) else None


def _probe_forward(m: nn.Module, fn: Callable) -> bool:
    was_training = m.training
    try:
        k, c = int(m.input_kernel_size), int(m.fc1.in_channels)
        p = next(m.parameters())
        g = torch.Generator(device=p.device).manual_seed(0)
        m.eval()
        with torch.no_grad():
            for hw in ((1, 1), (max(k - 1, 1), k + 1), (k + 1, max(k - 1, 1)), (k, k + 1)):
                x = torch.randn(1, c, *hw, generator=g, dtype=p.dtype, device=p.device)
                a, b = m(x.clone()), fn(m, x.clone())
                if a.shape != b.shape or not torch.allclose(a, b, rtol=1e-5, atol=1e-6):
                    return False
    except Exception:  # noqa: BLE001 - a module we cannot probe is one we do not understand
        return False
    finally:
        m.train(was_training)
    return True


# --- subclasses of the standard layers (timm and others) -----------------------------------------------------

_NORM_BASES = (nn.modules.batchnorm._BatchNorm, nn.GroupNorm, nn.modules.instancenorm._InstanceNorm)
_LAYER_TYPES = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)


def is_norm_subclass(m: nn.Module) -> bool:
    """A per-channel norm outside torch.nn that subclasses one (timm's BatchNormAct2d, GroupNormAct: norm, then an
    elementwise activation).  Kept a leaf, it is a norm to the analysis and a per-task copy after rewriting;
    traced through, its functional `batch_norm` would hide the per-channel statistics and fix the group.
    A LayerNorm subclass (torchvision's and timm's LayerNorm2d, timm's LayerNorm) is kept a leaf too: the
    analysis finds the axis it normalises with `layer_norm_axis`."""
    return isinstance(m, _NORM_BASES + (nn.LayerNorm,)) and not type(m).__module__.startswith("torch.")


def head_attention_kind(m: nn.Module) -> str | None:
    """An attention module that grows by whole heads when kept a leaf (coupling `head_attention`,
    engine/attention.py), or None:

    * 'swin': torchvision's `ShiftedWindowAttention` (v1; its qkv and proj Linear, a relative position bias
      table with one column per head);
    * 'timm': timm's `Attention` without a gate or q/k/scale norms (ViT, DeiT): qkv and proj Linear, no other
      parameter."""
    cls = type(m)
    if not all(type(getattr(m, n, None)) is nn.Linear for n in ("qkv", "proj")):
        return None
    if cls.__name__ == "ShiftedWindowAttention" and cls.__module__ == "torchvision.models.swin_transformer":
        return "swin"
    if cls.__name__ == "Attention" and cls.__module__ in ("timm.layers.attention", "timm.models.vision_transformer"):
        plain = all(isinstance(getattr(m, n, None), nn.Identity) for n in ("q_norm", "k_norm", "norm"))
        if plain and getattr(m, "gate", None) is None and hasattr(m, "attn_dim") and \
                {n for n, _ in m.named_parameters()} <= {"qkv.weight", "qkv.bias", "proj.weight", "proj.bias"}:
            return "timm"
    return None


def layer_norm_axis(m: nn.Module, shape: tuple) -> int | None:
    """The one axis a LayerNorm module normalises on an input of `shape` (None: several axes, or a subclass that
    computes something else than a layer norm over one axis, e.g. a norm followed by an activation).

    nn.LayerNorm with a 1-d `normalized_shape` normalises the last axis; a subclass (LayerNorm2d permutes NCHW to
    NHWC around `F.layer_norm`) is probed once per (type, rank, channel position): its output on a random input
    must equal `F.layer_norm` over the candidate axis with its own weight, bias and eps."""
    if not isinstance(m, nn.LayerNorm) or len(m.normalized_shape) != 1 or not shape:
        return None
    c = m.normalized_shape[0]
    if type(m) is nn.LayerNorm:
        return len(shape) - 1 if shape[-1] == c else None
    return registry.probed(("layer_norm_axis", type(m), tuple(shape[1:]), c), lambda: _probe_ln_axis(m, shape, c))


def _probe_ln_axis(m: nn.LayerNorm, shape: tuple, c: int) -> int | None:
    g = torch.Generator().manual_seed(0)
    x = torch.randn((1,) + tuple(shape[1:]), generator=g, dtype=torch.float64)
    probe = copy.deepcopy(m).double().eval()
    with torch.no_grad():
        if probe.weight is not None:
            probe.weight.copy_(torch.rand(c, generator=g, dtype=torch.float64) + 0.5)
        if probe.bias is not None:
            probe.bias.copy_(torch.randn(c, generator=g, dtype=torch.float64))
        try:
            out = probe(x)
        except Exception:  # noqa: BLE001 - a subclass that cannot run alone is not a plain layer norm
            return None
        for axis in [len(shape) - 1] + [a for a in range(1, len(shape) - 1)]:
            if shape[axis] != c:
                continue
            ref = nn.functional.layer_norm(x.movedim(axis, -1), (c,), probe.weight, probe.bias, probe.eps)
            if out.shape == x.shape and torch.allclose(out, ref.movedim(-1, axis), atol=1e-9):
                return axis
    return None


_GN_CACHE: dict[tuple, bool] = {}


def is_plain_group_norm(m: nn.Module, shape: tuple) -> bool:
    """A GroupNorm that computes `F.group_norm` with its own weight, bias and eps and nothing else (a subclass with
    an activation after the norm does not): probed once per (type, shape) on a random input."""
    if type(m) is nn.GroupNorm:
        return True
    key = (type(m), tuple(shape[1:]), m.num_groups)
    if key not in _GN_CACHE:
        g = torch.Generator().manual_seed(0)
        x = torch.randn((1,) + tuple(shape[1:]), generator=g, dtype=torch.float64)
        probe = copy.deepcopy(m).double().eval()
        try:
            with torch.no_grad():
                if probe.weight is not None:
                    probe.weight.copy_(torch.rand(probe.weight.shape, generator=g, dtype=torch.float64) + 0.5)
                if probe.bias is not None:
                    probe.bias.copy_(torch.randn(probe.bias.shape, generator=g, dtype=torch.float64))
                ref = F.group_norm(x, m.num_groups, probe.weight, probe.bias, probe.eps)
                _GN_CACHE[key] = bool(torch.allclose(probe(x), ref, atol=1e-9))
        except Exception:  # noqa: BLE001 - a subclass that cannot run alone is not a plain group norm
            _GN_CACHE[key] = False
    return _GN_CACHE[key]


def layer_kind(m: nn.Module) -> str | None:
    """How a conv or linear layer computes from its weight (None for other modules):

    * 'plain': a torch layer, or a subclass that is linear in its weight and has no other parameter (timm's
      Conv2dSame, Linear): masked and grown like the torch layer, its own forward run on the masked weight;
    * 'std': weight standardisation (StdConv2d): each filter is normalised over its inputs, so added input
      columns would change old outputs: its input channels are fixed, its outputs grow;
    * 'other': other parameters or a weight function we cannot follow: traced through, or opaque as a leaf.

    Parameters with one value per output channel (ScaledStdConv2d's `gain`) follow the filters.
    """
    if not isinstance(m, _LAYER_TYPES):
        return None
    if type(m) in _LAYER_TYPES:
        return "plain"
    return registry.probed(("layer_kind", type(m)), lambda: _probe_kind(m))


def out_channel_params(m: nn.Module) -> list[str]:
    """Parameters of a conv/linear subclass besides weight and bias with one value per output channel
    (ScaledStdConv2d's `gain`): they are resized and copied per task like the bias."""
    out = getattr(m, "out_channels", getattr(m, "out_features", None))
    return [n for n, p in m.named_parameters(recurse=False)
            if n not in ("weight", "bias") and p.dim() >= 1 and p.shape[0] == out and p.numel() == out]


def _probe_kind(m: nn.Module) -> str:
    extra = {n for n, _ in m.named_parameters()} - {"weight", "bias"} - set(out_channel_params(m))
    if extra or any(True for _ in m.children()):
        return "other"
    try:
        t = bare_layer(m)
        w = m.weight.detach()
        if isinstance(m, nn.Linear):
            x = torch.randn(2, m.in_features, dtype=w.dtype, device=w.device)
        else:
            k = [int(a) * int(b) + 3 for a, b in zip(m.kernel_size, m.dilation)]
            x = torch.randn(1, m.in_channels, *k, dtype=w.dtype, device=w.device)
        g = torch.Generator(device=w.device).manual_seed(0)
        w1 = torch.randn(w.shape, generator=g, dtype=w.dtype, device=w.device)
        w2 = torch.randn(w.shape, generator=g, dtype=w.dtype, device=w.device)
        with torch.no_grad():
            f = lambda v: call_with_weight(t, x, v, None)  # noqa: E731
            a, b, ab, a2 = f(w1), f(w2), f(w1 + w2), f(2 * w1)
        linear = torch.allclose(ab, a + b, rtol=1e-4, atol=1e-4) and torch.allclose(a2, 2 * a, rtol=1e-4, atol=1e-4)
    except Exception:  # noqa: BLE001 - a layer we cannot probe is one we do not understand
        return "other"
    if linear:
        return "plain"
    return "std" if "std" in type(m).__name__.lower() else "other"


def bare_layer(m: nn.Module) -> nn.Module:
    """A copy of a conv/linear layer without its weight and bias, to run its own forward on other tensors."""
    t = copy.copy(m)
    t._parameters = {k: v for k, v in m._parameters.items() if k not in ("weight", "bias")}
    t._buffers = dict(m._buffers)
    t._modules = dict(m._modules)
    return t


def call_with_weight(bare: nn.Module, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                     groups: int | None = None, extra: dict | None = None) -> torch.Tensor:
    """Run a bare layer's forward on `x` with `weight`/`bias` in place of its own (and `groups` for a conv, and
    `extra` tensors for its per-output-channel parameters)."""
    d = bare.__dict__
    d["weight"], d["bias"] = weight, bias
    d.update(extra or {})
    if groups is not None:
        d["groups"] = groups
    if "out_channels" in d:  # widths follow the weight (StdConv2d reshapes by self.out_channels)
        d["out_channels"], d["in_channels"] = weight.shape[0], weight.shape[1] * d.get("groups", 1)
    elif "out_features" in d:
        d["out_features"], d["in_features"] = weight.shape[0], weight.shape[1]
    try:
        return bare(x)
    finally:
        del d["weight"], d["bias"]
        for k in extra or {}:
            del d[k]


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
    auto_leaves: bool = False,
    output: int | str | None = None,
) -> fx.GraphModule:
    """Trace `model` in train and in eval mode into one graph that behaves like the model in both
    (`engine/modes.py`), reduce its output to the logits (`output` selects them from a tuple or dict), and
    propagate shapes.

    Raises `TraceError` naming the module or node when fx cannot trace the model or the traced graph
    cannot run on `example_input`; declare such modules as `leaf_modules` to keep them opaque.  With
    `auto_leaves`, a submodule fx cannot trace (control flow on a shape) is made a leaf
    and tracing is retried; the graph module's `auto_leaves` lists them (opaque: their channels stay fixed).
    Submodules whose forward differs between train and eval mode are made leaves (`mode_leaves`); a model whose
    own forward does is refused (`ModelCheckError`).
    """
    if not isinstance(example_input, torch.Tensor):
        raise TraceError(f"example_input must be a tensor, got {type(example_input).__name__}")
    was_training = model.training
    leaves = tuple(leaf_modules)
    auto: list[str] = []
    mode_leaves: list[str] = []
    try:
        for _ in range(64):
            gm = _trace_in_mode(model, leaves + tuple(mode_leaves), auto, auto_leaves, False, output)
            if not GrownTracer.both_modes:
                break
            try:
                train_gm = _trace_in_mode(model, leaves + tuple(mode_leaves), auto, auto_leaves, True, output)
            except _ModeTraceFailure as failure:  # fx traces this module in eval mode only
                mode_leaves.append(failure.where)
                continue
            flags = flag_positions(train_gm, gm)
            if flags is not None:
                gm.mode_flags = install_flags(gm, flags)
                break
            scopes = [s for s in differing_scopes(train_gm, gm) if s]
            if not scopes:
                raise ModelCheckError(
                    f"the forward of {type(model).__name__} itself computes differently in train and eval mode "
                    f"({root_difference(train_gm, gm)}): the graph could keep only one of them. Move the code that "
                    "depends on `self.training` into a submodule (grownfx keeps such a submodule whole), or make it "
                    "the same in both modes")
            mode_leaves.extend(s for s in scopes if s not in mode_leaves)
        else:  # pragma: no cover - every round makes at least one more module a leaf
            raise ModelCheckError(f"{type(model).__name__}: train and eval graphs still differ after 64 rounds")
    finally:
        model.train(was_training)
    gm.auto_leaves = auto
    gm.mode_leaves = mode_leaves
    gm.mode_flags = getattr(gm, "mode_flags", [])
    gm.eval()
    propagate_shapes(gm, example_input)
    gm.inplace_kept = functionalize_augmented(gm) if GrownTracer.record_inplace else []
    return gm


def _optional_arguments(model: nn.Module) -> dict:
    """The forward's optional arguments after the input (`forward(x, mask=None)`), at their defaults: prepare calls
    the model with the input alone, and traced as inputs they would take branches (`if mask is not None`) that
    the call never takes."""
    try:
        params = list(inspect.signature(model.forward).parameters.values())
    except (TypeError, ValueError):
        return {}
    kinds = (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
    return {p.name: p.default for p in params[1:] if p.kind in kinds and p.default is not inspect.Parameter.empty}


class _ModeTraceFailure(Exception):
    def __init__(self, where: str):
        super().__init__(where)
        self.where = where


def _trace_in_mode(model: nn.Module, leaves: tuple, auto: list[str], auto_leaves: bool, training: bool,
                   output) -> fx.GraphModule:
    """One trace of `model` in train or eval mode, its output reduced to the logits.  `auto` collects the modules
    made leaves by `auto_leaves`; a failure in train mode only, inside a submodule, is `_ModeTraceFailure`."""
    model.train(training)
    concrete = _optional_arguments(model)
    try:
        while True:
            tracer = GrownTracer(leaves + tuple(auto))
            try:
                graph = tracer.trace(model, concrete_args=concrete or None)
                break
            except Exception as exc:
                where = _innermost_module(exc, model)
                if training and where not in (None, "<root>"):
                    raise _ModeTraceFailure(where) from exc
                if not auto_leaves or where in (None, "<root>") or where in auto or len(auto) >= 64:
                    raise
                auto.append(where)
    except _ModeTraceFailure:
        raise
    except Exception as exc:  # fx raises many types (TraceError, TypeError from Proxy iteration, ...)
        where = _innermost_module(exc, model)
        mode = " in train mode" if training else ""
        if where == "<root>":  # the model's own forward (timm's CrossViT: a branch on the input's shape)
            raise TraceError(
                f"torch.fx cannot trace {type(model).__name__}'s own forward{mode}: {exc}. The model itself cannot "
                "be a leaf: move the code that branches on a tensor's values or shape into a submodule, which "
                "`leaf_modules=[...]` of `grownfx.prepare` (the recipe field `model.leaf_modules`) or "
                "`auto_leaves=True` then keeps whole."
            ) from exc
        hint = f" in module '{where}'" if where else ""
        raise TraceError(
            f"torch.fx cannot trace {type(model).__name__}{hint}{mode}: {exc}. "
            f"Declare the offending module a leaf to keep it opaque: `leaf_modules=[...]` (module types or "
            f"qualified-name globs) of `grownfx.prepare`/`trace`, or the recipe field `model.leaf_modules`."
        ) from exc
    gm = fx.GraphModule(tracer.root, graph, type(model).__name__)
    select_output(gm, output)
    return gm


def propagate_shapes(gm: fx.GraphModule, example_input: torch.Tensor) -> None:
    """Run ShapeProp; a failure names the graph node (and its module) that could not run.

    Every node also gets `meta["batch_axes"]`: the axes of its output that follow the batch size (found by a
    second propagation with one more example), so that ops we cannot see through never take a batch axis for
    channels, whatever the example's batch size (a GRU's h_n is (layers, batch, hidden))."""
    bigger = _shapes_with_batch(gm, example_input)
    # ShapeProp prints the traceback of a failing node to stderr before re-raising; the TraceError says it all
    with torch.no_grad(), contextlib.redirect_stderr(io.StringIO()):
        try:
            ShapeProp(gm).propagate(example_input)
        except Exception as exc:
            node = _failing_node(exc)
            cause = exc.__cause__ if "ShapeProp error" in str(exc) and exc.__cause__ is not None else exc
            why = (str(cause).strip().splitlines() or [type(cause).__name__])[0]
            raise TraceError(
                f"the traced graph of {gm._get_name()} fails on an input of shape {tuple(example_input.shape)}"
                f"{' at node ' + node if node else ''}: {why}"
            ) from exc
    if bigger is not None:
        for n in gm.graph.nodes:
            a, b = _meta_shapes(n.meta.get("tensor_meta")), bigger.get(n.name)
            if a is not None and b is not None:
                n.meta["batch_axes"] = _diff_axes(a, b)


def _meta_shapes(meta):
    if meta is None:
        return None
    if hasattr(meta, "shape"):
        return tuple(int(s) for s in meta.shape)
    if isinstance(meta, (list, tuple)):
        return [_meta_shapes(m) for m in meta]
    return None


def _diff_axes(a, b):
    """Axes whose size differs between two propagations (per item for a tuple output)."""
    if isinstance(a, tuple) and isinstance(b, tuple):
        return tuple(i for i, (x, y) in enumerate(zip(a, b)) if x != y) if len(a) == len(b) else None
    if isinstance(a, list) and isinstance(b, list) and len(a) == len(b):
        return [_diff_axes(x, y) for x, y in zip(a, b)]
    return None


def _shapes_with_batch(gm: fx.GraphModule, example_input: torch.Tensor) -> dict | None:
    """Node output shapes for the example with one more sample (None when the model refuses that batch)."""
    if example_input.dim() == 0:
        return None
    x = torch.cat([example_input, example_input[:1]])
    try:
        with torch.no_grad(), contextlib.redirect_stderr(io.StringIO()):
            ShapeProp(gm).propagate(x)
    except Exception:  # noqa: BLE001 - the propagation on the example itself reports real failures
        return None
    return {n.name: _meta_shapes(n.meta.get("tensor_meta")) for n in gm.graph.nodes}


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
