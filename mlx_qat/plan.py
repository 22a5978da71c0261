"""Plan QAT with the predictor and a fitted law: what fraction, which bit width, what is wasted.

    python -m mlx_qat.plan --params 1e8 --tokens 1e10 --bits 2
    python -m mlx_qat.plan --params 1e8 --tokens 1e10 --bits 2 --law law.json --fraction 0.1 --memory 2GB
    python -m mlx_qat.plan ... --json

Everything here is numpy/scipy: it runs where MLX does not.

B is the weight's element bits, and S_total = D_total / (N · B/8) counts those alone: the
integer path's scales and biases (e.g. 2 × 32 bits per group of 64) are not in it, and neither
are the FP modes' 8-bit group scales. So an FP-mode run plans with B = 4 (mxfp4, nvfp4) or
B = 8 (mxfp8), the `bits` its config resolves to; the stored bits per weight (mxfp4 4.25,
nvfp4 4.5, mxfp8 8.25) are what summary.json's bits_per_weight reports.
"""

import argparse
import json
import math
import re
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional, Sequence

import numpy as np
from scipy.optimize import brentq, minimize_scalar

from . import scaling_law
from .constants import BITS
from .scaling_law import Law, load_law

FP_BITS = 16  # the full-precision reference stores bf16/fp16 weights
F_MIN, F_MAX = 1e-4, 1 - 1e-4

# The law `plan` uses without --law: a file inside the package, named relative to it (listed in
# pyproject.toml's package data). It is the local sweep's fused fit (benchmarks/results/sweep): tiny
# models, small budgets, a CPU. Its label and fitted ranges print with every answer.
PACKAGED_LAW: Optional[str] = "laws/local.json"


# ---------------------------------------------------------------- questions a law answers


def loss_at_fraction(law: Law, n_params, tokens, bits, fraction):
    return law(n_params, (1 - np.asarray(fraction)) * tokens, np.asarray(fraction) * tokens, bits)


def optimal_fraction(law: Law, n_params: float, tokens: float, bits: float):
    """(f*, L*): the QAT fraction minimising the law's loss at a fixed D_total = D_fp + D_qat."""
    grid = np.linspace(F_MIN, F_MAX, 400)
    i = int(np.argmin(loss_at_fraction(law, n_params, tokens, bits, grid)))
    lo, hi = grid[max(i - 1, 0)], grid[min(i + 1, len(grid) - 1)]
    res = minimize_scalar(lambda f: float(loss_at_fraction(law, n_params, tokens, bits, f)), bounds=(lo, hi),
                          method="bounded", options={"xatol": 1e-6})
    return float(res.x), float(res.fun)


def wasted_tokens(law: Law, n_params: float, tokens: float, bits: float, fraction: float) -> float:
    """Extra tokens (as a fraction of D) that QAT fraction `fraction` needs to reach the loss the
    optimal fraction reaches with D tokens; inf if no budget up to 1000·D does."""
    _, best = optimal_fraction(law, n_params, tokens, bits)

    def gap(log_d):
        return float(loss_at_fraction(law, n_params, math.exp(log_d), bits, fraction)) - best

    if gap(math.log(tokens)) <= 0:
        return 0.0
    hi = math.log(tokens * 1000)
    if gap(hi) > 0:
        return math.inf
    return math.exp(brentq(gap, math.log(tokens), hi, xtol=1e-10)) / tokens - 1


def params_for_memory(memory_bytes: float, bits: float) -> float:
    """N_B = 8·M / B: the parameters that fit in M bytes at B bits."""
    return 8 * memory_bytes / bits


@dataclass
class BitChoice:
    bits: float
    n_params: float
    tokens: float
    fraction: float
    loss: float


def best_bits(law: Law, memory_bytes: float, tokens: float, compute: Optional[float] = None,
              widths: Sequence[float] = BITS) -> List[BitChoice]:
    """Each bit width under a memory budget, best first: N_B = 8M/B trained on `tokens` tokens,
    or, with `compute` (FLOPs, 6·N·D), on D_B = compute / (6·N_B) tokens."""
    choices = []
    for b in widths:
        n = params_for_memory(memory_bytes, b)
        d = compute / (6 * n) if compute else tokens
        f, loss = optimal_fraction(law, n, d, b)
        choices.append(BitChoice(b, n, d, f, loss))
    return sorted(choices, key=lambda c: c.loss)


def gap_to_fp(law: Law, memory_bytes: float, tokens: float, bits: float) -> float:
    """QAT loss at B bits minus FP loss, for models of the same memory (N_B = 8M/B vs 8M/16)."""
    _, qat = optimal_fraction(law, params_for_memory(memory_bytes, bits), tokens, bits)
    return qat - float(law.fp_loss(params_for_memory(memory_bytes, FP_BITS), tokens))


def tokens_matching_fp(law: Law, memory_bytes: float, bits: float, lo: float = 1e6, hi: float = 1e15) -> Optional[float]:
    """The fewest tokens at which B-bit QAT matches a same-memory FP model (None if it never
    does in [lo, hi])."""
    grid = np.geomspace(lo, hi, 60)
    gaps = np.array([gap_to_fp(law, memory_bytes, d, bits) for d in grid])
    below = np.flatnonzero(gaps <= 0)
    if below.size == 0:
        return None
    i = below[0]
    if i == 0:
        return float(lo)

    def gap(log_d):
        return gap_to_fp(law, memory_bytes, math.exp(log_d), bits)

    return float(math.exp(brentq(gap, math.log(grid[i - 1]), math.log(grid[i]), xtol=1e-6)))


# ---------------------------------------------------------------- the command


def parse_size(text: str) -> float:
    """'2GB', '512MiB', '1.5e9' -> bytes."""
    m = re.fullmatch(r"\s*([0-9.eE+-]+)\s*([kKmMgGtT]?)(i?)[bB]?\s*", text)
    if not m:
        raise argparse.ArgumentTypeError(f"cannot read the size {text!r}; write it like 2GB, 512MiB or 1.5e9")
    value, prefix, binary = float(m.group(1)), m.group(2).upper(), m.group(3)
    base = 1024 if binary else 1000
    return value * base ** " KMGT".index(prefix or " ")


def number(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number (1e8 and 100000000 both work)") from None
    if not value > 0:
        raise argparse.ArgumentTypeError(f"{text} must be positive")
    return value


def bits_arg(text: str) -> float:
    value = float(text)
    if value not in BITS:
        raise argparse.ArgumentTypeError(f"bits={text}; use one of {', '.join(map(str, BITS))}")
    return value


FAR_OUTSIDE = 3  # a question this many times beyond the law's fitted N or S_total is an extrapolation
PREDICTOR_MAE = 0.091  # the predictor's mean absolute error over the paper's runs
EDGE = 1e-3  # an optimal fraction this close to 0 or 1 lies at the edge of the search


def coverage(law: Law, n_params: float, s_total: float, bits: float) -> List[str]:
    """What of a question lies outside the law's fitted range (N, S_total beyond FAR_OUTSIDE times
    it; bits beyond the fitted widths), one phrase each; empty when the law covers it."""
    out = []
    for name, value, fitted in (("N", n_params, law.meta.get("N_range")), ("S_total", s_total, law.meta.get("S_total_range"))):
        if not fitted:
            out.append(f"the law records no fitted range of {name}")
        elif value > fitted[1] * FAR_OUTSIDE:
            out.append(f"{name} = {value:.3g} is {value / fitted[1]:.3g}x above it")
        elif value < fitted[0] / FAR_OUTSIDE:
            out.append(f"{name} = {value:.3g} is {fitted[0] / value:.3g}x below it")
    widths = law.meta.get("bits")
    if widths and not min(widths) <= bits <= max(widths):
        out.append(f"B = {bits:g} bits is outside it")
    return out


def at_edge(fraction: float) -> bool:
    return fraction < F_MIN + EDGE or fraction > F_MAX - EDGE


def answer(n_params: float, tokens: float, bits: float, law: Optional[Law], fraction: float = 0.1,
           memory: Optional[float] = None, a: float = scaling_law.PREDICTOR_A) -> Dict:
    """Everything `plan` reports, as one JSON-ready dict."""
    s_total = float(scaling_law.tokens_per_param_byte(tokens, n_params, bits))
    out = {
        "inputs": {"params": n_params, "tokens": tokens, "bits": bits, "fraction": fraction, "memory_bytes": memory},
        "S_total": s_total,
        "predictor": {"optimal_fraction": float(scaling_law.predicted_qat_fraction(s_total, a)) if s_total > 1 else None, "a": a,
                      "mae_on_the_papers_runs": PREDICTOR_MAE},
    }
    if law is None:
        out["law"] = None
        return out
    f_opt, loss_opt = optimal_fraction(law, n_params, tokens, bits)
    memory = memory or n_params * bits / 8
    compute = 6 * n_params * tokens
    outside = coverage(law, n_params, s_total, bits)
    out["law"] = {
        "optimal_fraction": f_opt,
        "optimal_fraction_at_edge": at_edge(f_opt),
        "loss": loss_opt,
        "fp_loss": float(law.fp_loss(n_params, tokens)),
        "chosen_fraction": {"fraction": fraction, "loss": float(loss_at_fraction(law, n_params, tokens, bits, fraction)),
                            "wasted_tokens": wasted_tokens(law, n_params, tokens, bits, fraction)},
        "label": law.meta.get("label", ""),
        "N_range": law.meta.get("N_range"),
        "S_total_range": law.meta.get("S_total_range"),
        "bits": law.meta.get("bits"),
        "outside_fitted_range": bool(outside),
        "outside": outside,
        "memory_bytes": memory,
        "best_bits_fixed_tokens": [c.__dict__ for c in best_bits(law, memory, tokens)],
        "best_bits_fixed_compute": [c.__dict__ for c in best_bits(law, memory, tokens, compute=compute)],
        "vs_fp": [
            {"bits": b, "gap": gap_to_fp(law, memory, tokens, b), "tokens_matching_fp": tokens_matching_fp(law, memory, b)}
            for b in BITS
        ],
    }
    return out


def _fitted_range(law: Dict) -> str:
    parts = [f"{name} {r[0]:.3g}–{r[1]:.3g}" for name, r in (("N", law["N_range"]), ("S_total", law["S_total_range"])) if r]
    if law["bits"]:
        parts.append(f"bits {', '.join(f'{b:g}' for b in law['bits'])}")
    return ", ".join(parts) or "unrecorded"


def _fmt_tokens(x: Optional[float]) -> str:
    return "never" if x is None else f"{x:.3g}"


def _fraction(f: float) -> str:
    return f"{f:.3f}" + (" (at the edge of [0, 1]: the law has no interior optimum here)" if at_edge(f) else "")


def format_answer(ans: Dict) -> str:
    i, law = ans["inputs"], ans["law"]
    question = (f"N = {i['params']:.3g} parameters, D = {i['tokens']:.3g} tokens, B = {i['bits']} bits: "
                f"S_total = {ans['S_total']:.4g} tokens per parameter byte")
    pred = ans["predictor"]["optimal_fraction"]
    predictor = (f"predictor (a = {ans['predictor']['a']}; MAE {PREDICTOR_MAE} on the paper's runs): optimal QAT fraction "
                 + (f"{pred:.3f}" if pred is not None else "undefined (S_total <= 1)"))
    if law is None:
        return "\n".join([question, predictor, "no fitted law: pass --law law.json (python -m mlx_qat.fit RESULTS) for "
                                               "losses, waste and bit widths"])
    name = f"law{' (' + law['label'] + ')' if law['label'] else ''}"
    lines = []
    if law["outside"]:  # the predictor leads; the law's figures follow as what they are, an extrapolation
        lines += [f"outside the law's fitted range ({_fitted_range(law)}): " + "; ".join(law["outside"])
                  + ". The paper's predictor leads; the law's figures below are extrapolations.", question, predictor]
    else:
        lines += [question, predictor, f"(the {name} was fitted on {_fitted_range(law)})"]
    c = law["chosen_fraction"]
    waste = "more than 1000x" if math.isinf(c["wasted_tokens"]) else f"{100 * c['wasted_tokens']:.1f}% extra tokens"
    lines += [
        f"{name}: optimal QAT fraction {_fraction(law['optimal_fraction'])}, "
        f"predicted loss {law['loss']:.4f} (full precision: {law['fp_loss']:.4f})",
        f"QAT fraction {c['fraction']:g}: loss {c['loss']:.4f}, wastes {waste} versus the law's optimum",
    ]
    lines += [
        "",
        f"best bit width for {law['memory_bytes'] / 1e9:.3g} GB of weights:",
        f"  {'bits':>5} {'params':>10} {'tokens':>10} {'f*':>6} {'loss':>8}   {'params':>10} {'tokens':>10} {'f*':>6} {'loss':>8}",
        f"  {'':>5} {'--- fixed tokens ---':^37}   {'--- fixed compute 6ND ---':^37}",
    ]
    by_bits = {c["bits"]: c for c in law["best_bits_fixed_compute"]}
    for t in sorted(law["best_bits_fixed_tokens"], key=lambda c: c["bits"]):
        k = by_bits[t["bits"]]
        lines.append(f"  {t['bits']:>5g} {t['n_params']:>10.3g} {t['tokens']:>10.3g} {_edge_mark(t['fraction'])} {t['loss']:>8.4f}"
                     f"   {k['n_params']:>10.3g} {k['tokens']:>10.3g} {_edge_mark(k['fraction'])} {k['loss']:>8.4f}")
    if any(at_edge(c["fraction"]) for c in law["best_bits_fixed_tokens"] + law["best_bits_fixed_compute"]):
        lines.append("  (* the optimum lies at the edge of [0, 1]: no interior optimum)")
    lines.append(f"  best: {law['best_bits_fixed_tokens'][0]['bits']:g} bits at fixed tokens, "
                 f"{law['best_bits_fixed_compute'][0]['bits']:g} bits at fixed compute")
    lines += ["", "QAT vs a full-precision (16-bit) model of the same memory:",
              f"  {'bits':>5} {'loss gap':>9} {'QAT matches FP from':>20}"]
    for row in law["vs_fp"]:
        lines.append(f"  {row['bits']:>5g} {row['gap']:>+9.4f} {_fmt_tokens(row['tokens_matching_fp']):>20}")
    return "\n".join(lines)


def _edge_mark(f: float) -> str:
    return f"{f:>5.3f}" + ("*" if at_edge(f) else " ")


def packaged_law() -> Optional[Law]:
    """The law that ships with the package (PACKAGED_LAW), or None when none does."""
    return None if PACKAGED_LAW is None else load_law(Path(__file__).parent / PACKAGED_LAW)


def main(argv: Optional[Sequence[str]] = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m mlx_qat.plan", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--params", type=number, required=True, help="model parameters N (tied embedding once)")
    parser.add_argument("--tokens", type=number, required=True, help="total training tokens D_total")
    parser.add_argument("--bits", type=bits_arg, required=True, help="QAT bits B")
    parser.add_argument("--law", type=Path, help="a law file from python -m mlx_qat.fit (without it: the packaged law if one "
                        "ships, else the predictor alone)")
    parser.add_argument("--fraction", type=float, default=0.1, help="a QAT fraction to assess (default 0.1)")
    parser.add_argument("--memory", type=parse_size, help="weight memory budget, e.g. 2GB (default: N·B/8)")
    parser.add_argument("--predictor-a", type=float, default=scaling_law.PREDICTOR_A, help="the predictor's constant a")
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    args = parser.parse_args(argv)
    if not 0 < args.fraction < 1:
        parser.error(f"--fraction {args.fraction} must be in (0, 1)")
    try:
        law = load_law(args.law) if args.law else packaged_law()
    except ValueError as e:
        parser.exit(2, f"error: {e}\n")
    ans = answer(args.params, args.tokens, args.bits, law, args.fraction, args.memory, args.predictor_a)
    print(json.dumps(ans, indent=2) if args.json else format_answer(ans))


if __name__ == "__main__":
    main(sys.argv[1:])
