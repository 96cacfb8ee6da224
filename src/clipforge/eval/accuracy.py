"""Classification metrics from per-class scores: top-1/top-5 accuracy, per-class recall, confusion matrix; and
`as_float_matrix`, the check of a score or feature matrix that retrieval and the linear probe share.

Classifying (prompts, class weights, scores) lives in `clipforge.zeroshot`; this module only scores the result.

Names follow CLIP_benchmark (``acc1``, ``acc5``, ``mean_per_class_recall``). Ties count against the model:
a sample's rank is ``1 + #{other classes scoring >= the true class}``, so a tie for first place is never
a top-1 hit, and the confusion matrix then records the best-scoring wrong class as the prediction (the
lowest index among tied ones). The diagonal of the confusion matrix therefore sums to the top-1 hits.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

__all__ = ["as_float_matrix", "classification_metrics", "target_ranks"]


def classification_metrics(
    logits: torch.Tensor,
    targets: torch.Tensor | Sequence[int],
    class_names: Sequence[str] | None = None,
) -> dict[str, Any]:
    """Accuracy, per-class recall and confusion matrix of [N, C] scores (logits, probabilities, similarities).

    Args:
        logits: [N, C] scores, higher = more likely. NaN is rejected.
        targets: [N] true class indices in [0, C).
        class_names: C names for the per-class table; default "0" .. "C-1".

    Returns a dict with:
        ``acc1``, ``acc5`` (top-min(5, C) accuracy), ``mean_per_class_recall`` (mean top-1 recall over the
        classes that have samples), ``classes_without_samples`` (names left out of that mean),
        ``per_class_recall`` (one ``{"class", "index", "support", "recall"}`` per class; recall is None
        without samples), ``confusion_matrix`` (C x C list of lists, rows = true class, columns =
        predicted), ``num_samples``, ``num_classes``.
    """
    logits, targets, names = _validate(logits, targets, class_names)
    n, c = logits.shape
    ranks = target_ranks(logits, targets)
    top1 = ranks == 1

    # The prediction of a miss is the best wrong class: masking the target makes that the argmax, with ties
    # going to the lowest index.
    masked = logits.scatter(1, targets[:, None], -torch.inf)
    predicted = torch.where(top1, targets, masked.argmax(dim=1))
    confusion = torch.bincount(targets * c + predicted, minlength=c * c).reshape(c, c)

    support = torch.bincount(targets, minlength=c)
    hits = torch.bincount(targets[top1], minlength=c)
    present = support > 0
    recall = hits.double() / support.clamp(min=1).double()
    table = [
        {"class": names[i], "index": i, "support": int(support[i]),
         "recall": float(recall[i]) if present[i] else None}
        for i in range(c)
    ]
    return {
        "acc1": top1.double().mean().item(),
        "acc5": (ranks <= min(5, c)).double().mean().item(),
        "mean_per_class_recall": recall[present].mean().item(),
        "classes_without_samples": [names[i] for i in range(c) if not present[i]],
        "per_class_recall": table,
        "confusion_matrix": confusion.tolist(),
        "num_samples": n,
        "num_classes": c,
    }


def target_ranks(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Rank of the true class of each row, 1 = best, ties against the model: [N] int64."""
    own = logits.gather(1, targets[:, None])
    return (logits >= own).sum(dim=1)


def _validate(logits: Any, targets: Any,
              class_names: Sequence[str] | None) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
    logits = torch.as_tensor(logits) if not isinstance(logits, torch.Tensor) else logits
    if logits.ndim != 2 or logits.shape[0] == 0 or logits.shape[1] == 0:
        raise ValueError(f"classification_metrics: logits must be a non-empty [N, C] matrix, "
                         f"got shape {tuple(logits.shape)}")
    if not logits.is_floating_point():
        raise ValueError(f"classification_metrics: logits must hold floats, got {logits.dtype}")
    logits = logits.float() if logits.dtype != torch.float64 else logits
    nan_rows = logits.isnan().any(dim=1).nonzero()
    if len(nan_rows):
        raise ValueError(f"classification_metrics: logits row {int(nan_rows[0])} holds NaN")
    n, c = logits.shape
    targets = torch.as_tensor(targets)
    if targets.ndim != 1 or len(targets) != n:
        raise ValueError(f"classification_metrics: targets must be a vector of {n} class indices (one per row "
                         f"of logits), got shape {tuple(targets.shape)}")
    if targets.is_floating_point() or targets.is_complex() or targets.dtype == torch.bool:
        raise ValueError(f"classification_metrics: targets must hold integer class indices, got {targets.dtype}")
    targets = targets.to(device=logits.device, dtype=torch.long)
    bad = ((targets < 0) | (targets >= c)).nonzero()
    if len(bad):
        row = int(bad[0])
        raise ValueError(f"classification_metrics: targets[{row}] = {int(targets[row])} is not a class index "
                         f"(logits have {c} classes)")
    if class_names is None:
        names = [str(i) for i in range(c)]
    else:
        names = [str(name) for name in class_names]
        if len(names) != c:
            raise ValueError(f"classification_metrics: {len(names)} class names for {c} logit columns")
    return logits, targets, names


def as_float_matrix(x: Any, name: str, where: str, shape: str = "[N, D]", keep_fp64: bool = False) -> torch.Tensor:
    """`x` as a finite, non-empty 2-D float tensor (fp32, or fp64 kept when `keep_fp64`), detached and contiguous;
    else a one-line ValueError naming `where`, `name` and the first bad row."""
    x = torch.as_tensor(x) if not isinstance(x, torch.Tensor) else x
    if x.ndim != 2 or x.shape[0] == 0 or x.shape[1] == 0:
        raise ValueError(f"{where}: {name} must be a non-empty {shape} matrix, got shape {tuple(x.shape)}")
    if not x.is_floating_point():
        raise ValueError(f"{where}: {name} must hold floats, got {x.dtype}")
    # Half precision has neither the range nor the BLAS speed on CPU.
    x = x.detach()
    x = x if keep_fp64 and x.dtype == torch.float64 else x.float()
    if not torch.isfinite(x).all():
        row = int((~torch.isfinite(x)).any(dim=1).nonzero()[0])
        raise ValueError(f"{where}: {name} row {row} holds NaN or infinite values")
    return x.contiguous()
