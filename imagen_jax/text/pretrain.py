"""Text-only pretraining of the builtin encoder on the shapes grammar.

Imagen's central finding is that a frozen encoder pretrained on text alone is what gives the
cascade its prompt understanding. `builtin:shapes-tiny-pretrained` (`builtin.shapes_tiny_config`,
the random `builtin:shapes-tiny`'s initial weights) is trained on every caption the grammar can
make, single objects at every cell and every ordered pair in both relations, so every color-shape
pair is in the text, including the pairs held out from every image
(`shapes_grammar.HELDOUT_PAIRS`): text alone, never an image. Its objective is `span+neighbors`
(`builtin.PRETRAINING`): T5's span corruption (Raffel et al. 2020, sec. 3.1.4) alone lets the
encoder predict a hidden word from the caption without writing an unseen pair's color into its
noun's output vector, which is where the U-Net's attention reads an object; the neighbor heads
make it. The pretrained encoder ships with the package (`builtin.remake_pretrained_asset` is
how it was made).

Span corruption: a fraction `NOISE_DENSITY` of a caption's tokens, in spans of mean length
`MEAN_SPAN`, is replaced by one sentinel per span; a small decoder (thrown away afterwards)
reconstructs "sentinel_0 span_0 sentinel_1 span_1 ... EOS" from the encoder's output. The
captions are short (8-13 tokens), so the density is twice T5's 0.15 and the spans shorter than
its 3: every caption loses at least one word to predict. Sentinel ids sit after the vocabulary;
their embedding rows are dropped when the encoder is saved.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from imagen_jax.text import t5

NOISE_DENSITY = 0.3
MEAN_SPAN = 2.0
NUM_SENTINELS = 8
EOS_ID = 1
PAD_ID = 0
LENGTH = 24  # encoder input and decoder target, padded


# "span": T5's span corruption, the decoder writes only the dropped spans. "denoise": BART's
# text infilling, the decoder writes the whole caption back from its corrupted copy, so the
# encoder's output must keep every word, held-out pairs included, where the decoder can read
# it. "span+denoise": each batch half and half. "span+neighbors": span corruption, and on the
# clean caption linear heads read each token and its two neighbours off the token's own output
# vector, so every word's output carries the words around it: a noun its adjective.
OBJECTIVES = ("span", "denoise", "span+denoise", "span+neighbors")
NEIGHBOR_OFFSETS = (-1, 0, 1)


@dataclasses.dataclass(frozen=True)
class PretrainConfig:
  steps: int = 800
  batch_size: int = 128
  learning_rate: float = 3e-3
  seed: int = 0
  objective: str = "span"

  def __post_init__(self):
    if self.objective not in OBJECTIVES:
      raise ValueError(f"unknown pretraining objective {self.objective!r}; choose from "
                       f"{OBJECTIVES}")


def corrupt(ids: np.ndarray, vocab_size: int, rng: np.random.Generator
            ) -> tuple[list[int], list[int]]:
  """One caption's token ids (no EOS) -> (encoder input, decoder target), each ending in EOS.

  Noise spans and the kept stretches between them have random lengths summing to the caption's
  (T5's `random_spans_noise_mask`); the caption starts with a kept stretch when it can.
  """
  n = len(ids)
  num_noise = int(np.clip(round(n * NOISE_DENSITY), 1, n - 1))
  num_spans = int(np.clip(round(num_noise / MEAN_SPAN), 1, min(num_noise, n - num_noise,
                                                                NUM_SENTINELS)))

  def partition(total: int, parts: int) -> np.ndarray:
    cuts = np.sort(rng.choice(np.arange(1, total), size=parts - 1, replace=False))
    return np.diff(np.concatenate([[0], cuts, [total]]))

  noise_lengths = partition(num_noise, num_spans)
  kept_lengths = partition(n - num_noise, num_spans)
  inputs, targets, pos = [], [], 0
  for k, (kept, noise) in enumerate(zip(kept_lengths, noise_lengths)):
    sentinel = vocab_size + k
    inputs += list(ids[pos:pos + kept]) + [sentinel]
    pos += kept
    targets += [sentinel] + list(ids[pos:pos + noise])
    pos += noise
  return inputs + [EOS_ID], targets + [EOS_ID]


def infill(ids: np.ndarray, vocab_size: int, rng: np.random.Generator
           ) -> tuple[list[int], list[int]]:
  """BART's text infilling: the caption with its noise spans (as `corrupt` draws them) each
  replaced by one mask token (the first sentinel) -> (that input, the whole caption), each
  ending in EOS."""
  inputs, _ = corrupt(ids, vocab_size, rng)
  mask_id = vocab_size
  inputs = [mask_id if token >= vocab_size else token for token in inputs]
  return inputs, list(ids) + [EOS_ID]


def batch(captions_ids: list[np.ndarray], vocab_size: int, rng: np.random.Generator,
          size: int, objective: str = "span") -> dict[str, np.ndarray]:
  """A padded batch: encoder ids/mask [B, LENGTH], decoder inputs/targets/mask [B, LENGTH]."""
  out = {k: np.zeros((size, LENGTH), np.int32) for k in ("enc", "dec_in", "target", "clean")}
  for k in ("enc_mask", "dec_mask", "clean_mask"):
    out[k] = np.zeros((size, LENGTH), bool)
  for b, i in enumerate(rng.integers(len(captions_ids), size=size)):
    clean = list(captions_ids[i]) + [EOS_ID]
    out["clean"][b, :len(clean)] = clean
    out["clean_mask"][b, :len(clean)] = True
    denoise = objective == "denoise" or (objective == "span+denoise" and b % 2)
    inputs, targets = (infill if denoise else corrupt)(captions_ids[i], vocab_size, rng)
    out["enc"][b, :len(inputs)] = inputs
    out["enc_mask"][b, :len(inputs)] = True
    out["dec_in"][b, 1:len(targets)] = targets[:-1]  # teacher forcing, PAD as the start token
    out["target"][b, :len(targets)] = targets
    out["dec_mask"][b, :len(targets)] = True
  return out


class DecoderLayer(nn.Module):
  d_model: int
  num_heads: int
  d_ff: int

  @nn.compact
  def __call__(self, y, encoded, self_mask, cross_mask):
    attend = lambda name: nn.MultiHeadDotProductAttention(self.num_heads, name=name)
    h = t5.RMSNorm(1e-6, jnp.float32, jnp.float32, name="pre_self_norm")(y)
    y = y + attend("self_attention")(h, h, mask=self_mask)
    h = t5.RMSNorm(1e-6, jnp.float32, jnp.float32, name="pre_cross_norm")(y)
    y = y + attend("cross_attention")(h, encoded, mask=cross_mask)
    h = t5.RMSNorm(1e-6, jnp.float32, jnp.float32, name="pre_mlp_norm")(y)
    h = nn.Dense(self.d_ff, name="wi")(h)
    return y + nn.Dense(self.d_model, name="wo")(jax.nn.gelu(h))


class SpanCorruption(nn.Module):
  """The encoder under training (vocabulary plus sentinels) and a throwaway decoder; with
  `neighbors`, throwaway linear heads that read tokens off the encoder's output of clean text."""
  config: t5.T5Config  # vocab_size includes the sentinels
  neighbors: bool = False

  @nn.compact
  def __call__(self, enc, enc_mask, dec_in, dec_mask, clean=None, clean_mask=None):
    """Decoder logits [B, LENGTH, V]; with `neighbors` also the heads' logits on `clean`
    [B, LENGTH, len(NEIGHBOR_OFFSETS), V]."""
    c = self.config
    encoder = t5.T5Encoder(c, name="encoder")
    encoded = encoder(enc, enc_mask)
    y = nn.Embed(c.vocab_size, c.d_model, name="decoder_embed")(dec_in)
    y = y + nn.Embed(LENGTH, c.d_model, name="decoder_positions")(jnp.arange(LENGTH))[None]
    self_mask = nn.combine_masks(nn.make_causal_mask(dec_in),
                                 nn.make_attention_mask(dec_mask, dec_mask))
    cross_mask = nn.make_attention_mask(dec_mask, enc_mask)
    for i in range(c.num_layers):
      y = DecoderLayer(c.d_model, c.num_heads, c.d_ff, name=f"decoder_{i}")(
          y, encoded, self_mask, cross_mask)
    y = t5.RMSNorm(1e-6, jnp.float32, jnp.float32, name="decoder_norm")(y)
    logits = nn.Dense(c.vocab_size, name="logits")(y)
    if not self.neighbors:
      return logits
    h = nn.Dense(len(NEIGHBOR_OFFSETS) * c.vocab_size, name="neighbor_heads")(
        encoder(clean, clean_mask))
    return logits, h.reshape(h.shape[:2] + (len(NEIGHBOR_OFFSETS), c.vocab_size))


def neighbor_targets(clean: np.ndarray, clean_mask: np.ndarray) -> tuple[jax.Array, jax.Array]:
  """The token at each offset of NEIGHBOR_OFFSETS from every position [B, L, K] and where it
  exists (inside the caption) [B, L, K]."""
  targets, valid = [], []
  for offset in NEIGHBOR_OFFSETS:
    targets.append(jnp.roll(clean, -offset, axis=1))
    inside = jnp.roll(clean_mask, -offset, axis=1)
    if offset > 0:
      inside = inside.at[:, -offset:].set(False)
    elif offset < 0:
      inside = inside.at[:, :-offset].set(False)
    valid.append(inside & clean_mask)
  return jnp.stack(targets, -1), jnp.stack(valid, -1)


def pretrain(config: t5.T5Config, encoder_params: Any, captions_ids: list[np.ndarray],
             settings: PretrainConfig = PretrainConfig()) -> tuple[Any, dict[str, float]]:
  """Trains `encoder_params` (a `t5.T5Encoder` tree for `config`) with `settings.objective` on the
  tokenized captions; returns the trained encoder params (same shapes) and metrics: the first
  and last 100 steps' loss and `fresh_corruption_accuracy`, the span-token accuracy on fresh
  corruptions of the same captions (every caption is trained on, so none is held out)."""
  vocab = config.vocab_size
  wide = dataclasses.replace(config, vocab_size=vocab + NUM_SENTINELS)
  neighbors = settings.objective == "span+neighbors"
  model = SpanCorruption(wide, neighbors)
  rng = np.random.default_rng(settings.seed)
  sample = batch(captions_ids, vocab, rng, 2, settings.objective)
  params = nn.unbox(model.init(jax.random.PRNGKey(settings.seed), sample["enc"],
                               sample["enc_mask"], sample["dec_in"], sample["dec_mask"],
                               sample["clean"], sample["clean_mask"]))["params"]
  # Start from the given encoder; the sentinels' rows are new.
  start = jax.tree_util.tree_map(np.asarray, nn.unbox(encoder_params))
  embedding = params["encoder"]["token_embedder"]["embedding"]
  params["encoder"] = {**start, "token_embedder": {"embedding": jnp.concatenate(
      [start["token_embedder"]["embedding"], embedding[vocab:]])}}
  optimizer = optax.adamw(optax.warmup_cosine_decay_schedule(
      0.0, settings.learning_rate, 100, settings.steps), weight_decay=0.0)
  opt_state = optimizer.init(params)

  def loss_fn(p, b):
    out = model.apply({"params": p}, b["enc"], b["enc_mask"], b["dec_in"], b["dec_mask"],
                      b["clean"], b["clean_mask"])
    logits, heads = out if neighbors else (out, None)
    losses = optax.softmax_cross_entropy_with_integer_labels(logits, b["target"])
    weight = b["dec_mask"] & (b["target"] != EOS_ID) & (b["target"] < vocab)  # span tokens
    correct = (jnp.argmax(logits, -1) == b["target"]) & weight
    full = b["dec_mask"].astype(jnp.float32)
    loss = jnp.sum(losses * full) / jnp.sum(full)
    if heads is not None:
      targets, valid = neighbor_targets(b["clean"], b["clean_mask"])
      head_losses = optax.softmax_cross_entropy_with_integer_labels(heads, targets)
      loss = loss + jnp.sum(head_losses * valid) / jnp.sum(valid)
    return loss, jnp.sum(correct) / jnp.sum(weight)

  @functools.partial(jax.jit, donate_argnums=(0, 1))
  def step(p, s, b):
    (loss, _), grads = jax.value_and_grad(loss_fn, has_aux=True)(p, b)
    updates, s = optimizer.update(grads, s, p)
    return optax.apply_updates(p, updates), s, loss

  losses = []  # left on the device: the host builds the next batch while the step runs
  for _ in range(settings.steps):
    params, opt_state, loss = step(params, opt_state, batch(
        captions_ids, vocab, rng, settings.batch_size, settings.objective))
    losses.append(loss)
  losses = np.asarray(jax.device_get(losses), np.float64)  # as float() gave: the same record
  fresh_corruptions = batch(captions_ids, vocab, np.random.default_rng(settings.seed + 1), 512)
  fresh_corruption_accuracy = float(jax.jit(loss_fn)(params, fresh_corruptions)[1])
  trained = dict(params["encoder"])
  trained["token_embedder"] = {"embedding": params["encoder"]["token_embedder"]["embedding"][:vocab]}
  metrics = {"first_loss": float(np.mean(losses[:100])), "last_loss": float(np.mean(losses[-100:])),
             "fresh_corruption_accuracy": fresh_corruption_accuracy}
  return jax.tree_util.tree_map(np.asarray, trained), metrics
