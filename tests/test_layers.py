"""The spec policy (quant_specs), the conversions to_qat / qat_specs / to_quantized, and the QAT layers."""

import json

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
from mlx.utils import tree_flatten

from conftest import tiny_llama
from mlx_qat import QuantSpec, fake_quant, init_scale
from mlx_qat import layers
from mlx_qat.layers import (QATEmbedding, QATLinear, fake_quantized, is_learned_scale, qat_specs, quant_specs, to_qat,
                            to_quantized)
from mlx_qat.lowrank import FrozenQATEmbedding
from mlx_qat.model import num_params
from mlx_qat.quantizers import specs_from_dict, specs_to_dict

BLOCK_LINEARS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
                 "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")


IDS = mx.array([[3, 1, 4, 1, 5, 9, 2, 6]])


# ------------------------------------------------------------------ the policy


@pytest.mark.parametrize("tie", [True, False])
def test_quant_specs_places_blocks_embedding_and_head(tie):
    model = tiny_llama(tie=tie)
    specs = quant_specs(model, QuantSpec(2, 64))
    blocks = {f"model.layers.{i}.{name}": QuantSpec(2, 64) for i in range(2) for name in BLOCK_LINEARS}
    head = {} if tie else {"lm_head": QuantSpec(4, 64)}  # max(B, 4) bits, the same group size
    assert specs == {**blocks, "model.embed_tokens": QuantSpec(4, 64), **head}
    assert quant_specs(model, QuantSpec(5, None))["model.embed_tokens"] == QuantSpec(5, None)
    assert quant_specs(model, QuantSpec(2, 64), QuantSpec(8, 32))["model.embed_tokens"] == QuantSpec(8, 32)


def test_quant_specs_refuses_what_it_cannot_place():
    model = tiny_llama()
    to_qat(model, quant_specs(model, QuantSpec(2, 64)))
    with pytest.raises(ValueError, match=r"model.embed_tokens is already a QATEmbedding .* qat_specs\(model\)"):
        quant_specs(model, QuantSpec(2, 64))

    packed = tiny_llama()
    nn.quantize(packed, group_size=64, bits=4)
    with pytest.raises(ValueError, match="model.embed_tokens is a packed 4-bit QuantizedEmbedding: QAT trains full-precision"):
        quant_specs(packed, QuantSpec(2, 64))

    extra = tiny_llama()
    extra.model.projector = nn.Linear(128, 128)
    with pytest.raises(ValueError, match="model.projector is an nn.Linear outside the transformer blocks"):
        quant_specs(extra, QuantSpec(2, 64))

    blockless = nn.Module()
    blockless.proj = nn.Linear(64, 64)
    with pytest.raises(ValueError, match="blocks at model.layers, as mlx-lm models expose them; this Module has none"):
        quant_specs(blockless, QuantSpec(2, 64))


# ------------------------------------------------------------------ to_qat, qat_specs


def test_to_qat_converts_exactly_the_modules_in_the_dict():
    model = tiny_llama(tie=False)
    q_proj = model.model.layers[1].self_attn.q_proj
    specs = {"model.layers.1.self_attn.q_proj": QuantSpec(3, 32), "lm_head": QuantSpec(4, 128)}
    assert to_qat(model, specs) is model
    assert qat_specs(model) == specs
    assert isinstance(model.model.layers[0].self_attn.q_proj, nn.Linear)
    assert isinstance(model.model.embed_tokens, nn.Embedding)
    converted = model.model.layers[1].self_attn.q_proj
    assert isinstance(converted, QATLinear) and converted.weight is q_proj.weight
    # α comes from the weights the model held at conversion
    np.testing.assert_array_equal(np.array(converted.alpha), np.array(init_scale(q_proj.weight, QuantSpec(3, 32))))


def test_to_qat_names_the_module_it_cannot_convert():
    model = tiny_llama()
    with pytest.raises(ValueError, match="model.layers.0.mlp.gate is no such module in this Model"):
        to_qat(model, {"model.layers.0.mlp.gate": QuantSpec(2, 64)})
    with pytest.raises(ValueError, match="model.norm is a RMSNorm in this Model; to_qat converts nn.Linear"):
        to_qat(model, {"model.norm": QuantSpec(2, 64)})
    to_qat(model, {"model.embed_tokens": QuantSpec(4, 64)})
    with pytest.raises(ValueError, match="model.embed_tokens is already a QATEmbedding"):
        to_qat(model, {"model.embed_tokens": QuantSpec(4, 64)})
    odd = nn.Module()
    odd.proj = nn.Linear(96, 8)
    with pytest.raises(ValueError, match="proj: group_size=64 does not divide the 96 inputs"):
        to_qat(odd, {"proj": QuantSpec(2, 64)})


def test_a_spec_dict_rebuilds_the_qat_form_through_json():
    """What a checkpoint does: store qat_specs, rebuild a fresh model's QAT form from them, load."""
    model = tiny_llama(tie=False)
    to_qat(model, quant_specs(model, QuantSpec(1.58, None)))
    model.update({"lm_head": {"alpha": model.lm_head.alpha * 1.3}})  # a trained α, not the init
    stored = json.dumps(specs_to_dict(qat_specs(model)))

    fresh = tiny_llama(tie=False, seed=1)
    to_qat(fresh, specs_from_dict(json.loads(stored)))
    fresh.load_weights(list(tree_flatten(model.parameters())), strict=True)
    assert qat_specs(fresh) == qat_specs(model)
    assert mx.array_equal(fresh(IDS), model(IDS)).item()


def test_to_qat_keeps_the_fp_function_at_8_bits():
    model = tiny_llama()
    before = model(IDS)
    to_qat(model, quant_specs(model, QuantSpec(8, 32), embedding_spec=QuantSpec(8, 32)))
    assert mx.abs(model(IDS) - before).max().item() < 0.1


def test_learned_scales_are_told_apart_by_one_predicate():
    model = tiny_llama(tie=False)
    n = num_params(model)
    to_qat(model, quant_specs(model, QuantSpec(2, 64)))
    paths = [k for k, _ in tree_flatten(model.trainable_parameters())]
    scales = [k for k in paths if is_learned_scale(k)]
    assert scales == [f"{p}.alpha" for p in qat_specs(model) if f"{p}.alpha" in paths] and len(scales) == 16
    assert num_params(model) == n  # α is not counted in N
    assert not is_learned_scale("model.alphabet.weight") and not is_learned_scale("model.layers.0.alpha_proj.weight")


# ------------------------------------------------------------------ the embedding holds no per-call state


def test_embedding_keeps_no_state_between_calls():
    model = tiny_llama(tie=True)
    to_qat(model, quant_specs(model, QuantSpec(2, 64)))
    embedding = model.model.embed_tokens
    attributes = set(vars(embedding))
    mx.eval(model(IDS))
    assert set(vars(embedding)) == attributes  # nothing left behind by the forward pass

    embedding(IDS)  # a lookup without the head, then new scales (an optimizer step)
    embedding.alpha = embedding.alpha * 0.5
    x = mx.random.normal((3, 128), key=mx.random.key(0))
    expected = x @ fake_quant(embedding.weight, embedding.alpha, embedding.spec).T
    assert mx.array_equal(embedding.as_linear(x), expected).item()


@pytest.mark.parametrize("spec", [QuantSpec(4, 32), QuantSpec(3, None), QuantSpec(4, 32, "mxfp4"),
                                  QuantSpec(4, 16, "nvfp4", learned_scale=True)], ids=str)
@pytest.mark.parametrize("base", ["trained", "frozen", "frozen, packed"])
def test_the_lookup_quantizes_only_its_rows_and_equals_the_table(spec, base, monkeypatch):
    """ŵ[ids] from the looked-up rows alone, bit for bit, with the gradients of the whole table's path."""
    table = nn.Embedding(64, 32)
    if base == "trained":
        layer = QATEmbedding.from_embedding(table, spec)
    else:
        layer = FrozenQATEmbedding.from_base(table.to_quantized(group_size=32, bits=8) if "packed" in base else table, spec)
        layer.freeze()
        layer.unfreeze(keys=["alpha"])
    ids = mx.array([[5, 1, 5], [63, 0, 2]])
    assert mx.array_equal(layer(ids), layer.quantized_weight()[ids]).item()
    assert layer(mx.array(7)).shape == (32,)

    shapes = []
    monkeypatch.setattr(layers, "fake_quantized", lambda w, *a: shapes.append(w.shape) or fake_quantized(w, *a))
    layer(ids)
    assert shapes == [(6, 32)]  # the six looked-up rows, not the table

    if not layer.trainable_parameters():
        return  # a frozen table in a float format: nothing learns

    def loss(params, lookup):
        layer.update(params)
        return ((lookup(layer) * mx.arange(32)) ** 2).sum()

    rows = mx.grad(loss)(layer.trainable_parameters(), lambda m: m(ids))
    whole = mx.grad(loss)(layer.trainable_parameters(), lambda m: m.quantized_weight()[ids])
    for (k, got), (_, want) in zip(tree_flatten(rows), tree_flatten(whole)):
        assert mx.any(want != 0).item(), k
        np.testing.assert_allclose(np.array(got), np.array(want), rtol=1e-5, atol=1e-6, err_msg=k)


def test_tied_head_gradients_reach_the_embedding_from_both_uses():
    layer = QATEmbedding.from_embedding(nn.Embedding(64, 32), QuantSpec(4, 32))

    def loss(weight, alpha, use):
        layer.update({"weight": weight, "alpha": alpha})
        h = layer(mx.array([1, 2, 3]))
        return (layer.as_linear(h) if use == "both" else h @ fake_quant(weight, alpha, layer.spec).T).sum()

    both = mx.grad(loss, argnums=(0, 1))(layer.weight, layer.alpha, "both")
    reference = mx.grad(loss, argnums=(0, 1))(layer.weight, layer.alpha, "explicit")
    for got, want in zip(both, reference):
        np.testing.assert_allclose(np.array(got), np.array(want), rtol=1e-5, atol=1e-6)


# ------------------------------------------------------------------ back to MLX's packed layers


def qat_model(bits=2, group_size=64, tie=True):
    model = tiny_llama(tie=tie)
    return to_qat(model, quant_specs(model, QuantSpec(bits, group_size)))


def test_nn_quantize_packs_a_qat_model_on_its_learned_grid():
    model = qat_model(tie=False)
    expected = model(IDS)
    nn.quantize(model)
    assert isinstance(model.model.layers[0].mlp.up_proj, nn.QuantizedLinear)
    assert (model.model.layers[0].mlp.up_proj.bits, model.model.layers[0].mlp.up_proj.group_size) == (2, 64)
    assert isinstance(model.model.embed_tokens, nn.QuantizedEmbedding) and model.model.embed_tokens.bits == 4
    assert model.lm_head.bits == 4
    assert mx.abs(model(IDS) - expected).max().item() < 1e-4


def test_nn_quantize_with_another_grid_is_refused():
    with pytest.raises(ValueError, match=r"packs only onto the grid it learned: .*fixed by training"):
        nn.quantize(qat_model(), group_size=32, bits=4)
    with pytest.raises(ValueError, match=r"QATLinear \(2-bit/g64\) packs only onto the grid it learned: "
                                         r"mode='affine', group_size=64, bits=2; asked for .*group_size=32, bits=4.*"
                                         "fixed by training"):
        qat_model().model.layers[0].mlp.up_proj.to_quantized(group_size=32, bits=4)
    layer = QATLinear.from_linear(nn.Linear(256, 8), QuantSpec(1.58, None))
    assert layer.to_quantized(group_size=128, bits=2).bits == 2  # restating the grid is fine
    with pytest.raises(ValueError, match="mode='mxfp4'"):
        layer.to_quantized(mode="mxfp4")
    with pytest.raises(ValueError, match="quantize_input=True"):
        layer.to_quantized(quantize_input=True)


def test_to_quantized_is_the_inverse_of_to_qat():
    model = qat_model(bits=3, group_size=32)
    expected = model(IDS)
    assert to_quantized(model, mx.float16) is model
    assert qat_specs(model) == {}
    packed = dict(model.named_modules())
    assert all(isinstance(packed[f"model.layers.1.{n}"], nn.QuantizedLinear) for n in BLOCK_LINEARS)
    assert packed["model.embed_tokens"].scales.dtype == mx.float16
    assert mx.abs(model(IDS) - expected).max().item() < 0.05
