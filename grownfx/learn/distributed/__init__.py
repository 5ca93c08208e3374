"""Multi-process (data-parallel) training: one process per GPU (or CPU worker), PyTorch's DDP for the gradients.

    torchrun --nproc-per-node 4 -m grownfx run RECIPE ...     # any torchrun launch, one node or several
    grownfx run RECIPE --nproc-per-node 4                      # the same, handed to torch.distributed.run

Every method's stage loop (grownfx.learn.training.train_stage) takes a `Dist`; `setup(device_spec)` reads
torchrun's environment (WORLD_SIZE, RANK, LOCAL_RANK) and returns the single-process no-op `Dist` when
WORLD_SIZE is unset or 1, else a `ProcessGroupDist`, which joins the process group (NCCL on CUDA, gloo on CPU).

    launch       joining a launch (`setup`), launching one (`launch`), a worker's exit
    single       the single-process no-op `Dist`
    group        `ProcessGroupDist`: collectives, DDP wrapping and buffer broadcast per stage, sharded evaluation
    sharding     rank r's share of each global batch (`StridedShardLoader`) and of an evaluation split
    batchnorm    BatchNorm with global-batch statistics (SyncBatchNorm's function on CUDA, an all-reduce on CPU)
    ddp          the DistributedDataParallel options, across torch versions
    divergence   structure and value checks between ranks (`DivergenceError`)

What is synchronised, and when: docs/distributed.md.
"""

from __future__ import annotations

from grownfx.learn.distributed.divergence import DivergenceError
from grownfx.learn.distributed.group import ProcessGroupDist
from grownfx.learn.distributed.launch import env_rank, exit_worker, launch, launched, setup
from grownfx.learn.distributed.sharding import StridedShardLoader
from grownfx.learn.distributed.single import DISTRIBUTED_METHODS, Dist

__all__ = ["DISTRIBUTED_METHODS", "DivergenceError", "Dist", "ProcessGroupDist", "StridedShardLoader", "env_rank",
           "exit_worker", "launch", "launched", "setup"]
