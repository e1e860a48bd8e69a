"""Data: the embedded default corpus, SentencePiece tokenizers and Megatron indexed datasets."""
