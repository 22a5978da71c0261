"""Fit the QAT loss scaling law to sweep results.

    python -m mlx_qat.fit RESULTS [RESULTS ...] --out law.json [--plot DIR] [--bootstrap 100] [--held-out]

Each RESULTS is a JSON-lines file with one record per run, or a sweep directory (see
mlx_qat.results). The FP losses measured at the switch of separate-schedule runs join the
FP-only runs as observations of the law's Chinchilla part (--no-fp-anchors leaves them out).

The fit follows Besiroglu et al.'s Chinchilla refit: a Huber loss on log-loss residuals,
coefficients in log space, L-BFGS-B from a grid of starts, the best kept. Its δ is Huber's
1.345·σ for the residuals' robust scale σ (at least 1e-3, the refit's fixed value). Bootstrap
resamples, each refitted from the optimum, give 95% intervals; one that has not converged
within its iteration and time bounds is counted and left out of them, not waited on. It reports R²
overall and per bit width, every parameter that ended at a bound of its search range (a term the
data cannot pin down), and refits the predictor's constant a to the best fraction of each
(N, D_total, B) group. --held-out also fits without the largest budget of each model size, and
without each model size in turn, and predicts what was left out: the error a planner would
make, judged as the paper judges its law, beside the predictor's.

Every L-BFGS-B run keeps OpenBLAS to one thread (mlx_qat.blas_threads), so a fit beside a
training run is slowed by its share of the cores, not stalled by BLAS threads waiting for them.
Progress bars go to stderr; --workers spreads the resamples over processes where cores are free.
"""

import argparse
import math
import sys
import time
import warnings
from concurrent.futures import ProcessPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from functools import partial
from multiprocessing import get_context
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
from scipy.optimize import minimize_scalar
from tqdm import tqdm

from . import scaling_law
from .optimize import HUBER_DELTA, RESAMPLE, at_bounds, converged, fit_vector, not_converged, starts
from .results import FitError, Runs, bits_label, bits_order, read_results
from .scaling_law import PARAMS, Law, save_law

MIN_POINTS = 2 * len(PARAMS)  # well-posed only with comfortably more runs than parameters


# ---------------------------------------------------------------- bootstrap


def _refit(runs: Runs, p: np.ndarray, delta: float, weights: np.ndarray) -> Optional[np.ndarray]:
    """One bootstrap refit from p with these run weights; None if it did not converge."""
    q, result = fit_vector(runs, [p], weights=weights, effort=RESAMPLE, delta=delta, smooth=False)
    return q if converged(result) else None


def bootstrap_fits(runs: Runs, p: np.ndarray, resamples: int, seed: int = 0, workers: int = 1,
                   delta: float = HUBER_DELTA, progress: bool = False) -> Tuple[List[np.ndarray], int]:
    """Refit `resamples` bootstrap resamples of the runs from p (in `workers` processes):
    (the fitted vectors of those that converged, the number that did not)."""
    rng = np.random.default_rng(seed)
    n = len(runs)
    weights = [np.bincount(rng.integers(0, n, n), minlength=n).astype(float) for _ in range(resamples)]
    task = partial(_refit, runs, p, delta)
    done, failed = [], 0
    with tqdm(total=resamples, desc="bootstrap", unit="fit", file=sys.stderr, disable=not progress) as bar, \
            _pool(workers) as pool:
        for q in (pool.map(task, weights) if pool else map(task, weights)):
            if q is None:
                failed += 1
                bar.set_postfix(not_converged=failed)
            else:
                done.append(q)
            bar.update()
    return done, failed


@contextmanager
def _pool(workers: int):
    """Worker processes for the resamples, or None for this process alone. Spawned, not forked:
    a fork of a process whose BLAS has started threads can deadlock."""
    if workers <= 1:
        yield None
        return
    with ProcessPoolExecutor(workers, mp_context=get_context("spawn")) as pool:
        yield pool


def r_squared(observed: np.ndarray, predicted: np.ndarray) -> float:
    ss_res = float(((observed - predicted) ** 2).sum())
    ss_tot = float(((observed - observed.mean()) ** 2).sum())
    return 1 - ss_res / ss_tot if ss_tot > 0 else float("nan")


def r_squared_by_bits(runs: Runs, law: Law) -> Dict[str, float]:
    pred = law(runs.n, runs.d_fp, runs.d_qat, runs.bits)
    labels = np.array([bits_label(b) for b in runs.bits])
    return {lab: r_squared(runs.loss[labels == lab], pred[labels == lab]) for lab in sorted(set(labels), key=bits_order)}


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
                    "S_total": float(scaling_law.tokens_per_param_byte(d, n, b)), "runs": idx})
    return out


def fit_predictor_constant(groups: List[dict]) -> Optional[float]:
    """a minimising Σ (f̂(S_total; a) − best fraction)² over the groups (S_total > 1)."""
    usable = [g for g in groups if g["S_total"] > 1]
    if len(usable) < 2:
        return None
    s = np.array([g["S_total"] for g in usable])
    f = np.array([g["best_fraction"] for g in usable])
    res = minimize_scalar(lambda a: float(((scaling_law.predicted_qat_fraction(s, a) - f) ** 2).sum()), bounds=(0.01, 100), method="bounded")
    return float(res.x)


def fitted_range(runs: Runs) -> dict:
    """Where the law was fitted (a planner says when a question lies outside it): [min, max] of
    N and of the QAT runs' S_total, and their bit widths."""
    qat = runs.is_qat
    s = scaling_law.tokens_per_param_byte(runs.d_fp[qat] + runs.d_qat[qat], runs.n[qat], runs.bits[qat])
    return {"N_range": [float(runs.n.min()), float(runs.n.max())],
            "S_total_range": [float(s.min()), float(s.max())] if qat.any() else None,
            "bits": sorted(float(b) for b in set(runs.bits[qat]))}


DEFAULT_BOOTSTRAP = 100


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
    huber_delta: float = HUBER_DELTA
    bootstrap: int = 0  # resamples asked for
    bootstrap_failed: int = 0  # of those, how many stopped at RESAMPLE's bounds (left out of ci)
    seconds: float = 0.0
    bounds: Dict[str, str] = field(default_factory=dict)  # parameters that ended at a bound (see at_bounds)
    held_out: Optional[List[dict]] = None  # see held_out

    def report(self) -> str:
        lines = [f"{'param':>6} {'value':>12} {'95% CI':>27}"]
        for k in PARAMS:
            lo, hi = self.ci.get(k, [math.nan, math.nan])
            lines.append(f"{k:>6} {getattr(self.law, k):>12.5g}   [{lo:>10.4g}, {hi:>10.4g}]")
        lines.append(f"R² overall {self.r2:.4f}; by bit width: " + ", ".join(f"{b}: {r:.4f}" for b, r in self.r2_by_bits.items()))
        lines.append(f"log residuals: mean {self.residuals.mean():+.2e}, max |r| {np.abs(self.residuals).max():.2e}, "
                     f"RMS {np.sqrt((self.residuals ** 2).mean()):.2e}; Huber δ {self.huber_delta:.3g}")
        a = "not enough (N, D_total, B) groups with 3+ fractions" if self.predictor_a is None else f"{self.predictor_a:.4f}"
        lines.append(f"predictor constant a: {a} (the paper's: {scaling_law.PREDICTOR_A})")
        if self.bounds:
            lines.append("at a bound of the search (not pinned down by these runs): "
                         + ", ".join(f"{k} ({side})" for k, side in self.bounds.items()))
        else:
            lines.append("no parameter at a bound of its search range")
        if self.held_out:
            lines.append(format_held_out(self.held_out))
        if not self.bootstrap:
            boot = "bootstrap: none, so no intervals"
        else:
            boot = f"bootstrap: {self.bootstrap - self.bootstrap_failed} of {self.bootstrap} resamples converged"
            if self.bootstrap_failed:
                boot += (f"; {self.bootstrap_failed} did not ({not_converged()}), left out of the intervals")
        lines.append(f"{boot} (fit took {self.seconds:.1f} s)")
        return "\n".join(lines)


def check_sweep(runs: Runs) -> None:
    """Raise FitError when the runs cannot determine the law's 16 parameters."""
    if len(runs) < MIN_POINTS:
        raise FitError(f"{len(runs)} runs are too few to fit the law's {len(PARAMS)} parameters; use at least "
                       f"{MIN_POINTS} (several N, D_total, B and QAT fractions, plus FP-only runs)")
    qat = runs.is_qat
    if qat.sum() < len(PARAMS) or len(set(runs.bits[qat])) < 2 or len(set(runs.n)) < 2:
        raise FitError("the QAT terms need QAT runs at two or more bit widths and model sizes; "
                       f"got {int(qat.sum())} QAT runs, bits {_listed(runs.bits[qat])}, sizes {_listed(runs.n)}")


def _listed(values: np.ndarray) -> str:
    return ", ".join(f"{v:.3g}" for v in sorted(set(values.tolist()))) or "none"


def fit(runs: Runs, bootstrap: int = DEFAULT_BOOTSTRAP, seed: int = 0, label: str = "", workers: int = 1,
        huber_delta: Optional[float] = None, progress: bool = False) -> FitResult:
    """Fit the law, then `bootstrap` resamples for the intervals (in `workers` processes);
    huber_delta None picks δ from the residuals (see fit_vector). progress: tqdm bars on stderr.
    Raise FitError when the data cannot determine the law."""
    check_sweep(runs)
    started = time.perf_counter()
    p0s = starts(runs)
    with tqdm(total=len(p0s), desc="starts", unit="fit", file=sys.stderr, disable=not progress) as bar:
        p, best = fit_vector(runs, p0s, delta=huber_delta, progress=bar)
    law = Law.from_vector(p)
    ok = converged(best)
    if not ok:
        warnings.warn(f"the best L-BFGS-B start did not converge ({best.message}); treat the law with caution", stacklevel=2)

    samples, failed = bootstrap_fits(runs, p, bootstrap, seed, workers, best.delta, progress)
    if failed:
        warnings.warn(f"{failed} of {bootstrap} bootstrap resamples did not converge ({not_converged()}); "
                      f"the intervals use the other {len(samples)}", stacklevel=2)
    ci = {}
    if samples:
        lo, hi = np.percentile(np.array(samples), [2.5, 97.5], axis=0)
        for k, a, b in zip(PARAMS, lo, hi):
            ci[k] = [float(np.exp(a)), float(np.exp(b))] if k in scaling_law.COEFFICIENTS else [float(a), float(b)]

    predicted = law(runs.n, runs.d_fp, runs.d_qat, runs.bits)
    groups = best_fraction_groups(runs)
    result = FitResult(law, ci, r_squared(runs.loss, predicted), r_squared_by_bits(runs, law),
                       np.log(predicted) - np.log(runs.loss), fit_predictor_constant(groups), groups, ok,
                       best.delta, bootstrap, failed, time.perf_counter() - started, at_bounds(law))
    if result.r2 < 0.9:
        warnings.warn(f"the law explains little of the data (R² = {result.r2:.3f}); check the results file", stacklevel=2)
    meta = {"label": label, "n_runs": int((~runs.anchor).sum()), "n_fp_anchors": int(runs.anchor.sum()),
            "r2": result.r2, "r2_by_bits": result.r2_by_bits, "ci95": ci, "at_bounds": result.bounds,
            "bootstrap": bootstrap, "bootstrap_not_converged": failed, "huber_delta": result.huber_delta,
            "predictor_a": result.predictor_a, "converged": ok, **fitted_range(runs)}
    result.law = Law.from_vector(p, meta=meta)
    return result


def held_out(runs: Runs, **fit_options) -> List[dict]:
    """The law as a predictor, tested as the paper tests it: fit without some runs, predict them.
    Two kinds of split: the largest budget of every model size (extrapolating in D), and each
    model size in turn (in N: the smallest and largest extrapolate, the others interpolate). An FP
    anchor is held out with the run it comes from. Each split reports the mean absolute error of
    the held-out losses and, per held-out (N, D_total, B) group, how far the law's optimal fraction
    and the paper's predictor are from the best fraction observed; a split the rest cannot be
    fitted from reports why instead."""
    largest = {n: runs.budget[runs.n == n].max() for n in set(runs.n)}
    splits = [("the largest budget of each size", np.array([b == largest[n] for n, b in zip(runs.n, runs.budget)]))]
    splits += [(f"model size N = {n:.3g}", runs.n == n) for n in sorted(set(runs.n))]
    return [predict_held_out(runs, name, test, **fit_options) for name, test in splits]


def predict_held_out(runs: Runs, name: str, test: np.ndarray, **fit_options) -> dict:
    """Fit the runs not in `test` and predict those in it (see held_out)."""
    from . import plan  # the planner's questions; fitting alone needs only the law

    try:
        law = fit(runs.where(~test), bootstrap=0, **fit_options).law
    except FitError as e:
        return {"held_out": name, "error": str(e)}
    tested = runs.where(test & ~runs.anchor)
    errors = law(tested.n, tested.d_fp, tested.d_qat, tested.bits) - tested.loss
    rows = []
    for g in best_fraction_groups(tested):
        f_law, _ = plan.optimal_fraction(law, g["N"], g["D_total"], g["B"])
        f_pred = float(scaling_law.predicted_qat_fraction(g["S_total"])) if g["S_total"] > 1 else math.nan
        rows.append({k: g[k] for k in ("N", "D_total", "B", "S_total", "best_fraction")} | {"law_fraction": f_law,
                    "predictor_fraction": f_pred})
    return {"held_out": name, "runs": len(tested), "loss_mae": float(np.abs(errors).mean()),
            "loss_max_error": float(np.abs(errors).max()), "fraction_mae_law": _fraction_error(rows, "law_fraction"),
            "fraction_mae_predictor": _fraction_error(rows, "predictor_fraction"), "groups": rows,
            "at_bounds": at_bounds(law)}


def _fraction_error(rows: List[dict], key: str) -> float:
    """Mean |fraction − best observed fraction| over the held-out groups."""
    return float(np.nanmean([abs(r[key] - r["best_fraction"]) for r in rows])) if rows else math.nan


def format_held_out(splits: List[dict]) -> str:
    lines = ["held out (fitted without them, then predicted):"]
    for h in splits:
        if "error" in h:
            lines.append(f"  {h['held_out']}: not fitted without them ({h['error']})")
            continue
        bounds = "; at a bound: " + ", ".join(f"{k} ({side})" for k, side in h["at_bounds"].items()) if h["at_bounds"] else ""
        lines.append(f"  {h['held_out']} ({h['runs']} runs): loss MAE {h['loss_mae']:.4f} (max {h['loss_max_error']:.4f}); "
                     f"best-fraction MAE: law {h['fraction_mae_law']:.3f}, predictor {h['fraction_mae_predictor']:.3f} "
                     f"over {len(h['groups'])} groups{bounds}")
    return "\n".join(lines)


def whole_number(text: str) -> int:
    """A non-negative integer argument."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"{text} must be 0 or more")
    return value


def main(argv: Optional[Sequence[str]] = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m mlx_qat.fit", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog="examples:\n  python -m mlx_qat.fit results.jsonl --out law.json --plot plots/\n"
                                            "  python -m mlx_qat.fit sweeps/local sweeps/more/results.jsonl --out law.json --bootstrap 30")
    parser.add_argument("results", type=Path, nargs="+", metavar="RESULTS",
                        help="JSON-lines results files, or sweep directories (their results.jsonl)")
    parser.add_argument("--out", type=Path, required=True, help="where to write the law (versioned JSON)")
    parser.add_argument("--plot", type=Path, help="directory for PNG plots")
    parser.add_argument("--bootstrap", type=whole_number, default=DEFAULT_BOOTSTRAP,
                        help=f"bootstrap resamples for the 95%% intervals (default {DEFAULT_BOOTSTRAP}; 0: none)")
    parser.add_argument("--workers", type=whole_number, default=1,
                        help="processes for the bootstrap (default 1, which leaves the other cores to training)")
    parser.add_argument("--huber-delta", type=float, help="Huber δ on log-loss (default: 1.345x the residuals' "
                        f"robust scale, at least {HUBER_DELTA:g})")
    parser.add_argument("--schedule", help="fit only the runs of this schedule (separate or fused): the law "
                        "has no term for it, so fit one schedule at a time")
    parser.add_argument("--no-fp-anchors", action="store_true", help="leave out the FP losses measured at the switch "
                        "of separate-schedule runs (by default they join the FP-only runs in pinning down the FP part)")
    parser.add_argument("--held-out", action="store_true", help="also fit without each size's largest budget, and "
                        "without each size in turn, and report how well those laws predict what was left out")
    parser.add_argument("--label", default="", help="a description stored with the law")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
    args = parser.parse_args(argv)
    try:
        runs = read_results(*args.results, schedule=args.schedule, fp_anchors=not args.no_fp_anchors)
        result = fit(runs, bootstrap=args.bootstrap, label=args.label, workers=args.workers,
                     huber_delta=args.huber_delta, progress=not args.quiet)
        if args.held_out:
            result.held_out = held_out(runs, huber_delta=args.huber_delta)
            result.law.meta["held_out"] = result.held_out
    except FitError as e:
        parser.exit(2, f"error: {e}\n")
    save_law(result.law, args.out)
    print(result.report())
    print(f"wrote {args.out}")
    if args.plot:
        from .law_plots import plot  # matplotlib, only when plots are asked for

        for p in plot(result, runs, args.plot):
            print(f"wrote {p}")


if __name__ == "__main__":
    main(sys.argv[1:])
