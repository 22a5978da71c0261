"""Model building: llama-family transformers from mlx_lm.models, by preset or by arguments."""

import dataclasses
import difflib
from typing import Any, Dict, Union

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten
from mlx_lm.models import llama
from mlx_lm.utils import _get_classes as get_model_classes  # mlx-lm's own model_type lookup

from .layers import is_learned_scale

# Size presets (vocabulary comes from the data). N counts the tied embedding once. Heads of 64
# dimensions: MLX's fused Metal attention covers head sizes 64/80/128 (smaller ones run unfused),
# and on the CPU, fewer heads mean a smaller score matrix (half the attention time of 32-dim heads).
PRESETS: Dict[str, Dict[str, Any]] = {
    # nano/micro/mini: sizes for scaling-law sweeps on a CPU (configs/sweep_local.yaml)
    "nano": dict(hidden_size=64, num_hidden_layers=2, intermediate_size=192, num_attention_heads=1, num_key_value_heads=1),
    "micro": dict(hidden_size=128, num_hidden_layers=2, intermediate_size=384, num_attention_heads=2, num_key_value_heads=2),
    "mini": dict(hidden_size=192, num_hidden_layers=2, intermediate_size=576, num_attention_heads=3, num_key_value_heads=3),
    "tiny": dict(hidden_size=128, num_hidden_layers=4, intermediate_size=384, num_attention_heads=2, num_key_value_heads=2),
    "small": dict(hidden_size=256, num_hidden_layers=6, intermediate_size=768, num_attention_heads=4, num_key_value_heads=4),
    "base": dict(hidden_size=512, num_hidden_layers=8, intermediate_size=1536, num_attention_heads=8, num_key_value_heads=8),
}
DEFAULTS = dict(model_type="llama", rms_norm_eps=1e-5, rope_theta=10000.0, tie_word_embeddings=True)


def model_args(spec: Union[str, dict], vocab_size: int) -> llama.ModelArgs:
    """ModelArgs from a preset name, or a dict of llama arguments (optionally with `preset`)."""
    if isinstance(spec, str):
        spec = {"preset": spec}
    spec = dict(spec)
    preset = spec.pop("preset", None)
    if preset is not None and preset not in PRESETS:
        raise ValueError(f"unknown model preset {preset!r}; use one of {', '.join(PRESETS)} or a dict of llama arguments")
    fields = {f.name for f in dataclasses.fields(llama.ModelArgs)}
    for key in spec:
        if key not in fields:
            near = difflib.get_close_matches(key, fields, n=1)
            hint = f" (did you mean {near[0]!r}?)" if near else ""
            raise ValueError(f"unknown model argument {key!r}{hint}")
    args = {**DEFAULTS, **PRESETS.get(preset, {}), **spec, "vocab_size": vocab_size}
    missing = {"hidden_size", "num_hidden_layers", "intermediate_size", "num_attention_heads"} - set(args)
    if missing:
        raise ValueError(f"the model needs {', '.join(sorted(missing))} (or a preset: {', '.join(PRESETS)})")
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
    """N: trainable weights, the tied embedding counted once (learned scales α excluded)."""
    return sum(v.size for k, v in tree_flatten(model.trainable_parameters()) if not is_learned_scale(k))
