"""Precision names and the choice of precision: what `fp32`, `bf16`, `fp16` and `auto` mean on a device.

Every command speaks these names; Lightning's (`32-true`, `bf16-mixed`, `16-mixed`, ...) are accepted as aliases
for the same compute dtypes, and `lightning_precision` maps the other way for training.
"""

from __future__ import annotations

import torch

__all__ = ["PRECISIONS", "auto_precision", "canonical_precision", "cpu_has_native_bf16", "lightning_precision",
           "resolve_precision"]

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


def resolve_precision(precision: str, device: str | torch.device = "cpu") -> str:
    """`auto` -> `auto_precision(device)`; any other name -> its canonical form (`canonical_precision`)."""
    return auto_precision(device) if precision == "auto" else canonical_precision(precision)


def lightning_precision(precision: str, accelerator: str = "auto") -> str:
    """The Lightning precision a training run uses: for `auto`, bf16-mixed on GPUs with bf16 and on CPUs with
    native bf16, 16-mixed on older GPUs, else 32-true; a Lightning name as given (16-bit ones need a GPU)."""
    if precision != "auto":
        if precision.startswith("16") and not _uses_gpu(accelerator):
            raise ValueError(f"precision {precision!r} needs a GPU; on CPU use bf16-mixed or 32-true")
        return precision
    if _uses_gpu(accelerator):
        return "bf16-mixed" if torch.cuda.is_bf16_supported() else "16-mixed"
    return "bf16-mixed" if cpu_has_native_bf16() else "32-true"


def _uses_gpu(accelerator: str) -> bool:
    return accelerator in ("gpu", "cuda") or (accelerator == "auto" and torch.cuda.is_available())
