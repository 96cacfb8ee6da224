"""End-to-end training runs on generated scenes: learning, kill -9 and resume, fine-tuning, bad data.

Each run uses a tiny CLIP (32 px, 2+2 layers of width 64) and one CPU thread: on a shared 2-core machine one
thread is faster than two (no spinning threads competing for a core) and makes every run bit-reproducible.
"""

from __future__ import annotations

import csv
import json
import math
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from clipforge.cli.train import main as train_main
from clipforge.data.synthetic import write_caption_dataset
from clipforge.train.config import load_config
from clipforge.train.run import train

TINY = ["model.image_size=32", "model.vision_width=64", "model.vision_layers=2", "model.patch_size=8",
        "model.text_width=64", "model.text_layers=2", "model.text_heads=2", "model.embed_dim=64",
        "model.context_length=16", "data.workers=0", "run.threads=1", "run.precision=32-true", "run.progress=false",
        "run.tensorboard=false", "run.log_every_steps=1"]


@pytest.fixture(scope="module")
def scenes(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("scenes")
    return {"train": write_caption_dataset(root / "train", 512, size=32, seed=0),
            "val": write_caption_dataset(root / "val", 128, size=32, seed=1)}


@pytest.fixture(autouse=True)
def _restore_threads():
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


def _set_flags(items: list[str]) -> list[str]:
    return [arg for item in items for arg in ("--set", item)]


def _rows(path: Path) -> list[dict[str, str]]:
    with path.open(newline="") as handle:
        return list(csv.DictReader(handle))


def _losses(run: Path) -> dict[int, float]:
    return {int(r["step"]): float(r["loss"]) for r in _rows(run / "logs" / "metrics.csv") if r.get("loss")}


def _recall_at_1(final: Path, table: Path) -> float:
    """Text->image R@1 of a saved model on a caption table (one caption per image)."""
    import clipforge
    from clipforge.data.loading import pairs_from_table
    from clipforge.embed import embed_images, embed_texts
    from clipforge.eval.retrieval import retrieval_metrics

    model, preprocess, tokenizer = clipforge.load(final)
    pairs = pairs_from_table(table)
    images = embed_images(model, pairs.images, preprocess, progress=False)
    texts = embed_texts(model, [c[0] for c in pairs.captions], tokenizer, progress=False)
    return retrieval_metrics(images.embeddings, texts, list(range(len(texts))))["image_retrieval_recall@1"]


def test_small_model_learns_on_generated_scenes(scenes, tmp_path) -> None:
    cfg = load_config(None, [*TINY, f"data.train={scenes['train']}", f"data.val={scenes['val']}",
                             f"run.output={tmp_path}", "optim.epochs=6", "optim.batch_size=64", "optim.lr=3e-3",
                             "optim.warmup=5"])
    summary = train(cfg)

    # 128 validation images: chance is R@1 = 1/128 = 0.8 % and R@10 = 7.8 %. Under chance the number of R@1
    # hits is ~Poisson(1), so >= 7 hits (5.5 %) has probability < 1e-4; R@10 >= 35 % is 45 hits against 10
    # expected. Measured: R@1 ~10 % and R@10 ~60 % both ways after these 48 steps (the captions do not
    # identify single images, so even a perfect model stays far below 100 %).
    val = summary["validation"]
    for direction in ("image", "text"):
        assert val[f"{direction}_retrieval_recall@1"] >= 0.055, val
        assert val[f"{direction}_retrieval_recall@10"] >= 0.35, val
    assert summary["steps"] == 6 * (512 // 64)

    losses = _losses(tmp_path)
    assert sorted(losses) == list(range(48))
    assert sum(list(losses.values())[-8:]) / 8 < sum(list(losses.values())[:8]) / 8 - 0.5  # the loss came down
    header = _rows(tmp_path / "logs" / "metrics.csv")[0].keys()
    assert {"step", "epoch", "loss", "lr", "logit_scale", "samples_per_sec", "data_wait",
            "val/image_retrieval_recall@1", "val/text_retrieval_recall@10"} <= set(header)
    assert len((tmp_path / "val.jsonl").read_text().splitlines()) == 6  # one validation pass per epoch

    # The final model is a clipforge folder that loads with its preprocessing and reproduces the validation.
    import clipforge

    model, _, tokenizer = clipforge.load(tmp_path / "final")
    assert model.image_size == 32 and tokenizer.context_length == 16 and not model.training
    assert _recall_at_1(tmp_path / "final", scenes["val"]) == pytest.approx(val["image_retrieval_recall@1"])
    saved = load_config(tmp_path / "config.yaml")  # the resolved config, saved with the run
    assert saved == cfg


def test_resume_after_kill_continues_the_same_loss_curve(scenes, tmp_path) -> None:
    args = ["--train-data", str(scenes["train"]), "--epochs", "2", "--batch-size", "64", "--lr", "2e-3",
            "--set", "optim.warmup=3", "--set", "run.checkpoint_every_steps=4", *_set_flags(TINY)]
    killed = tmp_path / "killed"
    process = subprocess.Popen([sys.executable, "-m", "clipforge.cli.train", *args, "--output", str(killed)],
                               stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    metrics = killed / "logs" / "metrics.csv"
    deadline = time.monotonic() + 120
    try:
        # Kill it (SIGKILL: no cleanup of any kind) once it has logged step 5 of 16, past the checkpoint at step 4.
        while process.poll() is None and time.monotonic() < deadline:
            if metrics.is_file() and any(int(r["step"]) >= 5 for r in _rows(metrics)):
                os.kill(process.pid, signal.SIGKILL)
                break
            time.sleep(0.02)
    finally:
        if process.poll() is None and time.monotonic() >= deadline:
            process.kill()
        stderr = process.communicate()[1].decode(errors="replace")
    assert process.returncode == -signal.SIGKILL, f"the run ended before it could be killed: {stderr[-800:]}"
    assert not (killed / "final").exists()
    before = _losses(killed)

    assert train_main(["--output", str(killed), "--resume", "latest"]) == 0  # the run's own config.yaml
    resumed = _losses(killed)
    reference_dir = tmp_path / "reference"
    assert train_main([*args, "--output", str(reference_dir)]) == 0
    reference = _losses(reference_dir)

    assert sorted(resumed) == list(range(16))  # one continuous curve, no step missing or repeated
    assert json.loads((killed / "summary.json").read_text())["steps"] == 16
    # Optimizer, schedule, data order and augmentation all continue exactly: the same curve as a run never killed.
    for step, loss in reference.items():
        assert resumed[step] == pytest.approx(loss, rel=1e-5, abs=1e-6), step
    for step, loss in before.items():
        assert resumed[step] == pytest.approx(loss, rel=1e-5, abs=1e-6), step
    import clipforge

    assert clipforge.load(killed / "final")[0].image_size == 32


# Two captions per image (word dropout makes them differ) with the caption-to-caption term: its negatives must
# span both ranks too.
SEVERAL_CAPTIONS = ["data.sample_captions=true", "data.captions_per_image=2", "data.word_dropout=0.3",
                    "loss.caption_contrast=0.5"]


def test_a_checkpoint_of_the_previous_version_resumes_the_same_curve(scenes, tmp_path) -> None:
    """Checkpoints written before the towers became attributes list the temperature after the text tower's own
    tensors, and count steps as manual optimisation: resuming one continues the run that wrote it exactly."""
    from clipforge.train.parameters import match_optimizer_state

    overrides = [*TINY, f"data.train={scenes['train']}", "optim.epochs=2", "optim.batch_size=64", "optim.lr=2e-3",
                 "optim.warmup=3", "run.keep_epoch_checkpoints=2"]
    reference = train(load_config(None, [*overrides, f"run.output={tmp_path / 'reference'}"]))
    assert reference["steps"] == 16
    checkpoint = torch.load(tmp_path / "reference" / "checkpoints" / "epoch-0.ckpt", weights_only=True)
    assert checkpoint["global_step"] == 8
    # The previous version's checkpoint: its state dict's order, the optimizer state in that order without names,
    # and the step count in the manual-optimisation counters.
    keys = list(checkpoint["state_dict"])
    keys.remove("model.logit_scale")
    keys.insert(keys.index("model.text_projection") + 1, "model.logit_scale")
    checkpoint["state_dict"] = {key: checkpoint["state_dict"][key] for key in keys}
    names = checkpoint["clipforge"].pop("optimizer_params")
    old_order = [[key for key in keys if key in set(group)] for group in names]
    assert old_order != names
    match_optimizer_state(checkpoint["optimizer_states"][0], names, old_order)
    loop = checkpoint["loops"]["fit_loop"]
    automatic = loop["epoch_loop.automatic_optimization.optim_progress"]["optimizer"]
    loop["epoch_loop.manual_optimization.optim_step_progress"] = automatic["step"]
    automatic["step"] = {part: dict.fromkeys(counts, 0) for part, counts in automatic["step"].items()}
    automatic["zero_grad"] = {part: dict.fromkeys(counts, 0) for part, counts in automatic["zero_grad"].items()}
    old = tmp_path / "old.ckpt"
    torch.save(checkpoint, old)

    resumed = train(load_config(None, [*overrides, f"run.output={tmp_path / 'resumed'}"]), resume=str(old))
    assert resumed["steps"] == 16
    want, got = _losses(tmp_path / "reference"), _losses(tmp_path / "resumed")
    assert sorted(got) == list(range(8, 16))
    for step in got:
        assert got[step] == pytest.approx(want[step], rel=1e-5, abs=1e-6), step


@pytest.mark.parametrize("settings", [[], SEVERAL_CAPTIONS], ids=["one-caption", "several-captions"])
def test_two_process_ddp_follows_the_single_process_run(scenes, tmp_path, settings) -> None:
    """`--devices 2 --strategy ddp` (two CPU processes, gloo) with 32 images each trains exactly as one process
    with the same 64-image global batch: the features are gathered so the negatives span both ranks, DDP averages
    the gradients, and the sampler deals the same items out. Lightning launches the second rank by running the
    same command again, so the runs are CLI subprocesses."""
    common = ["--train-data", str(scenes["train"]), "--max-steps", "5", "--lr", "3e-3", "--set", "optim.warmup=1",
              "--set", "run.accelerator=cpu", *_set_flags([*TINY, *settings])]
    runs = {"single": ["--batch-size", "64"],
            "ddp": ["--batch-size", "32", "--devices", "2", "--strategy", "ddp"]}
    for name, extra in runs.items():
        done = subprocess.run([sys.executable, "-m", "clipforge.cli.train", *common, *extra,
                               "--output", str(tmp_path / name)], capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stderr[-2000:]

    single, ddp = _losses(tmp_path / "single"), _losses(tmp_path / "ddp")
    assert sorted(ddp) == list(range(5))
    for step, loss in single.items():  # measured: equal to the last bit
        assert ddp[step] == pytest.approx(loss, rel=1e-6), step
    import clipforge

    state = clipforge.load(tmp_path / "single" / "final")[0].state_dict()
    other = clipforge.load(tmp_path / "ddp" / "final")[0].state_dict()
    distance = sum(float((state[k] - other[k]).pow(2).sum()) for k in state)
    norm = sum(float(v.pow(2).sum()) for v in state.values())
    assert math.sqrt(distance / norm) < 1e-5  # measured 1.6e-7 (the gradients are summed in another order)
    assert json.loads((tmp_path / "ddp" / "summary.json").read_text())["steps"] == 5


def test_fine_tune_with_locked_image_tower(scenes, tmp_path) -> None:
    import clipforge
    from clipforge.train.models import build_model

    start = tmp_path / "start"
    model, _, _ = build_model(load_config(None, TINY).model)
    with torch.no_grad():
        model.logit_scale.fill_(6.0)  # above ln(100): the first step must clamp it
    clipforge.save_model(model, start)
    before = {k: v.clone() for k, v in model.state_dict().items()}

    out = tmp_path / "run"
    status = train_main(["--train-data", str(scenes["train"]), "--output", str(out), "--init", str(start),
                         "--lock-image", "--max-steps", "1", "--batch-size", "32", "--precision", "bf16-mixed",
                         "--set", "run.threads=1", "--set", "data.workers=0", "--no-progress"])
    assert status == 0
    after, _, _ = clipforge.load(out / "final")
    state = after.state_dict()
    assert all(torch.equal(state[k], v) for k, v in before.items() if k.startswith("visual."))
    assert not torch.equal(state["text_projection"], before["text_projection"])
    assert state["logit_scale"].item() == pytest.approx(math.log(100), abs=1e-6)  # clamped after the step


def test_too_many_bad_items_stop_the_run_with_examples(tmp_path, capsys) -> None:
    table = write_caption_dataset(tmp_path / "data", 64, size=32, seed=3)
    images = sorted((tmp_path / "data" / "images").iterdir())
    for path in images[:16]:  # a quarter of the images are not images
        path.write_bytes(b"not an image")
    out = tmp_path / "run"
    status = train_main(["--train-data", str(table), "--output", str(out), "--epochs", "4", "--batch-size", "16",
                         "--set", "data.max_bad_fraction=0.1", *_set_flags(TINY)])
    assert status == 1
    message = capsys.readouterr().err
    assert "could not be used" in message and "max_bad_fraction=0.1" in message
    assert re.search(r"images/0000(0\d|1[0-5])\.png': not an image", message)  # first examples, with the reason
    seen, fraction = re.search(r"of (\d+) training items \(([\d.]+)%\)", message).groups()
    assert 200 <= int(seen) < 230 and 20 <= float(fraction) <= 30  # stopped at the first check, 25 % bad
    assert max(_losses(out)) < 15  # ... long before the last of the 16 steps
    assert not (out / "final").exists()


def test_captions_per_image_trains_and_bad_settings_get_one_line(scenes, tmp_path, capsys) -> None:
    out = tmp_path / "run"
    flags = ["--train-data", str(scenes["train"]), "--batch-size", "32", "--set", "optim.max_steps=3"]
    status = train_main([*flags, "--output", str(out), "--set", "data.sample_captions=true",
                         "--set", "data.captions_per_image=2", "--set", "loss.caption_contrast=0.5",
                         *_set_flags(TINY)])
    assert status == 0
    losses = _losses(out)
    assert len(losses) == 3 and all(math.isfinite(v) for v in losses.values())
    status = train_main([*flags, "--output", str(tmp_path / "bad"), "--set", "data.captions_per_image=2",
                         *_set_flags(TINY)])
    message = capsys.readouterr().err.strip().splitlines()
    assert status == 1 and any("data.captions_per_image=2 needs data.sample_captions: true" in m for m in message)
    status = train_main([*flags, "--output", str(tmp_path / "bad2"), "--set", "loss.caption_contrast=0.5",
                         *_set_flags(TINY)])
    message = capsys.readouterr().err.strip().splitlines()
    assert status == 1 and message == ["clipforge train: error: loss.caption_contrast=0.5 needs "
                                       "data.captions_per_image of 2 or more (it contrasts the captions of each "
                                       "image) and a weight >= 0; or set it to 0"]


def test_weight_average_is_what_validation_sees_and_the_final_model_holds(scenes, tmp_path) -> None:
    cfg = load_config(None, [*TINY, f"data.train={scenes['train']}", f"data.val={scenes['val']}",
                             f"run.output={tmp_path}", "optim.max_steps=6", "optim.batch_size=64", "optim.lr=3e-3",
                             "optim.warmup=2", "optim.ema_decay=0.5"])
    summary = train(cfg)
    checkpoint = torch.load(tmp_path / "checkpoints" / "last.ckpt", weights_only=True)
    assert checkpoint["global_step"] == 6
    average, live = checkpoint["clipforge"]["ema"], checkpoint["state_dict"]
    import clipforge

    final = clipforge.load(tmp_path / "final")[0].state_dict()
    assert all(torch.equal(final[k], v) for k, v in average.items())
    assert not torch.equal(final["text_projection"], live["model.text_projection"])
    val = summary["validation"]["image_retrieval_recall@1"]
    assert _recall_at_1(tmp_path / "final", scenes["val"]) == pytest.approx(val)


@pytest.mark.parametrize("precision", ["32-true", "bf16-mixed"])
def test_validation_is_what_evaluate_retrieval_gives_for_the_saved_model(scenes, tmp_path, precision) -> None:
    """Validation runs the evaluation core: its Recall@K equals `evaluate_retrieval` on the saved model loaded at
    the run's precision, to the last digit."""
    import clipforge
    from clipforge.eval.tasks import evaluate_retrieval
    from clipforge.model import canonical_precision

    cfg = load_config(None, [*TINY, f"data.train={scenes['train']}", f"data.val={scenes['val']}",
                             f"run.output={tmp_path}", "optim.max_steps=8", "optim.batch_size=64", "optim.lr=3e-3",
                             "optim.warmup=2", f"run.precision={precision}", "data.val_batch_size=64"])
    validation = train(cfg)["validation"]
    model, preprocess, tokenizer = clipforge.load(tmp_path / "final", precision=canonical_precision(precision))
    evaluated = evaluate_retrieval(model, preprocess, tokenizer, scenes["val"], batch_size=64, progress=False)
    recalls = {key: value for key, value in evaluated.items() if "recall@" in key}
    assert len(recalls) == 6 and 0 < recalls["image_retrieval_recall@10"] < 1
    assert {key: validation[key] for key in recalls} == recalls


def test_fsdp_is_refused_with_one_line_before_any_process_starts(scenes, tmp_path, capsys) -> None:
    status = train_main(["--train-data", str(scenes["train"]), "--output", str(tmp_path), "--strategy", "fsdp",
                         *_set_flags(TINY)])
    message = capsys.readouterr().err.strip().splitlines()
    assert status == 1 and len(message) == 1
    assert "run.strategy=fsdp is not supported yet" in message[0] and "--strategy ddp" in message[0]
    assert not (tmp_path / "config.yaml").exists()
