"""Named random streams of a run: every use of randomness draws from its own fold of the seed.

A training step draws from `fold_in(PRNGKey(seed), step)` (steps < 2**31); a named stream is
`fold_in(PRNGKey(seed), h)` with h a hash of its name with the top bit set, so no stream ever
meets a step's key or another stream's keys.

    adapters_key = stream_key(config.seed, "lora_adapters")
    prior_seed = stream_seed(config.seed, "class_prior")   # an int, for APIs that take a seed
"""

from __future__ import annotations

import zlib

import jax

_TOP_BIT = 1 << 31


def _name_hash(name: str) -> int:
  return zlib.crc32(name.encode("utf-8")) | _TOP_BIT


def stream_key(seed: int, name: str) -> jax.Array:
  """The PRNG key of the stream `name` of a run with `seed`."""
  return jax.random.fold_in(jax.random.PRNGKey(seed), _name_hash(name))


def stream_seed(seed: int, name: str) -> int:
  """An integer seed for the stream `name` (for APIs that take a seed and make their own keys,
  such as a cascade's sampling): a different root key than `seed`'s, in [0, 2**31)."""
  return (zlib.crc32(f"{seed}:{name}".encode("utf-8")) ^ (seed & 0x7FFFFFFF)) & 0x7FFFFFFF
