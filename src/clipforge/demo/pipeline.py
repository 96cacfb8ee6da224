"""`clipforge demo`: the whole system on this machine, with no data and no network.

Generate a captioned scene data set, train a small CLIP on it with the demo recipe, evaluate retrieval and
zero-shot classification of held-out scenes, embed the validation images into a searchable index, and write a
report folder. Every number comes from this run: nothing is canned. With ``data`` the same pipeline runs on
the user's own caption table (split by image into train and validation; no zero-shot, which needs labels).
"""

from __future__ import annotations

import csv
import random
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

from ..checkpoints import load
from ..data.sources import read_caption_table
from ..data.synthetic import CLASSES, write_caption_dataset, write_labelled_dataset, write_table
from ..eval.report import write_report
from ..eval.tasks import evaluate_retrieval, evaluate_zeroshot
from ..search.index import SearchIndex, build_index
from ..search.writer import EmbedSettings, embed_collection
from ..train.config import DataConfig, ModelConfig, OptimConfig, RunConfig, TrainConfig
from ..train.run import train
from ..util import atomic_write_json
from .report import write_demo_report

# The README quotes these (a test checks it). Chosen from three measured runs of the default settings on a 2-core
# CPU: R@10 0.89-0.91 text->image and 0.85 image->text, colour 1.00, shape 0.52-0.79 (bf16 runs differ in their
# last bits, and shape is the slow attribute to learn). Chance: R@10 2 %, colour 1/6, shape 1/4.
THRESHOLDS = {"image_retrieval_recall@10": 0.60, "text_retrieval_recall@10": 0.60,
              "colour_acc1": 0.90, "shape_acc1": 0.40}
COLOUR_TEMPLATES = ("a {} shape.", "a photo of a {} shape.", "something {}.")
SHAPE_TEMPLATES = ("a {}.", "a photo of a {}.", "a drawing of a {}.")
GALLERY_QUERIES = ("a red circle", "a blue square on a black background", "a yellow star",
                   "a green triangle next to a purple circle")


@dataclass
class DemoSettings:
    """What the demo generates and how it trains. The defaults fit in 5 minutes on a 2-core CPU."""

    train_scenes: int = 4000
    val_scenes: int = 500
    heldout_per_class: int = 10  # single-shape scenes per colour-shape class for zero-shot
    image_size: int = 64
    seed: int = 0
    steps: int = 600
    max_minutes: float = 4.0  # a safety cap on a slow machine: training stops (annealed) at this wall time
    batch_size: int = 64
    val_fraction: float = 0.1  # --data: share of the images held out for validation (at most 1,000)
    image_col: str = "image_path"
    caption_col: str = "caption"
    progress: bool = True
    model: dict[str, Any] = field(default_factory=lambda: {
        "arch": "RN-Nano", "text_width": 128, "text_layers": 2, "text_heads": 2, "context_length": 24,
        "embed_dim": 128})


def demo_recipe(settings: DemoSettings, train_table: Path, output: Path):
    """The training config of the demo (also saved by the run as ``OUTPUT/train/config.yaml``). No validation
    pass inside training: the demo evaluates the final model once, on the same validation table, afterwards."""

    return TrainConfig(
        model=ModelConfig(image_size=settings.image_size, **settings.model),
        data=DataConfig(train=str(train_table), image_col=settings.image_col, caption_col=settings.caption_col,
                        sample_captions=True, workers=1),
        optim=OptimConfig(epochs=1000, max_steps=settings.steps, max_minutes=settings.max_minutes,
                          batch_size=settings.batch_size, lr=2e-3, warmup=30, wd=0.1),
        run=RunConfig(output=str(output), precision="auto", threads="auto", checkpoint_every_steps=200,
                      log_every_steps=5, progress=settings.progress),
    )


# ------------------------------------------------------------------------------------------------ pipeline


def run_demo(output: str | Path, data: str | Path | None = None, settings: DemoSettings | None = None,
             say: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Run the demo into `output`; returns the summary (also ``OUTPUT/summary.json``)."""

    settings = settings or DemoSettings()
    say = say or _say
    out = Path(output)
    out.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    timings: dict[str, float] = {}

    clock = time.perf_counter()
    if data is None:
        tables = _generate(out / "data", settings)
        say(f"1. generated {settings.train_scenes:,} training and {settings.val_scenes:,} validation scenes "
            f"({settings.image_size} px) in {out / 'data'}")
    else:
        tables = _split_user_table(Path(data), out / "data", settings)
        say(f"1. split {data} by image into {tables['train_images']:,} training and {tables['val_images']:,} "
            f"validation images")
    timings["data"] = time.perf_counter() - clock

    clock = time.perf_counter()
    say(f"2. training a small CLIP ({settings.model['arch']}, {settings.steps} steps of {settings.batch_size}, "
        f"at most {settings.max_minutes:g} min) ...")
    if tables["train_images"] < settings.batch_size:  # a small table of the user's: one batch holds all of it
        settings = replace(settings, batch_size=tables["train_images"])
    cfg = demo_recipe(settings, tables["train"], out / "train")
    trained = train(cfg)
    timings["train"] = time.perf_counter() - clock
    say(f"   trained {trained['steps']} steps in {trained['train_seconds']:.0f} s ({trained['precision']})")

    model, preprocess, tokenizer = load(out / "train" / "final")
    clock = time.perf_counter()
    results = _evaluate(model, preprocess, tokenizer, tables, settings, out / "report")
    timings["evaluate"] = time.perf_counter() - clock

    clock = time.perf_counter()
    store = _build_index(model, preprocess, tokenizer, tables["val"], settings, out)
    queries = list(GALLERY_QUERIES) if data is None else _first_captions(tables["val"], settings, 4)
    gallery = _search_gallery(store, model, preprocess, tokenizer, queries)
    timings["index"] = time.perf_counter() - clock

    summary = _summary(results, trained, tables, settings, data, timings, time.perf_counter() - started, store)

    summary["report"] = str(write_demo_report(out / "report", summary, results, gallery,
                                              out / "train" / "logs" / "metrics.csv"))
    atomic_write_json(out / "summary.json", summary)
    _print_summary(summary, say)
    return summary


def _generate(folder: Path, settings: DemoSettings) -> dict[str, Any]:
    """Train and validation caption tables, and held-out single-shape scenes labelled by colour and by shape."""

    train = write_caption_dataset(folder / "train", settings.train_scenes, settings.image_size, settings.seed)
    val = write_caption_dataset(folder / "val", settings.val_scenes, settings.image_size, settings.seed + 1)
    heldout = write_labelled_dataset(folder / "heldout", settings.heldout_per_class, settings.image_size,
                                     settings.seed + 2)
    with (heldout / "labels.csv").open(newline="", encoding="utf-8") as handle:
        labelled = [(row["image_path"], *row["label"].split(" ")) for row in csv.DictReader(handle)]
    for stem, column in (("colours", 1), ("shapes", 2)):  # labels are "<colour> <shape>"
        write_table(heldout / f"{stem}.csv", ("image_path", "label"), [(row[0], row[column]) for row in labelled])
    return {"train": train, "val": val, "colours": heldout / "colours.csv", "shapes": heldout / "shapes.csv",
            "train_images": settings.train_scenes, "val_images": settings.val_scenes}


def _split_user_table(table: Path, folder: Path, settings: DemoSettings) -> dict[str, Any]:
    """Split the user's caption table by image (every caption of an image on one side), deterministically."""

    pairs = read_caption_table(table, settings.image_col, settings.caption_col)
    images = sorted({str(p.resolve()) for p in pairs.image_paths})
    if len(images) < 20:
        raise ValueError(f"{table}: {len(images)} distinct images; the demo needs at least 20 to train and "
                         "validate on")
    random.Random(settings.seed).shuffle(images)
    n_val = min(1000, max(10, round(len(images) * settings.val_fraction)))
    val_images = set(images[:n_val])
    rows: dict[str, list[tuple[str, str]]] = {"train": [], "val": []}
    for path, caption in zip(pairs.image_paths, pairs.captions, strict=True):
        rows["val" if str(path.resolve()) in val_images else "train"].append((str(path.resolve()), caption))
    header = (settings.image_col, settings.caption_col)
    for split, split_rows in rows.items():
        write_table(folder / f"{split}.csv", header, split_rows)
    return {"train": folder / "train.csv", "val": folder / "val.csv", "train_images": len(images) - n_val,
            "val_images": n_val}


def _evaluate(model, preprocess, tokenizer, tables: dict[str, Any], settings: DemoSettings,
              report: Path) -> dict[str, dict[str, Any]]:
    """Retrieval on the validation table; zero-shot colour and shape on the held-out scenes (when generated)."""

    common = {"batch_size": 250, "progress": settings.progress, "model_name": "demo"}
    results = {"retrieval": evaluate_retrieval(model, preprocess, tokenizer, tables["val"], settings.image_col,
                                               settings.caption_col, ks=(1, 5, 10), dataset_name="val", **common)}
    for task, templates in (("colours", COLOUR_TEMPLATES), ("shapes", SHAPE_TEMPLATES)):
        if task in tables:
            results[task] = evaluate_zeroshot(model, preprocess, tokenizer, tables[task], templates=list(templates),
                                              dataset_name=f"heldout-{task}", **common)
    for name, result in results.items():
        result["plots"] = {kind: path.name for kind, path in write_report(result, report, name).items()}
    return results


def _build_index(model, preprocess, tokenizer, table: Path, settings: DemoSettings, out: Path) -> Path:

    store = out / "index"
    embed_collection([table], store, model, preprocess, tokenizer,
                     EmbedSettings(batch_size=250, image_col=settings.image_col, caption_col=settings.caption_col),
                     checkpoint=str((out / "train" / "final").resolve()), overwrite=True,
                     progress=settings.progress, log=lambda line: None)
    build_index(store)
    return store


def _search_gallery(store: Path, model, preprocess, tokenizer, queries: list[str], k: int = 6) -> list[dict]:
    """The top `k` validation images for each query, through the search index (as `clipforge search` does)."""

    index = SearchIndex.open(store, model=model, preprocess=preprocess, tokenizer=tokenizer)
    gallery = []
    for query in queries:
        hits = index.search_text(query, k=k)
        gallery.append({"caption": query, "top": [
            {"image": hit.path, "score": hit.score, "correct": _mentions(hit.caption or "", query)} for hit in hits]})
    return gallery


def _mentions(caption: str, query: str) -> bool:
    """Whether a hit's own caption names the query's first "<colour> <shape>" (generated captions only)."""

    wanted = next((c for c in CLASSES if c in query), None)
    return wanted is not None and wanted in caption


def _first_captions(table: Path, settings: DemoSettings, n: int) -> list[str]:

    captions = read_caption_table(table, settings.image_col, settings.caption_col, check_files=False).captions
    step = max(1, len(captions) // n)
    return captions[::step][:n]


# ------------------------------------------------------------------------------------------------ summary


def _summary(results: dict[str, dict], trained: dict, tables: dict, settings: DemoSettings, data, timings: dict,
             seconds: float, store: Path) -> dict[str, Any]:
    retrieval = results["retrieval"]
    metrics = {f"{d}_retrieval_recall@{k}": retrieval[f"{d}_retrieval_recall@{k}"]
               for d in ("image", "text") for k in (1, 5, 10)}
    chance = {"recall@10": min(1.0, 10 / tables["val_images"])}
    for task, key in (("colours", "colour"), ("shapes", "shape")):
        if task in results:
            metrics[f"{key}_acc1"] = results[task]["acc1"]
            chance[f"{key}_acc1"] = 1 / len(results[task]["per_class_recall"])
    thresholds = THRESHOLDS if data is None else {}
    missed = [name for name, low in thresholds.items() if metrics.get(name, 0.0) < low]
    return {
        "data": "generated scenes" if data is None else str(data),
        "train_images": tables["train_images"], "val_images": tables["val_images"],
        "steps": trained["steps"], "train_seconds": trained["train_seconds"], "precision": trained["precision"],
        "metrics": metrics, "chance": chance, "thresholds": thresholds, "missed": missed,
        "seconds": round(seconds, 1), "timings": {k: round(v, 1) for k, v in timings.items()},
        "model": str(Path(trained["final"]).resolve()), "index": str(store.resolve()),
        "output": str(store.parent),
        "settings": asdict(settings),
    }


def _print_summary(summary: dict[str, Any], say: Callable[[str], None]) -> None:
    m = summary["metrics"]
    say(f"3. retrieval on {summary['val_images']:,} validation images "
        f"(chance R@10 {summary['chance']['recall@10']:.1%}):")
    for direction, label in (("image", "text -> image"), ("text", "image -> text")):
        recalls = "  ".join(f"R@{k} {m[f'{direction}_retrieval_recall@{k}']:.1%}" for k in (1, 5, 10))
        say(f"   {label}: {recalls}")
    if "colour_acc1" in m:
        say(f"   zero-shot on held-out scenes: colour {m['colour_acc1']:.1%} (chance "
            f"{summary['chance']['colour_acc1']:.0%}), shape {m['shape_acc1']:.1%} "
            f"(chance {summary['chance']['shape_acc1']:.0%})")
    say(f"4. search index of the validation images: {summary['index']}")
    say(f"   search it: clipforge search \"a red circle\" --index {summary['index']}")
    say(f"   serve it:  clipforge demo --serve --output {summary['output']}")
    say(f"5. report: {summary['report']}")
    say(f"done in {summary['seconds']:.0f} s")
    for name in summary["missed"]:
        say(f"below the README's threshold: {name} = {m[name]:.3f} < {summary['thresholds'][name]}")


def _say(text: str) -> None:
    print(text, file=sys.stdout, flush=True)
