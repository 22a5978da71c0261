"""The law fit: how well it recovers laws it was not built around, and how long the command takes
beside a training-like load.

    python benchmarks/bench_fit.py [--laws 8] [--busy N] [--out benchmarks/results/fit.json]

Recovery: for each of --laws laws whose parameters are the reference law's randomly perturbed
(synthetic.perturbed_law), a 525-run synthetic sweep with 1% log-normal noise is fitted; the figure is
the largest |f_fit - f_true| of the optimal QAT fraction over (N, D, B) points inside the sweep
(target: <= 0.05).
Time: `python -m mlx_qat.fit RESULTS --out law.json` with its defaults (100 bootstrap
resamples, one worker) on one more such sweep, while --busy processes (default: one per core)
spin `while True: pass` beside it, started here and stopped after (target: < 120 s).
"""

import argparse
import json
import math
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from common import emit, machine
from mlx_qat import fit, plan, results, synthetic
from mlx_qat.scaling_law import Law

REFERENCE = Law(alpha=1.7, beta=410, gamma=0.28, zeta=400, eta=0.34, theta=0.08, kappa=0.7, phi=60, chi=0.9, psi=0.15,
                omega=0.35, lam=200, mu=0.8, nu=0.15, xi=0.45, rho=0.25)
# Inside the sweep's N in [1e7, 1e9] and S_total in [10, 1e5], at every bit width it trains.
POINTS = [(n, s, b) for n in (3e7, 1e8, 3e8) for s in (30, 300, 3e3, 3e4) for b in (1, 2, 4, 6)]


def recovery(laws: int, rng: np.random.Generator) -> dict:
    errors, seconds = [], []
    for _ in range(laws):
        truth = synthetic.perturbed_law(REFERENCE, rng)
        runs = synthetic.synthetic_runs(truth, rng)
        start = time.perf_counter()
        law = fit.fit(runs, bootstrap=0).law
        seconds.append(time.perf_counter() - start)
        errors.append(max(abs(plan.optimal_fraction(truth, n, s * n * b / 8, b)[0] - plan.optimal_fraction(law, n, s * n * b / 8, b)[0])
                          for n, s, b in POINTS))
    return {"laws": laws, "runs_per_sweep": len(runs), "noise": 0.01, "points": len(POINTS),
            "max_fraction_error": round(max(errors), 4), "per_law": [round(e, 4) for e in errors],
            "target": 0.05, "point_fit_seconds": [round(s, 2) for s in seconds]}


def write_results(path: Path, runs: results.Runs) -> None:
    with open(path, "w") as f:
        for i in range(len(runs)):
            b = None if math.isnan(runs.bits[i]) else float(runs.bits[i])
            f.write(json.dumps({"N": runs.n[i], "D_fp": runs.d_fp[i], "D_qat": runs.d_qat[i], "B": b,
                                "final_val_loss": runs.loss[i]}) + "\n")


def timed_command(busy: int, rng: np.random.Generator) -> dict:
    """Wall time of the fit command beside `busy` spinning processes."""
    runs = synthetic.synthetic_runs(synthetic.perturbed_law(REFERENCE, rng), rng)
    with tempfile.TemporaryDirectory() as tmp:
        results = Path(tmp) / "results.jsonl"
        write_results(results, runs)
        command = [sys.executable, "-m", "mlx_qat.fit", str(results), "--out", str(Path(tmp) / "law.json")]
        before = os.getloadavg()[0]  # what else runs here
        spinners = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(busy)]
        try:
            time.sleep(2)  # let them take their cores
            start = time.perf_counter()
            done = subprocess.run(command, capture_output=True, text=True, check=True)
            seconds = time.perf_counter() - start
            load = os.getloadavg()[0]  # 1-minute average at the end
        finally:
            for p in spinners:
                p.kill()
                p.wait()
    report = next(line for line in done.stdout.splitlines() if line.startswith("bootstrap:"))
    return {"command": "python -m mlx_qat.fit results.jsonl --out law.json", "runs": len(runs),
            "bootstrap": fit.DEFAULT_BOOTSTRAP, "busy_processes": busy,
            "load_average_1min": {"before": round(before, 2), "at_end": round(load, 2)},
            "seconds": round(seconds, 1), "target_seconds": 120, "report": report}


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--laws", type=int, default=8, help="perturbed laws for the recovery figure")
    parser.add_argument("--busy", type=int, default=os.cpu_count(), help="spinning processes beside the timed fit")
    parser.add_argument("--out", help="write the results as JSON here")
    args = parser.parse_args()
    rng = np.random.default_rng(0)
    out = {
        "command": f"python benchmarks/bench_fit.py --laws {args.laws} --busy {args.busy}",
        "recovery": recovery(args.laws, rng),
        "fit_command_under_load": timed_command(args.busy, rng),
        "machine": machine(),
    }
    emit(out, args.out)


if __name__ == "__main__":
    main()
