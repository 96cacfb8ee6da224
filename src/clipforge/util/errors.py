"""One-line error text: how every clipforge message quotes an exception it caught."""

from __future__ import annotations

__all__ = ["one_line"]


def one_line(err: BaseException, limit: int | None = None, *, whole: bool = False) -> str:
    """The message of `err` as one line: its first line (with `whole`, all of its lines, for messages whose later
    lines say where the problem is, as YAML's and some decoders' do), white space collapsed, the exception's type
    name when it has no message, cut to `limit` characters with "..." when given.

    An exception re-raised from a DataLoader worker carries the worker's traceback in its message; its last line
    is the original ``TypeName: message``, and that message is what is returned."""
    text = str(err).strip()
    lines = text.splitlines()
    if lines and lines[0].startswith("Caught ") and "Original Traceback" in text:
        line = lines[-1].removeprefix(f"{type(err).__name__}: ")
    else:
        line = text if whole else (lines[0] if lines else "")
    line = " ".join(line.split()) or type(err).__name__
    if limit is not None and len(line) > limit:
        return line[: limit - 3] + "..."
    return line
