"""Behaviours that survivors of the sampled mutation run showed untested (`python -m scripts.mutation --sample 400
--seed 0`, docs/mutation/sample400.md), each checked by what a user would read or see go wrong.

Every test here failed on its mutant and passes on the code (docs/testing.md, "What to do with a survivor").
"""

import pytest

from grownfx.learn.records import add_epoch_time, stage_breakdown


def test_a_task_s_other_time_is_what_its_stages_leave_of_it():
    """TaskRecord.stage_s: the stages' seconds plus "other", the rest of the task's time; never negative."""
    times: dict = {}
    add_epoch_time(times, {"stage": "stage1", "seconds": 1.5})
    add_epoch_time(times, {"stage": "stage1", "seconds": 0.5})
    add_epoch_time(times, {"stage": "grow", "seconds": 1.0})
    out = stage_breakdown(times, 5.0)
    assert out == {"stage1": 2.0, "grow": 1.0, "other": 2.0}
    assert sum(out.values()) == 5.0
    # clocks read at different moments can make the stages add up to more than the task: "other" is then 0
    assert stage_breakdown({"stage1": 3.0}, 2.5)["other"] == 0.0
