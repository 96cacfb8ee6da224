"""The helpers every layer shares: atomic file writes and one-line error text."""

from __future__ import annotations

import json

import pytest

from clipforge.util import atomic_write, atomic_write_json, atomic_write_text, commit_file, one_line


def test_atomic_write_replaces_the_file_or_leaves_it_as_it_was(tmp_path) -> None:
    path = tmp_path / "new" / "folder" / "out.bin"
    assert atomic_write(path, lambda handle: handle.write(b"first")) == path  # the folder is created
    assert path.read_bytes() == b"first"

    def broken(handle) -> None:
        handle.write(b"half of the sec")
        raise RuntimeError("killed mid-write")

    with pytest.raises(RuntimeError, match="killed mid-write"):
        atomic_write(path, broken)
    assert path.read_bytes() == b"first"
    assert sorted(p.name for p in path.parent.iterdir()) == ["out.bin"]  # no temporary file left behind

    # A writer that only takes a file name writes to the temporary file's.
    atomic_write(path, lambda handle: open(handle.name, "wb").write(b"by name"))  # noqa: SIM115
    assert path.read_bytes() == b"by name"


def test_text_and_json_forms(tmp_path) -> None:
    assert atomic_write_text(tmp_path / "a.txt", "grüße\n").read_text(encoding="utf-8") == "grüße\n"
    text = atomic_write_json(tmp_path / "a.json", {"name": "café", "n": [1, 2]}, indent=1).read_text(encoding="utf-8")
    assert text.endswith("}\n") and "café" in text and json.loads(text) == {"name": "café", "n": [1, 2]}


def test_commit_file_moves_a_finished_file_into_place(tmp_path) -> None:
    part = tmp_path / "weights.bin.part"
    part.write_bytes(b"all of it")
    (tmp_path / "weights.bin").write_bytes(b"old")
    commit_file(part, tmp_path / "weights.bin")
    assert (tmp_path / "weights.bin").read_bytes() == b"all of it" and not part.exists()


def test_one_line() -> None:
    assert one_line(ValueError("first line\n  second line")) == "first line"
    assert one_line(ValueError("first line\n  second line"), whole=True) == "first line second line"
    assert one_line(KeyError()) == "KeyError"
    assert one_line(ValueError("x" * 300), limit=20) == "x" * 17 + "..."
    # What a DataLoader worker's error looks like once torch re-raises it: the reason is the last line.
    wrapped = ValueError("Caught ValueError in DataLoader worker process 0.\nOriginal Traceback (most recent call "
                         "last):\n  File \"x.py\", line 1, in f\nValueError: data.csv line 3: empty caption")
    assert one_line(wrapped) == one_line(wrapped, whole=True) == "data.csv line 3: empty caption"
