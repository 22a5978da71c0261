"""Train a transformer in full precision, then quantization-aware, in one process; export it.

    python -m mlx_qat.train --config configs/tiny.yaml --out runs/tiny [--key value ...]
    python -m mlx_qat.train --config configs/tiny.yaml --out runs/tiny --resume

The run: data -> model -> FP steps -> (switch: convert to QAT in place, recompile) -> QAT steps
-> validation -> export (mlx-lm checkpoint) -> exported model's validation -> plot, summary.
The QAT fraction f = D_qat / D_total is a number, or `auto`: the paper's predictor
f̂ = exp(−6.7297 / ln S_total), S_total = D_total / (N · B/8).
"""

import argparse
import hashlib
import json
import math
import os
import sys
import time
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Callable, Iterable, List, Optional

from . import blas  # noqa: F401  (the fast BLAS, before mlx.core)

import mlx.core as mx  # noqa: E402
import mlx.nn as nn  # noqa: E402
import mlx_lm  # noqa: E402
import mlx.optimizers as optim  # noqa: E402
import numpy as np  # noqa: E402
import yaml  # noqa: E402
from tqdm import tqdm  # noqa: E402

from . import checkpoint, config, data, export, law, model as models, report  # noqa: E402
from .layers import to_qat  # noqa: E402
from .schedule import Schedule  # noqa: E402


class TrainingError(RuntimeError):
    """A run that cannot go on, with what to do about it."""


@dataclass(frozen=True)
class RunPlan:
    """How the token budget splits into FP and QAT steps."""

    n_params: int
    tokens_per_step: int
    fp_steps: int
    qat_steps: int
    bits: float

    @property
    def total_steps(self) -> int:
        return self.fp_steps + self.qat_steps

    @property
    def fp_tokens(self) -> int:
        return self.fp_steps * self.tokens_per_step

    @property
    def qat_tokens(self) -> int:
        return self.qat_steps * self.tokens_per_step

    @property
    def total_tokens(self) -> int:
        return self.total_steps * self.tokens_per_step

    @property
    def qat_fraction(self) -> float:
        return self.qat_steps / self.total_steps

    @property
    def s_total(self) -> float:
        return float(law.tokens_per_param_byte(self.total_tokens, self.n_params, self.bits))


def plan_run(cfg: config.TrainConfig, n_params: int) -> RunPlan:
    total_steps = cfg.total_tokens // cfg.tokens_per_step
    f = cfg.qat_fraction
    if f == "auto":
        s_total = law.tokens_per_param_byte(total_steps * cfg.tokens_per_step, n_params, cfg.bits)
        f = float(law.predicted_qat_fraction(s_total))
    qat_steps = round(total_steps * f)
    if f > 0 and qat_steps == 0:
        qat_steps = 1  # a QAT run gets at least one QAT step
    return RunPlan(n_params, cfg.tokens_per_step, total_steps - qat_steps, qat_steps, cfg.bits)


# ---------------------------------------------------------------- data, model, optimizer


def load_data(cfg: config.TrainConfig) -> data.TokenData:
    """The prepared dataset named by `cfg.data`, preparing (and caching) it if needed."""
    inputs = [cfg.data] if isinstance(cfg.data, str) else list(cfg.data)
    if len(inputs) == 1 and (Path(inputs[0]) / data.MANIFEST).exists():
        return data.TokenData.load(Path(inputs[0]))
    # Named by the inputs' content hashes, so a complete directory here is already the right one.
    key = hashlib.sha256(json.dumps([data.fingerprint(inputs), cfg.vocab_size]).encode()).hexdigest()[:16]
    cache = Path(os.path.expanduser(cfg.data_cache)) / key
    if not (cache / data.MANIFEST).exists():
        data.prepare(inputs, cfg.vocab_size, cache)
    return data.TokenData.load(cache)


def make_optimizer(cfg: config.TrainConfig) -> optim.Optimizer:
    """AdamW on the weights; no weight decay on norms and biases; α has an optimizer (and
    state) of its own, which the QAT phase starts fresh."""
    adamw = partial(optim.AdamW, learning_rate=cfg.learning_rate, betas=[cfg.beta1, cfg.beta2])
    is_alpha = lambda path, _: path.endswith("alpha")  # noqa: E731
    is_vector = lambda _, p: p.ndim < 2  # noqa: E731
    return optim.MultiOptimizer(
        [adamw(weight_decay=0.0), adamw(weight_decay=0.0), adamw(weight_decay=cfg.weight_decay)],
        [is_alpha, is_vector],
    )


def loss_fn(model: nn.Module, batch: mx.array) -> mx.array:
    # MLX's fused cross-entropy: one kernel with float32 accumulation on Metal/CUDA.
    return mx.fast.cross_entropy(model(batch[:, :-1]), batch[:, 1:]).mean()


def keep_freed_buffers() -> None:
    """Let MLX's CPU allocator keep a quarter of its memory limit in freed buffers for reuse.

    On the CPU MLX caches only 32 MB (on Metal, up to its memory limit), so a step's larger
    activations went back to the OS and came back as fresh zeroed pages every step: ~50,000 page
    faults and ~5% of a small-config step on a 2-core x86-64 CPU. Shapes repeat step after step,
    so the cache holds about one step's transient buffers, not a growing pile."""
    if mx.default_device() == mx.cpu:
        mx.set_cache_limit(max(mx.get_memory_limit() // 4, 32 << 20))


def make_train_step(model: nn.Module, optimizer: optim.Optimizer, grad_clip: float) -> Callable:
    """One compiled step: forward, backward, clip, AdamW update. Rebuilt at the FP->QAT switch,
    when the model's layers (and so its state) change."""
    optimizer.init(model.trainable_parameters())
    loss_and_grad = nn.value_and_grad(model, loss_fn)
    state = [model.state, optimizer.state]

    @partial(mx.compile, inputs=state, outputs=state)
    def step(batch):
        loss, grads = loss_and_grad(model, batch)
        if grad_clip > 0:
            grads, _ = optim.clip_grad_norm(grads, grad_clip)
        optimizer.update(model, grads)
        return loss

    return step


def evaluate(model: nn.Module, batches: Iterable[np.ndarray]) -> float:
    """Mean next-token cross-entropy over the batches."""
    total, count = 0.0, 0
    for b in map(mx.array, batches):
        total += mx.fast.cross_entropy(model(b[:, :-1]), b[:, 1:]).sum().item()
        count += b.shape[0] * (b.shape[1] - 1)
    return total / count


def switch_to_qat(model: nn.Module, optimizer: optim.Optimizer, cfg: config.TrainConfig) -> None:
    """The FP -> QAT moment: swap in QAT layers (α from the trained weights); optionally
    forget the weights' Adam state."""
    to_qat(model, cfg.spec, cfg.embedding_spec)
    if not cfg.keep_optimizer_state:
        for o in optimizer.optimizers:
            o.state = {}


# ---------------------------------------------------------------- the run


RESUME_MAY_CHANGE = {"report_every", "eval_every", "checkpoint_every", "data_cache"}


def _resumable(out: Path, cfg: config.TrainConfig) -> Optional[Path]:
    path = checkpoint.find(out)
    if path is None:
        return None
    saved = checkpoint.read_meta(path)["config"]
    changed = {k: (saved.get(k), v) for k, v in cfg.to_dict().items() if saved.get(k) != v and k not in RESUME_MAY_CHANGE}
    if changed:
        diff = ", ".join(f"{k}: {a!r} -> {b!r}" for k, (a, b) in changed.items())
        raise TrainingError(f"the config differs from the run in {out} ({diff}); resume with its config.yaml or use a new --out")
    return path


def run(cfg: config.TrainConfig, out: Path, resume: bool = False, show_progress: bool = True) -> dict:
    out = Path(out)
    if out.exists() and any(out.iterdir()) and not resume:
        raise TrainingError(f"{out} already holds a run; pass --resume to continue it or choose a new --out")
    out.mkdir(parents=True, exist_ok=True)
    keep_freed_buffers()

    # Data and model
    dataset = load_data(cfg)
    args = models.model_args(cfg.model, dataset.vocab_size)
    model = models.build(args, cfg.seed)
    plan = plan_run(cfg, models.num_params(model))
    schedule = Schedule(cfg.learning_rate, plan.fp_tokens, plan.qat_tokens, cfg.schedule, cfg.warmup, cfg.cooldown)
    optimizer = make_optimizer(cfg)
    val_batches = lambda: data.eval_batches(dataset.val, cfg.batch_size, cfg.seq_len, cfg.eval_batches)  # noqa: E731
    metrics = report.Metrics(out / "metrics.jsonl")

    start, phase = 0, "fp"
    if resume and (ckpt := _resumable(out, cfg)) is not None:
        meta = checkpoint.read_meta(ckpt)
        start, phase = meta["step"], meta["phase"]
        if phase == "qat":
            to_qat(model, cfg.spec, cfg.embedding_spec)
        optimizer.init(model.trainable_parameters())
        checkpoint.restore(ckpt, model, optimizer)
        metrics.truncate(meta["metrics_records"])
    elif resume:
        print(f"no checkpoint in {out}; starting from scratch", file=sys.stderr)
    (out / "config.yaml").write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))

    if plan.fp_steps == 0 and phase == "fp":  # QAT from scratch
        switch_to_qat(model, optimizer, cfg)
        phase = "qat"
    step_fn = make_train_step(model, optimizer, cfg.grad_clip)
    last_good = start

    bar = tqdm(total=plan.total_steps, initial=start, disable=not show_progress, unit="step", dynamic_ncols=True)
    started, window_start, window_tokens = time.perf_counter(), time.perf_counter(), 0
    for step in range(start, plan.total_steps):
        if step == plan.fp_steps and phase == "fp":
            # The FP -> QAT switch: validate the FP model, convert in place, recompile.
            metrics.log(step=step, tokens=step * plan.tokens_per_step, phase="fp", val_loss=evaluate(model, val_batches()), event="end_fp")
            switch_to_qat(model, optimizer, cfg)
            step_fn = make_train_step(model, optimizer, cfg.grad_clip)
            phase = "qat"

        tokens = step * plan.tokens_per_step
        lr = schedule(tokens + plan.tokens_per_step / 2)  # the LR at the middle of this step
        optimizer.learning_rate = lr
        loss = step_fn(mx.array(data.batch(dataset.train, cfg.batch_size, cfg.seq_len, cfg.seed, step)))
        mx.async_eval(loss, model.state, optimizer.state)  # compute this step while the next batch is read
        window_tokens += plan.tokens_per_step

        done = step + 1
        report_now = done % cfg.report_every == 0 or done == plan.total_steps
        checkpoint_now = done % cfg.checkpoint_every == 0 and done != plan.total_steps
        if report_now or checkpoint_now:  # never checkpoint a diverged model
            loss = loss.item()
            if not math.isfinite(loss):
                bar.close()
                raise TrainingError(
                    f"the loss became {loss} at step {done}; the last good checkpoint (step {last_good}) is kept in "
                    f"{out}. Lower learning_rate or grad_clip, then --resume or start afresh"
                )
        if report_now:
            elapsed = time.perf_counter() - window_start
            record = dict(step=done, tokens=done * plan.tokens_per_step, phase=phase, loss=loss, lr=lr,
                          tokens_per_s=window_tokens / elapsed)
            window_start, window_tokens = time.perf_counter(), 0
            if done % cfg.eval_every == 0 and done != plan.total_steps:
                record["val_loss"] = evaluate(model, val_batches())
            metrics.log(**record)
            bar.set_postfix(phase=phase, tokens=f"{record['tokens']:,}", loss=f"{loss:.3f}", lr=f"{lr:.2e}",
                            tok_s=f"{record['tokens_per_s']:.0f}")
        if checkpoint_now:
            mx.eval(model.parameters(), optimizer.state)
            meta = {"step": done, "phase": phase, "seed": cfg.seed, "metrics_records": metrics.count(), "config": cfg.to_dict()}
            checkpoint.save(out, model, optimizer, meta)
            last_good = done
        bar.update(1)
    bar.close()
    train_seconds = time.perf_counter() - started

    # Final validation, export, and the exported model's validation through mlx_lm.load
    final_loss = evaluate(model, val_batches())
    metrics.log(step=plan.total_steps, tokens=plan.total_tokens, phase=phase, val_loss=final_loss, event=f"end_{phase}")
    model_dir = out / "model"
    if phase == "qat":
        exported = export.export(model, model_dir, tokenizer=dataset.path, scales_dtype=cfg.export_scales, overwrite=True)
    else:
        exported = export.export_fp(model, model_dir, tokenizer=dataset.path, overwrite=True)
    loaded, _ = mlx_lm.load(str(model_dir))
    exported_loss = evaluate(loaded, val_batches())

    records = metrics.read()
    summary = report.summary(plan, records, final_loss, exported_loss, exported, train_seconds, cfg)
    report.write_summary(out, summary)
    report.plot(records, plan.fp_tokens if plan.qat_steps else None, out / "loss.png")
    return summary


def main(argv: Optional[List[str]] = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m mlx_qat.train", description=__doc__)
    parser.add_argument("--config", type=Path, help="YAML config (see configs/)")
    parser.add_argument("--out", type=Path, required=True, help="run directory")
    parser.add_argument("--resume", action="store_true", help="continue the run in --out from its checkpoint")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    config.add_arguments(parser)
    args, rest = parser.parse_known_args(argv)
    try:
        cfg = config.load(args.config, config.parse_overrides(rest))
        summary = run(cfg, args.out, resume=args.resume, show_progress=not args.no_progress)
    except (ValueError, FileNotFoundError, TrainingError, data.DataError, checkpoint.CheckpointError) as e:
        parser.exit(2, f"error: {e}\n")
    print(report.format_summary(summary))


if __name__ == "__main__":
    main()
