"""Predictions without labels: a segmentor's inference at an image's own size (eval.py's evaluation and
submissions use it too), and eval.py --images, a prediction for every photo under any folder.

    python eval.py --ckpt model.safetensors --images photos/ --save-dir preds                  # your own images
    python eval.py --ckpt model.safetensors --images photos/ --save-dir preds --side-by-side   # with a legend

The inference is mmseg's: the whole image at once, or crop x crop windows whose logits are averaged where they
overlap; the head's 1/4-resolution logits are resized bilinearly to the input. A photo is read as the val protocol
reads an image (resized to the test scale keeping its ratio, EXIF rotation applied) and predicted at its own size.
No file of the user's is replaced: the outputs are checked before anything is written (check_outputs), and each
carries a mark (OWN_MARK, also on eval.py's labelled --save-dir predictions) by which a later run knows its own.

Read top to bottom: 1. the inference; 2. the photos under a folder; 3. their predictions, written aside and renamed.
"""
import collections
import dataclasses
import errno
import os
import stat
import sys
from contextlib import nullcontext
from typing import Callable

import torch
import torch.nn.functional as F
from PIL import Image, ImageOps, PngImagePlugin, features
from torch import Tensor
from torch.utils.data import DataLoader, Dataset

import data
import files
import pictures
import ssr

# ----------------------------------------------------------------------------------------------------------------
# 1. the inference, shared with eval.py's evaluation and submissions


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
# 2. the photos under a folder (no labels)

# the photo formats read: Pillow reads each of them itself, and WebP where it was built with libwebp
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff") + ((".webp",) if features.check("webp") else ())
# PNG text chunk in every file predict_images writes: a later run replaces a file at an output path only when it
# carries this (check_outputs), so never a picture of the user's, while its own earlier predictions are replaced
OWN_MARK = ("Software", "ssr eval.py --save-dir")
FILE_KINDS = ((stat.S_ISFIFO, "a FIFO"), (stat.S_ISSOCK, "a socket"), (stat.S_ISCHR, "a character device"),
              (stat.S_ISBLK, "a block device"))


@dataclasses.dataclass
class Listing:
    """What list_images found under an --images folder."""
    paths: list[str]  # the photos, sorted, relative to the folder
    folders: dict[str, str]  # every folder read, real path -> path relative to the folder ('.' first)
    left_out: list[str]  # one line per kind of entry not read, naming them


def _names(entries: list[str], most: int = 5) -> str:
    return ", ".join(entries[:most]) + (f" and {len(entries) - most} more" if len(entries) > most else "")


def list_images(folder: str) -> Listing:
    """The photos under folder: regular files with a suffix of IMAGE_SUFFIXES (any case), in its subfolders too.

    A symlinked subfolder is followed, once per real folder: one that leads to a folder read already (a loop, or
    a second way to the same photos) or to a folder inside this one (read under its own path) is left out. Folders
    are read before the symlinks beside them, so a photo keeps its real path where it has one. A FIFO, socket or
    device named like a photo is left out, as reading it could wait forever; so is what cannot be listed."""
    if not os.path.isdir(folder):
        raise files.DatasetError(f"--images {folder} is not a folder; pass the folder that holds your images.")
    root = os.path.realpath(folder)
    found, folders, others, odd = [], {root: "."}, [], []

    def unlisted(e: OSError) -> None:
        odd.append(f"{os.path.relpath(e.filename, folder)} ({e.strerror})")

    for d, subdirs, names in os.walk(folder, onerror=unlisted, followlinks=True):
        keep = []
        for s in sorted(subdirs, key=lambda s: (os.path.islink(os.path.join(d, s)), s)):
            path = os.path.join(d, s)
            real, rel = os.path.realpath(path), os.path.relpath(path, folder)
            if real in folders or (os.path.islink(path) and os.path.commonpath([real, root]) == root):
                where = folders.get(real, os.path.relpath(real, root))
                link = "a symlink to " if os.path.islink(path) else ""
                odd.append(f"{rel} ({link}the folder {where}, whose photos are read there)")
            else:
                folders[real] = rel
                keep.append(s)
        subdirs[:] = keep  # os.walk descends into these only
        for name in names:
            path = os.path.join(d, name)
            rel = os.path.relpath(path, folder)
            if not name.lower().endswith(IMAGE_SUFFIXES):
                others.append(rel)
                continue
            try:
                mode = os.stat(path).st_mode
            except OSError as e:
                odd.append(f"{rel} ({'a symlink to nothing' if os.path.islink(path) else e.strerror})")
                continue
            if stat.S_ISREG(mode):
                found.append(rel)
            else:
                odd.append(f"{rel} ({next((k for is_kind, k in FILE_KINDS if is_kind(mode)), 'not a file')}, "
                           f"not a regular file)")
    left_out = []
    if others:
        left_out.append(f"left out {len(others)} file(s) that are not images ({'/'.join(IMAGE_SUFFIXES)}): "
                        f"{_names(sorted(others))}")
    if odd:
        left_out.append(f"left out {len(odd)} more, not read as photos: {'; '.join(sorted(odd))}")
    if not found:
        raise files.DatasetError(f"--images {folder} holds no {'/'.join(IMAGE_SUFFIXES)} files (subfolders "
                                 f"included){''.join('; ' + line for line in left_out)}. Pass the folder that holds "
                                 f"your images.")
    return Listing(sorted(found), folders, left_out)


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
                rgb = data.rgb_pixels(ImageOps.exif_transpose(im), path)  # as viewers show it: EXIF rotation
            h, w = rgb.shape[:2]
            # mmcv's rescale_size rounds the thin side of a 1x3000 photo to 0 px at 1024x512 (3000x1 likewise);
            # 1 px keeps it, and resized_logits pads a side under MIN_SIDE for the network
            size = tuple(max(side, 1) for side in data.rescale_size(w, h, self.scale))
            img = data.resize_image(rgb, size)
        except files.UserError as e:  # a pixel mode or value range rgb_pixels refuses, saying why
            return {"path": path, "error": str(e).removeprefix(f"{path}: ")}
        except (OSError, SyntaxError, ValueError, Image.DecompressionBombError, MemoryError, RuntimeError) as e:
            return {"path": path, "error": f"{type(e).__name__}: {e}"}  # RuntimeError: torch out of memory
        return {"img": data.normalize(img), "size": (w, h), "path": path}


def own_output(path: str, mark: tuple[str, str] = OWN_MARK) -> bool:
    """Whether path is a PNG that eval.py wrote into --save-dir (it carries OWN_MARK; write_submission's carry
    SUBMIT_MARK). False for any other file, a folder, a dangling symlink, a FIFO (which is never opened: that could
    wait forever) and anything unreadable."""
    try:
        if not stat.S_ISREG(os.stat(path).st_mode):
            return False
        with Image.open(path) as im:
            return im.format == "PNG" and im.info.get(mark[0]) == mark[1]
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError):
        return False


# ----------------------------------------------------------------------------------------------------------------
# 3. their predictions: checked before anything is written, each file written aside and renamed


def check_outputs(images: str, save_dir: str, with_legend: bool) -> None:
    """Fail, before anything is written, where a prediction of --images could replace a file eval.py did not write.

    The two folders must be disjoint: neither the same folder nor one inside the other, after realpath (symlinks
    included). That is what "the outputs can never collide with the photos" means here. Photos are read from
    anywhere under --images and predictions written anywhere under --save-dir, so where one folder holds the other
    some layout of files puts a prediction on a photo: photos/street.png on itself; photos/preds/a.png, a photo,
    as the prediction of photos/a.png; or, in the next run, which reads the last run's predictions as photos. A
    nesting that happens to be safe for today's files is refused too, so that the rule stays one sentence. The
    folders that symlinks under --images lead to are read too, so the rule holds for each of them as well.
    Disjoint folders are always fine, with two checks per output path (side_by_side/ ones included): a symlink must
    not make it one of the photos, and a file already there must be one that predict_images wrote (OWN_MARK), so
    that a re-run replaces its own predictions and nothing else."""
    listing, out = list_images(images), os.path.realpath(save_dir)
    for real, rel in listing.folders.items():  # the --images folder, then each one read through a symlink
        common = os.path.commonpath([real, out])
        if common not in (real, out):
            continue
        how = "is" if real == out else "is inside" if common == real else "holds"
        hazard = "a prediction could replace one of your photos, or be read as one by the next run"
        if rel != ".":
            raise files.FlagError(f"--save-dir {save_dir} {how} {real}, the folder that the symlink "
                                  f"{os.path.join(images, rel)} leads to, whose photos are read too: {hazard}; pass "
                                  f"a --save-dir outside it, or remove the symlink.")
        resolved = (out, real) != (os.path.abspath(save_dir), os.path.abspath(images))
        raise files.FlagError(f"--save-dir {save_dir} {how} the --images folder {images}"
                              + (f" ({out} and {real} with symlinks followed)" if resolved else "")
                              + f": {hazard}; pass a --save-dir that is neither inside the --images folder nor "
                                f"holds it, e.g. a new folder next to it.")
    paths = listing.paths
    photos = {os.path.realpath(os.path.join(images, p)): p for p in paths}
    out_dirs = [save_dir, os.path.join(save_dir, "side_by_side")] if with_legend else [save_dir]
    outputs = [os.path.join(d, name) for name in output_names(paths) for d in out_dirs]
    for path in outputs:
        if os.path.realpath(path) in photos:
            raise files.FlagError(f"--save-dir: the output {path} is the photo "
                                  f"{os.path.join(images, photos[os.path.realpath(path)])} through a symlink, and "
                                  f"its prediction would replace it; remove the symlink or pass another --save-dir.")
    check_replaceable(outputs)


def check_replaceable(outputs: list[str]) -> None:
    """Fail where one of the output paths exists and is not a prediction that eval.py wrote into --save-dir (it
    lacks OWN_MARK): a rerun replaces its own predictions, and nothing else."""
    for path in outputs:
        if os.path.lexists(path) and not own_output(path):
            raise files.FlagError(f"--save-dir: {path} exists and is not a prediction that eval.py wrote, so it is "
                                  f"not replaced; move it away or pass another --save-dir.")


class Stopped(KeyboardInterrupt):
    """A Ctrl-C (or SIGTERM) while predict_images wrote; its message says what is written."""


def predict_images(model: ssr.Segmentor, folder: str, save_dir: str, *, device, scale, amp_dtype=None,
                   mode: str = "whole", crop: int = 512, stride: int = 341, with_legend: bool = False,
                   workers: int = 0) -> tuple[int, list[str], list[str]]:
    """Write save_dir/<relative path>.png, a Cityscapes-palette prediction at each image's own size, for every
    photo under folder (list_images), and save_dir/side_by_side/... image | prediction above a legend with
    with_legend.

    Inference as the val protocol: resize to `scale` keeping the ratio, logits resized bilinearly back to the
    image's size, argmax. Returns (images written, messages for the files skipped because they cannot be read or
    predicted, list_images' lines on what it left out). eval.py's main() holds save_dir for the run
    (files.claim_folder) and runs check_outputs first, so that no file of the user's is replaced. Each file is
    written aside and renamed (files.save_atomic), so a stop at any moment leaves the earlier file or the new one,
    never half of one. A stop raises Stopped and a file that cannot be written a files.UserError, each saying how
    many predictions are written."""
    listing = list_images(folder)
    paths, names = listing.paths, output_names(listing.paths)
    loader = DataLoader(UserImages(folder, paths, scale), batch_size=None, num_workers=workers,
                        generator=torch.Generator())  # images differ in size: one at a time
    device, written, skipped = torch.device(device), 0, []
    mark = PngImagePlugin.PngInfo()
    mark.add_text(*OWN_MARK)
    model.eval()
    try:
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
                        # of a huge photo at full size, a size a kernel refuses) costs that photo, not the ones
                        # after it; a bug fails every photo alike and shows in main's error
                        error = f"{type(e).__name__} predicting it at {w}x{h} px: {(str(e).splitlines() or [''])[0]}"
                if error is not None:
                    skipped.append(f"{item['path']} ({error})")
                    print(f"skipped {skipped[-1]}", file=sys.stderr, flush=True)
                else:
                    outputs = [(os.path.join(save_dir, name), pictures.colorize(pred))]
                    if with_legend:
                        outputs.append((os.path.join(save_dir, "side_by_side", name),
                                        pictures.compose_with_legend(item["img"], pred)))
                    for out, picture in outputs:
                        try:
                            os.makedirs(os.path.dirname(out), exist_ok=True)
                            files.save_atomic(out, lambda tmp: picture.save(tmp, format="PNG", pnginfo=mark))
                        except (files.DiskFull, OSError) as e:
                            full = isinstance(e, files.DiskFull) or e.errno in (errno.ENOSPC, errno.EDQUOT)
                            raise (files.DiskFull if full else files.FlagError)(
                                (f"the disk that holds --save-dir {save_dir} is full" if full else
                                 f"--save-dir: cannot write {out} ({e.strerror or e})")
                                + f": {written} of {len(paths)} predictions are written there, each one whole, and "
                                f"{out} is not (the earlier file there, if any, is untouched). "
                                + ("Free some space there" if full else "Make that folder writable")
                                + ", then run the same command again: it replaces its own predictions.") from None
                    written += 1
                if (k + 1) * 10 // len(paths) > k * 10 // len(paths):  # crossed a tenth
                    print(f"{k + 1}/{len(paths)} images", file=sys.stderr, flush=True)
    except KeyboardInterrupt:
        raise Stopped(f"{written} of {len(paths)} predictions are written to {save_dir}, each one whole; the same "
                      f"command again writes them all.") from None
    return written, skipped, listing.left_out


def print_predictions(model: ssr.Segmentor, folder: str, save_dir: str, **options) -> None:
    """predict_images (with `options`: device, scale, amp_dtype, mode, with_legend, workers), then how many it wrote,
    the photos it skipped and what list_images left out; a files.DatasetError where not one could be predicted."""
    written, skipped, left_out = predict_images(model, folder, save_dir, **options)
    if not written:
        raise files.DatasetError(f"none of the images under {folder} could be read and predicted: "
                                 f"{'; '.join(skipped + left_out)}")
    print(f"wrote {written} predictions to {save_dir}"
          + (f"; skipped {len(skipped)}: {'; '.join(skipped)}" if skipped else ""))
    for line in left_out:
        print(line)
