"""Fault injection: break each step of a task's life on purpose and check that the fast tests go red.

    python tests/fault_injection.py                      # every fault, then a clean run; exit 1 if one was missed
    python tests/fault_injection.py cache_not_cleared    # some faults
    python -m pytest -p tests.fault_injection --fault mask_not_applied tests/test_steps.py   # one by hand

Each fault is a monkeypatch applied by this file acting as a pytest plugin (`-p tests.fault_injection`,
`--fault NAME`); the production code has no fault switch.  docs/testing.md has the table of what caught what.
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
TESTS = ["tests/test_steps.py", "tests/test_frozen_units.py"]  # the fast step-by-step checks


# -- the faults -----------------------------------------------------------------------------------------------


def _mask_not_applied():
    """A finished task computes with its visible slice of the bank, without its stored mask."""
    from grownfx.engine.banks import MaskedLayer

    MaskedLayer._compute_finished_weight = MaskedLayer._visible_bank  # the production slicing, mask skipped


def _frozen_copy_shared():
    """A new task's norm copy is the previous task's copy (one module shared), not a copy of it."""
    from grownfx.engine.layers import PerTask

    add_task = PerTask.add_task

    def shared(self, num_classes=None, generator=None):
        if self.kind == "norm" and len(self.copies):
            self.copies.append(self.copies[-1])
            self.copies[-1].requires_grad_(True)
            return
        add_task(self, num_classes=num_classes, generator=generator)

    PerTask.add_task = shared


def _gate_not_folded():
    """Settling drops the candidates whose gate is off but does not fold the kept gates into the weights."""
    import grownfx.learn.gates as gates

    gates._scale_consumer_columns = lambda net, gid, hard: None


def _cache_not_cleared():
    """A structural change bumps the version but leaves the derived tensors cached."""
    from grownfx.engine.context import TaskContext

    def bump(self):
        self.structure.version += 1

    TaskContext.bump = bump


def _owned_units_read_from_weight():
    """The learning task reads the units earlier tasks own from the bank's Parameter, which optimisers update,
    instead of from `frozen` (the design before issue 21, here without the step hook that repaired it)."""
    from grownfx.engine import unit_weight

    apply = unit_weight.MaskedWeight.apply

    def from_weight(weight, frozen, rows, mult, plain_rows):
        return apply(weight, weight.detach(), rows, mult, plain_rows)

    unit_weight.MaskedWeight.apply = from_weight


def _freeze_wrong_mask():
    """Freezing stores an all-ones mask (every unit the task could see) instead of the units it used."""
    import torch

    from grownfx.engine import masks as M
    from grownfx.engine.banks import MaskedLayer

    freeze = MaskedLayer.freeze

    def wrong(self, task):
        freeze(self, task)
        shape = self.mask_shapes[task]
        self.register_buffer(f"mask_{task}", M.pack_bits(torch.ones(shape, dtype=torch.bool)))

    MaskedLayer.freeze = wrong


def _differential_check_off():
    """prepare no longer compares the traced graph with the eager model."""
    import grownfx.engine.prepare as net
    from grownfx.engine.selfcheck import CheckReport

    net.check_graph = lambda *args, **kwargs: CheckReport()


def _train_graph_ignored():
    """The model is traced in eval mode only (train-only behaviour frozen out of the graph)."""
    from grownfx.engine.tracing import GrownTracer

    GrownTracer.both_modes = False


def _functions_inlined():
    """fx records a custom autograd Function's forward ops (its backward is lost)."""
    from grownfx.engine.tracing import GrownTracer

    GrownTracer.keep_functions = False


def _inplace_out_of_place():
    """`z += y` is recorded as `z = z + y`, whatever still refers to z."""
    from grownfx.engine.tracing import GrownTracer

    GrownTracer.record_inplace = False


def _broadcast_channel_growable():
    """A one-channel tensor broadcast over others is not fixed (CBAM's spatial attention grows)."""
    from grownfx.engine.coupling.layouts import LayoutOps

    LayoutOps.one_channel_axes = lambda self, node, lays, size: None


def _heads_concatenated():
    """Logits concatenated from several classifiers are accepted."""
    import grownfx.engine.heads as heads

    heads._check_one_classifier = lambda coupling, layout, spec: None


FAULTS = {
    "mask_not_applied": _mask_not_applied,
    "frozen_copy_shared": _frozen_copy_shared,
    "gate_not_folded": _gate_not_folded,
    "cache_not_cleared": _cache_not_cleared,
    "freeze_wrong_mask": _freeze_wrong_mask,
    "differential_check_off": _differential_check_off,
    "train_graph_ignored": _train_graph_ignored,
    "functions_inlined": _functions_inlined,
    "inplace_out_of_place": _inplace_out_of_place,
    "broadcast_channel_growable": _broadcast_channel_growable,
    "heads_concatenated": _heads_concatenated,
    "owned_units_read_from_weight": _owned_units_read_from_weight,
}
# the tests each fault is run against (default: TESTS); the clean run covers all of them
READING = ["tests/test_model_reading.py", "tests/test_model_reading_heads.py", "tests/test_model_reading_ops.py",
           "tests/test_fuzz.py"]
FAULT_TESTS = {name: READING for name in ("differential_check_off", "train_graph_ignored", "functions_inlined",
                                          "inplace_out_of_place", "broadcast_channel_growable", "heads_concatenated")}


# -- pytest plugin --------------------------------------------------------------------------------------------


def pytest_addoption(parser):
    parser.addoption("--fault", default=None, choices=sorted(FAULTS), help="inject this fault (fault_injection.py)")


def pytest_configure(config):
    name = config.getoption("--fault")
    if name:
        FAULTS[name]()


# -- runner ---------------------------------------------------------------------------------------------------


def run(fault: str | None) -> tuple[int, list[str]]:
    tests = FAULT_TESTS.get(fault, TESTS) if fault else sorted(set(TESTS).union(*FAULT_TESTS.values()))
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-p", "tests.fault_injection", *tests,
           "-m", "not slow"]
    if fault:
        cmd += ["--fault", fault]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True)
    failed = re.findall(r"^FAILED (\S+)", proc.stdout, flags=re.M)
    return proc.returncode, failed


def main(argv: list[str]) -> int:
    names = argv or list(FAULTS)
    unknown = [n for n in names if n not in FAULTS]
    if unknown:
        print(f"unknown fault(s) {unknown}; known: {', '.join(FAULTS)}")
        return 2
    missed = []
    print("| fault | tests that went red |\n| --- | --- |")
    for name in names:
        rc, failed = run(name)
        caught = rc != 0 and failed
        print(f"| {name} | {', '.join(f.split('::')[-1] for f in failed) if caught else 'NONE (missed)'} |")
        if not caught:
            missed.append(name)
    rc, failed = run(None)
    print(f"| (no fault) | {'none: clean run passes' if rc == 0 else ', '.join(failed) or f'exit {rc}'} |")
    return 1 if missed or rc != 0 else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
