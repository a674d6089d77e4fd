"""
Train a segmentor for unsupervised domain adaptation, GTA5 -> Cityscapes, with SSR, DAFormer or source only.

    python train.py --demo                                  # synthetic domains, tiny model, minutes on a CPU
    python train.py --src gta5 --tgt cityscapes --pretrained mit_b5.safetensors --sam-weights sam_vit_b.safetensors
    torchrun --nproc_per_node=4 train.py ...               # DistributedDataParallel, one process per GPU
    python train.py --demo --resume                         # continue a stopped run (its flags are the defaults)

Reads top to bottom: arguments, set-up, data, models, optimizer, one loop. The method itself (what one step
computes) lives in ssr.py; this file owns the optimizer, mixed precision, logging, checkpoints and resume.
"""
import os

# OpenMP threads that wait for work spin on their core for a while by default. Beside another busy process they
# spin on the cores that process needs, and both crawl. 20 demo iterations on a 2-core machine (load average 2-5)
# beside a process multiplying matrices: 0.18 it/s by default, 0.68 it/s with PASSIVE (1.62 it/s without that
# process); at a load average of 7-15 the default had not reached iteration 5 after 300 s. PASSIVE makes them
# sleep. It is set before torch loads its OpenMP runtime, which reads it once; the user's own setting wins.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import argparse  # noqa: E402 (after the OpenMP setting above)
import fcntl  # noqa: E402
import json  # noqa: E402
import signal  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
import warnings  # noqa: E402
from contextlib import nullcontext  # noqa: E402

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

import data  # noqa: E402
import demo  # noqa: E402
import mit  # noqa: E402
import sam_encoder  # noqa: E402
import ssr  # noqa: E402
from eval import debug_panel, evaluate, print_table, training_curves  # noqa: E402

# -----------------------------------------------------------------------------
# arguments

# The demo trains a tiny MiT from scratch, with demo.py's toy SAM teacher, on demo.py's synthetic domains; the
# method, the loop and the evaluator are the real code path. demo.CONFIG holds its fixed sizes, demo.FLAGS the
# defaults --demo sets (flags still override them).
DEMO, DEMO_FLAGS = demo.CONFIG, demo.FLAGS
# On --resume these must equal the saved run's: its weights, batches and random streams depend on them.
RUN_FLAGS = ("demo", "src", "tgt", "method", "mic", "backbone", "sam", "sam_img_size", "ssr_stages", "crop",
             "batch_size", "seed")


class HelpFormatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    """The docstring as written, and every flag's default in --help."""


p = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
p.add_argument("--src", default="gta5", choices=list(data.SOURCES), help="labelled source domain (folder under --data-root)")
p.add_argument("--tgt", default="cityscapes", choices=["cityscapes"], help="unlabelled target domain (folder under --data-root)")
p.add_argument("--data-root", default="data", help="folder holding gta5/ and cityscapes/ as downloaded")
p.add_argument("--method", default="ssr", choices=ssr.METHODS,
               help="ssr: DAFormer + SAM regularization; dacs: DAFormer (DACS + FD + RCS); source-only: no adaptation")
p.add_argument("--mic", action="store_true", help="add masked image consistency (MIC) on top of the method")
p.add_argument("--backbone", default="mit_b5", choices=list(mit.MIT_PRESETS), help="MiT encoder size")
p.add_argument("--pretrained", help="ImageNet MiT weights (.safetensors, see README), or 'none' for random init")
p.add_argument("--sam", default="vit_b", choices=list(sam_encoder.SAM_PRESETS), help="SAM image encoder size")
p.add_argument("--sam-weights", help="SAM weights (.safetensors), required for --method ssr; 'none' = random teacher (tests only)")
p.add_argument("--sam-img-size", type=int, default=1024, help="resolution the SAM teacher sees, a multiple of 16 (smaller = cheaper)")
p.add_argument("--ssr-stages", default="0,1,2,3", help="comma-separated MiT stages that SAM regularizes")
p.add_argument("--iters", type=int, default=40000, help="training iterations")
p.add_argument("--batch-size", type=int, default=2, help="source and target images per iteration and GPU")
p.add_argument("--crop", type=int, default=512, help="training crop size")
p.add_argument("--lr", type=float, default=6e-5, help="base learning rate (the head gets 10x)")
p.add_argument("--warmup", type=int, default=1500, help="linear warm-up iterations")
p.add_argument("--amp", choices=["bf16", "fp16", "fp32"], help="mixed precision; unset: bf16 where supported, else fp32")
p.add_argument("--seed", type=int, default=0, help="seed for weights, sampling and augmentation")
p.add_argument("--workers", type=int, default=min(8, os.cpu_count() or 1), help="data loader processes per GPU")
p.add_argument("--compile", action="store_true",
               help="torch.compile the networks, block by block (the first iterations compile)")
p.add_argument("--grad-checkpoint", action="store_true", help="recompute MiT blocks in backward to save memory")
p.add_argument("--out", help="run folder; unset: runs/<name>_seed<seed>")
p.add_argument("--log-every", type=int, default=50, help="print a progress line every N iterations (0 = at the end)")
p.add_argument("--eval-every", type=int, default=4000, help="evaluate on the target val set every N iterations (0 = at the end)")
p.add_argument("--save-every", type=int, default=4000,
               help="write checkpoints every N iterations (0 = at the end); also before each evaluation and on a stop")
p.add_argument("--debug-every", type=int, default=1000,
               help="write a debug panel to <out>/debug/iter_NNNNNN.png every N iterations (dacs, ssr; 0 = never)")
p.add_argument("--resume", action="store_true",
               help="continue from <out>/train_state.pt; flags not given take the saved run's values")
p.add_argument("--demo", action="store_true",
               help="generate synthetic domains (if absent) and train a tiny model on them, for --method ssr with "
                    "demo.py's toy SAM teacher (pretrained on first use): minutes on a CPU; sets the defaults "
                    + ", ".join(f"--{k.replace('_', '-')} {v}" for k, v in DEMO_FLAGS.items()))
if "--demo" in sys.argv[1:]:
    p.set_defaults(**DEMO_FLAGS)
args = p.parse_args()
if args.demo and args.method == "ssr" and args.sam_weights is None:
    args.sam_weights = demo.teacher_path()  # the toy teacher, pretrained below on first use

ddp = "RANK" in os.environ  # set by torchrun
rank, world = (int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])) if ddp else (0, 1)
master = rank == 0


def fail(msg: str) -> None:
    """Stop with a one-paragraph message and no traceback; under torchrun every rank stops, rank 0 alone prints."""
    sys.exit(f"error: {msg}" if master else 1)


class FlagError(ValueError):
    """A flag that cannot work (an --out that cannot be written or is in use), found after the set-up began."""


def run_folder(a: argparse.Namespace) -> str:
    name = "demo" if a.demo else f"{a.src}2{a.tgt}_{a.method}{'_mic' if a.mic else ''}_{a.backbone}"
    return a.out or os.path.join("runs", f"{name}_seed{a.seed}")  # two seeds never share a folder


def read_state(path: str) -> dict:
    """train_state.pt as save() writes it. torch.load raises many exception types for a truncated or foreign file
    (RuntimeError, UnpicklingError, EOFError, ...), so all are caught, around this one call."""
    if not os.path.exists(path):
        fail(f"--resume: there is no {path} to continue from. Check --out, or start a new run without --resume.")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        fail(f"--resume: cannot read {path} ({type(e).__name__}: {str(e).strip().splitlines()[0] if str(e) else ''}); "
             f"it is truncated or not a train_state.pt. The run cannot continue from it: start a new one in "
             f"another --out.")
    if not isinstance(state, dict) or not {"uda", "optimizer", "scaler", "iter", "rng", "args"} <= state.keys():
        fail(f"--resume: {path} is not a train_state.pt written by this train.py (it lacks the training state). "
             f"Start a new run in another --out.")
    return state


out = run_folder(args)
state_path, model_path = os.path.join(out, "train_state.pt"), os.path.join(out, "model.safetensors")
state = None
if args.resume:
    # The saved run's flags become the defaults; the flags given now override them, except those that would not
    # fit the saved state.
    state = read_state(state_path)
    saved = json.loads(state["args"])
    p.set_defaults(**{k: v for k, v in saved.items() if k not in ("out", "resume")})
    args = p.parse_args()
    differ = [f"--{k.replace('_', '-')} {getattr(args, k)} (saved: {saved[k]})" for k in RUN_FLAGS
              if getattr(args, k) != saved.get(k)]
    if differ:
        fail(f"--resume: {', '.join(differ)} contradict the run saved in {out}. Drop these flags (on --resume the "
             f"saved run's flags are the defaults), or start a new run in another --out.")
    if state["iter"] >= args.iters:
        fail(f"the run in {out} finished already ({state['iter']} of {args.iters} iterations); "
             f"pass a larger --iters to train further.")
args.out = out  # resolved, for config.json and the saved flags


def get_lr(it: int) -> float:
    """mmcv's poly schedule (power 1, to 0) with linear warm-up from 1e-6 of the rate, as the paper's config."""
    lr = args.lr * (1 - it / args.iters)
    if it < args.warmup:
        lr *= 1 - (1 - it / args.warmup) * (1 - 1e-6)
    return lr


stages = tuple(int(s) for s in args.ssr_stages.split(",") if s.strip().isdigit())
data_root = args.data_root
# The sizes: the demo's (demo.CONFIG), or the paper's, each taken from the file that owns it
if args.demo:
    seg_sizes, sam_overrides = dict(mit=DEMO["mit"], channels=DEMO["channels"]), DEMO["sam"]
    ignore_rows = DEMO["ignore_rows"]
    src_scale, tgt_scale, rcs_min_pixels = DEMO["src_scale"], DEMO["tgt_scale"], DEMO["rcs_min_pixels"]
else:
    seg_sizes, sam_overrides, ignore_rows = {}, {}, ssr.IGNORE_ROWS  # SegConfig's, SAM's presets, DAFormer's rows
    src_scale, rcs_min_pixels = data.SOURCES[args.src]["scale"], data.SOURCES[args.src]["rcs_min_pixels"]
    tgt_scale = data.TARGET_SCALE

# Every flag is checked here, before anything slow or anything written.
if args.pretrained is None:
    fail(f"--pretrained is required: pass the ImageNet MiT weights ({mit.DOWNLOAD}; see README) "
         "or --pretrained none for a random initialization (for tests only: it will not reach the paper's numbers).")
if args.method == "ssr" and args.sam_weights is None:
    fail(f"--method ssr needs the SAM teacher: pass --sam-weights PATH ({sam_encoder.DOWNLOAD}; see README), "
         "or --sam-weights none for a random teacher (tests and demo only).")
if args.method != "ssr" and args.sam_weights not in (None, "none"):
    fail(f"--sam-weights is only used by --method ssr, not by --method {args.method}: drop it or use --method ssr.")
if (len(stages) != len(args.ssr_stages.split(",")) or any(s not in range(4) for s in stages)
        or len(set(stages)) != len(stages)):
    fail(f"--ssr-stages {args.ssr_stages!r}: give distinct MiT stages among 0,1,2,3, e.g. --ssr-stages 0,1,2,3.")
if args.sam_img_size <= 0 or args.sam_img_size % 16:
    fail(f"--sam-img-size {args.sam_img_size}: SAM cuts its input into 16x16 patches, so give a positive multiple "
         f"of 16, e.g. 1024 (the paper) or 512.")
if args.crop <= 0 or args.crop % 32 or args.crop > min(src_scale[1], tgt_scale[1]):
    fail(f"--crop {args.crop}: the crop must be a positive multiple of 32 and at most the height the images are "
         f"resized to ({min(src_scale[1], tgt_scale[1])} px here), e.g. --crop 512.")
if args.iters <= 0 or args.batch_size <= 0:
    fail("--iters and --batch-size must be positive.")
if min(args.log_every, args.eval_every, args.save_every, args.debug_every, args.workers) < 0:
    fail("--log-every, --eval-every, --save-every, --debug-every and --workers cannot be negative (0 = at the end, "
         "or for --debug-every never, or for --workers, load in the main process).")
if os.path.exists(data_root) and not os.path.isdir(data_root):
    fail(f"--data-root {data_root} is a file; give the folder that holds gta5/ and cityscapes/"
         f"{' (the demo writes them there)' if args.demo else ''}.")


# -----------------------------------------------------------------------------
# set-up: devices, processes, seeds, precision, run folder

if ddp:
    local_rank = int(os.environ["LOCAL_RANK"])
    if torch.cuda.is_available():
        torch.cuda.set_device(local_rank)
    dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
device = torch.device(f"cuda:{torch.cuda.current_device()}" if torch.cuda.is_available() else "cpu")
# The shapes never change (crop, batch, SAM input): cuDNN times its convolution algorithms once and keeps the
# fastest, as mmseg's configs (cudnn_benchmark = True). It only reorders arithmetic on the GPU; the CPU is unaffected.
torch.backends.cudnn.benchmark = True
if args.amp is None:
    args.amp = "bf16" if device.type == "cuda" and torch.cuda.is_bf16_supported() else "fp32"
amp_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": None}[args.amp]
for warn, what in ((args.pretrained == "none", "--pretrained none: the MiT starts from random weights"),
                   (args.method == "ssr" and args.sam_weights == "none", "--sam-weights none: the SAM teacher is random")):
    if warn and master and not args.demo:
        warnings.warn(f"{what}; fine for tests, but this run will not reproduce the paper.", stacklevel=1)


def agree(*flags: bool) -> list[bool]:
    """Each flag, true on every rank if it is true on any rank (one small all-reduce), so that the ranks skip the
    same steps and stop at the same point: a rank left waiting for one that stopped alone would hang or crash."""
    if not ddp:
        return [bool(f) for f in flags]
    t = torch.tensor([float(bool(f)) for f in flags], device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return [bool(v) for v in t.tolist()]


def stop_everywhere(error: Exception | None, note: str = "") -> None:
    """Every rank raises the user errors met on any rank (found by agree); rank 0 prints them once."""
    msgs = [str(error) if error else None]
    if ddp:
        msgs = [None] * world
        dist.all_gather_object(msgs, str(error) if error else None)
    raise data.DatasetError(" ".join(dict.fromkeys(m for m in msgs if m)) + note)


def on_rank0(fn) -> None:
    """fn() on rank 0 while the other ranks wait; if it meets a user error, every rank stops."""
    error = None
    if master:
        try:
            fn()
        except (data.DatasetError, mit.WeightsError, FlagError) as e:
            error = e
    if agree(error is not None)[0]:
        stop_everywhere(error)


def claim_run_folder() -> None:
    """Create --out if needed and hold it for the run's whole life: an exclusive flock on <out>/.lock, which the OS
    releases when the process ends, however it ends (a kill included). A second run on the folder fails at once."""
    global lock
    d = os.path.abspath(out)
    while not os.path.exists(d):  # the folders this run makes, deepest first: a failed start removes them again
        made.append(d)
        d = os.path.dirname(d)
    try:
        os.makedirs(out, exist_ok=True)
        f = open(os.path.join(out, ".lock"), "a+")  # "a+": create, but never clobber the holder's pid
    except OSError as e:
        for d in made:  # what makedirs got to make, all empty
            if os.path.isdir(d):
                os.rmdir(d)
        raise FlagError(f"--out {out} cannot be written ({e.strerror}). Choose a folder you can write to.") from None
    try:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        f.seek(0)
        pid = f.read().strip() or "unknown"
        f.close()
        raise FlagError(f"{out} is in use by another run (pid {pid}). Wait for it to end or stop it, or choose "
                        f"another --out.") from None
    f.truncate(0)
    f.write(f"{os.getpid()}\n")
    f.flush()
    lock = f
    if not args.resume and os.path.exists(state_path):  # checked holding the lock: a running run says so first
        raise FlagError(f"{out} already holds a run (train_state.pt). Continue it with --resume, or choose another "
                        f"--out.")


def release_run_folder() -> None:
    """At exit: a folder this run made and left holding nothing but its lock is removed (a failed start leaves no
    empty run folder); then the lock is let go."""
    if lock is None:
        return
    if made and os.listdir(out) == [".lock"]:
        os.remove(os.path.join(out, ".lock"))
        for d in made:
            try:
                os.rmdir(d)
            except OSError:
                break
    lock.close()


lock, made = None, []
try:
    on_rank0(claim_run_folder)
    if master:
        print(f"run {out}: {args.method}{' + mic' if args.mic else ''}, {args.backbone}, {world} x {device.type}, {args.amp}")

    # -------------------------------------------------------------------------
    # data: every file checked from its header before the first iteration (a bad file is found now, not in hour 5)

    def prepare_data() -> None:
        if args.demo:
            demo.prepare(data_root, args.sam_weights)  # its domains and its toy teacher, each made once
        source = data.list_dataset(data_root, args.src, "train")
        data.check_samples(source, "train")
        data.check_samples(data.list_dataset(data_root, args.tgt, "train", need_labels=False), "train")
        data.check_samples(data.list_dataset(data_root, args.tgt, "val"), "val")
        data.class_pixel_counts(source)  # the rare class statistics, computed and cached once, before other ranks

    on_rank0(prepare_data)
    start = state["iter"] if state else 0
    train_batches = data.make_train_loader(
        data_root, args.src, args.tgt, crop=args.crop, batch_size=args.batch_size, seed=args.seed, start_iter=start,
        workers=args.workers, rank=rank, world_size=world, src_scale=src_scale, tgt_scale=tgt_scale,
        rcs_min_pixels=rcs_min_pixels, pin_memory=device.type == "cuda")
    val_loader = data.make_val_loader(data_root, args.tgt, "val", scale=tgt_scale, batch_size=1,
                                      workers=args.workers, pin_memory=device.type == "cuda") if master else None

    # -------------------------------------------------------------------------
    # models: the student segmentor, the UDA wrapper (EMA teacher, ImageNet copy, SSR branch), the SAM teacher

    torch.manual_seed(args.seed)  # the same initial weights on every rank (DDP also broadcasts them from rank 0)
    ctx = torch.autocast(device.type, dtype=amp_dtype) if amp_dtype else nullcontext()
    cfg = ssr.SegConfig(backbone=args.backbone, **seg_sizes)
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
    # resume: weights, optimizer, and each rank's own random stream (mixing, jitter, drop path)

    torch.manual_seed(args.seed + rank)
    if state:
        try:
            uda.load_state_dict(state["uda"])
            optimizer.load_state_dict(state["optimizer"])
        except (RuntimeError, ValueError) as e:  # strict loading: a state of another model or version
            raise mit.WeightsError(f"{state_path} does not fit this model: {str(e).splitlines()[0]} Start a new "
                                   f"run in another --out.") from None
        if scaler.is_enabled() and state["scaler"]:  # an fp16 run resumed in bf16/fp32 drops its loss scale
            scaler.load_state_dict(state["scaler"])
        if len(state["rng"]) == world:
            torch.set_rng_state(state["rng"][rank]["cpu"])
            if device.type == "cuda" and state["rng"][rank]["cuda"] is not None:
                torch.cuda.set_rng_state(state["rng"][rank]["cuda"])
        elif master:  # the batches still follow (seed, iteration, rank); only the augmentation streams restart
            print(f"note: the run was saved by {len(state['rng'])} processes and continues on {world}: each "
                  f"process's random stream restarts from --seed + rank, so it will not match an uninterrupted run.")
        del state
        if master:
            print(f"resuming {out} at iteration {start}")

    def save() -> None:
        """Every rank: its random state is gathered; rank 0 writes the deployable model and the full training
        state, each atomically (tmp file, then rename)."""
        rng = dict(cpu=torch.get_rng_state(), cuda=torch.cuda.get_rng_state() if device.type == "cuda" else None)
        rngs = [rng]
        if ddp:
            rngs = [None] * world
            dist.all_gather_object(rngs, rng)
        if not master:
            return
        ssr.save_segmentor(student, model_path, dataset=args.tgt, source=args.src, test_scale=list(tgt_scale),
                           data_root=data_root, method=args.method, iters=it)
        state = dict(uda=uda.state_dict(), optimizer=optimizer.state_dict(), scaler=scaler.state_dict(), iter=it,
                     rng=rngs, args=json.dumps(vars(args)))
        data.save_atomic(state_path, lambda tmp: torch.save(state, tmp))

    def save_picture(picture, path: str) -> None:
        data.save_atomic(path, lambda tmp: picture.save(tmp, format="PNG"))

    def write_config(tmp: str) -> None:
        with open(tmp, "w") as f:
            json.dump(vars(args), f, indent=1)

    def read_log() -> list[dict]:
        """log.jsonl's records; a line cut short (by a power loss, say) is left out."""
        records = []
        with open(log.name) as f:
            for line in f:
                try:
                    records.append(json.loads(line))
                except json.JSONDecodeError:
                    pass
        return records

    def saved_in(it: int) -> str:
        return f" The state at iteration {it} is saved in {state_path}: fix this, then continue with --resume."

    def run_eval() -> float:
        result = evaluate(student, val_loader, device=device, amp_dtype=amp_dtype)
        return print_table(result, data.CLASSES, args.src)  # the headline mean: mIoU16 for SYNTHIA

    def next_batch() -> tuple[dict | None, data.DatasetError | None]:
        """This rank's next batch, or the error met reading it (which every rank must learn of: see the loop)."""
        try:
            return next(train_batches), None
        except data.DatasetError as e:
            return None, e

    # SIGINT/SIGTERM finish the current iteration, save, and exit; a second Ctrl-C stops at once.
    stop = []
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda s, f: (stop.append(s), signal.signal(s, signal.SIG_DFL)))

    # -------------------------------------------------------------------------
    # the loop

    batch, data_error = next_batch()
    if agree(data_error is not None)[0]:
        stop_everywhere(data_error)
    if master:
        data.save_atomic(os.path.join(out, "config.json"), write_config)  # every flag's value, defaults included
    log = open(os.path.join(out, "log.jsonl"), "a") if master else None
    if master and start:
        log.write(json.dumps(dict(resume=start)) + "\n")  # the lines of later iterations that follow replace these
    mious, bad, skipped, t0, it = [], 0, 0, time.time(), start
    totals, counted = {}, 0  # loss sums over the logging interval, on the device (no sync per iteration)
    # Once, not per iteration (a walk over every module: 11 ms for MiT-B5's UDA on the CPU); evaluate() puts the
    # student back in training mode itself.
    uda.train()
    while it < args.iters:
        src_img, src_lbl, tgt_img = (batch[k].to(device, non_blocking=True) for k in ("src_img", "src_lbl", "tgt_img"))
        for g in optimizer.param_groups:
            g["lr"] = get_lr(it) * g["lr_mult"]
        drawing = master and args.method != "source-only" and args.debug_every and (it + 1) % args.debug_every == 0
        uda.keep_pictures = bool(drawing)  # the forward keeps its tensors for a debug panel
        with ctx:
            losses = step(src_img, src_lbl, tgt_img, it, sam=sam)
        loss = sum(losses.values())
        scaler.scale(loss).backward()  # always, so that DDP ranks stay in step even when one loss is bad
        # The next batch is read now, so that the one small all-reduce below tells every rank whether any rank saw
        # a bad loss, a stop signal or a data error: all skip the same steps and stop at the same iteration.
        batch, data_error = next_batch() if it + 1 < args.iters else (None, None)
        nonfinite, stopping, data_failed = agree(not torch.isfinite(loss.detach()).item(), stop, data_error)
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
            totals, counted = {k: totals.get(k, 0) + v.detach() for k, v in losses.items()}, counted + 1
        optimizer.zero_grad(set_to_none=True)
        it += 1
        if uda.keep_pictures:
            os.makedirs(os.path.join(out, "debug"), exist_ok=True)
            save_picture(debug_panel(uda.pictures), os.path.join(out, "debug", f"iter_{it:06d}.png"))
            uda.keep_pictures, uda.pictures = False, None

        last = it == args.iters
        if master and ((args.log_every and it % args.log_every == 0) or last):
            # the losses averaged over the interval's (finite) iterations, as mmseg logs them
            vals = {k: (v / counted).item() for k, v in totals.items()} if counted else {
                k: v.item() for k, v in losses.items()}
            totals, counted = {}, 0
            elapsed = time.time() - t0  # of this process: a resumed run counts from its resume
            speed = (it - start) / elapsed
            eta = (args.iters - it) / speed
            mem = {"mem_gib": torch.cuda.max_memory_allocated(device) / 2**30} if device.type == "cuda" else {}  # peak so far
            print(f"iter {it}/{args.iters} " + " ".join(f"{k} {v:.4g}" for k, v in vals.items())
                  + f" lr {get_lr(it - 1):.2e} {speed:.2f} it/s elapsed {elapsed / 60:.1f} min eta {eta / 60:.0f} min"
                  + (f" skipped {skipped}" if skipped else "") + "".join(f" mem {v:.1f} GiB" for v in mem.values()),
                  flush=True)
            log.write(json.dumps(dict(iter=it, **vals, lr=get_lr(it - 1), it_s=speed, elapsed_s=elapsed,
                                      skipped=skipped, **mem)) + "\n")
            log.flush()
        evaluating = (args.eval_every and it % args.eval_every == 0) or last
        if (args.save_every and it % args.save_every == 0) or evaluating or stopping or data_failed:
            save()  # before evaluating: an evaluation that fails loses nothing
        if data_failed:
            stop_everywhere(data_error, saved_in(it))
        if evaluating:
            eval_error = None
            if master:
                try:
                    mious.append((it, run_eval()))
                    log.write(json.dumps(dict(iter=it, miou=mious[-1][1])) + "\n")
                    log.flush()
                    save_picture(training_curves(read_log()), os.path.join(out, "curves.png"))
                except data.DatasetError as e:
                    eval_error = e
            if agree(eval_error is not None)[0]:
                stop_everywhere(eval_error, saved_in(it))
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
        # DDP's reducer holds the group: free it first, so the group is not torn down under a live user (the
        # suspected cause of a rank aborting, "terminate called without an active exception", in one loaded test
        # run of about six; not reproduced since)
        del step
        dist.destroy_process_group()
except (data.DatasetError, mit.WeightsError, FlagError) as e:  # bad data, weights, flags: a message, no traceback
    fail(str(e))
finally:
    release_run_folder()
