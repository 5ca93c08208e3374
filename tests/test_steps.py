"""Issue 10A: each step of a task's life checked against the network right BEFORE that step.

Every reference output is captured before the step it checks, on the same inputs, in evaluation mode:

* freeze_task(t)   task t's logits and accuracy right before freezing == right after (bit for bit)
* settle (gates)   the network right after settling == the last epoch's network (binarised gates)
* growth           the learning task's outputs unchanged up to summation order (tolerance per dtype, below);
                   finished tasks bit for bit
* old-task masks   a finished task computes with its masked, owned slice: the logits it had while learning,
                   after later tasks re-train its released weights and grow
* caches           after resizing, restoring, switching tasks and changing a task's state, outputs equal a
                   fresh net restored from the same state

tests/fault_injection.py breaks each step on purpose and checks that these tests go red.
"""

import copy

import pytest
import torch
import torch.nn.functional as F

import grownfx
from grownfx.engine import masks as M
from grownfx.engine import state as net_state
from grownfx.engine.banks import MaskedLayer
from grownfx.engine.context import OFF
from grownfx.learn.gates import CandidateGates
from grownfx.learn.training import make_optimizer
from grownfx.recipe.schema import OptimConfig
from grownfx.models import build_backbone

SHAPE = (1, 8, 8)
CLASSES = 3

# Growth appends channels whose consumer columns are exactly zero, so every added product is 0 * x and the
# function is unchanged; what the backend may change is the ORDER in which it sums the unchanged products
# (its GEMM/conv blocking depends on the width).  That is rounding of a few ulps of the output scale:
# measured 1.1e-6 (float32) and 1.8e-15 (float64) on LeNet-5.  Bounds one decade above; a real change
# (a non-zero new column) is of order 1.
GROWTH_TOL = {torch.float32: 1e-5, torch.float64: 1e-13}


def rel_err(a, b) -> float:
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-12))


def make_net(dtype=torch.float32):
    torch.manual_seed(0)
    return grownfx.prepare(build_backbone("small_cnn", CLASSES).to(dtype), torch.randn(2, *SHAPE, dtype=dtype),
                           seed_width=0.5, seed=0)


def fresh_net(net):
    """A new net restored from `net`'s state: computes everything from scratch (no cache ever warmed).  The gates'
    schedule is the method's, not the net's: the method (here, this helper) sets it on the restored gates."""
    other = make_net(next(net.parameters()).dtype)
    if net.channel_scale is not None:
        CandidateGates.of(other).beta = net.channel_scale.beta
    return net_state.restore_net(other, net_state.net_structure(net), net.state_dict())


def trainable(net) -> dict:
    """The learning task's parameters by optimiser, as the learner collects them (gates: the method's)."""
    gates = list(net.channel_scale.parameters()) if net.channel_scale is not None else []
    return {**net.trainable_parameters(), "gates": gates}


def data(dtype=torch.float32, n=32):
    g = torch.Generator().manual_seed(1)
    return torch.randn(n, *SHAPE, generator=g, dtype=dtype), torch.randint(0, CLASSES, (n,), generator=g)


def train(net, t, steps=3):
    x, y = data(next(net.parameters()).dtype)
    p = trainable(net)
    opt = torch.optim.SGD(p["weights"] + p["masks"] + p["gates"], lr=0.05)
    net.train()
    for _ in range(steps):
        opt.zero_grad()
        F.cross_entropy(net(x, task=t), y).backward()
        opt.step()
    net.eval()


def scramble_masks(net):
    """Unit-mask scores around the threshold (5e-3): about a third of the masked units end up dropped."""
    g = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for m in net.masked_layers():
            if m.score is not None:
                m.score.copy_(torch.randn(m.score.shape, generator=g) * 0.01)


def open_gates(net, beta=5.0):
    """Gate scores of both signs at a beta where kept gates are not 1: settling drops some, rescales others."""
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for s in net.channel_scale.values():
            s.copy_(torch.randn(s.shape, generator=g))
    net.channel_scale.beta = beta


def gated_growth(net, per_site=4):
    gates = CandidateGates.of(net)
    for g in net.growable_groups:
        gates.grow(net, channels=per_site * g.granularity, groups=[g.id])
    return gates


@torch.no_grad()
def outputs(net, x):
    net.eval()
    return {t: net(x, task=t) for t in range(net.num_tasks)}


def gated_first_task():
    """Task 0 learned with gated growth, then given partial unit masks and open gates (not yet settled)."""
    net = make_net()
    t0 = net.add_task(CLASSES)
    gates = gated_growth(net)
    train(net, t0)
    scramble_masks(net)
    open_gates(net)
    return net, t0, gates


def history():
    """Task 0: gated growth, trained, masks, settled and frozen.  Task 1: learning, grown, masks trained."""
    net, t0, gates = gated_first_task()
    gates.settle(net)
    net.freeze_task(t0)
    t1 = net.add_task(CLASSES)
    net.grow(ratio=0.5)
    train(net, t1)
    scramble_masks(net)
    return net


# -- freeze_task ----------------------------------------------------------------------------------------------


def test_freeze_keeps_the_task_it_freezes_bit_for_bit():
    net = history()
    x, y = data()
    with torch.no_grad():
        before = net(x, task=1)
    net.freeze_task(1)
    with torch.no_grad():
        after = net(x, task=1)
    assert torch.equal(after, before)
    assert (after.argmax(1) == y).float().mean() == (before.argmax(1) == y).float().mean()
    assert any(bool((~used_units(m, 1)).any()) for m in net.masked_layers()), "no unit dropped by task 1's masks"


def used_units(layer: MaskedLayer, task: int) -> torch.Tensor:
    """The units finished task `task` stored as used, shaped like the bank (broadcast over kernels)."""
    used = M.unpack_bits(getattr(layer, f"mask_{task}"), layer.mask_shapes[task]).bool()
    return used.view(used.shape + (1,) * (layer.weight.dim() - used.dim()))


def test_freeze_of_a_first_task_with_gates_and_masks():
    net, t0, _ = gated_first_task()
    x, _ = data()
    with torch.no_grad():
        before = net(x, task=t0)
    net.freeze_task(t0)  # settles the gates, then freezes
    with torch.no_grad():
        after = net(x, task=t0)
    assert rel_err(after, before) <= GROWTH_TOL[torch.float32]  # settling removes channels: summation order


# -- settle ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_settled_network_is_the_last_epochs_binarised_network(dtype):
    net = make_net(dtype)
    t0 = net.add_task(CLASSES)
    gates = gated_growth(net)
    train(net, t0)
    open_gates(net)
    x, _ = data(dtype)
    hard = {k: s.detach().clone() for k, s in gates.items()}
    assert any((s <= 0).any() for s in hard.values()) and any((s > 0).any() for s in hard.values())
    widths = dict(net.structure.widths)
    twin = copy.deepcopy(net)  # train-mode forwards update norm statistics: the twin takes those
    with torch.no_grad():
        net.eval()
        before = net(x, task=t0)  # evaluation = binarised gates, as the last epoch of a round trains them
        twin.train()
        twin.channel_scale.hard = True  # the last epoch's forward (batch statistics, binarised gates)
        last_epoch = twin(x, task=t0)
    dropped = gates.settle(net)
    twin.channel_scale.settle(twin)
    with torch.no_grad():
        after = net(x, task=t0)
        after_train = twin(x, task=t0)
    assert sum(dropped.values()) > 0 and any(net.structure.widths[g] > widths[g] - hard[str(g)].numel() for g in widths)
    assert rel_err(after, before) <= GROWTH_TOL[dtype]
    assert rel_err(after_train, last_epoch) <= GROWTH_TOL[dtype]


# -- growth ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("backbone,shape", [("small_cnn", SHAPE), ("lenet5", (3, 32, 32))])
def test_growth_keeps_outputs(dtype, backbone, shape):
    torch.manual_seed(0)
    net = grownfx.prepare(build_backbone(backbone, CLASSES).to(dtype), torch.randn(2, *shape, dtype=dtype),
                          seed_width=0.5)
    t0 = net.add_task(CLASSES)
    with torch.no_grad():
        for p in net.trainable_parameters()["weights"]:
            p.add_(torch.randn_like(p) * 0.05)
    x = torch.randn(16, *shape, dtype=dtype)
    ref0 = outputs(net, x)[t0]
    net.grow(ratio=0.5)  # the learning task: unchanged up to summation order
    assert rel_err(outputs(net, x)[t0], ref0) <= GROWTH_TOL[dtype]
    net.freeze_task(t0)
    ref0 = outputs(net, x)[t0]
    t1 = net.add_task(CLASSES)
    ref1 = outputs(net, x)[t1]
    net.grow(ratio=0.5)  # a finished task: bit for bit (its new channels are sliced away, not multiplied by 0)
    out = outputs(net, x)
    assert torch.equal(out[t0], ref0)
    assert rel_err(out[t1], ref1) <= GROWTH_TOL[dtype]


# -- old tasks compute with their masked, owned slice ---------------------------------------------------------


def test_finished_task_computes_with_its_masked_slice():
    net, t0, _ = gated_first_task()
    CandidateGates.of(net).settle(net)
    x, _ = data()
    ref = outputs(net, x)[t0]  # task 0 while it is learned: its unit masks applied
    net.freeze_task(t0)
    assert torch.equal(outputs(net, x)[t0], ref)
    t1 = net.add_task(CLASSES)
    net.grow(ratio=0.5)
    train(net, t1, steps=5)  # re-trains the weights task 0 released, trains the grown ones
    assert torch.equal(outputs(net, x)[t0], ref)
    net.freeze_task(t1)
    # the test can fail: units task 0 dropped now hold task 1's non-zero values in task 0's slice of the bank
    assert any(bool((~used_units(m, 0) & (m._visible_bank(0) != 0)).any()) for m in net.masked_layers())
    assert torch.equal(outputs(net, x)[t0], ref)
    assert torch.equal(fresh_net(net)(x, task=t0), ref)


# -- one cache, invalidated by structure changes --------------------------------------------------------------


def test_cached_outputs_always_equal_a_fresh_computation():
    net = history()
    gated_growth(net, per_site=2)  # open gates on the learning task: their cache key too
    open_gates(net)
    x, _ = data()

    def same_as_fresh(step):
        live = outputs(net, x)
        fresh = outputs(fresh_net(net), x)
        for t in live:
            assert torch.equal(live[t], fresh[t]), f"after {step}: task {t} differs from a fresh computation"

    same_as_fresh("warming the caches")
    for order in ((1, 0, 1), (0, 1, 0)):  # switch tasks
        with torch.no_grad():
            for t in order:
                net(x, task=t)
        same_as_fresh(f"switching tasks {order}")
    net.grow(ratio=0.25)  # resize
    same_as_fresh("growth")
    layer = net.masked_layers()[1]
    free = (layer.owner == -1).view(layer.owner.shape + (1,) * (layer.weight.dim() - layer.owner.dim()))
    assert bool(free.any())
    with torch.no_grad():
        layer.weight.add_(free.to(layer.weight.dtype))  # the learning task's state changes in place (its own units)
    same_as_fresh("an in-place weight change")
    # torch's fused optimisers (make_optimizer's) update in place without bumping `_version`: weights, mask
    # scores and gate scores all move here, and the next evaluation must see it.  Evaluations inside
    # net.inference() share the learning task's weights; the scope ends before the step
    with net.inference():
        warm = outputs(net, x)
        assert all(torch.equal(warm[t], again) for t, again in outputs(net, x).items())
    p = trainable(net)
    net.train()
    F.cross_entropy(net(x, task=1), data()[1]).backward()
    for group, lr in (("weights", 0.5), ("masks", 0.05), ("gates", 5.0)):
        opt = make_optimizer(p[group], OptimConfig(name="sgd", lr=lr, momentum=0.0))
        assert opt.defaults.get("fused") and all(q.grad is not None for q in p[group])
        opt.step()
    same_as_fresh("a fused optimiser step")
    with net.inference():
        assert not torch.equal(outputs(net, x)[1], warm[1]), "the step moved nothing the learning task computes"
        same_as_fresh("a fused optimiser step, inside a new inference scope")
    snapshot = {k: v.clone() for k, v in net.state_dict().items()}
    layer.set_kind(torch.rand(layer.kind.shape, generator=torch.Generator().manual_seed(4)) < 0.5, OFF)
    same_as_fresh("changing unit kinds")
    net.channel_scale.beta = 50.0
    same_as_fresh("changing the gate temperature")
    net_state.reload_state(net, snapshot)  # restore a snapshot in place (kinds and weights copied back)
    net.channel_scale.beta = 5.0
    same_as_fresh("restoring a snapshot")
    restored = fresh_net(net)
    outputs(restored, x)  # warm the restored net's caches, then change it
    restored.grow(ratio=0.25)
    net.grow(ratio=0.25)
    live, again = outputs(restored, x), outputs(fresh_net(net), x)
    assert all(torch.equal(live[t], again[t]) for t in live), "a restored net's caches went stale"
    net.freeze_task(1)
    same_as_fresh("freezing")


# -- the learning task reads owned units from `frozen`, whatever the bank's Parameter holds there ----------------


def owned_entries(layer) -> torch.Tensor:
    owned = (layer.owner != -1).view(layer.owner.shape + (1,) * (layer.weight.dim() - layer.owner.dim()))
    return owned.expand_as(layer.weight)


@pytest.mark.parametrize("opt_name", ["sgd", "adamw"])
def test_weight_decay_never_moves_owned_units(opt_name):
    """Owned units get an exactly-zero gradient, and an optimiser that decays every entry does move their entries
    of the Parameter; the learning task never reads them: after a user's own loop with heavy weight decay its
    logits equal those computed with the frozen values in those entries, and freezing it changes nothing."""
    net = make_net()
    t0 = net.add_task(CLASSES)
    train(net, t0)
    net.freeze_task(t0)
    t1 = net.add_task(CLASSES)
    net.grow(ratio=0.5)  # free units: the banks' weights are trained, so the optimiser sees owned entries too
    x, y = data()
    p = net.trainable_parameters()
    cls = torch.optim.SGD if opt_name == "sgd" else torch.optim.AdamW
    opt = cls([{"params": p["weights"], "weight_decay": 0.5}, {"params": p["masks"], "weight_decay": 0.0}],
              lr=0.05)
    net.train()
    for _ in range(3):
        opt.zero_grad()
        F.cross_entropy(net(x, task=t1), y).backward()
        opt.step()
    banks = [m for m in net.masked_layers() if bool((m.owner != -1).any()) and m.weight.grad is not None]
    assert banks
    assert all(bool((m.weight.detach() != m.frozen)[owned_entries(m)].any()) for m in banks)  # decay moved them
    net.eval()
    with torch.no_grad():
        ref = net(x, task=t1)
        canonical = copy.deepcopy(net)
        for m in canonical.masked_layers():
            m.weight[owned_entries(m)] = m.frozen[owned_entries(m)]
        assert torch.equal(canonical(x, task=t1), ref)
    net.freeze_task(t1)
    with torch.no_grad():
        assert torch.equal(net(x, task=t1), ref)


def test_an_edit_of_owned_entries_changes_nothing():
    """Anything that moves a frozen weight's entry in the bank's Parameter (an optimiser, a user's edit) changes
    neither what the learning task computes nor what freezing stores: the task stored is the task computed."""
    net = make_net()
    t0 = net.add_task(CLASSES)
    train(net, t0)
    net.freeze_task(t0)
    t1 = net.add_task(CLASSES)
    net.grow(ratio=0.5)  # free units: the learning task trains rows of the banks whose other rows task 0 owns
    train(net, t1)
    x, _ = data()
    with torch.no_grad():
        before = net(x, task=t1)
        bank = next(m for m in net.masked_layers() if bool((m.owner != -1).any()))
        bank.weight[owned_entries(bank)] *= 0.9
        assert torch.equal(net(x, task=t1), before)
    net.freeze_task(t1)
    with torch.no_grad():
        assert torch.equal(net(x, task=t1), before)
