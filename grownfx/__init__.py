"""grownfx: GROWN continual learning for any PyTorch backbone, by model surgery on a torch.fx graph.

Pipeline, one module each: tracing -> coupling -> surgery/rewrite -> layers/masks -> learner -> export.
"""

from .context import MaskPolicy
from .coupling import CouplingGroup, analyze
from .net import GrowableNet, SurgeryError, count_parameters, prepare
from .tracing import TraceError, trace

__version__ = "0.1.0"

__all__ = [
    "CouplingGroup", "GrowableNet", "MaskPolicy", "SurgeryError", "TraceError", "analyze", "count_parameters",
    "prepare", "trace", "__version__",
]
