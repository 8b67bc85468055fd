"""Benchmark: base vs GRAFT vs P-GRAFT vs DDPO, each tuned alike, over seeds on several bases.

    python -m experiments.benchmark --task mnist-weak --plan   # sizes, estimated time; no files
    python -m experiments.benchmark --task mnist-weak          # cpu preset: <= 45 min, 2 cores
    python -m experiments.benchmark --task mnist-tilt --tilt-class 3   # a known target
    python -m experiments.benchmark --task mnist-weak --preset gpu --device cuda
    python -m experiments.benchmark --task mnist-weak --preset smoke   # the tests' sizes

Tasks (--task): mnist-weak (class-conditional 16 px digits from a briefly pretrained base, reward
log p(requested digit | x), top-K of M), mnist-tilt (an unconditional 16 px MNIST prior, reward
log p(c | x) for the class c of --tilt-class, rejection sampling at alpha = 1 from the frozen
base every round: GRAFT's target is p_ref(x) p(c | x) / Z, which the benchmark samples exactly by
rejection from the base, eval/tilt.py), mnist-pairs (two digits side by side, 100 ordered pairs)
and celeba (an unconditional base towards eyeglasses+smiling+not-male; a GPU task).

What one command does, in order (every flag is checked first; bad input is one `error:` line,
exit 2, nothing written):
 1. the cache (--cache, keyed by settings): the reward classifier (first half of the training
    split, seed 0), a FeatureNet of another architecture for FID and diversity (second half, seed
    1; eval/feature_fid.py), --bases independently pretrained bases (pretrain seeds 0, 1, ...),
    on mnist-tilt each base's exact target set, and the real-data feature statistics;
 2. per base and N_I: N_I, abar_{N_I}, the random continuation steps and the one-round ceiling
    (eval/lemma43.one_round_ceiling);
 3. tuning on --tune-seed (base 0, not reported): GRAFT and P-GRAFT over learning rate x steps
    per round, DDPO over learning rate x clip range (its inner epochs, batch and sampler steps
    stated), each config one run to the full budget, chosen on the task's criterion;
 4. every method with its chosen config on seeds 0..S-1 (seed s on base s mod B), run to 1/4, 1/2
    and all of the rounds (each a --resume of the last), evaluated after each by the benchmark on
    fresh samples with the same noise for every method of a seed: the bounded reward p(y | x),
    accuracy (on mnist-tilt: the fraction of class c), the mean log-probability, FID and diversity
    in FeatureNet's features (on mnist-tilt FID to the exact target set and to real class-c
    images), the Inception FID on CUDA;
 5. OUT/results.json (per-seed values, 95% t-intervals, paired differences from GRAFT at each
    budget, the half-budget question, tuning, ceilings, loss curves, times), results.md,
    reward_vs_samples.png, tradeoff.png and loss_curves.png.

GRAFT and P-GRAFT train with warm-up 10% of the steps per round and log their loss every
LOSS_LOG_EVERY steps (--log-every; the loss table says how much it still fell in each round's last
quarter).
Default OUT: runs/benchmark/<task>-<preset>; --resume continues a benchmark where it stopped.
"""

import argparse
import copy
import hashlib
import itertools
import json
import math
import os
import platform
import signal
import sys
import time

import torch

import common
import ddpo
import graft
import harness
import pgraft
import pretrain
import rewards
from eval import classifier_fid, feature_fid, lemma43, tilt
from experiments import benchmark_report as report
from models import model_from_checkpoint
from rewards.acceptance import AcceptRule, condition_groups
from rewards.classifier import train_classifier
from tasks import UsageError, get_task

BUDGETS = (0.25, 0.5, 1.0)  # fractions of the sample budget at which every method is evaluated
LOSS_LOG_EVERY = 10  # fine-tuning steps per logged loss in the benchmark's runs
MAX_SEEDS = 1000  # reported seeds at most (each a run of every method)
BASE_EVAL_SAMPLES = 16  # pretrain.py's own sample grid of a cached base
TARGET_DRAWS = 60  # draws per wanted exact-target sample at most (rejection from the base)
METHODS = ("graft", "pgraft", "ddpo")
SCRIPTS = {"graft": graft, "pgraft": pgraft, "ddpo": ddpo}

# ---------------------------------------------------------------- presets ----
# "task": the tasks.py task; "conditional": whether the base takes the labels; "reward": None is
# the task's own ({c}: --tilt-class); "tune": the grid per method family and the criterion.
TASKS = {
    "mnist-weak": dict(task="mnist16", conditional=True, reward=None, accept="topk", alpha=1.0,
                       sample_from="current", criterion=("prob", "max")),
    "mnist-tilt": dict(task="mnist16", conditional=False, reward="digit:{c}", accept="rs",
                       alpha=1.0, sample_from="ref", criterion=("fid_target", "min")),
    "mnist-pairs": dict(task="mnist-pairs16", conditional=True, reward=None, accept="topk",
                        alpha=1.0, sample_from="current", criterion=("prob", "max")),
    "celeba": dict(task="celeba", conditional=False, reward="eyeglasses+smiling+not-male",
                   accept="topk", alpha=1.0, sample_from="current", criterion=("prob", "max")),
}
DIGITS_CLF = dict(steps=800, batch_size=128)
DIGITS_FEAT = dict(steps=600, batch_size=128, width=32, dim=64)
SMOKE = dict(
    bases=2, seeds=2, n_i="0.5", ceiling_n_i="0.25", methods="graft,pgraft,ddpo", jobs=1,
    base=dict(preset="tiny", train_steps=3, batch_size=4, lr=1e-3, ema_decay=0.9, cond_drop=0.1),
    classifier=dict(steps=10, batch_size=16),
    features=dict(steps=10, batch_size=16, width=8, dim=8),
    run=dict(prompts=4, M=2, K=1, rounds=2, sample_steps=4, train_steps=2, batch_size=4, lr=1e-4,
             ema_decay=0.9, eval_samples=4, sample_batch=64),
    ddpo=dict(lr=1e-5, clip_range=0.2, inner_epochs=1, batch_size=8, timestep_fraction=1.0,
              ema_decay=0.9),
    tune=dict(graft=dict(lr=[1e-4, 3e-4], train_steps=[2]),
              ddpo=dict(lr=[1e-5], clip_range=[0.2])),
    final=dict(samples=24, fid_samples=0), target=dict(samples=8), n_real=60)
CPU_WEAK = dict(
    bases=2, seeds=5, n_i="abar:0.9,0.5", ceiling_n_i="abar:0.7,0.3", methods="graft,pgraft,ddpo",
    jobs=2,
    base=dict(preset="small16", train_steps=500, batch_size=32, lr=1e-3, ema_decay=0.995,
              cond_drop=0.1),
    classifier=DIGITS_CLF, features=DIGITS_FEAT,
    run=dict(prompts=20, M=8, K=2, rounds=4, sample_steps=20, train_steps=100, batch_size=32,
             lr=3e-4, ema_decay=0.9, eval_samples=20, sample_batch=400),
    ddpo=dict(lr=1e-4, clip_range=0.2, inner_epochs=1, batch_size=64, timestep_fraction=0.5,
              ema_decay=0.9),
    # three learning rates each (a 2 x 2 grid chose its edges for every method)
    tune=dict(graft=dict(lr=[1e-4, 3e-4, 1e-3], train_steps=[100, 200]),
              ddpo=dict(lr=[3e-5, 1e-4, 3e-4], clip_range=[0.1, 0.3])),
    final=dict(samples=200, fid_samples=0), target=dict(samples=200), n_real=10_000)
CPU_TILT = dict(
    CPU_WEAK,
    base=dict(CPU_WEAK["base"], cond_drop=0.0),
    run=dict(CPU_WEAK["run"], prompts=40, M=4, K=1))
GPU_WEAK = dict(
    bases=2, seeds=6, n_i="abar:0.9,0.7,0.5,0.3", ceiling_n_i="abar:0.97,0.15",
    methods="graft,pgraft,ddpo", jobs=1,
    base=CPU_WEAK["base"], classifier=DIGITS_CLF, features=DIGITS_FEAT,
    run=dict(prompts=100, M=16, K=4, rounds=4, sample_steps=50, train_steps=400, batch_size=128,
             lr=3e-4, ema_decay=0.9, eval_samples=100, sample_batch=1600),
    ddpo=dict(lr=1e-4, clip_range=0.2, inner_epochs=2, batch_size=256, timestep_fraction=1.0,
              ema_decay=0.9),
    tune=dict(graft=dict(lr=[1e-4, 3e-4, 1e-3], train_steps=[200, 400]),
              ddpo=dict(lr=[3e-5, 1e-4, 3e-4], clip_range=[0.1, 0.3])),
    final=dict(samples=2000, fid_samples=10_000), target=dict(samples=2000), n_real=10_000)
SPECS = {
    ("mnist-weak", "smoke"): SMOKE,
    ("mnist-weak", "cpu"): CPU_WEAK,
    ("mnist-weak", "gpu"): GPU_WEAK,
    ("mnist-tilt", "smoke"): dict(SMOKE, base=dict(SMOKE["base"], cond_drop=0.0)),
    ("mnist-tilt", "cpu"): CPU_TILT,
    ("mnist-tilt", "gpu"): dict(GPU_WEAK, base=CPU_TILT["base"],
                                run=dict(GPU_WEAK["run"], prompts=400, M=4, K=1)),
    ("mnist-pairs", "smoke"): SMOKE,
    ("mnist-pairs", "cpu"): dict(
        CPU_WEAK, base=dict(CPU_WEAK["base"], train_steps=2000), n_i="abar:0.9",
        ceiling_n_i="abar:0.7,0.5,0.3", run=dict(CPU_WEAK["run"], prompts=25, M=4, K=1),
        tune=dict(CPU_WEAK["tune"], graft=dict(lr=[1e-4, 3e-4, 1e-3], train_steps=[100, 150]))),
    ("mnist-pairs", "gpu"): dict(GPU_WEAK, base=dict(CPU_WEAK["base"], train_steps=2000),
                                 run=dict(GPU_WEAK["run"], prompts=200, M=8, K=2)),
    ("celeba", "smoke"): dict(SMOKE, base=dict(SMOKE["base"], cond_drop=0.0), n_real=12,
                              classifier=dict(steps=2, batch_size=4),
                              features=dict(steps=2, batch_size=4, width=8, dim=8)),
    ("celeba", "gpu"): dict(
        GPU_WEAK, n_i="abar:0.9,0.5",
        base=dict(preset="celeba64", train_steps=30000, batch_size=128, lr=2e-4, ema_decay=0.999,
                  cond_drop=0.0),
        classifier=dict(steps=6000, batch_size=128),
        features=dict(steps=6000, batch_size=128, width=32, dim=64),
        run=dict(GPU_WEAK["run"], prompts=64, M=8, K=1, train_steps=300, batch_size=64, lr=5e-5,
                 sample_batch=256),
        tune=dict(graft=dict(lr=[2e-5, 5e-5], train_steps=[300]),
                  ddpo=dict(lr=[1e-5, 3e-5], clip_range=[0.1, 0.3])), n_real=10_000),
}
# the run flags the command line may override, and their types
RUN_FLAGS = dict(prompts=common.pos_int, M=common.pos_int, K=common.pos_int,
                 rounds=common.pos_int, sample_steps=common.pos_int,
                 train_steps=common.pos_int, batch_size=common.pos_int, lr=common.pos_float,
                 ema_decay=common.unit_float, eval_samples=common.pos_int,
                 sample_batch=common.pos_int)
DDPO_FLAGS = dict(lr=common.pos_float, clip_range=common.pos_float, inner_epochs=common.pos_int,
                  batch_size=common.pos_int, timestep_fraction=common.pos_unit_float)


def number_list(cast):
    def check(text):
        vals = [cast(v) for v in text.split(",") if v.strip()]
        if not vals:
            raise argparse.ArgumentTypeError(f"expected a comma list of numbers, got {text!r}")
        return vals

    check.__name__ = f"comma list of {cast.__name__}"
    return check


def get_args(argv=None):
    p = common.Parser(__doc__.splitlines()[0])
    p.add_argument("--task", choices=list(TASKS), default="mnist-weak", help="benchmark task")
    p.add_argument("--preset", choices=["smoke", "cpu", "gpu"], default="cpu",
                   help="sizes (SPECS): smoke for the tests, cpu <= 45 min on 2 cores, gpu")
    p.add_argument("--out", default=None, help="output folder (runs/benchmark/<task>-<preset>)")
    p.add_argument("--cache", default=os.path.join("runs", "benchmark", "cache"),
                   help="where bases, classifiers, target sets and feature statistics are kept")
    p.add_argument("--seeds", type=common.count_up_to(MAX_SEEDS),
                   default=None, help=f"reported seeds 0..S-1 (seed s fine-tunes base s mod "
                   f"--bases; at most {MAX_SEEDS})")
    p.add_argument("--bases", type=common.count_up_to(MAX_SEEDS),
                   default=None, help="independently pretrained bases (pretrain seeds 0..B-1)")
    p.add_argument("--tune", choices=["grid", "none"], default="grid",
                   help="grid: choose each method's config on --tune-seed; none: the preset's")
    p.add_argument("--tune-seed", type=common.seed_int, default=1000,
                   help="the tuning seed (base 0), never reported")
    p.add_argument("--tune-lr", type=number_list(common.pos_float), default=None,
                   help="GRAFT / P-GRAFT learning rates of the grid")
    p.add_argument("--tune-train-steps", type=number_list(common.pos_int), default=None,
                   help="GRAFT / P-GRAFT steps per round of the grid")
    p.add_argument("--tune-ddpo-lr", type=number_list(common.pos_float), default=None,
                   help="DDPO learning rates of the grid")
    p.add_argument("--tune-ddpo-clip-range", type=number_list(common.pos_float), default=None,
                   help="DDPO clip ranges of the grid")
    p.add_argument("--n-i", default=None, help="P-GRAFT's N_I list: fractions of N, steps or "
                   "abar:A,... (each its own arm; the first is the one tuned)")
    p.add_argument("--methods", default=None, help="comma list of graft, pgraft, ddpo (graft "
                   "always: every difference is from GRAFT)")
    p.add_argument("--tilt-class", type=int, default=None,
                   help="mnist-tilt: the class c of the reward log p(c | x) (default 3)")
    p.add_argument("--device", default="auto", help="cpu, cuda, ... (auto: cuda when available)")
    p.add_argument("--data-dir", default=None, help="the task's data (default: the task's own)")
    p.add_argument("--resume", action="store_true", help="continue a benchmark in --out")
    p.add_argument("--base", default=None, help="comma list of base checkpoints (one per base) "
                   "instead of the cached ones")
    p.add_argument("--reward", default=None, help="reward name (default: the task's)")
    p.add_argument("--classifier", default=None, help="this reward classifier checkpoint")
    p.add_argument("--features", default=None, help="this FeatureNet checkpoint (FID features)")
    p.add_argument("--base-steps", type=common.pos_int, default=None,
                   help="pretraining steps of the cached bases")
    p.add_argument("--classifier-steps", type=common.pos_int, default=None,
                   help="training steps of the cached reward classifier and FeatureNet")
    p.add_argument("--final-samples", type=common.pos_int, default=None,
                   help="samples of each evaluation by the benchmark (>= 2)")
    p.add_argument("--target-samples", type=common.pos_int, default=None,
                   help="mnist-tilt: exact target samples per base (>= 2)")
    p.add_argument("--fid-samples", type=common.fid_int, default=-1,
                   help="Inception FID samples (-1: the preset's on CUDA, 0 on CPU; 0: none)")
    p.add_argument("--bf16", action="store_true", help="bf16 autocast of the runs (CUDA)")
    p.add_argument("--jobs", type=common.pos_int, default=None,
                   help="runs in parallel, one process and one thread each (default: the "
                   "preset's; cpu: 2)")
    p.add_argument("--ceiling-n-i", default=None, help="N_I whose one-round ceiling is reported "
                   "beside those of --n-i, without a run (the same forms)")
    p.add_argument("--plan", action="store_true",
                   help="print the plan and its estimated time (measured here), write nothing")
    for k, kind in RUN_FLAGS.items():
        p.add_argument(f"--{k.replace('_', '-')}", type=kind, default=None,
                       help=f"graft/pgraft/ddpo --{k.replace('_', '-')} (default: the preset's)")
    p.add_argument("--sample-from", choices=["ref", "current"], default=None,
                   help="graft/pgraft --sample-from (default: the task's)")
    p.add_argument("--alpha", type=common.pos_float, default=None, help="graft/pgraft --alpha")
    for k, kind in DDPO_FLAGS.items():
        p.add_argument(f"--ddpo-{k.replace('_', '-')}", type=kind, default=None,
                       help=f"ddpo.py --{k.replace('_', '-')} (default: the preset's)")
    return p.parse_args(argv)


def key_of(obj):
    return hashlib.sha1(json.dumps(obj, sort_keys=True).encode()).hexdigest()[:12]


def data_key(data_dir):
    return os.path.abspath(data_dir) if data_dir else None


def arm_slug(arm):
    return arm["method"] + (f"_ni{arm['n_i']}" if arm["n_i"] is not None else "")


def cfg_slug(cfg):
    return "_".join(f"{k}{v:g}" for k, v in sorted(cfg.items()))


# ---------------------------------------------------------------- the plan (all checks) ----
def make_plan(args):
    """Every setting of the benchmark, resolved and checked against the scripts' own flag checks
    before anything is trained or written. Raises UsageError (exit 2) on bad input."""
    if (args.task, args.preset) not in SPECS:
        have = sorted(p for t, p in SPECS if t == args.task)
        raise UsageError(f"--task {args.task} has no --preset {args.preset}; choose from "
                         f"{', '.join(have)}")
    spec = copy.deepcopy(SPECS[(args.task, args.preset)])
    info = TASKS[args.task]
    task = get_task(info["task"])
    device = common.pick_device(args.device)
    run, dd = spec["run"], spec["ddpo"]
    for k in RUN_FLAGS:
        if getattr(args, k) is not None:
            run[k] = getattr(args, k)
    for k in DDPO_FLAGS:
        if getattr(args, f"ddpo_{k}") is not None:
            dd[k] = getattr(args, f"ddpo_{k}")
    run["accept"], run["alpha"] = info["accept"], args.alpha or info["alpha"]
    run["sample_from"] = args.sample_from or info["sample_from"]
    # ---- methods, seeds, bases
    methods = (args.methods or spec["methods"]).split(",")
    methods = [m.strip() for m in methods if m.strip()]
    bad = [m for m in methods if m not in METHODS]
    if bad or "graft" not in methods or len(set(methods)) != len(methods):
        raise UsageError(f"--methods {','.join(methods) or '(empty)'}: a comma list of "
                         f"{', '.join(METHODS)} that holds graft (every difference is from "
                         "GRAFT), each once")
    bases = args.base.split(",") if args.base else None
    if bases:
        missing = [b for b in bases if not os.path.isfile(b)]
        if missing:
            raise UsageError(f"--base {missing[0]}: no such checkpoint")
        if args.bases is not None and args.bases != len(bases):
            raise UsageError(f"--bases {args.bases} but --base names {len(bases)} checkpoints")
    n_bases = len(bases) if bases else (args.bases or spec["bases"])
    seeds = args.seeds or spec["seeds"]
    if seeds < n_bases:
        raise UsageError(f"--seeds {seeds} < --bases {n_bases}: every base needs a seed")
    if args.tune_seed < seeds:
        raise UsageError(f"--tune-seed {args.tune_seed} is a reported seed (0..{seeds - 1}); "
                         "the tuning seed must not be reported")
    # ---- the reward, its classifier and the tilt class
    if args.tilt_class is not None and args.task != "mnist-tilt":
        raise UsageError("--tilt-class is for --task mnist-tilt")
    c = 3 if args.tilt_class is None else args.tilt_class
    if args.task == "mnist-tilt" and not 0 <= c <= 9:
        raise UsageError(f"--tilt-class {c}: a digit 0..9")
    reward = args.reward or info["reward"]
    reward = reward.format(c=c) if reward else None
    for flag, path in (("--classifier", args.classifier), ("--features", args.features)):
        if path and not os.path.isfile(path):
            raise UsageError(f"{flag} {path}: no such checkpoint")
    # ---- rounds, budgets, the rule
    if run["rounds"] < 2 or run["rounds"] % 2:
        raise UsageError(f"--rounds {run['rounds']}: an even number >= 2 (the half-budget "
                         "question compares half the rounds with all)")
    AcceptRule(run["accept"], run["M"], run["K"], None, run["alpha"])
    per_round = run["prompts"] * run["M"]
    budgets = []
    for f in BUDGETS:
        k = f * run["rounds"]
        if k == int(k) and k >= 1:
            budgets.append(dict(fraction=f, rounds=int(k), samples=int(k) * per_round,
                                label=f"{f:g} of the budget" if f < 1 else "full budget"))
    # ---- sizes of the cache and the evaluation
    if args.base_steps:
        spec["base"]["train_steps"] = args.base_steps
    if args.classifier_steps:
        spec["classifier"]["steps"] = spec["features"]["steps"] = args.classifier_steps
    if args.final_samples:
        spec["final"]["samples"] = args.final_samples
    if args.target_samples:
        spec["target"]["samples"] = args.target_samples
    if spec["final"]["samples"] < 2 or spec["target"]["samples"] < 2:
        raise UsageError("--final-samples and --target-samples must be >= 2 (a covariance)")
    if args.fid_samples >= 0:
        spec["final"]["fid_samples"] = args.fid_samples
    elif device.type != "cuda":
        spec["final"]["fid_samples"] = 0
    # sample sets held at once, against the device's memory before any work (a base pretrained
    # first, then an out-of-memory traceback, or a rejection sampler without end)
    common.check_sizes({f"--{k}-samples": (spec[part][key], common.SAMPLE_COPIES) for k, part, key
                        in (("final", "final", "samples"), ("fid", "final", "fid_samples"),
                            ("target", "target", "samples"))}, math.prod(task.shape()), device)
    spec["base"]["unconditional"] = not info["conditional"]
    # ---- N_I on the chain the bases will have, each with a random continuation
    process = common.build_process(task, "ddpm")
    if bases:
        process = common.load_base(bases[0], "cpu", task=task)[1]
    if run["sample_steps"] > process.N:
        raise UsageError(f"--sample-steps {run['sample_steps']} exceeds N = {process.N}")
    arms = [dict(name="GRAFT", method="graft", family="graft", n_i=None)]
    n_table = {0: dict(n_i=0, frac=0.0, abar=1.0, random_steps=0, run=True)}
    if "pgraft" in methods:
        spec_ni = args.n_i or spec["n_i"]
        for n_i in common.parse_steps(spec_ni, process, "--n-i"):
            if n_i == 0:
                raise UsageError("--n-i 0 is GRAFT, which is always run; list N_I > 0")
            k = common.check_continuation(process, n_i, run["sample_steps"], 1.0)
            arms.append(dict(name=f"P-GRAFT N_I={n_i}", method="pgraft", family="pgraft",
                             n_i=n_i))
            n_table[n_i] = dict(n_i=n_i, frac=n_i / process.N,
                                abar=float(process.alpha_bar[n_i]), random_steps=k, run=True)
    extra_ni = args.ceiling_n_i or spec["ceiling_n_i"]
    for n_i in common.parse_steps(extra_ni, process, "--ceiling-n-i") if extra_ni else []:
        k = process.stochastic_steps(n_i, 0, run["sample_steps"], 1.0, keep=[n_i]) if n_i else 0
        n_table.setdefault(n_i, dict(n_i=n_i, frac=n_i / process.N,
                                     abar=float(process.alpha_bar[n_i]), random_steps=k,
                                     run=False))
    n_table = [n_table[k] for k in sorted(n_table)]
    if "ddpo" in methods:
        arms.append(dict(name="DDPO", method="ddpo", family="ddpo", n_i=None))
    # ---- the tuning grid
    typed = [f for f in ("lr", "train_steps") if getattr(args, f) is not None]
    if args.tune == "grid" and typed:
        raise UsageError(f"--{typed[0].replace('_', '-')} is chosen by the tuning grid; give "
                         f"--tune-{typed[0].replace('_', '-')} or --tune none")
    if args.tune == "grid" and (args.ddpo_lr or args.ddpo_clip_range):
        raise UsageError("DDPO's lr and clip range are chosen by the tuning grid; give "
                         "--tune-ddpo-lr / --tune-ddpo-clip-range or --tune none")
    tg = spec["tune"]
    grids = dict(
        graft=dict(lr=args.tune_lr or tg["graft"]["lr"],
                   train_steps=args.tune_train_steps or tg["graft"]["train_steps"]),
        ddpo=dict(lr=args.tune_ddpo_lr or tg["ddpo"]["lr"],
                  clip_range=args.tune_ddpo_clip_range or tg["ddpo"]["clip_range"]))
    grids["pgraft"] = grids["graft"]
    families = {}
    for fam in dict.fromkeys(a["family"] for a in arms):
        if args.tune == "none":
            base_cfg = (dict(lr=dd["lr"], clip_range=dd["clip_range"]) if fam == "ddpo"
                        else dict(lr=run["lr"], train_steps=run["train_steps"]))
            families[fam] = [base_cfg]
        else:
            g = grids[fam]
            families[fam] = [dict(zip(g, vals)) for vals in itertools.product(*g.values())]
    crit = info["criterion"]
    plan = dict(
        task=args.task, preset=args.preset, tasks_task=task.name, spec=spec, run=run, ddpo=dd,
        reward=reward, tilt_class=c if args.task == "mnist-tilt" else None,
        conditional=info["conditional"], device=str(device), data_dir=args.data_dir,
        cache=args.cache, out=args.out or os.path.join("runs", "benchmark",
                                                        f"{args.task}-{args.preset}"),
        bases=bases, n_bases=n_bases, seeds=list(range(seeds)), tune_seed=args.tune_seed,
        tune=args.tune, families=families, criterion=crit, arms=arms, n_table=n_table,
        budgets=budgets, per_round=per_round, N=process.N, bf16=args.bf16,
        jobs=args.jobs or spec["jobs"],
        classifier=args.classifier, features=args.features, resume=args.resume)
    # ---- every run's flags through the scripts' own checks (exit 2 on the first bad one)
    for fam, cfgs in families.items():
        arm = next(a for a in arms if a["family"] == fam)
        for cfg in cfgs:
            argv = script_argv(plan, arm, cfg, 0, bases[0] if bases else "base.pt", "o",
                               run["rounds"], "clf.pt")
            module = SCRIPTS[arm["method"]]
            harness.parse(module.Args, argv, task_defaults=module.TASK_DEFAULTS)
    for b in range(n_bases):
        pretrain.get_args(base_argv(plan, b, "o"))
    # ---- the output folders and the data
    common.check_out(plan["out"])
    common.check_out(plan["cache"], "--cache")
    held = [n for n in ("results.json", "tune", "seed0") if os.path.exists(
        os.path.join(plan["out"], n))]
    if held and not args.resume:
        raise UsageError(f"--out {plan['out']} already holds a benchmark ({', '.join(held)}); "
                         "pass --resume to continue it, or another --out")
    # the data loads (a missing or damaged copy is one line, exit 2), the reward is one
    check_reward(plan, task, task.dataset("train", args.data_dir))
    return plan


def check_reward(plan, task, data):
    """The reward name, checked by rewards.get_reward on a throwaway classifier of the right shape
    (nothing is trained, nothing is written outside a temporary folder): the benchmark's primary
    metric needs a log-probability reward, p = exp(r)."""
    import tempfile

    from models import save_checkpoint
    from rewards.classifier import SETTINGS, Classifier

    t = clf_task(plan)
    ct = get_task(t)
    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "clf.pt")
        net = Classifier(ct.channels, ct.image_size, SETTINGS[t]["outputs"], 8)
        save_checkpoint(path, net, extra=dict(task=t, accuracy=0.0,
                                              attr_names=list(getattr(data, "attr_names", []))))
        reward = rewards.get_reward(plan["reward"], task, "cpu", plan["conditional"],
                                    plan["data_dir"], path)
    if not reward.log_prob:
        raise UsageError(f"--reward {reward.name}: the benchmark reads p(y | x) = exp(reward), so "
                         "it needs a classifier log-probability reward (digit, pairs, attributes)")


def warmup(train_steps):
    """Warm-up steps of a fine-tuning round: 10% of its steps (issue 17: at most 10%)."""
    return train_steps // 10


def script_argv(plan, arm, cfg, seed, base, out, rounds, clf):
    """graft.py / pgraft.py / ddpo.py flags of one run: the same base, reward, conditions, M,
    rounds, sampler steps and evaluation for every method; ``cfg`` the method's tuned values."""
    r = plan["run"]
    argv = ["--task", plan["tasks_task"], "--base", base, "--classifier", clf, "--seed",
            str(seed), "--device", plan["device"], "--fid-samples", "0", "--out", out,
            "--rounds", str(rounds), "--prompts", str(r["prompts"]), "--M", str(r["M"]),
            "--sample-steps", str(r["sample_steps"]), "--eval-samples", str(r["eval_samples"]),
            "--sample-batch", str(r["sample_batch"]), "--log-every", str(LOSS_LOG_EVERY)]
    argv += ["--reward", plan["reward"]] if plan["reward"] else []
    argv += ["--data-dir", plan["data_dir"]] if plan["data_dir"] else []
    argv += ["--bf16"] if plan["bf16"] else []
    if arm["method"] == "ddpo":
        d = plan["ddpo"]
        return argv + ["--lr", f"{cfg['lr']:g}", "--clip-range", f"{cfg['clip_range']:g}",
                       "--inner-epochs", str(d["inner_epochs"]), "--batch-size",
                       str(d["batch_size"]), "--timestep-fraction", f"{d['timestep_fraction']:g}",
                       "--ema-decay", f"{d['ema_decay']:g}"]
    argv += ["--accept", r["accept"], "--K", str(r["K"]), "--alpha", f"{r['alpha']:g}",
             "--sample-from", r["sample_from"], "--train-steps", str(cfg["train_steps"]),
             "--warmup", str(warmup(cfg["train_steps"])), "--batch-size", str(r["batch_size"]),
             "--lr", f"{cfg['lr']:g}", "--ema-decay", f"{r['ema_decay']:g}"]
    if arm["method"] == "pgraft":
        argv += ["--n-i", str(arm["n_i"]), "--lemma-levels", "none"]
    return argv


def base_argv(plan, b, out):
    """pretrain.py's flags for cached base b (pretrain seed b)."""
    s = plan["spec"]["base"]
    argv = ["--task", plan["tasks_task"], "--out", out, "--preset", s["preset"],
            "--train-steps", str(s["train_steps"]), "--batch-size", str(s["batch_size"]),
            "--lr", str(s["lr"]), "--ema-decay", str(s["ema_decay"]),
            "--eval-samples", str(BASE_EVAL_SAMPLES), "--fid-samples", "0",
            "--device", plan["device"], "--seed", str(b)]
    if s["unconditional"]:
        argv += ["--unconditional"] if get_task(plan["tasks_task"]).conditional else []
    else:
        argv += ["--cond-drop", str(s["cond_drop"])]
    return argv + (["--data-dir", plan["data_dir"]] if plan["data_dir"] else [])


# ---------------------------------------------------------------- the cache ----
def clf_task(plan):
    return "celeba" if plan["tasks_task"] == "celeba" else rewards.digit_classifier_task(
        get_task(plan["tasks_task"]))


def cached_classifier(plan):
    """The reward classifier: trained once per settings on the first half of the training split."""
    if plan["classifier"]:
        return plan["classifier"]
    t = clf_task(plan)
    cfg = dict(task=t, data=data_key(plan["data_dir"]), part=0, seed=0,
               **plan["spec"]["classifier"])
    path = os.path.join(plan["cache"], f"classifier-{t}-{key_of(cfg)}.pt")
    if not os.path.isfile(path):
        print(f"== benchmark: the reward classifier {cfg} -> {path}", flush=True)
        train_classifier(t, out=path, steps=cfg["steps"], batch_size=cfg["batch_size"],
                         data_dir=plan["data_dir"], device=plan["device"], seed=0, part=0)
    return path


def cached_features(plan):
    """The FeatureNet of FID and diversity: the other half of the split, another seed."""
    if plan["features"]:
        return plan["features"]
    t = clf_task(plan)
    cfg = dict(task=t, data=data_key(plan["data_dir"]), part=1, seed=1, **plan["spec"]["features"])
    path = os.path.join(plan["cache"], f"features-{t}-{key_of(cfg)}.pt")
    if not os.path.isfile(path):
        print(f"== benchmark: the FeatureNet {cfg} -> {path}", flush=True)
        f = plan["spec"]["features"]
        feature_fid.train(t, path, steps=f["steps"], batch_size=f["batch_size"],
                          data_dir=plan["data_dir"], device=plan["device"], seed=1, part=1,
                          width=f["width"], dim=f["dim"])
    return path


def cached_base(plan, b):
    """Base b: pretrained once per (task, flags, data, seed b) under the cache."""
    if plan["bases"]:
        return plan["bases"][b]
    cfg = dict(task=plan["tasks_task"], data=data_key(plan["data_dir"]), seed=b,
               **plan["spec"]["base"])
    out = os.path.join(plan["cache"], f"base-{plan['tasks_task']}-{key_of(cfg)}")
    path = os.path.join(out, "ckpt.pt")
    if os.path.isfile(os.path.join(out, "summary.json")) and os.path.isfile(path):
        return path
    argv = base_argv(plan, b, out) + (["--resume"] if os.path.isfile(path) else [])
    print(f"== benchmark: pretraining base {b} (python pretrain.py {' '.join(argv)})", flush=True)
    pretrain.main(argv)
    return path


def cached_target(plan, b, base, clf, device):
    """mnist-tilt: base b's exact target set p_ref(x) p(c | x) / Z (eval/tilt.py), kept in the
    cache with the rejection sampler's numbers."""
    n = plan["spec"]["target"]["samples"]
    cfg = dict(base=os.path.abspath(base), clf=os.path.abspath(clf), c=plan["tilt_class"], n=n,
               steps=plan["run"]["sample_steps"], seed=b)
    path = os.path.join(plan["cache"], f"target-{key_of(cfg)}.pt")
    if os.path.isfile(path):
        return torch.load(path, map_location="cpu", weights_only=True)
    print(f"== benchmark: the exact target of base {b} by rejection ({n} samples)", flush=True)
    task = get_task(plan["tasks_task"])
    ref, process, _ = common.load_base(base, device, task=task)
    reward = rewards.get_reward(plan["reward"], task, device, False, plan["data_dir"], clf)
    x, info = tilt.class_tilt_target(
        ref, process, reward, task.shape(), n, sample_steps=plan["run"]["sample_steps"],
        batch=plan["run"]["sample_batch"], generator=common.generator(777 + b, device),
        max_draws=TARGET_DRAWS * n)
    if len(x) < 2:
        raise UsageError(f"base {b} gave {len(x)} exact target samples of class "
                         f"{plan['tilt_class']} in {info['draws']} draws; pick another "
                         "--tilt-class")
    out = dict(x=x.cpu(), **{k: torch.tensor(v) for k, v in info.items()})
    common.atomic_save(out, path)
    return out


# ---------------------------------------------------------------- evaluation ----
class Evaluator:
    """The benchmark's own evaluation on one base: fresh samples with noise and conditions that
    depend on the seed only (the same for every method of a seed), scored by the reward (p(y | x),
    accuracy, mean log-probability) and measured in FeatureNet's features (FID, diversity; on
    mnist-tilt FID to the exact target set and to real class-c images)."""

    def __init__(self, plan, base, clf, feats, device, target=None):
        self.plan, self.device = plan, device
        self.task = task = get_task(plan["tasks_task"])
        self.ref, self.process, _ = common.load_base(base, device, task=task)
        self.reward = rewards.get_reward(plan["reward"], task, device, plan["conditional"],
                                         plan["data_dir"], clf)
        net, info = feature_fid.load(feats, device)
        self.space = feature_fid.FeatureSpace(net, halves=bool(task.width), info=info)
        self.data = (task.dataset("train", plan["data_dir"])
                     if plan["conditional"] and task.cond_dim else None)
        self.real_stats, self.real_info = real_stats(plan, task, self.space, self.reward, device)
        self.target_stats = None
        if target is not None:
            self.target_stats = classifier_fid.stats(
                classifier_fid.features(self.space, target["x"].to(device)))
        self.fid = None
        if plan["spec"]["final"]["fid_samples"] > 0:
            self.fid = inception_fid(task, plan["spec"]["final"]["fid_samples"], device,
                                     plan["data_dir"], os.path.join(plan["cache"], "fid"))

    def net_of(self, folder, arm):
        """A run's EMA weights as the sampler calls them (P-GRAFT: N -> N_I, then the
        reference), the reference itself when ``folder`` is None."""
        if folder is None:
            return self.ref
        net = model_from_checkpoint(os.path.join(folder, "ckpt.pt"), self.device)[0]
        if arm["method"] == "pgraft":
            return [(net, self.process.N, arm["n_i"]), (self.ref, arm["n_i"], 0)]
        return net

    @torch.no_grad()
    def __call__(self, net, seed):
        plan, task, r = self.plan, self.task, self.plan["run"]
        m = plan["spec"]["final"]["samples"]
        n = max(m, plan["spec"]["final"]["fid_samples"])
        gen = common.generator(10_000_019 + seed, self.device)
        y = task.sample_conditions(n, gen, self.device, self.data) if plan["conditional"] else None
        image = task.kind == "image"
        xs = []
        for i in range(0, n, r["sample_batch"]):
            b = min(r["sample_batch"], n - i)
            z = torch.randn((b, *task.shape()), generator=gen, device=self.device)
            x, _ = self.process.sample(net, z, y=y[i : i + b] if y is not None else None,
                                       generator=gen, eta=1.0, num_steps=r["sample_steps"],
                                       clip=image)
            xs.append(x.clamp(-1, 1) if image else x)
        x = torch.cat(xs)
        out = self.measure(x[:m], y[:m] if y is not None else None)
        if self.fid is not None:
            out["inception_fid"] = self.fid(x)
        return out

    def measure(self, x, y):
        r = rewards.score(self.reward, x, y)
        met = self.reward.metrics(x, y)
        feats = classifier_fid.features(self.space, x)
        p = rewards.bounded(self.reward, r)
        out = dict(prob=None if p is None else p.mean().item(),
                   accuracy=met.get("all_correct", met.get("accuracy")), reward=r.mean().item(),
                   fid=classifier_fid.fid_from_features(feats, self.real_stats),
                   diversity=classifier_fid.diversity(feats, condition_groups(y)))
        if self.target_stats is not None:
            out["fid_target"] = classifier_fid.fid_from_features(feats, self.target_stats)
        return out


def real_stats(plan, task, space, reward, device):
    """FeatureNet statistics of real held-out images (the test split; CelebA val; mnist-tilt:
    its class-c images), cached, and what real data scores."""
    split = "val" if task.name == "celeba" else "test"
    ds = task.dataset(split, plan["data_dir"])
    n = plan["spec"]["n_real"]
    if hasattr(ds, "tensors"):
        x, y = ds.tensors[0], ds.tensors[1]
    else:
        idx = range(min(n, len(ds)))
        x, y = torch.stack([ds[i][0] for i in idx]), torch.stack([ds[i][1] for i in idx])
    if plan["tilt_class"] is not None:
        keep = y == plan["tilt_class"]
        x, y = x[keep], y[keep]
    x, y = x[:n].to(device), y[:n].to(device)
    tag = dict(task=task.name, split=split, n=len(x), data=data_key(plan["data_dir"]),
               tilt=plan["tilt_class"], space=space.name)
    st = classifier_fid.reference_stats(space, x, tag, os.path.join(plan["cache"], "features"))
    cond = y if plan["conditional"] else None
    if getattr(reward, "idx", None) is not None:
        has = ((y[:, reward.idx] * reward.sign) > 0).all(1)
        x, cond = x[has], None
    if len(x) == 0:
        return st, dict(n=0)
    r = rewards.score(reward, x, cond)
    met = reward.metrics(x, cond)
    p = rewards.bounded(reward, r)
    return st, dict(n=len(x), split=split, reward=r.mean().item(),
                    prob=None if p is None else p.mean().item(),
                    accuracy=met.get("all_correct", met.get("accuracy")))


def inception_fid(task, n, device, data_dir, cache_dir):
    """x -> the Inception FID (eval/fid.py, fp32) of x[:n] against n images of the task's train
    split (a fixed random subset when the split is larger; statistics cached in cache_dir)."""
    from eval.fid import FIDEvaluator, frechet_distance

    ev = FIDEvaluator(device=str(device), batch_size=250 if device.type == "cuda" else 16,
                      cache_dir=cache_dir)
    ref = ev.reference_stats(task.name, split="train", num_images=n, data_dir=data_dir)

    def fid(x):
        mu, sigma, _ = ev.stats(x[:n])
        return float(frechet_distance(mu, sigma, *ref))

    return fid


# ---------------------------------------------------------------- runs (also in workers) ----
_EVALUATORS = {}


def evaluator(plan, b, ctx):
    """Base b's Evaluator, built once per process."""
    key = json.dumps(dict(plan=plan, base=ctx["bases"][b], clf=ctx["clf"], feats=ctx["feats"]),
                     sort_keys=True, default=str)
    if key not in _EVALUATORS:
        device = torch.device(plan["device"])
        target = ctx["targets"][b] if ctx["targets"] else None
        _EVALUATORS[key] = Evaluator(plan, ctx["bases"][b], ctx["clf"], ctx["feats"], device,
                                     target)
    return _EVALUATORS[key]


def run_arm(job):
    """One method on one seed: its run to each of ``job['rounds']`` (a --resume of the previous
    stage), evaluated by the benchmark after each; evaluations kept in FOLDER/bench_eval.json so
    that a resumed benchmark skips them. Returns {rounds: metrics}."""
    plan, ctx, arm, cfg, seed, b, folder = (job[k] for k in (
        "plan", "ctx", "arm", "cfg", "seed", "base", "folder"))
    path = os.path.join(folder, "bench_eval.json")
    done = json.load(open(path)) if os.path.isfile(path) else {}
    for k in job["rounds"]:
        if str(k) in done:
            continue
        argv = script_argv(plan, arm, cfg, seed, ctx["bases"][b], folder, k, ctx["clf"])
        argv += ["--resume"] if os.path.isfile(os.path.join(folder, "ckpt.pt")) else []
        print(f"== benchmark: {arm['name']} {cfg}, seed {seed} (base {b}), to round {k}",
              flush=True)
        s = SCRIPTS[arm["method"]].main(argv)
        phase(f"evaluation of {arm['name']}, seed {seed}, round {k}")
        if s["samples_generated"] != k * plan["per_round"]:
            raise UsageError(f"{folder} holds a run past round {k} without the benchmark's "
                             f"evaluation of round {k}; delete that folder and rerun with --resume")
        ev = evaluator(plan, b, ctx)
        done[str(k)] = ev(ev.net_of(folder, arm), seed)
        common.atomic_json(path, done)
        # the loss curve kept beside the evaluations, so the loss table does not depend on the
        # run's metrics.jsonl staying in place
        common.atomic_json(os.path.join(folder, "bench_loss.json"), report.loss_curve(folder))
    return done


def phase(name):
    """Name the benchmark's own phase for the ``stopped:`` line of a SIGTERM (Ctrl-C: 130) that
    lands in it; what is finished is kept for --resume."""
    common.PHASE["name"] = f"the benchmark's {name}"
    common.stop_outside_loops()


def _worker_init():
    torch.set_num_threads(1)
    # Ctrl-C on a terminal reaches every process of the group: the parent alone answers it
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def run_jobs(jobs, n_jobs):
    """run_arm over ``jobs``, in this process or in ``n_jobs`` worker processes."""
    if n_jobs <= 1 or len(jobs) <= 1:
        return [run_arm(j) for j in jobs]
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    ctx = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(n_jobs, mp_context=ctx, initializer=_worker_init) as pool:
        try:
            return list(pool.map(run_arm, jobs))
        except BaseException:
            # a stop signal or a failed job: the other workers stop now, not after their runs
            # (checkpoints are written by rename, so --resume continues from the last one)
            for p in list((getattr(pool, "_processes", None) or {}).values()):
                p.kill()
            pool.shutdown(wait=False, cancel_futures=True)
            raise


# ---------------------------------------------------------------- the time it takes ----
CALL_OVERHEAD_S = 1.0  # a script call's own cost beyond its sampling and training (files, nets)
# measured / estimated CPU time of a one-seed, one-base, untuned mnist-weak cpu run (237 s / 213 s:
# data loading, held-out accuracies and feature statistics are not in the unit costs)
CALIBRATION = 1.12


def estimate(plan):
    """Seconds of each part of the benchmark on this machine when it is free: unit costs measured
    here in CPU time of one thread (a sampler call per image and step at the sampling batch, a
    training step at each batch size; CPU time, so other jobs on the machine do not inflate them)
    times the counts of the plan, plus CALL_OVERHEAD_S per script call. ``total_s``: one job;
    ``total_with_jobs_s``: the runs spread over --jobs processes. Cached bases and classifiers
    are counted as if they had to be made."""
    device = torch.device(plan["device"])
    task = get_task(plan["tasks_task"])
    s, r, d = plan["spec"], plan["run"], plan["ddpo"]
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    clock = time.process_time if device.type == "cpu" else time.time
    net = common.build_network(task, "ddpm", s["base"]["preset"], plan["conditional"]).to(device)
    shape = task.shape()

    def y_of(n):
        return torch.zeros(n, dtype=torch.long, device=device) if plan["conditional"] else None

    with torch.no_grad():
        b = min(r["sample_batch"], 400)
        x, t = torch.randn(b, *shape, device=device), torch.rand(b, device=device)
        net(x, t, y_of(b))
        t0 = clock()
        for _ in range(3):
            net(x, t, y_of(b))
        fwd = (clock() - t0) / 3 / b

    def step_cost(bs, model=net, reps=3):
        opt = torch.optim.Adam(model.parameters())
        # the classifiers see one digit (a half of a pair) or one face
        size = shape if model is net else (task.channels, task.image_size, task.image_size)
        xb, tb = torch.randn(bs, *size, device=device), torch.rand(bs, device=device)
        times = []
        for _ in range(reps + 1):
            t0 = clock()
            out = model(xb, tb, y_of(bs)) if model is net else model(xb)
            opt.zero_grad()
            out.pow(2).mean().backward()
            opt.step()
            times.append(clock() - t0)
        return sum(times[1:]) / reps

    try:
        cost = {bs: step_cost(bs) for bs in {r["batch_size"], d["batch_size"],
                                             s["base"]["batch_size"]}}
        from rewards.classifier import Classifier

        clf = Classifier(task.channels, task.image_size, 10, 16).to(device)
        fn = feature_fid.FeatureNet(task.channels, task.image_size, 10, s["features"]["width"],
                                    s["features"]["dim"]).to(device)
        clf_step = step_cost(s["classifier"]["batch_size"], clf, 2)
        feat_step = step_cost(s["features"]["batch_size"], fn, 2)
    finally:
        torch.set_num_threads(threads)
    S, P, R = r["sample_steps"], plan["per_round"], r["rounds"]
    n_seeds, n_final, B = len(plan["seeds"]), s["final"]["samples"], plan["n_bases"]
    parts = dict(
        classifiers=s["classifier"]["steps"] * clf_step + s["features"]["steps"] * feat_step,
        bases=B * (s["base"]["train_steps"] * cost[s["base"]["batch_size"]]
                   + BASE_EVAL_SAMPLES * 100 * fwd + CALL_OVERHEAD_S),
        ceilings=B * P * S * fwd * len(plan["n_table"]),
        targets=(B * s["target"]["samples"] * 10 * S * fwd
                 if plan["tilt_class"] is not None else 0.0))
    eval_cost = n_final * S * fwd + CALL_OVERHEAD_S / 2

    def run_cost(arm, cfg, stages):
        own = (R + 1) * r["eval_samples"] * S * fwd + stages * CALL_OVERHEAD_S
        if arm["method"] == "ddpo":
            k = max(1, math.ceil(d["timestep_fraction"] * (S - 1)))
            steps = d["inner_epochs"] * math.ceil(P * k / d["batch_size"])
            return R * (P * S * fwd + steps * cost[d["batch_size"]]) + own
        return R * (P * S * fwd + cfg["train_steps"] * cost[r["batch_size"]]) + own

    parts["tuning"] = 0.0
    for fam, cfgs in plan["families"].items():
        if len(cfgs) > 1:
            arm = next(a for a in plan["arms"] if a["family"] == fam)
            parts["tuning"] += sum(run_cost(arm, c, 1) + eval_cost for c in cfgs)
    # the reported runs with the grid's most expensive config (the tuned one is not known yet)
    worst = {fam: max(cfgs, key=lambda c: c.get("train_steps", 0))
             for fam, cfgs in plan["families"].items()}
    nb = len(plan["budgets"])
    parts["runs"] = n_seeds * sum(run_cost(a, worst[a["family"]], nb) + nb * eval_cost
                                  for a in plan["arms"]) + n_seeds * eval_cost
    parts = {k: v * CALIBRATION for k, v in parts.items()}
    total = sum(parts.values())
    serial = total - parts["tuning"] - parts["runs"]
    return dict(**{f"{k}_s": round(v, 1) for k, v in parts.items()}, total_s=round(total, 1),
                jobs=plan["jobs"],
                total_with_jobs_s=round(serial + (parts["tuning"] + parts["runs"]) / plan["jobs"],
                                        1), calibration=CALIBRATION,
                unit_costs=dict(sample_step_per_image_ms=round(fwd * 1e3, 4),
                                train_step_s={str(k): round(v, 4) for k, v in cost.items()},
                                classifier_step_s=round(clf_step, 4),
                                featurenet_step_s=round(feat_step, 4)),
                clock="CPU time of one thread" if device.type == "cpu" else "wall")


# ---------------------------------------------------------------- main ----
def machine(device):
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return (f"{platform.processor() or platform.machine()} CPU, {os.cpu_count()} cores, "
            f"torch threads {torch.get_num_threads()}")


def print_plan(plan):
    r = plan["run"]
    common.print_derived(
        f"benchmark {plan['task']} ({plan['preset']} preset)", tasks_task=plan["tasks_task"],
        device=plan["device"], reward=plan["reward"] or "the task's",
        bases=f"{plan['n_bases']} ({', '.join(plan['bases']) if plan['bases'] else 'cached'})",
        seeds=f"{len(plan['seeds'])} reported (seed s on base s mod {plan['n_bases']}), tuning "
        f"seed {plan['tune_seed']}",
        arms=", ".join(a["name"] for a in plan["arms"]),
        n_i=", ".join(f"{t['n_i']} (abar {t['abar']:.3f}, {t['random_steps']} random steps"
                      f"{'' if t['run'] else ', ceiling only'})" for t in plan["n_table"][1:]),
        run=r, ddpo=plan["ddpo"], tuning=dict(plan["families"], criterion=plan["criterion"]),
        budgets=", ".join(f"{b['rounds']} rounds = {b['samples']} samples"
                          for b in plan["budgets"]),
        cache=plan["spec"]["base"], final=plan["spec"]["final"], out=plan["out"])


def main(argv=None):
    args = get_args(argv)
    t0 = time.time()
    plan = make_plan(args)
    print_plan(plan)
    # the smoke preset (the tests) skips the estimate unless asked
    est = estimate(plan) if args.plan or args.preset != "smoke" else {}
    print(f"   estimated time (measured unit costs): {est}", flush=True)
    if args.plan:
        return dict(plan=plan, estimate=est)
    device = torch.device(plan["device"])
    times = {}

    def mark(name, since):
        times[f"{name}_s"] = round(time.time() - since, 1)
        return time.time()

    # 1. the cache
    phase("cache (bases, classifiers, target sets)")
    t = time.time()
    clf = cached_classifier(plan)
    feats = cached_features(plan)
    t = mark("classifiers", t)
    bases = [cached_base(plan, b) for b in range(plan["n_bases"])]
    t = mark("bases", t)
    targets = None
    if plan["tilt_class"] is not None:
        targets = [cached_target(plan, b, p, clf, device) for b, p in enumerate(bases)]
    t = mark("targets", t)
    ctx = dict(bases=bases, clf=clf, feats=feats, targets=targets)
    os.makedirs(plan["out"], exist_ok=True)

    # 2. N_I and the one-round ceilings, per base
    phase("one-round ceilings")
    ceilings = []
    task = get_task(plan["tasks_task"])
    n_is = [row["n_i"] for row in plan["n_table"]]
    for b in range(plan["n_bases"]):
        ev = evaluator(plan, b, ctx)
        rule = AcceptRule(plan["run"]["accept"], plan["run"]["M"], plan["run"]["K"], None,
                          plan["run"]["alpha"])
        ceilings.append(lemma43.one_round_ceiling(
            ev.ref, ev.process, task, ev.reward, rule, n_is=n_is, prompts=plan["run"]["prompts"],
            M=plan["run"]["M"], generator=common.generator(4242 + b, device),
            conditional=plan["conditional"], data=ev.data,
            sample_steps=plan["run"]["sample_steps"], sample_batch=plan["run"]["sample_batch"]))
    for row in plan["n_table"]:
        for k, key in (("gain", "ceiling_gain"), ("gain_prob", "ceiling_gain_prob"),
                       ("reward", "ceiling_reward"), ("prob", "ceiling_prob")):
            vals = [c[row["n_i"]][k] for c in ceilings if c[row["n_i"]][k] is not None]
            row[key] = sum(vals) / len(vals) if vals else None
    t = mark("ceilings", t)

    # 3. tuning on the tuning seed, base 0
    phase("tuning")
    crit, direction = plan["criterion"]
    tuning = dict(seed=plan["tune_seed"], metric=crit, direction=direction, families={})
    chosen = {}
    jobs, where = [], []
    for fam, cfgs in plan["families"].items():
        arm = next(a for a in plan["arms"] if a["family"] == fam)
        if len(cfgs) == 1:
            chosen[fam] = cfgs[0]
            tuning["families"][fam] = dict(grid=[dict(config=cfgs[0], value=None)],
                                           chosen=cfgs[0])
            continue
        for cfg in cfgs:
            folder = os.path.join(plan["out"], "tune", fam, cfg_slug(cfg))
            jobs.append(dict(plan=plan, ctx=ctx, arm=arm, cfg=cfg, seed=plan["tune_seed"], base=0,
                             folder=folder, rounds=[plan["run"]["rounds"]]))
            where.append((fam, cfg, folder))
    for (fam, cfg, folder), res in zip(where, run_jobs(jobs, plan["jobs"])):
        value = res[str(plan["run"]["rounds"])].get(crit)
        f = tuning["families"].setdefault(fam, dict(grid=[], chosen=None))
        f["grid"].append(dict(config=cfg, value=value, folder=folder))
    tuning["families"] = {fam: tuning["families"][fam] for fam in plan["families"]}
    for fam, f in tuning["families"].items():
        if f["chosen"] is None:
            ok = [g for g in f["grid"] if g["value"] is not None]
            best = (max if direction == "max" else min)(ok, key=lambda g: g["value"])
            f["chosen"] = chosen[fam] = best["config"]
    t = mark("tuning", t)

    # 4. every method on the reported seeds, evaluated at each budget
    phase("runs on the reported seeds")
    evals = {"base": {}}
    for s in plan["seeds"]:
        ev = evaluator(plan, s % plan["n_bases"], ctx)
        evals["base"][str(s)] = {"0": ev(ev.ref, s)}
    jobs = []
    for s in plan["seeds"]:
        for arm in plan["arms"]:
            jobs.append(dict(plan=plan, ctx=ctx, arm=arm, cfg=chosen[arm["family"]], seed=s,
                             base=s % plan["n_bases"],
                             folder=os.path.join(plan["out"], f"seed{s}", arm_slug(arm)),
                             rounds=[b["rounds"] for b in plan["budgets"]]))
    for job, res in zip(jobs, run_jobs(jobs, plan["jobs"])):
        evals.setdefault(job["arm"]["name"], {})[str(job["seed"])] = res
    t = mark("runs_and_evaluations", t)

    # 5. intervals, tables and pictures
    phase("report")
    loss = {}
    for arm in plan["arms"]:
        if arm["method"] == "ddpo":
            continue
        folders = [j["folder"] for j in jobs if j["arm"] is arm]
        steps = chosen[arm["family"]]["train_steps"]
        loss[arm["name"]] = dict(report.levelling([report.saved_loss_curve(f) for f in folders]),
                                 train_steps=steps, warmup=warmup(steps))
    target_rows = []
    if targets:
        for b, tg in enumerate(targets):
            ev = evaluator(plan, b, ctx)
            m = ev.measure(tg["x"].to(device), None)
            m.pop("fid_target", None)
            target_rows.append(dict(m, rate=float(tg["rate"]), mean_q=float(tg["mean_q"])))
    times["total_s"] = round(time.time() - t0, 1)
    command = "python -m experiments.benchmark " + " ".join(
        argv if argv is not None else sys.argv[1:])
    res = dict(
        command=command, machine=machine(device), task=plan["task"], preset=plan["preset"],
        tasks_task=plan["tasks_task"], settings=dict(plan["spec"], run=plan["run"],
                                                     ddpo=plan["ddpo"]),
        reward=evaluator(plan, 0, ctx).reward.name, tilt_class=plan["tilt_class"], bases=bases,
        classifier=clf, features=feats, arms=plan["arms"], reported_seeds=plan["seeds"],
        seed_base={str(s): s % plan["n_bases"] for s in plan["seeds"]}, budgets=plan["budgets"],
        n_i_table=plan["n_table"], ceilings=[{str(k): v for k, v in c.items()} for c in ceilings],
        tuning=tuning, chosen=chosen, evals=evals, loss=loss,
        real=[evaluator(plan, b, ctx).real_info for b in range(plan["n_bases"])],
        exact_target=target_rows, times=times, estimate=est)
    report.aggregate(res)
    if target_rows:
        keys = [k for k in target_rows[0] if target_rows[0][k] is not None]
        res["extra_rows"] = [dict(method="exact target (mean over bases)",
                                  **{k: sum(r[k] for r in target_rows) / len(target_rows)
                                     for k in keys})]
    report.plot_curves(res, os.path.join(plan["out"], "reward_vs_samples.png"))
    report.plot_tradeoff(res, os.path.join(plan["out"], "tradeoff.png"))
    if loss:
        report.plot_loss(res, os.path.join(plan["out"], "loss_curves.png"))
    common.atomic_json(os.path.join(plan["out"], "results.json"), res)
    md = report.results_md(res)
    with open(os.path.join(plan["out"], "results.md"), "w") as f:
        f.write(md)
    print(md)
    print(f"benchmark done in {times['total_s']:.0f}s; wrote {plan['out']}/results.md, "
          "results.json, reward_vs_samples.png, tradeoff.png, loss_curves.png")
    return res


if __name__ == "__main__":
    common.run_main(main)
