"""Tracing that keeps what the model computes: in-place updates, custom autograd Functions, module hooks.

torch.fx's tracer reads three things differently from what eager PyTorch runs:

* `z += y` on a Proxy falls back to `z = z + y` (fx proxies have no in-place operators): a tensor that aliased z
  (`identity = z`) keeps its old value in the graph, while in eager it sees the update.  `FaithfulProxy` records
  `operator.iadd(z, y)`, which runs in place like eager; `functionalize_augmented` turns it back into `add` where
  nothing else can see the difference (the updated tensor is fresh and read by nothing else), so ordinary
  `out += identity` graphs stay out-of-place.
* `MyFunction.apply(x)` is inlined: its forward's ops are recorded, its hand-written backward is lost (a
  straight-through estimator gets the gradient of the op it bypasses).  While tracing, `Function.apply` records one
  call of the whole Function (`autograd_function_call(cls)`), which runs `cls.apply` when the graph runs; the
  coupling analysis treats it as opaque (its channels fixed) unless it is registered
  (`grownfx.register_function(MyFunction, "pass")`).
* a module's forward hooks do not run when fx traces through the module: modules with hooks are kept leaves, so
  that calling them runs the hooks.

The differential check (`engine/selfcheck.py`) compares the result with the eager model, whatever the cause.
"""

from __future__ import annotations

import contextlib
import operator
from typing import Any, Callable

import torch
from torch import fx, nn

# augmented assignment -> (in-place operator, out-of-place operator)
INPLACE_OPS: dict[str, tuple[Callable, Callable]] = {
    "add": (operator.iadd, operator.add), "sub": (operator.isub, operator.sub), "mul": (operator.imul, operator.mul),
    "truediv": (operator.itruediv, operator.truediv), "floordiv": (operator.ifloordiv, operator.floordiv),
    "mod": (operator.imod, operator.mod), "pow": (operator.ipow, operator.pow),
    "matmul": (operator.imatmul, operator.matmul), "and": (operator.iand, operator.and_),
    "or": (operator.ior, operator.or_), "xor": (operator.ixor, operator.xor),
    "lshift": (operator.ilshift, operator.lshift), "rshift": (operator.irshift, operator.rshift),
}
_OUT_OF_PLACE = {inplace: out for inplace, out in INPLACE_OPS.values()}


def _inplace_method(name: str, op: Callable):
    def method(self, other):
        return self.tracer.create_proxy("call_function", op, (self, other), {})

    method.__name__ = f"__i{name}__"
    return method


class FaithfulProxy(fx.Proxy):
    """An fx Proxy whose augmented assignments (`+=`, `*=`, ...) are recorded as the in-place operators they are."""


for _name, (_inplace, _) in INPLACE_OPS.items():
    setattr(FaithfulProxy, f"__i{_name}__", _inplace_method(_name, _inplace))


# --- custom autograd Functions ------------------------------------------------------------------------------

_FUNCTION_CALLS: dict[type, Callable] = {}


def autograd_function_call(cls: type) -> Callable:
    """The graph target for `cls.apply`: a plain function (fx writes it into the generated code) that calls the
    Function when the graph runs.  One per class; `autograd_function_of(target)` gives the class back."""
    fn = _FUNCTION_CALLS.get(cls)
    if fn is None:
        def fn(*args, **kwargs):
            return cls.apply(*args, **kwargs)

        fn.__name__ = fn.__qualname__ = f"{cls.__name__}_apply"
        fn.__module__ = __name__
        fn.autograd_function = cls
        _FUNCTION_CALLS[cls] = fn
    return fn


def autograd_function_of(target: Any) -> type | None:
    """The autograd Function class a graph node calls, or None."""
    return getattr(target, "autograd_function", None)


def _has_proxy(a: Any) -> bool:
    if isinstance(a, fx.Proxy):
        return True
    if isinstance(a, (list, tuple)):
        return any(_has_proxy(x) for x in a)
    if isinstance(a, dict):
        return any(_has_proxy(x) for x in a.values())
    return False


@contextlib.contextmanager
def functions_kept_whole(tracer: fx.Tracer, enabled: bool = True):
    """While tracing, `SomeFunction.apply(proxy)` records one node instead of running the Function's forward."""
    if not enabled:
        yield
        return
    base = torch.autograd.Function
    original = base.__dict__["apply"]

    def apply(cls, *args, **kwargs):
        if _has_proxy(args) or _has_proxy(kwargs):
            return tracer.create_proxy("call_function", autograd_function_call(cls), args, kwargs)
        return original.__get__(None, cls)(*args, **kwargs)

    base.apply = classmethod(apply)
    try:
        yield
    finally:
        base.apply = original


# --- in-place updates -----------------------------------------------------------------------------------------

# ops whose output may share storage with an input (views, no-op conversions) or is an input updated in place
_MAY_ALIAS = {
    "view", "reshape", "flatten", "unflatten", "squeeze", "unsqueeze", "permute", "transpose", "t", "expand",
    "expand_as", "narrow", "select", "getitem", "chunk", "split", "unbind", "split_with_sizes", "tensor_split",
    "view_as", "reshape_as", "contiguous", "to", "type", "type_as", "float", "half", "double", "bfloat16", "detach",
    "as_strided", "movedim", "moveaxis", "swapaxes", "swapdims", "diagonal", "real", "imag", "unfold", "ravel",
    "dropout", "alpha_dropout", "feature_alpha_dropout", "dropout1d", "dropout2d", "dropout3d", "identity",
    "requires_grad_", "cpu", "cuda", "data", "T", "mT", "H",
}
_ALIASING_MODULES = (nn.Identity, nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, nn.AlphaDropout,
                     nn.FeatureAlphaDropout, nn.Flatten, nn.Unflatten)


def is_inplace_op(node: fx.Node, modules: dict[str, nn.Module] | None = None) -> bool:
    """The node updates one of its inputs in place (`x += y`, `x.add_(y)`, `relu(x, inplace=True)`,
    `x[i] = v`)."""
    if node.op == "call_module":
        m = (modules or {}).get(node.target)
        return bool(getattr(m, "inplace", False))
    if node.op not in ("call_function", "call_method"):
        return False
    if node.target in _OUT_OF_PLACE or node.target is operator.setitem or node.kwargs.get("inplace") is True:
        return True
    name = node.target if isinstance(node.target, str) else getattr(node.target, "__name__", "")
    return name.endswith("_") and not name.endswith("__")


def _fresh(node: fx.Node, modules: dict[str, nn.Module]) -> bool:
    """The node's output is a tensor no other node shares storage with (a conv's output, a sum), as far as its op
    tells; anything that may return an input (a view, an identity, an in-place op, a user module) is not."""
    if is_inplace_op(node, modules):
        return False
    if node.op == "call_module":
        m = modules.get(node.target)
        return (m is not None and type(m).__module__.startswith("torch.nn.") and not isinstance(m, _ALIASING_MODULES))
    if node.op in ("call_function", "call_method"):
        name = node.target if isinstance(node.target, str) else getattr(node.target, "__name__", "")
        return name not in _MAY_ALIAS and autograd_function_of(node.target) is None
    return False  # placeholders (the caller's input), get_attr (the model's own tensors)


def functionalize_augmented(gm: fx.GraphModule) -> list[str]:
    """Turn each recorded augmented assignment (`operator.iadd(a, b)`) into its out-of-place op where that computes
    the same values: `a` is not a tensor (a number), or it is a fresh tensor read by nothing but this update.
    Returns the names of the in-place updates kept (their inputs are aliased: the graph keeps eager's semantics)."""
    modules = dict(gm.named_modules())
    kept = []
    for node in gm.graph.nodes:
        if node.op != "call_function" or node.target not in _OUT_OF_PLACE or not node.args:
            continue
        a = node.args[0]
        meta = a.meta.get("tensor_meta") if isinstance(a, fx.Node) else None
        is_tensor = meta is not None and hasattr(meta, "shape")
        if not is_tensor or (len(a.users) == 1 and _fresh(a, modules)):
            node.target = _OUT_OF_PLACE[node.target]
        else:
            kept.append(node.name)
    gm.recompile()
    return kept


def has_hooks(m: nn.Module) -> bool:
    """Forward hooks run only when the module is called: fx, tracing through its forward, would drop them."""
    return bool(m._forward_hooks or m._forward_pre_hooks)
