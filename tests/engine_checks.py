"""The property sweep every backbone must pass (shared by the representative tests and the zoo sweep)."""

from __future__ import annotations

import torch
import torchvision
from torch import nn

import grownfx
from grownfx.engine.prepare import seed_channels


def build(name: str, num_classes: int = 10):
    """A torchvision classifier with a small input that its architecture accepts."""
    kw = {"num_classes": num_classes}
    size = 32
    if name in ("inception_v3", "googlenet"):
        kw.update(aux_logits=False, init_weights=True)
    if name == "inception_v3":
        size = 75
    if name.startswith("vit"):
        size = 28 if "14" in name else 32
        kw["image_size"] = size
    if name.startswith("maxvit"):
        size = 224
    if name.startswith(("alexnet", "squeezenet")):
        size = 64
    if name == "vit_small_test":  # torchvision's VisionTransformer, every op of vit_b_16 at a test's size
        from torchvision.models.vision_transformer import VisionTransformer

        model = VisionTransformer(image_size=32, patch_size=8, num_layers=2, num_heads=4, hidden_dim=64,
                                  mlp_dim=128, num_classes=num_classes)
        return model, torch.randn(4, 3, 32, 32)
    if name == "swin_small_test":  # torchvision's SwinTransformer (swin_t's blocks, shifted windows) at a test's size
        from torchvision.models.swin_transformer import SwinTransformer

        model = SwinTransformer(patch_size=[4, 4], embed_dim=32, depths=[2, 2], num_heads=[2, 4],
                                window_size=[4, 4], num_classes=num_classes)
        return model, torch.randn(4, 3, 32, 32)
    if name in ("lenet5", "small_cnn", "vgg16_bn_cifar"):
        from grownfx.models import build_backbone

        shape = (1, 8, 8) if name == "small_cnn" else (3, 32, 32)
        return build_backbone(name, num_classes), torch.randn(4 if size < 100 else 1, *shape)
    model = torchvision.models.get_model(name, weights=None, **kw)
    return model, torch.randn(4 if size < 100 else 1, 3, size, size)


def _fingerprint(module) -> dict:
    """Exact identity of every tensor of a module, without keeping a copy (the zoo's largest models are big)."""
    import hashlib

    return {k: (tuple(v.shape), hashlib.sha1(v.detach().cpu().contiguous().numpy().tobytes()).hexdigest())
            for k, v in module.state_dict().items()}


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-12))


def _step(net, x, task, lr=1e-3):
    net.train()
    params = [p for p in net.parameters() if p.requires_grad]
    huge = sum(p.numel() for p in params) > 2e8  # momentum buffers of ViT-H do not fit a 24 GiB machine
    opt = torch.optim.SGD(params, lr=lr, momentum=0.0 if huge else 0.9, weight_decay=1e-2)
    for _ in range(2):
        opt.zero_grad()
        out = net(x, task=task)
        # a bounded objective (cross-entropy on fixed labels): logsumexp alone is unbounded below and drove some
        # nets to inf/NaN in two steps (regnet_x_400mf, res2net at seed 0.25), after which no comparison means
        # anything
        loss = torch.nn.functional.cross_entropy(out, torch.arange(len(x)) % out.shape[1])
        assert torch.isfinite(loss), f"the check's training step diverged (loss {float(loss)})"
        loss.backward()
        # clipped: BatchNorm over 4 images on 1x1 maps (regnet at 32 px) gives gradients that blew weights up to
        # overflow in eval mode; the steps only need to move every trainable weight, not to learn
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
    net.eval()


def growth_error_float64(name: str, seed_width: float, builder=None, **prepare_kw) -> float:
    """The same growth in float64: tells float32 rounding (summation order in wider GEMMs) from a real change."""
    torch.manual_seed(0)
    model, x = (builder or build)(name)
    net = grownfx.prepare(model.double(), x.double(), seed_width=seed_width, **prepare_kw)
    net.add_task(10)
    net.eval()
    with torch.no_grad():
        before = net(x.double())
        net.grow(ratio=0.25)
        return rel_err(net(x.double()), before)


def check_backbone(name: str, seed_width: float = 0.5, builder=None, require_growth: bool = True,
                   **prepare_kw) -> dict:
    """Seed slimming, function-preserving growth, exact old tasks, faithful export, consistent counts.

    `builder(name) -> (model, example_input)` defaults to `build` (torchvision); `prepare_kw` go to prepare.
    `require_growth=False`: a model whose groups are all fixed (each with its reason) passes the other checks."""
    torch.manual_seed(0)
    model, x = (builder or build)(name)
    net = grownfx.prepare(model, x, seed_width=seed_width, **prepare_kw)
    del model
    report = {"name": name, "growable": len(net.growable_groups), "full_params": net.full_params,
              "fixed_reasons": [g.reasons[0] if g.reasons else "width not a multiple of its granularity"
                                for g in net.coupling_groups if not g.growable]}
    assert net.growable_groups or not require_growth, f"{name}: no growable group"
    full = {g.id: g.width for g in net.coupling.groups}
    for g in net.growable_groups:  # seed slimming gives the stated width
        assert g.width == seed_channels(full[g.id], seed_width, g.granularity), (name, g.id)

    t0 = net.add_task(10)
    net.eval()
    with torch.no_grad():
        seed_out = net(x, task=t0)
    assert net.num_parameters(t0) == grownfx.count_parameters(net.export(t0, prune_unused=False))
    report["seed_params"] = net.num_parameters(t0)
    assert report["seed_params"] < net.full_params or not net.growable_groups

    net.grow(ratio=0.25)  # growth preserves the outputs of the task being learned
    with torch.no_grad():
        err = rel_err(net(x, task=t0), seed_out)
    report["growth_error"] = err
    if err >= 1e-6:  # only rounding may remain: in float64 the same growth must be exact to 1e-12
        report["growth_error_float64"] = growth_error_float64(name, seed_width, builder, **prepare_kw)
        assert err < 1e-4 and report["growth_error_float64"] < 1e-12, (name, err, report["growth_error_float64"])
    _step(net, x, t0)
    net.freeze_task(t0)
    with torch.no_grad():
        ref0 = net(x, task=t0)
    assert torch.isfinite(ref0).all(), f"{name}: task 0's outputs are not finite: the comparisons below would be void"
    ref_state = _fingerprint(net.export(t0))
    used0 = net.num_parameters(t0)

    t1 = net.add_task(3)
    net.grow(ratio=0.25)  # growth after masks exist and tasks are frozen
    with torch.no_grad():
        assert torch.equal(net(x, task=t0), ref0), f"{name}: growth changed a frozen task"
    _step(net, x, t1)
    with torch.no_grad():
        after0 = net(x, task=t0)
        out1 = net(x, task=t1)
    assert torch.equal(after0, ref0), f"{name}: learning task 2 changed task 1's outputs"
    assert _fingerprint(net.export(t0)) == ref_state, f"{name}: export changed"

    for t, ref in ((t0, ref0), (t1, out1)):  # the export computes what the task-aware model computes
        sub = net.export(t)
        assert not any(type(m).__module__.startswith("grownfx") for m in sub.modules()), name
        with torch.no_grad():
            assert rel_err(sub(x), ref) <= 1e-5, (name, t)
        assert grownfx.count_parameters(sub) < net.num_parameters()
        del sub
    stored = sum(m.weight.numel() for m in net.masked_layers())
    copies = sum(sum(c.numel() if isinstance(c, torch.Tensor) else grownfx.count_parameters(c) for c in m.copies)
                 for m in net.task_modules() if hasattr(m, "copies"))
    assert net.num_parameters() == stored + copies
    # a frozen task's parameter count does not move with later growth and training; no task uses more than the
    # net stores
    assert net.num_parameters(t0) == used0, name
    assert max(used0, net.num_parameters(t1)) <= net.num_parameters(), name
    report["params_after"] = net.num_parameters()
    return report


class StemConvHead(nn.Module):
    """The frame of the hand-written pattern models: stem conv -> the pattern (the subclass's forward) -> conv ->
    pooled linear head.  The forward stays in the subclass, in the test's own module: fx wraps registered functions
    only in the globals of the forward it traces."""

    def __init__(self, c=8):
        super().__init__()
        self.stem = nn.Conv2d(3, c, 3, padding=1)
        self.conv = nn.Conv2d(c, c, 3, padding=1)
        self.head = nn.Linear(c, 5)

    def tail(self, x):
        return self.head(self.conv(x).mean((2, 3)))
