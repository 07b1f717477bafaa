"""imagen-jax: train and sample Imagen-style cascaded text-to-image diffusion models in JAX/Flax.

Sub-packages: `diffusion` (schedules, objectives, samplers), `models` (U-Nets), `text` (T5
encoder, tokenizer, embedding cache), `data` (datasets and input pipelines), `train` (the
training loop), `sample` (cascade sampling), `eval` (shapes adherence, FID, DrawBench).
"""

__version__ = "0.1.0"
