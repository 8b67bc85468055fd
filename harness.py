"""The run harness: what every script does around its algorithm, behind a few keyword-only calls.

A script declares its flags as one ``@dataclass`` whose fields are made with ``arg(default, doc)``
and gets them with ``parse``. Its loop then talks to one ``Run`` in five places:

    run = Run(args, script="graft", out=default_out)      # device, torchrun, --out checked
    done, saved = run.begin(model=..., ema=..., opt=..., settings=...)  # resume + print + log
    with run.stop_signals():                              # SIGTERM / Ctrl-C end a step cleanly
        ... run.step(loss, step=..., steps=..., model=...)  # loss window, divergence, log, stop
        ... run.end_round(rnd, ...)                       # pool, checkpoint, metrics, pictures
    run.finish(**summary)                                 # summary.json and the closing line

A script that checkpoints by steps (pretrain.py) calls ``run.resume`` before ``begin`` (to read
its first batch or ``dry_run`` before --out is touched), ``run.save`` every so many steps, and
``run.step(..., stop=False)`` then ``run.save`` and ``run.halt`` on a stop signal.

Nothing here is an algorithm of the paper, and nothing calls back into a script.
"""

import argparse
import dataclasses
import math
import os
import signal
import time

import torch

import common
from models import drop_conditions, save_checkpoint
from rewards.acceptance import RULES
from tasks import TASKS, UsageError

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
    log_every: int = arg(100, "optimiser steps per logged (and divergence-checked) loss; each "
                         "log is one host sync", check=common.pos_int, may_change=True)


# fmt: off
@dataclasses.dataclass
class FinetuneArgs(RunArgs):
    """The flags of the fine-tuning scripts graft.py and pgraft.py, one vocabulary for both."""

    base: str = arg(None, "reference DDPM: a checkpoint, or diffusers:PATH_OR_REPO_ID (None: "
                    "runs/pretrain/<task>-ddpm/ckpt.pt, pretrained first when absent)")
    reward: str = arg(None, "reward (None: the task's own): linear[:DEG], digit[:K], pair, "
                      "attributes, <celeba attribute>[+...], jpeg, jpeg-incompressibility")
    classifier: str = arg(None, "reward classifier checkpoint (None: "
                          "runs/rewards/<task>-classifier.pt, trained first when absent)")
    accept: str = arg("topk", "acceptance rule: top-K of M (RAFT), best-of-N (N = M), reward >= "
                      "tau, or rejection sampling w.p. exp((r - r_max) / alpha)", choices=RULES)
    M: int = arg(8, "samples drawn per condition per round", check=common.pos_int)
    K: int = arg(2, "top-K keeps the K best of each condition's M", check=common.pos_int)
    tau: float = arg(None, "reward threshold of --accept threshold", check=common.finite_float)
    alpha: float = arg(1.0, "temperature of rs; r_hat = alpha log P(accept | x) for every rule",
                       check=common.pos_float)
    prompts: int = arg(1000, "conditions per round (MNIST labels cycle 0..9; toy2d has none)",
                       check=common.pos_int)
    rounds: int = arg(1, "sample -> accept -> fine-tune rounds", check=common.pos_int,
                      may_change=True)
    sample_from: str = arg("ref", "ref: sample the frozen reference every round, the pool grows; "
                           "current: sample the model so far, tilts compound",
                           choices=["ref", "current"])
    sampler: str = arg("ddpm", "ddpm: ancestral (eta = 1); ddim: generalised DDIM with --eta",
                       choices=["ddpm", "ddim"])
    eta: float = arg(1.0, "DDIM eta of --sampler ddim (0: deterministic; ddpm is eta = 1)",
                     check=common.nonneg_float)
    sample_steps: int = arg(200, "sampler steps over the N-step chain", check=common.pos_int)
    cfg_scale: float = arg(0.0, "guidance w: eps_u + (1 + w)(eps_c - eps_u); needs --cond-drop",
                           check=common.nonneg_float)
    train_steps: int = arg(1000, "fine-tuning optimiser steps per round", check=common.pos_int)
    batch_size: int = arg(512, "fine-tuning minibatch", check=common.pos_int)
    lr: float = arg(1e-3, "peak AdamW learning rate", check=common.pos_float, may_change=True)
    warmup: int = arg(50, "linear warm-up steps per round (at most half the round)",
                      check=common.nonneg_int)
    ema_decay: float = arg(0.99, "EMA decay, warmed up as min(d, (1+s)/(10+s))",
                           check=common.unit_float)
    grad_clip: float = arg(1.0, "clip the gradient norm (0: off)", check=common.nonneg_float)
    eval_samples: int = arg(5000, "fresh samples per evaluation", check=common.pos_int,
                            may_change=True)
    fid_samples: int = arg(-1, "FID samples on image tasks (-1: 5000 on CUDA, 0 on CPU)",
                           check=common.fid_int, may_change=True)
    sample_batch: int = arg(4000, "samples per sampler call (memory)", check=common.pos_int)


# Per-task overrides of FinetuneArgs' defaults. Samples per round = prompts x M.
_DIGITS = dict(prompts=200, rounds=2, sample_steps=100, train_steps=600, batch_size=128, lr=1e-4,
             ema_decay=0.995, eval_samples=1000, sample_batch=800)
_IMAGE = dict(prompts=64, rounds=2, sample_steps=100, train_steps=1000, batch_size=16, lr=2e-5,
             ema_decay=0.999, eval_samples=256, sample_batch=32)
FINETUNE_DEFAULTS = {
    "toy2d": dict(prompts=1000, rounds=1, sample_steps=200, train_steps=1000, batch_size=512,
                  lr=1e-3, ema_decay=0.99, eval_samples=5000, sample_batch=4000),
    "mnist": _DIGITS, "mnist16": _DIGITS, "mnist-pairs": _DIGITS, "mnist-pairs16": _DIGITS,
    "celeba": dict(prompts=256, rounds=4, sample_steps=100, train_steps=2000, batch_size=64,
                   lr=5e-5, ema_decay=0.999, eval_samples=1000, sample_batch=256),
    "celebahq": _IMAGE, "church": _IMAGE,
}
# fmt: on


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


def check_flags(args, script, device, main):
    """The checks every script's flags get before any work (no silent fallback, no size beyond
    the device's memory); returns the run's kind (task and model) that OUT/run.json records."""
    task = TASKS[args.task]
    if args.data_dir is not None and not os.path.isdir(args.data_dir):
        refuse(f"--data-dir {args.data_dir!r} is not a folder; pass the folder that holds the "
               f"{task.name} data, or leave --data-dir out for the task's default")
    if getattr(args, "classifier", None) and task.kind == "points":
        refuse(f"--classifier: the {task.name} rewards are analytic and use no classifier; "
               f"drop --classifier")
    for flag in ("bf16", "compile"):
        if getattr(args, flag, False) and device.type != "cuda" and main:
            print(f"note: --{flag} does nothing on {device} (CUDA only); running without it")
    if isinstance(args, FinetuneArgs) and args.warmup > args.train_steps // 2 and main:
        print(f"note: --warmup {args.warmup} is capped at half of --train-steps: "
              f"{args.train_steps // 2} warm-up steps per round")
    per = math.prod(task.shape())
    counts = {f"--{k.replace('_', '-')}": (getattr(args, k), c) for k, c in
              (("batch_size", common.BATCH_COPIES), ("sample_batch", common.BATCH_COPIES),
               ("eval_samples", common.SAMPLE_COPIES), ("fid_samples", common.SAMPLE_COPIES),
               ("invert_samples", common.SAMPLE_COPIES))
              if isinstance(getattr(args, k, None), int)}
    if isinstance(getattr(args, "M", None), int) and hasattr(args, "prompts"):
        counts["--prompts x --M"] = (args.prompts * args.M, common.SAMPLE_COPIES)
    # pgraft.py's diagnostic holds every state's continuations at once
    if isinstance(getattr(args, "lemma_states", None), int):
        counts["--lemma-states x --lemma-continuations"] = (
            args.lemma_states * args.lemma_continuations, common.SAMPLE_COPIES)
    common.check_sizes(counts, per, device)
    return " ".join(str(getattr(args, k)) for k in ("task", "model") if hasattr(args, k))


# ---------------------------------------------------------------- the run ----
class Run:
    """One run of a script: its device and torchrun rank, its --out folder, resume, stop signals,
    divergence checks, metrics.jsonl, checkpoints and summary. Only rank 0 writes or prints."""

    def __init__(self, args, *, script, out, batch_size=None, unit="round", refuse_held=True,
                 ckpt="ckpt.pt"):
        """``refuse_held``: refuse an --out that holds a run (without --resume) here; False leaves
        that to ``begin``, after the script's own input checks, so a bad flag is named first.
        ``ckpt``: the checkpoint's path inside --out (with summary.json, what marks a run)."""
        self.args, self.script, self.unit = args, script, unit
        # SIGTERM outside a training loop (diagnostic, evaluation, inversion): a stopped: line,
        # 143; ``finish`` puts back the handler found here
        self.sigterm_found = signal.getsignal(signal.SIGTERM)
        common.stop_outside_loops()
        common.PHASE["name"] = f"the checks of {script}.py"
        self.dist = common.Dist(common.pick_device(args.device))
        self.device, self.main = self.dist.device, self.dist.main
        if batch_size is not None:
            self.dist.check_batch(batch_size)
        args.out = args.out if args.out is not None else out
        if not args.out:
            refuse("--out is empty; pass a folder path")
        common.check_out(args.out)
        self.run_files = ("summary.json", ckpt)
        self.kind = check_flags(args, script, self.device, self.main)
        self.owner_checked = False
        if refuse_held:
            self.check_owner()
            common.check_fresh(args.out, args.resume, self.run_files)
        self.out, self.ckpt_path = args.out, os.path.join(args.out, ckpt)
        # the checkpoint check_resume kept for restore
        self.ckpt = None
        # this rank's rows of each global training batch under torchrun (None: all of them)
        self.rows = self.dist.rows(batch_size) if batch_size and self.dist.world > 1 else None
        self.log, self.window, self.loss, self.stop = None, [], math.nan, None
        # PPO's (approx_kl, clipfrac) of the steps since the last logged one (ddpo.py); the FID
        # that ``evaluate`` makes (its Inception network loads once)
        self.ppo_window, self.fid = [], None
        self.resumed, self.stopping = None, False
        # the sampler's ``progress`` over the steps of the batch noise_batches last yielded
        self.batch_progress = None
        # what this rank did, for summary.json's "torchrun" (``shares``): the samples it drew as
        # [noise seed, first, end) per run of batches, and the rows the network being trained ran
        # forward on with gradients (``watch``): their count and the float64 sum of their squared
        # inputs (on the device, read once at the end)
        self.sampled, self.trained_rows, self.trained_sq, self.watched = [], 0, None, None
        self.shared = None

    def path(self, name):
        return os.path.join(self.out, name)

    def check_owner(self):
        """Refuse an --out that another script (or kind of run) made; with refuse_held=False this
        waits until the script's own input checks are done (``resume`` / ``check_resume``)."""
        if not self.owner_checked:
            common.check_owner(self.args.out, self.script, self.kind,
                               [f.name for f in dataclasses.fields(self.args)],
                               ("metrics.jsonl",) + self.run_files)
            self.owner_checked = True

    def resume(self, *, model=None, ema=None, opt=None):
        """``begin``'s first half, for a script that needs the restored state before anything is
        written (a dry run, reading the first batch): under --resume, check OUT/ckpt.pt against
        the flags and restore it, with the unlogged losses ``save`` kept. Returns (done, saved)."""
        self.watch(model)
        # restoring another script's checkpoint is what must not happen; a fresh run is checked
        # in begin, after the script has read its data
        if self.args.resume:
            self.check_owner()
        ckpt = common.load_resume(self.ckpt_path, self.args, may_change(type(self.args)))
        done, saved = 0, {}
        if ckpt is not None:
            done, saved = common.restore(ckpt, model, ema, opt)
            if isinstance(saved.get("pool"), str):
                # the accepted samples the checkpoint names, read before anything is written
                saved = dict(saved, pool=self.load_pool(saved))
            # a step is saved at its end, a round after it
            print(f"resumed from {self.ckpt_path} {'at' if self.unit == 'step' else 'after'} "
                  f"{self.unit} {done}")
            self.window = [v.to(self.device) for v in saved.get("loss_window", [])]
            if saved.get("last_loss") is not None:
                self.loss = saved["last_loss"]
        self.resumed = (done, saved, ckpt is not None)
        return done, saved

    def begin(self, *, model=None, ema=None, opt=None, settings, title=None):
        """Resume (checked against the flags, then weights, EMA, optimiser and RNG restored), write
        OUT/args.json and print the run's derived settings. Returns (done, saved): the rounds (or
        steps) finished and the ``extra`` dict the last checkpoint saved ({} when fresh)."""
        self.check_owner()
        if self.resumed is None:
            self.resume(model=model, ema=ema, opt=opt)
        done, saved, resumed = self.resumed
        # one writer per folder (rank 0 locks; every rank stops when it cannot)
        why = None
        if self.main:
            try:
                common.lock_folder(self.out)
            except UsageError as e:
                why = str(e)
        if self.dist.any(why is not None):
            refuse(why or "rank 0 could not lock --out")
        common.PHASE["name"] = (f"{self.script}.py outside a training step (a diagnostic, "
                                f"sampling, evaluation)")
        self.log = common.RunLog(self.out, self.args, write=self.main, run_files=self.run_files,
                                 resumed_at=(self.unit, done) if resumed else None)
        if self.main:
            common.atomic_json(self.path(common.OWNER_FILE), dict(script=self.script,
                                                                  kind=self.kind))
        common.print_derived(title or f"{self.script} on {self.args.task}", device=self.device,
                             **settings, out=self.out)
        return done, saved

    def check_resume(self):
        """Under --resume, the checkpoint checked against the flags and kept for ``restore`` (None:
        a fresh run, or none saved yet); nothing is restored or written. For a script whose
        training comes after another resumable phase: ``begin`` then keeps the log's rows up to the
        checkpoint whenever --resume is given (the earlier phase's rows too), and ``restore`` puts
        the state back where training starts."""
        if self.args.resume:
            self.check_owner()
        self.ckpt = common.load_resume(self.ckpt_path, self.args, may_change(type(self.args)))
        saved = (self.ckpt or {}).get("extra") or {}
        self.resumed = ((self.ckpt or {}).get("step", 0), saved, self.args.resume)
        return self.ckpt

    def restore(self, *, model, ema, opt):
        """The checkpoint ``check_resume`` kept, put back: weights, EMA, optimiser, RNG and the
        losses not yet logged. Returns (done, saved) ((0, {}) when there is none)."""
        self.watch(model)
        if self.ckpt is None:
            return 0, {}
        done, saved = common.restore(self.ckpt, model, ema, opt)
        self.window = [v.to(self.device) for v in saved.get("loss_window", [])]
        if saved.get("last_loss") is not None:
            self.loss = saved["last_loss"]
        return done, saved

    def dry_run(self, *, model, process, batches, gen, cond_drop, steps, done, title, settings,
                then):
        """--dry-run: time two training steps (after a warm-up step, with a throwaway AdamW) and
        print the run's size and estimated time on this device; nothing is written. ``cond_drop``:
        the condition dropout (None: unconditional); ``then``: what follows the training."""
        opt = torch.optim.AdamW(model.parameters(), lr=self.args.lr)
        model.train()
        times = []
        # the first step warms up; the next two are timed
        for _ in range(3):
            t0 = time.time()
            x, y = next(batches)
            loss = process.loss(model, x, None if cond_drop is None else
                                drop_conditions(y, cond_drop, gen), gen)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            if self.device.type == "cuda":
                torch.cuda.synchronize()
            times.append(time.time() - t0)
        per_step, left = sum(times[1:]) / 2, steps - done
        common.print_derived(
            f"plan: {title} (dry run, nothing written)", device=self.device,
            parameters=common.n_params(model), **settings,
            train_steps=f"{left} of {steps} left, batch {self.args.batch_size}",
            seconds_per_step=f"{per_step:.3f} (timed here)",
            estimated_time=f"{per_step * left / 60:.1f} min for training, plus {then}",
            out=self.out)
        return dict(dry_run=True, seconds_per_step=per_step, estimated_minutes=per_step * left / 60,
                    train_steps=steps)

    # ---- what each rank did: summary.json's "torchrun" (a user checks that P ranks split the work)
    def check_memory(self, model):
        """Refuse batch sizes whose attention cannot fit this machine
        (common.check_attention_memory) for ``model``, the network being trained, on this rank's
        rows: --batch-size with gradients, the sampling batch (--sample-batch, or pretrain's
        evaluation) without."""
        a, world = self.args, self.dist.world
        counts = {}
        if isinstance(getattr(a, "batch_size", None), int):
            counts["--batch-size"] = (-(-a.batch_size // world), True)
        if isinstance(getattr(a, "sample_batch", None), int):
            counts["--sample-batch"] = (a.sample_batch, False)
        elif isinstance(getattr(a, "eval_samples", None), int):
            counts["--eval-samples"] = (min(a.eval_samples, common.EVAL_BATCH), False)
        cfg = getattr(model, "config", None)
        size = cfg.get("image_size") if isinstance(cfg, dict) else None
        common.check_attention_memory(model, TASKS[a.task].shape(size), counts, self.device)

    def watch(self, model):
        """Count the rows that ``model``, the network being trained (``resume`` and ``restore``
        call this), runs forward on with gradients on: this rank's share of the training, whatever
        splits the batch (Run.rows, a script's own split). Its attention's memory is checked first
        (``check_memory``)."""
        if model is None or self.watched is model:
            return
        self.check_memory(model)
        self.watched = model
        model.register_forward_pre_hook(self._count_rows, with_kwargs=True)

    @torch.compiler.disable
    def _count_rows(self, module, args, kwargs):
        if not torch.is_grad_enabled():
            return
        x = (args[0] if args else kwargs["x"]).detach()
        self.trained_rows += x.shape[0]
        sq = x.square().sum(dtype=torch.float64)
        self.trained_sq = sq if self.trained_sq is None else self.trained_sq + sq

    def shares(self):
        """Every rank's share of the work since this process started (a collective: every rank
        calls it; ``finish`` does): dict(world, ranks=[per rank: rank, sampled (samples drawn),
        sampled_ranges ([noise seed, first, end) per run of batches), computed_ranges ([what,
        first, end) per ChunkCache chunk computed here), trained_rows (rows the trained network ran
        forward on), trained_sq (float64 sum of those inputs squared)]). With the work split and
        none repeated, the ranks' ranges are disjoint and their union, rows and sums are one
        process's. Gathered once: a script whose rank 0 goes on alone (pretrain.py's evaluation)
        calls it while every rank is still there."""
        if self.shared is not None:
            return self.shared
        mine = dict(rank=self.dist.rank, sampled=sum(hi - lo for _, lo, hi in self.sampled),
                    sampled_ranges=self.sampled, computed_ranges=self.dist.computed,
                    trained_rows=self.trained_rows,
                    trained_sq=0.0 if self.trained_sq is None else self.trained_sq.item())
        self.shared = dict(world=self.dist.world, ranks=self.dist.gather_objects(mine))
        return self.shared

    def stop_signals(self):
        """The scope in which SIGTERM / Ctrl-C only set a flag that ``step`` acts on."""
        self.stop = common.StopSignals()
        return self.stop

    def step(self, loss, *, step, steps, model, lr, round=None, resume_hint=None, stop=True,
             approx_kl=None, clipfrac=None, phase=None):
        """After an optimiser step: keep the loss for the logged window; every --log-every steps and
        at the last one check it (divergence stops the run, keeping the last good checkpoint) and
        log it; at the last step check the weights; on a stop signal stop (``stop=False``: only set
        ``stopping``, for a script that saves and then calls ``halt``). Returns the last logged
        mean loss. PPO (ddpo.py) passes the step's ``approx_kl`` of the policy from the sampling
        one and its ``clipfrac``: logged beside the loss as window means (approx_kl over the ranks
        too, and checked like the loss by common.check_policy; clipfrac this rank's). ``phase``
        names the training on its logged rows (a script with several phases)."""
        self.window.append(loss.detach())
        if approx_kl is not None:
            self.ppo_window.append((approx_kl.detach(), clipfrac.detach()))
        at = {} if round is None else {"round": round}
        if step % self.args.log_every == 0 or step == steps:
            # a KL term in the loss (ddpo.py's --kl-coef) is named as the likelier cause
            kl = getattr(self.args, "kl_coef", 0) or 0
            flag = f"--kl-coef {kl:g} or --lr" if kl > 0 else "--lr"
            self.loss = common.check_loss(self.window, step, self.args.lr, flag=flag,
                                          dist=self.dist)
            ppo = {}
            if self.ppo_window:
                kls, clips = zip(*self.ppo_window)
                ppo = dict(approx_kl=common.check_policy(kls, step, self.args.lr, dist=self.dist),
                           clipfrac=torch.stack(clips).mean().item())
            self.window, self.ppo_window = [], []
            head = {} if phase is None else {"phase": phase}
            self.log.log(**head, **at, step=step, loss=self.loss, lr=lr, **ppo)
        if step == steps:
            # never evaluate or checkpoint weights that hold NaN
            common.check_weights(model, f"{steps}" + (f" of round {round}" if at else ""),
                                 self.args.lr)
        if self.stop is not None and self.dist.any(self.stop.requested):
            self.stopping = True
            if not stop:
                return self.loss
            self.stop.requested = self.stop.requested or "SIGTERM"
            where = f"in round {round} at fine-tuning step {step}" if at else f"at step {step}"
            self.stop.stop(where, resume_hint or "rerun the same command with --resume: it "
                           f"continues after round {(round or 1) - 1}")
        return self.loss

    def halt(self, step, *, resume_hint, where=None):
        """Exit with 128 + the signal's number once ``step(..., stop=False)`` saw a stop signal
        (on any rank) and the script saved what it keeps; ``where`` (None: "at <unit> <step>")
        says where in the message."""
        self.stop.requested = self.stop.requested or "SIGTERM"
        self.stop.stop(where or f"at {self.unit} {step}", resume_hint)

    def save(self, step, *, model, process, ema, opt, extra):
        """OUT/ckpt.pt at ``step`` (rank 0 writes): weights, EMA, optimiser, RNG, ``extra`` and the
        losses not yet logged (so a resume off a logging boundary logs the same means). Weights
        that hold NaN are refused first, keeping the last good checkpoint."""
        common.check_weights(model, step, self.args.lr)
        if self.main:
            window = torch.stack(self.window).cpu() if self.window else torch.zeros(0)
            last = self.loss if math.isfinite(self.loss) else None
            with common.writing(self.ckpt_path):
                save_checkpoint(self.ckpt_path, model, process, ema, opt, step, self.args,
                                extra=dict(extra, last_loss=last, loss_window=window))

    def end_round(self, rnd, *, model, process, ema, opt, extra, row, pool=None, pictures=None):
        """A round's end: log ``row``, save the pool of accepted samples and then the checkpoint
        that names it (a kill between leaves the old pair), drop the previous pool, and draw the
        round's pictures: ``pictures`` = dict(task, reward, base, final, middle=(label, points),
        name, nrow)."""
        self.log.log(round=rnd, **{k: v for k, v in row.items() if not isinstance(v, list)})
        if self.main:
            if pool is not None:
                common.atomic_save(pool, self.path(f"pool_round{rnd}.pt"))
                extra = dict(extra, pool=f"pool_round{rnd}.pt")
            with common.writing(self.ckpt_path):
                save_checkpoint(self.ckpt_path, model, process, ema, opt, rnd, self.args,
                                extra=extra)
            if pool is not None and os.path.exists(self.path(f"pool_round{rnd - 1}.pt")):
                os.remove(self.path(f"pool_round{rnd - 1}.pt"))
            if pictures is not None:
                p = pictures
                common.round_pictures(p["task"], p["reward"], self.log, p["base"], p["final"],
                                      p["middle"], p["name"], rnd, p.get("nrow") or 8)
        # a signal during the round's evaluation stops here, the round saved, not after the next
        # round's sampling
        if self.stop is not None and self.dist.any(self.stop.requested):
            self.stop.requested = self.stop.requested or "SIGTERM"
            self.stop.stop(f"after round {rnd}", f"round {rnd} is saved: rerun the same command "
                           f"with --resume to continue after it")

    def load_pool(self, saved):
        """The accepted samples of the rounds so far, named by the resumed checkpoint."""
        return common.load_pool(self.path(saved["pool"]))

    def finish(self, *, shown=None, **summary):
        """OUT/summary.json (strict JSON) and the closing line, which shows the ``shown`` keys
        (None: common.DONE_KEYS), and ``torchrun``: what each rank did (``shares``; every rank
        calls ``finish``). ``checkpoint`` is added last unless the summary places it."""
        summary = self.log.summary(**dict(summary, torchrun=self.shares(),
                                          checkpoint=self.ckpt_path))
        common.print_done(summary, self.out, keys=shown)
        # a script called as a function (tests, experiments) leaves SIGTERM as it found it
        if signal.getsignal(signal.SIGTERM) is common._stop_now:
            signal.signal(signal.SIGTERM, self.sigterm_found or signal.SIG_DFL)
        return summary

    # ---- sharded sampling: batch k draws its noise from its own generator (seed, k), so
    # sharding the batches over torchrun's ranks changes nothing
    def noise_batches(self, n, *, shape, seed, batch, y=None):
        """This rank's share of n samples in batches: yields (noise z, conditions y or None,
        generator) per batch; ``gather`` puts the ranks' results back in batch order."""
        starts = range(0, n, batch)
        lo, hi = self.dist.shard(len(starts))
        for i in common.progress(starts[lo:hi], "sample"):
            # the sampler's steps of this batch: pass progress=run.batch_progress to the sampler
            self.batch_progress = common.steps_progress(
                f"sampler steps of sample batch {i // batch + 1}/{len(starts)}")
            gen = common.generator(seed * 100_003 + i // batch, self.device)
            b = min(batch, n - i)
            # this rank's samples: one [seed, first, end) per run of consecutive batches
            last = self.sampled[-1] if self.sampled else None
            if last is not None and last[0] == seed and last[2] == i:
                last[2] = i + b
            else:
                self.sampled.append([seed, i, i + b])
            z = torch.randn((b, *shape), generator=gen, device=self.device)
            yield z, (y[i : i + b] if y is not None else None), gen

    def gather(self, parts, *, shape, dtype=torch.float32):
        """Every rank's list of batches concatenated in batch order."""
        empty = torch.zeros((0, *shape), dtype=dtype, device=self.device)
        return self.dist.gather(torch.cat([empty, *parts]))

    # ---- evaluation: the same conditions and noise (seed --seed + EVAL_SEED) for the base and
    # every round, and for every script that evaluates this way
    EVAL_SEED = 999_983

    def evaluate(self, net, tag, *, process, task, reward, eta, conditional, data=None, fid=None,
                 fid_samples=0, target=None):
        """Reward (and accuracy, FID, toy2d's mode weights and TV to ``target``) of
        max(--eval-samples, fid_samples) fresh samples of ``net`` (a network, or DDPM.sample's
        segments), drawn with --sample-steps at ``eta`` and --cfg-scale in batches of
        --sample-batch; printed. FID: ``fid``, else one made here when fid_samples > 0. Returns
        (numbers, samples)."""
        from eval.metrics import FID, evaluate_samples

        if fid is None and fid_samples:
            if self.fid is None:
                self.fid = FID(task, fid_samples, self.device, self.args.data_dir)
            fid = self.fid
        a, image = self.args, task.kind == "image"
        common.PHASE["name"] = f"the {tag} evaluation of {self.script}.py"
        n, seed = max(a.eval_samples, fid_samples), a.seed + self.EVAL_SEED
        y = (task.sample_conditions(n, common.generator(seed, self.device), self.device, data)
             if conditional else None)
        xs = []
        for z, yb, gen in self.noise_batches(n, shape=task.shape(), seed=seed, batch=a.sample_batch,
                                             y=y):
            x, _ = process.sample(net, z, y=yb, generator=gen, eta=eta, num_steps=a.sample_steps,
                                  clip=image, cfg_scale=a.cfg_scale, progress=self.batch_progress)
            xs.append(x.clamp(-1, 1) if image else x)
        x = self.gather(xs, shape=task.shape())
        ev = evaluate_samples(x, y, reward, task, a.eval_samples, fid, target, a.sample_batch)
        common.print_eval(tag, ev)
        return ev, x


# ---------------------------------------------------------------- results kept in chunks ----
def fingerprint(model):
    """A number that changes with a model's weights (it keys what was computed with them)."""
    return f"{sum(p.detach().cpu().double().sum().item() for p in model.parameters()):.10e}"


class ChunkCache:
    """Results computed chunk by chunk (rows [c * size, (c + 1) * size) of n) and kept as
    FOLDER/chunk_00000.pt, ... beside FOLDER/meta.json, the settings that made them. A rerun, with
    or without --resume, reuses every readable chunk and recomputes absent or damaged ones; a
    folder made with other settings is refused. Under torchrun rank r computes the chunks c with
    c % P == r and ``gather`` reads the other ranks' from disk.

        cache = ChunkCache(folder, meta=..., n=..., size=..., keys=..., dist=run.dist, what=...)
        for c, rows in cache.todo(stop=...):   # only the chunks this rank must compute
            cache.save(c, compute(rows))
        tensors = cache.gather()
    """

    def __init__(self, folder, *, meta, n, size, keys, dist, what="results"):
        """Refuses a folder made with other ``meta`` now, before anything is written. ``keys``: a
        chunk's tensors, one row per item each; ``what`` names the results in messages."""
        self.folder, self.meta, self.n, self.size = folder, meta, n, size
        self.keys, self.dist, self.what = keys, dist, what
        self.count, self.computed, self.parts, self.fresh = math.ceil(n / size), 0, [], None
        path = os.path.join(folder, "meta.json")
        if os.path.isfile(path):
            # an edited or torn meta.json is one error: line, not a traceback
            old = common.read_json(path, f"the settings of the {what}")
            if not isinstance(old, dict):
                refuse(f"{path} is not a JSON object; delete {folder} to recompute the {what}")
            diff = ", ".join(f"{k}: {old.get(k)} -> {v}" for k, v in meta.items()
                             if old.get(k) != v)
            if diff:
                refuse(f"{folder} holds {what} made with other settings ({diff}); use another "
                       f"--out or delete that folder")

    def path(self, c):
        return os.path.join(self.folder, f"chunk_{c:05d}.pt")

    def load(self, c):
        """Chunk c, or None when it is absent or unreadable (then it is recomputed)."""
        path = self.path(c)
        if not os.path.isfile(path):
            return None
        try:
            chunk = torch.load(path, map_location="cpu", weights_only=True)
            if not all(len(chunk[k]) == min(self.size, self.n - c * self.size) for k in self.keys):
                raise ValueError("wrong length")
            return chunk
        except Exception as e:  # noqa: BLE001 - a damaged chunk is simply recomputed
            print(f"   {path} is unreadable ({type(e).__name__}); recomputing it")
            return None

    def todo(self, *, stop=None, stop_after=0):
        """Yields (c, rows) for each chunk this rank must compute, in order; hand each result to
        ``save``. Between chunks a stop signal (``stop``, a StopSignals) ends the run keeping the
        chunks so far, and so do ``stop_after`` > 0 newly computed chunks (exit code 3: a debugging
        aid to test resuming)."""
        os.makedirs(self.folder, exist_ok=True)
        meta = os.path.join(self.folder, "meta.json")
        if self.dist.main and not os.path.isfile(meta):
            common.atomic_json(meta, self.meta)
        self.parts = []
        for c in range(self.count):
            chunk = self.load(c)
            if chunk is None and c % self.dist.world != self.dist.rank:
                # another rank's chunk: read in gather
                self.parts.append(None)
                continue
            if chunk is None:
                self.fresh = None
                yield c, slice(c * self.size, (c + 1) * self.size)
                if self.fresh is None:
                    raise RuntimeError(f"chunk {c} was not handed to ChunkCache.save")
                chunk = self.fresh
            self.parts.append(chunk)
            if c + 1 < self.count and stop_after and self.computed >= stop_after:
                print(f"stopping after {self.computed} new chunks (--stop-after-chunks); rerun to "
                      f"resume")
                raise SystemExit(3)
            if c + 1 < self.count and stop is not None and stop.requested:
                stop.stop(f"after {self.what} chunk {c + 1}/{self.count}",
                          "the chunks so far are kept; rerun the same command to continue")

    def save(self, c, chunk):
        """Chunk c on disk: a crash leaves either no chunk or a whole one."""
        common.atomic_save(chunk, self.path(c))
        self.computed += 1
        self.dist.computed.append([self.what, c * self.size, min(self.n, (c + 1) * self.size)])
        self.fresh = chunk

    def gather(self):
        """Every chunk's tensors concatenated in order (the other ranks' read from disk once every
        rank has written its own)."""
        self.dist.barrier()
        parts = [p if p is not None else self.load(c) for c, p in enumerate(self.parts)]
        return {k: torch.cat([p[k] for p in parts]) for k in self.keys}
