"""Training speed on a config (default configs/small.yaml), measured in one run:

1. loop overhead: tokens/s of `python -m mlx_qat.train`'s loop vs the bare compiled step;
2. QAT step time / FP step time, and the fake-quant share of it (fused kernel vs MLX ops);
3. MLX vs PyTorch (CPU, eager and torch.compile) on the same llama architecture, batch and
   threads, with where MLX's step time goes (the LM head + cross-entropy vs the rest) and what
   whole-step mx.compile and each fused op (attention, RMSNorm, RoPE) buy.

    python benchmarks/bench_train.py [--config configs/small.yaml] [--steps 20] [--out benchmarks/results/train_cpu.json]

PyTorch is optional (pip install torch); without it that part is skipped.
"""

import argparse
import json
import os
import statistics
import tempfile
import time
from pathlib import Path

import mlx_qat  # noqa: F401  (fast BLAS first)
from common import emit, machine, qat_step
from mlx_qat import config, data, model as models, train
from mlx_qat.evaluate import loss_fn
from mlx_qat.step import keep_freed_buffers, make_optimizer, make_train_step

import mlx.core as mx  # noqa: E402
import mlx.nn as nn  # noqa: E402


def time_steps(steps, batches, warmup: int = 3) -> list:
    """Median seconds per step of each step function, run interleaved batch by batch so that
    machine noise hits all of them alike (each step evaluated before the next), in an order
    rotated every batch so that no step always runs after the same one."""
    times = [[] for _ in steps]
    for i, b in enumerate(batches):
        for j in range(len(steps)):
            k = (i + j) % len(steps)
            start = time.perf_counter()
            mx.eval(steps[k](b))
            if i >= warmup:
                times[k].append(time.perf_counter() - start)
    return [statistics.median(t) for t in times]


def build(cfg, dataset):
    model = models.build(models.model_args(cfg.model, dataset.vocab_size), cfg.seed)
    optimizer = make_optimizer(cfg)
    optimizer.learning_rate = cfg.learning_rate
    return model, optimizer


def mlx_steps(cfg, dataset, n):
    batches = [mx.array(data.batch(dataset.train, cfg.batch_size, cfg.seq_len, cfg.seed, i)) for i in range(n)]
    fp_model, fp_opt = build(cfg, dataset)
    fp_step = make_train_step(fp_model, fp_opt, cfg.grad_clip)

    eager_model, eager_opt = build(cfg, dataset)
    loss_and_grad = nn.value_and_grad(eager_model, loss_fn)

    def eager_step(b):
        loss, grads = loss_and_grad(eager_model, b)
        eager_opt.update(eager_model, grads)
        return loss

    qat_model, _ = build(cfg, dataset)
    _, qat_train_step = qat_step(qat_model, cfg)

    # Where the time goes: the LM head and cross-entropy alone, forward and backward.
    hidden = mx.random.normal((cfg.batch_size, cfg.seq_len, fp_model.args.hidden_size))
    head = fp_model.model.embed_tokens.weight
    head_grad = mx.compile(mx.grad(lambda h, w, t: mx.fast.cross_entropy(h @ w.T, t).mean(), argnums=(0, 1)))

    head_step = lambda b: head_grad(hidden, head, b[:, 1:])  # noqa: E731
    fp, eager, qat, head_time = time_steps([fp_step, eager_step, qat_train_step, head_step], batches)
    return {"n_params": models.num_params(fp_model), "fp_step_s": fp, "fp_step_uncompiled_s": eager,
            "qat_step_s": qat, "qat_over_fp": qat / fp, "head_and_loss_fwd_bwd_s": head_time}


def fused_op_gains(cfg, args_) -> dict:
    """What each of MLX's fused ops buys over the same math in plain MLX ops (forward+backward
    on one layer's shapes, compiled): time of the plain version / time of the fused one."""
    b, t, h = cfg.batch_size, cfg.seq_len, args_.hidden_size
    heads, d = args_.num_attention_heads, args_.hidden_size // args_.num_attention_heads
    q, k, v = (mx.random.normal((b, heads, t, d)) for _ in range(3))
    x, weight = mx.random.normal((b, t, h)), mx.ones((h,))
    scale = d**-0.5
    causal = mx.triu(mx.full((t, t), -mx.inf), k=1)
    inv = 1.0 / (args_.rope_theta ** (mx.arange(0, d, 2) / d))
    freqs = mx.arange(t)[:, None] * inv[None]
    cos, sin = mx.concatenate([mx.cos(freqs)] * 2, -1), mx.concatenate([mx.sin(freqs)] * 2, -1)

    def rotate(y):
        y1, y2 = y[..., : d // 2], y[..., d // 2:]
        return y * cos + mx.concatenate([-y2, y1], -1) * sin

    pairs = {
        "scaled_dot_product_attention": (
            lambda q, k, v: mx.fast.scaled_dot_product_attention(q, k, v, scale=scale, mask="causal"),
            lambda q, k, v: mx.softmax((q * scale) @ k.swapaxes(-1, -2) + causal, axis=-1) @ v, (q, k, v)),
        "rms_norm": (lambda x: mx.fast.rms_norm(x, weight, 1e-5),
                     lambda x: x * mx.rsqrt((x * x).mean(-1, keepdims=True) + 1e-5) * weight, (x,)),
        "rope": (lambda q: mx.fast.rope(q, d, traditional=False, base=args_.rope_theta, scale=1.0, offset=0),
                 rotate, (q,)),
    }
    gains = {}
    for name, (fused, plain, inputs) in pairs.items():
        argnums = tuple(range(len(inputs)))
        f = mx.compile(mx.grad(lambda *a: fused(*a).sum(), argnums=argnums))
        p = mx.compile(mx.grad(lambda *a: plain(*a).sum(), argnums=argnums))
        t_fused, t_plain = time_steps([lambda _: f(*inputs), lambda _: p(*inputs)], list(range(8)))
        gains[name] = {"fused_ms": round(1e3 * t_fused, 2), "plain_ms": round(1e3 * t_plain, 2),
                       "speedup": round(t_plain / t_fused, 3)}
    return gains


def layer_breakdown(cfg, dataset) -> dict:
    """Milliseconds per layer, forward+backward, compiled: where a step's time goes."""
    model = models.build(models.model_args(cfg.model, dataset.vocab_size), cfg.seed)
    layer, args_ = model.model.layers[0], model.args
    h = mx.random.normal((cfg.batch_size, cfg.seq_len, args_.hidden_size))
    heads, d = args_.num_attention_heads, args_.hidden_size // args_.num_attention_heads
    q = mx.random.normal((cfg.batch_size, heads, cfg.seq_len, d))
    act = mx.random.normal((cfg.batch_size, cfg.seq_len, args_.intermediate_size))
    parts = {
        "attention_block": (lambda h: layer.self_attn(h, mask="causal").sum(), h),
        "scaled_dot_product_attention": (
            lambda q: mx.fast.scaled_dot_product_attention(q, q, q, scale=d**-0.5, mask="causal").sum(), q),
        "mlp_block": (lambda h: layer.mlp(h).sum(), h),
        "silu": (lambda a: nn.silu(a).sum(), act),
        "one_projection": (lambda h: (h @ layer.mlp.gate_proj.weight.T).sum(), h),
    }
    fns = [(mx.compile(mx.grad(f)), x) for f, x in parts.values()]
    times = time_steps([lambda _, f=f, x=x: f(x) for f, x in fns], list(range(8)))
    out = {name: round(1e3 * t, 1) for name, t in zip(parts, times)}
    big = mx.random.normal((2**23,))
    (t_exp,) = time_steps([lambda _: mx.exp(big)], list(range(6)))
    out["exp_million_elements_per_s"] = round(big.size / t_exp / 1e6, 1)
    return out


def fake_quant_share(cfg, dataset) -> dict:
    """Milliseconds of fake-quant forward+backward over every quantized weight of the model, one
    step's worth, with the fused kernel of this device and with the MLX-ops reference."""
    from mlx_qat import fake_quant
    from mlx_qat.fakequant import select_backend
    from mlx_qat.layers import quant_specs, to_qat

    model = models.build(models.model_args(cfg.model, dataset.vocab_size), cfg.seed)
    specs = quant_specs(model, cfg.spec, cfg.embedding_spec)
    to_qat(model, specs)
    modules = dict(model.named_modules())
    args_ = [(modules[p].weight, modules[p].alpha, s, mx.random.normal(modules[p].weight.shape)) for p, s in specs.items()]

    def all_weights(backend):
        return lambda _: [mx.vjp(lambda w, a: fake_quant(w, a, s, backend=backend), [w, a], [g]) for w, a, s, g in args_]

    ours = select_backend()
    times = time_steps([all_weights(ours), all_weights("mlx")], list(range(10)))
    return {"weights": sum(w.size for w, *_ in args_), "backend": ours,
            "fused_ms": round(1e3 * times[0], 1), "mlx_ops_ms": round(1e3 * times[1], 1)}


def loop_throughput(cfg, steps: int) -> float:
    """Median tokens/s that the real training loop reports (its first window, with compilation, left out)."""
    with tempfile.TemporaryDirectory() as tmp:
        run_cfg = config.TrainConfig(**{**cfg.to_dict(), "total_tokens": steps * cfg.tokens_per_step, "qat_fraction": 0,
                                        "report_every": 5, "eval_every": 10**9, "checkpoint_every": 10**9, "eval_batches": 1})
        train.run(run_cfg, Path(tmp) / "run", show_progress=False)
        rates = [json.loads(line)["tokens_per_s"] for line in (Path(tmp) / "run" / "metrics.jsonl").read_text().splitlines()
                 if "tokens_per_s" in line]
    return statistics.median(rates[1:])


def torch_steps(cfg, args_, n: int):
    try:
        import torch
        import torch.nn.functional as F
    except ImportError:
        return None
    torch.manual_seed(0)
    torch.set_num_threads(os.cpu_count())
    h, layers, inter = args_.hidden_size, args_.num_hidden_layers, args_.intermediate_size
    heads, kv_heads, vocab = args_.num_attention_heads, args_.num_key_value_heads, args_.vocab_size
    head_dim = h // heads

    class Block(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.q, self.k = torch.nn.Linear(h, h, bias=False), torch.nn.Linear(h, kv_heads * head_dim, bias=False)
            self.v, self.o = torch.nn.Linear(h, kv_heads * head_dim, bias=False), torch.nn.Linear(h, h, bias=False)
            self.gate, self.up = torch.nn.Linear(h, inter, bias=False), torch.nn.Linear(h, inter, bias=False)
            self.down = torch.nn.Linear(inter, h, bias=False)
            self.n1, self.n2 = torch.nn.RMSNorm(h, eps=1e-5), torch.nn.RMSNorm(h, eps=1e-5)

        def forward(self, x, cos, sin):
            b, t, _ = x.shape
            y = self.n1(x)
            q = self.q(y).view(b, t, heads, head_dim).transpose(1, 2)
            k = self.k(y).view(b, t, kv_heads, head_dim).transpose(1, 2)
            v = self.v(y).view(b, t, kv_heads, head_dim).transpose(1, 2)
            q, k = rope(q, cos, sin), rope(k, cos, sin)
            a = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=kv_heads != heads)
            x = x + self.o(a.transpose(1, 2).reshape(b, t, h))
            y = self.n2(x)
            return x + self.down(F.silu(self.gate(y)) * self.up(y))

    def rope(x, cos, sin):
        x1, x2 = x.chunk(2, dim=-1)
        return x * cos + torch.cat([-x2, x1], dim=-1) * sin

    class Llama(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.embed = torch.nn.Embedding(vocab, h)
            self.blocks = torch.nn.ModuleList(Block() for _ in range(layers))
            self.norm = torch.nn.RMSNorm(h, eps=1e-5)

        def forward(self, ids, cos, sin):
            x = self.embed(ids)
            for blk in self.blocks:
                x = blk(x, cos, sin)
            return self.norm(x) @ self.embed.weight.T

    t = cfg.seq_len
    inv = 1.0 / (10000 ** (torch.arange(0, head_dim, 2).float() / head_dim))
    freqs = torch.outer(torch.arange(t).float(), inv)
    cos, sin = torch.cat([freqs.cos()] * 2, -1), torch.cat([freqs.sin()] * 2, -1)
    model = Llama()
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.learning_rate, betas=(cfg.beta1, cfg.beta2), weight_decay=cfg.weight_decay)
    batches = [torch.randint(0, vocab, (cfg.batch_size, t + 1)) for _ in range(n)]

    def step(b):
        opt.zero_grad(set_to_none=True)
        loss = F.cross_entropy(model(b[:, :-1], cos, sin).reshape(-1, vocab), b[:, 1:].reshape(-1))
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        opt.step()
        return loss.item()

    def median_time(fn):
        for b in batches[:3]:
            fn(b)
        times = []
        for b in batches[3:]:
            start = time.perf_counter()
            fn(b)
            times.append(time.perf_counter() - start)
        return statistics.median(times)

    out = {"torch": torch.__version__, "threads": torch.get_num_threads(), "eager_step_s": median_time(step)}
    try:
        compiled = torch.compile(model)
        forward = model.forward
        model.forward = compiled.forward
        out["compiled_step_s"] = median_time(step)
        model.forward = forward
    except Exception as e:  # torch.compile needs a C++ toolchain; report why it is missing
        out["compiled_error"] = f"{type(e).__name__}: {e}"[:200]
    return out


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", type=Path, default=Path("configs/small.yaml"))
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--batch-size", type=int, help="override the config's batch size")
    parser.add_argument("--seq-len", type=int, help="override the config's sequence length")
    parser.add_argument("--out", help="write the results as JSON here")
    args = parser.parse_args()
    overrides = {k: v for k, v in (("batch_size", args.batch_size), ("seq_len", args.seq_len)) if v}
    cfg = config.load(args.config, overrides)
    dataset = data.load(cfg)
    keep_freed_buffers()  # as training does
    mlx_result = mlx_steps(cfg, dataset, args.steps)
    loop = loop_throughput(cfg, args.steps + 10)
    bare = cfg.tokens_per_step / mlx_result["fp_step_s"]
    model_args = models.model_args(cfg.model, dataset.vocab_size)
    torch_result = torch_steps(cfg, model_args, args.steps)
    gains = fused_op_gains(cfg, model_args)
    breakdown = layer_breakdown(cfg, dataset)
    fq_share = fake_quant_share(cfg, dataset)

    result = {
        "command": f"python benchmarks/bench_train.py --config {args.config} --steps {args.steps}"
                   + "".join(f" --{k.replace('_', '-')} {v}" for k, v in overrides.items()),
        "machine": machine(),
        "mlx": mx.__version__,
        "config": str(args.config),
        "batch": [cfg.batch_size, cfg.seq_len],
        **{k: (round(v, 4) if isinstance(v, float) else v) for k, v in mlx_result.items()},
        "bare_tokens_per_s": round(bare),
        "loop_tokens_per_s": round(loop),
        "loop_overhead": round(bare / loop - 1, 4),
        "compile_speedup": round(mlx_result["fp_step_uncompiled_s"] / mlx_result["fp_step_s"], 3),
        "head_and_loss_share_of_fp_step": round(mlx_result["head_and_loss_fwd_bwd_s"] / mlx_result["fp_step_s"], 3),
        "fused_op_gains_per_layer": gains,
        "per_layer_fwd_bwd_ms": breakdown,
        "fake_quant_fwd_bwd_per_step": fq_share,
        "targets": {"loop_overhead": 0.05, "qat_over_fp": 1.03, "mlx_over_torch_eager": 0.6},
    }
    if torch_result:
        result["pytorch"] = {k: (round(v, 4) if isinstance(v, float) else v) for k, v in torch_result.items()}
        result["mlx_speed_vs_torch_eager"] = round(torch_result["eager_step_s"] / mlx_result["fp_step_s"], 3)
        if "compiled_step_s" in torch_result:
            result["mlx_speed_vs_torch_compile"] = round(torch_result["compiled_step_s"] / mlx_result["fp_step_s"], 3)
    emit(result, args.out)


if __name__ == "__main__":
    main()
