"""The learning task's masked weights of all layers in one pass (engine/weight_pass.py), eager and compiled,
against autograd of the plain per-layer expression `where(trainable, weight, frozen) * (const + active * step(z))`
with z = (score - threshold) * scale + noise * logit(u), u the pass's uniform samples."""

from __future__ import annotations

import pytest
import torch

import grownfx
from grownfx.engine import weight_pass as WP
from grownfx.engine.layers import FREE
from grownfx.models import build_backbone


def _net(granularity="kernel"):
    """Task 2 learning after tasks 0 and 1: owned units (selective, Gumbel noise), grown units (attentive, no noise),
    released units (dense), a Linear with channel units; a temperature so that the two kinds' scales differ."""
    torch.manual_seed(0)
    net = grownfx.prepare(build_backbone("small_cnn", 2), torch.randn(2, 1, 8, 8), seed_width=0.5,
                          granularity=granularity)
    net.add_task(2)
    net.freeze_task(0)
    net.add_task(2)
    net.grow(ratio=0.25)
    for m in net.masked_layers()[:2]:  # task 1's attentive masks drop every third grown unit of two layers:
        with torch.no_grad():  # released to task 2 (dense); the other layers' units all carry a learned mask
            m.score.view(-1)[::3] = 0.0
    net.freeze_task(1)
    net.add_task(2)
    net.grow(ratio=0.25)
    net.set_mask_temperature(50.0)
    g = torch.Generator().manual_seed(1)
    for m in net.masked_layers():
        with torch.no_grad():  # scores around the threshold, so both outcomes of the step occur
            m.score.copy_(5e-3 + 4e-3 * torch.randn(m.score.shape, generator=g))
            owned = m._expand(m.owner != FREE).expand_as(m.weight)
            m.weight[owned] = float("nan")  # never read: owned units come from `frozen`
    return net.train()


def _reference(net, u):
    """Each layer's weight by the plain expression, with the pass's per-unit constants (MaskPlan) and noise `u`."""
    out, start = {}, 0
    for m in net.masked_layers():
        p = m._mask_plan()
        n = m.owner.numel()
        z = (m.score - p.threshold) * p.scale
        if p.noise is not None:
            z = z + p.noise * torch.logit(u[start:start + n].view(m.owner.shape), eps=1e-6)
        start += n
        soft = torch.sigmoid(z)
        mult = (z >= 0).float() + (soft - soft.detach())
        if p.active is not None:
            mult = mult * p.active if p.const is None else p.const + mult * p.active
        trainable = m._expand((m.owner == FREE) & (m.kind != 3))
        out[m.target] = torch.where(trainable, m.weight, m.frozen) * m._expand(mult)
    return out


def _weights_in_pass(net, u):
    """Each layer's learning weight as a training forward computes it (inside the pass), noise `u`."""
    t = net.learning_task
    orig = WP.PassPlan.uniform
    WP.PassPlan.uniform = lambda self: u.clone()  # the eager pass consumes its samples in place
    try:
        with net.computing(t), WP.learning_pass(net, t):
            return {m.target: m.effective_weight() for m in net.masked_layers()}
    finally:
        WP.PassPlan.uniform = orig


def _grads(net, weights, upstream):
    for p in net.parameters():
        p.grad = None
    sum((w * upstream[k]).sum() for k, w in weights.items()).backward()
    return {n: p.grad.clone() for n, p in net.named_parameters() if p.grad is not None}


def _check(net, tol):
    g = torch.Generator().manual_seed(2)
    total = sum(m.owner.numel() for m in net.masked_layers())
    u = torch.rand(total, generator=g)
    got = _weights_in_pass(net, u)
    upstream = {k: torch.randn(w.shape, generator=g) for k, w in got.items()}
    got_grads = _grads(net, got, upstream)
    ref = _reference(net, u)
    ref_grads = _grads(net, ref, upstream)
    assert got.keys() == ref.keys() and got_grads.keys() == ref_grads.keys()
    for k in ref:
        torch.testing.assert_close(got[k], ref[k], rtol=0, atol=0)  # the hard step: no rounding to hide behind
    for k in ref_grads:  # weights' gradients: G * mult, exact eagerly; scores': sums over a unit, rounding apart
        assert bool(torch.isfinite(got_grads[k]).all()), k
        exact = tol == 0 and not k.endswith("score")
        torch.testing.assert_close(got_grads[k], ref_grads[k], rtol=0 if exact else max(tol, 1e-5),
                                   atol=0 if exact else max(tol, 1e-7))
    for m in net.masked_layers():  # exactly 0 on the units finished tasks own
        owned = m._expand(m.owner != FREE).expand_as(m.weight)
        assert bool((got_grads[next(n for n, p in net.named_parameters() if p is m.weight)][owned] == 0).all())


@pytest.mark.parametrize("granularity", ["kernel", "channel"])
def test_eager_pass_equals_the_plain_expression_forward_and_both_gradients(granularity):
    net = _net(granularity)
    kinds = torch.cat([m.kind.reshape(-1) for m in net.masked_layers()])
    assert set(kinds.tolist()) == {0, 1, 2}  # selective, dense and attentive units all present
    plans = [m._mask_plan() for m in net.masked_layers()]
    assert {p.active is None for p in plans} == {True, False}  # layers with and without dense units
    _check(net, tol=0)


def test_a_training_forward_runs_the_pass_once_and_leaves_no_step_behind():
    net = _net()
    calls = []
    orig = WP.PassPlan.multiplier
    WP.PassPlan.multiplier = lambda self, *a: calls.append(1) or orig(self, *a)
    try:
        net(torch.randn(4, 1, 8, 8), task=2)
        net.eval()(torch.randn(4, 1, 8, 8), task=2)  # evaluation: no noise, no pass
        net.train()(torch.randn(4, 1, 8, 8), task=0)  # a finished task: no pass
    finally:
        WP.PassPlan.multiplier = orig
    assert len(calls) == 1 and net.ctx.cache.step is None


def test_one_noise_draw_per_forward_in_masked_layers_order():
    """The documented stream: torch.rand over all units, in masked_layers() order, once per training forward."""
    net = _net()
    x = torch.randn(4, 1, 8, 8)
    torch.manual_seed(5)
    out = net(x, task=2)
    torch.manual_seed(5)
    u = torch.rand(sum(m.owner.numel() for m in net.masked_layers()))
    ref = _reference(net, u)
    with net.computing(2):  # the same forward with the reference weights put in place of the pass's
        net.ctx.cache.step = dict(ref)
        try:
            again = net.graph_module(x)
        finally:
            net.ctx.cache.step = None
    torch.testing.assert_close(out, again, rtol=0, atol=0)


def test_the_one_expression_given_to_the_compiler_equals_the_plain_expression(monkeypatch):
    """`_all_weights`, every layer's masked weight in one expression (what torch.compile compiles, the slow test
    below), run eagerly: the same weights and gradients as each layer's plain expression."""
    monkeypatch.setattr(WP, "_fresh_compiled", lambda fn: fn)
    net = _net()
    net.ctx.masks.fuse_masks = True
    _check(net, tol=1e-5)


@pytest.mark.slow
def test_compiled_pass_equals_the_plain_expression_and_compiles_once_per_layout():
    pytest.importorskip("torch._inductor")
    net = _net()
    net.ctx.masks.fuse_masks = True
    _check(net, tol=1e-5)
    assert net.ctx.cache.compile_stats["compiles"] == 1
    net(torch.randn(4, 1, 8, 8), task=2).sum().backward()  # the same layout: no new graph
    net.ctx.cache.clear()  # what a state reload does: same layout, still no new graph
    net.set_mask_temperature(80.0)  # a temperature schedule: values, not layout
    net(torch.randn(4, 1, 8, 8), task=2).sum().backward()
    assert net.ctx.cache.compile_stats["compiles"] == 1
    net.grow(ratio=0.25)  # a new layout: one more
    net(torch.randn(4, 1, 8, 8), task=2).sum().backward()
    assert net.ctx.cache.compile_stats["compiles"] == 2


@pytest.mark.slow  # a whole run of two tasks: ~50 s of CPU here
def test_training_compile_is_read_by_the_stage_loop_and_each_epoch_reports_its_compiles(tmp_path, monkeypatch):
    """`training.compile: true` reaches the engine through the one stage loop, and the epoch events say how many
    graphs were compiled (dynamo with its eager backend here: the wiring and the count, not inductor's time)."""
    import json

    from grownfx.recipe.schema import Recipe
    from grownfx.run.runner import run

    monkeypatch.setattr(WP, "BACKEND", "eager")
    seen = []
    orig = WP._run
    monkeypatch.setattr(WP, "_run", lambda plan, ctx: seen.append(ctx.masks.fuse_masks) or orig(plan, ctx))
    r = Recipe.model_validate({
        "name": "compiled", "model": {"builder": "small_cnn", "seed_width": 0.5},
        "data": {"name": "digits", "classes_per_task": 5},
        "training": {"epochs": 1, "compile": True, "precise_bn": False},
        "target": {"rule": 90.0}, "output": {"dir": str(tmp_path / "{name}"), "tensorboard": False,
                                             "export_format": "none"}})
    run(r, echo=lambda m: None)
    events = [json.loads(line) for line in (tmp_path / "compiled" / "metrics.jsonl").read_text().splitlines()]
    epochs = [e for e in events if e.get("event") == "epoch"]
    assert seen and all(seen)  # the pass ran, compiled
    assert epochs and all("compiles" in e and "compile_seconds" in e for e in epochs)
    assert sum(e["compiles"] for e in epochs) >= 1


def test_without_noise_a_training_forward_masks_as_evaluation_does_and_still_learns_the_scores():
    """net.set_mask_noise(False) (masks.selective.noise_free_fraction): a training forward's masked weights are
    the evaluation ones whatever the noise samples, the straight-through gradient still reaches every score;
    switched back on, the noise returns."""
    net = _net()
    with net.computing(2):
        expected = {m.target: m.effective_weight(training=False).detach() for m in net.masked_layers()}
    u = torch.rand(sum(m.owner.numel() for m in net.masked_layers()), generator=torch.Generator().manual_seed(3))

    def differs(weights):
        return any(not torch.equal(w.detach(), expected[k]) for k, w in weights.items())

    assert differs(_weights_in_pass(net, u))  # scores near the threshold: the noise flips some units
    net.set_mask_noise(False)
    weights = _weights_in_pass(net, u)
    assert not differs(weights)
    sum(w.sum() for w in weights.values()).backward()
    assert all(m.score.grad is not None and m.score.grad.abs().sum() > 0 for m in net.masked_layers())
    net.set_mask_noise(True)
    assert differs(_weights_in_pass(net, u))
