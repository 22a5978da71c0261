"""QAT layers and the FP -> QAT model conversion.

`QATLinear` and `QATEmbedding` hold the float weight and its learned scales α and apply
`fake_quant` in their forward pass. `from_linear` / `from_embedding` build them from the layer
they replace (α initialised from the current weights); `to_quantized` converts back to MLX's
packed `QuantizedLinear` / `QuantizedEmbedding` on the same grid (the export).
"""

from typing import Dict, Optional

import mlx.core as mx
import mlx.nn as nn
import numpy as np
from mlx.utils import tree_map_with_path

from .fakequant import fake_quant
from .quantizers import QuantSpec, affine_grid, codes, default_embedding_bits, init_scale, scaled


def pack(codes: np.ndarray, bits: int) -> np.ndarray:
    """Pack integer codes [out, in] into MLX's affine layout [out, in·bits/32] uint32.

    Each row is one little-endian bitstream, element j in bits [j·bits, (j+1)·bits), cut into
    32-bit words; 3-, 5- and 6-bit codes straddle words (DESIGN §6).
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


def quantized_tensors(weight: mx.array, alpha: mx.array, spec: QuantSpec, scales_dtype=mx.float32):
    """(packed weight, scales, biases, group_size) of the learned grid, in MLX's layout."""
    group_size = spec.export_group_size(weight.shape[1])
    if spec.group_size is None:  # per-channel: the same α for every group of the row
        alpha = mx.repeat(alpha, weight.shape[1] // group_size, axis=1)
    x, a = scaled(weight, alpha, QuantSpec(spec.bits, group_size))
    q = codes(x, spec).reshape(weight.shape)
    scale, bias = affine_grid(a[..., 0], spec)
    packed = mx.array(pack(np.array(q.astype(mx.uint32)), spec.storage_bits))
    return packed, scale.astype(scales_dtype), bias.astype(scales_dtype), group_size


class QATLinear(nn.Module):
    """y = x ŵᵀ + b with ŵ = fake_quant(W, α, spec): a Linear trained on a low-bit grid.

    W [out, in] stays in full precision; α [out, in / group_size] is learned with it.
    """

    def __init__(self, input_dims: int, output_dims: int, bias: bool = True, spec: QuantSpec = QuantSpec()):
        super().__init__()
        scale = (1 / input_dims) ** 0.5
        self.weight = mx.random.uniform(-scale, scale, (output_dims, input_dims))
        if bias:
            self.bias = mx.zeros((output_dims,))
        self.spec = spec
        self.alpha = init_scale(self.weight, spec)

    @classmethod
    def from_linear(cls, linear: nn.Linear, spec: QuantSpec) -> "QATLinear":
        output_dims, input_dims = linear.weight.shape
        layer = cls(input_dims, output_dims, bias="bias" in linear, spec=spec)
        layer.weight = linear.weight
        if "bias" in linear:
            layer.bias = linear.bias
        layer.alpha = init_scale(linear.weight, spec)
        return layer

    def quantized_weight(self) -> mx.array:
        return fake_quant(self.weight, self.alpha, self.spec)

    def __call__(self, x: mx.array) -> mx.array:
        y = x @ self.quantized_weight().T
        return y + self.bias if "bias" in self else y

    def to_quantized(self, scales_dtype=mx.float32) -> nn.QuantizedLinear:
        weight, scales, biases, group_size = quantized_tensors(self.weight, self.alpha, self.spec, scales_dtype)
        output_dims, input_dims = self.weight.shape
        layer = nn.QuantizedLinear(input_dims, output_dims, "bias" in self, group_size, self.spec.storage_bits)
        layer.update({"weight": weight, "scales": scales, "biases": biases})
        if "bias" in self:
            layer.bias = self.bias
        return layer

    def _extra_repr(self) -> str:
        return f"{self.weight.shape[1]}, {self.weight.shape[0]}, bias={'bias' in self}, {self.spec}"


class QATEmbedding(nn.Module):
    """Token embedding looked up from ŵ = fake_quant(W, α, spec); `as_linear` is the tied head."""

    def __init__(self, num_embeddings: int, dims: int, spec: QuantSpec = QuantSpec()):
        super().__init__()
        self.weight = mx.random.normal((num_embeddings, dims)) * (1 / dims) ** 0.5
        self.spec = spec
        self.alpha = init_scale(self.weight, spec)

    @classmethod
    def from_embedding(cls, embedding: nn.Embedding, spec: QuantSpec) -> "QATEmbedding":
        layer = cls(*embedding.weight.shape, spec=spec)
        layer.weight = embedding.weight
        layer.alpha = init_scale(embedding.weight, spec)
        return layer

    def quantized_weight(self) -> mx.array:
        return fake_quant(self.weight, self.alpha, self.spec)

    def __call__(self, ids: mx.array) -> mx.array:
        w_hat = self.quantized_weight()
        # A tied head (as_linear) later in the same forward pass reuses ŵ instead of fake-quantizing
        # the embedding twice; kept outside the parameter dict, and consumed once.
        object.__setattr__(self, "_w_hat_for_head", w_hat)
        return w_hat[ids]

    def as_linear(self, x: mx.array) -> mx.array:
        w_hat = self.__dict__.pop("_w_hat_for_head", None)
        return x @ (self.quantized_weight() if w_hat is None else w_hat).T

    def to_quantized(self, scales_dtype=mx.float32) -> nn.QuantizedEmbedding:
        weight, scales, biases, group_size = quantized_tensors(self.weight, self.alpha, self.spec, scales_dtype)
        layer = nn.QuantizedEmbedding(*self.weight.shape, group_size, self.spec.storage_bits)
        layer.update({"weight": weight, "scales": scales, "biases": biases})
        return layer

    def _extra_repr(self) -> str:
        return f"{self.weight.shape[0]}, {self.weight.shape[1]}, {self.spec}"


def to_qat(model: nn.Module, spec: QuantSpec, embedding_spec: Optional[QuantSpec] = None) -> Dict[str, QuantSpec]:
    """Convert a model in place into its QAT form; return the spec of each converted module.

    Every Linear inside the transformer blocks gets `spec`; the token embedding and an untied
    LM head get `embedding_spec` (default: max(B, 4) bits, same group size); norms stay FP.
    α is initialised from the weights the model holds now.
    """
    if embedding_spec is None:
        embedding_spec = QuantSpec(default_embedding_bits(spec.bits), spec.group_size)
    converted = {}

    def convert(path, module):
        if isinstance(module, nn.Embedding):
            converted[path] = embedding_spec
            return QATEmbedding.from_embedding(module, embedding_spec)
        if type(module) is nn.Linear:
            converted[path] = spec if ".layers." in f".{path}" else embedding_spec
            return QATLinear.from_linear(module, converted[path])
        return module

    leaves = tree_map_with_path(convert, model.leaf_modules(), is_leaf=nn.Module.is_module)
    model.update_modules(leaves)
    if not converted:
        raise ValueError("to_qat found no nn.Linear or nn.Embedding to convert; is the model already in QAT form?")
    return converted


def qat_specs(model: nn.Module) -> Dict[str, QuantSpec]:
    """The spec of every QAT layer in a model, keyed by module path."""
    return {
        path: m.spec
        for path, m in model.named_modules()
        if isinstance(m, (QATLinear, QATEmbedding))
    }


def to_quantized(model: nn.Module, scales_dtype=mx.float32) -> nn.Module:
    """The inverse of `to_qat`: swap every QAT layer for MLX's packed quantized layer, in place."""

    def convert(_, module):
        if isinstance(module, (QATLinear, QATEmbedding)):
            return module.to_quantized(scales_dtype)
        return module

    model.update_modules(tree_map_with_path(convert, model.leaf_modules(), is_leaf=nn.Module.is_module))
    return model
