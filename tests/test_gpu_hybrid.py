"""HybridModel CLA on a real GPU with Transformer Engine, and with real Mamba-2 layers (marked
``gpu``: skipped without CUDA; the Mamba tests also need ``mamba_ssm`` and ``causal_conv1d``).

* the TE hybrid stack spelled ``*-`` equals the TE GPT CLA model with the same weights;
* S = 1 is bit-identical to Megatron's stock ``hybrid_stack_spec`` (with and without recompute);
* Mamba-2 hybrids: the consumer's gradient reaches its producer across Mamba layers, full
  recompute is bit-identical, the parameter and Mamba-state accounting are the real model's, and
  paged-cache greedy decoding (Megatron's Mamba kernels) equals no-cache greedy.
"""

from __future__ import annotations

import importlib.util

import pytest
import torch

from megatron_cla import cla_block_spec_te
from tests.gpu_models import SEQ, VOCAB, batch, build, gpu_config, loss_and_grads, relative_error
from tests.helpers import assert_grads_equal
from tests.hybrid_helpers import requires_hybrid

pytestmark = [pytest.mark.gpu, requires_hybrid]

MAMBA = dict(mamba_state_dim=16, mamba_head_dim=32, mamba_num_groups=1)
"""Small Mamba-2 sizes for the hidden-256 test model (d_inner 512, 16 heads)."""


@pytest.fixture
def te_rank(single_rank):
    from megatron_cla._compat import transformer_engine_available

    if not transformer_engine_available():
        pytest.skip("Transformer Engine is not installed (pip install megatron-cla[te])")
    yield


@pytest.fixture
def mamba_rank(te_rank):
    missing = [m for m in ("mamba_ssm", "causal_conv1d") if importlib.util.find_spec(m) is None]
    if missing:
        pytest.skip(f"Mamba-2 kernels not installed: {missing}")
    yield


def _hybrid(pattern: str, spec=None, seed: int = 11, **overrides):
    from megatron.core.models.hybrid.hybrid_model import HybridModel
    from megatron.core.tensor_parallel.random import model_parallel_cuda_manual_seed

    from megatron_cla.hybrid import get_cla_hybrid_stack_spec

    config = gpu_config(num_layers=len(pattern), hybrid_layer_pattern=pattern, **overrides)
    model_parallel_cuda_manual_seed(seed)
    torch.manual_seed(seed)
    model = HybridModel(
        config,
        spec or get_cla_hybrid_stack_spec(use_transformer_engine=True),
        vocab_size=VOCAB,
        max_sequence_length=SEQ,
        hybrid_layer_pattern=pattern,
        position_embedding_type="rope",
    )
    return model.cuda()


def test_te_star_dash_stack_equals_te_gpt(te_rank):
    from megatron_cla.hybrid.keys import hybrid_key_for_gpt_key

    gpt = build(gpu_config(), cla_block_spec_te(gpu_config()))
    hybrid = _hybrid("*-" * 4)
    state = {hybrid_key_for_gpt_key(k): v for k, v in gpt.state_dict().items()}
    result = hybrid.load_state_dict(state, strict=False)
    assert all(k.endswith("_extra_state") for k in result.missing_keys + result.unexpected_keys)
    loss_g, grads_g = loss_and_grads(gpt, batch())
    loss_h, grads_h = loss_and_grads(hybrid, batch())
    assert abs(loss_h.item() - loss_g.item()) < 1e-3 * abs(loss_g.item())
    errors = {n: relative_error(grads_h[hybrid_key_for_gpt_key(n)], g) for n, g in grads_g.items()}
    assert max(errors.values()) < 2e-2, sorted(errors.items(), key=lambda e: -e[1])[:3]


@pytest.mark.parametrize("recompute", ["none", "full"])
def test_te_hybrid_s1_is_bitwise_megatron_stock(te_rank, recompute):
    from megatron.core.models.hybrid.hybrid_layer_specs import hybrid_stack_spec

    extra = (
        dict(recompute_granularity="full", recompute_method="uniform", recompute_num_layers=2)
        if recompute == "full"
        else {}
    )
    pattern = "*-*-*-*-"
    stock = _hybrid(pattern, hybrid_stack_spec, cla_share_factor=1, num_query_groups=2, **extra)
    cla = _hybrid(pattern, cla_share_factor=1, num_query_groups=2, **extra)
    assert [n for n, _ in stock.named_parameters()] == [n for n, _ in cla.named_parameters()]
    cla.load_state_dict(stock.state_dict())
    loss_s, grads_s = loss_and_grads(stock, batch(seed=1))
    loss_c, grads_c = loss_and_grads(cla, batch(seed=1))
    assert loss_c.item() == loss_s.item()
    assert_grads_equal(grads_c, grads_s)


PATTERN = "*M*-M*-*M"  # attention layers 1 3 6 8; Mamba-2 between producers and consumers


def test_consumer_gradient_crosses_mamba_layers(mamba_rank):
    model = _hybrid(PATTERN, cla_share_factor=2, **MAMBA)
    _, grads = loss_and_grads(model, batch())
    detached = _hybrid(PATTERN, cla_share_factor=2, **MAMBA)
    detached.load_state_dict(model.state_dict())
    from megatron_cla import CLATransformerLayer

    original = CLATransformerLayer._forward_attention

    def cut(self, hidden_states, attention_mask=None, context=None, *a, **kw):
        context = context.detach() if torch.is_tensor(context) else context
        return original(self, hidden_states, attention_mask, context, *a, **kw)

    CLATransformerLayer._forward_attention = cut
    try:
        _, cut_grads = loss_and_grads(detached, batch())
    finally:
        CLATransformerLayer._forward_attention = original
    producer = "decoder.layers.0.self_attention.linear_qkv.weight"
    assert relative_error(cut_grads[producer], grads[producer]) > 1e-3


@pytest.mark.parametrize("method,chunk", [("uniform", 1), ("uniform", 2), ("block", 3)])
def test_mamba_hybrid_full_recompute_is_bitwise(mamba_rank, method, chunk):
    base = _hybrid(PATTERN, cla_share_factor=2, **MAMBA)
    recomputed = _hybrid(
        PATTERN,
        cla_share_factor=2,
        recompute_granularity="full",
        recompute_method=method,
        recompute_num_layers=chunk,
        **MAMBA,
    )
    recomputed.load_state_dict(base.state_dict())
    loss_b, grads_b = loss_and_grads(base, batch())
    loss_r, grads_r = loss_and_grads(recomputed, batch())
    assert loss_r.item() == loss_b.item()
    assert_grads_equal(grads_r, grads_b)


def test_mamba_accounting_is_the_real_model(mamba_rank):
    from megatron_cla.accounting import DecoderShape, decoder_params, mamba_state_bytes

    model = _hybrid(PATTERN, cla_share_factor=2, **MAMBA)
    config = model.config
    shape = DecoderShape.from_config(config, config.cla_sharing)
    counted = {"weight", "conv1d_weight"}
    real = sum(
        p.numel()
        for n, p in model.decoder.named_parameters()
        if n.rsplit(".", 1)[-1] in counted and "norm" not in n
    )
    assert decoder_params(shape) == real
    conv, ssm = model.decoder.mamba_state_shapes_per_request()
    per_layer = (torch.Size(conv).numel() + torch.Size(ssm).numel()) * 2  # bf16
    assert mamba_state_bytes(shape) == PATTERN.count("M") * per_layer


def test_mamba_hybrid_paged_greedy_equals_no_cache_greedy(mamba_rank):
    from megatron_cla.inference.engines import build_dynamic_engine
    from tests.helpers import IdTokenizer, greedy_reference

    model = _hybrid(PATTERN, cla_share_factor=2, **MAMBA).eval()
    prompts = [[5, 17, 3, 9, 44], [7, 2, 61, 8, 13, 21, 34, 1, 12]]
    reference = [greedy_reference(model, p, 8) for p in prompts]
    engine = build_dynamic_engine(
        model, IdTokenizer(), vocab_size=VOCAB, max_sequence_length=64, buffer_size_gb=0.05,
        block_size_tokens=64, max_requests=4,
    )  # fmt: skip
    from megatron.core.inference.sampling_params import SamplingParams

    params = SamplingParams(num_tokens_to_generate=8, top_k=1, termination_id=-1)
    for i, p in enumerate(prompts):
        engine.add_request(i, p, params)
    done = {}
    while engine.has_unfinished_requests():
        for record in engine.step_modern()["finished_request_records"]:
            request = record.merge() if hasattr(record, "merge") else record
            done[int(request.request_id)] = [int(t) for t in request.generated_tokens]
    assert [done[i] for i in range(len(prompts))] == reference
    assert engine.context.num_attention_layers == 2  # producers only (attention layers 1, 3)
