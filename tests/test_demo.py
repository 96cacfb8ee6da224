"""`clipforge demo` at a reduced size: the whole pipeline runs, learns, and reports what it measured."""

from __future__ import annotations

import json
import re

import pytest

import clipforge
from clipforge.cli import main
from clipforge.data.synthetic import write_caption_dataset
from clipforge.demo import DemoSettings, run_demo
from clipforge.search.index import SearchIndex

# Reduced from the defaults (4,000 scenes, 600 steps of 64) to fit the test budget: about 40 s on 2 cores.
SMALL = DemoSettings(train_scenes=800, val_scenes=120, heldout_per_class=4, steps=150, batch_size=32,
                     progress=False)
PLOTS = ("training.png", "search.png", "retrieval.recall.png", "retrieval.gallery.png", "colours.confusion.png",
         "shapes.confusion.png")


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo")
    lines: list[str] = []
    summary = run_demo(out, settings=SMALL, say=lines.append)
    return out, summary, lines


def test_demo_writes_every_part_of_the_report(demo_run) -> None:
    out, summary, _ = demo_run
    report = out / "report"
    assert summary["report"] == str(report / "index.html")
    page = (report / "index.html").read_text()
    markdown = (report / "report.md").read_text()
    for name in PLOTS:
        assert (report / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", name
        assert f'src="{name}"' in page and f"({name})" in markdown, name
    assert json.loads((out / "summary.json").read_text())["metrics"] == summary["metrics"]


def test_demo_numbers_are_the_evaluations_own(demo_run) -> None:
    out, summary, lines = demo_run
    retrieval = json.loads((out / "report" / "retrieval.json").read_text())
    for key in ("image_retrieval_recall@10", "text_retrieval_recall@1"):
        assert summary["metrics"][key] == retrieval[key]
    assert summary["metrics"]["colour_acc1"] == json.loads((out / "report" / "colours.json").read_text())["acc1"]
    assert retrieval["num_images"] == SMALL.val_scenes
    printed = "\n".join(lines)
    assert f"R@10 {summary['metrics']['image_retrieval_recall@10']:.1%}" in printed
    assert summary["steps"] == SMALL.steps


def test_demo_model_learns_far_above_chance(demo_run) -> None:
    _, summary, _ = demo_run
    m, chance = summary["metrics"], summary["chance"]
    assert m["image_retrieval_recall@10"] >= THRESHOLDS_SMALL["image_retrieval_recall@10"] > 2 * chance["recall@10"]
    assert m["text_retrieval_recall@10"] >= THRESHOLDS_SMALL["text_retrieval_recall@10"] > 2 * chance["recall@10"]
    assert m["colour_acc1"] >= THRESHOLDS_SMALL["colour_acc1"] > 2 * chance["colour_acc1"]


# Measured with SMALL (seed 0, 34 s of training): R@10 0.94 text->image and 0.92 image->text (chance 0.083), colour
# 1.00 (chance 0.17). The thresholds leave room for bf16 rounding differences between machines and stay far above
# chance, so a model that learned nothing (or a pipeline that scores the wrong pairs) fails.
THRESHOLDS_SMALL = {"image_retrieval_recall@10": 0.6, "text_retrieval_recall@10": 0.6, "colour_acc1": 0.8}


def test_demo_index_answers_text_queries(demo_run) -> None:
    out, _, _ = demo_run
    model, preprocess, tokenizer = clipforge.load(out / "train" / "final")
    index = SearchIndex.open(out / "index", model=model, preprocess=preprocess, tokenizer=tokenizer)
    assert len(index) == SMALL.val_scenes
    hits = index.search_text("a red circle", k=5)
    assert len(hits) == 5 and all(hit.path.endswith(".png") for hit in hits)
    assert sum("red" in (hit.caption or "") for hit in hits) >= 2  # colours are what the model learns first
    search = json.loads((out / "report" / "search.json").read_text())["queries"]
    assert [q["caption"] for q in search] == ["a red circle", "a blue square on a black background", "a yellow star",
                                              "a green triangle next to a purple circle"]
    assert all(len(q["top"]) == 6 for q in search)


def test_demo_serve_reuses_the_finished_index(demo_run, monkeypatch, capsys) -> None:
    out, _, _ = demo_run
    served = {}
    monkeypatch.setattr("clipforge.search.server.serve",
                        lambda index, host, port, log_level: served.update(n=len(index), host=host, port=port))
    assert main(["demo", "--output", str(out), "--serve", "--port", "8123"]) == 0
    assert served == {"n": SMALL.val_scenes, "host": "127.0.0.1", "port": 8123}
    assert "http://127.0.0.1:8123/" in capsys.readouterr().out


def test_demo_on_a_users_caption_table(tmp_path, capsys) -> None:
    table = write_caption_dataset(tmp_path / "mine", 40, size=32, seed=3)
    renamed = tmp_path / "mine" / "pairs.csv"
    renamed.write_text(table.read_text().replace("image_path,caption", "file,text", 1))
    out = tmp_path / "out"
    assert main(["demo", "--data", str(renamed), "--image-col", "file", "--caption-col", "text", "--steps", "3",
                 "--output", str(out), "--quiet"]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert (summary["train_images"], summary["val_images"]) == (30, 10)
    assert "colour_acc1" not in summary["metrics"] and summary["thresholds"] == {}
    assert (out / "report" / "index.html").is_file() and (out / "train" / "final" / "model.safetensors").is_file()
    assert re.search(r"R@10 \d+\.\d%", capsys.readouterr().out)


def test_demo_bad_data_is_one_line(tmp_path, capsys) -> None:
    assert main(["demo", "--data", str(tmp_path / "missing.csv")]) == 2
    assert "missing.csv: no such file" in capsys.readouterr().err
    table = write_caption_dataset(tmp_path / "few", 5, size=32)
    assert main(["demo", "--data", str(table), "--output", str(tmp_path / "out")]) == 1
    err = capsys.readouterr().err.strip()
    assert "5 distinct images" in err and len(err.splitlines()) == 1
    assert main(["demo", "--data", str(table), "--caption-col", "nope"]) == 1
    assert "nope" in capsys.readouterr().err


def test_cli_default_steps_are_the_demos() -> None:
    from clipforge.cli.core import DEMO_STEPS  # a copy, so that `clipforge --help` does not import the demo

    assert DemoSettings().steps == DEMO_STEPS
