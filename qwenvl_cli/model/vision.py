"""Qwen-VL's vision tower: a ViT over image patches, then a resampler to a fixed number of vectors.

State-dict keys are the official ones relative to `transformer.visual.`::

    conv1.weight  positional_embedding  ln_pre.{weight,bias}
    transformer.resblocks.N.{ln_1,ln_2}.{weight,bias}
    transformer.resblocks.N.attn.{in_proj,out_proj}.{weight,bias}
    transformer.resblocks.N.mlp.{c_fc,c_proj}.{weight,bias}
    attn_pool.{query,pos_embed,kv_proj.weight}  attn_pool.{ln_q,ln_kv}.{weight,bias}
    attn_pool.attn.{in_proj_weight,in_proj_bias,out_proj.weight,out_proj.bias}
    ln_post.{weight,bias}  proj

Two layouts differ on purpose: a ViT block's `attn.in_proj` rows are interleaved per head
([q_h | k_h | v_h] for each head h), while the resampler's `attn.in_proj_weight` is the standard
[Wq; Wk; Wv] of `nn.MultiheadAttention`.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

LN_EPS = 1e-6
POS_GRID = 16  # `positional_embedding` is stored for a 16×16 patch grid whatever the image size
RESAMPLER_HEAD_DIM = 128


def sincos_table(embed_dim: int, grid_size: int) -> torch.Tensor:
    """The fixed 2-D sin-cos table (grid_size², embed_dim), float32, rows in row-major grid order.

    Row r = h * grid_size + w: the first half of the columns encodes the column w, the second half the
    row h; each half is [sin(pos * omega), cos(pos * omega)] with omega_i = 1 / 10000 ** (i / (D / 4)).
    """
    if embed_dim % 4:
        raise ValueError(f"sin-cos table needs embed_dim divisible by 4, got {embed_dim}")
    quarter = embed_dim // 4
    omega = 1.0 / 10000 ** (torch.arange(quarter, dtype=torch.float64) / quarter)
    coords = torch.arange(grid_size, dtype=torch.float64)
    h, w = torch.meshgrid(coords, coords, indexing="ij")

    def encode(pos: torch.Tensor) -> torch.Tensor:
        angles = pos.reshape(-1, 1) * omega
        return torch.cat([angles.sin(), angles.cos()], dim=1)

    return torch.cat([encode(w), encode(h)], dim=1).to(torch.float32)


def grid_side(rows: int) -> int:
    """The side of a square grid of `rows` cells; a ValueError if `rows` is not a square."""
    side = math.isqrt(rows)
    if side * side != rows:
        raise ValueError(f"{rows} positions do not form a square grid")
    return side


def resize_pos_table(table: torch.Tensor, grid: int) -> torch.Tensor:
    """A (S, C) table for a √S×√S grid, bicubic-resized (fp32, align_corners=False) to (grid², C)."""
    side = grid_side(table.shape[0])
    if side == grid:
        return table
    channels = table.shape[1]
    square = table.float().reshape(1, side, side, channels).permute(0, 3, 1, 2)
    resized = F.interpolate(square, size=(grid, grid), mode="bicubic", align_corners=False)
    return resized.permute(0, 2, 3, 1).reshape(grid * grid, channels).to(table.dtype)


class VisionAttention(nn.Module):
    """Multi-head self-attention whose `in_proj` rows are interleaved per head: [q_h | k_h | v_h]."""

    def __init__(self, width: int, heads: int):
        super().__init__()
        if width % heads:
            raise ValueError(f"vision width {width} is not divisible by {heads} heads")
        self.heads = heads
        self.head_dim = width // heads
        self.in_proj = nn.Linear(width, 3 * width)
        self.out_proj = nn.Linear(width, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, length, width = x.shape
        qkv = self.in_proj(x).reshape(n, length, self.heads, 3 * self.head_dim)
        q, k, v = qkv.transpose(1, 2).split(self.head_dim, dim=-1)  # each (n, heads, L, head_dim)
        out = F.scaled_dot_product_attention(q, k, v)  # scale 1/sqrt(head_dim), no mask
        return self.out_proj(out.transpose(1, 2).reshape(n, length, width))


class VisionMLP(nn.Module):
    def __init__(self, width: int, hidden: int):
        super().__init__()
        self.c_fc = nn.Linear(width, hidden)
        self.c_proj = nn.Linear(hidden, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.c_proj(F.gelu(self.c_fc(x)))


class VisionBlock(nn.Module):
    """Pre-LN transformer block: x + attn(ln_1(x)), then x + mlp(ln_2(x))."""

    def __init__(self, width: int, heads: int, mlp_ratio: float):
        super().__init__()
        self.ln_1 = nn.LayerNorm(width, eps=LN_EPS)
        self.attn = VisionAttention(width, heads)
        self.ln_2 = nn.LayerNorm(width, eps=LN_EPS)
        self.mlp = VisionMLP(width, int(width * mlp_ratio))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x))
        return x + self.mlp(self.ln_2(x))


class VisionBlocks(nn.Module):
    """Holds the blocks under the official name `resblocks`."""

    def __init__(self, width: int, layers: int, heads: int, mlp_ratio: float):
        super().__init__()
        self.resblocks = nn.ModuleList(VisionBlock(width, heads, mlp_ratio) for _ in range(layers))


class Resampler(nn.Module):
    """Cross-attention from `n_queries` learned queries to the patch features (one head per 128 dims)."""

    def __init__(self, n_queries: int, embed_dim: int, kv_dim: int):
        super().__init__()
        if embed_dim % RESAMPLER_HEAD_DIM:
            raise ValueError(f"resampler width {embed_dim} is not a multiple of {RESAMPLER_HEAD_DIM}")
        self.n_queries = n_queries
        self.embed_dim = embed_dim
        self.query = nn.Parameter(torch.zeros(n_queries, embed_dim))
        self.pos_embed = nn.Parameter(sincos_table(embed_dim, grid_side(n_queries)), requires_grad=False)
        self.kv_proj = nn.Linear(kv_dim, embed_dim, bias=False) if kv_dim != embed_dim else nn.Identity()
        self.attn = nn.MultiheadAttention(embed_dim, embed_dim // RESAMPLER_HEAD_DIM, batch_first=True)
        self.ln_q = nn.LayerNorm(embed_dim, eps=LN_EPS)
        self.ln_kv = nn.LayerNorm(embed_dim, eps=LN_EPS)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, length, _ = x.shape
        x = self.ln_kv(self.kv_proj(x))
        key_pos = resize_pos_table(self.pos_embed, grid_side(length))
        query = (self.ln_q(self.query) + self.pos_embed).unsqueeze(0).expand(n, -1, -1)
        out, _ = self.attn(query, x + key_pos, x, need_weights=False)
        return out


class VisionTransformer(nn.Module):
    """pixel_values (n, 3, S, S) → (n, n_queries, output_dim) image vectors for the LM."""

    def __init__(
        self,
        image_size: int,
        patch_size: int,
        width: int,
        layers: int,
        heads: int,
        mlp_ratio: float,
        output_dim: int,
        n_queries: int = 256,
        **unused,
    ):
        super().__init__()
        self.image_size = image_size
        self.patch_size = patch_size
        self.width = width
        self.output_dim = output_dim
        self.vision_tokens = n_queries
        self.gradient_checkpointing = False

        self.conv1 = nn.Conv2d(3, width, kernel_size=patch_size, stride=patch_size, bias=False)
        self.positional_embedding = nn.Parameter(torch.zeros(POS_GRID * POS_GRID, width))
        self.ln_pre = nn.LayerNorm(width, eps=LN_EPS)
        self.transformer = VisionBlocks(width, layers, heads, mlp_ratio)
        self.attn_pool = Resampler(n_queries, output_dim, width)
        self.ln_post = nn.LayerNorm(output_dim, eps=LN_EPS)
        self.proj = nn.Parameter(torch.zeros(output_dim, output_dim))

    @property
    def dtype(self) -> torch.dtype:
        return self.conv1.weight.dtype

    @property
    def device(self) -> torch.device:
        return self.conv1.weight.device

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        x = self.conv1(pixel_values.to(dtype=self.dtype, device=self.device))  # (n, width, g, g)
        grid = x.shape[-1]
        x = x.flatten(2).transpose(1, 2)  # (n, g*g, width), row-major patches
        x = self.ln_pre(x + resize_pos_table(self.positional_embedding, grid))
        use_checkpoint = self.gradient_checkpointing and self.training and torch.is_grad_enabled()
        for block in self.transformer.resblocks:
            x = checkpoint(block, x, use_reentrant=False) if use_checkpoint else block(x)
        return self.ln_post(self.attn_pool(x)) @ self.proj

    @torch.no_grad()
    def init_weights(self, std: float = 0.02, generator: torch.Generator | None = None) -> None:
        """Fill every parameter; the same CPU `generator` seed gives the same weights on any device/dtype.

        Random values are drawn in fp32 on the CPU, in a fixed module order, then copied in place.
        Parameters flagged `_is_hf_initialized` (loaded from a checkpoint by transformers, which then
        calls `_init_weights` on every module) are left alone.
        """

        def fill(param: torch.Tensor, make) -> None:
            if not getattr(param, "_is_hf_initialized", False):
                param.copy_(make())

        def normal(param: torch.Tensor, scale: float) -> None:
            fill(param, lambda: torch.randn(param.shape, generator=generator, dtype=torch.float32) * scale)

        def constant(param: torch.Tensor, value: float) -> None:
            fill(param, lambda: torch.full(param.shape, value))

        for module in self.modules():
            if isinstance(module, nn.LayerNorm):
                constant(module.weight, 1.0)
                constant(module.bias, 0.0)
            elif isinstance(module, (nn.Linear, nn.Conv2d)):
                normal(module.weight, std)
                if module.bias is not None:
                    constant(module.bias, 0.0)
            elif isinstance(module, nn.MultiheadAttention):
                normal(module.in_proj_weight, std)
                constant(module.in_proj_bias, 0.0)
                # out_proj is an nn.Linear subclass, reached by the Linear branch
        normal(self.positional_embedding, self.width**-0.5)
        normal(self.attn_pool.query, 0.02)
        normal(self.proj, self.output_dim**-0.5)
        fill(self.attn_pool.pos_embed, lambda: sincos_table(self.output_dim, grid_side(self.vision_tokens)))
