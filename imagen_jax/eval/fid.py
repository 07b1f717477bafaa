"""FID: Inception statistics of samples and of a data source, and the Frechet distance.

    imagen-jax eval --metric=fid-stats --source=tfds:coco_captions --split=validation \
        --image_size=256 --num_images=30000 --inception_weights=fid_inception.npz \
        --output=coco256.npz
    imagen-jax eval --metric=fid --samples=OUT --reference=coco256.npz \
        --inception_weights=fid_inception.npz

Statistics files are .npz with `mu` [2048] and `sigma` [2048, 2048] (pytorch-fid's keys, so its
files work here and ours there) plus a JSON `metadata` string (source, split, image size, count).
Reference images go through the training pipeline's resize (shorter side to --image_size,
bicubic with antialiasing, centre crop), so the reference is the data at the stage's resolution.
"""

from __future__ import annotations

import collections
import io
import json
from typing import Any, Iterator

from absl import logging
import numpy as np

from imagen_jax.core import fileio
from imagen_jax.data import preprocess
from imagen_jax.eval import inception
from imagen_jax.sample import outdir as outdir_lib


def frechet_distance(mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray,
                     sigma2: np.ndarray) -> float:
  """d^2 = |mu1 - mu2|^2 + Tr(S1 + S2 - 2 (S1 S2)^(1/2)) for mu [D], sigma [D, D].

  Tr((S1 S2)^(1/2)) is computed as Tr((A S2 A)^(1/2)) with A = S1^(1/2): the same eigenvalues,
  but A S2 A is symmetric positive semi-definite, so both square roots come from `eigh`, with
  no complex round-off and no failure on singular covariances (fewer images than dimensions),
  where scipy's sqrtm of the non-symmetric S1 S2 needs pytorch-fid's eps-offset retry.
  """
  mu1, mu2 = np.atleast_1d(np.asarray(mu1, np.float64)), np.atleast_1d(np.asarray(mu2, np.float64))
  sigma1 = np.atleast_2d(np.asarray(sigma1, np.float64))
  sigma2 = np.atleast_2d(np.asarray(sigma2, np.float64))
  if mu1.shape != mu2.shape or sigma1.shape != sigma2.shape or sigma1.shape != mu1.shape * 2:
    raise ValueError(f"statistics do not match: mu {mu1.shape} vs {mu2.shape}, sigma "
                     f"{sigma1.shape} vs {sigma2.shape}")
  sqrt1 = _psd_sqrt((sigma1 + sigma1.T) / 2)
  inner = sqrt1 @ ((sigma2 + sigma2.T) / 2) @ sqrt1
  eigenvalues = np.linalg.eigvalsh((inner + inner.T) / 2)
  tr_covmean = np.sum(np.sqrt(np.clip(eigenvalues, 0, None)))
  diff = mu1 - mu2
  distance = diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2 * tr_covmean
  # Round-off can leave a tiny negative value for (nearly) identical statistics.
  return float(max(distance, 0.0))


def _psd_sqrt(matrix: np.ndarray) -> np.ndarray:
  """The symmetric square root of a symmetric PSD [D, D] matrix (round-off negatives -> 0)."""
  eigenvalues, vectors = np.linalg.eigh(matrix)
  return (vectors * np.sqrt(np.clip(eigenvalues, 0, None))) @ vectors.T


def statistics(features: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """float [N, D] -> (mean float64 [D], covariance float64 [D, D], unbiased like pytorch-fid)."""
  features = np.asarray(features, np.float64)
  if features.ndim != 2 or len(features) < 2:
    raise ValueError(f"need features [N >= 2, D] for a covariance, got {features.shape}")
  return features.mean(axis=0), np.cov(features, rowvar=False)


def save_statistics(path: str, mu: np.ndarray, sigma: np.ndarray, **metadata: Any) -> None:
  buffer = io.BytesIO()
  np.savez(buffer, mu=mu, sigma=sigma, metadata=json.dumps(metadata, sort_keys=True))
  fileio.write_bytes(path, buffer.getvalue())


def load_statistics(path: str) -> tuple[np.ndarray, np.ndarray, dict[str, Any]]:
  """(mu, sigma, metadata) of a statistics .npz (ours, or pytorch-fid's without metadata)."""
  if not fileio.exists(path):
    raise FileNotFoundError(f"reference statistics {path!r} not found: make them with "
                            "`imagen-jax eval --metric=fid-stats ... --output=STATS.npz`")
  with np.load(io.BytesIO(fileio.read_bytes(path))) as npz:
    if "mu" not in npz.files or "sigma" not in npz.files:
      raise ValueError(f"{path} is not a statistics file: it has {npz.files}, not mu and sigma")
    metadata = json.loads(str(npz["metadata"])) if "metadata" in npz.files else {}
    return npz["mu"], npz["sigma"], metadata


def sample_images(samples_dir: str) -> tuple[int, Iterator[np.ndarray]]:
  """(count, uint8 [H, W, 3] images) of an `imagen-jax sample` outdir, read one at a time."""
  records = outdir_lib.read_records(samples_dir)
  return len(records), (outdir_lib.read_image(samples_dir, r) for r in records)


def source_images(source: str, split: str, image_size: int, *, data_dir: str = "",
                  num_images: int = 0, image_key: str = "image", seed: int = 0,
                  skipped: collections.Counter | None = None) -> tuple[int, Iterator[np.ndarray]]:
  """(count, uint8 [image_size, image_size, 3] images) of a data source's split.

  `source` is a `config.data.source` string (shapes, tfds:NAME, folder:PATH, wds:PATTERN);
  `num_images` > 0 takes a random subset (by `seed`). Undecodable images are skipped and
  counted by kind in `skipped`, as the training pipeline does.
  """
  from imagen_jax.data import sources  # pylint: disable=g-import-not-at-top  # heavy: tfds, only for a data source's reference statistics
  # FID reads images only: the caption check of get_data_source is pointed at the image
  # feature, so that sources whose captions live elsewhere (coco: captions/text) need no flag.
  data_config = sources.source_config(source, split, data_dir, image_key=image_key,
                                      caption_key=image_key)
  source_data, info = sources.get_data_source(data_config, split)
  indices = np.arange(len(source_data))
  if 0 < num_images < len(indices):
    indices = np.sort(np.random.default_rng(seed).choice(indices, num_images, replace=False))
  elif num_images > len(indices):
    logging.warning("%s split %s has %d images, fewer than --num_images=%d", source, split,
                    len(indices), num_images)
  skipped = skipped if skipped is not None else collections.Counter()

  def images():
    for index in indices:
      value = sources.lookup(source_data[int(index)], info.image_key)
      try:
        image, _ = preprocess.image_to_rgb(value)
      except preprocess.BadInput as e:
        skipped[e.kind] += 1
        continue
      yield preprocess.resize_and_crop(image, image_size)
  return len(indices), images()


def _checked_same_size(images: Iterator[np.ndarray], sizes: set) -> Iterator[np.ndarray]:
  for image in images:
    sizes.add(image.shape[:2])
    if len(sizes) > 1:
      raise ValueError(f"samples of different sizes {sorted(sizes)}: FID compares one resolution")
    yield image


def compute_fid(samples_dir: str, reference: str, extractor: inception.FeatureExtractor
                ) -> dict[str, Any]:
  """FID of an `imagen-jax sample` outdir against a statistics file, with what it compared."""
  ref_mu, ref_sigma, ref_meta = load_statistics(reference)
  count, images = sample_images(samples_dir)
  sizes: set = set()
  features = extractor.features_of(_checked_same_size(images, sizes))
  mu, sigma = statistics(features)
  (height, width), = sizes
  ref_size = ref_meta.get("image_size")
  if ref_size and ref_size != height:
    logging.warning("samples are %dx%d but the reference statistics were made at %dx%d: the "
                    "FID mixes in the resolution gap", height, width, ref_size, ref_size)
  if count < 10_000:
    logging.warning("FID of %d samples is biased upwards (papers use 10k-50k)", count)
  return {"fid": frechet_distance(mu, sigma, ref_mu, ref_sigma), "num_samples": count,
          "sample_size": height, "samples": samples_dir, "reference": reference,
          **{f"reference_{k}": v for k, v in ref_meta.items()}}


def compute_reference(source: str, split: str, image_size: int, output: str,
                      extractor: inception.FeatureExtractor, **kwargs: Any) -> dict[str, Any]:
  """Writes the statistics of a data source's split to `output`; returns its metadata."""
  skipped: collections.Counter = collections.Counter()
  _, images = source_images(source, split, image_size, skipped=skipped, **kwargs)
  features = extractor.features_of(images)
  mu, sigma = statistics(features)
  metadata = {"source": source, "split": split, "image_size": image_size,
              "num_images": len(features), "skipped": dict(skipped)}
  save_statistics(output, mu, sigma, **metadata)
  return {"output": output, **metadata}
