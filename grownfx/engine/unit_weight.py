"""Step 4 (part 3): the learning task's effective weight in a masked bank, as fast as eager PyTorch allows.

* `MaskPlan`: per-unit constants of the learning task's masks (trainable, dense, selective, attentive units).
* `MaskedWeight`: `where(trainable, weight, frozen) * unit_mask` with its backward written out.  The units the
  task may not train are read from the bank's `frozen` buffer, never from the Parameter an optimiser updates, so
  no optimiser (momentum, weight decay, state kept from an earlier task, a user's own update) can change what a
  finished task's units contribute: by construction, not by repair after the step.
* the same for every layer at once, eager or compiled: engine/weight_pass.py.
"""

from __future__ import annotations

import torch

from grownfx.engine.context import ATT, DENSE, OFF, SEL
from grownfx.engine.layers import FREE


class MaskedWeight(torch.autograd.Function):
    """The learning task's weight, one row per mask unit: `where(trainable, weight, frozen) * mult`.

    weight, frozen: (units, unit size), the Parameter and the frozen bank; rows: the indices of the units the task
    trains (None: every unit); mult: the unit multiplier, (units,) (None: 1); plain_rows: every trainable unit is
    dense, its multiplier a constant 1 (GROWN's released units; a task with no grown units).

    Computed as `frozen * mult` with the trainable rows replaced by `weight[rows] * mult[rows]`: only the rows a
    task trains are read from `weight`.  At a later task most units are owned (about 92 % of ResNet-18's bank at
    task 10), so this costs one weight-sized pass forward, as the product `weight * mult` alone did, plus a
    gather and a scatter of the trainable rows (benchmarks/train_step).  Backward: d weight = G * mult on the
    trainable rows and exactly 0 elsewhere; d mult = sum over a unit's weights of G * (the weight the unit
    computed with), left 0 on plain rows (their multiplier is a constant: nothing upstream reads it)."""

    @staticmethod
    def forward(ctx, weight, frozen, rows, mult, plain_rows: bool):
        ctx.plain_rows = plain_rows
        if rows is None:
            ctx.save_for_backward(weight, None, None, mult, None)
            return weight.view_as(weight) if mult is None else weight * mult[:, None]
        picked = weight.index_select(0, rows)  # the only entries of `weight` read
        mult_rows = None if mult is None or plain_rows else mult.index_select(0, rows)
        keep = ctx.needs_input_grad[3] and not plain_rows
        # d weight's factor per unit: the multiplier on the trainable rows, 0 elsewhere
        factor = None
        if ctx.needs_input_grad[0]:
            factor = torch.zeros(frozen.shape[0], dtype=frozen.dtype, device=frozen.device)
            factor.index_fill_(0, rows, 1.0) if mult_rows is None else factor.index_copy_(0, rows, mult_rows)
        ctx.save_for_backward(picked if keep else None, frozen, rows, factor, None)
        out = frozen.clone() if mult is None else frozen * mult[:, None]
        return out.index_copy_(0, rows, picked if mult_rows is None else picked * mult_rows[:, None])

    @staticmethod
    def backward(ctx, grad):
        weight, frozen, rows, mult, _ = ctx.saved_tensors  # with `rows`: weight = the picked rows, mult = factor
        grad_weight = grad_mult = None
        if rows is None:
            if ctx.needs_input_grad[0]:
                grad_weight = grad if mult is None else grad * mult[:, None]
            if ctx.needs_input_grad[3]:
                grad_mult = _row_dot(grad, weight)
            return grad_weight, None, None, grad_mult, None
        if ctx.needs_input_grad[0]:
            # one pass, G times a per-unit factor that is 0 on the rows the task may not train (0 or -0 there): on
            # CPU about 5x faster than zeros then a scatter of the trainable rows' G * mult
            grad_weight = grad * mult[:, None]
        if ctx.needs_input_grad[3]:
            grad_mult = _row_dot(grad, frozen)  # 0 on the trainable rows (frozen is 0 on free units)
            if not ctx.plain_rows:
                grad_mult.index_copy_(0, rows, _row_dot(grad.index_select(0, rows), weight))
        return grad_weight, None, None, grad_mult, None


def _row_dot(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """sum over each row of a * b: the product times a vector of ones (a matrix-vector product sums the rows about
    2x faster on CPU than einsum's batched product or the product's sum over short rows, e.g. 9 weights)."""
    prod = a * b
    if a.shape[1] == 1:
        return prod.view(-1)
    return prod @ torch.ones(a.shape[1], dtype=prod.dtype, device=prod.device)


class MaskPlan:
    """What the learning task does with each unit, as tensors ready for the forward pass."""

    def __init__(self, key, trainable, const, active, scale, threshold, noise, none_trainable=False, rows=None,
                 plain_rows=False):
        self.key, self.trainable, self.const, self.active = key, trainable, const, active
        self.rows = rows  # indices of the trainable units, flattened (None: every unit is trainable)
        self.plain_rows = plain_rows  # every trainable unit is dense: its multiplier is a constant 1
        self.scale, self.threshold, self.noise = scale, threshold, noise
        self.none_trainable = none_trainable
        self.masked = scale is not None  # some unit carries a learned (selective or attentive) mask

    @classmethod
    def build(cls, layer, key) -> "MaskPlan":
        pol, dtype = layer.ctx.masks.policy, layer.weight.dtype
        kind = layer.kind if layer.kind is not None else torch.full_like(layer.owner, DENSE, dtype=torch.int8)
        trainable_units = (layer.owner == FREE) & (kind != OFF)
        none_trainable = not bool(trainable_units.any())
        rows = None if bool(trainable_units.all()) else trainable_units.reshape(-1).nonzero().squeeze(1)
        trainable = None if rows is None else layer._expand(trainable_units)
        dense = kind == DENSE
        plain_rows = bool(dense[trainable_units].all())
        const = None if bool(dense.all()) else dense.to(dtype)
        sel, att = kind == SEL, kind == ATT
        if not bool((sel | att).any()):
            return cls(key, trainable, const, None, None, None, None, none_trainable, rows, plain_rows)
        t_sel = layer.ctx.masks.temperature or pol.selective.temperature
        if pol.selective_kind == "ste":
            sel_p = (pol.selective_ste.scale, pol.selective_ste.threshold, 0.0)
        else:
            sel_p = (pol.selective.beta / t_sel, pol.selective.threshold, 1.0 / t_sel)
        if pol.attentive_kind == "ste":
            att_p = (pol.attentive.scale, pol.attentive.threshold, 0.0)
        else:
            t_att = layer.ctx.masks.temperature or pol.attentive_gumbel.temperature
            att_p = (pol.attentive_gumbel.beta / t_att, pol.attentive_gumbel.threshold, 1.0 / t_att)

        has_sel, has_att = bool(sel.any()), bool(att.any())

        def per_unit(i):  # a plain number when every masked unit shares it (saves a weight-sized tensor)
            if not has_att or not has_sel or sel_p[i] == att_p[i]:
                return sel_p[i] if has_sel else att_p[i]
            return torch.where(sel, sel_p[i], att_p[i]).to(dtype)

        noise = per_unit(2) if layer.ctx.masks.noise else 0.0
        active = sel | att
        return cls(key, trainable, const, None if bool(active.all()) else active.to(dtype), per_unit(0), per_unit(1),
                   None if isinstance(noise, float) and noise == 0.0 else noise, none_trainable, rows, plain_rows)
