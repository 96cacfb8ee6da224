"""Reading datasets from disk: caption tables, labelled images, and what kind of source an argument names.

Inputs are validated where they enter: every problem is one ``ValueError`` line naming the file, the line
(1-based, as an editor shows it; Parquet: the 1-based row) and the field, and saying what to do.

- ``source_kind``: what a data source argument names (an image folder, a table, WebDataset shards).
- ``read_caption_table``: CSV, TSV or Parquet with an image-path column and a caption column.
- ``read_labelled_images``: a labels table (image path, label) or an ImageFolder tree (``root/<class>/...``).
- ``group_by_image``: a table's rows (one caption each) -> each distinct image with all its captions.

An ImageFolder tree's images are found by content (`discovery`).
"""

from __future__ import annotations

import csv
import difflib
import io
from collections.abc import Hashable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypeVar

from ..util import one_line
from .discovery import images_under
from .shards import is_shard_spec

__all__ = ["CaptionTable", "LabelledImages", "group_by_image", "read_caption_table", "read_labelled_images",
           "source_kind"]

Image = TypeVar("Image", bound=Hashable)
Row = TypeVar("Row")

_PARQUET_SUFFIXES = (".parquet", ".pq")
_TAB_SUFFIXES = (".tsv", ".tab")


@dataclass
class CaptionTable:
    """Image-caption pairs read from a table, in file order.

    ``image_paths`` are the table's paths joined to the image root (the table's folder unless given);
    ``lines`` holds where each pair came from (CSV/TSV line or Parquet row, 1-based), for messages;
    ``columns`` the table's other columns as strings, e.g. ``columns["split"]``.
    """

    path: Path
    image_paths: list[Path]
    captions: list[str]
    lines: list[int]
    columns: dict[str, list[str]] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.captions)

    def where(self, column: str, value: str) -> CaptionTable:
        """The rows whose ``column`` equals ``value`` (e.g. ``table.where("split", "dev")``)."""
        if column not in self.columns:
            raise ValueError(f"{self.path}: no column {column!r} to filter on (other columns: "
                             f"{', '.join(self.columns) or 'none'})")
        keep = [i for i, v in enumerate(self.columns[column]) if v == value]
        return CaptionTable(self.path, [self.image_paths[i] for i in keep], [self.captions[i] for i in keep],
                            [self.lines[i] for i in keep],
                            {name: [values[i] for i in keep] for name, values in self.columns.items()})


@dataclass
class LabelledImages:
    """Image paths with one class label each; ``classes`` is the sorted list of distinct labels."""

    paths: list[Path]
    labels: list[str]
    classes: list[str]

    def __len__(self) -> int:
        return len(self.paths)

    @property
    def targets(self) -> list[int]:
        """Each label's index in ``classes``."""
        index = {name: i for i, name in enumerate(self.classes)}
        return [index[label] for label in self.labels]


# ------------------------------------------------------------------------------------------- tables


def group_by_image(images: Sequence[Image], captions: Sequence[Row]) -> tuple[list[Image], list[list[Row]]]:
    """Rows of (image, caption) -> the distinct images in order of first appearance, and each one's captions in
    row order (any per-row value groups alike: row numbers give each image's rows). A caption table has one row
    per caption; training, evaluation and embedding take images."""
    order: dict[Image, int] = {}
    grouped: list[list[Row]] = []
    for image, caption in zip(images, captions, strict=True):
        if image not in order:
            order[image] = len(grouped)
            grouped.append([])
        grouped[order[image]].append(caption)
    return list(order), grouped


def read_caption_table(path: str | Path, image_col: str = "image_path", caption_col: str = "caption", *,
                       image_root: str | Path | None = None, check_files: bool = True) -> CaptionTable:
    """Read image-caption pairs from a CSV (``.csv``), TSV (``.tsv``/``.tab``) or Parquet (``.parquet``) file.

    Image paths are relative to ``image_root`` (default: the table's folder) unless absolute. Raises a
    one-line ``ValueError`` for: a missing/unreadable/non-UTF-8 file, no data rows, a missing column (the
    message lists the columns found), a row with the wrong number of fields, an empty caption or image path,
    and (``check_files``) an image file that does not exist.
    """
    path = Path(path)
    header, rows = _read_table(path)
    columns = _require_columns(path, header, {"image_col": image_col, "caption_col": caption_col})
    root = Path(image_root) if image_root is not None else path.parent
    image_paths, captions, lines = [], [], []
    others = {name: [] for name in header if name not in (image_col, caption_col)}
    for line, values in rows:
        where = _where(path, line)
        image_paths.append(root / _required_value(values[columns[image_col]], image_col, where))
        captions.append(_required_value(values[columns[caption_col]], caption_col, where))
        lines.append(line)
        for name, out in others.items():
            out.append(values[columns[name]])
    if check_files:
        _check_files_exist(path, image_paths, lines, image_col, root, image_root is None)
    return CaptionTable(path, image_paths, captions, lines, others)


def read_labelled_images(path: str | Path, image_col: str = "image_path", label_col: str = "label", *,
                         image_root: str | Path | None = None, check_files: bool = True) -> LabelledImages:
    """Labelled images from a labels table (CSV/TSV/Parquet with ``image_col`` and ``label_col``) or from an
    ImageFolder-style directory (``path/<class>/**/<image>``; the class is the top-level subfolder's name).

    In a directory, images are found by content, recursively, hidden files and folders skipped, files directly
    in ``path`` ignored (e.g. a README or a labels.csv); a class folder without images is an error. Table
    paths are relative to ``image_root`` (default: the table's folder); errors are as in ``read_caption_table``.
    """
    path = Path(path)
    if path.is_dir():
        return _read_image_folder(path)
    header, rows = _read_table(path)
    columns = _require_columns(path, header, {"image_col": image_col, "label_col": label_col})
    root = Path(image_root) if image_root is not None else path.parent
    paths, labels, lines = [], [], []
    for line, values in rows:
        where = _where(path, line)
        paths.append(root / _required_value(values[columns[image_col]], image_col, where))
        labels.append(_required_value(values[columns[label_col]], label_col, where))
        lines.append(line)
    if check_files:
        _check_files_exist(path, paths, lines, image_col, root, image_root is None)
    return LabelledImages(paths, labels, sorted(set(labels)))


def _read_table(path: Path) -> tuple[list[str], list[tuple[int, list[str | None]]]]:
    """(header, [(line, values)]) of a CSV/TSV/Parquet file; values are stripped strings or None (null)."""
    if not path.exists():
        raise ValueError(f"{path}: no such file")
    if path.is_dir():
        raise ValueError(f"{path}: is a folder; expected a CSV, TSV or Parquet file")
    if path.suffix.lower() in _PARQUET_SUFFIXES:
        header, rows = _read_parquet(path)
    else:
        header, rows = _read_delimited(path)
    if not rows:
        raise ValueError(f"{path}: no data rows (the table is empty apart from its header)")
    return header, rows


def _read_delimited(path: Path) -> tuple[list[str], list[tuple[int, list[str | None]]]]:
    text = _read_utf8(path)
    if not text.strip():
        raise ValueError(f"{path}: empty file; expected a header row naming the columns, then one row per item")
    first_line = text.split("\n", 1)[0]
    delimiter = "\t" if "\t" in first_line and (path.suffix.lower() in _TAB_SUFFIXES or "," not in first_line) \
        else ","
    # strict: an unterminated quote is an error instead of swallowing the rest of the file into one field.
    reader = csv.reader(io.StringIO(text, newline=""), delimiter=delimiter, strict=True)
    rows: list[tuple[int, list[str | None]]] = []
    header: list[str] | None = None
    start = 1  # the line the next record starts on (a quoted field may span lines)
    try:
        for record in reader:
            line, start = start, reader.line_num + 1
            if not any(value.strip() for value in record):
                continue  # blank line
            if header is None:
                header = _check_header(path, [name.strip() for name in record], line)
                continue
            if len(record) != len(header):
                raise ValueError(f"{_where(path, line)}: {len(record)} field(s) but the header has {len(header)}; "
                                 f"quote fields that contain {'tabs' if delimiter == chr(9) else 'commas'}")
            rows.append((line, [value.strip() for value in record]))
    except csv.Error as err:
        raise ValueError(f"{_where(path, start)}: malformed {'TSV' if delimiter == chr(9) else 'CSV'} ({err}); "
                         f"check the quotes in this row") from None
    return header or [], rows


def _read_utf8(path: Path) -> str:
    try:
        raw = path.read_bytes()
    except OSError as err:
        raise ValueError(f"{path}: cannot read ({err.strerror or err})") from None
    if raw.startswith((b"\xff\xfe", b"\xfe\xff")):
        raise ValueError(f"{path}: the file is UTF-16 encoded; save it as UTF-8")
    try:
        return raw.decode("utf-8-sig")  # -sig: a byte-order mark (Excel's "CSV UTF-8") is not part of the header
    except UnicodeDecodeError as err:
        line = raw[:err.start].count(b"\n") + 1
        raise ValueError(f"{_where(path, line)}: not valid UTF-8 (byte 0x{raw[err.start]:02x} at offset "
                         f"{err.start}); save the file as UTF-8") from None


def _read_parquet(path: Path) -> tuple[list[str], list[tuple[int, list[str | None]]]]:
    import pyarrow.parquet as pq  # here, not at the top: only Parquet tables need pyarrow's start-up time

    try:
        table = pq.read_table(path)
    except Exception as err:  # pyarrow raises several types for a damaged or non-Parquet file
        raise ValueError(f"{path}: not a readable Parquet file ({one_line(err, 200, whole=True)})") from None
    header = _check_header(path, [str(name) for name in table.column_names], None)
    columns = [[None if v is None else str(v).strip() for v in table.column(i).to_pylist()]
               for i in range(table.num_columns)]
    return header, [(i + 1, [column[i] for column in columns]) for i in range(table.num_rows)]


def _check_header(path: Path, header: list[str], line: int | None) -> list[str]:
    seen = set()
    for name in header:
        if name in seen:
            raise ValueError(f"{_where(path, line)}: column {name!r} appears twice in the header")
        seen.add(name)
    return header


def _require_columns(path: Path, header: list[str], wanted: dict[str, str]) -> dict[str, int]:
    """Column name -> index for the whole header; a one-line error naming a wanted column that is absent."""
    for argument, name in wanted.items():
        if name not in header:
            close = difflib.get_close_matches(name, header, n=1, cutoff=0.5)
            hint = f"; did you mean {close[0]!r} ({argument}={close[0]!r})?" if close else \
                f"; name the column to use with {argument}"
            raise ValueError(f"{path}: no column {name!r} (columns found: {', '.join(header) or 'none'}){hint}")
    return {name: i for i, name in enumerate(header)}


def _required_value(value: str | None, column: str, where: str) -> str:
    if not value:
        raise ValueError(f"{where}: field {column!r} is empty")
    return value


def _where(path: Path, line: int | None) -> str:
    if line is None:
        return str(path)
    kind = "row" if path.suffix.lower() in _PARQUET_SUFFIXES else "line"
    return f"{path} {kind} {line}"


def _check_files_exist(path: Path, image_paths: list[Path], lines: list[int], column: str, root: Path,
                       default_root: bool) -> None:
    exists: dict[Path, bool] = {}  # a caption table names each image several times: stat it once
    for image in image_paths:
        if image not in exists:
            exists[image] = image.is_file()
    missing = [i for i, image in enumerate(image_paths) if not exists[image]]
    if not missing:
        return
    first = missing[0]
    hint = "; pass image_root= if the paths are relative to another folder" if default_root else ""
    raise ValueError(f"{_where(path, lines[first])}: field {column!r}: image file {str(image_paths[first])!r} "
                     f"not found ({len(missing)} of {len(image_paths)} rows name missing files; paths are "
                     f"relative to {str(root)!r}){hint}")


# ----------------------------------------------------------------------------------------- discovery


def source_kind(spec: str | Path, tables: Sequence[str] | None = None) -> str:
    """What a data source argument names: ``"folder"`` (a directory of images), ``"wds"`` (WebDataset shards, as
    `shards.is_shard_spec` recognises them) or ``"table"`` (a caption or labels table).

    Without `tables`, any other path is a table (its reader then says what is wrong with it); with `tables`
    (suffixes such as ``".csv"``), only files ending so are, and any other is a ``ValueError``."""
    path = Path(spec)
    if path.is_dir():
        return "folder"
    if is_shard_spec(str(spec)):
        return "wds"
    if tables is None or path.suffix.lower() in tables:
        return "table"
    raise ValueError(f"{path}: not a folder, a caption table ({', '.join(tables)}) or a .tar shard")


def _read_image_folder(root: Path) -> LabelledImages:
    class_dirs = sorted(entry for entry in root.iterdir() if entry.is_dir() and not entry.name.startswith("."))
    if not class_dirs:
        raise ValueError(f"{root}: no class subfolders; expected {root}/<class name>/<image files>, or pass a "
                         f"labels table (image_path,label)")
    paths: list[Path] = []
    labels: list[str] = []
    for class_dir in class_dirs:
        images = images_under(class_dir)
        if not images:
            raise ValueError(f"{class_dir}: class folder holds no images; add images or remove the folder")
        paths += images
        labels += [class_dir.name] * len(images)
    return LabelledImages(paths, labels, [d.name for d in class_dirs])
