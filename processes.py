"""The processes of one training run act as one: under torchrun (one process per GPU) they start together, agree on
every stop and every error, keep each one's random stream in the checkpoint, say an error once, end together, and
none outlives its launcher. Alone (python train.py), the same calls need no peer.

Read top to bottom: 1. start and end; 2. agreeing on stops and errors; 3. random states; 4. the stop signals;
5. what stops a run, said once. train.py is the only user; MAE's util/misc.py is the model (DDP helpers in one file).
"""
import atexit
import ctypes
import os
import signal
import sys
from dataclasses import dataclass
from datetime import timedelta
from functools import partial
from typing import Callable

import torch
import torch.distributed as dist

import files

# ----------------------------------------------------------------------------------------------------------------
# 1. start and end


@dataclass
class World:
    """This process's place in the run: its rank among `size` processes (0 of 1 alone) and its device; under
    torchrun also the loop's process group, the launcher's pid, and the DDP wrapper that end must free first."""
    rank: int
    size: int
    device: torch.device
    checkpoint: str  # the run's train_state.pt, for the paragraphs that say what is kept
    group: dist.ProcessGroup | None = None  # the loop's: a peer that stops answering is noticed within a minute
    launcher: int = 0  # torchrun's pid
    ddp: torch.nn.parallel.DistributedDataParallel | None = None

    @property
    def master(self) -> bool:
        """Rank 0: the one that writes the run's files and prints."""
        return self.rank == 0


def start(checkpoint: str) -> World:
    """Install the error report (report_errors) and the stops of the set-up (stop_as_interrupt); under torchrun
    (which sets RANK, WORLD_SIZE, LOCAL_RANK) also join the process groups and learn of the launcher's death."""
    torchrun = "RANK" in os.environ
    rank, size = (int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])) if torchrun else (0, 1)
    hook = partial(report_errors, rank=rank, together=torchrun, checkpoint=checkpoint)
    sys.excepthook = hook
    stops_interrupt()  # until the loop, where catch_stops takes over
    launcher = 0
    if torchrun:
        # The launcher's death (a kill of torchrun, the OOM killer) reaches the workers, in sessions of their own,
        # as SIGTERM: they finish the iteration, save and exit. prctl is Linux's; launcher_gone compares the pid.
        launcher = os.getppid()
        try:
            ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
        except (OSError, AttributeError):
            pass
        if torch.cuda.is_available():
            torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
    device = torch.device(f"cuda:{torch.cuda.current_device()}" if torch.cuda.is_available() else "cpu")
    if not torchrun:
        return World(rank, size, device, checkpoint)
    # The default group waits long enough for rank 0's set-up (data checks, RCS statistics, the demo's pretrainings)
    # and evaluations; the loop talks in its own group: a rank whose peer died gives up in a minute, not gloo/NCCL's 30.
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo", timeout=timedelta(minutes=60))
    group = dist.new_group(timeout=timedelta(seconds=60))
    sys.excepthook = hook  # init_process_group wraps the hook to prefix every line with the rank
    world = World(rank, size, device, checkpoint, group, launcher)
    atexit.register(end, world)
    return world


def wrap(world: World, module: torch.nn.Module) -> torch.nn.Module:
    """module in DistributedDataParallel over the loop's group (gradients averaged in backward); alone, itself."""
    if world.group is None:
        return module
    world.ddp = torch.nn.parallel.DistributedDataParallel(
        module, device_ids=[world.device.index] if world.device.type == "cuda" else None, process_group=world.group)
    return world.ddp


def end(world: World) -> None:
    """Tear the process groups down, at exit, however the run ends (start registers it). A group's threads free
    the work of its last collectives, which takes the interpreter's lock: if the interpreter is shutting down by
    then, that thread is ended mid-way and the process aborts ("terminate called without an active exception",
    SIGABRT). So every reference to the loop's group is dropped here (DDP holds it, and its reducer, which DDP's
    logger holds too), and the group, destroyed, joins its threads while the interpreter still runs. SIGTERM is
    ignored from here: torchrun sends it to the processes still running once one has exited, and a process that is
    ending anyway must end with its own status, not as killed by a signal."""
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    if world.ddp is not None:
        del world.ddp.reducer, world.ddp.logger, world.ddp.process_group
    dist.destroy_process_group()
    world.group = None


# ----------------------------------------------------------------------------------------------------------------
# 2. agreeing on stops and errors, so that the ranks skip the same steps and stop at the same point

def agree(world: World, *flags, patient: bool = False) -> list[bool]:
    """Each flag, true on every rank if it is true on any rank (one small all-reduce). patient: on the default
    group, for the ranks that wait for rank 0's set-up or evaluation. A peer that stopped answering raises
    DistBackendError (report_errors)."""
    if world.group is None:
        return [bool(f) for f in flags]
    t = torch.tensor([float(bool(f)) for f in flags], device=world.device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX, group=dist.group.WORLD if patient else world.group)
    return [bool(v) for v in t.tolist()]


def raise_everywhere(world: World, error: files.UserError | None, saved: int = 0) -> None:
    """Every rank raises the errors met on any rank (agree found one): of its own type if all are of one type (a
    DatasetError stays one), else as a UserError; rank 0 prints it once. saved: the iteration whose state is on
    disk, for the paragraph (0: none)."""
    errors = [error] * world.size
    if world.group is not None:
        dist.all_gather_object(errors, error, group=world.group)
    met = [e for e in errors if e is not None]
    kinds = {type(e) for e in met}
    kind = kinds.pop() if len(kinds) == 1 else files.UserError
    note = f" The state at iteration {saved} is saved in {world.checkpoint}: fix this, then continue with --resume."
    raise kind(" ".join(dict.fromkeys(str(e) for e in met)) + (note if saved else "")) from None


def on_master(world: World, work: Callable[[], object], saved: int = 0) -> object:
    """Rank 0 does `work` (the run's set-up, an evaluation) while the others wait on the patient default group, and
    returns what it returns (None on the other ranks); a user error it raises stops every rank (raise_everywhere;
    saved as there)."""
    error = result = None
    if world.master:
        try:
            result = work()
        except files.UserError as e:
            error = e
    if agree(world, error, patient=True)[0]:
        raise_everywhere(world, error, saved)
    return result


def met_alone(error: files.UserError) -> files.UserError:
    """Mark an error that this rank met alone, inside a step its peers wait in (they cannot be told: they stop as
    for a lost peer). This rank prints it, whichever rank it is."""
    error.alone = True
    return error


def launcher_gone(world: World) -> bool:
    """Whether torchrun died (its workers pass to another parent): the death signal's second witness, polled by the
    loop, for a system without prctl."""
    return world.launcher != 0 and os.getppid() != world.launcher


def weights_agree(world: World, model: torch.nn.Module) -> bool:
    """Whether every rank holds the same weights (each holds a full copy: a difference means that the gradient
    averaging went wrong). The run's last words: every rank leaves it together."""
    flat = torch.cat([q.detach().double().flatten() for q in model.parameters()])
    sums = [torch.zeros(2, dtype=torch.float64, device=world.device) for _ in range(world.size)]
    dist.all_gather(sums, torch.stack([flat.sum(), flat.square().sum()]), group=world.group)
    dist.barrier()  # no rank tears the process groups down while another still talks to them
    return all(torch.equal(s, sums[0]) for s in sums)


# ----------------------------------------------------------------------------------------------------------------
# 3. random states: each rank's stream (mixing, jitter, drop path) is saved and restored, so that a resumed run
# continues exactly as an uninterrupted one

def gather_rng(world: World) -> list[dict]:
    """Every rank's random state (the CPU's, and the GPU's on one), for rank 0's checkpoint."""
    mine = dict(cpu=torch.get_rng_state(), cuda=torch.cuda.get_rng_state() if world.device.type == "cuda" else None)
    states = [mine] * world.size
    if world.group is not None:
        dist.all_gather_object(states, mine, group=world.group)
    return states


def restore_rng(world: World, states: list[dict]) -> None:
    """This rank's random state from a checkpoint's gather_rng. Where another number of processes saved it, nothing
    is restored (each stream stays as --seed + rank set it), and rank 0 says so."""
    if len(states) != world.size:
        if world.master:  # the batches still follow (seed, iteration, rank); only the augmentation streams restart
            print(f"note: the run was saved by {len(states)} processes and continues on {world.size}: each "
                  f"process's random stream restarts from --seed + rank, so it will not match an uninterrupted run.")
        return
    torch.set_rng_state(states[world.rank]["cpu"])
    if world.device.type == "cuda" and states[world.rank]["cuda"] is not None:
        torch.cuda.set_rng_state(states[world.rank]["cuda"])


# ----------------------------------------------------------------------------------------------------------------
# 4. the stop signals: Ctrl-C (SIGINT), a scheduler's stop or torchrun's (SIGTERM), a closed terminal (SIGHUP)

def _silence_terminal() -> None:
    """After a hang-up every write to the terminal fails: the output that was going there is dropped instead
    (log.jsonl keeps the progress), so that the stop itself cannot fail on a print."""
    null = os.open(os.devnull, os.O_WRONLY)
    for fd in (1, 2):
        if os.isatty(fd):
            os.dup2(null, fd)
    os.close(null)


def install_stops(handlers: dict) -> None:
    """Install the handlers of the stop signals, but leave SIGHUP ignored where it is: nohup starts a program so,
    for it to outlive its terminal, and that choice stands."""
    for sig, handler in handlers.items():
        if sig != signal.SIGHUP or signal.getsignal(sig) != signal.SIG_IGN:
            signal.signal(sig, handler)


def stop_as_interrupt(sig: int, frame) -> None:
    """A stop acts as Ctrl-C: whatever is being made (the demo's data, a pretraining, a prediction) is cleaned up
    on the way out, and the program says one line (train.py's report_errors, eval.py's, toys.py's and study.py's
    main). From then on, as in train.py's loop (catch_stops), a second Ctrl-C ends the program at once and another
    SIGTERM or SIGHUP changes nothing: it would interrupt that clean-up (a study passes its stop on to its runs as
    SIGTERM, and after a Ctrl-C at the terminal they have the SIGINT already)."""
    if sig == signal.SIGHUP:
        _silence_terminal()
    install_stops({signal.SIGINT: signal.SIG_DFL, signal.SIGTERM: signal.SIG_IGN, signal.SIGHUP: signal.SIG_IGN})
    raise KeyboardInterrupt


def stops_interrupt() -> None:
    """Every stop signal raises KeyboardInterrupt (stop_as_interrupt), however the program was started. SIGINT too,
    although Python raises KeyboardInterrupt on it already: it does so only if SIGINT was not ignored when it
    started, and a shell without job control starts a job given with & (a script's, or a test suite's) ignoring
    SIGINT; such a job let a Ctrl-C pass unnoticed (the demo's set-up ran on)."""
    install_stops(dict.fromkeys(files.STOPS, stop_as_interrupt))


def catch_stops() -> list[int]:
    """From the loop on, a stop signal finishes the current iteration, saves and exits: each one received is
    appended to the list returned, which the loop reads at its agreement. A second Ctrl-C stops at once; a second
    SIGTERM changes nothing (under torchrun each worker can receive two when its launcher dies)."""
    stops = []

    def hang_up(sig, frame):
        _silence_terminal()
        stops.append(sig)

    install_stops({signal.SIGINT: lambda sig, frame: (stops.append(sig), signal.signal(sig, signal.SIG_DFL)),
                   signal.SIGTERM: lambda sig, frame: stops.append(sig), signal.SIGHUP: hang_up})
    return stops


# ----------------------------------------------------------------------------------------------------------------
# 5. what stops a run, said once

def report_errors(kind, error, tb, *, rank: int, together: bool, checkpoint: str) -> None:
    """The one handler of what stops a run (sys.excepthook): a user error (files.UserError: a flag, a file, a full
    disk) prints as one `error:` paragraph, once under torchrun (by rank 0, or by the rank that met it alone); a
    peer that stopped answering (a timeout or a closed connection, which gloo's and NCCL's errors report inside
    DDP's backward as RuntimeError) as one paragraph on every rank that saw it; a stop before the loop as one line;
    a bug keeps its traceback. Under torchrun SIGTERM is ignored from here on (World.end says why)."""
    if together:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
    peer_lost = together and (issubclass(kind, dist.DistBackendError) or (
        issubclass(kind, RuntimeError) and any(w in str(error) for w in ("gloo", "NCCL", "Connection"))))
    if peer_lost:
        kept = f"The last checkpoint, {checkpoint}, is intact." if os.path.exists(checkpoint) else "Nothing was saved."
        print(f"error: another process of this run stopped answering ({kind.__name__}), so rank {rank} stops too. "
              f"{kept} Continue with --resume.", file=sys.stderr)
    elif not issubclass(kind, (files.UserError, KeyboardInterrupt)):
        sys.__excepthook__(kind, error, tb)
    elif rank == 0 or getattr(error, "alone", False):
        print("stopped before training began; nothing was saved" if issubclass(kind, KeyboardInterrupt) else
              f"error: {error}", file=sys.stderr)
