"""The law's fit as an optimisation problem: the Huber objective on log-loss residuals, a grid of
starts, an exact change of variables that conditions it, the parameters' search ranges, and
bounded L-BFGS-B runs on one BLAS thread. numpy/scipy only; mlx_qat.fit drives it.
"""

import itertools
import math
import time
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence

import numpy as np
from scipy.optimize import OptimizeResult, minimize

from . import scaling_law
from .blas_threads import one_blas_thread
from .results import Runs
from .scaling_law import PARAMS, Law

HUBER_DELTA = 1e-3  # the smallest δ: the Chinchilla refit's, for sweeps with little noise

# The search range of each parameter (logs of coefficients, raw exponents). The coefficients are
# searched more widely in the fit's own coordinates; one that ends outside its range here is
# reported as at its bound all the same.
BOUNDS = {
    "alpha": (-10, 5), "beta": (-20, 30), "gamma": (0, 2), "zeta": (-20, 30), "eta": (0, 2),
    "theta": (-20, 5), "kappa": (0, 5), "phi": (-20, 20), "chi": (0, 5), "psi": (0, 3), "omega": (0, 3),
    "lam": (-20, 20), "mu": (0, 5), "nu": (0, 3), "xi": (0, 3), "rho": (0, 3),
}


def at_bounds(law: Law, tolerance: float = 1e-3) -> Dict[str, str]:
    """Each parameter that ended at (or past) a bound of its search range: name -> 'lower'/'upper'."""
    out = {}
    for k, v in zip(PARAMS, law.to_vector()):
        lo, hi = BOUNDS[k]
        margin = tolerance * (hi - lo)
        if v <= lo + margin:
            out[k] = "lower"
        elif v >= hi - margin:
            out[k] = "upper"
    return out


# ---------------------------------------------------------------- the objective


def objective(p, X, mask, log_y, weights, delta=HUBER_DELTA):
    """Mean Huber loss of ln L̂ − ln L (scaled by 1/δ), and its gradient in p."""
    z = np.where(mask, np.einsum("nkj,j->nk", X, p), -np.inf)
    m = z.max(axis=-1)
    e = np.exp(z - m[:, None])
    s = e.sum(axis=-1)
    r = m + np.log(s) - log_y
    small = np.abs(r) <= delta
    value = np.where(small, 0.5 * r**2, delta * (np.abs(r) - 0.5 * delta))
    slope = np.clip(r, -delta, delta) * weights
    grad = np.einsum("n,nk,nkj->j", slope, e / s[:, None], X)
    total = weights.sum() * delta
    return float((value * weights).sum() / total), grad / total


def starts(runs: Runs) -> List[np.ndarray]:
    """A grid over the exponents and scales that matter most; the rest start at middling values."""
    base = dict(alpha=math.log(0.8 * runs.loss.min()), theta=-3.0, phi=0.0, lam=0.0, psi=0.1, nu=0.1)
    out = []
    for gamma, eta, bit_decay in itertools.product((0.2, 0.5), (0.2, 0.5), (0.5, 1.5)):
        p = dict(base, gamma=gamma, eta=eta, beta=5.0, zeta=5.0, kappa=bit_decay, chi=bit_decay, mu=bit_decay,
                 omega=0.3, xi=0.3, rho=0.3)
        out.append(np.array([p[k] for k in PARAMS]))
    return out


@dataclass
class Coordinates:
    """An exact linear change of variables that conditions the fit: each exponent's feature is
    centred and scaled over the data, and the centring is absorbed into its term's coefficient.
    (Every exponent belongs to exactly one term, so q = T p is a simple map.)"""

    center: np.ndarray  # [16]: mean of the feature an exponent multiplies (0 for coefficients)
    scale: np.ndarray  # [16]: its spread (1 for coefficients)
    owner: np.ndarray  # [16]: the coefficient column of the term holding each parameter

    @classmethod
    def of(cls, X: np.ndarray, mask: np.ndarray) -> "Coordinates":
        center, scale, owner = np.zeros(len(PARAMS)), np.ones(len(PARAMS)), np.arange(len(PARAMS))
        for k, members in enumerate(scaling_law.TERM_PARAMS):
            rows = mask[:, k]
            cols = [PARAMS.index(name) for name in members]
            for j in cols[1:]:  # the first member is the term's coefficient
                owner[j] = cols[0]
                if rows.any():
                    center[j] = X[rows, k, j].mean()
                    scale[j] = max(X[rows, k, j].std(), 1e-3)
        return cls(center, scale, owner)

    def transform_design(self, X: np.ndarray) -> np.ndarray:
        member = np.zeros((scaling_law.N_TERMS, len(PARAMS)), dtype=bool)
        for k, names in enumerate(scaling_law.TERM_PARAMS):
            member[k, [PARAMS.index(n) for n in names]] = True
        return np.where(member, (X - self.center) / self.scale, 0.0)

    def to_fit(self, p: np.ndarray) -> np.ndarray:
        q = p * self.scale
        np.add.at(q, self.owner[self.center != 0], (self.center * p)[self.center != 0])
        return q

    def from_fit(self, q: np.ndarray) -> np.ndarray:
        p = q / self.scale
        coefficient_shift = np.zeros_like(p)
        np.add.at(coefficient_shift, self.owner[self.center != 0], (self.center * p)[self.center != 0])
        return p - coefficient_shift

    def bounds(self) -> list:
        out = []
        for j, k in enumerate(PARAMS):
            lo, hi = BOUNDS[k]
            out.append((-60, 60) if k in scaling_law.COEFFICIENTS else (lo * self.scale[j], hi * self.scale[j]))
        return out


# ---------------------------------------------------------------- bounded, single-threaded optimisation


@dataclass(frozen=True)
class Effort:
    """How long one L-BFGS-B run may go on: iterations, seconds, and the relative change of the
    loss below which it stops. A run stopped by the first two has not converged."""

    maxiter: int = 10_000
    seconds: float = math.inf
    ftol: float = 1e-14


POINT_FIT = Effort()  # the fit itself: run to convergence
# A bootstrap refit starts at the optimum of the full data, a small step from its own, so a
# looser ftol and an iteration bound suffice; one still going after them is given up and
# counted, not waited on.
RESAMPLE = Effort(maxiter=2_000, seconds=60.0, ftol=1e-10)
SMOOTH_DELTA = 1.0  # a Huber this wide is least squares: smooth, so the grid of starts converges fast


def not_converged() -> str:
    """What stops a resample short of L-BFGS-B's tolerance."""
    return (f"stopped at {RESAMPLE.maxiter:,} iterations or {RESAMPLE.seconds:g} s, or by a failed line search, "
            "before reaching L-BFGS-B's tolerance")


def _deadline(seconds: float):
    """An L-BFGS-B callback that stops the run once `seconds` have passed."""
    end = time.monotonic() + seconds

    def check(intermediate_result):
        if time.monotonic() > end:
            raise StopIteration

    return None if math.isinf(seconds) else check


def fit_vector(runs: Runs, p0s: Sequence[np.ndarray], weights: Optional[np.ndarray] = None,
               effort: Effort = POINT_FIT, delta: Optional[float] = HUBER_DELTA, progress=None, smooth: bool = True):
    """The best L-BFGS-B fit from the starts p0s: (p, scipy result of the final run, with the
    Huber δ it used as `.delta`).

    Each start is first fitted by least squares on log-loss (smooth); the best of those is then
    refined under the Huber loss, whose kinks make cold starts slow (smooth=False skips the
    first stage, for a start that is already an optimum nearby). delta None takes
    δ = 1.345·σ (σ: the least-squares residuals' scale, 1.4826·MAD), at least HUBER_DELTA:
    Huber's own choice, which keeps 95% of least squares' precision on Gaussian noise yet caps
    an outlier's pull; a fixed δ far below the noise would fit least absolute deviations, which
    put synthetic laws' optimal fractions further off. `effort` bounds each run; `progress`
    (a tqdm bar) is advanced once per start."""
    X, mask = scaling_law.design(runs.n, runs.d_fp, runs.d_qat, runs.bits)
    coords = Coordinates.of(X, mask)
    Xc = coords.transform_design(X)
    log_y = np.log(runs.loss)
    weights = np.ones(len(runs)) if weights is None else weights

    def run(q0, huber):
        return minimize(objective, q0, args=(Xc, mask, log_y, weights, huber), jac=True, method="L-BFGS-B",
                        bounds=coords.bounds(), callback=_deadline(effort.seconds),
                        options={"maxiter": effort.maxiter, "ftol": effort.ftol, "gtol": 1e-10})

    with one_blas_thread():
        fits = []
        for p0 in p0s:
            q0 = coords.to_fit(p0)
            fits.append(run(q0, SMOOTH_DELTA) if smooth else OptimizeResult(x=q0, fun=0.0))
            if progress is not None:
                progress.update()
        start = min(fits, key=lambda r: r.fun).x
        if delta is None:
            delta = residual_delta(scaling_law.log_loss(start, Xc, mask) - log_y, weights)
        best = run(start, delta)
    best.delta = delta
    return coords.from_fit(best.x), best


def residual_delta(residuals: np.ndarray, weights: np.ndarray) -> float:
    """Huber's δ = 1.345·σ for residuals of scale σ = 1.4826·MAD (of the runs with weight), at
    least HUBER_DELTA."""
    r = residuals[weights > 0]
    sigma = 1.4826 * np.median(np.abs(r - np.median(r)))
    return float(max(HUBER_DELTA, 1.345 * sigma))


def converged(result) -> bool:
    """Whether L-BFGS-B met its own tolerance: not stopped at the iteration or time bound, nor
    by a failed line search."""
    return bool(result.success)
