"""DEN, dynamically expandable networks (Yoon, Yang, Lee & Hwang, ICLR 2018, "Lifelong Learning with Dynamically
Expandable Networks"), on Fine-tune's layout: one backbone whose units grow, a head per task.  A unit is a channel
of a coupling group (`den_units.py`): its rows (a conv filter or linear neuron with its bias) in every layer
producing it, BatchNorm entries, and columns in every layer reading it.

A task after the first runs DEN's Algorithm 1 through the one training loop:

1. select   only the new head trains, with L1, the rest fixed; the units it reaches through nonzero weights,
            followed down the network to a fixed point, are the task's subnetwork;
2. retrain  only the subnetwork's weights train, with L2 and regular_lambda * 1/2 |W - W_prev|^2 toward the
            previous tasks' values; the mean training loss is measured after it;
3. expand   (when that loss is at least loss_thr) k_ex new units in every growable group train, the old ones
            fixed, with L1 and a group lasso per new unit; new units whose incoming weights all went to zero are
            dropped;
4. split    a unit whose incoming weights moved (L2) more than spl_thr from their value before the task is
            duplicated in every layer producing it: the copy takes the new values and serves the new task, the
            unit itself gets its old values back (incoming, bias, and its outgoing weights into the earlier tasks'
            units); then the units the new task owns alone (copies, new units, their connections, its head)
            retrain, the old ones fixed.
5. timestamp the task's width of every group is recorded: a task computes with the units that existed when it
            was learned (the first n of each group; later units are appended).

The first task trains the whole network with L2 and the L1 soft-threshold.  BatchNorm is one copy per task.  Old
tasks change wherever stage 2 moved a unit less than spl_thr: BWT is measured, not forced to 0.  A mid-task
checkpoint holds the network and what the finished stages decided (`progress`), and a resumed task continues in
the stage it was in.
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
from grownfx.learn.methods.den_units import DENLayer, DENNorm, unit_structure
from grownfx.learn.methods.finetune import FinetuneContinual
from grownfx.learn.training import Timer, derive_seed



class DENSettingError(UserError, ValueError):
    """A recipe setting DEN cannot honour."""


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
        super().__init__(recipe, stream, device, **hooks)
        if not isinstance(self.template, nn.Linear):
            raise SurgeryError(f"DEN: the head {self.head_target!r} is a {type(self.template).__name__}; it needs "
                               "a Linear")
        self.structure = unit_structure(self.model, self.coupling, self.head_target)
        self.names = self.structure.names
        self.layers: list[DENLayer] = []
        for name in self.names:
            layer = DENLayer(self.model.get_submodule(name))
            set_submodule(self.model, name, layer)
            self.layers.append(layer)
        self.norms: dict[str, DENNorm] = {}
        for name in self.structure.norms:
            self.norms[name] = DENNorm(self.model.get_submodule(name))
            set_submodule(self.model, name, self.norms[name])
        self.model.to(self.device)
        self.stamps: list[dict[int, int]] = []  # per task: every group's units when it was learned
        self.progress: Optional[dict] = None  # the learning task's stages so far (in mid-task checkpoints)

    # -- groups, widths and timestamps --------------------------------------------------------------------------
    def group_width(self, g: int, t: Optional[int] = None) -> Optional[int]:
        """Units of group g (task t's timestamp, or now); None for channels no DEN layer produces."""
        if t is not None and t < len(self.stamps):
            return self.stamps[t].get(g)
        producers = self.structure.producers(g)
        return self.layers[producers[0]].units if producers else None

    def widths(self, t: Optional[int] = None) -> list[int]:
        """Every layer's units (task t's, or now)."""
        return [self.group_width(g, t) for g in self.structure.out_group]

    def _stamp(self) -> dict[int, int]:
        return {g: self.group_width(g) for g in sorted(set(self.structure.out_group))}

    def _select(self, t: int) -> None:
        st = self.structure
        for l, layer in enumerate(self.layers):
            units = self.group_width(st.in_group[l], t)
            columns = layer.columns if units is None else units * st.in_factor[l]
            layer.active = (self.group_width(st.out_group[l], t), columns)
        for norm in self.norms.values():
            norm.task = t

    def _fresh(self, shape: tuple, fan_in: int, *purpose) -> torch.Tensor:
        g = torch.Generator().manual_seed(derive_seed(self.recipe.seed, "den", *purpose))
        return random_fill(shape, fan_in, g, self.layers[0].weight)

    def _den_head(self, num_classes: int, t: int) -> nn.Linear:
        columns = self.group_width(self.structure.head_group) * self.structure.head_factor
        head = nn.Linear(columns, num_classes).to(self.device)
        _set_weight(head, self._fresh((num_classes, columns), columns, "head", t),
                    self._fresh((num_classes,), columns, "head_bias", t))
        return head

    def _readers(self, g: int, t: int) -> list[tuple[nn.Module, int, Optional[int]]]:
        """(module, columns per unit, layer index or None for task t's head) for every reader of group g."""
        st = self.structure
        out = [(self.layers[l], st.in_factor[l], l) for l in st.consumers(g)]
        if st.head_group == g:
            out.append((self.heads.heads[t], st.head_factor, None))
        return out

    def _norms_on(self, g: int) -> list[DENNorm]:
        return [self.norms[n] for n, ng in self.structure.norms.items() if ng == g]

    # -- learning ----------------------------------------------------------------------------------------------
    def learn(self, task: Task, target: Optional[float], resume=None) -> TaskRecord:
        """DEN's stages for `task` (the module docstring).  `resume`: a mid-task checkpoint (LearnerPosition,
        optimiser state); load_state restored the network as it stood then and `progress`, what the finished
        stages decided (the weights before the task, the selection, the loss, the new units), so the stages
        before the checkpoint's are skipped and its own continues."""
        timer, cfg, epochs = Timer(), self.recipe.method, task_epochs(self.recipe.training)
        order = ["train", "select", "retrain", "expand", "split"]
        at = order.index(resume[0].stage) if resume is not None else -1

        def runs(stage: str) -> bool:  # not finished before the checkpoint being resumed
            return order.index(stage) >= at

        for old in self.heads.heads:
            old.requires_grad_(False)
        if resume is None:
            t = len(self.heads.heads)
            self.heads.heads.append(self._den_head(task.num_classes, t))
            for norm in self.norms.values():
                norm.add_task()
            facts: dict = {"expanded": [0] * len(self.layers), "split": [0] * len(self.layers)}
            if self.structure.fixed:
                facts["fixed"] = dict(self.structure.fixed)
            self.progress = {"facts": facts, "done": 0}
        else:
            t = len(self.heads.heads) - 1
        self.heads.task = t
        progress = self.progress
        facts = progress["facts"]

        def stage(name: str, stage_epochs: int, plan: _StagePlan, prev=None) -> None:
            progress["done"] += self._stage(task, t, name, stage_epochs, plan, prev, resume, progress["done"])

        if t == 0:
            stage("train", epochs, self._plan(t, rows=None))
        else:
            if "prev" not in progress:
                progress["prev"] = [(l.weight.detach().clone(), None if l.bias is None else l.bias.detach().clone())
                                    for l in self.layers]
            prev = progress["prev"]
            if runs("select"):
                select = cfg.select_epochs or max(1, math.ceil(self.recipe.training.epochs / 10))
                stage("select", select, self._plan(t, rows=[[] for _ in self.layers]))
                progress["chosen"] = self.subnetwork(t)
                facts["selected"] = [len(r) for r in progress["chosen"]]
            if runs("retrain"):
                stage("retrain", epochs, self._plan(t, rows=progress["chosen"], prev=prev), prev=prev)
                facts["loss"] = self.training_loss(task, t)
            if runs("expand") and facts["loss"] >= cfg.loss_thr:
                if at < order.index("expand"):
                    progress["added"] = self.expand(t)
                stage("expand", epochs, self._plan(t, rows=None, prev=prev, new_only=True,
                                                   groups=progress["added"]), prev=prev)
                facts["expanded"] = self.drop_dead_units(t, progress["added"])
            if at < order.index("split"):
                facts["split"] = self.split(t, prev)
            if any(facts["split"]):
                stage("split", epochs, self._plan(t, rows=None, prev=prev, new_only=True), prev=prev)
        before = self.widths(len(self.stamps) - 1) if self.stamps else self.widths()
        self.stamps.append(self._stamp())
        self.progress = None
        for norm in self.norms.values():
            norm.finish()
        self.heads.heads[t].requires_grad_(False)
        val = self.evaluate(t, task.val)
        facts["units"] = self.widths()
        return TaskRecord(index=t, name=task.name, num_classes=task.num_classes, target=target, val_acc=val,
                          val_history=[val], params_stored=self.num_parameters(),
                          params_task=count_parameters(self.export(t)),
                          time_s=timer.seconds + (resume[0].elapsed if resume else 0.0), epochs=progress["done"],
                          grew=bool(any(facts["expanded"]) or any(facts["split"])),
                          growth={n: a - b for n, a, b in zip(self.names, self.widths(), before) if a > b},
                          extra=facts)

    def _plan(self, t: int, rows, prev=None, new_only: bool = False,
              groups: Optional[list[torch.Tensor]] = None) -> _StagePlan:
        """rows None: every unit trains (new_only: only the entries no earlier task reads); else rows[l] = the
        units of layer l that train, with their columns from the chosen units of the group they read (all
        columns of the network input).  The learning task's BatchNorm copies are its own: they train with the
        units they scale."""
        st = self.structure
        trains: dict[nn.Parameter, torch.Tensor] = {}
        chosen = {st.out_group[l]: r for l, r in enumerate(rows)} if rows is not None else {}
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
                below = chosen.get(st.in_group[l])
                cols = torch.arange(layer.columns, device=w.device) if below is None else \
                    _cols(below, st.in_factor[l]).to(w.device)
                if len(r) and len(cols):
                    mask[r.view(-1, 1), cols.view(1, -1)] = True
            trains[w] = mask
            if layer.bias is not None:
                trains[layer.bias] = mask.flatten(1).any(dim=1) if not new_only else \
                    torch.arange(layer.units, device=w.device) >= prev[l][0].shape[0]
        for name, g in st.norms.items():
            bn = self.norms[name].copies[-1]
            entries = torch.ones(bn.num_features, dtype=torch.bool, device=self.device)
            if rows is not None and g in chosen:
                entries[:] = False
                entries[torch.as_tensor(chosen[g], dtype=torch.long, device=self.device)] = True
            for p in bn.parameters():
                trains[p] = entries
        head = self.heads.heads[t]
        for p in head.parameters():
            trains[p] = torch.ones_like(p, dtype=torch.bool)
        weights = {layer.weight for layer in self.layers} | {head.weight}
        group_rows = [(self.layers[l].weight, g) for l, g in enumerate(groups or [])]
        return _StagePlan(trains, self.recipe.method.l1_lambda, weights, group_rows, self.recipe.method.gl_lambda)

    def _stage(self, task: Task, t: int, name: str, epochs: int, plan: _StagePlan, prev=None, resume=None,
               before: int = 0) -> int:
        cfg = self.recipe.method
        params = [p for p, m in plan.trains.items() if bool(m.any())]
        for module in [*self.layers, *self.norms.values()]:
            module.requires_grad_(False)
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
                                  name=name, seed=(self.recipe.seed, self.name, t), epochs=epochs, resume=resume,
                                  epochs_before=before, terms=StepTerms(penalty=penalty, after_step=plan.after_step))

    @torch.no_grad()
    def subnetwork(self, t: int) -> list[list[int]]:
        """The units of every layer task t's head reaches through nonzero weights, followed down the network
        (breadth-first, to a fixed point: a residual group is reached from every layer reading it)."""
        st = self.structure
        head = self.heads.heads[t].weight
        reached = {g: torch.zeros(self.group_width(g), dtype=torch.bool, device=head.device)
                   for g in set(st.out_group)}
        reached[st.head_group] |= (head.view(head.shape[0], -1, st.head_factor) != 0).any(dim=2).any(dim=0)
        changed = True
        while changed:
            changed = False
            for l in range(len(self.layers) - 1, -1, -1):
                below = st.in_group[l]
                units = reached[st.out_group[l]].nonzero().view(-1)
                if below not in reached or not len(units):
                    continue
                w = self.layers[l].weight[units]
                w = w.reshape(len(units), self.group_width(below), -1)
                now = reached[below] | (w != 0).any(dim=2).any(dim=0)
                changed |= not torch.equal(now, reached[below])
                reached[below] = now
        return [reached[g].nonzero().view(-1).tolist() for g in st.out_group]

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
    def _append_units(self, g: int, rows: Callable[[int], tuple], t: int,
                      outgoing: Callable[[nn.Module, torch.Tensor, Optional[int]], torch.Tensor],
                      norm_like: Optional[torch.Tensor]) -> torch.Tensor:
        """Append units to group g: `rows(l)` gives producer l's new (weight rows, bias); `outgoing(module,
        columns, l)` the new columns' values in every reader (task t's head the only head reading the newest
        units); the learning task's BatchNorm copies get entries copied from `norm_like` (None: the identity).
        Returns the new units' indices."""
        start = self.group_width(g)
        for l in self.structure.producers(g):
            layer = self.layers[l]
            weight, bias = rows(l)
            _set_weight(layer, torch.cat([layer.weight, weight.to(layer.weight)]),
                        torch.cat([layer.bias, bias.to(layer.bias)]) if layer.bias is not None else None)
        index = torch.arange(start, self.group_width(g))
        for module, factor, l in self._readers(g, t):
            cols = outgoing(module, _cols(index, factor), l).to(module.weight)
            _set_weight(module, torch.cat([module.weight, cols], dim=1))
        for norm in self._norms_on(g):
            norm.append(None if norm_like is None else norm_like.to(self.device), len(index))
        return index

    def expand(self, t: int) -> list[torch.Tensor]:
        """k_ex new units in every group DEN grows (torch's default init), wired to every layer reading it; the
        new units' indices per layer (empty for a layer whose units do not grow)."""
        k, added = self.recipe.method.k_ex, {}
        for g in self.structure.growable:
            def rows(l: int) -> tuple:
                w = self.layers[l].weight
                fan_in = w[0].numel()
                return (self._fresh((k, *w.shape[1:]), fan_in, "expand", t, l),
                        self._fresh((k,), fan_in, "expand_bias", t, l))

            def outgoing(module: nn.Module, cols: torch.Tensor, l: Optional[int], g=g) -> torch.Tensor:
                shape = (module.weight.shape[0], len(cols), *module.weight.shape[2:])
                return self._fresh(shape, module.weight[0].numel(), "expand_out", t, g, -1 if l is None else l)

            added[g] = self._append_units(g, rows, t, outgoing, None).to(self.device)
        empty = torch.zeros(0, dtype=torch.long, device=self.device)
        return [added.get(g, empty) for g in self.structure.out_group]

    @torch.no_grad()
    def drop_dead_units(self, t: int, added: list[torch.Tensor]) -> list[int]:
        """Remove the new units whose incoming weights are all zero in every layer producing them (the group
        lasso's verdict); the number kept per layer."""
        st, kept = self.structure, {}
        for g in st.growable:
            producers = st.producers(g)
            rows = added[producers[0]]
            dead = torch.ones(len(rows), dtype=torch.bool, device=self.device)
            for l in producers:
                dead &= (self.layers[l].weight[rows].flatten(1) == 0).all(dim=1)
            dead = rows[dead]
            keep = torch.ones(self.group_width(g), dtype=torch.bool, device=self.device)
            keep[dead] = False
            for l in producers:
                layer = self.layers[l]
                _set_weight(layer, layer.weight[keep], layer.bias[keep] if layer.bias is not None else None)
            for module, factor, _ in self._readers(g, t):
                cols = torch.ones(module.weight.shape[1], dtype=torch.bool, device=self.device)
                cols[_cols(dead.cpu(), factor).to(self.device)] = False
                _set_weight(module, module.weight[:, cols])
            for norm in self._norms_on(g):
                norm.keep(keep)
            kept[g] = len(rows) - len(dead)
        return [kept.get(g, 0) for g in st.out_group]

    @torch.no_grad()
    def drift(self, prev) -> dict[int, torch.Tensor]:
        """Every earlier unit's L2 distance between its incoming weights (in every layer producing it) now and
        before the task, per group DEN grows."""
        out = {}
        for g in self.structure.growable:
            sq = [(self.layers[l].weight[:w.shape[0], :w.shape[1]] - w).flatten(1).pow(2).sum(dim=1)
                  for l in self.structure.producers(g) for w in [prev[l][0]]]
            out[g] = torch.stack(sq).sum(dim=0).sqrt()
        return out

    @torch.no_grad()
    def split(self, t: int, prev) -> list[int]:
        """Duplicate the units that drifted more than spl_thr (at most k_ex per group, the largest drifts): the
        copy (appended) keeps the current values, the unit gets its values from before the task back (its
        incoming weights and bias in every layer producing it, its outgoing weights into the earlier units of
        every layer reading it).  The units split per layer."""
        cfg, st, counts = self.recipe.method, self.structure, {}
        for g, d in self.drift(prev).items():
            over = (d > cfg.spl_thr).nonzero().view(-1)
            units = over[d[over].argsort(descending=True)[:cfg.k_ex]].sort().values
            counts[g] = len(units)
            if not len(units):
                continue
            current = {l: (self.layers[l].weight[units].clone(),
                           self.layers[l].bias[units].clone() if self.layers[l].bias is not None else None)
                       for l in st.producers(g)}
            moved = units.cpu()
            self._append_units(g, lambda l: current[l], t,
                               lambda module, cols, l: module.weight[:, _cols(moved, cols.numel() // len(moved))
                                                                     .to(module.weight.device)].clone(), units)
            for l in st.producers(g):
                layer, (w0, b0) = self.layers[l], prev[l]
                layer.weight[units, :w0.shape[1]] = w0[units]
                if layer.bias is not None:
                    layer.bias[units] = b0[units]
            for module, factor, l in self._readers(g, t):
                if l is not None:  # the unit's outgoing weights into the earlier units above, as they were
                    w1 = prev[l][0]
                    cols = _cols(moved, factor).to(w1.device)
                    module.weight[:w1.shape[0], cols] = w1[:, cols]
        return [counts.get(g, 0) for g in st.out_group]

    # -- evaluation, export, accounting ----------------------------------------------------------------------
    def export(self, task_index: int) -> fx.GraphModule:
        gm = copy.deepcopy(self.model)
        self._select(task_index)
        for name, layer in zip(self.names, self.layers):
            set_submodule(gm, name, layer.plain(*layer.active))
        for name, norm in self.norms.items():
            set_submodule(gm, name, copy.deepcopy(norm.copies[task_index]))
        set_submodule(gm, self.head_target, gm.get_submodule(self.head_target).heads[task_index])
        return gm.eval()

    def num_parameters(self) -> int:
        """Every unit stored (split copies and expanded units included, dense), every task's BatchNorm copies
        and every head."""
        return (sum(count_parameters(layer) for layer in self.layers) + count_parameters(self.heads)
                + sum(count_parameters(norm.copies) for norm in self.norms.values()))

    def state(self) -> dict:
        return {"stamps": [sorted(s.items()) for s in self.stamps],
                "shapes": [list(layer.weight.shape) for layer in self.layers],
                "norms": {n: [c.num_features for c in norm.copies] for n, norm in self.norms.items()},
                "heads": [list(h.weight.shape) for h in self.heads.heads], "model": self.model.state_dict(),
                "progress": self.progress}

    def load_state(self, state: dict) -> None:
        for layer, shape in zip(self.layers, state["shapes"]):
            _set_weight(layer, layer.weight.new_zeros(shape),
                        layer.bias.new_zeros(shape[0]) if layer.bias is not None else None)
        for t, (classes, columns) in enumerate(state["heads"]):
            head = nn.Linear(columns, classes).to(self.device).requires_grad_(False)
            self.heads.heads.append(head)
        for name, norm in self.norms.items():
            for width in state.get("norms", {}).get(name, []):
                norm.add_task()
                norm.append(None, width - norm.copies[-1].num_features)  # the shape; values load below
            norm.finished = len(state["stamps"])  # a mid-task checkpoint's learning copy is not finished
            norm.train(norm.training)
        self.model.to(self.device)
        self.model.load_state_dict(state["model"])
        self.progress = state.get("progress")
        groups = self.structure.out_group  # a run of the chain-only DEN stamped each layer's units
        self.stamps = [dict(zip(groups, s)) if s and isinstance(s[0], int) else {int(g): int(w) for g, w in s}
                       for s in state["stamps"]]
