"""The baselines: each method's defining property, on small streams (digits, a crafted interfering stream)."""

import pytest
import torch

import grownfx.run.runner as runner
from grownfx import files
from grownfx.recipe.schema import MasksConfig, Recipe
from grownfx.engine.context import ATT, DENSE, OFF, SEL
from grownfx.data import Task, TaskData, TaskStream, build_stream
from grownfx.engine.layers import FREE
from grownfx.learn.learner import build_policy
from grownfx.learn.methods import make_method
from grownfx.learn.methods.cpg import cubic_levels, step_levels
from grownfx.models import build_backbone
from grownfx.engine.prepare import prepare


def recipe(tmp_path, method: dict, tasks: int = 3, epochs: int = 2, **model_kwargs) -> Recipe:
    return Recipe.model_validate({
        "name": "m", "seed": 0,
        "model": {"builder": "small_cnn", "kwargs": {"in_channels": 1, "width": 8, "hidden": 16, **model_kwargs}},
        "data": {"name": "digits", "num_tasks": tasks},
        "method": method,
        "training": {"epochs": epochs, "optimizer": {"name": "sgd", "lr": 0.05, "weight_decay": 1e-4}},
        "output": {"dir": str(tmp_path / "{name}"), "tensorboard": False, "export_format": "none"},
    })


def quiet(msg):
    pass


def logits_of(method, task, x):
    if hasattr(method, "logits"):
        return method.logits(task, x)
    method.net.eval()
    with torch.no_grad():
        return method.net(x, task=task)


def xor_stream(seed: int = 0, shape=(1, 8, 8), noise: float = 0.8) -> TaskStream:
    """Same inputs (4 patterns) for both tasks, but task 1 splits them {0,1}|{2,3} and task 2 {0,2}|{1,3}: the
    second task needs other features than the first, so a shared backbone cannot keep both."""
    g = torch.Generator().manual_seed(seed)
    patterns = torch.randn((4, *shape), generator=g)

    def split(per_pattern):
        p = torch.arange(4).repeat_interleave(per_pattern)
        return patterns[p] + noise * torch.randn((len(p), *shape), generator=g), p

    data = {s: split(n) for s, n in (("train", 80), ("val", 20), ("test", 40))}
    tasks = []
    for t, rule in enumerate((lambda p: p // 2, lambda p: p % 2)):
        parts = {s: TaskData(x, rule(p), (0.0,), (1.0,)) for s, (x, p) in data.items()}
        tasks.append(Task(t, f"xor{t}", ["a", "b"], 2, parts["train"], parts["val"], parts["test"]))
    return TaskStream("xor", tasks, shape, (0.0,), (1.0,))


# --- scratch and fine-tune -------------------------------------------------------------------------------


def test_scratch_stores_exactly_one_model_per_task(tmp_path):
    s = runner.run(recipe(tmp_path, {"name": "scratch"}, epochs=1), echo=quiet).summary
    full = s["full_params"]
    assert [t["params_stored"] for t in s["tasks"]] == [full, 2 * full, 3 * full]
    assert s["tasks"][-1]["model_size"] == 3.0


def test_a_scratch_method_built_without_a_stop_request_trains_every_epoch(tmp_path):
    """make_method(recipe, stream, device), as a script calls it: nothing asks it to stop, so a task trains all
    its epochs (a stop request would end it with KeyboardInterrupt after the first)."""
    r = recipe(tmp_path, {"name": "scratch"}, tasks=2, epochs=2)
    stream = build_stream(r.data, r.seed)
    events = []
    method = make_method(r, stream, torch.device("cpu"), on_epoch=events.append)
    try:
        record = method.learn(stream.tasks[0], None)
    except KeyboardInterrupt:  # (pytest would take it for a Ctrl-C and stop the session instead of failing)
        pytest.fail(f"the task stopped after {len(events)} epoch(s) though nothing asked it to")
    assert record.epochs == 2 and [e["epoch"] for e in events] == [1, 2]


def test_finetune_forgets_on_an_interfering_stream(tmp_path, monkeypatch):
    monkeypatch.setattr(runner, "stream_for", lambda recipe: xor_stream(recipe.seed))
    s = runner.run(recipe(tmp_path, {"name": "finetune", "keep_copies": False}, epochs=6), echo=quiet).summary
    assert s["method"] == "finetune[forgetting]" and s["bwt"] < 0, s["bwt"]
    assert s["tasks"][0]["acc_when_learned"] > 90  # it had learned task 1, then lost it
    # one shared backbone: the second task only adds a head
    assert s["tasks"][1]["params_stored"] - s["tasks"][0]["params_stored"] == 16 * 2 + 2
    kept = runner.run(recipe(tmp_path / "copies", {"name": "finetune"}, epochs=6), echo=quiet).summary
    # the default is the paper's Fine-tune row: a copy per task, nothing forgotten, T x the size
    assert kept["method"] == "finetune" and kept["bwt"] == 0.0 and kept["tasks"][-1]["model_size"] >= 2.0


# --- zero forgetting: old outputs bit-identical, BWT exactly 0, checkpoints restore them -----------------


@pytest.mark.parametrize("method", [{"name": "pnn", "column_width": 0.25}, {"name": "packnet"},
                                    {"name": "piggyback"}, {"name": "cpg", "prune_schedule": "cubic", "prune_steps": 2},
                                    {"name": "grown"}], ids=lambda m: m["name"])
def test_old_tasks_are_bit_identical_after_later_tasks(tmp_path, method):
    r = recipe(tmp_path, method)
    stream = build_stream(r.data, r.seed)
    m = make_method(r, stream, torch.device("cpu"))
    x = torch.cat([t.val.normalize(t.val.x[:16]) for t in stream.tasks])
    seen, matrix = [], []
    for t, task in enumerate(stream.tasks):
        m.learn(task, None)
        seen.append(logits_of(m, t, x))
        matrix.append([m.evaluate(j, stream.tasks[j].test) for j in range(t + 1)])
        for j in range(t + 1):
            assert torch.equal(logits_of(m, j, x), seen[j]), f"task {j} changed while learning task {t}"
    # and on the whole test split of every earlier task, not only the probe images: accuracy never moved
    assert all(row[j] == matrix[j][j] for row in matrix for j in range(len(row))), matrix
    for j in range(len(stream.tasks)):  # the export computes the same function
        torch.testing.assert_close(m.export(j).eval()(x), seen[j], rtol=1e-4, atol=1e-4)
    # the runner's checkpoint round trip (weights_only load) gives back the same outputs
    files.atomic_save({"method": m.state()}, tmp_path / "last.pt")
    fresh = make_method(r, stream, torch.device("cpu"))
    fresh.load_state(files.load(tmp_path / "last.pt")["method"])
    for j in range(len(stream.tasks)):
        assert torch.equal(logits_of(fresh, j, x), seen[j])


# --- PNN -------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("laterals", ["shared", "per_column"])
def test_pnn_grows_a_column_per_task(tmp_path, laterals):
    r = recipe(tmp_path, {"name": "pnn", "column_width": 0.25, "laterals": laterals}, tasks=4, epochs=1)
    stream = build_stream(r.data, r.seed)
    m = make_method(r, stream, torch.device("cpu"))
    sizes = [m.learn(task, None).params_stored for task in stream.tasks]
    steps = [b - a for a, b in zip(sizes, sizes[1:])]
    if laterals == "shared":
        assert steps[1] == steps[2] > 0  # linear: equal increments after the first
    else:
        assert steps[2] - steps[1] == steps[1] - steps[0] > 0  # one more adapter set per earlier column
    assert sizes[0] == m.full_params  # the first column is the full backbone (paper: PNN starts at 1x)
    assert not any(p.requires_grad for p in m.net.parameters())  # every finished column and lateral is frozen


# --- PackNet and Piggyback --------------------------------------------------------------------------------


def test_packnet_keeps_what_it_did_not_release(tmp_path):
    r = recipe(tmp_path, {"name": "packnet", "prune_ratio": 0.6}, tasks=2, epochs=1)
    stream = build_stream(r.data, r.seed)
    m = make_method(r, stream, torch.device("cpu"))
    m.learn(stream.tasks[0], None)
    free = [int((layer.owner == FREE).sum()) for layer in m.net.masked_layers()]
    for layer in m.net.masked_layers():
        n = layer.owner.numel()
        assert int((layer.owner == 0).sum()) == n - round(0.6 * n)
    m.learn(stream.tasks[1], None)
    for layer, f in zip(m.net.masked_layers(), free):
        assert int((layer.owner == 1).sum()) == f - round(0.6 * f)


def test_piggyback_learns_only_masks_after_the_first_task(tmp_path):
    r = recipe(tmp_path, {"name": "piggyback"}, tasks=2, epochs=1)
    stream = build_stream(r.data, r.seed)
    m = make_method(r, stream, torch.device("cpu"))
    m.learn(stream.tasks[0], None)
    layers = m.net.masked_layers()
    assert all(bool((layer.owner == 0).all()) and not layer.weight.requires_grad for layer in layers)
    m.net.add_task(2)
    from grownfx.learn.methods.piggyback import piggyback_policy

    m.net.set_policy(piggyback_policy())
    params = m.net.trainable_parameters()
    assert not {id(layer.weight) for layer in layers} & {id(p) for p in params["weights"]}
    assert sum(p.numel() for p in params["masks"]) == sum(layer.weight.numel() for layer in layers)
    assert all(bool((layer.kind == SEL).all()) for layer in layers)


# --- CPG -------------------------------------------------------------------------------------------------


def test_cpg_keeps_exactly_the_sparsity_it_chose_and_records_it(tmp_path):
    r = recipe(tmp_path, {"name": "cpg", "prune_schedule": "cubic", "prune_steps": 3, "max_sparsity": 0.9}, tasks=2, epochs=1)
    stream = build_stream(r.data, r.seed)
    events = []
    m = make_method(r, stream, torch.device("cpu"), on_epoch=events.append)
    free = [layer.owner.numel() for layer in m.net.masked_layers()]
    for t, task in enumerate(stream.tasks):
        record = m.learn(task, 0.0)  # a target every level meets: compaction goes all the way
        s = m.sparsity[t]
        assert s == pytest.approx(0.9)
        for layer, f in zip(m.net.masked_layers(), free):
            assert int((layer.owner == t).sum()) == f - round(s * f)
        free = [int((layer.owner == FREE).sum()) for layer in m.net.masked_layers()]
        levels = [e for e in events if e["task"] == t and "sparsity" in e]
        assert [e["sparsity"] for e in levels] == cubic_levels(0.1, 0.9, 3) and all(e["kept"] for e in levels)
        assert record.val_acc == levels[-1]["val_acc"]
        assert record.extra["sparsity"] == s
    fresh = make_method(r, stream, torch.device("cpu"))  # the chosen sparsities survive a checkpoint
    files.atomic_save({"method": m.state()}, tmp_path / "cpg.pt")
    fresh.load_state(files.load(tmp_path / "cpg.pt")["method"])
    assert fresh.sparsity == m.sparsity and len(fresh.sparsity) == 2


def test_cpg_tries_sparsities_in_steps_of_a_tenth_and_keeps_the_most_pruned_meeting_the_target(tmp_path):
    assert step_levels(0.1, 0.95) == [0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9]
    r = recipe(tmp_path, {"name": "cpg", "max_sparsity": 0.3, "prune_epochs": 1}, tasks=1, epochs=1)
    stream = build_stream(r.data, r.seed)
    events = []
    m = make_method(r, stream, torch.device("cpu"), on_epoch=events.append)
    m.learn(stream.tasks[0], 0.0)  # every level meets the target: the most pruned one is kept
    assert [e["sparsity"] for e in events if "sparsity" in e] == [0.1, 0.2, 0.3]
    assert m.sparsity == [pytest.approx(0.3)]


def test_cpg_rolls_back_to_the_last_level_that_met_its_criterion(tmp_path):
    """A compaction level that misses the criterion is undone: the task keeps the previous level's network (its
    weights and exactly its sparsity), not the failed level's.  Validation accuracies are scripted: the pick and
    level 0.1 reach 90 % (target 50), level 0.2 gets 10 %."""
    r = recipe(tmp_path, {"name": "cpg", "max_sparsity": 0.3, "prune_epochs": 1}, tasks=1, epochs=1)
    stream = build_stream(r.data, r.seed)
    m = make_method(r, stream, torch.device("cpu"))
    free = [layer.owner.numel() for layer in m.net.masked_layers()]
    scripted, seen, kept = iter([90.0, 90.0, 10.0]), [], {}

    def evaluate(task_index, data):
        if len(seen) == 1:  # level 0.1's verdict: the network it keeps
            kept.update({k: v.clone() for k, v in m.net.state_dict().items()})
        seen.append(task_index)
        return next(scripted, 90.0)

    m.evaluate = evaluate
    record = m.learn(stream.tasks[0], 50.0)
    assert m.sparsity == [pytest.approx(0.1)] and record.extra["sparsity"] == pytest.approx(0.1)
    for layer, f in zip(m.net.masked_layers(), free):
        assert int((layer.owner == 0).sum()) == f - round(0.1 * f)
    now = m.net.state_dict()  # task 0's weights and norms (not the next task's pending norm, nor bookkeeping)
    weights = [k for k in kept if k.endswith((".weight", ".bias")) and k in now and ".pending." not in k]
    assert len(weights) >= 8 and all(torch.equal(kept[k], now[k]) for k in weights), [k for k in weights if not torch.equal(kept[k], now[k])]


def test_cpg_record_breaks_its_time_down_by_phase(tmp_path):
    r = recipe(tmp_path, {"name": "cpg", "max_sparsity": 0.2, "prune_epochs": 1}, tasks=1, epochs=1)
    stream = build_stream(r.data, r.seed)
    record = make_method(r, stream, torch.device("cpu")).learn(stream.tasks[0], 0.0)
    assert set(record.stage_s) == {"pick", "compact", "other"} and min(record.stage_s.values()) >= 0
    assert sum(record.stage_s.values()) == pytest.approx(record.time_s)


def test_cpg_grows_when_the_target_is_missed_up_to_max_width(tmp_path):
    r = recipe(tmp_path, {"name": "cpg", "prune_schedule": "cubic", "prune_steps": 1, "grow_ratio": 0.5,
                             "max_width": 1.5}, tasks=1, epochs=1)
    stream = build_stream(r.data, r.seed)
    m = make_method(r, stream, torch.device("cpu"))
    full = dict(m.full_widths)
    record = m.learn(stream.tasks[0], 101.0)  # unreachable: grow until the cap
    assert record.grew and record.growth_rounds == 1
    assert all(m.net.structure.widths[g] == int(1.5 * w) for g, w in full.items())
    assert record.params_stored > m.net.full_params


# --- GROWN ablation switches -----------------------------------------------------------------------------


def test_the_four_ablation_switches_train_different_parameter_sets():
    torch.manual_seed(0)
    net = prepare(build_backbone("small_cnn", 2, {"in_channels": 1, "width": 8, "hidden": 16}),
                  torch.randn(2, 1, 8, 8), 0.5)
    net.add_task(2)
    for layer in net.masked_layers():  # task 1 leaves some of its units free (released)
        units = torch.zeros_like(layer.kind, dtype=torch.bool)
        units.view(-1)[::3] = True
        layer.set_kind(units, OFF)
    net.freeze_task(0)
    net.add_task(2)
    net.grow(ratio=0.5)
    signatures = set()
    for ablation in ("grow_only", "+selective_mask", "+lsg", "+retrain_released"):
        from grownfx.recipe.schema import GrownMethod

        net.set_policy(build_policy(1, GrownMethod(ablation=ablation).switches(), MasksConfig()))
        kinds = tuple(int(sum(int((layer.kind == k).sum()) for layer in net.masked_layers()))
                      for k in (SEL, DENSE, ATT, OFF))
        params = net.trainable_parameters()
        masked = sum(p.numel() for p in params["masks"])
        signatures.add((kinds, masked))
        if ablation == "grow_only":
            assert kinds[0] == kinds[2] == 0 and masked == 0  # old weights used as they are, grown ones dense
        if ablation == "+retrain_released":
            assert kinds[3] == 0  # released units are trained again
    assert len(signatures) == 4, signatures


def test_every_compare_method_is_registered(tmp_path):
    from grownfx.run.compare import METHODS

    stream = build_stream(recipe(tmp_path, {"name": "scratch"}).data, 0)
    for name in METHODS:
        r = recipe(tmp_path, {"name": name})
        assert make_method(r, stream, torch.device("cpu")).name == name
