"""The QAT loss scaling law, its file format and the optimal-fraction predictor. numpy only.

Statistics: S_x = D_x / (N · B/8), tokens per parameter byte, for x in {total, fp, qat}.

    L(N, D_qat, D_fp, B) = α + β / D_total^γ + ζ / N^η                       (Chinchilla-like)
                         + θ · 2^(−κB)                                       (irreducible QAT error)
                         + φ · 2^(−χB) / (N^ψ · S_qat^ω)                     (pure QAT penalty)
                         + λ · 2^(−μB) / (N^ν · S_fp^ξ · S_qat^ρ)            (FP/QAT interaction)

FP-only runs (no QAT: B is None/NaN, D_qat = 0) keep the Chinchilla part alone.

Every term is positive, so log L is a log-sum-exp of six terms whose logarithms are *linear* in
the parameter vector p = (ln α, ln β, γ, ln ζ, η, ln θ, κ, ln φ, χ, ψ, ω, ln λ, μ, ν, ξ, ρ):
ln(term_k) = X_k · p with a design row X_k built from (N, D, B). The fit works on that form.

Predictor (Dremov et al. 2025): f̂(S_total) = exp(−a / ln S_total), a = 6.7297.
"""

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, Optional

import numpy as np

from .atomic import write_text

PREDICTOR_A = 6.7297  # the paper's fitted constant (natural log)

PARAMS = ("alpha", "beta", "gamma", "zeta", "eta", "theta", "kappa", "phi", "chi", "psi", "omega",
          "lam", "mu", "nu", "xi", "rho")
COEFFICIENTS = ("alpha", "beta", "zeta", "theta", "phi", "lam")  # stored as logs in p
# The parameters of each term, its coefficient first.
TERM_PARAMS = (("alpha",), ("beta", "gamma"), ("zeta", "eta"), ("theta", "kappa"),
               ("phi", "chi", "psi", "omega"), ("lam", "mu", "nu", "xi", "rho"))
N_TERMS = len(TERM_PARAMS)
LN2 = np.log(2.0)


def tokens_per_param_byte(tokens, n_params, bits):
    """S = D / (N · B/8)."""
    return np.asarray(tokens, dtype=float) / (np.asarray(n_params, dtype=float) * np.asarray(bits, dtype=float) / 8)


def predicted_qat_fraction(s_total, a: float = PREDICTOR_A):
    """f̂(S) = exp(log S − a / log S) / S = exp(−a / ln S), for S > 1 tokens per parameter byte."""
    s = np.asarray(s_total, dtype=float)
    if np.any(s <= 1):
        raise ValueError(f"the predictor needs more than one token per parameter byte (S_total > 1), got {s}")
    return np.exp(-a / np.log(s))


@dataclass(frozen=True)
class Law:
    """Fitted coefficients of the law (natural units: α, β, ... as in the formula)."""

    alpha: float
    beta: float
    gamma: float
    zeta: float
    eta: float
    theta: float
    kappa: float
    phi: float
    chi: float
    psi: float
    omega: float
    lam: float
    mu: float
    nu: float
    xi: float
    rho: float
    meta: Dict = field(default_factory=dict, compare=False)

    def to_vector(self) -> np.ndarray:
        return np.array([np.log(getattr(self, k)) if k in COEFFICIENTS else getattr(self, k) for k in PARAMS])

    @classmethod
    def from_vector(cls, p, meta: Optional[dict] = None) -> "Law":
        values = {k: float(np.exp(v)) if k in COEFFICIENTS else float(v) for k, v in zip(PARAMS, p)}
        return cls(**values, meta=meta or {})

    def as_dict(self) -> Dict[str, float]:
        return {k: getattr(self, k) for k in PARAMS}

    def __call__(self, n_params, d_fp, d_qat, bits):
        """Predicted final loss; vectorised over numpy arrays (bits NaN or None = FP-only)."""
        return loss(self.to_vector(), n_params, d_fp, d_qat, bits)

    def fp_loss(self, n_params, tokens):
        """The Chinchilla part: a full-precision model of N parameters trained on D tokens."""
        return loss(self.to_vector(), n_params, tokens, 0.0, np.nan)


def as_bits(bits) -> np.ndarray:
    """Bits as floats, with None (FP-only) as NaN."""
    values = np.ravel(np.asarray(bits, dtype=object))
    return np.array([np.nan if b is None else b for b in values], dtype=float).reshape(np.shape(bits))


def design(n_params, d_fp, d_qat, bits):
    """(X [..., 6, 16], mask [..., 6]): ln(term_k) = X_k · p where mask_k (QAT terms only for QAT runs)."""
    with np.errstate(divide="ignore"):
        return _design(n_params, d_fp, d_qat, bits)


def _design(n_params, d_fp, d_qat, bits):
    n, d_fp, d_qat, b = np.broadcast_arrays(
        np.asarray(n_params, dtype=float), np.asarray(d_fp, dtype=float), np.asarray(d_qat, dtype=float), as_bits(bits)
    )
    qat = np.isfinite(b) & (d_qat > 0)
    b_safe = np.where(qat, b, 8.0)
    ln_n = np.log(n)
    ln_d = np.log(d_fp + d_qat)
    bytes_ = n * b_safe / 8
    ln_s_qat = np.log(np.where(qat, d_qat, 1.0) / bytes_)
    ln_s_fp = np.log(np.where(qat, d_fp, 1.0) / bytes_)  # D_fp > 0: the law is unbounded at S_fp = 0
    b_ln2 = b_safe * LN2

    X = np.zeros(n.shape + (N_TERMS, len(PARAMS)))
    col = {k: i for i, k in enumerate(PARAMS)}
    X[..., 0, col["alpha"]] = 1
    X[..., 1, col["beta"]], X[..., 1, col["gamma"]] = 1, -ln_d
    X[..., 2, col["zeta"]], X[..., 2, col["eta"]] = 1, -ln_n
    X[..., 3, col["theta"]], X[..., 3, col["kappa"]] = 1, -b_ln2
    X[..., 4, col["phi"]], X[..., 4, col["chi"]], X[..., 4, col["psi"]], X[..., 4, col["omega"]] = 1, -b_ln2, -ln_n, -ln_s_qat
    X[..., 5, col["lam"]], X[..., 5, col["mu"]], X[..., 5, col["nu"]] = 1, -b_ln2, -ln_n
    X[..., 5, col["xi"]], X[..., 5, col["rho"]] = -ln_s_fp, -ln_s_qat
    mask = np.ones(n.shape + (N_TERMS,), dtype=bool)
    mask[..., 3:] = qat[..., None]
    return X, mask


def log_loss(p, X, mask):
    """ln L = logsumexp_k(X_k · p) over the terms in mask."""
    # einsum, not @: a product this small gains nothing from BLAS threads, which stall for
    # milliseconds waiting for a core when a training run keeps the machine busy.
    z = np.where(mask, np.einsum("...kj,j->...k", X, p), -np.inf)
    m = z.max(axis=-1)
    return m + np.log(np.exp(z - m[..., None]).sum(axis=-1))


def loss(p, n_params, d_fp, d_qat, bits):
    X, mask = design(n_params, d_fp, d_qat, bits)
    return np.exp(log_loss(np.asarray(p, dtype=float), X, mask))


# ---------------------------------------------------------------- law files

LAW_FORMAT = "mlx_qat.law"
LAW_VERSION = 1


def save_law(law: Law, path: Path) -> None:
    """Write the law as versioned JSON (atomically: an interrupted write leaves the old file)."""
    doc = {"format": LAW_FORMAT, "version": LAW_VERSION, "params": law.as_dict(), **law.meta}
    write_text(Path(path), json.dumps(doc, indent=2))


def load_law(path: Path) -> Law:
    """Read a file written by `save_law`; every problem names the file and the fix."""
    try:
        doc = json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise ValueError(f"cannot read the law file {path} ({e}); write one with python -m mlx_qat.fit") from e
    if not isinstance(doc, dict) or doc.get("format") != LAW_FORMAT or doc.get("version") != LAW_VERSION:
        raise ValueError(f"{path} is not a version-{LAW_VERSION} {LAW_FORMAT} file; refit it with python -m mlx_qat.fit")
    params = doc.pop("params", None) or {}
    missing = set(PARAMS) - set(params)
    if missing:
        raise ValueError(f"{path} lacks the parameters {', '.join(sorted(missing))}; refit it")
    for key in ("format", "version"):
        doc.pop(key)
    return Law(**{k: float(params[k]) for k in PARAMS}, meta=doc)
