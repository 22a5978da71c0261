"""The QAT loss scaling law and the optimal-fraction predictor (DESIGN §5). numpy only.

Statistics: S_x = D_x / (N · B/8), tokens per parameter byte, for x in {total, fp, qat}.
Predictor (Dremov et al. 2025): f̂(S_total) = exp(−a / ln S_total), a = 6.7297.
"""

import numpy as np

PREDICTOR_A = 6.7297  # the paper's fitted constant (natural log)


def tokens_per_param_byte(tokens, n_params, bits):
    """S = D / (N · B/8)."""
    return np.asarray(tokens, dtype=float) / (np.asarray(n_params, dtype=float) * np.asarray(bits, dtype=float) / 8)


def predicted_qat_fraction(s_total, a: float = PREDICTOR_A):
    """f̂(S) = exp(log S − a / log S) / S = exp(−a / ln S), for S > 1 tokens per parameter byte."""
    s = np.asarray(s_total, dtype=float)
    if np.any(s <= 1):
        raise ValueError(f"the predictor needs more than one token per parameter byte (S_total > 1), got {s}")
    return np.exp(-a / np.log(s))
