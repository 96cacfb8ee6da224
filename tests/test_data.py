"""Data layer: generated scenes, caption tables, labelled images, image discovery, and the tiny trained model."""

from __future__ import annotations

import io
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from clipforge.data import (
    CLASSES,
    find_images,
    make_scene,
    make_scenes,
    read_caption_table,
    read_labelled_images,
    write_caption_dataset,
    write_labelled_dataset,
)
from clipforge.data.shards import IMAGE_EXTENSIONS, is_shard_spec, sample_image, split_member_name
from clipforge.data.sources import group_by_image, source_kind
from clipforge.data.synthetic import BACKGROUNDS, COLOURS, SHAPES
from tests.trained_tiny import TARGET_ACCURACY, trained_tiny_model, zero_shot_scores


def _png_bytes(colour: tuple[int, int, int] = (200, 10, 10)) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (8, 8), colour).save(buffer, "PNG")
    return buffer.getvalue()


def _write(path: Path, content: str | bytes) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    if isinstance(content, bytes):
        path.write_bytes(content)
    else:
        path.write_text(content, encoding="utf-8")
    return path


def _images(folder: Path, *names: str) -> None:
    for name in names:
        _write(folder / name, _png_bytes())


# --------------------------------------------------------------------------------------------- synthetic


def test_scenes_are_deterministic_and_seed_dependent():
    a, b, c = make_scenes(20, seed=3), make_scenes(20, seed=3), make_scenes(20, seed=4)
    assert [s.caption for s in a] == [s.caption for s in b]
    assert all(np.array_equal(np.asarray(x.image), np.asarray(y.image)) for x, y in zip(a, b, strict=True))
    assert [s.caption for s in a] != [s.caption for s in c]


def test_scene_fields_agree_with_the_pixels():
    for scene in make_scenes(60, size=48, seed=1):
        assert scene.image.size == (48, 48) and scene.image.mode == "RGB"
        assert scene.label == f"{scene.colour} {scene.shape}" and scene.label in CLASSES
        assert scene.colour in scene.caption and scene.shape in scene.caption
        # The subject's colour is the most common non-background colour in the image.
        pixels = np.asarray(scene.image).reshape(-1, 3).astype(int)
        palette = {**COLOURS, **{f"bg-{k}": v for k, v in BACKGROUNDS.items()}}
        names = list(palette)
        nearest = np.argmin([np.abs(pixels - np.array(palette[n])).sum(1) for n in names], axis=0)
        counts = {n: int((nearest == i).sum()) for i, n in enumerate(names) if not n.startswith("bg-")}
        assert max(counts, key=counts.get) == scene.colour, (scene.caption, counts)


def test_classes_and_fixed_subject():
    assert len(CLASSES) == len(COLOURS) * len(SHAPES) == len(set(CLASSES))
    import random

    scene = make_scene(random.Random(0), 32, n_shapes=1, colour="blue", shape="star")
    assert (scene.label, scene.image.size) == ("blue star", (32, 32))
    with pytest.raises(ValueError, match="unknown colour 'teal'"):
        make_scene(random.Random(0), colour="teal")
    with pytest.raises(ValueError, match="n_shapes must be 1 or 2"):
        make_scene(random.Random(0), n_shapes=3)


def test_thousand_scenes_are_fast():
    start = time.process_time()  # CPU time: a busy machine must not fail the test
    make_scenes(1000, size=64, seed=0)
    assert time.process_time() - start < 2.0


@pytest.mark.parametrize("fmt", ["csv", "tsv", "parquet"])
def test_caption_dataset_round_trip(tmp_path, fmt):
    table_path = write_caption_dataset(tmp_path / "ds", 12, size=32, seed=5, fmt=fmt)
    assert table_path == tmp_path / "ds" / f"captions.{fmt}"
    table = read_caption_table(table_path)
    scenes = make_scenes(12, size=32, seed=5)
    assert table.captions == [s.caption for s in scenes]
    assert table.image_paths[0] == tmp_path / "ds" / "images" / "000000.png"
    # PNG is lossless: the files hold exactly the generated pixels.
    for path, scene in zip(table.image_paths, scenes, strict=True):
        assert np.array_equal(np.asarray(Image.open(path).convert("RGB")), np.asarray(scene.image))


def test_labelled_dataset_folder_and_table_agree(tmp_path):
    root = write_labelled_dataset(tmp_path / "lab", 2, size=32, seed=0)
    from_folder = read_labelled_images(root)
    from_table = read_labelled_images(root / "labels.csv")
    assert from_folder.classes == from_table.classes == sorted(CLASSES)
    assert len(from_folder) == len(from_table) == 2 * len(CLASSES)
    pairs = [sorted(zip(found.paths, found.labels, strict=True)) for found in (from_folder, from_table)]
    assert pairs[0] == pairs[1]
    assert [from_folder.classes[t] for t in from_folder.targets] == from_folder.labels


# ------------------------------------------------------------------------------------------ caption tables


def test_csv_with_bom_quotes_and_multiline_fields(tmp_path):
    _images(tmp_path, "a.png", "b b.png", "sub/c.png")
    text = ('\ufeffimage_path,caption,split\n'
            'a.png,"a cat, a dog",train\n'
            '\n'
            '"b b.png","two\nlines",dev\n'
            'sub/c.png,  padded  ,dev\n')
    table = read_caption_table(_write(tmp_path / "t.csv", text))
    assert table.captions == ["a cat, a dog", "two\nlines", "padded"]
    assert table.image_paths == [tmp_path / "a.png", tmp_path / "b b.png", tmp_path / "sub" / "c.png"]
    assert table.lines == [2, 4, 6]
    dev = table.where("split", "dev")
    assert dev.captions == ["two\nlines", "padded"] and dev.lines == [4, 6]


def test_tsv_and_image_root(tmp_path):
    _images(tmp_path / "imgs", "x.png")
    path = _write(tmp_path / "meta" / "t.tsv", "file\ttext\nx.png\ta, b and c\n")
    table = read_caption_table(path, image_col="file", caption_col="text", image_root=tmp_path / "imgs")
    assert table.captions == ["a, b and c"] and table.image_paths == [tmp_path / "imgs" / "x.png"]


@pytest.mark.parametrize(("content", "message"), [
    ("image,text\na.png,hi\n", "t.csv: no column 'image_path' (columns found: image, text); did you mean 'image'"),
    ("image_path,caption\na.png,hi\na.png,\n", "t.csv line 3: field 'caption' is empty"),
    ("image_path,caption\na.png,hi\n ,x\n", "t.csv line 3: field 'image_path' is empty"),
    ("image_path,caption\na.png,hi\nb.png,hi\n", "t.csv line 3: field 'image_path': image file"),
    ("image_path,caption\na.png,hi\na.png,hi,there\n", "t.csv line 3: 3 field(s) but the header has 2"),
    ("image_path,caption\n", "t.csv: no data rows"),
    ("", "t.csv: empty file"),
    ('image_path,caption\na.png,hi\na.png,"open quote\n', "t.csv line 3: malformed CSV (unexpected end of data)"),
    ("image_path,caption,caption\na.png,1,2\n", "t.csv line 1: column 'caption' appears twice"),
])
def test_caption_table_errors(tmp_path, content, message):
    _images(tmp_path, "a.png")
    with pytest.raises(ValueError) as err:
        read_caption_table(_write(tmp_path / "t.csv", content))
    text = str(err.value)
    assert message in text and "\n" not in text


def test_missing_image_message_counts_and_hints(tmp_path):
    _images(tmp_path, "a.png")
    path = _write(tmp_path / "t.csv", "image_path,caption\na.png,x\nb.png,y\nc.png,z\n")
    expected = r"line 3: field 'image_path': image file '.*/b\.png' not found \(2 of 3 rows .*pass image_root="
    with pytest.raises(ValueError, match=expected):
        read_caption_table(path)
    assert len(read_caption_table(path, check_files=False)) == 3


def test_encoding_errors(tmp_path):
    latin1 = "image_path,caption\na.png,ok\na.png,caf\u00e9\n".encode("latin-1")
    with pytest.raises(ValueError, match=r"t\.csv line 3: not valid UTF-8 \(byte 0xe9 .*save the file as UTF-8"):
        read_caption_table(_write(tmp_path / "t.csv", latin1))
    utf16 = "image_path,caption\na.png,x\n".encode("utf-16")
    with pytest.raises(ValueError, match=r"u\.csv: the file is UTF-16 encoded; save it as UTF-8"):
        read_caption_table(_write(tmp_path / "u.csv", utf16))
    with pytest.raises(ValueError, match=r"nope\.csv: no such file"):
        read_caption_table(tmp_path / "nope.csv")
    with pytest.raises(ValueError, match="is a folder"):
        read_caption_table(tmp_path)


def test_parquet_round_trip_and_errors(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    _images(tmp_path, "a.png", "b.png")
    pq.write_table(pa.table({"image_path": ["a.png", "b.png"], "caption": ["first", "second"], "n": [1, 2]}),
                   tmp_path / "t.parquet")
    table = read_caption_table(tmp_path / "t.parquet")
    assert table.captions == ["first", "second"] and table.lines == [1, 2] and table.columns == {"n": ["1", "2"]}
    pq.write_table(pa.table({"image_path": ["a.png", "b.png"], "caption": ["first", None]}), tmp_path / "n.parquet")
    with pytest.raises(ValueError, match=r"n\.parquet row 2: field 'caption' is empty"):
        read_caption_table(tmp_path / "n.parquet")
    with pytest.raises(ValueError, match=r"x\.parquet: not a readable Parquet file"):
        read_caption_table(_write(tmp_path / "x.parquet", "image_path,caption\n"))


# ----------------------------------------------------------------------------------------- labelled images


def test_image_folder_found_by_content(tmp_path):
    root = tmp_path / "root"
    _write(root / "cats" / "photo.txt", _png_bytes())  # PNG data, odd extension: an image
    _write(root / "cats" / "notes.jpg", "not an image")  # text with an image extension: not one
    _write(root / "cats" / "deep" / "er" / "x.bin", _png_bytes())
    _write(root / "cats" / ".hidden.png", _png_bytes())
    _write(root / "cats" / ".cache" / "y.png", _png_bytes())
    _write(root / "dogs" / "d.png", _png_bytes())
    _write(root / "README.png", _png_bytes())  # files at the root belong to no class
    _write(root / ".git" / "z.png", _png_bytes())
    found = read_labelled_images(root)
    assert found.classes == ["cats", "dogs"]
    cats = root / "cats"
    assert found.paths == [cats / "deep" / "er" / "x.bin", cats / "photo.txt", root / "dogs" / "d.png"]
    assert found.labels == ["cats", "cats", "dogs"] and found.targets == [0, 0, 1]


def test_image_folder_errors(tmp_path):
    _write(tmp_path / "a" / "cats" / "c.png", _png_bytes())
    _write(tmp_path / "a" / "dogs" / "notes.txt", "woof")
    with pytest.raises(ValueError, match=r"dogs: class folder holds no images"):
        read_labelled_images(tmp_path / "a")
    _write(tmp_path / "b" / "c.png", _png_bytes())
    with pytest.raises(ValueError, match=r"b: no class subfolders"):
        read_labelled_images(tmp_path / "b")


def test_labels_table(tmp_path):
    _images(tmp_path, "a.png", "b.png")
    path = _write(tmp_path / "labels.csv", "image,label,split\na.png,rose,train\nb.png,daisy,train\n")
    found = read_labelled_images(path, image_col="image")
    assert (found.labels, found.classes, found.targets) == (["rose", "daisy"], ["daisy", "rose"], [1, 0])
    _write(tmp_path / "bad.csv", "image_path,label\na.png,rose\nb.png,\n")
    with pytest.raises(ValueError, match=r"bad\.csv line 3: field 'label' is empty"):
        read_labelled_images(tmp_path / "bad.csv")
    with pytest.raises(ValueError, match=r"no column 'label' \(columns found: image_path, tag\)"):
        read_labelled_images(_write(tmp_path / "c.csv", "image_path,tag\na.png,x\n"))


# ---------------------------------------------------------------------------------------------- discovery


def test_find_images(tmp_path):
    _write(tmp_path / "d" / "b.png", _png_bytes())
    _write(tmp_path / "d" / "a" / "z.dat", _png_bytes())
    _write(tmp_path / "d" / "fake.jpg", "hello")
    _write(tmp_path / "d" / "bmw.bmp", "BMW cars are not bitmaps, even when the text is long")
    _write(tmp_path / "d" / ".hidden.png", _png_bytes())
    jpeg = io.BytesIO()
    Image.new("RGB", (4, 4)).save(jpeg, "JPEG")
    single = _write(tmp_path / "one.jpeg.txt", jpeg.getvalue())
    text = _write(tmp_path / "t.txt", "text")
    found = find_images([single, tmp_path / "d", text, str(tmp_path / "d" / "b.png")])
    assert found == [single, tmp_path / "d" / "a" / "z.dat", tmp_path / "d" / "b.png"]
    assert find_images(tmp_path / "d") == find_images([tmp_path / "d"])
    with pytest.raises(ValueError, match=r"missing: no such file or folder"):
        find_images([tmp_path / "missing"])
    with pytest.raises(ValueError, match=r"no images found in .*t\.txt"):
        find_images(text)


# ------------------------------------------------------------------------------------------- source kinds


def test_source_kind_names_folders_tables_and_shards(tmp_path):
    (tmp_path / "photos").mkdir()
    _write(tmp_path / "t.csv", "image_path,caption\n")
    _write(tmp_path / "notes.txt", "x")
    _write(tmp_path / "a{b}.csv", "image_path,caption\n")  # an existing file is judged by its name alone
    _write(tmp_path / "s.TAR", b"")
    assert source_kind(tmp_path / "photos") == "folder" and source_kind(tmp_path / "t.csv") == "table"
    assert source_kind(tmp_path / "a{b}.csv") == "table" and source_kind(tmp_path / "s.TAR") == "wds"
    for spec in ("shards-{000..009}.tar", "https://host/s-000.tar?token=1", "a.tar::b.tar", "missing.tar"):
        assert is_shard_spec(spec) and source_kind(spec) == "wds", spec
    assert source_kind(tmp_path / "notes.txt") == "table"  # its reader says what is wrong with it
    assert source_kind(tmp_path / "t.csv", tables=(".csv",)) == "table"
    with pytest.raises(ValueError, match=r"notes\.txt: not a folder, a caption table \(\.csv, \.tsv\) or a \.tar"):
        source_kind(tmp_path / "notes.txt", tables=(".csv", ".tsv"))


def test_shard_members_split_like_webdataset_and_samples_find_their_image():
    assert split_member_name("000123.jpg") == ("000123", "jpg")
    assert split_member_name("part/000123.Seg.PNG") == ("part/000123", "seg.png")
    assert split_member_name("a.b/000123.TIFF") == ("a.b/000123", "tiff")
    assert split_member_name("part/README") is None and split_member_name("part/.hidden.jpg") is None
    assert {"jpg", "png", "webp", "gif", "tif", "tiff"} <= set(IMAGE_EXTENSIONS)
    assert sample_image({"__key__": "k", "txt": b"c", "gif": b"GIF89a"}) == b"GIF89a"
    assert sample_image({"png": b"p", "jpg": b"j"}) == b"j"  # the first of IMAGE_EXTENSIONS wins
    assert sample_image({"txt": b"c"}) is None


def test_group_by_image_groups_any_per_row_value():
    assert group_by_image(["a", "b", "a"], ["x", "y", "z"]) == (["a", "b"], [["x", "z"], ["y"]])
    assert group_by_image(["a", "b", "a"], range(3)) == (["a", "b"], [[0, 2], [1]])


# ------------------------------------------------------------------------------------------- tiny model


@pytest.fixture(scope="module")
def tiny_model_dir(tmp_path_factory) -> Path:
    return trained_tiny_model(tmp_path_factory.getbasetemp() / "trained-tiny")


def test_trained_tiny_model_is_cached_and_clears_its_target(tiny_model_dir, tmp_path_factory):
    assert (tiny_model_dir / "model.safetensors").is_file() and (tiny_model_dir / "config.json").is_file()
    start = time.perf_counter()
    assert trained_tiny_model(tmp_path_factory.getbasetemp() / "trained-tiny") == tiny_model_dir
    assert time.perf_counter() - start < 1.0  # the second call reuses the saved folder
    scores = zero_shot_scores(tiny_model_dir)
    # It learned the colours (chance 1/6) and, through them, the classes well above chance (1/24).
    assert scores["colour"] >= 0.9 and scores["top1"] >= TARGET_ACCURACY, scores
