"""Conversions of launcher runs between model families (``megatron-cla convert``).

* :mod:`~megatron_cla.conversion.gpt_to_hybrid`: a CLA ``GPTModel`` run -> the equivalent ``*-``
  ``HybridModel`` run (weights, optimizer and scheduler state, data position).
"""
