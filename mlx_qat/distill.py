"""Distillation loss for QAT from a pretrained model: the student learns the frozen starting
model's next-token distribution, optionally mixed with the data's next tokens.

    teacher = pretrained.load(path).model        # a second, frozen copy of the starting model (full QAT)
    teacher = lowrank.teacher_of(student)        # or a low-rank QAT student's own frozen base
    loss_fn = make_distill_loss(teacher, kl_weight=1.0)
    loss = loss_fn(student, batch)               # the signature of evaluate.loss_fn
"""

from typing import Callable

import mlx.core as mx
import mlx.nn as nn


def make_distill_loss(teacher: Callable[[mx.array], mx.array],
                      kl_weight: float = 1.0) -> Callable[[nn.Module, mx.array], mx.array]:
    """loss_fn(model, batch) = kl_weight · KL(teacher ‖ model) + (1 − kl_weight) · CE, each the
    mean over the batch's next-token positions, in nats per token.

    KL(p ‖ q) = Σ_v p_v (log p_v − log q_v) = Σ_v p_v (t_v − s_v) − lse(t) + lse(s) for the
    teacher's logits t (under `mx.stop_gradient`) and the model's s, p = softmax(t); CE is
    lse(s) − s_target, the next-token cross-entropy of `evaluate.loss_fn`. All in float32.
    `teacher` maps inputs to logits: a frozen model, or `lowrank.teacher_of(student)`.
    """
    if isinstance(kl_weight, bool) or not isinstance(kl_weight, (int, float)) or not 0 <= kl_weight <= 1:
        raise ValueError(f"kl_weight={kl_weight!r}; use a number in [0, 1] (1: distillation only, 0: cross-entropy only)")

    def loss_fn(model: nn.Module, batch: mx.array) -> mx.array:
        if model is teacher:
            raise ValueError("the teacher is the model being trained: load the starting model a second time as the teacher")
        inputs, targets = batch[:, :-1], batch[:, 1:]
        s = model(inputs).astype(mx.float32)
        _, lse_s = softmax_and_lse(s)
        ce = (lse_s[..., 0] - mx.take_along_axis(s, targets[..., None], axis=-1)[..., 0]).mean()
        if kl_weight == 0:
            return ce  # no teacher forward
        t = mx.stop_gradient(teacher(inputs)).astype(mx.float32)
        if t.shape != s.shape:
            raise ValueError(f"teacher logits {t.shape} and model logits {s.shape} differ: distill from "
                             "the model's own starting point (same vocabulary)")
        p, lse_t = softmax_and_lse(t)
        kl = ((p * (t - s)).sum(axis=-1, keepdims=True) - lse_t + lse_s).mean()
        return kl if kl_weight == 1 else kl_weight * kl + (1 - kl_weight) * ce

    return loss_fn


def softmax_and_lse(logits: mx.array):
    """(softmax, logsumexp) over the last axis from one pass of exponentials. Written out rather
    than with mx.logsumexp so that the backward pass reuses the forward's exponentials instead of
    computing them again over the whole vocabulary (measured: benchmarks/bench_distill_loss.py)."""
    m = mx.stop_gradient(logits.max(axis=-1, keepdims=True))  # for range only: lse does not depend on it
    e = mx.exp(logits - m)
    z = e.sum(axis=-1, keepdims=True)
    return e / z, m + mx.log(z)
