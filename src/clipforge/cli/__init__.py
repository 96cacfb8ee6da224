"""The `clipforge` command: parse, call the library, print. Each subcommand is a thin shell.

Subcommands live in this package's modules, grouped by area; each module lists its own in `COMMANDS`.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence

from . import classify, core, evaluate, export, search, train
from .common import EXIT_FAILED, EXIT_OK, EXIT_USAGE, Command, UsageError, add_model_args, load_from_args

COMMANDS: list[Command] = [*core.COMMANDS, *classify.COMMANDS, *evaluate.COMMANDS, *export.COMMANDS,
                           *search.COMMANDS, *train.COMMANDS]


def build_parser() -> argparse.ArgumentParser:
    from .. import __version__

    parser = argparse.ArgumentParser(prog="clipforge", description="CLIP models: load, convert, classify, train, "
                                     "evaluate, embed, search.")
    parser.add_argument("--version", action="version", version=f"clipforge {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, help_text, add_args, run in COMMANDS:
        p = sub.add_parser(name, help=help_text, description=help_text)
        add_args(p)
        p.set_defaults(run=run)
    return parser


def _one_line(err: BaseException) -> str:
    text = str(err).strip() or type(err).__name__
    lines = text.splitlines()
    if lines[0].startswith("Caught ") and "Original Traceback" in text:
        # Re-raised from a DataLoader worker: the last line is the worker's own "ValueError: message".
        return lines[-1].removeprefix(f"{type(err).__name__}: ")
    return lines[0]


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.run(args)
    except BrokenPipeError:  # output piped into `head` and the like: not an error
        sys.stdout = open(os.devnull, "w")  # noqa: SIM115 - keeps the interpreter's final flush quiet
        return EXIT_OK
    except KeyboardInterrupt:
        print(f"clipforge {args.command}: interrupted", file=sys.stderr)
        return 130
    except Exception as err:
        status = _user_error_status(err)
        if status is None or os.environ.get("CLIPFORGE_DEBUG"):
            raise  # a bug, or a developer asking for the traceback
        print(f"clipforge {args.command}: error: {_one_line(err)}", file=sys.stderr)
        return status


def _user_error_status(err: Exception) -> int | None:
    """Exit status for a user's mistake (bad input, missing file); None for anything else."""
    from ..checkpoints import CheckpointError
    from ..checkpoints.pretrained import DownloadError
    from ..transforms import ImageDecodeError

    if isinstance(err, UsageError):
        return EXIT_USAGE
    if isinstance(err, (CheckpointError, DownloadError, ImageDecodeError, OSError, ValueError)):
        return EXIT_FAILED
    return None


__all__ = ["EXIT_FAILED", "EXIT_OK", "EXIT_USAGE", "UsageError", "add_model_args", "build_parser", "load_from_args",
           "main"]
