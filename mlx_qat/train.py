"""Train a transformer in full precision, then quantization-aware, in one process; export it.

    python -m mlx_qat.train --config configs/tiny.yaml --out runs/tiny [--key value ...]
    python -m mlx_qat.train --out runs/tiny --resume
    python -m mlx_qat.train --config configs/tiny.yaml --out runs/branch --init-from runs/tiny/snapshots/409600

A run reads as its stages: FP steps up to D_fp; the switch (the model converted in place to its
QAT form, α initialised from the trained weights, the step recompiled); QAT steps up to D_total;
finish (validation, export, the export's validation through mlx_lm.load, summary, plot).
The QAT fraction f = D_qat / D_total is a number, or `auto`: the paper's predictor
f̂ = exp(−6.7297 / ln S_total), S_total = D_total / (N · B/8) tokens per parameter byte.

--resume continues a killed run from its newest checkpoint that reads back whole (the rolling one,
the one kept before it, or a snapshot). --init-from starts a *new* run from a snapshot or
checkpoint of another one (weights, α, optimizer state, token count) and trains on to this run's
plan: runs that share a trajectory up to token T branch there.

--init-from MODEL, an mlx-lm / Hugging Face model directory or a llama .gguf file (anything
without meta.json), starts from a pretrained model instead (the config key `pretrained`): the run's
model is that model, its tokenizer tokenizes the data, unset keys take fine-tuning defaults, the
loss may be distillation from the starting model, and the run ends by comparing itself with the
starting model and its post-training quantization (mlx_qat.baselines).
"""

import argparse
import hashlib
import json
import os
import shutil
import sys
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Callable, List, Optional, Tuple

from . import blas  # noqa: F401  (the fast BLAS, before mlx.core)

import mlx.core as mx  # noqa: E402
import mlx.nn as nn  # noqa: E402
import mlx.optimizers as optim  # noqa: E402
import mlx_lm  # noqa: E402
import yaml  # noqa: E402

from mlx_lm.tuner.trainer import grad_checkpoint  # noqa: E402

from . import atomic, baselines, checkpoint, config, data, distributed, export  # noqa: E402
from . import model as models, pretrained, report  # noqa: E402
from .distill import make_distill_loss  # noqa: E402
from .evaluate import evaluate, loss_fn  # noqa: E402
from .layers import QATEmbedding, is_learned_scale, quant_specs, to_qat  # noqa: E402
from .monitor import Monitor, TrainingError  # noqa: E402
from .schedule import RunPlan, Schedule, make_schedule, plan_run  # noqa: E402

SUMMARY = "summary.json"


# ---------------------------------------------------------------- data, model, optimizer, step


def load_data(cfg: config.TrainConfig, tokenizer=None) -> data.TokenData:
    """The prepared dataset named by `cfg.data`, preparing (and caching) it if needed: with a
    trained sentencepiece tokenizer, or with a pretrained model's `tokenizer` when given."""
    inputs = [cfg.data] if isinstance(cfg.data, str) else list(cfg.data)
    if len(inputs) == 1 and (Path(inputs[0]) / data.MANIFEST).exists():
        if tokenizer is not None:
            data.check_prepared_with(Path(inputs[0]), tokenizer)
        return data.TokenData.load(Path(inputs[0]))
    # Named by the inputs' content hashes (and the tokenizer), so a complete directory here is already the right one.
    if tokenizer is None:
        request, prepare = [data.fingerprint(inputs), cfg.vocab_size], partial(data.prepare, inputs, cfg.vocab_size)
    else:
        request, prepare = data.pretrained_request(inputs, tokenizer), partial(data.prepare_with, tokenizer, inputs)
    key = hashlib.sha256(json.dumps(request).encode()).hexdigest()[:16]
    cache = Path(os.path.expanduser(cfg.data_cache)) / key
    if not (cache / data.MANIFEST).exists():
        prepare(cache)
    return data.TokenData.load(cache)


def load_start(cfg: config.TrainConfig) -> Optional[pretrained.Pretrained]:
    """The pretrained model a run starts from (None from scratch), checked but with its weights
    unread, so that its refusals and the data's come before the slow read."""
    return pretrained.load(cfg.pretrained, lazy=True) if cfg.pretrained is not None else None


def make_loss(cfg: config.TrainConfig) -> Callable:
    """The training loss, decided here only: next-token cross-entropy, or distillation from the
    starting model, loaded a second time and frozen (arrays of its own: the compiled step
    refuses a captured array that is also one of its inputs, as the student's weights are)."""
    if cfg.loss == "distill":
        teacher = pretrained.load(cfg.pretrained).model  # read now: a compiled step must not capture lazy arrays
        teacher.freeze()
        return make_distill_loss(teacher, cfg.kl_weight)
    return loss_fn


CHECKPOINTED = set()  # block classes patched by mlx-lm's grad_checkpoint, which patches the class itself


def save_memory(model: nn.Module, cfg: config.TrainConfig) -> None:
    """The memory options, applied to the model as it is now (again after the switch, whose QAT
    layers are new modules): gradient checkpointing of the transformer blocks, and the
    embedding/LM head weights frozen (their α, in QAT form, still learns: 1/group_size of the
    weights, and the grid keeps adapting to the fixed weights)."""
    if cfg.grad_checkpoint:
        for block in model.layers:
            if type(block) not in CHECKPOINTED:
                grad_checkpoint(block)
                CHECKPOINTED.add(type(block))
    if cfg.freeze_embedding:
        for path, m in model.named_modules():
            if isinstance(m, (nn.Embedding, QATEmbedding)) or path.rsplit(".", 1)[-1] == "lm_head":
                m.freeze(keys=["weight"], recurse=False)


def make_optimizer(cfg: config.TrainConfig) -> optim.MultiOptimizer:
    """AdamW on the weights; no weight decay on norms and biases; α has an optimizer (and
    state) of its own, which the QAT phase starts fresh."""
    adamw = partial(optim.AdamW, learning_rate=cfg.learning_rate, betas=[cfg.beta1, cfg.beta2])
    is_vector = lambda _, p: p.ndim < 2  # noqa: E731
    return optim.MultiOptimizer(
        [adamw(weight_decay=0.0), adamw(weight_decay=0.0), adamw(weight_decay=cfg.weight_decay)],
        [lambda path, _: is_learned_scale(path), is_vector],
    )


def keep_freed_buffers() -> None:
    """Let MLX's CPU allocator keep a quarter of its memory limit in freed buffers for reuse.

    On the CPU MLX caches only 32 MB (on Metal, up to its memory limit), so a step's larger
    activations went back to the OS and came back as fresh zeroed pages every step: ~50,000 page
    faults and ~5% of a small-config step on a 2-core x86-64 CPU. Shapes repeat step after step,
    so the cache holds about one step's transient buffers, not a growing pile."""
    if mx.default_device() == mx.cpu:
        mx.set_cache_limit(max(mx.get_memory_limit() // 4, 32 << 20))


def make_train_step(model: nn.Module, optimizer: optim.Optimizer, grad_clip: float, group=None,
                    loss: Callable = loss_fn) -> Callable:
    """One compiled step: forward, backward, gradients averaged over the ranks (if several),
    clip, AdamW update; it returns the loss of the global batch. Rebuilt by `switch_to_qat`,
    when the model's layers (and so its state) change. `loss` comes from `make_loss`; a
    distillation teacher it reads is frozen, so the compiled step may capture it as a constant."""
    optimizer.init(model.trainable_parameters())
    loss_and_grad = nn.value_and_grad(model, loss)
    state = [model.state, optimizer.state]
    ranks = 1 if group is None else group.size()

    @partial(mx.compile, inputs=state, outputs=state)
    def step(batch):
        loss, grads = loss_and_grad(model, batch)
        if ranks > 1:
            grads = nn.average_gradients(grads, group)
            loss = mx.distributed.all_sum(loss, group=group, stream=mx.cpu) / ranks
        if grad_clip > 0:
            grads, _ = optim.clip_grad_norm(grads, grad_clip)
        optimizer.update(model, grads)
        return loss

    return step


def switch_to_qat(model: nn.Module, optimizer: optim.MultiOptimizer, cfg: config.TrainConfig, specs=None,
                  group=None, loss: Callable = loss_fn) -> Callable:
    """The one FP -> QAT moment, wherever a model enters its QAT form (at D_fp, at step 0, or
    to restore a QAT checkpoint): swap in QAT layers (α from the weights the model holds now;
    `specs` default to the config's policy), optionally forget the weights' Adam state, and
    return the step recompiled for the new layers."""
    to_qat(model, specs if specs is not None else quant_specs(model, cfg.spec, cfg.embedding_spec))
    save_memory(model, cfg)
    if not cfg.keep_optimizer_state:  # keep the step count and learning rate, drop the moments
        for sub in optimizer.optimizers:
            sub.state = {k: v for k, v in sub.state.items() if k in ("step", "learning_rate")}
    return make_train_step(model, optimizer, cfg.grad_clip, group, loss)


@dataclass
class RunState:
    """What the loop advances: the model, its optimizer and compiled step, the step count."""

    cfg: config.TrainConfig
    plan: RunPlan
    schedule: Schedule
    model: nn.Module
    optimizer: optim.MultiOptimizer
    step_fn: Callable
    group: Optional[mx.distributed.Group] = None
    step: int = 0
    phase: str = "fp"
    loss: Callable = loss_fn
    trained_seconds: float = 0.0  # by the run's earlier processes, to the checkpoint this one resumed from


def setup(cfg: config.TrainConfig, dataset: data.TokenData, group=None,
          start: Optional[pretrained.Pretrained] = None) -> RunState:
    """The run's model (the pretrained one, or a fresh one of `cfg.model`), plan, schedule, loss and step."""
    if start is not None:
        model = start.model
    else:
        model = models.build(models.model_args(cfg.model, dataset.vocab_size), cfg.seed)
    plan = plan_run(cfg, models.num_params(model))  # before freezing: N counts every weight
    schedule = make_schedule(cfg, plan)
    loss = make_loss(cfg)
    save_memory(model, cfg)
    optimizer = make_optimizer(cfg)
    step = make_train_step(model, optimizer, cfg.grad_clip, group, loss)
    return RunState(cfg, plan, schedule, model, optimizer, step, group, loss=loss)


# ---------------------------------------------------------------- where a run starts


# grad_checkpoint trades memory for compute without changing a number, so a resumed run may turn it on.
RESUME_MAY_CHANGE = {"report_every", "eval_every", "checkpoint_every", "data_cache", "snapshot_at", "grad_checkpoint"}


def check_out(out: Path) -> None:
    """`out` is a directory, or can be made, in a place this user may write: told before any
    work, in one line, rather than as a traceback when the run writes its first file."""
    if out.exists() and not out.is_dir():
        raise TrainingError(f"--out {out} is a file, not a directory; choose another --out")
    place = next(p for p in (out, *out.parents) if p.exists())  # Path.exists is False under a file
    if not place.is_dir():
        raise TrainingError(f"--out {out} is under {place}, which is a file; choose another --out")
    if not os.access(place, os.W_OK | os.X_OK):
        raise TrainingError(f"--out {out} cannot be written ({place} is not writable); choose another --out "
                            "or change its permissions")


def made_for(out: Path) -> Optional[Path]:
    """The topmost directory that making `out` creates (None: `out` exists): what a run refused
    before its first step removes, so that it leaves nothing behind."""
    missing = [p for p in (out, *out.parents) if not p.exists()]
    return missing[-1] if missing else None


def resume_point(out: Path, cfg: config.TrainConfig, writer: bool) -> Path:
    """The newest checkpoint of the run in `out` that reads back whole; a corrupt newer one is
    passed over, and said so on stderr."""
    corrupt = []
    path = checkpoint.find(out, lambda _, e: corrupt.append(e))
    if path is None and corrupt:
        raise checkpoint.CheckpointError(f"no checkpoint in {out} reads back whole ({corrupt[0]}); start the run "
                                         f"again with a new --out, or delete {out}")
    if path is None:
        raise TrainingError(
            f"{out} has no checkpoint to resume from (the run stopped before its first checkpoint, at step "
            f"{cfg.checkpoint_every}); start it again with a new --out, or delete {out}"
        )
    if writer and corrupt:
        for e in corrupt:
            print(f"warning: passing over a corrupt checkpoint: {e}", file=sys.stderr)
        print(f"resuming from {path} (step {checkpoint.read_meta(path)['step']})", file=sys.stderr)
    return path


def starting_point(out: Path, cfg: config.TrainConfig, resume: bool, init_from: Optional[Path],
                   writer: bool = True) -> Optional[Path]:
    """The checkpoint this run starts from (None: from scratch), once `out` is known to fit.
    Only the writer (rank 0) checks `out`, and that a new run's is free: it is the one that fills it."""
    if resume and init_from is not None:
        raise TrainingError("--resume continues a run and --init-from starts a new one: pass one of them")
    if writer:
        check_out(out)
    if not resume:
        if writer and out.exists() and any(out.iterdir()):
            raise TrainingError(f"{out} already holds a run; pass --resume to continue it or choose a new --out")
        if init_from is not None and pretrained.is_model(init_from) and not (init_from / "meta.json").exists():
            raise TrainingError(f"{init_from} is a pretrained model, not a checkpoint: start from it with the config key "
                                "`pretrained` (config.resolve applies its defaults), as --init-from does on the command line")
        if init_from is not None:
            checkpoint.read_meta(init_from)  # it must be a checkpoint or snapshot
        return init_from
    if not out.is_dir():
        raise TrainingError(f"{out} does not exist, so there is no run to resume; drop --resume to start one there")
    path = resume_point(out, cfg, writer)
    saved = checkpoint.read_meta(path)["config"]
    saved = {k: saved.get(k, config.default(k)) for k in config.FIELDS}  # keys newer than the run: their defaults
    changed = {k: (saved[k], v) for k, v in cfg.to_dict().items() if saved[k] != v and k not in RESUME_MAY_CHANGE}
    if changed:
        diff = ", ".join(f"{k}: {a!r} -> {b!r}" for k, (a, b) in changed.items())
        raise TrainingError(f"the config differs from the run in {out} ({diff}); resume without --config, or use a new --out")
    return path


def check_branch(state: RunState, meta: dict, path: Path) -> int:
    """The step at which this run takes over the checkpoint at `path`, or a clear error."""
    plan, tokens = state.plan, meta["tokens"]
    if meta["model_config"] != models.config_dict(state.model):
        source = meta["config"].get("pretrained")
        hint = f" (it started from {source}: pass --pretrained {source})" if source and not state.cfg.pretrained else ""
        raise TrainingError(f"{path} holds another model than this run's{hint}; branch from a run with the same model and data")
    if tokens % plan.tokens_per_step or tokens > plan.total_tokens:
        raise TrainingError(f"{path} was taken at {tokens:,} tokens, which is not a step boundary of this run "
                            f"({plan.tokens_per_step:,} tokens per step, {plan.total_tokens:,} in all)")
    if meta["phase"] == "fp" and plan.qat_steps and tokens > plan.fp_tokens:
        raise TrainingError(f"{path} is full precision at {tokens:,} tokens, past this run's switch to QAT at "
                            f"{plan.fp_tokens:,}; branch from a snapshot at or before D_fp")
    if meta["phase"] == "qat":
        if tokens < plan.fp_tokens:
            raise TrainingError(f"{path} is already in QAT at {tokens:,} tokens, before this run's switch at {plan.fp_tokens:,}")
        expected = quant_specs(state.model, state.cfg.spec, state.cfg.embedding_spec) if state.phase == "fp" else None
        if expected is not None and checkpoint.specs(meta) != expected:
            raise TrainingError(f"{path} is quantized differently from this run's bits/group_size/embedding_bits")
    return tokens // plan.tokens_per_step


def start_from(state: RunState, path: Path, out: Path) -> None:
    """Continue from a checkpoint or snapshot: its weights, α, optimizer state, token count and
    the metrics that led there."""
    meta = checkpoint.read_meta(path)
    step = check_branch(state, meta, path)
    if meta["phase"] == "qat":
        state.step_fn = switch_to_qat(state.model, state.optimizer, state.cfg, checkpoint.specs(meta), state.group,
                                      state.loss)
        state.phase = "qat"
    checkpoint.restore(path, state.model, state.optimizer)
    state.step = step
    metrics = path / "metrics.jsonl"
    if state.group is None or distributed.is_writer(state.group):
        atomic.write_text(out / "metrics.jsonl", metrics.read_text() if metrics.exists() else "")


# ---------------------------------------------------------------- the run


def train_range(state: RunState, end: int, dataset: data.TokenData, monitor: Monitor) -> None:
    """Steps state.step .. end − 1 at the schedule's learning rates; knows nothing of phases."""
    cfg, tokens_per_step = state.cfg, state.plan.tokens_per_step
    for step in range(state.step, end):
        lr = state.schedule.at_step(step, tokens_per_step)
        state.optimizer.learning_rate = lr
        batch = data.batch(dataset.train, cfg.batch_size, cfg.seq_len, cfg.seed, step)
        loss = state.step_fn(mx.array(batch if state.group is None else distributed.rows(batch, state.group)))
        mx.async_eval(loss, state.model.state, state.optimizer.state)  # compute while the next batch is read
        state.step = step + 1
        monitor.after_step(state, loss, lr)


def export_model(state: RunState, path: Path, dataset: data.TokenData,
                 start: Optional[pretrained.Pretrained]) -> export.ExportReport:
    """The trained model as an mlx-lm directory; from a pretrained start it keeps that model's
    config.json (architecture, rope, eos ids) and its tokenizer (chat template included)."""
    tokenizer = start.tokenizer if start is not None else dataset.path
    base = pretrained.export_config(start, state.model) if start is not None else None
    if state.phase == "qat":
        return export.export(state.model, path, tokenizer=tokenizer, scales_dtype=state.cfg.export_scales,
                             overwrite=True, base_config=base)
    return export.export_fp(state.model, path, tokenizer=tokenizer, overwrite=True, base_config=base)


def finish(state: RunState, out: Path, dataset: data.TokenData, monitor: Monitor, val_batches: Callable,
           train_seconds: float, start: Optional[pretrained.Pretrained] = None,
           segment: Optional[Tuple[int, float]] = None) -> Optional[dict]:
    """Final validation and the peak memory of training; (on the writer) export and the
    export's validation through mlx_lm.load; from a pretrained start, the baselines (on every
    rank: they validate together); then (on the writer) plot and summary. Other ranks return None.
    `train_seconds` is the run's, all its processes'; `segment`, of a resumed run: (the step this
    process resumed at, its own seconds)."""
    final_loss = evaluate(state.model, val_batches(), state.group)
    monitor.end_of_phase(state, final_loss)
    peak_memory = mx.get_peak_memory()
    if monitor.writer:  # the run's own result first
        exported = export_model(state, out / "model", dataset, start)
        exported_loss = evaluate(mlx_lm.load(str(exported.path))[0], val_batches())
    compared = {} if start is None else baselines.compare(state.cfg, dataset, val_batches, state.plan.total_steps,
                                                          state.group)
    if not monitor.writer:
        return None

    records = monitor.metrics.read()
    plan = state.plan
    report.plot(records, plan.fp_tokens if plan.qat_steps else None, out / "loss.png")
    summary = report.summary(plan, records, final_loss, exported_loss, exported, train_seconds, state.cfg, peak_memory,
                             segment)
    summary.update(compared)
    report.write_summary(out, summary)  # last: its presence marks the run finished
    return summary


def begin(cfg: config.TrainConfig, out: Path, resume: bool, init_from: Optional[Path],
          group) -> Tuple[RunState, data.TokenData, Optional[pretrained.Pretrained]]:
    """Everything before the first step: the checks (agreed on by every rank), the pretrained
    model if the run starts from one (its tokenizer tokenizes the data), the data (rank 0 first,
    so that ranks sharing a cache prepare it once), the model, and the checkpoint this run
    starts from."""
    writer = distributed.is_writer(group)
    distributed.check_same_config(group, dict(cfg=cfg.to_dict(), out=str(out), resume=resume, init_from=str(init_from)))
    distributed.together(group, distributed.check_batch, cfg.batch_size, group)
    source = distributed.together(group, starting_point, out, cfg, resume, init_from, writer)
    start = distributed.together(group, load_start, cfg)
    keep_freed_buffers()
    tokenizer = start.tokenizer if start is not None else None
    first = distributed.together(group, lambda: load_data(cfg, tokenizer) if writer else None)
    dataset = distributed.together(group, lambda: first if first is not None else load_data(cfg, tokenizer))
    if start is not None:  # the slow read of its weights, after every check (a rank that fails stops them all)
        distributed.together(group, lambda: mx.eval(start.model.parameters()))
    state = setup(cfg, dataset, group, start)
    if writer:  # the run is accepted: its data and model are there
        out.mkdir(parents=True, exist_ok=True)
    if source is not None:
        distributed.together(group, start_from, state, source, out)
        if resume:  # a branch (--init-from) is a new run: its clock starts at 0 (so does a checkpoint's without one)
            state.trained_seconds = checkpoint.read_meta(source).get("train_seconds", 0.0)
    if writer:
        atomic.write_text(out / "config.yaml", yaml.safe_dump(cfg.to_dict(), sort_keys=False))
    return state, dataset, start


def run(cfg: config.TrainConfig, out: Path, resume: bool = False, init_from: Optional[Path] = None,
        show_progress: bool = True, alone: bool = False) -> Optional[dict]:
    """Train `cfg` in `out`; under `mlx.launch`, data-parallel over the launched ranks (see
    mlx_qat.distributed) unless `alone`. Returns the summary (None on ranks other than 0)."""
    out, init_from = Path(out), Path(init_from) if init_from else None
    group = distributed.world(alone)
    writer = distributed.is_writer(group)
    if resume and (out / SUMMARY).exists():
        if writer:
            print(f"the run in {out} is finished; nothing to do (its summary is {out / SUMMARY})", file=sys.stderr)
        return json.loads((out / SUMMARY).read_text()) if writer else None
    mx.reset_peak_memory()  # summary.json reports this run's peak
    made = made_for(out) if writer else None
    try:
        state, dataset, start = begin(cfg, out, resume, init_from, group)
    except BaseException:
        if made is not None:  # refused before its first step: it leaves nothing behind
            shutil.rmtree(made, ignore_errors=True)
        raise

    val_batches = partial(data.eval_batches, dataset.val, cfg.batch_size, cfg.seq_len, cfg.eval_batches)
    validate = lambda model: evaluate(model, val_batches(), group)  # noqa: E731
    monitor = Monitor(out, cfg, state.plan, validate, state.step, show_progress, writer, state.trained_seconds)
    resumed_at = state.step if resume else None
    try:
        train_range(state, state.plan.fp_steps, dataset, monitor)  # full precision
        if state.plan.qat_steps and state.phase == "fp":  # the switch
            if state.step > 0:
                monitor.end_of_phase(state, validate(state.model))
            state.step_fn = switch_to_qat(state.model, state.optimizer, cfg, group=group, loss=state.loss)
            state.phase = "qat"
        train_range(state, state.plan.total_steps, dataset, monitor)  # quantization-aware
    finally:
        monitor.close()
    seconds = monitor.segment_seconds()
    segment = None if resumed_at is None else (resumed_at, seconds)
    return finish(state, out, dataset, monitor, val_batches, monitor.seconds_before + seconds, start, segment)


def run_to_end(cfg: config.TrainConfig, out: Path, init_from: Optional[Path] = None, show_progress: bool = True,
               alone: bool = False) -> dict:
    """Train `cfg` in `out` to the end, whatever a killed process left there: a finished run's
    summary is returned, a checkpointed one resumed (from its newest checkpoint that reads back
    whole), one killed before its first checkpoint, or whose every checkpoint is corrupt, started again."""
    if (out / SUMMARY).exists():
        return json.loads((out / SUMMARY).read_text())
    corrupt = []
    if checkpoint.find(out, lambda _, e: corrupt.append(e)) is not None:
        return run(cfg, out, resume=True, show_progress=show_progress, alone=alone)
    if corrupt:
        print(f"warning: no checkpoint in {out} reads back whole ({corrupt[0]}); starting the run again", file=sys.stderr)
    shutil.rmtree(out, ignore_errors=True)  # nothing to keep
    return run(cfg, out, init_from=init_from, show_progress=show_progress, alone=alone)


def init_source(path: Optional[Path], overrides: dict) -> Optional[Path]:
    """What --init-from PATH names: a checkpoint or snapshot (it has meta.json), returned to
    branch from; or a pretrained model, which becomes the config's `pretrained` (None returned)."""
    if path is None or (path / "meta.json").is_file():
        return path
    if not path.exists():
        raise TrainingError(f"--init-from {path} does not exist; pass a checkpoint or snapshot, a model directory "
                            "or a .gguf file")
    if not pretrained.is_model(path) and not (path / checkpoint.NAME / "meta.json").is_file():
        raise TrainingError(f"--init-from {path} is neither a checkpoint or snapshot (no meta.json), a model directory "
                            "(no config.json) nor a .gguf file; pass one of those")
    if overrides.get("pretrained", str(path)) != str(path):
        raise TrainingError(f"--init-from {path} and --pretrained {overrides['pretrained']} name two starting models; pass one")
    overrides["pretrained"] = str(path)  # a run dir lands here too: pretrained.load says to pass its checkpoint
    return None


def main(argv: Optional[List[str]] = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m mlx_qat.train", description=__doc__)
    parser.add_argument("--config", type=Path, help="YAML config (see configs/); with --resume, default: the run's config.yaml")
    parser.add_argument("--out", type=Path, required=True, help="run directory")
    parser.add_argument("--resume", action="store_true", help="continue the run in --out from its last checkpoint")
    parser.add_argument("--init-from", type=Path, metavar="PATH",
                        help="start this new run from a snapshot or checkpoint of another run (a directory with "
                             "meta.json), or from a pretrained model: an mlx-lm / Hugging Face directory or a llama "
                             ".gguf (sets `pretrained`; the model's own architecture and tokenizer are used)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar or progress lines")
    config.add_arguments(parser)
    args, rest = parser.parse_known_args(argv)
    try:
        config_path = args.config
        if args.resume and config_path is None:
            config_path = args.out / "config.yaml"
            if not config_path.exists():
                raise TrainingError(f"{args.out} holds no run to resume (no config.yaml); drop --resume to start one there")
        overrides = config.parse_overrides(rest)
        init_from = args.init_from if args.resume else init_source(args.init_from, overrides)
        cfg = config.load(config_path, overrides)
        summary = run(cfg, args.out, resume=args.resume, init_from=init_from, show_progress=not args.no_progress)
    except (ValueError, FileNotFoundError, TrainingError, data.DataError, checkpoint.CheckpointError,
            distributed.RankError) as e:
        parser.exit(2, f"error: {e}\n")
    if summary is not None:
        print(report.format_summary(summary))


if __name__ == "__main__":
    main()
