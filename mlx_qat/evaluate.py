"""The training loss and validation: next-token cross-entropy in nats per token."""

from typing import Iterable

import mlx.core as mx
import mlx.nn as nn
import numpy as np


def loss_fn(model: nn.Module, batch: mx.array) -> mx.array:
    # MLX's fused cross-entropy: one kernel with float32 accumulation on Metal/CUDA.
    return mx.fast.cross_entropy(model(batch[:, :-1]), batch[:, 1:]).mean()


def evaluate(model: nn.Module, batches: Iterable[np.ndarray]) -> float:
    """Mean next-token cross-entropy over the batches."""
    total, count = 0.0, 0
    for b in map(mx.array, batches):
        total += mx.fast.cross_entropy(model(b[:, :-1]), b[:, 1:]).sum().item()
        count += b.shape[0] * (b.shape[1] - 1)
    return total / count
