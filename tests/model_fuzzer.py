"""The model fuzzer: the GROWN lifecycle every classifier of the grammar (tests/fuzz_grammar.py) must survive.

`run_seed(seed)` builds the seed's model and runs it through grownfx: `prepare` (with its differential check), a task
at full width compared with the model itself, growth, training, freezing, a second task, growth, old task
bit-exact, exports equal.  The outcome is one of

    growable   the lifecycle passed and at least one group grew
    fixed      the lifecycle passed; every group is fixed, each with its reason
    refused    prepare refused the model with one clear line (SurgeryError, ModelCheckError, TraceError)
    CRASH      any other exception: an internal traceback (a defect)
    WRONG      a check failed: a number the engine got wrong (a defect)

`scripts/fuzz_models.py` runs many seeds and prints the table; tests/test_fuzz.py runs a seeded subset.
"""

from __future__ import annotations

import hashlib
import traceback
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from fuzz_grammar import GRAMMAR, HEADS, KINDS, ROOT, Spec, build  # noqa: F401 - the fuzzer's public names


def check_eager(model: nn.Module, x: torch.Tensor, spec: Spec) -> None:
    """The generated model itself runs forward and backward in both modes (else the generator is wrong)."""
    for training in (True, False):
        model.train(training)
        out = model(x.clone().requires_grad_(True))
        if isinstance(out, tuple):
            out = out[0]
        if isinstance(out, dict):
            out = out["logits" if "logits" in out else "scores"]
        out.sum().backward()
    model.zero_grad(set_to_none=True)
    model.eval()

# --- the lifecycle -----------------------------------------------------------------------------------------

@dataclass
class Outcome:
    seed: int
    outcome: str
    detail: str = ""
    kinds: list = field(default_factory=list)
    head: str = ""
    root: str = ""
    dims: int = 2
    growable: int = 0
    groups: int = 0


def _rel(a, b) -> float:
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-12))


def _fingerprint(module) -> dict:
    return {k: (tuple(v.shape), hashlib.sha1(v.detach().contiguous().numpy().tobytes()).hexdigest())
            for k, v in module.state_dict().items()}


def _step(net, x, task):
    net.train()
    params = [p for p in net.parameters() if p.requires_grad]
    opt = torch.optim.SGD(params, lr=1e-2, momentum=0.9)
    for _ in range(2):
        opt.zero_grad()
        out = net(x, task=task)
        loss = F.cross_entropy(out, torch.arange(len(x)) % out.shape[1])
        if not torch.isfinite(loss):
            raise _Wrong(f"the training loss of task {task} is not finite")
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
    net.eval()


class _Wrong(AssertionError):
    pass


def _expect(ok: bool, what: str) -> None:
    if not ok:
        raise _Wrong(what)


def _pick(out, spec: Spec):
    if isinstance(out, dict):
        return out[spec.output if spec.output is not None else "logits"]
    if isinstance(out, tuple):
        return out[spec.output or 0]
    return out


def lifecycle(model: nn.Module, x: torch.Tensor, spec: Spec, net) -> None:
    """Task 0 (at full width: equal to the model with its own head), growth, training, freezing, task 1, growth,
    old task bit-exact, exports equal to the task-aware net."""
    import grownfx

    k = model.classes
    t0 = net.add_task(k if spec.seed_width == 1.0 else 5)
    if spec.seed_width == 1.0:  # the task-aware net at full width computes the model (its head copied in)
        gm = net.graph_module
        with torch.no_grad():
            for name in net.head_targets:
                gm.get_submodule(name).copies[t0].load_state_dict(model.get_submodule(name).state_dict())
            for target in getattr(net, "head_params", {}):
                holder = next(m for n, m in gm.named_modules() if n.endswith(target.replace(".", "_"))
                              and hasattr(m, "copies"))
                holder.copies[t0].copy_(dict(model.named_parameters())[target])
        model.eval()
        net.eval()
        with torch.no_grad():
            err = _rel(net(x, task=t0), _pick(model(x), spec))
        _expect(err <= 1e-5, f"the task-aware net at full width differs from the model by {err:.2g}")
    net.eval()
    with torch.no_grad():
        before = net(x, task=t0)
        if net.growable_groups:
            net.grow(ratio=0.5)
        after = net(x, task=t0)
    _expect(bool(torch.isfinite(after).all()), "growth made the outputs non-finite")
    _expect(_rel(after, before) <= 1e-5, f"growth changed the learning task's outputs by {_rel(after, before):.2g}")
    _step(net, x, t0)
    net.freeze_task(t0)
    with torch.no_grad():
        ref0 = net(x, task=t0)
    _expect(bool(torch.isfinite(ref0).all()), "task 0's outputs are not finite")
    exp0 = _fingerprint(net.export(t0))
    t1 = net.add_task(3)
    if net.growable_groups:
        net.grow(ratio=0.5)
    with torch.no_grad():
        _expect(torch.equal(net(x, task=t0), ref0), "growth changed a finished task")
        net.train()
        net(x, task=t0)
        net.eval()
        _expect(torch.equal(net(x, task=t0), ref0), "a train-mode forward changed a finished task")
    _step(net, x, t1)
    with torch.no_grad():
        _expect(torch.equal(net(x, task=t0), ref0), "learning task 1 changed task 0")
        out1 = net(x, task=t1)
    _expect(_fingerprint(net.export(t0)) == exp0, "task 0's export changed")
    for t, ref in ((t0, ref0), (t1, out1)):
        sub = net.export(t)
        _expect(not any(type(m).__module__.startswith("grownfx") for m in sub.modules()),
                "an export holds grownfx modules")
        with torch.no_grad():
            err = _rel(sub(x), ref)
        _expect(err <= 1e-5, f"the export of task {t} differs from the task-aware net by {err:.2g}")
    del grownfx


def run_seed(seed: int) -> Outcome:
    """Build the seed's model and run it through grownfx; never raises."""
    import grownfx

    model, x, spec = build(seed)
    res = Outcome(seed, "", kinds=spec.kinds, head=spec.head, root=spec.root, dims=spec.dims)
    try:
        check_eager(model, x, spec)
    except Exception as exc:  # noqa: BLE001 - a generator defect, counted apart
        res.outcome, res.detail = "INVALID", f"{type(exc).__name__}: {exc}"[:300]
        return res
    known = (grownfx.SurgeryError, grownfx.TraceError)
    try:
        kw = {k: v for k, v in (("output", spec.output), ("head", spec.head_name)) if v is not None}
        net = grownfx.prepare(model, x, seed_width=spec.seed_width, **kw)
    except known as exc:
        msg = str(exc)
        res.outcome, res.detail = ("refused" if msg and "\n" not in msg.strip() else "CRASH"), msg[:1000]
        return res
    except Exception as exc:  # noqa: BLE001
        res.outcome, res.detail = "CRASH", _where(exc)
        return res
    res.growable, res.groups = len(net.growable_groups), len(net.coupling_groups)
    try:
        lifecycle(model, x, spec, net)
    except _Wrong as exc:
        res.outcome, res.detail = "WRONG", str(exc)
        return res
    except Exception as exc:  # noqa: BLE001
        res.outcome, res.detail = "CRASH", _where(exc)
        return res
    unexplained = [g.id for g in net.coupling_groups if not g.growable and not g.reasons
                   and g.width % g.granularity == 0]
    if unexplained:
        res.outcome, res.detail = "WRONG", f"groups {unexplained} are fixed without a reason"
    else:
        res.outcome = "growable" if res.growable else "fixed"
    return res


def _where(exc: BaseException) -> str:
    frames = traceback.extract_tb(exc.__traceback__)
    inner = next((f for f in reversed(frames) if "grownfx" in f.filename), frames[-1] if frames else None)
    at = f" at {inner.filename.split('grownfx/')[-1]}:{inner.lineno}" if inner else ""
    return f"{type(exc).__name__}: {str(exc).splitlines()[0][:200] if str(exc) else ''}{at}"
