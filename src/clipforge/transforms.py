"""Image preprocessing: OpenAI/open_clip-exact eval transform, fast JPEG decode, train augmentation.

Eval (exact) pipeline, the same PIL calls in the same order as open_clip 3.3.0's
``image_transform(size, is_train=False)`` (torchvision ``Resize`` -> ``CenterCrop`` -> RGB -> ``ToTensor``
-> ``Normalize``), so outputs agree to float32 rounding (bit-identical on the reference images):

1. resize in the image's ORIGINAL mode with ``PIL.Image.resize``: shortest side -> ``size``, long side ->
   ``int(size * long / short)`` ("shortest"), or both sides -> ``size`` ("squash"). PIL's own per-mode rules
   therefore apply unchanged: "P" and "1" resize with NEAREST, "RGBA"/"LA" are resized premultiplied.
2. centre crop ``size x size`` at ``top = round((h - size) / 2)`` (left likewise); a side shorter than
   ``size`` is zero-padded, ``(size - h) // 2`` before it.
3. convert to RGB, then ``(u8 / 255 - mean) / std`` in float32, done with a 256-entry table per channel
   that is computed once with exactly those float32 operations (so it is bit-identical, and faster than
   four passes over a float tensor).

Deliberate differences from open_clip:

- High bit-depth images: open_clip/PIL clip 16-bit values to 255 when converting to RGB (almost every
  pixel becomes white). Here modes "I;16*" and "I" are read as 16-bit samples (0..65535, values outside
  clipped) and "F" as [0, 1] floats when every finite value lies in [0, 1], else as PIL's 0..255 scale
  (NaN -> 0, clipped); the image is then quantised to 8-bit "L" with ``round(v * 255 / max)`` BEFORE the
  pipeline above. A 16-bit image holding ``v8 * 257`` therefore gives exactly the tensor of the 8-bit image.
- Modes PIL cannot convert to RGB directly ("La") go through their non-premultiplied form ("LA").
- An image so elongated that its shortest-side resize would exceed ``DEFAULT_MAX_PIXELS`` pixels (aspect
  ratio beyond about 1780:1 at 224) is refused with ValueError instead of exhausting memory.

Images are decoded by `clipforge.images.load_image`. EXIF orientation is NOT applied (neither OpenAI's CLIP nor
open_clip applies it): a photo stored sideways with an orientation tag is embedded sideways, as in the reference.
Apply ``PIL.ImageOps.exif_transpose`` yourself before the transform if you want it.

Fast mode (``fast=True``): JPEGs are decoded by libjpeg at 1/2, 1/4 or 1/8 scale (``Image.draft``) while
the shortest side stays >= the size the resize needs, then the same pipeline runs. Draft must happen
before the pixels load, so pass the transform a path/bytes, a lazily opened ``Image.open(...)`` result, or
use ``load_image(src, draft_size=transform.draft_size)``; an already loaded image is processed exactly.
Images whose shortest side is below twice the size never draft and come out identical; larger photos differ
slightly from the exact path (``bench/bench_preprocess.py`` measures speed and difference; bench/results.md).

Train augmentation (``is_train=True``): random resized crop, scale (0.9, 1.0), log-uniform aspect ratio in
(3/4, 4/3), 10 attempts then a centre crop clamped to the ratio range (torchvision's
``RandomResizedCrop`` semantics, same random draws from torch's global RNG, so the crop boxes equal
torchvision's for the same ``torch.manual_seed``; DataLoader workers are seeded per worker by torch, so
crops are reproducible). The crop and resize are one ``PIL.Image.resize(..., box=crop)`` call (filter
taps at the crop edge read the pixels just outside it, instead of replicating the edge). Interpolation
follows the config (open_clip always uses bicubic for training; so does the default config).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np
import torch
from PIL import Image, ImageEnhance

# Decoding lives in `images`; the preprocessing config in `model.config` (a model's description includes it).
# Both are part of this module's public API, as they always were.
from .images import DEFAULT_MAX_PIXELS, ImageDecodeError, ImageSource, finish_loading, load_image
from .model.config import OPENAI_MEAN, OPENAI_STD, PreprocessConfig

__all__ = [
    "DEFAULT_MAX_PIXELS",
    "OPENAI_MEAN",
    "OPENAI_STD",
    "ImageDecodeError",
    "ImageTransform",
    "PreprocessConfig",
    "image_transform",
    "load_image",
]

_INTERPOLATIONS = {"bicubic": Image.Resampling.BICUBIC, "bilinear": Image.Resampling.BILINEAR}
_TRAIN_SCALE = (0.9, 1.0)
_TRAIN_RATIO = (3 / 4, 4 / 3)
_CROP_ATTEMPTS = 10
# Refuse a shortest-side resize whose intermediate image would exceed this many pixels: a 50,000,000 x 1
# banner passes the decode limit but would be resized to 11,200,000,000 x 224 pixels (tens of GB).
_MAX_RESIZED_PIXELS = DEFAULT_MAX_PIXELS


# ------------------------------------------------------------------------------------------ transform


class ImageTransform:
    """PIL image (or path / bytes) -> normalised FloatTensor[3, S, S]. Picklable, for DataLoader workers."""

    def __init__(self, cfg: PreprocessConfig, is_train: bool = False, fast: bool = False,
                 train_scale: tuple[float, float] = _TRAIN_SCALE, hflip: bool = False,
                 color_jitter: float = 0.0) -> None:
        if not 0 < train_scale[0] <= train_scale[1] <= 1:
            raise ValueError(f"crop scale must satisfy 0 < low <= high <= 1, got {list(train_scale)}")
        if not 0.0 <= color_jitter < 1.0:
            raise ValueError(f"color jitter must be in [0, 1), got {color_jitter}")
        self.cfg = cfg
        self.is_train = is_train
        self.fast = fast
        self.train_scale = (float(train_scale[0]), float(train_scale[1]))
        self.hflip = hflip
        self.color_jitter = float(color_jitter)
        self._lut = _normalisation_table(cfg.mean, cfg.std)

    @property
    def draft_size(self) -> int | None:
        """Smallest side both JPEG draft dimensions must keep (None unless fast)."""
        if not self.fast:
            return None
        if not self.is_train:
            return self.cfg.image_size
        # A random crop can be as small as sqrt(min_scale * min_ratio) of the shortest side.
        min_ratio = min(_TRAIN_RATIO[0], 1 / _TRAIN_RATIO[1])
        return math.ceil(self.cfg.image_size / math.sqrt(self.train_scale[0] * min_ratio))

    def __call__(self, image: Image.Image | ImageSource) -> torch.Tensor:
        if not isinstance(image, Image.Image):
            image = load_image(image, draft_size=self.draft_size)
        else:
            if self.fast:
                image.draft("RGB", (self.draft_size, self.draft_size))  # no-op unless an unloaded JPEG
            finish_loading(image)
        width, height = image.size
        if width <= 0 or height <= 0:
            raise ValueError(f"cannot preprocess a zero-size image ({width}x{height})")
        image = _to_8bit(image)
        resample = _INTERPOLATIONS[self.cfg.interpolation]
        size = self.cfg.image_size
        if self.is_train:
            top, left, h, w = _random_resized_crop_box(width, height, self.train_scale, _TRAIN_RATIO)
            image = image.resize((size, size), resample, box=(left, top, left + w, top + h))
            # Drawn from torch's generator after the crop's draws, so a seeded item flips the same way every time.
            if self.hflip and torch.rand(1).item() < 0.5:
                image = image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
            if self.color_jitter:
                image = _jitter_colours(image, self.color_jitter)
        elif self.cfg.resize_mode == "squash":
            image = image.resize((size, size), resample)
        else:
            resized = _shortest_side_size(width, height, size)
            if resized[0] * resized[1] > _MAX_RESIZED_PIXELS:
                raise ValueError(f"cannot preprocess a {width}x{height} image: its aspect ratio is too extreme "
                                 f"(resizing it to {resized[0]}x{resized[1]} would exceed {_MAX_RESIZED_PIXELS:,} "
                                 "pixels); crop it first or use resize_mode='squash'")
            image = _center_crop(image.resize(resized, resample), size)
        return _to_normalised_tensor(image, self._lut)

    def __repr__(self) -> str:
        cfg = self.cfg
        return (f"ImageTransform(size={cfg.image_size}, {'train' if self.is_train else 'eval'}, "
                f"resize_mode={cfg.resize_mode!r}, interpolation={cfg.interpolation!r}, fast={self.fast}, "
                f"mean={cfg.mean}, std={cfg.std})")


def image_transform(cfg: PreprocessConfig | int, is_train: bool = False, fast: bool = False, *,
                    train_scale: tuple[float, float] = _TRAIN_SCALE,
                    hflip: bool = False, color_jitter: float = 0.0) -> Callable[[Image.Image], torch.Tensor]:
    """The preprocessing transform for ``cfg`` (an int means ``PreprocessConfig(image_size=int)``).

    Eval: open_clip-exact (see module docstring); ``fast`` adds JPEG draft decode. Train: random resized crop
    over ``train_scale`` of the area (open_clip's 0.9-1.0 by default), a horizontal flip half the time when
    ``hflip``, and brightness, contrast and saturation jittered by up to ``color_jitter`` (a fraction).
    """
    if isinstance(cfg, int) and not isinstance(cfg, bool):
        cfg = PreprocessConfig(image_size=cfg)
    if not isinstance(cfg, PreprocessConfig):
        raise TypeError(f"image_transform expects a PreprocessConfig or an int size, got {type(cfg).__name__}")
    return ImageTransform(cfg, is_train=is_train, fast=fast, train_scale=train_scale, hflip=hflip,
                          color_jitter=color_jitter)


def _jitter_colours(image: Image.Image, strength: float) -> Image.Image:
    """Brightness, contrast and saturation each scaled by a factor drawn from [1 - strength, 1 + strength]. Hue is
    left alone: captions name colours."""
    image = _to_rgb(image)
    factors = torch.empty(3).uniform_(1 - strength, 1 + strength).tolist()
    for enhancer, factor in zip((ImageEnhance.Brightness, ImageEnhance.Contrast, ImageEnhance.Color), factors,
                                strict=True):
        image = enhancer(image).enhance(factor)
    return image


def _shortest_side_size(width: int, height: int, size: int) -> tuple[int, int]:
    """(w, h) with the shortest side = size and the long side = int(size * long / short) (torchvision)."""
    if width <= height:
        return size, int(size * height / width)
    return int(size * width / height), size


def _center_crop(image: Image.Image, size: int) -> Image.Image:
    width, height = image.size
    if (width, height) == (size, size):
        return image
    # A side shorter than size is zero-padded with (size - side) // 2 before it, like torchvision's pad;
    # PIL's crop fills outside pixels with zeros.
    left = round((width - size) / 2.0) if width >= size else -((size - width) // 2)
    top = round((height - size) / 2.0) if height >= size else -((size - height) // 2)
    return image.crop((left, top, left + size, top + size))


def _random_resized_crop_box(width: int, height: int, scale: tuple[float, float],
                             ratio: tuple[float, float]) -> tuple[int, int, int, int]:
    """(top, left, h, w) of a random crop; torchvision RandomResizedCrop semantics and RNG draws."""
    area = width * height
    log_lo, log_hi = torch.log(torch.tensor(ratio)).tolist()  # float32 bounds, as torchvision draws them
    for _ in range(_CROP_ATTEMPTS):
        target_area = area * torch.empty(1).uniform_(scale[0], scale[1]).item()
        aspect = torch.exp(torch.empty(1).uniform_(log_lo, log_hi)).item()
        w = round(math.sqrt(target_area * aspect))
        h = round(math.sqrt(target_area / aspect))
        if 0 < w <= width and 0 < h <= height:
            top = int(torch.randint(0, height - h + 1, size=(1,)).item())
            left = int(torch.randint(0, width - w + 1, size=(1,)).item())
            return top, left, h, w
    # Fallback: the whole image, cut to the nearest allowed aspect ratio, centred.
    in_ratio = width / height
    if in_ratio < min(ratio):
        w, h = width, round(width / min(ratio))
    elif in_ratio > max(ratio):
        w, h = round(height * max(ratio)), height
    else:
        w, h = width, height
    return (height - h) // 2, (width - w) // 2, h, w


def _to_8bit(image: Image.Image) -> Image.Image:
    """16-bit / 32-bit / float grey images -> 8-bit "L", scaled (not clipped as PIL's convert would)."""
    mode = image.mode
    if mode == "I" or mode.startswith("I;"):
        values = np.asarray(image).astype(np.float64)
        full_scale = 65535.0
    elif mode == "F":
        values = np.nan_to_num(np.asarray(image, dtype=np.float64), nan=0.0, posinf=0.0, neginf=0.0)
        full_scale = 1.0 if values.size and values.min() >= 0.0 and values.max() <= 1.0 else 255.0
    else:
        return image
    scaled = np.rint(np.clip(values, 0.0, full_scale) * (255.0 / full_scale)).astype(np.uint8)
    return Image.fromarray(scaled, mode="L")


def _normalisation_table(mean: tuple[float, ...], std: tuple[float, ...]) -> np.ndarray:
    """[3, 256] float32: (v / 255 - mean) / std in float32, the operations and rounding of ToTensor+Normalize."""
    values = np.arange(256, dtype=np.float32) / np.float32(255)
    mean32 = np.asarray(mean, dtype=np.float32)[:, None]
    std32 = np.asarray(std, dtype=np.float32)[:, None]
    return ((values[None, :] - mean32) / std32).astype(np.float32)


def _to_normalised_tensor(image: Image.Image, lut: np.ndarray) -> torch.Tensor:
    if image.mode == "L":  # PIL's L -> RGB copies the grey plane: skip the conversion
        grey = np.asarray(image)
        planes = (grey, grey, grey)
    else:
        pixels = np.asarray(_to_rgb(image))
        planes = (pixels[..., 0], pixels[..., 1], pixels[..., 2])
    out = np.empty((3, *planes[0].shape), dtype=np.float32)
    for channel, plane in enumerate(planes):
        np.take(lut[channel], plane, out=out[channel])
    return torch.from_numpy(out)


def _to_rgb(image: Image.Image) -> Image.Image:
    if image.mode == "RGB":
        return image
    try:
        return image.convert("RGB")
    except ValueError:
        pass
    if image.mode == "La":
        return image.convert("LA").convert("RGB")
    raise ValueError(f"cannot convert PIL image mode {image.mode!r} to RGB; convert it before preprocessing")
