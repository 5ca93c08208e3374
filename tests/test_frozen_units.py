"""Issue 21: no optimiser can move a finished task's units, whatever it is and however it was built.

The learning task reads the units earlier tasks own from the bank's `frozen` buffer, never from the Parameter an
optimiser updates, so what any optimiser does to those entries of `weight` is never read.  Each case trains task 2
with a user's own loop calling `step()` (or no optimiser object at all) and checks, at every step, that task 1
computes bit for bit what it computed when it finished; then that freezing task 2 raises nothing and changes
nothing about what task 2 computes.
"""

import copy

import pytest
import torch
import torch.nn.functional as F

import grownfx
from grownfx.engine.layers import FREE
from grownfx.models import build_backbone

SHAPE, CLASSES = (1, 8, 8), 3


def make_net():
    torch.manual_seed(0)
    return grownfx.prepare(build_backbone("small_cnn", CLASSES), torch.randn(2, *SHAPE), seed_width=0.5, seed=0)


def batch(seed=1, n=32):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, *SHAPE, generator=g), torch.randint(0, CLASSES, (n,), generator=g)


def params(net):
    p = net.trainable_parameters()
    return p["weights"], p["masks"]


def first_task(net, build):
    """Task 1 grown by half (attentive masks on the new units), trained with the optimiser `build` makes, then
    about a third of its grown units dropped by their masks: those stay free for task 2, so task 2 trains the
    banks' Parameters, whose other entries task 1 now owns.  Returns the optimiser (a kept one goes on)."""
    t0 = net.add_task(CLASSES)
    net.grow(ratio=0.5)
    opt = build([m.weight for m in net.masked_layers()], [], None)
    for _ in train(net, t0, opt):
        pass
    g = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for m in net.masked_layers():
            if m.score is not None:
                m.score.copy_(torch.randn(m.score.shape, generator=g) * 0.01)
    net.freeze_task(t0)
    assert all(bool((m.owner == FREE).any()) and m.weight.requires_grad for m in net.masked_layers())
    return t0, opt


def owned_entries(layer) -> torch.Tensor:
    """Bool shaped like the bank: the weights of units a finished task owns."""
    owner = layer.owner != FREE
    if layer.unit_cols > 1:
        return owner.repeat_interleave(layer.unit_cols, dim=1)
    return owner.view(owner.shape + (1,) * (layer.weight.dim() - owner.dim())).expand_as(layer.weight)


def sgd_kept(fused):  # built for task 1 over the banks' weights and kept for task 2: momentum from task 1 moves them
    return lambda weights, masks, kept: kept or torch.optim.SGD(weights, lr=0.05, momentum=0.9, fused=fused)


def adam_kept(fused):
    return lambda weights, masks, kept: kept or torch.optim.Adam(weights, lr=1e-2, fused=fused)


def adamw(fused):  # a fresh optimiser that decays every entry of the weights it holds
    return lambda weights, masks, kept: torch.optim.AdamW(weights, lr=1e-2, weight_decay=0.5, fused=fused)


class HandWritten:
    """No torch.optim at all: a user's loop updating the tensors itself (SGD with weight decay)."""

    def __init__(self, weights):
        self.weights = list(weights)

    def zero_grad(self):
        for p in self.weights:
            p.grad = None

    @torch.no_grad()
    def step(self):
        for p in self.weights:
            if p.grad is not None:
                p.add_(p.grad + 0.5 * p, alpha=-0.05)


OPTIMISERS = {
    "sgd-momentum-kept": sgd_kept(False), "sgd-momentum-kept-fused": sgd_kept(True),
    "adam-kept": adam_kept(False), "adam-kept-fused": adam_kept(True),
    "adamw": adamw(False), "adamw-fused": adamw(True),
    "hand-written": lambda weights, masks, kept: HandWritten(weights),
}


def train(net, task, opt, steps=4):
    """A user's loop: the bank weights with `opt`, everything else the task trains with a fresh Adam."""
    weights, masks = params(net)
    banks = {id(m.weight) for m in net.masked_layers()}
    rest = torch.optim.Adam([p for p in weights if id(p) not in banks] + masks, lr=1e-2)
    x, y = batch(task)
    net.train()
    for _ in range(steps):
        opt.zero_grad()
        rest.zero_grad()
        F.cross_entropy(net(x, task=task), y).backward()
        opt.step()
        rest.step()
        yield


@pytest.mark.parametrize("name", list(OPTIMISERS))
def test_no_optimiser_moves_a_finished_task(name):
    build = OPTIMISERS[name]
    net = make_net()
    x, _ = batch(seed=9)
    t0, opt = first_task(net, build)
    banks = [m.weight for m in net.masked_layers()]
    net.eval()
    with torch.no_grad():
        ref0 = net(x, task=t0)
    t1 = net.add_task(CLASSES)  # no growth: the banks keep their Parameters, so a kept optimiser still holds them
    opt = build([m.weight for m in net.masked_layers()], [], opt)
    assert [m.weight for m in net.masked_layers()] == banks
    for _ in train(net, t1, opt):
        net.eval()
        with torch.no_grad():
            assert torch.equal(net(x, task=t0), ref0)
        net.train()
    # the case is a real one: the optimiser did move entries of the Parameter on units task 1 owns
    moved = [bool((m.weight.detach() != m.frozen)[owned_entries(m)].any()) for m in net.masked_layers()]
    assert any(moved), "the optimiser moved no owned entry: this case tests nothing"
    net.eval()
    with torch.no_grad():
        before = net(x, task=t1)
    net.freeze_task(t1)  # never raises
    with torch.no_grad():
        assert torch.equal(net(x, task=t1), before)
        assert torch.equal(net(x, task=t0), ref0)


def test_the_learning_task_never_reads_owned_entries_of_the_parameter():
    """Poison every owned entry of every bank's Parameter with NaN: the learning task computes the same finite
    logits, in training and evaluation, with the same gradients on what it trains; freezing stores the task it
    computed."""
    net = make_net()
    t0, _ = first_task(net, lambda weights, masks, kept: torch.optim.SGD(weights, lr=0.05))
    t1 = net.add_task(CLASSES)
    x, y = batch(seed=5)

    def run(net):  # one training step's forward and backward (train-mode norms update: each run on a copy)
        net.train()
        torch.manual_seed(3)  # the selective masks' Gumbel noise
        loss = F.cross_entropy(net(x, task=t1), y)
        loss.backward()
        grads = [m.weight.grad for m in net.masked_layers()]
        net.eval()
        with torch.no_grad():
            return loss.detach(), net(x, task=t1), grads

    poisoned = copy.deepcopy(net)
    with torch.no_grad():
        for m in poisoned.masked_layers():
            m.weight[owned_entries(m)] = float("nan")
    loss, logits, grads = run(net)
    loss2, logits2, grads2 = run(poisoned)
    assert torch.isfinite(logits2).all() and torch.equal(loss2, loss) and torch.equal(logits2, logits)
    assert all(torch.equal(a, b) for a, b in zip(grads, grads2))
    poisoned.freeze_task(t1)
    with torch.no_grad():
        assert torch.equal(poisoned(x, task=t1), logits)


def test_a_checkpoint_holds_the_bank_once_whatever_the_parameter_holds():
    """The state dict stores the canonical bank (the frozen values on owned units), so `frozen` is not stored
    again, and a restored net computes what the live one computes."""
    from grownfx.engine import state as net_state

    net = make_net()
    t0, opt = first_task(net, sgd_kept(False))
    t1 = net.add_task(CLASSES)
    for _ in train(net, t1, opt):  # momentum kept from task 1 moves the owned entries of the Parameter
        pass
    state = net.state_dict()
    assert not any(k.endswith(".frozen") for k in state)
    for name, m in net.named_modules():
        if hasattr(m, "frozen"):
            owned = owned_entries(m)
            assert torch.equal(state[f"{name}.weight"][owned], m.frozen[owned])
    x, _ = batch(seed=5)
    other = net_state.restore_net(make_net(), net_state.net_structure(net), state)
    net.eval(), other.eval()
    with torch.no_grad():
        for t in (t0, t1):
            assert torch.equal(other(x, task=t), net(x, task=t))
