import mlx_qat  # noqa: F401  (first, so that MLX binds the optimized BLAS)

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


@pytest.fixture(scope="package")
def tokenizer_dir(tmp_path_factory) -> Path:
    """A small sentencepiece tokenizer saved as Hugging Face files (vocab 512)."""
    out = tmp_path_factory.mktemp("tokenizer")
    model = tokenizer.train(random_text(4000), 512, out)
    tokenizer.save_hf(model, out)
    return out
