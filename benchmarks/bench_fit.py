"""Fit time of the scaling law: ~1,000 synthetic runs with bootstrap confidence intervals.

Target (issue: the scaling law): < 2 minutes on a 2-core machine with >= 100 resamples.
    python benchmarks/bench_fit.py [--bootstrap 100] [--out benchmarks/results/fit.json]
"""

import argparse
import time

import numpy as np

from common import emit, machine
from mlx_qat import fit
from mlx_qat.law import Law

TRUTH = Law(alpha=1.7, beta=410, gamma=0.28, zeta=400, eta=0.34, theta=0.08, kappa=0.7, phi=60, chi=0.9, psi=0.15,
            omega=0.35, lam=200, mu=0.8, nu=0.15, xi=0.45, rho=0.25)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--bootstrap", type=int, default=100)
    parser.add_argument("--out", help="write the results as JSON here")
    args = parser.parse_args()
    fractions = tuple(np.round(np.arange(0.05, 0.96, 0.1), 2))  # 10 fractions -> 1,025 runs with FP-only ones
    runs = fit.synthetic_runs(TRUTH, np.random.default_rng(0), fractions=fractions)
    start = time.perf_counter()
    result = fit.fit(runs, bootstrap=args.bootstrap)
    seconds = time.perf_counter() - start
    out = {
        "runs": len(runs),
        "bootstrap": args.bootstrap,
        "seconds": round(seconds, 2),
        "target_seconds": 120,
        "r2": round(result.r2, 5),
        "converged": result.converged,
        "machine": machine(),
    }
    emit(out, args.out)


if __name__ == "__main__":
    main()
