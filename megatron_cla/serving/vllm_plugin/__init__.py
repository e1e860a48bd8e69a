"""vLLM plugin: serves ``MegatronCLAForCausalLM`` exports with a KV cache for producers only.

Registered through the ``vllm.general_plugins`` entry point of this package (see
``pyproject.toml``), so ``vllm serve DIR --trust-remote-code`` and ``vllm.LLM(DIR,
trust_remote_code=True)`` find the architecture once ``megatron-cla[vllm]`` is installed; the
model itself is imported only when vLLM builds it (:mod:`.model`).
"""

from __future__ import annotations

__all__ = ["ARCHITECTURE", "register"]

ARCHITECTURE = "MegatronCLAForCausalLM"


def register() -> None:
    """Tell vLLM's model registry where the architecture lives (idempotent)."""
    from vllm import ModelRegistry

    if ARCHITECTURE not in ModelRegistry.get_supported_archs():
        ModelRegistry.register_model(
            ARCHITECTURE, "megatron_cla.serving.vllm_plugin.model:MegatronCLAForCausalLM"
        )
