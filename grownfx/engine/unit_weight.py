"""Step 4 (part 3): the learning task's effective weight in a masked bank, as fast as eager PyTorch allows.

* `MaskPlan`: per-unit constants of the learning task's masks (trainable, dense, selective, attentive units).
* `MaskedWeight`: `weight * unit_mask` with its backward written out; the bank's `weight` holds the frozen values
  on owned units, so the former `where(trainable, weight, frozen)` is never computed.
* `BANK_OF` and a global optimizer step hook: after any optimiser step that decays every entry, owned units are
  put back to their frozen values (`MaskedLayer.restore_owned`), in grownfx's loop or a user's own.
* `fused_masked_weight`: the same expression for torch.compile (`training.compile`).
"""

from __future__ import annotations

import torch
from torch.optim.optimizer import register_optimizer_step_post_hook
from torch.utils.weak import WeakIdKeyDictionary

from grownfx.engine.context import ATT, DENSE, OFF, SEL
from grownfx.engine.layers import FREE

BANK_OF = WeakIdKeyDictionary()  # a bank's weight Parameter -> the bank, for the step hook below


def _restore_after_decay(optimizer: torch.optim.Optimizer, args, kwargs) -> None:
    """After any optimiser step that decays every entry (weight decay, AdamW): owned units of a bank are put
    back to their frozen values, so a user's own training loop keeps the invariant as grownfx's does."""
    for group in optimizer.param_groups:
        if not group.get("weight_decay"):
            continue
        for p in group["params"]:
            ref = BANK_OF.get(p)
            layer = ref() if ref is not None else None
            if layer is not None and layer.weight is p:
                layer.restore_owned()


register_optimizer_step_post_hook(_restore_after_decay)


class MaskedWeight(torch.autograd.Function):
    """The learning task's weight `weight * mult`, where `weight` holds the frozen values on owned units, with
    its backward written out (profile: autograd of the former `where(trainable, weight, frozen) * mult` costs
    a select forward and five weight-sized passes backward; this costs one forward and two or three backward).

    trainable_units: 0/1 per unit, 1 where the task may train the unit (None: every unit); mult: the unit
    multiplier (None: 1).  d weight = G * (trainable * mult): exactly 0 on units the task may not train, so an
    optimiser without weight decay never moves an owned unit; d mult = sum over a unit's weights of G * weight."""

    @staticmethod
    def forward(ctx, weight, trainable_units, mult, extra_dims: int):
        ctx.extra_dims = extra_dims
        ctx.save_for_backward(weight if mult is not None and ctx.needs_input_grad[2] else None, trainable_units,
                              mult)
        if mult is None:
            return weight.view_as(weight)
        return weight * mult.view(mult.shape + (1,) * extra_dims)

    @staticmethod
    def backward(ctx, grad):
        w, trainable_units, mult = ctx.saved_tensors
        expand = (1,) * ctx.extra_dims
        grad_weight = grad_mult = None
        if ctx.needs_input_grad[0]:
            unit = mult.detach() if mult is not None else None
            if trainable_units is not None:
                unit = trainable_units if unit is None else unit * trainable_units
            grad_weight = grad if unit is None else grad * unit.view(unit.shape + expand)
        if ctx.needs_input_grad[2]:
            prod = grad * w
            grad_mult = prod.sum(dim=tuple(range(prod.dim() - ctx.extra_dims, prod.dim()))) if ctx.extra_dims else prod
        return grad_weight, None, grad_mult, None


def _masked_weight(weight, frozen, score, trainable, none_trainable: bool, const, active, scale, threshold, noise,
                   extra_dims: int):
    """where(trainable, weight, frozen) * (const + active * binary_concrete(score)), written as one expression so
    torch.compile can fuse it into a single pass over the weights (forward) and one or two (backward)."""
    w = frozen if none_trainable else (weight if trainable is None else torch.where(trainable, weight, frozen))
    z = (score - threshold) * scale
    if noise is not None:
        z = z + noise * torch.logit(torch.rand_like(score), eps=1e-6)
    soft = torch.sigmoid(z)
    m = (z >= 0).to(z.dtype) + (soft - soft.detach())
    if active is not None:
        m = m * active
    if const is not None:
        m = m + const
    return w * m.view(m.shape + (1,) * extra_dims)


_FUSED = None


def fused_masked_weight():
    """The compiled `_masked_weight` (compiled once per process, on first use)."""
    global _FUSED
    if _FUSED is None:
        _FUSED = torch.compile(_masked_weight, dynamic=True)
    return _FUSED


class MaskPlan:
    """What the learning task does with each unit, as tensors ready for the forward pass."""

    def __init__(self, key, trainable, const, active, scale, threshold, noise, none_trainable=False,
                 trainable_units=None):
        self.key, self.trainable, self.const, self.active = key, trainable, const, active
        self.trainable_units = trainable_units  # `trainable` as 0/1 values of the unit shape (the backward's)
        self.scale, self.threshold, self.noise = scale, threshold, noise
        self.none_trainable = none_trainable
        self.masked = scale is not None  # some unit carries a learned (selective or attentive) mask

    @classmethod
    def build(cls, layer, key) -> "MaskPlan":
        kind, pol, dtype = layer.kind, layer.ctx.policy, layer.weight.dtype
        trainable = (layer.owner == FREE) & (kind != OFF)
        none_trainable = not bool(trainable.any())
        units = None if bool(trainable.all()) else trainable.to(dtype)
        trainable = None if units is None else layer._expand(trainable)
        dense = kind == DENSE
        const = None if bool(dense.all()) else dense.to(dtype)
        sel, att = kind == SEL, kind == ATT
        if not bool((sel | att).any()):
            return cls(key, trainable, const, None, None, None, None, none_trainable, units)
        t_sel = layer.ctx.temperature or pol.selective.temperature
        if pol.selective_kind == "ste":
            sel_p = (pol.selective_ste.scale, pol.selective_ste.threshold, 0.0)
        else:
            sel_p = (pol.selective.beta / t_sel, pol.selective.threshold, 1.0 / t_sel)
        if pol.attentive_kind == "ste":
            att_p = (pol.attentive.scale, pol.attentive.threshold, 0.0)
        else:
            t_att = layer.ctx.temperature or pol.attentive_gumbel.temperature
            att_p = (pol.attentive_gumbel.beta / t_att, pol.attentive_gumbel.threshold, 1.0 / t_att)

        has_sel, has_att = bool(sel.any()), bool(att.any())

        def per_unit(i):  # a plain number when every masked unit shares it (saves a weight-sized tensor)
            if not has_att or not has_sel or sel_p[i] == att_p[i]:
                return sel_p[i] if has_sel else att_p[i]
            return torch.where(sel, sel_p[i], att_p[i]).to(dtype)

        noise = per_unit(2)
        active = sel | att
        return cls(key, trainable, const, None if bool(active.all()) else active.to(dtype), per_unit(0), per_unit(1),
                   None if isinstance(noise, float) and noise == 0.0 else noise, none_trainable, units)
