"""How many channels a growth round adds at each site: the one formula behind GROWN's candidate pools
(learn/learner.py) and CPG's widening rounds (learn/methods/cpg.py).

    added = min(ceil(fraction * full / g) * g,  floor((floor(max_width * full) - width) / g) * g)

per site, with `full` its width in the full backbone, `width` its width now and `g` its granularity (whole
groups, whole heads): a fraction of the full width, never past `max_width` of it.
"""

from __future__ import annotations

import math

from grownfx.engine.net import GrowableNet

__all__ = ["round_sizes"]


def round_sizes(net: GrowableNet, full_widths: dict[int, int], fraction: float, max_width: float) -> dict[int, int]:
    """{site: channels to add} for the sites of `full_widths` ({group: full width}) that still have room."""
    out = {}
    for gid, full in full_widths.items():
        gran = net.coupling.groups[gid].granularity
        room = int(max_width * full) - net.structure.widths[gid]
        n = min(math.ceil(fraction * full / gran) * gran, room // gran * gran)
        if n > 0:
            out[gid] = n
    return out
