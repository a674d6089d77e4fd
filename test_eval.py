"""Tests of eval.py: the metric on hand-made maps, the whole evaluator against a hand count, colored predictions,
released mmseg checkpoints (round trip, and a malicious pickle that must not run), the command line."""
import collections
import os
import pickle
import re
import runpy
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

import data
import eval as ev
import ssr

_EVAL_FILE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "eval.py")
# Cityscapes label id of each train id, written out here so that the test does not trust data.py's table
_EVAL_LABEL_IDS = (7, 8, 11, 12, 13, 17, 19, 20, 21, 22, 23, 24, 25, 26, 27, 28, 31, 32, 33)
_EVAL_TINY = dict(backbone="mit_b0", mit=dict(embed_dims=(16, 32, 40, 64), depths=(1, 1, 1, 1)), channels=32)


def _eval_tiny(seed: int = 0, **kw) -> ssr.Segmentor:
    torch.manual_seed(seed)
    return ssr.build_segmentor(ssr.SegConfig(**{**_EVAL_TINY, **kw}))


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
    assert ev.window_boxes(512, 1024, 512, 341) == [(0, 512, 0, 512), (0, 512, 341, 853), (0, 512, 512, 1024)]
    assert ev.window_boxes(128, 256, 512, 341) == [(0, 128, 0, 256)]  # smaller than a window: the whole image
    cover = torch.zeros(300, 700)
    for y1, y2, x1, x2 in ev.window_boxes(300, 700, 128, 85):
        assert (y2 - y1, x2 - x1) == (128, 128)
        cover[y1:y2, x1:x2] += 1
    assert cover.min() >= 1


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
    cfg, skipped = ev.convert_mmseg(src, dst)
    assert f"{__name__}._EvalConfigDict" in skipped and any(s.endswith("multiarray._reconstruct") for s in skipped)
    assert (cfg.num_classes, cfg.channels, tuple(cfg.mit["embed_dims"]), tuple(cfg.mit["depths"])) == (
        19, 32, (16, 32, 40, 64), (1, 1, 1, 1))
    model, meta = ssr.load_segmentor(dst)
    assert meta["dataset"] == "cityscapes" and list(meta["test_scale"]) == [1024, 512]
    ours, theirs = model.state_dict(), student.state_dict()
    assert ours.keys() == theirs.keys()
    assert all(torch.equal(ours[k], theirs[k]) for k in theirs)  # the student, not the EMA teacher or ImageNet copy


@pytest.mark.parametrize("name", ["mit_b0", "mit_b5"])
def test_convert_infers_the_preset(name):
    with torch.device("meta"):  # shapes only: nothing is allocated
        model = ssr.build_segmentor(ssr.SegConfig(backbone=name))
    cfg = ev.config_from_state_dict(model.state_dict(), "test")
    assert (cfg.backbone, cfg.mit, cfg.num_classes, cfg.channels) == (name, {}, 19, 256)


def test_malicious_pickle_is_not_run(tmp_path):
    marker = tmp_path / "pwned"
    bad = str(tmp_path / "bad.pth")
    _eval_save_released(bad, _eval_tiny(), meta_extra={"hook": _EvalPayload(str(marker))})
    torch.load(bad, weights_only=False)  # the payload works when unpickled the unsafe way ...
    assert marker.exists()
    marker.unlink()
    _, skipped = ev.convert_mmseg(bad, str(tmp_path / "out.safetensors"))  # ... and does not run here
    assert not marker.exists()
    assert f"{os.system.__module__}.system" in skipped
    # a payload in place of a weight is refused, and does not run either
    _eval_save_released(bad, _eval_tiny(), sd_extra={"model.backbone.evil": _EvalPayload(str(marker))})
    with pytest.raises(ValueError, match="model.backbone.evil|backbone.evil"):
        ev.convert_mmseg(bad, str(tmp_path / "out2.safetensors"))
    assert not marker.exists()


# ----------------------------------------------------------------------------------------------------------------
# command line


def _eval_cli(monkeypatch, *args) -> str:
    """Run eval.py's __main__ in this process; return the SystemExit message ('' when it ends normally)."""
    monkeypatch.setattr(sys, "argv", ["eval.py", *args])
    try:
        runpy.run_path(_EVAL_FILE, run_name="__main__")
    except SystemExit as e:
        return str(e.code)
    return ""


def test_cli_end_to_end(tmp_path):
    train = _eval_write_val(tmp_path)
    ckpt = str(tmp_path / "model.safetensors")
    ssr.save_segmentor(_eval_forced(0), ckpt, dataset="cityscapes", test_scale=[64, 32])
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
    ssr.save_segmentor(_eval_tiny(), good, dataset="cityscapes", test_scale=[64, 32])
    ssr.save_segmentor(_eval_tiny(num_classes=16), k16, dataset="cityscapes", test_scale=[64, 32])
    with open(foreign, "w") as f:
        f.write("not a checkpoint")
    notmmseg = str(tmp_path / "plain.pth")
    torch.save({"weights": torch.zeros(3)}, notmmseg)
    cases = [
        (["--ckpt", foreign], "foreign.safetensors"),
        (["--ckpt", k16, "--data-root", str(tmp_path / "ok")], "16 classes"),
        (["--ckpt", good, "--data-root", str(tmp_path / "nolabels")], "gtFine|label"),
        (["--convert-mmseg", str(tmp_path / "nope.pth"), str(tmp_path / "o.safetensors")], "nope.pth"),
        (["--convert-mmseg", notmmseg, str(tmp_path / "o.safetensors")], "plain.pth"),
        (["--convert-mmseg", notmmseg, str(tmp_path / "no" / "o.safetensors")], "does not exist"),
    ]
    for args, pattern in cases:
        msg = _eval_cli(monkeypatch, *args, "--workers", "0")
        assert msg.startswith("error:") and re.search(pattern, msg), (args, msg)
        assert "\n" not in msg.strip()  # one paragraph
