"""grownfx: GROWN continual learning for any PyTorch backbone, by model surgery on a torch.fx graph.

Pipeline, one module each: tracing -> coupling -> surgery/rewrite -> layers/masks -> learner -> export.
"""

from grownfx.engine.context import MaskPolicy
from grownfx.engine.coupling import CouplingGroup, analyze
from grownfx.engine.net import GrowableNet, SurgeryError, count_parameters, prepare
from grownfx.engine.tracing import TraceError, trace

from grownfx.version import __version__

__all__ = [
    "CouplingGroup", "GrowableNet", "MaskPolicy", "SurgeryError", "TraceError", "analyze", "count_parameters",
    "prepare", "trace", "__version__",
]
