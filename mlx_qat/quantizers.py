"""Weight quantizers with learned scales (ParetoQ family, DESIGN §3).

A weight matrix W [out, in] is split into groups of `group_size` consecutive inputs of a row
(or whole rows: per output channel). Each group has a learned scale α > 0 and x = w / α.

| bits | forward level q(x) (× α)                      | α init             |
|------|-----------------------------------------------|--------------------|
| 1    | sign(x), sign(0) = +1                          | mean |w| of group   |
| 1.58 | round(clip(x, ±0.99)·1.5) / 1.5                | max |w|            |
| 2    | (round(clip(x, ±0.99)·2 − 0.5) + 0.5) / 2      | max |w|            |
| 3–8  | clip(round(x), Qn, Qp), Qn = −2^(B−1), Qp = 2^(B−1)−1 | max |w| / Qp |

Rounding is round-half-to-even everywhere. Every level set is an affine grid
ŵ = scale·code + bias with integer codes in [0, 2^b − 1], which is what MLX's affine
quantization stores; the forward pass is computed through that grid so that the export is
bit-exact (`mx.dequantize(export) == ŵ` with float32 scales).
"""

import math
from dataclasses import dataclass
from typing import Optional, Tuple

import mlx.core as mx

BITS = (1, 1.58, 2, 3, 4, 5, 6, 8)
GROUP_SIZES = (32, 64, 128)
CLIP = 0.99  # SEQ clip edge for ternary and 2-bit
MIN_SCALE = 1e-5


@dataclass(frozen=True)
class QuantSpec:
    """How one weight matrix is quantized.

    bits: 1 (binary), 1.58 (ternary), 2 (SEQ) or 3, 4, 5, 6, 8 (LSQ).
    group_size: 32, 64 or 128 consecutive inputs share a scale; None = per output channel.
    """

    bits: float = 4
    group_size: Optional[int] = 64

    def __post_init__(self):
        if isinstance(self.bits, bool) or self.bits not in BITS:
            raise ValueError(
                f"bits={self.bits!r} is not supported; use one of {', '.join(map(str, BITS))} "
                "(1.58 = ternary)"
            )
        if self.group_size is not None and (
            isinstance(self.group_size, bool) or self.group_size not in GROUP_SIZES
        ):
            raise ValueError(
                f"group_size={self.group_size!r} is not supported; use one of "
                f"{', '.join(map(str, GROUP_SIZES))}, or None for one scale per output channel"
            )

    @property
    def kind(self) -> str:
        return {1: "binary", 1.58: "ternary", 2: "seq"}.get(self.bits, "lsq")

    @property
    def storage_bits(self) -> int:
        """Bits per code in the packed export (ternary's 3 levels need 2)."""
        return 2 if self.bits == 1.58 else int(self.bits)

    @property
    def qn(self) -> int:
        return -(2 ** (int(self.bits) - 1)) if self.kind == "lsq" else -1

    @property
    def qp(self) -> int:
        """The positive clip level; 1 for binary, ternary and 2-bit (ParetoQ's convention)."""
        return 2 ** (int(self.bits) - 1) - 1 if self.kind == "lsq" else 1

    def group_size_for(self, in_features: int) -> int:
        """The number of inputs sharing one scale, checked against the matrix width."""
        if self.group_size is None:
            return in_features
        if in_features % self.group_size:
            raise ValueError(
                f"group_size={self.group_size} does not divide the {in_features} inputs of this "
                f"weight; use a group size from {GROUP_SIZES} that divides {in_features}, "
                "or group_size=None (per output channel)"
            )
        return self.group_size

    def export_group_size(self, in_features: int) -> int:
        """MLX's group size for the export: per-channel scales are repeated over the largest
        supported group that divides the row, which stores the same grid."""
        if self.group_size is not None:
            return self.group_size_for(in_features)
        for g in sorted(GROUP_SIZES, reverse=True):
            if in_features % g == 0:
                return g
        raise ValueError(
            f"a per-channel weight with {in_features} inputs cannot be exported: MLX needs the "
            f"row length to be a multiple of {min(GROUP_SIZES)}"
        )

    def __str__(self) -> str:
        granularity = "channel" if self.group_size is None else f"g{self.group_size}"
        return f"{self.bits}-bit/{granularity}"


def grouped(w: mx.array, spec: QuantSpec) -> mx.array:
    """View W [out, in] as [out, in / g, g]."""
    out_features, in_features = w.shape
    g = spec.group_size_for(in_features)
    return w.reshape(out_features, in_features // g, g)


def scaled(w: mx.array, alpha: mx.array, spec: QuantSpec) -> Tuple[mx.array, mx.array]:
    """(x, a): x = w / α per group in float32 [out, in / g, g], with a = max(α, 1e-5) [out, in / g, 1].

    The op's forward and backward and the exporter all quantize this same x, which is what makes
    the export bit-exact."""
    a = mx.maximum(alpha.astype(mx.float32), MIN_SCALE)[..., None]
    return grouped(w, spec).astype(mx.float32) / a, a


def default_embedding_bits(bits: float) -> float:
    """The paper's choice: the embedding (and tied head) at max(B, 4) bits."""
    return max(bits, 4)


def init_scale(w: mx.array, spec: QuantSpec) -> mx.array:
    """α per group from the weights: [out, in / group_size] (or [out, 1] per channel), float32."""
    if w.ndim != 2:
        raise ValueError(f"expected a 2-D weight [out, in], got shape {w.shape}")
    a = mx.abs(grouped(w.astype(mx.float32), spec))
    if spec.kind == "binary":
        alpha = a.mean(axis=-1)
    elif spec.kind == "lsq":
        alpha = a.max(axis=-1) / spec.qp
    else:
        alpha = a.max(axis=-1)
    return mx.maximum(alpha, MIN_SCALE)


def codes(x: mx.array, spec: QuantSpec) -> mx.array:
    """Integer grid codes in [0, 2^storage_bits − 1] (as floats) of x = w / α."""
    if spec.kind == "binary":
        return (x >= 0).astype(x.dtype)
    if spec.kind == "ternary":
        return mx.round(mx.clip(x, -CLIP, CLIP) * 1.5) + 1
    if spec.kind == "seq":
        return mx.round(mx.clip(x, -CLIP, CLIP) * 2 - 0.5) + 2
    return mx.clip(mx.round(x), spec.qn, spec.qp) - spec.qn


def affine_grid(alpha: mx.array, spec: QuantSpec) -> Tuple[mx.array, mx.array]:
    """(scale, bias) with ŵ = scale·code + bias: MLX's affine layout of the learned grid."""
    if spec.kind == "binary":
        return 2 * alpha, -alpha
    if spec.kind == "ternary":
        scale = alpha * 2 / 3
        return scale, -scale
    if spec.kind == "seq":
        return alpha / 2, alpha * -0.75
    return alpha, alpha * spec.qn


def level(x: mx.array, spec: QuantSpec) -> mx.array:
    """q(x): the forward level in units of α (DESIGN §3's table)."""
    if spec.kind == "binary":
        return mx.where(x >= 0, 1.0, -1.0)
    if spec.kind == "ternary":
        return mx.round(mx.clip(x, -CLIP, CLIP) * 1.5) / 1.5
    if spec.kind == "seq":
        return (mx.round(mx.clip(x, -CLIP, CLIP) * 2 - 0.5) + 0.5) * 0.5  # = / 2, exactly
    return mx.clip(mx.round(x), spec.qn, spec.qp)


def gradient_scale(numel: int, spec: QuantSpec) -> float:
    """LSQ's s = 1 / sqrt(numel(W) · Qp), over the whole weight matrix."""
    return 1.0 / math.sqrt(numel * spec.qp)


def straight_through(x: mx.array, spec: QuantSpec) -> Tuple[mx.array, mx.array]:
    """(pass, dα_unit): dL/dw = g·pass and the per-element dL/dα = g·s·dα_unit (DESIGN §3)."""
    if spec.kind == "binary":
        return (mx.abs(x) <= 1), mx.where(x >= 0, 1.0, -1.0)
    if spec.kind in ("ternary", "seq"):
        inside = mx.clip(x, -CLIP, CLIP) == x  # |x| <= 0.99, sharing the clip that level() computes
        edge = 1.0 if spec.kind == "ternary" else 0.75
        return inside, mx.where(inside, level(x, spec) - x, mx.where(x > 0, edge, -edge))
    below, above = x < spec.qn, x > spec.qp
    outside = mx.where(below, float(spec.qn), float(spec.qp))
    return ~(below | above), mx.where(below | above, outside, mx.round(x) - x)
