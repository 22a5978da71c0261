"""The distillation loss's own cost: loss and gradient on one step's logits, against cross-entropy.

    python benchmarks/bench_distill_loss.py [--vocab 49152] [--out benchmarks/results/distill_loss.json]

Random student and teacher logits of [4, 128, vocab] (SmolLM2's vocabulary by default), each
function compiled with its gradient w.r.t. the student's logits, mean of --repeats calls after
two warm-up calls:

    cross_entropy   mx.fast.cross_entropy, the plain QAT loss
    distill         mlx_qat.distill.make_distill_loss (kl_weight 1), as training uses it
    textbook        the same KL through mx.logsumexp log-softmaxes, whose backward pass
                    recomputes the exponentials
"""

import argparse
import time

import mlx_qat  # noqa: F401  (fast BLAS first)
from common import emit, machine
from mlx_qat.distill import make_distill_loss

import mlx.core as mx  # noqa: E402


def seconds(f, x: mx.array, repeats: int) -> float:
    step = mx.compile(mx.value_and_grad(f))
    for _ in range(2):
        mx.eval(step(x))
    begun = time.perf_counter()
    for _ in range(repeats):
        mx.eval(step(x))
    return (time.perf_counter() - begun) / repeats


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--vocab", type=int, default=49152)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--out", help="write the results as JSON here")
    args = parser.parse_args()
    shape = (4, 128, args.vocab)
    s, t = mx.random.normal(shape, key=mx.random.key(0)), mx.random.normal(shape, key=mx.random.key(1))
    targets = mx.random.randint(0, args.vocab, shape[:2], key=mx.random.key(2))
    mx.eval(s, t, targets)  # a compiled function must not capture their generation as a constant

    kl = make_distill_loss(lambda inputs: t, kl_weight=1.0)  # "models" that return the logits
    batch = mx.zeros((shape[0], shape[1] + 1), dtype=mx.int32)  # unused by such models but for its shape

    def distill(s):
        return kl(lambda inputs: s, batch)

    def textbook(s):
        log_q = s - mx.logsumexp(s, axis=-1, keepdims=True)
        log_p = t - mx.logsumexp(t, axis=-1, keepdims=True)
        return (mx.exp(log_p) * (log_p - log_q)).sum(axis=-1).mean()

    functions = {"cross_entropy": lambda s: mx.fast.cross_entropy(s, targets).mean(), "distill": distill,
                 "textbook": textbook}
    result = {name: round(seconds(f, s, args.repeats), 4) for name, f in functions.items()}
    emit({"command": f"python benchmarks/bench_distill_loss.py --vocab {args.vocab} --repeats {args.repeats}",
          "machine": machine(), "mlx": mx.__version__, "logits": list(shape), "seconds_loss_and_gradient": result,
          "distill_over_cross_entropy": round(result["distill"] / result["cross_entropy"], 2),
          "textbook_over_distill": round(result["textbook"] / result["distill"], 2)}, args.out)


if __name__ == "__main__":
    main()
