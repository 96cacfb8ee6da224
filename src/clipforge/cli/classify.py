"""`clipforge classify`: zero-shot labels for image files and folders.

Default templates: ``simple``, OpenAI's 7 templates picked by forward selection from their 80 ImageNet
templates. It keeps most of the ensembling gain of the full set while encoding about 11x fewer texts, and
on a CPU those text encodings dominate a run on a few images with many classes. ``--templates openai``
gives the full 80 (the CLIP paper's setting), ``seeds`` three plain photo prompts, or a file of your own.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

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

DEFAULT_TEMPLATES = "simple"


def cmd_classify(args: argparse.Namespace) -> int:
    from ..zeroshot import classify, load_templates, zero_shot_classifier

    classnames = _classnames(args)
    _check_numbers(args)
    templates = load_templates(template_source(args.templates))
    inputs = _find_images(args.paths)
    if not inputs:
        raise UsageError(f"no images found in {', '.join(args.paths)}")
    model, preprocess, tokenizer = load_from_args(args, fast_preprocess=not args.exact)
    progress = sys.stderr.isatty()
    classifier = zero_shot_classifier(model, tokenizer, classnames, templates, progress=progress)
    result = classify(model, preprocess, [str(p) for p in inputs], classifier, classnames, top_k=args.top_k,
                      batch_size=args.batch_size, num_workers=args.workers, progress=progress)
    by_index = {p.index: p for p in result.predictions}
    errors = {index: reason for index, _, reason in result.failures}
    (_print_json if args.json else _print_table)(inputs, by_index, errors)
    if errors:
        print(f"clipforge classify: {len(errors)} of {len(inputs)} input(s) could not be classified",
              file=sys.stderr)
    return EXIT_FAILED if errors else EXIT_OK


def _classnames(args: argparse.Namespace) -> list[str]:
    from ..zeroshot import parse_classnames, read_classnames

    if args.classes_file:
        return read_classnames(args.classes_file)  # a bad file is a ValueError naming it and the line
    if args.classes is None:
        raise UsageError("no classes: give --classes 'cat,dog,car' or --classes-file FILE (one per line)")
    try:
        return parse_classnames(args.classes)
    except ValueError as err:
        raise UsageError(str(err)) from None


def _check_numbers(args: argparse.Namespace) -> None:
    if args.top_k < 1:
        raise UsageError(f"--top-k must be at least 1, got {args.top_k}")
    check_batch_and_workers(args)


def _find_images(paths: list[str]) -> list[Path]:
    """Files named on the command line, kept whatever they hold (an unreadable or missing one is then reported
    with its reason), and the images under named folders (recursive, recognised by content), without repeats."""
    found: dict[Path, None] = {}  # ordered set
    for raw in paths:
        path = Path(raw).expanduser()
        found.update(dict.fromkeys(_images_in_folder(path) if path.is_dir() else [path]))
    return list(found)


def _images_in_folder(folder: Path) -> list[Path]:
    from ..data.discovery import find_images

    try:
        return find_images([folder])
    except ValueError:  # a folder without images adds nothing; no input at all is reported by the caller
        return []


def _print_table(inputs: list[Path], predictions: dict, errors: dict[int, str]) -> None:
    for index, path in enumerate(inputs):
        if index in predictions:
            print(path)
            pred = predictions[index]
            for rank, (label, prob) in enumerate(zip(pred.labels, pred.probs, strict=True), start=1):
                print(f"  {rank:>2}. {prob:7.2%}  {label}")
    if errors:
        print(f"could not read {len(errors)} input(s):", file=sys.stderr)
        for index, reason in sorted(errors.items()):
            name = str(inputs[index])
            print(f"  {reason}" if repr(name) in reason else f"  {name}: {reason}", file=sys.stderr)


def _print_json(inputs: list[Path], predictions: dict, errors: dict[int, str]) -> None:
    for index, path in enumerate(inputs):
        if index in predictions:
            pred = predictions[index]
            row = {"path": str(path), "labels": pred.labels, "probs": [round(p, 6) for p in pred.probs]}
        else:
            row = {"path": str(path), "error": errors[index]}
        print(json.dumps(row))


def _classify_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("paths", nargs="+", metavar="PATH", help="image files or folders (searched recursively)")
    group = p.add_mutually_exclusive_group()
    group.add_argument("--classes", help="comma-separated class names, e.g. 'cat,dog,car'")
    group.add_argument("--classes-file", metavar="FILE", help="class names, one per line")
    p.add_argument("--templates", default=DEFAULT_TEMPLATES, metavar="SET|FILE",
                   help="prompt templates: openai (80), simple (7), seeds (3) or a file with one template per "
                        f"line containing {{}} (default: {DEFAULT_TEMPLATES})")
    p.add_argument("--top-k", type=int, default=5, help="labels shown per image (default: 5)")
    p.add_argument("--json", action="store_true",
                   help='one JSON object per input: {"path", "labels", "probs"} or {"path", "error"}')
    p.add_argument("--batch-size", type=int, default=64, help="images per batch (default: 64)")
    p.add_argument("--workers", type=int, default=0,
                   help="image decoding processes (default: 0, decode in the main process)")
    p.add_argument("--exact", action="store_true",
                   help="decode JPEGs at full size instead of libjpeg's faster reduced-size decode")
    add_model_args(p)


COMMANDS: list[Command] = [
    ("classify", "zero-shot labels for images from class names and prompt templates", _classify_args,
     cmd_classify),
]
