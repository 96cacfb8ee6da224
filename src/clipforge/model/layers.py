"""Building blocks of CLIP's Transformers, in OpenAI's parameter layout: fp32 LayerNorm, multi-head attention,
the MLP, the pre-LN residual block and the stack of blocks.

These are the plain layers training runs. For inference on a CPU, `cpu_inference` swaps some of them for
packed oneDNN versions that compute the same function; nothing here knows about that.
"""

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


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool = False) -> torch.Tensor:
    """Softmax attention of `[B, H, L, D]` heads: SDPA, except when training in bf16/fp16 on a CPU.

    There, SDPA's fused CPU kernel is slower forward+backward than three plain ops on the short sequences CLIP
    uses, because its backward does not use the bf16 matrix units (bench/bench_kernels.py). The plain path keeps
    the softmax in fp32, as the fused kernel does."""
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

    Captions are mostly shorter than the context, so unpadded the text tower's matrices do a fraction of the
    work; the features are the same, since a causal model's real tokens never attend to the padding.

    `real` marks each row's real tokens, a prefix of the row. A token count that changes with every batch gives
    every step tensors of new sizes, and the heap fragments (a long training run's memory grows), so some padding
    tokens, computed and ignored, are kept too, to round the count up to a multiple of `bucket`."""

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
        qkv = F.linear(x, self.in_proj_weight, self.in_proj_bias)
        return self.out_proj(self.attend(qkv, causal, ragged))

    def attend(self, qkv: torch.Tensor, causal: bool = False, ragged: Ragged | None = None) -> torch.Tensor:
        """The heads' attention over projected queries, keys and values `[..., 3W]` (laid out as `forward`'s
        input), merged back to `[..., W]`: everything between the two projections."""
        if ragged is not None:
            qkv = ragged.pad(qkv)
        batch, length, width = qkv.shape[0], qkv.shape[1], qkv.shape[2] // 3
        q, k, v = qkv.view(batch, length, 3, self.heads, width // self.heads).permute(2, 0, 3, 1, 4)
        out = attention(q, k, v, causal=causal).transpose(1, 2).reshape(batch, length, width)
        return ragged.unpad(out) if ragged is not None else out


class MLP(nn.Sequential):
    """Linear, activation, linear (OpenAI's `c_fc`, `gelu`, `c_proj`)."""

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

    def init_weights(self) -> None:
        """OpenAI's init: small residual projections so that deep stacks start near identity."""
        width, layers = self.width, len(self.resblocks)
        proj_std = width**-0.5 * (2 * layers) ** -0.5
        for block in self.resblocks:
            nn.init.normal_(block.attn.in_proj_weight, std=width**-0.5)
            nn.init.normal_(block.attn.out_proj.weight, std=proj_std)
            nn.init.normal_(block.mlp.c_fc.weight, std=(2 * width) ** -0.5)
            nn.init.normal_(block.mlp.c_proj.weight, std=proj_std)

    def forward(self, x: torch.Tensor, causal: bool = False, ragged: Ragged | None = None) -> torch.Tensor:
        for block in self.resblocks:
            if self.grad_checkpointing and torch.is_grad_enabled():
                x = torch.utils.checkpoint.checkpoint(block, x, causal, ragged, use_reentrant=False)
            else:
                x = block(x, causal=causal, ragged=ragged)
        return x
