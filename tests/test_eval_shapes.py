"""The shapes judge on the dataset's own renders, and on images that break the prompt."""

import json

import numpy as np
import pytest
from PIL import Image

from helpers import run_cli_json  # pylint: disable=g-bad-import-order
from imagen_jax.data import preprocess
from imagen_jax.data import shapes as shapes_data
from imagen_jax.data import shapes_grammar as grammar
from imagen_jax.eval import shapes as judge


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
  scores = run_cli_json("eval", "--metric=shapes", f"--samples={tmp_path}", timeout=120)
  assert scores["validation"]["all_correct"] == 1.0 and scores["validation"]["n"] == 3
  assert scores["heldout"]["all_correct"] == pytest.approx(2 / 3)


def test_scores_by_kind_keep_single_and_two_object_prompts_apart():
  verdicts, records = [], []
  for i in range(12):
    ex = shapes_data.example("heldout", i)
    image = shapes_data.render(ex.placed, 64)
    pair = len(grammar.parse(ex.caption).objects) == 2
    if pair:
      image = np.zeros_like(image)  # every two-object sample blank: pairs 0%, singles 100%
    records.append({"prompt": ex.caption, "split": "heldout"})
    verdicts.append(judge.judge(image, ex.caption))
  scores = judge.score_verdicts_by_split(records, verdicts, by_kind=True)
  singles, pairs = scores["heldout singles"], scores["heldout pairs"]
  assert singles["n"] + pairs["n"] == scores["heldout"]["n"] == 12 and pairs["n"] > 0
  assert singles["all_correct"] == 1.0 and pairs["all_correct"] == 0.0
  assert scores["heldout"]["all_correct"] == pytest.approx(singles["n"] / 12)
  assert "heldout pairs" not in judge.score_verdicts_by_split(records, verdicts)


# --- Picture measures: background cleanliness and edge fidelity -----------------------------

def test_renders_have_a_black_background_and_crisp_edges():
  verdicts = [judge.judge(shapes_data.render(ex.placed, 64), ex.caption)
              for ex in (shapes_data.example("validation", i) for i in range(100))]
  scores = judge.score(verdicts)
  assert scores["background"] == 0.0 and scores["background_p99"] == 0.0
  # Edges are antialiased (partial pixels), so even a perfect render fits its template < 1.
  assert 0.9 < scores["edge_iou"] < 1.0, scores


def test_speckle_raises_the_background_measure_by_what_was_added():
  ex = shapes_data.example("validation", 3)
  clean = shapes_data.render(ex.placed, 64)
  rng = np.random.default_rng(0)
  speckle = rng.integers(0, 41, clean.shape[:2])  # uniform 0..40: mean 20, p99 ~40
  noisy = clean.copy()
  background = clean.max(axis=-1) == 0
  noisy[background] = speckle[background, None]
  verdict = judge.judge(noisy, ex.caption)
  assert 17.0 < verdict["background"] < 23.0, verdict
  assert 37.0 <= verdict["background_p99"] <= 40.0, verdict
  assert verdict["all_correct"]  # the judge still reads the object


def test_blurred_edges_lower_the_edge_iou():
  ex = shapes_data.example("validation", 5)
  clean = shapes_data.render(ex.placed, 64)
  from scipy import ndimage  # pylint: disable=g-import-not-at-top
  blurred = np.stack([ndimage.gaussian_filter(clean[..., c].astype(np.float32), 2.0)
                      for c in range(3)], axis=-1).round().astype(np.uint8)
  sharp = judge.judge(clean, ex.caption)["edge_ious"]
  soft = judge.judge(blurred, ex.caption)["edge_ious"]
  assert len(sharp) == len(soft) == len(ex.placed)
  assert max(soft) < min(sharp) - 0.05, (sharp, soft)
