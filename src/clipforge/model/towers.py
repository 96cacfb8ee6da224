"""The tower seam: what `CLIP` needs from its image tower and its text tower, and nothing more.

`CLIP` composes one tower of each kind (`CLIP.visual`, `CLIP.text`) and reaches them only through these two
contracts, so that a new kind of tower is a new subclass, with no change to CLIP, training, evaluation or
serving. Both kinds of tower:

- map their input to features of width `output_dim` (CLIP's `embed_dim`), unnormalised, in the dtype of their
  matrices; with `return_tokens=True` they also return the per-position features before pooling;
- describe what their input must look like (`preprocess_config()`, `tokenizer_config()`), so that a model built
  from a config alone preprocesses and tokenizes correctly;
- list their parameters as ordered groups, first to last (`lock_groups()`), for freezing all but the last few
  (LiT-style locking), and their bare projection matrices (`projections()`), which `CLIP.set_precision` casts
  with the linear layers;
- support gradient checkpointing of their blocks (`set_grad_checkpointing`), where they have blocks.

The OpenAI towers (`vision.VisionTransformer`, `vision.ModifiedResNet`, `text.TextTransformer`) are the
reference implementations.
"""

from __future__ import annotations

import torch
from torch import nn

from .config import PreprocessConfig

__all__ = ["ImageTower", "TextTower"]

# A group is what is frozen or trained together: modules and bare parameters.
Group = list[nn.Module | nn.Parameter]


class ImageTower(nn.Module):
    """`[B, 3, S, S]` float pixels (preprocessed as `preprocess_config()` says) -> `[B, output_dim]` features.

    Subclasses set `image_size` (S) and `output_dim`, and implement `forward` and `lock_groups`."""

    image_size: int
    output_dim: int

    def forward(self, images: torch.Tensor, return_tokens: bool = False):
        raise NotImplementedError

    def preprocess_config(self) -> PreprocessConfig:
        """The preprocessing this tower expects when a checkpoint does not say otherwise (OpenAI's)."""
        return PreprocessConfig(image_size=self.image_size)

    def lock_groups(self) -> list[Group]:
        raise NotImplementedError

    def projections(self) -> list[nn.Parameter]:
        """Projection matrices held as bare parameters (not inside a Linear); none by default."""
        return []

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Recompute block activations in the backward pass instead of keeping them; a no-op by default."""


class TextTower(nn.Module):
    """`[N, L]` token ids (L <= `context_length`, made by the tokenizer `tokenizer_config()` names) ->
    `[N, output_dim]` features.

    Subclasses set `context_length`, `vocab_size` and `output_dim`, and implement `forward`, `tokenizer_config` and
    `lock_groups`. `layout_prefix` says where the tower's tensors sit in CLIP's state dict: under `text.` unless
    the tower's layout says otherwise (OpenAI's text tower keeps its tensors at the top level)."""

    context_length: int
    vocab_size: int
    output_dim: int
    layout_prefix: str = "text."

    def forward(self, ids: torch.Tensor, return_tokens: bool = False):
        raise NotImplementedError

    def tokenizer_config(self) -> dict:
        """The JSON-ready description `clipforge.tokenizer` builds this tower's tokenizer from."""
        raise NotImplementedError

    def lock_groups(self) -> list[Group]:
        raise NotImplementedError

    def projections(self) -> list[nn.Parameter]:
        """Projection matrices held as bare parameters (not inside a Linear); none by default."""
        return []

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Recompute block activations in the backward pass instead of keeping them; a no-op by default."""
