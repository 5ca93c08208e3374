"""Which channels a seed narrower than the backbone keeps in each coupling group.

At random initialisation every channel is alike and the first k are kept (`first`).  From pretrained weights they
are not: `magnitude` keeps the k channels whose producing weights are largest (the L1 filter norm of Li et al.,
"Pruning Filters for Efficient ConvNets", 2017), summed over the layers that produce the group, each layer's
norms divided by their mean so that no layer dominates by its fan-in.  A group without a producer weight whose
first axis is the group alone (only a norm or a literal writes it) keeps its first k, and says so.

`taylor` keeps the k channels of largest first-order Taylor importance on task-1 inputs (Molchanov et al.,
"Pruning Convolutional Neural Networks for Resource Efficient Inference", 2017): per channel |sum over samples
and positions of activation x gradient| at each producer's output, the loss being cross-entropy against the
loaded network's own predictions (task 1's labels name other classes than the loaded classifier's), aggregated
over the group's producers like `magnitude`: the channels whose removal would change the loaded function most
on task 1's inputs.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import fx

from grownfx.engine.coupling import CouplingResult
from grownfx.engine.surgery import binding_layout

SEED_CHANNELS = ("first", "magnitude", "taylor")


def _producers(gm: fx.GraphModule, coupling: CouplingResult, gid: int) -> list[tuple[str, torch.nn.Module]]:
    """The group's producers whose weight has the group alone on its output (first) axis."""
    out, width = [], coupling.groups[gid].width
    for b in coupling.groups[gid].producers:
        layout = binding_layout(coupling, b)
        if len(layout) != 1 or layout[0][0] != gid or layout[0][1] != 1:  # the output axis is this group alone
            continue
        module = gm.get_submodule(b.target)
        weight = getattr(module, "weight", None)
        if isinstance(weight, torch.Tensor) and weight.dim() >= 1 and weight.shape[0] == width:
            out.append((b.target, module))
    return out


def _summed(per_producer: list[torch.Tensor]) -> Optional[torch.Tensor]:
    """Each producer's scores divided by their mean (no layer dominates by its scale), summed."""
    total = None
    for scores in per_producer:
        scores = scores / scores.mean().clamp_min(1e-12)
        total = scores if total is None else total + scores
    return total


def channel_scores(gm: fx.GraphModule, coupling: CouplingResult, gid: int) -> Optional[torch.Tensor]:
    """Per channel of group `gid`, the mean-normalised L1 norm of its producing weights summed over producers;
    None when no producer's weight has the group alone on its output axis."""
    width = coupling.groups[gid].width
    return _summed([m.weight.detach().float().abs().reshape(width, -1).sum(dim=1)
                    for _, m in _producers(gm, coupling, gid)])


def taylor_scores(gm: fx.GraphModule, coupling: CouplingResult, gids, inputs: torch.Tensor) -> dict:
    """{group: per-channel first-order Taylor importance on `inputs`, or None} for the groups `gids` (one forward
    and backward of the full-width graph in evaluation mode; the graph's parameters and mode are left as they
    were)."""
    producers = {gid: _producers(gm, coupling, gid) for gid in gids}
    acts: dict[str, torch.Tensor] = {}

    def keep(name):
        def hook(module, args, output):
            output.retain_grad()
            acts[name] = output
            return output.clone()  # what follows gets a copy: an in-place op after it cannot touch the kept one
        return hook

    handles = [m.register_forward_hook(keep(name)) for ps in producers.values() for name, m in ps]
    was_training = gm.training
    try:
        gm.eval()
        with torch.enable_grad():
            logits = gm(inputs)
            loss = torch.nn.functional.cross_entropy(logits, logits.detach().argmax(1), reduction="sum")
            loss.backward()
    finally:
        for h in handles:
            h.remove()
        gm.train(was_training)
        gm.zero_grad(set_to_none=True)

    def importance(name: str, module) -> torch.Tensor:
        a = acts[name]
        axis = a.dim() - 1 if isinstance(module, torch.nn.Linear) else 1
        contrib = (a.detach() * a.grad).movedim(axis, 0).reshape(a.shape[axis], -1)
        return contrib.sum(dim=1).abs().float()

    return {gid: _summed([importance(name, m) for name, m in ps]) for gid, ps in producers.items()}


def keep_indices(scores: Optional[torch.Tensor], width: int, keep: int, granularity: int) -> torch.Tensor:
    """The `keep` channels (sorted old indices) of the highest-scoring whole blocks of `granularity` channels;
    the first `keep` without scores.  Ties go to the lower index (stable)."""
    if scores is None or keep >= width:
        return torch.arange(min(keep, width))
    blocks = scores.reshape(-1, granularity).sum(dim=1)
    order = sorted(range(blocks.numel()), key=lambda i: (-float(blocks[i]), i))[:keep // granularity]
    chosen = torch.tensor(sorted(order), dtype=torch.long)
    return (chosen[:, None] * granularity + torch.arange(granularity)[None, :]).reshape(-1)
