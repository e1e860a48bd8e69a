"""An imported model keeps its own Hugging Face tokenizer everywhere: ``prepare-data --tokenizer``
tokenizes with it (bos/eos as it says), the launcher trains on that data and refuses data prepared
with another tokenizer, ``generate`` serves with it and ``export-hf`` carries it.

The tokenizer is a Llama-3-style byte-level BPE trained here (``<|begin_of_text|>`` added to every
text, ``<|end_of_text|>`` as eos); the model a random-weight Llama that transformers builds."""

from __future__ import annotations

import itertools
import json
import shutil
from pathlib import Path

import pytest
import torch

from megatron_cla.data.corpus import EMBEDDED_CORPUS, read_jsonl, write_jsonl
from megatron_cla.data.prepare import prepare
from megatron_cla.data.tokenizer import document_bos, load_tokenizer, tokenizer_fingerprint
from megatron_cla.testing import run_on_ranks
from megatron_cla.testing.distributed import init_process_group_once
from tests.commands import run_command
from tests.helpers import prepared_corpus_sample
from tests.hf_helpers import (
    SMALL_HF_DECODER,
    probe_tokens,
    randomise,
    relative_error,
    train_hf_tokenizer,
)
from tests.pretrain_worker import pretrain_file_on_rank, step_losses

transformers = pytest.importorskip("transformers")

VOCAB = SMALL_HF_DECODER["vocab_size"]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    """120 documents of the embedded corpus as JSONL."""
    path = tmp_path_factory.mktemp("hf_tok_corpus") / "docs.jsonl"
    write_jsonl(itertools.islice(read_jsonl(EMBEDDED_CORPUS), 120), path)
    return path


@pytest.fixture(scope="module")
def hf_tokenizer(corpus, tmp_path_factory) -> Path:
    texts = [doc["text"] for doc in read_jsonl(corpus)]
    return train_hf_tokenizer(texts, tmp_path_factory.mktemp("hf_tokenizer"), vocab_size=400)


@pytest.fixture(scope="module")
def llama_dir(hf_tokenizer, tmp_path_factory) -> Path:
    """A random-weight LlamaForCausalLM saved with the tokenizer's files beside it."""
    directory = tmp_path_factory.mktemp("llama")
    config = transformers.LlamaConfig(
        **SMALL_HF_DECODER,
        num_hidden_layers=2,
        max_position_embeddings=64,
        bos_token_id=0,
        eos_token_id=1,
    )
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    randomise(model, seed=5)
    model.save_pretrained(str(directory))
    for file in hf_tokenizer.iterdir():
        shutil.copyfile(file, directory / file.name)
    return directory


def _documents(prefix: Path) -> list[list[int]]:
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    dataset = IndexedDataset(str(prefix))
    return [dataset[i].tolist() for i in range(len(dataset))]


def test_prepare_tokenizes_with_the_models_tokenizer(corpus, hf_tokenizer, tmp_path):
    init_process_group_once()
    manifest = prepare([corpus], tmp_path / "data", valid_percent=5, tokenizer=hf_tokenizer)
    kept = tmp_path / "data" / "tokenizer"
    assert manifest["tokenizer"] == {
        "path": "tokenizer",
        "fingerprint": tokenizer_fingerprint(hf_tokenizer),
    }
    assert tokenizer_fingerprint(kept) == tokenizer_fingerprint(hf_tokenizer)
    hf = transformers.AutoTokenizer.from_pretrained(str(hf_tokenizer))
    assert document_bos(kept) == hf.bos_token_id == 0 and hf.eos_token_id == 1
    texts = [doc["text"] for doc in read_jsonl(corpus)]
    expected = {tuple(hf(text).input_ids + [hf.eos_token_id]) for text in texts}  # transformers
    documents = _documents(tmp_path / "data" / "train") + _documents(tmp_path / "data" / "valid")
    splits = manifest["splits"]
    assert len(documents) == splits["train"]["documents"] + splits["valid"]["documents"]
    assert {tuple(d) for d in documents} <= expected and len(documents) == len(set(texts))
    megatron = load_tokenizer(kept)
    text = "It is a truth universally acknowledged, é"
    assert megatron.detokenize(megatron.tokenize(text)) == text
    assert megatron.eod == 1 and megatron.vocab_size == len(hf)


def _imported_run(llama_dir: Path, tmp_path: Path) -> Path:
    run = tmp_path / "run"
    proc = run_command("import-hf", "--model", llama_dir, "--out", run)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (run / "tokenizer" / "tokenizer.json").read_bytes() == (
        llama_dir / "tokenizer.json"
    ).read_bytes()
    return run


def test_an_imported_model_trains_generates_and_exports_with_its_tokenizer(
    llama_dir, corpus, tmp_path
):
    run = _imported_run(llama_dir, tmp_path)
    data = tmp_path / "data"
    args = ["--tokenizer", run, "--input", corpus, "--out", data, "--valid-percent", 5]
    proc = run_command("prepare-data", *args)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert tokenizer_fingerprint(data / "tokenizer") == tokenizer_fingerprint(run / "tokenizer")
    overrides = [f"data.dir={data}", "model.seq_length=64", "train.train_iters=2"]
    overrides += ["train.warmup_iters=0", "logging.log_interval=1", "logging.tensorboard=false"]
    overrides += ["logging.progress_bar=false"]
    run_on_ranks(pretrain_file_on_rank, 1, str(run / "config.yaml"), overrides, timeout=600)
    assert sorted(step_losses(run)) == [1, 2]
    out = tmp_path / "generated.json"
    gen = ["--checkpoint", run, "--prompt", "And God said", "--max-new-tokens", 4, "--json", out]
    proc = run_command("generate", *gen)
    assert proc.returncode == 0, proc.stderr[-3000:]
    record = json.loads(out.read_text())[0]
    hf = transformers.AutoTokenizer.from_pretrained(str(llama_dir))
    assert record["prompt_tokens"] == hf("And God said").input_ids  # bos first, as in training
    assert len(record["tokens"]) == 4
    exported = tmp_path / "hf"
    proc = run_command("export-hf", "--checkpoint", run, "--out", exported)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (exported / "tokenizer.json").read_bytes() == (llama_dir / "tokenizer.json").read_bytes()
    config = json.loads((exported / "config.json").read_text())
    assert (config["bos_token_id"], config["eos_token_id"]) == (0, 1)
    assert config["architectures"] == ["LlamaForCausalLM"]


def test_the_exported_import_computes_the_source_models_logits(llama_dir, tmp_path):
    """Import (S = 1) then ``export-hf``: a LlamaForCausalLM again, which transformers loads
    without remote code and which gives the source's logits."""
    run = _imported_run(llama_dir, tmp_path)
    exported = tmp_path / "hf"
    proc = run_command("export-hf", "--checkpoint", run, "--out", exported)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.startswith(f"wrote {exported} from {run}/checkpoints/iter_0000000: ")
    assert "LlamaForCausalLM" in proc.stdout.splitlines()[0]
    assert proc.stdout.splitlines()[1] == (
        f"load it: AutoModelForCausalLM.from_pretrained('{exported}')"
    )
    tokens = probe_tokens(VOCAB)
    with torch.no_grad():
        want = transformers.AutoModelForCausalLM.from_pretrained(str(llama_dir))(tokens).logits
        model = transformers.AutoModelForCausalLM.from_pretrained(str(exported))
        got = model(tokens).logits
    assert relative_error(got, want) < 1e-5


def test_data_prepared_with_another_tokenizer_is_refused(llama_dir, tmp_path):
    run = _imported_run(llama_dir, tmp_path)
    spm_data = prepared_corpus_sample(tmp_path, 60, 400)  # a SentencePiece model of its own
    proc = run_command("pretrain", "--config", run / "config.yaml", f"data.dir={spm_data}")
    assert proc.returncode == 1
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr[-3000:]
    assert lines[0].startswith(f"pretrain: data.dir={spm_data} was prepared with another tokenizer")
    assert "megatron-cla prepare-data --tokenizer" in lines[0]


def test_a_converted_import_carries_its_tokenizer(llama_dir, tmp_path):
    from megatron_cla.conversion.to_cla import CLATarget, convert_run_to_cla

    run = _imported_run(llama_dir, tmp_path)
    init_process_group_once()
    _, cfg = convert_run_to_cla(run, tmp_path / "cla", CLATarget(2))
    assert Path(cfg.data.tokenizer) == (tmp_path / "cla" / "tokenizer").resolve()
    assert tokenizer_fingerprint(Path(cfg.data.tokenizer)) == tokenizer_fingerprint(llama_dir)
