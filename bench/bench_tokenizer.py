"""Tokenizer throughput: clipforge vs open_clip on the 35,000 Flickr8k captions, with identical ids.

    bench/.venv-openclip/bin/python bench/bench_tokenizer.py [--batch-size 1024] [--repeats 3]

Both tokenizers are built fresh (construction not timed), then timed on two passes over all captions
in batches: the cold pass starts with empty caches (both cache BPE results), the warm pass repeats it
on the same instance (best of `repeats`), as in a second training epoch. Both ratios are printed;
the headline `ratio` is the cold one, the less flattering of the two.
"""

from __future__ import annotations

import argparse
import csv
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _results
from _openclip import DATA, import_open_clip

CAPTIONS = DATA / "flickr8k" / "captions.csv"


def _load_captions(path: Path) -> list[str]:
    with path.open(newline="", encoding="utf-8") as f:
        return [row["caption"] for row in csv.DictReader(f)]


def _tokenize_all(tokenizer: Callable, texts: Sequence[str], batch_size: int) -> tuple[torch.Tensor, float]:
    start = time.perf_counter()
    out = torch.cat([tokenizer(list(texts[i : i + batch_size])) for i in range(0, len(texts), batch_size)])
    return out, time.perf_counter() - start


def _measure(make_tokenizer: Callable, texts: Sequence[str], batch_size: int, repeats: int) -> dict:
    tokenizer = make_tokenizer()
    ids, cold = _tokenize_all(tokenizer, texts, batch_size)
    warm = min(_tokenize_all(tokenizer, texts, batch_size)[1] for _ in range(repeats))
    return {"ids": ids, "cold_s": cold, "warm_s": warm,
            "cold_captions_per_s": len(texts) / cold, "warm_captions_per_s": len(texts) / warm}


def run(batch_size: int = 1024, repeats: int = 3) -> dict:
    """Throughput of both tokenizers on the Flickr8k captions; {"skipped": reason} without the data."""
    if not CAPTIONS.is_file():
        return {"skipped": f"{CAPTIONS} not found (../shared/data beside the repository is absent)"}
    open_clip = import_open_clip()
    from clipforge.tokenizer import Tokenizer

    texts = _load_captions(CAPTIONS)
    ours = _measure(Tokenizer, texts, batch_size, repeats)
    theirs = _measure(open_clip.tokenizer.SimpleTokenizer, texts, batch_size, repeats)
    mismatched_rows = int((ours["ids"] != theirs["ids"]).any(dim=1).sum())
    result = {
        "benchmark": "tokenizer",
        "captions": len(texts),
        "batch_size": batch_size,
        "identical_ids": mismatched_rows == 0,
        "mismatched_rows": mismatched_rows,
        "open_clip_version": open_clip.__version__,
    }
    for name, figures in (("clipforge", ours), ("open_clip", theirs)):
        for key in ("cold_s", "warm_s", "cold_captions_per_s", "warm_captions_per_s"):
            result[f"{name}_{key}"] = round(figures[key], 1 if "per_s" in key else 4)
    result["cold_ratio"] = round(ours["cold_captions_per_s"] / theirs["cold_captions_per_s"], 2)
    result["warm_ratio"] = round(ours["warm_captions_per_s"] / theirs["warm_captions_per_s"], 2)
    result["ratio"] = result["cold_ratio"]
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch-size", type=int, default=1024)
    parser.add_argument("--repeats", type=int, default=3, help="warm passes; the best is reported")
    args = parser.parse_args()
    result = run(batch_size=args.batch_size, repeats=args.repeats)
    if "skipped" in result:
        print(f"SKIPPED: {result['skipped']}")
        _results.skip(result["skipped"])
        return
    print(f"Flickr8k captions: {result['captions']}, batch size {result['batch_size']}, "
          f"open_clip {result['open_clip_version']}")
    print(f"{'':12}{'cold captions/s':>18}{'warm captions/s':>18}")
    for name in ("clipforge", "open_clip"):
        print(f"{name:12}{result[f'{name}_cold_captions_per_s']:>18,.0f}{result[f'{name}_warm_captions_per_s']:>18,.0f}")
    print(f"ratio clipforge/open_clip: cold {result['cold_ratio']:.2f}x, warm {result['warm_ratio']:.2f}x "
          f"(headline: cold)")
    print(f"identical ids: {result['identical_ids']} ({result['mismatched_rows']} rows differ)")
    note = f"{result['captions']} Flickr8k captions, identical ids: {result['identical_ids']}"
    for key, case in (("cold", "cold pass (empty caches)"), ("warm", "warm pass (best of repeats)")):
        _results.record(case, result[f"clipforge_{key}_captions_per_s"], result[f"open_clip_{key}_captions_per_s"],
                        unit="captions/s", ratio=result[f"{key}_ratio"], note=note)
    if not result["identical_ids"]:
        raise SystemExit("token ids differ from open_clip's")


if __name__ == "__main__":
    main()
