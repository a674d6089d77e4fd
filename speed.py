"""Speed levers, applied to the method from outside: the method's functions (ssr.py) read as the paper says, and
each lever here is tested to compute what they compute.

1. compile_blocks: train.py --compile, torch.compile block by block.
2. cast_frozen_weights: the frozen ImageNet copy's Linear and Conv2d weights kept in the autocast dtype (bf16, fp16).
3. cuda_graph, graph_frozen, graph_frozen_networks: train.py --cuda-graphs, the frozen networks' passes replayed as
   CUDA graphs.
apply: what train.py applies of them, which bench.py applies alike.
"""
import contextlib
from typing import Callable

import torch
import torch.nn as nn
from torch import Tensor

import mit
import sam_encoder
import ssr


def compile_blocks(net: nn.Module | None, **compile_kwargs) -> None:
    """torch.compile a network in place, block by block: each MiT or SAM block and each DAFormer head on its own (a
    network of none of them, the SSR branch, whole), with static shapes, so the blocks of a stage share one graph.
    Measured (bench.py --items 5, 2-core CPU, MiT-B5, crop 128, SAM at 256): bf16 6.89 -> 5.87 s per ssr iteration
    after about 195 s of compiling; fp32 6.94 -> 8.09 s; at the demo's sizes no change. GPU: not yet measured."""
    if net is None:
        return
    # a graph per stage and use (training, the teacher's no-grad pass, evaluation): past dynamo's 8, they run eager
    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 32)
    regions = [m for m in net.modules() if isinstance(m, (mit.Block, sam_encoder.Block, ssr.DAFormerHead))]
    for m in regions or [net]:
        m.compile(dynamic=False, **compile_kwargs)


def cast_frozen_weights(net: nn.Module | None, dtype: torch.dtype | None) -> None:
    """Store a frozen network's Linear and Conv2d weights and biases in autocast's dtype (None: fp32, nothing to
    do), once. Autocast would cast them again in every forward, one kernel each, to the same values (a rounding is
    a rounding): the outputs are bit-identical (tested), and a MiT-B5 pass runs 735 aten ops instead of 1465
    (bench.count_ops). LayerNorms keep fp32, as autocast runs them. train.py does it to the ImageNet copy only: the
    EMA teacher changes at every step, and SAM is built in the dtype whole. The run's state saves the cast weights,
    and a resumed run loads them as saved: a bf16 run continued with --amp fp32 keeps the rounded values, so the
    feature distance measures against the same network throughout.
    Measured (bench.py --items 7, bf16, MiT-B5, crop 128, SAM at 256, MIC), 2-core CPU: 3.21 -> 3.20 s per ssr
    iteration, no change (the ImageNet copy's pass alone, crop 512, batch 2: 0.497 -> 0.456 s). GPU, where every
    op costs the host its launch: not yet measured (suite.py runs item 7)."""
    if net is None or dtype is None:
        return
    for m in net.modules():
        if isinstance(m, (nn.Linear, nn.Conv2d)):
            m.to(dtype)


def cuda_graph(fn: Callable[[Tensor], object], x: Tensor) -> Callable[[], object]:
    """fn(x) captured as a CUDA graph -> replay(): fn run again on what x holds then, its output written where the
    capture's was, and returned. Three warm-up calls on a side stream first, so that cuDNN's autotuning and lazy
    set-up are done, not captured."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(3):
            fn(x)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    # thread_local: the train loader's pin-memory thread (and NCCL's watchdog) call CUDA meanwhile; in the default
    # 'global' mode such a call from another thread breaks the capture, and the loader with it
    with torch.cuda.graph(graph, capture_error_mode="thread_local"):
        out = fn(x)

    def replay() -> object:
        graph.replay()
        return out
    return replay


def graph_frozen(net: nn.Module | None, sample: Tensor, dtype: torch.dtype | None) -> None:
    """train.py --cuda-graphs: a frozen network's forward captured once as a CUDA graph (cuda_graph), on `sample`'s
    shape and dtype, under autocast to `dtype` (None: fp32), and replayed by every later call. In eager mode the
    host launches a pass's ops one by one (the EMA teacher's: 1534 aten ops per bf16 pass, bench.count_ops), so a
    host-bound step waits on them; a replay is one launch. Valid as the shapes are fixed and the weights change
    only in place (the EMA update's foreach ops, load_state_dict): the graph reads them where they lie. The
    outputs are the graph's own memory, which the next call overwrites: UDA.forward uses them within its iteration.
    The warm-up's passes move the BatchNorm statistics of the EMA teacher's head: they are put back.
    GPU: not yet measured (suite.py runs train.py --cuda-graphs and bench.py item 6)."""
    if net is None:
        return
    saved = [b.clone() for b in net.buffers()]
    static = sample.clone()  # the graph's input, refilled at every call
    amp = torch.autocast("cuda", dtype=dtype, cache_enabled=False) if dtype else contextlib.nullcontext()
    with torch.no_grad(), amp:  # no cache: a cast cached during the capture would be freed under the graph
        replay = cuda_graph(net, static)
        for buffer, value in zip(net.buffers(), saved):
            buffer.copy_(value)

    def forward(x: Tensor) -> object:
        if x.shape != static.shape or x.dtype != static.dtype:
            raise ValueError(f"{type(net).__name__} was captured as a CUDA graph on {tuple(static.shape)} "
                             f"{static.dtype} and called on {tuple(x.shape)} {x.dtype}: shapes and dtypes must not "
                             f"change.")
        static.copy_(x)
        return replay()
    net.forward = forward  # an instance attribute: nn.Module.__call__ runs it in place of the class's forward


def graph_frozen_networks(uda: ssr.UDA, sam: nn.Module | None, batch_size: int, crop: int,
                          dtype: torch.dtype | None) -> None:
    """train.py --cuda-graphs: graph_frozen on the networks that UDA.forward runs without gradients, each on an input
    of the shape and dtype it gets there: the EMA teacher (the target crops), the ImageNet copy (the source crops),
    SAM (the source and mixed crops resized to its input side, in its dtype)."""
    device = next(uda.parameters()).device
    image = torch.randn(batch_size, 3, crop, crop, device=device)
    graph_frozen(uda.ema, image, dtype)
    graph_frozen(uda.imnet, image, dtype)
    if sam is not None:
        S = uda.sam_img_size
        graph_frozen(sam, torch.randn(2 * batch_size, 3, S, S, device=device, dtype=next(sam.parameters()).dtype),
                     dtype)


def apply(uda: ssr.UDA, sam: nn.Module | None, dtype: torch.dtype | None, batch_size: int, crop: int,
          compiled: bool = False, cuda_graphs: bool = False, cast: bool = True) -> None:
    """The levers train.py applies to its networks, in place (bench.py calls this too, so it times what train.py
    runs): the ImageNet copy's weights cast once to the autocast dtype (`cast=False`: left to autocast, for timing
    the difference), then --compile or --cuda-graphs."""
    if cast:
        cast_frozen_weights(uda.imnet, dtype)
    for net in (uda.student, uda.ema, uda.imnet, uda.ssr, sam) if compiled else ():
        compile_blocks(net)
    if cuda_graphs:
        graph_frozen_networks(uda, sam, batch_size, crop, dtype)
