"""Everything a run does besides training, in one place: metrics, progress, the cadence of
validation, checkpoints and snapshots, and the NaN guard. The training loop calls `after_step`
and knows nothing else. In a multi-process run every rank validates (a collective) and checks
the loss (already reduced), and only the writer (rank 0) records, shows or saves anything."""

import math
import sys
import time
from pathlib import Path
from typing import Callable

from tqdm import tqdm

from . import checkpoint, report


class TrainingError(RuntimeError):
    """A run that cannot go on, with what to do about it."""


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


class Monitor:
    def __init__(self, out: Path, cfg, plan, validate: Callable[[object], float], start_step: int, show_progress: bool,
                 writer: bool = True, seconds_before: float = 0.0):
        """`seconds_before`: the run's training time before this process, up to the checkpoint it
        resumed from; each checkpoint records the total, so that the summary reports the run's."""
        self.out, self.cfg, self.plan, self.validate, self.writer = Path(out), cfg, plan, validate, writer
        self.metrics = report.Metrics(self.out / "metrics.jsonl")
        self.progress = Progress(plan.total_steps, start_step, show_progress and writer)
        self.last_good = start_step
        self.seconds_before, self.started = seconds_before, time.perf_counter()
        self.window_start, self.window_tokens = time.perf_counter(), 0

    def segment_seconds(self) -> float:
        """Seconds since this process began training."""
        return time.perf_counter() - self.started

    def train_seconds(self) -> float:
        """Seconds of training in the run so far, its earlier processes' included."""
        return self.seconds_before + self.segment_seconds()

    def after_step(self, state, loss, lr: float) -> None:
        """Called after every step with the step's (possibly unevaluated) loss."""
        cfg, plan, done = self.cfg, self.plan, state.step
        tokens = done * plan.tokens_per_step
        self.window_tokens += plan.tokens_per_step
        report_now = done % cfg.report_every == 0 or done == plan.total_steps
        snapshot_now = tokens in cfg.snapshot_at
        # the last step too: a finished run's checkpoint is the model it exported, and a run killed
        # while it finishes resumes there
        checkpoint_now = done % cfg.checkpoint_every == 0 or done == plan.total_steps
        if report_now or snapshot_now or checkpoint_now:  # never keep a diverged model
            loss = self.finite(loss.item(), done)
        if report_now:
            elapsed = time.perf_counter() - self.window_start
            record = dict(step=done, tokens=tokens, phase=state.phase, loss=loss, lr=lr,
                          tokens_per_s=self.window_tokens / elapsed)
            if done % cfg.eval_every == 0 and done != plan.total_steps:
                record["val_loss"] = self.validate(state.model)
            self.log(**record)
            self.progress.report(record)
            self.window_start, self.window_tokens = time.perf_counter(), 0
        if snapshot_now:
            self.save(state, checkpoint.snapshot_path(self.out, tokens))
        if checkpoint_now:
            self.save(state, self.out / checkpoint.NAME, keep_previous=True)
            self.last_good = done
        self.progress.step()

    def log(self, **record) -> None:
        if self.writer:
            self.metrics.log(**record)

    def end_of_phase(self, state, val_loss: float) -> None:
        self.log(step=state.step, tokens=state.step * self.plan.tokens_per_step, phase=state.phase,
                         val_loss=val_loss, event=f"end_{state.phase}")

    def save(self, state, path: Path, keep_previous: bool = False) -> None:
        if not self.writer:
            return
        meta = dict(step=state.step, tokens=state.step * self.plan.tokens_per_step, phase=state.phase,
                    config=self.cfg.to_dict(), train_seconds=self.train_seconds())
        checkpoint.save(path, state.model, state.optimizer, meta, self.metrics.path, keep_previous)

    def finite(self, loss: float, step: int) -> float:
        if not math.isfinite(loss):
            self.close()
            raise TrainingError(
                f"the loss became {loss} at step {step}; the last good checkpoint (step {self.last_good}) is kept in "
                f"{self.out}. Lower learning_rate or grad_clip, then --resume or start afresh"
            )
        return loss

    def close(self) -> None:
        self.progress.close()
