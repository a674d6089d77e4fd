"""
Evaluate a segmentor on the target validation set in the protocol of mmsegmentation/DAFormer, and write the
test split's predictions for the benchmarks' servers.

    python eval.py --ckpt runs/demo_seed0/model.safetensors                             # table, images/s, mIoU
    python eval.py --ckpt model.safetensors --save-dir preds --side-by-side          # also colored predictions
    python eval.py --ckpt model.safetensors --split test --submit acdc_test          # for the ACDC server
    python eval.py --ckpt model.safetensors --images photos/ --save-dir preds        # your own images, no labels
    python weights.py convert gta2cs_daformer.pth daformer.safetensors               # a released DAFormer/MIC model

The protocol: each image is resized to the target's test scale (1024x512 for Cityscapes, 960x540 for ACDC and Dark
Zurich), the network's logits are resized bilinearly back to the label's full resolution (2048x1024, 1920x1080),
the argmax is compared with the label, and one confusion histogram is accumulated over the whole dataset with
bincount (pixels labelled 255 are ignored); ACDC's conditions are also reported one by one.
IoU per class = intersection / union over the dataset; mIoU = their mean over the classes whose union is non-zero.
There is no per-image averaging: a small image counts as many pixels as it has. A model trained from SYNTHIA is
reported as the papers do: mIoU16 (without terrain, truck and train, which SYNTHIA lacks) and mIoU13 (also without
wall, fence and pole), and its final `mIoU:` line is the 16-class mean.
The network's inference and the --images predictions of any folder live in predict.py.
"""
import argparse
import collections
import glob
import os
import shlex
import sys
import time
from contextlib import nullcontext

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, PngImagePlugin
from torch import Tensor

import checkpoint
import data
import datasets
import demo
import files
import pictures
import predict
import processes
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
# saved predictions


def saved_name(image: str) -> str:
    """The name of an image's prediction file: frankfurt_000000_000019_leftImg8bit.png -> frankfurt_000000_000019.png"""
    return os.path.basename(image).removesuffix(".png").removesuffix("_leftImg8bit") + ".png"


def check_save_dir(save_dir: str, loaders: list, side_by_side: bool) -> None:
    """Fail, before anything is written, where the predictions of the loaders' images could replace a file that
    eval.py did not write (predict.check_replaceable), or where two images would be saved under one name."""
    names = {}
    for image in (s.img for loader in loaders for s in loader.dataset.samples):
        other = names.setdefault(saved_name(image), image)
        if other != image:
            raise files.DatasetError(f"--save-dir: the images {other} and {image} would both be saved as "
                                     f"{saved_name(image)}; evaluate them into separate --save-dir folders (ACDC: one "
                                     f"--acdc-conditions at a time), or without --save-dir.")
    folders = [save_dir] + [os.path.join(save_dir, "side_by_side")] * side_by_side
    predict.check_replaceable([os.path.join(folder, name) for folder in folders for name in names])


def save_predictions(save_dir: str, batch: dict, pred: Tensor, with_side: bool) -> None:
    """save_dir/<saved_name> (palette PNG) for each image, and save_dir/side_by_side/<saved_name> with with_side;
    each written aside and renamed, so a stop leaves whole files, and marked (predict.OWN_MARK), so a rerun knows
    them for its own."""
    preds, labels = pred.cpu().numpy(), batch["lbl"].numpy()
    mark = PngImagePlugin.PngInfo()
    mark.add_text(*predict.OWN_MARK)
    for i, path in enumerate(batch["path"]):
        outputs = [(save_dir, pictures.colorize(preds[i]))]
        if with_side:  # image | ground truth | prediction
            outputs.append((os.path.join(save_dir, "side_by_side"),
                            pictures.side_by_side(batch["img"][i], labels[i], preds[i])))
        for folder, picture in outputs:
            files.save_atomic(os.path.join(folder, saved_name(path)),
                              lambda tmp: picture.save(tmp, format="PNG", pnginfo=mark))


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
                logits = predict.network_logits(model, img, mode, crop, stride)
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


def merge_results(results: list[dict]) -> dict:
    """evaluate()'s results of disjoint image sets (ACDC's conditions) -> the result of all of them: one histogram,
    the sum of theirs, so the mean is over all pixels, as if evaluated at once."""
    hist = sum(r["hist"] for r in results)
    iou, miou = iou_from_confusion(hist)
    images, seconds = sum(r["images"] for r in results), sum(r["images"] / r["images_per_s"] for r in results)
    return dict(iou=iou.tolist(), miou=miou, hist=hist, images=images, images_per_s=images / max(seconds, 1e-9))


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
# the test split: predictions for the benchmarks' servers (their labels are not public)

# in every PNG write_submission writes (as predict.OWN_MARK for --images): a later run replaces only files that carry it
SUBMIT_MARK = ("Software", "ssr eval.py --submit")


def check_submission_folder(folder: str) -> None:
    """Fail, before anything is written, where --submit could replace a file eval.py --submit did not write: the
    folder may hold only the PNGs of an earlier submission (they are replaced, and those of images not predicted
    again removed, so that the folder zips into exactly this run's predictions)."""
    if os.path.exists(folder) and not os.path.isdir(folder):
        raise files.FlagError(f"--submit {folder} is a file; pass a folder (new or empty) for the predictions.")
    for d, _, names in os.walk(folder):
        for name in names:
            path = os.path.join(d, name)
            if os.path.islink(path) or not predict.own_output(path, SUBMIT_MARK):
                raise files.FlagError(f"--submit: {folder} holds {path}, which eval.py --submit did not write, and "
                                      f"the folder must zip into the predictions alone; it is left as it is. Pass a "
                                      f"new or empty folder.")


SUBMISSION_KINDS = {"label_ids": "Cityscapes label ids", "train_ids": "train ids (0-18)",
                    "confidence": "16-bit confidences (65535 = 1)"}  # what datasets.TARGETS' `submission` names


def submission_png(kind: str, pred: Tensor, conf: Tensor) -> Image.Image:
    """A server's image for one test image (datasets.TARGETS' `submission` kinds): pred (H, W) train ids and conf
    (H, W) the softmax probability of that class -> 'label_ids' (Cityscapes label ids), 'train_ids', or 'confidence'
    (16-bit, 65535 = 1, as Dark Zurich's server reads it)."""
    if kind == "confidence":
        return Image.fromarray((conf * 65535).round().cpu().numpy().astype(np.uint16))
    ids = pred.cpu().numpy().astype(np.uint8)
    return Image.fromarray(np.array(data.LABEL_IDS, np.uint8)[ids] if kind == "label_ids" else ids)


def write_submission(model: ssr.Segmentor, loader, target: str, folder: str, *, device, amp_dtype=None,
                     mode: str = "whole", crop: int = 512, stride: int = 341) -> int:
    """Predict every image of `loader` (data.make_val_loader's test split) as the val protocol does (test scale,
    logits back to the image's full size) and write folder/<sub>/<image file name> for each folder <sub> of
    datasets.TARGETS[target]['submission']; returns the number of images. main() runs check_submission_folder
    first; the earlier submission's PNGs that this run did not rewrite are removed at the end."""
    kinds, written, mark = datasets.TARGETS[target]["submission"], set(), PngImagePlugin.PngInfo()
    mark.add_text(*SUBMIT_MARK)
    for sub in kinds:
        os.makedirs(os.path.join(folder, sub), exist_ok=True)
    model.eval()
    device = torch.device(device)
    with torch.inference_mode():
        for batch in loader:
            with torch.autocast(device.type, dtype=amp_dtype) if amp_dtype else nullcontext():
                logits = predict.network_logits(model, batch["img"].to(device), mode, crop, stride)
            for i, path in enumerate(batch["path"]):
                w, h = batch["size"][i].tolist()
                full = F.interpolate(logits[i:i + 1], size=(h, w), mode="bilinear", align_corners=False)
                conf, pred = full[0].softmax(0).max(0)
                for sub, kind in kinds.items():
                    out = os.path.normpath(os.path.join(folder, sub, os.path.basename(path)))
                    picture = submission_png(kind, pred, conf)  # written aside and renamed: a stop leaves whole files
                    files.save_atomic(out, lambda tmp: picture.save(tmp, format="PNG", pnginfo=mark))
                    written.add(out)
            n, total = len(written) // len(kinds), len(loader.dataset)
            if n * 10 // total > (n - len(batch["path"])) * 10 // total:  # crossed a tenth
                print(f"{n}/{total} images", file=sys.stderr, flush=True)
    for d, _, names in os.walk(folder):
        for path in (os.path.normpath(os.path.join(d, n)) for n in names):
            if path not in written and predict.own_output(path, SUBMIT_MARK):
                os.remove(path)
    return len(written) // len(kinds)


def print_submission(model: ssr.Segmentor, loader, target: str, folder: str, conditions: tuple[str, ...],
                     **options) -> None:
    """write_submission (with `options`: device, amp_dtype, mode), then what it wrote, where to submit it, and, as
    the last line, the command that zips the folder."""
    names = collections.Counter(os.path.basename(s.img) for s in loader.dataset.samples)
    twice = [name for name, k in names.items() if k > 1]
    if twice:
        raise files.DatasetError(f"{names[twice[0]]} test images of {target} are named {twice[0]}, and a server reads "
                                 f"one prediction per name; remove the copies from the dataset folder.")
    n = write_submission(model, loader, target, folder, **options)
    kinds = datasets.TARGETS[target]["submission"]
    print(f"wrote the predictions of the {n} {target} test images into {folder}: "
          + "; ".join(f"{'' if sub == '.' else sub + '/: '}{SUBMISSION_KINDS[kind]}" for sub, kind in kinds.items())
          + "; one PNG per image, named as the image, at its size.")
    if target == "acdc" and conditions != datasets.ACDC_CONDITIONS:
        print(f"note: only {','.join(conditions)}; ACDC's server expects every condition's test images "
              f"(--acdc-conditions {','.join(datasets.ACDC_CONDITIONS)}).")
    print(f"The papers' numbers for this benchmark are test-split numbers, which only its server computes: upload the "
          f"zip at {datasets.TARGETS[target]['server']}. Zip it with:")
    path = os.path.abspath(folder).rstrip(os.sep)
    print(f"rm -f {shlex.quote(path + '.zip')} && cd {shlex.quote(path)} && zip -qr {shlex.quote(path + '.zip')} .")


# ----------------------------------------------------------------------------------------------------------------
# command line


def check_writable(folder: str, flag: str) -> None:
    """Fail now, not after the slow steps, when no file can be written in folder (made first)."""
    why = files.cannot_write(folder)
    if why:
        raise files.FlagError(f"{flag}: cannot write into {folder} ({why}); pass a folder you can write to.")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ckpt", required=True,
                   help="checkpoint written by train.py or weights.py convert (.safetensors)")
    p.add_argument("--data-root", help="folder holding the datasets as downloaded (default: the checkpoint's, or data)")
    p.add_argument("--tgt", choices=list(datasets.TARGETS),
                   help="the dataset to evaluate on (default: the one the checkpoint was trained for)")
    p.add_argument("--acdc-conditions", default=",".join(datasets.ACDC_CONDITIONS),
                   help="ACDC's conditions to evaluate or predict, each reported apart and then together")
    p.add_argument("--split", default="val", choices=["train", "val", "test"],
                   help="split of the target dataset; test has no public labels: it needs --submit")
    p.add_argument("--submit", metavar="DIR",
                   help="with --split test: write the predictions into DIR in the format the target's server "
                        "takes (a new or empty folder, or an earlier --submit's), and print the line that zips it")
    p.add_argument("--images", metavar="DIR",
                   help=f"predict every {'/'.join(predict.IMAGE_SUFFIXES)} under DIR (subfolders and symlinked "
                        f"folders too) instead of evaluating; no labels needed; the predictions go to --save-dir under "
                        f"the same relative paths")
    p.add_argument("--src", choices=list(datasets.SOURCES),
                   help="the source the model was trained from; synthia reports mIoU16 and mIoU13 (default: the "
                        "checkpoint's, else gta5)")
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

    # every flag is checked before the model and the data are read
    if args.side_by_side and not args.save_dir:
        raise files.FlagError("--side-by-side writes pictures into --save-dir; pass --save-dir DIR as well.")
    if args.images and not args.save_dir:
        raise files.FlagError("--images writes its predictions into --save-dir; pass --save-dir DIR as well.")
    if (args.split == "test") != bool(args.submit) or (args.submit and (args.images or args.save_dir)):
        raise files.FlagError("--split test and --submit DIR go together, and without --images and --save-dir: the "
                              "test split's labels are not public, so its predictions are written for the "
                              "benchmark's server and scored there.")
    if args.batch_size <= 0 or args.workers < 0:
        raise files.FlagError("--batch-size must be positive and --workers at least 0.")
    if os.path.isdir(args.ckpt):
        inside = sorted(glob.glob(os.path.join(glob.escape(args.ckpt), "*.safetensors")))
        raise files.FlagError(f"--ckpt {args.ckpt} is a folder; pass the checkpoint in it: {' or '.join(inside)}."
                              if inside else f"--ckpt {args.ckpt} is a folder and holds no .safetensors checkpoint; "
                              f"pass the model.safetensors that train.py wrote (in its --out folder).")
    conditions = datasets.parse_conditions(args.acdc_conditions)
    device = files.check_device(args.device)
    if args.images:
        predict.check_outputs(args.images, args.save_dir, args.side_by_side)
    if args.submit:
        check_submission_folder(args.submit)
    # held for the run, so that a second evaluation into it fails now; --submit's on the folder itself, which must
    # zip into the predictions alone (save_dir and submit never go together)
    folder, flag = (args.save_dir, "--save-dir") if args.save_dir else (args.submit, "--submit")
    held = files.claim_folder(folder, flag, lock_file=not args.submit) if folder else None
    try:
        if args.submit:
            check_writable(args.submit, "--submit")
        run(args, device, conditions)
    finally:
        if held:  # what a failed start made is removed again
            files.release_folder(*held)


def run(args: argparse.Namespace, device: torch.device, conditions: tuple[str, ...]) -> None:
    """main()'s work, its flags checked: the model loaded, then the evaluation, the predictions or the submission."""
    amp_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": None}[args.amp]
    model, meta = checkpoint.load_segmentor(args.ckpt, device)
    files.note_model_behind(args.ckpt, meta.get("iters"))  # a train.py run stopped between its two renames
    if model.cfg.num_classes != len(data.CLASSES):
        raise files.WeightsError(f"{args.ckpt} predicts {model.cfg.num_classes} classes but the evaluation uses the "
                                 f"{len(data.CLASSES)} Cityscapes classes; pass a checkpoint of a 19-class model.")
    trained_for = meta.get("dataset", "cityscapes")  # train.py records its --tgt; converted files their --tgt
    target = args.tgt or trained_for
    if target not in datasets.TARGETS:
        raise files.FlagError(f"{args.ckpt} was trained for '{target}', which eval.py does not know; pass --tgt "
                              f"with one of {', '.join(datasets.TARGETS)}.")
    if target != "acdc" and args.acdc_conditions != ",".join(datasets.ACDC_CONDITIONS):
        raise files.FlagError(f"--acdc-conditions only applies to ACDC, and this evaluation is on {target}; drop it.")
    # the checkpoint's test scale is the benchmark's, or the demo's for its own world
    scale = tuple(meta["test_scale"]) if "test_scale" in meta and target == trained_for else (
        datasets.TARGETS[target]["scale"])
    if args.images:
        predict.print_predictions(model, args.images, args.save_dir, device=device, scale=scale, amp_dtype=amp_dtype,
                                  mode=args.mode, with_legend=args.side_by_side, workers=args.workers)
        return
    source = args.src or meta.get("source", "gta5")  # train.py records it; older and converted files may not
    root = args.data_root or meta.get("data_root") or "data"
    in_demo = os.path.isfile(os.path.join(root, "cityscapes", demo.MARKER))  # the demo's world, not a download
    if in_demo and (args.split == "test" or target != "cityscapes"):
        raise files.DatasetError(f"{root} holds the demo's synthetic world: a Cityscapes-like target with a train "
                                 f"and a val split only (no test split, and no server to score one). Evaluate on its "
                                 f"val split, or pass --data-root with the downloaded {target} dataset.")
    # ACDC: one loader per condition, each reported, then all in one histogram; every one is listed (and a missing
    # folder found) before the first image is predicted
    groups = [(c,) for c in conditions] if target == "acdc" and not args.submit else [conditions]
    loaders = [data.make_val_loader(root, target, args.split, scale=scale, batch_size=args.batch_size,
                                    workers=args.workers, pin_memory=device.type == "cuda", conditions=group)
               for group in groups]
    if args.save_dir:
        check_save_dir(args.save_dir, loaders, args.side_by_side)
    if args.submit:
        print_submission(model, loaders[0], target, args.submit, conditions, device=device, amp_dtype=amp_dtype,
                         mode=args.mode)
        return
    results = [evaluate(model, loader, device=device, amp_dtype=amp_dtype, mode=args.mode, save_dir=args.save_dir,
                        side_by_side=args.side_by_side, progress=True) for loader in loaders]
    source = source if source in datasets.SOURCES else "gta5"
    if len(results) > 1:
        for group, r in zip(groups, results):
            print(f"{group[0]}: mIoU {100 * next(iter(reported_means(r['iou'], source).values())):.2f} "
                  f"({r['images']} images)")
    print_table(merge_results(results), data.CLASSES, source)


if __name__ == "__main__":
    processes.stops_interrupt()  # a scheduler's stop and a closed terminal act as Ctrl-C: temp files go
    try:
        main()
    except files.UserError as e:  # user input; a bug keeps its traceback
        sys.exit(f"error: {e}")
    except KeyboardInterrupt as e:  # one line and the status of a Ctrl-C, as train.py
        print(f"stopped; {str(e) or 'no mIoU was printed, and predictions written to --save-dir, if any, are kept'}",
              file=sys.stderr)
        sys.exit(130)
