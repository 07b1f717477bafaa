"""The docs as a newcomer reads and types them: every page's "On a CPU" commands run as written,
page after page, in one fresh directory with relative paths; every config and override a
command shows loads; every relative link points at a file and heading that exist."""

import glob
import json
import os
import re
import shlex

import pytest

from helpers import REPO, readme_commands, run_as_typed
from imagen_jax.core import config_lib

# The pages whose "On a CPU" sections hold commands, in the order they run: each may use what
# the pages before it made (train.md's stages, sample.md's samples) in the same directory.
CPU_PAGES = ("train", "sample", "edit", "finetune", "pods", "encode")
CPU_SECTION = "On a CPU"


def doc_pages() -> list[str]:
  """README.md and every page of docs/, as paths relative to the repository."""
  return ["README.md"] + sorted(os.path.relpath(p, REPO)
                                for p in glob.glob(os.path.join(REPO, "docs", "*.md")))


def read(page: str) -> str:
  with open(os.path.join(REPO, page), encoding="utf-8") as f:
    return f.read()


def bash_blocks(text: str) -> list[str]:
  """The ```bash blocks of a markdown text, continuation lines joined."""
  return [block.split("```", 1)[0].replace("\\\n", " ") for block in text.split("```bash")[1:]]


def section(text: str, name: str) -> str | None:
  """The body of `## <name>` (up to the next `## `), or None."""
  if f"\n## {name}" not in text:
    return None
  return text.split(f"\n## {name}", 1)[1].split("\n## ", 1)[0]


def cpu_commands() -> list[str]:
  """Every CPU_PAGES page's "On a CPU" commands, in page order."""
  return [c for page in CPU_PAGES
          for c in readme_commands(CPU_SECTION, page=os.path.join("docs", f"{page}.md"))]


def test_every_page_with_commands_has_an_on_a_cpu_section():
  for page in doc_pages()[1:]:
    text = read(page)
    if os.path.basename(page) == "history.md":  # the record of RESULTS.md: no commands
      assert not bash_blocks(text)
      continue
    body = section(text, CPU_SECTION)
    if bash_blocks(text):
      assert body is not None, f"{page} shows commands but has no '## {CPU_SECTION}' section"
    # Only the pages the slow test runs hold commands there (the others point to one of them).
    name = os.path.splitext(os.path.basename(page))[0]
    assert bool(body and bash_blocks(body)) == (name in CPU_PAGES), page


def assert_the_expected_cpu_commands(commands: list[str]) -> None:
  """The subcommands the slow test's assertions are written for, in their order."""
  assert [c.split()[:2] for c in commands if c.startswith("imagen-jax")] == [
      ["imagen-jax", "train"], ["imagen-jax", "train"], ["imagen-jax", "sample"],
      ["imagen-jax", "eval"], ["imagen-jax", "edit"], ["imagen-jax", "finetune"],
      ["imagen-jax", "sample"], ["imagen-jax", "inspect"], ["imagen-jax", "inspect"],
      ["imagen-jax", "encode"], ["imagen-jax", "encode"]]


def test_the_cpu_commands_are_the_ones_the_slow_test_expects():
  commands = cpu_commands()
  assert_the_expected_cpu_commands(commands)
  # Every path is relative: run in a fresh directory, nothing lands outside it.
  for command in commands:
    assert all(not os.path.isabs(a.split("=", 1)[-1]) for a in shlex.split(command)
               if a.startswith(("--workdir=", "--outdir=", "--samples=", "--config.output=",
                                "--base=", "--image=", "--config.data.data_dir="))), command


def documented_configs() -> list[tuple[str, str, dict[str, str]]]:
  """(page, config spec, {key: value text}) of every command line in a bash block of the README
  and docs/ that gives `--config=configs/...`, with that line's `--config.KEY=VALUE` overrides."""
  found = []
  for page in doc_pages():
    for block in bash_blocks(read(page)):
      for line in block.splitlines():
        if not line.strip() or line.strip().startswith("#"):
          continue
        words = shlex.split(line, comments=True)
        specs = [w.split("=", 1)[1] for w in words if w.startswith("--config=")]
        overrides = dict(w[len("--config."):].split("=", 1) for w in words
                         if w.startswith("--config.") and "=" in w)
        assert len(specs) <= 1, (page, line)
        assert specs or not overrides, f"{page}: overrides without --config: {line}"
        if specs:
          found.append((page, specs[0], overrides))
  return found


def test_every_documented_config_and_override_loads():
  found = documented_configs()
  assert len(found) >= 20  # the README and docs/ show 24; a parsing slip finds fewer
  specs = {spec for _, spec, _ in found}
  assert {"configs/demo_base.py:quick", "configs/demo_base.py:quick,finetune",
          "configs/base64.py:500m,finetune", "configs/encode.py:xxl",
          "configs/encode.py:tiny", "configs/sr1024.py:paper"} <= specs
  for page, spec, overrides in found:
    if spec.split(":")[0].endswith("/config.py") and not spec.startswith("configs/"):
      continue  # a converted stage's own config file (`imagen-jax convert`): its workdir's
    assert spec.startswith("configs/"), (page, spec)
    try:
      config_lib.load_config(spec, {key: config_lib.parse_value(value)
                                    for key, value in overrides.items()})
    except Exception as e:  # pylint: disable=broad-except
      raise AssertionError(f"{page}: --config={spec} {overrides}: {e}") from e


def heading_anchor(heading: str) -> str:
  """GitHub's anchor of a markdown heading: lower case, punctuation dropped, spaces -> '-'."""
  return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def test_every_relative_link_finds_its_file_and_heading():
  pages = doc_pages() + ["benchmarks/RESULTS.md"]
  for page in pages:
    for target in re.findall(r"\]\(([^)\s]+)\)", read(page)):
      if re.match(r"[a-z]+:", target):  # http:, https:, mailto:
        continue
      path, _, anchor = target.partition("#")
      path = os.path.normpath(os.path.join(os.path.dirname(page), path)) if path else page
      assert os.path.exists(os.path.join(REPO, path)), f"{page}: {target}: no {path}"
      if anchor:
        anchors = {heading_anchor(h) for h in re.findall(r"^#+ (.+)$", read(path), re.M)}
        assert anchor in anchors, f"{page}: {target}: no heading with anchor #{anchor}"


@pytest.mark.slow
def test_every_cpu_command_runs_as_written_from_a_fresh_directory(tmp_path):
  commands = cpu_commands()
  assert_the_expected_cpu_commands(commands)
  outputs = {}
  for command in commands:
    out = run_as_typed(command, tmp_path)
    assert out.returncode == 0, (command, out.stderr[-4000:])
    name = command.split(" ", 2)[1] if command.startswith("imagen-jax") else command
    outputs.setdefault(name + (" --memory" if " --memory" in command else ""), out)
    # Every path was relative: nothing lands outside the fresh directory.
    assert all(not os.path.isabs(a.split("=", 1)[-1]) for a in shlex.split(command)
               if a.startswith(("--workdir=", "--outdir=", "--samples=", "--config.output=",
                                "--base=", "--image=")))
  for stage in ("base", "sr"):
    total = config_lib.load_config(f"configs/demo_{stage}.py:quick").total_steps
    assert os.listdir(tmp_path / "runs" / stage / "checkpoints") == [str(total)]
    stored = json.loads((tmp_path / "runs" / stage / "config.json").read_text())
    assert stored["data"]["data_dir"] == str(tmp_path / "data")  # resolved, valid from anywhere
  pngs = sorted(p for p in os.listdir(tmp_path / "samples") if p.endswith(".png"))
  assert pngs == ["00000.png", "00001.png", "00002.png", "00003.png", "grid.png"]
  records = [json.loads(line) for line in open(tmp_path / "samples" / "samples.jsonl")]
  assert [r["stages"][0]["workdir"] for r in records] == [str(tmp_path / "runs" / "base")] * 4
  edited = [json.loads(line) for line in open(tmp_path / "edits" / "samples.jsonl")]
  assert edited[0]["image"] == str(tmp_path / "samples" / "00000.png")
  assert edited[0]["edit"]["mode"] == "img2img" and edited[0]["edit"]["strength"] == 0.6
  assert (tmp_path / "edits" / "00000.png").is_file()
  # The LoRA workdir holds the adapters of 20 steps and names its base; it samples in its place.
  assert os.listdir(tmp_path / "runs" / "blicket" / "checkpoints") == ["20"]
  tuned = json.loads((tmp_path / "runs" / "blicket" / "config.json").read_text())
  assert tuned["finetune"]["method"] == "lora"
  assert tuned["finetune"]["base"] == str(tmp_path / "runs" / "base")
  blickets = [json.loads(line) for line in open(tmp_path / "blickets" / "samples.jsonl")]
  assert blickets[0]["stages"][0]["lora"] == {"base": str(tmp_path / "runs" / "base"),
                                              "base_step": 30, "scale": 1.0}
  scores = json.loads((tmp_path / "samples" / "scores.json").read_text())
  assert scores["all"]["n"] == 4 and 0 <= scores["all"]["all_correct"] <= 1
  assert '"batch_size": 64' in outputs["inspect"].stdout
  assert "total_params: " in outputs["inspect"].stdout
  memory = json.loads(outputs["inspect --memory"].stdout.split("MEMORY_JSON ", 1)[1])
  assert memory["mesh"]["fsdp"] == 2 and memory["per_device_batch"] == 16
  assert memory["largest_per_device_batch"] > 16  # a 1.8M-parameter net on an 80 GB device
  assert (tmp_path / "cache").is_dir()
