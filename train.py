"""
Train a segmentor for unsupervised domain adaptation (GTA5 or SYNTHIA -> Cityscapes, Cityscapes -> ACDC or Dark
Zurich) with SSR, DAFormer or source only.

    python train.py --demo                                  # synthetic domains, tiny model, minutes on a CPU
    python train.py --src gta5 --tgt cityscapes --pretrained mit_b5.safetensors --sam-weights sam_vit_b.safetensors
    python train.py --src cityscapes --tgt acdc --pretrained mit_b5.safetensors --sam-weights sam_vit_b.safetensors
    torchrun --nproc_per_node=4 train.py ...               # DistributedDataParallel, one process per GPU
    python train.py --demo --resume                         # continue a stopped run (its flags are the defaults)

Reads top to bottom: arguments, set-up, the run folder, data, models, optimizer, one loop. The method itself (what
one step computes) lives in ssr.py; how several processes act as one run, in processes.py; the run folder's file
machinery (its lock, the checkpoint pair, a state read back), in files.py. This file owns the optimizer, mixed
precision, logging, and what a checkpoint holds.
"""
import argparse
import json
import os
import pathlib
import sys
import time
import uuid
from contextlib import contextmanager, nullcontext

import torch

import checkpoint
import data
import datasets
import demo
import files
import mit
import processes
import sam_encoder
import ssr
import speed
import toys
import weights
from eval import evaluate, print_table
from pictures import debug_panel, training_curves

# -----------------------------------------------------------------------------
# arguments

# On --resume these must equal the saved run's: its weights, batches and random streams depend on them.
RUN_FLAGS = ("demo", "src", "tgt", "acdc_conditions", "method", "mic", "backbone", "sam", "sam_img_size", "ssr_stages",
             "ssr_context", "crop", "batch_size", "seed", "ema_alpha")


class HelpFormatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    """The docstring as written, and every flag's default in --help."""


p = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
p.add_argument("--src", default="gta5", choices=list(datasets.SOURCES), help="labelled source domain (folder under --data-root)")
p.add_argument("--tgt", default="cityscapes", choices=list(datasets.TARGETS),
               help="unlabelled target domain (folder under --data-root; darkzurich: dark_zurich/); the benchmark's "
                    "scales are the defaults (README, Data)")
p.add_argument("--acdc-conditions", default=",".join(datasets.ACDC_CONDITIONS),
               help="with --tgt acdc: the conditions to adapt to and evaluate on, e.g. night or fog,night")
p.add_argument("--data-root", default="data", help="folder holding the datasets as downloaded (gta5/, cityscapes/, ...)")
p.add_argument("--method", default="ssr", choices=ssr.METHODS,
               help="ssr: DAFormer + SAM regularization; dacs: DAFormer (DACS + FD + RCS); source-only: no adaptation")
p.add_argument("--mic", action="store_true", help="add masked image consistency (MIC) on top of the method")
p.add_argument("--backbone", default="mit_b5", choices=list(mit.MIT_PRESETS), help="MiT encoder size")
p.add_argument("--pretrained", help="ImageNet MiT weights (.safetensors, see README), or 'none' for random init")
p.add_argument("--sam", default="vit_b", choices=list(sam_encoder.SAM_PRESETS), help="SAM image encoder size")
p.add_argument("--sam-weights", help="SAM weights (.safetensors), required for --method ssr; 'none' = random teacher (tests only)")
p.add_argument("--sam-img-size", type=int, default=1024, help="resolution the SAM teacher sees, a multiple of 16 (smaller = cheaper)")
p.add_argument("--ssr-stages", default="0,1,2,3", help="comma-separated MiT stages that SAM regularizes")
p.add_argument("--ssr-context", default="sam", choices=ssr.CONTEXTS,
               help="what the SSR branch attends to: each image's SAM tokens (the paper), another image's "
                    "(shuffled within the batch) or zeros: ablations of whether image-specific SAM knowledge matters")
p.add_argument("--iters", type=int, default=40000, help="training iterations")
p.add_argument("--batch-size", type=int, default=2, help="source and target images per iteration and GPU")
p.add_argument("--crop", type=int, default=512, help="training crop size")
p.add_argument("--lr", type=float, default=6e-5, help="base learning rate (the head gets 10x)")
p.add_argument("--warmup", type=int, default=1500, help="linear warm-up iterations")
p.add_argument("--ema-alpha", type=float, default=ssr.EMA_ALPHA, help="the EMA teacher's final momentum")
p.add_argument("--amp", choices=["bf16", "fp16", "fp32"], help="mixed precision; unset: bf16 where supported, else fp32")
p.add_argument("--seed", type=int, default=0, help="seed for weights, sampling and augmentation")
# a batch at the paper's sizes (two GTA5 and two Cityscapes PNGs read, resized, cropped) costs one core ~0.25 s
# (2-core AMD EPYC, on suite.py's files), so 8 workers keep up with ~30 it/s
p.add_argument("--workers", type=int, default=min(8, os.cpu_count() or 1), help="data loader processes per GPU")
speed_flags = p.add_mutually_exclusive_group()
speed_flags.add_argument("--compile", action="store_true", help="torch.compile the networks, block by block (the first iterations compile)")
speed_flags.add_argument("--cuda-graphs", action="store_true",
                         help="replay the frozen networks' forwards (EMA teacher, ImageNet copy, SAM) as CUDA graphs, "
                              "one launch each instead of one per op (cuda only)")
p.add_argument("--grad-checkpoint", action="store_true", help="recompute MiT blocks in backward to save memory")
p.add_argument("--out", help="run folder; unset: runs/<name>_seed<seed>")
p.add_argument("--log-every", type=int, default=50, help="print a progress line every N iterations (0 = at the end)")
p.add_argument("--eval-every", type=int, default=4000, help="evaluate on the target val set every N iterations (0 = at the end)")
p.add_argument("--save-every", type=int, default=4000,
               help="write checkpoints every N iterations (0 = at the end); also before each evaluation and on a stop")
p.add_argument("--debug-every", type=int, default=1000,
               help="write a debug panel to <out>/debug/iter_NNNNNN.png every N iterations (dacs, ssr; 0 = never)")
p.add_argument("--resume", action="store_true", help="continue from <out>/train_state.pt; flags not given take the saved run's values")
p.add_argument("--demo", action="store_true",
               help="train a tiny model on synthetic domains (generated if absent; --src gta5, or cityscapes for the "
                    "oracle, --tgt cityscapes), pretrained on toys.py's toy ImageNet, with its toy SAM teacher (both "
                    "made on first use; --backbone and --sam cannot change them): minutes on a CPU; sets the defaults "
                    + ", ".join(f"--{k.replace('_', '-')} {v}" for k, v in demo.FLAGS.items()))
if "--demo" in sys.argv[1:]:
    p.set_defaults(**demo.FLAGS)
args = p.parse_args()
if args.demo:  # toys.py's toy ImageNet and toy SAM teacher, made on first use (toys.prepare below)
    args.pretrained, args.sam_weights = toys.demo_weights(args.method, args.pretrained, args.sam_weights)

tgt_name = args.tgt if args.acdc_conditions == p.get_default("acdc_conditions") else (
    f"{args.tgt}-{args.acdc_conditions.replace(',', '-')}")  # acdc-night: a subset never shares a folder with all
out = args.out or os.path.join("runs", f"{'demo' if args.demo else f'{args.src}2{tgt_name}_{args.method}'}"
                                       f"{'_mic' if args.mic else ''}{'' if args.demo else '_' + args.backbone}"
                                       f"_seed{args.seed}")  # two seeds never share a folder
state_path, model_path = os.path.join(out, "train_state.pt"), os.path.join(out, "model.safetensors")
config_path, log_path = os.path.join(out, "config.json"), os.path.join(out, "log.jsonl")
world = processes.start(checkpoint=state_path)  # under torchrun: one process per GPU, each of one rank
files.wait_for_leftovers(out, say=world.master)  # the workers of a killed torchrun, saving their last iteration
state = files.read_state(state_path) if args.resume else None
if state:  # the saved run's flags become the defaults; flags given now override those that fit the state
    args = files.resumed_args(p, state, RUN_FLAGS, out)
args.out = out  # resolved, for config.json and the saved flags
run_id = state.get("run_id") if state else uuid.uuid4().hex[:12]  # tells this run's files from another run's


def get_lr(it: int) -> float:
    """mmcv's poly schedule (power 1, to 0) with linear warm-up from 1e-6 of the rate, as the paper's config."""
    lr = args.lr * (1 - it / args.iters)
    if it < args.warmup:
        lr *= 1 - (1 - it / args.warmup) * (1 - 1e-6)
    return lr


# The sizes, each from the file that owns it: the demo's (demo.CONFIG) or the benchmark's (datasets.SOURCES,
# TARGETS: DAFormer's configs)
sizes = demo.sizes(args.src) if args.demo else datasets.sizes(args.src, args.tgt)

# Every flag is checked here, before anything slow or anything written.
stages = tuple(int(s) for s in args.ssr_stages.split(",") if s.strip().isdigit())
conditions = datasets.check_pair(args.src, args.tgt, args.acdc_conditions, args.method)
if args.demo:
    demo.check_flags(args.src, args.tgt, [f"--{k}" for k in ("backbone", "sam") if vars(args)[k] != p.get_default(k)])
weights.check_weight_flags(args.method, args.pretrained, args.sam_weights)
if len(stages) != len(args.ssr_stages.split(",")) or not set(stages) <= {0, 1, 2, 3} or len(set(stages)) < len(stages):
    raise files.FlagError(f"--ssr-stages {args.ssr_stages!r}: give distinct MiT stages among 0,1,2,3, e.g. 0,1,2,3.")
ssr_flags = [f"--{k.replace('_', '-')} {vars(args)[k]}" for k in ("ssr_stages", "ssr_context")
             if vars(args)[k] != p.get_default(k)]  # the SSR branch's, given
if args.method != "ssr" and ssr_flags:
    raise files.FlagError(f"{' and '.join(ssr_flags)}: only --method ssr has SAM's branch, not --method "
                         f"{args.method}; drop {'them' if len(ssr_flags) > 1 else 'it'}.")
if args.mic and args.method == "source-only":
    raise files.FlagError("--mic trains on the EMA teacher's pseudo-labels, which --method source-only has none of; "
                         "use it with --method dacs or ssr.")
if args.ssr_context == "shuffled" and args.batch_size < 2:
    raise files.FlagError("--ssr-context shuffled needs --batch-size 2 or more: it gives each image another's tokens.")
if args.sam_img_size <= 0 or args.sam_img_size % 16:
    raise files.FlagError(f"--sam-img-size {args.sam_img_size}: SAM cuts its input into 16x16 patches, so give a "
                         f"positive multiple of 16, e.g. 1024 (the paper) or 512.")
if args.crop <= 0 or args.crop % 32 or args.crop > sizes.max_crop:
    raise files.FlagError(f"--crop {args.crop}: the crop must be a positive multiple of 32 and at most the height "
                         f"the images are resized to ({sizes.max_crop} px here), e.g. --crop 512.")
if min(args.iters, args.batch_size, args.lr) <= 0 or args.warmup < 0 or not 0 <= args.ema_alpha < 1:
    raise files.FlagError("--iters, --batch-size and --lr must be positive, --warmup at least 0 (no warm-up), and "
                         "--ema-alpha in [0, 1).")
if min(args.log_every, args.eval_every, args.save_every, args.debug_every, args.workers) < 0:
    raise files.FlagError("--log-every, --eval-every, --save-every, --debug-every and --workers cannot be negative "
                         "(0 = at the end, or for --debug-every never, or for --workers, load in the main process).")
if args.cuda_graphs and not torch.cuda.is_available():
    raise files.FlagError("--cuda-graphs: PyTorch sees no CUDA GPU, and CUDA graphs run on one only. Drop the flag.")
datasets.check_data_root(args.data_root, [args.src, args.tgt], out, demo=args.demo)

# -----------------------------------------------------------------------------
# set-up: device, precision

device = world.device
# Fixed shapes: cuDNN times its convolution algorithms once and keeps the fastest, as mmseg's configs
# (cudnn_benchmark = True); this only reorders arithmetic on the GPU.
torch.backends.cudnn.benchmark = True
if args.amp is None:
    args.amp = "bf16" if device.type == "cuda" and torch.cuda.is_bf16_supported() else "fp32"
amp_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": None}[args.amp]
ctx = torch.autocast(device.type, dtype=amp_dtype) if amp_dtype else nullcontext()
if world.master and not args.demo:
    weights.warn_random_weights(args.method, args.pretrained, args.sam_weights)


# -----------------------------------------------------------------------------
# the run folder: lock, checkpoint pair, log, resume (the file machinery is files.py's)

def model_meta(it: int) -> dict:
    """What model.safetensors records beside its weights: enough for eval.py to evaluate it as trained."""
    return dict(dataset=args.tgt, source=args.src, test_scale=list(sizes.tgt_scale), data_root=args.data_root,
                method=args.method, ssr_context=args.ssr_context, iters=it, run_id=run_id,
                **({"acdc_conditions": list(conditions)} if args.tgt == "acdc" else {}))


def prepare() -> None:
    """Rank 0, while the others wait: hold --out for the run's whole life (at exit, what a failed start made is
    removed again), refuse another run's files, make the demo's, and check every data file from its header (a bad
    file is found now, not in hour 5)."""
    files.claim_run(out, state_path, args.resume)
    if state:  # the run id ties the state to the config.json and model.safetensors beside it
        checkpoint.check_resumed_run(out, state, state_path, config_path, model_path,
                                     ssr.SegConfig(backbone=args.backbone, **sizes.seg), **model_meta(state["iter"]))
        if state["iter"] >= args.iters:
            raise files.FlagError(f"the run in {out} finished already ({state['iter']} of {args.iters} iterations); "
                                 f"pass a larger --iters to train further.")
    print(f"run {out}: {args.method}{' + mic' if args.mic else ''}, {args.backbone}, {world.size} x {device.type}, "
          f"{args.amp}")
    if args.demo:  # its domains, its toy ImageNet and its toy teacher, each made once
        toys.prepare(args.data_root, args.sam_weights, args.pretrained)
    source = datasets.check_datasets(args.data_root, args.src, args.tgt, conditions)
    data.class_pixel_counts(source)  # the rare class statistics, computed and cached once, before other ranks


def save(it: int, last_saved: int) -> None:
    """Every rank: its random state is gathered; rank 0 writes the deployable model and the full training state,
    renamed into place together (files.save_checkpoint). Every rank returns once both are on disk."""
    rngs = processes.gather_rng(world)
    if world.master:
        state = dict(uda=uda.state_dict(), optimizer=optimizer.state_dict(), scaler=scaler.state_dict(), iter=it,
                     rng=rngs, args=json.dumps(vars(args)), run_id=run_id)
        files.save_checkpoint(out, it, last_saved,
                              (model_path, lambda tmp: checkpoint.write_segmentor(student, tmp, **model_meta(it))),
                              (state_path, lambda tmp: torch.save(state, tmp)))
    processes.agree(world, patient=True)  # on a stop, no rank exits while rank 0 still writes (torchrun would end it)


def kept(last_saved: int) -> str:
    """What a stop in the loop leaves, for its paragraph."""
    return f"The last checkpoint, of iteration {last_saved}, is {state_path}." if last_saved else \
        "No checkpoint was written yet."


processes.on_master(world, prepare)
start = last_saved = state["iter"] if state else 0  # last_saved: the iteration whose checkpoint is on disk, or 0

# -----------------------------------------------------------------------------
# data, models, optimizer

train_batches = data.make_train_loader(
    args.data_root, args.src, args.tgt, crop=args.crop, batch_size=args.batch_size, seed=args.seed, start_iter=start,
    workers=args.workers, rank=world.rank, world_size=world.size, pin_memory=device.type == "cuda",
    conditions=conditions, src_scale=sizes.src_scale, tgt_scale=sizes.tgt_scale, rcs_min_pixels=sizes.rcs_min_pixels)
val_loader = data.make_val_loader(args.data_root, args.tgt, "val", scale=sizes.tgt_scale, batch_size=1,
                                  workers=args.workers, pin_memory=device.type == "cuda",
                                  conditions=conditions) if world.master else None

# the student segmentor, the UDA wrapper (EMA teacher, ImageNet copy, SSR branch), the SAM teacher
torch.manual_seed(args.seed)  # the same initial weights on every rank (DDP also broadcasts them from rank 0)
student = ssr.build_segmentor(ssr.SegConfig(backbone=args.backbone, **sizes.seg))
if args.pretrained != "none":
    weights.load_mit(student.backbone, args.pretrained)
student.backbone.grad_checkpoint = args.grad_checkpoint
uda = ssr.UDA(student, method=args.method, mic=args.mic, ssr_stages=stages, sam_img_size=args.sam_img_size,
              ema_alpha=args.ema_alpha, ssr_context=args.ssr_context,
              ignore_rows=sizes.ignore_rows or ssr.IGNORE_ROWS).to(device)  # None: the method's, DAFormer's
sam = None
if args.method == "ssr" and args.ssr_context != "zeros":  # a zero context needs no SAM pass
    sam = weights.frozen_sam(args.sam, None if args.sam_weights == "none" else args.sam_weights,
                             img_size=args.sam_img_size, device=device, dtype=amp_dtype or torch.float32,
                             **sizes.sam)
# speed, applied from outside the method (each lever tested to compute what the method computes)
speed.apply(uda, sam, amp_dtype, args.batch_size, args.crop, compiled=args.compile, cuda_graphs=args.cuda_graphs)
model = processes.wrap(world, uda)  # under torchrun DistributedDataParallel, which averages the gradients

# AdamW as the paper's config, the head at 10x the rate (ssr.param_groups: which parameters, at which rate and decay)
optimizer = torch.optim.AdamW(ssr.param_groups(uda), lr=args.lr, betas=(0.9, 0.999),
                              fused=True)  # fused: one kernel for all tensors
scaler = torch.amp.GradScaler(device.type, enabled=args.amp == "fp16")

# resume: weights, optimizer, and each rank's own random stream (mixing, jitter, drop path)
torch.manual_seed(args.seed + world.rank)
if state:
    files.load_state(state_path, state, uda, optimizer, scaler)
    processes.restore_rng(world, state["rng"])
    if world.master:
        print(f"resuming {out} at iteration {start}")
    del state


@contextmanager
def out_of_memory_explained(it: int, last_saved: int):
    """The device's (torch.OutOfMemoryError) or the CPU's allocator failing in the step, as one paragraph."""
    try:
        yield
    except RuntimeError as e:
        if not isinstance(e, torch.OutOfMemoryError) and "can't allocate memory" not in str(e):
            raise
        raise processes.met_alone(files.UserError(
            f"out of memory on {device} in the step of iteration {it + 1}: lower --batch-size (now "
            f"{args.batch_size}), --crop ({args.crop}) or --sam-img-size ({args.sam_img_size}) in a new run (another "
            f"--out), or continue this one with --resume --grad-checkpoint (MiT's activations recomputed in the "
            f"backward pass: less memory, slower). {kept(last_saved)}")) from None


def log_progress(it: int, totals: dict, counted: int, losses: dict, skipped: int, elapsed: float) -> None:
    """One progress line: the losses averaged over the interval's `counted` finite iterations (their `totals`; with
    none, this iteration's `losses`), as mmseg logs them, the rate, the peak memory so far on a GPU. It is logged
    before it is printed: a line on the screen is on disk too."""
    means = {k: (v / counted).item() for k, v in totals.items()} if counted else {
        k: v.item() for k, v in losses.items()}
    speed = (it - start) / elapsed
    mem = {"mem_gib": torch.cuda.max_memory_allocated(device) / 2**30} if device.type == "cuda" else {}
    files.log_line(log_path, dict(iter=it, **means, lr=get_lr(it - 1), it_s=speed, elapsed_s=elapsed,
                                 skipped=skipped, **mem))
    print(f"iter {it}/{args.iters} " + " ".join(f"{k} {v:.4g}" for k, v in means.items())
          + f" lr {get_lr(it - 1):.2e} {speed:.2f} it/s elapsed {elapsed / 60:.1f} min"
          + f" eta {(args.iters - it) / speed / 60:.0f} min" + (f" skipped {skipped}" if skipped else "")
          + "".join(f" mem {v:.1f} GiB" for v in mem.values()), flush=True)


def save_debug_panel(it: int) -> None:
    """<out>/debug/iter_NNNNNN.png from the tensors that the step's forward kept (uda.keep_pictures), then let go."""
    os.makedirs(os.path.join(out, "debug"), exist_ok=True)
    files.save_atomic(os.path.join(out, "debug", f"iter_{it:06d}.png"),
                     lambda tmp: debug_panel(uda.pictures).save(tmp, format="PNG"))
    uda.keep_pictures, uda.pictures = False, None


def evaluate_and_log(it: int) -> float:
    """The student's mIoU on the target's val set (mIoU16 for SYNTHIA), logged; the training curves drawn."""
    miou = print_table(evaluate(student, val_loader, device=device, amp_dtype=amp_dtype), data.CLASSES, args.src)
    files.log_line(log_path, dict(iter=it, miou=miou))
    files.save_atomic(os.path.join(out, "curves.png"),
                     lambda tmp: training_curves(files.read_log(log_path)).save(tmp, format="PNG"))
    return miou


# -----------------------------------------------------------------------------
# the loop

batch, data_error = data.next_batch(train_batches)
if processes.agree(world, data_error)[0]:
    processes.raise_everywhere(world, data_error)
if world.master:  # every flag's value, defaults included, and the run's id
    config = json.dumps(dict(vars(args), run_id=run_id), indent=1)
    files.save_atomic(config_path, lambda tmp: pathlib.Path(tmp).write_text(config))
    if start:
        files.log_line(log_path, dict(resume=start))  # the lines of later iterations that follow replace these
stop = processes.catch_stops()  # from here a stop finishes the iteration, saves, and exits
mious, bad, skipped, t0, it = [], 0, 0, time.time(), start  # t0 of this process: a resumed run counts from its resume
totals, counted = {}, 0  # loss sums over the logging interval, on the device (no sync per iteration)
uda.train()  # once: evaluate() puts the student back in training mode itself
while it < args.iters:
    src_img, src_lbl, tgt_img = (batch[k].to(device, non_blocking=True) for k in ("src_img", "src_lbl", "tgt_img"))
    for g in optimizer.param_groups:
        g["lr"] = get_lr(it) * g["lr_mult"]
    drawing = world.master and args.method != "source-only" and args.debug_every and (it + 1) % args.debug_every == 0
    uda.keep_pictures = bool(drawing)  # the forward keeps its tensors for a debug panel
    with out_of_memory_explained(it, last_saved):
        with ctx:
            losses = model(src_img, src_lbl, tgt_img, it, sam=sam)  # the EMA teacher's update included
        loss = sum(losses.values())
        scaler.scale(loss).backward()  # always, so that DDP ranks stay in step even when one loss is bad
    batch, data_error = data.next_batch(train_batches) if it + 1 < args.iters else (None, None)
    # The one agreement of the iteration: did any rank see a bad loss, a stop signal (or its launcher's death), or
    # an unreadable next batch? All ranks act alike on each.
    nonfinite, stopping, data_failed = processes.agree(
        world, not torch.isfinite(loss.detach()).item(), stop or processes.launcher_gone(world), data_error)
    if nonfinite:
        bad, skipped = bad + 1, skipped + 1
        if bad >= 10:
            raise files.UserError(f"the loss was not finite for 10 iterations in a row (at iteration {it}); lower "
                                 f"--lr, or use --amp bf16/fp32 instead of fp16. {kept(last_saved)}")
    else:
        bad = 0
        with out_of_memory_explained(it, last_saved):  # AdamW makes its moments at the first step
            scaler.step(optimizer)
        scaler.update()
        totals, counted = {k: totals.get(k, 0) + v.detach() for k, v in losses.items()}, counted + 1
    optimizer.zero_grad(set_to_none=True)
    it += 1
    if uda.keep_pictures:
        save_debug_panel(it)
    if world.master and ((args.log_every and it % args.log_every == 0) or it == args.iters):
        log_progress(it, totals, counted, losses, skipped, elapsed=time.time() - t0)
        totals, counted = {}, 0
    evaluating = (args.eval_every and it % args.eval_every == 0) or it == args.iters
    if (args.save_every and it % args.save_every == 0) or evaluating or stopping or data_failed:
        save(it, last_saved)  # before evaluating: an evaluation that fails loses nothing
        last_saved = it
    if data_failed:
        processes.raise_everywhere(world, data_error, saved=it)
    if evaluating:
        mious.append((it, processes.on_master(world, lambda: evaluate_and_log(it), saved=it)))  # None off rank 0
    if stopping:
        if world.master:
            print(f"stopped at iteration {it}; the state is saved in {out}: continue with --resume")
        sys.exit(130)

if world.master:
    (first_it, first), (final_it, final) = mious[0], mious[-1]
    print(f"done: {model_path}")
    print(f"target mIoU: {100 * final:.2f} at iteration {final_it} (first evaluation: {100 * first:.2f} at "
          f"iteration {first_it})")
    if args.demo and args.src == "gta5" and args.iters == demo.FLAGS["iters"]:
        print(demo.gap_closed_line(100 * final))  # the study's flags, so its gap applies
if world.size > 1:
    same = processes.weights_agree(world, student)
    if world.master:
        print(f"ranks agree on the weights: {same}")
