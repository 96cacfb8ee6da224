"""CPU inference speed: packed, fused oneDNN linear layers, swapped in when a model is put in eval mode.

`F.linear` hands oneDNN a plain row-major weight, which it re-lays out into its blocked format on every
call, and an MLP's activation then makes two or three more passes over the widest tensor of the block in
bf16. oneDNN's own linear primitive (`torch.ops.mkldnn._linear_pointwise`, the kernel torch.compile's CPU
backend emits) takes a weight packed once into the blocked format and applies the activation on the
accumulator before the result is written (bench/bench_encode.py; `CLIPFORGE_CPU_KERNELS=0` gives the
plain path).

This module is the one seam between the plain model and that speed. `use_packed_kernels(model, True)` (which
`CLIP.eval()` calls) turns the attention layers, the MLPs and the ViT's patch embedding into the subclasses below,
which keep every parameter, name and state-dict key and compute the same function; `use_packed_kernels(model,
False)` (which `CLIP.train()` calls) turns them back, so training never runs them. Even in eval mode they take
the packed path only where nothing needs a gradient, no autocast is active, the model is neither traced nor
compiled, and the dtype is fp32, or bf16 on a CPU with native bf16; everywhere else they call the plain layer.

The packed copies are derived from the parameters and cached beside them (a weak mapping keyed by the
parameter, so they die with the model and never enter a state dict); they cost one more copy of each matrix
in memory. A copy is rebuilt when its parameter is replaced or moved, or modified in place by an ordinary op
(load_state_dict, `mul_`: the version counter moves), and all of a model's copies are dropped whenever it
changes mode: PyTorch's fused optimizers and writes through `.data` change weights without moving the version
counter, and a training loop switches to eval mode between updating weights and using them.
"""

from __future__ import annotations

import functools
import os

import torch
from torch import nn
from torch.utils.weak import WeakIdKeyDictionary

from .activations import QUICK_GELU_ALPHA, QuickGELU
from .layers import MLP, Attention, Ragged
from .precision import cpu_has_native_bf16
from .vision import VisionTransformer

__all__ = ["fast_linear", "fast_path", "use_packed_kernels"]

# Keyed by the parameter's identity (tensors compare elementwise, so a plain WeakKeyDictionary cannot hold them).
_cache: WeakIdKeyDictionary = WeakIdKeyDictionary()


# ------------------------------------------------------------------------------------------------ the seam


def use_packed_kernels(model: nn.Module, enabled: bool) -> None:
    """Swap `model`'s attention layers, MLPs and ViT patch embeddings to their packed versions (`enabled`) or
    back to the plain layers, and drop the packed copies of its weights either way."""
    for module in model.modules():
        plain, packed = _KINDS.get(type(module), (None, None))
        if plain is not None:
            module.__class__ = packed if enabled else plain
        if isinstance(module, VisionTransformer) and _is_patch_convolution(module.conv1):
            module.conv1.__class__ = PackedPatchEmbedding if enabled else nn.Conv2d
    for param in model.parameters():
        _cache.pop(param, None)


def _is_patch_convolution(conv: nn.Module) -> bool:
    """A bias-free convolution over non-overlapping patches, which is one matmul (see PackedPatchEmbedding)."""
    return (type(conv) in (nn.Conv2d, PackedPatchEmbedding) and conv.bias is None and conv.groups == 1
            and conv.stride == conv.kernel_size and conv.padding == (0, 0) and conv.dilation == (1, 1))


# ------------------------------------------------------------------------------------------------ the layers


class PackedAttention(Attention):
    """`Attention` with both projections through packed kernels."""

    def forward(self, x: torch.Tensor, causal: bool = False, ragged: Ragged | None = None) -> torch.Tensor:
        x = x.to(self.in_proj_weight.dtype)
        if not fast_path(x, self.in_proj_weight):
            return super().forward(x, causal, ragged)
        qkv = fast_linear(x, self.in_proj_weight, self.in_proj_bias)
        return fast_linear(self.attend(qkv, causal, ragged), self.out_proj.weight, self.out_proj.bias)


class PackedMLP(MLP):
    """`MLP` with the activation applied inside the first matmul, on its fp32 accumulator."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        inputs = x.to(self.c_fc.weight.dtype)
        fused = _activation_kernel(self.gelu)
        if fused is None or not fast_path(inputs, self.c_fc.weight):
            return super().forward(inputs)
        act, algorithm, scale = fused
        if scale == 1.0:
            hidden = fast_linear(inputs, self.c_fc.weight, self.c_fc.bias, act, algorithm)
            return fast_linear(hidden, self.c_proj.weight, self.c_proj.bias)
        # A scaled activation, QuickGELU(h) = swish(scale * h) / scale: the factor goes on the input before its one
        # rounding to the weights' dtype, and its inverse on the output. Scaling the (bf16) weights instead would
        # round them a second time.
        inputs = (x * scale).to(inputs.dtype)
        hidden = fast_linear(inputs, self.c_fc.weight, self.c_fc.bias, act, algorithm, bias_scale=scale)
        return torch.add(self.c_proj.bias, fast_linear(hidden, self.c_proj.weight), alpha=1 / scale)


class PackedPatchEmbedding(nn.Conv2d):
    """A ViT's patch convolution (stride = kernel, no padding, no bias) as one packed matmul over the flattened
    patches: faster than oneDNN's convolution for this shape, 3 input channels and a huge kernel
    (bench/bench_kernels.py). Returns the convolution's `[B, C, H/p, W/p]` layout as a view of the matmul's
    `[B, patches, C]` result."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, channels, height, width = x.shape
        patch = self.kernel_size[0]
        # The convolution drops a remainder of pixels; the matmul would not, so it leaves those to the convolution.
        if not fast_path(x, self.weight) or height % patch or width % patch:
            return super().forward(x)
        patches = x.reshape(batch, channels, height // patch, patch, width // patch, patch)
        patches = patches.permute(0, 2, 4, 1, 3, 5).reshape(batch, -1, channels * patch * patch)
        tokens = fast_linear(patches, self.weight)  # [B, patches, C]
        return tokens.view(batch, height // patch, width // patch, -1).permute(0, 3, 1, 2)


_KINDS: dict[type, tuple[type, type]] = {kind: pair for pair in ((Attention, PackedAttention), (MLP, PackedMLP))
                                         for kind in pair}


# ------------------------------------------------------------------------------------------------ the kernels


@functools.cache
def _kernels_available(dtype: torch.dtype) -> bool:
    if os.environ.get("CLIPFORGE_CPU_KERNELS", "1").strip().lower() in ("0", "false", "no", "off"):
        return False
    try:
        ops = torch.ops.mkldnn
        ops._linear_pointwise.default, ops._reorder_linear_weight.default  # noqa: B018 (probe: raise if absent)
    except (AttributeError, RuntimeError):
        return False
    if not torch.backends.mkldnn.is_available():
        return False
    if dtype == torch.bfloat16:  # emulated bf16 would be slower than torch's own path
        return cpu_has_native_bf16()
    return dtype == torch.float32


def fast_path(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """True when `x @ weight.T` may go through the packed kernel: fp32 or bf16 (on a CPU with native bf16)
    inputs and weights of one dtype, no autocast, no gradient wanted, not under tracing or compilation."""
    if x.device.type != "cpu" or x.dtype != weight.dtype or x.dtype not in (torch.float32, torch.bfloat16):
        return False
    if x.numel() == 0:
        return False
    if torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad):
        return False
    if torch.is_autocast_enabled("cpu"):  # autocast chooses the compute dtype itself
        return False
    if torch.jit.is_scripting() or torch.jit.is_tracing() or torch.compiler.is_compiling():
        return False
    return _kernels_available(x.dtype)


def _activation_kernel(act: nn.Module) -> tuple[str, str, float] | None:
    """(oneDNN post-op, its algorithm, the factor the layer's output is multiplied by first) fusing `act` into
    the linear layer before it; None when it cannot be. QuickGELU(h) = h * sigmoid(1.702 h) is oneDNN's
    swish(1.702 h) / 1.702."""
    if isinstance(act, QuickGELU):
        return "swish", "", QUICK_GELU_ALPHA
    if isinstance(act, nn.GELU) and act.approximate in ("none", "tanh"):
        return "gelu", act.approximate, 1.0
    if isinstance(act, nn.ReLU):
        return "relu", "", 1.0
    return None


def fast_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None, act: str = "none",
                algorithm: str = "", bias_scale: float = 1.0) -> torch.Tensor:
    """`act(x @ weight.T + bias_scale * bias)` through oneDNN with a packed weight (a convolution's weight is
    read as ``[out, in * kh * kw]``). Only where `fast_path(x, weight)` holds."""
    packed_weight, packed_bias = _packed(weight, bias, bias_scale)
    rows = x.reshape(-1, x.shape[-1]).contiguous()
    out = torch.ops.mkldnn._linear_pointwise(rows, packed_weight, packed_bias, act, [], algorithm)
    return out.view(*x.shape[:-1], out.shape[-1])


def _packed(weight: torch.Tensor, bias: torch.Tensor | None,
            bias_scale: float) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The packed weight and (scaled) bias, from the cache while the parameters are unchanged."""
    # Stale when the parameter was replaced, moved or cast (its storage) or changed by an in-place op (its
    # version counter); a mode switch empties the cache (see the module docstring).
    state = (weight.data_ptr(), _version(weight), *((bias.data_ptr(), _version(bias)) if bias is not None else ()))
    entries = _cache.setdefault(weight, {})
    key = (bias_scale, bias is not None)
    entry = entries.get(key)
    if entry is None or entry[0] != state:
        # Plain tensors (not inference tensors), so that the cache also serves calls outside inference_mode.
        with torch.inference_mode(False), torch.no_grad():
            matrix = weight.detach().reshape(weight.shape[0], -1).contiguous()
            packed_bias = None
            if bias is not None:
                packed_bias = bias.detach() * bias_scale if bias_scale != 1.0 else bias.detach()
            entry = (state, torch.ops.mkldnn._reorder_linear_weight(matrix), packed_bias)
        entries[key] = entry
    return entry[1], entry[2]


def _version(tensor: torch.Tensor) -> int:
    """The in-place version counter; inference tensors (a model built under inference_mode) have none."""
    try:
        return tensor._version
    except RuntimeError:
        return -1
