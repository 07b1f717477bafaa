"""The train state (step, params, EMA params, optimizer state) and the optimizer built from config."""

from __future__ import annotations

from typing import Any

import flax
import jax
import jax.numpy as jnp
import optax


@flax.struct.dataclass
class TrainState:
  """Everything a checkpoint must hold to resume bit-exactly (with the data iterator's state).

  `nonfinite_step` is the first step whose loss or gradient was not finite (-1: none); that update
  was not applied. The host reads it at logging and checkpoint steps, so the hot loop never waits.
  `skipped_updates` counts non-finite updates dropped under `config.nonfinite = "skip"`.
  """
  step: jax.Array
  params: Any
  ema_params: Any
  opt_state: Any
  nonfinite_step: jax.Array
  skipped_updates: jax.Array


def learning_rate_schedule(opt_config: Any, total_steps: int) -> optax.Schedule:
  """Linear warm-up from 0 to `lr`, then cosine decay to `end_lr_factor * lr` (or constant)."""
  lr, warmup = float(opt_config.lr), int(opt_config.warmup_steps)
  warmup = min(warmup, max(total_steps - 1, 0))
  if opt_config.schedule == "constant":
    return optax.join_schedules(
        [optax.linear_schedule(0.0, lr, max(warmup, 1)), optax.constant_schedule(lr)], [warmup])
  if opt_config.schedule == "cosine":
    return optax.warmup_cosine_decay_schedule(
        init_value=0.0, peak_value=lr, warmup_steps=warmup,
        decay_steps=max(total_steps, warmup + 1), end_value=lr * float(opt_config.end_lr_factor))
  raise ValueError(f"config.optimizer.schedule: unknown schedule {opt_config.schedule!r}; "
                   "use cosine or constant")


# Parameters Muon leaves to Adam: the stem and output convolutions (a network's first and last
# layers, as in Muon's own recipe), embeddings (a table of rows, not a linear map), and the
# matrices that read the conditioning vector (one per image: the noise-level and text-pooling
# MLPs, each block's FiLM projection), which cost a large share of Newton-Schulz's time for a
# few vectors' worth of signal.
MUON_EXCLUDED = frozenset({"stem", "out_conv", "text_position", "conditioning", "emb_proj"})


def muon_dimensions(params: Any) -> Any:
  """Per parameter, how Muon reads it as a matrix (None: Adam updates it).

  Dense kernels [in, out] are matrices; convolution kernels [kh, kw, in, out] are matrices
  [kh * kw * in, out] (what the convolution multiplies); vectors (biases, norm scales) and the
  layers in MUON_EXCLUDED go to Adam.
  """
  def rule(path, x):
    names = {str(getattr(k, "key", k)) for k in path}
    if x.ndim < 2 or names & MUON_EXCLUDED:
      return None
    return optax.contrib.MuonDimensionNumbers(reduction_axis=tuple(range(x.ndim - 1)),
                                              output_axis=(x.ndim - 1,))
  return jax.tree_util.tree_map_with_path(rule, params)


def make_optimizer(opt_config: Any, total_steps: int) -> tuple[optax.GradientTransformation,
                                                                optax.Schedule]:
  """Adafactor (base), Adam (SR) or Muon with global-norm clipping; returns (optimizer, lr
  schedule).

  Muon (Jordan et al. 2024) orthogonalizes each weight matrix's momentum by Newton-Schulz
  iterations; its updates are scaled to Adam's RMS (`muon_rms` x sqrt(max(fan_in, fan_out)), Liu
  et al. 2025), so one learning rate serves both it and the Adam it keeps for vectors, embeddings
  and the first and last layers (`muon_dimensions`).
  """
  schedule = learning_rate_schedule(opt_config, total_steps)
  if opt_config.name == "adafactor":
    # optax defaults otherwise, as in the paper ("Adafactor (optax defaults)").
    main = optax.adafactor(learning_rate=schedule, weight_decay_rate=opt_config.weight_decay or None)
  elif opt_config.name == "adam":
    main = optax.adamw(schedule, b1=opt_config.b1, b2=opt_config.b2, eps=opt_config.eps,
                       weight_decay=opt_config.weight_decay)
  elif opt_config.name == "muon":
    main = optax.contrib.muon(
        schedule, beta=opt_config.muon_beta, eps=opt_config.eps,
        weight_decay=opt_config.weight_decay, adam_b1=opt_config.b1, adam_b2=opt_config.b2,
        adam_weight_decay=opt_config.weight_decay, muon_weight_dimension_numbers=muon_dimensions,
        consistent_rms=opt_config.muon_rms)
  else:
    raise ValueError(f"config.optimizer.name: unknown optimizer {opt_config.name!r}; "
                     "use adafactor, adam or muon")
  parts = [main]
  if opt_config.clip_norm and opt_config.clip_norm > 0:
    parts.insert(0, optax.clip_by_global_norm(opt_config.clip_norm))
  return optax.chain(*parts), schedule


def ema_decay(step: jax.Array, ema_config: Any) -> jax.Array:
  """The EMA decay at `step`: min(decay, (1 + step) / (10 + step)) with warm-up, else decay."""
  decay = jnp.asarray(ema_config.decay, jnp.float32)
  if ema_config.warmup:
    step = step.astype(jnp.float32)
    decay = jnp.minimum(decay, (1.0 + step) / (10.0 + step))
  return decay


def ema_update(ema_params: Any, params: Any, decay: jax.Array) -> Any:
  return jax.tree_util.tree_map(lambda e, p: decay * e + (1.0 - decay) * p, ema_params, params)


def create(params: Any, optimizer: optax.GradientTransformation) -> TrainState:
  """A fresh state at step 0; EMA params start as a copy of the params."""
  return TrainState(step=jnp.zeros((), jnp.int32), params=params,
                    ema_params=jax.tree_util.tree_map(jnp.copy, params),
                    opt_state=optimizer.init(params),
                    nonfinite_step=jnp.full((), -1, jnp.int32),
                    skipped_updates=jnp.zeros((), jnp.int32))
