"""Tests of sam_encoder.py: parity with segment_anything and transformers on random weights, weight loading."""
import importlib.util
import pathlib
import subprocess
import sys
import types
from functools import partial

import pytest
import torch
from safetensors.torch import save_file

import sam_encoder as se

_SAM_TINY = dict(embed_dim=32, depth=3, num_heads=2, global_attn_indexes=(1,))  # head dim 16


def _sam_official():
    """segment_anything.modeling loaded by path: `import segment_anything` pulls in torchvision through the
    package __init__, which the tests do not need."""
    if "segment_anything.modeling" not in sys.modules:
        root = pathlib.Path(importlib.util.find_spec("segment_anything").submodule_search_locations[0])
        parent = types.ModuleType("segment_anything")  # stub parent package, so the relative imports resolve
        parent.__path__ = [str(root)]
        sys.modules.setdefault("segment_anything", parent)
        spec = importlib.util.spec_from_file_location("segment_anything.modeling", root / "modeling" / "__init__.py",
                                                      submodule_search_locations=[str(root / "modeling")])
        module = importlib.util.module_from_spec(spec)
        sys.modules["segment_anything.modeling"] = module
        spec.loader.exec_module(module)
    return sys.modules["segment_anything.modeling"]


def _sam_reference(img_size: int, embed_dim: int, depth: int, num_heads: int, global_attn_indexes, window_size=14):
    """The official encoder as sam_model_registry builds it, with every tensor random (LayerNorms, rel-pos tables
    and pos_embed included: their defaults of 1/0 would hide a misplaced or transposed weight)."""
    torch.manual_seed(0)
    ref = _sam_official().ImageEncoderViT(
        img_size=img_size, embed_dim=embed_dim, depth=depth, num_heads=num_heads, mlp_ratio=4,
        norm_layer=partial(torch.nn.LayerNorm, eps=1e-6), use_rel_pos=True, window_size=window_size,
        global_attn_indexes=global_attn_indexes, qkv_bias=True, out_chans=256)
    _sam_randomize(ref)
    return ref.eval()


def _sam_randomize(model: torch.nn.Module) -> None:
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn_like(p) * (0.2 if p.dim() > 1 else 0.5) + (0.0 if p.dim() > 1 else 0.3))


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
    ours = se.build_sam_encoder("vit_b", 256, **_SAM_TINY).eval()
    se.load_weights(ours, str(tmp_path / "sam.safetensors"))
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
    _sam_randomize(hf.vision_encoder)
    hf.save_pretrained(tmp_path)  # model.safetensors, as facebook/sam-vit-* on the hub
    ours = se.build_sam_encoder("vit_b", 256, **_SAM_TINY).eval()
    se.load_weights(ours, str(tmp_path / "model.safetensors"))
    x = torch.randn(2, 3, 256, 256)
    with torch.no_grad():
        expected, got = hf.vision_encoder(x).last_hidden_state, ours(x)
    assert (got - expected).abs().max() < 1e-4


def test_sam_vit_b_parameter_count():
    with torch.device("meta"):  # shapes only, nothing allocated
        model = se.build_sam_encoder("vit_b", 1024)
    assert sum(p.numel() for p in model.parameters()) == 89_670_912


def test_sam_window_partition_round_trip():
    x = torch.randn(2, 16, 16, 5)
    windows = se.window_partition(x, 14)
    assert windows.shape == (2 * 4, 14 * 14, 5)  # 16 pads to 28: 2x2 windows per image
    assert windows[1].view(14, 14, 5)[:, 2:].abs().sum() == 0  # window (0, 1) holds columns 14..15, then padding
    assert torch.equal(se.window_unpartition(windows, 14, 16, 16), x)


def test_sam_load_1024_weights_into_smaller_encoder(tmp_path):
    # Tiny width, but the tables of a 1024 px model: pos_embed (1, 64, 64, C), global rel-pos (127, head_dim).
    ref_1024 = se.build_sam_encoder("vit_b", 1024, **_SAM_TINY)
    _sam_randomize(ref_1024)
    save_file({f"image_encoder.{k}": v for k, v in ref_1024.state_dict().items()}, str(tmp_path / "w.safetensors"))
    for size in (512, 256):
        ours = se.build_sam_encoder("vit_b", size, **_SAM_TINY).eval()
        se.load_weights(ours, str(tmp_path / "w.safetensors"))
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
    assert torch.allclose(se.resize_pos_embed(pos, 16), torch.full((1, 16, 16, 4), 0.7), atol=1e-6)


def test_sam_bad_inputs_give_clear_errors(tmp_path):
    model = se.build_sam_encoder("vit_b", 64, **_SAM_TINY)
    with pytest.raises(FileNotFoundError, match="nope.safetensors"):
        se.load_weights(model, str(tmp_path / "nope.safetensors"))
    (tmp_path / "junk.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(ValueError, match="not a safetensors file"):
        se.load_weights(model, str(tmp_path / "junk.safetensors"))

    wider = se.build_sam_encoder("vit_b", 64, **{**_SAM_TINY, "embed_dim": 64})
    save_file(wider.state_dict(), str(tmp_path / "wide.safetensors"))
    with pytest.raises(ValueError, match=r"embed_dim=64, depth=3.*model is .*embed_dim=32"):
        se.load_weights(model, str(tmp_path / "wide.safetensors"))

    sd = {f"image_encoder.{k}": v for k, v in model.state_dict().items() if k != "blocks.1.attn.rel_pos_h"}
    save_file(sd, str(tmp_path / "partial.safetensors"))
    with pytest.raises(ValueError, match=r"partial.safetensors \(official layout.*missing keys.*blocks.1.attn.rel_pos_h"):
        se.load_weights(model, str(tmp_path / "partial.safetensors"))

    save_file({"encoder.weight": torch.zeros(1)}, str(tmp_path / "other.safetensors"))
    with pytest.raises(ValueError, match="does not match the SAM image encoder.*unexpected keys"):
        se.load_weights(model, str(tmp_path / "other.safetensors"))

    with pytest.raises(ValueError, match="img_size=64"):
        model(torch.randn(1, 3, 32, 32))
    with pytest.raises(ValueError, match="vit_b, vit_l, vit_h"):
        se.build_sam_encoder("vit_x")


def test_sam_convert_cli(tmp_path):
    ref = _sam_reference(64, **_SAM_TINY, window_size=3)
    sd = {f"image_encoder.{k}": v for k, v in ref.state_dict().items()}
    sd["mask_decoder.iou_token.weight"] = torch.randn(1, 256)
    torch.save(sd, tmp_path / "sam_vit_tiny.pth")
    script = pathlib.Path(se.__file__)
    run = subprocess.run([sys.executable, str(script), "convert", str(tmp_path / "sam_vit_tiny.pth"),
                          str(tmp_path / "out.safetensors")], capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
    ours = se.build_sam_encoder("vit_b", 64, **_SAM_TINY, window_size=3).eval()
    se.load_weights(ours, str(tmp_path / "out.safetensors"))
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        assert (ours(x) - ref(x)).abs().max() < 1e-4

    bad = subprocess.run([sys.executable, str(script), "convert", str(tmp_path / "missing.pth"),
                          str(tmp_path / "bad.safetensors")], capture_output=True, text=True)
    assert bad.returncode != 0 and "error:" in bad.stderr and "missing.pth" in bad.stderr
    assert "Traceback" not in bad.stderr
    torch.save({"head.weight": torch.zeros(2)}, tmp_path / "not_sam.pth")  # what the CLI catches, in-process
    with pytest.raises(ValueError, match="not_sam.pth.*holds no SAM image encoder"):
        se.convert_checkpoint(str(tmp_path / "not_sam.pth"), str(tmp_path / "bad.safetensors"))
    assert not (tmp_path / "bad.safetensors").exists()


def test_sam_frozen_teacher_is_frozen(tmp_path):
    model = se.build_sam_encoder("vit_b", 64, **_SAM_TINY)
    save_file(model.state_dict(), str(tmp_path / "w.safetensors"))
    teacher = se.frozen_teacher("vit_b", str(tmp_path / "w.safetensors"), img_size=64, dtype=torch.bfloat16,
                                **_SAM_TINY)
    assert not teacher.training and all(not m.training for m in teacher.modules())
    assert not any(p.requires_grad for p in teacher.parameters())
    assert torch.equal(teacher.pos_embed.float(), model.pos_embed.bfloat16().float())
    with torch.no_grad():
        out = teacher(torch.randn(2, 3, 64, 64))  # an fp32 batch into a bf16 teacher
    assert out.dtype == torch.bfloat16 and out.shape == (2, 256, 4, 4)
