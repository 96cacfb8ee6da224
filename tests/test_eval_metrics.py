"""Evaluation metrics: retrieval recall and ranks, classification metrics, linear probe, few-shot sampling.

Retrieval cases are hand-built score matrices: with identity image embeddings, text_emb @ image_emb.T is
exactly the matrix written down, so ties are exact.
"""

from __future__ import annotations

import pytest
import torch

from clipforge.eval.accuracy import classification_metrics, target_ranks
from clipforge.eval.probe import few_shot_indices, linear_probe
from clipforge.eval.retrieval import retrieval_metrics


def _from_scores(scores: list[list[float]], text_to_image: list[int], **kwargs) -> dict:
    """Retrieval metrics of a [N_txt, N_img] score matrix given as-is."""
    text = torch.tensor(scores, dtype=torch.float32)
    return retrieval_metrics(torch.eye(text.shape[1]), text, torch.tensor(text_to_image), **kwargs)


def _brute_force_ranks(image: torch.Tensor, text: torch.Tensor, t2i: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The rank definitions written out on the full score matrix (exact in float64 for integer inputs)."""
    scores = text.double() @ image.double().T
    correct = t2i[:, None] == torch.arange(len(image))  # [N_txt, N_img]
    own = scores[correct]  # one per caption, in caption order
    t2i_ranks = 1 + ((scores >= own[:, None]) & ~correct).sum(1)
    best = scores.masked_fill(~correct, -torch.inf).amax(0)  # best correct caption score per image
    i2t_ranks = 1 + ((scores >= best) & ~correct).sum(0)
    return t2i_ranks, i2t_ranks


# --- retrieval ------------------------------------------------------------------------------------------

# 3 images, 4 captions (image 0 has two). Written out per caption (row) and image (column):
#   caption 0 -> image 0: best in its row                                  -> text->image rank 1
#   caption 1 -> image 0: image 1 scores higher, image 2 ties (0.3)         -> rank 3
#   caption 2 -> image 1: image 0 ties (0.4)                                -> rank 2
#   caption 3 -> image 2: two images score higher                           -> rank 3
#   image 0: best caption (0.9) beats every other caption                   -> image->text rank 1
#   image 1: its caption scores 0.4; captions 1 (0.5) and 3 (0.6) beat it   -> rank 3
#   image 2: its caption scores 0.1; captions 0, 1 beat it, caption 2 ties  -> rank 4
HAND_SCORES = [[0.9, 0.1, 0.2], [0.3, 0.5, 0.3], [0.4, 0.4, 0.1], [0.2, 0.6, 0.1]]
HAND_T2I = [0, 0, 1, 2]


def test_retrieval_hand_built_ranks_ties_and_several_captions():
    m = _from_scores(HAND_SCORES, HAND_T2I, ks=(1, 2, 3, 4), return_ranks=True)
    assert m["image_retrieval_ranks"].tolist() == [1, 3, 2, 3]
    assert m["text_retrieval_ranks"].tolist() == [1, 3, 4]
    assert m["image_retrieval_recall@1"] == pytest.approx(0.25)
    assert m["image_retrieval_recall@2"] == pytest.approx(0.5)
    assert m["image_retrieval_recall@3"] == pytest.approx(1.0)
    assert m["text_retrieval_recall@1"] == pytest.approx(1 / 3)
    assert m["text_retrieval_recall@3"] == pytest.approx(2 / 3)
    assert m["text_retrieval_recall@4"] == pytest.approx(1.0)
    assert m["image_retrieval_mean_rank"] == pytest.approx(2.25)
    assert m["image_retrieval_median_rank"] == pytest.approx(2.5)  # even count: mean of the middle two
    assert m["text_retrieval_mean_rank"] == pytest.approx(8 / 3)
    assert m["text_retrieval_median_rank"] == pytest.approx(3.0)
    assert (m["num_images"], m["num_texts"]) == (3, 4)


def test_retrieval_ranks_not_returned_unless_asked():
    m = _from_scores(HAND_SCORES, HAND_T2I)
    assert "image_retrieval_ranks" not in m and "text_retrieval_ranks" not in m
    assert set(m) >= {f"{d}_retrieval_recall@{k}" for d in ("image", "text") for k in (1, 5, 10)}


def test_retrieval_perfect_worst_and_all_tied():
    n = 6
    perfect = _from_scores(torch.eye(n).tolist(), list(range(n)), ks=(1,))
    assert perfect["image_retrieval_recall@1"] == perfect["text_retrieval_recall@1"] == 1.0
    assert perfect["image_retrieval_mean_rank"] == perfect["text_retrieval_median_rank"] == 1.0

    worst = _from_scores((1 - torch.eye(n)).tolist(), list(range(n)), ks=(1, n - 1, n), return_ranks=True)
    assert worst["image_retrieval_ranks"].tolist() == [n] * n
    assert worst["text_retrieval_ranks"].tolist() == [n] * n
    assert worst["image_retrieval_recall@1"] == worst["text_retrieval_recall@5"] == 0.0
    assert worst["image_retrieval_recall@6"] == worst["text_retrieval_recall@6"] == 1.0

    # Every score equal: each correct item ties with all wrong ones, so it ranks last, never a hit.
    tied = _from_scores(torch.zeros(n, n).tolist(), list(range(n)), ks=(1, n))
    assert tied["image_retrieval_recall@1"] == tied["text_retrieval_recall@1"] == 0.0
    assert tied["image_retrieval_mean_rank"] == tied["text_retrieval_mean_rank"] == n


def test_retrieval_k_larger_than_gallery_is_full_recall():
    m = _from_scores((1 - torch.eye(3)).tolist(), [0, 1, 2], ks=(1, 3, 50))
    assert m["image_retrieval_recall@50"] == m["text_retrieval_recall@50"] == 1.0
    assert m["image_retrieval_recall@1"] == 0.0


def test_retrieval_image_to_text_counts_any_caption():
    # Image 0 has three captions: two poor ones and one that wins; the image is a hit at K=1.
    scores = [[0.1, 0.9], [0.2, 0.8], [0.95, 0.3], [0.0, 0.5]]
    m = _from_scores(scores, [0, 0, 0, 1], ks=(1,), return_ranks=True)
    assert m["text_retrieval_ranks"].tolist() == [1, 3]  # image 1: captions 0 (0.9) and 1 (0.8) beat 0.5
    assert m["text_retrieval_recall@1"] == 0.5
    assert m["image_retrieval_ranks"].tolist() == [2, 2, 1, 1]


@pytest.mark.parametrize("chunk_size", [None, 64, 100, 1000])
def test_retrieval_matches_brute_force_with_many_exact_ties(chunk_size):
    # Small integer embeddings give exact integer scores in any summation order: many exact ties, also
    # from duplicate captions and duplicate images, across block boundaries.
    g = torch.Generator().manual_seed(0)
    image = torch.randint(-2, 3, (120, 8), generator=g).float()
    image[7] = image[50]
    t2i = torch.cat([torch.arange(120), torch.randint(0, 120, (230,), generator=g)])
    text = torch.randint(-2, 3, (350, 8), generator=g).float()
    text[300] = text[3]
    m = retrieval_metrics(image, text, t2i, ks=(1, 5, 10), chunk_size=chunk_size, return_ranks=True)
    t2i_ranks, i2t_ranks = _brute_force_ranks(image, text, t2i)
    assert torch.equal(m["image_retrieval_ranks"], t2i_ranks)
    assert torch.equal(m["text_retrieval_ranks"], i2t_ranks)
    assert m["image_retrieval_recall@5"] == pytest.approx((t2i_ranks <= 5).double().mean().item())
    assert m["text_retrieval_recall@10"] == pytest.approx((i2t_ranks <= 10).double().mean().item())


@pytest.mark.parametrize("chunk_size", [None, 64])
def test_retrieval_real_valued_embeddings_match_full_matrix_and_accept_fp16(chunk_size):
    g = torch.Generator().manual_seed(1)
    image = torch.nn.functional.normalize(torch.randn(200, 32, generator=g), dim=1)
    t2i = torch.arange(1000) // 5
    text = torch.nn.functional.normalize(image[t2i] + torch.randn(1000, 32, generator=g), dim=1)
    m = retrieval_metrics(image, text, t2i, chunk_size=chunk_size, return_ranks=True)
    t2i_ranks, i2t_ranks = _brute_force_ranks(image, text, t2i)
    assert torch.equal(m["image_retrieval_ranks"], t2i_ranks)
    assert torch.equal(m["text_retrieval_ranks"], i2t_ranks)
    assert 0.0 < m["image_retrieval_recall@1"] < m["image_retrieval_recall@10"] < 1.0
    half = retrieval_metrics(image.half(), text.half(), t2i)
    assert half["image_retrieval_recall@10"] == pytest.approx(m["image_retrieval_recall@10"], abs=0.02)


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"image_emb": torch.zeros(3, 4), "text_emb": torch.zeros(3, 5)}, "width 4 but text_emb has 5"),
    ({"image_emb": torch.zeros(3)}, r"image_emb must be a non-empty \[N, E\] matrix"),
    ({"text_emb": torch.zeros(0, 4)}, r"text_emb must be a non-empty"),
    ({"image_emb": torch.zeros(3, 4, dtype=torch.long)}, "must hold floats"),
    ({"text_to_image": [0, 1]}, "vector of 3 image indices"),
    ({"text_to_image": [0, 1, 3]}, r"text_to_image\[2\] = 3 is not an image index \(there are 3 images\)"),
    ({"text_to_image": [0, -1, 2]}, r"text_to_image\[1\] = -1"),
    ({"text_to_image": [0.0, 1.0, 2.0]}, "integer image indices"),
    ({"text_to_image": [0, 0, 2]}, r"1 image\(s\) have no caption \(rows 1\)"),
    ({"ks": (0, 1)}, "ks must be positive integers"),
    ({"ks": ()}, "ks must be positive integers"),
    ({"chunk_size": 0}, "chunk_size must be a positive integer"),
])
def test_retrieval_rejects_bad_input(kwargs, message):
    args = {"image_emb": torch.eye(3, 4), "text_emb": torch.eye(3, 4), "text_to_image": [0, 1, 2]} | kwargs
    with pytest.raises(ValueError, match=message):
        retrieval_metrics(**args)


def test_retrieval_rejects_nan():
    text = torch.eye(3)
    text[1, 2] = float("nan")
    with pytest.raises(ValueError, match="text_emb row 1 holds NaN"):
        retrieval_metrics(torch.eye(3), text, [0, 1, 2])


# --- classification -------------------------------------------------------------------------------------

# Class 2 (bird) has no samples. Sample 1 ties its true class with dog: a miss, predicted as dog.
CLS_LOGITS = [[2.0, 1.0, 0.0], [1.0, 1.0, 0.0], [0.0, 3.0, 1.0], [5.0, 3.0, 4.0], [0.0, 9.0, 0.0]]
CLS_TARGETS = [0, 0, 1, 1, 1]


def test_classification_hand_built():
    m = classification_metrics(torch.tensor(CLS_LOGITS), torch.tensor(CLS_TARGETS), ["cat", "dog", "bird"])
    assert m["acc1"] == pytest.approx(3 / 5)
    assert m["acc5"] == 1.0  # top-min(5, 3)
    assert m["mean_per_class_recall"] == pytest.approx((1 / 2 + 2 / 3) / 2)  # bird excluded
    assert m["classes_without_samples"] == ["bird"]
    assert m["per_class_recall"][0] == {"class": "cat", "index": 0, "support": 2, "recall": 0.5}
    assert m["per_class_recall"][1]["recall"] == pytest.approx(2 / 3)
    assert m["per_class_recall"][2] == {"class": "bird", "index": 2, "support": 0, "recall": None}
    assert m["confusion_matrix"] == [[1, 1, 0], [1, 2, 0], [0, 0, 0]]
    assert (m["num_samples"], m["num_classes"]) == (5, 3)


def test_classification_top5_with_ties_and_perfect_case():
    # 7 classes, target 0 each time: rank 5 (hit), rank 6 (miss), tied with five others (rank 6, miss).
    logits = torch.tensor([[3.0, 9, 8, 7, 6, 0, 0], [3.0, 9, 8, 7, 6, 5, 0], [3.0, 3, 3, 3, 3, 3, 0]])
    targets = torch.zeros(3, dtype=torch.long)
    assert target_ranks(logits, targets).tolist() == [5, 6, 6]
    m = classification_metrics(logits, targets)
    assert m["acc5"] == pytest.approx(1 / 3)
    assert m["acc1"] == 0.0
    assert m["confusion_matrix"][0][:2] == [0, 3]  # all three predicted as the best wrong class, 1
    perfect = classification_metrics(torch.eye(4) * 5, torch.arange(4))
    assert perfect["acc1"] == perfect["mean_per_class_recall"] == 1.0
    assert perfect["classes_without_samples"] == []


@pytest.mark.parametrize(("logits", "targets", "names", "message"), [
    (torch.zeros(3), [0, 1, 2], None, r"non-empty \[N, C\] matrix"),
    (torch.zeros(2, 3), [0, 1, 2], None, "vector of 2 class indices"),
    (torch.zeros(2, 3), [0, 3], None, r"targets\[1\] = 3 is not a class index \(logits have 3 classes\)"),
    (torch.zeros(2, 3), [0.0, 1.0], None, "integer class indices"),
    (torch.zeros(2, 3), [0, 1], ["a", "b"], "2 class names for 3 logit columns"),
    (torch.tensor([[0.0, float("nan")], [0.0, 1.0]]), [0, 1], None, "logits row 0 holds NaN"),
])
def test_classification_rejects_bad_input(logits, targets, names, message):
    with pytest.raises(ValueError, match=message):
        classification_metrics(logits, targets, names)


# --- linear probe and few-shot --------------------------------------------------------------------------


def _blobs(n_per_class: int, num_classes: int, dim: int, spread: float, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """L2-normalised Gaussian blobs around fixed class centres (the same centres for every seed)."""
    centres = torch.randn(num_classes, dim, generator=torch.Generator().manual_seed(123))
    g = torch.Generator().manual_seed(seed)
    labels = torch.arange(num_classes).repeat_interleave(n_per_class)
    features = centres[labels] + spread * torch.randn(len(labels), dim, generator=g)
    return torch.nn.functional.normalize(features, dim=1), labels


def test_probe_recovers_separable_problem():
    x_train, y_train = _blobs(60, 4, 32, 0.3, seed=0)
    x_test, y_test = _blobs(40, 4, 32, 0.3, seed=1)
    r = linear_probe(x_train, y_train, x_test, y_test, class_names=["a", "b", "c", "d"])
    assert r["acc1"] == r["acc5"] == r["mean_per_class_recall"] == 1.0
    assert (r["num_train"], r["num_val"], r["num_test"]) == (240, 48, 160)
    sweep = r["weight_decay_sweep"]
    assert len(sweep) >= 13 and {s["weight_decay"] for s in sweep} >= {1e-6, 1e2}
    chosen = next(s for s in sweep if s["weight_decay"] == r["weight_decay"])
    assert chosen["val_acc1"] == max(s["val_acc1"] for s in sweep) == 1.0
    # The strongest weight decay shrinks the weights so far that the probe is nearly uniform.
    assert sweep[-1]["val_loss"] > 10 * chosen["val_loss"]


def test_probe_sweep_avoids_a_weight_decay_that_collapses_to_the_majority_class():
    # Imbalanced train set (60/12/12), balanced test set: a strong weight decay shrinks the weights until
    # the unregularised bias (the class prior) decides every prediction, i.e. the majority class.
    x, y = _blobs(60, 3, 32, 0.5, seed=4)
    keep = torch.cat([torch.arange(60), torch.arange(60, 72), torch.arange(120, 132)])
    x_train, y_train = x[keep], y[keep]
    x_test, y_test = _blobs(50, 3, 32, 0.5, seed=5)
    strong = linear_probe(x_train, y_train, x_test, y_test, weight_decay=100.0)
    assert strong["weight_decay_sweep"] == [] and strong["num_val"] == 0
    assert strong["acc1"] < 0.5
    r = linear_probe(x_train, y_train, x_test, y_test, seed=0)
    assert r["acc1"] == 1.0 and r["weight_decay"] < 10
    sweep = r["weight_decay_sweep"]
    chosen = next(s for s in sweep if s["weight_decay"] == r["weight_decay"])
    best_acc = max(s["val_acc1"] for s in sweep)
    assert chosen["val_acc1"] == best_acc
    assert chosen["val_loss"] == min(s["val_loss"] for s in sweep if s["val_acc1"] == best_acc)
    assert sweep[-1]["val_acc1"] < best_acc  # the sweep did see the collapse at 1e2


def test_few_shot_indices_are_seeded_and_per_class():
    labels = torch.arange(5).repeat_interleave(20)[torch.randperm(100, generator=torch.Generator().manual_seed(0))]
    a = few_shot_indices(labels, 3, seed=7)
    assert torch.equal(a, few_shot_indices(labels, 3, seed=7))
    assert not torch.equal(a, few_shot_indices(labels, 3, seed=8))
    assert torch.bincount(labels[a]).tolist() == [3] * 5
    assert a.tolist() == sorted(set(a.tolist()))


def test_few_shot_errors():
    labels = torch.tensor([0, 0, 0, 1, 1, 2, 2, 2])
    with pytest.raises(ValueError, match="class 1 has 2 sample"):
        few_shot_indices(labels, 3)
    with pytest.raises(ValueError, match="class 3 has 0 sample"):
        few_shot_indices(labels, 1, num_classes=4)
    with pytest.raises(ValueError, match="k must be a positive integer"):
        few_shot_indices(labels, 0)
    with pytest.raises(ValueError, match="integer class indices"):
        few_shot_indices(labels.float(), 1)


def test_probe_one_shot_needs_explicit_weight_decay():
    x, y = _blobs(1, 3, 8, 0.1, seed=0)
    with pytest.raises(ValueError, match=r"pass weight_decay=\.\.\. explicitly"):
        linear_probe(x, y, x, y)
    assert linear_probe(x, y, x, y, weight_decay=1e-3)["acc1"] == 1.0


@pytest.mark.parametrize(("change", "message"), [
    ({"test_features": torch.zeros(4, 5)}, "train_features have 8 dimensions but test_features 5"),
    ({"train_labels": [0, 1]}, "6 train features but 2 train labels"),
    ({"test_labels": [0, 1, 2, 5]}, r"test_labels\[3\] = 5 is out of range for 3 class names"),
    ({"train_labels": [0, 1, 2, 0, 1, -1]}, r"train_labels\[5\] = -1 is negative"),
    ({"weight_decay": -1.0}, "weight_decay must be a finite number >= 0"),
    ({"val_proportion": 1.5}, r"val_proportion must be in \(0, 1\)"),
])
def test_probe_rejects_bad_input(change, message):
    args = {"train_features": torch.randn(6, 8), "train_labels": [0, 1, 2, 0, 1, 2],
            "test_features": torch.randn(4, 8), "test_labels": [0, 1, 2, 0], "class_names": ["a", "b", "c"]}
    with pytest.raises(ValueError, match=message):
        linear_probe(**(args | change))
