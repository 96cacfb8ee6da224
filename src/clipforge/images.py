"""Image decoding that fails in one line: files, bytes or streams to fully decoded PIL images.

Every image clipforge reads goes through `load_image`, which refuses what would hurt (decompression bombs,
zero-size images) and names the source and the reason in an `ImageDecodeError` for everything it cannot read
(missing, empty, not an image, truncated or corrupt data). EXIF orientation is not applied (neither OpenAI's
CLIP nor open_clip applies it).
"""

from __future__ import annotations

import io
import os
from pathlib import Path
from typing import IO

from PIL import Image, UnidentifiedImageError

from .util import one_line

__all__ = ["DEFAULT_MAX_PIXELS", "ImageDecodeError", "ImageSource", "finish_loading", "load_image"]

# Pillow's default Image.MAX_IMAGE_PIXELS (1024 * 1024 * 1024 // 4 // 3): past it Pillow only warns, we refuse.
DEFAULT_MAX_PIXELS = 89_478_485
# Formats whose decoder can scale down while decoding; MPO is the multi-picture JPEG many cameras write.
_DRAFT_FORMATS = ("JPEG", "MPO")
_MESSAGE_LIMIT = 200  # characters of a decoder's own message quoted in ours

ImageSource = str | os.PathLike | bytes | bytearray | memoryview | IO[bytes]


class ImageDecodeError(ValueError):
    """An image file (path, bytes or stream) that cannot be decoded; the message names it and says why."""


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
        raise ImageDecodeError(f"cannot decode image {name}: decompression bomb ({_reason(err)})") from None
    except UnidentifiedImageError:
        raise ImageDecodeError(f"cannot decode image {name}: not an image (format not recognised by "
                               f"Pillow, {len(data)} bytes)") from None
    except MemoryError:
        raise
    except Exception as err:  # Pillow raises many types on malformed headers
        raise ImageDecodeError(f"cannot decode image {name}: corrupt header ({_reason(err)})") from None
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
                               f"({_reason(err)})") from None
    return img


def finish_loading(image: Image.Image) -> None:
    """Decode a lazily opened PIL image now, so truncated data raises ImageDecodeError naming its file."""
    try:
        image.load()
    except MemoryError:
        raise
    except Exception as err:
        name = repr(getattr(image, "filename", "") or "<PIL image>")
        raise ImageDecodeError(f"cannot decode image {name}: truncated or corrupt {image.format} data "
                               f"({_reason(err)})") from None


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
            raise ImageDecodeError(f"cannot decode image {name}: cannot read ({_reason(err)})") from None
    if hasattr(source, "read"):
        # Reading the whole stream also handles non-seekable ones (HTTP bodies, tar members).
        data = source.read()
        if not isinstance(data, bytes | bytearray):
            raise ImageDecodeError(f"cannot decode image {name}: stream is not binary (open it with 'rb')")
        return bytes(data)
    raise TypeError(f"load_image expects a path, bytes or a binary file object, got {type(source).__name__}")


def _reason(err: BaseException) -> str:
    """A decoder's own message, as quoted in ours."""
    return one_line(err, _MESSAGE_LIMIT, whole=True)
