"""The official weight files: their layouts (NVlabs, Hugging Face, SAM, mmseg), strict loading, and conversion.

The networks (mit.py, sam_encoder.py, ssr.py) name their modules as the official checkpoints name their keys, so
loading is mostly checking: every key and shape must match, and only the parts a model does not have (an ImageNet
classifier, SAM's prompt encoder and mask decoder) are dropped, by name. What a layout renames is mapped back here.
Models load .safetensors only (it holds tensors, never code); a .pth is converted once, by what its keys say it is:

    python weights.py convert mit_b5.pth mit_b5.safetensors               # NVlabs or Hugging Face MiT -> --pretrained
    python weights.py convert sam_vit_b_01ec64.pth sam_vit_b.safetensors  # official SAM -> --sam-weights
    python weights.py convert gta2cs_daformer.pth daformer.safetensors    # DAFormer/MIC release -> eval.py --ckpt

A released DAFormer/MIC model converts to this project's own segmentor checkpoint, which checkpoint.py writes and
reads. Sections, helpers first: 1. what every format shares; 2. MiT; 3. SAM; 4. released mmseg checkpoints; 5. the
converter and its command line.
"""
import argparse
import collections
import os
import pickle
import re
import sys
import tempfile
import types
import warnings

import torch
import torch.nn.functional as F
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import Tensor

import checkpoint
import datasets
import files
import mit
import sam_encoder
import ssr
from files import WeightsError

# ----------------------------------------------------------------------------------------------------------------
# 1. What every format shares: a size's preset name, reading and writing files (the strict key check is
# files.check_keys, shared with checkpoint.py)


def preset_of(presets: dict[str, dict], **arch) -> str | None:
    """The name of the preset whose fields equal `arch` (e.g. embed_dims=..., depths=...), else None."""
    return next((name for name, p in presets.items() if all(p[k] == v for k, v in arch.items())), None)


def arch_text(presets: dict[str, dict], custom: str, **arch) -> str:
    """'mit_b5 (embed_dims=(64, 128, 320, 512), depths=(3, 6, 40, 3))', or `custom` where no preset fits."""
    return f"{preset_of(presets, **arch) or custom} ({', '.join(f'{k}={v}' for k, v in arch.items())})"


def read_safetensors(path: str, what: str, convert: str, download: str) -> dict[str, Tensor]:
    """The tensors of a safetensors file; WeightsError naming `what` it should hold, the `convert` files the
    converter takes instead and where to `download` them."""
    if not os.path.isfile(path):
        raise WeightsError(f"{what} file {path} does not exist; pass the path of a .safetensors file (convert "
                           f"{convert} with: python weights.py convert IN OUT.safetensors). Download: {download}.")
    try:
        return load_file(path)
    except (SafetensorError, OSError, ValueError) as e:
        raise WeightsError(f"{path} is not a safetensors file ({e}); only .safetensors files load, convert {convert} "
                           f"checkpoint first with: python weights.py convert {path} OUT.safetensors") from None


def write_tensors(sd: dict[str, Tensor], path: str) -> None:
    """A state dict as safetensors, written atomically (files.save_atomic)."""
    files.save_atomic(path, lambda tmp: save_file({k: v.contiguous() for k, v in sd.items()}, tmp))


# A .pth is a pickle, and a pickle may name any function to call while it loads. torch.load(weights_only=True)
# refuses every name outside its own allow-list, and with it the released mmseg checkpoints, whose 'meta' holds
# numpy arrays and mmcv objects. So every .pth is unpickled with an allow-list of our own: the few functions that
# rebuild tensors, and OrderedDict; every other global is replaced by an inert placeholder, never imported or called.
TENSOR_GLOBALS = {
    ("torch._utils", "_rebuild_tensor_v2"): torch._utils._rebuild_tensor_v2,
    ("torch._utils", "_rebuild_parameter"): torch._utils._rebuild_parameter,
    ("collections", "OrderedDict"): collections.OrderedDict,
}


class Skipped:
    """Stands in for any pickled object that is not a tensor or a plain container. Pickle may construct it, set
    its state, items or list entries, or call it: it accepts everything and keeps nothing."""

    def __new__(cls, *args, **kwargs):
        return super().__new__(cls)

    def __init__(self, *args, **kwargs):
        pass

    def __call__(self, *args, **kwargs):
        return Skipped()

    def __setstate__(self, state):
        pass

    def __setitem__(self, key, value):
        pass

    def append(self, item):
        pass

    def extend(self, items):
        pass


def restricted_pickle(skipped: set[str]) -> types.ModuleType:
    """A pickle module for torch.load(pickle_module=...) whose unpickler resolves only TENSOR_GLOBALS; the names of
    the globals it replaced by Skipped are added to `skipped`. (torch resolves storage types itself.)"""

    class Unpickler(pickle.Unpickler):
        def find_class(self, module: str, name: str):
            if (module, name) in TENSOR_GLOBALS:
                return TENSOR_GLOBALS[module, name]
            skipped.add(f"{module}.{name}")
            return Skipped

    module = types.ModuleType("restricted_pickle")
    module.Unpickler = Unpickler
    module.load = lambda file, **kwargs: Unpickler(file, **kwargs).load()
    return module


def read_checkpoint(path: str, expected: str) -> tuple[object, set[str]]:
    """A .pth/.bin as torch.load returns it, through restricted_pickle, and the names of the globals it skipped;
    WeightsError saying to pass the `expected` files."""
    if not os.path.isfile(path):
        raise WeightsError(f"checkpoint {path} does not exist; pass {expected}.")
    skipped: set[str] = set()
    try:
        # safe: the pickle module resolves no global outside TENSOR_GLOBALS (see restricted_pickle)
        ckpt = torch.load(path, map_location="cpu", pickle_module=restricted_pickle(skipped), weights_only=False)
    except Exception as e:  # torch.load raises many types for a bad file; all mean the same to the user
        first_line = (str(e).strip().splitlines() or [""])[0]
        raise WeightsError(f"{path} could not be read by torch.load ({type(e).__name__}: {first_line}); it is "
                           f"truncated or no PyTorch checkpoint. Pass {expected}.") from None
    return ckpt, skipped

# ----------------------------------------------------------------------------------------------------------------
# 2. MiT. Our keys are the NVlabs keys. The Hugging Face layout (transformers' SegformerModel.save_pretrained, the
# hub's nvidia/mit-b*) renames every module and splits kv into key and value; these rules map it back.

# Where the ImageNet weights come from (README, "Weights"); every missing-weights message names it.
MIT_DOWNLOAD = ("mit_b5.pth, 'pretrained on ImageNet-1K', linked from the NVlabs SegFormer README "
                "(https://github.com/NVlabs/SegFormer#training), or the files of https://huggingface.co/nvidia/mit-b5")

MIT_HF_RULES = [  # (pattern on the HF key without "segformer.", replacement)
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
MIT_DROPPED = ("head.", "classifier.", "decode_head.")
MIT_LAYOUTS = ("Expected the NVlabs (patch_embed1.proj.weight, ...) or Hugging Face (encoder.block.0.0..., "
               "optionally under segformer.) key layout of the same model size.")


def mit_layout(sd: dict[str, Tensor]) -> str:
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
        for pattern, repl in MIT_HF_RULES:
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
    layout = mit_layout(sd)
    if layout == "hf":
        sd = hf_to_nvlabs(sd)
        layout = "hf layout, keys shown renamed to NVlabs names"
    else:
        layout += " layout"
    sd = {k: v for k, v in sd.items() if not k.startswith(MIT_DROPPED)}
    return sd, layout


def mit_arch(sd: dict[str, Tensor]) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """(embed_dims, depths) that an NVlabs-layout state dict describes, from its keys and shapes."""
    dims, depths = [], []
    while f"patch_embed{len(dims) + 1}.proj.weight" in sd:
        i = len(dims) + 1
        dims.append(sd[f"patch_embed{i}.proj.weight"].shape[0])
        depths.append(len({k.split(".")[1] for k in sd if k.startswith(f"block{i}.")}))
    return tuple(dims), tuple(depths)


def check_mit(model: mit.MixVisionTransformer, sd: dict[str, Tensor], where: str) -> None:
    """Raise WeightsError unless sd holds this MiT's size, with exactly its keys and shapes."""
    dims, depths = mit_arch(sd)
    ours = dict(embed_dims=tuple(model.cfg.embed_dims), depths=tuple(model.cfg.depths))
    if len(dims) == len(ours["embed_dims"]) and dict(embed_dims=dims, depths=depths) != ours:
        raise WeightsError(
            f"{where} holds {arch_text(mit.MIT_PRESETS, 'a custom MiT', embed_dims=dims, depths=depths)} but the "
            f"model is {arch_text(mit.MIT_PRESETS, 'a custom MiT', **ours)}; build the model that matches the "
            f"weights (build_mit(name)) or pass the weights of this model size.")
    files.check_keys(model, sd, where, "MiT encoder", MIT_LAYOUTS)


def load_mit(model: mit.MixVisionTransformer, path: str) -> None:
    """Load a safetensors file in the NVlabs or Hugging Face layout into `model`, strictly: the encoder's keys and
    shapes must match exactly (only the classifier/decoder heads of MIT_DROPPED are ignored)."""
    sd, layout = to_nvlabs(read_safetensors(path, "MiT weights", "a .pth/.bin", MIT_DOWNLOAD))
    check_mit(model, sd, f"{path} ({layout})")
    model.load_state_dict(sd, strict=True)


def mit_from_checkpoint(sd: dict[str, Tensor], src: str) -> tuple[dict[str, Tensor], str]:
    """A .pth/.bin MiT state dict (NVlabs or HF layout) -> (the encoder in the NVlabs layout, checked against the
    MiT it describes, and what it is)."""
    sd, layout = to_nvlabs(sd)
    embed_dims, depths = mit_arch(sd)
    if len(embed_dims) != len(mit.MiTConfig.embed_dims):
        raise WeightsError(f"{src} ({layout}) holds no 4-stage MiT encoder: it lacks patch_embed1..4.proj.weight "
                           f"(NVlabs) or encoder.patch_embeddings.0..3.proj.weight (Hugging Face).")
    with torch.device("meta"):  # only the key names and shapes matter: allocate nothing
        model = mit.build_mit("mit_b5", embed_dims=embed_dims, depths=depths)
    check_mit(model, sd, f"{src} ({layout})")
    arch = arch_text(mit.MIT_PRESETS, "a custom MiT", embed_dims=embed_dims, depths=depths)
    return sd, f"a MiT encoder, {arch}, {layout}; written in the NVlabs layout, for train.py --pretrained"

# ----------------------------------------------------------------------------------------------------------------
# 3. SAM. Our keys are the official ones without the "image_encoder." prefix. The Hugging Face layout
# (transformers' SamModel, the hub's facebook/sam-vit-*) keeps the encoder under "vision_encoder." and renames a
# few modules; these rules map it back. Weights trained at another image size have their position tables resized.

# Where the weights come from (README, "Weights"); every missing-weights message names it.
SAM_DOWNLOAD = ("the official https://dl.fbaipublicfiles.com/segment_anything/sam_vit_b_01ec64.pth (ViT-L: "
                "sam_vit_l_0b3195.pth, ViT-H: sam_vit_h_4b8939.pth), or the model.safetensors of "
                "https://huggingface.co/facebook/sam-vit-base (sam-vit-large, sam-vit-huge)")

SAM_HF_RULES = [  # (pattern on the HF key without "vision_encoder.", replacement)
    (r"^patch_embed\.projection\.", "patch_embed.proj."),
    (r"^layers\.(\d+)\.layer_norm1\.", r"blocks.\1.norm1."),
    (r"^layers\.(\d+)\.layer_norm2\.", r"blocks.\1.norm2."),
    (r"^layers\.(\d+)\.", r"blocks.\1."),
    (r"^neck\.conv1\.", "neck.0."),
    (r"^neck\.layer_norm1\.", "neck.1."),
    (r"^neck\.conv2\.", "neck.2."),
    (r"^neck\.layer_norm2\.", "neck.3."),
]
# SAM's promptable parts, dropped on load: SSR uses the image encoder only. In the HF layout everything outside
# "vision_encoder." is such a part (prompt_encoder, mask_decoder, shared_image_embedding).
SAM_DROPPED = ("prompt_encoder.", "mask_decoder.")
SAM_LAYOUTS = ("Expected the official (image_encoder.patch_embed.proj.weight, ..., prefix optional) or Hugging Face "
               "(vision_encoder.patch_embed.projection.weight, ...) key layout of the same model size.")


def to_official(sd: dict[str, Tensor]) -> tuple[dict[str, Tensor], str]:
    """Any supported layout -> (encoder-only state dict under our names, description of the detected layout)."""
    if any(k.startswith("vision_encoder.") for k in sd):
        out = {}
        for k, v in sd.items():
            if k.startswith("vision_encoder."):
                k = k.removeprefix("vision_encoder.")
                for pattern, repl in SAM_HF_RULES:
                    k = re.sub(pattern, repl, k)
                out[k] = v
        return out, "Hugging Face layout, keys shown renamed to official names"
    if any(k.startswith("image_encoder.") for k in sd):
        sd = {k.removeprefix("image_encoder."): v for k, v in sd.items() if not k.startswith(SAM_DROPPED)}
        return sd, "official layout, image_encoder. prefix removed"
    return sd, "official layout without prefix"


def sam_arch(sd: dict[str, Tensor]) -> tuple[int, int]:
    """(embed_dim, depth) that an official-layout state dict describes."""
    embed_dim = sd["patch_embed.proj.weight"].shape[0] if "patch_embed.proj.weight" in sd else 0
    depth = len({k.split(".")[1] for k in sd if k.startswith("blocks.")})
    return embed_dim, depth


def resize_pos_embed(pos_embed: Tensor, grid: int) -> Tensor:
    """(1, G, G, C) -> (1, grid, grid, C), bicubic like ViTDet's get_abs_pos (SAM's encoder comes from ViTDet).
    Antialiased, so that when shrinking each new position averages the positions its larger patch covers instead
    of sampling a few of them; growing is plain bicubic."""
    x = pos_embed.permute(0, 3, 1, 2).float()  # (1, C, G, G)
    x = F.interpolate(x, size=(grid, grid), mode="bicubic", align_corners=False, antialias=True)
    return x.permute(0, 2, 3, 1).to(pos_embed.dtype)


def resize_rel_pos(rel_pos: Tensor, length: int) -> Tensor:
    """(L, d) relative position table -> (length, d) by linear interpolation along L: what segment_anything's
    get_rel_pos does at run time when a table does not fit the grid."""
    return F.interpolate(rel_pos.T[None], size=length, mode="linear")[0].T


def resize_to_model(model: sam_encoder.SamEncoder, sd: dict[str, Tensor]) -> dict[str, Tensor]:
    """Resize pos_embed and the global blocks' rel-pos tables of weights trained at another image size (read from
    the file's pos_embed) to the model's grid. Window blocks' tables span one 14x14 window at any image size."""
    grid = model.cfg.img_size // model.cfg.patch_size
    pos = sd.get("pos_embed")
    if pos is None or pos.dim() != 4 or pos.shape[1] == grid or pos.shape[-1] != model.cfg.embed_dim:
        return sd  # nothing to resize; any other mismatch is reported by check_sam
    trained = pos.shape[1]
    sd = {**sd, "pos_embed": resize_pos_embed(pos, grid)}
    for i in model.cfg.global_attn_indexes:
        for axis in ("h", "w"):
            key = f"blocks.{i}.attn.rel_pos_{axis}"
            if key in sd and sd[key].shape[0] == 2 * trained - 1:
                sd[key] = resize_rel_pos(sd[key].float(), 2 * grid - 1).to(sd[key].dtype)
    return sd


def check_sam(model: sam_encoder.SamEncoder, sd: dict[str, Tensor], where: str) -> None:
    """Raise WeightsError unless sd holds this encoder's size, with exactly its keys and shapes."""
    embed_dim, depth = sam_arch(sd)
    if embed_dim and (embed_dim, depth) != (model.cfg.embed_dim, model.cfg.depth):
        theirs = arch_text(sam_encoder.SAM_PRESETS, "a custom SAM encoder", embed_dim=embed_dim, depth=depth)
        ours = arch_text(sam_encoder.SAM_PRESETS, "a custom SAM encoder", embed_dim=model.cfg.embed_dim,
                         depth=model.cfg.depth)
        raise WeightsError(f"{where} holds {theirs} but the model is {ours}; build the model that matches the "
                           f"weights (build_sam_encoder(name)) or pass the weights of this model size.")
    files.check_keys(model, sd, where, "SAM image encoder", SAM_LAYOUTS)


def load_sam(model: sam_encoder.SamEncoder, path: str) -> None:
    """Load a safetensors file in the official or Hugging Face layout into `model`, strictly: the encoder's keys
    and shapes must match (only the prompt encoder and mask decoder are ignored). Weights trained at another
    image size have pos_embed and the global blocks' rel-pos tables resized to model.cfg.img_size."""
    sd, layout = to_official(read_safetensors(path, "SAM weights", "an official sam_vit_*.pth", SAM_DOWNLOAD))
    sd = resize_to_model(model, sd)
    check_sam(model, sd, f"{path} ({layout})")
    model.load_state_dict(sd, strict=True)


def frozen_sam(name: str, path: str | None, img_size: int = 1024, device="cpu", dtype: torch.dtype = torch.float32,
               **overrides) -> sam_encoder.SamEncoder:
    """The SAM encoder as SSR's teacher: built, loaded from `path` (None keeps the random init; the caller warns),
    in eval mode, frozen, on `device` in `dtype`. Run it under torch.no_grad(): nothing flows back into it."""
    model = sam_encoder.build_sam_encoder(name, img_size, **overrides)
    if path is not None:
        load_sam(model, path)
    return model.eval().requires_grad_(False).to(device, dtype)


def check_weight_flags(method: str, pretrained: str | None, sam_weights: str | None) -> None:
    """train.py's --pretrained and --sam-weights: the ImageNet MiT always (or 'none'), the SAM teacher for --method
    ssr and for it only."""
    if pretrained is None:
        raise files.FlagError(f"--pretrained is required: pass the ImageNet MiT weights ({MIT_DOWNLOAD}; see README) "
                              f"or --pretrained none for a random initialization (tests only: far from the paper's "
                              f"numbers).")
    if method == "ssr" and sam_weights is None:
        raise files.FlagError(f"--method ssr needs the SAM teacher: pass --sam-weights PATH ({SAM_DOWNLOAD}; see "
                              f"README), or --sam-weights none for a random teacher (tests and demo only).")
    if method != "ssr" and sam_weights not in (None, "none"):
        raise files.FlagError(f"--sam-weights is only used by --method ssr, not by --method {method}: drop it.")


def warn_random_weights(method: str, pretrained: str, sam_weights: str | None) -> None:
    """train.py's warning for --pretrained none and, with --method ssr, --sam-weights none: allowed, but far from the
    paper."""
    for chosen, what in ((pretrained == "none", "--pretrained none: the MiT starts from random weights"),
                         (method == "ssr" and sam_weights == "none", "--sam-weights none: the SAM teacher is random")):
        if chosen:  # stacklevel 2: the warning names the line of train.py that called
            warnings.warn(f"{what}; fine for tests, but this run will not reproduce the paper.", stacklevel=2)


def sam_from_checkpoint(sd: dict[str, Tensor], src: str) -> tuple[dict[str, Tensor], str]:
    """A .pth SAM state dict (official or HF layout) -> (the image encoder alone under our names, what it is). The
    prompt encoder and mask decoder are dropped; load_sam checks the rest strictly against the model it loads
    into."""
    sd, layout = to_official(sd)
    embed_dim, depth = sam_arch(sd)
    if not embed_dim or not depth or "pos_embed" not in sd:
        raise WeightsError(f"{src} ({layout}) holds no SAM image encoder: no image_encoder.patch_embed.proj.weight, "
                           f"pos_embed or blocks.* keys (official layout) nor vision_encoder.* keys (Hugging Face). "
                           f"Pass an official sam_vit_b/l/h_*.pth.")
    arch = arch_text(sam_encoder.SAM_PRESETS, "a custom SAM encoder", embed_dim=embed_dim, depth=depth)
    return sd, f"a SAM image encoder, {arch}, {layout}; written alone, for train.py --sam-weights"

# ----------------------------------------------------------------------------------------------------------------
# 4. Released mmseg checkpoints (DAFormer, MIC): torch.save'd dicts whose 'state_dict' holds the student under
# 'model.', the EMA teacher under 'ema_model.' and the frozen ImageNet copy (for the feature distance) under
# 'imnet_model.'. Our segmentor's keys are mmseg's, so the student loads as it is.


def config_from_state_dict(sd: dict[str, Tensor], where: str) -> ssr.SegConfig:
    """SegConfig that a DAFormer state dict describes: MiT size from the backbone's keys and shapes, number of
    classes and head width from the classifier conv_seg (K, channels, 1, 1)."""
    embed_dims, depths = mit_arch({k.removeprefix("backbone."): v for k, v in sd.items() if k.startswith("backbone.")})
    if not embed_dims or "decode_head.conv_seg.weight" not in sd:
        raise WeightsError(f"{where} holds no MiT backbone with a DAFormer head (no backbone.patch_embed1.proj.weight "
                           f"or decode_head.conv_seg.weight); only DAFormer/MIC models with MiT encoders convert.")
    name = preset_of(mit.MIT_PRESETS, embed_dims=embed_dims, depths=depths)
    num_classes, channels = sd["decode_head.conv_seg.weight"].shape[:2]
    return ssr.SegConfig(backbone=name or "mit_b5", mit={} if name else dict(embed_dims=embed_dims, depths=depths),
                         num_classes=num_classes, channels=channels)


def segmentor_from_mmseg(sd: dict, src: str) -> tuple[ssr.Segmentor, str]:
    """An mmseg state dict (DAFormer/MIC's under 'model.', a plain EncoderDecoder's as it is) -> (our segmentor
    holding its student, loaded strictly, and what it is)."""
    # The published numbers are the student's (DACS evaluates `model`); the EMA teacher and the ImageNet copy
    # only exist for training, so they are dropped.
    prefix = "model." if any(k.startswith("model.") for k in sd) else ""
    keep = (prefix + "backbone.", prefix + "decode_head.")
    student = {k[len(prefix):]: v for k, v in sd.items() if k.startswith(keep)}
    bad = sorted(k for k, v in student.items() if not isinstance(v, Tensor))
    if bad:
        raise WeightsError(f"{src}: the weights {', '.join(bad[:3])} are not plain tensors; pass the .pth file of a "
                           f"released DAFormer or MIC model.")
    cfg = config_from_state_dict(student, src)
    model = ssr.build_segmentor(cfg)  # not on the meta device: see checkpoint.load_segmentor
    files.check_keys(model, student, src, f"DAFormer segmentor {cfg}", "Only DAFormer-head models (DAFormer, MIC "
                     "with the DAFormer head) convert; HRDA's multi-resolution head does not.")
    model.load_state_dict(student, strict=True)
    encoder = arch_text(mit.MIT_PRESETS, "a custom MiT", **cfg.mit) if cfg.mit else cfg.backbone
    return model, (f"a DAFormer/MIC segmentor, {encoder}, "
                   f"{cfg.num_classes} classes, head width {cfg.channels}; written as a checkpoint for eval.py --ckpt")

# ----------------------------------------------------------------------------------------------------------------
# 5. The converter: it recognizes what it is given by the keys

ACCEPTS = (f"one of: an NVlabs mit_b*.pth or a Hugging Face pytorch_model.bin of a MiT encoder (Download: "
           f"{MIT_DOWNLOAD}); an official sam_vit_b/l/h_*.pth (Download: {SAM_DOWNLOAD}); the .pth of a released "
           f"DAFormer or MIC model with a MiT encoder (e.g. the GTA5->Cityscapes checkpoint linked from their README)")


def check_output(src: str, dst: str) -> None:
    """Before anything is read or written: dst can be written and is not the input, by any path (checked on the
    file itself: a symlink or a hard link to src is src)."""
    if os.path.isdir(dst):
        raise WeightsError(f"the output {dst} is a folder; name the .safetensors file to write, e.g. "
                           f"{os.path.join(dst, 'OUT.safetensors')}. Nothing was written.")
    folder = os.path.dirname(os.path.abspath(dst))
    if not os.path.isdir(folder):
        raise WeightsError(f"the folder of the output {dst} does not exist; create it first. Nothing was written.")
    try:
        with tempfile.TemporaryFile(dir=folder):
            pass
    except OSError as e:
        raise WeightsError(f"cannot write into {folder}, the folder of the output {dst} ({e.strerror or e}); pass an "
                           f"output in a folder you can write to. Nothing was written.") from None
    if os.path.exists(src) and os.path.exists(dst) and os.path.samefile(src, dst):
        how = "" if os.path.abspath(src) == os.path.abspath(dst) else (
            " through a symlink" if os.path.realpath(src) == os.path.realpath(dst) else " through a hard link")
        raise WeightsError(f"the output {dst} is the input {src}{how}: writing it would destroy the checkpoint being "
                           f"converted. Name a new .safetensors file as the output. Nothing was written.")


def kind_of(sd: object) -> str | None:
    """'mmseg', 'sam' or 'mit' from a state dict's keys, None for anything else."""
    if not isinstance(sd, dict) or not all(isinstance(k, str) for k in sd):
        return None
    if any(k.startswith(("model.backbone.", "backbone.")) for k in sd):
        return "mmseg"
    if any(k.startswith(("image_encoder.", "vision_encoder.")) for k in sd) or "pos_embed" in sd:
        return "sam"
    return "mit" if mit_layout(sd) != "unknown" else None


def convert(src: str, dst: str, source: str | None = None, target: str | None = None) -> tuple[str, set[str]]:
    """Convert the checkpoint `src` to `dst` after recognizing it: a MiT encoder (NVlabs or HF) -> NVlabs-layout
    safetensors; a SAM checkpoint -> the image encoder alone; a released DAFormer/MIC model -> our segmentor
    checkpoint (`source`, 'gta5', 'synthia' or 'cityscapes', recorded for eval.py's report; None records nothing;
    `target`, the dataset it adapted to, recorded with that benchmark's test scale; None: cityscapes). Returns what
    it recognized and wrote, and the non-tensor globals it skipped without running them."""
    check_output(src, dst)
    ckpt, skipped = read_checkpoint(src, ACCEPTS)
    for wrapper in ("model", "state_dict"):  # SAM's training checkpoints, mmcv's (NVlabs, mmseg)
        if isinstance(ckpt, dict) and isinstance(ckpt.get(wrapper), dict):
            ckpt = ckpt[wrapper]
    kind = kind_of(ckpt)
    if kind is None:
        keys = files.few_keys([str(k) for k in ckpt], 4) if isinstance(ckpt, dict) else f"a {type(ckpt).__name__}"
        raise WeightsError(f"{src} holds no SAM image encoder, MiT encoder or DAFormer/MIC segmentor (it holds "
                           f"{keys or 'an empty dict'}), so it does not convert. Pass {ACCEPTS}.")
    for flag, value in (("--src", source), ("--tgt", target)):
        if value is not None and kind != "mmseg":
            raise files.FlagError(f"{flag} {value} is recorded in a converted DAFormer/MIC segmentor, but {src} holds "
                                  f"a {'MiT' if kind == 'mit' else 'SAM'} encoder; leave {flag} out.")
    if kind == "mmseg":
        model, what = segmentor_from_mmseg(ckpt, src)
        target = target or "cityscapes"
        checkpoint.save_segmentor(model, dst, dataset=target, test_scale=list(datasets.TARGETS[target]["scale"]),
                                  converted_from=os.path.basename(src), **({"source": source} if source else {}))
        return what, skipped
    bad = sorted(k for k, v in ckpt.items() if not isinstance(v, Tensor))
    if bad:
        raise WeightsError(f"{src} holds no flat state dict of tensors (nor one under 'model' or 'state_dict'): "
                           f"{files.few_keys(bad)} are not tensors. Pass {ACCEPTS}.")
    sd, what = (mit_from_checkpoint if kind == "mit" else sam_from_checkpoint)(ckpt, src)
    write_tensors(sd, dst)
    return what, skipped


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    c = sub.add_parser("convert", help="convert an official .pth/.bin (MiT, SAM, DAFormer/MIC) to safetensors")
    c.add_argument("input", metavar="IN", help="NVlabs mit_b*.pth, Hugging Face pytorch_model.bin of a MiT, official "
                                               "sam_vit_*.pth, or a released DAFormer/MIC .pth")
    c.add_argument("output", metavar="OUT.safetensors", help="the file to write (a new file, in an existing folder)")
    c.add_argument("--src", choices=list(datasets.SOURCES), help="a DAFormer/MIC model's source dataset, recorded in "
                   "the checkpoint: eval.py reports mIoU16 and mIoU13 for synthia (default: nothing recorded; gta5)")
    c.add_argument("--tgt", choices=list(datasets.TARGETS), help="a DAFormer/MIC model's target dataset, recorded "
                   "with its benchmark's test scale (default cityscapes)")
    args = p.parse_args()
    what, skipped = convert(args.input, args.output, args.src, args.tgt)
    print(f"{args.input}: {what}")
    if skipped:
        print(f"skipped non-tensor objects without running them: {', '.join(sorted(skipped))}")
    print(f"wrote {args.output}")


if __name__ == "__main__":
    try:
        main()
    except files.UserError as e:
        sys.exit(f"error: {e}")
