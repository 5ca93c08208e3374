"""One shared backbone, one head per task: the classifier layer of the traced network replaced by `MultiHead`.

Fine-tune, EWC, SI, MAS, LwF and experience replay share this layout.  LwF and replay also need earlier tasks'
outputs on features the backbone computed once; `head_tail` cuts the traced network after the backbone, so that
those outputs go through the head *and* whatever the network does after it (a ReLU, pooling and flatten after
SqueezeNet's conv head), exactly as the full network computes them.
"""

from __future__ import annotations

import contextlib
from typing import Iterator, Optional

import torch
from torch import fx, nn


class MultiHead(nn.Module):
    """Stands in for the classifier layer: one head per task, `task` picks the one that computes.

    With `keep_features` the last input (the backbone's features) is kept in `features` for a method that applies
    other heads to it (`head_tail`); the method reads it right after the forward that set it, and clears it when
    the task is learned (a copy of the network must not carry one forward's graph)."""

    def __init__(self):
        super().__init__()
        self.heads = nn.ModuleList()
        self.task = 0
        self.keep_features = False
        self.features: Optional[torch.Tensor] = None

    def forward(self, x):
        if self.keep_features:
            self.features = x
        return self.heads[self.task](x)

    @contextlib.contextmanager
    def computing(self, task: int) -> Iterator[None]:
        """Head `task` computes inside the block; the one chosen before is restored after it."""
        before, self.task = self.task, task
        try:
            yield
        finally:
            self.task = before


class HeadTailError(ValueError):
    """The network uses something besides the head's output after the head: its tail cannot be cut."""


def head_tail(gm: fx.GraphModule, head_target: str) -> fx.GraphModule:
    """The part of `gm` from its head (`head_target`, a MultiHead) to the output, as a module of the head's input:
    `head_tail(gm, t)(features)` equals `gm(x)` when `features` is what reached the head for `x`.  The tail shares
    `gm`'s modules (the heads, and any layer after them).  HeadTailError when a node after the head reads a value
    computed before it (other than constants), which a cut at the head cannot reproduce."""
    nodes = list(gm.graph.nodes)
    heads = [n for n in nodes if n.op == "call_module" and n.target == head_target]
    if len(heads) != 1 or len(heads[0].all_input_nodes) != 1:
        raise HeadTailError(f"the head {head_target!r} is called {len(heads)} time(s) or with several inputs")
    head = heads[0]
    graph = fx.Graph()
    env: dict[fx.Node, fx.Node] = {head.all_input_nodes[0]: graph.placeholder("features")}
    after: set[fx.Node] = set()

    def read(node: fx.Node) -> fx.Node:
        if node in env:
            return env[node]
        if node.op == "get_attr":  # a constant (a buffer, a parameter) is the same after the cut
            env[node] = graph.node_copy(node)
            return env[node]
        raise HeadTailError(f"{node.name!r}, computed before the head {head_target!r}, is read after it")

    for node in nodes[nodes.index(head):]:
        if node.op == "output":
            graph.output(fx.map_arg(node.args[0], read))
            break
        if node is head or any(a in after for a in node.all_input_nodes):
            env[node] = graph.node_copy(node, read)
            after.add(node)
    return fx.GraphModule(gm, graph)
