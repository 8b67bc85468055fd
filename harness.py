"""The run harness: what every script does around its algorithm, behind a few keyword-only calls.

A script declares its flags as one ``@dataclass`` whose fields are made with ``arg(default, doc)``
and gets them with ``parse``. Its loop then talks to one ``Run`` in five places:

    run = Run(args, script="graft", out=default_out)      # device, torchrun, --out checked
    done, saved = run.begin(model=..., ema=..., opt=..., settings=...)  # resume + print + log
    with run.stop_signals():                              # SIGTERM / Ctrl-C end a step cleanly
        ... run.step(loss, step=..., steps=..., model=...)  # loss window, divergence, log, stop
        ... run.end_round(rnd, ...)                       # pool, checkpoint, metrics, pictures
    run.finish(**summary)                                 # summary.json and the closing line

Nothing here is an algorithm of the paper, and nothing calls back into a script.
"""

import argparse
import dataclasses
import math
import os

import torch

import common
from models import save_checkpoint
from tasks import TASKS, UsageError

LOG_EVERY = 100  # optimiser steps per logged loss (one host sync each)


# ---------------------------------------------------------------- the config block ----
def arg(default, doc, *, check=None, choices=None, may_change=False):
    """One config field: its default, a one-line doc (the --help text), an argparse type that
    checks the value (``check``), ``choices``, and whether it may differ on --resume."""
    meta = dict(doc=doc, check=check, choices=choices, may_change=may_change)
    return dataclasses.field(default=default, metadata=meta)


@dataclasses.dataclass
class RunArgs:
    """The flags every script has; a script's config block adds its own below these."""

    task: str = arg("toy2d", "task from tasks.py: data, sizes, defaults", choices=list(TASKS))
    out: str = arg(None, "output folder (None: runs/<script>/<task>...)", may_change=True)
    seed: int = arg(0, "seed of every random draw (data order, noise, init)",
                    check=common.seed_int)
    device: str = arg("auto", "cpu, cuda, cuda:1, ... (auto: cuda when available)",
                      may_change=True)
    resume: bool = arg(False, "continue from OUT/ckpt.pt (the flags that define the run must "
                       "match the checkpoint's; see 'may change on resume' below)")
    data_dir: str = arg(None, "where the task's data lies (None: the task's default; README)",
                        may_change=True)
    bf16: bool = arg(False, "bf16 autocast for network calls (CUDA only)")
    compile: bool = arg(False, "torch.compile the network (CUDA only)", may_change=True)


def may_change(cls):
    """The fields of a config class that may differ between a run and its --resume."""
    return tuple(f.name for f in dataclasses.fields(cls) if f.metadata.get("may_change"))


def parse(cls, argv=None, *, task_defaults=None, doc=None):
    """The config ``cls`` from the command line, with ``task_defaults[task]`` overriding the field
    defaults. Returns (args, given): ``given`` is the set of fields typed on the command line."""
    epilog = []
    if task_defaults:
        epilog.append("per-task defaults (override the ones above when --task is that task): "
                      + "; ".join(f"{t}: " + ", ".join(f"--{k.replace('_', '-')} {v}"
                                                       for k, v in d.items())
                                  for t, d in task_defaults.items()))
    epilog.append("may change on resume: "
                  + ", ".join(f"--{k.replace('_', '-')}" for k in may_change(cls)))
    p = common.Parser((doc or cls.__doc__ or "").strip().splitlines()[0], " | ".join(epilog))
    # a second parser without defaults tells which flags were typed
    typed = argparse.ArgumentParser(add_help=False)
    for f in dataclasses.fields(cls):
        m, flag = f.metadata, "--" + f.name.replace("_", "-")
        if isinstance(f.default, bool):
            p.add_argument(flag, action="store_true", help=m["doc"])
            typed.add_argument(flag, action="store_true", default=argparse.SUPPRESS)
            continue
        kind = m.get("check") or (type(f.default) if f.default is not None else str)
        p.add_argument(flag, type=kind, default=f.default, choices=m.get("choices"),
                       help=m["doc"])
        typed.add_argument(flag, default=argparse.SUPPRESS)
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--task", default=p.get_default("task"))
    task = pre.parse_known_args(argv)[0].task
    if task_defaults and task in task_defaults:
        p.set_defaults(**task_defaults[task])
    ns = p.parse_args(argv)
    given = set(vars(typed.parse_known_args(argv)[0]))
    return cls(**vars(ns)), given


def refuse(msg):
    """A usage error found after parsing: one ``error:`` line, exit 2 (via common.run_main)."""
    raise UsageError(msg)


# ---------------------------------------------------------------- the run ----
class Run:
    """One run of a script: its device and torchrun rank, its --out folder, resume, stop signals,
    divergence checks, metrics.jsonl, checkpoints and summary. Only rank 0 writes or prints."""

    def __init__(self, args, *, script, out, batch_size=None, unit="round"):
        self.args, self.script, self.unit = args, script, unit
        self.dist = common.Dist(common.pick_device(args.device))
        self.device, self.main = self.dist.device, self.dist.main
        if batch_size is not None:
            self.dist.check_batch(batch_size)
        args.out = args.out if args.out is not None else out
        if not args.out:
            refuse("--out is empty; pass a folder path")
        common.check_out(args.out)
        common.check_fresh(args.out, args.resume)
        self.out, self.ckpt_path = args.out, os.path.join(args.out, "ckpt.pt")
        # this rank's rows of each global training batch under torchrun (None: all of them)
        self.rows = self.dist.rows(batch_size) if batch_size and self.dist.world > 1 else None
        self.log, self.window, self.loss, self.stop = None, [], math.nan, None

    def path(self, name):
        return os.path.join(self.out, name)

    def begin(self, *, model=None, ema=None, opt=None, settings, title=None):
        """Resume (checked against the flags, then weights, EMA, optimiser and RNG restored), write
        OUT/args.json and print the run's derived settings. Returns (done, saved): the rounds (or
        steps) finished and the ``extra`` dict the last checkpoint saved ({} when fresh)."""
        ckpt = common.load_resume(self.ckpt_path, self.args, may_change(type(self.args)))
        done, saved = 0, {}
        if ckpt is not None:
            done, saved = common.restore(ckpt, model, ema, opt)
            print(f"resumed from {self.ckpt_path} after {self.unit} {done}")
        self.log = common.RunLog(self.out, self.args, write=self.main,
                                 resumed_at=(self.unit, done) if ckpt is not None else None)
        common.print_derived(title or f"{self.script} on {self.args.task}", device=self.device,
                             **settings, out=self.out)
        return done, saved

    def stop_signals(self):
        """The scope in which SIGTERM / Ctrl-C only set a flag that ``step`` acts on."""
        self.stop = common.StopSignals()
        return self.stop

    def step(self, loss, *, step, steps, model, lr, round=None, resume_hint=None):
        """After an optimiser step: keep the loss for the logged window; every LOG_EVERY steps and
        at the last one check it (divergence stops the run, keeping the last good checkpoint) and
        log it; at the last step check the weights; on a stop signal stop. Returns the last logged
        mean loss."""
        self.window.append(loss.detach())
        at = {} if round is None else {"round": round}
        if step % LOG_EVERY == 0 or step == steps:
            self.loss = common.check_loss(self.window, step, self.args.lr, dist=self.dist)
            self.window = []
            self.log.log(**at, step=step, loss=self.loss, lr=lr)
        if step == steps:
            # never evaluate or checkpoint weights that hold NaN
            common.check_weights(model, f"{steps}" + (f" of round {round}" if at else ""),
                                 self.args.lr)
        if self.stop is not None and self.dist.any(self.stop.requested):
            self.stop.requested = self.stop.requested or "SIGTERM"
            where = f"in round {round} at fine-tuning step {step}" if at else f"at step {step}"
            self.stop.stop(where, resume_hint or "rerun the same command with --resume: it "
                           f"continues after round {(round or 1) - 1}")
        return self.loss

    def end_round(self, rnd, *, model, process, ema, opt, extra, row, pool=None, pictures=None):
        """A round's end: log ``row``, save the pool of accepted samples and then the checkpoint
        that names it (a kill between leaves the old pair), drop the previous pool, and draw the
        round's pictures: ``pictures`` = dict(task, reward, base, final, middle=(label, points),
        name, nrow)."""
        self.log.log(round=rnd, **{k: v for k, v in row.items() if not isinstance(v, list)})
        if not self.main:
            return
        if pool is not None:
            common.atomic_save(pool, self.path(f"pool_round{rnd}.pt"))
            extra = dict(extra, pool=f"pool_round{rnd}.pt")
        save_checkpoint(self.ckpt_path, model, process, ema, opt, rnd, self.args, extra=extra)
        if pool is not None and os.path.exists(self.path(f"pool_round{rnd - 1}.pt")):
            os.remove(self.path(f"pool_round{rnd - 1}.pt"))
        if pictures is not None:
            p = pictures
            common.round_pictures(p["task"], p["reward"], self.log, p["base"], p["final"],
                                  p["middle"], p["name"], rnd, p.get("nrow") or 8)

    def load_pool(self, saved):
        """The accepted samples of the rounds so far, named by the resumed checkpoint."""
        return common.load_pool(self.path(saved["pool"]))

    def finish(self, **summary):
        """OUT/summary.json (strict JSON) and the closing line."""
        summary = self.log.summary(**summary, checkpoint=self.ckpt_path)
        common.print_done(summary, self.out)
        return summary

    # ---- sharded sampling: batch k draws its noise from its own generator (seed, k), so
    # sharding the batches over torchrun's ranks changes nothing
    def noise_batches(self, n, *, shape, seed, batch, y=None):
        """This rank's share of n samples in batches: yields (noise z, conditions y or None,
        generator) per batch; ``gather`` puts the ranks' results back in batch order."""
        starts = range(0, n, batch)
        lo, hi = self.dist.shard(len(starts))
        for i in common.progress(starts[lo:hi], "sample"):
            gen = common.generator(seed * 100_003 + i // batch, self.device)
            b = min(batch, n - i)
            z = torch.randn((b, *shape), generator=gen, device=self.device)
            yield z, (y[i : i + b] if y is not None else None), gen

    def gather(self, parts, *, shape):
        """Every rank's list of batches concatenated in batch order."""
        empty = torch.zeros((0, *shape), device=self.device)
        return self.dist.gather(torch.cat([empty, *parts]))
