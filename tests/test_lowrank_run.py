"""Low-rank QAT runs from a pretrained model (fine_tune_type: lora): the frozen 16-bit base,
checkpoints of the trainables alone, resume after a kill, grad_checkpoint, the export of the
merged model and the adapter alone, and the refusals."""

import inspect
import json
import subprocess
import sys
from pathlib import Path

import mlx.core as mx
import mlx_lm
import numpy as np
import pytest
import yaml
from mlx.utils import tree_flatten
from mlx_lm.utils import quantize_model
from mlx_lm.tuner.lora import LoRALinear
from mlx_lm.tuner.utils import load_adapters

from conftest import sigkill_after_first_checkpoint
from mlx_qat import checkpoint, config, data, pretrained, report, train
from mlx_qat.evaluate import evaluate
from mlx_qat.export import main as export_main
from mlx_qat.lowrank import LowRankQATLinear, lowrank_layers
from mlx_qat.model import from_config, num_params
from mlx_qat.pretrained import load
from mlx_qat.start import StartError, check_same_fine_tuning

from test_pretrained import (ARCHS, GGUF_LLAMA, SMALL, STEPS, cli_error, save_directory, start_config, step_losses,
                             write_gguf)

# a learning rate at which the adapters tell (the pretrained default 1e-4 barely moves them in 4 steps)
LORA = dict(fine_tune_type="lora", lora_parameters={"rank": 4, "scale": 2.0}, compare=[], learning_rate=1e-2)


def base_dir(bpe, path, dtype=mx.bfloat16, arch="llama"):
    """A pretrained model directory whose weights are stored in `dtype`."""
    config_ = {"model_type": arch, **SMALL, **ARCHS[arch]}
    model = from_config(config_, seed=1)
    model.set_dtype(dtype)
    return save_directory(path, model, config_, bpe)


def trainable_keys(model) -> set:
    return {k for k, _ in tree_flatten(model.trainable_parameters())}


def test_the_base_keeps_its_16_bit_dtype(bpe, tmp_path):
    for stored, kept in ((mx.bfloat16, mx.bfloat16), (mx.float16, mx.float16), (mx.float32, mx.bfloat16)):
        path = base_dir(bpe, tmp_path / str(stored), stored)
        assert {v.dtype for _, v in tree_flatten(load(path, dtype=None).model.parameters())} == {kept}
        assert {v.dtype for _, v in tree_flatten(load(path).model.parameters())} == {mx.float32}  # full QAT's default
    write_gguf(tmp_path / "m.gguf", from_config(GGUF_LLAMA, seed=3), bpe)  # Q8_0, Q4_0, ..., F32 tensors: fp16-scaled
    assert {v.dtype for _, v in tree_flatten(load(tmp_path / "m.gguf", dtype=None).model.parameters())} == {mx.float16}


def test_a_lora_run_trains_the_adapters_on_the_frozen_base_and_exports_both(bpe, corpus, tmp_path, monkeypatch):
    path = base_dir(bpe, tmp_path / "model")
    block = type(load(path).model.layers[0])
    monkeypatch.setattr(block, "__call__", block.__call__)  # grad_checkpoint patches the class: undone after
    cfg = start_config(path, corpus, tmp_path, **LORA, num_layers=1, snapshot_at=[2 * 128])
    assert cfg.lora_parameters == {"rank": 4, "scale": 2.0, "dropout": 0.0, "keys": None}  # mlx-lm's defaults filled in
    summary = train.run(cfg, tmp_path / "run", show_progress=False)
    out = tmp_path / "run"

    # the export of the merged model, through mlx_lm.load, has the fake-quant model's loss
    assert (summary["fine_tune_type"], summary["D_fp"], summary["B"]) == ("lora", 0, 2)
    assert summary["exported_val_loss"] == pytest.approx(summary["final_val_loss"], rel=1e-5)
    assert summary["peak_memory_bytes"] > 0 and np.isfinite(summary["ptq_val_loss"])
    assert summary["adapter"] == str(out / "adapter") and "mlx_lm.fuse" in summary["adapter_note"]
    table = report.format_summary(summary)
    assert "low-rank QAT" in table and "mlx_lm.fuse" in table
    _, _, exported_config = mlx_lm.load(str(out / "model"), return_config=True)
    assert exported_config["quantization"]["bits"] == 2 and exported_config["architectures"] == ["ForTests"]

    # the checkpoint holds what trains and its optimizer state, nothing of the base
    meta = checkpoint.read_meta(out / "checkpoint")
    assert meta["weights"] == "trainable" and meta["step"] == STEPS
    saved = set(mx.load(str(out / "checkpoint" / "model.safetensors")))
    adapted = {f"model.layers.1.{k}" for k in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj",
                                                "self_attn.o_proj", "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")}
    assert {k.rsplit(".", 1)[0] for k in saved if not k.endswith(".alpha")} == adapted
    assert {k.rsplit(".", 1)[-1] for k in saved} == {"lora_a", "lora_b", "alpha"}
    moments = {k.split(".", 2)[-1].rsplit(".", 1)[0] for k in mx.load(str(out / "checkpoint" / "optimizer.safetensors"))
               if k.endswith((".m", ".v"))}
    assert moments == saved

    # rebuilt from `pretrained`: the base bit for bit in bfloat16, the model validating as the run did
    model, _ = checkpoint.load_model(out / "checkpoint")
    assert set(lowrank_layers(model)) == adapted and trainable_keys(model) == saved
    original = dict(tree_flatten(load(path, dtype=None).model.parameters()))
    for name, value in tree_flatten(model.parameters()):
        if name in original:
            assert value.dtype == mx.bfloat16 and mx.array_equal(value, original[name]).item(), name
    batches = list(data.eval_batches(data.load(cfg, load(path).tokenizer).val, cfg.batch_size, cfg.seq_len,
                                     cfg.eval_batches))
    assert evaluate(model, batches) == pytest.approx(summary["final_val_loss"], rel=1e-5)
    export_main(["--checkpoint", str(out / "checkpoint"), "--out", str(tmp_path / "x")])  # merged, packed as at the end
    assert evaluate(mlx_lm.load(str(tmp_path / "x"))[0], batches) == pytest.approx(summary["exported_val_loss"], rel=1e-6)

    # the adapter alone, in mlx-lm's layout: plain LoRA on the float base
    adapter = json.loads((out / "adapter" / "adapter_config.json").read_text())
    assert adapter == {"fine_tune_type": "lora", "num_layers": 1,
                       "lora_parameters": {"rank": 4, "scale": 2.0, "dropout": 0.0, "keys": sorted(a[15:] for a in adapted)}}
    loras = {p: m for p, m in load_adapters(load(path).model, str(out / "adapter")).named_modules()
             if isinstance(m, LoRALinear)}
    trained = mx.load(str(out / "checkpoint" / "model.safetensors"))
    assert set(loras) == adapted
    for p, lora in loras.items():
        assert mx.array_equal(lora.lora_b, trained[f"{p}.lora_b"]).item() and mx.any(lora.lora_b != 0).item()

    # a new run branched from its snapshot (the base read again) continues it exactly
    train.run(cfg, tmp_path / "branch", init_from=out / "snapshots" / str(2 * 128), show_progress=False)
    branch, whole = step_losses(tmp_path / "branch"), step_losses(out)
    np.testing.assert_allclose([branch[s] for s in (3, 4)], [whole[s] for s in (3, 4)], rtol=0, atol=1e-5)

    # grad_checkpoint: the same losses
    train.run(start_config(path, corpus, tmp_path, **LORA, num_layers=1, grad_checkpoint=True), tmp_path / "recompute",
              show_progress=False)
    assert block.__call__.__name__ == "checkpointed_fn"
    np.testing.assert_allclose(list(step_losses(tmp_path / "recompute").values()), list(step_losses(out).values()),
                               rtol=0, atol=1e-5)


def test_a_lora_run_distills_from_its_own_frozen_base(bpe, corpus, tmp_path, monkeypatch):
    path = base_dir(bpe, tmp_path / "model")
    callers = []
    monkeypatch.setattr(pretrained, "load", lambda *a, **k: callers.append(Path(inspect.stack()[1].filename).name)
                        or load(*a, **k))
    cfg = start_config(path, corpus, tmp_path, **LORA, loss="distill", num_layers=1)
    summary = train.run(cfg, tmp_path / "run", show_progress=False)
    # the base is read to train, and again after training for the reference and PTQ losses: the teacher is the
    # trained model's frozen view, never a second copy beside it
    assert callers == ["train.py", "baselines.py"]
    first = step_losses(tmp_path / "run")[1]
    assert 0 < first < 0.5 * summary["reference_val_loss"]  # a KL from the base's own distribution, not a cross-entropy


def test_a_lora_run_keeps_a_quantized_base_packed(bpe, corpus, tmp_path):
    config_ = {"model_type": "llama", **SMALL, **ARCHS["llama"]}
    model = from_config(config_, seed=1)
    model.set_dtype(mx.bfloat16)
    quantized, config_ = quantize_model(model, config_, group_size=64, bits=8)
    path = save_directory(tmp_path / "model", quantized, config_, bpe)
    cfg = start_config(path, corpus, tmp_path, **LORA, num_layers=1, quantized_base="packed")
    summary = train.run(cfg, tmp_path / "run", show_progress=False)
    assert summary["exported_val_loss"] == pytest.approx(summary["final_val_loss"], rel=1e-5)
    # rebuilt from the checkpoint: the base packed again, validating as the run did
    rebuilt, _ = checkpoint.load_model(tmp_path / "run" / "checkpoint")
    assert {v.dtype for k, v in tree_flatten(rebuilt.parameters()) if k.endswith(".weight") and v.ndim == 2} == {mx.uint32}
    batches = list(data.eval_batches(data.load(cfg, load(path).tokenizer).val, cfg.batch_size, cfg.seq_len,
                                     cfg.eval_batches))
    assert evaluate(rebuilt, batches) == pytest.approx(summary["final_val_loss"], rel=1e-5)
    assert summary["N"] == num_params(load(path).model)  # the packed weights counted as the matrices they are


class Killed(Exception):
    pass


def test_a_killed_lora_run_resumes_with_the_same_losses(bpe, corpus, tmp_path, monkeypatch):
    """Adapter dropout draws random numbers in every step: the resumed run draws the same."""
    path = base_dir(bpe, tmp_path / "model", mx.float16, arch="qwen2")  # tied, with q/k/v biases; a float16 base
    cfg = start_config(path, corpus, tmp_path, total_tokens=6 * 128, checkpoint_every=3, fine_tune_type="lora",
                       lora_parameters={"rank": 2, "scale": 4.0, "dropout": 0.3, "keys": ["self_attn.q_proj", "mlp.up_proj"]},
                       learning_rate=1e-2, compare=[])  # a rate at which the adapters (and their dropout) tell
    train.run(cfg, tmp_path / "whole", show_progress=False)
    save = checkpoint.save

    def save_then_die(where, model, *args, **kwargs):
        save(where, model, *args, **kwargs)
        raise Killed(model)

    monkeypatch.setattr(checkpoint, "save", save_then_die)
    with pytest.raises(Killed) as killed:
        train.run(cfg, tmp_path / "cut", show_progress=False)
    monkeypatch.undo()
    trained = killed.value.args[0]  # the run's model: no float32 copy of a base weight, only the trainables in float32
    trainable = trainable_keys(trained)
    assert {k.rsplit(".", 1)[-1] for k in trainable} == {"lora_a", "lora_b", "alpha"}
    for name, value in tree_flatten(trained.parameters()):
        assert value.dtype == (mx.float32 if name in trainable else mx.float16), name
    assert max(step_losses(tmp_path / "cut")) == 3
    assert yaml.safe_load((tmp_path / "cut" / "config.yaml").read_text())["fine_tune_type"] == "lora"
    train.main(["--out", str(tmp_path / "cut"), "--resume", "--no-progress"])  # the base read again from `pretrained`
    whole, cut = step_losses(tmp_path / "whole"), step_losses(tmp_path / "cut")
    assert sorted(cut) == list(range(1, 7))
    np.testing.assert_allclose([cut[s] for s in range(4, 7)], [whole[s] for s in range(4, 7)], rtol=0, atol=1e-5)
    assert len({whole[s] for s in whole}) == 6
    model, _ = checkpoint.load_model(tmp_path / "cut" / "checkpoint")
    assert {m.weight.dtype for m in lowrank_layers(model).values()} == {mx.float16}
    assert all(isinstance(model.model.layers[i].self_attn.q_proj, LowRankQATLinear) for i in (0, 1))
    summaries = [json.loads((tmp_path / run / "summary.json").read_text()) for run in ("whole", "cut")]
    assert summaries[1]["final_val_loss"] == pytest.approx(summaries[0]["final_val_loss"], abs=1e-5)


@pytest.mark.slow
def test_a_sigkilled_lora_process_resumes_with_the_same_losses(bpe, corpus, tmp_path):
    """SIGKILL a real low-rank training process after its first checkpoint, then --resume it."""
    path = base_dir(bpe, tmp_path / "model")
    steps = 200
    command = [sys.executable, "-m", "mlx_qat.train", "--no-progress", "--init-from", str(path), "--data", str(corpus),
               "--data-cache", str(tmp_path / "cache"), "--total-tokens", str(steps * 128), "--batch-size", "4",
               "--seq-len", "32", "--bits", "2", "--group-size", "32", "--report-every", "1", "--eval-every", "1000",
               "--eval-batches", "2", "--checkpoint-every", "10", "--fine-tune-type", "lora", "--learning-rate", "1e-2",
               "--lora-parameters", "{rank: 4, scale: 2.0, dropout: 0.2}"]
    subprocess.run([*command, "--out", str(tmp_path / "whole")], check=True, capture_output=True)
    sigkill_after_first_checkpoint(command, tmp_path / "cut")
    killed_at = max(step_losses(tmp_path / "cut"))
    assert killed_at < steps, "the run finished before it could be killed"
    subprocess.run([sys.executable, "-m", "mlx_qat.train", "--no-progress", "--out", str(tmp_path / "cut"), "--resume"],
                   check=True, capture_output=True)
    whole, cut = step_losses(tmp_path / "whole"), step_losses(tmp_path / "cut")
    assert sorted(cut) == list(range(1, steps + 1))
    np.testing.assert_allclose([cut[s] for s in range(1, steps + 1)], [whole[s] for s in range(1, steps + 1)],
                               rtol=0, atol=1e-5)


def test_lora_refusals_come_before_the_data(bpe, tmp_path, capsys):
    out, path = tmp_path / "run", base_dir(bpe, tmp_path / "model")
    missing = tmp_path / "no" / "data"  # read only after these checks: they must come first

    def start(*more):
        return cli_error(capsys, "--init-from", path, "--out", out, "--data", missing, "--fine-tune-type", "lora", *more)

    assert "fine_tune_type: lora needs a pretrained start" in cli_error(capsys, "--out", out, "--fine-tune-type", "lora")
    assert "num_layers=3: the model has 2 blocks" in start("--num-layers", "3")
    assert "['attn.q']" in start("--lora-parameters", "{keys: [attn.q]}") and "self_attn.q_proj" in start(
        "--lora-parameters", "{keys: [attn.q]}")
    assert "lora_parameters.rank=0 must be a positive integer" in start("--lora-parameters", "{rank: 0}")
    assert "did you mean 'dropout'" in start("--lora-parameters", "{drop_out: 0.1}")
    assert "qat_fraction=0.5" in start("--qat-fraction", "0.5")
    (tmp_path / "m.gguf").write_bytes(b"")  # refused by its name, before it is read
    assert "quantized_base: packed keeps an mlx-lm checkpoint's packed weights" in cli_error(
        capsys, "--init-from", tmp_path / "m.gguf", "--out", out, "--data", missing, "--fine-tune-type", "lora",
        "--quantized-base", "packed")
    assert "quantized_base: packed keeps a frozen base packed; full QAT" in cli_error(
        capsys, "--init-from", path, "--out", out, "--data", missing, "--quantized-base", "packed")
    assert "grad_checkpoint" in start("--lora-parameters", "{dropout: 0.1}", "--grad-checkpoint", "true")
    assert "num_layers=1 chooses the blocks" in cli_error(capsys, "--init-from", path, "--out", out, "--num-layers", "1")
    assert not out.exists()


def test_a_lora_checkpoint_continues_only_its_own_kind_of_run():
    cfg = config.resolve(dict(pretrained="base", **LORA))
    saved = cfg.to_dict()
    check_same_fine_tuning("ckpt", saved, cfg)
    for changes, message in ((dict(fine_tune_type="full"), "fine_tune_type: full run"),
                             (dict(pretrained="other"), "its own base"),
                             (dict(num_layers=1), "num_layers: 1 -> None"),
                             (dict(lora_parameters={**cfg.lora_parameters, "rank": 8}), "lora_parameters")):
        with pytest.raises(StartError, match=message):
            check_same_fine_tuning("ckpt", {**saved, **changes}, cfg)
    with pytest.raises(StartError, match="fine_tune_type: full run"):  # a checkpoint from before the key: full
        check_same_fine_tuning("ckpt", {k: v for k, v in saved.items() if k != "fine_tune_type"}, cfg)
