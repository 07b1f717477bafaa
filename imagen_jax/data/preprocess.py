"""Image and caption decoding with bad-input handling, resizing and cropping, value ranges.

Bad input is converted where that is sensible and skipped otherwise, never fatal; each case has
a kind, and the builders and the pipeline count them:

  converted (the image or caption is used):  grayscale, palette, rgba (composited on black),
      cmyk, 16bit (high byte kept), non_utf8_caption (read as cp1252)
  skipped (`BadInput.kind`):  corrupt_image (truncated or unreadable bytes), too_small,
      too_large (a decompression-bomb guard, from the header before decoding),
      unsupported_image (a mode with no sensible RGB reading), empty_caption,
      missing_caption, undecodable_caption, missing_image (a captions-table row without its
      file), corrupt_shard (an unreadable webdataset tar; its later samples are lost),
      missing_embedding (no cached text embedding, when config.data.missing_embedding="skip")

Images stay uint8 on the host; `to_model_range` maps them to [-1, 1] on the device (4x less
host-to-device traffic than float32) and is shared by training and sampling.
"""

from __future__ import annotations

import io
from typing import Any

import jax.numpy as jnp
import numpy as np
from PIL import Image
from PIL import ImageOps

# Decompression-bomb guard: decoding 64M pixels takes 192 MB as RGB. Larger images are
# absurd for this model family (the top stage trains on 1024x1024).
MAX_PIXELS = 8192 * 8192
# Below this shorter side an image carries no usable content for any stage.
MIN_SIDE = 8
_EXIF_ORIENTATION = 0x0112

SKIP_KINDS = ("corrupt_image", "too_small", "too_large", "unsupported_image", "empty_caption",
              "missing_caption", "undecodable_caption", "unsupported_caption",
              "missing_embedding", "missing_image", "corrupt_shard")
CONVERT_KINDS = ("grayscale", "palette", "rgba", "cmyk", "16bit", "non_utf8_caption")


class BadInput(ValueError):
  """An example to skip; `kind` is one of SKIP_KINDS."""

  def __init__(self, kind: str, detail: str = ""):
    super().__init__(f"{kind}: {detail}" if detail else kind)
    self.kind = kind
    self.detail = detail


def _alpha_on_black(image: Image.Image) -> np.ndarray:
  rgba = np.asarray(image.convert("RGBA"), np.float32)
  return np.round(rgba[..., :3] * (rgba[..., 3:] / 255.0)).astype(np.uint8)


def _rawmode(image: Image.Image) -> str:
  """The decoder's raw mode (e.g. 'RGB;16B' for a 48-bit PNG); read before `load()`."""
  tile = getattr(image, "tile", None)
  if not tile:
    return ""
  args = tile[0][3] if len(tile[0]) > 3 else tile[0].args
  return args if isinstance(args, str) else (str(args[0]) if args else "")


def _to_rgb(image: Image.Image, rawmode: str) -> tuple[np.ndarray, str | None]:
  """uint8 [H, W, 3] and the conversion kind (None for plain 8-bit RGB)."""
  mode = image.mode
  if mode == "RGB":
    # PIL reads 48-bit PNGs as RGB, keeping the high bytes; count them as converted.
    return np.asarray(image), ("16bit" if ";16" in rawmode else None)
  if mode in ("I;16", "I;16B", "I;16L", "I;16N", "I"):
    values = np.asarray(image)
    if mode == "I" and "16" not in rawmode and values.max(initial=0) > 65535:
      raise BadInput("unsupported_image", "32-bit integer image")
    gray = (values.astype(np.uint32) >> 8).astype(np.uint8)
    return np.repeat(gray[..., None], 3, axis=-1), "16bit"
  if mode in ("1", "L"):
    return np.asarray(image.convert("RGB")), "grayscale"
  if mode in ("LA", "La", "RGBA", "RGBa"):
    return _alpha_on_black(image), "rgba"
  if mode in ("P", "PA"):
    has_alpha = mode == "PA" or "transparency" in image.info
    if has_alpha:
      return _alpha_on_black(image), "palette"
    return np.asarray(image.convert("RGB")), "palette"
  if mode == "CMYK":
    return np.asarray(image.convert("RGB")), "cmyk"
  if mode in ("YCbCr", "LAB", "HSV"):
    return np.asarray(image.convert("RGB")), None
  raise BadInput("unsupported_image", f"mode {mode}")


def decode_image(data: bytes, *, max_pixels: int = MAX_PIXELS, min_side: int = MIN_SIDE,
                 reduce_to: int = 0) -> tuple[np.ndarray, str | None]:
  """Encoded bytes -> (uint8 [H, W, 3] RGB, conversion kind or None); raises BadInput.

  The size is checked from the header before anything is decoded (decompression bombs), the
  whole image is then decoded (truncated files fail here, not later), EXIF orientation applied.
  `reduce_to` > 0 lets a JPEG decode at 1/2, 1/4 or 1/8 scale (libjpeg's DCT scaling, several
  times faster) while its shorter side stays >= `reduce_to`; the caller resizes the rest of the
  way with antialiasing. Give at least twice the final size, so the DCT scaling is never the
  last step. `min_side` and `max_pixels` apply to the full size.
  """
  if not data:
    raise BadInput("corrupt_image", "empty file")
  try:
    image = Image.open(io.BytesIO(data))
  except Image.DecompressionBombError as e:  # PIL's own guard, at twice its pixel limit
    raise BadInput("too_large", str(e)) from e
  except Exception as e:  # pylint: disable=broad-except  (PIL raises many types on bad bytes)
    raise BadInput("corrupt_image", str(e)) from e
  with image:
    width, height = image.size
    if width * height > max_pixels:
      raise BadInput("too_large", f"{width}x{height} > {max_pixels} pixels")
    if min(width, height) < min_side:
      raise BadInput("too_small", f"{width}x{height}")
    if reduce_to and image.format == "JPEG" and min(width, height) >= 2 * reduce_to:
      factor = min(width, height) / reduce_to
      image.draft(image.mode, (int(np.ceil(width / factor)), int(np.ceil(height / factor))))
    rawmode = _rawmode(image)
    try:
      image.load()
      if image.getexif().get(_EXIF_ORIENTATION, 1) != 1:  # camera photos stored sideways
        image = ImageOps.exif_transpose(image)
    except Image.DecompressionBombError as e:
      raise BadInput("too_large", str(e)) from e
    except Exception as e:  # pylint: disable=broad-except
      raise BadInput("corrupt_image", str(e)) from e
    return _to_rgb(image, rawmode)


def image_to_rgb(value: Any, reduce_to: int = 0) -> tuple[np.ndarray, str | None]:
  """A source's image feature -> (uint8 [H, W, 3] RGB, conversion kind or None); raises BadInput.

  Encoded bytes go through `decode_image`; arrays (TFDS decodes images itself) are uint8
  [H, W], [H, W, 1], [H, W, 3] or [H, W, 4], converted by the same rules: grayscale repeated,
  RGBA composited on black. Training, FID references and the encode job all read images here.
  """
  if not (isinstance(value, np.ndarray) and value.dtype != object):
    return decode_image(bytes(value), reduce_to=reduce_to)
  array = value[..., None] if value.ndim == 2 else value
  if array.ndim != 3 or array.dtype != np.uint8 or array.shape[-1] not in (1, 3, 4):
    raise BadInput("unsupported_image", f"array {value.dtype}{list(value.shape)}")
  if array.shape[-1] == 1:
    return np.repeat(array, 3, axis=-1), "grayscale"
  if array.shape[-1] == 4:
    alpha = array[..., 3:].astype(np.float32) / 255.0
    return np.round(array[..., :3] * alpha).astype(np.uint8), "rgba"
  return array, None


class CaptionError(TypeError):
  """A caption that is not text (the caption key names another feature): a config error."""


def decode_caption(data: Any) -> tuple[str, str | None]:
  """bytes or str -> (caption with whitespace normalized, conversion kind or None).

  UTF-8 first (a BOM is dropped); other bytes are read as cp1252 (Windows Latin-1, the usual
  non-UTF-8 caption file) and counted; bytes that are not even cp1252 are skipped.
  """
  kind = None
  if data is None:
    raise BadInput("missing_caption")
  if isinstance(data, (bytes, bytearray, memoryview, np.bytes_)):
    raw = bytes(data)
    try:
      text = raw.decode("utf-8-sig")
    except UnicodeDecodeError:
      try:
        text = raw.decode("cp1252")
        kind = "non_utf8_caption"
      except UnicodeDecodeError as e:
        raise BadInput("undecodable_caption", str(e)) from e
  elif isinstance(data, str):
    text = data
  else:  # a number or a structure: the caption key points at the wrong feature
    raise BadInput("unsupported_caption", f"{type(data).__name__} {data!r:.80}")
  text = " ".join(text.split())
  if not text:
    raise BadInput("empty_caption")
  return text, kind


def resize_and_crop(image: np.ndarray, size: int, crop: int | None = None,
                    offset: tuple[int, int] | None = None) -> np.ndarray:
  """uint8 [H, W, 3] -> uint8 [crop, crop, 3]: shorter side resized to `size`, then cropped.

  The crop (default: `size`, the whole square) is taken at `offset` = (top, left) in the
  resized image, centered when None. Resizing is bicubic with antialiasing (PIL widens the
  filter when it shrinks). Crop and resize are one resampling step over a source box, so a
  256 crop of a 1024 image costs a 256x256 resample, not a 1024x1024 one.
  """
  crop = crop or size
  height, width = image.shape[:2]
  out_h, out_w = resized_extent(height, width, size)
  top, left = offset if offset is not None else ((out_h - crop) // 2, (out_w - crop) // 2)
  if not (0 <= top <= out_h - crop and 0 <= left <= out_w - crop):
    raise ValueError(f"crop {crop} at {(top, left)} is outside the resized {out_h}x{out_w}")
  scale = min(height, width) / size            # source pixels per output pixel
  if scale == 1:
    return image[top:top + crop, left:left + crop]
  box = (left * scale, top * scale, (left + crop) * scale, (top + crop) * scale)
  return np.asarray(Image.fromarray(image).resize((crop, crop), Image.BICUBIC, box=box,
                                                  reducing_gap=None))


def resized_extent(height: int, width: int, size: int) -> tuple[int, int]:
  """(height, width) after resizing the shorter side to `size` (for random crop offsets)."""
  scale = min(height, width) / size
  return round(height / scale), round(width / scale)


def downsample(image: np.ndarray, size: int) -> np.ndarray:
  """uint8 [S, S, 3] -> uint8 [size, size, 3], antialiased bicubic (the SR low-res input).

  The same filter `resize_and_crop` uses, so SR stages see low-res inputs made the way the base
  stage's training images are made.
  """
  if image.shape[0] == size and image.shape[1] == size:
    return image
  return np.asarray(Image.fromarray(image).resize((size, size), Image.BICUBIC, reducing_gap=None))


def to_model_range(images: Any) -> jnp.ndarray:
  """uint8 [..., 3] in [0, 255] -> float32 in [-1, 1] (numpy or JAX input, jit-able)."""
  return jnp.asarray(images, jnp.float32) * (2.0 / 255.0) - 1.0


def to_uint8(images: Any) -> jnp.ndarray:
  """float in [-1, 1] -> uint8 [0, 255], clipped and rounded (the inverse of to_model_range)."""
  return jnp.clip(jnp.round((jnp.asarray(images, jnp.float32) + 1.0) * 127.5), 0, 255
                  ).astype(jnp.uint8)
