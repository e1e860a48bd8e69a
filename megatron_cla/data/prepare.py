"""Build a SentencePiece tokenizer and Megatron indexed datasets (``.bin``/``.idx``) from text.

``megatron-cla prepare-data --input docs.jsonl [more.jsonl.xz book.txt ...] --out DIR``

* Inputs: JSONL (optionally ``.xz``) with a ``text`` field per line, or ``.txt`` files (split into
  paragraph-aligned ~6 KB documents). Without ``--input`` the embedded default corpus is used.
* Split: each document goes to validation when the hash of its text falls into the first
  ``--valid-percent`` of the hash space. Identical documents therefore always land in the same
  split (exact duplicates are also dropped), so validation text never appears in training.
* Tokenizer: trained on the training split only (``--vocab-size``), or reused (``--tokenizer``).
* Output in ``DIR``: ``tokenizer.model``, ``train.bin/.idx``, ``valid.bin/.idx`` (one document
  per Megatron document, EOD appended) and ``manifest.json`` (counts and sha256 of every file).
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Iterable, Iterator, Optional

import numpy as np

from megatron_cla.data.corpus import _chunks, read_jsonl
from megatron_cla.data.tokenizer import load_tokenizer, train_sentencepiece

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


def _write_indexed(texts: list[str], tokenizer, prefix: Path) -> int:
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
        ids = tokenizer.tokenize(text) + [tokenizer.eod]
        builder.add_item(torch.tensor(ids, dtype=torch.int64))
        builder.end_document()
        tokens += len(ids)
    builder.finalize(get_idx_path(str(prefix)))
    return tokens


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
    out.mkdir(parents=True, exist_ok=True)
    model = out / "tokenizer.model"
    if tokenizer is None:
        train_sentencepiece(splits["train"], model, vocab_size)
    else:
        model.write_bytes(Path(tokenizer).read_bytes())
    for stale in out.glob("tokenizer_metadata.json"):
        stale.unlink()
    tok = load_tokenizer(model)
    manifest: dict = {
        "inputs": {str(p): sha256_file(p) for p in inputs},
        "valid_percent": valid_percent,
        "duplicates_dropped": duplicates,
        "vocab_size": tok.vocab_size,
        "splits": {},
    }
    for name, texts in splits.items():
        tokens = _write_indexed(texts, tok, out / name)
        manifest["splits"][name] = {"documents": len(texts), "tokens": tokens}
    manifest["files"] = {
        p.name: sha256_file(p)
        for p in sorted(out.glob("*"))
        if p.suffix in (".bin", ".idx", ".model")
    }
    (out / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
    return manifest
