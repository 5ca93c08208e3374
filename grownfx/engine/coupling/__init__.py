"""Step 2: channel-coupling analysis over a traced, shape-propagated graph.

Every tensor axis that carries channels gets a *layout*: an ordered list of segments, each naming a channel
*dimension variable* (created by a producing layer, a parameter, the input, or an op we cannot see through)
and a factor (`flatten` folds spatial positions into the channel axis: index = channel * factor + position).
Ops tie dimension variables together (a residual add, a depthwise conv, a norm, a squeeze-excitation
multiply); the connected components of that tie graph (networkx) are the coupling groups.

A group is growable only when every place its channels appear is understood exactly: whole segments in
natural order, consumed by conv/linear layers, normalised per channel.  Anything else (LayerNorm across
channels, channel shuffle, attention heads, an op not in the registry) ties every channel it touches into a
group marked fixed, with the reason.  Fixed groups are never resized, so conservatism is always safe.
"""

from __future__ import annotations

from torch import fx

from grownfx.engine.coupling.rules import CouplingAnalysis
from grownfx.engine.coupling.types import Binding, CouplingGroup, CouplingResult, Layout, Seg, layout_size


def analyze(gm: fx.GraphModule) -> CouplingResult:
    """Find the coupling groups of a traced, shape-propagated GraphModule."""
    return CouplingAnalysis(gm).run()


__all__ = ["Binding", "CouplingAnalysis", "CouplingGroup", "CouplingResult", "Layout", "Seg", "analyze", "layout_size"]
