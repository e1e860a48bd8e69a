"""Pretraining launcher internals (config, plan, model, data stream, loop, checkpoints, metrics)."""
