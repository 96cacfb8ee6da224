"""Building blocks: fp32 LayerNorm, QuickGELU, SDPA attention in OpenAI's parameter layout."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from . import cpu_kernels


class LayerNorm(nn.LayerNorm):
    """LayerNorm that always computes in fp32 and hands back the input's dtype."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with torch.autocast(x.device.type, enabled=False):
            out = F.layer_norm(x.float(), self.normalized_shape, self.weight.float(), self.bias.float(),
                               self.eps)
        return out.to(x.dtype)


class QuickGELU(nn.Module):
    """x * sigmoid(1.702 x): the activation OpenAI trained its CLIP models with."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.sigmoid(1.702 * x)


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool = False) -> torch.Tensor:
    """Softmax attention of `[B, H, L, D]` heads: SDPA, except when training in bf16/fp16 on a CPU.

    There, SDPA's fused CPU kernel is 2.5-5x slower forward+backward than three plain ops on the short sequences
    CLIP uses (ViT-B/32's 50 tokens, captions' ~20, attention pooling's 10), because its backward does not use
    the bf16 matrix units. The plain path keeps the softmax in fp32, as the fused kernel does."""
    if not (torch.is_grad_enabled() and q.requires_grad and q.device.type == "cpu"
            and q.dtype in (torch.bfloat16, torch.float16)):
        return F.scaled_dot_product_attention(q, k, v, is_causal=causal)
    scores = (q * q.shape[-1] ** -0.5) @ k.transpose(-2, -1)
    if causal:
        future = torch.ones(scores.shape[-2:], dtype=torch.bool, device=q.device).triu(1)
        scores = scores.masked_fill(future, float("-inf"))
    return scores.float().softmax(dim=-1).to(v.dtype) @ v


class Ragged:
    """Where the kept tokens of a padded `[B, L]` batch sit, so that the position-wise layers (LayerNorm, the
    projections, the MLP) run on those tokens alone, `[N, W]`, and only attention sees the padded layout.

    Flickr-like captions average 14 of a 32-token context: unpadded, the text tower's matrices do less than half
    the work, and the features are the same, since a causal model's real tokens never attend to the padding.

    `real` marks each row's real tokens, a prefix of the row. A token count that changes with every batch gives
    every step tensors of new sizes, and the heap fragments (a 15-minute training run peaked at 2x the memory), so
    some padding tokens, computed and ignored, are kept too, to round the count up to a multiple of `bucket`."""

    def __init__(self, real: torch.Tensor, bucket: int = 1):
        keep = real.clone()
        spare = -int(keep.sum()) % bucket
        if spare:  # the first padding tokens in row-major order: each row's kept tokens stay a prefix
            keep.view(-1)[(~keep).view(-1).nonzero()[:spare, 0]] = True
        self.batch, self.length = keep.shape
        self.index = keep.view(-1).nonzero().squeeze(1)
        kept = keep.sum(dim=1)
        self.starts = kept.cumsum(0) - kept  # where each row's first token sits in `[N, W]`

    def pad(self, x: torch.Tensor) -> torch.Tensor:
        """`[N, C]` kept tokens -> `[B, L, C]`, zeros elsewhere."""
        flat = x.new_zeros(self.batch * self.length, x.shape[-1]).index_copy(0, self.index, x)
        return flat.view(self.batch, self.length, -1)

    def unpad(self, x: torch.Tensor) -> torch.Tensor:
        """`[B, L, C]` -> `[N, C]`, the kept tokens in row-major order."""
        return x.reshape(self.batch * self.length, -1).index_select(0, self.index)


class Attention(nn.Module):
    """Multi-head self-attention with nn.MultiheadAttention's parameter names, run on SDPA."""

    def __init__(self, width: int, heads: int):
        super().__init__()
        if width % heads:
            raise ValueError(f"width {width} is not divisible by heads {heads}")
        self.heads = heads
        self.in_proj_weight = nn.Parameter(torch.empty(3 * width, width))
        self.in_proj_bias = nn.Parameter(torch.zeros(3 * width))
        self.out_proj = nn.Linear(width, width)
        nn.init.xavier_uniform_(self.in_proj_weight)
        nn.init.zeros_(self.out_proj.bias)

    def forward(self, x: torch.Tensor, causal: bool = False, ragged: Ragged | None = None) -> torch.Tensor:
        """`x` is `[B, L, W]`, or `[N, W]` kept tokens with `ragged` saying where they sit."""
        x = x.to(self.in_proj_weight.dtype)
        qkv = cpu_kernels.linear(x, self.in_proj_weight, self.in_proj_bias)
        if ragged is not None:
            qkv = ragged.pad(qkv)
        batch, length, width = qkv.shape[0], qkv.shape[1], qkv.shape[2] // 3
        q, k, v = qkv.view(batch, length, 3, self.heads, width // self.heads).permute(2, 0, 3, 1, 4)
        out = attention(q, k, v, causal=causal).transpose(1, 2).reshape(batch, length, width)
        if ragged is not None:
            out = ragged.unpad(out)
        return cpu_kernels.linear(out, self.out_proj.weight, self.out_proj.bias)


class MLP(nn.Sequential):
    def __init__(self, width: int, hidden: int, act: type[nn.Module]):
        super().__init__()
        self.c_fc = nn.Linear(width, hidden)
        self.gelu = act()
        self.c_proj = nn.Linear(hidden, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        inputs = x.to(self.c_fc.weight.dtype)
        fused = cpu_kernels.activation_kernel(self.gelu)
        if fused is None or not cpu_kernels.fast_path(inputs, self.c_fc.weight):
            return super().forward(inputs)
        # The activation runs inside the first matmul, on its fp32 accumulator.
        act, algorithm, scale = fused
        if scale == 1.0:
            hidden = cpu_kernels.fast_linear(inputs, self.c_fc.weight, self.c_fc.bias, act, algorithm)
            return cpu_kernels.fast_linear(hidden, self.c_proj.weight, self.c_proj.bias)
        # A scaled activation, QuickGELU(h) = swish(scale * h) / scale: the factor goes on the input before its one
        # rounding to the weights' dtype, and its inverse on the output. Scaling the (bf16) weights instead would
        # round them a second time.
        inputs = (x * scale).to(inputs.dtype)
        hidden = cpu_kernels.fast_linear(inputs, self.c_fc.weight, self.c_fc.bias, act, algorithm, bias_scale=scale)
        return torch.add(self.c_proj.bias, cpu_kernels.fast_linear(hidden, self.c_proj.weight), alpha=1 / scale)


class ResidualAttentionBlock(nn.Module):
    """Pre-LN block. The residual stream keeps its own dtype (fp32 even when matrices are bf16)."""

    def __init__(self, width: int, heads: int, mlp_ratio: float, act: type[nn.Module]):
        super().__init__()
        self.ln_1 = LayerNorm(width)
        self.attn = Attention(width, heads)
        self.ln_2 = LayerNorm(width)
        self.mlp = MLP(width, int(width * mlp_ratio), act)

    def forward(self, x: torch.Tensor, causal: bool = False, ragged: Ragged | None = None) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x), causal=causal, ragged=ragged).to(x.dtype)
        return x + self.mlp(self.ln_2(x)).to(x.dtype)


class Transformer(nn.Module):
    """A stack of residual blocks on batch-first `[B, L, W]` inputs, or on `[N, W]` kept tokens with a `Ragged`."""

    def __init__(self, width: int, layers: int, heads: int, mlp_ratio: float, act: type[nn.Module]):
        super().__init__()
        self.width = width
        self.grad_checkpointing = False
        self.resblocks = nn.ModuleList(
            ResidualAttentionBlock(width, heads, mlp_ratio, act) for _ in range(layers)
        )

    def train(self, mode: bool = True) -> Transformer:
        # Reached from any ancestor's train()/eval(): the moment a training loop hands updated weights to a
        # no-gradient pass, so the packed inference copies must be rebuilt (see cpu_kernels).
        cpu_kernels.weights_may_have_changed()
        return super().train(mode)

    def forward(self, x: torch.Tensor, causal: bool = False, ragged: Ragged | None = None) -> torch.Tensor:
        for block in self.resblocks:
            if self.grad_checkpointing and torch.is_grad_enabled():
                x = torch.utils.checkpoint.checkpoint(block, x, causal, ragged, use_reentrant=False)
            else:
                x = block(x, causal=causal, ragged=ragged)
        return x


def activation(quick_gelu: bool) -> type[nn.Module]:
    return QuickGELU if quick_gelu else nn.GELU
