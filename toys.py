"""The demo's two toy pretrainings (toys: small stand-ins for ImageNet and SAM): the student's MiT on a toy
ImageNet, the teacher's SAM encoder on a toy SAM task, each in its own world of demo.py's painter, and a linear
probe of the teacher.

    python toys.py pretrain          # the student's toy ImageNet pretraining (train.py --demo does it on first use)
    python toys.py teacher           # the toy SAM teacher (likewise)
    python toys.py probe             # linear probe of the teacher's frozen tokens: source vs target

As DAFormer's, the student starts from an ImageNet: `pretrain` trains the demo's MiT on scenes in random domains
(never the two demo styles) with an image-level task, which of 23 part kinds an object-centred crop shows
(IMAGENET: 800 scenes, 500 steps of 16 crops). It is the feature distance's ImageNet copy too. As SAM, the teacher
saw every kind of image and no class: `teacher` trains the demo's SAM encoder on pixel-pair affinity (same painted
shape or not) over random and demo-styled domains (TEACHER: 600 scenes, 400 steps of 12). It sees the crop
upsampled 2x, as SAM sees a 512 crop at 1024: a 12x12 token grid, the student's stage-2 grid. Each network is
pretrained once and cached under a key of everything that determines it (cache_path).

Read top to bottom: 1. the two worlds and the toy ImageNet; 2. the toy SAM; 3. the probe; 4. what train.py --demo
needs before it starts (prepare: the datasets and both networks, each made once).
"""
import argparse
import hashlib
import json
import math
import os
import sys
import time

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

import data
import demo
import files
import mit
import processes
import sam_encoder
import weights

# ----------------------------------------------------------------------------------------------------------------
# 1. the two worlds, and the toy ImageNet (the student's starting point)
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

IMAGENET_VERSION = 1  # bump when the code changes what it learns: the cache key holds it
IMAGENET = dict(n_scenes=800, n_held_out=100, steps=500, batch=16, lr=1e-3, weight_decay=0.05, warmup=40,
                zoom=(0.25, 1.0),  # object_crops' squares: 24 to 96 px of a scene, resized to the 96 crop
                min_fraction=0.02,  # a part is present from 2% of the square (a wheel or a lamp close up)
                seed=0)
TEACHER_VERSION = 2
TEACHER = dict(n_scenes=600, n_held_out=100,  # scenes of the teacher's world, drawn once; training crops them
               steps=400, batch=12, lr=1e-3, weight_decay=0.05, warmup=40,
               points=96,  # 4x4-pixel cells of SAM's input per crop whose pairwise affinities are learned
               embed=32,  # width of the throw-away decoder's pixel embeddings
               seed=0)


def random_palette(rng: np.random.Generator) -> dict:
    """Every color of demo.COLORS redrawn uniformly: cars, roads, skins and skies of any color."""
    return {k: rng.uniform(0, 255, np.shape(v)).astype(np.float32) for k, v in demo.COLORS.items()}


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
    source style, a quarter in the target style, half in a random domain with a random palette. -> (h, w, 3) uint8
    image, (h, w) uint8 segment ids and (h, w) uint8 part kinds (indices into demo.KINDS), at the pipeline's scale.
    The class ids are never returned."""
    seed, world, i = job
    rng = np.random.default_rng([seed, 3 if world == "teacher" else 4, i])  # streams 0-2 are demo.write_data's
    u = rng.random() if world == "teacher" else 1.0
    if u < 0.5:
        style = "source" if u < 0.25 else "target"
        domain, palette = demo.DOMAINS[style], demo.COLORS
    else:
        style, domain = "target" if rng.random() < 0.5 else "source", random_domain(rng)
        palette = random_palette(rng) if world == "teacher" else demo.COLORS
    (w, h), scale = ((demo.CONFIG["src_size"], demo.CONFIG["src_scale"]) if style == "source"
                     else (demo.CONFIG["tgt_size"], demo.CONFIG["tgt_scale"]))
    canvas = demo.paint_scene(rng, h, w, domain, palette)
    img = demo.camera(rng, canvas, domain)
    segments = np.where(canvas.paint < demo.SKY_BANDS, 0, canvas.paint).astype(np.uint8)
    kinds = np.array([demo.KINDS.index(k) for k in canvas.kinds], np.uint8)[canvas.paint]
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
    part-presence targets (B, len(demo.KINDS)): the parts that cover at least min_fraction of the square."""
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
        targets.append((F.one_hot(part, len(demo.KINDS)).float().mean(0) >= min_fraction).float())
    return data.normalize(torch.stack(imgs)), torch.stack(targets)


class PresenceHead(nn.Module):
    """The toy ImageNet's classifier, thrown away after pretraining: the mean of the last stage's tokens, then a
    linear layer, as MiT's ImageNet head (NVlabs' `head`)."""

    def __init__(self, dim: int):
        super().__init__()
        self.head = nn.Linear(dim, len(demo.KINDS))

    def forward(self, feats: list[torch.Tensor]) -> torch.Tensor:  # MiT's 4 maps -> (B, K) logits
        return self.head(feats[-1].mean(dim=(2, 3)))


def demo_mit(seed: int = IMAGENET["seed"]) -> mit.MixVisionTransformer:
    """The demo's MiT (the preset and overrides train.py --demo builds), randomly initialized."""
    torch.manual_seed(seed)
    return mit.build_mit(demo.FLAGS["backbone"], **demo.CONFIG["mit"])


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
        img, target = object_crops(scenes, gen, cfg["batch"], demo.CONFIG["crop"], cfg["zoom"], cfg["min_fraction"])
        return F.binary_cross_entropy_with_logits(head(encoder(img)), target)

    losses = fit([*encoder.parameters(), *head.parameters()], steps, cfg, "toy ImageNet", step_loss, log_every)
    return encoder, head, losses


@torch.no_grad()
def presence_auc(encoder, head: PresenceHead, scenes: list, n: int = 256) -> float:
    """The mean over part kinds of the ROC AUC of the presence logits on fixed crops of the given scenes: the
    chance that a crop with the part scores above one without it (0.5 is chance)."""
    img, target = object_crops(scenes, torch.Generator().manual_seed(1), n, demo.CONFIG["crop"], IMAGENET["zoom"],
                               IMAGENET["min_fraction"])
    logits, aucs = head(encoder(img)), []
    for k in range(len(demo.KINDS)):
        pos, neg = logits[target[:, k] > 0, k], logits[target[:, k] == 0, k]
        if len(pos) and len(neg):
            aucs.append((pos[:, None] > neg[None, :]).float().mean().item())
    return float(np.mean(aucs))


def pretrain_imagenet(path: str) -> None:
    """Draw the toy ImageNet, pretrain, report the held-out accuracy, save the encoder to path in the NVlabs MiT
    layout, which --pretrained loads (the classifier is dropped, as weights.load_mit drops NVlabs' head)."""
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
    meta = {"what": "the ssr demo's MiT pretrained on its toy ImageNet (toys.py pretrain)",
            "config": json.dumps(IMAGENET), "version": str(IMAGENET_VERSION)}
    save_network({k: v.detach().contiguous() for k, v in encoder.state_dict().items()}, path, meta)


# ----------------------------------------------------------------------------------------------------------------
# 2. the toy SAM (the teacher): pixel-pair affinity in a world of every style and color


def sam_view(img: torch.Tensor, seg: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Crops (B, 3, c, c) and segments (B, c, c) as the teacher sees them in training: resized to sam_img_size
    (UDA.sam_tokens: bilinear), the segments by repetition."""
    s = demo.CONFIG["sam_img_size"]
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
        img, seg = sam_view(*random_crops(scenes, gen, TEACHER["batch"], demo.CONFIG["crop"])[:2])
        cos, same = affinity_pairs(dec(encoder(img)), seg, gen, TEACHER["points"])
        pred = (cos * dec.scale + dec.bias) > 0
        hits += torch.stack([(pred & (same > 0)).sum() / same.sum(), (~pred & (same == 0)).sum() / (same == 0).sum()])
    return (hits / batches).mean().item()


def teacher_encoder(seed: int = TEACHER["seed"]) -> sam_encoder.SamEncoder:
    """The demo's SAM encoder (the same code as the real one, the small preset of demo.CONFIG), randomly initialized."""
    torch.manual_seed(seed)
    return sam_encoder.build_sam_encoder("vit_b", demo.CONFIG["sam_img_size"], **demo.CONFIG["sam"])


def train_teacher(scenes: list, steps: int, freeze_encoder: bool = False, log_every: int = 100,
                  cfg: dict = TEACHER) -> tuple[sam_encoder.SamEncoder, AffinityDecoder, list[float]]:
    """Pretrain encoder and decoder on pixel-pair affinity -> (encoder, decoder, loss per step). With
    freeze_encoder only the decoder learns, on the random encoder: what a random teacher's features allow."""
    encoder, dec = teacher_encoder(cfg["seed"]), AffinityDecoder(cfg["embed"])
    encoder.requires_grad_(not freeze_encoder)
    params = [p for p in list(encoder.parameters()) + list(dec.parameters()) if p.requires_grad]

    def step_loss(gen):
        img, seg = sam_view(*random_crops(scenes, gen, cfg["batch"], demo.CONFIG["crop"])[:2])
        cos, same = affinity_pairs(dec(encoder(img)), seg, gen, cfg["points"])
        return affinity_loss(cos, same, dec)

    losses = fit(params, steps, cfg, "teacher", step_loss, log_every)
    return encoder, dec, losses


def save_teacher(encoder: sam_encoder.SamEncoder, path: str) -> None:
    """The encoder alone, in the official SAM layout (image_encoder.*), written atomically: --sam-weights loads it."""
    sd = {f"image_encoder.{k}": v.detach().contiguous() for k, v in encoder.state_dict().items()}
    meta = {"what": "toy SAM teacher of the ssr demo (toys.py teacher)", "config": json.dumps(TEACHER),
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


# ----------------------------------------------------------------------------------------------------------------
# 3. the probe: what the frozen teacher knows of the classes, on either domain


def _probe_crops(style: str, n: int, seed: int) -> tuple[torch.Tensor, np.ndarray]:
    """n centre crops of scenes of a demo domain -> normalized images (n, 3, crop, crop), train ids (n, crop, crop)."""
    (w, h), scale = ((demo.CONFIG["src_size"], demo.CONFIG["src_scale"]) if style == "source"
                     else (demo.CONFIG["tgt_size"], demo.CONFIG["tgt_scale"]))
    size, c = data.rescale_size(w, h, scale), demo.CONFIG["crop"]
    y0, x0 = (size[1] - c) // 2, (size[0] - c) // 2
    imgs, lbls = [], []
    for i in range(n):
        img, lbl, _ = demo.street_scene(np.random.default_rng([seed, 5, i]), h, w, demo.DOMAINS[style])
        imgs.append(data.resize_image(img, size)[:, y0:y0 + c, x0:x0 + c])
        lbls.append(data.resize_label(lbl, size)[y0:y0 + c, x0:x0 + c])
    return data.normalize(torch.stack(imgs)), np.stack(lbls)


@torch.no_grad()
def _cells(encoder, imgs: torch.Tensor, lbls: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
    """Tokens upsampled 4x to cells, and the train id at each cell's centre; ignored cells dropped."""
    s = demo.CONFIG["sam_img_size"]
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
# 4. the cache, and what train.py --demo needs before it starts

def cache_path(name: str, *what) -> str:
    """A pretrained network's place in the cache (files.cache_folder()), under a hash of what determines it."""
    key = json.dumps(what, sort_keys=True)
    return os.path.join(files.cache_folder(), f"{name}_{hashlib.sha1(key.encode()).hexdigest()[:16]}.safetensors")


def imagenet_path() -> str:
    return cache_path("toy_imagenet_mit", IMAGENET, demo.world_key(), demo.FLAGS["backbone"], IMAGENET_VERSION)


def teacher_path() -> str:
    return cache_path("toy_teacher", TEACHER, demo.world_key(), TEACHER_VERSION)


def demo_weights(method: str, pretrained: str | None, sam_weights: str | None) -> tuple[str, str | None]:
    """train.py --demo's --pretrained and --sam-weights where they are not given: the toy ImageNet encoder and, for
    --method ssr, the toy teacher (prepare makes them on first use); 'none' stays a random network."""
    return pretrained or imagenet_path(), teacher_path() if method == "ssr" and sam_weights is None else sam_weights


def readable(path: str) -> bool:
    """A cached network that can be used: present and a whole safetensors file (a cut-short or empty one is made
    again, not trusted)."""
    try:
        with safe_open(path, "pt") as f:
            return len(list(f.keys())) > 0
    except (OSError, SafetensorError):
        return False


def prepare(root: str, sam_weights: str | None = None, pretrained: str | None = None) -> None:
    """What train.py --demo needs before it starts: the synthetic domains in root (written once) and, when the run
    uses them, the toy ImageNet encoder and the toy teacher (each pretrained once, then cached). The cache folder
    is checked first: no minute of pretraining is spent on a result that cannot be kept."""
    to_make = [p for p, cached in ((pretrained, imagenet_path()), (sam_weights, teacher_path()))
               if p == cached and not readable(p)]
    if to_make:
        files.check_cache_folder(os.path.dirname(to_make[0]))
    if not demo.check_root(root):
        print(f"writing the synthetic demo domains to {root} ...", flush=True)
        demo.write_data(root)
    if pretrained == imagenet_path() and not readable(pretrained):
        print(f"pretraining the demo's MiT on the toy ImageNet (once, about a minute on 2 cores; cached in "
              f"{pretrained}) ...", flush=True)
        pretrain_imagenet(pretrained)
    if sam_weights == teacher_path() and not readable(sam_weights):
        print(f"pretraining the toy SAM teacher (once, about a minute on 2 cores; cached in {sam_weights}) ...",
              flush=True)
        pretrain_teacher(sam_weights)


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
    args = p.parse_args()
    processes.stops_interrupt()  # a scheduler's stop and a closed terminal act as Ctrl-C: nothing is left half-made
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
        else:
            path = args.weights or teacher_path()
            encoder = teacher_encoder()
            if path != "none":
                weights.load_sam(encoder, path)
            r = transfer_probe(encoder)
            print(f"{path}: linear probe of the 19 classes on frozen tokens, fit on the source domain: "
                  f"mIoU {r['source']:.1f} on held-out source crops, {r['target']:.1f} on target crops")
    except files.UserError as e:
        sys.exit(f"error: {e}")
    except KeyboardInterrupt:  # one line and the status of a Ctrl-C, as train.py and eval.py
        print("stopped; nothing half-written was left behind", file=sys.stderr)
        sys.exit(130)


if __name__ == "__main__":
    main()
