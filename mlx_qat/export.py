"""Export a QAT model as an mlx-lm checkpoint of packed affine weights (DESIGN §6).

The packed codes come from the learned α and the integer codes of the grid (not from
`mx.quantize` on ŵ, whose min/max search does not reproduce the learned grid), so that
`mx.dequantize` of the export equals the fake-quant weight: exactly with float32 scales.
The directory loads with `mlx_lm.load` and generates with `mlx_lm.generate` unchanged.
"""

import dataclasses
import shutil
import tempfile
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Union

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten
from mlx_lm.utils import save_config, save_model

from .layers import QATEmbedding, QATLinear, qat_specs

SCALES_DTYPES = {"float32": mx.float32, "float16": mx.float16, "bfloat16": mx.bfloat16}
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model")


@dataclass
class ExportReport:
    path: Path
    bits_per_weight: float  # stored bits per quantized weight, scales and biases included
    size_bytes: int  # the whole directory on disk

    def __str__(self) -> str:
        return f"exported {self.path} ({self.size_bytes / 2**20:.2f} MiB, {self.bits_per_weight:.3f} bits per weight)"


def module_quantization(model: nn.Module) -> dict:
    """MLX's quantization parameters of every QAT layer, keyed by module path."""
    modules = dict(model.named_modules())
    entries = {
        path: {
            "group_size": spec.export_group_size(modules[path].weight.shape[1]),
            "bits": spec.storage_bits,
            "mode": "affine",
        }
        for path, spec in qat_specs(model).items()
    }
    if not entries:
        raise ValueError("the model has no QAT layers to export; convert it with mlx_qat.layers.to_qat first")
    return entries


def quantization_config(entries: dict) -> dict:
    """config.json's `quantization`: the blocks' bits and group size, with per-module
    overrides keyed by module path wherever a module differs (e.g. the 4-bit embedding)."""
    in_blocks = [e for p, e in entries.items() if ".layers." in f".{p}"] or list(entries.values())
    default = max(in_blocks, key=in_blocks.count)
    return {**default, **{p: e for p, e in entries.items() if e != default}}


def _model_config(model: nn.Module) -> dict:
    args = getattr(model, "args", None)
    if args is None or not dataclasses.is_dataclass(args):
        raise ValueError("export needs an mlx-lm model that carries its ModelArgs as `model.args`")
    return {k: v for k, v in dataclasses.asdict(args).items() if v is not None}


def _copy_tokenizer(tokenizer, out: Path) -> None:
    if hasattr(tokenizer, "save_pretrained"):
        tokenizer.save_pretrained(str(out))
        return
    src = Path(tokenizer)
    found = [src / name for name in TOKENIZER_FILES if (src / name).exists()]
    if not found:
        raise FileNotFoundError(f"no tokenizer files ({', '.join(TOKENIZER_FILES)}) in {src}")
    for f in found:
        shutil.copy(f, out / f.name)


def _write_atomically(path: Path, overwrite: bool, write) -> None:
    """Run write(tmp_dir) and move the finished directory to `path`."""
    if path.exists() and not overwrite:
        raise FileExistsError(f"{path} exists; choose another path or pass overwrite=True (--overwrite)")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=path.parent))
    try:
        write(tmp)
        if path.exists():
            shutil.rmtree(path)
        tmp.rename(path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _directory_size(path: Path) -> int:
    return sum(f.stat().st_size for f in path.iterdir())


def export(
    model: nn.Module,
    path: Union[str, Path],
    tokenizer=None,
    scales_dtype: str = "float32",
    overwrite: bool = False,
) -> ExportReport:
    """Write `model` (in QAT form) as an mlx-lm directory at `path`.

    tokenizer: a directory holding Hugging Face tokenizer files, or an object with
    `save_pretrained`; mlx_lm.load needs one. scales_dtype: float32 (lossless), float16 or
    bfloat16 (smaller, rounds the scales). The directory is written beside `path` and moved
    into place when complete; an existing `path` is replaced only with overwrite=True.
    """
    path = Path(path)
    if scales_dtype not in SCALES_DTYPES:
        raise ValueError(f"scales_dtype={scales_dtype!r}; use one of {', '.join(SCALES_DTYPES)}")
    entries = module_quantization(model)
    config = {**_model_config(model), "quantization": quantization_config(entries)}
    packed = packed_model(model, entries, SCALES_DTYPES[scales_dtype])
    _write_atomically(path, overwrite, partial(_save, packed, config, tokenizer))
    return ExportReport(path, bits_per_weight(packed), _directory_size(path))


def export_fp(model: nn.Module, path: Union[str, Path], tokenizer=None, overwrite: bool = False) -> ExportReport:
    """Write a full-precision model (an FP-only run) as an mlx-lm directory."""
    path = Path(path)
    _write_atomically(path, overwrite, partial(_save, model, _model_config(model), tokenizer))
    bits = 8 * tree_flatten(model.parameters())[0][1].itemsize
    return ExportReport(path, float(bits), _directory_size(path))


def _save(model: nn.Module, config: dict, tokenizer, directory: Path) -> None:
    save_model(directory, model)
    save_config(config, directory / "config.json")
    if tokenizer is not None:
        _copy_tokenizer(tokenizer, directory)


def packed_model(model: nn.Module, entries: dict, scales_dtype=mx.float32) -> nn.Module:
    """A new mlx-lm model with the packed weights of `model`'s QAT layers (the model is kept).

    It is built the way `mlx_lm.load` builds one from config.json, and loaded strictly, so
    an export that mlx-lm would not load fails here.
    """
    weights = {}
    for path, m in model.named_modules():
        if isinstance(m, (QATLinear, QATEmbedding)):
            weights.update({f"{path}.{k}": v for k, v in tree_flatten(m.to_quantized(scales_dtype).parameters())})
    qat_params = {f"{path}.{k}" for path in qat_specs(model) for k in ("weight", "alpha", "bias")}
    weights.update({k: v for k, v in tree_flatten(model.parameters()) if k not in qat_params})
    packed = type(model)(model.args)
    nn.quantize(packed, class_predicate=lambda p, _: entries.get(p, False))
    packed.load_weights(list(weights.items()), strict=True)
    return packed


def bits_per_weight(model: nn.Module) -> float:
    """Stored bits (codes + scales + biases) per weight of the quantized layers."""
    stored, weights = 0, 0
    for _, m in model.named_modules():
        if isinstance(m, (nn.QuantizedLinear, nn.QuantizedEmbedding)):
            stored += sum(v.nbytes for k, v in tree_flatten(m.parameters()) if k != "bias") * 8
            weights += m.weight.shape[0] * m.weight.shape[1] * 32 // m.bits
    return stored / weights
