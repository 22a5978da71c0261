"""Fit the QAT loss scaling law to sweep results (DESIGN §5).

    python -m mlx_qat.fit RESULTS.jsonl --out law.json [--plot DIR] [--bootstrap 100]

RESULTS holds one JSON record per run with at least N, D_fp, D_qat, B (absent or null for
FP-only runs) and final_val_loss; other fields are kept but ignored. The fit follows Besiroglu
et al.'s Chinchilla refit: Huber loss (δ = 1e-3) on log-loss residuals, positive coefficients
in log space, L-BFGS-B from a grid of starts, the best kept; bootstrap resamples give
confidence intervals. It reports R² overall and per bit width, and refits the predictor's
constant a to the best fraction of each (N, D_total, B) group.
"""

import argparse
import itertools
import json
import math
import sys
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional, Sequence

import numpy as np
from scipy.optimize import minimize, minimize_scalar

from . import law as scaling
from . import plan
from .law import PARAMS, Law

HUBER_DELTA = 1e-3
MIN_POINTS = 2 * len(PARAMS)  # well-posed only with comfortably more runs than parameters
REQUIRED = ("N", "D_fp", "D_qat", "final_val_loss")

# Bounds in the fit's coordinates (logs of coefficients, raw exponents).
BOUNDS = {
    "alpha": (-10, 5), "beta": (-20, 30), "gamma": (0, 2), "zeta": (-20, 30), "eta": (0, 2),
    "theta": (-20, 5), "kappa": (0, 5), "phi": (-20, 20), "chi": (0, 5), "psi": (0, 3), "omega": (0, 3),
    "lam": (-20, 20), "mu": (0, 5), "nu": (0, 3), "xi": (0, 3), "rho": (0, 3),
}


class FitError(ValueError):
    pass


@dataclass
class Runs:
    """Sweep results as arrays (B is NaN for FP-only runs)."""

    n: np.ndarray
    d_fp: np.ndarray
    d_qat: np.ndarray
    bits: np.ndarray
    loss: np.ndarray

    def __len__(self):
        return len(self.loss)

    @property
    def is_qat(self) -> np.ndarray:
        return np.isfinite(self.bits)


def read_results(path: Path) -> Runs:
    """Read and check sweep results; every problem names the line and the fix."""
    if not Path(path).exists():
        raise FitError(f"{path} does not exist")
    rows = []
    for i, line in enumerate(Path(path).read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            raise FitError(f"{path}:{i} is not JSON ({e})") from e
        missing = [k for k in REQUIRED if record.get(k) is None]
        if missing:
            raise FitError(f"{path}:{i} lacks {', '.join(missing)}; each run needs {', '.join(REQUIRED)} (and B for QAT runs)")
        b = record.get("B")
        values = [record[k] for k in REQUIRED]
        if any(not isinstance(v, (int, float)) or isinstance(v, bool) or not math.isfinite(v) for v in values):
            raise FitError(f"{path}:{i}: N, D_fp, D_qat and final_val_loss must be finite numbers")
        n, d_fp, d_qat, loss = map(float, values)
        qat = b is not None and d_qat > 0
        if n <= 0 or loss <= 0 or d_fp < 0 or d_qat < 0 or d_fp + d_qat <= 0:
            raise FitError(f"{path}:{i}: N, final_val_loss and D_fp + D_qat must be positive, D_fp and D_qat non-negative")
        if qat and d_fp <= 0:
            raise FitError(f"{path}:{i}: a QAT run with D_fp = 0 (QAT from scratch) puts the law's S_fp at 0, "
                           "where it is unbounded; leave such runs out")
        if qat and not (isinstance(b, (int, float)) and b > 0):
            raise FitError(f"{path}:{i}: B must be a positive number of bits, or null for FP-only runs")
        rows.append((n, d_fp, d_qat, float(b) if qat else np.nan, loss))
    if not rows:
        raise FitError(f"{path} holds no results")
    return Runs(*map(np.array, zip(*rows)))


# ---------------------------------------------------------------- the objective


def objective(p, X, mask, log_y, weights, delta=HUBER_DELTA):
    """Mean Huber loss of ln L̂ − ln L (scaled by 1/δ), and its gradient in p."""
    z = np.where(mask, X @ p, -np.inf)
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
        for k, members in enumerate(scaling.TERM_PARAMS):
            rows = mask[:, k]
            cols = [PARAMS.index(name) for name in members]
            for j in cols[1:]:  # the first member is the term's coefficient
                owner[j] = cols[0]
                if rows.any():
                    center[j] = X[rows, k, j].mean()
                    scale[j] = max(X[rows, k, j].std(), 1e-3)
        return cls(center, scale, owner)

    def transform_design(self, X: np.ndarray) -> np.ndarray:
        member = np.zeros((scaling.N_TERMS, len(PARAMS)), dtype=bool)
        for k, names in enumerate(scaling.TERM_PARAMS):
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
            out.append((-60, 60) if k in scaling.COEFFICIENTS else (lo * self.scale[j], hi * self.scale[j]))
        return out


SMOOTH_DELTA = 1.0  # a Huber this wide is least squares: smooth, so the grid of starts converges fast


def fit_vector(runs: Runs, p0s: Sequence[np.ndarray], weights: Optional[np.ndarray] = None):
    """The best L-BFGS-B fit from the starts p0s: (p, scipy result).

    Each start is first fitted by least squares on log-loss (smooth); the best of those is then
    refined under the Huber loss (δ = 1e-3), whose near-L1 kinks make cold starts slow."""
    X, mask = scaling.design(runs.n, runs.d_fp, runs.d_qat, runs.bits)
    coords = Coordinates.of(X, mask)
    Xc = coords.transform_design(X)
    log_y = np.log(runs.loss)
    weights = np.ones(len(runs)) if weights is None else weights

    def run(q0, delta):
        return minimize(objective, q0, args=(Xc, mask, log_y, weights, delta), jac=True, method="L-BFGS-B",
                        bounds=coords.bounds(), options={"maxiter": 10000, "ftol": 1e-14, "gtol": 1e-10})

    smooth = min((run(coords.to_fit(p0), SMOOTH_DELTA) for p0 in p0s), key=lambda r: r.fun)
    best = run(smooth.x, HUBER_DELTA)
    return coords.from_fit(best.x), best


def r_squared(observed: np.ndarray, predicted: np.ndarray) -> float:
    ss_res = float(((observed - predicted) ** 2).sum())
    ss_tot = float(((observed - observed.mean()) ** 2).sum())
    return 1 - ss_res / ss_tot if ss_tot > 0 else float("nan")


def bits_label(b: float) -> str:
    return "fp" if not np.isfinite(b) else f"{b:g}"


def r_squared_by_bits(runs: Runs, law: Law) -> Dict[str, float]:
    pred = law(runs.n, runs.d_fp, runs.d_qat, runs.bits)
    labels = np.array([bits_label(b) for b in runs.bits])
    return {lab: r_squared(runs.loss[labels == lab], pred[labels == lab]) for lab in sorted(set(labels), key=_bits_order)}


def _bits_order(label: str) -> float:
    return math.inf if label == "fp" else float(label)


def best_fraction_groups(runs: Runs, min_runs: int = 3) -> List[dict]:
    """Each (N, D_total, B) group of QAT runs with >= min_runs fractions, and its best one."""
    groups: Dict[tuple, List[int]] = {}
    for i in np.flatnonzero(runs.is_qat):
        key = (float(f"{runs.n[i]:.6g}"), float(f"{runs.d_fp[i] + runs.d_qat[i]:.6g}"), float(runs.bits[i]))
        groups.setdefault(key, []).append(i)
    out = []
    for (n, d, b), idx in sorted(groups.items()):
        if len(idx) < min_runs:
            continue
        best = idx[int(np.argmin(runs.loss[idx]))]
        out.append({"N": n, "D_total": d, "B": b, "best_fraction": runs.d_qat[best] / d,
                    "S_total": float(scaling.tokens_per_param_byte(d, n, b)), "runs": idx})
    return out


def fit_predictor_constant(groups: List[dict]) -> Optional[float]:
    """a minimising Σ (f̂(S_total; a) − best fraction)² over the groups (S_total > 1)."""
    usable = [g for g in groups if g["S_total"] > 1]
    if len(usable) < 2:
        return None
    s = np.array([g["S_total"] for g in usable])
    f = np.array([g["best_fraction"] for g in usable])
    res = minimize_scalar(lambda a: float(((scaling.predicted_qat_fraction(s, a) - f) ** 2).sum()), bounds=(0.01, 100), method="bounded")
    return float(res.x)


@dataclass
class FitResult:
    law: Law
    ci: Dict[str, List[float]]
    r2: float
    r2_by_bits: Dict[str, float]
    residuals: np.ndarray  # ln L̂ − ln L per run
    predictor_a: Optional[float]
    groups: List[dict]
    converged: bool

    def report(self) -> str:
        lines = [f"{'param':>6} {'value':>12} {'95% CI':>27}"]
        for k in PARAMS:
            lo, hi = self.ci.get(k, [math.nan, math.nan])
            lines.append(f"{k:>6} {getattr(self.law, k):>12.5g}   [{lo:>10.4g}, {hi:>10.4g}]")
        lines.append(f"R² overall {self.r2:.4f}; by bit width: " + ", ".join(f"{b}: {r:.4f}" for b, r in self.r2_by_bits.items()))
        lines.append(f"log residuals: mean {self.residuals.mean():+.2e}, max |r| {np.abs(self.residuals).max():.2e}, "
                     f"RMS {np.sqrt((self.residuals ** 2).mean()):.2e}")
        a = "not enough (N, D_total, B) groups with 3+ fractions" if self.predictor_a is None else f"{self.predictor_a:.4f}"
        lines.append(f"predictor constant a: {a} (the paper's: {scaling.PREDICTOR_A})")
        return "\n".join(lines)


def fit(runs: Runs, bootstrap: int = 100, seed: int = 0, label: str = "") -> FitResult:
    """Fit the law; raise FitError when the data cannot determine it."""
    if len(runs) < MIN_POINTS:
        raise FitError(f"{len(runs)} runs are too few to fit the law's {len(PARAMS)} parameters; use at least "
                       f"{MIN_POINTS} (several N, D_total, B and QAT fractions, plus FP-only runs)")
    qat = runs.is_qat
    if qat.sum() < len(PARAMS) or len(set(runs.bits[qat])) < 2 or len(set(runs.n)) < 2:
        raise FitError("the QAT terms need QAT runs at two or more bit widths and model sizes; "
                       f"got {int(qat.sum())} QAT runs, bits {sorted(set(runs.bits[qat]))}, sizes {sorted(set(runs.n))}")
    p, best = fit_vector(runs, starts(runs))
    law = Law.from_vector(p)
    converged = bool(best.success)
    if not converged:
        warnings.warn(f"the best L-BFGS-B start did not converge ({best.message}); treat the law with caution", stacklevel=2)

    rng = np.random.default_rng(seed)
    samples = []
    for _ in range(bootstrap):
        counts = np.bincount(rng.integers(0, len(runs), len(runs)), minlength=len(runs)).astype(float)
        samples.append(fit_vector(runs, [p], weights=counts)[0])
    ci = {}
    if samples:
        lo, hi = np.percentile(np.array(samples), [2.5, 97.5], axis=0)
        for k, a, b in zip(PARAMS, lo, hi):
            ci[k] = [float(np.exp(a)), float(np.exp(b))] if k in scaling.COEFFICIENTS else [float(a), float(b)]

    predicted = law(runs.n, runs.d_fp, runs.d_qat, runs.bits)
    groups = best_fraction_groups(runs)
    result = FitResult(law, ci, r_squared(runs.loss, predicted), r_squared_by_bits(runs, law),
                       np.log(predicted) - np.log(runs.loss), fit_predictor_constant(groups), groups, converged)
    if result.r2 < 0.9:
        warnings.warn(f"the law explains little of the data (R² = {result.r2:.3f}); check the results file", stacklevel=2)
    meta = {"label": label, "n_runs": len(runs), "r2": result.r2, "r2_by_bits": result.r2_by_bits, "ci95": ci,
            "bootstrap": bootstrap, "predictor_a": result.predictor_a, "converged": converged}
    result.law = Law.from_vector(p, meta=meta)
    return result


def synthetic_runs(law: Law, rng: np.random.Generator, noise: float = 0.01,
                   sizes=(1e7, 3e7, 1e8, 3e8, 1e9), s_totals=(10, 100, 1e3, 1e4, 1e5), widths=(1, 2, 4, 6),
                   fractions=(0.1, 0.3, 0.5, 0.7, 0.9)) -> Runs:
    """A sweep simulated from a known law with log-normal noise (for checking the fit), FP-only
    runs included at every (N, D) of the 4-bit grid."""
    rows = []
    for n, s in itertools.product(sizes, s_totals):
        for b, f in itertools.product(widths, fractions):
            d = s * n * b / 8
            rows.append((n, (1 - f) * d, f * d, b))
        rows.append((n, s * n * 4 / 8, 0.0, np.nan))
    n, d_fp, d_qat, bits = map(np.array, zip(*rows))
    loss = law(n, d_fp, d_qat, bits) * np.exp(rng.normal(0, noise, len(rows)))
    return Runs(n, d_fp, d_qat, bits, loss)


# ---------------------------------------------------------------- plots


def plot(result: FitResult, runs: Runs, out: Path) -> List[Path]:
    """Loss vs fraction per group, optimal fraction vs S_total, predicted vs observed, waste vs S."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out.mkdir(parents=True, exist_ok=True)
    law, paths = result.law, []

    def save(fig, name):
        fig.tight_layout()
        fig.savefig(out / name, dpi=110)
        plt.close(fig)
        paths.append(out / name)

    groups = result.groups[:12]
    if groups:
        cols = min(4, len(groups))
        rows = math.ceil(len(groups) / cols)
        fig, axes = plt.subplots(rows, cols, figsize=(3.6 * cols, 2.8 * rows), squeeze=False)
        f = np.linspace(0.01, 0.99, 200)
        for ax, g in zip(axes.flat, groups):
            idx = g["runs"]
            ax.plot(runs.d_qat[idx] / (runs.d_fp[idx] + runs.d_qat[idx]), runs.loss[idx], "o", label="runs")
            ax.plot(f, plan.loss_at_fraction(law, g["N"], g["D_total"], g["B"], f), "-", label="law")
            ax.set_title(f"N={g['N']:.2g} D={g['D_total']:.2g} B={g['B']:g}", fontsize=8)
            ax.set_xlabel("QAT fraction")
        for ax in list(axes.flat)[len(groups):]:
            ax.axis("off")
        axes.flat[0].legend(fontsize=7)
        save(fig, "loss_vs_fraction.png")

    s = np.geomspace(2, 1e6, 200)
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot(s, scaling.predicted_qat_fraction(s), "-", label=f"predictor, a = {scaling.PREDICTOR_A}")
    if result.predictor_a is not None:
        ax.plot(s, scaling.predicted_qat_fraction(s, result.predictor_a), "--", label=f"refit, a = {result.predictor_a:.3f}")
    if result.groups:
        ax.plot([g["S_total"] for g in result.groups], [g["best_fraction"] for g in result.groups], "o", label="best run per group")
    ax.set_xscale("log")
    ax.set_xlabel("S_total (tokens per parameter byte)")
    ax.set_ylabel("optimal QAT fraction")
    ax.legend()
    save(fig, "optimal_fraction_vs_S.png")

    fig, ax = plt.subplots(figsize=(5, 5))
    pred = law(runs.n, runs.d_fp, runs.d_qat, runs.bits)
    for lab in sorted({bits_label(b) for b in runs.bits}, key=_bits_order):
        sel = np.array([bits_label(b) == lab for b in runs.bits])
        ax.plot(runs.loss[sel], pred[sel], "o", ms=3, label=f"B = {lab}")
    lim = [runs.loss.min(), runs.loss.max()]
    ax.plot(lim, lim, "k--", lw=1)
    ax.set_xlabel("observed loss")
    ax.set_ylabel("predicted loss")
    ax.set_title(f"R² = {result.r2:.4f}")
    ax.legend(fontsize=7)
    save(fig, "predicted_vs_observed.png")

    fig, ax = plt.subplots(figsize=(6, 4))
    n_ref = float(np.median(runs.n))
    s = np.geomspace(10, 1e5, 15)
    for b in sorted(set(runs.bits[runs.is_qat])):
        waste = [plan.wasted_tokens(law, n_ref, x * n_ref * b / 8, b, 0.1) for x in s]
        ax.plot(s, 100 * np.array(waste), "o-", ms=3, label=f"B = {b:g}")
    ax.set_xscale("log")
    ax.set_xlabel("S_total (tokens per parameter byte)")
    ax.set_ylabel("tokens wasted by 10% QAT (%)")
    ax.set_title(f"N = {n_ref:.2g}", fontsize=9)
    ax.legend(fontsize=7)
    save(fig, "wasted_tokens_vs_S.png")
    return paths


def main(argv: Optional[Sequence[str]] = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m mlx_qat.fit", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog="example:\n  python -m mlx_qat.fit runs/sweep/results.jsonl --out law.json --plot plots/")
    parser.add_argument("results", type=Path, help="JSON lines, one record per run")
    parser.add_argument("--out", type=Path, required=True, help="where to write the law (versioned JSON)")
    parser.add_argument("--plot", type=Path, help="directory for PNG plots")
    parser.add_argument("--bootstrap", type=int, default=100, help="bootstrap resamples for the confidence intervals")
    parser.add_argument("--label", default="", help="a description stored with the law")
    args = parser.parse_args(argv)
    try:
        runs = read_results(args.results)
        result = fit(runs, bootstrap=args.bootstrap, label=args.label)
    except FitError as e:
        parser.exit(2, f"error: {e}\n")
    plan.save_law(result.law, args.out)
    print(result.report())
    print(f"wrote {args.out}")
    if args.plot:
        for p in plot(result, runs, args.plot):
            print(f"wrote {p}")


if __name__ == "__main__":
    main(sys.argv[1:])
