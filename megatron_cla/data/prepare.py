"""Build (or reuse) a tokenizer and Megatron indexed datasets (``.bin``/``.idx``) from text.

``megatron-cla prepare-data --input docs.jsonl [more.jsonl.xz book.txt ...] --out DIR``

* Inputs: JSONL (optionally ``.xz``) with a ``text`` field per line, or ``.txt`` files (split into
  paragraph-aligned ~6 KB documents). Without ``--input`` the embedded default corpus is used.
* Split: each document goes to validation when the hash of its text falls into the first
  ``--valid-percent`` of the hash space. Identical documents therefore always land in the same
  split (exact duplicates are also dropped), so validation text never appears in training.
* Tokenizer: a SentencePiece model trained on the training split only (``--vocab-size``), or an
  existing one reused (``--tokenizer``): a SentencePiece ``.model`` or a Hugging Face tokenizer
  directory (an imported model's), copied into ``DIR``.
* Output in ``DIR``: ``tokenizer.model`` or ``tokenizer/``, ``train.bin/.idx``, ``valid.bin/.idx``
  (one Megatron document per document: the tokenizer's bos first if it adds one to every text,
  EOD last) and ``manifest.json`` (counts, sha256 of every file, the tokenizer's fingerprint).
"""

from __future__ import annotations

import hashlib
import json
import shutil
import tempfile
from pathlib import Path
from typing import Iterable, Iterator, Optional

import numpy as np

from megatron_cla.data.corpus import _chunks, read_jsonl
from megatron_cla.data.tokenizer import (
    copy_tokenizer,
    document_bos,
    load_tokenizer,
    tokenizer_files,
    tokenizer_fingerprint,
    train_sentencepiece,
)

__all__ = ["prepare", "read_documents", "split_of", "sha256_file"]


def read_documents(paths: Iterable[Path], text_key: str = "text") -> Iterator[str]:
    """Document texts from JSONL(.xz) files (``text_key`` field) and .txt files."""
    for path in paths:
        if path.suffix == ".txt":
            for doc in _chunks(path.read_text(encoding="utf-8"), str(path)):
                yield doc["text"]
            continue
        for line_no, doc in enumerate(read_jsonl(path), start=1):
            if text_key not in doc:
                raise ValueError(f"{path}:{line_no}: no {text_key!r} field in {sorted(doc)}")
            if doc[text_key].strip():
                yield doc[text_key]


def split_of(text: str, valid_percent: float) -> str:
    """``"valid"`` or ``"train"``, a pure function of the text (no leakage of duplicates)."""
    bucket = int.from_bytes(hashlib.sha256(text.encode("utf-8")).digest()[:8], "big") % 10_000
    return "valid" if bucket < valid_percent * 100 else "train"


def sha256_file(path: Path) -> str:
    """Hex sha256 of a file's contents."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _write_indexed(texts: list[str], tokenizer, prefix: Path, bos: Optional[int]) -> int:
    import torch
    from megatron.core.datasets.indexed_dataset import (
        IndexedDatasetBuilder,
        get_bin_path,
        get_idx_path,
    )

    dtype = np.uint16 if tokenizer.vocab_size < 65_500 else np.int32
    builder = IndexedDatasetBuilder(get_bin_path(str(prefix)), dtype=dtype)
    tokens = 0
    for text in texts:
        ids = ([] if bos is None else [bos]) + tokenizer.tokenize(text) + [tokenizer.eod]
        builder.add_item(torch.tensor(ids, dtype=torch.int64))
        builder.end_document()
        tokens += len(ids)
    builder.finalize(get_idx_path(str(prefix)))
    return tokens


def _tokenizer_into(
    out: Path, train_texts: list[str], vocab_size: int, tokenizer: Optional[Path]
) -> Path:
    """The data directory's tokenizer: trained on ``train_texts``, or a copy of ``tokenizer``
    (either kind); the other kind's files and Megatron's stale metadata are removed."""
    out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:  # the source may be the tokenizer being replaced
        source = None if tokenizer is None else copy_tokenizer(Path(tokenizer), Path(tmp))
        for stale in (out / "tokenizer_metadata.json", out / "tokenizer.model"):
            stale.unlink(missing_ok=True)
        shutil.rmtree(out / "tokenizer", ignore_errors=True)
        if source is None:
            return train_sentencepiece(train_texts, out / "tokenizer.model", vocab_size)
        return copy_tokenizer(source, out)


def prepare(
    inputs: list[Path],
    out: Path,
    vocab_size: int = 8000,
    valid_percent: float = 2.0,
    tokenizer: Optional[Path] = None,
    text_key: str = "text",
) -> dict:
    """Split, tokenize and write the datasets; returns the manifest (also written to out)."""
    if not 0 < valid_percent < 50:
        raise ValueError(f"valid_percent must be in (0, 50), got {valid_percent}")
    splits: dict[str, list[str]] = {"train": [], "valid": []}
    seen: set[bytes] = set()
    duplicates = 0
    for text in read_documents(inputs, text_key):
        key = hashlib.sha256(text.encode("utf-8")).digest()
        if key in seen:
            duplicates += 1
            continue
        seen.add(key)
        splits[split_of(text, valid_percent)].append(text)
    if not splits["train"] or not splits["valid"]:
        raise ValueError(
            f"need documents in both splits, got {len(splits['train'])} train and "
            f"{len(splits['valid'])} valid from {[str(p) for p in inputs]}"
        )
    model = _tokenizer_into(out, splits["train"], vocab_size, tokenizer)
    tok, bos = load_tokenizer(model), document_bos(model)
    manifest: dict = {
        "inputs": {str(p): sha256_file(p) for p in inputs},
        "valid_percent": valid_percent,
        "duplicates_dropped": duplicates,
        "vocab_size": tok.vocab_size,
        "tokenizer": {"path": model.name, "fingerprint": tokenizer_fingerprint(model)},
        "splits": {},
    }
    for name, texts in splits.items():
        tokens = _write_indexed(texts, tok, out / name, bos)
        manifest["splits"][name] = {"documents": len(texts), "tokens": tokens}
    written = [*sorted(out.glob("*.bin")), *sorted(out.glob("*.idx")), *tokenizer_files(model)]
    manifest["files"] = {p.relative_to(out).as_posix(): sha256_file(p) for p in written}
    (out / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
    return manifest
