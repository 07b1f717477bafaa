"""The package import graph: imports run down the layers only (see the README's Layout).

    core                               config, sharding, distributed, I/O, checkpoints, images
    diffusion  models  data  text      the pieces of a diffusion model and its inputs
    train                              training a stage (and its plan: what the network is)
    interop  sample                    other frameworks' checkpoints in and out; a cascade
    eval                               scoring samples
    workflows                          what composes train + sample + eval: demo, fine-tuning
    serve                              the sampling server: batching, HTTP API, web page
    commands  cli                      flags in, one library call out

Every `import` of an imagen_jax module counts, including those inside functions.
"""

import ast
import os

from helpers import REPO

PACKAGE = os.path.join(REPO, "imagen_jax")

# Who may import whom (a component always may import itself).
ALLOWED = {
    "core": set(),
    "diffusion": {"core"},
    "models": {"core", "diffusion"},
    "data": {"core"},
    "text": {"core", "data"},
    "train": {"core", "diffusion", "models", "data", "text"},
    "interop": {"core", "diffusion", "models", "data", "text", "train"},  # a stage's plan
    "sample": {"core", "diffusion", "models", "data", "text", "train"},  # a stage's plan
    "eval": {"core", "diffusion", "models", "data", "text", "sample"},
    "workflows": {"core", "diffusion", "models", "data", "text", "train", "sample", "eval"},
    "serve": {"core", "diffusion", "models", "data", "text", "sample", "eval"},
    "commands": {"core", "diffusion", "models", "data", "text", "train", "sample", "eval",
                 "workflows", "interop", "serve"},
    "cli": {"core"},  # it loads `commands.<name>` by name, one per process
    "main": {"cli"},  # python -m imagen_jax
    "configs": set(),
    "root": set(),
}


def component(module: str) -> str:
  """imagen_jax.<package>.x -> <package>; imagen_jax.<module> -> <module>; imagen_jax -> root."""
  parts = module.split(".")
  if len(parts) == 1:
    return "root"
  return {"__init__": "root", "__main__": "main"}.get(parts[1], parts[1])


def imports_of(path: str, module: str) -> set[str]:
  """The imagen_jax modules that the file at `path` (module `module`) imports."""
  found = set()
  for node in ast.walk(ast.parse(open(path, encoding="utf-8").read())):
    if isinstance(node, ast.Import):
      found.update(a.name for a in node.names if a.name.startswith("imagen_jax"))
    elif isinstance(node, ast.ImportFrom):
      if node.level:  # relative: resolve against the importing module's package
        base = module.split(".")[:-node.level]
        name = ".".join(base + ([node.module] if node.module else []))
      else:
        name = node.module or ""
      if name == "imagen_jax":  # `from imagen_jax import models`: the names are the modules
        found.update(f"{name}.{a.name}" for a in node.names)
      elif name.startswith("imagen_jax."):
        found.add(name)
  return found


def package_modules():
  """(path, module name) of every module of the package, configs/ (imagen_jax.configs) too."""
  for root, _, files in os.walk(PACKAGE):
    for name in files:
      if name.endswith(".py"):
        path = os.path.join(root, name)
        rel = os.path.relpath(path, REPO)[:-3].replace(os.sep, ".")
        yield path, rel.removesuffix(".__init__")
  for name in os.listdir(os.path.join(REPO, "configs")):
    if name.endswith(".py"):
      yield os.path.join(REPO, "configs", name), f"imagen_jax.configs.{name[:-3]}"


def edges() -> dict[tuple[str, str], list[str]]:
  """{(importer component, imported component): [importing modules]} across components."""
  out: dict[tuple[str, str], list[str]] = {}
  for path, module in package_modules():
    for imported in imports_of(path, module):
      pair = (component(module), component(imported))
      if pair[0] != pair[1]:
        out.setdefault(pair, []).append(f"{module} imports {imported}")
  return out


def test_imports_run_down_the_layers():
  graph = edges()
  assert graph, "no imports found: the parser is broken"
  assert ("train", "core") in graph and ("commands", "train") in graph  # the parser sees both kinds
  bad = [why for (src, dst), whys in sorted(graph.items()) if dst not in ALLOWED[src]
         for why in whys]
  assert not bad, "imports against the layers:\n" + "\n".join(bad)


def test_every_component_has_a_layer():
  seen = {component(m) for _, m in package_modules()}
  assert seen <= set(ALLOWED), f"components without a layer: {seen - set(ALLOWED)}"


def test_allowed_graph_is_acyclic():
  # The rules themselves form a DAG: a topological order exists.
  remaining = {k: set(v) for k, v in ALLOWED.items()}
  order = []
  while remaining:
    ready = [k for k, deps in remaining.items() if deps <= set(order)]
    assert ready, f"cycle among {sorted(remaining)}"
    order += sorted(ready)
    for k in ready:
      del remaining[k]


def test_the_checker_catches_an_upward_import(tmp_path):
  bad = tmp_path / "bad.py"
  bad.write_text("from imagen_jax import models\n\ndef f():\n  from imagen_jax.train import train\n")
  assert imports_of(str(bad), "imagen_jax.core.bad") == {"imagen_jax.models", "imagen_jax.train"}
  assert "train" not in ALLOWED[component("imagen_jax.core.bad")]
