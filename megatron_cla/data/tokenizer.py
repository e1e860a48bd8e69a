"""SentencePiece tokenizers for Megatron: training, and loading as a ``MegatronTokenizer``.

The tokenizer is trained losslessly (identity normalisation, whitespace kept, byte fallback), so
``detokenize(tokenize(text)) == text`` for any text. Special ids: pad 0, unk 1, bos 2, eos 3;
Megatron uses eos as the end-of-document token (EOD) and masks pad out of the loss, so they differ.
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any, Iterable

__all__ = ["train_sentencepiece", "load_tokenizer", "PAD_ID", "EOD_ID"]

PAD_ID, UNK_ID, BOS_ID, EOD_ID = 0, 1, 2, 3
_MAX_LINE_BYTES = 4000  # SentencePiece skips longer training sentences


def _training_lines(texts: Iterable[str]) -> Iterable[str]:
    for text in texts:
        for line in text.splitlines():
            line = line.strip()
            while line:
                yield line[:_MAX_LINE_BYTES]
                line = line[_MAX_LINE_BYTES:]


def train_sentencepiece(texts: Iterable[str], model_path: Path, vocab_size: int = 8000) -> Path:
    """Train a lossless BPE model on ``texts`` and write it to ``model_path`` (``*.model``)."""
    import sentencepiece as spm

    if model_path.suffix != ".model":
        raise ValueError(f"tokenizer path must end in .model, got {model_path}")
    model_path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        lines = Path(tmp) / "lines.txt"
        lines.write_text("\n".join(_training_lines(texts)) + "\n", encoding="utf-8")
        spm.SentencePieceTrainer.train(
            input=str(lines),
            model_prefix=str(Path(tmp) / "spm"),
            vocab_size=vocab_size,
            model_type="bpe",
            character_coverage=1.0,
            byte_fallback=True,
            normalization_rule_name="identity",
            remove_extra_whitespaces=False,
            add_dummy_prefix=False,
            split_digits=True,
            allow_whitespace_only_pieces=True,
            pad_id=PAD_ID,
            unk_id=UNK_ID,
            bos_id=BOS_ID,
            eos_id=EOD_ID,
            input_sentence_size=2_000_000,
            shuffle_input_sentence=True,
            num_threads=2,
            minloglevel=2,
        )
        model_path.write_bytes((Path(tmp) / "spm.model").read_bytes())
    return model_path


def load_tokenizer(model_path: Path) -> Any:
    """The SentencePiece model as Megatron-Core's ``MegatronTokenizer`` (writes its metadata)."""
    from megatron.core.tokenizers import MegatronTokenizer

    if not model_path.is_file():
        raise FileNotFoundError(f"no SentencePiece model at {model_path}")
    metadata = model_path.with_name(model_path.stem + "_metadata.json")
    if not metadata.is_file():
        MegatronTokenizer.write_metadata(
            tokenizer_path=str(model_path),
            tokenizer_library="sentencepiece",
            model_type="gpt",
            metadata_path=str(metadata),
            overwrite=True,
        )
    return MegatronTokenizer.from_pretrained(str(model_path), metadata_path=str(metadata))
