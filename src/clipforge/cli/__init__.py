"""The `clipforge` command: parse, call the library, print. Each subcommand is a thin shell.

Subcommands live in this package's modules, grouped by area; each module lists its own in `COMMANDS`.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence

from . import classify, core, evaluate, export, search, train
from .common import (
    EXIT_FAILED,
    EXIT_OK,
    EXIT_USAGE,
    Command,
    UsageError,
    add_model_args,
    load_from_args,
    run_command,
    user_error_status,
)

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


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return run_command(args.command, lambda: args.run(args))


__all__ = ["EXIT_FAILED", "EXIT_OK", "EXIT_USAGE", "UsageError", "add_model_args", "build_parser", "load_from_args",
           "main", "run_command", "user_error_status"]
