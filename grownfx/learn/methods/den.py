"""DEN, dynamically expandable networks (Yoon, Yang, Lee & Hwang, ICLR 2018, "Lifelong Learning with Dynamically
Expandable Networks"), on Fine-tune's layout: one backbone whose units (conv filters, linear neurons, each with its
incoming weights and bias) grow, a head per task.

A task after the first runs DEN's Algorithm 1 through the one training loop:

1. select   only the new head trains, with L1, the rest fixed; the units it reaches through nonzero weights,
            followed down the network layer by layer (breadth-first), are the task's subnetwork;
2. retrain  only the subnetwork's weights train, with L2 and regular_lambda * 1/2 |W - W_prev|^2 toward the
            previous tasks' values; the mean training loss is measured after it;
3. expand   (when that loss is at least loss_thr) k_ex new units in every hidden layer train, the old ones fixed,
            with L1 and a group lasso per new unit; new units whose incoming weights all went to zero are dropped;
4. split    a unit whose incoming weights moved (L2) more than spl_thr from their value before the task is
            duplicated: the copy takes the new values and serves the new task, the unit itself gets its old values
            back (incoming, bias, and its outgoing weights into the earlier tasks' units); then the units the new
            task owns alone (copies, new units, their connections, its head) retrain, the old ones fixed.
5. timestamp the task's width of every layer is recorded: a task computes with the units that existed when it
            was learned (the first n of each layer; later units are appended).

The first task trains the whole network with L2 and the L1 soft-threshold.  Old tasks change wherever stage 2 moved
a unit less than spl_thr: BWT is measured, not forced to 0.  DEN grows units along a chain of Conv2d / Linear layers
with elementwise activations, pooling and flatten between them (its own networks: MLPs, LeNet); any other node is
refused by name.
"""

from __future__ import annotations

import copy
import math
from typing import Callable, Optional

import torch
import torch.nn.functional as F
from torch import fx, nn

from grownfx.data import Task
from grownfx.engine.errors import SurgeryError
from grownfx.engine.net import count_parameters
from grownfx.engine.rewrite import set_submodule
from grownfx.engine.surgery import random_fill
from grownfx.errors import UserError
from grownfx.learn.budget import task_epochs
from grownfx.learn.records import TaskRecord
from grownfx.learn.methods.base import StepTerms
from grownfx.learn.methods.finetune import FinetuneContinual
from grownfx.learn.training import Timer, derive_seed

# what may sit between two unit layers: each maps a unit (channel) to itself
_PASS_MODULES = (nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.ELU, nn.GELU, nn.SiLU, nn.Tanh, nn.Sigmoid, nn.MaxPool1d,
                 nn.MaxPool2d, nn.AvgPool1d, nn.AvgPool2d, nn.AdaptiveAvgPool2d, nn.AdaptiveMaxPool2d, nn.Dropout,
                 nn.Flatten, nn.Identity)
_PASS_FUNCTIONS = {F.relu, torch.relu, F.relu6, F.leaky_relu, F.gelu, F.silu, F.elu, torch.tanh, torch.sigmoid,
                   F.max_pool2d, F.avg_pool2d, F.adaptive_avg_pool2d, F.adaptive_max_pool2d, F.dropout, torch.flatten}
_PASS_METHODS = {"relu", "sigmoid", "tanh", "flatten"}


class DENSettingError(UserError, ValueError):
    """A recipe setting DEN cannot honour."""


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


def _set_weight(module: nn.Module, weight: torch.Tensor, bias: Optional[torch.Tensor] = None) -> None:
    module.weight = nn.Parameter(weight.contiguous())
    if bias is not None:
        module.bias = nn.Parameter(bias.contiguous())
    if isinstance(module, nn.Linear):
        module.out_features, module.in_features = weight.shape


def _cols(units, factor: int) -> torch.Tensor:
    """The input columns of input units `units` when each unit feeds `factor` columns (a flattened feature map)."""
    units = torch.as_tensor(units, dtype=torch.long).view(-1, 1)
    return (units * factor + torch.arange(factor).view(1, -1)).view(-1)


def unit_chain(gm: fx.GraphModule, head_target: str, head: nn.Module) -> list[tuple[str, int]]:
    """The Conv2d / Linear layers of `gm` from input to head (`head_target`, computing as `head`), in order, each
    with the number of its input columns one unit of the layer before feeds (1, or the spatial size a flatten folds
    in); the head last.  SurgeryError
    naming the node when the graph is not such a chain."""
    def refuse(node: fx.Node, why: str) -> SurgeryError:
        what = node.target if node.op != "call_module" else f"{type(gm.get_submodule(node.target)).__name__} " \
                                                              f"{node.target!r}"
        return SurgeryError(f"DEN grows units along a chain of Conv2d/Linear layers joined by elementwise "
                            f"activations, pooling and flatten; node {node.name!r} ({what}) {why}")

    chain: list[tuple[str, nn.Module]] = []
    current: Optional[fx.Node] = None
    for node in gm.graph.nodes:
        if node.op == "placeholder":
            if current is not None:
                raise refuse(node, "is a second input")
            current = node
            continue
        if node.op == "output":
            break
        if node.op == "get_attr":
            raise refuse(node, "reads a parameter or buffer directly")
        inputs = node.all_input_nodes
        if inputs != [current] or len(current.users) != 1:
            raise refuse(node, "is not on a single path (a branch, a join or a second input)")
        if node.op == "call_module":
            module = gm.get_submodule(node.target)
            if node.target == head_target or type(module) in (nn.Conv2d, nn.Linear):
                if isinstance(module, nn.Conv2d) and (module.groups != 1 or module.padding_mode != "zeros"):
                    raise refuse(node, "is a grouped or non-zero-padded convolution")
                chain.append((node.target, module))
            elif not isinstance(module, _PASS_MODULES):
                raise refuse(node, "is not one")
        elif node.op == "call_function" and node.target not in _PASS_FUNCTIONS:
            raise refuse(node, "is not one")
        elif node.op == "call_method" and node.target not in _PASS_METHODS:
            raise refuse(node, "is not one")
        current = node
    if not chain or chain[-1][0] != head_target:
        raise SurgeryError(f"DEN: the head {head_target!r} is not the last Conv2d/Linear layer of the network")
    out: list[tuple[str, int]] = []
    before: Optional[nn.Module] = None
    for name, module in chain:
        if name == head_target:
            module = head
            if not isinstance(module, nn.Linear):
                raise SurgeryError(f"DEN: the head {head_target!r} is a {type(module).__name__}; it needs a Linear")
        columns = module.in_features if isinstance(module, nn.Linear) else module.in_channels
        if before is None:
            factor = 1
        else:
            units = before.out_features if isinstance(before, nn.Linear) else before.out_channels
            if isinstance(module, nn.Conv2d) and isinstance(before, nn.Linear) or columns % units:
                raise SurgeryError(f"DEN: {name!r} reads {columns} inputs from the {units} units before it; "
                                   "units cannot be followed through that")
            factor = columns // units
        out.append((name, factor))
        before = module
    return out


class _StagePlan:
    """Which entries of which parameters train in a stage (True) and which stay as they were (restored after every
    step); after each step also DEN's proximal steps: the L1 soft-threshold on the trained weight entries, the
    group lasso on the rows (units) listed in `groups`."""

    def __init__(self, trains: dict[nn.Parameter, torch.Tensor], l1: float, weights: set,
                 groups: list[tuple[nn.Parameter, torch.Tensor]] = (), gl: float = 0.0):
        self.trains, self.l1, self.weights, self.groups, self.gl = trains, l1, weights, list(groups), gl
        self.before = {p: p.detach().clone() for p in trains}

    @torch.no_grad()
    def after_step(self) -> None:
        for p, trains in self.trains.items():
            if self.l1 > 0 and p in self.weights:
                p.copy_(torch.sign(p) * (p.abs() - self.l1).clamp_min(0))
            for q, rows in self.groups:
                if q is p and len(rows):
                    g = p[rows]
                    norm = g.flatten(1).norm(dim=1).view(-1, *([1] * (g.dim() - 1)))
                    p[rows] = torch.where(norm < self.gl, torch.zeros_like(g),
                                          g - self.gl * g / norm.clamp_min(torch.finfo(g.dtype).tiny))
            p.copy_(torch.where(trains, p, self.before[p]))


class DENContinual(FinetuneContinual):
    name = "den"

    def __init__(self, recipe, stream, device, **hooks):
        if recipe.training.epoch_budget is not None:
            raise DENSettingError("training.epoch_budget: DEN's stages after selective retraining depend on what "
                                  "it finds (expansion, splits), so no fixed budget splits them; leave den out of "
                                  "--equal-budget comparisons")
        hooks["checkpoint"] = None  # shapes change within a task: checkpoints after tasks only
        super().__init__(recipe, stream, device, **hooks)
        chain = unit_chain(self.model, self.head_target, self.template)
        self.names = [name for name, _ in chain[:-1]]
        self.factors = [factor for _, factor in chain]  # the head's last
        self.layers: list[DENLayer] = []
        for name in self.names:
            layer = DENLayer(self.model.get_submodule(name))
            set_submodule(self.model, name, layer)
            self.layers.append(layer)
        self.model.to(self.device)
        self.stamps: list[list[int]] = []  # per task: every layer's units when it was learned

    # -- widths and timestamps -------------------------------------------------------------------------------
    def widths(self, t: Optional[int] = None) -> list[int]:
        return list(self.stamps[t]) if t is not None and t < len(self.stamps) else [l.units for l in self.layers]

    def _select(self, t: int) -> None:
        units, columns = self.widths(t), self.layers[0].columns
        for l, layer in enumerate(self.layers):
            layer.active = (units[l], columns)
            columns = units[l] * self.factors[l + 1]

    def _head_columns(self, units: int) -> int:
        return units * self.factors[-1]

    def _fresh(self, shape: tuple, fan_in: int, *purpose) -> torch.Tensor:
        g = torch.Generator().manual_seed(derive_seed(self.recipe.seed, "den", *purpose))
        return random_fill(shape, fan_in, g, self.layers[0].weight)

    def _den_head(self, num_classes: int, t: int) -> nn.Linear:
        columns = self._head_columns(self.layers[-1].units)
        head = nn.Linear(columns, num_classes).to(self.device)
        _set_weight(head, self._fresh((num_classes, columns), columns, "head", t),
                    self._fresh((num_classes,), columns, "head_bias", t))
        return head

    # -- learning ----------------------------------------------------------------------------------------------
    def learn(self, task: Task, target: Optional[float], resume=None) -> TaskRecord:
        timer, cfg, epochs = Timer(), self.recipe.method, task_epochs(self.recipe.training)
        t = len(self.heads.heads)
        for old in self.heads.heads:
            old.requires_grad_(False)
        self.heads.heads.append(self._den_head(task.num_classes, t))
        self.heads.task = t
        facts: dict = {"expanded": [0] * len(self.layers), "split": [0] * len(self.layers)}
        if t == 0:
            done = self._stage(task, t, "train", epochs, self._plan(t, rows=None))
        else:
            prev = [(l.weight.detach().clone(), None if l.bias is None else l.bias.detach().clone())
                    for l in self.layers]
            select = cfg.select_epochs or max(1, math.ceil(self.recipe.training.epochs / 10))
            done = self._stage(task, t, "select", select, self._plan(t, rows=[[] for _ in self.layers]))
            chosen = self.subnetwork(t)
            facts["selected"] = [len(r) for r in chosen]
            done += self._stage(task, t, "retrain", epochs, self._plan(t, rows=chosen, prev=prev),
                                prev=prev)
            facts["loss"] = loss = self.training_loss(task, t)
            if loss >= cfg.loss_thr:
                added = self.expand(t)
                done += self._stage(task, t, "expand", epochs, self._plan(t, rows=None, prev=prev, new_only=True,
                                                                          groups=added), prev=prev)
                facts["expanded"] = self.drop_dead_units(t, added)
            facts["split"] = self.split(t, prev)
            if any(facts["split"]):
                done += self._stage(task, t, "split", epochs, self._plan(t, rows=None, prev=prev, new_only=True),
                                    prev=prev)
        before = self.stamps[-1] if self.stamps else self.widths()
        self.stamps.append(self.widths())
        self.heads.heads[t].requires_grad_(False)
        val = self.evaluate(t, task.val)
        facts["units"] = self.widths()
        return TaskRecord(index=t, name=task.name, num_classes=task.num_classes, target=target, val_acc=val,
                          val_history=[val], params_stored=self.num_parameters(),
                          params_task=count_parameters(self.export(t)), time_s=timer.seconds, epochs=done,
                          grew=bool(any(facts["expanded"]) or any(facts["split"])),
                          growth={n: a - b for n, a, b in zip(self.names, self.widths(), before) if a > b},
                          extra=facts)

    def _plan(self, t: int, rows, prev=None, new_only: bool = False,
              groups: Optional[list[torch.Tensor]] = None) -> _StagePlan:
        """rows None: every unit trains (new_only: only the entries no earlier task reads); else rows[l] = the
        units of layer l that train, with their columns from the chosen units below (old: the earlier units
        only)."""
        trains: dict[nn.Parameter, torch.Tensor] = {}
        below = None  # the chosen units of the layer below, as its input columns
        for l, layer in enumerate(self.layers):
            w = layer.weight
            mask = torch.zeros_like(w, dtype=torch.bool)
            if rows is None and not new_only:
                mask[:] = True
            elif new_only:
                units, columns = prev[l][0].shape[:2]
                mask[units:] = True
                mask[:, columns:] = True
            else:
                r = torch.as_tensor(rows[l], dtype=torch.long, device=w.device)
                cols = torch.arange(layer.columns, device=w.device) if l == 0 else below
                if len(r) and len(cols):
                    mask[r.view(-1, 1), cols.view(1, -1)] = True
                below = _cols(rows[l], self.factors[l + 1]).to(w.device)
            trains[w] = mask
            if layer.bias is not None:
                trains[layer.bias] = mask.flatten(1).any(dim=1) if not new_only else \
                    torch.arange(layer.units, device=w.device) >= prev[l][0].shape[0]
        head = self.heads.heads[t]
        for p in head.parameters():
            trains[p] = torch.ones_like(p, dtype=torch.bool)
        weights = {layer.weight for layer in self.layers} | {head.weight}
        group_rows = [(self.layers[l].weight, g) for l, g in enumerate(groups or [])]
        return _StagePlan(trains, self.recipe.method.l1_lambda, weights, group_rows, self.recipe.method.gl_lambda)

    def _stage(self, task: Task, t: int, name: str, epochs: int, plan: _StagePlan, prev=None) -> int:
        cfg = self.recipe.method
        params = [p for p, m in plan.trains.items() if bool(m.any())]
        for layer in self.layers:
            layer.requires_grad_(False)
        for p in params:
            p.requires_grad_(True)

        def penalty() -> torch.Tensor:
            terms = [cfg.l2_lambda * 0.5 * p.pow(2).sum() for p in params]
            if prev is not None and cfg.regular_lambda > 0:
                for layer, (w, b) in zip(self.layers, prev):
                    terms.append(cfg.regular_lambda * 0.5 * (layer.weight[:w.shape[0], :w.shape[1]] - w).pow(2).sum())
                    if b is not None:
                        terms.append(cfg.regular_lambda * 0.5 * (layer.bias[:b.shape[0]] - b).pow(2).sum())
            return torch.stack(terms).sum()

        return self.trainer.train(self.model, self._forward(t), [(params, self.recipe.training.optimizer)], task,
                                  name=name, seed=(self.recipe.seed, self.name, t), epochs=epochs,
                                  terms=StepTerms(penalty=penalty, after_step=plan.after_step))

    @torch.no_grad()
    def subnetwork(self, t: int) -> list[list[int]]:
        """The units of every layer task t's head reaches through nonzero weights (breadth-first, top down)."""
        head = self.heads.heads[t].weight
        factor = self.factors[-1]
        reached = (head.view(head.shape[0], -1, factor) != 0).any(dim=2).any(dim=0)
        chosen: list[list[int]] = [[] for _ in self.layers]
        for l in range(len(self.layers) - 1, -1, -1):
            units = reached.nonzero().view(-1)
            chosen[l] = units.tolist()
            if l == 0:
                break
            w = self.layers[l].weight[units].flatten(2) if self.layers[l].kind == "conv" else \
                self.layers[l].weight[units].unsqueeze(2)
            w = w.reshape(len(units), self.layers[l - 1].units, -1) if len(units) else w
            reached = (w != 0).any(dim=2).any(dim=0) if len(units) else \
                torch.zeros(self.layers[l - 1].units, dtype=torch.bool, device=head.device)
        return chosen

    @torch.no_grad()
    def training_loss(self, task: Task, t: int) -> float:
        """Mean cross-entropy of task t over its training split (evaluation mode, no augmentation)."""
        self.model.eval()
        loader = task.train.loader(self.recipe.training.eval_batch_size, shuffle=False, device=self.device,
                                   augment=None)
        forward, total, n = self._forward(t), 0.0, 0
        for x, y in loader:
            x, y = x.to(self.device), y.to(self.device)
            total += float(F.cross_entropy(forward(x).float(), y, reduction="sum"))
            n += int(y.numel())
        return total / max(n, 1)

    # -- growth ----------------------------------------------------------------------------------------------
    @torch.no_grad()
    def _append_units(self, l: int, weight: torch.Tensor, bias: Optional[torch.Tensor], t: int,
                      outgoing: Callable[[nn.Module, torch.Tensor], torch.Tensor]) -> torch.Tensor:
        """Append units (`weight` rows, `bias`) to layer l and their input columns to the layer after it (and to
        task t's head, the only head reading the newest units): `outgoing(module, columns)` gives the new columns'
        values.  Returns the new units' indices."""
        layer = self.layers[l]
        start = layer.units
        _set_weight(layer, torch.cat([layer.weight, weight]),
                    torch.cat([layer.bias, bias]) if layer.bias is not None else None)
        index = torch.arange(start, layer.units)
        after = self.layers[l + 1] if l + 1 < len(self.layers) else self.heads.heads[t]
        factor = self.factors[l + 1]
        cols = outgoing(after, _cols(index, factor)).to(after.weight)
        _set_weight(after, torch.cat([after.weight, cols], dim=1))
        return index

    def expand(self, t: int) -> list[torch.Tensor]:
        """k_ex new units in every hidden layer (torch's default init), wired to everything above and below."""
        k, added = self.recipe.method.k_ex, []
        for l, layer in enumerate(self.layers):
            fan_in = layer.weight[0].numel()
            w = self._fresh((k, *layer.weight.shape[1:]), fan_in, "expand", t, l)
            b = self._fresh((k,), fan_in, "expand_bias", t, l) if layer.bias is not None else None

            def outgoing(after: nn.Module, cols: torch.Tensor, l=l) -> torch.Tensor:
                shape = (after.weight.shape[0], len(cols), *after.weight.shape[2:])
                return self._fresh(shape, after.weight[0].numel(), "expand_out", t, l)

            added.append(self._append_units(l, w.to(layer.weight), b, t, outgoing).to(self.device))
        return added

    @torch.no_grad()
    def drop_dead_units(self, t: int, added: list[torch.Tensor]) -> list[int]:
        """Remove the new units whose incoming weights are all zero (the group lasso's verdict); the number kept
        per layer."""
        kept = []
        for l, layer in enumerate(self.layers):
            rows = added[l]
            dead = rows[(layer.weight[rows].flatten(1) == 0).all(dim=1)]
            keep = torch.ones(layer.units, dtype=torch.bool, device=layer.weight.device)
            keep[dead] = False
            _set_weight(layer, layer.weight[keep], layer.bias[keep] if layer.bias is not None else None)
            after = self.layers[l + 1] if l + 1 < len(self.layers) else self.heads.heads[t]
            cols = torch.ones(after.weight.shape[1], dtype=torch.bool, device=layer.weight.device)
            cols[_cols(dead.cpu(), self.factors[l + 1]).to(cols.device)] = False
            _set_weight(after, after.weight[:, cols])
            kept.append(len(rows) - len(dead))
        return kept

    @torch.no_grad()
    def drift(self, prev) -> list[torch.Tensor]:
        """Every earlier unit's L2 distance between its incoming weights now and before the task."""
        return [(layer.weight[:w.shape[0], :w.shape[1]] - w).flatten(1).norm(dim=1)
                for layer, (w, _) in zip(self.layers, prev)]

    @torch.no_grad()
    def split(self, t: int, prev) -> list[int]:
        """Duplicate the units that drifted more than spl_thr (at most k_ex per layer, the largest drifts): the copy
        (appended) keeps the current values, the unit gets its values from before the task back."""
        cfg, counts = self.recipe.method, []
        drifts = self.drift(prev)
        chosen = []
        for d in drifts:
            over = (d > cfg.spl_thr).nonzero().view(-1)
            chosen.append(over[d[over].argsort(descending=True)[:cfg.k_ex]].sort().values)
        for l, (layer, units) in enumerate(zip(self.layers, chosen)):
            counts.append(len(units))
            if not len(units):
                continue
            w0, b0 = prev[l]
            bias = layer.bias[units].clone() if layer.bias is not None else None
            self._append_units(l, layer.weight[units].clone(), bias, t,
                               lambda after, cols: after.weight[:, _cols(units.cpu(), self.factors[l + 1])
                                                                .to(after.weight.device)].clone())
            layer.weight[units, :w0.shape[1]] = w0[units]
            if layer.bias is not None:
                layer.bias[units] = b0[units]
            if l + 1 < len(self.layers):  # the unit's outgoing weights into the earlier units above, as they were
                w1 = prev[l + 1][0]
                cols = _cols(units.cpu(), self.factors[l + 1]).to(w1.device)
                self.layers[l + 1].weight[:w1.shape[0], cols] = w1[:, cols]
        return counts

    # -- evaluation, export, accounting ----------------------------------------------------------------------
    def export(self, task_index: int) -> fx.GraphModule:
        gm = copy.deepcopy(self.model)
        units, columns = self.widths(task_index), self.layers[0].columns
        for l, name in enumerate(self.names):
            set_submodule(gm, name, self.layers[l].plain(units[l], columns))
            columns = units[l] * self.factors[l + 1]
        set_submodule(gm, self.head_target, gm.get_submodule(self.head_target).heads[task_index])
        return gm.eval()

    def num_parameters(self) -> int:
        """Every unit stored (split copies and expanded units included, dense) and every head."""
        return sum(count_parameters(layer) for layer in self.layers) + count_parameters(self.heads)

    def state(self) -> dict:
        return {"stamps": self.stamps, "shapes": [list(layer.weight.shape) for layer in self.layers],
                "heads": [list(h.weight.shape) for h in self.heads.heads], "model": self.model.state_dict()}

    def load_state(self, state: dict) -> None:
        for layer, shape in zip(self.layers, state["shapes"]):
            _set_weight(layer, layer.weight.new_zeros(shape),
                        layer.bias.new_zeros(shape[0]) if layer.bias is not None else None)
        for t, (classes, columns) in enumerate(state["heads"]):
            head = nn.Linear(columns, classes).to(self.device).requires_grad_(False)
            self.heads.heads.append(head)
        self.model.load_state_dict(state["model"])
        self.stamps = [list(s) for s in state["stamps"]]
