"""Sweeps simulated from a known law: how the fit is checked (tests and benchmarks/bench_fit.py)."""

import itertools

import numpy as np

from . import scaling_law
from .scaling_law import PARAMS, Law
from .results import Runs


def perturbed_law(law: Law, rng: np.random.Generator, coefficients: float = 0.5, exponents: float = 0.2) -> Law:
    """The law with each coefficient scaled by e^u, u ~ U(±coefficients), and each exponent by
    e^v, v ~ U(±exponents): another law of the same form, to check the fit on more than one."""
    p = law.to_vector()
    is_coefficient = np.array([k in scaling_law.COEFFICIENTS for k in PARAMS])
    shift = rng.uniform(-1, 1, len(PARAMS))
    p = np.where(is_coefficient, p + coefficients * shift, p * np.exp(exponents * shift))
    return Law.from_vector(p)


def synthetic_runs(law: Law, rng: np.random.Generator, noise: float = 0.01,
                   sizes=(1e7, 3e7, 1e8, 3e8, 1e9), s_totals=(10, 100, 1e3, 1e4, 1e5), widths=(1, 2, 4, 6),
                   fractions=(0.02, 0.25, 0.5, 0.75, 0.98)) -> Runs:
    """A sweep simulated from a known law with log-normal noise (for checking the fit), FP-only
    runs included at every (N, D) of the 4-bit grid.

    The fractions reach 0.02 and 0.98 because runs with little QAT or little FP training tell
    the S_qat and S_fp exponents apart (benchmarks/bench_fit.py measures how well)."""
    rows = []
    for n, s in itertools.product(sizes, s_totals):
        for b, f in itertools.product(widths, fractions):
            d = s * n * b / 8
            rows.append((n, (1 - f) * d, f * d, b))
        rows.append((n, s * n * 4 / 8, 0.0, np.nan))
    n, d_fp, d_qat, bits = map(np.array, zip(*rows))
    loss = law(n, d_fp, d_qat, bits) * np.exp(rng.normal(0, noise, len(rows)))
    return Runs(n, d_fp, d_qat, bits, loss)
