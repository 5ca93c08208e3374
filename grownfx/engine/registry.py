"""Extend the engine without editing it: how a module type or a function maps channels, how a custom layer resizes.

The coupling analysis knows torch's layers and ops.  Anything else it treats as opaque: every channel it touches
is tied together and fixed, with the reason "... is not in the coupling registry" (`grownfx inspect` shows it).
Registering a module type or a function tells the analysis what it does instead:

    import grownfx

    grownfx.register_module(MyActivation, "pass")                 # output channels = input channels
    grownfx.register_module(MyScale, "per_channel", resize=fn)    # per-channel state along axis 1, like a norm
    grownfx.register_function(my_gate, "elementwise")             # broadcasting op over its tensor arguments
    grownfx.register_module(MyAttention, "fixed", reason="mixes channels across heads")

Rules:

    "pass"         the output is the first argument with the same channel layout (activations, dropout)
    "elementwise"  like add/mul: channel axes of the tensor arguments that line up are the same channels
    "per_channel"  one entry of state per channel on axis 1 (a 'feat' binding, like BatchNorm); needs a
                   `resize` function (below): only the module knows which value keeps new channels harmless
    "fixed"        opaque on purpose: every channel it touches is fixed, with `reason`
    a callable     `rule(analysis, node, module)` returning the output value, for experts: it may call
                   `analysis.val(arg)`, `analysis.tie(a, b, where)`, `analysis.fix(layout, reason)`,
                   `analysis.bind(target, role, layout, node)` (see coupling/rules.py)

A resize function `resize(module, role, src, generator)` applies an index map to a module in place: `src[j]`
is the old channel that new channel `j` comes from, or -1 for a channel added now, which must get a value that
keeps the network's function (`grownfx.remap(tensor, axis, src, fill)` does the copying).  Registered module
types are kept as leaves by the tracer (timm's `register_notrace_module`); registered functions are kept as
single graph nodes (`torch.fx.wrap`), so neither has to be traceable.

Where the declarations live: one `CouplingRegistry` object, `DEFAULT_REGISTRY`, the engine's only process-wide
state (tests/test_layering.py refuses any other).  A layer type is declared once per process, before nets are
prepared, like torch.fx.wrap and timm's register_notrace_module, so the declarations are process-wide on purpose;
they decide how a net is analysed when it is prepared and nothing about a net afterwards.  The registry also
remembers what probing a class found (whether a conv subclass is linear in its weight, which axis a LayerNorm
subclass normalises): a fact about the class's code, the same for every net; `forget_probes()` drops them
(after editing a class's code at run time), and every registration does too.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

RULES = ("pass", "elementwise", "per_channel", "fixed")


@dataclass(frozen=True)
class Rule:
    kind: str | Callable | None  # one of RULES, a custom rule(analysis, node, module), or None (resize only)
    reason: str = ""  # for "fixed"
    resize: Callable | None = None  # resize(module, role, src, generator)
    leaf: bool = True


def _check(rule, reason: str | None) -> None:
    if not (callable(rule) or rule in RULES):
        raise ValueError(f"rule must be one of {RULES} or a callable, got {rule!r}")
    if rule == "fixed" and not reason:
        raise ValueError("a 'fixed' rule needs a reason (grownfx inspect shows it)")


class CouplingRegistry:
    """Module types and functions declared by users, and what probing a class found (module docstring)."""

    def __init__(self):
        self._modules: dict[type, Rule] = {}
        self._functions: dict[Any, Rule] = {}
        self._probes: dict[tuple, Any] = {}

    def register_module(self, module_type: type, rule: str | Callable, *, reason: str | None = None,
                        resize: Callable | None = None, leaf: bool = True) -> type:
        if not isinstance(module_type, type):
            raise TypeError(f"module_type must be a class, got {module_type!r}")
        _check(rule, reason)
        if rule == "per_channel" and resize is None:
            raise ValueError("a 'per_channel' module needs resize=fn(module, role, src, generator)")
        self._modules[module_type] = Rule(rule, reason or "", resize, leaf)
        self.forget_probes()
        return module_type

    def register_function(self, fn: Callable, rule: str | Callable, *, reason: str | None = None) -> Callable:
        if not callable(fn):
            raise TypeError(f"fn must be callable, got {fn!r}")
        if rule == "per_channel":
            raise ValueError("'per_channel' applies to modules (it needs state to resize)")
        _check(rule, reason)
        self._functions[fn] = Rule(rule, reason or "", None, True)
        self.forget_probes()
        return fn

    def register_resize(self, module_type: type, resize: Callable) -> None:
        old = self._modules.get(module_type)
        self._modules[module_type] = Rule(old.kind if old else None, old.reason if old else "", resize,
                                          old.leaf if old else False)
        self.forget_probes()

    def unregister(self, key: type | Callable) -> None:
        self._modules.pop(key, None)
        self._functions.pop(key, None)
        self.forget_probes()

    def module_rule(self, module: Any) -> Rule | None:
        for cls in type(module).__mro__:
            rule = self._modules.get(cls)
            if rule is not None:
                return rule
        return None

    def function_rule(self, fn: Any) -> Rule | None:
        try:
            return self._functions.get(fn)
        except TypeError:  # unhashable target
            return None

    def leaf_types(self) -> tuple[type, ...]:
        return tuple(t for t, r in self._modules.items() if r.leaf)

    def wrapped_functions(self) -> tuple[Callable, ...]:
        return tuple(f for f in self._functions if callable(f) and hasattr(f, "__globals__"))

    def probed(self, key: tuple, probe: Callable[[], Any]) -> Any:
        """What `probe()` found about a class, `key` naming the class and the question; probed once."""
        if key not in self._probes:
            self._probes[key] = probe()
        return self._probes[key]

    def forget_probes(self) -> None:
        self._probes.clear()


DEFAULT_REGISTRY = CouplingRegistry()


def register_module(module_type: type, rule: str | Callable, *, reason: str | None = None,
                    resize: Callable | None = None, leaf: bool = True) -> type:
    """Declare how modules of `module_type` (and its subclasses) map channels; returns the type.  With
    `leaf=False` fx traces through the module instead of keeping it one node (its rule then never applies;
    only `resize` is used, when another rule binds the module)."""
    return DEFAULT_REGISTRY.register_module(module_type, rule, reason=reason, resize=resize, leaf=leaf)


def register_function(fn: Callable, rule: str | Callable, *, reason: str | None = None) -> Callable:
    """Declare how calls of `fn` map channels; the tracer keeps each call a single node."""
    return DEFAULT_REGISTRY.register_function(fn, rule, reason=reason)


def register_resize(module_type: type, resize: Callable) -> None:
    """How to resize a custom layer in place: `resize(module, role, src, generator)`; the built-in rules still
    decide how it maps channels (e.g. a subclass of a torch layer) unless `register_module` gave a rule."""
    DEFAULT_REGISTRY.register_resize(module_type, resize)


def unregister(key: type | Callable) -> None:
    """Forget a registered module type or function."""
    DEFAULT_REGISTRY.unregister(key)


def module_rule(module: Any) -> Rule | None:
    return DEFAULT_REGISTRY.module_rule(module)


def function_rule(fn: Any) -> Rule | None:
    return DEFAULT_REGISTRY.function_rule(fn)


def leaf_types() -> tuple[type, ...]:
    return DEFAULT_REGISTRY.leaf_types()


def wrapped_functions() -> tuple[Callable, ...]:
    return DEFAULT_REGISTRY.wrapped_functions()


def probed(key: tuple, probe: Callable[[], Any]) -> Any:
    """`DEFAULT_REGISTRY.probed`: what probing a class found, probed once per process (see the module docstring)."""
    return DEFAULT_REGISTRY.probed(key, probe)


__all__ = ["DEFAULT_REGISTRY", "RULES", "CouplingRegistry", "Rule", "function_rule", "leaf_types", "module_rule",
           "probed", "register_function", "register_module", "register_resize", "unregister", "wrapped_functions"]
