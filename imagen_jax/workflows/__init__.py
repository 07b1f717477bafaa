"""Workflows that compose training, sampling and evaluation: the shapes demo, a fine-tuning run."""
