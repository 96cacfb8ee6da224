"""Evaluation reports: one JSON per (model, dataset, task), PNG plots beside it, a summary table for a suite.

A result is the dict an ``evaluate_*`` function of `clipforge.eval.tasks` returns. Its metric names are
CLIP_benchmark's (``acc1``, ``acc5``, ``mean_per_class_recall``, ``image_retrieval_recall@K``,
``text_retrieval_recall@K``); ``model`` holds the model's provenance, ``dataset`` the data's row count and
hash, ``num_failed`` the images that could not be decoded. Plots, by task:

* retrieval: ``<stem>.recall.png`` (Recall@K against K for both directions) and ``<stem>.gallery.png``
  (for a few caption queries, the best-scoring images with their scores; the correct image framed green);
* zeroshot and linear-probe: ``<stem>.confusion.png`` (row-normalised confusion matrix);
* linear-probe with a weight-decay sweep: ``<stem>.sweep.png`` (validation accuracy against weight decay).

Files are written atomically (`clipforge.util`), so an interrupted run never leaves half a JSON.
"""

from __future__ import annotations

import csv
import io
import json
import math
import re
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from ..images import load_image
from ..util import atomic_write_bytes, atomic_write_text

__all__ = ["SUMMARY_COLUMNS", "gallery_figure", "pyplot", "report_stem", "save_figure", "summary_rows", "write_plots",
           "write_report", "write_result_json", "write_summary"]

# Columns of the suite table: identity, size, then the headline metrics of every task (blank where a task
# has no such metric).
SUMMARY_COLUMNS = [
    "model", "dataset", "task", "num_samples", "num_failed",
    "acc1", "acc5", "mean_per_class_recall",
    "image_retrieval_recall@1", "image_retrieval_recall@5", "image_retrieval_recall@10",
    "text_retrieval_recall@1", "text_retrieval_recall@5", "text_retrieval_recall@10",
]
# Beyond this many classes the confusion matrix has no tick labels: they would overlap into a grey smear.
_MAX_LABELLED_CLASSES = 40


# ------------------------------------------------------------------------------------------------- JSON


def report_stem(result: dict[str, Any]) -> str:
    """``<model>__<dataset>__<task>``, with characters unsafe in file names replaced by ``-``."""
    parts = (result.get("model", {}).get("name", "model"), result.get("dataset", {}).get("name", "data"),
             result.get("task", "task"))
    return "__".join(_safe_name(str(p)) for p in parts)


def write_result_json(result: dict[str, Any], path: str | Path) -> Path:
    """Write `result` as indented JSON (tensors and NumPy values converted), atomically. Returns the path."""
    path = Path(path)
    atomic_write_text(path, json.dumps(_jsonable(result), indent=2, allow_nan=False) + "\n")
    return path


def write_report(result: dict[str, Any], output_dir: str | Path, stem: str | None = None) -> dict[str, Path]:
    """The JSON of `result` and its plots in `output_dir`; returns ``{"json": path, <plot kind>: path, ...}``."""
    output_dir = Path(output_dir)
    stem = stem or report_stem(result)
    written = {"json": write_result_json(result, output_dir / f"{stem}.json")}
    written.update(write_plots(result, output_dir, stem))
    return written


# ------------------------------------------------------------------------------------------------ plots


def write_plots(result: dict[str, Any], output_dir: str | Path, stem: str) -> dict[str, Path]:
    """The PNG plots that fit the result's task (see the module docstring); returns ``{kind: path}``."""
    output_dir = Path(output_dir)
    written: dict[str, Path] = {}
    if result.get("recall_curve"):
        written["recall"] = save_figure(_recall_figure(result), output_dir / f"{stem}.recall.png")
    if result.get("gallery"):
        written["gallery"] = save_figure(gallery_figure(result), output_dir / f"{stem}.gallery.png")
    if result.get("confusion_matrix"):
        written["confusion"] = save_figure(_confusion_figure(result), output_dir / f"{stem}.confusion.png")
    if result.get("weight_decay_sweep"):
        written["sweep"] = save_figure(_sweep_figure(result), output_dir / f"{stem}.sweep.png")
    return written


def pyplot():
    """pyplot on the Agg backend: renders to files, needs no display, safe in worker threads and CI."""
    # Imported here, not at module level: matplotlib takes a while to import, and writing JSON or a summary
    # table (a suite's, or the demo's) needs none of it.
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def _title(result: dict[str, Any]) -> str:
    return f"{result.get('model', {}).get('name', '')} on {result.get('dataset', {}).get('name', '')}"


def _recall_figure(result: dict[str, Any]):
    plt = pyplot()
    curve = result["recall_curve"]
    fig, ax = plt.subplots(figsize=(6, 4), dpi=100)
    ax.plot(curve["k"], curve["image_retrieval"], marker=".", label="text → image (image_retrieval)")
    ax.plot(curve["k"], curve["text_retrieval"], marker=".", label="image → text (text_retrieval)")
    ax.set_xscale("log")
    ax.set_ylim(0, 1.02)
    ax.set_xlabel("K")
    ax.set_ylabel("Recall@K")
    ax.set_title(f"Recall@K: {_title(result)}", fontsize=9)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    return fig


def gallery_figure(result: dict[str, Any]):
    """One row per query caption: its best-scoring images, score above each, the correct one framed green."""
    plt = pyplot()
    queries = result["gallery"]
    cols = max(len(q["top"]) for q in queries)
    fig, axes = plt.subplots(len(queries), cols, figsize=(1.8 * cols, 2.1 * len(queries)), dpi=100, squeeze=False)
    for row, query in zip(axes, queries, strict=True):
        row[0].set_title("", fontsize=7)
        for ax in row:
            ax.set_xticks([])
            ax.set_yticks([])
            ax.set_frame_on(False)
        for ax, hit in zip(row, query["top"], strict=False):
            try:
                ax.imshow(load_image(hit["image"]))
            except (OSError, ValueError):  # the file changed since it was embedded: leave a blank cell
                ax.text(0.5, 0.5, "unreadable", ha="center", va="center", fontsize=7, transform=ax.transAxes)
            ax.set_title(f"{hit['score']:.3f}", fontsize=8, color="green" if hit["correct"] else "black")
            if hit["correct"]:
                ax.set_frame_on(True)
                for spine in ax.spines.values():
                    spine.set_edgecolor("green")
                    spine.set_linewidth(3)
        row[0].set_ylabel(_wrap(query["caption"], 24), fontsize=7, rotation=0, ha="right", va="center")
    fig.suptitle(f"Top images per caption: {_title(result)}", fontsize=9)
    fig.tight_layout()
    return fig


def _confusion_figure(result: dict[str, Any]):
    plt = pyplot()
    matrix = np.asarray(result["confusion_matrix"], dtype=np.float64)
    names = [row["class"] for row in result.get("per_class_recall", [])] or [str(i) for i in range(len(matrix))]
    # Row-normalised, so that a class with many samples does not wash out the others; empty rows stay 0.
    normalised = matrix / np.maximum(matrix.sum(axis=1, keepdims=True), 1)
    size = min(14.0, 3 + 0.3 * len(names))
    fig, ax = plt.subplots(figsize=(size, size), dpi=100)
    image = ax.imshow(normalised, cmap="Blues", vmin=0, vmax=1)
    fig.colorbar(image, ax=ax, fraction=0.046, pad=0.04, label="share of the true class")
    if len(names) <= _MAX_LABELLED_CLASSES:
        ax.set_xticks(range(len(names)), names, rotation=90, fontsize=7)
        ax.set_yticks(range(len(names)), names, fontsize=7)
    ax.set_xlabel("predicted class")
    ax.set_ylabel("true class")
    ax.set_title(f"{result.get('task', '')} confusion (acc1 {result.get('acc1', float('nan')):.3f}): "
                 f"{_title(result)}", fontsize=9)
    fig.tight_layout()
    return fig


def _sweep_figure(result: dict[str, Any]):
    plt = pyplot()
    sweep = result["weight_decay_sweep"]
    fig, ax = plt.subplots(figsize=(6, 4), dpi=100)
    ax.plot([p["weight_decay"] for p in sweep], [p["val_acc1"] for p in sweep], marker="o")
    ax.axvline(result["weight_decay"], color="grey", linestyle="--", label=f"chosen {result['weight_decay']:.2g}")
    ax.set_xscale("log")
    ax.set_xlabel("weight decay")
    ax.set_ylabel("validation acc1")
    ax.set_title(f"Linear-probe weight-decay sweep: {_title(result)}", fontsize=9)
    ax.legend(fontsize=8)
    ax.grid(True, which="both", alpha=0.3)
    fig.tight_layout()
    return fig


def save_figure(fig, path: Path) -> Path:
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png")
    pyplot().close(fig)
    atomic_write_bytes(path, buffer.getvalue())
    return path


# ---------------------------------------------------------------------------------------------- summary


def summary_rows(results: Iterable[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per result with the `SUMMARY_COLUMNS` (None where a task lacks a metric)."""
    rows = []
    for result in results:
        row = {
            "model": result.get("model", {}).get("name"),
            "dataset": result.get("dataset", {}).get("name"),
            "task": result.get("task"),
            "num_samples": result.get("num_samples", result.get("num_texts", result.get("num_test"))),
            "num_failed": result.get("num_failed"),
        }
        row.update({name: result.get(name) for name in SUMMARY_COLUMNS[5:]})
        rows.append(row)
    return rows


def write_summary(results: Sequence[dict[str, Any]], output_dir: str | Path,
                  stem: str = "summary") -> dict[str, Path]:
    """``<stem>.md`` (a Markdown table, fractions as percentages) and ``<stem>.csv`` (raw fractions) in
    `output_dir`. Columns no result has are left out. Returns ``{"markdown": path, "csv": path}``."""
    output_dir = Path(output_dir)
    rows = summary_rows(results)
    columns = [c for c in SUMMARY_COLUMNS if any(row.get(c) is not None for row in rows)] or SUMMARY_COLUMNS[:3]

    text = io.StringIO(newline="")
    writer = csv.DictWriter(text, fieldnames=columns, extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    writer.writerows({c: "" if row.get(c) is None else row[c] for c in columns} for row in rows)
    csv_path = atomic_write_text(output_dir / f"{stem}.csv", text.getvalue())

    lines = ["| " + " | ".join(columns) + " |", "|" + "|".join("---" for _ in columns) + "|"]
    for row in rows:
        lines.append("| " + " | ".join(_markdown_cell(c, row.get(c)) for c in columns) + " |")
    md_path = atomic_write_text(output_dir / f"{stem}.md", "\n".join(lines) + "\n")
    return {"markdown": md_path, "csv": csv_path}


def _markdown_cell(column: str, value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, float) and column in SUMMARY_COLUMNS[5:]:
        return f"{100 * value:.2f}"
    return str(value).replace("|", "\\|")


# ---------------------------------------------------------------------------------------------- helpers


def _jsonable(value: Any) -> Any:
    """Plain JSON types: tensors and NumPy values become lists and numbers, paths become strings."""
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_jsonable(v) for v in value]
    if isinstance(value, Path):
        return str(value)
    if hasattr(value, "tolist"):  # torch.Tensor, numpy arrays and scalars
        return _jsonable(value.tolist())
    if isinstance(value, float) and not math.isfinite(value):
        return None  # JSON has no NaN/inf; a metric that cannot be computed is null
    return value


def _safe_name(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._+-]+", "-", text).strip("-.") or "unnamed"


def _wrap(text: str, width: int) -> str:
    words, lines, line = text.split(), [], ""
    for word in words:
        if line and len(line) + 1 + len(word) > width:
            lines.append(line)
            line = word
        else:
            line = f"{line} {word}".strip()
    return "\n".join([*lines, line][:4])
