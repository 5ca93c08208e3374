"""cli_startup: wall time of the `grownfx` commands that need no model, and whether they import torch.

    python -m benchmarks.cli_startup              # 5 repeats each, prints a table
    python -m benchmarks.cli_startup --repeats 1 --json out.json

Each command runs in a fresh interpreter (`python -c` calling the Typer app, as the console script does) and
reports the median wall time and whether `torch` ended up in sys.modules.  The goal (issue 15): --help, ls, cp
and `validate --no-data-check` under 0.5 s, none of them importing torch.  For the import tree of one command:
`python -X importtime -m grownfx ls 2> imports.txt`.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PROBE = ("import sys\nfrom grownfx.cli.app import app\n"
         "try:\n    app(sys.argv[1:], prog_name='grownfx')\nexcept SystemExit:\n    pass\n"
         "sys.stderr.write('\\nTORCH=%d\\n' % ('torch' in sys.modules))\n")


def commands(tmp: Path) -> dict[str, list[str]]:
    return {
        "grownfx --help": ["--help"],
        "grownfx run --help": ["run", "--help"],
        "grownfx ls": ["ls"],
        "grownfx cp digits_quickstart": ["cp", "digits_quickstart", str(tmp / "r.yaml"), "--force"],
        "grownfx validate digits_quickstart --no-data-check": ["validate", "digits_quickstart", "--no-data-check"],
    }


def measure(args: list[str], repeats: int) -> tuple[float, bool]:
    times, torch_loaded = [], False
    for _ in range(repeats):
        t0 = time.perf_counter()
        res = subprocess.run([sys.executable, "-c", PROBE, *args], capture_output=True, text=True, cwd=ROOT)
        times.append(time.perf_counter() - t0)
        torch_loaded |= "TORCH=1" in res.stderr
    return statistics.median(times), torch_loaded


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--json", type=Path, default=None)
    ap.add_argument("--quick", action="store_true", help="one repeat")
    a = ap.parse_args()
    repeats = 1 if a.quick else a.repeats
    rows = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name, args in commands(Path(tmp)).items():
            secs, torch_loaded = measure(args, repeats)
            rows[name] = {"seconds": round(secs, 3), "imports_torch": torch_loaded}
    width = max(map(len, rows))
    print(f"{'command'.ljust(width)}  median s  imports torch")
    for name, r in rows.items():
        print(f"{name.ljust(width)}  {r['seconds']:8.2f}  {'yes' if r['imports_torch'] else 'no'}")
    if a.json:
        a.json.write_text(json.dumps({"benchmark": "cli_startup", "repeats": repeats, "results": rows}, indent=1))


if __name__ == "__main__":
    main()
