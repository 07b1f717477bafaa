"""The input pipeline: exact resume, epochs, process shards, SR pairs and crops, embeddings,
global batches on a mesh, worker processes."""

import concurrent.futures
import json
import pickle

import grain
import jax
import numpy as np
import pytest

from helpers import (  # pylint: disable=g-bad-import-order
    SHAPES_SIZES, fake_tokenize, stage_config)
from imagen_jax.core import partitioning
from imagen_jax.data import pipeline as pipeline_lib
from imagen_jax.data import preprocess
from imagen_jax.data import sources


@pytest.mark.parametrize("stage,overrides", [
    ("base64", {}),
    ("sr1024", {"data.random_crop": True}),
])
def test_resume_yields_exactly_the_next_batches(shapes_data_dir, stage, overrides):
  # 12 batches of 16 from 200 examples: the run crosses an epoch boundary.
  config = stage_config(stage, **{"data.data_dir": shapes_data_dir, **overrides})
  data = pipeline_lib.make_pipeline(config, tokenize_fn=fake_tokenize)
  for _ in range(7):
    next(data)
  state = json.loads(json.dumps(data.get_state()))
  after = [next(data) for _ in range(5)]
  restored = pipeline_lib.make_pipeline(config, tokenize_fn=fake_tokenize)
  restored.set_state(state)
  for expected, batch in zip(after, [next(restored) for _ in range(5)]):
    assert set(expected) == set(batch) == ({"image", "index", "tokens", "text_mask"}
                                           | ({"lowres"} if stage != "base64" else set()))
    for key in expected:
      np.testing.assert_array_equal(expected[key], batch[key])
  fresh = pipeline_lib.make_pipeline(config, tokenize_fn=fake_tokenize)
  assert not np.array_equal(next(fresh)["index"], after[0]["index"])


def test_restoring_into_another_layout_is_refused(shapes_data_dir):
  config = stage_config(**{"data.data_dir": shapes_data_dir})
  state = pipeline_lib.make_pipeline(config).get_state()
  other = pipeline_lib.make_pipeline(config, process_index=1, process_count=2)
  with pytest.raises(ValueError, match="process_count"):
    other.set_state(state)


def test_epoch_order_is_a_permutation_that_changes_each_epoch(shapes_data_dir):
  config = stage_config(**{"data.data_dir": shapes_data_dir, "batch_size": 32})
  data = pipeline_lib.make_pipeline(config)
  per_epoch = SHAPES_SIZES["train"] // 32
  epochs = [np.concatenate([next(data)["index"] for _ in range(per_epoch)]) for _ in range(2)]
  for order in epochs:
    assert sorted(order.tolist()) == list(range(SHAPES_SIZES["train"]))
  assert not np.array_equal(epochs[0], epochs[1])
  assert not np.array_equal(epochs[0], np.arange(SHAPES_SIZES["train"]))


def test_two_processes_shards_are_disjoint_and_cover_the_epoch(shapes_data_dir):
  config = stage_config(**{"data.data_dir": shapes_data_dir, "batch_size": 32})  # local batch 16
  shards = []
  for process in range(2):
    data = pipeline_lib.make_pipeline(config, process_index=process, process_count=2)
    assert data.local_batch_size == 16
    # Half an epoch each.
    shards.append(np.concatenate([next(data)["index"]
                                  for _ in range(SHAPES_SIZES["train"] // 32)]))
  assert not set(shards[0]) & set(shards[1])
  assert set(shards[0]) | set(shards[1]) == set(range(SHAPES_SIZES["train"]))


def test_batch_contents_match_the_source_records(shapes_data_dir):
  config = stage_config(**{"data.data_dir": shapes_data_dir, "image_size": 64})
  data = pipeline_lib.make_pipeline(config, tokenize_fn=fake_tokenize)
  batch = next(data)
  source, _ = sources.get_data_source(config.data)
  captions = sources.get_captions(config.data)  # what the embedding cache encodes
  for image, index, tokens in zip(batch["image"], batch["index"], batch["tokens"]):
    record = source[int(index)]
    np.testing.assert_array_equal(image, preprocess.decode_image(record["image"])[0])
    np.testing.assert_array_equal(tokens, fake_tokenize([record["caption"].decode()])[0][0])
    assert captions[int(index)] == record["caption"].decode()


class CountingSource:
  """Records "record-<i>", counting batched reads (what array_record serves fast)."""

  def __init__(self, size):
    self.size, self.calls = size, []

  def __len__(self):
    return self.size

  def __getitem__(self, index):
    return f"record-{index}"

  def __getitems__(self, indices):
    self.calls.append(list(indices))
    return [f"record-{i}" for i in indices]


def test_records_are_read_a_block_per_call_and_match_reading_one_at_a_time():
  source = CountingSource(50)
  order = grain.MapDataset.range(50).seed(3).shuffle().repeat()
  blocks = pipeline_lib.ReadInBlocks(order, source, block=8)
  # Four blocks, as many as the cache keeps: a thread the OS delays cannot find its block
  # evicted (a fifth block could, and would rightly be read again).
  positions = list(range(10, 38))
  with concurrent.futures.ThreadPoolExecutor(4) as pool:  # grain's reader threads, racing
    got = list(pool.map(blocks.__getitem__, positions[::-1]))[::-1]
  assert got == [(int(order[p]), f"record-{order[p]}") for p in positions]
  # Positions 10..37 lie in the blocks starting at 8, 16, 24 and 32: one read each.
  assert sorted(call[0] for call in source.calls) == sorted(int(order[b]) for b in range(8, 40, 8))
  assert all(len(call) == 8 for call in source.calls)
  copy = pickle.loads(pickle.dumps(blocks))  # grain's worker processes get a copy
  assert copy[37] == got[-1]


@pytest.mark.parametrize("stage,image,low", [("sr256", 32, 16), ("sr1024", 32, 8)])
def test_sr_lowres_is_the_downsampled_highres(shapes_data_dir, stage, image, low):
  config = stage_config(stage, **{"data.data_dir": shapes_data_dir})
  batch = next(pipeline_lib.make_pipeline(config))
  assert batch["image"].shape == (16, image, image, 3)
  assert batch["lowres"].shape == (16, low, low, 3)
  factor = image // low
  for high, lowres in zip(batch["image"], batch["lowres"]):
    np.testing.assert_array_equal(lowres, preprocess.downsample(high, low))
    # And independently of our resize: close to the block average of the high-res crop.
    pooled = high.reshape(low, factor, low, factor, 3).astype(float).mean(axis=(1, 3))
    assert np.abs(pooled - lowres).mean() < 12


def test_sr1024_crops_are_random_pieces_of_the_full_image(shapes_data_dir):
  config = stage_config("sr1024", **{"data.data_dir": shapes_data_dir})  # 64 images, 32 crops
  batch = next(pipeline_lib.make_pipeline(config))
  source, _ = sources.get_data_source(config.data)
  offsets = set()
  for crop, index in zip(batch["image"], batch["index"]):
    full = preprocess.decode_image(source[int(index)]["image"])[0]
    matches = [(t, l) for t in range(33) for l in range(33)
               if np.array_equal(full[t:t + 32, l:l + 32], crop)]
    assert matches, f"crop of record {index} is not a piece of it"
    offsets.add(matches[0])
  assert len(offsets) > 4


def test_embedding_cache_lookup_missing_is_an_error_naming_the_key_or_a_counted_skip(shapes_data_dir):
  missing = {3, 5, 8, 13, 21, 34, 55, 89, 144}

  def lookup(index):
    if index in missing:
      raise KeyError(index)
    return np.full((16, 8), index, np.float16), np.arange(16) < 5

  config = stage_config(**{"data.data_dir": shapes_data_dir, "data.embed_cache": "/cache/demo",
                           "batch_size": 64})
  with pytest.raises(pipeline_lib.MissingEmbeddingError, match=r"/cache/demo.*key (\d+)"):
    for _ in range(4):
      next(pipeline_lib.make_pipeline(config, embedding_lookup=lookup))
  config.data.missing_embedding = "skip"
  data = pipeline_lib.make_pipeline(config, embedding_lookup=lookup, tokenize_fn=fake_tokenize)
  # More examples than the first epoch's usable ones: every missing key has been met.
  batches = [next(data) for _ in range(-(-SHAPES_SIZES["train"] // 64) + 1)]
  for batch in batches:
    assert "tokens" not in batch
    assert batch["text_emb"].dtype == np.float32 and batch["text_emb"].shape == (64, 16, 8)
    np.testing.assert_array_equal(batch["text_emb"][:, 0, 0], batch["index"])
    assert not set(batch["index"].tolist()) & missing
  assert data.skip_counts()["missing_embedding"] >= len(missing)
  with pytest.raises(ValueError, match="no embedding_lookup"):
    pipeline_lib.make_pipeline(config)


def test_global_batch_is_sharded_over_data_and_fsdp(shapes_data_dir):
  config = stage_config("sr256", **{"data.data_dir": shapes_data_dir, "mesh.data": 2, "mesh.fsdp": 4})
  mesh = partitioning.make_mesh(config.mesh)
  local = next(pipeline_lib.make_pipeline(config, tokenize_fn=fake_tokenize))
  arrays = pipeline_lib.global_batch(local, mesh)
  assert set(arrays) == set(local)
  for key, value in arrays.items():
    assert value.shape == local[key].shape
    assert value.sharding == partitioning.batch_sharding(mesh, value.ndim)
    assert len(value.addressable_shards) == 8
    np.testing.assert_array_equal(np.asarray(value), local[key])
  assert arrays["index"].dtype == np.int32 and arrays["image"].dtype == np.uint8


def test_model_range_conversion():
  pixels = np.arange(256, dtype=np.uint8)
  x = preprocess.to_model_range(pixels)
  assert x.dtype == np.float32 and float(x.min()) == -1.0 and float(x.max()) == 1.0
  np.testing.assert_array_equal(np.asarray(preprocess.to_uint8(x)), pixels)
  assert np.asarray(jax.jit(preprocess.to_model_range)(pixels)).dtype == np.float32


@pytest.mark.slow
def test_worker_processes_give_the_same_batches_and_resume(shapes_data_dir):
  config = stage_config(**{"data.data_dir": shapes_data_dir})
  in_process = pipeline_lib.make_pipeline(config)
  expected = [next(in_process) for _ in range(3)]
  config.data.num_workers = 2
  data = pipeline_lib.make_pipeline(config)
  try:
    first = [next(data) for _ in range(3)]
    state = json.loads(json.dumps(data.get_state()))
    after = [next(data) for _ in range(3)]
  finally:
    data.close()
  for a, b in zip(expected, first):  # workers take turns: the order does not change
    np.testing.assert_array_equal(a["index"], b["index"])
    np.testing.assert_array_equal(a["image"], b["image"])
  restored = pipeline_lib.make_pipeline(config)
  try:
    restored.set_state(state)
    for a, b in zip(after, [next(restored) for _ in range(3)]):
      np.testing.assert_array_equal(a["index"], b["index"])
      np.testing.assert_array_equal(a["image"], b["image"])
  finally:
    restored.close()
