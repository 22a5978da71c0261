"""Watching a run: its metrics records, the progress bar or lines, the validations they carry,
and mlx-lm's reporting callbacks (`report_to`: wandb, swanlab), which get the same figures.
Saving the run and the NaN guard are mlx_qat.checkpointer's. In a multi-process run every rank
validates (a collective), and only the writer (rank 0) records, shows or reports anything."""

import sys
import time
from pathlib import Path
from typing import Callable, List, Optional

import mlx.core as mx
from mlx_lm.tuner import callbacks
from tqdm import tqdm

from . import report


class Clock:
    """The run's training time: its earlier processes' (to the checkpoint this one resumed
    from) and this process's, from its first step until `stop`."""

    def __init__(self, before: float = 0.0):
        self.before, self.started, self.stopped = before, time.perf_counter(), None

    def segment(self) -> float:
        """Seconds this process has trained."""
        return (self.stopped or time.perf_counter()) - self.started

    def total(self) -> float:
        """Seconds of training in the run so far, its earlier processes' included."""
        return self.before + self.segment()

    def stop(self) -> None:
        self.stopped = time.perf_counter()


class Progress:
    """A tqdm bar on a terminal; with stderr redirected, a plain line per report instead of
    the bar's carriage-return updates."""

    def __init__(self, total: int, initial: int, enabled: bool):
        on_terminal = enabled and sys.stderr.isatty()
        self.bar = tqdm(total=total, initial=initial, unit="step", dynamic_ncols=True) if on_terminal else None
        self.plain = enabled and not on_terminal

    def report(self, record: dict) -> None:
        fields = dict(phase=record["phase"], tokens=f"{record['tokens']:,}", loss=f"{record['loss']:.3f}",
                      lr=f"{record['lr']:.2e}", tok_s=f"{record['tokens_per_s']:.0f}")
        if "val_loss" in record:
            fields["val"] = f"{record['val_loss']:.3f}"
        if self.bar is not None:
            self.bar.set_postfix(fields)
        elif self.plain:
            print(f"step {record['step']}: " + " ".join(f"{k}={v}" for k, v in fields.items()), file=sys.stderr, flush=True)

    def step(self) -> None:
        if self.bar is not None:
            self.bar.update(1)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def reporting_names(report_to: Optional[str]) -> List[str]:
    """The services of `report_to`, read as mlx-lm reads it."""
    return [name.strip().lower() for name in (report_to or "").split(",") if name.strip()]


def missing_reporting(report_to: Optional[str]) -> List[str]:
    """The services of `report_to` whose package is not installed."""
    return [name for name in reporting_names(report_to) if getattr(callbacks, name, None) is None]


def reporting_callback(cfg, out: Path) -> Optional[callbacks.TrainingCallback]:
    """mlx-lm's callbacks for the config's `report_to` under `project_name`, their files under
    `out`; None when it names none."""
    return callbacks.get_reporting_callbacks(cfg.report_to, cfg.project_name, log_dir=str(out), config=cfg.to_dict())


def finish_reporting(report_to: Optional[str]) -> None:
    """End the services' runs: mlx-lm's callbacks leave theirs open, and a sweep trains many
    runs in one process, each of which would otherwise log into the first one's."""
    for name in reporting_names(report_to):
        service = getattr(callbacks, name, None)  # the module mlx-lm logs through (wandb, swanlab)
        if service is not None:
            service.finish()


class Monitor:
    """What the loop reports through: `due`, `report`, `end_of_phase`, `step_done`."""

    def __init__(self, out: Path, cfg, plan, validate: Callable[[object], float], start_step: int, show_progress: bool,
                 writer: bool = True, callback: Optional[callbacks.TrainingCallback] = None):
        """`validate(model)` is the validation loss (a collective: every rank calls it);
        `callback`: the writer's reporting callbacks (see `reporting_callback`), None elsewhere."""
        self.cfg, self.plan, self.validate, self.writer = cfg, plan, validate, writer
        self.metrics = report.Metrics(Path(out) / report.METRICS)
        self.progress = Progress(plan.total_steps, start_step, show_progress and writer)
        self.callback = callback
        # the rate reported is over the steps since the last report
        self.window_start, self.window_step = time.perf_counter(), start_step

    def due(self, step: int) -> bool:
        """Whether step `step` is reported: every report_every steps, and the last."""
        return step % self.cfg.report_every == 0 or step == self.plan.total_steps

    def report(self, state, loss: float, lr: float) -> None:
        """The record of the step just done, with a validation every eval_every steps (but at
        the last step, which the run's end validates)."""
        done, tokens_per_step = state.step, self.plan.tokens_per_step
        elapsed = time.perf_counter() - self.window_start
        record = dict(step=done, tokens=done * tokens_per_step, phase=state.phase, loss=loss, lr=lr,
                      tokens_per_s=(done - self.window_step) * tokens_per_step / elapsed)
        self.report_train(record)
        if done % self.cfg.eval_every == 0 and done != self.plan.total_steps:
            record["val_loss"] = self.val_loss(state)
        self.log(**record)
        self.progress.report(record)
        self.window_start, self.window_step = time.perf_counter(), done

    def end_of_phase(self, state) -> float:
        """Validate the model at the end of its phase, record it, and return the loss."""
        val_loss = self.val_loss(state)
        self.log(step=state.step, tokens=state.step * self.plan.tokens_per_step, phase=state.phase,
                 val_loss=val_loss, event=f"end_{state.phase}")
        return val_loss

    def step_done(self) -> None:
        self.progress.step()

    def log(self, **record) -> None:
        if self.writer:
            self.metrics.log(**record)

    def records(self) -> List[dict]:
        return self.metrics.read()

    def val_loss(self, state) -> float:
        """The model's validation loss now, sent to the reporting callbacks too."""
        started = time.perf_counter()
        val_loss = self.validate(state.model)
        if self.callback is not None:
            self.callback.on_val_loss_report(dict(iteration=state.step, val_loss=val_loss,
                                                  val_time=time.perf_counter() - started))
        return val_loss

    def report_train(self, record: dict) -> None:
        if self.callback is not None:  # the keys mlx-lm's own trainer reports, so that runs of both chart together
            self.callback.on_train_loss_report(dict(
                iteration=record["step"], train_loss=record["loss"], learning_rate=record["lr"],
                tokens_per_second=record["tokens_per_s"], trained_tokens=record["tokens"],
                peak_memory=mx.get_peak_memory() / 1e9))

    def close_progress(self) -> None:
        self.progress.close()

    def close(self) -> None:
        self.progress.close()
        if self.callback is not None:
            finish_reporting(self.cfg.report_to)
