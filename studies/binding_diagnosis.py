"""Where a base stage's two-object binding fails: what it draws on each object's side, and
which words its attention reads inside each object.

    python -m studies.binding_diagnosis --arms=encoder_table/base_pretrained-e0-t0,... \
        [--log_snrs=-3,0,3] [--max_prompts=200]

Each arm is a base-stage workdir whose `samples/` hold the demo's evaluation prompts
(`studies.demo_ablation` and `studies.encoder_table` write them). For the two-object prompts:

1. Drawn (from the samples, the shapes judge's detections): the two largest objects, ordered
   along the prompt's relation (left to right, top to bottom), stand for the first and second
   named object. Each named object is `right`, `other's shape` (its color, the other named
   object's shape), `third shape` (its color, a shape neither object has), `wrong color`, or
   `missing`. Held-out prompts count their held-out object and its partner apart.
2. Read (teacher-forced, no sampling): the dataset's render of the prompt, noised to each
   log-SNR with fixed noise, through the network. In every attention block, the queries inside
   an object (weighted by the render's coverage at the block's resolution) put some of their
   softmax on the text (`text share`, the rest is self-attention); of what falls on the four
   object words (both colors, both shapes), `routing` is the share on the object's own two words:
   0.5 reads both objects alike, 1.0 only its own. Averaged over noise levels and prompts,
   then over heads (and the best head's); held-out prompts also apart by whether the sample
   got both objects right.

3. Guided (with --resample_guidance): the same two-object prompts resampled at each guidance weight
   (the arm's sampler otherwise), all-correct and the outcomes of held-out objects.

Prints the tables and a RESULT_JSON line.
"""

from __future__ import annotations

import collections
import os
from typing import Any, Sequence

from absl import app
from absl import flags
import jax
import jax.numpy as jnp
import numpy as np

from imagen_jax.data import preprocess
from imagen_jax.data import shapes
from imagen_jax.data import shapes_grammar as grammar
from imagen_jax.diffusion import schedules
from imagen_jax.eval import shapes as judge
from imagen_jax.sample import cascade as cascade_lib
from imagen_jax.sample import network as network_lib
from imagen_jax.sample import outdir as outdir_lib
from imagen_jax.text import encoder as encoder_lib

_ARMS = flags.DEFINE_list("arms", None, "Base-stage workdirs with samples/ of the eval prompts.")
_LOG_SNRS = flags.DEFINE_list("log_snrs", ["-3", "0", "3"], "Noise levels of the reading.")
_MAX_PROMPTS = flags.DEFINE_integer("max_prompts", 200, "Two-object prompts read per split.")
_GUIDANCE = flags.DEFINE_list("resample_guidance", [], "Guidance weights to resample the two-object "
                              "prompts with (empty: only the arm's own samples).")

OUTCOMES = ("right", "other's shape", "third shape", "wrong color", "missing")


# --- 1. What is drawn --------------------------------------------------------------------------

def drawn_outcomes(prompt: grammar.Prompt, image: np.ndarray) -> list[str]:
  """The outcome (one of OUTCOMES) of each named object of a two-object prompt in its image."""
  found = judge.find_objects(image)[:2]
  if len(found) < 2:
    return ["missing", "missing"]
  axis = (lambda f: f.cx) if prompt.relation == grammar.LEFT_OF else (lambda f: f.cy)
  placed = sorted(found, key=axis)
  outcomes = []
  for named, other, drawn in zip(prompt.objects, prompt.objects[::-1], placed):
    if drawn.color != named.color:
      outcomes.append("wrong color")
    elif drawn.shape == named.shape:
      outcomes.append("right")
    elif drawn.shape == other.shape:
      outcomes.append("other's shape")
    else:
      outcomes.append("third shape")
  return outcomes


def object_roles(split: str, prompt: grammar.Prompt) -> list[str]:
  """Each named object's role: `seen pair` (validation), `held-out object` or `its partner`."""
  if split != "heldout":
    return ["seen pair", "seen pair"]
  return ["held-out object" if (o.color, o.shape) in grammar.HELDOUT_PAIRS else "its partner"
          for o in prompt.objects]


# --- 2. What is read ---------------------------------------------------------------------------

def word_tokens(tokenizer: Any, caption: str) -> list[tuple[int, int]]:
  """[start, end) token spans of each word of `caption` (prefixes tokenized, EOS not counted)."""
  words = caption.split()
  prefixes = [" ".join(words[:k]) for k in range(len(words) + 1)]
  lengths = tokenizer(prefixes).lengths - 1
  lengths[0] = 0
  return [(int(lengths[k]), int(lengths[k + 1])) for k in range(len(words))]


def object_words(tokenizer: Any, caption: str) -> list[np.ndarray]:
  """Token indices of each named object's color and shape words (a pair caption)."""
  spans = word_tokens(tokenizer, caption)
  n = len(spans)
  # "a C1 S1 <relation> a C2 S2": words 1-2 and the last two.
  return [np.concatenate([np.arange(*spans[i]) for i in idx]) for idx in ((1, 2), (n - 2, n - 1))]


def coverage(placed: shapes.Placed, image_size: int, size: int) -> np.ndarray:
  """float [size, size]: the fraction of each cell of a size x size grid inside the object."""
  mask = shapes.object_mask(placed, image_size).astype(np.float32)
  k = image_size // size
  return mask.reshape(size, k, size, k).mean(axis=(1, 3))


def attention_probs(intermediates: Any, head_dim: int, text_mask: jax.Array
                    ) -> dict[str, np.ndarray]:
  """{block: softmax [B, heads, HW, HW + L]} recomputed from the captured projections of every
  self-and-text attention block (the model's own query, key and text-key outputs)."""
  out = {}
  for name, block in intermediates.items():
    if not isinstance(block, dict) or "query" not in block or "key" not in block:
      continue
    query, key = block["query"]["__call__"][0], block["key"]["__call__"][0]
    text_key = block["text_key"]["__call__"][0]
    heads = max(1, query.shape[-1] // head_dim)
    keys = jnp.concatenate([key, text_key], axis=1)
    split = lambda x: x.reshape(x.shape[0], x.shape[1], heads, -1)
    q, k = split(query), split(keys)
    logits = jnp.einsum("btnh,bsnh->bnts", q, k) / np.sqrt(q.shape[-1])
    mask = jnp.concatenate([jnp.ones(key.shape[:2], bool), text_mask], axis=1)
    logits = jnp.where(mask[:, None, None, :], logits, -jnp.inf)
    out[name] = np.asarray(jax.nn.softmax(logits, axis=-1))
  return out


def read_arm(net: network_lib.StageNetwork, text: encoder_lib.TextEncoder,
             examples: Sequence[shapes.Example], log_snrs: Sequence[float]
             ) -> list[dict[str, dict[str, np.ndarray]]]:
  """Per example: {block: {"routing_i": [heads], "text_i": scalar}} for objects i = 0, 1."""
  size = net.config.image_size
  captions = [e.caption for e in examples]
  emb, mask = text.encode(captions)
  images = preprocess.to_model_range(np.stack([shapes.render(e.placed, size) for e in examples]))
  noise = jax.random.normal(jax.random.key(0), images.shape)
  words = [object_words(text.tokenizer, c) for c in captions]
  per_example = [collections.defaultdict(lambda: collections.defaultdict(list))
                 for _ in examples]
  for log_snr in log_snrs:
    alpha, sigma = schedules.alpha_sigma(jnp.full((len(examples),), log_snr))
    z = alpha[:, None, None, None] * images + sigma[:, None, None, None] * noise
    _, state = net.model.apply({"params": net.params}, z, jnp.full((len(examples),), log_snr),
                               jnp.asarray(emb), jnp.asarray(mask), capture_intermediates=True,
                               mutable=["intermediates"])
    probs = attention_probs(state["intermediates"], net.config.model.head_dim, jnp.asarray(mask))
    for name, p in probs.items():
      side = int(np.sqrt(p.shape[2]))
      hw = side * side
      for b, example in enumerate(examples):
        text_p = p[b, :, :, hw:]  # [heads, HW, L]
        own = [text_p[:, :, w].sum(axis=-1) for w in words[b]]  # [heads, HW] each
        for i, placed in enumerate(example.placed):
          weight = coverage(placed, size, side).reshape(-1)
          if weight.sum() == 0:
            continue
          weight = weight / weight.sum()
          routing = (own[i] @ weight) / np.maximum((own[0] + own[1]) @ weight, 1e-12)
          per_example[b][name][f"routing_{i}"].append(routing)  # [heads]
          per_example[b][name][f"text_{i}"].append(text_p.sum(axis=-1).mean(axis=0) @ weight)
  return [{name: {k: np.mean(v, axis=0) for k, v in d.items()} for name, d in e.items()}
          for e in per_example]


# --- 3. Guidance ------------------------------------------------------------------------------

def guidance_sweep(arm: str, samples: Sequence[tuple[str, int, grammar.Prompt, Any]],
                   weights: Sequence[float]) -> dict[str, dict[str, Any]]:
  """{weight: {split: all-correct, "held-out object": outcome shares}} of the two-object
  prompts resampled (one sampling outdir per weight under ARM/binding_guidance/)."""
  cascade = cascade_lib.Cascade.from_workdirs([arm])
  prompts = [{"prompt": grammar.caption(p), "split": split} for split, _, p, _ in samples]
  out = {}
  for weight in weights:
    outdir = os.path.join(arm, "binding_guidance", f"{weight:g}")
    outdir_lib.sample_to_outdir(cascade, prompts, outdir, batch_size=64, show_progress=False,
                                settings=cascade.default_settings(guidance=weight))
    records, images = outdir_lib.read_samples(outdir)
    right = collections.defaultdict(list)
    heldout = collections.Counter()
    for record, image in zip(records, images):
      prompt = grammar.parse(record["prompt"])
      outcomes = drawn_outcomes(prompt, image)
      right[record["split"]].append(all(o == "right" for o in outcomes))
      for role, outcome in zip(object_roles(record["split"], prompt), outcomes):
        if role == "held-out object":
          heldout[outcome] += 1
    out[f"{weight:g}"] = {**{split: round(float(np.mean(v)), 3) for split, v in right.items()},
                          "held-out object": {o: round(heldout[o] / max(sum(heldout.values()), 1),
                                                       3) for o in OUTCOMES}}
  return out


# --- The report --------------------------------------------------------------------------------

def pair_samples(arm: str) -> list[tuple[str, int, grammar.Prompt, np.ndarray]]:
  """(split, index in split, prompt, image) of the arm's two-object samples."""
  records, images = outdir_lib.read_samples(os.path.join(arm, "samples"))
  index = collections.Counter()
  out = []
  for record, image in zip(records, images):
    split = record["split"]
    i = index[split]
    index[split] += 1
    prompt = grammar.parse(record["prompt"])
    if split in ("validation", "heldout") and len(prompt.objects) == 2:
      out.append((split, i, prompt, image))
  return out


def diagnose(arm: str, log_snrs: Sequence[float], max_prompts: int,
             guidance: Sequence[float]) -> dict[str, Any]:
  # (split, index, prompt, each named object's outcome), judged once.
  samples = [(split, i, prompt, drawn_outcomes(prompt, image))
             for split, i, prompt, image in pair_samples(arm)]
  drawn = collections.defaultdict(collections.Counter)
  for split, _, prompt, outcomes in samples:
    for role, outcome in zip(object_roles(split, prompt), outcomes):
      drawn[role][outcome] += 1
  net = network_lib.StageNetwork.from_workdir(arm)
  text = encoder_lib.load_configured(net.config.text)
  reads = collections.defaultdict(list)
  for split in ("validation", "heldout"):
    chosen = [s for s in samples if s[0] == split][:max_prompts]
    examples = [shapes.example(split, i) for _, i, _, _ in chosen]
    for example, (_, _, prompt, _) in zip(examples, chosen):
      if example.prompt != prompt:
        raise ValueError(f"{arm}: sample {prompt} is not the dataset's example {example.caption}")
    for start in range(0, len(examples), 32):
      batch = examples[start:start + 32]
      results = read_arm(net, text, batch, log_snrs)
      for (_, _, prompt, outcomes), result in zip(chosen[start:start + 32], results):
        correct = all(o == "right" for o in outcomes)
        roles = object_roles(split, prompt)
        for block, values in result.items():
          for i, role in enumerate(roles):
            if f"routing_{i}" not in values:
              continue
            groups = [role] if split == "validation" else [
                role, f"{role}, {'right' if correct else 'wrong'}"]
            for group in groups:
              reads[(block, group)].append((values[f"routing_{i}"], values[f"text_{i}"]))
  drawn_table = {role: {o: round(c[o] / max(sum(c.values()), 1), 3) for o in OUTCOMES}
                 | {"n": sum(c.values())} for role, c in drawn.items()}
  read_table = {}
  for (block, group), v in sorted(reads.items()):
    heads = np.mean([r for r, _ in v], axis=0)
    read_table[f"{block} | {group}"] = {
        "routing": round(float(heads.mean()), 3), "best head": round(float(heads.max()), 3),
        "text share": round(float(np.mean([t for _, t in v])), 3), "n": len(v)}
  return {"arm": arm, "drawn": drawn_table, "read": read_table,
          "guidance": guidance_sweep(arm, samples, guidance) if guidance else {}}


def main(argv: Sequence[str]) -> None:
  del argv
  from benchmarks import harness  # pylint: disable=g-import-not-at-top  # run from the repository
  if not _ARMS.value:
    raise app.UsageError("--arms: base-stage workdirs with samples/")
  log_snrs = [float(s) for s in _LOG_SNRS.value]
  results = []
  for arm in _ARMS.value:
    result = diagnose(arm, log_snrs, _MAX_PROMPTS.value, [float(g) for g in _GUIDANCE.value])
    print(f"\n{arm}\n  drawn (two-object prompts, each named object):")
    for role, row in result["drawn"].items():
      print(f"    {role:<16}" + "  ".join(f"{o} {100 * row[o]:.0f}%" for o in OUTCOMES)
            + f"  (n={row['n']})")
    print("  read (routing: own words' share of the object words; text share of the softmax):")
    for key, row in result["read"].items():
      print(f"    {key:<48} routing {row['routing']:.3f} (best head {row['best head']:.3f})"
            f"  text {row['text share']:.3f}"
            f"  (n={row['n']})")
    for weight, row in result["guidance"].items():
      print(f"  guidance {weight}: two-object all-correct validation {100 * row['validation']:.1f}%"
            f", heldout {100 * row['heldout']:.1f}%; held-out objects "
            + "  ".join(f"{o} {100 * v:.0f}%" for o, v in row["held-out object"].items()))
    results.append(result)
  harness.report("binding_diagnosis", [], extra={"arms": results})


if __name__ == "__main__":
  app.run(main)
