"""EWC, SI, MAS, LwF and experience replay: each method's defining property, checked against a computation of
its own (Jacobians, the SGD trajectory, a copy of the previous model, label counts), on the digits stream."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch.func import functional_call, jacrev

from grownfx.data import build_stream
from grownfx.learn.methods import make_method
from grownfx.learn.methods.multihead import head_tail
from grownfx.learn.methods.regularisation import SIContinual
from grownfx.learn.training import derive_seed
from grownfx.recipe.schema import Recipe


def recipe(method: dict, tasks: int = 2, epochs: int = 2, **training) -> Recipe:
    return Recipe.model_validate({
        "name": "shared", "seed": 0, "device": "cpu",
        "model": {"builder": "small_cnn", "kwargs": {"in_channels": 1, "width": 4, "hidden": 8}},
        "data": {"name": "digits", "num_tasks": tasks, "limit_per_task": 48},
        "method": method,
        "training": {"epochs": epochs, "batch_size": 16, "num_threads": 1, "precise_bn": False,
                     "optimizer": {"name": "sgd", "lr": 0.05, "momentum": 0.0, "nesterov": False}, **training},
        "output": {"dir": "unused", "tensorboard": False, "export_format": "none"},
    })


def method_and_stream(method: dict, **kw):
    r = recipe(method, **kw)
    stream = build_stream(r.data, r.seed)
    return make_method(r, stream, torch.device("cpu")), stream


def inputs(task, n: int) -> torch.Tensor:
    return task.train.normalize(task.train.x[:n], augment=None)


def logits_jacobian(m, t: int, x: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Task t's logits for one sample and their Jacobian with respect to every shared parameter (torch.func: an
    independent route from the methods' per-sample backward passes)."""
    shared = {n: p.detach() for n, p in m.shared_parameters().items()}
    m.model.eval()

    def logits(params):
        with m.heads.computing(t):
            return functional_call(m.model, params, (x,))[0]

    return logits(shared), jacrev(logits)(shared)


def at(m, values: dict[str, torch.Tensor]):
    """Set the shared parameters to `values`."""
    with torch.no_grad():
        for n, p in m.shared_parameters().items():
            p.copy_(values[n])


def penalty_value(m) -> float:
    terms = m.step_terms(None, len(m.heads.heads))
    return float(terms.penalty().detach())


def check_quadratic(m, omega: dict, anchor: dict, scale: float) -> None:
    """Zero at the anchor; at anchor + d, exactly scale * sum omega d^2: it grows with the importance-weighted
    distance, and moving only the most important parameter costs more than moving only the least important."""
    at(m, anchor)
    assert penalty_value(m) == 0.0
    g = torch.Generator().manual_seed(1)
    d = {n: torch.randn(a.shape, generator=g) for n, a in anchor.items()}
    values = []
    for step in (0.01, 0.02, 0.04):
        at(m, {n: anchor[n] + step * d[n] for n in anchor})
        expected = scale * sum(float((omega[n].double() * (step * d[n].double()) ** 2).sum()) for n in anchor)
        got = penalty_value(m)
        assert got == pytest.approx(expected, rel=1e-4, abs=1e-9)
        values.append(got)
    assert values[0] < values[1] < values[2]
    flat = torch.cat([w.flatten() for w in omega.values()])
    costs = []
    for index in (int(flat.argmax()), int(flat.argmin())):
        moved, start = {}, 0
        for n, a in anchor.items():
            bump = torch.zeros(a.numel())
            if start <= index < start + a.numel():
                bump[index - start] = 0.1
            moved[n] = a + bump.view_as(a)
            start += a.numel()
        at(m, moved)
        costs.append(penalty_value(m))
    assert costs[0] > costs[1] and costs[0] == pytest.approx(scale * float(flat.max()) * 0.01, rel=1e-4)
    at(m, anchor)


# --- EWC ---------------------------------------------------------------------------------------------------


def test_ewc_fisher_is_the_models_own_predictive_fisher_and_the_penalty_is_zero_at_the_anchor():
    m, stream = method_and_stream({"name": "ewc", "lam": 10.0, "fisher_samples": 12})
    task = stream.tasks[0]
    m.learn(task, None)
    anchor = {n: p.detach().clone() for n, p in m.shared_parameters().items()}
    # F = mean_x J^T (diag p - p p^T) J, the Fisher of the softmax's own distribution (no labels), from Jacobians
    order = torch.randperm(len(task.train), generator=torch.Generator().manual_seed(derive_seed(0, "fisher", 0)))[:12]
    expected = {n: torch.zeros_like(a) for n, a in anchor.items()}
    for i in order.tolist():
        z, jac = logits_jacobian(m, 0, task.train.normalize(task.train.x[i:i + 1], augment=None))
        p = z.softmax(0)
        h = torch.diag(p) - torch.outer(p, p)
        for n, j in jac.items():
            j = j.reshape(len(p), -1)
            expected[n] += torch.einsum("ck,cd,dk->k", j, h, j).view_as(expected[n]) / 12
    assert m.penalty.omega.keys() == expected.keys()
    for n in expected:
        torch.testing.assert_close(m.penalty.omega[n], expected[n], rtol=1e-4, atol=1e-10)
    check_quadratic(m, m.penalty.omega, anchor, scale=10.0 / 2)


def test_ewc_keeps_every_earlier_tasks_penalty():
    """Two tasks learned: the one stored quadratic equals the sum of the two separate penalties (Kirkpatrick et
    al.'s separate penalties), anywhere."""
    m, stream = method_and_stream({"name": "ewc", "lam": 10.0, "fisher_samples": 8}, tasks=3)
    separate = []
    real = m.fisher

    def fisher(task, t):
        f = real(task, t)
        separate.append((f, {n: p.detach().clone() for n, p in m.shared_parameters().items()}))
        return f

    m.fisher = fisher
    for task in stream.tasks[:2]:
        m.learn(task, None)
    g = torch.Generator().manual_seed(3)
    for _ in range(3):
        point = {n: a + 0.05 * torch.randn(a.shape, generator=g) for n, a in separate[1][1].items()}
        at(m, point)
        expected = 5.0 * sum(float((f[n].double() * (point[n] - a[n]).double() ** 2).sum())
                             for f, a in separate for n in f)
        assert penalty_value(m) == pytest.approx(expected, rel=1e-5)
    assert m.stored() == (0, 2 * sum(p.numel() for p in m.shared_parameters().values()) + 1)


# --- MAS ---------------------------------------------------------------------------------------------------


def test_mas_importance_is_the_mean_absolute_gradient_of_the_squared_output_norm():
    m, stream = method_and_stream({"name": "mas", "lam": 2.0, "importance_samples": 10}, tasks=3)
    omega = {}
    for t, task in enumerate(stream.tasks[:2]):
        m.learn(task, None)
        order = torch.randperm(len(task.train), generator=torch.Generator().manual_seed(derive_seed(0, "mas", t)))
        for i in order[:10].tolist():
            z, jac = logits_jacobian(m, t, task.train.normalize(task.train.x[i:i + 1], augment=None))
            for n, j in jac.items():  # d ||z||^2 / d theta = 2 J^T z, per sample, then its absolute value
                g = (2 * torch.einsum("c,c...->...", z, j)).abs() / 10
                omega[n] = omega.get(n, 0) + g
        # accumulated over the tasks, anchored where the last one left the network
        for n in omega:
            torch.testing.assert_close(m.penalty.omega[n], omega[n], rtol=1e-4, atol=1e-9)
    anchor = {n: p.detach().clone() for n, p in m.shared_parameters().items()}
    check_quadratic(m, m.penalty.omega, anchor, scale=2.0)


# --- SI ----------------------------------------------------------------------------------------------------


def test_si_importance_is_the_path_integral_over_the_damped_squared_displacement(monkeypatch):
    """Plain SGD (no momentum, constant rate eta): every step moves theta by -eta g, so the path integral of the
    unregularised gradient is sum (dtheta + eta g_penalty) . dtheta / eta, read off the recorded trajectory."""
    lr, xi, c = 0.05, 1e-3, 0.5
    m, stream = method_and_stream({"name": "si", "lam": c, "xi": xi}, tasks=3, scheduler="none")
    trajectory = []
    real = SIContinual.after_step

    def record(self, shared):
        real(self, shared)
        trajectory.append({n: p.detach().clone() for n, p in shared.items()})

    monkeypatch.setattr(SIContinual, "after_step", record)
    start = {n: p.detach().clone() for n, p in m.shared_parameters().items()}
    expected = {n: torch.zeros_like(p) for n, p in start.items()}
    for t, task in enumerate(stream.tasks[:2]):
        trajectory.clear()
        omega_before = {n: w.clone() for n, w in m.penalty.omega.items()}
        anchor_before = {n: a.clone() for n, a in m.penalty.anchor.items()} or start
        m.learn(task, None)
        path = {n: torch.zeros_like(p) for n, p in start.items()}
        before = start if t == 0 else anchor_before
        for step in trajectory:
            for n in path:
                move = step[n] - before[n]
                penalty_grad = 2 * c * omega_before[n] * (before[n] - anchor_before[n]) if omega_before else 0
                path[n] += (move / lr + penalty_grad) * move  # = -g_unregularised . dtheta
            before = step
        end = trajectory[-1]
        for n in expected:
            expected[n] = (expected[n] + path[n] / ((end[n] - anchor_before[n]) ** 2 + xi)).clamp_min(0)
            torch.testing.assert_close(m.penalty.omega[n], expected[n], rtol=2e-3, atol=1e-6)
            assert torch.equal(m.penalty.anchor[n], end[n])
    check_quadratic(m, m.penalty.omega, dict(m.penalty.anchor), scale=c)
    # a path integral against the loss (momentum, Adam or the penalty can give one) adds no negative importance
    m.omega = {n: -torch.ones_like(w) for n, w in m.penalty.omega.items()}
    m.penalty.omega = {n: torch.zeros_like(w) for n, w in m.penalty.omega.items()}
    m.end_task(stream.tasks[2], 2)
    assert all(torch.equal(w, torch.zeros_like(w)) for w in m.penalty.omega.values())


# --- LwF ---------------------------------------------------------------------------------------------------


def test_lwf_distils_the_previous_models_outputs_on_the_new_data(monkeypatch):
    m, stream = method_and_stream({"name": "lwf"}, tasks=3, epochs=2)
    assert m.recipe.method.temperature == 2.0  # Li & Hoiem's T
    seen = []
    real = type(m).distillation_targets

    def record(self, t, x, prev_tail=None):
        out = real(self, t, x, prev_tail)
        seen.append((t, x.detach().clone(), [o.clone() for o in out]))
        return out

    monkeypatch.setattr(type(m), "distillation_targets", record)
    previous = []
    for t, task in enumerate(stream.tasks):
        previous.append(copy.deepcopy(m.model).eval())
        m.learn(task, None)
    steps = {1: len(stream.tasks[1].train.loader(16)) * 2, 2: len(stream.tasks[2].train.loader(16)) * 2}
    assert [s[0] for s in seen] == [1] * steps[1] + [2] * steps[2]
    for t, x, targets in seen:
        # the new task's data (its training inputs, in the step's batch)
        rows = inputs(stream.tasks[t], len(stream.tasks[t].train)).flatten(1)
        assert (x.flatten(1)[:, None, :] == rows[None]).all(2).any(1).all()
        assert len(targets) == t
        for k, target in enumerate(targets):  # the network as it was before task t, head k, at T = 2
            with previous[t].get_submodule(m.head_target).computing(k), torch.no_grad():
                want = F.softmax(previous[t](x) / 2.0, dim=1)
            torch.testing.assert_close(target, want, rtol=1e-5, atol=1e-6)


def test_lwf_penalty_is_the_temperature_softened_kl_to_the_targets():
    m, stream = method_and_stream({"name": "lwf", "lam": 3.0}, tasks=2, epochs=1)
    m.learn(stream.tasks[0], None)
    m.heads.heads.append(m._new_head(2, 1))
    m.begin_task(stream.tasks[1], 1, resumed=False)
    with torch.no_grad():  # the current model moves away from the previous one
        for p in m.shared_parameters().values():
            p.add_(0.05 * torch.randn_like(p))
    x = inputs(stream.tasks[1], 16)
    terms = m.step_terms(stream.tasks[1], 1)
    m.model.train()
    m.training_forward(1)(x)
    got = float(terms.penalty())
    with torch.no_grad():
        with m.previous.get_submodule(m.head_target).computing(0):
            p = F.softmax(m.previous(x) / 2.0, dim=1)
        with m.heads.computing(0):
            q = F.softmax(m.model(x) / 2.0, dim=1)
    expected = 3.0 * float((p * (p.log() - q.log())).sum(1).mean())
    assert got == pytest.approx(expected, rel=1e-4) and got > 0


# --- experience replay -------------------------------------------------------------------------------------


def test_er_memory_holds_exactly_n_per_class_of_each_learned_task():
    m, stream = method_and_stream({"name": "er", "per_class": 5}, tasks=3, epochs=1)
    for t, task in enumerate(stream.tasks):
        m.learn(task, None)
        assert len(m.memory_index) == t + 1
        for k, index in enumerate(m.memory_index):
            labels = stream.tasks[k].train.y[index]
            assert index.unique().numel() == len(index)  # distinct samples of the task's training split
            assert torch.bincount(labels, minlength=stream.tasks[k].num_classes).tolist() == [5, 5]
    record_samples, record_values = m.stored()
    assert record_samples == 3 * 2 * 5 and record_values == 30 * (8 * 8 + 1)


def test_er_replays_memory_through_each_tasks_own_head(monkeypatch):
    m, stream = method_and_stream({"name": "er", "per_class": 4, "replay_batch": 6}, tasks=3, epochs=1)
    for task in stream.tasks[:2]:
        m.learn(task, None)
    calls = {k: [] for k in range(2)}
    for k in range(2):
        m.heads.heads[k].register_forward_hook(lambda mod, args, out, k=k: calls[k].append(len(args[0])))
    backbone = []
    first = next(mod for mod in m.model.modules() if isinstance(mod, torch.nn.Conv2d))
    first.register_forward_hook(lambda mod, args, out: backbone.append(len(args[0])))
    drawn = []
    real = type(m).draw
    monkeypatch.setattr(type(m), "draw", lambda self, device: drawn.append(real(self, device)) or drawn[-1])
    losses = []
    real_criterion = type(m).criterion

    def criterion(self, logits, y):
        replayed = list(self._replayed)
        loss = real_criterion(self, logits, y)
        # the mean cross-entropy over the new and the memory samples of the step, each through its head
        every = torch.cat([logits, *[o for o, _ in replayed]]), torch.cat([y, *[lab for _, lab in replayed]])
        losses.append((float(loss), float(F.cross_entropy(*every))))
        return loss

    monkeypatch.setattr(type(m), "criterion", criterion)
    m.learn(stream.tasks[2], None)
    steps = len(stream.tasks[2].train.loader(16))
    assert len(drawn) == steps and len(losses) == steps
    new = [len(x) for x, _ in stream.tasks[2].train.loader(16)]
    for s, (xm, ym, tm) in enumerate(drawn):
        assert len(xm) == 6 and set(tm.tolist()) <= {0, 1}
        assert backbone[s] == new[s] + 6  # one backbone pass over the new and the memory samples together
        for k in (0, 1):  # task k's memory samples, and only they, through head k
            assert calls[k][s] == int((tm == k).sum())
    assert all(a == pytest.approx(b, rel=1e-6) for a, b in losses)


def test_head_tail_computes_what_the_whole_network_computes_after_its_head():
    m, stream = method_and_stream({"name": "finetune", "keep_copies": False})
    m.learn(stream.tasks[0], None)
    x = inputs(stream.tasks[0], 8)
    m.model.eval()
    m.heads.keep_features = True
    with torch.no_grad():
        whole = m.model(x)
        torch.testing.assert_close(head_tail(m.model, m.head_target)(m.heads.features), whole)
    m.heads.keep_features, m.heads.features = False, None


def test_a_penalty_too_strong_for_the_optimiser_is_named_when_training_diverges():
    from grownfx.learn.guards import NonFiniteError

    m, stream = method_and_stream({"name": "ewc", "lam": 1e12, "fisher_samples": 8}, epochs=2)
    m.learn(stream.tasks[0], None)
    with pytest.raises(NonFiniteError, match=r"lower method\.lam \(1e\+12\)"):
        m.learn(stream.tasks[1], None)
