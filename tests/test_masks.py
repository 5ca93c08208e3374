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
