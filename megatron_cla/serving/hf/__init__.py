"""The transformers model files copied into every export (self-contained remote code)."""
