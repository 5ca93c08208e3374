"""grownfx benchmarks: one script per question, each `python -m benchmarks.<name> [--quick] [--json PATH]`.

    train_step     task-aware training step vs the plain model of the same width (task 1, task 10)
    inference      task-aware eval / export / dense model of the exported width
    storage        bytes stored per task and in total; bits per kernel of a frozen task's masks
    scale_tasks    50 tasks: step time and memory of the last task vs the first
    method_cost    wall time and epochs of a stream: GROWN vs CPG vs Scratch
    data_pipeline  images/s of the batched loader and of DataLoader vs the training step's
    compile_amp    torch.compile (CPU); AMP and channels_last where CUDA is available
    profile_step   torch.profiler top ops of the task-10 training step (the "why" behind train_step)
    mask_arith     the mask arithmetic alone, eager vs compiled: what fusing it would save
    all            every benchmark above, then benchmarks/results/summary.md

Timing hygiene (see benchmarks/common.py): one intra-op thread, warm-up, compared variants interleaved in one
process, medians and the ratio of medians.  CPU results are ratios only.
"""

import os

# Before torch is imported by any benchmark module: one OpenMP thread that does not spin while idle (the
# machine these run on is shared).  `benchmarks.common.setup()` also calls torch.set_num_threads(1).
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("OMP_WAIT_POLICY", "passive")
os.environ.setdefault("MKL_NUM_THREADS", "1")
