"""QAT in MLX's floating-point modes (mxfp4, nvfp4, mxfp8), end to end: the config key and its
defaults and refusals, the spec, the QAT layers (no α: the scale is derived as MLX derives it),
the export through `mx.quantize` that mlx_lm loads, and micro runs through `train.run`.

Tolerance of the export: the packed weights dequantize to the fake-quant weights bit for bit; the
exported model's logits differ from the fake-quant model's only by float32 summation order (the
quantized matmul vs x @ ŵᵀ; measured up to ~5e-6 on these models) and its loss by under 1e-7
relative, so the loss is asserted to rel 1e-5 and the logits to 1e-4. mlx-lm's QuantizedEmbedding
returns bfloat16 in FP modes, but every FP-mode value is exact in bfloat16: the lookup is asserted
equal bit for bit."""

import json
import re

import mlx.core as mx
import mlx.nn as nn
import mlx_lm
import numpy as np
import pytest
from mlx.nn.layers.quantized import _defaults_for_mode
from mlx.utils import tree_flatten

from conftest import MICRO_MODEL, tiny_llama
from mlx_qat import QuantSpec, checkpoint, config, constants, fp_formats, report, sweep, train
from mlx_qat.export import export, packed_model
from mlx_qat.fp_formats import FORMATS, bits_per_weight, ste_mask
from mlx_qat.layers import QATEmbedding, QATLinear, qat_specs, quant_specs, to_qat

MODES = list(constants.FP_MODES)


def fp_spec(mode: str) -> QuantSpec:
    group_size, bits = constants.FP_MODES[mode]
    return QuantSpec(bits, group_size, mode)


def test_the_modes_grids_are_mlx_own():
    for mode, (group_size, bits) in constants.FP_MODES.items():
        assert _defaults_for_mode(mode, None, None) == (group_size, bits)
        assert FORMATS[mode][:2] == (group_size, bits)
    assert constants.MODES == ("affine", "mxfp4", "nvfp4", "mxfp8")


# ---------------------------------------------------------------- config


@pytest.mark.parametrize("mode,bits,group_size", [("mxfp4", 4, 32), ("nvfp4", 4, 16), ("mxfp8", 8, 32)])
def test_a_mode_alone_resolves_to_its_grid(mode, bits, group_size, tmp_path):
    cfg = config.resolve({"mode": mode})
    assert (cfg.mode, cfg.bits, cfg.group_size, cfg.embedding_bits) == (mode, bits, group_size, None)
    assert cfg.spec == cfg.embedding_spec == QuantSpec(bits, group_size, mode)
    (tmp_path / "c.yaml").write_text(f"mode: {mode}\n")
    assert config.load(tmp_path / "c.yaml").spec == cfg.spec
    assert config.load(None, config.parse_overrides(["--mode", mode])).spec == cfg.spec
    # restating the mode's values is fine, and the resolved config reads back as itself
    restated = {"mode": mode, "bits": bits, "group_size": group_size, "embedding_bits": bits}
    assert config.resolve(restated).spec == cfg.spec
    assert config.TrainConfig(**cfg.to_dict()) == cfg
    assert config.resolve({}).mode == "affine" and config.resolve({}).spec == QuantSpec(2, 64)


BAD = [
    ({"mode": "mxfp4", "group_size": 64}, ["mode=mxfp4", "group_size=64", "group_size: 32"]),
    ({"mode": "mxfp4", "bits": 2}, ["mode=mxfp4", "bits=2", "bits: 4"]),
    ({"mode": "nvfp4", "group_size": 32}, ["mode=nvfp4", "group_size=32", "group_size: 16"]),
    ({"mode": "nvfp4", "group_size": None}, ["mode=nvfp4", "group_size=None", "group_size: 16"]),
    ({"mode": "mxfp8", "bits": 4}, ["mode=mxfp8", "bits=4", "bits: 8"]),
    ({"mode": "mxfp8", "embedding_bits": 4}, ["mode=mxfp8", "embedding_bits=4", "embedding_bits: 8"]),
    ({"mode": "mxfp4", "export_scales": "float16"}, ["mode=mxfp4", "export_scales=float16"]),
    ({"mode": "fp4"}, ["mode='fp4'", "affine, mxfp4, nvfp4, mxfp8"]),
]


@pytest.mark.parametrize("values,phrases", BAD)
def test_bad_combinations_are_one_line_errors(values, phrases):
    with pytest.raises(ValueError) as e:
        config.resolve(values)
    message = str(e.value)
    assert "\n" not in message and all(p in message for p in phrases), message


@pytest.mark.parametrize("values,phrases", BAD[:3])
def test_the_cli_refuses_them_before_any_data_is_read(values, phrases, tmp_path, capsys, monkeypatch):
    from mlx_qat import data

    def no_data(*args, **kwargs):
        raise AssertionError("data was read")

    monkeypatch.setattr(data, "load", no_data)
    flags = [f"--{k.replace('_', '-')}={'null' if v is None else v}" for k, v in values.items()]
    with pytest.raises(SystemExit) as e:
        train.main(["--out", str(tmp_path / "run"), "--data", str(tmp_path / "missing"), *flags])
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.count("\n") == 1 and err.startswith("error: mode="), err
    assert all(p in err for p in phrases)
    assert not (tmp_path / "run").exists()


def test_help_states_the_modes():
    text = config.describe_keys()
    line = next(l for l in text.splitlines() if l.startswith("  --mode "))
    for mode in ("mxfp4 (4-bit, groups of 32)", "nvfp4 (4-bit, groups of 16)", "mxfp8 (8-bit, groups of 32)"):
        assert mode in line
    assert "embedding" in line and "(default: 'affine')" in line
    assert "an FP mode sets bits and group_size when you leave them unset" in text


def test_a_sweep_grid_resolves_the_mode_like_a_run():
    cfg = sweep._config({"mode": "nvfp4", "total_tokens": 8192, "batch_size": 4, "seq_len": 32}, "r")
    assert (cfg.bits, cfg.group_size, cfg.mode) == (4, 16, "nvfp4")


# ---------------------------------------------------------------- spec and layers


def test_spec_round_trips_and_refuses_other_grids():
    for mode in MODES:
        spec = fp_spec(mode)
        assert spec.is_fp and spec.kind == mode and QuantSpec.from_dict(spec.to_dict()) == spec
        assert spec.to_dict()["mode"] == mode and str(spec).startswith(mode)
    assert QuantSpec(2, 64).to_dict() == {"bits": 2, "group_size": 64}  # affine specs read as they always have
    with pytest.raises(ValueError, match=r"mode='mxfp4' stores 4-bit elements in groups of 32.*QuantSpec\(4, 32, "):
        QuantSpec(4, 64, "mxfp4")
    with pytest.raises(ValueError, match="mode='int4' is not supported"):
        QuantSpec(4, 32, "int4")
    with pytest.raises(ValueError, match="no integer Quantizer"):
        fp_spec("mxfp4").quantizer
    with pytest.raises(ValueError, match="mxfp4 groups 32 inputs, which does not divide the 48"):
        QATLinear.from_linear(nn.Linear(48, 8), fp_spec("mxfp4"))


@pytest.mark.parametrize("mode", MODES)
def test_qat_layers_forward_mlx_own_roundtrip_and_pack_it_losslessly(mode):
    spec = fp_spec(mode)
    group_size, bits = constants.FP_MODES[mode]
    layer = QATLinear.from_linear(nn.Linear(128, 24), spec)
    assert "alpha" not in layer and set(layer.trainable_parameters()) == {"weight", "bias"}
    w = layer.weight
    roundtrip = mx.dequantize(*mx.quantize(w, group_size, bits, mode=mode), group_size=group_size, bits=bits, mode=mode,
                              dtype=mx.float32)
    assert mx.array_equal(layer.quantized_weight(), roundtrip).item()
    q = layer.to_quantized()
    assert (q.mode, q.group_size, q.bits, q.scales.dtype) == (mode, group_size, bits, mx.uint8)
    assert q.get("biases") is None
    packed = mx.dequantize(q.weight, q.scales, group_size=group_size, bits=bits, mode=mode, dtype=mx.float32)
    assert mx.array_equal(packed, layer.quantized_weight()).item()
    x = mx.random.normal((5, 128), key=mx.random.key(3))
    np.testing.assert_allclose(np.array(q(x)), np.array(layer(x)), atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match=f"packs only onto the grid it learned: mode='{mode}'"):
        layer.to_quantized(mode="affine")

    embedding = QATEmbedding.from_embedding(nn.Embedding(100, 64), spec)
    assert "alpha" not in embedding
    qe, ids = embedding.to_quantized(), mx.array([0, 5, 99])
    assert qe(ids).dtype == mx.bfloat16  # mx.dequantize's default for FP modes; the values are exact
    assert mx.array_equal(qe(ids).astype(mx.float32), embedding(ids)).item()


@pytest.mark.parametrize("mode", MODES)
def test_the_gradient_is_straight_through(mode):
    layer = QATLinear.from_linear(nn.Linear(64, 16, bias=False), fp_spec(mode))
    x = mx.random.normal((3, 64), key=mx.random.key(4))

    def loss(params):
        layer.update(params)
        return layer(x).sum()

    grad = mx.grad(loss)(layer.trainable_parameters())["weight"]
    # dL/dŵ = Σ_rows x for a summed output; it passes where the element was not clipped
    expected = mx.where(ste_mask(layer.weight, mode), mx.broadcast_to(x.sum(0), layer.weight.shape), 0.0)
    np.testing.assert_allclose(np.array(grad), np.array(expected), rtol=1e-5, atol=1e-5)


def test_policy_quantizes_the_embedding_in_the_mode_and_nn_quantize_agrees():
    model = tiny_llama(256, tie=False)
    specs = quant_specs(model, fp_spec("nvfp4"))
    assert set(specs.values()) == {fp_spec("nvfp4")} and "lm_head" in specs and "model.embed_tokens" in specs
    to_qat(model, specs)
    assert qat_specs(model) == specs
    copy = tiny_llama(256, tie=False)
    to_qat(copy, specs)
    copy.load_weights(list(tree_flatten(model.parameters())), strict=True)
    nn.quantize(copy, mode="nvfp4")  # MLX's own nn.quantize packs a QAT model in its mode too
    exported, quantized = dict(tree_flatten(packed_model(model).parameters())), dict(tree_flatten(copy.parameters()))
    assert exported.keys() == quantized.keys() and not any(k.endswith(".biases") for k in exported)
    assert all(mx.array_equal(v, quantized[k]).item() for k, v in exported.items())


# ---------------------------------------------------------------- export


def loss_of(model, tokens) -> float:
    logits = model(tokens[:, :-1]).astype(mx.float32)
    return nn.losses.cross_entropy(logits, tokens[:, 1:], reduction="mean").item()


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("tie", [True, False])
def test_mlx_lm_loads_the_export_with_the_fake_quant_loss(mode, tie, tokenizer_dir, tmp_path):
    vocab = len(json.loads((tokenizer_dir / "tokenizer.json").read_text())["model"]["vocab"])
    model = tiny_llama(vocab, tie=tie)
    to_qat(model, quant_specs(model, fp_spec(mode)))
    report = export(model, tmp_path / "m", tokenizer=tokenizer_dir)
    group_size, bits = constants.FP_MODES[mode]
    quantization = json.loads((tmp_path / "m" / "config.json").read_text())["quantization"]
    assert quantization == {"group_size": group_size, "bits": bits, "mode": mode}  # one entry: the embedding too
    assert report.bits_per_weight == bits_per_weight(mode) == bits + 8 / group_size

    loaded, tok = mlx_lm.load(str(tmp_path / "m"))
    up = loaded.model.layers[0].mlp.up_proj
    assert isinstance(up, nn.QuantizedLinear) and (up.mode, up.bits, up.group_size) == (mode, bits, group_size)
    ids = mx.array([[1, 7, vocab - 1]])
    assert mx.array_equal(loaded.model.embed_tokens(ids).astype(mx.float32), model.model.embed_tokens(ids)).item()
    tokens = mx.random.randint(0, vocab, (4, 65), key=mx.random.key(1))
    np.testing.assert_allclose(np.array(loaded(tokens)), np.array(model(tokens)), atol=1e-4, rtol=0)
    assert loss_of(loaded, tokens) == pytest.approx(loss_of(model, tokens), rel=1e-5)
    assert isinstance(mlx_lm.generate(loaded, tok, "hello", max_tokens=4), str)


def test_a_mixed_model_gets_per_module_entries(tokenizer_dir, tmp_path):
    """mxfp4 blocks with an affine 4-bit embedding (through the API; a config quantizes the
    embedding in the mode): config.json's per-module entry carries the mode, and bits per
    weight counts each layer's own storage."""
    vocab = len(json.loads((tokenizer_dir / "tokenizer.json").read_text())["model"]["vocab"])
    model = tiny_llama(vocab)
    to_qat(model, quant_specs(model, fp_spec("mxfp4"), QuantSpec(4, 64)))
    report = export(model, tmp_path / "m", tokenizer=tokenizer_dir)
    quantization = json.loads((tmp_path / "m" / "config.json").read_text())["quantization"]
    assert quantization == {"group_size": 32, "bits": 4, "mode": "mxfp4",
                            "model.embed_tokens": {"group_size": 64, "bits": 4, "mode": "affine"}}
    embedding = model.model.embed_tokens.weight.size
    blocks = sum(m.weight.size for _, m in model.named_modules() if isinstance(m, QATLinear))
    assert report.bits_per_weight == pytest.approx((blocks * 4.25 + embedding * (4 + 64 / 64)) / (blocks + embedding))
    loaded, _ = mlx_lm.load(str(tmp_path / "m"))
    tokens = mx.random.randint(0, vocab, (2, 33), key=mx.random.key(2))
    np.testing.assert_allclose(np.array(loaded(tokens)), np.array(model(tokens)), atol=1e-4, rtol=0)


# ---------------------------------------------------------------- runs


def micro(dataset, mode: str) -> config.TrainConfig:
    """12 steps of 4 x 32 tokens, 6 in full precision and 6 quantization-aware, in `mode`."""
    return config.resolve(dict(data=str(dataset), model=MICRO_MODEL, mode=mode, total_tokens=12 * 4 * 32, batch_size=4,
                               seq_len=32, qat_fraction=0.5, report_every=1, eval_every=6, eval_batches=2,
                               checkpoint_every=6, learning_rate=3e-3))


@pytest.mark.parametrize("mode", MODES)
def test_a_run_trains_exports_and_generates_in_each_mode(mode, dataset, tmp_path):
    out = tmp_path / "run"
    summary = train.run(micro(dataset, mode), out, show_progress=False)
    group_size, bits = constants.FP_MODES[mode]
    assert (summary["B"], summary["group_size"], summary["mode"]) == (bits, group_size, mode)
    assert (summary["D_fp"], summary["D_qat"]) == (6 * 128, 6 * 128)
    assert summary["bits_per_weight"] == bits_per_weight(mode)
    assert summary["S_total"] == pytest.approx(summary["D_total"] / (summary["N"] * bits / 8))  # element bits only
    # the export, loaded through mlx_lm.load, gives the fake-quant model's validation loss
    assert summary["exported_val_loss"] == pytest.approx(summary["final_val_loss"], rel=1e-5)
    quantization = json.loads((out / "model" / "config.json").read_text())["quantization"]
    assert quantization == {"group_size": group_size, "bits": bits, "mode": mode}
    model, tok = mlx_lm.load(str(out / "model"))
    assert len(list(mlx_lm.stream_generate(model, tok, tok.encode("the"), max_tokens=5))) == 5
    assert isinstance(mlx_lm.generate(model, tok, "the", max_tokens=5), str)
    # the checkpoint records the mode and rebuilds the same QAT model (no α anywhere)
    qat, meta = checkpoint.load_model(out / "checkpoint")
    assert set(checkpoint.specs(meta).values()) == {fp_spec(mode)}
    assert not any(k.endswith(".alpha") for k, _ in tree_flatten(qat.parameters()))
    assert re.search(rf"bits B +{bits} \({mode}\)", report.format_summary(summary))


# ---------------------------------------------------------------- learned scales


@pytest.mark.parametrize("mode", MODES)
def test_learned_scales_start_at_mlx_own_and_pack_exactly_wherever_they_move(mode):
    group_size, bits = constants.FP_MODES[mode]
    w = mx.random.normal((8, 256), key=mx.random.key(11)) * 0.05
    w[0, :3] = mx.array([0.0, 1e-6, -3.0])  # a zero, a tiny and an outlying weight
    alpha = fp_formats.derived_scale(w, mode)
    # at its start a learned scale is MLX's derived one: the same ŵ, and the same packed bytes
    assert mx.array_equal(fp_formats.fake_quant_fp_learned(w, alpha, mode), fp_formats.fake_quant_fp(w, mode)).item()
    packed, scales = fp_formats.pack_learned(w, alpha, mode)
    mlx_packed, mlx_scales = mx.quantize(w, group_size, bits, mode=mode)
    assert mx.array_equal(packed, mlx_packed).item() and mx.array_equal(scales, mlx_scales).item()
    # moved anywhere, α rounds to a scale the format stores and the packed model is ŵ bit for bit
    moved = alpha * mx.random.uniform(0.3, 3.0, alpha.shape, key=mx.random.key(12))
    w_hat = fp_formats.fake_quant_fp_learned(w, moved, mode)
    packed, scales = fp_formats.pack_learned(w, moved, mode)
    assert mx.array_equal(mx.dequantize(packed, scales, group_size=group_size, bits=bits, mode=mode, dtype=mx.float32),
                          w_hat).item()
    assert not mx.array_equal(w_hat, fp_formats.fake_quant_fp(w, mode)).item()


@pytest.mark.parametrize("mode", MODES)
def test_learned_scale_gradients_are_lsq_straight_through(mode):
    group_size, bits = constants.FP_MODES[mode]
    w = mx.random.normal((4, 64), key=mx.random.key(13))
    alpha = fp_formats.derived_scale(w, mode) * 0.6  # some elements clip
    g = mx.random.normal(w.shape, key=mx.random.key(14))
    _, (dw, dalpha) = mx.vjp(lambda w, a: fp_formats.fake_quant_fp_learned(w, a, mode), [w, alpha], [g])
    # numpy: s the stored scale, x = w / s, q its rounding; pass = |x| <= maxval
    s = np.repeat(np.array(fp_formats.stored_scale(alpha, mode)), group_size, axis=1)
    x = np.array(w) / s
    q = np.array(fp_formats.fake_quant_fp_learned(w, alpha, mode)) / s
    top = fp_formats.element_max(mode)
    passes = np.abs(x) <= top
    assert not passes.all() and passes.any()
    np.testing.assert_array_equal(np.array(dw), np.where(passes, np.array(g), 0))
    unit = (np.array(g) * (q - np.where(passes, x, 0))).reshape(4, -1, group_size).sum(-1)
    scale = 1 / np.sqrt(w.size * fp_formats.LEVELS[bits])
    np.testing.assert_allclose(np.array(dalpha), unit * scale, rtol=1e-5, atol=1e-7)


def test_a_run_with_learned_scales_moves_them_and_exports_losslessly(dataset, tmp_path):
    cfg = config.resolve({**micro(dataset, "mxfp4").to_dict(), "fp_scale": "learned"})
    assert cfg.spec == QuantSpec(4, 32, "mxfp4", learned_scale=True)
    summary = train.run(cfg, tmp_path / "run", show_progress=False)
    assert summary["exported_val_loss"] == pytest.approx(summary["final_val_loss"], rel=1e-5)
    qat, meta = checkpoint.load_model(tmp_path / "run" / "checkpoint")
    assert set(checkpoint.specs(meta).values()) == {cfg.spec}
    layer = qat.model.layers[0].mlp.up_proj
    assert not mx.array_equal(layer.alpha, fp_formats.derived_scale(layer.weight, "mxfp4")).item()  # it learned
    with pytest.raises(ValueError, match="fp_scale=learned chooses an FP mode's scales"):
        config.resolve({"fp_scale": "learned"})
