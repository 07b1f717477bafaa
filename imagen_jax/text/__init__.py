"""Flax T5 v1.1 encoder, tokenizer, weight import and the embedding cache."""
