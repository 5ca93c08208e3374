"""The seed paper's published numbers (GROWN, Yang et al., AAAI 2022), written out once for every report.

`PAPER[benchmark]`: "source", "acc" {row name: (accuracy per task %, average, final model size)}, "size" {row name:
model size after each task}, and for Superclass-20 "ablation" (Table 5: first and last rows absolute, the others
deltas to the row above).  The run report prints the rows of `RUN_REPORT_ROWS` beside a run; the comparison
report prints every row.  `tests/test_report.py` checks the tables against themselves (averages, ablation sums,
final sizes), which catches a mistyped number.
"""

from __future__ import annotations

from typing import Optional

__all__ = ["ABLATION_ROWS", "PAPER", "RUN_REPORT_ROWS", "PAPER_INCONSISTENT_ABLATION_TASKS", "PAPER_INCONSISTENT_AVERAGES",
           "benchmark_of", "published"]

_S10 = "cifar100_split10"
_S20 = "cifar100_superclass20"
# The seed paper's published numbers: per-task accuracy (%), average, final size; model size after each task.
PAPER: dict[str, dict] = {
    _S10: {"source": "GROWN (AAAI 2022), Tables 1 and 2", "acc": {
        "Scratch": ([62.4, 57.0, 67.8, 64.4, 67.8, 67.2, 68.6, 67.6, 61.4, 69.6], 63.75, 10.0),
        "PNN": ([58.2, 45.6, 59.4, 46.8, 53.2, 58.0, 61.2, 60.4, 53.8, 62.4], 55.90, 1.7),
        "Grow": ([56.4, 45.4, 56.6, 47.8, 53.2, 55.6, 61.8, 57.4, 53.2, 59.8], 54.72, 1.3),
        "DEN": ([61.3, 49.8, 60.2, 49.4, 54.5, 57.1, 64.3, 62.7, 55.1, 66.5], 58.09, 1.8),
        "CPG": ([59.4, 55.2, 64.8, 57.4, 59.6, 59.4, 66.2, 62.8, 57.6, 65.4], 60.12, 1.3),
        "APD": ([55.1, 52.5, 62.3, 56.7, 61.4, 58.2, 63.4, 63.1, 54.8, 64.2], 57.54, 1.3),
        "GROWN": ([57.6, 53.4, 65.2, 58.8, 60.4, 60.6, 65.4, 62.2, 58.0, 66.4], 60.83, 1.2)},
        "size": {
        "Scratch": [float(k) for k in range(1, 11)],
        "PNN": [1.0, 1.08, 1.16, 1.24, 1.32, 1.40, 1.48, 1.54, 1.62, 1.7],
        "Grow": [0.5, 0.64, 0.78, 0.86, 0.92, 0.99, 1.06, 1.16, 1.24, 1.3],
        "DEN": [1.0, 1.2, 1.46, 1.46, 1.64, 1.64, 1.8, 1.8, 1.8, 1.8],
        "CPG": [1.0] + [1.3] * 9,  # printed as "1.0x 1.3x 1.3x"
        "APD": [1.0, 1.05, 1.10, 1.13, 1.16, 1.19, 1.23, 1.26, 1.28, 1.3],
        "GROWN": [0.5, 0.64, 0.78, 0.78, 0.84, 0.90, 0.90, 1.10, 1.15, 1.2]}},
    _S20: {"source": "GROWN (AAAI 2022), Tables 3, 4 and 5", "acc": {
        "Scratch": ([65.8, 78.4, 76.6, 82.4, 82.2, 84.6, 78.6, 84.8, 83.4, 89.4, 87.8, 80.2, 84.4, 80.2, 52.0, 69.4,
                     66.4, 70.0, 87.2, 91.2], 78.8, 20.0),
        "Fine-tune": ([65.2, 76.1, 76.1, 77.8, 85.4, 82.5, 79.4, 82.4, 82.0, 87.4, 87.4, 81.5, 84.6, 80.8, 52.0, 72.1,
                       68.1, 71.9, 88.1, 91.5], 78.6, 20.0),
        "Grow": ([67.0, 73.8, 74.4, 75.2, 81.4, 81.2, 78.8, 80.4, 80.6, 85.4, 85.8, 80.4, 81.2, 80.6, 50.8, 68.8, 66.4,
                  68.2, 84.2, 88.4], 76.5, 1.5),
        "DEN": ([66.4, 78.0, 77.4, 78.8, 81.6, 81.8, 76.0, 80.4, 79.8, 85.0, 85.2, 78.8, 83.2, 81.6, 50.4, 71.2, 66.8,
                 79.4, 85.0, 90.2], 77.4, 2.1),
        "CPG": ([67.0, 79.6, 77.2, 82.0, 86.8, 87.2, 82.4, 85.6, 86.4, 89.6, 90.0, 84.0, 87.2, 84.8, 55.4, 73.8, 72.0,
                 71.6, 89.6, 92.8], 81.2, 1.5),
        "GROWN": ([67.2, 76.8, 79.6, 81.8, 87.4, 86.8, 84.2, 83.8, 87.8, 89.4, 91.0, 84.6, 87.2, 85.0, 55.4, 73.6,
                   71.2, 73.8, 89.2, 94.6], 82.2, 1.5)},
        "size": {
        "Scratch": [float(k) for k in range(1, 21)], "Fine-tune": [float(k) for k in range(1, 21)],
        "Grow": [0.3, 0.4, 0.48, 0.56, 0.65, 0.75, 0.75, 0.83, 0.94, 0.94, 1.12, 1.18, 1.24, 1.24, 1.30, 1.30, 1.38,
                 1.44, 1.44, 1.5],
        "DEN": [1.0, 1.06, 1.13, 1.13, 1.19, 1.25, 1.32, 1.32, 1.40, 1.46, 1.46, 1.55, 1.61, 1.61, 1.61, 1.70, 1.82,
                1.90, 2.02, 2.1],
        "CPG": [1.0] + [1.5] * 19,  # printed as "1.0x 1.5x 1.5x 1.5x"
        "GROWN": [0.3, 0.4, 0.48, 0.56, 0.65, 0.75, 0.75, 0.83, 0.94, 0.94, 1.12, 1.18, 1.24, 1.24, 1.30, 1.30, 1.38,
                  1.44, 1.44, 1.5]},
        "ablation": [  # Table 5: first and last rows absolute, the others deltas to the row above
        ("Grow only", [67.0, 73.8, 74.4, 75.2, 81.4, 81.2, 78.8, 80.4, 80.6, 85.4, 85.8, 80.4, 81.2, 80.6, 50.8, 68.8,
                       66.4, 68.2, 84.2, 88.4], 76.5),
        ("+Sel-mask", [0.0, 2.0, 3.4, 4.0, 3.4, 4.2, 3.6, 2.0, 3.8, 3.0, 3.8, 3.0, 3.6, 3.4, 2.8, 4.0, 3.2, 3.8, 3.0,
                       3.6], 3.7),
        ("+LSG", [0.2, 0.6, 1.0, 1.8, 1.4, 0.8, 1.2, 0.6, 2.2, 0.6, 1.0, 0.6, 2.0, 0.4, 1.4, 0.6, 0.6, 1.0, 1.4, 1.6],
         1.3),
        ("+Re-train", [0.0, 0.4, 0.8, 0.4, 0.4, 0.6, 0.6, 0.8, 1.0, 0.4, 0.8, 0.6, 0.4, 1.2, 0.4, 0.2, 1.0, 0.8, 0.6,
                       1.0], 0.7),
        ("Ours", [67.2, 76.8, 79.6, 81.8, 86.8, 86.8, 84.2, 83.8, 87.8, 89.4, 91.0, 84.6, 87.2, 85.0, 55.4, 73.6, 71.2,
                  73.8, 89.2, 94.6], 82.2)]},
}
ABLATION_ROWS = [("grown[grow_only]", "Grow only"), ("grown[+selective_mask]", "+Sel-mask"),
                 ("grown[+lsg]", "+LSG"), ("grown[+retrain_released]", "+Re-train")]


# Rows whose printed average is not the mean of their printed per-task accuracies (beyond the 0.1 the rounding of
# the printed values allows), and Table 5 columns whose deltas do not add up to the last row.  Found by
# tests/test_report.py::test_published_tables_agree_with_themselves and checked against the seed paper's text
# (shared/seed): every number above is transcribed as printed, so each listed entry is the paper's own
# inconsistency (e.g. Table 1's Scratch row averages 65.38, printed 63.75; Table 5's last row has 86.8 at task 5
# where Table 3 has 87.4).  Reports print the paper's numbers as published; an entry not listed here that stops
# agreeing is a transcription error and fails the test.
PAPER_INCONSISTENT_AVERAGES = {_S10: {"Scratch", "CPG", "APD"}, _S20: {"Grow", "DEN", "GROWN"}}
PAPER_INCONSISTENT_ABLATION_TASKS = {_S20: {4, 5, 9, 11, 14}}  # 1-based task numbers

# Not here: the fine-grained benchmark (ImageNet-pretrained VGG16 / ResNet-50 -> CUBS, Stanford Cars, Oxford
# Flowers, WikiArt, Sketch; recipes/*_finegrained.yaml).  PackNet, Piggyback and CPG publish their accuracies for it,
# but ../shared/REFERENCE.md, the project's source of published numbers, does not hold them, and a number typed from
# memory is not a citation: add them here, with their tables, once they are in REFERENCE.md.

# what a single run's report shows beside the run: the paper's reference (Scratch), its closest rival and GROWN
RUN_REPORT_ROWS = {"acc": ("Scratch", "CPG", "GROWN"), "size": ("GROWN",)}


def benchmark_of(recipe: Optional[dict]) -> Optional[str]:
    """The seed paper's benchmark a recipe runs, if any (a key of PAPER)."""
    data = recipe.get("data") if isinstance(recipe, dict) else None
    if not isinstance(data, dict):  # no recipe, or a config.resolved.yaml of another shape: no benchmark
        return None
    if data.get("name") == "cifar100_split" and data.get("num_tasks", 10) == 10:
        return _S10
    if data.get("name") == "cifar100_superclass" and data.get("num_tasks", 20) == 20:
        return _S20
    return None


def published(benchmark: Optional[str], rows: Optional[dict] = None) -> dict:
    """PAPER[benchmark] ({} for another stream), restricted to `rows` ({"acc": names, "size": names}) if given."""
    bench = PAPER.get(benchmark or "", {})
    if not bench or rows is None:
        return bench
    return {**bench, **{key: {k: v for k, v in bench.get(key, {}).items() if k in names} for key, names in rows.items()}}
