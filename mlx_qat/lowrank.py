"""Low-rank QAT of a pretrained model: LoRA's memory, trained on the grid the export writes.

A LoRA-style update is merged into the weight *before* it is fake-quantized:

    W  = float32(W0) + s · (A B)ᵀ             A = lora_a [in, r], B = lora_b [r, out], s = scale
    ŵ  = fake_quant(W, α, spec)               the project's op: same quantizers, kernels and STE
    y  = x ŵᵀ (+ b)

W0 is the frozen pretrained weight, stored in its own 16-bit dtype (or, from a quantized mlx-lm
checkpoint with quantized_base: packed, as MLX packed it: `keep_packed`); W and ŵ exist only
inside the forward. Trainable are A, B and the learned scales α of the merged weight (initialised from
W0, since B = 0 at init). The gradient reaches A and B through the straight-through estimator:
G = dL/dW = g·pass(W / α) (`quantizers.straight_through`), dA = s·Gᵀ Bᵀ, dB = s·Aᵀ Gᵀ.

Memory: stored are W0 (16-bit), A, B, α and the optimizer state of those three (float32), where
full QAT stores float32 W with its gradient and two AdamW moments. The float32 W and ŵ of each
layer are transient, but autodiff keeps them until the backward pass reaches the layer:
recomputing each block in the backward (gradient checkpointing) bounds that to one block.

Why merge before quantizing: the exported model is pack(W0 + s(AB)ᵀ, α), so this is the model the
training loss was measured on. Plain LoRA on a quantized base followed by `mlx_lm.fuse`
re-quantizes W0 + ΔW on a grid (min/max per group) that the model never saw in training.

    specs = quant_specs(model, QuantSpec(2, 64))             # model loaded in bfloat16
    to_lowrank_qat(model, specs, rank=8, scale=20.0, num_layers=16)
    ... train model.trainable_parameters() ...
    save_adapter(model, "adapter")                           # optional: the float LoRA view
    export(merge(model), "out", tokenizer)                   # packed on the learned grid

A run does all this with `fine_tune_type: lora` (mlx_qat.train.switch_to_qat; checkpoints of
the trainables alone; the export of `merge(model)` and `save_adapter` at the end; see
docs/PRETRAINED.md, "Low-rank QAT").

Every fake-quant here runs on float32(W): a 16-bit W would round ŵ to 16 bits, off the grid
the export stores (float32 scale·code + bias). The layers outside the low-rank ones
(`FrozenQATLinear`, `FrozenQATEmbedding`) are the ordinary QAT layers with that one change.
"""

import json
import math
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Dict, List, Optional

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten, tree_unflatten

from .layers import SCALE, QATEmbedding, QATLinear, fake_quantized, initial_scale, unpacked_weight
from .quantizers import QuantSpec

ADAPTER_LEAVES = ("lora_a", "lora_b")  # mlx-lm's parameter names
LINEAR = (nn.Linear, nn.QuantizedLinear)  # what a low-rank layer adapts: a float or a packed base
TRAINABLE = (*ADAPTER_LEAVES, SCALE)


# ---------------------------------------------------------------- the frozen base W0


def base_weight(layer: nn.Module, dtype: Optional[mx.Dtype] = mx.float32, rows: Optional[mx.array] = None) -> mx.array:
    """W0 of a frozen-base layer (or its `rows`) as a float array of `dtype` (None: as stored, the
    weight's 16-bit dtype; a packed base in MLX's default, as mlx-lm's dequantize_model gives it).
    A packed base (`keep_packed`) is dequantized: the transient float copy exists only inside the step."""
    weight, scales, biases = layer.weight, layer.get("scales"), layer.get("biases")
    if rows is not None:  # packed rows are rows of the packed arrays: a row's groups lie within it
        weight, scales, biases = (a if a is None else a[rows] for a in (weight, scales, biases))
    if scales is None:
        return weight if dtype is None else weight.astype(dtype)
    return mx.dequantize(weight, scales, biases, layer.base_group_size, layer.base_bits, layer.base_mode, dtype=dtype)


def base_shape(layer: nn.Module) -> tuple:
    """W0's [out, in] (or [vocabulary, dims]) shape, packed or not."""
    if "scales" not in layer:
        return tuple(layer.weight.shape)
    return layer.weight.shape[0], layer.scales.shape[1] * layer.base_group_size


def keep_packed(layer: nn.Module, packed: nn.Module) -> nn.Module:
    """Store W0 as `packed` (an nn.QuantizedLinear or nn.QuantizedEmbedding of the base) holds
    it: its packed weight, scales and biases, 1 + 4/group_size bytes per weight at 8 bits with
    16-bit scales and biases, instead of 2 (QLoRA's base). Returns `layer`."""
    layer.weight, layer.scales = packed.weight, packed.scales
    if packed.get("biases") is not None:
        layer.biases = packed.biases
    layer.base_group_size, layer.base_bits, layer.base_mode = packed.group_size, packed.bits, packed.mode
    return layer


def _float_view(module: nn.Module) -> nn.Module:
    """`module` itself, or for a packed one a bare module holding its W0 as a float array
    (dequantized in its scales' dtype) and its bias: what a frozen-base layer is built from
    before its W0 is packed again. Bare, so that it draws no random initialisation: a packed and
    a float base convert with the same random numbers."""
    if not isinstance(module, (nn.QuantizedLinear, nn.QuantizedEmbedding)):
        return module
    view = nn.Module()
    view.weight = unpacked_weight(module)
    if "bias" in module:
        view.bias = module.bias
    return view


def _frozen(module: nn.Module, spec: QuantSpec, make) -> nn.Module:
    """`make(float view of module)`, with W0 packed again if the base was packed and α from the
    float32 W0 that training dequantizes."""
    layer = make(_float_view(module), spec)
    if isinstance(module, (nn.QuantizedLinear, nn.QuantizedEmbedding)):
        keep_packed(layer, module)
        if spec.has_alpha:
            layer.alpha = initial_scale(base_weight(layer), spec)
    return layer


class _FrozenBase:
    """What a frozen-base QAT layer adds to QATLinear / QATEmbedding: ŵ from float32(W0), W0
    16-bit or packed, and W0 itself while `base_only` (see frozen_base)."""

    base_only = False

    def float_weight(self, *rows: mx.array) -> mx.array:  # *rows: an embedding's (see QATEmbedding), or none
        return base_weight(self, mx.float32, *rows)

    def quantized_weight(self, *rows: mx.array) -> mx.array:
        return self.float_weight(*rows) if self.base_only else super().quantized_weight(*rows)


class FrozenQATLinear(_FrozenBase, QATLinear):
    """A QATLinear over a frozen base weight W0, 16-bit or packed: ŵ = fake_quant(float32(W0), α),
    so its output is on the export's float32 grid while W0 stays as it was stored."""

    @classmethod
    def from_base(cls, module: nn.Module, spec: QuantSpec) -> "FrozenQATLinear":
        """From an nn.Linear or a packed nn.QuantizedLinear (kept packed)."""
        return _frozen(module, spec, cls.from_linear)

    def _extra_repr(self) -> str:
        return f"{base_shape(self)[1]}, {base_shape(self)[0]}, bias={'bias' in self}, {self.spec}, frozen base"


class FrozenQATEmbedding(_FrozenBase, QATEmbedding):
    """A QATEmbedding over a frozen base weight (see FrozenQATLinear)."""

    @classmethod
    def from_base(cls, module: nn.Module, spec: QuantSpec) -> "FrozenQATEmbedding":
        """From an nn.Embedding or a packed nn.QuantizedEmbedding (kept packed)."""
        return _frozen(module, spec, cls.from_embedding)

    def _extra_repr(self) -> str:
        return f"{base_shape(self)[0]}, {base_shape(self)[1]}, {self.spec}, frozen base"


class LowRankQATLinear(nn.Module):
    """y = x ŵᵀ + b, ŵ = fake_quant(float32(W0) + s·(A B)ᵀ, α, spec) (see the module docstring).

    weight: W0 [out, in], frozen, in its own dtype, or packed (`keep_packed`, with scales and
    biases). lora_a [in, r] ~ U(±1/√in), lora_b [r, out] = 0, scale s: as mlx-lm's LoRALinear.
    α [out, in / group] = init_scale(W0) (none in an FP mode).

    dropout p (training only) acts on the low-rank path's input, as in LoRA, by a correction that
    is zero in eval: y += s·((drop(x) − x) A) B. To first order (STE) the update then sees drop(x)
    and W0 sees x, as in LoRA's y = x W0ᵀ + s·drop(x) A B, while ŵ itself stays the merged grid.
    """

    base_only = False  # see frozen_base

    def __init__(self, weight: mx.array, spec: QuantSpec, rank: int = 8, scale: float = 20.0, dropout: float = 0.0,
                 bias: Optional[mx.array] = None, packed: Optional[nn.QuantizedLinear] = None):
        super().__init__()
        output_dims, input_dims = weight.shape
        self.weight = weight
        if packed is not None:
            keep_packed(self, packed)
        if bias is not None:
            self.bias = bias
        self.spec = spec
        self.scale = scale
        self.dropout = dropout
        bound = 1 / math.sqrt(input_dims)
        self.lora_a = mx.random.uniform(low=-bound, high=bound, shape=(input_dims, rank))
        self.lora_b = mx.zeros((rank, output_dims))
        alpha = initial_scale(self.merged_weight(), spec)
        if alpha is not None:
            self.alpha = alpha

    @classmethod
    def from_linear(cls, linear: nn.Module, spec: QuantSpec, rank: int = 8, scale: float = 20.0,
                    dropout: float = 0.0) -> "LowRankQATLinear":
        """From an nn.Linear, or a packed nn.QuantizedLinear whose W0 stays packed."""
        packed = linear if isinstance(linear, nn.QuantizedLinear) else None
        return cls(_float_view(linear).weight, spec, rank, scale, dropout, linear.get("bias"), packed)

    def merged_weight(self) -> mx.array:
        """W = float32(W0) + s·(A B)ᵀ [out, in], float32; computed, never stored."""
        return base_weight(self) + self.scale * (self.lora_a @ self.lora_b).T

    def quantized_weight(self) -> mx.array:
        return fake_quantized(self.merged_weight(), self.get(SCALE), self.spec)

    def __call__(self, x: mx.array) -> mx.array:
        if self.base_only:
            y = x @ base_weight(self).T
            return y + self.bias if "bias" in self else y
        y = x @ self.quantized_weight().T
        if self.training and self.dropout > 0:
            keep = mx.random.bernoulli(1 - self.dropout, x.shape)
            y = y + self.scale * (((x * (keep / (1 - self.dropout) - 1)) @ self.lora_a) @ self.lora_b)
        return y + self.bias if "bias" in self else y

    def _extra_repr(self) -> str:
        (output_dims, input_dims), rank = base_shape(self), self.lora_a.shape[1]
        return f"{input_dims}, {output_dims}, rank={rank}, scale={self.scale}, dropout={self.dropout}, {self.spec}"


FROZEN_BASE_LAYERS = (FrozenQATLinear, FrozenQATEmbedding, LowRankQATLinear)  # what frozen_base switches


@contextmanager
def frozen_base(model: nn.Module):
    """Within it, a low-rank QAT model computes with its frozen base alone: y = x float32(W0)ᵀ (+ b),
    no adapter and no fake-quant anywhere: the pretrained model it started from, computed in
    float32 as the student is (the float32 copy of each W0 is as transient as the student's; and a
    16-bit matmul has no BLAS path on the CPU: a teacher in W0's dtype made SmolLM2-135M's
    distillation step six times slower).
    Distillation's teacher is this view (`teacher_of`), so the teacher costs no second copy of
    the model. A flag read when the forward is traced: a compiled step traces the teacher's
    forward inside it, the student's outside."""
    layers = [m for _, m in model.named_modules() if isinstance(m, FROZEN_BASE_LAYERS)]
    for m in layers:
        m.base_only = True
    try:
        yield model
    finally:
        for m in layers:
            m.base_only = False


def teacher_of(model: nn.Module) -> Callable[[mx.array], mx.array]:
    """The logits of `model`'s frozen base (see frozen_base), as distillation's teacher."""

    def teacher(inputs: mx.array) -> mx.array:
        with frozen_base(model):
            return model(inputs)

    return teacher


def _block_paths(model: nn.Module) -> List[str]:
    """The module path of each transformer block, in order (e.g. "model.layers.0")."""
    path_of = {id(m): p for p, m in model.named_modules()}
    return [path_of[id(block)] for block in model.layers]


def lowrank_paths(model: nn.Module, keys: Optional[List[str]] = None, num_layers: Optional[int] = None) -> List[str]:
    """The module paths `to_lowrank_qat` makes low-rank: in the last `num_layers` blocks (all when
    None), each nn.Linear whose block-relative path is in `keys` (default: every one). A ValueError
    names a num_layers the model lacks, a key that names no module there or a module that is no
    nn.Linear. Reads only the model's structure, so a lazily loaded model is checked unread."""
    blocks = _block_paths(model)
    n = len(blocks) if num_layers is None else num_layers
    if not 1 <= n <= len(blocks):
        raise ValueError(f"num_layers={num_layers}: the model has {len(blocks)} blocks; use 1..{len(blocks)}, "
                         "or null (all)")
    modules = dict(model.named_modules())
    lowrank, found = [], set()
    for block in blocks[len(blocks) - n:]:
        for path, m in modules.items():
            key = path[len(block) + 1:]
            if path.startswith(block + ".") and (key in keys if keys is not None else isinstance(m, LINEAR)):
                if not isinstance(m, LINEAR):
                    raise ValueError(f"{path} is a {type(m).__name__}; low-rank QAT adapts nn.Linear modules only")
                lowrank.append(path)
                found.add(key)
    if keys is not None and set(keys) - found:
        last = blocks[-1] + "."
        linears = sorted(p[len(last):] for p, m in modules.items() if p.startswith(last) and isinstance(m, LINEAR))
        raise ValueError(f"keys {sorted(set(keys) - found)} name no module in the last {n} blocks; a block's "
                         f"nn.Linear modules are {', '.join(linears)}")
    return sorted(lowrank)


def to_lowrank_qat(model: nn.Module, specs: Dict[str, QuantSpec], rank: int, scale: float, dropout: float = 0.0,
                   keys: Optional[List[str]] = None, num_layers: Optional[int] = None) -> nn.Module:
    """Put a pretrained model in low-rank QAT form, in place; return it.

    As mlx-lm's `linear_to_lora_layers`: in the last `num_layers` blocks (all when None) each
    nn.Linear whose block-relative path is in `keys` (e.g. "self_attn.q_proj"; default: every
    Linear) becomes a LowRankQATLinear with its spec from `specs` (`layers.quant_specs`). Every
    other module in `specs` (earlier blocks, other keys, the embedding / tied head) becomes a
    frozen QAT layer on its grid. Then the whole model is frozen but lora_a, lora_b and α:
    base weights, biases and norms get no gradient and no optimizer state.
    """
    lowrank = set(lowrank_paths(model, keys, num_layers))
    modules = dict(model.named_modules())
    if lowrank - set(specs):
        raise ValueError(f"{sorted(lowrank - set(specs))} have no QuantSpec in `specs` (see layers.quant_specs)")

    converted = []
    for path, spec in specs.items():
        m = modules.get(path)
        try:
            if path in lowrank:
                converted.append((path, LowRankQATLinear.from_linear(m, spec, rank, scale, dropout)))
            elif type(m) in (nn.Linear, nn.QuantizedLinear):
                converted.append((path, FrozenQATLinear.from_base(m, spec)))
            elif type(m) in (nn.Embedding, nn.QuantizedEmbedding):
                converted.append((path, FrozenQATEmbedding.from_base(m, spec)))
            else:
                found = "no such module" if m is None else f"a {type(m).__name__}"
                raise ValueError(f"is {found}; a spec applies to an nn.Linear or nn.Embedding")
        except ValueError as e:
            raise ValueError(f"{path}: {e}") from e
    model.update_modules(tree_unflatten(converted))
    model.freeze()
    model.unfreeze(keys=list(TRAINABLE))
    return model


def lowrank_layers(model: nn.Module) -> Dict[str, LowRankQATLinear]:
    return {p: m for p, m in model.named_modules() if isinstance(m, LowRankQATLinear)}


def lowrank_specs(model: nn.Module) -> Dict[str, QuantSpec]:
    """The spec of every quantized module of a low-rank QAT model, low-rank ones included:
    `to_lowrank_qat(fresh, lowrank_specs(model), ...)` puts a fresh base in the same form."""
    return {path: m.spec for path, m in reversed(model.named_modules()) if isinstance(m, (LowRankQATLinear, QATLinear,
                                                                                          QATEmbedding))}


def trainable_weights(model: nn.Module) -> Dict[str, mx.array]:
    """{path: array} of what trains: lora_a, lora_b and α (what a checkpoint of a low-rank run holds)."""
    return dict(tree_flatten(model.trainable_parameters()))


def load_trainable(model: nn.Module, weights: Dict[str, mx.array]) -> None:
    """Load `trainable_weights` into a model in the same low-rank QAT form; a ValueError names a
    missing, extra or misshapen entry (the frozen base is the model's own)."""
    want = trainable_weights(model)
    if set(weights) != set(want):
        missing, extra = sorted(set(want) - set(weights)), sorted(set(weights) - set(want))
        raise ValueError(f"the trainable weights do not match the model's (missing {missing[:3]}, extra {extra[:3]})")
    bad = [k for k, v in weights.items() if v.shape != want[k].shape]
    if bad:
        raise ValueError(f"{bad[0]} has shape {weights[bad[0]].shape}, the model's is {want[bad[0]].shape}")
    model.update(tree_unflatten(list(weights.items())))


def merged(layer: nn.Module) -> nn.Module:
    """The plain QAT layer of a low-rank layer, or of a frozen layer whose base is packed: weight
    W = float32(W0) + s·(A B)ᵀ (low-rank) or float32(W0), the learned α, the same spec and bias.
    Its ŵ is the layer's bit for bit, and export packs it losslessly."""
    if isinstance(layer, FrozenQATEmbedding):
        plain = QATEmbedding(*base_shape(layer), spec=layer.spec)
        plain.weight = base_weight(layer)
    else:
        output_dims, input_dims = base_shape(layer)
        plain = QATLinear(input_dims, output_dims, bias="bias" in layer, spec=layer.spec)
        plain.weight = layer.merged_weight() if isinstance(layer, LowRankQATLinear) else base_weight(layer)
        if "bias" in layer:
            plain.bias = layer.bias
    if SCALE in layer:
        plain.alpha = layer.alpha
    return plain


def merge(model: nn.Module) -> nn.Module:
    """Replace every LowRankQATLinear, and every frozen layer whose base is packed, by
    `merged(layer)`, in place; return the model, ready for `export.export`. The merged weights
    are float32: merge for export, not for training. A model with neither is returned as it is."""
    layers = [(p, m) for p, m in model.named_modules()
              if isinstance(m, LowRankQATLinear) or (isinstance(m, FROZEN_BASE_LAYERS) and "scales" in m)]
    if layers:
        model.update_modules(tree_unflatten([(p, merged(m)) for p, m in layers]))
    return model


def adapter_weights(model: nn.Module) -> Dict[str, mx.array]:
    """{path.lora_a / path.lora_b: array}: mlx-lm's adapters.safetensors keys."""
    return {k: v for k, v in tree_flatten(model.parameters()) if k.rsplit(".", 1)[-1] in ADAPTER_LEAVES}


def adapter_config(model: nn.Module) -> dict:
    """adapter_config.json for `mlx_lm.tuner.utils.load_adapters`: the low-rank layers' block-relative
    keys, the number of trailing blocks that hold them, and their (uniform) rank, scale, dropout.

    Loaded onto the float base, the adapter is plain LoRA: x W0ᵀ + s·x A B, unquantized. The
    quantized model is `export(merge(model))`; fusing this adapter into a quantized base would
    re-quantize on another grid (see the module docstring)."""
    layers = lowrank_layers(model)
    if not layers:
        raise ValueError("the model has no LowRankQATLinear layers; convert it with to_lowrank_qat first")
    blocks = _block_paths(model)
    first, keys = len(blocks), set()
    for path in layers:
        i = next(i for i, b in enumerate(blocks) if path.startswith(b + "."))
        first, keys = min(first, i), keys | {path[len(blocks[i]) + 1:]}
    params = {(m.lora_a.shape[1], m.scale, m.dropout) for m in layers.values()}
    if len(params) != 1:
        raise ValueError(f"mlx-lm's adapter config holds one (rank, scale, dropout); the layers have {sorted(params)}")
    rank, scale, dropout = params.pop()
    return {"fine_tune_type": "lora", "num_layers": len(blocks) - first,
            "lora_parameters": {"rank": rank, "scale": scale, "dropout": dropout, "keys": sorted(keys)}}


def save_adapter(model: nn.Module, path) -> Path:
    """Write adapters.safetensors and adapter_config.json, as `mlx_lm.tuner.utils.load_adapters` reads them."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    mx.save_safetensors(str(path / "adapters.safetensors"), adapter_weights(model))
    (path / "adapter_config.json").write_text(json.dumps(adapter_config(model), indent=2))
    return path
