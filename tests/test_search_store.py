"""Embedding stores: layout and contents against the embedding path, bad items, WebDataset shards, and resume
after SIGKILL giving a byte-identical store."""

from __future__ import annotations

import io
import json
import os
import shutil
import signal
import subprocess
import sys
import tarfile
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
import torch

import clipforge
from clipforge.cli import search as search_cli
from clipforge.data.synthetic import make_scenes, write_caption_dataset
from clipforge.embed import embed_images, embed_texts
from clipforge.search.listing import expand_braces, list_source, read_span
from clipforge.search.store import EmbeddingStore, read_manifest
from clipforge.search.writer import EmbedSettings, embed_collection

SRC = Path(__file__).resolve().parents[1] / "src"


@pytest.fixture(scope="module")
def nano(tmp_path_factory):
    """A small random model saved as a folder, and the same model loaded from it."""
    torch.manual_seed(0)
    folder = clipforge.save_model(clipforge.create_model("ViT-Nano-8"), tmp_path_factory.mktemp("m") / "nano")
    model, preprocess, tokenizer = clipforge.load(folder)
    return folder, model, preprocess, tokenizer


@pytest.fixture(scope="module")
def table(tmp_path_factory):
    """A caption table of 20 generated scenes (PNG files beside it)."""
    return write_caption_dataset(tmp_path_factory.mktemp("data"), 20, size=64, seed=1)


@pytest.fixture(scope="module")
def full_store(table, nano, tmp_path_factory):
    """The table embedded in one uninterrupted run (parts of 8, batches of 4)."""
    output = tmp_path_factory.mktemp("stores") / "full"
    report = _embed([table], output, nano)
    return output, report


def _embed(sources, output, nano, **kwargs):
    folder, model, preprocess, tokenizer = nano
    settings = EmbedSettings(part_size=kwargs.pop("part_size", 8), batch_size=kwargs.pop("batch_size", 4))
    return embed_collection([str(s) for s in sources], output, model, preprocess, tokenizer, settings,
                            checkpoint=str(folder), progress=False, log=lambda line: None, **kwargs)


def _store_files(store: Path) -> dict[str, bytes]:
    return {str(p.relative_to(store)): p.read_bytes() for p in sorted(store.rglob("*")) if p.is_file()}


def test_store_holds_normalised_fp16_embeddings_of_every_item(table, nano, full_store):
    _, model, preprocess, tokenizer = nano
    path, report = full_store
    assert (report.parts_written, report.items_embedded, report.items_failed) == (3, 20, 0)

    manifest = read_manifest(path)
    assert manifest["complete"] and manifest["counts"] == {"items": 20, "parts": 3, "parts_done": 3, "vectors": 20,
                                                           "failed": 0}
    assert manifest["model"]["checkpoint"] == str(nano[0].resolve())
    assert manifest["preprocess"]["image_size"] == 64 and manifest["settings"]["part_size"] == 8
    assert [p["items"] for p in manifest["parts"].values()] == [[0, 8], [8, 16], [16, 20]]

    store = EmbeddingStore.open(path)
    parts = list(store.iter_parts())
    assert [p.shape for p in parts] == [(8, 256), (8, 256), (4, 256)] and parts[0].dtype == np.float16

    rows = [line.split(",", 1) for line in table.read_text().splitlines()[1:]]
    paths = [str((table.parent / p).resolve()) for p, _ in rows]
    expected = embed_images(model, paths, preprocess, batch_size=4, progress=False).embeddings.numpy()
    vectors = store.vectors()
    np.testing.assert_allclose(vectors, expected, atol=2e-3)  # float16 rounding of unit vectors
    np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=2e-3)

    meta = store.metadata().to_pydict()
    assert meta["path"] == paths and meta["item"] == list(range(20))
    assert meta["caption"] == [c for _, c in rows] and set(meta["width"]) == {64} and set(meta["height"]) == {64}
    texts = embed_texts(model, meta["caption"], tokenizer, progress=False).numpy()
    np.testing.assert_allclose(store.vectors("text_emb"), texts, atol=2e-3)
    assert store.row(9)["path"] == paths[9]
    np.testing.assert_array_equal(store.vector(9), vectors[9])


def test_unreadable_images_are_recorded_and_skipped(nano, tmp_path):
    folder = tmp_path / "photos"
    folder.mkdir()
    for i, scene in enumerate(make_scenes(5, size=64, seed=2)):
        scene.image.save(folder / f"{i}.jpg")
    jpeg = (folder / "2.jpg").read_bytes()
    (folder / "2.jpg").write_bytes(jpeg[:len(jpeg) // 3])  # truncated: item 2 must be reported
    png = io.BytesIO()
    make_scenes(1, size=64, seed=3)[0].image.save(png, "PNG")
    (folder / "5.png").write_bytes(png.getvalue()[:len(png.getvalue()) // 2])  # cut inside the pixel data
    (folder / "notes.jpg").write_text("not an image")  # not an image by content: not an item at all
    report = _embed([folder], tmp_path / "s", nano, part_size=4)
    assert (report.items_embedded, report.items_failed) == (4, 2)

    manifest = read_manifest(tmp_path / "s")
    failures = [f for part in manifest["parts"].values() for f in part["failures"]]
    assert [(f["item"], Path(f["path"]).name) for f in failures] == [(2, "2.jpg"), (5, "5.png")]
    assert "2.jpg': corrupt header" in failures[0]["reason"] and "5.png" in failures[1]["reason"]
    store = EmbeddingStore.open(tmp_path / "s")
    assert [Path(p).name for p in store.metadata()["path"].to_pylist()] == ["0.jpg", "1.jpg", "3.jpg", "4.jpg"]
    assert store.metadata()["item"].to_pylist() == [0, 1, 3, 4]
    assert not (tmp_path / "s" / "text_emb").exists()  # no captions, no text embeddings


def test_a_caption_table_with_several_captions_per_image_embeds_each_image_once(nano, tmp_path):
    scenes = make_scenes(2, size=64, seed=4)
    for i, scene in enumerate(scenes):
        scene.image.save(tmp_path / f"{i}.png")
    (tmp_path / "t.csv").write_text("image_path,caption\n0.png,first\n1.png,other\n0.png,second\n")
    _embed([tmp_path / "t.csv"], tmp_path / "s", nano)
    meta = EmbeddingStore.open(tmp_path / "s").metadata().to_pydict()
    assert [Path(p).name for p in meta["path"]] == ["0.png", "1.png"]
    assert meta["caption"] == ["first", "other"]
    assert [json.loads(c) for c in meta["captions"]] == [["first", "second"], ["other"]]


def _write_shard(path: Path, scenes, start: int) -> None:
    with tarfile.open(path, "w") as tar:
        for i, scene in enumerate(scenes):
            key = f"{start + i:06d}"
            image = io.BytesIO()
            scene.image.save(image, "JPEG", quality=95)
            for name, data in ((f"{key}.jpg", image.getvalue()), (f"{key}.txt", scene.caption.encode())):
                info = tarfile.TarInfo(name)
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))


def test_webdataset_shards_give_the_same_vectors_as_the_files(nano, tmp_path):
    scenes = make_scenes(6, size=64, seed=5)
    _write_shard(tmp_path / "shard-000.tar", scenes[:4], 0)
    _write_shard(tmp_path / "shard-001.tar", scenes[4:], 4)
    _embed([tmp_path / "shard-{000..001}.tar"], tmp_path / "s", nano)
    store = EmbeddingStore.open(tmp_path / "s")
    meta = store.metadata().to_pydict()
    assert meta["key"] == [f"{i:06d}" for i in range(6)] and meta["caption"] == [s.caption for s in scenes]

    _, model, preprocess, _ = nano
    blobs = [read_span(s, o, n) for s, o, n in zip(meta["shard"], meta["offset"], meta["size"], strict=True)]
    expected = embed_images(model, blobs, preprocess, batch_size=4, progress=False).embeddings.numpy()
    np.testing.assert_allclose(store.vectors(), expected, atol=2e-3)
    assert blobs[0][:2] == b"\xff\xd8"  # the JPEG itself, read back by offset


def test_sources_are_checked_where_they_enter(tmp_path):
    assert expand_braces("a-{08..11}.tar") == ["a-08.tar", "a-09.tar", "a-10.tar", "a-11.tar"]
    assert expand_braces("plain.tar") == ["plain.tar"]
    with pytest.raises(ValueError, match="no such file"):
        list_source([tmp_path / "missing"])
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no images found"):
        list_source([tmp_path / "empty"])
    (tmp_path / "notes.txt").write_text("x")
    with pytest.raises(ValueError, match="not a folder, a caption table"):
        list_source([tmp_path / "notes.txt"])
    (tmp_path / "t.csv").write_text("image_path,caption\n")
    with pytest.raises(ValueError, match="sources mix folder and table"):
        list_source([tmp_path / "empty", tmp_path / "t.csv"])
    (tmp_path / "bad.tar").write_bytes(b"\x1f\x8b" + b"0" * 600)
    with pytest.raises(ValueError, match=r"bad\.tar: not an uncompressed tar"):
        list_source([tmp_path / "bad.tar"])


def test_resume_refuses_a_changed_source_or_settings(table, nano, full_store, tmp_path):
    shutil.copytree(full_store[0], tmp_path / "s")
    with pytest.raises(ValueError, match="part_size=8, this run asks for 5"):
        _embed([table], tmp_path / "s", nano, part_size=5)
    other = write_caption_dataset(tmp_path / "other", 3, size=64, seed=9)
    with pytest.raises(ValueError, match="source changed"):
        _embed([other], tmp_path / "s", nano)
    report = _embed([table], tmp_path / "s", nano)  # finished and unchanged: nothing to do
    assert report.parts_written == 0
    (tmp_path / "junk").mkdir()
    (tmp_path / "junk" / "keep.txt").write_text("mine")
    with pytest.raises(ValueError, match="not an embedding store"):
        _embed([table], tmp_path / "junk", nano)


def test_uncommitted_part_files_are_rewritten_on_resume(table, nano, full_store, tmp_path):
    shutil.copytree(full_store[0], tmp_path / "s")
    manifest = json.loads((tmp_path / "s" / "manifest.json").read_text())
    del manifest["parts"]["part-00001"], manifest["parts"]["part-00002"]  # as if killed before these commits
    manifest["counts"].update(parts_done=1, vectors=8)
    manifest["complete"] = False
    (tmp_path / "s" / "manifest.json").write_text(json.dumps(manifest))
    (tmp_path / "s" / "img_emb" / "part-00001.npy").write_bytes(b"torn")  # a half-written part
    (tmp_path / "s" / "img_emb" / ".part-00002.npy.tmp").write_bytes(b"stray")
    with pytest.raises(ValueError, match="unfinished"):
        EmbeddingStore.open(tmp_path / "s")
    report = _embed([table], tmp_path / "s", nano)
    assert report.parts_written == 2
    assert _store_files(tmp_path / "s") == _store_files(full_store[0])


def test_resume_removes_the_temporary_files_a_killed_run_left(table, nano, full_store, tmp_path):
    shutil.copytree(full_store[0], tmp_path / "s")
    # Named as `clipforge.util.atomic_write` names them: a killed run can leave one beside any file it was replacing.
    for stray in (".manifest.json.k3j4h5g6.tmp", ".manifest.rank-00001.json.0a1b2c3d.tmp",
                  "img_emb/.part-00001.npy.x_y9z8w7.tmp", "metadata/.part-00000.parquet.abcdefgh.tmp"):
        (tmp_path / "s" / stray).write_bytes(b"torn")
    assert _embed([table], tmp_path / "s", nano).parts_written == 0
    assert _store_files(tmp_path / "s") == _store_files(full_store[0])


_RUNNER = textwrap.dedent("""
    import sys, time
    import torch
    torch.set_num_threads(1)
    import clipforge.cli as cli
    from clipforge.cli import search
    from clipforge.search import writer
    if sys.argv[1] == "slow":  # pause after writing each part's files, before the manifest commits it
        original = writer._embed_part
        def slow(*args, **kwargs):
            entry = original(*args, **kwargs)
            time.sleep(0.4)
            return entry
        writer._embed_part = slow
    if "embed" not in {c[0] for c in cli.COMMANDS}:
        cli.COMMANDS = [*cli.COMMANDS, *search.COMMANDS]
    sys.exit(cli.main(sys.argv[2:]))
""")


def _run_embed(mode: str, argv: list[str], **kwargs) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(SRC), "OMP_NUM_THREADS": "1"}
    return subprocess.Popen([sys.executable, "-c", _RUNNER, mode, "embed", *argv], env=env, stderr=subprocess.PIPE,
                            stdout=subprocess.PIPE, text=True, **kwargs)


@pytest.fixture
def one_thread():
    """The subprocess computes with one thread; the same here, so that every float is computed the same way."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_resume_after_sigkill_gives_the_same_store_as_an_uninterrupted_run(table, nano, tmp_path, one_thread):
    killed = _run_embed("slow", [str(table), "--checkpoint", str(nano[0]), "--part-size", "5", "--batch-size", "3",
                                 "--precision", "fp32", "--workers", "0", "--output", str(tmp_path / "resumed")])
    # The CLI's model: the same folder, fast JPEG decode (the default) and fp32.
    model, preprocess, tokenizer = clipforge.load(nano[0], fast_preprocess=True)
    settings = EmbedSettings(part_size=5, batch_size=3)
    run = {"checkpoint": str(nano[0]), "progress": False, "log": lambda line: None}
    # Meanwhile the uninterrupted run, decoding in worker processes: that must not change a byte either.
    embed_collection([str(table)], tmp_path / "full", model, preprocess, tokenizer, settings, num_workers=2, **run)

    manifest = tmp_path / "resumed" / "manifest.json"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and killed.poll() is None:
        if manifest.exists() and json.loads(manifest.read_text())["counts"]["parts_done"] >= 1:
            break
        time.sleep(0.02)
    assert killed.poll() is None, f"the run ended before it could be killed: {killed.communicate()[1][-500:]}"
    time.sleep(0.2)  # now inside a later part: its files written or being written, not committed
    killed.send_signal(signal.SIGKILL)
    killed.wait()
    done = json.loads(manifest.read_text())["counts"]["parts_done"]
    assert 1 <= done < 4, done

    logged = []
    report = embed_collection([str(table)], tmp_path / "resumed", model, preprocess, tokenizer, settings,
                              **{**run, "log": logged.append})
    assert logged[0] == f"resuming {tmp_path / 'resumed'}: {done} of 4 parts already done"
    assert report.parts_written == 4 - done
    assert _store_files(tmp_path / "resumed") == _store_files(tmp_path / "full")
    assert read_manifest(tmp_path / "resumed")["complete"]


def test_cli_embed_reports_bad_input_in_one_line(nano, tmp_path, capsys, monkeypatch):
    import clipforge.cli as cli

    monkeypatch.setattr(cli, "COMMANDS", [*cli.COMMANDS, *(c for c in search_cli.COMMANDS
                                                             if c[0] not in {x[0] for x in cli.COMMANDS})])
    status = cli.main(["embed", str(tmp_path / "nowhere"), "--checkpoint", str(nano[0]),
                       "--output", str(tmp_path / "s")])
    err = capsys.readouterr().err
    assert status == 1 and err.strip() == f"clipforge embed: error: {tmp_path / 'nowhere'}: no such file or folder"
    assert cli.main(["embed", str(tmp_path), "--checkpoint", str(nano[0]), "--output", str(tmp_path / "s"),
                     "--part-size", "0"]) == 2


def test_ranks_share_the_parts_and_a_resume_merges_what_each_recorded(table, nano, full_store, tmp_path):
    output = tmp_path / "ranked"
    # Two ranks run one after the other (a no-op barrier): rank 0 prepares the store and does parts 0 and 2,
    # rank 1 parts 1; rank 1's record stays in its own file (the merge is rank 0's, at the end of a real run).
    first = _embed([table], output, nano, rank=0, world_size=2, barrier=lambda: None)
    assert first.parts_written == 2 and not read_manifest(output)["complete"]
    second = _embed([table], output, nano, rank=1, world_size=2, barrier=lambda: None)
    assert second.parts_written == 1 and (output / "manifest.rank-00001.json").is_file()
    # A later run of any size folds the leftover record in, finds nothing to do, and the store is the single run's.
    resumed = _embed([table], output, nano)
    assert resumed.parts_written == 0 and not list(output.glob("manifest.rank-*"))
    assert _store_files(output) == _store_files(full_store[0])
    with pytest.raises(ValueError, match="barrier"):
        _embed([table], tmp_path / "x", nano, rank=0, world_size=2)
    with pytest.raises(ValueError, match="rank must be in"):
        _embed([table], tmp_path / "x", nano, rank=2, world_size=2, barrier=lambda: None)


def test_cli_embed_on_two_processes_writes_the_single_process_store(table, nano, tmp_path):
    stores = {}
    for devices in ("1", "2"):
        stores[devices] = tmp_path / f"devices-{devices}"
        proc = subprocess.run([sys.executable, "-m", "clipforge", "embed", str(table), "--checkpoint", str(nano[0]),
                               "--output", str(stores[devices]), "--part-size", "6", "--precision", "fp32",
                               "--workers", "0", "--devices", devices],
                              capture_output=True, text=True, timeout=300,
                              # One thread per process in both runs: the bytes then cannot differ by the thread
                              # count's effect on float summation order.
                              env={**os.environ, "PYTHONPATH": str(SRC), "OMP_NUM_THREADS": "1"})
        assert proc.returncode == 0, proc.stderr[-2000:]
    assert "2 processes; store complete: 20 image(s) embedded" in proc.stderr
    assert _store_files(stores["2"]) == _store_files(stores["1"])
