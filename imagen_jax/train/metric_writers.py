"""Metric writers that need no TensorFlow: TensorBoard event files, the console, and both.

clu's `metric_writers` package imports TensorFlow at import time, so it cannot be used on the
core install. These writers keep clu's MetricWriter method names (write_scalars, write_images,
write_texts, flush, close), so code reads the same as the flax examples. TensorBoard's own
pure-Python event writer does the file format.
"""

from __future__ import annotations

import io
import os
import shutil
import tempfile
import time
from typing import Any, Mapping, Sequence

from absl import logging
import numpy as np
from PIL import Image
from tensorboard.compat.proto import event_pb2
from tensorboard.compat.proto import summary_pb2
from tensorboard.compat.proto import tensor_pb2
from tensorboard.compat.proto import tensor_shape_pb2
from tensorboard.compat.proto import types_pb2
from tensorboard.plugins.text import metadata as text_metadata
from tensorboard.summary.writer.event_file_writer import EventFileWriter

from imagen_jax.core import fileio


class TensorBoardWriter:
  """Writes scalars, images and texts to TensorBoard event files under `logdir`."""

  def __init__(self, logdir: str):
    # Object stores (gs://) cannot append, and TensorBoard's fsspec path "appends" by rewriting
    # the object with only the newest events. So remote logs are written to a local staging
    # directory and each flush() uploads the whole event file in one atomic write.
    self._logdir = str(logdir)
    self._staging = tempfile.mkdtemp(prefix="imagen_tb_") if fileio.is_remote(self._logdir) else None
    self._writer = EventFileWriter(self._staging or self._logdir, max_queue_size=100,
                                   flush_secs=30)

  def _write(self, step: int, values: Sequence[summary_pb2.Summary.Value]) -> None:
    event = event_pb2.Event(wall_time=time.time(), step=int(step),
                            summary=summary_pb2.Summary(value=list(values)))
    self._writer.add_event(event)

  def write_scalars(self, step: int, scalars: Mapping[str, Any]) -> None:
    self._write(step, [summary_pb2.Summary.Value(tag=k, simple_value=float(v))
                       for k, v in scalars.items()])

  def write_images(self, step: int, images: Mapping[str, np.ndarray]) -> None:
    """images: name -> uint8 [H, W, 3] (or [H, W, 1])."""
    values = []
    for name, image in images.items():
      image = np.asarray(image)
      buf = io.BytesIO()
      Image.fromarray(image.squeeze(-1) if image.shape[-1] == 1 else image).save(buf, "PNG")
      values.append(summary_pb2.Summary.Value(tag=name, image=summary_pb2.Summary.Image(
          encoded_image_string=buf.getvalue(), height=image.shape[0], width=image.shape[1],
          colorspace=image.shape[-1])))
    self._write(step, values)

  def write_texts(self, step: int, texts: Mapping[str, str]) -> None:
    values = []
    for name, text in texts.items():
      tensor = tensor_pb2.TensorProto(
          dtype=types_pb2.DT_STRING, string_val=[text.encode("utf-8")],
          tensor_shape=tensor_shape_pb2.TensorShapeProto())
      values.append(summary_pb2.Summary.Value(
          tag=name, tensor=tensor, metadata=text_metadata.create_summary_metadata(name, "")))
    self._write(step, values)

  def flush(self) -> None:
    self._writer.flush()
    self._upload()

  def close(self) -> None:
    self._writer.close()
    self._upload()
    if self._staging:
      shutil.rmtree(self._staging, ignore_errors=True)

  def _upload(self) -> None:
    """Uploads each staged event file whole; transient errors are retried a bounded number of
    times (fileio.write_bytes), then a StorageError naming the file stops the run."""
    if not self._staging:
      return
    for name in os.listdir(self._staging):
      with open(os.path.join(self._staging, name), "rb") as local:
        fileio.write_bytes(fileio.join(self._logdir, name), local.read())


class ConsoleWriter:
  """Logs scalars as one line per step (absl logging), and notes images and texts."""

  def write_scalars(self, step: int, scalars: Mapping[str, Any]) -> None:
    body = ", ".join(f"{k}={float(v):.5g}" for k, v in sorted(scalars.items()))
    logging.info("[%d] %s", step, body)

  def write_images(self, step: int, images: Mapping[str, np.ndarray]) -> None:
    logging.info("[%d] images: %s", step, {k: np.shape(v) for k, v in images.items()})

  def write_texts(self, step: int, texts: Mapping[str, str]) -> None:
    for k, v in texts.items():
      logging.info("[%d] %s: %s", step, k, v)

  def flush(self) -> None:
    pass

  def close(self) -> None:
    pass


class MultiWriter:
  """Fans every call out to several writers."""

  def __init__(self, writers: Sequence[Any]):
    self._writers = list(writers)

  def __getattr__(self, name: str):
    def fan_out(*args, **kwargs):
      for w in self._writers:
        getattr(w, name)(*args, **kwargs)
    return fan_out


def create_default_writer(logdir: str | None, *, just_logging: bool = False) -> Any:
  """TensorBoard + console on the lead process; console only elsewhere (clu's convention)."""
  if just_logging or logdir is None:
    return ConsoleWriter()
  return MultiWriter([TensorBoardWriter(logdir), ConsoleWriter()])


class ReportProgress:
  """Console progress between reports: steps/s, images/s and ETA (like clu's ReportProgress)."""

  def __init__(self, total_steps: int, batch_size: int):
    self.total_steps, self.batch_size = total_steps, batch_size
    self._step, self._time = 0, time.perf_counter()

  def start(self, step: int) -> None:
    """Marks the step the timing starts from (after compilation, on resume too)."""
    self._step, self._time = step, time.perf_counter()

  def report(self, step: int) -> dict[str, float]:
    """Logs and returns the rates since the last report (or start)."""
    now = time.perf_counter()
    steps_per_s = (step - self._step) / max(now - self._time, 1e-9)
    eta = (self.total_steps - step) / max(steps_per_s, 1e-9)
    logging.info("step %d/%d: %.3f steps/s, %.1f images/s, ETA %s", step, self.total_steps,
                 steps_per_s, steps_per_s * self.batch_size, _hms(eta))
    self._step, self._time = step, now
    return {"steps_per_sec": steps_per_s, "images_per_sec": steps_per_s * self.batch_size}


def _hms(seconds: float) -> str:
  seconds = int(seconds)
  return f"{seconds // 3600}h{seconds // 60 % 60:02d}m{seconds % 60:02d}s"
