"""How `prepare` reads hand-written models (issue 22), class 1: the traced graph is not the model.

Each model either grows correctly through the whole lifecycle (`lifecycle`: growth exact, old tasks bit-exact,
exports equal) or is fixed or refused with the right reason.  The differential check of `prepare`
(engine/selfcheck.py) is shown to catch each way a traced graph can differ from the model, with the engine's own
remedy for that way switched off.  The other classes of defect found outside the zoos (ops: 2, 3, 4 and 6) are in
test_model_reading_ops.py, heads in test_model_reading_heads.py.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import grownfx
from grownfx.engine.tracing import GrownTracer
from model_frames import X, Frame, groups_of, reasons
from test_silent_cases import lifecycle


def prepared_with_its_head(model, x=X):
    """The model prepared at full width, one task whose head is the model's own: it computes what the model does."""
    net = grownfx.prepare(model, x)
    net.add_task(5)
    with torch.no_grad():
        net.graph_module.head.copies[0].load_state_dict(model.head.state_dict())
    return net


# --- class 1: the traced graph is not the model --------------------------------------------------------------


class DropPath(nn.Module):
    """Hand-written stochastic depth: one random factor per sample, in training only."""

    def __init__(self, p):
        super().__init__()
        self.p = p

    def forward(self, x):
        if not self.training or self.p == 0:
            return x
        keep = 1 - self.p
        mask = x.new_empty(x.shape[0], 1, 1, 1).bernoulli_(keep)
        return x * mask / keep


class TrainOnly(Frame):
    """A drop path in a residual block and `F.dropout(x, training=self.training)` before the head."""

    def __init__(self):
        super().__init__()
        self.drop_path = DropPath(0.5)

    def mid(self, x):
        return x + self.drop_path(torch.relu(self.conv(x)))

    def forward(self, x):
        f = self.conv(self.mid(torch.relu(self.stem(x)))).mean((2, 3))
        return self.head(F.dropout(f, 0.5, training=self.training))


class STClamp(torch.autograd.Function):
    """Straight-through clamp: forward clamps, backward passes the gradient unchanged."""

    @staticmethod
    def forward(ctx, x):
        return x.clamp(-0.1, 0.1)

    @staticmethod
    def backward(ctx, g):
        return g


class CustomFunction(Frame):
    def mid(self, x):
        return STClamp.apply(x)


class InplaceAlias(Frame):
    """`identity = z; z += y; out = identity + z`: in eager, identity sees the update."""

    def __init__(self):
        super().__init__()
        self.side = nn.Conv2d(3, 8, 3, padding=1)

    def forward(self, x):
        z = self.stem(x)
        identity = z
        z += self.side(x)
        return self.head(self.conv(identity + z).mean((2, 3)))


class HookedModel(Frame):
    """A forward hook on the model itself changes its outputs; fx traces the forward without it."""

    def mid(self, x):
        return x


def hooked_model():
    m = HookedModel()
    m.register_forward_hook(lambda mod, args, out: out * 2 + 1)
    return m


def _grads(model, x):
    x = x.clone().requires_grad_(True)
    model(x).pow(2).sum().backward()
    return x.grad


def test_train_only_behaviour_is_kept():
    # before: traced in eval mode only, the prepared net never dropped anything in training
    torch.manual_seed(0)
    model = TrainOnly()
    net = grownfx.prepare(model, X)
    net.add_task(5)
    with torch.no_grad():
        net.train()
        assert not torch.equal(net(X), net(X)), "train mode must drop (the drop path, the dropout)"
        net.eval()
        assert torch.equal(net(X), net(X))
    assert net.graph_module.mode_leaves == ["drop_path"] and net.graph_module.mode_flags
    # the drop path computes each channel from the same channel: the residual stream still grows
    assert all(g.growable for g in groups_of(net, "stem")), reasons(net)
    lifecycle(TrainOnly(), X)


class FunctionalBatchNorm(Frame):
    """A hand-written batch norm whose flag is the mode: `F.batch_norm(..., self.training, ...)`."""

    def __init__(self):
        super().__init__()
        self.w, self.b = nn.Parameter(torch.ones(8)), nn.Parameter(torch.zeros(8))
        self.register_buffer("mean", torch.zeros(8))
        self.register_buffer("var", torch.ones(8))

    def mid(self, x):
        return F.batch_norm(x, self.mean, self.var, self.w, self.b, self.training, 0.1, 1e-5)


def test_mode_flag_is_the_learning_tasks_mode():
    # the flag follows net.train() for the task being learned, and is off for a finished task: a train-mode
    # forward of task 0 updates no statistics (the fuzzer found the finished task's copy updated)
    net = lifecycle(FunctionalBatchNorm(), X)
    stats = net.graph_module.get_submodule("task_params.mean")
    before = stats.copies[1].detach().clone()
    net.train()
    with torch.no_grad():
        net(X, task=1)
    assert not torch.equal(stats.copies[1], before), "the learning task's statistics update in train mode"


def test_custom_autograd_function_keeps_its_backward():
    # before: fx inlined STClamp's forward; the clamp's gradient replaced the straight-through one (0.85 off)
    torch.manual_seed(0)
    model = CustomFunction().double()
    x = X.double()
    net = prepared_with_its_head(model, x)
    net.eval(), model.eval()
    torch.testing.assert_close(_grads(net, x), _grads(model, x), rtol=1e-12, atol=1e-12)
    # opaque to the analysis: the channels it touches are fixed, with the reason and the way out
    assert "custom autograd Function 'STClamp'" in reasons(net)


def test_registered_autograd_function_lets_channels_grow():
    grownfx.register_function(STClamp, "pass")
    try:
        net = lifecycle(CustomFunction(), X)
        assert all(g.growable for g in groups_of(net, "stem")), reasons(net)
    finally:
        grownfx.unregister(STClamp)


def test_inplace_update_through_an_alias_keeps_the_math():
    # before: `z += y` became `z = z + y`, so `identity` kept the old z: outputs 13 % off
    torch.manual_seed(0)
    model = InplaceAlias().eval()
    net = prepared_with_its_head(model).eval()
    with torch.no_grad():
        assert torch.equal(net(X), model(X))
    assert net.graph_module.inplace_kept == ["iadd"]
    lifecycle(InplaceAlias(), X)


class InplaceChain(Frame):
    """`z = s.add_(1); z += y; out = s + z`: z is s, so the augmented assignment updates s too."""

    def __init__(self):
        super().__init__()
        self.side = nn.Conv2d(3, 8, 3, padding=1)

    def forward(self, x):
        s = self.stem(x)
        z = s.add_(1.0)
        z += self.side(x)
        return self.head(self.conv(s + z).mean((2, 3)))


def test_augmented_assignment_on_an_inplace_result_stays_in_place():
    # the output of an in-place op is its input, not a fresh tensor: writing `z += y` out of place would leave s
    # without y (the check would refuse the model)
    model = InplaceChain().eval()
    net = prepared_with_its_head(model).eval()
    with torch.no_grad():
        assert torch.equal(net(X), model(X))
    assert net.graph_module.inplace_kept == ["iadd"]


class NormFrame(Frame):
    """A batch norm between the convs, with running statistics of its own."""

    def __init__(self):
        super().__init__()
        self.bn = nn.BatchNorm2d(8)
        with torch.no_grad():
            self.bn.running_mean.uniform_(-1, 1)
            self.bn.running_var.uniform_(0.5, 2)

    def mid(self, x):
        return self.bn(x)


def test_prepare_keeps_the_models_running_statistics():
    # the differential check runs the graph in train mode too: the statistics it moves are put back, so the
    # prepared net at full width computes what the model computes in eval mode
    model = NormFrame().eval()
    net = prepared_with_its_head(model).eval()
    with torch.no_grad():
        assert torch.equal(net(X), model(X))


def test_ordinary_augmented_assignment_stays_out_of_place():
    # `out += identity` on a fresh tensor read by nothing else (torchvision's ResNet) is written out of place
    import torchvision

    net = grownfx.prepare(torchvision.models.resnet18(num_classes=5), torch.randn(2, 3, 32, 32))
    assert net.graph_module.inplace_kept == []


@pytest.mark.parametrize("switch,model,cause", [
    ("both_modes", TrainOnly, "only train mode differs"),
    ("keep_functions", CustomFunction, "the gradients differ where the outputs agree"),
    ("record_inplace", InplaceAlias, "an in-place update seen through an alias"),
], ids=["train-only branch", "custom autograd Function", "in-place alias"])
def test_the_check_catches_each_way_a_graph_differs(monkeypatch, switch, model, cause):
    """With the engine's remedy for a cause switched off, `prepare` refuses the model and names the cause."""
    monkeypatch.setattr(GrownTracer, switch, False)
    with pytest.raises(grownfx.ModelCheckError, match=cause) as err:
        grownfx.prepare(model(), X)
    assert "first differ at node" in str(err.value) and "Way out" in str(err.value)


class ClampedGain(Frame):
    """A straight-through clamp of a parameter: only that parameter's gradient depends on the Function's backward."""

    def __init__(self):
        super().__init__()
        self.gain = nn.Parameter(torch.full((1, 8, 1, 1), 2.0))

    def mid(self, x):
        return x * STClamp.apply(self.gain)


def test_the_check_compares_parameter_gradients_where_outputs_and_input_gradients_agree(monkeypatch):
    monkeypatch.setattr(GrownTracer, "keep_functions", False)
    with pytest.raises(grownfx.ModelCheckError, match="the gradients differ where the outputs agree.*'gain'"):
        grownfx.prepare(ClampedGain(), X)


class ReadsALayersWeightFirst(Frame):
    """`self.conv.weight` read (its mean magnitude scales x) before `self.conv` is called: the weight's get_attr
    must become the masked layer's own weight (WeightOf), not a per-task copy of the tensor."""

    def mid(self, x):
        return x * self.conv.weight.abs().mean()


def test_a_layers_weight_read_before_the_layer_is_called_is_the_masked_layers_weight():
    model = ReadsALayersWeightFirst().eval()
    net = prepared_with_its_head(model).eval()
    assert "conv" in {m.target for m in net.masked_layers()}
    assert not [n for n, _ in net.named_parameters() if n.endswith("conv_weight")]  # no per-task copy of it
    with torch.no_grad():
        torch.testing.assert_close(net(X), model(X), rtol=1e-6, atol=1e-6)


class ClampedGainBesideNoGrad(ClampedGain):
    """ClampedGain, kept whole, beside a term computed under `torch.no_grad`, which fx does not record: the graph
    gives `bias` a gradient the model does not, while the outputs agree."""

    def __init__(self):
        super().__init__()
        self.bias = nn.Parameter(torch.full((1, 8, 1, 1), 0.5))

    def mid(self, x):
        with torch.no_grad():
            shift = self.bias * 1.0
        return super().mid(x) + shift


def test_a_gradient_that_differs_beside_a_function_kept_whole_names_the_function_too():
    with pytest.raises(grownfx.ModelCheckError, match=r"the gradients differ where the outputs agree.*'bias'.*the "
                       r"graph calls the autograd Functions \['STClamp'\] whole"):
        grownfx.prepare(ClampedGainBesideNoGrad(), X)


def test_rel_diff_counts_nan_in_both_as_equal_and_nan_in_one_as_infinitely_far():
    from grownfx.engine.selfcheck import rel_diff

    nan = float("nan")
    assert rel_diff(torch.tensor([nan, 1.0, 2.0]), torch.tensor([nan, 1.0, 2.5])) == pytest.approx(0.2)
    assert rel_diff(torch.tensor([nan, 1.0]), torch.tensor([0.0, 1.0])) == float("inf")
    assert rel_diff(torch.tensor([1.0, 2.0]), torch.tensor([1.0, 2.0, 3.0])) == float("inf")


class ClampedInputGain(Frame):
    """The input scaled by a straight-through clamp of a parameter, before any module."""

    def __init__(self):
        super().__init__()
        self.gain = nn.Parameter(torch.full((1, 3, 1, 1), 2.0))

    def mid(self, x):
        return x

    def forward(self, x):
        return super().forward(x * STClamp.apply(self.gain))


def test_a_difference_before_the_first_module_lists_every_node_from_the_graph_s_start(monkeypatch):
    # every module agrees, so the suspects are all the nodes before the first one: the parameter read included
    monkeypatch.setattr(GrownTracer, "keep_functions", False)
    with pytest.raises(grownfx.ModelCheckError, match="agree up to 'stem'; nodes in between: gain, clamp, mul\\."):
        grownfx.prepare(ClampedInputGain(), X)


def test_the_check_refuses_what_no_tracer_can_keep():
    # a hook on the model itself: fx traces the forward without it.  With the check off the prepared net would
    # silently compute other outputs (tests/fault_injection.py: `differential_check_off` turns this test red)
    with pytest.raises(grownfx.ModelCheckError, match="does not compute what HookedModel computes"):
        grownfx.prepare(hooked_model(), X)


def test_hooked_submodules_are_leaves_and_run_their_hooks():
    model = Frame()
    model.mid = nn.Identity()
    model.mid.register_forward_hook(lambda mod, args, out: out * 2)
    net = grownfx.prepare(model, X)  # the check passes: the hook runs
    assert any(n.op == "call_module" and n.target == "mid" for n in net.graph_module.graph.nodes)


def test_state_changed_by_the_forward_in_eval_mode_is_refused():
    class Counter(Frame):
        def __init__(self):
            super().__init__()
            self.register_buffer("calls", torch.zeros(()))

        def mid(self, x):
            self.calls.add_(1)
            return x

    with pytest.raises(grownfx.ModelCheckError, match="changes its own state in eval mode"):
        grownfx.prepare(Counter(), X)


def test_a_top_level_train_only_branch_is_refused_with_the_way_out():
    class Noisy(Frame):
        def forward(self, x):
            if self.training:
                x = x + 0.1 * torch.randn_like(x)
            return self.head(self.conv(torch.relu(self.stem(x))).mean((2, 3)))

    with pytest.raises(grownfx.ModelCheckError, match="itself computes differently in train and eval.*submodule"):
        grownfx.prepare(Noisy(), X)


def test_an_eval_only_op_at_the_end_of_the_forward_is_named():
    class EvalTemperature(Frame):
        def mid(self, x):
            return x

        def forward(self, x):
            out = super().forward(x)
            if not self.training:
                out = out / 2.0
            return out

    # the train graph is the eval graph without its last op: the refusal names that op
    with pytest.raises(grownfx.ModelCheckError, match="'truediv' only in eval mode"):
        grownfx.prepare(EvalTemperature(), X)


def test_check_report_says_what_was_compared():
    net = grownfx.prepare(TrainOnly(), X)
    rep = net.check_report
    assert set(rep.compared) == {"eval output", "eval input gradient", "eval parameter gradients", "train output",
                                 "train input gradient"}
    assert max(rep.compared.values()) <= rep.tolerance == 1e-5
