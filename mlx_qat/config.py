"""Run configuration: one dataclass, read from YAML, overridden by `--key value` flags.

Unknown keys are errors that suggest the nearest valid key.
"""

import argparse
import dataclasses
import difflib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, List, Optional, Sequence, Union

import yaml

from .quantizers import QuantSpec, default_embedding_bits
from .schedule import SCHEDULES


@dataclass
class TrainConfig:
    # data: a prepared dataset directory, or inputs to prepare (see mlx_qat.data)
    data: Union[str, List[str]] = field(default="builtin", metadata={"help": "prepared dir, or files/dirs/globs/hf:NAME/builtin"})
    vocab_size: int = field(default=2048, metadata={"help": "tokenizer vocabulary when preparing data"})
    data_cache: str = field(default="~/.cache/mlx_qat/data", metadata={"help": "where prepared data is kept"})
    # model
    model: Any = field(default="tiny", metadata={"help": "a preset (tiny, small, base) or a dict of llama arguments"})
    # tokens and batches
    total_tokens: int = field(default=2_000_000, metadata={"help": "D_total: tokens of FP + QAT training"})
    batch_size: int = field(default=16, metadata={"help": "sequences per step"})
    seq_len: int = field(default=128, metadata={"help": "tokens per sequence"})
    # optimizer (AdamW)
    learning_rate: float = field(default=3e-3, metadata={"help": "peak learning rate"})
    weight_decay: float = field(default=0.1, metadata={"help": "AdamW weight decay (not applied to α or norms)"})
    beta1: float = 0.9
    beta2: float = 0.95
    grad_clip: float = field(default=1.0, metadata={"help": "global gradient-norm clip; 0 disables"})
    # QAT
    bits: float = field(default=2, metadata={"help": "QAT weight bits: 1, 1.58, 2, 3, 4, 5, 6, 8"})
    group_size: Optional[int] = field(default=64, metadata={"help": "32, 64, 128, or null for per-channel"})
    embedding_bits: Optional[float] = field(default=None, metadata={"help": "embedding/tied-head bits; default max(bits, 4)"})
    qat_fraction: Union[float, str] = field(default="auto", metadata={"help": "f = D_qat / D_total in [0, 1], or auto (the paper's predictor)"})
    keep_optimizer_state: bool = field(default=True, metadata={"help": "keep the weights' Adam state across the FP->QAT switch"})
    # schedule
    schedule: str = field(default="separate", metadata={"help": "separate or fused (cooldown & QAT fusion)"})
    warmup: float = field(default=0.05, metadata={"help": "warmup, as a fraction of its phase"})
    cooldown: float = field(default=0.2, metadata={"help": "cooldown, as a fraction of its phase"})
    # run
    seed: int = 0
    report_every: int = field(default=10, metadata={"help": "steps between progress records"})
    eval_every: int = field(default=200, metadata={"help": "steps between validations"})
    eval_batches: int = field(default=16, metadata={"help": "validation batches per evaluation"})
    checkpoint_every: int = field(default=200, metadata={"help": "steps between checkpoints"})
    export_scales: str = field(default="float32", metadata={"help": "dtype of exported scales: float32 (lossless), float16, bfloat16"})

    def __post_init__(self):
        self.validate()

    def validate(self) -> None:
        QuantSpec(self.bits, self.group_size)  # raises with the allowed values
        if self.embedding_bits is not None:
            QuantSpec(self.embedding_bits, self.group_size)
        if self.schedule not in SCHEDULES:
            raise ValueError(f"schedule={self.schedule!r}; use one of {', '.join(SCHEDULES)}")
        f = self.qat_fraction
        if not (f == "auto" or (isinstance(f, (int, float)) and not isinstance(f, bool) and 0 <= f <= 1)):
            raise ValueError(f"qat_fraction={f!r}; use a number in [0, 1] or 'auto'")
        for name in ("total_tokens", "batch_size", "seq_len", "report_every", "eval_every", "eval_batches", "checkpoint_every"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ValueError(f"{name}={value!r} must be a positive integer")
        if self.total_tokens < self.tokens_per_step:
            raise ValueError(f"total_tokens={self.total_tokens} is less than one step of {self.tokens_per_step} tokens")
        if not self.learning_rate > 0:
            raise ValueError(f"learning_rate={self.learning_rate} must be positive")

    @property
    def tokens_per_step(self) -> int:
        return self.batch_size * self.seq_len

    @property
    def spec(self) -> QuantSpec:
        return QuantSpec(self.bits, self.group_size)

    @property
    def embedding_spec(self) -> QuantSpec:
        bits = self.embedding_bits if self.embedding_bits is not None else default_embedding_bits(self.bits)
        return QuantSpec(bits, self.group_size)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


FIELDS = {f.name: f for f in dataclasses.fields(TrainConfig)}


def _check_keys(keys, where: str) -> None:
    for key in keys:
        if key not in FIELDS:
            near = difflib.get_close_matches(key, FIELDS, n=1)
            hint = f"; did you mean {near[0]!r}?" if near else f"; valid keys: {', '.join(FIELDS)}"
            raise ValueError(f"unknown config key {key!r} in {where}{hint}")


def load(path: Optional[Path] = None, overrides: Optional[dict] = None) -> TrainConfig:
    """A config from a YAML file, with `overrides` (from flags) taking precedence."""
    values = {}
    if path is not None:
        path = Path(path)
        if not path.exists():
            raise FileNotFoundError(f"config file {path} does not exist")
        values = yaml.safe_load(path.read_text()) or {}
        if not isinstance(values, dict):
            raise ValueError(f"{path} must be a YAML mapping of config keys")
        _check_keys(values, str(path))
    overrides = overrides or {}
    _check_keys(overrides, "the command line")
    return TrainConfig(**{**values, **overrides})


def parse_overrides(args: Sequence[str]) -> dict:
    """`--key value` pairs (values parsed as YAML: 2, 0.5, null, [a, b]) into a dict."""
    overrides, args = {}, list(args)
    while args:
        flag = args.pop(0)
        if not flag.startswith("--"):
            raise ValueError(f"expected --key value, got {flag!r}")
        key = flag[2:].replace("-", "_")
        if "=" in key:
            key, value = key.split("=", 1)
        elif args and not args[0].startswith("--"):
            value = args.pop(0)
        else:
            raise ValueError(f"{flag} needs a value")
        overrides[key] = yaml.safe_load(value)
    return overrides


def describe_keys() -> str:
    """Help text listing every key with its default."""
    lines = []
    for f in dataclasses.fields(TrainConfig):
        help_text = f.metadata.get("help", "")
        lines.append(f"  --{f.name.replace('_', '-'):<22} {help_text} (default: {f.default!r})")
    return "\n".join(lines)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.epilog = "config keys (YAML or --key value; flags win over YAML):\n" + describe_keys()
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
