"""`imagen-jax eval`: score samples written by `imagen-jax sample` (OUT/samples.jsonl + PNGs).

    imagen-jax eval --metric=shapes --samples=OUT
    imagen-jax eval --metric=fid-stats --source=tfds:coco_captions --split=validation \
        --image_size=256 --num_images=30000 --inception_weights=W --output=STATS.npz
    imagen-jax eval --metric=fid --samples=OUT --reference=STATS.npz --inception_weights=W
    imagen-jax eval --metric=drawbench --stages=BASE,SR1,SR2 --prompts_csv=DrawBench.csv \
        --outdir=OUT
    imagen-jax eval --metric=drawbench --compare=OUT_A,OUT_B --output=rate.html
    imagen-jax eval --metric=drawbench-tally --ratings=r1.json,r2.json [--page=rate.html]

W is pytorch-fid's `pt_inception-2015-12-05-6726825d.pth` or its .npz export (see
`imagen_jax.eval.inception`); nothing downloads. Scores print as JSON (and go to --output).
"""

from __future__ import annotations

import json
from typing import Any, Sequence

from absl import flags
from absl import logging

from imagen_jax.commands import shared_flags
from imagen_jax.core import config_lib
from imagen_jax.core import fileio
from imagen_jax.eval import drawbench
from imagen_jax.eval import fid
from imagen_jax.eval import inception
from imagen_jax.eval import shapes
from imagen_jax.sample import outdir as outdir_lib

METRICS = ["shapes", "fid", "fid-stats", "drawbench", "drawbench-tally"]

# DrawBench samples with `imagen-jax sample`'s flags (--stages, --outdir, --steps, ...).
shared_flags.use(*shared_flags.SAMPLING)
_METRIC = flags.DEFINE_enum("metric", "shapes", METRICS, "What to compute.")
_SAMPLES = config_lib.DEFINE_path("samples", None, "Directory with samples.jsonl and its images.")
_OUTPUT = config_lib.DEFINE_path(
    "output", None, "Also write the scores as JSON to this file (fid-stats: the statistics "
    ".npz; drawbench --compare: the HTML page).")
# FID.
_REFERENCE = config_lib.DEFINE_path("reference", None, "fid: reference statistics .npz.")
_INCEPTION_WEIGHTS = config_lib.DEFINE_path(
    "inception_weights", None, "fid, fid-stats: pytorch-fid's FID Inception weights "
    "(pt_inception-2015-12-05-6726825d.pth, or its .npz export).")
_INCEPTION_BATCH = flags.DEFINE_integer("inception_batch_size", 50, "Images per Inception call.")
_SOURCE = config_lib.DEFINE_path(
    "source", None, "fid-stats: data source (shapes, tfds:NAME[:CONFIG], folder:PATH, "
    "wds:PATTERN), as config.data.source.", resolve=fileio.resolve_spec)
_SPLIT = flags.DEFINE_string("split", "validation", "fid-stats: the source's split.")
_DATA_DIR = config_lib.DEFINE_path("data_dir", "",
                                   "fid-stats: TFDS data_dir ('' : TFDS's default).")
_IMAGE_KEY = flags.DEFINE_string("image_key", "image", "fid-stats: image feature (tfds: sources).")
_NUM_IMAGES = flags.DEFINE_integer("num_images", 0, "fid-stats: a random subset of this many "
                                   "images (by --seed); 0: all.")
_IMAGE_SIZE = flags.DEFINE_integer("image_size", 0, "fid-stats: resize (shorter side) and "
                                   "centre-crop the references to this size: the samples' size.")
# DrawBench.
_PROMPTS_CSV = config_lib.DEFINE_path("prompts_csv", None, "drawbench: the DrawBench CSV "
                                   "(columns Prompts, Category).")
_COMPARE = config_lib.DEFINE_path_list("compare", None, "drawbench: OUT_A,OUT_B: write a rating page "
                             "(--output) instead of sampling.")
_LABELS = flags.DEFINE_list("labels", None, "drawbench --compare: the two models' names "
                            "(default: the outdirs' names).")
_PAGE_IMAGE_SIZE = flags.DEFINE_integer("page_image_size", 0, "drawbench --compare: shrink the "
                                        "embedded images to this size (0: as sampled).")
_RATINGS = config_lib.DEFINE_path_list("ratings", None, "drawbench-tally: ratings JSON files.")
_PAGE = config_lib.DEFINE_path("page", None, "drawbench-tally: the rating page, whose embedded "
                            "side mapping is then used (default: the one in the ratings).")


def _require(**values: Any) -> None:
  missing = [f"--{name}" for name, value in values.items() if not value]
  if missing:
    raise flags.ValidationError(f"--metric={_METRIC.value} needs {', '.join(missing)}")


def _extractor():
  return inception.FeatureExtractor(inception.load_weights(_INCEPTION_WEIGHTS.value),
                                    batch_size=_INCEPTION_BATCH.value)


def fid_main() -> dict[str, Any]:
  if _METRIC.value == "fid":
    _require(samples=_SAMPLES.value, reference=_REFERENCE.value,
             inception_weights=_INCEPTION_WEIGHTS.value)
    return fid.compute_fid(_SAMPLES.value, _REFERENCE.value, _extractor())
  _require(source=_SOURCE.value, image_size=_IMAGE_SIZE.value, output=_OUTPUT.value,
           inception_weights=_INCEPTION_WEIGHTS.value)
  return fid.compute_reference(_SOURCE.value, _SPLIT.value, _IMAGE_SIZE.value, _OUTPUT.value,
                               _extractor(), data_dir=_DATA_DIR.value,
                               num_images=_NUM_IMAGES.value, image_key=_IMAGE_KEY.value,
                               seed=shared_flags.SEED.value)


def drawbench_main() -> dict[str, Any]:
  if _METRIC.value == "drawbench-tally":
    _require(ratings=_RATINGS.value)
    return drawbench.tally(_RATINGS.value, page=_PAGE.value)
  if _COMPARE.value:
    _require(output=_OUTPUT.value)
    if len(_COMPARE.value) != 2:
      raise flags.ValidationError(f"--compare takes OUT_A,OUT_B, got {_COMPARE.value}")
    metadata = drawbench.write_page(*_COMPARE.value, _OUTPUT.value, seed=shared_flags.SEED.value,
                                    labels=_LABELS.value, image_size=_PAGE_IMAGE_SIZE.value)
    return {"page": _OUTPUT.value, "page_id": metadata["page_id"],
            "prompts": len(metadata["items"]), "models": metadata["models"]}
  stages, outdir = shared_flags.STAGES.value, shared_flags.OUTDIR.value
  _require(stages=stages, prompts_csv=_PROMPTS_CSV.value, outdir=outdir)
  prompts = drawbench.read_csv(_PROMPTS_CSV.value)
  for note in drawbench.differences_from_paper(prompts):
    logging.warning("%s: %s", _PROMPTS_CSV.value, note)
  num_samples = (shared_flags.NUM_SAMPLES.value if flags.FLAGS["num_samples"].present
                 else drawbench.SAMPLES_PER_PROMPT)
  cascade, settings = outdir_lib.load_cascade(stages, **shared_flags.sampling_options())
  records = drawbench.sample_prompts(cascade, prompts, outdir, settings=settings,
                             num_samples=num_samples, seed=shared_flags.SEED.value,
                             batch_size=shared_flags.BATCH_SIZE.value)
  return {"outdir": outdir, "prompts": len(prompts), "images": len(records),
          "samples_per_prompt": num_samples}


def main(argv: Sequence[str]) -> None:
  del argv
  if _METRIC.value == "shapes":
    if not _SAMPLES.value:
      raise flags.ValidationError("--samples is required")
    scores: dict[str, Any] = shapes.score_outdir(_SAMPLES.value)
  elif _METRIC.value in ("fid", "fid-stats"):
    scores = fid_main()
  else:
    scores = drawbench_main()
  text = json.dumps(scores, indent=2, sort_keys=True)
  print(text)
  # fid-stats and the rating page write --output themselves.
  if _OUTPUT.value and not (_METRIC.value == "fid-stats" or _COMPARE.value):
    fileio.write_text(_OUTPUT.value, text + "\n")
