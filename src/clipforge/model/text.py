"""OpenAI's text tower: a causal Transformer pooled at the end-of-text token (the highest id in each row)."""

from __future__ import annotations

import torch
from torch import nn

from .activations import activation
from .config import TextConfig
from .layers import LayerNorm, Ragged, Transformer
from .towers import Group, TextTower

_TOKEN_BUCKET = 256  # the unpadded text tower's token counts are rounded up to a multiple of this
OPENAI_TOKENIZER = "openai-bpe"  # clipforge.tokenizer's name for OpenAI's BPE


class TextTransformer(TextTower):
    """Token and position embeddings -> causal Transformer -> ln_final -> the end-of-text token, projected.

    Its tensors keep OpenAI's top-level names in CLIP's state dict (`token_embedding`, `positional_embedding`,
    `transformer.resblocks.*`, `ln_final`, `text_projection`)."""

    layout_prefix = ""

    def __init__(self, cfg: TextConfig, output_dim: int, quick_gelu: bool):
        super().__init__()
        self.context_length, self.vocab_size, self.output_dim = cfg.context_length, cfg.vocab_size, output_dim
        self.token_embedding = nn.Embedding(cfg.vocab_size, cfg.width)
        self.positional_embedding = nn.Parameter(torch.empty(cfg.context_length, cfg.width))
        self.transformer = Transformer(cfg.width, cfg.layers, cfg.heads, cfg.mlp_ratio, activation(quick_gelu))
        self.ln_final = LayerNorm(cfg.width)
        self.text_projection = nn.Parameter(torch.empty(cfg.width, output_dim))
        nn.init.normal_(self.token_embedding.weight, std=0.02)
        nn.init.normal_(self.positional_embedding, std=0.01)
        nn.init.normal_(self.text_projection, std=cfg.width**-0.5)
        self.transformer.init_weights()

    def forward(self, ids: torch.Tensor, return_tokens: bool = False):
        self.check_token_ids(ids)
        # The end-of-text token has the highest id in the vocabulary, so argmax finds it.
        eot = ids.argmax(dim=-1)
        if return_tokens or not ids.numel() or torch.jit.is_tracing() or torch.compiler.is_compiling():
            x = self.token_embedding(ids) + self.positional_embedding[: ids.shape[1]]
            x = self.ln_final(self.transformer(x, causal=True))
            pooled = x[torch.arange(x.shape[0], device=x.device), eot]
        else:
            # Attention is causal, so no token after its row's EOT can change a pooled output: those are left out
            # (the columns after the last EOT entirely, the rest of the padding everywhere but in attention).
            ids = ids[:, : int(eot.max()) + 1]
            ragged = Ragged(torch.arange(ids.shape[1], device=ids.device) <= eot[:, None], bucket=_TOKEN_BUCKET)
            x = self.token_embedding(ids.reshape(-1)[ragged.index])
            x = x + self.positional_embedding[ragged.index % ids.shape[1]]
            x = self.ln_final(self.transformer(x, causal=True, ragged=ragged))
            pooled = x[ragged.starts + eot]
        pooled = pooled.to(self.text_projection.dtype) @ self.text_projection
        return (pooled, x) if return_tokens else pooled

    def check_token_ids(self, ids: torch.Tensor) -> None:
        if ids.ndim != 2 or ids.dtype not in (torch.int64, torch.int32):
            raise ValueError(f"token ids must be an integer tensor [N, L], got {tuple(ids.shape)} {ids.dtype}")
        if ids.shape[1] > self.context_length:
            raise ValueError(f"token ids have length {ids.shape[1]}, longer than the model's context "
                             f"length {self.context_length}; tokenize with context_length={self.context_length}")

    def tokenizer_config(self) -> dict:
        return {"type": OPENAI_TOKENIZER, "context_length": self.context_length}

    def lock_groups(self) -> list[Group]:
        """Embeddings, each block, head (ln_final, text_projection)."""
        stem: Group = [self.token_embedding, self.positional_embedding]
        return [stem, *([block] for block in self.transformer.resblocks), [self.ln_final, self.text_projection]]

    def projections(self) -> list[nn.Parameter]:
        return [self.text_projection]

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.transformer.grad_checkpointing = enable
