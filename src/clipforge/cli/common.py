"""What every subcommand shares: exit statuses, the error boundary (a user's mistake is one line), the usage
error, and the model options.

Library imports sit inside the functions that need them throughout cli/: `clipforge --help` and a usage error
then answer without loading torch.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable
from pathlib import Path

from ..util import one_line

EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_INTERRUPTED = 0, 1, 2, 130


class UsageError(Exception):
    """A mistake in the command line or its inputs: reported in one line, exit status 2."""


def run_command(name: str, run: Callable[[], int]) -> int:
    """Run subcommand `name` and return its exit status: a user's mistake (see `user_error_status`) is one line on
    stderr, Ctrl-C is "interrupted" and 130, a closed output pipe is no error; a bug keeps its traceback (and so
    does every error with ``CLIPFORGE_DEBUG`` set)."""
    try:
        return run()
    except BrokenPipeError:  # output piped into `head` and the like: not an error
        sys.stdout = open(os.devnull, "w")  # noqa: SIM115 - keeps the interpreter's final flush quiet
        return EXIT_OK
    except KeyboardInterrupt:
        print(f"clipforge {name}: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except Exception as err:
        status = user_error_status(err)
        if status is None or os.environ.get("CLIPFORGE_DEBUG"):
            raise
        print(f"clipforge {name}: error: {one_line(err)}", file=sys.stderr)
        return status


def user_error_status(err: Exception) -> int | None:
    """Exit status for a user's mistake (bad input, missing file); None for anything else."""
    from ..checkpoints import CheckpointError
    from ..checkpoints.pretrained import DownloadError
    from ..images import ImageDecodeError

    if isinstance(err, UsageError):
        return EXIT_USAGE
    if isinstance(err, (CheckpointError, DownloadError, ImageDecodeError, OSError, ValueError)):
        return EXIT_FAILED
    return None


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
