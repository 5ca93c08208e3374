"""grownfx: GROWN continual learning for any PyTorch backbone, by model surgery on a torch.fx graph.

Pipeline, one module each: tracing -> coupling -> surgery/rewrite -> layers/masks -> learner -> export.
"""

from typing import TYPE_CHECKING

from grownfx.version import __version__

# The engine's public API and `load_run` (a run folder opened from Python), imported on first use (PEP 562):
# `import grownfx.recipe` or `grownfx --help` must not
# pay for torch.  `from grownfx import prepare` works as before.
_LAZY = {
    "MaskPolicy": "grownfx.engine.context", "CouplingGroup": "grownfx.engine.coupling",
    "analyze": "grownfx.engine.coupling", "GrowableNet": "grownfx.engine.net", "SurgeryError": "grownfx.engine.errors",
    "ModelCheckError": "grownfx.engine.errors",
    "count_parameters": "grownfx.engine.net", "prepare": "grownfx.engine.prepare", "TraceError": "grownfx.engine.tracing",
    "trace": "grownfx.engine.tracing",
    "register_module": "grownfx.engine.registry", "register_function": "grownfx.engine.registry",
    "register_resize": "grownfx.engine.registry", "unregister": "grownfx.engine.registry",
    "remap": "grownfx.engine.surgery",
    "load_run": "grownfx.run.results", "load_export": "grownfx.run.opening",
}

if TYPE_CHECKING:
    from grownfx.engine.context import MaskPolicy
    from grownfx.engine.coupling import CouplingGroup, analyze
    from grownfx.engine.errors import ModelCheckError, SurgeryError
    from grownfx.engine.net import GrowableNet, count_parameters
    from grownfx.engine.prepare import prepare
    from grownfx.engine.tracing import TraceError, trace
    from grownfx.engine.registry import register_function, register_module, register_resize, unregister
    from grownfx.engine.surgery import remap
    from grownfx.run.results import load_run
    from grownfx.run.opening import load_export


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        value = getattr(importlib.import_module(_LAZY[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'grownfx' has no attribute {name!r}")

__all__ = [
    "CouplingGroup", "GrowableNet", "MaskPolicy", "ModelCheckError", "SurgeryError", "TraceError", "analyze",
    "count_parameters", "load_run", "prepare", "trace", "__version__", "register_function", "register_module",
    "register_resize", "remap",
    "unregister", "load_export",
]
