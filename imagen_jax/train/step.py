"""One training step of a cascade stage: the diffusion objective, accumulation, update, EMA.

The step is a pure function of (state, batch, frozen); `frozen` holds what it reads but never
updates: {"text": the text encoder's params or None, "base": a LoRA run's base params or None}.
Its randomness is derived from the
config seed and the state's step, so a resumed run draws exactly the numbers the uninterrupted run
would have drawn, on any mesh (threefry is partitionable).
"""

# No `from __future__ import annotations`: clu reads the metric classes from the annotations.

from typing import Any, Callable

from clu import metrics as clu_metrics
import flax
import jax
import jax.numpy as jnp
import optax

from imagen_jax.data import preprocess
from imagen_jax.diffusion import augmentation
from imagen_jax.diffusion import edm
from imagen_jax.diffusion import guidance
from imagen_jax.diffusion import objectives
from imagen_jax.diffusion import schedules
from imagen_jax.models import lora
from imagen_jax.train import state as state_lib

TextApply = Callable[[Any, jax.Array, jax.Array], jax.Array]
ApplyFn = Callable[..., jax.Array]  # (params, base_params, *model inputs) -> prediction


def _quartile_average(q: int):
  """An Average of the per-example losses whose t falls in quartile q (0-based)."""

  @flax.struct.dataclass
  class QuartileAverage(clu_metrics.Average):

    @classmethod
    def from_model_output(cls, *, per_example, quartile, **_):
      in_bin = quartile == q
      return cls(total=jnp.sum(jnp.where(in_bin, per_example, 0.0)),
                 count=jnp.sum(in_bin.astype(jnp.int32)))

  return QuartileAverage


@flax.struct.dataclass
class TrainMetrics(clu_metrics.Collection):
  """Averaged between logging steps. loss_q1..q4: loss by quartile of t (q1: least noise)."""
  loss: clu_metrics.Average.from_output("loss")
  loss_q1: _quartile_average(0)
  loss_q2: _quartile_average(1)
  loss_q3: _quartile_average(2)
  loss_q4: _quartile_average(3)
  grad_norm: clu_metrics.Average.from_output("grad_norm")
  param_norm: clu_metrics.LastValue.from_output("param_norm")
  learning_rate: clu_metrics.LastValue.from_output("learning_rate")
  skipped_updates: clu_metrics.LastValue.from_output("skipped_updates")


def text_inputs(batch: dict[str, jax.Array], text_params: Any, text_apply: TextApply | None
                ) -> tuple[jax.Array, jax.Array]:
  """(text_emb [B, L, D] float32, text_mask [B, L]) from cached embeddings or token ids."""
  if "text_emb" in batch:
    return batch["text_emb"].astype(jnp.float32), batch["text_mask"]
  if text_apply is None:
    raise ValueError("the batch holds token ids but no text encoder was given to the step")
  emb = jax.lax.stop_gradient(text_apply(text_params, batch["tokens"], batch["text_mask"]))
  return emb.astype(jnp.float32), batch["text_mask"]


def make_loss_fn(config: Any, model: Any, text_apply: TextApply | None,
                 apply_fn: ApplyFn | None = None):
  """loss_fn(params, batch, frozen, key) -> (mean loss, (per-example loss [B], log_snr [B])).

  `apply_fn` (default: the model's own apply) runs the network; a LoRA run's applies the
  adapters `params` on the frozen base (`lora.network`). A batch with `loss_weight` [B]
  (class-prior preservation) weights each example's loss in the mean.
  """
  apply_fn = apply_fn or lora.network(model, None)
  log_snr_fn = schedules.stage_log_snr_fn(config.diffusion)
  diff = config.diffusion

  def loss_fn(params, batch, frozen, key):
    frozen = frozen or {}
    drop_key, aug_key, aug_noise_key, diffusion_key = jax.random.split(key, 4)
    x = preprocess.to_model_range(batch["image"])
    text_emb, text_mask = text_inputs(batch, frozen.get("text"), text_apply)
    if config.token_drop_rate > 0:  # a key of its own only then: other runs keep their stream
      drop_key, token_key = jax.random.split(drop_key)
      text_emb = guidance.drop_tokens(token_key, text_emb, config.token_drop_rate)
    text_emb = guidance.drop_text(drop_key, text_emb, config.cond_drop_rate,
                                  frozen.get("null_text"))
    extra = {}
    if config.stage == "sr":
      # Noise conditioning augmentation: a random aug level per example, given to the net.
      lowres = preprocess.to_model_range(batch["lowres"])
      levels = augmentation.random_aug_levels(aug_key, x.shape[0], config.lowres.aug_max)
      extra["lowres"], extra["aug_log_snr"] = augmentation.augment_lowres(
          config, aug_noise_key, lowres, levels)

    def net(z, log_snr):
      return apply_fn(params, frozen.get("base"), z, log_snr, text_emb, text_mask, **extra)

    if diff.formulation == "edm":
      per_example, log_snr = edm.training_loss(
          net, diffusion_key, x, sigma_data=diff.edm_sigma_data, p_mean=diff.edm_p_mean,
          p_std=diff.edm_p_std)
    elif diff.formulation == "vp":
      z, log_snr, eps = objectives.corrupt(diffusion_key, x, log_snr_fn)
      output = net(z, log_snr)
      per_example = objectives.diffusion_loss(
          output[..., :x.shape[-1]], x, eps, log_snr, parameterization=diff.parameterization,
          weighting=diff.loss_weighting, min_snr_gamma=diff.min_snr_gamma)
      if diff.get("variance", "fixed") == "learned_range":  # IF's hybrid loss
        # L_vlb sums the T timesteps' terms: one drawn timestep's term stands for T of them.
        per_example += diff.vlb_weight * log_snr_fn.num_timesteps * objectives.learned_range_vlb(
            output, z, x, log_snr, log_snr_fn)
    else:
      raise ValueError(f"config.diffusion.formulation: unknown {diff.formulation!r}; use vp or edm")
    weights = batch.get("loss_weight")
    loss = per_example.mean() if weights is None else (per_example * weights).mean()
    return loss, (per_example, log_snr)

  return loss_fn


def t_quartile(log_snr: jax.Array, log_snr_fn) -> jax.Array:
  """Quartile of t [B] (0: t < 1/4 ... 3: t > 3/4), by the schedule's log-SNR at the edges."""
  edges = log_snr_fn(jnp.array([0.25, 0.5, 0.75]))  # decreasing in t
  return jnp.sum(log_snr[:, None] < edges[None, :], axis=1)


def _micro_batches(batch: dict[str, jax.Array], accum: int) -> dict[str, jax.Array]:
  """[B, ...] -> [accum, B / accum, ...] with micro-batch i = examples i, i + accum, ...

  Splitting by stride keeps every micro-batch spread over all devices of the batch sharding.
  """
  def split(x):
    x = x.reshape((x.shape[0] // accum, accum) + x.shape[1:])
    return jnp.swapaxes(x, 0, 1)
  return jax.tree_util.tree_map(split, batch)


def make_train_step(config: Any, model: Any, optimizer: optax.GradientTransformation,
                    lr_schedule: optax.Schedule, text_apply: TextApply | None = None,
                    apply_fn: ApplyFn | None = None):
  """train_step(state, batch, frozen) -> (state, TrainMetrics)."""
  loss_fn = make_loss_fn(config, model, text_apply, apply_fn)
  grad_fn = jax.value_and_grad(loss_fn, has_aux=True)
  accum = int(config.optimizer.grad_accum_steps)
  log_snr_fn = schedules.stage_log_snr_fn(config.diffusion)
  base_key = jax.random.PRNGKey(config.seed)
  nan_at_step = int(config.debug.nan_at_step)
  skip_nonfinite = config.nonfinite == "skip"

  def train_step(state: state_lib.TrainState, batch, frozen):
    key = jax.random.fold_in(base_key, state.step)
    if accum == 1:
      (loss, (per_example, log_snr)), grads = grad_fn(state.params, batch, frozen, key)
    else:
      def micro(carry, inputs):
        i, mb = inputs
        (l, aux), g = grad_fn(state.params, mb, frozen, jax.random.fold_in(key, i))
        return jax.tree_util.tree_map(jnp.add, carry, g), (l, aux)
      zeros = jax.tree_util.tree_map(jnp.zeros_like, state.params)
      grads, (losses, (per_example, log_snr)) = jax.lax.scan(
          micro, zeros, (jnp.arange(accum), _micro_batches(batch, accum)))
      grads = jax.tree_util.tree_map(lambda g: g / accum, grads)
      loss, per_example, log_snr = losses.mean(), per_example.reshape(-1), log_snr.reshape(-1)
    if nan_at_step >= 0:  # fault injection for tests (config.debug.nan_at_step)
      loss = jnp.where(state.step == nan_at_step, jnp.nan, loss)
    grad_norm = optax.global_norm(grads)
    finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)

    updates, new_opt_state = optimizer.update(grads, state.opt_state, state.params)
    new_params = optax.apply_updates(state.params, updates)
    new_ema = state_lib.ema_update(state.ema_params, new_params,
                                   state_lib.ema_decay(state.step, config.ema))
    # A non-finite update is never applied: the state stays the last good one.
    keep = lambda new, old: jax.tree_util.tree_map(lambda n, o: jnp.where(finite, n, o), new, old)
    first_bad = jnp.where((state.nonfinite_step < 0) & ~finite, state.step, state.nonfinite_step)
    new_state = state.replace(
        step=state.step + 1,
        params=keep(new_params, state.params),
        ema_params=keep(new_ema, state.ema_params),
        opt_state=keep(new_opt_state, state.opt_state),
        nonfinite_step=state.nonfinite_step if skip_nonfinite else first_bad,
        skipped_updates=state.skipped_updates + (~finite).astype(jnp.int32))

    metrics = TrainMetrics.single_from_model_output(
        loss=loss, grad_norm=grad_norm, param_norm=optax.global_norm(new_state.params),
        learning_rate=lr_schedule(state.step), skipped_updates=new_state.skipped_updates,
        per_example=per_example, quartile=t_quartile(log_snr, log_snr_fn))
    return new_state, metrics

  return train_step
