"""Tests of mit.py: parity with transformers' SegformerModel, the official key list, weight loading and errors."""
import json
import os
import runpy
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file, save_file

import mit

_MIT_TINY = dict(embed_dims=(16, 32, 40, 64), depths=(2, 1, 1, 2))  # heads stay (1, 2, 5, 8)
_MIT_ROOT = os.path.dirname(os.path.abspath(__file__))
_MIT_KEYS = os.path.join(_MIT_ROOT, "..", "shared", "reference", "official_keys.json")


def _mit_hf_model(classifier: bool = False):
    """A tiny transformers SegFormer with every tensor random (the default init leaves norms at 1/0, biases at 0,
    which would hide swapped or dropped tensors)."""
    from transformers import SegformerConfig, SegformerForImageClassification, SegformerModel

    cfg = SegformerConfig(hidden_sizes=list(_MIT_TINY["embed_dims"]), depths=list(_MIT_TINY["depths"]),
                          num_attention_heads=[1, 2, 5, 8], sr_ratios=[8, 4, 2, 1], num_labels=7)
    torch.manual_seed(0)
    model = (SegformerForImageClassification if classifier else SegformerModel)(cfg).eval()
    with torch.no_grad():
        for p in model.parameters():
            scale = p[0].numel() ** -0.5 if p.ndim > 1 else 0.5  # ~unit-variance activations
            p.copy_(torch.randn_like(p) * scale)
    # NVlabs (and so mit.py) uses LayerNorm eps 1e-6 in blocks and stage norms; transformers uses 1e-5 everywhere.
    # Give the reference the official eps so the comparison is tight; patch-embed and sr norms keep 1e-5 in both.
    for name, m in model.named_modules():
        if isinstance(m, torch.nn.LayerNorm) and "patch_embeddings" not in name and "attention" not in name:
            m.eps = 1e-6
    return model


def _mit_hf_stages(model, x: torch.Tensor) -> list[torch.Tensor]:
    base = getattr(model, "segformer", model)
    with torch.no_grad():
        return list(base(x, output_hidden_states=True).hidden_states)


def _mit_assert_parity(ref: list[torch.Tensor], path: str, x: torch.Tensor) -> None:
    ours = mit.build_mit("mit_b0", **_MIT_TINY).eval()
    mit.load_weights(ours, path)
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
    mit.convert_checkpoint(str(tmp_path / "pytorch_model.bin"), nv_file)
    assert all(k.startswith(("patch_embed", "block", "norm")) for k in load_file(nv_file))
    _mit_assert_parity(ref, nv_file, x)  # NVlabs layout


def test_mit_keys_and_shapes_match_official_checkpoints():
    with open(_MIT_KEYS) as f:
        official = json.load(f)
    for name in mit.MIT_PRESETS:
        with torch.device("meta"):
            model = mit.build_mit(name)
        assert {k: list(v.shape) for k, v in model.state_dict().items()} == official[name], name
    assert sum(p.numel() for p in model.parameters()) == 81_443_008  # mit_b5, the last preset


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
        mit.load_weights(b5, _mit_tiny_nvlabs_file(tmp_path, "mit_b0"))

    tiny = mit.build_mit("mit_b0", **_MIT_TINY)
    pth = tmp_path / "mit_b0.pth"
    torch.save(tiny.state_dict(), pth)
    with pytest.raises(ValueError, match=r"mit_b0\.pth is not a safetensors file.*python mit.py convert"):
        mit.load_weights(tiny, str(pth))
    with pytest.raises(FileNotFoundError, match=r"nope\.safetensors does not exist"):
        mit.load_weights(tiny, str(tmp_path / "nope.safetensors"))

    sd = tiny.state_dict()
    sd.pop("block1.0.attn.kv.weight")
    sd["block1.0.attn.qkv.weight"] = torch.zeros(3)
    sd["norm4.weight"] = torch.zeros(3)
    bad = str(tmp_path / "bad.safetensors")
    save_file(sd, bad)
    with pytest.raises(ValueError) as e:
        mit.load_weights(tiny, bad)
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
    run = subprocess.run([sys.executable, "mit.py", "convert", str(tmp_path / "mit_tiny.pth"), str(out)],
                         cwd=_MIT_ROOT, capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
    assert load_file(out).keys() == sd.keys()
    other = mit.build_mit("mit_b0", **_MIT_TINY)
    mit.load_weights(other, str(out))
    assert all(torch.equal(a, b) for a, b in zip(other.state_dict().values(), sd.values()))

    junk = tmp_path / "junk.pth"
    junk.write_text("not a checkpoint")
    # the CLI's __main__ in-process (a second interpreter would cost seconds): sys.exit(str) prints the string
    # alone to stderr and exits with status 1, so no traceback reaches the user
    monkeypatch.setattr(sys, "argv", ["mit.py", "convert", str(junk), str(tmp_path / "o.safetensors")])
    with pytest.raises(SystemExit) as e:
        runpy.run_path(os.path.join(_MIT_ROOT, "mit.py"), run_name="__main__")
    assert isinstance(e.value.code, str)
    assert e.value.code.startswith("error: ") and "junk.pth could not be read by torch.load" in e.value.code
    assert "\n" not in e.value.code  # one paragraph
    assert not (tmp_path / "o.safetensors").exists()
    with pytest.raises(FileNotFoundError, match="missing.pth does not exist"):  # same path as the CLI, in-process
        mit.convert_checkpoint(str(tmp_path / "missing.pth"), str(tmp_path / "o.safetensors"))


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
    x, branch = torch.zeros(64, 3, 2), torch.ones(64, 3, 2)
    torch.manual_seed(0)
    y = mit.add_drop_path(x, branch, 0.5, training=True)
    per_sample = y.flatten(1)
    assert ((per_sample == 0).all(1) | (per_sample == 2).all(1)).all()  # dropped, or kept and scaled by 1/(1-p)
    assert 10 < (per_sample[:, 0] == 0).sum() < 54
    assert torch.equal(mit.add_drop_path(x, branch, 0.5, training=False), branch)
