"""BatchNorm over the global batch: every rank normalises its shard with the statistics of all ranks' samples.

Why not simply `nn.SyncBatchNorm`: `convert_sync_batchnorm` builds new modules, which would cut the GROWN
net's references to its per-task norm copies (and a frozen task's copy must stay the very tensors it was), and
SyncBatchNorm's kernel refuses CPU tensors, so it cannot serve gloo runs.  So the existing layers keep their
identity and get an instance-level `forward` for the duration of a stage (`patch` / `unpatch`):

* CUDA: the forward is SyncBatchNorm's own autograd function (`torch.nn.modules._functions.SyncBatchNorm`),
  the computation `nn.SyncBatchNorm` does;
* CPU (gloo): per-channel sums in float64 all-reduced by `_SumAllRanks` (differentiable: the backward
  all-reduces the gradients of the sums), then the normalisation.  (`torch.distributed.nn.functional.all_reduce`
  does the same but is deprecated, and its suggested replacement is a private module whose autograd support
  varies across the torch versions grownfx supports.)
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn.modules._functions import SyncBatchNorm as _SyncBatchNormFn
from torch.nn.modules.batchnorm import _BatchNorm


def patch(module: nn.Module) -> list[nn.Module]:
    """Make every BatchNorm of `module` normalise training batches with global-batch statistics."""
    patched = []
    for m in module.modules():
        if not isinstance(m, _BatchNorm):
            continue
        own = m.__dict__.get("forward")
        if own is None or isinstance(own, SyncBNForward):  # (an inactive one comes from a mid-stage deep copy)
            m.forward = SyncBNForward(m)
            patched.append(m)
    return patched


def unpatch(patched: list[nn.Module]) -> None:
    for m in patched:
        f = m.__dict__.pop("forward", None)
        if isinstance(f, SyncBNForward):
            f.active = False


class SyncBNForward:
    """`forward` of one BatchNorm: in training mode, mean and variance over every rank's samples."""

    def __init__(self, bn: nn.Module, active: bool = True):
        self.bn, self.active = bn, active

    def __deepcopy__(self, memo):
        # a deep copy of the layer made mid-stage (a task's template) computes as a plain BatchNorm
        return SyncBNForward(memo.get(id(self.bn), self.bn), active=False)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        bn = self.bn
        if not self.active or not bn.training:  # evaluation uses the running statistics: nothing to share
            return type(bn).forward(bn, x)
        bn._check_input_dim(x)
        if x.device.type == "cuda":
            return _cuda(bn, x)
        return _cpu(bn, x)


def _factor(bn: nn.Module) -> float:
    if bn.track_running_stats and bn.running_mean is not None:
        bn.num_batches_tracked.add_(1)
        return (1.0 / float(bn.num_batches_tracked)) if bn.momentum is None else bn.momentum
    return 0.0 if bn.momentum is None else bn.momentum


def _cuda(bn: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """What nn.SyncBatchNorm.forward does in training mode with more than one rank."""
    factor = _factor(bn)
    track = bn.track_running_stats
    world = torch.distributed.group.WORLD
    return _SyncBatchNormFn.apply(x, bn.weight, bn.bias, bn.running_mean if track else None,
                                  bn.running_var if track else None, bn.eps, factor, world,
                                  torch.distributed.get_world_size(world))


class _SumAllRanks(torch.autograd.Function):
    """All-reduce (sum) of a tensor over the default group, differentiable: d(sum of x_r)/d(x_r) = 1, so each
    rank's gradient is the all-reduced sum of every rank's output gradient."""

    @staticmethod
    def forward(ctx, tensor: torch.Tensor) -> torch.Tensor:
        out = tensor.clone(memory_format=torch.contiguous_format)
        torch.distributed.all_reduce(out)
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        return _SumAllRanks.apply(grad)


def _cpu(bn: nn.Module, x: torch.Tensor) -> torch.Tensor:
    c = x.shape[1]
    dims = [0] + list(range(2, x.dim()))
    shape = (1, c) + (1,) * (x.dim() - 2)
    dtype = torch.float64 if x.dtype == torch.float64 else torch.float32  # fp16/bf16 normalise in fp32
    xf = x.to(dtype)
    # sums in float64: exact counts, and E[x^2] - E[x]^2 without fp32 cancellation
    count = torch.tensor([x.numel() // c], dtype=torch.float64, device=x.device)
    local = torch.cat([xf.sum(dims, dtype=torch.float64), (xf * xf).sum(dims, dtype=torch.float64), count])
    stats = _SumAllRanks.apply(local)
    n = stats[-1]
    mean64 = stats[:c] / n
    var = (stats[c:2 * c] / n - mean64 * mean64).clamp_min(0.0).to(dtype)
    mean = mean64.to(dtype)
    y = (xf - mean.view(shape)) * torch.rsqrt(var + bn.eps).view(shape)
    if bn.affine:
        y = y * bn.weight.view(shape) + bn.bias.view(shape)
    if bn.track_running_stats and bn.running_mean is not None:
        with torch.no_grad():
            m = _factor(bn)
            unbiased = var.detach() * (n / (n - 1.0).clamp_min(1.0)).to(dtype)
            bn.running_mean.mul_(1 - m).add_(mean.detach().to(bn.running_mean.dtype), alpha=m)
            bn.running_var.mul_(1 - m).add_(unbiased.to(bn.running_var.dtype), alpha=m)
    return y.to(x.dtype)
