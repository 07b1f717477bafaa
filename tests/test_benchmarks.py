"""The GPU suite's commands run on a CPU with tiny configs, so a rare GPU session is never lost
to a typo or a renamed flag."""

import importlib.util
import json
import os
import subprocess
import sys

import pytest

from helpers import REPO


@pytest.mark.slow
def test_gpu_suite_runs_on_tiny_configs(tmp_path):
  # One device, as on the one-GPU machine (not this test session's 8 fake CPU devices).
  env = {**os.environ, "TINY": "1", "OUT": str(tmp_path), "PYTHON": sys.executable,
         "XLA_FLAGS": ""}
  out = subprocess.run(["bash", "benchmarks/gpu_suite.sh"], cwd=REPO, env=env, text=True,
                       capture_output=True, timeout=1800)
  assert out.returncode == 0, (out.stdout + out.stderr)[-4000:]
  log = (tmp_path / "gpu_suite.log").read_text()
  results = [json.loads(line.split("RESULT_JSON ", 1)[1]) for line in log.splitlines()
             if line.startswith("RESULT_JSON ")]
  expected = ["train_step", "train_step", "sample", "sampler_overhead", "serve_load"]
  if importlib.util.find_spec("diffusers") is not None:  # the diffusers extra's row
    expected.append("if_vs_diffusers")
  assert [r["benchmark"] for r in results] == expected
  assert all(row["images_per_s"] > 0 for r in results[:3] for row in r["rows"])
  overhead = results[3]["rows"]
  assert {row["config"] for row in overhead} == {"configs/base64.py:tiny", "configs/sr256.py:tiny"}
  assert {row["sampler"] for row in overhead} >= {"ddim", "dpmpp_2m", "unipc"}
  # The network's step is a difference of two timings (noisy at tiny sizes): it is there.
  assert all(row["solver_ms_per_step"] > 0 and row["network_ms_per_step"] is not None
             for row in overhead)
  memory = json.loads(log.split("MEMORY_JSON ", 1)[1].splitlines()[0])
  assert memory["per_device_batch"] == 2 and memory["params"] > 0
  serving = results[4]
  assert [row["clients"] for row in serving["rows"][:2]] == ["1", "4"]
  assert all(row["ok"] > 0 and row["5xx"] == 0 and row["lost"] == 0 for row in serving["rows"])
  assert serving["exit_code"] == 0


def test_demo_ablation_parses_arms():
  from studies import demo_ablation
  name, overrides = demo_ablation.parse_arm(
      "wide: model.attn_resolutions=(16,8,4) model.text_pooling=False optimizer.lr=1e-3 "
      "text.encoder=builtin:shapes-tiny-pretrained")
  assert name == "wide"
  assert overrides == {"model.attn_resolutions": (16, 8, 4), "model.text_pooling": False,
                       "optimizer.lr": 1e-3, "text.encoder": "builtin:shapes-tiny-pretrained"}
  assert demo_ablation.parse_arm("demo:") == ("demo", {})
  for bad in ("no colon here", ": optimizer.lr=1", "x: optimizer.lr"):
    with pytest.raises(ValueError, match="arm"):
      demo_ablation.parse_arm(bad)


def _pair_example():
  from imagen_jax.data import shapes
  for i in range(100):  # the first validation pair whose objects differ in color and shape
    example = shapes.example("validation", i)
    if len(example.placed) == 2:
      first, second = (p.obj for p in example.placed)
      if first.color != second.color and first.shape != second.shape:
        return example
  raise AssertionError("no pair example")


def test_binding_diagnosis_reads_each_object_on_its_side():
  import dataclasses
  from imagen_jax.data import shapes
  from imagen_jax.data import shapes_grammar as grammar
  from studies import binding_diagnosis
  example = _pair_example()
  first, second = example.placed
  outcomes = lambda placed: binding_diagnosis.drawn_outcomes(example.prompt,
                                                             shapes.render(placed, 64))
  assert outcomes(example.placed) == ["right", "right"]
  # The two objects drawn in each other's place: each side shows the other's color.
  swapped = (dataclasses.replace(first, obj=second.obj), dataclasses.replace(second, obj=first.obj))
  assert outcomes(swapped) == ["wrong color", "wrong color"]
  # The first object drawn with the second's shape; then with the third shape.
  borrowed = dataclasses.replace(first, obj=grammar.Obj(first.obj.color, second.obj.shape))
  assert outcomes((borrowed, second)) == ["other's shape", "right"]
  third = next(s for s in grammar.SHAPES if s not in (first.obj.shape, second.obj.shape))
  assert outcomes((dataclasses.replace(first, obj=grammar.Obj(first.obj.color, third)),
                   second)) == ["third shape", "right"]
  assert outcomes((first,)) == ["missing", "missing"]
  # The object's coverage of a coarser grid keeps its area.
  cover = binding_diagnosis.coverage(first, 32, 8)
  assert cover.shape == (8, 8)
  assert abs(cover.mean() - shapes.object_mask(first, 32).mean()) < 1e-6


def test_binding_diagnosis_finds_each_objects_words():
  from imagen_jax.text import builtin
  from imagen_jax.text import tokenizer as tokenizer_lib
  from studies import binding_diagnosis
  tokenizer = tokenizer_lib.Tokenizer(builtin.shapes_vocabulary(), max_length=16)
  caption = "a red circle to the left of a blue square"
  ids = tokenizer([caption]).ids[0]
  words = binding_diagnosis.object_words(tokenizer, caption)
  for indices, (color, shape) in zip(words, (("red", "circle"), ("blue", "square"))):
    expected = tokenizer([f"{color} {shape}"]).ids[0][:2]
    assert list(ids[indices]) == list(expected)
