"""Machine-readable figures from the benchmark scripts, collected by bench/run_all.py (`make bench`).

Each script calls `record()` once per headline figure (and `skip()` when its inputs are missing), next to
what it prints. When the environment variable named by `ENV` holds a file path, each call appends one JSON
line to that file; otherwise the calls do nothing, so a script run on its own prints and behaves as before.

A figure compares clipforge with a reference measured in the same run: open_clip 3.3.0 unless `reference`
names another (a naive implementation, the torch model an export came from, ...). `ratio` is clipforge's
value over the reference's unless the script passes its own; `better` says whether a higher or a lower
value is the better one (for a ratio of two "lower is better" values, below 1 favours clipforge).
"""

from __future__ import annotations

import json
import math
import os
from typing import Any

ENV = "CLIPFORGE_BENCH_RESULTS"
OPEN_CLIP = "open_clip 3.3.0"


def _append(entry: dict[str, Any]) -> None:
    path = os.environ.get(ENV)
    if not path:
        return
    with open(path, "a", encoding="utf-8") as handle:
        handle.write(json.dumps(entry) + "\n")


def _number(value: float | None) -> float | None:
    """A plain float to 6 significant digits (None for a missing or non-finite value)."""
    if value is None:
        return None
    value = float(value)
    return float(f"{value:.6g}") if math.isfinite(value) else None


def record(case: str, clipforge: float, reference: float | None = None, *, unit: str, better: str = "higher",
           ratio: float | None = None, reference_name: str = OPEN_CLIP, note: str | None = None) -> None:
    """One figure: clipforge's value and, when there is one, the reference's and their ratio."""
    if better not in ("higher", "lower"):
        raise ValueError(f"better must be 'higher' or 'lower', not {better!r}")
    ours, theirs = _number(clipforge), _number(reference)
    if ratio is None and ours is not None and theirs:
        ratio = ours / theirs
    _append({"kind": "figure", "case": case, "clipforge": ours, "reference": theirs,
             "reference_name": reference_name if theirs is not None else None, "ratio": _number(ratio),
             "unit": unit, "better": better, "note": note})


def skip(reason: str) -> None:
    """The benchmark did not run (its inputs are missing)."""
    _append({"kind": "skipped", "reason": reason})
