"""QAT layers, the policy that gives each module its spec, and the conversions both ways.

`QATLinear` and `QATEmbedding` hold the float weight W and its learned scales α and compute
ŵ = fake_quant(W, α, spec) in every call. In an FP mode (spec.mode mxfp4, nvfp4 or mxfp8) they
hold W alone and compute ŵ = fake_quant_fp(W, mode): MLX's own quantize -> dequantize, whose
per-group scale is derived from max |w| (fp_formats.py), so there is no α to learn; unless the
spec has learned_scale, when α is the group's scale, rounded to what the format stores
(fp_formats.fake_quant_fp_learned). For an mlx-lm model:

    specs = quant_specs(model, QuantSpec(2, 64))   # {module path: QuantSpec}
    to_qat(model, specs)                           # those modules -> QAT layers, α from W
    qat_specs(model) == specs                      # read back (a checkpoint stores it)
    to_quantized(model)                            # QAT layers -> MLX's packed layers, lossless

`to_quantized` is the inverse of `to_qat`, and each QAT layer's `to_quantized` has the
signature of MLX's, so `nn.quantize(model)` packs a QAT model too.
"""

from typing import Dict, Optional, Tuple

import mlx.core as mx
import mlx.nn as nn
import numpy as np
from mlx.utils import tree_unflatten

from . import fp_formats
from .fakequant import fake_quant, fake_quant_fp
from .quantizers import QuantSpec, affine_grid, codes, default_embedding_bits, init_scale, scaled

SCALE = "alpha"  # the parameter name of a QAT layer's learned scales


def is_learned_scale(path: str) -> bool:
    """True for the parameter path of a QAT layer's learned scales α, e.g.
    "model.layers.0.mlp.up_proj.alpha" (weights, biases and norms are not)."""
    return path.rsplit(".", 1)[-1] == SCALE


def pack(codes: np.ndarray, bits: int) -> np.ndarray:
    """Pack integer codes [out, in] into MLX's affine layout [out, in·bits/32] uint32.

    Each row is one little-endian bitstream: element j occupies bits [j·bits, (j+1)·bits),
    cut into 32-bit words, so word k holds bits [32k, 32k + 32) and 3-, 5- and 6-bit codes
    straddle words.
    """
    out_features, in_features = codes.shape
    if in_features % 32:
        raise ValueError(f"MLX packs rows of a multiple of 32 codes, got {in_features}")
    codes = codes.astype(np.uint64)
    words = np.zeros((out_features, in_features * bits // 32), dtype=np.uint64)
    for j in range(32):  # every run of 32 codes fills exactly `bits` words
        offset = j * bits
        word, shift = offset // 32, offset % 32
        column = codes[:, j::32]  # positions j, j+32, ... each start `bits` words later
        idx = word + bits * np.arange(column.shape[1])
        words[:, idx] += (column << np.uint64(shift)) & np.uint64(0xFFFFFFFF)
        if shift + bits > 32:
            words[:, idx + 1] += column >> np.uint64(32 - shift)
    return words.astype(np.uint32)


def quantized_tensors(weight: mx.array, alpha: Optional[mx.array], spec: QuantSpec, scales_dtype=mx.float32):
    """(packed weight, scales, biases, group_size) of the learned grid, in MLX's layout.

    FP modes: `mx.quantize(W, G, B, mode)` itself (biases None, uint8 scales, `scales_dtype`
    unused), which dequantizes to fake_quant_fp(W) bit for bit. It runs on the CPU stream
    because that is the implementation fake_quant_fp reproduces (GPU kernels may round ties
    differently). With learned scales, the elements and scales packed from α
    (fp_formats.pack_learned), which `mx.dequantize` reads back as ŵ bit for bit."""
    if spec.is_fp and spec.learned_scale:
        packed, scales = fp_formats.pack_learned(weight, alpha, spec.mode)
        return packed, scales, None, spec.group_size
    if spec.is_fp:
        w = weight.astype(mx.float32)
        packed, scales = mx.quantize(w, spec.group_size, spec.bits, mode=spec.mode, stream=mx.cpu)
        return packed, scales, None, spec.group_size
    group_size = spec.export_group_size(weight.shape[1])
    if spec.group_size is None:  # per-channel: the same α for every group of the row
        alpha = mx.repeat(alpha, weight.shape[1] // group_size, axis=1)
    x, a = scaled(weight, alpha, QuantSpec(spec.bits, group_size))
    q = codes(x, spec).reshape(weight.shape)
    scale, bias = affine_grid(a[..., 0], spec)
    packed = mx.array(pack(np.array(q.astype(mx.uint32)), spec.storage_bits))
    return packed, scale.astype(scales_dtype), bias.astype(scales_dtype), group_size


def _learned_grid(layer: nn.Module, group_size, bits, mode, quantize_input) -> Tuple[int, int]:
    """(group_size, bits) of a QAT layer's packed grid, after checking a request against it."""
    grid = (layer.spec.export_group_size(layer.weight.shape[1]), layer.spec.storage_bits)
    asked = (grid[0] if group_size is None else group_size, grid[1] if bits is None else bits)
    if mode not in (None, layer.spec.mode) or quantize_input or asked != grid:
        raise ValueError(
            f"this {type(layer).__name__} ({layer.spec}) packs only onto the grid it learned: mode={layer.spec.mode!r}, "
            f"group_size={grid[0]}, bits={grid[1]}; asked for mode={mode!r}, group_size={group_size}, "
            f"bits={bits}, quantize_input={quantize_input}. A QAT layer's grid is fixed by training: call "
            f"to_quantized() without them (or nn.quantize(model, mode={layer.spec.mode!r}) without group_size/bits), "
            "or train with another QuantSpec"
        )
    return grid


def _packed(layer: nn.Module, scales_dtype) -> dict:
    """The packed arrays a QAT layer's MLX counterpart holds: weight and scales, and biases (affine only)."""
    weight, scales, biases, _ = quantized_tensors(layer.weight, layer.get("alpha"), layer.spec, scales_dtype)
    if layer.spec.is_fp:
        return {"weight": weight, "scales": scales}
    return {"weight": weight, "scales": scales, "biases": biases}


def unpacked_weight(m: nn.Module, dtype: Optional[mx.Dtype] = None) -> mx.array:
    """The float weight of MLX's packed layer (nn.QuantizedLinear / nn.QuantizedEmbedding), in
    `dtype` (None: MLX's default, the scales' dtype for affine, bfloat16 for the float formats)."""
    return mx.dequantize(m["weight"], m["scales"], m.get("biases"), m.group_size, m.bits, mode=m.mode, dtype=dtype)


def fake_quantized(w: mx.array, alpha: Optional[mx.array], spec: QuantSpec) -> mx.array:
    """ŵ of a weight: fake_quant(w, α) on the learned grid, or in an FP mode fake_quant_fp(w) with
    its straight-through gradient, or on learned FP scales fake_quant_fp_learned(w, α) (computed
    in float32, the precision they match MLX in; their values are exact in bfloat16 too, so
    casting back to w's dtype loses nothing)."""
    if spec.is_fp and spec.learned_scale:
        return fp_formats.fake_quant_fp_learned(w.astype(mx.float32), alpha, spec.mode).astype(w.dtype)
    if spec.is_fp:
        return fake_quant_fp(w.astype(mx.float32), spec.mode).astype(w.dtype)
    return fake_quant(w, alpha, spec)


def initial_scale(w: mx.array, spec: QuantSpec) -> Optional[mx.array]:
    """The starting α of a weight: `init_scale` on an affine grid, the scale MLX derives for an FP
    mode with learned scales, None for an FP mode whose scales are derived in every call (then
    only the weight's fit to the mode's group size is checked)."""
    if not spec.is_fp:
        return init_scale(w, spec)
    spec.group_size_for(w.shape[1])
    return fp_formats.derived_scale(w, spec.mode) if spec.learned_scale else None


def _init_scale(layer: nn.Module) -> None:
    alpha = initial_scale(layer.weight, layer.spec)
    if alpha is not None:
        layer.alpha = alpha


class QATLinear(nn.Module):
    """y = x ŵᵀ + b with ŵ = fake_quant(W, α, spec): a Linear trained on a low-bit grid.

    W [out, in] stays in full precision; α [out, in / group_size] is learned with it.
    In an FP mode there is no α unless the spec has learned_scale: ŵ = fake_quant_fp(W, mode),
    the group scale derived from amax = max |w| over the group as MLX derives it (mxfp4/mxfp8:
    the E8M0 power of two 2^ceil(log2(amax / maxval)); nvfp4: the E4M3 number nearest amax / 6),
    so training sees exactly the grid that `mx.quantize` stores at export; with learned_scale,
    α rounded to a scale the format stores (fp_formats.fake_quant_fp_learned).
    """

    def __init__(self, input_dims: int, output_dims: int, bias: bool = True, spec: QuantSpec = QuantSpec()):
        super().__init__()
        scale = (1 / input_dims) ** 0.5
        self.weight = mx.random.uniform(-scale, scale, (output_dims, input_dims))
        if bias:
            self.bias = mx.zeros((output_dims,))
        self.spec = spec
        _init_scale(self)

    @classmethod
    def from_linear(cls, linear: nn.Linear, spec: QuantSpec) -> "QATLinear":
        """The QAT form of `linear`: its weight and bias, α initialised from its weight."""
        output_dims, input_dims = linear.weight.shape
        layer = cls(input_dims, output_dims, bias="bias" in linear, spec=spec)
        layer.weight = linear.weight
        if "bias" in linear:
            layer.bias = linear.bias
        _init_scale(layer)
        return layer

    def float_weight(self) -> mx.array:
        """W: what ŵ is computed from (a frozen base overrides it)."""
        return self.weight

    def quantized_weight(self) -> mx.array:
        return fake_quantized(self.float_weight(), self.get(SCALE), self.spec)

    def __call__(self, x: mx.array) -> mx.array:
        y = x @ self.quantized_weight().T
        return y + self.bias if "bias" in self else y

    def to_quantized(self, group_size: Optional[int] = None, bits: Optional[int] = None, mode: Optional[str] = None,
                     quantize_input: bool = False, *, scales_dtype=mx.float32) -> nn.QuantizedLinear:
        """The packed `nn.QuantizedLinear` on the learned grid: `mx.dequantize` of it equals ŵ
        exactly (affine: with float32 scales). group_size, bits and mode may only restate that grid."""
        group_size, bits = _learned_grid(self, group_size, bits, mode, quantize_input)
        output_dims, input_dims = self.weight.shape
        layer = nn.QuantizedLinear(input_dims, output_dims, "bias" in self, group_size, bits, mode=self.spec.mode)
        layer.update(_packed(self, scales_dtype))
        if "bias" in self:
            layer.bias = self.bias
        return layer

    def _extra_repr(self) -> str:
        return f"{self.weight.shape[1]}, {self.weight.shape[0]}, bias={'bias' in self}, {self.spec}"


@mx.custom_function
def _scaled_gradient(x: mx.array, factor: mx.array) -> mx.array:
    """x, with its gradient multiplied by `factor` (an exact identity forward)."""
    return x


@_scaled_gradient.vjp
def _scaled_gradient_vjp(primals, cotangent, output):
    return cotangent * primals[1], mx.zeros_like(primals[1])


class QATEmbedding(nn.Module):
    """Token embedding looked up from ŵ = fake_quant(W, α, spec) (in an FP mode as in QATLinear);
    `as_linear` is the tied head.

    Each call computes ŵ afresh: the module keeps no state between the lookup and the head."""

    def __init__(self, num_embeddings: int, dims: int, spec: QuantSpec = QuantSpec()):
        super().__init__()
        self.weight = mx.random.normal((num_embeddings, dims)) * (1 / dims) ** 0.5
        self.spec = spec
        _init_scale(self)

    @classmethod
    def from_embedding(cls, embedding: nn.Embedding, spec: QuantSpec) -> "QATEmbedding":
        """The QAT form of `embedding`: its weight, α initialised from it."""
        layer = cls(*embedding.weight.shape, spec=spec)
        layer.weight = embedding.weight
        _init_scale(layer)
        return layer

    def float_weight(self, rows: Optional[mx.array] = None) -> mx.array:
        """W, or its `rows`: what ŵ is computed from (a frozen base overrides it)."""
        return self.weight if rows is None else self.weight[rows]

    def quantized_weight(self, rows: Optional[mx.array] = None) -> mx.array:
        """ŵ, or ŵ[rows] computed from those rows alone: a row's grid is its own (groups lie
        within rows), so the lookup needs no float32 ŵ of the whole table, nor its gradient.
        `rows` is 1-D; their α gradient keeps the whole table's LSQ scale 1/sqrt(numel(W)·Qp)."""
        alpha, w = self.get(SCALE), self.float_weight(rows)
        if alpha is not None and rows is not None:
            alpha = _scaled_gradient(alpha[rows], mx.array((rows.size / self.weight.shape[0]) ** 0.5))
        return fake_quantized(w, alpha, self.spec)

    def __call__(self, ids: mx.array) -> mx.array:
        rows = self.quantized_weight(ids.reshape(-1))
        return rows.reshape(*ids.shape, rows.shape[-1])

    def as_linear(self, x: mx.array) -> mx.array:
        # The whole ŵ, made here: the lookup makes only its rows, and the module keeps no
        # per-call state that could go stale.
        return x @ self.quantized_weight().T

    def to_quantized(self, group_size: Optional[int] = None, bits: Optional[int] = None, mode: Optional[str] = None,
                     quantize_input: bool = False, *, scales_dtype=mx.float32) -> nn.QuantizedEmbedding:
        """The packed `nn.QuantizedEmbedding` on the learned grid (see `QATLinear.to_quantized`)."""
        group_size, bits = _learned_grid(self, group_size, bits, mode, quantize_input)
        layer = nn.QuantizedEmbedding(*self.weight.shape, group_size, bits, mode=self.spec.mode)
        layer.update(_packed(self, scales_dtype))
        return layer

    def _extra_repr(self) -> str:
        return f"{self.weight.shape[0]}, {self.weight.shape[1]}, {self.spec}"


QAT_LAYERS = (QATLinear, QATEmbedding)


def _refuse(path: str, module: nn.Module) -> None:
    """Raise for a module that no spec can convert: a QAT or an already packed layer."""
    if isinstance(module, QAT_LAYERS):
        raise ValueError(f"{path} is already a {type(module).__name__} ({module.spec}): the model is in QAT form "
                         "already; read its specs with qat_specs(model)")
    if isinstance(module, (nn.QuantizedLinear, nn.QuantizedEmbedding)):
        raise ValueError(f"{path} is a packed {module.bits}-bit {type(module).__name__}: QAT trains full-precision "
                         "weights; build or load the model unquantized (without its `quantization` config)")


def quant_specs(model: nn.Module, spec: QuantSpec, embedding_spec: Optional[QuantSpec] = None,
                packed: bool = False) -> Dict[str, QuantSpec]:
    """Which module of an mlx-lm model gets which spec: {module path: QuantSpec}.

    Every nn.Linear inside the transformer blocks (`model.layers`, as mlx-lm models expose
    them) gets `spec`; every nn.Embedding (the token embedding, and with it a tied LM head) and
    an untied `lm_head` get `embedding_spec`, by default max(B, 4) bits at the same group size
    and mode (`default_embedding_bits`; in an FP mode that is the mode itself, B being 4 or 8).
    Norms and all else stay in full precision. A ValueError names a module it cannot place: a
    QAT or (unless `packed`) an already quantized layer, or an nn.Linear outside the blocks other
    than `lm_head`. `packed`: MLX's packed layers are placed as their float kinds are (a low-rank
    QAT base kept packed: mlx_qat.lowrank).
    """
    if embedding_spec is None:
        embedding_spec = QuantSpec(default_embedding_bits(spec.bits), spec.group_size, spec.mode)
    blocks = getattr(model, "layers", None)
    if not blocks:
        raise ValueError(f"quant_specs finds the transformer blocks at model.layers, as mlx-lm models expose them; "
                         f"this {type(model).__name__} has none: write the {{module path: QuantSpec}} dict "
                         "yourself and pass it to to_qat")
    modules = model.named_modules()
    path_of = {id(m): path for path, m in modules}
    linear = (nn.Linear, nn.QuantizedLinear) if packed else nn.Linear
    embedding = (nn.Embedding, nn.QuantizedEmbedding) if packed else nn.Embedding
    in_blocks = {".".join(filter(None, (path_of[id(block)], name))) for block in blocks
                 for name, m in block.named_modules() if isinstance(m, linear)}
    specs = {}
    for path, m in reversed(modules):  # named_modules lists children last; paths read top-down
        if not (packed and isinstance(m, (nn.QuantizedLinear, nn.QuantizedEmbedding))):
            _refuse(path, m)
        if path in in_blocks:
            specs[path] = spec
        elif isinstance(m, embedding) or (isinstance(m, linear) and path.rsplit(".", 1)[-1] == "lm_head"):
            specs[path] = embedding_spec
        elif isinstance(m, linear):
            raise ValueError(f"{path} is an nn.Linear outside the transformer blocks and is not lm_head: quant_specs "
                             "does not know its spec; add it to (or leave it out of) the dict yourself before to_qat")
    return specs


def to_qat(model: nn.Module, specs: Dict[str, QuantSpec]) -> nn.Module:
    """Convert exactly the modules named in `specs` to their QAT form, in place; return `model`.

    nn.Linear -> QATLinear, nn.Embedding -> QATEmbedding, each with α initialised from the weight
    the model holds now (`init_scale`). A ValueError names a path that is missing, not an FP
    Linear or Embedding, or whose weight does not fit its spec.
    """
    modules = dict(model.named_modules())
    converted = []
    for path, spec in specs.items():
        m = modules.get(path)
        _refuse(path, m)
        if isinstance(m, nn.Linear):
            make = QATLinear.from_linear
        elif isinstance(m, nn.Embedding):
            make = QATEmbedding.from_embedding
        else:
            found = "no such module" if m is None else f"a {type(m).__name__}"
            raise ValueError(f"{path} is {found} in this {type(model).__name__}; to_qat converts nn.Linear and "
                             "nn.Embedding modules (quant_specs(model, spec) lists them)")
        try:
            converted.append((path, make(m, spec)))
        except ValueError as e:
            raise ValueError(f"{path}: {e}") from e
    model.update_modules(tree_unflatten(converted))
    return model


def qat_specs(model: nn.Module) -> Dict[str, QuantSpec]:
    """The spec of every QAT layer in a model, keyed by module path: `to_qat(fresh, qat_specs(model))`
    puts a fresh model of the same architecture in the same QAT form."""
    return {path: m.spec for path, m in reversed(model.named_modules()) if isinstance(m, QAT_LAYERS)}


def to_quantized(model: nn.Module, scales_dtype=mx.float32) -> nn.Module:
    """The inverse of `to_qat`: every QAT layer -> MLX's packed layer on its learned grid
    (`QuantizedLinear` / `QuantizedEmbedding`), in place; return `model`. Lossless with
    float32 scales; float16/bfloat16 scales round them (affine; FP modes store their 8-bit
    scales, always lossless)."""
    nn.quantize(model, class_predicate=lambda _, m: isinstance(m, QAT_LAYERS) and {"scales_dtype": scales_dtype})
    return model
