"""Checkpoints and snapshots: self-describing states of a run that it resumes or branches from.

A checkpoint directory holds the weights (with α in QAT form), the optimizer state, the run's
metrics up to that point, and meta.json: the step and token count, the phase, the train config,
the model's `config.json` dict and the quantization spec of every QAT module, so that
`load_model` rebuilds the right model by itself. A low-rank QAT run (fine_tune_type: lora) keeps
only what trains (lora_a, lora_b, α; meta "weights": "trainable"): its frozen base is read
again from the config's `pretrained`. Batch k is a pure function of (seed, k), and the train
step draws no random numbers but a low-rank run's adapter dropout, seeded from (seed, k) too, so
the step is the whole random state of a run.

A run keeps one rolling checkpoint (`checkpoint/`, for --resume), the one before it
(`checkpoint.old/`), and named snapshots at chosen token counts (`snapshots/<tokens>/`, for
--init-from). Each is written beside its place, flushed, read back against the SHA-256 of its
files (kept in meta.json), and only then swapped in; --resume takes the newest of them that still
reads back, so a checkpoint corrupted on disk costs the steps since the one before it, not the run.
"""

import hashlib
import json
import shutil
from pathlib import Path
from typing import Callable, Dict, List, Optional, Tuple

import mlx.core as mx
import mlx.nn as nn
import mlx.optimizers as optim
from mlx.utils import tree_flatten, tree_unflatten

from . import atomic, lowrank, model as models
from .layers import qat_specs, to_qat
from .quantizers import QuantSpec, specs_from_dict, specs_to_dict

NAME = "checkpoint"
SNAPSHOTS = "snapshots"
WEIGHTS = ("model.safetensors", "optimizer.safetensors")
TRAINABLE = "trainable"  # meta["weights"] of a checkpoint that holds only what trains (a low-rank run's)


class CheckpointError(RuntimeError):
    pass


def snapshot_path(out: Path, tokens: int) -> Path:
    return Path(out) / SNAPSHOTS / str(tokens)


def save(path: Path, model: nn.Module, optimizer: optim.Optimizer, meta: dict, metrics: Optional[Path] = None,
         keep_previous: bool = False) -> Path:
    """Write a checkpoint of `model` and `optimizer` at `path`; `meta` gets the model's
    description and the files' digests added. `metrics` (a metrics.jsonl) is copied in as it is
    now. The one at `path` is replaced only by a checkpoint that reads back whole; with
    `keep_previous` it stays beside it (`atomic.previous(path)`) for --resume to fall back on."""
    low_rank = bool(lowrank.lowrank_layers(model))
    meta = {
        **meta,
        "model_config": models.config_dict(model),
        "qat_specs": specs_to_dict(lowrank.lowrank_specs(model) if low_rank else qat_specs(model)),
        **({"weights": TRAINABLE} if low_rank else {}),
    }
    weights = lowrank.trainable_weights(model) if low_rank else dict(tree_flatten(model.parameters()))
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic.directory(path, keep_previous=keep_previous) as tmp:
        mx.save_safetensors(str(tmp / "model.safetensors"), weights)
        mx.save_safetensors(str(tmp / "optimizer.safetensors"), dict(tree_flatten(optimizer.state)))
        if metrics is not None and metrics.exists():
            shutil.copy(metrics, tmp / metrics.name)
        atomic.sync(tmp)  # the digests describe what is on the disk
        meta["sha256"] = {f.name: _digest(f) for f in sorted(tmp.iterdir())}
        atomic.write_text(tmp / "meta.json", json.dumps(meta, indent=2))
        try:
            _check_loads(tmp)  # the digests were just taken from these files: whether they parse is the question
        except CheckpointError as e:  # e.g. a full disk: the write came out short
            raise CheckpointError(f"the checkpoint written for {path} does not read back ({e}); the one before it is "
                                  "kept. Free some disk space or check the disk, then --resume") from e
    return path


def _digest(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def check(path: Path) -> dict:
    """The meta of a checkpoint that reads back whole: each file has the digest it was written
    with, and the weights load. CheckpointError, naming the first fault, otherwise."""
    path = Path(path)
    meta = read_meta(path)
    digests = meta.get("sha256", {})  # none in a checkpoint from before they were kept: then loading is the check
    try:
        changed = [name for name, digest in digests.items() if _digest(path / name) != digest]
    except OSError as e:
        raise CheckpointError(f"{path} does not read back ({e}); the checkpoint is corrupt") from e
    if changed:
        raise CheckpointError(f"{path}/{changed[0]} is not what was written (its SHA-256 differs); the checkpoint is corrupt")
    _check_loads(path)
    return meta


def _check_loads(path: Path) -> None:
    """Each weights file parses and holds all of its data; CheckpointError otherwise."""
    try:
        for name in WEIGHTS:
            mx.load(str(path / name))  # parses the header and checks that the data is all there
    except (OSError, ValueError, RuntimeError) as e:
        raise CheckpointError(f"{path} does not read back ({e}); the checkpoint is corrupt") from e


def candidates(out: Path) -> List[Path]:
    """The saved states of a run that --resume may continue from: the rolling checkpoint, the one
    kept before it, and the snapshots (a state of the same run at a chosen step)."""
    out = Path(out)
    snapshots = [p for p in (out / SNAPSHOTS).glob("*") if p.name.isdigit()]
    return [p for p in (out / NAME, atomic.previous(out / NAME), *snapshots) if p.is_dir()]


def find(out: Path, skipped: Callable[[Path, CheckpointError], None] = lambda path, error: None) -> Optional[Path]:
    """The newest of a run's checkpoints (by step) that reads back whole, or None; each one that
    is passed over as corrupt goes to `skipped` with the reason."""
    dated = []
    for path in candidates(out):
        try:
            dated.append((read_meta(path)["step"], path))
        except CheckpointError as e:
            skipped(path, e)
    for _, path in sorted(dated, key=lambda d: -d[0]):  # stable: at a tie, the rolling checkpoint
        try:
            check(path)
            return path
        except CheckpointError as e:
            skipped(path, e)
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
    by the caller, which chose that form; a low-rank one gets only its trainables). The
    optimizer's state is replaced in place, so a step compiled over it stays valid."""
    try:
        _load_weights(path, model)
        state = tree_unflatten(list(mx.load(str(path / "optimizer.safetensors")).items()))
    except (ValueError, RuntimeError, OSError) as e:
        raise CheckpointError(f"cannot restore {path} ({e}); the checkpoint is corrupt or from another model") from e
    for sub, saved in zip(optimizer.optimizers, state["states"]):
        sub.state.clear()
        sub.state.update(saved)
    optimizer.init(model.trainable_parameters())  # marks it initialised; every entry is there


def _load_weights(path: Path, model: nn.Module) -> None:
    """The checkpoint's weights into `model`: every one (strict), or a low-rank model's trainables."""
    if lowrank.lowrank_layers(model):
        lowrank.load_trainable(model, mx.load(str(Path(path) / "model.safetensors")))
    else:
        model.load_weights(str(Path(path) / "model.safetensors"), strict=True)


def holds_trainables_only(meta: dict) -> bool:
    """Whether a checkpoint holds only what trains (a low-rank QAT run's), its base elsewhere."""
    return meta.get("weights") == TRAINABLE


def load_model(path: Path) -> Tuple[nn.Module, dict]:
    """(model, meta): the checkpoint's model rebuilt from its own description, weights loaded.
    A low-rank run's comes back in its low-rank form, its base read from the config's `pretrained`."""
    meta = read_meta(path)
    if holds_trainables_only(meta):
        return _load_lowrank(path, meta), meta
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


def _load_lowrank(path: Path, meta: dict) -> nn.Module:
    from . import pretrained  # transformers and gguf: imported where a base is read
    from .config import TrainConfig  # the saved config, read as it was

    cfg = TrainConfig(**meta["config"])
    try:
        # the frozen base, in its 16-bit dtype (or packed, as the run kept it)
        model = pretrained.load(cfg.pretrained, dtype=None, packed=cfg.quantized_base == "packed").model
    except (ValueError, FileNotFoundError) as e:
        raise CheckpointError(f"{path} holds a low-rank run's adapters and scales, whose base {cfg.pretrained} "
                              f"does not load ({e})") from e
    if models.config_dict(model) != meta["model_config"]:
        raise CheckpointError(f"{path} was trained on another model than {cfg.pretrained} holds now")
    try:
        lowrank.to_lowrank_qat(model, specs(meta), **cfg.lora_arguments)
        _load_weights(path, model)
    except (ValueError, RuntimeError, OSError) as e:
        raise CheckpointError(f"cannot load {path} ({e}); the checkpoint is corrupt") from e
    return model
