"""Lossless export to MLX's packed affine layout and loading through mlx-lm."""

import json
import os

import mlx.core as mx
import mlx.nn as nn
import mlx_lm
import numpy as np
import pytest

from mlx.utils import tree_flatten

from conftest import tiny_llama
from mlx_qat import QuantSpec
from mlx_qat.export import export, export_fp, packed_model
from mlx_qat.layers import QATEmbedding, QATLinear, pack, quant_specs, to_qat

ALL_BITS = [1, 1.58, 2, 3, 4, 5, 6, 8]


def unpack(words: np.ndarray, bits: int, n: int) -> np.ndarray:
    """Read codes back from each row's little-endian bitstream, one bit at a time."""
    bitstream = np.unpackbits(words.astype("<u4").view(np.uint8), axis=1, bitorder="little")
    return (bitstream[:, : n * bits].reshape(len(words), n, bits) << np.arange(bits)).sum(-1)


@pytest.mark.parametrize("bits", [1, 2, 3, 4, 5, 6, 8])
def test_pack_is_a_little_endian_bitstream(bits):
    codes = np.random.default_rng(bits).integers(0, 2**bits, size=(3, 96))
    packed = pack(codes, bits)
    assert packed.shape == (3, 96 * bits // 32) and packed.dtype == np.uint32
    np.testing.assert_array_equal(unpack(packed, bits, 96), codes)


@pytest.mark.parametrize("bits", ALL_BITS)
@pytest.mark.parametrize("group_size", [32, 64, 128, None])
def test_dequantized_export_equals_fake_quant(bits, group_size):
    spec = QuantSpec(bits, group_size)
    linear = nn.Linear(384, 24)
    layer = QATLinear.from_linear(linear, spec)
    # Learned scales move away from their initial value; perturb them so the grid is not the init.
    layer.alpha = layer.alpha * mx.random.uniform(0.5, 1.5, layer.alpha.shape, key=mx.random.key(7))
    q = layer.to_quantized()
    w = mx.dequantize(q.weight, q.scales, q.biases, group_size=q.group_size, bits=q.bits)
    np.testing.assert_array_equal(np.array(w), np.array(layer.quantized_weight()))
    x = mx.random.normal((5, 384), key=mx.random.key(8))
    np.testing.assert_allclose(np.array(q(x)), np.array(layer(x)), atol=1e-4, rtol=1e-4)


def test_embedding_export_equals_fake_quant():
    layer = QATEmbedding.from_embedding(nn.Embedding(100, 64), QuantSpec(4, 32))
    q = layer.to_quantized()
    ids = mx.array([0, 5, 99])
    np.testing.assert_array_equal(np.array(q(ids)), np.array(layer(ids)))


def cross_entropy(model, tokens):
    logits = model(tokens[:, :-1]).astype(mx.float32)
    return nn.losses.cross_entropy(logits, tokens[:, 1:], reduction="mean").item()


@pytest.fixture(scope="module")
def qat_model(tokenizer_dir):
    vocab = json.loads((tokenizer_dir / "tokenizer.json").read_text())["model"]["vocab"]
    model = tiny_llama(len(vocab))
    return to_qat(model, quant_specs(model, QuantSpec(2, 64)))


def test_mlx_lm_loads_the_export(qat_model, tokenizer_dir, tmp_path):
    report = export(qat_model, tmp_path / "m", tokenizer=tokenizer_dir)
    assert {"config.json", "model.safetensors", "model.safetensors.index.json", "tokenizer.json"} <= {
        f.name for f in (tmp_path / "m").iterdir()
    }
    config = json.loads((tmp_path / "m" / "config.json").read_text())
    assert config["model_type"] == "llama"
    assert config["quantization"]["bits"] == 2 and config["quantization"]["mode"] == "affine"
    assert config["quantization"]["model.embed_tokens"]["bits"] == 4
    # 2-bit blocks and a 4-bit embedding, each with a float32 scale and bias (64 bits) per 64 weights
    embedding = qat_model.model.embed_tokens.weight.size
    blocks = sum(m.weight.size for path, m in qat_model.named_modules() if ".layers." in path and hasattr(m, "alpha"))
    assert report.bits_per_weight == pytest.approx((blocks * (2 + 1) + embedding * (4 + 1)) / (blocks + embedding), rel=1e-12)
    assert report.size_bytes > 0

    loaded, _ = mlx_lm.load(str(tmp_path / "m"))
    assert isinstance(loaded.model.layers[0].mlp.up_proj, nn.QuantizedLinear)
    assert loaded.model.layers[0].mlp.up_proj.bits == 2
    tokens = mx.random.randint(0, qat_model.args.vocab_size, (2, 33), key=mx.random.key(0))
    diff = mx.abs(loaded(tokens) - qat_model(tokens)).max().item()
    assert diff < 1e-4


def test_float16_scales_change_the_loss_by_under_half_a_percent(qat_model, tokenizer_dir, tmp_path):
    export(qat_model, tmp_path / "m16", tokenizer=tokenizer_dir, scales_dtype="float16")
    loaded, _ = mlx_lm.load(str(tmp_path / "m16"))
    assert loaded.model.layers[0].mlp.up_proj.scales.dtype == mx.float16
    tokens = mx.random.randint(0, qat_model.args.vocab_size, (4, 65), key=mx.random.key(1))
    fake, exported = cross_entropy(qat_model, tokens), cross_entropy(loaded, tokens)
    assert abs(exported - fake) / fake < 0.005


@pytest.mark.parametrize("bits", [1, 2])
def test_mlx_lm_generates_from_low_bit_exports(bits, tokenizer_dir, tmp_path):
    vocab = json.loads((tokenizer_dir / "tokenizer.json").read_text())["model"]["vocab"]
    model = tiny_llama(len(vocab))
    to_qat(model, quant_specs(model, QuantSpec(bits, 64)))
    export(model, tmp_path / "m", tokenizer=tokenizer_dir)
    loaded, tok = mlx_lm.load(str(tmp_path / "m"))
    prompt = tok.encode("the quick")
    generated = list(mlx_lm.stream_generate(loaded, tok, prompt, max_tokens=8))
    assert len(generated) == 8
    assert all(0 <= g.token < len(vocab) for g in generated)
    assert isinstance(mlx_lm.generate(loaded, tok, "hello", max_tokens=4), str)


def test_export_refuses_to_overwrite(qat_model, tmp_path):
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "keep.txt").write_text("user data")
    with pytest.raises(FileExistsError, match="overwrite=True") as refused:
        export(qat_model, tmp_path / "m")
    assert "--overwrite" not in str(refused.value)  # no such flag
    assert (tmp_path / "m" / "keep.txt").read_text() == "user data"
    export(qat_model, tmp_path / "m", overwrite=True)
    assert not (tmp_path / "m" / "keep.txt").exists()
    assert (tmp_path / "m" / "config.json").exists()


def test_export_rejects_unconverted_models_and_bad_scales(tmp_path):
    with pytest.raises(ValueError, match="no QAT layers"):
        export(tiny_llama(256), tmp_path / "fp")
    with pytest.raises(ValueError, match="scales_dtype"):
        export(tiny_llama(256), tmp_path / "fp", scales_dtype="int8")
    assert not (tmp_path / "fp").exists()


def test_exported_directories_get_the_usual_permissions(qat_model, tmp_path):
    previous = os.umask(0o022)
    try:
        export(qat_model, tmp_path / "m")
        export_fp(tiny_llama(256), tmp_path / "fp")
    finally:
        os.umask(previous)
    assert (tmp_path / "m").stat().st_mode & 0o777 == 0o755
    assert (tmp_path / "fp").stat().st_mode & 0o777 == 0o755
    assert sorted(p.name for p in tmp_path.iterdir()) == ["fp", "m"]  # nothing left beside them


def test_nn_quantize_gives_the_exported_weights(qat_model):
    """MLX's own nn.quantize on a QAT model and the export pack the same learned grid."""
    copy = tiny_llama(qat_model.args.vocab_size)
    to_qat(copy, quant_specs(copy, QuantSpec(2, 64)))
    copy.load_weights(list(tree_flatten(qat_model.parameters())), strict=True)
    nn.quantize(copy)
    exported = dict(tree_flatten(packed_model(qat_model).parameters()))
    quantized = dict(tree_flatten(copy.parameters()))
    assert exported.keys() == quantized.keys() and any(k.endswith(".scales") for k in exported)
    for k, v in exported.items():
        assert v.dtype == quantized[k].dtype and mx.array_equal(v, quantized[k]).item(), k
