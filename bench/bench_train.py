"""Flickr8k training recipe on CPU, and the training step against open_clip's.

    .venv/bin/python bench/bench_train.py recipe [--minutes M] [--output runs/flickr8k-bench]
    bench/.venv-openclip/bin/python bench/bench_train.py step [--steps 20] [--threads 2]

`recipe` trains `recipes/flickr8k-cpu.yaml` from scratch on ../shared/data/flickr8k split `train` for its 14.5
minutes of training (with the final validation and save: 15 minutes; the cosine schedule follows the clock),
then prints dev Recall@1/5/10 both ways, samples/s, the peak RSS, and the ratio of dev R@10 to open_clip's own
trainer given the same data and 15 minutes (three pilot runs, ResNet-18 at 68 px, 4x256 text tower, bf16, batch
128: text->image R@10 15.2 %, image->text 13.9 %; the target is 1.5x both). The train/dev tables
(image_path,caption) are written to a temporary folder. `recipe` does not use open_clip: run it with the
project's venv (in the bench venv the trainer cannot load, as Lightning imports torchvision).

`step` times one training step (forward, loss, backward, clip, AdamW, temperature clamp) of the recipe's model
on 128 Flickr8k captions and random pixels, in clipforge and in open_clip 3.3.0 (the same architecture: OpenAI's
ResNet [1,1,1,1]x32 at the recipe's image size, 96 px, and the recipe's text tower, 256 wide, context 32; bf16
autocast where the CPU has native bf16, else fp32),
each in its own process so that its peak RSS is its own, and prints samples/s and peak RSS with the ratios
(targets: >= 1.2x samples/s, no more memory). clipforge gets the token ids as its collate makes them (padding
columns no caption uses are cut), open_clip as its own data pipeline makes them (the full context).
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _results
from _openclip import DATA

ROOT = Path(__file__).resolve().parents[1]
RECIPE = ROOT / "recipes" / "flickr8k-cpu.yaml"
OPEN_CLIP_R10 = {"image_retrieval_recall@10": 0.152, "text_retrieval_recall@10": 0.139}  # 15 min, 2-core CPU
OPEN_CLIP_TRAINER = "open_clip's trainer, 15-minute pilot runs"


def write_tables(folder: Path) -> tuple[Path, Path]:
    """train.csv and dev.csv (image_path,caption; absolute paths) from Flickr8k's captions.csv."""
    source = DATA / "flickr8k"
    if not (source / "captions.csv").is_file():
        _results.skip(f"{source} not found (real photos live in ../shared/data beside the repo)")
        raise SystemExit(f"Flickr8k not found at {source}")
    with (source / "captions.csv").open(newline="", encoding="utf-8") as handle:
        rows = list(csv.DictReader(handle))
    out = {}
    for split in ("train", "dev"):
        out[split] = folder / f"{split}.csv"
        with out[split].open("w", newline="", encoding="utf-8") as handle:
            writer = csv.writer(handle)
            writer.writerow(["image_path", "caption"])
            writer.writerows([str(source / "images" / r["image"]), r["caption"]] for r in rows if r["split"] == split)
    return out["train"], out["dev"]


def run_recipe(minutes: float | None, output: Path, extra: list[str]) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        train_csv, dev_csv = write_tables(Path(tmp))
        command = [sys.executable, "-m", "clipforge.cli.train", "--config", str(RECIPE), "--train-data",
                   str(train_csv), "--val-data", str(dev_csv), "--output", str(output),
                   *(["--max-minutes", str(minutes)] if minutes else []), *extra]
        print("$", " ".join(command), flush=True)
        started = time.perf_counter()
        subprocess.run(command, check=True)
        wall = time.perf_counter() - started
    peak_mib = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
    summary = json.loads((output / "summary.json").read_text())
    with (output / "logs" / "metrics.csv").open(newline="") as handle:
        speeds = [float(r["samples_per_sec"]) for r in csv.DictReader(handle) if r.get("samples_per_sec")]
    val = summary["validation"]
    print(f"\nsteps {summary['steps']}, training {summary['train_seconds']:.0f} s, whole command {wall:.0f} s, "
          f"precision {summary['precision']}")
    print(f"samples/s (median of logged windows): {statistics.median(speeds):.1f}; peak RSS {peak_mib:.0f} MiB")
    for direction, name in (("image", "text->image"), ("text", "image->text")):
        recalls = " / ".join(f"{100 * val[f'{direction}_retrieval_recall@{k}']:.1f}" for k in (1, 5, 10))
        ratio = val[f"{direction}_retrieval_recall@10"] / OPEN_CLIP_R10[f"{direction}_retrieval_recall@10"]
        print(f"dev {name} R@1/5/10 = {recalls} %   R@10 vs open_clip: {ratio:.2f}x (target 1.5x)")
        _results.record(f"Flickr8k dev {name} R@10 after {summary['train_seconds'] / 60:.1f} min of training",
                        100 * val[f"{direction}_retrieval_recall@10"],
                        100 * OPEN_CLIP_R10[f"{direction}_retrieval_recall@10"], unit="%",
                        reference_name=OPEN_CLIP_TRAINER, note=f"R@1/5/10 {recalls} %; target 1.5x")
    _results.record(f"recipe training throughput ({summary['precision']})", statistics.median(speeds),
                    unit="samples/s", note=f"{summary['steps']} steps; median of logged windows")
    _results.record("recipe peak RSS (training command)", peak_mib, unit="MiB", better="lower")


# ----------------------------------------------------------------------------------------------- step


def _caption_ids(n: int):
    """Token ids [n, 32] of the first n Flickr8k training captions (or of generated ones without the data)."""
    from clipforge.tokenizer import Tokenizer

    path = DATA / "flickr8k" / "captions.csv"
    if path.is_file():
        with path.open(newline="", encoding="utf-8") as handle:
            captions = [row["caption"] for row in csv.DictReader(handle)][:n]
    else:
        captions = [f"a dog number {i} runs after a red ball on the green grass" for i in range(n)]
    return Tokenizer(32)(captions)


def _step_worker(framework: str, steps: int, threads: int, batch: int) -> dict:
    """Runs in its own process: samples/s of `steps` training steps (after 3 warm-up steps)."""
    import torch

    from _openclip import import_open_clip

    torch.set_num_threads(threads)
    # Both processes import open_clip: in the bench venv it also makes torchvision (imported by torchmetrics,
    # which Lightning imports) loadable beside the CPU torch.
    import_open_clip()
    from clipforge.model import cpu_has_native_bf16
    from clipforge.train.config import load_config

    bf16 = cpu_has_native_bf16()
    size = load_config(RECIPE).model.image_size or 64  # both models at the recipe's resolution
    torch.manual_seed(0)
    images = torch.randn(batch, 3, size, size)
    texts = _caption_ids(batch)
    if framework == "clipforge":
        from clipforge.data.loading import trim_padding
        from clipforge.train.config import LossConfig, OptimConfig
        from clipforge.train.models import build_model
        from clipforge.train.module import CLIPTrainingModule

        texts = trim_padding(texts)  # what clipforge's collate hands the model: no all-padding columns
        model = build_model(load_config(RECIPE).model)[0]
        module = CLIPTrainingModule(model, OptimConfig(), LossConfig())
        optimizer = module.configure_optimizers()

        def loss_fn():
            return module.compute_loss(*module.encode(images, texts))
        params, scale = list(module.parameters()), model.logit_scale
    else:
        from open_clip.loss import ClipLoss
        from open_clip.model import CLIP, CLIPTextCfg, CLIPVisionCfg

        from clipforge.model import get_model_config

        recipe = load_config(RECIPE).model
        text_layers = recipe.text_layers or get_model_config(recipe.arch).text.layers
        model = CLIP(256, CLIPVisionCfg(layers=(1, 1, 1, 1), width=32, image_size=size),
                     CLIPTextCfg(context_length=32, vocab_size=49408, width=256, heads=4, layers=text_layers),
                     output_dict=True)
        model.train()
        criterion = ClipLoss()
        decay = [p for n, p in model.named_parameters() if p.ndim >= 2 and "positional" not in n]
        rest = [p for n, p in model.named_parameters() if not (p.ndim >= 2 and "positional" not in n)]
        optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": 0.2}, {"params": rest, "weight_decay": 0}],
                                      lr=1e-3, betas=(0.9, 0.98), eps=1e-6)

        def loss_fn():
            out = model(images, texts)
            return criterion(out["image_features"], out["text_features"], out["logit_scale"])
        params, scale = list(model.parameters()), model.logit_scale

    def step():
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            loss = loss_fn()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        with torch.no_grad():
            scale.clamp_(0, 4.6052)

    for _ in range(3):
        step()
    started = time.perf_counter()
    for _ in range(steps):
        step()
    seconds = time.perf_counter() - started
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return {"framework": framework, "samples_per_sec": batch * steps / seconds, "peak_rss_mib": peak,
            "precision": "bf16 autocast" if bf16 else "fp32"}


def run_step(steps: int, threads: int, batch: int) -> None:
    results = {}
    for framework in ("clipforge", "open_clip"):
        out = subprocess.run([sys.executable, __file__, "_step", framework, str(steps), str(threads), str(batch)],
                             check=True, capture_output=True, text=True).stdout
        results[framework] = json.loads(out.strip().splitlines()[-1])
    ours, theirs = results["clipforge"], results["open_clip"]
    print(f"training step, batch {batch}, {threads} thread(s), {ours['precision']}:")
    for r in (ours, theirs):
        print(f"  {r['framework']:<10} {r['samples_per_sec']:7.1f} samples/s   peak RSS {r['peak_rss_mib']:6.0f} MiB")
    print(f"  ratio: {ours['samples_per_sec'] / theirs['samples_per_sec']:.2f}x samples/s (target >= 1.2), "
          f"{ours['peak_rss_mib'] / theirs['peak_rss_mib']:.2f}x peak RSS (target <= 1.0)")
    case = f"batch {batch}, {threads} thread(s), {ours['precision']}"
    _results.record(f"training step, {case}", ours["samples_per_sec"], theirs["samples_per_sec"],
                    unit="samples/s", note=f"{steps} timed steps; target >= 1.2x")
    _results.record(f"training step peak RSS, {case}", ours["peak_rss_mib"], theirs["peak_rss_mib"], unit="MiB",
                    better="lower", note="each framework in its own process; target <= 1.0x")


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "_step":
        framework, steps, threads, batch = sys.argv[2], *map(int, sys.argv[3:6])
        print(json.dumps(_step_worker(framework, steps, threads, batch)))
        return
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="what")
    recipe = sub.add_parser("recipe")
    recipe.add_argument("--minutes", type=float, help="training wall time (default: the recipe's 14.5 minutes)")
    recipe.add_argument("--output", type=Path, default=ROOT / "runs" / "flickr8k-bench")
    recipe.add_argument("--set", action="append", default=[], help="extra config overrides (section.key=value)")
    recipe.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)),
                        help="torch threads (default: every core; the recipe's `auto` would read a busy machine "
                             "from the load that the benchmarks run just before leave behind)")
    step = sub.add_parser("step")
    step.add_argument("--steps", type=int, default=20)
    step.add_argument("--threads", type=int, default=2)
    step.add_argument("--batch", type=int, default=128)
    args = parser.parse_args()
    if args.what == "recipe":
        overrides = [f"run.threads={args.threads}", *args.set]
        run_recipe(args.minutes, args.output, [arg for item in overrides for arg in ("--set", item)])
    else:  # the default, so that `make bench` runs something short
        run_step(getattr(args, "steps", 20), getattr(args, "threads", 2), getattr(args, "batch", 128))


if __name__ == "__main__":
    main()
