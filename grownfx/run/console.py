"""The runner's console and TensorBoard output: one line per finished task, and the TensorBoard writer."""

from __future__ import annotations

from pathlib import Path

from grownfx.learn.records import TaskRecord


def _task_line(r: TaskRecord, row: list[float], full: int, growth=None) -> str:
    size = f"{r.params_stored / full:.2f}x" if full else f"{r.params_stored} params"
    grew = _growth_text(r, growth)
    target = f" target {r.target:.1f}" if r.target is not None else ""
    return (f"task {r.index + 1}: val {r.val_acc:.1f}{target}, test {row[-1]:.1f}, avg {sum(row) / len(row):.1f}, "
            f"{grew}, model {size}, {r.time_s:.1f}s")


def _growth_text(r: TaskRecord, growth=None) -> str:
    """What the task's growth did, and (GROWN's `growth` config given) why a task below its target stopped."""
    channels = sum(r.growth.values())
    if r.from_seed and r.growth_rounds:  # learned by sparse growth from the seed: its first round is stage 1
        text = (f"grew {channels} ch from the seed" if r.grew
                else f"kept the seed width (sparse growth pruned all {r.pruned_candidates} candidate channels)")
        rounds = r.growth_rounds - 1  # its first round is its stage 1
    else:
        text = f"grew {channels} ch" if r.grew else "no growth"
        rounds = r.growth_rounds
        if r.growth_rounds and not r.grew:
            text += f" (growth pruned all {r.pruned_candidates} candidate channels)"
    if rounds and r.grew:
        text += f" in {rounds} growth round{'s' if rounds != 1 else ''}"
    if growth is not None and r.target is not None and r.val_acc < r.target and growth.when != "always":
        if r.growth_rounds >= growth.max_rounds:
            text += f"; below target: growth budget spent (growth.max_rounds={growth.max_rounds})"
        else:
            text += (f"; below target: every growth site is at its width cap "
                     f"(growth.max_width={growth.max_width:g}x the full width)")
    return text


def _tensorboard(out: Path):
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:  # tensorboard is a dependency, but a run should not die without it
        return None
    return SummaryWriter(log_dir=str(out / "tb"))
