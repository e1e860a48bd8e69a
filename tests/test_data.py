"""Corpus, tokenizer and Megatron indexed datasets: round trips, no leakage, no stale caches."""

import hashlib
import itertools
import re
import shutil
from pathlib import Path

import pytest
from megatron.core.datasets.indexed_dataset import IndexedDataset

from megatron_cla.data.corpus import EMBEDDED_CORPUS, read_jsonl, write_jsonl
from megatron_cla.data.datasets import DataFiles, build_gpt_datasets, fingerprint
from megatron_cla.data.prepare import prepare, split_of
from megatron_cla.data.tokenizer import load_tokenizer
from tests.commands import run_command

ODD_TEXTS = [
    "  leading and trailing spaces  ",
    "tabs\tand\n\nblank lines\r\n",
    "unicode: “quotes” — ünïcödé, 日本語, emoji 🙂",
    "digits 1234567890 and punctuation ;:!?",
]


@pytest.fixture(scope="module")
def small_corpus(tmp_path_factory) -> Path:
    """300 real documents of the embedded corpus plus odd strings and two exact duplicates."""
    docs = list(itertools.islice(read_jsonl(EMBEDDED_CORPUS), 300))
    docs += [{"text": t, "src": "odd"} for t in ODD_TEXTS] + docs[:2]
    path = tmp_path_factory.mktemp("corpus") / "small.jsonl"
    write_jsonl(docs, path)
    return path


@pytest.fixture(scope="module")
def prepared(small_corpus, tmp_path_factory):
    out = tmp_path_factory.mktemp("prepared")
    manifest = prepare([small_corpus], out, vocab_size=1000, valid_percent=10)
    return out, manifest


def test_embedded_corpus_matches_its_provenance():
    sources = (EMBEDDED_CORPUS.parent / "SOURCES.md").read_text()
    recorded = re.search(r"sha256 of `natural.jsonl.xz`: `([0-9a-f]{64})`", sources).group(1)
    assert hashlib.sha256(EMBEDDED_CORPUS.read_bytes()).hexdigest() == recorded
    docs = list(read_jsonl(EMBEDDED_CORPUS))
    assert len(docs) == 2468 and all(d["text"].strip() for d in docs)
    assert {d["src"].split("/")[0] for d in docs} == {"austen", "kjv", "shakespeare", "milton"}


def test_tokenizer_round_trip_is_exact(prepared, small_corpus):
    out, _ = prepared
    tok = load_tokenizer(out / "tokenizer.model")
    texts = [d["text"] for d in read_jsonl(small_corpus)] + ODD_TEXTS
    for text in texts:
        assert tok.detokenize(tok.tokenize(text)) == text
    assert tok.eod == 3 and tok.pad == 0 and tok.vocab_size == 1000


def test_indexed_datasets_are_readable_by_megatron_and_lossless(prepared, small_corpus):
    out, manifest = prepared
    tok = load_tokenizer(out / "tokenizer.model")
    decoded = []
    for split in ("train", "valid"):
        dataset = IndexedDataset(str(out / split))
        assert len(dataset) == manifest["splits"][split]["documents"]
        assert (
            sum(len(dataset[i]) for i in range(len(dataset))) == manifest["splits"][split]["tokens"]
        )
        for i in range(len(dataset)):
            ids = dataset[i].tolist()
            assert ids[-1] == tok.eod
            decoded.append(tok.detokenize(ids[:-1]))
    originals = {d["text"] for d in read_jsonl(small_corpus)}
    assert sorted(decoded) == sorted(originals)  # every document exactly once, duplicates dropped
    assert manifest["duplicates_dropped"] == 2


def test_split_has_no_leakage(prepared):
    out, _ = prepared
    tok = load_tokenizer(out / "tokenizer.model")
    split_texts = {}
    for split in ("train", "valid"):
        dataset = IndexedDataset(str(out / split))
        split_texts[split] = {tok.detokenize(dataset[i].tolist()[:-1]) for i in range(len(dataset))}
        assert all(split_of(t, 10) == split for t in split_texts[split])
    assert not split_texts["train"] & split_texts["valid"]
    assert split_texts["valid"], "validation split is empty"


def test_gpt_datasets_and_content_keyed_cache(prepared, tmp_path):
    out, _ = prepared
    data = tmp_path / "data"
    shutil.copytree(out, data)
    files = DataFiles.from_dir(data)
    tok = load_tokenizer(files.tokenizer)
    train, valid = build_gpt_datasets(files, tok, 64, 1, 50, None, data / "cache")
    sample = train[0]
    assert sample["tokens"].shape == (64,) and (sample["labels"][:-1] == sample["tokens"][1:]).all()
    assert len(valid) > 0
    before = fingerprint(files)
    # Regenerate the data in place from different text: same paths, new contents.
    other = tmp_path / "other.jsonl"
    write_jsonl(
        [{"text": t * 20} for t in ODD_TEXTS * 10]
        + [{"text": f"doc {i} " * 50} for i in range(200)],
        other,
    )
    prepare([other], data, vocab_size=400, valid_percent=10)
    assert fingerprint(files) != before
    train2, _ = build_gpt_datasets(
        files, load_tokenizer(files.tokenizer), 64, 1, 50, None, data / "cache"
    )
    assert not (train2[0]["tokens"] == sample["tokens"]).all()
    assert len(list((data / "cache").iterdir())) == 2  # one cache per content, never reused


def test_missing_prepared_data_is_explained(tmp_path):
    with pytest.raises(FileNotFoundError, match="megatron-cla prepare-data"):
        DataFiles.from_dir(tmp_path)


@pytest.mark.skipif(
    shutil.which("apt-get") is None or shutil.which("dpkg") is None,
    reason="rebuilding the corpus downloads Debian packages (needs apt-get, dpkg)",
)
@pytest.mark.version_independent
def test_corpus_command_reproduces_the_embedded_corpus(tmp_path):
    out = tmp_path / "natural.jsonl.xz"
    proc = run_command("build-corpus", "--out", out)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert out.read_bytes() == EMBEDDED_CORPUS.read_bytes()
