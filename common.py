"""Plumbing shared by the scripts: command lines, clean errors, run folders, resume, stop signals,
divergence checks, devices, reference models, sampling in batches and pictures.

Nothing here is an algorithm of the paper: the scripts keep those lines (the round, the losses, the
optimiser step) visible in themselves. Every helper takes keyword arguments.
"""

import argparse
import json
import math
import os
import signal
import subprocess
import sys
import time

import numpy as np
import torch

from models import (
    DDPM,
    CheckpointError,
    RectifiedFlow,
    TimeMLP,
    count_params,
    load_checkpoint,
    model_from_checkpoint,
    unet_from_preset,
)
from models.checkpoint import set_rng_state
from models.unet import attention_bytes
from tasks import DataError, UsageError, progress  # progress: re-exported for the scripts

ROOT = os.path.dirname(os.path.abspath(__file__))
__all__ = ["DataError", "UsageError", "CheckpointError"]


class Diverged(UsageError):
    """A non-finite or exploding loss or weights; the run stops and keeps its last good
    checkpoint."""


class Interrupted(Exception):
    """SIGTERM or Ctrl-C: the run saved what it could and stops with a line saying how to resume."""

    def __init__(self, msg, code):
        super().__init__(msg)
        self.code = code


# ---------------------------------------------------------------- errors and exit codes ----
def fail(msg):
    """One ``error:`` line (by rank 0 only under torchrun) and exit 2."""
    if int(os.environ.get("RANK", "0") or 0) == 0:
        print(f"error: {msg}", file=sys.stderr)
    raise SystemExit(2)


class writing:
    """Around a write of ``path``: an OSError names the path, and torch.save's opaque failure
    (a full disk, a file-size limit) becomes an OSError naming it."""

    def __init__(self, path):
        self.path = path

    def __enter__(self):
        return self

    def __exit__(self, kind, e, tb):
        if isinstance(e, OSError) and e.filename is None:
            e.filename = self.path
        if isinstance(e, RuntimeError) and ("inline_container" in str(e) or "write" in str(e)):
            raise OSError(5, f"the write failed ({str(e).strip()[:80]})", self.path) from None
        return False


def run_main(main):
    """Run ``main()``: bad input becomes one line on stderr and exit code 2; a stop signal one line
    and 128 + the signal's number."""
    quiet = int(os.environ.get("RANK", "0")) != 0  # torchrun: rank 0 speaks for all
    try:
        main()
    except (DataError, CheckpointError, UsageError) as e:
        if quiet:
            raise SystemExit(2) from None
        fail(str(e))
    except Interrupted as e:
        # torchrun signals every rank when one ends: rank 0 speaks for all
        if not quiet:
            print(f"stopped: {e}", file=sys.stderr)
        raise SystemExit(e.code) from None
    except OSError as e:
        # read-only, full, too large, denied: one line naming the path
        fail(os_error(e))
    except KeyboardInterrupt:
        print(
            "stopped: interrupted (Ctrl-C); rerun the same command with --resume to continue from "
            "the last "
            "checkpoint",
            file=sys.stderr,
        )
        raise SystemExit(130) from None
    finally:
        release_locks()
        if "torch.distributed" in sys.modules:
            import torch.distributed as dist

            if dist.is_available() and dist.is_initialized():
                dist.destroy_process_group()


class StopSignals:
    """SIGTERM (a cluster pre-empting the job) and SIGINT (Ctrl-C) set ``requested`` instead of
    killing the process, so a training loop can finish its step, save and exit cleanly."""

    def __init__(self):
        self.requested = None
        self._old = {}
        for sig in (signal.SIGTERM, signal.SIGINT):
            try:
                self._old[sig] = signal.signal(sig, self._handle)
            except (
                ValueError
            ):  # not the main thread (e.g. inside some test runners): leave the default
                pass

    def _handle(self, signum, frame):
        self.requested = signal.Signals(signum).name

    def stop(self, where, resume_hint):
        """Raise Interrupted naming the signal; call at a step boundary after saving."""
        code = 128 + getattr(signal, self.requested).value
        raise Interrupted(f"{self.requested} {where}; {resume_hint}", code)

    def restore(self):
        for sig, old in self._old.items():
            signal.signal(sig, old)

    def __enter__(self):
        return self

    def __exit__(self, kind, *exc):
        self.restore()
        if kind is None and self.requested:
            # a signal after the loop's last check (an inversion's last chunk) still stops the run
            self.stop("at the end of a loop", "what was saved is kept: rerun the same command "
                      "with --resume to continue from it")


# where a stop signal outside a training loop's StopSignals scope lands (harness.Run sets it)
PHASE = {"name": "before the run started"}


def _stop_now(signum, frame):
    name = signal.Signals(signum).name
    raise Interrupted(f"{name} during {PHASE['name']}; what was saved is kept: rerun the same "
                      f"command with --resume to continue from it", 128 + signum)


def stop_outside_loops():
    """SIGTERM in a phase without a training loop's StopSignals scope (a diagnostic, an evaluation,
    an inversion): Interrupted at once, so run_main prints the ``stopped:`` line and exits 143
    (Ctrl-C already raises KeyboardInterrupt: 130). Checkpoints and side files are written through
    a temporary file and a rename, so what was saved stays whole for --resume. A StopSignals scope
    puts this handler back when it ends."""
    try:
        if signal.getsignal(signal.SIGTERM) in (signal.SIG_DFL, _stop_now):
            signal.signal(signal.SIGTERM, _stop_now)
    except ValueError:
        # not the main thread: leave the default
        pass


# ---------------------------------------------------------------- command lines ----
class Parser(argparse.ArgumentParser):
    """argparse with one-line errors (exit 2) and every default shown in --help."""

    def __init__(self, description, epilog=None):
        super().__init__(
            description=description,
            epilog=epilog,
            formatter_class=argparse.ArgumentDefaultsHelpFormatter,
        )

    def error(self, message):
        fail(f"{message} (see --help)")


def _number(cast, lo=None, hi=None, lo_open=False, what=None):
    def check(text):
        try:
            v = cast(text)
        except ValueError:
            raise argparse.ArgumentTypeError(
                f"expected {what or cast.__name__}, got {text!r}"
            ) from None
        if isinstance(v, float) and not math.isfinite(v):
            raise argparse.ArgumentTypeError(f"must be a finite number, got {text}")
        if lo is not None and (v <= lo if lo_open else v < lo):
            raise argparse.ArgumentTypeError(f"must be {'>' if lo_open else '>='} {lo}, got {text}")
        if hi is not None and v > hi:
            raise argparse.ArgumentTypeError(f"must be <= {hi}, got {text}")
        return v

    check.__name__ = what or cast.__name__
    return check


pos_int = _number(int, 1, what="an integer >= 1")
nonneg_int = _number(int, 0, what="an integer >= 0")
pos_float = _number(float, 0.0, lo_open=True, what="a number > 0")
nonneg_float = _number(float, 0.0, what="a number >= 0")
finite_float = _number(float, what="a finite number")
unit_float = _number(float, 0.0, 1.0, what="a number in [0, 1]")
pos_unit_float = _number(float, 0.0, 1.0, lo_open=True, what="a number in (0, 1]")
# torch.manual_seed takes 64 bits; derived seeds (seed * 1000 + round, ...) wrap in generator()
seed_int = _number(int, 0, 2**63 - 1, what="an integer in [0, 2^63)")
fid_int = _number(int, -1, what="an integer >= -1 (-1: 5000 on CUDA, 0 on the CPU)")


def count_up_to(hi):
    """argparse type: an integer in 1..hi."""
    return _number(int, 1, hi, what=f"an integer in 1..{hi}")


def fid_count(flag, device, task):
    """--fid-samples as a count: -1 means 5000 on CUDA and none on the CPU; 0 off image tasks."""
    if task.kind != "image":
        return 0
    return flag if flag >= 0 else (5000 if device.type == "cuda" else 0)


def int_list(text):
    """'10,20,40' -> [10, 20, 40] (sorted, unique, each >= 1)."""
    try:
        vals = sorted({int(v) for v in text.split(",") if v.strip()})
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected a comma-separated list of integers, got {text!r}"
        ) from None
    if not vals or vals[0] < 1:
        raise argparse.ArgumentTypeError(f"expected integers >= 1, got {text!r}")
    return vals


def pick_device(name):
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(name)
    except (RuntimeError, ValueError):
        raise UsageError(
            f"--device {name!r} is not a device; use cpu, cuda, cuda:N or auto"
        ) from None
    if dev.type not in ("cpu", "cuda"):
        raise UsageError(f"--device {name!r}: only cpu and cuda are supported")
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise UsageError(
                f"--device {name} asked for CUDA but none is available; use --device cpu"
            )
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise UsageError(
                f"--device {name}: there are only {torch.cuda.device_count()} CUDA devices"
            )
    return dev


def generator(seed, device):
    """A generator on ``device``; a derived seed beyond 64 bits wraps (small ones are unchanged)."""
    return torch.Generator(device=device).manual_seed(seed % 2**64)


# ---------------------------------------------------------------- torchrun ----
class Dist:
    """One process of ``torchrun --nproc_per_node=P`` (NCCL on GPUs, gloo on the CPU), or a plain
    process as rank 0 of 1. The scripts stay exact under any P: sampling is sharded by whole batches
    whose noise comes from per-batch generators, and gathered in batch order; every rank holds the
    same accepted set; each rank trains on its rows of one global batch (DDP averages the
    gradients); only rank 0 writes or prints."""

    def __init__(self, device):
        self.world = int(os.environ.get("WORLD_SIZE", "1"))
        self.rank = int(os.environ.get("RANK", "0"))
        self.device = device
        # what this rank computed of work split in chunks: [what, first, end) per chunk
        # (harness.ChunkCache; summary.json's "torchrun")
        self.computed = []
        if self.world == 1:
            return
        import torch.distributed as dist

        if device.type == "cuda":
            self.device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
            torch.cuda.set_device(self.device)
        if not dist.is_initialized():
            dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
        if self.rank != 0:  # one voice: rank 0 prints; the others only raise
            sys.stdout = open(os.devnull, "w")

    @property
    def main(self):
        return self.rank == 0

    def shard(self, n):
        """This rank's contiguous block [lo, hi) of n items (batches, chunks)."""
        per, extra = divmod(n, self.world)
        lo = self.rank * per + min(self.rank, extra)
        return lo, lo + per + (1 if self.rank < extra else 0)

    def rows(self, batch_size):
        """This rank's rows of a global training batch (batch_size must divide by the world
        size)."""
        per = batch_size // self.world
        return slice(self.rank * per, (self.rank + 1) * per)

    def gather(self, t):
        """Every rank's ``t`` concatenated in rank order along dim 0 (their lengths may differ)."""
        if self.world == 1:
            return t
        import torch.distributed as dist

        n = torch.tensor([t.shape[0]], device=t.device)
        sizes = [torch.zeros_like(n) for _ in range(self.world)]
        dist.all_gather(sizes, n)
        sizes = [int(v) for v in sizes]
        pad = torch.zeros((max(sizes) - t.shape[0], *t.shape[1:]), dtype=t.dtype, device=t.device)
        parts = [
            torch.empty((max(sizes), *t.shape[1:]), dtype=t.dtype, device=t.device) for _ in sizes
        ]
        dist.all_gather(parts, torch.cat([t, pad]))
        return torch.cat([p[:k] for p, k in zip(parts, sizes)])

    def mean(self, x):
        """The mean of a scalar tensor over ranks (equal-sized shards: the global mean)."""
        if self.world == 1:
            return x
        import torch.distributed as dist

        x = x.detach().clone()
        dist.all_reduce(x)
        return x / self.world

    def any(self, flag):
        """True on every rank when ``flag`` is true on some rank (a stop signal seen by one)."""
        if self.world == 1:
            return bool(flag)
        import torch.distributed as dist

        t = torch.tensor([1.0 if flag else 0.0], device=self.device)
        dist.all_reduce(t)
        return bool(t.item() > 0)

    def wrap(self, model):
        """DistributedDataParallel under torchrun, the model itself otherwise."""
        if self.world == 1:
            return model
        from torch.nn.parallel import DistributedDataParallel

        ids = [self.device.index] if self.device.type == "cuda" else None
        return DistributedDataParallel(model, device_ids=ids)

    def gather_objects(self, obj):
        """Every rank's picklable ``obj`` in rank order, on every rank (a list of one without
        torchrun)."""
        if self.world == 1:
            return [obj]
        import torch.distributed as dist

        out = [None] * self.world
        dist.all_gather_object(out, obj)
        return out

    def barrier(self):
        if self.world > 1:
            import torch.distributed as dist

            dist.barrier()

    def check_batch(self, batch_size, flag="--batch-size"):
        if batch_size % self.world:
            raise UsageError(
                f"{flag} {batch_size} must divide by the {self.world} processes of torchrun; "
                f"use a multiple of {self.world}"
            )


def print_derived(title, **quantities):
    """Every script prints its derived quantities before it starts working."""
    print(f"== {title}")
    for k, v in quantities.items():
        print(f"   {k:28s} {v}")


# ---------------------------------------------------------------- run folders ----
def check_out(out, what="--out"):
    """Refuse an output folder that is a file or cannot be created, before anything is written."""
    if os.path.exists(out) and not os.path.isdir(out):
        raise UsageError(f"{what} {out} is a file, not a folder; pass a folder path")
    parent = os.path.abspath(out)
    while not os.path.exists(parent):
        parent = os.path.dirname(parent)
    if not os.path.isdir(parent) or not os.access(parent, os.W_OK | os.X_OK):
        raise UsageError(
            f"{what} {out} cannot be created or written ({parent} is not a writable folder); "
            f"pass another {what}"
        )


def strict(obj):
    """JSON-safe values: non-finite floats become None (strict JSON has no NaN), tensors plain
    numbers."""
    if isinstance(obj, dict):
        return {str(k): strict(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [strict(v) for v in obj]
    if isinstance(obj, torch.Tensor):
        return strict(obj.tolist())
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, (int, str, bool, type(None))):
        return obj
    return str(obj)


def atomic_json(path, obj):
    tmp = f"{path}.tmp.{os.getpid()}"
    with writing(path), open(tmp, "w") as f:
        json.dump(strict(obj), f, indent=2, allow_nan=False)
    os.replace(tmp, path)


def atomic_save(obj, path):
    """torch.save through a temporary file and os.replace: never a half-written file in place."""
    tmp = f"{path}.tmp.{os.getpid()}"
    try:
        with writing(path):
            torch.save(obj, tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


RUN_FILES = ("summary.json", "ckpt.pt")  # their presence means a folder holds a run worth keeping


def check_fresh(out, resume, names=RUN_FILES):
    """A rerun into a folder that holds a run must say --resume: never overwrite an earlier run's
    summary and checkpoints silently."""
    found = [n for n in names if os.path.exists(os.path.join(out, n))]
    if found and not resume:
        raise UsageError(
            f"--out {out} already holds a run ({', '.join(found)}); pass --resume to continue it, "
            f"or another --out (or delete that folder) to start afresh"
        )


# ---------------------------------------------------------------- owners and writers ----
OWNER_FILE, LOCK_FILE = "run.json", ".lock"


def read_json(path, what):
    """A run's JSON side file, or one ``error:`` line naming it when it is unreadable."""
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError) as e:
        raise UsageError(f"{what} {path} is unreadable ({type(e).__name__}: {str(e)[:80]}); "
                         f"repair or delete it, or pass another --out") from None


def check_owner(out, script, kind, fields, files):
    """Refuse a folder that another script, or another kind of run (task, model), made: OUT/run.json
    names its maker; a folder without one whose args.json has another script's flags, or that holds
    run files (``files``) no run recorded, is refused too. Nothing is written."""
    rec = os.path.join(out, OWNER_FILE)
    if os.path.isfile(rec):
        owner = read_json(rec, "the run record")
        made = (owner.get("script"), owner.get("kind")) if isinstance(owner, dict) else (None, None)
        if made != (script, kind):
            # the same script with another task or model: name the flags that differ
            diff = "".join(f"; --{name} {a} -> {b}" for name, a, b in zip(
                ("task", "model"), str(made[1]).split(), kind.split()) if a != b)
            raise UsageError(f"--out {out} holds a run of {made[0]}.py ({made[1]}), not of "
                             f"{script}.py ({kind}){diff if made[0] == script else ''}; pass "
                             f"another --out")
        return
    old = os.path.join(out, "args.json")
    if os.path.isfile(old):
        keys = read_json(old, "the run's flags")
        if not isinstance(keys, dict) or set(fields) - set(keys) or set(keys) - set(fields):
            raise UsageError(f"--out {out} holds another script's run (its args.json has other "
                             f"flags than {script}.py's); pass another --out")
        return
    found = [n for n in files if os.path.exists(os.path.join(out, n))]
    if found:
        raise UsageError(f"--out {out} holds {', '.join(found)} that no run of {script}.py "
                         f"recorded; pass another --out (or move those files)")


def _alive(pid):
    """Whether process ``pid`` runs (a zombie, killed but not yet reaped, does not)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return True


_HELD = {}  # the folder locks this process holds: path -> its content


def _unlock(path, me):
    _HELD.pop(path, None)
    try:
        with open(path) as f:
            if f.read() == me:
                os.remove(path)
    except OSError:
        pass


def release_locks():
    """Give up this process's folder locks (a run's end; also at exit)."""
    for path, me in list(_HELD.items()):
        _unlock(path, me)


def lock_folder(out):
    """One writer per folder: OUT/.lock holds the writer's PID (removed at exit). A lock of a
    running process is refused; one whose process is gone (killed) is taken over, saying so."""
    import atexit
    import socket

    os.makedirs(out, exist_ok=True)
    path, me = os.path.join(out, LOCK_FILE), f"{os.getpid()} {socket.gethostname()}\n"
    for _ in range(3):
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            try:
                with open(path) as f:
                    owner = f.read()
            except FileNotFoundError:
                continue
            pid, _, host = owner.strip().partition(" ")
            pid = int(pid) if pid.isdigit() else None
            if owner == me:
                return path
            if pid is not None and (host != socket.gethostname() or _alive(pid)):
                raise UsageError(f"--out {out} is in use by process {pid} on {host} ({path}); "
                                 f"wait for it to end, or pass another --out")
            print(f"--out {out}: taking over the stale lock {path} of process {pid or '?'}, which "
                  f"is no longer running")
            try:
                os.remove(path)
            except FileNotFoundError:
                pass
            continue
        with os.fdopen(fd, "w") as f:
            f.write(me)
        if not _HELD:
            atexit.register(release_locks)
        _HELD[path] = me
        return path
    raise UsageError(f"--out {out}: could not take the lock {path}; another process contends "
                     f"for it")


def memory_bytes(device):
    """The memory of ``device``: the GPU's, or the machine's for the CPU."""
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).total_memory
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


# the fewest float32 copies of a batch (or of a set of samples) that a run holds at once
BATCH_COPIES, SAMPLE_COPIES = 8, 4


def check_sizes(counts, elements, device):
    """Refuse a batch or sample count whose float32 copies cannot fit the device's memory, before
    any work: ``counts`` = {flag: (count, copies)}, ``elements`` = numbers per sample."""
    total = memory_bytes(device)
    for flag, (n, copies) in counts.items():
        need = n * elements * 4 * copies
        if need > total:
            raise UsageError(
                f"{flag} {n}: {n:.3g} samples of {elements} numbers need at least "
                f"{need / 2**30:.3g} GiB ({copies} float32 copies), more than the "
                f"{total / 2**30:.3g} GiB of {device}; use a smaller {flag}")


# images per sampler call of pretrain.py's final evaluation
EVAL_BATCH = 256


def check_attention_memory(model, shape, counts, device):
    """Refuse a batch whose attention score matrices cannot fit the machine, before any work: on
    the CPU, scaled_dot_product_attention materialises them (H W)^2 per head, so a preset with
    attention at a high resolution (``tiny`` at 256 pixels) asks for tens of GiB per image.
    ``counts`` = {flag: (rows per process, with gradients)}."""
    if device.type != "cpu" or len(shape) != 3:
        return
    total = memory_bytes(device)
    for flag, (n, grad) in counts.items():
        need = attention_bytes(model, shape[1], shape[2], n, grad)
        if need > total:
            raise UsageError(
                f"{flag} {n}: this network's attention on {shape[1]}x{shape[2]} images needs at "
                f"least {need / 2**30:.3g} GiB on the CPU ({need / n / 2**30:.3g} GiB per image), "
                f"more than the {total / 2**30:.3g} GiB here; use a smaller {flag}, a preset with "
                f"attention only at low resolution (base256, corrector256), or a GPU")


def os_error(e):
    """An OSError as one line naming the path (read-only, no space, file too large, denied)."""
    path = e.filename if e.filename is not None else "?"
    what = e.strerror or str(e)
    return (f"cannot write or read {path}: {what}; free space, fix its permissions or pass "
            f"another path (the last checkpoint is kept)")


def _row_key(row):
    """A logged row without its timings (``time_s``, ``*_s``, ``seconds``): what a rerun repeats."""
    return json.dumps({k: v for k, v in row.items() if not (k.endswith("_s") or "second" in k)},
                      sort_keys=True)


def read_rows(path):
    """The rows of a metrics.jsonl as (line, dict): a torn last line (a kill mid-append) is dropped
    with a line saying so; a damaged earlier line is one ``error:`` line."""
    try:
        with open(path) as f:
            lines = [ln if ln.endswith("\n") else ln + "\n" for ln in f if ln.strip()]
    except (OSError, UnicodeDecodeError) as e:
        raise UsageError(f"{path} is unreadable ({type(e).__name__}); repair or delete it, or "
                         f"pass another --out") from None
    rows = []
    for i, ln in enumerate(lines):
        try:
            row = json.loads(ln)
            if not isinstance(row, dict):
                raise ValueError("not an object")
        except ValueError:
            if i + 1 == len(lines):
                print(f"{path}: dropping its torn last line {i + 1} (a write cut short): "
                      f"{ln.strip()[:60]!r}")
                break
            raise UsageError(f"{path} line {i + 1} is not a JSON row ({ln.strip()[:60]!r}); "
                             f"repair or delete that line, or pass another --out") from None
        rows.append((ln, row))
    return rows


class RunLog:
    """OUT/args.json at start, OUT/metrics.jsonl one line per log call, OUT/summary.json at the end.

    Create it only after every input is validated: it is the first thing that touches --out. A fresh
    run moves an earlier metrics.jsonl to metrics.prev.jsonl; a resumed one drops the rows logged
    after its checkpoint (``resumed_at``), so an interrupted-and-resumed log equals an
    uninterrupted one."""

    def __init__(self, out, args, resumed_at=None, run_files=RUN_FILES, write=True):
        check_fresh(out, getattr(args, "resume", False), run_files)
        self.out, self.write, self.t0, self.seen = out, write, time.time(), set()
        if not write:  # a torchrun rank other than 0: same calls, nothing written
            return
        # the rows kept on resume are read (a torn one dropped) before anything is written
        path, keep = self.path("metrics.jsonl"), None
        if resumed_at is not None and os.path.exists(path):
            key, value = resumed_at
            keep = [ln for ln, row in read_rows(path) if row.get(key, -1) <= value]
            # rows a resumed phase logs again (identical but for timings) are not repeated
            self.seen = {_row_key(json.loads(ln)) for ln in keep}
        os.makedirs(out, exist_ok=True)
        for name in os.listdir(out):  # temporary files of writers that were killed mid-write
            if ".tmp." in name and os.path.isfile(os.path.join(out, name)):
                os.remove(os.path.join(out, name))
        atomic_json(self.path("args.json"), vars(args))
        if resumed_at is None and os.path.exists(path):
            os.replace(path, self.path("metrics.prev.jsonl"))
        elif keep is not None:
            with open(f"{path}.tmp.{os.getpid()}", "w") as f:
                f.writelines(keep)
            os.replace(f"{path}.tmp.{os.getpid()}", path)

    def path(self, name):
        return os.path.join(self.out, name)

    def log(self, **row):
        if not self.write or _row_key(strict(row)) in self.seen:
            return
        row = {"time_s": round(time.time() - self.t0, 2), **row}
        with writing(self.path("metrics.jsonl")), open(self.path("metrics.jsonl"), "a") as f:
            f.write(json.dumps(strict(row), allow_nan=False) + "\n")

    def summary(self, **summary):
        summary = strict({"wall_time_s": round(time.time() - self.t0, 1), **summary})
        if self.write:
            atomic_json(self.path("summary.json"), summary)
            release_locks()
        return summary


# ---------------------------------------------------------------- resume ----
def _same(a, b):
    return json.dumps(strict(a), sort_keys=True) == json.dumps(strict(b), sort_keys=True)


def check_resume(ckpt, args, may_change, path):
    """Refuse to resume a checkpoint made with other defining arguments (all but ``may_change``)."""
    old = ckpt.get("args") or {}
    diff = [
        k
        for k, v in vars(args).items()
        if k not in may_change and k != "resume" and k in old and not _same(old[k], v)
    ]
    if diff:
        shown = ", ".join(
            f"--{k.replace('_', '-')} {old[k]!r} -> {getattr(args, k)!r}" for k in diff
        )
        raise UsageError(
            f"{path} was made with other arguments ({shown}); rerun with the checkpoint's values, "
            f"or drop --resume and pass another --out"
        )


def load_resume(path, args, may_change):
    """The checkpoint to resume from (checked against ``args``), or None, saying "starting
    fresh"."""
    if not args.resume:
        return None
    if not os.path.exists(path):
        # a finished run whose checkpoint is gone: starting fresh would replace its record
        if os.path.exists(os.path.join(args.out, "summary.json")):
            raise UsageError(f"--resume: {args.out} holds a finished run (summary.json) but no "
                             f"checkpoint {path} to continue from; pass another --out")
        print(f"--resume: no checkpoint at {path}; starting fresh")
        return None
    ckpt = load_checkpoint(path)
    check_resume(ckpt, args, may_change, path)
    return ckpt


def restore(ckpt, model, ema, opt):
    """Weights, EMA, optimiser and global RNG from a checkpoint; returns (step, extra)."""
    model.load_state_dict(ckpt["model"])
    if ckpt.get("ema") is not None:
        ema.load_state_dict(ckpt["ema"], step=ckpt.get("ema_step", ckpt["step"]))
    if ckpt.get("optimizer") is not None:
        opt.load_state_dict(ckpt["optimizer"])
    set_rng_state(ckpt["rng"])
    return ckpt["step"], ckpt.get("extra") or {}


def load_pool(path):
    """The accepted samples (or kept states) of the rounds so far, saved next to the checkpoint
    that names them."""
    try:
        pool = torch.load(path, map_location="cpu", weights_only=True)
        # another file in its place (a checkpoint copied over it): no samples under "x"
        if not (isinstance(pool, dict) and isinstance(pool.get("x"), torch.Tensor)):
            raise ValueError("not a pool of samples")
        return pool
    except Exception as e:
        # missing, truncated or another file
        raise CheckpointError(
            f"cannot resume: the pool of accepted samples {path} is missing or damaged "
            f"({type(e).__name__}); rerun without --resume into another --out"
        ) from None


# ---------------------------------------------------------------- divergence ----
LOSS_LIMIT = (
    1e3  # every loss here is a mean squared error of O(1) quantities: 1e3 means it has exploded
)


def check_loss(losses, step, lr, flag="--lr", dist=None):
    """Mean of the logged window of losses (one host sync; over all ranks under torchrun); a
    non-finite or exploding value raises Diverged naming the step and the likely cause, before
    anything is written."""
    mean = torch.stack(losses).mean()
    mean = (dist.mean(mean) if dist is not None else mean).item()
    if not math.isfinite(mean) or mean > LOSS_LIMIT:
        raise Diverged(
            f"training diverged by step {step} (mean loss {mean:.4g}); "
            + (f"the learning rate {flag} {lr:g} is likely too high: lower it"
               if not flag.startswith("--kl-coef") else
               f"the KL weight {flag} {lr:g} is likely too high: lower --kl-coef first")
            + ". The last good checkpoint was kept"
        )
    return mean


def check_weights(model, step, lr, flag="--lr"):
    """Refuse to checkpoint or evaluate non-finite weights (one host sync)."""
    ok = torch.stack([torch.isfinite(p).all() for p in model.parameters()]).all().item()
    if not ok:
        raise Diverged(
            f"the weights hold NaN/inf at step {step}; the learning rate {flag} {lr:g} is likely "
            f"too "
            f"high: lower it. The last good checkpoint was kept"
        )


# approx KL (nats per step) of a policy from its sampling one beyond which the updates exploded
KL_LIMIT = 1e3


def check_policy(kls, step, lr, dist=None):
    """PPO's approx_kl over the logged window (one host sync; over all ranks under torchrun, so
    every rank decides alike): non-finite or beyond KL_LIMIT nats per step means the updates left
    any trust region (a loss clipped by PPO can stay small while the policy explodes); raises
    Diverged before anything is written."""
    v = torch.stack(kls).mean()
    v = (dist.mean(v) if dist is not None else v).item()
    if not math.isfinite(v) or v > KL_LIMIT:
        raise Diverged(
            f"the policy diverged by step {step} (approx KL {v:.4g} per step from the sampling "
            f"policy); the learning rate --lr {lr:g} is likely too high: lower it. The last good "
            f"checkpoint was kept"
        )
    return v


# ---------------------------------------------------------------- models ----
def build_network(task, model_kind, preset=None, conditional=None):
    preset = preset or task.presets[model_kind]
    conditional = task.conditional if conditional is None else conditional
    nc = task.num_classes if conditional else 0
    cd = task.cond_dim if conditional else 0
    if task.kind == "points":
        if preset != "mlp":  # an unknown or image preset used to be ignored silently
            raise UsageError(
                f"--preset {preset!r}: the {task.name} network is the 2-D MLP; use --preset mlp"
            )
        return TimeMLP(dim=2, hidden=256, depth=3, num_classes=nc, cond_dim=cd)
    try:
        return unet_from_preset(preset, task.image_size, task.channels, num_classes=nc, cond_dim=cd)
    except ValueError as e:
        raise UsageError(f"--preset: {e}") from None


def build_process(task, model_kind, schedule="linear"):
    try:
        return DDPM(task.ddpm_steps, schedule) if model_kind == "ddpm" else RectifiedFlow()
    except ValueError as e:
        raise UsageError(str(e)) from None


def default_base_path(task_name, model_kind):
    return os.path.join("runs", "pretrain", f"{task_name}-{model_kind}", "ckpt.pt")


def ensure_base(path, task, model_kind, seed=0, device="auto", data_dir=None):
    """The reference checkpoint: ``path`` if given, else the task's default, which is pretrained
    first by running ``python pretrain.py`` (scripts never import each other) when absent."""
    if path:
        return path
    path = default_base_path(task.name, model_kind)
    if os.path.isfile(path):
        return path
    argv = [
        "--task",
        task.name,
        "--model",
        model_kind,
        "--out",
        os.path.dirname(path),
        "--seed",
        str(seed),
        "--device",
        device,
    ] + (["--data-dir", data_dir] if data_dir else [])
    print(
        f"no reference model at {path}: pretraining it first with {task.name}'s default budget "
        f"(python pretrain.py {' '.join(argv)}). Faster routes: --base PATH to a checkpoint you "
        f"have, "
        f"--base diffusers:PATH_OR_REPO_ID for a pretrained diffusers UNet2DModel, or pretrain a "
        f"smaller "
        f"model yourself (python pretrain.py --task {task.name} --preset tiny --train-steps 2000) "
        f"and "
        f"pass it with --base. What the pretraining costs here:",
        flush=True,
    )
    rc = run_script("pretrain.py", argv + ["--dry-run"])
    if rc == 0:
        rc = run_script("pretrain.py", argv)
    if rc != 0 or not os.path.isfile(path):
        raise UsageError(
            f"pretraining the reference failed (exit {rc}, see above); fix that, or pass --base"
        )
    return path


def run_script(name, argv):
    """Run one of the top-level scripts as its own process; returns its exit code."""
    return subprocess.run([sys.executable, os.path.join(ROOT, name), *argv]).returncode


def load_base(path, device, task=None):
    """(model, process, ckpt) of a reference model; EMA weights, frozen.
    ``diffusers:PATH_OR_REPO_ID``
    loads a pretrained diffusers UNet2DModel and maps its scheduler (models/diffusers_unet.py)."""
    if str(path).startswith("diffusers:"):
        from models.diffusers_unet import DiffusersError, load

        try:
            model, process, ckpt = load(path, device)
        except DiffusersError as e:
            raise UsageError(str(e)) from None
        if task is not None and (task.kind != "image" or model.config["in_ch"] != task.channels):
            raise UsageError(
                f"{path} takes {model.config['in_ch']}-channel images; task {task.name} has "
                f"{task.shape()}: pass the task its images match"
            )
        return model.requires_grad_(False), process, ckpt
    ckpt = load_checkpoint(path)
    if (
        task is not None
    ):  # a model of another task (or network kind) is refused before it meets the task's data
        made_for = ckpt["args"].get("task") if isinstance(ckpt.get("args"), dict) else None
        cfg = ckpt["model_config"]
        fits = (
            (cfg.get("kind") == "mlp" and cfg.get("dim") == 2)
            if task.kind == "points"
            else (cfg.get("kind") in ("unet", "diffusers") and cfg.get("in_ch") == task.channels)
        )
        if made_for not in (None, task.name) or not fits:
            raise UsageError(
                f"{path} is a model of task {made_for or '?'} ({cfg.get('kind')} network), not of "
                f"{task.name}; pass --task {made_for or '...'} or a {task.name} base"
                if made_for not in (None, task.name) else
                f"{path} holds a {cfg.get('kind')} network with {cfg.get('in_ch', cfg.get('dim'))} "
                f"inputs, which does not fit task {task.name} ({task.kind} of shape "
                f"{tuple(task.shape())}); pass a base pretrained on {task.name}"
            )
    model, process = model_from_checkpoint(ckpt, device)
    return model.requires_grad_(False), process, ckpt


def check_ddpm_reference(ref, process, base_ckpt, base_path, sample_steps, cfg_scale, method):
    """The reference a fine-tuning script can use: a DDPM, sampled in at most N steps, with
    guidance only where the null condition was trained. Returns whether it takes conditions."""
    if not isinstance(process, DDPM):
        raise UsageError(
            f"{base_path} is not a DDPM (process {base_ckpt.get('process')}); {method} "
            f"fine-tunes DDPMs"
        )
    if sample_steps > process.N:
        raise UsageError(
            f"--sample-steps {sample_steps} exceeds the chain's N = {process.N}; use at "
            f"most {process.N}"
        )
    conditional = bool(ref.config.get("num_classes") or ref.config.get("cond_dim"))
    made_with = base_ckpt.get("args") if isinstance(base_ckpt.get("args"), dict) else {}
    if cfg_scale > 0 and not (conditional and made_with.get("cond_drop", 0) > 0):
        raise UsageError(
            f"--cfg-scale {cfg_scale} needs a conditional base pretrained with "
            f"--cond-drop > 0 (its null condition is untrained otherwise); {base_path} "
            f"is not one"
        )
    return conditional


def load_reference(args, task, device, *, method):
    """The frozen reference DDPM a fine-tuning script starts from (pretrained first when --base is
    None), checked by check_ddpm_reference before --out is touched. Returns (ref, process,
    base_ckpt, base_path, conditional, data): ``data`` is the training split whose attribute rows
    are the conditions (CelebA), else None."""
    base_path = ensure_base(args.base, task, "ddpm", seed=args.seed, device=args.device,
                            data_dir=args.data_dir)
    ref, process, base_ckpt = load_base(base_path, device, task=task)
    conditional = check_ddpm_reference(ref, process, base_ckpt, base_path, args.sample_steps,
                                       args.cfg_scale, method)
    data = task.dataset("train", args.data_dir) if ref.config.get("cond_dim") else None
    return ref, process, base_ckpt, base_path, conditional, data


def wrap_net(model, bf16=False, compile=False):
    """The network as the samplers call it: optional torch.compile and bf16 autocast (CUDA only)."""
    dev = next(model.parameters()).device
    net = torch.compile(model) if compile and dev.type == "cuda" else model
    if not (bf16 and dev.type == "cuda"):
        return net

    def call(x, t, y=None):
        with torch.autocast("cuda", dtype=torch.bfloat16):
            return net(x, t, y).float()

    return call


def n_params(model):
    return f"{count_params(model) / 1e6:.3f}M"


# ---------------------------------------------------------------- sampling and pictures ----
def steps_progress(desc):
    """The ``progress`` a sampler (DDPM.sample, RectifiedFlow.sample) takes over one batch's steps:
    tqdm (not left behind) on a terminal, else a line every PROGRESS_EVERY_S seconds, so one long
    batch shows it moving. Each step reads only the wall clock: no host sync."""

    def wrap(steps):
        if sys.stderr.isatty():
            from tqdm import tqdm

            return tqdm(steps, desc=desc, leave=False, mininterval=2)
        return progress(steps, desc)

    return wrap


def generate(
    model,
    process,
    task,
    n,
    gen,
    batch_size=1000,
    y=None,
    num_steps=None,
    eta=1.0,
    flow_method="euler",
    show_progress=False,
):
    """n samples from a model with the task's default sampler: DDPM ancestral (eta=1) over
    ``num_steps`` (default task.sample_steps) or Euler over task.flow_steps. Returns CPU tensor."""
    dev = next(model.parameters()).device if isinstance(model, torch.nn.Module) else gen.device
    out = []
    starts = range(0, n, batch_size)
    for i in progress(starts, "sample") if show_progress else starts:
        b = min(batch_size, n - i)
        # one long batch shows its sampler steps moving too
        steps = (steps_progress(f"sampler steps of sample batch {i // batch_size + 1}/"
                                f"{len(starts)}") if show_progress else None)
        yb = y[i : i + b] if y is not None else None
        z = torch.randn((b, *task.shape()), generator=gen, device=dev)
        if isinstance(process, DDPM):
            x, _ = process.sample(
                model,
                z,
                y=yb,
                generator=gen,
                eta=eta,
                num_steps=num_steps or task.sample_steps,
                clip=task.kind == "image",
                progress=steps,
            )
        else:
            x = process.sample(model, z, num_steps or task.flow_steps, y=yb, method=flow_method,
                               progress=steps)
        out.append(x.clamp(-1, 1).cpu() if task.kind == "image" else x.cpu())
    return torch.cat(out)


def evaluation_summary(base_eval, last, task, fid_samples, target=None):
    """The evaluation fields every fine-tuning script's summary carries, at the base and at the end:
    reward, classifier accuracy, toy2d's mode weights (and the TV to an exact tilted ``target``),
    FID on image tasks."""
    s = dict(reward_base=base_eval["reward_mean"], reward_final=last["reward_mean"])
    for k in ("accuracy", "all_correct"):
        if k in base_eval:
            s[f"{k}_base"], s[f"{k}_final"] = base_eval[k], last.get(k)
    if task.name == "toy2d":
        if target is not None:
            s.update(
                tilt_tv=last.get("tilt_tv"),
                tilt_tv_base=base_eval.get("tilt_tv"),
                tilt_target=[round(v, 4) for v in target.tolist()],
            )
        s.update(mode_hist_base=base_eval["mode_hist"], mode_hist_final=last["mode_hist"])
    if task.kind == "image":
        s.update(fid_base=base_eval.get("fid"), fid_final=last.get("fid"), fid_samples=fid_samples)
    return s


DONE_KEYS = (
    "reward_base",
    "reward_final",
    "tilt_tv",
    "fid_base",
    "fid_final",
    "accuracy_base",
    "accuracy_final",
    "samples_generated",
    "wall_time_s",
)


def print_done(summary, out, keys=None):
    """The closing line: the headline numbers of a summary (``keys``, None: DONE_KEYS) and where
    it was written."""
    shown = ", ".join(
        f"{k}={v:.4f}" if isinstance(v, float) else f"{k}={v}"
        for k, v in summary.items()
        if k in (keys or DONE_KEYS)
    )
    print(f"done: {shown}; wrote {out}")


def round_pictures(task, reward, log, x_base, x_final, middle, name, rnd, nrow=8):
    """A fine-tuning round's pictures: toy2d: OUT/samples.npy and samples.png (the base, ``middle``
    = (label, points), the model ``name`` after round ``rnd``, over the reward); images:
    OUT/samples_base.png and samples_round<rnd>.png."""
    label, points = middle
    if x_base is None:
        # a run resumed from a checkpoint older than the base preview: no base picture
        x_base = x_final[:0]
    if task.kind == "points":
        np.save(log.path("samples.npy"), x_final.cpu().numpy())
        sets = {"base (reference)": x_base.cpu(), label: points.cpu(), name: x_final.cpu()}
        plot_points(
            sets,
            log.path("samples.png"),
            title=f"{name} on toy2d, reward {reward.name} (shaded)",
            background=(reward.fn, "reward"),
        )
    else:
        save_grid(x_base[: nrow * 8].cpu(), log.path("samples_base.png"), nrow=nrow)
        save_grid(x_final[: nrow * 8].cpu(), log.path(f"samples_round{rnd}.png"), nrow=nrow)


@torch.no_grad()
def correction_pictures(task, out, *, process, corr_net, kept, best, n, data, z_inv, seed, device):
    """inverse_noise.py's pictures. Images: OUT/samples_base_N<n>.png and
    samples_corrected_N<n>_Nc<best>.png, grids of ``kept[0]`` (the base at N) and ``kept[best]``
    (corrector at N_c = best, then the base). toy2d: OUT/samples.png, data space (data, base, base
    + corrector) and noise space (the inverted noise ``z_inv``, the corrector's samples from noise
    of generator ``seed`` as the table's rows draw it, and that noise)."""
    if task.kind == "image":
        save_grid(kept[0], os.path.join(out, f"samples_base_N{n}.png"), nrow=8)
        save_grid(kept[best], os.path.join(out, f"samples_corrected_N{n}_Nc{best}.png"), nrow=8)
        return
    eps = torch.randn((5000, *z_inv.shape[1:]), generator=generator(seed, device), device=device)
    z_corr = process.sample(corr_net, eps, best).cpu()
    sets = {"data": data.tensors[0][:5000], f"base N={n}": kept[0],
            f"base+corrector N_c={best}": kept[best], "inverted noise": z_inv[:5000],
            f"corrector samples (N_c={best})": z_corr, "N(0, I)": eps.cpu()}
    plot_points(sets, os.path.join(out, "samples.png"),
                title=f"{task.name}: data space (first three panels), noise space (last three)")


def save_grid(images, path, nrow=None):
    import torchvision

    nrow = nrow or int(math.ceil(math.sqrt(len(images))))
    torchvision.utils.save_image(
        images.float().add(1).div(2).clamp(0, 1), path, nrow=nrow, padding=1
    )


def plot_points(sets, path, title="", background=None):
    """Scatter one or more 2-D point sets side by side; background=(fn, label) shades a reward."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(sets), figsize=(4 * len(sets), 4), squeeze=False)
    for ax, (name, pts) in zip(axes[0], sets.items()):
        if background is not None:
            fn, label = background
            g = torch.linspace(-3, 3, 200)
            xx, yy = torch.meshgrid(g, g, indexing="xy")
            zz = fn(torch.stack([xx.flatten(), yy.flatten()], 1)).reshape(200, 200)
            cs = ax.contourf(xx, yy, zz, levels=20, cmap="viridis", alpha=0.5)
            fig.colorbar(cs, ax=ax, label=label, fraction=0.046)
        p = pts[:5000].cpu()
        ax.scatter(p[:, 0], p[:, 1], s=1, c="k", alpha=0.4)
        ax.set(xlim=(-3, 3), ylim=(-3, 3), aspect="equal", title=name)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# ---------------------------------------------------------------- fine-tuning rounds ----
def sampler_eta(sampler, eta, typed):
    """The eta a sampler runs at: ancestral DDPM is eta = 1 and refuses another typed --eta."""
    if sampler == "ddpm" and typed and eta != 1.0:
        raise UsageError(
            f"--eta {eta} with --sampler ddpm: ancestral sampling is eta = 1; use --sampler ddim "
            f"--eta {eta}"
        )
    return 1.0 if sampler == "ddpm" else eta


def toy2d_target(task, reward, rule, abar, rounds, sample_from):
    """toy2d: the exact mode weights of the accepted law at noise level ``abar`` (1: X_0, GRAFT;
    abar_{N_I}: P-GRAFT), from rewards/toy2d.py; None on other tasks."""
    if task.name != "toy2d" or not hasattr(reward, "cdf"):
        return None
    from rewards.toy2d import tilted_mode_weights

    return tilted_mode_weights(rule.prob, reward, abar, rounds, compound=sample_from == "current")


def finetune_settings(args, task, base_path, reward, ema, conditional, eta, N, fid_samples,
                      target):
    """The derived quantities a fine-tuning script prints before it starts."""
    per_round = args.prompts * args.M
    fixed = args.accept in ("topk", "bon")
    return dict(
        base=base_path,
        conditional=conditional,
        reward=f"{reward.name}: {reward.description}",
        accept=f"{args.accept} (M={args.M}, K={args.K}, tau={args.tau}, alpha={args.alpha})",
        samples_per_round=f"{args.prompts} conditions x M={args.M} = {per_round}",
        expected_accepted=f"{args.prompts * args.K} per round" if fixed else "random",
        rounds=args.rounds,
        sample_budget=args.rounds * per_round,
        sample_from=args.sample_from,
        sampler=f"{args.sampler} eta={eta}, {args.sample_steps} steps over N={N}, "
        f"cfg {args.cfg_scale}",
        finetune=f"{args.train_steps} steps/round, batch {args.batch_size}, lr {args.lr}, "
        f"EMA {ema.describe()}",
        eval=f"{args.eval_samples} samples" + (f", FID on {fid_samples}" if fid_samples else ""),
        tilt_target=None if target is None else [round(v, 4) for v in target.tolist()],
    )


def check_accepted(mask, r, rnd, accept):
    """A round whose rule accepted nothing cannot fine-tune: say so and how to fix it."""
    if not bool(mask.any()):
        raise UsageError(
            f"round {rnd}: the rule {accept} accepted none of {len(r)} samples "
            f"(reward max {r.max().item():.4g}); lower --tau or raise --alpha"
        )


def round_stats(r, mask, r_hat, acc_prob, pool, samples, suffix=""):
    """A round's selection statistics (one host sync each, after sampling). ``suffix`` names what
    the acceptance probability is of ("_x0" in P-GRAFT, where X_{N_I} is kept)."""
    from rewards.acceptance import kl_proxy

    n_acc = int(mask.sum())
    return {
        "reward_all_mean": r.mean().item(),
        "reward_all_std": r.std().item() if len(r) > 1 else 0.0,
        "reward_accepted_mean": r[mask].mean().item(),
        "reward_accepted_std": r[mask].std().item() if n_acc > 1 else 0.0,
        "acceptance_rate": n_acc / len(r),
        "accepted": n_acc,
        "pool": pool,
        f"r_hat{suffix}_mean": r_hat.mean().item(),
        f"r_hat{suffix}_accepted_mean": r_hat[mask].mean().item(),
        f"kl_proxy{suffix}": kl_proxy(acc_prob),
        "samples_generated": samples,
    }


def prefixed(prefix, d):
    """``d``'s scalar entries with ``prefix`` on their keys (lists are left out)."""
    return {f"{prefix}{k}": v for k, v in d.items() if not isinstance(v, list)}


def print_eval(tag, ev):
    shown = ", ".join(f"{k}={v:.4f}" for k, v in ev.items() if isinstance(v, float))
    print(f"   eval {tag}: {shown}", flush=True)


def print_round(rnd, rounds, stats, loss, ev, base_eval):
    kl = next(v for k, v in stats.items() if k.startswith("kl_proxy"))
    print(
        f"round {rnd}/{rounds}: reward all {stats['reward_all_mean']:.4f}, accepted "
        f"{stats['reward_accepted_mean']:.4f}, accept rate {stats['acceptance_rate']:.3f}, "
        f"KL proxy {kl:.4f}, loss {loss:.4f}, eval reward {ev['reward_mean']:.4f} "
        f"(base {base_eval['reward_mean']:.4f}), samples {stats['samples_generated']}",
        flush=True,
    )


def preview(x, task, n_images=100, n_points=5000):
    """The few samples a picture shows, on the CPU (kept in the checkpoint for resumed runs)."""
    return x[: n_points if task.kind == "points" else n_images].cpu()


# ---------------------------------------------------------------- P-GRAFT's N_I ----
def parse_steps(spec, process, flag, allow_n=False):
    """Steps of the chain from '0.25' / '0,0.1,0.5' / '50' / 'abar:0.9,0.5': values in [0, 1) are
    fractions of N, integers >= 1 steps, ``abar:A,...`` the steps whose abar_n is nearest A."""
    N, text = process.N, str(spec)
    by_abar = text.startswith("abar:")
    items = text[5:].split(",") if by_abar else text.split(",")
    out = []
    for item in items:
        try:
            v = float(item)
        except ValueError:
            raise UsageError(
                f"{flag} {spec!r}: expected numbers (fractions of N in [0, 1), integer steps, or "
                f"abar:A with 0 < A < 1)"
            ) from None
        if by_abar:
            if not 0 < v < 1:
                raise UsageError(f"{flag} abar:{item}: out of range, need 0 < abar < 1")
            n = int((process.alpha_bar - v).abs().argmin())
        elif v == 1.0 and allow_n:
            n = N
        elif 0 <= v < 1:
            n = int(round(v * N))
        elif v >= 1 and v == int(v):
            n = int(v)
        else:
            raise UsageError(
                f"{flag} {item}: out of range (a fraction of N in [0, 1) or an integer step 1..N-1)"
            )
        if not 0 <= n < N + (1 if allow_n else 0):
            raise UsageError(
                f"{flag} {item} gives N_I = {n}, out of range: need 0 <= N_I < N = {N}"
            )
        if n in out and not allow_n:
            raise UsageError(f"{flag} {spec!r} gives N_I = {n} twice; list each N_I once")
        out.append(n)
    return out


def check_continuation(process, n_i, sample_steps, eta):
    """P-GRAFT needs a random continuation N_I -> 0 (else X_0 is a function of X_{N_I}: GRAFT
    again). Refuse an N_I > 0 whose continuation on the sampling grid draws no noise, naming the
    nearest N_I whose continuation does. Returns the number of random continuation steps."""
    k = process.stochastic_steps(n_i, 0, sample_steps, eta, keep=[n_i]) if n_i > 0 else 0
    if n_i > 0 and k == 0:
        grid = process.grid(process.N, 0, sample_steps)
        ok = next(n for n in reversed(grid) if process.stochastic_steps(n, 0, sample_steps, eta))
        raise UsageError(
            f"--n-i {n_i}: on the {sample_steps}-step sampling grid the continuation {n_i} -> 0 is "
            f"one deterministic step, so P-GRAFT would be GRAFT; use --n-i {ok} (abar "
            f"{float(process.alpha_bar[ok]):.3f}) or more, or raise --sample-steps"
        )
    return k


def finetune_summary(args, method, *, samples, reward, eta, ema):
    """The settings a fine-tuning script's summary.json opens with (graft.py, pgraft.py)."""
    return dict(task=args.task, method=method, accept=args.accept, M=args.M, K=args.K,
                tau=args.tau, alpha=args.alpha, rounds=args.rounds, samples_generated=samples,
                reward=reward.name, sample_from=args.sample_from, sampler=args.sampler,
                sample_steps=args.sample_steps, eta=eta, cfg_scale=args.cfg_scale,
                ema=ema.describe())
