"""Contrastive losses over image-text pairs, with features gathered across processes.

``ClipLoss`` is the symmetric InfoNCE loss of CLIP: cross-entropy over ``exp(logit_scale) * img @ txt.T`` in
both directions, the matching pair of each row being the positive. ``SigLipLoss`` is SigLIP's pairwise
sigmoid loss ``-log sigmoid(z_ij * (scale * img_i . txt_j + bias))`` with ``z_ij = +1`` for matching pairs and
``-1`` otherwise, summed over pairs and divided by the batch size.

Several processes (``torch.distributed`` initialised, any backend): each holds a shard of the global batch.

* ``gather_with_grad=True`` (default) all-gathers the features with a differentiable all-gather, so that every
  local feature receives the gradient of every rank's loss. With data-parallel gradient averaging (DDP) the
  parameter gradients then equal those of one process computing the loss on the whole global batch.
* ``gather_with_grad=False`` gathers detached copies and puts the local features back in place: the loss is
  the same, gradients flow only through this rank's rows (cheaper; the gradient of the other ranks' terms
  with respect to these features is dropped).
* ``local_loss=True`` scores only this rank's rows against all columns (``B x N`` logits instead of ``N x N``);
  averaged over ranks it equals the global loss, at a fraction of the memory.

The losses are computed in float32 with autocast disabled: logits of a large batch in bf16 lose the
differences that the softmax needs.
"""

from __future__ import annotations

import warnings

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

__all__ = ["ClipLoss", "SigLipLoss", "build_loss", "gather_features"]


def _world() -> tuple[int, int]:
    """(rank, world size) of the default process group, (0, 1) without one."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _all_gather(x: torch.Tensor, with_grad: bool, rank: int) -> torch.Tensor:
    """Concatenation of every rank's `x` along dim 0, in rank order."""
    if with_grad:
        # The autograd-aware collective: its backward sums each rank's gradient for our shard. (torch 2.x marks
        # it deprecated in favour of a private functional API; it is still the public, supported one.)
        from torch.distributed.nn.functional import all_gather

        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", category=FutureWarning, message=".*all_gather is deprecated.*")
            return torch.cat(all_gather(x), dim=0)
    parts = [torch.empty_like(x) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, x.detach().contiguous())
    parts[rank] = x  # our own rows keep their graph
    return torch.cat(parts, dim=0)


def gather_features(
    image_features: torch.Tensor, text_features: torch.Tensor, gather_with_grad: bool = True
) -> tuple[torch.Tensor, torch.Tensor]:
    """Image and text features of the whole global batch (rank 0's rows first); unchanged on one process.

    Every rank must pass the same number of rows: all-gather needs equal shapes."""
    rank, world = _world()
    if world == 1:
        return image_features, text_features
    return _all_gather(image_features, gather_with_grad, rank), _all_gather(text_features, gather_with_grad, rank)


class ClipLoss(nn.Module):
    """Symmetric InfoNCE over ``logit_scale * img @ txt.T`` (``logit_scale`` is the temperature's inverse,
    i.e. already exponentiated)."""

    def __init__(self, local_loss: bool = False, gather_with_grad: bool = True, label_smoothing: float = 0.0):
        super().__init__()
        if not 0.0 <= label_smoothing < 1.0:
            raise ValueError(f"label_smoothing must be in [0, 1), got {label_smoothing}")
        self.local_loss = local_loss
        self.gather_with_grad = gather_with_grad
        self.label_smoothing = label_smoothing

    def forward(self, image_features: torch.Tensor, text_features: torch.Tensor,
                logit_scale: torch.Tensor, logit_bias: torch.Tensor | None = None) -> torch.Tensor:
        _check_pairs(image_features, text_features)
        with torch.autocast(image_features.device.type, enabled=False):
            img, txt, scale = image_features.float(), text_features.float(), logit_scale.float()
            rank, world = _world()
            all_img, all_txt = gather_features(img, txt, self.gather_with_grad)
            if self.local_loss and world > 1:
                # This rank's rows against every column; row i's positive is global column rank*B + i.
                logits_per_image = scale * img @ all_txt.T
                logits_per_text = scale * txt @ all_img.T
                labels = torch.arange(len(img), device=img.device) + rank * len(img)
            else:
                logits_per_image = scale * all_img @ all_txt.T
                logits_per_text = logits_per_image.T
                labels = torch.arange(len(all_img), device=img.device)
            smoothing = self.label_smoothing
            return (F.cross_entropy(logits_per_image, labels, label_smoothing=smoothing)
                    + F.cross_entropy(logits_per_text, labels, label_smoothing=smoothing)) / 2


class SigLipLoss(nn.Module):
    """SigLIP's sigmoid loss. Needs a learnable ``logit_bias`` (SigLIP starts it at -10, the scale at 10).

    Across ranks this rank's images are scored against every rank's texts; the mean over ranks of the
    per-rank losses (what DDP's gradient average optimises) is the single-process loss."""

    def __init__(self, gather_with_grad: bool = True):
        super().__init__()
        self.gather_with_grad = gather_with_grad

    def forward(self, image_features: torch.Tensor, text_features: torch.Tensor,
                logit_scale: torch.Tensor, logit_bias: torch.Tensor | None = None) -> torch.Tensor:
        _check_pairs(image_features, text_features)
        if logit_bias is None:
            raise ValueError("the sigmoid (SigLIP) loss needs a logit_bias")
        with torch.autocast(image_features.device.type, enabled=False):
            img, txt = image_features.float(), text_features.float()
            rank, world = _world()
            all_txt = txt
            if world > 1:
                _, all_txt = gather_features(img, txt, self.gather_with_grad)
            logits = logit_scale.float() * img @ all_txt.T + logit_bias.float()
            signs = -torch.ones_like(logits)
            rows = torch.arange(len(img), device=img.device)
            signs[rows, rows + rank * len(img)] = 1.0
            # Divided by the local batch: the mean over ranks is then the global sum over the global batch.
            return -F.logsigmoid(signs * logits).sum() / len(img)


def build_loss(kind: str = "clip", local_loss: bool = False, gather_with_grad: bool = True,
               label_smoothing: float = 0.0) -> nn.Module:
    """`clip` (InfoNCE, optionally with label smoothing) or `siglip` (sigmoid)."""
    if kind == "clip":
        return ClipLoss(local_loss=local_loss, gather_with_grad=gather_with_grad, label_smoothing=label_smoothing)
    if label_smoothing:
        raise ValueError("label_smoothing applies to the clip loss only")
    if kind == "siglip":
        return SigLipLoss(gather_with_grad=gather_with_grad)
    raise ValueError(f"unknown loss {kind!r}; choose 'clip' or 'siglip'")


def _check_pairs(image_features: torch.Tensor, text_features: torch.Tensor) -> None:
    if image_features.ndim != 2 or image_features.shape != text_features.shape:
        raise ValueError(f"image and text features must both be [B, E] with the same shape, got "
                         f"{tuple(image_features.shape)} and {tuple(text_features.shape)}")
