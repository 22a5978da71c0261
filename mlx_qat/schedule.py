"""A run's plan (how its tokens split into FP and QAT steps) and its learning-rate schedule.

WSD (warmup-stable-decay): linear warmup to the peak, constant, linear decay to the final rate.

- separate: FP warmup -> stable -> FP cooldown; then QAT re-warmup -> stable -> QAT cooldown.
- fused (cooldown & QAT fusion): FP warmup -> stable, with no FP cooldown; QAT starts at the
  peak where the cooldown would have begun and carries the decay across the whole QAT phase.

Each phase has its own warmup and cooldown. The FP phase's may be token counts
(`warmup_tokens`, `cooldown_tokens`, which win over the fractions `warmup`, `cooldown`): then
runs with different D_fp share their FP learning rates exactly up to where their schedules part,
which is what lets a sweep train one FP trunk for all of them. The QAT phase's (`qat_warmup`,
`qat_cooldown`, or `qat_warmup_tokens`, `qat_cooldown_tokens`) are its own, so that as fractions
every QAT phase of a comparison has the same shape whatever its length.

Every phase is whole: it reaches its peak, and a phase that cools down ends at the final rate.
A phase too short to hold its warmup and cooldown is refused, never cut short.
"""

from dataclasses import dataclass
from typing import Optional, Tuple

from . import scaling_law

SCHEDULES = ("separate", "fused")


class ScheduleError(ValueError):
    """A schedule whose phases cannot be whole, with what to change."""


def wsd(t: float, length: float, peak: float, warmup: float, cooldown: float, final: float) -> float:
    """LR at token t of a phase of `length` tokens with `warmup`/`cooldown` tokens at its ends."""
    if warmup > 0 and t < warmup:
        return peak * t / warmup
    decay_start = length - cooldown
    if cooldown > 0 and t > decay_start:
        progress = min(1.0, (t - decay_start) / cooldown)
        return peak * (1 - (1 - final) * progress)
    return peak


@dataclass(frozen=True)
class Shape:
    """The warmup and cooldown of a phase: fractions of its length, or token counts (which win)."""

    warmup: float = 0.05
    cooldown: float = 0.2
    warmup_tokens: Optional[int] = None
    cooldown_tokens: Optional[int] = None

    def ends(self, length: int) -> Tuple[float, float]:
        """(warmup, cooldown) in tokens for a phase of `length` tokens."""
        warmup = self.warmup * length if self.warmup_tokens is None else self.warmup_tokens
        cooldown = self.cooldown * length if self.cooldown_tokens is None else self.cooldown_tokens
        return warmup, cooldown


@dataclass(frozen=True)
class Schedule:
    peak_lr: float
    fp_tokens: int
    qat_tokens: int
    kind: str = "separate"
    fp: Shape = Shape()
    qat: Shape = Shape()
    final_lr_fraction: float = 0.0

    def __post_init__(self):
        if self.kind not in SCHEDULES:
            raise ScheduleError(f"schedule={self.kind!r}; use one of {', '.join(SCHEDULES)}")
        for name, shape in (("fp", self.fp), ("qat", self.qat)):
            prefix = "" if name == "fp" else "qat_"
            for end in ("warmup", "cooldown"):
                if not 0 <= getattr(shape, end) <= 1:
                    raise ScheduleError(f"{prefix}{end}={getattr(shape, end)} must be a fraction of its phase, in [0, 1]")
        if self.fp_tokens + self.qat_tokens <= 0:
            raise ScheduleError("a run needs at least one step of tokens; raise total_tokens")
        for phase, start, length, warmup, cooldown in self.phases():
            if warmup + cooldown > length * (1 + 1e-9):  # fractions that sum to 1 may round above it
                raise ScheduleError(self._too_short(phase, length, warmup, cooldown))

    def _too_short(self, phase: str, length: int, warmup: float, cooldown: float) -> str:
        prefix = "" if phase == "FP" else "qat_"
        ends = f"{prefix}warmup {warmup:,.0f} + {prefix}cooldown {cooldown:,.0f} tokens"
        longer = "qat_fraction lower" if phase == "FP" else "qat_fraction higher"
        return (f"the {phase} phase ({length:,} tokens) is too short for its {ends}; make them shorter, "
                f"total_tokens larger or {longer}")

    def phases(self):
        """(name, first token, length, warmup, cooldown) of each phase the run has, in order."""
        fused = self.kind == "fused"
        if self.fp_tokens:
            warmup, cooldown = self.fp.ends(self.fp_tokens)
            if fused and self.qat_tokens:
                cooldown = 0  # QAT carries the decay
            yield "FP", 0, self.fp_tokens, warmup, cooldown
        if self.qat_tokens:
            warmup, cooldown = self.qat.ends(self.qat_tokens)
            if fused:  # at the peak, decaying over the whole phase (a warmup only when there was no FP phase)
                warmup = warmup if self.fp_tokens == 0 else 0
                cooldown = self.qat_tokens - warmup
            yield "QAT", self.fp_tokens, self.qat_tokens, warmup, cooldown

    def __call__(self, tokens: float) -> float:
        """The learning rate after `tokens` tokens of the whole run (past its end: the last phase's end)."""
        for _, start, length, warmup, cooldown in self.phases():
            if tokens < start + length:
                break
        return wsd(tokens - start, length, self.peak_lr, warmup, cooldown, self.final_lr_fraction)

    def at_step(self, step: int, tokens_per_step: int) -> float:
        """The rate step `step` trains at: the schedule's at the middle of its tokens."""
        return self((step + 0.5) * tokens_per_step)


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
        return float(scaling_law.tokens_per_param_byte(self.total_tokens, self.n_params, self.bits))


def qat_steps(total_steps: int, fraction: float) -> int:
    """QAT steps of a run of `total_steps` at QAT fraction `fraction`: at least one if f > 0."""
    steps = round(total_steps * fraction)
    return 1 if fraction > 0 and steps == 0 else steps


def plan_run(cfg, n_params: int) -> RunPlan:
    """The split of `cfg` (a TrainConfig) for a model of `n_params`; `qat_fraction: auto` is the
    paper's predictor at the run's S_total."""
    total_steps = cfg.total_tokens // cfg.tokens_per_step
    f = cfg.qat_fraction
    if f == "auto":
        f = float(scaling_law.predicted_qat_fraction(scaling_law.tokens_per_param_byte(total_steps * cfg.tokens_per_step, n_params, cfg.bits)))
    qat = qat_steps(total_steps, f)
    return RunPlan(n_params, cfg.tokens_per_step, total_steps - qat, qat, cfg.bits)


def make_schedule(cfg, plan: RunPlan) -> Schedule:
    """The run's learning rate at every token, from its config and its FP/QAT split; a phase
    that cannot be whole raises ScheduleError."""
    fp = Shape(cfg.warmup, cfg.cooldown, cfg.warmup_tokens, cfg.cooldown_tokens)
    qat = Shape(cfg.qat_warmup, cfg.qat_cooldown, cfg.qat_warmup_tokens, cfg.qat_cooldown_tokens)
    return Schedule(cfg.learning_rate, plan.fp_tokens, plan.qat_tokens, cfg.schedule, fp, qat)
