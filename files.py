"""The files the programs write, and the errors a user can fix: written aside and renamed, so that a kill at any
moment leaves the old file or the new one; the cache; process pools that stop quietly; a training run's folder
(its lock, its checkpoint pair, its log).

Read top to bottom: 1. the errors, a --device this machine has, and the strict key check of weights files; 2. the
cache, pools and atomic writes; 3. a run's folder (train.py's --out).
"""
import argparse
import atexit
import errno
import fcntl
import json
import os
import signal
import sys
import tempfile
import time
from multiprocessing import Pool
from typing import Callable

import torch

# ----------------------------------------------------------------------------------------------------------------
# 1. errors a user can fix

class UserError(ValueError):
    """Something the person running the program must fix (a flag, a file, a full disk), explained in one
    paragraph. The programs print it as one `error:` line without a traceback; any other exception is a bug and
    keeps its traceback. The four below are its kinds."""


class FlagError(UserError):
    """A command-line flag that cannot work (an output that cannot be written, a folder in use, ...)."""


class DiskFull(UserError):
    """A file could not be written because its disk is full; the file it would have replaced is intact."""


class WeightsError(UserError):
    """A weights or checkpoint file that cannot be used (missing, unreadable, of another model or size)."""


class DatasetError(UserError):
    """A dataset file or folder that is missing, unreadable or not in the layout of its download."""


def check_device(name: str) -> torch.device:
    """The torch.device for a program's --device, or a FlagError where this machine does not have it."""
    try:
        device = torch.device(name)
    except RuntimeError:
        raise FlagError(f"--device {name}: not a device name; use cpu, cuda or cuda:N.") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise FlagError(f"--device {name}: PyTorch sees no CUDA GPU on this machine (torch {torch.__version__}, "
                        f"built {'without CUDA' if torch.version.cuda is None else 'for CUDA ' + torch.version.cuda}"
                        f"); use --device cpu.")
    if device.type == "cuda" and (device.index or 0) >= torch.cuda.device_count():
        raise FlagError(f"--device {name}: this machine has {torch.cuda.device_count()} CUDA GPU(s), numbered from "
                        f"0; pick one of them.")
    if device.type not in ("cpu", "cuda"):
        raise FlagError(f"--device {name}: the programs run on cpu or cuda[:N].")
    return device


# The strict key check, shared by the official weight files (weights.py) and our segmentor checkpoint
# (checkpoint.py). It lives here, below both: weights.py's converter writes our checkpoint, so weights.py imports
# checkpoint.py and checkpoint.py cannot import weights.py.

def few_keys(keys: list[str], n: int = 3) -> str:
    """'a, b, c, ...': the first n keys, for a message."""
    return ", ".join(keys[:n]) + (", ..." if len(keys) > n else "")


def check_keys(model: torch.nn.Module, sd: dict[str, torch.Tensor], where: str, what: str, advice: str) -> None:
    """Raise WeightsError unless sd has exactly the model's keys and shapes: '{where} does not match the {what}:
    the keys that differ. {advice}'."""
    ours = model.state_dict()
    missing = sorted(set(ours) - set(sd))
    unexpected = sorted(set(sd) - set(ours))
    shape = sorted(f"{k} {tuple(sd[k].shape)} vs model {tuple(ours[k].shape)}"
                   for k in set(ours) & set(sd) if sd[k].shape != ours[k].shape)
    problems = [f"{len(ks)} {kind} ({few_keys(ks)})" for kind, ks in
                (("missing keys", missing), ("unexpected keys", unexpected), ("keys of the wrong shape", shape)) if ks]
    if problems:
        raise WeightsError(f"{where} does not match the {what}: {'; '.join(problems)}. {advice}")


# ----------------------------------------------------------------------------------------------------------------
# 2. the cache, worker pools, and writing files so that a kill at any moment leaves the old file or the
# new one, never half of one

def cache_folder() -> str:
    """Where derived files are cached (the RCS statistics, the demo's pretrained networks): $SSR_CACHE, else
    ~/.cache/ssr; never a dataset folder."""
    return os.environ.get("SSR_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "ssr")


def cannot_write(folder: str) -> str | None:
    """Why no file can be written in `folder` (made first if missing), or None when one can: checked before slow
    work whose result would go there, each caller saying in its own words what to do."""
    try:
        os.makedirs(folder, exist_ok=True)
        with tempfile.TemporaryFile(dir=folder):
            pass
    except OSError as e:
        return str(e.strerror or e)
    return None


def check_cache_folder(folder: str | None = None) -> None:
    """Fail now, before the slow work whose result it would hold, if the cache folder cannot be written."""
    folder = folder or cache_folder()
    why = cannot_write(folder)
    if why:
        raise FlagError(f"the cache folder {folder} cannot be written ({why}); set SSR_CACHE to a folder you can "
                        f"write to.")


STOPS = {signal.SIGINT, signal.SIGTERM, signal.SIGHUP}  # Ctrl-C, a scheduler's stop, a closed terminal


def _pool_worker() -> None:
    """A pool worker leaves Ctrl-C to its parent (which ends the pool) and dies quietly when the pool ends it. It
    computes on one thread: forked after the parent's OpenMP threads ran (a pretraining, say), a child that starts
    its own would hang, as DataLoader's workers would (torch sets them to one thread too)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, STOPS)  # blocked since its fork (worker_pool)
    torch.set_num_threads(1)


def worker_pool(most: int = 8) -> Pool:
    """A process pool over the cores (at most `most`) whose workers print no traceback on a stop. Its helper
    threads and workers start with the stop signals blocked, so that a stop always reaches the main thread (the
    one Python runs signal handlers in), and a worker forked a moment before its initializer ignores Ctrl-C."""
    blocked = signal.pthread_sigmask(signal.SIG_BLOCK, STOPS)
    try:
        return Pool(min(os.cpu_count() or 1, most), initializer=_pool_worker)
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, blocked)


def _umask() -> int:
    """The process's umask, read without changing it (os.umask can only be read by setting it, which would race
    with files that other threads create meanwhile)."""
    try:
        with open("/proc/self/status") as f:
            return int(next(line for line in f if line.startswith("Umask:")).split()[1], 8)
    except (OSError, StopIteration, ValueError):  # not Linux: the set-and-restore fallback
        mask = os.umask(0o022)
        os.umask(mask)
        return mask


def write_aside(path: str, write: Callable[[str], None]) -> str:
    """write(tmp) fills a temporary file beside `path`; it is flushed to disk and given the mode a new file gets
    under the user's umask (safetensors creates its files 0600, torch.save 0644). Returns tmp, for os.replace.
    On any failure tmp is removed; a full disk raises DiskFull (torch.save and safetensors report it as a
    RuntimeError or their own error, so the free space is read while tmp still holds the space it took)."""
    tmp = f"{path}.{os.getpid()}.tmp"  # per process: two writers never share a temporary file
    try:
        write(tmp)
        fd = os.open(tmp, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        os.chmod(tmp, 0o666 & ~_umask())
        return tmp
    except BaseException as e:
        folder = os.path.dirname(os.path.abspath(path))
        try:
            st = os.statvfs(folder)
            full = getattr(e, "errno", None) == errno.ENOSPC or st.f_bavail * st.f_frsize < 2 ** 20
        except OSError:
            full = False
        if os.path.exists(tmp):
            os.remove(tmp)
        if full and isinstance(e, Exception):
            raise DiskFull(f"the disk that holds {folder} is full: {os.path.basename(path)} could not be written "
                           f"there, and the earlier {os.path.basename(path)}, if any, is untouched. Free some space "
                           f"there.") from None
        raise


def save_atomic(path: str, write: Callable[[str], None]) -> None:
    """Write `path` through write(tmp) (see write_aside), then rename it into place. A rename that fails (`path`
    is a folder, say) removes tmp: the full-size file would otherwise stay behind."""
    tmp = write_aside(path, write)
    try:
        os.replace(tmp, path)
    except BaseException:
        os.remove(tmp)
        raise


# ----------------------------------------------------------------------------------------------------------------
# 3. a training run's folder (train.py's --out): its lock, its training state, its log

def lock_holders(fd: int) -> list[int]:
    """The pids that hold an flock on the inode of the open file fd (Linux's /proc/locks); [] where unknown."""
    try:
        ino = os.fstat(fd).st_ino
        with open("/proc/locks") as f:
            rows = [line.split() for line in f]
        return sorted({int(r[4]) for r in rows if len(r) > 5 and r[1] == "FLOCK" and r[5].endswith(f":{ino}")})
    except (OSError, ValueError, IndexError):
        return []


def describe(pid: int) -> str:
    """pid, its command line, and whether its launcher is gone (an orphan's parent is pid 1 or a subreaper)."""
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            cmd = f.read().replace(b"\0", b" ").decode(errors="replace").strip()
        with open(f"/proc/{pid}/stat") as f:
            ppid = int(f.read().rsplit(")", 1)[1].split()[1])
        return f"pid {pid} ({cmd[:200]}), alive{', its parent gone' if ppid == 1 else ''}"
    except (OSError, ValueError, IndexError):
        return f"pid {pid} (no longer running: the lock is held by a process it started)"


def launcher_gone(pid: int) -> bool:
    """Whether pid is a torchrun worker whose torchrun is gone: torchrun put TORCHELASTIC_RUN_ID in its environment,
    and its parent runs no torchrun any more (a dead parent's children pass to pid 1 or a subreaper). Such a worker
    ends by itself: train.py finishes the iteration, saves and exits when its launcher dies (processes.py)."""
    try:
        with open(f"/proc/{pid}/environ", "rb") as f:
            worker = any(v.startswith(b"TORCHELASTIC_RUN_ID=") for v in f.read().split(b"\0"))
        with open(f"/proc/{pid}/stat") as f:
            ppid = int(f.read().rsplit(")", 1)[1].split()[1])
        with open(f"/proc/{ppid}/cmdline", "rb") as f:
            parent = f.read()
    except (OSError, ValueError, IndexError):
        return False
    return worker and not runs_torchrun(parent)


def runs_torchrun(cmdline: bytes) -> bool:
    """Whether a /proc/PID/cmdline (NUL-separated) runs torchrun: its console script (python .../bin/torchrun ...)
    or python -m torch.distributed.run. The program is read, not searched for in the arguments: a parent that runs
    `pytest -k torchrun` is no torchrun."""
    args = cmdline.split(b"\0")
    if os.path.basename(args[0]) == b"torchrun":
        return True
    args = args[1:]  # the interpreter's options, then its program
    while args and args[0].startswith(b"-") and args[0] != b"-m":
        args = args[2:] if args[0] in (b"-W", b"-X") else args[1:]  # the two options that take a value apart
    if args[:2] == [b"-m", b"torch.distributed.run"]:
        return True
    return bool(args) and os.path.basename(args[0]) == b"torchrun"


def wait_for_leftovers(folder: str, say: bool, most_s: float = 120) -> None:
    """When the lock of a run folder is held only by workers whose torchrun is gone (a kill of torchrun: they finish
    the iteration and save), wait for them to end, at most most_s seconds, saying so in one line (if `say`): a
    --resume right after such a kill continues from their last save. A live run is left to claim_folder to refuse.
    The holders are read from /proc/locks: the lock is never taken here, so a claim meanwhile never fails on it."""
    try:
        lock = open(os.path.join(folder, ".lock"))
    except OSError:
        return
    with lock:
        deadline = time.monotonic() + most_s
        pids = lock_holders(lock.fileno())
        if pids and all(launcher_gone(q) for q in pids) and say:
            print(f"{folder} is held by pid {', '.join(map(str, pids))}, a worker of a torchrun that is gone: waiting "
                  f"for it to save its last iteration and end (at most {most_s / 60:.0f} minutes)", flush=True)
        while pids and all(launcher_gone(q) for q in pids) and time.monotonic() < deadline:
            time.sleep(0.2)
            pids = lock_holders(lock.fileno())


def claim_folder(folder: str, flag: str = "--out", lock_file: bool = True) -> tuple[int, list[str]]:
    """Create `folder` (given by `flag`) if needed and hold it: an exclusive flock, which the OS releases when every
    process holding it ends, however it ends. The flock is on <folder>/.lock, which records the holder's pid; with
    lock_file=False, on the folder itself, for a folder that must hold its outputs alone (--submit's zips into the
    predictions). A second claim fails at once, saying which process holds it. Returns the lock's file descriptor
    and the paths this call created, deepest first (the lock file, then the folders above it), for release_folder."""
    made = []
    d = os.path.abspath(folder)
    while not os.path.exists(d):
        made.append(d)
        d = os.path.dirname(d)
    lock_path = os.path.abspath(os.path.join(folder, ".lock") if lock_file else folder)
    if lock_file and not os.path.exists(lock_path):
        made.insert(0, lock_path)
    try:
        os.makedirs(folder, exist_ok=True)
        fd = os.open(lock_path, os.O_RDWR | os.O_CREAT if lock_file else os.O_RDONLY)  # never clobbers the pid in it
    except OSError as e:
        for d in made:  # what makedirs got to make, all empty
            if os.path.isdir(d):
                os.rmdir(d)
        why = "it is a file" if os.path.isfile(folder) else e.strerror  # not "File exists"
        raise FlagError(f"{flag} {folder} cannot be written ({why}). Choose a folder you can write to.") from None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        written = os.pread(fd, 32, 0).decode(errors="replace").strip() if lock_file else ""
        pids = lock_holders(fd) or ([int(written)] if written.isdigit() else [])
        os.close(fd)
        who = "; ".join(describe(q) for q in pids) or "a process that could not be identified"
        raise FlagError(f"{flag} {folder} is in use by another run: {who}. Wait for it to end, stop it (kill "
                        f"{' '.join(map(str, pids)) or 'PID'}; one whose parent is gone is a leftover), or choose "
                        f"another {flag}.") from None
    if lock_file:
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
    return fd, made


def release_folder(fd: int, made: list[str]) -> None:
    """Let claim_folder's lock go. A failed start leaves no trace: where the folder holds nothing but what this
    claim made, that (the lock file, the folders made for it) is removed first."""
    for path in made:  # deepest first
        try:
            if os.path.isdir(path):
                os.rmdir(path)  # not empty: what lies above it is not empty either
            elif os.listdir(os.path.dirname(path)) == [".lock"]:
                os.remove(path)
            else:
                break
        except OSError:
            break
    os.close(fd)


def claim_run(folder: str, state_path: str, resume: bool) -> None:
    """train.py's --out, held for the run's whole life (claim_folder; at exit, what a failed start made is removed
    again). A folder that holds a run (its train_state.pt) is refused unless it is resumed; checked holding the
    lock, so that a running run says so first."""
    atexit.register(release_folder, *claim_folder(folder))
    if not resume and os.path.exists(state_path):
        raise FlagError(f"{folder} already holds a run (train_state.pt). Continue it with --resume, or choose "
                        f"another --out.")


def check_outside(out: str, datasets: list[str]) -> None:
    """A run folder inside a dataset folder would be read as data by the next run: refused."""
    for folder in datasets:
        dataset = os.path.realpath(folder)
        if os.path.commonpath([dataset, os.path.realpath(out)]) == dataset:
            raise FlagError(f"--out {out} lies inside the dataset folder {folder}: its files would mix with the "
                            f"dataset's. Choose an --out outside --data-root's dataset folders, e.g. runs/NAME.")


def read_state(path: str) -> dict:
    """train_state.pt as train.py's save() writes it. torch.load raises many exception types for a truncated or
    foreign file (RuntimeError, UnpicklingError, EOFError, ...), so all are caught, around this one call."""
    if not os.path.exists(path):
        raise FlagError(f"--resume: there is no {path} to continue from. Check --out, or start a new run without "
                        f"--resume.")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        first = (str(e).strip().splitlines() or [""])[0]
        raise FlagError(f"--resume: cannot read {path} ({type(e).__name__}: {first}); it is truncated or not a "
                        f"train_state.pt. The run cannot continue from it: start a new one in another --out.")
    if not isinstance(state, dict) or not {"uda", "optimizer", "scaler", "iter", "rng", "args"} <= state.keys():
        raise FlagError(f"--resume: {path} is not a train_state.pt written by this train.py (it lacks the training "
                        f"state). Start a new run in another --out.")
    return state


def resumed_args(parser: argparse.ArgumentParser, state: dict, run_flags: tuple[str, ...],
                 folder: str) -> argparse.Namespace:
    """train.py's flags on --resume: the saved run's (state['args']) become the defaults, and flags given now
    override those that fit the state. A run flag (run_flags: those its weights, batches and random streams
    depend on) given with another value than the saved run's is a FlagError."""
    saved = json.loads(state["args"])
    parser.set_defaults(**{k: v for k, v in saved.items() if k not in ("out", "resume")})
    args = parser.parse_args()
    differ = [f"--{k.replace('_', '-')} {getattr(args, k)} (saved: {saved.get(k)})" for k in run_flags
              if getattr(args, k) != saved.get(k, parser.get_default(k))]
    if differ:
        raise FlagError(f"--resume: {', '.join(differ)} contradict the run saved in {folder}. Drop these flags (on "
                        f"--resume the saved run's flags are the defaults), or start a new run in another --out.")
    return args


def load_state(path: str, state: dict, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
               scaler: torch.amp.GradScaler) -> None:
    """read_state's training state (of `path`) into the run's objects: the weights and the optimizer's moments,
    strictly (a state of another model or version is a FlagError), and the loss scale where both runs keep one."""
    try:
        model.load_state_dict(state["uda"])
        optimizer.load_state_dict(state["optimizer"])
    except (RuntimeError, ValueError) as e:  # strict loading: a state of another model or version
        raise FlagError(f"--resume: {path} does not fit this model: {str(e).splitlines()[0]} Start a new run in "
                        f"another --out.") from None
    if scaler.is_enabled() and state["scaler"]:  # an fp16 run resumed in bf16/fp32 drops its loss scale
        scaler.load_state_dict(state["scaler"])


def check_one_run(folder: str, run_ids: dict[str, Callable[[], str | None]]) -> None:
    """The files of a run folder (run_ids: path -> a function that reads the run id the file records) must come
    from one run: a train_state.pt copied in from another run would otherwise continue that run and overwrite
    this one's files. A missing file is left out; an unreadable one is an error of its own, saying why. Paths play
    no part: a folder moved or copied whole still resumes."""
    ids = {}
    for path, read in run_ids.items():
        if os.path.exists(path):
            try:
                if os.path.isdir(path):
                    raise IsADirectoryError(errno.EISDIR, "a folder, not a file")
                ids[path] = read()
            except (OSError, ValueError, AttributeError) as e:  # UserError (WeightsError too) is a ValueError
                why = e.strerror if isinstance(e, OSError) and e.strerror else (str(e).splitlines() or [""])[0]
                raise FlagError(f"--resume: {path} cannot be read ({why}), so nothing tells whether it belongs to "
                                f"this run. Move it out of {folder} (the run writes it anew) and resume again.") from None
    if len(set(ids.values())) > 1:
        raise FlagError(f"--resume: the files in {folder} come from different runs: "
                        + ", ".join(f"{os.path.basename(k)} of run {v}" for k, v in ids.items())
                        + ". Continuing would mix them and overwrite the others; resume in the folder whose files "
                        "belong together, or start a new run in another --out.")


def save_checkpoint(folder: str, it: int, last_saved: int, model: tuple[str, Callable[[str], None]],
                    state: tuple[str, Callable[[str], None]]) -> None:
    """The checkpoint pair of iteration `it`, each (path, write): both are written beside their files first
    (write_aside, the model first) and renamed only when both are whole, so the pair on disk is of one iteration,
    but for a kill between the two renames: the model is then one save behind, which train.py --resume repairs
    and eval.py notes (note_model_behind). A full disk leaves the pair of iteration `last_saved` (0: none yet)."""
    tmps = []
    try:
        for path, write in (model, state):
            tmps.append(write_aside(path, write))
    except DiskFull:
        for tmp in tmps:
            os.remove(tmp)
        kept = (f"the checkpoint of iteration {last_saved} in {folder} is intact: free some space, then continue "
                f"with --resume" if last_saved else "no checkpoint was written yet: free some space and start again")
        raise DiskFull(f"the disk that holds {folder} is full: the checkpoint of iteration {it} could not be "
                       f"written; {kept}.") from None
    os.replace(tmps[1], state[0])  # state first: a kill between the two renames leaves a state to resume from
    os.replace(tmps[0], model[0])


def note_model_behind(model_path: str, iters: int | None) -> None:
    """eval.py: a model of iteration `iters` (its metadata's) one save behind the train_state.pt beside it (see
    save_checkpoint) is used as it is, with one line on stderr. Only the state's iteration is read (mapped, not
    loaded)."""
    state_path = os.path.join(os.path.dirname(os.path.abspath(model_path)), "train_state.pt")
    if iters is None or not os.path.isfile(state_path):
        return
    try:
        newer = torch.load(state_path, map_location="cpu", weights_only=True, mmap=True)["iter"]
    except Exception:  # not a training state (see read_state): nothing to compare with
        return
    if newer > iters:
        print(f"note: {model_path} is of iteration {iters} but {state_path} of iteration {newer}: the run was stopped "
              f"between writing the two. This evaluates the older model; python train.py --resume --out "
              f"{os.path.dirname(state_path)} writes it again from the state (and goes on training if the run is not "
              f"finished).", file=sys.stderr)


def log_line(path: str, record: dict) -> None:
    """Append one record to a log.jsonl, opened anew each time: a log deleted mid-run is started again."""
    with open(path, "a") as f:
        f.write(json.dumps(record) + "\n")


def read_log(path: str) -> list[dict]:
    """A log.jsonl's records; a line cut short (by a power loss, say) is left out, a missing log is empty."""
    records = []
    try:
        with open(path) as f:
            for line in f:
                try:
                    records.append(json.loads(line))
                except json.JSONDecodeError:
                    pass
    except FileNotFoundError:
        pass
    return records
