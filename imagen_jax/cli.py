"""The `imagen-jax` command: `imagen-jax <subcommand> [--flags]`.

Each subcommand is an absl program in its own module of `imagen_jax.commands`, with a
module-level `main(argv)` and its flags; this file only picks the module and parses flags so that a bad `--config` override
stops at once with exit code 2 and a message naming the key (not a traceback).

    imagen-jax train --config=configs/base64.py:tiny --config.optimizer.lr=3e-4 --workdir=/tmp/w
"""

from __future__ import annotations

import importlib
import logging
import sys
from typing import Sequence

from absl import app
from absl import flags

from imagen_jax.core import config_lib
from imagen_jax.core import hugepages

# name -> (module with main(argv), one-line description).
SUBCOMMANDS: dict[str, tuple[str, str]] = {
    "train": ("imagen_jax.commands.train", "train one cascade stage from its config"),
    "finetune": ("imagen_jax.commands.finetune",
                 "adapt a trained stage to a subject (LoRA or full, class-prior preservation)"),
    "encode": ("imagen_jax.commands.encode", "precompute T5 caption embeddings; convert T5 weights"),
    "sample": ("imagen_jax.commands.sample", "sample a cascade stitched from stage workdirs"),
    "edit": ("imagen_jax.commands.edit", "inpaint, change (img2img) or upscale an image with a cascade"),
    "demo": ("imagen_jax.commands.demo", "train, sample and score a tiny shapes cascade on the CPU"),
    "eval": ("imagen_jax.commands.eval", "score samples: shapes adherence, FID, DrawBench"),
    "convert": ("imagen_jax.commands.convert",
                "import DeepFloyd IF's stages from diffusers' format, export them back"),
    "inspect": ("imagen_jax.commands.inspect", "print a resolved config and its model's parameter table"),
    "serve": ("imagen_jax.commands.serve",
              "serve a cascade over HTTP: an OpenAI-style images API, batching, a web page"),
}

USAGE_ERROR = 2  # bad command line or config: nothing has run


def usage() -> str:
  width = max(map(len, SUBCOMMANDS))
  lines = ["usage: imagen-jax <subcommand> [--flags]   (imagen-jax <subcommand> --help for flags)",
           "", "subcommands:"]
  lines += [f"  {name.ljust(width)}  {doc}" for name, (_, doc) in SUBCOMMANDS.items()]
  return "\n".join(lines)


def subcommand_help(name: str, module) -> str:
  """The subcommand's docstring and its flags (its own and the shared ones it declares)."""
  return "\n".join([f"usage: imagen-jax {name} [--flags]", "", (module.__doc__ or "").strip(), "",
                    "flags:", flags.FLAGS.module_help(module.__name__)])


def _fail(message: str) -> None:
  print(f"imagen-jax: error: {message}", file=sys.stderr)
  sys.exit(USAGE_ERROR)


def parse_flags(argv: Sequence[str]) -> list[str]:
  """absl flag parsing that turns config problems into exit code 2 with the key named."""
  overrides = [a[2:].split("=", 1)[0][len("config."):] for a in argv[1:]
               if a.startswith("--config.")]
  try:
    rest = flags.FLAGS(argv)
  except flags.Error as e:
    # absl's message already names the flag, e.g. "flag --config.steps=abc: invalid literal".
    _fail(str(e))
  except (AttributeError, KeyError) as e:
    # ml_collections raises these for an unknown key, before our code can look at it.
    _fail(_unknown_key_message(argv, overrides, e))
  if "config" in flags.FLAGS:
    try:
      config = flags.FLAGS["config"].value
      if config is not None:
        config.keys()  # config_flags defers a load error until first use
        config_lib.resolve_paths(config)  # relative paths in --config.* mean the current dir
    except Exception as e:  # pylint: disable=broad-except
      _fail(f"cannot load --config={flags.FLAGS['config'].config_filename!r}: {e}")
  return rest


def _unknown_key_message(argv: Sequence[str], overrides: Sequence[str], error: Exception) -> str:
  spec = next((a.split("=", 1)[1] for a in argv if a.startswith("--config=")), None)
  if spec is not None:
    try:
      config_lib.check_override_keys(config_lib.load_config(spec), overrides)
    except config_lib.ConfigError as e:
      return str(e)
    except Exception:  # pylint: disable=broad-except
      pass
  return f"bad config override ({', '.join('--config.' + o for o in overrides)}): {error}"


def _resolve_config_flags(args: Sequence[str]) -> list[str]:
  """`--config=configs/x.py:v` works outside the repository too (see config_lib)."""
  return [f"--config={config_lib.resolve_config_path(a.split('=', 1)[1])}"
          if a.startswith("--config=") else a for a in args]


class _QuietLibraries(logging.Filter):
  """Drops INFO chatter of libraries that log every checkpoint step (warnings still show,
  except Orbax's notes that a checkpoint directory was opened read-only, as sampling does)."""

  NOISY = ("/orbax/", "/tensorstore/", "/grain/")

  def filter(self, record: logging.LogRecord) -> bool:
    if not any(part in record.pathname for part in self.NOISY):
      return True
    message = record.getMessage()
    return record.levelno >= logging.WARNING and "read only" not in message and (
        "read_only" not in message)


def main(argv: Sequence[str] | None = None) -> None:
  if argv is None:  # the real command, not a test calling main(): see core/hugepages.py
    hugepages.reexecute_with_huge_pages()
  argv = list(sys.argv if argv is None else argv)
  if len(argv) < 2 or argv[1] in ("-h", "--help", "help"):
    print(usage())
    sys.exit(0 if len(argv) >= 2 else USAGE_ERROR)
  name = argv[1]
  if name not in SUBCOMMANDS:
    _fail(f"unknown subcommand {name!r}\n{usage()}")
  module = importlib.import_module(SUBCOMMANDS[name][0])
  if any(a in ("-h", "--help", "--helpshort", "-?") for a in argv[2:]):
    print(subcommand_help(name, module))
    sys.exit(0)
  logging.getLogger("absl").addFilter(_QuietLibraries())

  def run(command_argv):
    # A command's INPUT_ERRORS name bad input (a file, a flag value) before any compute: a
    # message and exit code 2, not a traceback.
    try:
      module.main(command_argv)
    except getattr(module, "INPUT_ERRORS", ()) as e:
      _fail(str(e))

  app.run(run, argv=[f"imagen-jax {name}"] + _resolve_config_flags(argv[2:]),
          flags_parser=parse_flags)


if __name__ == "__main__":
  main()
