"""Datasets (the shapes demo set, folders, webdataset, TFDS) and grain input pipelines.

    source, info = get_data_source(config.data, "train")    # random access, built on first use
    data = pipeline.make_pipeline(config, tokenize_fn=...)    # batches for this process
    x = to_model_range(batch["image"])                       # uint8 -> float32 [-1, 1], jnp

Modules: `shapes_grammar` (the shapes captions), `shapes` (generator, renderer, TFDS builder),
`builders` (folder and webdataset converters), `sources` (`config.data.source`), `preprocess`
(decoding, bad input, resize and crop, value ranges), `pipeline` (grain, state, global batch).
TFDS loads lazily: `to_model_range` alone does not import it.
"""

from typing import Any

from imagen_jax.data.preprocess import to_model_range
from imagen_jax.data.preprocess import to_uint8


def get_data_source(data_config: Any, split: str | None = None) -> tuple[Any, Any]:
  """(random-access source, sources.SourceInfo) of `data_config.source`; see `sources`."""
  from imagen_jax.data import sources  # pylint: disable=g-import-not-at-top  # heavy: tfds, not paid by `to_model_range` users
  return sources.get_data_source(data_config, split)


def get_captions(data_config: Any, split: str | None = None) -> Any:
  """Random access to the captions of `data_config.source`'s split (`captions[i]`: str)."""
  from imagen_jax.data import sources  # pylint: disable=g-import-not-at-top  # heavy: tfds, not paid by `to_model_range` users
  return sources.get_captions(data_config, split)
