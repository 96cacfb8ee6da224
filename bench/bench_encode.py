"""ViT-B/32 encoding speed: clipforge vs open_clip 3.3.0 on the same weights and inputs, in one process.

    bench/.venv-openclip/bin/python bench/bench_encode.py [--repeats 5] [--threads N] [--batches 1,64]

Weights: one random ViT-B/32 (QuickGELU, as OpenAI trained it) built by clipforge and loaded into
open_clip's `ViT-B-32-quickgelu`, so both compute the same function. Inputs: random pixels and the
tokenised first Flickr8k captions (or generated sentences when the data is absent).
Rows: image and text encoding at batch 1 and 64; clipforge in fp32 and bf16 (`set_precision("bf16")`),
open_clip in fp32 and under bf16 autocast. Ratios are clipforge's items/s over open_clip fp32's, and the
cosine of each bf16 embedding to the fp32 one is printed (target >= 0.999). On a CPU without native bf16
(no AVX-512 BF16 / AMX) bf16 is emulated and slow: the script says so rather than hide it.
"""

from __future__ import annotations

import argparse
import csv
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _results
import clipforge
from _openclip import DATA, import_open_clip
from clipforge.model import cpu_has_native_bf16


def _captions(n: int) -> list[str]:
    path = DATA / "flickr8k" / "captions.csv"
    if path.exists():
        with path.open(newline="", encoding="utf-8") as f:
            return [row["caption"] for _, row in zip(range(n), csv.DictReader(f), strict=False)]
    return [f"a photo of {i} dogs playing with a red ball on the grass near the river" for i in range(n)]


def _interleaved_rates(fns: dict[str, Callable[[], torch.Tensor]], batch: int,
                       repeats: int) -> tuple[dict[str, float], dict[str, torch.Tensor]]:
    """Best-of-`repeats` items/s of each function, after one warm-up call each, and their last outputs.

    The functions take turns within each repeat, so a slow spell of a shared machine falls on all of them
    rather than on whichever happened to be running, and the ratios stay steady between runs."""
    outputs = {name: fn() for name, fn in fns.items()}
    best = dict.fromkeys(fns, float("inf"))
    for _ in range(repeats):
        for name, fn in fns.items():
            start = time.perf_counter()
            outputs[name] = fn()
            best[name] = min(best[name], time.perf_counter() - start)
    return {name: batch / seconds for name, seconds in best.items()}, outputs


def _models():
    open_clip = import_open_clip()
    torch.manual_seed(0)
    ours = clipforge.create_model("ViT-B-32").eval()
    theirs = open_clip.create_model("ViT-B-32-quickgelu", pretrained=None).eval()
    missing, unexpected = theirs.load_state_dict(ours.state_dict(), strict=False)
    if [k for k in missing if k != "attn_mask"] or unexpected:
        raise SystemExit(f"state dicts differ: missing {missing[:3]}, unexpected {unexpected[:3]}")
    ours_bf16 = clipforge.create_model("ViT-B-32").eval()
    ours_bf16.load_state_dict(ours.state_dict())
    ours_bf16.set_precision("bf16")
    return ours, ours_bf16, theirs


def _cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    return F.cosine_similarity(a.float(), b.float(), dim=-1).min().item()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--batches", default="1,64", help="comma-separated batch sizes (default 1,64)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    ours, ours_bf16, theirs = _models()
    tokenizer = clipforge.tokenize
    print(f"torch {torch.__version__}, {args.threads} threads, native CPU bf16: {cpu_has_native_bf16()}")
    print(f"{'input':<14}{'batch':>6}{'open_clip fp32':>16}{'ours fp32':>12}{'ratio':>7}"
          f"{'open_clip bf16':>16}{'ours bf16':>12}{'ratio':>7}{'cos bf16':>10}{'max|d| fp32':>13}")
    for batch in (int(b) for b in args.batches.split(",")):
        images = torch.randn(batch, 3, 224, 224, generator=torch.Generator().manual_seed(batch))
        ids = tokenizer(_captions(batch))
        for kind, x, ours_fn, theirs_fn in (
            ("image", images, ours.encode_image, theirs.encode_image),
            ("text", ids, ours.encode_text, theirs.encode_text),
        ):
            # A batch-1 call takes tens of milliseconds, where one scheduler hiccup shows: more repeats.
            repeats = args.repeats * (5 if batch == 1 else 1)
            _row(kind, batch, x, ours_fn, theirs_fn, getattr(ours_bf16, f"encode_{kind}"), repeats)


@torch.inference_mode()
def _row(kind, batch, x, ours_fn, theirs_fn, ours_bf16_fn, repeats) -> None:
    def theirs_autocast():
        with torch.autocast("cpu", dtype=torch.bfloat16):
            return theirs_fn(x)

    rates, outs = _interleaved_rates({"theirs": lambda: theirs_fn(x), "ours": lambda: ours_fn(x),
                                      "theirs16": theirs_autocast, "ours16": lambda: ours_bf16_fn(x)},
                                     batch, repeats)
    ref_rate, rate, ref16_rate, rate16 = rates["theirs"], rates["ours"], rates["theirs16"], rates["ours16"]
    ref, out, out16 = outs["theirs"], outs["ours"], outs["ours16"]
    diff = (out - ref).abs().max().item()
    cosine = _cosine(out16, out)
    print(f"{kind:<14}{batch:>6}{ref_rate:>16.1f}{rate:>12.1f}{rate / ref_rate:>7.2f}"
          f"{ref16_rate:>16.1f}{rate16:>12.1f}{rate16 / ref_rate:>7.2f}{cosine:>10.5f}{diff:>13.2e}")
    _results.record(f"{kind} batch {batch}, fp32", rate, ref_rate, unit=f"{kind}s/s",
                    note=f"max |diff| to open_clip {diff:.2e}")
    _results.record(f"{kind} batch {batch}, bf16 (open_clip: bf16 autocast)", rate16, ref16_rate, unit=f"{kind}s/s",
                    note=f"cosine to fp32 {cosine:.5f}; vs open_clip fp32 {rate16 / ref_rate:.2f}x; "
                         f"native CPU bf16: {cpu_has_native_bf16()}")


if __name__ == "__main__":
    main()
