"""Train a transformer in full precision, then quantization-aware, in one process; export it.

    python -m mlx_qat.train --config configs/tiny.yaml --out runs/tiny [--key value ...]
    python -m mlx_qat.train --out runs/tiny --resume
    python -m mlx_qat.train --config configs/tiny.yaml --out runs/branch --init-from runs/tiny/snapshots/409600

A run reads as its stages (`run`): setup (where it starts, its data, model and step);
FP steps up to D_fp; the switch (the model converted in place to its QAT form, α initialised from
the trained weights, the step built again); QAT steps up to D_total; finish (validation, export,
the export's validation through mlx_lm.load, summary, plot). The loop reports through the run's
monitor (metrics, progress, `report_to`) and saves through its checkpointer, which also stops a
run whose loss is no longer finite.
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
import shutil
import sys
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Callable, List, Optional, Tuple

import mlx.core as mx
import mlx.nn as nn
import mlx.optimizers as optim
import mlx_lm
import yaml

from . import atomic, baselines, checkpoint, config, data, distributed, export, lowrank, pretrained, report
from . import model as models
from .checkpointer import Checkpointer, DivergenceError
from .evaluate import evaluate, loss_fn
from .layers import quant_specs, to_qat
from .monitor import Clock, Monitor, reporting_callback
from .schedule import RunPlan, Schedule, make_schedule, plan_run
from .start import (Start, StartError, branch_step, config_changes, config_file, leave_nothing_if_refused,
                    parse_init_from)
from .start import resolve as resolve_start
from .step import build_step, draws_random_numbers, forget_moments, keep_freed_buffers, make_loss, step_seed

ADAPTER = "adapter"  # a low-rank run's adapter alone, in mlx-lm's layout


@dataclass
class RunState:
    """What the loop advances: the model, its optimizer and step, the step count."""

    cfg: config.TrainConfig
    plan: RunPlan
    schedule: Schedule
    model: nn.Module
    optimizer: optim.MultiOptimizer
    step_fn: Callable
    group: mx.distributed.Group
    loss: Callable = loss_fn
    base: Optional[pretrained.Pretrained] = None  # the pretrained model the run starts from, if any
    step: int = 0
    phase: str = "fp"


# ---------------------------------------------------------------- setup


def setup(cfg: config.TrainConfig, out: Path, start: Start, group) -> Tuple[RunState, data.TokenData]:
    """Everything before the first step, once `start` is resolved: the pretrained model if the
    run starts from one (checked, its weights unread, so that its refusals and the data's come
    before the slow read), the data, the model and its step, and the checkpoint taken over."""
    writer = distributed.is_writer(group)
    base = distributed.together(group, load_base, start, cfg)
    keep_freed_buffers()
    dataset = load_dataset(cfg, base, group)
    if base is not None:  # the slow read of its weights, after every check (a rank that fails stops them all)
        distributed.together(group, lambda: mx.eval(base.model.parameters()))
    state = build(cfg, dataset, group, base)
    if writer:  # the run is accepted: its data and model are there
        out.mkdir(parents=True, exist_ok=True)
    if start.checkpoint is not None:
        distributed.together(group, take_over, state, start.checkpoint, out)
    if writer:
        atomic.write_text(out / report.CONFIG, yaml.safe_dump(cfg.to_dict(), sort_keys=False))
    return state, dataset


def load_base(start: Start, cfg: config.TrainConfig) -> Optional[pretrained.Pretrained]:
    """The pretrained model the run starts from (None: none), checked, its weights left unread:
    in float32 (the master weights full QAT trains), or for low-rank QAT in the checkpoint's own
    16-bit dtype (the frozen base), whose adapted modules are checked here, before the data."""
    if start.pretrained is None:
        return None
    low_rank = cfg.fine_tune_type == "lora"
    base = pretrained.load(start.pretrained, dtype=None if low_rank else mx.float32, lazy=True,
                           packed=cfg.quantized_base == "packed")
    if low_rank:
        lowrank.lowrank_paths(base.model, cfg.lora_parameters["keys"], cfg.num_layers)
    return base


def load_dataset(cfg: config.TrainConfig, base: Optional[pretrained.Pretrained], group) -> data.TokenData:
    """The run's data, tokenized by the pretrained model's tokenizer if it starts from one; rank
    0 first, so that ranks sharing a cache prepare it once."""
    tokenizer = base.tokenizer if base is not None else None
    first = distributed.together(group, lambda: data.load(cfg, tokenizer) if distributed.is_writer(group) else None)
    return distributed.together(group, lambda: first if first is not None else data.load(cfg, tokenizer))


def build(cfg: config.TrainConfig, dataset: data.TokenData, group, base: Optional[pretrained.Pretrained]) -> RunState:
    """The run's model (the pretrained one, or a fresh one of `cfg.model`), plan, schedule, loss and step."""
    model = base.model if base is not None else models.build(models.model_args(cfg.model, dataset.vocab_size), cfg.seed)
    plan = plan_run(cfg, models.num_params(model))  # before freezing: N counts every weight
    schedule = make_schedule(cfg, plan)
    loss = make_loss(cfg, model)
    optimizer, step_fn = build_step(model, cfg, group=group, loss=loss)
    return RunState(cfg, plan, schedule, model, optimizer, step_fn, group, loss, base)


def take_over(state: RunState, path: Path, out: Path) -> None:
    """Continue from a checkpoint or snapshot: its weights, α, optimizer state, token count and
    the metrics that led there."""
    meta = checkpoint.read_meta(path)
    step = branch_step(path, meta, state.cfg, state.plan, state.model)
    if meta["phase"] == "qat":
        switch_to_qat(state, checkpoint.specs(meta))
    checkpoint.restore(path, state.model, state.optimizer)
    state.step = step
    if distributed.is_writer(state.group):
        metrics = path / report.METRICS
        atomic.write_text(out / report.METRICS, metrics.read_text() if metrics.exists() else "")


# ---------------------------------------------------------------- the switch, the loop, the finish


def switch_to_qat(state: RunState, specs=None) -> None:
    """The one FP -> QAT moment, wherever a model enters its QAT form (at D_fp, at step 0, or
    to restore a QAT checkpoint): QAT layers swapped in (α from the weights the model holds now;
    `specs` default to the config's policy), the memory options applied to them (they are new
    modules), the weights' Adam moments forgotten unless kept, and the step built again.

    With fine_tune_type: lora the form is low-rank QAT (`lowrank.to_lowrank_qat`: the adapted
    modules' lora_a drawn from the run's seed, every other weight frozen, α learning), and no
    moment is kept: the trainables are new, and the base's moments would only take memory."""
    cfg = state.cfg
    low_rank = cfg.fine_tune_type == "lora"
    specs = specs if specs is not None else quant_specs(state.model, cfg.spec, cfg.embedding_spec, packed=low_rank)
    if low_rank:
        mx.random.seed(cfg.seed)  # lora_a's initialisation: the same in every run of this config
        lowrank.to_lowrank_qat(state.model, specs, **cfg.lora_arguments)
        state.model.train()  # mlx_lm.load leaves a model in eval mode; the adapters' dropout trains
    else:
        to_qat(state.model, specs)
    if low_rank or not cfg.keep_optimizer_state:  # the step count and learning rate stay
        forget_moments(state.optimizer)
    _, state.step_fn = build_step(state.model, cfg, state.optimizer, state.group, state.loss)
    state.phase = "qat"


def train_range(state: RunState, end: int, dataset: data.TokenData, monitor: Monitor, checkpoints: Checkpointer) -> None:
    """Steps state.step .. end − 1 at the schedule's learning rates; knows nothing of phases.
    The loss is read back only at steps that report or save it, so the steps run ahead of it."""
    cfg, tokens_per_step = state.cfg, state.plan.tokens_per_step
    draws = draws_random_numbers(cfg)
    for step in range(state.step, end):
        lr = state.schedule.at_step(step, tokens_per_step)
        state.optimizer.learning_rate = lr
        if draws:  # from (seed, step), as the batch: a resumed run draws what it would have drawn
            mx.random.seed(step_seed(cfg.seed, step))
        batch = data.batch(dataset.train, cfg.batch_size, cfg.seq_len, cfg.seed, step)
        loss = state.step_fn(mx.array(distributed.rows(batch, state.group)))
        mx.async_eval(loss, state.model.state, state.optimizer.state)  # compute while the next batch is read
        state.step = step + 1
        reporting, saving = monitor.due(state.step), checkpoints.due(state.step)
        if reporting or saving:  # never report or keep a diverged model
            loss = checkpoints.check_finite(loss.item(), state.step)
        if reporting:
            monitor.report(state, loss, lr)
        if saving:
            checkpoints.save(state)
        monitor.step_done()


def save_adapter(model: nn.Module, path: Path) -> Path:
    """A low-rank run's adapter alone, as mlx-lm writes one (adapters.safetensors,
    adapter_config.json), replacing `path` whole."""
    with atomic.directory(path) as tmp:
        lowrank.save_adapter(model, tmp)
    return path


def finish(state: RunState, out: Path, dataset: data.TokenData, monitor: Monitor, val_batches: Callable, clock: Clock,
           resumed_at: Optional[int]) -> Optional[dict]:
    """Final validation and the peak memory of training; (on the writer) export and the
    export's validation through mlx_lm.load (a low-rank run: its adapter alone to <out>/adapter,
    then the model merged and exported as any QAT model); from a pretrained start, the baselines (on every
    rank: they validate together); then (on the writer) plot and summary. Other ranks return None.
    `resumed_at`: the step this process resumed the run at (None: it ran the whole run)."""
    cfg, plan, writer = state.cfg, state.plan, distributed.is_writer(state.group)
    final_loss = monitor.end_of_phase(state)
    peak_memory = mx.get_peak_memory()
    if writer:  # the run's own result first
        adapter = save_adapter(state.model, out / ADAPTER) if lowrank.lowrank_layers(state.model) else None
        exported = export.export_run(state.model, state.phase, out / "model", cfg, state.base, dataset.path,
                                     scales_dtype=cfg.export_scales, overwrite=True)  # a low-rank model merged
        exported_loss = evaluate(mlx_lm.load(str(exported.path))[0], val_batches())
    compared = {} if state.base is None else baselines.compare(cfg, dataset, val_batches, plan.total_steps, state.group)
    if not writer:
        return None

    records = monitor.records()
    report.plot(records, plan.fp_tokens if plan.qat_steps else None, out / "loss.png")
    segment = None if resumed_at is None else (resumed_at, clock.segment())
    summary = report.summary(plan, records, final_loss, exported_loss, exported, clock.total(), cfg, peak_memory, segment)
    summary.update(compared)
    if adapter is not None:
        summary.update(adapter=str(adapter), adapter_note=report.ADAPTER_NOTE)
    report.write_summary(out, summary)  # last: its presence marks the run finished
    shutil.rmtree(atomic.previous(out / checkpoint.NAME), ignore_errors=True)  # a finished run needs no fallback
    return summary


# ---------------------------------------------------------------- the run


def run(cfg: config.TrainConfig, out: Path, resume: bool = False, init_from: Optional[Path] = None,
        show_progress: bool = True, alone: bool = False) -> Optional[dict]:
    """Train `cfg` in `out`; under `mlx.launch`, data-parallel over the launched ranks (see
    mlx_qat.distributed) unless `alone`. Returns the summary (None on ranks other than 0)."""
    out, init_from = Path(out), Path(init_from) if init_from else None
    group = distributed.world(alone)
    writer = distributed.is_writer(group)
    finished = report.read_summary(out) if resume else None
    if finished is not None:
        if writer:
            print(f"the run in {out} is finished; nothing to do (its summary is {out / report.SUMMARY})", file=sys.stderr)
        return finished if writer else None
    mx.reset_peak_memory()  # summary.json reports this run's peak
    with leave_nothing_if_refused(out, writer):
        start = resolve_start(cfg, out, resume, init_from, group)
        state, dataset = setup(cfg, out, start, group)

    val_batches = partial(data.eval_batches, dataset.val, cfg.batch_size, cfg.seq_len, cfg.eval_batches)
    validate = lambda model: evaluate(model, val_batches(), group)  # noqa: E731
    monitor = Monitor(out, cfg, state.plan, validate, state.step, show_progress, writer,
                      reporting_callback(cfg, out) if writer else None)  # rank 0 alone reports
    clock = Clock(start.trained_seconds)
    checkpoints = Checkpointer(out, cfg, state.plan, clock, state.step, writer)
    resumed_at = state.step if start.resumed else None
    try:
        train_range(state, state.plan.fp_steps, dataset, monitor, checkpoints)  # full precision
        if state.plan.qat_steps and state.phase == "fp":  # the switch
            if state.step > 0:
                monitor.end_of_phase(state)
            switch_to_qat(state)
        train_range(state, state.plan.total_steps, dataset, monitor, checkpoints)  # quantization-aware
        clock.stop()
        monitor.close_progress()
        return finish(state, out, dataset, monitor, val_batches, clock, resumed_at)
    finally:
        monitor.close()


def run_to_end(cfg: config.TrainConfig, out: Path, init_from: Optional[Path] = None, show_progress: bool = True,
               alone: bool = False) -> dict:
    """Train `cfg` in `out` to the end, whatever a killed process left there: a finished run's
    summary is returned, a checkpointed one resumed (from its newest checkpoint that reads back
    whole), one killed before its first checkpoint, or whose every checkpoint is corrupt, started again."""
    out = Path(out)
    refuse_another_config(cfg, out)
    finished = report.read_summary(out)
    if finished is not None:
        return finished
    corrupt = []
    if checkpoint.find(out, lambda _, e: corrupt.append(e)) is not None:
        return run(cfg, out, resume=True, show_progress=show_progress, alone=alone)
    if corrupt:
        aside = atomic.set_aside(out)
        print(f"warning: no checkpoint in {out} reads back whole ({corrupt[0]}); starting the run again (the old "
              f"directory is kept as {aside})", file=sys.stderr)
    shutil.rmtree(out, ignore_errors=True)  # nothing to keep
    return run(cfg, out, init_from=init_from, show_progress=show_progress, alone=alone)


def refuse_another_config(cfg: config.TrainConfig, out: Path) -> None:
    """A run directory left by another config is not this run's to finish or return (the keys a
    resume may change aside, as for --resume)."""
    path = out / report.CONFIG
    if not path.exists():
        return
    changed = config_changes(cfg, yaml.safe_load(path.read_text()))
    if changed:
        k, (there, here) = next(iter(changed.items()))
        raise ValueError(f"{out} holds a run of another config ({k}: {there!r} there, {here!r} here); "
                         "remove it or choose another directory")


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
        config_path = config_file(args.config, args.out, args.resume)
        overrides = config.parse_overrides(rest)
        init_from = args.init_from if args.resume else parse_init_from(args.init_from, overrides)
        cfg = config.load(config_path, overrides)
        summary = run(cfg, args.out, resume=args.resume, init_from=init_from, show_progress=not args.no_progress)
    except (ValueError, FileNotFoundError, StartError, DivergenceError, data.DataError, checkpoint.CheckpointError,
            distributed.RankError) as e:
        parser.exit(2, f"error: {e}\n")
    if summary is not None:
        print(report.format_summary(summary))


if __name__ == "__main__":
    main()
