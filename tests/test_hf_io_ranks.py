"""Import, conversion and export of large models: under torchrun every rank reads, converts and
writes one pipeline stage, in the files' dtype, and the result is exactly what one process
writes; the export streams into safetensors shards with their index; splits that would cut a
K/V group and shards an index lists but that are missing are one line, with nothing written.
(Peak memory per rank: ``benchmarks/hf_io_memory.py``.)"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from megatron_cla.serving.hf_files import read_all
from megatron_cla.testing.distributed import init_process_group_once
from tests.commands import run_command
from tests.hf_helpers import (
    SMALL_HF_DECODER,
    load_hf,
    probe_tokens,
    randomise,
    relative_error,
    run_logits,
    run_weights,
)
from tests.stock_models import sentencepiece_tokenizer

transformers = pytest.importorskip("transformers")

VOCAB = SMALL_HF_DECODER["vocab_size"]


def _ok(*args, nproc: int = 1):
    proc = run_command(*args, nproc=nproc)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


@pytest.fixture(scope="module")
def source(tmp_path_factory) -> Path:
    """A tied bf16 Llama of 4 layers in 60 KB shards (a pipeline's last stage keeps a copy of
    the tied output matrix)."""
    directory = tmp_path_factory.mktemp("llama_bf16")
    config = transformers.LlamaConfig(
        **SMALL_HF_DECODER, num_hidden_layers=4, max_position_embeddings=128
    )
    config.tie_word_embeddings = True
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    randomise(model, seed=3)
    model.to(torch.bfloat16).save_pretrained(str(directory), max_shard_size="60KB")
    tokenizer = sentencepiece_tokenizer(tmp_path_factory)
    (directory / "tokenizer.model").write_bytes(tokenizer.read_bytes())
    return directory


def _same_weights(first: Path, second: Path) -> None:
    a, _ = run_weights(first)
    b, _ = run_weights(second)
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_two_ranks_import_convert_and_export_what_one_process_does(source, tmp_path):
    from megatron_cla.training.checkpoint import Checkpointer
    from megatron_cla.training.weights import checkpoint_dtype

    init_process_group_once()
    runs = {n: tmp_path / f"run{n}" for n in (1, 2)}
    for nproc, run in runs.items():
        _ok("import-hf", "--model", source, "--out", run, nproc=nproc)
    _same_weights(runs[1], runs[2])
    assert checkpoint_dtype(Checkpointer(runs[2] / "checkpoints"), 0) == torch.bfloat16

    clas = {n: tmp_path / f"cla{n}" for n in (1, 2)}
    for nproc, cla in clas.items():
        args = ("--checkpoint", runs[nproc], "--out", cla, "--cla-share-factor", 2)
        out = _ok("convert", "to-cla", *args, nproc=nproc).stdout
        assert out.startswith(f"wrote {cla}/checkpoints/iter_0000000: ")  # rank 0 only
        assert out.count("wrote ") == 1
    _same_weights(clas[1], clas[2])
    in_one_step = tmp_path / "imported_cla2"
    args = ("--model", source, "--out", in_one_step, "--cla-share-factor", 2)
    _ok("import-hf", *args, nproc=2)
    _same_weights(clas[1], in_one_step)

    one, two = tmp_path / "hf1", tmp_path / "hf2"
    _ok("export-hf", "--checkpoint", clas[1], "--out", one, "--dtype", "bf16")
    args = ("--checkpoint", clas[2], "--out", two, "--dtype", "bf16", "--max-shard-size", "100KB")
    _ok("export-hf", *args, nproc=2)
    index = json.loads((two / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) >= 3 and shards[-1].endswith(f"-of-{len(shards):05d}.safetensors")
    assert all((two / s).stat().st_size <= 100_000 + 2_000 for s in shards)  # + header
    assert not (two / "model.safetensors").exists() and (one / "model.safetensors").is_file()
    whole, sharded = read_all(one), read_all(two)
    assert whole.keys() == sharded.keys() == index["weight_map"].keys()
    assert all(torch.equal(whole[k], sharded[k]) for k in whole)
    tokens = probe_tokens(VOCAB)
    with torch.no_grad():
        logits = load_hf(two)(tokens).logits
    assert relative_error(logits, run_logits(clas[1], tokens)) < 1e-2  # bf16 weights, fp32 math


def test_a_pipeline_split_inside_a_kv_group_is_one_line(source, tmp_path):
    out = tmp_path / "cla4"
    args = ("--model", source, "--out", out, "--cla-share-factor", 4)
    proc = run_command("import-hf", *args, nproc=2)
    assert proc.returncode != 0
    lines = [line for line in proc.stderr.splitlines() if line.startswith("import-hf: ")]
    assert len(lines) == 1 and "pipeline" in lines[0], proc.stderr[-3000:]
    assert not out.exists() and not list(tmp_path.glob(".cla4.*"))


def test_a_shard_the_index_lists_but_that_is_missing_is_one_line(source, tmp_path):
    broken = tmp_path / "broken"
    broken.mkdir()
    for file in source.iterdir():
        (broken / file.name).write_bytes(file.read_bytes())
    index = json.loads((broken / "model.safetensors.index.json").read_text())
    missing = sorted(set(index["weight_map"].values()))[1]
    (broken / missing).unlink()
    proc = run_command("import-hf", "--model", broken, "--out", tmp_path / "out")
    assert proc.returncode == 1
    assert proc.stderr.strip() == f"import-hf: {broken} lacks the shard {missing} its index lists"
    assert not (tmp_path / "out").exists()
