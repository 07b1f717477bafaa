"""Exact softmax attention computed a few examples at a time, with its own gradient: the CPU path.

`jax.nn.dot_product_attention`'s XLA implementation materializes the logits [B, N, T, S] of the
whole batch and differentiates through the softmax's division. On a CPU that is memory-bound: at
the base U-Net's 32x32 level (T = 1024 image tokens + 32 text keys) one attention block's logits
at batch 16 are 138 MB, and every elementwise pass over them streams that through DRAM. Here the
batch is processed in chunks (`lax.map`) small enough that a chunk's logits stay in the caches,
and the backward pass recomputes each chunk's probabilities from the saved row maxima and
normalizers (as flash attention does) instead of storing them, using the closed-form softmax
gradient dlogits = p * (dp - rowsum(dout * out)).

Same contract as `jax.nn.dot_product_attention` with a boolean key mask: logits in float32,
probabilities cast to the value dtype for the second product, masked keys get a large negative
logit (an example whose keys are all masked attends uniformly, as XLA's implementation does) and
no gradient. Keeping the logits in cache makes it faster than XLA's implementation on a CPU,
forward and backward, the more so the longer the sequence.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

_MASKED_LOGIT = -0.7 * float(jnp.finfo(jnp.float32).max)  # jax.nn's large negative number
_CHUNK_LOGITS_BYTES = 2 * 2**20  # a chunk's float32 logits: about one core's L2 cache


def examples_per_chunk(batch: int, query_len: int, key_len: int, heads: int) -> int:
  """The largest divisor of `batch` whose chunk's logits fit `_CHUNK_LOGITS_BYTES` (at least 1)."""
  per_example = 4 * heads * query_len * key_len
  limit = max(1, _CHUNK_LOGITS_BYTES // per_example)
  return max(d for d in range(1, min(batch, limit) + 1) if batch % d == 0)


def chunked_attention(query: jax.Array, key: jax.Array, value: jax.Array,
                      key_mask: jax.Array) -> jax.Array:
  """query [B, T, N, H], key/value [B, S, N, H], key_mask [B, S] bool -> [B, T, N, H]."""
  batch, query_len, heads, _ = query.shape
  chunk = examples_per_chunk(batch, query_len, key.shape[1], heads)
  return _attention(query, key, value, key_mask, batch // chunk)


def _logits(query, key, key_mask, scale):
  logits = jnp.einsum("btnh,bsnh->bnts", query, key, preferred_element_type=jnp.float32) * scale
  return jnp.where(key_mask[:, None, None, :], logits, _MASKED_LOGIT)


def _product(spec: str, a: jax.Array, b: jax.Array) -> jax.Array:
  """einsum accumulated in float32, in the inputs' dtype (see layers.dot_general_f32_accumulation:
  XLA:CPU's fast bf16 matmuls need the float32 accumulation asked for)."""
  return jnp.einsum(spec, a, b, preferred_element_type=jnp.float32).astype(b.dtype)


def _forward_chunk(query, key, value, key_mask, scale):
  """(out, row max, log of the row's normalizer) for one chunk of examples."""
  logits = _logits(query, key, key_mask, scale)
  peak = jnp.max(logits, axis=-1)
  unnormalized = jnp.exp(logits - peak[..., None])
  total = jnp.sum(unnormalized, axis=-1)
  probs = unnormalized / total[..., None]
  out = _product("bnts,bsnh->btnh", probs.astype(value.dtype), value)
  return out, peak, jnp.log(total)


def _backward_chunk(query, key, value, key_mask, out, peak, log_total, dout, scale):
  """(dquery, dkey, dvalue) for one chunk, from probabilities recomputed exactly."""
  # Subtract the peak first: next to a masked logit (-0.7 * float max) log_total would be lost
  # in `peak + log_total`, and an all-masked row would get probabilities 1 instead of 1/S.
  logits = _logits(query, key, key_mask, scale) - peak[..., None]
  probs = jnp.exp(logits - log_total[..., None])
  dvalue = _product("bnts,btnh->bsnh", probs.astype(dout.dtype), dout)
  dprobs = jnp.einsum("btnh,bsnh->bnts", dout, value, preferred_element_type=jnp.float32)
  row = jnp.einsum("btnh,btnh->bnt", dout.astype(jnp.float32), out.astype(jnp.float32))
  dlogits = probs * (dprobs - row[..., None]) * scale
  dlogits = jnp.where(key_mask[:, None, None, :], dlogits, 0.0)  # masked logits are constants
  dquery = _product("bnts,bsnh->btnh", dlogits.astype(key.dtype), key)
  dkey = _product("bnts,btnh->bsnh", dlogits.astype(query.dtype), query)
  return dquery, dkey, dvalue


def _split(x: jax.Array, chunks: int) -> jax.Array:
  """[B, ...] -> [chunks, B / chunks, ...]; chunk i holds examples i, i + chunks, ... (a stride,
  so that a batch sharded over devices in contiguous blocks stays spread over them)."""
  return jnp.swapaxes(x.reshape((x.shape[0] // chunks, chunks) + x.shape[1:]), 0, 1)


def _merge(x: jax.Array) -> jax.Array:
  return jnp.swapaxes(x, 0, 1).reshape((-1,) + x.shape[2:])


def _over_chunks(fn, chunks: int, *args):
  if chunks == 1:
    return fn(*args)
  outs = jax.lax.map(lambda a: fn(*a), tuple(_split(x, chunks) for x in args))
  return tuple(_merge(x) for x in outs)


@functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
def _attention(query, key, value, key_mask, chunks):
  return _attention_fwd(query, key, value, key_mask, chunks)[0]


def _attention_fwd(query, key, value, key_mask, chunks):
  scale = query.shape[-1] ** -0.5
  out, peak, log_total = _over_chunks(
      functools.partial(_forward_chunk, scale=scale), chunks, query, key, value, key_mask)
  return out, (query, key, value, key_mask, out, peak, log_total)


def _attention_bwd(chunks, residuals, dout):
  scale = residuals[0].shape[-1] ** -0.5
  dquery, dkey, dvalue = _over_chunks(
      functools.partial(_backward_chunk, scale=scale), chunks, *residuals, dout)
  return dquery, dkey, dvalue, None


_attention.defvjp(_attention_fwd, _attention_bwd)
