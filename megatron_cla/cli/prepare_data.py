"""``megatron-cla prepare-data --input docs.jsonl [...] --out DIR``: training data from text.

Trains a SentencePiece tokenizer on the training split (or reuses ``--tokenizer``: a run's, a
Hugging Face model directory's, a ``.model`` file) and writes Megatron indexed datasets
(``train``/``valid`` ``.bin``/``.idx``) and ``manifest.json``; without ``--input`` the embedded
corpus is used. See :mod:`megatron_cla.data.prepare`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

from megatron_cla.cli.common import command_parser, quiet_library_startup, user_errors
from megatron_cla.data.corpus import EMBEDDED_CORPUS

__all__ = ["main"]


def main(argv: Optional[list[str]] = None) -> None:
    parser = command_parser(
        "prepare-data",
        epilog="example:\n  megatron-cla prepare-data --input books.jsonl.xz notes.txt "
        "--out data/mine --vocab-size 16000",
    )
    parser.add_argument(
        "--input", type=Path, nargs="+", default=[EMBEDDED_CORPUS], help="JSONL(.xz) or .txt"
    )
    parser.add_argument("--out", type=Path, required=True, help="new data directory")
    parser.add_argument("--vocab-size", type=int, default=8000, help="tokenizer vocabulary")
    parser.add_argument("--valid-percent", type=float, default=2.0, help="validation share")
    parser.add_argument(
        "--tokenizer",
        type=Path,
        default=None,
        help="reuse a tokenizer: a run's, a Hugging Face model's directory or a .model file",
    )
    parser.add_argument("--text-key", default="text", help="JSON field holding the text")
    parser.add_argument("--verbose", action="store_true", help="show library start-up notices")
    args = parser.parse_args(argv)
    quiet_library_startup(args.verbose)
    from megatron_cla.data.prepare import prepare

    with user_errors("prepare-data"):
        tokenizer = _tokenizer_source(args.tokenizer)
        manifest = prepare(
            args.input, args.out, args.vocab_size, args.valid_percent, tokenizer, args.text_key
        )
    for name, split in manifest["splits"].items():
        print(f"{name}: {split['documents']:,} documents, {split['tokens']:,} tokens")
    tokenizer = manifest["tokenizer"]
    print(
        f"wrote {args.out}: {tokenizer['path']} (fingerprint {tokenizer['fingerprint']}), "
        f"train/valid .bin/.idx, manifest.json"
    )


def _tokenizer_source(path: Optional[Path]) -> Optional[Path]:
    """``--tokenizer``: a run directory stands for its tokenizer."""
    if path is None or not (path / "config.yaml").is_file():
        return path
    from megatron_cla.training.config import load_config
    from megatron_cla.training.run_dir import run_tokenizer_path

    return run_tokenizer_path(load_config(path / "config.yaml"))
