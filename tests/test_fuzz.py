"""The model fuzzer (tests/model_fuzzer.py): every generated classifier ends growable-and-exact, fixed with a reason,
or refused with one clear line -- never an internal traceback, never a wrong number.

A seeded subset runs in the fast suite (chosen to cover every block kind, head kind and outcome); thousands of
seeds run in the slow suite and in `python scripts/fuzz_models.py --seeds 0:2000`."""

from __future__ import annotations

import collections

import pytest
import torch

import model_fuzzer

# seeds covering the grammar (a greedy cover of seeds 0-299): every block kind, head kind, top-level pattern, 1-, 2-
# and 3-d convs, and every outcome
FAST_SEEDS = [2, 5, 6, 9, 11, 17, 63, 69, 77, 84, 98, 103, 196]


@pytest.fixture
def one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny convolutions: one thread is several times faster on a shared machine
    yield
    torch.set_num_threads(n)


def _check(seeds) -> collections.Counter:
    outcomes = collections.Counter()
    bad = []
    for seed in seeds:
        r = model_fuzzer.run_seed(seed)
        outcomes[r.outcome] += 1
        if r.outcome not in ("growable", "fixed", "refused"):
            bad.append(f"seed {seed}: {r.outcome} {r.kinds} head={r.head} root={r.root}: {r.detail}")
    assert not bad, "\n".join(bad)
    return outcomes


def test_the_grammar_has_at_least_30_op_kinds():
    assert len(model_fuzzer.KINDS) >= 30 and len(model_fuzzer.GRAMMAR) >= 50
    specs = [model_fuzzer.build(s)[2] for s in FAST_SEEDS]
    assert {k for sp in specs for k in sp.kinds} == set(model_fuzzer.KINDS)
    assert {sp.head for sp in specs} == set(model_fuzzer.HEADS) and {sp.dims for sp in specs} == {1, 2, 3}
    assert {sp.root for sp in specs} == set(model_fuzzer.ROOT)


def test_fuzzed_models_fast_subset(one_thread):
    outcomes = _check(FAST_SEEDS)
    assert outcomes["growable"] >= 5 and outcomes["fixed"] >= 1 and outcomes["refused"] >= 4, outcomes


def test_refusals_are_the_expected_ones(one_thread):
    """A hook on the model, concatenated heads, a per-class buffer: refused, each with its own reason."""
    for seed, why in ((77, "forward hook on FuzzNet itself"), (2, "concatenation of"),
                      (9, "holds one value per class")):
        r = model_fuzzer.run_seed(seed)
        assert r.outcome == "refused" and why in r.detail, (seed, r.outcome, r.detail)


def test_the_fuzzer_finds_wrong_numbers(one_thread, monkeypatch):
    """The lifecycle's checks can fail: with growth made to change the learning task's function (new consumer
    columns random instead of zero), fuzzed models come out WRONG."""
    from grownfx.engine import banks

    original = banks.MaskedLayer.resize_axis

    def noisy(self, role, src, generator=None, birth=0, **kw):
        original(self, role, src, generator=generator, birth=birth, **kw)
        if role == "in":
            with torch.no_grad():
                new = (src < 0).nonzero().squeeze(1)
                self.weight.index_fill_(1, new.to(self.weight.device), 0.5)

    monkeypatch.setattr(banks.MaskedLayer, "resize_axis", noisy)
    wrong = [model_fuzzer.run_seed(s) for s in (5, 6, 196)]
    assert any(r.outcome == "WRONG" and "growth changed" in r.detail for r in wrong), [r.detail for r in wrong]


@pytest.mark.slow
@pytest.mark.parametrize("start", range(0, 2000, 100))
def test_fuzzed_models_many_seeds(one_thread, start):
    _check(range(start, start + 100))
