"""Image preprocessing: OpenAI/open_clip-exact eval transform, fast JPEG decode, train augmentation,
robust image loading.

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

EXIF orientation is NOT applied (neither OpenAI's CLIP nor open_clip applies it): a photo stored sideways
with an orientation tag is embedded sideways, as in the reference. Apply ``PIL.ImageOps.exif_transpose``
yourself before the transform if you want it.

Fast mode (``fast=True``): JPEGs are decoded by libjpeg at 1/2, 1/4 or 1/8 scale (``Image.draft``) while
the shortest side stays >= the size the resize needs, then the same pipeline runs. Draft must happen
before the pixels load, so pass the transform a path/bytes, a lazily opened ``Image.open(...)`` result, or
use ``load_image(src, draft_size=transform.draft_size)``; an already loaded image is processed exactly.
Measured (``bench/bench_preprocess.py``, normalised tensors, fast vs exact, Pillow 13.0):

- Flickr8k 128x128 JPEGs at 224: draft never triggers, identical (max abs diff 0).
- 640x480 JPEGs (q=90) -> 224 (libjpeg decodes at 1/2 scale, 320x240):
  mosaics of real photos (full-resolution detail): mean abs diff 0.035, max 1.07, cosine 0.9985;
  upscaled photos (smooth content): mean abs diff 0.006, max 0.20, cosine 0.99996;
  about 2.1x the exact path's images/s.

Train augmentation (``is_train=True``): random resized crop, scale (0.9, 1.0), log-uniform aspect ratio in
(3/4, 4/3), 10 attempts then a centre crop clamped to the ratio range (torchvision's
``RandomResizedCrop`` semantics, same random draws from torch's global RNG, so the crop boxes equal
torchvision's for the same ``torch.manual_seed``; DataLoader workers are seeded per worker by torch, so
crops are reproducible). The crop and resize are one ``PIL.Image.resize(..., box=crop)`` call (filter
taps at the crop edge read the pixels just outside it, instead of replicating the edge). Interpolation
follows the config (open_clip always uses bicubic for training; so does the default config).
"""

from __future__ import annotations

import io
import math
import os
from collections.abc import Callable
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import IO, Any

import numpy as np
import torch
from PIL import Image, ImageEnhance, UnidentifiedImageError

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

OPENAI_MEAN: tuple[float, float, float] = (0.48145466, 0.4578275, 0.40821073)
OPENAI_STD: tuple[float, float, float] = (0.26862954, 0.26130258, 0.27577711)

# Pillow's default Image.MAX_IMAGE_PIXELS (1024 * 1024 * 1024 // 4 // 3): past it Pillow only warns, we refuse.
DEFAULT_MAX_PIXELS = 89_478_485

_INTERPOLATIONS = {"bicubic": Image.Resampling.BICUBIC, "bilinear": Image.Resampling.BILINEAR}
_RESIZE_MODES = ("shortest", "squash")
_TRAIN_SCALE = (0.9, 1.0)
_TRAIN_RATIO = (3 / 4, 4 / 3)
_CROP_ATTEMPTS = 10
# Formats whose decoder can scale down while decoding; MPO is the multi-picture JPEG many cameras write.
_DRAFT_FORMATS = ("JPEG", "MPO")
# Refuse a shortest-side resize whose intermediate image would exceed this many pixels: a 50,000,000 x 1
# banner passes the decode limit but would be resized to 11,200,000,000 x 224 pixels (tens of GB).
_MAX_RESIZED_PIXELS = DEFAULT_MAX_PIXELS

ImageSource = str | os.PathLike | bytes | bytearray | memoryview | IO[bytes]


class ImageDecodeError(ValueError):
    """An image file (path, bytes or stream) that cannot be decoded; the message names it and says why."""


# ---------------------------------------------------------------------------------------------- config


@dataclass
class PreprocessConfig:
    """How images become model input; saved in a model folder's config.json under "preprocess"."""

    image_size: int = 224
    mean: tuple[float, float, float] = OPENAI_MEAN
    std: tuple[float, float, float] = OPENAI_STD
    interpolation: str = "bicubic"  # "bicubic" | "bilinear"
    resize_mode: str = "shortest"  # "shortest" (resize shortest side, centre crop) | "squash"

    def __post_init__(self) -> None:
        if isinstance(self.image_size, bool) or not isinstance(self.image_size, int) or self.image_size < 1:
            raise ValueError(f"PreprocessConfig.image_size must be a positive int, got {self.image_size!r}")
        self.mean = _three_floats("mean", self.mean)
        self.std = _three_floats("std", self.std)
        if min(self.std) <= 0:
            raise ValueError(f"PreprocessConfig.std must be positive, got {self.std}")
        # isinstance first: an unhashable value (a list from a bad JSON file) must give this error, not TypeError.
        if not isinstance(self.interpolation, str) or self.interpolation not in _INTERPOLATIONS:
            raise ValueError(f"PreprocessConfig.interpolation must be one of {sorted(_INTERPOLATIONS)}, "
                             f"got {self.interpolation!r}")
        if not isinstance(self.resize_mode, str) or self.resize_mode not in _RESIZE_MODES:
            raise ValueError(f"PreprocessConfig.resize_mode must be one of {list(_RESIZE_MODES)}, "
                             f"got {self.resize_mode!r}")

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict (tuples as lists)."""
        return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> PreprocessConfig:
        """Inverse of ``to_dict``; unknown keys are an error (a typo must not silently change preprocessing)."""
        if not isinstance(d, dict):
            raise ValueError(f"preprocess config must be a dict (JSON object), got {type(d).__name__}")
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"unknown preprocess config key(s) {unknown}; known keys: {sorted(known)}")
        return cls(**d)


def _three_floats(name: str, value: Any) -> tuple[float, float, float]:
    try:
        out = tuple(float(v) for v in value)
    except (TypeError, ValueError):
        raise ValueError(f"PreprocessConfig.{name} must be 3 numbers, got {value!r}") from None
    if len(out) != 3 or not all(math.isfinite(v) for v in out):
        raise ValueError(f"PreprocessConfig.{name} must be 3 finite numbers, got {value!r}")
    return out  # type: ignore[return-value]


# ---------------------------------------------------------------------------------------------- decode


def load_image(source: ImageSource, draft_size: int | None = None, *,
               max_pixels: int = DEFAULT_MAX_PIXELS) -> Image.Image:
    """Open and fully decode an image from a path, bytes or a binary file-like object.

    ``draft_size``: for JPEGs, let libjpeg decode at 1/2, 1/4 or 1/8 scale while both sides stay >=
    ``draft_size`` (fast mode; other formats ignore it). EXIF orientation is not applied (open_clip parity).
    Raises ``ImageDecodeError`` (one line naming the source) for a missing/empty file, data that is not an
    image, a zero-size image, more than ``max_pixels`` pixels (decompression bomb), or truncated/corrupt data.
    Note: Pillow's global ``ImageFile.LOAD_TRUNCATED_IMAGES = True`` would hide truncation; keep it False.
    """
    name = _source_name(source)
    data = _read_source(source, name)
    if not data:
        raise ImageDecodeError(f"cannot decode image {name}: empty (0 bytes)")
    try:
        img = Image.open(io.BytesIO(data))
    except Image.DecompressionBombError as err:
        raise ImageDecodeError(f"cannot decode image {name}: decompression bomb ({_one_line(err)})") from None
    except UnidentifiedImageError:
        raise ImageDecodeError(f"cannot decode image {name}: not an image (format not recognised by "
                               f"Pillow, {len(data)} bytes)") from None
    except MemoryError:
        raise
    except Exception as err:  # Pillow raises many types on malformed headers
        raise ImageDecodeError(f"cannot decode image {name}: corrupt header ({_one_line(err)})") from None
    width, height = img.size
    if width <= 0 or height <= 0:
        raise ImageDecodeError(f"cannot decode image {name}: zero-size image ({width}x{height})")
    if width * height > max_pixels:
        raise ImageDecodeError(f"cannot decode image {name}: {width}x{height} = {width * height:,} pixels "
                               f"exceeds max_pixels={max_pixels:,} (decompression bomb?)")
    if draft_size is not None and img.format in _DRAFT_FORMATS:
        img.draft("RGB", (draft_size, draft_size))
    try:
        img.load()
    except MemoryError:
        raise
    except Exception as err:
        raise ImageDecodeError(f"cannot decode image {name}: truncated or corrupt {img.format} data "
                               f"({_one_line(err)})") from None
    return img


def _load_pil(image: Image.Image) -> None:
    """Decode a lazily opened PIL image now, so truncated data raises ImageDecodeError naming its file."""
    try:
        image.load()
    except MemoryError:
        raise
    except Exception as err:
        name = repr(getattr(image, "filename", "") or "<PIL image>")
        raise ImageDecodeError(f"cannot decode image {name}: truncated or corrupt {image.format} data "
                               f"({_one_line(err)})") from None


def _source_name(source: ImageSource) -> str:
    if isinstance(source, str | os.PathLike):
        return repr(os.fspath(source))
    if isinstance(source, bytes | bytearray | memoryview):
        return f"<{len(source)} bytes>"
    return repr(getattr(source, "name", None) or f"<{type(source).__name__}>")


def _read_source(source: ImageSource, name: str) -> bytes:
    if isinstance(source, bytes | bytearray | memoryview):
        return bytes(source)
    if isinstance(source, str | os.PathLike):
        path = Path(source)
        try:
            return path.read_bytes()
        except FileNotFoundError:
            raise ImageDecodeError(f"cannot decode image {name}: file not found") from None
        except IsADirectoryError:
            raise ImageDecodeError(f"cannot decode image {name}: is a directory, not a file") from None
        except OSError as err:
            raise ImageDecodeError(f"cannot decode image {name}: cannot read ({_one_line(err)})") from None
    if hasattr(source, "read"):
        # Reading the whole stream also handles non-seekable ones (HTTP bodies, tar members).
        data = source.read()
        if not isinstance(data, bytes | bytearray):
            raise ImageDecodeError(f"cannot decode image {name}: stream is not binary (open it with 'rb')")
        return bytes(data)
    raise TypeError(f"load_image expects a path, bytes or a binary file object, got {type(source).__name__}")


def _one_line(err: BaseException) -> str:
    text = " ".join(str(err).split()) or type(err).__name__
    return text if len(text) <= 200 else text[:197] + "..."


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
            _load_pil(image)
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
