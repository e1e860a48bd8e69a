"""The Transformer Engine path on a real GPU (marked ``gpu``: skipped where there is no CUDA).

* TE-spec CLA equals local-spec CLA with the same weights (bf16 tolerance), forward and gradients;
* S = 1 TE CLA is bit-identical to Megatron's stock TE spec;
* consumers receive the producer's K/V as views of the hand-off tensor (no copies);
* FP8: Megatron's recipes train the launcher's CLA model along the bf16 loss curve; FP8 dot-product
  attention; selective recompute of the input layernorm under FP8; delayed weight gradients;
* context parallelism: CP = 2 reproduces the CP = 1 loss curve (needs two GPUs).
"""

from __future__ import annotations

import math
import subprocess
from pathlib import Path

import pytest
import torch
from megatron.core.models.gpt.gpt_layer_specs import get_gpt_decoder_block_spec

from megatron_cla import cla_block_spec_local, cla_block_spec_te, cla_layer_spec_from_stock
from megatron_cla._compat import fp8_recipe_support, transformer_engine_available
from tests.commands import run_command
from tests.gpu_models import (
    batch,
    build,
    copy_local_into_te,
    gpu_config,
    loss_and_grads,
    relative_error,
    te_name,
    unfused_te_layer_spec,
)
from tests.helpers import assert_grads_equal, prepared_corpus_sample
from tests.pretrain_worker import step_losses

pytestmark = pytest.mark.gpu


@pytest.fixture
def te_rank(single_rank):
    """One rank on the GPU, with Transformer Engine (an optional extra) installed."""
    if not transformer_engine_available():
        pytest.skip("Transformer Engine is not installed (pip install megatron-cla[te])")
    yield


def _worst(errors: dict[str, float]) -> tuple[str, float]:
    name = max(errors, key=errors.get)
    return name, errors[name]


def _te_copy(config, source):
    """A TE-spec model with ``source``'s weights (FP8 metadata left fresh)."""
    model = build(config, cla_block_spec_te(config))
    weights = {n: t for n, t in source.state_dict().items() if "_extra_state" not in n}
    model.load_state_dict(weights, strict=False)
    return model


# ------------------------------------------------------------------ TE spec vs local spec

VARIANTS = {
    "MQA-CLA2": dict(),
    "GQA2-CLA2-qk_layernorm": dict(num_query_groups=2, qk_layernorm=True),
    "MQA-producers-1-2-4": dict(cla_share_factor=1, cla_producer_layers=[1, 2, 4]),
}


@pytest.mark.parametrize("variant", VARIANTS)
def test_te_spec_matches_local_spec(te_rank, variant):
    local_cfg = gpu_config(transformer_impl="local", **VARIANTS[variant])
    te_cfg = gpu_config(**VARIANTS[variant])
    local = build(local_cfg, cla_block_spec_local(local_cfg))
    te = build(te_cfg, cla_block_spec_te(te_cfg))
    copy_local_into_te(local, te)
    data = batch()
    loss_local, grads_local = loss_and_grads(local, data)
    loss_te, grads_te = loss_and_grads(te, data)
    assert abs(loss_te.item() - loss_local.item()) < 5e-3 * loss_local.item()
    errors = {n: relative_error(grads_te[te_name(n, te)], g) for n, g in grads_local.items()}
    name, worst = _worst(errors)
    assert worst < 0.05, f"{name}: relative gradient error {worst:.3g}"


# ------------------------------------------------------------------ S = 1 vs stock TE

RECOMPUTE = {
    "none": {},
    "full": dict(recompute_granularity="full", recompute_method="uniform", recompute_num_layers=2),
}


@pytest.mark.parametrize("recompute", RECOMPUTE)
def test_te_s1_is_bitwise_stock(te_rank, recompute):
    config = gpu_config(cla_share_factor=1, num_query_groups=2, **RECOMPUTE[recompute])
    stock = build(config, get_gpt_decoder_block_spec(config, True, normalization="RMSNorm"))
    cla = build(config, cla_block_spec_te(config))
    assert [n for n, _ in stock.named_parameters()] == [n for n, _ in cla.named_parameters()]
    cla.load_state_dict(stock.state_dict())
    data = batch(seed=1)
    loss_stock, grads_stock = loss_and_grads(stock, data)
    again, grads_again = loss_and_grads(stock, data)
    assert again.item() == loss_stock.item()  # the kernels are deterministic on this GPU,
    assert_grads_equal(grads_again, grads_stock)  # so bitwise equality below is meaningful
    loss_cla, grads_cla = loss_and_grads(cla, data)
    assert loss_cla.item() == loss_stock.item()
    assert_grads_equal(grads_cla, grads_stock)


# ------------------------------------------------------------------ the K/V hand-off


@pytest.mark.parametrize("backend", ["local", "te"])
def test_consumers_read_the_producers_kv_without_copies(te_rank, backend):
    config = gpu_config(transformer_impl="local" if backend == "local" else "transformer_engine")
    spec = (cla_block_spec_local if backend == "local" else cla_block_spec_te)(config)
    model = build(config, spec)
    handoff, received = [], []
    model.decoder.layers[0].register_forward_hook(lambda m, a, out: handoff.append(out[1]))

    def record(module, args, kwargs):
        received.append((args[1], args[2]) if len(args) > 2 else (kwargs["key"], kwargs["value"]))

    consumer = model.decoder.layers[1].self_attention
    consumer.core_attention.register_forward_pre_hook(record, with_kwargs=True)
    loss_and_grads(model, batch())
    (kv,), ((key, value),) = handoff, received
    assert key.data_ptr() == kv[0].data_ptr() and value.data_ptr() == kv[1].data_ptr()
    assert key.is_contiguous() and value.is_contiguous()


# ------------------------------------------------------------------ FP8 inside the model


def _fp8_dpa_gradient_error(share_factor: int) -> tuple[str, float]:
    """Worst relative gradient error of FP8 GEMMs + FP8 attention against bf16, same weights."""
    shape = dict(hidden_size=512, kv_channels=128, cla_share_factor=share_factor)
    reference_cfg = gpu_config(**shape)
    reference = build(reference_cfg, cla_block_spec_te(reference_cfg))
    fp8_cfg = gpu_config(
        **shape, fp8="hybrid", fp8_recipe="delayed", fp8_dot_product_attention=True
    )
    fp8 = _te_copy(fp8_cfg, reference)
    data = batch(seed=2)
    loss_ref, grads_ref = loss_and_grads(reference, data)
    loss_and_grads(fp8, data)  # delayed scaling: the first step only fills the amax history
    loss_fp8, grads_fp8 = loss_and_grads(fp8, data)
    assert math.isfinite(loss_fp8.item())
    assert abs(loss_fp8.item() - loss_ref.item()) < 2e-2 * loss_ref.item()
    return _worst({n: relative_error(grads_fp8[n], g) for n, g in grads_ref.items()})


def test_fp8_dot_product_attention_is_as_accurate_as_without_cla(te_rank):
    """FP8 attention over a producer's K/V: gradients as close to bf16 as at S = 1 (stock)."""
    name, cla2 = _fp8_dpa_gradient_error(2)
    _, stock = _fp8_dpa_gradient_error(1)
    assert cla2 < 0.4 and cla2 < 1.5 * stock, f"{name}: {cla2:.3g} (S = 1: {stock:.3g})"


def test_fp8_selective_layernorm_recompute_matches_no_recompute(te_rank):
    spec = cla_layer_spec_from_stock(unfused_te_layer_spec())
    fp8 = dict(fp8="hybrid", fp8_recipe="tensorwise")
    plain = build(gpu_config(**fp8), spec)
    recompute_cfg = gpu_config(
        **fp8, recompute_granularity="selective", recompute_modules=["layernorm"]
    )
    recomputed = build(recompute_cfg, spec)
    recomputed.load_state_dict(plain.state_dict())
    consumer = recomputed.decoder.layers[1]
    assert consumer.recompute_input_layernorm and not consumer.cla_is_producer
    assert consumer.self_attention.linear_q.save_original_input  # Megatron called our hook
    data = batch(seed=3)
    loss_plain, grads_plain = loss_and_grads(plain, data)
    loss_rec, grads_rec = loss_and_grads(recomputed, data)
    assert abs(loss_rec.item() - loss_plain.item()) < 1e-3 * loss_plain.item()
    name, worst = _worst({n: relative_error(grads_rec[n], g) for n, g in grads_plain.items()})
    assert worst < 0.02, f"{name}: relative gradient error {worst:.3g}"


def test_delayed_weight_gradients_of_consumers(te_rank):
    config = gpu_config()
    immediate = build(config, cla_block_spec_te(config))
    delayed_cfg = gpu_config()
    delayed_cfg.delay_wgrad_compute = True  # Megatron allows it only with MoE overlap; unit-test it
    delayed = build(delayed_cfg, cla_block_spec_te(delayed_cfg))
    delayed.load_state_dict(immediate.state_dict())
    data = batch(seed=4)
    _, want = loss_and_grads(immediate, data)
    delayed.zero_grad(set_to_none=True)
    loss = delayed(data["tokens"], data["position_ids"], None, labels=data["labels"]).float()
    loss.mean().backward()
    consumer = delayed.decoder.layers[1].self_attention
    assert consumer.linear_q.weight.grad is None  # deferred until backward_dw
    for layer in delayed.decoder.layers:
        layer.self_attention.backward_dw()
        layer.mlp.backward_dw()
    got = {n: p.grad.float() for n, p in delayed.named_parameters() if p.grad is not None}
    assert sorted(got) == sorted(want)
    name, worst = _worst({n: relative_error(got[n], g) for n, g in want.items()})
    assert worst < 1e-2, f"{name}: relative gradient error {worst:.3g}"


# ------------------------------------------------------------------ launcher: FP8 and CP runs

LAUNCH_RUN = [
    "train.train_iters=50",
    "train.warmup_iters=5",
    "train.precision=bf16",
    "train.transformer_engine=on",
    "logging.log_interval=10",
    "logging.eval_interval=50",
    "logging.eval_iters=2",
    "logging.tensorboard=false",
    "logging.progress_bar=false",
    "checkpoint.save_interval=0",
]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    if not transformer_engine_available():
        pytest.skip("Transformer Engine is not installed (pip install megatron-cla[te])")
    return prepared_corpus_sample(tmp_path_factory.mktemp("gpu_corpus"), 600, 2000)


def _launch(
    run_dir: Path, corpus: Path, *extra: str, ranks: int = 1
) -> subprocess.CompletedProcess:
    args = ["--config", "configs/tiny_mqa_cla2.yaml", *LAUNCH_RUN]
    args += [f"data.dir={corpus}", f"logging.run_dir={run_dir}", *extra]
    return run_command("pretrain", *args, nproc=ranks, env={"PYTHONUNBUFFERED": "1"})


def _curve(run_dir: Path) -> list[float]:
    losses = step_losses(run_dir)
    return [losses[step] for step in sorted(losses)]


@pytest.fixture(scope="module")
def bf16_curve(corpus, tmp_path_factory) -> list[float]:
    run_dir = tmp_path_factory.mktemp("bf16")
    done = _launch(run_dir, corpus)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return _curve(run_dir)


def _assert_tracks(curve: list[float], reference: list[float], final_tol: float) -> None:
    assert len(curve) == len(reference) == 50 and all(map(math.isfinite, curve))
    assert sum(curve[-10:]) < sum(curve[:10]) - 10 * 0.5  # it learns
    final, want = sum(curve[-10:]) / 10, sum(reference[-10:]) / 10
    assert abs(final - want) < final_tol * want, f"last-10 mean {final:.4f} vs {want:.4f}"
    deviation = max(abs(a - b) / b for a, b in zip(curve, reference, strict=True))
    assert deviation < 0.1, f"diverged: max relative deviation {deviation:.3f}"


@pytest.mark.parametrize("recipe", ["delayed", "tensorwise", "blockwise", "mxfp8"])
def test_fp8_recipes_follow_the_bf16_loss_curve(corpus, bf16_curve, tmp_path, recipe):
    supported, reason = fp8_recipe_support(recipe)
    done = _launch(tmp_path, corpus, f"train.fp8={recipe}")
    if not supported:  # e.g. MXFP8 on Hopper: refused before anything is allocated
        assert done.returncode != 0
        assert f"train.fp8='{recipe}' is not supported here" in done.stdout + done.stderr
        return
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert f"FP8 {recipe}" in done.stdout
    _assert_tracks(_curve(tmp_path), bf16_curve, final_tol=0.03)


@pytest.mark.skipif(
    not torch.cuda.is_available() or torch.cuda.device_count() < 2,
    reason="context parallelism needs two GPUs (NCCL refuses two ranks on one device)",
)
def test_context_parallel_2_reproduces_cp_1(corpus, bf16_curve, tmp_path):
    done = _launch(tmp_path, corpus, "parallel.context=2", ranks=2)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    _assert_tracks(_curve(tmp_path), bf16_curve, final_tol=0.01)
