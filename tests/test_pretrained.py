"""Starting QAT from pretrained models: mlx-lm directories of several architectures (one
quantized), a llama GGUF with quantized tensors and its tokenizer, the refusals, the
distillation loss, and runs of `python -m mlx_qat.train --init-from MODEL` end to end."""

import copy
import inspect
import json
import subprocess
import sys
from pathlib import Path

import gguf
import mlx.core as mx
import mlx.nn as nn
import mlx.optimizers as optim
import mlx_lm
import numpy as np
import pytest
import yaml
from gguf.quants import dequantize, quantize
from mlx.utils import tree_flatten
from mlx_lm.gguf import permute_weights, translate_weight_names
from mlx_lm.utils import quantize_model, save_config, save_model

from mlx_qat import QuantSpec, checkpoint, config, data, init_scale, report, train
from mlx_qat.distill import make_distill_loss
from mlx_qat.evaluate import evaluate, loss_fn
from mlx_qat.export import export, main as export_main
from mlx_qat.layers import quant_specs, to_qat
from mlx_qat.model import from_config
from mlx_qat.pretrained import _pre_tokenizer, export_config, load

from conftest import CHAT_TEMPLATE, SPECIALS, VOCAB, random_text, read_jsonl

SMALL = dict(hidden_size=64, num_hidden_layers=2, intermediate_size=128, num_attention_heads=2,
             num_key_value_heads=1, rms_norm_eps=1e-5, vocab_size=VOCAB)
ARCHS = {
    "llama": dict(tie_word_embeddings=False),
    "mistral": {},
    "qwen2": dict(tie_word_embeddings=True),
    "qwen3": dict(head_dim=32, max_position_embeddings=256, tie_word_embeddings=True, rope_theta=1e6),
    "gemma": dict(head_dim=32),
    "gemma2": dict(head_dim=32, query_pre_attn_scalar=32, sliding_window=16),
    "gemma3_text": dict(head_dim=32, query_pre_attn_scalar=32, sliding_window=16, sliding_window_pattern=2),
    "phi3": dict(num_key_value_heads=2, max_position_embeddings=256),
}
IDS = mx.array([[1, 5, 9, 22, 100, 7, 300, 41]])


def save_directory(path: Path, model: nn.Module, config: dict, tokenizer) -> Path:
    """An mlx-lm model directory written with mlx-lm's own functions."""
    save_model(path, model)
    save_config({**config, "architectures": ["ForTests"], "eos_token_id": [2, 0]}, path / "config.json")
    tokenizer.save_pretrained(str(path))
    return path


def qat_export_reload(p, tmp_path: Path):
    """to_qat at 2 bits, export with the pretrained config, reload and generate with mlx-lm."""
    to_qat(p.model, quant_specs(p.model, QuantSpec(2, 32)))
    export(p.model, tmp_path / "export", tokenizer=p.tokenizer, base_config=export_config(p, p.model))
    model, tokenizer, config = mlx_lm.load(str(tmp_path / "export"), return_config=True)
    np.testing.assert_allclose(np.array(model(IDS)), np.array(p.model(IDS)), atol=1e-4, rtol=1e-4)
    assert isinstance(mlx_lm.generate(model, tokenizer, "hello world", max_tokens=3), str)
    return config, tokenizer


@pytest.mark.parametrize("arch", list(ARCHS))
def test_directory_loads_equal_and_exports(arch, bpe, tmp_path):
    config = {"model_type": arch, **SMALL, **ARCHS[arch]}
    original = from_config(config, seed=1)
    p = load(save_directory(tmp_path / "model", original, config, bpe))
    np.testing.assert_allclose(np.array(p.model(IDS)), np.array(original(IDS)), atol=1e-6, rtol=1e-6)
    assert p.config["architectures"] == ["ForTests"] and p.source == str(tmp_path / "model")
    exported, _ = qat_export_reload(p, tmp_path)
    assert exported["architectures"] == ["ForTests"] and exported["eos_token_id"] == [2, 0]
    assert exported["quantization"]["bits"] == 2


def test_a_lazy_load_reads_the_weights_only_when_they_are_used(bpe, tmp_path):
    """What lets a run check its data before the slow read of a large model's weights."""
    config = {"model_type": "llama", **SMALL, **ARCHS["llama"]}
    path = save_directory(tmp_path / "model", from_config(config, seed=1), config, bpe)
    lazy, eager = load(path, lazy=True), load(path)
    save_model(path, from_config(config, seed=2))  # the file changes after both loads
    later = dict(tree_flatten(from_config(config, seed=2).parameters()))
    first = dict(tree_flatten(from_config(config, seed=1).parameters()))
    for name, value in tree_flatten(lazy.model.parameters()):
        assert mx.array_equal(value, later[name]).item(), name
    for name, value in tree_flatten(eager.model.parameters()):
        assert mx.array_equal(value, first[name]).item(), name


def test_tied_gemma3_text_exports_tied(bpe, tmp_path):
    config = {"model_type": "gemma3_text", **SMALL, **ARCHS["gemma3_text"]}
    original = from_config(config, seed=1)
    original.sanitize({})  # no lm_head.weight: tied, as mlx_lm.load ties it
    p = load(save_directory(tmp_path / "model", original, config, bpe))
    assert "lm_head" not in p.model
    qat_export_reload(p, tmp_path)


def test_quantized_directory_loads_dequantized(bpe, tmp_path):
    config = {"model_type": "llama", **SMALL}
    quantized, config = quantize_model(from_config(config, seed=2), config, group_size=32, bits=4)
    p = load(save_directory(tmp_path / "model", quantized, config, bpe))
    assert not any(isinstance(m, nn.QuantizedLinear) for _, m in p.model.named_modules())
    assert "quantization" not in p.config and "quantization_config" not in p.config
    assert all(v.dtype == mx.float32 for _, v in tree_flatten(p.model.parameters()))
    np.testing.assert_allclose(np.array(p.model(IDS)), np.array(quantized(IDS)), atol=1e-5, rtol=1e-5)
    exported, _ = qat_export_reload(p, tmp_path)
    assert exported["quantization"]["group_size"] == 32


# GGUF: an HF-order llama written as llama.cpp's converter writes it (Q/K rows permuted)

GGUF_TYPES = {  # tensors stored quantized; the rest F32
    "blk.0.ffn_up.weight": gguf.GGMLQuantizationType.Q8_0,
    "blk.1.attn_q.weight": gguf.GGMLQuantizationType.Q4_0,
    "blk.0.attn_k.weight": gguf.GGMLQuantizationType.Q4_1,
    "blk.1.ffn_gate.weight": gguf.GGMLQuantizationType.F16,
    "blk.0.attn_v.weight": gguf.GGMLQuantizationType.BF16,  # BF16 and K-quants: read through the gguf package
    "blk.1.ffn_down.weight": gguf.GGMLQuantizationType.Q4_K,
}
GGUF_LLAMA = {"model_type": "llama", **SMALL, "intermediate_size": 256, "tie_word_embeddings": True}  # K-quant rows: 256


def q4_k_blocks(rows: int, cols: int) -> np.ndarray:
    """Random Q4_K blocks (256 weights in 144 bytes: d, dmin, 12 bytes of scales, 128 of codes)."""
    blocks = np.random.default_rng(0).integers(0, 256, (rows, cols // 256, 144), dtype=np.uint8)
    blocks[..., 0:4] = np.frombuffer(np.array([0.002, 0.002], np.float16).tobytes(), np.uint8)
    return blocks.reshape(rows, -1)


def write_gguf(path: Path, model: nn.Module, tokenizer, arch="llama", **metadata) -> dict:
    """Write `model` (HF order) as a GGUF; return {mlx-lm name: the float weight it stores}."""
    args = model.args
    writer = gguf.GGUFWriter(str(path), arch)
    writer.add_block_count(args.num_hidden_layers)
    writer.add_context_length(256)
    writer.add_embedding_length(args.hidden_size)
    writer.add_feed_forward_length(args.intermediate_size)
    writer.add_head_count(args.num_attention_heads)
    writer.add_head_count_kv(args.num_key_value_heads)
    writer.add_rope_dimension_count(args.hidden_size // args.num_attention_heads)
    writer.add_rope_freq_base(args.rope_theta)
    writer.add_layer_norm_rms_eps(args.rms_norm_eps)
    writer.add_file_type(gguf.LlamaFileType.MOSTLY_Q8_0)
    vocab = sorted(tokenizer.get_vocab().items(), key=lambda kv: kv[1])
    state = json.loads(tokenizer.backend_tokenizer.to_str())
    fields = {
        "tokenizer.ggml.model": "gpt2",
        "tokenizer.ggml.pre": "gpt2",
        "tokenizer.ggml.tokens": [t for t, _ in vocab],
        "tokenizer.ggml.merges": [m if isinstance(m, str) else " ".join(m) for m in state["model"]["merges"]],
        "tokenizer.ggml.token_type": [3 if t in SPECIALS else 1 for t, _ in vocab],
        "tokenizer.ggml.bos_token_id": tokenizer.bos_token_id,
        "tokenizer.ggml.eos_token_id": tokenizer.eos_token_id,
        "tokenizer.chat_template": CHAT_TEMPLATE,
        **metadata,
    }
    for key, value in fields.items():
        if value is not None:
            writer.add_key_value(key, value, _gguf_type(key, value))
    stored = {}
    for name, w in tree_flatten(model.parameters()):
        kind = GGUF_TYPES.get(translate_weight_names(name), gguf.GGMLQuantizationType.F32)
        if kind == gguf.GGMLQuantizationType.Q4_K:  # gguf cannot quantize to it: random blocks stand in
            data = q4_k_blocks(*w.shape)
            stored[name] = dequantize(data, kind)
        else:
            stored[name] = dequantize(quantize(np.array(w), kind), kind)  # what the file holds, in HF order
            if name.endswith(("q_proj.weight", "k_proj.weight")):  # as mlx_lm.gguf.convert_to_gguf writes them
                w = permute_weights(w, args.num_attention_heads, args.num_key_value_heads if "k_proj" in name else None)
            data = quantize(np.array(w), kind)
        writer.add_tensor(translate_weight_names(name), data, raw_dtype=kind)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return stored


def _gguf_type(key, value):
    types = {bool: gguf.GGUFValueType.BOOL, int: gguf.GGUFValueType.UINT32, str: gguf.GGUFValueType.STRING,
             list: gguf.GGUFValueType.ARRAY}
    return types[type(value)]


@pytest.fixture(scope="module")
def hf_llama() -> nn.Module:
    return from_config(GGUF_LLAMA, seed=3)


def test_gguf_loads_as_the_original_llama(hf_llama, bpe, tmp_path):
    stored = write_gguf(tmp_path / "m.gguf", hf_llama, bpe)
    # The same HF-order model with the weights the GGUF holds: the Q/K permutation and
    # rope_traditional cancel, so the logits agree.
    reference = from_config(GGUF_LLAMA)
    reference.load_weights([(k, mx.array(v)) for k, v in stored.items()])
    p = load(tmp_path / "m.gguf")
    assert p.config["rope_traditional"] and p.config["tie_word_embeddings"] and p.config["eos_token_id"] == bpe.eos_token_id
    np.testing.assert_allclose(np.array(p.model(IDS)), np.array(reference(IDS)), atol=2e-5, rtol=1e-5)

    text = "hello 123 wörld <|im_start|>user\nhi<|im_end|>"
    assert p.tokenizer.encode(text) == bpe.encode(text) and p.tokenizer.decode(bpe.encode(text)) == text
    chat = [{"role": "user", "content": "hi"}]
    assert p.tokenizer.apply_chat_template(chat, add_generation_prompt=True, tokenize=False) == \
        bpe.apply_chat_template(chat, add_generation_prompt=True, tokenize=False)

    exported, tokenizer = qat_export_reload(p, tmp_path)
    assert exported["rope_traditional"] and tokenizer.encode(text) == bpe.encode(text)
    assert tokenizer.chat_template == CHAT_TEMPLATE and tokenizer.eos_token_id == bpe.eos_token_id


def test_gguf_bos_is_added_when_the_file_says_so(hf_llama, bpe, tmp_path):
    write_gguf(tmp_path / "m.gguf", hf_llama, bpe, **{"tokenizer.ggml.add_bos_token": True})
    tokenizer = load(tmp_path / "m.gguf").tokenizer
    assert tokenizer.encode("hello") == [bpe.bos_token_id] + bpe.encode("hello")


def test_gguf_pre_tokenizers_split_as_their_models_do():
    def pieces(name, text):
        return [p for p, _ in _pre_tokenizer(name, Path("m.gguf"))[0].pre_tokenize_str(text)]

    assert pieces("gpt2", "abc 12345") == ["abc", "Ġ12345"]
    assert pieces("smollm", "abc 12345") == ["abc", "Ġ", "1", "2", "3", "4", "5"]
    assert pieces("llama-bpe", "abc 12345") == ["abc", "Ġ", "123", "45"]


# Refusals: one clear line each, before the weights are read


def expect_error(path, *words):
    with pytest.raises(ValueError) as e:
        load(path)
    message = str(e.value)
    assert "\n" not in message and all(w in message for w in words), message


def test_refuses_paths_that_are_no_model(tmp_path):
    expect_error(tmp_path / "missing", "does not exist")
    expect_error(tmp_path, "no config.json", ".gguf")
    (tmp_path / "notes.txt").write_text("hi")
    expect_error(tmp_path / "notes.txt", "neither")
    with pytest.raises(ValueError, match="float type"):
        load(tmp_path, dtype=mx.int32)


def test_refuses_unknown_and_unsupported_architectures(bpe, tmp_path):
    (tmp_path / "unknown").mkdir()
    (tmp_path / "unknown" / "config.json").write_text(json.dumps({"model_type": "nonexistent_arch"}))
    expect_error(tmp_path / "unknown", "'nonexistent_arch'", "mlx_lm.models")
    config = {"model_type": "mixtral", **SMALL, "num_local_experts": 2, "num_experts_per_tok": 1}
    moe = save_directory(tmp_path / "moe", from_config(config), config, bpe)
    expect_error(moe, "mixtral", "SwitchLinear", "switch_mlp")


def test_refuses_a_directory_without_weights_or_tokenizer(bpe, tmp_path):
    config = {"model_type": "llama", **SMALL}
    path = save_directory(tmp_path / "model", from_config(config), config, bpe)
    (path / "model.safetensors").rename(tmp_path / "weights")
    expect_error(path, "no model*.safetensors")
    (tmp_path / "weights").rename(path / "model.safetensors")
    for f in ("tokenizer.json", "tokenizer_config.json"):
        (path / f).unlink()
    expect_error(path, "no tokenizer")


def test_refuses_a_tokenizer_larger_than_the_embedding(bpe, tmp_path):
    config = {"model_type": "llama", **SMALL, "vocab_size": 256}
    expect_error(save_directory(tmp_path / "model", from_config(config), config, bpe), "320 tokens", "256 rows")


def test_refuses_a_checkpoint_in_qat_form(tmp_path):
    model = from_config({"model_type": "llama", **SMALL})
    to_qat(model, quant_specs(model, QuantSpec(2, 32)))
    checkpoint.save(tmp_path / "run" / "checkpoint", model, optim.Adam(learning_rate=1e-3), {"step": 0})
    expect_error(tmp_path / "run" / "checkpoint", "--init-from")
    expect_error(tmp_path / "run", "--init-from")


def test_refuses_gguf_it_cannot_rebuild(hf_llama, bpe, tmp_path):
    write_gguf(tmp_path / "qwen.gguf", hf_llama, bpe, arch="qwen2")
    expect_error(tmp_path / "qwen.gguf", "general.architecture 'qwen2'")
    write_gguf(tmp_path / "spm.gguf", hf_llama, bpe, **{"tokenizer.ggml.model": "llama"})
    expect_error(tmp_path / "spm.gguf", "tokenizer.ggml.model is 'llama'")
    write_gguf(tmp_path / "pre.gguf", hf_llama, bpe, **{"tokenizer.ggml.pre": "exotic"})
    expect_error(tmp_path / "pre.gguf", "'exotic'", "smollm")
    small = from_config({**GGUF_LLAMA, "vocab_size": 256})
    write_gguf(tmp_path / "small.gguf", small, bpe)
    expect_error(tmp_path / "small.gguf", "320 tokens", "256 rows")


def test_export_config_refuses_another_model(bpe, tmp_path):
    config = {"model_type": "llama", **SMALL}
    p = load(save_directory(tmp_path / "model", from_config(config), config, bpe))
    with pytest.raises(ValueError, match="not the"):
        export_config(p, from_config({**config, "num_hidden_layers": 1}))


# Distillation


def reference_distill(student_logits, teacher_logits, targets, kl_weight):
    def log_softmax(x):
        x = x.astype(np.float64)
        m = x.max(-1, keepdims=True)
        return x - m - np.log(np.exp(x - m).sum(-1, keepdims=True))

    log_q, log_p = log_softmax(student_logits), log_softmax(teacher_logits)
    kl = (np.exp(log_p) * (log_p - log_q)).sum(-1).mean()
    ce = -np.take_along_axis(log_q, targets[..., None], -1).mean()
    return kl_weight * kl + (1 - kl_weight) * ce


@pytest.mark.parametrize("kl_weight", [0.0, 0.3, 1.0])
def test_distill_loss_matches_numpy(kl_weight):
    config = {"model_type": "llama", **SMALL}
    teacher, student = from_config(config, seed=4), from_config(config, seed=5)
    batch = mx.random.randint(0, VOCAB, (3, 12), key=mx.random.key(0))
    loss = make_distill_loss(teacher, kl_weight)(student, batch).item()
    expected = reference_distill(np.array(student(batch[:, :-1])), np.array(teacher(batch[:, :-1])),
                                 np.array(batch[:, 1:]), kl_weight)
    assert loss == pytest.approx(expected, rel=1e-5)

    def plain(model, batch):  # the textbook form, through mx.logsumexp
        log_q = (lambda s: s - mx.logsumexp(s, axis=-1, keepdims=True))(model(batch[:, :-1]))
        log_p = (lambda t: t - mx.logsumexp(t, axis=-1, keepdims=True))(mx.stop_gradient(teacher(batch[:, :-1])))
        ce = -mx.take_along_axis(log_q, batch[:, 1:, None], axis=-1).mean()
        return kl_weight * (mx.exp(log_p) * (log_p - log_q)).sum(axis=-1).mean() + (1 - kl_weight) * ce

    grads = [dict(tree_flatten(nn.value_and_grad(student, f)(student, batch)[1]))
             for f in (make_distill_loss(teacher, kl_weight), plain)]
    for name, g in grads[0].items():
        np.testing.assert_allclose(np.array(g), np.array(grads[1][name]), rtol=1e-3, atol=1e-6, err_msg=name)


def test_softmax_and_lse_hold_at_large_logits():
    from mlx_qat.distill import softmax_and_lse

    logits = mx.array([[1e3, 0.0, -1e3], [88.0, 89.0, 90.0]])
    p, lse = softmax_and_lse(logits)
    assert mx.allclose(p, mx.softmax(logits, axis=-1)).item()
    assert mx.allclose(lse, mx.logsumexp(logits, axis=-1, keepdims=True)).item() and mx.isfinite(lse).all().item()


def test_distill_loss_edges():
    config = {"model_type": "llama", **SMALL}
    teacher, student = from_config(config, seed=4), from_config(config, seed=5)
    batch = mx.random.randint(0, VOCAB, (2, 9), key=mx.random.key(1))
    assert make_distill_loss(teacher, 0)(student, batch).item() == pytest.approx(loss_fn(student, batch).item(), rel=1e-6)
    assert make_distill_loss(teacher, 1)(from_config(config, seed=4), batch).item() == pytest.approx(0, abs=1e-6)
    loss, grads = nn.value_and_grad(student, make_distill_loss(teacher, 0.5))(student, batch)
    assert all(mx.isfinite(g).all().item() for _, g in tree_flatten(grads))
    for bad in (-0.1, 1.5, "1"):
        with pytest.raises(ValueError, match="kl_weight"):
            make_distill_loss(teacher, bad)
    with pytest.raises(ValueError, match="second time"):
        make_distill_loss(teacher, 1)(teacher, batch)


# Training from a pretrained start: python -m mlx_qat.train --init-from MODEL


STEPS = 4
RUN = dict(batch_size=4, seq_len=32, bits=2, group_size=32, report_every=1, eval_every=100, eval_batches=2,
           checkpoint_every=100)


def start_config(model, corpus, tmp_path, **keys):
    """A run's config as the command line resolves it: `pretrained` set, the rest given."""
    values = dict(pretrained=str(model), data=str(corpus), data_cache=str(tmp_path / "cache"),
                  total_tokens=STEPS * 4 * 32, **RUN)
    return config.resolve({**values, **keys})


def model_dir(arch, bpe, path, **extra) -> Path:
    config_ = {"model_type": arch, **SMALL, **ARCHS[arch], **extra}
    return save_directory(path, from_config(config_, seed=1), config_, bpe)


def step_losses(out: Path) -> dict:
    return {r["step"]: r["loss"] for r in read_jsonl(out / "metrics.jsonl") if "loss" in r}


def check_finished(out: Path, summary: dict, **config_json):
    """QAT from token 0, every loss of the comparison reported, and an export that mlx-lm loads
    with the input's identity and uses to generate."""
    assert (summary["D_fp"], summary["qat_fraction"], summary["B"]) == (0, 1.0, 2)
    for key in ("reference_val_loss", "ptq_val_loss", "final_val_loss", "exported_val_loss"):
        assert np.isfinite(summary[key]), key
    assert summary["exported_val_loss"] == pytest.approx(summary["final_val_loss"], rel=1e-4)
    assert summary["peak_memory_bytes"] > 0 and "peak memory" in report.format_summary(summary)
    model, tokenizer, exported = mlx_lm.load(str(out / "model"), return_config=True)
    assert exported["quantization"]["bits"] == 2 and all(exported[k] == v for k, v in config_json.items())
    assert tokenizer.chat_template == CHAT_TEMPLATE
    assert isinstance(mlx_lm.generate(model, tokenizer, "hello world", max_tokens=3), str)


@pytest.mark.parametrize("arch, loss", [("llama", "ce"), ("qwen3", "distill"), ("gemma3_text", "ce")])
def test_qat_from_a_pretrained_directory(arch, loss, bpe, corpus, tmp_path):
    cfg = start_config(model_dir(arch, bpe, tmp_path / "model"), corpus, tmp_path, loss=loss, kl_weight=0.5)
    assert (cfg.learning_rate, cfg.warmup, cfg.qat_fraction) == (1e-4, 0.02, 1.0)  # the fine-tuning defaults
    summary = train.run(cfg, tmp_path / "run", show_progress=False)
    check_finished(tmp_path / "run", summary, architectures=["ForTests"], eos_token_id=[2, 0], model_type=arch)
    assert summary["loss"] == loss and sorted(step_losses(tmp_path / "run")) == list(range(1, STEPS + 1))
    # the data were tokenized with the model's own tokenizer (and cached under it)
    dataset = data.load(cfg, load(cfg.pretrained).tokenizer)
    assert dataset.vocab_size == VOCAB and (dataset.path / "tokenizer.json").exists()


def test_qat_from_a_gguf_on_the_command_line(hf_llama, bpe, corpus, tmp_path, capsys):
    write_gguf(tmp_path / "m.gguf", hf_llama, bpe)
    out = tmp_path / "run"
    train.main(["--init-from", str(tmp_path / "m.gguf"), "--out", str(out), "--no-progress", "--data", str(corpus),
                "--data-cache", str(tmp_path / "cache"), "--total-tokens", str(STEPS * 128),
                *[a for k, v in RUN.items() for a in (f"--{k.replace('_', '-')}", str(v))]])
    table = capsys.readouterr().out
    assert "val loss, starting model" in table and "val loss, PTQ" in table and "m.gguf" in table
    summary = json.loads((out / "summary.json").read_text())
    check_finished(out, summary, rope_traditional=True, model_type="llama")
    # mlx-lm's own commands on the export: generate, and chat (one turn, then `q`)
    def mlx_lm_cli(*args, **kw):
        return subprocess.run([sys.executable, "-m", "mlx_lm", *args, "--model", str(out / "model"), "--max-tokens", "3"],
                              capture_output=True, text=True, timeout=300, **kw)

    generated = mlx_lm_cli("generate", "--prompt", "hello")
    assert generated.returncode == 0 and "Generation:" in generated.stdout, generated.stderr
    chatted = mlx_lm_cli("chat", input="hello\nq\n")  # a turn through the chat template, then a clean exit
    assert chatted.returncode == 0 and "bye" in chatted.stdout and "Traceback" not in chatted.stderr, chatted.stderr
    assert yaml.safe_load((out / "config.yaml").read_text())["pretrained"] == str(tmp_path / "m.gguf")


def test_dwq_baseline_on_the_same_tokens(bpe, corpus, tmp_path, monkeypatch):
    from mlx_qat import baselines

    cfg = start_config(model_dir("llama", bpe, tmp_path / "model"), corpus, tmp_path, compare=["dwq"],
                       dwq_learning_rate=1e-3)
    dwq_quantize, seen = baselines.dwq_quantize, []

    def recorded(*args, **kwargs):
        seen.append(inspect.signature(dwq_quantize).bind(*args, **kwargs).arguments)
        return dwq_quantize(*args, **kwargs)

    monkeypatch.setattr(baselines, "dwq_quantize", recorded)
    summary = train.run(cfg, tmp_path / "run", show_progress=False)
    assert np.isfinite(summary["dwq_val_loss"]) and summary["dwq_val_loss"] != summary["ptq_val_loss"]
    # DWQ trained once, on the windows of the run's own batches: every step's, in order
    assert sorted(step_losses(tmp_path / "run")) == list(range(1, STEPS + 1)) and len(seen) == 1
    dataset = data.load(cfg, load(cfg.pretrained).tokenizer)
    batches = [data.batch(dataset.train, cfg.batch_size, cfg.seq_len, cfg.seed, step) for step in range(STEPS)]
    assert seen[0]["train_data"] == [(row.tolist(), 0) for batch in batches for row in batch]
    assert (seen[0]["batch_size"], seen[0]["max_seq_length"]) == (cfg.batch_size, cfg.seq_len + 1)
    validation = next(data.eval_batches(dataset.val, cfg.batch_size, cfg.seq_len, 1))
    assert {tuple(row) for row, _ in seen[0]["valid_data"]} <= {tuple(row.tolist()) for row in validation}


@pytest.mark.parametrize("arch, bits, group_size", [("llama", 2, 32), ("qwen2", 2, 32), ("qwen2", 3, 64), ("llama", 4, 64)])
def test_dwq_float_path_has_the_packed_layers_values_and_gradients(arch, bits, group_size):
    """What DWQ trains on a CPU: the same loss and scale/bias gradients as MLX's quantized matmul
    (qwen2: a tied head, through QuantizedEmbedding.as_linear; 3 bits: a packing across words)."""
    from mlx_qat import baselines

    packed = from_config({"model_type": arch, **SMALL, **ARCHS[arch]}, seed=1)
    nn.quantize(packed, group_size=group_size, bits=bits)
    packed.apply_to_modules(lambda _, m: m.unfreeze(keys=["scales", "biases"], recurse=False) if hasattr(m, "bits") else None)
    floated = baselines.float_path(copy.deepcopy(packed))
    assert {type(m).__name__ for _, m in floated.named_modules()} >= {"FloatPathLinear", "FloatPathEmbedding"}
    ids = mx.array([[1, 5, 9, 22, 100, 7, 300, 41, 3]])
    results = [nn.value_and_grad(m, lambda model: loss_fn(model, ids))(m) for m in (packed, floated)]
    (loss_a, grads_a), (loss_b, grads_b) = results
    assert loss_a.item() == pytest.approx(loss_b.item(), rel=1e-5)
    a, b = dict(tree_flatten(grads_a)), dict(tree_flatten(grads_b))
    assert a.keys() == b.keys() and any(k.endswith("scales") for k in a)
    for k in a:
        np.testing.assert_allclose(np.array(a[k]), np.array(b[k]), rtol=1e-3, atol=1e-5, err_msg=k)


def test_ptq_baseline_is_mlx_lm_quantization_at_the_exports_bits(bpe, corpus, tmp_path):
    from mlx_qat import baselines

    p = load(model_dir("llama", bpe, tmp_path / "model"))
    cfg = start_config(tmp_path / "model", corpus, tmp_path)
    packed = {path: (type(m).__name__, m.bits) for path, m in baselines.ptq(p, cfg).named_modules() if hasattr(m, "bits")}
    assert packed["model.embed_tokens"] == ("QuantizedEmbedding", 4) and packed["lm_head"] == ("QuantizedLinear", 4)
    assert packed["model.layers.0.mlp.up_proj"] == ("QuantizedLinear", 2)
    # with the embedding at the blocks' bits, it is what `mlx_lm.convert -q --q-bits 2 --q-group-size 32` makes
    same = baselines.ptq(p, start_config(tmp_path / "model", corpus, tmp_path, embedding_bits=2))
    convert, _ = quantize_model(from_config({"model_type": "llama", **SMALL, **ARCHS["llama"]}, seed=1), p.config,
                                group_size=32, bits=2)
    assert mx.array_equal(same(IDS), convert(IDS)).item()


def test_a_tied_gemma3_text_run_rebuilds_from_its_snapshot(bpe, corpus, tmp_path):
    config_ = {"model_type": "gemma3_text", **SMALL, **ARCHS["gemma3_text"]}
    original = from_config(config_, seed=1)
    original.sanitize({})  # tied: no lm_head
    path = save_directory(tmp_path / "model", original, config_, bpe)
    cfg = start_config(path, corpus, tmp_path, snapshot_at=[STEPS * 128])
    summary = train.run(cfg, tmp_path / "run", show_progress=False)
    model, _ = checkpoint.load_model(tmp_path / "run" / "snapshots" / str(STEPS * 128))
    assert "lm_head" not in model
    batches = list(data.eval_batches(data.load(cfg, load(path).tokenizer).val, 4, 32, 2))
    assert evaluate(model, batches) == pytest.approx(summary["final_val_loss"], rel=1e-5)
    # python -m mlx_qat.export keeps the pretrained model's config.json and tokenizer too
    export_main(["--checkpoint", str(tmp_path / "run" / "snapshots" / str(STEPS * 128)), "--out", str(tmp_path / "x")])
    loaded, tokenizer, exported = mlx_lm.load(str(tmp_path / "x"), return_config=True)
    assert exported["architectures"] == ["ForTests"] and tokenizer.chat_template == CHAT_TEMPLATE
    assert evaluate(loaded, batches) == pytest.approx(summary["final_val_loss"], rel=1e-5)


def test_ternary_has_no_ptq_baseline(bpe, corpus, tmp_path):
    cfg = start_config(model_dir("llama", bpe, tmp_path / "model"), corpus, tmp_path, bits=1.58, total_tokens=128)
    summary = train.run(cfg, tmp_path / "run", show_progress=False)
    assert summary["ptq_val_loss"] is None and "1.58" in summary["ptq_note"]
    assert np.isfinite(summary["reference_val_loss"])


class Killed(Exception):
    pass


@pytest.mark.slow
def test_resume_of_a_pretrained_start_reproduces_its_losses(bpe, corpus, tmp_path, monkeypatch):
    path = model_dir("qwen2", bpe, tmp_path / "model")
    cfg = start_config(path, corpus, tmp_path, total_tokens=6 * 128, checkpoint_every=3, loss="distill",
                       freeze_embedding=True, compare=[])
    train.run(cfg, tmp_path / "whole", show_progress=False)
    save = checkpoint.save

    def save_then_die(where, *args, **kwargs):
        save(where, *args, **kwargs)
        raise Killed

    monkeypatch.setattr(checkpoint, "save", save_then_die)
    with pytest.raises(Killed):
        train.run(cfg, tmp_path / "cut", show_progress=False)
    monkeypatch.undo()
    assert max(step_losses(tmp_path / "cut")) == 3
    train.main(["--out", str(tmp_path / "cut"), "--resume", "--no-progress"])
    whole, cut = step_losses(tmp_path / "whole"), step_losses(tmp_path / "cut")
    assert sorted(cut) == list(range(1, 7))
    np.testing.assert_allclose([cut[s] for s in range(4, 7)], [whole[s] for s in range(4, 7)], rtol=0, atol=1e-5)
    # the rolling checkpoint rebuilds the qwen2 model by itself, in its QAT form
    model, meta = checkpoint.load_model(tmp_path / "cut" / "checkpoint")
    assert type(model).__module__.endswith("qwen2") and meta["phase"] == "qat"


def test_memory_options(bpe, corpus, tmp_path, monkeypatch):
    path = model_dir("llama", bpe, tmp_path / "model")
    block = type(load(path).model.layers[0])
    monkeypatch.setattr(block, "__call__", block.__call__)  # grad_checkpoint patches the class: undone after
    plain = start_config(path, corpus, tmp_path, snapshot_at=[STEPS * 128])
    train.run(plain, tmp_path / "plain", show_progress=False)
    train.run(start_config(path, corpus, tmp_path, grad_checkpoint=True), tmp_path / "recompute", show_progress=False)
    assert block.__call__.__name__ == "checkpointed_fn"  # mlx-lm's own grad_checkpoint
    np.testing.assert_allclose(list(step_losses(tmp_path / "recompute").values()),
                               list(step_losses(tmp_path / "plain").values()), rtol=0, atol=1e-5)

    frozen = start_config(path, corpus, tmp_path, freeze_embedding=True, snapshot_at=[STEPS * 128])
    summary = train.run(frozen, tmp_path / "frozen", show_progress=False)
    snapshot = tmp_path / "frozen" / "snapshots" / str(STEPS * 128)
    trained, _ = checkpoint.load_model(snapshot)
    moved, _ = checkpoint.load_model(tmp_path / "plain" / "snapshots" / str(STEPS * 128))
    original = dict(tree_flatten(load(path).model.parameters()))
    trained, moved = dict(tree_flatten(trained.parameters())), dict(tree_flatten(moved.parameters()))
    for name in ("model.embed_tokens", "lm_head"):  # frozen weights (4-bit), their grids learning
        weight = f"{name}.weight"
        assert mx.array_equal(trained[weight], original[weight]).item()
        assert not mx.array_equal(moved[weight], original[weight]).item()
        assert not mx.allclose(trained[f"{name}.alpha"], init_scale(original[weight], QuantSpec(4, 32))).item()
    assert summary["N"] == json.loads((tmp_path / "plain" / "summary.json").read_text())["N"]


def test_data_in_mlx_lm_formats(bpe, tmp_path):
    """text, messages and prompt/completion records, tokenized as mlx-lm's datasets do."""
    chats = [{"messages": [{"role": "user", "content": f"hi {i}"}, {"role": "assistant", "content": "hello"}]}
             for i in range(6)]
    pairs = [{"prompt": f"say {i}", "completion": "ok"} for i in range(6)]
    texts = [{"text": line} for line in random_text(6, seed=3)]
    for name, records in (("chat", chats), ("pairs", pairs), ("texts", texts)):
        (tmp_path / f"{name}.jsonl").write_text("\n".join(map(json.dumps, records)))
    p = load(model_dir("llama", bpe, tmp_path / "model"))
    inputs = [str(tmp_path / f"{n}.jsonl") for n in ("chat", "pairs", "texts")]
    manifest = data.prepare_with(p.tokenizer, inputs, tmp_path / "out")

    def as_chat(r):
        if "messages" in r:
            return r["messages"]
        return [{"role": "user", "content": r["prompt"]}, {"role": "assistant", "content": r["completion"]}]

    expected = [bpe.apply_chat_template(as_chat(r), return_dict=False) for r in chats + pairs]
    expected += [bpe.encode(r["text"]) + [bpe.eos_token_id] for r in texts]
    assert sum(manifest["tokens"].values()) == sum(map(len, expected))
    dataset = data.TokenData.load(tmp_path / "out")
    assert sorted(np.concatenate([dataset.train, dataset.val]).tolist()) == sorted(t for e in expected for t in e)
    assert manifest == data.prepare_with(p.tokenizer, inputs, tmp_path / "out")  # reused

    (tmp_path / "mixed.jsonl").write_text("\n".join(map(json.dumps, chats[:2] + texts[:2])))
    with pytest.raises(data.DataError, match="mixes record formats"):
        data.prepare_with(p.tokenizer, [str(tmp_path / "mixed.jsonl")], tmp_path / "x")
    (tmp_path / "odd.jsonl").write_text(json.dumps({"question": "?"}))
    with pytest.raises(data.DataError, match="`messages` \\(chat\\)"):
        data.prepare_with(p.tokenizer, [str(tmp_path / "odd.jsonl")], tmp_path / "x")
    p.tokenizer._tokenizer.chat_template = None
    with pytest.raises(data.DataError, match="no chat template"):
        data.prepare_with(p.tokenizer, [str(tmp_path / "chat.jsonl")], tmp_path / "x")


def test_an_mlx_lm_data_directory_on_the_command_line(bpe, tmp_path, capsys):
    """`prepare --tokenizer MODEL` on mlx-lm's train/valid/test layout: its split kept, the
    model's tokenizer used, and a run from that model accepts the result."""
    chats = [{"messages": [{"role": "user", "content": f"hi {i}"}, {"role": "assistant", "content": "hello"}]}
             for i in range(12)]
    (tmp_path / "d").mkdir()
    for name, part in (("train", chats[:8]), ("valid", chats[8:10]), ("test", chats[10:])):
        (tmp_path / "d" / f"{name}.jsonl").write_text("\n".join(map(json.dumps, part)))
    model = model_dir("llama", bpe, tmp_path / "model")
    data.main(["prepare", "--input", str(tmp_path / "d"), "--tokenizer", str(model), "--out", str(tmp_path / "out")])
    dataset = data.TokenData.load(tmp_path / "out")
    assert capsys.readouterr().out == (f"{tmp_path / 'out'}: {dataset.train.size:,} train and {dataset.val.size:,} "
                                       f"validation tokens, vocabulary {VOCAB}\n")
    valid = [bpe.apply_chat_template(r["messages"], return_dict=False) for r in chats[8:10]]
    assert dataset.val.tolist() == [t for ids in valid for t in ids]
    assert data.load(start_config(model, tmp_path / "out", tmp_path), load(model).tokenizer).path == tmp_path / "out"
    with pytest.raises(SystemExit):
        data.main(["prepare", "--input", str(tmp_path / "d"), "--tokenizer", str(model), "--vocab-size", "300",
                   "--out", str(tmp_path / "x")])
    assert "pass one of them" in capsys.readouterr().err


def test_pretrained_defaults_yield_to_the_users_keys():
    assert config.resolve({"pretrained": "m", "learning_rate": 3e-4}).learning_rate == 3e-4
    assert config.resolve({"pretrained": "m"}).qat_fraction == 1.0
    assert config.resolve({}).learning_rate == config.default("learning_rate") == 3e-3
    assert "a pretrained start (--init-from MODEL) changes the defaults" in config.describe_keys()


def cli_error(capsys, *argv) -> str:
    """train.main's message for a bad input: exit 2, one line, nothing written."""
    with pytest.raises(SystemExit) as e:
        train.main(["--no-progress", *map(str, argv)])
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.startswith("error: ") and err.count("\n") == 1, err
    return err


def test_bad_starting_points_are_refused_before_training(hf_llama, bpe, corpus, tmp_path, capsys):
    out = tmp_path / "run"

    def start(path, *more):
        return cli_error(capsys, "--init-from", path, "--out", out, "--data", corpus, *more)

    assert "does not exist" in start(tmp_path / "missing")
    (tmp_path / "notes.txt").write_text("hi")
    assert "neither a checkpoint" in start(tmp_path / "notes.txt")
    (tmp_path / "unknown").mkdir()
    (tmp_path / "unknown" / "config.json").write_text(json.dumps({"model_type": "nonexistent_arch"}))
    assert "'nonexistent_arch'" in start(tmp_path / "unknown")
    moe = {"model_type": "mixtral", **SMALL, "num_local_experts": 2, "num_experts_per_tok": 1}
    assert "SwitchLinear" in start(save_directory(tmp_path / "moe", from_config(moe), moe, bpe))
    assert "320 tokens" in start(model_dir("llama", bpe, tmp_path / "small", vocab_size=256))
    write_gguf(tmp_path / "qwen.gguf", hf_llama, bpe, arch="qwen2")
    assert "general.architecture 'qwen2'" in start(tmp_path / "qwen.gguf")

    qat = from_config({"model_type": "llama", **SMALL})  # saved in QAT form, as no model directory should be
    to_qat(qat, quant_specs(qat, QuantSpec(2, 32)))
    assert "QAT form" in start(save_directory(tmp_path / "qat", qat, {"model_type": "llama", **SMALL}, bpe))
    checkpoint.save(tmp_path / "old" / "checkpoint", qat, optim.Adam(learning_rate=1e-3), {"step": 0})
    assert "--init-from" in start(tmp_path / "old")  # a run directory: its checkpoint is what to pass

    assert "loss: distill needs a pretrained start" in cli_error(capsys, "--out", out, "--loss", "distill")
    assert "compare needs a pretrained start" in cli_error(capsys, "--out", out, "--compare", "[dwq]")
    good = model_dir("llama", bpe, tmp_path / "good")
    assert "two starting models" in start(good, "--pretrained", tmp_path / "other")
    assert not out.exists()


def test_data_prepared_with_another_tokenizer_is_refused(bpe, corpus, dataset, tmp_path, capsys):
    good = model_dir("llama", bpe, tmp_path / "model")
    err = cli_error(capsys, "--init-from", good, "--out", tmp_path / "run", "--data", dataset)
    assert "prepared with another tokenizer" in err
