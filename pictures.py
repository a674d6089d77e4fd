"""Pictures, drawn with Pillow alone: colored predictions and the legend of their colors, train.py's debug panels
and training curves, the study's chart.

Every function returns a PIL image and writes nothing: the programs that own the files save them (eval.py its
predictions, train.py its debug/ and curves.png, study.py study.png). The colors are data.PALETTE, the Cityscapes
colors that the datasets' own _color.png files use too.

Read top to bottom: 1. label maps and network inputs as pictures; 2. train.py's pictures; 3. the study's chart.
"""
import math

import numpy as np
import torch.nn.functional as F
from PIL import Image, ImageDraw, ImageFont
from torch import Tensor

import data

# ----------------------------------------------------------------------------------------------------------------
# 1. label maps and network inputs as pictures


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


# ----------------------------------------------------------------------------------------------------------------
# 2. train.py's pictures: its debug panels and loss curves

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


# ----------------------------------------------------------------------------------------------------------------
# 3. the study's chart


def study_chart(mious: dict[str, list[float]]) -> Image.Image:
    """Bars of the mean target mIoU per setting, each seed a dot on its bar; mious: setting's title -> the target
    mIoU (%) of each seed, in the order of the bars."""
    names, values = list(mious), list(mious.values())
    lo = math.floor(min(min(v) for v in values) / 5) * 5 - 5
    hi = math.ceil(max(max(v) for v in values) / 5) * 5
    W, H, left, top, bottom = 160 * len(names) + 80, 420, 60, 30, 60
    img = Image.new("RGB", (W, H), "white")
    d = ImageDraw.Draw(img)
    y_of = lambda v: top + (hi - v) / (hi - lo) * (H - top - bottom)  # noqa: E731
    for tick in range(lo, hi + 1, 5):
        d.line([(left, y_of(tick)), (W - 10, y_of(tick))], fill=(225, 225, 225))
        d.text((10, y_of(tick) - 6), f"{tick}", fill="black")
    d.text((10, 8), "target mIoU (%), bars: mean, dots: seeds", fill="black")
    for i, (n, v) in enumerate(zip(names, values)):
        x0 = left + 20 + i * 160
        d.rectangle([x0, y_of(np.mean(v)), x0 + 110, y_of(lo)], fill=(120, 160, 210), outline=(60, 90, 140))
        for j, m in enumerate(v):
            cx, cy = x0 + 25 + j * 60 / max(len(v) - 1, 1), y_of(m)
            d.ellipse([cx - 4, cy - 4, cx + 4, cy + 4], fill=(200, 50, 40))
        d.text((x0, H - bottom + 10), n, fill="black")
        d.text((x0, H - bottom + 26), f"{np.mean(v):.2f}", fill="black")
    return img
