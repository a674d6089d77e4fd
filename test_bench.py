"""Smoke test of bench.py: every item runs on tiny models and lands in the table with its ratio (no timing asserts:
machines are noisy)."""
import os
import re
import subprocess
import sys

_BENCH_ROOT = os.path.dirname(os.path.abspath(__file__))


def test_bench_tiny_prints_every_item_with_ratios():
    # One thread: tiny ops on threads that other processes keep busy can take 100x longer, and only the table
    # matters here.
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    run = subprocess.run([sys.executable, "bench.py", "--tiny", "--repeats", "1", "--warmup", "0"], cwd=_BENCH_ROOT,
                         env=env, capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr[-2000:]
    out = run.stdout
    assert "skipped" not in out, out  # transformers and segment_anything are test requirements
    lines = out.splitlines()
    header = next(i for i, line in enumerate(lines) if line.startswith("item"))
    assert "time ratio" in lines[header] and "mem ratio" in lines[header]
    rows = {line[0]: line for line in lines[header + 1:] if line[:1].isdigit()}
    assert sorted(rows) == ["1", "2", "3", "4"], out
    number = r"\d+\.\d\d"
    for item in "123":  # ours / reference: a time ratio, and the outputs of items 1 and 2 agree with the reference
        assert re.search(rf"\s{number}\s", rows[item]), rows[item]
    for item in "12":
        diff = float(re.search(r"max\|diff\| (\S+)", rows[item])[1])
        assert diff < 1e-4, rows[item]
    assert re.search(rf"{number} images/s", rows["4"]), rows["4"]


def test_bench_rejects_unknown_item():
    run = subprocess.run([sys.executable, "bench.py", "--tiny", "--items", "5"], cwd=_BENCH_ROOT,
                         capture_output=True, text=True, timeout=60)
    assert run.returncode != 0
    assert "error: --items 5" in run.stderr and "Traceback" not in run.stderr
