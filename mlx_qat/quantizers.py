"""Weight quantizers with learned scales (the ParetoQ family).

A weight matrix W [out, in] is split into groups of `group_size` consecutive inputs of a row
(or whole rows: per output channel). Each group has a learned scale α > 0 and x = w / α.

| bits | kind    | forward level q(x) (× α)                              | α init        |
|------|---------|-------------------------------------------------------|---------------|
| 1    | binary  | sign(x), sign(0) = +1                                 | mean |w|      |
| 1.58 | ternary | round(clip(x, ±0.99)·1.5) / 1.5                       | max |w|       |
| 2    | seq     | (round(clip(x, ±0.99)·2 − 0.5) + 0.5) / 2             | max |w|       |
| 3–8  | lsq     | clip(round(x), Qn, Qp), Qn = −2^(B−1), Qp = 2^(B−1)−1 | max |w| / Qp  |

Rounding is round-half-to-even everywhere. Every level set is an affine grid
ŵ = scale·code + bias with integer codes in [0, 2^b − 1], which is what MLX's affine
quantization stores; the forward pass is computed through that grid so that the export is
bit-exact (`mx.dequantize(export) == ŵ` with float32 scales).

Backward (straight-through): dL/dw = g·pass(x) and dL/dα = s·Σ_group g·∂q/∂α(x), with LSQ's
gradient scale s = 1/sqrt(numel(W)·Qp) for every kind.

Each kind is one `Quantizer` description (BINARY, TERNARY, SEQ, LSQ). The MLX-ops reference
below calls its methods; the CPU, Metal and CUDA kernels receive its `kernel_id` (the KIND
constant of kernels/fake_quant.h) and its clip levels. Nothing else tells the kinds apart.

A QuantSpec may instead name one of MLX's floating-point modes (mxfp4, nvfp4, mxfp8; see
fp_formats.py): its grid is fixed by the format and its scale derived from each group's max |w|
exactly as `mx.quantize` derives it, so an FP-mode spec has no learned α and no Quantizer.
"""

import math
from dataclasses import dataclass
from typing import Dict, Optional, Tuple

import mlx.core as mx

from .constants import BITS, FP_MODES, GROUP_SIZES, MODES

CLIP = 0.99  # the clip edge of ternary and SEQ 2-bit
MIN_SCALE = 1e-5


@dataclass(frozen=True)
class Quantizer:
    """One kind of weight quantizer: all that differs between the kinds.

    name: the kind's name; bits: the widths it serves; kernel_id: the KIND template constant
    that kernels/fake_quant.h branches on. The methods are the MLX-ops reference of the same
    per-element math, in the kernels' operation order, so the kernels reproduce it bit for
    bit. x = w / α; (qn, qp) = levels(bits) are the clip levels the kernels also receive.
    """

    name: str
    bits: Tuple[float, ...]
    kernel_id: int

    def levels(self, bits: float) -> Tuple[int, int]:
        """(Qn, Qp) = (−1, 1): ParetoQ's convention below 3 bits (it sets the gradient scale)."""
        return -1, 1

    def init_scale(self, magnitude: mx.array, qp: int) -> mx.array:
        """α₀ = max |w| / Qp over each group of `magnitude` = |w| [out, in / g, g]."""
        return magnitude.max(axis=-1) / qp

    def codes(self, x: mx.array, qn: int, qp: int) -> mx.array:
        """The integer grid codes of x, as floats."""
        raise NotImplementedError

    def affine_grid(self, alpha: mx.array, qn: int) -> Tuple[mx.array, mx.array]:
        """(scale, bias) with ŵ = scale·code + bias."""
        raise NotImplementedError

    def level(self, x: mx.array, qn: int, qp: int) -> mx.array:
        """q(x), in units of α."""
        raise NotImplementedError

    def straight_through(self, x: mx.array, qn: int, qp: int) -> Tuple[mx.array, mx.array]:
        """(pass, ∂q/∂α): where w's gradient passes, and α's per-element factor."""
        raise NotImplementedError


@dataclass(frozen=True)
class _Binary(Quantizer):
    """q(x) = sign(x), sign(0) = +1: code = [x ≥ 0], ŵ = 2α·code − α; α₀ = mean |w|.
    Straight-through: w's gradient passes where |x| ≤ 1; ∂q/∂α = sign(x)."""

    def init_scale(self, magnitude, qp):
        return magnitude.mean(axis=-1)

    def codes(self, x, qn, qp):
        return (x >= 0).astype(x.dtype)

    def affine_grid(self, alpha, qn):
        return 2 * alpha, -alpha

    def level(self, x, qn, qp):
        return mx.where(x >= 0, 1.0, -1.0)

    def straight_through(self, x, qn, qp):
        return mx.abs(x) <= 1, self.level(x, qn, qp)


@dataclass(frozen=True)
class _Clipped(Quantizer):
    """Ternary and SEQ 2-bit: c = clip(x, ±0.99), r = round(c·steps − offset);
    q(x) = (r + offset) / steps, code = r + zero, ŵ = scale·code + scale·(offset − zero) with
    scale = α / steps. Ternary: steps 1.5, offset 0, zero 1 (levels 0, ±2/3); SEQ: steps 2,
    offset 0.5, zero 2 (levels ±1/4, ±3/4). α₀ = max |w|.
    Straight-through: passes where |x| ≤ 0.99; ∂q/∂α = q(x) − x there, ±edge beyond."""

    steps: float
    offset: float
    zero: float
    edge: float

    def _rounded(self, x):
        return mx.round(mx.clip(x, -CLIP, CLIP) * self.steps - self.offset)

    def codes(self, x, qn, qp):
        return self._rounded(x) + self.zero

    def affine_grid(self, alpha, qn):
        # The kernels' (α·2)/3 and α·(−0.75) bit for bit: α·2 and α/2 are exact.
        scale = alpha / self.steps
        return scale, scale * (self.offset - self.zero)

    def level(self, x, qn, qp):
        r = self._rounded(x)
        # No "+ 0" for ternary: r's −0 stays −0, as in the kernels.
        return (r + self.offset if self.offset else r) / self.steps

    def straight_through(self, x, qn, qp):
        inside = mx.clip(x, -CLIP, CLIP) == x  # |x| <= 0.99, sharing the clip that level() computes
        return inside, mx.where(inside, self.level(x, qn, qp) - x, mx.where(x > 0, self.edge, -self.edge))


@dataclass(frozen=True)
class _Lsq(Quantizer):
    """B = 3–8 bits: q(x) = clip(round(x), Qn, Qp), Qn = −2^(B−1), Qp = 2^(B−1) − 1;
    code = q − Qn, ŵ = α·code + α·Qn; α₀ = max |w| / Qp.
    Straight-through: passes where Qn ≤ x ≤ Qp; ∂q/∂α = round(x) − x there, Qn or Qp beyond."""

    def levels(self, bits):
        return -(2 ** (int(bits) - 1)), 2 ** (int(bits) - 1) - 1

    def codes(self, x, qn, qp):
        return mx.clip(mx.round(x), qn, qp) - qn

    def affine_grid(self, alpha, qn):
        return alpha, alpha * qn

    def level(self, x, qn, qp):
        return mx.clip(mx.round(x), qn, qp)

    def straight_through(self, x, qn, qp):
        below, above = x < qn, x > qp
        outside = mx.where(below, float(qn), float(qp))
        return ~(below | above), mx.where(below | above, outside, mx.round(x) - x)


BINARY = _Binary("binary", (1,), kernel_id=0)
TERNARY = _Clipped("ternary", (1.58,), kernel_id=1, steps=1.5, offset=0.0, zero=1.0, edge=1.0)
SEQ = _Clipped("seq", (2,), kernel_id=2, steps=2.0, offset=0.5, zero=2.0, edge=0.75)
LSQ = _Lsq("lsq", (3, 4, 5, 6, 8), kernel_id=3)
QUANTIZERS = (BINARY, TERNARY, SEQ, LSQ)  # one for each of BITS, in order


@dataclass(frozen=True)
class QuantSpec:
    """How one weight matrix is quantized.

    bits: 1 (binary), 1.58 (ternary), 2 (SEQ) or 3, 4, 5, 6, 8 (LSQ).
    group_size: 32, 64 or 128 consecutive inputs share a scale; None = per output channel.
    mode: "affine" (the integer grids above, learned α) or an FP mode, whose (group_size, bits)
    is fixed: mxfp4 (32, 4), nvfp4 (16, 4), mxfp8 (32, 8), e.g. QuantSpec(4, 32, "mxfp4").
    learned_scale: an FP mode's group scales are learned (α, rounded to what the format stores)
    rather than derived from each group's amax as MLX derives them (fp_formats.py).
    """

    bits: float = 4
    group_size: Optional[int] = 64
    mode: str = "affine"
    learned_scale: bool = False

    def __post_init__(self):
        if self.mode not in MODES:
            raise ValueError(f"mode={self.mode!r} is not supported; use one of {', '.join(MODES)}")
        if self.is_fp and (self.group_size, self.bits) != FP_MODES[self.mode]:
            group_size, bits = FP_MODES[self.mode]
            raise ValueError(f"mode={self.mode!r} stores {bits}-bit elements in groups of {group_size}; got "
                             f"bits={self.bits!r}, group_size={self.group_size!r}: use QuantSpec({bits}, {group_size}, "
                             f"{self.mode!r})")
        if self.learned_scale and not self.is_fp:
            raise ValueError("learned_scale chooses an FP mode's scales; affine grids always learn theirs: drop it")
        if isinstance(self.bits, bool) or self.bits not in BITS:
            raise ValueError(
                f"bits={self.bits!r} is not supported; use one of {', '.join(map(str, BITS))} "
                "(1.58 = ternary)"
            )
        if not self.is_fp and self.group_size is not None and (  # an FP mode's group size is checked above
            isinstance(self.group_size, bool) or self.group_size not in GROUP_SIZES
        ):
            raise ValueError(
                f"group_size={self.group_size!r} is not supported; use one of "
                f"{', '.join(map(str, GROUP_SIZES))}, or None for one scale per output channel"
            )

    @property
    def is_fp(self) -> bool:
        """True for an FP mode (mxfp4, nvfp4, mxfp8): a fixed element grid, scales per group."""
        return self.mode != "affine"

    @property
    def has_alpha(self) -> bool:
        """Whether a layer of this spec learns scales α: affine grids, and FP modes with learned_scale."""
        return not self.is_fp or self.learned_scale

    @property
    def quantizer(self) -> Quantizer:
        if self.is_fp:  # a bug in the caller: FP modes go through fp_formats, not the integer kinds
            raise ValueError(f"{self} has no integer Quantizer: its grid is MLX's {self.mode} format (fp_formats)")
        return next(q for q in QUANTIZERS if self.bits in q.bits)

    @property
    def kind(self) -> str:
        return self.mode if self.is_fp else self.quantizer.name

    @property
    def storage_bits(self) -> int:
        """Bits per code in the packed export: ⌈bits⌉ (ternary's 3 levels need 2)."""
        return math.ceil(self.bits)

    @property
    def qn(self) -> int:
        return self.quantizer.levels(self.bits)[0]

    @property
    def qp(self) -> int:
        """The positive clip level; 1 for binary, ternary and 2-bit (ParetoQ's convention)."""
        return self.quantizer.levels(self.bits)[1]

    def group_size_for(self, in_features: int) -> int:
        """The number of inputs sharing one scale, checked against the matrix width."""
        if self.group_size is None:
            return in_features
        if in_features % self.group_size and self.is_fp:
            raise ValueError(f"{self.mode} groups {self.group_size} inputs, which does not divide the {in_features} "
                             "inputs of this weight; keep this module out of the specs, or use mode='affine'")
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

    def to_dict(self) -> dict:
        """{"bits": ..., "group_size": ...} (and "mode" unless affine, so that affine specs read
        as they always have): JSON-ready, read back by `from_dict`."""
        mode = {"mode": self.mode} if self.is_fp else {}
        learned = {"learned_scale": True} if self.learned_scale else {}
        return {"bits": self.bits, "group_size": self.group_size, **mode, **learned}

    @classmethod
    def from_dict(cls, data: dict) -> "QuantSpec":
        unknown = set(data) - {"bits", "group_size", "mode", "learned_scale"}
        if unknown or "bits" not in data:
            raise ValueError(f"a QuantSpec is {{'bits': ..., 'group_size': ..., 'mode': ..., 'learned_scale': ...}}; "
                             f"got {data!r}")
        return cls(data["bits"], data.get("group_size"), data.get("mode", "affine"), data.get("learned_scale", False))

    def __str__(self) -> str:
        granularity = "channel" if self.group_size is None else f"g{self.group_size}"
        grid = f"{self.bits}-bit/{granularity}"
        learned = ", learned scales" if self.learned_scale else ""
        return f"{self.mode} ({grid}{learned})" if self.is_fp else grid


def specs_to_dict(specs: Dict[str, QuantSpec]) -> Dict[str, dict]:
    """A {module path: QuantSpec} dict as JSON-ready data; `specs_from_dict` reads it back."""
    return {path: spec.to_dict() for path, spec in specs.items()}


def specs_from_dict(data: Dict[str, dict]) -> Dict[str, QuantSpec]:
    return {path: QuantSpec.from_dict(spec) for path, spec in data.items()}


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
    """α per group from the weights: [out, in / group_size] (or [out, 1] per channel), float32,
    at least 1e-5: mean |w| (binary), max |w| / Qp (the others; Qp = 1 below 3 bits)."""
    if w.ndim != 2:
        raise ValueError(f"expected a 2-D weight [out, in], got shape {w.shape}")
    magnitude = mx.abs(grouped(w.astype(mx.float32), spec))
    return mx.maximum(spec.quantizer.init_scale(magnitude, spec.qp), MIN_SCALE)


def codes(x: mx.array, spec: QuantSpec) -> mx.array:
    """Integer grid codes in [0, 2^storage_bits − 1] (as floats) of x = w / α."""
    return spec.quantizer.codes(x, spec.qn, spec.qp)


def affine_grid(alpha: mx.array, spec: QuantSpec) -> Tuple[mx.array, mx.array]:
    """(scale, bias) with ŵ = scale·code + bias: MLX's affine layout of the learned grid."""
    return spec.quantizer.affine_grid(alpha, spec.qn)


def level(x: mx.array, spec: QuantSpec) -> mx.array:
    """q(x): the forward level in units of α (the table above)."""
    return spec.quantizer.level(x, spec.qn, spec.qp)


def gradient_scale(numel: int, spec: QuantSpec) -> float:
    """LSQ's s = 1 / sqrt(numel(W) · Qp), over the whole weight matrix."""
    return 1.0 / math.sqrt(numel * spec.qp)


def straight_through(x: mx.array, spec: QuantSpec) -> Tuple[mx.array, mx.array]:
    """(pass, dα_unit): dL/dw = g·pass and the per-element dL/dα = g·s·dα_unit, with
    dα_unit = ∂q/∂α at x as each kind's description states it."""
    return spec.quantizer.straight_through(x, spec.qn, spec.qp)
