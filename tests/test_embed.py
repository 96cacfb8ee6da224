"""The shared batch-embedding path: same numbers as the model, failures reported in input order."""

from __future__ import annotations

import io

import pytest
import torch
from PIL import Image

import clipforge
from clipforge.embed import embed_images, embed_texts
from clipforge.transforms import PreprocessConfig, image_transform


@pytest.fixture(scope="module")
def nano():
    torch.manual_seed(0)
    return clipforge.create_model("ViT-Nano-8").eval()


def _png(colour, size=(40, 30)) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", size, colour).save(buffer, format="PNG")
    return buffer.getvalue()


def test_images_match_direct_encoding_and_failures_keep_their_place(nano, tmp_path):
    preprocess = image_transform(PreprocessConfig(image_size=nano.image_size))
    good = tmp_path / "red.png"
    good.write_bytes(_png("red"))
    broken = tmp_path / "broken.jpg"
    broken.write_bytes(b"not an image")
    items = [str(good), _png("blue"), str(broken), Image.new("RGB", (64, 64), "green"), str(tmp_path / "nope.png")]

    result = embed_images(nano, items, preprocess, batch_size=2, progress=False)

    assert result.indices == [0, 1, 3]
    assert [f[0] for f in result.failures] == [2, 4]
    assert "broken.jpg" in result.failures[0][2] and "not an image" in result.failures[0][2]
    assert "file not found" in result.failures[1][2]
    pixels = torch.stack([preprocess(Image.open(good)), preprocess(Image.open(io.BytesIO(items[1]))),
                          preprocess(items[3])])
    with torch.no_grad():
        expected = nano.encode_image(pixels, normalize=True)
    torch.testing.assert_close(result.embeddings, expected, atol=1e-6, rtol=0)
    assert result.embeddings.norm(dim=-1).sub(1).abs().max() < 1e-5


def test_worker_processes_give_the_same_embeddings(nano, tmp_path):
    preprocess = image_transform(PreprocessConfig(image_size=nano.image_size))
    paths = []
    for i, colour in enumerate(["red", "green", "blue", "white", "black"]):
        paths.append(tmp_path / f"{i}.png")
        paths[-1].write_bytes(_png(colour))
    single = embed_images(nano, paths, preprocess, batch_size=2, progress=False)
    workers = embed_images(nano, paths, preprocess, batch_size=2, num_workers=2, progress=False)
    assert workers.indices == single.indices == [0, 1, 2, 3, 4]
    torch.testing.assert_close(workers.embeddings, single.embeddings, atol=0, rtol=0)


def test_all_failing_or_empty_input_gives_an_empty_matrix(nano):
    preprocess = image_transform(PreprocessConfig(image_size=nano.image_size))
    result = embed_images(nano, [b"junk"], preprocess, progress=False)
    assert result.embeddings.shape == (0, nano.embed_dim) and len(result.failures) == 1
    assert embed_images(nano, [], preprocess, progress=False).embeddings.shape[0] == 0


def test_texts_match_direct_encoding_across_batches(nano):
    tokenizer = clipforge.Tokenizer(nano.context_length)
    texts = [f"a photo of {n} red squares" for n in range(7)]
    got = embed_texts(nano, texts, tokenizer, batch_size=3, progress=False)
    with torch.no_grad():
        expected = nano.encode_text(tokenizer(texts), normalize=True)
    torch.testing.assert_close(got, expected, atol=1e-6, rtol=0)
    unnormalised = embed_texts(nano, texts[:2], tokenizer, normalize=False, progress=False)
    assert not torch.allclose(unnormalised.norm(dim=-1), torch.ones(2))


def test_bad_arguments_are_refused(nano):
    preprocess = image_transform(PreprocessConfig(image_size=nano.image_size))
    with pytest.raises(ValueError, match="batch_size must be >= 1"):
        embed_images(nano, [b"x"], preprocess, batch_size=0, progress=False)
    with pytest.raises(TypeError, match="list of strings"):
        embed_texts(nano, "one string", clipforge.Tokenizer(nano.context_length), progress=False)
