"""CUDA checks: they run only where a GPU is present (the CI machine has none; run them on a GPU host)."""

import pytest
import torch

import grownfx
from grownfx.recipe.schema import GrowthConfig, MasksConfig, OptimConfig, Recipe, TrainingConfig
from grownfx.data import build_stream
from grownfx.learn.learner import GrownLearner
from grownfx.models import build_backbone

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")

STREAM = build_stream({"name": "digits"}, seed=0)


@pytest.fixture(autouse=True)
def _deterministic():
    # TF32 convolutions (Ampere and later) round inputs to 10-bit mantissas: adding zero channels changes that
    # rounding's accumulation order at the 1e-3 level; growth is checked at float32 precision
    torch.backends.cudnn.deterministic = True
    torch.backends.cudnn.benchmark = False
    torch.backends.cudnn.allow_tf32 = False
    torch.backends.cuda.matmul.allow_tf32 = False
    yield


@pytest.mark.parametrize("precision", ["fp32", "bf16", "fp16"])
def test_learner_on_cuda_keeps_old_tasks_exact(precision):
    torch.manual_seed(0)
    net = grownfx.prepare(build_backbone("small_cnn", 2), torch.randn(2, 1, 8, 8), seed_width=0.5)
    training = TrainingConfig(epochs=2, precision=precision, optimizer=OptimConfig(name="adam", lr=1e-3))
    learner = GrownLearner(net, training=training, growth=GrowthConfig(), masks=MasksConfig(), device="cuda")
    x = torch.randn(16, 1, 8, 8, device="cuda")
    refs = {}
    for task in STREAM.tasks[:3]:
        learner.learn(task, target=99.0)
        net.eval()
        with torch.no_grad():
            refs[task.index] = net(x, task=task.index).clone()
    assert next(net.parameters()).is_cuda
    for t, ref in refs.items():
        with torch.no_grad():
            assert torch.equal(net(x, task=t), ref)
            sub = net.export(t)
            assert float((sub(x) - ref).abs().max() / ref.abs().max()) <= 1e-5


def test_resnet_growth_and_export_on_cuda():
    import torchvision

    torch.manual_seed(0)
    x = torch.randn(4, 3, 32, 32, device="cuda")
    net = grownfx.prepare(torchvision.models.resnet18(num_classes=10), x[:2].cpu(), seed_width=0.5).cuda()
    net.add_task(10)
    net.eval()
    with torch.no_grad():
        before = net(x)
        net.grow(ratio=0.25)
        assert float((net(x) - before).abs().max() / before.abs().max()) < 1e-5
    net.freeze_task(0)
    with torch.no_grad():
        ref = net(x, task=0)
    net.add_task(3)
    net.grow(ratio=0.25)
    net.train()
    opt = torch.optim.SGD([p for p in net.parameters() if p.requires_grad], lr=1e-3, momentum=0.9)
    for _ in range(2):
        opt.zero_grad()
        net(x, task=1).logsumexp(1).mean().backward()
        opt.step()
    net.eval()
    with torch.no_grad():
        assert torch.equal(net(x, task=0), ref)
        assert float((net.export(0)(x) - ref).abs().max() / ref.abs().max()) <= 1e-5


def test_fused_mask_compile_matches_eager_on_cuda():
    torch.manual_seed(0)
    net = grownfx.prepare(build_backbone("small_cnn", 2), torch.randn(2, 1, 8, 8), seed_width=0.5).cuda()
    net.add_task(2)
    net.freeze_task(0)
    net.add_task(2)
    net.set_policy(grownfx.MaskPolicy(selective_kind="ste"))  # no noise: both paths must agree
    net.grow(ratio=0.25)
    net.train()
    x = torch.randn(8, 1, 8, 8, device="cuda")
    eager = net(x, task=1)
    eager.sum().backward()
    grads = {n: p.grad.clone() for n, p in net.named_parameters() if p.grad is not None}
    net.zero_grad()
    net.ctx.masks.fuse_masks = True
    fused = net(x, task=1)
    fused.sum().backward()
    net.ctx.masks.fuse_masks = False
    assert torch.allclose(eager, fused, rtol=1e-5, atol=1e-6)
    for n, p in net.named_parameters():
        if n in grads:
            assert torch.allclose(p.grad, grads[n], rtol=1e-4, atol=1e-6), n


def test_runner_on_cuda_with_amp(tmp_path):
    from grownfx.run.runner import run

    r = Recipe.model_validate({
        "name": "cuda", "device": "cuda", "model": {"builder": "small_cnn"}, "data": {"name": "digits"},
        "training": {"epochs": 2, "precision": "bf16", "channels_last": True},
        "target": {"rule": 90.0}, "output": {"dir": str(tmp_path / "{name}"), "tensorboard": False}})
    result = run(r, echo=lambda m: None)
    assert result.summary["bwt"] == 0.0 and len(result.acc_matrix) == 5
