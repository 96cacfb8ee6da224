"""OpenAI's image towers: VisionTransformer and ModifiedResNet (with attention pooling)."""

from __future__ import annotations

from collections import OrderedDict

import torch
from torch import nn

from .activations import activation
from .config import VisionConfig
from .layers import LayerNorm, Transformer, attention
from .towers import Group, ImageTower


class VisionTransformer(ImageTower):
    """Patches -> class token + positions -> Transformer -> the class token's features, projected."""

    def __init__(self, cfg: VisionConfig, output_dim: int, quick_gelu: bool):
        super().__init__()
        if cfg.image_size % cfg.patch_size:
            raise ValueError(f"image_size {cfg.image_size} is not a multiple of patch_size {cfg.patch_size}")
        width, self.grid = cfg.width, cfg.image_size // cfg.patch_size
        self.image_size, self.output_dim = cfg.image_size, output_dim
        scale = width**-0.5
        self.conv1 = nn.Conv2d(3, width, kernel_size=cfg.patch_size, stride=cfg.patch_size, bias=False)
        self.class_embedding = nn.Parameter(scale * torch.randn(width))
        self.positional_embedding = nn.Parameter(scale * torch.randn(self.grid**2 + 1, width))
        self.ln_pre = LayerNorm(width)
        self.transformer = Transformer(width, cfg.layers, cfg.heads, cfg.mlp_ratio, activation(quick_gelu))
        self.ln_post = LayerNorm(width)
        self.proj = nn.Parameter(scale * torch.randn(width, output_dim))
        self.transformer.init_weights()

    def forward(self, x: torch.Tensor, return_tokens: bool = False):
        residual_dtype = self.positional_embedding.dtype
        x = self.conv1(x.to(self.conv1.weight.dtype))  # [B, width, grid, grid]
        x = x.flatten(2).transpose(1, 2).to(residual_dtype)  # [B, grid*grid, width]
        cls = self.class_embedding.to(residual_dtype).expand(x.shape[0], 1, -1)
        x = torch.cat([cls, x], dim=1) + self.positional_embedding
        x = self.transformer(self.ln_pre(x))
        x = self.ln_post(x)
        pooled = x[:, 0].to(self.proj.dtype) @ self.proj
        return (pooled, x[:, 1:]) if return_tokens else pooled

    def lock_groups(self) -> list[Group]:
        """Stem (patches, class token, positions, ln_pre), each block, head (ln_post, proj)."""
        stem: Group = [self.conv1, self.class_embedding, self.positional_embedding, self.ln_pre]
        return [stem, *([block] for block in self.transformer.resblocks), [self.ln_post, self.proj]]

    def projections(self) -> list[nn.Parameter]:
        return [self.proj]

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.transformer.grad_checkpointing = enable


class Bottleneck(nn.Module):
    expansion = 4

    def __init__(self, inplanes: int, planes: int, stride: int = 1):
        super().__init__()
        # OpenAI's anti-aliased variant: every conv has stride 1; an avgpool does the striding.
        self.conv1 = nn.Conv2d(inplanes, planes, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.act1 = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(planes, planes, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.act2 = nn.ReLU(inplace=True)
        self.avgpool = nn.AvgPool2d(stride) if stride > 1 else nn.Identity()
        self.conv3 = nn.Conv2d(planes, planes * self.expansion, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(planes * self.expansion)
        self.act3 = nn.ReLU(inplace=True)
        self.downsample = None
        if stride > 1 or inplanes != planes * self.expansion:
            self.downsample = nn.Sequential(OrderedDict([
                ("-1", nn.AvgPool2d(stride)),
                ("0", nn.Conv2d(inplanes, planes * self.expansion, 1, bias=False)),
                ("1", nn.BatchNorm2d(planes * self.expansion)),
            ]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.act1(self.bn1(self.conv1(x)))
        out = self.act2(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(self.avgpool(out)))
        identity = x if self.downsample is None else self.downsample(x)
        return self.act3(out + identity)


class AttentionPool2d(nn.Module):
    """Pools a feature map with one query (the spatial mean) attending over all positions."""

    def __init__(self, spatial_dim: int, embed_dim: int, heads: int, output_dim: int):
        super().__init__()
        self.positional_embedding = nn.Parameter(torch.randn(spatial_dim**2 + 1, embed_dim) / embed_dim**0.5)
        self.k_proj = nn.Linear(embed_dim, embed_dim)
        self.q_proj = nn.Linear(embed_dim, embed_dim)
        self.v_proj = nn.Linear(embed_dim, embed_dim)
        self.c_proj = nn.Linear(embed_dim, output_dim)
        self.heads = heads

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.flatten(2).transpose(1, 2)  # [B, HW, C]
        x = torch.cat([x.mean(dim=1, keepdim=True), x], dim=1)
        x = (x.to(self.positional_embedding.dtype) + self.positional_embedding).to(self.q_proj.weight.dtype)
        batch, length, width = x.shape
        head_dim = width // self.heads
        q = self.q_proj(x[:, :1]).view(batch, 1, self.heads, head_dim).transpose(1, 2)
        k = self.k_proj(x).view(batch, length, self.heads, head_dim).transpose(1, 2)
        v = self.v_proj(x).view(batch, length, self.heads, head_dim).transpose(1, 2)
        out = attention(q, k, v)
        return self.c_proj(out.transpose(1, 2).reshape(batch, width))


class ModifiedResNet(ImageTower):
    """OpenAI's ResNet: 3-conv stem, avgpool downsampling, attention pooling instead of global pooling."""

    def __init__(self, cfg: VisionConfig, output_dim: int):
        super().__init__()
        width, layers = cfg.width, list(cfg.layers)
        if len(layers) != 4:
            raise ValueError(f"a ModifiedResNet needs four stage depths, got {layers}")
        if cfg.image_size % 32:
            raise ValueError(f"ModifiedResNet image_size must be a multiple of 32, got {cfg.image_size}")
        self.image_size, self.output_dim = cfg.image_size, output_dim
        self.conv1 = nn.Conv2d(3, width // 2, 3, stride=2, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(width // 2)
        self.act1 = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(width // 2, width // 2, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(width // 2)
        self.act2 = nn.ReLU(inplace=True)
        self.conv3 = nn.Conv2d(width // 2, width, 3, padding=1, bias=False)
        self.bn3 = nn.BatchNorm2d(width)
        self.act3 = nn.ReLU(inplace=True)
        self.avgpool = nn.AvgPool2d(2)
        self._inplanes = width
        self.layer1 = self._make_layer(width, layers[0])
        self.layer2 = self._make_layer(width * 2, layers[1], stride=2)
        self.layer3 = self._make_layer(width * 4, layers[2], stride=2)
        self.layer4 = self._make_layer(width * 8, layers[3], stride=2)
        self.attnpool = AttentionPool2d(cfg.image_size // 32, width * 32, cfg.heads, output_dim)
        self._init_weights()

    def _make_layer(self, planes: int, blocks: int, stride: int = 1) -> nn.Sequential:
        stage = [Bottleneck(self._inplanes, planes, stride)]
        self._inplanes = planes * Bottleneck.expansion
        stage += [Bottleneck(self._inplanes, planes) for _ in range(1, blocks)]
        return nn.Sequential(*stage)

    def _init_weights(self) -> None:
        std = self.attnpool.c_proj.in_features**-0.5
        for proj in (self.attnpool.q_proj, self.attnpool.k_proj, self.attnpool.v_proj, self.attnpool.c_proj):
            nn.init.normal_(proj.weight, std=std)
        for stage in (self.layer1, self.layer2, self.layer3, self.layer4):
            for block in stage:
                nn.init.zeros_(block.bn3.weight)  # each residual branch starts as identity

    def stem(self, x: torch.Tensor) -> torch.Tensor:
        x = self.act1(self.bn1(self.conv1(x)))
        x = self.act2(self.bn2(self.conv2(x)))
        x = self.act3(self.bn3(self.conv3(x)))
        return self.avgpool(x)

    def forward(self, x: torch.Tensor, return_tokens: bool = False):
        x = x.to(self.conv1.weight.dtype)
        if _prefer_channels_last(x):
            x = x.contiguous(memory_format=torch.channels_last)
        x = self.stem(x)
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        pooled = self.attnpool(x)
        return (pooled, x.flatten(2).transpose(1, 2)) if return_tokens else pooled

    def lock_groups(self) -> list[Group]:
        """Stem (three convolutions and their norms), each of the four stages, the attention pool."""
        stem: Group = [self.conv1, self.bn1, self.conv2, self.bn2, self.conv3, self.bn3]
        return [stem, [self.layer1], [self.layer2], [self.layer3], [self.layer4], [self.attnpool]]


def _prefer_channels_last(x: torch.Tensor) -> bool:
    """oneDNN's CPU convolutions run faster on channels-last (NHWC) activations in bf16 inference and in
    training, fp32 or bf16 (bench/bench_kernels.py); fp32 inference at small batches is faster in NCHW. Weights
    keep their layout: the convolution reorders them, which costs little beside the activations."""
    if x.device.type != "cpu":
        return False
    low_precision = x.dtype != torch.float32 or torch.is_autocast_enabled("cpu")
    return low_precision or torch.is_grad_enabled()
