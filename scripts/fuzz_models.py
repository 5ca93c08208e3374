"""Model fuzzer: random hand-written classifiers through the whole grownfx lifecycle (tests/model_fuzzer.py).

    python scripts/fuzz_models.py --seeds 0:2000                 # a table of outcomes, the defects listed
    python scripts/fuzz_models.py --seeds 0:2000 --json fuzz.json  # also every seed's row
    python scripts/fuzz_models.py --seeds 17                     # one seed, its model printed

Each seed's model ends growable-and-exact, fixed with a reason, or refused with one clear line; CRASH (an
internal traceback) and WRONG (a check that failed) are defects, and the exit code is 1 when there is any.
Runs on one thread (small convolutions are faster that way, and the machine stays usable).
"""

from __future__ import annotations

import argparse
import collections
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DEFECTS = ("CRASH", "WRONG", "INVALID")


def _seeds(text: str) -> list[int]:
    out: list[int] = []
    for part in text.split(","):
        if ":" in part:
            a, b = part.split(":")
            out.extend(range(int(a), int(b)))
        else:
            out.append(int(part))
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seeds", default="0:200", help="seeds: 0:2000, or 3,17,40 (default 0:200)")
    p.add_argument("--json", help="write every seed's row here")
    p.add_argument("--quiet", action="store_true", help="no line per defect while running")
    a = p.parse_args(argv)
    sys.path.insert(0, str(ROOT / "tests"))
    import warnings

    import torch

    import model_fuzzer

    warnings.filterwarnings("ignore")
    torch.set_num_threads(1)
    seeds = _seeds(a.seeds)
    if len(seeds) == 1:
        model, x, spec = model_fuzzer.build(seeds[0])
        print(model, tuple(x.shape), spec, sep="\n")
    rows, t0 = [], time.time()
    for i, seed in enumerate(seeds):
        r = model_fuzzer.run_seed(seed)
        rows.append(r)
        if r.outcome in DEFECTS and not a.quiet:
            print(f"seed {seed}: {r.outcome} {r.kinds} head={r.head} root={r.root}: {r.detail}", flush=True)
        if (i + 1) % 100 == 0:
            print(f"... {i + 1}/{len(seeds)} seeds, {time.time() - t0:.0f} s", flush=True)
    elapsed = time.time() - t0
    counts = collections.Counter(r.outcome for r in rows)
    print(f"\n{len(rows)} seeds in {elapsed:.0f} s ({elapsed / max(len(rows), 1):.2f} s each)\n")
    print("| outcome | seeds | share |\n| --- | --- | --- |")
    for outcome in ("growable", "fixed", "refused") + DEFECTS:
        print(f"| {outcome} | {counts.get(outcome, 0)} | {counts.get(outcome, 0) / max(len(rows), 1):.1%} |")
    refused = collections.Counter(_reason(r.detail) for r in rows if r.outcome == "refused")
    if refused:
        print("\n| refused because | seeds |\n| --- | --- |")
        for why, n in refused.most_common():
            print(f"| {why} | {n} |")
    kinds = collections.Counter(k for r in rows for k in r.kinds)
    print(f"\n{len(kinds)} block kinds drawn (of {len(model_fuzzer.KINDS)}), "
          f"{len({r.head for r in rows})} head kinds (of {len(model_fuzzer.HEADS)}), dims {sorted({r.dims for r in rows})}")
    if a.json:
        Path(a.json).write_text(json.dumps([r.__dict__ for r in rows], indent=0))
    return 1 if any(counts.get(d) for d in DEFECTS) else 0


def _reason(detail: str) -> str:
    """The kind of refusal, without the model's node names."""
    for key, label in (("cannot trace", "torch.fx cannot trace (Python control flow on a traced value)"),
                       ("itself computes differently in train and eval", "top-level train-only code"),
                       ("forward hook on", "a forward hook on the model itself"),
                       ("concatenation of", "concatenated heads"),
                       ("holds one value per class", "a per-class buffer after the head"),
                       ("number of classes is written", "the class count written into the graph"),
                       ("do not follow the number of classes", "logits that do not follow the classes"),
                       ("does not compute what", "the traced graph differs from the model"),
                       ("returns", "output selection")):
        if key in detail:
            return label
    return detail[:80]


if __name__ == "__main__":
    sys.exit(main())
