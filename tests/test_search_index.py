"""The vector index: planning under a memory budget, FAISS results against brute-force NumPy, and search by
text, image and item on a store built from generated images."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

import clipforge
from clipforge.cli import search as search_cli
from clipforge.data.synthetic import write_caption_dataset
from clipforge.embed import embed_texts
from clipforge.search.index import (
    DEFAULT_FLAT_THRESHOLD,
    KINDS,
    SearchIndex,
    build_faiss_index,
    build_index,
    estimate_bytes,
    exact_search,
    parse_size,
    plan_index,
)
from clipforge.search.writer import EmbedSettings, embed_collection


def _unit_vectors(n: int, dim: int, seed: int) -> np.ndarray:
    x = np.random.default_rng(seed).standard_normal((n, dim)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def _clustered(n: int, dim: int, seed: int, clusters: int = 64) -> np.ndarray:
    """Unit vectors around a few centres, the shape real embeddings have (IVF's recall depends on it)."""
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((clusters, dim))
    x = centres[rng.integers(0, clusters, n)] + 0.35 * rng.standard_normal((n, dim))
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def test_sizes_parse_and_the_cli_copies_of_the_constants_agree():
    assert parse_size("512M") == 512 * 2**20 and parse_size("4GiB") == 4 * 2**30 and parse_size("1.5k") == 1536
    assert parse_size("1000") == 1000 and parse_size(None) is None
    with pytest.raises(ValueError, match="memory budget 'lots'"):
        parse_size("lots")
    assert search_cli.KINDS == KINDS and search_cli.DEFAULT_FLAT_THRESHOLD == DEFAULT_FLAT_THRESHOLD


def test_the_plan_follows_size_and_memory_budget():
    assert plan_index(50_000, 512).kind == "flat"
    big = plan_index(1_000_000, 512)
    assert (big.kind, big.nlist, big.nprobe) == ("ivf", 4000, 62)
    assert big.estimated_bytes == estimate_bytes("ivf", 1_000_000, 512, 4000)
    assert plan_index(1_000_000, 512, memory_budget="1G").kind == "ivf-sq8"  # full vectors need 1.9 GiB
    pq = plan_index(1_000_000, 512, memory_budget="200M")
    assert (pq.kind, pq.pq_m) == ("ivf-pq", 64) and pq.estimated_bytes <= 200 * 2**20
    assert plan_index(50_000, 512, memory_budget="50M").kind == "ivf-sq8"  # 98 MiB of fp32 vectors do not fit
    with pytest.raises(ValueError, match=r"over the memory budget of 1\.0 MiB"):
        plan_index(1_000_000, 512, memory_budget="1M")
    with pytest.raises(ValueError, match="unknown index kind 'annoy'"):
        plan_index(10, 8, kind="annoy")
    hnsw = plan_index(1000, 64, kind="hnsw")
    assert (hnsw.hnsw_m, hnsw.ef_search) == (32, 128)


def test_flat_index_ranks_exactly_like_brute_force():
    vectors, queries = _unit_vectors(3000, 64, 0), _unit_vectors(20, 64, 1)
    params = plan_index(len(vectors), 64)
    index = build_faiss_index(params, [vectors[:1000], vectors[1000:]])  # ids continue across parts
    scores, ids = index.search(queries, 10)
    want_scores, want_ids = exact_search(vectors, queries, 10)
    np.testing.assert_array_equal(ids, want_ids)
    np.testing.assert_allclose(scores, want_scores, atol=1e-5)


@pytest.mark.parametrize("kind,n,min_recall", [("ivf", 5000, 0.9), ("ivf-sq8", 5000, 0.9), ("hnsw", 5000, 0.9),
                                                ("ivf-pq", 2500, 0.4)])  # PQ's training is the slow one
def test_approximate_indexes_find_most_true_neighbours(kind, n, min_recall):
    vectors, queries = _clustered(n, 32, 2), _clustered(50, 32, 3)
    params = plan_index(len(vectors), 32, kind=kind)
    index = build_faiss_index(params, [vectors])
    _, ids = index.search(queries, 10)
    _, want = exact_search(vectors, queries, 10)
    recall = np.mean([len(set(a) & set(b)) / 10 for a, b in zip(ids, want, strict=True)])
    assert recall >= min_recall, f"{kind}: recall@10 {recall:.2f}"
    if kind == "ivf":  # visiting every cell is exhaustive search
        index.nprobe = params.nlist
        np.testing.assert_array_equal(index.search(queries, 10)[1], want)


@pytest.fixture(scope="module")
def indexed(tmp_path_factory):
    """A store of 24 generated scenes embedded by a small random model, with its flat index."""
    torch.manual_seed(0)
    root = tmp_path_factory.mktemp("search")
    folder = clipforge.save_model(clipforge.create_model("ViT-Nano-8"), root / "nano")
    model, preprocess, tokenizer = clipforge.load(folder)
    table = write_caption_dataset(root / "data", 24, size=64, seed=3)
    embed_collection([str(table)], root / "store", model, preprocess, tokenizer,
                     EmbedSettings(part_size=10, batch_size=8), checkpoint=str(folder), progress=False,
                     log=lambda line: None)
    build_index(root / "store")
    return root, model, tokenizer, table


def test_text_search_ranks_like_brute_force_over_the_store(indexed):
    root, model, tokenizer, _ = indexed
    index = SearchIndex.open(root / "store")
    assert len(index) == 24 and index.params.kind == "flat"
    vectors = index.store.vectors()
    for text in ("a red star", "a photo of a blue circle and a green square"):
        hits = index.search_text(text, k=5)
        query = embed_texts(model, [text], tokenizer, progress=False).numpy()
        want_scores, want_ids = exact_search(vectors, query, 5)
        assert [h.id for h in hits] == want_ids[0].tolist()
        np.testing.assert_allclose([h.score for h in hits], want_scores[0], atol=1e-5)
        assert hits[0].path == index.store.row(hits[0].id)["path"] and hits[0].caption
    assert len(index.search_text("anything", k=1000)) == 24  # k is capped at the collection


def test_image_search_finds_the_image_itself_and_more_like_this_skips_it(indexed):
    root, *_ = indexed
    index = SearchIndex.open(root / "store")
    row = index.store.row(7)
    hits = index.search_image(row["path"], k=3)
    assert hits[0].id == 7 and hits[0].score == pytest.approx(1.0, abs=2e-3)
    similar = index.search_similar(7, k=5)
    assert len(similar) == 5 and 7 not in [h.id for h in similar]
    want = exact_search(index.store.vectors(), index.store.vector(7)[None], 6)[1][0].tolist()
    assert [h.id for h in similar] == [i for i in want if i != 7][:5]
    with pytest.raises(IndexError, match="vector id 24 is out of range"):
        index.search_similar(24)
    with pytest.raises(ValueError, match="cannot decode image"):
        index.search_image(b"not an image")


def test_a_stale_or_missing_index_is_refused(indexed, tmp_path):
    root, *_ = indexed
    import shutil

    shutil.copytree(root / "store", tmp_path / "store")
    params = json.loads((tmp_path / "store" / "index" / "index.json").read_text())
    params["extra"]["store"]["vectors"] = 23
    (tmp_path / "store" / "index" / "index.json").write_text(json.dumps(params))
    with pytest.raises(ValueError, match="index is older than the store"):
        SearchIndex.open(tmp_path / "store")
    shutil.rmtree(tmp_path / "store" / "index")
    with pytest.raises(ValueError, match="no index yet; build it with `clipforge index"):
        SearchIndex.open(tmp_path / "store")


def _main(argv, monkeypatch):
    import clipforge.cli as cli

    known = {c[0] for c in cli.COMMANDS}
    monkeypatch.setattr(cli, "COMMANDS", [*cli.COMMANDS, *(c for c in search_cli.COMMANDS if c[0] not in known)])
    return cli.main(argv)


def test_cli_index_and_search_json(indexed, tmp_path, capsys, monkeypatch):
    root, *_ = indexed
    import shutil

    shutil.copytree(root / "store", tmp_path / "store")
    assert _main(["index", str(tmp_path / "store"), "--kind", "ivf", "--nlist", "2", "--nprobe", "2"],
                 monkeypatch) == 0
    assert "ivf index of 24 x 256, nlist 2, nprobe 2" in capsys.readouterr().err
    assert _main(["search", "a red star", "--index", str(tmp_path / "store"), "-k", "4", "--json"], monkeypatch) == 0
    out = json.loads(capsys.readouterr().out)
    want = SearchIndex.open(root / "store").search_text("a red star", k=4)  # nprobe = nlist: exact
    assert [r["id"] for r in out["results"]] == [h.id for h in want] and out["query"] == {"text": "a red star"}
    assert set(out["results"][0]) >= {"id", "score", "path", "caption", "width", "height"}

    image = SearchIndex.open(root / "store").store.row(3)["path"]
    assert _main(["search", "--image", image, "--index", str(tmp_path / "store"), "-k", "1"], monkeypatch) == 0
    assert capsys.readouterr().out.split()[:3] == ["1", "1.0000", image]
    assert _main(["search", "--index", str(tmp_path / "store")], monkeypatch) == 2
    assert "exactly one query" in capsys.readouterr().err
    assert _main(["index", str(tmp_path), "--memory-budget", "1G"], monkeypatch) == 1
    assert "not an embedding store" in capsys.readouterr().err
