"""The CLIP model: an image tower and a text tower (see `towers`), and a learnable temperature."""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from . import cpu_inference
from .config import CLIPConfig, PreprocessConfig, get_model_config
from .layers import Attention, LayerNorm
from .precision import PRECISIONS, canonical_precision
from .text import TextTransformer
from .towers import ImageTower, TextTower
from .vision import ModifiedResNet, VisionTransformer


class CLIP(nn.Module):
    """CLIP with OpenAI's state-dict layout. Embeddings come back as fp32 whatever the weights' dtype.

    `preprocess_config` is how images must be preprocessed for this model (the image tower's default until a
    checkpoint says otherwise) and `provenance` what is known of its history (where it was loaded from, how it
    was trained); both are saved with it.

    In eval mode on a CPU the model runs its linear layers through packed oneDNN kernels (`cpu_inference`);
    `train()` puts the plain layers back."""

    def __init__(self, cfg: CLIPConfig):
        super().__init__()
        self.config = cfg
        # Text tower first: a seed gives the random weights it gave in earlier clipforge versions.
        self.text: TextTower = _text_tower(cfg)
        self.visual: ImageTower = _image_tower(cfg)
        self.logit_scale = nn.Parameter(torch.tensor(math.log(1 / 0.07)))
        self.preprocess_config: PreprocessConfig = self.visual.preprocess_config()
        self.provenance: dict[str, Any] = {}
        # A tower's tensors sit in the state dict where its layout says (OpenAI's text tower: at the top level).
        self.register_state_dict_post_hook(_text_to_layout)
        self.register_load_state_dict_pre_hook(_text_from_layout)

    @property
    def embed_dim(self) -> int:
        """Width of the joint embedding space."""
        return self.config.embed_dim

    @property
    def image_size(self) -> int:
        return self.visual.image_size

    @property
    def context_length(self) -> int:
        """The longest token sequence the text tower takes."""
        return self.text.context_length

    def tokenizer_config(self) -> dict:
        """The description of the tokenizer that makes this model's token ids (see `TextTower`)."""
        return self.text.tokenizer_config()

    def encode_image(self, images: torch.Tensor, normalize: bool = False, return_tokens: bool = False):
        """`[B, 3, S, S]` float pixels -> `[B, E]` fp32 features (and per-patch tokens on request)."""
        size = self.image_size
        if images.ndim != 4 or images.shape[1] != 3 or images.shape[-2:] != (size, size):
            raise ValueError(f"images must be [B, 3, {size}, {size}], got {tuple(images.shape)}")
        return _features(self.visual(images, return_tokens=return_tokens), normalize, return_tokens)

    def encode_text(self, ids: torch.Tensor, normalize: bool = False, return_tokens: bool = False):
        """`[N, L]` token ids (L <= context length) -> `[N, E]` fp32 features."""
        return _features(self.text(ids, return_tokens=return_tokens), normalize, return_tokens)

    def forward(self, images: torch.Tensor, ids: torch.Tensor):
        """Normalised image and text features and the temperature `exp(logit_scale)`."""
        return (self.encode_image(images, normalize=True), self.encode_text(ids, normalize=True),
                self.logit_scale.exp())

    def train(self, mode: bool = True) -> CLIP:
        super().train(mode)
        cpu_inference.use_packed_kernels(self, not mode)
        return self

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
        for param in (*self.visual.projections(), *self.text.projections()):
            param.data = param.data.to(dtype)
        return self

    @property
    def precision(self) -> str:
        """The name of the matrices' dtype (`fp32`, `bf16`, `fp16`)."""
        dtype = next(m.weight.dtype for m in self.modules() if isinstance(m, nn.Linear))
        return next(name for name, d in PRECISIONS.items() if d == dtype)

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.visual.set_grad_checkpointing(enable)
        self.text.set_grad_checkpointing(enable)


def _features(out, normalize: bool, return_tokens: bool):
    """A tower's output as fp32 features (normalised on request), with its tokens when it returned them."""
    feats, tokens = out if return_tokens else (out, None)
    feats = feats.float()
    if normalize:
        feats = F.normalize(feats, dim=-1)
    return (feats, tokens) if return_tokens else feats


def _image_tower(cfg: CLIPConfig) -> ImageTower:
    if cfg.vision.is_resnet:
        return ModifiedResNet(cfg.vision, cfg.embed_dim)
    return VisionTransformer(cfg.vision, cfg.embed_dim, cfg.quick_gelu)


def _text_tower(cfg: CLIPConfig) -> TextTower:
    return TextTransformer(cfg.text, cfg.embed_dim, cfg.quick_gelu)


def _text_to_layout(model: CLIP, state_dict: dict[str, Any], prefix: str, local_metadata: Any) -> None:
    """State-dict hook: the text tower's tensors move from `text.` to where its layout puts them (the dict is
    rebuilt so that every key keeps its place)."""
    inner, outer = prefix + "text.", prefix + model.text.layout_prefix
    if inner == outer:
        return
    items = list(state_dict.items())
    state_dict.clear()
    for key, value in items:
        state_dict[outer + key[len(inner):] if key.startswith(inner) else key] = value


def _text_from_layout(model: CLIP, state_dict: dict[str, Any], prefix: str, *args: Any) -> None:
    """Load-state-dict pre-hook, the inverse of `_text_to_layout`: the tensors named after the text tower's
    members (in its layout) move under `text.`."""
    inner, outer = prefix + "text.", prefix + model.text.layout_prefix
    if inner == outer:
        return
    text = model.text
    members = {name for named in (text.named_children(), text.named_parameters(recurse=False),
                                  text.named_buffers(recurse=False)) for name, _ in named}
    for key in [k for k in state_dict if k.startswith(outer)]:
        rest = key[len(outer):]
        if rest.split(".", 1)[0] in members:
            state_dict[inner + rest] = state_dict.pop(key)


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
