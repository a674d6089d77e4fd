"""The demo's toy world: two synthetic street domains, a toy foundation teacher, and a study of the methods on them.

    python train.py --demo                       # adapt a tiny model from the GTA5-like to the Cityscapes-like domain
    python demo.py teacher [--out PATH]          # pretrain the toy SAM teacher (train.py --demo does it on first use)
    python demo.py study --seeds 3               # source-only, dacs, ssr with a random and with the toy teacher

Read top to bottom:
1. The configuration: sizes, the tiny models and train.py's --demo defaults, in one place.
2. The world. A street scene is painted as shapes (sky, skyline, road in perspective, poles, cars, people) into a
   label map of train ids and a map of which shape owns each pixel; a domain (camera, light, city style) and a
   palette (the colors of things) turn the shapes into an image. The demo has two domains, "source" (GTA5-like)
   and "target" (Cityscapes-like), written in the datasets' real layouts so that --demo runs the real code path.
3. Writing the datasets. A marker file in every folder the demo writes: it only ever replaces its own folders.
4. The toy teacher. SSR's claim is that SAM, having seen images of every kind, pulls the student towards features
   that do not depend on the domain. Here the "every kind" is many randomized domains of the same world (random
   palettes, light, noise, blur, textures, including styles like both demo domains), and the encoder of
   sam_encoder.py learns, without any class label, which pixels belong to the same painted shape (pixel-pair
   affinity, in SAM's class-agnostic spirit). Its decoder is thrown away; the encoder is saved in SAM's key layout.
5. The study: train.py run as a subprocess per setting and seed, a markdown table and a chart.
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
from multiprocessing import Pool

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before torch loads OpenMP: no spinning threads on a shared
# machine (train.py says why, README "Performance" measures it); the user's own setting wins

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image, ImageDraw
from safetensors.torch import save_file

import data
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
    sam_img_size=128,  # the crop itself: an 8x8 token grid
)
# train.py --demo sets these defaults (flags still override them). --sam-weights is left unset: for --method ssr
# train.py then takes the toy teacher (teacher_path()), and --sam-weights none gives a random one.
FLAGS = dict(data_root="data/demo", backbone="mit_b0", pretrained="none", sam_img_size=CONFIG["sam_img_size"],
             iters=300, lr=6e-4, warmup=50, crop=CONFIG["crop"], eval_every=100, save_every=100, log_every=50,
             debug_every=100)


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

    def box(self, y0, y1, x0, x1, cls: int, color, ellipse: bool = False) -> None:
        """Paint an axis-aligned box, or the ellipse inscribed in it, clipped to the image."""
        h, w = self.label.shape
        ya, yb, xa, xb = max(int(y0), 0), min(math.ceil(y1), h), max(int(x0), 0), min(math.ceil(x1), w)
        if ya >= yb or xa >= xb:
            return
        self.colors.append(color)
        if not ellipse:
            self.label[ya:yb, xa:xb], self.paint[ya:yb, xa:xb] = cls, len(self.colors) - 1
            return
        yy, xx = np.ogrid[ya:yb, xa:xb]
        m = (((yy + 0.5 - (y0 + y1) / 2) / ((y1 - y0) / 2)) ** 2
             + ((xx + 0.5 - (x0 + x1) / 2) / ((x1 - x0) / 2)) ** 2 <= 1)
        self.label[ya:yb, xa:xb][m] = cls
        self.paint[ya:yb, xa:xb][m] = len(self.colors) - 1

    def recolor(self, mask: np.ndarray, cls: int | None, color) -> None:
        """Give every pixel of the (H, W) mask a new color (and class, unless None): the ground and the textures."""
        self.colors.append(color)
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
                       palette["building"][rng.integers(3)] * rng.uniform(0.85, 1.15))
        else:
            crown = width * rng.uniform(0.8, 1.2)
            canvas.box(horizon - 0.25 * crown, horizon, x + 0.45 * width, x + 0.55 * width, VEGETATION,
                       palette["trunk"])
            canvas.box(horizon - 1.1 * crown, horizon - 0.2 * crown, x, x + width, VEGETATION, palette["crown"],
                       ellipse=True)
        x += width
    if rng.random() < 0.5:
        x0 = rng.uniform(0, 0.6) * w
        canvas.box(horizon - 0.07 * h, horizon, x0, x0 + rng.uniform(0.2, 0.4) * w, FENCE, palette["fence"])


def _ground(canvas: Canvas, horizon: int, vanishing_x: float, road_half_width: float, palette: dict) -> None:
    """The road in perspective towards the vanishing point, sidewalks either side, then terrain; lane dashes.
    road_half_width is the road's half width at the bottom row; it shrinks linearly to 0 at the horizon."""
    h, w = canvas.label.shape
    rows, cols = np.ogrid[0:h, 0:w]  # (H, 1), (1, W)
    depth = np.clip((rows - horizon) / np.float32(h - horizon), 0, 1)  # (H, 1): 0 at the horizon, 1 at the bottom
    off_centre = np.abs(cols - np.float32(vanishing_x))  # (1, W)
    ground = rows >= horizon
    g, rw = depth, road_half_width
    canvas.recolor(ground & (off_centre > 1.7 * g * rw), TERRAIN, palette["terrain"])
    canvas.recolor(ground & (off_centre <= 1.7 * g * rw) & (off_centre > g * rw), SIDEWALK, palette["sidewalk"])
    canvas.recolor(ground & (off_centre <= g * rw), ROAD, palette["road"])
    dashes = (np.sqrt(depth) * 14).astype(int) % 2 == 0
    canvas.recolor((canvas.label == ROAD) & (off_centre <= 0.5 + 0.012 * depth * w) & dashes, None, palette["lane"])


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
            canvas.box(top, base, x - pw / 2, x + pw / 2, POLE, palette["pole"])
            if rng.random() < 0.5:
                canvas.box(top - s, top + 0.1 * s, x - s / 2, x + s / 2, SIGN, palette["sign"], ellipse=True)
            else:
                canvas.box(top - 1.6 * s, top, x - 0.35 * s, x + 0.35 * s, LIGHT, palette["light_box"])
                lamp = palette["lamp"][rng.integers(2)]
                canvas.box(top - 1.4 * s, top - 0.8 * s, x - 0.25 * s, x + 0.25 * s, LIGHT, lamp, ellipse=True)
        elif kind == "car":
            x, cw = vanishing_x + rng.uniform(-0.7, 0.7) * g * road_half_width, g * w * 0.22 * domain["car_size"]
            ch = 0.55 * cw
            cars = palette["car"]
            canvas.box(base - 0.6 * ch, base - 0.1 * ch, x - cw / 2, x + cw / 2, CAR,
                       cars[rng.integers(len(cars))] * rng.uniform(0.8, 1.1))
            canvas.box(base - ch, base - 0.55 * ch, x - 0.35 * cw, x + 0.35 * cw, CAR, palette["car_body_glass"])
            for wx in (x - 0.3 * cw, x + 0.3 * cw):
                canvas.box(base - 0.25 * ch, base, wx - 0.12 * cw, wx + 0.12 * cw, CAR, palette["wheel"], ellipse=True)
        else:
            x = vanishing_x + side * g * road_half_width * rng.uniform(1.1, 1.6)
            ph = g * (h - horizon) * 0.9 * domain["person_size"] + 4
            pw = 0.3 * ph
            clothes = palette["clothes"]
            canvas.box(base - 0.45 * ph, base, x - 0.4 * pw, x + 0.4 * pw, PERSON, palette["legs"])
            canvas.box(base - 0.82 * ph, base - 0.45 * ph, x - pw / 2, x + pw / 2, PERSON,
                       clothes[rng.integers(len(clothes))])
            canvas.box(base - ph, base - 0.78 * ph, x - 0.3 * pw, x + 0.3 * pw, PERSON, palette["skin"], ellipse=True)


def _textures(canvas: Canvas, domain: dict, palette: dict) -> None:
    """Windows, paving and fence slats; the demo domains differ only in the windows' scale."""
    h, w = canvas.label.shape
    rows, cols = np.ogrid[0:h, 0:w]
    py, px = domain["window"]
    label = canvas.label
    canvas.recolor((label == BUILDING) & (rows % py < py // 2) & (cols % px < px // 2), None, palette["window"])
    pave_x, pave_y = domain.get("paving", (9, 5))
    canvas.recolor((label == SIDEWALK) & ((cols % pave_x == 0) | (rows % pave_y == 0)), None, palette["paving"])
    canvas.recolor((label == FENCE) & (cols % domain.get("slats", 4) == 0), None, palette["slat"])


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


def street_scene(rng: np.random.Generator, h: int, w: int, domain: dict,
                 palette: dict = COLORS) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """One street scene: (H, W, 3) uint8 image, (H, W) uint8 train ids (IGNORE for the ego car) and (H, W) uint8
    segment ids: which painted shape (or texture) owns each pixel, the sky's bands counting as one segment. The
    segments depend on the random draws only, never on the palette's colors or on the class ids."""
    sky_top, sky_low = (np.array(c, np.float32) for c in domain["sky"])
    canvas = Canvas(h, w, list(sky_top + (sky_low - sky_top) * np.linspace(0, 1, SKY_BANDS)[:, None]))
    horizon = int(h * rng.uniform(0.42, 0.55))
    _skyline(rng, canvas, horizon, palette)
    vanishing_x, road_half_width = w * rng.uniform(0.35, 0.65), w * rng.uniform(0.3, 0.45)
    _ground(canvas, horizon, vanishing_x, road_half_width, palette)
    _street_objects(rng, canvas, horizon, vanishing_x, road_half_width, domain, palette)
    _textures(canvas, domain, palette)
    if domain["ego"]:
        canvas.box(0.92 * h, 1.3 * h, -0.1 * w, 1.1 * w, data.IGNORE, palette["ego"], ellipse=True)
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
        raise data.DatasetError(f"--data-root {root} is a file, not a folder; the demo writes its synthetic "
                                f"datasets into a folder. Point --data-root at a new folder (default data/demo).")
    for name in ("gta5", "cityscapes"):
        folder = os.path.join(root, name)
        if os.path.lexists(folder) and not os.path.isfile(os.path.join(folder, MARKER)):
            raise data.DatasetError(
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
        with Pool(min(os.cpu_count() or 1, 8)) as pool:
            pool.map(_write_item, jobs, chunksize=8)
        _check_root(root)  # again: a user may have put a dataset there meanwhile
        for name in ("cityscapes", "gta5"):  # gta5 last: its presence marks a complete demo
            shutil.rmtree(os.path.join(root, name), ignore_errors=True)  # only marked folders reach here
            os.replace(os.path.join(tmp, name), os.path.join(root, name))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def prepare(root: str, sam_weights: str | None) -> None:
    """What train.py --demo needs before it starts: the synthetic domains in root (written once) and, when the run
    uses it, the toy teacher (pretrained once, then cached)."""
    if not _check_root(root):
        print(f"writing the synthetic demo domains to {root} ...", flush=True)
        write_data(root)
    if sam_weights == teacher_path() and not os.path.isfile(sam_weights):
        print(f"pretraining the toy SAM teacher (once, about 70 s on 2 idle cores; cached in {sam_weights}) ...",
              flush=True)
        pretrain_teacher(sam_weights)


# ----------------------------------------------------------------------------------------------------------------
# 4. the toy foundation teacher

TEACHER_VERSION = 1  # bump when the teacher's code changes what it learns: the cache key holds it
TEACHER = dict(
    n_scenes=600, n_held_out=100,  # scenes of the teacher's world, drawn once; training crops and flips them
    steps=500, batch=16, lr=1e-3, weight_decay=0.05, warmup=50,
    points=96,  # 4x4-pixel cells per crop whose pairwise affinities are learned: 96 x 96 pairs
    embed=32,  # width of the throw-away decoder's pixel embeddings
    seed=0,
)


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


def teacher_scene(job: tuple) -> tuple[np.ndarray, np.ndarray]:
    """Scene i of the teacher's world, job = (seed, i): a quarter in the source style, a quarter in the target style
    (the demo's palette), half in a random domain with a random palette; at the size and scale a training crop of
    that style comes from. -> (h, w, 3) uint8 image and (h, w) uint8 segment ids, at the pipeline's scale."""
    seed, i = job
    rng = np.random.default_rng([seed, 3, i])  # streams 0-2 are the datasets'
    u = rng.random()
    if u < 0.5:
        style = "source" if u < 0.25 else "target"
        domain, palette = DOMAINS[style], COLORS
    else:
        style, domain, palette = "target" if rng.random() < 0.5 else "source", random_domain(rng), random_palette(rng)
    (w, h), scale = (CONFIG["src_size"], CONFIG["src_scale"]) if style == "source" else (CONFIG["tgt_size"],
                                                                                         CONFIG["tgt_scale"])
    img, _, segments = street_scene(rng, h, w, domain, palette)  # the class ids are dropped here, unseen
    size = data.rescale_size(w, h, scale)
    return data.resize_image(img, size).to(torch.uint8).permute(1, 2, 0).numpy(), data.resize_label(segments, size)


def teacher_batch(scenes: list, gen: torch.Generator, batch: int, crop: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Random crops and flips of random scenes -> normalized images (B, 3, crop, crop), segments (B, crop, crop)."""
    imgs, segs = [], []
    for j in torch.randint(len(scenes), (batch,), generator=gen).tolist():
        img, seg = scenes[j]
        h, w = seg.shape
        y = int(torch.randint(h - crop + 1, (), generator=gen))
        x = int(torch.randint(w - crop + 1, (), generator=gen))
        img, seg = torch.from_numpy(img[y:y + crop, x:x + crop]), torch.from_numpy(seg[y:y + crop, x:x + crop])
        if torch.rand((), generator=gen) < 0.5:
            img, seg = img.flip(1), seg.flip(1)
        imgs.append(img.permute(2, 0, 1).float())
        segs.append(seg.long())
    return data.normalize(torch.stack(imgs)), torch.stack(segs)


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
        img, seg = teacher_batch(scenes, gen, TEACHER["batch"], CONFIG["sam_img_size"])
        cos, same = affinity_pairs(dec(encoder(img)), seg, gen, TEACHER["points"])
        pred = (cos * dec.scale + dec.bias) > 0
        hits += torch.stack([(pred & (same > 0)).sum() / same.sum(), (~pred & (same == 0)).sum() / (same == 0).sum()])
    return (hits / batches).mean().item()


def teacher_encoder(seed: int = TEACHER["seed"]) -> sam_encoder.SamEncoder:
    """The demo's SAM encoder (the same code as the real one, the small preset of CONFIG), randomly initialized."""
    torch.manual_seed(seed)
    return sam_encoder.build_sam_encoder("vit_b", CONFIG["sam_img_size"], **CONFIG["sam"])


def draw_scenes(seed: int, start: int, n: int) -> list:
    with Pool(min(os.cpu_count() or 1, 8)) as pool:
        return pool.map(teacher_scene, [(seed, i) for i in range(start, start + n)], chunksize=16)


def train_teacher(scenes: list, steps: int, freeze_encoder: bool = False, log_every: int = 100,
                  cfg: dict = TEACHER) -> tuple[sam_encoder.SamEncoder, AffinityDecoder, list[float]]:
    """Pretrain encoder and decoder on pixel-pair affinity -> (encoder, decoder, loss per step). With
    freeze_encoder only the decoder learns, on the random encoder: what a random teacher's features allow."""
    encoder, dec = teacher_encoder(cfg["seed"]), AffinityDecoder(cfg["embed"])
    encoder.requires_grad_(not freeze_encoder)
    params = [p for p in list(encoder.parameters()) + list(dec.parameters()) if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=cfg["lr"], weight_decay=cfg["weight_decay"])
    gen = torch.Generator().manual_seed(cfg["seed"])
    losses, t0 = [], time.time()
    for step in range(steps):
        lr = cfg["lr"] * min(1, (step + 1) / cfg["warmup"]) * 0.5 * (1 + math.cos(math.pi * step / steps))
        for g in opt.param_groups:
            g["lr"] = lr
        img, seg = teacher_batch(scenes, gen, cfg["batch"], CONFIG["sam_img_size"])
        cos, same = affinity_pairs(dec(encoder(img)), seg, gen, cfg["points"])
        loss = affinity_loss(cos, same, dec)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(loss.item())
        if log_every and (step + 1) % log_every == 0:
            print(f"teacher step {step + 1}/{steps} loss {np.mean(losses[-log_every:]):.4f} "
                  f"({time.time() - t0:.0f} s)", flush=True)
    return encoder, dec, losses


def save_teacher(encoder: sam_encoder.SamEncoder, path: str) -> None:
    """The encoder alone, in the official SAM layout (image_encoder.*), written atomically: --sam-weights loads it."""
    sd = {f"image_encoder.{k}": v.detach().contiguous() for k, v in encoder.state_dict().items()}
    meta = {"what": "toy SAM teacher of the ssr demo (demo.py teacher)", "config": json.dumps(TEACHER),
            "version": str(TEACHER_VERSION)}
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    data.save_atomic(path, lambda tmp: save_file(sd, tmp, metadata=meta))


def teacher_path(cache_dir: str | None = None) -> str:
    """Where the toy teacher is cached: $SSR_CACHE or ~/.cache/ssr (as the RCS statistics), under a hash of what
    determines it (its config, the model's and the code's version)."""
    cache_dir = cache_dir or os.environ.get("SSR_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "ssr")
    key = json.dumps([TEACHER, CONFIG["sam"], CONFIG["sam_img_size"], TEACHER_VERSION], sort_keys=True)
    return os.path.join(cache_dir, f"toy_teacher_{hashlib.sha1(key.encode()).hexdigest()[:16]}.safetensors")


def pretrain_teacher(path: str, probe_random: bool = False) -> None:
    """Draw the teacher's world, pretrain, report the held-out pretext accuracy, save the encoder to path."""
    t0 = time.time()
    cfg = TEACHER
    scenes = draw_scenes(cfg["seed"], 0, cfg["n_scenes"])
    held_out = draw_scenes(cfg["seed"], cfg["n_scenes"], cfg["n_held_out"])
    print(f"drew {len(scenes)} + {len(held_out)} scenes in {time.time() - t0:.0f} s", flush=True)
    encoder, dec, losses = train_teacher(scenes, cfg["steps"], freeze_encoder=probe_random)
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
    size, c = data.rescale_size(w, h, scale), CONFIG["sam_img_size"]
    y0, x0 = (size[1] - c) // 2, (size[0] - c) // 2
    imgs, lbls = [], []
    for i in range(n):
        img, lbl, _ = street_scene(np.random.default_rng([seed, 5, i]), h, w, DOMAINS[style])
        imgs.append(data.resize_image(img, size)[:, y0:y0 + c, x0:x0 + c])
        lbls.append(data.resize_label(lbl, size)[y0:y0 + c, x0:x0 + c])
    return data.normalize(torch.stack(imgs)), np.stack(lbls)


@torch.no_grad()
def _cells(encoder, imgs: torch.Tensor, lbls: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
    """Tokens upsampled to 4x4-pixel cells, and the train id at each cell's centre; ignored cells dropped."""
    feats = encoder(imgs)  # (N, 256, g, g)
    x = F.interpolate(feats, scale_factor=4, mode="bilinear", align_corners=False)  # (N, 256, 4g, 4g)
    x = x.permute(0, 2, 3, 1).reshape(-1, feats.shape[1])
    y = torch.from_numpy(lbls[:, 2::4, 2::4].astype(np.int64)).reshape(-1)
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
}
TITLES = {"source-only": "source only", "dacs": "dacs", "ssr-random": "ssr, random teacher",
          "ssr-toy": "ssr, toy teacher"}


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
    """Train one setting with train.py (skipped when out holds its result already) -> dict(miou, iou, seconds)."""
    result_path = os.path.join(out, "study_result.json")
    if os.path.isfile(result_path):
        with open(result_path) as f:
            return json.load(f)
    cmd = [sys.executable, os.path.join(os.path.dirname(os.path.abspath(__file__)), "train.py"), "--demo",
           *SETTINGS[setting], "--seed", str(seed), "--iters", str(iters), "--out", out, "--data-root", data_root,
           "--eval-every", "0", "--save-every", str(iters)]
    if amp:
        cmd += ["--amp", amp]
    t0 = time.time()
    run = subprocess.run(cmd, capture_output=True, text=True)  # inherits OMP_WAIT_POLICY (top of this file)
    if run.returncode:
        sys.exit(f"error: {' '.join(cmd)} failed:\n{run.stderr[-3000:]}")
    result = dict(parse_final_table(run.stdout), seconds=time.time() - t0)
    with open(result_path, "w") as f:
        json.dump(result, f)
    return result


def _mean_sd(xs: list[float]) -> tuple[float, float]:
    return float(np.mean(xs)), float(np.std(xs, ddof=1)) if len(xs) > 1 else 0.0


def study_markdown(results: dict, seeds: list[int], note: str = "") -> str:
    """results[setting][seed] = dict(miou, iou) -> the study's markdown: target mIoU per seed, mean, spread,
    difference to dacs, and the per-class IoU of the best setting against dacs (means over seeds)."""
    names = list(results)
    rows = ["| seed | " + " | ".join(TITLES.get(n, n) for n in names) + " |", "|---" * (len(names) + 1) + "|"]
    rows += [f"| {s} | " + " | ".join(f"{results[n][s]['miou']:.2f}" for n in names) + " |" for s in seeds]
    stats = {n: _mean_sd([results[n][s]["miou"] for s in seeds]) for n in names}
    rows.append("| mean | " + " | ".join(f"**{stats[n][0]:.2f}**" for n in names) + " |")
    rows.append("| spread (sd) | " + " | ".join(f"{stats[n][1]:.2f}" for n in names) + " |")
    lines = [note, "", "Target mIoU (%) on the demo's Cityscapes-like val set:", ""] if note else [
        "Target mIoU (%) on the demo's Cityscapes-like val set:", ""]
    if "dacs" in results:
        diffs = {n: _mean_sd([results[n][s]["miou"] - results["dacs"][s]["miou"] for s in seeds]) for n in names}
        rows.append("| minus dacs, same seed (mean ± sd) | " + " | ".join(
            "-" if n == "dacs" else f"{diffs[n][0]:+.2f} ± {diffs[n][1]:.2f}" for n in names) + " |")
    lines += rows
    best = max(names, key=lambda n: stats[n][0])
    if "dacs" in results and best != "dacs":
        with warnings.catch_warnings():  # a class absent from the val labels and every prediction is NaN throughout
            warnings.simplefilter("ignore", RuntimeWarning)
            per_class = {n: np.nanmean([results[n][s]["iou"] for s in seeds], axis=0) for n in ("dacs", best)}
        lines += ["", f"Per-class IoU (%), mean over seeds: the best setting ({TITLES.get(best, best)}) against dacs:",
                  "", f"| class | dacs | {TITLES.get(best, best)} | difference |", "|---|---|---|---|"]
        for c, name in enumerate(data.CLASSES):
            a, b = per_class["dacs"][c], per_class[best][c]
            if not (math.isnan(a) and math.isnan(b)):
                lines.append(f"| {name} | {a:.2f} | {b:.2f} | {b - a:+.2f} |")
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


def study(seeds: list[int], iters: int, out: str, data_root: str, settings: list[str], amp: str | None) -> str:
    """Run every setting for every seed (sequentially: each run uses all cores), write out/study.md and
    out/study.png, and return the markdown."""
    prepare(data_root, teacher_path() if "ssr-toy" in settings else None)  # once, before the timed runs
    results, t0 = {n: {} for n in settings}, time.time()
    for seed in seeds:
        for n in settings:
            r = run_setting(n, seed, iters, os.path.join(out, f"{n}_seed{seed}"), data_root, amp)
            results[n][seed] = r
            print(f"{n} seed {seed}: target mIoU {r['miou']:.2f} ({r['seconds']:.0f} s)", flush=True)
    note = (f"{len(seeds)} seeds, {iters} iterations, {amp or 'fp32'}; `python demo.py study --seeds {len(seeds)} "
            f"--iters {iters}" + (f" --amp {amp}" if amp else "") + (
                f" --settings {','.join(settings)}" if settings != list(SETTINGS) else "") + "`")
    md = study_markdown(results, seeds, note)
    with open(os.path.join(out, "study.md"), "w") as f:
        f.write(md)
    study_chart(results, seeds, os.path.join(out, "study.png"))
    print(md + f"\nwrote {os.path.join(out, 'study.md')} and study.png; {time.time() - t0:.0f} s", flush=True)
    return md


# ----------------------------------------------------------------------------------------------------------------
# command line

def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    t = sub.add_parser("teacher", help="pretrain the toy SAM teacher (train.py --demo does it on first use)")
    t.add_argument("--out", help=f"safetensors file to write (default: the cache, {teacher_path()})")
    t.add_argument("--probe-random", action="store_true",
                   help="train only the pretext decoder on the frozen random encoder and report its accuracy (a "
                        "baseline for the teacher's); writes nothing")
    pr = sub.add_parser("probe", help="linear probe of a teacher's frozen features: fit on source, score on target")
    pr.add_argument("--weights", default=None, help="SAM weights to probe, or 'none' (default: the toy teacher)")
    s = sub.add_parser("study", help="train source-only, dacs, ssr (random teacher), ssr (toy teacher) per seed")
    s.add_argument("--seeds", type=int, default=3, help="seeds 0 .. N-1")
    s.add_argument("--iters", type=int, default=FLAGS["iters"], help="training iterations per run")
    s.add_argument("--out", default="runs/study", help="folder for the runs, study.md and study.png")
    s.add_argument("--data-root", default=FLAGS["data_root"], help="the demo data (written there if absent)")
    s.add_argument("--settings", default=",".join(SETTINGS), help=f"comma-separated among {', '.join(SETTINGS)}")
    s.add_argument("--amp", choices=["bf16", "fp16", "fp32"],
                   help="train.py --amp for every run (default: train.py's, fp32 on a CPU)")
    args = p.parse_args()
    try:
        if args.cmd == "teacher":
            pretrain_teacher(args.out or teacher_path(), probe_random=args.probe_random)
            if not args.probe_random:
                print(f"wrote {args.out or teacher_path()}")
            return
        if args.cmd == "probe":
            weights = args.weights or teacher_path()
            encoder = teacher_encoder()
            if weights != "none":
                sam_encoder.load_weights(encoder, weights)
            r = transfer_probe(encoder)
            print(f"{weights}: linear probe of the 19 classes on frozen tokens, fit on the source domain: "
                  f"mIoU {r['source']:.1f} on held-out source crops, {r['target']:.1f} on target crops")
            return
        settings = [x for x in args.settings.split(",") if x]
        if not settings or any(x not in SETTINGS for x in settings):
            sys.exit(f"error: --settings {args.settings!r}: choose among {', '.join(SETTINGS)}, comma-separated.")
        if args.seeds <= 0 or args.iters <= 0:
            sys.exit("error: --seeds and --iters must be positive.")
        os.makedirs(args.out, exist_ok=True)
        study(list(range(args.seeds)), args.iters, args.out, args.data_root, settings, args.amp)
    except (data.DatasetError, mit.WeightsError) as e:
        sys.exit(f"error: {e}")


if __name__ == "__main__":
    main()
