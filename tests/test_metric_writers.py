"""TensorBoard event files written without TensorFlow, read back by TensorBoard (and TF)."""

import glob

import numpy as np
import pytest

from imagen_jax.train import metric_writers


def write_events(logdir):
  writer = metric_writers.TensorBoardWriter(str(logdir))
  writer.write_scalars(3, {"loss": 0.25, "mfu": 0.5})
  image = np.zeros((4, 6, 3), np.uint8)
  image[1, 2] = (255, 10, 20)
  writer.write_images(3, {"samples": image})
  writer.write_texts(3, {"note": "hello"})
  writer.close()
  return image


def test_tensorboard_reads_scalars_images_texts(tmp_path):
  from tensorboard.backend.event_processing import event_accumulator  # pylint: disable=g-import-not-at-top
  image = write_events(tmp_path)
  acc = event_accumulator.EventAccumulator(str(tmp_path), size_guidance={"images": 0})
  acc.Reload()
  assert [(e.step, e.value) for e in acc.Scalars("loss")] == [(3, 0.25)]
  stored = acc.Images("samples")[0]
  assert (stored.width, stored.height) == (6, 4)
  from PIL import Image  # pylint: disable=g-import-not-at-top
  import io  # pylint: disable=g-import-not-at-top
  np.testing.assert_array_equal(np.asarray(Image.open(io.BytesIO(stored.encoded_image_string))),
                                image)
  assert "note" in acc.Tags()["tensors"]


@pytest.mark.tf
def test_tensorflow_reads_the_same_events(tmp_path):
  tf = pytest.importorskip("tensorflow", reason="TensorFlow comes with the tf extra")
  write_events(tmp_path)
  [path] = glob.glob(str(tmp_path / "events.out.tfevents.*"))
  values = {v.tag: v for e in tf.compat.v1.train.summary_iterator(path) for v in e.summary.value}
  assert values["loss"].simple_value == pytest.approx(0.25)
  decoded = tf.io.decode_png(values["samples"].image.encoded_image_string).numpy()
  assert decoded.shape == (4, 6, 3) and tuple(decoded[1, 2]) == (255, 10, 20)
  assert tf.make_ndarray(values["note"].tensor).item() == b"hello"
