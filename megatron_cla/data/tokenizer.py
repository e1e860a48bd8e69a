"""A run's tokenizer: SentencePiece models trained here, or a model's own Hugging Face tokenizer.

Two kinds, each loaded as Megatron-Core's ``MegatronTokenizer``:

* a SentencePiece ``.model`` file (:func:`train_sentencepiece` trains one losslessly: identity
  normalisation, whitespace kept, byte fallback, so ``detokenize(tokenize(text)) == text``;
  special ids pad 0, unk 1, bos 2, eos 3 -- Megatron uses eos as the end-of-document token, EOD);
* a Hugging Face tokenizer directory (``tokenizer.json`` with its ``tokenizer_config.json`` and
  ``special_tokens_map.json``): an imported model keeps the tokenizer it was trained with (BPE or
  otherwise, through the tokenizers/transformers libraries); EOD is its eos token, and documents
  start with its bos token when the tokenizer adds one to every text (Llama 3).

:func:`tokenizer_fingerprint` identifies a tokenizer by its files' contents: prepared data
records it, and a run refuses data prepared with another tokenizer.
"""

from __future__ import annotations

import hashlib
import shutil
import tempfile
from pathlib import Path
from typing import Any, Iterable, Optional

__all__ = [
    "EOD_ID",
    "HF_TOKENIZER_FILES",
    "PAD_ID",
    "copy_tokenizer",
    "document_bos",
    "is_hf_tokenizer",
    "load_tokenizer",
    "tokenizer_files",
    "tokenizer_fingerprint",
    "train_sentencepiece",
]

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


HF_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")
"""The files of a Hugging Face tokenizer that runs and data directories keep (``tokenizer.json``
is required)."""


def is_hf_tokenizer(path: Path) -> bool:
    """Whether ``path`` is a Hugging Face tokenizer directory (it holds ``tokenizer.json``)."""
    return Path(path).is_dir() and (Path(path) / "tokenizer.json").is_file()


def tokenizer_files(path: Path) -> list[Path]:
    """The files a tokenizer consists of: a SentencePiece ``.model``, or those of
    ``HF_TOKENIZER_FILES`` a Hugging Face tokenizer directory has."""
    path = Path(path)
    if is_hf_tokenizer(path):
        return [path / name for name in HF_TOKENIZER_FILES if (path / name).is_file()]
    if path.is_file() and path.suffix == ".model":
        return [path]
    raise FileNotFoundError(
        f"no tokenizer at {path}: give a SentencePiece .model file or a Hugging Face tokenizer "
        f"directory (one with tokenizer.json)"
    )


def tokenizer_fingerprint(path: Path) -> str:
    """16 hex characters identifying a tokenizer by its files' names and contents."""
    digest = hashlib.sha256()
    for file in tokenizer_files(path):
        digest.update(file.name.encode() + b"\0" + file.read_bytes())
    return digest.hexdigest()[:16]


def copy_tokenizer(source: Path, directory: Path) -> Path:
    """Copy a tokenizer into ``directory``: ``tokenizer.model`` (SentencePiece) or the
    ``tokenizer/`` directory (Hugging Face). Returns the copy."""
    files = tokenizer_files(source)
    if not is_hf_tokenizer(source):
        target = Path(directory) / "tokenizer.model"
        shutil.copyfile(files[0], target)
        return target
    target = Path(directory) / "tokenizer"
    target.mkdir(parents=True, exist_ok=True)
    for file in files:
        shutil.copyfile(file, target / file.name)
    return target


def _metadata_path(path: Path) -> Path:
    """Megatron's tokenizer metadata, beside the model file or the tokenizer directory."""
    return path.with_name(path.stem + "_metadata.json")


def load_tokenizer(path: Path) -> Any:
    """The tokenizer at ``path`` (either kind) as Megatron-Core's ``MegatronTokenizer``; writes
    Megatron's metadata file beside it."""
    from megatron.core.tokenizers import MegatronTokenizer

    path = Path(path)
    library = "huggingface" if is_hf_tokenizer(path) else "sentencepiece"
    if library == "sentencepiece" and not path.is_file():
        raise FileNotFoundError(f"no SentencePiece model at {path}")
    metadata = _metadata_path(path)
    if not metadata.is_file():
        MegatronTokenizer.write_metadata(
            tokenizer_path=str(path),
            tokenizer_library=library,
            model_type="gpt",
            metadata_path=str(metadata),
            overwrite=True,
        )
    # Special tokens are ours to place (document_bos, EOD): megatron-core's default differs by
    # release (0.16: without, 0.19: with), so say it.
    extra = {"include_special_tokens": False} if library == "huggingface" else {}
    return MegatronTokenizer.from_pretrained(str(path), metadata_path=str(metadata), **extra)


def document_bos(path: Path) -> Optional[int]:
    """The id every document starts with: a Hugging Face tokenizer's bos when it adds one to
    every text (as transformers encodes it), else None (SentencePiece models here add none)."""
    if not is_hf_tokenizer(path):
        return None
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(path))
    plain = tokenizer("a", add_special_tokens=False).input_ids
    full = tokenizer("a").input_ids
    bos = tokenizer.bos_token_id
    adds = bos is not None and full[:1] == [bos] and full[1 : 1 + len(plain)] == plain
    return bos if adds else None
