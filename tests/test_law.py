"""The scaling law, its file format, the planner, and the fit and plan commands (numpy/scipy only).

The fit itself is checked in test_fit.py."""

import json
import math
import subprocess
import sys

import numpy as np
import pytest

from mlx_qat import plan, scaling_law, synthetic
from mlx_qat.scaling_law import Law, predicted_qat_fraction, tokens_per_param_byte

# Known laws with realistic QAT penalties (median ~5% over FP, tens of % at 1 bit and small S).
TRUTHS = [
    Law(alpha=1.7, beta=410, gamma=0.28, zeta=400, eta=0.34, theta=0.08, kappa=0.7, phi=60, chi=0.9, psi=0.15,
        omega=0.35, lam=200, mu=0.8, nu=0.15, xi=0.45, rho=0.25),
    Law(alpha=2.0, beta=1500, gamma=0.32, zeta=250, eta=0.28, theta=0.15, kappa=0.9, phi=40, chi=1.0, psi=0.1,
        omega=0.3, lam=150, mu=0.9, nu=0.1, xi=0.5, rho=0.2),
    Law(alpha=1.8, beta=600, gamma=0.3, zeta=350, eta=0.32, theta=0.1, kappa=0.8, phi=30, chi=0.8, psi=0.12,
        omega=0.4, lam=120, mu=0.7, nu=0.12, xi=0.4, rho=0.3),
]


def test_law_formula_term_by_term():
    law = TRUTHS[0]
    n, d_fp, d_qat, b = 1e8, 6e9, 4e9, 2
    s_fp, s_qat = d_fp / (n * b / 8), d_qat / (n * b / 8)
    expected = (law.alpha + law.beta / (d_fp + d_qat) ** law.gamma + law.zeta / n**law.eta
                + law.theta * 2 ** (-law.kappa * b)
                + law.phi * 2 ** (-law.chi * b) / (n**law.psi * s_qat**law.omega)
                + law.lam * 2 ** (-law.mu * b) / (n**law.nu * s_fp**law.xi * s_qat**law.rho))
    assert float(law(n, d_fp, d_qat, b)) == pytest.approx(expected, rel=1e-12)
    fp_only = law.alpha + law.beta / 1e10**law.gamma + law.zeta / n**law.eta
    assert float(law(n, 1e10, 0, None)) == pytest.approx(fp_only, rel=1e-12)
    assert float(law.fp_loss(n, 1e10)) == pytest.approx(fp_only, rel=1e-12)
    vec = law(np.array([1e8, 1e9]), np.array([6e9, 6e9]), np.array([4e9, 0.0]), np.array([2.0, np.nan]))
    assert vec.shape == (2,) and vec[1] == pytest.approx(float(law.fp_loss(1e9, 6e9)))


def test_statistics_and_predictor():
    assert float(tokens_per_param_byte(1e9, 1e8, 2)) == pytest.approx(40.0)
    s = np.array([20, 1e3, 1e5])
    np.testing.assert_allclose(predicted_qat_fraction(s), np.exp(np.log(s) - 6.7297 / np.log(s)) / s)


def test_vector_round_trip():
    law = TRUTHS[1]
    back = Law.from_vector(law.to_vector())
    assert back.as_dict() == pytest.approx(law.as_dict(), rel=1e-12)


def brute_force_optimum(law, n, d, b):
    f = np.linspace(1e-4, 1 - 1e-4, 200_001)
    losses = plan.loss_at_fraction(law, n, d, b, f)
    i = int(np.argmin(losses))
    return f[i], losses[i]


@pytest.mark.parametrize("n, s, b", [(1e7, 10, 1), (1e8, 1e3, 2), (1e9, 1e5, 6), (3e8, 300, 4)])
def test_planner_matches_brute_force(n, s, b):
    law = TRUTHS[1]
    d = s * n * b / 8
    f, loss = plan.optimal_fraction(law, n, d, b)
    f_bf, loss_bf = brute_force_optimum(law, n, d, b)
    assert f == pytest.approx(f_bf, abs=1e-4) and loss == pytest.approx(loss_bf, rel=1e-9)

    waste = plan.wasted_tokens(law, n, d, b, 0.1)
    scale = np.geomspace(1, 10, 20_001)
    reach = [float(plan.loss_at_fraction(law, n, d * k, b, 0.1)) for k in scale]
    first = scale[np.argmax(np.array(reach) <= loss_bf)]
    assert 1 + waste == pytest.approx(first, rel=1e-3)


def test_best_bits_and_fp_comparison_match_brute_force():
    law, memory, tokens = TRUTHS[0], 1e9, 2e10
    choices = plan.best_bits(law, memory, tokens)
    brute = {b: brute_force_optimum(law, 8 * memory / b, tokens, b)[1] for b in plan.BITS}
    assert choices[0].bits == min(brute, key=brute.get)
    for c in choices:
        assert c.loss == pytest.approx(brute[c.bits], rel=1e-8) and c.n_params == pytest.approx(8 * memory / c.bits)
    compute = 6 * 2e9 * tokens
    for c in plan.best_bits(law, memory, tokens, compute=compute):
        assert 6 * c.n_params * c.tokens == pytest.approx(compute)
    for b in (2, 4):
        match = plan.tokens_matching_fp(law, memory, b)
        if match is not None:
            assert abs(plan.gap_to_fp(law, memory, match, b)) < 1e-6
            assert plan.gap_to_fp(law, memory, match * 0.5, b) > 0


def write_results(path, runs):
    with open(path, "w") as f:
        for i in range(len(runs)):
            b = None if math.isnan(runs.bits[i]) else float(runs.bits[i])
            f.write(json.dumps({"N": runs.n[i], "D_fp": runs.d_fp[i], "D_qat": runs.d_qat[i], "B": b,
                                "final_val_loss": runs.loss[i], "note": "kept but ignored"}) + "\n")


@pytest.mark.slow
def test_fit_and_plan_commands(tmp_path):
    runs = synthetic.synthetic_runs(TRUTHS[0], np.random.default_rng(0), sizes=(1e7, 1e8, 1e9), s_totals=(10, 1e3, 1e5), widths=(1, 2, 4))
    write_results(tmp_path / "results.jsonl", runs)
    no_mlx = "import sys; sys.modules['mlx'] = None; import runpy; sys.argv = sys.argv[1:]; runpy.run_module(sys.argv[0], run_name='__main__')"
    out = subprocess.run([sys.executable, "-c", no_mlx, "mlx_qat.fit", str(tmp_path / "results.jsonl"), "--out",
                          str(tmp_path / "law.json"), "--plot", str(tmp_path / "plots"), "--bootstrap", "5"],
                         capture_output=True, text=True, check=True).stdout
    assert "R² overall" in out and "predictor constant a" in out
    assert {p.name for p in (tmp_path / "plots").iterdir()} == {
        "loss_vs_fraction.png", "optimal_fraction_vs_S.png", "predicted_vs_observed.png", "wasted_tokens_vs_S.png"}
    law = scaling_law.load_law(tmp_path / "law.json")
    assert law.meta["n_runs"] == len(runs)

    args = ["--params", "1e8", "--tokens", "1e10", "--bits", "2", "--law", str(tmp_path / "law.json"), "--memory", "1GB"]
    answer = json.loads(subprocess.run([sys.executable, "-c", no_mlx, "mlx_qat.plan", *args, "--json"],
                                       capture_output=True, text=True, check=True).stdout)
    assert answer["predictor"]["optimal_fraction"] == pytest.approx(float(predicted_qat_fraction(1e10 / (1e8 * 2 / 8))))
    f_opt, loss = plan.optimal_fraction(law, 1e8, 1e10, 2)
    assert answer["law"]["optimal_fraction"] == pytest.approx(f_opt) and answer["law"]["loss"] == pytest.approx(loss)
    assert answer["law"]["chosen_fraction"]["wasted_tokens"] >= 0
    table = subprocess.run([sys.executable, "-m", "mlx_qat.plan", *args], capture_output=True, text=True, check=True).stdout
    assert table == plan.format_answer(plan.answer(1e8, 1e10, 2.0, law, memory=1e9)) + "\n"  # --bits reads as a float
    assert "optimal QAT fraction" in table and "best bit width" in table


def test_plan_without_a_law_uses_the_predictor(capsys, monkeypatch):
    ans = plan.answer(1e8, 1e10, 4, None)
    assert ans["law"] is None and ans["predictor"]["optimal_fraction"] == pytest.approx(float(predicted_qat_fraction(200)))
    assert "no fitted law" in plan.format_answer(ans)
    monkeypatch.setattr(plan, "PACKAGED_LAW", None)  # as for a package that ships no law
    plan.main(["--params", "1e8", "--tokens", "1e10", "--bits", "2"])
    out = capsys.readouterr()
    assert out.out.splitlines()[1:] == ["predictor (a = 6.7297; MAE 0.091 on the paper's runs): optimal QAT fraction 0.325",
                                        "no fitted law: pass --law law.json (python -m mlx_qat.fit RESULTS) for losses, waste and bit widths"]
    assert out.err == ""


def test_a_packaged_law_is_the_default(tmp_path, monkeypatch, capsys):
    scaling_law.save_law(Law(**TRUTHS[0].as_dict(), meta={"label": "packaged"}), tmp_path / "local.json")
    monkeypatch.setattr(plan, "PACKAGED_LAW", str(tmp_path / "local.json"))  # an absolute path joins as itself
    plan.main(["--params", "1e8", "--tokens", "1e10", "--bits", "2", "--json"])
    answer = json.loads(capsys.readouterr().out)
    assert answer["law"]["label"] == "packaged"
    assert answer["law"]["optimal_fraction"] == pytest.approx(plan.optimal_fraction(TRUTHS[0], 1e8, 1e10, 2)[0])


def test_law_files_round_trip_and_explain_their_problems(tmp_path):
    law = Law(**TRUTHS[1].as_dict(), meta={"label": "x", "n_runs": 3})
    scaling_law.save_law(law, tmp_path / "law.json")
    back = scaling_law.load_law(tmp_path / "law.json")
    assert back.as_dict() == law.as_dict() and back.meta == {"label": "x", "n_runs": 3}
    assert json.loads((tmp_path / "law.json").read_text())["format"] == scaling_law.LAW_FORMAT
    assert plan.load_law is scaling_law.load_law
    assert [p.name for p in tmp_path.iterdir()] == ["law.json"]  # no temporary file left behind
    for text, message in [("{", "cannot read"), ('{"format": "other"}', "not a version-1"), ("[1]", "not a version-1"),
                          ('{"format": "mlx_qat.law", "version": 1, "params": {"alpha": 1}}', "lacks the parameters")]:
        (tmp_path / "bad.json").write_text(text)
        with pytest.raises(ValueError, match=message):
            scaling_law.load_law(tmp_path / "bad.json")


def test_plan_argument_errors(capsys, tmp_path):
    for args, message in [
        (["--params", "1e8", "--tokens", "1e10", "--bits", "7"], "bits=7"),
        (["--params", "-5", "--tokens", "1e10", "--bits", "2"], "must be positive"),
        (["--params", "1e8", "--tokens", "1e10", "--bits", "2", "--memory", "lots"], "cannot read the size"),
        (["--params", "1e8", "--tokens", "1e10", "--bits", "2", "--law", str(tmp_path / "none.json")], "cannot read the law file"),
    ]:
        with pytest.raises(SystemExit):
            plan.main(args)
        assert message in capsys.readouterr().err


def test_parse_size():
    assert plan.parse_size("2GB") == 2e9 and plan.parse_size("512MiB") == 512 * 2**20 and plan.parse_size("1.5e9") == 1.5e9


def test_plan_says_where_the_law_was_fitted_and_leads_with_the_predictor_outside_it():
    meta = {"label": "local", "S_total_range": [1.0, 50.0], "N_range": [1e5, 1e6], "bits": [1.0, 2.0, 4.0]}
    law = Law.from_vector(TRUTHS[0].to_vector(), meta=meta)
    inside = plan.answer(1e6, 1e8, 2, law)  # S_total = 400: beyond 3x of the range
    assert inside["law"]["outside"] == ["S_total = 400 is 8x above it"]
    near = plan.format_answer(plan.answer(2e6, 1e7, 2, law))  # N 2x above, S_total 20: covered
    assert near.splitlines()[0].startswith("N = 2e+06") and "(the law (local) was fitted on N 1e+05–1e+06, S_total 1–50, bits 1, 2, 4)" in near
    far = plan.answer(1e8, 1e8, 3, law)  # N 100x above
    first = plan.format_answer(far).splitlines()[0]
    assert first.startswith("outside the law's fitted range (N 1e+05–1e+06, S_total 1–50, bits 1, 2, 4): N = 1e+08 is 100x above it")
    assert "predictor leads" in first
    assert far["law"]["outside_fitted_range"] and far["law"]["N_range"] == [1e5, 1e6]
    assert plan.answer(1e6, 1e7, 6, law)["law"]["outside"] == ["B = 6 bits is outside it"]
    bare = Law.from_vector(TRUTHS[0].to_vector(), meta={"label": "old"})  # a law without its ranges covers nothing
    assert plan.answer(1e6, 1e7, 2, bare)["law"]["outside"] == ["the law records no fitted range of N",
                                                                 "the law records no fitted range of S_total"]


def test_an_optimum_at_the_edge_is_called_that():
    lonely = Law(**{**TRUTHS[0].as_dict(), "lam": 1e-9})  # no FP/QAT interaction: the QAT penalty falls all the way to f = 1
    ans = plan.answer(1e8, 1e10, 2, Law(**lonely.as_dict(), meta={"N_range": [1e7, 1e9], "S_total_range": [10, 1e3]}))
    assert ans["law"]["optimal_fraction_at_edge"] and ans["law"]["optimal_fraction"] > 0.99
    text = plan.format_answer(ans)
    assert "optimal QAT fraction 1.000 (at the edge of [0, 1]" in text and "no interior optimum" in text
    assert not plan.answer(1e8, 1e10, 2, TRUTHS[0])["law"]["optimal_fraction_at_edge"]


def test_the_shipped_law_does_not_cover_a_100m_model(capsys):
    law = plan.packaged_law()
    assert law.meta["N_range"][1] < 1e7 and law.meta["S_total_range"] and law.meta["bits"]
    plan.main(["--params", "1e8", "--tokens", "1e10", "--bits", "2"])
    out = capsys.readouterr().out.splitlines()
    assert out[0].startswith("outside the law's fitted range") and "N = 1e+08" in out[0] and "predictor leads" in out[0]
    assert out[2].startswith("predictor (a = 6.7297; MAE 0.091")
    plan.main(["--params", "1e8", "--tokens", "1e10", "--bits", "2", "--json"])
    assert json.loads(capsys.readouterr().out)["law"]["outside_fitted_range"]
