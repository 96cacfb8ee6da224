"""Evaluation tasks: a data set in, a JSON-ready result dict out, for retrieval, zero-shot and linear probe /
few-shot; and the fields every result shares.

Each ``evaluate_*`` function reads its data set (`clipforge.eval.datasets`), embeds images through
`clipforge.eval.features` (the shared embedding path, optionally cached), computes CLIP_benchmark's metrics
(`clipforge.eval.retrieval`, `accuracy`, `probe`) and returns the result. Nothing is written:
`clipforge.eval.report.write_report` turns a result into a JSON file and plots, and `clipforge.eval.suite`
runs many tasks from a YAML file and writes their reports.

Every result holds:

* the metrics as fractions in [0, 1] (``acc1``, ``acc5``, ``mean_per_class_recall``,
  ``image_retrieval_recall@K`` = text -> image, ``text_retrieval_recall@K`` = image -> text);
* ``model``: its name, architecture, precision and provenance (where it was loaded from);
* ``dataset``: name, path, row count and ``sha256``, a hash of the rows (image paths relative to the data
  set's folder, plus captions or labels), so the same data set copied elsewhere hashes the same;
* ``num_failed`` and ``failed`` (the first few): images that could not be decoded. They are left out of the
  metrics (with their captions, for retrieval); a data set where none decodes is an error.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

from .. import __version__
from ..data.sources import group_by_image
from ..zeroshot import load_templates, zero_shot_classifier
from .accuracy import classification_metrics
from .datasets import DatasetRows, read_caption_rows, read_label_rows
from .features import image_features
from .probe import few_shot_indices, linear_probe
from .retrieval import RetrievalEvaluation, evaluate_captioned_images, validate_ks

__all__ = [
    "DEFAULT_TEMPLATES",
    "TASKS",
    "evaluate_linear_probe",
    "evaluate_retrieval",
    "evaluate_zeroshot",
    "model_info",
]

TASKS = ("retrieval", "zeroshot", "linear-probe")
DEFAULT_TEMPLATES = "simple"
# Failed images listed by name in a result (all are counted): enough to find the pattern, not a log dump.
_MAX_LISTED_FAILURES = 20


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

    Rows with the same image path are one image with several captions; the metrics are those of
    `clipforge.eval.retrieval.evaluate_captioned_images` on these images. Images that fail to decode are left
    out with their captions (``num_failed``, ``num_dropped_captions``). Adds ``recall_curve`` (Recall@K for
    log-spaced K, both directions) and ``gallery`` (for `gallery_queries` captions spread over the table, the
    `gallery_top` best images with their cosine scores) for the report's plots.
    """
    started = time.perf_counter()
    ks = validate_ks(ks)
    rows = read_caption_rows(data, image_col, caption_col, split, image_root)
    if dataset_name:
        rows.name = dataset_name
    images, captions = group_by_image(rows.images, rows.texts)
    run = evaluate_captioned_images(model, preprocess, tokenizer, images, captions, ks, batch_size=batch_size,
                                    num_workers=num_workers, progress=progress, source=rows.path)

    result: dict[str, Any] = {"task": "retrieval", **run.metrics, "num_samples": len(run.captions), "ks": ks}
    result.update(_common_fields(model, model_name, rows, run.failures, started))
    result["num_dropped_captions"] = run.num_dropped_captions
    result["recall_curve"] = _recall_curve(run.image_retrieval_ranks, run.text_retrieval_ranks, len(run.images),
                                           len(run.captions))
    order = _table_order(rows.images, run)
    result["gallery"] = _gallery(run.image_embeddings, run.text_embeddings[order], run.text_to_image[order],
                                 [run.captions[i] for i in order], run.images, gallery_queries, gallery_top)
    return result


def _table_order(row_images: Sequence[Path], run: RetrievalEvaluation) -> list[int]:
    """The index in `run.captions` of each kept row's caption, in table order.

    The run holds the captions image by image; the gallery spreads its queries over the table as written, which
    differs when an image's rows are apart."""
    position = {image: i for i, image in enumerate(run.images)}
    kept_rows = [r for r, image in enumerate(row_images) if image in position]
    # Sorting the kept rows by their image (stably) gives the run's caption order: grouped[i] is the row of
    # caption i. Sorting the caption indices by their row turns that around.
    grouped = sorted(kept_rows, key=lambda r: position[row_images[r]])
    return sorted(range(len(grouped)), key=grouped.__getitem__)


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
    """For `n_queries` captions, the `top` best-scoring images with their scores and whether each is correct."""
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
    rows = read_label_rows(data, image_col, label_col, split, image_root)
    if dataset_name:
        rows.name = dataset_name
    classes = _classes_for(rows, classes)
    template_list = _templates(templates)
    classifier = zero_shot_classifier(model, tokenizer, classes, template_list, batch_size=max(batch_size, 64),
                                      progress=progress)
    embedded = image_features(model, preprocess, rows.images, batch_size=batch_size, num_workers=num_workers,
                              progress=progress, source=rows.path)
    index = {name: i for i, name in enumerate(classes)}
    targets = torch.tensor([index[rows.texts[i]] for i in embedded.indices], dtype=torch.long)
    metrics = classification_metrics(embedded.embeddings @ classifier, targets, classes)
    result: dict[str, Any] = {"task": "zeroshot", **metrics}
    result.update(_common_fields(model, model_name, rows, embedded.failures, started))
    result["templates"] = {"source": str(templates) if isinstance(templates, str | Path) else "list",
                           "count": len(template_list)}
    return result


def _templates(templates: str | Path | Sequence[str]) -> list[str]:
    if isinstance(templates, str | Path):
        return load_templates(templates)
    return list(templates)


def _classes_for(rows: DatasetRows, classes: Sequence[str] | None, part: str = "") -> list[str]:
    """The given classes (every label must be one), or the labels found, sorted. `part` (" (train)", say)
    follows the data set's path in the message."""
    if classes is None:
        return sorted(set(rows.texts))
    classes = list(classes)
    known = set(classes)
    for row, label in enumerate(rows.texts):
        if label not in known:
            shown = ", ".join(classes[:8]) + (", ..." if len(classes) > 8 else "")
            raise ValueError(f"{rows.path}{part}: row {row + 1} ({rows.relative_image(row)}) has label "
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
    train_rows = read_label_rows(train, image_col, label_col, image_root=image_root)
    test_rows = read_label_rows(test, image_col, label_col, image_root=image_root)
    if dataset_name:
        train_rows.name = dataset_name
    classes = _classes_for(train_rows, classes, " (train)")
    _classes_for(test_rows, classes, " (test)")
    embedding = {"batch_size": batch_size, "num_workers": num_workers, "progress": progress, "cache_dir": cache_dir}
    train_emb = image_features(model, preprocess, train_rows.images, desc="train features", source=train_rows.path,
                               **embedding)
    test_emb = image_features(model, preprocess, test_rows.images, desc="test features", source=test_rows.path,
                              **embedding)
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


def _common_fields(model, model_name: str | None, rows: DatasetRows, failures: Sequence[tuple[int, str, str]],
                   started: float) -> dict[str, Any]:
    """The fields every result has besides its metrics: model, dataset, failures, version and run time."""
    listed = [{"image": item, "reason": reason} for _, item, reason in failures[:_MAX_LISTED_FAILURES]]
    return {"model": model_info(model, model_name), "dataset": rows.info(), "num_failed": len(failures),
            "failed": listed, "clipforge_version": __version__, "seconds": round(time.perf_counter() - started, 3)}
