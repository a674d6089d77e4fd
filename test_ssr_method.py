"""Tests of ssr.py: the DAFormer head's official keys, checkpoints, and each piece of the DACS/MIC/SSR method on
tiny models with hand-made inputs whose answers are known."""
import json
import math
import os

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file

import mit
import sam_encoder
import ssr

_SSR_ROOT = os.path.dirname(os.path.abspath(__file__))
_SSR_KEYS = os.path.join(_SSR_ROOT, "..", "shared", "reference", "official_keys.json")
_SSR_TINY = ssr.SegConfig(backbone="mit_b0", mit=dict(embed_dims=(16, 32, 40, 64), depths=(1, 1, 1, 1)), channels=32)


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
    with open(_SSR_KEYS) as f:
        official = json.load(f)
    with torch.device("meta"):
        model = ssr.build_segmentor(ssr.SegConfig())
    sd = model.state_dict()
    head = {k: list(v.shape) for k, v in sd.items() if k.startswith("decode_head.")}
    assert head == official["daformer_sepaspp_head"]
    assert set(sd) == {"backbone." + k for k in official["mit_b5"]} | set(head)
    # a released DAFormer student (backbone.* + decode_head.*, official shapes) loads strictly
    released = {**{"backbone." + k: torch.empty(s, device="meta") for k, s in official["mit_b5"].items()},
                **{k: torch.empty(s, device="meta") for k, s in official["daformer_sepaspp_head"].items()}}
    model.load_state_dict(released, strict=True)
    assert sum(p.numel() for p in model.decode_head.parameters()) == 3_712_275  # the "3.7M" of the DAFormer paper


def test_ssr_segmentor_gives_quarter_resolution_logits_and_conv_bn_relu():
    torch.manual_seed(0)
    model = ssr.build_segmentor(_SSR_TINY).eval()
    assert model(torch.randn(2, 3, 64, 96)).shape == (2, 19, 16, 24)
    aspp = model.decode_head.fuse_layer.aspp_modules
    assert aspp[0].conv.kernel_size == (1, 1) and aspp[0].conv.bias is None
    assert [m.depthwise_conv.conv.dilation for m in aspp[1:]] == [(6, 6), (12, 12), (18, 18)]
    assert isinstance(model.decode_head.dropout, torch.nn.Dropout2d) and model.decode_head.dropout.p == 0.1


def test_ssr_save_load_round_trip_and_errors(tmp_path):
    torch.manual_seed(0)
    model = ssr.build_segmentor(_SSR_TINY)
    model.train()(torch.randn(2, 3, 64, 64))  # move the BatchNorm running statistics away from their init
    path = str(tmp_path / "model.safetensors")
    ssr.save_segmentor(model, path, dataset="cityscapes", test_scale=[1024, 512], iters=7)
    assert not os.path.exists(path + ".tmp")
    loaded, meta = ssr.load_segmentor(path)
    assert meta == {"cfg": _SSR_TINY, "dataset": "cityscapes", "test_scale": [1024, 512], "iters": 7}
    assert not loaded.training
    x = torch.randn(1, 3, 64, 64)
    assert torch.equal(loaded(x), model.eval()(x))

    with pytest.raises(FileNotFoundError, match="missing.safetensors"):
        ssr.load_segmentor(str(tmp_path / "missing.safetensors"))
    garbage = tmp_path / "garbage.safetensors"
    garbage.write_bytes(b"not a safetensors file at all")
    with pytest.raises(ValueError, match="garbage.safetensors"):
        ssr.load_segmentor(str(garbage))
    backbone_only = str(tmp_path / "mit.safetensors")  # e.g. ImageNet MiT weights
    save_file({k: v.contiguous() for k, v in model.backbone.state_dict().items()}, backbone_only)
    with pytest.raises(ValueError, match="mit.safetensors.*not a segmentor"):
        ssr.load_segmentor(backbone_only)
    other = ssr.build_segmentor(ssr.SegConfig(**{**vars(_SSR_TINY), "num_classes": 5}))
    mixed = str(tmp_path / "mixed.safetensors")  # 5-class tensors under a 19-class configuration
    save_file({k: v.contiguous() for k, v in other.state_dict().items()}, mixed,
              metadata={"format": ssr.FORMAT, "cfg": json.dumps(vars(_SSR_TINY)), "meta": "{}"})
    with pytest.raises(ValueError, match="mixed.safetensors.*conv_seg"):
        ssr.load_segmentor(mixed)


# ----------------------------------------------------------------------------------------------------------------
# the method's pieces

def test_ssr_ema_copies_at_step_zero_then_moves_by_alpha():
    torch.manual_seed(0)
    student, teacher = ssr.build_segmentor(_SSR_TINY), ssr.build_segmentor(_SSR_TINY)
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
    uda = ssr.UDA(ssr.build_segmentor(_SSR_TINY), method="dacs").train()
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
    student = ssr.build_segmentor(_SSR_TINY)
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
    student = ssr.build_segmentor(_SSR_TINY)
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
    plain = ssr.build_segmentor(_SSR_TINY)
    assert sum(p.numel() for p in student.parameters()) == sum(p.numel() for p in plain.parameters())
    assert {k.split(".")[0] for k in uda.state_dict()} == {"student", "ema", "imnet", "ssr"}
    # only configured stages get modules
    one = ssr.UDA(ssr.build_segmentor(_SSR_TINY), method="ssr", ssr_stages=(2,), sam_img_size=64)
    assert set(one.ssr.embedding_layer) == set(one.ssr.fusion_layer) == {"2"}
    with pytest.raises(ValueError, match="SAM"):
        uda(src, lbl, tgt, 1)
    with pytest.raises(ValueError, match="mic"):
        ssr.UDA(ssr.build_segmentor(_SSR_TINY), method="source-only", mic=True)


def test_ssr_mic_learns_the_teachers_confident_labels_on_masked_targets():
    torch.manual_seed(0)
    src, lbl, tgt = _ssr_batch()
    for rows, confident in (((2, 8), True), ((32, 32), False)):  # the second ignores every target row
        uda = ssr.UDA(ssr.build_segmentor(_SSR_TINY), method="dacs", mic=True, ignore_rows=rows)
        ssr.ema_update(uda.ema, uda.student, 0)
        with torch.no_grad():
            uda.ema.decode_head.conv_seg.bias[3] = 100.0  # at it=1 (alpha 0.5) still ~50: a confident class 3
        mic = uda(src, lbl, tgt, 1)["mic"]
        # an untrained student gives class 3 a probability near 1/19: CE ~ ln 19 on the weighted pixels
        assert (mic > 0.5 * math.log(19)) if confident else (mic == 0)
