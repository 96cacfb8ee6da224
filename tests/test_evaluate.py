"""`clipforge evaluate` and `clipforge.eval.tasks` / `report`: end to end on generated scenes with a tiny model
trained in the test session, the CLI's JSON contracts, reports and plots, and one-line errors for bad input."""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import pytest
import torch
from PIL import Image

import clipforge
from clipforge import cli
from clipforge.cli import evaluate as evaluate_cli
from clipforge.data.synthetic import CLASSES, write_caption_dataset, write_labelled_dataset
from clipforge.embed import embed_images, embed_texts
from clipforge.eval import features, tasks
from clipforge.eval.report import write_report, write_summary
from clipforge.eval.retrieval import evaluate_captioned_images, retrieval_metrics
from tests.trained_tiny import trained_tiny_model

KS = (1, 5, 10)
N_CAPTIONS = 96  # one caption per image
N_PER_CLASS = 2  # labelled set: 2 x 24 classes = 48 images

# Thresholds: about half the lowest value measured with the trained tiny model, and >= 3x chance.
# Retrieval over 96 images, chance R@K = K / 96 (0.010, 0.052, 0.104); measured on 3 seeds of generated
# captions, fp32 and bf16: R@1 0.083-0.125, R@5 0.333-0.427, R@10 0.625-0.677 (both directions).
RETRIEVAL_MIN = {1: 0.04, 5: 0.2, 10: 0.35}
# Zero-shot over 24 classes, chance acc1 1/24 = 0.042, acc5 5/24 = 0.21; measured acc1 0.146-0.312 (3 seeds x
# templates seeds/simple/openai; 0.25-0.27 on this test's data), acc5 1.0: it knows colours better than shapes.
ZEROSHOT_ACC1_MIN, ZEROSHOT_ACC5_MIN = 0.125, 0.6
# Linear probe / 2-shot on 72 / 48 train images, chance 0.042; measured test acc1 0.354-0.375.
PROBE_ACC1_MIN = 0.15


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    """Every tensor here is tiny: on a loaded 2-core machine a second thread only adds synchronisation waits
    (an L-BFGS step of the probe measured 20x slower with two threads than with one)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    return trained_tiny_model(tmp_path_factory.getbasetemp() / "trained-tiny")


@pytest.fixture(scope="module")
def tiny(tiny_model_dir):
    return clipforge.load(tiny_model_dir)


@pytest.fixture(scope="module")
def captions(tmp_path_factory) -> Path:
    return write_caption_dataset(tmp_path_factory.mktemp("captions"), N_CAPTIONS, seed=1)


@pytest.fixture(scope="module")
def labelled(tmp_path_factory) -> Path:
    """A class-folder tree with labels.csv beside the class folders (both readable)."""
    return write_labelled_dataset(tmp_path_factory.mktemp("labelled"), N_PER_CLASS, seed=101)


@pytest.fixture(scope="module")
def probe_sets(tmp_path_factory) -> tuple[Path, Path]:
    train = write_labelled_dataset(tmp_path_factory.mktemp("probe-train"), 3, seed=201)
    test = write_labelled_dataset(tmp_path_factory.mktemp("probe-test"), 2, seed=202)
    return train, test / "labels.csv"


def run(argv: list[str]) -> int:
    """`clipforge ARGV` with the evaluate commands registered (whether or not the package lists them yet)."""
    if not any(name == "evaluate" for name, *_ in cli.COMMANDS):
        commands = [*cli.COMMANDS, *evaluate_cli.COMMANDS]
        original, cli.COMMANDS = cli.COMMANDS, commands
        try:
            return cli.main(argv)
        finally:
            cli.COMMANDS = original
    return cli.main(argv)


def corrupt(path: Path) -> None:
    """Keep the PNG signature (still found as an image), destroy the rest: decoding fails."""
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + b"\x00" * 64)


def assert_png(path: Path) -> None:
    assert path.is_file(), path
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with Image.open(path) as image:
        image.verify()
    with Image.open(path) as image:
        assert image.size[0] > 100 and image.size[1] > 100


# ------------------------------------------------------------------------------------------------ retrieval


def test_retrieval_cli_contract_thresholds_and_plots(tiny_model_dir, captions, tmp_path, capsys):
    out = tmp_path / "r.json"
    assert run(["evaluate", "retrieval", "--checkpoint", str(tiny_model_dir), "--data", str(captions),
                "--json", str(out), "--output", str(tmp_path / "report")]) == 0
    result = json.loads(out.read_text())
    for direction in ("image", "text"):
        recalls = [result[f"{direction}_retrieval_recall@{k}"] for k in KS]
        assert all(0 <= r <= 1 for r in recalls) and recalls == sorted(recalls)
        for k, r in zip(KS, recalls, strict=True):
            assert r >= RETRIEVAL_MIN[k], (direction, k, r)
    assert result["num_images"] == result["num_texts"] == N_CAPTIONS and result["num_failed"] == 0
    assert result["dataset"]["rows"] == N_CAPTIONS and len(result["dataset"]["sha256"]) == 64
    assert result["model"]["provenance"]["trained_on"] == "clipforge.data.synthetic"
    assert result["recall_curve"]["k"][-1] == N_CAPTIONS and result["recall_curve"]["image_retrieval"][-1] == 1.0
    assert "image_retrieval_recall@10" in capsys.readouterr().out

    stem = tmp_path / "report" / f"{Path(tiny_model_dir).name}__{captions.parent.name}-captions__retrieval"
    assert json.loads(stem.with_suffix(".json").read_text())["text_retrieval_recall@5"] == \
        result["text_retrieval_recall@5"]
    for kind in ("recall", "gallery"):
        assert_png(stem.with_name(f"{stem.name}.{kind}.png"))


def test_retrieval_groups_captions_of_one_image_and_matches_the_metric(tiny, tmp_path):
    """Rows naming the same image are one gallery image with several captions; the result equals
    retrieval_metrics on embeddings computed directly."""
    model, preprocess, tokenizer = tiny
    source = write_caption_dataset(tmp_path / "src", 6, seed=3)
    rows = list(csv.reader(source.open()))[1:]
    table = tmp_path / "src" / "two-per-image.csv"
    extra = ["a red circle", "a blue star", "a green square", "a yellow triangle", "a purple star", "an orange square"]
    with table.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["file", "text"])
        for (image, caption), other in zip(rows, extra, strict=True):
            writer.writerows([(image, caption), (image, other)])
    result = tasks.evaluate_retrieval(model, preprocess, tokenizer, table, "file", "text", ks=(1, 2, 20),
                                      progress=False)
    assert (result["num_images"], result["num_texts"]) == (6, 12)

    images = embed_images(model, [str(source.parent / r[0]) for r in rows], preprocess, progress=False)
    texts = embed_texts(model, [t for (_, c), o in zip(rows, extra, strict=True) for t in (c, o)], tokenizer,
                        progress=False)
    expected = retrieval_metrics(images.embeddings, texts, [i // 2 for i in range(12)], ks=(1, 2, 20))
    for key, value in expected.items():
        assert result[key] == pytest.approx(value, abs=1e-12), key
    assert result["text_retrieval_recall@20"] == 1.0  # K beyond the gallery


def test_captioned_images_in_memory_give_exactly_the_tables_metrics(tiny, tmp_path):
    """The retrieval core on images and their caption lists in memory gives exactly evaluate_retrieval's metrics
    on the table they came from: rows of one image far apart, one image that does not decode."""
    model, preprocess, tokenizer = tiny
    source = write_caption_dataset(tmp_path / "src", 8, seed=4)
    rows = list(csv.reader(source.open()))[1:]
    corrupt(source.parent / rows[2][0])
    table = tmp_path / "src" / "apart.csv"
    with table.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["image_path", "caption"])
        writer.writerows([*rows, *((image, f"seen again: {caption}") for image, caption in reversed(rows))])
    result = tasks.evaluate_retrieval(model, preprocess, tokenizer, table, ks=(1, 3), progress=False)

    images = [source.parent / image for image, _ in rows]
    captions = [[caption, f"seen again: {caption}"] for _, caption in rows]
    run = evaluate_captioned_images(model, preprocess, tokenizer, images, captions, ks=(3, 1), progress=False)
    assert run.metrics == {key: result[key] for key in run.metrics}
    assert "image_retrieval_recall@3" in run.metrics and run.metrics["num_texts"] == result["num_samples"] == 14
    assert [i for i, _, _ in run.failures] == [2] and result["failed"][0]["image"] == str(images[2])
    assert run.num_dropped_captions == result["num_dropped_captions"] == 2
    assert run.kept == [0, 1, 3, 4, 5, 6, 7] and run.captions[:2] == captions[0]
    assert run.text_to_image.tolist() == [i // 2 for i in range(14)]


@pytest.mark.parametrize("captions,message", [
    ([["a"]], "2 images but 1 caption lists"),
    (["a cat", ["a dog"]], "the captions of image 0 (x.png) are one string"),
    ([["a cat"], []], "image 1 (y.png) has no caption"),
])
def test_captioned_images_reject_captions_that_do_not_fit(captions, message):
    with pytest.raises(ValueError, match=r"^val: ") as error:
        evaluate_captioned_images(None, None, None, ["x.png", "y.png"], captions, source="val")
    assert message in str(error.value)


def test_retrieval_excludes_and_counts_undecodable_images(tiny_model_dir, captions, tmp_path, capsys):
    data = tmp_path / "data"
    shutil.copytree(captions.parent, data)
    corrupt(data / "images" / "000003.png")
    out = tmp_path / "r.json"
    assert run(["evaluate", "retrieval", "--checkpoint", str(tiny_model_dir), "--data", str(data / "captions.csv"),
                "--json", str(out)]) == 0
    result = json.loads(out.read_text())
    assert result["num_failed"] == 1 and result["num_dropped_captions"] == 1
    assert result["num_images"] == result["num_texts"] == N_CAPTIONS - 1
    assert result["failed"][0]["image"].endswith("000003.png")
    assert "1 image(s) could not be decoded" in capsys.readouterr().err


# ------------------------------------------------------------------------------------------------ zero-shot


def test_zeroshot_cli_contract_thresholds_and_confusion_plot(tiny_model_dir, labelled, tmp_path):
    out = tmp_path / "z.json"
    assert run(["evaluate", "zeroshot", "--checkpoint", str(tiny_model_dir), "--data", str(labelled / "labels.csv"),
                "--json", str(out), "--output", str(tmp_path / "report")]) == 0
    result = json.loads(out.read_text())
    n = N_PER_CLASS * len(CLASSES)
    assert all(0 <= result[m] <= 1 for m in ("acc1", "acc5", "mean_per_class_recall"))
    assert result["acc1"] >= ZEROSHOT_ACC1_MIN and result["acc5"] >= ZEROSHOT_ACC5_MIN
    # Balanced classes: mean per-class recall is top-1 accuracy.
    assert result["mean_per_class_recall"] == pytest.approx(result["acc1"])
    assert result["num_classes"] == len(CLASSES) and result["num_samples"] == n
    confusion = torch.tensor(result["confusion_matrix"])
    assert confusion.sum() == n and confusion.diag().sum() == round(result["acc1"] * n)
    assert_png(next((tmp_path / "report").glob("*__zeroshot.confusion.png")))


def test_zeroshot_folder_and_table_give_the_same_result(tiny, labelled):
    model, preprocess, tokenizer = tiny
    from_table = tasks.evaluate_zeroshot(model, preprocess, tokenizer, labelled / "labels.csv", progress=False)
    from_folder = tasks.evaluate_zeroshot(model, preprocess, tokenizer, labelled, progress=False)
    for key in ("acc1", "acc5", "mean_per_class_recall", "confusion_matrix", "num_samples"):
        assert from_table[key] == from_folder[key], key


def test_zeroshot_extra_class_from_file_has_no_samples(tiny_model_dir, labelled, tmp_path):
    classes = tmp_path / "classes.txt"
    classes.write_text("\n".join([*CLASSES, "pink hexagon"]) + "\n")
    out = tmp_path / "z.json"
    assert run(["evaluate", "zeroshot", "--checkpoint", str(tiny_model_dir), "--data", str(labelled),
                "--classes-file", str(classes), "--json", str(out)]) == 0
    result = json.loads(out.read_text())
    assert result["num_classes"] == len(CLASSES) + 1 and result["classes_without_samples"] == ["pink hexagon"]


def test_zeroshot_excludes_undecodable_images(tiny_model_dir, labelled, tmp_path):
    data = tmp_path / "data"
    shutil.copytree(labelled, data)
    corrupt(data / "red star" / "000001.png")
    out = tmp_path / "z.json"
    assert run(["evaluate", "zeroshot", "--checkpoint", str(tiny_model_dir), "--data", str(data / "labels.csv"),
                "--json", str(out)]) == 0
    result = json.loads(out.read_text())
    assert result["num_failed"] == 1 and result["num_samples"] == N_PER_CLASS * len(CLASSES) - 1
    red_star = next(row for row in result["per_class_recall"] if row["class"] == "red star")
    assert red_star["support"] == N_PER_CLASS - 1


# --------------------------------------------------------------------------------------------- linear probe


def test_linear_probe_and_few_shot_cli_with_feature_cache(tiny_model_dir, probe_sets, tmp_path, monkeypatch):
    train, test = probe_sets
    cache = tmp_path / "cache"
    out = tmp_path / "p.json"
    base = ["evaluate", "linear-probe", "--checkpoint", str(tiny_model_dir), "--train", str(train), "--test", str(test),
            "--cache-dir", str(cache)]
    assert run([*base, "--json", str(out)]) == 0
    probe = json.loads(out.read_text())
    assert probe["task"] == "linear-probe" and probe["acc1"] >= PROBE_ACC1_MIN
    assert probe["num_train"] == 3 * len(CLASSES) and probe["num_test"] == 2 * len(CLASSES)
    assert probe["weight_decay_sweep"] and probe["dataset"]["test"]["rows"] == 2 * len(CLASSES)
    assert len(list(cache.glob("features-*.pt"))) == 2

    # Second run: features come from the cache, so the images are not embedded again. (A given weight decay
    # skips the sweep, which the run above covered.)
    def no_embedding(*args, **kwargs):
        raise AssertionError("features were recomputed although cached")

    monkeypatch.setattr(features, "embed_images", no_embedding)
    assert run([*base, "--few-shot", "2", "--seed", "1", "--weight-decay", "0.01", "--json", str(out)]) == 0
    few = json.loads(out.read_text())
    assert few["task"] == "few-shot-2" and few["num_train"] == 2 * len(CLASSES) and few["few_shot"] == 2
    assert few["weight_decay"] == 0.01 and few["weight_decay_sweep"] == [] and 1 >= few["acc1"] >= PROBE_ACC1_MIN


def test_few_shot_larger_than_a_class_is_an_error(tiny_model_dir, probe_sets, tmp_path, capsys):
    train, test = probe_sets
    assert run(["evaluate", "linear-probe", "--checkpoint", str(tiny_model_dir), "--train", str(train),
                "--test", str(test), "--no-cache", "--few-shot", "4"]) == 1
    assert "fewer than k=4" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------------- suite


def test_suite_writes_one_json_per_task_and_a_summary(tiny_model_dir, captions, labelled, probe_sets, tmp_path):
    train, test = probe_sets
    config = tmp_path / "eval.yaml"
    config.write_text(f"""
model: {{checkpoint: "{tiny_model_dir}", name: tiny}}
output: results
tasks:
  - {{task: retrieval, data: "{captions}", k: [1, 5]}}
  - {{task: zeroshot, data: "{labelled}", templates: seeds, name: scenes}}
  - {{task: linear-probe, train: "{train}", test: "{test}", weight_decay: 0.01, name: scenes}}
""")
    out = tmp_path / "suite.json"
    assert run(["evaluate", "suite", "--config", str(config), "--json", str(out)]) == 0
    results = tmp_path / "results"
    assert sorted(p.name for p in results.glob("*.json")) == [
        f"tiny__{captions.parent.name}-captions__retrieval.json", "tiny__scenes__linear-probe.json",
        "tiny__scenes__zeroshot.json"]
    with (results / "summary.csv").open() as handle:
        rows = list(csv.DictReader(handle))
    assert [r["task"] for r in rows] == ["retrieval", "zeroshot", "linear-probe"]
    zeroshot = json.loads((results / "tiny__scenes__zeroshot.json").read_text())
    assert float(rows[1]["acc1"]) == zeroshot["acc1"] and rows[0]["acc1"] == ""
    assert float(rows[0]["image_retrieval_recall@5"]) == json.loads(out.read_text())["results"][0][
        "image_retrieval_recall@5"]
    table = (results / "summary.md").read_text().splitlines()
    assert table[0].startswith("| model | dataset | task |") and len(table) == 2 + 3
    assert "image_retrieval_recall@10" not in table[0]  # no task computed it


def test_suite_rejects_unknown_keys_before_running(tiny_model_dir, tmp_path, capsys):
    config = tmp_path / "eval.yaml"
    config.write_text(f"model: {{checkpoint: '{tiny_model_dir}'}}\ntasks:\n  - {{task: zeroshot, data: x, topk: 3}}\n")
    assert run(["evaluate", "suite", "--config", str(config)]) == 1
    err = capsys.readouterr().err
    assert "task 1: unknown key 'topk'" in err and len(err.strip().splitlines()) == 1


# ------------------------------------------------------------------------------------------------ bad input


def _write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


@pytest.mark.parametrize("case,status,message", [
    ("missing-column", 1, "no column 'caption'"),
    ("unknown-class", 1, "not one of the 2 classes"),
    ("empty", 1, "no data rows"),
    ("nothing-decodes", 1, "none of the 2 images could be decoded"),
    ("bad-k", 2, "--k '1,x'"),
    ("no-model", 2, "give --checkpoint"),
])
def test_bad_input_is_one_line_and_nonzero(tiny_model_dir, tmp_path, capsys, case, status, message):
    image = tmp_path / "a.png"
    Image.new("RGB", (64, 64), (200, 30, 30)).save(image)
    model = ["--checkpoint", str(tiny_model_dir)]
    if case == "missing-column":
        argv = ["retrieval", *model, "--data", str(_write(tmp_path / "c.csv", "image_path,text\na.png,a cat\n"))]
    elif case == "unknown-class":
        data = _write(tmp_path / "l.csv", "image_path,label\na.png,red star\na.png,pink hexagon\n")
        argv = ["zeroshot", *model, "--data", str(data), "--classes", "red star,blue circle"]
    elif case == "empty":
        argv = ["retrieval", *model, "--data", str(_write(tmp_path / "c.csv", "image_path,caption\n"))]
    elif case == "nothing-decodes":
        for name in ("x.png", "y.png"):
            corrupt(tmp_path / name)
        data = _write(tmp_path / "l.csv", "image_path,label\nx.png,red star\ny.png,blue circle\n")
        argv = ["zeroshot", *model, "--data", str(data)]
    elif case == "bad-k":
        argv = ["retrieval", *model, "--data", str(_write(tmp_path / "c.csv", "image_path,caption\na.png,x\n")),
                "--k", "1,x"]
    else:
        argv = ["retrieval", "--data", str(_write(tmp_path / "c.csv", "image_path,caption\na.png,x\n"))]
    assert run(["evaluate", *argv]) == status
    err = capsys.readouterr().err
    assert message in err, err
    assert len(err.strip().splitlines()) == 1 and err.startswith("clipforge evaluate: error:")


def test_missing_required_flag_is_a_usage_error(capsys):
    with pytest.raises(SystemExit) as exit_info:
        run(["evaluate", "retrieval", "--checkpoint", "x"])
    assert exit_info.value.code == 2 and "--data" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------------- report


def test_probe_report_has_confusion_and_sweep_plots(tmp_path):
    result = {"task": "linear-probe", "model": {"name": "m"}, "dataset": {"name": "d"}, "acc1": 0.5,
              "confusion_matrix": [[1, 1], [0, 2]], "per_class_recall": [{"class": "a"}, {"class": "b"}],
              "weight_decay": 1e-3, "weight_decay_sweep": [{"weight_decay": w, "val_acc1": a, "val_loss": 1.0}
                                                            for w, a in ((1e-4, 0.4), (1e-3, 0.6), (1e-2, 0.5))]}
    written = write_report(result, tmp_path / "report")
    assert sorted(written) == ["confusion", "json", "sweep"]
    assert written["json"].name == "m__d__linear-probe.json" and json.loads(written["json"].read_text()) == result
    for kind in ("confusion", "sweep"):
        assert_png(written[kind])


def test_summary_table_formats(tmp_path):
    results = [
        {"task": "zeroshot", "model": {"name": "m|1"}, "dataset": {"name": "d"}, "num_samples": 10, "num_failed": 0,
         "acc1": 0.5, "acc5": 1.0, "mean_per_class_recall": 0.25},
        {"task": "retrieval", "model": {"name": "m"}, "dataset": {"name": "c"}, "num_samples": 4, "num_failed": 1,
         "image_retrieval_recall@1": 0.75, "text_retrieval_recall@1": 0.125},
    ]
    written = write_summary(results, tmp_path)
    with written["csv"].open() as handle:
        rows = list(csv.DictReader(handle))
    assert rows[0]["acc1"] == "0.5" and rows[0]["image_retrieval_recall@1"] == ""
    assert rows[1]["text_retrieval_recall@1"] == "0.125" and "image_retrieval_recall@5" not in rows[1]
    lines = written["markdown"].read_text().splitlines()
    assert lines[2] == "| m\\|1 | d | zeroshot | 10 | 0 | 50.00 | 100.00 | 25.00 |  |  |"
    assert lines[3] == "| m | c | retrieval | 4 | 1 |  |  |  | 75.00 | 12.50 |"
