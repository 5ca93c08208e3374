"""The recipe schema: every field typed, documented and defaulted; unknown keys are errors.

pydantic (not dataclasses) because validation errors come with the exact field path, all of them at once,
and discriminated unions (`data.name`, `method.name`) select the right sub-schema; `grownfx.recipe.loading`
turns those paths into file:line messages.  Defaults follow the seed paper and the code it builds on
(see docs/method.md for each source).
"""

from __future__ import annotations

import re
from typing import Annotated, Literal, Optional, Union, get_args

from pydantic import BaseModel, ConfigDict, Field, PositiveInt, field_validator, model_validator

from grownfx.data.config import DataConfig


class _Strict(BaseModel):
    # allow_inf_nan=False: `lr: .inf` or `.nan` is an error naming the field, not a NaN run
    model_config = ConfigDict(extra="forbid", validate_assignment=True, allow_inf_nan=False)


class ModelConfig(_Strict):
    builder: str = Field(description="A torchvision classification builder (`resnet18`), a grownfx one "
                         "(`lenet5`, `small_cnn`), or your own as `module:callable` (e.g. `my_models:conv1d`, "
                         "`my_models.py` beside the recipe: see `code_dir`), called as `fn(num_classes=k, "
                         "**kwargs)` and returning an nn.Module; the layer producing its logits becomes each "
                         "task's head.")
    kwargs: dict = Field(default_factory=dict, description="Keyword arguments for the builder (not `num_classes`:"
                         " heads are per task).")

    @field_validator("kwargs")
    @classmethod
    def _no_num_classes(cls, v: dict) -> dict:
        if "num_classes" in v:
            raise ValueError("num_classes is not a builder argument here: every task gets its own head, sized to "
                             "the task's classes (the data decides it); remove model.kwargs.num_classes")
        return v
    leaf_modules: list[str] = Field(default_factory=list, description="Module-name globs torch.fx should not "
                                    "trace into; they are kept opaque (their channels are never resized).")
    output: Optional[Union[int, str]] = Field(None, description="Which of the values the model returns are the "
                                              "logits, for a model returning a tuple (an index) or a dict (a key); "
                                              "a dict key or namedtuple field `logits` is taken without it.")
    head: Optional[str] = Field(None, description="The classifier, when grownfx cannot find it: a module, or the "
                                "parameter of a functional classifier (`F.linear(f, self.W)`: `W`); every task gets "
                                "its own copy with its own number of classes.")
    weights: Optional[str] = Field(None, description="Pretrained weights: a state-dict file (relative to the "
                                   "recipe's folder; read with torch.load(weights_only=True) after its SHA-256 "
                                   "matched `weights_sha256` or the `<file>.sha256` beside it), or a torchvision "
                                   "weights name (`ResNet18_Weights.IMAGENET1K_V1`) taken only from the local torch "
                                   "cache ($TORCH_HOME/hub/checkpoints; never downloaded). Every method starts from "
                                   "them; see `weights_task`.")
    weights_sha256: Optional[str] = Field(None, pattern=r"^(sha256:)?[0-9a-fA-F]{64}$", description="The SHA-256 "
                                          "of the `weights` file (`sha256:<64 hex>`); without it a `<file>.sha256` "
                                          "must lie beside the file, or the run needs --no-verify (the resolved "
                                          "recipe then records the hash of the file that was used).")
    weights_task: bool = Field(True, description="With `weights`, GROWN, Piggyback, PackNet and CPG keep the "
                               "loaded network as a frozen task 0 (its own classifier kept when the file has one; "
                               "PackNet and CPG first release `method.pretrained_prune_ratio` of it) that every "
                               "task selects from or builds on: the fine-grained benchmark's setting; the "
                               "stream's tasks come after it. False: the weights are only where training starts.")
    weights_data: Optional[DataConfig] = Field(
        None, description="Data of the classes the weights' own classifier predicts, in its order (the same form "
        "as `data`; its first task is used, so it holds all of them: e.g. an ImageFolder of ImageNet's validation "
        "images with `classes_per_task: 1000, num_tasks: 1`): the pretrained task 0 is evaluated on that task's "
        "test split as loaded and after every task, like any task (summary.json `pretrained`). Its inputs must "
        "have the stream's shape and normalisation. None: task 0 is not evaluated.")
    seed_channels: Literal["auto", "first", "magnitude", "taylor"] = Field(
        "auto", description="Which channels a seed narrower than the backbone keeps in each coupling group: "
        "`first` (the first k: all alike at random initialisation), `magnitude` (the k whose producing weights "
        "have the largest L1 norm, summed over the group's layers, each normalised by its mean), `taylor` (the k "
        "of largest first-order Taylor importance |sum of activation x gradient| on up to 256 of task 1's "
        "training inputs, the loss taken against the loaded network's own predictions; aggregated like "
        "`magnitude`), `auto`: `magnitude` with `weights`, else `first`.")

    @model_validator(mode="after")
    def _weights_data_needs_a_task0(self):
        if self.weights_data is not None and not (self.weights and self.weights_task):
            raise ValueError("model.weights_data is the data of the pretrained task 0; it needs model.weights and "
                             "model.weights_task true")
        if getattr(self.weights_data, "class_order", "fixed") != "fixed":
            raise ValueError("model.weights_data.class_order must be fixed: the task's labels must be the "
                             "classifier's own, in its order")
        return self

    seed_width: float = Field(0.5, gt=0.0, le=1.0, description="Width of the seed network as a fraction of "
                              "the backbone's channels, for every growable coupling group (GROWN starts small). "
                              "Parameters scale about as its square; ignored when `seed_size` is set.")
    seed_size: Optional[float] = Field(None, gt=0.0, le=1.0, description="Size of the seed network as a fraction "
                                       "of the backbone's parameters (the seed paper's unit: 0.5x, 0.3x); the "
                                       "channel fraction giving the closest size is found by bisection "
                                       "(grownfx.learn.seed_size) and replaces `seed_width`.")
    granularity: Literal["kernel", "element", "channel"] = Field(
        "kernel", description="Mask unit: one value per conv kernel and per Linear weight (GROWN, KSM), per weight "
        "everywhere (PackNet, Piggyback), or 'channel': as 'kernel', but a Linear fed by a flatten gets one unit "
        "per (output, input channel), the channel's spatial positions together (LeNet-5's fc1: 16 weights), like "
        "a conv kernel; faster, coarser (docs/performance.md §1).")


class SitesConfig(_Strict):
    include: list[str] = Field(default_factory=lambda: ["*"], description="A coupling group is a growth site "
                               "when one of its layers matches one of these module-name globs...")
    exclude: list[str] = Field(default_factory=list, description="...and none of its layers matches these.")
    layer_types: list[str] = Field(default_factory=list, description="If set, one of its layers must be of "
                                   "these types (e.g. [Conv2d]).")


class GrowthConfig(_Strict):
    """When and where the network grows (GROWN's growth rounds; Grow grows every task)."""

    sites: SitesConfig = Field(default_factory=SitesConfig, description="Which coupling groups may grow "
                               "(`grownfx inspect` lists them).")
    pool: float = Field(0.25, gt=0.0, le=4.0, description="Candidate channels added per growth round, as a "
                        "fraction of each site's full backbone width (learnable sparse growth keeps some).")
    max_rounds: int = Field(3, ge=0, description="Growth rounds per task after stage 1 (the growth budget).")
    max_width: float = Field(2.0, gt=0.0, description="No site grows past this fraction of its full width.")
    when: Literal["necessary", "always"] = Field("necessary", description="`necessary`: grow only while "
                                                 "validation accuracy is below the target (GROWN); `always`: "
                                                 "one growth round every task (Grow).")
    decision: Literal["accuracy", "lower_bound"] = Field(
        "accuracy", description="How `necessary` reads the validation split. `accuracy` (the paper's rule): grow "
        "while validation accuracy < target. `lower_bound`: grow while the Wilson lower confidence bound of the "
        "validation accuracy (`confidence`, over the split's n samples) < target, i.e. until the split shows the "
        "target is reached; a small split cannot show it by reading 100 % (docs/method.md).")
    confidence: float = Field(0.95, ge=0.5, lt=1.0, description="One-sided confidence of `lower_bound` (0.5: the "
                              "bound is the accuracy itself, the paper's rule).")


class GumbelSpec(_Strict):
    init: float = Field(1e-2, description="Initial mask score (KSM: 1e-2, i.e. selected).")
    threshold: float = Field(5e-3, description="Score threshold (KSM: 5e-3).")
    beta: float = Field(1200.0, gt=0, description="Logit scale: logit = (score - threshold) * beta (KSM).")
    temperature: float = Field(100.0, gt=0, description="Gumbel-Sigmoid temperature T (KSM: 100).")
    final_temperature: Optional[float] = Field(None, gt=0, description="Anneal T geometrically to this over "
                                               "a stage; null keeps it constant.")
    noise_free_fraction: float = Field(
        0.0, ge=0.0, le=1.0, description="GROWN: the last ceil(fraction x epochs) epochs of every stage train the "
        "learning task's masks without their Gumbel noise, i.e. in the form evaluation and export use, so the "
        "weights and head the task keeps are fitted to the masks it stores (0: noise throughout, the paper's KSM "
        "recipe). T does not shrink the noise's effect: it scales the logit and the noise alike (docs/method.md).")


class STESpec(_Strict):
    kind: Literal["ste", "gumbel"] = Field("ste", description="Straight-through hard threshold (KSM/Piggyback)"
                                           " or Gumbel-Sigmoid like the selective mask.")
    init: float = Field(1e-2, description="Initial score (KSM/Piggyback: 1e-2).")
    threshold: float = Field(5e-3, description="Hard threshold on the score (5e-3).")
    scale: float = Field(12.0, gt=0, description="Slope of the surrogate sigmoid: (score - thr) * scale "
                         "(KSM: 1200 / 100).")


class GrownMaskSpec(_Strict):
    init: float = Field(0.0, description="Initial gate score s0 (continuous sparsification: 0).")
    final_beta: float = Field(200.0, gt=1.0, description="beta anneals 1 -> final_beta over a growth stage.")
    lam: float = Field(1e-8, ge=0.0, description="L0 penalty per weight a grown channel brings "
                       "(continuous sparsification's lambda, per weight).")


class SitePolicy(_Strict):
    match: list[str] = Field(description="Module-name globs the policy applies to.")
    selective: Optional[bool] = Field(None, description="Override: learn a selective mask on old weights.")
    attentive: Optional[bool] = Field(None, description="Override: attentive mask on grown weights.")
    retrain_released: Optional[bool] = Field(None, description="Override: re-train released weights.")


class MasksConfig(_Strict):
    selective: GumbelSpec = Field(default_factory=GumbelSpec, description="Selective mask on old tasks' weights.")
    attentive: STESpec = Field(default_factory=STESpec, description="Attentive mask on grown weights.")
    grown: GrownMaskSpec = Field(default_factory=GrownMaskSpec, description="Channel-wise grown-mask.")
    per_site: list[SitePolicy] = Field(default_factory=list, description="Per-layer overrides, first match wins.")


Ablation = Literal["full", "grow_only", "+selective_mask", "+lsg", "+retrain_released"]
_ABLATIONS = {  # (selective_mask, lsg, retrain_released) of the paper's Table 5 rows
    "grow_only": (False, False, False),
    "+selective_mask": (True, False, False),
    "+lsg": (True, True, False),
    "+retrain_released": (True, True, True),
    "full": (True, True, True),
}


class GrownMethod(_Strict):
    name: Literal["grown"] = "grown"
    ablation: Ablation = Field("full", description="Paper Table 5 rows: grow_only, +selective_mask, +lsg, "
                               "+retrain_released (= full).")
    selective_mask: Optional[bool] = Field(None, description="Override the ablation's selective-mask switch.")
    lsg: Optional[bool] = Field(None, description="Override: attentive mask on grown weights (LSG).")
    retrain_released: Optional[bool] = Field(None, description="Override: re-train released weights.")

    def switches(self) -> tuple[bool, bool, bool]:
        sel, lsg, ret = _ABLATIONS[self.ablation]
        pick = lambda v, d: d if v is None else v  # noqa: E731
        return pick(self.selective_mask, sel), pick(self.lsg, lsg), pick(self.retrain_released, ret)


ABLATIONS = ("grow_only", "+selective_mask", "+lsg", "+retrain_released")


def parse_method_spec(spec: str) -> tuple[str, Optional[str]]:
    """'packnet' -> ('packnet', None); 'grown[+lsg]' -> ('grown', '+lsg'); ValueError naming the valid ones."""
    m = re.fullmatch(r"\s*(\w+)\s*(?:\[\s*([^\]]+?)\s*\])?\s*", spec)
    if not m or m.group(1) not in METHODS:
        raise ValueError(f"unknown method {spec!r}; expected one of {', '.join(METHODS)}, finetune[forgetting] or "
                         f"grown[{'|'.join(ABLATIONS)}]")
    name, ablation = m.group(1), m.group(2)
    if name == "finetune" and ablation in (None, "forgetting"):
        return name, ablation
    if ablation is not None and (name != "grown" or ablation not in ABLATIONS):
        raise ValueError(f"unknown ablation {spec!r}; the ablation rows are "
                         + ", ".join(f"grown[{a}]" for a in ABLATIONS))
    return name, ablation


class GrowMethod(_Strict):
    name: Literal["grow"] = "grow"


class ScratchMethod(_Strict):
    name: Literal["scratch"] = "scratch"


class FinetuneMethod(_Strict):
    name: Literal["finetune"] = "finetune"
    keep_copies: bool = Field(True, description="Store the whole network after each task and evaluate each task "
                              "with its own copy (the seed paper's Fine-tune row: no forgetting, model size T x). "
                              "False: one shared network, old heads kept, which forgets: `finetune[forgetting]` "
                              "in `grownfx compare`.")


class PNNMethod(_Strict):
    name: Literal["pnn"] = "pnn"
    column_width: float = Field(0.08, gt=0, le=1.0, description="Width of every column after the first, as a "
                                "fraction of the backbone (with laterals from the full first column, about +0.08x "
                                "parameters per task, the paper's PNN growth).")
    first_column_width: float = Field(1.0, gt=0, le=1.0, description="Width of the first task's column (the "
                                      "paper's PNN starts from the full backbone, 1x).")
    laterals: Literal["shared", "per_column"] = Field("shared", description="`shared`: per layer, one lateral "
                                                      "adapter from the first column and one fed the mean of the "
                                                      "other earlier columns (constant size per task); "
                                                      "`per_column`: one adapter per earlier column (Rusu et al.; "
                                                      "size grows quadratically).")


class PackNetMethod(_Strict):
    name: Literal["packnet"] = "packnet"
    prune_ratio: float = Field(0.5, gt=0, lt=1, description="Fraction of a task's free weights released after "
                               "training it (PackNet: 0.5 to 0.75).")
    retrain_epochs: Optional[int] = Field(None, ge=0, description="Epochs of retraining after pruning "
                                          "(default: half the task's epochs).")
    pretrained_prune_ratio: float = Field(0.5, ge=0, lt=1, description="With a pretrained task 0 (`model.weights`, "
                                          "`model.weights_task`): the fraction of each layer's loaded weights "
                                          "released by magnitude before the first task, freeing capacity "
                                          "(PackNet's ImageNet network: 0.5 per layer, arunmallya/packnet "
                                          "run_imagenet_pruning.sh). Task 0 is not retrained after it (PackNet "
                                          "retrains 10 ImageNet epochs; grownfx has no task-0 training data).")


class PiggybackMethod(_Strict):
    name: Literal["piggyback"] = "piggyback"
    mask_lr: float = Field(1e-4, gt=0, description="Adam learning rate of the mask scores (Piggyback: 1e-4).")
    mask_init: float = Field(1e-2, description="Initial mask score (Piggyback: 1e-2).")
    mask_threshold: float = Field(5e-3, description="Scores at or above this keep their weight (Piggyback: 5e-3).")


class CPGMethod(_Strict):
    name: Literal["cpg"] = "cpg"
    max_sparsity: float = Field(0.95, gt=0, lt=1, description="Gradual pruning goes 0.1 -> this.")
    prune_schedule: Literal["steps", "cubic"] = Field("steps", description="`steps`: sparsities 0.1, 0.2, ... "
                                                      "up to max_sparsity (ivclab/CPG tries steps of 0.1 and keeps "
                                                      "the most pruned level still meeting the goal); `cubic`: "
                                                      "`prune_steps` levels on Zhu & Gupta's cubic schedule.")
    prune_step: float = Field(0.1, gt=0, lt=1, description="Sparsity step of the `steps` schedule (CPG: 0.1).")
    pretrained_prune_ratio: float = Field(0.5, ge=0, lt=1, description="With a pretrained task 0 (`model.weights`, "
                                          "`model.weights_task`): the fraction of each layer's loaded weights "
                                          "released by magnitude before the first task, for the stream's tasks "
                                          "to train (0: they only pick from it and grow). CPG compacts its "
                                          "ImageNet network by gradual pruning with ImageNet retraining, keeping "
                                          "the sparsest level that meets its accuracy (ivclab/CPG experiment2); "
                                          "without task-0 training data grownfx prunes once, by this ratio "
                                          "(default: PackNet's published 0.5).")
    prune_steps: int = Field(5, ge=1, description="Pruning levels of the `cubic` schedule between 0.1 and "
                             "max_sparsity.")
    grow_ratio: float = Field(0.5, gt=0, description="Width added (fraction of the backbone) when the target "
                              "is missed (CPG: 0.5).")
    max_width: float = Field(1.5, gt=0, description="Width cap as a fraction of the backbone (CPG: 1.5).")
    prune_epochs: Optional[int] = Field(None, ge=1, description="Retraining epochs after each pruning level "
                                        "(default: a quarter of training.epochs, at least 1).")
    prune_lr: Optional[float] = Field(None, gt=0, description="Weight learning rate while compacting "
                                      "(default: 0.1 x training.optimizer.lr, as CPG's 1e-3 vs 1e-2).")
    mask_lr: float = Field(5e-4, gt=0, description="Adam learning rate of the piggyback mask (CPG: 5e-4).")


class EWCMethod(_Strict):
    """Elastic weight consolidation (Kirkpatrick et al., PNAS 2017): one shared backbone, a head per task, and a
    quadratic penalty (lam / 2) * sum_k F_k (theta - theta*_k)^2 over earlier tasks k."""

    name: Literal["ewc"] = "ewc"
    lam: float = Field(1e5, ge=0, description="Penalty strength lambda, the loss being CE + lam/2 * sum F (theta - "
                       "anchor)^2 (GMvandeVen/continual-learning, Task-IL split MNIST, with this Fisher estimate: "
                       "1e5).")
    fisher_samples: Optional[PositiveInt] = Field(None, description="Training samples of a task its Fisher diagonal "
                                                  "is estimated on, one at a time (the first N of a seeded order); "
                                                  "null: all of them (van de Ven: a full pass).")


class SIMethod(_Strict):
    """Synaptic intelligence (Zenke, Poole & Ganguli, ICML 2017): the path integral of each parameter's share in
    the loss's decrease, normalised by its squared displacement, weights a quadratic penalty."""

    name: Literal["si"] = "si"
    lam: float = Field(1.0, ge=0, description="Penalty strength c: loss = CE + c * sum Omega (theta - anchor)^2 "
                       "(ganguli-lab/pathint, split MNIST: c = 1).")
    xi: float = Field(1e-3, gt=0, description="Damping xi of Omega = omega / (Delta^2 + xi) (pathint, split MNIST "
                      "and split CIFAR: 1e-3).")


class MASMethod(_Strict):
    """Memory aware synapses (Aljundi et al., ECCV 2018): importance = mean absolute gradient of the squared L2 norm
    of the task's output, weighting a quadratic penalty."""

    name: Literal["mas"] = "mas"
    lam: float = Field(1.0, ge=0, description="Penalty strength lambda: loss = CE + lam * sum Omega (theta - "
                       "anchor)^2 (MAS: 1 in the object recognition experiments; Avalanche's baseline: 1).")
    importance_samples: Optional[PositiveInt] = Field(None, description="Training samples of a task its importance "
                                                      "is computed on, one at a time; null: all of them (MAS: the "
                                                      "task's training set).")


class LwFMethod(_Strict):
    """Learning without forgetting (Li & Hoiem, ECCV 2016 / TPAMI 2017): the previous model's outputs of every
    earlier head on the new task's data are distillation targets."""

    name: Literal["lwf"] = "lwf"
    lam: float = Field(1.0, ge=0, description="Weight lambda_o of the distillation loss (Li & Hoiem: 1; "
                       "Avalanche LwF alpha: 1).")
    temperature: float = Field(2.0, gt=0, description="Distillation temperature T (Li & Hoiem: 2; Avalanche: 2).")


class ERMethod(_Strict):
    """Experience replay (Chaudhry et al., 2019, ER-ring): a memory of `per_class` training samples of every class
    of every earlier task, a batch of it replayed beside each new batch, each sample through its own task's head."""

    name: Literal["er"] = "er"
    per_class: PositiveInt = Field(20, description="Samples kept per class (a per-class ring buffer: exactly this "
                                   "many, or all of a class that has fewer). 20: Avalanche's default memory of 200 "
                                   "samples over a 10-class stream (SplitMNIST), facebookresearch/agem's 20 per class "
                                   "(AWA).")
    replay_batch: Optional[PositiveInt] = Field(None, description="Memory samples replayed per step, drawn without "
                                                "replacement from the whole memory; null: training.batch_size (ER: "
                                                "as many as the new batch).")


class DENMethod(_Strict):
    """Dynamically expandable networks (Yoon et al., ICLR 2018): selective retraining of the units a new task
    reaches, expansion by group-sparse new units when the loss stays high, split/duplication of units that drifted,
    timestamped units.  Defaults: jaehong31/DEN's DEN_run.py flags."""

    name: Literal["den"] = "den"
    l1_lambda: float = Field(1e-5, ge=0, description="L1 soft-threshold applied to the trained weights after "
                             "every step (DEN: l1_lambda 1e-5).")
    l2_lambda: float = Field(1e-4, ge=0, description="L2 penalty l2_lambda * 1/2 |W|^2 on the trained parameters "
                             "(DEN: l2_lambda 1e-4).")
    gl_lambda: float = Field(1e-3, ge=0, description="Group-lasso threshold on each new unit's incoming weights "
                             "after every step of the expansion stage (DEN: gl_lambda 1e-3).")
    regular_lambda: float = Field(0.5, ge=0, description="Penalty regular_lambda * 1/2 |W - W_prev|^2 holding the "
                                  "earlier tasks' units near their values (DEN: regular_lambda 0.5).")
    k_ex: PositiveInt = Field(10, description="Units added to every hidden layer by an expansion, and the most "
                              "units split per layer (DEN: ex_k 10).")
    loss_thr: float = Field(0.01, ge=0, description="Expand when the task's mean training loss after selective "
                            "retraining is at least this (DEN: loss_thr 0.01).")
    spl_thr: float = Field(0.05, ge=0, description="Split a unit whose incoming weights moved more than this (L2) "
                           "during the task (DEN: spl_thr 0.05).")
    select_epochs: Optional[PositiveInt] = Field(None, description="Epochs of the sparse head that selects the "
                                                 "subnetwork (default: a tenth of training.epochs, at least 1; DEN: "
                                                 "max_iter / 10).")


class APDMethod(_Strict):
    """Additive parameter decomposition (Yoon et al., ICLR 2020): theta_t = sigma * sigmoid(m_t) + tau_t per layer,
    sparse tau_t, a retroactive penalty holding earlier tasks.  Defaults: jaehong31/APD's cifar100_apd_bash.py."""

    name: Literal["apd"] = "apd"
    lam1: float = Field(4e-4, ge=0, description="L1 weight on every task's tau and its hard threshold after each "
                        "task (APD: l1_hyp 4e-4).")
    lam2: float = Field(100.0, ge=0, description="Retroactive penalty lam2 * 1/2 |theta_j - theta_j^start|^2 over "
                        "earlier tasks j (APD: approx_hyp 100, with Adam 1e-3; under SGD keep lr x lam2 below 2).")
    weight_decay: float = Field(1e-4, ge=0, description="L2 on the learning task's tau and mask, and on sigma "
                                "during the first task (APD: wd_rate 1e-4).")
    clustering_iter: int = Field(5, ge=0, description="Every this many tasks the taus of all tasks so far are "
                                 "clustered (k-means, per layer) into locally shared parts plus residuals; 0 never "
                                 "(APD: clustering_iter 5).")
    k_centroids: PositiveInt = Field(2, description="Clusters per clustering_iter tasks: after task t (1-based) "
                                     "k = k_centroids * t / clustering_iter (APD: k_centroides 2).")
    e_gap: float = Field(1e-2, ge=0, description="An entry joins a cluster's shared part when its values over the "
                         "members differ by at most this (max - min); the shared value is their midrange, so each "
                         "member's weight moves by at most e_gap / 2 + lam1 (APD: e_gap_hyp 1e-2).")


# Every method a recipe can name.  A new method adds its config class here and registers its implementation in
# grownfx.learn.methods._REGISTRY; METHODS and `grownfx compare` follow.
MethodConfig = Annotated[
    Union[ScratchMethod, FinetuneMethod, PNNMethod, GrowMethod, PackNetMethod, PiggybackMethod, CPGMethod,
          GrownMethod, EWCMethod, SIMethod, MASMethod, LwFMethod, ERMethod, DENMethod, APDMethod],
    Field(discriminator="name"),
]
METHODS = tuple(get_args(cls.model_fields["name"].annotation)[0] for cls in get_args(get_args(MethodConfig)[0]))


class TargetConfig(_Strict):
    rule: Union[float, list[float], str] = Field("scratch", description="Accuracy target per task (validation, "
                                                 "in %): a number, one number per task, `scratch` (accuracy of "
                                                 "the full backbone trained from scratch on that task), "
                                                 "`best(scratch, finetune)` (the better of that and fine-tune's "
                                                 "accuracy on the task when it learned it: the seed paper's "
                                                 "target), either with a margin: `scratch - 1.5`.")
    scratch_epochs: Optional[int] = Field(None, ge=1, description="Epochs for the scratch reference "
                                          "(default: training.epochs).")

    @field_validator("rule")
    @classmethod
    def _check_rule(cls, v):
        if isinstance(v, str) and parse_target(v) is None:
            raise ValueError(f"target rule {v!r} is not a number, 'scratch', 'best(scratch, finetune)' or one of "
                             f"them minus a margin ('scratch - 1.5')")
        return v


_TARGET = re.compile(r"\s*(scratch|best\s*\(\s*scratch\s*,\s*finetune\s*\)|best\s*\(\s*finetune\s*,\s*scratch\s*\))"
                     r"\s*(?:-\s*([0-9]*\.?[0-9]+)\s*)?")


def parse_target(rule: str) -> Optional[float]:
    """'scratch' -> 0.0 margin, 'scratch - 1.5' -> 1.5, 'best(scratch, finetune) - 1' -> 1.0; None if malformed."""
    m = _TARGET.fullmatch(rule)
    return float(m.group(2) or 0.0) if m else None


def target_sources(rule) -> tuple[str, ...]:
    """The reference runs a target rule reads: ('scratch',), ('scratch', 'finetune'), or () for numbers."""
    if not isinstance(rule, str):
        return ()
    m = _TARGET.fullmatch(rule)
    if m is None:
        return ()
    return ("scratch",) if m.group(1) == "scratch" else ("scratch", "finetune")


class OptimConfig(_Strict):
    """An optimiser: SGD (with momentum), Adam or AdamW."""

    name: Literal["sgd", "adam", "adamw"] = Field("sgd", description="The torch.optim class.")
    lr: float = Field(0.01, gt=0, description="Learning rate (the schedule's peak).")
    momentum: float = Field(0.9, ge=0, description="SGD momentum (ignored by Adam and AdamW).")
    nesterov: bool = Field(True, description="SGD Nesterov momentum (ignored by Adam and AdamW).")
    weight_decay: float = Field(0.0, ge=0, description="L2 weight decay (AdamW: decoupled).")


class TrainingConfig(_Strict):
    epochs: PositiveInt = Field(20, description="Epochs per task of every method: task 1 (GROWN's first LSG "
                                "round from the seed) and stage 1 of later tasks; Scratch, Fine-tune, PNN, PackNet,"
                                " Piggyback and CPG's pick stage train this many.")
    stage2_epochs: Optional[PositiveInt] = Field(None, description="Epochs of each later growth round (GROWN's "
                                                 "stage 2 rounds, task 1's extra rounds, CPG's widening rounds; "
                                                 "default: epochs).")
    epoch_budget: Optional[PositiveInt] = Field(None, description="Equal-budget mode: every method trains exactly "
                                                "this many epochs per task, all its phases together (GROWN's "
                                                "stage 1 and growth rounds, PackNet's train and retrain, CPG's "
                                                "pick, grow and compaction); docs/baselines.md says how each "
                                                "splits it.  null: each method's own schedule.")
    batch_size: PositiveInt = Field(32, description="Global batch size (the seed paper: 32).")
    eval_batch_size: PositiveInt = Field(256, description="Batch size of evaluation (validation, test).")
    optimizer: OptimConfig = Field(default_factory=OptimConfig, description="Weights (SGD, Nesterov 0.9).")
    mask_optimizer: OptimConfig = Field(default_factory=lambda: OptimConfig(name="adam", lr=2e-4, momentum=0.0,
                                                                            nesterov=False),
                                        description="Selective and attentive masks (KSM: Adam 2e-4).")
    gate_optimizer: OptimConfig = Field(default_factory=lambda: OptimConfig(name="sgd", lr=0.1, momentum=0.9),
                                        description="Grown-mask gates (continuous sparsification: SGD 0.1, "
                                        "Nesterov 0.9).")
    scheduler: Literal["cosine", "none", "step"] = Field("cosine", description="Per-stage learning-rate schedule.")
    milestones: list[float] = Field(default_factory=lambda: [0.5, 0.8], description="Step schedule: fractions "
                                    "of the stage where the lr is multiplied by 0.1 (CPG: epochs 50, 80 of 100).")
    precision: Literal["fp32", "bf16", "fp16"] = Field("fp32", description="Mixed precision on CUDA (autocast).")
    channels_last: bool = Field(False, description="Train image models (4-D inputs) in the channels-last memory "
                                "layout (faster convolutions on recent GPUs); other inputs are left as they are.")
    precise_bn: bool = Field(True, description="After every training stage, recompute the BatchNorm statistics of "
                             "the layers that trained: one pass over the task's training split without "
                             "augmentation, through the network as it is evaluated (deterministic masks, "
                             "binarised gates), each batch weighted equally (detectron2's PreciseBN).  The "
                             "running averages of training trail a network whose masks, gates and weights move, "
                             "and a task keeps its statistics for ever.  false: keep the running averages.")
    compile: bool = Field(False, description="Compute the learning task's masked weights of all layers (unit "
                          "masks, their Gumbel noise, the frozen/trainable select) as one torch.compile'd graph, "
                          "forward and backward; convolutions stay eager.  Compiled once per layout of the masked "
                          "weights (a new task, growth): tens of seconds on a CPU (a C++ compiler is needed), "
                          "each epoch event reports `compiles` and `compile_seconds`.  The same noise as eager; "
                          "results agree to float rounding.  docs/performance.md §1 says when it pays.")
    checkpoint_every: int = Field(0, ge=0, description="Also checkpoint every N epochs (0: after each task only).")
    num_threads: Optional[int] = Field(None, ge=1, description="torch CPU threads (default: torch's). It changes "
                                       "what is learned (CPU kernels sum in a thread-dependent order, so 1 and 2 "
                                       "threads give slightly different weights): a run resumes only with the same "
                                       "value.")


class OutputConfig(_Strict):
    dir: str = Field("runs/{name}", description="Run folder; {name} is the recipe name.")
    tensorboard: bool = Field(True, description="Write TensorBoard event files to <run folder>/tb.")
    export_format: Literal["pt2", "onnx", "torchscript", "none"] = Field("pt2", description="Per-task export format.")

    @field_validator("dir")
    @classmethod
    def _check_dir(cls, v: str) -> str:
        try:
            v.format(name="x")
        except (KeyError, IndexError, ValueError):
            raise ValueError(f"{v!r}: the only placeholder a folder takes is {{name}} (write {{{{ and }}}} for "
                             "literal braces)") from None
        return v


# A name becomes a folder (output.dir `runs/{name}`): one plain path component, so that it cannot lead outside.
NAME_PATTERN = r"[A-Za-z0-9_][A-Za-z0-9_.+-]{0,127}"


class Recipe(_Strict):
    name: str = Field(description="Run name.")
    description: str = Field("", description="Free text; `grownfx ls` shows its first line.")
    seed: int = Field(0, ge=0, description="Seeds data splits, initialisation, masks and growth.")
    device: str = Field("auto", description="`auto` (CUDA when available), `cpu`, `cuda`, `cuda:1`.")
    code_dir: Optional[str] = Field(None, description="Folder your own `module:callable` code (`model.builder`, "
                                    "`data.factory`) is imported from first, then the working folder, then "
                                    "sys.path; relative to the recipe's folder. Filled in with the recipe file's "
                                    "folder when the recipe names such code, so the run folder records it.")
    model: ModelConfig = Field(description="The backbone: a builder and how GROWN slims and masks it.")
    data: DataConfig = Field(description="The task stream: a dataset kind (`name`) and how it is cut into tasks.")
    method: MethodConfig = Field(default_factory=GrownMethod, description="The continual-learning method "
                                 "(`name`) and its own settings.")
    growth: GrowthConfig = Field(default_factory=GrowthConfig, description="When and where the network grows.")
    masks: MasksConfig = Field(default_factory=MasksConfig, description="GROWN's three masks.")
    target: TargetConfig = Field(default_factory=TargetConfig, description="The accuracy each task must reach "
                                 "before growth stops.")
    training: TrainingConfig = Field(default_factory=TrainingConfig, description="Epochs, batches, optimisers "
                                     "and schedules of every method.")
    output: OutputConfig = Field(default_factory=OutputConfig, description="The run folder and what goes in it.")

    @field_validator("name")
    @classmethod
    def _check_name(cls, v: str) -> str:
        if not re.fullmatch(NAME_PATTERN, v):
            raise ValueError(f"{v!r} is not a plain name: a run's name becomes a folder (output.dir runs/{{name}}), "
                             "so it takes letters, digits and _ . + - only (no / or \\, not starting with a dot, "
                             "at most 128 characters)")
        return v

    @field_validator("device")
    @classmethod
    def _check_device(cls, v: str) -> str:
        if not re.fullmatch(r"auto|cpu|cuda(:\d+)?|mps", v):
            raise ValueError(f"device must be auto, cpu, cuda, cuda:N or mps, got {v!r}")
        return v

    @model_validator(mode="after")
    def _check_decisions_have_validation_data(self):
        """GROWN and CPG decide growth (and a scratch target) on validation accuracy: with no validation split
        the accuracy reads 0, the target becomes negative and growth silently never runs."""
        decides = self.method.name == "cpg" or (self.method.name == "grown" and self.growth.when == "necessary")
        if decides and getattr(self.data, "val_fraction", None) == 0:
            raise ValueError(f"data.val_fraction is 0, but {self.method.name}'s growth decisions and its target "
                             "are made on validation accuracy; set data.val_fraction > 0 (e.g. 0.1)")
        return self

    @model_validator(mode="after")
    def _check_target_length(self):
        rule = self.target.rule
        if isinstance(rule, list):
            n = getattr(self.data, "num_tasks", None)
            if n is not None and len(rule) != n:
                raise ValueError(f"target.rule lists {len(rule)} targets for {n} tasks")
        return self
