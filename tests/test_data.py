"""Data preparation: inputs, errors, reuse, and tokenizer files that encode like sentencepiece."""

import hashlib
import json
import shutil

import numpy as np
import pytest
import sentencepiece as spm

from conftest import random_text
from mlx_qat import config, constants, data, inputs


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    root = tmp_path_factory.mktemp("corpus")
    lines = random_text(3000, seed=1)
    (root / "a.txt").write_text("\n\n".join(lines[:1500]))
    (root / "sub").mkdir()
    (root / "sub" / "b.txt").write_text("\n\n".join(lines[1500:2500]))
    (root / "c.jsonl").write_text("\n".join(json.dumps({"text": t, "id": i}) for i, t in enumerate(lines[2500:])))
    return root


@pytest.fixture(scope="module")
def prepared(corpus, tmp_path_factory):
    out = tmp_path_factory.mktemp("prepared")
    data.prepare([str(corpus)], 400, out)
    return out


def test_prepare_writes_tokens_tokenizer_and_manifest(prepared, corpus):
    manifest = json.loads((prepared / "manifest.json").read_text())
    assert manifest["vocab_size"] == 400 and manifest["dtype"] == "uint16"
    assert {s["source"] for s in manifest["request"]["inputs"]} == {str(corpus / "a.txt"), str(corpus / "sub" / "b.txt"), str(corpus / "c.jsonl")}
    assert all(len(s["sha256"]) == 64 for s in manifest["request"]["inputs"])
    assert manifest["documents"]["val"] == round(3000 * 0.05)
    ds = data.TokenData.load(prepared)
    assert ds.train.size == manifest["tokens"]["train"] and ds.val.size == manifest["tokens"]["val"]
    assert ds.train.max() < 400
    sp = spm.SentencePieceProcessor(model_file=str(prepared / "tokenizer.model"))
    assert (ds.train == sp.bos_id()).sum() == manifest["documents"]["train"]  # one BOS per document


def count_builds(monkeypatch) -> list:
    """The directories data.build_dataset, the preparation itself, is called to fill from now on."""
    build, outs = data.build_dataset, []

    def counted(tok, inputs, out, *rest):
        outs.append(out)
        return build(tok, inputs, out, *rest)

    monkeypatch.setattr(data, "build_dataset", counted)
    return outs


def test_prepare_reuses_and_redoes(prepared, corpus, tmp_path, monkeypatch):
    out = tmp_path / "copy"
    shutil.copytree(prepared, out)  # the module's fixture stays as it was made
    manifest = json.loads((out / "manifest.json").read_text())
    builds = count_builds(monkeypatch)
    assert data.prepare([str(corpus)], 400, out) == manifest and builds == []  # the same request: reused
    assert data.prepare([str(corpus)], 420, out)["vocab_size"] == 420 and builds == [out]  # another: prepared again
    assert json.loads((out / "manifest.json").read_text())["vocab_size"] == 420


def test_load_prepares_into_the_cache_once(tmp_path, monkeypatch):
    text = tmp_path / "t.txt"
    text.write_text("\n\n".join(random_text(300, seed=8)))
    cfg = config.TrainConfig(data=str(text), vocab_size=300, data_cache=str(tmp_path / "cache"))
    builds = count_builds(monkeypatch)
    first, again = data.load(cfg), data.load(cfg)
    # named as earlier versions named it, so that their caches stay valid
    name = hashlib.sha256(json.dumps([inputs.fingerprint([str(text)]), 300]).encode()).hexdigest()[:16]
    assert builds == [tmp_path / "cache" / name] and first.path == again.path == builds[0]
    np.testing.assert_array_equal(first.train, again.train)
    assert data.load(config.TrainConfig(data=str(first.path))).path == first.path  # a prepared directory: as it is
    assert len(builds) == 1


def test_the_cli_trains_the_configs_default_vocabulary(corpus, tmp_path, monkeypatch, capsys):
    asked = []

    def prepare(inputs, vocab_size, out, val_fraction, seed):
        asked.append(vocab_size)
        return {"tokens": {"train": 1000, "val": 50}, "vocab_size": vocab_size}

    monkeypatch.setattr(data, "prepare", prepare)
    data.main(["prepare", "--input", str(corpus / "a.txt"), "--out", str(tmp_path / "o")])
    assert asked == [config.default("vocab_size")] == [constants.DEFAULT_VOCAB_SIZE]
    assert capsys.readouterr().out == f"{tmp_path / 'o'}: 1,000 train and 50 validation tokens, vocabulary {asked[0]}\n"


def test_inputs_by_glob_and_json(corpus, tmp_path):
    (tmp_path / "d.json").write_text(json.dumps([{"text": t} for t in random_text(300, seed=3)]))
    docs = inputs.read_documents([str(corpus / "*.txt"), str(tmp_path / "d.json")])
    assert len(docs) == 1500 + 300


@pytest.mark.parametrize("make, message", [
    (lambda p: None, "does not exist"),
    (lambda p: p.write_text(""), "hold no text"),
    (lambda p: p.write_bytes(b"\xff\xfe\x00binary\x80"), "not UTF-8 text"),
])
def test_bad_text_inputs(tmp_path, make, message):
    path = tmp_path / "x.txt"
    make(path)
    with pytest.raises(data.DataError, match=message):
        inputs.read_documents([str(path)])


def test_a_bad_jsonl_line_is_named_with_its_file_line_and_problem(tmp_path):
    bad = '{"text": "two",}'
    path = tmp_path / "c.jsonl"
    path.write_text(f'{{"text": "one"}}\n\n{bad}\n{{"text": "four"}}\n')  # the blank line counts as a line
    try:
        json.loads(bad)
    except json.JSONDecodeError as e:
        problem = e.msg
    with pytest.raises(data.DataError) as e:
        inputs.read_documents([str(path)])
    message = str(e.value)
    assert f"{path}, line 3" in message and problem in message
    assert "line 1 " not in message  # not the position within the line, taken for the file's


def test_a_jsonl_record_may_hold_a_line_separator(tmp_path):
    """JSON lets U+2028 stand unescaped in a string; it does not end a .jsonl line."""
    path = tmp_path / "d.jsonl"
    path.write_text(json.dumps({"text": "one\u2028two"}, ensure_ascii=False) + "\n", encoding="utf-8")
    assert inputs.read_documents([str(path)]) == ["one\u2028two"]


def test_bad_json_inputs(tmp_path):
    (tmp_path / "a.jsonl").write_text('{"body": "no text field"}\n')
    with pytest.raises(data.DataError, match="string field `text`"):
        inputs.read_documents([str(tmp_path / "a.jsonl")])
    (tmp_path / "b.jsonl").write_text("{not json\n")
    with pytest.raises(data.DataError, match="not valid JSON"):
        inputs.read_documents([str(tmp_path / "b.jsonl")])
    (tmp_path / "empty").mkdir()
    with pytest.raises(data.DataError, match="has no .txt"):
        inputs.read_documents([str(tmp_path / "empty")])
    with pytest.raises(data.DataError, match="no file matches"):
        inputs.read_documents([str(tmp_path / "*.nothing")])
    with pytest.raises(data.DataError, match="no input given"):
        inputs.read_documents([])


def test_prepare_rejects_bad_settings(corpus, tmp_path):
    with pytest.raises(data.DataError, match="too small"):
        data.prepare([str(corpus)], 100, tmp_path / "x")
    with pytest.raises(data.DataError, match="val_fraction"):
        data.prepare([str(corpus)], 400, tmp_path / "x", val_fraction=0.9)


def test_truncated_token_file_is_detected(prepared, tmp_path):
    copy = tmp_path / "copy"
    shutil.copytree(prepared, copy)
    with open(copy / "val.bin", "r+b") as f:
        f.truncate(10)
    with pytest.raises(data.DataError, match="missing or truncated"):
        data.TokenData.load(copy)
    with pytest.raises(data.DataError, match="not a prepared dataset"):
        data.TokenData.load(tmp_path)


@pytest.mark.slow
def test_hf_dataset_saved_to_disk(tmp_path):
    datasets = pytest.importorskip("datasets")
    texts = random_text(200, seed=5)
    datasets.Dataset.from_dict({"text": texts, "n": list(range(200))}).save_to_disk(str(tmp_path / "ds"))
    assert inputs.read_documents([f"hf:{tmp_path / 'ds'}"]) == texts
    datasets.Dataset.from_dict({"body": texts}).save_to_disk(str(tmp_path / "nocol"))
    with pytest.raises(data.DataError, match="no `text` column"):
        inputs.read_documents([f"hf:{tmp_path / 'nocol'}"])


def test_builtin_corpus_is_several_megabytes_of_english():
    docs = inputs.builtin_corpus()
    assert sum(map(len, docs)) > 3_000_000
    assert docs[0].startswith("In the beginning God created the heaven")


def test_builtin_corpus_has_one_verse_per_line():
    docs = inputs.builtin_corpus()
    genesis_1 = docs[0].split("\n")
    assert 25 <= len(genesis_1) <= 31  # Genesis 1 has 31 verses (the database lacks a few)
    assert genesis_1[0].startswith("In the beginning God created the heaven") and genesis_1[0].endswith("the earth.")
    assert genesis_1[1].startswith("And the earth was without form")
    assert all("\n" in doc for doc in docs if len(doc) > 200)  # chapters, not single lines
    lines = [line for doc in docs for line in doc.split("\n")]
    assert len(lines) > 20_000 and all(line and line == line.strip() and not line[0].isdigit() for line in lines)


VERSES = "In the beginning\nAnd the earth"


def test_line_breaks_survive_both_tokenizers(prepared):
    from tokenizers import Tokenizer
    from transformers import AutoTokenizer

    sp = spm.SentencePieceProcessor(model_file=str(prepared / "tokenizer.model"))
    ids = sp.encode(VERSES)
    assert sp.decode(ids) == VERSES and sp.piece_to_id("<0x0A>") in ids
    hf = AutoTokenizer.from_pretrained(str(prepared))
    assert hf.encode(VERSES) == [sp.bos_id()] + ids
    assert hf.decode(hf.encode(VERSES), skip_special_tokens=True) == VERSES
    tok = Tokenizer.from_file(str(prepared / "tokenizer.json"))
    assert tok.encode(VERSES).ids == [sp.bos_id()] + ids
    assert tok.decode(tok.encode(VERSES).ids) == VERSES


def test_mlx_lm_streams_line_breaks(prepared):
    from mlx_lm.tokenizer_utils import load

    sp = spm.SentencePieceProcessor(model_file=str(prepared / "tokenizer.model"))
    detokenizer = load(prepared).detokenizer
    detokenizer.reset()
    for token in sp.encode(VERSES):
        detokenizer.add_token(token)
    detokenizer.finalize()
    assert detokenizer.text == VERSES


def test_prepared_documents_keep_their_lines(tmp_path):
    lines = random_text(1800, seed=4)
    docs = ["\n".join(lines[i : i + 3]) for i in range(0, len(lines), 3)]  # three lines per document
    (tmp_path / "verses.txt").write_text("\n\n".join(docs))
    data.prepare([str(tmp_path / "verses.txt")], 400, tmp_path / "out")
    sp = spm.SentencePieceProcessor(model_file=str(tmp_path / "out" / "tokenizer.model"))
    ds = data.TokenData.load(tmp_path / "out")
    split = np.flatnonzero(ds.val == sp.bos_id())
    decoded = [sp.decode(ds.val[a + 1 : b].tolist()) for a, b in zip(split, [*split[1:], ds.val.size])]
    assert decoded and all(doc in docs and doc.count("\n") == 2 for doc in decoded)


def test_builtin_fingerprint_names_its_format(tmp_path, monkeypatch):
    assert inputs.fingerprint(["builtin"]) == [{"source": "builtin", "format": inputs.BUILTIN_FORMAT}]
    assert inputs.BUILTIN_FORMAT >= 2  # 1 was the space-joined corpus, cached as {"source": "builtin"}
    # A directory prepared from the space-joined corpus is prepared again, not reused.
    monkeypatch.setattr(inputs, "builtin_corpus", lambda: ["\n".join(random_text(3, seed=i)) for i in range(400)])
    out = tmp_path / "cached"
    out.mkdir()
    old = {"request": {"inputs": [{"source": "builtin"}], "vocab_size": 400, "val_fraction": 0.05, "seed": 0}}
    (out / data.MANIFEST).write_text(json.dumps(old))
    manifest = data.prepare(["builtin"], 400, out)
    assert manifest["request"]["inputs"] == inputs.fingerprint(["builtin"]) and (out / "train.bin").exists()


def test_batches_are_a_pure_function_of_seed_and_index(prepared):
    ds = data.TokenData.load(prepared)
    a, b = data.batch(ds.train, 4, 32, seed=0, index=7), data.batch(ds.train, 4, 32, seed=0, index=7)
    np.testing.assert_array_equal(a, b)
    assert a.shape == (4, 33)
    assert not np.array_equal(a, data.batch(ds.train, 4, 32, seed=0, index=8))
    windows = list(data.eval_batches(ds.val, 4, 32, max_batches=3))
    assert len(windows) == 3 and all(w.shape == (4, 33) for w in windows)
    np.testing.assert_array_equal(windows[0][1], ds.val[32:65])


TRICKY = ["", " ", "  two leading", "multiple   inner    spaces", "tab\tand\t\ttabs", "trailing  ",
          "new\nlines\n\n", "ünïcödé, 日本語, emoji 🙂 and Ωmega", "MiXeD CaSe 12345 digits", "\u00a0nbsp", "a"]


@pytest.mark.parametrize("text", TRICKY)
def test_hf_tokenizer_matches_sentencepiece(prepared, text):
    from transformers import AutoTokenizer

    sp = spm.SentencePieceProcessor(model_file=str(prepared / "tokenizer.model"))
    hf = AutoTokenizer.from_pretrained(str(prepared))
    assert hf.encode(text) == [sp.bos_id()] + sp.encode(text)
    assert hf.decode(hf.encode(text), skip_special_tokens=True) == sp.decode(sp.encode(text))


def test_cli_reports_errors(tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        data.main(["prepare", "--input", str(tmp_path / "missing.txt"), "--out", str(tmp_path / "o")])
    assert e.value.code == 2
    assert "does not exist" in capsys.readouterr().err


def test_an_mlx_lm_data_directory_keeps_its_own_split(tmp_path):
    """train.jsonl trains, valid.jsonl validates, test.jsonl is left alone (mlx-lm's layout)."""
    lines = random_text(400, seed=5)
    for name, part in (("train", lines[:300]), ("valid", lines[300:350]), ("test", lines[350:])):
        (tmp_path / "d" / f"{name}.jsonl").parent.mkdir(exist_ok=True)
        (tmp_path / "d" / f"{name}.jsonl").write_text("\n".join(json.dumps({"text": t}) for t in part))
    manifest = data.prepare([str(tmp_path / "d")], 300, tmp_path / "out")
    assert manifest["documents"] == {"train": 300, "val": 50}
    sp = spm.SentencePieceProcessor(model_file=str(tmp_path / "out" / "tokenizer.model"))
    val = data.TokenData.load(tmp_path / "out").val
    assert val.tolist() == [t for line in lines[300:350] for t in [sp.bos_id()] + sp.encode(line)]
    (tmp_path / "d" / "valid.jsonl").unlink()  # no valid.jsonl: validation is drawn from train.jsonl
    assert data.prepare([str(tmp_path / "d")], 300, tmp_path / "out2")["documents"] == {"train": 285, "val": 15}


def test_an_mlx_lm_data_directory_comes_alone_and_validates_on_something(tmp_path, corpus):
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "train.jsonl").write_text("\n".join(json.dumps({"text": t}) for t in random_text(50, seed=6)))
    with pytest.raises(data.DataError, match="pass it alone"):
        data.prepare([str(tmp_path / "d"), str(corpus / "a.txt")], 300, tmp_path / "out")
    (tmp_path / "d" / "valid.jsonl").write_text("\n")
    with pytest.raises(data.DataError, match="valid.jsonl is empty; add records to it, or delete it"):
        data.prepare([str(tmp_path / "d")], 300, tmp_path / "out")
    assert inputs.split_request([str(tmp_path / "d")]) == {"split": "mlx-lm"}  # not a cache of the old, mixed split
    assert inputs.split_request([str(corpus)]) == {}  # datasets prepared before keep their keys
