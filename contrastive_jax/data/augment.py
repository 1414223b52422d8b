"""SimCLR-style augmentations on one image, in NumPy, for grain's `random_map`.

Every function takes float32 images [H, W, C] in [0, 1] and a
`np.random.Generator` (grain derives one per example from the pipeline seed, so
the views are deterministic) and returns the same shape, still in [0, 1].
"""

import dataclasses

import numpy as np


def random_resized_crop(image: np.ndarray, rng: np.random.Generator,
                        scale=(0.4, 1.0), ratio=(3 / 4, 4 / 3)) -> np.ndarray:
  """Crops a random area fraction `scale` with aspect `ratio`, resizes back (bilinear)."""
  h, w, _ = image.shape
  area = rng.uniform(*scale) * h * w
  aspect = np.exp(rng.uniform(np.log(ratio[0]), np.log(ratio[1])))
  ch = float(np.clip(np.sqrt(area / aspect), 1, h))
  cw = float(np.clip(np.sqrt(area * aspect), 1, w))
  y0, x0 = rng.uniform(0, h - ch), rng.uniform(0, w - cw)
  ys = y0 + (np.arange(h) + 0.5) * ch / h - 0.5
  xs = x0 + (np.arange(w) + 0.5) * cw / w - 0.5
  return _bilinear(image, np.clip(ys, 0, h - 1), np.clip(xs, 0, w - 1))


def _bilinear(image, ys, xs):
  y0 = np.floor(ys).astype(int)
  x0 = np.floor(xs).astype(int)
  y1 = np.minimum(y0 + 1, image.shape[0] - 1)
  x1 = np.minimum(x0 + 1, image.shape[1] - 1)
  wy = (ys - y0)[:, None, None]
  wx = (xs - x0)[None, :, None]
  top = image[y0][:, x0] * (1 - wx) + image[y0][:, x1] * wx
  bottom = image[y1][:, x0] * (1 - wx) + image[y1][:, x1] * wx
  return top * (1 - wy) + bottom * wy


def color_jitter(image: np.ndarray, rng: np.random.Generator, strength: float) -> np.ndarray:
  """Random brightness, contrast and (colour images) saturation, each +-strength."""
  image = image * rng.uniform(1 - strength, 1 + strength)
  mean = image.mean()
  image = (image - mean) * rng.uniform(1 - strength, 1 + strength) + mean
  if image.shape[-1] == 3:
    gray = image.mean(-1, keepdims=True)
    image = (image - gray) * rng.uniform(1 - strength, 1 + strength) + gray
  return np.clip(image, 0.0, 1.0)


def gaussian_blur(image: np.ndarray, rng: np.random.Generator, max_sigma: float) -> np.ndarray:
  """Separable Gaussian blur with sigma ~ U(0.1, max_sigma)."""
  sigma = rng.uniform(0.1, max_sigma)
  radius = max(1, int(np.ceil(2 * sigma)))
  k = np.exp(-0.5 * (np.arange(-radius, radius + 1) / sigma) ** 2)
  k /= k.sum()
  pad = np.pad(image, ((radius, radius), (radius, radius), (0, 0)), mode="edge")
  rows = sum(k[i] * pad[i:i + image.shape[0]] for i in range(len(k)))
  return sum(k[i] * rows[:, i:i + image.shape[1]] for i in range(len(k)))


@dataclasses.dataclass(frozen=True)
class AugmentConfig:
  """Probabilities and strengths of the view augmentations."""
  crop_scale: tuple = (0.4, 1.0)
  flip: bool = False  # digits are not mirror-symmetric; turn on for natural images
  jitter_prob: float = 0.8
  jitter_strength: float = 0.4
  blur_prob: float = 0.5
  blur_sigma: float = 1.0
  noise_std: float = 0.05


def augment(image: np.ndarray, rng: np.random.Generator, cfg: AugmentConfig) -> np.ndarray:
  """One random view of a float32 image [H, W, C] in [0, 1]."""
  image = random_resized_crop(image, rng, scale=cfg.crop_scale)
  if cfg.flip and rng.random() < 0.5:
    image = image[:, ::-1]
  if rng.random() < cfg.jitter_prob:
    image = color_jitter(image, rng, cfg.jitter_strength)
  if rng.random() < cfg.blur_prob:
    image = gaussian_blur(image, rng, cfg.blur_sigma)
  if cfg.noise_std > 0:
    image = image + rng.normal(0.0, cfg.noise_std, image.shape)
  return np.clip(image, 0.0, 1.0).astype(np.float32)
