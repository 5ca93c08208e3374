"""timm coverage sweep: one architecture per timm family through prepare -> grow -> new task -> train -> export.

    python scripts/timm_coverage.py                      # the whole list below, writes docs/coverage.md
    python scripts/timm_coverage.py --json docs/coverage.json   # also keep the rows
    python scripts/timm_coverage.py --only dpn68 --json docs/coverage.json   # re-run one, keep the others' rows
    python scripts/timm_coverage.py --worker resnet18    # one model in this process; prints one JSON line

Every model runs in its own subprocess (`--worker`) with one thread and a per-model timeout, so a crash, a hang
or a memory blow-up costs one row, not the sweep.  The per-model checks are `check_backbone` of
`tests/engine_checks.py` (the torchvision zoo's property sweep): seed slimming to the stated widths,
function-preserving growth, old tasks bit-exact after growth and after training a new task, exports equal to the
task-aware net.

Needs timm (`pip install -e ".[timm]"`); models are built with `pretrained=False` (nothing is downloaded).
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DOC = ROOT / "docs" / "coverage.md"
SEED_WIDTH = 0.5
SEED_GOAL = 0.35  # seed parameters / full parameters at seed width 0.5, for CNN families

# (family = timm module, model, input size, create_model kwargs, kind, user-supplied leaf modules)
MODELS: list[tuple[str, str, int, dict, str, tuple]] = [
    ("resnet", "resnet18", 32, {}, "cnn", ()),
    ("resnetv2", "resnetv2_18", 32, {}, "cnn", ()),
    ("senet", "legacy_seresnet18", 32, {}, "cnn", ()),
    ("sknet", "skresnet18", 32, {}, "cnn", ()),
    ("resnest", "resnest14d", 32, {}, "cnn", ()),
    ("res2net", "res2net50_26w_4s", 32, {}, "cnn", ()),
    ("cspnet", "cspresnet50", 64, {}, "cnn", ()),
    ("cspnext", "cspnext_tiny", 32, {}, "cnn", ()),
    ("dpn", "dpn68", 32, {}, "cnn", ()),
    ("byobnet", "repvgg_a0", 32, {}, "cnn", ()),
    ("regnet", "regnety_002", 32, {}, "cnn", ()),
    ("densenet", "densenet121", 32, {}, "cnn", ()),
    ("dla", "dla46_c", 32, {}, "cnn", ()),
    ("vgg", "vgg11_bn", 32, {}, "cnn", ()),
    ("vovnet", "ese_vovnet19b_dw", 32, {}, "cnn", ()),
    ("selecsls", "selecsls42b", 32, {}, "cnn", ()),
    ("hrnet", "hrnet_w18_small", 64, {}, "cnn", ()),
    ("xception_aligned", "xception41", 32, {}, "cnn", ()),
    ("inception_v3", "inception_v3", 75, {}, "cnn", ()),
    ("efficientnet", "efficientnet_b0", 32, {}, "cnn", ()),
    ("efficientnet (mixnet, Conv2dSame)", "tf_mixnet_s", 32, {}, "cnn", ()),
    ("mobilenetv3", "mobilenetv3_large_100", 32, {}, "cnn", ()),
    ("mobilenetv3 (lcnet)", "lcnet_050", 32, {}, "cnn", ()),
    ("hardcorenas", "hardcorenas_a", 32, {}, "cnn", ()),
    ("ghostnet", "ghostnet_050", 32, {}, "cnn", ()),
    ("repghost", "repghostnet_050", 32, {}, "cnn", ()),
    ("rexnet", "rexnet_100", 32, {}, "cnn", ()),
    ("hgnet", "hgnetv2_b0", 32, {}, "cnn", ()),
    ("repvit", "repvit_m0_9", 32, {}, "cnn", ()),
    ("fasternet", "fasternet_t0", 32, {}, "cnn", ()),
    ("starnet", "starnet_s050", 32, {}, "cnn", ()),
    ("nfnet", "dm_nfnet_f0", 64, {}, "cnn", ()),
    ("nfnet (nf_regnet)", "nf_regnet_b0", 32, {}, "cnn", ()),
    ("convnext", "convnext_atto", 32, {}, "cnn", ()),
    ("inception_next", "inception_next_atto", 32, {}, "cnn", ()),
    ("mambaout", "mambaout_femto", 32, {}, "cnn", ()),
    ("metaformer", "poolformerv2_s12", 32, {}, "cnn", ()),
    ("vision_transformer", "vit_tiny_patch16_224", 32, {"img_size": 32}, "transformer", ()),
    ("deit", "deit_tiny_patch16_224", 32, {"img_size": 32}, "transformer", ()),
    ("mlp_mixer", "mixer_s16_224", 32, {"img_size": 32}, "transformer", ()),
    ("levit", "levit_128s", 64, {"img_size": 64}, "transformer", ()),
    ("efficientformer", "efficientformer_l1", 224, {}, "transformer", ()),  # attention biases fixed at 7x7
    ("pvt_v2", "pvt_v2_b0", 32, {}, "transformer", ()),
    ("mobilevit", "mobilevit_xxs", 64, {}, "transformer", ()),
    ("edgenext", "edgenext_xx_small", 64, {}, "transformer", ()),
]


def build(name: str):
    import timm
    import torch

    for _, model, size, kw, _, _ in MODELS:
        if model == name:
            break
    else:
        size, kw = 32, {}
    net = timm.create_model(name, pretrained=False, num_classes=10, **kw)
    return net, torch.randn(2, 3, size, size)


def worker(name: str, seed_width: float) -> dict:
    """Structure (groups, seed ratio) from prepare, then the property checks; one JSON-able row."""
    import torch

    sys.path.insert(0, str(ROOT / "tests"))
    import grownfx
    from engine_checks import check_backbone

    torch.set_num_threads(1)
    leaves = next((list(m[5]) for m in MODELS if m[1] == name), [])
    row: dict = {"model": name, "leaves": leaves}
    t0 = time.time()
    try:
        torch.manual_seed(0)
        model, x = build(name)
        row["input"] = list(x.shape[1:])
        net = grownfx.prepare(model, x, seed_width=seed_width, leaf_modules=leaves, auto_leaves=True)
        row["auto_leaves"] = list(net.graph_module.auto_leaves)
        groups = net.coupling_groups
        row["groups"] = len(groups)
        row["growable"] = len(net.growable_groups)
        reasons = collections.Counter()
        for g in groups:
            if not g.growable:
                reasons[_short(g.reasons[0] if g.reasons else "width not a multiple of its granularity")] += 1
        row["fixed_reasons"] = reasons.most_common()
        t = net.add_task(10)
        row["seed_ratio"] = net.num_parameters(t) / net.full_params
        del net, model
    except Exception as exc:  # noqa: BLE001 - a row per model, whatever failed
        row["stage"] = "prepare"
        row["error"] = f"{type(exc).__name__}: {exc}"[:400]
        row["ok"] = False
        row["seconds"] = round(time.time() - t0, 1)
        return row
    try:
        check_backbone(name, seed_width, builder=build, leaf_modules=leaves, auto_leaves=True)
        row["ok"] = True
    except Exception as exc:  # noqa: BLE001
        row["stage"] = "checks"
        row["error"] = f"{type(exc).__name__}: {exc}"[:400]
        row["ok"] = False
    row["seconds"] = round(time.time() - t0, 1)
    return row


def _short(reason: str) -> str:
    """A reason without node names, so that counts group alike reasons."""
    import re

    return re.sub(r"(at|module|conv|LayerNorm|GroupNorm) '[^']*'", r"\1 '…'", reason)[:90]


def run_sweep(names: list[str], timeout: int, seed_width: float) -> list[dict]:
    rows = []
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", OMP_WAIT_POLICY="passive")
    for family, name, *_ in [m for m in MODELS if m[1] in names]:
        t0 = time.time()
        try:
            out = subprocess.run([sys.executable, __file__, "--worker", name, "--seed-width", str(seed_width)],
                                 capture_output=True, text=True, timeout=timeout, env=env, cwd=ROOT)
            lines = [ln for ln in out.stdout.splitlines() if ln.startswith("{")]
            row = json.loads(lines[-1]) if lines else {
                "model": name, "ok": False, "stage": "crash",
                "error": (out.stderr.strip().splitlines() or [f"exit {out.returncode}"])[-1][:400]}
        except subprocess.TimeoutExpired:
            row = {"model": name, "ok": False, "stage": "timeout", "error": f"over {timeout} s"}
        row["family"] = family
        row["kind"] = next(m[4] for m in MODELS if m[1] == name)
        rows.append(row)
        print(f"{name:28s} {'PASS' if row.get('ok') else 'FAIL'} growable={row.get('growable')}/"
              f"{row.get('groups')} seed={row.get('seed_ratio', float('nan')):.3f} {time.time() - t0:.0f}s "
              f"{row.get('error', '')[:120]}", flush=True)
    return rows


def write_doc(rows: list[dict], seed_width: float, path: Path = DOC) -> None:
    import timm
    import torch

    n = len(rows)
    passed = [r for r in rows if r.get("ok")]
    growable = [r for r in passed if r.get("growable")]
    no_leaves = [r for r in rows if r.get("ok") and not r.get("leaves")]
    no_auto = [r for r in no_leaves if not r.get("auto_leaves")]
    cnn = [r for r in rows if r["kind"] == "cnn"]
    cnn_seed = [r for r in cnn if r.get("ok") and r.get("seed_ratio", 1) <= SEED_GOAL]
    lines = [
        "# timm coverage",
        "",
        f"Generated by `python scripts/timm_coverage.py` (timm {timm.__version__}, torch {torch.__version__}, CPU).",
        f"One architecture per timm family (a subset of timm's {len(timm.list_modules())} model modules: {n} "
        "models, chosen small), built with `pretrained=False` and `num_classes=10`, at the smallest input it "
        "accepts, batch 2. Each goes through `check_backbone` of `tests/engine_checks.py`: `prepare` at seed width "
        f"{seed_width}, growth (outputs unchanged), a second task with growth and two training steps, old "
        "tasks bit-exact, exports equal to the task-aware net (≤ 1e-5 relative). Every model runs in its own "
        "process with one thread and a timeout. `prepare(auto_leaves=True)`: a submodule torch.fx cannot trace is "
        "kept opaque (its name is listed; its channels stay fixed) instead of raising; no model needs a "
        "user-supplied leaf module unless the table says so.",
        "",
        f"* passing all checks: **{len(passed)}/{n}**; with at least one growth site: {len(growable)}/{n}",
        f"* passing with zero user-supplied leaf modules: {len(no_leaves)}/{n} ({len(no_auto)}/{n} without any "
        "automatic leaf either)",
        f"* CNN families with seed/full parameters ≤ {SEED_GOAL} at seed width {seed_width}: "
        f"{len(cnn_seed)}/{len(cnn)}",
        "",
        "seed ratio = parameters task 1 computes with at the seed (its own head included) / parameters of the "
        "full-width model. A fixed group keeps its full width: fixed groups are never resized, so an op the "
        "analysis cannot follow costs growth sites, never correctness. The fixed-group column counts reasons "
        "(every model has the input group and the logits group fixed).",
        "",
        "| family | model | input | pass | growable / groups | seed ratio | fixed groups: reasons | failure, leaves |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in rows:
        reasons = "; ".join(f"{c}× {why}" for why, c in (r.get("fixed_reasons") or [])[:4])
        seed = f"{r['seed_ratio']:.3f}" if "seed_ratio" in r else "–"
        inp = "×".join(str(s) for s in r.get("input", [])[1:]) or "–"
        err = f"{r.get('stage')}: {r.get('error')}" if not r.get("ok") else ""
        if r.get("auto_leaves"):
            err = (err + " " if err else "") + "automatic leaves: " + ", ".join(f"`{m}`" for m in r["auto_leaves"])
        if r.get("leaves"):
            err = (err + " " if err else "") + "user leaves: " + ", ".join(f"`{m}`" for m in r["leaves"])
        gg = f"{r.get('growable', '–')} / {r.get('groups', '–')}"
        lines.append(f"| {r['family']} | {r['model']} | {inp} | {'yes' if r.get('ok') else '**no**'} | {gg} | "
                     f"{seed} | {_cell(reasons)} | {_cell(err)} |")
    swept = {r["family"].split()[0] for r in rows}
    rest = sorted(set(timm.list_modules()) - swept)
    lines += ["", f"Not swept yet ({len(rest)} timm modules; time on a shared 2-core machine, not known failures): "
              + ", ".join(rest) + ".", ""]
    path.write_text("\n".join(lines))


def _cell(s: str) -> str:
    return s.replace("|", "\\|").replace("\n", " ")


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--worker", help="run one model in this process and print its row as JSON")
    p.add_argument("--only", nargs="*", help="models to run (default: all)")
    p.add_argument("--timeout", type=int, default=420, help="seconds per model")
    p.add_argument("--seed-width", type=float, default=SEED_WIDTH)
    p.add_argument("--json", help="also write the rows here")
    p.add_argument("--no-doc", action="store_true", help="do not write docs/coverage.md")
    a = p.parse_args(argv)
    if a.worker:
        print(json.dumps(worker(a.worker, a.seed_width)), flush=True)
        return
    names = a.only or [m[1] for m in MODELS]
    rows = run_sweep(names, a.timeout, a.seed_width)
    if a.json and a.only and Path(a.json).exists():  # re-run some models: keep the other rows of an earlier sweep
        new = {r["model"]: r for r in rows}
        old = {r["model"]: r for r in json.loads(Path(a.json).read_text())}
        rows = [new.get(m[1]) or old.get(m[1]) for m in MODELS if m[1] in new or m[1] in old]
    if a.json:
        Path(a.json).write_text(json.dumps(rows, indent=1))
    if not a.no_doc:
        write_doc(rows, a.seed_width)
        print(f"wrote {DOC}")


if __name__ == "__main__":
    main()
