"""Data-parallel training over MLX's own distributed engine (`mx.distributed`, `mlx.launch`).

Every rank holds the whole model and reads its own rows of every global batch (rows r, r + K,
r + 2K, ... of K ranks); the step averages the gradients with `nn.average_gradients`, so
weights, α and optimizer state stay identical everywhere and a K-rank run follows the same
trajectory as one process with the same global batch. Decisions (errors at the start, the NaN
guard, validation) are taken on reduced values, so every rank takes the same one. Only rank 0
writes files or shows progress.
"""

import hashlib
import json
from typing import Optional

import mlx.core as mx
import numpy as np


class RankError(RuntimeError):
    """Ranks that cannot train together, with what to do about it."""


class Alone:
    """A group of this process alone, even under `mlx.launch`: what a sweep's rank trains its own
    runs in (every collective of a group of one is the identity, so none is called)."""

    def rank(self) -> int:
        return 0

    def size(self) -> int:
        return 1


def world(alone: bool = False) -> mx.distributed.Group:
    """The group `mlx.launch` started this process in (size 1 when run alone), or, with `alone`,
    this process by itself."""
    return Alone() if alone else mx.distributed.init()


def is_writer(group: mx.distributed.Group) -> bool:
    return group.rank() == 0


def rows(batch: np.ndarray, group: mx.distributed.Group) -> np.ndarray:
    """This rank's rows of a global batch."""
    return batch[group.rank()::group.size()]


def all_sum(x, group: mx.distributed.Group) -> mx.array:
    # On the CPU stream: the ring and MPI backends run there whatever the default device.
    return mx.distributed.all_sum(mx.array(x), group=group, stream=mx.cpu) if group.size() > 1 else mx.array(x)


def agree(group: mx.distributed.Group, error: Optional[Exception]) -> None:
    """Raise on every rank if any rank failed, so that none is left waiting in a collective."""
    failed = int(all_sum(int(error is not None), group).item())
    if error is not None:
        raise error
    if failed:
        raise RankError(f"{failed} other rank(s) stopped with an error before training; see their messages")


def check_same_config(group: mx.distributed.Group, settings: dict) -> None:
    """Refuse to train when the ranks were given different configs (or flags)."""
    if group.size() == 1:
        return
    digest = hashlib.sha256(json.dumps(settings, sort_keys=True, default=str).encode()).digest()[:8]
    mine = mx.array(np.frombuffer(digest, dtype=np.uint8).astype(np.int32))
    everyone = np.array(mx.distributed.all_gather(mine[None], group=group, stream=mx.cpu))
    if not (everyone == everyone[0]).all():
        differ = [r for r in range(group.size()) if not (everyone[r] == everyone[0]).all()]
        raise RankError(f"rank(s) {differ} were started with another config than rank 0; give every rank the same "
                        "--config, flags and files")


def check_batch(batch_size: int, group: mx.distributed.Group) -> None:
    if batch_size % group.size():
        raise RankError(f"batch_size={batch_size} does not divide over {group.size()} ranks; use a multiple of "
                        f"{group.size()} (the configured batch is the global batch)")


def together(group: mx.distributed.Group, fn, *args):
    """fn(*args) on every rank, failing on every rank if it failed on any (see `agree`)."""
    result, error = None, None
    try:
        result = fn(*args)
    except Exception as e:  # noqa: BLE001  (re-raised by agree, on this rank and the others)
        error = e
    agree(group, error)
    return result
