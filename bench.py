"""
Speed and memory of ssr's models, measured side by side with the reference implementations in one run.

    python bench.py                                   # all items at the paper's sizes, fp32, on cuda if present
    python bench.py --dtype bf16 --items 1,3          # GPU target: our bf16 SAM vs official fp32; SSR vs DACS
    python bench.py --items 2 --crop 256 --batch-size 1 --repeats 5    # a quick MiT check on a CPU
    python bench.py --items 5 --dtype bf16            # kernel-launching ops of one ssr step (crop 128, SAM 256)
    python bench.py --suite gpu --baseline ../old    # every GPU figure of the README in one call (~9 min)
    python bench.py --items 3 --mic --profile --dtype bf16    # where an iteration's time goes
    python bench.py --tiny --repeats 1 --warmup 0     # tiny configs, seconds (the smoke test)

Items (ours / reference in the ratio column):
  1. SAM image encoder forward, batch 1: sam_encoder.SamEncoder vs segment_anything's ImageEncoderViT with the
     same (random) weights. With --dtype bf16/fp16 ours runs in that dtype and the official one stays fp32 (as the
     frozen teacher is used in training).
  2. MiT forward + backward: mit.MixVisionTransformer vs transformers' SegformerModel, same weights, both under
     autocast when --dtype is bf16/fp16.
  3. One training iteration (UDA forward, backward, AdamW step): method 'ssr' vs method 'dacs'; the ratio is the
     cost of the SAM regularizer. The SAM teacher runs in the reduced dtype. --mic adds masked image consistency
     (train.py --mic); --profile prints a torch.profiler table of the ssr iteration and how much of it the device
     (the CPU, without one) is busy.
  4. Evaluation throughput of the deployable Segmentor (forward, resize to the input, argmax) in images/s; with
     --dtype bf16/fp16 its weights are cast once (ssr.cast_once), as eval.py --amp does.
  5. The aten ops of one 'ssr' training step's forward and backward, views excluded (VIEW_OPS): on a GPU each is
     a kernel launch, so the count is the launch overhead that a CPU can measure. Beside it: the optimizer step's
     ops and the time of a whole step. Default sizes: MiT-B5, crop 128, batch 2, SAM ViT-B at 256.
  6. Item 3's ssr iteration with the networks compiled (implies --compile; --compile-mode picks the mode): the
     first two iterations (compilation) timed apart from the steady state.

--suite gpu takes every GPU figure of the README in one call, each measurement in its own process under its own
time limit, printed as soon as it is taken, in this order: train.py --method ssr --mic as a user runs it (loader
workers and all) on synthetic PNG files of GTA5's and Cityscapes' sizes, from random weights, the steady rate read
from log.jsonl; eval.py over 500 Cityscapes-sized val files (2048x1024) from the command's start to its end; items
3 (with --mic and --profile) and 5 in eager bf16, and item 3 of --baseline DIR (an older checkout) in the same
call; train.py --method dacs; eval.py --amp bf16; train.py --compile; item 6 in each torch.compile mode; item 3
in fp32. It starts no new measurement after --budget seconds.

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
import collections
import contextlib
import ctypes
import gc
import importlib.util
import json
import os
import pathlib
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import types
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from torch.utils._python_dispatch import TorchDispatchMode

import mit
import sam_encoder


class Skip(Exception):
    """An item that cannot run here (a reference package or a project file is missing)."""


# ------------------------------------------------------------------------------------------------------------------
# the references, with random weights (also used by the tests)


def official_sam_modeling() -> types.ModuleType:
    """segment_anything.modeling without importing the package (its __init__ pulls in torchvision): the modeling
    subpackage is loaded by path under a stub parent package, so its relative imports resolve."""
    name = "segment_anything.modeling"
    if name not in sys.modules:
        spec = importlib.util.find_spec("segment_anything")
        if spec is None:
            raise Skip("segment_anything is not installed (pip install segment-anything)")
        root = pathlib.Path(spec.submodule_search_locations[0])
        if "segment_anything" not in sys.modules:
            parent = types.ModuleType("segment_anything")
            parent.__path__ = [str(root)]
            sys.modules["segment_anything"] = parent
        mspec = importlib.util.spec_from_file_location(name, root / "modeling" / "__init__.py",
                                                       submodule_search_locations=[str(root / "modeling")])
        module = importlib.util.module_from_spec(mspec)
        sys.modules[name] = module
        mspec.loader.exec_module(module)
    return sys.modules[name]


def official_sam_encoder(c: sam_encoder.SamConfig) -> torch.nn.Module:
    """segment_anything's ImageEncoderViT of config c, built as its sam_model_registry builds it."""
    return official_sam_modeling().ImageEncoderViT(
        img_size=c.img_size, patch_size=c.patch_size, embed_dim=c.embed_dim, depth=c.depth, num_heads=c.num_heads,
        mlp_ratio=c.mlp_ratio, out_chans=c.out_chans, qkv_bias=True, use_rel_pos=True, window_size=c.window_size,
        global_attn_indexes=c.global_attn_indexes,
        norm_layer=lambda dim: torch.nn.LayerNorm(dim, eps=sam_encoder.LN_EPS))


def randomize_(model: torch.nn.Module) -> None:
    """Every tensor random: the default inits leave norms at 1 and biases and position tables at 0, which would
    hide a swapped or dropped tensor in the agreement check. Scaled for activations near unit variance."""
    with torch.no_grad():
        for name, prm in model.named_parameters():
            scale = 0.5 if prm.ndim == 1 or name.endswith("pos_embed") else prm[0].numel() ** -0.5
            prm.copy_(torch.randn_like(prm) * scale)


def official_eps_(segformer: torch.nn.Module) -> torch.nn.Module:
    """NVlabs (and so mit.py) uses LayerNorm eps 1e-6 in the blocks and stage norms, transformers 1e-5: give a
    transformers SegFormer the official value there (its patch-embedding and spatial-reduction norms keep 1e-5 in
    both), so that agreement checks can be tight."""
    for name, m in segformer.named_modules():
        if isinstance(m, torch.nn.LayerNorm) and "patch_embeddings" not in name and "attention" not in name:
            m.eps = mit.BLOCK_EPS
    return segformer


def max_diff(ours, ref) -> str:
    diff = max((o.float() - r.float()).abs().max().item() for o, r in zip(ours, ref))
    return f"max|diff| {diff:.1e} (max|ref| {max(r.abs().max().item() for r in ref):.1f})"


# ------------------------------------------------------------------------------------------------------------------
# what one run measures


@dataclass
class Setup:
    device: torch.device
    dtype: str = "fp32"  # of ours (item 1), of both sides under autocast (items 2-5)
    repeats: int = 3
    warmup: int = 1
    compile: dict | None = None  # torch.compile kwargs of every model measured; None: eager
    tiny: bool = False
    crop: int | None = None  # None: the item's default
    batch: int | None = None
    sam_size: int | None = None
    eval_size: tuple[int, int] | None = None  # W, H
    eval_batch: int = 1
    grad_checkpoint: bool = False
    mic: bool = False  # items 3, 5, 6: the UDA step with masked image consistency, as train.py --mic
    profile: bool = False  # item 3: a torch.profiler table of the ssr iteration
    mit_name: str = "mit_b5"
    mit_overrides: dict = field(default_factory=dict)
    sam_overrides: dict = field(default_factory=dict)
    channels: int = 256

    def __post_init__(self):
        if self.tiny:  # the tiny models of the tests: heads stay (1, 2, 5, 8) / 2
            self.mit_name, self.mit_overrides = "mit_b0", dict(embed_dims=(16, 32, 40, 64), depths=(1, 1, 1, 1))
            self.sam_overrides = dict(embed_dim=32, depth=2, num_heads=2, global_attn_indexes=(1,), window_size=3)
            self.channels = 32

    @property
    def cuda(self) -> bool:
        return self.device.type == "cuda"

    @property
    def amp_dtype(self) -> torch.dtype | None:
        return {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}[self.dtype]

    def autocast(self):
        return torch.autocast(self.device.type, dtype=self.amp_dtype) if self.amp_dtype else contextlib.nullcontext()

    def size(self, name: str, paper, small, tiny):
        """A size given on the command line, else the item's default (`small` for the op count), or `tiny`."""
        given = {"crop": self.crop, "batch": self.batch, "sam": self.sam_size, "eval": self.eval_size}[name]
        return given if given is not None else tiny if self.tiny else small if small is not None else paper

    def maybe_compile(self, model):
        return torch.compile(model, **self.compile) if self.compile is not None else model

    @property
    def model_name(self) -> str:
        return "tiny" if self.tiny else "B5"


# ------------------------------------------------------------------------------------------------------------------
# measuring

# cpu memory needs glibc's malloc_trim and a writable /proc/self/clear_refs (Linux); elsewhere it reads nan
libc = ctypes.CDLL(None) if sys.platform == "linux" else None
if libc is not None and not (hasattr(libc, "malloc_trim") and os.access("/proc/self/clear_refs", os.W_OK)):
    libc = None


def sync(s: Setup) -> None:
    if s.cuda:
        torch.cuda.synchronize(s.device)


def proc_status_mib(name: str) -> float:
    with open("/proc/self/status") as f:
        line = next(line for line in f if line.startswith(name + ":"))
    return int(line.split()[1]) / 1024  # the kernel reports kB


def reset_peak(s: Setup) -> float:
    """Start a peak-memory window; returns the baseline (MiB) that peak_mib subtracts on cpu."""
    gc.collect()
    if s.cuda:
        torch.cuda.reset_peak_memory_stats(s.device)
        return 0.0
    if libc is None:
        return float("nan")
    libc.malloc_trim(0)  # hand freed heap pages back, or the call would reuse them unseen
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # resets VmHWM to the current resident set
    return proc_status_mib("VmRSS")


def peak_mib(s: Setup, base: float) -> float:
    if s.cuda:
        return torch.cuda.max_memory_allocated(s.device) / 2**20
    return proc_status_mib("VmHWM") - base if libc is not None else float("nan")


def measure(s: Setup, fns: dict) -> dict[str, tuple[float, float]]:
    """{name: fn() -> None} -> {name: (median seconds per call, peak MiB of one more call)}. The functions are
    called in turn (a, b, a, b, ...), so that a slow spell of the machine hits every one of them. Memory is taken
    in a separate call: on cpu, handing the freed heap back before it (see reset_peak) makes the call fault its
    pages in afresh, which would slow the timed calls down."""
    for _ in range(s.warmup):
        for fn in fns.values():
            fn()
    times = {name: [] for name in fns}
    for _ in range(s.repeats):
        for name, fn in fns.items():
            sync(s)
            t0 = time.perf_counter()
            fn()
            sync(s)
            times[name].append(time.perf_counter() - t0)
    peaks = {}
    for name, fn in fns.items():
        base = reset_peak(s)
        fn()
        sync(s)
        peaks[name] = peak_mib(s, base)
    return {name: (statistics.median(times[name]), peaks[name]) for name in fns}


# Ops whose output is a view of their input: no kernel runs. Everything else is counted, allocations included.
VIEW_OPS = frozenset({
    "view", "_unsafe_view", "reshape", "_reshape_alias", "view_as", "transpose", "t", "permute", "expand",
    "expand_as", "detach", "alias", "lift_fresh", "as_strided", "slice", "select", "narrow", "unsqueeze",
    "squeeze", "unbind", "split", "split_with_sizes", "chunk", "unflatten", "flatten", "diagonal", "movedim",
    "unfold",
})


class OpCounter(TorchDispatchMode):
    """Counts the aten ops that run inside it by name; views (VIEW_OPS) apart."""

    def __init__(self):
        super().__init__()
        self.ops, self.views = collections.Counter(), 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.overloadpacket.__name__
        if name in VIEW_OPS:
            self.views += 1
        else:
            self.ops[name] += 1
        return func(*args, **(kwargs or {}))

    def total(self) -> int:
        return sum(self.ops.values())

    def top(self, n: int = 5) -> str:
        return ", ".join(f"{name} {k:,}" for name, k in self.ops.most_common(n))


# ------------------------------------------------------------------------------------------------------------------
# 1. SAM image encoder forward


def bench_sam(s: Setup) -> tuple:
    sam_size = s.size("sam", 1024, None, 64)
    ours = sam_encoder.build_sam_encoder("vit_b", img_size=sam_size, **s.sam_overrides).eval()
    ref = official_sam_encoder(ours.cfg).eval()
    torch.manual_seed(0)
    randomize_(ref)
    with tempfile.TemporaryDirectory() as tmp:  # through the public loader, as a user's official weights would go
        path = os.path.join(tmp, "sam.safetensors")
        save_file({k: v.contiguous() for k, v in ref.state_dict().items()}, path)
        sam_encoder.load_weights(ours, path)
    ours.to(s.device, s.amp_dtype or torch.float32)  # as sam_encoder.frozen_teacher: the whole teacher in the dtype
    ref.to(s.device)  # the official encoder in fp32, the baseline of the targets
    x = torch.randn(1, 3, sam_size, sam_size, device=s.device)
    with torch.no_grad():
        note = max_diff([ours(x)], [ref(x)])
    ours_c, ref_c = s.maybe_compile(ours), s.maybe_compile(ref)

    def run(model):
        def fn():
            with torch.no_grad():
                model(x)
        return fn

    r = measure(s, {"ours": run(ours_c), "ref": run(ref_c)})
    return (f"1 SAM {'ViT-B' if not s.tiny else 'tiny'} fwd {sam_size}px b1", f"ours {s.dtype}", "official fp32",
            r["ours"], r["ref"], note)


# ------------------------------------------------------------------------------------------------------------------
# 2. MiT forward + backward


def bench_mit(s: Setup) -> tuple:
    try:
        from transformers import SegformerConfig, SegformerModel
        from transformers.utils.logging import disable_progress_bar
    except ImportError:
        raise Skip("transformers is not installed (pip install transformers)") from None
    disable_progress_bar()  # save_pretrained's bar would land in the table
    crop, batch = s.size("crop", 512, None, 64), s.size("batch", 2, None, 2)
    ours = mit.build_mit(s.mit_name, **s.mit_overrides)
    c = ours.cfg
    cfg = SegformerConfig(hidden_sizes=list(c.embed_dims), depths=list(c.depths), num_attention_heads=list(c.num_heads),
                          sr_ratios=list(c.sr_ratios), mlp_ratios=[c.mlp_ratio] * 4, drop_path_rate=c.drop_path_rate)
    torch.manual_seed(0)
    ref = official_eps_(SegformerModel(cfg))
    randomize_(ref)
    with tempfile.TemporaryDirectory() as tmp:  # the hub's layout: transformers renames its modules on save
        ref.save_pretrained(tmp)
        mit.load_weights(ours, os.path.join(tmp, "model.safetensors"))
    ours.to(s.device)
    ref.to(s.device)

    def ref_forward(x):
        return ref(pixel_values=x, output_hidden_states=True).hidden_states  # the 4 stage maps, as ours

    x = torch.randn(batch, 3, crop, crop, device=s.device)
    ours.eval(), ref.eval()
    with torch.no_grad(), s.autocast():
        note = max_diff(ours(x), ref_forward(x))
    ours.train(), ref.train()  # as in training: stochastic depth on
    ours_c, ref_c = s.maybe_compile(ours), s.maybe_compile(ref_forward)

    def run(model, forward):
        def fn():
            model.zero_grad(set_to_none=True)  # as optimizer.zero_grad(): gradients are allocated in every call
            with s.autocast():
                loss = sum(o.float().mean() for o in forward(x))
            loss.backward()
        return fn

    r = measure(s, {"ours": run(ours, ours_c), "ref": run(ref, ref_c)})
    return (f"2 MiT-{s.model_name} fwd+bwd {crop}px b{batch}", f"ours {s.dtype}", f"transformers {s.dtype}",
            r["ours"], r["ref"], note)


# ------------------------------------------------------------------------------------------------------------------
# 3. one training iteration, SSR vs DACS; 5. its op count


def import_ssr():
    try:
        import ssr
    except ImportError as e:
        raise Skip(f"ssr.py cannot be imported ({e})") from None
    return ssr


def train_step(s: Setup, method: str, crop: int, batch: int, sam_size: int):
    """(step(it) -> losses, optimizer) of one UDA training iteration of `method` on random images, as train.py
    runs it: autocast forward, backward, AdamW step, gradients set to None."""
    ssr = import_ssr()
    torch.manual_seed(0)
    src = torch.randn(batch, 3, crop, crop, device=s.device)
    tgt = torch.randn(batch, 3, crop, crop, device=s.device)
    lbl = torch.randint(0, 19, (batch, crop, crop), device=s.device)
    lbl[:, : crop // 8] = 255  # some ignored pixels, as in GTA5 labels
    student = ssr.build_segmentor(ssr.SegConfig(backbone=s.mit_name, mit=dict(s.mit_overrides), channels=s.channels))
    student.backbone.grad_checkpoint = s.grad_checkpoint
    uda = ssr.UDA(student, method=method, mic=s.mic, sam_img_size=sam_size).to(s.device).train()
    sam = None
    if method == "ssr":  # a random teacher: its speed does not depend on its weights
        sam = sam_encoder.frozen_teacher("vit_b", None, img_size=sam_size, device=s.device,
                                         dtype=s.amp_dtype or torch.float32, **s.sam_overrides)
    # as train.py: one fused kernel per step where torch has it (cuda, and cpu since torch 2.4)
    optimizer = torch.optim.AdamW([q for q in uda.parameters() if q.requires_grad], lr=6e-5, weight_decay=0.01,
                                  fused=True)
    scaler = torch.amp.GradScaler(s.device.type, enabled=s.amp_dtype == torch.float16)
    if s.compile is not None:  # as train.py --compile: the networks, not the step
        uda.compile_networks(sam, **s.compile)
    cudagraphs = (s.compile or {}).get("mode") == "reduce-overhead"

    def forward_backward(it):
        if cudagraphs:
            torch.compiler.cudagraph_mark_step_begin()  # a new iteration: earlier graph outputs may be reused
        with s.autocast():
            losses = uda(src, lbl, tgt, it, sam=sam)
        scaler.scale(sum(losses.values())).backward()
        return losses

    def optimizer_step():
        scaler.step(optimizer)
        scaler.update()
        optimizer.zero_grad(set_to_none=True)

    return forward_backward, optimizer_step


def iterations(forward_backward, optimizer_step, start: int):
    """fn() running the next training iteration on every call, from iteration `start`."""
    it = [start]

    def fn():
        forward_backward(it[0])
        optimizer_step()
        it[0] += 1

    return fn


def time_train_iter(s: Setup, method: str, crop: int, batch: int, sam_size: int) -> tuple[float, float]:
    """(median seconds, peak MiB) of one optimizer step of `method`. Its models live only in this call: building
    both UDA models at once would double the resident memory at B5."""
    return measure(s, {method: iterations(*train_step(s, method, crop, batch, sam_size), start=0)})[method]


def bench_train(s: Setup) -> tuple:
    crop, batch, sam_size = s.size("crop", 512, None, 64), s.size("batch", 2, None, 2), s.size("sam", 1024, None, 64)
    result = {method: time_train_iter(s, method, crop, batch, sam_size) for method in ("dacs", "ssr")}
    if s.profile:
        profile_train_iter(s, crop, batch, sam_size)
    return (f"3 train iter MiT-{s.model_name} crop {crop} b{batch} SAM {sam_size}{' mic' if s.mic else ''}"
            f"{' ckpt' if s.grad_checkpoint else ''}", "ssr", "dacs", result["ssr"], result["dacs"], s.dtype)


def profile_train_iter(s: Setup, crop: int, batch: int, sam_size: int, n: int = 3) -> None:
    """torch.profiler over n ssr iterations after the warm-up: the ops by their own device time, and the
    device's busy time against the wall time (how much of an iteration the GPU waits on Python and launches)."""
    from torch.profiler import ProfilerActivity, profile

    fn = iterations(*train_step(s, "ssr", crop, batch, sam_size), start=0)
    for _ in range(max(s.warmup, 1)):
        fn()
    sync(s)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if s.cuda else [])
    with profile(activities=activities) as prof:
        t0 = time.perf_counter()
        for _ in range(n):
            fn()
        sync(s)
        wall = (time.perf_counter() - t0) / n
    events = prof.key_averages()
    key = "self_device_time_total" if s.cuda else "self_cpu_time_total"
    busy = sum(getattr(e, key) for e in events) / n / 1e6
    print(events.table(sort_by=key, row_limit=15))
    print(f"profile: {wall * 1e3:.1f} ms per iteration, {'device' if s.cuda else 'cpu'} ops busy {busy * 1e3:.1f} ms "
          f"of it", flush=True)


def bench_ops(s: Setup) -> tuple:
    crop, batch, sam_size = s.size("crop", 512, 128, 64), s.size("batch", 2, 2, 2), s.size("sam", 1024, 256, 64)
    forward_backward, optimizer_step = train_step(s, "ssr", crop, batch, sam_size)
    forward_backward(0)  # iteration 0: the EMA copies the student, the teachers' bf16 copies are made
    optimizer_step()
    fwd_bwd, opt = OpCounter(), OpCounter()
    with fwd_bwd:
        forward_backward(1)
    with opt:
        optimizer_step()
    t = measure(s, {"ssr": iterations(forward_backward, optimizer_step, start=2)})["ssr"]
    name = f"5 ops/step ssr{' mic' if s.mic else ''} MiT-{s.model_name} crop {crop} b{batch} SAM {sam_size}"
    return (name, f"ours {s.dtype}", "-", t, None,
            f"{fwd_bwd.total():,} ops fwd+bwd ({fwd_bwd.top()}), optimizer {opt.total():,}")


# ------------------------------------------------------------------------------------------------------------------
# 4. evaluation throughput


def eval_model(s: Setup):
    ssr = import_ssr()
    model = ssr.build_segmentor(ssr.SegConfig(backbone=s.mit_name, mit=dict(s.mit_overrides), channels=s.channels))
    return model.to(s.device).eval()


def bench_eval(s: Setup) -> tuple:
    w, h = s.size("eval", (1024, 512), None, (128, 64))
    model = s.maybe_compile(eval_model(s))
    with torch.inference_mode():  # as eval.py: the weights cast to the autocast dtype once, not for every image
        net = import_ssr().cast_once(model, s.amp_dtype)
    x = torch.randn(s.eval_batch, 3, h, w, device=s.device)

    def fn():
        with torch.inference_mode(), s.autocast():
            logits = F.interpolate(net(x).float(), size=x.shape[2:], mode="bilinear", align_corners=False)
            logits.argmax(1)

    r = measure(s, {"ours": fn})
    return (f"4 eval MiT-{s.model_name} {w}x{h} b{s.eval_batch}", f"ours {s.dtype}", "-", r["ours"], None,
            f"{s.eval_batch / r['ours'][0]:.2f} images/s")


# ------------------------------------------------------------------------------------------------------------------
# reporting


def format_row(row: tuple, cuda: bool) -> list[str]:
    item, ours_name, ref_name, (t, m), ref, note = row
    rt, rm = ref if ref else (float("nan"), float("nan"))
    return [item, ours_name, ref_name, f"{t * 1e3:.1f}", f"{rt * 1e3:.1f}" if ref else "-",
            f"{t / rt:.2f}" if ref else "-", f"{m:.0f}", f"{rm:.0f}" if ref else "-",
            f"{m / rm:.2f}" if ref and rm > 0 else "-", note]


HEADER = ["item", "ours", "reference", "ours ms", "ref ms", "time ratio", "ours MiB", "ref MiB", "mem ratio", "note"]


def print_table(rows: list[tuple], cuda: bool) -> None:
    table = [HEADER] + [format_row(r, cuda) for r in rows]
    widths = [max(len(r[j]) for r in table) for j in range(len(HEADER))]
    print(f"\nmemory: {'peak alloc' if cuda else 'peak RSS growth'} (see the docstring); ratio = ours / reference")
    for r in table:
        print("  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip())


def device_name(s: Setup) -> str:
    return torch.cuda.get_device_name(s.device) if s.cuda else (
        f"cpu, {torch.get_num_threads()} threads, OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY', 'unset')}")


def run_items(s: Setup, items: list[str]) -> None:
    benches = {"1": bench_sam, "2": bench_mit, "3": bench_train, "4": bench_eval, "5": bench_ops,
               "6": compiled_train_iter}
    rows = []
    for i in items:
        try:
            rows.append(benches[i](s))
        except Skip as e:
            print(f"item {i} skipped: {e}")
    print_table(rows, s.cuda)


# ------------------------------------------------------------------------------------------------------------------
# 6. the real loop: train.py and eval.py as a user runs them, on files of the real datasets' sizes

LOOP_SIZES = dict(src=(1914, 1052), tgt=(2048, 1024))  # GTA5's and Cityscapes' image sizes (W, H)


def loop_data(root: str, tiny: bool, n_eval: int) -> tuple[str, str]:
    """(train root, eval root) under root. The train root holds GTA5 and Cityscapes trees of 24 scenes each at the
    datasets' sizes, drawn by demo.py (street scenes: they compress and decode like photos, ~3 MB a PNG); the eval
    root a Cityscapes val tree of n_eval images, copies of 8 drawn scenes (drawing is slow; decoding a copy costs
    the same)."""
    import demo

    sizes = {} if tiny else dict(src_size=LOOP_SIZES["src"], tgt_size=LOOP_SIZES["tgt"])  # tiny: the demo's
    train_root, eval_root = os.path.join(root, "train"), os.path.join(root, "eval")
    demo.write_data(train_root, n_src=24, n_tgt=24, n_val=8, **sizes)
    val = [(d, f) for d, _, files in os.walk(os.path.join(train_root, "cityscapes")) for f in sorted(files)
           if f.endswith("_leftImg8bit.png") and f"{os.sep}val{os.sep}" in d + os.sep]
    for kind in ("leftImg8bit", "gtFine"):
        os.makedirs(os.path.join(eval_root, "cityscapes", kind, "val", "frankfurt"))
    for i in range(n_eval):
        folder, name = val[i % len(val)]
        stem, new = name[: -len("_leftImg8bit.png")], f"frankfurt_{i:06d}_000019"
        shutil.copy(os.path.join(folder, name),
                    os.path.join(eval_root, "cityscapes", "leftImg8bit", "val", "frankfurt", f"{new}_leftImg8bit.png"))
        gt = folder.replace(f"{os.sep}leftImg8bit{os.sep}", f"{os.sep}gtFine{os.sep}")
        shutil.copy(os.path.join(gt, f"{stem}_gtFine_labelIds.png"),
                    os.path.join(eval_root, "cityscapes", "gtFine", "val", "frankfurt", f"{new}_gtFine_labelIds.png"))
    return train_root, eval_root


def loop_flags(tiny: bool) -> list[str]:
    """train.py's flags for a timed run from random weights: the paper's sizes, or the demo's for a CPU."""
    flags = ["--pretrained", "none", "--eval-every", "0", "--save-every", "0", "--debug-every", "0"]
    return flags + (["--demo"] if tiny else [])


def run_script(script: str, args: list[str], timeout: float, cwd: str = ".", env: dict | None = None
               ) -> tuple[str, float]:
    """python `script` with `args` in a child process: (its output, the seconds it ran). A failure raises with the
    end of its error output."""
    t0 = time.perf_counter()
    run = subprocess.run([sys.executable, script] + args, cwd=cwd, env=env, capture_output=True, text=True,
                         timeout=timeout)
    if run.returncode:
        raise RuntimeError(f"{script} failed: {(run.stderr or run.stdout).strip()[-600:]}")
    return run.stdout, time.perf_counter() - t0


def run_loop(train_root: str, out: str, flags: list[str], iters: int, warm: int, timeout: float) -> str:
    """train.py with `flags` for `iters` iterations; the steady rate is read from log.jsonl between iteration
    `warm` and the last (start-up, cuDNN's autotuning and compilation excluded)."""
    args = ["--data-root", train_root, "--out", out, "--iters", str(iters), "--log-every", str(max(1, warm // 2))]
    _, wall = run_script("train.py", args + flags, timeout, env={**os.environ, "SSR_CACHE": out + "_cache"})
    with open(os.path.join(out, "log.jsonl")) as f:
        rows = [r for r in map(json.loads, f) if "it_s" in r]
    a = next(r for r in rows if r["iter"] >= warm)
    b = rows[-1]
    steady = (b["iter"] - a["iter"]) / (b["elapsed_s"] - a["elapsed_s"])
    mem = [r["mem_gib"] for r in rows if "mem_gib" in r]  # cuda only
    peak = f", peak {max(mem):.1f} GiB" if mem else ""
    return (f"{steady:.2f} it/s steady (iterations {a['iter']}-{b['iter']}){peak}"
            f", first {a['iter']} iterations {a['elapsed_s']:.0f} s, process {wall:.0f} s")


def run_eval_files(eval_root: str, ckpt: str, flags: list[str], timeout: float) -> str:
    """eval.py over the eval root's files: the evaluation's own rate (loading included, as eval.py prints it) and
    the command's time from start to end (start-up and model loading too)."""
    out, wall = run_script("eval.py", ["--ckpt", ckpt, "--data-root", eval_root] + flags, timeout)
    n, rate = re.search(r"(\d+) images, ([\d.]+) images/s", out).groups()
    return (f"{n} images: evaluation {int(n) / float(rate):.1f} s ({rate} images/s), the command {wall:.1f} s "
            f"with start-up and model loading")


def run_bench(argv: list[str], timeout: float, cwd: str = ".", profile: bool = False) -> str:
    """bench.py (this one, or a baseline checkout's) in a child process: its table's rows (and, with profile, the
    profiler's table printed before them)."""
    lines = run_script("bench.py", argv, timeout, cwd=cwd)[0].splitlines()
    header = next(i for i, line in enumerate(lines) if line.startswith("item"))
    rows = [lines[header]] + [line for line in lines[header + 1:] if line[:1].isdigit()]
    if profile:
        rows = [line for line in lines[:header] if not line.startswith("device ")] + rows
    return "\n    ".join(rows)


def run_gpu_suite(s: Setup, budget: float, baseline: str | None) -> None:
    """Every GPU figure of the README in one call, each measurement in its own process (a hung compilation or a
    crash costs that figure only) under a time limit, printed as soon as it is taken. Paper sizes: MiT-B5, crop
    512, batch 2, SAM ViT-B at 1024; --tiny: tiny sizes, for a CPU."""
    tmp = tempfile.mkdtemp(prefix="ssr-bench-")
    try:
        suite_steps(s, budget, baseline, tmp)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)  # ~2 GB of images and checkpoints at the paper's sizes


def suite_steps(s: Setup, budget: float, baseline: str | None, tmp: str) -> None:
    """run_gpu_suite's measurements, in order of importance, with their data in tmp."""
    start = time.perf_counter()
    card, tiny = device_name(s), s.tiny
    dev = ["--device", str(s.device)] + (["--tiny"] if tiny else [])
    reps = ["--repeats", str(s.repeats), "--warmup", str(s.warmup)]
    n_eval, iters, warm = (4, 4, 2) if tiny else (500, 110, 30)
    results = {}

    def report(what: str, limit: float, fn) -> None:
        left = budget - (time.perf_counter() - start)
        if left < 20:
            print(f"[{card}] {what}: not run ({budget:.0f} s budget spent)", flush=True)
            return
        try:
            results[what] = fn(min(limit, left))
        except subprocess.TimeoutExpired as e:
            print(f"[{card}] {what}: TIMEOUT after {e.timeout:.0f} s", flush=True)
            return
        except Exception as e:  # a failing lever (e.g. a compile error) must not cost the rest of the suite
            msg = " ".join(str(e).split())
            print(f"[{card}] {what}: FAILED {type(e).__name__}: {msg[-600:]}", flush=True)
            return
        print(f"[{card}] {what} (at {time.perf_counter() - start:.0f} s):\n    {results[what]}", flush=True)

    t0 = time.perf_counter()
    train_root, eval_root = loop_data(tmp, tiny, n_eval)
    print(f"[{card}] synthetic data written in {time.perf_counter() - t0:.0f} s", flush=True)
    flags = loop_flags(tiny)
    ssr_mic = flags + ["--method", "ssr", "--mic", "--sam-weights", "none"]
    report("train.py --method ssr --mic", 180, lambda t: run_loop(
        train_root, os.path.join(tmp, "ssr"), ssr_mic, iters, warm, t))
    report(f"eval.py, {n_eval} Cityscapes-sized files", 90, lambda t: run_eval_files(
        eval_root, os.path.join(tmp, "ssr", "model.safetensors"), ["--device", str(s.device)], t))
    report("train iteration with mic, profiled; ops, eager bf16 (items 3, 5)", 150, lambda t: run_bench(
        dev + reps + ["--items", "3,5", "--dtype", "bf16", "--mic", "--profile"], t, profile=True))
    if baseline:
        report(f"baseline {baseline}: train iteration, eager bf16 (item 3)", 120, lambda t: run_bench(
            dev + reps + ["--items", "3", "--dtype", "bf16"], t, cwd=baseline))
    report("train.py --method dacs", 120, lambda t: run_loop(
        train_root, os.path.join(tmp, "dacs"), flags + ["--method", "dacs"], iters, warm, t))
    if s.cuda:
        report(f"eval.py --amp bf16, {n_eval} Cityscapes-sized files", 90, lambda t: run_eval_files(
            eval_root, os.path.join(tmp, "ssr", "model.safetensors"), ["--device", "cuda", "--amp", "bf16"], t))
        # compilation (the first iterations) is read apart from the steady rate after it
        report("train.py --method ssr --mic --compile", 400, lambda t: run_loop(
            train_root, os.path.join(tmp, "ssr_compiled"), ssr_mic + ["--compile"], iters + 100, warm + 100, t))
    if not s.cuda:
        print(f"[{card}] the compiled levers run on cuda only", flush=True)
        return
    for mode in ("reduce-overhead", "default", "max-autotune-no-cudagraphs"):
        report(f"compiled ssr iteration, mode {mode} (item 6)", 240, lambda t: run_bench(
            dev + reps + ["--items", "6", "--dtype", "bf16", "--compile-mode", mode], t))
    report("train iteration, eager fp32 (item 3)", 90, lambda t: run_bench(dev + reps + ["--items", "3"], t))


def compiled_train_iter(s: Setup) -> tuple:
    """Item 3's ssr iteration with compiled networks: the first two iterations (compilation, recompilation)
    timed apart from the steady state."""
    crop, batch, sam_size = s.size("crop", 512, None, 64), s.size("batch", 2, None, 2), s.size("sam", 1024, None, 64)
    forward_backward, optimizer_step = train_step(s, "ssr", crop, batch, sam_size)
    first = []
    for it in range(2):
        sync(s)
        t0 = time.perf_counter()
        forward_backward(it)
        optimizer_step()
        sync(s)
        first.append(time.perf_counter() - t0)
    t = measure(s, {"ssr": iterations(forward_backward, optimizer_step, start=2)})["ssr"]
    return (f"6 train iter ssr{' mic' if s.mic else ''} MiT-{s.model_name} crop {crop} b{batch} SAM {sam_size} "
            f"compiled {s.compile}",
            f"ours {s.dtype}", "-", t, None, f"first iterations (compile) {first[0]:.1f} s, {first[1]:.1f} s")


# ------------------------------------------------------------------------------------------------------------------


def size_wxh(text: str) -> tuple[int, int]:
    try:
        w, h = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not WIDTHxHEIGHT, e.g. 1024x512") from None
    return w, h


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[1],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--items", default="1,2,3,4,5", help="comma-separated items to run (see above)")
    p.add_argument("--suite", choices=["gpu"], help="run the GPU suite (see above) instead of --items")
    p.add_argument("--budget", type=float, default=540, help="--suite gpu: seconds after which no new "
                   "measurement starts; each one also has its own limit")
    p.add_argument("--baseline", help="--suite gpu: a checkout of another commit (git worktree add DIR COMMIT) "
                   "whose bench.py item 3 is rerun in the same call, for a before/after on the same card")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="cpu, cuda, cuda:1, ...")
    p.add_argument("--dtype", default="fp32", choices=["fp32", "bf16", "fp16"],
                   help="precision of ours (item 1), of both sides under autocast (items 2-6)")
    p.add_argument("--compile", action="store_true", help="torch.compile every model measured (compiled in warm-up; "
                   "items 3, 5 and 6 compile the networks, as train.py --compile)")
    p.add_argument("--compile-mode", choices=["default", "reduce-overhead", "max-autotune-no-cudagraphs"],
                   help="torch.compile's mode (implies --compile)")
    p.add_argument("--repeats", type=int, default=None, help="timed calls per model (default 10, 3 on cpu)")
    p.add_argument("--warmup", type=int, default=None, help="untimed calls first (default 3, 1 on cpu)")
    p.add_argument("--sam-size", type=int, default=None, help="SAM input side (default 1024; 256 for item 5)")
    p.add_argument("--crop", type=int, default=None, help="training crop side, items 2, 3, 5 (default 512; 128 for 5)")
    p.add_argument("--batch-size", type=int, default=None, help="batch of items 2, 3 and 5 (default 2)")
    p.add_argument("--eval-size", type=size_wxh, default=None, help="WxH of the evaluation images of item 4 "
                   "(default 1024x512)")
    p.add_argument("--eval-batch", type=int, default=1, help="batch of item 4")
    p.add_argument("--grad-checkpoint", action="store_true", help="item 3: recompute the student's MiT blocks in backward")
    p.add_argument("--mic", action="store_true", help="items 3, 5 and 6: the step with masked image consistency")
    p.add_argument("--profile", action="store_true", help="item 3: print a torch.profiler table of the ssr iteration")
    p.add_argument("--tiny", action="store_true", help="tiny models and sizes for every item (seconds on a CPU)")
    args = p.parse_args(argv)
    items = args.items.split(",")
    if not set(items) <= {"1", "2", "3", "4", "5", "6"}:
        sys.exit(f"error: --items {args.items}: choose among 1,2,3,4,5,6 (comma-separated).")
    if args.baseline and not os.path.isfile(os.path.join(args.baseline, "bench.py")):
        sys.exit(f"error: --baseline {args.baseline} holds no bench.py; give a checkout of this project, e.g. made "
                 f"with git worktree add {args.baseline} COMMIT.")
    device = torch.device(args.device)
    cuda = device.type == "cuda"
    if args.suite == "gpu" and not cuda and not args.tiny:
        sys.exit("error: --suite gpu needs a CUDA device (or --tiny, which runs its CPU-runnable parts at tiny sizes).")
    compile_kwargs = None
    if args.compile or args.compile_mode or "6" in items:
        compile_kwargs = {} if args.compile_mode in (None, "default") else {"mode": args.compile_mode}
    warmup = args.warmup if args.warmup is not None else (3 if cuda else 1)
    s = Setup(device=device, dtype=args.dtype, repeats=args.repeats if args.repeats is not None else (10 if cuda else 3),
              warmup=max(warmup, 1) if compile_kwargs is not None else warmup,  # the first call compiles: not timed
              compile=compile_kwargs, tiny=args.tiny, crop=args.crop, batch=args.batch_size,
              sam_size=args.sam_size, eval_size=args.eval_size, eval_batch=args.eval_batch,
              grad_checkpoint=args.grad_checkpoint, mic=args.mic, profile=args.profile)
    print(f"device {device} ({device_name(s)}), torch {torch.__version__}, dtype {args.dtype}, compile "
          f"{compile_kwargs}, median of {s.repeats} after {s.warmup} warm-up", flush=True)
    if args.suite == "gpu":
        run_gpu_suite(s, args.budget, args.baseline)
    else:
        run_items(s, sorted(items))


if __name__ == "__main__":
    main()
