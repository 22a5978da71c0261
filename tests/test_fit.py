"""Fitting the law: what it reads, how long it may take, what it imports, and what it recovers."""

import json
import math
import platform
import subprocess
import sys
import warnings

import numpy as np
import pytest

from mlx_qat import blas_threads, fit, optimize, plan, results, synthetic
from mlx_qat import scaling_law
from mlx_qat.scaling_law import PARAMS, Law

BASE = Law(alpha=1.7, beta=410, gamma=0.28, zeta=400, eta=0.34, theta=0.08, kappa=0.7, phi=60, chi=0.9, psi=0.15,
           omega=0.35, lam=200, mu=0.8, nu=0.15, xi=0.45, rho=0.25)
SMALL = dict(sizes=(1e7, 1e8, 1e9), s_totals=(10, 1e3, 1e5), widths=(1, 2, 4))  # 144 runs


def write_results(path, runs, lines=slice(None)):
    with open(path, "w") as f:
        for i in range(len(runs))[lines]:
            b = None if math.isnan(runs.bits[i]) else float(runs.bits[i])
            f.write(json.dumps({"N": runs.n[i], "D_fp": runs.d_fp[i], "D_qat": runs.d_qat[i], "B": b,
                                "final_val_loss": runs.loss[i]}) + "\n")


def fraction_errors(truth: Law, law: Law, points) -> np.ndarray:
    return np.array([abs(plan.optimal_fraction(truth, n, s * n * b / 8, b)[0] - plan.optimal_fraction(law, n, s * n * b / 8, b)[0])
                     for n, s, b in points])


def fit_objective(law: Law, runs: results.Runs, delta: float) -> float:
    X, mask = scaling_law.design(runs.n, runs.d_fp, runs.d_qat, runs.bits)
    return optimize.objective(law.to_vector(), X, mask, np.log(runs.loss), np.ones(len(runs)), delta)[0]


# ---------------------------------------------------------------- recovery


def check_recovery(truth: Law, runs: results.Runs, points, tolerance=0.05):
    result = fit.fit(runs, bootstrap=0)
    assert result.converged
    # The optimiser found the best fit there is: no worse than the parameters that made the data.
    assert fit_objective(result.law, runs, result.huber_delta) <= fit_objective(truth, runs, result.huber_delta)
    assert result.r2 > 0.98 and all(r > 0.98 for r in result.r2_by_bits.values())
    errors = fraction_errors(truth, result.law, points)
    assert errors.max() <= tolerance, (errors.max(), truth.as_dict())
    return result


def test_recovery_on_small_sweeps():
    rng = np.random.default_rng(7)
    points = [(n, s, b) for n in (3e7, 3e8) for s in (100, 1e4) for b in (1, 2, 4)]
    for truth in (BASE, synthetic.perturbed_law(BASE, rng)):
        check_recovery(truth, synthetic.synthetic_runs(truth, rng, noise=0.005, **SMALL), points)


@pytest.mark.slow
def test_recovery_on_randomly_perturbed_laws():
    """~500 runs at 1% noise from each of four laws of other parameters: the optimal fraction
    within 0.05 at (N, D, B) points inside the sweep, and held-out runs predicted."""
    rng = np.random.default_rng(2024)
    points = [(n, s, b) for n in (3e7, 1e8, 3e8) for s in (30, 300, 3e3, 3e4) for b in (1, 2, 4, 6)]
    for _ in range(4):
        truth = synthetic.perturbed_law(BASE, rng)
        result = check_recovery(truth, synthetic.synthetic_runs(truth, rng), points)
        held = synthetic.synthetic_runs(truth, rng, sizes=(2e7, 2e8, 7e8), s_totals=(30, 3e3, 3e4), fractions=(0.15, 0.45, 0.85))
        assert fit.r_squared(held.loss, result.law(held.n, held.d_fp, held.d_qat, held.bits)) >= 0.98


def test_perturbed_laws_differ_within_their_ranges():
    laws = [synthetic.perturbed_law(BASE, np.random.default_rng(i), coefficients=0.5, exponents=0.2) for i in range(3)]
    base = BASE.to_vector()
    for law in laws:
        p = law.to_vector()
        for k, a, b in zip(PARAMS, base, p):
            if k in scaling_law.COEFFICIENTS:
                assert abs(b - a) <= 0.5
            else:
                assert abs(math.log(b / a)) <= 0.2
        assert not np.allclose(p, base)


def test_noise_free_fit_is_exact():
    runs = synthetic.synthetic_runs(BASE, np.random.default_rng(0), noise=0.0)
    result = fit.fit(runs, bootstrap=0)
    np.testing.assert_allclose(result.law(runs.n, runs.d_fp, runs.d_qat, runs.bits), runs.loss, rtol=1e-6)


# ---------------------------------------------------------------- bounded cost


def test_bootstrap_intervals_cover_the_fit():
    runs = synthetic.synthetic_runs(BASE, np.random.default_rng(2), **SMALL)
    result = fit.fit(runs, bootstrap=10)
    assert result.bootstrap == 10 and result.bootstrap_failed == 0
    for k in PARAMS:
        lo, hi = result.ci[k]
        assert lo <= hi
    assert result.ci["alpha"][0] <= BASE.alpha * 1.05 and result.ci["alpha"][1] >= BASE.alpha * 0.95
    assert "10 of 10 resamples converged" in result.report()


@pytest.mark.parametrize("effort", [optimize.Effort(maxiter=2, ftol=1e-10), optimize.Effort(seconds=0.0, ftol=1e-10)],
                         ids=["iterations", "seconds"])
def test_a_resample_past_its_bounds_is_counted_not_waited_on(monkeypatch, effort):
    monkeypatch.setattr(fit, "RESAMPLE", effort)
    runs = synthetic.synthetic_runs(BASE, np.random.default_rng(3), **SMALL)
    with pytest.warns(UserWarning, match="4 of 4 bootstrap resamples did not converge"):
        result = fit.fit(runs, bootstrap=4)
    assert result.bootstrap_failed == 4 and result.ci == {}
    assert result.law.meta["bootstrap_not_converged"] == 4
    assert "0 of 4 resamples converged; 4 did not (stopped at" in result.report()


def test_workers_give_the_same_intervals():
    runs = synthetic.synthetic_runs(BASE, np.random.default_rng(4), **SMALL)
    p, best = optimize.fit_vector(runs, optimize.starts(runs), delta=None)
    alone = fit.bootstrap_fits(runs, p, 3, seed=1, delta=best.delta)
    pooled = fit.bootstrap_fits(runs, p, 3, seed=1, workers=2, delta=best.delta)
    assert alone[1] == pooled[1] == 0
    np.testing.assert_allclose(np.array(alone[0]), np.array(pooled[0]), rtol=1e-9, atol=1e-12)


@pytest.mark.skipif(platform.system() != "Linux", reason="numpy's OpenBLAS is found through /proc/self/maps")
def test_the_fit_runs_openblas_on_one_thread():
    controls = blas_threads.openblas_thread_controls()
    assert controls, "numpy and scipy wheels bundle OpenBLAS"
    before = [get() for get, _ in controls]
    with blas_threads.one_blas_thread():
        assert [get() for get, _ in controls] == [1] * len(controls)
    assert [get() for get, _ in controls] == before


def test_huber_delta_follows_the_noise():
    runs = synthetic.synthetic_runs(BASE, np.random.default_rng(5), noise=0.02, **SMALL)
    result = fit.fit(runs, bootstrap=0)
    assert 1.345 * 0.015 < result.huber_delta < 1.345 * 0.025  # 1.345 σ for σ = 2%
    assert fit.fit(runs, bootstrap=0, huber_delta=1e-3).huber_delta == 1e-3
    quiet = synthetic.synthetic_runs(BASE, np.random.default_rng(5), noise=0.0, **SMALL)
    assert fit.fit(quiet, bootstrap=0).huber_delta == optimize.HUBER_DELTA  # never below the floor


# ---------------------------------------------------------------- inputs


def test_several_files_and_sweep_directories(tmp_path):
    runs = synthetic.synthetic_runs(BASE, np.random.default_rng(0), **SMALL)
    sweep = tmp_path / "sweep"
    sweep.mkdir()
    write_results(sweep / "results.jsonl", runs, slice(0, 50))
    write_results(sweep / "results-1-of-2.jsonl", runs, slice(50, 100))
    write_results(sweep / "results.jsonl.bak", runs, slice(0, 10))  # not a results file: ignored
    write_results(tmp_path / "more.jsonl", runs, slice(100, None))
    read = results.read_results(sweep, tmp_path / "more.jsonl", sweep / "results.jsonl")  # the last is read once
    assert len(read) == len(runs)
    assert sorted(read.loss) == sorted(runs.loss)
    (tmp_path / "empty").mkdir()
    with pytest.raises(fit.FitError, match="without results.jsonl"):
        results.read_results(tmp_path / "more.jsonl", tmp_path / "empty")


def test_fit_errors():
    with pytest.raises(fit.FitError, match="too few"):
        fit.fit(synthetic.synthetic_runs(BASE, np.random.default_rng(0), sizes=(1e8,), s_totals=(100,), widths=(2,), fractions=(0.5,)))
    with pytest.raises(fit.FitError, match="two or more bit widths"):
        fit.fit(synthetic.synthetic_runs(BASE, np.random.default_rng(0), widths=(2,)))


@pytest.mark.parametrize("record, message", [
    ({"N": 1e8, "D_fp": 1e9, "B": 2, "final_val_loss": 3.0}, "lacks D_qat"),
    ({"N": -1, "D_fp": 1e9, "D_qat": 1e8, "B": 2, "final_val_loss": 3.0}, "must be positive"),
    ({"N": 1e8, "D_fp": 0, "D_qat": 1e8, "B": 2, "final_val_loss": 3.0}, "QAT from scratch"),
    ({"N": 1e8, "D_fp": 1e9, "D_qat": 1e8, "B": "two", "final_val_loss": 3.0}, "B must be a positive number"),
    ({"N": 1e8, "D_fp": 1e9, "D_qat": 1e8, "B": 2, "final_val_loss": float("nan")}, "finite numbers"),
    ([1, 2, 3], "not a JSON object"),
])
def test_results_validation(tmp_path, record, message):
    path = tmp_path / "r.jsonl"
    path.write_text(json.dumps(record) + "\n")
    with pytest.raises(fit.FitError, match=message):
        results.read_results(path)


# ---------------------------------------------------------------- the command, without MLX

ISOLATED = """
import runpy, sys
from pathlib import Path
import mlx_qat.fit, mlx_qat.scaling_law, mlx_qat.plan
for module, args in (("mlx_qat.fit", sys.argv[1:]), ("mlx_qat.plan", ["--params", "1e8", "--tokens", "1e10", "--bits", "2"])):
    sys.argv = [module, *args]
    runpy.run_module(module, run_name="__main__", alter_sys=True)
from mlx_qat import blas
maps = Path("/proc/self/maps").read_text() if Path("/proc/self/maps").exists() else ""
mlx = sorted(m for m in sys.modules if m == "mlx" or m.startswith("mlx."))
mapped = [c for c in blas.candidates() if Path(c).resolve().name in maps]
print("CHECK", json.dumps({"mlx": mlx, "blas": blas.loaded, "mapped": mapped, "mkl": "libmkl" in maps}))
""".replace("import runpy", "import json, runpy")


def test_fit_and_plan_run_without_mlx_or_the_blas(tmp_path):
    runs = synthetic.synthetic_runs(BASE, np.random.default_rng(0), **SMALL)
    write_results(tmp_path / "results.jsonl", runs)
    out = subprocess.run([sys.executable, "-c", ISOLATED, str(tmp_path), "--out", str(tmp_path / "law.json"), "--bootstrap", "2"],
                         capture_output=True, text=True, check=True)
    check = json.loads(out.stdout.split("CHECK ", 1)[1])
    assert check == {"mlx": [], "blas": None, "mapped": [], "mkl": False}, out.stderr
    assert "R² overall" in out.stdout and "predictor (a = 6.7297;" in out.stdout
    assert "bootstrap" in out.stderr  # the progress bars
    code = "import sys, mlx_qat.fit; print([m for m in ('mlx', 'mlx.core', 'mlx_qat.plan', 'mlx_qat.quantizers') if m in sys.modules])"
    imported = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert imported.strip() == "[]"  # fitting needs the law alone


def test_fit_command_options(tmp_path):
    runs = synthetic.synthetic_runs(BASE, np.random.default_rng(0), **SMALL)
    write_results(tmp_path / "a.jsonl", runs, slice(0, 70))
    write_results(tmp_path / "b.jsonl", runs, slice(70, None))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        fit.main([str(tmp_path / "a.jsonl"), str(tmp_path / "b.jsonl"), "--out", str(tmp_path / "law.json"),
                  "--bootstrap", "3", "--workers", "1", "--huber-delta", "0.002", "--quiet"])
    law = scaling_law.load_law(tmp_path / "law.json")
    assert law.meta["n_runs"] == len(runs) and law.meta["bootstrap"] == 3 and law.meta["huber_delta"] == 0.002
    for bad in (["--bootstrap", "-1"], ["--workers", "two"]):
        with pytest.raises(SystemExit):
            fit.main([str(tmp_path / "a.jsonl"), "--out", str(tmp_path / "x.json"), *bad])


def test_read_results_keeps_one_schedule(tmp_path):
    rows = [dict(N=1e6, D_fp=8e6, D_qat=2e6, B=2, final_val_loss=3.0, schedule="separate"),
            dict(N=1e6, D_fp=8e6, D_qat=2e6, B=2, final_val_loss=2.9, schedule="fused"),
            dict(N=1e6, D_fp=1e7, D_qat=0, B=None, final_val_loss=2.8)]
    path = tmp_path / "results.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert list(results.read_results(path).loss) == [3.0, 2.9, 2.8]
    assert list(results.read_results(path, schedule="fused").loss) == [2.9, 2.8]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows[:2]))
    with pytest.raises(fit.FitError, match="no results of schedule cosine"):
        results.read_results(path, schedule="cosine")


# ---------------------------------------------------------------- identifiability, FP anchors, held-out error


def test_parameters_at_a_bound_are_reported():
    law = Law(**{**BASE.as_dict(), "nu": optimize.BOUNDS["nu"][1], "lam": 2.5e15, "kappa": 0.0})
    assert optimize.at_bounds(law) == {"kappa": "lower", "lam": "upper", "nu": "upper"}
    assert optimize.at_bounds(BASE) == {}


def test_a_fit_whose_data_pins_a_term_to_its_bound_says_so():
    """Losses that do not depend on the bit width: the exponents of 2^(-kB) run to their lower bound, 0."""
    flat = Law(**{**BASE.as_dict(), "kappa": 0.0, "chi": 0.0, "mu": 0.0})
    result = fit.fit(synthetic.synthetic_runs(flat, np.random.default_rng(0), noise=0.0, **SMALL), bootstrap=0)
    assert {"kappa", "chi", "mu"} & set(result.bounds) and set(result.bounds.values()) == {"lower"}
    assert all(f"{k} (lower)" in result.report() for k in result.bounds)
    assert result.law.meta["at_bounds"] == result.bounds
    clean = fit.fit(synthetic.synthetic_runs(BASE, np.random.default_rng(0), noise=0.0, **SMALL), bootstrap=0)
    assert clean.bounds == {} and "no parameter at a bound" in clean.report()


def test_fp_anchors_are_the_separate_runs_switch_losses_once_per_model_and_tokens(tmp_path):
    rows = [dict(N=1e6, D_fp=8e6, D_qat=2e6, B=b, final_val_loss=3.0 + b, fp_val_loss=2.9, schedule="separate")
            for b in (1, 2)]
    rows += [dict(N=1e6, D_fp=8e6, D_qat=2e6, B=2, final_val_loss=3.2, fp_val_loss=3.5, schedule="fused"),  # no cooldown
             dict(N=1e6, D_fp=6e6, D_qat=4e6, B=2, final_val_loss=3.1, fp_val_loss=2.95, schedule="separate"),
             dict(N=1e6, D_fp=1e7, D_qat=0, B=None, final_val_loss=2.8, fp_val_loss=None, schedule="separate"),
             dict(N=1e6, D_fp=5e6, D_qat=5e6, B=2, final_val_loss=3.3, fp_val_loss=3.0, schedule="separate")]
    rows[-1]["D_fp"], rows[-1]["D_qat"] = 1e7 * 0.999, 1e7 * 0.001  # FP loss at D_fp ≈ the FP-only run's D: still its own point
    path = tmp_path / "results.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    plain = results.read_results(path)
    anchored = results.read_results(path, fp_anchors=True)
    assert len(plain) == 6 and not plain.anchor.any()
    extra = anchored.where(anchored.anchor)
    assert sorted(zip(extra.d_fp, extra.loss)) == [(6e6, 2.95), (8e6, 2.9), (1e7 * 0.999, 3.0)]
    assert np.all(np.isnan(extra.bits)) and np.all(extra.d_qat == 0) and list(extra.budget) == [1e7] * 3
    fused = results.read_results(path, schedule="fused", fp_anchors=True)  # FP facts hold for both schedules
    assert fused.is_qat.sum() == 1 and fused.anchor.sum() == 3


def test_held_out_error_of_a_well_specified_law_is_small():
    runs = synthetic.synthetic_runs(BASE, np.random.default_rng(6), noise=0.002, **SMALL)
    by_budget, *by_size = fit.held_out(runs)
    # the largest D_total of each size: that of 4 bits at S_total 1e5 (5 fractions) and its FP run
    assert by_budget["runs"] == 3 * (5 + 1) and len(by_budget["groups"]) == 3
    assert all(g["S_total"] == 1e5 and g["B"] == 4 for g in by_budget["groups"])
    assert by_budget["loss_mae"] < 0.02
    truth = [plan.optimal_fraction(BASE, g["N"], g["D_total"], g["B"])[0] for g in by_budget["groups"]]
    assert max(abs(g["law_fraction"] - t) for g, t in zip(by_budget["groups"], truth)) < 0.1  # extrapolated in D
    # each model size in turn, predicted from the other two: two sizes leave the N terms loose, so the
    # losses of an extrapolated size are off, an interpolated one's less so; the fractions hold
    assert [h["held_out"] for h in by_size] == [f"model size N = {n:.3g}" for n in sorted(set(runs.n))]
    assert [h["runs"] for h in by_size] == [int((runs.n == n).sum()) for n in sorted(set(runs.n))]
    smallest, middle, largest = (h["loss_mae"] for h in by_size)
    assert middle < min(smallest, largest)
    assert all(h["fraction_mae_law"] < 0.15 for h in by_size)
    text = fit.format_held_out([by_budget, *by_size])
    assert text.count("loss MAE") == 4 and "the largest budget of each size" in text


def test_a_held_out_split_that_cannot_be_fitted_says_why():
    runs = synthetic.synthetic_runs(BASE, np.random.default_rng(6), noise=0.002, **SMALL)
    h = fit.predict_held_out(runs, "all but one run", np.arange(len(runs)) > 0)
    assert h["held_out"] == "all but one run" and "too few" in h["error"]
    assert "not fitted without them (" in fit.format_held_out([h])


def test_results_of_two_quantization_modes_are_not_fitted_together(tmp_path):
    rows = [dict(N=1e6, D_fp=8e6, D_qat=2e6, B=4, final_val_loss=3.0, schedule="separate"),
            dict(N=1e6, D_fp=8e6, D_qat=2e6, B=4, mode="mxfp4", final_val_loss=3.1, schedule="separate"),
            dict(N=1e6, D_fp=1e7, D_qat=0, B=None, final_val_loss=2.8)]
    path = tmp_path / "results.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    with pytest.raises(results.FitError, match="mix the quantization modes affine, mxfp4"):
        results.read_results(path)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows[1:]))
    assert list(results.read_results(path).loss) == [3.1, 2.8]
