"""Run configuration: one dataclass, read from YAML, overridden by `--key value` flags.

Values are coerced to each key's declared type as users type them (`1e-3` and `1e6` are
strings in YAML 1.1; `1e6` tokens is a float), then every key is checked at construction, so a
bad value stops a run with one line naming the key before any data is read. Unknown keys are
errors that suggest the nearest valid key.

`resolve` fills the keys the user left unset from the start's defaults: a pretrained start's
PRETRAINED_DEFAULTS, and an FP `mode`'s own bits and group_size (MODE_DEFAULTS).

This module is longer than the others because it is the catalogue: every key is declared once
here, with its type, default, check, help text and roles; splitting it would split that list.
"""

import argparse
import dataclasses
import difflib
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Union, get_args, get_origin

import yaml

from .constants import (BITS, BYTE_FALLBACK_PIECES, DEFAULT_VOCAB_SIZE, FP_MODES, GROUP_SIZES, MIN_VOCAB_SIZE, MODES,
                        SCALES_DTYPE_NAMES)
from .presets import NAMES as PRESET_NAMES
from .quantizers import QuantSpec, default_embedding_bits
from .schedule import SCHEDULES, make_schedule, plan_run

LOSSES = ("ce", "distill")
COMPARISONS = ("dwq",)
FINE_TUNE_TYPES = ("full", "lora")
QUANTIZED_BASES = ("dequantize", "packed")
FP_SCALES = ("derived", "learned")
LORA_DEFAULTS = {"rank": 8, "scale": 20.0, "dropout": 0.0, "keys": None}  # mlx-lm's (keys: every Linear of a block)


class Refused(ValueError):
    """A bad value whose message is already the whole line (a key with parts names the part)."""


# ---------------------------------------------------------------- coercion by declared type


def _as_float(value):
    if isinstance(value, str):
        value = float(value)  # YAML 1.1 reads 1e-3 as a string
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise TypeError(value)
    return value


def _as_int(value):
    if isinstance(value, str):
        try:
            return int(value)  # exact for "1_000_000"
        except ValueError:
            value = float(value)  # "1e6"
    if isinstance(value, float) and value.is_integer():
        return int(value)
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(value)
    return value


def _as_bool(value):
    if not isinstance(value, bool):  # "maybe" is not true
        raise TypeError(value)
    return value


def _as_str(value):
    if not isinstance(value, str):
        raise TypeError(value)
    return value


def _coercer(tp) -> Callable:
    """The coercion of a declared type: float, int, bool, str, Optional[...] or List[...]."""
    if tp in (float, int, bool, str):
        return {float: _as_float, int: _as_int, bool: _as_bool, str: _as_str}[tp]
    args = get_args(tp)
    if get_origin(tp) is Union and type(None) in args:
        inner = _coercer(next(a for a in args if a is not type(None)))
        return lambda v: None if v is None else inner(v)
    if get_origin(tp) in (list, List):
        inner = _coercer(args[0])
        return lambda v: [inner(x) for x in (v if isinstance(v, list) else [v])]
    raise TypeError(f"no coercion for {tp}")


def _data_inputs(value):
    items = [value] if isinstance(value, str) else value
    if not isinstance(items, list) or not items or not all(isinstance(x, str) and x for x in items):
        raise TypeError(value)
    return value


def _fraction_or_auto(value):
    return value if value == "auto" else _as_float(value)


def _token_counts(value):
    counts = [] if value is None else _coercer(List[int])(value)
    return sorted(set(counts))


def _lora_parameters(value):
    """mlx-lm's lora_parameters mapping, completed with its defaults (null: all defaults); each
    part checked, a bad one named as lora_parameters.PART."""
    if value is None:
        value = {}
    if not isinstance(value, dict):
        raise TypeError(value)
    for name in value:
        if name not in LORA_DEFAULTS:
            near = difflib.get_close_matches(str(name), LORA_DEFAULTS, n=1)
            hint = f"did you mean {near[0]!r}?" if near else f"its keys are {', '.join(LORA_DEFAULTS)}"
            raise Refused(f"unknown key {name!r} in lora_parameters; {hint}")
    parts = {**LORA_DEFAULTS, **value}

    def part(name, coerce, valid, need):
        try:
            new = coerce(parts[name])
            ok = valid(new)
        except (TypeError, ValueError):
            ok = False
        if not ok:
            raise Refused(f"lora_parameters.{name}={parts[name]!r} must be {need}")
        return new

    keys = parts["keys"]
    return {
        "rank": part("rank", _as_int, positive, "a positive integer, e.g. 8"),
        "scale": part("scale", _as_float, positive, "a positive number, e.g. 20.0"),
        "dropout": part("dropout", _as_float, below_one, "a number in [0, 1), e.g. 0.0"),
        "keys": None if keys is None else part(
            "keys", _coercer(List[str]), lambda v: bool(v) and all(v) and len(set(v)) == len(v),
            "null (every nn.Linear of the adapted blocks) or a list of distinct block-relative module paths, e.g. "
            "[self_attn.q_proj, self_attn.v_proj]"),
    }


def key(default, help: str, need: str, valid: Optional[Callable] = None, coerce: Optional[Callable] = None, *,
        section: Optional[str] = None, resume: bool = False, branch: bool = False,
        pretrained_default=dataclasses.MISSING):
    """A config key: its default, --help text, what a valid value is, a range check and,
    where the declared type does not say, how to coerce a value.

    section: the --help heading that starts at this key (the keys after it belong to it too).
    The roles that other modules read from the catalogue (RESUME_MAY_CHANGE, BRANCH_KEYS,
    PRETRAINED_DEFAULTS below):
      resume: a resumed run may change it, since it changes no number the run computes;
      branch: it changes a run only after the run leaves the FP trunk that a sweep shares among
              runs; every other key (except those a resume may change) shapes the trunk;
      pretrained_default: its default on a pretrained start, which fine-tunes a trained model
              (MISSING: the usual default).
    """
    kind = {"default_factory": default} if callable(default) else {"default": default}
    roles = {"section": section, "resume": resume, "branch": branch, "pretrained_default": pretrained_default}
    return field(**kind, metadata={"help": help, "need": need, "valid": valid, "coerce": coerce, **roles})


def positive(v) -> bool:
    return v > 0


def non_negative(v) -> bool:
    return v >= 0


def fraction(v) -> bool:
    return 0 <= v <= 1


def below_one(v) -> bool:
    return 0 <= v < 1


def listed(values) -> str:
    return ", ".join(map(str, values))


BITS_TEXT = f"one of {listed(BITS)} (1.58 = ternary)"
FP_MODES_TEXT = ", ".join(f"{m} ({b}-bit, groups of {g})" for m, (g, b) in FP_MODES.items())


@dataclass
class TrainConfig:
    # data: a prepared dataset directory, or inputs to prepare (see mlx_qat.data)
    data: Union[str, List[str]] = key("builtin", "prepared dir, or files/dirs/globs/hf:NAME/builtin",
                                      "a path, glob, hf:NAME or builtin, or a non-empty list of them", coerce=_data_inputs,
                                      section="data")
    vocab_size: int = key(DEFAULT_VOCAB_SIZE, "tokenizer vocabulary when preparing data; ignored with `pretrained`",
                          f"an integer >= {MIN_VOCAB_SIZE} (byte fallback needs {BYTE_FALLBACK_PIECES} pieces), "
                          f"e.g. {DEFAULT_VOCAB_SIZE}", lambda v: v >= MIN_VOCAB_SIZE)
    data_cache: str = key("~/.cache/mlx_qat/data", "where prepared data is kept", "a directory path", bool, resume=True)
    # model (checked in validate: it needs vocab_size)
    model: Any = key("tiny", f"a preset ({PRESET_NAMES}) or a dict of llama arguments; ignored with `pretrained`",
                     f"a preset ({PRESET_NAMES}) or a mapping of llama arguments", coerce=lambda v: v, section="model")
    pretrained: Optional[str] = key(None, "start from this pretrained model (mlx-lm/HF directory or llama .gguf; "
                                    "--init-from MODEL sets it): its architecture and tokenizer replace model/vocab_size",
                                    "null or the path of a model directory or .gguf file", bool)
    # tokens and batches
    total_tokens: int = key(2_000_000, "D_total: tokens of FP + QAT training", "a positive integer, e.g. 2e6", positive,
                            section="tokens and batches", branch=True)
    batch_size: int = key(16, "sequences per step", "a positive integer, e.g. 16", positive)
    seq_len: int = key(128, "tokens per sequence", "a positive integer, e.g. 128", positive)
    # optimizer (AdamW). On a pretrained start, 1e-4: Adam moves a weight by about the learning
    # rate per step, so 1,000 steps move it up to ~0.1: across a 4-bit grid step of SmolLM2-135M's
    # weights (group max |w| ~0.5, step ~0.5/7) and through a good part of a 2-bit one (~0.25);
    # 2e-5, usual for full fine-tuning, would move 5x less, and the presets' 3e-3 is a pretraining
    # peak that throws a trained model off.
    learning_rate: float = key(3e-3, "peak learning rate", "a positive number, e.g. 3e-3", positive,
                               section="optimizer", pretrained_default=1e-4)
    weight_decay: float = key(0.1, "AdamW weight decay (not applied to α or norms)", "a number >= 0, e.g. 0.1", non_negative)
    beta1: float = key(0.9, "AdamW β1", "a number in [0, 1), e.g. 0.9", below_one)
    beta2: float = key(0.95, "AdamW β2", "a number in [0, 1), e.g. 0.95", below_one)
    grad_clip: float = key(1.0, "global gradient-norm clip; 0 disables", "a number >= 0 (0 disables), e.g. 1.0", non_negative)
    # QAT (bits and group sizes are range-checked by QuantSpec). A pretrained start is QAT from
    # token 0: the model is trained already. An FP mode fixes bits and group_size (resolve fills
    # them in when unset; validate refuses others).
    mode: str = key("affine", "affine (integer grids, learned scales) or an MLX FP format with a scale per group (see "
                    f"fp_scale): {FP_MODES_TEXT}; an FP mode sets bits/group_size (leave them unset) and quantizes "
                    "the embedding in the same mode", f"one of {', '.join(MODES)}", lambda v: v in MODES, section="QAT",
                    branch=True)
    fp_scale: str = key("derived", "an FP mode's group scales: derived (from each group's max |w|, as MLX derives "
                        "them) or learned (α per group, rounded to what the format stores)",
                        f"one of {', '.join(FP_SCALES)}", lambda v: v in FP_SCALES, branch=True)
    bits: float = key(2, f"QAT weight bits: {listed(BITS)}", BITS_TEXT, branch=True)
    group_size: Optional[int] = key(64, f"{listed(GROUP_SIZES)}, or null for per-channel",
                                    f"one of {listed(GROUP_SIZES)}, or null for per-channel scales", branch=True)
    embedding_bits: Optional[float] = key(None, "embedding/tied-head bits; default max(bits, 4); an FP mode quantizes "
                                          "them in the mode too (null or the mode's bits)", f"null or {BITS_TEXT}",
                                          lambda v: v in BITS, branch=True)
    qat_fraction: Union[float, str] = key("auto", "f = D_qat / D_total in [0, 1], or auto (the paper's predictor)",
                                          "a number in [0, 1] or auto", lambda v: v == "auto" or fraction(v), _fraction_or_auto,
                                          branch=True, pretrained_default=1.0)
    keep_optimizer_state: bool = key(True, "keep the weights' Adam state across the FP->QAT switch", "true or false",
                                     branch=True)
    # low-rank QAT of a pretrained model (mlx_qat.lowrank), in mlx-lm's vocabulary. lora: the
    # pretrained weights stay frozen in their 16-bit dtype; lora_a, lora_b and α train, the
    # merged weight fake-quantized in every forward; checkpoints hold only what trains.
    fine_tune_type: str = key("full", "full (every weight trains, float32 master weights) or lora (needs pretrained: "
                              "the base frozen in 16 bits, low-rank adapters and α learned through the quantizer of the "
                              "merged weight)", f"one of {', '.join(FINE_TUNE_TYPES)}", lambda v: v in FINE_TUNE_TYPES,
                              section="low-rank")
    lora_parameters: Dict[str, Any] = key(lambda: dict(LORA_DEFAULTS), "lora: the adapters' rank, scale, dropout and "
                                          "keys (block-relative paths such as self_attn.q_proj; null: every nn.Linear "
                                          "of the adapted blocks), as mlx-lm's; unset parts take these defaults",
                                          "a mapping of rank, scale, dropout and keys, e.g. {rank: 8, scale: 20.0}",
                                          coerce=_lora_parameters)
    num_layers: Optional[int] = key(None, "lora: adapt the last num_layers transformer blocks (null: all); the other "
                                    "blocks' weights are frozen, their α learns", "null (all blocks) or a positive "
                                    "integer, e.g. 16", positive)
    quantized_base: str = key("dequantize", "lora, from a quantized mlx-lm checkpoint: dequantize its weights to 16 bits, "
                              "or keep them packed as the frozen base (QLoRA's: about 1.06 bytes a weight at 8 bits "
                              "in groups of 64, dequantized inside each step)", f"one of {', '.join(QUANTIZED_BASES)}",
                              lambda v: v in QUANTIZED_BASES)
    # the training loss (validation is always next-token cross-entropy)
    loss: str = key("ce", "ce (next-token cross-entropy) or distill (KL to the frozen starting model; needs pretrained)",
                    f"one of {', '.join(LOSSES)}", lambda v: v in LOSSES, section="loss")
    kl_weight: float = key(1.0, "distill: loss = kl_weight * KL + (1 - kl_weight) * CE",
                           "a number in [0, 1] (1: KL only), e.g. 1.0", fraction)
    # memory. Gradient checkpointing trades memory for compute, changing the losses by float rounding only (1e-5), so a
    # resumed run may turn it on or off.
    grad_checkpoint: bool = key(False, "recompute each transformer block in the backward pass, which then runs a block "
                                "at a time (less activation memory; the step is not compiled)",
                                "true or false", section="memory", resume=True)
    freeze_embedding: bool = key(False, "keep the embedding and LM head weights fixed (still fake-quantized; their α, "
                                 "in affine mode, learns)",
                                 "true or false")
    # schedule. A sweep's FP trunk runs at the peak rate after its warmup, so the FP cooldown and
    # everything of the QAT phase belong to the runs that branch from it. On a pretrained start the
    # warmups are 2%: only Adam's moments need them.
    schedule: str = key("separate", "separate or fused (cooldown & QAT fusion)", f"one of {', '.join(SCHEDULES)}",
                        lambda v: v in SCHEDULES, section="schedule", branch=True)
    warmup: float = key(0.05, "FP warmup, as a fraction of the FP phase (warmup_tokens wins when set)",
                        "a fraction of the phase in [0, 1], e.g. 0.05", fraction, pretrained_default=0.02)
    cooldown: float = key(0.2, "FP cooldown, as a fraction of the FP phase (cooldown_tokens wins when set)",
                          "a fraction of the phase in [0, 1], e.g. 0.2", fraction, branch=True)
    warmup_tokens: Optional[int] = key(None, "FP warmup in tokens; when set, wins over `warmup` (runs with "
                                       "different D_fp then share their FP rates)", "null or an integer >= 0, e.g. 1e5",
                                       non_negative)
    cooldown_tokens: Optional[int] = key(None, "FP cooldown in tokens; when set, wins over `cooldown`",
                                         "null or an integer >= 0, e.g. 4e5", non_negative, branch=True)
    qat_warmup: float = key(0.05, "QAT warmup (separate, or QAT from token 0), as a fraction of the QAT phase",
                            "a fraction of the phase in [0, 1], e.g. 0.05", fraction, branch=True, pretrained_default=0.02)
    qat_cooldown: float = key(0.2, "QAT cooldown under separate, as a fraction of the QAT phase (fused decays over "
                              "all of it)", "a fraction of the phase in [0, 1], e.g. 0.2", fraction, branch=True)
    qat_warmup_tokens: Optional[int] = key(None, "QAT warmup in tokens; when set, wins over `qat_warmup`",
                                           "null or an integer >= 0, e.g. 1e4", non_negative, branch=True)
    qat_cooldown_tokens: Optional[int] = key(None, "QAT cooldown in tokens; when set, wins over `qat_cooldown`",
                                             "null or an integer >= 0, e.g. 1e5", non_negative, branch=True)
    # run
    seed: int = key(0, "random seed of the model and the batches", "an integer >= 0, e.g. 0", non_negative, section="run")
    report_every: int = key(10, "steps between progress records", "a positive integer, e.g. 10", positive, resume=True)
    eval_every: int = key(200, "steps between validations", "a positive integer, e.g. 200", positive, resume=True)
    eval_batches: int = key(16, "validation batches per evaluation", "a positive integer, e.g. 16", positive)
    checkpoint_every: int = key(200, "steps between checkpoints", "a positive integer, e.g. 200", positive, resume=True)
    snapshot_at: List[int] = key(list, "token counts at which to keep a named snapshot besides the rolling checkpoint",
                                 "a list of positive token counts, e.g. [5e5, 1e6]", lambda v: all(map(positive, v)),
                                 _token_counts, resume=True, branch=True)
    export_scales: str = key("float32", "dtype of exported scales: float32 (lossless), float16, bfloat16 (affine; "
                             "FP modes store their own 8-bit scales)",
                             f"one of {', '.join(SCALES_DTYPE_NAMES)}", lambda v: v in SCALES_DTYPE_NAMES, branch=True)
    report_to: Optional[str] = key(None, "also send the losses to wandb, swanlab, or both (a comma list), as mlx-lm does",
                                   "null, wandb, swanlab or a comma list of them",
                                   lambda v: set(map(str.strip, v.lower().split(","))) <= {"wandb", "swanlab", ""}, resume=True)
    project_name: Optional[str] = key(None, "the report_to project to log the run under", "null or a project name", bool,
                                      resume=True)
    # baselines at the end of a pretrained start (the starting model and its PTQ are always evaluated)
    compare: List[str] = key(list, "more baselines for a pretrained start: [dwq] (mlx-lm's DWQ on the run's tokens)",
                             f"a list of {', '.join(COMPARISONS)}, e.g. [dwq]", lambda v: set(v) <= set(COMPARISONS),
                             section="baselines")
    dwq_learning_rate: float = key(1e-6, "learning rate of the DWQ baseline (mlx_lm.dwq's default)",
                                   "a positive number, e.g. 1e-6", positive)

    def __post_init__(self):
        self.validate()

    def validate(self) -> None:
        """Coerce every key to its type and check its range; raise ValueError naming the key."""
        for f in dataclasses.fields(self):
            setattr(self, f.name, _checked(f, getattr(self, f.name)))
        if self.mode in FP_MODES:
            self._check_fp_mode()
        elif self.fp_scale != "derived":
            raise ValueError(f"fp_scale={self.fp_scale} chooses an FP mode's scales; mode=affine always learns its "
                             "scales: drop fp_scale, or set mode: mxfp4, nvfp4 or mxfp8")
        QuantSpec(self.bits, self.group_size, self.mode)  # raises with the allowed values
        if self.embedding_bits is not None:
            QuantSpec(self.embedding_bits, self.group_size, self.mode)
        for prefix in ("", "qat_"):
            warmup, cooldown = getattr(self, prefix + "warmup"), getattr(self, prefix + "cooldown")
            if warmup + cooldown > 1:
                raise ValueError(f"{prefix}warmup + {prefix}cooldown = {warmup} + {cooldown} exceeds the phase; "
                                 "make the sum <= 1")
        if self.total_tokens < self.tokens_per_step:
            raise ValueError(f"total_tokens={self.total_tokens} is less than one step of {self.tokens_per_step} tokens")
        if self.snapshot_at and self.snapshot_at[-1] > self.total_tokens:
            raise ValueError(f"snapshot_at={self.snapshot_at} goes past total_tokens={self.total_tokens}; "
                             "use token counts <= total_tokens")
        off_step = [t for t in self.snapshot_at if t % self.tokens_per_step]
        if off_step:
            raise ValueError(f"snapshot_at={off_step} are not step boundaries; use multiples of batch_size * seq_len = "
                             f"{self.tokens_per_step} tokens")
        if self.pretrained is None:
            self._check_model()  # with a pretrained start, the model is the pretrained one
            needs = [(k, why) for k, why, v in (
                ("fine_tune_type: lora", "the starting model is the frozen base", self.fine_tune_type == "lora"),
                ("loss: distill", "the starting model is the teacher", self.loss == "distill"),
                ("compare", "the starting model is the baseline", self.compare)) if v]
            if needs:
                raise ValueError(f"{needs[0][0]} needs a pretrained start ({needs[0][1]}): pass --init-from MODEL, "
                                 "or drop it")
        self._check_fine_tune_type()

    def _check_fp_mode(self) -> None:
        """An FP mode stores one (group size, element bits): a bits, group_size or embedding_bits
        the user set otherwise is one line naming both keys and the fix."""
        group_size, bits = FP_MODES[self.mode]
        for name, want in (("bits", bits), ("group_size", group_size), ("embedding_bits", bits)):
            value = getattr(self, name)
            if value != want and not (name == "embedding_bits" and value is None):
                fix = "leave it unset (it follows the mode)" if name != "embedding_bits" else \
                    "leave it unset (the embedding is quantized in the mode too)"
                raise ValueError(f"mode={self.mode} stores {bits}-bit elements in groups of {group_size}, so "
                                 f"{name}={value!r} cannot be used: {fix}, set {name}: {want}, or use mode: affine")
        if "dwq" in self.compare:  # mlx-lm's DWQ tunes affine scales and biases; an FP mode has neither to tune
            raise ValueError(f"mode={self.mode} has no affine scales and biases for compare: [dwq] to tune: drop dwq "
                             "from compare, or use mode: affine")
        if self.export_scales != "float32":
            raise ValueError(f"mode={self.mode} stores its own 8-bit scales, so export_scales={self.export_scales} "
                             "cannot be used: leave export_scales unset, or use mode: affine")

    def _check_fine_tune_type(self) -> None:
        """What low-rank QAT cannot do (yet), each refused in one line."""
        if self.fine_tune_type == "full":
            if self.num_layers is not None:
                raise ValueError(f"num_layers={self.num_layers} chooses the blocks that fine_tune_type: lora adapts; "
                                 "full QAT trains every block: drop num_layers, or set fine_tune_type: lora")
            if self.quantized_base == "packed":
                raise ValueError("quantized_base: packed keeps a frozen base packed; full QAT trains every weight in "
                                 "float32: drop quantized_base, or set fine_tune_type: lora")
            return
        if self.quantized_base == "packed" and str(self.pretrained).endswith(".gguf"):
            raise ValueError(f"quantized_base: packed keeps an mlx-lm checkpoint's packed weights; {self.pretrained} is a "
                             "GGUF, whose blocks are dequantized on load: drop quantized_base, or start from an mlx-lm "
                             "quantized directory (mlx_lm.convert -q)")
        if self.qat_fraction != 1:
            raise ValueError(f"qat_fraction={self.qat_fraction!r} cannot be used with fine_tune_type: lora, which is "
                             "QAT from token 0 (the base stays frozen: there is no FP phase): leave qat_fraction unset "
                             "(a pretrained start's 1) or set it to 1")
        if self.lora_parameters["dropout"] > 0 and self.grad_checkpoint:
            raise ValueError(f"lora_parameters.dropout={self.lora_parameters['dropout']} with grad_checkpoint: true is "
                             "not supported: a recomputed block draws other dropout masks in the backward pass than "
                             "in the forward; set dropout 0 or grad_checkpoint false")

    def _check_model(self) -> None:
        from .model import model_args  # mlx_lm is slow to import; only a real config needs it

        if not isinstance(self.model, (str, dict)):
            raise ValueError(f"model={self.model!r} must be {FIELDS['model'].metadata['need']}")
        try:
            model_args(self.model, self.vocab_size)
        except (ValueError, TypeError) as e:
            raise ValueError(f"model={self.model!r}: {e}") from None

    @property
    def tokens_per_step(self) -> int:
        return self.batch_size * self.seq_len

    @property
    def spec(self) -> QuantSpec:
        return QuantSpec(self.bits, self.group_size, self.mode, self.fp_scale == "learned")

    @property
    def lora_arguments(self) -> dict:
        """The keyword arguments of `lowrank.to_lowrank_qat`: rank, scale, dropout, keys, num_layers."""
        return {**self.lora_parameters, "num_layers": self.num_layers}

    @property
    def embedding_spec(self) -> QuantSpec:
        bits = self.embedding_bits if self.embedding_bits is not None else default_embedding_bits(self.bits)
        return QuantSpec(bits, self.group_size, self.mode, self.fp_scale == "learned")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


FIELDS = {f.name: f for f in dataclasses.fields(TrainConfig)}


def _keys_that(role: str) -> frozenset:
    return frozenset(name for name, f in FIELDS.items() if f.metadata[role])


RESUME_MAY_CHANGE = _keys_that("resume")
BRANCH_KEYS = _keys_that("branch")
PRETRAINED_DEFAULTS = {name: f.metadata["pretrained_default"] for name, f in FIELDS.items()
                       if f.metadata["pretrained_default"] is not dataclasses.MISSING}
# The defaults an FP mode gives bits and group_size where the user leaves them unset.
MODE_DEFAULTS = {mode: {"bits": bits, "group_size": group_size} for mode, (group_size, bits) in FP_MODES.items()}


def _checked(f: dataclasses.Field, value):
    coerce = f.metadata["coerce"] or _coercer(f.type)
    valid = f.metadata["valid"] or (lambda v: True)
    try:
        new = coerce(value)
        ok = new is None or valid(new)
    except Refused:
        raise
    except (TypeError, ValueError):
        ok = False
    if not ok:
        raise ValueError(f"{f.name}={value!r} must be {f.metadata['need']}")
    return new


def check_keys(keys, where: str) -> None:
    for key in keys:
        if key not in FIELDS:
            near = difflib.get_close_matches(key, FIELDS, n=1)
            hint = f"; did you mean {near[0]!r}?" if near else f"; valid keys: {', '.join(FIELDS)}"
            raise ValueError(f"unknown config key {key!r} in {where}{hint}")


def _yaml(text: str, where: str):
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise ValueError(f"{where} is not valid YAML: {' '.join(str(e).split())}") from None


def default(key: str):
    """The default of a config key (for a from-scratch run)."""
    f = FIELDS[key]
    return f.default_factory() if f.default is dataclasses.MISSING else f.default


def resolve(values: dict) -> TrainConfig:
    """The config of a new run from `values` (the keys the user set): a pretrained start takes
    PRETRAINED_DEFAULTS for the keys it leaves unset, and an FP mode its MODE_DEFAULTS (mxfp4:
    bits 4, group_size 32); its schedule's phases must be whole (check_phases)."""
    start = PRETRAINED_DEFAULTS if values.get("pretrained") is not None else {}
    mode = values.get("mode")
    by_mode = MODE_DEFAULTS.get(mode, {}) if isinstance(mode, str) else {}
    cfg = TrainConfig(**{**start, **by_mode, **values})
    check_phases(cfg)
    return cfg


def check_phases(cfg: TrainConfig) -> None:
    """Refuse a new run whose schedule phases cannot be whole (ScheduleError, a ValueError), before
    any data is read. Only here, where a run is accepted: a saved config (a checkpoint's, to
    export it) is read as it was. With qat_fraction auto, N decides the split, so the check waits
    for the model."""
    if cfg.qat_fraction != "auto":
        make_schedule(cfg, plan_run(cfg, n_params=0))


def load(path: Optional[Path] = None, overrides: Optional[dict] = None) -> TrainConfig:
    """A config from a YAML file, with `overrides` (from flags) taking precedence."""
    values = {}
    if path is not None:
        path = Path(path)
        if not path.exists():
            raise FileNotFoundError(f"config file {path} does not exist")
        values = _yaml(path.read_text(), str(path)) or {}
        if not isinstance(values, dict):
            raise ValueError(f"{path} must be a YAML mapping of config keys")
        check_keys(values, str(path))
    overrides = overrides or {}
    check_keys(overrides, "the command line")
    return resolve({**values, **overrides})


def parse_overrides(args: Sequence[str]) -> dict:
    """`--key value` pairs (values parsed as YAML: 2, 0.5, null, [a, b]) into a dict."""
    overrides, args = {}, list(args)
    while args:
        flag = args.pop(0)
        if not flag.startswith("--"):
            raise ValueError(f"expected --key value, got {flag!r}")
        key, eq, value = flag[2:].partition("=")  # the value keeps its dashes: --data=my-dir
        if not eq:
            if not args or args[0].startswith("--"):
                raise ValueError(f"{flag} needs a value")
            value = args.pop(0)
        overrides[key.replace("-", "_")] = _yaml(value, f"the value of {flag}")
    return overrides


def describe_keys() -> str:
    """--help's list of the keys under their sections, each with its help and default."""
    lines = []
    for f in dataclasses.fields(TrainConfig):
        if f.metadata["section"]:
            lines += ["", f"{f.metadata['section']}:"]
        lines.append(f"  --{f.name.replace('_', '-'):<22} {f.metadata['help']} (default: {default(f.name)!r})")
    modes = "; ".join(f"{m}: bits {d['bits']}, group_size {d['group_size']}" for m, d in MODE_DEFAULTS.items())
    lines.append(f"\nan FP mode sets bits and group_size when you leave them unset, and refuses other values ({modes}); "
                 "the embedding is quantized in the same mode (embedding_bits: unset or the mode's bits)")
    start = ", ".join(f"{k}: {v:g}" for k, v in PRETRAINED_DEFAULTS.items())
    lines.append(f"a pretrained start (--init-from MODEL) changes the defaults of the keys you leave unset to {start}")
    return "\n".join(lines)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.epilog = "config keys (YAML or --key value; flags win over YAML):\n" + describe_keys()
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
