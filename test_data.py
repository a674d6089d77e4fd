"""Tests for data.py on tiny trees written in the datasets' exact original layouts."""
import os

import numpy as np
import pytest
import torch
from PIL import Image

import data
from data import DatasetError

# the official labelId -> trainId table, written out again so the test does not trust data.py's copy
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
    got = data.read_label(data.Sample("unused", str(tmp_path / "l.png")))
    want = np.array([_DATA_ID_TO_TRAIN.get(int(i), 255) for i in ids.ravel()]).reshape(16, 16)
    assert np.array_equal(got, want)
    Image.fromarray(ids).save(tmp_path / "t.png")  # a labelTrainIds file: 0..18 kept, the rest ignored
    got = data.read_label(data.Sample("unused", str(tmp_path / "t.png"), train_ids=True))
    assert np.array_equal(got, np.where(ids < 19, ids, 255))
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
    assert first["lbl"].dtype == torch.int64 and first["img"].dtype == torch.float32


def test_gta_label_of_another_size_is_aligned_or_rejected(tmp_path):
    _data_gta(tmp_path, n=1, h=48, w=64)
    ids = np.zeros((24, 32), np.uint8)
    ids[:, 16:] = 26  # car on the right half
    _data_palette_png(tmp_path / "gta5/labels/00001.png", ids)  # half size, same aspect ratio
    img, lbl = data.read_pair(data.list_gta5(str(tmp_path))[0])
    assert lbl.shape == img.shape[:2] == (48, 64)
    assert (lbl[:, :32] == 255).all() and (lbl[:, 32:] == 13).all()
    _data_palette_png(tmp_path / "gta5/labels/00001.png", np.zeros((64, 48), np.uint8))  # transposed
    with pytest.raises(DatasetError, match=r"48x64 but its image .* is 64x48.*aspect"):
        data.read_pair(data.list_gta5(str(tmp_path))[0])


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
    samples = data.list_gta5(str(root))
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
    with pytest.raises(DatasetError, match=r"cityscapes not found.*leftImg8bit.*gtFine_trainvaltest.zip"):
        data.make_train_loader(str(tmp_path), cache_dir=str(tmp_path / "cache"))
    os.makedirs(tmp_path / "cityscapes/leftImg8bit/val")
    os.makedirs(tmp_path / "cityscapes/gtFine/val")
    with pytest.raises(DatasetError, match="no images found for cityscapes split 'val'"):
        data.make_val_loader(str(tmp_path))


def test_image_without_label_is_named(tmp_path):
    _data_gta(tmp_path, n=2)
    os.remove(tmp_path / "gta5/labels/00002.png")
    with pytest.raises(DatasetError, match=r"00002.png has no label: expected .*labels.00002.png"):
        data.list_gta5(str(tmp_path))
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


def test_demo_data_is_read_by_the_same_loaders(tmp_path):
    data.make_demo_data(str(tmp_path), seed=0, n_src=8, n_tgt=4, n_val=4)
    assert sorted(os.listdir(tmp_path)) == ["cityscapes", "gta5"]  # written aside, then moved in whole
    assert Image.open(tmp_path / "gta5/labels/00001.png").mode == "P"
    assert Image.open(tmp_path / "gta5/images/00001.png").size == (384, 216)
    gt = sorted(os.listdir(tmp_path / "cityscapes/gtFine/val/frankfurt"))
    assert gt == ["frankfurt_000000_000019_gtFine_color.png", "frankfurt_000000_000019_gtFine_labelIds.png",
                  "frankfurt_000001_000019_gtFine_color.png", "frankfurt_000001_000019_gtFine_labelIds.png"]
    demo = {k: data.DEMO[k] for k in ("src_scale", "tgt_scale", "crop", "rcs_min_pixels")}
    batch = next(data.make_train_loader(str(tmp_path), batch_size=2, workers=0, cache_dir=str(tmp_path / "c"),
                                        **demo))
    assert batch["src_img"].shape == batch["tgt_img"].shape == (2, 3, 128, 128)
    val = list(data.make_val_loader(str(tmp_path), scale=data.DEMO["tgt_scale"], batch_size=2, workers=0))
    assert len(val) == 2 and val[0]["img"].shape == (2, 3, 128, 256) and val[0]["lbl"].shape == (2, 256, 512)
    present = set(np.unique(data.class_pixel_counts(data.list_gta5(str(tmp_path)), str(tmp_path / "c")).nonzero()[1]))
    assert len(present) >= 10 and {0, 2, 5, 8, 10, 11, 13} <= present
    assert (val[0]["lbl"] == 255).any()  # the ego car's label id maps to ignore
    img, lbl = data.demo_scene(np.random.default_rng([0, 0, 0]), 216, 384, data.DEMO_DOMAINS["source"])
    assert np.array_equal(np.asarray(Image.open(tmp_path / "gta5/images/00001.png")), img)  # same seed, same pixels
