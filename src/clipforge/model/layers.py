"""Building blocks: fp32 LayerNorm, QuickGELU, SDPA attention in OpenAI's parameter layout."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


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

    def forward(self, x: torch.Tensor, causal: bool = False) -> torch.Tensor:
        batch, length, width = x.shape
        x = x.to(self.in_proj_weight.dtype)
        qkv = F.linear(x, self.in_proj_weight, self.in_proj_bias)
        q, k, v = qkv.view(batch, length, 3, self.heads, width // self.heads).permute(2, 0, 3, 1, 4)
        out = F.scaled_dot_product_attention(q, k, v, is_causal=causal)
        return self.out_proj(out.transpose(1, 2).reshape(batch, length, width))


class MLP(nn.Sequential):
    def __init__(self, width: int, hidden: int, act: type[nn.Module]):
        super().__init__()
        self.c_fc = nn.Linear(width, hidden)
        self.gelu = act()
        self.c_proj = nn.Linear(hidden, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x.to(self.c_fc.weight.dtype))


class ResidualAttentionBlock(nn.Module):
    """Pre-LN block. The residual stream keeps its own dtype (fp32 even when matrices are bf16)."""

    def __init__(self, width: int, heads: int, mlp_ratio: float, act: type[nn.Module]):
        super().__init__()
        self.ln_1 = LayerNorm(width)
        self.attn = Attention(width, heads)
        self.ln_2 = LayerNorm(width)
        self.mlp = MLP(width, int(width * mlp_ratio), act)

    def forward(self, x: torch.Tensor, causal: bool = False) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x), causal=causal).to(x.dtype)
        return x + self.mlp(self.ln_2(x)).to(x.dtype)


class Transformer(nn.Module):
    """A stack of residual blocks on batch-first `[B, L, W]` inputs."""

    def __init__(self, width: int, layers: int, heads: int, mlp_ratio: float, act: type[nn.Module]):
        super().__init__()
        self.width = width
        self.grad_checkpointing = False
        self.resblocks = nn.ModuleList(
            ResidualAttentionBlock(width, heads, mlp_ratio, act) for _ in range(layers)
        )

    def forward(self, x: torch.Tensor, causal: bool = False) -> torch.Tensor:
        for block in self.resblocks:
            if self.grad_checkpointing and torch.is_grad_enabled():
                x = torch.utils.checkpoint.checkpoint(block, x, causal, use_reentrant=False)
            else:
                x = block(x, causal=causal)
        return x


def activation(quick_gelu: bool) -> type[nn.Module]:
    return QuickGELU if quick_gelu else nn.GELU
