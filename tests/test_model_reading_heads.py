"""How `prepare` finds and copies a hand-written model's classifier (issue 22, class 5): concatenated heads,
per-class parameters after the head, cosine and functional classifiers, declared heads, outputs that need a
selector, logits that do not follow the class count."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import grownfx
from test_silent_cases import lifecycle

from model_frames import X, Frame, Plain, groups_of, reasons


# --- class 5: heads ------------------------------------------------------------------------------------------


class TwoHeads(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.head_a, self.head_b = nn.Linear(8, 5), nn.Linear(8, 5)

    def forward(self, x):
        f = self.stem(x).mean((2, 3))
        return torch.cat([self.head_a(f), self.head_b(f)], 1)


def test_concatenated_heads_are_refused():
    # before: a 5-class task got 10 logits, with no error
    with pytest.raises(grownfx.SurgeryError, match=r"concatenation of 2 parts \(head_a \(5\), head_b \(5\)\)"):
        grownfx.prepare(TwoHeads(), X)
    # declaring one of them does not help: the other's logits would not follow the task's classes
    with pytest.raises(grownfx.SurgeryError, match="do not follow the number of classes"):
        grownfx.prepare(TwoHeads(), X, head="head_a")


class LogitAdjusted(Frame):
    """Logit adjustment: a per-class bias after the head."""

    def __init__(self, buffer=False):
        super().__init__(classes=10)
        prior = torch.randn(10)
        if buffer:
            self.register_buffer("log_prior", prior)
        else:
            self.log_prior = nn.Parameter(prior)

    def mid(self, x):
        return x

    def forward(self, x):
        return super().forward(x) + self.log_prior


def test_per_class_parameter_after_the_head_is_per_task():
    # before: crashed at add_task (10 values of log_prior against a 5-class head)
    net = lifecycle(LogitAdjusted(), X)
    holder = net.graph_module.get_submodule("task_params.log_prior")
    assert [tuple(c.shape) for c in holder.copies] == [(5,), (3,)]


class IntegerClassOffset(Frame):
    """An integer per-class parameter (not trained) added to the logits."""

    def __init__(self):
        super().__init__()
        self.offset = nn.Parameter(torch.arange(5), requires_grad=False)

    def mid(self, x):
        return x

    def forward(self, x):
        return super().forward(x) + self.offset


def test_an_integer_per_class_parameter_after_the_head_is_per_task():
    net = grownfx.prepare(IntegerClassOffset(), X)
    t = net.add_task(3)
    assert net(X, task=t).shape == (4, 3)


def test_per_class_buffer_after_the_head_is_refused_by_name():
    with pytest.raises(grownfx.SurgeryError, match="buffer 'log_prior' holds one value per class"):
        grownfx.prepare(LogitAdjusted(buffer=True), X)


class Cosine(Frame):
    """A cosine classifier: F.linear of normalised features and normalised class weights."""

    def __init__(self):
        super().__init__()
        self.head = None
        self.weight = nn.Parameter(torch.randn(10, 8))
        self.scale = nn.Parameter(torch.tensor(10.0))

    def forward(self, x):
        f = self.conv(torch.relu(self.stem(x))).mean((2, 3))
        return self.scale * F.linear(F.normalize(f), F.normalize(self.weight))


def test_cosine_classifier_is_found_as_the_head():
    # before: the last conv was taken as the head
    net = lifecycle(Cosine(), X)
    assert net.head_targets == [] and set(net.head_params) == {"weight"}
    holder = net.graph_module.get_submodule("task_params.weight")
    assert [tuple(c.shape) for c in holder.copies] == [(5, 8), (3, 8)]
    assert all(g.growable for g in groups_of(net, "stem")), reasons(net)


class FunctionalHead(Frame):
    """A functional classifier with a bias: `F.linear(features, self.w, self.b)`."""

    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.randn(5, 8) * 0.1)
        self.b = nn.Parameter(torch.zeros(5))

    def forward(self, x):
        return F.linear(self.conv(torch.relu(self.stem(x))).mean((2, 3)), self.w, self.b)


def test_a_functional_classifier_s_bias_starts_like_nn_linear_s_for_each_task():
    # a new task's bias is drawn from U(-1/sqrt(fan_in), 1/sqrt(fan_in)), fan_in the weight's 8 inputs, as
    # nn.Linear draws its own: with 400 classes the largest value is close to that bound and never past it
    from grownfx.engine.layers import TaskParameter

    torch.manual_seed(0)
    net = grownfx.prepare(FunctionalHead(), X)
    t = net.add_task(400)
    assert net(X, task=t).shape == (4, 400)
    bias = next(m for n, m in net.named_modules() if isinstance(m, TaskParameter) and n.endswith(".b")).copy_for(t)
    bound = 1 / 8 ** 0.5
    assert 0.95 * bound < float(bias.abs().max()) <= bound


class Prototypes(Frame):
    """Logits against class prototypes through einsum, which the analysis cannot follow: declared with head=."""

    def __init__(self, classes=10):
        super().__init__()
        self.head = None
        self.protos = nn.Parameter(torch.randn(8, classes))

    def forward(self, x):
        f = self.conv(torch.relu(self.stem(x))).mean((2, 3))
        return torch.einsum("bc,ck->bk", f, self.protos)


def test_declared_head_parameter():
    with pytest.raises(grownfx.SurgeryError, match="no layer produces the logits.*head="):
        grownfx.prepare(Prototypes(), X)
    net = lifecycle_with(Prototypes(), head="protos")
    assert net.head_params == {"protos": (1, ("uniform", 8))}
    # 8 features, 8 classes: both axes have the classes' size; the one that makes the logits follow is taken
    net = lifecycle_with(Prototypes(classes=8), head="protos")
    assert net.head_params == {"protos": (1, ("uniform", 8))}


def lifecycle_with(model, **kw):
    import test_silent_cases

    old = grownfx.prepare
    try:
        test_silent_cases.grownfx = type("G", (), {"prepare": staticmethod(lambda m, x, **k: old(m, x, **kw, **k))})
        return lifecycle(model, X)
    finally:
        test_silent_cases.grownfx = grownfx


class TupleOut(Frame):
    def mid(self, x):
        return x

    def forward(self, x):
        f = self.conv(torch.relu(self.stem(x))).mean((2, 3))
        return self.head(f), f


class DictOut(TupleOut):
    def forward(self, x):
        logits, f = super().forward(x)
        return {"features": f, "scores": logits}


def test_tuple_and_dict_outputs_need_a_selector():
    # before: refused with advice about leaf modules that did not apply
    with pytest.raises(grownfx.ModelCheckError, match=r"returns a tuple of 2 values: .*`output=`"):
        grownfx.prepare(TupleOut(), X)
    with pytest.raises(grownfx.ModelCheckError, match=r"dict with keys \['features', 'scores'\]"):
        grownfx.prepare(DictOut(), X)
    lifecycle_with(TupleOut(), output=0)
    net = lifecycle_with(DictOut(), output="scores")
    assert net.head_targets == ["head"]
    with pytest.raises(grownfx.ModelCheckError, match="`output='logits'` names none"):
        grownfx.prepare(DictOut(), X, output="logits")


class RepeatedLogits(Frame):
    def mid(self, x):
        return x

    def forward(self, x):
        return super().forward(x).view(-1, 5)


def test_logits_that_do_not_follow_the_classes_are_refused_at_prepare():
    with pytest.raises(grownfx.SurgeryError, match="number of classes is written into the graph"):
        grownfx.prepare(RepeatedLogits(), X)


def test_add_task_checks_the_logits_width(monkeypatch):
    net = grownfx.prepare(Plain(), X)
    net.add_task(7)
    from grownfx.engine.layers import PerTask

    monkeypatch.setattr(PerTask, "add_task", lambda self, num_classes=None, generator=None: self.copies.append(
        __import__("copy").deepcopy(self.pending)))  # a head that ignores the task's classes
    with pytest.raises(grownfx.SurgeryError, match="task 1 has 3 classes but the net gives logits of shape"):
        net.add_task(3)
