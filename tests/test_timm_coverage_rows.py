"""scripts/timm_coverage.py --from-rows: the docs written from rows files (no timm needed to merge them)."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parent.parent / "scripts" / "timm_coverage.py"


@pytest.fixture(scope="module")
def cov():
    spec = importlib.util.spec_from_file_location("timm_coverage_under_test", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _row(family, model, outcome, **kw):
    return {"family": family, "model": model, "kind": "cnn", "outcome": outcome, **kw}


def test_a_later_file_replaces_an_earlier_files_row_and_the_sweep_order_is_kept(cov, tmp_path):
    sweep = tmp_path / "rows.jsonl"
    sweep.write_text("\n".join(json.dumps(r) for r in (
        _row("dpn", "dpn68", "pass", seed_ratio=0.526), _row("resnet", "resnet18", "pass", seed_ratio=0.25),
        _row("beit", "beit_base", "CRASH", stage="timeout"))) + "\n\n")
    rerun = tmp_path / "rerun.json"  # a JSON list (docs/coverage.json's form) is read too
    rerun.write_text(json.dumps([_row("dpn", "dpn68", "pass", seed_ratio=0.291), _row("x", "extra", "pass")]))
    order = [("resnet", "resnet18"), ("dpn", "dpn68"), ("beit", "beit_base")]
    rows = cov.merge_rows([str(sweep), str(rerun)], order)
    assert [r["model"] for r in rows] == ["resnet18", "dpn68", "beit_base", "extra"]
    assert rows[1]["seed_ratio"] == 0.291
    rows = cov.merge_rows([str(rerun), str(sweep)], order)  # the other way round: the sweep's row wins
    assert rows[1]["seed_ratio"] == 0.526


@pytest.mark.parametrize("text,where", [('{"family": "a", "model": "m", "kind": "cnn"}\n{not json\n', "line 2"),
                                        ('{"model": "m"}\n', "without 'family'")])
def test_a_bad_rows_file_is_one_line_and_exit_2(cov, tmp_path, capsys, text, where):
    path = tmp_path / "rows.jsonl"
    path.write_text(text)
    with pytest.raises(SystemExit) as exc:
        cov.merge_rows([str(path)], [])
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and str(path) in err and where in err
