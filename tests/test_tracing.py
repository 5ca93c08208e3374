import pytest
import torch
from torch import nn

import grownfx
from grownfx.engine.tracing import TraceError, trace


class DataDependent(nn.Module):
    def forward(self, x):
        if x.sum() > 0:  # fx cannot trace a branch on a tensor value
            return x * 2
        return x


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)
        self.odd = DataDependent()
        self.fc = nn.Linear(4, 2)

    def forward(self, x):
        return self.fc(self.odd(self.conv(x)).mean((2, 3)))


def test_untraceable_module_is_named_and_leaf_modules_fix_it():
    with pytest.raises(TraceError, match="'odd'.*leaf"):
        trace(Net(), torch.randn(1, 3, 8, 8))
    gm = trace(Net(), torch.randn(1, 3, 8, 8), leaf_modules=["odd"])
    assert any(n.op == "call_module" and n.target == "odd" for n in gm.graph.nodes)
    net = grownfx.prepare(Net(), torch.randn(1, 3, 8, 8), leaf_modules=["odd"])
    # an opaque module's channel behaviour is unknown: the conv feeding it must not grow, and the reason names it
    fed = next(g for g in net.coupling.groups if any(b.target == "conv" and b.role == "out" for b in g.members))
    assert not fed.growable and any("'odd'" in r for r in fed.reasons), fed.reasons


class BranchesInItsOwnForward(nn.Module):
    """timm's CrossViT: the model's own forward branches on the input's shape (no submodule to keep whole)."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)
        self.fc = nn.Linear(4, 2)

    def forward(self, x):
        if x.shape[-1] != 8:
            x = nn.functional.interpolate(x, size=(8, 8))
        return self.fc(self.conv(x).mean((2, 3)))


@pytest.mark.parametrize("auto_leaves", [False, True])
def test_untraceable_own_forward_says_to_move_the_code_into_a_submodule(auto_leaves):
    # before: "Declare the offending module a leaf", which cannot be done for the model itself
    with pytest.raises(TraceError) as exc:
        grownfx.prepare(BranchesInItsOwnForward(), torch.randn(1, 3, 8, 8), auto_leaves=auto_leaves)
    msg = str(exc.value)
    assert "\n" not in msg and "own forward" in msg and "into a submodule" in msg
    assert "Declare the offending module a leaf" not in msg


def test_shape_error_names_the_node():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.Flatten(), nn.Linear(10, 2))
    with pytest.raises(TraceError, match="at node"):
        trace(model, torch.randn(1, 3, 8, 8))


def test_stochastic_depth_keeps_train_and_eval_behaviour():
    import torchvision

    model = torchvision.models.efficientnet_b0(num_classes=3, stochastic_depth_prob=0.9).eval()
    gm = trace(model, torch.randn(2, 3, 32, 32))
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(gm(x), gm(x))  # eval: deterministic
        gm.train()
        assert not torch.equal(gm(x), gm(x))  # train: stochastic depth is active, not frozen into the graph
