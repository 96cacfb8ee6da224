"""`clipforge evaluate TASK`: retrieval Recall@K, zero-shot accuracy, linear probe / few-shot, suites.

A thin shell over `clipforge.eval.tasks` and `clipforge.eval.suite`: parse, call, print the headline metrics,
and write the result JSON (``--json OUT.json``) and the report (``--output DIR``: JSON + PNG plots, and for a
suite the summary table). Images that fail to decode are listed on stderr and counted in the results; they do
not fail the run unless none decodes.

The library modules (evaluation, checkpoints, zero-shot) are imported inside the commands, not here: they import
torch, and every clipforge command (``--help`` included) builds this module's parsers. For the same reason the
``--templates`` default is the CLI's (`clipforge.cli.classify`), not read from `clipforge.eval.tasks`.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from .classify import DEFAULT_TEMPLATES
from .common import (
    EXIT_FAILED,
    EXIT_OK,
    Command,
    UsageError,
    add_model_args,
    check_batch_and_workers,
    load_from_args,
    template_source,
)

# Printed after a run, in this order, when the result has them.
_HEADLINE = ("acc1", "acc5", "mean_per_class_recall")
_SHOWN_FAILURES = 5


# --------------------------------------------------------------------------------------------- commands


def cmd_retrieval(args: argparse.Namespace) -> int:
    from ..eval.tasks import evaluate_retrieval

    ks = _parse_ks(args.k)
    check_batch_and_workers(args)
    model, preprocess, tokenizer = load_from_args(args, fast_preprocess=not args.exact)
    result = evaluate_retrieval(model, preprocess, tokenizer, args.data, args.image_col, args.caption_col, ks,
                                split=args.split, image_root=args.image_root, **_run_options(args))
    return _finish(args, result)


def cmd_zeroshot(args: argparse.Namespace) -> int:
    from ..eval.tasks import evaluate_zeroshot

    classes = _classnames(args)
    templates = template_source(args.templates)
    check_batch_and_workers(args)
    model, preprocess, tokenizer = load_from_args(args, fast_preprocess=not args.exact)
    result = evaluate_zeroshot(model, preprocess, tokenizer, args.data, classes, templates, image_col=args.image_col,
                               label_col=args.label_col, split=args.split, image_root=args.image_root,
                               **_run_options(args))
    return _finish(args, result)


def cmd_linear_probe(args: argparse.Namespace) -> int:
    from ..checkpoints.pretrained import cache_dir
    from ..eval.tasks import evaluate_linear_probe

    classes = _classnames(args)
    check_batch_and_workers(args)
    if args.few_shot is not None and args.few_shot < 1:
        raise UsageError(f"--few-shot must be at least 1, got {args.few_shot}")
    if args.weight_decay is not None and args.weight_decay < 0:
        raise UsageError(f"--weight-decay must be 0 or more, got {args.weight_decay}")
    features = None if args.no_cache else Path(args.cache_dir) if args.cache_dir else cache_dir() / "features"
    model, preprocess, _ = load_from_args(args, fast_preprocess=not args.exact)
    result = evaluate_linear_probe(model, preprocess, args.train, args.test, few_shot=args.few_shot, seed=args.seed,
                                   classes=classes, weight_decay=args.weight_decay, image_col=args.image_col,
                                   label_col=args.label_col, image_root=args.image_root, cache_dir=features,
                                   **_run_options(args))
    return _finish(args, result)


def cmd_suite(args: argparse.Namespace) -> int:
    from ..eval.report import write_result_json
    from ..eval.suite import run_suite

    suite = run_suite(args.config, output_dir=args.output, progress=sys.stderr.isatty())
    for result in suite["results"]:
        _print_headline(result)
        _report_failures(result)
    if args.json:
        write_result_json(suite, args.json)
    for error in suite["errors"]:
        print(f"clipforge evaluate suite: {error['task']} on {error['data']} failed: {error['error']}",
              file=sys.stderr)
    if suite["errors"]:
        print(f"clipforge evaluate suite: error: {len(suite['errors'])} of "
              f"{len(suite['errors']) + len(suite['results'])} task(s) failed", file=sys.stderr)
        return EXIT_FAILED
    return EXIT_OK


# ------------------------------------------------------------------------------------------------ output


def _finish(args: argparse.Namespace, result: dict[str, Any]) -> int:
    from ..eval.report import write_report, write_result_json

    if args.json:
        write_result_json(result, args.json)
    if args.output:
        written = write_report(result, args.output)
        print(f"wrote {', '.join(str(p) for p in written.values())}", file=sys.stderr)
    _print_headline(result)
    _report_failures(result)
    return EXIT_OK


def _print_headline(result: dict[str, Any]) -> None:
    """One line per headline metric, as a percentage: ``text_retrieval_recall@5  63.20``."""
    model, dataset = result["model"]["name"], result["dataset"]["name"]
    print(f"{result['task']}: {model} on {dataset} ({result['num_samples']} samples, {result['num_failed']} failed)")
    names = [n for n in result if n.startswith(("image_retrieval_recall@", "text_retrieval_recall@"))]
    names += [n for n in _HEADLINE if n in result and result["task"] != "retrieval"]
    for name in names:
        print(f"  {name:<28} {100 * result[name]:6.2f}")


def _report_failures(result: dict[str, Any]) -> None:
    if not result["num_failed"]:
        return
    print(f"clipforge evaluate {result['task']}: {result['num_failed']} image(s) could not be decoded and were "
          "left out:", file=sys.stderr)
    for failure in result["failed"][:_SHOWN_FAILURES]:
        print(f"  {failure['reason']}", file=sys.stderr)
    if result["num_failed"] > _SHOWN_FAILURES:
        print(f"  ... and {result['num_failed'] - _SHOWN_FAILURES} more (all listed in the JSON up to "
              f"{len(result['failed'])})", file=sys.stderr)


# ----------------------------------------------------------------------------------------------- parsing


def _parse_ks(text: str) -> list[int]:
    try:
        ks = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise UsageError(f"--k {text!r}: give positive integers separated by commas, e.g. 1,5,10") from None
    if not ks or min(ks) < 1:
        raise UsageError(f"--k {text!r}: give positive integers separated by commas, e.g. 1,5,10")
    return ks


def _run_options(args: argparse.Namespace) -> dict[str, Any]:
    return {"batch_size": args.batch_size, "num_workers": args.workers, "progress": sys.stderr.isatty()}


def _classnames(args: argparse.Namespace) -> list[str] | None:
    from ..zeroshot import parse_classnames, read_classnames

    if args.classes_file:
        return read_classnames(args.classes_file)  # a bad file is a ValueError naming it and the line
    if args.classes is None:
        return None
    try:
        return parse_classnames(args.classes)
    except ValueError as err:
        raise UsageError(str(err)) from None


# ------------------------------------------------------------------------------------------------ arguments


def _common_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--json", metavar="OUT.json", help="write the full result (metrics, model, data hash) here")
    p.add_argument("--output", metavar="DIR", help="write the report here: result JSON and PNG plots")
    p.add_argument("--batch-size", type=int, default=64, help="images per batch (default: 64)")
    p.add_argument("--workers", type=int, default=0,
                   help="image decoding processes (default: 0, decode in the main process)")
    p.add_argument("--exact", action="store_true",
                   help="decode JPEGs at full size instead of libjpeg's faster reduced-size decode")
    add_model_args(p)


def _class_args(p: argparse.ArgumentParser, default_help: str) -> None:
    group = p.add_mutually_exclusive_group()
    group.add_argument("--classes", help=f"comma-separated class names (default: {default_help})")
    group.add_argument("--classes-file", metavar="FILE", help="class names, one per line")


def _label_col_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--image-col", default="image_path", help="labels table: image path column (default: image_path)")
    p.add_argument("--label-col", default="label", help="labels table: class label column (default: label)")


def _image_root_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--image-root", metavar="DIR",
                   help="folder the table's image paths are relative to (default: the table's folder)")


def _split_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--split", metavar="VALUE", help="use only the table rows whose 'split' column is VALUE (e.g. dev)")


def _retrieval_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--data", required=True, metavar="CAPTIONS",
                   help="caption table (.csv, .tsv or .parquet); rows with the same image are several captions")
    p.add_argument("--image-col", default="image_path", help="image path column (default: image_path)")
    p.add_argument("--caption-col", default="caption", help="caption column (default: caption)")
    p.add_argument("--k", default="1,5,10", help="K values of Recall@K, comma-separated (default: 1,5,10)")
    _image_root_arg(p)
    _split_arg(p)
    _common_args(p)


def _zeroshot_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--data", required=True, metavar="LABELS",
                   help="labels.csv (image_path,label) or a folder with one subfolder of images per class")
    _class_args(p, "the labels found in --data")
    p.add_argument("--templates", default=DEFAULT_TEMPLATES, metavar="SET|FILE",
                   help="prompt templates: openai (80), simple (7), seeds (3) or a file with one template per "
                        f"line containing {{}} (default: {DEFAULT_TEMPLATES})")
    _label_col_args(p)
    _image_root_arg(p)
    _split_arg(p)
    _common_args(p)


def _linear_probe_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--train", required=True, metavar="LABELS", help="train set: labels.csv or a class-folder tree")
    p.add_argument("--test", required=True, metavar="LABELS", help="test set: labels.csv or a class-folder tree")
    _class_args(p, "the labels found in --train")
    p.add_argument("--few-shot", type=int, metavar="K", help="train on K images per class (seeded sample)")
    p.add_argument("--seed", type=int, default=0, help="seed of the few-shot sample and validation split")
    p.add_argument("--weight-decay", type=float,
                   help="use this weight decay instead of choosing it on a validation split of --train")
    p.add_argument("--cache-dir", metavar="DIR",
                   help="feature cache (default: the clipforge cache folder's features/)")
    p.add_argument("--no-cache", action="store_true", help="compute features afresh and keep nothing on disk")
    _label_col_args(p)
    _image_root_arg(p)
    _common_args(p)


def _suite_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", required=True, metavar="EVAL.yaml",
                   help="models and tasks to run (see clipforge.eval.suite.run_suite)")
    p.add_argument("--output", metavar="DIR",
                   help="write each result (JSON + plots) and summary.md / summary.csv here (overrides the "
                        "config's output)")
    p.add_argument("--json", metavar="OUT.json", help="write all results and the summary rows as one JSON file")


def _evaluate_args(p: argparse.ArgumentParser) -> None:
    tasks = p.add_subparsers(dest="task", required=True, metavar="TASK")
    for name, help_text, add_args, run in _TASKS:
        sub = tasks.add_parser(name, help=help_text, description=help_text)
        add_args(sub)
        sub.set_defaults(run=run)


_TASKS: list[Command] = [
    ("retrieval", "text->image and image->text Recall@K on a caption table", _retrieval_args, cmd_retrieval),
    ("zeroshot", "zero-shot top-1/top-5 accuracy and per-class recall on labelled images", _zeroshot_args,
     cmd_zeroshot),
    ("linear-probe", "logistic-regression probe (or --few-shot K) on frozen image features", _linear_probe_args,
     cmd_linear_probe),
    ("suite", "several models, tasks and data sets from a YAML file, one results table", _suite_args, cmd_suite),
]


def _no_task(args: argparse.Namespace) -> int:  # pragma: no cover - argparse requires TASK
    raise UsageError("give a task: retrieval, zeroshot, linear-probe or suite")


COMMANDS: list[Command] = [
    ("evaluate", "evaluate a model: retrieval, zeroshot, linear-probe, or a suite", _evaluate_args, _no_task),
]
