"""Low-rank QAT: LoRA's trainables and memory, on the grid the export writes."""

import json

import mlx.core as mx
import mlx.nn as nn
import mlx.optimizers as optim
import mlx_lm
import numpy as np
import pytest
from mlx.utils import tree_flatten, tree_unflatten
from mlx_lm.tuner.lora import LoRALinear
from mlx_lm.tuner.utils import load_adapters
from mlx_lm.utils import dequantize_model

from conftest import tiny_llama
from mlx_qat import QuantSpec
from mlx_qat.export import export
from mlx_qat.layers import QAT_LAYERS, qat_specs, quant_specs, to_qat
from mlx_qat.distill import make_distill_loss
from mlx_qat.lowrank import (LowRankQATLinear, adapter_config, adapter_weights, frozen_base, lowrank_layers, merge, merged,
                             save_adapter, teacher_of, to_lowrank_qat)

SPEC = QuantSpec(2, 64)
IDS = mx.array([[3, 1, 4, 1, 5, 9, 2, 6, 5, 3, 5, 8], [2, 7, 1, 8, 2, 8, 1, 8, 2, 8, 4, 5]])
ALL_KEYS = ["mlp.down_proj", "mlp.gate_proj", "mlp.up_proj", "self_attn.k_proj", "self_attn.o_proj",
            "self_attn.q_proj", "self_attn.v_proj"]


def base() -> nn.Module:
    """The pretrained base: tiny_llama's weights in bfloat16 (the same on every call)."""
    model = tiny_llama()
    model.set_dtype(mx.bfloat16)
    mx.eval(model.parameters())
    return model


def in_float32(model: nn.Module) -> nn.Module:
    """A model computed in float32, as the frozen-base teacher computes."""
    model.set_dtype(mx.float32)
    return model


def dequantized_in_float32(model: nn.Module) -> nn.Module:
    """mlx-lm's dequantize_model, to float32 (the teacher reads a packed W0 as the student does)."""
    dequantize = mx.dequantize
    mx.dequantize = lambda *a, **k: dequantize(*a, **{**k, "dtype": mx.float32})
    try:
        return in_float32(dequantize_model(model))
    finally:
        mx.dequantize = dequantize


def lowrank(spec=SPEC, rank=4, scale=2.0, **kwargs) -> nn.Module:
    model = base()
    return to_lowrank_qat(model, quant_specs(model, spec), rank, scale, **kwargs)


def loss_fn(model, tokens):
    return nn.losses.cross_entropy(model(tokens[:, :-1]), tokens[:, 1:], reduction="mean")


def train(model, steps: int):
    tokens = mx.random.randint(0, 256, (4, 33), key=mx.random.key(1))
    optimizer = optim.AdamW(learning_rate=1e-2)
    step = nn.value_and_grad(model, loss_fn)
    losses = []
    for _ in range(steps):
        loss, grads = step(model, tokens)
        optimizer.update(model, grads)
        mx.eval(model.parameters(), optimizer.state)
        losses.append(loss.item())
    return losses, optimizer


def keys_of(tree) -> set:
    return {k for k, _ in tree_flatten(tree)}


@pytest.mark.parametrize("keys, num_layers", [(None, 1), (["self_attn.q_proj", "mlp.down_proj"], None)])
def test_only_the_adapter_and_the_scales_train(keys, num_layers):
    model = lowrank(keys=keys, num_layers=num_layers)
    blocks = ["model.layers.0", "model.layers.1"][-(num_layers or 2):]
    adapted = {f"{b}.{k}" for b in blocks for k in keys or ALL_KEYS}
    assert set(lowrank_layers(model)) == adapted
    # every other module of the specs is a QAT layer at its bits, frozen but for α
    assert set(qat_specs(model)) | adapted == set(quant_specs(base(), SPEC))
    trainable = {f"{p}.{leaf}" for p in adapted for leaf in ("lora_a", "lora_b")}
    trainable |= {f"{p}.alpha" for p, m in model.named_modules() if isinstance(m, (LowRankQATLinear, *QAT_LAYERS))}
    assert keys_of(model.trainable_parameters()) == trainable
    for path, m in lowrank_layers(model).items():
        assert m.weight.dtype == mx.bfloat16 and f"{path}.weight" not in trainable
    _, grads = nn.value_and_grad(model, loss_fn)(model, IDS)
    assert keys_of(grads) == trainable  # no gradient entry for W0, norms or frozen weights


@pytest.mark.parametrize("spec", [SPEC, QuantSpec(4, None), QuantSpec(4, 32, "mxfp4")], ids=str)
def test_at_init_the_model_is_full_qat(spec):
    # Full QAT of the same bf16 checkpoint trains float32 master weights (pretrained.load's
    # default), i.e. the grid of float32(W0): with lora_b = 0 low-rank QAT is that model exactly.
    reference = base()
    reference.set_dtype(mx.float32)
    to_qat(reference, quant_specs(reference, spec))
    assert mx.array_equal(lowrank(spec)(IDS), reference(IDS)).item()


def test_training_moves_only_the_trainables_and_merges_exactly():
    model = lowrank(num_layers=1)
    trainable = keys_of(model.trainable_parameters())
    before = dict(tree_flatten(model.parameters()))
    losses, optimizer = train(model, 6)
    assert losses[-1] < losses[0]
    after = dict(tree_flatten(model.parameters()))
    for k, v in before.items():  # W0, biases, norms and frozen layers' weights: bit for bit
        if k not in trainable:
            assert after[k].dtype == v.dtype and mx.array_equal(after[k], v).item(), k
    # optimizer state only for the trainables (m and v of AdamW)
    state = {k.rsplit(".", 1)[0] for k in keys_of(optimizer.state) if k not in ("step", "learning_rate")}
    assert state == trainable
    assert all(mx.any(m.lora_b != 0).item() for m in lowrank_layers(model).values())
    want = model(IDS)
    merge(model)
    assert not lowrank_layers(model) and len(qat_specs(model)) == len(quant_specs(base(), SPEC))
    assert mx.array_equal(model(IDS), want).item()  # the same ŵ: exactly, not only to 1e-5


def test_the_gradient_reaches_the_adapter_through_the_merged_weight():
    # W = W0 + s·(A B)ᵀ, so with G = dL/dW (the STE gradient of the merged QATLinear's weight):
    # dA = s·Gᵀ Bᵀ and dB = s·Aᵀ Gᵀ; dα is the merged layer's.
    linear = nn.Linear(128, 64)
    linear.set_dtype(mx.bfloat16)
    layer = LowRankQATLinear.from_linear(linear, SPEC, rank=4, scale=2.0)
    layer.lora_b = 0.05 * mx.random.normal(layer.lora_b.shape, key=mx.random.key(2))
    x, c = mx.random.normal((8, 128), key=mx.random.key(3)), mx.random.normal((8, 64), key=mx.random.key(4))
    plain = merged(layer)
    grads = nn.value_and_grad(layer, lambda m: (m(x) * c).sum())(layer)[1]
    reference = nn.value_and_grad(plain, lambda m: (m(x) * c).sum())(plain)[1]
    g, a, b = reference["weight"], layer.lora_a, layer.lora_b
    np.testing.assert_allclose(np.array(grads["lora_a"]), np.array(2.0 * g.T @ b.T), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(np.array(grads["lora_b"]), np.array(2.0 * a.T @ g.T), rtol=1e-5, atol=1e-6)
    assert mx.array_equal(grads["alpha"], reference["alpha"]).item()


def test_the_export_of_the_merged_model_loads_in_mlx_lm(tokenizer_dir, tmp_path):
    model = lowrank(num_layers=1)
    train(model, 3)
    want = model(IDS)
    report = export(merge(model), tmp_path / "m", tokenizer=tokenizer_dir)
    assert report.bits_per_weight < 5
    loaded, _ = mlx_lm.load(str(tmp_path / "m"))
    assert isinstance(loaded.model.layers[1].self_attn.q_proj, nn.QuantizedLinear)
    np.testing.assert_allclose(np.array(loaded(IDS)), np.array(want), rtol=1e-5, atol=1e-5)


def test_the_adapter_loads_onto_the_float_base_with_mlx_lm(tmp_path):
    model = lowrank(keys=["self_attn.q_proj", "self_attn.v_proj"], num_layers=1, dropout=0.05)
    train(model, 2)
    save_adapter(model, tmp_path / "adapter")
    config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert config == adapter_config(model) == {
        "fine_tune_type": "lora", "num_layers": 1,
        "lora_parameters": {"rank": 4, "scale": 2.0, "dropout": 0.05, "keys": ["self_attn.q_proj", "self_attn.v_proj"]}}
    float_model = load_adapters(base(), str(tmp_path / "adapter"))
    loras = {p: m for p, m in float_model.named_modules() if isinstance(m, LoRALinear)}
    ours = lowrank_layers(model)
    assert set(loras) == set(ours) == {"model.layers.1.self_attn.q_proj", "model.layers.1.self_attn.v_proj"}
    weights = adapter_weights(model)
    assert set(weights) == {f"{p}.{leaf}" for p in ours for leaf in ("lora_a", "lora_b")}
    for path, lora in loras.items():
        assert mx.array_equal(lora.lora_a, ours[path].lora_a).item()
        assert mx.array_equal(lora.lora_b, ours[path].lora_b).item()
        assert mx.array_equal(lora.linear.weight, ours[path].weight).item()  # the same float base W0
        assert lora.scale == 2.0


def test_no_float32_copy_of_a_base_weight_is_held():
    shapes = {v.shape for _, v in tree_flatten(base().parameters()) if v.ndim == 2}
    model = lowrank()
    for k, v in tree_flatten(model.parameters()):
        assert not (v.dtype == mx.float32 and v.shape in shapes), k
        assert v.dtype == mx.bfloat16 or k.rsplit(".", 1)[-1] in ("lora_a", "lora_b", "alpha"), k


def test_dropout_perturbs_the_low_rank_path_in_training_only():
    model = lowrank(dropout=0.5)
    for m in lowrank_layers(model).values():
        m.lora_b = 0.01 * mx.random.normal(m.lora_b.shape)
    model.eval()
    want = model(IDS)
    model.train()
    assert not mx.array_equal(model(IDS), want).item()
    model.eval()
    assert mx.array_equal(model(IDS), want).item()
    assert mx.array_equal(merge(model)(IDS), want).item()  # eval: exactly the merged grid


def test_the_frozen_base_is_the_pretrained_model_and_the_distillation_teacher():
    model = lowrank(dropout=0.5, num_layers=1)  # adapters, frozen QAT layers and the quantized embedding
    train(model, 3)  # the adapters and α move off their start
    with frozen_base(model):  # W0 alone, bit for bit in float32: no adapter, no grid, no dropout though training
        assert model.training and mx.array_equal(model(IDS), in_float32(base())(IDS)).item()
    model.eval()
    quantized = model(IDS)
    with frozen_base(model):
        assert not mx.array_equal(model(IDS), quantized).item()
    assert mx.array_equal(model(IDS), quantized).item()  # the QAT form is back

    # distillation from the student's own base equals distillation from a second copy of the model,
    # also inside a compiled step (the flag is read while tracing)
    tokens = mx.concatenate([IDS, IDS[:, :1]], axis=1)
    own, copy = make_distill_loss(teacher_of(model)), make_distill_loss(in_float32(base()))
    assert own(model, tokens).item() == pytest.approx(copy(model, tokens).item(), rel=1e-6)
    assert own(model, tokens).item() > 0  # the student is on its grid, the teacher is not
    loss_and_grad = nn.value_and_grad(model, own)
    loss, grads = mx.compile(lambda batch: loss_and_grad(model, batch), inputs=model.state, outputs=model.state)(tokens)
    assert loss.item() == pytest.approx(copy(model, tokens).item(), rel=1e-5)
    assert keys_of(grads) == keys_of(model.trainable_parameters())


def packed_base(bits: int = 8, mode: str = "affine") -> nn.Module:
    """The base quantized by MLX (blocks and embedding at `bits`, groups of 64, or in a float
    format's own groups): QLoRA's base."""
    model = base()
    nn.quantize(model, group_size=64 if mode == "affine" else None, bits=bits, mode=mode)
    mx.eval(model.parameters())
    return model


def lowrank_of(model: nn.Module, spec=SPEC, **kwargs) -> nn.Module:
    mx.random.seed(0)  # lora_a's draw: the same for every model converted here
    return to_lowrank_qat(model, quant_specs(model, spec, packed=True), 4, 2.0, num_layers=1, **kwargs)


def dequantized(model: nn.Module) -> nn.Module:
    """A packed base with its packed layers as float32 ones of the same values (the rest as it is)."""
    floats = []
    for path, m in model.named_modules():
        if isinstance(m, (nn.QuantizedLinear, nn.QuantizedEmbedding)):
            w = mx.dequantize(m.weight, m.scales, m.biases, m.group_size, m.bits, dtype=mx.float32)
            plain = nn.Embedding(*w.shape) if isinstance(m, nn.QuantizedEmbedding) else nn.Linear(w.shape[1], w.shape[0], False)
            plain.weight = w
            floats.append((path, plain))
    model.update_modules(tree_unflatten(floats))
    return model


@pytest.mark.parametrize("spec", [SPEC, QuantSpec(4, 32, "mxfp4")], ids=str)
def test_a_packed_base_stays_packed_and_trains_as_its_float32_values(spec):
    packed, plain = lowrank_of(packed_base(), spec), lowrank_of(dequantized(packed_base()), spec)
    shapes = {v.shape for _, v in tree_flatten(base().parameters()) if v.ndim == 2}
    for k, v in tree_flatten(packed.parameters()):  # W0 packed (uint32) everywhere; no float copy of a matrix
        assert not (mx.issubdtype(v.dtype, mx.floating) and v.shape in shapes), k
    assert keys_of(packed.trainable_parameters()) == keys_of(plain.trainable_parameters())
    assert mx.array_equal(packed(IDS), plain(IDS)).item()  # W0 dequantized in float32 inside the step: the same grid
    losses, _ = train(packed, 4)
    want, _ = train(plain, 4)
    assert losses == want and losses[-1] < losses[0]
    assert mx.array_equal(packed(IDS), plain(IDS)).item()


def test_a_packed_base_exports_losslessly_and_is_its_own_teacher(tokenizer_dir, tmp_path):
    model = lowrank_of(packed_base())
    with frozen_base(model):  # the teacher: the packed model dequantized as mlx-lm does, in float32, bit for bit
        assert mx.array_equal(model(IDS), dequantized_in_float32(packed_base())(IDS)).item()
    train(model, 3)
    model.eval()
    want = model(IDS)
    export(merge(model), tmp_path / "m", tokenizer=tokenizer_dir)
    assert not any("scales" in m for _, m in model.named_modules() if isinstance(m, (LowRankQATLinear, *QAT_LAYERS)))
    loaded, _ = mlx_lm.load(str(tmp_path / "m"))
    np.testing.assert_allclose(np.array(loaded(IDS)), np.array(want), rtol=1e-5, atol=1e-5)


def test_a_float_format_base_kept_packed_is_its_own_teacher():
    """Its scales are uint8: the teacher dequantizes it as mlx-lm does (to float32)."""
    model = lowrank_of(packed_base(4, "mxfp4"))
    with frozen_base(model):
        assert mx.array_equal(model(IDS), dequantized_in_float32(packed_base(4, "mxfp4"))(IDS)).item()
