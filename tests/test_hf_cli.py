"""``megatron-cla export-hf`` / ``import-hf`` on a trained launcher run (CLA2, saved at
PP 2): the transformers model generates Megatron's greedy tokens, the import fine-tunes from the
trained weights and serves the same tokens; bad inputs fail in one line, writing nothing."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from megatron_cla.serving.hf_config import check_exportable
from megatron_cla.serving.importer import import_hf_model
from megatron_cla.testing import run_on_ranks
from megatron_cla.training.checkpoint import Checkpointer
from megatron_cla.training.config import ModelConfig
from tests.commands import command_env, run_command
from tests.hf_helpers import load_hf, relative_error, run_logits
from tests.pretrain_worker import pretrain_file_on_rank, step_losses

PROMPTS = ["It is a truth universally acknowledged", "And God said"]
NEW_TOKENS = 12


def _megatron_tokens(run: Path, out: Path) -> list[list[int]]:
    args = ["--checkpoint", run, "--max-new-tokens", NEW_TOKENS, "--json", out]
    proc = run_command("generate", *args, *[a for p in PROMPTS for a in ("--prompt", p)])
    assert proc.returncode == 0, proc.stderr[-3000:]
    return [r["tokens"] for r in json.loads(out.read_text())]


@pytest.fixture(scope="module")
def exported(pp2_gpt_run, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("export_hf") / "hf"
    proc = run_command("export-hf", "--checkpoint", pp2_gpt_run, "--out", out)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.startswith(f"wrote {out} from {pp2_gpt_run}/checkpoints/iter_0000016")
    assert "KV cache in layers [0, 2]" in proc.stdout and not proc.stderr.strip()
    return out


TOKENIZER_LOADS = """
import json, sys
from transformers import AutoTokenizer, PreTrainedTokenizerFast
plain = PreTrainedTokenizerFast.from_pretrained(sys.argv[1])
auto = AutoTokenizer.from_pretrained(sys.argv[1], trust_remote_code=True)
print(json.dumps([plain.encode(sys.argv[2]), auto.encode(sys.argv[2])]))
"""


def test_exported_files_load_quietly_with_their_permissions(exported):
    """The tokenizer loads with no remote code (``PreTrainedTokenizerFast``), and through
    ``AutoTokenizer`` with the model's ``trust_remote_code``: no prompt (stdin is closed), no
    warning, the same ids. Every file is readable like the others (safetensors writes 0600)."""
    proc = subprocess.run(
        [sys.executable, "-c", TOKENIZER_LOADS, str(exported), PROMPTS[0]],
        capture_output=True,
        text=True,
        stdin=subprocess.DEVNULL,
        env=command_env(),
        timeout=300,
    )
    assert proc.returncode == 0 and proc.stderr == "", proc.stderr[-2000:]
    plain, auto = json.loads(proc.stdout)
    assert plain == auto and len(plain) > 2
    modes = {f.name: f.stat().st_mode & 0o777 for f in exported.iterdir()}
    assert len(set(modes.values())) == 1, modes


def test_exported_model_generates_megatrons_greedy_tokens(pp2_gpt_run, exported, tmp_path):
    from transformers import PreTrainedTokenizerFast

    tokenizer = PreTrainedTokenizerFast.from_pretrained(str(exported))  # no remote code
    model = load_hf(exported)
    tokens = torch.tensor([tokenizer.encode(PROMPTS[0] * 3, add_special_tokens=False)])
    assert relative_error(model(tokens).logits, run_logits(pp2_gpt_run, tokens)) < 1e-5
    megatron = _megatron_tokens(pp2_gpt_run, tmp_path / "megatron.json")
    for prompt, want in zip(PROMPTS, megatron, strict=True):
        ids = torch.tensor([tokenizer.encode(prompt, add_special_tokens=False)])
        got = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=NEW_TOKENS)
        assert got[0, ids.shape[1] :].tolist() == want
        assert max(want) < model.config.tokenizer_vocab_size


def test_import_fine_tunes_and_serves(pp2_gpt_run, exported, tmp_path):
    out = tmp_path / "imported"
    proc = run_command("import-hf", "--model", exported, "--out", out)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.startswith(f"wrote {out}/checkpoints/iter_0000000: hf-imported")
    data = pp2_gpt_run.parent / "data"  # the run's prepared data, same tokenizer
    overrides = ["train.train_iters=2", "train.warmup_iters=0", f"data.dir={data}"]
    overrides += ["logging.log_interval=1"]
    overrides += ["logging.progress_bar=false", "logging.tensorboard=false"]
    overrides += ["train.micro_batch_size=4", "train.global_batch_size=8", "train.lr=3e-4"]
    run_on_ranks(pretrain_file_on_rank, 1, str(out / "config.yaml"), overrides, timeout=600)
    trained, fresh = step_losses(out), step_losses(pp2_gpt_run)
    assert sorted(trained) == [1, 2]
    assert trained[1] < fresh[1] - 0.5, (trained, fresh)  # starts from the trained weights
    checkpoints = Checkpointer(out / "checkpoints")
    assert checkpoints.is_weights_only(0) and not checkpoints.is_weights_only(2)
    served = _megatron_tokens(out, tmp_path / "imported.json")  # newest: the fine-tuned step 2
    assert len(served) == len(PROMPTS) and all(len(t) == NEW_TOKENS for t in served)


def test_cli_errors_are_one_line_and_write_nothing(exported, tmp_path):
    megatron_lm = tmp_path / "megatron_lm_run"
    (megatron_lm / "iter_0000010").mkdir(parents=True)
    (megatron_lm / "latest_checkpointed_iteration.txt").write_text("10")
    proc = run_command("export-hf", "--checkpoint", megatron_lm, "--out", tmp_path / "out")
    assert proc.returncode == 1
    assert proc.stderr.strip().splitlines() == [
        f"export-hf: {megatron_lm} holds Megatron-LM checkpoints (latest_checkpointed_"
        f"iteration.txt), not the ones megatron-cla pretrain writes "
        f"(iter_NNNNNNN/ with cla_complete.json)"
    ]
    config = json.loads((exported / "config.json").read_text())
    broken = tmp_path / "broken"
    broken.mkdir()
    for f in exported.iterdir():
        (broken / f.name).write_bytes(f.read_bytes())
    (broken / "config.json").write_text(json.dumps({**config, "model_type": "llama"}))
    proc = run_command("import-hf", "--model", broken, "--out", tmp_path / "imported")
    assert proc.returncode == 1 and len(proc.stderr.strip().splitlines()) == 1
    assert "architectures=['MegatronCLAForCausalLM'], model_type='llama': the importable" in (
        proc.stderr
    )
    assert sorted(p.name for p in tmp_path.iterdir()) == ["broken", "megatron_lm_run"]


def _copy_with(exported: Path, target: Path, config: dict, drop: str = "") -> Path:
    from safetensors.torch import load_file, save_file

    target.mkdir()
    for f in exported.iterdir():
        (target / f.name).write_bytes(f.read_bytes())
    (target / "config.json").write_text(json.dumps(config))
    tensors = {k: v for k, v in load_file(str(exported / "model.safetensors")).items() if k != drop}
    save_file(tensors, str(target / "model.safetensors"))
    return target


def test_import_refuses_directories_that_do_not_fit(exported, tmp_path):
    from megatron_cla.testing.distributed import init_process_group_once

    init_process_group_once()
    config = json.loads((exported / "config.json").read_text())
    missing = _copy_with(
        exported, tmp_path / "missing", config, "model.layers.2.self_attn.v_proj.weight"
    )
    with pytest.raises(ValueError, match="no tensor model.layers.2.self_attn.v_proj.weight"):
        import_hf_model(missing, tmp_path / "out")
    heads = _copy_with(exported, tmp_path / "heads", {**config, "num_key_value_heads": 2})
    with pytest.raises(
        ValueError,
        match=r"k_proj.weight \(16, 64\), .* do not give decoder.layers.0.self_attention",
    ):
        import_hf_model(heads, tmp_path / "out")
    sharing = _copy_with(
        exported, tmp_path / "sharing", {**config, "cla_producer_layers": [0, 1, 2, 3]}
    )
    with pytest.raises(ValueError, match="no tensor model.layers.1.self_attn.k_proj.weight"):
        import_hf_model(sharing, tmp_path / "out")
    assert not (tmp_path / "out").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".out.")]


@pytest.mark.version_independent
@pytest.mark.parametrize(
    "arch, pattern", [("hybrid", "M*-M*-"), ("hybrid", "*E*E"), ("hybrid", "**--")]
)
def test_layers_without_a_transformers_counterpart_are_refused(arch, pattern):
    model = ModelConfig(arch=arch, hybrid_layer_pattern=pattern)
    with pytest.raises(ValueError, match="cannot be exported: the Hugging Face model has GPT"):
        check_exportable(model)
