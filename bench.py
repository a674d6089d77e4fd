"""
Speed and memory of ssr's models, measured side by side with the reference implementations in one run.

    python bench.py                                   # all items at the paper's sizes, fp32, on cuda if present
    python bench.py --dtype bf16 --items 1,3          # GPU target: our bf16 SAM vs official fp32; SSR vs DACS
    python bench.py --items 2 --crop 256 --batch-size 1 --repeats 5    # a quick MiT check on a CPU
    python bench.py --tiny --repeats 1 --warmup 0     # tiny configs, seconds (the smoke test)

Items (ours / reference in the ratio column):
  1. SAM image encoder forward, batch 1: sam_encoder.SamEncoder vs segment_anything's ImageEncoderViT with the
     same (random) weights. With --dtype bf16/fp16 ours runs in that dtype and the official one stays fp32 (as the
     frozen teacher is used in training).
  2. MiT forward + backward: mit.MixVisionTransformer vs transformers' SegformerModel, same weights, both under
     autocast when --dtype is bf16/fp16.
  3. One training iteration (UDA forward, backward, AdamW step): method 'ssr' vs method 'dacs'; the ratio is the
     cost of the SAM regularizer. The SAM teacher runs in the reduced dtype.
  4. Evaluation throughput of the deployable Segmentor (forward, resize to the input, argmax) in images/s.

Time: the median of --repeats calls after --warmup calls; items 1 and 2 interleave ours and the reference call by
call, so that load from other processes hits both alike. Memory, from one more call per model:
  cuda: torch.cuda.max_memory_allocated() after reset_peak_memory_stats(), i.e. everything allocated at the peak
        (weights, gradients and optimizer state included);
  cpu:  the growth of the peak resident set (VmHWM) over the resident set just before the call, after freed heap
        memory is returned to the system (malloc_trim) and the peak is reset (/proc/self/clear_refs). Weights and
        optimizer state are resident before the call and not counted: the figure is the memory the call itself
        takes (activations, and gradients, which are set to None between steps as optimizer.zero_grad does).
Weights are random (nothing is downloaded): speed does not depend on their values.

On a CPU that other processes also use, run with OMP_WAIT_POLICY=PASSIVE (or OMP_NUM_THREADS=1): OpenMP threads
that spin while a sibling thread is descheduled made MiT's fwd+bwd 30x slower on a busy 2-core machine.
"""
import argparse
import contextlib
import ctypes
import gc
import importlib.util
import os
import pathlib
import statistics
import sys
import tempfile
import time
import types
from functools import partial

import torch
import torch.nn.functional as F
from safetensors.torch import save_file

import mit
import sam_encoder


def size_wxh(text: str) -> tuple[int, int]:
    try:
        w, h = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not WIDTHxHEIGHT, e.g. 1024x512") from None
    return w, h


p = argparse.ArgumentParser(description=__doc__.split("\n")[1], formatter_class=argparse.RawDescriptionHelpFormatter)
p.add_argument("--items", default="1,2,3,4", help="comma-separated items to run (see above)")
p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="cpu, cuda, cuda:1, ...")
p.add_argument("--dtype", default="fp32", choices=["fp32", "bf16", "fp16"],
               help="precision of ours (item 1), of both sides under autocast (items 2-4)")
p.add_argument("--compile", action="store_true", help="torch.compile every model measured (compiled in warm-up; "
               "item 3 compiles the networks, as train.py --compile)")
p.add_argument("--repeats", type=int, default=None, help="timed calls per model (default 10, 3 on cpu)")
p.add_argument("--warmup", type=int, default=None, help="untimed calls first (default 3, 1 on cpu)")
p.add_argument("--sam-size", type=int, default=None, help="SAM input side (default 1024)")
p.add_argument("--crop", type=int, default=None, help="training crop side for items 2 and 3 (default 512)")
p.add_argument("--batch-size", type=int, default=None, help="batch of items 2 and 3 (default 2)")
p.add_argument("--eval-size", type=size_wxh, default=None, help="WxH of the evaluation images of item 4 (default 1024x512)")
p.add_argument("--eval-batch", type=int, default=1, help="batch of item 4")
p.add_argument("--grad-checkpoint", action="store_true", help="item 3: recompute the student's MiT blocks in backward")
p.add_argument("--tiny", action="store_true", help="tiny models and sizes for every item (seconds on a CPU)")
args = p.parse_args()

device = torch.device(args.device)
cuda = device.type == "cuda"
amp_dtype = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}[args.dtype]
autocast = (lambda: torch.autocast(device.type, dtype=amp_dtype)) if amp_dtype else contextlib.nullcontext
repeats = args.repeats if args.repeats is not None else (10 if cuda else 3)
warmup = args.warmup if args.warmup is not None else (3 if cuda else 1)
if args.compile:
    warmup = max(warmup, 1)  # the first call compiles: never time it
items = set(args.items.split(","))
if not items <= {"1", "2", "3", "4"}:
    sys.exit(f"error: --items {args.items}: choose among 1,2,3,4 (comma-separated).")

# The paper's sizes, or tiny ones (the tiny models are those of the tests: heads stay (1, 2, 5, 8) / 2).
if args.tiny:
    mit_name, mit_overrides = "mit_b0", dict(embed_dims=(16, 32, 40, 64), depths=(1, 1, 1, 1))
    sam_overrides = dict(embed_dim=32, depth=2, num_heads=2, global_attn_indexes=(1,), window_size=3)
    sizes = dict(sam=64, crop=64, batch=2, eval=(128, 64), channels=32)
else:
    mit_name, mit_overrides, sam_overrides = "mit_b5", {}, {}
    sizes = dict(sam=1024, crop=512, batch=2, eval=(1024, 512), channels=256)
sam_size = args.sam_size or sizes["sam"]
crop = args.crop or sizes["crop"]
batch_size = args.batch_size or sizes["batch"]
eval_w, eval_h = args.eval_size or sizes["eval"]

# ------------------------------------------------------------------------------------------------------------------
# measuring

# cpu memory needs glibc's malloc_trim and a writable /proc/self/clear_refs (Linux); elsewhere it reads nan
libc = ctypes.CDLL(None) if sys.platform == "linux" else None
if libc is not None and not (hasattr(libc, "malloc_trim") and os.access("/proc/self/clear_refs", os.W_OK)):
    libc = None


def sync() -> None:
    if cuda:
        torch.cuda.synchronize(device)


def proc_status_mib(field: str) -> float:
    with open("/proc/self/status") as f:
        line = next(line for line in f if line.startswith(field + ":"))
    return int(line.split()[1]) / 1024  # the kernel reports kB


def reset_peak() -> float:
    """Start a peak-memory window; returns the baseline (MiB) that peak_mib subtracts on cpu."""
    gc.collect()
    if cuda:
        torch.cuda.reset_peak_memory_stats(device)
        return 0.0
    if libc is None:
        return float("nan")
    libc.malloc_trim(0)  # hand freed heap pages back, or the call would reuse them unseen
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # resets VmHWM to the current resident set
    return proc_status_mib("VmRSS")


def peak_mib(base: float) -> float:
    if cuda:
        return torch.cuda.max_memory_allocated(device) / 2**20
    return proc_status_mib("VmHWM") - base if libc is not None else float("nan")


def measure(fns: dict, n_repeats: int, n_warmup: int) -> dict[str, tuple[float, float]]:
    """{name: fn() -> None} -> {name: (median seconds per call, peak MiB of one more call)}. The functions are
    called in turn (a, b, a, b, ...), so that a slow spell of the machine hits every one of them. Memory is taken
    in a separate call: on cpu, handing the freed heap back before it (see reset_peak) makes the call fault its
    pages in afresh, which would slow the timed calls down."""
    for _ in range(n_warmup):
        for fn in fns.values():
            fn()
    times = {name: [] for name in fns}
    for _ in range(n_repeats):
        for name, fn in fns.items():
            sync()
            t0 = time.perf_counter()
            fn()
            sync()
            times[name].append(time.perf_counter() - t0)
    peaks = {}
    for name, fn in fns.items():
        base = reset_peak()
        fn()
        sync()
        peaks[name] = peak_mib(base)
    return {name: (statistics.median(times[name]), peaks[name]) for name in fns}


def maybe_compile(model):
    return torch.compile(model) if args.compile else model


def randomize_(model: torch.nn.Module) -> None:
    """Every tensor random: the default inits leave norms at 1 and biases and position tables at 0, which would
    hide a swapped or dropped tensor in the agreement check. Scaled for activations near unit variance."""
    with torch.no_grad():
        for name, prm in model.named_parameters():
            scale = 0.5 if prm.ndim == 1 or name.endswith("pos_embed") else prm[0].numel() ** -0.5
            prm.copy_(torch.randn_like(prm) * scale)


def max_diff(ours, ref) -> str:
    diff = max((o.float() - r.float()).abs().max().item() for o, r in zip(ours, ref))
    return f"max|diff| {diff:.1e} (max|ref| {max(r.abs().max().item() for r in ref):.1f})"


class Skip(Exception):
    """An item that cannot run here (a reference package or a project file is missing)."""


rows = []  # (item, ours, reference, (t, mem) of ours, (t, mem) of the reference or None, note)

# ------------------------------------------------------------------------------------------------------------------
# 1. SAM image encoder forward


def official_sam_encoder_class():
    """segment_anything's ImageEncoderViT without importing the package (its __init__ pulls in torchvision): the
    modeling subpackage is loaded by path under a stub parent package."""
    spec = importlib.util.find_spec("segment_anything")
    if spec is None:
        raise Skip("segment_anything is not installed (pip install segment-anything)")
    root = pathlib.Path(spec.submodule_search_locations[0])
    if "segment_anything" not in sys.modules:
        parent = types.ModuleType("segment_anything")
        parent.__path__ = [str(root)]
        sys.modules["segment_anything"] = parent
    name = "segment_anything.modeling"
    if name not in sys.modules:
        mspec = importlib.util.spec_from_file_location(name, root / "modeling" / "__init__.py",
                                                       submodule_search_locations=[str(root / "modeling")])
        module = importlib.util.module_from_spec(mspec)
        sys.modules[name] = module
        mspec.loader.exec_module(module)
    return sys.modules[name].ImageEncoderViT


def bench_sam() -> None:
    ImageEncoderViT = official_sam_encoder_class()
    ours = sam_encoder.build_sam_encoder("vit_b", img_size=sam_size, **sam_overrides).eval()
    c = ours.cfg
    ref = ImageEncoderViT(img_size=c.img_size, patch_size=c.patch_size, embed_dim=c.embed_dim, depth=c.depth,
                          num_heads=c.num_heads, mlp_ratio=c.mlp_ratio, out_chans=c.out_chans, qkv_bias=True,
                          norm_layer=partial(torch.nn.LayerNorm, eps=1e-6), use_rel_pos=True,
                          window_size=c.window_size, global_attn_indexes=c.global_attn_indexes).eval()
    torch.manual_seed(0)
    randomize_(ref)
    with tempfile.TemporaryDirectory() as tmp:  # through the public loader, as a user's official weights would go
        path = os.path.join(tmp, "sam.safetensors")
        save_file({k: v.contiguous() for k, v in ref.state_dict().items()}, path)
        sam_encoder.load_weights(ours, path)
    ours.to(device, amp_dtype or torch.float32)  # as sam_encoder.frozen_teacher: the whole teacher in the dtype
    ref.to(device)  # the official encoder in fp32, the baseline of the targets
    x = torch.randn(1, 3, sam_size, sam_size, device=device)
    with torch.no_grad():
        note = max_diff([ours(x)], [ref(x)])
    ours_c, ref_c = maybe_compile(ours), maybe_compile(ref)

    def run(model):
        def fn():
            with torch.no_grad():
                model(x)
        return fn

    r = measure({"ours": run(ours_c), "ref": run(ref_c)}, repeats, warmup)
    rows.append((f"1 SAM {'ViT-B' if not args.tiny else 'tiny'} fwd {sam_size}px b1",
                 f"ours {args.dtype}", "official fp32", r["ours"], r["ref"], note))


# ------------------------------------------------------------------------------------------------------------------
# 2. MiT forward + backward


def bench_mit() -> None:
    try:
        from transformers import SegformerConfig, SegformerModel
        from transformers.utils.logging import disable_progress_bar
    except ImportError:
        raise Skip("transformers is not installed (pip install transformers)") from None
    disable_progress_bar()  # save_pretrained's bar would land in the table
    ours = mit.build_mit(mit_name, **mit_overrides)
    c = ours.cfg
    cfg = SegformerConfig(hidden_sizes=list(c.embed_dims), depths=list(c.depths), num_attention_heads=list(c.num_heads),
                          sr_ratios=list(c.sr_ratios), mlp_ratios=[c.mlp_ratio] * 4, drop_path_rate=c.drop_path_rate)
    torch.manual_seed(0)
    ref = SegformerModel(cfg)
    randomize_(ref)
    # NVlabs (and so mit.py) uses LayerNorm eps 1e-6 in the blocks and stage norms, transformers 1e-5: give the
    # reference the official value so the agreement check is tight (it costs nothing).
    for name, m in ref.named_modules():
        if isinstance(m, torch.nn.LayerNorm) and "patch_embeddings" not in name and "attention" not in name:
            m.eps = mit.BLOCK_EPS
    with tempfile.TemporaryDirectory() as tmp:  # the hub's layout: transformers renames its modules on save
        ref.save_pretrained(tmp)
        mit.load_weights(ours, os.path.join(tmp, "model.safetensors"))
    ours.to(device)
    ref.to(device)

    def ref_forward(x):
        return ref(pixel_values=x, output_hidden_states=True).hidden_states  # the 4 stage maps, as ours

    x = torch.randn(batch_size, 3, crop, crop, device=device)
    ours.eval(), ref.eval()
    with torch.no_grad(), autocast():
        note = max_diff(ours(x), ref_forward(x))
    ours.train(), ref.train()  # as in training: stochastic depth on
    ours_c, ref_c = maybe_compile(ours), maybe_compile(ref_forward)

    def run(model, forward):
        def fn():
            model.zero_grad(set_to_none=True)  # as optimizer.zero_grad(): gradients are allocated in every call
            with autocast():
                loss = sum(o.float().mean() for o in forward(x))
            loss.backward()
        return fn

    r = measure({"ours": run(ours, ours_c), "ref": run(ref, ref_c)}, repeats, warmup)
    rows.append((f"2 MiT-{'B5' if not args.tiny else 'tiny'} fwd+bwd {crop}px b{batch_size}",
                 f"ours {args.dtype}", f"transformers {args.dtype}", r["ours"], r["ref"], note))


# ------------------------------------------------------------------------------------------------------------------
# 3. one training iteration, SSR vs DACS


def import_ssr():
    try:
        import ssr
    except ImportError as e:
        raise Skip(f"ssr.py cannot be imported ({e})") from None
    return ssr


def time_train_iter(ssr, method, src, lbl, tgt, scaler):
    """Time one optimizer step of `method`. Its models live only in this call: building both UDA models at
    once would double the resident memory at B5."""
    cfg = ssr.SegConfig(backbone=mit_name, mit=dict(mit_overrides), channels=sizes["channels"])
    student = ssr.build_segmentor(cfg)
    student.backbone.grad_checkpoint = args.grad_checkpoint
    uda = ssr.UDA(student, method=method, sam_img_size=sam_size).to(device).train()
    sam = None
    if method == "ssr":  # a random teacher: its speed does not depend on its weights
        sam = sam_encoder.frozen_teacher("vit_b", None, img_size=sam_size, device=device,
                                         dtype=amp_dtype or torch.float32, **sam_overrides)
    optimizer = torch.optim.AdamW([q for q in uda.parameters() if q.requires_grad], lr=6e-5, weight_decay=0.01)
    if args.compile:  # as train.py --compile: the networks, not the step
        uda.compile_networks(sam)
    it = [0]

    def fn():
        with autocast():
            losses = uda(src, lbl, tgt, it[0], sam=sam)
        scaler.scale(sum(losses.values())).backward()
        scaler.step(optimizer)
        scaler.update()
        optimizer.zero_grad(set_to_none=True)
        it[0] += 1

    return measure({method: fn}, repeats, warmup)[method]


def bench_train() -> None:
    ssr = import_ssr()
    torch.manual_seed(0)
    src = torch.randn(batch_size, 3, crop, crop, device=device)
    tgt = torch.randn(batch_size, 3, crop, crop, device=device)
    lbl = torch.randint(0, 19, (batch_size, crop, crop), device=device)
    lbl[:, : crop // 8] = 255  # some ignored pixels, as in GTA5 labels
    scaler = torch.amp.GradScaler(device.type, enabled=amp_dtype == torch.float16)
    result = {method: time_train_iter(ssr, method, src, lbl, tgt, scaler) for method in ("dacs", "ssr")}
    rows.append((f"3 train iter {'MiT-B5' if not args.tiny else 'tiny'} crop {crop} b{batch_size} SAM {sam_size}"
                 f"{' ckpt' if args.grad_checkpoint else ''}",
                 "ssr", "dacs", result["ssr"], result["dacs"], f"{args.dtype}"))


# ------------------------------------------------------------------------------------------------------------------
# 4. evaluation throughput


def bench_eval() -> None:
    ssr = import_ssr()
    model = ssr.build_segmentor(ssr.SegConfig(backbone=mit_name, mit=dict(mit_overrides), channels=sizes["channels"]))
    model = maybe_compile(model.to(device).eval())
    x = torch.randn(args.eval_batch, 3, eval_h, eval_w, device=device)

    def fn():
        with torch.inference_mode(), autocast():
            logits = F.interpolate(model(x).float(), size=x.shape[2:], mode="bilinear", align_corners=False)
            logits.argmax(1)

    r = measure({"ours": fn}, repeats, warmup)
    rows.append((f"4 eval {'MiT-B5' if not args.tiny else 'tiny'} {eval_w}x{eval_h} b{args.eval_batch}", f"ours {args.dtype}", "-", r["ours"],
                 None, f"{args.eval_batch / r['ours'][0]:.2f} images/s"))


# ------------------------------------------------------------------------------------------------------------------
# run and report

benches = {"1": bench_sam, "2": bench_mit, "3": bench_train, "4": bench_eval}
name = torch.cuda.get_device_name(device) if cuda else (
    f"cpu, {torch.get_num_threads()} threads, OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY', 'unset')}")
print(f"device {device} ({name}), torch {torch.__version__}, dtype {args.dtype}, compile {args.compile}, "
      f"median of {repeats} after {warmup} warm-up")
for i in sorted(items):
    try:
        benches[i]()
    except Skip as e:
        print(f"item {i} skipped: {e}")

mem_what = "peak alloc" if cuda else "peak RSS growth"
header = ("item", "ours", "reference", "ours ms", "ref ms", "time ratio", "ours MiB", "ref MiB", "mem ratio", "note")
table = [header]
for item, ours_name, ref_name, (t, m), ref, note in rows:
    rt, rm = ref if ref else (float("nan"), float("nan"))
    table.append((item, ours_name, ref_name, f"{t * 1e3:.1f}", f"{rt * 1e3:.1f}" if ref else "-",
                  f"{t / rt:.2f}" if ref else "-", f"{m:.0f}", f"{rm:.0f}" if ref else "-",
                  f"{m / rm:.2f}" if ref and rm > 0 else "-", note))
widths = [max(len(r[j]) for r in table) for j in range(len(header))]
print(f"\nmemory: {mem_what} (see the docstring); ratio = ours / reference")
for r in table:
    print("  ".join(s.ljust(w) for s, w in zip(r, widths)).rstrip())
