"""The demo's report folder: training curves, the evaluation plots, a search gallery, ``index.html`` and
``report.md`` that show them with the measured numbers."""

from __future__ import annotations

import csv
import html
from pathlib import Path
from typing import Any

from ..eval.report import gallery_figure, pyplot, save_figure, write_result_json
from ..util import atomic_write_text


def write_demo_report(folder: Path, summary: dict[str, Any], results: dict[str, dict], gallery: list[dict],
                      metrics_csv: Path) -> Path:
    """Write the plots and pages into `folder` (the evaluation JSONs and plots are already there); returns the
    path of ``index.html``."""
    folder.mkdir(parents=True, exist_ok=True)
    figures = {"training": save_figure(_training_figure(_read_metrics(metrics_csv)), folder / "training.png").name,
               "search": save_figure(gallery_figure({"gallery": gallery, "model": {"name": "demo index"},
                                                "dataset": {"name": "validation images"}}),
                               folder / "search.png").name}
    write_result_json({"queries": gallery}, folder / "search.json")
    sections = _sections(summary, results, figures)
    atomic_write_text(folder / "report.md", _markdown(summary, sections))
    page = folder / "index.html"
    atomic_write_text(page, _html(summary, sections))
    return page


def _read_metrics(path: Path) -> dict[str, list[float]]:
    """Columns of the training log that the curves need (rows without a value are skipped per column)."""
    columns: dict[str, list[tuple[float, float]]] = {"loss": [], "logit_scale": [], "lr": []}
    if path.is_file():
        with path.open(newline="", encoding="utf-8") as handle:
            for row in csv.DictReader(handle):
                for name, points in columns.items():
                    if row.get(name):
                        points.append((float(row["step"]), float(row[name])))
    return columns


def _training_figure(columns: dict[str, list[tuple[float, float]]]):
    plt = pyplot()
    fig, axes = plt.subplots(1, 3, figsize=(12, 3.4), dpi=100)
    for ax, (name, label) in zip(axes, (("loss", "contrastive loss"), ("logit_scale", "logit scale (exp)"),
                                        ("lr", "learning rate")), strict=True):
        points = columns[name]
        if points:
            ax.plot([p[0] for p in points], [p[1] for p in points], linewidth=1.2)
        ax.set_xlabel("step")
        ax.set_title(label, fontsize=10)
        ax.grid(True, alpha=0.3)
    fig.suptitle("Training", fontsize=10)
    fig.tight_layout()
    return fig


def _sections(summary: dict[str, Any], results: dict[str, dict], figures: dict[str, str]) -> list[dict]:
    """(title, lines of text, image file) for each part of the report, shared by the HTML and Markdown pages."""
    m, chance = summary["metrics"], summary["chance"]
    sections = [{"title": "Training", "text": [
        f"{summary['steps']} steps in {summary['train_seconds']:.0f} s ({summary['precision']}) on "
        f"{summary['train_images']:,} training images."], "image": figures["training"]}]
    retrieval = results["retrieval"]
    rows = [(label, *(f"{m[f'{d}_retrieval_recall@{k}']:.1%}" for k in (1, 5, 10)))
            for d, label in (("image", "text → image"), ("text", "image → text"))]
    sections.append({"title": "Retrieval", "text": [
        f"{summary['val_images']:,} validation images, {retrieval['num_texts']:,} captions; "
        f"chance R@10 {chance['recall@10']:.1%}."], "table": (("direction", "R@1", "R@5", "R@10"), rows),
        "image": retrieval["plots"].get("recall")})
    if retrieval["plots"].get("gallery"):
        sections.append({"title": "Retrieval examples", "text": [
            "Validation captions and their best images; the caption's own image is framed green."],
            "image": retrieval["plots"]["gallery"]})
    for task, key in (("colours", "colour"), ("shapes", "shape")):
        if task in results:
            sections.append({"title": f"Zero-shot {key} of held-out scenes", "text": [
                f"Top-1 {m[f'{key}_acc1']:.1%} (chance {chance[f'{key}_acc1']:.0%}) over "
                f"{results[task]['num_samples']} single-shape scenes the model never saw."],
                "image": results[task]["plots"].get("confusion")})
    sections.append({"title": "Search", "text": [
        "Text queries against the index of the validation images; a green frame marks an image whose caption "
        "names the query's colour and shape.", f"Index: {summary['index']}"], "image": figures["search"]})
    return sections


def _markdown(summary: dict[str, Any], sections: list[dict]) -> str:
    lines = ["# clipforge demo", "", f"Data: {summary['data']}. Finished in {summary['seconds']:.0f} s.", ""]
    for section in sections:
        lines += [f"## {section['title']}", "", *section["text"], ""]
        if section.get("table"):
            header, rows = section["table"]
            lines += ["| " + " | ".join(header) + " |", "|" + " --- |" * len(header)]
            lines += ["| " + " | ".join(row) + " |" for row in rows]
            lines.append("")
        if section.get("image"):
            lines += [f"![{section['title']}]({section['image']})", ""]
    return "\n".join(lines)


def _html(summary: dict[str, Any], sections: list[dict]) -> str:
    body = [f"<h1>clipforge demo</h1><p>Data: {html.escape(summary['data'])}. "
            f"Finished in {summary['seconds']:.0f} s.</p>"]
    for section in sections:
        body.append(f"<h2>{html.escape(section['title'])}</h2>")
        body += [f"<p>{html.escape(line)}</p>" for line in section["text"]]
        if section.get("table"):
            header, rows = section["table"]
            body.append("<table><tr>" + "".join(f"<th>{html.escape(h)}</th>" for h in header) + "</tr>"
                        + "".join("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in row) + "</tr>"
                                  for row in rows) + "</table>")
        if section.get("image"):
            body.append(f'<img src="{html.escape(section["image"])}" alt="{html.escape(section["title"])}">')
    style = ("body{font-family:system-ui,sans-serif;max-width:1100px;margin:2em auto;padding:0 1em;color:#222}"
             "img{max-width:100%;border:1px solid #ddd;margin:.5em 0}table{border-collapse:collapse}"
             "td,th{border:1px solid #ccc;padding:.3em .8em;text-align:right}")
    return ("<!doctype html><html><head><meta charset='utf-8'><title>clipforge demo</title>"
            f"<style>{style}</style></head><body>{''.join(body)}</body></html>\n")
