"""When a run saves itself, and the NaN guard that keeps it from saving a diverged model.

The rolling checkpoint is saved every checkpoint_every steps and at the last step (a finished
run's checkpoint is the model it exported, and a run killed while it finishes resumes there);
a named snapshot at each token count of snapshot_at. The training loop calls `check_finite` on
the loss of every step it reports or saves, then `save`. Every rank checks the loss (already
reduced over the ranks), so all stop together; only the writer (rank 0) saves.
"""

import math
from pathlib import Path

from . import checkpoint, report


class DivergenceError(RuntimeError):
    """A run whose loss is no longer finite, with what to do about it."""


class Checkpointer:
    """What the loop saves through: `due`, `check_finite`, `save`."""

    def __init__(self, out: Path, cfg, plan, clock, start_step: int, writer: bool = True):
        """`clock` (monitor.Clock): the run's training time, which each checkpoint records, so
        that a resumed run's summary reports the whole run's."""
        self.out, self.cfg, self.plan, self.clock, self.writer = Path(out), cfg, plan, clock, writer
        self.last_good = start_step

    def due(self, step: int) -> bool:
        """Whether anything is saved after step `step`."""
        return self.checkpoint_due(step) or self.tokens(step) in self.cfg.snapshot_at

    def checkpoint_due(self, step: int) -> bool:
        return step % self.cfg.checkpoint_every == 0 or step == self.plan.total_steps

    def tokens(self, step: int) -> int:
        return step * self.plan.tokens_per_step

    def check_finite(self, loss: float, step: int) -> float:
        """The NaN guard: `loss` if finite, else the run stops, its last good checkpoint kept."""
        if not math.isfinite(loss):
            raise DivergenceError(
                f"the loss became {loss} at step {step}; the last good checkpoint (step {self.last_good}) is kept in "
                f"{self.out}. Lower learning_rate or grad_clip, then --resume or start afresh"
            )
        return loss

    def save(self, state) -> None:
        """The snapshot and/or the rolling checkpoint due after the step just done."""
        done = state.step
        if self.tokens(done) in self.cfg.snapshot_at:
            self.write(state, checkpoint.snapshot_path(self.out, self.tokens(done)))
        if self.checkpoint_due(done):
            self.write(state, self.out / checkpoint.NAME, keep_previous=True)
            self.last_good = done

    def write(self, state, path: Path, keep_previous: bool = False) -> None:
        if not self.writer:
            return
        meta = dict(step=state.step, tokens=self.tokens(state.step), phase=state.phase, config=self.cfg.to_dict(),
                    train_seconds=self.clock.total())
        checkpoint.save(path, state.model, state.optimizer, meta, self.out / report.METRICS, keep_previous)
