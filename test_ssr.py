"""The tests of ssr, one section per file. They run on a CPU in a few minutes with tiny models (the real sizes
only where the point is the real size), make their own random weights in the official layouts and their own
small datasets in the original formats, and compare with the reference implementations (transformers,
segment_anything) where those define the right answer."""
import atexit
import collections
import contextlib
import copy
import dataclasses
import errno
import fnmatch
import hashlib
import json
import math
import os
import pathlib
import pickle
import re
import runpy
import shutil
import signal
import struct
import subprocess
import sys
import threading
import time
import zipfile
import zlib

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from safetensors.torch import load_file, save_file

import bench
import checkpoint
import data
import datasets
import demo
import files
import eval as ev
import mit
import pictures
import predict
import processes
import sam_encoder
import ssr
import speed
import study
import suite
import toys
import weights
from files import DatasetError

_ROOT = os.path.dirname(os.path.abspath(__file__))
# The official checkpoints' key names and shapes (../shared/reference/official_keys.json, which a user's clone
# lacks), kept as the SHA-256 of each model's sorted [key, shape] list, so that the strict-loading tests run
# everywhere and still hold every key and shape to the official ones; a few names are written out for the reader.
_OFFICIAL_DIGESTS = {
    "mit_b0": "5cdcb0d9414b16c99b1514e13ca67fc8", "mit_b1": "a1ce14adec4dbbb9dd1e1bc99b5dbd21",
    "mit_b2": "a2c3d3bd5a75c5260cef00a5c685064f", "mit_b3": "7abb7491ee350f4190199d713a98b123",
    "mit_b4": "3d2a4e58ba6d782cf3c0cf5b549c956d", "mit_b5": "655e0e1b60df644b1910a6980643114f",
    "daformer_sepaspp_head": "111dfb711744a88e2a198cee22f4c70f",
}
_OFFICIAL_KEY_COUNTS = {"mit_b0": 176, "mit_b1": 176, "mit_b2": 332, "mit_b3": 572, "mit_b4": 832, "mit_b5": 1052,
                        "daformer_sepaspp_head": 58}


def _key_digest(shapes: dict) -> str:
    """The digest of _OFFICIAL_DIGESTS for {key: shape}."""
    items = sorted((k, list(v)) for k, v in shapes.items())
    return hashlib.sha256(json.dumps(items).encode()).hexdigest()[:32]


def test_key_digests_are_those_of_the_official_key_list():
    """Where the project's shared folder is present, the embedded digests are recomputed from the official list."""
    path = os.path.join(_ROOT, "..", "shared", "reference", "official_keys.json")
    if not os.path.isfile(path):
        pytest.skip(f"{path} is not there: the embedded digests were computed from it")
    with open(path) as f:
        official = {k: v for k, v in json.load(f).items() if not k.startswith("_")}
    assert {k: _key_digest(v) for k, v in official.items()} == _OFFICIAL_DIGESTS
    assert {k: len(v) for k, v in official.items()} == _OFFICIAL_KEY_COUNTS


# One tiny segmentor for every test that needs one: MiT-B0's layout made narrow and one block deep.
_TINY = ssr.SegConfig(backbone="mit_b0", mit=dict(embed_dims=(16, 32, 40, 64), depths=(1, 1, 1, 1)), channels=32)


# ==============================================================================================================
# ssr.py: the segmentor and the DACS / MIC / SSR method
# ==============================================================================================================



def _ssr_tiny_sam():
    sam = sam_encoder.build_sam_encoder("vit_b", img_size=64, embed_dim=32, depth=2, num_heads=2,
                                        global_attn_indexes=(1,), window_size=3)
    return sam.eval().requires_grad_(False)


def _ssr_batch(seed: int = 0):
    """Two 64x64 source images whose label is a few big class blocks (thing classes among them), and targets."""
    g = torch.Generator().manual_seed(seed)
    lbl = torch.tensor([[0, 1, 2, 13], [8, 13, 255, 11]]).view(2, 2, 2)
    lbl = lbl.repeat_interleave(32, 1).repeat_interleave(32, 2)  # (2, 64, 64): four 32x32 blocks per image
    palette = torch.randn(256, 3, generator=g)
    src = palette[lbl].permute(0, 3, 1, 2) + 0.3 * torch.randn(2, 3, 64, 64, generator=g)
    tgt = src.flip(-1) * 0.8 + 0.2 + 0.3 * torch.randn(2, 3, 64, 64, generator=g)  # a shifted domain
    return src, lbl, tgt


# ----------------------------------------------------------------------------------------------------------------
# the segmentor and its checkpoints

def test_ssr_head_and_segmentor_keys_match_official_checkpoints():
    with torch.device("meta"):
        model = ssr.build_segmentor(ssr.SegConfig())
    sd = model.state_dict()
    head = {k: v.shape for k, v in sd.items() if k.startswith("decode_head.")}
    backbone = {k.removeprefix("backbone."): v.shape for k, v in sd.items() if k.startswith("backbone.")}
    assert len(sd) == len(head) + len(backbone)  # a released DAFormer student: backbone.* and decode_head.* only
    assert _key_digest(head) == _OFFICIAL_DIGESTS["daformer_sepaspp_head"] and len(head) == 58
    assert _key_digest(backbone) == _OFFICIAL_DIGESTS["mit_b5"]
    assert head["decode_head.embed_layers.0.proj.weight"] == (256, 64)
    assert head["decode_head.fuse_layer.aspp_modules.1.depthwise_conv.conv.weight"] == (1024, 1, 3, 3)
    assert sum(p.numel() for p in model.decode_head.parameters()) == 3_712_275  # the "3.7M" of the DAFormer paper


def test_ssr_segmentor_gives_quarter_resolution_logits_and_conv_bn_relu():
    torch.manual_seed(0)
    model = ssr.build_segmentor(_TINY).eval()
    assert model(torch.randn(2, 3, 64, 96)).shape == (2, 19, 16, 24)
    aspp = model.decode_head.fuse_layer.aspp_modules
    assert aspp[0].conv.kernel_size == (1, 1) and aspp[0].conv.bias is None
    assert [m.depthwise_conv.conv.dilation for m in aspp[1:]] == [(6, 6), (12, 12), (18, 18)]
    assert isinstance(model.decode_head.dropout, torch.nn.Dropout2d) and model.decode_head.dropout.p == 0.1


def test_ssr_head_normalizes_each_domain_with_its_own_statistics():
    torch.manual_seed(0)
    model = ssr.build_segmentor(_TINY).train()
    model.decode_head.dropout.eval()  # only the BatchNorms train: dropout would draw different channels
    feats = model.backbone(torch.randn(6, 3, 64, 64))
    parts = [model.decode_head([f[i:i + 2] for f in feats]) for i in (0, 2, 4)]  # DAFormer: one call per domain
    torch.testing.assert_close(model.decode_head(feats, 3), torch.cat(parts), atol=1e-5, rtol=1e-5)
    assert not torch.allclose(model.decode_head(feats), torch.cat(parts), atol=1e-2)  # one batch: other statistics


def test_ssr_save_load_round_trip_and_errors(tmp_path):
    torch.manual_seed(0)
    model = ssr.build_segmentor(_TINY)
    model.train()(torch.randn(2, 3, 64, 64))  # move the BatchNorm running statistics away from their init
    path = str(tmp_path / "model.safetensors")
    checkpoint.save_segmentor(model, path, dataset="cityscapes", test_scale=[1024, 512], iters=7)
    assert not os.path.exists(path + ".tmp")
    loaded, meta = checkpoint.load_segmentor(path)
    assert meta == {"cfg": _TINY, "dataset": "cityscapes", "test_scale": [1024, 512], "iters": 7}
    assert not loaded.training
    x = torch.randn(1, 3, 64, 64)
    assert torch.equal(loaded(x), model.eval()(x))

    with pytest.raises(files.WeightsError, match="missing.safetensors"):
        checkpoint.load_segmentor(str(tmp_path / "missing.safetensors"))
    garbage = tmp_path / "garbage.safetensors"
    garbage.write_bytes(b"not a safetensors file at all")
    with pytest.raises(ValueError, match="garbage.safetensors"):
        checkpoint.load_segmentor(str(garbage))
    backbone_only = str(tmp_path / "mit.safetensors")  # e.g. ImageNet MiT weights
    save_file({k: v.contiguous() for k, v in model.backbone.state_dict().items()}, backbone_only)
    with pytest.raises(ValueError, match="mit.safetensors.*not a segmentor"):
        checkpoint.load_segmentor(backbone_only)
    other = ssr.build_segmentor(ssr.SegConfig(**{**vars(_TINY), "num_classes": 5}))
    mixed = str(tmp_path / "mixed.safetensors")  # 5-class tensors under a 19-class configuration
    save_file({k: v.contiguous() for k, v in other.state_dict().items()}, mixed,
              metadata={"format": checkpoint.FORMAT, "cfg": json.dumps(vars(_TINY)), "meta": "{}"})
    with pytest.raises(ValueError, match="mixed.safetensors.*conv_seg"):
        checkpoint.load_segmentor(mixed)


# ----------------------------------------------------------------------------------------------------------------
# the method's pieces

def test_ssr_ema_copies_at_step_zero_then_moves_by_alpha():
    torch.manual_seed(0)
    student, teacher = ssr.build_segmentor(_TINY), ssr.build_segmentor(_TINY)
    buffers = {k: v.clone() for k, v in teacher.named_buffers()}
    ssr.ema_update(teacher, student, 0)
    assert all(torch.equal(a, b) for a, b in zip(teacher.parameters(), student.parameters()))
    for it, alpha in ((1, 0.5), (9, 0.9), (50_000, 0.999)):
        before = [p.clone() for p in teacher.parameters()]
        with torch.no_grad():
            for p in student.parameters():
                p.add_(torch.randn_like(p))
        ssr.ema_update(teacher, student, it)
        for t, b, s in zip(teacher.parameters(), before, student.parameters()):
            torch.testing.assert_close(t, alpha * b + (1 - alpha) * s)
    # parameters only, as DAFormer: BatchNorm buffers are not averaged
    assert all(torch.equal(v, buffers[k]) for k, v in teacher.named_buffers())


def test_ssr_pseudo_label_weight_is_confident_fraction_per_image_and_zero_in_ignored_rows():
    logits = torch.zeros(2, 3, 20, 10)  # uniform: max prob 1/3, not confident
    logits[0, 2, :10] = 10.0  # image 0: top half confidently class 2 -> 50%
    logits[1, 1, :, :3] = 10.0  # image 1: 3 of 10 columns confidently class 1 -> 30%
    label, weight = ssr.pseudo_label(logits, threshold=0.968, ignore_top=2, ignore_bottom=5)
    assert label.shape == weight.shape == (2, 20, 10)
    assert (label[0, :10] == 2).all() and (label[1, :, :3] == 1).all()
    assert (weight[:, :2] == 0).all() and (weight[:, -5:] == 0).all()
    torch.testing.assert_close(weight[0, 2:-5], torch.full((13, 10), 0.5))
    torch.testing.assert_close(weight[1, 2:-5], torch.full((13, 10), 0.3))


def test_ssr_class_mix_pastes_half_of_each_images_own_classes():
    lbl = torch.zeros(2, 8, 8, dtype=torch.long)
    lbl[0, :, 2:4], lbl[0, :, 4:6], lbl[0, :, 6:] = 1, 2, 255  # image 0: classes {0, 1, 2, 255}
    lbl[1, :4], lbl[1, 4:] = 5, 9  # image 1: classes {5, 9}, none shared with image 0
    src, tgt = torch.randn(2, 3, 8, 8), torch.randn(2, 3, 8, 8)
    for seed in range(10):
        torch.manual_seed(seed)
        mask = ssr.class_masks(lbl)
        for x, m in zip(lbl, mask):
            present = set(x.unique().tolist())
            chosen = set(x[m].unique().tolist())
            assert chosen <= present and len(chosen) == (len(present) + 1) // 2  # per image: its own classes
            assert torch.equal(m, torch.isin(x, torch.tensor(sorted(chosen))))  # whole classes, nothing else
        mixed = ssr.class_mix(mask, src, tgt)
        assert torch.equal(mixed, torch.where(mask[:, None].expand_as(src), src, tgt))
        assert torch.equal(ssr.class_mix(mask, lbl, torch.full_like(lbl, 7)), torch.where(mask, lbl, 7))
    # every half of image 0's four classes is drawn about equally often (6 halves; 600 draws, 100 expected each)
    torch.manual_seed(0)
    halves = collections.Counter(tuple(lbl[0][m].unique().tolist()) for m in (ssr.class_masks(lbl)[0]
                                                                              for _ in range(600)))
    assert len(halves) == 6 and all(70 < n < 130 for n in halves.values()), halves


def test_ssr_color_jitter_and_blur_known_answers():
    torch.manual_seed(0)
    x = torch.rand(2, 3, 16, 16)
    out = ssr.color_jitter(x, 0.2)
    assert out.shape == x.shape and out.min() >= 0 and out.max() <= 1 and not torch.allclose(out, x)
    torch.testing.assert_close(ssr.color_jitter(x, 0.0), x, atol=1e-5, rtol=0)  # zero strength: HSV round trip
    red = torch.tensor([1.0, 0.0, 0.0]).view(3, 1, 1).expand(3, 2, 2)
    torch.testing.assert_close(ssr.adjust_hue(red, torch.tensor(2 * math.pi / 3)),  # a third of a turn: green
                               torch.tensor([0.0, 1.0, 0.0]).view(3, 1, 1).expand(3, 2, 2), atol=1e-5, rtol=0)
    torch.testing.assert_close(ssr.adjust_saturation(red, torch.tensor(0.0)), torch.ones(3, 2, 2))  # gray
    assert [ssr.blur_kernel_size(n) for n in (512, 64, 1024, 30)] == [51, 7, 103, 3]
    img = torch.randn(2, 3, 64, 64)
    torch.testing.assert_close(ssr.gaussian_blur(img, torch.tensor([0.05, 0.05])), img)  # tiny sigma: identity
    blurred = ssr.gaussian_blur(img, torch.tensor([1.15, 0.15]))
    assert blurred[0].std() < 0.7 * img[0].std()  # smooths
    flat = torch.full((1, 3, 40, 24), 0.3)
    torch.testing.assert_close(ssr.gaussian_blur(flat, torch.tensor([1.0])), flat)  # kernel sums to 1
    aug = ssr.strong_transform(img, p_jitter=1.0, p_blur=1.0)
    assert aug.shape == img.shape and torch.isfinite(aug).all()


def test_ssr_feature_distance_only_counts_thing_classes():
    f1, f2 = torch.randn(2, 8, 2, 2, requires_grad=True), torch.randn(2, 8, 2, 2)
    stuff = torch.zeros(2, 64, 64, dtype=torch.long)  # road everywhere
    fd = ssr.feature_distance(f1, f2, stuff)
    fd.backward()
    assert fd.item() == 0 and torch.equal(f1.grad, torch.zeros_like(f1))
    things = stuff.clone()
    things[0, :32, :32] = 13  # a car filling block (0, 0) of image 0
    things[1, 32:, :40] = 6  # traffic light: fills block (1, 0), only 25% of block (1, 1) -> below 0.75
    expected = torch.stack([(f1[0, :, 0, 0] - f2[0, :, 0, 0]).norm(), (f1[1, :, 1, 0] - f2[1, :, 1, 0]).norm()]).mean()
    torch.testing.assert_close(ssr.feature_distance(f1, f2, things), expected)
    assert expected > 0


def test_ssr_seg_loss_matches_hand_computation():
    logits = torch.randn(2, 4, 3, 5)
    label = torch.randint(0, 4, (2, 3, 5))
    label[0, 0, :2] = 255
    weight = torch.rand(2, 3, 5)
    logp = logits.log_softmax(1)
    total = sum(-logp[b, label[b, i, j], i, j] * weight[b, i, j]
                for b in range(2) for i in range(3) for j in range(5) if label[b, i, j] != 255)
    torch.testing.assert_close(ssr.seg_loss(logits, label, weight), total / 30)  # mean over ALL 30 pixels
    # logits at 1/4 resolution are upsampled bilinearly to the label
    small = torch.randn(1, 4, 4, 4)
    big = F.interpolate(small, size=(16, 16), mode="bilinear", align_corners=False)
    lbl = torch.randint(0, 4, (1, 16, 16))
    torch.testing.assert_close(ssr.seg_loss(small, lbl), F.cross_entropy(big, lbl))


def test_ssr_mic_mask_drops_whole_blocks():
    torch.manual_seed(0)
    mask = ssr.mic_mask(torch.zeros(4, 3, 512, 512), ratio=0.7, block=32)
    assert mask.shape == (4, 1, 512, 512)
    blocks = mask.view(4, 16, 32, 16, 32)
    assert torch.equal(blocks.amax((2, 4)), blocks.amin((2, 4)))  # constant on each 32x32 block
    assert abs(mask.mean().item() - 0.3) < 0.05


def test_ssr_cross_attention_sdpa_equals_naive_softmax():
    torch.manual_seed(0)
    attn = ssr.CrossAttention(40, num_heads=5)
    x, ctx = torch.randn(2, 12, 40), torch.randn(2, 7, 40)
    q = attn.q(x).view(2, 12, 5, 8).transpose(1, 2)
    k, v = attn.kv(ctx).view(2, 7, 2, 5, 8).permute(2, 0, 3, 1, 4)
    a = (q @ k.transpose(-2, -1) * 8 ** -0.5).softmax(-1)  # (B, heads, 12, 7), as SSR's AttentionCross
    naive = attn.proj((a @ v).transpose(1, 2).reshape(2, 12, 40))
    torch.testing.assert_close(attn(x, ctx), naive)
    assert attn.q.bias is None and attn.kv.bias is None and attn.proj.bias is not None


# ----------------------------------------------------------------------------------------------------------------
# the training step

def test_ssr_teacher_keeps_batchnorm_in_training_mode_and_is_deterministic():
    torch.manual_seed(0)
    uda = ssr.UDA(ssr.build_segmentor(_TINY), method="dacs").train()
    bns = [m for m in uda.ema.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    assert bns and all(m.training for m in bns)
    assert not uda.ema.backbone.training and not uda.ema.decode_head.dropout.training and not uda.imnet.training
    assert uda.student.training and uda.student.decode_head.dropout.training
    assert not any(p.requires_grad for p in [*uda.ema.parameters(), *uda.imnet.parameters()])
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        a, b = uda.ema(x), uda.ema(x)
        c = uda.ema(torch.cat([x[:1], torch.randn(1, 3, 64, 64)]))
    assert torch.equal(a, b)  # no dropout, no drop path
    assert not torch.allclose(a[:1], c[:1])  # BatchNorm normalizes with the batch's statistics, as DAFormer


@pytest.mark.parametrize("method,mic,keys", [
    ("source-only", False, {"src"}),
    ("dacs", False, {"src", "mix", "fd"}),
    ("dacs", True, {"src", "mix", "fd", "mic"}),
    ("ssr", False, {"src", "src_ssr", "mix", "mix_ssr", "fd"}),
    ("ssr", True, {"src", "src_ssr", "mix", "mix_ssr", "fd", "mic"}),
])
def test_ssr_training_steps_lower_the_loss(method, mic, keys):
    torch.manual_seed(0)
    student = ssr.build_segmentor(_TINY)
    uda = ssr.UDA(student, method=method, mic=mic, sam_img_size=64, ignore_rows=(2, 8))
    sam = _ssr_tiny_sam() if method == "ssr" else None
    src, lbl, tgt = _ssr_batch()
    opt = torch.optim.AdamW([p for p in uda.parameters() if p.requires_grad], lr=3e-3)

    def src_loss():  # in training mode (BatchNorm on batch statistics), with the same dropout draws every time
        rng = torch.get_rng_state()
        torch.manual_seed(123)
        with torch.no_grad():
            loss = ssr.seg_loss(student.train()(src), lbl).item()
        torch.set_rng_state(rng)
        return loss

    start = src_loss()
    for it in range(8):
        uda.train()
        losses = uda(src, lbl, tgt, it, sam=sam)
        assert set(losses) == keys and all(v.ndim == 0 and torch.isfinite(v) for v in losses.values())
        opt.zero_grad()
        sum(losses.values()).backward()
        opt.step()
    assert src_loss() < 0.85 * start


def test_ssr_branch_trains_but_is_not_part_of_the_deployed_model():
    torch.manual_seed(0)
    student = ssr.build_segmentor(_TINY)
    uda = ssr.UDA(student, method="ssr", sam_img_size=64, ignore_rows=(2, 8))
    src, lbl, tgt = _ssr_batch()
    losses = uda(src, lbl, tgt, 0, sam=_ssr_tiny_sam())
    (losses["src_ssr"] + losses["mix_ssr"]).backward()
    for name, p in uda.ssr.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name
    assert student.backbone.patch_embed1.proj.weight.grad.abs().sum() > 0  # the branch regularizes the encoder
    names = ("embedding_layer.{}.proj.weight", "embedding_layer.{}.proj.bias", "fusion_layer.{}.q.weight",
             "fusion_layer.{}.kv.weight", "fusion_layer.{}.proj.weight", "fusion_layer.{}.proj.bias")  # SSR's keys
    assert sorted(uda.ssr.state_dict()) == sorted(n.format(i) for i in range(4) for n in names)
    # deployed: exactly the DAFormer segmentor; the UDA state (for resuming) holds no SAM tensor
    assert all(k.startswith(("backbone.", "decode_head.")) for k in student.state_dict())
    plain = ssr.build_segmentor(_TINY)
    assert sum(p.numel() for p in student.parameters()) == sum(p.numel() for p in plain.parameters())
    assert {k.split(".")[0] for k in uda.state_dict()} == {"student", "ema", "imnet", "ssr"}
    # only configured stages get modules
    one = ssr.UDA(ssr.build_segmentor(_TINY), method="ssr", ssr_stages=(2,), sam_img_size=64)
    assert set(one.ssr.embedding_layer) == set(one.ssr.fusion_layer) == {"2"}
    with pytest.raises(ValueError, match="SAM"):
        uda(src, lbl, tgt, 1)
    with pytest.raises(ValueError, match="mic"):
        ssr.UDA(ssr.build_segmentor(_TINY), method="source-only", mic=True)


def test_ssr_context_ablations_give_another_images_tokens_or_zeros():
    """--ssr-context: 'shuffled' gives each image the tokens of another image of its own domain (source images get
    source tokens, mixed images mixed ones), 'zeros' an empty context without running SAM, 'sam' the image's own."""
    tokens = torch.arange(4.0)[:, None, None, None].expand(4, 256, 2, 2)  # image i's tokens are all i: [s0 s1 m0 m1]
    assert torch.equal(ssr.ssr_context(tokens, "sam"), tokens)
    shuffled = ssr.ssr_context(tokens, "shuffled")[:, 0, 0, 0].tolist()
    assert shuffled == [1.0, 0.0, 3.0, 2.0]  # a permutation within each domain that moves every image
    assert torch.equal(ssr.ssr_context(tokens, "zeros"), torch.zeros_like(tokens))
    with pytest.raises(ValueError, match="2 images per domain"):
        ssr.ssr_context(tokens[[0, 2]], "shuffled")
    torch.manual_seed(0)
    src, lbl, tgt = _ssr_batch()
    seen = []
    sam = _ssr_tiny_sam()
    sam.register_forward_hook(lambda m, i, o: seen.append(o))
    for mode in ssr.CONTEXTS:
        uda = ssr.UDA(ssr.build_segmentor(_TINY), method="ssr", sam_img_size=64, ignore_rows=(2, 8), ssr_context=mode)
        seen.clear()
        got = []
        uda.ssr.register_forward_pre_hook(lambda m, args: got.append(args[1]))
        uda(src, lbl, tgt, 0, sam=None if mode == "zeros" else sam)  # the zero context needs no SAM
        if mode == "zeros":
            assert not seen and torch.equal(got[0], torch.zeros(4, 256, 4, 4))
        else:
            assert torch.equal(got[0], ssr.ssr_context(seen[0], mode))


def test_train_records_the_ssr_context_in_the_checkpoint(_train_root, tmp_path, monkeypatch):
    out = tmp_path / "run"
    assert _train_inprocess(monkeypatch, *_train_tiny(_train_root, out, "--iters", "1", "--ssr-context", "shuffled")) == ""
    assert checkpoint.load_segmentor(str(out / "model.safetensors"))[1]["ssr_context"] == "shuffled"
    assert json.load(open(out / "config.json"))["ssr_context"] == "shuffled"
    msg = _train_inprocess(monkeypatch, "--resume", "--out", str(out), "--iters", "2", "--ssr-context", "zeros")
    assert "--ssr-context zeros (saved: shuffled)" in msg, msg
    msg = _train_inprocess(monkeypatch, *_train_tiny(_train_root, tmp_path / "b1", "--batch-size", "1",
                                                     "--ssr-context", "shuffled"))
    assert msg.startswith("error: --ssr-context shuffled") and "--batch-size 2" in msg, msg


def test_ssr_one_encoder_pass_over_the_domains_equals_separate_passes():
    # UDA runs the student's MiT once over source, mixed and MIC's masked images: MiT has no BatchNorm, so the
    # features (and so the gradients) of each group are those of its own pass
    torch.manual_seed(0)
    backbone = ssr.build_segmentor(_TINY).backbone.eval()  # eval: no drop path, whose draws are per image
    groups = [torch.randn(2, 3, 64, 64) for _ in range(3)]
    together = backbone(torch.cat(groups))
    for i, x in enumerate(groups):
        for f_all, f_one in zip(together, backbone(x)):
            torch.testing.assert_close(f_all.chunk(3)[i], f_one, rtol=1e-5, atol=1e-5)


def test_ssr_mic_learns_the_teachers_confident_labels_on_masked_targets():
    torch.manual_seed(0)
    src, lbl, tgt = _ssr_batch()
    for rows, confident in (((2, 8), True), ((32, 32), False)):  # the second ignores every target row
        uda = ssr.UDA(ssr.build_segmentor(_TINY), method="dacs", mic=True, ignore_rows=rows)
        ssr.ema_update(uda.ema, uda.student, 0)
        with torch.no_grad():
            uda.ema.decode_head.conv_seg.bias[3] = 100.0  # at it=1 (alpha 0.5) still ~50: a confident class 3
        mic = uda(src, lbl, tgt, 1)["mic"]
        # an untrained student gives class 3 a probability near 1/19: CE ~ ln 19 on the weighted pixels
        assert (mic > 0.5 * math.log(19)) if confident else (mic == 0)


# ==============================================================================================================
# speed.py: the speed levers, each computing what the method computes
# ==============================================================================================================


def test_speed_compiled_networks_train_like_eager():
    """compile_blocks (train.py --compile) keeps parameter names, losses and gradients, on the GPU's path: bf16
    autocast, the SAM teacher in bf16. Every graph compiles in the first step, none later. The aot_eager backend traces the autograd
    graphs as inductor does, without inductor's C++ build (minutes on 2 cores); by hand, with inductor on this
    CPU (fp32), the losses equalled eager ones to 4 decimals over 6 steps."""
    def run(compiled: bool):
        torch.manual_seed(0)
        uda = ssr.UDA(ssr.build_segmentor(_TINY), method="ssr", mic=True, sam_img_size=64, ignore_rows=(2, 8))
        sam = _ssr_tiny_sam().to(torch.bfloat16)
        if compiled:
            for net in (uda.student, uda.ema, uda.imnet, uda.ssr, sam):
                speed.compile_blocks(net, backend="aot_eager")
        opt = torch.optim.AdamW([p for p in uda.parameters() if p.requires_grad], lr=3e-3)
        src, lbl, tgt = _ssr_batch()
        history = []
        for it in range(3):
            with torch.autocast("cpu", dtype=torch.bfloat16):
                losses = uda(src, lbl, tgt, it, sam=sam)
            sum(losses.values()).backward()
            history.append((torch.stack(list(losses.values())).detach(),
                            {n: p.grad.clone() for n, p in uda.named_parameters() if p.grad is not None}))
            opt.step()
            opt.zero_grad()
            per_step.append(dict(torch._dynamo.utils.counters["frames"]))
        return uda, history

    per_step = []
    eager, expected = run(False)
    torch._dynamo.utils.counters.clear()
    per_step.clear()
    compiled, got = run(True)
    assert per_step[0]["total"] > 0 and per_step[1] == per_step[2] == per_step[0], per_step  # none after step 0
    with torch.no_grad():  # train.py's evaluation in fp32: the student at another size, more graphs of the blocks
        x = torch.randn(1, 3, 64, 128)
        out = compiled.student.eval()(x)
        assert out.shape == (1, _TINY.num_classes, 16, 32)
        torch.testing.assert_close(out, eager.student.eval()(x), atol=1e-3, rtol=1e-3)  # trained alike (see below)
    frames = torch._dynamo.utils.counters["frames"]  # a function past dynamo's recompile limit would run eager
    assert frames["total"] == frames["ok"] > 0, dict(frames)
    assert list(compiled.state_dict()) == list(eager.state_dict())  # checkpoints keep the official names
    # Step 0: the same losses and gradients (in fp32, aot_eager's decomposed backward ops would round apart), but
    # for the head, which runs twice (the plain and the SAM-enhanced features) and its fusion layer once per
    # domain: eager autocast sums the uses' weight gradients in bf16 through one cached cast, the compiled head
    # casts in each graph and sums in fp32, one bf16 rounding apart. AdamW turns such roundings of tiny gradients
    # into whole steps, so later steps are only close.
    (loss, grads), (expected_loss, expected_grads) = got[0], expected[0]
    torch.testing.assert_close(loss, expected_loss)
    assert grads.keys() == expected_grads.keys()
    assert expected_grads["student.backbone.patch_embed1.proj.weight"].abs().sum() > 0  # the first layer learns
    for name, g in grads.items():
        if ".decode_head." in name:
            assert (g - expected_grads[name]).norm() <= 1e-2 * expected_grads[name].norm(), name
        else:
            torch.testing.assert_close(g, expected_grads[name], msg=name)
    torch.testing.assert_close([loss for loss, _ in got[1:]], [loss for loss, _ in expected[1:]], atol=1e-4, rtol=1e-3)
    for net in (compiled.student, compiled.ema, compiled.imnet):
        blocks = [m for m in net.modules() if isinstance(m, mit.Block)]  # compiled block by block
        assert blocks and all(b._compiled_call_impl is not None for b in blocks)
    assert compiled.student.decode_head._compiled_call_impl is not None and compiled.ssr._compiled_call_impl
    assert not any(m._compiled_call_impl for m in eager.modules())


def test_speed_frozen_weights_cast_once_train_bit_identical():
    """cast_frozen_weights (train.py in bf16 or fp16) stores the ImageNet copy's Linear and Conv2d weights in bf16:
    the same losses and gradients, bit for bit, as autocast casting them in every forward, one op fewer a tensor."""
    def run(cast: bool):
        torch.manual_seed(0)
        uda = ssr.UDA(ssr.build_segmentor(_TINY), method="dacs", ignore_rows=(2, 8))
        if cast:
            speed.cast_frozen_weights(uda.imnet, torch.bfloat16)
        opt = torch.optim.AdamW([p for p in uda.parameters() if p.requires_grad], lr=3e-3)
        src, lbl, tgt = _ssr_batch()
        history = []
        for it in range(2):  # at step 0 the student is the ImageNet copy (FD 0); at step 1 it has moved away
            with torch.autocast("cpu", dtype=torch.bfloat16):
                losses = uda(src, lbl, tgt, it)
            sum(losses.values()).backward()
            history.append((losses["fd"].item(), torch.stack(list(losses.values())).detach(),
                            {n: p.grad.clone() for n, p in uda.named_parameters() if p.grad is not None}))
            opt.step()
            opt.zero_grad()
        with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
            ops = int(bench.count_ops(lambda: uda.imnet(src), {"ImageNet copy": uda.imnet}).split()[0])
        return uda, history, ops

    eager, expected, eager_ops = run(False)
    cast, got, cast_ops = run(True)
    assert got[1][0] > 0  # the feature distance, which the ImageNet copy's features enter, is at work
    for (_, loss, grads), (_, expected_loss, expected_grads) in zip(got, expected):
        assert torch.equal(loss, expected_loss)
        assert grads.keys() == expected_grads.keys()
        assert all(torch.equal(g, expected_grads[n]) for n, g in grads.items())
    low = {n for n, p in cast.imnet.named_parameters() if p.dtype == torch.bfloat16}
    layers = [m for m in cast.imnet.modules() if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d))]
    assert len(low) == sum(len(list(m.parameters())) for m in layers) == eager_ops - cast_ops > 0
    assert all(".norm" in n or n.startswith("norm") for n, p in cast.imnet.named_parameters() if n not in low)
    assert all(p.dtype == torch.float32 for p in [*cast.student.parameters(), *cast.ema.parameters()])
    speed.cast_frozen_weights(eager.imnet, None)  # fp32 training: nothing to cast
    assert all(p.dtype == torch.float32 for p in eager.imnet.parameters())


@pytest.mark.filterwarnings("ignore:CUDA is not available")  # graph_frozen's autocast to cuda, here a no-op
def test_speed_graph_frozen_networks_capture_what_uda_forward_runs(monkeypatch):
    """graph_frozen_networks (train.py --cuda-graphs) on the CPU, the capture (cuda_graph) stood in for by a fake
    that runs the network as it does (3 warm-up passes, and the capture, which on a GPU launches nothing) and
    whose replay runs it again on the input buffer. Every call of UDA.forward has the captured shape and dtype
    (graph_frozen raises otherwise); the losses equal those of eager networks, and the BatchNorm statistics are
    those of the real passes only."""
    captured = []

    def cuda_graph(fn, x):
        for _ in range(4):
            fn(x)
        captured.append(type(fn).__name__)
        forward = fn.forward  # the network's own, which graph_frozen then replaces with the replay
        return lambda: forward(x)

    monkeypatch.setattr(speed, "cuda_graph", cuda_graph)

    def run(graphed: bool):
        torch.manual_seed(0)
        uda = ssr.UDA(ssr.build_segmentor(_TINY), method="ssr", mic=True, sam_img_size=64, ignore_rows=(2, 8))
        sam = _ssr_tiny_sam().to(torch.bfloat16)  # SAM in the training dtype, its input cast to it
        if graphed:
            speed.graph_frozen_networks(uda, sam, 2, 64, torch.bfloat16)
        torch.manual_seed(1)  # as train.py, which seeds the loop's streams after the capture
        src, lbl, tgt = _ssr_batch()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            losses = [torch.stack(list(uda(src, lbl, tgt, it, sam=sam).values())).detach() for it in range(2)]
        return uda, sam, losses

    eager, _, expected = run(False)
    graphed, sam, got = run(True)
    assert captured == ["Segmentor", "MixVisionTransformer", "SamEncoder"], captured
    assert all(torch.equal(a, b) for a, b in zip(got, expected))
    means = [m.running_mean for m in eager.ema.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    assert means and all(m.abs().sum() > 0 for m in means)  # the teacher's passes moved them from 0
    assert all(torch.equal(a, b) for a, b in zip(graphed.buffers(), eager.buffers()))
    with pytest.raises(ValueError, match=r"SamEncoder was captured as a CUDA graph on \(4, 3, 64, 64\) "
                                         r"torch.bfloat16 and called on \(2, 3, 64, 64\) torch.bfloat16"):
        sam(torch.zeros(2, 3, 64, 64, dtype=torch.bfloat16))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs run on a GPU only")
def test_speed_cuda_graphed_frozen_networks_replay_like_eager():
    """graph_frozen (train.py --cuda-graphs): each call replays on its new input and on the weights as they are
    then (the EMA update changes them in place); the capture's warm-up leaves the BatchNorm statistics as they were,
    and the replays move them as eager passes do."""
    torch.manual_seed(0)
    uda = ssr.UDA(ssr.build_segmentor(_TINY), method="ssr", sam_img_size=64, ignore_rows=(2, 8)).cuda()
    twin, sam = copy.deepcopy(uda), _ssr_tiny_sam().to(device="cuda", dtype=torch.bfloat16)
    sam_twin = copy.deepcopy(sam)
    speed.graph_frozen(uda.ema, torch.randn(2, 3, 64, 64, device="cuda"), torch.bfloat16)
    speed.graph_frozen(uda.imnet, torch.randn(2, 3, 64, 64, device="cuda"), torch.bfloat16)
    speed.graph_frozen(sam, torch.randn(4, 3, 64, 64, device="cuda", dtype=torch.bfloat16), torch.bfloat16)
    assert "forward" in vars(uda.ema) and "forward" in vars(sam)  # replays, not the modules' own forward
    assert all(torch.equal(a, b) for a, b in zip(uda.buffers(), twin.buffers()))
    for _ in range(3):
        x = torch.randn(2, 3, 64, 64, device="cuda")
        with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16):
            pairs = [(uda.ema(x), twin.ema(x)), *zip(uda.imnet(x), twin.imnet(x))]
            pairs.append((sam(torch.cat([x, x]).bfloat16()), sam_twin(torch.cat([x, x]).bfloat16())))
            for got, expected in pairs:
                torch.testing.assert_close(got, expected)
            noise = [0.01 * torch.randn_like(p) for p in uda.ema.parameters()]  # an EMA update, in place
            torch._foreach_add_(list(uda.ema.parameters()), noise)
            torch._foreach_add_(list(twin.ema.parameters()), noise)
    torch.testing.assert_close(list(uda.ema.buffers()), list(twin.ema.buffers()))


# ==============================================================================================================
# mit.py: the MiT encoders
# ==============================================================================================================

_MIT_TINY = dict(embed_dims=(16, 32, 40, 64), depths=(2, 1, 1, 2))  # heads stay (1, 2, 5, 8)


def _mit_hf_model(classifier: bool = False):
    """A tiny transformers SegFormer with every tensor random (the default init leaves norms at 1/0, biases at 0,
    which would hide swapped or dropped tensors)."""
    from transformers import SegformerConfig, SegformerForImageClassification, SegformerModel

    cfg = SegformerConfig(hidden_sizes=list(_MIT_TINY["embed_dims"]), depths=list(_MIT_TINY["depths"]),
                          num_attention_heads=[1, 2, 5, 8], sr_ratios=[8, 4, 2, 1], num_labels=7)
    torch.manual_seed(0)
    model = (SegformerForImageClassification if classifier else SegformerModel)(cfg).eval()
    bench.randomize_(model)
    return bench.official_eps_(model)  # NVlabs' LayerNorm eps, so the comparison is tight


def _mit_hf_stages(model, x: torch.Tensor) -> list[torch.Tensor]:
    base = getattr(model, "segformer", model)
    with torch.no_grad():
        return list(base(x, output_hidden_states=True).hidden_states)


def _mit_assert_parity(ref: list[torch.Tensor], path: str, x: torch.Tensor) -> None:
    ours = mit.build_mit("mit_b0", **_MIT_TINY).eval()
    weights.load_mit(ours, path)
    with torch.no_grad():
        out = ours(x)
    assert len(out) == len(ref) == 4
    for o, r in zip(out, ref):
        assert o.shape == r.shape
        assert (o - r).abs().max().item() < 1e-4


@pytest.mark.parametrize("classifier", [False, True], ids=["SegformerModel", "segformer-prefix+classifier"])
def test_mit_parity_hf_layout_and_nvlabs_layout(tmp_path, classifier):
    hf = _mit_hf_model(classifier)
    hf.save_pretrained(tmp_path / "hf")
    hf_file = str(tmp_path / "hf" / "model.safetensors")
    keys = load_file(hf_file)
    assert any(k.startswith("segformer.encoder.") for k in keys) == classifier
    assert any(k.startswith("classifier.") for k in keys) == classifier
    torch.manual_seed(1)
    x = torch.randn(2, 3, 64, 96)
    ref = _mit_hf_stages(hf, x)
    assert ref[0].abs().mean() > 0.1  # the reference computes something non-trivial

    _mit_assert_parity(ref, hf_file, x)  # HF layout, read directly
    torch.save(keys, tmp_path / "pytorch_model.bin")  # the hub's .bin is this flat HF state dict
    nv_file = str(tmp_path / "nvlabs.safetensors")
    weights.convert(str(tmp_path / "pytorch_model.bin"), nv_file)
    assert all(k.startswith(("patch_embed", "block", "norm")) for k in load_file(nv_file))
    _mit_assert_parity(ref, nv_file, x)  # NVlabs layout


def test_mit_keys_and_shapes_match_official_checkpoints():
    for name in mit.MIT_PRESETS:
        with torch.device("meta"):
            model = mit.build_mit(name)
        shapes = {k: v.shape for k, v in model.state_dict().items()}
        assert len(shapes) == _OFFICIAL_KEY_COUNTS[name] and _key_digest(shapes) == _OFFICIAL_DIGESTS[name], name
    assert shapes["block1.0.attn.kv.weight"] == (128, 64) and shapes["block3.39.mlp.dwconv.dwconv.weight"] == (
        1280, 1, 3, 3)  # two of mit_b5's official keys, the last preset
    assert sum(p.numel() for p in model.parameters()) == 81_443_008


def test_mit_drop_path_schedule_is_linear_over_all_blocks():
    with torch.device("meta"):
        model = mit.build_mit("mit_b5")
    rates = [b.drop_path for i in range(1, 5) for b in getattr(model, f"block{i}")]
    assert len(rates) == 52 and rates[0] == 0.0 and rates[-1] == pytest.approx(0.1)
    assert rates[1] == pytest.approx(0.1 / 51)


def _mit_tiny_nvlabs_file(tmp_path, name="mit_b0", **overrides) -> str:
    torch.manual_seed(0)
    path = str(tmp_path / f"{name}.safetensors")
    save_file(mit.build_mit(name, **overrides).state_dict(), path)
    return path


def test_mit_wrong_size_nonsafetensors_and_missing_file_errors(tmp_path):
    with torch.device("meta"):
        b5 = mit.build_mit("mit_b5")
    with pytest.raises(ValueError, match=r"mit_b0.*but the model is mit_b5"):
        weights.load_mit(b5, _mit_tiny_nvlabs_file(tmp_path, "mit_b0"))

    tiny = mit.build_mit("mit_b0", **_MIT_TINY)
    pth = tmp_path / "mit_b0.pth"
    torch.save(tiny.state_dict(), pth)
    with pytest.raises(ValueError, match=r"mit_b0\.pth is not a safetensors file.*python weights.py convert"):
        weights.load_mit(tiny, str(pth))
    with pytest.raises(files.WeightsError, match=r"nope\.safetensors does not exist.*Download: mit_b5.pth.*"
                                                 r"github.com/NVlabs/SegFormer.*huggingface.co/nvidia/mit-b5"):
        weights.load_mit(tiny, str(tmp_path / "nope.safetensors"))

    sd = tiny.state_dict()
    sd.pop("block1.0.attn.kv.weight")
    sd["block1.0.attn.qkv.weight"] = torch.zeros(3)
    sd["norm4.weight"] = torch.zeros(3)
    bad = str(tmp_path / "bad.safetensors")
    save_file(sd, bad)
    with pytest.raises(ValueError) as e:
        weights.load_mit(tiny, bad)
    msg = str(e.value)
    assert "bad.safetensors (nvlabs layout)" in msg
    assert "1 missing keys (block1.0.attn.kv.weight)" in msg
    assert "1 unexpected keys (block1.0.attn.qkv.weight)" in msg
    assert "norm4.weight (3,) vs model (64,)" in msg


def test_mit_convert_cli_nvlabs_pth_and_bad_input(tmp_path, monkeypatch):
    tiny = mit.build_mit("mit_b0", **_MIT_TINY).eval()
    sd = tiny.state_dict()
    # NVlabs .pth as mmcv saves it: wrapped under state_dict, with the ImageNet classifier that we drop
    wrapped = {"state_dict": {**sd, "head.weight": torch.randn(1000, 64), "head.bias": torch.randn(1000)}}
    torch.save(wrapped, tmp_path / "mit_tiny.pth")
    out = tmp_path / "mit_tiny.safetensors"
    run = subprocess.run([sys.executable, "weights.py", "convert", str(tmp_path / "mit_tiny.pth"), str(out)],
                         cwd=_ROOT, capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
    assert "a MiT encoder, a custom MiT (embed_dims=(16, 32, 40, 64), depths=(2, 1, 1, 2)), nvlabs layout" in run.stdout
    assert run.stdout.strip().endswith(f"wrote {out}")
    assert load_file(out).keys() == sd.keys()
    other = mit.build_mit("mit_b0", **_MIT_TINY)
    weights.load_mit(other, str(out))
    assert all(torch.equal(a, b) for a, b in zip(other.state_dict().values(), sd.values()))

    junk = tmp_path / "junk.pth"
    junk.write_text("not a checkpoint")
    # the CLI's __main__ in-process (a second interpreter would cost seconds): sys.exit(str) prints the string
    # alone to stderr and exits with status 1, so no traceback reaches the user
    monkeypatch.setattr(sys, "argv", ["weights.py", "convert", str(junk), str(tmp_path / "o.safetensors")])
    with pytest.raises(SystemExit) as e:
        runpy.run_path(os.path.join(_ROOT, "weights.py"), run_name="__main__")
    assert isinstance(e.value.code, str)
    assert e.value.code.startswith("error: ") and "junk.pth could not be read by torch.load" in e.value.code
    assert "\n" not in e.value.code  # one paragraph
    assert not (tmp_path / "o.safetensors").exists()
    with pytest.raises(files.WeightsError, match="missing.pth does not exist"):  # same path as the CLI, in-process
        weights.convert(str(tmp_path / "missing.pth"), str(tmp_path / "o.safetensors"))


def test_convert_never_destroys_its_input(tmp_path, monkeypatch):
    tiny = mit.build_mit("mit_b0", **_MIT_TINY)
    src = tmp_path / "mit_tiny.pth"
    torch.save(tiny.state_dict(), src)
    before = src.read_bytes()
    (tmp_path / "link.pth").symlink_to(src)
    os.link(src, tmp_path / "hard.pth")
    (tmp_path / "out").mkdir()
    monkeypatch.chdir(tmp_path)
    # the output is the input by any path, a folder, or in a missing folder: refused before anything is written
    for dst, pattern in ((str(src), r"output .*mit_tiny.pth is the input mit_tiny.pth: writing it would destroy"),
                         ("./mit_tiny.pth", r"is the input mit_tiny.pth: writing"),
                         ("link.pth", "is the input mit_tiny.pth through a symlink"),
                         ("hard.pth", "is the input mit_tiny.pth through a hard link"),
                         ("out", r"the output out is a folder; name the .safetensors file to write, e.g. out.OUT"),
                         ("nope/o.safetensors", "the folder of the output nope/o.safetensors does not exist; create")):
        with pytest.raises(files.WeightsError, match=pattern) as e:
            weights.convert("mit_tiny.pth", dst)
        assert str(e.value).endswith("Nothing was written.") and "\n" not in str(e.value)
    with pytest.raises(files.FlagError, match="--src synthia is recorded in a converted DAFormer/MIC segmentor, but "
                                              "mit_tiny.pth holds a MiT encoder; leave --src out"):
        weights.convert("mit_tiny.pth", "o.safetensors", source="synthia")
    with monkeypatch.context() as m:  # a folder this user cannot write to (the tests may run as root)
        m.setattr(weights.tempfile, "TemporaryFile", lambda dir: (_ for _ in ()).throw(PermissionError(13, "Denied")))
        with pytest.raises(files.WeightsError, match=r"cannot write into .*, the folder of the output o.safetensors "
                                                     r"\(Denied\); pass an output in a folder you can write to"):
            weights.convert("mit_tiny.pth", "o.safetensors")
    assert src.read_bytes() == before
    assert sorted(os.listdir(tmp_path)) == ["hard.pth", "link.pth", "mit_tiny.pth", "out"] and not os.listdir("out")


def test_mit_grad_checkpoint_same_outputs_and_grads():
    torch.manual_seed(0)
    model = mit.build_mit("mit_b0", **_MIT_TINY).train()
    x = torch.randn(2, 3, 64, 64)

    def run(ckpt: bool):
        model.grad_checkpoint = ckpt
        model.zero_grad()
        torch.manual_seed(1)  # same stochastic-depth draws in both runs
        outs = model(x)
        sum((o * o).mean() for o in outs).backward()
        return [o.detach() for o in outs], [p.grad.clone() for p in model.parameters()]

    (o1, g1), (o2, g2) = run(False), run(True)
    assert all(torch.allclose(a, b, atol=1e-6) for a, b in zip(o1, o2))
    assert all(torch.allclose(a, b, atol=1e-6) for a, b in zip(g1, g2))


def test_mit_drop_path_drops_whole_samples_in_training_only():
    torch.manual_seed(0)
    branch = torch.ones(64, 3, 2)
    per_sample = mit.drop_path(branch, 0.5, training=True).flatten(1)
    assert ((per_sample == 0).all(1) | (per_sample == 2).all(1)).all()  # dropped, or kept and scaled by 1/(1-p)
    assert 10 < (per_sample[:, 0] == 0).sum() < 54
    assert torch.equal(mit.drop_path(branch, 0.5, training=False), branch)  # eval: the branch as it is
    assert torch.equal(mit.drop_path(branch, 0.0, training=True), branch)  # rate 0 keeps every sample unscaled
    model = mit.build_mit("mit_b0", **_MIT_TINY).eval()  # eval: no stochastic depth, the same output twice
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        assert all(torch.equal(a, b) for a, b in zip(model(x), model(x)))


# ==============================================================================================================
# sam_encoder.py: the SAM image encoder
# ==============================================================================================================

_SAM_TINY = dict(embed_dim=32, depth=3, num_heads=2, global_attn_indexes=(1,))  # head dim 16


def _sam_reference(img_size: int, embed_dim: int, depth: int, num_heads: int, global_attn_indexes, window_size=14):
    """The official encoder as sam_model_registry builds it, with every tensor random (LayerNorms, rel-pos tables
    and pos_embed included: their defaults of 1/0 would hide a misplaced or transposed weight)."""
    cfg = sam_encoder.SamConfig(img_size=img_size, embed_dim=embed_dim, depth=depth, num_heads=num_heads,
                                global_attn_indexes=global_attn_indexes, window_size=window_size)
    torch.manual_seed(0)
    ref = bench.official_sam_encoder(cfg)
    bench.randomize_(ref)
    return ref.eval()


def _sam_save_official(ref: torch.nn.Module, path) -> None:
    """Official sam_vit_*.pth layout: the encoder under image_encoder., plus the parts load_weights must skip."""
    sd = {f"image_encoder.{k}": v.contiguous() for k, v in ref.state_dict().items()}
    sd["prompt_encoder.pe_layer.positional_encoding_gaussian_matrix"] = torch.randn(2, 128)
    sd["mask_decoder.iou_token.weight"] = torch.randn(1, 256)
    save_file(sd, str(path))


def test_sam_parity_with_segment_anything(tmp_path):
    # 256 px: a 16x16 grid that pads to 28x28 for 14x14 windows, and global blocks on a grid smaller than 64
    ref = _sam_reference(256, **_SAM_TINY)
    _sam_save_official(ref, tmp_path / "sam.safetensors")
    ours = sam_encoder.build_sam_encoder("vit_b", 256, **_SAM_TINY).eval()
    weights.load_sam(ours, str(tmp_path / "sam.safetensors"))
    x = torch.randn(2, 3, 256, 256)
    with torch.no_grad():
        expected, got = ref(x), ours(x)
    assert got.shape == (2, 256, 16, 16)
    assert (got - expected).abs().max() < 1e-4


def test_sam_parity_with_transformers(tmp_path):
    from transformers import SamConfig, SamModel, SamVisionConfig

    vision = SamVisionConfig(hidden_size=32, num_hidden_layers=3, num_attention_heads=2, mlp_dim=128,
                             image_size=256, window_size=14, global_attn_indexes=[1])
    torch.manual_seed(0)
    hf = SamModel(SamConfig(vision_config=vision.to_dict())).eval()
    bench.randomize_(hf.vision_encoder)
    hf.save_pretrained(tmp_path)  # model.safetensors, as facebook/sam-vit-* on the hub
    ours = sam_encoder.build_sam_encoder("vit_b", 256, **_SAM_TINY).eval()
    weights.load_sam(ours, str(tmp_path / "model.safetensors"))
    x = torch.randn(2, 3, 256, 256)
    with torch.no_grad():
        expected, got = hf.vision_encoder(x).last_hidden_state, ours(x)
    assert (got - expected).abs().max() < 1e-4


def test_sam_vit_b_parameter_count():
    with torch.device("meta"):  # shapes only, nothing allocated
        model = sam_encoder.build_sam_encoder("vit_b", 1024)
    assert sum(p.numel() for p in model.parameters()) == 89_670_912


def test_sam_rel_pos_table_equals_segment_anythings_gather():
    official = bench.official_sam_modeling().image_encoder.get_rel_pos
    torch.manual_seed(0)
    for size in (1, 3, 14):
        table = torch.randn(2 * size - 1, 8)
        assert torch.equal(sam_encoder.get_rel_pos(size, table), official(size, size, table))


def test_sam_window_partition_round_trip():
    x = torch.randn(2, 16, 16, 5)
    windows = sam_encoder.window_partition(x, 14)
    assert windows.shape == (2 * 4, 14 * 14, 5)  # 16 pads to 28: 2x2 windows per image
    assert windows[1].view(14, 14, 5)[:, 2:].abs().sum() == 0  # window (0, 1) holds columns 14..15, then padding
    assert torch.equal(sam_encoder.window_unpartition(windows, 14, 16, 16), x)


def test_sam_load_1024_weights_into_smaller_encoder(tmp_path):
    # Tiny width, but the tables of a 1024 px model: pos_embed (1, 64, 64, C), global rel-pos (127, head_dim).
    ref_1024 = sam_encoder.build_sam_encoder("vit_b", 1024, **_SAM_TINY)
    bench.randomize_(ref_1024)
    save_file({f"image_encoder.{k}": v for k, v in ref_1024.state_dict().items()}, str(tmp_path / "w.safetensors"))
    for size in (512, 256):
        ours = sam_encoder.build_sam_encoder("vit_b", size, **_SAM_TINY).eval()
        weights.load_sam(ours, str(tmp_path / "w.safetensors"))
        assert ours.pos_embed.shape == (1, size // 16, size // 16, 32)
        with torch.no_grad():
            out = ours(torch.randn(1, 3, size, size))
        assert out.shape == (1, 256, size // 16, size // 16) and torch.isfinite(out).all()

    # The rel-pos tables are resized exactly as segment_anything interpolates a misfit table at run time: the
    # reference at 256 px, handed the 127-long 1024 px tables, computes what we compute from our resized ones.
    ref = _sam_reference(256, **_SAM_TINY)
    ref.load_state_dict({k: v for k, v in ours.state_dict().items()}, strict=True)
    with torch.no_grad():
        for i in _SAM_TINY["global_attn_indexes"]:
            attn = ref.blocks[i].attn
            attn.rel_pos_h = torch.nn.Parameter(ref_1024.blocks[i].attn.rel_pos_h.clone())
            attn.rel_pos_w = torch.nn.Parameter(ref_1024.blocks[i].attn.rel_pos_w.clone())
        x = torch.randn(1, 3, 256, 256)
        assert (ref(x) - ours(x)).abs().max() < 1e-4


def test_sam_pos_embed_resize_keeps_a_constant():
    pos = torch.full((1, 64, 64, 4), 0.7)
    assert torch.allclose(weights.resize_pos_embed(pos, 16), torch.full((1, 16, 16, 4), 0.7), atol=1e-6)


def test_sam_bad_inputs_give_clear_errors(tmp_path):
    model = sam_encoder.build_sam_encoder("vit_b", 64, **_SAM_TINY)
    with pytest.raises(files.WeightsError, match="nope.safetensors"):
        weights.load_sam(model, str(tmp_path / "nope.safetensors"))
    (tmp_path / "junk.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(ValueError, match="not a safetensors file"):
        weights.load_sam(model, str(tmp_path / "junk.safetensors"))

    wider = sam_encoder.build_sam_encoder("vit_b", 64, **{**_SAM_TINY, "embed_dim": 64})
    save_file(wider.state_dict(), str(tmp_path / "wide.safetensors"))
    with pytest.raises(ValueError, match=r"embed_dim=64, depth=3.*model is .*embed_dim=32"):
        weights.load_sam(model, str(tmp_path / "wide.safetensors"))

    sd = {f"image_encoder.{k}": v for k, v in model.state_dict().items() if k != "blocks.1.attn.rel_pos_h"}
    save_file(sd, str(tmp_path / "partial.safetensors"))
    with pytest.raises(ValueError, match=r"partial.safetensors \(official layout.*missing keys.*blocks.1.attn.rel_pos_h"):
        weights.load_sam(model, str(tmp_path / "partial.safetensors"))

    save_file({"encoder.weight": torch.zeros(1)}, str(tmp_path / "other.safetensors"))
    with pytest.raises(ValueError, match="does not match the SAM image encoder.*unexpected keys"):
        weights.load_sam(model, str(tmp_path / "other.safetensors"))

    with pytest.raises(ValueError, match="img_size=64"):
        model(torch.randn(1, 3, 32, 32))
    with pytest.raises(ValueError, match="vit_b, vit_l, vit_h"):
        sam_encoder.build_sam_encoder("vit_x")


def test_sam_convert_cli(tmp_path):
    ref = _sam_reference(64, **_SAM_TINY, window_size=3)
    sd = {f"image_encoder.{k}": v for k, v in ref.state_dict().items()}
    sd["mask_decoder.iou_token.weight"] = torch.randn(1, 256)
    torch.save(sd, tmp_path / "sam_vit_tiny.pth")
    script = pathlib.Path(weights.__file__)
    run = subprocess.run([sys.executable, str(script), "convert", str(tmp_path / "sam_vit_tiny.pth"),
                          str(tmp_path / "out.safetensors")], capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
    ours = sam_encoder.build_sam_encoder("vit_b", 64, **_SAM_TINY, window_size=3).eval()
    weights.load_sam(ours, str(tmp_path / "out.safetensors"))
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        assert (ours(x) - ref(x)).abs().max() < 1e-4

    bad = subprocess.run([sys.executable, str(script), "convert", str(tmp_path / "missing.pth"),
                          str(tmp_path / "bad.safetensors")], capture_output=True, text=True)
    assert bad.returncode != 0 and "error:" in bad.stderr and "missing.pth" in bad.stderr
    assert "Traceback" not in bad.stderr
    torch.save({"head.weight": torch.zeros(2)}, tmp_path / "not_sam.pth")  # what the CLI catches, in-process
    with pytest.raises(ValueError, match="not_sam.pth.*holds no SAM image encoder"):
        weights.convert(str(tmp_path / "not_sam.pth"), str(tmp_path / "bad.safetensors"))
    assert not (tmp_path / "bad.safetensors").exists()
    with pytest.raises(files.WeightsError, match="the folder of the output .*no_such_dir.* does not exist"):
        weights.convert(str(tmp_path / "not_sam.pth"), str(tmp_path / "no_such_dir" / "o.safetensors"))


def test_sam_missing_weights_say_where_to_download(tmp_path):
    for path in ("nope.safetensors", "nope.pth"):
        with pytest.raises(files.WeightsError, match=r"nope.* does not exist.*Download: .*dl.fbaipublicfiles.com/"
                                                     r"segment_anything/sam_vit_b_01ec64.pth.*facebook/sam-vit-base"):
            if path.endswith("safetensors"):  # the two public readers: the loader and the converter
                weights.load_sam(sam_encoder.build_sam_encoder("vit_b", 64, **_SAM_TINY), str(tmp_path / path))
            else:
                weights.convert(str(tmp_path / path), str(tmp_path / "out.safetensors"))


def test_sam_frozen_teacher_is_frozen(tmp_path):
    model = sam_encoder.build_sam_encoder("vit_b", 64, **_SAM_TINY)
    save_file(model.state_dict(), str(tmp_path / "w.safetensors"))
    teacher = weights.frozen_sam("vit_b", str(tmp_path / "w.safetensors"), img_size=64, dtype=torch.bfloat16,
                                 **_SAM_TINY)
    assert not teacher.training and all(not m.training for m in teacher.modules())
    assert not any(p.requires_grad for p in teacher.parameters())
    assert torch.equal(teacher.pos_embed.float(), model.pos_embed.bfloat16().float())
    with torch.no_grad():
        out = teacher(torch.randn(2, 3, 64, 64))  # an fp32 batch into a bf16 teacher
    assert out.dtype == torch.bfloat16 and out.shape == (2, 256, 4, 4)


# ==============================================================================================================
# data.py: datasets, pipeline, rare class sampling
# ==============================================================================================================

_DATA_ID_TO_TRAIN = {7: 0, 8: 1, 11: 2, 12: 3, 13: 4, 17: 5, 19: 6, 20: 7, 21: 8, 22: 9, 23: 10, 24: 11, 25: 12,
                     26: 13, 27: 14, 28: 15, 31: 16, 32: 17, 33: 18}


def _data_palette_png(path, ids: np.ndarray) -> None:
    """A GTA5-style label: palette image whose indices are Cityscapes label ids."""
    im = Image.fromarray(ids.astype(np.uint8), mode="P")
    im.putpalette(np.random.default_rng(0).integers(0, 256, 768).tolist())
    im.save(path)


def _data_image(path, h, w, seed=0) -> None:
    Image.fromarray(np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)).save(path)


def _data_scene_ids(h, w, rare: bool = False) -> np.ndarray:
    """Label ids: sky (23) on top, road (7) below, a building (11) block, optionally a small train (31) patch."""
    ids = np.full((h, w), 7, np.uint8)
    ids[: h // 2] = 23
    ids[h // 4: h // 2, : w // 3] = 11
    if rare:
        ids[h // 2: h // 2 + 12, w // 2: w // 2 + 12] = 31
    return ids


def _data_gta(root, n=6, h=48, w=64, rare=(0,)) -> None:
    os.makedirs(root / "gta5" / "images", exist_ok=True)
    os.makedirs(root / "gta5" / "labels", exist_ok=True)
    for i in range(n):
        _data_image(root / "gta5" / "images" / f"{i + 1:05d}.png", h, w, seed=i)
        _data_palette_png(root / "gta5" / "labels" / f"{i + 1:05d}.png", _data_scene_ids(h, w, rare=i in rare))


def _data_cityscapes(root, split="train", n=4, h=32, w=64, train_ids=False) -> None:
    for i in range(n):
        city = ("aachen", "bremen")[i % 2]
        img_dir, gt_dir = (root / "cityscapes" / d / split / city for d in ("leftImg8bit", "gtFine"))
        os.makedirs(img_dir, exist_ok=True)
        os.makedirs(gt_dir, exist_ok=True)
        stem = f"{city}_{i:06d}_000019"
        _data_image(img_dir / f"{stem}_leftImg8bit.png", h, w, seed=100 + i)
        ids = _data_scene_ids(h, w)
        Image.fromarray(ids).save(gt_dir / f"{stem}_gtFine_labelIds.png")
        if train_ids:
            Image.fromarray(np.full((h, w), 5, np.uint8)).save(gt_dir / f"{stem}_gtFine_labelTrainIds.png")
        # the neighbours that ship in gtFine and must be ignored
        Image.fromarray(np.zeros((h, w, 3), np.uint8)).save(gt_dir / f"{stem}_gtFine_color.png")
        Image.fromarray(np.zeros((h, w), np.uint16)).save(gt_dir / f"{stem}_gtFine_instanceIds.png")
        (gt_dir / f"{stem}_gtFine_polygons.json").write_text("{}")


# ACDC's and Dark Zurich's real sequence names; their images are 1920x1080, these 96x54
_DATA_SEQUENCES = {"fog": "GOPR0475", "night": "GOPR0351", "rain": "GP010400", "snow": "GOPR0122"}


def _data_write_labels(stem: str, train: np.ndarray) -> None:
    """stem + _labelTrainIds.png and the _labelIds.png of the same content, with the neighbours that must be
    ignored (a color picture, ACDC's invalid-region mask)."""
    to_id = np.zeros(256, np.uint8)
    to_id[:19] = list(_DATA_ID_TO_TRAIN)
    Image.fromarray(train).save(stem + "_labelTrainIds.png")
    Image.fromarray(to_id[train]).save(stem + "_labelIds.png")
    Image.fromarray(np.zeros((*train.shape, 3), np.uint8)).save(stem + "_labelColor.png")
    Image.fromarray(np.zeros(train.shape, np.uint8)).save(stem + "_invIds.png")


def _data_frames(folder, seq: str, n: int, w: int, h: int, seed: int, suffix: str = "_rgb_anon.png") -> list[str]:
    os.makedirs(folder, exist_ok=True)
    names = [f"{seq}_frame_{i * 40 + 41:06d}" for i in range(n)]
    for i, name in enumerate(names):
        _data_image(os.path.join(folder, name + suffix), h, w, seed=seed + i)
    return names


def _data_acdc(root, split="val", conditions=datasets.ACDC_CONDITIONS, n=1, w=96, h=54, labels=True) -> dict:
    """ACDC as rgb_anon_trainvaltest.zip and gt_trainval.zip unzip: rgb_anon/<condition>/<split>/<sequence>/
    <name>_rgb_anon.png, with the <split>_ref folder of clear-weather references beside it (never read), and
    gt/<condition>/<split>/<sequence>/<name>_gt_label{TrainIds,Ids}.png. Returns {condition: (n, h, w) train ids},
    classes 0..5 and a band of 255 on top, a different mix per condition."""
    truth = {}
    for k, cond in enumerate(conditions):
        seq = _DATA_SEQUENCES[cond]
        names = _data_frames(os.path.join(root, "acdc", "rgb_anon", cond, split, seq), seq, n, w, h, seed=10 * k)
        _data_frames(os.path.join(root, "acdc", "rgb_anon", cond, split + "_ref", seq + "_ref"), seq, n, w, h,
                     seed=99, suffix="_rgb_ref_anon.png")
        train = np.random.default_rng(k).integers(0, 6 - k, (n, h, w)).astype(np.uint8)
        train[:, : h // 6] = 255
        truth[cond] = train
        if labels:
            os.makedirs(os.path.join(root, "acdc", "gt", cond, split, seq), exist_ok=True)
            for name, t in zip(names, train):
                _data_write_labels(os.path.join(root, "acdc", "gt", cond, split, seq, name + "_gt"), t)
    return truth


def _data_dark_zurich(root, split="val", n=1, w=96, h=54, labels=True) -> np.ndarray:
    """Dark Zurich as its archives unzip: rgb_anon/<split>/night/<sequence>/<name>_rgb_anon.png (the training
    split's day/ and twilight/ and the val_ref/ references are not the benchmark's, and never read) and, for val,
    gt/val/night/<sequence>/<name>_gt_label{TrainIds,Ids}.png. Returns the (n, h, w) train ids."""
    base = os.path.join(root, "dark_zurich")
    names = _data_frames(os.path.join(base, "rgb_anon", split, "night", "GOPR0356"), "GOPR0356", n, w, h, seed=50)
    for other in ("day", "twilight") if split == "train" else ():
        _data_frames(os.path.join(base, "rgb_anon", split, other, "GOPR0348"), "GOPR0348", 1, w, h, seed=60)
    _data_frames(os.path.join(base, "rgb_anon", split + "_ref", "day", "GOPR0356_ref"), "GOPR0356", 1, w, h, seed=70,
                 suffix="_ref_rgb_anon.png")
    train = np.random.default_rng(9).integers(0, 4, (n, h, w)).astype(np.uint8)
    if labels:
        os.makedirs(os.path.join(base, "gt", split, "night", "GOPR0356"), exist_ok=True)
        for name, t in zip(names, train):
            _data_write_labels(os.path.join(base, "gt", split, "night", "GOPR0356", name + "_gt"), t)
    return train


def _data_root(tmp_path):
    _data_gta(tmp_path)
    _data_cityscapes(tmp_path, "train")
    return tmp_path


def _data_batches(root, n, **kw):
    kw = dict(crop=32, batch_size=2, seed=3, workers=0, src_scale=(64, 48), tgt_scale=(64, 32),
              cache_dir=str(root / "cache"), rcs_min_pixels=100) | kw
    it = data.make_train_loader(str(root), **kw)
    return [next(it) for _ in range(n)]


def test_label_tables_match_the_official_mapping_pixel_for_pixel(tmp_path):
    ids = np.arange(256, dtype=np.uint8).reshape(16, 16)  # every possible palette index once
    _data_palette_png(tmp_path / "l.png", ids)
    got = data.read_label(datasets.Sample("unused", str(tmp_path / "l.png")))
    want = np.array([_DATA_ID_TO_TRAIN.get(int(i), 255) for i in ids.ravel()]).reshape(16, 16)
    assert np.array_equal(got, want)
    train = np.where(ids < 19, ids, 255)  # a labelTrainIds file: 0..18 and 255, used as they are
    Image.fromarray(train).save(tmp_path / "t.png")
    assert np.array_equal(data.read_label(datasets.Sample("unused", str(tmp_path / "t.png"), train_ids=True)), train)
    Image.fromarray(ids).save(tmp_path / "t.png")  # any other value: label ids under a train-id name
    with pytest.raises(DatasetError, match=r"t.png holds the values 19, 20, 21, 22, 23, which are no train ids"):
        data.read_label(datasets.Sample("unused", str(tmp_path / "t.png"), train_ids=True))
    assert len(data.CLASSES) == len(data.PALETTE) == 19 and data.PALETTE[0] == (128, 64, 128)


def test_rescale_size_matches_mmcv():
    assert data.rescale_size(1914, 1052, (1280, 720)) == (1280, 704)
    assert data.rescale_size(2048, 1024, (1024, 512)) == (1024, 512)
    assert data.rescale_size(384, 216, (256, 144)) == (256, 144)
    lbl = np.arange(12, dtype=np.uint8).reshape(3, 4)
    assert np.array_equal(data.resize_label(lbl, (8, 6)), lbl.repeat(2, 0).repeat(2, 1))
    assert data.resize_label(lbl, (3, 3))[0].tolist() == [0, 1, 2]  # cv2 nearest: source floor(i * 4 / 3)


def test_cityscapes_val_prefers_train_ids_ignores_neighbours_and_keeps_full_resolution(tmp_path):
    _data_cityscapes(tmp_path, "val", n=2, h=32, w=64)
    # give the second image a labelTrainIds file whose content differs from the mapped labelIds: it must win
    Image.fromarray(np.full((32, 64), 5, np.uint8)).save(
        tmp_path / "cityscapes/gtFine/val/bremen/bremen_000001_000019_gtFine_labelTrainIds.png")
    batches = list(data.make_val_loader(str(tmp_path), scale=(32, 16), workers=0))
    assert len(batches) == 2
    first, second = batches
    assert first["img"].shape == (1, 3, 16, 32) and first["lbl"].shape == (1, 32, 64)  # full-resolution label
    want = np.vectorize(lambda i: _DATA_ID_TO_TRAIN.get(int(i), 255))(_data_scene_ids(32, 64))
    assert np.array_equal(first["lbl"][0].numpy(), want)
    assert (second["lbl"] == 5).all() and second["path"][0].endswith("bremen_000001_000019_leftImg8bit.png")
    assert first["lbl"].dtype == torch.uint8 and first["img"].dtype == torch.float32


def test_gta_label_of_another_size_is_aligned_or_rejected(tmp_path):
    _data_gta(tmp_path, n=1, h=48, w=64)
    ids = np.zeros((24, 32), np.uint8)
    ids[:, 16:] = 26  # car on the right half
    _data_palette_png(tmp_path / "gta5/labels/00001.png", ids)  # half size, same aspect ratio
    img, lbl = data.read_pair(datasets.list_gta5(str(tmp_path))[0])
    assert lbl.shape == img.shape[:2] == (48, 64)
    assert (lbl[:, :32] == 255).all() and (lbl[:, 32:] == 13).all()
    _data_palette_png(tmp_path / "gta5/labels/00001.png", np.zeros((64, 48), np.uint8))  # transposed
    with pytest.raises(DatasetError, match=r"48x64 but its image .* is 64x48.*aspect"):
        data.read_pair(datasets.list_gta5(str(tmp_path))[0])


def test_crops_respect_cat_max_ratio():
    lbl = np.zeros((50, 100), np.uint8)
    lbl[:, 60:] = 1  # a 50-wide crop is acceptable only for offsets 23..47 of 0..50
    ok = []
    for k in range(300):
        y, x = data.cat_max_crop(np.random.default_rng([0, k]), lbl, 50)
        counts = np.bincount(lbl[y:y + 50, x:x + 50].ravel(), minlength=2)
        ok.append(counts.max() / counts.sum() < 0.75)
    assert np.mean(ok) > 0.98  # a plain random crop passes about half the time
    single = np.zeros((50, 100), np.uint8)  # no acceptable crop: gives up after 10 redraws, as mmseg
    assert data.cat_max_crop(np.random.default_rng(0), single, 50)[1] in range(51)


def test_crop_flip_pad_keep_image_and_label_aligned():
    lbl = np.random.default_rng(0).integers(0, 19, (40, 60)).astype(np.uint8)
    img = torch.from_numpy(lbl.astype(np.float32) * 10).expand(3, -1, -1)  # each pixel's value names its class
    flips = 0
    for k in range(200):
        i, l = data.crop_flip(np.random.default_rng([1, k]), img, lbl, 32)
        assert torch.equal(i[0], torch.from_numpy(l.astype(np.float32) * 10))
        flips += not any(np.array_equal(l, lbl[y:y + 32, x:x + 32]) for y in range(9) for x in range(29))
    assert 70 < flips < 130  # RandomFlip(prob=0.5)
    i, l = data.finish(img[:, :20, :30], lbl[:20, :30], 32)  # smaller than the crop: pad bottom and right
    assert i.shape == (3, 32, 32) and l.shape == (32, 32) and l.dtype == torch.int64
    assert (i[:, 20:] == 0).all() and (i[:, :, 30:] == 0).all() and (l[20:] == 255).all() and (l[:, 30:] == 255).all()
    assert torch.allclose(i[:, 0, 0] * torch.tensor(data.STD) + torch.tensor(data.MEAN), img[:, 0, 0])


def test_rcs_tables_follow_daformer():
    counts = np.array([[5000, 0, 3001, 0], [9000, 10, 0, 0], [0, 20, 3000, 0]])
    classes, probs, images = data.rcs_tables(np.pad(counts, ((0, 0), (0, 15))), min_pixels=3000)
    # class 3 is absent; class 1 is present but no image has more than 3000 pixels of it, so it is dropped
    assert classes.tolist() == [0, 2]
    freq = counts.sum(0) / counts.sum()
    want = np.exp((1 - freq[[0, 2]]) / 0.01)
    assert np.allclose(probs, want / want.sum())
    assert [i.tolist() for i in images] == [[0, 1], [0]]  # strictly more than min_pixels, as DAFormer


def test_rcs_prefers_rare_classes(tmp_path):
    root = _data_root(tmp_path)  # one of six images holds a 12x12 'train' patch
    def rare_share(rcs):
        batches = _data_batches(root, 8, rcs=rcs, batch_size=4)
        # DAFormer redraws the crop until it keeps > min_crop_ratio * min_pixels pixels of the sampled class
        return np.mean([(b["src_lbl"][j] == 16).sum().item() > 50 for b in batches for j in range(4)])
    assert rare_share(True) > 0.95  # without the crop redraws about 0.6
    assert rare_share(False) < 0.4


def test_rcs_statistics_are_cached_outside_the_dataset_and_refreshed_on_change(tmp_path, monkeypatch, capsys):
    root = _data_root(tmp_path)
    samples = datasets.list_gta5(str(root))
    cache = tmp_path / "cache"
    counts = data.class_pixel_counts(samples, str(cache))
    assert "computing" in capsys.readouterr().out
    assert counts.shape == (6, 19) and counts[0, 16] == 144 and counts[1, 16] == 0 and counts[0].sum() == 48 * 64
    assert len(os.listdir(cache)) == 1 and not any("rcs" in f for f in os.listdir(root / "gta5"))
    monkeypatch.setattr(data, "_count_classes", lambda s: 1 / 0)  # a second run must not recount
    assert np.array_equal(data.class_pixel_counts(samples, str(cache)), counts)
    monkeypatch.undo()
    _data_palette_png(root / "gta5/labels/00002.png", np.full((48, 64), 31, np.uint8))
    os.utime(root / "gta5/labels/00002.png", ns=(1, 1))  # a changed file: new content, new mtime
    assert data.class_pixel_counts(samples, str(cache))[1, 16] == 48 * 64
    for entry in os.listdir(cache):  # a cache entry cut short (or empty) is computed again, not trusted
        (cache / entry).write_bytes((cache / entry).read_bytes()[:40])
    assert data.class_pixel_counts(samples, str(cache))[1, 16] == 48 * 64 and "computing" in capsys.readouterr().out
    with pytest.raises(files.FlagError, match=r"cache folder .*afile.* cannot be written.*SSR_CACHE"):
        (tmp_path / "afile").write_text("")  # a folder that cannot be made, even by root
        data.class_pixel_counts(samples, str(tmp_path / "afile" / "cache"))


def test_batches_depend_only_on_seed_iteration_and_rank(tmp_path):
    root = _data_root(tmp_path)
    ref = _data_batches(root, 4)
    assert ref[0]["src_img"].shape == (2, 3, 32, 32) and ref[0]["src_lbl"].shape == (2, 32, 32)
    assert ref[0]["tgt_img"].shape == (2, 3, 32, 32) and ref[0]["src_lbl"].dtype == torch.int64
    for other in (_data_batches(root, 4, workers=2), [None, None] + _data_batches(root, 2, start_iter=2)):
        for a, b in zip(ref, other):
            if b is not None:
                assert all(torch.equal(a[k], b[k]) for k in a)
    assert not torch.equal(ref[0]["src_img"], ref[1]["src_img"])
    rank1 = _data_batches(root, 2, rank=1, world_size=2)
    assert not torch.equal(rank1[0]["src_img"], ref[0]["src_img"])
    # global positions (iteration * world_size + rank) * batch_size + j: rank 1 of 2 reads iterations 1, 3 of 1
    assert all(torch.equal(rank1[0][k], ref[1][k]) and torch.equal(rank1[1][k], ref[3][k]) for k in ref[0])
    assert not torch.equal(_data_batches(root, 1, seed=4)[0]["src_img"], ref[0]["src_img"])


def test_loaders_leave_torchs_global_random_stream_alone(tmp_path):
    root = _data_root(tmp_path)
    _data_cityscapes(root, "val", n=2)
    torch.manual_seed(0)
    state = torch.get_rng_state()
    _data_batches(root, 1, workers=2)
    list(data.make_val_loader(str(root), workers=0))
    assert torch.equal(state, torch.get_rng_state())


def test_missing_or_empty_datasets_explain_the_layout(tmp_path):
    with pytest.raises(DatasetError, match="does not exist.*download.visinf.*cityscapes-dataset.com"):
        data.make_train_loader(str(tmp_path / "nowhere"))
    _data_gta(tmp_path, n=1)
    with pytest.raises(DatasetError, match=r"cityscapes split 'train' not found.*leftImg8bit.*gtFine_trainvaltest.zip"):
        data.make_train_loader(str(tmp_path), cache_dir=str(tmp_path / "cache"))
    os.makedirs(tmp_path / "cityscapes/leftImg8bit/val")
    os.makedirs(tmp_path / "cityscapes/gtFine/val")
    with pytest.raises(DatasetError, match="no images found for cityscapes split 'val'"):
        data.make_val_loader(str(tmp_path))


def test_image_without_label_is_named(tmp_path):
    _data_gta(tmp_path, n=2)
    os.remove(tmp_path / "gta5/labels/00002.png")
    with pytest.raises(DatasetError, match=r"00002.png has no label: expected .*labels.00002.png"):
        datasets.list_gta5(str(tmp_path))
    _data_cityscapes(tmp_path, "val", n=2)
    os.remove(tmp_path / "cityscapes/gtFine/val/bremen/bremen_000001_000019_gtFine_labelIds.png")
    with pytest.raises(DatasetError, match=r"bremen_000001_000019_leftImg8bit.png has no label"):
        data.make_val_loader(str(tmp_path))


def test_truncated_image_in_a_worker_gives_one_clean_error(tmp_path):
    root = _data_root(tmp_path)
    for i in range(1, 7):
        path = root / f"gta5/images/{i:05d}.png"
        path.write_bytes(path.read_bytes()[:200])
    with pytest.raises(DatasetError) as e:
        _data_batches(root, 1, workers=2)
    assert "cannot read image" in str(e.value) and "truncated" in str(e.value) and ".png" in str(e.value)
    assert "Traceback" not in str(e.value) and "worker" not in str(e.value)


def test_bad_labels_give_clear_errors(tmp_path):
    _data_cityscapes(tmp_path, "val", n=2, h=32, w=64)
    label = tmp_path / "cityscapes/gtFine/val/aachen/aachen_000000_000019_gtFine_labelIds.png"
    Image.fromarray(np.zeros((32, 64, 3), np.uint8)).save(label)  # a color image where ids belong
    with pytest.raises(DatasetError, match="mode RGB; expected a single-channel"):
        next(iter(data.make_val_loader(str(tmp_path), workers=2)))
    Image.fromarray(np.zeros((16, 32), np.uint8)).save(label)  # half size: evaluation cannot use it
    with pytest.raises(DatasetError, match="32x16 but its image .* is 64x32"):
        next(iter(data.make_val_loader(str(tmp_path), workers=0)))


def _data_pixels(mode: str, values: list, palette: list | None = None) -> Image.Image:
    """A 1-row picture in `mode` whose pixels are `values`."""
    im = Image.new(mode, (len(values), 1))
    if palette:
        im.putpalette(palette)
    for x, v in enumerate(values):
        im.putpixel((x, 0), v)
    return im


def test_rgb_pixels_reads_every_pillow_mode_with_known_values(tmp_path):
    wide = [0, 257, 32768, 65535]  # 16 bits -> 0, 1, 128, 255: scaled, not clipped at 255 (a white photo)
    cases = {  # mode: (pixels, the RGB values they show, tolerance)
        "1": ([0, 1], [(0, 0, 0), (255, 255, 255)], 0),
        "L": ([77], [(77, 77, 77)], 0),
        "LA": ([(77, 0)], [(77, 77, 77)], 0),  # alpha dropped, the colour under it kept
        "La": ([(100, 128)], [(199, 199, 199)], 0),  # premultiplied: 100 * 255 / 128
        "P": ([2], [(200, 100, 50)], 0),
        "PA": ([(2, 7)], [(200, 100, 50)], 0),
        "RGB": ([(1, 2, 3)], [(1, 2, 3)], 0),
        "RGBA": ([(1, 2, 3, 0)], [(1, 2, 3)], 0),
        "RGBa": ([(100, 50, 20, 128)], [(199, 99, 39)], 0),
        "RGBX": ([(1, 2, 3, 0)], [(1, 2, 3)], 0),
        "CMYK": ([(0, 0, 0, 0), (255, 0, 0, 0), (128, 0, 0, 128)], [(255, 255, 255), (0, 255, 255), (63, 127, 127)], 0),
        "YCbCr": ([(128, 128, 128), (76, 85, 255)], [(128, 128, 128), (255, 0, 0)], 1),  # JFIF: Y 76 ... is red
        "LAB": ([(255, 128, 128), (128, 128, 128), (0, 128, 128)], [(255, 255, 255), (119, 119, 119), (0, 0, 0)], 1),
        "HSV": ([(0, 255, 255), (85, 255, 255), (0, 0, 128)], [(255, 0, 0), (0, 255, 0), (128, 128, 128)], 0),
        **{m: (wide, [(v,) * 3 for v in (0, 1, 128, 255)], 0) for m in ("I;16", "I;16B", "I;16L", "I;16N", "I")},
        "F": ([0.0, 0.5, 1.0], [(0, 0, 0), (128, 128, 128), (255, 255, 255)], 0),
    }
    assert set(cases) == set(Image.MODES)  # every mode this Pillow has: a new one shows here
    for mode, (pixels, shown, tol) in cases.items():
        palette = [0, 0, 0, 10, 20, 30, 200, 100, 50] if mode in ("P", "PA") else None
        rgb = data.rgb_pixels(_data_pixels(mode, pixels, palette), "x.png")
        assert rgb.dtype == np.uint8 and rgb.shape == (1, len(pixels), 3) and rgb.flags.writeable, mode
        assert np.abs(rgb[0].astype(int) - shown).max() <= tol, (mode, rgb[0].tolist())
    for mode, pixels, shown in (("I", [-5, 70000], "-5 to 70000"), ("F", [0.0, 1.5], "0 to 1.5"),
                                ("F", [0.0, float("nan")], "nan")):  # no range to read them in: refused by name
        with pytest.raises(DatasetError, match=rf"x.png: a .* picture, mode {mode}, with values from .*{shown}"):
            data.rgb_pixels(_data_pixels(mode, pixels), "x.png")
    # the datasets' reader takes the same path: a 16-bit PNG reads as its scaled values
    Image.fromarray(np.array([wide], np.uint16)).save(tmp_path / "gray16.png")
    assert data.read_image(str(tmp_path / "gray16.png"))[0, :, 0].tolist() == [0, 1, 128, 255]


def test_cityscapes_as_source_reads_gtfine_train_ids_else_label_ids(tmp_path):
    _data_cityscapes(tmp_path, "train", n=2, h=64, w=128)
    Image.fromarray(np.full((64, 64 * 2), 5, np.uint8)).save(  # the second image also has a train-id file: it wins
        tmp_path / "cityscapes/gtFine/train/bremen/bremen_000001_000019_gtFine_labelTrainIds.png")
    _data_acdc(tmp_path, "train", n=2, labels=False)
    first, second = datasets.list_dataset(str(tmp_path), "cityscapes", "train")
    assert first.lbl.endswith("_gtFine_labelIds.png") and not first.train_ids
    assert second.lbl.endswith("_gtFine_labelTrainIds.png") and second.train_ids
    batches = _data_batches(tmp_path, 4, src="cityscapes", tgt="acdc", src_scale=(128, 64), tgt_scale=(96, 54),
                            rcs=False)
    labels = set(torch.cat([b["src_lbl"].unique() for b in batches]).tolist())
    assert labels <= {0, 2, 5, 10, 255} and 5 in labels and labels & {0, 2, 10}  # both id spaces, as train ids
    assert batches[0]["tgt_img"].shape == (2, 3, 32, 32)


def test_acdc_is_read_as_it_unzips_by_condition_without_the_reference_images(tmp_path):
    _data_acdc(tmp_path, "train", n=2, labels=False)
    truth = _data_acdc(tmp_path, "val")
    train = datasets.list_dataset(str(tmp_path), "acdc", "train", need_labels=False)
    assert [pathlib.Path(s.img).parts[-4:-2] for s in train] == [(c, "train") for c in datasets.ACDC_CONDITIONS
                                                                 for _ in range(2)]
    assert all(s.img.endswith("_rgb_anon.png") and "_ref" not in s.img and s.lbl is None for s in train)
    night = datasets.list_dataset(str(tmp_path), "acdc", "train", need_labels=False, conditions=("night",))
    assert [os.path.basename(s.img) for s in night] == ["GOPR0351_frame_000041_rgb_anon.png",
                                                        "GOPR0351_frame_000081_rgb_anon.png"]
    val = datasets.list_dataset(str(tmp_path), "acdc", "val")
    assert [s.lbl.endswith("_gt_labelTrainIds.png") and s.train_ids for s in val] == [True] * 4
    for s, cond in zip(val, datasets.ACDC_CONDITIONS):
        assert np.array_equal(data.read_label(s), truth[cond][0])
    os.remove(val[1].lbl)  # gt_labelIds.png alone: Cityscapes label ids, mapped on reading
    relisted = datasets.list_dataset(str(tmp_path), "acdc", "val")[1]
    assert relisted.lbl.endswith("_gt_labelIds.png") and np.array_equal(data.read_label(relisted), truth["night"][0])
    shutil.rmtree(tmp_path / "acdc/rgb_anon/snow")
    with pytest.raises(DatasetError, match=r"ACDC condition 'snow' not found: missing folder .*rgb_anon.snow\. "
                                           r"Unzip rgb_anon_trainvaltest.zip.*leave the condition out with --acdc-conditions\."):
        datasets.list_dataset(str(tmp_path), "acdc", "val", conditions=("fog", "snow"))


def test_dark_zurich_is_read_as_it_unzips_night_only(tmp_path):
    _data_dark_zurich(tmp_path, "train", n=3, labels=False)
    truth = _data_dark_zurich(tmp_path, "val", n=2)
    train = datasets.list_dataset(str(tmp_path), "darkzurich", "train", need_labels=False)
    assert [os.path.basename(s.img) for s in train] == [f"GOPR0356_frame_{f:06d}_rgb_anon.png" for f in (41, 81, 121)]
    val = datasets.list_dataset(str(tmp_path), "darkzurich", "val")
    assert [np.array_equal(data.read_label(s), t) for s, t in zip(val, truth)] == [True, True]
    with pytest.raises(DatasetError, match=r"Dark Zurich split 'test' not found: missing folder .*rgb_anon.test.night"
                                           r".*Dark_Zurich_test_anon_withoutGt.zip"):
        datasets.list_dataset(str(tmp_path), "darkzurich", "test", need_labels=False)


def test_label_ids_in_a_train_id_file_are_named(tmp_path):
    """What is detectable: a _gt_labelTrainIds.png that holds label ids (road 7, sky 23, car 26 ...) shows values
    19-254, which no train-id file holds; one whose ids all lie in 0..18 cannot be told apart."""
    _data_acdc(tmp_path, "val", conditions=("rain",))
    label = next((tmp_path / "acdc/gt/rain/val").rglob("*_gt_labelTrainIds.png"))
    Image.fromarray(_data_scene_ids(54, 96)).save(label)  # road 7, building 11, sky 23
    with pytest.raises(DatasetError, match=re.escape(str(label)) + r" holds the values 23, which are no train ids.*"
                                           r"label ids saved as _labelTrainIds.png"):
        next(iter(data.make_val_loader(str(tmp_path), "acdc", scale=(48, 27), workers=0, conditions=("rain",))))


# ----------------------------------------------------------------------------------------------------------------
# SYNTHIA-RAND-CITYSCAPES: 16-bit RGB label PNGs

# DAFormer's tools/convert_datasets/synthia.py, written out again here as the reference
_DATA_SYNTHIA_TO_TRAIN = {3: 0, 4: 1, 2: 2, 21: 3, 5: 4, 7: 5, 15: 6, 9: 7, 6: 8, 16: 9, 1: 10, 10: 11, 17: 12,
                          8: 13, 18: 14, 19: 15, 20: 16, 12: 17, 11: 18}


def _data_png_chunk(kind: bytes, payload: bytes) -> bytes:
    return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", zlib.crc32(kind + payload))


def _data_png16(path, values: np.ndarray, filters=(0,), depth=16, colour=2) -> None:
    """A PNG written byte by byte: values (H, W, C) big-endian samples, row y filtered with filters[y % len],
    each filter computed from the PNG specification (None, Sub, Up, Average, Paeth); the data in two IDATs."""
    h = values.shape[0]
    raw = values.astype(">u2" if depth == 16 else np.uint8).reshape(h, -1).view(np.uint8).astype(np.int32)
    bpp = raw.shape[1] // values.shape[1]
    rows = []
    for y in range(h):
        x, up = raw[y], raw[y - 1] if y else np.zeros_like(raw[y])
        left = np.concatenate([np.zeros(bpp, np.int32), x[:-bpp]])
        upleft = np.concatenate([np.zeros(bpp, np.int32), up[:-bpp]])
        p = left + up - upleft
        pa, pb, pc = abs(p - left), abs(p - up), abs(p - upleft)
        paeth = np.where((pa <= pb) & (pa <= pc), left, np.where(pb <= pc, up, upleft))
        f = filters[y % len(filters)]
        pred = (0 * x, left, up, (left + up) // 2, paeth)[f]
        rows.append(bytes([f]) + ((x - pred) % 256).astype(np.uint8).tobytes())
    z = zlib.compress(b"".join(rows))
    ihdr = struct.pack(">IIBBBBB", values.shape[1], h, depth, colour, 0, 0, 0)
    idat = _data_png_chunk(b"IDAT", z[:len(z) // 2]) + _data_png_chunk(b"IDAT", z[len(z) // 2:])
    pathlib.Path(path).write_bytes(datasets.PNG_SIGNATURE + _data_png_chunk(b"IHDR", ihdr) + idat
                                   + _data_png_chunk(b"IEND", b""))


def _data_synthia_label(ids: np.ndarray, seed: int = 0) -> np.ndarray:
    """(H, W, 3) uint16: SYNTHIA class ids, then two instance channels that are never zero and whose low bytes
    look like class ids (a reader that mixed up channels or bytes would be caught)."""
    inst = np.random.default_rng(seed).integers(1, 200, (2,) + ids.shape) * 256 + ids
    return np.stack([ids, inst[0], inst[1]], -1).astype(np.uint16)


def _data_synthia_ids(h, w, rare: bool = False) -> np.ndarray:
    """The scene of _data_scene_ids in SYNTHIA ids: sky (1), road (3), a building (2), optionally a bus (19) patch
    where the Cityscapes scene has its train (SYNTHIA has no trains)."""
    to_synthia = np.zeros(256, np.uint16)
    to_synthia[[23, 7, 11, 31]] = 1, 3, 2, 19
    return to_synthia[_data_scene_ids(h, w, rare)]


def _data_synthia(root, n=6, h=38, w=64, rare=(0,)) -> None:
    os.makedirs(root / "synthia" / "RGB", exist_ok=True)
    os.makedirs(root / "synthia" / "GT" / "LABELS", exist_ok=True)
    os.makedirs(root / "synthia" / "GT" / "COLOR", exist_ok=True)  # ships beside LABELS; never read
    for i in range(n):
        _data_image(root / "synthia" / "RGB" / f"{i:07d}.png", h, w, seed=i)
        labels = _data_synthia_label(_data_synthia_ids(h, w, rare=i in rare), seed=i)
        _data_png16(root / "synthia" / "GT" / "LABELS" / f"{i:07d}.png", labels, filters=(4, 1, 0, 3, 2))


@pytest.mark.parametrize("filters", [(0,), (1,), (2,), (3,), (4,), (0, 1, 2, 3, 4, 4, 3)])
def test_png16_reader_matches_hand_written_files_for_every_filter(tmp_path, filters):
    values = np.random.default_rng(len(filters)).integers(0, 2 ** 16, (9, 13, 3)).astype(np.uint16)
    values[:3] //= 257  # smooth rows too, where the filters' predictions are close
    _data_png16(tmp_path / "l.png", values, filters)
    assert np.array_equal(data.read_png16_rgb(str(tmp_path / "l.png")), values)


def test_png16_reader_refuses_other_pngs_clearly(tmp_path):
    _data_png16(tmp_path / "gray.png", np.zeros((4, 4, 1), np.uint16), colour=0)
    with pytest.raises(DatasetError, match=r"16-bit grayscale PNG; SYNTHIA labels .* are 16-bit RGB"):
        data.read_png16_rgb(str(tmp_path / "gray.png"))
    _data_png16(tmp_path / "rgb8.png", np.zeros((4, 4, 3), np.uint8), depth=8)
    with pytest.raises(DatasetError, match=r"8-bit RGB PNG"):
        data.read_png16_rgb(str(tmp_path / "rgb8.png"))
    _data_png16(tmp_path / "ok.png", np.ones((40, 40, 3), np.uint16) * 1234, filters=(1,))
    blob = (tmp_path / "ok.png").read_bytes()
    (tmp_path / "cut.png").write_bytes(blob[:60])  # inside the first IDAT
    with pytest.raises(DatasetError, match=r"cut.png.*truncated or damaged"):
        data.read_png16_rgb(str(tmp_path / "cut.png"))
    (tmp_path / "text.png").write_text("not a png")
    with pytest.raises(DatasetError, match="text.png is not a PNG"):
        data.read_png16_rgb(str(tmp_path / "text.png"))


def test_synthia_labels_map_every_id_as_daformer_and_pillow_alone_would_lose_them(tmp_path):
    _data_synthia(tmp_path, n=2)
    ids = np.arange(16 * 20, dtype=np.uint16).reshape(16, 20)  # ids 0..319: every SYNTHIA id, and beyond 255
    _data_png16(tmp_path / "synthia/GT/LABELS/0000001.png", _data_synthia_label(ids), filters=(0, 4, 3))
    _data_image(tmp_path / "synthia/RGB/0000001.png", 16, 20)
    samples = datasets.list_dataset(str(tmp_path), "synthia", "train")
    assert [os.path.basename(s.img) for s in samples] == ["0000000.png", "0000001.png"]
    assert all(s.synthia and s.lbl.endswith(os.path.join("GT", "LABELS", os.path.basename(s.img))) for s in samples)
    want = np.vectorize(lambda i: _DATA_SYNTHIA_TO_TRAIN.get(int(i), 255))(ids)
    assert np.array_equal(data.read_label(samples[1]), want)
    assert np.array_equal(np.asarray(Image.open(samples[1].lbl))[:, :, 0], ids >> 8)  # pillow: the high byte only
    img, lbl = data.read_pair(samples[0])
    assert img.shape == (38, 64, 3) and lbl[0, 0] == 10 and lbl[-1, -1] == 0 and lbl[12, 0] == 2
    assert [data.CLASSES[i] for i in data.SYNTHIA_CLASSES_13] == [
        "road", "sidewalk", "building", "traffic light", "traffic sign", "vegetation", "sky", "person", "rider",
        "car", "bus", "motorcycle", "bicycle"]
    assert len(data.SYNTHIA_CLASSES) == 16 and {9, 14, 16}.isdisjoint(data.SYNTHIA_CLASSES)


def test_synthia_pipeline_resizes_to_1280x760_and_crops_aligned(tmp_path):
    _data_synthia(tmp_path, n=1)
    _data_cityscapes(tmp_path, "train", n=1)
    h, w = 760, 1280
    yy, xx = np.mgrid[0:h, 0:w]  # each pixel's color names its position
    img = np.stack([xx % 256, yy % 256, (xx // 256) * 16 + yy // 256], -1).astype(np.uint8)
    Image.fromarray(img).save(tmp_path / "synthia/RGB/0000000.png")
    ids = np.random.default_rng(0).choice([1, 2, 3, 10, 19], (h, w)).astype(np.uint16)  # no class > 75%
    _data_png16(tmp_path / "synthia/GT/LABELS/0000000.png", _data_synthia_label(ids))
    batch = next(data.make_train_loader(str(tmp_path), "synthia", batch_size=1, workers=0, rcs=False,
                                        tgt_scale=(64, 32), crop=512))
    assert batch["src_img"].shape == (1, 3, 512, 512) and batch["src_lbl"].shape == (1, 512, 512)
    crop = (batch["src_img"][0] * torch.tensor(data.STD).view(3, 1, 1) + torch.tensor(data.MEAN).view(3, 1, 1))
    crop = crop.round().byte().permute(1, 2, 0).numpy().astype(int)
    lbl = batch["src_lbl"][0].numpy()
    found = []
    for c, l in ((crop, lbl), (crop[:, ::-1], lbl[:, ::-1])):  # as drawn, and unflipped
        y, x = c[0, 0, 1] + 256 * (c[0, 0, 2] % 16), c[0, 0, 0] + 256 * (c[0, 0, 2] // 16)
        if np.array_equal(c, img[y:y + 512, x:x + 512]):  # no resize: 1280x760 is SYNTHIA's own size
            found.append(np.array_equal(l, data.SYNTHIA_TO_TRAIN[ids[y:y + 512, x:x + 512]]))
    assert found == [True]


def test_synthia_rcs_counts_and_prefers_rare_classes(tmp_path):
    _data_synthia(tmp_path)  # one of six labels holds a 12x12 bus patch
    _data_cityscapes(tmp_path, "train")
    counts = data.class_pixel_counts(datasets.list_dataset(str(tmp_path), "synthia", "train"), str(tmp_path / "c"))
    assert counts.shape == (6, 19) and counts[0, 15] == 144 and counts[1:, 15].sum() == 0
    building = (19 - 9) * 21  # rows 9..18, columns 0..20
    assert counts[0].sum() == 38 * 64 and counts[1, 2] == building and counts[1, 10] == 19 * 64 - building
    batches = _data_batches(tmp_path, 4, src="synthia", batch_size=4)
    assert np.mean([(b["src_lbl"][j] == 15).sum().item() > 50 for b in batches for j in range(4)]) > 0.9


def test_synthia_in_another_layout_is_explained(tmp_path):
    os.makedirs(tmp_path / "synthia/SYNTHIA-SEQS-01-SPRING/RGB/Stereo_Left/Omni_F")
    with pytest.raises(DatasetError, match=r"video sequences \(SYNTHIA-SEQS-01-SPRING\).*RAND-CITYSCAPES.*"
                                           r"synthia.RGB.0000000.png.*synthia-dataset.net"):
        datasets.list_dataset(str(tmp_path), "synthia", "train")
    shutil.rmtree(tmp_path / "synthia")
    _data_synthia(tmp_path, n=1)
    os.makedirs(tmp_path / "x/synthia/RAND_CITYSCAPES/RGB")
    with pytest.raises(DatasetError, match="RAND_CITYSCAPES/ one level too deep"):
        datasets.list_dataset(str(tmp_path / "x"), "synthia", "train")
    shutil.rmtree(tmp_path / "synthia/GT/LABELS")
    with pytest.raises(DatasetError, match=r"synthia labels not found: missing folder .*GT.LABELS"):
        datasets.list_dataset(str(tmp_path), "synthia", "train")
    with pytest.raises(DatasetError, match=r"synthia not found: missing folder .*RGB"):
        datasets.list_dataset(str(tmp_path / "x/synthia/RAND_CITYSCAPES"), "synthia", "train")


def test_run_folder_lock_names_its_holder_and_a_failed_start_leaves_no_trace(tmp_path):
    out = tmp_path / "a" / "b"
    lock, made = files.claim_folder(str(out))
    assert (out / ".lock").read_text() == f"{os.getpid()}\n"
    # a second open file of the lock is refused even within this process, naming the holder and what to do
    with pytest.raises(files.FlagError, match=rf"{re.escape(str(out))} is in use by another run: pid {os.getpid()} \(.*\), alive.*"
                                             rf"kill {os.getpid()}"):
        files.claim_folder(str(out))
    files.release_folder(lock, made)
    assert os.listdir(tmp_path) == []  # the lock file and both folders it made are gone
    out.mkdir(parents=True)
    (out / "log.jsonl").write_text('{"iter": 1}\n{"iter": 2')  # a folder with content, a line cut short
    lock, made = files.claim_folder(str(out))
    files.release_folder(lock, made)
    assert sorted(os.listdir(out)) == [".lock", "log.jsonl"] and files.read_log(str(out / "log.jsonl")) == [{"iter": 1}]
    lock, made = files.claim_folder(str(out))  # released: free again; its lock file is not this claim's
    assert made == []
    files.release_folder(lock, made)


def test_save_atomic_replaces_whole_and_a_failed_rename_leaves_no_temporary_file(tmp_path):
    path = tmp_path / "f.bin"
    files.save_atomic(str(path), lambda tmp: pathlib.Path(tmp).write_bytes(b"new"))
    assert path.read_bytes() == b"new" and os.listdir(tmp_path) == ["f.bin"]
    (tmp_path / "folder").mkdir()  # a file cannot replace a folder: the rename fails after the whole write
    with pytest.raises(IsADirectoryError):
        files.save_atomic(str(tmp_path / "folder"), lambda tmp: pathlib.Path(tmp).write_bytes(b"x" * 4096))
    assert sorted(os.listdir(tmp_path)) == ["f.bin", "folder"] and not os.listdir(tmp_path / "folder")


@pytest.mark.parametrize("cmdline, torchrun", [
    ("/venv/bin/python3 /venv/bin/torchrun --standalone --nproc_per_node=2 train.py --out run", True),
    ("python3 -u -X faulthandler -m torch.distributed.run --nproc_per_node=8 train.py", True),
    ("/usr/local/bin/torchrun train.py", True),
    ("python3 -m pytest -q test_ssr.py -k torchrun", False),  # a parent that only names it
    ("python3 -W ignore train.py --note torch.distributed.run", False),
    ("/sbin/init", False),
])
def test_a_torchrun_launcher_is_told_by_the_program_it_runs(cmdline, torchrun):
    assert files.runs_torchrun(cmdline.replace(" ", "\0").encode() + b"\0") == torchrun


def test_run_folder_waits_for_the_leftovers_of_a_killed_torchrun_only(tmp_path, capsys):
    """A holder of the lock that is a torchrun worker (TORCHELASTIC_RUN_ID in its environment) whose parent is no
    torchrun is a leftover of a killed torchrun, which saves and ends by itself: it is waited for, saying so in one
    line. Any other holder (a live run) is not: claim_folder refuses it at once."""
    out = tmp_path / "run"
    out.mkdir()
    hold = ("import fcntl, sys, time; f = open(sys.argv[1], 'a+'); fcntl.flock(f, fcntl.LOCK_EX); print(flush=True); "
            "time.sleep(float(sys.argv[2]))")
    for env, seconds in ((dict(os.environ, TORCHELASTIC_RUN_ID="x"), "1.5"), (dict(os.environ), "60")):
        holder = subprocess.Popen([sys.executable, "-c", hold, str(out / ".lock"), seconds], env=env,
                                  stdout=subprocess.PIPE, text=True)
        holder.stdout.readline()  # the lock is held
        try:
            leftover = "TORCHELASTIC_RUN_ID" in env
            assert files.launcher_gone(holder.pid) == leftover
            t = time.monotonic()
            files.wait_for_leftovers(str(out), say=True)
            said = capsys.readouterr().out
            if leftover:  # waited until it ended, not the 2 minutes
                assert holder.poll() is not None and time.monotonic() - t < 60
                assert said == (f"{out} is held by pid {holder.pid}, a worker of a torchrun that is gone: waiting for it "
                                f"to save its last iteration and end (at most 2 minutes)\n")
            else:
                assert holder.poll() is None and said == ""
                with pytest.raises(files.FlagError, match=f"in use by another run: pid {holder.pid}"):
                    files.claim_folder(str(out))
        finally:
            holder.kill()
            holder.wait()


# ==============================================================================================================
# eval.py and predict.py: the metric, the inference, the evaluator, released checkpoints, predictions of any folder
# ==============================================================================================================

_EVAL_FILE = os.path.join(_ROOT, "eval.py")
# Cityscapes label id of each train id, written out here so that the test does not trust data.py's table
_EVAL_LABEL_IDS = (7, 8, 11, 12, 13, 17, 19, 20, 21, 22, 23, 24, 25, 26, 27, 28, 31, 32, 33)


def _eval_tiny(seed: int = 0, **kw) -> ssr.Segmentor:
    torch.manual_seed(seed)
    return ssr.build_segmentor(dataclasses.replace(_TINY, **kw))


def _eval_forced(cls: int, **kw) -> ssr.Segmentor:
    """A segmentor that predicts `cls` everywhere: zero classifier weights, one-hot bias."""
    model = _eval_tiny(**kw)
    with torch.no_grad():
        model.decode_head.conv_seg.weight.zero_()
        model.decode_head.conv_seg.bias.zero_()[cls] = 1.0
    return model


def _eval_write_val(root, n: int = 3, size=(128, 64), labels: bool = True) -> np.ndarray:
    """A Cityscapes val tree as downloaded: leftImg8bit/val/<city>/<stem>_leftImg8bit.png and
    gtFine/val/<city>/<stem>_gtFine_labelIds.png (label ids; id 0 'unlabeled' -> ignored). Returns the train ids
    (n, H, W) with 255 where ignored. Only train ids 0..5 occur, so classes 6..18 are absent."""
    rng = np.random.default_rng(0)
    w, h = size
    train = rng.integers(0, 6, (n, h, w)).astype(np.uint8)
    train[:, : h // 8] = 255  # a band of ignored pixels
    train[0, -5:, -7:] = 5  # so that class 5 surely occurs
    to_id = np.zeros(256, np.uint8)
    to_id[:19] = _EVAL_LABEL_IDS
    for i in range(n):
        city = ("frankfurt", "lindau")[i % 2]
        stem = f"{city}_{i:06d}_000019"
        for d in ("leftImg8bit", "gtFine"):
            os.makedirs(os.path.join(root, "cityscapes", d, "val", city), exist_ok=True)
        img = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
        Image.fromarray(img).save(
            os.path.join(root, "cityscapes", "leftImg8bit", "val", city, f"{stem}_leftImg8bit.png"))
        if labels:
            Image.fromarray(to_id[train[i]]).save(
                os.path.join(root, "cityscapes", "gtFine", "val", city, f"{stem}_gtFine_labelIds.png"))
    return train


def _eval_expected(train: np.ndarray, cls: int) -> tuple[list[float], float]:
    """IoUs of predicting `cls` at every pixel, by hand: cls gets (its pixels) / (all valid pixels), every other
    class present in the labels gets 0, absent classes NaN; the mean runs over the present classes."""
    counts = np.bincount(train[train != 255].ravel(), minlength=19)
    iou = [counts[cls] / counts.sum() if c == cls else (0.0 if counts[c] else float("nan")) for c in range(19)]
    return iou, counts[cls] / counts.sum() / np.count_nonzero(counts)


# ----------------------------------------------------------------------------------------------------------------
# the metric


def test_metric_hand_made():
    label = torch.tensor([[0, 0, 1, 255],
                          [1, 2, 2, 255]])
    pred = torch.tensor([[0, 1, 1, 3],
                         [1, 2, 4, 0]])
    hist = ev.confusion(pred, label, 5)
    expected = torch.zeros(5, 5, dtype=torch.int64)
    for t, p in ((0, 0), (0, 1), (1, 1), (1, 1), (2, 2), (2, 4)):  # the 6 valid pixels; 255 drops (., 3), (., 0)
        expected[t, p] += 1
    assert torch.equal(hist, expected)
    iou, miou = ev.iou_from_confusion(hist)
    # class 0: 1 / (2 + 1 - 1); class 1: 2 / (2 + 3 - 2); class 2: 1 / (2 + 1 - 1); class 3: predicted only on an
    # ignored pixel -> empty union -> NaN, not counted; class 4: predicted, never present -> 0, counted
    assert iou[:3].tolist() == pytest.approx([1 / 2, 2 / 3, 1 / 2])
    assert iou[3].isnan() and iou[4] == 0
    assert miou == pytest.approx((1 / 2 + 2 / 3 + 1 / 2 + 0) / 4)


def test_metric_is_dataset_wide_not_per_image():
    # image a: a big correct road; image b: one pixel, wrong. Pooled, road is almost perfect; a per-image mean
    # would give the one-pixel image the weight of the big one.
    a_lbl, a_pred = torch.zeros(10, 10, dtype=torch.long), torch.zeros(10, 10, dtype=torch.long)
    b_lbl, b_pred = torch.zeros(1, 1, dtype=torch.long), torch.ones(1, 1, dtype=torch.long)
    hist = ev.confusion(a_pred, a_lbl, 2) + ev.confusion(b_pred, b_lbl, 2)
    assert torch.equal(hist, torch.tensor([[100, 1], [0, 0]]))
    iou, miou = ev.iou_from_confusion(hist)
    assert iou.tolist() == pytest.approx([100 / 101, 0.0]) and miou == pytest.approx(50 / 101)


def test_window_boxes_follow_mmseg():
    # 1024x512 image, 512 windows, stride 341: three windows, the last shifted back to end at the border
    assert predict.window_boxes(512, 1024, 512, 341) == [(0, 512, 0, 512), (0, 512, 341, 853), (0, 512, 512, 1024)]
    assert predict.window_boxes(128, 256, 512, 341) == [(0, 128, 0, 256)]  # smaller than a window: the whole image
    cover = torch.zeros(300, 700)
    for y1, y2, x1, x2 in predict.window_boxes(300, 700, 128, 85):
        assert (y2 - y1, x2 - x1) == (128, 128)
        cover[y1:y2, x1:x2] += 1
    assert cover.min() >= 1


def test_network_logits_pads_inputs_too_thin_for_mit():
    torch.manual_seed(0)
    model = ssr.build_segmentor(_TINY).eval()
    thin = torch.randn(1, 3, 18, 64)  # a 18-row grid of 1/4 is 5 rows: less than the first 8x8 spatial reduction
    with torch.no_grad():
        for mode in ("whole", "slide"):
            assert predict.network_logits(model, thin, mode, crop=32, stride=21).shape == (1, 19, 18, 64)
        wide = torch.randn(1, 3, 64, 96)  # large enough: exactly the model's logits, resized
        expected = F.interpolate(model(wide), size=(64, 96), mode="bilinear", align_corners=False)
        assert torch.equal(predict.network_logits(model, wide, "whole", crop=32, stride=21), expected)


# ----------------------------------------------------------------------------------------------------------------
# the evaluator


@pytest.mark.parametrize("mode, amp", [("whole", None), ("slide", torch.bfloat16)])
def test_forced_class_gives_hand_counted_miou(tmp_path, mode, amp):
    train = _eval_write_val(tmp_path)
    model = _eval_forced(2).train()
    loader = data.make_val_loader(str(tmp_path), scale=(64, 32), batch_size=2, workers=0)
    # network input 64x32, slide windows 32x32 every 21 pixels; labels counted at their full 128x64
    result = ev.evaluate(model, loader, device="cpu", amp_dtype=amp, mode=mode, crop=32, stride=21)
    iou, miou = _eval_expected(train, 2)
    assert result["miou"] == pytest.approx(miou, abs=1e-12)
    np.testing.assert_allclose(result["iou"], iou, atol=1e-12)  # NaN where expected NaN
    assert int(result["hist"].sum()) == int((train != 255).sum())
    assert result["images"] == 3 and result["images_per_s"] > 0
    assert model.training  # the caller's mode comes back


def test_saved_predictions_use_the_palette(tmp_path):
    train = _eval_write_val(tmp_path / "d", n=2)
    loader = data.make_val_loader(str(tmp_path / "d"), scale=(64, 32), batch_size=1, workers=0)
    out = tmp_path / "preds"
    ev.evaluate(_eval_forced(13), loader, device="cpu", save_dir=str(out), side_by_side=True)
    pred = Image.open(out / "frankfurt_000000_000019.png")
    assert pred.mode == "P" and pred.size == (128, 64)  # full label resolution
    assert pred.getpalette()[:57] == [c for rgb in data.PALETTE for c in rgb]
    assert (np.asarray(pred) == 13).all()
    assert set(map(tuple, np.asarray(pred.convert("RGB")).reshape(-1, 3))) == {(0, 0, 142)}  # car is (0, 0, 142)

    side = np.asarray(Image.open(out / "side_by_side" / "frankfurt_000000_000019.png"))
    assert side.shape == (32, 3 * 64, 3)  # image | ground truth | prediction at the network's scale
    src = np.asarray(Image.open(next((tmp_path / "d").rglob("frankfurt_000000_000019_leftImg8bit.png")))).astype(float)
    box = src.reshape(32, 2, 64, 2, 3).mean((1, 3))  # a 2x bilinear downscale with half-pixel centres = 2x2 mean
    assert np.abs(side[:, :64] - box).max() <= 1.0
    gt = [tuple(data.PALETTE[t]) if t != 255 else (0, 0, 0) for t in train[0, 1::2, 1::2].ravel()]
    assert list(map(tuple, side[:, 64:128].reshape(-1, 3))) == gt  # nearest from the centre: pixels 2i+1
    assert (side[:, 128:] == (0, 0, 142)).all()


# ----------------------------------------------------------------------------------------------------------------
# released mmseg checkpoints


class _EvalConfigDict(dict):
    """Stands for mmcv's Config objects in a checkpoint's meta: a dict subclass that is not importable there."""


class _EvalPayload:
    """A pickled object whose unpickling runs a shell command."""

    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def _eval_save_released(path, student, meta_extra=(), sd_extra=()) -> None:
    """torch.save in the layout of DAFormer's/MIC's released checkpoints."""
    sd = collections.OrderedDict()
    others = (("ema_model.", _eval_tiny(seed=1)), ("imnet_model.", _eval_tiny(seed=2)))  # differ from the student
    for prefix, model in (("model.", student), *others):
        sd.update((prefix + k, v) for k, v in model.state_dict().items())
    sd.update(sd_extra)
    meta = dict(mmseg_version="0.16.0", config="model = dict(type='EncoderDecoder')", CLASSES=data.CLASSES,
                PALETTE=[list(c) for c in data.PALETTE], iter=40000, seed=np.int64(0), mean=np.arange(3.0),
                cfg=_EvalConfigDict(norm_cfg=dict(type="BN")), **dict(meta_extra))
    torch.save(dict(meta=meta, state_dict=sd), path)


def test_convert_mmseg_round_trip(tmp_path):
    student = _eval_tiny(seed=0)
    src, dst = str(tmp_path / "released.pth"), str(tmp_path / "ours.safetensors")
    _eval_save_released(src, student)
    with pytest.raises(pickle.UnpicklingError):  # what the converter has to get around
        torch.load(src, weights_only=True)
    _, skipped = weights.convert(src, dst)
    assert f"{__name__}._EvalConfigDict" in skipped and any(s.endswith("multiarray._reconstruct") for s in skipped)
    model, meta = checkpoint.load_segmentor(dst)
    cfg = meta["cfg"]
    assert (cfg.num_classes, cfg.channels, tuple(cfg.mit["embed_dims"]), tuple(cfg.mit["depths"])) == (
        19, 32, (16, 32, 40, 64), (1, 1, 1, 1))
    assert meta["dataset"] == "cityscapes" and list(meta["test_scale"]) == [1024, 512]
    ours, theirs = model.state_dict(), student.state_dict()
    assert ours.keys() == theirs.keys()
    assert all(torch.equal(ours[k], theirs[k]) for k in theirs)  # the student, not the EMA teacher or ImageNet copy


@pytest.mark.parametrize("name", ["mit_b0", "mit_b5"])
def test_convert_infers_the_preset(name):
    with torch.device("meta"):  # shapes only: nothing is allocated
        model = ssr.build_segmentor(ssr.SegConfig(backbone=name))
    cfg = weights.config_from_state_dict(model.state_dict(), "test")
    assert (cfg.backbone, cfg.mit, cfg.num_classes, cfg.channels) == (name, {}, 19, 256)


def test_malicious_pickle_is_not_run(tmp_path):
    marker = tmp_path / "pwned"
    bad = str(tmp_path / "bad.pth")
    _eval_save_released(bad, _eval_tiny(), meta_extra={"hook": _EvalPayload(str(marker))})
    torch.load(bad, weights_only=False)  # the payload works when unpickled the unsafe way ...
    assert marker.exists()
    marker.unlink()
    _, skipped = weights.convert(bad, str(tmp_path / "out.safetensors"))  # ... and does not run here
    assert not marker.exists()
    assert f"{os.system.__module__}.system" in skipped
    # a payload in place of a weight is refused, and does not run either
    _eval_save_released(bad, _eval_tiny(), sd_extra={"model.backbone.evil": _EvalPayload(str(marker))})
    with pytest.raises(ValueError, match="model.backbone.evil|backbone.evil"):
        weights.convert(bad, str(tmp_path / "out2.safetensors"))
    assert not marker.exists()


def test_convert_cli_records_the_source_and_bad_inputs_are_one_paragraph(tmp_path, monkeypatch, capsys):
    def cli(*args) -> str:  # weights.py's __main__ in this process: the SystemExit message, '' when it succeeds
        monkeypatch.setattr(sys, "argv", ["weights.py", "convert", *args])
        try:
            runpy.run_path(os.path.join(_ROOT, "weights.py"), run_name="__main__")
        except SystemExit as e:
            return str(e.code)
        return ""

    src, dst = str(tmp_path / "released.pth"), str(tmp_path / "ours.safetensors")
    _eval_save_released(src, _eval_tiny())
    assert cli(src, dst, "--src", "synthia") == ""
    out = capsys.readouterr().out
    assert f"{src}: a DAFormer/MIC segmentor, a custom MiT (embed_dims=(16, 32, 40, 64), depths=" in out
    assert "skipped non-tensor objects without running them: " in out and out.endswith(f"wrote {dst}\n")
    assert checkpoint.load_segmentor(dst)[1]["source"] == "synthia"  # eval.py reports mIoU16 and mIoU13
    notmmseg = str(tmp_path / "plain.pth")
    torch.save({"weights": torch.zeros(3)}, notmmseg)
    for args, pattern in (((str(tmp_path / "nope.pth"), dst), r"nope.pth does not exist; pass one of: an NVlabs"),
                          ((notmmseg, dst), r"plain.pth holds no .* DAFormer/MIC segmentor \(it holds weights\)"),
                          ((notmmseg, str(tmp_path / "no" / "o.safetensors")), "does not exist; create it first"),
                          ((str(tmp_path / "nope.pth"), str(tmp_path)), "is a folder")):
        msg = cli(*args)
        assert msg.startswith("error: ") and re.search(pattern, msg) and "\n" not in msg, (args, msg)


# ----------------------------------------------------------------------------------------------------------------
# command line


@contextlib.contextmanager
def _stop_handlers_kept():
    """The handlers of the stop signals (files.STOPS) as they were before, whatever the body installs."""
    saved = {s: signal.getsignal(s) for s in files.STOPS}
    try:
        yield
    finally:
        for s, handler in saved.items():
            signal.signal(s, handler)


def _eval_cli(monkeypatch, *args) -> str:
    """Run eval.py's __main__ in this process; return the SystemExit message ('' when it ends normally). Its
    handlers of the stop signals are undone."""
    monkeypatch.setattr(sys, "argv", ["eval.py", *args])
    try:
        with _stop_handlers_kept():
            runpy.run_path(_EVAL_FILE, run_name="__main__")
    except SystemExit as e:
        return str(e.code)
    return ""


def test_cli_end_to_end(tmp_path):
    train = _eval_write_val(tmp_path)
    ckpt = str(tmp_path / "model.safetensors")
    checkpoint.save_segmentor(_eval_forced(0), ckpt, dataset="cityscapes", test_scale=[64, 32])
    out = subprocess.run([sys.executable, _EVAL_FILE, "--ckpt", ckpt, "--data-root", str(tmp_path), "--workers", "0",
                          "--save-dir", str(tmp_path / "preds")], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    lines = out.stdout.strip().splitlines()
    assert lines[0].split() == ["class", "IoU"] and lines[1].split()[0] == "road" and "images/s" in lines[-2]
    assert lines[-1] == f"mIoU: {100 * _eval_expected(train, 0)[1]:.2f}"
    assert len(list((tmp_path / "preds").glob("*.png"))) == 3


def test_cli_bad_input_is_one_clean_error(tmp_path):
    # in a real process: non-zero exit, a message, no traceback
    missing = str(tmp_path / "nope.safetensors")
    out = subprocess.run([sys.executable, _EVAL_FILE, "--ckpt", missing, "--data-root", str(tmp_path)],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode != 0 and "Traceback" not in out.stderr
    assert out.stderr.startswith("error:") and "nope.safetensors" in out.stderr


def test_cli_bad_inputs(tmp_path, monkeypatch):
    _eval_write_val(tmp_path / "nolabels", labels=False)
    _eval_write_val(tmp_path / "ok")
    good, k16, foreign = (str(tmp_path / f) for f in ("good.safetensors", "k16.safetensors", "foreign.safetensors"))
    checkpoint.save_segmentor(_eval_tiny(), good, dataset="cityscapes", test_scale=[64, 32])
    checkpoint.save_segmentor(_eval_tiny(num_classes=16), k16, dataset="cityscapes", test_scale=[64, 32])
    with open(foreign, "w") as f:
        f.write("not a checkpoint")
    run = tmp_path / "run"  # a train.py run folder, and one without a checkpoint
    os.makedirs(run / "debug")
    shutil.copy(good, run / "model.safetensors")
    cases = [
        (["--ckpt", foreign], "foreign.safetensors"),
        (["--ckpt", str(run)], rf"^error: --ckpt {re.escape(str(run))} is a folder; pass the checkpoint in it: "
                               rf"{re.escape(str(run / 'model.safetensors'))}\.$"),
        (["--ckpt", str(run / "debug")], r"debug is a folder and holds no .safetensors checkpoint; pass"),
        (["--ckpt", k16, "--data-root", str(tmp_path / "ok")], "16 classes"),
        (["--ckpt", good, "--data-root", str(tmp_path / "nolabels")], "gtFine|label"),
    ]
    for args, pattern in cases:
        msg = _eval_cli(monkeypatch, *args, "--workers", "0")
        assert msg.startswith("error:") and re.search(pattern, msg), (args, msg)
        assert "\n" not in msg.strip()  # one paragraph


def test_cli_synthia_checkpoint_reports_miou16_and_miou13(tmp_path, monkeypatch, capsys):
    train = _eval_write_val(tmp_path)
    train[0, -10:, :20] = 9  # terrain: in the labels, but not among SYNTHIA's 16 classes
    to_id = np.zeros(256, np.uint8)
    to_id[:19] = _EVAL_LABEL_IDS
    gt = tmp_path / "cityscapes/gtFine/val/frankfurt/frankfurt_000000_000019_gtFine_labelIds.png"
    Image.fromarray(to_id[train[0]]).save(gt)
    road = np.count_nonzero(train == 0) / np.count_nonzero(train != 255)  # IoU of road when predicted everywhere
    present = set(np.unique(train[train != 255]).tolist())  # every other present class has IoU 0
    assert present == {0, 1, 2, 3, 4, 5, 9}
    want = {"mIoU16": road / 6, "mIoU13": road / 3, "all19": road / 7}  # 16: without 9; 13: also without 3, 4, 5
    ckpts = {}
    for source in ("synthia", None):
        ckpts[source] = str(tmp_path / f"{source}.safetensors")
        checkpoint.save_segmentor(_eval_forced(0), ckpts[source], dataset="cityscapes", test_scale=[64, 32],
                           **({"source": source} if source else {}))
    for ckpt, extra in ((ckpts["synthia"], ()), (ckpts[None], ("--src", "synthia"))):
        assert _eval_cli(monkeypatch, "--ckpt", ckpt, "--data-root", str(tmp_path), "--workers", "0", *extra) == ""
        lines = capsys.readouterr().out.strip().splitlines()
        assert lines[-3:] == [f"mIoU16: {100 * want['mIoU16']:.2f}", f"mIoU13: {100 * want['mIoU13']:.2f}",
                              f"mIoU: {100 * want['mIoU16']:.2f}"]
    assert _eval_cli(monkeypatch, "--ckpt", ckpts[None], "--data-root", str(tmp_path), "--workers", "0") == ""
    lines = capsys.readouterr().out.strip().splitlines()  # no source recorded: GTA5's report, the 19-class mean
    assert lines[-1] == f"mIoU: {100 * want['all19']:.2f}" and not any("mIoU16" in l for l in lines)


@pytest.mark.parametrize("target", ["acdc", "darkzurich"])
def test_cli_acdc_and_dark_zurich_val_report_each_condition_then_all(tmp_path, monkeypatch, capsys, target):
    truth = _data_acdc(tmp_path) if target == "acdc" else {"night": _data_dark_zurich(tmp_path, n=2)}
    ckpt = str(tmp_path / "model.safetensors")  # the dataset train.py records, and a (small) test scale
    checkpoint.save_segmentor(_eval_forced(0), ckpt, dataset=target, test_scale=[48, 27])
    assert _eval_cli(monkeypatch, "--ckpt", ckpt, "--data-root", str(tmp_path), "--workers", "0") == ""
    lines = capsys.readouterr().out.strip().splitlines()
    overall = _eval_expected(np.concatenate([t.ravel() for t in truth.values()]), 0)[1]  # one histogram of all
    assert lines[-1] == f"mIoU: {100 * overall:.2f}" and f"{sum(map(len, truth.values()))} images," in lines[-2]
    if target == "acdc":  # each condition alone first; the conditions' means are not what the overall mean averages
        assert lines[:4] == [f"{c}: mIoU {100 * _eval_expected(truth[c], 0)[1]:.2f} (1 images)" for c in truth]
        assert _eval_cli(monkeypatch, "--ckpt", ckpt, "--data-root", str(tmp_path), "--workers", "0",
                         "--acdc-conditions", "night") == ""
        assert capsys.readouterr().out.strip().splitlines()[-1] == f"mIoU: {100 * _eval_expected(truth['night'], 0)[1]:.2f}"


def _eval_test_split(root, target) -> list[pathlib.Path]:
    """The test split as downloaded (no labels; Cityscapes' gtFine/test holds placeholders, never read); its
    images."""
    if target == "cityscapes":
        _data_cityscapes(root, "test", n=2, h=32, w=64)
        return sorted(root.glob("cityscapes/leftImg8bit/test/*/*_leftImg8bit.png"))
    if target == "acdc":
        _data_acdc(root, "test", labels=False)
        return sorted(root.glob("acdc/rgb_anon/*/test/*/*_rgb_anon.png"))
    _data_dark_zurich(root, "test", n=2, labels=False)
    return sorted(root.glob("dark_zurich/rgb_anon/test/night/*/*_rgb_anon.png"))


@pytest.mark.parametrize("target", ["cityscapes", "acdc", "darkzurich"])
def test_cli_test_split_is_written_as_each_server_reads_it(tmp_path, monkeypatch, capsys, target):
    images = _eval_test_split(tmp_path / "data", target)
    ckpt, out = str(tmp_path / "model.safetensors"), tmp_path / "submit"
    checkpoint.save_segmentor(_eval_forced(13), ckpt, dataset=target, test_scale=[48, 27])  # car everywhere
    cli = ("--ckpt", ckpt, "--data-root", str(tmp_path / "data"), "--workers", "0", "--split", "test",
           "--submit", str(out))
    assert _eval_cli(monkeypatch, *cli) == ""
    # Cityscapes: label ids at the top (its evaluation script walks every folder); ACDC: train ids in
    # labelTrainIds/; Dark Zurich: also labelTrainIds_invalid/ and 16-bit confidence/
    folders = {"cityscapes": ["."], "acdc": ["labelTrainIds"],
               "darkzurich": ["confidence", "labelTrainIds", "labelTrainIds_invalid"]}[target]
    written = sorted(p.relative_to(out) for p in out.rglob("*") if p.is_file())
    assert written == sorted(pathlib.Path(f, img.name) for f in folders for img in images)
    car = round(65535 * math.e / (math.e + 18))  # softmax of the one-hot logits: the forced class's probability
    for path in written:
        im = Image.open(out / path)
        image = next(img for img in images if img.name == path.name)
        assert im.size == Image.open(image).size  # each image's full size (ACDC's, Dark Zurich's: 1920x1080)
        values = np.unique(np.asarray(im)).tolist()
        if path.parts[0] == "confidence":
            assert im.mode.startswith("I") and len(values) == 1 and abs(values[0] - car) <= 1
        else:
            assert im.mode == "L" and values == [26 if target == "cityscapes" else 13]  # car: label id 26, train id 13
    for folder in folders:  # what the servers match: <city>_<seq>_<frame>*.png, <sequence>_frame_<frame>*.png
        for img in images:
            pattern = "_".join(img.name.split("_")[:3]) + "*.png"
            assert len([p for p in written if p.parent == pathlib.Path(folder) and fnmatch.fnmatch(p.name, pattern)]) == 1
    printed = capsys.readouterr().out.strip().splitlines()
    assert datasets.TARGETS[target]["server"] in printed[-2] and "test-split numbers" in printed[-2]
    if shutil.which("zip"):  # the printed line, run: the zip holds the predictions alone, at its top level
        subprocess.run(printed[-1], shell=True, check=True)
        with zipfile.ZipFile(str(out) + ".zip") as z:
            assert sorted(pathlib.Path(n) for n in z.namelist() if not n.endswith("/")) == written
    stale = out / folders[-1] / "GOPR9999_frame_000001_rgb_anon.png"  # an earlier run's image no longer predicted
    shutil.copy(out / written[-1], stale)
    assert _eval_cli(monkeypatch, *cli) == ""  # a second run replaces its own predictions, and removes the stale one
    assert sorted(p.relative_to(out) for p in out.rglob("*") if p.is_file()) == written
    # held for the run, on the folder itself (no lock file in what the server gets): a second submission into it
    # fails at once, and two never mix
    lock, made = files.claim_folder(str(out), "--submit", lock_file=False)
    msg = _eval_cli(monkeypatch, *cli)
    assert msg.startswith(f"error: --submit {out} is in use by another run: pid {os.getpid()} ("), msg
    files.release_folder(lock, made)
    assert sorted(p.relative_to(out) for p in out.rglob("*") if p.is_file()) == written


def test_cli_test_split_bad_input(tmp_path, monkeypatch):
    _data_dark_zurich(tmp_path / "data", "val")  # no test/: it is a download of its own
    ckpt = str(tmp_path / "model.safetensors")
    checkpoint.save_segmentor(_eval_forced(0), ckpt, dataset="darkzurich", test_scale=[48, 27])
    os.makedirs(tmp_path / "full")
    (tmp_path / "full" / "notes.txt").write_text("mine")
    submit = ("--split", "test", "--submit")
    cases = [
        (["--split", "test"], r"--split test and --submit DIR go together"),
        (["--submit", str(tmp_path / "s")], r"--split test and --submit DIR go together"),
        ([*submit, str(tmp_path / "s")], r"Dark Zurich split 'test' not found.*Dark_Zurich_test_anon_withoutGt.zip"),
        ([*submit, str(tmp_path / "full")], r"holds .*full.notes.txt, which eval.py --submit did not write"),
        (["--acdc-conditions", "night"], r"--acdc-conditions only applies to ACDC, and this evaluation is on darkzurich"),
        (["--tgt", "acdc", "--acdc-conditions", "fog,haze"], r"--acdc-conditions fog,haze: give distinct ACDC"),
    ]
    for args, pattern in cases:
        msg = _eval_cli(monkeypatch, "--ckpt", ckpt, "--data-root", str(tmp_path / "data"), "--workers", "0", *args)
        assert msg.startswith("error:") and re.search(pattern, msg) and "\n" not in msg.strip(), (args, msg)
    os.makedirs(tmp_path / "demo" / "cityscapes")  # the demo's world: what the error says is not a download to fetch
    (tmp_path / "demo" / "cityscapes" / demo.MARKER).write_text("")
    for args in (["--tgt", "cityscapes", *submit, str(tmp_path / "s")], ["--tgt", "acdc"]):
        msg = _eval_cli(monkeypatch, "--ckpt", ckpt, "--data-root", str(tmp_path / "demo"), "--workers", "0", *args)
        assert re.fullmatch(rf"error: \S+demo holds the demo's synthetic world: .* pass --data-root with the "
                            rf"downloaded {args[1]} dataset\.", msg.strip()), msg
    assert os.listdir(tmp_path / "full") == ["notes.txt"] and (tmp_path / "full" / "notes.txt").read_text() == "mine"
    assert not (tmp_path / "s").exists()  # a failed start leaves no trace: the folder it made is gone again


def test_cli_predicts_a_folder_of_own_images(tmp_path, monkeypatch, capsys):
    photos = tmp_path / "photos"
    os.makedirs(photos / "trip")
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 256, (30, 50, 3), dtype=np.uint8)).save(photos / "street.png")  # RGB
    Image.fromarray(rng.integers(0, 256, (41, 23), dtype=np.uint8)).save(photos / "gray.jpg")  # L, JPEG
    Image.fromarray(rng.integers(0, 256, (20, 70, 4), dtype=np.uint8)).save(photos / "trip" / "alpha.png")  # RGBA
    Image.fromarray(rng.integers(0, 8, (16, 16), dtype=np.uint8), mode="P").save(photos / "trip" / "pal.PNG")
    Image.fromarray(np.full((40, 60), 40000, np.uint16)).save(photos / "gray16.png")  # I;16: 40000 / 257 -> 156
    for suffix in ("webp", "bmp", "TIF", "tiff"):  # every format read; (lossless) WebP where Pillow has it
        Image.fromarray(rng.integers(0, 256, (12, 34, 3), dtype=np.uint8)).save(
            photos / f"fmt_{suffix}.{suffix}", **({"lossless": True} if suffix == "webp" else {}))
    Image.fromarray(np.linspace(0, 1.5, 64, dtype=np.float32).reshape(8, 8)).save(photos / "hdr.tif")  # F, > 1
    (photos / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    (photos / "notes.txt").write_text("not an image: left out, and named")
    ckpt = str(tmp_path / "m.safetensors")
    checkpoint.save_segmentor(_eval_forced(13), ckpt, dataset="cityscapes", test_scale=[64, 32])
    out = tmp_path / "preds"
    msg = _eval_cli(monkeypatch, "--ckpt", ckpt, "--images", str(photos), "--save-dir", str(out), "--side-by-side",
                    "--workers", "0")
    assert msg == ""
    captured = capsys.readouterr()
    assert re.search(r"skipped .*broken.jpg \(", captured.err) and "11/11 images" in captured.err
    lines = captured.out.splitlines()
    assert lines[0].startswith(f"wrote 9 predictions to {out}; skipped 2: ")
    assert f"{photos / 'hdr.tif'} (a float picture, mode F, with values from 0 to 1.5, outside the range 0..1" in lines[0]
    assert lines[1:] == [f"left out 1 file(s) that are not images ({'/'.join(predict.IMAGE_SUFFIXES)}): notes.txt"]
    assert ".webp" in predict.IMAGE_SUFFIXES  # this Pillow reads WebP (PIL.features.check("webp"))
    for name, size in (("street.png", (50, 30)), ("gray.png", (23, 41)), ("trip/alpha.png", (70, 20)),
                       ("trip/pal.png", (16, 16)), ("gray16.png", (60, 40)), ("fmt_webp.png", (34, 12)),
                       ("fmt_bmp.png", (34, 12)), ("fmt_TIF.png", (34, 12)), ("fmt_tiff.png", (34, 12))):
        pred = Image.open(out / name)
        assert pred.mode == "P" and pred.size == size and (np.asarray(pred) == 13).all(), name  # the image's size
        assert predict.own_output(str(out / name)), name  # written through save_atomic, OWN_MARK kept
    assert sorted(p.name for p in out.rglob("*.png") if "side_by_side" not in p.parts) == [
        "alpha.png", "fmt_TIF.png", "fmt_bmp.png", "fmt_tiff.png", "fmt_webp.png", "gray.png", "gray16.png",
        "pal.png", "street.png"]
    w16, h16 = data.rescale_size(60, 40, (64, 32))
    seen = np.asarray(Image.open(out / "side_by_side" / "gray16.png"))[:h16, :w16]  # the picture the network saw
    assert np.abs(seen.astype(int) - 156).max() <= 1  # scaled from 16 bits, not clipped to white
    side = Image.open(out / "side_by_side" / "street.png")
    w, h = data.rescale_size(50, 30, (64, 32))  # the network's scale: 53x32
    legend_h = 19 * pictures.LEGEND_CELL[1] + 4  # 2 * 53 px wide: one class per row
    assert side.size == (2 * w, h + legend_h)
    pixels = np.asarray(side)
    assert (pixels[:h, w:] == (0, 0, 142)).all()  # the prediction panel: car everywhere
    assert (pixels[h:] == (0, 0, 142)).all(-1).sum() >= 100  # car's swatch in the legend, 12x12 minus its outline
    assert (pixels[h:] == 0).all(-1).sum() > 19 * 20  # black text and outlines
    assert (out / "side_by_side" / "trip" / "alpha.png").is_file()


def _eval_photos(folder, sizes: dict) -> None:
    """Random RGB pictures under folder: sizes maps a relative path to (W, H)."""
    rng = np.random.default_rng(0)
    for name, (w, h) in sizes.items():
        os.makedirs(os.path.dirname(folder / name), exist_ok=True)
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(folder / name)


def _eval_files(root) -> dict:
    """Every file under root (symlinks followed) -> its bytes."""
    return {p: p.read_bytes() for p in pathlib.Path(root).rglob("*") if p.is_file()}


def test_cli_own_images_refuse_a_save_dir_that_holds_the_photos(tmp_path, monkeypatch):
    photos = tmp_path / "photos"
    _eval_photos(photos, {"street.png": (50, 30), "car.jpg": (50, 30), "trip/alpha.png": (20, 16)})
    os.symlink(photos, tmp_path / "link")  # the same folder under another name
    os.makedirs(tmp_path / "out")
    os.symlink(photos / "street.png", tmp_path / "out" / "street.png")  # an output path that is one of the photos
    ckpt = str(tmp_path / "m.safetensors")
    checkpoint.save_segmentor(_eval_forced(13), ckpt, dataset="cityscapes", test_scale=[64, 32])
    before = _eval_files(tmp_path)
    cases = [(photos, photos, r"photos is the --images folder"),  # street.png would be replaced by its prediction
             (photos, tmp_path / "link", r"link is the --images folder .*photos with symlinks followed"),
             (photos, photos / "trip", "trip is inside the --images folder"),
             (photos, photos / "preds", "preds is inside the --images folder"),
             (photos / "trip", photos, "photos holds the --images folder"),
             (photos, tmp_path / "out", r"out.street.png is the photo .*photos.street.png")]
    for images, save_dir, pattern in cases:
        for extra in ((), ("--side-by-side",)):
            msg = _eval_cli(monkeypatch, "--ckpt", ckpt, "--images", str(images), "--save-dir", str(save_dir),
                            "--workers", "0", *extra)
            assert msg.startswith("error: --save-dir") and re.search(pattern, msg) and "\n" not in msg, msg
            assert _eval_files(tmp_path) == before  # nothing written, nothing replaced
    assert not (photos / "preds").exists()
    msg = _eval_cli(monkeypatch, "--ckpt", str(tmp_path / "missing.safetensors"), "--images", str(photos),
                    "--save-dir", str(photos), "--workers", "0")
    assert "is the --images folder" in msg  # before the checkpoint is read
    # an unrelated folder is always fine, even beside the photos and with a similar name
    assert _eval_cli(monkeypatch, "--ckpt", ckpt, "--images", str(photos), "--save-dir", str(tmp_path / "photos2"),
                     "--workers", "0") == ""
    assert (tmp_path / "photos2" / "street.png").is_file()
    assert {p: b for p, b in _eval_files(tmp_path).items() if p.is_relative_to(photos)} == {
        p: b for p, b in before.items() if p.is_relative_to(photos)}


def test_cli_own_images_replace_their_own_predictions_and_nothing_else(tmp_path, monkeypatch, capsys):
    photos, out = tmp_path / "photos", tmp_path / "preds"
    _eval_photos(photos, {"street.png": (50, 30), "trip/alpha.png": (20, 16)})
    ckpts = {}
    for cls in (13, 0):
        ckpts[cls] = str(tmp_path / f"m{cls}.safetensors")
        checkpoint.save_segmentor(_eval_forced(cls), ckpts[cls], dataset="cityscapes", test_scale=[64, 32])
    run = lambda cls: _eval_cli(monkeypatch, "--ckpt", ckpts[cls], "--images", str(photos), "--save-dir", str(out),
                                "--side-by-side", "--workers", "0")  # noqa: E731
    assert run(13) == ""
    assert run(0) == ""  # a second run into the same folder replaces its own earlier predictions
    for name in ("street.png", "trip/alpha.png"):
        assert (np.asarray(Image.open(out / name)) == 0).all(), name
    assert (np.asarray(Image.open(out / "side_by_side" / "street.png"))[:32, 53:] == (128, 64, 128)).all()  # road
    capsys.readouterr()
    # a file of the user's at an output path (here a picture of the same name) is never replaced, nor any other file
    for foreign in (out / "trip" / "alpha.png", out / "side_by_side" / "street.png"):
        Image.fromarray(np.full((16, 20), 7, np.uint8)).save(foreign)
        before = _eval_files(out)
        msg = run(13)
        assert msg.startswith("error: --save-dir") and str(foreign) in msg and "\n" not in msg, msg
        assert "not a prediction that eval.py wrote" in msg
        assert _eval_files(out) == before
        foreign.unlink()
    assert run(13) == ""  # the user's files moved away: it writes again


def test_cli_own_images_predicts_thin_images_and_goes_on(tmp_path, monkeypatch, capsys):
    # 1x3000 at the test scale 64x32 is 0x64 by mmcv's rescale_size: its side is kept at 1 px (and padded for MiT)
    photos, out = tmp_path / "photos", tmp_path / "preds"
    _eval_photos(photos, {"1_tall.png": (1, 3000), "2_wide.png": (3000, 1), "3_street.png": (50, 30)})
    ckpt = str(tmp_path / "m.safetensors")
    checkpoint.save_segmentor(_eval_forced(13), ckpt, dataset="cityscapes", test_scale=[64, 32])
    msg = _eval_cli(monkeypatch, "--ckpt", ckpt, "--images", str(photos), "--save-dir", str(out), "--side-by-side",
                    "--workers", "0")
    assert msg == ""
    assert capsys.readouterr().out == f"wrote 3 predictions to {out}\n"
    for name, size in (("1_tall.png", (1, 3000)), ("2_wide.png", (3000, 1)), ("3_street.png", (50, 30))):
        pred = Image.open(out / name)
        assert pred.size == size and (np.asarray(pred) == 13).all(), name
        assert (out / "side_by_side" / name).is_file()


@contextlib.contextmanager
def _eval_deadline(seconds: int):
    """Fail, rather than hang, where the code inside waits forever (on a FIFO, say): SIGALRM interrupts the wait."""
    def expire(*_):
        pytest.fail(f"still running after {seconds} s")  # not an OSError, which the code under test may catch
    old = signal.signal(signal.SIGALRM, expire)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)


def test_cli_own_images_follow_symlinked_folders_once_and_leave_out_fifos(tmp_path, monkeypatch, capsys):
    photos, ext, out = tmp_path / "photos", tmp_path / "elsewhere" / "ext", tmp_path / "preds"
    _eval_photos(photos, {"a.png": (50, 30), "real/r.png": (20, 16)})
    _eval_photos(ext, {"far.png": (24, 18)})
    os.symlink(ext, photos / "ext")  # followed: its photos are predicted under photos/ext/
    os.symlink(photos, photos / "loop")  # a loop: left out
    os.symlink(photos / "real", photos / "again")  # a second way to real/: left out
    os.symlink(tmp_path / "missing.png", photos / "dangling.png")
    os.mkfifo(photos / "x.png")  # opening it would wait for a writer forever
    ckpt = str(tmp_path / "m.safetensors")
    checkpoint.save_segmentor(_eval_forced(13), ckpt, dataset="cityscapes", test_scale=[64, 32])
    run = lambda save_dir, *extra: _eval_cli(monkeypatch, "--ckpt", ckpt, "--images", str(photos), "--save-dir",
                                             str(save_dir), "--workers", "0", *extra)  # noqa: E731
    with _eval_deadline(60):
        assert run(out) == ""
    lines = capsys.readouterr().out.splitlines()
    assert lines == [f"wrote 3 predictions to {out}",
                     "left out 4 more, not read as photos: again (a symlink to the folder real, whose photos are read "
                     "there); dangling.png (a symlink to nothing); loop (a symlink to the folder ., whose photos are "
                     "read there); x.png (a FIFO, not a regular file)"]
    assert sorted(str(p.relative_to(out)) for p in out.rglob("*.png")) == ["a.png", "ext/far.png", "real/r.png"]
    # the folder a symlink leads to is held apart from --save-dir like the --images folder itself
    os.makedirs(tmp_path / "o2" / "ext")
    os.symlink(ext / "far.png", tmp_path / "o2" / "ext" / "far.png")  # an output path that is a photo via the link
    cases = [(ext / "preds", r"is inside .*elsewhere.ext, the folder that the symlink .*photos.ext leads to"),
             (tmp_path / "elsewhere", r"elsewhere holds .*elsewhere.ext, the folder that the symlink"),
             (tmp_path / "o2", r"the output .*o2.ext.far.png is the photo .*photos.ext.far.png through a symlink")]
    before = _eval_files(tmp_path / "elsewhere")
    for save_dir, pattern in cases:
        msg = run(save_dir)
        assert msg.startswith("error: --save-dir") and re.search(pattern, msg) and "\n" not in msg, msg
    assert _eval_files(tmp_path / "elsewhere") == before  # no photo replaced, nothing written beside them
    # a FIFO at an output path is refused, not opened
    (out / "a.png").unlink()
    os.mkfifo(out / "a.png")
    with _eval_deadline(60):
        msg = run(out)
    assert msg.startswith("error: --save-dir") and "a.png exists and is not a prediction" in msg, msg


def test_cli_own_images_stop_or_full_disk_say_what_is_written_and_no_file_is_half(tmp_path, monkeypatch, capsys):
    photos, out = tmp_path / "photos", tmp_path / "preds"
    _eval_photos(photos, {"1.png": (50, 30), "2.png": (50, 30), "3.png": (50, 30)})
    ckpts = {}
    for cls in (13, 0):
        ckpts[cls] = str(tmp_path / f"m{cls}.safetensors")
        checkpoint.save_segmentor(_eval_forced(cls), ckpts[cls], dataset="cityscapes", test_scale=[64, 32])
    run = lambda cls: _eval_cli(monkeypatch, "--ckpt", ckpts[cls], "--images", str(photos), "--save-dir", str(out),
                                "--workers", "0")  # noqa: E731
    assert run(13) == ""
    capsys.readouterr()
    firsts = _eval_files(out)
    save = Image.Image.save

    def fail_on_second(error):
        """Image.save, which on the second prediction writes half a file, then raises `error`."""
        calls = []

        def fake(im, fp, *args, **kw):
            calls.append(fp)
            if len(calls) == 2:
                with open(fp, "wb") as f:
                    f.write(b"\x89PNG\r\n\x1a\n half of a file")
                raise error
            return save(im, fp, *args, **kw)
        return fake

    def classes():
        return [int(np.asarray(Image.open(out / f"{i}.png"))[0, 0]) for i in (1, 2, 3)]

    # Ctrl-C in the middle of a write: the earlier prediction stays whole, and one line says what is written
    monkeypatch.setattr(Image.Image, "save", fail_on_second(KeyboardInterrupt()))
    assert run(0) == "130"
    assert capsys.readouterr().err.splitlines()[-1] == (
        f"stopped; 1 of 3 predictions are written to {out}, each one whole; the same command again writes them all.")
    assert classes() == [0, 13, 13] and _eval_files(out)[out / "2.png"] == firsts[out / "2.png"]
    # a full disk: one paragraph naming the folder and what is written
    monkeypatch.setattr(Image.Image, "save", fail_on_second(OSError(errno.ENOSPC, "No space left on device")))
    msg = run(0)
    assert msg == (f"error: the disk that holds --save-dir {out} is full: 1 of 3 predictions are written there, each "
                   f"one whole, and {out / '2.png'} is not (the earlier file there, if any, is untouched). Free some "
                   f"space there, then run the same command again: it replaces its own predictions.")
    assert classes() == [0, 13, 13] and _eval_files(out)[out / "2.png"] == firsts[out / "2.png"]
    monkeypatch.setattr(Image.Image, "save", save)
    # SIGTERM (a scheduler's stop) acts as Ctrl-C
    resize_image, reads = data.resize_image, []

    def term_on_second(*args):
        reads.append(args)
        if len(reads) == 2:
            os.kill(os.getpid(), signal.SIGTERM)
        return resize_image(*args)

    monkeypatch.setattr(data, "resize_image", term_on_second)
    assert run(13) == "130"
    assert "stopped; 1 of 3 predictions are written" in capsys.readouterr().err
    assert classes() == [13, 13, 13] and sorted(os.listdir(out)) == [".lock", "1.png", "2.png", "3.png"]  # no tmp
    # a stop of the evaluation (with labels) is one line too
    _eval_write_val(tmp_path / "val")
    monkeypatch.setattr(ev.F, "interpolate", lambda *a, **k: (_ for _ in ()).throw(KeyboardInterrupt()))
    assert _eval_cli(monkeypatch, "--ckpt", ckpts[0], "--data-root", str(tmp_path / "val"), "--workers", "0") == "130"
    err = capsys.readouterr().err
    assert err.startswith("stopped; no mIoU was printed") and "Traceback" not in err and err.count("\n") == 1


def test_cli_own_images_second_run_on_the_same_save_dir_fails_at_once(tmp_path, monkeypatch):
    photos, out = tmp_path / "photos", tmp_path / "preds"
    _eval_photos(photos, {"street.png": (50, 30)})
    ckpt = str(tmp_path / "m.safetensors")
    checkpoint.save_segmentor(_eval_forced(13), ckpt, dataset="cityscapes", test_scale=[64, 32])
    lock, made = files.claim_folder(str(out), "--save-dir")  # a run that holds the folder
    msg = _eval_cli(monkeypatch, "--ckpt", ckpt, "--images", str(photos), "--save-dir", str(out), "--workers", "0")
    assert msg.startswith(f"error: --save-dir {out} is in use by another run: pid {os.getpid()} (") and "\n" not in msg
    assert msg.endswith("or choose another --save-dir.") and not (out / "street.png").exists()
    files.release_folder(lock, made)
    assert _eval_cli(monkeypatch, "--ckpt", ckpt, "--images", str(photos), "--save-dir", str(out),
                     "--workers", "0") == ""  # free again; the run let it go at its end
    assert (out / "street.png").is_file()


def test_cli_labelled_save_dir_replaces_its_own_predictions_and_nothing_else(tmp_path, monkeypatch, capsys):
    root, out = tmp_path / "d", tmp_path / "preds"
    _eval_write_val(root, n=2)
    ckpts = {}
    for cls in (13, 0):
        ckpts[cls] = str(tmp_path / f"m{cls}.safetensors")
        checkpoint.save_segmentor(_eval_forced(cls), ckpts[cls], dataset="cityscapes", test_scale=[64, 32])
    run = lambda ckpt, save_dir=out: _eval_cli(monkeypatch, "--ckpt", ckpt, "--data-root", str(root), "--save-dir",
                                               str(save_dir), "--side-by-side", "--workers", "0")  # noqa: E731
    names = ["frankfurt_000000_000019.png", "lindau_000001_000019.png"]
    assert run(ckpts[13]) == "" and run(ckpts[0]) == ""  # the second run replaces the first one's predictions
    for name in names:
        assert (np.asarray(Image.open(out / name)) == 0).all() and predict.own_output(str(out / name))
        assert predict.own_output(str(out / "side_by_side" / name))
    capsys.readouterr()
    # a file of the user's at an output path is never replaced, nor is anything else written
    for foreign in (out / names[1], out / "side_by_side" / names[0]):
        Image.fromarray(np.full((64, 128), 7, np.uint8)).save(foreign)
        before = _eval_files(out)
        msg = run(ckpts[13])
        assert msg == (f"error: --save-dir: {foreign} exists and is not a prediction that eval.py wrote, so it is not "
                       f"replaced; move it away or pass another --save-dir."), msg
        assert _eval_files(out) == before and "mIoU" not in capsys.readouterr().out
        foreign.unlink()
    # held for the run: a second evaluation into it fails at once, before its (here missing) checkpoint is read
    lock, made = files.claim_folder(str(out), "--save-dir")
    msg = run(str(tmp_path / "missing.safetensors"))
    assert msg.startswith(f"error: --save-dir {out} is in use by another run: pid {os.getpid()} ("), msg
    files.release_folder(lock, made)
    # a failed start leaves no trace: the folder it made is gone again
    msg = run(str(tmp_path / "missing.safetensors"), tmp_path / "new" / "preds")
    assert msg.startswith("error: checkpoint") and not (tmp_path / "new").exists(), msg
    # two images of one name (in two cities' folders) would share one prediction file: refused, nothing written
    for kind, suffix in (("leftImg8bit", "_leftImg8bit.png"), ("gtFine", "_gtFine_labelIds.png")):
        val = root / "cityscapes" / kind / "val"
        shutil.copy(val / "frankfurt" / f"frankfurt_000000_000019{suffix}", val / "lindau")
    msg = run(ckpts[13], tmp_path / "twice")
    assert "would both be saved as frankfurt_000000_000019.png" in msg and "\n" not in msg, msg
    assert not any(p.suffix == ".png" for p in (tmp_path / "twice").rglob("*"))


def test_predict_images_names_and_skips_an_image_it_cannot_predict(tmp_path, monkeypatch, capsys):
    # out of memory for one photo (e.g. a huge one) costs that photo, not the ones after it
    photos, out = tmp_path / "photos", tmp_path / "preds"
    _eval_photos(photos, {"a_huge.png": (64, 32), "b_street.png": (50, 30)})
    network_logits = predict.network_logits

    def logits(net, img, *args):
        if img.shape[-1] == 64:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 99.00 GiB")
        return network_logits(net, img, *args)

    monkeypatch.setattr(predict, "network_logits", logits)
    written, skipped, left_out = predict.predict_images(_eval_forced(13), str(photos), str(out), device="cpu",
                                                   scale=(64, 32))
    assert written == 1 and len(skipped) == 1 and left_out == []
    assert re.fullmatch(r".*a_huge.png \(OutOfMemoryError .*64x32.*: CUDA out of memory. Tried .*\)", skipped[0])
    assert f"skipped {skipped[0]}" in capsys.readouterr().err
    assert (np.asarray(Image.open(out / "b_street.png")) == 13).all() and not (out / "a_huge.png").exists()


def test_cli_device_and_output_errors_come_before_any_slow_step(tmp_path, monkeypatch):
    missing = str(tmp_path / "missing.safetensors")  # the checkpoint would fail later: the flag must fail first
    (tmp_path / "file").write_text("a file where a folder must go")
    cases = [(["--save-dir", str(tmp_path / "file" / "preds")], r"--save-dir .*file.preds cannot be written \(Not a"),
             (["--save-dir", str(tmp_path / "file")], r"--save-dir .*file cannot be written \(it is a file\)"),
             (["--images", str(tmp_path)], "--images writes its predictions into --save-dir"),
             (["--device", "gpu0"], "--device gpu0: not a device name")]
    if not torch.cuda.is_available():
        cases.append((["--device", "cuda"], r"--device cuda: PyTorch sees no CUDA GPU .*use --device cpu"))
    for extra, pattern in cases:
        msg = _eval_cli(monkeypatch, "--ckpt", missing, "--workers", "0", *extra)
        assert msg.startswith("error:") and re.search(pattern, msg) and "\n" not in msg, (extra, msg)


def test_cli_keeps_the_traceback_of_a_bug(tmp_path, monkeypatch):
    _eval_write_val(tmp_path)
    ckpt = str(tmp_path / "m.safetensors")
    checkpoint.save_segmentor(_eval_tiny(), ckpt, dataset="cityscapes", test_scale=[64, 32])
    monkeypatch.setattr(ev.F, "interpolate", lambda *a, **k: (_ for _ in ()).throw(ValueError("a bug")))
    with pytest.raises(ValueError, match="a bug"):  # not turned into an 'error:' line
        _eval_cli(monkeypatch, "--ckpt", ckpt, "--data-root", str(tmp_path), "--workers", "0")


# ==============================================================================================================
# train.py: the training program end to end
# ==============================================================================================================



@pytest.fixture(scope="module")
def _train_root(tmp_path_factory):
    """A small tree of the synthetic domains, in the GTA5 and Cityscapes layouts, where --demo looks for it, and
    stand-ins for the cached toy teacher and toy ImageNet encoder (random weights) in a private SSR_CACHE, which
    the runs inherit."""
    root = str(tmp_path_factory.mktemp("train") / "demo")
    demo.write_data(root, seed=0, n_src=12, n_tgt=12, n_val=4)
    cache = str(tmp_path_factory.mktemp("cache"))
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("SSR_CACHE", cache)
        toys.save_teacher(toys.teacher_encoder(), toys.teacher_path())
        toys.save_mit(toys.demo_mit(), toys.imagenet_path())
        yield root


def _train_cmd(root, out, *extra, torchrun=None):
    """train.py on the demo path with a smaller crop and SAM input, so that one iteration takes a fraction of a second."""
    # --standalone: a free port of its own, where the default one (29500) is shared by every torchrun on the machine
    launch = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={torchrun}"] \
        if torchrun else [sys.executable]
    return launch + [os.path.join(_ROOT, "train.py"), "--demo", "--data-root", root, "--out", str(out), "--crop", "64",
                     "--sam-img-size", "64", "--workers", "0", "--log-every", "1", *extra]


def _train_run(cmd):
    env = dict(os.environ, OMP_NUM_THREADS="1")  # several processes share 2 cores
    return subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=_ROOT, timeout=300)


@pytest.mark.parametrize("method", ["ssr", "dacs", "source-only"])
def test_train_each_method_end_to_end(_train_root, tmp_path, monkeypatch, capsys, method):
    extra = ["--mic"] if method == "dacs" else []
    assert _train_inprocess(monkeypatch, *_train_tiny(_train_root, tmp_path, "--method", method, "--iters", "3",
                                                      *extra)) == ""
    assert "target mIoU:" in capsys.readouterr().out
    sd = load_file(tmp_path / "model.safetensors")
    # the deployable model: backbone and head only, whatever the method trained with
    assert sd and all(k.startswith(("backbone.", "decode_head.")) for k in sd)
    state = torch.load(tmp_path / "train_state.pt", weights_only=True)
    assert state["iter"] == 3
    assert any(k.startswith("ssr.") for k in state["uda"]) == (method == "ssr")
    assert any(k.startswith("ema.") for k in state["uda"]) == (method != "source-only")
    logged = [line for line in open(tmp_path / "log.jsonl")]
    assert len(logged) == 4  # 3 progress lines and the final evaluation


def test_train_from_synthia_records_the_source(_train_root, tmp_path, monkeypatch, capsys):
    root = tmp_path / "data"
    os.makedirs(root)
    os.symlink(os.path.join(_train_root, "cityscapes"), root / "cityscapes")  # the demo's target, in its layout
    _data_synthia(root, n=6, h=144, w=256)
    monkeypatch.setitem(datasets.SOURCES, "synthia", dict(datasets.SOURCES["synthia"], scale=(256, 144)))
    monkeypatch.setitem(datasets.TARGETS, "cityscapes", dict(datasets.TARGETS["cityscapes"], scale=(128, 64)))
    monkeypatch.setenv("SSR_CACHE", str(tmp_path / "cache"))
    assert _train_inprocess(monkeypatch, "--src", "synthia", "--method", "source-only", "--pretrained", "none",
                            "--backbone", "mit_b0", "--crop", "64", "--workers", "0", "--iters", "2",
                            "--eval-every", "0", "--data-root", str(root), "--out", str(tmp_path / "run")) == ""
    assert "rare-class statistics of 6 labels" in capsys.readouterr().out
    assert checkpoint.load_segmentor(str(tmp_path / "run" / "model.safetensors"))[1]["source"] == "synthia"


@pytest.fixture(scope="module")
def _benchmark_root(tmp_path_factory):
    """Cityscapes train (gtFine label ids), ACDC train and val (all four conditions) and Dark Zurich train and val,
    each in the layout its archives unzip to."""
    root = tmp_path_factory.mktemp("benchmarks")
    _data_cityscapes(root, "train", n=4, h=64, w=128)
    _data_acdc(root, "train", labels=False)
    _data_acdc(root, "val")
    _data_dark_zurich(root, "train", n=2, labels=False)
    _data_dark_zurich(root, "val")
    return root


@pytest.mark.parametrize("tgt, method, extra, val_images", [
    ("acdc", "ssr", ["--mic"], 4), ("darkzurich", "ssr", ["--mic"], 1),  # ssr runs every piece of dacs too
    ("acdc", "source-only", ["--acdc-conditions", "fog,night"], 2)])
def test_train_cityscapes_to_acdc_and_dark_zurich_end_to_end(_benchmark_root, tmp_path, monkeypatch, capsys, tgt,
                                                              method, extra, val_images):
    # the benchmark's scales made small (the tables are the one place train.py reads them from); the listing, the
    # header checks, the loaders, the model and the final evaluation on the target's val set are a real run's
    monkeypatch.setitem(datasets.SOURCES, "cityscapes", dict(datasets.SOURCES["cityscapes"], scale=(128, 64)))
    monkeypatch.setitem(datasets.TARGETS, tgt, dict(datasets.TARGETS[tgt], scale=(128, 72)))
    monkeypatch.setenv("SSR_CACHE", str(tmp_path / "cache"))
    out = tmp_path / "run"
    msg = _train_inprocess(monkeypatch, "--src", "cityscapes", "--tgt", tgt, "--method", method, "--pretrained", "none",
                           "--sam-weights", "none", "--backbone", "mit_b0", "--crop", "64", "--sam-img-size", "64",
                           "--workers", "0", "--iters", "2", "--batch-size", "1", "--eval-every", "0",
                           "--data-root", str(_benchmark_root),
                           "--out", str(out), *extra)
    assert msg == ""
    printed = capsys.readouterr().out
    assert "rare-class statistics of 4 labels" in printed and f"\n{val_images} images, " in printed
    meta = checkpoint.load_segmentor(str(out / "model.safetensors"))[1]
    assert (meta["dataset"], meta["source"], meta["test_scale"]) == (tgt, "cityscapes", [128, 72])
    conditions = extra[1].split(",") if "--acdc-conditions" in extra else list(datasets.ACDC_CONDITIONS)
    assert meta.get("acdc_conditions") == (conditions if tgt == "acdc" else None)
    assert any(k.startswith("ssr.") for k in _train_state(out)["uda"]) == (method == "ssr")


def test_train_stops_cleanly_after_ten_nonfinite_losses(_train_root, tmp_path, monkeypatch, capsys):
    # a learning rate that blows the weights up in the first step: every later loss is inf or nan
    msg = _train_inprocess(monkeypatch, *_train_tiny(_train_root, tmp_path, "--method", "dacs", "--iters", "30",
                                                     "--lr", "1e38"))
    assert msg.startswith("error: the loss was not finite for 10 iterations in a row"), msg
    assert "No checkpoint was written yet." in msg and not (tmp_path / "train_state.pt").exists()
    assert "skipped 9" in capsys.readouterr().out  # the steps were skipped, not taken, before the stop


@pytest.mark.parametrize("amp", ["bf16", "fp16"])
def test_train_mixed_precision_path_runs_on_cpu(_train_root, tmp_path, monkeypatch, capsys, amp):
    """The GPU's path on the CPU's autocast: student under autocast, SAM and EMA teachers in the reduced dtype,
    fp16 with a GradScaler. The losses stay finite, and the saved weights and optimizer state stay fp32 but the
    frozen ImageNet copy's Linear and Conv2d weights, which are kept in the reduced dtype (cast_frozen_weights)."""
    assert _train_inprocess(monkeypatch, *_train_tiny(_train_root, tmp_path, "--method", "ssr", "--mic", "--iters",
                                                      "2", "--amp", amp)) == ""
    assert f"1 x cpu, {amp}" in capsys.readouterr().out
    logged = [json.loads(line) for line in open(tmp_path / "log.jsonl") if '"src"' in line]
    assert len(logged) == 2 and all(math.isfinite(v) for e in logged for v in e.values()) and logged[-1]["skipped"] == 0
    saved = list(load_file(tmp_path / "model.safetensors").values())
    state = torch.load(tmp_path / "train_state.pt", weights_only=True)
    low = {k for k, v in state["uda"].items() if v.is_floating_point() and v.dtype != torch.float32}
    assert low == {k for k in state["uda"] if k.startswith("imnet.") and "norm" not in k}, low
    assert all(state["uda"][k].dtype == {"bf16": torch.bfloat16, "fp16": torch.float16}[amp] for k in low)
    assert all(v.dtype == torch.float32 for v in saved if v.is_floating_point())
    assert all(t.dtype == torch.float32 for s in state["optimizer"]["state"].values() for t in s.values()
               if t.is_floating_point() and t.dim() > 0)
    assert bool(state["scaler"]) == (amp == "fp16")  # a GradScaler only for fp16


def test_train_resume_is_bit_identical(_train_root, tmp_path):
    """A run stopped by SIGHUP (its terminal closed; SIGTERM is torchrun's test) somewhere in the middle and
    resumed ends with exactly the weights of a run that was never stopped. Where it stops does not matter, so the
    race of the signal with the loop is harmless."""
    common = ["--method", "ssr", "--iters", "10", "--eval-every", "0", "--save-every", "100"]
    ref, cut = tmp_path / "ref", tmp_path / "cut"
    assert _train_run(_train_cmd(_train_root, ref, *common)).returncode == 0

    env = dict(os.environ, OMP_NUM_THREADS="1")
    # the cut run draws debug panels at every iteration: they change neither the random stream nor the losses
    hup = signal.signal(signal.SIGHUP, signal.SIG_DFL)  # the run's, even if this suite runs under nohup
    try:
        proc = subprocess.Popen(_train_cmd(_train_root, cut, *common, "--debug-every", "1"), stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True, env=env, cwd=_ROOT)
    finally:
        signal.signal(signal.SIGHUP, hup)
    for line in proc.stdout:
        if line.startswith("iter 2/"):
            proc.send_signal(signal.SIGHUP)
            break
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 130, err
    assert "stopped at iteration" in out
    stopped = torch.load(cut / "train_state.pt", weights_only=True)["iter"]
    assert 2 <= stopped < 10

    r = _train_run(_train_cmd(_train_root, cut, *common, "--resume"))
    assert r.returncode == 0, r.stderr
    assert f"resuming {cut} at iteration {stopped}" in r.stdout
    # panels: source, label, prediction, SAM-enhanced prediction / target, pseudo-label, confidence / mixed, label
    panels = sorted(os.listdir(cut / "debug"))
    assert panels[0] == "iter_000001.png" and len(panels) == 10
    assert Image.open(cut / "debug" / "iter_000010.png").size == (4 * 64, 3 * (64 + pictures.CAPTION))
    assert not (ref / "debug").exists() and Image.open(cut / "curves.png").size == (960, 320)
    a, b = load_file(ref / "model.safetensors"), load_file(cut / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    # the optimizer and teacher state agree too, not only the student
    sa, sb = (torch.load(d / "train_state.pt", weights_only=True) for d in (ref, cut))
    assert all(torch.equal(sa["uda"][k], sb["uda"][k]) for k in sa["uda"])


def test_train_torchrun_two_cpu_processes_agree(_train_root, tmp_path):
    r = _train_run(_train_cmd(_train_root, tmp_path, "--method", "dacs", "--iters", "3", "--eval-every", "0", torchrun=2))
    assert r.returncode == 0, r.stderr
    assert "ranks agree on the weights: True" in r.stdout
    assert "1 x cpu" not in r.stdout and "2 x cpu" in r.stdout


def _train_inprocess(monkeypatch, *argv) -> str:
    """Run train.py in this process (fast: no new interpreter, and monkeypatch reaches inside it): the message a
    user sees ('error: ...' as train.py's excepthook prints it, or a SystemExit's), or '' when the run ends
    normally. The exit functions it registers (the lock's release) run at its end, as at a real exit, and its
    signal handlers and excepthook are undone."""
    monkeypatch.setattr(sys, "argv", ["train.py", *argv])
    at_exit = []
    monkeypatch.setattr(atexit, "register", lambda fn, *a, **k: at_exit.append(lambda: fn(*a, **k)))
    hook = sys.excepthook
    try:
        with _stop_handlers_kept():
            runpy.run_path(os.path.join(_ROOT, "train.py"), run_name="__main__")
    except SystemExit as e:
        return str(e.code)
    except files.UserError as e:
        return f"error: {e}"
    finally:
        for fn in reversed(at_exit):
            fn()
        sys.excepthook = hook
    return ""


def _train_tiny(root, out, *extra) -> list[str]:
    """The arguments of _train_cmd, for _train_inprocess."""
    return ["--demo", "--data-root", str(root), "--out", str(out), "--crop", "64", "--sam-img-size", "64",
            "--workers", "0", "--log-every", "1", "--eval-every", "0", *extra]


def _train_state(out) -> dict:
    return torch.load(os.path.join(out, "train_state.pt"), weights_only=True)


@pytest.mark.parametrize("argv, expect", [
    (["--pretrained", "none", "--method", "ssr"], "--sam-weights"),
    (["--sam-weights", "none"], "--pretrained is required"),
    (["--pretrained", "none", "--method", "dacs", "--sam-weights", "sam.safetensors"], "only used by --method ssr"),
    (["--pretrained", "none", "--method", "dacs", "--crop", "1024"], "--crop 1024"),
    (["--pretrained", "none", "--method", "dacs", "--ssr-stages", "0,4"], "--ssr-stages"),
    (["--pretrained", "none", "--method", "dacs", "--ssr-stages", "0,x"], "--ssr-stages"),
    (["--pretrained", "none", "--method", "dacs", "--resume", "--out", "{tmp}/nothing"], "--resume"),
    (["--pretrained", "{tmp}/missing.safetensors", "--backbone", "mit_b0", "--method", "dacs", "--data-root", "{root}",
      "--out", "{tmp}/a"], "missing.safetensors"),
    (["--pretrained", "none", "--backbone", "mit_b0", "--method", "dacs", "--data-root", "{tmp}/no-data",
      "--out", "{tmp}/a/b/c"], "gta5"),
    (["--demo", "--data-root", "{root}", "--out", "{tmp}/afile/run"], "--out {tmp}/afile/run cannot be written"),
])
def test_train_bad_input_is_one_clear_error(_train_root, tmp_path, monkeypatch, argv, expect):
    (tmp_path / "afile").write_text("")
    argv = [a.format(tmp=tmp_path, root=_train_root) for a in argv]
    msg = _train_inprocess(monkeypatch, *argv)
    assert msg.startswith("error: ") and expect.format(tmp=tmp_path) in msg, msg
    assert "Traceback" not in msg and "\n" not in msg.strip()
    assert sorted(os.listdir(tmp_path)) == ["afile"]  # a failed start leaves no run folder behind


@pytest.mark.parametrize("flags, expect", [
    (["--sam-img-size", "0"], "--sam-img-size 0"),
    (["--sam-img-size", "-16"], "--sam-img-size -16"),
    (["--sam-img-size", "100"], "multiple of 16"),
    (["--crop", "0"], "--crop 0: the crop must be a positive multiple of 32"),
    (["--log-every", "-1"], "cannot be negative"),
    (["--lr", "-1"], "--lr must be positive"),
    (["--warmup", "-5"], "--warmup at least 0"),
    (["--save-every", "-5"], "cannot be negative"),
    (["--data-root", "{tmp}/afile"], "--data-root {tmp}/afile is a file"),
    (["--src", "cityscapes"], "--src and --tgt are both cityscapes"),
    (["--acdc-conditions", "night"], "--acdc-conditions only applies to --tgt acdc, not to --tgt cityscapes"),
    (["--tgt", "acdc", "--acdc-conditions", "fog,haze"], "--acdc-conditions fog,haze: give distinct ACDC conditions"),
    *[(["--cuda-graphs"], "--cuda-graphs: PyTorch sees no CUDA GPU")] * (not torch.cuda.is_available()),
    (["--tgt", "acdc"], "--demo with --src gta5 --tgt acdc: the demo's world has a GTA5-like source"),
    (["--method", "dacs", "--ssr-context", "zeros"], "--ssr-context zeros: only --method ssr has SAM's branch"),
    (["--method", "source-only", "--ssr-stages", "1,2", "--ssr-context", "shuffled"],
     "--ssr-stages 1,2 and --ssr-context shuffled: only --method ssr has SAM's branch, not --method source-only"),
    (["--method", "source-only", "--mic"], "--mic trains on the EMA teacher's pseudo-labels, which --method"),
    (["--src", "synthia"], "--demo with --src synthia --tgt cityscapes"),
    (["--backbone", "mit_b5", "--sam", "vit_l"], "--backbone and --sam given: --backbone and --sam size the real MiT"),
])
def test_train_every_flag_is_checked_before_anything_is_written(tmp_path, monkeypatch, flags, expect):
    # the demo would write its data under --data-root and the run folder under runs/: neither may appear
    (tmp_path / "afile").write_text("")
    monkeypatch.chdir(tmp_path)
    msg = _train_inprocess(monkeypatch, "--demo", "--data-root", str(tmp_path / "demo"),
                           *[f.format(tmp=tmp_path) for f in flags])
    assert msg.startswith("error: ") and expect.format(tmp=tmp_path) in msg and "\n" not in msg.strip(), msg
    assert sorted(os.listdir(tmp_path)) == ["afile"]


def test_train_target_oracle_is_source_only_on_the_targets_own_labels(_train_root, tmp_path, monkeypatch, capsys):
    """--src cityscapes --method source-only: the target oracle, UDA's upper bound (the demo's study runs it); it
    reads the target's train labels at the target's scale, and is evaluated on the target's val set."""
    out = tmp_path / "oracle"
    assert _train_inprocess(monkeypatch, *_train_tiny(_train_root, out, "--method", "source-only", "--src",
                                                       "cityscapes", "--iters", "2")) == ""
    config = json.loads((out / "config.json").read_text())
    assert config["src"] == config["tgt"] == "cityscapes" and config["method"] == "source-only"
    assert "target mIoU" in capsys.readouterr().out


def test_train_zero_intervals_mean_at_the_end(_train_root, tmp_path, monkeypatch):
    # --log-every 0 and --save-every 0, like --eval-every 0: only at the end; and the state and the model follow
    # the user's umask, both of them (safetensors alone would write the model 0600)
    old = os.umask(0o027)
    try:
        msg = _train_inprocess(monkeypatch, *_train_tiny(_train_root, tmp_path / "run", "--method", "source-only",
                                                         "--iters", "2", "--log-every", "0", "--save-every", "0"))
    finally:
        os.umask(old)
    assert msg == ""
    logged = [json.loads(line) for line in open(tmp_path / "run" / "log.jsonl")]
    assert [e["iter"] for e in logged] == [2, 2] and "miou" in logged[1]
    assert _train_state(tmp_path / "run")["iter"] == 2
    for f in ("train_state.pt", "model.safetensors"):
        assert (tmp_path / "run" / f).stat().st_mode & 0o777 == 0o640, f
    # the run folder explains itself: config.json holds every flag; the logged loss is the interval's mean
    config = json.load(open(tmp_path / "run" / "config.json"))
    assert config["log_every"] == 0 and config["method"] == "source-only" and config["out"] == str(tmp_path / "run")
    flags = re.findall(r'add_argument\("--([\w-]+)"', open(os.path.join(_ROOT, "train.py")).read())
    assert sorted(config) == sorted([f.replace("-", "_") for f in flags] + ["run_id"])  # every flag, and the id
    assert _train_inprocess(monkeypatch, *_train_tiny(_train_root, tmp_path / "each", "--method", "source-only",
                                                      "--iters", "2")) == ""
    each = [json.loads(line) for line in open(tmp_path / "each" / "log.jsonl") if '"src"' in line]
    assert logged[0]["src"] == pytest.approx((each[0]["src"] + each[1]["src"]) / 2, rel=1e-6)
    assert logged[0]["elapsed_s"] > 0


def test_train_help_shows_every_default(monkeypatch, capsys):
    assert _train_inprocess(monkeypatch, "--help") == "0"
    text = " ".join(capsys.readouterr().out.split())
    assert "(default: 40000)" in text and "(default: mit_b5)" in text and "python train.py --demo" in text


def test_train_default_run_folder_names_the_seed(_train_root, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    msg = _train_inprocess(monkeypatch, "--demo", "--data-root", _train_root, "--seed", "3", "--resume")
    assert os.path.join("runs", "demo_seed3", "train_state.pt") in msg
    msg = _train_inprocess(monkeypatch, "--pretrained", "none", "--method", "dacs", "--mic", "--resume")
    assert os.path.join("runs", "gta52cityscapes_dacs_mic_mit_b5_seed0", "train_state.pt") in msg


def test_train_second_run_on_the_same_folder_fails_at_once(_train_root, tmp_path, monkeypatch):
    out = tmp_path / "run"
    env = dict(os.environ, OMP_NUM_THREADS="1")
    first = subprocess.Popen(_train_cmd(_train_root, out, "--method", "source-only", "--iters", "100000",
                                        "--eval-every", "0", "--save-every", "0"),
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=_ROOT)
    try:
        for line in first.stdout:
            if line.startswith("iter 1/"):
                break
        msg = _train_inprocess(monkeypatch, *_train_tiny(_train_root, out, "--method", "source-only", "--iters", "1"))
        # the holder by pid and command line, and what to do
        assert msg.startswith("error: ") and f"{out} is in use by another run: pid {first.pid} (" in msg, msg
        assert "train.py" in msg and "alive" in msg and f"kill {first.pid}" in msg and "\n" not in msg, msg
    finally:
        first.kill()  # SIGKILL: no handler runs, the OS releases the lock
        first.communicate(timeout=60)
    # the folder is free again; it holds no train_state.pt (nothing was saved), so a new run may start there
    assert _train_inprocess(monkeypatch, *_train_tiny(_train_root, out, "--method", "source-only", "--iters", "1")) == ""
    assert _train_state(out)["iter"] == 1


def _train_copy_root(src, dst) -> str:
    import shutil
    shutil.copytree(src, dst)
    return str(dst)


def test_train_checks_every_file_from_its_header_before_training(_train_root, tmp_path, monkeypatch):
    root = _train_copy_root(_train_root, tmp_path / "data")
    lbl = sorted(pathlib.Path(root, "gta5", "labels").glob("*.png"))[3]
    Image.new("P", (64, 64)).save(lbl)  # another aspect ratio than its 384x216 image
    built = []
    monkeypatch.setattr(ssr, "build_segmentor", lambda *a, **k: built.append(1))
    msg = _train_inprocess(monkeypatch, *_train_tiny(root, tmp_path / "run", "--iters", "2"))
    assert msg.startswith("error: label ") and str(lbl) in msg and "aspect" in msg, msg
    assert not built and not (tmp_path / "run").exists()  # found before any model was built; no folder left
    # the header check itself: exact sizes for val, the aspect within datasets.SIZE_TOLERANCE for train, PNGs only
    val = datasets.list_dataset(root, "cityscapes", "val")
    datasets.check_samples(val, "val")
    Image.new("L", (256, 128)).save(val[1].lbl)  # the val image's aspect, but not its size
    with pytest.raises(DatasetError, match=re.escape(val[1].lbl)):
        datasets.check_samples(val, "val")
    datasets.check_samples([datasets.Sample(val[1].img, val[1].lbl)], "train")
    pathlib.Path(val[2].img).write_bytes(b"GIF89a" + bytes(30))
    with pytest.raises(DatasetError, match="not a PNG"):
        datasets.check_samples(val[2:], "val")
    os.remove(val[3].img)
    with pytest.raises(DatasetError, match=re.escape(val[3].img)):
        datasets.check_samples(val[3:], "val")


@pytest.mark.parametrize("where", ["train", "eval"])
def test_train_data_error_mid_run_saves_the_state_first(_train_root, tmp_path, monkeypatch, where):
    """A file found truncated after the up-front check (a training image at the fourth batch, or a val label at the
    first evaluation): the state of the last finished iteration is saved, the error is one paragraph, and
    --resume continues once the file is repaired."""
    root = _train_copy_root(_train_root, tmp_path / "data")
    out = tmp_path / "run"
    check, read_image = datasets.check_samples, data.read_image
    val_label = datasets.list_dataset(root, "cityscapes", "val")[0].lbl
    original = {}

    def truncate(path):
        original[path] = pathlib.Path(path).read_bytes()
        pathlib.Path(path).write_bytes(original[path][:100])

    if where == "eval":  # truncated right after the up-front check of the val set
        monkeypatch.setattr(datasets, "check_samples", lambda s, what: (check(s, what), what == "val" and truncate(val_label)))
    else:  # each batch of 2 reads 4 images; the 13th read is the fourth batch's, fetched during iteration 3
        calls = []

        def read_truncated(path):
            calls.append(path)
            if len(calls) == 13:
                truncate(path)
            return read_image(path)
        monkeypatch.setattr(data, "read_image", read_truncated)
    every = "2" if where == "eval" else "0"  # no evaluation reads images before the 13th training read
    msg = _train_inprocess(monkeypatch, *_train_tiny(root, out, "--iters", "6", "--eval-every", every))
    path, = original
    assert msg.startswith("error: cannot read ") and path in msg and "--resume" in msg and "\n" not in msg, msg
    stopped = 3 if where == "train" else 2
    assert f"state at iteration {stopped} is saved" in msg and _train_state(out)["iter"] == stopped
    monkeypatch.undo()
    pathlib.Path(path).write_bytes(original[path])
    assert _train_inprocess(monkeypatch, "--resume", "--out", str(out), "--data-root", root) == ""
    assert _train_state(out)["iter"] == 6
    logged = [json.loads(line) for line in open(out / "log.jsonl")]
    assert {"resume": stopped} in logged  # the lines that follow it replace those of the same iterations


def test_train_resume_takes_the_saved_flags_and_refuses_contradictions(_train_root, tmp_path, monkeypatch):
    out = tmp_path / "run"
    assert _train_inprocess(monkeypatch, *_train_tiny(_train_root, out, "--method", "dacs", "--iters", "2")) == ""
    for flags, expect in [(["--method", "ssr"], "--method ssr (saved: dacs)"),
                          (["--crop", "32", "--batch-size", "1"], "--crop 32 (saved: 64), --batch-size 1 (saved: 2)"),
                          (["--mic"], "--mic True (saved: False)"), (["--seed", "1"], "--seed 1 (saved: 0)")]:
        msg = _train_inprocess(monkeypatch, "--resume", "--out", str(out), *flags)
        assert msg.startswith("error: --resume: ") and expect in msg and "\n" not in msg, msg
    msg = _train_inprocess(monkeypatch, "--resume", "--out", str(out))
    assert "finished already (2 of 2 iterations)" in msg
    msg = _train_inprocess(monkeypatch, *_train_tiny(_train_root, out, "--method", "dacs", "--iters", "2"))
    assert msg == f"error: {out} already holds a run (train_state.pt). Continue it with --resume, or choose another --out."
    # only --iters given: crop 64, SAM input 64, dacs, workers 0 ... come from the saved run
    assert _train_inprocess(monkeypatch, "--resume", "--out", str(out), "--iters", "3") == ""
    state = _train_state(out)
    assert state["iter"] == 3 and json.loads(state["args"])["crop"] == 64
    # a truncated and a foreign train_state.pt
    whole = (out / "train_state.pt").read_bytes()
    for content, expect in [(whole[: len(whole) // 2], "cannot read"), (None, "not a train_state.pt")]:
        if content is None:
            torch.save({"weights": torch.zeros(3)}, out / "train_state.pt")
        else:
            (out / "train_state.pt").write_bytes(content)
        msg = _train_inprocess(monkeypatch, "--resume", "--out", str(out), "--iters", "4")
        assert msg.startswith("error: --resume: ") and expect in msg and "train_state.pt" in msg, msg
        assert "\n" not in msg.strip()


def test_train_refuses_a_state_of_another_run_and_resumes_a_moved_folder(_train_root, tmp_path, monkeypatch):
    """A train_state.pt copied in from another run is refused, naming both runs, and nothing of the folder's own run
    is touched; a whole folder moved elsewhere still resumes (the run id, not the path, ties its files)."""
    a, b = tmp_path / "a", tmp_path / "b"
    assert _train_inprocess(monkeypatch, *_train_tiny(_train_root, a, "--method", "source-only", "--iters", "3")) == ""
    assert _train_inprocess(monkeypatch, *_train_tiny(_train_root, b, "--method", "source-only", "--iters", "2")) == ""
    shutil.copytree(b, tmp_path / "moved")
    before = {f: (b / f).read_bytes() for f in ("model.safetensors", "config.json")}
    shutil.copy(a / "train_state.pt", b / "train_state.pt")
    msg = _train_inprocess(monkeypatch, "--resume", "--out", str(b), "--iters", "5")
    ids = [json.load(open(d / "config.json"))["run_id"] for d in (a, b)]
    assert msg.startswith("error: --resume: the files in ") and all(i in msg for i in ids) and "\n" not in msg, msg
    assert all((b / f).read_bytes() == v for f, v in before.items())
    assert _train_inprocess(monkeypatch, "--resume", "--out", str(tmp_path / "moved"), "--iters", "3") == ""
    assert _train_state(tmp_path / "moved")["iter"] == 3
    assert checkpoint.load_segmentor(str(tmp_path / "moved" / "model.safetensors"))[1]["run_id"] == ids[1]
    # a file that cannot be read is said to be so, and why, not "of another run"
    (tmp_path / "moved" / "config.json").unlink()
    (tmp_path / "moved" / "config.json").mkdir()
    msg = _train_inprocess(monkeypatch, "--resume", "--out", str(tmp_path / "moved"), "--iters", "4")
    assert msg == (f"error: --resume: {tmp_path / 'moved' / 'config.json'} cannot be read (a folder, not a file), so "
                   f"nothing tells whether it belongs to this run. Move it out of {tmp_path / 'moved'} (the run writes "
                   f"it anew) and resume again."), msg


def test_train_out_inside_a_dataset_folder_is_refused(_train_root, tmp_path, monkeypatch):
    out = os.path.join(_train_root, "gta5", "images", "run")
    msg = _train_inprocess(monkeypatch, *_train_tiny(_train_root, out, "--iters", "1"))
    assert msg.startswith(f"error: --out {out} lies inside the dataset folder") and "\n" not in msg, msg
    assert not os.path.exists(out)


def test_train_a_deleted_log_does_not_stop_the_run(_train_root, tmp_path):
    out = tmp_path / "run"
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.Popen(_train_cmd(_train_root, out, "--method", "source-only", "--iters", "6", "--eval-every",
                                       "3"), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=_ROOT)
    for line in proc.stdout:
        if line.startswith("iter 2/"):  # iteration 1's line is in the log by now
            os.remove(out / "log.jsonl")
            break
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err
    logged = [json.loads(line) for line in open(out / "log.jsonl")]
    assert logged[-1] == {"iter": 6, "miou": logged[-1]["miou"]} and (out / "curves.png").is_file()


def test_train_a_model_one_save_behind_its_state_is_noted_and_written_again(_train_root, tmp_path, monkeypatch,
                                                                           capsys):
    """A kill between the two renames of a save (the state's first) leaves model.safetensors one save behind
    train_state.pt: eval.py evaluates it with a one-line note, --resume writes it again from the state, even for a
    finished run (which it then refuses to continue)."""
    out = tmp_path / "run"
    assert _train_inprocess(monkeypatch, *_train_tiny(_train_root, out, "--method", "source-only", "--iters", "1")) == ""
    behind = (out / "model.safetensors").read_bytes()
    assert _train_inprocess(monkeypatch, "--resume", "--out", str(out), "--iters", "2") == ""
    model, meta = checkpoint.load_segmentor(str(out / "model.safetensors"))
    current = {k: v.clone() for k, v in model.state_dict().items()}  # a copy: the file is mapped, then rewritten
    (out / "model.safetensors").write_bytes(behind)  # the state of iteration 2 beside the model of iteration 1
    capsys.readouterr()
    assert _eval_cli(monkeypatch, "--ckpt", str(out / "model.safetensors"), "--workers", "0") == ""
    note, = [line for line in capsys.readouterr().err.splitlines() if line.startswith("note:")]  # one line
    assert note.startswith(f"note: {out / 'model.safetensors'} is of iteration 1 but {out / 'train_state.pt'} of "
                           f"iteration 2") and "--resume" in note, note
    msg = _train_inprocess(monkeypatch, "--resume", "--out", str(out))
    assert "finished already (2 of 2 iterations)" in msg, msg
    again, again_meta = checkpoint.load_segmentor(str(out / "model.safetensors"))  # as the save of iteration 2 wrote it
    assert again_meta == meta and meta["iters"] == 2 and all(torch.equal(v, current[k]) for k, v in again.state_dict().items())
    capsys.readouterr()
    _eval_cli(monkeypatch, "--ckpt", str(out / "model.safetensors"), "--workers", "0")
    assert "note:" not in capsys.readouterr().err


@pytest.mark.parametrize("device", ["cuda", "cpu"])
def test_train_out_of_memory_in_the_step_is_one_paragraph(_train_root, tmp_path, monkeypatch, device):
    """The device's allocator failing in the step (injected at the forward of iteration 4; a GPU raises
    torch.OutOfMemoryError, the CPU's allocator a RuntimeError): one paragraph naming what to lower, and nothing
    lost but the work since the last checkpoint."""
    forward, calls = ssr.UDA.forward, []

    def exhausted(self, *a, **k):
        calls.append(1)
        if len(calls) == 4:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB") if device == "cuda" else \
                RuntimeError("[enforce fail at alloc_cpu.cpp:117] data. DefaultCPUAllocator: can't allocate memory: "
                             "you tried to allocate 2147483648 bytes. Error code 12 (Cannot allocate memory)")
        return forward(self, *a, **k)
    monkeypatch.setattr(ssr.UDA, "forward", exhausted)
    out = tmp_path / "run"
    msg = _train_inprocess(monkeypatch, *_train_tiny(_train_root, out, "--method", "source-only", "--iters", "6",
                                                     "--save-every", "2"))
    assert msg.startswith("error: out of memory on cpu in the step of iteration 4: lower --batch-size (now 2), "
                          "--crop (64) or --sam-img-size (64)") and "--grad-checkpoint" in msg, msg
    assert f"The last checkpoint, of iteration 2, is {out / 'train_state.pt'}." in msg and "\n" not in msg
    assert _train_state(out)["iter"] == 2


def test_train_full_disk_is_one_error_and_the_checkpoint_pair_stays_of_one_iteration(_train_root, tmp_path,
                                                                                      monkeypatch):
    """A 60 MB tmpfs holds the first checkpoint (model and state, about 40 MB) but not a second one beside it."""
    disk = tmp_path / "disk"
    disk.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=60m", "tmpfs", str(disk)], capture_output=True).returncode:
        pytest.skip("mounting a tmpfs needs root")
    try:
        out = disk / "run"
        msg = _train_inprocess(monkeypatch, *_train_tiny(_train_root, out, "--method", "dacs", "--iters", "6",
                                                         "--save-every", "2"))
        assert msg.startswith("error:") and "\n" not in msg, msg
        assert f"the disk that holds {out} is full" in msg and "the checkpoint of iteration 2" in msg, msg
        saved = checkpoint.load_segmentor(str(out / "model.safetensors"))[1]["iters"]
        assert _train_state(out)["iter"] == saved == 2  # the pair of one iteration
        assert not [f for f in os.listdir(out) if f.endswith(".tmp")]  # nothing half-written left
    finally:
        subprocess.run(["umount", str(disk)])


@pytest.mark.parametrize("how", ["SIGTERM", "SIGHUP", "Ctrl-C"])
def test_train_stop_before_the_loop_leaves_nothing_and_says_one_line(tmp_path, how):
    """A stop while the demo writes its data: no traceback (nor the pool workers'), no half dataset folder, no run
    folder; the exit status is Ctrl-C's. The run starts with SIGINT ignored, as a shell without job control starts
    a job given with & (this suite, run so, too): it stops on Ctrl-C all the same (processes.start)."""
    root, out = tmp_path / "data", tmp_path / "run"
    env = dict(os.environ, OMP_NUM_THREADS="1", SSR_CACHE=str(tmp_path / "cache"))
    cmd = [sys.executable, os.path.join(_ROOT, "train.py"), "--demo", "--method", "dacs", "--data-root", str(root),
           "--out", str(out)]
    # inherited by the run: SIGINT ignored; SIGHUP not, even if this suite runs under nohup
    with _stop_handlers_kept():
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGHUP, signal.SIG_DFL)
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=_ROOT,
                                start_new_session=True)
    try:
        for line in proc.stdout:
            if line.startswith("writing the synthetic demo domains"):
                time.sleep(1)  # the pool is drawing scenes
                if how in ("SIGTERM", "SIGHUP"):
                    proc.send_signal(getattr(signal, how))
                else:  # a terminal sends SIGINT to the whole foreground group, pool workers included
                    os.killpg(proc.pid, signal.SIGINT)
                break
        _, err = proc.communicate(timeout=120)
    finally:  # a run that failed to stop does not load the machine for the rest of the suite
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode in (130, -signal.SIGINT) and err.strip() == "stopped before training began; nothing was saved", err
    assert not root.exists() and not out.exists()


def test_train_started_under_nohup_keeps_sighup_ignored():
    """nohup starts a run with SIGHUP ignored so that it outlives its terminal: neither the set-up's stops nor the
    loop's take that away; SIGINT and SIGTERM are caught all the same."""
    with _stop_handlers_kept():
        for ignored in (True, False):
            signal.signal(signal.SIGHUP, signal.SIG_IGN if ignored else signal.SIG_DFL)
            signal.signal(signal.SIGTERM, signal.SIG_DFL)
            processes.stops_interrupt()
            assert (signal.getsignal(signal.SIGHUP) == signal.SIG_IGN) == ignored
            assert signal.getsignal(signal.SIGTERM) == processes.stop_as_interrupt
            processes.catch_stops()
            assert (signal.getsignal(signal.SIGHUP) == signal.SIG_IGN) == ignored
            assert signal.getsignal(signal.SIGTERM) not in (signal.SIG_DFL, processes.stop_as_interrupt)


def test_train_bug_keeps_its_traceback(_train_root, tmp_path, monkeypatch):
    # a ValueError that is no user error (here: from inside the step) is not turned into an "error:" line
    def broken(self, *a, **k):
        raise ValueError("a bug in the step")
    monkeypatch.setattr(ssr.UDA, "forward", broken)
    with pytest.raises(ValueError, match="a bug in the step"):
        _train_inprocess(monkeypatch, *_train_tiny(_train_root, tmp_path / "run", "--iters", "2"))


def test_train_the_end_of_a_run_tears_its_loop_group_down_while_python_still_runs(tmp_path):
    """processes.end destroys the loop's process group itself: its threads end there. Left to the interpreter's
    shutdown (DDP's logger held the reducer, which holds the group), a thread of it could be ended mid-way and the
    rank aborted ("terminate called without an active exception"): 3 of about 21 torchrun runs ending on the
    non-finite-loss error did, under load; none of 30 after. In a process of its own: a group DDP touched outlives
    destroy_process_group in torch (the default one here), and nothing of this test should outlive it."""
    script = """if True:
        import os, sys, time, torch, torch.distributed as dist, processes
        def loops():  # gloo's worker threads, 2 per group; each names itself once started
            time.sleep(0.5)
            names = [open(f"/proc/self/task/{t}/comm").read() for t in os.listdir("/proc/self/task")]
            return sum("pt_gloo_runloop" in name for name in names)
        dist.init_process_group("gloo", init_method="file://" + sys.argv[1], rank=0, world_size=1)
        alone = loops()
        world = processes.World(0, 1, torch.device("cpu"), "unused", dist.new_group(), 0)
        model = processes.wrap(world, torch.nn.Linear(4, 4))
        model(torch.randn(2, 4)).sum().backward()
        both = loops()
        processes.end(world)
        print(alone, both, loops(), flush=True)
    """
    r = subprocess.run([sys.executable, "-c", script, str(tmp_path / "store")], cwd=_ROOT, capture_output=True,
                       text=True, timeout=60, env=dict(os.environ, OMP_NUM_THREADS="1"))
    counts = r.stdout.splitlines()[-1].split() if r.stdout else []  # torch 2.8's gloo prints a line per group first
    assert len(counts) == 3, r.stderr
    alone, both, after = map(int, counts)
    if both == 0:  # not even the DDP group's threads are named (the default group's may not be yet, under load)
        pytest.skip(f"torch {torch.__version__} does not name gloo's threads, which this test counts")
    assert both > alone and after <= alone, (alone, both, after)


def test_train_an_error_raised_on_every_rank_keeps_its_type_and_says_what_is_saved(tmp_path):
    world = processes.World(0, 1, torch.device("cpu"), str(tmp_path / "train_state.pt"))
    with pytest.raises(DatasetError, match=r"^cannot read x\. The state at iteration 3 is saved in .*train_state\.pt"):
        processes.raise_everywhere(world, DatasetError("cannot read x."), saved=3)
    with pytest.raises(files.DiskFull, match=r"^full\.$"):
        processes.raise_everywhere(world, files.DiskFull("full."))


_TORCHRUN_COMMON = ["--method", "ssr", "--iters", "8", "--eval-every", "0", "--save-every", "2"]


@pytest.fixture(scope="module")
def _torchrun_reference(_train_root, tmp_path_factory):
    """An uninterrupted two-process run, for the interrupted ones to end equal to."""
    ref = tmp_path_factory.mktemp("torchrun") / "ref"
    r = _train_run(_train_cmd(_train_root, ref, *_TORCHRUN_COMMON, torchrun=2))
    assert r.returncode == 0, r.stderr
    return _train_state(ref)


@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGTERM])
def test_train_torchrun_launcher_killed_or_stopped_resumes_bit_identical(_train_root, _torchrun_reference, tmp_path,
                                                                       sig):
    """Two gloo processes; the signal goes to the torchrun process alone, after a save. torch starts each worker
    in its own session, so a SIGKILL of torchrun never reaches them: they learn of it from the kernel (the death
    signal) and, like after a SIGTERM that torchrun forwards, finish the iteration, save and exit. After the SIGKILL
    the run is resumed at once, as a user would: it waits for those leftovers to save and end. Within 90 s no
    worker is left, and the resumed run ends bit-identical to the uninterrupted one, each rank with its own random
    stream back."""
    cut = tmp_path / "cut"
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.Popen(_train_cmd(_train_root, cut, *_TORCHRUN_COMMON, torchrun=2), stdout=subprocess.PIPE,
                            stderr=subprocess.DEVNULL, text=True, env=env, cwd=_ROOT)
    for line in proc.stdout:
        if line.startswith("iter 3/"):  # the save of iteration 2 is complete
            workers = [int(p) for p in pathlib.Path(f"/proc/{proc.pid}/task/{proc.pid}/children").read_text().split()]
            proc.send_signal(sig)
            break
    resume = _train_cmd(_train_root, cut, *_TORCHRUN_COMMON, "--resume", torchrun=2)
    if sig == signal.SIGKILL:  # while the orphans still finish their iteration and save
        resumed = subprocess.Popen(resume, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=_ROOT)

    def running(pid):  # a zombie (ended, not yet reaped by its new parent) runs nothing and holds no lock
        try:
            return pathlib.Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
        except OSError:
            return False

    deadline = time.time() + 90
    try:  # the workers share torchrun's stdout: it closes when the last of them has let it go
        rest, _ = proc.communicate(timeout=90)
        while any(running(w) for w in workers) and time.time() < deadline:
            time.sleep(0.2)
    finally:
        alive = [w for w in workers if running(w)]
        for w in alive:  # orphans (the fault this test guards against) must not outlive it
            os.kill(w, signal.SIGKILL)
    assert len(workers) == 2 and not alive  # no orphan left
    assert "stopped at iteration" in rest  # the stop was saved, not lost
    stopped = _train_state(cut)["iter"]
    assert 3 <= stopped < 8
    if sig == signal.SIGKILL:
        out, err = resumed.communicate(timeout=300)
        assert resumed.returncode == 0, err
    else:
        r = _train_run(resume)
        out, err = r.stdout, r.stderr
        assert r.returncode == 0, err
    assert f"resuming {cut} at iteration {stopped}" in out  # the leftovers' last save, not the one before
    sa, sb = _torchrun_reference, _train_state(cut)
    assert len(sb["rng"]) == 2 and not torch.equal(sb["rng"][0]["cpu"], sb["rng"][1]["cpu"])
    assert sa["uda"].keys() == sb["uda"].keys() and all(torch.equal(sa["uda"][k], sb["uda"][k]) for k in sa["uda"])
    oa, ob = sa["optimizer"]["state"], sb["optimizer"]["state"]
    assert all(torch.equal(oa[i][k], ob[i][k]) for i in oa for k in oa[i])
    assert all(torch.equal(a["cpu"], b["cpu"]) for a, b in zip(sa["rng"], sb["rng"]))
    if sig == signal.SIGKILL:  # on another number of processes the run continues, and says that it will not match
        r = _train_run(_train_cmd(_train_root, cut, "--resume", "--iters", "9"))
        assert r.returncode == 0, r.stderr
        assert "saved by 2 processes and continues on 1" in r.stdout


def test_train_torchrun_one_worker_killed_is_one_error_and_the_last_checkpoint_stays(_train_root, tmp_path):
    """A SIGKILL of one worker: its peer learns of it inside DDP's backward (gloo reports a RuntimeError there) and
    stops with one paragraph, not a traceback; the work since the last save is lost, nothing more."""
    out = tmp_path / "run"
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.Popen(_train_cmd(_train_root, out, "--method", "dacs", "--iters", "400", "--eval-every", "0",
                                       "--save-every", "2", torchrun=2), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=env, cwd=_ROOT)
    for line in proc.stdout:
        if line.startswith("iter 3/"):  # the save of iteration 2 is complete
            workers = [int(p) for p in pathlib.Path(f"/proc/{proc.pid}/task/{proc.pid}/children").read_text().split()]
            rank1 = next(w for w in workers if b"RANK=1" in pathlib.Path(f"/proc/{w}/environ").read_bytes().split(b"\0"))
            os.kill(rank1, signal.SIGKILL)
            break
    _, err = proc.communicate(timeout=90)
    lost = [line for line in err.splitlines() if line.startswith("error: another process of this run stopped")]
    assert len(lost) == 1 and "rank 0 stops too" in lost[0] and "is intact" in lost[0], err
    assert 'train.py", line' not in err  # no traceback from the surviving worker
    assert _train_state(out)["iter"] >= 2


@pytest.mark.parametrize("case", ["no data", "folder in use", "loss not finite"])
def test_train_torchrun_user_error_is_one_paragraph_and_every_rank_exits_with_1(_train_root, tmp_path, case):
    """A user error under torchrun, before the loop (rank 0's set-up: no datasets; the run folder held by a live
    run) or inside it (the 10th non-finite loss, on every rank): the paragraph once, no traceback from a worker, and
    every rank leaves with status 1, none killed by a signal (an abort at exit, or torchrun's SIGTERM to a
    straggler)."""
    out = tmp_path / "run"
    if case == "no data":  # found by rank 0 after the process group and the run folder were set up
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
               os.path.join(_ROOT, "train.py"), "--pretrained", "none", "--backbone", "mit_b0", "--method", "dacs",
               "--workers", "0", "--data-root", str(tmp_path / "no-data"), "--out", str(out)]
    else:
        extra = ["--lr", "1e38", "--iters", "30"] if case == "loss not finite" else []
        cmd = _train_cmd(_train_root, out, "--method", "dacs", "--eval-every", "0", *extra, torchrun=2)
    holder = None
    if case == "folder in use":
        out.mkdir()
        holder = subprocess.Popen([sys.executable, "-c", "import fcntl, sys, time; f = open(sys.argv[1], 'a+'); "
                                   "fcntl.flock(f, fcntl.LOCK_EX); print(flush=True); time.sleep(60)", str(out / ".lock")],
                                  stdout=subprocess.PIPE, text=True)
        holder.stdout.readline()
    try:
        r = _train_run(cmd)
    finally:
        if holder:
            holder.kill()
            holder.wait()
    errors = [line for line in r.stderr.splitlines() if line.startswith("error:")]
    expect = {"no data": "gta5", "folder in use": "is in use by another run", "loss not finite": "not finite"}[case]
    assert r.returncode == 1 and len(errors) == 1 and expect in errors[0], r.stderr
    assert 'train.py", line' not in r.stderr  # no traceback from a worker (torchrun prints its own summary)
    assert re.findall(r"^ +exitcode +: (-?\d+)", r.stderr, re.M) == ["1", "1"], r.stderr  # torchrun's summary
    assert os.path.exists(out) == (case != "no data")  # a failed start leaves no folder


# ==============================================================================================================
# demo.py, toys.py, study.py: the toy world and its data writer, the toy pretrainings, the study
# ==============================================================================================================

def test_demo_data_is_read_by_the_same_loaders(tmp_path):
    demo.write_data(str(tmp_path), seed=0, n_src=8, n_tgt=4, n_val=4)
    assert sorted(os.listdir(tmp_path)) == ["cityscapes", "gta5"]  # written aside, then moved in whole
    assert Image.open(tmp_path / "gta5/labels/00001.png").mode == "P"
    assert Image.open(tmp_path / "gta5/images/00001.png").size == (384, 216)
    gt = sorted(os.listdir(tmp_path / "cityscapes/gtFine/val/frankfurt"))
    assert gt == ["frankfurt_000000_000019_gtFine_color.png", "frankfurt_000000_000019_gtFine_labelIds.png",
                  "frankfurt_000001_000019_gtFine_color.png", "frankfurt_000001_000019_gtFine_labelIds.png"]
    sizes = {k: demo.CONFIG[k] for k in ("src_scale", "tgt_scale", "crop", "rcs_min_pixels")}
    batch = next(data.make_train_loader(str(tmp_path), batch_size=2, workers=0, cache_dir=str(tmp_path / "c"),
                                        **sizes))
    crop = demo.CONFIG["crop"]
    assert batch["src_img"].shape == batch["tgt_img"].shape == (2, 3, crop, crop)
    val = list(data.make_val_loader(str(tmp_path), scale=demo.CONFIG["tgt_scale"], batch_size=2, workers=0))
    assert len(val) == 2 and val[0]["img"].shape == (2, 3, 128, 256) and val[0]["lbl"].shape == (2, 256, 512)
    present = set(np.unique(data.class_pixel_counts(datasets.list_gta5(str(tmp_path)), str(tmp_path / "c")).nonzero()[1]))
    assert len(present) >= 10 and {0, 2, 5, 8, 10, 11, 13} <= present
    assert (val[0]["lbl"] == 255).any()  # the ego car's label id maps to ignore
    img, lbl, _ = demo.street_scene(np.random.default_rng([0, 0, 0]), 216, 384, demo.DOMAINS["source"])
    assert np.array_equal(np.asarray(Image.open(tmp_path / "gta5/images/00001.png")), img)  # same seed, same pixels


def test_demo_never_deletes_or_overwrites_a_users_dataset(tmp_path, monkeypatch):
    """A user's cityscapes/ without gta5/ used to be deleted and replaced by synthetic files."""
    users = tmp_path / "cityscapes" / "leftImg8bit"
    users.mkdir(parents=True)
    (users / "mine.png").write_bytes(b"the user's file")
    msg = _train_inprocess(monkeypatch, "--demo", "--method", "dacs", "--data-root", str(tmp_path),
                           "--out", str(tmp_path / "run"))
    assert msg.startswith("error: ") and str(tmp_path / "cityscapes") in msg and "--data-root" in msg, msg
    assert "Traceback" not in msg and "\n" not in msg.strip()
    assert (users / "mine.png").read_bytes() == b"the user's file"
    assert sorted(os.listdir(tmp_path)) == ["cityscapes"]  # nothing written beside it either
    # --data-root that is a file: refused before anything is written
    (tmp_path / "afile").write_text("x")
    with pytest.raises(DatasetError, match="is a file, not a folder"):
        demo.write_data(str(tmp_path / "afile"), n_src=1, n_tgt=1, n_val=1)
    # --data-root that cannot be made (as the default data/demo in a read-only checkout): one paragraph
    with pytest.raises(DatasetError, match=r"--data-root .*afile/demo cannot be written \(.*Pass --data-root"):
        demo.write_data(str(tmp_path / "afile" / "demo"), n_src=1, n_tgt=1, n_val=1)


def test_demo_regenerates_only_the_folders_it_marked(tmp_path):
    root = tmp_path / "d"
    demo.write_data(str(root), n_src=2, n_tgt=2, n_val=2)
    assert all((root / name / demo.MARKER).is_file() for name in ("gta5", "cityscapes"))
    (root / "gta5" / "images" / "00001.png").unlink()
    demo.write_data(str(root), n_src=2, n_tgt=2, n_val=2)  # marked: replaced whole
    assert (root / "gta5" / "images" / "00001.png").is_file()
    (root / "gta5" / demo.MARKER).unlink()  # now gta5 is the user's
    with pytest.raises(DatasetError, match=f"{root / 'gta5'} exists but was not written by the demo"):
        demo.write_data(str(root), n_src=2, n_tgt=2, n_val=2)
    assert not (root / "gta5" / demo.MARKER).exists() and sorted(os.listdir(root)) == ["cityscapes", "gta5"]


def test_demo_gap_closed_is_measured_from_source_only_to_the_oracle():
    so, oracle = demo.GAP["source_only"], demo.GAP["oracle"]
    assert demo.gap_closed_line(so).startswith("gap closed: 0% of the domain gap")
    assert demo.gap_closed_line(oracle).startswith("gap closed: 100% ")
    assert demo.gap_closed_line((so + oracle) / 2).startswith("gap closed: 50% ")


def test_demo_data_and_toy_networks_of_another_world_are_made_again(tmp_path, monkeypatch):
    """The marker and the cache keys hold the world's hash: after a change of the world (as the demo-gap issue made)
    the old data and the old toy networks are not taken for this world's."""
    root = tmp_path / "d"
    demo.write_data(str(root), n_src=2, n_tgt=2, n_val=2)
    assert demo.check_root(str(root))
    paths = toys.imagenet_path(), toys.teacher_path()
    monkeypatch.setitem(demo.DOMAINS, "target", dict(demo.DOMAINS["target"], light=0.5))
    assert not demo.check_root(str(root))  # another world: written again (its folders are the demo's own)
    assert toys.imagenet_path() != paths[0] and toys.teacher_path() != paths[1]


def test_demo_stop_as_the_data_root_is_made_leaves_no_folder(tmp_path, monkeypatch):
    """Ctrl-C right after the first folder is made (--data-root and its folder for writing aside): neither is
    left, since both are made inside the clean-up's try."""
    makedirs = os.makedirs

    def stop_after(path, *a, **k):
        makedirs(path, *a, **k)
        raise KeyboardInterrupt
    monkeypatch.setattr(os, "makedirs", stop_after)
    with pytest.raises(KeyboardInterrupt):
        demo.write_data(str(tmp_path / "data"), n_src=1, n_tgt=1, n_val=1)
    assert os.listdir(tmp_path) == []


@pytest.mark.parametrize("sig", ["SIGINT", "SIGTERM"])
def test_demo_toys_cli_stops_as_on_ctrl_c_however_it_was_started(tmp_path, monkeypatch, capsys, sig):
    # a scheduler's SIGTERM, and a Ctrl-C in a job that a shell without job control started with & (SIGINT ignored
    # from its start), stop a pretraining with one line and a Ctrl-C's status, nothing written
    sig, out = getattr(signal, sig), tmp_path / "mit.safetensors"
    monkeypatch.setattr(sys, "argv", ["toys.py", "pretrain", "--out", str(out)])

    def pretrain(path):
        os.kill(os.getpid(), sig)
        time.sleep(5)  # a stop's KeyboardInterrupt ends this at once; a signal ignored or only noted would not
        pathlib.Path(path).write_text("finished")

    monkeypatch.setattr(toys, "pretrain_imagenet", pretrain)
    with _stop_handlers_kept(), pytest.raises(SystemExit) as e:
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, lambda *_: None)  # not the default: a toys.py that kept it would end pytest
        toys.main()
    assert e.value.code == 130 and not out.exists()
    assert capsys.readouterr().err == "stopped; nothing half-written was left behind\n"


def test_demo_teacher_targets_never_depend_on_class_ids_or_colors():
    """The teacher's pretext target is which painted shape owns a pixel: the same whatever the palette (so whatever
    color a class has), and finer than the classes (every car, wheel, window texture is its own segment)."""
    rng = lambda: np.random.default_rng([5, 3, 1])  # noqa: E731
    img_a, lbl_a, seg_a = demo.street_scene(rng(), 128, 256, demo.DOMAINS["target"])
    palette = toys.random_palette(np.random.default_rng(9))
    img_b, lbl_b, seg_b = demo.street_scene(rng(), 128, 256, demo.DOMAINS["target"], palette)
    assert not np.array_equal(img_a, img_b) and np.array_equal(seg_a, seg_b) and np.array_equal(lbl_a, lbl_b)
    # what the pretrainings see: the image, segments and part kinds, never the class ids
    img, seg, kinds = toys.world_scene((0, "teacher", 7))
    assert img.dtype == np.uint8 and img.shape[2] == 3 and seg.shape == kinds.shape == img.shape[:2]
    cars = np.unique(seg_a[lbl_a == demo.CAR])
    assert len(cars) > 1 and not set(cars) & set(np.unique(seg_a[lbl_a != demo.CAR]))  # segments within classes
    assert len(np.unique(seg_a[lbl_a == demo.SKY])) == 1  # the sky's painted bands are one segment


def test_demo_part_kinds_are_finer_than_the_classes_and_crops_label_what_they_hold():
    canvas = demo.paint_scene(np.random.default_rng([0, 0, 3]), 216, 384, demo.DOMAINS["source"])
    kinds = np.array([demo.KINDS.index(k) for k in canvas.kinds])[canvas.paint]
    car_parts = {demo.KINDS[k] for k in np.unique(kinds[canvas.label == demo.CAR])}
    assert car_parts == {"car body", "car glass", "wheel"}  # one class, three parts
    assert {demo.KINDS[k] for k in np.unique(kinds[canvas.label == demo.PERSON])} <= {"legs", "clothes", "skin"}
    # object_crops: a scene of road alone, with a sky strip of 1% on top: present is road, and sky only above 2%
    img = np.zeros((144, 256, 3), np.uint8)
    kind = np.full((144, 256), demo.KINDS.index("road"), np.uint8)
    kind[:1] = demo.KINDS.index("sky")
    _, target = toys.object_crops([(img, kind, kind)], torch.Generator().manual_seed(0), 8, 64, zoom=(1.0, 1.0))
    assert target.shape == (8, len(demo.KINDS)) and (target[:, demo.KINDS.index("road")] == 1).all()
    assert target.sum(1).max() <= 2 and target[:, demo.KINDS.index("wheel")].sum() == 0


def test_demo_imagenet_pretraining_lowers_its_loss_and_saves_nvlabs_mit_weights(tmp_path, monkeypatch):
    scenes = [toys.world_scene((0, "imagenet", i)) for i in range(6)]
    cfg = dict(toys.IMAGENET, batch=8, warmup=5)
    encoder, head, losses = toys.train_imagenet(scenes, 30, cfg, log_every=0)
    assert np.mean(losses[-6:]) < 0.8 * np.mean(losses[:6])
    path = str(tmp_path / "mit.safetensors")
    toys.save_mit(encoder, path)
    loaded = toys.demo_mit(seed=1)
    weights.load_mit(loaded, path)  # the layout --pretrained reads, strictly
    assert all(torch.equal(a, b) for a, b in zip(loaded.state_dict().values(), encoder.state_dict().values()))
    # the cache keys follow $SSR_CACHE and what determines each network
    monkeypatch.setenv("SSR_CACHE", str(tmp_path / "c"))
    assert toys.imagenet_path().startswith(str(tmp_path / "c")) and toys.imagenet_path() != toys.teacher_path()
    key = toys.imagenet_path()
    monkeypatch.setitem(toys.IMAGENET, "steps", 1)
    assert toys.imagenet_path() != key


def test_demo_schedule_scales_daformers_time_constants():
    assert demo.schedule(40000) == dict(iters=40000, warmup=1500, ema_alpha=0.999)
    assert demo.schedule(600) == dict(iters=600, warmup=22, ema_alpha=0.9333)  # the demo's
    assert {k: demo.FLAGS[k] for k in ("iters", "warmup", "ema_alpha")} == demo.schedule(demo.FLAGS["iters"])


def test_demo_teacher_pretraining_lowers_its_loss_and_saves_a_sam_file(tmp_path):
    torch.manual_seed(0)
    scenes = [toys.world_scene((0, "teacher", i)) for i in range(6)]
    cfg = dict(toys.TEACHER, batch=4, points=32, warmup=5, lr=2e-3)
    encoder, dec, losses = toys.train_teacher(scenes, 40, log_every=0, cfg=cfg)
    assert np.mean(losses[-8:]) < 0.8 * np.mean(losses[:8])
    path = str(tmp_path / "teacher.safetensors")
    toys.save_teacher(encoder, path)
    assert all(k.startswith("image_encoder.") for k in load_file(path))  # the official SAM layout
    loaded = toys.teacher_encoder(seed=1)
    weights.load_sam(loaded, path)
    assert all(torch.equal(a, b) for a, b in zip(loaded.state_dict().values(), encoder.state_dict().values()))


def test_demo_train_takes_the_cached_teacher_for_ssr_and_none_gives_the_random_one(_train_root, tmp_path,
                                                                                  monkeypatch, capsys):
    seen = []

    class Stop(Exception):
        pass

    def fake_teacher(name, path, **kw):
        seen.append(path)
        raise Stop

    monkeypatch.setattr(weights, "frozen_sam", fake_teacher)
    for i, extra in enumerate(([], ["--sam-weights", "none"])):
        monkeypatch.setattr(sys, "argv", ["train.py", "--demo", "--data-root", _train_root, "--method", "ssr",
                                          "--out", str(tmp_path / str(i)), "--workers", "0", *extra])
        with pytest.raises(Stop):
            runpy.run_path(os.path.join(_ROOT, "train.py"), run_name="__main__")
    assert seen == [toys.teacher_path(), None] and seen[0].startswith(os.environ["SSR_CACHE"])
    assert os.path.isfile(seen[0])  # the fixture's stand-in: nothing was pretrained


def test_demo_checks_the_cache_before_pretraining_and_remakes_a_broken_entry(_train_root, tmp_path, monkeypatch):
    made = []
    monkeypatch.setattr(toys, "pretrain_teacher", lambda path: (made.append(path), toys.save_teacher(
        toys.teacher_encoder(), path)))
    monkeypatch.setattr(toys, "pretrain_imagenet", lambda path: (made.append(path), toys.save_mit(toys.demo_mit(), path)))
    (tmp_path / "afile").write_text("")
    monkeypatch.setenv("SSR_CACHE", str(tmp_path / "afile" / "cache"))  # cannot be made, even by root
    msg = _train_inprocess(monkeypatch, *_train_tiny(_train_root, tmp_path / "run", "--iters", "1"))
    assert msg.startswith("error: the cache folder ") and "SSR_CACHE" in msg and not made, msg  # before any work
    monkeypatch.setenv("SSR_CACHE", str(tmp_path / "cache"))
    os.makedirs(tmp_path / "cache")
    pathlib.Path(toys.teacher_path()).write_bytes(b"")  # an empty entry, and a cut-short one
    toys.save_mit(toys.demo_mit(), toys.imagenet_path())
    whole = pathlib.Path(toys.imagenet_path()).read_bytes()
    pathlib.Path(toys.imagenet_path()).write_bytes(whole[: len(whole) // 2])
    assert not toys.readable(toys.teacher_path()) and not toys.readable(toys.imagenet_path())
    assert _train_inprocess(monkeypatch, *_train_tiny(_train_root, tmp_path / "run", "--iters", "1")) == ""
    assert sorted(made) == sorted([toys.teacher_path(), toys.imagenet_path()])  # made again, not trusted
    assert toys.readable(toys.teacher_path()) and toys.readable(toys.imagenet_path())


def test_study_reads_train_tables_and_writes_markdown_and_chart(capsys):
    result = dict(iou=[float("nan")] + [0.5] * 18, miou=0.5, images=4, images_per_s=1.0)
    ev.print_table(result, data.CLASSES)
    parsed = study.parse_final_table("iter 1\n" + capsys.readouterr().out + "done\n")
    assert parsed["miou"] == 50.0 and math.isnan(parsed["iou"][0]) and parsed["iou"][1:] == [50.0] * 18
    # each setting scores its base + seed; ssr-toy also moves by (0, +1, -1) over the seeds
    base = {"source-only": 40, "oracle": 60, "dacs": 50, "ssr-random": 51, "ssr-toy": 52, "ssr-shuffled": 53,
            "ssr-zeros": 54}
    assert list(base) == list(study.SETTINGS)
    fake = {n: {s: dict(miou=base[n] + s + (n == "ssr-toy") * (0, 1, -1)[s], iou=[30.0 + k] * 19)
                for s in range(3)} for k, n in enumerate(study.SETTINGS)}
    md = study.study_markdown(fake, [0, 1, 2])
    assert "| mean | **41.00** | **61.00** | **51.00** | **52.00** | **53.00** | **54.00** | **55.00** |" in md
    assert "| sd | 1.00 | 1.00 | 1.00 | 1.00 | 1.00 | 1.00 | 1.00 |" in md
    # the gap closed, per seed (setting - source only) / (oracle - source only): dacs 50% on every seed; ssr-toy
    # 60, 65, 55%: sd 5, a 95% t-interval of 4.303 * 5 / sqrt(3) either side
    assert "| gap closed (%), same seed: mean [95% interval] | - | - | +50.00 [+50.00, +50.00] | +55.00 [+55.00, " \
           "+55.00] | +60.00 [+47.58, +72.42] |" in md
    # paired by seed: ssr-toy minus dacs is 2 + (0, 1, -1): sd 1, a 95% t-interval of 4.303 / sqrt(3) either side;
    # what 3 seeds detect at that sd: (4.303 + 1.061) / sqrt(3)
    assert "| - | +1.00 [+1.00, +1.00] | +2.00 [-0.48, +4.48] |" in md
    assert "| smallest difference to dacs this study detects (95%, power 80%) | 0.00 | 0.00 | - | 0.00 | 3.10 |" in md
    assert study.seeds_needed(1.0, 3.1) == 3 and study.seeds_needed(1.0, 3.0) == 4
    assert "| road | 30.00 | 31.00 | 32.00 | 33.00 | 34.00 | 35.00 | 36.00 |" in md
    chart = pictures.study_chart({study.TITLES[n]: [fake[n][s]["miou"] for s in range(3)] for n in fake})
    colors = np.unique(np.asarray(chart.convert("RGB")).reshape(-1, 3), axis=0)
    assert chart.size == (160 * 7 + 80, 420) and len(colors) > 3  # seven bars, dots and text drawn


def test_study_refuses_an_out_it_cannot_write_before_any_work(tmp_path, monkeypatch):
    """A read-only checkout gave an OSError traceback for the default --out runs/study, after the data and the
    pretrainings: now one paragraph naming --out, before anything is made."""
    monkeypatch.setattr(toys, "prepare", lambda *a: pytest.fail("the data or a network was made before the check"))
    (tmp_path / "afile").write_text("")  # a folder that cannot be made, even by root
    outs = [tmp_path / "afile" / "study"]
    if os.geteuid() != 0:  # root writes into a read-only folder anyway
        (tmp_path / "ro").mkdir(0o500)
        outs.append(tmp_path / "ro" / "study")
    for out in outs:
        monkeypatch.setattr(sys, "argv", ["study.py", "--out", str(out), "--data-root", str(tmp_path / "data")])
        with pytest.raises(SystemExit) as e:
            study.main()
        msg = str(e.value.code)
        assert msg.startswith(f"error: --out {out} cannot be written (") and "Pass --out a folder" in msg, msg
        assert "\n" not in msg and not (tmp_path / "data").exists() and not out.exists()


_FAKE_TRAIN = """import os, signal, sys, time
out = sys.argv[sys.argv.index("--out") + 1]
def stop(sig, frame):  # as train.py's loop: finish the iteration, save, end with a Ctrl-C's status
    open(os.path.join(out, "train_state.pt"), "w").close()
    sys.exit(130)
signal.signal(signal.SIGTERM, stop)
os.makedirs(out)
open(os.path.join(out, "started"), "w").close()
time.sleep(20)
"""


def test_study_stopped_by_sigterm_stops_its_runs_which_save(tmp_path, monkeypatch, capsys):
    """A SIGTERM (kill, a scheduler) reaches the study alone: it passes it on to the runs in flight, which save and
    end (so the study, run again, continues them), starts no queued run, and ends with its one line. It died at
    once, its runs going on without it."""
    fake = tmp_path / "train.py"  # stands in for train.py: the study's part is what is tested here
    fake.write_text(_FAKE_TRAIN)
    run = study.Runs.run
    monkeypatch.setattr(study.Runs, "run", lambda self, cmd, env: run(self, [cmd[0], str(fake)] + cmd[2:], env))
    monkeypatch.setattr(toys, "prepare", lambda *a: None)
    out = tmp_path / "study"
    monkeypatch.setattr(sys, "argv", ["study.py", "--settings", "dacs", "--seeds", "3", "--jobs", "2", "--out",
                                      str(out), "--data-root", str(tmp_path / "data")])

    def stop_when_both_started():
        while not all((out / f"dacs_seed{s}" / "started").exists() for s in (0, 1)):
            time.sleep(0.05)
        os.kill(os.getpid(), signal.SIGTERM)

    threading.Thread(target=stop_when_both_started, daemon=True).start()
    with _stop_handlers_kept(), pytest.raises(SystemExit) as e:
        signal.signal(signal.SIGTERM, lambda *_: None)  # not the default: a study.py that kept it would end pytest
        study.main()
    assert e.value.code == 130 and capsys.readouterr().err.startswith("stopped; nothing half-written was left")
    assert [(out / f"dacs_seed{s}" / "train_state.pt").exists() for s in (0, 1)] == [True, True]
    assert not (out / "dacs_seed2").exists()  # queued when the stop came: never started


def test_a_stop_during_the_clean_up_of_a_stop_does_not_interrupt_it():
    """After the first stop, as in train.py's loop: another SIGTERM changes nothing (a study's, after the Ctrl-C
    that its runs got from the terminal: it interrupted their clean-up with a traceback), a second Ctrl-C ends
    the program at once."""
    cleaned = []
    with _stop_handlers_kept():
        processes.stops_interrupt()
        with pytest.raises(KeyboardInterrupt):
            try:
                os.kill(os.getpid(), signal.SIGTERM)
                time.sleep(5)  # the stop's KeyboardInterrupt ends this at once
            finally:
                os.kill(os.getpid(), signal.SIGTERM)
                time.sleep(0.01)
                cleaned.append(True)
        assert cleaned and signal.getsignal(signal.SIGINT) is signal.SIG_DFL
        assert signal.getsignal(signal.SIGHUP) is signal.SIG_IGN


# ==============================================================================================================
# bench.py: smoke test
# ==============================================================================================================



def test_bench_tiny_prints_every_item_with_ratios():
    # One thread: tiny ops on threads that other processes keep busy can take 100x longer, and only the table
    # matters here.
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    run = subprocess.run([sys.executable, "bench.py", "--tiny", "--repeats", "1", "--warmup", "0"], cwd=_ROOT,
                         env=env, capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr[-2000:]
    out = run.stdout
    lines = out.splitlines()
    header = next(i for i, line in enumerate(lines) if line.startswith("item"))
    assert "time ratio" in lines[header] and "mem ratio" in lines[header]
    rows = {line[0]: line for line in lines[header + 1:] if line[:1].isdigit()}
    assert sorted(rows) == ["1", "2", "3", "4"], out  # item 5 compiles: not by default
    for item in "123":  # ours and the reference timed in one run: both times and their ratio
        ours, ref, ratio = map(float, re.search(r"\s(\d+\.\d)\s+(\d+\.\d)\s+(\d+\.\d\d)\s", rows[item]).groups())
        assert abs(ours / ref - ratio) <= ratio * (0.06 / ours + 0.06 / ref) + 0.006, rows[item]  # ms rounded to 0.1
    for item in "12":  # and items 1 and 2 compare equal models: their outputs agree
        diff = float(re.search(r"max\|diff\| (\S+)", rows[item])[1])
        assert diff < 1e-4, rows[item]
    assert re.search(r"\d+\.\d\d images/s", rows["4"]), rows["4"]


def test_bench_item_5_times_compiled_against_eager_with_the_compile_apart():
    # inductor takes minutes on a CPU: TORCH_COMPILE_DISABLE runs the compiled side eager, which checks the item's
    # wiring (both sides timed in one run, their ratio, the first iterations apart) in seconds
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TORCH_COMPILE_DISABLE": "1"}
    run = subprocess.run([sys.executable, "bench.py", "--tiny", "--items", "5", "--repeats", "2", "--warmup", "0"],
                         cwd=_ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr[-2000:]
    row = next(line for line in run.stdout.splitlines() if line.startswith("5 "))
    number = r"\s+\d+\.\d"
    assert re.search(rf"^5 ssr train iter MiT-tiny crop 64 b2 SAM 64\s+compiled\s+eager{number * 3}\d\s", row), row
    assert re.search(r"fp32; first iterations \(compile\) \d+\.\d s, \d+\.\d s$", row), row


def test_suite_runs_its_cpu_parts_with_tiny(tmp_path):
    # train.py and eval.py as a user runs them (the demo's sizes with --tiny), then item 3 profiled; every figure
    # names the device; the data is removed at the end
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TMPDIR": str(tmp_path)}
    run = subprocess.run([sys.executable, "suite.py", "--tiny", "--device", "cpu", "--repeats", "1", "--warmup", "0"],
                         cwd=_ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
    assert not any(word in run.stdout for word in ("FAILED", "not run", "TIMEOUT")), run.stdout
    figures = {line.split("]")[1].split("(at")[0].strip(" :"): line for line in run.stdout.splitlines()
               if line.startswith("[cpu")}
    assert re.search(r"\d+\.\d\d it/s steady", run.stdout.split("--method ssr --mic")[1].splitlines()[1])
    assert re.search(r"8 images: evaluation \d+\.\d s \([\d.]+ images/s\), the command \d+\.\d s", run.stdout)
    assert "train.py --method dacs --mic" in figures and "the compiled levers run on cuda only" in figures, run.stdout
    assert re.search(r"3 train iter MiT-tiny crop 64 b2 SAM 64 mic .* \d+\.\d\d .*TFLOP per iteration: ssr "
                     r"0\.001\d+, dacs 0\.000\d+; the ssr iteration runs \d+ aten ops and \d+ views \(.*SSR branch \d+",
                     run.stdout), run.stdout  # ~1.2 and ~0.74 GFLOP at the tiny sizes
    assert re.search(r"profile of iterations 2-3: [\d.]+ ms per iteration: waiting for data [\d.]+ ms, the rest on "
                     r"the CPU [\d.]+ ms", run.stdout), run.stdout  # the real loop, profiled
    assert re.search(r"\n    host time by op, per iteration: aten::\w+ [\d.]+ ms \(\d+ calls\), ",
                     run.stdout), run.stdout  # the costliest ops, named
    assert re.search(r"ok: stopped by SIGTERM at iteration \d+ \(exit 130\), resumed there in run \w+, saved again",
                     run.stdout), run.stdout
    assert "train.py --method ssr --ssr-context shuffled" in figures, run.stdout
    assert re.search(r"summary: train.py --method ssr --mic [\d.]+ it/s: 40,000 iterations in [\d.]+ h; ssr costs "
                     r"[\d.]+x dacs --mic .*TFLOP per iteration", run.stdout), run.stdout
    assert not [f for f in os.listdir(tmp_path) if f.startswith("ssr-bench-")], os.listdir(tmp_path)


def test_bench_counts_a_depthwise_convs_backward_as_its_forward():
    # torch's own formula drops `groups` for the weight's gradient: a depthwise conv's backward would count C times
    conv = torch.nn.Conv2d(64, 64, 3, padding=1, groups=64, bias=False)
    x = torch.randn(2, 64, 16, 16, requires_grad=True)
    forward = 2 * 2 * 64 * 16 * 16 * 9  # 2 FLOPs per multiply-add, per output value of each of the 64 channels
    assert bench.count_flops(lambda: conv(x)) == forward
    assert bench.count_flops(lambda: conv(x).sum().backward()) == 3 * forward  # input's and weight's gradients
    q, k, v = (torch.randn(1, 2, 32, 16, requires_grad=True) for _ in range(3))  # the CPU's attention counts too
    assert bench.count_flops(lambda: F.scaled_dot_product_attention(q, k, v)) == 2 * 2 * (2 * 32 * 32 * 16)


def test_bench_counts_aten_ops_by_the_innermost_running_network():
    class Outer(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = torch.nn.Linear(8, 8)

        def forward(self, x):
            return self.lin(x).relu().view(-1)

    outer, x = Outer(), torch.randn(4, 8)
    nets = {"outer": outer, "lin": outer.lin}
    # addmm in lin, relu in outer; views launch nothing: the weight's transpose, relu's saved output, the view
    line = bench.count_ops(lambda: outer(x), nets)
    assert line == "2 aten ops and 3 views (lin 1, outer 1)", line
    # the backward runs outside the networks' forwards: sum, its gradient (ones_like), relu's, the weight's (mm), the
    # bias's (sum); with no gradients yet to add to
    line = bench.count_ops(lambda: outer(x).sum().backward(), nets)
    assert re.fullmatch(r"7 aten ops and \d+ views \(outside 5, lin 1, outer 1\)", line), line
    assert not outer._forward_hooks and not outer.lin._forward_pre_hooks  # the counter leaves no hook behind


def test_suite_train_runs_evaluate_8_images_and_eval_py_all(tmp_path):
    # each train.py run of the suite ends with an evaluation of its val split: 8 images, not the 200 that eval.py is
    # timed on (at the paper's sizes each run would spend its end decoding and evaluating 2048x1024 files)
    suite.loop_data(str(tmp_path / "data"), str(tmp_path / "eval"), True, 11)
    val = lambda root: datasets.list_dataset(str(tmp_path / root), "cityscapes", "val")  # noqa: E731
    assert len(val("data")) == 8 and len(val("eval")) == 11 and all(s.lbl for s in val("eval"))
    assert not (tmp_path / "eval" / "gta5").exists()


def test_suite_profile_stops_the_loader_workers_itself(tmp_path):
    # train.py runs inside the profiling process; its namespace, loader iterator included, dies in the cyclic gc,
    # which would wait 5 s for each worker: profile_train stops them itself (here with the gc off, so it must)
    script = ("import gc, multiprocessing, sys, suite; suite.loop_data(sys.argv[1], sys.argv[1] + '/eval', True, 8); "
              "gc.disable(); print(suite.profile_train(sys.argv[2:], 1, 1)); "
              "print('children', multiprocessing.active_children())")
    flags = ["--data-root", str(tmp_path / "data"), "--out", str(tmp_path / "run"), "--log-every", "0", "--demo",
             "--pretrained", "none", "--eval-every", "0", "--save-every", "0", "--debug-every", "0", "--workers", "2",
             "--method", "dacs"]
    run = subprocess.run([sys.executable, "-c", script, str(tmp_path / "data")] + flags, cwd=_ROOT,
                         env={**os.environ, "SSR_CACHE": str(tmp_path / "cache")}, capture_output=True, text=True,
                         timeout=120)
    assert run.returncode == 0, run.stderr[-2000:]
    assert re.search(r"ms per iteration: waiting for data", run.stdout), run.stdout
    assert "children []" in run.stdout, run.stdout


@pytest.mark.parametrize("program", ["bench", "suite"])
def test_bench_and_suite_refuse_a_device_this_machine_lacks(program):
    cases = [("gpu0", "not a device name")] + [("cuda", "PyTorch sees no CUDA GPU")] * (not torch.cuda.is_available())
    for device, said in cases:
        with pytest.raises(SystemExit) as stop:  # one line, no traceback
            {"bench": bench, "suite": suite}[program].main(["--device", device])
        assert str(stop.value.code).startswith(f"error: --device {device}: {said}"), stop.value.code


def test_bench_refuses_sizes_it_cannot_run():
    cases = [(["--repeats", "0"], "--repeats 0"), (["--crop", "48", "--sam-size", "20"], "--crop 48, --sam-size 20"),
             (["--batch-size", "-1", "--warmup", "-1"], "--batch-size -1, --warmup -1")]
    for argv, named in cases:
        with pytest.raises(SystemExit) as stop:  # one line, before any model is built
            bench.main(["--tiny", *argv])
        assert str(stop.value.code).startswith(f"error: {named}: --repeats and --batch-size must be"), stop.value.code


def test_suite_refuses_sizes_it_cannot_run():
    cases = [(["--repeats", "0"], "--repeats 0"), (["--warmup", "-1", "--budget", "5"], "--warmup -1, --budget 5")]
    for argv, named in cases:
        with pytest.raises(SystemExit) as stop:  # one line, before anything is written
            suite.main(["--tiny", *argv])
        assert str(stop.value.code).startswith(f"error: {named}: --repeats must be positive"), stop.value.code


def test_suite_rejects_a_baseline_without_bench_py(tmp_path):
    with pytest.raises(SystemExit) as stop:  # sys.exit(message): one line on stderr, exit status 1
        suite.main(["--tiny", "--baseline", str(tmp_path)])
    assert str(stop.value.code).startswith(f"error: --baseline {tmp_path} holds no bench.py")


def test_bench_item_7_times_the_frozen_weights_cast_once_against_autocast():
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    run = subprocess.run([sys.executable, "bench.py", "--tiny", "--items", "7", "--dtype", "bf16", "--repeats", "2",
                          "--warmup", "0"], cwd=_ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr[-2000:]
    row = next(line for line in run.stdout.splitlines() if line.startswith("7 "))
    ours, ref, ratio = map(float, re.search(r"cast once\s+autocast\s+(\d+\.\d)\s+(\d+\.\d)\s+(\d+\.\d\d)\s", row).groups())
    assert abs(ours / ref - ratio) <= ratio * (0.06 / ours + 0.06 / ref) + 0.006, row
    assert row.endswith("bf16; the ImageNet copy's Linear and Conv2d weights"), row


@pytest.mark.parametrize("items, expect", [("3,8", "error: --items 3,8: choose among 1,2,3,4,5,6,7"),
                                           ("3,6", "error: --items 3,6: item 6 times CUDA graphs, which run on a GPU")])
def test_bench_rejects_unknown_item(items, expect):
    with pytest.raises(SystemExit) as stop:  # sys.exit(message): one line on stderr, exit status 1
        bench.main(["--tiny", "--device", "cpu", "--items", items])
    assert str(stop.value.code).startswith(expect)


def test_bench_imports_without_running():
    s = bench.Setup(torch.device("cpu"))  # no argument parsing on import; the paper's sizes unless told otherwise
    assert callable(bench.main) and (s.dtype, s.crop, s.batch, s.sam_size, s.repeats, s.warmup) == (
        "fp32", 512, 2, 1024, 3, 1)
    tiny = bench.Setup(torch.device("cpu"), tiny=True, warmup=0)
    assert (tiny.crop, tiny.sam_size, tiny.warmup, tiny.seg_config().backbone) == (64, 64, 0, "mit_b0")



