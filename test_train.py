import os
import runpy
import signal
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

import data

HERE = os.path.dirname(os.path.abspath(__file__))


@pytest.fixture(scope="module")
def _train_root(tmp_path_factory):
    """A small tree of the synthetic domains, in the GTA5 and Cityscapes layouts, where --demo looks for it."""
    root = str(tmp_path_factory.mktemp("train") / "demo")
    data.make_demo_data(root, seed=0, n_src=12, n_tgt=12, n_val=4)
    return root


def _train_cmd(root, out, *extra, torchrun=None):
    """train.py on the demo path with a smaller crop and SAM input, so that one iteration takes a fraction of a second."""
    launch = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={torchrun}"] if torchrun else [sys.executable]
    return launch + [os.path.join(HERE, "train.py"), "--demo", "--data-root", root, "--out", str(out), "--crop", "64",
                     "--sam-img-size", "64", "--workers", "0", "--log-every", "1", *extra]


def _run(cmd):
    env = dict(os.environ, OMP_NUM_THREADS="1")  # several processes share 2 cores
    return subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=HERE, timeout=300)


@pytest.mark.parametrize("method", ["ssr", "dacs", "source-only"])
def test_train_each_method_end_to_end(_train_root, tmp_path, method):
    extra = ["--mic"] if method == "dacs" else []
    r = _run(_train_cmd(_train_root, tmp_path, "--method", method, "--iters", "3", "--eval-every", "0", *extra))
    assert r.returncode == 0, r.stderr
    assert "target mIoU:" in r.stdout
    sd = load_file(tmp_path / "model.safetensors")
    # the deployable model: backbone and head only, whatever the method trained with
    assert sd and all(k.startswith(("backbone.", "decode_head.")) for k in sd)
    state = torch.load(tmp_path / "train_state.pt", weights_only=True)
    assert state["iter"] == 3
    assert any(k.startswith("ssr.") for k in state["uda"]) == (method == "ssr")
    assert any(k.startswith("ema.") for k in state["uda"]) == (method != "source-only")
    logged = [line for line in open(tmp_path / "log.jsonl")]
    assert len(logged) == 4  # 3 progress lines and the final evaluation


def test_train_resume_is_bit_identical(_train_root, tmp_path):
    """A run stopped by SIGTERM somewhere in the middle and resumed ends with exactly the weights of a run that
    was never stopped. Where it stops does not matter, so the race of the signal with the loop is harmless."""
    common = ["--method", "ssr", "--iters", "10", "--eval-every", "0", "--save-every", "100"]
    ref, cut = tmp_path / "ref", tmp_path / "cut"
    assert _run(_train_cmd(_train_root, ref, *common)).returncode == 0

    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.Popen(_train_cmd(_train_root, cut, *common), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env=env, cwd=HERE)
    for line in proc.stdout:
        if line.startswith("iter 2/"):
            proc.send_signal(signal.SIGTERM)
            break
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 130, err
    assert "stopped at iteration" in out
    stopped = torch.load(cut / "train_state.pt", weights_only=True)["iter"]
    assert 2 <= stopped < 10

    r = _run(_train_cmd(_train_root, cut, *common, "--resume"))
    assert r.returncode == 0, r.stderr
    assert f"resuming {cut} at iteration {stopped}" in r.stdout
    a, b = load_file(ref / "model.safetensors"), load_file(cut / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    # the optimizer and teacher state agree too, not only the student
    sa, sb = (torch.load(d / "train_state.pt", weights_only=True) for d in (ref, cut))
    assert all(torch.equal(sa["uda"][k], sb["uda"][k]) for k in sa["uda"])


def test_train_torchrun_two_cpu_processes_agree(_train_root, tmp_path):
    r = _run(_train_cmd(_train_root, tmp_path, "--method", "dacs", "--iters", "3", "--eval-every", "0", torchrun=2))
    assert r.returncode == 0, r.stderr
    assert "ranks agree on the weights: True" in r.stdout
    assert "1 x cpu" not in r.stdout and "2 x cpu" in r.stdout


def _train_inprocess(monkeypatch, capsys, *argv):
    """Run train.py's bad-input checks in this process (they stop before any training): the message and the
    exit status a user sees, without a new interpreter per case."""
    monkeypatch.setattr(sys, "argv", ["train.py", *argv])
    with pytest.raises(SystemExit) as e:
        runpy.run_path(os.path.join(HERE, "train.py"), run_name="__main__")
    return str(e.value.code)


@pytest.mark.parametrize("argv, expect", [
    (["--pretrained", "none", "--method", "ssr"], "--sam-weights"),
    (["--sam-weights", "none"], "--pretrained is required"),
    (["--pretrained", "none", "--method", "dacs", "--sam-weights", "sam.safetensors"], "only used by --method ssr"),
    (["--pretrained", "none", "--method", "dacs", "--crop", "1024"], "--crop 1024"),
    (["--pretrained", "none", "--method", "dacs", "--ssr-stages", "0,4"], "--ssr-stages"),
    (["--pretrained", "none", "--method", "dacs", "--resume", "--out", "{tmp}/nothing"], "--resume"),
    (["--pretrained", "{tmp}/missing.safetensors", "--backbone", "mit_b0", "--method", "dacs", "--data-root", "{root}",
      "--out", "{tmp}/a"], "missing.safetensors"),
    (["--pretrained", "none", "--backbone", "mit_b0", "--method", "dacs", "--data-root", "{tmp}/no-data",
      "--out", "{tmp}/b"], "gta5"),
])
def test_train_bad_input_is_one_clear_error(_train_root, tmp_path, monkeypatch, capsys, argv, expect):
    argv = [a.format(tmp=tmp_path, root=_train_root) for a in argv]
    msg = _train_inprocess(monkeypatch, capsys, *argv)
    assert msg.startswith("error: ") and expect in msg, msg
    assert "Traceback" not in msg and "\n" not in msg.strip()
