"""SSR on DAFormer, top to bottom in the paper's order:

1. The deployed model: a MiT encoder (mit.py) and DAFormer's head, named so that DAFormer's released weights load.
2. SSR's branch: frozen SAM tokens fused into every MiT stage by cross-attention (training only).
3. DACS's pieces as small pure functions: EMA teacher, pseudo-labels, ClassMix, augmentation, FD, MIC, the loss.
4. UDA: one training step's loss terms by name; the caller sums them and calls backward in its autocast context.
   Beside it, the parameter groups of the paper's AdamW.
Appendix: kornia's color math.
The deployed model's checkpoints are written and read by checkpoint.py; speed levers are applied from outside by
speed.py.

References: lhoyer/DAFormer (mmseg/models/uda/dacs.py, utils/dacs_transforms.py), lhoyer/MIC
(masking_consistency_module.py) and geyanqi/SSR (mmseg/models/uda/ssr.py).
"""
import copy
import math
from collections import OrderedDict
from dataclasses import dataclass, field

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

import mit
from data import IGNORE, denormalize, normalize

# ----------------------------------------------------------------------------------------------------------------
# 1. The deployed model: DAFormer's head (daformer_sepaspp) on a MiT encoder

@dataclass
class SegConfig:
    backbone: str = "mit_b5"  # MiT preset of mit.py
    mit: dict = field(default_factory=dict)  # MiTConfig overrides (tiny test models)
    num_classes: int = 19  # Cityscapes train ids
    channels: int = 256  # DAFormer head width: every stage is embedded to it, and the ASPP fuses to it

    def __post_init__(self):  # checkpoint metadata is JSON, which turns tuples into lists; MiTConfig holds tuples
        self.mit = {k: tuple(v) if isinstance(v, list) else v for k, v in self.mit.items()}


class ConvModule(nn.Module):
    """mmcv's ConvModule as DAFormer configures it: conv without bias (the BatchNorm has one), BatchNorm, ReLU."""

    def __init__(self, cin: int, cout: int, kernel: int, dilation: int = 1, groups: int = 1):
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, kernel, padding=dilation * (kernel // 2), dilation=dilation,
                              groups=groups, bias=False)
        self.bn = nn.BatchNorm2d(cout)
        nn.init.kaiming_normal_(self.conv.weight, mode="fan_out", nonlinearity="relu")  # mmcv's init

    def forward(self, x: Tensor) -> Tensor:
        return F.relu(self.bn(self.conv(x)), inplace=True)


def sep_conv_module(cin: int, cout: int, dilation: int) -> nn.Sequential:
    """mmcv's DepthwiseSeparableConvModule: a dilated depthwise 3x3 ConvModule, then a pointwise 1x1 one."""
    return nn.Sequential(OrderedDict(depthwise_conv=ConvModule(cin, cin, 3, dilation, groups=cin),
                                     pointwise_conv=ConvModule(cin, cout, 1)))


class SepASPP(nn.Module):
    """The fusion layer: parallel branches of growing dilation (1 is a plain 1x1 ConvModule) see the concatenated
    multi-level features with several context sizes; a 3x3 bottleneck merges them (no image pooling branch)."""

    def __init__(self, cin: int, channels: int, dilations: tuple[int, ...] = (1, 6, 12, 18)):
        super().__init__()
        self.aspp_modules = nn.ModuleList(
            ConvModule(cin, channels, 1) if d == 1 else sep_conv_module(cin, channels, d) for d in dilations)
        self.bottleneck = ConvModule(len(dilations) * channels, channels, 3)

    def forward(self, x: Tensor) -> Tensor:
        # channels-last inputs (the embedded maps) would give channels-last weight gradients, which DDP must copy
        x = x.contiguous()
        return self.bottleneck(torch.cat([m(x) for m in self.aspp_modules], dim=1))


class LinearEmbed(nn.Module):
    """A linear map of every pixel's features (SegFormer's 'MLP'); its own module so the keys read '.proj'."""

    def __init__(self, cin: int, cout: int):
        super().__init__()
        self.proj = nn.Linear(cin, cout)

    def forward(self, x: Tensor) -> Tensor:  # (B, Cin, H, W) -> (B, H*W, Cout)
        return self.proj(x.flatten(2).transpose(1, 2))


class DAFormerHead(nn.Module):
    def __init__(self, in_dims: tuple[int, ...], channels: int, num_classes: int, dropout: float = 0.1):
        super().__init__()
        self.embed_layers = nn.ModuleList(LinearEmbed(c, channels) for c in in_dims)
        self.fuse_layer = SepASPP(len(in_dims) * channels, channels)
        self.dropout = nn.Dropout2d(dropout)  # drops whole channels, as mmseg's BaseDecodeHead
        self.conv_seg = nn.Conv2d(channels, num_classes, 1)
        nn.init.normal_(self.conv_seg.weight, std=0.01)  # mmseg's init of the classifier
        nn.init.zeros_(self.conv_seg.bias)

    def forward(self, feats: list[Tensor], domains: int = 1) -> Tensor:
        """[(B, C_i, H/2^(i+2), W/2^(i+2))] -> logits (B, K, H/4, W/4). The batch is `domains` equal parts (source,
        mixed, masked target): the fusion's BatchNorms normalize each with its own statistics, as DAFormer's calls of
        the head per domain; the embeddings and the classifier act on each pixel alone, so they take the whole batch."""
        size = feats[0].shape[2:]
        xs = []
        for embed, f in zip(self.embed_layers, feats):
            x = embed(f).transpose(1, 2).unflatten(2, f.shape[2:])  # (B, channels, h, w)
            if x.shape[2:] != size:
                x = F.interpolate(x, size=size, mode="bilinear", align_corners=False)
            xs.append(x)
        x = torch.cat(xs, dim=1)  # (B, 4 * channels, H/4, W/4)
        x = self.fuse_layer(x) if domains == 1 else torch.cat([self.fuse_layer(part) for part in x.chunk(domains)])
        return self.conv_seg(self.dropout(x))


class Segmentor(nn.Module):
    def __init__(self, cfg: SegConfig):
        super().__init__()
        self.cfg = cfg
        self.backbone = mit.build_mit(cfg.backbone, **cfg.mit)
        self.decode_head = DAFormerHead(self.backbone.cfg.embed_dims, cfg.channels, cfg.num_classes)

    def forward(self, x: Tensor) -> Tensor:  # (B, 3, H, W) normalized -> logits (B, K, H/4, W/4)
        return self.decode_head(self.backbone(x))


def build_segmentor(cfg: SegConfig) -> Segmentor:
    return Segmentor(cfg)

# ----------------------------------------------------------------------------------------------------------------
# 2. SSR: SAM tokens fused into each MiT stage (training only)

SAM_DIM = 256  # channels of the SAM encoder's neck output


class CrossAttention(nn.Module):
    """The stage's tokens ask (queries), the embedded SAM tokens answer (keys, values); SSR's AttentionCross."""

    def __init__(self, dim: int, num_heads: int):
        super().__init__()
        self.num_heads = num_heads
        self.q = nn.Linear(dim, dim, bias=False)
        self.kv = nn.Linear(dim, 2 * dim, bias=False)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: Tensor, ctx: Tensor) -> Tensor:  # (B, N, C), (B, M, C) -> (B, N, C)
        B, N, C = x.shape
        nh = self.num_heads
        q = self.q(x).view(B, N, nh, C // nh).transpose(1, 2)  # (B, nh, N, hd)
        kv = self.kv(ctx).view(B, -1, 2, nh, C // nh)  # (B, M, 2, nh, hd)
        k, v = (t.transpose(1, 2) for t in kv.unbind(2))  # 2 x (B, nh, M, hd), unbound as in mit.Attention
        x = F.scaled_dot_product_attention(q, k, v)  # never builds the (N, M) matrix: 16384 x 4096 in stage 1
        return self.proj(x.transpose(1, 2).reshape(B, N, C))


class SSRBranch(nn.Module):
    """For each regularized stage i: SAM tokens (B, 256, s, s) -> Linear to C_i -> cross-attention from the stage's
    tokens; the result is added to the stage feature. Keys as SSR: embedding_layer.{i}.proj, fusion_layer.{i}."""

    def __init__(self, embed_dims: tuple[int, ...], num_heads: tuple[int, ...], stages=(0, 1, 2, 3)):
        super().__init__()
        self.stages = tuple(stages)
        self.embedding_layer = nn.ModuleDict({str(i): LinearEmbed(SAM_DIM, embed_dims[i]) for i in self.stages})
        self.fusion_layer = nn.ModuleDict({str(i): CrossAttention(embed_dims[i], num_heads[i]) for i in self.stages})

    def forward(self, feats: list[Tensor], sam_feat: Tensor) -> list[Tensor]:
        out = list(feats)
        for i in self.stages:
            f = feats[i]  # (B, C_i, h, w)
            x = self.fusion_layer[str(i)](f.flatten(2).transpose(1, 2), self.embedding_layer[str(i)](sam_feat))
            out[i] = f + x.transpose(1, 2).unflatten(2, f.shape[2:])  # enhanced = feature + attention
        return out


CONTEXTS = ("sam", "shuffled", "zeros")


def ssr_context(tokens: Tensor, mode: str) -> Tensor:
    """What the SSR branch attends to: (2B, 256, s, s) SAM tokens of [source; mixed] images -> the same shape.
    'sam' is SSR: each image's own tokens. The ablations ask whether the student reads image-specific SAM knowledge:
    'shuffled' gives each image the tokens of the next image of its domain (same distribution, another scene),
    'zeros' an empty context, so the branch can learn only a constant shift and the head's second pass remains."""
    if mode == "sam":
        return tokens
    if mode == "zeros":
        return torch.zeros_like(tokens)
    if mode != "shuffled":
        raise ValueError(f"unknown SSR context {mode!r}; choose one of {', '.join(CONTEXTS)}.")
    halves = tokens.unflatten(0, (2, -1))  # (2, B, 256, s, s): source, mixed
    if halves.shape[1] < 2:
        raise ValueError("the shuffled SSR context needs at least 2 images per domain in a batch (--batch-size 2).")
    return halves.roll(1, dims=1).flatten(0, 1)

# ----------------------------------------------------------------------------------------------------------------
# 3. DACS / DAFormer self-training, as pure functions

EMA_ALPHA = 0.999  # DAFormer's teacher momentum, reached at iteration 999 of 40k


@torch.no_grad()
def ema_update(teacher: nn.Module, student: nn.Module, it: int, alpha_max: float = EMA_ALPHA) -> None:
    """teacher <- alpha * teacher + (1 - alpha) * student, alpha = min(1 - 1/(it+1), alpha_max); it=0 copies.
    Parameters only, as DAFormer: the teacher's BatchNorm buffers are its own (see UDA.train)."""
    t, s = list(teacher.parameters()), [p.detach() for p in student.parameters()]
    if it == 0:
        torch._foreach_copy_(t, s)
        return
    alpha = min(1 - 1 / (it + 1), alpha_max)
    torch._foreach_lerp_(t, s, 1 - alpha)  # t + (1 - alpha) * (s - t), every tensor in one call


# DAFormer's pseudo-label rows of weight 0 at the top (rectification border) and bottom (ego car) of a 512 crop
IGNORE_ROWS = (15, 120)


@torch.no_grad()
def pseudo_label(logits: Tensor, threshold: float = 0.968, ignore_top: int = IGNORE_ROWS[0],
                 ignore_bottom: int = IGNORE_ROWS[1]) -> tuple[Tensor, Tensor]:
    """Teacher logits (B, K, H, W) -> labels (B, H, W) and pixel weights (B, H, W): each pixel weighs the fraction of
    its image's pixels whose max probability reaches `threshold`, 0 in the ignored rows. DAFormer takes one fraction
    for the whole batch (with a .cpu() copy); we take one per image, on device."""
    prob, label = logits.float().softmax(dim=1).max(dim=1)
    weight = (prob >= threshold).float().mean(dim=(1, 2))[:, None, None].expand_as(prob).clone()
    weight[:, :ignore_top] = 0
    if ignore_bottom > 0:
        weight[:, -ignore_bottom:] = 0
    return label, weight


def class_masks(lbl: Tensor) -> Tensor:
    """(B, H, W) source labels -> (B, H, W) bool: the pixels of ceil(n/2) of each image's n classes, at random (the
    ignore label counts, as in DAFormer). DAFormer's get_class_masks draws from the whole batch's classes
    (torch.unique(labels), not label), so it may pick classes absent from an image. No torch.unique, whose output
    size makes the CPU wait for the GPU: each value present gets a random key, the ceil(n/2) smallest keys win."""
    B = lbl.shape[0]
    flat = lbl.reshape(B, -1)
    present = torch.zeros(B, 256, dtype=torch.bool, device=lbl.device).scatter_(1, flat, True)  # (B, 256)
    keys = torch.rand(B, 256, device=lbl.device).masked_fill_(~present, 2.0)  # absent values sort last
    rank = keys.argsort(dim=1).argsort(dim=1)  # each value's place in its image's random order
    chosen = rank < (present.sum(dim=1, keepdim=True) + 1) // 2
    return chosen.gather(1, flat).view_as(lbl)


def class_mix(mask: Tensor, src: Tensor, tgt: Tensor) -> Tensor:
    """Source where mask (B, H, W) is set, target elsewhere; images (B, C, H, W) or labels/weights (B, H, W)."""
    return torch.where(mask[:, None] if src.dim() == 4 else mask, src, tgt)


def color_jitter(x: Tensor, s: float = 0.2) -> Tensor:
    """kornia 0.5.8's ColorJitter(s, s, s, s) on RGB images in [0, 1], (B, 3, H, W). Per image: a brightness shift
    in [-s, s] (kornia 0.5 adds it), contrast and saturation factors in [1-s, 1+s] (its contrast multiplies the
    values, no blending with the mean), a hue rotation in [-s, s] turns, the four in a random order, each clamped."""
    out = []
    for img in x:  # DAFormer calls kornia once per mixed image: each image has its own factors and order
        b, c, sat, hue = (torch.rand(4, device=x.device, dtype=x.dtype) * 2 - 1) * s
        ops = (lambda y: (y + b).clamp(0, 1), lambda y: (y * (1 + c)).clamp(0, 1),
               lambda y: adjust_saturation(y, 1 + sat), lambda y: adjust_hue(y, hue * 2 * math.pi))
        for k in torch.randperm(4).tolist():  # a CPU draw: no device sync
            img = ops[k](img)
        out.append(img)
    return torch.stack(out)


def blur_kernel_size(n: int) -> int:
    """DAFormer's kernel for a side of n pixels: ceil(n/10), made odd by subtracting 1 (51 for 512)."""
    k = math.ceil(0.1 * n)
    return k if k % 2 else k - 1


def gaussian_blur(x: Tensor, sigma: Tensor) -> Tensor:
    """kornia's GaussianBlur2d (reflect border) of (B, C, H, W) with one sigma per image, (B,). Separable: the 2-D
    kernel is the outer product of two normalized 1-D ones, so two 1-D passes give the same result, cheaper."""
    B, C, H, W = x.shape
    y = x.reshape(1, B * C, H, W)  # every channel of every image is its own group
    sigma = sigma.to(x.dtype).repeat_interleave(C)[:, None]  # (B*C, 1)
    with torch.autocast(x.device.type, enabled=False):  # an image operation: keep the input's precision
        for k, vertical in ((blur_kernel_size(H), True), (blur_kernel_size(W), False)):
            t = torch.arange(k, device=x.device, dtype=x.dtype) - k // 2
            g = torch.exp(-t ** 2 / (2 * sigma ** 2))
            g = g / g.sum(dim=1, keepdim=True)  # (B*C, k)
            pad = (0, 0, k // 2, k // 2) if vertical else (k // 2, k // 2, 0, 0)
            shape = (B * C, 1, k, 1) if vertical else (B * C, 1, 1, k)
            y = F.conv2d(F.pad(y, pad, mode="reflect"), g.view(shape), groups=B * C)
    return y.view(B, C, H, W)


def strong_transform(img: Tensor, s: float = 0.2, p_jitter: float = 0.8, p_blur: float = 0.5) -> Tensor:
    """DACS's strong augmentation of normalized images (B, 3, H, W): color jitter, then blur (sigma ~ U[0.15, 1.15]
    per image). One coin per batch for each, as DAFormer. p_jitter is 0.8: DAFormer's color_jitter_probability=0.2
    is the chance of *skipping* (it jitters when uniform(0, 1) > 0.2)."""
    if torch.rand(()) < p_jitter:  # CPU coins: no device sync
        img = normalize(color_jitter(denormalize(img, 1.0), s), 1.0)  # the jitter works on RGB in [0, 1]
    if torch.rand(()) < p_blur:
        img = gaussian_blur(img, torch.empty(img.shape[0], device=img.device).uniform_(0.15, 1.15))
    return img


THINGS = (6, 7, 11, 12, 13, 14, 15, 16, 17, 18)  # light, sign, person, rider, car, truck, bus, train, moto, bike


def downscale_label_ratio(lbl: Tensor, scale: int, min_ratio: float, num_classes: int) -> Tensor:
    """(B, H, W) -> (B, H/scale, W/scale): each block's most frequent label, or IGNORE where it covers less than
    min_ratio of the block (or is IGNORE itself); DAFormer's mmseg/utils/utils.py."""
    x = F.one_hot(lbl.masked_fill(lbl == IGNORE, num_classes), num_classes + 1)  # (B, H, W, K+1)
    ratio, out = F.avg_pool2d(x.permute(0, 3, 1, 2).float(), scale).max(dim=1)
    return out.masked_fill((out == num_classes) | (ratio < min_ratio), IGNORE)


def feature_distance(feat: Tensor, feat_imnet: Tensor, lbl: Tensor, num_classes: int = 19,
                     classes: tuple[int, ...] = THINGS, min_ratio: float = 0.75) -> Tensor:
    """DAFormer's ImageNet feature distance: the mean over feature pixels of thing classes of the L2 norm (over
    channels) of student minus ImageNet features, (B, C, h, w) each. 0 when no pixel qualifies (DAFormer's
    torch.mean of nothing is NaN there; its gradient, zero, is the same)."""
    small = downscale_label_ratio(lbl, lbl.shape[-1] // feat.shape[-1], min_ratio, num_classes)
    mask = torch.stack([small == c for c in classes]).any(dim=0)  # (B, h, w); no host-to-device copy
    dist = torch.linalg.vector_norm(feat.float() - feat_imnet.float(), dim=1)  # (B, h, w)
    return (dist * mask).sum() / mask.sum().clamp(min=1)


def mic_mask(img: Tensor, ratio: float = 0.7, block: int = 32) -> Tensor:
    """MIC's BlockMaskGenerator: (B, 1, H, W) 0/1 in the image's dtype, block x block squares dropped w.p. `ratio`."""
    B, _, H, W = img.shape
    keep = (torch.rand(B, 1, round(H / block), round(W / block), device=img.device) > ratio).to(img.dtype)
    return F.interpolate(keep, size=(H, W), mode="nearest")


def seg_loss(logits: Tensor, label: Tensor, weight: Tensor | None = None) -> Tensor:
    """mmseg 0.x's decode loss: logits (B, K, h, w) upsampled bilinearly in fp32 to the label (B, H, W),
    cross-entropy times the pixel weight, averaged over ALL pixels (ignored ones count as 0: avg_factor=None)."""
    logits = F.interpolate(logits.float(), size=label.shape[-2:], mode="bilinear", align_corners=False)
    loss = F.cross_entropy(logits, label, ignore_index=IGNORE, reduction="none")  # (B, H, W)
    return (loss if weight is None else loss * weight).mean()

# ----------------------------------------------------------------------------------------------------------------
# 4. One training step: DAFormer's losses, then SSR's two

METHODS = ("source-only", "dacs", "ssr")
FD_LAMBDA = 0.005  # DAFormer's imnet_feature_dist_lambda


class UDA(nn.Module):
    """The student and what trains it: the EMA teacher `ema`, the frozen ImageNet encoder `imnet` (for FD) and the
    SSR branch `ssr`, each only where the method needs it. SAM is passed to forward: it is in no state dict."""
    keep_pictures = False  # set: forward keeps its images, labels and logits in self.pictures (train.py's panels)

    def __init__(self, student: Segmentor, method: str = "ssr", mic: bool = False, ssr_stages=(0, 1, 2, 3),
                 sam_img_size: int = 1024, ignore_rows: tuple[int, int] = IGNORE_ROWS, ema_alpha: float = EMA_ALPHA,
                 ssr_context: str = "sam"):
        """Args:
            method: 'source-only', 'dacs' (DAFormer: + ClassMix self-training + FD) or 'ssr' (dacs + SAM's losses).
            mic: add masked image consistency on the target (needs the teacher: not with 'source-only').
            ssr_stages: the MiT stages (0..3) that SAM regularizes.
            sam_img_size: side the source and mixed images are resized to for the SAM encoder.
            ignore_rows: target rows at the top and bottom whose pseudo-labels get weight 0 (IGNORE_ROWS).
            ema_alpha: the teacher's momentum once its ramp is over (ema_update).
            ssr_context: what the SSR branch attends to: 'sam', or an ablation (ssr_context())."""
        super().__init__()
        if method not in METHODS:
            raise ValueError(f"unknown method {method!r}; choose one of {', '.join(METHODS)}.")
        if mic and method == "source-only":
            raise ValueError("mic=True needs the EMA teacher's pseudo-labels; use it with method 'dacs' or 'ssr'.")
        if not ssr_stages or len(set(ssr_stages)) != len(ssr_stages) or not set(ssr_stages) <= {0, 1, 2, 3}:
            raise ValueError(f"ssr_stages={ssr_stages!r}: give distinct MiT stages among 0, 1, 2, 3.")
        if ssr_context not in CONTEXTS:
            raise ValueError(f"unknown SSR context {ssr_context!r}; choose one of {', '.join(CONTEXTS)}.")
        self.student, self.method, self.mic, self.ssr_context = student, method, mic, ssr_context
        self.sam_img_size, self.ignore_rows, self.ema_alpha = sam_img_size, ignore_rows, ema_alpha
        adapt = method != "source-only"
        self.ema = copy.deepcopy(student).requires_grad_(False) if adapt else None
        self.imnet = copy.deepcopy(student.backbone).requires_grad_(False) if adapt else None  # ImageNet weights
        bcfg = student.backbone.cfg
        self.ssr = SSRBranch(bcfg.embed_dims, bcfg.num_heads, ssr_stages) if method == "ssr" else None
        self.train()

    def train(self, mode: bool = True) -> "UDA":
        """The teacher runs without dropout and drop path, but its BatchNorms (in the head) stay in training mode, as
        in DAFormer, which never puts the EMA model in eval mode: they normalize with the target batch's statistics,
        and their running buffers are unused. The ImageNet encoder is in eval mode, as DAFormer's calc_feat_dist."""
        super().train(mode)
        if self.ema is not None:
            self.ema.eval()
            for m in self.ema.modules():
                if isinstance(m, nn.modules.batchnorm._BatchNorm):
                    m.train(mode)
            self.imnet.eval()
        return self

    def sam_tokens(self, sam: nn.Module, images: Tensor) -> Tensor:
        """The frozen SAM encoder's tokens (N, 256, S/16, S/16) of images (N, 3, H, W) resized to S x S, in the
        images' dtype; the 'zeros' context needs no SAM pass."""
        S, N = self.sam_img_size, images.shape[0]
        if self.ssr_context == "zeros":
            return images.new_zeros(N, SAM_DIM, S // 16, S // 16)
        x = F.interpolate(images, size=(S, S), mode="bilinear", align_corners=False)
        tokens = sam(x.to(next(sam.parameters()).dtype)).to(images.dtype)  # SAM is built in the training dtype
        return ssr_context(tokens, self.ssr_context)

    def forward(self, src_img: Tensor, src_lbl: Tensor, tgt_img: Tensor, it: int, sam: nn.Module | None = None
                ) -> dict[str, Tensor]:
        """Normalized source (B, 3, H, W) with labels (B, H, W), target (B, 3, H, W), the iteration (for the EMA), the
        SAM encoder for 'ssr' -> the weighted loss terms by name (src, mix, fd, src_ssr, mix_ssr, mic: those it has)."""
        backbone, head = self.student.backbone, self.student.decode_head
        if self.method == "source-only":
            return {"src": seg_loss(head(backbone(src_img)), src_lbl)}
        if self.method == "ssr" and sam is None and self.ssr_context != "zeros":
            raise ValueError("method 'ssr' needs the frozen SAM encoder: pass sam=weights.frozen_sam(...).")

        ema_update(self.ema, self.student, it, self.ema_alpha)
        with torch.no_grad():  # the frozen networks run in the caller's autocast dtype
            tgt_logits = F.interpolate(self.ema(tgt_img).float(), size=tgt_img.shape[2:], mode="bilinear",
                                       align_corners=False)  # pseudo-labels at full resolution
            plabel, pweight = pseudo_label(tgt_logits, ignore_top=self.ignore_rows[0],
                                           ignore_bottom=self.ignore_rows[1])
            mask = class_masks(src_lbl)
            mix_img = strong_transform(class_mix(mask, src_img, tgt_img))
            mix_lbl = class_mix(mask, src_lbl, plabel)
            mix_weight = class_mix(mask, torch.ones_like(pweight), pweight)  # source pixels are fully trusted
            imnet_feat = self.imnet(src_img)[-1]
            if self.ssr is not None:
                tokens = self.sam_tokens(sam, torch.cat([src_img, mix_img]))  # (2B, 256, S/16, S/16)
            if self.mic:  # MIC 'separatetrgaug': the augmented target, blocks blanked to 0 (the normalized mean)
                masked = strong_transform(tgt_img)
                masked = masked * mic_mask(masked)

        # One encoder pass over the source, mixed (and MIC's masked) images: MiT has no BatchNorm, so this equals
        # separate passes; the head normalizes each domain on its own (domains=)
        images = [src_img, mix_img] + ([masked] if self.mic else [])
        feats = backbone(torch.cat(images))
        src_logits, mix_logits, *masked_logits = head(feats, len(images)).chunk(len(images))

        # DAFormer's losses; the feature distance is on the plain (not SAM-enhanced) source features of the last stage
        B = src_img.shape[0]
        losses = {"src": seg_loss(src_logits, src_lbl),
                  "mix": seg_loss(mix_logits, mix_lbl, mix_weight),
                  "fd": FD_LAMBDA * feature_distance(feats[-1][:B], imnet_feat, src_lbl, self.student.cfg.num_classes)}

        # SSR: the same two segmentation losses on the SAM-enhanced features, through the same head; their gradient
        # reaches the backbone through the residual of every regularized stage
        src_enh_logits = None
        if self.ssr is not None:
            src_enh_logits, mix_enh_logits = head(self.ssr([f[:2 * B] for f in feats], tokens), 2).chunk(2)
            losses["src_ssr"] = seg_loss(src_enh_logits, src_lbl)
            losses["mix_ssr"] = seg_loss(mix_enh_logits, mix_lbl, mix_weight)

        if self.mic:  # MIC: the masked target's prediction must match the teacher's pseudo-labels
            losses["mic"] = seg_loss(masked_logits[0], plabel, pweight)
        if self.keep_pictures:  # for train.py's debug panels: detached, and nothing is drawn at random
            self.pictures = {k: v.detach() for k, v in dict(
                src_img=src_img, src_lbl=src_lbl, src_logits=src_logits, ssr_logits=src_enh_logits, tgt_img=tgt_img,
                tgt_logits=tgt_logits, plabel=plabel, mix_img=mix_img, mix_lbl=mix_lbl).items() if v is not None}
        return losses


def param_groups(uda: UDA) -> list[dict]:
    """AdamW's parameter groups as the paper's config, each with its lr_mult (the caller sets lr = rate x lr_mult).
    mmcv's paramwise_cfg matches names: 'head' -> lr x10, 'norm' -> no weight decay (so the head's BatchNorms do
    decay, as in DAFormer). SSR modules: base lr."""
    groups = {}
    for n, prm in uda.named_parameters():
        if not prm.requires_grad:
            continue  # the EMA teacher and the ImageNet copy are not trained
        lr_mult, wd = (10.0, 0.01) if "decode_head" in n else (1.0, 0.0 if "norm" in n else 0.01)
        groups.setdefault((lr_mult, wd), []).append(prm)
    return [dict(params=v, lr_mult=k[0], weight_decay=k[1]) for k, v in groups.items()]

# ----------------------------------------------------------------------------------------------------------------
# Appendix: kornia 0.5.8's color math, which color_jitter uses (DAFormer pins that version)

def rgb_to_hsv(x: Tensor, eps: float = 1e-6) -> Tensor:
    """(..., 3, H, W) RGB in [0, 1] -> HSV with hue in [0, 2pi), as kornia.color.rgb_to_hsv."""
    maxc, argmax = x.max(dim=-3)
    delta = maxc - x.min(dim=-3).values
    s = delta / (maxc + eps)
    delta = torch.where(delta == 0, torch.ones_like(delta), delta)
    r, g, b = (maxc.unsqueeze(-3) - x).unbind(-3)
    h = torch.stack([b - g, 2 * delta + r - b, 4 * delta + g - r], dim=-3).gather(-3, argmax.unsqueeze(-3))
    return torch.stack([(h.squeeze(-3) / delta / 6) % 1 * (2 * math.pi), s, maxc], dim=-3)


def hsv_to_rgb(x: Tensor) -> Tensor:
    """Inverse of rgb_to_hsv, as kornia.color.hsv_to_rgb (hue may be negative: it wraps)."""
    h, s, v = x.unbind(-3)
    h6 = h / (2 * math.pi) * 6
    hi = torch.floor(h6) % 6
    f = h6 % 6 - hi
    p, q, t = v * (1 - s), v * (1 - f * s), v * (1 - (1 - f) * s)
    table = torch.stack([v, q, p, p, t, v, t, v, v, q, p, p, p, p, t, v, v, q], dim=-3)  # r, g, b rows by sextant
    return table.gather(-3, torch.stack([hi, hi + 6, hi + 12], dim=-3).long())


def adjust_saturation(x: Tensor, factor: Tensor) -> Tensor:
    h, s, v = rgb_to_hsv(x).unbind(-3)
    return hsv_to_rgb(torch.stack([h, (s * factor).clamp(0, 1), v], dim=-3))


def adjust_hue(x: Tensor, shift: Tensor) -> Tensor:  # shift in radians
    h, s, v = rgb_to_hsv(x).unbind(-3)
    return hsv_to_rgb(torch.stack([torch.fmod(h + shift, 2 * math.pi), s, v], dim=-3))
