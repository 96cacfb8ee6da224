"""Zero-shot classification of real photos: clipforge's default path vs the straightforward open_clip loop.

Run with the bench venv: ``bench/.venv-openclip/bin/python bench/bench_classify.py [N]`` (N images, default
1,000, taken evenly from the 5 flower classes of ../shared/data/flowers).

Both sides hold the same randomly initialised ViT-B/32 weights (clipforge's ``create_model("ViT-B-32")``,
loaded into open_clip's ``ViT-B-32-quickgelu``) and the same class prompts (the CLI's default templates).

- clipforge default: what ``clipforge classify`` does: ``auto_precision()`` (bf16 on CPUs with native bf16),
  fast preprocessing, ``zero_shot_classifier`` + ``classify`` with their default batch size and workers.
- clipforge exact: the same calls in fp32 with the exact preprocessing (open_clip's numbers).
- open_clip: its eval transform, a torch DataLoader (batch 64, 2 workers), fp32 ``encode_image``, softmax of
  ``logit_scale.exp() * sims`` against ``build_zero_shot_classifier``'s weights.

Timed: the image side (decode + preprocess + encode + score), after a one-batch warm-up, in chunks of 200
images that alternate between the three paths (so that a change in machine load hits all of them alike);
the class weights are built once per side and timed separately. Reported: images/s, ratios to open_clip,
and the share of images whose top-1 label equals open_clip's. With random weights the class scores are close
together, so top-1 agreement is a strict test of numerical closeness, not of accuracy.
"""

from __future__ import annotations

import csv
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset

import _results
from _openclip import DATA, import_open_clip
from clipforge import create_model
from clipforge.model import auto_precision
from clipforge.tokenizer import Tokenizer
from clipforge.transforms import PreprocessConfig, image_transform
from clipforge.zeroshot import classify, load_templates, zero_shot_classifier

DEFAULT_IMAGES = 1000
TEMPLATES = "simple"  # the CLI's default
BATCH = 64
OPENCLIP_WORKERS = 2
CHUNK = 200  # images per interleaved timing chunk


def _flower_photos(limit: int) -> tuple[list[Path], list[str], list[str]]:
    """Up to `limit` photos taken round-robin over the classes (so every class is represented), their
    labels, and the sorted class names."""
    folder = DATA / "flowers"
    with open(folder / "labels.csv", newline="", encoding="utf-8") as handle:
        rows = sorted((row["label"], row["image"]) for row in csv.DictReader(handle))
    classes = sorted({label for label, _ in rows})
    per_class = {c: [folder / "images" / image for label, image in rows if label == c] for c in classes}
    picked: list[tuple[Path, str]] = []
    for i in range(max(len(v) for v in per_class.values())):
        picked += [(per_class[c][i], c) for c in classes if i < len(per_class[c])]
    picked = picked[:limit]
    return [p for p, _ in picked], [c for _, c in picked], classes


class _Files(Dataset):
    def __init__(self, paths: list[Path], preprocess) -> None:
        self.paths, self.preprocess = paths, preprocess

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> torch.Tensor:
        return self.preprocess(Image.open(self.paths[index]))


@torch.inference_mode()
def _open_clip_top1(model, preprocess, weights: torch.Tensor, paths: list[Path]) -> tuple[torch.Tensor, float]:
    """(top-1 class per image, seconds): the plain open_clip evaluation loop."""
    loader = DataLoader(_Files(paths, preprocess), batch_size=BATCH, num_workers=OPENCLIP_WORKERS)
    start = time.perf_counter()
    tops = []
    for pixels in loader:
        feats = model.encode_image(pixels)
        feats = feats / feats.norm(dim=-1, keepdim=True)
        tops.append((model.logit_scale.exp() * feats @ weights).softmax(dim=-1).argmax(dim=-1))
    return torch.cat(tops), time.perf_counter() - start


def _clipforge_top1(model, preprocess, weights: torch.Tensor, paths: list[Path],
                    classes: list[str]) -> tuple[torch.Tensor, float]:
    """(top-1 class per image, seconds): `classify` with its defaults."""
    start = time.perf_counter()
    result = classify(model, preprocess, [str(p) for p in paths], weights, classes, top_k=1, progress=False)
    seconds = time.perf_counter() - start
    if result.failures:
        raise RuntimeError(f"clipforge could not read {result.failures[:3]}")
    return result.probs.argmax(dim=-1), seconds


def _timed(fn, *args):
    start = time.perf_counter()
    out = fn(*args)
    return out, time.perf_counter() - start


def _clipforge_side(reference, precision: str, fast: bool, classes: list[str], templates: list[str]) -> dict:
    """A clipforge model with the reference weights, its preprocessing and class weights (timed)."""
    model = create_model("ViT-B-32").eval()
    model.load_state_dict(reference.state_dict())
    model.set_precision(precision)
    preprocess = image_transform(PreprocessConfig(image_size=224), fast=fast)
    weights, text_s = _timed(zero_shot_classifier, model, Tokenizer(77), classes, templates, 256, False)
    return {"model": model, "preprocess": preprocess, "weights": weights, "class_weights_s": text_s,
            "precision": precision, "fast_preprocess": fast}


def run(limit: int = DEFAULT_IMAGES) -> dict:
    """All figures as a dict (``{"skipped": reason}`` without ../shared/data)."""
    if not (DATA / "flowers" / "labels.csv").is_file():
        reason = f"skipped: {DATA / 'flowers'} not found (real photos live in ../shared/data beside the repo)"
        print(reason)
        _results.skip(reason)
        return {"skipped": reason}
    open_clip = import_open_clip()
    paths, _, classes = _flower_photos(limit)
    templates = load_templates(TEMPLATES)

    torch.manual_seed(0)
    reference = create_model("ViT-B-32").eval()
    theirs = open_clip.create_model("ViT-B-32-quickgelu")
    theirs.load_state_dict(reference.state_dict())
    theirs.eval()
    oc_preprocess = open_clip.image_transform(224, is_train=False)
    oc_weights, oc_text_s = _timed(open_clip.build_zero_shot_classifier, theirs,
                                   open_clip.get_tokenizer("ViT-B-32-quickgelu"), classes, templates)
    sides = {"clipforge_default": _clipforge_side(reference, auto_precision(), True, classes, templates),
             "clipforge_exact": _clipforge_side(reference, "fp32", False, classes, templates)}
    runners = {"open_clip": lambda chunk: _open_clip_top1(theirs, oc_preprocess, oc_weights, chunk)}
    for name, side in sides.items():
        runners[name] = lambda chunk, s=side: _clipforge_top1(s["model"], s["preprocess"], s["weights"], chunk,
                                                              classes)
    for run_chunk in runners.values():
        run_chunk(paths[:BATCH])  # warm-up
    # Interleaved chunks, the order rotating, so that a change in machine load hits every side alike.
    seconds = dict.fromkeys(runners, 0.0)
    tops: dict[str, list[torch.Tensor]] = {name: [] for name in runners}
    names = list(runners)
    for k, start in enumerate(range(0, len(paths), CHUNK)):
        for name in names[k % 3:] + names[:k % 3]:
            top1, s = runners[name](paths[start:start + CHUNK])
            tops[name].append(top1)
            seconds[name] += s
    oc_top1 = torch.cat(tops["open_clip"])
    results = {"images": len(paths), "classes": classes, "templates": f"{TEMPLATES} ({len(templates)})",
               "torch_threads": torch.get_num_threads(),
               "open_clip": {"images_per_s": len(paths) / seconds["open_clip"], "class_weights_s": oc_text_s}}
    for name, side in sides.items():
        results[name] = {
            "precision": side["precision"], "fast_preprocess": side["fast_preprocess"],
            "images_per_s": len(paths) / seconds[name], "vs_open_clip": seconds["open_clip"] / seconds[name],
            "class_weights_s": side["class_weights_s"],
            "class_weights_max_abs_diff": float((side["weights"] - oc_weights).abs().max()),
            "top1_same_as_open_clip_pct": 100 * float((torch.cat(tops[name]) == oc_top1).float().mean()),
        }
    _print(results)
    oc_rate = results["open_clip"]["images_per_s"]
    for name in ("clipforge_default", "clipforge_exact"):
        r = results[name]
        mode = "default (auto precision, fast preprocess)" if name == "clipforge_default" else "exact (fp32)"
        _results.record(f"{results['images']} flower photos, clipforge {mode}", r["images_per_s"], oc_rate,
                        unit="images/s", ratio=r["vs_open_clip"],
                        note=f"{r['precision']}; top-1 same as open_clip {r['top1_same_as_open_clip_pct']:.1f} %")
    return results


def _print(results: dict) -> None:
    print(f"zero-shot classification, ViT-B/32 (random init, same weights), {results['images']} flower photos, "
          f"{len(results['classes'])} classes, templates {results['templates']}, {results['torch_threads']} "
          "torch threads")
    oc = results["open_clip"]
    print(f"{'path':<20}{'precision':>10}{'images/s':>10}{'vs oc':>8}{'top-1 = oc':>12}{'weights s':>11}"
          f"{'max|dW|':>10}")
    print(f"{'open_clip':<20}{'fp32':>10}{oc['images_per_s']:>10.1f}{1.0:>8.2f}{'-':>12}{oc['class_weights_s']:>11.2f}"
          f"{'-':>10}")
    for name in ("clipforge_default", "clipforge_exact"):
        r = results[name]
        print(f"{name:<20}{r['precision']:>10}{r['images_per_s']:>10.1f}{r['vs_open_clip']:>8.2f}"
              f"{r['top1_same_as_open_clip_pct']:>11.1f}%{r['class_weights_s']:>11.2f}"
              f"{r['class_weights_max_abs_diff']:>10.1e}")


if __name__ == "__main__":
    run(int(sys.argv[1]) if len(sys.argv) > 1 else DEFAULT_IMAGES)
