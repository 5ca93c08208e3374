"""Joining a torchrun launch (`setup`), launching one from this process (`launch`), and a worker's exit."""

from __future__ import annotations

import datetime
import os
import sys
from typing import Optional, Sequence

import torch
import torch.distributed as td

from grownfx.learn.distributed.group import ProcessGroupDist
from grownfx.learn.distributed.single import Dist
from grownfx.learn.training import resolve_device


def launched() -> bool:
    """True when this process was started by torchrun (or another launcher setting WORLD_SIZE)."""
    return "WORLD_SIZE" in os.environ and "RANK" in os.environ


def exit_worker(code) -> None:
    """End a torchrun worker once its process group is closed: flush and `os._exit`.

    At interpreter exit, torch's gloo backend sometimes destroys a thread that is still joinable and the process
    aborts ("terminate called without an active exception", SIGABRT) after all work and files are done; torchrun
    then reports the run as failed.  Leaving with `os._exit` skips those finalisers; everything the run writes
    is already closed and fsynced by then.
    """
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code if isinstance(code, int) else (0 if code is None else 1))


def env_rank() -> int:
    """This process's global rank from the launcher's environment (0 when not launched)."""
    return int(os.environ.get("RANK", "0")) if launched() else 0


def setup(device_spec: str = "auto", timeout_s: Optional[float] = None) -> Dist:
    """The `Dist` of this process: single-process unless launched with WORLD_SIZE > 1 (torchrun).

    Under torchrun the device is `cuda:LOCAL_RANK` when the recipe's device resolves to CUDA (backend NCCL),
    else the CPU (backend gloo).  An already initialised default process group is reused (and left open).
    """
    world = int(os.environ.get("WORLD_SIZE", "1")) if launched() else 1
    if world <= 1:
        return Dist(resolve_device(device_spec))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    base = resolve_device(device_spec)
    if base.type == "cuda":
        if local_rank >= torch.cuda.device_count():
            raise RuntimeError(f"LOCAL_RANK {local_rank} needs a GPU of its own but this node has "
                               f"{torch.cuda.device_count()}; launch at most that many processes per node")
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
        backend = "nccl"
    elif base.type == "cpu":
        device, backend = torch.device("cpu"), "gloo"
    else:
        raise RuntimeError(f"distributed runs support CUDA (NCCL) and CPU (gloo), not {base.type!r}")
    sync_bn = os.environ.get("GROWNFX_SYNC_BN", "1") not in ("0", "false", "no")
    owns = False
    if not td.is_initialized():
        timeout = timeout_s if timeout_s is not None else float(os.environ.get("GROWNFX_DIST_TIMEOUT", 1800))
        td.init_process_group(backend, timeout=datetime.timedelta(seconds=timeout))
        owns = True
    return ProcessGroupDist(device, owns_group=owns, sync_bn=sync_bn)


def launch(argv: Sequence[str], nproc: int, extra: Sequence[str] = ()) -> int:
    """Run `python -m grownfx *argv` in `nproc` processes on this machine through torch.distributed.run.

    The equivalent of `torchrun --standalone --nproc-per-node NPROC -m grownfx ARGV`; returns an exit code
    (0, or the first failed worker's).  `extra` adds torchrun options before the script.
    """
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import main as torchrun

    if nproc < 1:
        raise ValueError(f"--nproc-per-node must be at least 1, got {nproc}")
    args = ["--standalone", "--nproc-per-node", str(nproc), *extra, "-m", "grownfx", *argv]
    try:
        torchrun(args)
    except ChildFailedError as exc:
        codes = [f.exitcode for f in exc.failures.values() if f.exitcode not in (None, 0)]
        return next((c for c in codes if c > 0), 1)
    return 0
