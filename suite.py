"""The GPU suite: everything one short window on a GPU should answer, in one call of about 9 minutes.

    python suite.py                                  # on cuda: every GPU figure of the README, one log
    python suite.py --baseline ../old                # also item 3 of another checkout, for a before/after
    python suite.py --profile-train 30 5 --method ssr --mic --data-root data ...   # where the loop's time goes
    python suite.py --tiny --device cpu              # its CPU parts at the demo's sizes (the test)

The programs run as a user runs them, each in its own process under a time limit (a hung compilation or a crash
costs that figure only), on files of the datasets' sizes (GTA5 1914x1052, Cityscapes 2048x1024, drawn by demo.py:
they compress and decode like photos) from random weights, most important first:
  1. train.py --method ssr --mic: its steady rate, its peak memory;
  2. the same loop profiled (--profile-train): per iteration, the host waiting for data, the host-to-device copies,
     the device's busy and idle time, the host blocked in synchronizations, the ops that took the most time;
  3. bench.py item 3 in bf16 with MIC: the bare step of ssr and dacs, the FLOPs of each (torch.utils.flop_counter)
     and the card's bf16 matmul rate, which the model FLOP utilization is read against;
  4. a stop (SIGTERM) and --resume, checked to continue from the saved state;
  5. eval.py on the saved model; train.py --method dacs --mic (what ssr costs) and --ssr-context shuffled;
  then one summary line (the 40k run's hours, ssr's cost over dacs, TFLOP per iteration, MFU), and, on cuda only,
  the levers: train.py --cuda-graphs, bench.py items 6 and 7, eval.py --amp bf16, train.py --compile, item 5, item 3
  in fp32.
"""
import argparse
import glob
import os
import re
import runpy
import shutil
import signal
import subprocess
import sys
import tempfile
import time

import torch

import bench
import data
import files

# ------------------------------------------------------------------------------------------------------------------
# the loop's profile

def profile_train(argv: list[str], start: int, n: int) -> str:
    """train.py with argv, run in this process as a user runs it, with its iterations start .. start+n-1 under
    torch.profiler; -> where their time went. The loader is wrapped (data.make_train_loader): each batch it hands
    over marks an iteration, and the wait for it is recorded as such. Read from the profile, per iteration: the
    wall time; the host waiting for data; on the device, the host-to-device copies and the busy time of the kernels
    (their union), and its idle time; the host blocked in synchronizations (a .item(), a cudaStreamSynchronize);
    then the ops that took the most time, on the device and on the host (costliest)."""
    from torch.profiler import ProfilerActivity, record_function, schedule

    cuda = torch.cuda.is_available()
    prof = torch.profiler.profile(activities=[ProfilerActivity.CPU] + [ProfilerActivity.CUDA] * cuda,
                                  schedule=schedule(wait=max(start - 1, 0), warmup=1, active=n, repeat=1))
    make_loader, made = data.make_train_loader, []

    def marked_loader(*args, **kwargs):
        batches = make_loader(*args, **kwargs)
        made.append(batches)
        while True:
            with record_function(WAIT):
                batch = next(batches)
            yield batch
            prof.step()  # the loop asks for the next batch once per iteration

    data.make_train_loader = marked_loader
    sys.argv = ["train.py"] + argv + ["--iters", str(start + n + 2)]
    prof.start()
    try:
        runpy.run_path("train.py", run_name="__main__")
    except SystemExit as e:
        if e.code:
            raise
    finally:
        data.make_train_loader = make_loader
        for batches in made:  # its workers stopped now: left to the cyclic gc, each would cost 5 s (data.CleanLoader)
            batches.close()
    prof.stop()
    averages = prof.key_averages()
    return "\n    ".join([loop_split(prof.events(), n, cuda)] + [
        f"{what} by op, per iteration: {costliest(averages, n, key)}" for what, key in (
            ("device time", "self_device_time_total"), ("host time", "self_cpu_time_total"))[not cuda:]])


WAIT = "waiting for the next batch"
SYNCS = ("cudaStreamSynchronize", "cudaDeviceSynchronize", "cudaEventSynchronize")


def loop_split(events, n: int, cuda: bool) -> str:
    """The split of profile_train's events (a torch.profiler event list over n iterations), ms per iteration."""
    ms = lambda us: f"{us / n / 1e3:.1f} ms"  # noqa: E731 (the events' times are in microseconds)
    steps = [e for e in events if e.name.startswith("ProfilerStep")]
    wall = sum(e.time_range.elapsed_us() for e in steps)
    waits = sum(e.cpu_time_total for e in events if e.name == WAIT)
    text = f"{ms(wall)} per iteration: waiting for data {ms(waits)}"
    if not cuda:
        return text + f", the rest on the CPU {ms(wall - waits)}"
    device = sorted((e.time_range.start, e.time_range.end) for e in events if e.device_type.name == "CUDA")
    busy, end = 0, 0  # the union of the device's intervals: overlapping kernels count once
    for a, b in device:
        busy += max(b - max(a, end), 0)
        end = max(end, b)
    copies = sum(e.time_range.elapsed_us() for e in events if e.device_type.name == "CUDA" and "HtoD" in e.name)
    syncs = sum(e.cpu_time_total for e in events if e.name in SYNCS)
    return text + (f", host-to-device copies {ms(copies)}, device busy {ms(busy)} (idle {ms(wall - busy)}), "
                   f"host blocked in synchronizations {ms(syncs)}")


def costliest(averages, n: int, key: str, k: int = 6) -> str:
    """The k ops of a profile (its key_averages(), over n iterations) that took the most `key` time, each with its
    ms and calls per iteration: on the device, the time of the kernels that each op launched itself; on the host,
    each op's own time (its children's excluded). What to make faster first, by name."""
    ops = [e for e in averages
           if e.device_type.name == "CPU" and e.key != WAIT and not e.key.startswith("ProfilerStep")]
    top = sorted(ops, key=lambda e: getattr(e, key), reverse=True)[:k]
    return ", ".join(f"{e.key} {getattr(e, key) / n / 1e3:.1f} ms ({e.count / n:.0f} calls)" for e in top)


# ------------------------------------------------------------------------------------------------------------------
# the programs as a user runs them

def loop_data(root: str, eval_root: str, tiny: bool, n_eval: int) -> None:
    """GTA5 and Cityscapes trees in root, of 24 scenes each at the datasets' sizes (the demo's with tiny), drawn by
    demo.py (street scenes: they compress and decode like photos, ~3 MB a PNG), with 8 drawn scenes in Cityscapes'
    val split: the evaluation that ends each train.py run reads only those. eval.py is timed on eval_root's val
    split of n_eval images, copies of the 8 (drawing is slow; decoding a copy costs the same)."""
    import demo
    sizes = {} if tiny else dict(src_size=(1914, 1052), tgt_size=(2048, 1024))  # GTA5's and Cityscapes' (W, H)
    demo.write_data(root, n_src=24, n_tgt=24, n_val=8, **sizes)
    val = sorted(glob.glob(os.path.join(root, "cityscapes", "leftImg8bit", "val", "*", "*_leftImg8bit.png")))
    for i in range(n_eval):
        stem = val[i % len(val)][: -len("_leftImg8bit.png")]
        for kind, suffix in (("leftImg8bit", "_leftImg8bit.png"), ("gtFine", "_gtFine_labelIds.png")):
            src = stem.replace(f"{os.sep}leftImg8bit{os.sep}", f"{os.sep}{kind}{os.sep}") + suffix
            dst = os.path.join(eval_root, os.path.relpath(src, root)).replace(suffix, f"_copy{i}{suffix}")
            os.makedirs(os.path.dirname(dst), exist_ok=True)
            shutil.copy(src, dst)


def run_script(script: str, args: list[str], timeout: float, cwd: str = ".", env: dict | None = None
               ) -> tuple[str, float]:
    """python `script` with `args` in a child process: (its output, the seconds it ran); a failure raises."""
    t0 = time.perf_counter()
    run = subprocess.run([sys.executable, script] + args, cwd=cwd, env=env, capture_output=True, text=True,
                         timeout=timeout)
    if run.returncode:
        raise RuntimeError(f"{script} failed: {(run.stderr or run.stdout).strip()[-600:]}")
    return run.stdout, time.perf_counter() - t0


def run_loop(root: str, out: str, flags: list[str], iters: int, warm: int, timeout: float) -> str:
    """train.py for `iters` iterations; its steady rate from log.jsonl after iteration `warm` (start-up, cuDNN's
    autotuning and compilation excluded) and its peak memory."""
    args = ["--data-root", root, "--out", out, "--iters", str(iters), "--log-every", str(max(1, warm // 2))]
    _, wall = run_script("train.py", args + flags, timeout, env=suite_env(out))
    rows = [r for r in files.read_log(os.path.join(out, "log.jsonl")) if "it_s" in r]
    a, b = next(r for r in rows if r["iter"] >= warm), rows[-1]
    rate = (b["iter"] - a["iter"]) / (b["elapsed_s"] - a["elapsed_s"])
    mem = [r["mem_gib"] for r in rows if "mem_gib" in r]  # cuda only: torch.cuda.max_memory_allocated
    return (f"{rate:.2f} it/s steady (iterations {a['iter']}-{b['iter']}){f', peak {max(mem):.1f} GiB' if mem else ''}"
            f", first {a['iter']} iterations {a['elapsed_s']:.0f} s, process {wall:.0f} s")


def suite_env(out: str) -> dict:
    return {**os.environ, "SSR_CACHE": out + "_cache"}  # the RCS statistics of the suite's own data


def run_stop_resume(root: str, out: str, flags: list[str], timeout: float) -> str:
    """A user's stop and --resume: SIGTERM to train.py after iteration 4 (it finishes the iteration, saves, exits
    130), then --resume for 3 more; checked: the resume starts at the saved iteration, in the same run, and ends
    where it should."""
    args = ["train.py", "--data-root", root, "--out", out, "--iters", "1000", "--log-every", "1"] + flags
    run = subprocess.Popen([sys.executable] + args, env=suite_env(out), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                           text=True)
    t0 = time.perf_counter()
    for line in run.stdout:
        if line.startswith("iter 4/"):
            run.send_signal(signal.SIGTERM)
        if time.perf_counter() - t0 > timeout:
            run.kill()
            raise subprocess.TimeoutExpired(args, timeout)
    if run.wait() != 130:
        raise RuntimeError(f"the stopped run exited {run.returncode}, not 130")
    saved = torch.load(os.path.join(out, "train_state.pt"), map_location="cpu", weights_only=True)
    stdout, _ = run_script("train.py", ["--out", out, "--resume", "--iters", str(saved["iter"] + 3)],
                           timeout - (time.perf_counter() - t0), env=suite_env(out))
    final = torch.load(os.path.join(out, "train_state.pt"), map_location="cpu", weights_only=True)
    ok = f"resuming {out} at iteration {saved['iter']}" in stdout and (final["iter"], final["run_id"]) == (
        saved["iter"] + 3, saved["run_id"])
    return (f"{'ok' if ok else 'WRONG'}: stopped by SIGTERM at iteration {saved['iter']} (exit 130), resumed there "
            f"in run {saved['run_id']}, saved again at iteration {final['iter']}")


def run_eval_files(root: str, ckpt: str, flags: list[str], timeout: float) -> str:
    """eval.py over root's val split: its own rate (loading included) and the command's time (start-up too)."""
    out, wall = run_script("eval.py", ["--ckpt", ckpt, "--data-root", root] + flags, timeout)
    n, rate = re.search(r"(\d+) images, ([\d.]+) images/s", out).groups()
    return (f"{n} images: evaluation {int(n) / float(rate):.1f} s ({rate} images/s), the command {wall:.1f} s "
            f"with start-up and model loading")


def run_bench(argv: list[str], timeout: float, cwd: str = ".", env: dict | None = None) -> str:
    """bench.py (this one or a baseline's) in a child process: its profile, if any, and its table."""
    out = run_script("bench.py", argv, timeout, cwd=cwd, env=env)[0]
    return "\n    ".join(line for line in out.splitlines() if line.strip() and not line.startswith("device "))


def summary(texts: dict[str, str]) -> str:
    """The suite's answer in one line, from its figures' texts: ssr --mic's steady rate and what it makes of a 40k
    run, ssr's cost over dacs --mic, the FLOPs of an iteration and the loop's model FLOP utilization."""
    def find(key: str, pattern: str) -> float | None:
        found = re.search(pattern, next((v for k, v in texts.items() if k.startswith(key)), ""))
        return float(found[1]) if found else None

    ssr_rate = find("train.py --method ssr --mic", r"([\d.]+) it/s steady")
    dacs_rate = find("train.py --method dacs", r"([\d.]+) it/s steady")
    flops = find("train iteration with mic", r"TFLOP per iteration: ssr ([\d.e+-]+)")
    peak = find("train iteration with mic", r"bf16 matmul (\d+) TFLOP/s")
    parts = [f"train.py --method ssr --mic {ssr_rate:.2f} it/s: 40,000 iterations in {40000 / ssr_rate / 3600:.1f} h"
             ] if ssr_rate else []
    if ssr_rate and dacs_rate:
        parts.append(f"ssr costs {dacs_rate / ssr_rate:.2f}x dacs --mic ({dacs_rate:.2f} it/s)")
    if ssr_rate and flops:
        parts.append(f"{flops:.4g} TFLOP per iteration, so the loop runs {flops * ssr_rate:.3g} TFLOP/s"
                     + (f", {100 * flops * ssr_rate / peak:.1f}% of the card's bf16 matmul rate ({peak:.0f} TFLOP/s)"
                        if peak else ""))
    return "summary: " + ("; ".join(parts) or "no steady rate was measured")


def run_gpu_suite(device: torch.device, tiny: bool, repeats: int, warmup: int, budget: float,
                  baseline: str | None) -> None:
    """Everything one GPU window should answer, each measurement in its own process (a hung compilation or a crash
    costs that figure only) under a time limit, most important first, as a user runs the programs (loader workers
    and all) on files of the datasets' sizes from random weights: train.py --method ssr --mic and its steady rate,
    peak memory and MFU; the profile of that loop; item 3 (the bare step, its FLOPs, the card's matmul rate); a stop
    and --resume; eval.py on the saved model; train.py --method dacs --mic (ssr's cost) and --ssr-context shuffled;
    cuda only: train.py --cuda-graphs, items 6 and 7, eval.py --amp bf16, train.py --compile, item 5, item 3 in fp32."""
    start, card = time.perf_counter(), bench.Setup(device).device_name()
    dev = ["--device", str(device), "--repeats", str(repeats), "--warmup", str(warmup)] + ["--tiny"] * tiny
    # profiled: reading the profiler's events costs ~1 s per iteration on the CPU
    n_eval, iters, warm, profiled = (8, 4, 2, 2) if tiny else (200, 110, 30, 5)
    texts = {}

    def report(what: str, limit: float, fn) -> None:
        left = budget - (time.perf_counter() - start)
        try:
            result = fn(min(limit, left)) if left >= 20 else f"not run ({budget:.0f} s budget spent)"
        except subprocess.TimeoutExpired as e:
            result = f"TIMEOUT after {e.timeout:.0f} s"
        except Exception as e:  # a failing lever (e.g. a compile error) must not cost the rest of the suite
            result = f"FAILED {type(e).__name__}: {' '.join(str(e).split())[-600:]}"
        texts[what] = result
        print(f"[{card}] {what} (at {time.perf_counter() - start:.0f} s):\n    {result}", flush=True)

    tmp = tempfile.mkdtemp(prefix="ssr-bench-")
    try:
        evals = os.path.join(tmp, "eval")  # eval.py's data
        loop_data(tmp, evals, tiny, n_eval)
        print(f"[{card}] synthetic data written in {time.perf_counter() - start:.0f} s", flush=True)
        flags = ["--pretrained", "none", "--eval-every", "0", "--save-every", "0", "--debug-every", "0"]
        flags += ["--demo"] * tiny  # the demo's sizes
        ssr_mic, ckpt = flags + ["--method", "ssr", "--mic", "--sam-weights", "none"], f"{tmp}/ssr/model.safetensors"
        report("train.py --method ssr --mic", 180, lambda t: run_loop(
            tmp, os.path.join(tmp, "ssr"), ssr_mic, iters, warm, t))
        prof = ["--profile-train", str(warm), str(profiled), "--data-root", tmp, "--out", f"{tmp}/profiled",
                "--log-every", "0"] + ssr_mic

        def profiled_loop(timeout: float) -> str:
            out = run_script("suite.py", prof, timeout, env=suite_env(f"{tmp}/profiled"))[0]
            return out[out.index("profile of"):].strip()  # train.py's own lines come first
        report(f"where the loop's time goes: train.py --method ssr --mic, iterations {warm}-{warm + profiled - 1} "
               f"profiled", 150, profiled_loop)
        report("train iteration with mic, eager bf16 (item 3: the bare step and its FLOPs)", 150, lambda t: run_bench(
            dev + ["--items", "3", "--dtype", "bf16", "--mic"], t))
        report("a stop and --resume (train.py --method ssr --mic)", 150, lambda t: run_stop_resume(
            tmp, os.path.join(tmp, "resumed"), ssr_mic, t))
        report(f"eval.py, {n_eval} Cityscapes-sized files", 90, lambda t: run_eval_files(
            evals, ckpt, ["--device", str(device)], t))
        report("train.py --method dacs --mic", 120, lambda t: run_loop(
            tmp, os.path.join(tmp, "dacs"), flags + ["--method", "dacs", "--mic"], iters, warm, t))
        report("train.py --method ssr --ssr-context shuffled", 90, lambda t: run_loop(
            tmp, os.path.join(tmp, "shuffled"), flags + ["--method", "ssr", "--sam-weights", "none", "--ssr-context",
                                                         "shuffled"], iters, warm, t))
        print(f"[{card}] {summary(texts)}", flush=True)
        if baseline:
            report(f"baseline {baseline}: train iteration, eager bf16 (item 3)", 120, lambda t: run_bench(
                dev + ["--items", "3", "--dtype", "bf16"], t, cwd=baseline))
        if device.type != "cuda":
            print(f"[{card}] the compiled levers run on cuda only", flush=True)
            return
        report("train.py --method ssr --mic --cuda-graphs", 120, lambda t: run_loop(
            tmp, os.path.join(tmp, "ssr_graphs"), ssr_mic + ["--cuda-graphs"], iters, warm, t))
        report("ssr iteration with CUDA graphs vs eager, bf16 (item 6)", 120, lambda t: run_bench(
            dev + ["--items", "6", "--dtype", "bf16", "--mic"], t))
        report("ssr iteration with the ImageNet copy's weights cast once vs by autocast, bf16 (item 7)", 120,
               lambda t: run_bench(dev + ["--items", "7", "--dtype", "bf16", "--mic"], t))
        report(f"eval.py --amp bf16, {n_eval} Cityscapes-sized files", 90, lambda t: run_eval_files(
            evals, ckpt, ["--device", "cuda", "--amp", "bf16"], t))
        # compilation (the first iterations) is read apart from the steady rate after it
        report("train.py --method ssr --mic --compile", 400, lambda t: run_loop(
            tmp, os.path.join(tmp, "ssr_compiled"), ssr_mic + ["--compile"], iters + 100, warm + 100, t))
        report("ssr iteration compiled vs eager, bf16 (item 5)", 240, lambda t: run_bench(
            dev + ["--items", "5", "--dtype", "bf16"], t))
        report("train iteration, eager fp32 (item 3)", 90, lambda t: run_bench(dev + ["--items", "3"], t))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)  # ~2 GB of images and checkpoints at the paper's sizes


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="cpu, cuda, cuda:1, ...")
    p.add_argument("--tiny", action="store_true", help="the demo's sizes and tiny models: the CPU-runnable parts")
    p.add_argument("--budget", type=float, default=540, help="no measurement starts after this many seconds")
    p.add_argument("--baseline", help="another checkout (git worktree add DIR COMMIT) whose bench.py item 3 runs too")
    p.add_argument("--repeats", type=int, help="bench.py's timed calls per model (default 10, 3 on cpu)")
    p.add_argument("--warmup", type=int, help="bench.py's untimed calls first (default 3, 1 on cpu)")
    p.add_argument("--profile-train", nargs=2, type=int, metavar=("START", "N"),
                   help="instead of the suite: run train.py with the flags that follow (e.g. --method ssr --mic) "
                        "and profile its real loop at iterations START..START+N-1")
    args, train_flags = p.parse_known_args(argv)
    if args.profile_train:
        print(f"profile of iterations {args.profile_train[0]}-{sum(args.profile_train) - 1}: "
              f"{profile_train(train_flags, *args.profile_train)}")
        return
    if train_flags:
        p.error(f"unrecognized arguments: {' '.join(train_flags)}")
    bad = [f"--{flag} {v:g}" for flag, v, least in (("repeats", args.repeats, 1), ("warmup", args.warmup, 0),
                                                    ("budget", args.budget, 20)) if v is not None and v < least]
    if bad:  # under 20 s left, report() starts no measurement
        sys.exit(f"error: {', '.join(bad)}: --repeats must be positive, --warmup at least 0 and --budget at least 20 "
                 f"seconds.")
    if args.baseline and not os.path.isfile(os.path.join(args.baseline, "bench.py")):
        sys.exit(f"error: --baseline {args.baseline} holds no bench.py; give a checkout of this project, e.g. made "
                 f"with git worktree add {args.baseline} COMMIT.")
    s = bench.Setup(bench.device_or_exit(args.device), repeats=args.repeats, warmup=args.warmup, tiny=args.tiny)
    if not s.cuda and not args.tiny:
        sys.exit("error: suite.py needs a CUDA device (or --tiny, which runs its CPU-runnable parts at tiny sizes).")
    print(f"device {s.device} ({s.device_name()}), torch {torch.__version__}", flush=True)
    run_gpu_suite(s.device, s.tiny, s.repeats, s.warmup, args.budget, args.baseline)


if __name__ == "__main__":
    main()
