"""The classifier: what becomes one copy per task with the task's own number of classes.

GROWN gives every task its own head.  `find_heads` decides what that head is, on the traced graph before slimming:

* the modules whose outputs are the logits (a Linear or conv; several when they are averaged, like a distillation
  head next to the classifier) -> `PerTask('head')`, reset for each task to its number of classes;
* parameters used as the weight (and bias) of a functional classifier (`F.linear(f, self.W, self.b)`, a cosine
  classifier `F.linear(normalize(f), normalize(self.W))`) -> per-task copies with the task's number of rows,
  initialised as `nn.Linear` initialises its weight;
* a learnable parameter with one value per class applied to the logits (logit adjustment `head(f) + self.bias`) ->
  a per-task copy of the task's size, starting at the identity of its op (0 added, 1 multiplied), like a new head;
* or what the user declares with `prepare(..., head="name")` (a module or a parameter) when the analysis cannot
  find it (`einsum` against prototypes).

What cannot be made per task is refused by name: logits concatenated from several classifiers (each task would
get a multiple of its classes), a buffer of per-class values (its values for a new task's classes are unknown),
a parameter transformed before it meets the logits, a class count written into the graph.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass, field

import torch
from torch import fx, nn

from grownfx.engine.coupling import CouplingResult
from grownfx.engine.errors import SurgeryError
from grownfx.engine.layers import _reset_head


@dataclass
class Heads:
    modules: list[str] = field(default_factory=list)  # module paths: PerTask('head')
    params: dict[str, tuple] = field(default_factory=dict)  # parameter -> (class axis, fill or ("uniform", fan_in))
    class_axis: int = 1  # the logits' axis of classes
    traced_classes: int = 0  # the number of logits of the traced model
    other_axes: dict[str, list] = field(default_factory=dict)  # a declared parameter's other candidate class axes

    @property
    def first(self) -> str:
        return self.modules[0] if self.modules else next(iter(self.params), "")


def _producers(coupling: CouplingResult, gid: int) -> list[str]:
    return [b.target for b in coupling.groups[gid].members if b.role in ("out", "grouped", "fnout")]


def find_heads(gm: fx.GraphModule, coupling: CouplingResult, declared: str | list[str] | None = None) -> Heads:
    """The heads of a traced, analysed graph; `SurgeryError` for a classifier that cannot be made per task."""
    logit_groups = coupling._logit_groups()
    axes = coupling.output_axes
    class_axis = next((i for i, lay in enumerate(axes) if lay), None)
    meta = next(n for n in gm.graph.nodes if n.op == "output").args[0].meta.get("tensor_meta")
    shape = tuple(meta.shape) if meta is not None and hasattr(meta, "shape") else ()
    if class_axis is None:
        class_axis = 1 if len(shape) >= 2 else 0
    traced = int(shape[class_axis]) if shape else 0
    heads = Heads(class_axis=class_axis, traced_classes=traced)
    if declared:
        _declared(gm, coupling, [declared] if isinstance(declared, str) else list(declared), heads)
    else:
        heads.modules = coupling.head_targets()
        for b in coupling.head_params():
            weight = b.target if _is_weight(gm, b.target) else None
            fan_in = _fan_in(gm, b) if weight is None else math.prod(_param(gm, b.target).shape[1:])
            heads.params.setdefault(b.target, (b.axis, ("uniform", fan_in)))
        if not heads.modules and not heads.params:
            raise SurgeryError(
                "no layer produces the logits: the model must end in a classifier (a Linear or conv, or "
                "`F.linear` with a parameter as its weight); declare it with `head=` (a module, or the parameter of "
                "a functional classifier: `head=\"W\"`) or keep the op computing the logits whole with "
                "`leaf_modules=[...]`")
        _check_one_classifier(coupling, axes[class_axis] if class_axis < len(axes) else None, heads)
    _per_class_tensors(gm, coupling, logit_groups, heads)
    _check_widths(coupling, heads)
    return heads


def _param(gm: fx.GraphModule, target: str):
    owner, _, name = target.rpartition(".")
    return getattr(gm.get_submodule(owner) if owner else gm, name)


def _is_weight(gm: fx.GraphModule, target: str) -> bool:
    return _param(gm, target).dim() >= 2


def _fan_in(gm: fx.GraphModule, bias: "object") -> int:
    """A functional linear's bias is initialised like its weight: from the weight's fan-in."""
    node = next(n for n in gm.graph.nodes if n.name == bias.node)
    weight = node.kwargs.get("weight", node.args[1] if len(node.args) > 1 else None)
    meta = weight.meta.get("tensor_meta") if isinstance(weight, fx.Node) else None
    return math.prod(meta.shape[1:]) if meta is not None else 1


def _declared(gm: fx.GraphModule, coupling: CouplingResult, names: list[str], heads: Heads) -> None:
    modules = dict(gm.named_modules())
    params = dict(gm.named_parameters())
    for name in names:
        if name in modules and name:
            if not any(b.target == name and b.role in ("out", "grouped") for b in coupling.bindings):
                raise SurgeryError(f"head='{name}' names a module that is no classifier layer of the traced graph "
                                   "(a Linear or conv called in the forward)")
            heads.modules.append(name)
        elif name in params:
            p = params[name]
            axes = [i for i, n in enumerate(p.shape) if n == heads.traced_classes]
            if not axes:
                raise SurgeryError(f"head='{name}': no axis of its shape {tuple(p.shape)} has the logits' "
                                   f"{heads.traced_classes} classes")
            heads.params[name] = _class_axis(p, axes[0])
            if len(axes) > 1:  # a square weight: check_class_count tries each
                heads.other_axes[name] = [_class_axis(p, a) for a in axes[1:]]
        else:
            raise SurgeryError(f"head='{name}' names no module or parameter of the model (give the qualified name "
                               "of the classifier layer, or of the weight of a functional classifier)")


def _class_axis(p, axis: int) -> tuple:
    fan_in = math.prod(n for i, n in enumerate(p.shape) if i != axis) if p.dim() >= 2 else 1
    return axis, ("uniform", fan_in)


def _check_one_classifier(coupling: CouplingResult, layout, heads: Heads) -> None:
    """The logits must be one classifier's outputs (several tied classifiers, averaged, are one segment)."""
    if not layout or len(layout) <= 1:
        return
    parts = []
    for s in layout:
        gid = coupling.var_group[s.var]
        names = _producers(coupling, gid) or ["channels no classifier produces"]
        parts.append(f"{'/'.join(names)} ({s.width})")
    raise SurgeryError(
        f"the logits are the concatenation of {len(layout)} parts ({', '.join(parts)}): grownfx gives every task "
        "one classifier with the task's number of classes, so it cannot tell how many logits each part should "
        "have. Keep one classifier layer, return one part (`output=`), or declare the classifier (`head=`)")


def _per_class_tensors(gm: fx.GraphModule, coupling: CouplingResult, logit_groups: set, heads: Heads) -> None:
    params = dict(gm.named_parameters())
    for b in coupling.bindings:
        if not any(coupling.var_group[s.var] in logit_groups for s in b.layout):
            continue
        if b.role in ("literal", "split"):
            raise SurgeryError(f"the number of classes is written into the graph at node '{b.target}' "
                               f"({sum(s.width * s.factor for s in b.layout)}): every task has its own number of "
                               "classes; read it from the logits' shape instead (`x.shape[1]`)")
        if b.role != "param" or b.target in heads.params:
            continue
        if b.target not in params:
            raise SurgeryError(
                f"buffer '{b.target}' holds one value per class, applied to the logits at '{b.node}': every task has "
                "its own classes, so its values for a new task are unknown. Make it an nn.Parameter (each task then "
                "learns its own, starting at the identity of the op), or apply it outside the model")
        reasons = coupling.groups[coupling.var_group[b.layout[0].var]].reasons
        if any(f"parameter '{b.target}' is transformed" in r for r in reasons):
            raise SurgeryError(
                f"parameter '{b.target}' has one value per class and is transformed before it meets the logits at "
                f"'{b.node}': a new task's values cannot start at the identity of the op. Apply it as it is "
                "(`logits + self.b`) or outside the model")
        heads.params[b.target] = (b.axis, b.fill)


def _check_widths(coupling: CouplingResult, heads: Heads) -> None:
    """Several layers producing the logits (a distillation head next to the classifier) must agree in width."""
    widths = {b.target: sum(s.width for s in b.layout) for b in coupling.bindings
              if b.role == "out" and b.target in heads.modules}
    if len(set(widths.values())) > 1:
        raise SurgeryError(f"the layers producing the logits have different widths {widths}: the logits are "
                           "computed through an op the analysis cannot follow; keep the classifier a plain "
                           "nn.Linear, declare it with `head=`, or declare the op's module in `leaf_modules`")


def check_class_count(gm: fx.GraphModule, heads: Heads, example_input: torch.Tensor) -> None:
    """The logits must follow the classifier's number of classes: with one class more in every head (modules and
    per-class parameters), the graph must return one logit more.  Catches what the analysis cannot see (a view
    with the count written in, logits repeated by an op it does not know) before any task exists.  A declared
    parameter with several axes of the classes' size gets the first axis that works."""
    got = _logits_with_one_class_more(gm, heads, example_input)
    for name, choices in heads.other_axes.items():
        for choice in choices:
            if _follows(got, heads):
                break
            heads.params[name] = choice
            got = _logits_with_one_class_more(gm, heads, example_input)
    if not _follows(got, heads):
        k = heads.traced_classes + 1
        what = got if isinstance(got, str) else f"logits of shape {got}"
        parts = heads.modules + list(heads.params)
        raise SurgeryError(
            f"the logits do not follow the number of classes of the classifier ({', '.join(parts)}): with {k} "
            f"classes instead of {k - 1} the model gives {what}. Every task has its own number of classes: read "
            "it from the logits' shape where it is written as a number, or declare the classifier with `head=`")


def _follows(got, heads: Heads) -> bool:
    return not isinstance(got, str) and heads.class_axis < len(got) and got[heads.class_axis] == \
        heads.traced_classes + 1


def _logits_with_one_class_more(gm: fx.GraphModule, heads: Heads, example_input: torch.Tensor):
    """The logits' shape with every head one class wider, or the error the graph raises."""
    k = heads.traced_classes + 1
    saved = []
    try:
        for path in heads.modules:
            wider = copy.deepcopy(gm.get_submodule(path))
            _reset_head(wider, k, None)
            _swap(gm, path, wider, saved)
        for target, (axis, _) in heads.params.items():
            t = _param(gm, target)
            shape = list(t.shape)
            shape[axis] = k
            zeros = torch.zeros(shape, dtype=t.dtype, device=t.device)
            _swap(gm, target, nn.Parameter(zeros, requires_grad=False) if t.is_floating_point() else zeros, saved)
        was = gm.training
        gm.eval()
        try:
            with torch.no_grad():
                return tuple(gm(example_input).shape)
        except Exception as exc:  # noqa: BLE001 - the model cannot take another number of classes
            return f"{type(exc).__name__}: {str(exc).splitlines()[0][:160]}"
        finally:
            gm.train(was)
    finally:
        for path, old in reversed(saved):
            owner, _, name = path.rpartition(".")
            setattr(gm.get_submodule(owner) if owner else gm, name, old)


def _swap(gm: fx.GraphModule, path: str, new, saved: list) -> None:
    owner, _, name = path.rpartition(".")
    mod = gm.get_submodule(owner) if owner else gm
    saved.append((path, getattr(mod, name)))
    if isinstance(new, nn.Module):
        setattr(mod, name, new)
    elif isinstance(new, nn.Parameter) or name in mod._parameters:
        mod._parameters[name] = new
    else:
        mod._buffers[name] = new
