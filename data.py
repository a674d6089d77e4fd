"""DAFormer's data pipeline on the datasets that datasets.py lists: reading the pixels, the transforms, rare class
sampling and the loaders.

No preparation step: GTA5 palette labels, SYNTHIA's 16-bit label PNGs and Cityscapes-style `_labelIds` are mapped to
the 19 train ids on the fly, and the rare-class statistics are computed on first use and cached outside the dataset
folder. Every random choice of the training sample at global position k comes from np.random.default_rng([seed, k]),
so a batch is a function of (seed, iteration, rank) alone: resuming or changing the worker count changes nothing.
demo.py writes its two synthetic domains in the very same layouts, so the demo runs the real code path.
The files it writes (the statistics' cache) go through files.py.
"""
import hashlib
import itertools
import os
import struct
from typing import Iterator

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch.utils.data import DataLoader, Dataset, Sampler, default_collate

from datasets import ACDC_CONDITIONS, PNG_SIGNATURE, SOURCES, TARGETS, Sample, check_label_fits, list_dataset
from files import DatasetError, cache_folder, check_cache_folder, save_atomic, worker_pool

CLASSES = ("road", "sidewalk", "building", "wall", "fence", "pole", "traffic light", "traffic sign", "vegetation",
           "terrain", "sky", "person", "rider", "car", "truck", "bus", "train", "motorcycle", "bicycle")
PALETTE = ((128, 64, 128), (244, 35, 232), (70, 70, 70), (102, 102, 156), (190, 153, 153), (153, 153, 153),
           (250, 170, 30), (220, 220, 0), (107, 142, 35), (152, 251, 152), (70, 130, 180), (220, 20, 60),
           (255, 0, 0), (0, 0, 142), (0, 0, 70), (0, 60, 100), (0, 80, 100), (0, 0, 230), (119, 11, 32))
MEAN = (123.675, 116.28, 103.53)  # ImageNet, 0..255 scale (= SAM's pixel mean/std)
STD = (58.395, 57.12, 57.375)
IGNORE = 255
LABEL_IDS = (7, 8, 11, 12, 13, 17, 19, 20, 21, 22, 23, 24, 25, 26, 27, 28, 31, 32, 33)  # Cityscapes id of train id i

# 256-entry lookup tables: any byte a label PNG can hold maps to a train id or IGNORE
ID_TO_TRAIN = np.full(256, IGNORE, np.uint8)
ID_TO_TRAIN[list(LABEL_IDS)] = np.arange(19)
TRAIN_TO_TRAIN = np.full(256, IGNORE, np.uint8)
TRAIN_TO_TRAIN[:19] = np.arange(19)  # a `_labelTrainIds.png` is used as is (other values: see _raw_label)
# SYNTHIA class id of train id i, as DAFormer's tools/convert_datasets/synthia.py (from SYNTHIA's README.txt);
# 16 (terrain), 18 (truck) and 20 (train) never occur in SYNTHIA-RAND-CITYSCAPES. The ids are 16-bit values.
SYNTHIA_IDS = (3, 4, 2, 21, 5, 7, 15, 9, 6, 16, 1, 10, 17, 8, 18, 19, 20, 12, 11)
SYNTHIA_TO_TRAIN = np.full(2 ** 16, IGNORE, np.uint8)
SYNTHIA_TO_TRAIN[list(SYNTHIA_IDS)] = np.arange(19)
SYNTHIA_CLASSES = tuple(i for i, c in enumerate(CLASSES) if c not in ("terrain", "truck", "train"))  # mIoU16
SYNTHIA_CLASSES_13 = tuple(i for i in SYNTHIA_CLASSES if CLASSES[i] not in ("wall", "fence", "pole"))  # mIoU13

RCS_TEMPERATURE = 0.01  # DAFormer: p_c ∝ exp((1 - f_c) / T)
RCS_MIN_CROP_RATIO = 0.5  # the crop must keep > min_crop_ratio * min_pixels pixels of the sampled class
CAT_MAX_RATIO = 0.75  # mmseg RandomCrop: no class may cover 75% of a source crop


# ----------------------------------------------------------------------------------------------------------------
# reading files

def _open(path: str, what: str) -> Image.Image:
    try:
        im = Image.open(path)
        im.load()  # PIL decodes lazily: a truncated file only fails here
        return im
    except (OSError, SyntaxError, ValueError) as e:
        raise DatasetError(f"cannot read {what} {path} ({e}). The file is truncated or not a PNG; "
                           f"re-extract it from the dataset archive.") from None


def rgb_pixels(im: Image.Image, path: str) -> np.ndarray:
    """(H, W, 3) uint8 of a picture in any mode Pillow opens one in (path: for the error), writable for
    torch.from_numpy. An alpha channel is dropped, the colours under it kept.

    Pillow's convert("RGB") is right for the 8-bit modes (1, L, LA, P, PA, RGB, RGBA, RGBa, RGBX, CMYK, YCbCr, LAB,
    HSV) but clips the wider ones at 255, so a 16-bit photo would come out white. Those are scaled by their range:
    I;16, I;16B, I;16L, I;16N (16-bit PNG and TIFF) and I (32-bit, which Pillow's PGM reader gives 16-bit values in)
    from 0..65535, F (float TIFF) from 0..1. A value outside its range, or a mode not named here, is refused."""
    mode = im.mode
    if mode.startswith("I;16") or mode in ("I", "F"):
        values = np.asarray(im)  # (H, W): uint16 (either byte order), int32 or float32
        top = 1.0 if mode == "F" else 65535
        lo, hi = (values.min(), values.max()) if values.size else (0, 0)
        if not 0 <= lo <= hi <= top:  # NaN fails too
            raise DatasetError(f"{path}: a {'float' if mode == 'F' else '32-bit integer'} picture, mode {mode}, with "
                               f"values from {lo:g} to {hi:g}, outside the range 0..{top:g} it is read in; save it as "
                               f"an 8- or 16-bit PNG.")
        gray = np.rint(values.astype(np.float32) * (255 / top)).astype(np.uint8)  # 65535 -> 255, 32768 -> 128
        return np.repeat(gray[..., None], 3, axis=2)
    if mode == "La":  # luminance with premultiplied alpha: Pillow converts it to RGB only through LA
        im = im.convert("LA")
    elif mode not in ("1", "L", "LA", "P", "PA", "RGB", "RGBA", "RGBa", "RGBX", "CMYK", "YCbCr", "LAB", "HSV"):
        raise DatasetError(f"{path}: pixel mode {mode}, which is not read as a colour picture here; save it as an "
                           f"RGB PNG or JPEG.")
    return np.array(im.convert("RGB"))


def read_image(path: str) -> np.ndarray:
    return rgb_pixels(_open(path, "image"), path)  # (H, W, 3) uint8


def _label_values(path: str) -> np.ndarray:
    """(H, W) uint8 raw values of a label PNG. GTA5 'P' images hold label ids as palette indices: read those."""
    im = _open(path, "label")
    if im.mode not in ("P", "L"):
        raise DatasetError(f"label {path} has mode {im.mode}; expected a single-channel PNG of Cityscapes "
                           f"label ids (palette or grayscale), not a color visualisation.")
    return np.asarray(im)


def read_png16_rgb(path: str) -> np.ndarray:
    """(H, W, 3) uint16 values of a 16-bit RGB PNG (colour type 2, not interlaced), as SYNTHIA's labels are.

    Pillow opens such a file as 8-bit 'RGB' and keeps only each value's high byte (a SYNTHIA class id < 256 reads
    as 0), and has no 16-bit RGB mode. Its PNG decoder ('zip': inflate and the five scanline filters, in C) is still
    sound: Image.frombytes with raw mode 'RGB;16B' gives the high byte of each big-endian value, 'RGB;16L' (which
    reads pairs as little-endian) the second, low one. So we find the chunks here and let Pillow decode twice;
    the tests check every filter type against files written by hand."""
    try:
        with open(path, "rb") as f:
            blob = f.read()
    except OSError as e:
        raise DatasetError(f"cannot read label {path} ({e.strerror}).") from None
    if blob[:8] != PNG_SIGNATURE:
        raise DatasetError(f"label {path} is not a PNG file; re-extract it from the SYNTHIA-RAND-CITYSCAPES archive.")
    header, idat, pos = None, [], 8
    while pos + 8 <= len(blob):  # chunk: length (4 bytes), type (4), data, CRC (4)
        length, kind = struct.unpack(">I4s", blob[pos:pos + 8])
        if kind == b"IHDR" and pos + 21 <= len(blob):
            header = struct.unpack(">IIBBBBB", blob[pos + 8:pos + 21])  # w, h, depth, colour, compr, filter, interl.
        elif kind == b"IDAT":
            idat.append(blob[pos + 8:pos + 8 + length])
        elif kind == b"IEND":
            break
        pos += 12 + length
    if header is None or not idat:
        raise DatasetError(f"label {path} is truncated (no image header or data); re-extract it from the archive.")
    w, h, depth, colour, _, _, interlace = header
    if (depth, colour, interlace) != (16, 2, 0):
        kind = {0: "grayscale", 2: "RGB", 3: "palette", 4: "grayscale+alpha", 6: "RGBA"}.get(colour, "unknown")
        raise DatasetError(f"label {path} is a {depth}-bit {kind}{' interlaced' if interlace else ''} PNG; SYNTHIA "
                           f"labels (GT/LABELS) are 16-bit RGB PNGs, not interlaced, with the class id in the first "
                           f"channel. Use the GT/LABELS files of SYNTHIA-RAND-CITYSCAPES as downloaded.")
    data = b"".join(idat)
    try:
        hi, lo = (np.asarray(Image.frombytes("RGB", (w, h), data, "zip", raw)) for raw in ("RGB;16B", "RGB;16L"))
    except (OSError, ValueError) as e:
        raise DatasetError(f"cannot decode label {path} ({e}); the file is truncated or damaged. Re-extract it "
                           f"from the SYNTHIA-RAND-CITYSCAPES archive.") from None
    return (hi.astype(np.uint16) << 8) | lo


def _raw_label(sample: Sample) -> tuple[np.ndarray, np.ndarray]:
    """(H, W) raw values of the label file and the lookup table that maps them to train ids."""
    if sample.synthia:
        return read_png16_rgb(sample.lbl)[..., 0], SYNTHIA_TO_TRAIN  # channels 1, 2: instance ids, unused
    values = _label_values(sample.lbl)
    if not sample.train_ids:
        return values, ID_TO_TRAIN
    # A train-id file holds 0-18 and 255 only. Label ids saved under its name show values 19-254 (vegetation 21,
    # sky 23, car 26, ...) in almost any street scene, so they are caught; one whose ids all lie in 0-18 is not.
    stray = np.unique(values[(values > 18) & (values != IGNORE)])
    if stray.size:
        raise DatasetError(f"label {sample.lbl} holds the values {', '.join(map(str, stray[:5]))}, which are no train "
                           f"ids (0-18, and 255 for ignored pixels): it looks like a file of label ids saved as "
                           f"_labelTrainIds.png. Replace it with the _labelTrainIds.png of the dataset's archive, or "
                           f"delete it so that the _labelIds.png beside it is read and mapped.")
    return values, TRAIN_TO_TRAIN


def read_label(sample: Sample) -> np.ndarray:
    """(H, W) uint8 train ids / IGNORE."""
    values, lut = _raw_label(sample)
    return lut[values]


def read_pair(sample: Sample) -> tuple[np.ndarray, np.ndarray]:
    """Image and label at the image's size.

    A few GTA5 labels differ in size from their image. When the aspect ratios agree the label is resized onto
    the image with nearest neighbour (the pipeline resizes both to the training scale anyway, so this only fixes
    the alignment); any other mismatch cannot be aligned and is an error, never a silent misalignment."""
    img, lbl = read_image(sample.img), read_label(sample)
    (h, w), (lh, lw) = img.shape[:2], lbl.shape
    if (lh, lw) != (h, w):
        check_label_fits(sample, (w, h), (lw, lh), exact=False)
        lbl = resize_label(lbl, (w, h))
    return img, lbl


# ----------------------------------------------------------------------------------------------------------------
# transforms, with mmseg/mmcv semantics

def rescale_size(w: int, h: int, scale: tuple[int, int]) -> tuple[int, int]:
    """mmcv.rescale_size: the largest size with the image's ratio that fits inside scale (either orientation)."""
    factor = min(max(scale) / max(h, w), min(scale) / min(h, w))
    return int(w * factor + 0.5), int(h * factor + 0.5)


def resize_image(img: np.ndarray, size: tuple[int, int]) -> torch.Tensor:
    """(H, W, 3) uint8 -> (3, h, w) float32 in 0..255. Bilinear with half-pixel centres and no antialiasing, as
    cv2.INTER_LINEAR in mmcv; rounded because cv2 returns uint8."""
    # the (3, H, W) view of the HWC array stays channels-last: bilinear on it took 38 ms for 1914x1052 -> 1280x704 and
    # 24 ms for 2048x1024 -> 1024x512, a contiguous NCHW copy 60 and 49 ms (same output; 1 thread, loaded 2-core VM)
    x = torch.from_numpy(np.ascontiguousarray(img)).permute(2, 0, 1).float()
    if (x.shape[2], x.shape[1]) != tuple(size):
        x = F.interpolate(x[None], size=(size[1], size[0]), mode="bilinear", align_corners=False)[0]
    return x.round_().clamp_(0, 255)


def resize_label(lbl: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Nearest neighbour as cv2.INTER_NEAREST: output pixel i reads source pixel floor(i * src / dst)."""
    (h, w), (nw, nh) = lbl.shape, size
    rows = np.arange(nh) * h // nh
    cols = np.arange(nw) * w // nw
    return lbl[rows[:, None], cols[None, :]]


def normalize(img: torch.Tensor, scale: float = 255.0) -> torch.Tensor:
    """RGB (..., 3, H, W) with values in 0..scale -> the networks' input: ImageNet mean 0 and std 1 per channel.
    The project's one convention: the loaders use scale 255, ssr's color jitter works in 0..1."""
    # Per channel with Python constants: 7 small ops, but no (3,) tensor of MEAN/STD to copy to the GPU, a copy
    # from pageable memory that waits for the stream (not measured; with such tensors it is 3 ops and 2 copies).
    return torch.stack([(img[..., c, :, :] * (255 / scale) - MEAN[c]) / STD[c] for c in range(3)], dim=-3)


def denormalize(x: torch.Tensor, scale: float = 255.0) -> torch.Tensor:
    """Inverse of normalize: the networks' input (..., 3, H, W) -> RGB with values in 0..scale."""
    return torch.stack([x[..., c, :, :] * (STD[c] * scale / 255) + MEAN[c] * scale / 255 for c in range(3)], dim=-3)


def random_crop_box(rng: np.random.Generator, h: int, w: int, crop: int) -> tuple[int, int]:
    return int(rng.integers(0, max(h - crop, 0) + 1)), int(rng.integers(0, max(w - crop, 0) + 1))


def cat_max_crop(rng: np.random.Generator, lbl: np.ndarray, crop: int,
                 cat_max_ratio: float = CAT_MAX_RATIO) -> tuple[int, int]:
    """mmseg RandomCrop: redraw up to 10 times until the crop holds more than one class and none covers
    cat_max_ratio of the labelled pixels; after 10 failures the 11th box is kept unchecked, as in mmseg."""
    y, x = random_crop_box(rng, *lbl.shape, crop)
    for _ in range(10):
        counts = np.bincount(lbl[y:y + crop, x:x + crop].ravel(), minlength=256)[:IGNORE]
        counts = counts[counts > 0]
        if len(counts) > 1 and counts.max() / counts.sum() < cat_max_ratio:
            break
        y, x = random_crop_box(rng, *lbl.shape, crop)
    return y, x


def crop_flip(rng: np.random.Generator, img: torch.Tensor, lbl: np.ndarray | None, crop: int):
    """RandomCrop (cat_max_ratio when there is a label) then RandomFlip(0.5), on a resized (3, h, w) image."""
    h, w = img.shape[1:]
    y, x = cat_max_crop(rng, lbl, crop) if lbl is not None else random_crop_box(rng, h, w, crop)
    img = img[:, y:y + crop, x:x + crop]
    lbl = lbl[y:y + crop, x:x + crop] if lbl is not None else None
    if rng.random() < 0.5:
        img = img.flip(-1)
        lbl = lbl[:, ::-1] if lbl is not None else None
    return img, lbl


def finish(img: torch.Tensor, lbl: np.ndarray | None, crop: int):
    """Normalize, then pad bottom/right to crop x crop (image 0 after normalization, label IGNORE), as mmseg."""
    img = normalize(img)
    pad = (0, crop - img.shape[2], 0, crop - img.shape[1])
    img = F.pad(img, pad, value=0.0)
    if lbl is None:
        return img, None
    return img, F.pad(torch.from_numpy(lbl.astype(np.int64)), pad, value=IGNORE)


# ----------------------------------------------------------------------------------------------------------------
# rare class sampling (DAFormer)

def _count_classes(sample: Sample) -> np.ndarray:
    """Pixels per train id in one label at its original resolution, as DAFormer's convert script counts them."""
    values, lut = _raw_label(sample)
    per_value = np.bincount(values.ravel(), minlength=len(lut))  # count raw values, then map
    return np.bincount(lut, weights=per_value, minlength=256)[:19].astype(np.int64)


def class_pixel_counts(samples: list[Sample], cache_dir: str | None = None) -> np.ndarray:
    """(N, 19) int64 pixel counts, cached in cache_dir under a hash of the label paths, sizes and mtimes, so a
    changed dataset is recomputed and the dataset folder (maybe read-only) is never written. A cache entry that
    cannot be read (cut short, say) is computed again."""
    cache_dir = cache_dir or cache_folder()
    key = hashlib.sha1()
    for s in samples:
        st = os.stat(s.lbl)
        key.update(f"{os.path.abspath(s.lbl)}|{s.train_ids}|{st.st_size}|{st.st_mtime_ns}\n".encode())
    path = os.path.join(cache_dir, f"rcs_counts_{key.hexdigest()[:20]}.npy")
    try:
        counts = np.load(path)
        if counts.shape == (len(samples), 19):
            return counts
    except (OSError, ValueError, EOFError):  # absent, empty or damaged: computed anew
        pass
    check_cache_folder(cache_dir)  # before the minutes of counting
    print(f"computing rare-class statistics of {len(samples)} labels (once, cached in {path})", flush=True)
    if len(samples) < 256:
        counts = [_count_classes(s) for s in samples]
    else:
        with worker_pool(16) as pool:
            counts = pool.map(_count_classes, samples, chunksize=64)
    counts = np.stack(counts).astype(np.int64)
    save_atomic(path, lambda tmp: _write_npy(tmp, counts))
    return counts


def _write_npy(path: str, array: np.ndarray) -> None:
    with open(path, "wb") as f:  # a file object: np.save would add '.npy' to a path
        np.save(f, array)


def rcs_tables(counts: np.ndarray, min_pixels: int = 3000,
               temperature: float = RCS_TEMPERATURE) -> tuple[np.ndarray, np.ndarray, list[np.ndarray]]:
    """From (N, 19) counts: the sampled classes, their probabilities, and per class the images to draw from.

    As DAFormer: only classes present in the data, f_c over those classes, p_c = softmax((1 - f_c) / T), and an
    image qualifies for class c with strictly more than min_pixels pixels of it. DAFormer asserts that every
    class has a qualifying image; here a class without one is dropped and the others renormalized."""
    total = counts.sum(0)
    classes = np.flatnonzero(total > 0)
    logits = (1 - total[classes] / total[classes].sum()) / temperature
    images = [np.flatnonzero(counts[:, c] > min_pixels) for c in classes]
    keep = np.array([len(i) > 0 for i in images], bool)
    if not keep.any():
        raise DatasetError(f"rare class sampling found no source label with more than {min_pixels} pixels of any "
                           f"class; the labels are empty or tiny. Disable rare class sampling or check the labels.")
    logits = logits[keep]
    probs = np.exp(logits - logits.max())
    return classes[keep], probs / probs.sum(), [i for i, k in zip(images, keep) if k]


# ----------------------------------------------------------------------------------------------------------------
# datasets and loaders

class TrainSamples(Dataset):
    """Item k: the (source crop, source label, target crop) for global sample position k, from rng([seed, k])."""

    def __init__(self, source: list[Sample], target: list[Sample], *, crop: int, seed: int, src_scale, tgt_scale,
                 rcs: tuple | None, rcs_min_pixels: int):
        self.source, self.target, self.crop, self.seed = source, target, crop, seed
        self.src_scale, self.tgt_scale, self.rcs, self.rcs_min_pixels = src_scale, tgt_scale, rcs, rcs_min_pixels

    def _source(self, rng: np.random.Generator):
        if self.rcs is not None:
            classes, probs, images = self.rcs
            j = rng.choice(len(classes), p=probs)
            c, i = classes[j], rng.choice(images[j])
        else:
            c, i = None, rng.integers(len(self.source))
        img, lbl = read_pair(self.source[i])
        size = rescale_size(img.shape[1], img.shape[0], self.src_scale)
        img, lbl = resize_image(img, size), resize_label(lbl, size)
        s_img, s_lbl = crop_flip(rng, img, lbl, self.crop)
        if c is not None:
            # DAFormer reruns the pipeline up to 10 times until the crop keeps enough of the sampled class;
            # loading and resizing are deterministic, so only the crop and flip are redrawn
            for _ in range(10):
                if (s_lbl == c).sum() > self.rcs_min_pixels * RCS_MIN_CROP_RATIO:
                    break
                s_img, s_lbl = crop_flip(rng, img, lbl, self.crop)
        return finish(s_img, s_lbl, self.crop)

    def _target(self, rng: np.random.Generator) -> torch.Tensor:
        # a plain random crop, as DAFormer's released Cityscapes pipeline: target labels are never read in training
        img = read_image(self.target[rng.integers(len(self.target))].img)
        img = resize_image(img, rescale_size(img.shape[1], img.shape[0], self.tgt_scale))
        return finish(crop_flip(rng, img, None, self.crop)[0], None, self.crop)[0]

    def __getitem__(self, k: int):
        try:
            rng = np.random.default_rng([self.seed, k])
            src_img, src_lbl = self._source(rng)
            return {"src_img": src_img, "src_lbl": src_lbl, "tgt_img": self._target(rng)}
        except DatasetError as e:
            return e  # returned, not raised: a worker's raise would reach the user wrapped in its traceback


class ValSamples(Dataset):
    """Cityscapes-style evaluation: image resized to `scale` keeping its ratio, label at full resolution; an
    unlabelled (test) sample gives its image's full size (w, h) instead, the size its prediction is written at."""

    def __init__(self, samples: list[Sample], scale):
        self.samples, self.scale = samples, scale

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i: int):
        s = self.samples[i]
        try:
            img = read_image(s.img)
            (h, w), scaled = img.shape[:2], resize_image(img, rescale_size(img.shape[1], img.shape[0], self.scale))
            if s.lbl is None:
                return {"img": normalize(scaled), "size": torch.tensor((w, h)), "path": s.img}
            lbl = read_label(s)
            check_label_fits(s, (w, h), lbl.shape[::-1], exact=True)
            # uint8 (train ids and 255): a 2048x1024 label is 2 MB to pass from a worker and copy to the GPU,
            # not 16 MB as int64; the evaluator widens it on the device
            return {"img": normalize(scaled), "lbl": torch.from_numpy(lbl.astype(np.uint8)), "path": s.img}
        except DatasetError as e:
            return e


class Positions(Sampler):
    """Infinite global sample positions of one rank: iteration it, slot j -> (it * world + rank) * batch + j."""

    def __init__(self, start_iter: int, batch_size: int, rank: int, world_size: int):
        self.start_iter, self.batch_size, self.rank, self.world_size = start_iter, batch_size, rank, world_size

    def __iter__(self):
        for it in itertools.count(self.start_iter):
            first = (it * self.world_size + self.rank) * self.batch_size
            yield from range(first, first + self.batch_size)


def _collate(items: list):
    errors = [e for e in items if isinstance(e, DatasetError)]
    if errors:
        return errors[0]
    key = "lbl" if "lbl" in items[0] else "img"  # evaluation's full-size labels, or test images at the test scale
    if "path" in items[0] and len({tuple(it[key].shape) for it in items}) > 1:
        sizes = ", ".join(f"{it['path']}: {tuple(it[key].shape)}" for it in items)
        return DatasetError(f"the images of one evaluation batch differ in size ({sizes}); they only batch when "
                            f"they share a size. Use --batch-size 1.")
    return default_collate(items)


class CleanLoader(DataLoader):
    """A DataLoader that re-raises a DatasetError from a worker with its own message, not a worker traceback.

    Both loaders get their own torch.Generator (for the worker seeds DataLoader draws, which nothing here uses):
    with the default one, creating or iterating a loader would shift torch's global random stream, and a resumed
    run, which iterates its loaders at other moments, would no longer mix and jitter like the uninterrupted one."""

    def __iter__(self):
        for batch in super().__iter__():
            if isinstance(batch, DatasetError):
                break
            yield batch
        else:
            return
        # raised after the loop let go of the worker iterator, so the workers stop now: a traceback that held it
        # would leave it to the cyclic gc, which closes the worker queues first and then waits 5 s per worker
        raise DatasetError(str(batch)) from None


def make_train_loader(data_root: str, src: str = "gta5", tgt: str = "cityscapes", *, crop: int = 512,
                      batch_size: int = 2, seed: int = 0, start_iter: int = 0, workers: int = 2, rank: int = 0,
                      world_size: int = 1, src_scale=None, tgt_scale=None, rcs: bool = True,
                      cache_dir: str | None = None, pin_memory: bool = False, rcs_min_pixels: int | None = None,
                      conditions=ACDC_CONDITIONS) -> Iterator[dict]:
    """Infinite iterator of training batches; the k-th batch is iteration start_iter + k.

    Batches: src_img float32 (B, 3, crop, crop) normalized, src_lbl int64 (B, crop, crop) train ids / 255,
    tgt_img float32 (B, 3, crop, crop). The scales and rcs_min_pixels default to DAFormer's, datasets.SOURCES[src]
    and TARGETS[tgt]; `conditions`: ACDC's to train on."""
    source = list_dataset(data_root, src, "train")
    src_scale, rcs_min_pixels = src_scale or SOURCES[src]["scale"], rcs_min_pixels or SOURCES[src]["rcs_min_pixels"]
    tgt_scale = tgt_scale or TARGETS[tgt]["scale"]
    target = list_dataset(data_root, tgt, "train", need_labels=False, conditions=conditions)
    tables = rcs_tables(class_pixel_counts(source, cache_dir), rcs_min_pixels) if rcs else None
    dataset = TrainSamples(source, target, crop=crop, seed=seed, src_scale=src_scale, tgt_scale=tgt_scale,
                           rcs=tables, rcs_min_pixels=rcs_min_pixels)
    # no persistent_workers: it only keeps workers across epochs, and this one iterator never ends
    loader = CleanLoader(dataset, batch_size=batch_size, sampler=Positions(start_iter, batch_size, rank, world_size),
                         num_workers=workers, pin_memory=pin_memory, collate_fn=_collate, generator=torch.Generator())
    return iter(loader)


def next_batch(batches: Iterator[dict]) -> tuple[dict | None, DatasetError | None]:
    """The next training batch, or the files.DatasetError met reading it, returned rather than raised: train.py's
    ranks first agree that one of them met it (processes.agree), then all stop alike."""
    try:
        return next(batches), None
    except DatasetError as e:
        return None, e


def make_val_loader(data_root: str, tgt: str = "cityscapes", split: str = "val", *, scale=None,
                    batch_size: int = 1, workers: int = 2, pin_memory: bool = False,
                    conditions=ACDC_CONDITIONS) -> DataLoader:
    """Batches {'img': (B, 3, h, w) normalized at `scale` (default: TARGETS[tgt]'s), 'lbl': uint8 (B, H, W) full
    resolution, 'path'}; of the test split, whose labels are the servers', {'img', 'size': (B, 2) (w, h), 'path'}."""
    samples = list_dataset(data_root, tgt, split, need_labels=split != "test", conditions=conditions)
    scale = scale or TARGETS[tgt]["scale"]
    return CleanLoader(ValSamples(samples, scale), batch_size=batch_size, shuffle=False, num_workers=workers,
                       collate_fn=_collate, generator=torch.Generator(), pin_memory=pin_memory)
