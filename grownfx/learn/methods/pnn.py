"""Progressive neural networks (Rusu et al. 2016): a new column per task, earlier columns frozen.

Column 1 is the backbone at `first_column_width` (the full backbone by default: the paper's PNN row starts at
1x), every later column the backbone slimmed to `column_width` (`grownfx.engine.prepare.slim`); all share one fx graph.
The columns run in lock-step over it: every conv/linear layer of column k (except those fed by the input
itself, which every column sees alike) adds lateral adapters applied to what its counterparts in the
earlier columns receive (Rusu's h^(<k)_{i-1}).  An adapter is the layer's own type with the same kernel,
stride, padding and dilation, so its output has the layer's shape.

`laterals='shared'` (default): column k has one adapter reading column 1 and one reading the mean of columns
2..k-1 (Rusu's per-column adapters with their weights tied), so every task after the second adds the same
number of parameters: the size grows linearly, as in the paper's Table 2.  `laterals='per_column'`: one
adapter per earlier column, Rusu's exact form, whose size grows quadratically with the number of tasks.
"""

from __future__ import annotations

import copy
from typing import Optional

import torch
from torch import fx, nn

from grownfx.data import Task, TaskData
from grownfx.learn.budget import task_epochs
from grownfx.learn.records import TaskRecord
from grownfx.models import build_backbone
from grownfx.engine.net import count_parameters
from grownfx.engine.prepare import slim
from grownfx.learn.training import Timer, derive_seed
from grownfx.learn.methods.base import Trainer, backbone, evaluate_with, example_input

_LAYERS = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)


def adapter_like(layer: nn.Module, source: nn.Module) -> nn.Module:
    """A bias-free layer of `layer`'s kind and geometry taking what `source` (its counterpart) takes."""
    if isinstance(layer, nn.Linear):
        return nn.Linear(source.in_features, layer.out_features, bias=False)
    groups = layer.groups if source.in_channels == layer.in_channels else 1
    return type(layer)(source.in_channels, layer.out_channels, layer.kernel_size, layer.stride, layer.padding,
                       layer.dilation, groups, bias=False, padding_mode=layer.padding_mode)


def _key(k: int, src: str, target: str) -> str:
    return f"c{k}_from{src}__" + target.replace(".", "_")


def _signature(gm: fx.GraphModule) -> list[tuple]:
    return [(n.op, n.target, n.name) for n in gm.graph.nodes]


class ProgressiveNet(nn.Module):
    """Columns (plain fx GraphModules of one structure) with lateral adapters, run in lock-step."""

    def __init__(self, laterals: str = "shared"):
        super().__init__()
        self.mode = laterals
        self.columns = nn.ModuleList()
        self.laterals = nn.ModuleDict()
        self.frozen = 0  # columns [0, frozen) are finished: eval mode, no gradients
        self.lateral_targets: dict[str, str] = {}  # layer -> name of its input node
        self._feeds: set[str] = set()  # nodes earlier columns must compute (what laterals read)

    def sources(self, k: int) -> list[tuple[str, list[int]]]:
        """Lateral adapters of column k: (key part, earlier columns it reads).  Column 0 (the first, possibly
        wider) always has its own; the others share one (`shared`, fed their mean) or have one each."""
        if k == 0:
            return []
        rest = list(range(1, k))
        if self.mode == "shared":
            return [("0", [0])] + ([("mean", rest)] if rest else [])
        return [(str(j), [j]) for j in range(k)]

    def add_column(self, gm: fx.GraphModule) -> int:
        k = len(self.columns)
        if k == 0:
            self._analyse(gm)
        elif _signature(gm) != _signature(self.columns[0]):
            raise ValueError("a new PNN column does not have the first column's graph")
        self.columns.append(gm)
        for target in self.lateral_targets:
            for src, cols in self.sources(k):
                source = self.columns[cols[0]].get_submodule(target)
                self.laterals[_key(k, src, target)] = adapter_like(gm.get_submodule(target), source)
        return k

    def _analyse(self, gm: fx.GraphModule) -> None:
        fed = []
        for n in gm.graph.nodes:
            if n.op == "call_module" and isinstance(gm.get_submodule(n.target), _LAYERS):
                src = n.args[0]
                if isinstance(src, fx.Node) and src.op != "placeholder":
                    self.lateral_targets[n.target] = src.name
                    fed.append(src)
        seen, stack = set(), fed
        while stack:  # every ancestor of a lateral's input
            n = stack.pop()
            if n.name not in seen:
                seen.add(n.name)
                stack.extend(n.all_input_nodes)
        self._feeds = seen

    def column_parameters(self, k: int) -> list[nn.Parameter]:
        lat = [p for key, m in self.laterals.items() if key.startswith(f"c{k}_") for p in m.parameters()]
        return list(self.columns[k].parameters()) + lat

    def freeze(self, k: int) -> None:
        for p in self.column_parameters(k):
            p.requires_grad_(False)
        self.frozen = k + 1
        self.train(self.training)

    def train(self, mode: bool = True):
        super().train(mode)
        for c in self.columns[: self.frozen]:
            c.eval()  # finished columns keep their norm statistics
        return self

    def forward(self, x: torch.Tensor, task: int) -> torch.Tensor:
        envs: list[dict] = [{} for _ in range(task + 1)]
        grad = torch.is_grad_enabled()
        for nodes in zip(*(c.graph.nodes for c in self.columns[: task + 1])):
            if nodes[0].op == "output":
                return fx.node.map_arg(nodes[task].args[0], lambda n: envs[task][n.name])
            for k, node in enumerate(nodes):
                if k < task and node.name not in self._feeds:
                    continue
                with torch.set_grad_enabled(grad and k >= self.frozen):
                    envs[k][node.name] = self._run(node, k, envs, x)
        raise RuntimeError("the column graph has no output")

    def _run(self, node: fx.Node, k: int, envs: list[dict], x: torch.Tensor):
        env, column = envs[k], self.columns[k]
        args = fx.node.map_arg(node.args, lambda n: env[n.name])
        kwargs = fx.node.map_arg(node.kwargs, lambda n: env[n.name])
        if node.op == "placeholder":
            return x
        if node.op == "get_attr":
            obj = column
            for part in node.target.split("."):
                obj = getattr(obj, part)
            return obj
        if node.op == "call_function":
            return node.target(*args, **kwargs)
        if node.op == "call_method":
            return getattr(args[0], node.target)(*args[1:], **kwargs)
        out = column.get_submodule(node.target)(*args, **kwargs)
        feed = self.lateral_targets.get(node.target)
        for src, cols in self.sources(k) if feed is not None else ():
            h = envs[cols[0]][feed]
            for j in cols[1:]:
                h = h + envs[j][feed]
            out = out + self.laterals[_key(k, src, node.target)](h / len(cols) if len(cols) > 1 else h)
        return out


class _TaskView(nn.Module):
    def __init__(self, pnn: ProgressiveNet, task: int):
        super().__init__()
        self.pnn, self.task = pnn, task

    def forward(self, x):
        return self.pnn(x, self.task)


class PNNContinual:
    """One slimmed column per task with lateral adapters; old columns never change (zero forgetting)."""

    name = "pnn"

    def __init__(self, recipe, stream, device: torch.device, *, on_epoch=None,
                 should_stop=lambda: False, checkpoint=None, dist=None, **_):
        self.recipe, self.stream, self.device = recipe, stream, torch.device(device)
        self.trainer = Trainer(recipe.training, self.device, dist, on_epoch=on_epoch, should_stop=should_stop,
                               checkpoint=checkpoint)
        self.net = ProgressiveNet(recipe.method.laterals).to(self.device)
        self.full_params = count_parameters(build_backbone(recipe.model.builder, stream.tasks[0].num_classes,
                                                           recipe.model.kwargs, recipe.code_dir))
        self.num_classes: list[int] = []

    def _column(self, num_classes: int, k: int) -> fx.GraphModule:
        cfg = self.recipe.method
        torch.manual_seed(derive_seed(self.recipe.seed, "pnn", k))
        # the first column from model.weights when given (a fresh classifier); later columns fresh
        model = backbone(self.recipe, num_classes)[0] if k == 0 else build_backbone(
            self.recipe.model.builder, num_classes, self.recipe.model.kwargs, self.recipe.code_dir)
        gm, *_ = slim(model, example_input(self.stream.input_shape), cfg.first_column_width if k == 0 else
                      cfg.column_width, leaf_modules=self.recipe.model.leaf_modules, seed=self.recipe.seed,
                      output=self.recipe.model.output, head=self.recipe.model.head)
        return gm

    def _add(self, num_classes: int) -> int:
        k = len(self.num_classes)
        torch.manual_seed(derive_seed(self.recipe.seed, "pnn-laterals", k))
        self.net.add_column(self._column(num_classes, k))
        self.num_classes.append(num_classes)
        self.net.to(self.device)
        return k

    def learn(self, task: Task, target: Optional[float], resume=None) -> TaskRecord:
        timer, training = Timer(), self.recipe.training
        if resume is None:
            k = self._add(task.num_classes)
        else:  # a mid-task checkpoint: its state holds this task's column, part-trained (and frozen by load_state)
            k = len(self.num_classes) - 1
            for p in self.net.column_parameters(k):
                p.requires_grad_(True)
            self.net.frozen = k
            self.net.train(self.net.training)
        epochs = self.trainer.train(self.net, lambda x: self.net(x, k), [(self.net.column_parameters(k),
                                                                          training.optimizer)], task, name="train",
                                    seed=(self.recipe.seed, self.name, k), epochs=task_epochs(training), resume=resume)
        self.net.freeze(k)
        val = self.evaluate(k, task.val)
        return TaskRecord(index=k, name=task.name, num_classes=task.num_classes, target=target, val_acc=val,
                          val_history=[val], params_stored=self.num_parameters(),
                          params_task=count_parameters(self.export(k)),
                          time_s=timer.seconds + (resume[0].elapsed if resume else 0.0), epochs=epochs)

    @torch.no_grad()
    def logits(self, task_index: int, x: torch.Tensor) -> torch.Tensor:
        self.net.eval()
        return self.net(x.to(self.device), task_index)

    def evaluate(self, task_index: int, data: TaskData) -> float:
        return evaluate_with(self.net, lambda x: self.net(x, task_index), data, training=self.recipe.training,
                             device=self.device)

    def export(self, task_index: int) -> fx.GraphModule:
        """Columns 0..task_index and their laterals traced into one plain GraphModule."""
        was = self.net.training
        self.net.eval()
        try:
            gm = fx.symbolic_trace(_TaskView(self.net, task_index))
        finally:
            self.net.train(was)
        return copy.deepcopy(gm).eval()

    def num_parameters(self) -> int:
        return count_parameters(self.net)

    def state(self) -> dict:
        return {"num_classes": list(self.num_classes), "weights": self.net.state_dict()}

    def load_state(self, state: dict) -> None:
        self.net = ProgressiveNet(self.recipe.method.laterals)
        self.num_classes = []
        for k, n in enumerate(state["num_classes"]):
            self._add(n)
            self.net.freeze(k)
        self.net.load_state_dict(state["weights"])
        self.net.to(self.device)
