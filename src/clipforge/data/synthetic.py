"""Generated scenes: coloured shapes on a plain background, with captions and class labels.

Deterministic (a seed gives the same images, captions and labels on every machine with the same Pillow), fast to
draw and learnable by a tiny CLIP in seconds, so tests and the demo can train, embed,
classify and search without downloading anything.

A scene holds one or two shapes. The first shape is the *subject*: it is drawn larger and last (on top), and
its "<colour> <shape>" is the scene's class label (one of ``CLASSES``). The caption names every shape::

    scenes = make_scenes(8, size=64, seed=0)
    scenes[0].caption, scenes[0].label   # e.g. ('a large red star and a small blue circle', 'red star')
"""

from __future__ import annotations

import csv
import math
import random
from dataclasses import dataclass
from pathlib import Path

from PIL import Image, ImageDraw

__all__ = [
    "BACKGROUNDS",
    "CLASSES",
    "COLOURS",
    "SHAPES",
    "Scene",
    "make_scene",
    "make_scenes",
    "write_caption_dataset",
    "write_labelled_dataset",
    "write_table",
]

# Well separated hues, so that a colour name always matches what is seen; each is jittered per scene.
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30),
    "green": (40, 170, 50),
    "blue": (40, 70, 225),
    "yellow": (240, 220, 40),
    "purple": (140, 50, 180),
    "orange": (250, 140, 20),
}
SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "star")
# Neutral backgrounds (never confusable with a shape colour).
BACKGROUNDS: dict[str, tuple[int, int, int]] = {
    "white": (245, 245, 245),
    "grey": (150, 150, 150),
    "black": (25, 25, 25),
}
CLASSES: list[str] = [f"{colour} {shape}" for colour in COLOURS for shape in SHAPES]

_ONE_SHAPE_TEMPLATES = (
    "a {c} {s}",
    "a photo of a {c} {s}",
    "a {c} {s} on a {bg} background",
    "a drawing of a {c} {s}",
    "a picture of a {c} {s}",
)
_TWO_SHAPE_TEMPLATES = (
    "a {c} {s} and a {c2} {s2}",
    "a large {c} {s} and a small {c2} {s2}",
    "a {c} {s} next to a {c2} {s2}",
    "a photo of a {c} {s} and a {c2} {s2}",
)
_SUPERSAMPLE = 2  # draw at 2x and box-filter down: anti-aliased edges for almost no cost
_JITTER = 20
_SUBJECT_RADIUS = (0.25, 0.35)  # of the image side
_SUBJECT_SPREAD = 0.6  # how far from the centre towards an edge the subject may sit
_SECOND_RADIUS = (0.4, 0.55)  # of the subject's radius: even a thin star out-sizes the second shape
_MAX_TILT = 10.0  # degrees: some variety and anti-aliased edges, while a square never reads as a diamond


@dataclass
class Scene:
    """One generated image with its caption and its class (``label == f"{colour} {shape}"``, the subject)."""

    image: Image.Image
    caption: str
    label: str
    colour: str
    shape: str


def make_scene(rng: random.Random, size: int = 64, *, n_shapes: int | None = None, colour: str | None = None,
               shape: str | None = None) -> Scene:
    """One scene drawn with ``rng`` (a ``random.Random``; the only source of randomness).

    ``n_shapes`` is 1 or 2 (None: either, equally likely); ``colour``/``shape`` fix the subject's, else they
    are drawn uniformly. The image is RGB, ``size`` x ``size``.
    """
    if n_shapes is None:
        n_shapes = rng.choice((1, 2))
    if n_shapes not in (1, 2):
        raise ValueError(f"n_shapes must be 1 or 2, got {n_shapes!r}")
    if size < 16:
        raise ValueError(f"size must be at least 16 pixels, got {size}")
    colour = _check_choice("colour", colour, tuple(COLOURS)) or rng.choice(tuple(COLOURS))
    shape = _check_choice("shape", shape, SHAPES) or rng.choice(SHAPES)
    background = rng.choice(tuple(BACKGROUNDS))
    canvas = size * _SUPERSAMPLE
    image = Image.new("RGB", (canvas, canvas), _shade(rng, BACKGROUNDS[background]))
    draw = ImageDraw.Draw(image)
    subject_radius = canvas * rng.uniform(*_SUBJECT_RADIUS)
    subject_centre = _centre(rng, canvas, subject_radius, _SUBJECT_SPREAD)
    if n_shapes == 2:
        # The second shape differs from the subject in colour or shape (else the caption would be odd).
        colour2, shape2 = colour, shape
        while (colour2, shape2) == (colour, shape):
            colour2, shape2 = rng.choice(tuple(COLOURS)), rng.choice(SHAPES)
        radius2 = subject_radius * rng.uniform(*_SECOND_RADIUS)
        centre2 = _apart(rng, canvas, radius2, subject_centre, subject_radius)
        tilt2 = rng.uniform(-_MAX_TILT, _MAX_TILT)
        _draw_shape(draw, shape2, centre2, radius2, tilt2, _jitter(rng, COLOURS[colour2]))
        caption = rng.choice(_TWO_SHAPE_TEMPLATES).format(c=colour, s=shape, c2=colour2, s2=shape2)
    else:
        caption = rng.choice(_ONE_SHAPE_TEMPLATES).format(c=colour, s=shape, bg=background)
    tilt = rng.uniform(-_MAX_TILT, _MAX_TILT)
    _draw_shape(draw, shape, subject_centre, subject_radius, tilt, _jitter(rng, COLOURS[colour]))
    return Scene(image.reduce(_SUPERSAMPLE), caption, f"{colour} {shape}", colour, shape)


def make_scenes(n: int, size: int = 64, seed: int = 0, *, n_shapes: int | None = None) -> list[Scene]:
    """``n`` scenes from one seeded generator: the same arguments always give the same scenes."""
    rng = random.Random(seed)
    return [make_scene(rng, size, n_shapes=n_shapes) for _ in range(n)]


def write_caption_dataset(folder: str | Path, n: int, size: int = 64, seed: int = 0, fmt: str = "csv", *,
                          image_format: str = "png") -> Path:
    """Write ``n`` scenes as ``folder/images/000000.<image_format>`` plus a caption table; return the table's path.

    ``fmt`` is ``csv`` (``captions.csv``), ``tsv`` (``captions.tsv``) or ``parquet`` (``captions.parquet``);
    columns ``image_path,caption``, image paths relative to the table. ``image_format``: ``png`` or ``jpg``.
    """
    if fmt not in ("csv", "tsv", "parquet"):
        raise ValueError(f"fmt must be csv, tsv or parquet, got {fmt!r}")
    folder = Path(folder)
    scenes = make_scenes(n, size, seed)
    rows = [(_save_image(scene.image, folder, f"images/{i:06d}", image_format), scene.caption)
            for i, scene in enumerate(scenes)]
    table = folder / f"captions.{fmt}"
    write_table(table, ("image_path", "caption"), rows, fmt)
    return table


def write_labelled_dataset(folder: str | Path, n_per_class: int, size: int = 64, seed: int = 0, *,
                           image_format: str = "png") -> Path:
    """Write single-shape scenes as an ImageFolder tree (``folder/<class>/000000.png``) and ``folder/labels.csv``
    (``image_path,label``, paths relative to it), ``n_per_class`` images for each of ``CLASSES``. Returns ``folder``.
    """
    folder = Path(folder)
    rng = random.Random(seed)
    rows = []
    for i in range(n_per_class):
        for label in CLASSES:
            colour, shape = label.split(" ")
            scene = make_scene(rng, size, n_shapes=1, colour=colour, shape=shape)
            rows.append((_save_image(scene.image, folder, f"{label}/{i:06d}", image_format), label))
    write_table(folder / "labels.csv", ("image_path", "label"), rows, "csv")
    return folder


# ----------------------------------------------------------------------------------------------- drawing


def _check_choice(name: str, value: str | None, allowed: tuple[str, ...]) -> str | None:
    if value is not None and value not in allowed:
        raise ValueError(f"unknown {name} {value!r}; choose one of {', '.join(allowed)}")
    return value


def _jitter(rng: random.Random, rgb: tuple[int, int, int]) -> tuple[int, int, int]:
    return tuple(min(255, max(0, v + rng.randint(-_JITTER, _JITTER))) for v in rgb)  # type: ignore[return-value]


def _shade(rng: random.Random, rgb: tuple[int, int, int]) -> tuple[int, int, int]:
    """Lighter or darker, same hue: a neutral background stays neutral."""
    delta = rng.randint(-_JITTER, _JITTER)
    return tuple(min(255, max(0, v + delta)) for v in rgb)  # type: ignore[return-value]


def _centre(rng: random.Random, canvas: int, radius: float, spread: float = 1.0) -> tuple[float, float]:
    """A centre keeping a shape of this radius inside the canvas, at most ``spread`` of the way to an edge."""
    reach = spread * (canvas / 2 - radius)
    return canvas / 2 + rng.uniform(-reach, reach), canvas / 2 + rng.uniform(-reach, reach)


def _apart(rng: random.Random, canvas: int, radius: float, other: tuple[float, float],
           other_radius: float) -> tuple[float, float]:
    """A centre whose shape does not overlap the other one (best of a few tries, so it always terminates)."""
    best, best_gap = other, -math.inf
    for _ in range(10):
        centre = _centre(rng, canvas, radius)
        gap = math.dist(centre, other) - radius - other_radius
        if gap >= 0:
            return centre
        if gap > best_gap:
            best, best_gap = centre, gap
    return best


def _draw_shape(draw: ImageDraw.ImageDraw, shape: str, centre: tuple[float, float], radius: float, tilt: float,
                fill: tuple[int, int, int]) -> None:
    """A shape turned by ``tilt`` degrees from upright; ``radius`` is its circumscribed circle's."""
    x, y = centre
    if shape == "circle":
        draw.ellipse((x - radius, y - radius, x + radius, y + radius), fill=fill)
    elif shape == "square":
        draw.regular_polygon((x, y, radius), 4, rotation=tilt, fill=fill)
    elif shape == "triangle":
        draw.regular_polygon((x, y, radius), 3, rotation=tilt, fill=fill)
    else:  # star: five points, inner radius 0.45 of the outer one
        points = []
        for k in range(10):
            r = radius if k % 2 == 0 else radius * 0.45
            theta = math.radians(tilt + 36 * k)
            points.append((x + r * math.sin(theta), y - r * math.cos(theta)))
        draw.polygon(points, fill=fill)


# ----------------------------------------------------------------------------------------------- writing


def _save_image(image: Image.Image, folder: Path, stem: str, image_format: str) -> str:
    """Save under ``folder/stem.<ext>``; return the path relative to ``folder`` (POSIX separators)."""
    formats = {"png": "PNG", "jpg": "JPEG", "jpeg": "JPEG"}
    if image_format not in formats:
        raise ValueError(f"image_format must be png or jpg, got {image_format!r}")
    relative = f"{stem}.{image_format}"
    path = folder / relative
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path, formats[image_format], **({"quality": 95} if formats[image_format] == "JPEG" else {}))
    return relative


def write_table(path: Path, header: tuple[str, ...], rows: list[tuple[str, ...]], fmt: str = "csv") -> None:
    """`rows` under `header` as ``csv``, ``tsv`` or ``parquet`` (all columns strings); creates the folder."""
    path.parent.mkdir(parents=True, exist_ok=True)
    if fmt == "parquet":  # imported here: only Parquet output needs pyarrow's start-up time
        import pyarrow as pa
        import pyarrow.parquet as pq

        pq.write_table(pa.table({name: [row[i] for row in rows] for i, name in enumerate(header)}), path)
        return
    with path.open("w", encoding="utf-8", newline="") as handle:
        writer = csv.writer(handle, delimiter="\t" if fmt == "tsv" else ",")
        writer.writerow(header)
        writer.writerows(rows)
