"""Registered ops: module types and functions that users declared through `grownfx.engine.registry`.

A mixin of `CouplingAnalysis`, applied before the built-in rules so a registration can also override them.
"""

from __future__ import annotations

from typing import Any

from torch import fx, nn

from grownfx.engine import registry
from grownfx.engine.coupling.layouts import OTHER, Opaque, TVal
from grownfx.engine.faithful import autograd_function_of


class RegisteredOps:
    """Apply a registry rule to a node; `registered_rule` says whether one applies."""

    def registered_rule(self, node: fx.Node) -> tuple[registry.Rule, nn.Module | None] | None:
        if node.op == "call_module":
            m = self.modules[node.target]
            rule = registry.module_rule(m)
            return (rule, m) if rule is not None and rule.kind is not None else None
        if node.op == "call_function":
            rule = registry.function_rule(node.target)
            cls = autograd_function_of(node.target)
            if rule is None and cls is not None:  # a custom autograd Function kept whole: registered as the class
                rule = registry.function_rule(cls) or registry.function_rule(cls.apply)
            return (rule, None) if rule is not None else None
        return None

    def apply_registered(self, node: fx.Node, rule: registry.Rule, module: nn.Module | None) -> Any:
        what = f"module '{node.target}' ({type(module).__name__})" if module is not None else \
            f"'{getattr(node.target, '__name__', node.target)}' at '{node.name}'"
        if callable(rule.kind):
            return rule.kind(self, node, module)
        if rule.kind == "fixed":
            raise Opaque(f"{what}: {rule.reason}")
        x = self.val(node.args[0]) if node.args else OTHER
        if rule.kind == "pass":
            return x if isinstance(x, TVal) else self.elementwise(node)
        if rule.kind == "elementwise":
            return self.elementwise(node)
        if rule.kind == "per_channel":
            if not isinstance(x, TVal) or len(x.shape) < 2:
                raise Opaque(f"{what} takes no (N, C, ...) tensor")
            lay = self.ensure(x, 1, node)
            self.bind(node.target, "feat", lay, node)
            return TVal(x.axes, x.shape, x.origin)
        raise Opaque(f"{what}: unknown registered rule {rule.kind!r}")
