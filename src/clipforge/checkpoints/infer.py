"""Infer a CLIP architecture from the shapes of an OpenAI-layout state dict."""

from __future__ import annotations

from collections.abc import Mapping

import torch

from ..model.config import CLIPConfig, TextConfig, VisionConfig
from .formats import CheckpointError

# Heads are not visible in the weights; every OpenAI and OpenCLIP CLIP uses 64-wide heads.
_HEAD_WIDTH = 64


def _count_blocks(sd: Mapping[str, torch.Tensor], prefix: str) -> int:
    return len({k[len(prefix):].split(".")[0] for k in sd if k.startswith(prefix)})


def _require(sd: Mapping[str, torch.Tensor], key: str, source: str) -> torch.Tensor:
    if key not in sd:
        raise CheckpointError(f"{source}: not a CLIP checkpoint in OpenAI's layout (no '{key}')")
    return sd[key]


def infer_config(sd: Mapping[str, torch.Tensor], quick_gelu: bool = True, source: str = "checkpoint") -> CLIPConfig:
    """The CLIPConfig whose model has exactly these tensor shapes."""
    text_projection = _require(sd, "text_projection", source)
    text_width = _require(sd, "ln_final.weight", source).shape[0]
    text = TextConfig(
        context_length=_require(sd, "positional_embedding", source).shape[0],
        vocab_size=_require(sd, "token_embedding.weight", source).shape[0],
        width=text_width,
        heads=max(1, text_width // _HEAD_WIDTH),
        layers=_count_blocks(sd, "transformer.resblocks."),
        mlp_ratio=sd["transformer.resblocks.0.mlp.c_fc.weight"].shape[0] / text_width,
    )
    return CLIPConfig(embed_dim=text_projection.shape[1], vision=_infer_vision(sd, source), text=text,
                      quick_gelu=quick_gelu)


def _infer_vision(sd: Mapping[str, torch.Tensor], source: str) -> VisionConfig:
    if "visual.proj" in sd:
        conv = sd["visual.conv1.weight"]
        width, patch = conv.shape[0], conv.shape[-1]
        grid = round((sd["visual.positional_embedding"].shape[0] - 1) ** 0.5)
        return VisionConfig(
            image_size=patch * grid, layers=_count_blocks(sd, "visual.transformer.resblocks."), width=width,
            head_width=_HEAD_WIDTH, patch_size=patch,
            mlp_ratio=sd["visual.transformer.resblocks.0.mlp.c_fc.weight"].shape[0] / width,
        )
    if "visual.attnpool.positional_embedding" in sd:
        grid = round((sd["visual.attnpool.positional_embedding"].shape[0] - 1) ** 0.5)
        return VisionConfig(
            image_size=grid * 32, layers=[_count_blocks(sd, f"visual.layer{i}.") for i in range(1, 5)],
            width=sd["visual.layer1.0.conv1.weight"].shape[0], head_width=_HEAD_WIDTH,
        )
    raise CheckpointError(f"{source}: unrecognised image tower (neither 'visual.proj' nor 'visual.attnpool')")
