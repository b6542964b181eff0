"""A ViT with a class token and a distillation token (DeiT) for any image size, in plain PyTorch.

Touvron et al., "Training data-efficient image transformers & distillation through attention",
ICML 2021, arXiv:2012.12877. Besides the patch tokens the network has a class token, read by
``head``, and a distillation token, read by ``head_dist``; its output is the average of the two
heads, the paper's inference. ``distill=deit`` reads each head by its module name. The layout is
DeiT's (and timm's ``VisionTransformerDistilled``): patch embedding by a strided convolution,
learned positional embeddings for every token, pre-norm blocks (LayerNorm, multi-head
self-attention, LayerNorm, GELU MLP), a final LayerNorm, truncated-normal init (std 0.02). timm's
own ImageNet DeiTs are ``kd.models.timm_model`` with ``name: deit_tiny_distilled_patch16_224``.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from kd.errors import ConfigError


class DistilledViT(nn.Module):
    """A DeiT of the given size for ``image_size`` inputs (fitted from the data by ``build_model``).

    The defaults are DeiT-Ti (embedding 192, 12 blocks, 3 heads, MLP ratio 4) on 32x32 inputs
    cut into 4x4 patches: 64 patch tokens, as ViTs trained from scratch on CIFAR use.

    Args:
        num_classes: Classes of the data.
        in_channels: Channels of the input.
        image_size: Height and width of the input (an int for square inputs).
        patch_size: Side of a patch; it must divide the image size.
        embed_dim: Width of the tokens.
        depth: Number of blocks.
        num_heads: Attention heads; they must divide ``embed_dim``.
        mlp_ratio: Hidden width of each block's MLP over ``embed_dim``.
        drop_path_rate: Stochastic depth of the last block (linearly from 0 over the blocks).

    Raises:
        ConfigError: On a patch size that does not divide the image, or heads that do not divide the width.
    """

    def __init__(self, num_classes: int, in_channels: int = 3, image_size: tuple[int, int] | int = 32,
                 patch_size: int = 4, embed_dim: int = 192, depth: int = 12, num_heads: int = 3,
                 mlp_ratio: float = 4.0, drop_path_rate: float = 0.0) -> None:
        super().__init__()
        size = (image_size, image_size) if isinstance(image_size, int) else tuple(image_size)
        if any(s % patch_size for s in size):
            raise ConfigError("patch_size", f"{patch_size} does not divide the images' {size[0]}x{size[1]} pixels")
        if embed_dim % num_heads:
            raise ConfigError("num_heads", f"{num_heads} does not divide embed_dim {embed_dim}")
        tokens = (size[0] // patch_size) * (size[1] // patch_size)
        self.patch_embed = nn.Conv2d(in_channels, embed_dim, patch_size, stride=patch_size)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        self.dist_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, tokens + 2, embed_dim))
        self.blocks = nn.ModuleList([
            Block(embed_dim, num_heads, mlp_ratio, drop_path_rate * i / max(depth - 1, 1)) for i in range(depth)
        ])
        self.norm = nn.LayerNorm(embed_dim, eps=1e-6)
        self.pre_logits = nn.Identity()  # the mean of the two tokens: the embedding methods read as `pooled`
        self.head = nn.Linear(embed_dim, num_classes)
        self.head_dist = nn.Linear(embed_dim, num_classes)
        for p in (self.cls_token, self.dist_token, self.pos_embed):
            nn.init.trunc_normal_(p, std=0.02)
        self.apply(_init)

    def forward(self, x: Tensor) -> Tensor:
        """The average of the class head and the distillation head, ``(B, num_classes)``."""
        x = self.patch_embed(x).flatten(2).transpose(1, 2)  # (B, N, D)
        b = x.shape[0]
        x = torch.cat([self.cls_token.expand(b, -1, -1), self.dist_token.expand(b, -1, -1), x], dim=1) + self.pos_embed
        for block in self.blocks:
            x = block(x)
        x = self.norm(x)
        cls, dist = x[:, 0], x[:, 1]  # (B, D) each
        self.pre_logits((cls + dist) / 2)  # a tap only (timm's forward_head(pre_logits=True))
        return (self.head(cls) + self.head_dist(dist)) / 2


class Block(nn.Module):
    """A pre-norm transformer block: ``x + attn(norm(x))``, then ``x + mlp(norm(x))``, with stochastic depth."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float, drop_path: float) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.attn = nn.MultiheadAttention(dim, num_heads, batch_first=True)
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        hidden = int(dim * mlp_ratio)
        self.mlp = nn.Sequential(nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, dim))
        self.drop_path = drop_path

    def _drop(self, x: Tensor) -> Tensor:
        if not self.training or self.drop_path == 0.0:
            return x
        keep = (torch.rand_like(x[:, :1, :1]) >= self.drop_path).to(x.dtype)  # (B, 1, 1): one draw per sample
        return x * keep / (1 - self.drop_path)

    def forward(self, x: Tensor) -> Tensor:
        y = self.norm1(x)
        x = x + self._drop(self.attn(y, y, y, need_weights=False)[0])
        return x + self._drop(self.mlp(self.norm2(x)))


def _init(module: nn.Module) -> None:
    if isinstance(module, nn.Linear):
        nn.init.trunc_normal_(module.weight, std=0.02)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, nn.LayerNorm):
        nn.init.ones_(module.weight)
        nn.init.zeros_(module.bias)
