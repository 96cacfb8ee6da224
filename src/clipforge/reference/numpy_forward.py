"""A pure-NumPy forward pass of a CLIP model, written out step by step as an oracle for tests.

Everything is computed in float64 from a state dict in OpenAI's parameter names, so that the torch model
(fp32, SDPA, fused kernels) can be checked against an independent, plainly written implementation:

    weights = {k: v.numpy() for k, v in model.state_dict().items()}
    feats = encode_image_numpy(weights, model.config.to_dict(), pixels.numpy())

Only ViT image towers are supported; the text tower is the causal Transformer pooled at the EOT token.
Nothing here is fast: it is meant for tiny models and a handful of inputs.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import numpy as np

__all__ = ["encode_image_numpy", "encode_text_numpy"]

_LN_EPS = 1e-5
# Defaults of clipforge.model.config.VisionConfig / TextConfig, for configs read from sparse JSON files
# (CLIPConfig.to_dict() always spells them out). Duplicated so that this module needs numpy only.
_VISION_DEFAULTS = {"head_width": 64, "mlp_ratio": 4.0}
_TEXT_DEFAULTS = {"mlp_ratio": 4.0}

# math.erf applied element-wise: libm's erf is accurate to about 1 ulp in float64, so exact GELU here
# carries no approximation error beyond float64 rounding (slow, but this is an oracle).
_erf = np.frompyfunc(math.erf, 1, 1)


def encode_image_numpy(weights: Mapping[str, np.ndarray], config: Mapping[str, Any],
                       pixels: np.ndarray) -> np.ndarray:
    """Image features `[B, embed_dim]` (float64, not normalised) of a ViT CLIP for `pixels` `[B, 3, S, S]`.

    `weights`: the state dict in OpenAI names as numpy arrays; `config`: `CLIPConfig.to_dict()`."""
    vision = _section(config, "vision", _VISION_DEFAULTS)
    if isinstance(vision["layers"], (list, tuple)):
        raise ValueError("numpy reference supports ViT image towers only; this config has a ModifiedResNet "
                         f"image tower (vision.layers={list(vision['layers'])})")
    size, patch, width = int(vision["image_size"]), int(vision["patch_size"]), int(vision["width"])
    pixels = np.asarray(pixels, dtype=np.float64)
    if pixels.ndim != 4 or pixels.shape[1:] != (3, size, size):
        raise ValueError(f"pixels must be [B, 3, {size}, {size}], got {pixels.shape}")
    if size % patch:
        raise ValueError(f"vision.image_size {size} is not a multiple of vision.patch_size {patch}")
    heads = width // int(vision["head_width"])
    w = _Weights(weights, prefix="visual.")

    x = _patch_embed(pixels, w["conv1.weight"], patch)  # [B, grid*grid, width]
    cls = np.broadcast_to(w["class_embedding"], (x.shape[0], 1, width))
    x = np.concatenate([cls, x], axis=1) + w["positional_embedding"]
    x = _layer_norm(x, w, "ln_pre")
    x = _transformer(x, w, int(vision["layers"]), heads, bool(config["quick_gelu"]), causal=False)
    pooled = _layer_norm(x[:, 0], w, "ln_post")
    return pooled @ w["proj"]


def encode_text_numpy(weights: Mapping[str, np.ndarray], config: Mapping[str, Any],
                      ids: np.ndarray) -> np.ndarray:
    """Text features `[N, embed_dim]` (float64, not normalised) for token ids `[N, L]`, L <= context length.

    Each row is pooled at its highest id (the end-of-text token), as OpenAI's CLIP does."""
    text = _section(config, "text", _TEXT_DEFAULTS)
    context, vocab = int(text["context_length"]), int(text["vocab_size"])
    ids = np.asarray(ids)
    if ids.ndim != 2 or not np.issubdtype(ids.dtype, np.integer):
        raise ValueError(f"token ids must be an integer array [N, L], got shape {ids.shape} "
                         f"dtype {ids.dtype}")
    if ids.shape[1] > context:
        raise ValueError(f"token ids have length {ids.shape[1]}, longer than the context length {context}")
    if ids.size and (ids.min() < 0 or ids.max() >= vocab):
        raise ValueError(f"token ids must lie in [0, {vocab}), got range [{ids.min()}, {ids.max()}]")
    w = _Weights(weights, prefix="")

    x = w["token_embedding.weight"][ids] + w["positional_embedding"][: ids.shape[1]]
    x = _transformer(x, w, int(text["layers"]), int(text["heads"]), bool(config["quick_gelu"]), causal=True)
    x = _layer_norm(x, w, "ln_final")
    pooled = x[np.arange(ids.shape[0]), ids.argmax(axis=-1)]
    return pooled @ w["text_projection"]


class _Weights:
    """float64 view of a state dict under a prefix, with a clear error for a missing tensor."""

    def __init__(self, weights: Mapping[str, np.ndarray], prefix: str):
        self._weights, self._prefix = weights, prefix

    def __getitem__(self, name: str) -> np.ndarray:
        key = self._prefix + name
        if key not in self._weights:
            raise KeyError(f"weights have no tensor {key!r}; pass the model's state dict in OpenAI names")
        return np.asarray(self._weights[key], dtype=np.float64)


def _section(config: Mapping[str, Any], name: str, defaults: dict[str, Any]) -> dict[str, Any]:
    if name not in config or "quick_gelu" not in config:
        raise ValueError(f"config needs '{name}' and 'quick_gelu' keys (CLIPConfig.to_dict()), "
                         f"got keys {sorted(config)}")
    return {**defaults, **config[name]}


def _patch_embed(pixels: np.ndarray, kernel: np.ndarray, patch: int) -> np.ndarray:
    """Conv with stride = kernel = patch, as non-overlapping patches times the flattened kernel."""
    batch, channels, size, _ = pixels.shape
    grid = size // patch
    patches = pixels.reshape(batch, channels, grid, patch, grid, patch)
    # -> [B, grid_y, grid_x, C, p, p]: row-major patch order and the kernel's (C, kh, kw) layout.
    patches = patches.transpose(0, 2, 4, 1, 3, 5).reshape(batch, grid * grid, channels * patch * patch)
    return patches @ kernel.reshape(kernel.shape[0], -1).T


def _layer_norm(x: np.ndarray, w: _Weights, name: str) -> np.ndarray:
    mean = x.mean(axis=-1, keepdims=True)
    var = ((x - mean) ** 2).mean(axis=-1, keepdims=True)  # biased, as torch's LayerNorm
    return (x - mean) / np.sqrt(var + _LN_EPS) * w[f"{name}.weight"] + w[f"{name}.bias"]


def _linear(x: np.ndarray, w: _Weights, name: str) -> np.ndarray:
    return x @ w[f"{name}.weight"].T + w[f"{name}.bias"]


def _transformer(x: np.ndarray, w: _Weights, layers: int, heads: int, quick_gelu: bool,
                 causal: bool) -> np.ndarray:
    """Pre-LN residual blocks: x + attn(ln_1(x)), then x + mlp(ln_2(x))."""
    for i in range(layers):
        block = f"transformer.resblocks.{i}"
        x = x + _attention(_layer_norm(x, w, f"{block}.ln_1"), w, f"{block}.attn", heads, causal)
        hidden = _linear(_layer_norm(x, w, f"{block}.ln_2"), w, f"{block}.mlp.c_fc")
        hidden = _quick_gelu(hidden) if quick_gelu else _gelu(hidden)
        x = x + _linear(hidden, w, f"{block}.mlp.c_proj")
    return x


def _attention(x: np.ndarray, w: _Weights, name: str, heads: int, causal: bool) -> np.ndarray:
    """Multi-head self-attention from nn.MultiheadAttention's packed in_proj and out_proj."""
    batch, length, width = x.shape
    if width % heads:
        raise ValueError(f"{name}: width {width} is not divisible by {heads} heads")
    head_dim = width // heads
    qkv = x @ w[f"{name}.in_proj_weight"].T + w[f"{name}.in_proj_bias"]  # [B, L, 3W], q|k|v blocks
    q, k, v = (part.reshape(batch, length, heads, head_dim).transpose(0, 2, 1, 3)
               for part in np.split(qkv, 3, axis=-1))  # each [B, H, L, D]
    scores = q @ k.transpose(0, 1, 3, 2) / math.sqrt(head_dim)  # [B, H, L, L]
    if causal:
        future = np.triu(np.ones((length, length), dtype=bool), k=1)
        scores = np.where(future, -np.inf, scores)
    out = _softmax(scores) @ v  # [B, H, L, D]
    out = out.transpose(0, 2, 1, 3).reshape(batch, length, width)
    return _linear(out, w, f"{name}.out_proj")


def _softmax(x: np.ndarray) -> np.ndarray:
    # Subtracting the row max keeps exp() finite; the diagonal is never masked, so the max is finite.
    e = np.exp(x - x.max(axis=-1, keepdims=True))
    return e / e.sum(axis=-1, keepdims=True)


def _quick_gelu(x: np.ndarray) -> np.ndarray:
    # x * sigmoid(1.702 x), with sigmoid(z) = (1 + tanh(z / 2)) / 2: the same value, no exp() overflow.
    return x * 0.5 * (1.0 + np.tanh(0.851 * x))


def _gelu(x: np.ndarray) -> np.ndarray:
    """Exact GELU: x * Phi(x) = 0.5 x (1 + erf(x / sqrt 2))."""
    return 0.5 * x * (1.0 + _erf(x / math.sqrt(2.0)).astype(np.float64))
