"""Data sources: source strings, folders with bad input, webdataset shards, caption tables,
tfds:NAME, and sources in worker processes."""

import io
import json
import os
import struct
import tarfile
import zlib

import numpy as np
import pytest
from PIL import Image
import tensorflow_datasets as tfds

from helpers import data_config, fake_tokenize, stage_config  # pylint: disable=g-bad-import-order
from imagen_jax.data import builders
from imagen_jax.data import pipeline as pipeline_lib
from imagen_jax.data import preprocess
from imagen_jax.data import sources


# --- source strings -------------------------------------------------------------------------

@pytest.mark.parametrize("source", ["shape", "shapes:128", "tfds:", "tfds:a:b:c", "folder:",
                                    "wds", "s3:bucket", ""])
def test_malformed_source_strings_are_named(source, tmp_path):
  with pytest.raises(sources.SourceError, match="config.data.source=" + repr(source)):
    sources.get_data_source(data_config(source, str(tmp_path)))


def test_missing_folder_tfds_and_split_errors_name_the_source(tmp_path, shapes_data_dir):
  with pytest.raises(sources.SourceError, match="no such directory"):
    sources.get_data_source(data_config(f"folder:{tmp_path}/nope", str(tmp_path)))
  with pytest.raises(sources.SourceError, match="tfds:no_such_dataset_xyz"):
    sources.get_data_source(data_config("tfds:no_such_dataset_xyz", str(tmp_path)))
  with pytest.raises(sources.SourceError, match="has no split 'test'"):
    sources.get_data_source(data_config("shapes", shapes_data_dir), "test")


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
  del info
  captions = sources.get_captions(config.data)
  assert all(captions[i].startswith("first caption") for i in range(6))
  assert [captions.key(i) for i in (0, 5)] == ["train[0]", "train[5]"]
  seen = []
  data = pipeline_lib.make_pipeline(config, tokenize_fn=lambda caps: (seen.extend(caps) or
                                                                        fake_tokenize(caps)))
  for _ in range(6):
    next(data)
  assert {c.split()[0] for c in seen} == {"first", "second"}  # a random usable caption each time
  assert data.skip_counts() == {}


def test_data_sources_pickle_for_worker_processes(tmp_path, shapes_data_dir):
  import pickle  # pylint: disable=g-import-not-at-top
  root = tmp_path / "images"
  root.mkdir()
  Image.fromarray(sample_images(1)[0]).save(root / "a.png")
  (root / "a.txt").write_text("a caption")
  for config in (data_config(f"folder:{root}", str(tmp_path / "t")),
                 data_config("shapes", shapes_data_dir)):
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
