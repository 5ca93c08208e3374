"""DEN and APD: each method's defining property, checked against a computation of its own (captured outputs,
weights composed by hand and run through the original backbone), on tiny LeNets and CNNs."""

from __future__ import annotations

import textwrap

import pytest
import torch
from torch.func import functional_call

from grownfx.data import build_stream
from grownfx.engine.errors import SurgeryError
from grownfx.errors import UserError
from grownfx.learn.methods import make_method
from grownfx.models import build_backbone
from grownfx.recipe.schema import Recipe


def recipe(method: dict, *, model: dict | None = None, data: dict | None = None, epochs: int = 2,
           training_extra: dict | None = None, **top) -> Recipe:
    return Recipe.model_validate({
        "name": "den_apd", "seed": 0, "device": "cpu",
        "model": model or {"builder": "lenet5", "kwargs": {"in_channels": 1, "input_size": 16,
                                                          "widths": [4, 6, 12, 8]}},
        "data": data or {"name": "synthetic", "num_tasks": 2, "classes_per_task": 2, "input_shape": [1, 16, 16],
                         "train_per_class": 16},
        "method": method,
        "training": {"epochs": epochs, "batch_size": 16, "num_threads": 1, "precise_bn": False,
                     "optimizer": {"name": "adam", "lr": 0.01, "momentum": 0.0, "nesterov": False},
                     **(training_extra or {})},
        "output": {"dir": "unused", "tensorboard": False, "export_format": "none"}, **top,
    })


def method_and_stream(method: dict, **kw):
    r = recipe(method, **kw)
    stream = build_stream(r.data, r.seed)
    return make_method(r, stream, torch.device("cpu")), stream


def inputs(task, n: int = 8) -> torch.Tensor:
    return task.test.normalize(task.test.x[:n], augment=None)


# --------------------------------------------------------------------------------------------------- DEN


def snapshot(m):
    return [(l.weight.detach().clone(), None if l.bias is None else l.bias.detach().clone()) for l in m.layers]


def test_den_splits_the_drifting_unit_and_the_old_task_keeps_its_value():
    m, stream = method_and_stream({"name": "den", "spl_thr": 0.05, "k_ex": 10})
    m.learn(stream.tasks[0], None)
    x = inputs(stream.tasks[0])
    before = m.logits(0, x).clone()
    prev = snapshot(m)
    m.heads.heads.append(m._den_head(2, 1))  # task 1 begins: its head reads every unit
    layer = m.layers[1]
    above = m.layers[2]  # a Linear reading layer 1's units one column each (16 x 16 inputs: 1 x 1 maps)
    with torch.no_grad():  # unit 3 of layer 1 drifts by 0.5 (over spl_thr), unit 0 by 0.01 (under it), and
        layer.weight[3] += 0.5 / layer.weight[3].numel() ** 0.5
        layer.weight[0] += 0.01 / layer.weight[0].numel() ** 0.5
        above.weight[:, 3] += 0.01  # unit 3's outgoing weights by 0.01 per unit above (under it)
    drifted, outgoing = layer.weight[3].detach().clone(), above.weight[:, 3].detach().clone()
    assert not torch.equal(m.logits(0, x), before)
    counts = m.split(1, prev)
    assert counts == [0, 1, 0, 0]
    assert layer.units == prev[1][0].shape[0] + 1
    assert torch.equal(layer.weight[-1, :prev[1][0].shape[1]], drifted)  # the copy holds the new value ...
    assert torch.equal(layer.weight[3], prev[1][0][3])  # ... the unit its old one
    assert torch.equal(above.weight[:, -1], outgoing) and torch.equal(above.weight[:, 3], prev[2][0][:, 3])
    assert not torch.equal(layer.weight[0], prev[1][0][0])  # a small drift is no split
    with torch.no_grad():
        layer.weight[0] = prev[1][0][0]
    assert torch.equal(m.logits(0, x), before)  # task 0 computes with the old value, bit for bit
    assert m.widths(0) == [w.shape[0] for w, _ in prev]  # and with the units it was learned with


def learn_two_tasks_splitting(m, stream):
    """Task 0, then task 1 with units split and expanded: (task 0's inputs, its outputs before task 1, the widths
    before task 1, task 1's record)."""
    m.learn(stream.tasks[0], None)
    x = inputs(stream.tasks[0])
    before = m.logits(0, x).clone()
    units = m.widths()
    record = m.learn(stream.tasks[1], None)
    assert sum(record.extra["split"]) > 0 and sum(record.extra["expanded"]) > 0
    return x, before, units, record


def test_den_with_every_drift_split_forgets_nothing():
    """spl_thr 0 and k_ex over every width: each earlier unit that moved is split, so task 0's outputs after
    task 1 (selective retraining, expansion, split) equal those before it, though task 1 retrained the units."""
    m, stream = method_and_stream({"name": "den", "spl_thr": 0.0, "k_ex": 64, "loss_thr": 0.0})
    x, before, units, record = learn_two_tasks_splitting(m, stream)
    assert m.widths(0) == units and all(a > b for a, b in zip(m.widths(1), units))
    assert torch.equal(m.logits(0, x), before)
    for t in (0, 1):  # the export of a task computes as the method does
        assert torch.equal(m.export(t)(x), m.logits(t, x))


def test_den_expands_only_when_the_loss_is_above_the_threshold():
    grown = {}
    for thr in (0.0, 1e9):
        m, stream = method_and_stream({"name": "den", "loss_thr": thr, "spl_thr": 1e9})
        m.learn(stream.tasks[0], None)
        units = m.widths()
        record = m.learn(stream.tasks[1], None)
        assert (record.extra["loss"] >= thr) == (thr == 0.0)
        grown[thr] = [a - b for a, b in zip(m.widths(), units)]
        assert grown[thr] == record.extra["expanded"]
    assert grown[1e9] == [0, 0, 0, 0]
    assert all(0 < g <= 10 for g in grown[0.0])


def test_den_s_loss_for_the_expansion_decision_is_the_mean_training_cross_entropy():
    """Step 3's threshold reads the mean cross-entropy over the task's training split after retraining: without
    expansion or split the network is then the task's final one, so it is the task model's mean loss."""
    import torch.nn.functional as F

    m, stream = method_and_stream({"name": "den", "loss_thr": 1e9, "spl_thr": 1e9})
    m.learn(stream.tasks[0], None)
    record = m.learn(stream.tasks[1], None)
    train = stream.tasks[1].train
    x = train.normalize(train.x, augment=None)
    expected = float(F.cross_entropy(m.logits(1, x).float(), train.y))
    assert record.extra["loss"] == pytest.approx(expected, rel=1e-5)


def test_den_s_retraining_penalty_holds_weights_and_biases_at_half_regular_lambda():
    """Step 2's penalty (l2_lambda 0 here): regular_lambda * 1/2 |W - W_prev|^2 over every layer's weights and
    biases, W_prev the values before the task; computed from the drift after the task (no expansion, no split:
    the retrained network is the final one)."""
    m, stream = method_and_stream({"name": "den", "loss_thr": 1e9, "spl_thr": 1e9, "l2_lambda": 0.0,
                                   "regular_lambda": 0.5})
    m.learn(stream.tasks[0], None)
    before = snapshot(m)
    penalties, train = {}, m.trainer.train

    def spy(*a, **k):
        penalties[k["name"]] = k["terms"].penalty
        return train(*a, **k)

    m.trainer.train = spy
    m.learn(stream.tasks[1], None)
    with torch.no_grad():
        weights = sum(float((l.weight - w).pow(2).sum()) for l, (w, _) in zip(m.layers, before))
        biases = sum(float((l.bias - b).pow(2).sum()) for l, (_, b) in zip(m.layers, before) if b is not None)
        assert biases > 0  # the biases moved: their term counts
        assert float(penalties["retrain"]()) == pytest.approx(0.5 * 0.5 * (weights + biases), rel=1e-5)


def test_den_s_l1_step_soft_thresholds_the_trained_weight_entries_only():
    """After every optimiser step DEN applies the L1 proximal step sign(w) max(|w| - l1, 0) to the trained entries
    of the weights (not to biases), and the entries a stage does not train keep their values."""
    from grownfx.learn.methods.den import _StagePlan

    weight = torch.nn.Parameter(torch.tensor([[0.0625, -0.25], [0.5625, -0.0625]]))  # exact in binary
    bias = torch.nn.Parameter(torch.tensor([0.0625, -0.25]))
    trains = {weight: torch.tensor([[True, True], [True, False]]), bias: torch.tensor([True, True])}
    plan = _StagePlan(trains, 0.125, {weight})
    with torch.no_grad():
        weight.sub_(0.5)  # an optimiser step moved everything, the untrained entry included
        bias.sub_(0.5)
    plan.after_step()
    assert torch.equal(weight.detach(), torch.tensor([[-0.3125, -0.625], [0.0, -0.0625]]))
    assert torch.equal(bias.detach(), torch.tensor([-0.4375, -0.75]))


def test_den_selects_the_units_the_new_head_reaches():
    m, stream = method_and_stream({"name": "den"})
    m.learn(stream.tasks[0], None)
    m.heads.heads.append(m._den_head(2, 1))
    with torch.no_grad():
        head = m.heads.heads[1].weight
        head.zero_()
        head[1, 5] = head[0, 6] = 1.0  # the head reads units 5 and 6 of the last hidden layer (8 units)
        m.layers[3].weight[5:7].zero_()
        m.layers[3].weight[5, 7] = m.layers[3].weight[6, 9] = 1.0  # which read units 7 and 9 of the one below
        m.layers[2].weight[7].zero_()
        m.layers[2].weight[9].zero_()
        m.layers[2].weight[7, 2] = 1.0  # which reads column 2 = unit 2 of the conv below (6 units, 1 x 1 maps)
        m.layers[1].weight[2].zero_()
        m.layers[1].weight[2, 3, 0, 4] = -1.0  # which reads channel 3 of the first conv through one tap
    chosen = m.subnetwork(1)
    assert chosen == [[3], [2], [7, 9], [5, 6]]


def test_den_drops_new_units_whose_incoming_weights_vanished():
    m, stream = method_and_stream({"name": "den", "k_ex": 3})
    m.learn(stream.tasks[0], None)
    m.heads.heads.append(m._den_head(2, 1))
    units = m.widths()
    added = m.expand(1)
    with torch.no_grad():  # new unit 1 of layer 2 lost its incoming weights; new unit 2 outputs about 5
        m.layers[2].weight[added[2][1]].zero_()
        m.layers[2].bias[added[2][1]] = 0.0
        m.layers[2].weight[added[2][2]] *= 1e-3
        m.layers[2].bias[added[2][2]] = 5.0
    x = inputs(stream.tasks[1])
    out = m.logits(1, x).clone()
    assert m.drop_dead_units(1, added) == [3, 3, 2, 3]
    assert m.widths() == [u + k for u, k in zip(units, [3, 3, 2, 3])]
    torch.testing.assert_close(m.logits(1, x), out)  # a unit that outputs 0 took nothing with it


REFUSED = {
    "grouped": ("nn.Sequential(nn.Conv2d(1, 4, 3), nn.Conv2d(4, 4, 3, groups=2), nn.Flatten(), "
                "nn.Linear(4 * 16, num_classes))", "Conv2d '1' is a grouped convolution"),
    "prelu": ("nn.Sequential(nn.Conv2d(1, 4, 3), nn.PReLU(), nn.Flatten(), nn.Linear(4 * 36, num_classes))",
              "PReLU '1' holds parameters"),
    "groupnorm": ("nn.Sequential(nn.Conv2d(1, 4, 3), nn.GroupNorm(2, 4), nn.Flatten(), "
                  "nn.Linear(4 * 36, num_classes))", "GroupNorm '1' holds parameters"),
}


@pytest.mark.parametrize("kind", sorted(REFUSED))
def test_den_refuses_what_it_cannot_grow_by_name(tmp_path, kind):
    body, message = REFUSED[kind]
    (tmp_path / "refused_net.py").write_text(f"from torch import nn\ndef build(num_classes=10):\n    return {body}\n")
    with pytest.raises(SurgeryError, match=message):
        method_and_stream({"name": "den"}, model={"builder": "refused_net:build"}, code_dir=str(tmp_path),
                          data={"name": "digits", "num_tasks": 2, "limit_per_task": 32})


RESIDUAL_NET = textwrap.dedent("""
    import torch
    import torch.nn.functional as F
    from torch import nn

    class Net(nn.Module):  # stem and block.conv2 add into one residual group; BatchNorm on every conv
        def __init__(self, num_classes=10):
            super().__init__()
            self.stem, self.bn = nn.Conv2d(1, 4, 3, padding=1, bias=False), nn.BatchNorm2d(4)
            self.conv1, self.bn1 = nn.Conv2d(4, 5, 3, padding=1, bias=False), nn.BatchNorm2d(5)
            self.conv2, self.bn2 = nn.Conv2d(5, 4, 3, padding=1, bias=False), nn.BatchNorm2d(4)
            self.down = nn.Conv2d(4, 6, 1, stride=2)
            self.pool, self.fc = nn.AdaptiveAvgPool2d(1), nn.Linear(6, num_classes)

        def forward(self, x):
            x = F.relu(self.bn(self.stem(x)))
            x = F.relu(x + self.bn2(self.conv2(F.relu(self.bn1(self.conv1(x))))))
            return self.fc(torch.flatten(self.pool(self.down(x)), 1))

    def build(num_classes=10):
        return Net(num_classes)
""")


def residual_method(tmp_path, method: dict, epochs: int = 2):
    (tmp_path / "residual_net.py").write_text(RESIDUAL_NET)
    return method_and_stream({"name": "den", **method}, model={"builder": "residual_net:build"},
                             code_dir=str(tmp_path), data=DIGITS, epochs=epochs)


def test_den_norm_in_training_mode_updates_only_the_learning_task_s_statistics():
    """DENNorm: `train()` (which returns the module, as every nn.Module's does) leaves a finished task's copy in
    evaluation mode, so a training forward of that task moves none of its statistics; the learning copy's move."""
    from grownfx.learn.methods.den_units import DENNorm

    norm = DENNorm(torch.nn.BatchNorm2d(3))
    norm.add_task()
    norm.finish()
    norm.add_task()
    assert norm.train() is norm
    x = torch.randn(4, 3, 5, 5) + 2.0
    finished = {k: v.clone() for k, v in norm.copies[0].state_dict().items()}
    norm.task = 0
    norm(x)
    assert all(torch.equal(v, norm.copies[0].state_dict()[k]) for k, v in finished.items())
    norm.task = 1
    norm(x)
    assert not torch.equal(norm.copies[1].running_mean, finished["running_mean"])


def test_den_on_batchnorm_and_a_residual_sum_forgets_nothing_when_every_drift_splits(tmp_path):
    """The residual group (stem + conv2) grows and splits in both producers together, BatchNorm is one copy per
    task: with spl_thr 0 task 0's outputs after task 1 (selection, retraining, expansion, splits) are bit-exact."""
    m, stream = residual_method(tmp_path, {"spl_thr": 0.0, "k_ex": 64, "loss_thr": 0.0})
    assert m.names == ["stem", "conv1", "conv2", "down"]
    assert m.structure.out_group[0] == m.structure.out_group[2] == m.structure.in_group[1] == m.structure.in_group[3]
    x, before, units, record = learn_two_tasks_splitting(m, stream)
    widths = m.widths()
    assert widths[0] == widths[2] > units[0] and m.widths(0) == units
    assert [c.num_features for c in m.norms["bn"].copies] == [units[0], widths[0]]
    norms = sum(2 * c.num_features for n in m.norms.values() for c in n.copies)  # gamma and beta per task
    layers = sum(l.weight.numel() + (l.bias.numel() if l.bias is not None else 0) for l in m.layers)
    assert m.num_parameters() == layers + norms + sum(h.weight.numel() + h.bias.numel() for h in m.heads.heads)
    assert torch.equal(m.logits(0, x), before)
    m.model.train()
    m._forward(0)(x)  # a finished task's BatchNorm copies stay in evaluation mode: no statistics move
    assert torch.equal(m.logits(0, x), before)
    for t in (0, 1):
        assert torch.equal(m.export(t)(x), m.logits(t, x))
    again, _ = residual_method(tmp_path, {"spl_thr": 0.0, "k_ex": 64, "loss_thr": 0.0})
    again.load_state(m.state())
    for t in (0, 1):
        assert torch.equal(again.logits(t, x), m.logits(t, x))


def test_den_selects_through_a_residual_group_from_every_layer_reading_it(tmp_path):
    """The head reaches down's unit 0, which reads residual unit 1; conv2 makes unit 1 from conv1's unit 3, which
    reads residual unit 0; conv2 makes unit 0 from conv1's unit 4.  Both residual units are reached, so conv1's
    units 3 and 4 are (one pass from the head down would miss unit 4)."""
    m, stream = residual_method(tmp_path, {}, epochs=1)
    m.learn(stream.tasks[0], None)
    m.heads.heads.append(m._den_head(2, 1))
    stem, conv1, conv2, down = m.layers
    with torch.no_grad():
        head = m.heads.heads[1].weight
        head.zero_()
        head[1, 0] = 1.0
        down.weight[0].zero_()
        down.weight[0, 1] = 1.0
        conv2.weight[:2].zero_()
        conv2.weight[1, 3, 1, 1] = conv2.weight[0, 4, 0, 2] = 1.0
        conv1.weight[3:5].zero_()
        conv1.weight[3, 0, 2, 2] = 1.0
        conv1.weight[4, 1, 0, 0] = -1.0
    assert m.subnetwork(1) == [[0, 1], [3, 4], [0, 1], [0]]


def test_den_splits_a_residual_unit_in_every_layer_producing_it(tmp_path):
    """A unit of the residual group drifts in conv2 only: it is split in stem and conv2 together, the copies hold
    the new values (and conv1's and down's columns reading it), the unit its old ones; task 0 is bit-exact."""
    m, stream = residual_method(tmp_path, {"spl_thr": 0.05, "k_ex": 10})
    m.learn(stream.tasks[0], None)
    x = inputs(stream.tasks[0])
    before = m.logits(0, x).clone()
    prev = snapshot(m)
    m.heads.heads.append(m._den_head(2, 1))
    for norm in m.norms.values():
        norm.add_task()
    stem, conv1, conv2, down = m.layers
    with torch.no_grad():
        conv2.weight[2] += 0.5 / conv2.weight[2].numel() ** 0.5  # residual unit 2 drifts (through conv2)
        conv1.weight[:, 2] += 0.01  # its outgoing weights into conv1's units (under spl_thr per unit of conv1)
    drifted, outgoing = conv2.weight[2].clone(), conv1.weight[:, 2].clone()
    counts = m.split(1, prev)
    assert counts == [1, 0, 1, 0]
    assert stem.units == conv2.units == 5 and conv1.columns == down.columns == 5
    assert torch.equal(conv2.weight[-1], drifted) and torch.equal(conv2.weight[2], prev[2][0][2])
    assert torch.equal(stem.weight[-1], stem.weight[2])  # the stem's copy: its (unmoved) current values
    assert torch.equal(conv1.weight[:, -1], outgoing) and torch.equal(conv1.weight[:, 2], prev[1][0][:, 2])
    assert torch.equal(down.weight[:, -1], down.weight[:, 2])
    assert m.norms["bn2"].copies[1].num_features == 5 and m.norms["bn2"].copies[0].num_features == 4
    assert torch.equal(m.logits(0, x), before)


# --------------------------------------------------------------------------------------------------- APD

SMALL = {"builder": "small_cnn", "kwargs": {"in_channels": 1, "width": 4, "hidden": 8}}
DIGITS = {"name": "digits", "num_tasks": 3, "limit_per_task": 48}


def test_apd_task_output_is_shared_times_mask_plus_adaptive():
    """Each task's output equals the original backbone run with sigma * sigmoid(m_t) + tau_t composed by hand,
    the task's bias, its norms and its head."""
    m, stream = method_and_stream({"name": "apd"}, model=SMALL, data=DIGITS, epochs=1)
    for task in stream.tasks[:2]:
        m.learn(task, None)
    r = m.recipe
    torch.manual_seed(0)
    net = build_backbone(r.model.builder, 10, r.model.kwargs).eval()
    x = inputs(stream.tasks[0])
    for t in range(2):
        values = {}
        for name, layer in m.layers.items():
            mask = torch.sigmoid(layer.masks[t].detach())
            shape = (-1,) + (1,) * (layer.sigma.dim() - 1)
            values[f"{name}.weight"] = layer.sigma.detach() * mask.reshape(shape) + layer.taus[t].detach()
            if layer.has_bias:
                values[f"{name}.bias"] = layer.biases[t].detach()
        for name, norm in m.norms.items():
            values.update({f"{name}.{k}": v for k, v in norm.copies[t].state_dict().items()})
        values.update({f"{m.head_target}.{k}": v for k, v in m.heads.heads[t].state_dict().items()})
        assert set(values) == set(net.state_dict())
        torch.testing.assert_close(functional_call(net, values, (x,)), m.logits(t, x), rtol=1e-5, atol=1e-6)
        assert torch.equal(m.export(t)(x), m.logits(t, x))


def test_apd_retroactive_penalty_is_zero_unmoved_and_grows_with_drift():
    m, stream = method_and_stream({"name": "apd", "lam2": 100.0}, model=SMALL, data=DIGITS, epochs=1)
    for task in stream.tasks[:2]:
        m.learn(task, None)
    m.heads.heads.append(m._new_head(2, 2))
    m.begin_task(stream.tasks[2], 2, resumed=False)
    assert float(m.retroactive(2).detach()) == 0.0
    name, layer = next(iter(m.layers.items()))
    delta = torch.randn(layer.sigma.shape, generator=torch.Generator().manual_seed(1)) * 1e-2
    shape = (-1,) + (1,) * (layer.sigma.dim() - 1)
    expected = sum(100.0 * 0.5 * (delta * torch.sigmoid(layer.masks[j].detach()).reshape(shape)).pow(2).sum()
                   for j in range(2))
    with torch.no_grad():
        layer.sigma += delta
    torch.testing.assert_close(m.retroactive(2).detach(), expected)
    with torch.no_grad():
        layer.sigma += delta  # twice the drift: four times the penalty
    torch.testing.assert_close(m.retroactive(2).detach(), 4 * expected)
    with torch.no_grad():
        layer.sigma -= 2 * delta
        layer.taus[0] += delta  # task 0's adaptive part moved alone
    torch.testing.assert_close(m.retroactive(2).detach(), 100.0 * 0.5 * delta.pow(2).sum())


def test_apd_taus_are_sparse_and_counted_as_stored():
    m, stream = method_and_stream({"name": "apd", "lam1": 1e-2}, model=SMALL, data=DIGITS)
    x = inputs(stream.tasks[0])
    record = m.learn(stream.tasks[0], None)
    before = m.logits(0, x).clone()
    m.learn(stream.tasks[1], None)
    taus = [tau for layer in m.layers.values() for tau in layer.taus]
    assert all(bool(((tau == 0) | (tau.abs() > 1e-2)).all()) for tau in taus)  # hard-thresholded at lam1
    nonzero = sum(int((tau != 0).sum()) for tau in taus)
    assert nonzero < sum(tau.numel() for tau in taus)
    dense = sum(layer.sigma.numel() + sum(q.numel() for q in (*layer.masks, *layer.biases))
                for layer in m.layers.values())
    norms = sum(p.numel() for n in m.norms.values() for p in n.copies.parameters())
    heads = sum(p.numel() for p in m.heads.parameters())
    assert m.num_parameters() == dense + nonzero + norms + heads
    assert record.params_stored < m.num_parameters()
    assert not torch.equal(m.logits(0, x), before)  # task 0 moved with sigma: APD's BWT is measured, not 0


def test_apd_refuses_a_layer_kind_it_cannot_decompose_by_name(tmp_path):
    (tmp_path / "prelu_net.py").write_text(textwrap.dedent("""
        from torch import nn
        def build(num_classes=10):
            return nn.Sequential(nn.Conv2d(1, 4, 3), nn.PReLU(), nn.Flatten(), nn.Linear(4 * 36, num_classes))
    """))
    with pytest.raises(SurgeryError, match="PReLU '1'"):
        method_and_stream({"name": "apd"}, model={"builder": "prelu_net:build"}, code_dir=str(tmp_path),
                          data={"name": "digits", "num_tasks": 2, "limit_per_task": 32})


def test_den_refuses_an_epoch_budget_in_one_line():
    with pytest.raises(UserError, match="^training.epoch_budget: DEN's stages"):
        method_and_stream({"name": "den"}, training_extra={"epoch_budget": 4})


# ------------------------------------------------------------------------------- APD: clustering of the taus

def _clustered_setup(e_gap: float, lam1: float, clustering_iter: int = 2, k_centroids: int = 1):
    """APD after two tasks (clustered once at the end of task 1 with one group), then the layers' full taus set to
    a known state, unclustered: task 1's full tau is `near(tau_0)` on half the entries and far from it elsewhere."""
    m, stream = method_and_stream({"name": "apd", "e_gap": e_gap, "lam1": lam1, "clustering_iter": clustering_iter,
                                   "k_centroids": k_centroids}, model=SMALL, data=DIGITS, epochs=1)
    for task in stream.tasks[:2]:
        m.learn(task, None)
    halves = {}
    for i, (name, layer) in enumerate(m.layers.items()):
        g = torch.Generator().manual_seed(i)
        full0 = layer.full_tau(0)
        half = torch.rand(full0.shape, generator=g) < 0.5
        noise = (torch.rand(full0.shape, generator=g) * 2 - 1) * (0.9 * e_gap)  # within e_gap: shared
        with torch.no_grad():
            layer.taus[0].copy_(full0)
            layer.taus[1].copy_(torch.where(half, full0 + noise, full0 + 0.2))  # 0.2 > e_gap: not shared
        layer.shared, layer.groups, layer.centroids = torch.nn.ParameterList(), [-1, -1], None
        halves[name] = half
    return m, stream, halves


def test_apd_clustering_keeps_every_task_bit_exact_where_members_agree_and_stores_less():
    """Tasks that agree exactly on some entries share them: every old task's output is bit-exact after the
    consolidation, and the stored size drops by exactly the entries now stored once instead of twice."""
    m, stream, halves = _clustered_setup(e_gap=0.0, lam1=0.0)
    x = inputs(stream.tasks[0])
    before = [m.logits(t, x).clone() for t in range(2)]
    size = m.num_parameters()
    saved = sum(int((half & (m.layers[n].taus[0] != 0)).sum()) for n, half in halves.items())
    assert saved > 0
    groups = m.consolidate(1)
    assert all(g == [0, 0] for g in groups.values())
    for t in range(2):
        assert torch.equal(m.logits(t, x), before[t])
        assert torch.equal(m.export(t)(x), before[t])
    assert m.num_parameters() == size - saved
    for name, layer in m.layers.items():
        assert layer.groups == [0, 0] and len(layer.shared) == 1
        assert not bool(layer.taus[0][halves[name]].any()) and not bool(layer.taus[1][halves[name]].any())
        assert not bool(layer.shared[0][~halves[name]].any())  # the far entries stay each task's own


def test_apd_clustering_moves_each_weight_by_at_most_half_the_gap_plus_lam1():
    """Members that differ by less than e_gap share the midrange: each old task's weights move by at most
    e_gap / 2 + lam1 per entry (the stated tolerance: the outputs move as those weights do), nothing else
    moves, and the size drops."""
    e_gap, lam1 = 0.05, 1e-3
    m, stream, halves = _clustered_setup(e_gap=e_gap, lam1=lam1)
    thetas = {(n, t): layer.theta(t).detach().clone() for n, layer in m.layers.items() for t in range(2)}
    size = m.num_parameters()
    m.consolidate(1)
    for (n, t), theta in thetas.items():
        moved = (m.layers[n].theta(t).detach() - theta).abs()
        assert float(moved.max()) <= e_gap / 2 + lam1 + 1e-6
        assert bool((moved[~halves[n]] == 0).all())  # what is not shared does not move
    assert m.num_parameters() < size


def test_apd_shared_part_at_exactly_lam1_is_thresholded_to_zero():
    """The locally shared weight is hard-thresholded as the taus are, |x| <= lam1 -> 0 (the module docstring): a
    midrange exactly at +-lam1 is dropped, one above it kept; the agreeing entries leave the members' taus."""
    from grownfx.learn.methods.apd import APDLayer

    layer = APDLayer(torch.nn.Linear(2, 2))
    g = torch.Generator().manual_seed(0)
    for _ in range(2):
        layer.add_task(g)
    lam1 = 0.25  # exact in binary: the tie is exact
    value = torch.tensor([[lam1, -lam1], [2 * lam1, 0.5 * lam1]])
    with torch.no_grad():
        for tau in layer.taus:
            tau.copy_(value)
    layer.consolidate(1, e_gap=0.0, lam1=lam1, generator=torch.Generator().manual_seed(1))
    assert layer.groups == [0, 0]
    assert torch.equal(layer.shared[0], torch.tensor([[0.0, 0.0], [2 * lam1, 0.0]]))
    assert all(not bool(tau.any()) for tau in layer.taus)


def test_apd_kmeans_moves_its_centroids_to_the_groups_from_a_poor_start():
    """Lloyd's iterations: both starting centroids (the previous clustering's) inside one of two clear groups
    still end as the two groups' means; an empty cluster keeps its centroid."""
    from grownfx.learn.methods.apd import kmeans

    points = torch.tensor([[0.0], [0.1], [10.0], [10.1]])
    assignment, centroids = kmeans(points, 2, torch.Generator().manual_seed(0),
                                   previous=torch.tensor([[0.0], [0.1]]))
    assert assignment.tolist() == [0, 0, 1, 1]
    torch.testing.assert_close(centroids, torch.tensor([[0.05], [10.05]]))
    assignment, centroids = kmeans(points, 3, torch.Generator().manual_seed(0),
                                   previous=torch.tensor([[0.0], [10.0], [-50.0]]))
    assert assignment.tolist() == [0, 0, 1, 1] and float(centroids[2, 0]) == -50.0


def _apd_layer_with_taus_near(pattern: str):
    """An APD layer with one task per letter of `pattern`, each task's tau within 1e-3 of centre a or b (b is a
    + 3: two tight clusters far apart); returns (layer, a, b)."""
    from grownfx.learn.methods.apd import APDLayer

    layer = APDLayer(torch.nn.Linear(6, 5))
    g = torch.Generator().manual_seed(0)
    for _ in pattern:
        layer.add_task(g)
    a, b = torch.randn(5, 6, generator=g), torch.randn(5, 6, generator=g) + 3.0
    with torch.no_grad():
        for j, kind in enumerate(pattern):
            layer.taus[j].copy_({"a": a, "b": b}[kind] + 1e-3 * torch.randn(5, 6, generator=g))
    return layer, a, b


def test_apd_a_group_of_one_before_a_pair_leaves_the_pair_sharing():
    """Clusters are decomposed one after another: a task alone in the first cluster keeps its whole tau, and the
    pair in the next one still gets its shared part (the clusters' order comes from the previous centroids)."""
    layer, a, b = _apd_layer_with_taus_near("baa")
    full = [layer.full_tau(j) for j in range(3)]
    layer.centroids = torch.stack([b.flatten(), a.flatten()])  # cluster 0: the single task, cluster 1: the pair
    assert layer.consolidate(2, e_gap=1e-2, lam1=0.0, generator=torch.Generator().manual_seed(1)) == [0, 1, 1]
    assert layer.groups == [-1, 0, 0] and len(layer.shared) == 1
    assert torch.equal(layer.taus[0], full[0])
    for j in (1, 2):
        assert float((layer.full_tau(j) - full[j]).abs().max()) <= 0.5e-2 + 1e-6


def test_apd_kmeans_groups_tasks_with_similar_taus_and_a_single_keeps_its_whole_tau():
    """Four tasks whose taus form two tight pairs and k = 2: the pairs are the groups, each with its own shared
    part; with k = 3 one pair splits and its two tasks keep their whole taus."""
    layer, _, _ = _apd_layer_with_taus_near("abab")
    full = [layer.full_tau(j) for j in range(4)]
    groups = layer.consolidate(2, e_gap=1e-2, lam1=0.0, generator=torch.Generator().manual_seed(1))
    assert groups[0] == groups[2] != groups[1] == groups[3]
    assert len(layer.shared) == 2 and layer.groups[0] == layer.groups[2] != layer.groups[1]
    for j in range(4):
        assert float((layer.full_tau(j) - full[j]).abs().max()) <= 0.5e-2 + 1e-6
    shared = [s.detach().clone() for s in layer.shared]
    again = layer.consolidate(2, e_gap=1e-2, lam1=0.0, generator=torch.Generator().manual_seed(5))
    assert again == groups and len(layer.shared) == 2  # re-decomposed from the full taus: the old parts replaced
    assert all(torch.equal(a, b) for a, b in zip(layer.shared, shared))
    groups3 = layer.consolidate(3, e_gap=1e-2, lam1=0.0, generator=torch.Generator().manual_seed(5))
    assert groups3[0] == groups3[2] != groups3[1] == groups3[3]  # from the previous centroids: the same pairs
    with torch.no_grad():  # back to before: the pairs' members are no longer identical
        for j in range(4):
            layer.taus[j].copy_(full[j])
    layer.shared, layer.groups, layer.centroids = torch.nn.ParameterList(), [-1] * 4, None
    groups = layer.consolidate(3, e_gap=1e-2, lam1=0.0, generator=torch.Generator().manual_seed(1))
    singles = [j for j in range(4) if groups.count(groups[j]) == 1]
    assert len(singles) == 2 and len(layer.shared) == 1
    for j in singles:
        assert layer.groups[j] == -1
        assert torch.equal(layer.taus[j], full[j])  # its whole tau, its own


def test_apd_clusters_every_clustering_iter_tasks_and_reloads_what_it_clustered():
    m, stream = method_and_stream({"name": "apd", "clustering_iter": 2, "k_centroids": 1, "e_gap": 0.05},
                                  model=SMALL, data=DIGITS, epochs=1)
    records = [m.learn(task, None) for task in stream.tasks]
    assert ["clusters" in r.extra for r in records] == [False, True, False]
    assert all(g == [0, 0] for g in records[1].extra["clusters"].values())
    assert records[1].extra["shared_nonzero"] > 0
    assert all(0 < r.extra["tau_density"] < 1 for r in records)
    x = inputs(stream.tasks[0])
    again, _ = method_and_stream(m.recipe.method.model_dump(), model=SMALL, data=DIGITS, epochs=1)
    again.load_state(m.state())
    for t in range(3):
        assert torch.equal(again.logits(t, x), m.logits(t, x))
        assert torch.equal(m.export(t)(x), m.logits(t, x))
