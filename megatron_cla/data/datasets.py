"""Megatron ``GPTDataset``s for training and validation, with an index cache keyed on contents.

Megatron caches its document/sample/shuffle indices under a hash of the dataset *path*, split,
sizes, seed and tokenizer class, not of the file contents: regenerating ``train.bin`` at the same
path would silently reuse indices of the old file. Here the cache directory is named after a
fingerprint of the ``.bin``/``.idx`` files and the tokenizer model, so new contents always get a
fresh cache.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional

from megatron_cla.data.tokenizer import is_hf_tokenizer, tokenizer_files

__all__ = ["DataFiles", "fingerprint", "build_gpt_datasets"]

_FULL_HASH_LIMIT = 2 << 30  # hash whole files up to 2 GiB; sample bigger ones


@dataclass(frozen=True)
class DataFiles:
    """Where the prepared data lives (the output directory of ``megatron-cla prepare-data``)."""

    train_prefix: Path
    """``train.bin``/``train.idx`` without the extension."""
    valid_prefix: Path
    """``valid.bin``/``valid.idx`` without the extension."""
    tokenizer: Path
    """The SentencePiece model file or the Hugging Face tokenizer directory."""

    @classmethod
    def from_dir(cls, directory: Path) -> DataFiles:
        """``DIR/train``, ``DIR/valid`` and the tokenizer, ``DIR/tokenizer.model`` (SentencePiece)
        or ``DIR/tokenizer/`` (Hugging Face); raises if any is missing."""
        tokenizer = directory / "tokenizer.model"
        if not tokenizer.is_file() and is_hf_tokenizer(directory / "tokenizer"):
            tokenizer = directory / "tokenizer"
        files = cls(directory / "train", directory / "valid", tokenizer)
        missing = [str(p) for p in files.dataset_paths() + [tokenizer] if not p.exists()]
        if missing:
            raise FileNotFoundError(
                f"prepared data incomplete, missing {missing}. Build it with "
                f"`megatron-cla prepare-data --out {directory}`."
            )
        return files

    def dataset_paths(self) -> list[Path]:
        """The ``.bin``/``.idx`` files of both splits."""
        prefixes = (self.train_prefix, self.valid_prefix)
        return [Path(f"{p}{ext}") for p in prefixes for ext in (".bin", ".idx")]

    def paths(self) -> list[Path]:
        """Every file the datasets depend on (the tokenizer's included)."""
        return self.dataset_paths() + tokenizer_files(self.tokenizer)


def _file_digest(path: Path) -> bytes:
    digest = hashlib.sha256(str(path.stat().st_size).encode())
    with open(path, "rb") as handle:
        if path.stat().st_size <= _FULL_HASH_LIMIT:
            for block in iter(lambda: handle.read(1 << 20), b""):
                digest.update(block)
        else:  # 256 evenly spaced 64 KiB samples
            step = path.stat().st_size // 256
            for i in range(256):
                handle.seek(i * step)
                digest.update(handle.read(1 << 16))
    return digest.digest()


def fingerprint(files: DataFiles) -> str:
    """16 hex characters that change whenever any data file or the tokenizer changes."""
    digest = hashlib.sha256()
    for path in files.paths():
        digest.update(_file_digest(path))
    return digest.hexdigest()[:16]


def build_gpt_datasets(
    files: DataFiles,
    tokenizer: Any,
    seq_length: int,
    seed: int,
    train_samples: int,
    valid_samples: Optional[int],
    cache_root: Path,
    is_built_on_rank: Callable[[], bool] = lambda: True,
) -> tuple[Any, Any]:
    """(train, valid) ``GPTDataset``s built by Megatron's ``BlendedMegatronDatasetBuilder``.

    ``valid_samples=None`` means one pass over the validation split.
    """
    from megatron.core.datasets.blended_megatron_dataset_builder import (
        BlendedMegatronDatasetBuilder,
    )
    from megatron.core.datasets.gpt_dataset import GPTDataset, GPTDatasetConfig

    config = GPTDatasetConfig(
        random_seed=seed,
        sequence_length=seq_length,
        blend_per_split=[
            ([str(files.train_prefix)], None),
            ([str(files.valid_prefix)], None),
            None,
        ],
        tokenizer=tokenizer,
        path_to_cache=str(cache_root / fingerprint(files)),
        reset_position_ids=False,
        reset_attention_mask=False,
        eod_mask_loss=False,
        create_attention_mask=False,
        mmap_bin_files=True,
    )
    train, valid, _ = BlendedMegatronDatasetBuilder(
        GPTDataset, [train_samples, valid_samples, None], is_built_on_rank, config
    ).build()
    return train, valid
