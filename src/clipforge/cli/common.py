"""What every subcommand shares: exit statuses, the usage error, and the model options."""

from __future__ import annotations

import argparse
from collections.abc import Callable
from pathlib import Path

EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2


class UsageError(Exception):
    """A mistake in the command line or its inputs: reported in one line, exit status 2."""


def add_model_args(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("model")
    group.add_argument("--checkpoint", help="a clipforge/HF folder or an OpenAI/OpenCLIP checkpoint file")
    group.add_argument("--model", help="architecture name (e.g. ViT-B-32), with --pretrained")
    group.add_argument("--pretrained", help="pretrained tag for --model (see `clipforge models --pretrained`)")
    group.add_argument("--device", default="cpu", help="torch device (default: cpu)")
    group.add_argument("--precision", default="auto", choices=["auto", "fp32", "bf16", "fp16"],
                       help="auto = bf16 where the hardware has it natively, else fp32")


def load_from_args(args: argparse.Namespace, fast_preprocess: bool = False):
    """(model, preprocess, tokenizer) from --checkpoint or --model/--pretrained."""
    from ..checkpoints import load
    from ..model import resolve_precision

    precision = resolve_precision(args.precision, args.device)
    if args.checkpoint:
        return load(args.checkpoint, device=args.device, precision=precision, fast_preprocess=fast_preprocess)
    if args.model and args.pretrained:
        return load(args.model, pretrained=args.pretrained, device=args.device, precision=precision,
                    fast_preprocess=fast_preprocess)
    raise UsageError("give --checkpoint PATH, or --model ARCH --pretrained TAG")


def check_batch_and_workers(args: argparse.Namespace) -> None:
    """Usage errors for `--batch-size` below 1 and `--workers` below 0."""
    if args.batch_size < 1:
        raise UsageError(f"--batch-size must be at least 1, got {args.batch_size}")
    if args.workers < 0:
        raise UsageError(f"--workers must be 0 or more, got {args.workers}")


def template_source(value: str) -> str | Path:
    """`--templates`: a shipped template set's name, or the path of an existing template file."""
    from ..zeroshot import TEMPLATE_SETS

    if value in TEMPLATE_SETS:
        return value
    path = Path(value).expanduser()
    if not path.exists():
        raise UsageError(f"--templates {value!r}: not one of {', '.join(TEMPLATE_SETS)} and no such file")
    return path


# (name, one-line help, add arguments, run) for one subcommand
Command = tuple[str, str, Callable[[argparse.ArgumentParser], None], Callable[[argparse.Namespace], int]]
