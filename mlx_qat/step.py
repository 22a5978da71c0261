"""The training step and what it is made of: the loss, the optimizer, the memory options.

A run builds its step from these (mlx_qat.train), and so does anything that times a step on a
freshly built model (mlx_qat.sweep's rate, the benchmarks), so both train the same step.
"""

from functools import partial
from typing import Callable, Optional, Tuple

import mlx.core as mx
import mlx.nn as nn
import mlx.optimizers as optim
from mlx.utils import tree_flatten
from mlx_lm.tuner.trainer import grad_checkpoint

from . import lowrank, pretrained
from .distill import make_distill_loss
from .evaluate import loss_fn
from .layers import QATEmbedding, is_learned_scale


def make_loss(cfg, model: nn.Module) -> Callable:
    """The training loss of `model`, decided here only: next-token cross-entropy, or distillation
    from the starting model. Full QAT loads that model a second time, frozen (arrays of its own:
    the compiled step refuses a captured array that is also one of its inputs, as the student's
    weights are); low-rank QAT reads it from the student's own frozen base (`lowrank.teacher_of`:
    the same W0, no second copy)."""
    if cfg.loss != "distill":
        return loss_fn
    if cfg.fine_tune_type == "lora":
        return make_distill_loss(lowrank.teacher_of(model), cfg.kl_weight)
    teacher = pretrained.load(cfg.pretrained).model  # read now: a compiled step must not capture lazy arrays
    teacher.freeze()
    return make_distill_loss(teacher, cfg.kl_weight)


def make_optimizer(cfg) -> optim.MultiOptimizer:
    """AdamW on the weights; no weight decay on norms and biases; α has an optimizer (and
    state) of its own, which the QAT phase starts fresh."""
    adamw = partial(optim.AdamW, learning_rate=cfg.learning_rate, betas=[cfg.beta1, cfg.beta2])
    is_vector = lambda _, p: p.ndim < 2  # noqa: E731
    return optim.MultiOptimizer(
        [adamw(weight_decay=0.0), adamw(weight_decay=0.0), adamw(weight_decay=cfg.weight_decay)],
        [lambda path, _: is_learned_scale(path), is_vector],
    )


def forget_moments(optimizer: optim.MultiOptimizer) -> None:
    """Drop the Adam moments, keeping each optimizer's step count and learning rate."""
    for sub in optimizer.optimizers:
        sub.state = {k: v for k, v in sub.state.items() if k in ("step", "learning_rate")}


def recompute_blocks(model: nn.Module) -> None:
    """Gradient checkpointing: each transformer block's activations are recomputed in the
    backward pass instead of kept. mlx-lm's grad_checkpoint patches the block's class, so a
    class is patched once (marked on its new __call__, which goes if the patch is undone)."""
    for block in model.layers:
        if not getattr(type(block).__call__, "recomputes", False):
            grad_checkpoint(block)
            type(block).__call__.recomputes = True


def freeze_embedding(model: nn.Module) -> None:
    """Keep the embedding and LM head weights fixed (their α, in QAT form, still learns: the
    grid keeps adapting to the fixed weights). Applied again after the switch to QAT, whose
    layers are new modules."""
    for path, m in model.named_modules():
        if isinstance(m, (nn.Embedding, QATEmbedding)) or path.rsplit(".", 1)[-1] == "lm_head":
            m.freeze(keys=["weight"], recurse=False)


def apply_memory_options(model: nn.Module, cfg) -> None:
    """The config's memory keys on the model as it is now: grad_checkpoint, freeze_embedding."""
    if cfg.grad_checkpoint:
        recompute_blocks(model)
    if cfg.freeze_embedding:
        freeze_embedding(model)


def keep_freed_buffers() -> None:
    """Let MLX's CPU allocator keep a quarter of its memory limit in freed buffers for reuse.

    On the CPU MLX caches only 32 MB (on Metal, up to its memory limit), so a step's larger
    activations went back to the OS and came back as fresh zeroed pages, faulted in every step.
    Shapes repeat step after step, so the cache holds about one step's transient buffers, not a
    growing pile."""
    if mx.default_device() == mx.cpu:
        mx.set_cache_limit(max(mx.get_memory_limit() // 4, 32 << 20))


def draws_random_numbers(cfg) -> bool:
    """Whether the training step draws random numbers: only low-rank QAT's adapter dropout."""
    return cfg.fine_tune_type == "lora" and cfg.lora_parameters["dropout"] > 0


def step_seed(seed: int, step: int) -> int:
    """The random seed of step `step` of a run seeded `seed` (for a step that draws: see
    `draws_random_numbers`), a pure function of the two, as the step's batch is."""
    return ((seed << 32) + step) & (2**64 - 1)


def build_step(model: nn.Module, cfg, optimizer: Optional[optim.Optimizer] = None, group=None,
               loss: Optional[Callable] = None) -> Tuple[optim.Optimizer, Callable]:
    """(optimizer, step) of `model` as it is now: the config's memory options applied to
    it, then its step, with `optimizer` (or a fresh one at the peak rate) and `loss` (or the
    config's). The one recipe for a run's step (mlx_qat.train, at its start and at the switch)
    and for anything that times it on a freshly built model."""
    apply_memory_options(model, cfg)
    optimizer = make_optimizer(cfg) if optimizer is None else optimizer
    loss = make_loss(cfg, model) if loss is None else loss
    return optimizer, make_train_step(model, optimizer, cfg.grad_clip, group, loss, compiled=not cfg.grad_checkpoint)


def make_train_step(model: nn.Module, optimizer: optim.Optimizer, grad_clip: float, group=None,
                    loss: Callable = loss_fn, compiled: bool = True) -> Callable:
    """One step: forward, backward, gradients averaged over the ranks (if several), clip, AdamW
    update; it returns the loss of the global batch. Built again whenever the model's layers (and
    so its state) change. `loss` comes from `make_loss`; a distillation teacher it reads is
    frozen, so the compiled step may capture it as a constant. MLX's random state is an input and
    output of the step, so that a step that draws (dropout) draws afresh in every call rather
    than replaying the numbers of its trace.

    compiled=False is gradient checkpointing's step (build_step's choice): the loss, then the
    gradients one at a time, the last layer's first, are evaluated before the (compiled) update,
    so that the backward pass runs a block at a time. Evaluated together (in one eval, or one
    compiled step), MLX's scheduler runs every block's weight gradients late and keeps each
    block's recomputed transients until then: the memory that recomputing was to save."""
    optimizer.init(model.trainable_parameters())
    loss_and_grad = nn.value_and_grad(model, loss)
    state = [model.state, optimizer.state, mx.random.state]
    ranks = 1 if group is None else group.size()

    def update(loss, grads):
        if ranks > 1:
            grads = nn.average_gradients(grads, group)
            loss = mx.distributed.all_sum(loss, group=group, stream=mx.cpu) / ranks
        if grad_clip > 0:
            grads, _ = optim.clip_grad_norm(grads, grad_clip)
        optimizer.update(model, grads)
        return loss

    if compiled:
        return mx.compile(lambda batch: update(*loss_and_grad(model, batch)), inputs=state, outputs=state)
    compiled_update = mx.compile(update, inputs=state, outputs=state)

    def step(batch):
        loss, grads = loss_and_grad(model, batch)
        mx.eval(loss)  # the forward; the loss would otherwise hold the logits through the backward
        for _, g in reversed(tree_flatten(grads)):
            mx.eval(g)
        return compiled_update(loss, grads)

    return step
