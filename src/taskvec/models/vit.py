"""A small Vision Transformer in plain PyTorch: the CLIP-like image tower for benchmarks and tests.

Why written here: no ViT weights install offline and timm/open_clip need torchvision, yet the method is
defined on CLIP's ViTs, so the composer must be exercised on attention blocks (fused qkv, LayerNorm,
cls token, positional embedding). Parameter names follow timm (``patch_embed.proj``, ``blocks.N.attn.qkv``,
...), so a timm/CLIP checkpoint of the same shape could be mapped onto it.
"""

from __future__ import annotations

import math

import torch
import torch.autograd.forward_ad as fwAD
import torch.nn.functional as F
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel

from ._init import seeded
from .registry import BackboneSpec, register_backbone, require_random_init

__all__ = ["CLIP_MEAN", "CLIP_STD", "VisionTransformer"]

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def _is_transformed(t: torch.Tensor) -> bool:
    """True when ``t`` carries a forward-mode tangent or is wrapped by a torch.func transform."""
    if fwAD.unpack_dual(t).tangent is not None:
        return True
    is_wrapped = getattr(getattr(torch._C, "_functorch", None), "is_functorch_wrapped_tensor", None)
    return bool(is_wrapped(t)) if is_wrapped is not None else False


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """``F.scaled_dot_product_attention``, on the math kernel when a torch.func transform is active.

    Why: the fast CPU flash kernel has no forward-mode derivative (``torch.func.jvp`` fails with
    NotImplementedError) and no vmap batching rule (it falls back to a slow per-sample loop); the math
    kernel is composite, so jvp and vmap see through it. Plain calls keep the fast kernel (4x on CPU).
    """
    if _is_transformed(q) or _is_transformed(k) or _is_transformed(v):
        with sdpa_kernel([SDPBackend.MATH]):
            return F.scaled_dot_product_attention(q, k, v)
    return F.scaled_dot_product_attention(q, k, v)


class PatchEmbed(nn.Module):
    """Non-overlapping patches -> tokens with one strided conv."""

    def __init__(self, patch_size: int, in_chans: int, dim: int) -> None:
        super().__init__()
        self.proj = nn.Conv2d(in_chans, dim, kernel_size=patch_size, stride=patch_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x).flatten(2).transpose(1, 2)


class Attention(nn.Module):
    """Multi-head self-attention with one fused qkv projection (as in CLIP and timm)."""

    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        if dim % heads:
            raise ValueError(f"dim {dim} is not divisible by heads {heads}")
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, N, C = x.shape
        qkv = self.qkv(x).reshape(B, N, 3, self.heads, C // self.heads).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        out = attention(q, k, v)
        return self.proj(out.transpose(1, 2).reshape(B, N, C))


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class Block(nn.Module):
    """Pre-norm transformer block: x + attn(norm1(x)), then x + mlp(norm2(x))."""

    def __init__(self, dim: int, heads: int, mlp_ratio: float) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = Attention(dim, heads)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class VisionTransformer(nn.Module):
    """ViT image tower: features are the final-LayerNorm'd cls token, shape (B, dim); no head.

    Inputs of another size than ``img_size`` (a multiple of ``patch_size``) get a bicubically resized
    positional grid, computed from the parameter on every call so functional_call/jvp see it.
    """

    def __init__(
        self,
        img_size: int = 32,
        patch_size: int = 4,
        dim: int = 192,
        depth: int = 6,
        heads: int = 3,
        mlp_ratio: float = 4.0,
        in_chans: int = 3,
        seed: int | None = None,
    ) -> None:
        super().__init__()
        if img_size % patch_size:
            raise ValueError(f"img_size {img_size} is not a multiple of patch_size {patch_size}")
        self.img_size = img_size
        self.patch_size = patch_size
        self.grid = img_size // patch_size
        self.feature_dim = dim
        self.default_resolution = img_size
        with seeded(seed):
            self.patch_embed = PatchEmbed(patch_size, in_chans, dim)
            self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
            self.pos_embed = nn.Parameter(torch.zeros(1, 1 + self.grid**2, dim))
            self.blocks = nn.ModuleList(Block(dim, heads, mlp_ratio) for _ in range(depth))
            self.norm = nn.LayerNorm(dim)
            self._init_weights()

    def _init_weights(self) -> None:
        """timm's ViT init (truncated normal 0.02 for linears and embeddings), which trains stably."""
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        nn.init.trunc_normal_(self.cls_token, std=0.02)
        w = self.patch_embed.proj.weight
        nn.init.trunc_normal_(w.view(w.shape[0], -1), std=math.sqrt(1.0 / w[0].numel()))
        nn.init.zeros_(self.patch_embed.proj.bias)
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.LayerNorm):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def _pos_embed(self, gh: int, gw: int) -> torch.Tensor:
        if gh == gw == self.grid:
            return self.pos_embed
        cls_pos, grid_pos = self.pos_embed[:, :1], self.pos_embed[:, 1:]
        dim = grid_pos.shape[-1]
        grid_pos = grid_pos.reshape(1, self.grid, self.grid, dim).permute(0, 3, 1, 2)
        grid_pos = F.interpolate(grid_pos, size=(gh, gw), mode="bicubic", align_corners=False)
        return torch.cat([cls_pos, grid_pos.permute(0, 2, 3, 1).reshape(1, gh * gw, dim)], dim=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        H, W = x.shape[-2:]
        if H % self.patch_size or W % self.patch_size:
            raise ValueError(f"input size {H}x{W} is not a multiple of patch_size {self.patch_size}")
        tokens = self.patch_embed(x)
        cls = self.cls_token.expand(tokens.shape[0], -1, -1)
        tokens = torch.cat([cls, tokens], dim=1) + self._pos_embed(H // self.patch_size, W // self.patch_size)
        for block in self.blocks:
            tokens = block(tokens)
        return self.norm(tokens[:, 0])


def _build_vit(name: str, defaults: dict, *, pretrained: bool, seed: int | None = 0, **kwargs) -> VisionTransformer:
    require_random_init(name, pretrained)
    return VisionTransformer(**{**defaults, **kwargs}, seed=seed)


_VIT_SMALL = {"img_size": 32, "patch_size": 4, "dim": 192, "depth": 6, "heads": 3, "mlp_ratio": 4.0}
_TINY_VIT = {"img_size": 16, "patch_size": 4, "dim": 32, "depth": 2, "heads": 2, "mlp_ratio": 2.0}


def build_vit_small(*, pretrained: bool = True, seed: int | None = 0, **kwargs) -> VisionTransformer:
    """Registry factory for ``vit_small`` (~2.7M params, 32 px); random init only."""
    return _build_vit("vit_small", _VIT_SMALL, pretrained=pretrained, seed=seed, **kwargs)


def build_tiny_vit(*, pretrained: bool = True, seed: int | None = 0, **kwargs) -> VisionTransformer:
    """Registry factory for ``tiny_vit`` (dim 32, depth 2, 16 px): the test-sized transformer."""
    return _build_vit("tiny_vit", _TINY_VIT, pretrained=pretrained, seed=seed, **kwargs)


register_backbone(
    "vit_small",
    build_vit_small,
    BackboneSpec(name="vit_small", feature_dim=192, resolution=32, mean=CLIP_MEAN, std=CLIP_STD),
)
register_backbone(
    "tiny_vit",
    build_tiny_vit,
    BackboneSpec(name="tiny_vit", feature_dim=32, resolution=16, mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5)),
)
