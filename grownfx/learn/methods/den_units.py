"""DEN's units on any backbone the coupling analysis reads: which Conv2d / Linear layers produce and read which
channel groups, the layers whose rows and columns grow, and BatchNorm kept one copy per task.

A *unit* is one channel of a coupling group (`engine/coupling`): the rows of every layer producing that channel
(several, when a residual sum ties their outputs), the BatchNorm entries on it and the input columns of every layer
reading it.  DEN selects, expands and splits units, so a residual stage grows in all its producers together.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Optional

import torch
import torch.nn.functional as F
from torch import fx, nn

from grownfx.engine.coupling import CouplingResult
from grownfx.engine.errors import SurgeryError

_NORMS = (nn.BatchNorm1d, nn.BatchNorm2d)
# roles of a coupling binding DEN resizes: layer outputs, layer inputs, norm features
_RESIZED = {"out", "in", "feat"}


class DENLayer(nn.Module):
    """A Conv2d or Linear whose output units (rows of the weight) and input columns grow; `active` = (units,
    input columns) computes with the first ones only (a task's timestamp), None with all."""

    def __init__(self, layer: nn.Module):
        super().__init__()
        self.kind = "conv" if isinstance(layer, nn.Conv2d) else "linear"
        if self.kind == "conv":
            self.conv = dict(stride=layer.stride, padding=layer.padding, dilation=layer.dilation)
        self.weight = nn.Parameter(layer.weight.detach().clone())
        self.bias = nn.Parameter(layer.bias.detach().clone()) if layer.bias is not None else None
        self.active: Optional[tuple[int, int]] = None

    @property
    def units(self) -> int:
        return self.weight.shape[0]

    @property
    def columns(self) -> int:
        return self.weight.shape[1]

    def forward(self, x):
        w, b = self.weight, self.bias
        if self.active is not None:
            o, i = self.active
            w, b = w[:o, :i], (b[:o] if b is not None else None)
        return F.conv2d(x, w, b, **self.conv) if self.kind == "conv" else F.linear(x, w, b)

    def plain(self, units: int, columns: int) -> nn.Module:
        w = self.weight[:units, :columns].detach().clone()
        b = self.bias[:units].detach().clone() if self.bias is not None else None
        if self.kind == "conv":
            out = nn.Conv2d(columns, units, tuple(w.shape[2:]), bias=b is not None, **self.conv)
        else:
            out = nn.Linear(columns, units, bias=b is not None)
        out.weight = nn.Parameter(w)
        if b is not None:
            out.bias = nn.Parameter(b)
        return out.to(w.device)


class DENNorm(nn.Module):
    """A BatchNorm kept one copy per task (statistics and affine), each as wide as its group was for that task.
    The learning task's copy grows with its group; a finished task's copy is never trained and stays in evaluation
    mode, so no later task changes it (as the framework's per-task norms)."""

    def __init__(self, layer: nn.Module):
        super().__init__()
        self.template = [layer]  # not a submodule: its parameters are not stored
        self.copies = nn.ModuleList()
        self.finished = 0
        self.task = 0

    def add_task(self) -> None:
        self.copies.append(copy.deepcopy(self.copies[-1] if len(self.copies) else self.template[0]))

    def finish(self) -> None:
        self.finished = len(self.copies)
        self.copies[-1].eval()

    def train(self, mode: bool = True):
        super().train(mode)
        for c in self.copies[:self.finished]:
            c.eval()
        return self

    def forward(self, x):
        return self.copies[self.task](x)

    @torch.no_grad()
    def append(self, like: Optional[torch.Tensor], k: int) -> None:
        """Grow the learning copy by k entries: copies of entries `like` (a split), else the identity (new units:
        gamma 1, beta 0, mean 0, variance 1)."""
        bn = self.copies[-1]
        fills = {"weight": 1.0, "bias": 0.0, "running_mean": 0.0, "running_var": 1.0}
        for name, fill in fills.items():
            old = getattr(bn, name)
            if old is None:
                continue
            new = old[like] if like is not None else torch.full((k,), fill, dtype=old.dtype, device=old.device)
            value = torch.cat([old.detach(), new])
            setattr(bn, name, nn.Parameter(value) if isinstance(old, nn.Parameter) else value)
        bn.num_features += k

    @torch.no_grad()
    def keep(self, keep: torch.Tensor) -> None:
        bn = self.copies[-1]
        for name in ("weight", "bias", "running_mean", "running_var"):
            old = getattr(bn, name)
            if old is not None:
                setattr(bn, name, nn.Parameter(old[keep]) if isinstance(old, nn.Parameter) else old[keep])
        bn.num_features = int(keep.sum())


@dataclass
class UnitStructure:
    """Which group each DEN layer produces and reads (with the columns one unit feeds: 1, or the spatial size a
    flatten folds in), which BatchNorm sits on which group, the head's group, and the layers whose units do not
    grow, with why."""

    names: list[str]
    out_group: list[int]
    in_group: list[int]
    in_factor: list[int]
    head_group: int
    head_factor: int
    norms: dict[str, int] = field(default_factory=dict)
    growable: list[int] = field(default_factory=list)  # groups DEN expands and splits
    fixed: dict[str, str] = field(default_factory=dict)  # layer -> why its units keep their number

    def producers(self, g: int) -> list[int]:
        return [l for l, o in enumerate(self.out_group) if o == g]

    def consumers(self, g: int) -> list[int]:
        return [l for l, i in enumerate(self.in_group) if i == g]


def unit_structure(gm: fx.GraphModule, coupling: CouplingResult, head_target: str) -> UnitStructure:
    """Read DEN's units off the coupling analysis; SurgeryError naming the layer, parameter or op DEN cannot
    grow through (grouped convs, norms other than BatchNorm, layers of other kinds with parameters, channels read
    concatenated or reshaped by a written width, parameters read directly)."""
    def refuse(what: str, why: str) -> SurgeryError:
        return SurgeryError(f"DEN grows the units of Conv2d/Linear layers (BatchNorm kept per task); {what} {why}")

    heads = f"{head_target}."
    layers: list[str] = []
    norms: list[str] = []
    for node in gm.graph.nodes:
        if node.op == "get_attr":
            try:
                gm.get_parameter(node.target)
            except AttributeError:
                continue
            raise refuse(f"node {node.name!r}", f"reads the parameter {node.target!r} directly")
        if node.op != "call_module" or node.target == head_target or node.target.startswith(heads):
            continue
        module = gm.get_submodule(node.target)
        name = f"{type(module).__name__} {node.target!r}"
        if type(module) in (nn.Conv2d, nn.Linear):
            if isinstance(module, nn.Conv2d) and module.groups != 1:
                raise refuse(name, f"is a grouped convolution (groups={module.groups}): its units span groups")
            if isinstance(module, nn.Conv2d) and module.padding_mode != "zeros":
                raise refuse(name, f"pads with {module.padding_mode!r}")
            if node.target in layers:
                raise refuse(name, "is called at several places")
            layers.append(node.target)
        elif isinstance(module, _NORMS):
            norms.append(node.target)
        elif any(True for _ in module.parameters()):
            raise refuse(name, "holds parameters of a kind it cannot grow")
    binding = {(b.target, b.role): b for b in coupling.bindings}
    for b in coupling.bindings:
        if b.role not in _RESIZED and not b.target.startswith(heads) and b.target != head_target:
            group = coupling.group_of(b.layout[0]) if b.layout else None
            if group is not None and group.growable:
                raise refuse(f"{b.role} binding {b.target!r}", "meets a growable group it does not resize")

    def one_group(target: str, role: str) -> tuple[int, int]:
        b = binding.get((target, role))
        if b is None or len(b.layout) != 1:
            raise refuse(f"layer {target!r}", "reads channels concatenated from several groups" if b else
                         f"has no {role!r} channels in the coupling analysis")
        return coupling.var_group[b.layout[0].var], b.layout[0].factor

    out_group, in_group, in_factor = [], [], []
    for name in layers:
        out_group.append(one_group(name, "out")[0])
        g, f = one_group(name, "in")
        in_group.append(g)
        in_factor.append(f)
    head_group, head_factor = one_group(head_target, "in")
    structure = UnitStructure(layers, out_group, in_group, in_factor, head_group, head_factor,
                              {n: one_group(n, "feat")[0] for n in norms})
    for g in sorted(set(out_group)):
        group = coupling.groups[g]
        if group.growable and group.granularity == 1:
            structure.growable.append(g)
        else:
            why = "; ".join(group.reasons[:2]) or f"granularity {group.granularity}"
            for l in structure.producers(g):
                structure.fixed[layers[l]] = why
    for g in in_group + [head_group]:
        if g not in out_group and coupling.groups[g].producers:
            raise refuse(f"group {g}", "is produced by a layer DEN does not hold")
    return structure
