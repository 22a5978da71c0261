"""What a sweep measured, beyond the law's fit: best fraction per group, fused vs separate, and
the tokens that sharing saved.

    python benchmarks/sweep_report.py benchmarks/results/sweep [--out benchmarks/results/sweep/report.json]
"""

import argparse
import json
from collections import defaultdict
from pathlib import Path

import numpy as np

from common import emit


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("sweep", type=Path, help="a sweep directory (results*.jsonl, sweep*.json)")
    parser.add_argument("--out", help="write the report as JSON here")
    args = parser.parse_args()
    records = [json.loads(line) for f in sorted(args.sweep.glob("results*.jsonl")) for line in f.read_text().splitlines()]
    runs = defaultdict(dict)  # (model, D, B, schedule) -> {fraction: loss}
    for r in records:
        key = (r["config"]["model"], r["D_fp"] + r["D_qat"], r["B"], r["schedule"] if r["B"] is not None else "fp")
        runs[key][round(r["qat_fraction"], 3)] = r["final_val_loss"]

    groups = []
    for (model, d, b, schedule), losses in sorted(runs.items(), key=lambda kv: str(kv[0])):
        if b is None:
            continue
        best = min(losses, key=losses.get)
        n = next(r["N"] for r in records if r["config"]["model"] == model)
        fp = runs.get((model, d, None, "fp"), {}).get(0.0)
        groups.append({"model": model, "N": n, "D_total": d, "B": b, "schedule": schedule, "S_total": d / (n * b / 8),
                       "best_fraction": best, "best_loss": losses[best], "fp_loss": fp, "losses": losses})

    pairs = [(g["losses"][f], h["losses"][f]) for g in groups if g["schedule"] == "fused"
             for h in groups if h["schedule"] == "separate" and (h["model"], h["D_total"], h["B"]) == (g["model"], g["D_total"], g["B"])
             for f in g["losses"] if f in h["losses"]]
    fused, separate = np.array(pairs).T if pairs else (np.array([]), np.array([]))
    figures = {}
    for f in sorted(args.sweep.glob("sweep*.json")):
        for k, v in json.loads(f.read_text()).items():
            if isinstance(v, (int, float)):
                figures[k] = figures.get(k, 0) + v
    emit({
        "command": f"python benchmarks/sweep_report.py {args.sweep}",
        "runs": len(records),
        "sweep": figures,
        "tokens_saved_by_sharing": 1 - figures["tokens_trained"] / figures["tokens_independent"] if figures.get("tokens_independent") else None,
        "fused_minus_separate": {
            "pairs": len(pairs),
            "mean": float((fused - separate).mean()) if pairs else None,
            "fused_better": int((fused < separate).sum()),
        },
        "groups": groups,
    }, args.out)


if __name__ == "__main__":
    main()
