"""Data: the shapes set (from its pixels), sources, bad input, SR pairs, resume and sharding."""

import glob
import io
import json
import os
import struct
import tarfile
import zlib

import jax
import numpy as np
import pytest
from PIL import Image
from scipy import ndimage
import tensorflow_datasets as tfds

from imagen_jax import config_lib
from imagen_jax.data import builders
from imagen_jax.data import pipeline as pipeline_lib
from imagen_jax.data import preprocess
from imagen_jax.data import shapes
from imagen_jax.data import shapes_grammar as grammar
from imagen_jax.data import sources
from imagen_jax.train import partitioning

SMALL = {"train": 200, "validation": 60, "heldout": 60}


@pytest.fixture(scope="module")
def shapes_dir(tmp_path_factory):
  data_dir = str(tmp_path_factory.mktemp("shapes"))
  shapes.build(data_dir, 64, num_examples=SMALL)
  return data_dir


def stage_config(name="base64", **overrides):
  config = config_lib.load_config(f"configs/{name}.py:tiny")
  defaults = {"batch_size": 16, "data.prefetch": 2}
  for key, value in {**defaults, **overrides}.items():
    config_lib.set_by_path(config, key, value)
  return config


def data_config(source, data_dir, **fields):
  config = stage_config()
  config.data.source, config.data.data_dir = source, data_dir
  for key, value in fields.items():
    config.data[key] = value
  return config.data


# --- shapes, judged from the pixels ---------------------------------------------------------

def objects_in_pixels(image):
  """[(color, shape, (cy, cx))] read from the pixels alone: exact colors, connected components,
  the fill ratio of the bounding box (square 1, circle pi/4, triangle 1/2) and the balance of
  the lower and upper halves (an up-pointing triangle holds 3/4 of its area below the middle)."""
  names = {rgb: name for name, rgb in grammar.COLORS.items()}
  colors = {tuple(int(v) for v in c) for c in np.unique(image.reshape(-1, 3), axis=0)}
  colors.discard((0, 0, 0))
  assert colors <= set(names), f"colors outside the palette: {colors - set(names)}"
  size = image.shape[0]
  found = []
  for rgb in colors:
    labels, count = ndimage.label(np.all(image == rgb, axis=-1))
    for i in range(1, count + 1):
      ys, xs = np.nonzero(labels == i)
      height, width = ys.max() - ys.min() + 1, xs.max() - xs.min() + 1
      fill = len(ys) / (height * width)
      middle = (ys.min() + ys.max()) / 2
      balance = np.sum(ys > middle) / max(np.sum(ys < middle), 1)
      if fill > 0.92:
        shape = "square"
      elif fill < 0.65 and balance > 2:
        shape = "triangle"
      elif 0.68 < fill < 0.88 and 0.8 < balance < 1.25:
        shape = "circle"
      else:
        shape = f"unknown(fill={fill:.2f}, balance={balance:.2f})"
      centre = ((ys.min() + ys.max() + 1) / 2 / size, (xs.min() + xs.max() + 1) / 2 / size)
      found.append((names[rgb], shape, centre))
  return found


def check_pixels_match_caption(image, caption):
  prompt = grammar.parse(caption)
  found = objects_in_pixels(image)
  assert sorted((c, s) for c, s, _ in found) == sorted(prompt.pairs), (caption, found)
  cell = lambda centre: (int(centre[0] * 3), int(centre[1] * 3))
  if prompt.relation is None:
    assert cell(found[0][2]) == prompt.cell, (caption, found)
    return
  by_pair = {(c, s): centre for c, s, centre in found}
  first = cell(by_pair[prompt.pairs[0]])
  second = cell(by_pair[prompt.pairs[1]])
  if prompt.relation == grammar.LEFT_OF:
    assert first[0] == second[0] and first[1] < second[1], (caption, found)
  else:
    assert first[1] == second[1] and first[0] < second[0], (caption, found)


def test_shapes_captions_follow_the_grammar_and_the_split_rules():
  counts = {"single": 0, "pair": 0}
  for split, n in (("train", 3000), ("validation", 500), ("heldout", 1000)):
    for index in range(n):
      ex = shapes.example(split, index)
      prompt = grammar.parse(ex.caption)
      assert prompt == ex.prompt
      if split == "heldout":
        assert prompt.is_heldout, ex.caption
      else:
        assert not prompt.is_heldout, ex.caption
      if prompt.relation is not None:
        assert prompt.objects[0] != prompt.objects[1], ex.caption
      counts["pair" if prompt.relation else "single"] += 1
  assert 0.30 < counts["pair"] / sum(counts.values()) < 0.37, counts


def test_heldout_pairs_never_occur_in_the_full_train_and_validation_splits():
  for split in ("train", "validation"):
    for index in range(shapes.SPLITS[split]):
      assert not shapes.example(split, index).prompt.is_heldout, (split, index)


def test_shapes_records_show_the_named_color_shape_and_cell(shapes_dir):
  for split, n in SMALL.items():
    source, info = sources.get_data_source(data_config("shapes", shapes_dir), split)
    assert info.num_examples == n
    for index in range(n):
      record = source[index]
      image, kind = preprocess.decode_image(record["image"])
      assert kind is None and image.shape == (64, 64, 3)
      caption = record["caption"].decode()
      check_pixels_match_caption(image, caption)
      assert (split == "heldout") == grammar.parse(caption).is_heldout
      assert record["id"] == index  # shuffling disabled: position == generator index


def test_shapes_256_renders_the_same_layout(tmp_path):
  shapes.build(str(tmp_path), 256, num_examples={"train": 20, "validation": 4, "heldout": 4})
  source, _ = sources.get_data_source(data_config("shapes:256", str(tmp_path)), "train")
  for index in range(20):
    image, _ = preprocess.decode_image(source[index]["image"])
    assert image.shape == (256, 256, 3)
    check_pixels_match_caption(image, source[index]["caption"].decode())


def test_the_pixel_check_can_fail():
  ex = shapes.example("validation", 3)
  image = shapes.render(ex.placed, 64)
  wrong_color = grammar.parse(ex.caption).objects[0].color
  other = next(c for c in grammar.COLORS if c not in [o.color for o in ex.prompt.objects])
  recolored = image.copy()
  recolored[np.all(image == grammar.COLORS[wrong_color], axis=-1)] = grammar.COLORS[other]
  with pytest.raises(AssertionError):
    check_pixels_match_caption(recolored, ex.caption)
  moved = np.roll(image, 32, axis=1)
  with pytest.raises(AssertionError):
    check_pixels_match_caption(np.roll(moved, 32, axis=0), ex.caption)
  with pytest.raises(AssertionError):
    check_pixels_match_caption(image, "a red triangle at the center")


def test_same_seed_gives_byte_identical_data(tmp_path):
  sizes = {"train": 40, "validation": 8, "heldout": 8}
  for name, seed in (("a", 3), ("b", 3), ("c", 4)):
    shapes.build(str(tmp_path / name), 64, num_examples=sizes, seed=seed)

  def read(name):  # the record files, byte for byte
    pattern = str(tmp_path / name / "imagen_shapes/64/1.0.0/*.array_record*")
    return [open(f, "rb").read() for f in sorted(glob.glob(pattern))]

  assert len(read("a")) >= 3
  assert read("a") == read("b")
  assert read("a") != read("c")
  assert shapes.example("train", 7, seed=3) == shapes.example("train", 7, seed=3)


# --- source strings -------------------------------------------------------------------------

@pytest.mark.parametrize("source", ["shape", "shapes:128", "tfds:", "tfds:a:b:c", "folder:",
                                    "wds", "s3:bucket", ""])
def test_malformed_source_strings_are_named(source, tmp_path):
  with pytest.raises(sources.SourceError, match="config.data.source=" + repr(source)):
    sources.get_data_source(data_config(source, str(tmp_path)))


def test_missing_folder_tfds_and_split_errors_name_the_source(tmp_path, shapes_dir):
  with pytest.raises(sources.SourceError, match="no such directory"):
    sources.get_data_source(data_config(f"folder:{tmp_path}/nope", str(tmp_path)))
  with pytest.raises(sources.SourceError, match="tfds:no_such_dataset_xyz"):
    sources.get_data_source(data_config("tfds:no_such_dataset_xyz", str(tmp_path)))
  with pytest.raises(sources.SourceError, match="has no split 'test'"):
    sources.get_data_source(data_config("shapes", shapes_dir), "test")


# --- bad input ------------------------------------------------------------------------------

def encode(image, fmt, **kwargs):
  buffer = io.BytesIO()
  image.save(buffer, format=fmt, **kwargs)
  return buffer.getvalue()


def png_chunk(tag, data):
  return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data))


def png_rgb16(pixels):
  """A 48-bit RGB PNG (PIL cannot write one)."""
  height, width, _ = pixels.shape
  rows = b"".join(b"\0" + pixels[i].astype(">u2").tobytes() for i in range(height))
  return (b"\x89PNG\r\n\x1a\n" + png_chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 16, 2,
                                                                 0, 0, 0))
          + png_chunk(b"IDAT", zlib.compress(rows)) + png_chunk(b"IEND", b""))


def png_claiming_size(width, height):
  """A tiny PNG whose header claims width x height: a decompression bomb's signature."""
  real = encode(Image.new("RGB", (16, 16)), "PNG")
  header = png_chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0))
  return real[:8] + header + real[8 + 25:]


def make_bad_folder(root):
  """Good images, converted ones and one of every bad kind; returns (good keys, expected counts)."""
  rng = np.random.default_rng(0)
  pixels = lambda h=48, w=40: rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
  files = {}  # name -> (image bytes, caption bytes or None)
  for i in range(5):
    files[f"good{i}.jpg" if i % 2 else f"good{i}.png"] = (
        encode(Image.fromarray(pixels()), "JPEG" if i % 2 else "PNG"), f"good image {i}".encode())
  files["sub/nested.png"] = (encode(Image.fromarray(pixels()), "PNG"), b"in a subfolder")
  gray = pixels()[..., 0]
  converted = {
      "gray.png": (encode(Image.fromarray(gray), "PNG"), "grayscale"),
      "palette.png": (encode(Image.fromarray(pixels()).convert("P"), "PNG"), "palette"),
      "rgba.png": (encode(Image.fromarray(np.dstack([pixels(), pixels()[..., :1]])), "PNG"),
                   "rgba"),
      "cmyk.jpg": (encode(Image.fromarray(pixels()).convert("CMYK"), "JPEG"), "cmyk"),
      "gray16.png": (encode(Image.fromarray(gray.astype(np.uint16) * 257), "PNG"), "16bit"),
      "rgb16.png": (png_rgb16(pixels().astype(np.uint16) * 257), "16bit"),
  }
  for name, (data, _) in converted.items():
    files[name] = (data, f"a {name} picture".encode())
  files["latin1.png"] = (encode(Image.fromarray(pixels()), "PNG"), "café au lait".encode("cp1252"))
  good = set(files)
  jpeg = encode(Image.fromarray(pixels(64, 64)), "JPEG")
  bad = {
      "truncated.jpg": (jpeg[:len(jpeg) // 2], b"cut off", "corrupt_image"),
      "garbage.png": (bytes(rng.integers(0, 256, 300, dtype=np.uint8)), b"noise", "corrupt_image"),
      "empty.png": (b"", b"zero bytes", "corrupt_image"),
      "tiny.png": (encode(Image.fromarray(pixels(4, 4)), "PNG"), b"too small", "too_small"),
      "bomb.png": (png_claiming_size(40000, 40000), b"decompression bomb", "too_large"),
      "blank_caption.png": (encode(Image.fromarray(pixels()), "PNG"), b"  \n\t ", "empty_caption"),
      "no_caption.png": (encode(Image.fromarray(pixels()), "PNG"), None, "missing_caption"),
      "undecodable.png": (encode(Image.fromarray(pixels()), "PNG"), b"\x81\x8d\x8f\x90",
                          "undecodable_caption"),
  }
  for name, (data, caption, _) in bad.items():
    files[name] = (data, caption)
  for name, (data, caption) in files.items():
    path = os.path.join(root, name)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "wb") as f:
      f.write(data)
    if caption is not None:
      with open(os.path.splitext(path)[0] + ".txt", "wb") as f:
        f.write(caption)
  with open(os.path.join(root, "orphan.txt"), "w") as f:  # a caption without an image: ignored
    f.write("nobody's caption")
  skipped = {}
  for _, _, kind in bad.values():
    skipped[kind] = skipped.get(kind, 0) + 1
  converted_counts = {}
  for _, kind in converted.values():
    converted_counts[kind] = converted_counts.get(kind, 0) + 1
  converted_counts["non_utf8_caption"] = 1
  return good, skipped, converted_counts, files


def test_folder_with_every_bad_kind_builds_keeps_the_good_and_counts_the_bad(tmp_path):
  root = tmp_path / "images"
  good, skipped, converted, files = make_bad_folder(str(root))
  config = stage_config(**{"data.source": f"folder:{root}", "data.data_dir": str(tmp_path / "tfds"),
                           "batch_size": 4, "image_size": 32})
  source, info = sources.get_data_source(config.data)
  keys = {source[i]["key"].decode() for i in range(len(source))}
  assert keys == good
  assert info.build_counts == {"skipped": skipped, "converted": converted}
  captions = {source[i]["key"].decode(): source[i]["caption"].decode() for i in range(len(source))}
  assert captions["latin1.png"] == "café au lait"
  for i in range(len(source)):  # stored bytes are the original file, untouched
    assert source[i]["image"] == files[source[i]["key"].decode()][0]

  # The pipeline reads every good example and reports the build's skips with its own.
  data = pipeline_lib.make_pipeline(config)
  seen = set()
  while len(seen) < len(good):
    batch = next(data)
    assert batch["image"].shape == (4, 32, 32, 3) and batch["image"].dtype == np.uint8
    seen.update(int(i) for i in batch["index"])
  assert seen == set(range(len(good)))
  assert data.skip_counts() == skipped
  # Captions were converted to UTF-8 once, at the build; images are converted on every read.
  assert set(data.convert_counts()) == set(converted) - {"non_utf8_caption"}
  # RGBA is composited on black: a fully transparent pixel is black.
  rgba_index = next(i for i in range(len(source)) if source[i]["key"] == b"rgba.png")
  rgba = np.asarray(Image.open(io.BytesIO(files["rgba.png"][0])))
  decoded, kind = preprocess.decode_image(source[rgba_index]["image"])
  assert kind == "rgba"
  np.testing.assert_array_equal(decoded, np.round(rgba[..., :3] * (rgba[..., 3:] / 255.0)))


def test_runtime_min_resolution_filter_counts_too_small(tmp_path):
  root = tmp_path / "images"
  root.mkdir()
  for i, size in enumerate((16, 16, 64, 64, 64, 64)):
    Image.new("RGB", (size, size), (i, 0, 0)).save(root / f"{i}.png")
    (root / f"{i}.txt").write_text(f"image {i}")
  config = stage_config(**{"data.source": f"folder:{root}", "data.data_dir": str(tmp_path / "t"),
                           "data.min_resolution": 32, "batch_size": 4})
  data = pipeline_lib.make_pipeline(config)
  indices = np.concatenate([next(data)["index"] for _ in range(4)])
  assert set(indices.tolist()) == {2, 3, 4, 5}
  assert data.skip_counts()["too_small"] >= 2


# --- webdataset, captions.jsonl / .csv, tfds:NAME -------------------------------------------

def sample_images(n, seed=0):
  """Smooth images (JPEG keeps them close) of different sizes."""
  rng = np.random.default_rng(seed)
  images = []
  for i in range(n):
    y, x = np.mgrid[:40 + i, :48]
    phase = rng.uniform(0, 6, 3)
    images.append((127.5 + 120 * np.sin(x[..., None] / 9 + y[..., None] / 13 + phase)
                   ).astype(np.uint8))
  return images


def test_webdataset_shards_build_and_read_back(tmp_path):
  images = sample_images(7)
  shard_dir = tmp_path / "shards"
  shard_dir.mkdir()
  expected = {}
  for shard in range(2):
    with tarfile.open(shard_dir / f"{shard:05d}.tar", "w") as tar:
      for j in range(shard * 4, min(shard * 4 + 4, 7)):
        key = f"{j:09d}"
        members = {f"{key}.png": encode(Image.fromarray(images[j]), "PNG"),
                   f"{key}.txt": f"caption number {j}".encode(),
                   f"{key}.json": b"{}"}
        for name, data in members.items():
          info = tarfile.TarInfo(name)
          info.size = len(data)
          tar.addfile(info, io.BytesIO(data))
        expected[f"{shard:05d}.tar/{key}"] = (images[j], f"caption number {j}")
  with tarfile.open(shard_dir / "00002.tar", "w") as tar:  # a sample without its caption
    info = tarfile.TarInfo("lonely.jpg")
    data = encode(Image.fromarray(images[0]), "JPEG")
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))
  assert builders.expand_pattern(str(shard_dir / "{00000..00002}.tar")) == \
      builders.expand_pattern(str(shard_dir / "*.tar"))
  config = data_config("wds:" + str(shard_dir / "{00000..00002}.tar"), str(tmp_path / "tfds"))
  source, info = sources.get_data_source(config)
  assert len(source) == 7
  assert info.build_counts["skipped"] == {"missing_caption": 1}
  for i in range(len(source)):
    record = source[i]
    image, caption = expected[record["key"].decode()]
    np.testing.assert_array_equal(preprocess.decode_image(record["image"])[0], image)
    assert record["caption"].decode() == caption
  assert sources.get_captions(config)[0] == "caption number 0"


@pytest.mark.parametrize("table", ["captions.jsonl", "captions.csv"])
def test_caption_table_folder_builds_and_reads_back(tmp_path, table):
  images = sample_images(5)
  root = tmp_path / "photos"
  (root / "a").mkdir(parents=True)
  rows = []
  for i, image in enumerate(images):
    name = f"a/{i}.jpg" if i % 2 else f"{i}.png"
    Image.fromarray(image).save(root / name, quality=95)
    rows.append({"file": name, "caption": f"photo, number {i} \"quoted\""})
  rows.append({"file": "missing.png", "caption": "no such file"})
  if table.endswith(".jsonl"):
    (root / table).write_text("\n".join(json.dumps(r) for r in rows) + "\n")
  else:
    import csv  # pylint: disable=g-import-not-at-top
    with open(root / table, "w", newline="") as f:
      writer = csv.DictWriter(f, ["file", "caption"])
      writer.writeheader()
      writer.writerows(rows)
  Image.fromarray(images[0]).save(root / "unlisted.png")
  source, info = sources.get_data_source(data_config(f"folder:{root}", str(tmp_path / "t")))
  assert info.build_counts["skipped"] == {"missing_image": 1, "missing_caption": 1}
  got = {source[i]["key"].decode(): source[i] for i in range(len(source))}
  assert set(got) == {r["file"] for r in rows[:-1]}
  for i, row in enumerate(rows[:-1]):
    record = got[row["file"]]
    assert record["caption"].decode() == row["caption"]
    decoded = preprocess.decode_image(record["image"])[0]
    if row["file"].endswith(".png"):
      np.testing.assert_array_equal(decoded, images[i])
    else:
      assert np.abs(decoded.astype(int) - images[i]).mean() < 4  # JPEG


class TinyCaptionsForTest(builders.LocalBuilder):
  """A coco_captions-like TFDS dataset: an Image feature and a sequence of captions."""
  VERSION = tfds.core.Version("1.0.0")

  def _info(self):
    return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict({
        "image": tfds.features.Image(encoding_format="png"),
        "captions": tfds.features.Sequence({"text": tfds.features.Text()})}))

  def _split_generators(self, dl_manager):
    return {"train": self._generate_examples()}

  def _generate_examples(self):
    for i, image in enumerate(sample_images(6)):
      captions = [{"text": ""}, {"text": f"first caption {i}"}, {"text": f"second caption {i}"}]
      yield i, {"image": encode(Image.fromarray(image), "PNG"), "captions": captions}


def test_tfds_source_with_nested_captions(tmp_path):
  data_dir = str(tmp_path)
  with pytest.raises(sources.SourceError, match="not prepared"):
    sources.get_data_source(data_config("tfds:tiny_captions_for_test", data_dir))
  TinyCaptionsForTest(data_dir=data_dir, file_format="array_record").download_and_prepare()
  with pytest.raises(sources.SourceError, match="no feature 'caption'"):
    sources.get_data_source(data_config("tfds:tiny_captions_for_test", data_dir))
  config = stage_config(**{"data.source": "tfds:tiny_captions_for_test", "data.data_dir": data_dir,
                           "data.caption_key": "captions/text", "batch_size": 6})
  source, info = sources.get_data_source(config.data)
  assert isinstance(source[0]["image"], bytes)  # left encoded for the pipeline
  captions = sources.CaptionSource(source, info)
  assert all(captions[i].startswith("first caption") for i in range(6))
  seen = []
  data = pipeline_lib.make_pipeline(config, tokenize_fn=lambda caps: (seen.extend(caps) or
                                                                        fake_tokenize(caps)))
  for _ in range(6):
    next(data)
  assert {c.split()[0] for c in seen} == {"first", "second"}  # a random usable caption each time
  assert data.skip_counts() == {}


# --- the pipeline -----------------------------------------------------------------------------

def fake_tokenize(captions, length=16):
  ids = np.zeros((len(captions), length), np.int32)
  for i, caption in enumerate(captions):
    codes = np.frombuffer(caption.encode()[:length], np.uint8)
    ids[i, :len(codes)] = codes
  return ids, ids > 0


@pytest.mark.parametrize("stage,overrides", [
    ("base64", {}),
    ("sr1024", {"data.random_crop": True}),
])
def test_resume_yields_exactly_the_next_batches(shapes_dir, stage, overrides):
  # 12 batches of 16 from 200 examples: the run crosses an epoch boundary.
  config = stage_config(stage, **{"data.data_dir": shapes_dir, **overrides})
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


def test_restoring_into_another_layout_is_refused(shapes_dir):
  config = stage_config(**{"data.data_dir": shapes_dir})
  state = pipeline_lib.make_pipeline(config).get_state()
  other = pipeline_lib.make_pipeline(config, process_index=1, process_count=2)
  with pytest.raises(ValueError, match="process_count"):
    other.set_state(state)


def test_epoch_order_is_a_permutation_that_changes_each_epoch(shapes_dir):
  config = stage_config(**{"data.data_dir": shapes_dir, "batch_size": 20})
  data = pipeline_lib.make_pipeline(config)
  epochs = [np.concatenate([next(data)["index"] for _ in range(10)]) for _ in range(2)]
  for order in epochs:
    assert sorted(order.tolist()) == list(range(SMALL["train"]))
  assert not np.array_equal(epochs[0], epochs[1])
  assert not np.array_equal(epochs[0], np.arange(SMALL["train"]))


def test_two_processes_shards_are_disjoint_and_cover_the_epoch(shapes_dir):
  config = stage_config(**{"data.data_dir": shapes_dir, "batch_size": 20})  # local batch 10
  shards = []
  for process in range(2):
    data = pipeline_lib.make_pipeline(config, process_index=process, process_count=2)
    assert data.local_batch_size == 10
    shards.append(np.concatenate([next(data)["index"] for _ in range(10)]))  # 100 each
  assert not set(shards[0]) & set(shards[1])
  assert set(shards[0]) | set(shards[1]) == set(range(SMALL["train"]))


def test_batch_contents_match_the_source_records(shapes_dir):
  config = stage_config(**{"data.data_dir": shapes_dir, "image_size": 64})
  data = pipeline_lib.make_pipeline(config, tokenize_fn=fake_tokenize)
  batch = next(data)
  source, _ = sources.get_data_source(config.data)
  for image, index, tokens in zip(batch["image"], batch["index"], batch["tokens"]):
    record = source[int(index)]
    np.testing.assert_array_equal(image, preprocess.decode_image(record["image"])[0])
    np.testing.assert_array_equal(tokens, fake_tokenize([record["caption"].decode()])[0][0])
    assert data.caption(int(index)) == record["caption"].decode()


@pytest.mark.parametrize("stage,image,low", [("sr256", 32, 16), ("sr1024", 32, 8)])
def test_sr_lowres_is_the_downsampled_highres(shapes_dir, stage, image, low):
  config = stage_config(stage, **{"data.data_dir": shapes_dir})
  batch = next(pipeline_lib.make_pipeline(config))
  assert batch["image"].shape == (16, image, image, 3)
  assert batch["lowres"].shape == (16, low, low, 3)
  factor = image // low
  for high, lowres in zip(batch["image"], batch["lowres"]):
    np.testing.assert_array_equal(lowres, preprocess.downsample(high, low))
    # And independently of our resize: close to the block average of the high-res crop.
    pooled = high.reshape(low, factor, low, factor, 3).astype(float).mean(axis=(1, 3))
    assert np.abs(pooled - lowres).mean() < 12


def test_sr1024_crops_are_random_pieces_of_the_full_image(shapes_dir):
  config = stage_config("sr1024", **{"data.data_dir": shapes_dir})  # 64 images, 32 crops
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


def test_embedding_cache_lookup_missing_is_an_error_naming_the_key_or_a_counted_skip(shapes_dir):
  missing = {3, 5, 8, 13, 21, 34, 55, 89, 144}

  def lookup(index):
    if index in missing:
      raise KeyError(index)
    return np.full((16, 8), index, np.float16), np.arange(16) < 5

  config = stage_config(**{"data.data_dir": shapes_dir, "data.embed_cache": "/cache/demo",
                           "batch_size": 50})
  with pytest.raises(pipeline_lib.MissingEmbeddingError, match=r"/cache/demo.*key (\d+)"):
    for _ in range(4):
      next(pipeline_lib.make_pipeline(config, embedding_lookup=lookup))
  config.data.missing_embedding = "skip"
  data = pipeline_lib.make_pipeline(config, embedding_lookup=lookup, tokenize_fn=fake_tokenize)
  batches = [next(data) for _ in range(4)]  # 200 examples: the first epoch's 191 and more
  for batch in batches:
    assert "tokens" not in batch
    assert batch["text_emb"].dtype == np.float32 and batch["text_emb"].shape == (50, 16, 8)
    np.testing.assert_array_equal(batch["text_emb"][:, 0, 0], batch["index"])
    assert not set(batch["index"].tolist()) & missing
  assert data.skip_counts()["missing_embedding"] >= len(missing)
  with pytest.raises(ValueError, match="no embedding_lookup"):
    pipeline_lib.make_pipeline(config)


def test_global_batch_is_sharded_over_data_and_fsdp(shapes_dir):
  config = stage_config("sr256", **{"data.data_dir": shapes_dir, "mesh.data": 2, "mesh.fsdp": 4})
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


def test_worker_processes_give_the_same_batches_and_resume(shapes_dir):
  config = stage_config(**{"data.data_dir": shapes_dir})
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


def test_data_sources_pickle_for_worker_processes(tmp_path, shapes_dir):
  import pickle  # pylint: disable=g-import-not-at-top
  root = tmp_path / "images"
  root.mkdir()
  Image.fromarray(sample_images(1)[0]).save(root / "a.png")
  (root / "a.txt").write_text("a caption")
  for config in (data_config(f"folder:{root}", str(tmp_path / "t")),
                 data_config("shapes", shapes_dir)):
    source, _ = sources.get_data_source(config)
    copy = pickle.loads(pickle.dumps(source))
    assert copy[0]["image"] == source[0]["image"]


def test_data_with_no_usable_example_stops_with_the_counts_instead_of_looping(tmp_path):
  root = tmp_path / "images"
  root.mkdir()
  for i in range(3):
    Image.new("RGB", (16, 16)).save(root / f"{i}.png")
    (root / f"{i}.txt").write_text("small")
  config = stage_config(**{"data.source": f"folder:{root}", "data.data_dir": str(tmp_path / "t"),
                           "data.min_resolution": 64, "batch_size": 2})
  with pytest.raises(RuntimeError, match="too_small"):
    next(pipeline_lib.make_pipeline(config))
