"""The DistributedDataParallel options every stage wraps with, across torch versions."""

from __future__ import annotations

import inspect

import torch


def ddp_kwargs() -> dict:
    """DDP options: a static graph, no per-forward buffer broadcast, our own (dtype-safe) initial sync.

    `static_graph=True`: within a stage the set of parameters that get gradients never changes (the structure
    changes only between stages, and every stage wraps anew), but it need not be every parameter that requires
    one: a masked layer whose free units are all switched off for this task computes with its frozen bank alone,
    so its `weight` gets no gradient, and the growth penalty reaches the gates outside the forward.  A static
    graph lets DDP learn the unused ones in the first step instead of failing (the default) or walking the
    autograd graph after every forward (`find_unused_parameters=True`, which would also be correct).
    """
    sig = inspect.signature(torch.nn.parallel.DistributedDataParallel.__init__).parameters
    kw: dict = {"static_graph": True}
    if "forward_sync_buffers" in sig:  # torch >= 2.13
        kw["forward_sync_buffers"] = False
    else:
        kw["broadcast_buffers"] = False
    if "init_sync" in sig:
        kw["init_sync"] = False  # `wrap` has just verified the structure and broadcast rank 0's state
    return kw
