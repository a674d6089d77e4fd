"""Mix Transformer (MiT) encoders MiT-B0 ... MiT-B5 of SegFormer (Xie et al. 2021), from scratch.

A MiT is a 4-stage pyramid. Each stage
  1. embeds overlapping patches with a strided conv (7x7 stride 4 in stage 1, 3x3 stride 2 after),
  2. runs pre-norm transformer blocks whose self-attention shrinks keys/values by a strided conv (sr_ratio) and
     whose MLP holds a 3x3 depthwise conv (Mix-FFN: the conv gives positional information, MiT has no pos-embed),
  3. applies a final LayerNorm and returns a (B, C_i, H/2^(i+1), W/2^(i+1)) feature map.

Module names equal the keys of the official NVlabs ImageNet checkpoints (patch_embed1.proj.weight,
block1.0.attn.kv.weight, norm1.weight, ...), so those weights load with no renaming. Loading them (and the Hugging
Face layout, transformers' SegformerModel) lives in weights.py: weights.load_mit(model, path).
"""
import math
from dataclasses import dataclass, fields

import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor
from torch.utils.checkpoint import checkpoint


@dataclass
class MiTConfig:
    embed_dims: tuple[int, ...] = (64, 128, 320, 512)  # channels of the 4 stages
    num_heads: tuple[int, ...] = (1, 2, 5, 8)  # head dim 64 in every stage of B1..B5 (32 in B0)
    depths: tuple[int, ...] = (3, 6, 40, 3)  # blocks per stage: MiT-B5
    sr_ratios: tuple[int, ...] = (8, 4, 2, 1)  # key/value grid shrink per stage: all stages attend to H/32 x W/32
    mlp_ratio: int = 4
    drop_path_rate: float = 0.1  # stochastic depth of the last block; rises linearly from 0 at the first


# The official sizes differ only in width (B0) and depth.
MIT_PRESETS: dict[str, dict] = {
    "mit_b0": dict(embed_dims=(32, 64, 160, 256), depths=(2, 2, 2, 2)),
    "mit_b1": dict(embed_dims=(64, 128, 320, 512), depths=(2, 2, 2, 2)),
    "mit_b2": dict(embed_dims=(64, 128, 320, 512), depths=(3, 4, 6, 3)),
    "mit_b3": dict(embed_dims=(64, 128, 320, 512), depths=(3, 4, 18, 3)),
    "mit_b4": dict(embed_dims=(64, 128, 320, 512), depths=(3, 8, 27, 3)),
    "mit_b5": dict(embed_dims=(64, 128, 320, 512), depths=(3, 6, 40, 3)),
}

# NVlabs builds blocks and the stage norms with partial(nn.LayerNorm, eps=1e-6), but the norms inside
# OverlapPatchEmbed and Attention (after sr) with the default eps=1e-5; we keep both to match its numbers.
BLOCK_EPS = 1e-6


def drop_path(x: Tensor, rate: float, training: bool) -> Tensor:
    """Stochastic depth of a residual branch (B, N, C): each sample's branch is dropped with probability `rate`
    and the kept ones scaled by 1/(1 - rate), so the expectation is unchanged; identity in eval mode."""
    if not training or rate == 0:
        return x
    keep = x.new_empty(x.shape[0], 1, 1).bernoulli_(1 - rate)
    return x * keep / (1 - rate)


class OverlapPatchEmbed(nn.Module):
    """Strided conv whose kernel is larger than its stride, so neighbouring patches overlap."""

    def __init__(self, in_chans: int, dim: int, patch_size: int, stride: int):
        super().__init__()
        self.proj = nn.Conv2d(in_chans, dim, patch_size, stride, padding=patch_size // 2)
        self.norm = nn.LayerNorm(dim)

    def forward(self, x: Tensor) -> tuple[Tensor, int, int]:
        x = self.proj(x)  # (B, C, H, W)
        H, W = x.shape[2:]
        x = x.flatten(2).transpose(1, 2)  # (B, N, C), N = H*W; free when x is channels-last
        return self.norm(x), H, W


class Attention(nn.Module):
    """Multi-head self-attention whose keys/values come from the token grid shrunk sr_ratio times per side
    (efficient self-attention): N queries attend to N/sr^2 keys."""

    def __init__(self, dim: int, num_heads: int, sr_ratio: int):
        super().__init__()
        self.num_heads = num_heads
        self.q = nn.Linear(dim, dim)
        self.kv = nn.Linear(dim, 2 * dim)  # keys then values, one matmul
        self.proj = nn.Linear(dim, dim)
        self.sr_ratio = sr_ratio
        if sr_ratio > 1:
            self.sr = nn.Conv2d(dim, dim, sr_ratio, stride=sr_ratio)
            self.norm = nn.LayerNorm(dim)

    def forward(self, x: Tensor, H: int, W: int) -> Tensor:
        B, N, C = x.shape
        nh = self.num_heads
        q = self.q(x).view(B, N, nh, C // nh).transpose(1, 2)  # (B, nh, N, hd)
        if self.sr_ratio > 1:  # a strided conv on the token grid (a channels-last view of the tokens: no copy)
            x = self.sr(x.view(B, H, W, C).permute(0, 3, 1, 2))  # (B, C, H/sr, W/sr)
            x = self.norm(x.flatten(2).transpose(1, 2))  # (B, M, C), M = N / sr^2
        kv = self.kv(x).view(B, -1, 2, nh, C // nh)  # (B, M, 2, nh, hd)
        k, v = (t.transpose(1, 2) for t in kv.unbind(2))  # 2 x (B, nh, M, hd)
        x = F.scaled_dot_product_attention(q, k, v)  # (B, nh, N, hd)
        x = x.transpose(1, 2).reshape(B, N, C)
        return self.proj(x)


class DWConv(nn.Module):
    """3x3 depthwise conv over the token grid (its own module only so the key reads mlp.dwconv.dwconv)."""

    def __init__(self, dim: int):
        super().__init__()
        self.dwconv = nn.Conv2d(dim, dim, 3, padding=1, groups=dim)

    def forward(self, x: Tensor, H: int, W: int) -> Tensor:
        B, N, C = x.shape
        # A channels-last view in and out, no copies. Not x.transpose(1, 2).view(B, C, H, W): at B = 1 that view
        # has a batch stride that hides the channels-last layout from the conv, which then copies to NCHW.
        x = self.dwconv(x.view(B, H, W, C).permute(0, 3, 1, 2))  # (B, C, H, W)
        return x.flatten(2).transpose(1, 2)  # (B, N, C)


class MixFFN(nn.Module):
    """fc1 -> 3x3 depthwise conv -> GELU -> fc2."""

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.dwconv = DWConv(hidden)
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: Tensor, H: int, W: int) -> Tensor:
        return self.fc2(F.gelu(self.dwconv(self.fc1(x), H, W)))


class Block(nn.Module):
    def __init__(self, dim: int, num_heads: int, sr_ratio: int, mlp_ratio: int, drop_path: float):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=BLOCK_EPS)
        self.attn = Attention(dim, num_heads, sr_ratio)
        self.norm2 = nn.LayerNorm(dim, eps=BLOCK_EPS)
        self.mlp = MixFFN(dim, dim * mlp_ratio)
        self.drop_path = drop_path  # stochastic depth rate of both branches

    def forward(self, x: Tensor, H: int, W: int) -> Tensor:  # (B, N, C) -> (B, N, C)
        x = x + drop_path(self.attn(self.norm1(x), H, W), self.drop_path, self.training)
        return x + drop_path(self.mlp(self.norm2(x), H, W), self.drop_path, self.training)


def init_weights(m: nn.Module) -> None:
    """The official initialisation (matters only when training without ImageNet weights)."""
    if isinstance(m, nn.Linear):
        nn.init.trunc_normal_(m.weight, std=0.02)
        nn.init.zeros_(m.bias)
    elif isinstance(m, nn.Conv2d):
        fan_out = m.kernel_size[0] * m.kernel_size[1] * m.out_channels // m.groups
        nn.init.normal_(m.weight, 0, math.sqrt(2.0 / fan_out))
        nn.init.zeros_(m.bias)
    elif isinstance(m, nn.LayerNorm):
        nn.init.ones_(m.weight)
        nn.init.zeros_(m.bias)


class MixVisionTransformer(nn.Module):
    """Stage i (1-based) owns patch_embed{i}, block{i} (a ModuleList) and norm{i}, named as in the checkpoints.

    Set `grad_checkpoint = True` to recompute each block in the backward pass instead of storing its
    activations (training only)."""

    def __init__(self, cfg: MiTConfig):
        super().__init__()
        self.cfg = cfg
        self.grad_checkpoint = False
        n = sum(cfg.depths)
        drop_path = [cfg.drop_path_rate * j / max(n - 1, 1) for j in range(n)]  # linspace(0, rate, n), one per block
        in_chans = 3
        for i, (dim, heads, depth, sr) in enumerate(zip(cfg.embed_dims, cfg.num_heads, cfg.depths, cfg.sr_ratios)):
            first = sum(cfg.depths[:i])
            patch, stride = (7, 4) if i == 0 else (3, 2)
            setattr(self, f"patch_embed{i + 1}", OverlapPatchEmbed(in_chans, dim, patch, stride))
            setattr(self, f"block{i + 1}", nn.ModuleList(
                Block(dim, heads, sr, cfg.mlp_ratio, drop_path[first + j]) for j in range(depth)))
            setattr(self, f"norm{i + 1}", nn.LayerNorm(dim, eps=BLOCK_EPS))
            in_chans = dim
        self.apply(init_weights)

    def forward(self, x: Tensor) -> list[Tensor]:
        """(B, 3, H, W), H and W divisible by 32 -> [(B, C1, H/4, W/4), (B, C2, H/8, W/8), ..., (B, C4, H/32, W/32)].

        The maps are channels-last in memory (a free view of the tokens); call .contiguous() where NCHW matters."""
        outs = []
        for i in range(len(self.cfg.depths)):
            x, H, W = getattr(self, f"patch_embed{i + 1}")(x)  # (B, N, C)
            for blk in getattr(self, f"block{i + 1}"):
                if self.grad_checkpoint and self.training:  # recomputed in backward with the same RNG state
                    x = checkpoint(blk, x, H, W, use_reentrant=False)
                else:
                    x = blk(x, H, W)
            x = getattr(self, f"norm{i + 1}")(x)
            x = x.view(x.shape[0], H, W, -1).permute(0, 3, 1, 2)  # (B, C, H, W)
            outs.append(x)
        return outs


def build_mit(name: str, **overrides) -> MixVisionTransformer:
    """MiT by preset name ('mit_b0'..'mit_b5'); `overrides` replace MiTConfig fields (e.g. tiny test models)."""
    if name not in MIT_PRESETS:
        raise ValueError(f"unknown MiT preset {name!r}; choose one of {', '.join(MIT_PRESETS)}")
    unknown = set(overrides) - {f.name for f in fields(MiTConfig)}
    if unknown:
        raise ValueError(f"unknown MiTConfig field(s) {sorted(unknown)} passed to build_mit({name!r})")
    return MixVisionTransformer(MiTConfig(**{**MIT_PRESETS[name], **overrides}))
