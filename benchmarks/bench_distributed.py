"""Data-parallel training: 1 process vs 2 ranks (mlx.launch, ring backend, localhost).

    python benchmarks/bench_distributed.py [--config configs/tiny.yaml] [--steps 20] [--out benchmarks/results/distributed.json]

Each worker trains the config's global batch for --steps compiled QAT steps (after 3 warm-up
steps) and times, separately, the gradient averaging alone (`nn.average_gradients` over one
step's gradients). On a 2-core machine two ranks share the cores, so expect no speed-up: the
figures are the method and the cost of the collective, not a scaling claim.
"""

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import mlx_qat  # noqa: F401  (fast BLAS first)
from common import emit, machine, qat_step
from mlx_qat import config, data, distributed, model as models
from mlx_qat.evaluate import loss_fn
from mlx_qat.step import keep_freed_buffers

import mlx.core as mx  # noqa: E402
import mlx.nn as nn  # noqa: E402


def worker(cfg_path: Path, steps: int, out: Path) -> None:
    group = distributed.world()
    cfg = config.load(cfg_path, {"qat_fraction": 1.0})
    dataset = data.load(cfg)
    keep_freed_buffers()
    model = models.build(models.model_args(cfg.model, dataset.vocab_size), cfg.seed)
    _, train_step = qat_step(model, cfg, group)
    batch = lambda k: mx.array(distributed.rows(data.batch(dataset.train, cfg.batch_size, cfg.seq_len, cfg.seed, k), group))  # noqa: E731
    for k in range(3):
        mx.eval(train_step(batch(k)), model.state)
    start = time.perf_counter()
    for k in range(3, 3 + steps):
        mx.eval(train_step(batch(k)), model.state)
    step_s = (time.perf_counter() - start) / steps

    _, grads = nn.value_and_grad(model, loss_fn)(model, batch(0))
    mx.eval(grads)
    mx.eval(nn.average_gradients(grads, group))
    start = time.perf_counter()
    for _ in range(steps):
        mx.eval(nn.average_gradients(grads, group))
    comm_s = (time.perf_counter() - start) / steps
    if distributed.is_writer(group):
        out.write_text(json.dumps({"ranks": group.size(), "step_s": step_s, "tokens_per_s": cfg.tokens_per_step / step_s,
                                   "average_gradients_s": comm_s if group.size() > 1 else 0.0}))


def run(ranks: int, args) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "result.json"
        command = [sys.executable, __file__, "--worker", "--config", str(args.config), "--steps", str(args.steps), "--out", str(out)]
        if ranks > 1:
            launch = shutil.which("mlx.launch", path=str(Path(sys.executable).parent)) or "mlx.launch"
            command = [launch, "-n", str(ranks), "--backend", "ring", *command]
        subprocess.run(command, check=True, capture_output=True, cwd=Path(__file__).parent)
        return json.loads(out.read_text())


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", type=Path, default=Path("configs/tiny.yaml"))
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--out", help="write the results as JSON here")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    args.config = args.config.resolve()
    if args.worker:
        return worker(args.config, args.steps, Path(args.out))
    load = os.getloadavg()[0]
    one, two = run(1, args), run(2, args)
    emit({
        "command": f"python benchmarks/bench_distributed.py --config {os.path.relpath(args.config, Path(__file__).resolve().parent.parent)} --steps {args.steps}",
        "machine": machine(),
        "mlx": mx.__version__,
        "load_average_1min_before": load,
        "one_process": one,
        "two_ranks": two,
        "throughput_two_over_one": round(two["tokens_per_s"] / one["tokens_per_s"], 3),
        "communication_share_of_step": round(two["average_gradients_s"] / two["step_s"], 3),
    }, args.out)


if __name__ == "__main__":
    main()
