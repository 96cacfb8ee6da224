"""Linear probe (multinomial logistic regression on frozen features) and few-shot sampling.

The protocol follows CLIP_benchmark: the weight decay is chosen on a validation split cut from the train
set, by a coarse sweep over a log-spaced grid (1e-6 .. 1e2, 12 points per decade) refined by halving the
step around the best point; the probe is then retrained on the whole train set with that weight decay
and scored on the test set.

Solver: full-batch L-BFGS on the L2-regularised cross-entropy. The objective is smooth and convex
(strictly so in the weights), so every weight decay is fitted to (near) its optimum and the sweep compares
regularisation strengths, not how far a fixed budget of SGD epochs happened to get; there is no learning
rate or epoch count to tune, and the result is deterministic. Frozen features fit in memory (10,000 x 512 fp32 is
20 MB), and fits along the sweep are warm-started from their neighbour, which makes the sweep cheap.
Features are standardised (train mean and std per dimension) first: L2-normalised embeddings have tiny,
uneven per-dimension scales that would otherwise make the problem badly conditioned for L-BFGS. On CPU
the probe runs on one thread (see `_one_cpu_thread`).
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from .accuracy import as_float_matrix, classification_metrics, target_ranks

__all__ = ["few_shot_indices", "linear_probe"]

# Weight-decay grid: 1e-6 .. 1e2 with 12 points per decade; the coarse sweep visits every 8th point and
# the refinement halves the step (4, 2, 1) around the best, as CLIP_benchmark does.
_GRID = torch.logspace(-6, 2, 97, dtype=torch.float64).tolist()
_COARSE_STEP = 8


def few_shot_indices(labels: torch.Tensor | Sequence[int], k: int, seed: int = 0,
                     num_classes: int | None = None) -> torch.Tensor:
    """Indices of `k` samples per class, drawn without replacement, reproducible for a given seed.

    Every class present in `labels` (or every class in ``range(num_classes)`` when given) must have at
    least `k` samples; otherwise ValueError names the class. Returns sorted int64 indices, k per class.
    """
    labels = _as_labels(labels, "labels", "few_shot_indices")
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise ValueError(f"few_shot_indices: k must be a positive integer, got {k!r}")
    counts = torch.bincount(labels, minlength=num_classes or 0)
    classes = range(len(counts)) if num_classes is not None else labels.unique().tolist()
    if num_classes is not None and len(counts) > num_classes:
        raise ValueError(f"few_shot_indices: label {int(labels.max())} is out of range for {num_classes} classes")
    generator = torch.Generator().manual_seed(seed)
    chosen = []
    for c in classes:
        members = (labels == c).nonzero().flatten()
        if len(members) < k:
            raise ValueError(f"few_shot_indices: class {c} has {len(members)} sample(s), fewer than k={k}; "
                             "lower k or drop the class")
        chosen.append(members[torch.randperm(len(members), generator=generator)[:k]])
    return torch.cat(chosen).sort().values


def linear_probe(
    train_features: torch.Tensor,
    train_labels: torch.Tensor | Sequence[int],
    test_features: torch.Tensor,
    test_labels: torch.Tensor | Sequence[int],
    *,
    class_names: Sequence[str] | None = None,
    weight_decay: float | None = None,
    val_proportion: float = 0.2,
    seed: int = 0,
    max_iter: int = 200,
) -> dict[str, Any]:
    """Fit a logistic-regression probe on train features, choosing the weight decay on a validation split.

    Args:
        train_features, test_features: [N, D] frozen embeddings (from the shared embedding function).
        train_labels, test_labels: class indices; the number of classes is ``len(class_names)`` when given,
            else 1 + the largest label.
        class_names: names for the per-class table of the test metrics.
        weight_decay: skip the sweep and use this L2 coefficient (loss = mean cross-entropy
            + weight_decay / 2 * |W|^2, on standardised features).
        val_proportion: share of each class held out for the sweep (at least one sample per class with two
            or more; classes with a single sample stay in the fitting part).
        seed: seeds the validation split.
        max_iter: L-BFGS iterations per fit.

    Returns ``classification_metrics`` of the test set (``acc1``, ``acc5``, ``mean_per_class_recall``, per-class
    recall, confusion matrix) plus ``weight_decay`` (the one used), ``weight_decay_sweep`` (one
    ``{"weight_decay", "val_acc1", "val_loss"}`` per grid point tried, by weight decay; empty when given),
    ``num_train``, ``num_val``, ``num_test``.
    """
    x_train, y_train, x_test, y_test, num_classes = _validate(
        train_features, train_labels, test_features, test_labels, class_names)
    if isinstance(max_iter, bool) or not isinstance(max_iter, int) or max_iter < 1:
        raise ValueError(f"linear_probe: max_iter must be a positive integer, got {max_iter!r}")
    if not 0 < val_proportion < 1:
        raise ValueError(f"linear_probe: val_proportion must be in (0, 1), got {val_proportion}")
    sweep: list[dict[str, float]] = []
    num_val = 0
    if weight_decay is not None and not (
            isinstance(weight_decay, int | float) and math.isfinite(weight_decay) and weight_decay >= 0):
        raise ValueError(f"linear_probe: weight_decay must be a finite number >= 0, got {weight_decay!r}")
    with _one_cpu_thread(x_train):
        if weight_decay is None:
            fit_idx, val_idx = _stratified_split(y_train, val_proportion, seed)
            num_val = len(val_idx)
            weight_decay, sweep = _sweep(x_train[fit_idx], y_train[fit_idx], x_train[val_idx], y_train[val_idx],
                                         num_classes, max_iter)
        probe = _Probe.fit(x_train, y_train, num_classes, float(weight_decay), max_iter)
        result = classification_metrics(probe.logits(x_test), y_test, class_names)
    result.update(weight_decay=float(weight_decay), weight_decay_sweep=sweep,
                  num_train=len(x_train), num_val=num_val, num_test=len(x_test))
    return result


@contextmanager
def _one_cpu_thread(x: torch.Tensor) -> Iterator[None]:
    """Run CPU work on one intra-op thread, restoring the setting afterwards.

    The probe's matrix products are skinny (C output columns) and memory-bound, so extra threads gain
    little, while each of the ~10 ops of an L-BFGS step pays a thread synchronisation. On a busy 2-core
    machine that synchronisation dominated: the 10,000 x 512 sweep took 94 s with 2 threads, 17 s with 1.
    """
    if x.device.type != "cpu":
        yield
        return
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


# --- the model ------------------------------------------------------------------------------------------


@dataclass
class _Probe:
    """Standardisation + linear layer: logits = ((x - mean) / std) @ weight.T + bias."""

    mean: torch.Tensor
    std: torch.Tensor
    weight: torch.Tensor  # [C, D]
    bias: torch.Tensor  # [C]

    @classmethod
    def fit(cls, x: torch.Tensor, y: torch.Tensor, num_classes: int, weight_decay: float, max_iter: int) -> _Probe:
        mean, std = _moments(x)
        weight, bias = _fit_linear((x - mean) / std, y, num_classes, weight_decay, max_iter)
        return cls(mean, std, weight, bias)

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        return torch.addmm(self.bias, (x - self.mean) / self.std, self.weight.T)


def _moments(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-dimension mean and std (a constant dimension gets std 1 instead of 0)."""
    var, mean = torch.var_mean(x, dim=0, correction=0)
    std = var.sqrt()
    return mean, torch.where(std > 1e-6, std, torch.ones_like(std))


def _fit_linear(z: torch.Tensor, y: torch.Tensor, num_classes: int, weight_decay: float, max_iter: int,
                init: tuple[torch.Tensor, torch.Tensor] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Minimise mean cross-entropy + weight_decay / 2 * |W|^2 over W [C, D], b [C] with L-BFGS."""
    weight = init[0].clone() if init else z.new_zeros(num_classes, z.shape[1])
    bias = init[1].clone() if init else z.new_zeros(num_classes)
    opt = torch.optim.LBFGS([weight, bias], lr=1, max_iter=max_iter, history_size=10,
                            tolerance_grad=1e-6, tolerance_change=1e-9, line_search_fn="strong_wolfe")
    rows = torch.arange(len(y), device=y.device)

    def closure() -> torch.Tensor:
        # Loss and gradient written out instead of autograd: the weight gradient as residual.T @ z is one
        # well-shaped matrix product, several times faster on CPU than autograd's z.T @ residual.
        log_p = torch.addmm(bias, z, weight.T).log_softmax(dim=1)
        loss = -log_p[rows, y].mean() + 0.5 * weight_decay * weight.square().sum()
        residual = log_p.exp_()
        residual[rows, y] -= 1
        residual /= len(y)
        weight.grad = torch.addmm(weight, residual.T, z, beta=weight_decay)
        bias.grad = residual.sum(0)
        return loss

    opt.step(closure)
    return weight, bias


# --- weight-decay sweep ---------------------------------------------------------------------------------


def _sweep(x_fit: torch.Tensor, y_fit: torch.Tensor, x_val: torch.Tensor, y_val: torch.Tensor,
           num_classes: int, max_iter: int) -> tuple[float, list[dict[str, float]]]:
    """Coarse grid, then halve the step around the best point. Best = highest val acc1, then lowest val loss."""
    mean, std = _moments(x_fit)
    z_fit, z_val = (x_fit - mean) / std, (x_val - mean) / std
    scores: dict[int, tuple[float, float]] = {}
    solutions: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}

    def evaluate(i: int) -> None:
        if i in scores:
            return
        # Warm start from the nearest point already fitted: optima move smoothly with the weight decay.
        near = min(solutions, key=lambda j: abs(j - i), default=None)
        weight, bias = _fit_linear(z_fit, y_fit, num_classes, _GRID[i], max_iter, solutions.get(near))
        solutions[i] = weight, bias
        logits = torch.addmm(bias, z_val, weight.T)
        acc = (target_ranks(logits, y_val) == 1).double().mean().item()
        scores[i] = (acc, F.cross_entropy(logits, y_val).item())

    def key(i: int) -> tuple[float, float]:
        return scores[i][0], -scores[i][1]

    # Strongest regularisation first: its optimum is near zero, and each next fit starts from a close one.
    for i in reversed(range(0, len(_GRID), _COARSE_STEP)):
        evaluate(i)
    best = max(scores, key=key)
    step = _COARSE_STEP // 2
    while step >= 1:
        for i in (best - step, best + step):
            if 0 <= i < len(_GRID):
                evaluate(i)
        best = max((i for i in (best - step, best, best + step) if i in scores), key=key)
        step //= 2
    sweep = [{"weight_decay": _GRID[i], "val_acc1": scores[i][0], "val_loss": scores[i][1]} for i in sorted(scores)]
    return _GRID[best], sweep


def _stratified_split(labels: torch.Tensor, proportion: float, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Hold out `proportion` of each class (at least one, leaving at least one to fit on)."""
    generator = torch.Generator().manual_seed(seed)
    fit, val = [], []
    for c in labels.unique().tolist():
        members = (labels == c).nonzero().flatten().cpu()
        members = members[torch.randperm(len(members), generator=generator)]
        n_val = min(len(members) - 1, max(1, round(proportion * len(members))))
        val.append(members[:n_val])
        fit.append(members[n_val:])
    val_idx = torch.cat(val)
    if len(val_idx) == 0:
        raise ValueError("linear_probe: no class has 2 or more train samples, so there is no validation split "
                         "to choose the weight decay on; pass weight_decay=... explicitly")
    return torch.cat(fit).sort().values.to(labels.device), val_idx.sort().values.to(labels.device)


# --- validation -----------------------------------------------------------------------------------------


def _as_labels(labels: Any, name: str, where: str) -> torch.Tensor:
    labels = torch.as_tensor(labels)
    if labels.ndim != 1 or len(labels) == 0:
        raise ValueError(f"{where}: {name} must be a non-empty vector of class indices, "
                         f"got shape {tuple(labels.shape)}")
    if labels.is_floating_point() or labels.is_complex() or labels.dtype == torch.bool:
        raise ValueError(f"{where}: {name} must hold integer class indices, got {labels.dtype}")
    labels = labels.long()
    if (labels < 0).any():
        row = int((labels < 0).nonzero()[0])
        raise ValueError(f"{where}: {name}[{row}] = {int(labels[row])} is negative; class indices start at 0")
    return labels


def _validate(train_features: Any, train_labels: Any, test_features: Any, test_labels: Any,
              class_names: Sequence[str] | None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, int]:
    x_train = as_float_matrix(train_features, "train_features", "linear_probe")
    x_test = as_float_matrix(test_features, "test_features", "linear_probe")
    if x_train.shape[1] != x_test.shape[1]:
        raise ValueError(f"linear_probe: train_features have {x_train.shape[1]} dimensions but test_features "
                         f"{x_test.shape[1]}; both must come from the same model")
    y_train = _as_labels(train_labels, "train_labels", "linear_probe").to(x_train.device)
    y_test = _as_labels(test_labels, "test_labels", "linear_probe").to(x_test.device)
    for x, y, split in ((x_train, y_train, "train"), (x_test, y_test, "test")):
        if len(x) != len(y):
            raise ValueError(f"linear_probe: {len(x)} {split} features but {len(y)} {split} labels")
    num_classes = len(class_names) if class_names is not None else int(max(y_train.max(), y_test.max())) + 1
    for y, split in ((y_train, "train"), (y_test, "test")):
        if int(y.max()) >= num_classes:
            row = int(y.argmax())
            raise ValueError(f"linear_probe: {split}_labels[{row}] = {int(y[row])} is out of range for "
                             f"{num_classes} class names")
    return x_train, y_train, x_test, y_test, num_classes
