"""View augmentations, split where each runs fastest.

Host (per example, in the grain pipeline): decode and random-resized crop to the
configured resolution, emitting uint8 -- `random_crop_box`, `decode`, `crop`.
Encoded images (JPEG) are decoded at a reduced scale when the crop allows
(PIL's draft mode), so a 224 px crop of a large photo never decodes it whole.

Device (per batch, inside the jitted train step): flip, colour jitter, grayscale,
Gaussian blur, solarize and noise, with dm_pix, vmapped over the batch --
`photometric`. Example i's draws come from `fold_in(key, index[i])`, with `key`
a function of (seed, step, view), so a view depends only on (seed, step,
dataset index, view): the same on any mesh, and after a resume.
"""

import dataclasses
import io
import math
from typing import Any, Sequence, Union

import dm_pix as pix
import jax
import jax.numpy as jnp
import numpy as np
from PIL import Image


@dataclasses.dataclass(frozen=True)
class AugmentConfig:
  """Probabilities and strengths of the view augmentations (SimCLR / BYOL names).

  crop_scale, crop_ratio: area fraction and aspect range of the random-resized crop.
  jitter: (brightness delta, contrast, saturation, hue delta) maxima; SimCLR's colour
    strength s is (0.8 s, 0.8 s, 0.8 s, 0.2 s). Saturation, hue and grayscale act on
    RGB images only.
  blur_sigma: sigma ~ U(0.1, blur_sigma) px; the kernel covers +-3 blur_sigma.
  """
  crop_scale: tuple = (0.08, 1.0)
  crop_ratio: tuple = (3 / 4, 4 / 3)
  flip: bool = True
  jitter_prob: float = 0.8
  jitter: tuple = (0.4, 0.4, 0.4, 0.1)
  grayscale_prob: float = 0.2
  blur_prob: float = 0.0
  blur_sigma: float = 2.0
  solarize_prob: float = 0.0
  noise_std: float = 0.0


# ----------------------------------------------------------------------------
# Host: decode and crop, uint8 in and out.


def random_crop_box(rng: np.random.Generator, height: int, width: int,
                    scale: Sequence[float] = (0.08, 1.0),
                    ratio: Sequence[float] = (3 / 4, 4 / 3)) -> tuple[float, float, float, float]:
  """A random-resized-crop box (left, top, right, bottom) in pixels of an image of
  this size: area fraction ~ U(scale), log aspect ~ U(log ratio), clipped to the image."""
  u = rng.random(4)  # one call: per-call overhead dominates at 28 px
  area = (scale[0] + (scale[1] - scale[0]) * u[0]) * height * width
  lo, hi = math.log(ratio[0]), math.log(ratio[1])
  aspect = math.exp(lo + (hi - lo) * u[1])
  ch = min(max(math.sqrt(area / aspect), 1.0), height)
  cw = min(max(math.sqrt(area * aspect), 1.0), width)
  top, left = (height - ch) * u[2], (width - cw) * u[3]
  return left, top, left + cw, top + ch


def open_image(image: Union[np.ndarray, bytes, Image.Image]) -> Image.Image:
  """A PIL image of encoded bytes (JPEG, PNG: only the header is read here) or of a
  decoded uint8 array [H, W(, C)]."""
  if isinstance(image, Image.Image):
    return image
  if isinstance(image, (bytes, bytearray, memoryview)):
    return Image.open(io.BytesIO(bytes(image)))
  array = np.asarray(image, np.uint8)
  return Image.fromarray(array[..., 0] if array.ndim == 3 and array.shape[-1] == 1 else array)


def decode_for_crops(image: Any, channels: int, boxes: Sequence[tuple],
                     size: int) -> tuple[Image.Image, list]:
  """Decodes image for crops `boxes` (in its full-size pixels) that will be resized to
  size x size. A JPEG is decoded at the smallest DCT scale (1/2, 1/4, 1/8) that keeps
  every box at least `size` pixels wide: less work, no loss at the output size.

  Returns:
    (the decoded image, in mode L or RGB; the boxes in its pixels).
  """
  im = open_image(image)
  mode = "L" if channels == 1 else "RGB"
  if im.format == "JPEG" and boxes:
    w, h = im.size
    side = min(min(r - l, b - t) for l, t, r, b in boxes)
    scale = min(1.0, size / max(side, 1e-6))
    if scale < 1.0:
      im.draft(mode, (math.ceil(w * scale), math.ceil(h * scale)))
      fx, fy = im.size[0] / w, im.size[1] / h
      boxes = [(l * fx, t * fy, r * fx, b * fy) for l, t, r, b in boxes]
  return (im if im.mode == mode else im.convert(mode)), list(boxes)


def decode(image: Any, channels: int) -> Image.Image:
  """The whole image decoded, in mode L (channels 1) or RGB."""
  return decode_for_crops(image, channels, [], 0)[0]


def crop(im: Image.Image, box: tuple, size: Union[int, tuple[int, int]]) -> np.ndarray:
  """The box (left, top, right, bottom) of im resized (bilinear, antialiased) to size
  (an int for a square, or (width, height)) -> uint8 [height, width, C]."""
  size = (size, size) if isinstance(size, int) else tuple(size)
  out = im.resize(size, Image.BILINEAR, box=box)
  # frombuffer(tobytes()) costs ~2 us less than asarray: it matters at 28 px.
  return np.frombuffer(out.tobytes(), np.uint8).reshape(size[1], size[0], -1)


def center_box(height: int, width: int, fraction: float = 1.0) -> tuple:
  """The central square of side fraction * min(height, width): evaluation's crop."""
  side = fraction * min(height, width)
  top, left = (height - side) / 2, (width - side) / 2
  return left, top, left + side, top + side


# ----------------------------------------------------------------------------
# Device: photometric augmentation of a batch, float32 in [0, 1].


def to_float(images: jax.Array) -> jax.Array:
  """uint8 [..., H, W, C] -> float32 in [0, 1] (floats pass through)."""
  if images.dtype == jnp.uint8:
    return images.astype(jnp.float32) / 255.0
  return images.astype(jnp.float32)


def _augment_one(key: jax.Array, image: jax.Array, cfg: AugmentConfig) -> jax.Array:
  """One view of one float image [H, W, C] in [0, 1]."""
  keys = jax.random.split(key, 12)
  u = jax.random.uniform(keys[0], (6,))  # one coin per stochastic op
  rgb = image.shape[-1] == 3
  if cfg.flip:
    image = jnp.where(u[0] < 0.5, pix.flip_left_right(image), image)
  if cfg.jitter_prob > 0:
    b, c, s, h = cfg.jitter
    sym = lambda k, m: jax.random.uniform(k, (), minval=-m, maxval=m)
    jittered = pix.adjust_brightness(image, sym(keys[1], b))
    jittered = pix.adjust_contrast(jittered, 1.0 + sym(keys[2], c))
    if rgb:
      jittered = pix.adjust_saturation(jnp.clip(jittered, 0, 1), 1.0 + sym(keys[3], s))
      jittered = pix.adjust_hue(jittered, sym(keys[4], h))
    image = jnp.where(u[1] < cfg.jitter_prob, jnp.clip(jittered, 0.0, 1.0), image)
  if rgb and cfg.grayscale_prob > 0:
    gray = jnp.broadcast_to(pix.rgb_to_grayscale(image, keep_dims=True), image.shape)
    image = jnp.where(u[2] < cfg.grayscale_prob, gray, image)
  if cfg.blur_prob > 0:
    sigma = jax.random.uniform(keys[5], (), minval=0.1, maxval=max(cfg.blur_sigma, 0.1))
    kernel = 2 * math.ceil(3 * cfg.blur_sigma) + 1
    blurred = pix.gaussian_blur(image, sigma, kernel)
    image = jnp.where(u[3] < cfg.blur_prob, blurred, image)
  if cfg.solarize_prob > 0:
    image = jnp.where(u[4] < cfg.solarize_prob, pix.solarize(image, 0.5), image)
  if cfg.noise_std > 0:
    image = image + cfg.noise_std * jax.random.normal(keys[6], image.shape)
  return jnp.clip(image, 0.0, 1.0)


def photometric(key: jax.Array, images: jax.Array, index: jax.Array,
                cfg: AugmentConfig) -> jax.Array:
  """Photometric augmentation of a batch, on the device.

  Args:
    key: PRNG key of this step and view.
    images: uint8 (or float in [0, 1]) [b, H, W, C].
    index: int [b] dataset indices: example i draws from fold_in(key, index[i]), so
      its view does not depend on its position in the batch or on the mesh.
    cfg: AugmentConfig.
  Returns:
    float32 [b, H, W, C] in [0, 1].
  """
  keys = jax.vmap(lambda i: jax.random.fold_in(key, i))(index)
  return jax.vmap(lambda k, x: _augment_one(k, x, cfg))(keys, to_float(images))
