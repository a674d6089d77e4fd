"""Mix Transformer (MiT) encoders MiT-B0 ... MiT-B5 of SegFormer (Xie et al. 2021), from scratch.

A MiT is a 4-stage pyramid. Each stage
  1. embeds overlapping patches with a strided conv (7x7 stride 4 in stage 1, 3x3 stride 2 after),
  2. runs pre-norm transformer blocks whose self-attention shrinks keys/values by a strided conv (sr_ratio) and
     whose MLP holds a 3x3 depthwise conv (Mix-FFN: the conv gives positional information, MiT has no pos-embed),
  3. applies a final LayerNorm and returns a (B, C_i, H/2^(i+1), W/2^(i+1)) feature map.

Module names equal the keys of the official NVlabs ImageNet checkpoints (patch_embed1.proj.weight,
block1.0.attn.kv.weight, norm1.weight, ...), so those weights load with no renaming. `load_weights` also reads
the Hugging Face layout (transformers' SegformerModel). `python mit.py convert IN OUT.safetensors` turns a
.pth/.bin checkpoint into NVlabs-layout safetensors.
"""
import argparse
import math
import os
import re
import sys
from dataclasses import dataclass, fields

import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import Tensor
from torch.utils.checkpoint import checkpoint

import files


# Where the ImageNet weights come from (README, "Weights"); every missing-weights message names it.
DOWNLOAD = ("mit_b5.pth, 'pretrained on ImageNet-1K', linked from the NVlabs SegFormer README "
            "(https://github.com/NVlabs/SegFormer#training), or the files of https://huggingface.co/nvidia/mit-b5")


class WeightsError(files.UserError):
    """A weights or checkpoint file that cannot be used (missing, unreadable, of another model)."""


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


# ----------------------------------------------------------------------------------------------------------------
# Weights. Our keys are the NVlabs keys. The Hugging Face layout (transformers' SegformerModel.save_pretrained,
# the hub's nvidia/mit-b*) renames every module and splits kv into key and value; these rules map it back.

HF_RULES = [  # (pattern on the HF key without "segformer.", replacement)
    (r"^encoder\.patch_embeddings\.(\d+)\.layer_norm\.", lambda m: f"patch_embed{int(m[1]) + 1}.norm."),
    (r"^encoder\.patch_embeddings\.(\d+)\.", lambda m: f"patch_embed{int(m[1]) + 1}."),
    (r"^encoder\.layer_norm\.(\d+)\.", lambda m: f"norm{int(m[1]) + 1}."),
    (r"^encoder\.block\.(\d+)\.", lambda m: f"block{int(m[1]) + 1}."),
    (r"\.layer_norm_1\.", ".norm1."),
    (r"\.layer_norm_2\.", ".norm2."),
    (r"\.attention\.self\.query\.", ".attn.q."),
    (r"\.attention\.self\.key\.", ".attn.k."),  # merged with .attn.v. into .attn.kv. below
    (r"\.attention\.self\.value\.", ".attn.v."),
    (r"\.attention\.self\.sr\.", ".attn.sr."),
    (r"\.attention\.self\.layer_norm\.", ".attn.norm."),
    (r"\.attention\.output\.dense\.", ".attn.proj."),
    (r"\.mlp\.dense1\.", ".mlp.fc1."),
    (r"\.mlp\.dense2\.", ".mlp.fc2."),
]
# Heads that are not part of the encoder, dropped on load: NVlabs' ImageNet classifier (head.*), transformers'
# ImageNet classifier (classifier.*) and SegFormer's all-MLP segmentation decoder (decode_head.*).
DROPPED = ("head.", "classifier.", "decode_head.")


def check_output_folder(path: str) -> None:
    """Before a slow conversion: the folder that is to hold `path` exists (files.save_atomic writes beside it)."""
    if not os.path.isdir(os.path.dirname(os.path.abspath(path))):
        raise WeightsError(f"the folder of the output {path} does not exist; create it first.")


def detect_layout(sd: dict[str, Tensor]) -> str:
    """'nvlabs' or 'hf' from the key names, else 'unknown'."""
    if any(k.startswith(("encoder.", "segformer.encoder.")) for k in sd):
        return "hf"
    if any(k.startswith("patch_embed1.") for k in sd):
        return "nvlabs"
    return "unknown"


def hf_to_nvlabs(sd: dict[str, Tensor]) -> dict[str, Tensor]:
    """Rename HF keys to NVlabs keys and concatenate key/value weights into kv (keys first, as NVlabs splits it)."""
    out = {}
    for k, v in sd.items():
        k = k.removeprefix("segformer.")
        for pattern, repl in HF_RULES:
            k = re.sub(pattern, repl, k)
        out[k] = v
    for k in [k for k in out if ".attn.k." in k]:
        kv = k.replace(".attn.k.", ".attn.kv.")
        v = k.replace(".attn.k.", ".attn.v.")
        if v in out:  # a lone key or value stays put and is reported as unexpected
            out[kv] = torch.cat([out.pop(k), out.pop(v)])
    return out


def to_nvlabs(sd: dict[str, Tensor]) -> tuple[dict[str, Tensor], str]:
    """Any supported layout -> (encoder-only NVlabs state dict, description of the detected layout)."""
    layout = detect_layout(sd)
    if layout == "hf":
        sd = hf_to_nvlabs(sd)
        layout = "hf layout, keys shown renamed to NVlabs names"
    else:
        layout += " layout"
    sd = {k: v for k, v in sd.items() if not k.startswith(DROPPED)}
    return sd, layout


def arch_of(sd: dict[str, Tensor]) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """(embed_dims, depths) that an NVlabs-layout state dict describes, from its keys and shapes."""
    dims, depths = [], []
    while f"patch_embed{len(dims) + 1}.proj.weight" in sd:
        i = len(dims) + 1
        dims.append(sd[f"patch_embed{i}.proj.weight"].shape[0])
        depths.append(len({k.split(".")[1] for k in sd if k.startswith(f"block{i}.")}))
    return tuple(dims), tuple(depths)


def arch_name(embed_dims: tuple[int, ...], depths: tuple[int, ...]) -> str:
    name = next((n for n, p in MIT_PRESETS.items() if p["embed_dims"] == embed_dims and p["depths"] == depths), None)
    return f"{name or 'a custom MiT'} (embed_dims={embed_dims}, depths={depths})"


def _few(keys: list[str], n: int = 3) -> str:
    return ", ".join(keys[:n]) + (", ..." if len(keys) > n else "")


def check_keys(model: nn.Module, sd: dict[str, Tensor], where: str, model_name: str, layouts: str) -> None:
    """Raise WeightsError unless sd has exactly the model's keys and shapes; `where` names the source, `layouts`
    the key layouts the model reads. Shared with sam_encoder.py."""
    ours = model.state_dict()
    missing = sorted(set(ours) - set(sd))
    unexpected = sorted(set(sd) - set(ours))
    shape = sorted(f"{k} {tuple(sd[k].shape)} vs model {tuple(ours[k].shape)}"
                   for k in set(ours) & set(sd) if sd[k].shape != ours[k].shape)
    problems = [f"{len(ks)} {what} ({_few(ks)})" for what, ks in
                (("missing keys", missing), ("unexpected keys", unexpected), ("keys of the wrong shape", shape)) if ks]
    if problems:
        raise WeightsError(f"{where} does not match the {model_name}: {'; '.join(problems)}. Expected the {layouts} "
                           f"key layout of the same model size.")


def check_state_dict(model: nn.Module, sd: dict[str, Tensor], where: str) -> None:
    """Raise WeightsError unless sd holds this MiT's size, with exactly its keys and shapes."""
    cfg = model.cfg
    file_arch = arch_of(sd)
    if len(file_arch[0]) == len(cfg.embed_dims) and file_arch != (tuple(cfg.embed_dims), tuple(cfg.depths)):
        raise WeightsError(
            f"{where} holds {arch_name(*file_arch)} but the model is "
            f"{arch_name(tuple(cfg.embed_dims), tuple(cfg.depths))}; build the model that matches the weights "
            f"(build_mit(name)) or pass the weights of this model size.")
    check_keys(model, sd, where, "MiT encoder", "NVlabs (patch_embed1.proj.weight, ...) or Hugging Face "
               "(encoder.block.0.0..., optionally under segformer.)")


def read_safetensors(path: str, what: str = "MiT weights", convert: str = "a .pth/.bin", script: str = "mit.py",
                     download: str = DOWNLOAD) -> dict[str, Tensor]:
    """The tensors of a safetensors file; WeightsError naming `what` it should hold, the converter `script` of
    `convert` files and where to `download` them. Shared with sam_encoder.py."""
    if not os.path.isfile(path):
        raise WeightsError(f"{what} file {path} does not exist; pass the path of a .safetensors file (convert "
                           f"{convert} with: python {script} convert IN OUT.safetensors). Download: {download}.")
    try:
        return load_file(path)
    except (SafetensorError, OSError, ValueError) as e:
        raise WeightsError(f"{path} is not a safetensors file ({e}); load_weights reads only .safetensors, convert "
                           f"{convert} checkpoint first with: python {script} convert {path} OUT.safetensors") from None


def load_weights(model: MixVisionTransformer, path: str) -> None:
    """Load a safetensors file in the NVlabs or Hugging Face layout into `model`, strictly: the encoder's keys and
    shapes must match exactly (only the classifier/decoder heads listed in DROPPED are ignored)."""
    sd, layout = to_nvlabs(read_safetensors(path))
    check_state_dict(model, sd, f"{path} ({layout})")
    model.load_state_dict(sd, strict=True)


def read_torch_checkpoint(path: str, expected: str = "an NVlabs mit_b*.pth or a Hugging Face pytorch_model.bin",
                          wrappers: tuple[str, ...] = ("state_dict",), download: str = DOWNLOAD) -> dict[str, Tensor]:
    """A .pth/.bin state dict, flat or wrapped under one of `wrappers` (mmcv-style checkpoints); WeightsError
    saying to pass the `expected` files and where to `download` them. Shared with sam_encoder.py."""
    if not os.path.isfile(path):
        raise WeightsError(f"checkpoint {path} does not exist; pass {expected}. Download: {download}.")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # torch.load raises many types for a bad file; all mean the same to the user
        first_line = (str(e).strip().splitlines() or [""])[0]
        raise WeightsError(f"{path} could not be read by torch.load(weights_only=True) ({type(e).__name__}: "
                           f"{first_line}). Pass {expected}.") from None
    for wrapper in wrappers:
        if isinstance(ckpt, dict) and isinstance(ckpt.get(wrapper), dict):
            ckpt = ckpt[wrapper]
    if not isinstance(ckpt, dict) or not all(isinstance(v, Tensor) for v in ckpt.values()):
        raise WeightsError(f"{path} holds no flat state dict of tensors (nor one under "
                           f"{' or '.join(repr(w) for w in wrappers)}); pass {expected}.")
    return ckpt


def convert_checkpoint(src: str, dst: str) -> None:
    """Convert a .pth/.bin MiT checkpoint (NVlabs or HF layout) to an NVlabs-layout safetensors file, checked
    against the MiT it describes and written atomically."""
    check_output_folder(dst)
    sd, layout = to_nvlabs(read_torch_checkpoint(src))
    embed_dims, depths = arch_of(sd)
    if len(embed_dims) != len(MiTConfig.embed_dims):
        raise WeightsError(f"{src} ({layout}) holds no 4-stage MiT encoder: it lacks patch_embed1..4.proj.weight "
                         f"(NVlabs) or encoder.patch_embeddings.0..3.proj.weight (Hugging Face).")
    with torch.device("meta"):  # only the key names and shapes matter: allocate nothing
        model = build_mit("mit_b5", embed_dims=embed_dims, depths=depths)
    check_state_dict(model, sd, f"{src} ({layout})")
    files.save_atomic(dst, lambda tmp: save_file({k: v.contiguous() for k, v in sd.items()}, tmp))


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description="MiT (SegFormer) encoder tools.")
    sub = parser.add_subparsers(dest="cmd", required=True)
    conv = sub.add_parser("convert", help="convert an NVlabs .pth or HF .bin to NVlabs-layout safetensors")
    conv.add_argument("src", help="input checkpoint: NVlabs mit_b*.pth or Hugging Face pytorch_model.bin")
    conv.add_argument("dst", help="output .safetensors path")
    args = parser.parse_args()
    try:
        convert_checkpoint(args.src, args.dst)
    except WeightsError as e:
        sys.exit(f"error: {e}")
    print(f"wrote {args.dst}")
