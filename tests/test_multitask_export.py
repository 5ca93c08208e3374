"""Issue 16 (goal 3): every task served from one artifact, and per-task caching in the task-aware model.

* the artifact (grownfx.engine.multitask, read by the torch-only multitask_runtime) computes every task bit for bit
  as the task-aware model and the per-task export (every visible channel kept), at any batch size
* it loads with torch alone (grownfx blocked from importing), and its loader imports nothing but torch and the
  standard library
* its size is <= 1.10x the frozen banks + every per-task copy + 1 bit per unit per task, counted from the net here
* `grownfx export RUN --all-tasks` writes it, its loader and meta.json for a real (tiny) run
* the task-aware model keeps up to `ctx.cache.finished_cache_size` finished tasks' weights per layer (LRU): alternating
  tasks rebuilds nothing, outputs stay identical, and no layer keeps more than the bound
* attention (nn.MultiheadAttention, the tiny transformer of test_transformer_growth) is computed as the eager model
  computes it: torch's fused kernel where eager torch takes it, its decomposed form where not
"""

from __future__ import annotations

import ast
import json
import math
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import grownfx
from grownfx.engine import multitask as MT
from grownfx.engine import multitask_runtime as R
from grownfx.engine.banks import MaskedLayer
from grownfx.engine.layers import PerTask, TaskParameter
from grownfx.models import build_backbone
from test_transformer_growth import D, TOKENS, _net
from test_transformer_growth import _train as _train_tokens

SHAPE = (1, 8, 8)
CLASSES = 3


def _train(net, t, steps=3):
    g = torch.Generator().manual_seed(10 + t)
    x, y = torch.randn(32, *SHAPE, generator=g), torch.randint(0, CLASSES, (32,), generator=g)
    p = net.trainable_parameters()
    gates = list(net.channel_scale.parameters()) if net.channel_scale is not None else []
    opt = torch.optim.SGD(p["weights"] + p["masks"] + gates, lr=0.05)
    net.train()
    for _ in range(steps):
        opt.zero_grad()
        F.cross_entropy(net(x, task=t), y).backward()
        opt.step()
    with torch.no_grad():  # unit-mask scores around the threshold: about a third of the masked units dropped
        for m in net.masked_layers():
            if m.score is not None:
                m.score.copy_(torch.randn(m.score.shape, generator=g) * 0.01)
    net.eval()


def make_net(tasks=3, learning=False):
    """small_cnn with `tasks` finished tasks (partial masks; growth before task 1, so widths differ), and one more
    task being learned when `learning`."""
    torch.manual_seed(0)
    net = grownfx.prepare(build_backbone("small_cnn", CLASSES), torch.randn(2, *SHAPE), seed_width=0.5, seed=0)
    for t in range(tasks + learning):
        net.add_task(CLASSES)
        if t == 1:
            net.grow(ratio=0.5)
        _train(net, t)
        if t < tasks:
            net.freeze_task(t)
    return net.eval()


@pytest.fixture(scope="module")
def artifact(tmp_path_factory):
    net = make_net()
    path = tmp_path_factory.mktemp("mt") / "model.pt"
    MT.save(net, torch.randn(2, *SHAPE), path)
    return net, path


def reference_bytes(net, tasks: int) -> int:
    """Frozen banks + per-task copies (norms, heads, biases) of `tasks` tasks + 1 bit per unit per task."""
    total = 0
    for m in net.modules():
        if isinstance(m, MaskedLayer):
            total += m.frozen.numel() * m.frozen.element_size()
            total += tasks * math.ceil(m.owner.numel() / 8)
        elif isinstance(m, (PerTask, TaskParameter)):
            for t in range(tasks):
                c = m.copies[t]
                ts = [c] if isinstance(c, torch.Tensor) else list(c.parameters()) + list(c.buffers())
                total += sum(x.numel() * x.element_size() for x in ts)
    return total


def test_artifact_computes_every_task_bit_for_bit(artifact):
    net, path = artifact
    model = R.load(path)
    assert model.num_tasks == 3
    widths = {tuple(net.export(t, prune_unused=False).state_dict()["features.0.weight"].shape) for t in range(3)}
    assert len(widths) == 2, "growth should give the tasks different widths"
    for batch in (1, 5):
        x = torch.randn(batch, *SHAPE, generator=torch.Generator().manual_seed(batch))
        with torch.no_grad():
            for t in (0, 2, 1, 0):  # in any order: tasks switch from one call to the next
                got = model(x, task=t)
                assert torch.equal(got, net(x, task=t)), (t, batch)
                assert torch.equal(got, net.export(t, prune_unused=False)(x)), (t, batch)
                pruned = net.export(t)(x)  # the default per-task export sums fewer zero products
                assert float((got - pruned).abs().max() / pruned.abs().max()) <= 1e-5


def test_a_task_still_being_learned_is_stored_whole_and_still_exact(tmp_path):
    net = make_net(tasks=2, learning=True)
    blob = MT.save(net, torch.randn(2, *SHAPE), tmp_path / "m.pt")
    layers = len(net.masked_layers())
    # the learning task's weights are not the frozen bank under a mask: stored whole; the finished ones are not
    assert blob["stats"]["dense_masked"] == layers and blob["stats"]["masked"] == 2 * layers
    model = R.load(tmp_path / "m.pt")
    x = torch.randn(4, *SHAPE)
    with torch.no_grad():
        for t in range(3):
            assert torch.equal(model(x, task=t), net(x, task=t)), t


def test_a_graph_without_a_dynamic_batch_falls_back_to_a_checked_static_program(tmp_path, monkeypatch):
    net = make_net(tasks=2)
    monkeypatch.setattr(MT, "MODES", ("static",))  # as when torch.export cannot make the batch dynamic
    blob = MT.save(net, torch.randn(2, *SHAPE), tmp_path / "m.pt")
    assert blob["stats"]["exports"] == 2
    model = R.load(tmp_path / "m.pt")
    x = torch.randn(2, *SHAPE)
    with torch.no_grad():
        for t in (1, 0, 1):
            assert torch.equal(model(x, task=t), net(x, task=t)), t
        with pytest.raises(Exception):  # its input checks hold: the batch size it was exported with
            model(torch.randn(3, *SHAPE), task=0)


def test_artifact_size_is_within_the_budget(artifact):
    net, path = artifact
    ref = reference_bytes(net, 3)
    size = path.stat().st_size
    assert size <= 1.10 * ref, (size, ref, size / ref)
    per_task_exports = sum(sum(v.numel() * v.element_size() for v in net.export(t, prune_unused=False)
                               .state_dict().values()) for t in range(3))
    assert size < 0.6 * per_task_exports  # the bank is stored once, not once per task


LOADER_CHECK = """
import sys, json, torch
sys.modules['grownfx'] = None  # any import of grownfx fails
sys.path.insert(0, sys.argv[1])
from multitask import load
model = load(sys.argv[2])
x = torch.load(sys.argv[3])
torch.save({t: model(x, task=t) for t in range(model.num_tasks)}, sys.argv[4])
print(json.dumps(sorted(m for m in sys.modules if m.startswith('grownfx'))))
"""


def test_artifact_loads_with_torch_alone(artifact, tmp_path):
    net, path = artifact
    shutil.copy(R.__file__, tmp_path / "multitask.py")
    assert (tmp_path / "multitask.py").read_text() == MT.runtime_source()
    x = torch.randn(3, *SHAPE)
    torch.save(x, tmp_path / "x.pt")
    proc = subprocess.run([sys.executable, "-c", LOADER_CHECK, str(tmp_path), str(path), str(tmp_path / "x.pt"),
                           str(tmp_path / "out.pt")], capture_output=True, text=True, timeout=300,
                          cwd=tmp_path, env={"PATH": "/usr/bin:/bin", "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout.strip().splitlines()[-1]) == ["grownfx"]  # only the blocked entry
    out = torch.load(tmp_path / "out.pt")
    with torch.no_grad():
        for t in range(3):
            assert torch.equal(out[t], net(x, task=t)), t
    # and the loader's own imports: the standard library and torch, nothing else
    tree = ast.parse(Path(R.__file__).read_text())
    names = {a.name.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
    names |= {n.module.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module}
    assert names - {"torch"} <= set(sys.stdlib_module_names) | {"__future__"}, names


def test_artifact_cache_is_bounded_and_keeps_outputs(artifact):
    net, path = artifact
    model = R.load(path, cache_tasks=1)
    x = torch.randn(2, *SHAPE)
    with torch.no_grad():
        for t in (0, 1, 2, 1, 0):
            assert torch.equal(model(x, task=t), net(x, task=t))
            assert len(model._cache) == 1
    model = R.load(path)  # default: every task kept once built
    with torch.no_grad():
        for t in (0, 1, 2, 1, 0):
            model(x, task=t)
    assert len(model._cache) == 3
    with pytest.raises(IndexError):
        model(x, task=3)


# -- per-task cache of the task-aware model -------------------------------------------------------------------


def _count_builds(monkeypatch) -> list:
    calls = []
    build = MaskedLayer._compute_finished_weight

    def counting(self, task):
        calls.append((self.target, task))
        return build(self, task)

    monkeypatch.setattr(MaskedLayer, "_compute_finished_weight", counting)
    return calls


def _lru_sizes(net) -> list[int]:
    return [len(v) for k, v in net.ctx.cache._entries.items() if len(k) == 3 and k[1] == "finished"]


def test_task_aware_model_alternates_tasks_without_rebuilding(monkeypatch):
    net = make_net()
    x = torch.randn(1, *SHAPE)
    fresh = make_net()  # the same net, never served alternating tasks
    with torch.no_grad():
        want = {t: fresh(x, task=t) for t in range(3)}
    calls = _count_builds(monkeypatch)
    layers = len(net.masked_layers())
    assert net.ctx.cache.finished_cache_size >= 2
    with torch.no_grad():
        for _ in range(5):
            for t in (0, 1):
                assert torch.equal(net(x, task=t), want[t]), t
    assert len(calls) == 2 * layers  # each task's weights built once, then served from the cache


def test_task_aware_cache_stays_bounded(monkeypatch):
    net = make_net()
    x = torch.randn(1, *SHAPE)
    net.ctx.cache.finished_cache_size = 2
    with torch.no_grad():
        want = {t: net(x, task=t) for t in range(3)}  # leaves tasks 1 and 2 cached
    calls = _count_builds(monkeypatch)
    with torch.no_grad():
        for _ in range(3):
            for t in (0, 1, 2):
                assert torch.equal(net(x, task=t), want[t]), t
                assert max(_lru_sizes(net)) <= 2
    layers = len(net.masked_layers())
    assert len(calls) == 9 * layers  # three tasks through two slots in turn: every call rebuilds (LRU)
    net.ctx.cache.finished_cache_size = 1  # lowered: the next call, a hit, drops the other task
    with torch.no_grad():
        assert torch.equal(net(x, task=2), want[2])
    assert max(_lru_sizes(net)) == 1 and len(calls) == 9 * layers
    net.ctx.bump()  # a structural change clears every cached task
    assert _lru_sizes(net) == []


# -- the command ----------------------------------------------------------------------------------------------


def test_cli_export_all_tasks_of_a_tiny_run(tmp_path):
    from cli_helpers import invoke
    from test_reliability import quiet, tiny

    from grownfx.run.runner import run

    out = tmp_path / "run"
    run(tiny(out), echo=quiet)
    result = invoke("export", str(out), "--all-tasks", "--verify")
    assert result.exit_code == 0, result.output
    folder = out / "exports" / "all_tasks"
    assert "exported 2 task(s) in one file" in result.output and "max relative error 0.0e+00" in result.output
    meta = json.loads((folder / "meta.json").read_text())
    assert [t["task"] for t in meta["tasks"]] == [1, 2] and meta["verified_max_rel_error"] == 0.0
    assert meta["size_ratio"] <= 1.10 and meta["bytes"] == (folder / "model.pt").stat().st_size
    assert (folder / "multitask.py").read_text() == MT.runtime_source()
    # raw inputs: the preprocessing in every task's graph, as --bake-preprocessing does for one task
    result = invoke("export", str(out), "--all-tasks", "--bake-preprocessing", "--verify")
    assert result.exit_code == 0 and json.loads((folder / "meta.json").read_text())["preprocessing_baked"]
    model = R.load(folder / "model.pt")
    plain = torch.export.load(str(out / "exports" / "task_1" / "model.pt2")).module()
    raw = torch.randint(0, 17, (4, 1, 8, 8)).float()  # digits pixels are 0..16
    assert torch.allclose(model(raw, task=0), plain((raw / 16 - 0.3053) / 0.376), atol=1e-5)
    assert invoke("export", str(out), "--all-tasks", "--task", "1").exit_code == 2
    assert invoke("export", str(out), "--all-tasks", "--format", "onnx").exit_code == 2
    assert invoke("export", str(out)).exit_code == 2  # neither --task nor --all-tasks


def test_a_corrupt_file_checked_by_its_checksum_file_names_that_file(tmp_path):
    """With no meta.json beside it, the SHA-256 comes from `<file>.sha256`: the refusal names that file."""
    from grownfx.engine.multitask_runtime import IntegrityError, check_sha256, file_sha256

    path = tmp_path / "last.pt"
    path.write_bytes(b"damaged")
    (tmp_path / "last.pt.sha256").write_text(json.dumps({"sha256": file_sha256(b"intact")}))
    check_sha256(b"intact", path)
    with pytest.raises(IntegrityError, match=r"does not match the one in last\.pt\.sha256"):
        check_sha256(b"damaged", path)

    # a meta.json beside it that records other files only: the SHA-256 still comes from the checksum file, named
    (tmp_path / "meta.json").write_text(json.dumps({"file": "other.pt", "sha256": file_sha256(b"other")}))
    check_sha256(b"intact", path)
    with pytest.raises(IntegrityError, match=r"does not match the one in last\.pt\.sha256"):
        check_sha256(b"damaged", path)


def test_stored_programs_keep_no_record_of_where_each_op_came_from(tmp_path):
    """Stack traces and module stacks of the export are dropped before saving (they would be a third of the file
    and show the exporting machine's paths); the programs run without them."""
    import io

    path = tmp_path / "m.pt"
    MT.save(make_net(tasks=1), torch.randn(2, *SHAPE), path)
    for blob, _mode in R.load(path)._blobs:
        ep = torch.export.load(io.BytesIO(blob))
        assert not [n.name for n in ep.graph.nodes if n.meta.get("stack_trace") or n.meta.get("nn_module_stack")]


def test_torch_export_s_notes_stay_out_of_the_users_log_and_its_levels_come_back(tmp_path, caplog, monkeypatch):
    """torch.export logs notes on the dynamic dimensions the artifact asks for (our choice, not the user's
    concern): nothing reaches a user's log below ERROR while a program is exported, even at DEBUG, and the
    loggers' levels are the user's again after."""
    import logging

    names = ("torch._export", "torch.export", "torch.fx.experimental.symbolic_shapes")
    for name in names:
        caplog.set_level(logging.DEBUG, logger=name)
    windows, real = [], torch.export.export

    def export(*args, **kwargs):  # the records logged while torch.export runs
        start = len(caplog.records)
        try:
            return real(*args, **kwargs)
        finally:
            windows.append(caplog.records[start:])

    monkeypatch.setattr(torch.export, "export", export)
    MT.save(make_net(tasks=1), torch.randn(2, *SHAPE), tmp_path / "m.pt")
    assert windows
    logged = [r for w in windows for r in w if r.name.startswith(names) and r.levelno < logging.ERROR]
    assert not [r.getMessage()[:80] for r in logged]
    assert [logging.getLogger(n).level for n in names] == [logging.DEBUG] * 3


# --- attention: the artifact computes it as the eager model does ------------------------------------------------


def test_the_all_tasks_artifact_keeps_attention_s_packed_projection_as_a_masked_bank(tmp_path):
    """nn.MultiheadAttention's `in_proj_weight` is the bank of the engine's `attn.in_proj` layer: the artifact
    stores it once with a bit per unit per task, as every other masked layer, and computes each task bit for bit."""
    net, x = _net()
    for t in range(2):
        net.add_task(4)
        _train_tokens(net, x, t)
        net.freeze_task(t)
    layers = net.masked_layers()
    assert sum(m.target.endswith("attn.in_proj") for m in layers) == 2
    blob = MT.save(net, x, tmp_path / "m.pt")
    assert blob["stats"]["masked"] == 2 * len(layers)
    model = R.load(tmp_path / "m.pt")
    with torch.no_grad():
        for t in range(2):
            assert torch.equal(model(x, task=t), net(x, task=t)), t


class Attend(nn.Module):
    """One self-attention of `heads` heads over the tokens (at seed width 0.5: half of them, so 4 heads give the
    even count torch's fused kernel needs and 2 the odd one it refuses); `padding`: the last token masked out by
    a bool key_padding_mask; `weights`: the attention weights (averaged over heads, torch's default) read into
    the logits."""

    def __init__(self, heads: int, padding: bool = False, weights: bool = False):
        super().__init__()
        self.embed = nn.Linear(8, D)
        self.attn = nn.MultiheadAttention(D, heads, batch_first=True)
        self.head = nn.Linear(D, 4)
        self.padding, self.weights = padding, weights

    def forward(self, x):
        y = self.embed(x)
        pad = None
        if self.padding:
            pad = (torch.arange(x.shape[1]) == x.shape[1] - 1).expand(x.shape[0], -1)
        if self.weights:
            out, w = self.attn(y, y, y, key_padding_mask=pad)
            return self.head(out.mean(1)) + w.mean((1, 2)).unsqueeze(1)
        return self.head(self.attn(y, y, y, key_padding_mask=pad, need_weights=False)[0].mean(1))


@pytest.mark.parametrize("heads,padding,weights", [(4, False, False), (2, False, False), (4, True, False),
                                                   (4, False, True)],
                         ids=["fused", "odd heads: not fused", "bool padding mask", "weights read"])
def test_the_all_tasks_artifact_computes_attention_as_the_eager_model_does(tmp_path, heads, padding, weights):
    """Where eager torch takes the fused attention kernel (even head count, no grad) the artifact's program calls
    it too, with the same masks and defaults; where it does not (an odd head count), the program keeps torch's
    decomposed attention: each task bit for bit either way."""
    torch.manual_seed(0)
    x = torch.randn(3, TOKENS, 8)
    net = grownfx.prepare(Attend(heads, padding, weights), x, seed_width=0.5)
    for t in range(2):
        net.add_task(4)
        _train_tokens(net, x, t)
        net.freeze_task(t)
    plain = net.export(0, prune_unused=False).eval()
    seed_heads = heads // 2
    assert len(MT._fused_attentions(plain, x)) == (1 if seed_heads % 2 == 0 else 0)
    MT.save(net, x, tmp_path / "m.pt")
    model = R.load(tmp_path / "m.pt")
    with torch.no_grad():
        for t in range(2):
            assert torch.equal(model(x, task=t), net(x, task=t)), t
