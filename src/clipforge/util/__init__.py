"""Helpers every layer of clipforge shares: durable atomic file writes and one-line error text.

This package imports nothing but the standard library, so that any module may use it.
"""

from .errors import one_line
from .files import atomic_write, atomic_write_bytes, atomic_write_json, atomic_write_text, commit_file

__all__ = ["atomic_write", "atomic_write_bytes", "atomic_write_json", "atomic_write_text", "commit_file", "one_line"]
