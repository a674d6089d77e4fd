"""
Speed and memory of ssr's models, measured side by side with the reference implementations in one run.

    python bench.py                                   # items 1-4 at the paper's sizes, fp32, on cuda if present
    python bench.py --dtype bf16 --items 1,3 --mic    # GPU target: our bf16 SAM vs official fp32; SSR vs DACS
    python bench.py --items 3 --profile --dtype bf16  # where an iteration's time goes
    python bench.py --items 5 --dtype bf16            # what train.py --compile buys (compile time apart)
    python bench.py --items 6,7 --dtype bf16 --mic    # what train.py --cuda-graphs and the frozen weights' cast buy
    python bench.py --tiny --repeats 1 --warmup 0     # tiny configs, seconds (the smoke test)

Items, ours / reference in the ratio columns:
  1. SAM image encoder forward: sam_encoder.SamEncoder in --dtype (as the frozen teacher runs in training) vs
     segment_anything's ImageEncoderViT in fp32, same random weights.
  2. MiT forward + backward: mit.MixVisionTransformer vs transformers' SegformerModel, same weights and autocast.
  3. One training iteration (UDA forward, backward, AdamW step) of method 'ssr' vs 'dacs': the cost of the SAM
     regularizer. --profile adds a torch.profiler table of the ssr iteration and the device's busy time.
  4. Evaluation throughput of the deployable Segmentor (autocast forward, resize to the input, argmax), images/s.
  5. Item 3's ssr iteration with its networks compiled as train.py --compile does (speed.compile_blocks) vs eager;
     the first two compiled iterations (the compilation) are timed apart.
  6. Item 3's ssr iteration with its frozen networks replayed as CUDA graphs as train.py --cuda-graphs does
     (speed.graph_frozen_networks) vs eager; cuda only.
  7. Item 3's ssr iteration with the ImageNet copy's weights cast once, as train.py does in bf16 and fp16
     (speed.cast_frozen_weights), vs cast by autocast in every pass.
Item 3 also counts the FLOPs of each iteration (count_flops), the aten ops of the ssr iteration by network
(count_ops: what an eager step costs the host) and, in bf16 on a GPU, the card's matmul rate.
suite.py runs the programs themselves at the paper's sizes and these items, for every GPU figure in one call.

Time: the median of --repeats calls after --warmup calls; the two sides of a ratio are called in turn (ours,
reference, ours, ...), so that load from other processes hits both alike. Memory, from one more call per model:
  cuda: torch.cuda.max_memory_allocated() after reset_peak_memory_stats(), i.e. everything allocated at the peak
        (weights, gradients and optimizer state included);
  cpu:  the growth of the peak resident set (VmHWM) over the resident set just before the call, after freed heap
        memory is returned to the system (malloc_trim) and the peak is reset (/proc/self/clear_refs). Weights and
        optimizer state are resident before the call and not counted: the figure is the memory the call itself
        takes (activations, and gradients, which are set to None between steps as optimizer.zero_grad does).
Weights are random (nothing is downloaded): speed does not depend on their values.

Time on an idle machine: OpenMP's threads spin while they wait, and beside another busy process both crawl.
"""
import argparse
import collections
import ctypes
import gc
import importlib.util
import os
import statistics
import sys
import tempfile
import time
import types
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F
from torch.utils import flop_counter
from torch.utils._python_dispatch import TorchDispatchMode

import files
import mit
import sam_encoder
import ssr
import speed
import weights

# ------------------------------------------------------------------------------------------------------------------
# the references, with random weights (also used by the tests), and how one run measures time and memory

def official_sam_modeling() -> types.ModuleType:
    """segment_anything.modeling without running the package's __init__ (it pulls in torchvision): a stub parent
    package pointing at its folder lets the subpackage and its relative imports load alone."""
    if "segment_anything" not in sys.modules:
        spec = importlib.util.find_spec("segment_anything")  # finds the package without importing it
        if spec is None:
            raise ImportError("No module named 'segment_anything'", name="segment_anything")
        parent = types.ModuleType("segment_anything")
        parent.__path__ = list(spec.submodule_search_locations)
        sys.modules["segment_anything"] = parent
    return importlib.import_module("segment_anything.modeling")


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
    SegFormer the official value there (the patch-embedding and spatial-reduction norms are 1e-5 in both)."""
    for name, m in segformer.named_modules():
        if isinstance(m, torch.nn.LayerNorm) and "patch_embeddings" not in name and "attention" not in name:
            m.eps = mit.BLOCK_EPS
    return segformer


def max_diff(ours, ref) -> str:
    diff = max((o.float() - r.float()).abs().max().item() for o, r in zip(ours, ref))
    return f"max|diff| {diff:.1e} (max|ref| {max(r.abs().max().item() for r in ref):.1f})"


@dataclass
class Setup:
    device: torch.device
    dtype: str = "fp32"  # of ours (item 1), of both sides under autocast (items 2-5)
    repeats: int | None = None  # None: 10 on cuda, 3 on cpu
    warmup: int | None = None  # None: 3 on cuda, 1 on cpu
    tiny: bool = False  # the tiny models and sizes of the tests
    crop: int | None = None  # training crop side, items 2, 3, 5; None: the paper's 512, or 64 with tiny
    batch: int | None = None  # None: the paper's 2
    sam_size: int | None = None  # SAM input side; None: the paper's 1024, or 64 with tiny
    grad_checkpoint: bool = False  # items 3, 5: the student's MiT blocks recomputed in backward
    mic: bool = False  # items 3, 5: the UDA step with masked image consistency, as train.py --mic
    profile: bool = False  # item 3: a torch.profiler table of the ssr iteration

    def __post_init__(self):
        self.repeats = self.repeats or (10 if self.cuda else 3)
        self.warmup = (3 if self.cuda else 1) if self.warmup is None else self.warmup
        self.crop, self.batch = self.crop or (64 if self.tiny else 512), self.batch or 2
        self.sam_size = self.sam_size or (64 if self.tiny else 1024)

    @property
    def cuda(self) -> bool:
        return self.device.type == "cuda"

    @property
    def amp_dtype(self) -> torch.dtype | None:
        return {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}[self.dtype]

    def autocast(self) -> torch.autocast:
        return torch.autocast(self.device.type, dtype=self.amp_dtype, enabled=self.amp_dtype is not None)

    def seg_config(self) -> ssr.SegConfig:  # tiny: MiT-B0's heads (1, 2, 5, 8) on narrow stages
        tiny = dict(backbone="mit_b0", mit=dict(embed_dims=(16, 32, 40, 64), depths=(1, 1, 1, 1)), channels=32)
        return ssr.SegConfig(**tiny) if self.tiny else ssr.SegConfig()

    def sam_overrides(self) -> dict:
        return dict(embed_dim=32, depth=2, num_heads=2, global_attn_indexes=(1,), window_size=3) if self.tiny else {}

    def train_name(self) -> str:
        return (f"train iter MiT-{'tiny' if self.tiny else 'B5'} crop {self.crop} b{self.batch} SAM {self.sam_size}"
                f"{' mic' if self.mic else ''}{' ckpt' if self.grad_checkpoint else ''}")

    def device_name(self) -> str:
        return torch.cuda.get_device_name(self.device) if self.cuda else (
            f"cpu, {torch.get_num_threads()} threads, OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY', 'unset')}")


# cpu memory needs glibc's malloc_trim and a writable /proc/self/clear_refs (Linux); elsewhere it reads nan
libc = ctypes.CDLL(None) if os.access("/proc/self/clear_refs", os.W_OK) else None


def timed(s: Setup, fn) -> float:
    """Seconds of one call of fn, from an idle device to an idle device."""
    if s.cuda:
        torch.cuda.synchronize(s.device)
    t0 = time.perf_counter()
    fn()
    if s.cuda:
        torch.cuda.synchronize(s.device)
    return time.perf_counter() - t0


def peak_mib(s: Setup, fn) -> float:
    """The peak memory (MiB) of one call of fn (see the docstring)."""
    gc.collect()
    if s.cuda:
        torch.cuda.reset_peak_memory_stats(s.device)
        fn()
        return torch.cuda.max_memory_allocated(s.device) / 2**20
    if libc is None or not hasattr(libc, "malloc_trim"):
        return float("nan")
    libc.malloc_trim(0)  # hand freed heap pages back, or the call would reuse them unseen
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # resets VmHWM to the current resident set
    with open("/proc/self/status") as f:
        base = next(int(line.split()[1]) for line in f if line.startswith("VmRSS:"))  # kB
    fn()
    with open("/proc/self/status") as f:
        return (next(int(line.split()[1]) for line in f if line.startswith("VmHWM:")) - base) / 1024


def measure(s: Setup, fns: dict) -> dict[str, tuple[float, float]]:
    """{name: fn() -> None} -> {name: (median seconds per call, peak MiB of one more call)}, called in turn (a, b,
    a, b, ...) so that a slow spell of the machine hits each alike. Memory is taken apart: on cpu, handing the freed
    heap back first makes the call fault its pages in afresh, which would slow a timed call down."""
    for _ in range(s.warmup):
        for fn in fns.values():
            fn()
    times = {name: [] for name in fns}
    for _ in range(s.repeats):
        for name, fn in fns.items():
            times[name].append(timed(s, fn))
    return {name: (statistics.median(times[name]), peak_mib(s, fn)) for name, fn in fns.items()}

# ------------------------------------------------------------------------------------------------------------------
# the items: 1. SAM forward, 2. MiT forward + backward, 3. a training iteration, 4. evaluation, 5. compiled

def bench_sam(s: Setup) -> tuple:
    ours = sam_encoder.build_sam_encoder("vit_b", img_size=s.sam_size, **s.sam_overrides()).eval()
    ref = official_sam_encoder(ours.cfg).eval()
    torch.manual_seed(0)
    randomize_(ref)
    ours.load_state_dict(ref.state_dict())  # ours keeps the official names
    ours.to(s.device, s.amp_dtype or torch.float32)  # as weights.frozen_sam: the whole teacher in the dtype
    ref.to(s.device)  # the official encoder as its authors run it, in fp32
    x = torch.randn(1, 3, s.sam_size, s.sam_size, device=s.device)
    with torch.no_grad():  # ours casts the fp32 batch to its dtype, as the teacher takes the student's
        r = measure(s, {"ours": lambda: ours(x), "ref": lambda: ref(x)})
        note = max_diff([ours(x)], [ref(x)])
    return (f"1 SAM {'ViT-B' if not s.tiny else 'tiny'} fwd {s.sam_size}px b1", f"ours {s.dtype}", "official fp32",
            r["ours"], r["ref"], note)


def bench_mit(s: Setup) -> tuple:
    import transformers
    transformers.logging.disable_progress_bar()  # save_pretrained's bar would land in the table
    ours = mit.build_mit(s.seg_config().backbone, **s.seg_config().mit)
    c = ours.cfg
    cfg = transformers.SegformerConfig(hidden_sizes=list(c.embed_dims), depths=list(c.depths),
                                       num_attention_heads=list(c.num_heads), sr_ratios=list(c.sr_ratios),
                                       mlp_ratios=[c.mlp_ratio] * 4, drop_path_rate=c.drop_path_rate)
    torch.manual_seed(0)
    ref = official_eps_(transformers.SegformerModel(cfg))
    randomize_(ref)
    with tempfile.TemporaryDirectory() as tmp:  # the hub's layout: transformers renames its modules on save
        ref.save_pretrained(tmp)
        weights.load_mit(ours, os.path.join(tmp, "model.safetensors"))
    ours.to(s.device), ref.to(s.device)

    def ref_forward(x):
        return ref(pixel_values=x, output_hidden_states=True).hidden_states  # the 4 stage maps, as ours

    x = torch.randn(s.batch, 3, s.crop, s.crop, device=s.device)
    ours.eval(), ref.eval()
    with torch.no_grad(), s.autocast():
        note = max_diff(ours(x), ref_forward(x))
    ours.train(), ref.train()  # as in training: stochastic depth on

    def run(model, forward):
        def fn():
            model.zero_grad(set_to_none=True)  # as optimizer.zero_grad(): gradients are allocated in every call
            with s.autocast():
                loss = sum(o.float().mean() for o in forward(x))
            loss.backward()
        return fn

    r = measure(s, {"ours": run(ours, ours), "ref": run(ref, ref_forward)})
    return (f"2 MiT-{'tiny' if s.tiny else 'B5'} fwd+bwd {s.crop}px b{s.batch}", f"ours {s.dtype}",
            f"transformers {s.dtype}", r["ours"], r["ref"], note)


def train_iterations(s: Setup, method: str, compiled: bool = False, graphs: bool = False, cast: bool = True
                     ) -> tuple[Callable[[], None], dict]:
    """(fn, nets): fn() runs the next UDA training iteration of `method` on random images at every call, as train.py
    does: autocast forward, backward, AdamW step, gradients set to None; `compiled`, `graphs`: the networks as
    train.py --compile, --cuda-graphs; `cast`: the ImageNet copy's weights cast once, as train.py (False: by
    autocast in every pass). nets: the networks it runs by name, the UDA wrapper first (for count_ops)."""
    torch.manual_seed(0)
    src, tgt = (torch.randn(s.batch, 3, s.crop, s.crop, device=s.device) for _ in range(2))
    lbl = torch.randint(0, 19, (s.batch, s.crop, s.crop), device=s.device)
    lbl[:, : s.crop // 8] = 255  # some ignored pixels, as in GTA5 labels
    student = ssr.build_segmentor(s.seg_config())
    student.backbone.grad_checkpoint = s.grad_checkpoint
    uda = ssr.UDA(student, method=method, mic=s.mic, sam_img_size=s.sam_size).to(s.device).train()
    sam = weights.frozen_sam(  # random weights: the teacher's speed does not depend on them
        "vit_b", None, img_size=s.sam_size, device=s.device, dtype=s.amp_dtype or torch.float32,
        **s.sam_overrides()) if method == "ssr" else None
    speed.apply(uda, sam, s.amp_dtype, s.batch, s.crop, compiled=compiled, cuda_graphs=graphs, cast=cast)
    # as train.py: one fused kernel per step where torch has it (cuda, and cpu since torch 2.4)
    optimizer = torch.optim.AdamW([q for q in uda.parameters() if q.requires_grad], lr=6e-5, weight_decay=0.01,
                                  fused=True)
    scaler = torch.amp.GradScaler(s.device.type, enabled=s.amp_dtype == torch.float16)
    it = [0]

    def fn():
        with s.autocast():
            losses = uda(src, lbl, tgt, it[0], sam=sam)
        scaler.scale(sum(losses.values())).backward()
        scaler.step(optimizer)
        scaler.update()
        optimizer.zero_grad(set_to_none=True)
        it[0] += 1

    nets = {"UDA.forward itself": uda, "student": uda.student.backbone, "head": uda.student.decode_head,
            "EMA teacher": uda.ema, "ImageNet copy": uda.imnet, "SSR branch": uda.ssr, "SAM": sam}
    return fn, {name: net for name, net in nets.items() if net is not None}


def conv_backward_flops(grad_out_shape, x_shape, w_shape, _bias, _stride, _padding, _dilation, transposed,
                        _output_padding, _groups, output_mask, out_shape=None, **kwargs) -> int:
    """A convolution's backward: each gradient asked for (input, weight) costs what the forward costs. torch's own
    formula (2.13) drops `groups` for the weight's gradient and so counts a depthwise conv's C times over: 28.96
    instead of 11.06 TFLOP for the paper's ssr --mic iteration, whose head has three depthwise convs on 1024
    channels."""
    forward = flop_counter.conv_flop_count(x_shape, w_shape, grad_out_shape, transposed)
    return forward * (bool(output_mask[0]) + bool(output_mask[1]))


def cpu_attention_flops(query, key, value, *args, out_shape=None, **kwargs) -> int:
    """The CPU's fused attention, which torch's counter does not know, counted as its CUDA kernels are."""
    return flop_counter.sdpa_flop_count(query, key, value)


def cpu_attention_backward_flops(grad_out, query, key, value, *args, out_shape=None, **kwargs) -> int:
    return flop_counter.sdpa_backward_flop_count(grad_out, query, key, value)


def count_flops(fn) -> int:
    """FLOPs of one call of fn (matrix products, convolutions, attention; forward and backward) by
    torch.utils.flop_counter, with the grouped convolution's backward counted right (conv_backward_flops) and the
    CPU's attention counted too, so that a CPU and a GPU count the same step alike."""
    aten = torch.ops.aten
    counter = flop_counter.FlopCounterMode(display=False, custom_mapping={
        aten.convolution_backward: conv_backward_flops,
        aten._scaled_dot_product_flash_attention_for_cpu: cpu_attention_flops,
        aten._scaled_dot_product_flash_attention_for_cpu_backward: cpu_attention_backward_flops})
    with counter:
        fn()
    return counter.get_total_flops()


# aten ops that make a view of their input: no kernel runs, and on a GPU nothing is launched
VIEW_OPS = frozenset({"view", "_unsafe_view", "_reshape_alias", "t", "transpose", "permute", "expand", "slice",
                      "select", "unsqueeze", "squeeze", "as_strided", "alias", "detach", "split", "split_with_sizes",
                      "unbind", "lift_fresh", "unfold", "narrow", "diagonal"})


class OpCounter(TorchDispatchMode):
    """Counts the aten ops dispatched while it is active, below autograd and autocast (so the backward's ops and
    autocast's casts count too), by the innermost running network of `nets` (forward hooks), else 'outside'."""

    def __init__(self, nets: dict[str, torch.nn.Module]):
        super().__init__()
        self.kernels, self.views, self.running, self.hooks = collections.Counter(), collections.Counter(), [], []
        for name, net in nets.items():
            self.hooks += [net.register_forward_pre_hook(lambda m, a, name=name: self.running.append(name)),
                           net.register_forward_hook(self.leave)]

    def leave(self, module, args, output) -> None:  # None: the network's output stays as it is
        self.running.pop()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        where = self.running[-1] if self.running else "outside"
        (self.views if func.overloadpacket.__name__ in VIEW_OPS else self.kernels)[where] += 1
        return func(*args, **(kwargs or {}))


def count_ops(fn, nets: dict[str, torch.nn.Module]) -> str:
    """The aten ops of one call of fn, by network (OpCounter), as one line. In eager mode each op costs
    the host its Python, dispatch and launch, whatever the op's size: where a step's time over its op count is
    near that cost, the step is bound by the host, not the device, and only fewer ops (compilation) or no launches
    (CUDA graphs) make it faster."""
    counter = OpCounter(nets)
    try:
        with counter:
            fn()
    finally:
        for hook in counter.hooks:
            hook.remove()
    where = ", ".join(f"{name} {n}" for name, n in counter.kernels.most_common())
    return f"{sum(counter.kernels.values())} aten ops and {sum(counter.views.values())} views ({where})"


def matmul_rate(s: Setup, n: int = 8192, calls: int = 20) -> float:
    """FLOP/s of a large bf16 matrix product on s's device: the ceiling the MFU is read against (the H200's
    datasheet says about 990 TFLOP/s dense bf16; a measured rate is what this card gives)."""
    a, b = (torch.randn(n, n, device=s.device, dtype=torch.bfloat16) for _ in range(2))
    a @ b
    t = timed(s, lambda: [a @ b for _ in range(calls)])
    return 2 * n ** 3 * calls / t


def bench_train(s: Setup) -> tuple:
    r, flops = {}, {}
    for method in ("dacs", "ssr"):  # one method's models at a time: both at once would double the memory at B5
        fn, nets = train_iterations(s, method)
        r[method] = measure(s, {method: fn})[method]
        flops[method] = count_flops(fn)
    ops = count_ops(fn, nets)
    if s.profile:
        profile(s, fn)
    note = (f"{s.dtype}; TFLOP per iteration: ssr {flops['ssr'] / 1e12:.4g}, dacs {flops['dacs'] / 1e12:.4g}; "
            f"the ssr iteration runs {ops}; outside: the backward and AdamW; UDA.forward itself: the EMA update, "
            f"mixing, losses")
    if s.cuda and s.dtype == "bf16":  # the model FLOP utilization of the bare step
        rate = matmul_rate(s)
        note += (f"; bf16 matmul {rate / 1e12:.0f} TFLOP/s, so the bare ssr step uses "
                 f"{100 * flops['ssr'] / r['ssr'][0] / rate:.1f}% of it")
    return f"3 {s.train_name()}", "ssr", "dacs", r["ssr"], r["dacs"], note


def profile(s: Setup, fn, n: int = 3) -> None:
    """torch.profiler over n more calls of fn, warm: the ops by their own device time, and the device's busy time
    against the wall time (how much of an iteration the GPU waits on Python and launches)."""
    from torch.profiler import ProfilerActivity

    with torch.profiler.profile(activities=[ProfilerActivity.CPU] + [ProfilerActivity.CUDA] * s.cuda) as prof:
        wall = sum(timed(s, fn) for _ in range(n)) / n
    events = prof.key_averages()
    key = "self_device_time_total" if s.cuda else "self_cpu_time_total"
    busy = sum(getattr(e, key) for e in events) / n / 1e6
    print(events.table(sort_by=key, row_limit=15))
    print(f"profile: {wall * 1e3:.1f} ms per iteration, {'device' if s.cuda else 'cpu'} ops busy {busy * 1e3:.1f} ms")


def bench_eval(s: Setup) -> tuple:
    w, h = (128, 64) if s.tiny else (1024, 512)  # Cityscapes at half its size, as DAFormer evaluates it
    model = ssr.build_segmentor(s.seg_config()).to(s.device).eval()
    x = torch.randn(1, 3, h, w, device=s.device)

    def predict():  # as eval.py: the logits resized to the input, then the classes
        return F.interpolate(model(x).float(), size=(h, w), mode="bilinear", align_corners=False).argmax(1)

    with torch.inference_mode(), s.autocast():
        r = measure(s, {"ours": predict})
    return (f"4 eval MiT-{'tiny' if s.tiny else 'B5'} {w}x{h} b1", f"ours {s.dtype}", "-", r["ours"], None,
            f"{1 / r['ours'][0]:.2f} images/s")


def bench_compile(s: Setup) -> tuple:
    compiled, eager = train_iterations(s, "ssr", compiled=True)[0], train_iterations(s, "ssr")[0]
    first = [timed(s, compiled) for _ in range(2)]  # the compilation, and any recompilation it needs
    r = measure(s, {"compiled": compiled, "eager": eager})
    return (f"5 ssr {s.train_name()}", "compiled", "eager", r["compiled"], r["eager"],
            f"{s.dtype}; first iterations (compile) {first[0]:.1f} s, {first[1]:.1f} s")


def bench_graphs(s: Setup) -> tuple:
    graphed, eager = train_iterations(s, "ssr", graphs=True)[0], train_iterations(s, "ssr")[0]
    r = measure(s, {"graphed": graphed, "eager": eager})
    return (f"6 ssr {s.train_name()}", "CUDA graphs", "eager", r["graphed"], r["eager"],
            f"{s.dtype}; the EMA teacher, ImageNet copy and SAM replayed")


def bench_cast(s: Setup) -> tuple:
    cast, autocast = train_iterations(s, "ssr")[0], train_iterations(s, "ssr", cast=False)[0]
    r = measure(s, {"cast": cast, "autocast": autocast})
    what = "fp32: nothing to cast" if s.dtype == "fp32" else "the ImageNet copy's Linear and Conv2d weights"
    return f"7 ssr {s.train_name()}", "cast once", "autocast", r["cast"], r["autocast"], f"{s.dtype}; {what}"


BENCHES = {"1": bench_sam, "2": bench_mit, "3": bench_train, "4": bench_eval, "5": bench_compile, "6": bench_graphs,
           "7": bench_cast}


def run_items(s: Setup, items: list[str]) -> None:
    rows = [["item", "ours", "reference", "ours ms", "ref ms", "time ratio", "ours MiB", "ref MiB", "mem ratio",
             "note"]]
    for item, ours_name, ref_name, (t, m), ref, note in (BENCHES[i](s) for i in items):
        (rt, rm), cell = ref or (float("nan"),) * 2, (lambda text: text if ref else "-")
        rows.append([item, ours_name, ref_name, f"{t * 1e3:.1f}", cell(f"{rt * 1e3:.1f}"), cell(f"{t / rt:.2f}"),
                     f"{m:.0f}", cell(f"{rm:.0f}"), cell(f"{m / rm:.2f}" if rm > 0 else "-"), note])
    widths = [max(len(r[j]) for r in rows) for j in range(len(rows[0]))]
    print(f"\nmemory: {'peak alloc' if s.cuda else 'peak RSS growth'} (see the docstring); ratio = ours / reference")
    for r in rows:
        print("  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip())

def device_or_exit(name: str) -> torch.device:
    """--device of bench.py or suite.py: the device (files.check_device), or the program's one-line error."""
    try:
        return files.check_device(name)
    except files.FlagError as e:
        sys.exit(f"error: {e}")


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--items", default="1,2,3,4", help="comma-separated items to run (see above)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="cpu, cuda, cuda:1, ...")
    p.add_argument("--dtype", default="fp32", choices=["fp32", "bf16", "fp16"], help="the items' precision (see above)")
    p.add_argument("--repeats", type=int, help="timed calls per model (default 10, 3 on cpu)")
    p.add_argument("--warmup", type=int, help="untimed calls first (default 3, 1 on cpu)")
    p.add_argument("--sam-size", type=int, help="SAM input side, items 1, 3, 5-7 (default 1024)")
    p.add_argument("--crop", type=int, help="training crop side, items 2, 3, 5-7 (default 512)")
    p.add_argument("--batch-size", type=int, help="batch of items 2, 3, 5-7 (default 2)")
    p.add_argument("--grad-checkpoint", action="store_true", help="items 3, 5-7: recompute the MiT blocks in backward")
    p.add_argument("--mic", action="store_true", help="items 3, 5-7: the step with masked image consistency")
    p.add_argument("--profile", action="store_true", help="item 3: print a torch.profiler table of the ssr iteration")
    p.add_argument("--tiny", action="store_true", help="tiny models and sizes for every item (seconds on a CPU)")
    args = p.parse_args(argv)
    items = args.items.split(",")
    if not set(items) <= set(BENCHES):
        sys.exit(f"error: --items {args.items}: choose among {','.join(BENCHES)} (comma-separated).")
    bad = [f"--{flag} {v}" for flag, v, unit in (("repeats", args.repeats, 1), ("batch-size", args.batch_size, 1),
                                                 ("crop", args.crop, 32), ("sam-size", args.sam_size, 16))
           if v is not None and (v <= 0 or v % unit)]  # given, and not a positive multiple of its unit
    bad += [f"--warmup {args.warmup}"] * (args.warmup is not None and args.warmup < 0)
    if bad:
        sys.exit(f"error: {', '.join(bad)}: --repeats and --batch-size must be positive, --warmup at least 0, --crop "
                 f"a positive multiple of 32 and --sam-size of 16.")
    s = Setup(device_or_exit(args.device), args.dtype, args.repeats, args.warmup, args.tiny, args.crop, args.batch_size,
              args.sam_size, args.grad_checkpoint, args.mic, args.profile)
    if "6" in items and not s.cuda:
        sys.exit(f"error: --items {args.items}: item 6 times CUDA graphs, which run on a GPU only; give --device "
                 f"cuda, or leave item 6 out.")
    print(f"device {s.device} ({s.device_name()}), torch {torch.__version__}, dtype {s.dtype}, median of {s.repeats} "
          f"after {s.warmup} warm-up", flush=True)
    try:
        run_items(s, sorted(items))
    except ImportError as e:
        sys.exit(f"error: {e}; bench.py compares against the reference implementations: "
                 f"pip install -r requirements-dev.txt")


if __name__ == "__main__":
    main()
