"""The data the coupling analysis produces: layouts, bindings, coupling groups and the result."""

from __future__ import annotations

from dataclasses import dataclass, field

import networkx as nx
from torch import fx

@dataclass(frozen=True)
class Seg:
    var: int  # dimension variable id (a node of the tie graph)
    width: int  # channels of that variable in this segment
    factor: int = 1  # trailing elements per channel on this axis (flatten -> Linear)


Layout = tuple  # tuple[Seg, ...]


def layout_size(layout: Layout) -> int:
    return sum(s.width * s.factor for s in layout)


@dataclass
class Binding:
    """One place where channels meet a resizable thing: a layer axis, a parameter axis or a graph literal."""

    target: str  # module path, parameter path (role 'param') or node name (role 'literal')
    role: str  # 'in' | 'out' | 'grouped' | 'feat' | 'param' | 'literal' | 'attn' | 'heads' | 'fnout'
    layout: Layout
    axis: int = 0  # parameter axis for role 'param'; arg position for role 'literal'
    node: str = ""  # the graph node that created the binding
    fill: float = 0.0  # role 'param': value of new entries, the identity of the consuming op (1 for mul/div)
    per: int = 1  # role 'heads': channels per attention head (the module's head count and per-head tensors)


@dataclass
class CouplingGroup:
    """Channels that must change width together."""

    id: int
    width: int
    members: list[Binding]
    growable: bool
    granularity: int = 1
    reasons: list[str] = field(default_factory=list)  # why the group is fixed
    vars: frozenset = frozenset()

    @property
    def producers(self) -> list[Binding]:
        return [b for b in self.members if b.role in ("out", "grouped")]

    @property
    def consumers(self) -> list[Binding]:
        return [b for b in self.members if b.role in ("in", "grouped")]

    def describe(self) -> str:
        kind = "growable" if self.growable else f"fixed ({'; '.join(self.reasons[:2])})"
        return f"group {self.id}: width {self.width}, {len(self.members)} members, {kind}"


@dataclass
class CouplingResult:
    gm: fx.GraphModule
    groups: list[CouplingGroup]
    var_group: dict[int, int]
    ties: nx.Graph
    bindings: list[Binding]
    output_vars: set
    output_axes: tuple = ()  # the logits' layout per axis (None: no channels)

    def group_of(self, seg: Seg) -> CouplingGroup:
        return self.groups[self.var_group[seg.var]]

    @property
    def growable(self) -> list[CouplingGroup]:
        return [g for g in self.groups if g.growable]

    def head_targets(self) -> list[str]:
        """Modules that produce the logits: they become one head per task."""
        out = []
        for b in self.bindings:
            if b.role == "out" and any(s.var in self.output_vars or self.var_group[s.var] in self._logit_groups()
                                       for s in b.layout):
                if b.target not in out:
                    out.append(b.target)
        return out

    def head_params(self) -> list[Binding]:
        """Parameters whose rows are the logits (`F.linear(f, self.W, self.b)`: a functional classifier)."""
        logits = self._logit_groups()
        return [b for b in self.bindings if b.role == "fnout" and any(self.var_group[s.var] in logits
                                                                      for s in b.layout)]

    def _logit_groups(self) -> set:
        return {self.var_group[v] for v in self.output_vars}

    def dim_graph(self) -> nx.Graph:
        """The tie graph with readable node labels, for inspection and docs."""
        return nx.relabel_nodes(self.ties, {v: d["label"] for v, d in self.ties.nodes(data=True)}, copy=True)
