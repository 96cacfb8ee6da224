"""Evaluation metrics timing: chunked retrieval ranks vs a naive full-matrix top-K, and the linear probe.

    .venv/bin/python bench/bench_eval.py [--images 5000] [--captions-per-image 5] [--dim 512] [--repeats 3]
                                         [--threads N]

Retrieval: 5,000 images x 25,000 captions (E=512, fp32, L2-normalised, synthetic with realistic recall).
clipforge's `retrieval_metrics` computes exact ranks (ties against the model) in both directions, block by
block; the reference is the naive way, as CLIP_benchmark does it: the full [25,000 x 5,000] score matrix at
once, then top-K in both directions (recall only, no ranks). Both report the same recall.

Linear probe: 10,000 x 512 train features in 10 classes (plus 2,000 test), full weight-decay sweep
(coarse grid + refinement), retrain on all train features, test metrics. Timings are best of `repeats`
(the probe: one run, including torch's one-time import of its optimizer machinery). Needs no data
files. CPU seconds are printed beside wall seconds: on a busy machine the wall time mostly measures
waiting for a core, and with 1 thread the CPU time is the work itself.
"""

from __future__ import annotations

import argparse
import os
import time
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F

import _results
from clipforge.eval.probe import linear_probe
from clipforge.eval.retrieval import retrieval_metrics

KS = (1, 5, 10)


def _retrieval_data(n_images: int, per_image: int, dim: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    images = F.normalize(torch.randn(n_images, dim, generator=g), dim=1)
    text_to_image = torch.arange(n_images).repeat_interleave(per_image)
    # Captions near their image, noisy enough for recall@1 of about 0.5 (text -> image) and 0.9
    # (image -> text), the range CLIP models reach on Flickr30k.
    noise = torch.randn(len(text_to_image), dim, generator=g) * (6.0 / dim**0.5)
    texts = F.normalize(images[text_to_image] + noise, dim=1)
    return images, texts, text_to_image


def naive_recall(images: torch.Tensor, texts: torch.Tensor, text_to_image: torch.Tensor,
                 ks=KS) -> dict[str, float]:
    """Full score matrix, then top-K indices per query; hits by index lookup (no rank, no tie rule)."""
    scores = texts @ images.T  # [N_txt, N_img]
    top_images = scores.topk(max(ks), dim=1).indices
    top_texts = scores.T.topk(max(ks), dim=1).indices
    image_ids = torch.arange(len(images))[:, None]
    out = {}
    for k in ks:
        out[f"image_retrieval_recall@{k}"] = (top_images[:, :k] == text_to_image[:, None]).any(1).double().mean().item()
        out[f"text_retrieval_recall@{k}"] = (text_to_image[top_texts[:, :k]] == image_ids).any(1).double().mean().item()
    return out


def _timed(fn: Callable[[], Any]) -> tuple[Any, float, float]:
    """Result, wall seconds and CPU seconds (all threads): on a shared machine the CPU time shows the work
    done when the wall time is inflated by other processes."""
    wall, cpu = time.perf_counter(), time.process_time()
    result = fn()
    return result, time.perf_counter() - wall, time.process_time() - cpu


def _best_of(fn: Callable[[], Any], repeats: int) -> tuple[Any, float, float]:
    runs = [_timed(fn) for _ in range(repeats)]
    return min(runs, key=lambda run: run[1])


def _probe_data(n: int, num_classes: int, dim: int, seed: int):
    g = torch.Generator().manual_seed(1000)  # class centres shared by train and test
    centres = F.normalize(torch.randn(num_classes, dim, generator=g), dim=1)
    g = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, num_classes, (n,), generator=g)
    noise = torch.randn(n, dim, generator=g) * (6.0 / dim**0.5)
    return F.normalize(0.6 * centres[labels] + noise, dim=1), labels


def run(n_images: int = 5000, per_image: int = 5, dim: int = 512, repeats: int = 3,
        probe_train: int = 10_000, probe_classes: int = 10) -> dict[str, Any]:
    images, texts, t2i = _retrieval_data(n_images, per_image, dim)
    ours, ours_s, ours_cpu = _best_of(lambda: retrieval_metrics(images, texts, t2i, ks=KS), repeats)
    naive, naive_s, naive_cpu = _best_of(lambda: naive_recall(images, texts, t2i), repeats)
    max_recall_diff = max(abs(ours[k] - naive[k]) for k in naive)

    x_train, y_train = _probe_data(probe_train, probe_classes, dim, seed=1)
    x_test, y_test = _probe_data(2000, probe_classes, dim, seed=2)
    probe, probe_s, probe_cpu = _timed(lambda: linear_probe(x_train, y_train, x_test, y_test))
    return {
        "threads": torch.get_num_threads(),
        "load_average_1min": round(os.getloadavg()[0], 2),
        "retrieval_shape": f"{len(texts)} captions x {len(images)} images, E={dim}",
        "retrieval_s": round(ours_s, 3),
        "retrieval_cpu_s": round(ours_cpu, 3),
        "naive_full_matrix_s": round(naive_s, 3),
        "naive_full_matrix_cpu_s": round(naive_cpu, 3),
        "retrieval_speed_ratio": round(naive_s / ours_s, 2),
        "peak_block_mib": round(2 * 4 * max(64, (1 << 24) // len(images)) * len(images) / 2**20, 1),
        "naive_matrix_mib": round(4 * len(texts) * len(images) / 2**20, 1),
        "recall": {k: round(v, 4) for k, v in ours.items() if "recall" in k},
        "max_recall_diff_vs_naive": max_recall_diff,
        "probe_shape": f"{probe_train} x {dim}, {probe_classes} classes, 2000 test",
        "probe_s": round(probe_s, 2),
        "probe_cpu_s": round(probe_cpu, 2),
        "probe_fits": len(probe["weight_decay_sweep"]) + 1,
        "probe_weight_decay": probe["weight_decay"],
        "probe_acc1": round(probe["acc1"], 4),
        "probe_mean_per_class_recall": round(probe["mean_per_class_recall"], 4),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=5000)
    parser.add_argument("--captions-per-image", type=int, default=5)
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--repeats", type=int, default=3, help="retrieval timings: best of this many runs")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    r = run(args.images, args.captions_per_image, args.dim, args.repeats)
    print(f"torch threads: {r['threads']}, load average before the probe: {r['load_average_1min']}")
    print(f"retrieval {r['retrieval_shape']} (wall s best of {args.repeats}, CPU s of that run):")
    print(f"  clipforge retrieval_metrics (exact ranks, both directions): {r['retrieval_s']:.3f} s "
          f"(CPU {r['retrieval_cpu_s']:.2f} s; score blocks {r['peak_block_mib']} MiB)")
    print(f"  naive full matrix + top-K (recall only): {r['naive_full_matrix_s']:.3f} s "
          f"(CPU {r['naive_full_matrix_cpu_s']:.2f} s; score matrix {r['naive_matrix_mib']} MiB)")
    print(f"  ratio naive/clipforge: {r['retrieval_speed_ratio']:.2f}x; recall {r['recall']}; "
          f"max recall difference {r['max_recall_diff_vs_naive']:.2g}")
    print(f"linear probe {r['probe_shape']}: {r['probe_s']:.2f} s (CPU {r['probe_cpu_s']:.2f} s) for "
          f"{r['probe_fits']} fits (weight decay {r['probe_weight_decay']:.3g}), test acc1 {r['probe_acc1']}, "
          f"mean per-class recall {r['probe_mean_per_class_recall']}")
    _results.record(f"retrieval metrics, {r['retrieval_shape']}", r["retrieval_s"], r["naive_full_matrix_s"], unit="s",
                    better="lower", reference_name="naive full matrix + top-K",
                    note=f"CPU s {r['retrieval_cpu_s']} vs {r['naive_full_matrix_cpu_s']}; exact ranks both ways; "
                         f"max recall difference {r['max_recall_diff_vs_naive']:.2g}")
    _results.record(f"linear probe, {r['probe_shape']}", r["probe_s"], unit="s", better="lower",
                    note=f"{r['probe_fits']} fits; CPU s {r['probe_cpu_s']}; test acc1 {r['probe_acc1']}")


if __name__ == "__main__":
    main()
