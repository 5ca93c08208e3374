"""Issue 16 (storage): a finished task's masks cost exactly 1 bit per unit, and a checkpoint holds the weight
bank once -- about what serving every task needs -- while restoring it exactly."""

import io
import math

import pytest
import torch

from grownfx.engine import masks as M
from grownfx.engine.banks import MaskedLayer
from grownfx.engine.layers import FREE, PerTask, TaskParameter
from test_steps import CLASSES, data, fresh_net, make_net, outputs, train


def learned_net(tasks: int = 3):
    net = make_net()
    for t in range(tasks):
        tt = net.add_task(CLASSES)
        if t:
            net.grow(ratio=0.5)  # grown units; task t re-trains what earlier tasks released
        train(net, tt)
        net.freeze_task(tt)
    return net


def serving_bytes(net) -> int:
    """What serving every finished task needs: the frozen bank once, each task's own tensors (norms, heads,
    biases, free parameters) and its masks at one bit per unit."""
    total = 0
    for m in net.modules():
        if isinstance(m, MaskedLayer):
            total += m.frozen.numel() * m.frozen.element_size()
        elif isinstance(m, PerTask):
            total += sum(t.numel() * t.element_size() for c in m.copies for t in c.state_dict().values())
        elif isinstance(m, TaskParameter):
            total += sum(p.numel() * p.element_size() for p in m.copies)
    units = sum(math.prod(m.mask_shapes[t]) for m in net.masked_layers() for t in m.mask_shapes)
    return total + units / 8


def test_a_task_masks_are_one_bit_string_of_one_bit_per_unit():
    net = learned_net()
    sd = net.state_dict()
    assert not [k for k in sd if ".mask_" in k]  # no per-layer (byte-padded) masks
    for t in range(3):
        units = sum(math.prod(m.mask_shapes[t]) for m in net.masked_layers())
        assert sd[f"task_masks.{t}"].numel() == math.ceil(units / 8) == net.mask_bytes(t)
        # the bit string holds exactly the layers' masks, in module order
        bits = M.unpack_bits(sd[f"task_masks.{t}"], (units,))
        layers = [M.unpack_bits(getattr(m, f"mask_{t}"), m.mask_shapes[t]).reshape(-1) for m in net.masked_layers()]
        assert torch.equal(bits, torch.cat(layers))


def test_a_checkpoint_holds_the_bank_once_and_restores_exactly():
    net = learned_net()
    sd = net.state_dict()
    # owner follows from the masks and frozen from the weight: neither is stored
    assert not [k for k in sd if k.endswith((".frozen", ".owner"))]
    stored = sum(v.numel() * v.element_size() for v in sd.values())
    assert stored <= 1.05 * serving_bytes(net)  # measured 1.013 (the counters of the norms, the generator)
    buf = io.BytesIO()
    torch.save(sd, buf)
    assert buf.tell() <= stored + 1024 * len(sd)  # the file: the tensors plus a zip record each
    other = fresh_net(net)
    for a, b in zip(net.masked_layers(), other.masked_layers()):
        assert torch.equal(a.owner, b.owner) and torch.equal(a.frozen, b.frozen) and torch.equal(a.weight, b.weight)
    x, _ = data()
    ref, got = outputs(net, x), outputs(other, x)
    assert all(torch.equal(ref[t], got[t]) for t in ref)


def test_what_does_not_follow_is_stored_never_lost():
    """If `owner` or `frozen` ever disagree with what the masks and the weight say, they are saved as they are."""
    net = learned_net(1)
    t = net.add_task(CLASSES)
    net.grow(ratio=0.5)
    train(net, t)  # a checkpoint in the middle of a task: its grown units are free
    bank = next(m for m in net.masked_layers() if bool((m.owner == FREE).any()))
    with torch.no_grad():
        bank.frozen[bank.owner == FREE] = 0.5  # a value on a free unit: not derivable from `weight`
    sd = net.state_dict()
    assert any(k.endswith(".frozen") for k in sd)
    other = fresh_net(net)
    assert all(torch.equal(a.frozen, b.frozen) for a, b in zip(net.masked_layers(), other.masked_layers()))


def test_channel_units_are_stored_once_too():
    """granularity 'channel' (a Linear's unit: a block of input columns): owners and the frozen bank follow
    from the masks and the weight there as well, and restore exactly."""
    import grownfx
    from grownfx.engine import state as net_state
    from grownfx.models import build_backbone

    def make():
        torch.manual_seed(0)
        return grownfx.prepare(build_backbone("lenet5", CLASSES), torch.randn(2, 3, 32, 32), 0.5,
                               granularity="channel", seed=0)

    net = make()
    x = torch.randn(8, 3, 32, 32)
    for t in range(3):
        tt = net.add_task(CLASSES)
        if t:
            net.grow(ratio=0.25)
        p = net.trainable_parameters()
        opt = torch.optim.SGD(p["weights"] + p["masks"], lr=0.05)
        net.train()
        for _ in range(3):
            opt.zero_grad()
            net(x, task=tt).logsumexp(1).mean().backward()
            opt.step()
        net.freeze_task(tt)
    assert any(m.unit_cols > 1 for m in net.masked_layers())
    sd = net.state_dict()
    assert not [k for k in sd if k.endswith((".frozen", ".owner"))]
    other = net_state.restore_net(make(), net_state.net_structure(net), sd)
    for a, b in zip(net.masked_layers(), other.masked_layers()):
        assert torch.equal(a.owner, b.owner) and torch.equal(a.frozen, b.frozen)
    net.eval(), other.eval()
    with torch.no_grad():
        assert all(torch.equal(net(x, task=t), other(x, task=t)) for t in range(3))


def test_a_checkpoint_restores_a_group_that_more_than_doubled_in_one_growth():
    """The structure is rebuilt task by task from the births: a task that added more channels than the group had
    (ratio 2) must be rebuilt as width + its channels, not the other way round."""
    net = make_net()
    t0 = net.add_task(CLASSES)
    train(net, t0)
    net.freeze_task(t0)
    t1 = net.add_task(CLASSES)
    net.grow(ratio=2.0)
    train(net, t1)
    net.freeze_task(t1)
    other = fresh_net(net)
    assert other.structure.widths == net.structure.widths
    x, _ = data()
    ref, got = outputs(net, x), outputs(other, x)
    assert all(torch.equal(ref[t], got[t]) for t in ref)


@pytest.mark.parametrize("added", [True, False], ids=["task-added", "before-the-next-task"])
def test_a_checkpoint_after_growth_past_the_last_freeze_restores_exactly(added):
    """Channels grown after the last freeze are rebuilt too: for the task being learned, or for the next task
    before it is added (born at a task index the checkpoint has no task for yet)."""
    net = learned_net(1)
    if added:
        t = net.add_task(CLASSES)
    net.grow(ratio=0.5)
    if added:
        train(net, t)
    other = fresh_net(net)
    assert other.structure.widths == net.structure.widths
    x, _ = data()
    ref, got = outputs(net, x), outputs(other, x)
    assert all(torch.equal(ref[k], got[k]) for k in ref)
