"""Issue 3: the GROWN learner on small real data (scikit-learn digits) and generated data."""

import pytest
import torch

import grownfx
from grownfx.recipe.schema import GrowthConfig, MasksConfig, OptimConfig, TrainingConfig
from grownfx.engine.context import ATT, DENSE, OFF, SEL
from grownfx.data import build_stream
from grownfx.learn.gates import CandidateGates
from grownfx.learn.learner import GrownLearner, noise_free_epochs
from grownfx.models import build_backbone

STREAM = build_stream({"name": "digits"}, seed=0)


def make_learner(switches=(True, True, True), epochs=3, growth=None, masks=None, seed=0, mask_lr=2e-3):
    torch.manual_seed(seed)
    net = grownfx.prepare(build_backbone("small_cnn", 2), torch.randn(2, *STREAM.input_shape), seed_width=0.5,
                          seed=seed)
    training = TrainingConfig(epochs=epochs, optimizer=OptimConfig(name="adam", lr=1e-3),
                              mask_optimizer=OptimConfig(name="adam", lr=mask_lr))
    return GrownLearner(net, training=training, growth=growth or GrowthConfig(), masks=masks or MasksConfig(),
                        switches=switches, seed=seed)


def test_stage2_skipped_when_stage1_meets_target_and_run_when_it_does_not():
    easy = make_learner()
    easy.learn(STREAM.tasks[0], target=0.0)
    rec = easy.learn(STREAM.tasks[1], target=0.0)
    assert rec.growth_rounds == 0 and not rec.grew and len(rec.val_history) == 1
    hard = make_learner(growth=GrowthConfig(max_rounds=2))
    hard.learn(STREAM.tasks[0], target=0.0)
    rec = hard.learn(STREAM.tasks[1], target=101.0)  # unreachable: grows until the budget is spent
    assert rec.growth_rounds == 2 and len(rec.val_history) == 3


def test_task_records_break_their_time_down_by_stage():
    learner = make_learner(epochs=1, growth=GrowthConfig(max_rounds=1))
    first = learner.learn(STREAM.tasks[0], target=0.0)  # task 1 trains in its first growth round
    second = learner.learn(STREAM.tasks[1], target=101.0)  # stage 1, then one growth round
    assert set(first.stage_s) == {"grow", "other"} and set(second.stage_s) == {"stage1", "grow", "other"}
    for rec in (first, second):
        assert all(v >= 0 for v in rec.stage_s.values())
        assert sum(rec.stage_s.values()) == pytest.approx(rec.time_s)
        assert rec.to_dict()["stage_s"] == rec.stage_s


def test_a_task_s_time_counts_once_whatever_its_periodic_checkpoints(monkeypatch):
    """time_s is the task's clock (plus the seconds a resumed checkpoint held): mid-task checkpoints every epoch
    add nothing to it, and each saves the seconds so far (what a resume after a kill adds).  A frozen clock that
    always reads 7 s makes the time exact."""
    import grownfx.learn.learner as learner_module

    class FrozenClock:
        seconds = cpu_seconds = 7.0

    monkeypatch.setattr(learner_module, "Timer", FrozenClock)
    torch.manual_seed(0)
    net = grownfx.prepare(build_backbone("small_cnn", 2), torch.randn(2, *STREAM.input_shape), seed_width=0.5)
    saved = []
    learner = GrownLearner(net, training=TrainingConfig(epochs=2, checkpoint_every=1,
                                                        optimizer=OptimConfig(name="adam", lr=1e-3)),
                           growth=GrowthConfig(max_rounds=0), masks=MasksConfig(),
                           checkpoint=lambda _, pos, optim: saved.append((pos.epoch, pos.elapsed)))
    record = learner.learn(STREAM.tasks[0], target=0.0)
    assert saved == [(1, 7.0)]  # epoch 1 of 2 was checkpointed, with the task's seconds so far
    assert record.time_s == 7.0


def test_growth_ends_within_the_width_budget():
    # gates that start open (s0 = 1) keep every candidate: the 0.5 seed + a 0.25 pool reaches the 0.75 cap
    masks = MasksConfig(grown={"init": 1.0, "lam": 0.0})
    learner = make_learner(growth=GrowthConfig(max_rounds=10, pool=0.25, max_width=0.75), masks=masks)
    first = learner.learn(STREAM.tasks[0], target=101.0)
    second = learner.learn(STREAM.tasks[1], target=101.0)
    full = {g.id: g.width for g in learner.net.coupling.groups}
    assert all(w == int(0.75 * full[gid]) for gid, w in learner.net.structure.widths.items())
    assert first.growth_rounds == 1 and second.growth_rounds == 0 and len(second.val_history) == 1


def test_selective_mask_drops_kernels_and_released_weights_are_retrained():
    learner = make_learner(epochs=4)
    learner.learn(STREAM.tasks[0], target=0.0)
    released = learner.net.free_weights()
    assert released > 0, "the attentive mask released no grown weight"
    rec = learner.learn(STREAM.tasks[1], target=0.0)
    assert rec.selective_zero_frac is not None and rec.selective_zero_frac > 0
    assert rec.retrained > 0
    owners = torch.cat([m.owner.flatten() for m in learner.net.masked_layers()])
    assert (owners == 1).any(), "task 2 owns none of the re-trained released weights"


@pytest.mark.parametrize("ablation,expected", [
    ((False, False, False), {DENSE}),  # grow only: old weights used as they are, grown weights dense
    ((True, False, False), {SEL, DENSE, OFF}),  # + selective mask (released weights left unused)
    ((True, True, False), {SEL, ATT, OFF}),  # + LSG: attentive mask on grown weights
    ((True, True, True), {SEL, ATT, DENSE}),  # + re-train released weights = GROWN
])
def test_ablation_switches_change_what_is_trained(ablation, expected):
    learner = make_learner(switches=ablation, epochs=2)
    learner.learn(STREAM.tasks[0], target=0.0)
    net = learner.net
    net.add_task(2)
    from grownfx.learn.learner import build_policy

    net.set_policy(build_policy(1, ablation, MasksConfig()))
    for g in net.growable_groups:
        CandidateGates.of(net).grow(net, channels=max(1, g.width // 4), groups=[g.id])
    kinds = set(torch.cat([m.kind.flatten() for m in net.masked_layers()]).unique().tolist())
    if ablation[1] or not ablation[0]:
        assert kinds - {OFF} == expected - {OFF}
    else:
        assert SEL in kinds and ATT not in kinds
    scores = net.trainable_parameters()["masks"]
    assert bool(scores) == (ablation[0] or ablation[1])


def test_zero_forgetting_is_exact():
    learner = make_learner(epochs=2)
    refs, exports = {}, {}
    x = torch.randn(16, *STREAM.input_shape)
    for task in STREAM.tasks:
        learner.learn(task, target=99.0)
        t = task.index
        learner.net.eval()
        with torch.no_grad():
            refs[t] = (learner.net(x, task=t), learner.evaluate(t, task.test))
        exports[t] = {k: v.clone() for k, v in learner.net.export(t).state_dict().items()}
    for t, (out, acc) in refs.items():
        with torch.no_grad():
            assert torch.equal(learner.net(x, task=t), out)
        assert learner.evaluate(t, STREAM.tasks[t].test) == acc
        state = learner.net.export(t).state_dict()
        assert all(torch.equal(state[k], v) for k, v in exports[t].items())


def test_masks_and_growth_are_deterministic_under_a_fixed_seed():
    runs = []
    for _ in range(2):
        learner = make_learner(epochs=2, seed=3)
        for task in STREAM.tasks[:2]:
            learner.learn(task, target=100.0)
        runs.append(learner.net.state_dict())
    assert runs[0].keys() == runs[1].keys()
    assert all(torch.equal(runs[0][k], runs[1][k]) for k in runs[0])


def test_the_learner_moves_only_along_its_transition_table():
    """A phase is entered only from one the table allows (a growth round after an epoch budget's last `tune`
    stage would train epochs the budget does not have); a mid-task checkpoint's string stage is its phase."""
    from grownfx.learn.learner import TRANSITIONS, Phase
    from grownfx.learn.records import LearnerPosition

    learner = make_learner(epochs=1)
    learner.learn(STREAM.tasks[0], target=0.0)
    learner.net.add_task(2)
    pos = LearnerPosition(stage="tune")
    with pytest.raises(RuntimeError, match="from phase 'tune' to 'grow'"):
        learner._enter(pos, Phase.GROW)
    assert pos.stage == "tune" and pos.round == 0
    assert learner._enter(pos, Phase.DONE) is Phase.DONE and pos.stage == "done"
    assert all(Phase(p.value) is p for p in TRANSITIONS)


def test_the_last_epochs_of_every_stage_train_the_masks_without_noise():
    """masks.selective.noise_free_fraction = 0.5 of 2 epochs: in stage 1 and in the growth round the last epoch's
    training forwards run with the masks' noise off; the learner switches it back on when the stage ends.  The
    default (task 1 here) keeps the paper's noise in every epoch."""
    learner = make_learner(epochs=2, growth=GrowthConfig(max_rounds=1))
    net, epochs, forwards = learner.net, [], []
    learner.on_epoch = lambda info: epochs.append((info["stage"], set(forwards)) if forwards else None) \
        or forwards.clear()
    hook = net.register_forward_pre_hook(lambda m, a: forwards.append(net.ctx.masks.noise) if m.training else None)
    try:
        learner.learn(STREAM.tasks[0], target=0.0)
        assert epochs == [("grow", {True})] * 2
        epochs.clear()
        learner.masks = MasksConfig(selective={"noise_free_fraction": 0.5})
        learner.learn(STREAM.tasks[1], target=101.0)
    finally:
        hook.remove()
    assert epochs == [(stage, {noisy}) for stage in ("stage1", "grow") for noisy in (True, False)]
    assert net.ctx.masks.noise


@pytest.mark.parametrize("fraction", [-0.1, 1.5])
def test_a_noise_free_fraction_outside_0_1_is_refused(fraction):
    with pytest.raises(ValueError, match="noise_free_fraction"):
        MasksConfig(selective={"noise_free_fraction": fraction})


@pytest.mark.parametrize("fraction, epochs, expected", [(0.0, 20, 0), (0.25, 20, 5), (0.25, 5, 2), (0.3, 10, 3),
                                                        (0.01, 1, 1), (1.0, 5, 5)])
def test_noise_free_epochs_are_the_fractions_ceiling(fraction, epochs, expected):
    assert noise_free_epochs(fraction, epochs) == expected
