"""The CLIP model: image tower, text tower, projections and a learnable temperature."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from .config import CLIPConfig, get_model_config
from .layers import Attention, LayerNorm
from .text import TextTransformer
from .vision import build_vision_tower

PRECISIONS = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
# Lightning's precision names (the training side speaks them) mean the same compute dtypes here.
PRECISION_ALIASES = {"32-true": "fp32", "32": "fp32", "bf16-mixed": "bf16", "bf16-true": "bf16",
                     "16-mixed": "fp16", "16-true": "fp16", "16": "fp16"}


def canonical_precision(precision: str) -> str:
    """`fp32`, `bf16` or `fp16` for one of those or a Lightning precision name; ValueError otherwise."""
    name = PRECISION_ALIASES.get(str(precision), precision)
    if name not in PRECISIONS:
        raise ValueError(f"precision must be one of {sorted(PRECISIONS)} (or a Lightning name such as "
                         f"'bf16-mixed'), got {precision!r}")
    return name


class CLIP(TextTransformer):
    """CLIP with OpenAI's parameter names. Embeddings come back as fp32 whatever the weights' dtype."""

    def __init__(self, cfg: CLIPConfig):
        super().__init__(cfg.text, cfg.embed_dim, cfg.quick_gelu)
        self.config = cfg
        self.visual = build_vision_tower(cfg.vision, cfg.embed_dim, cfg.quick_gelu)
        self.logit_scale = nn.Parameter(torch.tensor(math.log(1 / 0.07)))

    @property
    def image_size(self) -> int:
        return self.config.vision.image_size

    def encode_image(self, images: torch.Tensor, normalize: bool = False, return_tokens: bool = False):
        """`[B, 3, S, S]` float pixels -> `[B, E]` fp32 features (and per-patch tokens on request)."""
        size = self.image_size
        if images.ndim != 4 or images.shape[1] != 3 or images.shape[-2:] != (size, size):
            raise ValueError(f"images must be [B, 3, {size}, {size}], got {tuple(images.shape)}")
        out = self.visual(images, return_tokens=return_tokens)
        feats, tokens = out if return_tokens else (out, None)
        feats = feats.float()
        if normalize:
            feats = F.normalize(feats, dim=-1)
        return (feats, tokens) if return_tokens else feats

    def encode_text(self, ids: torch.Tensor, normalize: bool = False, return_tokens: bool = False):
        """`[N, L]` token ids (L <= context length) -> `[N, E]` fp32 features."""
        out = self.text_tower(ids, return_tokens=return_tokens)
        feats, tokens = out if return_tokens else (out, None)
        feats = feats.float()
        if normalize:
            feats = F.normalize(feats, dim=-1)
        return (feats, tokens) if return_tokens else feats

    def forward(self, images: torch.Tensor, ids: torch.Tensor):
        """Normalised image and text features and the temperature `exp(logit_scale)`."""
        return (self.encode_image(images, normalize=True), self.encode_text(ids, normalize=True),
                self.logit_scale.exp())

    def set_precision(self, precision: str) -> CLIP:
        """Cast the matrices (linear, conv, attention, projections) to `precision`. LayerNorm,
        embeddings and the temperature stay fp32 so that the residual stream and normalisation
        stay accurate. Returns self."""
        dtype = PRECISIONS[canonical_precision(precision)]
        for module in self.modules():
            if isinstance(module, (nn.Linear, nn.Conv2d, nn.BatchNorm2d, Attention)):
                module.to(dtype)
            elif isinstance(module, LayerNorm):
                module.float()
        for param in (self.visual.proj if hasattr(self.visual, "proj") else None, self.text_projection):
            if param is not None:
                param.data = param.data.to(dtype)
        return self

    @property
    def precision(self) -> str:
        dtype = self.text_projection.dtype
        return next(name for name, d in PRECISIONS.items() if d == dtype)

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.transformer.grad_checkpointing = enable
        if hasattr(self.visual, "transformer"):
            self.visual.transformer.grad_checkpointing = enable


def create_model(arch: str | CLIPConfig | dict, **overrides) -> CLIP:
    """A randomly initialised CLIP from an architecture name (`ViT-B-32`, `ViT-B/32`), a config or a dict.

    `overrides` replace top-level config fields (e.g. `quick_gelu=False`)."""
    if isinstance(arch, str):
        cfg = get_model_config(arch)
    elif isinstance(arch, dict):
        cfg = CLIPConfig.from_dict(arch)
    else:
        cfg = arch
    for key, value in overrides.items():
        setattr(cfg, key, value)
    return CLIP(cfg)


def cpu_has_native_bf16() -> bool:
    """True on CPUs with AVX-512 BF16 or AMX, where bf16 matmuls are fast rather than emulated."""
    check = getattr(torch.cpu, "_is_avx512_bf16_supported", None)
    if check is not None and check():
        return True
    amx = getattr(torch.cpu, "_is_amx_tile_supported", None)
    return bool(amx is not None and amx())


def auto_precision(device: str | torch.device = "cpu") -> str:
    """The fastest precision that keeps embeddings within cosine 0.999 of fp32 on this device."""
    device = torch.device(device)
    if device.type == "cuda":
        return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    return "bf16" if device.type == "cpu" and cpu_has_native_bf16() else "fp32"
