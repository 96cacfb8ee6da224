"""Finding images by content: files and folders in, the image files among them out.

Images are recognised by their first bytes (magic numbers of the formats Pillow decodes here), never by
their extension: ``photo.txt`` holding PNG data is an image, ``notes.jpg`` holding text is not. Hidden files
and folders (name starting with ".") are skipped; a folder link back up the tree is followed once.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Sequence
from pathlib import Path

from PIL import features

__all__ = ["find_images", "images_under", "is_image", "supported_formats"]

_SNIFF_BYTES = 32
# DIB header sizes of the BMP variants, so that a text file starting with "BM" is not taken for a bitmap.
_BMP_HEADER_SIZES = (12, 40, 52, 56, 64, 108, 124)


def find_images(paths: str | Path | Iterable[str | Path]) -> list[Path]:
    """The image files among ``paths``: files are kept if their content is an image, folders are searched
    recursively (hidden entries skipped). Each folder's images are sorted by path; arguments keep their order;
    duplicates are dropped. Raises ``ValueError`` for a path that does not exist or when no image is found.
    """
    if isinstance(paths, str | os.PathLike):
        paths = [paths]
    paths = [Path(p) for p in paths]
    found: list[Path] = []
    seen: set[Path] = set()
    for path in paths:
        if path.is_dir():
            candidates = images_under(path)
        elif path.exists():
            candidates = [path] if is_image(path) else []
        else:
            raise ValueError(f"{path}: no such file or folder")
        for image in candidates:
            if image not in seen:
                seen.add(image)
                found.append(image)
    if not found:
        listed = ", ".join(str(p) for p in paths[:3]) + (", ..." if len(paths) > 3 else "")
        raise ValueError(f"no images found in {listed or 'no paths given'} (images are recognised by content: "
                         f"{', '.join(supported_formats())})")
    return found


def images_under(folder: Path) -> list[Path]:
    """Image files below ``folder`` (recursive, following folder links once, hidden entries skipped), sorted."""
    found = []
    visited = set()
    for top, dirs, files in os.walk(folder, followlinks=True):
        real = os.path.realpath(top)
        if real in visited:  # a link back up the tree: do not loop
            dirs.clear()
            continue
        visited.add(real)
        dirs[:] = [d for d in dirs if not d.startswith(".")]
        found += [Path(top, name) for name in files if not name.startswith(".") and is_image(Path(top, name))]
    return sorted(found, key=lambda p: p.parts)


def is_image(path: Path) -> bool:
    """True when the file starts like an image Pillow can decode here (a cheap header sniff, no decode)."""
    try:
        with path.open("rb") as handle:
            head = handle.read(_SNIFF_BYTES)
    except OSError:
        return False
    return _sniff(head) in supported_formats()


def _sniff(head: bytes) -> str | None:
    """The image format a file's first bytes announce, or None."""
    if head.startswith(b"\xff\xd8\xff"):
        return "JPEG"
    if head.startswith(b"\x89PNG\r\n\x1a\n"):
        return "PNG"
    if head.startswith((b"GIF87a", b"GIF89a")):
        return "GIF"
    if head.startswith(b"RIFF") and head[8:12] == b"WEBP":
        return "WEBP"
    if head.startswith((b"II*\x00", b"MM\x00*")):
        return "TIFF"
    if head.startswith(b"BM") and len(head) >= 18 and int.from_bytes(head[14:18], "little") in _BMP_HEADER_SIZES:
        return "BMP"
    if head.startswith((b"\x00\x00\x00\x0cjP  \r\n\x87\n", b"\xff\x4f\xff\x51")):
        return "JPEG2000"
    if head[4:8] == b"ftyp" and head[8:12] in (b"avif", b"avis"):
        return "AVIF"
    return None


def supported_formats() -> Sequence[str]:
    """The sniffed formats this Pillow build decodes (JPEG 2000 and AVIF need optional libraries)."""
    global _SUPPORTED
    if _SUPPORTED is None:
        optional = [name for name, feature in (("JPEG2000", "jpg_2000"), ("AVIF", "avif"))
                    if features.check(feature)]
        _SUPPORTED = ("JPEG", "PNG", "GIF", "WEBP", "TIFF", "BMP", *optional)
    return _SUPPORTED


_SUPPORTED: tuple[str, ...] | None = None
