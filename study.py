"""The demo's study: each setting trained by train.py --demo itself, for several seeds, reported as a markdown
table (each setting's part of the domain gap closed, paired differences to source only and to dacs with their 95%
intervals, the smallest difference the study detects) and a chart.

    python study.py                            # 7 settings x 8 seeds; writes runs/study/study.md and study.png
    python study.py --seeds 2 --iters 200 --settings dacs,ssr-toy --out runs/quick

Each run is a train.py subprocess on one core, two at a time; a run whose folder holds its result is not run
again, and one cut short continues (--resume), so a stopped study goes on where it stopped when run again. A stop
(Ctrl-C, SIGTERM, SIGHUP) reaches the runs in flight, which save and end. The data and the toy networks are made
once before the first run (toys.prepare); --out is checked before that.
"""
import argparse
import json
import math
import os
import signal
import subprocess
import sys
import threading
import time
import warnings
from concurrent.futures import ThreadPoolExecutor

import numpy as np

import data
import demo
import files
import pictures
import processes
import toys


SETTINGS = {  # name -> train.py flags on top of --demo
    "source-only": ["--method", "source-only"],
    "oracle": ["--method", "source-only", "--src", "cityscapes"],  # trained on the target's own train labels
    "dacs": ["--method", "dacs"],
    "ssr-random": ["--method", "ssr", "--sam-weights", "none"],
    "ssr-toy": ["--method", "ssr"],  # the toy teacher: --demo's default for ssr
    "ssr-shuffled": ["--method", "ssr", "--ssr-context", "shuffled"],
    "ssr-zeros": ["--method", "ssr", "--ssr-context", "zeros"],
}
TITLES = {"source-only": "source only", "oracle": "target oracle", "dacs": "dacs", "ssr-random": "ssr, random teacher",
          "ssr-toy": "ssr, toy teacher", "ssr-shuffled": "ssr, shuffled tokens", "ssr-zeros": "ssr, zero context"}
# Student's t, 97.5% quantile by degrees of freedom: the half-width of a 95% interval is t * sd / sqrt(n)
T975 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262, 10: 2.228,
        11: 2.201, 12: 2.179, 13: 2.160, 14: 2.145, 15: 2.131, 20: 2.086, 30: 2.042}
# ... and its 80% quantile: a true difference of (t975 + t80) * sd / sqrt(n) shows (its 95% interval excludes 0) in
# 80% of studies, the usual power
T80 = {1: 1.376, 2: 1.061, 3: 0.978, 4: 0.941, 5: 0.920, 6: 0.906, 7: 0.896, 8: 0.889, 9: 0.883, 10: 0.879,
       11: 0.876, 12: 0.873, 13: 0.870, 14: 0.868, 15: 0.866, 20: 0.860, 30: 0.854}


def write_text(path: str, text: str) -> None:
    """Write path whole or not at all (files.save_atomic): a stopped study leaves no half result behind."""
    def write(tmp):
        with open(tmp, "w") as f:
            f.write(text)
    files.save_atomic(path, write)


def check_out(out: str) -> None:
    """Fail before the first run, not after the data, the pretrainings and a first hour of runs, where --out cannot
    hold the study's files (as the default runs/study in a read-only checkout)."""
    why = files.cannot_write(out)
    if why:
        raise files.FlagError(f"--out {out} cannot be written ({why}): the study keeps its runs, study.md and study.png "
                              f"there. Pass --out a folder you can write to, e.g. --out ~/ssr-study; nothing was run.")


def parse_final_table(stdout: str) -> dict:
    """The last per-class table that train.py printed (eval.print_table) -> dict(miou, iou: 19 values or NaN)."""
    lines = stdout.splitlines()
    start = max(i for i, line in enumerate(lines) if line.split() == ["class", "IoU"])
    iou = []
    for line in lines[start + 1:start + 1 + len(data.CLASSES)]:
        value = line.rsplit(None, 1)[-1]
        iou.append(float("nan") if value == "n/a" else float(value))
    miou = next(float(line.split()[1]) for line in lines[start:] if line.startswith("mIoU:"))
    return dict(miou=miou, iou=iou)


class Runs:
    """The train.py processes in flight, so that a stop of the study reaches them. A Ctrl-C at a terminal reaches
    every process of the job; a SIGTERM (kill, a scheduler) or a SIGHUP reaches the study alone, whose runs would
    go on without it, and a run started after the stop would too."""

    def __init__(self):
        self.running, self.lock, self.stopped = set(), threading.Lock(), False

    def run(self, cmd: list[str], env: dict) -> subprocess.CompletedProcess:
        """subprocess.run(cmd, capture_output=True, text=True, env=env), unless the study was stopped."""
        with self.lock:
            if self.stopped:
                raise KeyboardInterrupt
            child = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
            self.running.add(child)
        try:
            stdout, stderr = child.communicate()
        finally:
            with self.lock:
                self.running.discard(child)
        return subprocess.CompletedProcess(cmd, child.returncode, stdout, stderr)

    def stop(self) -> None:
        """SIGTERM to every run in flight: each finishes its iteration, saves and ends (train.py's loop), so
        that the study, run again, continues it; no run starts after this."""
        with self.lock:
            self.stopped = True
            for child in self.running:
                child.send_signal(signal.SIGTERM)


def run_setting(setting: str, seed: int, iters: int, out: str, data_root: str, amp: str | None,
                runs: Runs) -> dict:
    """Train one setting with train.py on one core (skipped when out holds its result already), one of `runs` ->
    dict(miou, iou, seconds)."""
    result_path = os.path.join(out, "study_result.json")
    if os.path.isfile(result_path):
        with open(result_path) as f:
            return json.load(f)
    sched = demo.schedule(iters)
    cmd = [sys.executable, os.path.join(os.path.dirname(os.path.abspath(__file__)), "train.py"), "--demo",
           *SETTINGS[setting], "--seed", str(seed), "--iters", str(iters), "--warmup", str(sched["warmup"]),
           "--ema-alpha", str(sched["ema_alpha"]), "--out", out, "--data-root", data_root, "--eval-every", "0",
           "--save-every", str(iters), "--debug-every", "0", "--workers", "0"] + (["--amp", amp] if amp else [])
    if os.path.exists(os.path.join(out, "train_state.pt")):  # a run cut short (a stop of the study): continue it
        cmd.append("--resume")
    t0 = time.time()
    env = dict(os.environ, OMP_NUM_THREADS="1")  # two runs at a time, one core each (study())
    run = runs.run(cmd, env)
    if run.returncode:
        raise files.UserError(f"{' '.join(cmd)} failed (exit status {run.returncode}): "
                             f"{' '.join(run.stderr.split()[-60:])}")
    result = dict(parse_final_table(run.stdout), seconds=time.time() - t0)
    write_text(result_path, json.dumps(result))
    return result


def t_quantile(table: dict, df: int) -> float:
    """The t quantile for df degrees of freedom from one of the tables above (the next lower df where it has none:
    a slightly wider interval, never a narrower one)."""
    return table[max(k for k in table if k <= df)] if df >= 1 else float("nan")


def mean_sd_ci(xs: list[float]) -> tuple[float, float, float]:
    """Mean, sample sd and the half-width of the 95% t-interval of the mean."""
    n = len(xs)
    sd = float(np.std(xs, ddof=1)) if n > 1 else 0.0
    return float(np.mean(xs)), sd, t_quantile(T975, n - 1) * sd / math.sqrt(n) if n > 1 else float("nan")


def detectable(sd: float, n: int) -> float:
    """The smallest true mean difference that n paired seeds with differences of this sd detect at 95% confidence
    with 80% power."""
    return (t_quantile(T975, n - 1) + t_quantile(T80, n - 1)) * sd / math.sqrt(n)


def seeds_needed(sd: float, difference: float) -> int:
    """The fewest seeds whose study detects a true difference of this size (detectable) at this sd of paired
    differences: the study's size, chosen before it runs."""
    return next(n for n in range(2, 31) if detectable(sd, n) <= difference)


def gap_closed(results: dict, name: str, seeds: list[int]) -> list[float]:
    """Per seed, the fraction of the domain gap that a setting closes: (setting - source only) / (oracle - source
    only), in %; 0 is source only, 100 the target oracle."""
    so, oracle = results["source-only"], results["oracle"]
    return [100 * (results[name][s]["miou"] - so[s]["miou"]) / (oracle[s]["miou"] - so[s]["miou"]) for s in seeds]


def study_markdown(results: dict, seeds: list[int], note: str = "") -> str:
    """results[setting][seed] = dict(miou, iou) -> the study's markdown: target mIoU per seed, mean, sd, the gap
    closed, the paired differences to source only and to dacs with their 95% intervals and the smallest difference
    the study could detect, and the per-class IoU of every setting (means over seeds)."""
    names = list(results)
    rows = ["| seed | " + " | ".join(TITLES.get(n, n) for n in names) + " |", "|---" * (len(names) + 1) + "|"]
    rows += [f"| {s} | " + " | ".join(f"{results[n][s]['miou']:.2f}" for n in names) + " |" for s in seeds]
    stats = {n: mean_sd_ci([results[n][s]["miou"] for s in seeds]) for n in names}
    rows.append("| mean | " + " | ".join(f"**{stats[n][0]:.2f}**" for n in names) + " |")
    rows.append("| sd | " + " | ".join(f"{stats[n][1]:.2f}" for n in names) + " |")
    def interval(m, _, half):
        return f"{m:+.2f} [{m - half:+.2f}, {m + half:+.2f}]"

    if "source-only" in results and "oracle" in results:
        gaps = {n: mean_sd_ci(gap_closed(results, n, seeds)) for n in names}
        rows.append("| gap closed (%), same seed: mean [95% interval] | " + " | ".join(
            "-" if n in ("source-only", "oracle") else interval(*gaps[n]) for n in names) + " |")
    for base in ("source-only", "dacs"):
        if base in results:
            diffs = {n: [results[n][s]["miou"] - results[base][s]["miou"] for s in seeds] for n in names}
            rows.append(f"| minus {TITLES[base]}, same seed: mean [95% interval] | " + " | ".join(
                "-" if n == base else interval(*mean_sd_ci(diffs[n])) for n in names) + " |")
            rows.append(f"| smallest difference to {TITLES[base]} this study detects (95%, power 80%) | " + " | ".join(
                "-" if n == base else f"{detectable(mean_sd_ci(diffs[n])[1], len(seeds)):.2f}" for n in names) + " |")
    lines = ([note, ""] if note else []) + ["Target mIoU (%) on the demo's Cityscapes-like val set:", ""] + rows
    with warnings.catch_warnings():  # a class absent from the val labels and every prediction is NaN throughout
        warnings.simplefilter("ignore", RuntimeWarning)
        per_class = {n: np.nanmean([results[n][s]["iou"] for s in seeds], axis=0) for n in names}
    lines += ["", "Per-class IoU (%), mean over seeds:", "",
              "| class | " + " | ".join(TITLES.get(n, n) for n in names) + " |", "|---" * (len(names) + 1) + "|"]
    for c, name in enumerate(data.CLASSES):
        if not all(math.isnan(per_class[n][c]) for n in names):
            lines.append(f"| {name} | " + " | ".join(f"{per_class[n][c]:.2f}" for n in names) + " |")
    return "\n".join(lines) + "\n"


def study(seeds: list[int], iters: int, out: str, data_root: str, settings: list[str], amp: str | None,
          jobs: int = 2) -> str:
    """Run every setting for every seed, `jobs` runs at a time on one core each (on 2 cores two one-core runs get
    through 1.5x the iterations of one two-core run), write out/study.md and out/study.png, return the markdown."""
    uses_teacher = any("--sam-weights" not in SETTINGS[n] and "zeros" not in SETTINGS[n] for n in settings
                       if SETTINGS[n][1] == "ssr")
    toys.prepare(data_root, toys.teacher_path() if uses_teacher else None, toys.imagenet_path())  # once, first
    results, t0, runs = {n: {} for n in settings}, time.time(), Runs()
    todo = [(n, seed) for seed in seeds for n in settings]

    def run(job):
        n, seed = job
        r = run_setting(n, seed, iters, os.path.join(out, f"{n}_seed{seed}"), data_root, amp, runs)
        print(f"{n} seed {seed}: target mIoU {r['miou']:.2f} ({r['seconds']:.0f} s)", flush=True)
        return job, r

    with ThreadPoolExecutor(jobs) as pool:
        try:
            for (n, seed), r in pool.map(run, todo):
                results[n][seed] = r
        except BaseException as e:  # a failed run or a stop: start no queued run; a stop ends the running ones
            if isinstance(e, KeyboardInterrupt):
                runs.stop()
            pool.shutdown(cancel_futures=True)  # waits for the running ones to end
            raise
    wall = time.time() - t0
    note = (f"{len(seeds)} seeds, {iters} iterations, {amp or 'fp32'}, {jobs} runs at a time; `python study.py "
            f"--seeds {len(seeds)} --iters {iters}" + (f" --amp {amp}" if amp else "") + (
                f" --settings {','.join(settings)}" if settings != list(SETTINGS) else "") + f"`; {wall:.0f} s")
    md = study_markdown(results, seeds, note)
    write_text(os.path.join(out, "study.md"), md)
    chart = pictures.study_chart({TITLES.get(n, n): [results[n][s]["miou"] for s in seeds] for n in results})
    chart.save(os.path.join(out, "study.png"))
    print(md + f"\nwrote {os.path.join(out, 'study.md')} and study.png; {wall:.0f} s", flush=True)
    return md


# ----------------------------------------------------------------------------------------------------------------
# command line

def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seeds", type=int, default=8, help="seeds 0 .. N-1 (8: the README's power calculation)")
    p.add_argument("--iters", type=int, default=demo.FLAGS["iters"],
                   help="training iterations per run; the warm-up and EMA horizon follow demo.schedule()")
    p.add_argument("--out", default="runs/study", help="folder for the runs, study.md and study.png")
    p.add_argument("--data-root", default=demo.FLAGS["data_root"], help="the demo data (written there if absent)")
    p.add_argument("--settings", default=",".join(SETTINGS), help=f"comma-separated among {', '.join(SETTINGS)}")
    p.add_argument("--jobs", type=int, default=2, help="runs at a time, one core each")
    p.add_argument("--amp", choices=["bf16", "fp16", "fp32"],
                   help="train.py --amp for every run (default: train.py's, fp32 on a CPU)")
    args = p.parse_args()
    processes.stops_interrupt()  # SIGTERM and SIGHUP too stop the study as Ctrl-C does, with its line
    try:
        settings = [x for x in args.settings.split(",") if x]
        if not settings or any(x not in SETTINGS for x in settings):
            raise files.FlagError(f"--settings {args.settings!r}: choose among {', '.join(SETTINGS)}, "
                                  f"comma-separated.")
        if args.seeds <= 0 or args.iters <= 0 or args.jobs <= 0:
            raise files.FlagError("--seeds, --iters and --jobs must be positive.")
        check_out(args.out)
        study(list(range(args.seeds)), args.iters, args.out, args.data_root, settings, args.amp, args.jobs)
    except files.UserError as e:
        sys.exit(f"error: {e}")
    except KeyboardInterrupt:  # one line and the status of a Ctrl-C, as train.py, eval.py and toys.py
        print("stopped; nothing half-written was left behind (a study continues where it stopped when run again)",
              file=sys.stderr)
        sys.exit(130)


if __name__ == "__main__":
    main()
