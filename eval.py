"""
Evaluate a segmentor on the target validation set in the protocol of mmsegmentation/DAFormer, and convert the
released DAFormer/MIC checkpoints.

    python eval.py --ckpt runs/demo_seed0/model.safetensors                             # table, images/s, mIoU
    python eval.py --ckpt model.safetensors --save-dir preds --side-by-side          # also colored predictions
    python eval.py --ckpt model.safetensors --images photos/ --save-dir preds        # your own images, no labels
    python eval.py --convert-mmseg gta2cs_daformer.pth daformer.safetensors          # released mmseg checkpoint

The protocol: each image is resized to the test scale (1024x512 for Cityscapes), the network's logits are resized
bilinearly back to the label's full resolution (2048x1024), the argmax is compared with the label, and one
confusion histogram is accumulated over the whole dataset with bincount (pixels labelled 255 are ignored).
IoU per class = intersection / union over the dataset; mIoU = their mean over the classes whose union is non-zero.
There is no per-image averaging: a small image counts as many pixels as it has. A model trained from SYNTHIA is
reported as the papers do: mIoU16 (without terrain, truck and train, which SYNTHIA lacks) and mIoU13 (also without
wall, fence and pole), and its final `mIoU:` line is the 16-class mean.
"""
import argparse
import collections
import os
import pickle
import sys
import tempfile
import time
import types
from contextlib import nullcontext
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw, ImageFont, ImageOps, PngImagePlugin
from torch import Tensor
from torch.utils.data import DataLoader, Dataset

import data
import files
import mit
import ssr

# ----------------------------------------------------------------------------------------------------------------
# the metric


def confusion(pred: Tensor, label: Tensor, num_classes: int) -> Tensor:
    """(K, K) int64 histogram on pred's device: entry [t, p] counts the pixels of true class t predicted as p.

    pred, label: integer tensors of one shape; label holds 0..K-1 or 255 (ignored)."""
    valid = label != data.IGNORE
    idx = num_classes * label[valid] + pred[valid]  # one bin per (true, predicted) pair
    return torch.bincount(idx, minlength=num_classes ** 2).view(num_classes, num_classes)


def iou_from_confusion(hist: Tensor) -> tuple[Tensor, float]:
    """Per-class IoU (float64, NaN where a class is neither in the labels nor in the predictions) and their mean
    over the other classes. A class that is predicted but never present has IoU 0 and does count in the mean."""
    hist = hist.double()
    inter = hist.diag()
    union = hist.sum(0) + hist.sum(1) - inter
    iou = inter / union  # 0/0 = NaN for the classes with an empty union
    return iou, iou.nanmean().item()


def reported_means(iou: list[float], source: str) -> dict[str, float]:
    """The means a paper's table gives for a model trained from `source`, headline first. The IoUs stay those of
    the 19-class confusion (a pixel predicted as terrain still counts against its true class)."""
    if source != "synthia":
        return {"mIoU": float(np.nanmean(iou))}
    return {name: float(np.nanmean([iou[c] for c in classes]))
            for name, classes in (("mIoU16", data.SYNTHIA_CLASSES), ("mIoU13", data.SYNTHIA_CLASSES_13))}


# ----------------------------------------------------------------------------------------------------------------
# inference


def window_boxes(h: int, w: int, crop: int, stride: int) -> list[tuple[int, int, int, int]]:
    """mmseg's slide_inference grid: (y1, y2, x1, x2) windows of crop x crop (smaller where the image is) every
    `stride` pixels, the last row and column shifted back to end at the border, so that all windows share a size."""
    boxes = []
    for i in range(max(h - crop + stride - 1, 0) // stride + 1):
        for j in range(max(w - crop + stride - 1, 0) // stride + 1):
            y2, x2 = min(i * stride + crop, h), min(j * stride + crop, w)
            boxes.append((max(y2 - crop, 0), y2, max(x2 - crop, 0), x2))
    return boxes


MIN_SIDE = 32  # input pixels MiT needs per side: its first spatial reduction is an 8x8 conv on the 1/4 grid


def resized_logits(model: Callable[[Tensor], Tensor], x: Tensor) -> Tensor:
    """(B, 3, h, w) -> float32 logits (B, K, h, w): the head's 1/4-resolution logits resized bilinearly to the input.
    A side under MIN_SIDE (a thin photo at the test scale) is zero-padded (the mean color) at the bottom or right
    first, and the padding's logits are cut off; larger inputs go through as they are."""
    h, w = x.shape[2:]
    x = F.pad(x, (0, max(MIN_SIDE - w, 0), 0, max(MIN_SIDE - h, 0)))
    return F.interpolate(model(x).float(), size=x.shape[2:], mode="bilinear", align_corners=False)[:, :, :h, :w]


def network_logits(model: Callable[[Tensor], Tensor], img: Tensor, mode: str, crop: int, stride: int) -> Tensor:
    """(B, 3, h, w) -> float32 logits (B, K, h, w) at the input's size, as mmseg's whole/slide_inference before
    the rescale."""
    if mode == "whole":
        return resized_logits(model, img)
    b, (h, w) = img.shape[0], img.shape[2:]
    boxes = window_boxes(h, w, crop, stride)
    windows = torch.cat([img[:, :, y1:y2, x1:x2] for y1, y2, x1, x2 in boxes])  # (n * B, 3, ch, cw), one forward
    out = resized_logits(model, windows)
    logits = img.new_zeros(b, out.shape[1], h, w, dtype=torch.float32)
    count = img.new_zeros(1, 1, h, w, dtype=torch.float32)
    for k, (y1, y2, x1, x2) in enumerate(boxes):  # overlapping windows average their logits
        logits[:, :, y1:y2, x1:x2] += out[k * b:(k + 1) * b]
        count[:, :, y1:y2, x1:x2] += 1
    return logits / count


# ----------------------------------------------------------------------------------------------------------------
# pictures


def colorize(label: np.ndarray) -> Image.Image:
    """(H, W) train ids -> 'P' PNG image whose palette is the Cityscapes colors (255 and unknown ids: black)."""
    im = Image.fromarray(label.astype(np.uint8), mode="P")
    palette = np.zeros((256, 3), np.uint8)
    palette[:len(data.PALETTE)] = data.PALETTE
    im.putpalette(palette.ravel().tolist())
    return im


def picture(img: Tensor) -> Image.Image:
    """Normalized (3, h, w) network input -> the RGB picture it came from."""
    rgb = data.denormalize(img.float().cpu())
    return Image.fromarray(rgb.round().clamp(0, 255).byte().permute(1, 2, 0).numpy())


def side_by_side(img: Tensor, *labels: np.ndarray) -> Image.Image:
    """image | each label map, at the network's scale (img: normalized (3, h, w); labels: (H, W) train ids)."""
    rgb = picture(img)
    w, h = rgb.size
    panels = [rgb] + [colorize(x).convert("RGB").resize((w, h), Image.NEAREST) for x in labels]
    out = Image.new("RGB", (len(panels) * w, h))
    for k, panel in enumerate(panels):
        out.paste(panel, (k * w, 0))
    return out


LEGEND_CELL = (150, 16)  # one class's swatch and name (pixels): the longest name, 'traffic light', fits


def legend(width: int) -> Image.Image:
    """The 19 classes' colors and names in a grid `width` pixels wide, in Pillow's default font."""
    cols = max(1, width // LEGEND_CELL[0])
    rows = -(-len(data.CLASSES) // cols)
    out = Image.new("RGB", (width, rows * LEGEND_CELL[1] + 4), (255, 255, 255))
    draw, font = ImageDraw.Draw(out), ImageFont.load_default()
    for i, (name, color) in enumerate(zip(data.CLASSES, data.PALETTE)):
        x, y = (i % cols) * LEGEND_CELL[0] + 4, (i // cols) * LEGEND_CELL[1] + 4
        draw.rectangle((x, y, x + 11, y + 11), fill=color, outline=(0, 0, 0))
        draw.text((x + 16, y), name, fill=(0, 0, 0), font=font)
    return out


def compose_with_legend(img: Tensor, pred: np.ndarray) -> Image.Image:
    """image | prediction at the network's scale, above the legend of the colors."""
    top = side_by_side(img, pred)
    key = legend(top.width)
    out = Image.new("RGB", (top.width, top.height + key.height))
    out.paste(top, (0, 0))
    out.paste(key, (0, top.height))
    return out


def save_predictions(save_dir: str, batch: dict, pred: Tensor, with_side: bool) -> None:
    """save_dir/<stem>.png (palette PNG) for each image, and save_dir/side_by_side/<stem>.png with with_side."""
    preds, labels = pred.cpu().numpy(), batch["lbl"].numpy()
    for i, path in enumerate(batch["path"]):
        stem = os.path.basename(path).removesuffix(".png").removesuffix("_leftImg8bit")
        colorize(preds[i]).save(os.path.join(save_dir, stem + ".png"))
        if with_side:
            picture = side_by_side(batch["img"][i], labels[i], preds[i])  # image | ground truth | prediction
            picture.save(os.path.join(save_dir, "side_by_side", stem + ".png"))


# ----------------------------------------------------------------------------------------------------------------
# training pictures: train.py's debug panels and loss curves, drawn with pillow alone

CAPTION = 12  # px of caption strip above each tile
NOT_LOSSES = ("iter", "lr", "it_s", "elapsed_s", "skipped", "mem_gib")  # the other fields of a progress line


def debug_panel(pictures: dict[str, Tensor]) -> Image.Image:
    """DAFormer-style debug panel of the first image of a batch, from ssr.UDA's `pictures`: source image, label
    and prediction (and, for SSR, the prediction from the SAM-enhanced features); target image, pseudo-label and
    the teacher's confidence (black 0, white 1); mixed image and its label. Each tile at the crop's size."""
    p = {k: v[0] for k, v in pictures.items()}
    w, h = p["src_img"].shape[2], p["src_img"].shape[1]
    ids = lambda t: colorize(t.cpu().numpy()).convert("RGB")  # noqa: E731
    confidence = F.softmax(p["tgt_logits"].float(), dim=0).max(0).values
    rows = [[("source", picture(p["src_img"])), ("source label", ids(p["src_lbl"])),
             ("prediction", ids(p["src_logits"].argmax(0)))],
            [("target", picture(p["tgt_img"])), ("pseudo-label", ids(p["plabel"])),
             ("confidence", Image.fromarray((confidence * 255).round().byte().cpu().numpy()).convert("RGB"))],
            [("mixed", picture(p["mix_img"])), ("mixed label", ids(p["mix_lbl"]))]]
    if "ssr_logits" in p:
        rows[0].append(("prediction, SAM-enhanced", ids(p["ssr_logits"].argmax(0))))
    out = Image.new("RGB", (w * max(map(len, rows)), (h + CAPTION) * len(rows)), (255, 255, 255))
    draw = ImageDraw.Draw(out)
    for r, row in enumerate(rows):
        for c, (caption, tile) in enumerate(row):
            out.paste(tile.resize((w, h), Image.NEAREST), (c * w, r * (h + CAPTION) + CAPTION))
            draw.text((c * w + 2, r * (h + CAPTION)), caption, fill=(0, 0, 0))
    return out


def training_curves(records: list[dict], size=(480, 320)) -> Image.Image:
    """Two plots side by side, against the iteration: every loss term of the log.jsonl progress lines, and the
    target mIoU of its evaluation lines. A later line of an iteration replaces an earlier one (after a resume)."""
    progress, evals = {}, {}
    for r in records:
        if "miou" in r:
            evals[r["iter"]] = {"mIoU": 100 * r["miou"]}
        elif "iter" in r:
            progress[r["iter"]] = {k: v for k, v in r.items() if k not in NOT_LOSSES}
    out = Image.new("RGB", (2 * size[0], size[1]), (255, 255, 255))
    for k, (title, series) in enumerate((("loss terms", progress), ("target mIoU", evals))):
        _plot(ImageDraw.Draw(out), (k * size[0], 0, (k + 1) * size[0], size[1]), title, series)
    return out


_COLORS = ((31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189), (140, 86, 75))


def _plot(draw: ImageDraw.ImageDraw, box: tuple[int, int, int, int], title: str, series: dict[int, dict]) -> None:
    """One line per key of series' values, x = iteration, inside box; axis ends labelled, a legend at the top."""
    x0, y0, x1, y1 = box[0] + 50, box[1] + 30, box[2] - 15, box[3] - 25
    draw.rectangle((x0, y0, x1, y1), outline=(0, 0, 0))
    draw.text((x0, box[1] + 4), title, fill=(0, 0, 0))
    finite = [v for vals in series.values() for v in vals.values() if np.isfinite(v)]
    if not finite:
        return
    its = sorted(series)
    lo_x, hi_x = its[0], max(its[-1], its[0] + 1)
    lo_y, hi_y = min(0.0, min(finite)), max(finite) * 1.15 or 1.0  # headroom for the legend
    to_xy = lambda it, v: (x0 + (it - lo_x) / (hi_x - lo_x) * (x1 - x0), y1 - (v - lo_y) / (hi_y - lo_y) * (y1 - y0))  # noqa: E731
    for text, xy in ((f"{lo_x}", (x0, y1 + 4)), (f"{hi_x}", (x1 - 30, y1 + 4)), (f"{hi_y:.3g}", (box[0] + 4, y0)),
                     (f"{lo_y:.3g}", (box[0] + 4, y1 - 10))):
        draw.text(xy, text, fill=(0, 0, 0))
    keys = list(dict.fromkeys(k for it in its for k in series[it]))
    for n, key in enumerate(keys):
        color = _COLORS[n % len(_COLORS)]
        points = [to_xy(it, series[it][key]) for it in its if np.isfinite(series[it].get(key, np.nan))]
        if len(points) > 1:
            draw.line(points, fill=color, width=2)
        for x, y in points if len(points) <= 30 else ():  # dots where there are few, as the evaluations
            draw.ellipse((x - 2, y - 2, x + 2, y + 2), fill=color)
        draw.text((x0 + 5 + 70 * n, y0 + 4), key, fill=color)


# ----------------------------------------------------------------------------------------------------------------
# the evaluator


def evaluate(model: ssr.Segmentor, loader, *, device, amp_dtype: torch.dtype | None = None, mode: str = "whole",
             crop: int = 512, stride: int = 341, save_dir: str | None = None, side_by_side: bool = False,
             progress: bool = False) -> dict:
    """mIoU of `model` (already on `device`) over every batch of `loader` (data.make_val_loader).

    Args:
        amp_dtype: autocast dtype (torch.bfloat16 / torch.float16), None for full precision.
        mode: 'whole' runs the resized image at once (DAFormer's test_cfg); 'slide' averages crop x crop windows
            every `stride` pixels (mmseg's slide_inference; 341 = 2/3 of 512, mmseg's usual overlap).
        save_dir: write each prediction there as a Cityscapes-palette PNG (and image | label | prediction
            under save_dir/side_by_side with side_by_side=True).
        progress: print a line to stderr about every 10% of the images.
    Returns:
        dict(iou=list of per-class IoU (NaN: class absent from labels and predictions), miou=float in 0..1,
             hist=(K, K) int64 CPU confusion, images=int, images_per_s=float (loading included)).
    """
    if mode not in ("whole", "slide"):
        raise ValueError(f"unknown evaluation mode {mode!r}; use 'whole' or 'slide'.")
    device = torch.device(device)
    if save_dir:
        os.makedirs(os.path.join(save_dir, "side_by_side") if side_by_side else save_dir, exist_ok=True)
    k = model.cfg.num_classes
    hist = torch.zeros(k, k, dtype=torch.int64, device=device)
    was_training = model.training
    model.eval()  # dropout off, BatchNorm uses its running statistics
    n, total, t0 = 0, len(loader.dataset), time.time()
    with torch.inference_mode():
        for batch in loader:
            img = batch["img"].to(device, non_blocking=True)
            label = batch["lbl"].to(device, non_blocking=True).long()
            with torch.autocast(device.type, dtype=amp_dtype) if amp_dtype else nullcontext():
                logits = network_logits(model, img, mode, crop, stride)
            # The second resize (network scale -> label scale) is mmseg's `rescale`; argmax only after it, so that
            # the prediction is made at every labelled pixel.
            logits = F.interpolate(logits, size=label.shape[1:], mode="bilinear", align_corners=False)
            pred = logits.argmax(1)  # (B, H, W)
            hist += confusion(pred, label, k)
            if save_dir:
                save_predictions(save_dir, batch, pred, side_by_side)
            n += img.shape[0]
            if progress and n * 10 // total > (n - img.shape[0]) * 10 // total:  # crossed a tenth
                print(f"{n}/{total} images", file=sys.stderr, flush=True)
    hist = hist.cpu()  # waits for the device: the time below is the real one
    seconds = time.time() - t0
    model.train(was_training)
    iou, miou = iou_from_confusion(hist)
    return dict(iou=iou.tolist(), miou=miou, hist=hist, images=n, images_per_s=n / max(seconds, 1e-9))


def print_table(result: dict, classes, source: str = "gta5") -> float:
    """Per-class IoU in percent, the speed, the means of reported_means, then `mIoU: NN.NN` as the last line: the
    headline mean (for a SYNTHIA-trained model the 16-class one), which is returned (0..1)."""
    width = max(len(c) for c in classes) + 2
    print(f"{'class':<{width}}   IoU")
    for name, iou in zip(classes, result["iou"]):
        print(f"{name:<{width}}" + ("   n/a" if iou != iou else f"{100 * iou:6.2f}"))  # NaN: absent everywhere
    print(f"{result['images']} images, {result['images_per_s']:.2f} images/s")
    means = reported_means(result["iou"], source)
    for name, value in means.items():
        if name != "mIoU":
            print(f"{name}: {100 * value:.2f}")
    headline = next(iter(means.values()))
    print(f"mIoU: {100 * headline:.2f}")
    return headline


# ----------------------------------------------------------------------------------------------------------------
# predictions on a user's own images (no labels)

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png")
# PNG text chunk in every file predict_images writes: a later run replaces a file at an output path only when it
# carries this (check_outputs), so never a picture of the user's, while its own earlier predictions are replaced
OWN_MARK = ("Software", "ssr eval.py --images")


def list_images(folder: str) -> list[str]:
    """JPEG and PNG files under folder and its subfolders, as sorted paths relative to folder."""
    if not os.path.isdir(folder):
        raise data.DatasetError(f"--images {folder} is not a folder; pass the folder that holds your images.")
    found = sorted(os.path.relpath(os.path.join(d, f), folder) for d, _, files in os.walk(folder)
                   for f in files if f.lower().endswith(IMAGE_SUFFIXES))
    if not found:
        raise data.DatasetError(f"--images {folder} holds no {'/'.join(IMAGE_SUFFIXES)} files (subfolders "
                                f"included); pass the folder that holds your images.")
    return found


def output_names(paths: list[str]) -> list[str]:
    """<path without suffix>.png for each relative path; where two would collide (a.jpg, a.png), both keep their
    suffix (a.jpg.png, a.png.png)."""
    stems = [os.path.splitext(p)[0] for p in paths]
    counts = collections.Counter(stems)
    return [(p if counts[s] > 1 else s) + ".png" for p, s in zip(paths, stems)]


class UserImages(Dataset):
    """Item i: dict(img=(3, h, w) normalized at `scale` keeping the ratio (as the val protocol), size=(W, H) of the
    image as it is viewed, path), or dict(path, error) for a file that cannot be read."""

    def __init__(self, folder: str, paths: list[str], scale):
        self.folder, self.paths, self.scale = folder, paths, scale

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> dict:
        path = os.path.join(self.folder, self.paths[i])
        try:
            with Image.open(path) as im:
                im = ImageOps.exif_transpose(im).convert("RGB")  # as viewers show it; L, RGBA, P, CMYK -> RGB
            w, h = im.size
            # mmcv's rescale_size rounds the thin side of a 1x3000 photo to 0 px at 1024x512 (3000x1 likewise);
            # 1 px keeps it, and resized_logits pads a side under MIN_SIDE for the network
            size = tuple(max(side, 1) for side in data.rescale_size(w, h, self.scale))
            img = data.resize_image(np.array(im), size)
        except (OSError, SyntaxError, ValueError, Image.DecompressionBombError, MemoryError, RuntimeError) as e:
            return {"path": path, "error": f"{type(e).__name__}: {e}"}  # RuntimeError: torch out of memory
        return {"img": data.normalize(img), "size": (w, h), "path": path}


def own_output(path: str) -> bool:
    """Whether path is a PNG that predict_images wrote (it carries OWN_MARK). False for any other file, a folder,
    a dangling symlink and anything unreadable."""
    try:
        with Image.open(path) as im:
            return im.format == "PNG" and im.info.get(OWN_MARK[0]) == OWN_MARK[1]
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError):
        return False


def predict_images(model: ssr.Segmentor, folder: str, save_dir: str, *, device, scale, amp_dtype=None,
                   mode: str = "whole", crop: int = 512, stride: int = 341, with_legend: bool = False,
                   workers: int = 0) -> tuple[int, list[str]]:
    """Write save_dir/<relative path>.png, a Cityscapes-palette prediction at each image's own size, for every
    JPEG/PNG under folder (and save_dir/side_by_side/... image | prediction above a legend with with_legend).

    Inference as the val protocol: resize to `scale` keeping the ratio, logits resized bilinearly back to the
    image's size, argmax. Returns (images written, messages for the files skipped because they cannot be read or
    predicted). main() runs check_outputs first, so that no file of the user's is replaced."""
    paths = list_images(folder)
    names = output_names(paths)
    loader = DataLoader(UserImages(folder, paths, scale), batch_size=None, num_workers=workers,
                        generator=torch.Generator())  # images differ in size: one at a time
    device, written, skipped = torch.device(device), 0, []
    mark = PngImagePlugin.PngInfo()
    mark.add_text(*OWN_MARK)
    model.eval()
    with torch.inference_mode():
        for k, (item, name) in enumerate(zip(loader, names)):
            error = item.get("error")
            if error is None:
                w, h = item["size"]
                try:
                    img = item["img"][None].to(device)
                    with torch.autocast(device.type, dtype=amp_dtype) if amp_dtype else nullcontext():
                        logits = network_logits(model, img, mode, crop, stride)
                    pred = F.interpolate(logits, size=(h, w), mode="bilinear", align_corners=False).argmax(1)[0]
                    pred = pred.cpu().numpy()
                except RuntimeError as e:
                    # torch's error for an input it cannot take (out of memory on the CPU or GPU for the logits
                    # of a huge photo at full size, a size a kernel refuses) costs that photo, not the ones after
                    # it; a bug fails every photo alike and shows in main's error
                    error = f"{type(e).__name__} predicting it at {w}x{h} px: {(str(e).splitlines() or [''])[0]}"
            if error is not None:
                skipped.append(f"{item['path']} ({error})")
                print(f"skipped {skipped[-1]}", file=sys.stderr, flush=True)
            else:
                out = os.path.join(save_dir, name)
                os.makedirs(os.path.dirname(out), exist_ok=True)
                colorize(pred).save(out, pnginfo=mark)
                if with_legend:
                    out = os.path.join(save_dir, "side_by_side", name)
                    os.makedirs(os.path.dirname(out), exist_ok=True)
                    compose_with_legend(item["img"], pred).save(out, pnginfo=mark)
                written += 1
            if (k + 1) * 10 // len(paths) > k * 10 // len(paths):  # crossed a tenth
                print(f"{k + 1}/{len(paths)} images", file=sys.stderr, flush=True)
    return written, skipped


# ----------------------------------------------------------------------------------------------------------------
# released mmseg checkpoints (DAFormer, MIC)
#
# They are torch.save'd dicts: 'state_dict' holds the student under 'model.', the EMA teacher under 'ema_model.' and
# the frozen ImageNet copy (for the feature distance) under 'imnet_model.'; 'meta' may hold numpy arrays and mmcv
# objects. torch.load(weights_only=True) refuses the whole file for one such object, and weights_only=False would
# run whatever code the pickle names. So we unpickle with an allow-list: the few functions that rebuild tensors,
# and OrderedDict; every other global is replaced by an inert placeholder and is never imported or called.

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


def read_mmseg_checkpoint(path: str) -> tuple[dict[str, Tensor], set[str]]:
    """The student's state dict ('model.' stripped; a plain mmseg EncoderDecoder's keys as they are) and the names
    of the non-tensor globals that were skipped."""
    if not os.path.isfile(path):
        raise mit.WeightsError(f"mmseg checkpoint {path} does not exist; pass the .pth file of a released "
                                f"DAFormer or MIC model (e.g. the GTA5->Cityscapes checkpoint from their README).")
    skipped: set[str] = set()
    try:
        # safe: the pickle module resolves no global outside TENSOR_GLOBALS (see restricted_pickle)
        ckpt = torch.load(path, map_location="cpu", pickle_module=restricted_pickle(skipped), weights_only=False)
    except Exception as e:  # a broken file fails in many ways inside torch.load; all mean the same to the user
        first_line = (str(e).strip().splitlines() or [""])[0]
        raise mit.WeightsError(f"{path} is not a readable torch checkpoint ({type(e).__name__}: {first_line}); pass the "
                         f".pth file of a released DAFormer or MIC model.") from None
    sd = ckpt.get("state_dict", ckpt) if isinstance(ckpt, dict) else None
    if not isinstance(sd, dict) or not any(k.startswith(("model.backbone.", "backbone.")) for k in sd):
        raise mit.WeightsError(f"{path} holds no mmseg segmentor: expected a dict with 'state_dict' holding "
                         f"model.backbone.* and model.decode_head.* (DAFormer/MIC) or backbone.* and decode_head.*.")
    # The published numbers are the student's (DACS evaluates `model`); the EMA teacher and the ImageNet copy
    # only exist for training, so they are dropped.
    prefix = "model." if any(k.startswith("model.") for k in sd) else ""
    keep = (prefix + "backbone.", prefix + "decode_head.")
    student = {k[len(prefix):]: v for k, v in sd.items() if k.startswith(keep)}
    bad = sorted(k for k, v in student.items() if not isinstance(v, Tensor))
    if bad:
        raise mit.WeightsError(f"{path}: the weights {', '.join(bad[:3])} are not plain tensors; pass the .pth file of a "
                         f"released DAFormer or MIC model.")
    return student, skipped


def config_from_state_dict(sd: dict[str, Tensor], where: str) -> ssr.SegConfig:
    """SegConfig that a DAFormer state dict describes: MiT size from the backbone's keys and shapes, number of
    classes and head width from the classifier conv_seg (K, channels, 1, 1)."""
    backbone = {k.removeprefix("backbone."): v for k, v in sd.items() if k.startswith("backbone.")}
    embed_dims, depths = mit.arch_of(backbone)
    if not embed_dims or "decode_head.conv_seg.weight" not in sd:
        raise mit.WeightsError(f"{where} holds no MiT backbone with a DAFormer head (no backbone.patch_embed1.proj.weight "
                         f"or decode_head.conv_seg.weight); only DAFormer/MIC models with MiT encoders convert.")
    name = next((n for n, p in mit.MIT_PRESETS.items() if (p["embed_dims"], p["depths"]) == (embed_dims, depths)), None)
    num_classes, channels = sd["decode_head.conv_seg.weight"].shape[:2]
    return ssr.SegConfig(backbone=name or "mit_b5", mit={} if name else dict(embed_dims=embed_dims, depths=depths),
                         num_classes=num_classes, channels=channels)


def convert_mmseg(src: str, dst: str, source: str | None = None) -> tuple[ssr.SegConfig, set[str]]:
    """Released DAFormer/MIC .pth -> this project's checkpoint (safetensors + metadata), loaded strictly on the
    way; returns the configuration and the skipped non-tensor globals. source: the dataset the model was trained
    from ('gta5', 'synthia'), recorded for eval.py's report; None records nothing (eval.py then assumes gta5)."""
    sd, skipped = read_mmseg_checkpoint(src)
    cfg = config_from_state_dict(sd, src)
    with torch.device("meta"):  # no time spent on random init: every tensor comes from the file
        model = ssr.build_segmentor(cfg)
    ours = model.state_dict()
    missing, unexpected = sorted(set(ours) - set(sd)), sorted(set(sd) - set(ours))
    shape = sorted(k for k in set(ours) & set(sd) if ours[k].shape != sd[k].shape)
    if missing or unexpected or shape:
        raise mit.WeightsError(f"{src} does not match the DAFormer segmentor {cfg}: missing {missing[:3]}, unexpected "
                         f"{unexpected[:3]}, wrong shape {shape[:3]}. Only DAFormer-head models (DAFormer, MIC "
                         f"with the DAFormer head) convert; HRDA's multi-resolution head does not.")
    model.load_state_dict(sd, strict=True, assign=True)
    ssr.save_segmentor(model, dst, dataset="cityscapes", test_scale=list(data.TARGET_SCALE),
                       converted_from=os.path.basename(src), **({"source": source} if source else {}))
    return cfg, skipped


# ----------------------------------------------------------------------------------------------------------------
# command line


def check_device(name: str) -> torch.device:
    """The torch.device for --device, or a files.FlagError where this machine does not have it."""
    try:
        device = torch.device(name)
    except RuntimeError:
        raise files.FlagError(f"--device {name}: not a device name; use cpu, cuda or cuda:N.") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise files.FlagError(f"--device {name}: PyTorch sees no CUDA GPU on this machine (torch {torch.__version__}, "
                        f"built {'without CUDA' if torch.version.cuda is None else 'for CUDA ' + torch.version.cuda}"
                        f"); use --device cpu.")
    if device.type == "cuda" and (device.index or 0) >= torch.cuda.device_count():
        raise files.FlagError(f"--device {name}: this machine has {torch.cuda.device_count()} CUDA GPU(s), numbered from "
                        f"0; pick one of them.")
    if device.type not in ("cpu", "cuda"):
        raise files.FlagError(f"--device {name}: eval.py runs on cpu or cuda[:N].")
    return device


def check_writable(folder: str, flag: str, create: bool = True) -> None:
    """Fail now, not after the slow steps, when no file can be written in folder (made first if create)."""
    try:
        if create:
            os.makedirs(folder, exist_ok=True)
        elif not os.path.isdir(folder):
            raise files.FlagError(f"{flag}: the output folder {folder} does not exist; create it first.")
        with tempfile.TemporaryFile(dir=folder):
            pass
    except OSError as e:
        raise files.FlagError(f"{flag}: cannot write into {folder} ({e.strerror or e}); pass a folder you can "
                        f"write to.") from None


def check_outputs(images: str, save_dir: str, with_legend: bool) -> None:
    """Fail, before anything is written, where a prediction of --images could replace a file eval.py did not write.

    The two folders must be disjoint: neither the same folder nor one inside the other, after realpath (symlinks
    included). That is what "the outputs can never collide with the photos" means here. Photos are read from
    anywhere under --images and predictions written anywhere under --save-dir, so where one folder holds the other
    some layout of files puts a prediction on a photo: photos/street.png on itself; photos/preds/a.png, a photo,
    as the prediction of photos/a.png; or, in the next run, which reads the last run's predictions as photos. A
    nesting that happens to be safe for today's files is refused too, so that the rule stays one sentence.
    Disjoint folders are always fine, with two checks per output path (side_by_side/ ones included): a symlink must
    not make it one of the photos, and a file already there must be one that predict_images wrote (OWN_MARK), so
    that a re-run replaces its own predictions and nothing else."""
    folder, out = os.path.realpath(images), os.path.realpath(save_dir)
    if os.path.commonpath([folder, out]) in (folder, out):
        how = "is" if folder == out else "is inside" if os.path.commonpath([folder, out]) == folder else "holds"
        resolved = (out, folder) != (os.path.abspath(save_dir), os.path.abspath(images))
        raise files.FlagError(f"--save-dir {save_dir} {how} the --images folder {images}"
                        + (f" ({out} and {folder} with symlinks followed)" if resolved else "")
                        + ": a prediction could replace one of your photos, or be read as one by the next run; pass "
                          "a --save-dir that is neither inside the --images folder nor holds it, e.g. a new folder "
                          "next to it.")
    paths = list_images(images)
    photos = {os.path.realpath(os.path.join(images, p)): p for p in paths}
    out_dirs = [save_dir, os.path.join(save_dir, "side_by_side")] if with_legend else [save_dir]
    for name in output_names(paths):
        for path in (os.path.join(d, name) for d in out_dirs):
            if os.path.realpath(path) in photos:
                raise files.FlagError(f"--save-dir: the output {path} is the photo "
                                f"{os.path.join(images, photos[os.path.realpath(path)])} through a symlink, and "
                                f"its prediction would replace it; remove the symlink or pass another --save-dir.")
            if os.path.lexists(path) and not own_output(path):
                raise files.FlagError(f"--save-dir: {path} exists and is not a prediction that eval.py --images wrote, "
                                f"so it is not replaced; move it away or pass another --save-dir.")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    what = p.add_mutually_exclusive_group(required=True)
    what.add_argument("--ckpt", help="checkpoint written by train.py or --convert-mmseg (.safetensors)")
    what.add_argument("--convert-mmseg", nargs=2, metavar=("IN.pth", "OUT.safetensors"),
                      help="convert a released DAFormer/MIC mmseg checkpoint (reads tensors only, runs no code)")
    p.add_argument("--data-root", help="folder holding cityscapes/ as downloaded (default: the checkpoint's, or data)")
    p.add_argument("--split", default="val", help="split of the target dataset; it must have labels")
    p.add_argument("--images", metavar="DIR",
                   help="predict every .jpg/.jpeg/.png under DIR (subfolders too) instead of evaluating; no labels "
                        "needed; the predictions go to --save-dir under the same relative paths")
    p.add_argument("--src", choices=list(data.SOURCES),
                   help="the source the model was trained from; synthia reports mIoU16 and mIoU13 (default: the "
                        "checkpoint's, else gta5). With --convert-mmseg: recorded in the converted file")
    p.add_argument("--mode", default="whole", choices=["whole", "slide"],
                   help="whole: the resized image at once (DAFormer); slide: 512x512 windows, stride 341")
    p.add_argument("--batch-size", type=int, default=2, help="images per forward pass")
    p.add_argument("--workers", type=int, default=min(8, os.cpu_count() or 1), help="data loader processes")
    p.add_argument("--amp", default="fp32", choices=["bf16", "fp16", "fp32"],
                   help="precision of the forward pass (default fp32, as the DAFormer, MIC and SSR authors "
                        "evaluated; bf16/fp16 are faster on GPUs and can move the mIoU slightly)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="cpu, cuda, cuda:1, ...")
    p.add_argument("--save-dir", help="write each prediction there as a Cityscapes-palette PNG")
    p.add_argument("--side-by-side", action="store_true",
                   help="with --save-dir: also image | label | prediction (with --images: image | prediction and "
                        "a legend of the colors)")
    args = p.parse_args()

    if args.convert_mmseg:
        src, dst = args.convert_mmseg
        if os.path.isdir(dst):
            raise files.FlagError(f"--convert-mmseg: the output {dst} is a folder; name the .safetensors file to write.")
        check_writable(os.path.dirname(os.path.abspath(dst)), "--convert-mmseg", create=False)
        cfg, skipped = convert_mmseg(src, dst, source=args.src)
        print(f"wrote {dst}: {cfg.backbone}{' ' + str(cfg.mit) if cfg.mit else ''}, "
              f"{cfg.num_classes} classes, head width {cfg.channels}")
        if skipped:
            print(f"skipped non-tensor objects without running them: {', '.join(sorted(skipped))}")
        return
    # every flag is checked before the model and the data are read
    if args.side_by_side and not args.save_dir:
        raise files.FlagError("--side-by-side writes pictures into --save-dir; pass --save-dir DIR as well.")
    if args.images and not args.save_dir:
        raise files.FlagError("--images writes its predictions into --save-dir; pass --save-dir DIR as well.")
    if args.batch_size <= 0 or args.workers < 0:
        raise files.FlagError("--batch-size must be positive and --workers at least 0.")
    device = check_device(args.device)
    if args.images:
        check_outputs(args.images, args.save_dir, args.side_by_side)
    if args.save_dir:
        check_writable(args.save_dir, "--save-dir")
    amp_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": None}[args.amp]

    model, meta = ssr.load_segmentor(args.ckpt, device)
    files.note_model_behind(args.ckpt, meta.get("iters"))  # a train.py run stopped between its two renames
    if model.cfg.num_classes != len(data.CLASSES):
        raise mit.WeightsError(f"{args.ckpt} predicts {model.cfg.num_classes} classes but the evaluation uses the "
                               f"{len(data.CLASSES)} Cityscapes classes; pass a checkpoint of a 19-class model.")
    scale = tuple(meta.get("test_scale", data.TARGET_SCALE))
    if args.images:
        written, skipped = predict_images(model, args.images, args.save_dir, device=device, scale=scale,
                                          amp_dtype=amp_dtype, mode=args.mode, with_legend=args.side_by_side,
                                          workers=args.workers)
        if not written:
            raise data.DatasetError(f"none of the images under {args.images} could be read and predicted: "
                                    f"{'; '.join(skipped)}")
        print(f"wrote {written} predictions to {args.save_dir}"
              + (f"; skipped {len(skipped)}: {'; '.join(skipped)}" if skipped else ""))
        return
    source = args.src or meta.get("source", "gta5")  # train.py records it; older and converted files may not
    loader = data.make_val_loader(args.data_root or meta.get("data_root") or "data", meta.get("dataset", "cityscapes"),
                                  args.split, scale=scale, batch_size=args.batch_size, workers=args.workers,
                                  pin_memory=device.type == "cuda")
    result = evaluate(model, loader, device=device, amp_dtype=amp_dtype, mode=args.mode, save_dir=args.save_dir,
                      side_by_side=args.side_by_side, progress=True)
    print_table(result, data.CLASSES, source if source in data.SOURCES else "gta5")


if __name__ == "__main__":
    try:
        main()
    except files.UserError as e:  # user input; a bug keeps its traceback
        sys.exit(f"error: {e}")
