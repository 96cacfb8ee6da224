"""Evaluation suites: `run_suite` runs the tasks of a YAML file for each of its models, after checking the
whole file (keys, models, data paths, K values), and writes each result's report and a summary table.

The tasks are those of `clipforge.eval.tasks`; the report files are written by `clipforge.eval.report`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from ..checkpoints import load
from ..model import resolve_precision
from ..util import one_line
from ..zeroshot import parse_classnames, read_classnames
from .report import summary_rows, write_report, write_summary
from .tasks import DEFAULT_TEMPLATES, TASKS, evaluate_linear_probe, evaluate_retrieval, evaluate_zeroshot, model_info

__all__ = ["run_suite"]

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
    if not path.is_file():
        raise ValueError(f"suite config {str(path)!r}: no such file")
    try:
        config = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as err:
        raise ValueError(f"{path}: not valid YAML ({one_line(err)})") from None
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
