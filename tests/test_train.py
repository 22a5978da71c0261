"""Runs end to end: the FP -> QAT switch, export, resume after a kill, and divergence."""

import json
import os
import re
import struct
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import mlx.core as mx
import mlx_lm
import numpy as np
import pytest
from mlx.utils import tree_flatten

from conftest import MICRO_MODEL, read_jsonl, sigkill_after_first_checkpoint, tiny_llama
from mlx_qat import checkpoint, config, data, model as models, report, train
from mlx_qat.checkpointer import DivergenceError
from mlx_qat.start import StartError
from mlx_qat.step import build_step, keep_freed_buffers, make_optimizer
from mlx_qat.layers import QATLinear, quant_specs, to_qat
from mlx_qat.quantizers import QuantSpec

def micro(dataset, **overrides):
    values = dict(data=str(dataset), model=MICRO_MODEL, total_tokens=40 * 4 * 32, batch_size=4, seq_len=32,
                  bits=2, group_size=32, qat_fraction=0.4, report_every=1, eval_every=10, eval_batches=2,
                  checkpoint_every=10, learning_rate=3e-3)
    return config.TrainConfig(**{**values, **overrides})


def losses(out: Path) -> dict:
    return {r["step"]: r["loss"] for r in read_records(out) if "loss" in r}


def test_run_switches_to_qat_and_exports(dataset, tmp_path):
    summary = train.run(micro(dataset), tmp_path / "run", show_progress=False)
    assert (summary["D_fp"], summary["D_qat"]) == (24 * 128, 16 * 128)
    assert summary["B"] == 2 and summary["qat_fraction"] == 0.4
    # The exported model, loaded by mlx_lm, gives the fake-quant model's loss (float32 scales).
    assert summary["exported_val_loss"] == pytest.approx(summary["final_val_loss"], rel=1e-4)
    assert summary["fp_val_loss"] is not None
    for name in ("metrics.jsonl", "config.yaml", "loss.png", "summary.json", "model/config.json", "model/tokenizer.json"):
        assert (tmp_path / "run" / name).exists(), name
    records = read_records(tmp_path / "run")
    phases = [r["phase"] for r in records if "loss" in r]
    assert phases == ["fp"] * 24 + ["qat"] * 16
    assert [r["event"] for r in records if "event" in r] == ["end_fp", "end_qat"]
    model, tok = mlx_lm.load(str(tmp_path / "run" / "model"))
    assert len(mlx_lm.generate(model, tok, "the", max_tokens=5)) > 0


def lrs(out: Path) -> dict:
    return {r["step"]: r["lr"] for r in read_records(out) if "lr" in r}


def read_records(out: Path) -> list:
    return read_jsonl(out / "metrics.jsonl")


@pytest.mark.slow
def test_learning_rate_at_the_switch_fused_vs_separate(dataset, tmp_path):
    """24 FP + 16 QAT steps, warmup 5%, cooldown 20% of each phase; step s trains at the LR of
    its middle token."""
    peak = 3e-3
    train.run(micro(dataset, schedule="separate"), tmp_path / "separate", show_progress=False)
    train.run(micro(dataset, schedule="fused"), tmp_path / "fused", show_progress=False)
    separate, fused = lrs(tmp_path / "separate"), lrs(tmp_path / "fused")
    # separate: the FP phase has cooled down (cooldown from step 19.2 to 24) and QAT re-warms over 0.8 steps
    assert separate[24] == pytest.approx(peak * (1 - (23.5 - 19.2) / 4.8))
    assert separate[25] == pytest.approx(peak * 0.5 / 0.8)
    assert separate[26] == pytest.approx(peak)
    # fused: no FP cooldown, QAT starts at the peak and decays linearly over its 16 steps
    assert fused[20] == fused[24] == pytest.approx(peak)
    assert fused[25] == pytest.approx(peak * (1 - 0.5 / 16))
    assert fused[40] == pytest.approx(peak * (1 - 15.5 / 16))


def test_fp_only_run(dataset, tmp_path):
    fp = train.run(micro(dataset, qat_fraction=0), tmp_path / "fp", show_progress=False)
    assert fp["B"] is None and fp["D_qat"] == 0
    assert fp["exported_val_loss"] == pytest.approx(fp["final_val_loss"], rel=1e-5)


@pytest.mark.slow
def test_forgetting_the_optimizer_state_trains_through_the_switch(dataset, tmp_path):
    summary = train.run(micro(dataset, keep_optimizer_state=False), tmp_path / "run", show_progress=False)
    assert summary["D_qat"] == 16 * 128 and np.isfinite(summary["final_val_loss"])
    assert sorted(losses(tmp_path / "run")) == list(range(1, 41))


@pytest.mark.slow
def test_init_from_a_snapshot_reproduces_the_uninterrupted_run(dataset, tmp_path):
    fp_at, qat_at = 16 * 128, 30 * 128  # the switch is at step 24
    cfg = micro(dataset, snapshot_at=[fp_at, qat_at])
    train.run(cfg, tmp_path / "whole", show_progress=False)
    whole = losses(tmp_path / "whole")
    for tokens, step in ((fp_at, 16), (qat_at, 30)):
        snapshot = tmp_path / "whole" / "snapshots" / str(tokens)
        assert checkpoint.read_meta(snapshot)["phase"] == ("fp" if step < 24 else "qat")
        out = tmp_path / f"branch{tokens}"
        train.run(micro(dataset), out, init_from=snapshot, show_progress=False)
        branch = losses(out)
        assert sorted(branch) == list(range(1, 41))  # the snapshot's metrics, then its own
        np.testing.assert_allclose([branch[s] for s in range(step + 1, 41)], [whole[s] for s in range(step + 1, 41)],
                                   rtol=0, atol=1e-5)


@pytest.mark.slow
def test_a_snapshot_rebuilds_its_own_model(dataset, tmp_path):
    train.run(micro(dataset, snapshot_at=[30 * 128]), tmp_path / "run", show_progress=False)
    model, meta = checkpoint.load_model(tmp_path / "run" / "snapshots" / str(30 * 128))
    assert meta["phase"] == "qat" and meta["tokens"] == 30 * 128
    assert isinstance(model.model.layers[0].mlp.up_proj, QATLinear)
    assert model.model.layers[0].mlp.up_proj.spec.bits == 2


def test_init_from_refuses_what_it_cannot_continue(dataset, tmp_path):
    train.run(micro(dataset, snapshot_at=[30 * 128]), tmp_path / "run", show_progress=False)
    snapshot = tmp_path / "run" / "snapshots" / str(30 * 128)
    with pytest.raises(StartError, match="another model"):
        other = dict(MICRO_MODEL, intermediate_size=256)
        train.run(micro(dataset, model=other), tmp_path / "a", init_from=snapshot, show_progress=False)
    with pytest.raises(StartError, match="quantized differently"):
        train.run(micro(dataset, bits=4), tmp_path / "b", init_from=snapshot, show_progress=False)
    with pytest.raises(StartError, match="before this run's switch"):
        train.run(micro(dataset, qat_fraction=0.1), tmp_path / "c", init_from=snapshot, show_progress=False)
    with pytest.raises(checkpoint.CheckpointError, match="not a checkpoint"):
        train.run(micro(dataset), tmp_path / "d", init_from=tmp_path / "run", show_progress=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run"]  # refused runs leave no --out behind


def test_resume_on_a_finished_run_changes_nothing(dataset, tmp_path):
    first = train.run(micro(dataset), tmp_path / "run", show_progress=False)
    before = {p: p.read_bytes() for p in (tmp_path / "run").rglob("*") if p.is_file()}
    again = train.run(micro(dataset), tmp_path / "run", resume=True, show_progress=False)
    assert again == first
    assert {p: p.read_bytes() for p in (tmp_path / "run").rglob("*") if p.is_file()} == before


def test_resume_refuses_what_it_cannot_resume(dataset, tmp_path):
    with pytest.raises(StartError, match="does not exist"):
        train.run(micro(dataset), tmp_path / "missing", resume=True, show_progress=False)
    (tmp_path / "early").mkdir()
    (tmp_path / "early" / "metrics.jsonl").write_text('{"step": 1, "loss": 5.0}\n')
    with pytest.raises(StartError, match="no checkpoint to resume from"):
        train.run(micro(dataset), tmp_path / "early", resume=True, show_progress=False)
    assert (tmp_path / "early" / "metrics.jsonl").read_text() == '{"step": 1, "loss": 5.0}\n'


def test_resume_without_config_uses_the_runs_own(dataset, tmp_path, monkeypatch):
    cfg = micro(dataset)
    train.run(cfg, tmp_path / "whole", show_progress=False)
    run_until_killed(cfg, tmp_path / "cut", monkeypatch, at_step=10)
    train.main(["--out", str(tmp_path / "cut"), "--resume", "--no-progress"])
    whole, cut = losses(tmp_path / "whole"), losses(tmp_path / "cut")
    np.testing.assert_allclose([cut[s] for s in range(11, 41)], [whole[s] for s in range(11, 41)], rtol=0, atol=1e-5)


def test_the_gradient_checkpointing_step_trains_as_the_compiled_one(monkeypatch):
    """build_step's step under grad_checkpoint (uncompiled, gradients evaluated one at a time)
    follows the compiled step's trajectory, with its clipping and AdamW."""
    cfg = config.resolve({"model": MICRO_MODEL, "grad_clip": 0.5})
    batches = [mx.random.randint(0, 256, (2, 17), key=mx.random.key(0))] * 3  # one batch: its loss falls
    block = type(tiny_llama().layers[0])
    monkeypatch.setattr(block, "__call__", block.__call__)  # grad_checkpoint patches the class: undone after
    runs = {}
    for checkpointed in (False, True):
        model = tiny_llama()
        to_qat(model, quant_specs(model, QuantSpec(2, 32)))
        _, step_fn = build_step(model, replace(cfg, grad_checkpoint=checkpointed))
        losses = [step_fn(b).item() for b in batches]
        runs[checkpointed] = losses, dict(tree_flatten(model.parameters()))
    assert runs[True][0][-1] < runs[True][0][0]
    np.testing.assert_allclose(runs[True][0], runs[False][0], rtol=0, atol=1e-5)
    for k, v in runs[False][1].items():
        np.testing.assert_allclose(np.array(runs[True][1][k]), np.array(v), rtol=0, atol=1e-5, err_msg=k)


@pytest.mark.skipif(mx.default_device() != mx.cpu, reason="the CPU allocator's cache limit")
def test_freed_step_buffers_are_kept_for_reuse():
    previous = mx.set_cache_limit(32 << 20)  # MLX's CPU default
    try:
        x = mx.ones((12 << 20,))  # 48 MB: more than the default cache keeps
        mx.eval(x * 2)  # the product is freed once evaluated
        assert mx.get_cache_memory() < x.nbytes
        keep_freed_buffers()
        mx.eval(x * 2)
        assert mx.get_cache_memory() >= x.nbytes
    finally:
        mx.set_cache_limit(previous)
        mx.clear_cache()


def test_refuses_to_overwrite_a_run(dataset, tmp_path):
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "metrics.jsonl").write_text("")
    with pytest.raises(StartError, match="--resume"):
        train.run(micro(dataset), tmp_path / "run", show_progress=False)


class Killed(Exception):
    pass


def run_until_killed(cfg, out, monkeypatch, at_step=None):
    """Run until just after the checkpoint at `at_step` (the first one if None) is written."""
    save = checkpoint.save

    def save_then_die(path, model, optimizer, meta, *args, **kwargs):
        save(path, model, optimizer, meta, *args, **kwargs)
        if path.name == checkpoint.NAME and (at_step is None or meta["step"] == at_step):
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


@pytest.mark.slow
def test_killed_process_resumes_with_the_same_losses(dataset, tmp_path):
    """SIGKILL a real training process after its first checkpoint, then --resume it."""
    args = ["--data", str(dataset), "--model", json.dumps(MICRO_MODEL), "--total-tokens", str(300 * 128),
            "--batch-size", "4", "--seq-len", "32", "--bits", "2", "--group-size", "32", "--qat-fraction", "0.5",
            "--report-every", "1", "--eval-every", "1000", "--eval-batches", "2", "--checkpoint-every", "20"]
    command = [sys.executable, "-m", "mlx_qat.train", "--no-progress", *args]
    subprocess.run([*command, "--out", str(tmp_path / "whole")], check=True, capture_output=True)

    sigkill_after_first_checkpoint(command, tmp_path / "cut")
    killed_at = max(losses(tmp_path / "cut"))
    assert killed_at < 300, "the run finished before it could be killed"
    subprocess.run([*command, "--out", str(tmp_path / "cut"), "--resume"], check=True, capture_output=True)

    whole, cut = losses(tmp_path / "whole"), losses(tmp_path / "cut")
    assert sorted(cut) == list(range(1, 301))
    np.testing.assert_allclose([cut[s] for s in range(1, 301)], [whole[s] for s in range(1, 301)], rtol=0, atol=1e-5)


def test_resume_refuses_a_changed_config(dataset, tmp_path, monkeypatch):
    run_until_killed(micro(dataset), tmp_path / "run", monkeypatch)
    with pytest.raises(StartError, match="bits: 2 -> 4"):
        train.run(micro(dataset, bits=4), tmp_path / "run", resume=True, show_progress=False)


def test_corrupt_checkpoint_is_reported(dataset, tmp_path, monkeypatch):
    run_until_killed(micro(dataset), tmp_path / "run", monkeypatch)  # the first checkpoint: none before it
    (tmp_path / "run" / "checkpoint" / "model.safetensors").write_bytes(b"garbage")
    with pytest.raises(checkpoint.CheckpointError, match="corrupt") as e:
        train.run(micro(dataset), tmp_path / "run", resume=True, show_progress=False)
    assert "new --out" in str(e.value) and f"delete {tmp_path / 'run'}" in str(e.value)  # the way out


def garbage(path: Path) -> None:
    path.write_bytes(b"garbage")


def flip_a_byte(path: Path) -> None:
    """Change one byte of the tensors' data (the header stays whole, so the file still loads)."""
    raw = bytearray(path.read_bytes())
    raw[len(raw) * 3 // 4] ^= 0xFF
    path.write_bytes(bytes(raw))


@pytest.mark.parametrize("corrupt", [garbage, flip_a_byte])
def test_resume_passes_over_a_corrupt_checkpoint_to_the_one_before(dataset, tmp_path, monkeypatch, capsys, corrupt):
    cfg = micro(dataset)
    train.run(cfg, tmp_path / "whole", show_progress=False)
    run_until_killed(cfg, tmp_path / "cut", monkeypatch, at_step=20)  # checkpoints at steps 10 and 20
    corrupt(tmp_path / "cut" / "checkpoint" / "model.safetensors")
    capsys.readouterr()
    train.run(cfg, tmp_path / "cut", resume=True, show_progress=False)
    err = capsys.readouterr().err
    assert str(tmp_path / "cut" / "checkpoint") in err and "corrupt" in err and "step 10" in err
    # the corrupt one was set aside, out of the rolling pair, so no later save kept it as the fallback;
    # the finished run keeps its final checkpoint only
    assert (tmp_path / "cut" / "checkpoint.corrupt").is_dir() and not (tmp_path / "cut" / "checkpoint.old").exists()
    whole, cut = losses(tmp_path / "whole"), losses(tmp_path / "cut")
    assert sorted(cut) == list(range(1, 41))
    np.testing.assert_allclose([cut[s] for s in range(11, 41)], [whole[s] for s in range(11, 41)], rtol=0, atol=1e-5)


def test_a_checkpoint_that_does_not_read_back_never_replaces_the_last_good_one(dataset, tmp_path, monkeypatch):
    cfg = micro(dataset)
    model = models.build(models.model_args(cfg.model, data.TokenData.load(dataset).vocab_size), cfg.seed)
    optimizer = make_optimizer(cfg)
    optimizer.init(model.trainable_parameters())
    path = tmp_path / "checkpoint"
    checkpoint.save(path, model, optimizer, {"step": 1})
    write = mx.save_safetensors

    def write_half(file, arrays):  # as a full disk might leave it
        write(file, arrays)
        Path(file).write_bytes(Path(file).read_bytes()[: Path(file).stat().st_size // 2])

    monkeypatch.setattr(mx, "save_safetensors", write_half)
    with pytest.raises(checkpoint.CheckpointError, match="corrupt"):
        checkpoint.save(path, model, optimizer, {"step": 2})
    monkeypatch.setattr(mx, "save_safetensors", write)
    assert checkpoint.read_meta(path)["step"] == 1
    checkpoint.load_model(path)  # whole
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint"]  # the failed one is not left beside it


def test_run_to_end_starts_again_when_no_checkpoint_is_readable(dataset, tmp_path, monkeypatch, capsys):
    cfg = micro(dataset)
    run_until_killed(cfg, tmp_path / "run", monkeypatch)
    garbage(tmp_path / "run" / "checkpoint" / "optimizer.safetensors")
    capsys.readouterr()
    summary = train.run_to_end(cfg, tmp_path / "run", show_progress=False)
    assert "corrupt" in capsys.readouterr().err
    assert summary["D_total"] == 40 * 128 and sorted(losses(tmp_path / "run")) == list(range(1, 41))


def test_run_to_end_refuses_a_directory_left_by_another_config(dataset, tmp_path):
    cfg = micro(dataset)
    train.run_to_end(cfg, tmp_path / "run", show_progress=False)
    with pytest.raises(ValueError, match=r"holds a run of another config \(total_tokens: 5120 there, 10240 here\)"):
        train.run_to_end(micro(dataset, total_tokens=2 * cfg.total_tokens), tmp_path / "run", show_progress=False)
    assert train.run_to_end(cfg, tmp_path / "run", show_progress=False)["D_total"] == cfg.total_tokens  # its own


# ---------------------------------------------------------------- --out


@pytest.mark.parametrize("where, problem", [
    (lambda tmp: tmp / "file", "is a file"),
    (lambda tmp: tmp / "file" / "run", "is a file"),
    (lambda tmp: tmp / "locked" / "run", "cannot be written"),
])
def test_an_unusable_out_is_one_line_before_any_work(tmp_path, monkeypatch, capsys, where, problem):
    (tmp_path / "file").write_text("")
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o555)
    access = os.access  # root may write anywhere: make it see what any other user would
    monkeypatch.setattr(os, "access", lambda path, mode, **kw: Path(path) != locked and access(path, mode, **kw))
    out = where(tmp_path)
    # the data is missing too: the --out check comes first, before any data is read
    with pytest.raises(SystemExit) as e:
        train.main(["--out", str(out), "--data", str(tmp_path / "missing.txt"), "--no-progress"])
    err = capsys.readouterr().err
    assert e.value.code == 2 and len(err.splitlines()) == 1 and err.startswith("error: ")
    assert problem in err and "--out" in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file", "locked"] and not any(locked.iterdir())


def test_a_refused_run_leaves_no_out_behind(tmp_path, capsys):
    out = tmp_path / "new" / "run"
    with pytest.raises(SystemExit) as e:
        train.main(["--out", str(out), "--data", str(tmp_path / "missing.txt"), "--no-progress"])
    assert e.value.code == 2 and "missing.txt does not exist" in capsys.readouterr().err
    assert not (tmp_path / "new").exists()  # nor the parent it would have made
    (tmp_path / "empty").mkdir()  # a directory the user made is theirs: it stays
    with pytest.raises(SystemExit):
        train.main(["--out", str(tmp_path / "empty"), "--data", str(tmp_path / "missing.txt"), "--no-progress"])
    assert (tmp_path / "empty").is_dir()


# ---------------------------------------------------------------- what a finished run reports and keeps


@pytest.mark.slow
def test_a_resumed_runs_summary_counts_the_whole_run(dataset, tmp_path, monkeypatch):
    cfg = micro(dataset)
    batch = data.batch

    def slow_batch(*args):
        time.sleep(0.1)
        return batch(*args)

    monkeypatch.setattr(data, "batch", slow_batch)  # the first segment: 30 steps of over 0.1 s
    run_until_killed(cfg, tmp_path / "run", monkeypatch, at_step=30)
    monkeypatch.setattr(data, "batch", batch)
    summary = train.run(cfg, tmp_path / "run", resume=True, show_progress=False)
    # the first segment's 30 sleeps of 0.1 s are in the total, beside the resumed segment's own
    assert summary["segment_seconds"] > 0 and summary["train_seconds"] - summary["segment_seconds"] > 3.0
    assert summary["resumed_at_step"] == 30
    # most of the run's reports are of the slow segment: the median rate is theirs
    assert summary["tokens_per_s"] < cfg.tokens_per_step / 0.1
    assert "resumed at step 30" in report.format_summary(summary)
    whole = train.run(cfg, tmp_path / "whole", show_progress=False)
    assert whole["resumed_at_step"] is None and whole["segment_seconds"] is None


def test_a_finished_runs_checkpoint_is_its_final_model(dataset, tmp_path):
    from mlx_qat import export

    out = tmp_path / "run"
    train.run(micro(dataset, checkpoint_every=15), out, show_progress=False)  # periodic saves at 15 and 30 of 40
    assert checkpoint.read_meta(out / "checkpoint")["step"] == 40
    export.main(["--checkpoint", str(out / "checkpoint"), "--out", str(tmp_path / "again")])
    final, again = (mx.load(str(path / "model.safetensors")) for path in (out / "model", tmp_path / "again"))
    assert final.keys() == again.keys()
    assert all(mx.array_equal(final[k], again[k]).item() for k in final)


def test_divergence_stops_the_run_and_keeps_the_checkpoint(dataset, tmp_path):
    cfg = micro(dataset, learning_rate=1e4, grad_clip=0.0, checkpoint_every=1, report_every=7)
    with pytest.raises(DivergenceError, match=r"the loss became (nan|inf) at step (\d+).*last good checkpoint \(step (\d+)\)") as e:
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
         "--total-tokens", str(200 * 16 * 128), "--eval-every", "100"],
        check=True, capture_output=True, text=True,
    )
    assert "val loss, exported" in result.stdout and str(out / "model") in result.stdout
    # stderr is a pipe here: one plain progress line per report, no progress-bar redraws
    assert "\r" not in result.stderr
    assert sum(line.startswith("step ") for line in result.stderr.splitlines()) == 200 // 10
    summary = json.loads((out / "summary.json").read_text())
    assert summary["exported_val_loss"] < 6.0  # well below ln(2048) = 7.6 of a uniform guess
    model, tok = mlx_lm.load(str(out / "model"))
    assert len(mlx_lm.generate(model, tok, "And God said", max_tokens=10)) > 0


def test_export_command_on_a_snapshot(dataset, tmp_path, capsys):
    """`python -m mlx_qat.export` turns a QAT snapshot into a model that mlx_lm loads and runs,
    with the snapshot's own loss."""
    from mlx_qat import export
    from mlx_qat.evaluate import evaluate

    cfg = micro(dataset, snapshot_at=[30 * 128])
    train.run(cfg, tmp_path / "run", show_progress=False)
    snapshot = tmp_path / "run" / "snapshots" / str(30 * 128)
    export.main(["--checkpoint", str(snapshot), "--out", str(tmp_path / "model")])
    assert f"{30 * 128:,} tokens" in capsys.readouterr().err
    loaded, tok = mlx_lm.load(str(tmp_path / "model"))
    qat, _ = checkpoint.load_model(snapshot)
    batches = list(data.eval_batches(data.TokenData.load(dataset).val, 4, 32, 2))
    assert evaluate(loaded, batches) == pytest.approx(evaluate(qat, batches), rel=1e-5)
    assert len(mlx_lm.generate(loaded, tok, "the", max_tokens=5)) > 0
    with pytest.raises(SystemExit) as e:  # no silent overwrite
        export.main(["--checkpoint", str(snapshot), "--out", str(tmp_path / "model")])
    assert e.value.code == 2 and "--overwrite" in capsys.readouterr().err


# ---------------------------------------------------------------- report_to: mlx-lm's reporting callbacks


def wandb_records(out: Path) -> list:
    """The records of the offline wandb run under `out`, read from its .wandb file: LevelDB-log
    blocks of wandb's protobuf records (wandb itself reads them only in its Go core)."""
    from wandb.proto import wandb_internal_pb2

    (path,) = out.glob("wandb/offline-run-*/run-*.wandb")
    raw, block, header = path.read_bytes(), 32768, 7
    assert raw[:4] == b":W&B"
    records, pending, pos = [], b"", header
    while pos + header <= len(raw):
        left = block - pos % block
        _, length, kind = struct.unpack("<IHB", raw[pos:pos + header])
        if left < header or (length == 0 and kind == 0):  # the rest of a block is padding
            pos += left
            continue
        pending, pos = pending + raw[pos + header:pos + header + length], pos + header + length
        if kind in (1, 4):  # a whole record, or the last piece of one
            records.append(wandb_internal_pb2.Record.FromString(pending))
            pending = b""
    return records


def test_losses_reach_wandb_offline(dataset, tmp_path, monkeypatch):
    pytest.importorskip("wandb", reason="report_to: wandb needs the wandb package (pip install wandb)")
    for name, value in (("WANDB_MODE", "offline"), ("WANDB_SILENT", "true"), ("WANDB_CONSOLE", "off")):
        monkeypatch.setenv(name, value)
    out = tmp_path / "run"
    train.run(micro(dataset, report_to="wandb", project_name="mlx-qat-tests"), out, show_progress=False)
    records = wandb_records(out)
    assert [r.run.project for r in records if r.HasField("run")] == ["mlx-qat-tests"]
    rows = [{item.key or "/".join(item.nested_key): json.loads(item.value_json) for item in r.history.item}
            for r in records if r.HasField("history")]
    metrics = read_records(out)
    logged = {r["iteration"]: r["train_loss"] for r in rows if "train_loss" in r}
    assert logged == pytest.approx({r["step"]: r["loss"] for r in metrics if "loss" in r})
    validated = {r["iteration"]: r["val_loss"] for r in rows if "val_loss" in r}
    # the periodic validations (steps 10, 20, 30) and those that end each phase (24, 40)
    assert validated == pytest.approx({r["step"]: r["val_loss"] for r in metrics if "val_loss" in r})
    assert sorted(validated) == [10, 20, 24, 30, 40]
