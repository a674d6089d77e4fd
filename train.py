"""
Train a segmentor for unsupervised domain adaptation, GTA5 -> Cityscapes, with SSR, DAFormer or source only.

    python train.py --demo                                  # synthetic domains, tiny model, minutes on a CPU
    python train.py --src gta5 --tgt cityscapes --pretrained mit_b5.safetensors --sam-weights sam_vit_b.safetensors
    torchrun --nproc_per_node=4 train.py ...               # DistributedDataParallel, one process per GPU

Reads top to bottom: arguments, set-up, data, models, optimizer, one loop. The method itself (what one step
computes) lives in ssr.py; this file owns the optimizer, mixed precision, logging, checkpoints and resume.
"""
import argparse
import json
import os
import signal
import sys
import time
import warnings
from contextlib import nullcontext

import torch
import torch.distributed as dist

import data
import mit
import sam_encoder
import ssr
from eval import evaluate, print_table

# -----------------------------------------------------------------------------
# arguments

# The demo trains a tiny MiT and a tiny random SAM teacher from scratch on the synthetic domains of data.py; the
# method, the loop and the evaluator are the real code path. --demo sets these defaults (flags still override
# them); the model and data sizes below are fixed.
DEMO_FLAGS = dict(data_root="data/demo", backbone="mit_b0", pretrained="none", sam_weights="none", sam_img_size=128,
                  iters=300, lr=6e-4, warmup=50, crop=data.DEMO["crop"], eval_every=100, save_every=100, log_every=50)
DEMO = dict(mit=dict(embed_dims=(32, 64, 160, 256), depths=(1, 1, 1, 1)), channels=32,
            sam=dict(embed_dim=96, depth=2, num_heads=2, global_attn_indexes=(1,)),
            ignore_rows=(4, 30),  # DAFormer's 15 and 120 pseudo-label rows are for 512 crops; these are 128
            **data.DEMO)

p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
p.add_argument("--src", default="gta5", choices=["gta5"], help="labelled source domain (folder under --data-root)")
p.add_argument("--tgt", default="cityscapes", choices=["cityscapes"], help="unlabelled target domain (folder under --data-root)")
p.add_argument("--data-root", default="data", help="folder holding gta5/ and cityscapes/ as downloaded")
p.add_argument("--method", default="ssr", choices=["ssr", "dacs", "source-only"],
               help="ssr: DAFormer + SAM regularization; dacs: DAFormer (DACS + FD + RCS); source-only: no adaptation")
p.add_argument("--mic", action="store_true", help="add masked image consistency (MIC) on top of the method")
p.add_argument("--backbone", default="mit_b5", choices=list(mit.MIT_PRESETS), help="MiT encoder size")
p.add_argument("--pretrained", help="ImageNet MiT weights (.safetensors, see README), or 'none' for random init")
p.add_argument("--sam", default="vit_b", choices=list(sam_encoder.SAM_PRESETS), help="SAM image encoder size")
p.add_argument("--sam-weights", help="SAM weights (.safetensors), required for --method ssr; 'none' = random teacher (tests only)")
p.add_argument("--sam-img-size", type=int, default=1024, help="resolution the SAM teacher sees (smaller = cheaper)")
p.add_argument("--ssr-stages", default="0,1,2,3", help="comma-separated MiT stages that SAM regularizes")
p.add_argument("--iters", type=int, default=40000, help="training iterations")
p.add_argument("--batch-size", type=int, default=2, help="source and target images per iteration and GPU")
p.add_argument("--crop", type=int, default=512, help="training crop size")
p.add_argument("--lr", type=float, default=6e-5, help="base learning rate (the head gets 10x)")
p.add_argument("--warmup", type=int, default=1500, help="linear warm-up iterations")
p.add_argument("--amp", choices=["bf16", "fp16", "fp32"], help="mixed precision (default: bf16 where supported, else fp32)")
p.add_argument("--seed", type=int, default=0, help="seed for weights, sampling and augmentation")
p.add_argument("--workers", type=int, default=min(4, os.cpu_count() or 1), help="data loader processes per GPU")
p.add_argument("--compile", action="store_true", help="torch.compile the networks (the first iterations are slow)")
p.add_argument("--grad-checkpoint", action="store_true", help="recompute MiT blocks in backward to save memory")
p.add_argument("--out", help="run folder (default: runs/<name>)")
p.add_argument("--log-every", type=int, default=50, help="print a progress line every N iterations")
p.add_argument("--eval-every", type=int, default=4000, help="evaluate on the target val set every N iterations (0 = at the end)")
p.add_argument("--save-every", type=int, default=4000, help="write checkpoints every N iterations (and at the end)")
p.add_argument("--resume", action="store_true", help="continue from <out>/train_state.pt")
p.add_argument("--demo", action="store_true",
               help="generate synthetic domains (if absent) and train a tiny model on them: minutes on a CPU; sets "
                    "the defaults " + ", ".join(f"--{k.replace('_', '-')} {v}" for k, v in DEMO_FLAGS.items()))
if "--demo" in sys.argv[1:]:
    p.set_defaults(**DEMO_FLAGS)
args = p.parse_args()


def fail(msg: str) -> None:
    sys.exit(f"error: {msg}")


def get_lr(it: int) -> float:
    """mmcv's poly schedule (power 1, to 0) with linear warm-up from 1e-6 of the rate, as the paper's config."""
    lr = args.lr * (1 - it / args.iters)
    if it < args.warmup:
        lr *= 1 - (1 - it / args.warmup) * (1 - 1e-6)
    return lr


# -----------------------------------------------------------------------------
# set-up: devices, processes, seeds, precision, run folder

ddp = "RANK" in os.environ  # set by torchrun
rank, world = (int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])) if ddp else (0, 1)
master = rank == 0
if ddp:
    local_rank = int(os.environ["LOCAL_RANK"])
    if torch.cuda.is_available():
        torch.cuda.set_device(local_rank)
    dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
device = torch.device(f"cuda:{torch.cuda.current_device()}" if torch.cuda.is_available() else "cpu")
stages = tuple(int(s) for s in args.ssr_stages.split(",") if s.strip())
data_root = args.data_root
if args.demo:
    mit_overrides, channels, sam_overrides, ignore_rows = DEMO["mit"], DEMO["channels"], DEMO["sam"], DEMO["ignore_rows"]
    src_scale, tgt_scale, rcs_min_pixels = DEMO["src_scale"], DEMO["tgt_scale"], DEMO["rcs_min_pixels"]
else:  # the paper's configuration
    mit_overrides, channels, sam_overrides, ignore_rows = {}, 256, {}, (15, 120)
    src_scale, tgt_scale, rcs_min_pixels = (1280, 720), (1024, 512), 3000
if args.amp is None:
    args.amp = "bf16" if device.type == "cuda" and torch.cuda.is_bf16_supported() else "fp32"
amp_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": None}[args.amp]
name = "demo" if args.demo else f"{args.src}2{args.tgt}_{args.method}{'_mic' if args.mic else ''}_{args.backbone}"
out = args.out or os.path.join("runs", name)
state_path, model_path = os.path.join(out, "train_state.pt"), os.path.join(out, "model.safetensors")

# Flags that contradict each other fail here, before anything slow happens.
if args.pretrained is None:
    fail("--pretrained is required: pass the ImageNet MiT weights (e.g. mit_b5.safetensors, see README) "
         "or --pretrained none for a random initialization (for tests only: it will not reach the paper's numbers).")
if args.method == "ssr" and args.sam_weights is None:
    fail("--method ssr needs the SAM teacher: pass --sam-weights PATH (e.g. the model.safetensors of "
         "facebook/sam-vit-base, see README), or --sam-weights none for a random teacher (tests and demo only).")
if args.method != "ssr" and args.sam_weights not in (None, "none"):
    fail(f"--sam-weights is only used by --method ssr, not by --method {args.method}: drop it or use --method ssr.")
if not stages or any(s not in range(4) for s in stages) or len(set(stages)) != len(stages):
    fail(f"--ssr-stages {args.ssr_stages!r}: give distinct MiT stages among 0,1,2,3, e.g. --ssr-stages 0,1,2,3.")
if args.crop % 32 or args.crop > min(src_scale[1], tgt_scale[1]):
    fail(f"--crop {args.crop}: the crop must be a multiple of 32 and at most the height the images are resized to "
         f"({min(src_scale[1], tgt_scale[1])} px here), e.g. --crop 512.")
if args.iters <= 0 or args.batch_size <= 0:
    fail("--iters and --batch-size must be positive.")
if args.resume and not os.path.exists(state_path):
    fail(f"--resume: there is no {state_path} to continue from. Check --out, or start a new run without --resume.")
if not args.resume and os.path.exists(state_path):
    fail(f"{out} already holds a run (train_state.pt). Continue it with --resume, or choose another --out.")
if args.demo and master and not os.path.isdir(os.path.join(data_root, "gta5")):
    print(f"writing the synthetic demo domains to {data_root} ...")
    data.make_demo_data(data_root, seed=0)
if ddp:
    dist.barrier()  # the demo data exist before any rank reads them
for warn, what in ((args.pretrained == "none", "--pretrained none: the MiT starts from random weights"),
                   (args.method == "ssr" and args.sam_weights == "none", "--sam-weights none: the SAM teacher is random")):
    if warn and master and not args.demo:
        warnings.warn(f"{what}; fine for tests, but this run will not reproduce the paper.", stacklevel=1)

torch.manual_seed(args.seed)  # the same initial weights on every rank (DDP also broadcasts them from rank 0)
ctx = torch.autocast(device.type, dtype=amp_dtype) if amp_dtype else nullcontext()
if master:
    os.makedirs(out, exist_ok=True)
    print(f"run {out}: {args.method}{' + mic' if args.mic else ''}, {args.backbone}, {world} x {device.type}, {args.amp}")

try:
    # -------------------------------------------------------------------------
    # models: the student segmentor, the UDA wrapper (EMA teacher, ImageNet copy, SSR branch), the SAM teacher

    cfg = ssr.SegConfig(backbone=args.backbone, mit=dict(mit_overrides), channels=channels)
    student = ssr.build_segmentor(cfg)
    if args.pretrained != "none":
        mit.load_weights(student.backbone, args.pretrained)
    student.backbone.grad_checkpoint = args.grad_checkpoint
    uda = ssr.UDA(student, method=args.method, mic=args.mic, ssr_stages=stages, sam_img_size=args.sam_img_size,
                  ignore_rows=ignore_rows)
    uda.to(device)
    sam = None
    if args.method == "ssr":
        sam = sam_encoder.frozen_teacher(args.sam, None if args.sam_weights == "none" else args.sam_weights,
                                         img_size=args.sam_img_size, device=device,
                                         dtype=amp_dtype or torch.float32, **sam_overrides)
    if args.compile:
        uda.compile_networks(sam)
    step = torch.nn.parallel.DistributedDataParallel(
        uda, device_ids=[device.index] if device.type == "cuda" else None) if ddp else uda

    # -------------------------------------------------------------------------
    # optimizer: AdamW as the paper's config. mmcv's paramwise_cfg matches names: 'head' -> lr x10,
    # 'norm' -> no weight decay (so the head's BatchNorms do decay, as in DAFormer). SSR modules: base lr.

    groups = {}
    for n, prm in uda.named_parameters():
        if not prm.requires_grad:
            continue  # the EMA teacher and the ImageNet copy are not trained
        lr_mult, wd = (10.0, 0.01) if "decode_head" in n else (1.0, 0.0 if "norm" in n else 0.01)
        groups.setdefault((lr_mult, wd), []).append(prm)
    # fused: one kernel per step instead of one per tensor and operation (bench.py item 5, MiT-B5 ssr on a CPU:
    # 9,994 -> 6 ops per step)
    optimizer = torch.optim.AdamW([dict(params=v, lr_mult=k[0], weight_decay=k[1]) for k, v in groups.items()],
                                  lr=args.lr, betas=(0.9, 0.999), fused=True)
    scaler = torch.amp.GradScaler(device.type, enabled=args.amp == "fp16")

    # -------------------------------------------------------------------------
    # resume, data

    start = 0
    if args.resume:
        state = torch.load(state_path, map_location="cpu", weights_only=True)
        uda.load_state_dict(state["uda"])
        optimizer.load_state_dict(state["optimizer"])
        scaler.load_state_dict(state["scaler"])
        start = state["iter"]
        if start >= args.iters:
            fail(f"the run in {out} finished already ({start} of {args.iters} iterations).")
        if master:
            print(f"resuming {out} at iteration {start}")
    if ddp and not master:
        dist.barrier()  # rank 0 computes and caches the rare class statistics first, once
    train_batches = data.make_train_loader(
        data_root, args.src, args.tgt, crop=args.crop, batch_size=args.batch_size, seed=args.seed, start_iter=start,
        workers=args.workers, rank=rank, world_size=world, src_scale=src_scale, tgt_scale=tgt_scale,
        rcs_min_pixels=rcs_min_pixels, pin_memory=device.type == "cuda")
    if ddp and master:
        dist.barrier()
    val_loader = data.make_val_loader(data_root, args.tgt, "val", scale=tgt_scale, batch_size=1,
                                      workers=args.workers) if master else None
    # Each rank its own random stream (mixing, jitter, drop path); a resumed run continues it where it stopped.
    torch.manual_seed(args.seed + rank)
    if args.resume:
        torch.set_rng_state(state["rng_cpu"])
        if device.type == "cuda":
            torch.cuda.set_rng_state(state["rng_cuda"][rank] if rank < len(state["rng_cuda"]) else state["rng_cuda"][0])
        del state

    def save() -> None:
        """The deployable model and the full training state, each written atomically (tmp file, then rename)."""
        rng_cuda = [torch.cuda.get_rng_state()] if device.type == "cuda" else []
        ssr.save_segmentor(student, model_path, dataset=args.tgt, test_scale=list(tgt_scale),
                           data_root=data_root, method=args.method, iters=it)
        state = dict(uda=uda.state_dict(), optimizer=optimizer.state_dict(), scaler=scaler.state_dict(), iter=it,
                     rng_cpu=torch.get_rng_state(), rng_cuda=rng_cuda, args=json.dumps(vars(args)))
        mit.save_atomic(state_path, lambda tmp: torch.save(state, tmp))

    def run_eval() -> float:
        result = evaluate(student, val_loader, device=device, amp_dtype=amp_dtype)
        print_table(result, data.CLASSES)
        return result["miou"]

    # SIGINT/SIGTERM finish the current iteration, save, and exit; a second Ctrl-C stops at once.
    stop = []
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda s, f: (stop.append(s), signal.signal(s, signal.SIG_DFL)))

    # -------------------------------------------------------------------------
    # the loop

    log = open(os.path.join(out, "log.jsonl"), "a") if master else None
    mious, bad, skipped, t0, it = [], 0, 0, time.time(), start
    while it < args.iters:
        batch = next(train_batches)
        src_img, src_lbl, tgt_img = (batch[k].to(device, non_blocking=True) for k in ("src_img", "src_lbl", "tgt_img"))
        for g in optimizer.param_groups:
            g["lr"] = get_lr(it) * g["lr_mult"]
        uda.train()
        with ctx:
            losses = step(src_img, src_lbl, tgt_img, it, sam=sam)
        loss = sum(losses.values())
        scaler.scale(loss).backward()  # always, so that DDP ranks stay in step even when one loss is bad
        # One small all-reduce tells every rank whether any rank saw a bad loss or a stop signal, so that all
        # skip the same steps and stop at the same iteration.
        flags = torch.tensor([not torch.isfinite(loss.detach()).item(), bool(stop)], device=device, dtype=torch.float32)
        if ddp:
            dist.all_reduce(flags, op=dist.ReduceOp.MAX)
        nonfinite, stopping = flags.tolist()
        if nonfinite:
            bad, skipped = bad + 1, skipped + 1
            if bad >= 10:
                kept = (f"The last checkpoint is {state_path}." if os.path.exists(state_path)
                        else "No checkpoint was written yet.")
                fail(f"the loss was not finite for 10 iterations in a row (at iteration {it}); lower --lr, "
                     f"or use --amp bf16/fp32 instead of fp16. {kept}")
        else:
            bad = 0
            scaler.step(optimizer)
            scaler.update()
        optimizer.zero_grad(set_to_none=True)
        it += 1

        if master and (it % args.log_every == 0 or it == args.iters):
            vals = {k: v.item() for k, v in losses.items()}
            speed = (it - start) / (time.time() - t0)
            eta = (args.iters - it) / speed
            mem = {"mem_gib": torch.cuda.max_memory_allocated(device) / 2**30} if device.type == "cuda" else {}  # peak so far
            print(f"iter {it}/{args.iters} " + " ".join(f"{k} {v:.4g}" for k, v in vals.items())
                  + f" lr {get_lr(it - 1):.2e} {speed:.2f} it/s eta {eta / 60:.0f} min"
                  + (f" skipped {skipped}" if skipped else "") + "".join(f" mem {v:.1f} GiB" for v in mem.values()),
                  flush=True)
            log.write(json.dumps(dict(iter=it, **vals, lr=get_lr(it - 1), it_s=speed, skipped=skipped, **mem)) + "\n")
            log.flush()
        last = it == args.iters
        if master and ((args.eval_every and it % args.eval_every == 0) or last):
            mious.append((it, run_eval()))
            log.write(json.dumps(dict(iter=it, miou=mious[-1][1])) + "\n")
            log.flush()
        if master and (it % args.save_every == 0 or last or stopping):
            save()
        if stopping:
            if master:
                print(f"stopped at iteration {it}; the state is saved in {out}: continue with --resume")
            sys.exit(130)

    if master:
        first, final = mious[0], mious[-1]
        print(f"done: {model_path}")
        print(f"target mIoU: {100 * final[1]:.2f} at iteration {final[0]} (first evaluation: {100 * first[1]:.2f} "
              f"at iteration {first[0]})")
    if ddp:
        # Every rank holds a full copy of the weights: they must agree, or the gradient averaging went wrong.
        flat = torch.cat([q.detach().double().flatten() for q in student.parameters()])
        sums = [torch.zeros(2, dtype=torch.float64, device=device) for _ in range(world)]
        dist.all_gather(sums, torch.stack([flat.sum(), flat.square().sum()]))
        if master:
            print(f"ranks agree on the weights: {all(torch.equal(s, sums[0]) for s in sums)}")
        dist.barrier()  # no rank tears the process group down while another still talks to it
        dist.destroy_process_group()
except (FileNotFoundError, ValueError) as e:  # bad weights files, datasets, flags: a message, not a traceback
    fail(str(e))
