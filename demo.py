"""The demo's toy world: a miniature of GTA5 -> Cityscapes, with its own ImageNet and its own SAM.

    python train.py --demo           # adapt a tiny model from the GTA5-like to the Cityscapes-like domain
    python demo.py pretrain          # the student's toy ImageNet pretraining (train.py --demo does it on first use)
    python demo.py teacher           # the toy SAM teacher (likewise)
    python demo.py probe             # linear probe of the teacher's frozen tokens: source vs target
    python demo.py study             # 6 settings x 5 seeds; writes runs/study/study.md

The miniature, decided before the study's first number (README, "The demo"):
- Two domains, fixed before any method ran on them and never changed: 200 labelled GTA5-like images, 200 unlabelled
  and 40 val Cityscapes-like ones, written in the datasets' real layouts so that --demo runs the real code path.
- The student, as DAFormer's, starts from an ImageNet: `pretrain` trains the demo's MiT on scenes in random domains
  (never the two demo styles) with an image-level task, which of 23 part kinds an object-centred crop shows
  (IMAGENET: 800 scenes, 500 steps of 16 crops). It is the feature distance's ImageNet copy too.
- The teacher, as SAM, saw every kind of image and no class: `teacher` trains the demo's SAM encoder on pixel-pair
  affinity (same painted shape or not) over random and demo-styled domains (TEACHER: 600 scenes, 400 steps of 12).
  It sees the crop upsampled 2x, as SAM sees a 512 crop at 1024: a 16x16 token grid, the student's stage-2 grid.
- The schedule is DAFormer's scaled down (schedule()): 600 iterations, with every time constant the same fraction
  of the schedule as DAFormer's of 40k: warm-up 1500/40k -> 22, EMA horizon 1/(1 - alpha) 1000/40k -> 15
  (alpha 0.9333). The learning rate is 10x DAFormer's (6e-4): a tiny encoder, briefly pretrained.

Read top to bottom: 1. the configuration; 2. the world (a scene is painted as shapes into a label map and a map of
which shape owns each pixel; a domain and a palette turn the shapes into an image); 3. writing the datasets, with a
marker file in every folder the demo writes (it only ever replaces its own folders); 4. the two pretrainings;
5. the study: train.py run per setting and seed, a markdown table and a chart.
"""
import argparse
import hashlib
import json
import math
import os
import shutil
import subprocess
import sys
import tempfile
import time
import warnings
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image, ImageDraw
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

import data
import files
import mit
import sam_encoder

# ----------------------------------------------------------------------------------------------------------------
# 1. configuration

CONFIG = dict(
    # written images: GTA5's 1914x1052 / 5 and Cityscapes' 2048x1024 / 4; the labels have the image's size
    src_size=(384, 216), tgt_size=(512, 256), n_src=200, n_tgt=200, n_val=40,
    # the pipeline's scales and crop: val images at 256x128 with 512x256 labels mimic the real 1024x512 /
    # 2048x1024 protocol
    src_scale=(256, 144), tgt_scale=(256, 128), crop=128,
    rcs_min_pixels=round(3000 * 384 * 216 / (1914 * 1052)),  # DAFormer's 3000 for 1914x1052 labels, scaled
    ignore_rows=(4, 30),  # DAFormer's 15 and 120 pseudo-label rows are for 512 crops; these are 128
    mit=dict(embed_dims=(32, 64, 160, 256), depths=(1, 1, 1, 1)), channels=32,  # MiT-B0 made narrower and shallow
    sam=dict(embed_dim=96, depth=2, num_heads=2, global_attn_indexes=(1,)),  # one window block, one global
    # the crop upsampled 2x, as the paper's 512 crops are for SAM's 1024 input: a 16x16 token grid, the grid of
    # the student's second stage, as in the benchmark (64x64 tokens for a 512 crop)
    sam_img_size=256,
)
DAFORMER_ITERS, DAFORMER_WARMUP, DAFORMER_EMA_ITERS = 40000, 1500, 1000  # alpha = min(1 - 1/(it+1), 0.999)


def schedule(iters: int) -> dict:
    """DAFormer's time constants as the same fraction of a shorter schedule: the linear warm-up (1500 of 40k
    iterations) and the EMA teacher's horizon 1/(1 - alpha), 1000 of 40k iterations (its ramp min(1 - 1/(it+1),
    alpha) ends there too). For the demo's 600 iterations: a warm-up of 22 and alpha = 1 - 1/15."""
    horizon = max(iters * DAFORMER_EMA_ITERS / DAFORMER_ITERS, 1.0)
    return dict(iters=iters, warmup=round(iters * DAFORMER_WARMUP / DAFORMER_ITERS), ema_alpha=round(1 - 1 / horizon, 4))


# train.py --demo sets these defaults (flags still override them). --pretrained and --sam-weights are left unset:
# train.py then takes the toy ImageNet encoder (imagenet_path()) and, for --method ssr, the toy teacher
# (teacher_path()); 'none' gives a random one. The learning rate is 10x DAFormer's: a tiny encoder, briefly
# pretrained, in 600 iterations (chosen once, before any of the study's runs).
FLAGS = dict(data_root="data/demo", backbone="mit_b0", sam_img_size=CONFIG["sam_img_size"], lr=6e-4,
             crop=CONFIG["crop"], eval_every=200, save_every=200, log_every=50, debug_every=200, **schedule(600))


# ----------------------------------------------------------------------------------------------------------------
# 2. the world: street scenes in the GTA5 and Cityscapes layouts with a real domain shift between them
#
# The two domains were fixed before the study existed (and are unchanged since): a small conv net trained on the
# source only scored 0.74 mIoU on the source and 0.55 on the target.

DOMAINS = {
    # GTA-like: sunny blue sky, saturated colors, big windows, clean pixels
    "source": dict(sky=((90, 150, 230), (185, 215, 245)), window=(8, 6), car_size=1.0, person_size=1.0,
                   light=1.0, saturation=1.0, tint=(0, 0, 0), noise=3.0, blur=False, ego=False),
    # Cityscapes-like: overcast sky, dimmer desaturated light with a blue cast, small windows, bigger cars and
    # people, sensor noise and lens blur, and the ego car's bonnet (an ignored label id) at the bottom. Tuned with
    # a small conv net trained on the source only: 0.74 mIoU on the source, 0.55 here; a stronger shift (light
    # 0.8, saturation 0.55) gave 0.29 with sidewalks lost entirely, too little for pseudo-labels to start from
    "target": dict(sky=((175, 182, 192), (215, 218, 222)), window=(5, 4), car_size=1.3, person_size=1.25,
                   light=0.88, saturation=0.75, tint=(-6, 2, 8), noise=5.0, blur=True, ego=True),
}
# The colors of things, the same in both demo domains (their camera and light differ). Lists are choices per
# object; the teacher's domains redraw every entry (random_palette).
COLORS = dict(
    building=np.array([(150, 85, 65), (125, 115, 105), (175, 155, 115)], np.float32),
    car=np.array([(200, 30, 30), (30, 60, 170), (220, 220, 225), (25, 25, 30), (230, 180, 20)], np.float32),
    clothes=np.array([(60, 60, 170), (170, 40, 120), (40, 120, 60), (200, 120, 30)], np.float32),
    lamp=np.array([(230, 40, 30), (40, 220, 80)], np.float32),
    trunk=(90, 65, 40), crown=(55, 135, 45), fence=(140, 115, 80), terrain=(150, 170, 85), sidewalk=(175, 150, 130),
    road=(95, 92, 100), lane=(235, 235, 225), pole=(75, 78, 85), sign=(235, 200, 30), light_box=(30, 30, 30),
    car_body_glass=(45, 55, 65), wheel=(20, 20, 20), legs=(40, 40, 50), skin=(225, 185, 150), window=(50, 60, 80),
    paving=(140, 120, 104), slat=(84, 69, 48), ego=(40, 40, 45),
)
SKY_BANDS = 16  # the sky is painted in bands, lighter towards the horizon
# train ids used by the painter
ROAD, SIDEWALK, BUILDING, FENCE, POLE, LIGHT, SIGN = 0, 1, 2, 4, 5, 6, 7
VEGETATION, TERRAIN, SKY, PERSON, CAR = 8, 9, 10, 11, 13


class Canvas:
    """A scene being painted: per pixel a train id (`label`) and an index into `colors`, the scene's short list of
    colors (`paint`). Every shape appends its own color, so `paint` also tells the shapes apart. Painting indices
    keeps the per-pixel work on (H, W) uint8 maps; the camera's linear color transform acts on the list."""

    def __init__(self, h: int, w: int, colors: list):
        rows = np.arange(h)[:, None]
        self.label = np.full((h, w), SKY, np.uint8)
        self.paint = np.broadcast_to((rows * SKY_BANDS // h).astype(np.uint8), (h, w)).copy()  # the sky's bands
        self.colors = colors
        self.kinds = ["sky"] * len(colors)  # the part each color paints (KINDS)

    def box(self, y0, y1, x0, x1, cls: int, color, ellipse: bool = False, kind: str = "") -> None:
        """Paint an axis-aligned box, or the ellipse inscribed in it, clipped to the image; `kind` names the
        shape's part (KINDS), for the toy ImageNet's labels."""
        h, w = self.label.shape
        ya, yb, xa, xb = max(int(y0), 0), min(math.ceil(y1), h), max(int(x0), 0), min(math.ceil(x1), w)
        if ya >= yb or xa >= xb:
            return
        self.colors.append(color)
        self.kinds.append(kind)
        if not ellipse:
            self.label[ya:yb, xa:xb], self.paint[ya:yb, xa:xb] = cls, len(self.colors) - 1
            return
        yy, xx = np.ogrid[ya:yb, xa:xb]
        m = (((yy + 0.5 - (y0 + y1) / 2) / ((y1 - y0) / 2)) ** 2
             + ((xx + 0.5 - (x0 + x1) / 2) / ((x1 - x0) / 2)) ** 2 <= 1)
        self.label[ya:yb, xa:xb][m] = cls
        self.paint[ya:yb, xa:xb][m] = len(self.colors) - 1

    def recolor(self, mask: np.ndarray, cls: int | None, color, kind: str = "") -> None:
        """Give every pixel of the (H, W) mask a new color (and class, unless None): the ground and the textures."""
        self.colors.append(color)
        self.kinds.append(kind)
        if cls is not None:
            self.label[mask] = cls
        self.paint[mask] = len(self.colors) - 1


def _skyline(rng, canvas: Canvas, horizon: int, palette: dict) -> None:
    """Buildings and trees side by side on the horizon, and maybe a fence along their foot."""
    h, w = canvas.label.shape
    x = -int(rng.integers(0, w // 10))
    while x < w:
        width = int(rng.integers(w // 10, w // 4))
        if rng.random() < 0.7:
            canvas.box(rng.integers(h // 20, horizon - h // 8), horizon, x, x + width, BUILDING,
                       palette["building"][rng.integers(3)] * rng.uniform(0.85, 1.15), kind="building")
        else:
            crown = width * rng.uniform(0.8, 1.2)
            canvas.box(horizon - 0.25 * crown, horizon, x + 0.45 * width, x + 0.55 * width, VEGETATION,
                       palette["trunk"], kind="trunk")
            canvas.box(horizon - 1.1 * crown, horizon - 0.2 * crown, x, x + width, VEGETATION, palette["crown"],
                       ellipse=True, kind="crown")
        x += width
    if rng.random() < 0.5:
        x0 = rng.uniform(0, 0.6) * w
        canvas.box(horizon - 0.07 * h, horizon, x0, x0 + rng.uniform(0.2, 0.4) * w, FENCE, palette["fence"],
                   kind="fence")


def _ground(canvas: Canvas, horizon: int, vanishing_x: float, road_half_width: float, palette: dict) -> None:
    """The road in perspective towards the vanishing point, sidewalks either side, then terrain; lane dashes.
    road_half_width is the road's half width at the bottom row; it shrinks linearly to 0 at the horizon."""
    h, w = canvas.label.shape
    rows, cols = np.ogrid[0:h, 0:w]  # (H, 1), (1, W)
    depth = np.clip((rows - horizon) / np.float32(h - horizon), 0, 1)  # (H, 1): 0 at the horizon, 1 at the bottom
    off_centre = np.abs(cols - np.float32(vanishing_x))  # (1, W)
    ground = rows >= horizon
    g, rw = depth, road_half_width
    canvas.recolor(ground & (off_centre > 1.7 * g * rw), TERRAIN, palette["terrain"], kind="terrain")
    canvas.recolor(ground & (off_centre <= 1.7 * g * rw) & (off_centre > g * rw), SIDEWALK, palette["sidewalk"],
                   kind="sidewalk")
    canvas.recolor(ground & (off_centre <= g * rw), ROAD, palette["road"], kind="road")
    dashes = (np.sqrt(depth) * 14).astype(int) % 2 == 0
    canvas.recolor((canvas.label == ROAD) & (off_centre <= 0.5 + 0.012 * depth * w) & dashes, None, palette["lane"],
                   kind="lane")


def _street_objects(rng, canvas: Canvas, horizon: int, vanishing_x: float, road_half_width: float, domain: dict,
                    palette: dict) -> None:
    """Poles with signs or lights on the sidewalks, cars on the road, people on the sidewalks, painted far to near.
    An object at depth g (0 at the horizon, 1 at the bottom) stands on row horizon + g * (h - horizon)."""
    h, w = canvas.label.shape
    objects = [("pole", g) for g in rng.uniform(0.1, 0.8, rng.integers(1, 4))]
    objects += [("car", g) for g in rng.uniform(0.15, 0.9, rng.integers(1, 5))]
    objects += [("person", g) for g in rng.uniform(0.15, 0.85, rng.integers(0, 5))]
    for kind, g in sorted(objects, key=lambda o: o[1]):
        base, side = horizon + g * (h - horizon), rng.choice((-1, 1))
        if kind == "pole":
            x, pw, s = vanishing_x + side * g * road_half_width * 1.35, max(1.5, g * w * 0.012), max(4.0, g * w * 0.045)
            top = base - (0.6 + 1.6 * g) * (h - horizon)
            canvas.box(top, base, x - pw / 2, x + pw / 2, POLE, palette["pole"], kind="pole")
            if rng.random() < 0.5:
                canvas.box(top - s, top + 0.1 * s, x - s / 2, x + s / 2, SIGN, palette["sign"], ellipse=True,
                           kind="sign")
            else:
                canvas.box(top - 1.6 * s, top, x - 0.35 * s, x + 0.35 * s, LIGHT, palette["light_box"],
                           kind="light box")
                lamp = palette["lamp"][rng.integers(2)]
                canvas.box(top - 1.4 * s, top - 0.8 * s, x - 0.25 * s, x + 0.25 * s, LIGHT, lamp, ellipse=True,
                           kind="lamp")
        elif kind == "car":
            x, cw = vanishing_x + rng.uniform(-0.7, 0.7) * g * road_half_width, g * w * 0.22 * domain["car_size"]
            ch = 0.55 * cw
            cars = palette["car"]
            canvas.box(base - 0.6 * ch, base - 0.1 * ch, x - cw / 2, x + cw / 2, CAR,
                       cars[rng.integers(len(cars))] * rng.uniform(0.8, 1.1), kind="car body")
            canvas.box(base - ch, base - 0.55 * ch, x - 0.35 * cw, x + 0.35 * cw, CAR, palette["car_body_glass"],
                       kind="car glass")
            for wx in (x - 0.3 * cw, x + 0.3 * cw):
                canvas.box(base - 0.25 * ch, base, wx - 0.12 * cw, wx + 0.12 * cw, CAR, palette["wheel"], ellipse=True,
                           kind="wheel")
        else:
            x = vanishing_x + side * g * road_half_width * rng.uniform(1.1, 1.6)
            ph = g * (h - horizon) * 0.9 * domain["person_size"] + 4
            pw = 0.3 * ph
            clothes = palette["clothes"]
            canvas.box(base - 0.45 * ph, base, x - 0.4 * pw, x + 0.4 * pw, PERSON, palette["legs"], kind="legs")
            canvas.box(base - 0.82 * ph, base - 0.45 * ph, x - pw / 2, x + pw / 2, PERSON,
                       clothes[rng.integers(len(clothes))], kind="clothes")
            canvas.box(base - ph, base - 0.78 * ph, x - 0.3 * pw, x + 0.3 * pw, PERSON, palette["skin"], ellipse=True,
                       kind="skin")


def _textures(canvas: Canvas, domain: dict, palette: dict) -> None:
    """Windows, paving and fence slats; the demo domains differ only in the windows' scale."""
    h, w = canvas.label.shape
    rows, cols = np.ogrid[0:h, 0:w]
    py, px = domain["window"]
    label = canvas.label
    canvas.recolor((label == BUILDING) & (rows % py < py // 2) & (cols % px < px // 2), None, palette["window"],
                   kind="window")
    pave_x, pave_y = domain.get("paving", (9, 5))
    canvas.recolor((label == SIDEWALK) & ((cols % pave_x == 0) | (rows % pave_y == 0)), None, palette["paving"],
                   kind="paving")
    canvas.recolor((label == FENCE) & (cols % domain.get("slats", 4) == 0), None, palette["slat"], kind="slat")


def _camera(rng, canvas: Canvas, domain: dict) -> np.ndarray:
    """The painted scene seen through the domain's camera and light: saturation and exposure act linearly on the
    colors, so on the list; then foliage shading, lens blur, sensor noise and a color cast. -> (H, W, 3) uint8."""
    h, w = canvas.label.shape
    table = np.array(canvas.colors, np.float32)  # (K, 3)
    gray = table.mean(-1, keepdims=True)
    img = ((gray + domain["saturation"] * (table - gray)) * domain["light"])[canvas.paint]  # (H, W, 3)
    blobs = rng.uniform(0.6, 1.3, (h // 4 + 1, w // 4 + 1)).astype(np.float32).repeat(4, 0).repeat(4, 1)[:h, :w]
    img *= np.where(canvas.label == VEGETATION, blobs, np.float32(1))[..., None]
    if domain["blur"]:  # a 3x3 box filter
        p = np.pad(img, ((1, 1), (1, 1), (0, 0)), mode="edge")
        img = sum(p[i:i + h, j:j + w] for i in range(3) for j in range(3)) / 9
    img += (rng.random(img.shape, np.float32) - 0.5) * (domain["noise"] * 12 ** 0.5)  # uniform noise of std `noise`
    img += np.array(domain["tint"], np.float32) + 0.5
    return np.clip(img, 0, 255).astype(np.uint8)


def paint_scene(rng: np.random.Generator, h: int, w: int, domain: dict, palette: dict = COLORS) -> Canvas:
    """The shapes of one street scene, before the camera: sky, skyline, ground, street objects, textures."""
    sky_top, sky_low = (np.array(c, np.float32) for c in domain["sky"])
    canvas = Canvas(h, w, list(sky_top + (sky_low - sky_top) * np.linspace(0, 1, SKY_BANDS)[:, None]))
    horizon = int(h * rng.uniform(0.42, 0.55))
    _skyline(rng, canvas, horizon, palette)
    vanishing_x, road_half_width = w * rng.uniform(0.35, 0.65), w * rng.uniform(0.3, 0.45)
    _ground(canvas, horizon, vanishing_x, road_half_width, palette)
    _street_objects(rng, canvas, horizon, vanishing_x, road_half_width, domain, palette)
    _textures(canvas, domain, palette)
    if domain["ego"]:
        canvas.box(0.92 * h, 1.3 * h, -0.1 * w, 1.1 * w, data.IGNORE, palette["ego"], ellipse=True, kind="ego car")
    return canvas


def street_scene(rng: np.random.Generator, h: int, w: int, domain: dict,
                 palette: dict = COLORS) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """One street scene: (H, W, 3) uint8 image, (H, W) uint8 train ids (IGNORE for the ego car) and (H, W) uint8
    segment ids: which painted shape (or texture) owns each pixel, the sky's bands counting as one segment. The
    segments depend on the random draws only, never on the palette's colors or on the class ids."""
    canvas = paint_scene(rng, h, w, domain, palette)
    segments = np.where(canvas.paint < SKY_BANDS, 0, canvas.paint).astype(np.uint8)
    return _camera(rng, canvas, domain), canvas.label, segments


# ----------------------------------------------------------------------------------------------------------------
# 3. writing the datasets, in GTA5's and Cityscapes' layouts

MARKER = ".ssr-demo"  # in every top-level folder the demo writes; only folders holding it are ever replaced
MARKER_TEXT = ("This folder holds synthetic data written by the ssr demo (demo.py). The demo replaces folders that "
               "hold this file when it regenerates its data; delete this file to keep the demo away from it.\n")
CITIES = {"train": ("aachen", "bochum"), "val": ("frankfurt", "lindau")}
# demo labels are drawn in train ids and written as Cityscapes label ids; IGNORE (the ego car) -> 1, 'ego vehicle'
TRAIN_TO_ID = np.zeros(256, np.uint8)
TRAIN_TO_ID[:19], TRAIN_TO_ID[data.IGNORE] = data.LABEL_IDS, 1
ID_COLORS = np.zeros((256, 3), np.uint8)
ID_COLORS[list(data.LABEL_IDS)] = data.PALETTE  # GTA5's label palette and Cityscapes' _color.png: label id -> color


def _write_item(job: tuple) -> None:
    """Write one scene: job = (root, seed, split, i, (w, h)); split 'gta5' is the source domain."""
    root, seed, split, i, (w, h) = job
    code = ("gta5", "train", "val").index(split)  # separate random streams per split
    domain = DOMAINS["source" if split == "gta5" else "target"]
    img, lbl, _ = street_scene(np.random.default_rng([seed, code, i]), h, w, domain)
    if split == "gta5":
        Image.fromarray(img).save(os.path.join(root, "gta5", "images", f"{i + 1:05d}.png"), compress_level=1)
        label = Image.fromarray(TRAIN_TO_ID[lbl], mode="P")
        label.putpalette(ID_COLORS.ravel().tolist())
        label.save(os.path.join(root, "gta5", "labels", f"{i + 1:05d}.png"), compress_level=1)
        return
    city = CITIES[split][i % 2]
    stem = f"{city}_{i // 2:06d}_000019"
    img_dir, gt_dir = (os.path.join(root, "cityscapes", d, split, city) for d in ("leftImg8bit", "gtFine"))
    Image.fromarray(img).save(os.path.join(img_dir, f"{stem}_leftImg8bit.png"), compress_level=1)
    Image.fromarray(TRAIN_TO_ID[lbl]).save(os.path.join(gt_dir, f"{stem}_gtFine_labelIds.png"), compress_level=1)
    Image.fromarray(ID_COLORS[TRAIN_TO_ID[lbl]]).save(os.path.join(gt_dir, f"{stem}_gtFine_color.png"),
                                                      compress_level=1)


def _check_root(root: str) -> bool:
    """True when root holds a complete demo; raises DatasetError where writing one could harm a user's files."""
    if os.path.exists(root) and not os.path.isdir(root):
        raise files.DatasetError(f"--data-root {root} is a file, not a folder; the demo writes its synthetic "
                                 f"datasets into a folder. Point --data-root at a new folder (default data/demo).")
    for name in ("gta5", "cityscapes"):
        folder = os.path.join(root, name)
        if os.path.lexists(folder) and not os.path.isfile(os.path.join(folder, MARKER)):
            raise files.DatasetError(
                f"{folder} exists but was not written by the demo (it has no {MARKER} file), so the demo will "
                f"neither use nor replace it: it never deletes or overwrites data it did not create. Point "
                f"--data-root at another folder (default data/demo); if {folder} is the demo data of an older "
                f"version of this project, delete it yourself.")
    return os.path.isdir(os.path.join(root, "gta5"))  # gta5 is moved in last: its presence means complete


def write_data(root: str, seed: int = 0, n_src: int = CONFIG["n_src"], n_tgt: int = CONFIG["n_tgt"],
               n_val: int = CONFIG["n_val"], src_size=CONFIG["src_size"], tgt_size=CONFIG["tgt_size"]) -> None:
    """Write root/gta5 (n_src scenes, palette-PNG labels of label ids) and root/cityscapes (train and val over two
    cities each, `_gtFine_labelIds.png` and `_color.png` but no `_labelTrainIds.png`, so labels are mapped on the
    fly), replacing earlier demo data but nothing else (see MARKER). The same seed writes the same pixels; scenes
    are drawn in parallel over the cores. Both folders are written aside in root and moved in at the end, so an
    interrupted run leaves no half dataset that a later run would take for a whole one."""
    _check_root(root)
    made_root = not os.path.exists(root)
    os.makedirs(root, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=".ssr-demo-tmp-", dir=root)  # per process: two runs never share it
    try:
        folders = [os.path.join(tmp, "gta5", d) for d in ("images", "labels")]
        folders += [os.path.join(tmp, "cityscapes", d, split, city) for d in ("leftImg8bit", "gtFine")
                    for split, cities in CITIES.items() for city in cities]
        for folder in folders:
            os.makedirs(folder)
        for name in ("gta5", "cityscapes"):
            with open(os.path.join(tmp, name, MARKER), "w") as f:
                f.write(MARKER_TEXT)
        jobs = [(tmp, seed, "gta5", i, src_size) for i in range(n_src)]
        jobs += [(tmp, seed, split, i, tgt_size) for split, n in (("train", n_tgt), ("val", n_val)) for i in range(n)]
        with files.worker_pool() as pool:
            pool.map(_write_item, jobs, chunksize=8)
        _check_root(root)  # again: a user may have put a dataset there meanwhile
        for name in ("cityscapes", "gta5"):  # gta5 last: its presence marks a complete demo
            shutil.rmtree(os.path.join(root, name), ignore_errors=True)  # only marked folders reach here
            os.replace(os.path.join(tmp, name), os.path.join(root, name))
    finally:  # on a stop or an error too: no half dataset, and no empty folder this call made
        shutil.rmtree(tmp, ignore_errors=True)
        if made_root and not os.listdir(root):
            os.rmdir(root)


def prepare(root: str, sam_weights: str | None = None, pretrained: str | None = None) -> None:
    """What train.py --demo needs before it starts: the synthetic domains in root (written once) and, when the run
    uses them, the toy ImageNet encoder and the toy teacher (each pretrained once, then cached). The cache folder
    is checked first: no minute of pretraining is spent on a result that cannot be kept."""
    to_make = [p for p, cached in ((pretrained, imagenet_path()), (sam_weights, teacher_path()))
               if p == cached and not readable(p)]
    if to_make:
        files.check_cache_folder(os.path.dirname(to_make[0]))
    if not _check_root(root):
        print(f"writing the synthetic demo domains to {root} ...", flush=True)
        write_data(root)
    if pretrained == imagenet_path() and not readable(pretrained):
        print(f"pretraining the demo's MiT on the toy ImageNet (once, about a minute on 2 cores; cached in "
              f"{pretrained}) ...", flush=True)
        pretrain_imagenet(pretrained)
    if sam_weights == teacher_path() and not readable(sam_weights):
        print(f"pretraining the toy SAM teacher (once, about a minute on 2 cores; cached in {sam_weights}) ...",
              flush=True)
        pretrain_teacher(sam_weights)


def write_text(path: str, text: str) -> None:
    def write(tmp):
        with open(tmp, "w") as f:
            f.write(text)
    files.save_atomic(path, write)


def readable(path: str) -> bool:
    """A cached network that can be used: present and a whole safetensors file (a cut-short or empty one is made
    again, not trusted)."""
    try:
        with safe_open(path, "pt") as f:
            return len(list(f.keys())) > 0
    except (OSError, SafetensorError):
        return False


# ----------------------------------------------------------------------------------------------------------------
# 4. pretraining: the toy ImageNet (the student's starting point) and the toy SAM (the teacher)
#
# Two more worlds from the same painter. DAFormer's student starts from ImageNet: a broad image distribution that
# is neither GTA nor Cityscapes, and an image-level task. SAM saw images of every kind and learnt class-agnostic
# masks. Here:
# - the toy ImageNet is scenes in random domains only (camera, light, noise, blur, textures, sizes: never the demo's
#   two styles), with the world's colors of things, as ImageNet's cars are car-colored. Its task is image-level:
#   which of the painter's 23 part kinds (wheel, lamp, car glass, legs, window, paving, ...) appear in an
#   object-centred, randomly zoomed crop (object_crops), a multi-label classification from the mean of the last
#   stage's tokens, like MiT's ImageNet head. Its labels are finer than the demo's 19 classes and say nothing
#   about where a part is, so it is no segmentation task. (With random colors too, 300 steps learnt nothing
#   beyond the labels' base rates: held-out AUC 0.49; with the world's colors 0.69.)
# - the toy SAM's world is half random domains with random colors and a quarter of each demo style (SAM saw street
#   scenes too); its task is pixel-pair affinity: whether two cells belong to the same painted shape, finer than
#   the classes and blind to them. Neither sees a class label of either demo domain.

KINDS = ("sky", "building", "window", "trunk", "crown", "fence", "slat", "terrain", "sidewalk", "paving", "road",
         "lane", "pole", "sign", "light box", "lamp", "car body", "car glass", "wheel", "legs", "clothes", "skin",
         "ego car")
IMAGENET_VERSION = 1  # bump when the code changes what it learns: the cache key holds it
IMAGENET = dict(n_scenes=800, n_held_out=100, steps=500, batch=16, lr=1e-3, weight_decay=0.05, warmup=40,
                zoom=(0.25, 1.0),  # object_crops' squares: 32 to 128 px of a scene, resized to the 128 crop
                min_fraction=0.02,  # a part is present from 2% of the square (a wheel or a lamp close up)
                seed=0)
TEACHER_VERSION = 2
TEACHER = dict(n_scenes=600, n_held_out=100,  # scenes of the teacher's world, drawn once; training crops them
               steps=400, batch=12, lr=1e-3, weight_decay=0.05, warmup=40,
               points=96,  # 4x4-pixel cells of SAM's input per crop whose pairwise affinities are learned
               embed=32,  # width of the throw-away decoder's pixel embeddings
               seed=0)


def random_palette(rng: np.random.Generator) -> dict:
    """Every color of COLORS redrawn uniformly: cars, roads, skins and skies of any color."""
    return {k: rng.uniform(0, 255, np.shape(v)).astype(np.float32) for k, v in COLORS.items()}


def random_domain(rng: np.random.Generator) -> dict:
    """A camera, light and city style drawn from ranges that hold both demo domains and reach well beyond them."""
    return dict(sky=rng.uniform(20, 250, (2, 3)), window=tuple(rng.integers(3, 11, 2)),
                car_size=rng.uniform(0.8, 1.5), person_size=rng.uniform(0.8, 1.5), light=rng.uniform(0.5, 1.3),
                saturation=rng.uniform(0.1, 1.5), tint=rng.uniform(-25, 25, 3), noise=rng.uniform(0, 12),
                blur=rng.random() < 0.5, ego=rng.random() < 0.3, paving=tuple(rng.integers(3, 14, 2)),
                slats=int(rng.integers(2, 8)))


def world_scene(job: tuple) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Scene i of a pretraining world, job = (seed, world, i), at the size and scale a training crop of its style
    comes from. world 'imagenet': a random domain, with the world's colors of things; 'teacher': a quarter in the
    source style, a quarter in the target style, half in a random domain with a random palette. -> (h, w, 3) uint8 image, (h, w) uint8 segment ids and
    (h, w) uint8 part kinds (indices into KINDS), at the pipeline's scale. The class ids are never returned."""
    seed, world, i = job
    rng = np.random.default_rng([seed, 3 if world == "teacher" else 4, i])  # streams 0-2 are the datasets'
    u = rng.random() if world == "teacher" else 1.0
    if u < 0.5:
        style = "source" if u < 0.25 else "target"
        domain, palette = DOMAINS[style], COLORS
    else:
        style, domain = "target" if rng.random() < 0.5 else "source", random_domain(rng)
        palette = random_palette(rng) if world == "teacher" else COLORS
    (w, h), scale = (CONFIG["src_size"], CONFIG["src_scale"]) if style == "source" else (CONFIG["tgt_size"],
                                                                                         CONFIG["tgt_scale"])
    canvas = paint_scene(rng, h, w, domain, palette)
    img = _camera(rng, canvas, domain)
    segments = np.where(canvas.paint < SKY_BANDS, 0, canvas.paint).astype(np.uint8)
    kinds = np.array([KINDS.index(k) for k in canvas.kinds], np.uint8)[canvas.paint]
    size = data.rescale_size(w, h, scale)
    return (data.resize_image(img, size).to(torch.uint8).permute(1, 2, 0).numpy(), data.resize_label(segments, size),
            data.resize_label(kinds, size))


def draw_scenes(seed: int, world: str, start: int, n: int) -> list:
    with files.worker_pool() as pool:
        return pool.map(world_scene, [(seed, world, i) for i in range(start, start + n)], chunksize=16)


def random_crops(scenes: list, gen: torch.Generator, batch: int, crop: int) -> tuple[torch.Tensor, ...]:
    """Random crops and flips of random scenes -> normalized images (B, 3, crop, crop) and their segments and part
    kinds (B, crop, crop) each."""
    imgs, segs, kinds = [], [], []
    for j in torch.randint(len(scenes), (batch,), generator=gen).tolist():
        img, seg, kind = scenes[j]
        h, w = seg.shape
        y = int(torch.randint(h - crop + 1, (), generator=gen))
        x = int(torch.randint(w - crop + 1, (), generator=gen))
        views = [torch.from_numpy(a[y:y + crop, x:x + crop]) for a in (img, seg, kind)]
        if torch.rand((), generator=gen) < 0.5:
            views = [v.flip(1) for v in views]
        imgs.append(views[0].permute(2, 0, 1).float())
        segs.append(views[1].long())
        kinds.append(views[2].long())
    return data.normalize(torch.stack(imgs)), torch.stack(segs), torch.stack(kinds)


def object_crops(scenes: list, gen: torch.Generator, batch: int, crop: int, zoom=(0.25, 1.0),
                 min_fraction: float = 0.02) -> tuple[torch.Tensor, torch.Tensor]:
    """The toy ImageNet's images and labels. ImageNet's photos centre an object, and its RandomResizedCrop zooms in
    at random: a square of side zoom * crop pixels around a pixel of a part kind drawn uniformly among those of a
    random scene, resized to crop x crop and flipped at random -> normalized images (B, 3, crop, crop) and 0/1
    part-presence targets (B, len(KINDS)): the parts that cover at least min_fraction of the square."""
    imgs, targets = [], []
    for j in torch.randint(len(scenes), (batch,), generator=gen).tolist():
        img, _, kinds = scenes[j]
        h, w = kinds.shape
        present = np.unique(kinds)
        ys, xs = np.nonzero(kinds == present[int(torch.randint(len(present), (), generator=gen))])
        p = int(torch.randint(len(ys), (), generator=gen))
        side = int(crop * (zoom[0] + (zoom[1] - zoom[0]) * torch.rand((), generator=gen).item()))
        y0, x0 = int(np.clip(ys[p] - side // 2, 0, h - side)), int(np.clip(xs[p] - side // 2, 0, w - side))
        view = torch.from_numpy(img[y0:y0 + side, x0:x0 + side]).permute(2, 0, 1).float()
        view = F.interpolate(view[None], size=(crop, crop), mode="bilinear", align_corners=False)[0]
        imgs.append(view.flip(-1) if torch.rand((), generator=gen) < 0.5 else view)
        part = torch.from_numpy(kinds[y0:y0 + side, x0:x0 + side]).long().flatten()
        targets.append((F.one_hot(part, len(KINDS)).float().mean(0) >= min_fraction).float())
    return data.normalize(torch.stack(imgs)), torch.stack(targets)


class PresenceHead(nn.Module):
    """The toy ImageNet's classifier, thrown away after pretraining: the mean of the last stage's tokens, then a
    linear layer, as MiT's ImageNet head (NVlabs' `head`)."""

    def __init__(self, dim: int):
        super().__init__()
        self.head = nn.Linear(dim, len(KINDS))

    def forward(self, feats: list[torch.Tensor]) -> torch.Tensor:  # MiT's 4 maps -> (B, K) logits
        return self.head(feats[-1].mean(dim=(2, 3)))


def demo_mit(seed: int = IMAGENET["seed"]) -> mit.MixVisionTransformer:
    """The demo's MiT (the preset and overrides train.py --demo builds), randomly initialized."""
    torch.manual_seed(seed)
    return mit.build_mit(FLAGS["backbone"], **CONFIG["mit"])


def lr_at(step: int, steps: int, cfg: dict) -> float:
    """Linear warm-up, then a cosine to 0: the pretrainings' schedule."""
    return cfg["lr"] * min(1, (step + 1) / cfg["warmup"]) * 0.5 * (1 + math.cos(math.pi * step / steps))


def fit(params: list, steps: int, cfg: dict, name: str, step_loss, log_every: int = 100) -> list[float]:
    """The pretrainings' loop: AdamW on params under lr_at's schedule; step_loss(gen) draws a batch from the seeded
    generator and returns its loss -> the loss of every step."""
    opt = torch.optim.AdamW(params, lr=cfg["lr"], weight_decay=cfg["weight_decay"])
    gen = torch.Generator().manual_seed(cfg["seed"])
    losses, t0 = [], time.time()
    for step in range(steps):
        for g in opt.param_groups:
            g["lr"] = lr_at(step, steps, cfg)
        loss = step_loss(gen)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(loss.item())
        if log_every and (step + 1) % log_every == 0:
            print(f"{name} step {step + 1}/{steps} loss {np.mean(losses[-log_every:]):.4f} ({time.time() - t0:.0f} s)",
                  flush=True)
    return losses


def train_imagenet(scenes: list, steps: int, cfg: dict = IMAGENET, log_every: int = 100):
    """Pretrain the demo's MiT with PresenceHead on random crops -> (encoder, head, loss per step)."""
    encoder = demo_mit(cfg["seed"])
    head = PresenceHead(encoder.cfg.embed_dims[-1])

    def step_loss(gen):
        img, target = object_crops(scenes, gen, cfg["batch"], CONFIG["crop"], cfg["zoom"], cfg["min_fraction"])
        return F.binary_cross_entropy_with_logits(head(encoder(img)), target)

    losses = fit([*encoder.parameters(), *head.parameters()], steps, cfg, "toy ImageNet", step_loss, log_every)
    return encoder, head, losses


@torch.no_grad()
def presence_auc(encoder, head: PresenceHead, scenes: list, n: int = 256) -> float:
    """The mean over part kinds of the ROC AUC of the presence logits on fixed crops of the given scenes: the
    chance that a crop with the part scores above one without it (0.5 is chance)."""
    img, target = object_crops(scenes, torch.Generator().manual_seed(1), n, CONFIG["crop"], IMAGENET["zoom"],
                               IMAGENET["min_fraction"])
    logits, aucs = head(encoder(img)), []
    for k in range(len(KINDS)):
        pos, neg = logits[target[:, k] > 0, k], logits[target[:, k] == 0, k]
        if len(pos) and len(neg):
            aucs.append((pos[:, None] > neg[None, :]).float().mean().item())
    return float(np.mean(aucs))


def cache_path(name: str, *what) -> str:
    """A pretrained network's place in the cache (files.cache_folder()), under a hash of what determines it."""
    key = json.dumps(what, sort_keys=True)
    return os.path.join(files.cache_folder(), f"{name}_{hashlib.sha1(key.encode()).hexdigest()[:16]}.safetensors")


def imagenet_path() -> str:
    return cache_path("toy_imagenet_mit", IMAGENET, CONFIG["mit"], FLAGS["backbone"], IMAGENET_VERSION)


def teacher_path() -> str:
    return cache_path("toy_teacher", TEACHER, CONFIG["sam"], CONFIG["sam_img_size"], TEACHER_VERSION)


def pretrain_imagenet(path: str) -> None:
    """Draw the toy ImageNet, pretrain, report the held-out accuracy, save the encoder to path in the NVlabs MiT
    layout, which --pretrained loads (the classifier is dropped, as mit.load_weights drops NVlabs' head)."""
    t0 = time.time()
    scenes = draw_scenes(IMAGENET["seed"], "imagenet", 0, IMAGENET["n_scenes"])
    held_out = draw_scenes(IMAGENET["seed"], "imagenet", IMAGENET["n_scenes"], IMAGENET["n_held_out"])
    encoder, head, losses = train_imagenet(scenes, IMAGENET["steps"])
    auc = presence_auc(encoder.eval(), head, held_out)
    print(f"toy ImageNet: part-presence AUC on held-out scenes {auc:.3f} (chance 0.5), loss "
          f"{np.mean(losses[:20]):.3f} -> {np.mean(losses[-20:]):.3f}, {time.time() - t0:.0f} s in all", flush=True)
    save_mit(encoder, path)


def save_network(sd: dict, path: str, meta: dict) -> None:
    """A pretrained network's tensors as safetensors, written atomically (its folder made if needed)."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    files.save_atomic(path, lambda tmp: save_file(sd, tmp, metadata=meta))


def save_mit(encoder: mit.MixVisionTransformer, path: str) -> None:
    """The encoder alone, in the NVlabs MiT layout, written atomically: --pretrained loads it."""
    meta = {"what": "the ssr demo's MiT pretrained on its toy ImageNet (demo.py pretrain)",
            "config": json.dumps(IMAGENET), "version": str(IMAGENET_VERSION)}
    save_network({k: v.detach().contiguous() for k, v in encoder.state_dict().items()}, path, meta)


def sam_view(img: torch.Tensor, seg: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Crops (B, 3, c, c) and segments (B, c, c) as the teacher sees them in training: resized to sam_img_size
    (UDA.sam_tokens: bilinear), the segments by repetition."""
    s = CONFIG["sam_img_size"]
    k = s // img.shape[-1]
    return (F.interpolate(img, size=(s, s), mode="bilinear", align_corners=False),
            seg.repeat_interleave(k, 1).repeat_interleave(k, 2))


class AffinityDecoder(nn.Module):
    """The pretext head, thrown away after pretraining: each token's 256 features become pixel embeddings of its
    4x4 cells of 4x4 pixels (a 1x1 conv, then pixel shuffle), so the encoder must describe what lies inside its
    16-px patch, not only what the patch is. Two pixels' affinity logit is their scaled cosine."""

    def __init__(self, embed: int):
        super().__init__()
        self.proj = nn.Conv2d(sam_encoder.SamConfig.out_chans, 16 * embed, 1)
        self.scale = nn.Parameter(torch.tensor(10.0))
        self.bias = nn.Parameter(torch.tensor(-5.0))

    def forward(self, feats: torch.Tensor) -> torch.Tensor:  # (B, 256, g, g) -> (B, E, 4g, 4g), unit length
        return F.normalize(F.pixel_shuffle(self.proj(feats), 4), dim=1)


def affinity_pairs(emb: torch.Tensor, segments: torch.Tensor, gen: torch.Generator, points: int):
    """Sample `points` cells per image -> (their cosine similarities (B, P, P), same-segment targets (B, P, P)).
    A cell's segment is the segment of its centre pixel in the full-resolution (B, H, W) segment map."""
    B, E, h, w = emb.shape
    cell = segments.shape[-1] // w
    idx = torch.stack([torch.randperm(h * w, generator=gen)[:points] for _ in range(B)])  # (B, P)
    e = emb.flatten(2).gather(2, idx[:, None].expand(B, E, points))  # (B, E, P)
    centres = segments[:, cell // 2::cell, cell // 2::cell].flatten(1).gather(1, idx)  # (B, P)
    return e.transpose(1, 2) @ e, (centres[:, :, None] == centres[:, None, :]).float()  # (B, P, P) each


def affinity_loss(cos: torch.Tensor, same: torch.Tensor, dec: AffinityDecoder) -> torch.Tensor:
    """Binary cross-entropy of same-segment, positives and negatives weighted equally (most pairs differ)."""
    loss = F.binary_cross_entropy_with_logits(cos * dec.scale + dec.bias, same, reduction="none")
    pos = (loss * same).sum() / same.sum().clamp(min=1)
    neg = (loss * (1 - same)).sum() / (1 - same).sum().clamp(min=1)
    return (pos + neg) / 2


@torch.no_grad()
def affinity_accuracy(encoder, dec: AffinityDecoder, scenes: list, seed: int = 1, batches: int = 8) -> float:
    """Balanced accuracy (mean of the accuracies on same- and different-segment pairs; chance is 0.5) on fixed
    crops of the given scenes."""
    gen = torch.Generator().manual_seed(seed)
    hits = torch.zeros(2)
    for _ in range(batches):
        img, seg = sam_view(*random_crops(scenes, gen, TEACHER["batch"], CONFIG["crop"])[:2])
        cos, same = affinity_pairs(dec(encoder(img)), seg, gen, TEACHER["points"])
        pred = (cos * dec.scale + dec.bias) > 0
        hits += torch.stack([(pred & (same > 0)).sum() / same.sum(), (~pred & (same == 0)).sum() / (same == 0).sum()])
    return (hits / batches).mean().item()


def teacher_encoder(seed: int = TEACHER["seed"]) -> sam_encoder.SamEncoder:
    """The demo's SAM encoder (the same code as the real one, the small preset of CONFIG), randomly initialized."""
    torch.manual_seed(seed)
    return sam_encoder.build_sam_encoder("vit_b", CONFIG["sam_img_size"], **CONFIG["sam"])


def train_teacher(scenes: list, steps: int, freeze_encoder: bool = False, log_every: int = 100,
                  cfg: dict = TEACHER) -> tuple[sam_encoder.SamEncoder, AffinityDecoder, list[float]]:
    """Pretrain encoder and decoder on pixel-pair affinity -> (encoder, decoder, loss per step). With
    freeze_encoder only the decoder learns, on the random encoder: what a random teacher's features allow."""
    encoder, dec = teacher_encoder(cfg["seed"]), AffinityDecoder(cfg["embed"])
    encoder.requires_grad_(not freeze_encoder)
    params = [p for p in list(encoder.parameters()) + list(dec.parameters()) if p.requires_grad]

    def step_loss(gen):
        img, seg = sam_view(*random_crops(scenes, gen, cfg["batch"], CONFIG["crop"])[:2])
        cos, same = affinity_pairs(dec(encoder(img)), seg, gen, cfg["points"])
        return affinity_loss(cos, same, dec)

    losses = fit(params, steps, cfg, "teacher", step_loss, log_every)
    return encoder, dec, losses


def save_teacher(encoder: sam_encoder.SamEncoder, path: str) -> None:
    """The encoder alone, in the official SAM layout (image_encoder.*), written atomically: --sam-weights loads it."""
    sd = {f"image_encoder.{k}": v.detach().contiguous() for k, v in encoder.state_dict().items()}
    meta = {"what": "toy SAM teacher of the ssr demo (demo.py teacher)", "config": json.dumps(TEACHER),
            "version": str(TEACHER_VERSION)}
    save_network(sd, path, meta)


def pretrain_teacher(path: str, probe_random: bool = False) -> None:
    """Draw the teacher's world, pretrain, report the held-out pretext accuracy, save the encoder to path."""
    t0 = time.time()
    scenes = draw_scenes(TEACHER["seed"], "teacher", 0, TEACHER["n_scenes"])
    held_out = draw_scenes(TEACHER["seed"], "teacher", TEACHER["n_scenes"], TEACHER["n_held_out"])
    encoder, dec, losses = train_teacher(scenes, TEACHER["steps"], freeze_encoder=probe_random)
    acc = affinity_accuracy(encoder.eval(), dec, held_out)
    what = "random encoder, trained decoder" if probe_random else "pretrained teacher"
    print(f"{what}: same-segment pair accuracy on held-out domains {100 * acc:.1f}% (balanced, chance 50%), "
          f"loss {np.mean(losses[:20]):.3f} -> {np.mean(losses[-20:]):.3f}, {time.time() - t0:.0f} s in all",
          flush=True)
    if not probe_random:
        save_teacher(encoder, path)


def _probe_crops(style: str, n: int, seed: int) -> tuple[torch.Tensor, np.ndarray]:
    """n centre crops of scenes of a demo domain -> normalized images (n, 3, crop, crop), train ids (n, crop, crop)."""
    (w, h), scale = (CONFIG["src_size"], CONFIG["src_scale"]) if style == "source" else (CONFIG["tgt_size"],
                                                                                         CONFIG["tgt_scale"])
    size, c = data.rescale_size(w, h, scale), CONFIG["crop"]
    y0, x0 = (size[1] - c) // 2, (size[0] - c) // 2
    imgs, lbls = [], []
    for i in range(n):
        img, lbl, _ = street_scene(np.random.default_rng([seed, 5, i]), h, w, DOMAINS[style])
        imgs.append(data.resize_image(img, size)[:, y0:y0 + c, x0:x0 + c])
        lbls.append(data.resize_label(lbl, size)[y0:y0 + c, x0:x0 + c])
    return data.normalize(torch.stack(imgs)), np.stack(lbls)


@torch.no_grad()
def _cells(encoder, imgs: torch.Tensor, lbls: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
    """Tokens upsampled 4x to cells, and the train id at each cell's centre; ignored cells dropped."""
    s = CONFIG["sam_img_size"]
    feats = encoder(F.interpolate(imgs, size=(s, s), mode="bilinear", align_corners=False))  # (N, 256, g, g)
    x = F.interpolate(feats, scale_factor=4, mode="bilinear", align_corners=False)  # (N, 256, 4g, 4g)
    x = x.permute(0, 2, 3, 1).reshape(-1, feats.shape[1])
    cell = lbls.shape[-1] // (4 * feats.shape[-1])
    y = torch.from_numpy(lbls[:, cell // 2::cell, cell // 2::cell].astype(np.int64)).reshape(-1)
    return x[y != data.IGNORE], y[y != data.IGNORE]


def transfer_probe(encoder, n: int = 48, steps: int = 300) -> dict:
    """What the frozen teacher knows that survives the domain shift, apart from SSR: a linear classifier of the 19
    classes on its tokens, fit on source crops, scored (mIoU over the classes present, %) on held-out source crops
    and on target crops. The class ids judge the teacher here; its pretraining never sees them."""
    src_x, src_y = _cells(encoder.eval(), *_probe_crops("source", n, seed=11))
    held = _cells(encoder, *_probe_crops("source", n // 2, seed=12))
    tgt = _cells(encoder, *_probe_crops("target", n // 2, seed=13))
    mu, sd = src_x.mean(0), src_x.std(0) + 1e-5
    torch.manual_seed(0)
    linear = nn.Linear(src_x.shape[1], len(data.CLASSES))
    opt = torch.optim.Adam(linear.parameters(), lr=0.05)
    for _ in range(steps):  # full batch: a few thousand cells
        loss = F.cross_entropy(linear((src_x - mu) / sd), src_y)
        opt.zero_grad()
        loss.backward()
        opt.step()

    @torch.no_grad()
    def miou(x, y):
        pred = linear((x - mu) / sd).argmax(1)
        return 100 * np.mean([((pred == c) & (y == c)).sum().item() / ((pred == c) | (y == c)).sum().item()
                              for c in y.unique().tolist()])
    return dict(source=miou(*held), target=miou(*tgt))


# ----------------------------------------------------------------------------------------------------------------
# 5. the study: every setting trained by train.py itself, per seed

SETTINGS = {  # name -> train.py flags on top of --demo
    "source-only": ["--method", "source-only"],
    "dacs": ["--method", "dacs"],
    "ssr-random": ["--method", "ssr", "--sam-weights", "none"],
    "ssr-toy": ["--method", "ssr"],  # the toy teacher: --demo's default for ssr
    "ssr-shuffled": ["--method", "ssr", "--ssr-context", "shuffled"],
    "ssr-zeros": ["--method", "ssr", "--ssr-context", "zeros"],
}
TITLES = {"source-only": "source only", "dacs": "dacs", "ssr-random": "ssr, random teacher",
          "ssr-toy": "ssr, toy teacher", "ssr-shuffled": "ssr, shuffled tokens", "ssr-zeros": "ssr, zero context"}
# Student's t, 97.5% quantile by degrees of freedom: the half-width of a 95% interval is t * sd / sqrt(n)
T975 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262, 10: 2.228,
        11: 2.201, 12: 2.179, 13: 2.160, 14: 2.145, 15: 2.131, 20: 2.086, 30: 2.042}


def parse_final_table(stdout: str) -> dict:
    """The last per-class table that train.py printed (eval.print_table) -> dict(miou, iou: 19 values or NaN)."""
    lines = stdout.splitlines()
    start = max(i for i, line in enumerate(lines) if line.split() == ["class", "IoU"])
    iou = []
    for line in lines[start + 1:start + 1 + len(data.CLASSES)]:
        value = line.rsplit(None, 1)[-1]
        iou.append(float("nan") if value == "n/a" else float(value))
    miou = next(float(line.split()[1]) for line in lines[start:] if line.startswith("mIoU:"))
    return dict(miou=miou, iou=iou)


def run_setting(setting: str, seed: int, iters: int, out: str, data_root: str, amp: str | None) -> dict:
    """Train one setting with train.py on one core (skipped when out holds its result already) ->
    dict(miou, iou, seconds)."""
    result_path = os.path.join(out, "study_result.json")
    if os.path.isfile(result_path):
        with open(result_path) as f:
            return json.load(f)
    sched = schedule(iters)
    cmd = [sys.executable, os.path.join(os.path.dirname(os.path.abspath(__file__)), "train.py"), "--demo",
           *SETTINGS[setting], "--seed", str(seed), "--iters", str(iters), "--warmup", str(sched["warmup"]),
           "--ema-alpha", str(sched["ema_alpha"]), "--out", out, "--data-root", data_root, "--eval-every", "0",
           "--save-every", str(iters), "--debug-every", "0", "--workers", "0"] + (["--amp", amp] if amp else [])
    if os.path.exists(os.path.join(out, "train_state.pt")):  # a run cut short (a stop of the study): continue it
        cmd.append("--resume")
    t0 = time.time()
    env = dict(os.environ, OMP_NUM_THREADS="1")  # two runs at a time, one core each (study())
    run = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if run.returncode:
        raise files.UserError(f"{' '.join(cmd)} failed (exit status {run.returncode}): "
                             f"{' '.join(run.stderr.split()[-60:])}")
    result = dict(parse_final_table(run.stdout), seconds=time.time() - t0)
    write_text(result_path, json.dumps(result))
    return result


def mean_sd_ci(xs: list[float]) -> tuple[float, float, float]:
    """Mean, sample sd and the half-width of the 95% t-interval of the mean."""
    n = len(xs)
    sd = float(np.std(xs, ddof=1)) if n > 1 else 0.0
    t = T975.get(n - 1, T975[max(k for k in T975 if k <= n - 1)] if n > 1 else float("nan"))
    return float(np.mean(xs)), sd, t * sd / math.sqrt(n) if n > 1 else float("nan")


def study_markdown(results: dict, seeds: list[int], note: str = "") -> str:
    """results[setting][seed] = dict(miou, iou) -> the study's markdown: target mIoU per seed, mean, sd, the paired
    difference to dacs with its 95% interval, and the per-class IoU of every setting (means over seeds)."""
    names = list(results)
    rows = ["| seed | " + " | ".join(TITLES.get(n, n) for n in names) + " |", "|---" * (len(names) + 1) + "|"]
    rows += [f"| {s} | " + " | ".join(f"{results[n][s]['miou']:.2f}" for n in names) + " |" for s in seeds]
    stats = {n: mean_sd_ci([results[n][s]["miou"] for s in seeds]) for n in names}
    rows.append("| mean | " + " | ".join(f"**{stats[n][0]:.2f}**" for n in names) + " |")
    rows.append("| sd | " + " | ".join(f"{stats[n][1]:.2f}" for n in names) + " |")
    if "dacs" in results:
        diffs = {n: mean_sd_ci([results[n][s]["miou"] - results["dacs"][s]["miou"] for s in seeds]) for n in names}
        rows.append("| minus dacs, same seed: mean [95% interval] | " + " | ".join(
            "-" if n == "dacs" else f"{diffs[n][0]:+.2f} [{diffs[n][0] - diffs[n][2]:+.2f}, "
            f"{diffs[n][0] + diffs[n][2]:+.2f}]" for n in names) + " |")
    lines = ([note, ""] if note else []) + ["Target mIoU (%) on the demo's Cityscapes-like val set:", ""] + rows
    with warnings.catch_warnings():  # a class absent from the val labels and every prediction is NaN throughout
        warnings.simplefilter("ignore", RuntimeWarning)
        per_class = {n: np.nanmean([results[n][s]["iou"] for s in seeds], axis=0) for n in names}
    lines += ["", "Per-class IoU (%), mean over seeds:", "",
              "| class | " + " | ".join(TITLES.get(n, n) for n in names) + " |", "|---" * (len(names) + 1) + "|"]
    for c, name in enumerate(data.CLASSES):
        if not all(math.isnan(per_class[n][c]) for n in names):
            lines.append(f"| {name} | " + " | ".join(f"{per_class[n][c]:.2f}" for n in names) + " |")
    return "\n".join(lines) + "\n"


def study_chart(results: dict, seeds: list[int], path: str) -> None:
    """Bars of the mean target mIoU per setting, each seed a dot on its bar; drawn with pillow."""
    names = list(results)
    values = [[results[n][s]["miou"] for s in seeds] for n in names]
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
        d.text((x0, H - bottom + 10), TITLES.get(n, n), fill="black")
        d.text((x0, H - bottom + 26), f"{np.mean(v):.2f}", fill="black")
    img.save(path)


def study(seeds: list[int], iters: int, out: str, data_root: str, settings: list[str], amp: str | None,
          jobs: int = 2) -> str:
    """Run every setting for every seed, `jobs` runs at a time on one core each (on 2 cores two one-core runs get
    through 1.5x the iterations of one two-core run), write out/study.md and out/study.png, return the markdown."""
    uses_teacher = any("--sam-weights" not in SETTINGS[n] and "zeros" not in SETTINGS[n] for n in settings
                       if SETTINGS[n][1] == "ssr")
    prepare(data_root, teacher_path() if uses_teacher else None, imagenet_path())  # once, before the runs
    results, t0 = {n: {} for n in settings}, time.time()
    todo = [(n, seed) for seed in seeds for n in settings]

    def run(job):
        n, seed = job
        r = run_setting(n, seed, iters, os.path.join(out, f"{n}_seed{seed}"), data_root, amp)
        print(f"{n} seed {seed}: target mIoU {r['miou']:.2f} ({r['seconds']:.0f} s)", flush=True)
        return job, r

    with ThreadPoolExecutor(jobs) as pool:
        for (n, seed), r in pool.map(run, todo):
            results[n][seed] = r
    wall = time.time() - t0
    note = (f"{len(seeds)} seeds, {iters} iterations, {amp or 'fp32'}, {jobs} runs at a time; `python demo.py study "
            f"--seeds {len(seeds)} --iters {iters}" + (f" --amp {amp}" if amp else "") + (
                f" --settings {','.join(settings)}" if settings != list(SETTINGS) else "") + f"`; {wall:.0f} s")
    md = study_markdown(results, seeds, note)
    write_text(os.path.join(out, "study.md"), md)
    study_chart(results, seeds, os.path.join(out, "study.png"))
    print(md + f"\nwrote {os.path.join(out, 'study.md')} and study.png; {wall:.0f} s", flush=True)
    return md


# ----------------------------------------------------------------------------------------------------------------
# command line

def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    pt = sub.add_parser("pretrain", help="pretrain the demo's MiT on the toy ImageNet (train.py --demo does it on "
                                         "first use)")
    pt.add_argument("--out", help=f"safetensors file to write (default: the cache, {imagenet_path()})")
    t = sub.add_parser("teacher", help="pretrain the toy SAM teacher (train.py --demo does it on first use)")
    t.add_argument("--out", help=f"safetensors file to write (default: the cache, {teacher_path()})")
    t.add_argument("--probe-random", action="store_true",
                   help="train only the pretext decoder on the frozen random encoder and report its accuracy (a "
                        "baseline for the teacher's); writes nothing")
    pr = sub.add_parser("probe", help="linear probe of a teacher's frozen features: fit on source, score on target")
    pr.add_argument("--weights", default=None, help="SAM weights to probe, or 'none' (default: the toy teacher)")
    s = sub.add_parser("study", help="train the six settings of the study (README) for each seed")
    s.add_argument("--seeds", type=int, default=5, help="seeds 0 .. N-1")
    s.add_argument("--iters", type=int, default=FLAGS["iters"],
                   help="training iterations per run; the warm-up and EMA horizon follow schedule()")
    s.add_argument("--out", default="runs/study", help="folder for the runs, study.md and study.png")
    s.add_argument("--data-root", default=FLAGS["data_root"], help="the demo data (written there if absent)")
    s.add_argument("--settings", default=",".join(SETTINGS), help=f"comma-separated among {', '.join(SETTINGS)}")
    s.add_argument("--jobs", type=int, default=2, help="runs at a time, one core each")
    s.add_argument("--amp", choices=["bf16", "fp16", "fp32"],
                   help="train.py --amp for every run (default: train.py's, fp32 on a CPU)")
    args = p.parse_args()
    try:
        if args.cmd == "pretrain":
            out = args.out or imagenet_path()
            files.check_cache_folder(os.path.dirname(os.path.abspath(out)))
            pretrain_imagenet(out)
            print(f"wrote {out}")
        elif args.cmd == "teacher":
            out = args.out or teacher_path()
            if not args.probe_random:
                files.check_cache_folder(os.path.dirname(os.path.abspath(out)))
            pretrain_teacher(out, probe_random=args.probe_random)
            if not args.probe_random:
                print(f"wrote {out}")
        elif args.cmd == "probe":
            weights = args.weights or teacher_path()
            encoder = teacher_encoder()
            if weights != "none":
                sam_encoder.load_weights(encoder, weights)
            r = transfer_probe(encoder)
            print(f"{weights}: linear probe of the 19 classes on frozen tokens, fit on the source domain: "
                  f"mIoU {r['source']:.1f} on held-out source crops, {r['target']:.1f} on target crops")
        else:
            settings = [x for x in args.settings.split(",") if x]
            if not settings or any(x not in SETTINGS for x in settings):
                raise files.FlagError(f"--settings {args.settings!r}: choose among {', '.join(SETTINGS)}, "
                                     f"comma-separated.")
            if args.seeds <= 0 or args.iters <= 0 or args.jobs <= 0:
                raise files.FlagError("--seeds, --iters and --jobs must be positive.")
            os.makedirs(args.out, exist_ok=True)
            study(list(range(args.seeds)), args.iters, args.out, args.data_root, settings, args.amp, args.jobs)
    except files.UserError as e:
        sys.exit(f"error: {e}")
    except KeyboardInterrupt:
        sys.exit("stopped; nothing half-written was left behind (a study continues where it stopped when run "
                 "again)")


if __name__ == "__main__":
    main()
