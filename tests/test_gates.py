"""Issue 10A: every gated candidate pool acts on the forward pass, whatever consumes its channels.

The gate of the site feeding the per-task head (small_cnn's classifier.1 -> classifier.3, LeNet's FC-500)
used to multiply nothing (the head is a per-task copy, not a masked bank): its grad was None, its
candidates were always dropped, and the last hidden layer never grew.
"""

import pytest
import torch
import torch.nn.functional as F

import grownfx
from grownfx.data import build_stream
from grownfx.learn.gates import CandidateGates
from grownfx.learn.learner import GrownLearner
from grownfx.models import build_backbone
from grownfx.recipe.schema import GrowthConfig, MasksConfig, OptimConfig, TrainingConfig
from tests.engine_checks import build


def _backbone(name):
    if name == "vit_b_16":  # one encoder block is enough: every block's MLP is the same kind of site
        import torchvision

        model = torchvision.models.vit_b_16(num_classes=10, image_size=32)
        model.encoder.layers = model.encoder.layers[:1]
        return model, torch.randn(4, 3, 32, 32)
    return build(name)


def _head_site(net):
    head = net.head_target
    return [g.id for g in net.growable_groups if any(b.target == head and b.role == "in" for b in g.members)]


@pytest.mark.parametrize("name,seed_width", [("small_cnn", 0.5), ("lenet5", 0.5), ("resnet18", 0.25),
                                             ("mobilenet_v2", 0.25), ("vit_b_16", 0.1)])
def test_every_gate_gets_a_gradient(name, seed_width):
    torch.manual_seed(0)
    model, x = _backbone(name)
    net = grownfx.prepare(model, x, seed_width=seed_width)
    t = net.add_task(10)
    gates = CandidateGates.of(net)
    sites = [g.id for g in net.growable_groups]
    for g in net.growable_groups:  # a few candidates each: one could be silenced by its ReLU on every sample
        gates.grow(net, channels=4 * g.granularity, groups=[g.id])
    x = torch.randn(8, *x.shape[1:])
    with torch.no_grad():  # non-zero consumer columns (growth starts them at zero, which zeroes the gradient)
        for p in net.trainable_parameters()["weights"]:
            if p.dim() >= 2:
                p.add_(torch.randn_like(p) * 0.05)
    net.train()
    F.cross_entropy(net(x, task=t), torch.arange(len(x)) % 10).backward()
    assert sorted(int(k) for k in gates) == sorted(sites)
    missing = [k for k, s in gates.items() if s.grad is None]
    zero = [k for k, s in gates.items() if s.grad is not None and not bool(s.grad.ne(0).any())]
    assert not missing and not zero, f"{name}: gates without gradient {missing}, with zero gradient {zero}"
    if name in ("small_cnn", "lenet5"):
        assert _head_site(net), "the site feeding the head is growable"


def test_site_feeding_the_head_grows_when_growth_is_free():
    torch.manual_seed(0)
    stream = build_stream({"name": "digits"}, seed=0)
    net = grownfx.prepare(build_backbone("small_cnn", 2), torch.randn(2, *stream.input_shape), seed_width=0.5)
    (head_site,) = _head_site(net)
    seed = net.structure.widths[head_site]
    training = TrainingConfig(epochs=3, optimizer=OptimConfig(name="adam", lr=1e-3))
    learner = GrownLearner(net, training=training, growth=GrowthConfig(max_rounds=1),
                           masks=MasksConfig(grown={"lam": 0.0}))
    rec = learner.learn(stream.tasks[0], target=101.0)  # unreachable target, growth unpenalised
    assert rec.growth_rounds == 1
    assert net.structure.widths[head_site] > seed, "no candidate of the site feeding the head was kept"


def test_export_of_a_learning_task_folds_the_gate_on_the_head():
    torch.manual_seed(0)
    net = grownfx.prepare(build_backbone("small_cnn", 3), torch.randn(2, 1, 8, 8), seed_width=0.5)
    t = net.add_task(3)
    gates = CandidateGates.of(net)
    (site,) = _head_site(net)
    gates.grow(net, channels=8, groups=[site])
    with torch.no_grad():
        for p in net.trainable_parameters()["weights"]:
            p.add_(torch.randn_like(p) * 0.05)
        gates[str(site)].copy_(torch.linspace(-1, 1, 8))  # some gates off, the others kept below 1 at beta 2
    gates.beta = 2.0
    x = torch.randn(8, 1, 8, 8)
    net.eval()
    with torch.no_grad():
        ref = net(x, task=t)
        assert (net.export(t, prune_unused=False)(x) - ref).abs().max() <= 1e-6 * ref.abs().max()
        gates[str(site)].fill_(-1.0)  # every candidate off: the head must not see them
        off = net(x, task=t)
    assert not torch.equal(off, ref)


def test_restoring_gates_needs_the_methods_scale_installed():
    from grownfx.engine import state as net_state

    torch.manual_seed(0)
    net = grownfx.prepare(build_backbone("small_cnn", 3), torch.randn(2, 1, 8, 8), seed_width=0.5)
    net.add_task(3)
    CandidateGates.of(net).grow(net, channels=4, groups=_head_site(net))
    structure, state = net_state.net_structure(net), net.state_dict()
    bare = grownfx.prepare(build_backbone("small_cnn", 3), torch.randn(2, 1, 8, 8), seed_width=0.5)
    with pytest.raises(ValueError, match="channel scale"):
        net_state.restore_net(bare, structure, state)
    other = grownfx.prepare(build_backbone("small_cnn", 3), torch.randn(2, 1, 8, 8), seed_width=0.5)
    CandidateGates.of(other)
    net_state.restore_net(other, structure, state)
    x = torch.randn(4, 1, 8, 8)
    net.eval(), other.eval()
    with torch.no_grad():
        assert torch.equal(other(x), net(x))
