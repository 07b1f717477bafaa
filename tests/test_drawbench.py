"""DrawBench: the CSV, sampling 8 images per prompt (resumable), the rating page, the tally."""

import base64
import html.parser
import json
import os
import shutil
import subprocess

import numpy as np
import pytest
from PIL import Image

from helpers import run_cli_json  # pylint: disable=g-bad-import-order
from imagen_jax.eval import drawbench

# The paper's CSV format (a prompt may hold commas and quotes).
CSV = ('Prompts,Category\n'
       '"A red circle at the top left corner.",Colors\n'
       '"A blue square, a green triangle and a red circle.",Colors\n'
       'Three yellow triangles.,Counting\n'
       '"A sign that says ""imagen-jax"".",Text\n')
PROMPTS = ["A red circle at the top left corner.",
           "A blue square, a green triangle and a red circle.",
           "Three yellow triangles.", 'A sign that says "imagen-jax".']
CATEGORIES = ["Colors", "Colors", "Counting", "Text"]


def write_csv(path, text=CSV):
  path.write_text(text, encoding="utf-8")
  return str(path)


def fake_outdir(path, prompts, categories, value, num_samples=8):
  """An outdir as `imagen-jax eval --metric=drawbench` writes it, with flat-colour images."""
  path.mkdir()
  records = []
  for i, (prompt, category) in enumerate(zip(prompts, categories)):
    for j in range(num_samples):
      index = i * num_samples + j
      image = np.full((16, 16, 3), (value + 7 * index) % 256, np.uint8)
      Image.fromarray(image).save(path / f"{index:05d}.png")
      records.append({"prompt": prompt, "category": category, "prompt_index": i,
                      "file": f"{index:05d}.png", "index": index, "sample": j, "seed": 0,
                      "stages": []})
  (path / "samples.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
  return str(path)


class PageParser(html.parser.HTMLParser):
  """Sections (caption, images per side, questions with their choices) and external refs."""

  def __init__(self):
    super().__init__()
    self.items, self.external, self.scripts = [], [], []
    self._where = None

  def handle_starttag(self, tag, attrs):
    attrs = dict(attrs)
    for key in ("src", "href"):
      if key in attrs and not attrs[key].startswith("data:"):
        self.external.append(attrs[key])
    if tag == "link":
      self.external.append(str(attrs))
    if tag == "section":
      self.items.append({"item": int(attrs["data-item"]), "caption": "", "images": {},
                         "questions": {}})
    elif tag == "p" and attrs.get("class") == "caption":
      self._where = "caption"
    elif tag == "figure":
      self._side = attrs["data-side"]
      self.items[-1]["images"][self._side] = []
    elif tag == "img":
      self.items[-1]["images"][self._side].append(attrs["src"])
    elif tag == "fieldset":
      self._question = attrs["data-question"]
      self.items[-1]["questions"][self._question] = {"legend": "", "choices": []}
    elif tag == "legend":
      self._where = "legend"
    elif tag == "input" and attrs.get("type") == "radio":
      self.items[-1]["questions"][self._question]["choices"].append(
          (attrs["name"], attrs["value"]))
    elif tag == "script":
      self.scripts.append(attrs)

  def handle_endtag(self, tag):
    if tag in ("p", "legend"):
      self._where = None

  def handle_data(self, data):
    if self._where == "caption":
      self.items[-1]["caption"] += data
    elif self._where == "legend":
      self.items[-1]["questions"][self._question]["legend"] += data


def parse_page(path):
  parser = PageParser()
  with open(path, encoding="utf-8") as f:
    parser.feed(f.read())
  return parser


def check_page(page, outdirs, labels, prompts):
  """Every prompt with both models' images (the right ones, on the recorded sides), the two
  questions with three choices each, nothing external; returns the embedded metadata."""
  parsed = parse_page(page)
  metadata = drawbench.read_page_metadata(page)
  assert parsed.external == [] and all("src" not in s for s in parsed.scripts)
  assert [i["caption"] for i in parsed.items] == prompts
  by_label = dict(zip(labels, outdirs))
  assert sorted(m["label"] for m in metadata["models"]) == sorted(labels)
  for item, meta in zip(parsed.items, metadata["items"]):
    assert meta["prompt"] == item["caption"]
    assert sorted(meta["sides"].values()) == sorted(labels)
    for side in ("A", "B"):
      outdir = by_label[meta["sides"][side]]
      assert len(item["images"][side]) == len(meta["files"][side]) == 8
      for uri, name in zip(item["images"][side], meta["files"][side]):
        assert uri.startswith("data:image/png;base64,")
        with open(os.path.join(outdir, name), "rb") as f:
          assert base64.b64decode(uri.split(",", 1)[1]) == f.read()
    fidelity, alignment = item["questions"]["fidelity"], item["questions"]["alignment"]
    assert fidelity["legend"] == "Which image is of higher quality?"
    assert alignment["legend"] == (f"Which image better represents the text caption: "
                                   f"\u201c{item['caption']}\u201d?")
    for question, name in ((fidelity, "fidelity"), (alignment, "alignment")):
      assert question["choices"] == [(f"{name}-{item['item']}", c)
                                     for c in ("A", "indifferent", "B")]
  return metadata


def test_read_csv_in_the_papers_format(tmp_path):
  prompts = drawbench.read_csv(write_csv(tmp_path / "d.csv"))
  assert [p["prompt"] for p in prompts] == PROMPTS
  assert [p["category"] for p in prompts] == CATEGORIES
  assert [p["prompt_index"] for p in prompts] == [0, 1, 2, 3]
  notes = drawbench.differences_from_paper(prompts)
  assert "category 'Colors': 2 prompts, the paper has 25" in notes
  paper = [{"category": c} for c, n in drawbench.PAPER_CATEGORIES.items() for _ in range(n)]
  assert len(paper) == 200 and drawbench.differences_from_paper(paper) == []
  with pytest.raises(drawbench.DrawBenchError, match="Prompts"):
    drawbench.read_csv(write_csv(tmp_path / "bad.csv", "Prompt,Category\nx,y\n"))


def test_page_shows_both_models_per_prompt_in_seeded_random_order(tmp_path):
  prompts = [f"prompt {i} <b>&" for i in range(24)]
  categories = ["Colors", "Text"] * 12
  out_a = fake_outdir(tmp_path / "model_a", prompts, categories, 0)
  out_b = fake_outdir(tmp_path / "model_b", prompts, categories, 100)
  page = str(tmp_path / "rate.html")
  metadata = drawbench.write_page(out_a, out_b, page, seed=0)
  metadata = check_page(page, [out_a, out_b], ["model_a", "model_b"], prompts)
  left = [m["sides"]["A"] for m in metadata["items"]]
  assert 0 < left.count("model_a") < 24  # both orders occur
  again = drawbench.write_page(out_a, out_b, str(tmp_path / "again.html"), seed=0)
  assert [m["sides"] for m in again["items"]] == [m["sides"] for m in metadata["items"]]
  other = drawbench.write_page(out_a, out_b, str(tmp_path / "other.html"), seed=1)
  assert [m["sides"] for m in other["items"]] != [m["sides"] for m in metadata["items"]]
  assert other["page_id"] != metadata["page_id"]
  drawbench.write_page(out_a, out_b, str(tmp_path / "small.html"), image_size=8)
  assert os.path.getsize(tmp_path / "small.html") < os.path.getsize(page)
  shutil.rmtree(tmp_path / "model_b")
  fake_outdir(tmp_path / "model_b", prompts[:-1] + ["another"], categories, 100)
  with pytest.raises(drawbench.DrawBenchError, match="different prompts"):
    drawbench.write_page(out_a, out_b, page)


def ratings_file(path, metadata, answers, rater="r"):
  """A ratings file as the page saves it; answers: {item: (fidelity_model, alignment_model)}
  in model labels (or "indifferent" / None), turned into sides through the page's mapping."""
  ratings = []
  for item in metadata["items"]:
    side_of = {label: side for side, label in item["sides"].items()}
    fidelity, alignment = answers.get(item["item"], (None, None))
    ratings.append({"item": item["item"], "prompt": item["prompt"], "category": item["category"],
                    "prompt_index": item["prompt_index"], "sides": item["sides"],
                    "fidelity": side_of.get(fidelity, fidelity),
                    "alignment": side_of.get(alignment, alignment)})
  path.write_text(json.dumps({"kind": drawbench.RATINGS_KIND, "version": 1,
                              "page_id": metadata["page_id"], "rater": rater,
                              "models": metadata["models"], "ratings": ratings}))
  return str(path)


def test_tally_maps_sides_back_to_models(tmp_path):
  out_a = fake_outdir(tmp_path / "a", PROMPTS, CATEGORIES, 0)
  out_b = fake_outdir(tmp_path / "b", PROMPTS, CATEGORIES, 100)
  page = str(tmp_path / "rate.html")
  metadata = drawbench.write_page(out_a, out_b, page, seed=0, labels=["ours", "theirs"])
  # Items 0, 1: Colors; 2: Counting; 3: Text.
  first = ratings_file(tmp_path / "r1.json", metadata, {
      0: ("ours", "ours"), 1: ("theirs", "indifferent"), 2: ("ours", "theirs"),
      3: ("indifferent", None)})
  second = ratings_file(tmp_path / "r2.json", metadata, {
      0: ("ours", "theirs"), 1: ("ours", "ours"), 2: ("ours", "ours"), 3: ("theirs", "ours")})
  result = drawbench.tally([first, second])
  assert result["models"] == ["ours", "theirs"] and result["raters"] == 2
  fidelity = result["questions"]["fidelity"]
  assert fidelity["overall"]["counts"] == {"ours": 5, "theirs": 2, "indifferent": 1}
  assert fidelity["overall"]["rates"]["ours"] == pytest.approx(5 / 8)
  assert fidelity["overall"]["preference"] == {"ours": pytest.approx(5.5 / 8),
                                               "theirs": pytest.approx(2.5 / 8)}
  assert fidelity["by_category"]["Colors"]["counts"] == {"ours": 3, "theirs": 1, "indifferent": 0}
  assert fidelity["by_category"]["Text"]["rates"] == {"ours": 0, "theirs": 0.5,
                                                      "indifferent": 0.5}
  alignment = result["questions"]["alignment"]
  assert alignment["overall"]["n"] == 7 and alignment["overall"]["unrated"] == 1
  assert alignment["by_category"]["Text"]["counts"] == {"ours": 1, "theirs": 0, "indifferent": 0}
  assert alignment["by_category"]["Counting"]["rates"] == {"ours": 0.5, "theirs": 0.5,
                                                           "indifferent": 0}
  # With the page given, its mapping wins over a ratings file's.
  tampered = json.loads(open(first, encoding="utf-8").read())
  for rating in tampered["ratings"]:
    rating["sides"] = {"A": rating["sides"]["B"], "B": rating["sides"]["A"]}
  (tmp_path / "tampered.json").write_text(json.dumps(tampered))
  assert drawbench.tally([str(tmp_path / "tampered.json")], page=page) == drawbench.tally(
      [first], page=page) == drawbench.tally([first])
  other = drawbench.write_page(out_a, out_b, str(tmp_path / "other.html"), seed=5)
  assert other["page_id"] != metadata["page_id"]
  with pytest.raises(drawbench.DrawBenchError, match="rates page"):
    drawbench.tally([first], page=str(tmp_path / "other.html"))


# Runs the page's own script under node with a minimal DOM: answer, name the rater, download.
NODE_HARNESS = r"""
const fs = require("fs");
const page = fs.readFileSync(process.argv[2], "utf8");
const answers = JSON.parse(process.argv[3]);
const metaText = page.match(
    /<script type="application\/json" id="drawbench-page">([\s\S]*?)<\/script>/)[1];
const script = page.match(/<script>([\s\S]*?)<\/script>/)[1];
const listening = () => ({listeners: {}, addEventListener(type, f) { this.listeners[type] = f; }});
const inputs = [...page.matchAll(/<input type="radio" name="([^"]+)" value="([^"]+)">/g)].map(
    m => Object.assign(listening(), {type: "radio", name: m[1], value: m[2], checked: false}));
const elements = {"drawbench-page": {textContent: metaText}, progress: {textContent: ""},
                  rater: Object.assign(listening(), {value: ""}), download: listening()};
const sections = {};
let link = null, blob = null;
global.document = {
  getElementById: id => elements[id],
  querySelectorAll: () => inputs,
  querySelector: selector => {
    const id = selector.match(/data-item="(\d+)"/)[1];
    sections[id] = sections[id] || {done: false, classList: {toggle(c, on) { sections[id].done = on; }}};
    return sections[id];
  },
  createElement: () => (link = {click() { this.clicked = true; }, remove() {}}),
  body: {appendChild() {}},
};
global.localStorage = {store: {}, getItem(k) { return k in this.store ? this.store[k] : null; },
                       setItem(k, v) { this.store[k] = String(v); }};
global.Blob = class { constructor(parts) { this.text = parts.join(""); } };
global.URL = {createObjectURL: b => { blob = b; return "blob:ratings"; }};
global.confirm = () => true;
eval(script);
for (const [name, value] of Object.entries(answers)) {
  const input = inputs.find(i => i.name === name && i.value === value);
  input.checked = true;
  input.listeners.change();
}
elements.rater.value = "Ada L.";
elements.rater.listeners.input();
elements.download.listeners.click();
process.stdout.write(JSON.stringify({name: link.download, clicked: link.clicked,
    progress: elements.progress.textContent, done: sections, ratings: JSON.parse(blob.text)}));
"""


@pytest.mark.skipif(shutil.which("node") is None,
                    reason="runs the rating page's JavaScript in node, a system package that pip "
                    "cannot install; the dev and CI machine have it, so CI runs this test")
def test_page_script_saves_ratings_that_the_tally_reads(tmp_path):
  out_a = fake_outdir(tmp_path / "a", PROMPTS, CATEGORIES, 0)
  out_b = fake_outdir(tmp_path / "b", PROMPTS, CATEGORIES, 100)
  page = str(tmp_path / "rate.html")
  metadata = drawbench.write_page(out_a, out_b, page, seed=0)
  # Prefer model "a" everywhere, except indifference on item 3's fidelity; item 2 unanswered.
  answers = {}
  for item in metadata["items"]:
    if item["item"] == 2:
      continue
    side_of_a = "A" if item["sides"]["A"] == "a" else "B"
    answers[f"fidelity-{item['item']}"] = "indifferent" if item["item"] == 3 else side_of_a
    answers[f"alignment-{item['item']}"] = side_of_a
  (tmp_path / "harness.js").write_text(NODE_HARNESS)
  out = subprocess.run(["node", str(tmp_path / "harness.js"), page, json.dumps(answers)],
                       capture_output=True, text=True, timeout=60)
  assert out.returncode == 0, out.stderr
  saved = json.loads(out.stdout)
  assert saved["clicked"] and saved["name"] == f"ratings-Ada_L_-{metadata['page_id']}.json"
  assert saved["progress"] == "6 of 8 questions answered"
  assert [saved["done"][str(i)]["done"] for i in range(4)] == [True, True, False, True]
  ratings = saved["ratings"]
  assert ratings["rater"] == "Ada L." and ratings["page_id"] == metadata["page_id"]
  (tmp_path / "ratings.json").write_text(json.dumps(ratings))
  result = drawbench.tally([str(tmp_path / "ratings.json")], page=page)
  assert result["questions"]["alignment"]["overall"]["rates"] == {"a": 1, "b": 0,
                                                                  "indifferent": 0}
  assert result["questions"]["fidelity"]["overall"]["counts"] == {"a": 2, "b": 0,
                                                                  "indifferent": 1}
  assert result["questions"]["fidelity"]["overall"]["unrated"] == 1


@pytest.mark.slow
def test_drawbench_samples_compares_and_tallies(tmp_path, tiny_cascade):
  out_a = str(tmp_path / "OUT_A")
  sample = ["--metric=drawbench", f"--stages={','.join(tiny_cascade)}", f"--outdir={out_a}",
            "--steps=2", "--batch_size=32"]
  # Half the CSV first (an interrupted run), then all of it: only the rest is sampled.
  half = write_csv(tmp_path / "half.csv", CSV[:CSV.index("Three")])
  first = run_cli_json("eval", *sample, f"--prompts_csv={half}")
  assert first == {"outdir": out_a, "prompts": 2, "images": 16, "samples_per_prompt": 8}
  before = {name: os.stat(os.path.join(out_a, name)).st_mtime_ns for name in os.listdir(out_a)
            if name.endswith(".png") and name != "grid.png"}
  assert len(before) == 16
  done = run_cli_json("eval", *sample, f"--prompts_csv={write_csv(tmp_path / 'd.csv')}")
  assert done["images"] == 32
  for name, mtime in before.items():
    assert os.stat(os.path.join(out_a, name)).st_mtime_ns == mtime, name
  with open(os.path.join(out_a, "samples.jsonl"), encoding="utf-8") as f:
    records = [json.loads(line) for line in f]
  assert len(records) == 32
  records.sort(key=lambda r: r["index"])
  assert [(r["prompt"], r["category"], r["prompt_index"], r["sample"]) for r in records] == [
      (p, c, i, j) for i, (p, c) in enumerate(zip(PROMPTS, CATEGORIES)) for j in range(8)]
  assert Image.open(os.path.join(out_a, records[0]["file"])).size == (32, 32)
  # A second "model": the same prompts, other images.
  out_b = str(tmp_path / "OUT_B")
  shutil.copytree(out_a, out_b)
  for record in records:
    path = os.path.join(out_b, record["file"])
    Image.fromarray(255 - np.asarray(Image.open(path))).save(path)
  page = str(tmp_path / "rate.html")
  made = run_cli_json("eval", "--metric=drawbench", f"--compare={out_a},{out_b}",
                      f"--output={page}", "--seed=3")
  assert made["prompts"] == 4
  metadata = check_page(page, [out_a, out_b], ["OUT_A", "OUT_B"], PROMPTS)
  ratings = ratings_file(tmp_path / "r.json", metadata, {
      i: ("OUT_A", "OUT_B") for i in range(4)})
  result = run_cli_json("eval", "--metric=drawbench-tally", f"--ratings={ratings}",
                        f"--page={page}")
  assert result["questions"]["fidelity"]["overall"]["rates"]["OUT_A"] == 1.0
  assert result["questions"]["alignment"]["by_category"]["Colors"]["rates"]["OUT_B"] == 1.0
