"""Checkpoints and snapshots: self-describing states of a run that it resumes or branches from.

A checkpoint directory holds the weights (with α in QAT form), the optimizer state, the run's
metrics up to that point, and meta.json: the step and token count, the phase, the train config,
the model's `config.json` dict and the quantization spec of every QAT module, so that
`load_model` rebuilds the right model by itself. The train step draws no random numbers and
batch k is a pure function of (seed, k), so the step is the whole random state of a run.

A run keeps one rolling checkpoint (`checkpoint/`, for --resume) and named snapshots at chosen
token counts (`snapshots/<tokens>/`, for --init-from). Each is written atomically.
"""

import json
import shutil
from pathlib import Path
from typing import Dict, Optional, Tuple

import mlx.core as mx
import mlx.nn as nn
import mlx.optimizers as optim
from mlx.utils import tree_flatten, tree_unflatten

from . import atomic, model as models
from .layers import qat_specs, to_qat
from .quantizers import QuantSpec, specs_from_dict, specs_to_dict

NAME = "checkpoint"
SNAPSHOTS = "snapshots"


class CheckpointError(RuntimeError):
    pass


def snapshot_path(out: Path, tokens: int) -> Path:
    return Path(out) / SNAPSHOTS / str(tokens)


def save(path: Path, model: nn.Module, optimizer: optim.Optimizer, meta: dict, metrics: Optional[Path] = None) -> Path:
    """Write a checkpoint of `model` and `optimizer` at `path`; `meta` gets the model's
    description added. `metrics` (a metrics.jsonl) is copied in as it is now."""
    meta = {
        **meta,
        "model_config": models.config_dict(model),
        "qat_specs": specs_to_dict(qat_specs(model)),
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic.directory(path) as tmp:
        mx.save_safetensors(str(tmp / "model.safetensors"), dict(tree_flatten(model.parameters())))
        mx.save_safetensors(str(tmp / "optimizer.safetensors"), dict(tree_flatten(optimizer.state)))
        if metrics is not None and metrics.exists():
            shutil.copy(metrics, tmp / "metrics.jsonl")
        (tmp / "meta.json").write_text(json.dumps(meta, indent=2))
    return path


def find(out: Path) -> Optional[Path]:
    """The newest whole rolling checkpoint of a run (the old one if a swap was cut short)."""
    for path in (Path(out) / NAME, atomic.previous(Path(out) / NAME)):
        if (path / "meta.json").exists():
            return path
    return None


def read_meta(path: Path) -> dict:
    path = Path(path)
    if not path.is_dir() or not (path / "meta.json").exists():
        raise CheckpointError(f"{path} is not a checkpoint or snapshot directory (no meta.json)")
    try:
        return json.loads((path / "meta.json").read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{path}/meta.json is unreadable ({e}); the checkpoint is corrupt") from e


def specs(meta: dict) -> Dict[str, QuantSpec]:
    """The QAT modules' specs recorded in a checkpoint's meta ({} for an FP checkpoint)."""
    return specs_from_dict(meta.get("qat_specs", {}))


def restore(path: Path, model: nn.Module, optimizer: optim.Optimizer) -> None:
    """Load weights and optimizer state into a model of the checkpoint's form (its meta is read
    by the caller, which chose that form). The optimizer's state is replaced in place, so a step
    compiled over it stays valid."""
    try:
        model.load_weights(str(path / "model.safetensors"), strict=True)
        state = tree_unflatten(list(mx.load(str(path / "optimizer.safetensors")).items()))
    except (ValueError, RuntimeError, OSError) as e:
        raise CheckpointError(f"cannot restore {path} ({e}); the checkpoint is corrupt or from another model") from e
    for sub, saved in zip(optimizer.optimizers, state["states"]):
        sub.state.clear()
        sub.state.update(saved)
    optimizer.init(model.trainable_parameters())  # marks it initialised; every entry is there


def load_model(path: Path) -> Tuple[nn.Module, dict]:
    """(model, meta): the checkpoint's model rebuilt from its own description, weights loaded."""
    meta = read_meta(path)
    model = models.from_config(meta["model_config"])
    try:
        weights = mx.load(str(Path(path) / "model.safetensors"))
        if hasattr(model, "sanitize"):  # as mlx_lm.load does: e.g. a tied gemma3_text drops its lm_head here
            model.sanitize(dict(weights))
        if meta["qat_specs"]:
            to_qat(model, specs(meta))
        model.load_weights(list(weights.items()), strict=True)
    except (ValueError, RuntimeError, OSError) as e:
        raise CheckpointError(f"cannot load {path} ({e}); the checkpoint is corrupt") from e
    return model, meta
