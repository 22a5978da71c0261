"""Start QAT from a pretrained model: an mlx-lm / Hugging Face directory or a llama GGUF file.

    p = load("path/to/model")       # or "model.Q4_0.gguf"
    to_qat(p.model, quant_specs(p.model, QuantSpec(2, 32)))
    ...                             # train, e.g. with distill.make_distill_loss(teacher, 1.0)
    export(p.model, "out", tokenizer=p.tokenizer, base_config=export_config(p, p.model))

`load` returns the model with float weights (quantized checkpoints and GGUF tensors are
dequantized), its tokenizer as mlx-lm's TokenizerWrapper, and the `config.json` dict that the
export carries over, so the exported model keeps its architecture, rope settings and eos ids.
Every input it cannot serve is refused with one line before the weights are read in full;
`lazy=True` leaves a directory's weights unread until first used, so that a run checks its data
before the slow read.
"""

from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Union

import gguf
import mlx.core as mx
import mlx.nn as nn
import numpy as np
from mlx.utils import tree_flatten
from mlx_lm.gguf import TokenType, translate_weight_names
from mlx_lm.tokenizer_utils import BPEStreamingDetokenizer, TokenizerWrapper
from mlx_lm.utils import _get_classes, dequantize_model, load_config, load_model, load_tokenizer
from safetensors import safe_open
from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers, processors
from transformers import PreTrainedTokenizerFast

from .layers import is_learned_scale, quant_specs
from .quantizers import QuantSpec

QUANTIZATION_KEYS = ("quantization", "quantization_config")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model")
GGUF_EXACT_TYPES = {"F32", "F16", "Q4_0", "Q4_1", "Q8_0"}  # what mx.load converts exactly; others go through gguf
LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                r"|\s*[\r\n]+|\s+(?!\S)|\s+")


@dataclass
class Pretrained:
    model: nn.Module  # an mlx_lm.models Model with float weights
    tokenizer: TokenizerWrapper  # mlx-lm's wrapper; `save_pretrained` writes Hugging Face files
    config: dict  # the config.json dict (no `quantization`) that the export keeps
    source: str


def load(path: Union[str, Path], dtype: Optional[mx.Dtype] = mx.float32, lazy: bool = False,
         packed: bool = False) -> Pretrained:
    """Load a pretrained model to start QAT from: an mlx-lm / Hugging Face model directory
    (safetensors + config.json + tokenizer files, quantized or not) or a llama `.gguf` file.
    dtype: the float type of the weights (float32: the master weights QAT trains), or None: the
    checkpoint's own 16-bit type (`half_dtype`), for a base that stays frozen (low-rank QAT).
    lazy: build the model and check it, but leave a directory's weights unread until they are
    first evaluated (a GGUF file is read whole either way; only its dequantization waits).
    packed: a quantized directory's packed layers stay packed (affine scales and biases in
    `dtype`), for a frozen base that low-rank QAT dequantizes inside each step; a GGUF is
    dequantized regardless."""
    path = Path(path)
    if dtype is not None and not mx.issubdtype(dtype, mx.floating):
        raise ValueError(f"dtype={dtype}; use a float type (mx.float32, mx.bfloat16, mx.float16)")
    if path.is_file() and path.suffix == ".gguf":
        start = _load_gguf(path, dtype)
    elif (path / "config.json").is_file():
        start = _load_directory(path, dtype, packed)
    else:
        raise _not_a_model(path)
    if not lazy:
        mx.eval(start.model.parameters())
    return start


def _not_a_model(path: Path) -> ValueError:
    if (path / "meta.json").is_file() or (path / "checkpoint" / "meta.json").is_file():
        return ValueError(f"{path} is an mlx_qat checkpoint, snapshot or run, already in training form: continue from "
                          "it with `python -m mlx_qat.train --init-from <its checkpoint/ or snapshots/N/>` instead")
    what = "does not exist" if not path.exists() else "is neither a model directory (no config.json) nor a .gguf file"
    return ValueError(f"{path} {what}: pass an mlx-lm / Hugging Face model directory or a llama .gguf file")


def is_model(path: Union[str, Path]) -> bool:
    """Whether `path` looks like what `load` reads (it may still refuse it)."""
    path = Path(path)
    return (path.is_file() and path.suffix == ".gguf") or (path / "config.json").is_file()


def export_config(pretrained: Pretrained, model: nn.Module) -> dict:
    """The config.json dict for exporting `model` (trained from `pretrained`): the original
    fields, so the export keeps the model's identity; `export` adds this run's `quantization`."""
    config = {k: v for k, v in pretrained.config.items() if k not in QUANTIZATION_KEYS}
    model_class, args_class = _get_classes(config)
    args = getattr(model, "args", None)
    if not isinstance(model, model_class) or args != args_class.from_dict(config):
        raise ValueError(f"this {type(model).__module__}.{type(model).__name__} is not the {pretrained.source} "
                         "model (other architecture or arguments): export it with its own config")
    return config


def _load_directory(path: Path, dtype: mx.Dtype, packed: bool = False) -> Pretrained:
    config = load_config(path)
    name = _architecture(config, path)
    if not any((path / f).is_file() for f in TOKENIZER_FILES):
        raise ValueError(f"{path} has no tokenizer ({' or '.join(TOKENIZER_FILES)}): copy the model's tokenizer files in")
    _check_not_qat(path)
    try:
        model, config = load_model(path, lazy=True)  # mlx-lm builds it, packed layers included; read lazily
    except FileNotFoundError:
        raise ValueError(f"{path} has a config.json but no model*.safetensors: pass a complete model directory") from None
    dtype = dtype or half_dtype({v.dtype for _, v in tree_flatten(model.parameters())})  # lazy: the dtypes are known
    model.set_dtype(dtype)  # before dequantizing, so that packed weights dequantize in `dtype`
    if not packed:
        dequantize_model(model)
    _check_layers(model, name, packed)
    tokenizer = load_tokenizer(path, eos_token_ids=config.get("eos_token_id"))
    _check_vocabulary(len(tokenizer), _embedding_rows(model), path)
    config = {k: v for k, v in config.items() if k not in QUANTIZATION_KEYS}
    return Pretrained(model, tokenizer, config, str(path))


def half_dtype(dtypes) -> mx.Dtype:
    """The 16-bit type to keep a checkpoint whose arrays have `dtypes` in: float16 if its float
    arrays (weights, or a quantized model's scales) are float16, else bfloat16 (float32 and
    bfloat16 checkpoints alike: bfloat16 keeps float32's range)."""
    floats = {d for d in dtypes if mx.issubdtype(d, mx.floating)}
    return mx.float16 if floats == {mx.float16} else mx.bfloat16


def _architecture(config: dict, path: Path) -> str:
    """The mlx-lm architecture a config names; a clear error when mlx_lm.models has none."""
    name = config.get("model_type")
    try:
        _get_classes(config)
    except (KeyError, ValueError):
        raise ValueError(f"{path}/config.json names model_type {name!r}, which mlx_lm.models does not implement: "
                         "use a model of an mlx-lm architecture (llama, qwen2, qwen3, mistral, gemma, phi3, ...)") from None
    return name


def _check_not_qat(path: Path) -> None:
    """Refuse weights saved in QAT form (with learned scales α): they are a run's, not a model's."""
    for f in sorted(path.glob("model*.safetensors")):
        with safe_open(str(f), framework="numpy") as weights:
            scale = next((k for k in weights.keys() if is_learned_scale(k)), None)
        if scale is not None:
            raise ValueError(f"{path} holds a model in QAT form ({scale} is a learned scale α): export it with "
                             "`python -m mlx_qat.export`, or continue its run with --init-from its checkpoint")


def _check_layers(model: nn.Module, name: str, packed: bool = False) -> None:
    """Refuse a model QAT would only partly train: every weight matrix must be an nn.Linear or
    nn.Embedding (or, kept `packed`, their packed kinds) that `quant_specs` places."""
    try:
        quant_specs(model, QuantSpec(), packed=packed)
    except ValueError as e:
        raise ValueError(f"{name} is not supported: {e}") from None
    kinds = (nn.Linear, nn.Embedding, nn.QuantizedLinear, nn.QuantizedEmbedding) if packed else (nn.Linear, nn.Embedding)
    for path, m in model.named_modules():
        if not isinstance(m, kinds) and getattr(m.get("weight"), "ndim", 0) > 1:
            raise ValueError(f"{name} is not supported: {path} is a {type(m).__name__}, and QAT trains only "
                             "nn.Linear and nn.Embedding weights; use an architecture whose projections are nn.Linear")


def _embedding_rows(model: nn.Module) -> int:
    return next(m.weight.shape[0] for _, m in model.named_modules() if isinstance(m, (nn.Embedding, nn.QuantizedEmbedding)))


def _check_vocabulary(tokens: int, rows: int, source) -> None:
    if tokens > rows:
        raise ValueError(f"{source}: the tokenizer has {tokens} tokens but the embedding only {rows} rows: "
                         "use the tokenizer that came with this model")


# GGUF


def _load_gguf(path: Path, dtype: mx.Dtype) -> Pretrained:
    try:
        tensors, metadata = mx.load(str(path), return_metadata=True)
    except (RuntimeError, ValueError) as e:
        raise ValueError(f"{path}: MLX cannot read this GGUF ({e}); convert it to F16, Q8_0 or Q4_0 with llama.cpp, "
                         "or load the original Hugging Face directory") from None
    config = gguf_config(metadata, tensors, path)
    tokenizer = gguf_tokenizer(metadata, path)
    _check_vocabulary(len(tokenizer), config["vocab_size"], path)
    model_class, args_class = _get_classes(config)
    model = model_class(args_class.from_dict(config))
    names = {translate_weight_names(k): k for k, _ in tree_flatten(model.parameters())}
    if dtype is None:  # a GGUF's blocks are scaled in float16: F16 and the quantized types alike
        kind = _value(metadata, "general.file_type", path, -1)
        dtype = mx.bfloat16 if kind in (gguf.LlamaFileType.ALL_F32, gguf.LlamaFileType.MOSTLY_BF16) else mx.float16
    weights = _float_tensors(path, tensors, metadata, dtype)
    unknown = sorted(set(weights) - set(names))
    if unknown:
        raise ValueError(f"{path}: tensors {', '.join(unknown[:5])} have no place in an mlx-lm llama; "
                         "this GGUF is not a plain llama")
    model.load_weights([(names[k], v) for k, v in weights.items()], strict=True)
    return Pretrained(model, tokenizer, config, str(path))


def _value(metadata: dict, key: str, path: Path, default=None):
    if key not in metadata:
        if default is not None:
            return default
        raise ValueError(f"{path}: the GGUF metadata has no {key}; the file is incomplete")
    value = metadata[key]
    if isinstance(value, mx.array):  # float32 scalars printed shortest (1e-05, not 9.99999974e-06)
        value = float(str(np.array(value))) if mx.issubdtype(value.dtype, mx.floating) else value.item()
    return value


def gguf_config(metadata: dict, tensors: dict, path: Path) -> dict:
    """The mlx-lm llama config.json of a llama GGUF. llama.cpp stores the Q and K rows of each
    head in the interleaved RoPE order, which MLX's llama computes with rope_traditional."""
    arch = metadata.get("general.architecture")
    if arch != "llama":
        raise ValueError(f"{path} is a GGUF of general.architecture {arch!r}; only llama GGUFs load here: "
                         "for another architecture load its Hugging Face / mlx-lm directory")
    if "rope_freqs.weight" in tensors:
        raise ValueError(f"{path} has llama 3.1-style rope scaling (rope_freqs), which this GGUF loader does not "
                         "rebuild: load the Hugging Face / mlx-lm directory of the model instead")
    get = lambda key, default=None: _value(metadata, f"llama.{key}", path, default)  # noqa: E731
    heads = get("attention.head_count")
    head_dim = get("attention.key_length", get("embedding_length") // heads)
    if get("rope.dimension_count", head_dim) != head_dim:
        raise ValueError(f"{path}: rope covers {get('rope.dimension_count')} of {head_dim} head dimensions, "
                         "which mlx-lm's llama does not do")
    config = {
        "model_type": "llama",
        "architectures": ["LlamaForCausalLM"],
        "hidden_size": get("embedding_length"),
        "num_hidden_layers": get("block_count"),
        "intermediate_size": get("feed_forward_length"),
        "num_attention_heads": heads,
        "num_key_value_heads": get("attention.head_count_kv", heads),
        "head_dim": head_dim,
        "rms_norm_eps": get("attention.layer_norm_rms_epsilon", 1e-5),
        "rope_theta": get("rope.freq_base", 10000.0),
        "rope_traditional": True,
        "vocab_size": tensors["token_embd.weight"].shape[0],
        "tie_word_embeddings": "output.weight" not in tensors,
        "attention_bias": "blk.0.attn_q.bias" in tensors,
        "mlp_bias": "blk.0.ffn_up.bias" in tensors,
    }
    if "llama.context_length" in metadata:
        config["max_position_embeddings"] = get("context_length")
    if "llama.rope.scaling.type" in metadata:
        kind = get("rope.scaling.type")
        if kind != "linear":
            raise ValueError(f"{path}: rope scaling {kind!r} is not supported here (linear is)")
        config["rope_scaling"] = {"type": "linear", "factor": get("rope.scaling.factor")}
    for key in ("bos_token_id", "eos_token_id"):
        if f"tokenizer.ggml.{key}" in metadata:
            config[key] = _value(metadata, f"tokenizer.ggml.{key}", path)
    return config


def _float_tensors(path: Path, tensors: dict, metadata: dict, dtype: mx.Dtype) -> dict:
    """{GGUF name: float weight}: MLX's affine triplets dequantized; tensors of types that
    mx.load does not convert exactly (K-quants, BF16) re-read with the gguf package."""
    out = {}
    for name, w in tensors.items():
        base, kind = name.rsplit(".", 1)
        if kind in ("scales", "biases"):
            continue
        if f"{base}.scales" in tensors:
            scales, biases = (tensors[f"{base}.{k}"].astype(mx.float32) for k in ("scales", "biases"))
            w = mx.dequantize(w, scales, biases, group_size=32, bits=w.shape[-1] // scales.shape[-1])
        out[name] = w
    if _value(metadata, "general.file_type", path, -1) != gguf.LlamaFileType.MOSTLY_F16 and any(
            w.dtype == mx.float16 for w in out.values()):  # F16, BF16 and K-quants alike come back as float16
        for t in gguf.GGUFReader(path).tensors:
            if t.tensor_type.name not in GGUF_EXACT_TYPES:
                out[t.name] = mx.array(gguf.quants.dequantize(t.data, t.tensor_type))
    return {k: v.astype(dtype) for k, v in out.items()}


def _pre_tokenizer(name: str, path: Path):
    """(pre-tokenizer, ignore_merges) of llama.cpp's `tokenizer.ggml.pre`, as Hugging Face builds it."""
    pre = pre_tokenizers
    byte_level = pre.ByteLevel(add_prefix_space=False)  # with GPT-2's split regex
    digits = pre.Sequence([pre.Digits(individual_digits=True), byte_level])
    llama3 = pre.Sequence([pre.Split(Regex(LLAMA3_SPLIT), "isolated"),
                           pre.ByteLevel(add_prefix_space=False, use_regex=False)])
    known = {"gpt2": (byte_level, False), "smollm": (digits, False), "starcoder": (digits, False),
             "refact": (digits, False), "codeshell": (digits, False), "llama-bpe": (llama3, True)}
    if name not in known:
        raise ValueError(f"{path}: tokenizer.ggml.pre {name!r} is not supported (supported: {', '.join(known)}); "
                         "load the Hugging Face directory of the model instead")
    return known[name]


def gguf_tokenizer(metadata: dict, path: Path) -> TokenizerWrapper:
    """The byte-level BPE tokenizer of a GGUF (`tokenizer.ggml.model == "gpt2"`), as a
    transformers tokenizer whose `save_pretrained` writes files that `mlx_lm.load` reads."""
    kind = metadata.get("tokenizer.ggml.model")
    if kind != "gpt2":
        raise ValueError(f"{path}: tokenizer.ggml.model is {kind!r}; only byte-level BPE ('gpt2') tokenizers are "
                         "rebuilt from a GGUF: load the Hugging Face directory of the model instead")
    pre, ignore_merges = _pre_tokenizer(metadata.get("tokenizer.ggml.pre"), path)
    tokens = _value(metadata, "tokenizer.ggml.tokens", path)
    merges = [tuple(m.split(" ", 1)) for m in _value(metadata, "tokenizer.ggml.merges", path)]
    types = np.array(metadata.get("tokenizer.ggml.token_type", np.full(len(tokens), TokenType.NORMAL)))
    tok = Tokenizer(models.BPE({t: i for i, t in enumerate(tokens)}, merges, ignore_merges=ignore_merges))
    tok.pre_tokenizer, tok.decoder = pre, decoders.ByteLevel()
    tok.add_special_tokens([AddedToken(tokens[i], special=True, normalized=False)
                            for i in np.flatnonzero(types == TokenType.CONTROL)])
    tok.add_tokens([AddedToken(tokens[i], normalized=False) for i in np.flatnonzero(types == TokenType.USER_DEFINED)])
    ids = {k: _value(metadata, f"tokenizer.ggml.{k}_token_id", path)
           for k in ("bos", "eos", "padding") if f"tokenizer.ggml.{k}_token_id" in metadata}
    special = {k: tokens[i] for k, i in ids.items()}
    added = {k: special[k] for k in ("bos", "eos")
             if k in special and _value(metadata, f"tokenizer.ggml.add_{k}_token", path, False)}
    if added:  # llama.cpp adds BOS (and/or EOS) to every sequence when the GGUF says so
        single = " ".join(filter(None, [added.get("bos"), "$A", added.get("eos")]))
        tok.post_processor = processors.TemplateProcessing(
            single=single, special_tokens=[(t, tok.token_to_id(t)) for t in added.values()])
    hf = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=special.get("bos"), eos_token=special.get("eos"),
                                 pad_token=special.get("padding"), chat_template=metadata.get("tokenizer.chat_template"))
    return TokenizerWrapper(hf, BPEStreamingDetokenizer, eos_token_ids=[ids["eos"]] if "eos" in ids else None)
