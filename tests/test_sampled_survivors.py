"""Behaviours that survivors of the sampled mutation run showed untested (`python -m scripts.mutation --sample 400
--seed 0`, docs/mutation/sample400.md), each checked by what a user would read or see go wrong.

Every test here failed on its mutant and passes on the code (docs/testing.md, "What to do with a survivor").
"""

import dataclasses

import pytest
import torch

import grownfx
from grownfx.engine.context import ATT
from grownfx.learn.records import add_epoch_time, stage_breakdown
from grownfx.models import build_backbone


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


def _learning_task_1_with_grown_units():
    torch.manual_seed(0)
    net = grownfx.prepare(build_backbone("small_cnn", 2), torch.randn(2, 1, 8, 8), seed_width=0.5)
    net.add_task(2)
    net.freeze_task(0)
    net.add_task(2)
    net.grow(ratio=0.25)
    return net.train()


@pytest.mark.parametrize("kind", ["ste", "gumbel"])
def test_the_attentive_mask_is_noisy_in_training_only_when_it_is_the_gumbel_kind(kind):
    """The grown units' attentive mask: KSM's straight-through mask (the default) keeps a unit whose score is just
    over the threshold at every training step; the Gumbel kind draws logistic noise, so such a unit is sometimes
    dropped.  (The selective units of older channels are noisy either way: only the attentive units are read.)"""
    net = _learning_task_1_with_grown_units()
    net.set_policy(dataclasses.replace(net.ctx.masks.policy, attentive_kind=kind))
    layer = net.masked_layers()[0]
    att = layer._expand(layer.kind == ATT).expand_as(layer.weight)
    assert att.any()
    threshold = net.ctx.masks.policy.attentive.threshold if kind == "ste" else \
        net.ctx.masks.policy.attentive_gumbel.threshold
    with torch.no_grad():
        layer.score.fill_(threshold + 1e-6)
    net.ctx.bump()
    with torch.no_grad(), net.computing(1):
        draws = torch.stack([layer.effective_weight(training=True)[att] for _ in range(40)])
    kept = draws == layer.weight[att]
    if kind == "ste":
        assert kept.all()  # deterministic and kept: score >= threshold
    else:
        assert 0.2 < kept.float().mean() < 0.8  # z = scale * 1e-6 + noise: kept about half of the time


def test_a_tensor_with_one_nan_among_finite_values_is_the_non_finite_one_named():
    """The divergence guard names the first tensor holding any NaN/inf, not only a tensor that is all NaN."""
    from grownfx.learn.guards import NonFiniteError, check_epoch, first_nonfinite

    ok, one_bad = torch.ones(3), torch.tensor([1.0, float("nan"), 2.0])
    assert first_nonfinite([ok, ok]) is None
    assert first_nonfinite([ok, one_bad, torch.tensor([float("inf")])]) == "1"
    assert first_nonfinite([("conv.weight", ok), ("fc.bias", one_bad)]) == "fc.bias"
    with pytest.raises(NonFiniteError, match="fc.bias"):
        check_epoch(0.5, [("conv.weight", ok), ("fc.bias", one_bad)], task=0, stage="stage1", epoch=2)


def test_an_epoch_reports_the_mean_batch_loss_the_accuracy_and_the_samples_it_saw():
    """run_epoch's numbers computed independently: with a zero learning rate the model never changes, so the
    mean of the batches' cross-entropies and the accuracy over all samples are known in advance."""
    import torch.nn.functional as F

    from grownfx.learn.training import StageOptim, run_epoch

    torch.manual_seed(0)
    model = torch.nn.Linear(4, 3)
    batches = [(torch.randn(5, 4), torch.randint(0, 3, (5,))), (torch.randn(3, 4), torch.randint(0, 3, (3,)))]
    with torch.no_grad():
        losses = [float(F.cross_entropy(model(x), y)) for x, y in batches]
        correct = sum(int((model(x).argmax(1) == y).sum()) for x, y in batches)
    optim = StageOptim([torch.optim.SGD(model.parameters(), lr=0.0)])
    loss, pen, acc, seen = run_epoch(model, batches, optim, torch.device("cpu"))
    assert seen == 8 and pen == 0.0
    assert loss == pytest.approx(sum(losses) / 2, rel=1e-6)  # the mean over batches, not over samples
    assert acc == pytest.approx(100.0 * correct / 8)


def test_the_seed_width_is_the_closest_size_found_even_when_the_full_width_is_closest():
    """width_for_size returns the width whose size came closest to the request among those it tried, the full
    width (size 1) included: with a single bisection probe at half width (about a quarter of the parameters),
    a request of 0.9 is closer to the full model's 1.0."""
    from grownfx.learn.seed_size import size_at_width, width_for_size

    model, x = build_backbone("small_cnn", 2), torch.randn(2, 1, 8, 8)
    probe = size_at_width(model, x, 0.5)
    assert abs(probe - 0.9) > abs(1.0 - 0.9)
    assert width_for_size(model, x, 0.9, steps=1) == 1.0


def _run(tmp_path, method: dict):
    from grownfx.recipe.schema import Recipe
    from grownfx.run.runner import run

    r = Recipe.model_validate({
        "name": "stored", "seed": 3,
        "model": {"builder": "small_cnn", "kwargs": {"in_channels": 1, "width": 8, "hidden": 16}},
        "data": {"name": "digits", "num_tasks": 2, "limit_per_task": 120},
        "method": method, "training": {"epochs": 1, "precise_bn": False},
        "output": {"dir": str(tmp_path / "{name}"), "tensorboard": False, "export_format": "none"},
    })
    return run(r, echo=lambda m: None).summary["tasks"]


def test_what_a_method_stores_besides_its_parameters(tmp_path):
    """TaskRecord.stored_samples/_values: fine-tuning keeps nothing; replay keeps `per_class` samples of every class
    seen so far (3 here), each as its 8x8 input values and a label."""
    tasks = _run(tmp_path / "finetune", {"name": "finetune"})
    assert [(t["stored_samples"], t["stored_values"]) for t in tasks] == [(0, 0), (0, 0)]
    tasks = _run(tmp_path / "replay", {"name": "er", "per_class": 3})
    seen = [3 * sum(t["num_classes"] for t in tasks[:i + 1]) for i in range(len(tasks))]  # 3 of each class so far
    assert [t["stored_samples"] for t in tasks] == seen and seen[0] > 0
    assert [t["stored_values"] for t in tasks] == [n * (8 * 8 + 1) for n in seen]


def _weights(net) -> int:
    """Every weight matrix/kernel the learning task computes with (biases, norms, mask scores and gates left out;
    so is the head template `pending` that later tasks' heads are copied from)."""
    return sum(m._parameters["weight"].numel() for n, m in net.graph_module.named_modules()
               if isinstance(m._parameters.get("weight"), torch.Tensor) and m._parameters["weight"].dim() >= 2
               and not n.endswith(".pending"))


@pytest.mark.parametrize("name", ["small_cnn", "lenet5"])
def test_a_gated_channel_costs_the_weights_one_more_channel_of_its_group_adds(name):
    """The growth penalty weighs each candidate by the weights it brings: exactly what growing its group by one
    channel adds to the network (producer rows and consumer columns; LeNet-5's flatten gives a column per spatial
    position).  Counted independently, before and after the growth."""
    from grownfx.learn.gates import CandidateGates

    x = torch.randn(2, 3, 32, 32) if name == "lenet5" else torch.randn(2, 1, 8, 8)
    probe = grownfx.prepare(build_backbone(name, 10), x, seed_width=0.5)
    for gid, n in [(g.id, g.granularity) for g in probe.growable_groups]:
        torch.manual_seed(0)
        net = grownfx.prepare(build_backbone(name, 10), x, seed_width=0.5)
        net.add_task(10)
        gates = CandidateGates.of(net)
        before = _weights(net)
        gates.grow(net, channels=n, groups=[gid])
        assert gates.costs(net)[gid] * n == _weights(net) - before > 0
