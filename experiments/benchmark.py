"""Benchmark: base vs GRAFT vs P-GRAFT (N_I/N 0.1, 0.25, 0.5, 0.75) at one sample budget, 3 seeds.

    python -m experiments.benchmark --preset cpu                     # mnist-pairs, 16x32: 25 min
    python -m experiments.benchmark --preset cpu --task mnist-weak   # 16x16, weak base: 8 min
    python -m experiments.benchmark --preset gpu --device cuda       # one H100, ~6 min (estimate)
    python -m experiments.benchmark --preset gpu --task celeba --data-dir data/celeba --device cuda

Every method fine-tunes the same cached base with the same reward, conditions, M, K, rounds and
number of generated samples; each seed changes the sampling and fine-tuning noise, never the base.
The runs are graft.main / pgraft.main with the project's flags (each writes its own folder with
metrics.jsonl: one eval row per round). Then each fine-tuned model (and the base) is evaluated on
fresh samples with the same noise: reward, accuracy (every requested digit / attribute right),
the classifier-feature FID proxy and diversity (eval/classifier_fid.py), and on CUDA the
Inception FID (eval/fid.py) on --fid-samples images.

Tasks (--task): mnist-pairs (two digits side by side conditioned on the ordered pair, 100
conditions: composition matters), mnist-weak (digits from a briefly pretrained base, no
guidance: it draws the requested digit about half the time), celeba (an unconditional base
fine-tuned towards attribute combinations it rarely meets, e.g. eyeglasses + smiling + not male).
Both MNIST tasks use 16 px digits (tasks mnist-pairs16, mnist16) and the small16 UNet; the gpu
preset pretrains the same bases and spends more samples per round, final evaluations of 10,000
samples and the Inception FID. The sizes are in SPECS; the run flags can be overridden.

Writes OUT/results.md, results.json (mean +- std over seeds; the headroom: base, accepted and
real-data reward; the answer to "does P-GRAFT reach GRAFT's final reward with at most half the
samples, and at which N_I?") and reward_vs_samples.png. The base, the classifier and the
reference statistics are cached under --cache, keyed by their settings. Default OUT:
runs/benchmark/<task>-<preset>.
"""

import hashlib
import json
import math
import os
import platform
import time

import numpy as np
import torch

import common
import graft
import pgraft
import pretrain
import rewards
from eval import classifier_fid
from models import model_from_checkpoint
from rewards.acceptance import condition_groups
from rewards.classifier import train_classifier
from tasks import UsageError, get_task

NI_FRACS = (0.1, 0.25, 0.5, 0.75)
BASE_EVAL_SAMPLES = 16  # pretrain.py's own sample grid of the cached base

# One entry per (benchmark task, preset). "task": the tasks.py task; "base": pretrain.py flags
# (the gpu preset pretrains the same bases as the cpu one: their quality was measured here);
# "classifier": the reward classifier's training; "run": graft/pgraft flags shared by every
# method; "final": the benchmark's own evaluation (samples; Inception FID samples, 0: none).
CPU_RUN = dict(
    prompts=100,
    M=4,
    K=1,
    rounds=4,
    train_steps=40,
    batch_size=32,
    lr=3e-4,
    ema_decay=0.9,
    sample_steps=10,
    eval_samples=200,
    sample_batch=400,
    sample_from="current",
)
GPU_RUN = dict(
    prompts=200,
    M=8,
    K=2,
    rounds=4,
    train_steps=40,
    batch_size=128,
    lr=3e-4,
    ema_decay=0.9,
    sample_steps=20,
    eval_samples=1000,
    sample_batch=1600,
    sample_from="current",
)
PAIRS_BASE = dict(
    preset="small16", train_steps=2000, batch_size=32, lr=1e-3, ema_decay=0.995, cond_drop=0.1
)
WEAK_BASE = dict(
    preset="small16", train_steps=500, batch_size=32, lr=1e-3, ema_decay=0.995, cond_drop=0.1
)
DIGITS = dict(steps=800, batch_size=128)
SPECS = {
    ("mnist-pairs", "cpu"): dict(
        task="mnist-pairs16",
        reward=None,
        base=PAIRS_BASE,
        classifier=DIGITS,
        run=CPU_RUN,
        final=dict(samples=400, fid_samples=0),
    ),
    ("mnist-pairs", "gpu"): dict(
        task="mnist-pairs16",
        reward=None,
        base=PAIRS_BASE,
        classifier=DIGITS,
        run=GPU_RUN,
        final=dict(samples=2000, fid_samples=10000),
    ),
    ("mnist-weak", "cpu"): dict(
        task="mnist16",
        reward=None,
        base=WEAK_BASE,
        classifier=DIGITS,
        run=dict(CPU_RUN, prompts=50, M=8, K=2),
        final=dict(samples=400, fid_samples=0),
    ),
    ("mnist-weak", "gpu"): dict(
        task="mnist16",
        reward=None,
        base=WEAK_BASE,
        classifier=DIGITS,
        run=dict(GPU_RUN, prompts=100, M=16, K=4),
        final=dict(samples=2000, fid_samples=10000),
    ),
    ("celeba", "cpu"): dict(  # a pipeline check (tests): CelebA needs a GPU
        task="celeba",
        reward="eyeglasses+smiling+not-male",
        base=dict(
            preset="tiny", train_steps=300, batch_size=16, lr=5e-4, ema_decay=0.99, cond_drop=0.0
        ),
        classifier=dict(steps=300, batch_size=64),
        run=dict(CPU_RUN, prompts=16, M=4, K=1, eval_samples=64, sample_batch=64),
        final=dict(samples=64, fid_samples=0),
    ),
    ("celeba", "gpu"): dict(  # not sized to 6 minutes: the 64x64 base alone takes longer
        task="celeba",
        reward="eyeglasses+smiling+not-male",
        base=dict(
            preset="celeba64",
            train_steps=30000,
            batch_size=128,
            lr=2e-4,
            ema_decay=0.999,
            cond_drop=0.0,
        ),
        classifier=dict(steps=6000, batch_size=128),
        run=dict(
            GPU_RUN,
            prompts=64,
            M=8,
            K=1,
            train_steps=300,
            batch_size=64,
            lr=5e-5,
            eval_samples=1000,
            sample_batch=256,
        ),
        final=dict(samples=2000, fid_samples=10000),
    ),
}
# Flags of the runs that the command line may override (the project's vocabulary).
RUN_FLAGS = (
    "prompts",
    "M",
    "K",
    "rounds",
    "train_steps",
    "batch_size",
    "lr",
    "ema_decay",
    "sample_steps",
    "eval_samples",
    "sample_batch",
    "sample_from",
)


def get_args(argv=None):
    p = common.Parser(__doc__.splitlines()[0])
    p.add_argument("--preset", choices=["cpu", "gpu"], default="cpu", help="sizes (SPECS)")
    p.add_argument(
        "--task",
        choices=sorted({t for t, _ in SPECS}),
        default="mnist-pairs",
        help="benchmark task",
    )
    p.add_argument("--out", default=None, help="output folder (runs/benchmark/<task>-<preset>)")
    p.add_argument(
        "--cache",
        default=os.path.join("runs", "benchmark", "cache"),
        help="where the base, the classifier and the reference statistics are cached",
    )
    p.add_argument("--seeds", type=common.pos_int, default=3, help="seeds 0..S-1 of every method")
    p.add_argument(
        "--n-i",
        default=",".join(str(v) for v in NI_FRACS),
        help="P-GRAFT's N_I values (fractions of N)",
    )
    p.add_argument(
        "--methods",
        default="graft,pgraft",
        help="comma list of graft, pgraft, ddpo "
        "(ddpo: runs ddpo.py with the same flags when that script exists)",
    )
    p.add_argument("--device", default="auto", help="cpu, cuda, ... (auto: cuda when available)")
    p.add_argument("--data-dir", default=None, help="the task's data (default: the task's own)")
    p.add_argument("--resume", action="store_true", help="continue runs that have a checkpoint")
    p.add_argument("--base", default=None, help="this base checkpoint, not the cached one")
    p.add_argument("--classifier", default=None, help="use this reward classifier checkpoint")
    p.add_argument(
        "--reward",
        default=None,
        help="reward name (default: the task's; celeba: eyeglasses+smiling+not-male)",
    )
    p.add_argument(
        "--base-steps",
        type=common.pos_int,
        default=None,
        help="pretraining steps of the cached base",
    )
    p.add_argument(
        "--classifier-steps",
        type=common.pos_int,
        default=None,
        help="training steps of the cached classifier",
    )
    p.add_argument(
        "--final-samples",
        type=common.pos_int,
        default=None,
        help="samples of the benchmark's final evaluation of each model",
    )
    p.add_argument(
        "--fid-samples",
        type=common.fid_int,
        default=-1,
        help="Inception FID samples in the final "
        "evaluation (-1: the preset's on CUDA, 0 on CPU; 0: none)",
    )
    p.add_argument("--bf16", action="store_true", help="bf16 autocast of the runs' networks (CUDA)")
    for k in RUN_FLAGS:
        kind = str if k == "sample_from" else (float if k in ("lr", "ema_decay") else int)
        p.add_argument(
            f"--{k.replace('_', '-')}",
            type=kind,
            default=None,
            choices=["ref", "current"] if k == "sample_from" else None,
            help=f"graft/pgraft --{k.replace('_', '-')} (default: the preset's)",
        )
    args = p.parse_args(argv)
    args.methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    bad = [m for m in args.methods if m not in ("graft", "pgraft", "ddpo")]
    if bad or not args.methods:
        p.error(f"--methods {','.join(bad) or '(empty)'}: choose from graft, pgraft, ddpo")
    return args


def settings(args, device):
    """The spec of (task, preset) with the command line's overrides applied."""
    spec = json.loads(json.dumps(SPECS[(args.task, args.preset)]))  # a deep copy
    for k in RUN_FLAGS:
        if getattr(args, k) is not None:
            spec["run"][k] = getattr(args, k)
    if args.base_steps:
        spec["base"]["train_steps"] = args.base_steps
    if args.classifier_steps:
        spec["classifier"]["steps"] = args.classifier_steps
    if args.final_samples:
        spec["final"]["samples"] = args.final_samples
    if args.fid_samples >= 0:
        spec["final"]["fid_samples"] = args.fid_samples
    elif device.type != "cuda":
        spec["final"]["fid_samples"] = 0
    if args.reward:
        spec["reward"] = args.reward
    spec["n_i"] = [float(v) for v in args.n_i.split(",")]
    return spec


def key_of(obj):
    return hashlib.sha1(json.dumps(obj, sort_keys=True).encode()).hexdigest()[:12]


def data_key(data_dir):
    return os.path.abspath(data_dir) if data_dir else None


# ---------------------------------------------------------------- cached base and classifier ----
def cached_classifier(args, spec, task, device):
    """The reward classifier, trained once per (classifier task, settings, data) under --cache."""
    if args.classifier:
        return args.classifier
    clf_task = "celeba" if task.name == "celeba" else rewards.digit_classifier_task(task)
    cfg = dict(task=clf_task, data=data_key(args.data_dir), **spec["classifier"])
    path = os.path.join(args.cache, f"classifier-{clf_task}-{key_of(cfg)}.pt")
    if not os.path.isfile(path):
        print(f"== benchmark: training the reward classifier {cfg} -> {path}", flush=True)
        train_classifier(
            clf_task,
            out=path,
            steps=cfg["steps"],
            batch_size=cfg["batch_size"],
            data_dir=args.data_dir,
            device="cuda" if device.type == "cuda" else "cpu",
        )
    return path


def cached_base(args, spec, task, device):
    """The reference model, pretrained once per (task, pretraining flags, data) under --cache."""
    if args.base:
        return args.base
    b = spec["base"]
    cfg = dict(task=task.name, data=data_key(args.data_dir), **b)
    out = os.path.join(args.cache, f"base-{task.name}-{key_of(cfg)}")
    path = os.path.join(out, "ckpt.pt")
    if os.path.isfile(os.path.join(out, "summary.json")) and os.path.isfile(path):
        return path
    argv = base_argv(args, spec, task, out) + (["--resume"] if os.path.isfile(path) else [])
    print(f"== benchmark: pretraining the base (python pretrain.py {' '.join(argv)})", flush=True)
    pretrain.main(argv)
    return path


def base_argv(args, spec, task, out):
    """pretrain.py's flags for the cached base (seed 0 for every benchmark seed)."""
    b = spec["base"]
    argv = [
        "--task",
        task.name,
        "--out",
        out,
        "--preset",
        b["preset"],
        "--train-steps",
        str(b["train_steps"]),
        "--batch-size",
        str(b["batch_size"]),
        "--lr",
        str(b["lr"]),
        "--ema-decay",
        str(b["ema_decay"]),
        "--eval-samples",
        str(BASE_EVAL_SAMPLES),
        "--fid-samples",
        "0",
        "--device",
        args.device,
        "--seed",
        "0",
    ]
    argv += ["--cond-drop", str(b["cond_drop"])] if task.conditional else []
    return argv + (["--data-dir", args.data_dir] if args.data_dir else [])


# ---------------------------------------------------------------- the runs ----
def run_argv(args, spec, task, base, clf, seed):
    r = spec["run"]
    argv = [
        "--task",
        task.name,
        "--base",
        base,
        "--classifier",
        clf,
        "--seed",
        str(seed),
        "--device",
        args.device,
        "--fid-samples",
        "0",
    ]
    argv += ["--reward", spec["reward"]] if spec["reward"] else []
    argv += ["--data-dir", args.data_dir] if args.data_dir else []
    argv += ["--bf16"] if args.bf16 else []
    argv += ["--resume"] if args.resume else []
    for k in RUN_FLAGS:
        argv += [f"--{k.replace('_', '-')}", str(r[k])]
    return argv


def run_methods(args, spec, task, base, clf, out):
    """Every method on every seed; returns {method: [run folder of seed 0, 1, ...]}."""
    folders, n_is = {}, None
    for seed in range(args.seeds):
        argv = run_argv(args, spec, task, base, clf, seed)
        sdir = os.path.join(out, f"seed{seed}")
        if "graft" in args.methods:
            print(f"== benchmark: GRAFT, seed {seed}", flush=True)
            graft.main(argv + ["--out", os.path.join(sdir, "graft")])
            folders.setdefault("GRAFT", []).append(os.path.join(sdir, "graft"))
        if "pgraft" in args.methods:
            print(f"== benchmark: P-GRAFT at N_I/N = {spec['n_i']}, seed {seed}", flush=True)
            s = pgraft.main(
                argv
                + [
                    "--out",
                    os.path.join(sdir, "pgraft"),
                    "--lemma-levels",
                    "none",
                    "--n-i",
                    ",".join(str(v) for v in spec["n_i"]),
                ]
            )
            n_is = [s["n_i"]] if isinstance(s["n_i"], int) else s["n_i"]
            for frac, n_i in zip(spec["n_i"], n_is):
                sub = (
                    os.path.join(sdir, "pgraft")
                    if len(n_is) == 1
                    else os.path.join(sdir, "pgraft", f"ni_{n_i}")
                )
                folders.setdefault(f"P-GRAFT N_I={frac:g}N", []).append(sub)
        if "ddpo" in args.methods:
            folders.setdefault("DDPO", []).append(run_ddpo(argv, os.path.join(sdir, "ddpo")))
    return folders


def run_ddpo(argv, out):
    """HOOK: DDPO (ddpo.py, the paper's policy-gradient baseline) with the same base, reward,
    conditions, M, rounds and sample budget. ddpo.py has no --K, --train-steps or --sample-from,
    and its --lr, --batch-size and --ema-decay mean other things (policy-gradient steps over
    transitions), so those are left at ddpo.py's defaults; everything else is passed as is.
    Raises a clear error when ddpo.py is absent."""
    try:
        import ddpo
    except ImportError:
        raise UsageError("--methods ddpo: ddpo.py is not in this checkout") from None
    drop = {"--K", "--train-steps", "--sample-from", "--ema-decay", "--lr", "--batch-size"}
    keep, skip = [], False
    for a in argv:
        if skip:
            skip = False
            continue
        if a in drop:
            skip = True
            continue
        keep.append(a)
    ddpo.main(keep + ["--out", out])
    return out


# ---------------------------------------------------------------- evaluation ----
def curve(folder):
    """[(samples generated, eval reward, eval accuracy)] of one run: the base, then each round."""
    s = json.load(open(os.path.join(folder, "summary.json")))
    acc_key = "all_correct" if "all_correct_base" in s else "accuracy"
    pts = [(0, s["reward_base"], s.get(f"{acc_key}_base"))]
    with open(os.path.join(folder, "metrics.jsonl")) as f:
        for line in f:
            row = json.loads(line)
            if "eval_reward_mean" in row:
                pts.append(
                    (row["samples_generated"], row["eval_reward_mean"], row.get(f"eval_{acc_key}"))
                )
    return pts


def round_stats(folder):
    """The first round's reward of all samples and of the accepted ones (the headroom)."""
    with open(os.path.join(folder, "metrics.jsonl")) as f:
        rows = [json.loads(line) for line in f if "reward_accepted_mean" in line]
    return rows[0] if rows else {}


@torch.no_grad()
def final_eval(
    model_path, n_i, ref, process, task, reward, spec, seed, device, data, fid, ref_stats
):
    """Fresh samples of a fine-tuned model (EMA weights; P-GRAFT: N -> N_I, then the reference) or
    of the base (model_path None), with noise that depends on the seed only."""
    net = ref
    if model_path is not None:
        net = model_from_checkpoint(os.path.join(model_path, "ckpt.pt"), device)[0]
        net = pgraft.stitched(net, ref, process.N, n_i)
    r = spec["run"]
    n = max(spec["final"]["samples"], spec["final"]["fid_samples"])
    gen = common.generator(10_000_019 + seed, device)
    y = task.sample_conditions(n, gen, device, data) if task.conditional else None
    xs = []
    for i in range(0, n, r["sample_batch"]):
        b = min(r["sample_batch"], n - i)
        x = torch.randn((b, *task.shape()), generator=gen, device=device)
        x, _ = process.sample(
            net,
            x,
            None,
            0,
            y[i : i + b] if y is not None else None,
            gen,
            1.0,
            r["sample_steps"],
            clip=True,
        )
        xs.append(x.clamp(-1, 1))
    x = torch.cat(xs)
    m = spec["final"]["samples"]
    xm, ym = x[:m], (y[:m] if y is not None else None)
    rew = rewards.score(reward, xm, ym, 1000)
    met = reward.metrics(xm, ym)
    feats = classifier_fid.features(reward, xm)
    out = dict(
        reward=rew.mean().item(),
        accuracy=met.get("all_correct", met.get("accuracy")),
        cfid=classifier_fid.fid_from_features(feats, ref_stats),
        diversity=classifier_fid.diversity(feats, condition_groups(ym)),
    )
    if fid is not None:
        out["fid"] = fid(x)
    return out


def real_reference(task, reward, data_dir, n, device):
    """Real images of the task's held-out split and their conditions: the reward and accuracy of
    real data (the reachable level) and the images for the reference statistics. CelebA with
    named attributes: the held-out images that have them (by their labels)."""
    split = "val" if task.name == "celeba" else "test"
    ds = task.dataset(split, data_dir)
    if hasattr(ds, "tensors"):
        x, y = ds.tensors[0][:n], ds.tensors[1][:n]
    else:  # CelebA: read at most n images
        idx = range(min(n, len(ds)))
        x = torch.stack([ds[i][0] for i in idx])
        y = torch.stack([ds[i][1] for i in idx])
    x, y = x.to(device), y.to(device)
    cond = y if task.conditional else None
    ref_x = x
    if getattr(reward, "idx", None) is not None:  # named attributes: keep the images that have them
        has = ((y[:, reward.idx] * reward.sign) > 0).all(1)
        x, cond = x[has], None
    if len(x) == 0:
        return ref_x, split, dict(reward=None, accuracy=None)
    met = reward.metrics(x, cond)
    return (
        ref_x,
        split,
        dict(
            reward=rewards.score(reward, x, cond).mean().item(),
            accuracy=met.get("all_correct", met.get("accuracy")),
            n=len(x),
        ),
    )


def inception_fid(task, n, device, data_dir, cache_dir):
    """x -> the Inception FID (eval/fid.py, fp32) of x[:n] against n images of the task's train
    split (a fixed random subset when the split is larger; statistics cached in cache_dir)."""
    from eval.fid import FIDEvaluator, frechet_distance

    ev = FIDEvaluator(
        device=str(device), batch_size=250 if device.type == "cuda" else 16, cache_dir=cache_dir
    )
    ref = ev.reference_stats(task.name, split="train", num_images=n, data_dir=data_dir)

    def fid(x):
        mu, sigma, _ = ev.stats(x[:n])
        return float(frechet_distance(mu, sigma, *ref))

    return fid


def real_floor(task, reward, data_dir, n, device, ref_stats):
    """Classifier FID and diversity of n real images of another held-out split (val) against the
    reference statistics: what a perfect model would score with this many samples."""
    if task.name == "celeba":
        return dict(cfid=None, diversity=None)
    x, y = task.dataset("val", data_dir).tensors
    x, y = x[:n].to(device), y[:n].to(device)
    feats = classifier_fid.features(reward, x)
    return dict(
        cfid=classifier_fid.fid_from_features(feats, ref_stats),
        diversity=classifier_fid.diversity(feats, y),
        floor_n=len(x),
    )


def mean_std(vals):
    v = [x for x in vals if x is not None and math.isfinite(x)]
    if not v:
        return None, None
    return float(np.mean(v)), (float(np.std(v, ddof=1)) if len(v) > 1 else 0.0)


def answer_question(curves, total):
    """Does P-GRAFT reach GRAFT's final reward (mean over seeds) with at most half the samples?
    For each N_I: the first round whose mean reward >= GRAFT's final mean; the gap at half the
    budget, as a difference of means and paired by seed (within a seed every run is evaluated on
    the same noise, so the paired gap removes the evaluation noise that the seeds share)."""
    if "GRAFT" not in curves:
        return dict(text="GRAFT was not run: no answer."), []
    g = curves["GRAFT"]
    target, target_sd = g["reward_mean"][-1], g["reward_std"][-1]
    g_final = [r[-1] for r in g["reward_seeds"]]
    half = total / 2
    rows = []
    for name, c in curves.items():
        if not name.startswith("P-GRAFT"):
            continue
        reach = next(
            (s for s, m in zip(c["samples"], c["reward_mean"]) if s > 0 and m >= target), None
        )
        at_half = [i for i, s in enumerate(c["samples"]) if 0 < s <= half]
        i = at_half[-1] if at_half else None
        paired = [p[i] - gf for p, gf in zip(c["reward_seeds"], g_final)] if i is not None else []
        paired_final = [p[-1] - gf for p, gf in zip(c["reward_seeds"], g_final)]
        rows.append(
            dict(
                method=name,
                samples_to_reach=reach,
                fraction=None if reach is None else reach / total,
                samples_at_half=None if i is None else c["samples"][i],
                reward_at_half=None if i is None else c["reward_mean"][i],
                std_at_half=None if i is None else c["reward_std"][i],
                gap_at_half=None if i is None else c["reward_mean"][i] - target,
                paired_gap_at_half=mean_std(paired)[0],
                paired_gap_at_half_std=mean_std(paired)[1],
                final_gap=c["reward_mean"][-1] - target,
                paired_final_gap_std=mean_std(paired_final)[1],
                holds=reach is not None and reach <= half,
            )
        )
    if not rows:
        return dict(
            text="P-GRAFT was not run: no answer.",
            graft_final=target,
            graft_final_std=target_sd,
            total=total,
        ), []
    hits = [r for r in rows if r["holds"]]
    pool = hits or [r for r in rows if r["gap_at_half"] is not None]
    best = max(pool, key=lambda r: r["gap_at_half"]) if pool else None
    if hits:
        text = (
            f"YES at {', '.join(r['method'] for r in hits)}: GRAFT's final mean reward "
            f"{target:.4f} (+- {target_sd:.4f} over seeds) after {total} samples is reached by "
            f"{best['method']} after {best['samples_to_reach']} samples."
        )
    else:
        text = (
            f"NO: no P-GRAFT N_I reaches GRAFT's final mean reward {target:.4f} (+- "
            f"{target_sd:.4f} over seeds, {total} samples) within half the budget "
            f"({half:g} samples)."
        )
    if best is not None:
        word = "above" if best["gap_at_half"] >= 0 else "below"
        text += (
            f" {'Best' if hits else 'Closest'} at half the budget: {best['method']}, "
            f"{abs(best['gap_at_half']):.4f} {word} GRAFT's final (paired by seed: "
            f"{best['paired_gap_at_half']:+.4f} +- {best['paired_gap_at_half_std']:.4f}); "
            f"after the full budget it ends {best['final_gap']:+.4f} from GRAFT."
        )
    return dict(text=text, graft_final=target, graft_final_std=target_sd, total=total), rows


def aggregate_curves(folders):
    out = {}
    for name, runs in folders.items():
        pts = [curve(f) for f in runs]
        n = min(len(p) for p in pts)
        out[name] = dict(samples=[pts[0][i][0] for i in range(n)])
        for j, key in ((1, "reward"), (2, "accuracy")):
            ms = [mean_std([p[i][j] for p in pts]) for i in range(n)]
            out[name][f"{key}_mean"] = [m for m, _ in ms]
            out[name][f"{key}_std"] = [s for _, s in ms]
            out[name][f"{key}_seeds"] = [[p[i][j] for i in range(n)] for p in pts]
    return out


def plot(curves, path, title):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for ax, key in zip(axes, ("reward", "accuracy")):
        for i, (name, c) in enumerate(curves.items()):
            m = np.array([np.nan if v is None else v for v in c[f"{key}_mean"]], dtype=float)
            s = np.array([0.0 if v is None else v for v in c[f"{key}_std"]], dtype=float)
            style = "o-" if name == "GRAFT" else ("s--" if name == "DDPO" else ".-")
            ax.plot(
                c["samples"], m, style, color=f"C{i}", label=name, lw=2 if name == "GRAFT" else 1.2
            )
            ax.fill_between(c["samples"], m - s, m + s, color=f"C{i}", alpha=0.12)
        ax.set(
            xlabel="samples generated (0: the base)", ylabel=f"eval {key} (mean +- std over seeds)"
        )
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=7)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def machine(device):
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return (
        f"{platform.processor() or platform.machine()} CPU, {os.cpu_count()} cores, "
        f"torch threads {torch.get_num_threads()}"
    )


def main(argv=None):
    args = get_args(argv)
    t0 = time.time()
    device = common.pick_device(args.device)
    spec = settings(args, device)
    task = get_task(spec["task"])
    out = args.out or os.path.join("runs", "benchmark", f"{args.task}-{args.preset}")
    common.check_out(out)
    common.check_out(args.cache, "--cache")
    common.print_derived(
        f"benchmark {args.task} ({args.preset} preset)",
        task=task.name,
        device=device,
        seeds=args.seeds,
        methods=args.methods,
        n_i=spec["n_i"],
        base=spec["base"],
        classifier=spec["classifier"],
        run=spec["run"],
        final=spec["final"],
        samples_per_method=spec["run"]["prompts"] * spec["run"]["M"] * spec["run"]["rounds"],
        out=out,
    )
    clf = cached_classifier(args, spec, task, device)
    t_clf = time.time() - t0
    base = cached_base(args, spec, task, device)
    t_base = time.time() - t0 - t_clf
    folders = run_methods(args, spec, task, base, clf, out)
    t_runs = time.time() - t0 - t_clf - t_base

    # ---- the benchmark's own evaluation of every model, with the same noise per seed
    ref, process, _ = common.load_base(base, device, task=task)
    conditional = bool(ref.config.get("num_classes") or ref.config.get("cond_dim"))
    reward = rewards.get_reward(spec["reward"], task, device, conditional, args.data_dir, clf)
    data = task.dataset("train", args.data_dir) if ref.config.get("cond_dim") else None
    n_real = 10_000 if task.name != "celeba" else max(2 * spec["final"]["samples"], 500)
    real_x, split, real = real_reference(task, reward, args.data_dir, n_real, device)
    ref_stats = classifier_fid.reference_stats(
        reward,
        real_x,
        dict(
            task=task.name,
            split=split,
            n=len(real_x),
            data=data_key(args.data_dir),
            reward=reward.name,
        ),
        cache_dir=os.path.join(args.cache, "classifier_fid"),
    )
    real.update(
        real_floor(task, reward, args.data_dir, spec["final"]["samples"], device, ref_stats)
    )
    fid = None
    if spec["final"]["fid_samples"] > 0:
        fid = inception_fid(
            task,
            spec["final"]["fid_samples"],
            device,
            args.data_dir,
            os.path.join(args.cache, "fid"),
        )
    n_i_of = {}
    for name, runs in folders.items():
        for f in runs:
            s = json.load(open(os.path.join(f, "summary.json")))
            n_i_of[f] = s.get("n_i", 0) if s.get("method") == "pgraft" else 0
    evals = {
        "base": [
            final_eval(
                None, 0, ref, process, task, reward, spec, seed, device, data, fid, ref_stats
            )
            for seed in range(args.seeds)
        ]
    }
    for name, runs in folders.items():
        print(f"== benchmark: final evaluation of {name}", flush=True)
        evals[name] = [
            final_eval(
                f, n_i_of[f], ref, process, task, reward, spec, seed, device, data, fid, ref_stats
            )
            for seed, f in enumerate(runs)
        ]
    t_eval = time.time() - t0 - t_clf - t_base - t_runs

    # ---- tables, curves, the answer
    total = spec["run"]["prompts"] * spec["run"]["M"] * spec["run"]["rounds"]
    cols = ["reward", "accuracy", "cfid", "diversity"] + (["fid"] if fid is not None else [])
    table = []
    for name, ev in evals.items():
        row = dict(method=name, samples=0 if name == "base" else total)
        for c in cols:
            row[c], row[f"{c}_std"] = mean_std([e.get(c) for e in ev])
        table.append(row)
    curves = aggregate_curves(folders)
    answer, answer_rows = answer_question(curves, total)
    graft_runs = folders.get("GRAFT") or next(iter(folders.values()))
    r1 = [round_stats(f) for f in graft_runs]
    headroom = dict(
        base_reward=table[0]["reward"],
        base_accuracy=table[0]["accuracy"],
        round1_all_reward=mean_std([r.get("reward_all_mean") for r in r1])[0],
        accepted_reward=mean_std([r.get("reward_accepted_mean") for r in r1])[0],
        real_reward=real["reward"],
        real_accuracy=real["accuracy"],
        real_split=split,
        max_reward=0.0,
    )
    wall = time.time() - t0
    times = dict(
        classifier_s=round(t_clf, 1),
        base_s=round(t_base, 1),
        runs_s=round(t_runs, 1),
        final_eval_s=round(t_eval, 1),
        total_s=round(wall, 1),
    )
    command = "python -m experiments.benchmark " + " ".join(
        argv if argv is not None else __import__("sys").argv[1:]
    )
    plot(
        curves,
        os.path.join(out, "reward_vs_samples.png"),
        f"{args.task} ({task.name}), {args.preset} preset: {spec['run']['prompts']} conditions x "
        f"M={spec['run']['M']}, top-{spec['run']['K']}, {spec['run']['rounds']} rounds, "
        f"{args.seeds} seeds",
    )
    result = dict(
        command=command,
        machine=machine(device),
        task=args.task,
        tasks_task=task.name,
        preset=args.preset,
        seeds=args.seeds,
        settings=spec,
        base=base,
        classifier=clf,
        reward=reward.name,
        table=table,
        curves=curves,
        answer=answer,
        answer_rows=answer_rows,
        headroom=headroom,
        real=real,
        times=times,
        runs=folders,
        evals=evals,
    )
    common.atomic_json(os.path.join(out, "results.json"), result)
    md = results_md(result, cols)
    with open(os.path.join(out, "results.md"), "w") as f:
        f.write(md)
    print(md)
    print(
        f"benchmark done in {wall:.0f}s; wrote {out}/results.md, results.json, "
        f"reward_vs_samples.png"
    )
    return result


def results_md(res, cols):
    fmt = lambda v, d=4: "-" if v is None else f"{v:.{d}f}"  # noqa: E731
    names = dict(
        reward="reward",
        accuracy="accuracy",
        cfid="classifier FID",
        diversity="diversity",
        fid="Inception FID",
    )
    lines = [
        f"# Benchmark {res['task']} ({res['tasks_task']}), {res['preset']} preset",
        "",
        f"command: `{res['command']}`  ",
        f"machine: {res['machine']}  ",
        f"wall time: {res['times']['total_s']:.0f} s ({res['times']})",
        "",
        "| method | samples | " + " | ".join(names[c] for c in cols) + " |",
        "|---|---|" + "---|" * len(cols),
    ]
    for r in res["table"]:
        lines.append(
            f"| {r['method']} | {r['samples']} | "
            + " | ".join(f"{fmt(r[c])} +- {fmt(r[c + '_std'])}" for c in cols)
            + " |"
        )
    h = res["headroom"]
    lines += [
        "",
        f"Mean +- std over {res['seeds']} seeds of the final evaluation "
        f"({res['settings']['final']['samples']} fresh samples per model, the same noise for "
        "every model of a seed). Accuracy: every requested digit / attribute right.",
        "",
        "Headroom: base reward {0}, first round's samples {1}, accepted samples {2}, real "
        "{3} data {4} (accuracy {5}), maximum {6}.".format(
            fmt(h["base_reward"]),
            fmt(h["round1_all_reward"]),
            fmt(h["accepted_reward"]),
            h["real_split"],
            fmt(h["real_reward"]),
            fmt(h["real_accuracy"]),
            fmt(h["max_reward"], 1),
        ),
        "Real data (val split, as many images as the final evaluation): classifier FID "
        f"{fmt(res['real'].get('cfid'))}, diversity {fmt(res['real'].get('diversity'))}.",
        "",
        "Does P-GRAFT reach GRAFT's final reward with at most half the samples? "
        + res["answer"]["text"],
        "",
        "| P-GRAFT | samples to reach GRAFT's final | fraction of budget | reward at half "
        "budget - GRAFT final (paired by seed) | final - GRAFT final (paired) |",
        "|---|---|---|---|---|",
    ]
    for r in res["answer_rows"]:
        lines.append(
            f"| {r['method']} | {r['samples_to_reach'] or 'not reached'} | "
            f"{fmt(r['fraction'], 2)} | {fmt(r['paired_gap_at_half'])} +- "
            f"{fmt(r['paired_gap_at_half_std'])} | {fmt(r['final_gap'])} +- "
            f"{fmt(r['paired_final_gap_std'])} |"
        )
    lines += [
        "",
        "Curves: mean +- std over seeds of each run's own evaluation after each round "
        "(--eval-samples samples on a fixed noise per seed; the base is the point at 0). The "
        "paired gaps are per-seed differences (same evaluation noise) averaged over seeds.",
    ]
    lines += [
        "",
        "Reward against samples generated (the runs' own evaluation after each round): "
        "reward_vs_samples.png",
        "",
    ]
    return "\n".join(lines)


if __name__ == "__main__":
    common.run_main(main)
