"""The shapes judge on the dataset's own renders, and on images that break the prompt."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from imagen_jax.data import preprocess
from imagen_jax.data import shapes as shapes_data
from imagen_jax.data import shapes_grammar as grammar
from imagen_jax.eval import shapes as judge

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.parametrize("split", ["validation", "heldout"])
@pytest.mark.parametrize("size", [64, 32])
def test_judge_passes_the_datasets_own_renders(split, size):
  verdicts = []
  for index in range(400):
    ex = shapes_data.example(split, index)
    image = shapes_data.render(ex.placed, 64)
    if size != 64:  # the way the pipeline down-samples (SR low-res, 32x32 base stage)
      image = preprocess.downsample(image, size)
    verdicts.append(judge.judge(image, ex.caption))
  scores = judge.score(verdicts)
  assert scores["all_correct"] >= 0.99, scores


def _single(color, shape, cx, cy, size=0.32):
  return shapes_data.Placed(grammar.Obj(color, shape), cx, cy, size)


def test_judge_catches_each_wrong_attribute():
  caption = "a red circle at the top left corner"
  right = shapes_data.render([_single("red", "circle", 0.2, 0.2)], 64)
  assert judge.judge(right, caption)["all_correct"]
  cases = {
      "color": [_single("blue", "circle", 0.2, 0.2)],
      "shape": [_single("red", "triangle", 0.2, 0.2)],
      "position": [_single("red", "circle", 0.8, 0.8)],
      "objects": [_single("red", "circle", 0.2, 0.2), _single("blue", "square", 0.8, 0.8)],
  }
  for attribute, placed in cases.items():
    verdict = judge.judge(shapes_data.render(placed, 64), caption)
    assert not verdict[attribute], (attribute, verdict)
    assert not verdict["all_correct"]
  assert not judge.judge(np.zeros((64, 64, 3), np.uint8), caption)["objects"]


def test_judge_checks_the_relation():
  caption = "a red circle to the left of a blue square"
  left, right = _single("red", "circle", 0.2, 0.5), _single("blue", "square", 0.8, 0.5)
  assert judge.judge(shapes_data.render([left, right], 64), caption)["all_correct"]
  swapped = [_single("red", "circle", 0.8, 0.5), _single("blue", "square", 0.2, 0.5)]
  verdict = judge.judge(shapes_data.render(swapped, 64), caption)
  assert verdict["color"] and verdict["shape"] and not verdict["position"]


def test_judge_survives_speckle_noise():
  rng = np.random.default_rng(0)
  ex = shapes_data.example("validation", 3)
  image = shapes_data.render(ex.placed, 64).astype(np.float32)
  noisy = np.clip(image + rng.normal(0, 25, image.shape), 0, 255).astype(np.uint8)
  assert judge.judge(noisy, ex.caption)["all_correct"]


def test_eval_command_reports_scores_per_split(tmp_path):
  records = []
  for i in range(6):
    split = "validation" if i < 3 else "heldout"
    ex = shapes_data.example(split, i)
    image = shapes_data.render(ex.placed, 64)
    if i == 5:
      image = np.zeros_like(image)  # one blank sample: heldout all-correct = 2/3
    Image.fromarray(image).save(tmp_path / f"{i:05d}.png")
    records.append({"file": f"{i:05d}.png", "prompt": ex.caption, "split": split})
  (tmp_path / "samples.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
  out = subprocess.run([sys.executable, "-m", "imagen_jax", "eval", "--metric=shapes",
                        f"--samples={tmp_path}"], cwd=REPO, capture_output=True, text=True,
                       timeout=120)
  assert out.returncode == 0, out.stderr
  scores = json.loads(out.stdout)
  assert scores["validation"]["all_correct"] == 1.0 and scores["validation"]["n"] == 3
  assert scores["heldout"]["all_correct"] == pytest.approx(2 / 3)
