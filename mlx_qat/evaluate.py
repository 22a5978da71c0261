"""The training loss and validation: next-token cross-entropy in nats per token."""

from typing import Iterable, Optional

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from . import distributed


def loss_fn(model: nn.Module, batch: mx.array) -> mx.array:
    # MLX's fused cross-entropy: one kernel with float32 accumulation on Metal/CUDA.
    return mx.fast.cross_entropy(model(batch[:, :-1]), batch[:, 1:]).mean()


def evaluate(model: nn.Module, batches: Iterable[np.ndarray], group: Optional[mx.distributed.Group] = None) -> float:
    """Mean next-token cross-entropy over the batches; with a group of ranks, each rank takes
    its rows of every batch and the sums are reduced, so every rank gets the same figure.
    The model is in eval mode meanwhile (no dropout), and back in its own mode after."""
    total, count, training = 0.0, 0, model.training
    model.eval()
    try:
        for b in batches:
            if group is not None:
                b = distributed.rows(b, group)
            if len(b):
                b = mx.array(b)
                total += mx.fast.cross_entropy(model(b[:, :-1]), b[:, 1:]).sum().item()
                count += b.shape[0] * (b.shape[1] - 1)
    finally:
        model.train(training)
    if group is not None and group.size() > 1:
        total, count = distributed.all_sum([total, count], group).tolist()
    return total / count
