"""`imagen-jax encode`: T5 embeddings of a caption split, written once to a cache.

Variants: `xxl` (the default: T5 v1.1 XXL, bf16, parameters FSDP-sharded over every device and
the batch split the same way), `tiny` (builtin:shapes-tiny, for the demo and tests).

    imagen-jax encode --config=configs/encode.py:xxl --config.text.encoder=gs://b/t5-v1_1-xxl \
        --config.source=tfds:coco_captions --config.split=train --config.output=gs://b/cache/coco
    imagen-jax encode --config=configs/encode.py:xxl --config.output=gs://b/cache/coco --verify
"""

import ml_collections


def get_config(variant: str = "xxl") -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.text = ml_collections.ConfigDict()
  # A Hugging Face / t5x / converted directory (local or gs://), or builtin:shapes-tiny.
  c.text.encoder = "t5-v1_1-xxl"
  c.text.max_length = 128
  c.text.output_layer = -1      # as the stage configs' text.output_layer (configs/common.py)
  c.dtype = "bfloat16"          # compute dtype (parameters are held in it too)

  # Captions: any data source (shapes, tfds:NAME[:CONFIG], folder:PATH, wds:PATTERN; read as
  # training reads it, data/sources.py) or "text:PATH" (one caption per line, local or gs://).
  # The cache index of an example is its position in the source: the pipeline's example index,
  # or the 0-based line number.
  c.source = "tfds:coco_captions"
  c.split = "train"
  c.data_dir = ""               # TFDS data_dir ("": TFDS's default)
  # Feature path of the caption (tfds: sources); "/" descends into nested features. Several
  # captions per example (coco: captions/text): the first usable one, as training's default.
  c.caption_key = "caption"
  c.key_feature = ""            # feature stored as the example's key ("": "<split>[<index>]")

  c.output = ""                 # cache directory, local or gs:// (required)
  c.storage_dtype = "bfloat16"  # on disk: "bfloat16" (half the bytes) or "float32"
  c.batch_size = 512            # global captions per encoder step
  c.part_size = 4096            # examples per part: the unit of resumption and of each write
  c.verify_checksums = False    # --verify also reads every byte and checks crc32

  # ('data', 'fsdp', 'model') sizes, -1 fills the rest. Batches split over data x fsdp;
  # parameters over fsdp (d_model) and model (heads, d_ff, vocab).
  c.mesh = ml_collections.ConfigDict()
  c.mesh.data = 1
  c.mesh.fsdp = -1
  c.mesh.model = 1
  # Multi-host jobs are detected (TPU VM, SLURM, Open MPI) or given by --coordinator_address,
  # --num_processes, --process_id; True calls jax.distributed.initialize() in any case.
  c.distributed = False
  c.progress = True             # progress bar on stderr

  if variant == "xxl":
    pass
  elif variant == "tiny":
    c.text.encoder = "builtin:shapes-tiny"
    c.text.max_length = 16
    c.dtype = "float32"
    c.source = "text:captions.txt"
    c.batch_size = 64
    c.part_size = 256
    c.mesh.data = -1
    c.mesh.fsdp = 1
  else:
    raise ValueError(f"unknown encode variant {variant!r}: use xxl or tiny")
  return c
