"""Training checkpoints: weights (with α in QAT), optimizer state, and meta.json (step, phase,
data seed, config). The train step draws no random numbers and batch k is a pure function of
(seed, k), so (seed, step) is the whole random state of a run.

A checkpoint is a directory written beside its final place and swapped in by renames, so a
run killed at any moment leaves either the old or the new checkpoint whole.
"""

import json
import shutil
from pathlib import Path
from typing import Optional

import mlx.core as mx
import mlx.nn as nn
import mlx.optimizers as optim
from mlx.utils import tree_flatten, tree_unflatten

NAME = "checkpoint"


class CheckpointError(RuntimeError):
    pass


def save(out: Path, model: nn.Module, optimizer: optim.Optimizer, meta: dict) -> Path:
    final, tmp, old = out / NAME, out / f"{NAME}.tmp", out / f"{NAME}.old"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    mx.save_safetensors(str(tmp / "model.safetensors"), dict(tree_flatten(model.parameters())))
    mx.save_safetensors(str(tmp / "optimizer.safetensors"), dict(tree_flatten(optimizer.state)))
    (tmp / "meta.json").write_text(json.dumps(meta, indent=2))
    if final.exists():
        shutil.rmtree(old, ignore_errors=True)
        final.rename(old)
    tmp.rename(final)
    shutil.rmtree(old, ignore_errors=True)
    return final


def find(out: Path) -> Optional[Path]:
    """The newest whole checkpoint in a run directory (the old one if a swap was cut short)."""
    for name in (NAME, f"{NAME}.old"):
        if (out / name / "meta.json").exists():
            return out / name
    return None


def read_meta(path: Path) -> dict:
    try:
        return json.loads((path / "meta.json").read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{path}/meta.json is unreadable ({e}); the checkpoint is corrupt, start the run afresh") from e


def restore(path: Path, model: nn.Module, optimizer: optim.Optimizer) -> None:
    """Load weights and optimizer state into a model of the checkpoint's form."""
    try:
        model.load_weights(str(path / "model.safetensors"), strict=True)
        state = mx.load(str(path / "optimizer.safetensors"))
    except (ValueError, RuntimeError, OSError) as e:
        raise CheckpointError(f"cannot restore {path} ({e}); the checkpoint is corrupt or from another model") from e
    optimizer.state = tree_unflatten(list(state.items()))
