import mlx_qat  # noqa: F401  (first, so that MLX binds the optimized BLAS)

import json
import random
import string
from pathlib import Path

import pytest

from mlx_qat import tokenizer


def random_text(n_lines: int, seed: int = 0) -> list:
    rng = random.Random(seed)
    words = ["".join(rng.choices(string.ascii_lowercase, k=rng.randint(1, 8))) for _ in range(400)]
    words += ["café", "naïve", "日本語", "über", "tab\tbed", "end."]
    return [" ".join(rng.choices(words, k=rng.randint(3, 25))) for _ in range(n_lines)]


# the pretrained-model tests' tokenizer (test_pretrained, test_lowrank_run)
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
CHAT_TEMPLATE = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
                 "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
VOCAB = 320


@pytest.fixture(scope="module")
def bpe():
    """A byte-level BPE tokenizer (vocab 320) with chat specials, as a GGUF `gpt2` tokenizer is."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers  # here: slow to import
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=VOCAB, special_tokens=SPECIALS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(random_text(300), trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=SPECIALS[1], eos_token=SPECIALS[2],
                                   chat_template=CHAT_TEMPLATE)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    """A small text file of random words to train on."""
    path = tmp_path_factory.mktemp("corpus") / "text.txt"
    path.write_text("\n\n".join(random_text(120, seed=7)))
    return path


@pytest.fixture(scope="package")
def tokenizer_dir(tmp_path_factory) -> Path:
    """A small sentencepiece tokenizer saved as Hugging Face files (vocab 512)."""
    out = tmp_path_factory.mktemp("tokenizer")
    model = tokenizer.train(random_text(4000), 512, out)
    tokenizer.save_hf(model, out)
    return out


def read_jsonl(path: Path) -> list:
    """The records of a JSON-lines file (a run's metrics.jsonl, a sweep's results.jsonl)."""
    return [json.loads(line) for line in Path(path).read_text().splitlines()]


def tiny_llama(vocab_size: int = 256, tie: bool = True, seed: int = 0):
    """A two-block llama (hidden size 128, 4 query and 2 key/value heads) with seeded weights."""
    import mlx.core as mx
    from mlx_lm.models import llama  # here: mlx_lm is slow to import, and most tests build no model

    args = llama.ModelArgs(model_type="llama", hidden_size=128, num_hidden_layers=2, intermediate_size=256,
                           num_attention_heads=4, num_key_value_heads=2, rms_norm_eps=1e-5,
                           vocab_size=vocab_size, tie_word_embeddings=tie)
    mx.random.seed(seed)
    model = llama.Model(args)
    mx.eval(model.parameters())
    return model


MICRO_MODEL = {"hidden_size": 64, "num_hidden_layers": 2, "intermediate_size": 128, "num_attention_heads": 2, "num_key_value_heads": 2}


@pytest.fixture(scope="package")
def dataset(tmp_path_factory) -> Path:
    """A prepared dataset of random text (vocab 384) for micro training runs."""
    from mlx_qat import data

    root = tmp_path_factory.mktemp("train_data")
    (root / "text.txt").write_text("\n\n".join(random_text(3000, seed=2)))
    data.prepare([str(root / "text.txt")], 384, root / "prepared")
    return root / "prepared"


def sigkill_after_first_checkpoint(command: list, out: Path) -> None:
    """Start a training process writing to `out` and SIGKILL it once its first checkpoint is on disk."""
    import os
    import signal
    import subprocess
    import time

    proc = subprocess.Popen([*command, "--out", str(out)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    meta, deadline = Path(out) / "checkpoint" / "meta.json", time.time() + 120
    while not meta.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
