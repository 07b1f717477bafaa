"""Editing a user's image with a cascade: what each mode asks of the stages, and its inputs.

    edit = Edit("inpaint")                       # or Edit("img2img", strength=0.6), Edit("upscale")
    image, mask = load_inputs("photo.png", "mask.png", edit)   # checked before any compute
    images = cascade.sample(["a red circle at the top"], edit=edit, images=image[None],
                            masks=mask[None])[-1]

- inpaint: every stage keeps the input outside the mask (white = regenerate) at its own
  resolution (RePaint, `diffusion.editing`); SR stages also get the inpainted image below.
  `resample` / `jump` add RePaint's resampling jumps; `strength` < 1 starts the masked region
  from the noised input instead of pure noise.
- img2img: every stage starts from the input at its resolution noised to time `strength`
  (0 returns the input, 1 ignores it).
- upscale: a cascade of SR stages only; the input, resized to the first SR stage's low-res size,
  is the low-res image it sharpens.

Inputs are square uint8 [S, S, 3] images (`fit` pads or crops others) and bool [S, S] masks, at
any size; each stage gets them resized to its own (`at_size`, `regenerate_at_size`).
"""

from __future__ import annotations

import dataclasses
import hashlib
from typing import Any

import numpy as np
from PIL import Image

from imagen_jax.core import fileio
from imagen_jax.data import preprocess

MODES = ("inpaint", "img2img", "upscale")
FITS = ("none", "pad", "crop")


class EditError(ValueError):
  """Bad editing input (a file, a mask, a setting), reported before any compute."""


@dataclasses.dataclass(frozen=True)
class Edit:
  """How to edit (each field is written to samples.jsonl)."""
  mode: str                 # MODES
  strength: float = 1.0     # img2img / inpaint: start at this time (1 = pure noise)
  resample: int = 1         # inpaint: RePaint's resamplings per jump (1 = none)
  jump: int = 1             # inpaint: RePaint's jump length, in steps
  fit: str = "none"         # a non-square input: none (an error), pad (black) or crop (centre)

  def __post_init__(self):
    if self.mode not in MODES:
      raise EditError(f"unknown edit mode {self.mode!r}; choose from {', '.join(MODES)}")
    if not 0.0 <= self.strength <= 1.0:
      raise EditError(f"strength must be in [0, 1] (0 returns the input, 1 ignores it), got "
                      f"{self.strength}")
    if self.resample < 1 or self.jump < 1:
      raise EditError(f"resample and jump must be >= 1, got resample={self.resample}, "
                      f"jump={self.jump}")
    if self.fit not in FITS:
      raise EditError(f"unknown fit {self.fit!r}; choose from {', '.join(FITS)}")
    if self.mode != "inpaint" and self.resample > 1:
      raise EditError(f"resampling jumps harmonize an inpainted region; mode {self.mode!r} has "
                      "none (use mode inpaint or resample 1)")
    if self.mode == "upscale" and self.strength != 1.0:
      raise EditError("upscale samples the SR stages from noise: strength is for img2img and "
                      "inpaint")

  @property
  def uses_mask(self) -> bool:
    return self.mode == "inpaint"


def file_digest(path: str) -> str:
  """sha256 of a file's bytes: samples.jsonl records it, so a resumed run with another input
  file of the same name is caught."""
  return hashlib.sha256(fileio.read_bytes(path)).hexdigest()


def read_image(path: str, what: str = "image") -> np.ndarray:
  """uint8 [H, W, 3] of an image file (local or gs://), or EditError naming the file."""
  if not fileio.exists(path):
    raise EditError(f"{what} {path!r} does not exist")
  try:
    return preprocess.decode_image(fileio.read_bytes(path))[0]
  except preprocess.BadInput as e:
    raise EditError(f"cannot read {what} {path!r} as an image ({e})") from e


def read_mask(path: str, image_shape: tuple[int, ...], image_path: str) -> np.ndarray:
  """bool [H, W], True where white (>= 128 in gray): the region to regenerate."""
  gray = read_image(path, "mask").astype(np.float32).mean(axis=-1)
  if gray.shape != tuple(image_shape[:2]):
    raise EditError(f"mask {path!r} is {gray.shape[1]}x{gray.shape[0]} but image {image_path!r} "
                    f"is {image_shape[1]}x{image_shape[0]}: the mask must be the image's size")
  regenerate = gray >= 128
  if not regenerate.any():
    raise EditError(f"mask {path!r} is all black: nothing to regenerate (white = regenerate)")
  if regenerate.all():
    raise EditError(f"mask {path!r} is all white: nothing of the input is kept (white = "
                    "regenerate; to sample without an input use `imagen-jax sample`)")
  return regenerate


def fit_square(array: np.ndarray, fit: str, path: str) -> np.ndarray:
  """[H, W, ...] -> [S, S, ...]: as is when square; else zero-padded to the longer side (`pad`)
  or centre-cropped to the shorter (`crop`), or EditError (`none`)."""
  height, width = array.shape[:2]
  if height == width:
    return array
  if fit == "none":
    raise EditError(f"{path!r} is {width}x{height}, not square: the stages sample square images; "
                    "give --fit=pad (black borders) or --fit=crop (the centre square)")
  if fit == "crop":
    side = min(height, width)
    top, left = (height - side) // 2, (width - side) // 2
    return array[top:top + side, left:left + side]
  side = max(height, width)
  top, left = (side - height) // 2, (side - width) // 2
  out = np.zeros((side, side) + array.shape[2:], array.dtype)
  out[top:top + height, left:left + width] = array
  return out


def load_inputs(image_path: str, mask_path: str | None, edit: Edit, size: int | None = None
                ) -> tuple[np.ndarray, np.ndarray | None]:
  """The input image uint8 [S, S, 3] and, for inpainting, the mask bool [S, S] (True:
  regenerate), square per `edit.fit`, resized to `size` if given (`Cascade.input_size`).
  Raises EditError naming the file for any bad input."""
  image = read_image(image_path)
  if edit.uses_mask and not mask_path:
    raise EditError("inpainting needs a mask (--mask=FILE, white = regenerate)")
  if mask_path and not edit.uses_mask:
    raise EditError(f"mode {edit.mode!r} takes no mask (a mask is for mode inpaint)")
  mask = read_mask(mask_path, image.shape, image_path) if mask_path else None
  image = fit_square(image, edit.fit, image_path)
  if mask is not None:
    mask = fit_square(mask, edit.fit, mask_path)  # padding is black: kept as it is
  if size is not None:
    image = at_size(image[None], size)[0]
    mask = None if mask is None else regenerate_at_size(mask[None], size)[0]
  return image, mask


def at_size(images: np.ndarray, size: int) -> np.ndarray:
  """uint8 [N, S, S, 3] -> [N, size, size, 3], with the filter the SR stages' low-res inputs are
  made with (`preprocess.downsample`; it also enlarges)."""
  return np.stack([preprocess.downsample(np.ascontiguousarray(im), size) for im in images])


def regenerate_at_size(masks: np.ndarray, size: int) -> np.ndarray:
  """bool [N, S, S] -> [N, size, size]: a pixel is regenerated if any part of it is (the area
  it covers in the mask), so a smaller stage never keeps a pixel the mask regenerates."""
  if masks.shape[1] == size:
    return masks.copy()
  out = [np.asarray(Image.fromarray(m.astype(np.float32)).resize((size, size), Image.BOX)) > 1e-6
         for m in masks]
  return np.stack(out)


def stage_inputs(edit: Edit, images: np.ndarray, masks: np.ndarray | None, size: int
                 ) -> dict[str, Any]:
  """What `diffusion.stage_sampler.sample_stage` takes for one stage of size `size`: `image` (float
  [N, size, size, 3] in [-1, 1]), `keep` ([N, size, size, 1], 1 = keep; inpaint only)."""
  out: dict[str, Any] = {"image": preprocess.to_model_range(at_size(images, size))}
  if edit.uses_mask:
    keep = ~regenerate_at_size(masks, size)
    out["keep"] = keep[..., None].astype(np.float32)
  return out
