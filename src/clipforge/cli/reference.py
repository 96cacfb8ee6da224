"""The CLI reference page (`docs/cli.md`), generated from the parsers' own `--help` texts.

    python -m clipforge.cli.reference > docs/cli.md      (or: make docs)

A test regenerates it and fails when the committed page differs, so the page cannot drift from the code.
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Iterator

# Help is wrapped to the terminal width; a fixed width makes the page the same on every machine.
WIDTH = 100


def cli_reference() -> str:
    """Markdown: the top-level help, then each subcommand's (and sub-subcommand's) `--help` in a code block."""
    from . import build_parser

    saved = os.environ.get("COLUMNS")
    os.environ["COLUMNS"] = str(WIDTH)
    try:
        parser = build_parser()
        parts = ["# Command-line reference", "",
                 "Generated from `clipforge COMMAND --help` by `make docs`; do not edit by hand.", "",
                 "```", parser.format_help().rstrip(), "```", ""]
        for path, sub in _subparsers(parser, ["clipforge"]):
            parts += [f"## `{' '.join(path)}`", "", "```", sub.format_help().rstrip(), "```", ""]
    finally:
        if saved is None:
            os.environ.pop("COLUMNS", None)
        else:
            os.environ["COLUMNS"] = saved
    return "\n".join(parts)


Parser = argparse.ArgumentParser


def _subparsers(parser: Parser, path: list[str]) -> Iterator[tuple[list[str], Parser]]:
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                yield [*path, name], sub
                yield from _subparsers(sub, [*path, name])


if __name__ == "__main__":
    print(cli_reference(), end="")
