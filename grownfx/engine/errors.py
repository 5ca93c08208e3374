"""The engine's refusals: each is one clear line naming the problem, where it is, and the way out."""

from __future__ import annotations

from grownfx.errors import UserError


class SurgeryError(UserError, ValueError):
    """A model or request the surgery engine cannot handle, with the reason."""


class ModelCheckError(SurgeryError):
    """`prepare` read the model differently from what it computes: the traced graph and the eager model disagree
    (outputs in eval or train mode, or gradients), or the model's own forward behaves differently in training in a
    way the graph cannot keep.  The message names the first node whose values differ, the likely cause and the
    way out (`leaf_modules=[...]`, `auto_leaves=True`, `output=...`)."""
