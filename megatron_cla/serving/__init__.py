"""Serving CLA models outside Megatron-Core.

* :mod:`megatron_cla.serving.hf` - the transformers model (remote code, copied into exports);
* :mod:`megatron_cla.serving.weights` - Megatron parameters <-> Hugging Face tensors;
* :mod:`megatron_cla.serving.hf_config` - launcher config <-> Hugging Face ``config.json``;
* :mod:`megatron_cla.serving.tokenizer` - the SentencePiece tokenizer as a ``tokenizer.json``;
* :mod:`megatron_cla.serving.export` / :mod:`megatron_cla.serving.importer` - checkpoints out
  and back in (``megatron-cla export-hf`` / ``megatron-cla import-hf``);
* :mod:`megatron_cla.serving.vllm` - the vLLM plugin (consumers alias their producer's cache).
"""
