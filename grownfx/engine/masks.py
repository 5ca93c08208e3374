"""Mask parametrisations, all in one place, with the defaults of the code they come from.

* `ste_mask`: KSM/Piggyback real-valued mask, hard threshold in the forward pass, the soft value's gradient.
* `gumbel_sigmoid_mask`: GROWN's selective mask (Eq. 6), the binary Concrete relaxation with KSM's scaling.
* `cs_gate`: continuous sparsification, `sigmoid(beta * s) / sigmoid(s0)` with beta annealed upward.
* `pack_bits` / `unpack_bits`: frozen masks stored at one bit per kernel.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass(frozen=True)
class STEConfig:
    """KSM / Piggyback: score init 1e-2, threshold 5e-3, soft = sigmoid((m - thr) * 1200 / 100)."""

    init: float = 1e-2
    threshold: float = 5e-3
    scale: float = 12.0  # KSM's Beta / temperature = 1200 / 100


@dataclass(frozen=True)
class GumbelConfig:
    """GROWN's selective mask: KSM's logit scaling plus Gumbel noise, temperature T.  A unit is kept when its noisy
    probability sigmoid(((score - threshold) * beta + noise) / T) reaches 0.5, i.e. (without noise) when its score
    reaches `threshold` (5e-3)."""

    init: float = 1e-2
    threshold: float = 5e-3
    beta: float = 1200.0  # logit = (m - threshold) * beta (KSM `Beta`)
    temperature: float = 100.0  # KSM `temperature`
    final_temperature: float | None = None  # anneal T geometrically to this value over a stage (None: constant)


@dataclass(frozen=True)
class CSConfig:
    """Continuous sparsification (Savarese et al. 2020): mask = sigmoid(beta * s) / sigmoid(s0)."""

    init: float = 0.0  # s0
    final_beta: float = 200.0  # beta goes 1 -> final_beta geometrically over the epochs of a stage


class _StraightThroughStep(torch.autograd.Function):
    """1[z >= 0] forward, the derivative of sigmoid(z) backward: one pass forward (heaviside, no bool tensor
    to convert) and two backward (sigmoid, then its fused backward kernel) instead of five."""

    @staticmethod
    def forward(ctx, z):
        ctx.save_for_backward(z)
        return torch.heaviside(z, _ONE.to(dtype=z.dtype, device=z.device))

    @staticmethod
    def backward(ctx, grad):
        (z,) = ctx.saved_tensors
        return torch.ops.aten.sigmoid_backward(grad, torch.sigmoid(z))


_ONE = torch.ones(())


def binary_concrete(score: torch.Tensor, scale, threshold, noise_scale=None, training: bool = True,
                    uniform: torch.Tensor | None = None) -> torch.Tensor:
    """The one expression behind every unit mask: z = scale * (score - threshold) + noise_scale * logistic noise;
    forward value 1[z >= 0], gradient of sigmoid(z) (straight-through).  `scale`, `threshold` and
    `noise_scale` may be per-unit tensors, so one call serves selective and attentive units together.
    `uniform`: the noise's uniform samples, score-shaped, consumed (default: drawn here)."""
    z = (score - threshold) * scale
    if training and noise_scale is not None:
        # g0 - g1 of two Gumbel(0, 1) samples is Logistic(0, 1): logit of one uniform sample (in place: these
        # are as large as the weights of a linear layer)
        noise = (torch.rand_like(score) if uniform is None else uniform).logit_(eps=1e-6)
        z = torch.addcmul(z, noise, noise_scale) if isinstance(noise_scale, torch.Tensor) else z.add_(noise, alpha=noise_scale)
    return _StraightThroughStep.apply(z)


def ste_mask(score: torch.Tensor, cfg: STEConfig = STEConfig()) -> torch.Tensor:
    """Binary mask in the forward pass (score >= threshold), sigmoid gradient in the backward pass (KSM)."""
    return binary_concrete(score, cfg.scale, cfg.threshold)


def gumbel_sigmoid_mask(
    score: torch.Tensor, cfg: GumbelConfig = GumbelConfig(), temperature: float | None = None, noise: bool = True
) -> torch.Tensor:
    """p = sigmoid((logit + g0 - g1) / T) with g0, g1 ~ Gumbel(0, 1); forward value 1[p >= 0.5].

    Without noise (evaluation) the mask is the deterministic 1[logit >= 0].  The logit is KSM's
    `(m - 5e-3) * 1200`: the log-odds form of the paper's Eq. 6, as in the KSM code GROWN builds on.
    """
    t = cfg.temperature if temperature is None else temperature
    return binary_concrete(score, cfg.beta / t, cfg.threshold, 1.0 / t, noise)


def cs_gate(score: torch.Tensor, beta: float, cfg: CSConfig = CSConfig()) -> torch.Tensor:
    """The soft channel gate of continuous sparsification; equals 1 at score == s0 for any beta."""
    return torch.sigmoid(beta * score) / _sigmoid(cfg.init)


def cs_hard(score: torch.Tensor, beta: float, cfg: CSConfig = CSConfig()) -> torch.Tensor:
    """The binarised gate: channels with s > 0 are kept at the soft value they were trained with at `beta`,
    the others are dropped.  (CS's `ticket` mode uses 1 / sigmoid(s0) for every kept channel; at a finite
    beta that rescales channels whose s is near 0 and breaks the statistics the next norm layer learned.)"""
    return torch.where(score > 0, cs_gate(score, beta, cfg), torch.zeros_like(score))


def anneal(start: float, end: float, progress: float) -> float:
    """Geometric schedule from `start` to `end` as `progress` goes 0 -> 1 (CS's beta, Gumbel's T)."""
    progress = min(max(progress, 0.0), 1.0)
    return start * (end / start) ** progress


def _sigmoid(x: float) -> float:
    return 1.0 / (1.0 + math.exp(-x))


_BIT_WEIGHTS = torch.tensor([128, 64, 32, 16, 8, 4, 2, 1], dtype=torch.uint8)


def pack_bits(mask: torch.Tensor) -> torch.Tensor:
    """Bool tensor -> uint8 tensor of ceil(numel / 8) bytes (big-endian within a byte, like numpy.packbits)."""
    flat = mask.reshape(-1).to(torch.uint8)
    pad = (-flat.numel()) % 8
    if pad:
        flat = F.pad(flat, (0, pad))
    return (flat.view(-1, 8) * _BIT_WEIGHTS.to(flat.device)).sum(dim=1, dtype=torch.uint8)


def unpack_bits(packed: torch.Tensor, shape: tuple[int, ...]) -> torch.Tensor:
    """Inverse of `pack_bits`."""
    n = math.prod(shape)
    bits = packed.unsqueeze(1).bitwise_and(_BIT_WEIGHTS.to(packed.device)).ne(0)
    return bits.reshape(-1)[:n].reshape(shape)
