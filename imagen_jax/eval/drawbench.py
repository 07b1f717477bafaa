"""DrawBench (paper section 4.3): sample its prompts, rate two models side by side, tally.

    imagen-jax eval --metric=drawbench --stages=BASE,SR1,SR2 --prompts_csv=DrawBench.csv \
        --outdir=OUT_A                                   # 8 images per prompt, resumable
    imagen-jax eval --metric=drawbench --compare=OUT_A,OUT_B --output=rate.html
    # raters open rate.html (offline, self-contained), answer, and download ratings JSON
    imagen-jax eval --metric=drawbench-tally --ratings=r1.json,r2.json [--page=rate.html]

The CSV is the paper's (columns `Prompts`, `Category`; 200 prompts in 11 categories); it is not
shipped here. The rating page shows each prompt's images of both models side by side, left and
right drawn at random per prompt (seeded), and asks the paper's two questions with three
choices each. The page embeds which model is on which side, and so does every ratings file it
saves; the tally maps the answers back to the models, per category and overall.
"""

from __future__ import annotations

import base64
import collections
import csv
import hashlib
import html
import io
import json
import os
import random
from typing import Any, Sequence

from PIL import Image

from imagen_jax.core import fileio
from imagen_jax.sample import outdir as outdir_lib

# The paper's DrawBench categories and prompt counts (200 prompts).
PAPER_CATEGORIES = {"Colors": 25, "Conflicting": 10, "Counting": 19, "DALL-E": 20,
                    "Descriptions": 20, "Gary Marcus et al.": 10, "Misspellings": 10,
                    "Positional": 20, "Rare Words": 7, "Reddit": 38, "Text": 21}
SAMPLES_PER_PROMPT = 8
QUESTIONS = {"fidelity": "Which image is of higher quality?",
             "alignment": "Which image better represents the text caption?"}
CHOICES = ("A", "indifferent", "B")  # A: the left set of images, B: the right set
PAGE_KIND = "imagen-jax-drawbench-page"
RATINGS_KIND = "imagen-jax-drawbench-ratings"


class DrawBenchError(ValueError):
  """Bad DrawBench input (CSV, outdirs, ratings); the message names the file and the problem."""


def read_csv(path: str) -> list[dict[str, Any]]:
  """[{"prompt", "category", "prompt_index"}] from a CSV with columns `Prompts` and `Category`."""
  if not fileio.exists(path):
    raise DrawBenchError(f"--prompts_csv {path!r} does not exist")
  with io.StringIO(fileio.read_bytes(path).decode("utf-8-sig"), newline="") as f:
    reader = csv.DictReader(f)
    columns = [c.strip() for c in reader.fieldnames or []]
    if "Prompts" not in columns or "Category" not in columns:
      raise DrawBenchError(f"{path} has columns {columns}; DrawBench's CSV has `Prompts` and "
                           "`Category`")
    rows = [{k.strip(): (v or "").strip() for k, v in row.items() if k} for row in reader]
  prompts = []
  for line, row in enumerate(rows, start=2):
    if not row["Prompts"] and not row["Category"]:
      continue
    if not row["Prompts"] or not row["Category"]:
      raise DrawBenchError(f"{path} line {line} has an empty prompt or category: {row}")
    prompts.append({"prompt": row["Prompts"], "category": row["Category"],
                    "prompt_index": len(prompts)})
  if not prompts:
    raise DrawBenchError(f"{path} has no prompts")
  return prompts


def differences_from_paper(prompts: Sequence[dict[str, Any]]) -> list[str]:
  """How the CSV's category counts differ from the paper's (empty: the same 200 prompts)."""
  counts = collections.Counter(p["category"] for p in prompts)
  notes = [f"category {c!r}: {counts.get(c, 0)} prompts, the paper has {n}"
           for c, n in PAPER_CATEGORIES.items() if counts.get(c, 0) != n]
  notes += [f"category {c!r} ({n} prompts) is not one of the paper's" for c, n in counts.items()
            if c not in PAPER_CATEGORIES]
  return notes


def sample_prompts(cascade: Any, prompts: Sequence[dict[str, Any]], outdir: str, *,
           settings: Sequence[Any], num_samples: int = SAMPLES_PER_PROMPT, seed: int = 0,
           batch_size: int = 16, show_progress: bool = True) -> list[dict[str, Any]]:
  """Samples `num_samples` images per prompt into `outdir` as `imagen-jax sample` does
  (resumable); the category and prompt index go into samples.jsonl with each image."""
  return outdir_lib.sample_to_outdir(cascade, list(prompts), outdir, num_samples=num_samples,
                                     seed=seed, settings=settings, batch_size=batch_size,
                                     show_progress=show_progress)


# ---------------------------------------------------------------------------------------------
# The rating page.

def _grouped(samples_dir: str) -> dict[tuple[Any, str], dict[str, Any]]:
  """{(prompt_index, prompt): {"category", "records" sorted by sample}} in file order."""
  groups: dict[tuple[Any, str], dict[str, Any]] = {}
  for record in outdir_lib.read_records(samples_dir):
    # Outdirs sampled from a DrawBench CSV carry prompt_index (a prompt may repeat); others
    # are grouped by prompt text.
    key = (record.get("prompt_index"), record["prompt"])
    group = groups.setdefault(key, {"category": record.get("category", ""), "records": []})
    group["records"].append(record)
  for group in groups.values():
    group["records"].sort(key=lambda r: r.get("sample", 0))
  return groups


def _data_uri(samples_dir: str, record: dict[str, Any], image_size: int) -> str:
  if image_size:
    image = Image.fromarray(outdir_lib.read_image(samples_dir, record))
    if image.size != (image_size, image_size):
      image = image.resize((image_size, image_size), Image.BICUBIC, reducing_gap=None)
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    data = buffer.getvalue()
  else:
    data = fileio.read_bytes(fileio.join(samples_dir, record["file"]))
  return "data:image/png;base64," + base64.b64encode(data).decode("ascii")


def _labels(outdirs: Sequence[str], labels: Sequence[str] | None) -> list[str]:
  if labels:
    if len(labels) != 2 or labels[0] == labels[1]:
      raise DrawBenchError(f"give two different model labels, got {list(labels)}")
    return list(labels)
  names = [os.path.basename(os.path.normpath(d)) for d in outdirs]
  return names if names[0] != names[1] else [os.path.normpath(d) for d in outdirs]


def page_items(out_a: str, out_b: str, labels: Sequence[str], seed: int) -> list[dict[str, Any]]:
  """One item per prompt: prompt, category, which model is on side A/B, each side's records."""
  groups = [_grouped(out_a), _grouped(out_b)]
  only = [sorted(k[1] for k in groups[i].keys() - groups[1 - i].keys()) for i in (0, 1)]
  if only[0] or only[1]:
    raise DrawBenchError(
        f"the outdirs hold different prompts ({len(only[0])} only in {out_a}, e.g. "
        f"{only[0][:3]}; {len(only[1])} only in {out_b}, e.g. {only[1][:3]}): sample both "
        "from the same CSV (sampling resumes where it stopped)")
  rng = random.Random(seed)
  items = []
  for key, group_a in groups[0].items():
    group_b = groups[1][key]
    if len(group_a["records"]) != len(group_b["records"]):
      raise DrawBenchError(f"prompt {key[1]!r} has {len(group_a['records'])} images in {out_a} "
                           f"but {len(group_b['records'])} in {out_b}")
    models = [(labels[0], out_a, group_a["records"]), (labels[1], out_b, group_b["records"])]
    if rng.random() < 0.5:  # which model is shown on the left, independently per prompt
      models.reverse()
    items.append({"item": len(items), "prompt": key[1], "prompt_index": key[0],
                  "category": group_a["category"],
                  "sides": {"A": models[0][0], "B": models[1][0]},
                  "files": {"A": [r["file"] for r in models[0][2]],
                            "B": [r["file"] for r in models[1][2]]},
                  "_records": {"A": (models[0][1], models[0][2]),
                               "B": (models[1][1], models[1][2])}})
  return items


def write_page(out_a: str, out_b: str, output: str, *, seed: int = 0,
               labels: Sequence[str] | None = None, image_size: int = 0) -> dict[str, Any]:
  """Writes the self-contained HTML rating page; returns its metadata (also embedded in it).

  `image_size` > 0 shrinks the embedded images (a page of 200 prompts x 16 images at 1024x1024
  is gigabytes); 0 embeds the PNGs as sampled.
  """
  labels = _labels([out_a, out_b], labels)
  items = page_items(out_a, out_b, labels, seed)
  digest = hashlib.sha256(json.dumps(
      [seed, labels, [(i["prompt"], i["sides"], i["files"]) for i in items]]).encode())
  metadata = {"kind": PAGE_KIND, "version": 1, "page_id": digest.hexdigest()[:16], "seed": seed,
              "models": [{"label": labels[0], "outdir": fileio.resolve(out_a)},
                         {"label": labels[1], "outdir": fileio.resolve(out_b)}],
              "questions": QUESTIONS, "choices": list(CHOICES),
              "items": [{k: v for k, v in i.items() if not k.startswith("_")} for i in items]}
  sections = [_item_html(item, len(items), image_size) for item in items]
  text = _PAGE.format(
      count=len(items), sections="\n".join(sections),
      metadata=json.dumps(metadata, indent=1).replace("</", "<\\/"), script=_SCRIPT,
      style=_STYLE)
  fileio.write_text(output, text)
  return metadata


def _item_html(item: dict[str, Any], count: int, image_size: int) -> str:
  n = item["item"]
  prompt = html.escape(item["prompt"])
  sides = []
  for side in ("A", "B"):
    samples_dir, records = item["_records"][side]
    images = "".join(
        f'<img src="{_data_uri(samples_dir, r, image_size)}" alt="Image {side}, sample {k + 1}">'
        for k, r in enumerate(records))
    sides.append(f'<figure class="side" data-side="{side}"><figcaption>Image {side}'
                 f'</figcaption><div class="grid">{images}</div></figure>')
  questions = []
  for question, text in QUESTIONS.items():
    if question == "alignment":
      text = f"{text[:-1]}: &ldquo;{prompt}&rdquo;?"
    choices = "".join(
        f'<label><input type="radio" name="{question}-{n}" value="{choice}"> '
        f'{"Image " + choice if choice != "indifferent" else "Indifferent"}</label>'
        for choice in CHOICES)
    questions.append(f'<fieldset class="question" data-question="{question}">'
                     f'<legend>{text}</legend>{choices}</fieldset>')
  return (f'<section class="item" data-item="{n}"><h2>Prompt {n + 1} of {count}</h2>'
          f'<p class="caption">{prompt}</p><div class="pair">{"".join(sides)}</div>'
          f'{"".join(questions)}</section>')


_STYLE = """
body { font-family: sans-serif; margin: 1em auto; max-width: 1400px; padding: 0 1em; }
header { position: sticky; top: 0; background: #fff; border-bottom: 1px solid #ccc;
         padding: .5em 0; z-index: 1; }
.item { border-bottom: 2px solid #ddd; padding: 1em 0; }
.item.done h2::after { content: " \\2713"; color: #2a2; }
.caption { font-size: 1.3em; font-weight: bold; }
.pair { display: flex; gap: 2em; }
.side { flex: 1; margin: 0; }
.side figcaption { font-weight: bold; font-size: 1.2em; margin-bottom: .3em; }
.grid { display: grid; grid-template-columns: repeat(4, 1fr); gap: 4px; }
.grid img { width: 100%; min-width: 96px; height: auto; display: block; }
fieldset { border: 1px solid #ccc; margin: .6em 0; }
fieldset label { margin-right: 2em; }
"""

_SCRIPT = r"""
(function () {
  const meta = JSON.parse(document.getElementById("drawbench-page").textContent);
  const storeKey = "drawbench:" + meta.page_id;
  const answers = JSON.parse(localStorage.getItem(storeKey) || "{}");
  const questions = Object.keys(meta.questions);
  const total = meta.items.length * questions.length;

  function refresh() {
    let answered = 0;
    for (const item of meta.items) {
      const done = questions.filter(q => answers[q + "-" + item.item]).length;
      answered += done;
      const section = document.querySelector('section[data-item="' + item.item + '"]');
      section.classList.toggle("done", done === questions.length);
    }
    document.getElementById("progress").textContent =
        answered + " of " + total + " questions answered";
    return answered;
  }

  for (const input of document.querySelectorAll('input[type="radio"]')) {
    if (answers[input.name] === input.value) input.checked = true;
    input.addEventListener("change", function () {
      answers[input.name] = input.value;
      localStorage.setItem(storeKey, JSON.stringify(answers));
      refresh();
    });
  }
  const rater = document.getElementById("rater");
  rater.value = localStorage.getItem(storeKey + ":rater") || "";
  rater.addEventListener("input", () => localStorage.setItem(storeKey + ":rater", rater.value));

  document.getElementById("download").addEventListener("click", function () {
    if (refresh() < total &&
        !confirm("Some questions are unanswered. Download the ratings anyway?")) return;
    const ratings = meta.items.map(item => {
      const out = {item: item.item, prompt: item.prompt, prompt_index: item.prompt_index,
                   category: item.category, sides: item.sides};
      for (const q of questions) out[q] = answers[q + "-" + item.item] || null;
      return out;
    });
    const result = {kind: "imagen-jax-drawbench-ratings", version: 1, page_id: meta.page_id,
                    rater: rater.value, saved_at: new Date().toISOString(),
                    models: meta.models, questions: meta.questions, ratings: ratings};
    const blob = new Blob([JSON.stringify(result, null, 1)], {type: "application/json"});
    const link = document.createElement("a");
    link.href = URL.createObjectURL(blob);
    const who = (rater.value || "rater").replace(/[^A-Za-z0-9_-]+/g, "_");
    link.download = "ratings-" + who + "-" + meta.page_id + ".json";
    document.body.appendChild(link);
    link.click();
    link.remove();
  });
  refresh();
})();
"""

_PAGE = """<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<title>DrawBench rating: {count} prompts</title>
<style>{style}</style>
</head>
<body>
<header>
<h1>DrawBench: which set of images is better?</h1>
<p>For each caption, two sets of images are shown, <b>Image A</b> (left) and <b>Image B</b>
(right), made by two different models. Answer both questions for every caption:
which set is of higher quality, and which set better represents the caption. Choose
<i>Indifferent</i> when neither is better. Your answers are kept in this browser; when you are
done, press <b>Download ratings</b> and send the JSON file.</p>
<label>Your name or id: <input id="rater" type="text"></label>
<span id="progress"></span>
<button id="download" type="button">Download ratings (JSON)</button>
</header>
{sections}
<script type="application/json" id="drawbench-page">{metadata}</script>
<script>{script}</script>
</body>
</html>
"""


# ---------------------------------------------------------------------------------------------
# The tally.

def read_page_metadata(page: str) -> dict[str, Any]:
  """The metadata embedded in a rating page written by `write_page`."""
  text = fileio.read_text(page)
  start_tag = '<script type="application/json" id="drawbench-page">'
  start = text.find(start_tag)
  end = text.find("</script>", start)
  if start < 0 or end < 0:
    raise DrawBenchError(f"{page} is not a DrawBench rating page (no embedded metadata)")
  metadata = json.loads(text[start + len(start_tag):end])  # JSON reads the escaped "<\/" as "</"
  if metadata.get("kind") != PAGE_KIND:
    raise DrawBenchError(f"{page} is not a DrawBench rating page")
  return metadata


def tally(ratings_files: Sequence[str], page: str | None = None) -> dict[str, Any]:
  """Per-question, per-category and overall preference rates of each model.

  Each answer "A"/"B" counts for the model that was on that side for that prompt (from the
  page's metadata when `page` is given, else from the ratings file, which carries it);
  "indifferent" counts apart. `rates` are shares of the answered questions; `preference`
  splits indifferent answers evenly between the two models.
  """
  metadata = read_page_metadata(page) if page else None
  labels: list[str] | None = [m["label"] for m in metadata["models"]] if metadata else None
  overall = {q: collections.Counter() for q in QUESTIONS}
  by_category: dict[str, dict[str, collections.Counter]] = {
      q: collections.defaultdict(collections.Counter) for q in QUESTIONS}
  raters = []
  for path in ratings_files:
    ratings = json.loads(fileio.read_text(path))
    if ratings.get("kind") != RATINGS_KIND:
      raise DrawBenchError(f"{path} is not a DrawBench ratings file")
    file_labels = [m["label"] for m in ratings["models"]]
    if labels is None:
      labels = file_labels
    if metadata and ratings["page_id"] != metadata["page_id"]:
      raise DrawBenchError(f"{path} rates page {ratings['page_id']}, not {page} "
                           f"({metadata['page_id']})")
    if sorted(file_labels) != sorted(labels):
      raise DrawBenchError(f"{path} compares {file_labels}, the others {labels}")
    raters.append(ratings.get("rater", ""))
    for rating in ratings["ratings"]:
      sides = rating["sides"]
      if metadata:
        item = metadata["items"][rating["item"]]
        if item["prompt"] != rating["prompt"]:
          raise DrawBenchError(f"{path}: item {rating['item']} is {rating['prompt']!r} in the "
                               f"ratings but {item['prompt']!r} on the page")
        sides = item["sides"]
      for question in QUESTIONS:
        answer = rating.get(question)
        if answer is None:
          key = "unrated"
        elif answer in ("A", "B"):
          key = sides[answer]
        elif answer == "indifferent":
          key = "indifferent"
        else:
          raise DrawBenchError(f"{path}: item {rating['item']} has {question}={answer!r}; "
                               f"expected one of {list(CHOICES)} or null")
        by_category[question][rating["category"]][key] += 1
        overall[question][key] += 1
  if labels is None:
    raise DrawBenchError("no ratings files given")
  result: dict[str, Any] = {"models": labels, "raters": len(raters), "questions": {}}
  for question in QUESTIONS:
    result["questions"][question] = {
        "overall": _rates(overall[question], labels),
        "by_category": {c: _rates(n, labels) for c, n in sorted(by_category[question].items())}}
  return result


def _rates(counter: collections.Counter, labels: Sequence[str]) -> dict[str, Any]:
  keys = list(labels) + ["indifferent"]
  answered = sum(counter[k] for k in keys)
  share = lambda x: x / answered if answered else None
  return {"n": answered, "unrated": counter["unrated"],
          "counts": {k: counter[k] for k in keys},
          "rates": {k: share(counter[k]) for k in keys},
          "preference": {k: share(counter[k] + counter["indifferent"] / 2) for k in labels}}
