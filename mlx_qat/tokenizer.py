"""SentencePiece tokenizers, trained here and saved as Hugging Face files.

`transformers`' own conversions of a sentencepiece file do not encode like sentencepiece in
5.x (no BOS, different handling of leading spaces), so the `tokenizers.Tokenizer`
is built from the model's pieces directly: BPE with byte fallback, a normaliser that prepends
"▁" and maps spaces to "▁", no pre-tokeniser, and a BOS template. Trained with the identity
normaliser and without whitespace squashing, it matches sentencepiece exactly. Training sees
lines without their line breaks, so a line break is the byte piece <0x0A> in both and decodes
back.
"""

import io
from pathlib import Path
from typing import Iterable, List, Tuple

import sentencepiece as spm
from tokenizers import Tokenizer, decoders, normalizers, processors
from tokenizers.models import BPE

SPACE = "\u2581"  # sentencepiece's "▁"
MODEL_FILE = "tokenizer.model"
BOS, EOS, UNK = "<s>", "</s>", "<unk>"


def train(sentences: Iterable[str], vocab_size: int, out_dir: Path, max_sentences: int = 2_000_000) -> Path:
    """Train a byte-fallback BPE sentencepiece model on `sentences`; return its path."""
    out_dir.mkdir(parents=True, exist_ok=True)
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(sentences),
        model_writer=model,
        vocab_size=vocab_size,
        model_type="bpe",
        byte_fallback=True,
        character_coverage=0.9995,
        normalization_rule_name="identity",
        remove_extra_whitespaces=False,
        split_digits=True,
        input_sentence_size=max_sentences,
        shuffle_input_sentence=True,
        max_sentence_length=1 << 16,
        unk_id=0,
        bos_id=1,
        eos_id=2,
        pad_id=-1,
        minloglevel=2,
    )
    path = out_dir / MODEL_FILE
    path.write_bytes(model.getvalue())
    return path


def _vocab_and_merges(sp: spm.SentencePieceProcessor) -> Tuple[dict, List[Tuple[str, str]]]:
    vocab = {sp.id_to_piece(i): i for i in range(sp.get_piece_size())}
    # A BPE piece is the merge of two shorter pieces; its id is its merge rank.
    merges = []
    for piece, rank in vocab.items():
        if sp.is_control(rank) or sp.is_byte(rank) or sp.is_unknown(rank):
            continue
        splits = [
            (vocab[piece[:k]], vocab[piece[k:]], piece[:k], piece[k:])
            for k in range(1, len(piece))
            if piece[:k] in vocab and piece[k:] in vocab
        ]
        merges += [(rank, *split) for split in splits]
    merges.sort()
    return vocab, [(left, right) for _, _, _, left, right in merges]


def to_hf(model_path: Path) -> Tokenizer:
    """A `tokenizers.Tokenizer` that encodes exactly like the sentencepiece model (plus BOS)."""
    sp = spm.SentencePieceProcessor(model_file=str(model_path))
    vocab, merges = _vocab_and_merges(sp)
    tok = Tokenizer(BPE(vocab, merges, unk_token=UNK, fuse_unk=True, byte_fallback=True))
    tok.normalizer = normalizers.Sequence([normalizers.Prepend(SPACE), normalizers.Replace(" ", SPACE)])
    tok.pre_tokenizer = None
    tok.decoder = decoders.Sequence(
        [decoders.Replace(SPACE, " "), decoders.ByteFallback(), decoders.Fuse(), decoders.Strip(" ", 1, 0)]
    )
    tok.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", pair=f"{BOS} $A {BOS} $B", special_tokens=[(BOS, sp.bos_id())]
    )
    return tok


def save_hf(model_path: Path, out_dir: Path) -> None:
    """Write tokenizer.json and friends that `AutoTokenizer` and mlx-lm load."""
    from transformers import PreTrainedTokenizerFast

    fast = PreTrainedTokenizerFast(
        tokenizer_object=to_hf(model_path), bos_token=BOS, eos_token=EOS, unk_token=UNK, clean_up_tokenization_spaces=False
    )
    fast.save_pretrained(str(out_dir))
