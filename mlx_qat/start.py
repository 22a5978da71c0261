"""Where a run starts: from scratch, from a pretrained model (the config's `pretrained`), by
resuming its own newest checkpoint (--resume), or by branching from another run's checkpoint or
snapshot (--init-from), of a pretrained start or not.

`resolve` decides it before any work, with every refusal a one-line StartError, into a `Start`
that the run follows (mlx_qat.train): it builds its model (the pretrained one, or a fresh one),
then takes over the checkpoint, if any, at the step `branch_step` finds for it. What --init-from
names on the command line, and the config a --resume without --config reads, are decided here
too, before the config is built.
"""

import os
import shutil
import sys
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, Iterator, Optional

import mlx.core as mx

from . import atomic, checkpoint, config, distributed, monitor, pretrained, report
from . import model as models
from .layers import quant_specs


class StartError(RuntimeError):
    """A run that cannot start as asked, with what to do about it."""


@dataclass(frozen=True)
class Start:
    """Where a run starts, as `resolve` decided it: from scratch (neither a checkpoint nor a
    pretrained model), from a pretrained model, or from a checkpoint, its own (a resume) or
    another run's (a branch), whose model was a fresh one or a pretrained one."""

    checkpoint: Optional[Path] = None  # the saved state it continues from (None: from its first step)
    resumed: bool = False  # that state is the run's own (--resume), not another run's (--init-from)
    pretrained: Optional[str] = None  # the model it starts from (None: a fresh one of the config's `model`)
    trained_seconds: float = 0.0  # the run's training time before `checkpoint` (a branch's clock starts at 0)


def resolve(cfg: config.TrainConfig, out: Path, resume: bool, init_from: Optional[Path],
            group: mx.distributed.Group) -> Start:
    """Where the run in `out` starts, agreed on by every rank: they must have been given the same
    config, and a refusal on any rank stops them all. Only the writer (rank 0) checks `out`, and
    that a new run's is free: it is the one that fills it."""
    distributed.check_same_config(group, dict(cfg=cfg.to_dict(), out=str(out), resume=resume, init_from=str(init_from)))
    distributed.together(group, distributed.check_batch, cfg.batch_size, group)
    return distributed.together(group, _resolve, cfg, out, resume, init_from, distributed.is_writer(group))


def _resolve(cfg: config.TrainConfig, out: Path, resume: bool, init_from: Optional[Path], writer: bool) -> Start:
    if resume and init_from is not None:
        raise StartError("--resume continues a run and --init-from starts a new one: pass one of them")
    if writer:
        check_out(out)
        check_reporting(cfg)
    if resume:
        path = resume_point(out, cfg, writer)
        meta = checkpoint.read_meta(path)
        check_same_run(cfg, meta["config"], out)
        return Start(path, resumed=True, pretrained=cfg.pretrained, trained_seconds=meta.get("train_seconds", 0.0))
    if writer and out.exists() and any(out.iterdir()):
        raise StartError(f"{out} already holds a run; pass --resume to continue it or choose a new --out")
    if init_from is not None:
        check_branch_source(init_from)
    return Start(init_from, pretrained=cfg.pretrained)


def check_out(out: Path) -> None:
    """`out` is a directory, or can be made, in a place this user may write: told before any
    work, in one line, rather than as a traceback when the run writes its first file."""
    if out.exists() and not out.is_dir():
        raise StartError(f"--out {out} is a file, not a directory; choose another --out")
    place = next(p for p in (out, *out.parents) if p.exists())  # Path.exists is False under a file
    if not place.is_dir():
        raise StartError(f"--out {out} is under {place}, which is a file; choose another --out")
    if not os.access(place, os.W_OK | os.X_OK):
        raise StartError(f"--out {out} cannot be written ({place} is not writable); choose another --out "
                         "or change its permissions")


def check_reporting(cfg: config.TrainConfig) -> None:
    """The services `report_to` names are installed (only the writer reports, so only it checks)."""
    missing = monitor.missing_reporting(cfg.report_to)
    if missing:
        raise StartError(f"report_to names {', '.join(missing)}, not installed here: pip install {' '.join(missing)}, "
                         "or drop report_to")


def resume_point(out: Path, cfg: config.TrainConfig, writer: bool) -> Path:
    """The newest checkpoint of the run in `out` that reads back whole; a corrupt newer one is
    passed over, and said so on stderr."""
    if not out.is_dir():
        raise StartError(f"{out} does not exist, so there is no run to resume; drop --resume to start one there")
    corrupt, corrupt_paths = [], []
    path = checkpoint.find(out, lambda p, e: (corrupt.append(e), corrupt_paths.append(p)))
    if path is None and corrupt:
        raise checkpoint.CheckpointError(f"no checkpoint in {out} reads back whole ({corrupt[0]}); start the run "
                                         f"again with a new --out, or delete {out}")
    if path is None:
        raise StartError(
            f"{out} has no checkpoint to resume from (the run stopped before its first checkpoint, at step "
            f"{cfg.checkpoint_every}); start it again with a new --out, or delete {out}"
        )
    if writer and corrupt:
        for e in corrupt:
            print(f"warning: passing over a corrupt checkpoint: {e}", file=sys.stderr)
        for p in corrupt_paths:  # out of the rolling pair, so that the next save keeps the good one as the previous
            if p.parent == out and p.name in (checkpoint.NAME, atomic.previous(out / checkpoint.NAME).name):
                atomic.set_aside(p)
        print(f"resuming from {path} (step {checkpoint.read_meta(path)['step']})", file=sys.stderr)
    return path


def config_changes(cfg: config.TrainConfig, saved: dict) -> dict:
    """key -> (saved value, cfg's) for each key in which `cfg` differs from a run's `saved` config,
    but for the keys that change none of its numbers."""
    start = config.PRETRAINED_DEFAULTS if saved.get("pretrained") is not None else {}
    # keys newer than the run: the defaults its start would have given them
    saved = {k: saved[k] if k in saved else start.get(k, config.default(k)) for k in config.FIELDS}
    return {k: (saved[k], v) for k, v in cfg.to_dict().items() if saved[k] != v and k not in config.RESUME_MAY_CHANGE}


def check_same_run(cfg: config.TrainConfig, saved: dict, out: Path) -> None:
    """A resumed run keeps its config, but for the keys that change none of its numbers."""
    changed = config_changes(cfg, saved)
    if changed:
        diff = ", ".join(f"{k}: {a!r} -> {b!r}" for k, (a, b) in changed.items())
        raise StartError(f"the config differs from the run in {out} ({diff}); resume without --config, or use a new --out")


def check_branch_source(path: Path) -> None:
    """What a new run branches from is a checkpoint or snapshot, not a model."""
    if pretrained.is_model(path) and not (path / "meta.json").exists():
        raise StartError(f"{path} is a pretrained model, not a checkpoint: start from it with the config key "
                         "`pretrained` (config.resolve applies its defaults), as --init-from does on the command line")
    checkpoint.read_meta(path)  # it must be a checkpoint or snapshot


def branch_step(path: Path, meta: dict, cfg: config.TrainConfig, plan, model) -> int:
    """The step at which this run, whose model is `model` in its FP form, takes over the
    checkpoint at `path` (its `meta`), or a StartError saying why it cannot."""
    tokens = meta["tokens"]
    if meta["model_config"] != models.config_dict(model):
        source = meta["config"].get("pretrained")
        hint = f" (it started from {source}: pass --pretrained {source})" if source and not cfg.pretrained else ""
        raise StartError(f"{path} holds another model than this run's{hint}; branch from a run with the same model and data")
    check_same_fine_tuning(path, meta["config"], cfg)
    if tokens % plan.tokens_per_step or tokens > plan.total_tokens:
        raise StartError(f"{path} was taken at {tokens:,} tokens, which is not a step boundary of this run "
                         f"({plan.tokens_per_step:,} tokens per step, {plan.total_tokens:,} in all)")
    if meta["phase"] == "fp" and plan.qat_steps and tokens > plan.fp_tokens:
        raise StartError(f"{path} is full precision at {tokens:,} tokens, past this run's switch to QAT at "
                         f"{plan.fp_tokens:,}; branch from a snapshot at or before D_fp")
    if meta["phase"] == "qat":
        if tokens < plan.fp_tokens:
            raise StartError(f"{path} is already in QAT at {tokens:,} tokens, before this run's switch at "
                             f"{plan.fp_tokens:,}")
        if checkpoint.specs(meta) != quant_specs(model, cfg.spec, cfg.embedding_spec):
            raise StartError(f"{path} is quantized differently from this run's bits/group_size/embedding_bits")
    return tokens // plan.tokens_per_step


def check_same_fine_tuning(path: Path, saved: dict, cfg: config.TrainConfig) -> None:
    """A checkpoint continues only a run of its own fine_tune_type; a low-rank one (adapters and
    α alone) only on the same base, with the same adapters."""
    kind = saved.get("fine_tune_type", "full")
    if kind != cfg.fine_tune_type:
        raise StartError(f"{path} is a checkpoint of a fine_tune_type: {kind} run and this run is "
                         f"fine_tune_type: {cfg.fine_tune_type}; branch from a run of the same fine_tune_type")
    if kind != "lora":
        return
    if saved["pretrained"] != cfg.pretrained:
        raise StartError(f"{path} holds a low-rank run's adapters and scales, not its base: continue it from its own "
                         f"base (pretrained: {saved['pretrained']}), not from {cfg.pretrained}")
    shape = {"lora_parameters": cfg.lora_parameters, "num_layers": cfg.num_layers}
    changed = [f"{k}: {saved[k]!r} -> {v!r}" for k, v in shape.items() if saved[k] != v]
    if changed:
        raise StartError(f"{path} holds other adapters than this run's ({', '.join(changed)}); branch with the same "
                         "lora_parameters and num_layers")


@contextmanager
def leave_nothing_if_refused(out: Path, writer: bool) -> Iterator[None]:
    """Remove what making `out` created if the body fails: a run refused before its first step
    leaves nothing behind (a directory the user made stays)."""
    missing = [p for p in (out, *out.parents) if not p.exists()] if writer else []
    try:
        yield
    except BaseException:
        if missing:
            shutil.rmtree(missing[-1], ignore_errors=True)  # the topmost directory that making `out` creates
        raise


# ---------------------------------------------------------------- the command line, before the config exists


def parse_init_from(path: Optional[Path], overrides: Dict[str, object]) -> Optional[Path]:
    """What --init-from PATH names: a checkpoint or snapshot (it has meta.json), returned to
    branch from; or a pretrained model, which becomes the config's `pretrained` (None returned)."""
    if path is None or (path / "meta.json").is_file():
        return path
    if not path.exists():
        raise StartError(f"--init-from {path} does not exist; pass a checkpoint or snapshot, a model directory "
                         "or a .gguf file")
    if not pretrained.is_model(path) and not (path / checkpoint.NAME / "meta.json").is_file():
        raise StartError(f"--init-from {path} is neither a checkpoint or snapshot (no meta.json), a model directory "
                         "(no config.json) nor a .gguf file; pass one of those")
    if overrides.get("pretrained", str(path)) != str(path):
        raise StartError(f"--init-from {path} and --pretrained {overrides['pretrained']} name two starting models; pass one")
    overrides["pretrained"] = str(path)  # a run dir lands here too: pretrained.load says to pass its checkpoint
    return None


def config_file(given: Optional[Path], out: Path, resume: bool) -> Optional[Path]:
    """The config file to read: the one given, or, for --resume without one, the run's own."""
    if given is not None or not resume:
        return given
    if not (out / report.CONFIG).exists():
        raise StartError(f"{out} holds no run to resume (no {report.CONFIG}); drop --resume to start one there")
    return out / report.CONFIG
