"""Launches imagen-jax jobs with XManager: on this machine, on Vertex AI, or on GKE (TPU or GPU).

    pip install -e '.[launch]'
    xmanager launch launch/xm_launch.py -- --platform=gke --accelerator=tpu_v4=2x2x4 \
        --workdir=gs://my-bucket/base64 --config=configs/base64.py:500m \
        --config.batch_size=2048 --sweep='optimizer.lr=1e-4,3e-4'

Every flag this launcher does not define (`--config.*` overrides, `--distributed_*`, ...) is
passed through to `imagen-jax <subcommand>` unchanged. Each `--sweep='KEY=V1,V2,...'` is one
axis; several sweeps give their product, one work unit per point, each training in
`<workdir>/<n>_<KEY=V,...>`. Overrides and sweep values are checked against the config before
anything is built or launched, so a misspelled key fails here, not an hour later on a pod.

`--dry_run` prints the job spec (work units, their arguments, the executor's requirements) as
JSON and launches nothing. The spec is plain Python (`build_spec`); only `launch` imports
xmanager, so the spec is testable where xmanager is not installed.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import os
import re
import sys
from typing import Any, Sequence

from absl import app
from absl import flags

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO not in sys.path:  # `xmanager launch launch/xm_launch.py` runs this file as a script
  sys.path.insert(0, REPO)

from imagen_jax.core import config_lib  # pylint: disable=g-import-not-at-top,wrong-import-position

try:  # xmanager's own flags (--xm_*) must be known before ours are parsed, or they pass through
  from xmanager import xm_flags  # pylint: disable=g-import-not-at-top,unused-import
except ImportError:
  pass

PLATFORMS = ("local", "vertex", "gke")
SUBCOMMANDS = ("train", "encode")
# xmanager's Vertex AI backend maps only these TPU types; newer TPUs run on GKE.
VERTEX_TPUS = ("tpu_v2", "tpu_v3")
JAX_SPECS = {"tpu": "jax[tpu]>=0.10.2,<0.12", "gpu": "jax[cuda12]>=0.10.2,<0.12",
             "cpu": "jax>=0.10.2,<0.12"}

class LaunchError(ValueError):
  """A launch that cannot work as asked: the message says what to change."""


@dataclasses.dataclass(frozen=True)
class Accelerator:
  resource: str   # an xm.ResourceType name in lower case: tpu_v4, a100, ...
  quantity: str   # a count ("8") or a TPU slice topology ("2x2x4")

  @property
  def kind(self) -> str:
    return "tpu" if self.resource.startswith("tpu") else "gpu"

  def requirements(self) -> dict[str, int | str]:
    """Keyword arguments of xm.JobRequirements."""
    return {self.resource: int(self.quantity) if self.quantity.isdigit() else self.quantity}


@dataclasses.dataclass(frozen=True)
class WorkUnit:
  name: str
  args: list[str]   # the arguments of `imagen-jax <subcommand>`


@dataclasses.dataclass(frozen=True)
class JobSpec:
  title: str
  platform: str
  subcommand: str
  accelerator: Accelerator | None
  base_image: str
  docker_instructions: list[str]
  work_units: list[WorkUnit]

  @property
  def entrypoint(self) -> list[str]:
    """Shell commands of the container; xmanager appends each work unit's arguments."""
    return [f"imagen-jax {self.subcommand}"]

  def to_json(self) -> str:
    return json.dumps(dataclasses.asdict(self) | {"entrypoint": self.entrypoint}, indent=2)


def parse_accelerator(text: str) -> Accelerator | None:
  if not text:
    return None
  match = re.fullmatch(r"([a-z][a-z0-9_]*)=(\d+|\d+(x\d+)+)", text.strip().lower())
  if not match:
    raise LaunchError(f"--accelerator={text!r}: expected RESOURCE=COUNT or RESOURCE=TOPOLOGY, "
                      f"e.g. tpu_v4=2x2x4 or a100=8")
  return Accelerator(match.group(1), match.group(2))


def split_values(text: str) -> list[str]:
  """'1e-4,3e-4' -> ['1e-4', '3e-4']; commas inside (), [] or quotes do not split."""
  values, depth, quote, current = [], 0, "", ""
  for char in text:
    if quote:
      quote = "" if char == quote else quote
    elif char in "'\"":
      quote = char
    elif char in "([":
      depth += 1
    elif char in ")]":
      depth -= 1
    elif char == "," and depth == 0:
      values.append(current.strip())
      current = ""
      continue
    current += char
  values.append(current.strip())
  return values


def parse_sweeps(sweeps: Sequence[str]) -> list[dict[str, str]]:
  """['a=1,2', 'b=x,y'] -> [{a:1,b:x}, {a:1,b:y}, {a:2,b:x}, {a:2,b:y}]; [] -> [{}]."""
  axes = []
  for sweep in sweeps:
    key, sep, values = sweep.partition("=")
    key = key.strip().removeprefix("config.")
    if not sep or not key or not values.strip():
      raise LaunchError(f"--sweep={sweep!r}: expected KEY=V1,V2,...")
    axes.append([(key, value) for value in split_values(values)])
  keys = [axis[0][0] for axis in axes]
  if len(set(keys)) != len(keys):
    raise LaunchError(f"--sweep: a key appears twice in {keys}")
  return [dict(point) for point in itertools.product(*axes)]


def config_overrides(args: Sequence[str]) -> dict[str, str]:
  """{key: value} of the `--config.key=value` arguments among `args`."""
  out = {}
  for arg in args:
    if arg.startswith("--config."):
      key, sep, value = arg[len("--config."):].partition("=")
      if not sep:
        raise LaunchError(f"{arg!r}: a config override needs a value (--config.KEY=VALUE)")
      out[key] = value
  return out


def check_config(config_spec: str, overrides: dict[str, str], points: list[dict[str, str]]
                 ) -> None:
  """Fails (config_lib.ConfigError naming the key) on a key or value the config rejects."""
  base = config_lib.load_config(config_spec)
  for key, value in overrides.items():
    config_lib.set_by_path(base, key, config_lib.parse_value(value))
  for point in points:
    config = config_lib.load_config(config_spec)
    for key, value in {**overrides, **point}.items():
      config_lib.set_by_path(config, key, config_lib.parse_value(value))


def unit_name(index: int, point: dict[str, str]) -> str:
  """A directory-safe name for a sweep point: `1_optimizer.lr=0.0003`."""
  text = ",".join(f"{k}={v}" for k, v in point.items())
  return f"{index}_" + re.sub(r"[^A-Za-z0-9_.,=+-]", "_", text)


def docker_instructions(repo: str, accelerator: Accelerator | None) -> list[str]:
  """Copies this repository into the image and installs it with the accelerator's jax."""
  jax_spec = JAX_SPECS[accelerator.kind if accelerator else "cpu"]
  return [f"COPY {os.path.basename(os.path.normpath(repo))}/ /imagen-jax",
          "WORKDIR /imagen-jax",
          f"RUN pip install --no-cache-dir '{jax_spec}' '.[launch]'"]


def build_spec(*, platform: str, subcommand: str, config: str | None, workdir: str | None,
               passthrough: Sequence[str], sweeps: Sequence[str], accelerator: str = "",
               title: str | None = None, base_image: str = "python:3.11-slim",
               repo: str = REPO) -> JobSpec:
  """The job to launch, checked: one work unit per sweep point, with its full arguments."""
  if platform not in PLATFORMS:
    raise LaunchError(f"--platform={platform!r} must be one of {PLATFORMS}")
  if not config:
    raise LaunchError("--config is required, e.g. --config=configs/base64.py:500m")
  bad = [a for a in passthrough if not a.startswith("--")]
  if bad:
    raise LaunchError(f"unexpected arguments {bad}: pass imagen-jax flags as --flag=value")
  if any(a.startswith(("--config=", "--workdir=")) for a in passthrough):
    raise LaunchError("give --config and --workdir once, as this launcher's flags")
  acc = parse_accelerator(accelerator)
  if platform == "vertex" and acc and acc.kind == "tpu" and acc.resource not in VERTEX_TPUS:
    raise LaunchError(f"--accelerator={accelerator}: xmanager runs only {VERTEX_TPUS} on Vertex "
                      f"AI; use --platform=gke for {acc.resource}")
  if subcommand == "train":
    if not workdir:
      raise LaunchError("--workdir is required for train")
    if platform != "local" and not workdir.startswith("gs://"):
      raise LaunchError(f"--workdir={workdir!r}: jobs on {platform} need a gs:// workdir")
  points = parse_sweeps(sweeps)
  overrides = config_overrides(passthrough)
  check_config(config, overrides, points)

  units = []
  for index, point in enumerate(points):
    name = unit_name(index, point) if point else "0"
    args = [f"--config={config}", *passthrough,
            *(f"--config.{key}={value}" for key, value in point.items())]
    if workdir:
      args.append(f"--workdir={workdir.rstrip('/')}/{name}" if len(points) > 1 else
                  f"--workdir={workdir}")
    units.append(WorkUnit(name, args))
  title = title or f"imagen-jax {subcommand} {config}"
  return JobSpec(title=title, platform=platform, subcommand=subcommand, accelerator=acc,
                 base_image=base_image, docker_instructions=docker_instructions(repo, acc),
                 work_units=units)


# --- The thin xmanager layer -------------------------------------------------------------------

def make_executor(spec: JobSpec, tpu_runtime_version: str | None = None):
  """The xmanager executor for the spec's platform and accelerator."""
  from xmanager import xm  # pylint: disable=g-import-not-at-top
  from xmanager import xm_local  # pylint: disable=g-import-not-at-top
  requirements = xm.JobRequirements(**(spec.accelerator.requirements()
                                       if spec.accelerator else {}))
  if spec.platform == "local":
    return xm_local.Local(requirements=requirements)
  if spec.platform == "vertex":
    return xm_local.Vertex(requirements=requirements)
  tpu = xm_local.TpuCapability(tpu_runtime_version) if tpu_runtime_version else None
  return xm_local.Kubernetes(requirements=requirements, tpu_capability=tpu)


def make_jobs(spec: JobSpec, executable: Any, executor: Any) -> list[Any]:
  """One xm.Job per work unit (the packaged executable, the executor, the unit's arguments)."""
  from xmanager import xm  # pylint: disable=g-import-not-at-top
  return [xm.Job(executable=executable, executor=executor, args=unit.args, name=unit.name)
          for unit in spec.work_units]


def launch(spec: JobSpec, repo: str = REPO, tpu_runtime_version: str | None = None) -> None:
  """Packages the repository into a container and adds one work unit per sweep point."""
  from xmanager import xm  # pylint: disable=g-import-not-at-top
  from xmanager import xm_local  # pylint: disable=g-import-not-at-top
  executor = make_executor(spec, tpu_runtime_version)
  with xm_local.create_experiment(experiment_title=spec.title) as experiment:
    [executable] = experiment.package([xm.python_container(
        executor_spec=executor.Spec(), path=repo, base_image=spec.base_image,
        docker_instructions=spec.docker_instructions,
        entrypoint=xm.CommandList(spec.entrypoint))])
    for job in make_jobs(spec, executable, executor):
      experiment.add(job)


def define_flags() -> None:
  """The launcher's flags; defined only when it runs as a script (tests import it as a module
  next to imagen_jax, whose subcommands define --config and --workdir for themselves)."""
  flags.DEFINE_enum("platform", "local", PLATFORMS,
                    "Where to run: local (Docker here), vertex (Vertex AI) or gke.")
  flags.DEFINE_string(
      "accelerator", "", "RESOURCE=QUANTITY as xmanager names it: tpu_v4=2x2x4 (a slice "
      "topology), tpu_v5e=8, a100=8, h100=8; empty: CPU only.")
  flags.DEFINE_enum("subcommand", "train", SUBCOMMANDS, "The imagen-jax subcommand.")
  flags.DEFINE_string("config", None, "Config file[:variant], e.g. configs/base64.py:500m.")
  flags.DEFINE_string("workdir", None, "The run's workdir (gs:// off this machine); with a "
                      "sweep, each work unit trains in a subdirectory.")
  flags.DEFINE_multi_string("sweep", [], "KEY=V1,V2,... (a config key without 'config.'); "
                            "repeat for a product of axes.")
  flags.DEFINE_string("experiment_title", None, "Title (default: from the config).")
  flags.DEFINE_string("base_image", "python:3.11-slim", "Docker base image.")
  flags.DEFINE_string("tpu_runtime_version", None, "GKE: TPU software version.")
  flags.DEFINE_bool("dry_run", False, "Print the job spec as JSON; launch nothing.")


def main(argv: Sequence[str]) -> None:
  args = flags.FLAGS
  try:
    spec = build_spec(platform=args.platform, subcommand=args.subcommand, config=args.config,
                      workdir=args.workdir, passthrough=list(argv[1:]), sweeps=args.sweep,
                      accelerator=args.accelerator, title=args.experiment_title,
                      base_image=args.base_image)
  except (LaunchError, config_lib.ConfigError) as e:
    print(f"xm_launch: error: {e}", file=sys.stderr)
    sys.exit(2)
  if args.dry_run:
    print(spec.to_json())
    return
  launch(spec, tpu_runtime_version=args.tpu_runtime_version)


def parse_known_flags(argv: Sequence[str]) -> list[str]:
  """This launcher's flags; everything else stays in argv, for imagen-jax."""
  return flags.FLAGS(list(argv), known_only=True)


if __name__ == "__main__":
  define_flags()
  app.run(main, flags_parser=parse_known_flags)
