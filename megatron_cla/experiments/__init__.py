"""Experiments that compare CLA variants (``megatron-cla sweep`` / ``sweep-report``).

* :mod:`~megatron_cla.experiments.sweep`: a grid of variants x seeds (+ an LR sweep), each a
  ``megatron-cla pretrain`` process with the same data and token budget; resumable.
* :mod:`~megatron_cla.experiments.report`: the Pareto plot and the claims/LR report of its results.
"""
