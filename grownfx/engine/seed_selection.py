"""Which channels a seed narrower than the backbone keeps in each coupling group.

At random initialisation every channel is alike and the first k are kept (`first`).  From pretrained weights they
are not: `magnitude` keeps the k channels whose producing weights are largest (the L1 filter norm of Li et al.,
"Pruning Filters for Efficient ConvNets", 2017), summed over the layers that produce the group, each layer's
norms divided by their mean so that no layer dominates by its fan-in.  A group without a producer weight whose
first axis is the group alone (only a norm or a literal writes it) keeps its first k, and says so.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import fx

from grownfx.engine.coupling import CouplingResult
from grownfx.engine.surgery import binding_layout

SEED_CHANNELS = ("first", "magnitude")


def channel_scores(gm: fx.GraphModule, coupling: CouplingResult, gid: int) -> Optional[torch.Tensor]:
    """Per channel of group `gid`, the mean-normalised L1 norm of its producing weights summed over producers;
    None when no producer's weight has the group alone on its output axis."""
    total, width = None, coupling.groups[gid].width
    for b in coupling.groups[gid].producers:
        layout = binding_layout(coupling, b)
        if len(layout) != 1 or layout[0][0] != gid or layout[0][1] != 1:  # the output axis is this group alone
            continue
        weight = getattr(gm.get_submodule(b.target), "weight", None)
        if not isinstance(weight, torch.Tensor) or weight.dim() < 1 or weight.shape[0] != width:
            continue
        norms = weight.detach().float().abs().reshape(width, -1).sum(dim=1)
        norms = norms / norms.mean().clamp_min(1e-12)
        total = norms if total is None else total + norms
    return total


def keep_indices(scores: Optional[torch.Tensor], width: int, keep: int, granularity: int) -> torch.Tensor:
    """The `keep` channels (sorted old indices) of the highest-scoring whole blocks of `granularity` channels;
    the first `keep` without scores.  Ties go to the lower index (stable)."""
    if scores is None or keep >= width:
        return torch.arange(min(keep, width))
    blocks = scores.reshape(-1, granularity).sum(dim=1)
    order = sorted(range(blocks.numel()), key=lambda i: (-float(blocks[i]), i))[:keep // granularity]
    chosen = torch.tensor(sorted(order), dtype=torch.long)
    return (chosen[:, None] * granularity + torch.arange(granularity)[None, :]).reshape(-1)
