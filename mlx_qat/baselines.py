"""What a run from a pretrained model is compared with when it ends, on the run's own validation
batches: the starting model, MLX's post-training quantization of it (PTQ) at the run's bits and
group sizes, and, when `compare: [dwq]` asks for it, mlx-lm's DWQ on the run's training tokens.

    reference_val_loss  the pretrained model as loaded (float32)
    ptq_val_loss        `mlx_lm.utils.quantize_model` of it: round-to-nearest affine quantization
                        (or the run's FP mode: mx.quantize, the grid the QAT run trains on),
                        as `mlx_lm.convert -q` makes it, with each layer at the bits the QAT export
                        gives it (blocks at `bits`, embedding/head at `embedding_bits`), so both
                        models take the same memory
    dwq_val_loss        that PTQ model after `mlx_lm.quant.dwq.dwq_quantize` (scales, biases and
                        norms distilled from the starting model) over the same batches as the run

PTQ and DWQ models are validated with their weights dequantized, and on a CPU DWQ trains through
them too (`float_path`): the values and gradients the packed layers give, through float matmuls,
since MLX's CPU quantized matmul is far slower than its float one, which the optimized BLAS
serves. Nothing here runs inside the training loop.
"""

import copy
from typing import Callable, Optional

import mlx.core as mx
import mlx.nn as nn
import mlx.optimizers as optim
from mlx_lm.quant.dwq import dwq_quantize
from mlx_lm.utils import dequantize_model, quantize_model

from . import data, pretrained
from .evaluate import evaluate
from .layers import quant_specs, unpacked_weight


def unavailable(cfg) -> Optional[str]:
    """Why MLX's affine quantization has no counterpart of this run's grid (None: it has)."""
    if cfg.bits == 1.58:
        return "bits 1.58 (ternary) is not an MLX affine width: no PTQ or DWQ baseline"
    if cfg.group_size is None:
        return "per-channel scales (group_size: null) are not an MLX affine group size: no PTQ or DWQ baseline"
    return None


def ptq(start: pretrained.Pretrained, cfg) -> nn.Module:
    """A quantized copy of the starting model: every layer the QAT export packs, at its bits."""
    model = copy.deepcopy(start.model)
    specs = quant_specs(model, cfg.spec, cfg.embedding_spec)

    def place(path, _):  # each layer at the bits (and mode) the QAT export gives it
        spec = specs.get(path)
        return spec is not None and dict(group_size=spec.group_size, bits=spec.storage_bits, mode=spec.mode)

    quantize_model(model, start.config, group_size=cfg.group_size, bits=cfg.spec.storage_bits, mode=cfg.mode,
                   quant_predicate=place)
    return model


def windows(batches) -> list:
    """mlx-lm's dataset items, (tokens, prompt offset), of token windows."""
    return [(row.tolist(), 0) for batch in batches for row in batch]


class FloatPathLinear(nn.QuantizedLinear):
    """A QuantizedLinear whose product is its dequantized weight through a float matmul: the
    values, and the gradients for scales and biases, of `mx.quantized_matmul`, at the float
    matmul's speed where the quantized one is slow (a CPU)."""

    def __call__(self, x):
        y = x @ unpacked_weight(self).T
        return y + self["bias"] if "bias" in self else y


class FloatPathEmbedding(nn.QuantizedEmbedding):
    """A QuantizedEmbedding whose `as_linear` (a tied LM head) is a float matmul, as above."""

    def as_linear(self, x):
        return x @ unpacked_weight(self).T




def float_path(model: nn.Module) -> nn.Module:
    """Make the packed layers of `model` multiply through their dequantized weights, in place.
    Each module only changes class, so it keeps its arrays and its frozen/trainable state.
    (A MoE's QuantizedSwitchLinear keeps MLX's kernel: gather_qmm has no float counterpart here.)"""
    for _, m in model.named_modules():
        if type(m) is nn.QuantizedLinear:
            m.__class__ = FloatPathLinear
        elif type(m) is nn.QuantizedEmbedding:
            m.__class__ = FloatPathEmbedding
    return model


def dwq(model: nn.Module, teacher: nn.Module, cfg, dataset: data.TokenData, steps: int) -> nn.Module:
    """mlx-lm's DWQ of a PTQ model in place, on the windows of the run's `steps` training batches.
    On a CPU the student's packed layers go through `float_path` (the same math, on the faster float matmul)."""
    if mx.default_device() == mx.cpu:
        float_path(model)
    train = windows(data.batch(dataset.train, cfg.batch_size, cfg.seq_len, cfg.seed, k) for k in range(steps))
    valid = windows(data.eval_batches(dataset.val, cfg.batch_size, cfg.seq_len, 1))
    valid = (valid * cfg.batch_size)[:cfg.batch_size]  # DWQ's own progress check wants one full batch
    opt = optim.Adam(learning_rate=cfg.dwq_learning_rate, bias_correction=True)  # as mlx_lm.dwq sets it up
    dwq_quantize(model, lambda inputs, index, split: teacher(inputs), opt, train, valid, cfg.batch_size,
                 cfg.seq_len + 1, cfg.seed, dtype=mx.float32)
    return model


def evaluate_quantized(model: nn.Module, batches, group=None) -> float:
    """Validation of a packed model through its dequantized weights (the model is changed)."""
    return evaluate(dequantize_model(model), batches, group)


def compare(cfg, dataset: data.TokenData, val_batches: Callable, steps: int, group=None) -> dict:
    """The baselines' validation losses (and a note where PTQ cannot be made), for summary.json."""
    start = pretrained.load(cfg.pretrained)
    result = {"reference_val_loss": evaluate(start.model, val_batches(), group)}
    note = unavailable(cfg)
    if note is not None:
        return {**result, "ptq_val_loss": None, "ptq_note": note}
    result["ptq_val_loss"] = evaluate_quantized(ptq(start, cfg), val_batches(), group)
    if "dwq" in cfg.compare:
        tuned = dwq(ptq(start, cfg), start.model, cfg, dataset, steps)
        result["dwq_val_loss"] = evaluate_quantized(tuned, val_batches(), group)
    return result
