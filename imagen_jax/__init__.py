"""imagen-jax: train and sample Imagen-style cascaded text-to-image diffusion models in JAX/Flax.

Layers, each importing only from those below it (tests/test_layers.py):

- `core`: config loading, device mesh and logical axis rules, multi-process setup, file I/O
  (local and gs://), checkpoints, PNG files.
- `diffusion` (schedules, objectives, samplers, one stage's sampling loop), `models` (U-Nets),
  `data` (sources, preprocessing, input pipelines), `text` (T5 encoder, tokenizer, embedding
  cache and the job that fills it).
- `train` (the training loop) and `sample` (cascades, sampling into an outdir).
- `eval` (shapes adherence, FID, DrawBench) and `demo` (the shapes demo).
- `commands` (one thin module per `imagen-jax` subcommand) and `cli`.
"""

__version__ = "0.1.0"
