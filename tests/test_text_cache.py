"""The embedding cache and `imagen-jax encode`: kill, resume, verify, on local disk and gs://.

The job is killed for real (SIGKILL from this process) while a part is half written: a wrapper
around the CLI pauses the writer there and drops a marker file, so the kill lands at the same
point on every machine. The gs:// tests run the same flow against a GCS emulator on loopback.
"""

import json
import os
import pickle
import signal
import subprocess
import sys
import time

import ml_dtypes
import numpy as np
import pytest

from imagen_jax.core import config_lib
from imagen_jax.core import fileio
from imagen_jax.data import shapes_grammar
from imagen_jax.text import cache as cache_lib
from imagen_jax.text import encode_job
from imagen_jax.text import load_text_encoder
from imagen_jax.text import tokenizer as tokenizer_lib
from helpers import REPO, free_port, run_cli  # pylint: disable=g-bad-import-order

PART_SIZE, BATCH = 64, 16
LONG = " ".join(["a red circle to the left of a blue triangle"] * 4)  # > 16 tokens

# Pauses the writer inside part KILL_PART after its first batch is on disk (flushed), then
# tells the test through a marker file; the test sends SIGKILL.
KILL_WRAPPER = """
import os, sys, time
from imagen_jax.text import cache
marker, kill_part = os.environ["KILL_MARKER"], int(os.environ["KILL_PART"])
original_add = cache.PartWriter.add
def add(self, *args, **kwargs):
  original_add(self, *args, **kwargs)
  if self.part == kill_part:
    self._stream.flush()
    open(marker, "w").close()
    time.sleep(600)
cache.PartWriter.add = add
from imagen_jax import cli
cli.main(["imagen-jax", "encode"] + sys.argv[1:])
"""


def captions_list(n=300):
  corpus = shapes_grammar.vocabulary_corpus()
  rng = np.random.RandomState(0)
  lines = [corpus[i] for i in rng.randint(0, len(corpus), n)]
  lines[5] = ""          # empty caption: EOS only
  lines[77] = LONG       # truncated to max_length
  lines[140] = "A Corgi wearing a red bow tie"  # outside the shapes vocabulary
  return lines


def job_args(source, output, *extra):
  return ["--config=configs/encode.py:tiny", f"--config.source={source}",
          f"--config.output={output}", f"--config.part_size={PART_SIZE}",
          f"--config.batch_size={BATCH}", "--config.progress=False", *extra]


def run_until_killed(args, env, tmp_path, kill_part=2):
  marker = str(tmp_path / f"marker-{time.time_ns()}")
  proc = subprocess.Popen([sys.executable, "-c", KILL_WRAPPER, *args], cwd=REPO,
                          env=dict(env, KILL_MARKER=marker, KILL_PART=str(kill_part)),
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
  deadline = time.time() + 240
  while not os.path.exists(marker):
    if proc.poll() is not None:
      raise AssertionError(f"the job ended before the kill point:\n{proc.stdout.read()[-3000:]}")
    assert time.time() < deadline, "the job never reached the kill point"
    time.sleep(0.1)
  proc.send_signal(signal.SIGKILL)
  proc.wait(timeout=60)
  assert proc.returncode == -signal.SIGKILL


def summary(stdout):
  line = next(l for l in stdout.splitlines() if l.startswith("ENCODE_SUMMARY "))
  return json.loads(line[len("ENCODE_SUMMARY "):])


def check_against_fresh_encode(output, captions, keys):
  cache = cache_lib.EmbeddingCache(output)
  assert len(cache) == len(captions) and cache.max_length == 16 and cache.width == 64
  encoder = load_text_encoder("builtin:shapes-tiny", max_length=16)
  fresh, fresh_mask = encoder.encode(captions)
  for i in range(len(captions)):
    emb, mask = cache[i]
    np.testing.assert_array_equal(mask, fresh_mask[i], err_msg=f"example {i}")
    # Stored in bf16: equal to the fresh f32 encoding rounded to bf16 (one ulp of leeway for a
    # different batch composition).
    want = fresh[i].astype(ml_dtypes.bfloat16).astype(np.float32)
    np.testing.assert_allclose(emb, want, rtol=2 ** -7, atol=1e-6, err_msg=f"example {i}")
    assert not emb[~mask].any()
    assert cache.key(i) == keys[i]
  assert cache.length(5) == 1  # the empty caption: EOS only
  assert cache.length(77) == 16
  return cache, fresh_mask


def kill_resume_verify(source, output, captions, env, tmp_path):
  keys = [f"captions.txt:{i + 1}" for i in range(len(captions))]
  run_until_killed(job_args(source, output), env, tmp_path)
  # Parts 0 and 1 are committed; part 2 was half written when the job died.
  metadata = cache_lib.read_metadata(output)
  assert cache_lib.committed_parts(output, metadata) == {0, 1}
  cache = cache_lib.EmbeddingCache(output)
  assert cache.key(PART_SIZE + 3) == keys[PART_SIZE + 3]
  with pytest.raises(cache_lib.MissingEmbeddingError, match=r"example 130: .*part 2 "):
    cache[2 * PART_SIZE + 2]
  assert not cache.has(2 * PART_SIZE) and cache.has(0)

  out = run_cli("encode", *job_args(source, output, "--verify"), env=env, timeout=240)
  assert out.returncode == 1, out.stdout + out.stderr
  assert "INCOMPLETE: 2/5 parts" in out.stdout and "missing parts: 2, 3, 4" in out.stdout

  out = run_cli("encode", *job_args(source, output), env=env, timeout=240)
  assert out.returncode == 0, out.stderr[-3000:]
  stats = summary(out.stdout)
  assert stats["skipped_parts"] == 2 and stats["parts"] == 3
  assert stats["captions"] == len(captions) - 2 * PART_SIZE
  assert stats["truncated"] == 1

  out = run_cli("encode", *job_args(source, output, "--verify", "--config.verify_checksums=True"),
                env=env, timeout=240)
  assert out.returncode == 0, out.stdout + out.stderr
  assert "complete: 5/5 parts" in out.stdout
  return check_against_fresh_encode(output, captions, keys)


@pytest.mark.slow
def test_encode_kill_resume_verify_local(tmp_path):
  captions = captions_list()
  text = tmp_path / "captions.txt"
  text.write_text("\n".join(captions) + "\n")
  output = str(tmp_path / "cache")
  env = dict(os.environ, JAX_PLATFORMS="cpu", IMAGEN_JAX_CACHE=str(tmp_path / "models"))
  _, mask = kill_resume_verify(f"text:{text}", output, captions, env, tmp_path)

  # On disk: the real tokens only (bf16, width 64), not max_length rows per caption.
  data_bytes = fileio.du(os.path.join(output, "parts")) - sum(
      os.path.getsize(cache_lib.record_path(output, p)) for p in range(5))
  assert data_bytes == int(mask.sum()) * 64 * 2
  assert data_bytes < 0.75 * len(captions) * 16 * 64 * 2
  assert not [n for n in os.listdir(os.path.join(output, "parts")) if n.startswith(".tmp")]


def test_rerun_with_other_settings_is_refused(tmp_path):
  text = tmp_path / "captions.txt"
  text.write_text("a red circle at the center\na blue square at the top\n")
  config = config_lib.load_config("configs/encode.py:tiny", {
      "source": f"text:{text}", "output": str(tmp_path / "cache"), "progress": False,
      "batch_size": 8})
  encode_job.run(config)
  config.text.max_length = 12
  with pytest.raises(cache_lib.CacheMismatchError, match="max_length"):
    encode_job.run(config)


# ----------------------------------------------------------------------------- TFDS source

@pytest.fixture(scope="module")
def tfds_dir(tmp_path_factory):
  tfds = pytest.importorskip("tensorflow_datasets")
  data_dir = str(tmp_path_factory.mktemp("tfds"))

  class TinyCaptions(tfds.core.GeneratorBasedBuilder):
    """Captions only (no image feature: encoding images needs TensorFlow, captions do not)."""
    VERSION = tfds.core.Version("1.0.0")

    def _info(self):
      return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict({
          "captions": tfds.features.Sequence({"text": tfds.features.Text()}),
          "id": tfds.features.Text(),
          "label": tfds.features.ClassLabel(num_classes=3)}))

    def _split_generators(self, dl_manager):
      return {"train": self._generate_examples()}

    def _generate_examples(self):
      corpus = shapes_grammar.vocabulary_corpus()
      for i in range(40):
        yield i, {"captions": {"text": [corpus[i * 7], "second caption"]}, "id": f"img{i:03d}",
                  "label": i % 3}

  TinyCaptions(data_dir=data_dir, file_format="array_record").download_and_prepare()
  return data_dir


def test_tfds_source_sharded_over_eight_devices(tfds_dir, tmp_path, monkeypatch):
  import jax  # pylint: disable=g-import-not-at-top
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  assert jax.device_count() == 8
  monkeypatch.setenv("IMAGEN_JAX_CACHE", str(tmp_path / "models"))
  output = str(tmp_path / "cache")
  config = config_lib.load_config("configs/encode.py:tiny", {
      "source": "tfds:tiny_captions", "split": "train", "data_dir": tfds_dir,
      "caption_key": "captions/text", "key_feature": "id", "output": output,
      "batch_size": 8, "part_size": 16, "progress": False,
      "mesh.data": 2, "mesh.fsdp": 2, "mesh.model": 2})
  stats = encode_job.run(config)
  assert stats["captions"] == 40 and stats["parts"] == 3
  assert cache_lib.verify(output).ok
  source = tfds.data_source("tiny_captions", split="train", data_dir=tfds_dir)
  cache = cache_lib.EmbeddingCache(output)
  encoder = load_text_encoder("builtin:shapes-tiny", max_length=16)
  firsts = [source[i]["captions"]["text"][0].decode() for i in range(40)]
  fresh, _ = encoder.encode(firsts)
  for i in range(40):
    assert cache.key(i) == source[i]["id"].decode()
    np.testing.assert_allclose(cache[i][0], fresh[i], rtol=2 ** -7, atol=1e-6)
  # Readers travel to worker processes by pickle.
  again = pickle.loads(pickle.dumps(cache))
  np.testing.assert_array_equal(again[7][0], cache[7][0])


def test_non_string_caption_names_the_key(tfds_dir, tmp_path, monkeypatch):
  monkeypatch.setenv("IMAGEN_JAX_CACHE", str(tmp_path / "models"))
  config = config_lib.load_config("configs/encode.py:tiny", {
      "source": "tfds:tiny_captions", "data_dir": tfds_dir, "caption_key": "label",
      "key_feature": "id", "output": str(tmp_path / "cache"), "batch_size": 8,
      "part_size": 16, "progress": False})
  with pytest.raises(tokenizer_lib.CaptionError, match=r"'img\d{3}'.*not text"):
    encode_job.run(config)
  # Nothing half-done is accepted: no part was committed.
  metadata = cache_lib.read_metadata(str(tmp_path / "cache"))
  assert not cache_lib.committed_parts(str(tmp_path / "cache"), metadata)


# --------------------------------------------------------------------------- GCS emulator

@pytest.mark.slow
def test_encode_kill_resume_verify_on_gcs(gcs_emulator, tmp_path, monkeypatch):
  for key, value in gcs_emulator.items():
    monkeypatch.setenv(key, value)
  captions = captions_list()
  # The captions come from the bucket too.
  fileio.write_bytes("gs://imagen-test/in/captions.txt", ("\n".join(captions) + "\n").encode())
  output = "gs://imagen-test/cache/run1"
  env = dict(os.environ, JAX_PLATFORMS="cpu", IMAGEN_JAX_CACHE=str(tmp_path / "models"))
  cache, mask = kill_resume_verify("text:gs://imagen-test/in/captions.txt", output, captions,
                                   env, tmp_path)
  data_bytes = sum(fileio.size(cache_lib.data_path(output, p)) for p in range(5))
  assert data_bytes == int(mask.sum()) * 64 * 2
  assert cache.metadata.source["path"] == "gs://imagen-test/in/captions.txt"


# ---------------------------------------------------------------------------- multi-host

MULTIHOST_WRAPPER = """
import os, sys
import jax
jax.distributed.initialize(os.environ["COORDINATOR"], 2, int(os.environ["PROCESS_ID"]))
from imagen_jax import cli
cli.main(["imagen-jax", "encode"] + sys.argv[1:])
"""


@pytest.mark.slow
def test_two_processes_write_their_own_parts(tmp_path):
  """Two JAX processes (2 CPU devices each, gloo collectives) share one mesh and one cache.

  Process 0 owns parts 0, 2, 4, 6 (13 batches), process 1 parts 1, 3, 5 (12): the job pads the
  shorter one with empty steps so the SPMD program stays in lock-step.
  """
  captions = captions_list(200)
  text = tmp_path / "captions.txt"
  text.write_text("\n".join(captions) + "\n")
  output = str(tmp_path / "cache")
  env = dict(os.environ, JAX_PLATFORMS="cpu", IMAGEN_JAX_CACHE=str(tmp_path / "models"),
             XLA_FLAGS="--xla_force_host_platform_device_count=2",
             COORDINATOR=f"127.0.0.1:{free_port()}")
  args = ["--config=configs/encode.py:tiny", f"--config.source=text:{text}",
          f"--config.output={output}", "--config.part_size=32", "--config.batch_size=16",
          "--config.progress=False"]
  procs = [subprocess.Popen([sys.executable, "-c", MULTIHOST_WRAPPER, *args], cwd=REPO,
                            env=dict(env, PROCESS_ID=str(i)), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True) for i in range(2)]
  outs = [p.communicate(timeout=300)[0] for p in procs]
  assert [p.returncode for p in procs] == [0, 0], "\n".join(o[-2000:] for o in outs)
  stats = [summary(o) for o in outs]
  assert [s["parts"] for s in stats] == [4, 3]
  assert sum(s["captions"] for s in stats) == 200
  assert cache_lib.verify(output, checksums=True).ok
  keys = [f"captions.txt:{i + 1}" for i in range(200)]
  cache = cache_lib.EmbeddingCache(output)
  encoder = load_text_encoder("builtin:shapes-tiny", max_length=16)
  fresh, _ = encoder.encode(captions)
  for i in range(200):
    assert cache.key(i) == keys[i]
    np.testing.assert_allclose(cache[i][0], fresh[i], rtol=2 ** -7, atol=1e-6)


def test_weights_on_gcs_hf_and_converted(gcs_emulator, tmp_path, monkeypatch):
  """A Hugging Face directory read from gs://, converted to Orbax on gs://, loaded sharded."""
  from imagen_jax.text import builtin  # pylint: disable=g-import-not-at-top
  from imagen_jax.core import partitioning  # pylint: disable=g-import-not-at-top
  for key, value in gcs_emulator.items():
    monkeypatch.setenv(key, value)
  monkeypatch.setenv("IMAGEN_JAX_CACHE", str(tmp_path / "models"))
  local = builtin.materialize("builtin:shapes-tiny")
  for name in os.listdir(local):
    with open(os.path.join(local, name), "rb") as f:
      fileio.write_bytes(f"gs://imagen-test/hf/{name}", f.read())
  captions = ["a red circle at the center", "", "a blue square above a white triangle"]
  want, _ = load_text_encoder(local, max_length=16).encode(captions)
  from_hf, _ = load_text_encoder("gs://imagen-test/hf", max_length=16).encode(captions)
  np.testing.assert_array_equal(from_hf, want)
  encode_job.convert("gs://imagen-test/hf", "gs://imagen-test/orbax")
  mesh = partitioning.make_mesh({"data": 2, "fsdp": 2, "model": 2})
  encoder = load_text_encoder("gs://imagen-test/orbax", max_length=16, mesh=mesh)
  np.testing.assert_allclose(encoder.encode(captions)[0], want, atol=1e-5)


def test_encode_reads_captions_as_training_does_from_shapes_and_folders(shapes_data_dir, tmp_path,
                                                                        monkeypatch):
  # One caption reader (data/sources.py) feeds the cache and the pipeline: every source kind.
  from PIL import Image  # pylint: disable=g-import-not-at-top
  from imagen_jax.data import pipeline as pipeline_lib  # pylint: disable=g-import-not-at-top
  from imagen_jax.data import sources  # pylint: disable=g-import-not-at-top
  from helpers import SHAPES_SIZES, stage_config  # pylint: disable=g-import-not-at-top
  monkeypatch.setenv("IMAGEN_JAX_CACHE", str(tmp_path / "models"))
  encoder = load_text_encoder("builtin:shapes-tiny", max_length=16)
  folder = tmp_path / "photos"
  folder.mkdir()
  for i, caption in enumerate(["a red circle at the top", "a blue  square\nat the center",
                               "a green triangle to the left of a red circle"]):
    Image.fromarray(np.full((32, 32, 3), 40 * i, np.uint8)).save(folder / f"{i}.png")
    (folder / f"{i}.txt").write_text(caption)
  caches = {}
  for source, data_dir in (("shapes", shapes_data_dir), (f"folder:{folder}", str(tmp_path / "tfds"))):
    output = caches[source] = str(tmp_path / f"cache-{len(caches)}")
    config = config_lib.load_config("configs/encode.py:tiny", {
        "source": source, "split": "train", "data_dir": data_dir, "output": output,
        "batch_size": 8, "part_size": 64, "progress": False})
    stats = encode_job.run(config)
    captions = sources.get_captions(sources.source_config(source, "train", data_dir))
    assert stats["captions"] == len(captions) == {"shapes": SHAPES_SIZES["train"]}.get(source, 3)
    cache = cache_lib.EmbeddingCache(output)
    fresh, _ = encoder.encode(list(captions))
    for i in range(len(captions)):
      assert cache.key(i) == f"train[{i}]"
      np.testing.assert_allclose(cache[i][0], fresh[i], rtol=2 ** -7, atol=1e-6)
  # Whitespace is normalized as training normalizes it.
  assert sources.get_captions(sources.source_config(
      f"folder:{folder}", "train", str(tmp_path / "tfds")))[1] == "a blue square at the center"
  # The training pipeline pairs each example with the cache row of its index: its own caption.
  config = stage_config(**{"data.data_dir": shapes_data_dir, "data.embed_cache": caches["shapes"],
                           "text.width": encoder.width, "text.max_length": 16})
  batch = next(pipeline_lib.make_pipeline(
      config, embedding_lookup=cache_lib.EmbeddingCache(caches["shapes"]).__getitem__))
  source, info = sources.get_data_source(config.data)
  expected, _ = encoder.encode([sources.first_caption(source[int(i)], info.caption_key)[0]
                                for i in batch["index"]])
  np.testing.assert_allclose(batch["text_emb"], expected, rtol=2 ** -7, atol=1e-6)
