"""Image-text retrieval: the metrics (`retrieval_metrics`: Recall@K, mean and median rank in both directions)
and the one evaluation of a model on captioned images (`evaluate_captioned_images`: embed, then score), which
`clipforge evaluate retrieval` and training's validation both use, so that they report the same numbers.

Metric names follow CLIP_benchmark:

* ``image_retrieval_recall@K`` (text -> image): a caption is a hit when its image is among the K
  best-scoring images of the whole gallery.
* ``text_retrieval_recall@K`` (image -> text): an image is a hit when ANY of its captions is among the K
  best-scoring captions.

Ranks start at 1 and ties count against the model: the rank of a correct item is
``1 + #{wrong items scoring >= the correct score}``, so a wrong item tied with the correct one always
ranks ahead of it and a tie is never a hit. For image -> text the correct score is that of the image's
best-scoring caption. Recall@K is then ``mean(rank <= K)``; a K larger than the gallery gives 1.0.

Scores are dot products of the embeddings (pass L2-normalised embeddings for cosine similarity). The
score matrix is computed in blocks of captions, so memory stays bounded: two
``chunk_size x N_images`` fp32 buffers (128 MiB with the default block of 2**24 scores) beside the inputs;
the full score matrix of 25,000 captions x 5,000 images would take 477 MiB.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..embed import embed_texts
from .accuracy import as_float_matrix
from .features import image_features

__all__ = ["RetrievalEvaluation", "evaluate_captioned_images", "retrieval_metrics", "validate_ks"]

# Scores per block when chunk_size is not given: 2**24 fp32 = 64 MiB. Fewer, larger blocks mean fewer
# thread synchronisations, which matters on a busy machine (on a shared 2-core machine, 25k x 5k with
# 2**22-score blocks took ~1.6x the CPU time); the memory stays bounded whatever the gallery size.
_BLOCK_SCORES = 1 << 24
# Blocks of at least this many rows: BLAS kernels give bit-identical results for identical vectors
# within and across blocks of this size, which keeps exact ties (duplicate captions or images) exact.
_MIN_ROWS = 64
# Counts are summed as fp32 0/1 values through BLAS (far faster than summing bools); exact below 2**24.
_FP32_EXACT_COUNT = 1 << 24


def retrieval_metrics(
    image_emb: torch.Tensor,
    text_emb: torch.Tensor,
    text_to_image: torch.Tensor | Sequence[int],
    ks: Iterable[int] = (1, 5, 10),
    chunk_size: int | None = None,
    return_ranks: bool = False,
) -> dict[str, Any]:
    """Recall@K and mean/median rank for text -> image and image -> text retrieval.

    Args:
        image_emb: [N_img, E] image embeddings (float; half precision is computed in fp32).
        text_emb: [N_txt, E] caption embeddings.
        text_to_image: [N_txt] integers, the row of ``image_emb`` each caption describes. Every image needs
            at least one caption (an image without one has no defined image -> text rank).
        ks: the K values of Recall@K.
        chunk_size: captions scored per block; default: as many as fit in 2**24 scores. Values below 64 are
            raised to 64: BLAS can round identical dot products differently in tiny blocks, which would
            break exact ties between duplicate captions or images.
        return_ranks: also return ``image_retrieval_ranks`` ([N_txt] int64, the rank of each caption's
            image) and ``text_retrieval_ranks`` ([N_img] int64, the rank of each image's best caption).

    Returns:
        ``image_retrieval_recall@K`` and ``text_retrieval_recall@K`` for each K (fractions in [0, 1]),
        ``{image,text}_retrieval_{mean,median}_rank`` (the median of an even count is the mean of the two
        middle ranks), ``num_images``, ``num_texts``, and the rank tensors when asked.
    """
    image_emb, text_emb, text_to_image = _validate(image_emb, text_emb, text_to_image)
    ks = validate_ks(ks)
    rows = _chunk_rows(chunk_size, len(text_emb), len(image_emb))
    t2i_ranks, i2t_ranks = _ranks(image_emb, text_emb, text_to_image, rows)

    out: dict[str, Any] = {}
    for k in ks:
        out[f"image_retrieval_recall@{k}"] = (t2i_ranks <= k).double().mean().item()
        out[f"text_retrieval_recall@{k}"] = (i2t_ranks <= k).double().mean().item()
    for name, ranks in (("image_retrieval", t2i_ranks), ("text_retrieval", i2t_ranks)):
        out[f"{name}_mean_rank"] = ranks.double().mean().item()
        out[f"{name}_median_rank"] = _median(ranks)
    out["num_images"], out["num_texts"] = len(image_emb), len(text_emb)
    if return_ranks:
        out["image_retrieval_ranks"], out["text_retrieval_ranks"] = t2i_ranks.cpu(), i2t_ranks.cpu()
    return out


# --- evaluation of a model ------------------------------------------------------------------------------


@dataclass
class RetrievalEvaluation:
    """What `evaluate_captioned_images` measured, and on what.

    The images and captions are those that took part: the images that decoded, in input order, and their
    captions, image by image in input order (all of the first kept image's captions, then the next image's).
    """

    metrics: dict[str, Any]  # `retrieval_metrics` (fractions, CLIP_benchmark names), without the rank tensors
    images: list[str | Path]  # the images that decoded
    kept: list[int]  # the input index of each of them
    captions: list[str]
    text_to_image: torch.Tensor  # [N_captions] int64: the row of `images` each caption describes
    image_embeddings: torch.Tensor  # [N_images, E] float32, L2-normalised
    text_embeddings: torch.Tensor  # [N_captions, E] float32, L2-normalised
    image_retrieval_ranks: torch.Tensor  # [N_captions] int64: rank of each caption's image (text -> image)
    text_retrieval_ranks: torch.Tensor  # [N_images] int64: rank of each image's best caption (image -> text)
    failures: list[tuple[int, str, str]]  # (input index, image, reason) of the images that did not decode
    num_dropped_captions: int  # the captions of those images, left out with them


def evaluate_captioned_images(
    model,
    preprocess: Callable,
    tokenizer: Callable,
    images: Sequence[str | Path],
    captions: Sequence[Sequence[str]],
    ks: Iterable[int] = (1, 5, 10),
    *,
    batch_size: int = 64,
    num_workers: int = 0,
    progress: bool = True,
    source: str | Path = "images",
) -> RetrievalEvaluation:
    """Text -> image and image -> text retrieval of `model` on image files with their captions.

    `captions[i]` is the list of captions of `images[i]` (at least one each). Images are embedded with
    `embed_images` (`batch_size` at a time, `num_workers` decoding processes) through `preprocess`, captions
    with `embed_texts` (``max(batch_size, 64)`` at a time) through `tokenizer`, both L2-normalised and in the
    model's own precision (no autocast; the model's train/eval mode is left as it is), and scored with
    `retrieval_metrics`. Images that fail to decode are left out with their captions; ValueError (naming
    `source`) when none decodes or the captions do not fit the images.
    """
    ks = validate_ks(ks)
    captions = _caption_lists(images, captions, source)
    embedded = image_features(model, preprocess, images, batch_size=batch_size, num_workers=num_workers,
                              progress=progress, desc="embedding images", source=source)
    kept_captions: list[str] = []
    owners: list[int] = []
    for row, index in enumerate(embedded.indices):
        kept_captions += captions[index]
        owners += [row] * len(captions[index])
    text_emb = embed_texts(model, kept_captions, tokenizer, batch_size=max(batch_size, 64), normalize=True,
                           progress=progress, desc="embedding captions")
    text_to_image = torch.tensor(owners, dtype=torch.long)
    metrics = retrieval_metrics(embedded.embeddings, text_emb, text_to_image, ks, return_ranks=True)
    t2i_ranks, i2t_ranks = metrics.pop("image_retrieval_ranks"), metrics.pop("text_retrieval_ranks")
    return RetrievalEvaluation(
        metrics=metrics, images=[images[i] for i in embedded.indices], kept=list(embedded.indices),
        captions=kept_captions, text_to_image=text_to_image, image_embeddings=embedded.embeddings,
        text_embeddings=text_emb, image_retrieval_ranks=t2i_ranks, text_retrieval_ranks=i2t_ranks,
        failures=list(embedded.failures),
        num_dropped_captions=sum(len(c) for c in captions) - len(kept_captions))


def _caption_lists(images: Sequence[Any], captions: Sequence[Sequence[str]], source: str | Path) -> list[list[str]]:
    """`captions` as one non-empty list per image, else a ValueError saying which image is wrong."""
    if len(captions) != len(images):
        raise ValueError(f"{source}: {len(images)} images but {len(captions)} caption lists; give each image "
                         "the list of its captions")
    lists = []
    for i, texts in enumerate(captions):
        if isinstance(texts, str):  # a bare string would be read as a list of one-character captions
            raise ValueError(f"{source}: the captions of image {i} ({images[i]}) are one string; give a list")
        if not texts:
            raise ValueError(f"{source}: image {i} ({images[i]}) has no caption; every image needs at least one")
        lists.append(list(texts))
    return lists


# --- validation -----------------------------------------------------------------------------------------


def _as_embeddings(x: Any, name: str) -> torch.Tensor:
    return as_float_matrix(x, name, "retrieval_metrics", "[N, E]", keep_fp64=True)  # fp64 is kept as given


def _validate(image_emb: Any, text_emb: Any, text_to_image: Any) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    image_emb = _as_embeddings(image_emb, "image_emb")
    text_emb = _as_embeddings(text_emb, "text_emb")
    if image_emb.shape[1] != text_emb.shape[1]:
        raise ValueError(f"retrieval_metrics: image_emb has width {image_emb.shape[1]} but text_emb has "
                         f"{text_emb.shape[1]}; both must come from the same model")
    if image_emb.device != text_emb.device:
        raise ValueError(f"retrieval_metrics: image_emb is on {image_emb.device}, text_emb on {text_emb.device}")
    text_emb = text_emb.to(image_emb.dtype)
    t2i = torch.as_tensor(text_to_image)
    if t2i.ndim != 1 or len(t2i) != len(text_emb):
        raise ValueError(f"retrieval_metrics: text_to_image must be a vector of {len(text_emb)} image indices "
                         f"(one per caption), got shape {tuple(t2i.shape)}")
    if t2i.is_floating_point() or t2i.is_complex() or t2i.dtype == torch.bool:
        raise ValueError(f"retrieval_metrics: text_to_image must hold integer image indices, got {t2i.dtype}")
    t2i = t2i.to(device=image_emb.device, dtype=torch.long)
    out_of_range = ((t2i < 0) | (t2i >= len(image_emb))).nonzero()
    if len(out_of_range):
        row = int(out_of_range[0])
        raise ValueError(f"retrieval_metrics: text_to_image[{row}] = {int(t2i[row])} is not an image index "
                         f"(there are {len(image_emb)} images)")
    uncaptioned = (torch.bincount(t2i, minlength=len(image_emb)) == 0).nonzero().flatten()
    if len(uncaptioned):
        shown = ", ".join(str(int(i)) for i in uncaptioned[:5]) + (", ..." if len(uncaptioned) > 5 else "")
        raise ValueError(f"retrieval_metrics: {len(uncaptioned)} image(s) have no caption (rows {shown}); "
                         "image -> text retrieval needs at least one per image, so drop them from image_emb")
    return image_emb, text_emb, t2i


def validate_ks(ks: Iterable[int]) -> list[int]:
    """The K values of Recall@K, sorted and without repeats; ValueError unless they are positive integers."""
    ks = list(ks)
    if not ks or any(isinstance(k, bool) or not isinstance(k, int | np.integer) or k < 1 for k in ks):
        raise ValueError(f"retrieval_metrics: ks must be positive integers, got {ks}")
    return sorted({int(k) for k in ks})


def _chunk_rows(chunk_size: int | None, n_texts: int, n_images: int) -> int:
    if chunk_size is None:
        return max(_MIN_ROWS, _BLOCK_SCORES // n_images)
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1:
        raise ValueError(f"retrieval_metrics: chunk_size must be a positive integer, got {chunk_size!r}")
    return max(_MIN_ROWS, chunk_size)


def _median(ranks: torch.Tensor) -> float:
    ordered = ranks.sort().values.double()
    n = len(ordered)
    return float(ordered[n // 2]) if n % 2 else float((ordered[n // 2 - 1] + ordered[n // 2]) / 2)


# --- ranks ----------------------------------------------------------------------------------------------


def _even_bounds(n: int, rows: int) -> list[tuple[int, int]]:
    """Split range(n) into blocks of at most `rows`, all of (nearly) equal size: no tiny last block,
    whose BLAS kernel could round identical dot products differently from the others."""
    n_blocks = -(-n // rows)
    edges = [round(i * n / n_blocks) for i in range(n_blocks + 1)]
    return list(itertools.pairwise(edges))


def _count_ge(block: torch.Tensor, threshold: torch.Tensor, dim: int, buf: torch.Tensor) -> torch.Tensor:
    """Count of `block >= threshold` along `dim`, as int64."""
    n = block.shape[dim]
    if n >= _FP32_EXACT_COUNT:
        return (block >= threshold).sum(dim)
    torch.ge(block, threshold, out=buf)
    ones = torch.ones(n, dtype=block.dtype, device=block.device)
    counts = buf @ ones if dim == 1 else ones @ buf
    return counts.round().long()


def _image_thresholds(image_emb: torch.Tensor, text_emb: torch.Tensor, t2i: torch.Tensor,
                      bounds: list[tuple[int, int]]) -> tuple[torch.Tensor, torch.Tensor]:
    """A band [lower, upper] per image that surely holds its best caption score as the matmul computes it.

    Image -> text needs each image's best correct score before scanning all captions, but that score is
    only known exactly once every block has been scored. Element-wise dot products give it up front, up
    to rounding: both they and the matmul are within gamma_E * |a| |b| of the exact value (the standard
    bound for any summation order, gamma_E = E u / (1 - E u)), so the matmul's value lies in the band.
    Captions scoring above the band surely beat the image's best caption; the few inside it are kept and
    compared exactly afterwards.
    """
    n_img, dim = image_emb.shape
    own = torch.empty(len(text_emb), dtype=image_emb.dtype, device=image_emb.device)
    for start, stop in bounds:
        own[start:stop] = (text_emb[start:stop] * image_emb[t2i[start:stop]]).sum(1)
    best = torch.full((n_img,), -torch.inf, dtype=own.dtype, device=own.device).scatter_reduce(0, t2i, own, "amax")
    text_norm = torch.zeros_like(best).scatter_reduce(0, t2i, text_emb.norm(dim=1), "amax")
    u = torch.finfo(image_emb.dtype).eps / 2
    gamma = dim * u / (1 - dim * u)
    # 2 gamma: the element-wise and matmul values may err in opposite directions; x1.01 covers the
    # rounding of the norms themselves.
    delta = 2.02 * gamma * image_emb.norm(dim=1) * text_norm
    return best - delta, best + delta


def _ranks(image_emb: torch.Tensor, text_emb: torch.Tensor, t2i: torch.Tensor,
           rows: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Rank of each caption's image (text -> image) and of each image's best caption (image -> text)."""
    n_txt, n_img = len(text_emb), len(image_emb)
    device, dtype = image_emb.device, image_emb.dtype
    bounds = _even_bounds(n_txt, rows)
    lower, upper = _image_thresholds(image_emb, text_emb, t2i, bounds)

    t2i_ranks = torch.empty(n_txt, dtype=torch.long, device=device)
    own = torch.empty(n_txt, dtype=dtype, device=device)  # each caption's score with its image, as the matmul gives it
    above = torch.zeros(n_img, dtype=torch.long, device=device)  # captions scoring >= upper, per image
    band_text, band_image, band_score = [], [], []  # captions scoring within [lower, upper)
    max_rows = max(stop - start for start, stop in bounds)
    # Two buffers reused across blocks: fresh 10s-of-MiB allocations would be returned to the OS and
    # page-faulted back in on every block.
    scores = torch.empty(max_rows, n_img, dtype=dtype, device=device)
    buf = torch.empty_like(scores)
    image_t = image_emb.T
    for start, stop in bounds:
        block = torch.mm(text_emb[start:stop], image_t, out=scores[: stop - start])  # [B, N_img]
        b_buf = buf[: stop - start]
        mine = block.gather(1, t2i[start:stop, None])
        own[start:stop] = mine.squeeze(1)
        # The correct image scores >= itself, so this count is 1 + the wrong images at or above it.
        t2i_ranks[start:stop] = _count_ge(block, mine, 1, b_buf)
        hi = _count_ge(block, upper, 0, b_buf)
        above += hi
        lo = _count_ge(block, lower, 0, b_buf)
        cols = (lo > hi).nonzero().flatten()  # images with a score inside their band in this block
        if len(cols):
            sub = block[:, cols]
            r, c = ((sub >= lower[cols]) & (sub < upper[cols])).nonzero(as_tuple=True)
            band_text.append(r + start)
            band_image.append(cols[c])
            band_score.append(sub[r, c])

    best = torch.full((n_img,), -torch.inf, dtype=dtype, device=device).scatter_reduce(0, t2i, own, "amax")
    if not ((best >= lower) & (best <= upper)).all():
        raise RuntimeError("retrieval_metrics: the matrix product is less precise than fp32 allows (TF32 or "
                           "reduced-precision matmul enabled?); disable it to get exact ranks")
    # Correct captions counted in `above` are not competitors (only possible when best == upper).
    correct_above = torch.bincount(t2i[own >= upper[t2i]], minlength=n_img)
    wrong_at_or_above = above - correct_above
    if band_text:
        text_i, image_i, score = torch.cat(band_text), torch.cat(band_image), torch.cat(band_score)
        beats = (t2i[text_i] != image_i) & (score >= best[image_i])
        wrong_at_or_above += torch.bincount(image_i[beats], minlength=n_img)
    return t2i_ranks, 1 + wrong_at_or_above
