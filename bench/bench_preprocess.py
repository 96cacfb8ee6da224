"""Preprocessing speed and parity: open_clip's eval transform vs clipforge's exact and fast modes.

Run with the bench venv: ``bench/.venv-openclip/bin/python bench/bench_preprocess.py [--flickr 1000]
[--large 60] [--repeats 3]``. Single process, one torch thread (a DataLoader worker's setting); each image is
decoded from its file and preprocessed.

1. 1,000 Flickr8k photos (128x128 JPEGs): images/s for open_clip, ours exact, ours fast; max abs diff
   of ours exact to open_clip.
2. Generated 640x480 and 1280x960 JPEGs (q=90), where fast mode's JPEG draft decode triggers: the same
   speeds, plus fast-vs-exact differences of the normalised tensors (mean/max abs diff, cosine).
   "mosaic" images tile 128x128 photos (real photo detail at full resolution); "upscaled" images are
   bicubic enlargements of one photo (smooth, detail-free content).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
import numpy as np
import torch
from PIL import Image

import _results
from _openclip import DATA, import_open_clip
from clipforge.transforms import PreprocessConfig, image_transform

SIZE = 224
N_FLICKR = 1000
N_LARGE = 60
REPEATS = 3


def _images_per_second(fn, paths: list[Path], repeats: int) -> float:
    """Best of `repeats` passes over paths (the first result is also a warm-up for caches)."""
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        for path in paths:
            fn(path)
        best = min(best, time.perf_counter() - start)
    return len(paths) / best


def _speeds(paths: list[Path], openclip_pre, exact, fast, repeats: int) -> dict[str, float]:
    speeds = {
        "open_clip": _images_per_second(lambda p: openclip_pre(Image.open(p)), paths, repeats),
        "ours_exact": _images_per_second(exact, paths, repeats),
        "ours_fast": _images_per_second(fast, paths, repeats),
    }
    speeds["exact_vs_open_clip"] = speeds["ours_exact"] / speeds["open_clip"]
    speeds["fast_vs_open_clip"] = speeds["ours_fast"] / speeds["open_clip"]
    speeds["fast_vs_exact"] = speeds["ours_fast"] / speeds["ours_exact"]
    return speeds


def _max_diff_to_open_clip(paths: list[Path], openclip_pre, exact) -> float:
    return max(float((openclip_pre(Image.open(p)) - exact(p)).abs().max()) for p in paths)


def _fast_vs_exact(paths: list[Path], exact, fast) -> dict[str, float]:
    mean_abs, max_abs, cosines = [], 0.0, []
    for path in paths:
        a, b = exact(path).flatten().double(), fast(path).flatten().double()
        diff = (a - b).abs()
        mean_abs.append(float(diff.mean()))
        max_abs = max(max_abs, float(diff.max()))
        cosines.append(float(torch.nn.functional.cosine_similarity(a, b, dim=0)))
    return {"mean_abs_diff": float(np.mean(mean_abs)), "max_abs_diff": max_abs,
            "cosine_mean": float(np.mean(cosines)), "cosine_min": float(np.min(cosines))}


def _make_large_jpegs(photos: list[Path], out_dir: Path, size: tuple[int, int], kind: str, n: int) -> list[Path]:
    """`n` JPEGs of `size`: mosaics of 128x128 photos, or one photo upscaled (bicubic)."""
    width, height = size
    paths = []
    for i in range(n):
        if kind == "mosaic":
            canvas = Image.new("RGB", (width, height))
            cols, rows = -(-width // 128), -(-height // 128)
            for k in range(cols * rows):
                tile = Image.open(photos[(i * cols * rows + k) % len(photos)]).convert("RGB")
                canvas.paste(tile.resize((128, 128)), ((k % cols) * 128, (k // cols) * 128))
        else:
            canvas = Image.open(photos[i]).convert("RGB").resize(size, Image.Resampling.BICUBIC)
        path = out_dir / f"{kind}_{width}x{height}_{i:03d}.jpg"
        canvas.save(path, quality=90)
        paths.append(path)
    return paths


def run(n_flickr: int = N_FLICKR, n_large: int = N_LARGE, repeats: int = REPEATS) -> dict:
    """All figures as a dict (``{"skipped": reason}`` without ../shared/data)."""
    image_dir = DATA / "flickr8k" / "images"
    if not image_dir.is_dir():
        reason = f"skipped: {image_dir} not found (real photos live in ../shared/data beside the repo)"
        print(reason)
        return {"skipped": reason}
    torch.set_num_threads(1)
    open_clip = import_open_clip()
    openclip_pre = open_clip.image_transform(SIZE, is_train=False)
    cfg = PreprocessConfig(image_size=SIZE)
    exact, fast = image_transform(cfg), image_transform(cfg, fast=True)
    photos = sorted(image_dir.glob("*.jpg"))[:n_flickr]
    if len(photos) < n_flickr:
        print(f"note: only {len(photos)} Flickr8k photos found")

    results: dict = {"torch_threads": 1, "flickr8k": {
        "images": len(photos),
        "max_abs_diff_exact_vs_open_clip": _max_diff_to_open_clip(photos, openclip_pre, exact),
        "fast_vs_exact": _fast_vs_exact(photos, exact, fast),
        "images_per_s": _speeds(photos, openclip_pre, exact, fast, repeats),
    }}
    with tempfile.TemporaryDirectory() as tmp:
        for size in ((640, 480), (1280, 960)):
            for kind in ("mosaic", "upscaled"):
                paths = _make_large_jpegs(photos, Path(tmp), size, kind, n_large)
                drafted = Image.open(paths[0])
                drafted.draft("RGB", (SIZE, SIZE))
                results[f"{kind}_{size[0]}x{size[1]}"] = {
                    "images": len(paths),
                    "draft_decodes_at": list(drafted.size),
                    "max_abs_diff_exact_vs_open_clip": _max_diff_to_open_clip(paths, openclip_pre, exact),
                    "fast_vs_exact": _fast_vs_exact(paths, exact, fast),
                    "images_per_s": _speeds(paths, openclip_pre, exact, fast, repeats),
                }
    _print(results)
    return results


def _print(results: dict) -> None:
    print(f"preprocessing to {SIZE}x{SIZE}, decode from file + transform, 1 process, 1 torch thread")
    header = (f"{'set':<18}{'n':>5}{'open_clip/s':>13}{'exact/s':>10}{'fast/s':>10}{'exact/oc':>10}"
              f"{'fast/oc':>9}{'maxdiff oc':>12}{'fast: mean|d|':>15}{'max|d|':>8}{'cos min':>10}")
    print(header)
    for name, r in results.items():
        if not isinstance(r, dict):
            continue
        s, f = r["images_per_s"], r["fast_vs_exact"]
        print(f"{name:<18}{r['images']:>5}{s['open_clip']:>13.0f}{s['ours_exact']:>10.0f}{s['ours_fast']:>10.0f}"
              f"{s['exact_vs_open_clip']:>10.2f}{s['fast_vs_open_clip']:>9.2f}"
              f"{r['max_abs_diff_exact_vs_open_clip']:>12.1e}{f['mean_abs_diff']:>15.4f}"
              f"{f['max_abs_diff']:>8.3f}{f['cosine_min']:>10.5f}")
    for name, r in results.items():
        if isinstance(r, dict) and "draft_decodes_at" in r:
            print(f"  {name}: fast mode decodes at {r['draft_decodes_at'][0]}x{r['draft_decodes_at'][1]}, "
                  f"cosine mean {r['fast_vs_exact']['cosine_mean']:.5f}")


def _record(results: dict) -> None:
    """The images/s of both modes against open_clip's, per image set, for bench/run_all.py."""
    for name, r in results.items():
        if not isinstance(r, dict):
            continue
        s = r["images_per_s"]
        _results.record(f"{name} ({r['images']} images), exact mode", s["ours_exact"], s["open_clip"],
                        unit="images/s", note=f"max |diff| to open_clip {r['max_abs_diff_exact_vs_open_clip']:.1e}")
        _results.record(f"{name} ({r['images']} images), fast mode", s["ours_fast"], s["open_clip"],
                        unit="images/s", note=f"cosine to exact mode: min {r['fast_vs_exact']['cosine_min']:.5f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--flickr", type=int, default=N_FLICKR, help="Flickr8k photos (default 1000)")
    parser.add_argument("--large", type=int, default=N_LARGE, help="generated large JPEGs per set (default 60)")
    parser.add_argument("--repeats", type=int, default=REPEATS, help="timed passes; the best is reported")
    args = parser.parse_args()
    results = run(args.flickr, args.large, args.repeats)
    if "skipped" in results:
        _results.skip(results["skipped"])
    else:
        _record(results)


if __name__ == "__main__":
    main()
