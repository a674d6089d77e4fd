"""The image encoder of Segment Anything (SAM, Kirillov et al. 2023), ViT-B/L/H, from scratch.

SSR uses it as a frozen teacher: its features barely depend on the domain, so the student learns from them.
The encoder
  1. cuts the (B, 3, S, S) image into 16x16 patches with a strided conv and adds a learned absolute position
     embedding, giving a (B, S/16, S/16, C) token grid (channels last throughout: the linears act on C),
  2. runs pre-norm transformer blocks. Most attend inside 14x14 windows of the grid (padded at the bottom/right
     to a multiple of 14); the blocks of `global_attn_indexes` attend over the whole grid. Every attention adds a
     decomposed relative position bias (MViTv2): bias[q, k] = q . R_h[row(q) - row(k)] + q . R_w[col(q) - col(k)],
  3. maps the tokens to 256 channels with a neck: 1x1 conv, LayerNorm2d, 3x3 conv, LayerNorm2d.

Module names equal those of segment_anything's ImageEncoderViT (patch_embed.proj, pos_embed, blocks.N.attn.qkv,
blocks.N.attn.rel_pos_h, neck.0 ... neck.3), so the official weights load without renaming. Loading them (and the
Hugging Face layout, facebook/sam-vit-*, and weights trained at another image size) lives in weights.py:
weights.load_sam(model, path), or weights.frozen_sam(...) for SSR's frozen teacher.

Speed (the reference is the yardstick): attention runs in F.scaled_dot_product_attention with the rel-pos bias as
its additive mask, so no (B*heads, N, N) softmax is materialized; q, k, v enter SDPA as strided views of the qkv
output; the token grid is kept contiguous channels-last. On a 2-core CPU in fp32 (ViT-B, 1024 px, batch 1,
bench.py item 1) our forward takes 0.40x the reference's time and memory; on an H200, 0.84x in fp32 and 0.32x in
bf16 against the reference's fp32 (README, Performance).
"""
from dataclasses import dataclass, fields

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor


@dataclass
class SamConfig:
    embed_dim: int = 768
    depth: int = 12
    num_heads: int = 12  # head dim 64 in ViT-B, 80 in ViT-H
    global_attn_indexes: tuple[int, ...] = (2, 5, 8, 11)  # every few blocks one sees the whole image
    img_size: int = 1024  # SAM's training size; smaller teachers resize pos_embed and rel-pos tables on load
    patch_size: int = 16
    window_size: int = 14  # a 64x64 grid (1024 px) pads to 70x70 = 5x5 windows
    out_chans: int = 256
    mlp_ratio: float = 4.0


# The official sizes differ only in width, depth, heads and where the global blocks sit.
SAM_PRESETS: dict[str, dict] = {
    "vit_b": dict(embed_dim=768, depth=12, num_heads=12, global_attn_indexes=(2, 5, 8, 11)),
    "vit_l": dict(embed_dim=1024, depth=24, num_heads=16, global_attn_indexes=(5, 11, 17, 23)),
    "vit_h": dict(embed_dim=1280, depth=32, num_heads=16, global_attn_indexes=(7, 15, 23, 31)),
}

LN_EPS = 1e-6  # SAM builds every LayerNorm with eps 1e-6 (torch's default is 1e-5)


def window_partition(x: Tensor, ws: int) -> Tensor:
    """(B, H, W, C) -> (B * nH * nW, ws*ws, C) windows; the grid is zero-padded at the bottom/right to multiples
    of ws first, as in the reference, so nH = ceil(H / ws)."""
    B, H, W, C = x.shape
    x = F.pad(x, (0, 0, 0, -W % ws, 0, -H % ws))  # (B, Hp, Wp, C)
    nH, nW = x.shape[1] // ws, x.shape[2] // ws
    x = x.view(B, nH, ws, nW, ws, C).transpose(2, 3)  # (B, nH, nW, ws, ws, C)
    return x.reshape(B * nH * nW, ws * ws, C)


def window_unpartition(x: Tensor, ws: int, H: int, W: int) -> Tensor:
    """(B * nH * nW, ws*ws, C) windows -> (B, H, W, C), the padding cut off."""
    nH, nW = -(-H // ws), -(-W // ws)
    C = x.shape[-1]
    x = x.view(-1, nH, nW, ws, ws, C).transpose(2, 3)  # (B, nH, ws, nW, ws, C)
    return x.reshape(-1, nH * ws, nW * ws, C)[:, :H, :W]


def get_rel_pos(size: int, rel_pos: Tensor) -> Tensor:
    """(2*size-1, d) table -> (size, size, d): entry [i, j] embeds the offset i - j along one axis, i.e. row
    i - j + size - 1 of the table. Row i is the table's window i..i+size-1 read backwards: a sliding-window view
    and one flip, where indexing with an offset grid takes five ops (arange, two subtractions, an addition, the
    gather; 96 kernel launches per ViT-B pass)."""
    return rel_pos.unfold(0, size, 1).flip(-1).transpose(1, 2)  # (size, d, size) windows -> (size, size, d)


def rel_pos_bias(q: Tensor, rel_pos_h: Tensor, rel_pos_w: Tensor, h: int, w: int) -> Tensor:
    """Decomposed relative position bias of queries q (B, heads, h*w, d) on an h x w grid -> the additive
    attention mask (B, heads, h*w, h*w). It depends on the query (not only on the offset), so it cannot be shared
    across windows or images; the two small factors are built first and summed once into the mask."""
    B, nh, N, d = q.shape
    q = q.reshape(B, nh, h, w, d)
    rel_h = torch.einsum("bnhwc,hkc->bnhwk", q, get_rel_pos(h, rel_pos_h)).contiguous()  # (B, nh, h, w, kh)
    rel_w = torch.einsum("bnhwc,wkc->bnhwk", q, get_rel_pos(w, rel_pos_w)).contiguous()  # (B, nh, h, w, kw)
    return (rel_h[..., :, None] + rel_w[..., None, :]).view(B, nh, N, N)  # (B, nh, h, w, kh, kw) flattened


class Attention(nn.Module):
    """Multi-head self-attention over windows of the grid (window_size > 0) or the whole grid (window_size 0),
    with the relative position bias passed to SDPA as its additive mask."""

    def __init__(self, dim: int, num_heads: int, window_size: int, grid: int):
        super().__init__()
        self.num_heads = num_heads
        self.window_size = window_size
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        side = window_size or grid  # the rel-pos tables span offsets -(side-1) .. side-1
        self.rel_pos_h = nn.Parameter(torch.zeros(2 * side - 1, dim // num_heads))
        self.rel_pos_w = nn.Parameter(torch.zeros(2 * side - 1, dim // num_heads))

    def forward(self, x: Tensor) -> Tensor:  # (B, H, W, C) -> (B, H, W, C)
        B, H, W, C = x.shape
        ws = self.window_size
        if ws:
            # zero-padded tokens are projected too (their q, k, v are the qkv bias), as in the reference: real
            # queries attend to them
            qkv = self.qkv(window_partition(x, ws))  # (B*nW, ws*ws, 3C)
            h = w = ws
        else:
            qkv = self.qkv(x).view(B, H * W, 3 * C)
            h, w = H, W
        Bw, N, _ = qkv.shape
        # strided views, no copy: SDPA reads them as they are
        q, k, v = qkv.view(Bw, N, 3, self.num_heads, -1).permute(2, 0, 3, 1, 4)  # each (Bw, nh, N, hd)
        bias = rel_pos_bias(q, self.rel_pos_h, self.rel_pos_w, h, w)  # (Bw, nh, N, N)
        x = F.scaled_dot_product_attention(q, k, v, attn_mask=bias)  # (Bw, nh, N, hd)
        x = x.transpose(1, 2).reshape(Bw, N, C)  # free on CPU: SDPA returns this memory order
        x = window_unpartition(x, ws, H, W) if ws else x.view(B, H, W, C)
        return self.proj(x)  # padding tokens are cut off before proj: the reference discards them after it


class MLP(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.lin1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()  # exact erf GELU, as SAM
        self.lin2 = nn.Linear(hidden, dim)

    def forward(self, x: Tensor) -> Tensor:
        return self.lin2(self.act(self.lin1(x)))


class Block(nn.Module):
    def __init__(self, dim: int, num_heads: int, mlp_ratio: float, window_size: int, grid: int):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=LN_EPS)
        self.attn = Attention(dim, num_heads, window_size, grid)
        self.norm2 = nn.LayerNorm(dim, eps=LN_EPS)
        self.mlp = MLP(dim, int(dim * mlp_ratio))

    def forward(self, x: Tensor) -> Tensor:  # (B, H, W, C) -> (B, H, W, C)
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class LayerNorm2d(nn.Module):
    """LayerNorm over the channels of a (B, C, H, W) map."""

    def __init__(self, channels: int):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(channels))
        self.bias = nn.Parameter(torch.zeros(channels))

    def forward(self, x: Tensor) -> Tensor:
        x = F.layer_norm(x.permute(0, 2, 3, 1), x.shape[1:2], self.weight, self.bias, LN_EPS)  # (B, H, W, C)
        return x.permute(0, 3, 1, 2)


class PatchEmbed(nn.Module):
    def __init__(self, patch_size: int, dim: int):
        super().__init__()
        self.proj = nn.Conv2d(3, dim, patch_size, stride=patch_size)

    def forward(self, x: Tensor) -> Tensor:  # (B, 3, S, S) -> (B, S/16, S/16, C)
        # channels last in memory too: a permuted view would make every LayerNorm copy and every add stride badly
        return self.proj(x).permute(0, 2, 3, 1).contiguous()


class SamEncoder(nn.Module):
    def __init__(self, cfg: SamConfig):
        super().__init__()
        self.cfg = cfg
        grid = cfg.img_size // cfg.patch_size
        self.patch_embed = PatchEmbed(cfg.patch_size, cfg.embed_dim)
        self.pos_embed = nn.Parameter(torch.zeros(1, grid, grid, cfg.embed_dim))
        self.blocks = nn.ModuleList(
            Block(cfg.embed_dim, cfg.num_heads, cfg.mlp_ratio,
                  0 if i in cfg.global_attn_indexes else cfg.window_size, grid)
            for i in range(cfg.depth))
        self.neck = nn.Sequential(
            nn.Conv2d(cfg.embed_dim, cfg.out_chans, 1, bias=False),
            LayerNorm2d(cfg.out_chans),
            nn.Conv2d(cfg.out_chans, cfg.out_chans, 3, padding=1, bias=False),
            LayerNorm2d(cfg.out_chans),
        )

    def forward(self, x: Tensor) -> Tensor:
        """Normalized images (B, 3, S, S), S = cfg.img_size -> features (B, out_chans, S/16, S/16) in the model's
        dtype (the input is cast to it: a bf16 teacher takes the fp32 batch of the student)."""
        S = self.cfg.img_size
        if x.shape[1:] != (3, S, S):
            raise ValueError(f"SamEncoder built for img_size={S} got input of shape {tuple(x.shape)}; resize the "
                             f"images to (B, 3, {S}, {S}) or build the encoder with img_size={x.shape[-1]}.")
        x = self.patch_embed(x.to(self.pos_embed.dtype)) + self.pos_embed  # (B, H, W, C)
        for blk in self.blocks:
            x = blk(x)
        return self.neck(x.permute(0, 3, 1, 2)).contiguous()  # (B, 256, H, W)


def build_sam_encoder(name: str = "vit_b", img_size: int = 1024, **overrides) -> SamEncoder:
    """SAM image encoder by preset ('vit_b', 'vit_l', 'vit_h') at input size img_size (a multiple of 16);
    `overrides` replace SamConfig fields (tiny test models)."""
    if name not in SAM_PRESETS:
        raise ValueError(f"unknown SAM preset {name!r}; choose one of {', '.join(SAM_PRESETS)}")
    unknown = set(overrides) - {f.name for f in fields(SamConfig)}
    if unknown:
        raise ValueError(f"unknown SamConfig field(s) {sorted(unknown)} passed to build_sam_encoder({name!r})")
    cfg = SamConfig(**{**SAM_PRESETS[name], "img_size": img_size, **overrides})
    if cfg.img_size % cfg.patch_size:
        raise ValueError(f"img_size={cfg.img_size} is not a multiple of the patch size {cfg.patch_size}; "
                         f"pick e.g. {cfg.img_size // cfg.patch_size * cfg.patch_size}.")
    return SamEncoder(cfg)
