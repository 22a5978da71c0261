"""Model building: llama-family transformers from mlx_lm.models, by preset or by arguments."""

import dataclasses
import difflib
from typing import Union

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten
from mlx_lm.models import llama
from mlx_lm.utils import _get_classes as get_model_classes  # mlx-lm's own model_type lookup

from .layers import is_learned_scale
from .presets import NAMES, PRESETS

DEFAULTS = dict(model_type="llama", rms_norm_eps=1e-5, rope_theta=10000.0, tie_word_embeddings=True)


def model_args(spec: Union[str, dict], vocab_size: int) -> llama.ModelArgs:
    """ModelArgs from a preset name, or a dict of llama arguments (optionally with `preset`)."""
    if isinstance(spec, str):
        spec = {"preset": spec}
    spec = dict(spec)
    preset = spec.pop("preset", None)
    if preset is not None and preset not in PRESETS:
        raise ValueError(f"unknown model preset {preset!r}; use one of {NAMES} or a dict of llama arguments")
    fields = {f.name for f in dataclasses.fields(llama.ModelArgs)}
    for key in spec:
        if key not in fields:
            near = difflib.get_close_matches(key, fields, n=1)
            hint = f" (did you mean {near[0]!r}?)" if near else ""
            raise ValueError(f"unknown model argument {key!r}{hint}")
    args = {**DEFAULTS, **PRESETS.get(preset, {}), **spec, "vocab_size": vocab_size}
    missing = {"hidden_size", "num_hidden_layers", "intermediate_size", "num_attention_heads"} - set(args)
    if missing:
        raise ValueError(f"the model needs {', '.join(sorted(missing))} (or a preset: {NAMES})")
    return llama.ModelArgs(**args)


def config_dict(model: nn.Module) -> dict:
    """The model's `config.json` dict: what mlx-lm needs to build it again."""
    args = getattr(model, "args", None)
    if args is None or not dataclasses.is_dataclass(args):
        raise ValueError("expected an mlx-lm model that carries its ModelArgs as `model.args`")
    return {k: v for k, v in dataclasses.asdict(args).items() if v is not None}


def from_config(config: dict, seed: int = 0) -> nn.Module:
    """A freshly initialised model of any mlx-lm architecture from its `config.json` dict."""
    model_class, args_class = get_model_classes(config)
    mx.random.seed(seed)
    model = model_class(args_class.from_dict(config))
    mx.eval(model.parameters())
    return model


def build(args: llama.ModelArgs, seed: int = 0) -> llama.Model:
    mx.random.seed(seed)
    model = llama.Model(args)
    mx.eval(model.parameters())
    return model


def num_params(model: nn.Module) -> int:
    """N: trainable weights, the tied embedding counted once (learned scales α excluded), and the
    weights of MLX's packed layers (a base kept packed: frozen, counted as the matrices they pack,
    with their biases)."""
    packed = sum(m.weight.size * 32 // m.bits + (m["bias"].size if "bias" in m else 0) for _, m in model.named_modules()
                 if isinstance(m, (nn.QuantizedLinear, nn.QuantizedEmbedding)))
    return packed + sum(v.size for k, v in tree_flatten(model.trainable_parameters()) if not is_learned_scale(k))
