"""The T5 v1.1 encoder: parity with Hugging Face, weight formats, tokenizer, builtin model.

The reference is made here: a random tiny T5 v1.1 built with `transformers` (PyTorch, CPU) and a
SentencePiece model trained on a few hundred generated sentences, saved as a Hugging Face
directory. Nothing is downloaded.
"""

import io
import json
import os
import random
import shutil

import jax
import numpy as np
import pytest

from imagen_jax.core import partitioning
from imagen_jax.text import builtin
from imagen_jax.text import encoder as encoder_lib
from imagen_jax.text import load_text_encoder
from imagen_jax.text import t5
from imagen_jax.text import tokenizer as tokenizer_lib
from imagen_jax.text import weights

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

WORDS = ("the a an of to in on with red green blue yellow big small dog cat bird house tree car "
         "runs jumps sits under over near quickly slowly painting photo corgi lighthouse sunset "
         "mountain river city street night morning wearing bow tie oil").split()

TEXTS = [
    "a red dog",
    "",
    "The corgi sits near the lighthouse at sunset, quickly!",
    "an oil painting of a big yellow bird over the river at night",
    " ".join(WORDS),  # longer than max_length: truncated
]
MAX_LENGTH = 24


def train_spiece(sentences, vocab_size=60) -> bytes:
  import sentencepiece as spm  # pylint: disable=g-import-not-at-top
  out = io.BytesIO()
  spm.SentencePieceTrainer.train(
      sentence_iterator=iter(sentences), model_writer=out, vocab_size=vocab_size,
      model_type="unigram", pad_id=0, eos_id=1, unk_id=2, bos_id=-1, num_threads=1,
      minloglevel=2)
  return out.getvalue()


def make_hf_dir(path, seed=0, relative_attention_num_buckets=8, relative_attention_max_distance=20):
  """A random tiny T5 v1.1 (full encoder-decoder, as released) saved by transformers."""
  rng = random.Random(seed)
  sentences = [" ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 14))) for _ in range(400)]
  vocab = train_spiece(sentences)
  torch.manual_seed(seed)
  config = transformers.T5Config(
      vocab_size=192, d_model=32, d_kv=8, d_ff=48, num_heads=6, num_layers=2,
      num_decoder_layers=1, feed_forward_proj="gated-gelu", tie_word_embeddings=False,
      relative_attention_num_buckets=relative_attention_num_buckets,
      relative_attention_max_distance=relative_attention_max_distance, dropout_rate=0.0)
  model = transformers.T5ForConditionalGeneration(config).eval()
  with torch.no_grad():  # norms are initialised to 1: make them matter
    for name, p in model.named_parameters():
      if "layer_norm" in name:
        p.uniform_(0.5, 1.5)
  model.save_pretrained(path)
  with open(os.path.join(path, "spiece.model"), "wb") as f:
    f.write(vocab)
  return model


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
  path = str(tmp_path_factory.mktemp("hf_t5"))
  make_hf_dir(path)
  return path


def reference(hf_dir, texts, max_length):
  tok = transformers.T5Tokenizer.from_pretrained(hf_dir)
  enc = tok(texts, padding="max_length", max_length=max_length, truncation=True,
            return_tensors="pt")
  model = transformers.T5EncoderModel.from_pretrained(hf_dir).eval()
  with torch.no_grad():
    out = model(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"])
  return (enc["input_ids"].numpy(), enc["attention_mask"].numpy().astype(bool),
          out.last_hidden_state.numpy())


@pytest.mark.slow
def test_parity_with_transformers(hf_dir):
  ref_ids, ref_mask, ref_emb = reference(hf_dir, TEXTS, MAX_LENGTH)
  encoder = load_text_encoder(hf_dir, max_length=MAX_LENGTH, dtype="float32")
  emb, mask = encoder.encode(TEXTS)
  ids, _ = encoder.tokenize(TEXTS)
  np.testing.assert_array_equal(ids, ref_ids)
  np.testing.assert_array_equal(mask, ref_mask)
  assert len(set(mask.sum(1))) >= 4  # the batch really has different lengths
  assert emb.shape == (len(TEXTS), MAX_LENGTH, 32) and emb.dtype == np.float32
  np.testing.assert_allclose(emb[mask], ref_emb[ref_mask], atol=1e-4, rtol=0)
  assert not emb[~mask].any()
  assert encoder.width == 32 and encoder.max_length == MAX_LENGTH


def test_bfloat16_compute_stays_close(hf_dir):
  _, ref_mask, ref_emb = reference(hf_dir, TEXTS[:3], MAX_LENGTH)
  emb, mask = load_text_encoder(hf_dir, max_length=MAX_LENGTH, dtype="bfloat16").encode(TEXTS[:3])
  np.testing.assert_array_equal(mask, ref_mask)
  err = np.abs(emb[mask] - ref_emb[ref_mask]).max()
  assert 0 < err < 0.1, err


@pytest.mark.parametrize("buckets,max_distance", [(32, 128), (8, 20), (16, 64)])
def test_relative_position_buckets_match_reference(buckets, max_distance):
  from transformers.models.t5 import modeling_t5  # pylint: disable=g-import-not-at-top
  length = 600
  pos = torch.arange(length)
  relative = pos[None, :] - pos[:, None]
  ref = modeling_t5.T5Attention._relative_position_bucket(
      relative, bidirectional=True, num_buckets=buckets, max_distance=max_distance).numpy()
  np.testing.assert_array_equal(t5.relative_position_buckets(length, buckets, max_distance), ref)


def test_apply_is_pure_and_jittable(hf_dir):
  encoder = load_text_encoder(hf_dir, max_length=MAX_LENGTH)
  ids, mask = encoder.tokenize(TEXTS[:2])
  emb = jax.jit(encoder.apply)(encoder.params, ids, mask)
  np.testing.assert_allclose(np.asarray(emb), encoder.encode(TEXTS[:2])[0], atol=1e-6)


# ------------------------------------------------------------------------------------- t5x

def write_t5x_checkpoint(path, hf_dir, step=1000):
  """The layout t5x writes: checkpoint_N/checkpoint (msgpack) + zarr arrays beside it."""
  import tensorstore as ts  # pylint: disable=g-import-not-at-top
  from flax import serialization  # pylint: disable=g-import-not-at-top
  config, params = weights.load_hf(hf_dir)
  ckpt = os.path.join(path, f"checkpoint_{step}")
  os.makedirs(ckpt)
  target = {"token_embedder": params["token_embedder"],
            "encoder": {k: v for k, v in params.items() if k != "token_embedder"},
            "decoder": {"decoder_norm": {"scale": np.ones(config.d_model, np.float32)},
                        "logits_dense": {"kernel": np.zeros((config.d_model, 7), np.float32)}}}

  def store(tree, prefix):
    out = {}
    for key, value in tree.items():
      name = f"{prefix}.{key}"
      if isinstance(value, dict):
        out[key] = store(value, name)
      elif value.ndim == 1:
        out[key] = value  # t5x keeps some small arrays inline in the msgpack file
      else:
        spec = {"driver": "zarr", "dtype": "float32", "kvstore": {"driver": "file", "path": name},
                "metadata": {"chunks": list(value.shape), "compressor": {"id": "gzip"},
                             "shape": list(value.shape)}}
        absolute = json.loads(json.dumps(spec))
        absolute["kvstore"]["path"] = os.path.join(ckpt, name)
        ts.open(absolute, create=True).result().write(value).result()
        out[key] = spec  # relative to the checkpoint directory, as t5x stores it
    return out

  contents = {"version": 3, "optimizer": {
      "target": store(target, "target"),
      "state": {"step": np.int64(step), "param_states": {}}}}
  with open(os.path.join(ckpt, "checkpoint"), "wb") as f:
    f.write(serialization.msgpack_serialize(contents))
  shutil.copy(os.path.join(hf_dir, "spiece.model"), os.path.join(path, "spiece.model"))
  return config


def test_t5x_layout_loads_to_the_same_tree(hf_dir, tmp_path):
  t5x_dir = str(tmp_path / "t5x")
  # The max distance is not in t5x tensors: the config.json beside the checkpoint supplies it.
  shutil.copy(os.path.join(hf_dir, "config.json"), tmp_path / "config.json")
  write_t5x_checkpoint(t5x_dir, hf_dir)
  shutil.copy(os.path.join(hf_dir, "config.json"), os.path.join(t5x_dir, "config.json"))
  hf_config, hf_params = weights.load_hf(hf_dir)
  t5x_config, t5x_params = weights.load_t5x(t5x_dir)
  assert t5x_config == hf_config
  flat_hf, flat_t5x = weights.flatten(hf_params), weights.flatten(t5x_params)
  assert sorted(flat_hf) == sorted(flat_t5x)
  for name in flat_hf:
    np.testing.assert_array_equal(flat_t5x[name], flat_hf[name], err_msg=name)
  a = load_text_encoder(hf_dir, max_length=MAX_LENGTH).encode(TEXTS)[0]
  b = load_text_encoder(t5x_dir, max_length=MAX_LENGTH).encode(TEXTS)[0]
  np.testing.assert_array_equal(a, b)


def test_t5x_config_is_inferred_from_tensors(hf_dir, tmp_path):
  write_t5x_checkpoint(str(tmp_path), hf_dir)
  config, _ = weights.load_t5x(str(tmp_path))
  hf_config, _ = weights.load_hf(hf_dir)
  # Everything but the max distance (not stored in tensors; T5 v1.1's 128 by default).
  assert config.relative_attention_max_distance == 128
  assert config == t5.T5Config(**{**hf_config.to_dict(), "relative_attention_max_distance": 128})


# ------------------------------------------------------------------------- mismatch errors

def _rewrite_safetensors(hf_dir, tmp_path, edit):
  from safetensors.numpy import load_file, save_file  # pylint: disable=g-import-not-at-top
  bad = tmp_path / "bad"
  shutil.copytree(hf_dir, bad)
  tensors = load_file(str(bad / "model.safetensors"))
  edit(tensors)
  save_file(tensors, str(bad / "model.safetensors"))
  return str(bad)


@pytest.mark.parametrize("edit,needle", [
    (lambda t: t.pop("encoder.block.1.layer.1.DenseReluDense.wi_1.weight"),
     "missing tensors (1): encoder.block.1.layer.1.DenseReluDense.wi_1.weight"),
    (lambda t: t.update({"encoder.block.0.layer.0.SelfAttention.q.bias": np.zeros(48, np.float32)}),
     "unexpected tensors (1): encoder.block.0.layer.0.SelfAttention.q.bias"),
    (lambda t: t.update({"encoder.final_layer_norm.weight": np.ones(33, np.float32)}),
     "shape conflict: encoder.final_layer_norm.weight is (33,), expected (32,)"),
])
def test_hf_mismatch_names_the_tensor(hf_dir, tmp_path, edit, needle):
  bad = _rewrite_safetensors(hf_dir, tmp_path, edit)
  with pytest.raises(weights.WeightMismatchError) as info:
    load_text_encoder(bad, max_length=8)
  assert needle in str(info.value)


def test_sharded_safetensors_index(hf_dir, tmp_path):
  from safetensors.numpy import load_file, save_file  # pylint: disable=g-import-not-at-top
  sharded = tmp_path / "sharded"
  shutil.copytree(hf_dir, sharded)
  tensors = load_file(str(sharded / "model.safetensors"))
  os.remove(sharded / "model.safetensors")
  names = sorted(tensors)
  weight_map = {}
  for i, part in enumerate((names[::2], names[1::2])):
    fname = f"model-0000{i + 1}-of-00002.safetensors"
    save_file({n: tensors[n] for n in part}, str(sharded / fname))
    weight_map.update({n: fname for n in part})
  (sharded / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
  a = load_text_encoder(hf_dir, max_length=MAX_LENGTH).encode(TEXTS[:2])[0]
  b = load_text_encoder(str(sharded), max_length=MAX_LENGTH).encode(TEXTS[:2])[0]
  np.testing.assert_array_equal(a, b)


def test_unknown_path_explains_offline_loading():
  with pytest.raises(FileNotFoundError, match="offline"):
    load_text_encoder("t5-v1_1-xxl")


# ----------------------------------------------------------------------------- tokenizer

def test_tokenizer_edge_cases(hf_dir, caplog):
  tok = tokenizer_lib.Tokenizer.from_file(os.path.join(hf_dir, "spiece.model"), max_length=6)
  batch = tok(["", "a red dog", "the big yellow bird runs over the city at night"])
  np.testing.assert_array_equal(batch.ids[0], [1, 0, 0, 0, 0, 0])  # EOS only
  np.testing.assert_array_equal(batch.mask[0], [1, 0, 0, 0, 0, 0])
  assert batch.truncated == 1 and tok.truncated_total == 1
  assert batch.lengths[2] == 6 and batch.ids[2, -1] == tok.eos_id  # EOS kept after the cut
  assert batch.mask[2].all()
  with pytest.raises(tokenizer_lib.CaptionError, match="'img_0042'"):
    tok(["fine", 42], keys=["img_0041", "img_0042"])
  with pytest.raises(tokenizer_lib.CaptionError, match="None"):
    tok([None])
  assert tok([b"a red dog"]).ids.tolist() == tok(["a red dog"]).ids.tolist()


def test_tokenizer_truncation_warns(hf_dir, monkeypatch):
  tok = tokenizer_lib.Tokenizer.from_file(os.path.join(hf_dir, "spiece.model"), max_length=4)
  seen = []
  monkeypatch.setattr(tokenizer_lib.logging, "warning", lambda msg, *a: seen.append(msg % a))
  tok(["the big yellow bird runs", "dog"])
  assert len(seen) == 1 and "1 of 2 captions" in seen[0] and "max_length=4" in seen[0]


def test_tokenizer_pickles(hf_dir):
  import pickle  # pylint: disable=g-import-not-at-top
  tok = tokenizer_lib.Tokenizer.from_file(os.path.join(hf_dir, "spiece.model"), max_length=8)
  again = pickle.loads(pickle.dumps(tok))
  np.testing.assert_array_equal(again(TEXTS).ids, tok(TEXTS).ids)


def _seqio_available():
  try:
    import seqio  # pylint: disable=g-import-not-at-top,unused-import
    return True
  except ImportError:
    return False


@pytest.mark.tf
@pytest.mark.skipif(not _seqio_available(),
                    reason="seqio is not installed (it comes with the tf extra: "
                           "pip install 'imagen-jax[tf]')")
def test_seqio_backend_gives_the_same_ids(hf_dir):
  path = os.path.join(hf_dir, "spiece.model")
  ours = tokenizer_lib.Tokenizer.from_file(path, max_length=MAX_LENGTH)
  seqio_tok = tokenizer_lib.Tokenizer.from_file(path, max_length=MAX_LENGTH, backend="seqio")
  np.testing.assert_array_equal(seqio_tok(TEXTS).ids, ours(TEXTS).ids)


# -------------------------------------------------------------------- builtin:shapes-tiny

def test_builtin_shapes_tiny_is_reproducible(tmp_path, monkeypatch):
  from imagen_jax.data import shapes_grammar  # pylint: disable=g-import-not-at-top
  digests = []
  for name in ("a", "b"):
    monkeypatch.setenv("IMAGEN_JAX_CACHE", str(tmp_path / name))
    path = builtin.materialize("builtin:shapes-tiny")
    assert path.startswith(str(tmp_path / name))
    digests.append(builtin.directory_digest(path))
  assert digests[0] == digests[1]
  # The weights' bytes are pinned: a change of stream (NumPy) or layout shows up here.
  import hashlib  # pylint: disable=g-import-not-at-top
  with open(os.path.join(path, "model.safetensors"), "rb") as f:
    assert hashlib.sha256(f.read()).hexdigest() == SHAPES_TINY_WEIGHTS_SHA256
  encoder = load_text_encoder("builtin:shapes-tiny", max_length=16)
  assert encoder.width == 64 and encoder.spec["d_model"] == 64
  corpus = shapes_grammar.vocabulary_corpus()
  _, mask = encoder.tokenize(corpus)
  assert mask.sum(1).max() <= 16 and encoder.tokenizer.truncated_total == 0
  # Each grammar word is one piece: captions stay short enough for max_length 16.
  ids, mask = encoder.tokenize(["a red circle at the top left corner"])
  assert mask.sum() == 9
  # The shipped vocabulary is what the documented recipe trains (ids, not bytes: those may
  # change with the sentencepiece version).
  retrained = tokenizer_lib.Tokenizer(builtin.train_shapes_vocabulary(), max_length=16)
  np.testing.assert_array_equal(retrained(corpus).ids, encoder.tokenize(corpus)[0])


def test_builtin_vocabulary_spells_new_words_and_keeps_v1(tmp_path, monkeypatch):
  """Byte fallback: a word the grammar never used is spelled in pieces and bytes (fine-tuning
  can teach it), and nothing the grammar uses moved (v1 cascades see the same embeddings)."""
  from imagen_jax.data import shapes_grammar  # pylint: disable=g-import-not-at-top
  monkeypatch.setenv("IMAGEN_JAX_CACHE", str(tmp_path))
  encoder = load_text_encoder("builtin:shapes-tiny", max_length=16)
  tok = encoder.tokenizer
  assert tok.vocab_size == builtin.GRAMMAR_PIECES + 256
  unk = tok._sp.unk_id()  # pylint: disable=protected-access
  new_words = ["blicket", "dax", "zyx", "quokka", "ünï", "日本"]
  spelled = {w: tok.pieces(f"a {w}") for w in new_words}
  for word, ids in spelled.items():
    assert unk not in ids, (word, ids)
    assert tok._sp.decode(ids) == f"a {word}"  # pylint: disable=protected-access
  assert len({tuple(ids) for ids in spelled.values()}) == len(new_words)
  # The grammar's captions tokenize exactly as with the 128-piece vocabulary of v1.
  v1_vocab = tmp_path / "v1.model"
  with open(str(v1_vocab), "wb") as f:
    f.write(_without_byte_pieces(builtin.shapes_vocabulary()))
  v1 = tokenizer_lib.Tokenizer.from_file(str(v1_vocab), max_length=16)
  assert v1.vocab_size == builtin.GRAMMAR_PIECES
  corpus = shapes_grammar.vocabulary_corpus()
  np.testing.assert_array_equal(v1(corpus).ids, tok(corpus).ids)
  assert unk in v1.pieces("a blicket")  # what v1 did with the new word
  # v1's weights are v2's: the same stream, the byte rows drawn after it.
  config = builtin.shapes_tiny_config(tok.vocab_size)
  v2_weights = builtin.random_params(config)
  v1_weights = builtin.random_params(builtin.shapes_tiny_config(builtin.GRAMMAR_PIECES),
                                     stream_vocab=builtin.GRAMMAR_PIECES)
  assert v1_weights.keys() == v2_weights.keys()
  for name, v1_array in v1_weights.items():
    np.testing.assert_array_equal(v2_weights[name][:len(v1_array)], v1_array, err_msg=name)
  import hashlib  # pylint: disable=g-import-not-at-top
  builtin.write_hf_dir(str(tmp_path / "v1"), builtin.shapes_tiny_config(builtin.GRAMMAR_PIECES),
                       v1_weights, b"")
  with open(str(tmp_path / "v1" / "model.safetensors"), "rb") as f:
    assert hashlib.sha256(f.read()).hexdigest() == SHAPES_TINY_V1_WEIGHTS_SHA256
  embedding = [n for n in v2_weights if v2_weights[n].shape[0] == tok.vocab_size]
  assert len(embedding) == 1 and np.std(v2_weights[embedding[0]][builtin.GRAMMAR_PIECES:]) > 0.5


def _without_byte_pieces(model_proto: bytes) -> bytes:
  from sentencepiece import sentencepiece_model_pb2 as model_pb2  # pylint: disable=g-import-not-at-top
  proto = model_pb2.ModelProto()
  proto.ParseFromString(model_proto)
  del proto.pieces[builtin.GRAMMAR_PIECES:]
  proto.trainer_spec.byte_fallback = False
  return proto.SerializeToString()


SHAPES_TINY_WEIGHTS_SHA256 = "24a45064f7040481f614a9cac0626cefe4f681a816df98c4a850a02c49405f30"
SHAPES_TINY_V1_WEIGHTS_SHA256 = "9f047bf70c30c78086120f29554e64541cd52335f727d59998d9c45f0cccedba"


# -------------------------------------------------------------- Orbax conversion, sharding

def test_sharded_encode_matches_single_device(hf_dir):
  assert jax.device_count() == 8
  mesh = partitioning.make_mesh({"data": 2, "fsdp": 2, "model": 2})
  sharded = load_text_encoder(hf_dir, max_length=MAX_LENGTH, mesh=mesh)
  kernel = sharded.params["layers_0"]["mlp"]["wi_0"]["kernel"]
  assert kernel.sharding.spec == jax.sharding.PartitionSpec("fsdp", "model")
  plain = load_text_encoder(hf_dir, max_length=MAX_LENGTH)
  np.testing.assert_allclose(sharded.encode(TEXTS)[0], plain.encode(TEXTS)[0], atol=1e-5)


def test_convert_to_orbax_and_load_sharded(hf_dir, tmp_path):
  from imagen_jax.text import encode_job  # pylint: disable=g-import-not-at-top
  out = str(tmp_path / "converted")
  encode_job.convert(hf_dir, out)
  assert weights.is_converted_dir(out)
  _, hf_params = weights.load_hf(hf_dir)
  config, params = weights.load_converted(out)
  for name, value in weights.flatten(hf_params).items():
    np.testing.assert_array_equal(np.asarray(weights.flatten(params)[name]), value)
  mesh = partitioning.make_mesh({"data": 2, "fsdp": 2, "model": 2})
  encoder = load_text_encoder(out, max_length=MAX_LENGTH, mesh=mesh)
  assert encoder.params["token_embedder"]["embedding"].sharding.spec == \
      jax.sharding.PartitionSpec("model", "fsdp")
  reference_emb = load_text_encoder(hf_dir, max_length=MAX_LENGTH).encode(TEXTS)[0]
  np.testing.assert_allclose(encoder.encode(TEXTS)[0], reference_emb, atol=1e-5)
  assert encoder_lib.same_encoder(encoder.spec, load_text_encoder(hf_dir).spec) is False  # max_length
  assert encoder_lib.same_encoder(
      encoder.spec, load_text_encoder(hf_dir, max_length=MAX_LENGTH, dtype="bfloat16").spec)
