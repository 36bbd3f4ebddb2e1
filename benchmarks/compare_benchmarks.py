"""Paired comparison of two `calmrl benchmark` folders: an ablation against the main run.

Runs are matched by data set, objective, method, missing rate and seed (a seed
fixes the stage-1 start and the hidden entries, so the runs of the two folders
differ only by the ablated setting); for every group both folders hold, it
prints the mean of each metric in each folder and the paired difference
ABLATION - MAIN with its 95% interval over the seeds (docs/benchmark.md,
"Ablations").

    python benchmarks/compare_benchmarks.py MAIN ABLATION [--metrics own_R@1,cos_R@1,shift_calibrated]
"""

from __future__ import annotations

import argparse
import json
from collections import defaultdict
from pathlib import Path

from evals.benchmark.stats import paired_difference, summarise

Group = tuple[str, str, str, float]


def load(folder: Path) -> dict[Group, dict[int, dict[str, float]]]:
    """{(data set, objective, method, rate): {seed: summary}} of a folder's stage-2 runs."""
    runs: dict[Group, dict[int, dict[str, float]]] = defaultdict(dict)
    for path in sorted(folder.glob("runs/*/*/result.json")):
        result = json.loads(path.read_text())
        if result.get("stage") == 2:
            group = (result["dataset"], result["objective"], result["method"], float(result["rate"]))
            runs[group][int(result["seed"])] = result["summary"]
    if not runs:
        raise SystemExit(f"{folder}: no stage-2 runs (runs/*/*/result.json); is it a calmrl benchmark folder?")
    return runs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("main", type=Path)
    parser.add_argument("ablation", type=Path)
    parser.add_argument("--metrics", default="own_R@1,cos_R@1,shift_calibrated")
    args = parser.parse_args()
    metrics = args.metrics.split(",")
    base, other = load(args.main), load(args.ablation)
    shared = sorted(set(base) & set(other))
    if not shared:
        raise SystemExit(f"{args.main} and {args.ablation} share no (data set, objective, method, rate) group")
    print(
        f"| data set | objective | method | rate | metric | {args.main.name} | {args.ablation.name} | paired difference |"
    )
    print("|---|---|---|---|---|---|---|---|")
    decided = 0
    for group in shared:
        for metric in metrics:
            a = {s: r[metric] for s, r in base[group].items() if metric in r}
            b = {s: r[metric] for s, r in other[group].items() if metric in r}
            if not a or not b:
                continue
            diff = paired_difference(b, a)
            mark = " ✔" if diff.above_zero else " ✘" if diff.below_zero else ""
            print(
                f"| {group[0]} | {group[1]} | {group[2]} | {group[3]:g} | {metric} | {summarise(list(a.values())).mean:.3f}"
                f" | {summarise(list(b.values())).mean:.3f} | {diff.mean:+.4f} [{diff.low:+.4f}, {diff.high:+.4f}]"
                f" (n={diff.n}){mark} |"
            )
            decided += diff.above_zero or diff.below_zero
    print(
        f"compared {len(shared)} groups x {len(metrics)} metrics of {args.ablation} against {args.main}; "
        f"{decided} differences with a 95% interval off zero (✔ above, ✘ below)"
    )


if __name__ == "__main__":
    main()
