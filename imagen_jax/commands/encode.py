"""`imagen-jax encode`: precompute T5 caption embeddings into a cache; verify it; convert weights.

    # once: T5 weights (Hugging Face or t5x directory) -> Orbax, for fast sharded loading
    imagen-jax encode --convert=/ckpt/t5-v1_1-xxl --convert_to=gs://b/t5-v1_1-xxl-orbax
    # encode a split (rerunning the same command resumes; every host runs it on a pod)
    imagen-jax encode --config=configs/encode.py:xxl --config.text.encoder=gs://b/t5-v1_1-xxl-orbax \
        --config.source=tfds:coco_captions --config.output=gs://b/cache/coco-train
    # check that every part is there
    imagen-jax encode --config=configs/encode.py:xxl --config.output=gs://b/cache/coco-train --verify

config.source is any data source (shapes, tfds:NAME, folder:PATH, wds:PATTERN) or text:FILE;
the library: imagen_jax/text/encode_job.py.
"""

from __future__ import annotations

import json
import sys
from typing import Sequence

from absl import flags

from imagen_jax.commands import shared_flags
from imagen_jax.core import config_lib
from imagen_jax.text import cache as cache_lib
from imagen_jax.text import encode_job

shared_flags.use("config", *shared_flags.DISTRIBUTED)
_VERIFY = flags.DEFINE_bool("verify", False, "Check that the cache at config.output is complete.")
_CONVERT = config_lib.DEFINE_path("convert", None, "Convert the T5 weights in this Hugging Face or "
                                  "t5x directory to an Orbax checkpoint (with --convert_to).")
_CONVERT_TO = config_lib.DEFINE_path("convert_to", None, "Output directory of --convert.")
_CONVERT_DTYPE = flags.DEFINE_enum("convert_dtype", "float32", ["float32", "bfloat16"],
                                   "Parameter dtype written by --convert.")


def main(argv: Sequence[str]) -> None:
  if len(argv) > 1:
    raise SystemExit(f"imagen-jax encode: unexpected arguments {list(argv[1:])}")
  if _CONVERT.value:
    if not _CONVERT_TO.value:
      raise SystemExit("imagen-jax encode: --convert needs --convert_to=DIR")
    summary = encode_job.convert(_CONVERT.value, _CONVERT_TO.value, _CONVERT_DTYPE.value)
    print("CONVERT_SUMMARY " + json.dumps(summary))
    return
  config = shared_flags.CONFIG.value
  if config is None:
    raise SystemExit("imagen-jax encode: --config is required (e.g. configs/encode.py:xxl)")
  if _VERIFY.value:
    if not config.output:
      raise SystemExit("imagen-jax encode --verify: set --config.output to the cache directory")
    report = cache_lib.verify(config.output, checksums=config.verify_checksums)
    print(report.summary())
    sys.exit(0 if report.ok else 1)
  shared_flags.initialize_distributed(force=bool(config.distributed))  # before any device
  stats = encode_job.run(config)
  print(f"encoded {stats['captions']} captions in {stats['seconds']:.1f}s "
        f"({stats['captions_per_s']:.1f} captions/s), {stats['bytes_per_caption']:.0f} bytes "
        f"per caption ({stats['tokens_per_caption']:.1f} tokens), {stats['truncated']} "
        f"truncated, {stats['skipped_parts']} parts already done")
  print("ENCODE_SUMMARY " + json.dumps(stats))
