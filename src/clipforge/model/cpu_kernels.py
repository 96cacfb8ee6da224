"""Pre-packed, fused linear layers for fp32 and bf16 inference on CPUs (oneDNN).

`F.linear` hands oneDNN a plain row-major weight, which it re-lays out into its blocked format on every
call, and an MLP's activation then makes two or three more passes over the widest tensor of the block in
bf16. oneDNN's own linear primitive (`torch.ops.mkldnn._linear_pointwise`, the kernel torch.compile's CPU
backend emits) takes a weight packed once into the blocked format and applies the activation on the
accumulator before the result is written. On ViT-B/32 on a 2-core AVX-512 BF16 CPU, packing the linear
layers and fusing the MLP activation raise image throughput 1.2-1.4x in fp32 and bf16, at batch 1 and 64
(`bench/bench_encode.py`; `CLIPFORGE_CPU_KERNELS=0` gives the baseline).

The packed copies are derived from the parameters and cached beside them (a weak mapping keyed by the
parameter, so they die with the model and never enter a state dict). They cost one more copy of each matrix
in memory. A copy is rebuilt when its parameter is replaced or moved, modified in place by an ordinary op
(load_state_dict, `mul_`: the version counter moves), or after any `train()`/`eval()` call on a model:
PyTorch's fused optimizers and writes through `.data` change weights without moving the version counter, and
switching modes is what every training loop does between updating weights and using them without gradients.
The fast path runs only where nothing needs a gradient and the model is neither traced nor compiled;
everywhere else the callers use plain torch ops. Set ``CLIPFORGE_CPU_KERNELS=0`` to turn it off.
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
import os
from collections.abc import Iterator

import torch
from torch import nn
from torch.utils.weak import WeakIdKeyDictionary

__all__ = ["activation_kernel", "fast_linear", "fast_path", "linear", "plain_ops", "weights_may_have_changed"]

# Activation modules fused into the linear layer before them: oneDNN post-op name, its algorithm, and the
# factor the layer's output is multiplied by first. QuickGELU(h) = h * sigmoid(1.702 h) is oneDNN's
# swish(1.702 h) / 1.702 (see MLP.forward for where the two factors go).
_QUICK_GELU_ALPHA = 1.702

# Keyed by the parameter's identity (tensors compare elementwise, so a plain WeakKeyDictionary cannot hold them).
_cache: WeakIdKeyDictionary = WeakIdKeyDictionary()
_generation = 0  # bumped by weights_may_have_changed(): every cached copy older than it is stale
_plain_only: contextvars.ContextVar[bool] = contextvars.ContextVar("clipforge_plain_ops", default=False)


def weights_may_have_changed() -> None:
    """Mark every packed copy stale (called from `train()`/`eval()`, see the module docstring)."""
    global _generation
    _generation += 1


@contextlib.contextmanager
def plain_ops() -> Iterator[None]:
    """Within this block the model uses torch's own ops even without gradients: for a no-grad pass whose
    results must match a later gradient pass to the last bit (training's feature cache)."""
    token = _plain_only.set(True)
    try:
        yield
    finally:
        _plain_only.reset(token)


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
        from .clip import cpu_has_native_bf16

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
    if torch.is_autocast_enabled("cpu") or _plain_only.get():  # autocast chooses the compute dtype itself
        return False
    if torch.jit.is_scripting() or torch.jit.is_tracing() or torch.compiler.is_compiling():
        return False
    return _kernels_available(x.dtype)


def activation_kernel(act: nn.Module) -> tuple[str, str, float] | None:
    """(post-op, algorithm, scale) fusing `act` into the linear layer before it; None when it cannot be."""
    from .layers import QuickGELU

    if isinstance(act, QuickGELU):
        return "swish", "", _QUICK_GELU_ALPHA
    if isinstance(act, nn.GELU) and act.approximate in ("none", "tanh"):
        return "gelu", act.approximate, 1.0
    if isinstance(act, nn.ReLU):
        return "relu", "", 1.0
    return None


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """`F.linear`, through the packed kernel where `fast_path(x, weight)` holds."""
    if fast_path(x, weight):
        return fast_linear(x, weight, bias)
    return torch.nn.functional.linear(x, weight, bias)


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
    # Stale when the parameter was replaced, moved or cast (its storage), changed by an in-place op (its
    # version counter), or a model switched modes since (the generation).
    state = (_generation, weight.data_ptr(), _version(weight),
             *((bias.data_ptr(), _version(bias)) if bias is not None else ()))
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
