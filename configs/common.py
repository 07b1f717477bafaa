"""Fields every stage config shares, with the paper's defaults (Saharia et al. 2022, appendix F).

Stage files (`base64.py`, `sr256.py`, `sr1024.py`, the demo's) start from `stage_config()` and
change what differs. Every field is listed here, so `--config.<key>=...` overrides are checked
against one schema.
"""

import ml_collections

# T5 v1.1 encoder widths (d_model) by size; the U-Nets read `config.text.width`.
T5_WIDTHS = {"small": 512, "base": 768, "large": 1024, "xl": 2048, "xxl": 4096}


def stage_config() -> ml_collections.ConfigDict:
  """A complete stage config with the paper's training defaults (base stage, 64x64)."""
  c = ml_collections.ConfigDict()
  c.stage = "base"          # "base" (text -> 64x64) or "sr" (text + low-res -> high-res)
  c.image_size = 64         # the stage's output resolution
  c.train_crop = 0          # SR 2 trains on random crops of this size (0: the whole image)
  c.dtype = "float32"       # compute dtype; params and optimizer state stay float32

  # Frozen text encoder. `encoder`: a Hugging Face / t5x / converted directory (local or gs://)
  # or "builtin:shapes-tiny" (random T5 v1.1 with a shapes vocabulary, for tests) or
  # "builtin:shapes-tiny-pretrained" (the same trained on the shapes grammar's text alone).
  c.text = ml_collections.ConfigDict()
  c.text.encoder = "t5-v1_1-xxl"
  c.text.width = T5_WIDTHS["xxl"]
  c.text.max_length = 128
  # Which layer's output the U-Nets read: -1 T5's own (the paper's); k >= 0 the residual stream
  # after k layers through the final norm ("CLIP skip"); 0: each token's embedding, no context.
  c.text.output_layer = -1
  # True: each token's output is followed by its own embedding through the final norm (the
  # layer-0 reading, no context), so `width` is twice d_model.
  c.text.append_token_embeddings = False
  # The unconditional text of guidance and condition dropout: "zeros" (the paper's) or
  # "empty_prompt" (the encoded empty caption: DeepFloyd IF's).
  c.text.null = "zeros"
  # Padding positions of the encoder's output: "zero" (ours) or "keep" (T5's own values there,
  # which IF's U-Nets read: its pipelines pass them no mask).
  c.text.pad_outputs = "zero"

  # Low-res conditioning (SR stages only; size 0 for the base stage).
  c.lowres = ml_collections.ConfigDict()
  c.lowres.size = 0
  c.lowres.aug_max = 1.0    # training draws aug_level ~ U(0, aug_max) per example
  c.lowres.aug_schedule = "linear"  # level 0 is clean (sigma 5e-5); cosine keeps sigma 0.0125
  c.lowres.aug_timesteps = 0  # > 0: the schedule's discrete version (IF-II: cosine, 1000)
  # Where the augmentation noise is drawn: "input" (the low-res image, the paper's) or "output"
  # (upsampled to the stage's size first, bilinear with corners aligned: IF-II's).
  c.lowres.augment_at = "input"

  c.model = ml_collections.ConfigDict()  # filled by each stage file

  c.diffusion = ml_collections.ConfigDict()
  c.diffusion.formulation = "vp"      # "vp" (continuous-time Imagen) or "edm" (Karras et al.)
  c.diffusion.schedule = "cosine"     # "cosine" or "linear" (betas 1e-4..0.02, continuous)
  c.diffusion.schedule_shift = 0.0    # added to log-SNR (< 0: more training at high noise)
  c.diffusion.parameterization = "eps"  # "eps", "x0" or "v"
  # > 0: a discrete-time model trained on this many timesteps of `schedule`'s betas (diffusers'
  # DDPMScheduler: "cosine" is its squaredcos_cap_v2); 0: continuous time.
  c.diffusion.timesteps = 0
  # "fixed", or "learned_range": the network also outputs where each DDPM step's variance lies
  # between the posterior's and beta (DeepFloyd IF's; trained with the hybrid loss' VLB term).
  c.diffusion.variance = "fixed"
  c.diffusion.vlb_weight = 0.001      # learned_range: lambda of L_simple + lambda L_vlb
  c.diffusion.loss_weighting = "plain"  # "plain", "snr" or "min_snr"
  c.diffusion.min_snr_gamma = 5.0
  c.diffusion.edm_sigma_data = 0.5
  c.diffusion.edm_p_mean = -1.2
  c.diffusion.edm_p_std = 1.2

  c.cond_drop_rate = 0.1    # text embeddings zeroed with this probability (classifier-free guidance)
  c.token_drop_rate = 0.0   # each token's embedding zeroed with this probability (word dropout)

  c.optimizer = ml_collections.ConfigDict()
  c.optimizer.name = "adafactor"      # "adafactor" (base), "adam" (SR) or "muon"
  c.optimizer.lr = 1e-4
  c.optimizer.warmup_steps = 10_000
  c.optimizer.schedule = "cosine"     # after warm-up: "cosine" decay to end_lr_factor, or "constant"
  c.optimizer.end_lr_factor = 0.0
  c.optimizer.b1 = 0.9
  c.optimizer.b2 = 0.999
  c.optimizer.eps = 1e-8
  c.optimizer.weight_decay = 0.0
  c.optimizer.muon_beta = 0.95        # muon: momentum of the orthogonalized matrices
  c.optimizer.muon_rms = 0.2          # muon: update RMS per unit learning rate (Adam's scale)
  c.optimizer.clip_norm = 1.0
  c.optimizer.grad_accum_steps = 1    # micro-batches per step (global batch / accum per micro-step)

  c.ema = ml_collections.ConfigDict()
  c.ema.decay = 0.9999
  c.ema.warmup = True       # decay_t = min(decay, (1 + t) / (10 + t))

  c.data = ml_collections.ConfigDict()
  c.data.source = "shapes"  # shapes, shapes:256, tfds:NAME[:CONFIG], folder:PATH, wds:PATTERN
  c.data.data_dir = ""      # TFDS data_dir ("" : TFDS's default)
  c.data.split = "train"
  c.data.image_key = "image"
  c.data.caption_key = "caption"
  c.data.embed_cache = ""   # embedding cache path ("" : encode captions on the fly)
  c.data.missing_embedding = "error"  # or "skip"
  c.data.min_resolution = 0
  c.data.random_crop = False
  c.data.num_workers = 0    # grain worker processes (0: decode in the main process)
  c.data.prefetch = 2       # batches buffered ahead of the step

  c.mesh = ml_collections.ConfigDict()
  c.mesh.data = -1          # -1 fills the devices left by the other axes
  c.mesh.fsdp = 1
  c.mesh.model = 1

  c.seed = 0
  c.batch_size = 2048       # global
  c.total_steps = 2_500_000
  c.log_every = 100
  c.checkpoint_every = 5_000
  c.keep_checkpoints = 3
  c.sample_every = 20_000
  c.nonfinite = "error"     # a NaN/Inf loss or gradient: "error" stops, "skip" drops the update

  # Fine-tuning a trained stage (`imagen-jax finetune`, the `finetune` variant: `finetuning`
  # below). method "none" trains from scratch; "full" starts every parameter from the base
  # stage's EMA parameters (fresh optimizer and schedule); "lora" freezes them and trains
  # low-rank adapters: the workdir's checkpoints then hold only the adapters, and name the base.
  c.finetune = ml_collections.ConfigDict()
  c.finetune.method = "none"          # "none", "full" or "lora"
  c.finetune.base = ""                # the trained stage's workdir (`finetune --base`)
  c.finetune.base_step = -1           # its checkpoint (-1: latest; the run records the step)
  c.finetune.lora_rank = 8
  c.finetune.lora_alpha = 8.0         # adapters' weight alpha / rank (times --lora_scale)
  c.finetune.lora_layers = "attention,dense"  # comma-separated: attention, dense, conv
  # Class-prior preservation (DreamBooth): with a class prompt, the command first samples
  # `prior_images` images of it from the base stage (resumable, in WORKDIR/prior) and trains on
  # instance and class examples half and half, the class loss weighted by `prior_weight`.
  c.finetune.prior_class = ""         # e.g. "a triangle" ("": no prior preservation)
  c.finetune.prior_images = 64
  c.finetune.prior_weight = 1.0

  c.debug = ml_collections.ConfigDict()
  c.debug.nan_at_step = -1  # fault injection for tests: the loss at this step becomes NaN

  # Sampling defaults: the preview grids during training and `imagen-jax sample`.
  c.sample = ml_collections.ConfigDict()
  c.sample.prompts = (
      "a red circle at the top left corner",
      "a blue square at the center",
      "a corgi wearing a red bow tie",
      "an oil painting of a lighthouse at sunset",
  )
  # UniPC at log-SNR-uniform steps matches DDIM and DDPM in a fraction of their steps; the count
  # leaves room for the paper's stronger guidance, which the shapes cascade does not exercise.
  c.sample.sampler = "unipc"          # ddpm, ddim, edm_heun, dpmpp_2m, dpmpp_3m, dpmpp_2m_sde, unipc
  c.sample.steps = 25
  c.sample.eta = 0.0                  # DDIM's eta
  c.sample.spacing = "logsnr"         # steps uniform in "time" or in "logsnr" (all but edm_heun)
  c.sample.unipc_variant = "bh2"      # UniPC's B(h): "bh1" or "bh2"
  c.sample.guidance = 5.0
  c.sample.guidance_interval = ()     # (lo, hi): guide only where lo < EDM sigma <= hi; () = always
  c.sample.threshold = "dynamic"      # "dynamic", "static" or "none"
  c.sample.percentile = 99.5          # dynamic thresholding percentile, 0-100 scale
  c.sample.threshold_max = 0.0        # dynamic thresholding's largest scale (0: no limit)
  c.sample.aug_level = 0.2            # SR stages: noise-aug level of the low-res input
  c.sample.num_images = 4
  return c


def parse_variants(arg: str | None, default: str) -> tuple[str, bool]:
  """A stage file's `get_config` argument "VARIANT[,finetune]" (either part may be alone) ->
  (the variant, or `default`; whether to apply `finetuning`)."""
  parts = [p.strip() for p in (arg or "").split(",") if p.strip()]
  finetune = "finetune" in parts
  rest = [p for p in parts if p != "finetune"]
  if len(rest) > 1:
    raise ValueError(f"config variants {arg!r}: give one size variant, optionally with "
                     "',finetune'")
  return (rest[0] if rest else default), finetune


def tiny_cpu(c: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """What every stage's `tiny` variant shares: the random shapes encoder and a short training run
  sized for a CPU (the tests' stages; their scores mean little)."""
  c.text.encoder = "builtin:shapes-tiny"
  c.text.width = 64
  c.text.max_length = 16
  c.optimizer.lr = 1e-3
  c.optimizer.warmup_steps = 50
  c.ema.decay = 0.995
  c.batch_size = 16
  c.total_steps = 200
  c.log_every = 20
  c.checkpoint_every = 100
  c.sample_every = 0
  c.sample.prompts = ("a red circle at the top left corner", "a blue square at the center")
  return c


def finetuning(c: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """The `finetune` variant: a stage adapted to 3-20 images of a subject (`imagen-jax finetune`).

  LoRA adapters on the frozen stage; a few hundred steps of Adam at a constant rate after a short
  warm-up (subject images repeat to fill the stage's batches); captions encoded on the fly,
  since the stage's embedding cache holds its own dataset's.
  """
  c.finetune.method = "lora"
  c.total_steps = 400
  c.optimizer.name = "adam"
  c.optimizer.lr = 1e-3
  c.optimizer.warmup_steps = 20
  c.optimizer.schedule = "constant"
  c.optimizer.grad_accum_steps = 1
  c.log_every = min(c.log_every, 40)
  c.checkpoint_every = min(c.checkpoint_every, 200)
  c.sample_every = 0
  c.data.embed_cache = ""
  return c


def cpu_demo_stage(c: ml_collections.ConfigDict, variant: str, *, total_steps: int,
                   checkpoint_every: int, sample_steps: int, quick_steps: int,
                   quick_sample_steps: int) -> ml_collections.ConfigDict:
  """What both demo stages share: the tiny shapes encoder, the objective and the optimizer that
  train in minutes on a CPU, and the `quick` variant the tests run (scores mean little).

  Plain weighting: min-SNR gives the noisiest steps, where the layout is decided (positions and
  shapes; for SR, what to read off the low-res image), almost no weight, so a base stage trained
  with it rarely gets a prompt right and an SR stage ignores its input. x0-prediction: the
  output is the clean image itself, so the noise of z_t has no identity path into it (with v or
  eps the net must subtract that noise exactly, which a net trained for minutes does not:
  speckled backgrounds); it also weights the x0 error of every noise level alike, where v
  weights it by 1 + SNR.
  """
  if variant not in ("full", "quick"):
    raise ValueError(f"unknown demo {c.stage} variant {variant!r}: use full or quick")
  quick = variant == "quick"
  # As Imagen conditions on T5: the final layer of a frozen encoder pretrained on text alone
  # (`builtin:shapes-tiny-pretrained`, `text/pretrain.py`), whose nouns carry their own colors
  # for color-shape pairs no image shows, so the U-Net's attention reads each object whole.
  c.text.encoder = "builtin:shapes-tiny-pretrained"
  c.text.output_layer = -1
  c.text.width = 64
  c.text.max_length = 16
  c.diffusion.parameterization = "x0"
  c.diffusion.loss_weighting = "plain"
  c.optimizer.name = "adam"
  c.optimizer.lr = 2e-3
  c.optimizer.warmup_steps = 5 if quick else 100
  c.optimizer.end_lr_factor = 0.1
  c.ema.decay = 0.999
  c.batch_size = 16 if quick else 32
  c.total_steps = quick_steps if quick else total_steps
  c.log_every = 10 if quick else 100
  c.checkpoint_every = quick_steps if quick else checkpoint_every
  c.keep_checkpoints = 1
  c.sample_every = 0
  c.sample.sampler = "ddim"
  c.sample.steps = quick_sample_steps if quick else sample_steps
  c.sample.threshold = "static"
  return c
