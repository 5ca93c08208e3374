"""APD, additive parameter decomposition (Yoon et al., ICLR 2020, "Scalable and Order-robust Continual Learning
with Additive Parameter Decomposition"), on Fine-tune's layout: one backbone, a head per task.

Every Conv2d and Linear of the backbone computes task t with

    theta_t = sigma * sigmoid(m_t) + tau_t        (m_t: one value per output unit, broadcast over its weights)

sigma shared by all tasks, m_t task t's mask, tau_t task t's sparse task-adaptive weights, and a bias per task
(jaehong31/APD keeps biases task-specific).  Normalisation layers (BatchNorm, LayerNorm, GroupNorm) are kept one
copy per task.  Any other layer with parameters is refused by name.  Learning task t trains sigma, m_t, b_t, the
head, and every tau_j (j <= t) under

    CE + lam1 * sum_{j<=t} |tau_j|_1 + lam2 * sum_{j<t} 1/2 |theta_j - theta_j^start|^2
       + wd * (1/2 |tau_t|^2 + 1/2 |m_t|^2 [+ 1/2 |sigma|^2 on the first task])

theta_j^start being task j's weights when task t began (the retroactive update: old tasks move, held near where
they were).  After each task every tau_j is hard-thresholded at lam1 (|tau| <= lam1 -> 0), as APD's code does
before counting and testing.

Every clustering_iter tasks the tasks' full adaptive weights (tau_j plus the locally shared part it had) are
clustered per layer by k-means into k = k_centroids * (t + 1) / clustering_iter groups (APD's hierarchical knowledge
consolidation).  In a group of two or more tasks, an entry whose values over the members differ by at most e_gap
becomes shared: the group's locally shared weight holds their midrange there (hard-thresholded at lam1, as APD's code
does before testing and counting), and each member's tau keeps only its unshared entries.  Task j then computes
with sigma * sigmoid(m_j) + tau_j + shared_{g(j)}; its weight moved by at most e_gap / 2 + lam1 per entry, and by
nothing where the members agreed exactly.  The shared parts are fixed afterwards; the next clustering re-decomposes
every task from its full adaptive weights, starting from the previous centroids.
"""

from __future__ import annotations

import copy
import math
from typing import Optional

import torch
import torch.nn.functional as F
from torch import fx, nn

from grownfx.data import Task
from grownfx.engine.errors import SurgeryError
from grownfx.engine.rewrite import set_submodule
from grownfx.learn.guards import NonFiniteError
from grownfx.learn.methods.base import StepTerms
from grownfx.learn.methods.finetune import FinetuneContinual
from grownfx.learn.training import derive_seed

_NORMS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.LayerNorm, nn.GroupNorm)


def _is_parameter(module: nn.Module, target: str) -> bool:
    try:
        module.get_parameter(target)
        return True
    except AttributeError:
        return False


class APDLayer(nn.Module):
    """A Conv2d or Linear whose weight is decomposed: sigma (shared), a mask per output unit and tau per task,
    a bias per task (when the layer has one).  `task` picks the task that computes."""

    def __init__(self, layer: nn.Module):
        super().__init__()
        if isinstance(layer, nn.Conv2d):
            self.kind = "conv"
            self.conv = dict(stride=layer.stride, padding=layer.padding, dilation=layer.dilation, groups=layer.groups)
            if layer.padding_mode != "zeros":
                raise SurgeryError(f"APD: Conv2d with padding_mode={layer.padding_mode!r} is not handled")
        else:
            self.kind = "linear"
        self.sigma = nn.Parameter(layer.weight.detach().clone())
        self.has_bias = layer.bias is not None
        self._bias0 = layer.bias.detach().clone() if self.has_bias else None
        self.masks = nn.ParameterList()
        self.taus = nn.ParameterList()
        self.biases = nn.ParameterList()
        self.shared = nn.ParameterList()  # the locally shared parts of the last clustering (fixed)
        self.groups: list[int] = []  # task j's index into shared, -1 when it has none
        self.centroids: Optional[torch.Tensor] = None  # the last clustering's, where the next one starts
        self.task = 0

    def add_task(self, generator: torch.Generator) -> None:
        """Task t's mask (APD: variance-scaling init, so sigmoid(m) ~ 0.5), tau = sigma (APD's code initialises the
        task-adaptive weights with the shared ones) and bias (the latest task's, the layer's own for the first)."""
        out = self.sigma.shape[0]
        m = torch.randn(out, generator=generator) / math.sqrt(out)
        self.masks.append(nn.Parameter(m.to(self.sigma)))
        self.taus.append(nn.Parameter(self.sigma.detach().clone()))
        if self.has_bias:
            before = self.biases[-1] if len(self.biases) else self._bias0
            self.biases.append(nn.Parameter(before.detach().clone()))
        self.groups.append(-1)

    def theta(self, t: int) -> torch.Tensor:
        """Task t's weight: sigma * sigmoid(m_t) + tau_t (+ its group's locally shared part)."""
        mask = torch.sigmoid(self.masks[t]).view(-1, *([1] * (self.sigma.dim() - 1)))
        theta = self.sigma * mask + self.taus[t]
        return theta + self.shared[self.groups[t]] if self.groups[t] >= 0 else theta

    def full_tau(self, t: int) -> torch.Tensor:
        """Task t's whole adaptive weight: tau_t plus its locally shared part."""
        tau = self.taus[t].detach()
        return tau + self.shared[self.groups[t]].detach() if self.groups[t] >= 0 else tau.clone()

    @torch.no_grad()
    def consolidate(self, k: int, e_gap: float, lam1: float, generator: torch.Generator) -> list[int]:
        """APD's k-means clustering of every task's full tau into k groups and their decomposition into locally
        shared parts plus residual taus (the module docstring); returns each task's group."""
        full = torch.stack([self.full_tau(j) for j in range(len(self.taus))])
        assignment, self.centroids = kmeans(full.flatten(1), k, generator, self.centroids)
        self.shared = nn.ParameterList()
        self.groups = [-1] * len(self.taus)
        for c in range(k):
            members = [j for j in range(len(self.taus)) if int(assignment[j]) == c]
            if len(members) < 2:  # a group of one keeps its whole tau
                for j in members:
                    self.taus[j].copy_(full[j])
                continue
            high, low = full[members].amax(0), full[members].amin(0)
            agree = (high - low) <= e_gap
            local = torch.where(agree, (high + low) / 2, torch.zeros_like(high))
            local = local.masked_fill(local.abs() <= lam1, 0.0)
            self.shared.append(nn.Parameter(local, requires_grad=False))
            for j in members:
                self.taus[j].copy_(full[j].masked_fill(agree, 0.0))
                self.groups[j] = len(self.shared) - 1
        return [int(a) for a in assignment]

    def forward(self, x):
        w, b = self.theta(self.task), self.biases[self.task] if self.has_bias else None
        if self.kind == "conv":
            return F.conv2d(x, w, b, **self.conv)
        return F.linear(x, w, b)

    def plain(self, t: int) -> nn.Module:
        """A plain Conv2d/Linear computing task t."""
        w = self.theta(t).detach().clone()
        if self.kind == "conv":
            out = nn.Conv2d(w.shape[1] * self.conv["groups"], w.shape[0], tuple(w.shape[2:]), bias=self.has_bias,
                            **self.conv)
        else:
            out = nn.Linear(w.shape[1], w.shape[0], bias=self.has_bias)
        out.weight = nn.Parameter(w)
        if self.has_bias:
            out.bias = nn.Parameter(self.biases[t].detach().clone())
        return out.to(w.device)

    def stored(self) -> int:
        """Values stored: sigma, every mask and bias, and the nonzero entries of every tau and shared part."""
        return (self.sigma.numel() + sum(m.numel() for m in self.masks) + sum(b.numel() for b in self.biases)
                + sum(int(torch.count_nonzero(t)) for t in (*self.taus, *self.shared)))


def kmeans(points: torch.Tensor, k: int, generator: torch.Generator, previous: Optional[torch.Tensor] = None,
           iterations: int = 100) -> tuple[torch.Tensor, torch.Tensor]:
    """Lloyd's k-means of the rows of `points` as APD's code runs it: centroids start at k rows drawn at random,
    the first ones replaced by the previous clustering's centroids when there are any; 100 iterations (stopping
    early once the assignment repeats: nothing moves after that); an empty cluster keeps its centroid.  Returns
    (assignment per row, centroids)."""
    centroids = points[torch.randperm(len(points), generator=generator)[:k]].clone()
    if previous is not None:
        kept = min(len(previous), len(centroids))
        centroids[:kept] = previous[:kept]
    assignment = None
    for _ in range(iterations):
        nearest = torch.cdist(points.double(), centroids.double()).argmin(1)
        if assignment is not None and torch.equal(nearest, assignment):
            break
        assignment = nearest
        for c in range(k):
            if bool((assignment == c).any()):
                centroids[c] = points[assignment == c].mean(0)
    return assignment, centroids


class PerTask(nn.Module):
    """A normalisation layer kept one copy per task (a new task starts from the latest copy)."""

    def __init__(self, layer: nn.Module):
        super().__init__()
        self.template = [layer]  # not a submodule: its parameters are not stored
        self.copies = nn.ModuleList()
        self.task = 0

    def add_task(self) -> None:
        source = self.copies[-1] if len(self.copies) else self.template[0]
        self.copies.append(copy.deepcopy(source))

    def forward(self, x):
        return self.copies[self.task](x)


class APDContinual(FinetuneContinual):
    name = "apd"

    def __init__(self, recipe, stream, device, **hooks):
        super().__init__(recipe, stream, device, **hooks)
        self.layers: dict[str, APDLayer] = {}
        self.norms: dict[str, PerTask] = {}
        heads = f"{self.head_target}."
        for name, module in list(self.model.named_modules()):
            if not name or name == self.head_target or name.startswith(heads):
                continue
            own = list(module.parameters(recurse=False))
            if isinstance(module, (nn.Conv2d, nn.Linear)) and type(module) in (nn.Conv2d, nn.Linear):
                self.layers[name] = APDLayer(module)
            elif isinstance(module, _NORMS):
                self.norms[name] = PerTask(module)
            elif own:
                raise SurgeryError(f"APD decomposes Conv2d and Linear weights and keeps norms per task; "
                                   f"{type(module).__name__} {name!r} holds parameters it cannot handle")
        for node in self.model.graph.nodes:
            if node.op == "get_attr" and _is_parameter(self.model, node.target):
                raise SurgeryError(f"APD: the graph reads the parameter {node.target!r} directly; it decomposes only "
                                   "Conv2d and Linear weights")
        for name, layer in {**self.layers, **self.norms}.items():
            set_submodule(self.model, name, layer)
        self.model.to(self.device)
        self.anchors: dict[tuple[str, int], torch.Tensor] = {}  # theta_j when the learning task began
        self.clusters: dict[str, list[int]] = {}  # the groups of the clustering after the latest task, if any

    def learn(self, task: Task, target, resume=None):
        try:
            return super().learn(task, target, resume)
        except NonFiniteError as exc:  # the loop's advice names the learning rate; lam2 matters as much
            raise NonFiniteError(f"{exc}; or lower method.lam2 ({self.recipe.method.lam2:g}): the retroactive "
                                 "penalty diverges under SGD once lr x lam2 passes 2 (APD trains with Adam 1e-3)") \
                from exc

    # -- the tasks' parameters -----------------------------------------------------------------------------
    def _add_task_parameters(self, t: int) -> None:
        for name, layer in self.layers.items():
            layer.add_task(torch.Generator().manual_seed(derive_seed(self.recipe.seed, "apd_mask", t, name)))
        for norm in self.norms.values():
            norm.add_task()
        self.model.to(self.device)

    def _select(self, t: int) -> None:
        for module in [*self.layers.values(), *self.norms.values()]:
            module.task = t

    def begin_task(self, task: Task, t: int, resumed: bool) -> None:
        if not resumed:  # a mid-task checkpoint holds the task's parameters and anchors already
            self._add_task_parameters(t)
        for layer in self.layers.values():
            layer.sigma.requires_grad_(True)
            for j, (m, tau) in enumerate(zip(layer.masks, layer.taus)):
                m.requires_grad_(j == t)
                tau.requires_grad_(True)  # APD retrains the earlier tasks' adaptive weights (retroactive update)
            for j, b in enumerate(layer.biases):
                b.requires_grad_(j == t)
        for norm in self.norms.values():
            for j, c in enumerate(norm.copies):
                c.requires_grad_(j == t)
        if not resumed:
            with torch.no_grad():
                self.anchors = {(n, j): layer.theta(j).detach().clone() for n, layer in self.layers.items()
                                for j in range(t)}

    def step_terms(self, task: Task, t: int) -> Optional[StepTerms]:
        return StepTerms(penalty=lambda: self.penalty(t))

    def penalty(self, t: int) -> torch.Tensor:
        """APD's regularisers while task t learns (the module docstring's formula)."""
        cfg = self.recipe.method
        terms = []
        for name, layer in self.layers.items():
            terms.append(cfg.weight_decay * 0.5 * (layer.taus[t].pow(2).sum() + layer.masks[t].pow(2).sum()))
            if t == 0:
                terms.append(cfg.weight_decay * 0.5 * layer.sigma.pow(2).sum())
            terms.append(cfg.lam1 * sum(tau.abs().sum() for tau in layer.taus[:t + 1]))
            terms.extend(cfg.lam2 * 0.5 * (layer.theta(j) - self.anchors[(name, j)]).pow(2).sum() for j in range(t))
        return torch.stack(terms).sum()

    def retroactive(self, t: int) -> torch.Tensor:
        """lam2 * sum_{j<t} 1/2 |theta_j - theta_j^start|^2 alone (what holds the old tasks)."""
        lam2 = self.recipe.method.lam2
        total = [lam2 * 0.5 * (layer.theta(j) - self.anchors[(n, j)]).pow(2).sum()
                 for n, layer in self.layers.items() for j in range(t)]
        return torch.stack(total).sum() if total else torch.zeros(())

    @torch.no_grad()
    def end_task(self, task: Task, t: int) -> None:
        cfg = self.recipe.method
        for layer in self.layers.values():
            for tau in layer.taus:
                tau.masked_fill_(tau.abs() <= cfg.lam1, 0.0)
        self.anchors = {}
        self.clusters = {}
        if cfg.clustering_iter and (t + 1) % cfg.clustering_iter == 0:
            self.consolidate(t)

    @torch.no_grad()
    def consolidate(self, t: int) -> dict[str, list[int]]:
        """APD's hierarchical knowledge consolidation after task t (the module docstring)."""
        cfg = self.recipe.method
        k = min(cfg.k_centroids * (t + 1) // cfg.clustering_iter, t + 1)
        self.clusters = {name: layer.consolidate(k, cfg.e_gap, cfg.lam1, torch.Generator().manual_seed(
            derive_seed(self.recipe.seed, "apd_kmeans", t, name))) for name, layer in self.layers.items()}
        return self.clusters

    def record_extra(self, t: int) -> dict:
        taus = [tau for layer in self.layers.values() for tau in layer.taus]
        nonzero = sum(int(torch.count_nonzero(tau)) for tau in taus)
        shared = sum(int(torch.count_nonzero(s)) for layer in self.layers.values() for s in layer.shared)
        extra = {"tau_nonzero": nonzero, "tau_density": nonzero / max(sum(tau.numel() for tau in taus), 1),
                 "shared_nonzero": shared}
        if self.clusters:
            extra["clusters"] = self.clusters
        return extra

    # -- evaluation, export, accounting ----------------------------------------------------------------------
    def export(self, task_index: int) -> fx.GraphModule:
        gm = copy.deepcopy(self.model)
        for name, layer in self.layers.items():
            set_submodule(gm, name, layer.plain(task_index))
        for name, norm in self.norms.items():
            set_submodule(gm, name, copy.deepcopy(norm.copies[task_index]))
        set_submodule(gm, self.head_target, gm.get_submodule(self.head_target).heads[task_index])
        return gm.eval()

    def num_parameters(self) -> int:
        """sigma (dense), every task's masks and biases, the nonzero entries of the taus (values only: a sparse
        store's indices are not counted), the norms' per-task copies, the heads and any parameter-free rest."""
        return (sum(layer.stored() for layer in self.layers.values())
                + sum(p.numel() for norm in self.norms.values() for p in norm.copies.parameters())
                + sum(p.numel() for p in self.heads.parameters()))

    def state(self) -> dict:
        return {**super().state(), "tasks": len(self.heads.heads),
                "groups": {n: list(layer.groups) for n, layer in self.layers.items()},
                "centroids": {n: layer.centroids for n, layer in self.layers.items() if layer.centroids is not None},
                "anchors": [[n, j, theta] for (n, j), theta in self.anchors.items()]}  # non-empty mid-task

    def load_state(self, state: dict) -> None:
        for t in range(state["tasks"]):
            self._add_task_parameters(t)
        for name, layer in self.layers.items():  # the shared parts' shapes, before their values load
            layer.groups = list(state.get("groups", {}).get(name, [-1] * state["tasks"]))
            layer.shared = nn.ParameterList(nn.Parameter(torch.zeros_like(layer.sigma), requires_grad=False)
                                            for _ in range(max(layer.groups, default=-1) + 1))
            layer.centroids = state.get("centroids", {}).get(name)
        super().load_state(state)
        self.anchors = {(n, int(j)): theta.to(self.device) for n, j, theta in state.get("anchors", [])}
