"""Experience replay (Chaudhry et al., "On Tiny Episodic Memories in Continual Learning", 2019: ER-ring) on
Fine-tune's shared network.

After task k trains, a per-class ring buffer of `per_class` slots takes one seeded pass over the task's training
split: it keeps the last `per_class` samples of each class in that order, i.e. exactly `per_class` of each (all of a
class with fewer).  A ring buffer rather than a reservoir: a reservoir over the stream keeps a random number of each
class (some class may get none), a ring buffer exactly N; and ER-ring was the better of the two at small memories
(Chaudhry et al.).  Every training step of a later task draws `replay_batch` memory samples (without replacement,
from all earlier tasks' buffers), passes them through the backbone in one batch with the new samples (batch
normalisation sees the mixed batch, as in ER), and each memory sample through its own task's head; the loss is the
mean cross-entropy over new and memory samples together.  Earlier heads keep learning from their samples.

The memory holds indices into the stream's training splits (the stream is rebuilt identical on a resume); its size
is counted as stored samples: input values plus one label each.
"""

from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from grownfx.data import Task, TaskData
from grownfx.learn.methods.base import StepTerms
from grownfx.learn.methods.finetune import FinetuneContinual
from grownfx.learn.methods.multihead import head_tail
from grownfx.learn.training import derive_seed, in_layout


def ring_buffer(labels: Tensor, per_class: int, order: Tensor) -> Tensor:
    """Indices a ring buffer of `per_class` slots per class holds after one pass over the samples in `order`: the
    last `per_class` of every class in that order (all of a class with fewer), class by class."""
    kept = [order[labels[order] == c][-per_class:] for c in labels.unique().tolist()]
    return torch.cat(kept) if kept else order[:0]


class ERContinual(FinetuneContinual):
    name = "er"
    trains_old_heads = True

    def __init__(self, recipe, stream, device, **hooks):
        super().__init__(recipe, stream, device, **hooks)
        self.memory_index: list[Tensor] = []  # per learned task: indices into its training split
        self.memory: list[TaskData] = []
        self._replayed: Optional[list[tuple[Tensor, Tensor]]] = None  # the step's memory logits and labels
        self._tail = None

    @property
    def replay_batch(self) -> int:
        return self.recipe.method.replay_batch or self.recipe.training.batch_size

    def begin_task(self, task: Task, t: int, resumed: bool) -> None:
        self.heads.keep_features = bool(self.memory)
        self._tail = head_tail(self.model, self.head_target) if self.memory else None

    def training_forward(self, t: int):
        forward = self._forward(t)

        def replay(x: Tensor) -> Tensor:
            if not self.memory or not torch.is_grad_enabled():  # evaluation, PreciseBN: the new samples only
                self._replayed = None
                return forward(x)
            xm, ym, tm = self.draw(x.device)
            out = forward(torch.cat([x, in_layout(xm, self.recipe.training.channels_last)]))
            features = self.heads.features[len(x):]
            self.heads.features = None
            replayed = []
            for k in tm.unique().tolist():
                rows = tm == k
                with self.heads.computing(k):
                    replayed.append((self._tail(features[rows]), ym[rows]))
            self._replayed = replayed
            return out[:len(x)]

        return replay

    def draw(self, device) -> tuple[Tensor, Tensor, Tensor]:
        """A batch of the memory: `replay_batch` samples drawn without replacement from all tasks' buffers (torch's
        generator, which the loop seeds every epoch), each normalised and augmented as its task's training split."""
        sizes = [len(m) for m in self.memory]
        pick = torch.randperm(sum(sizes))[: self.replay_batch]
        xs, ys, ts, start = [], [], [], 0
        for k, (data, size) in enumerate(zip(self.memory, sizes)):
            local = pick[(pick >= start) & (pick < start + size)] - start
            start += size
            if len(local):
                xs.append(data.normalize(data.x[local].to(device), augment=data.augment))
                ys.append(data.y[local].to(device))
                ts.append(torch.full((len(local),), k, device=device))
        return torch.cat(xs), torch.cat(ys), torch.cat(ts)

    def step_terms(self, task: Task, t: int) -> Optional[StepTerms]:
        return StepTerms(criterion=self.criterion) if self.memory else None

    def criterion(self, logits: Tensor, y: Tensor) -> Tensor:
        """Mean cross-entropy over the new samples and the memory samples of the same step, each sample scored by
        its own task's head."""
        replayed, self._replayed = self._replayed or [], None
        total = F.cross_entropy(logits, y, reduction="sum")
        for out, labels in replayed:
            total = total + F.cross_entropy(out, labels, reduction="sum")
        return total / (len(y) + sum(len(labels) for _, labels in replayed))

    def end_task(self, task: Task, t: int) -> None:
        self.heads.keep_features, self.heads.features, self._tail = False, None, None
        order = torch.randperm(len(task.train), generator=torch.Generator().manual_seed(
            derive_seed(self.recipe.seed, "er-memory", t)))
        self.memory_index.append(ring_buffer(task.train.y.cpu(), self.recipe.method.per_class, order))
        self.memory.append(task.train.subset(self.memory_index[-1]))

    def stored(self) -> tuple[int, int]:
        samples = sum(len(i) for i in self.memory_index)
        return samples, samples * (math.prod(self.stream.input_shape) + 1)  # input values and a label each

    def record_extra(self, t: int) -> dict:
        return {"memory_per_class": self.recipe.method.per_class, "replay_batch": self.replay_batch,
                "memory_per_task": [len(i) for i in self.memory_index]}

    def state(self) -> dict:
        return {**super().state(), "memory_index": list(self.memory_index)}

    def load_state(self, state: dict) -> None:
        super().load_state(state)
        self.memory_index = [i.cpu() for i in state["memory_index"]]
        self.memory = [self.stream.tasks[k].train.subset(i) for k, i in enumerate(self.memory_index)]
