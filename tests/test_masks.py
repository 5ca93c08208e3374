import math

import pytest
import torch

from grownfx.engine import masks as M


def test_ste_mask_is_binary_forward_with_sigmoid_gradient():
    s = torch.tensor([0.0, 0.004, 0.006, 0.02], requires_grad=True)
    m = M.ste_mask(s)
    assert m.tolist() == [0.0, 0.0, 1.0, 1.0]
    m.sum().backward()
    soft = torch.sigmoid((s.detach() - 5e-3) * 12.0)
    assert torch.allclose(s.grad, soft * (1 - soft) * 12.0)


def test_gumbel_sigmoid_threshold_noise_and_gradient():
    s = torch.full((20000,), 5e-3 + 1e-3, requires_grad=True)  # logit 1.2: selected without noise
    assert M.gumbel_sigmoid_mask(s, noise=False).all()
    m = M.gumbel_sigmoid_mask(s)
    frac = m.mean().item()
    expected = 1 / (1 + math.exp(-1.2))  # P(logit + g0 - g1 >= 0) for logistic noise
    assert set(m.unique().tolist()) <= {0.0, 1.0} and abs(frac - expected) < 0.02
    m.sum().backward()
    assert s.grad.abs().sum() > 0


def test_continuous_sparsification_gate():
    s = torch.zeros(3)
    assert torch.allclose(M.cs_gate(s, beta=1.0), torch.ones(3))  # 1 at s0 for any beta
    s = torch.tensor([-0.1, 0.1])
    hard = M.cs_hard(s, beta=200.0)
    assert hard[0] == 0 and torch.isclose(hard[1], M.cs_gate(s, 200.0)[1])
    assert M.anneal(1.0, 200.0, 0.0) == 1.0 and math.isclose(M.anneal(1.0, 200.0, 1.0), 200.0)


@pytest.mark.parametrize("shape", [(1,), (7,), (8,), (13, 5), (64, 3, 3)])
def test_bit_packing_round_trips_at_one_bit_per_unit(shape):
    mask = torch.rand(shape) > 0.5
    packed = M.pack_bits(mask)
    assert packed.dtype == torch.uint8 and packed.numel() == math.ceil(mask.numel() / 8)
    assert torch.equal(M.unpack_bits(packed, shape), mask)


@pytest.mark.parametrize("shape", [(6, 5, 3, 3), (7, 9)])
@pytest.mark.parametrize("case", ["mixed", "all_trainable", "no_mult", "plain_rows"])
def test_masked_weight_backward_equals_autograd_of_where_then_mul(shape, case):
    """The learning task's effective weight (one row per unit, a hand-written backward) equals autograd's
    `where(trainable, weight, frozen) * mult` and its gradients, whatever `weight` holds on units the task may not
    train (NaN here: never read): the weight's gradient is exactly 0 there, and the unit multiplier's is the sum
    over the unit.  `plain_rows`: the trainable units' multiplier is a constant 1 (dense units, as GROWN's released
    ones), which the shortcut relies on."""
    from grownfx.engine.unit_weight import MaskedWeight as _MaskedWeight

    g = torch.Generator().manual_seed(0)
    unit_shape = shape[:2]
    extra = len(shape) - 2
    frozen = torch.randn(shape, generator=g)
    trainable_u = torch.rand(unit_shape, generator=g) < 0.3
    if case == "all_trainable":
        trainable_u[:] = True
    weight = torch.where(trainable_u.view(unit_shape + (1,) * extra), torch.randn(shape, generator=g), float("nan"))
    weight.requires_grad_(True)
    score = torch.randn(unit_shape, generator=g, requires_grad=True)
    upstream = torch.randn(shape, generator=g)

    def mult_of():
        if case == "plain_rows":  # as MaskedLayer's const + active * mask with active 0 on the trainable units
            return torch.addcmul(trainable_u.float(), torch.sigmoid(score) * 2, (~trainable_u).float())
        return None if case == "no_mult" else torch.sigmoid(score) * 2

    expand = (1,) * extra
    rows = None if case == "all_trainable" else trainable_u.reshape(-1).nonzero().squeeze(1)
    m = mult_of()
    units = trainable_u.numel()
    out = _MaskedWeight.apply(weight.reshape(units, -1), frozen.reshape(units, -1), rows,
                              None if m is None else m.reshape(units), case == "plain_rows").view(shape)
    (out * upstream).sum().backward()
    got = (out.detach(), weight.grad.clone(), None if m is None else score.grad.clone())
    weight.grad, score.grad = None, None

    m = mult_of()
    ref = torch.where(trainable_u.view(unit_shape + expand), weight, frozen)
    if m is not None:
        ref = ref * m.view(unit_shape + expand)
    (ref * upstream).sum().backward()
    torch.testing.assert_close(got[0], ref.detach(), rtol=0, atol=0)
    torch.testing.assert_close(got[1], weight.grad, rtol=0, atol=0)
    assert bool((got[1].reshape(unit_shape + (-1,))[~trainable_u] == 0).all())
    if m is not None:
        torch.testing.assert_close(got[2], score.grad, rtol=1e-6, atol=1e-6)
