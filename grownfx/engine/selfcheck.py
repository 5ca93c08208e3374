"""The differential check of `prepare`: the traced graph must compute what the user's eager model computes.

Run on the traced graph at full width, after the coupling analysis (which may edit the graph: open slices, split
sizes) and before any slimming, on the example input:

* outputs in eval mode and in train mode (the same random numbers: the RNG is forked and seeded before each run);
* the gradient of a fixed random projection of the logits with respect to the input (in both modes) and to every
  parameter (a fixed sample of 65,536 entries of a larger one; in eval mode: the train graph has the same ops -- `engine/modes.py` -- so a backward the graph does not
  keep shows in either mode, and the parameter gradients of the largest layers are the dearest part of the check).

Both sides run the same torch ops in the same order on the same tensors (the graph module shares the model's
parameters), so they agree bit for bit in every case measured; the tolerance (`tolerance`) only allows for a backend
that sums in another order: 1e-5 of the largest value in float32 (1e-12 in float64, 1e-2 in half precision).
A mis-read model is off by orders more (a forgotten train-only branch, a custom backward replaced by the
forward's, an in-place update lost through an alias: 1e-2 to 1).

A disagreement raises `ModelCheckError` naming the first graph node whose values differ (module outputs are
compared with the eager model's, recorded by forward hooks), the likely cause and the way out.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from torch import fx, nn

from grownfx.engine.errors import ModelCheckError
from grownfx.engine.faithful import autograd_function_of, has_hooks, is_inplace_op
from grownfx.engine.modes import node_scope, pick_output

_SEED = 20220222  # any fixed value: both sides draw the same random numbers


def tolerance(dtype: torch.dtype) -> float:
    """Largest difference allowed, relative to the largest magnitude (rounding only; see the module docstring)."""
    if dtype == torch.float64:
        return 1e-12
    if dtype in (torch.float16, torch.bfloat16):
        return 1e-2
    return 1e-5


@dataclass
class CheckReport:
    """What `prepare` compared, and the largest relative difference found in each comparison."""

    compared: dict[str, float] = field(default_factory=dict)
    skipped: list[str] = field(default_factory=list)
    tolerance: float = 0.0

    def __str__(self) -> str:
        parts = [f"{k} {v:.1e}" for k, v in self.compared.items()]
        return "; ".join(parts + [f"not checked: {s}" for s in self.skipped])


def rel_diff(a: torch.Tensor | None, b: torch.Tensor | None) -> float:
    """max |a - b| / max |b| (None is a zero gradient; positions NaN in both count as equal)."""
    if a is None and b is None:
        return 0.0
    if a is None or b is None:
        t = a if b is None else b
        return 0.0 if not t.ne(0).any() else math.inf
    if a.shape != b.shape:
        return math.inf
    a, b = a.detach(), b.detach()
    if torch.equal(a, b):  # the usual case: the same ops on the same tensors
        return 0.0
    if not a.is_floating_point() or a.dtype in (torch.float16, torch.bfloat16):
        a, b = a.double(), b.double()
    diff = (a - b).abs()
    diff = torch.where(a.isnan() & b.isnan(), 0.0, diff)
    if diff.isnan().any():
        return math.inf
    scale = torch.nan_to_num(b.abs(), nan=0.0, posinf=0.0).max() if b.numel() else b.new_zeros(())
    return float(diff.max() / scale.clamp_min(1e-30)) if diff.numel() else 0.0


class _State:
    """The model's buffers, to run each side from the same state (train mode updates norm statistics)."""

    def __init__(self, module: nn.Module):
        self.buffers = [(n, b, b.detach().clone()) for n, b in module.named_buffers()]

    def restore(self) -> None:
        with torch.no_grad():
            for _, b, saved in self.buffers:
                b.copy_(saved)

    def changed(self) -> list[str]:
        return [n for n, t, saved in self.buffers
                if not torch.equal(t.detach(), saved) and not (t.isnan().any() and saved.isnan().any())]


class _BackwardFailure(RuntimeError):
    pass


def _run(module: nn.Module, x: torch.Tensor, training: bool, selector, what: str, params: list):
    module.train(training)
    xin = x.detach().clone()
    if xin.is_floating_point():
        xin.requires_grad_(True)
    devices = [xin.device] if xin.device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices), torch.enable_grad():
        torch.manual_seed(_SEED)
        out = pick_output(module(xin), selector, what)
        if not isinstance(out, torch.Tensor):
            raise ModelCheckError(f"{what} returns {type(out).__name__} where the logits should be one tensor")
        g = torch.Generator(device=out.device).manual_seed(_SEED)
        weights = torch.randn(out.shape, generator=g, device=out.device, dtype=torch.float64)
        inputs = ([xin] if xin.requires_grad else []) + params
        grads: list = [None] * len(inputs)
        if out.requires_grad and inputs:
            loss = (torch.nan_to_num(out.double()) * weights).sum()
            try:
                grads = list(torch.autograd.grad(loss, inputs, allow_unused=True))
            except RuntimeError as exc:
                raise _BackwardFailure(str(exc).splitlines()[0][:200]) from exc
    gx = grads[0] if xin.requires_grad else None
    return out.detach(), gx, [_sample(g) for g in grads[1 if xin.requires_grad else 0:]]


SAMPLE = 1 << 16  # entries of each parameter's gradient kept for the comparison


def _sample(g: torch.Tensor | None) -> torch.Tensor | None:
    """A parameter's gradient, or a fixed sample of SAMPLE of its entries when it is larger: a backward the graph
    does not keep changes gradients everywhere, and the largest layers' gradients (ViT-H's) need not be held twice."""
    if g is None or g.numel() <= SAMPLE:
        return g
    idx = torch.randint(g.numel(), (SAMPLE,), generator=torch.Generator().manual_seed(g.numel()))
    return g.reshape(-1)[idx.to(g.device)].clone()


def check_graph(model: nn.Module, gm: fx.GraphModule, example_input: torch.Tensor,
                output: int | str | None = None) -> CheckReport:
    """Compare `gm` (traced from `model`, sharing its parameters) with `model` itself; raise `ModelCheckError`
    on a disagreement, else return what was compared."""
    name = type(model).__name__
    was = model.training
    params = [p for p in model.parameters() if p.requires_grad]
    pnames = {id(p): n for n, p in model.named_parameters()}
    state = _State(model)
    tol = tolerance(example_input.dtype if example_input.is_floating_point() else torch.float32)
    report = CheckReport(tolerance=tol)
    try:
        for training in (False, True):
            mode = "train" if training else "eval"
            state.restore()
            try:
                ref = _run(model, example_input, training, output, f"{name}.forward", [] if training else params)
            except ModelCheckError:
                raise
            except _BackwardFailure as exc:
                raise ModelCheckError(f"{name} cannot compute gradients on the example input in {mode} mode "
                                      f"({exc}); grownfx trains the model, so it must") from exc.__cause__
            except Exception as exc:  # noqa: BLE001 - the eager model itself cannot run this way: nothing to compare
                if not training:
                    raise
                report.skipped.append(f"train mode ({name} raises on the example in train mode: "
                                      f"{type(exc).__name__}: {str(exc)[:80]})")
                continue
            if not training:
                changed = state.changed()
                if changed:
                    raise ModelCheckError(f"the forward of {name} changes its own state in eval mode ({changed[0]}):"
                                          " a task's outputs would depend on how often it ran; grownfx cannot keep "
                                          "old tasks exact for such a model")
            state.restore()
            try:
                got = _run(gm, example_input, training, None, f"the traced graph of {name}",
                           [] if training else params)
            except Exception as exc:  # noqa: BLE001 - the model runs this way, its graph must too
                raise ModelCheckError(f"the traced graph of {name} fails in {mode} mode where {name} runs: "
                                      f"{type(exc).__name__}: {str(exc).splitlines()[0][:200]}. Keep the module "
                                      "involved whole with `leaf_modules=[...]`") from exc
            diffs = {"output": rel_diff(got[0], ref[0]), "input gradient": rel_diff(got[1], ref[1])}
            pdiffs = [(rel_diff(a, b), pnames.get(id(p), "?")) for a, b, p in zip(got[2], ref[2], params)]
            if not training:
                diffs["parameter gradients"] = max([d for d, _ in pdiffs], default=0.0)
            for k, v in diffs.items():
                report.compared[f"{mode} {k}"] = v
            bad = [k for k, v in diffs.items() if not v <= tol]
            if bad:
                worst = max(pdiffs, default=(0.0, ""))[1] if bad == ["parameter gradients"] else None
                state.restore()
                raise ModelCheckError(_explain(model, gm, example_input, mode, bad, diffs, worst, output, tol))
    finally:
        state.restore()
        model.train(was)
        gm.eval()
    return report


# --- naming the first difference ---------------------------------------------------------------------------------

def _first_tensor(v):
    if isinstance(v, torch.Tensor):
        return v
    if isinstance(v, (list, tuple)):
        for x in v:
            t = _first_tensor(x)
            if t is not None:
                return t
    return None


class _Probe:
    """Values (copied: later in-place updates must not change them) and gradients of recorded tensors."""

    def __init__(self):
        self.values: dict = {}
        self.grads: dict = {}

    def record(self, key, value) -> None:
        t = _first_tensor(value)
        if t is None:
            return
        self.values[key] = t.detach().clone()
        if t.requires_grad:
            t.register_hook(lambda g, key=key: self.grads.__setitem__(key, g.detach().clone()))


class _Recorder(fx.Interpreter):
    def __init__(self, gm: fx.GraphModule, probe: _Probe):
        super().__init__(gm)
        self.probe = probe

    def run_node(self, n: fx.Node):
        out = super().run_node(n)
        self.probe.record(n.name, out)
        return out


def _scope_ends(gm: fx.GraphModule) -> dict[str, str]:
    """Node name -> module path, for the last node each traced-through module's forward recorded (its output)."""
    last: dict[str, str] = {}
    for n in gm.graph.nodes:
        for v in (n.meta.get("nn_module_stack") or {}).values():
            path = v[0] if isinstance(v, tuple) else str(v)
            if path:
                last[path] = n.name
    return {node: path for path, node in last.items()}


def _backward(out, inputs) -> None:
    g = torch.Generator(device=out.device).manual_seed(_SEED)
    weights = torch.randn(out.shape, generator=g, device=out.device, dtype=torch.float64)
    inputs = [t for t in inputs if t.requires_grad]
    if out.requires_grad and inputs:
        torch.autograd.grad((torch.nan_to_num(out.double()) * weights).sum(), inputs, allow_unused=True)


def first_differences(model: nn.Module, gm: fx.GraphModule, x: torch.Tensor, training: bool, output,
                      tol: float) -> dict:
    """Where graph and model part, in graph order: the last node whose value agrees with the model and the first
    that differs; going back from the logits, the last node whose gradient agrees and the first that differs.
    Graph values are compared with the eager model's module outputs (forward hooks): call_module nodes, and the
    last node of each module the tracer went through."""
    eager = _Probe()
    hooks, count = [], {}

    def hook(mod, args, out, path):
        k = count.get(path, 0)
        count[path] = k + 1
        eager.record((path, k), out)

    for path, m in model.named_modules():
        if path:
            hooks.append(m.register_forward_hook(lambda mod, a, o, path=path: hook(mod, a, o, path)))
    params = [p for p in model.parameters() if p.requires_grad]
    state = _State(model)
    devices = [x.device] if x.device.type == "cuda" else []
    found: dict = {}
    try:
        for side in ("model", "graph"):
            xin = x.detach().clone().requires_grad_(x.is_floating_point())
            (model if side == "model" else gm).train(training)
            probe = eager if side == "model" else _Probe()
            with torch.random.fork_rng(devices=devices), torch.enable_grad():
                torch.manual_seed(_SEED)
                if side == "model":
                    out = pick_output(model(xin), output, "model")
                    for h in hooks:
                        h.remove()
                    hooks = []
                else:
                    out = _Recorder(gm, probe).run(xin)
                _backward(out, [xin] + params)
            state.restore()
            graph = probe
    finally:
        for h in hooks:
            h.remove()
        state.restore()
    ends = _scope_ends(gm)
    pairs, seen = [], {}
    for n in gm.graph.nodes:
        path = n.target if n.op == "call_module" else ends.get(n.name)
        if path is None:
            continue
        k = seen.get(path, 0)
        seen[path] = k + 1
        if (path, k) in eager.values and n.name in graph.values:
            pairs.append((n.name, path, (path, k)))
    for name, path, key in pairs:
        if not rel_diff(graph.values[name], eager.values[key]) <= tol:
            found["value_differs"] = (name, path)
            break
        found["value_agrees"] = (name, path)
    for name, path, key in reversed(pairs):
        a, b = graph.grads.get(name), eager.grads.get(key)
        if a is None and b is None:
            continue
        if not rel_diff(a, b) <= tol:
            found["grad_differs"] = (name, path)
            break
        found["grad_agrees"] = (name, path)
    return found


def _between(gm: fx.GraphModule, first: str | None, last: str | None) -> list[str]:
    names = [n.name for n in gm.graph.nodes if n.op not in ("placeholder", "output")]
    i = names.index(first) + 1 if first in names else 0
    j = names.index(last) if last in names else len(names)
    return names[i:j]


def _explain(model, gm, x, mode, bad, diffs, worst_param, output, tol) -> str:
    name = type(model).__name__
    training = mode == "train"
    try:
        found = first_differences(model, gm, x, training, output, tol)
    except Exception:  # noqa: BLE001 - the diagnosis is best effort; the refusal stands
        found = {}
    modules = dict(gm.named_modules())
    figures = ", ".join(f"{k} {diffs[k]:.2g}" for k in bad)
    if "output" in bad:
        differs, agrees = found.get("value_differs"), found.get("value_agrees")
        where = "values"
    else:
        differs, agrees = found.get("grad_differs"), found.get("grad_agrees")
        where = "gradients (going back from the logits)"
    suspects = []
    if differs or agrees:
        a, b = (agrees[0] if agrees else None), (differs[0] if differs else None)
        if "output" not in bad:
            a, b = b, a
        suspects = _between(gm, a, b)
    text = f"the traced graph of {name} does not compute what {name} computes ({mode} mode; {figures}, relative to " \
           f"the largest value, tolerance {tol:g})"
    if differs:
        text += f"; the {where} first differ at node '{differs[0]}' (module '{differs[1]}')"
    if agrees:
        text += f" and agree up to '{agrees[0]}'"
    if suspects:
        text += f"; nodes in between: {', '.join(suspects[:6])}{' ...' if len(suspects) > 6 else ''}"
    by_name = {n.name: n for n in gm.graph.nodes}
    inplace = [n for n in suspects if is_inplace_op(by_name[n], modules)]
    functions = sorted({autograd_function_of(n.target).__name__ for n in gm.graph.nodes
                        if n.op == "call_function" and autograd_function_of(n.target) is not None})
    if has_hooks(model):
        cause = (f"a forward hook on {name} itself: fx traces its forward, not the call that runs the hook; do in "
                 "the forward what the hook does")
    elif "output" not in bad:
        cause = ("the gradients differ where the outputs agree: a backward the graph does not keep (a "
                 "torch.autograd.Function fx traced through, a tensor hook, `.data` or `torch.no_grad` in the "
                 "forward)" + (f"; parameter '{worst_param}' differs most" if worst_param else ""))
        if functions:
            cause += f"; the graph calls the autograd Functions {functions} whole"
    elif training and not _eval_differs(model, gm, x, output, tol):
        cause = ("only train mode differs: behaviour that depends on `self.training` which the graph does not keep "
                 "(a train-only branch read once while tracing)")
    else:
        cause = ("an in-place update seen through an alias" + (f" ({', '.join(inplace)})" if inplace else "")
                 + ", Python-side state or a value fx read as a constant while tracing, or a hook")
    scopes = sorted({node_scope(by_name[n]) for n in suspects} - {""})
    if scopes:
        way_out = (f"keep the module{'s' if len(scopes) > 1 else ''} whole: `leaf_modules={scopes[:3]!r}` (a leaf "
                   "runs its own forward)")
    elif suspects:
        way_out = (f"the difference is in {name}'s own forward ({', '.join(suspects[:6])}), which no leaf can keep: "
                   "call custom autograd Functions through `.apply`, write an in-place update out of place "
                   "(`z = z + y`) when another name still refers to `z`, or move the code into a submodule and keep "
                   "it whole with `leaf_modules=[...]`")
    elif differs and differs[1]:
        way_out = f"keep the module whole: `leaf_modules=['{differs[1]}']` (a leaf runs its own forward)"
    else:
        way_out = "keep the offending module whole with `leaf_modules=[...]` (qualified names or types)"
    return f"{text}. Likely cause: {cause}. Way out: {way_out}, or `auto_leaves=True` for modules torch.fx " \
           "cannot trace"


def _eval_differs(model, gm, x, output, tol) -> bool:
    try:
        params: list = []
        state = _State(model)
        ref = _run(model, x, False, output, "model", params)
        state.restore()
        got = _run(gm, x, False, None, "graph", params)
        state.restore()
        return not rel_diff(got[0], ref[0]) <= tol
    except Exception:  # noqa: BLE001
        return True
