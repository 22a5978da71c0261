"""Export a QAT model as an mlx-lm checkpoint of packed weights (affine, or an FP mode).

The packed codes come from the learned α and the integer codes of the grid (not from
`mx.quantize` on ŵ, whose min/max search does not reproduce the learned grid), so that
`mx.dequantize` of the export equals the fake-quant weight: exactly with float32 scales.
Each row of codes is stored as MLX's little-endian bitstream in uint32 words (`layers.pack`),
with one (scale, bias) per group such that ŵ = scale·code + bias. The directory loads with
`mlx_lm.load` and generates with `mlx_lm.generate` unchanged.

In an FP mode (mxfp4, nvfp4, mxfp8) the packing is `mx.quantize(W, G, B, mode=mode)` of the
trained float weight: lossless by construction, since the fake-quant the model trained with
equals MLX's quantize -> dequantize bit for bit (fp_formats.py). config.json's `quantization`
then reads {"group_size": G, "bits": B, "mode": mode}, as mlx-lm writes it. mlx-lm's FP-mode
layers compute in the input's dtype (float32 here), but `QuantizedEmbedding`'s lookup returns
bfloat16 (mx.dequantize's default for FP modes); every such value is exact in bfloat16 (at most
6 significant bits), and the first float32 residual add promotes the stream back, so the
export's loss equals the fake-quant model's up to float32 summation order (about 1e-6 relative).

`export_run` exports a run's model, both as the run ends and from a checkpoint or snapshot:

    python -m mlx_qat.export --checkpoint RUN/snapshots/TOKENS --out DIR
"""

import argparse
import shutil
import sys
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Optional, Union

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten
from mlx_lm.utils import save_config, save_model

from . import atomic, checkpoint, constants, data, pretrained
from .config import TrainConfig
from .model import config_dict
from .layers import qat_specs, to_qat, to_quantized
from .lowrank import merge

SCALES_DTYPES = {name: getattr(mx, name) for name in constants.SCALES_DTYPE_NAMES}
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model")


@dataclass
class ExportReport:
    path: Path
    bits_per_weight: float  # stored bits per quantized weight, scales (and affine biases) included
    size_bytes: int  # the whole directory on disk

    def __str__(self) -> str:
        return f"exported {self.path} ({self.size_bytes / 2**20:.2f} MiB, {self.bits_per_weight:.3f} bits per weight)"


def module_quantization(packed: nn.Module) -> dict:
    """MLX's quantization parameters of every packed layer, keyed by module path: what
    `mlx_lm.load` reads from config.json to rebuild those layers."""
    return {
        path: {"group_size": m.group_size, "bits": m.bits, "mode": m.mode}
        for path, m in reversed(packed.named_modules())
        if isinstance(m, (nn.QuantizedLinear, nn.QuantizedEmbedding))
    }


def quantization_config(entries: dict) -> dict:
    """config.json's `quantization`: the most common entry (the blocks' bits and group size) as
    the default, with a per-module override keyed by module path wherever a module differs
    (e.g. the 4-bit embedding)."""
    values = list(entries.values())
    default = max(values, key=values.count)
    return {**default, **{p: e for p, e in entries.items() if e != default}}


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


def _write(path: Path, overwrite: bool, write) -> None:
    """Run write(directory) on a fresh directory that replaces `path` once it is complete."""
    if path.exists() and not overwrite:
        raise FileExistsError(f"{path} exists; choose another path or pass overwrite=True")
    with atomic.directory(path, overwrite) as directory:
        write(directory)


def _directory_size(path: Path) -> int:
    return sum(f.stat().st_size for f in path.iterdir())


def export(
    model: nn.Module,
    path: Union[str, Path],
    tokenizer=None,
    scales_dtype: str = "float32",
    overwrite: bool = False,
    base_config: Optional[dict] = None,
) -> ExportReport:
    """Write `model` (in QAT form) as an mlx-lm directory at `path`.

    tokenizer: a directory holding Hugging Face tokenizer files, or an object with
    `save_pretrained`; mlx_lm.load needs one. scales_dtype: float32 (lossless), float16 or
    bfloat16 (smaller, rounds the scales); FP modes keep their 8-bit scales whatever it says.
    The directory is written beside `path` and moved into place when complete; an existing
    `path` is replaced only with overwrite=True.
    base_config: the `config.json` to write (with the quantization added), for a model that
    keeps a pretrained model's identity; default: the model's own arguments.
    """
    path = Path(path)
    if scales_dtype not in SCALES_DTYPES:
        raise ValueError(f"scales_dtype={scales_dtype!r}; use one of {', '.join(SCALES_DTYPES)}")
    if not qat_specs(model):
        raise ValueError("the model has no QAT layers to export; convert it with mlx_qat.layers.to_qat first")
    config = dict(base_config) if base_config is not None else config_dict(model)  # a pretrained model keeps its own
    packed = packed_model(model, SCALES_DTYPES[scales_dtype])
    config["quantization"] = quantization_config(module_quantization(packed))
    _write(path, overwrite, partial(_save, packed, config, tokenizer))
    return ExportReport(path, bits_per_weight(packed), _directory_size(path))


def export_fp(model: nn.Module, path: Union[str, Path], tokenizer=None, overwrite: bool = False,
              base_config: Optional[dict] = None) -> ExportReport:
    """Write a full-precision model (an FP-only run) as an mlx-lm directory (base_config: as in `export`)."""
    path = Path(path)
    config = dict(base_config) if base_config is not None else config_dict(model)
    _write(path, overwrite, partial(_save, model, config, tokenizer))
    bits = 8 * tree_flatten(model.parameters())[0][1].itemsize
    return ExportReport(path, float(bits), _directory_size(path))


def _save(model: nn.Module, config: dict, tokenizer, directory: Path) -> None:
    save_model(directory, model)
    save_config(config, directory / "config.json")
    if tokenizer is not None:
        _copy_tokenizer(tokenizer, directory)


def packed_model(model: nn.Module, scales_dtype=mx.float32) -> nn.Module:
    """A new model holding the packed weights of `model`'s QAT layers (`model` is kept).

    A fresh model of the same class and args is put in the same QAT form
    (`to_qat(fresh, qat_specs(model))`), loaded strictly with `model`'s weights, and packed by
    `layers.to_quantized`: the same layers, in the same places, that `mlx_lm.load` builds from
    the config this export writes.
    """
    fresh = type(model)(model.args)
    if hasattr(fresh, "sanitize"):  # as mlx_lm.load does: e.g. gemma3_text ties its head there
        fresh.sanitize(dict(tree_flatten(model.parameters())))
    packed = to_qat(fresh, qat_specs(model))
    packed.load_weights(list(tree_flatten(model.parameters())), strict=True)
    return to_quantized(packed, scales_dtype)


def bits_per_weight(model: nn.Module) -> float:
    """Stored bits (codes + scales + biases) per weight of the quantized layers: affine
    B + 2·S/G (S the scale dtype's bits), FP modes B + 8/G (no biases); weighted by layer size."""
    stored, weights = 0, 0
    for _, m in model.named_modules():
        if isinstance(m, (nn.QuantizedLinear, nn.QuantizedEmbedding)):
            stored += sum(v.nbytes for k, v in tree_flatten(m.parameters()) if k != "bias") * 8
            weights += m.weight.shape[0] * m.weight.shape[1] * 32 // m.bits
    return stored / weights


def export_run(model: nn.Module, phase: str, path: Union[str, Path], cfg: TrainConfig, start=None,
               data_dir: Optional[Path] = None, tokenizer=None, scales_dtype: str = "float32",
               overwrite: bool = False) -> ExportReport:
    """A run's model, as the run ends or from one of its checkpoints, as an mlx-lm directory:
    packed (`export`) if its `phase` is "qat", float (`export_fp`) if "fp". A model in low-rank
    QAT form is merged first, in place (`lowrank.merge`: the same fake-quant weights, packed
    losslessly on the grid it trained on).

    From a pretrained start (cfg.pretrained; `start` is that model where the caller has it
    loaded) the export keeps the model's config.json (architecture, rope, eos ids). `tokenizer`
    defaults to the run's own: the pretrained model's (chat template included), or else that of
    its prepared data (`data_dir`, found from the config where not given)."""
    if start is None and cfg.pretrained is not None:
        start = pretrained.load(cfg.pretrained, lazy=True)  # its config.json and tokenizer; the weights stay unread
    if tokenizer is None:
        tokenizer = start.tokenizer if start is not None else (data_dir or data.load(cfg).path)
    base = pretrained.export_config(start, model) if start is not None else None
    merge(model)  # a low-rank model's layers become plain QAT layers (no-op otherwise)
    if phase == "qat":
        return export(model, path, tokenizer, scales_dtype, overwrite, base)
    return export_fp(model, path, tokenizer, overwrite, base)


def main(argv=None) -> None:
    """python -m mlx_qat.export --checkpoint PATH --out DIR: export any checkpoint or snapshot."""
    parser = argparse.ArgumentParser(prog="python -m mlx_qat.export",
                                     description="Export a run's checkpoint or snapshot as an mlx-lm model directory.")
    parser.add_argument("--checkpoint", type=Path, required=True, help="a run's checkpoint/ or snapshots/<tokens>/")
    parser.add_argument("--out", type=Path, required=True, help="the model directory to write")
    parser.add_argument("--scales-dtype", default="float32", choices=list(SCALES_DTYPES),
                        help="dtype of the scales and biases: float32 is lossless (default)")
    parser.add_argument("--tokenizer", type=Path, help="tokenizer directory (default: the run's prepared data)")
    parser.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    args = parser.parse_args(argv)
    try:
        if args.out.exists() and not args.overwrite:
            raise FileExistsError(f"{args.out} exists; choose another --out or pass --overwrite")
        model, meta = checkpoint.load_model(args.checkpoint)
        result = export_run(model, meta["phase"], args.out, TrainConfig(**meta["config"]), tokenizer=args.tokenizer,
                            scales_dtype=args.scales_dtype, overwrite=args.overwrite)
    except (ValueError, FileExistsError, FileNotFoundError, checkpoint.CheckpointError, data.DataError) as e:
        parser.exit(2, f"error: {e}\n")
    print(f"{result} from {args.checkpoint} ({meta['phase']}, {meta['tokens']:,} tokens)", file=sys.stderr)


if __name__ == "__main__":
    main()
