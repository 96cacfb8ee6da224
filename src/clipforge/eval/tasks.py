"""Evaluation tasks: data set in, result dict out. Retrieval, zero-shot, linear probe / few-shot, and a suite.

Each ``evaluate_*`` function reads a data set, embeds it through `clipforge.embed` (the one embedding path),
computes CLIP_benchmark's metrics with `clipforge.eval.retrieval` / `classification` / `probe`, and returns a
JSON-ready dict. Nothing is written unless asked: `clipforge.eval.report.write_report` turns a result into a
JSON file and plots, and `run_suite` writes them when given an output folder.

Every result holds:

* the metrics as fractions in [0, 1] (``acc1``, ``acc5``, ``mean_per_class_recall``,
  ``image_retrieval_recall@K`` = text -> image, ``text_retrieval_recall@K`` = image -> text);
* ``model``: its name, architecture, precision and provenance (where it was loaded from);
* ``dataset``: name, path, row count and ``sha256``, a hash of the rows (image paths relative to the data
  set's folder, plus captions or labels), so the same data set copied elsewhere hashes the same;
* ``num_failed`` and ``failed`` (the first few): images that could not be decoded. They are left out of the
  metrics (with their captions, for retrieval); a data set where none decodes is an error.

Linear-probe features can be cached on disk (``cache_dir``), keyed by a hash of the model's weights and
preprocessing and of the image list with each file's size and modification time: a changed model, image
or file list never reuses stale features.
"""

from __future__ import annotations

import hashlib
import math
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ..embed import ImageEmbeddings, embed_images, embed_texts

__all__ = [
    "TASKS",
    "evaluate_linear_probe",
    "evaluate_retrieval",
    "evaluate_zeroshot",
    "model_info",
    "run_suite",
]

TASKS = ("retrieval", "zeroshot", "linear-probe")
DEFAULT_TEMPLATES = "simple"
# Failed images listed by name in a result (all are counted): enough to find the pattern, not a log dump.
_MAX_LISTED_FAILURES = 20
_CACHE_VERSION = 1


# ------------------------------------------------------------------------------------------------ data


@dataclass
class _Rows:
    """A data set as read: image paths with one text each (a caption or a label), and its identity."""

    name: str
    path: Path
    images: list[Path]
    texts: list[str]
    root: Path  # folder that image paths are made relative to when hashing

    def info(self) -> dict[str, Any]:
        return {"name": self.name, "path": str(self.path), "rows": len(self.images), "sha256": self.sha256()}

    def sha256(self) -> str:
        """Hash of the rows, with paths relative to the data set's folder (location-independent)."""
        digest = hashlib.sha256()
        for image, text in zip(self.images, self.texts, strict=True):
            digest.update(f"{_relative(image, self.root)}\t{text}\n".encode())
        return digest.hexdigest()


def _relative(path: Path, root: Path) -> str:
    try:
        return path.relative_to(root).as_posix()
    except ValueError:
        return path.as_posix()


def _dataset_name(path: Path) -> str:
    """``flickr8k-captions`` for flickr8k/captions.csv, the folder name for an image folder."""
    return path.name if path.is_dir() else f"{path.parent.name}-{path.stem}".strip("-")


def read_caption_rows(data: str | Path, image_col: str = "image_path", caption_col: str = "caption",
                      split: str | None = None, image_root: str | Path | None = None) -> _Rows:
    """A caption table (CSV/TSV/Parquet) as rows, optionally only those whose ``split`` column equals `split`.
    Image paths are relative to `image_root` (default: the table's folder).

    ValueError (one line, naming the file) for a missing column, a missing image file or no rows."""
    from ..data.sources import read_caption_table

    path = Path(data).expanduser()
    table = read_caption_table(path, image_col=image_col, caption_col=caption_col, image_root=image_root)
    return _filtered(path, list(table.image_paths), list(table.captions), table, split, image_root)


def read_label_rows(data: str | Path, image_col: str = "image_path", label_col: str = "label",
                    split: str | None = None, image_root: str | Path | None = None) -> _Rows:
    """A labelled image set: a labels table (`image_col`, `label_col`; CSV/TSV/Parquet; paths relative to
    `image_root`, default its folder) or a folder with one subfolder of images per class; `split` keeps the
    table rows whose ``split`` column equals it."""
    from ..data.sources import read_caption_table, read_labelled_images

    path = Path(data).expanduser()
    if path.is_dir():
        if split is not None:
            raise ValueError(f"{path}: a class folder has no 'split' column; give a labels table to use a split")
        labelled = read_labelled_images(path)
        return _Rows(_dataset_name(path), path, list(labelled.paths), list(labelled.labels), path)
    if split is None:
        labelled = read_labelled_images(path, image_col=image_col, label_col=label_col, image_root=image_root)
        return _filtered(path, list(labelled.paths), list(labelled.labels), None, None, image_root)
    # A labels table has the shape of a caption table; read as one, it keeps the split column.
    table = read_caption_table(path, image_col=image_col, caption_col=label_col, image_root=image_root)
    return _filtered(path, list(table.image_paths), list(table.captions), table, split, image_root)


def _filtered(path: Path, images: list[Path], texts: list[str], table, split: str | None,
              image_root: str | Path | None) -> _Rows:
    """Rows of a table, only those of `split` when given (named ``<data set>-<split>``)."""
    name = _dataset_name(path)
    if split is not None:
        keep = table.where("split", split)
        images, texts, name = list(keep.image_paths), list(keep.captions), f"{name}-{split}"
        if not images:
            values = sorted(set(table.columns["split"]))
            raise ValueError(f"{path}: no rows with split {split!r} (splits found: {', '.join(values[:10])})")
    root = Path(image_root).expanduser() if image_root is not None else path.parent
    return _Rows(name, path, images, texts, root)


# ----------------------------------------------------------------------------------------------- model


def model_info(model: torch.nn.Module, name: str | None = None) -> dict[str, Any]:
    """Name, architecture, precision and provenance of a loaded model, for a result's ``model`` field."""
    provenance = dict(model.provenance)
    if name is None:
        source = str(provenance.get("source", "model"))
        tag = provenance.get("pretrained")
        name = f"{source}-{tag}" if tag else Path(source.rstrip("/")).name or source
    info: dict[str, Any] = {"name": name, "embed_dim": model.embed_dim, "precision": model.precision,
                            "provenance": provenance}
    return info


def model_fingerprint(model: torch.nn.Module) -> str:
    """sha256 of every weight and buffer (name, dtype, shape, bytes): equal only for the same numbers."""
    digest = hashlib.sha256()
    for key, tensor in model.state_dict().items():
        t = tensor.detach().cpu().contiguous().reshape(-1)
        digest.update(f"{key}|{t.dtype}|{tuple(tensor.shape)}\n".encode())
        digest.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return digest.hexdigest()


# ------------------------------------------------------------------------------------------- embedding


def _embed(model, preprocess, images: Sequence[Path], batch_size: int, num_workers: int, progress: bool,
           desc: str, dataset: _Rows, cache_dir: str | Path | None = None) -> ImageEmbeddings:
    """Image embeddings through the shared path, optionally cached; a set where nothing decodes is an error."""
    cache_file = _cache_file(model, preprocess, images, cache_dir) if cache_dir is not None else None
    embedded = _read_cache(cache_file, len(images)) if cache_file is not None else None
    if embedded is None:
        embedded = embed_images(model, [str(p) for p in images], preprocess, batch_size=batch_size,
                                num_workers=num_workers, normalize=True, progress=progress, desc=desc)
        if cache_file is not None:
            _write_cache(cache_file, embedded)
    if not embedded.indices:
        first = embedded.failures[0][2] if embedded.failures else "no images"
        raise ValueError(f"{dataset.path}: none of the {len(images)} images could be decoded (first: {first})")
    return embedded


def _cache_file(model, preprocess, images: Sequence[Path], cache_dir: str | Path) -> Path:
    digest = hashlib.sha256(f"v{_CACHE_VERSION}|{model_fingerprint(model)}|{preprocess!r}\n".encode())
    for image in images:
        try:
            stat = image.stat()
            digest.update(f"{image.resolve()}|{stat.st_size}|{stat.st_mtime_ns}\n".encode())
        except OSError:  # missing file: it will fail to decode; the key still depends on it
            digest.update(f"{image}|missing\n".encode())
    return Path(cache_dir).expanduser() / f"features-{digest.hexdigest()[:32]}.pt"


def _read_cache(path: Path, n_items: int) -> ImageEmbeddings | None:
    """Cached embeddings, or None when absent or unreadable (then they are recomputed and rewritten)."""
    if not path.is_file():
        return None
    try:
        saved = torch.load(path, map_location="cpu", weights_only=True)
        embeddings, indices = saved["embeddings"], saved["indices"].tolist()
        failures = [(int(i), str(item), str(reason)) for i, item, reason in saved["failures"]]
    except Exception:  # a truncated or foreign file is just a cache miss
        return None
    if len(indices) != len(embeddings) or len(indices) + len(failures) != n_items:
        return None
    return ImageEmbeddings(embeddings.float(), indices, failures)


def _write_cache(path: Path, embedded: ImageEmbeddings) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    torch.save({"embeddings": embedded.embeddings, "indices": torch.tensor(embedded.indices, dtype=torch.long),
                "failures": [list(f) for f in embedded.failures]}, tmp)
    os.replace(tmp, path)


def _failure_fields(failures: Sequence[tuple[int, str, str]]) -> dict[str, Any]:
    """``num_failed`` (all) and ``failed`` (the first few, each ``{"image", "reason"}``)."""
    listed = [{"image": item, "reason": reason} for _, item, reason in failures[:_MAX_LISTED_FAILURES]]
    return {"num_failed": len(failures), "failed": listed}


# ----------------------------------------------------------------------------------------------- retrieval


def evaluate_retrieval(
    model,
    preprocess: Callable,
    tokenizer: Callable,
    data: str | Path,
    image_col: str = "image_path",
    caption_col: str = "caption",
    ks: Sequence[int] = (1, 5, 10),
    *,
    batch_size: int = 64,
    num_workers: int = 0,
    progress: bool = True,
    split: str | None = None,
    image_root: str | Path | None = None,
    gallery_queries: int = 4,
    gallery_top: int = 5,
    model_name: str | None = None,
    dataset_name: str | None = None,
) -> dict[str, Any]:
    """Text -> image and image -> text Recall@K on a caption table (several captions per image allowed).

    Rows with the same image path are one image with several captions. Images that fail to decode are left
    out with their captions (``num_failed``, ``num_dropped_captions``). Adds ``recall_curve`` (Recall@K for
    log-spaced K, both directions) and ``gallery`` (for `gallery_queries` captions spread over the table, the
    `gallery_top` best images with their cosine scores) for the report's plots.
    """
    started = time.perf_counter()
    from .retrieval import _validate_ks, retrieval_metrics

    ks = _validate_ks(ks)
    rows = read_caption_rows(data, image_col, caption_col, split, image_root)
    if dataset_name:
        rows.name = dataset_name
    images, text_to_image = _group_by_image(rows.images)
    embedded = _embed(model, preprocess, images, batch_size, num_workers, progress, "embedding images", rows)

    # Keep the captions of the images that decoded, re-indexed onto the decoded images.
    new_index = {old: new for new, old in enumerate(embedded.indices)}
    kept = [r for r, image in enumerate(text_to_image) if image in new_index]
    captions = [rows.texts[r] for r in kept]
    t2i = torch.tensor([new_index[text_to_image[r]] for r in kept], dtype=torch.long)
    text_emb = embed_texts(model, captions, tokenizer, batch_size=max(batch_size, 64), normalize=True,
                           progress=progress, desc="embedding captions")
    image_emb = embedded.embeddings

    metrics = retrieval_metrics(image_emb, text_emb, t2i, ks, return_ranks=True)
    t2i_ranks, i2t_ranks = metrics.pop("image_retrieval_ranks"), metrics.pop("text_retrieval_ranks")
    kept_images = [images[i] for i in embedded.indices]
    result: dict[str, Any] = {"task": "retrieval", **metrics, "num_samples": len(captions), "ks": ks}
    result.update(_common_fields(model, model_name, rows, embedded.failures, started))
    result["num_dropped_captions"] = len(rows.images) - len(kept)
    result["recall_curve"] = _recall_curve(t2i_ranks, i2t_ranks, len(kept_images), len(captions))
    result["gallery"] = _gallery(image_emb, text_emb, t2i, captions, kept_images, gallery_queries, gallery_top)
    return result


def _group_by_image(paths: Sequence[Path]) -> tuple[list[Path], list[int]]:
    """Unique images in order of first appearance, and each row's index among them."""
    index: dict[Path, int] = {}
    text_to_image = [index.setdefault(p, len(index)) for p in paths]
    return list(index), text_to_image


def _recall_curve(t2i_ranks: torch.Tensor, i2t_ranks: torch.Tensor, n_images: int, n_texts: int) -> dict[str, list]:
    """Recall@K for K = 1, 2, 3, 5, 10, 20, 30, 50, ... up to the larger gallery."""
    limit = max(n_images, n_texts)
    ks = sorted({m * 10 ** e for e in range(int(math.log10(limit)) + 1) for m in (1, 2, 3, 5)} | {limit})
    ks = [k for k in ks if k <= limit]
    return {
        "k": ks,
        "image_retrieval": [(t2i_ranks <= k).double().mean().item() for k in ks],
        "text_retrieval": [(i2t_ranks <= k).double().mean().item() for k in ks],
    }


def _gallery(image_emb: torch.Tensor, text_emb: torch.Tensor, t2i: torch.Tensor, captions: Sequence[str],
             images: Sequence[Path], n_queries: int, top: int) -> list[dict[str, Any]]:
    if n_queries <= 0 or top <= 0:
        return []
    n_queries = min(n_queries, len(captions))
    # Queries spread evenly over the table (deterministic, and not just the first image's captions).
    picks = sorted({round(i * (len(captions) - 1) / max(1, n_queries - 1)) for i in range(n_queries)})
    scores = text_emb[picks] @ image_emb.T
    best, order = scores.topk(min(top, len(images)), dim=1)
    return [
        {"caption": captions[q], "image": str(images[int(t2i[q])]),
         "top": [{"image": str(images[j]), "score": s, "correct": j == int(t2i[q])}
                 for j, s in zip(row.tolist(), values.tolist(), strict=True)]}
        for q, row, values in zip(picks, order, best, strict=True)
    ]


# ------------------------------------------------------------------------------------------------ zero-shot


def evaluate_zeroshot(
    model,
    preprocess: Callable,
    tokenizer: Callable,
    data: str | Path,
    classes: Sequence[str] | None = None,
    templates: str | Path | Sequence[str] = DEFAULT_TEMPLATES,
    *,
    image_col: str = "image_path",
    label_col: str = "label",
    split: str | None = None,
    image_root: str | Path | None = None,
    batch_size: int = 64,
    num_workers: int = 0,
    progress: bool = True,
    model_name: str | None = None,
    dataset_name: str | None = None,
) -> dict[str, Any]:
    """Zero-shot top-1/top-5 accuracy, mean per-class recall, per-class table and confusion matrix.

    `data` is ``labels.csv`` (image_path,label) or a folder with one subfolder per class. `classes` default
    to the labels found, sorted; when given, every label must be one of them (else ValueError naming the
    row). `templates`: a shipped set name (``openai``, ``simple``, ``seeds``), a file, or a list of strings.
    Images are scored by cosine similarity with the prompt-ensemble class weights (the softmax the CLI's
    ``classify`` shows ranks the same, but can saturate into ties in fp32).
    """
    started = time.perf_counter()
    from ..zeroshot import load_templates, zero_shot_classifier
    from .classification import classification_metrics

    rows = read_label_rows(data, image_col, label_col, split, image_root)
    if dataset_name:
        rows.name = dataset_name
    classes = _classes_for(rows, classes)
    template_list = _templates(templates, load_templates)
    classifier = zero_shot_classifier(model, tokenizer, classes, template_list, batch_size=max(batch_size, 64),
                                      progress=progress)
    embedded = _embed(model, preprocess, rows.images, batch_size, num_workers, progress, "embedding images", rows)
    index = {name: i for i, name in enumerate(classes)}
    targets = torch.tensor([index[rows.texts[i]] for i in embedded.indices], dtype=torch.long)
    metrics = classification_metrics(embedded.embeddings @ classifier, targets, classes)
    result: dict[str, Any] = {"task": "zeroshot", **metrics}
    result.update(_common_fields(model, model_name, rows, embedded.failures, started))
    result["templates"] = {"source": str(templates) if isinstance(templates, str | Path) else "list",
                           "count": len(template_list)}
    return result


def _templates(templates: str | Path | Sequence[str], load_templates: Callable) -> list[str]:
    if isinstance(templates, str | Path):
        return load_templates(templates)
    return list(templates)


def _classes_for(rows: _Rows, classes: Sequence[str] | None, split: str = "") -> list[str]:
    """The given classes (every label must be one), or the labels found, sorted."""
    if classes is None:
        return sorted(set(rows.texts))
    classes = list(classes)
    known = set(classes)
    for row, label in enumerate(rows.texts):
        if label not in known:
            shown = ", ".join(classes[:8]) + (", ..." if len(classes) > 8 else "")
            raise ValueError(f"{rows.path}{split}: row {row + 1} ({_relative(rows.images[row], rows.root)}) has label "
                             f"{label!r}, which is not one of the {len(classes)} classes ({shown}); fix the label "
                             "or add the class")
    return classes


# --------------------------------------------------------------------------------------------- linear probe


def evaluate_linear_probe(
    model,
    preprocess: Callable,
    train: str | Path,
    test: str | Path,
    *,
    few_shot: int | None = None,
    seed: int = 0,
    classes: Sequence[str] | None = None,
    weight_decay: float | None = None,
    image_col: str = "image_path",
    label_col: str = "label",
    image_root: str | Path | None = None,
    cache_dir: str | Path | None = None,
    batch_size: int = 64,
    num_workers: int = 0,
    progress: bool = True,
    model_name: str | None = None,
    dataset_name: str | None = None,
) -> dict[str, Any]:
    """Logistic-regression probe on frozen image features: test ``acc1``, ``acc5``, ``mean_per_class_recall``.

    `train` and `test` are labelled sets (``labels.csv`` or class folders). Classes default to the train
    labels, sorted; a test label outside them is an error. The weight decay is chosen on a validation split
    of train (see `clipforge.eval.probe.linear_probe`) unless given. `few_shot` K trains on K images per
    class drawn with `seed` (task ``few-shot-K``). `cache_dir` keeps the features on disk between runs.
    """
    started = time.perf_counter()
    from .probe import few_shot_indices, linear_probe

    train_rows = read_label_rows(train, image_col, label_col, image_root=image_root)
    test_rows = read_label_rows(test, image_col, label_col, image_root=image_root)
    if dataset_name:
        train_rows.name = dataset_name
    classes = _classes_for(train_rows, classes, " (train)")
    _classes_for(test_rows, classes, " (test)")
    train_emb = _embed(model, preprocess, train_rows.images, batch_size, num_workers, progress,
                       "train features", train_rows, cache_dir)
    test_emb = _embed(model, preprocess, test_rows.images, batch_size, num_workers, progress,
                      "test features", test_rows, cache_dir)
    index = {name: i for i, name in enumerate(classes)}
    x_train, y_train = train_emb.embeddings, torch.tensor([index[train_rows.texts[i]] for i in train_emb.indices])
    x_test, y_test = test_emb.embeddings, torch.tensor([index[test_rows.texts[i]] for i in test_emb.indices])
    if few_shot is not None:
        picked = few_shot_indices(y_train, few_shot, seed=seed)
        x_train, y_train = x_train[picked], y_train[picked]
    metrics = linear_probe(x_train, y_train, x_test, y_test, class_names=classes, weight_decay=weight_decay,
                           seed=seed)

    task = f"few-shot-{few_shot}" if few_shot is not None else "linear-probe"
    result: dict[str, Any] = {"task": task, **metrics, "num_samples": metrics["num_test"], "few_shot": few_shot,
                              "seed": seed}
    failures = [(i, item, f"train: {reason}") for i, item, reason in train_emb.failures] + \
               [(i, item, f"test: {reason}") for i, item, reason in test_emb.failures]
    result.update(_common_fields(model, model_name, train_rows, failures, started))
    result["dataset"] = {"name": train_rows.name, "train": train_rows.info(), "test": test_rows.info()}
    return result


# ------------------------------------------------------------------------------------------------- common


def _common_fields(model, model_name: str | None, rows: _Rows, failures: Sequence[tuple[int, str, str]],
                   started: float) -> dict[str, Any]:
    from .. import __version__

    return {"model": model_info(model, model_name), "dataset": rows.info(), **_failure_fields(failures),
            "clipforge_version": __version__, "seconds": round(time.perf_counter() - started, 3)}


# -------------------------------------------------------------------------------------------------- suite

_MODEL_KEYS = {"name", "checkpoint", "model", "pretrained", "device", "precision"}
_TASK_KEYS = {
    "retrieval": {"task", "name", "data", "image_col", "caption_col", "k", "split", "image_root"},
    "zeroshot": {"task", "name", "data", "classes", "classes_file", "templates", "image_col", "label_col", "split",
                 "image_root"},
    "linear-probe": {"task", "name", "train", "test", "few_shot", "seed", "classes", "classes_file",
                     "weight_decay", "image_col", "label_col", "image_root"},
}
_SUITE_KEYS = {"model", "models", "tasks", "output", "batch_size", "workers", "cache_dir", "exact"}


def run_suite(config_path: str | Path, output_dir: str | Path | None = None, *, progress: bool = True,
              ) -> dict[str, Any]:
    """Run the tasks of a YAML suite for each of its models; one result per (model, dataset, task).

    The YAML (paths relative to its own folder)::

        model: {checkpoint: runs/tiny}          # or {model: ViT-B-32, pretrained: openai}; or `models:` list
        output: results/                        # optional; `output_dir` overrides it
        batch_size: 64                          # optional: workers, cache_dir (linear-probe features), exact
        tasks:
          - {task: retrieval, data: flickr/captions.csv, image_col: image, k: [1, 5, 10]}
          - {task: zeroshot, data: flowers/labels.csv, templates: simple, classes: [daisy, rose]}
          - {task: linear-probe, train: a/labels.csv, test: b/labels.csv, few_shot: 5, seed: 0}

    The whole file is checked before anything runs (unknown keys and missing files are errors). A task that
    fails on its data is recorded in ``errors`` and the others still run. When an output folder is set,
    each result is written (JSON + plots) as soon as it is done, then ``summary.md`` / ``summary.csv``.
    Returns ``{"results": [...], "errors": [{"model", "task", "data", "error"}], "summary": rows}``.
    """
    from ..checkpoints import load
    from ..model import resolve_precision
    from .report import summary_rows, write_report, write_summary

    config_path = Path(config_path).expanduser()
    config = _read_suite(config_path)
    base = config_path.parent
    output = output_dir if output_dir is not None else config.get("output")
    output = _resolve(base, output) if output is not None else None
    options = {"batch_size": int(config.get("batch_size", 64)), "num_workers": int(config.get("workers", 0)),
               "progress": progress}
    cache_dir = _resolve(base, config["cache_dir"]) if config.get("cache_dir") else None

    results: list[dict[str, Any]] = []
    errors: list[dict[str, Any]] = []
    for spec in config["models"]:
        device = spec.get("device", "cpu")
        precision = resolve_precision(spec.get("precision", "auto"), device)
        source = _resolve(base, spec["checkpoint"]) if spec.get("checkpoint") else spec["model"]
        model, preprocess, tokenizer = load(source, device=device, precision=precision,
                                            pretrained=spec.get("pretrained"),
                                            fast_preprocess=not config.get("exact", False))
        for task in config["tasks"]:
            try:
                result = _run_task(task, base, model, preprocess, tokenizer, spec.get("name"), cache_dir, options)
            except (ValueError, OSError) as err:
                errors.append({"model": model_info(model, spec.get("name"))["name"], "task": task["task"],
                               "data": str(task.get("data", task.get("train"))), "error": str(err)})
                continue
            results.append(result)
            if output is not None:
                write_report(result, output)
    if output is not None and results:
        write_summary(results, output)
    return {"results": results, "errors": errors, "summary": summary_rows(results)}


def _run_task(task: dict[str, Any], base: Path, model, preprocess, tokenizer, model_name: str | None,
              cache_dir: Path | None, options: dict[str, Any]) -> dict[str, Any]:
    kind = task["task"]
    common = {"model_name": model_name, "dataset_name": task.get("name"), **options}
    if task.get("image_root"):
        common["image_root"] = _resolve(base, task["image_root"])
    if kind == "retrieval":
        return evaluate_retrieval(model, preprocess, tokenizer, _resolve(base, task["data"]),
                                  task.get("image_col", "image_path"), task.get("caption_col", "caption"),
                                  _as_ks(task.get("k", (1, 5, 10))), split=task.get("split"), **common)
    classes = _suite_classes(task, base)
    columns = {"image_col": task.get("image_col", "image_path"), "label_col": task.get("label_col", "label")}
    if kind == "zeroshot":
        templates = task.get("templates", DEFAULT_TEMPLATES)
        if isinstance(templates, str) and (base / templates).is_file():
            templates = base / templates
        return evaluate_zeroshot(model, preprocess, tokenizer, _resolve(base, task["data"]), classes, templates,
                                 split=task.get("split"), **columns, **common)
    return evaluate_linear_probe(model, preprocess, _resolve(base, task["train"]), _resolve(base, task["test"]),
                                 few_shot=task.get("few_shot"), seed=int(task.get("seed", 0)), classes=classes,
                                 weight_decay=task.get("weight_decay"), cache_dir=cache_dir, **columns, **common)


def _read_suite(path: Path) -> dict[str, Any]:
    """The suite YAML, checked: known keys, one or more models and tasks, data files present."""
    import yaml

    if not path.is_file():
        raise ValueError(f"suite config {str(path)!r}: no such file")
    try:
        config = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as err:
        raise ValueError(f"{path}: not valid YAML ({_first_line(err)})") from None
    if not isinstance(config, dict):
        raise ValueError(f"{path}: expected a mapping with 'model' and 'tasks' at the top level")
    _check_keys(config, _SUITE_KEYS, f"{path}")
    models = config.get("models", [config["model"]] if "model" in config else [])
    if not isinstance(models, list) or not models or not all(isinstance(m, dict) for m in models):
        raise ValueError(f"{path}: give 'model: {{checkpoint: DIR}}' or a 'models:' list of such mappings")
    for number, spec in enumerate(models, start=1):
        where = f"{path}, model {number}"
        _check_keys(spec, _MODEL_KEYS, where)
        if not spec.get("checkpoint") and not (spec.get("model") and spec.get("pretrained")):
            raise ValueError(f"{where}: give 'checkpoint: PATH', or 'model: ARCH' with 'pretrained: TAG'")
    tasks = config.get("tasks")
    if not isinstance(tasks, list) or not tasks or not all(isinstance(t, dict) for t in tasks):
        raise ValueError(f"{path}: 'tasks' must be a non-empty list of mappings, each with 'task: retrieval|"
                         "zeroshot|linear-probe'")
    base = path.parent
    for number, task in enumerate(tasks, start=1):
        where = f"{path}, task {number}"
        kind = task.get("task")
        if kind not in _TASK_KEYS:
            raise ValueError(f"{where}: 'task' must be one of {', '.join(TASKS)}, got {kind!r}")
        _check_keys(task, _TASK_KEYS[kind], where)
        for key in ("train", "test") if kind == "linear-probe" else ("data",):
            if not task.get(key):
                raise ValueError(f"{where}: '{key}' is required for {kind}")
            if not _resolve(base, task[key]).exists():
                raise ValueError(f"{where}: {key} {task[key]!r}: no such file or folder")
        if "k" in task:
            _as_ks(task["k"], where)
    config["models"] = models
    return config


def _check_keys(mapping: dict[str, Any], allowed: set[str], where: str) -> None:
    unknown = sorted(set(map(str, mapping)) - allowed)
    if unknown:
        raise ValueError(f"{where}: unknown key {unknown[0]!r}; known keys: {', '.join(sorted(allowed))}")


def _suite_classes(task: dict[str, Any], base: Path) -> list[str] | None:
    from ..zeroshot import parse_classnames, read_classnames

    if task.get("classes_file"):
        return read_classnames(_resolve(base, task["classes_file"]))
    classes = task.get("classes")
    if classes is None:
        return None
    return parse_classnames(classes) if isinstance(classes, str) else [str(c) for c in classes]


def _as_ks(value: Any, where: str = "k") -> list[int]:
    values = str(value).split(",") if isinstance(value, str | int) else list(value)
    try:
        ks = [int(v) for v in values]
    except (TypeError, ValueError):
        raise ValueError(f"{where}: k must be positive integers such as [1, 5, 10], got {value!r}") from None
    if not ks or min(ks) < 1:
        raise ValueError(f"{where}: k must be positive integers such as [1, 5, 10], got {value!r}")
    return ks


def _resolve(base: Path, value: str | Path) -> Path:
    path = Path(value).expanduser()
    return path if path.is_absolute() else base / path


def _first_line(err: BaseException) -> str:
    return (str(err).strip().splitlines() or [type(err).__name__])[0]
