"""`text.output_layer`: the U-Nets read the encoder's residual stream after a chosen layer.

References are made here from the builtin random T5 (2 layers): layer 0 is each token's
embedding through the final RMSNorm (no context); layer 1 is the full encoder whose second layer
writes nothing (its attention and feed-forward output projections zeroed).
"""

import numpy as np
import pytest

from imagen_jax.core import config_lib
from imagen_jax.sample import cascade as cascade_lib
from imagen_jax.text import builtin
from imagen_jax.text import cache as cache_lib
from imagen_jax.text import encoder as encoder_lib
from imagen_jax.text import t5
from imagen_jax.train import train

CAPTIONS = ["a red circle at the top", "a blue circle at the top",
            "a red circle to the left of a green square"]


@pytest.fixture(name="encoders")
def fixture_encoders(tmp_path, monkeypatch):
  monkeypatch.setenv("IMAGEN_JAX_CACHE", str(tmp_path))
  return {layer: encoder_lib.load_text_encoder("builtin:shapes-tiny", max_length=16,
                                               output_layer=layer) for layer in (-1, 0, 1, 2)}


def test_layer_zero_is_each_tokens_normalized_embedding(encoders):
  enc = encoders[0]
  emb, mask = enc.encode(CAPTIONS)
  ids, _ = enc.tokenize(CAPTIONS)
  table = np.asarray(enc.params["token_embedder"]["embedding"])[ids]          # [B, L, D]
  scale = np.asarray(enc.params["encoder_norm"]["scale"])
  rms = np.sqrt(np.mean(table ** 2, -1, keepdims=True) + enc.config.layer_norm_epsilon)
  want = np.where(mask[..., None], table / rms * scale, 0.0)
  np.testing.assert_allclose(emb, want, rtol=1e-5, atol=1e-6)
  # No context: "circle" (position 2) reads the same after "red" as after "blue"; with every
  # layer it does not.
  np.testing.assert_array_equal(emb[0, 2], emb[1, 2])
  full = encoders[-1].encode(CAPTIONS)[0]
  assert np.abs(full[0, 2] - full[1, 2]).max() > 1e-2


def test_intermediate_and_last_layers(encoders, tmp_path):
  full = encoders[-1].encode(CAPTIONS)[0]
  np.testing.assert_array_equal(encoders[2].encode(CAPTIONS)[0], full)  # num_layers = all
  # Layer 1: the encoder whose second layer adds nothing to the residual stream.
  params = encoders[-1].params
  layer = params["layers_1"]
  silenced = dict(params, layers_1=dict(
      layer, attention={**layer["attention"], "out": {"kernel": np.zeros((64, 64), np.float32)}},
      mlp={**layer["mlp"], "wo": {"kernel": np.zeros((128, 64), np.float32)}}))
  reference = encoder_lib.TextEncoder(encoders[-1].config, silenced, encoders[-1].tokenizer)
  np.testing.assert_allclose(encoders[1].encode(CAPTIONS)[0], reference.encode(CAPTIONS)[0],
                             rtol=1e-5, atol=1e-6)
  assert np.abs(encoders[1].encode(CAPTIONS)[0] - full).max() > 1e-2


def test_spec_names_the_layer_only_when_it_is_not_t5s_own(encoders):
  assert "output_layer" not in encoders[-1].spec  # earlier caches' specs still match
  assert encoders[0].spec["output_layer"] == 0
  assert not encoder_lib.same_encoder(encoders[0].spec, encoders[-1].spec)


def test_out_of_range_layer_is_refused_naming_the_key():
  config = builtin.shapes_tiny_config(384)
  with pytest.raises(ValueError, match=r"text.output_layer=3: the encoder has 2 layers"):
    t5.check_output_layer(3, config)
  with pytest.raises(ValueError, match=r"text.output_layer=-2"):
    t5.check_output_layer(-2, config)


def test_cascade_stages_must_agree_on_the_layer():
  base, sr = (config_lib.load_config(f"configs/demo_{name}.py") for name in ("base", "sr"))
  cascade_lib.check_chain([base, sr], ["base", "sr"])
  sr.text.output_layer = 0 if base.text.output_layer != 0 else -1
  with pytest.raises(cascade_lib.ChainError, match=r"text.output_layer="):
    cascade_lib.check_chain([base, sr], ["base", "sr"])
  del sr.text["output_layer"]  # a config saved before the key existed reads as -1
  base.text.output_layer = -1
  cascade_lib.check_chain([base, sr], ["base", "sr"])


def test_training_refuses_a_cache_of_another_layer(tmp_path, encoders):
  root = str(tmp_path / "cache")
  cache_lib.create_or_check(root, cache_lib.Metadata(
      num_examples=0, part_size=8, width=64, max_length=16, dtype="float32",
      encoder={k: v for k, v in encoders[-1].spec.items() if k not in ("path", "dtype")},
      source={"kind": "test"}))
  config = config_lib.load_config("configs/demo_base.py",
                                  {"data.embed_cache": root, "text.output_layer": -1})
  assert train.open_embedding_cache(config) is not None
  config.text.output_layer = 0
  with pytest.raises(config_lib.ConfigError, match=r"after layer -1 .* text.output_layer=0"):
    train.open_embedding_cache(config)


def test_appended_token_embeddings_follow_the_final_layer(encoders, tmp_path, monkeypatch):
  monkeypatch.setenv("IMAGEN_JAX_CACHE", str(tmp_path))
  both = encoder_lib.load_text_encoder("builtin:shapes-tiny", max_length=16,
                                       append_token_embeddings=True)
  emb, mask = both.encode(CAPTIONS)
  assert both.width == 128 and emb.shape == (3, 16, 128)
  np.testing.assert_array_equal(mask, encoders[-1].encode(CAPTIONS)[1])
  np.testing.assert_allclose(emb[..., :64], encoders[-1].encode(CAPTIONS)[0], rtol=1e-6, atol=1e-6)
  np.testing.assert_allclose(emb[..., 64:], encoders[0].encode(CAPTIONS)[0], rtol=1e-6, atol=1e-6)
  # The appended half has no context ("circle" after "red" and after "blue"); the first has.
  np.testing.assert_array_equal(emb[0, 2, 64:], emb[1, 2, 64:])
  assert np.abs(emb[0, 2, :64] - emb[1, 2, :64]).max() > 1e-2
  assert both.spec["append_token_embeddings"] is True
  assert "append_token_embeddings" not in encoders[-1].spec  # earlier caches' specs still match
  assert not encoder_lib.same_encoder(both.spec, encoders[-1].spec)


def test_stages_must_agree_on_the_appended_embeddings(tmp_path, encoders):
  both = {"text.append_token_embeddings": True, "text.width": 128}
  base, sr = (config_lib.load_config(f"configs/demo_{name}.py", both) for name in ("base", "sr"))
  cascade_lib.check_chain([base, sr], ["base", "sr"])
  assert encoder_lib.load_configured(base.text).width == base.text.width
  sr.text.append_token_embeddings = False
  with pytest.raises(cascade_lib.ChainError, match=r"text.append_token_embeddings=False"):
    cascade_lib.check_chain([base, sr], ["base", "sr"])
  # A cache encoded without the embeddings is refused by a config that reads them.
  root = str(tmp_path / "cache")
  cache_lib.create_or_check(root, cache_lib.Metadata(
      num_examples=0, part_size=8, width=128, max_length=16, dtype="float32",
      encoder={k: v for k, v in encoders[-1].spec.items() if k not in ("path", "dtype")},
      source={"kind": "test"}))
  base.data.embed_cache = root
  with pytest.raises(config_lib.ConfigError, match=r"text.append_token_embeddings=True"):
    train.open_embedding_cache(base)
