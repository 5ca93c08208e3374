"""timm coverage sweep: the smallest model of every timm module through prepare -> grow -> new task -> train -> export.

    python scripts/timm_coverage.py                      # every module, writes docs/coverage.md and docs/coverage.json
    python scripts/timm_coverage.py --only dpn68         # re-run some models, keep the others' rows
    python scripts/timm_coverage.py --worker resnet18    # one model in this process; prints one JSON line
    python scripts/timm_coverage.py --select pit         # choose a module's smallest model and an input size
    python scripts/timm_coverage.py --from-rows sweep.jsonl rerun.jsonl   # write the docs from rows, no re-run

Every model runs in its own subprocess (`--worker`) with one thread and a per-model timeout, so a crash, a hang
or a memory blow-up costs one row, not the sweep.  The per-model checks are `check_backbone` of
`tests/engine_checks.py` (the torchvision zoo's property sweep): seed slimming to the stated widths,
function-preserving growth, old tasks bit-exact after growth and after training a new task, exports equal to the
task-aware net; `prepare` runs
its differential check against the eager model.  Each row ends `pass`, `refused` (prepare refused the model with
one line: a SurgeryError, ModelCheckError or TraceError naming why) or `CRASH` (anything else: a defect).

Modules not in `MODELS` get their smallest model (parameters counted on the meta device, `--select`) at the smallest
input size its forward accepts (28, 32, 56, 64, ... px; `img_size` passed where the model takes it); the choice is kept
in docs/coverage.json and reused.  Needs timm (`pip install -e ".[timm]"`); `pretrained=False` (nothing is downloaded).
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DOC = ROOT / "docs" / "coverage.md"
JSON = ROOT / "docs" / "coverage.json"
SIZES = (28, 32, 56, 64, 96, 112, 128, 160, 224)  # multiples of 14 too: patch-14 ViTs (DeepSeek's) refuse 32 and 64
SEED_WIDTH = 0.5
SEED_GOAL = 0.35  # seed parameters / full parameters at seed width 0.5, for CNN families
ROWS_LOG = os.environ.get("GROWNFX_TIMM_ROWS")  # optional JSON-lines file: each row appended when it is done

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


# why a CNN family's seed stays above SEED_GOAL, where the fixed reasons alone do not say it (docs/coverage.md)
SEED_NOTES: dict[str, str] = {
    "dm_nfnet_f0": "A needed fix: a weight-standardised conv divides each filter by the spread of its weights over "
                   "its input channels, so a grown input channel would change every old filter (and the function)",
    "nf_regnet_b0": "A needed fix: a weight-standardised conv divides each filter by the spread of its weights over "
                    "its input channels, so a grown input channel would change every old filter (and the function)",
    "resnest14d": "Not followed yet: split attention's conv with groups = radix reads one variable (its groups would "
                  "have to be cut apart), and the attention's reshape back from (radix, C) to radix·C does not "
                  "know its radix axis holds the parts",
}

PLAN: dict[str, tuple[int, dict]] = {}  # model -> (input size, create_model kwargs) of the selected models


def build(name: str):
    import timm
    import torch

    for _, model, size, kw, _, _ in MODELS:
        if model == name:
            break
    else:
        size, kw = PLAN.get(name, (32, {}))
    net = timm.create_model(name, pretrained=False, num_classes=10, **kw)
    return net, torch.randn(2, 3, size, size)


def select(module: str) -> dict:
    """The module's smallest model (parameters counted on the meta device) and the smallest input it runs on."""
    import timm
    import torch

    torch.set_num_threads(1)
    counts = []
    for name in timm.list_models(module=module):
        try:
            with torch.device("meta"):
                m = timm.create_model(name, pretrained=False, num_classes=10)
            counts.append((sum(p.numel() for p in m.parameters()), name))
        except Exception:  # noqa: BLE001 - a model that cannot be built on meta is not the smallest we can tell
            continue
    row: dict = {"family": module, "kind": "cnn"}
    if not counts:
        return {**row, "model": f"({module})", "ok": False, "stage": "select", "error": "no model builds"}
    for params, name in sorted(counts)[:3]:  # the smallest that runs at some input size
        for size in SIZES:
            for kw in ({"img_size": size}, {}):
                try:
                    m = timm.create_model(name, pretrained=False, num_classes=10, **kw).eval()
                    with torch.no_grad():
                        out = m(torch.randn(2, 3, size, size))
                    if tuple(out.shape) != (2, 10):
                        continue
                except Exception:  # noqa: BLE001 - not this size
                    continue
                return {**row, "model": name, "size": size, "kw": kw, "params": params, "kind": kind_of(m)}
    return {**row, "model": sorted(counts)[0][1], "ok": False, "stage": "select",
            "error": f"no input size in {SIZES} gives (2, 10) logits"}


# module class names of token mixers that are not convolutions: attention (Attn, MHSA, LiteMLA, SHSA), state space
# models (SSM, Mamba, EfficientViM's HSMSSD), recurrent ones (Sequencer's LSTM)
_TOKEN_MIXERS = re.compile(r"attn|attention|mhsa|mha\b|mla$|shsa|ssd$|ssm|mamba|lstm|gru|rnn|transformer", re.I)


def kind_of(model) -> str:
    """'cnn' for a pure convolutional network, else 'transformer' (attention or another token mixer)."""
    import torch

    other = any(_TOKEN_MIXERS.search(type(x).__name__) or isinstance(x, (torch.nn.MultiheadAttention, torch.nn.RNNBase))
                for x in model.modules())
    return "transformer" if other else "cnn"


def plan(names_only: list[str] | None = None, timeout: int = 900, select_missing: bool = True) -> list[tuple]:
    """MODELS, then the smallest model of every other timm module (selected once, kept in docs/coverage.json;
    `select_missing=False`: a module not selected yet is left out)."""
    import timm

    known = {json.dumps([r.get("family"), r.get("model")]): r for r in _old_rows()}
    out = [m for m in MODELS]
    covered = {m[0].split()[0] for m in MODELS}
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    for module in timm.list_modules():
        if module in covered:
            continue
        row = next((r for r in known.values() if r.get("family") == module and "size" in r), None)
        if row is None and not select_missing:
            continue
        if row is None:
            try:
                res = subprocess.run([sys.executable, __file__, "--select", module], capture_output=True, text=True,
                                     timeout=timeout, env=env, cwd=ROOT)
                lines = [ln for ln in res.stdout.splitlines() if ln.startswith("{")]
                row = json.loads(lines[-1]) if lines else {"family": module, "model": f"({module})", "ok": False,
                                                           "stage": "select", "error": res.stderr[-300:]}
            except subprocess.TimeoutExpired:
                row = {"family": module, "model": f"({module})", "ok": False, "stage": "select",
                       "error": f"selecting took over {timeout} s"}
            print(f"selected {module}: {row.get('model')} at {row.get('size')} px", flush=True)
        if "size" in row:
            PLAN[row["model"]] = (row["size"], row.get("kw") or {})
        out.append((module, row["model"], row.get("size", 0), row.get("kw") or {}, row.get("kind", "cnn"), (),
                    row if "size" not in row else None))
    return out


def _old_rows() -> list[dict]:
    return json.loads(JSON.read_text()) if JSON.exists() else []


def worker(name: str, seed_width: float) -> dict:
    """Structure (groups, seed ratio) from prepare, then the property checks; one JSON-able row with `outcome`
    'pass', 'refused' (prepare refused the model with one line naming why) or 'CRASH'."""
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
        row["mode_leaves"] = list(net.graph_module.mode_leaves)
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
    except (grownfx.SurgeryError, grownfx.TraceError) as exc:
        one_line = str(exc) and "\n" not in str(exc).strip()
        row.update(stage="prepare", error=f"{type(exc).__name__}: {exc}"[:600], ok=False,
                   outcome="refused" if one_line else "CRASH", seconds=round(time.time() - t0, 1))
        return row
    except Exception as exc:  # noqa: BLE001 - a row per model, whatever failed
        row.update(stage="prepare", error=f"{type(exc).__name__}: {exc}"[:600], ok=False, outcome="CRASH",
                   seconds=round(time.time() - t0, 1))
        return row
    try:
        check_backbone(name, seed_width, builder=build, require_growth=False, leaf_modules=leaves, auto_leaves=True)
        row.update(ok=True, outcome="pass")
    except Exception as exc:  # noqa: BLE001
        row.update(stage="checks", error=f"{type(exc).__name__}: {exc}"[:600], ok=False, outcome="CRASH")
    row["seconds"] = round(time.time() - t0, 1)
    return row


def _short(reason: str) -> str:
    """A reason without node names, so that counts group alike reasons."""
    import re

    return re.sub(r"(at|module|conv|LayerNorm|GroupNorm|parameter|Function) '[^']*'", r"\1 '…'", reason)[:90]


def run_sweep(entries: list[tuple], timeout: int, seed_width: float) -> list[dict]:
    rows = []
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", OMP_WAIT_POLICY="passive")
    for entry in entries:
        family, name, size, kw, kind = entry[:5]
        t0 = time.time()
        failed = entry[6] if len(entry) > 6 else None
        if failed is not None:  # no model of the module could be selected (none builds, none runs)
            row = dict(failed, outcome="CRASH")
        else:
            try:
                out = subprocess.run([sys.executable, __file__, "--worker", name, "--seed-width", str(seed_width),
                                      "--size", str(size), "--kw", json.dumps(kw)],
                                     capture_output=True, text=True, timeout=timeout, env=env, cwd=ROOT)
                lines = [ln for ln in out.stdout.splitlines() if ln.startswith("{")]
                row = json.loads(lines[-1]) if lines else {
                    "model": name, "ok": False, "stage": "crash", "outcome": "CRASH",
                    "error": (out.stderr.strip().splitlines() or [f"exit {out.returncode}"])[-1][:400]}
            except subprocess.TimeoutExpired:
                row = {"model": name, "ok": False, "stage": "timeout", "outcome": "CRASH",
                       "error": f"over {timeout} s"}
        row.update(family=family, kind=kind, size=size, kw=kw)
        rows.append(row)
        if ROWS_LOG:  # every finished row at once, so a sweep stopped midway keeps what it measured
            with open(ROWS_LOG, "a") as f:
                f.write(json.dumps(row) + "\n")
        print(f"{name:28s} {row.get('outcome', '?'):8s} growable={row.get('growable')}/{row.get('groups')} "
              f"seed={row.get('seed_ratio', float('nan')):.3f} {time.time() - t0:.0f}s "
              f"{row.get('error', '')[:160]}", flush=True)
    return rows


def write_doc(rows: list[dict], seed_width: float, path: Path = DOC, fuzz: str = "",
              command: str = "python scripts/timm_coverage.py") -> None:
    import timm
    import torch

    n = len(rows)
    passed = [r for r in rows if r.get("outcome") == "pass"]
    refused = [r for r in rows if r.get("outcome") == "refused"]
    timed_out = [r for r in rows if r.get("stage") == "timeout"]
    crashed = [r for r in rows if r.get("outcome") not in ("pass", "refused") and r not in timed_out]
    growable = [r for r in passed if r.get("growable")]
    no_leaves = [r for r in passed if not r.get("leaves")]
    no_auto = [r for r in no_leaves if not r.get("auto_leaves")]
    cnn = [r for r in rows if r["kind"] == "cnn"]
    cnn_seed = [r for r in cnn if r.get("ok") and r.get("seed_ratio", 1) <= SEED_GOAL]
    modules = timm.list_modules()
    families = {r["family"].split()[0] for r in rows}
    lines = [
        "# timm coverage",
        "",
        f"Generated by `{command}` (timm {timm.__version__}, torch {torch.__version__}, CPU).",
        f"The smallest model of every timm module ({len(families & set(modules))} of the {len(modules)} modules of "
        f"`timm.list_modules()`; {n} models: a few modules have a second row for a layer kind of their own), built "
        "with `pretrained=False` and `num_classes=10` at the smallest input it accepts, batch 2. `prepare` checks its "
        "reading of each model against the model itself (outputs in eval and train mode, gradients; "
        "docs/architecture.md §1), then `check_backbone` of `tests/engine_checks.py` runs: `prepare` at seed width "
        f"{seed_width}, growth (outputs unchanged), a second task with growth and two training steps, old "
        "tasks bit-exact, exports equal to the task-aware net (≤ 1e-5 relative). Every model runs in its own "
        "process with one thread and a timeout. `prepare(auto_leaves=True)`: a submodule torch.fx cannot trace is "
        "kept opaque (its name is listed; its channels stay fixed) instead of raising; no model needs a "
        "user-supplied leaf module unless the table says so. A model is `refused` when `prepare` declines it with "
        "one line naming why (the table quotes it); anything else that fails is a crash.",
        "",
        f"* passing all checks: **{len(passed)}/{n}**; refused with a reason: {len(refused)}/{n}; "
        f"**crashes: {len(crashed)}**" + (f"; not finished within the per-model timeout: {len(timed_out)} ("
                                          + ", ".join(r["model"] for r in timed_out) + ")" if timed_out else ""),
        f"* with at least one growth site: {len(growable)}/{n}; passing with zero user-supplied leaf modules: "
        f"{len(no_leaves)}/{n} ({len(no_auto)}/{n} without any automatic leaf either)",
        f"* CNN families with seed/full parameters ≤ {SEED_GOAL} at seed width {seed_width}: "
        f"{len(cnn_seed)}/{len(cnn)} ({len(cnn_seed) / max(len(cnn), 1):.0%})",
        "",
        "seed ratio = parameters task 1 computes with at the seed (its own head included) / parameters of the "
        "full-width model. A fixed group keeps its full width: fixed groups are never resized, so an op the "
        "analysis cannot follow costs growth sites, never correctness. The fixed-group column counts reasons "
        "(every model has the input group and the logits group fixed).",
        "",
        "| family | model | input | outcome | growable / groups | seed ratio | fixed groups: reasons | why refused, "
        "leaves |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in rows:
        reasons = "; ".join(f"{c}× {why}" for why, c in (r.get("fixed_reasons") or [])[:4])
        seed = f"{r['seed_ratio']:.3f}" if "seed_ratio" in r else "–"
        size = f"{r['size']}×{r['size']}" if r.get("size") else "–"  # a row that did not build its model
        inp = "×".join(str(s) for s in r.get("input", [])[1:]) or size
        err = f"{r.get('stage')}: {r.get('error')}" if not r.get("ok") else ""
        for key, label in (("auto_leaves", "automatic leaves"), ("mode_leaves", "leaves for train/eval"),
                           ("leaves", "user leaves")):
            if r.get(key):
                err = (err + " " if err else "") + f"{label}: " + ", ".join(f"`{m}`" for m in r[key][:6])
        gg = f"{r.get('growable', '–')} / {r.get('groups', '–')}"
        outcome = {"pass": "pass", "refused": "refused"}.get(r.get("outcome"), "**CRASH**")
        if r in timed_out:
            outcome = "timeout"
        lines.append(f"| {r['family']} | {r['model']} | {inp} | {outcome} | {gg} | {seed} | {_cell(reasons)} | "
                     f"{_cell(err)} |")
    above = [r for r in cnn if r.get("ok") and r.get("seed_ratio", 0) > SEED_GOAL]
    if above:
        lines += ["", f"CNN families above {SEED_GOAL} and why (the fixed groups that keep their full width):", ""]
        for r in above:
            kinds: collections.Counter = collections.Counter()
            for why, c in r.get("fixed_reasons") or []:
                if not why.startswith("touches the"):
                    kinds[re.sub(r" \(\(.*|\(\(.*", "", re.sub(r"'[^']*'", "'…'", why)).strip()] += c
            lines.append(f"* {r['family']}, {r['model']} ({r['seed_ratio']:.3f}): fixed groups: "
                         + "; ".join(f"{c}× {why}" for why, c in kinds.most_common())
                         + (f". {SEED_NOTES[r['model']]}" if r["model"] in SEED_NOTES else ""))
    rest = sorted(set(modules) - families)
    if rest:
        lines += ["", f"Not swept ({len(rest)} timm modules): " + ", ".join(rest) + "."]
    if fuzz:
        lines += ["", fuzz]
    lines.append("")
    path.write_text("\n".join(lines))


def _cell(s: str) -> str:
    return s.replace("|", "\\|").replace("\n", " ")


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--worker", help="run one model in this process and print its row as JSON")
    p.add_argument("--select", help="choose a timm module's smallest model and input size; print it as JSON")
    p.add_argument("--size", type=int, help="(--worker) the input size")
    p.add_argument("--kw", default="{}", help="(--worker) create_model keyword arguments, as JSON")
    p.add_argument("--only", nargs="*", help="models or families to run (default: all)")
    p.add_argument("--timeout", type=int, default=600, help="seconds per model")
    p.add_argument("--seed-width", type=float, default=SEED_WIDTH)
    p.add_argument("--no-doc", action="store_true", help="do not write docs/coverage.md and docs/coverage.json")
    p.add_argument("--fuzz", help="a markdown file with the model fuzzer's table, appended to docs/coverage.md")
    p.add_argument("--from-rows", nargs="+", metavar="FILE",
                   help="write docs/coverage.md and docs/coverage.json from rows files (JSON lines, as "
                        "GROWNFX_TIMM_ROWS writes them, or a JSON list) without running anything; a later file's "
                        "row of a model replaces an earlier one's")
    a = p.parse_args(argv)
    if a.from_rows:
        rows = merge_rows(a.from_rows, [(e[0], e[1]) for e in plan(select_missing=False)])
        _write_docs(rows, a)
        return
    if a.select:
        print(json.dumps(select(a.select)), flush=True)
        return
    if a.worker:
        if a.size:
            PLAN[a.worker] = (a.size, json.loads(a.kw))
        print(json.dumps(worker(a.worker, a.seed_width)), flush=True)
        return
    entries = plan()
    if a.only:
        entries = [e for e in entries if e[1] in a.only or e[0] in a.only]
    rows = run_sweep(entries, a.timeout, a.seed_width)
    if a.only:  # re-run some models: keep the other rows of an earlier sweep
        new = {(r["family"], r["model"]): r for r in rows}
        old = {(r["family"], r["model"]): r for r in _old_rows()}
        order = [(e[0], e[1]) for e in plan()]
        rows = [new.get(k) or old[k] for k in order if k in new or k in old]
    if not a.no_doc:
        _write_docs(rows, a)


def _write_docs(rows: list[dict], a) -> None:
    fuzz = Path(a.fuzz).read_text() if a.fuzz else _kept_fuzz_section()
    JSON.write_text(json.dumps(rows, indent=1))
    command = "python scripts/timm_coverage.py" + (" --from-rows " + " ".join(Path(f).name for f in a.from_rows)
                                                   if a.from_rows else "")
    write_doc(rows, a.seed_width, fuzz=fuzz, command=command)
    print(f"wrote {DOC} and {JSON}")


def read_rows(path: str) -> list[dict]:
    """The rows of one file: JSON lines (GROWNFX_TIMM_ROWS) or one JSON list (docs/coverage.json)."""
    try:
        text = Path(path).read_text()
        if text.lstrip().startswith("["):
            return json.loads(text)
        rows = []
        for i, ln in enumerate(text.splitlines(), 1):
            if ln.strip():
                try:
                    rows.append(json.loads(ln))
                except json.JSONDecodeError as exc:
                    _bad_input(f"{path}, line {i}: not a JSON row ({exc.msg})")
        return rows
    except (OSError, json.JSONDecodeError) as exc:
        _bad_input(f"{path}: cannot read rows ({exc})")


def _bad_input(message: str):
    print(f"error: {message}", file=sys.stderr)
    raise SystemExit(2)


def merge_rows(paths: list[str], order: list[tuple[str, str]]) -> list[dict]:
    """Rows of several files, one per (family, model): a later file's row replaces an earlier one's.  In the
    order of `order` ((family, model): the sweep's); rows of models not in it come last."""
    merged: dict[tuple, dict] = {}
    for path in paths:
        for r in read_rows(path):
            if not isinstance(r, dict) or not {"family", "model", "kind"} <= set(r):
                _bad_input(f"{path}: a row without 'family', 'model' and 'kind' ({str(r)[:80]}): not a row of "
                           "this script")
            merged[(r["family"], r["model"])] = r
    rank = {k: i for i, k in enumerate(order)}
    return sorted(merged.values(), key=lambda r: rank.get((r["family"], r["model"]), len(order)))


def _kept_fuzz_section() -> str:
    """The fuzzer's section of the current docs/coverage.md, kept when only the timm rows are re-run."""
    if not DOC.exists():
        return ""
    text = DOC.read_text()
    i = text.find("## Model fuzzer")
    return text[i:].strip() if i >= 0 else ""


if __name__ == "__main__":
    main()
