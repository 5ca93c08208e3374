"""Issue 21: the context split by concern and owner (grownfx/engine/context.py, docs/architecture.md §4).

* the computing task is named by the caller (net(x, task=t) or net.computing(t)), is re-entrant, and is gone when
  the call ends; a net with several tasks refuses a forward without one
* constructing the GROWN learner leaves the net alone; install() is the explicit step
* the schedule (gate beta, binarised gates, Gumbel temperature) is the method's: not saved with the net, and
  checkpoints written with it (and with the old `gates` name) still restore
"""

import pytest
import torch

import grownfx
from grownfx.engine import state as net_state
from grownfx.learn.gates import CandidateGates
from grownfx.learn.learner import GrownLearner
from grownfx.models import build_backbone
from grownfx.recipe.schema import GrowthConfig, MasksConfig, TrainingConfig

SHAPE, CLASSES = (1, 8, 8), 3


def make_net():
    torch.manual_seed(0)
    return grownfx.prepare(build_backbone("small_cnn", CLASSES), torch.randn(2, *SHAPE), seed_width=0.5, seed=0)


def two_tasks(gates: bool = False):
    """Task 0 finished, task 1 learning and grown (by gated candidates, their gates open at beta 4, or plainly)."""
    net = make_net()
    net.add_task(CLASSES)
    net.freeze_task(0)
    net.add_task(CLASSES)
    if gates:
        g = CandidateGates.of(net)
        for grp in net.growable_groups:
            g.grow(net, channels=2 * grp.granularity, groups=[grp.id])
        with torch.no_grad():
            for s in g.values():
                s.copy_(torch.randn(s.shape, generator=torch.Generator().manual_seed(1)))
        g.beta = 4.0
    else:
        net.grow(ratio=0.5)
    return net


def test_a_forward_names_its_task_unless_there_is_only_one():
    x = torch.randn(4, *SHAPE)
    net = make_net()
    net.add_task(CLASSES)
    net.eval()
    with torch.no_grad():
        assert torch.equal(net(x), net(x, task=0))  # one task: it need not be named
        net.add_task(CLASSES)
        with pytest.raises(ValueError, match="name the task"):
            net(x)
        with pytest.raises(IndexError, match="task 2 does not exist"):
            net(x, task=2)


def test_the_computing_task_is_a_scope():
    net = two_tasks()
    net.eval()
    x = torch.randn(4, *SHAPE)
    layer = net.masked_layers()[0]
    with pytest.raises(RuntimeError, match="no task is being computed"):
        layer.effective_weight()  # outside any forward: no task left behind by the last one
    with torch.no_grad():
        ref = {t: net(x, task=t) for t in (0, 1)}
        with net.computing(0):
            w0 = layer.effective_weight()
            with net.computing(1):
                assert torch.equal(net(x, task=0), ref[0])  # a call inside names its own task...
                assert layer.effective_weight().shape != w0.shape  # ...and leaves this scope's task (1, grown)
            assert torch.equal(layer.effective_weight(), w0)  # the previous task again
        with pytest.raises(ValueError):
            with net.computing(1):
                raise ValueError
        with pytest.raises(RuntimeError, match="no task is being computed"):
            layer.effective_weight()  # the scope ended with the exception too
    with pytest.raises(IndexError):
        net.computing(5)


def test_constructing_the_learner_leaves_the_net_alone():
    net = make_net()
    before = {k: v.clone() for k, v in net.state_dict().items()}
    learner = GrownLearner(net, training=TrainingConfig(epochs=1), growth=GrowthConfig(), masks=MasksConfig())
    assert net.channel_scale is None and net.num_tasks == 0
    assert net.state_dict().keys() == before.keys()
    gates = learner.install()  # the explicit step: the device, GROWN's gates
    assert net.channel_scale is gates and learner.install() is gates
    assert set(net.state_dict()) == set(before)  # no gate yet (no candidate channel)


def test_the_schedule_is_not_saved_with_the_net():
    net = two_tasks(gates=True)
    gates = net.channel_scale
    gates.beta, gates.hard = 7.0, True
    net.set_mask_temperature(3.0)
    structure = net_state.net_structure(net)
    assert not {"beta", "temperature", "hard_gates", "gates"} & set(structure)


def test_a_checkpoint_from_before_issue_21_restores():
    """Written with the channel scale named `gates` (structure and state-dict keys) and the learner's schedule in
    the net's structure: restored as it was, the schedule set by the method."""
    net = two_tasks(gates=True)
    x = torch.randn(4, *SHAPE)
    net.eval()
    with torch.no_grad():
        ref = {t: net(x, task=t) for t in (0, 1)}
    structure = net_state.net_structure(net)
    old = {k: v for k, v in structure.items() if k != "channel_scale"}
    old.update(gates=structure["channel_scale"], beta=4.0, temperature=None)
    old["policy"] = {**structure["policy"], "gates": True, "cs": {"init": 0.0, "final_beta": 200.0}}
    state = {(k.replace("channel_scale.", "gates.", 1) if k.startswith("channel_scale.") else k): v
             for k, v in net.state_dict().items()}
    assert any(k.startswith("gates.") for k in state)
    other = make_net()
    CandidateGates.of(other).beta = 4.0
    net_state.restore_net(other, old, state)
    other.eval()
    with torch.no_grad():
        assert all(torch.equal(other(x, task=t), ref[t]) for t in (0, 1))
