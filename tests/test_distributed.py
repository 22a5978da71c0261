"""Data-parallel training under `mlx.launch` (ring backend, 2 ranks on localhost)."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import mlx.core as mx
import pytest
import yaml

from conftest import MICRO_MODEL, read_jsonl

pytestmark = pytest.mark.slow
LAUNCH = shutil.which("mlx.launch", path=str(Path(sys.executable).parent)) or shutil.which("mlx.launch")
TRAIN = [sys.executable, "-m", "mlx_qat.train", "--no-progress"]


@pytest.fixture
def run_config(dataset, tmp_path):
    # 14 FP + 6 QAT steps. At this learning rate the runs agree through the switch; at 3e-3 QAT's
    # straight-through masks under Adam turn the reduction's float-order differences into O(lr)
    # weight steps within a few QAT steps (measured ~1e-3 in loss), split or not split by ranks.
    values = dict(data=str(dataset), model=MICRO_MODEL, total_tokens=20 * 4 * 32, batch_size=4, seq_len=32, bits=2,
                  group_size=32, qat_fraction=0.3, learning_rate=3e-4, report_every=1, eval_every=10,
                  eval_batches=2, checkpoint_every=10, snapshot_at=[20 * 4 * 32])
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(values))
    return path


def launch(*args, ranks=2, **kwargs):
    assert LAUNCH, "mlx.launch is installed with mlx"
    return subprocess.run([LAUNCH, "-n", str(ranks), "--backend", "ring", *args], capture_output=True, text=True,
                          timeout=600, **kwargs)


def records(out: Path) -> list:
    return read_jsonl(out / "metrics.jsonl")


def assert_same_run(a: Path, b: Path, atol=1e-4):
    ra, rb = records(a), records(b)
    assert [(r["step"], r.get("event")) for r in ra] == [(r["step"], r.get("event")) for r in rb]  # no duplicates
    for x, y in zip(ra, rb):
        for key in ("loss", "val_loss"):
            if key in x:
                assert abs(x[key] - y[key]) < atol, (x, y)
    snapshot = f"snapshots/{20 * 4 * 32}/model.safetensors"
    wa, wb = mx.load(str(a / snapshot)), mx.load(str(b / snapshot))
    # The final weights agree to atol but for the odd element on a rounding edge: LSQ's α starts at
    # max|w| / Qp, which puts each group's largest weight on the clip edge, where α's gradient jumps
    # (measured: 1 of 24,576 embedding weights and its group's α, 3e-4 apart).
    off = sum(int((mx.abs(wa[k] - wb[k]) > atol).sum()) for k in wa)
    assert off <= 4 and max(float(mx.abs(wa[k] - wb[k]).max()) for k in wa) < 1e-2


def test_two_ranks_train_like_one_process_and_only_rank_0_writes(run_config, tmp_path):
    subprocess.run([*TRAIN, "--config", str(run_config), "--out", str(tmp_path / "one")], check=True, capture_output=True)
    result = launch(*TRAIN, "--config", str(run_config), "--out", str(tmp_path / "two"))
    assert result.returncode == 0, result.stderr
    assert_same_run(tmp_path / "one", tmp_path / "two")
    files = lambda out: sorted(str(p.relative_to(out)) for p in out.rglob("*"))  # noqa: E731
    assert files(tmp_path / "two") == files(tmp_path / "one")
    assert result.stdout.count("val loss, exported") == 1  # one summary: rank 0's


def test_a_killed_distributed_run_resumes(run_config, tmp_path):
    subprocess.run([*TRAIN, "--config", str(run_config), "--out", str(tmp_path / "one")], check=True, capture_output=True)
    out = tmp_path / "cut"
    proc = subprocess.Popen([LAUNCH, "-n", "2", "--backend", "ring", *TRAIN, "--config", str(run_config), "--out", str(out)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    meta = out / "checkpoint" / "meta.json"
    deadline = time.time() + 300
    while not meta.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not (out / "summary.json").exists(), "the run finished before it could be killed"
    result = launch(*TRAIN, "--out", str(out), "--resume")
    assert result.returncode == 0, result.stderr
    assert_same_run(tmp_path / "one", out)


def test_a_batch_that_does_not_divide_is_refused(run_config, tmp_path):
    result = launch(*TRAIN, "--config", str(run_config), "--out", str(tmp_path / "r"), "--batch-size", "3", "--total-tokens", "960",
                    "--snapshot-at", "[]")
    # mlx.launch itself exits 0; each rank's exit code is in its report
    assert "batch_size=3 does not divide over 2 ranks" in result.stderr and "exited with code 2" in result.stderr
    assert "Traceback" not in result.stderr


def test_ranks_with_different_configs_are_refused(run_config, tmp_path):
    code = ("import os, sys; from mlx_qat import train; "
            f"train.main(['--no-progress', '--config', {str(run_config)!r}, '--out', {str(tmp_path / 'r')!r}, "
            "'--seed', os.environ.get('MLX_RANK', '0')])")
    result = launch(sys.executable, "-c", code)
    assert "another config than rank 0" in result.stderr and "exited with code 2" in result.stderr
    assert not (tmp_path / "r" / "metrics.jsonl").exists()


@pytest.mark.parametrize("fine_tune_type, grad_checkpoint", [("full", False), ("lora", False), ("lora", True)],
                         ids=["full", "lora", "lora-grad_checkpoint"])
def test_a_run_from_a_pretrained_model_trains_alike_on_two_ranks(dataset, tmp_path, fine_tune_type, grad_checkpoint):
    """--init-from an mlx-lm directory: every rank loads the model, rank 0 tokenizes the text with
    the model's tokenizer, and the comparison with PTQ is made once, on the same batches. Low-rank
    QAT averages only the adapters' and α's gradients over the ranks; with grad_checkpoint, from
    its uncompiled step."""
    from mlx_lm.utils import save_config, save_model

    from mlx_qat.model import from_config

    arch = {"model_type": "llama", "vocab_size": 384, "rms_norm_eps": 1e-5, **MICRO_MODEL}
    model = tmp_path / "model"
    base = from_config(arch, seed=1)
    if fine_tune_type == "lora":
        base.set_dtype(mx.bfloat16)  # the frozen base stays in its 16-bit dtype
    save_model(model, base)
    save_config(arch, model / "config.json")
    for f in dataset.glob("tokenizer*"):
        shutil.copy(f, model)
    args = ["--init-from", model, "--data", dataset.parent / "text.txt", "--data-cache", tmp_path / "cache",
            "--total-tokens", 20 * 4 * 32, "--batch-size", 4, "--seq-len", 32, "--bits", 2, "--group-size", 32,
            "--report-every", 1, "--eval-every", 10, "--eval-batches", 2, "--snapshot-at", f"[{20 * 4 * 32}]",
            "--fine-tune-type", fine_tune_type, "--grad-checkpoint", grad_checkpoint]
    args = [str(a).lower() if isinstance(a, bool) else str(a) for a in args]
    subprocess.run([*TRAIN, *args, "--out", str(tmp_path / "one")], check=True, capture_output=True)
    result = launch(*TRAIN, *args, "--out", str(tmp_path / "two"))
    assert result.returncode == 0, result.stderr
    assert_same_run(tmp_path / "one", tmp_path / "two")
    one, two = (json.loads((tmp_path / r / "summary.json").read_text()) for r in ("one", "two"))
    for key in ("reference_val_loss", "ptq_val_loss", "final_val_loss"):
        assert abs(one[key] - two[key]) < 1e-4, key
    assert result.stdout.count("val loss, PTQ") == 1


def test_a_sweep_under_mlx_launch_shards_by_rank_and_leaves_one_results_file(dataset, tmp_path):
    """Each rank trains its own whole trunks alone (no data parallelism: the batch of 3 would not
    divide over 2 ranks), and rank 0 merges the shards; the records equal a one-process sweep's."""
    base = dict(data=str(dataset), model=MICRO_MODEL, total_tokens=20 * 3 * 32, batch_size=3, seq_len=32, bits=2,
                group_size=32, warmup_tokens=2 * 3 * 32, report_every=5, eval_every=100, eval_batches=2, checkpoint_every=10)
    (tmp_path / "base.yaml").write_text(yaml.safe_dump(base))
    doc = {"base": "base.yaml", "grid": {"seed": [0, 1], "qat_fraction": [0.25, 0.5]}, "fp_baselines": False}
    (tmp_path / "sweep.yaml").write_text(yaml.safe_dump(doc))
    sweep = [sys.executable, "-m", "mlx_qat.sweep", "--config", str(tmp_path / "sweep.yaml")]
    result = launch(*sweep, "--out", str(tmp_path / "two"))
    assert result.returncode == 0, result.stderr
    assert sorted(p.name for p in (tmp_path / "two").glob("results*.jsonl")) == ["results.jsonl"]
    two = {r["name"]: r for r in map(json.loads, (tmp_path / "two" / "results.jsonl").read_text().splitlines())}
    assert len(two) == 4 and len({r["trunk"] for r in two.values()}) == 2
    assert len(list((tmp_path / "two" / "trunks").iterdir())) == 2  # one trunk per seed, one per rank
    subprocess.run([*sweep, "--out", str(tmp_path / "one")], check=True, capture_output=True)
    one = {r["name"]: r for r in map(json.loads, (tmp_path / "one" / "results.jsonl").read_text().splitlines())}
    assert {k: round(r["final_val_loss"], 4) for k, r in two.items()} == {k: round(r["final_val_loss"], 4) for k, r in one.items()}
    again = launch(*sweep, "--out", str(tmp_path / "two"), "--shard", "0/2")
    assert "--shard and mlx.launch both split the sweep" in again.stderr
