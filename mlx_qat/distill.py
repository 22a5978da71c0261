"""Distillation loss for QAT from a pretrained model: the student learns the frozen starting
model's next-token distribution, optionally mixed with the data's next tokens.

    teacher = pretrained.load(path).model        # a second, frozen copy of the starting model
    loss_fn = make_distill_loss(teacher, kl_weight=1.0)
    loss = loss_fn(student, batch)               # the signature of evaluate.loss_fn
"""

from typing import Callable

import mlx.core as mx
import mlx.nn as nn


def make_distill_loss(teacher: nn.Module, kl_weight: float = 1.0) -> Callable[[nn.Module, mx.array], mx.array]:
    """loss_fn(model, batch) = kl_weight · KL(teacher ‖ model) + (1 − kl_weight) · CE, each the
    mean over the batch's next-token positions, in nats per token.

    KL(p ‖ q) = Σ_v p_v (log p_v − log q_v), p from the teacher's logits under
    `mx.stop_gradient`, q from the model's; CE is the next-token cross-entropy of
    `evaluate.loss_fn`. Both in float32 from log-softmaxes through `mx.logsumexp`.
    """
    if isinstance(kl_weight, bool) or not isinstance(kl_weight, (int, float)) or not 0 <= kl_weight <= 1:
        raise ValueError(f"kl_weight={kl_weight!r}; use a number in [0, 1] (1: distillation only, 0: cross-entropy only)")

    def loss_fn(model: nn.Module, batch: mx.array) -> mx.array:
        if model is teacher:
            raise ValueError("the teacher is the model being trained: load the starting model a second time as the teacher")
        inputs, targets = batch[:, :-1], batch[:, 1:]
        log_q = log_softmax(model(inputs))
        ce = -mx.take_along_axis(log_q, targets[..., None], axis=-1).mean()
        if kl_weight == 0:
            return ce  # no teacher forward
        log_p = log_softmax(mx.stop_gradient(teacher(inputs)))
        if log_p.shape != log_q.shape:
            raise ValueError(f"teacher logits {log_p.shape} and model logits {log_q.shape} differ: distill from "
                             "the model's own starting point (same vocabulary)")
        kl = (mx.exp(log_p) * (log_p - log_q)).sum(axis=-1).mean()
        return kl if kl_weight == 1 else kl_weight * kl + (1 - kl_weight) * ce

    return loss_fn


def log_softmax(logits: mx.array) -> mx.array:
    logits = logits.astype(mx.float32)
    return logits - mx.logsumexp(logits, axis=-1, keepdims=True)
