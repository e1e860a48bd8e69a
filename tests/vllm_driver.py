"""Serve an exported model with vLLM in this process and print what the tests compare, as JSON.

    python tests/vllm_driver.py REQUEST.json

REQUEST: {"model": DIR, "kv_cache_memory_bytes": N, "max_model_len": N, "prompts": [[ids]],
"max_tokens": N}. Prints one JSON line: the KV cache vLLM allocated (blocks, block size, the
bytes per token of the layers that own a cache), the greedy tokens and, for every prompt
position after the first, the log-probability vLLM gives the prompt's next token. Run in a
fresh process per model: vLLM's engine initialises torch.distributed for itself.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path


def _describe(model) -> dict:
    """The class vLLM built and, per layer, where its attention's KV cache starts."""
    starts = []
    for layer in model.model.layers:
        cache = layer.self_attn.attn.kv_cache
        cache = cache[0] if isinstance(cache, (list, tuple)) else cache
        starts.append(cache.data_ptr() if cache.numel() else None)
    first = {ptr: i for i, ptr in reversed(list(enumerate(starts)))}
    cls = type(model)
    return {
        "model_class": f"{cls.__module__}.{cls.__qualname__}",
        "cache_owner": [first.get(ptr) for ptr in starts],  # first layer whose cache starts there
    }


def serve(request: dict) -> dict:
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")  # engine in this process
    from vllm import LLM, SamplingParams

    llm = LLM(
        model=request["model"],
        trust_remote_code=True,
        dtype="float32",
        enforce_eager=True,
        kv_cache_memory_bytes=request["kv_cache_memory_bytes"],
        max_model_len=request["max_model_len"],
        enable_prefix_caching=False,
        seed=0,
    )
    cache = llm.llm_engine.vllm_config.cache_config
    (model,) = llm.apply_model(_describe)
    params = SamplingParams(temperature=0, max_tokens=request["max_tokens"], prompt_logprobs=0)
    outputs = llm.generate([{"prompt_token_ids": p} for p in request["prompts"]], params)
    prompt_logprobs = []
    for prompt, out in zip(request["prompts"], outputs, strict=True):
        steps = out.prompt_logprobs[1:]  # position 0 has no prediction
        prompt_logprobs.append([s[t].logprob for s, t in zip(steps, prompt[1:], strict=True)])
    return {
        **model,
        "num_blocks": cache.num_gpu_blocks,
        "block_size": cache.block_size,
        "tokens": [list(o.outputs[0].token_ids) for o in outputs],
        "prompt_logprobs": prompt_logprobs,
    }


def serve_in_subprocess(request: dict, work: Path) -> dict:
    """Run this driver on ``request`` in a fresh process (from the tests) and return its result;
    the request file is written into ``work``."""
    path = Path(work) / f"{Path(request['model']).name}.request.json"
    path.write_text(json.dumps(request))
    cmd = [sys.executable, __file__, str(path)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=work)
    results = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    assert proc.returncode == 0 and results, proc.stderr[-4000:]
    return json.loads(results[-1][len("RESULT ") :])


if __name__ == "__main__":
    with open(sys.argv[1]) as handle:
        result = serve(json.load(handle))
    print("RESULT " + json.dumps(result))
