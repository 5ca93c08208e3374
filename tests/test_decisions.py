"""Issue 23: the decisions whose bugs change published numbers, each checked by what a user would see.

Written for mutants that survived `python -m scripts.mutation` (docs/testing.md): the scratch reference a target is
computed from, ties at the target, the schedule a growth round trains with, the task-1 policy of the ablation rows,
what a finished task leaves trainable, the signs of the stream metrics.
"""

import pytest
import torch

import grownfx
from grownfx.data import build_stream, stream_for
from grownfx.engine import masks as M
from grownfx.learn.learner import GrownLearner
from grownfx.models import build_backbone
from grownfx.recipe.schema import ABLATIONS, GrowthConfig, GrownMethod, MasksConfig, OptimConfig, Recipe, \
    TrainingConfig
from grownfx.report.metrics import avg_acc, bwt, forgetting
from grownfx.run import targets
from grownfx.run.runner import run


def recipe(tmp_path, method="grown", epochs=1, **extra) -> Recipe:
    return Recipe.model_validate({
        "name": "decisions", "seed": 3,
        "model": {"builder": "small_cnn", "kwargs": {"in_channels": 1, "width": 8, "hidden": 16}},
        "data": {"name": "digits", "num_tasks": 2, "limit_per_task": 120},
        "method": {"name": method}, "growth": {"max_rounds": 0},
        "training": {"epochs": epochs, "precise_bn": False},
        "output": {"dir": str(tmp_path / "{name}"), "tensorboard": False, "export_format": "none"},
        **extra,
    })


# -- the scratch reference behind "scratch - m" and "best(scratch, finetune) - m" ------------------------------

def test_the_scratch_reference_is_the_scratch_method_s_validation_accuracy(tmp_path):
    """compare reads the scratch run instead of training the reference when the epochs match: the two must be
    the same computation (network, seed, epochs), so the reference equals the scratch run's task accuracy."""
    r = recipe(tmp_path, method="scratch", epochs=2)
    summary = run(r, echo=lambda m: None).summary
    stream = stream_for(r)
    for t, task in enumerate(stream.tasks):
        epochs = []
        acc = targets.scratch_accuracy(r, task, torch.device("cpu"), on_epoch=epochs.append)
        assert acc == summary["tasks"][t]["val_acc"]
        assert len(epochs) == 2  # training.epochs, since target.scratch_epochs is not set


def test_the_scratch_reference_trains_target_scratch_epochs(tmp_path):
    r = recipe(tmp_path, epochs=1, target={"rule": "scratch - 1", "scratch_epochs": 3})
    epochs = []
    targets.scratch_accuracy(r, stream_for(r).tasks[1], torch.device("cpu"), on_epoch=epochs.append)
    assert len(epochs) == 3


@pytest.mark.parametrize("scratch,finetune,best", [(70.0, 80.0, 80.0), (80.0, 70.0, 80.0), (75.0, 75.0, 75.0)])
def test_reference_accuracy_follows_the_rule_s_sources(scratch, finetune, best):
    assert targets.reference_accuracy("best(scratch, finetune) - 1", scratch, finetune) == best
    assert targets.reference_accuracy("scratch - 1", scratch, finetune) == scratch
    assert targets.task_target("best(scratch, finetune) - 1.5", 1, best) == best - 1.5
    with pytest.raises(ValueError, match="fine-tune"):
        targets.reference_accuracy("best(scratch, finetune) - 1", scratch, None)


def test_only_the_targeted_methods_want_a_target(tmp_path):
    assert [m for m in ("grown", "cpg", "finetune", "scratch", "packnet", "piggyback")
            if targets.wants_target(recipe(tmp_path, method=m))] == ["grown", "cpg"]


# -- the learner's decisions ---------------------------------------------------------------------------------

DIGITS = build_stream({"name": "digits"}, seed=0)


def make_learner(switches=(True, True, True), epochs=1, growth=None, masks=None, seed=0):
    torch.manual_seed(seed)
    net = grownfx.prepare(build_backbone("small_cnn", 2),
                          torch.randn(2, *DIGITS.input_shape), seed_width=0.5, seed=seed)
    training = TrainingConfig(epochs=epochs, optimizer=OptimConfig(name="adam", lr=1e-3),
                              mask_optimizer=OptimConfig(name="adam", lr=2e-3), precise_bn=False)
    return GrownLearner(net, training=training, growth=growth or GrowthConfig(max_rounds=1),
                        masks=masks or MasksConfig(), switches=switches, seed=seed)


@pytest.mark.parametrize("target,grows", [(50.0, False), (50.0001, True)])
def test_a_validation_accuracy_equal_to_the_target_meets_it(target, grows):
    """Stage 2 grows only while the validation accuracy is *below* the target: a tie meets it."""
    learner = make_learner()
    learner.evaluate = lambda t, data: 50.0
    learner.learn(DIGITS.tasks[0], target=0.0)
    rec = learner.learn(DIGITS.tasks[1], target=target)
    assert rec.growth_rounds == int(grows) and len(rec.val_history) == 1 + int(grows)


def test_without_a_target_the_learner_does_not_grow_past_task_1():
    learner = make_learner()
    learner.evaluate = lambda t, data: 0.0
    learner.learn(DIGITS.tasks[0], target=None)
    assert learner.learn(DIGITS.tasks[1], target=None).growth_rounds == 0


def test_growth_when_always_grows_exactly_one_round_per_task():
    learner = make_learner(growth=GrowthConfig(max_rounds=3, when="always"))
    learner.evaluate = lambda t, data: 100.0  # the target is met: only `always` makes it grow
    assert learner.learn(DIGITS.tasks[0], target=0.0).growth_rounds == 1
    assert learner.learn(DIGITS.tasks[1], target=0.0).growth_rounds == 1


def test_a_growth_round_anneals_the_gate_beta_from_1_to_final_beta_and_binarises_its_last_epoch():
    learner = make_learner(epochs=3)
    seen = []
    learner.on_epoch = lambda info: seen.append(info)
    hard = []
    learner.install()
    gates = learner.gates
    orig_penalty = learner._penalty

    def penalty(costs, lam):
        hard.append(gates.hard)
        return orig_penalty(costs, lam)

    learner._penalty = penalty
    learner.learn(DIGITS.tasks[0], target=0.0)
    final_beta = learner.masks.grown.final_beta
    betas = [e["beta"] for e in seen if e.get("stage") == "grow"]
    assert betas == pytest.approx([1.0, final_beta ** 0.5, final_beta])
    assert hard and hard[-1] and not hard[0]  # the last epoch trains the binarised gates, the first soft ones


@pytest.mark.parametrize("ablation", ABLATIONS)
def test_every_ablation_row_trains_the_seed_network_on_task_1(ablation):
    """On task 1 the free units are the seed network itself: every row of Table 5 trains them, whatever its
    re-training switch says (the switch is about weights released by earlier tasks)."""
    learner = make_learner(switches=GrownMethod(ablation=ablation).switches(), epochs=2)
    learner.install()
    # the seed's shared weights themselves, not only the task's own norms and head (which train in every row)
    before = [m.weight.detach().clone() for m in learner.net.masked_layers()]
    rec = learner.learn(DIGITS.tasks[0], target=0.0)
    after = [m.weight.detach() for m in learner.net.masked_layers()]
    assert all(not torch.equal(a[tuple(slice(0, k) for k in b.shape)], b) for a, b in zip(after, before)), \
        "a layer of the seed network was not trained on task 1"
    assert rec.val_acc > 75.0  # two classes of digits: chance is 50 %


def test_a_finished_task_leaves_nothing_trainable():
    """After a task is frozen, none of the parameters (shared weights it owns, its head, its norms) asks for a
    gradient, and none of its own copies is trainable or in the optimiser of the next task."""
    learner = make_learner(epochs=1)
    learner.learn(DIGITS.tasks[0], target=0.0)
    net = learner.net
    assert [n for n, p in net.named_parameters() if p.requires_grad] == []
    own = {n: p for n, p in net.named_parameters() if ".copies.0" in n}
    assert any("classifier" in n for n in own) and len(own) > 2  # the head and the norms of task 1
    net.add_task(2)
    trainable = {id(p) for group in net.trainable_parameters().values() for p in group}
    assert [n for n, p in own.items() if p.requires_grad or id(p) in trainable] == []


# -- the stream metrics: signs and ranges ----------------------------------------------------------------------

def test_forgetting_is_positive_and_bwt_negative_when_old_tasks_drop():
    R = [[90.0], [85.0, 80.0], [70.0, 75.0, 60.0], [65.0, 70.0, 55.0, 50.0]]
    assert avg_acc(R) == pytest.approx((65 + 70 + 55 + 50) / 4)
    # BWT: final minus when learned, per old task; forgetting: best earlier minus final (the best of 3 tasks)
    assert bwt(R) == pytest.approx(((65 - 90) + (70 - 80) + (55 - 60)) / 3)
    assert forgetting(R) == pytest.approx(((90 - 65) + (80 - 70) + (60 - 55)) / 3)
    assert bwt(R) < 0 < forgetting(R)


def test_a_task_that_improves_after_it_was_learned_has_positive_bwt_and_no_forgetting():
    R = [[50.0], [60.0, 70.0], [65.0, 72.0, 80.0]]
    assert bwt(R) == pytest.approx(((65 - 50) + (72 - 70)) / 2)
    assert forgetting(R) == pytest.approx(((60 - 65) + (70 - 72)) / 2)  # best earlier minus final: negative
    assert avg_acc([[None, 50.0]]) == 50.0 and avg_acc([]) == 0.0


# -- masks: ties at the thresholds, the selective mask's noise and temperature ----------------------------------

def test_a_score_exactly_at_the_mask_threshold_keeps_the_weight():
    ste, gumbel = M.STEConfig(), M.GumbelConfig()
    for cfg, mask in ((ste, lambda s: M.ste_mask(s, ste)),
                      (gumbel, lambda s: M.gumbel_sigmoid_mask(s, gumbel, noise=False))):
        thr = torch.tensor(cfg.threshold, dtype=torch.float64)
        score = torch.stack([thr, thr - 1e-9, thr + 1e-9])
        assert mask(score).tolist() == [1.0, 0.0, 1.0]
    # a channel gate exactly at 0 is dropped when binarised; just above it is kept at its soft value
    hard = M.cs_hard(torch.tensor([0.0, 1e-6, -1e-6]), 5.0)
    assert hard[0] == 0 and hard[2] == 0 and hard[1] == M.cs_gate(torch.tensor(1e-6), 5.0)


@pytest.mark.parametrize("temperature", [0.5, 2.0])
def test_the_selective_mask_s_training_noise_is_logistic_at_the_documented_temperature(temperature):
    """p = sigmoid((logit + g0 - g1) / T): the mask is 1 with probability sigmoid(logit) whatever T (measured on
    200k draws), and its straight-through gradient is sigmoid'(logit / T) * beta / T."""
    cfg = M.GumbelConfig(temperature=temperature)
    torch.manual_seed(0)
    for logit in (-1.0, 0.5, 2.0):
        score = torch.full((200_000,), cfg.threshold + logit / cfg.beta, dtype=torch.float64)
        frac = M.gumbel_sigmoid_mask(score, cfg).mean().item()
        assert frac == pytest.approx(torch.sigmoid(torch.tensor(logit)).item(), abs=0.006)
    score = torch.tensor([cfg.threshold + 1.0 / cfg.beta], dtype=torch.float64, requires_grad=True)
    M.gumbel_sigmoid_mask(score, cfg, noise=False).sum().backward()
    z = torch.tensor(1.0 / temperature, dtype=torch.float64)
    assert score.grad.item() == pytest.approx((torch.sigmoid(z) * (1 - torch.sigmoid(z))).item() * cfg.beta /
                                              temperature, rel=1e-9)
    # an explicit temperature (the learner's schedule) overrides the config's
    score.grad = None
    M.gumbel_sigmoid_mask(score, M.GumbelConfig(), temperature=temperature, noise=False).sum().backward()
    assert score.grad.item() == pytest.approx((torch.sigmoid(z) * (1 - torch.sigmoid(z))).item() * cfg.beta /
                                              temperature, rel=1e-9)


def test_anneal_is_geometric_and_clamped():
    assert M.anneal(1.0, 100.0, 0.0) == 1.0 and M.anneal(1.0, 100.0, 1.0) == pytest.approx(100.0)
    assert M.anneal(1.0, 100.0, 0.5) == pytest.approx(10.0)
    assert M.anneal(2.0, 0.5, -1.0) == 2.0 and M.anneal(2.0, 0.5, 3.0) == pytest.approx(0.5)


def test_two_tasks_already_have_backward_transfer_and_forgetting():
    R = [[90.0], [80.0, 70.0]]  # the one old task dropped 10 points
    assert bwt(R) == -10.0 and forgetting(R) == 10.0


def test_one_task_or_none_has_no_backward_transfer_or_forgetting():
    for R in ([[90.0]], []):  # nothing learned after it: nothing to transfer back to or forget
        assert bwt(R) == 0.0 and forgetting(R) == 0.0
