"""Token-based learning-rate schedules for FP -> QAT runs (DESIGN §7).

WSD (warmup-stable-decay): linear warmup to the peak, constant, linear decay to ~0.

- separate: FP warmup -> stable -> FP cooldown; then QAT re-warmup -> stable -> QAT cooldown.
- fused (cooldown & QAT fusion): FP warmup -> stable, with no FP cooldown; QAT starts at the
  peak where the cooldown would have begun and carries the decay across the whole QAT phase.

Warmup and cooldown are fractions of the phase they belong to.
"""

from dataclasses import dataclass

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

    def __call__(self, tokens: float) -> float:
        """The learning rate after `tokens` tokens of the whole run."""
        fused = self.kind == "fused"
        final = self.final_lr_fraction
        if tokens < self.fp_tokens or self.qat_tokens == 0:
            cooldown = 0 if fused and self.qat_tokens else self.cooldown * self.fp_tokens
            return wsd(tokens, self.fp_tokens, self.peak_lr, self.warmup * self.fp_tokens, cooldown, final)
        t = tokens - self.fp_tokens
        if fused:
            warmup = self.warmup * self.qat_tokens if self.fp_tokens == 0 else 0
            return wsd(t, self.qat_tokens, self.peak_lr, warmup, self.qat_tokens - warmup, final)
        return wsd(t, self.qat_tokens, self.peak_lr, self.warmup * self.qat_tokens, self.cooldown * self.qat_tokens, final)
