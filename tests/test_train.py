"""Runs end to end: the FP -> QAT switch, export, resume after a kill, and divergence."""

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import mlx.core as mx
import mlx_lm
import numpy as np
import pytest

from conftest import random_text
from mlx_qat import checkpoint, config, data, train
from mlx_qat.layers import QATLinear

MICRO_MODEL = {"hidden_size": 64, "num_hidden_layers": 2, "intermediate_size": 128, "num_attention_heads": 2, "num_key_value_heads": 2}


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    root = tmp_path_factory.mktemp("train_data")
    (root / "text.txt").write_text("\n\n".join(random_text(3000, seed=2)))
    data.prepare([str(root / "text.txt")], 384, root / "prepared")
    return root / "prepared"


def micro(dataset, **overrides):
    values = dict(data=str(dataset), model=MICRO_MODEL, total_tokens=40 * 4 * 32, batch_size=4, seq_len=32,
                  bits=2, group_size=32, qat_fraction=0.4, report_every=1, eval_every=10, eval_batches=2,
                  checkpoint_every=10, learning_rate=3e-3)
    return config.TrainConfig(**{**values, **overrides})


def losses(out: Path) -> dict:
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in records if "loss" in r}


def test_run_switches_to_qat_and_exports(dataset, tmp_path):
    summary = train.run(micro(dataset), tmp_path / "run", show_progress=False)
    assert (summary["D_fp"], summary["D_qat"]) == (24 * 128, 16 * 128)
    assert summary["B"] == 2 and summary["qat_fraction"] == 0.4
    # The exported model, loaded by mlx_lm, gives the fake-quant model's loss (float32 scales).
    assert summary["exported_val_loss"] == pytest.approx(summary["final_val_loss"], rel=1e-4)
    assert summary["fp_val_loss"] is not None
    for name in ("metrics.jsonl", "config.yaml", "loss.png", "summary.json", "model/config.json", "model/tokenizer.json"):
        assert (tmp_path / "run" / name).exists(), name
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    phases = [r["phase"] for r in records if "loss" in r]
    assert phases == ["fp"] * 24 + ["qat"] * 16
    assert [r["event"] for r in records if "event" in r] == ["end_fp", "end_qat"]
    model, tok = mlx_lm.load(str(tmp_path / "run" / "model"))
    assert len(mlx_lm.generate(model, tok, "the", max_tokens=5)) > 0


def test_fused_and_fp_only_runs(dataset, tmp_path):
    fused = train.run(micro(dataset, schedule="fused"), tmp_path / "fused", show_progress=False)
    assert fused["schedule"] == "fused"
    fp = train.run(micro(dataset, qat_fraction=0), tmp_path / "fp", show_progress=False)
    assert fp["B"] is None and fp["D_qat"] == 0
    assert fp["exported_val_loss"] == pytest.approx(fp["final_val_loss"], rel=1e-5)


@pytest.mark.skipif(mx.default_device() != mx.cpu, reason="the CPU allocator's cache limit")
def test_freed_step_buffers_are_kept_for_reuse():
    previous = mx.set_cache_limit(32 << 20)  # MLX's CPU default
    try:
        x = mx.ones((12 << 20,))  # 48 MB: more than the default cache keeps
        mx.eval(x * 2)  # the product is freed once evaluated
        assert mx.get_cache_memory() < x.nbytes
        train.keep_freed_buffers()
        mx.eval(x * 2)
        assert mx.get_cache_memory() >= x.nbytes
    finally:
        mx.set_cache_limit(previous)
        mx.clear_cache()


def test_refuses_to_overwrite_a_run(dataset, tmp_path):
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "metrics.jsonl").write_text("")
    with pytest.raises(train.TrainingError, match="--resume"):
        train.run(micro(dataset), tmp_path / "run", show_progress=False)


class Killed(Exception):
    pass


def run_until_killed(cfg, out, monkeypatch, at_step=None):
    """Run until just after the checkpoint at `at_step` (the first one if None) is written."""
    save = checkpoint.save

    def save_then_die(out, model, optimizer, meta):
        save(out, model, optimizer, meta)
        if at_step is None or meta["step"] == at_step:
            raise Killed(model)

    monkeypatch.setattr(checkpoint, "save", save_then_die)
    with pytest.raises(Killed) as killed:
        train.run(cfg, out, show_progress=False)
    monkeypatch.setattr(checkpoint, "save", save)
    return killed.value.args[0]


def test_resume_in_the_qat_phase_matches_an_uninterrupted_run(dataset, tmp_path, monkeypatch):
    cfg = micro(dataset)
    train.run(cfg, tmp_path / "whole", show_progress=False)
    model = run_until_killed(cfg, tmp_path / "cut", monkeypatch, at_step=30)  # past the switch at step 24
    assert isinstance(model.model.layers[0].mlp.up_proj, QATLinear)
    train.run(cfg, tmp_path / "cut", resume=True, show_progress=False)

    whole, cut = losses(tmp_path / "whole"), losses(tmp_path / "cut")
    assert sorted(cut) == list(range(1, 41))
    np.testing.assert_allclose([cut[s] for s in range(31, 41)], [whole[s] for s in range(31, 41)], rtol=0, atol=1e-5)


def test_killed_process_resumes_with_the_same_losses(dataset, tmp_path):
    """SIGKILL a real training process after its first checkpoint, then --resume it."""
    args = ["--data", str(dataset), "--model", json.dumps(MICRO_MODEL), "--total-tokens", str(300 * 128),
            "--batch-size", "4", "--seq-len", "32", "--bits", "2", "--group-size", "32", "--qat-fraction", "0.5",
            "--report-every", "1", "--eval-every", "1000", "--eval-batches", "2", "--checkpoint-every", "20"]
    command = [sys.executable, "-m", "mlx_qat.train", "--no-progress", *args]
    subprocess.run([*command, "--out", str(tmp_path / "whole")], check=True, capture_output=True)

    proc = subprocess.Popen([*command, "--out", str(tmp_path / "cut")], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    meta = tmp_path / "cut" / "checkpoint" / "meta.json"
    deadline = time.time() + 120
    while not meta.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    killed_at = max(losses(tmp_path / "cut"))
    assert killed_at < 300, "the run finished before it could be killed"
    subprocess.run([*command, "--out", str(tmp_path / "cut"), "--resume"], check=True, capture_output=True)

    whole, cut = losses(tmp_path / "whole"), losses(tmp_path / "cut")
    assert sorted(cut) == list(range(1, 301))
    np.testing.assert_allclose([cut[s] for s in range(1, 301)], [whole[s] for s in range(1, 301)], rtol=0, atol=1e-5)


def test_resume_refuses_a_changed_config(dataset, tmp_path, monkeypatch):
    run_until_killed(micro(dataset), tmp_path / "run", monkeypatch)
    with pytest.raises(train.TrainingError, match="bits: 2 -> 4"):
        train.run(micro(dataset, bits=4), tmp_path / "run", resume=True, show_progress=False)


def test_corrupt_checkpoint_is_reported(dataset, tmp_path, monkeypatch):
    run_until_killed(micro(dataset), tmp_path / "run", monkeypatch)
    (tmp_path / "run" / "checkpoint" / "model.safetensors").write_bytes(b"garbage")
    with pytest.raises(checkpoint.CheckpointError, match="corrupt"):
        train.run(micro(dataset), tmp_path / "run", resume=True, show_progress=False)


def test_divergence_stops_the_run_and_keeps_the_checkpoint(dataset, tmp_path):
    cfg = micro(dataset, learning_rate=1e4, grad_clip=0.0, checkpoint_every=1, report_every=7)
    with pytest.raises(train.TrainingError, match=r"the loss became (nan|inf) at step (\d+).*last good checkpoint \(step (\d+)\)") as e:
        train.run(cfg, tmp_path / "run", show_progress=False)
    bad, good = map(int, re.search(r"at step (\d+).*\(step (\d+)\)", str(e.value)).groups())
    assert good == bad - 1  # checked at every checkpoint step, not only at reports
    saved = checkpoint.read_meta(checkpoint.find(tmp_path / "run"))
    assert saved["step"] == good


def test_cli_errors_are_clear(tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        train.main(["--out", str(tmp_path / "r"), "--bits", "7"])
    assert e.value.code == 2 and "bits=7 is not supported" in capsys.readouterr().err


@pytest.mark.slow
def test_readme_main_command_shortened(tmp_path):
    """The README's main command on the built-in corpus, cut to 200 steps."""
    out = tmp_path / "tiny"
    result = subprocess.run(
        [sys.executable, "-m", "mlx_qat.train", "--config", "configs/tiny.yaml", "--out", str(out),
         "--total-tokens", str(200 * 16 * 128), "--eval-every", "100", "--no-progress"],
        check=True, capture_output=True, text=True,
    )
    assert "val loss, exported" in result.stdout
    summary = json.loads((out / "summary.json").read_text())
    assert summary["exported_val_loss"] < 6.0  # well below ln(2048) = 7.6 of a uniform guess
    model, tok = mlx_lm.load(str(out / "model"))
    assert len(mlx_lm.generate(model, tok, "And God said", max_tokens=10)) > 0
