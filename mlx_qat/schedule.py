"""Token-based learning-rate schedules for FP -> QAT runs.

WSD (warmup-stable-decay): linear warmup to the peak, constant, linear decay to ~0.

- separate: FP warmup -> stable -> FP cooldown; then QAT re-warmup -> stable -> QAT cooldown.
- fused (cooldown & QAT fusion): FP warmup -> stable, with no FP cooldown; QAT starts at the
  peak where the cooldown would have begun and carries the decay across the whole QAT phase.

Warmup and cooldown are tokens of the phase they belong to, given either as fractions of that
phase or as token counts (which win). Token counts make runs with different D_fp share their
FP learning rates exactly up to where their schedules part: the same warmup, then the peak.
A warmup longer than its phase is cut off by the phase's end (the slope stays that of the
whole warmup); a cooldown takes at most what the warmup leaves.
"""

from dataclasses import dataclass
from typing import Optional

SCHEDULES = ("separate", "fused")


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
class Schedule:
    peak_lr: float
    fp_tokens: int
    qat_tokens: int
    kind: str = "separate"
    warmup: float = 0.05
    cooldown: float = 0.2
    warmup_tokens: Optional[int] = None
    cooldown_tokens: Optional[int] = None
    final_lr_fraction: float = 0.0

    def __post_init__(self):
        if self.kind not in SCHEDULES:
            raise ValueError(f"schedule={self.kind!r}; use one of {', '.join(SCHEDULES)}")
        for name in ("warmup", "cooldown"):
            value = getattr(self, name)
            if not 0 <= value <= 1:
                raise ValueError(f"{name}={value} must be a fraction of its phase, in [0, 1]")
        if self.warmup + self.cooldown > 1:
            raise ValueError(f"warmup + cooldown = {self.warmup + self.cooldown} exceeds the phase")

    def phase_warmup(self, length: int) -> float:
        return self.warmup * length if self.warmup_tokens is None else self.warmup_tokens

    def phase_cooldown(self, length: int) -> float:
        tokens = self.cooldown * length if self.cooldown_tokens is None else self.cooldown_tokens
        return min(tokens, max(0, length - self.phase_warmup(length)))

    def __call__(self, tokens: float) -> float:
        """The learning rate after `tokens` tokens of the whole run."""
        fused, final = self.kind == "fused", self.final_lr_fraction
        if tokens < self.fp_tokens or self.qat_tokens == 0:
            length = self.fp_tokens
            cooldown = 0 if fused and self.qat_tokens else self.phase_cooldown(length)
            return wsd(tokens, length, self.peak_lr, self.phase_warmup(length), cooldown, final)
        t, length = tokens - self.fp_tokens, self.qat_tokens
        if fused:  # QAT goes on at the peak and decays over its whole phase
            warmup = self.phase_warmup(length) if self.fp_tokens == 0 else 0
            return wsd(t, length, self.peak_lr, warmup, length - warmup, final)
        return wsd(t, length, self.peak_lr, self.phase_warmup(length), self.phase_cooldown(length), final)
