"""P-GRAFT: shape the intermediate distribution at step N_I, let the frozen reference finish.

    python pgraft.py                              # toy2d, N_I = 0.25 N; pretrains a missing base
    python pgraft.py --n-i 0,0.1,0.25,0.5,0.75    # sweep: final reward (and FID) against N_I
    python pgraft.py --loss x0                    # plain loss on accepted X_0, n > N_I (comparison)
    python pgraft.py --task mnist --n-i 0.25,0.5  # class-conditional MNIST, reward log p(label | x)
    python pgraft.py --task celeba --device cuda --bf16   # GPU preset: 4 rounds of 256 x 8 samples

Each round (paper, P-GRAFT): 1. the sampling model runs N -> 0 storing X_{N_I} -> 2. reward on X_0
->
3. accept by the GRAFT rule (rewards/acceptance.py) -> 4. fine-tune a copy of the reference on the
kept states X_{N_I} with the bridge loss, steps n in (N_I, N] only -> 5. evaluate: the fine-tuned
model runs N -> N_I, the frozen reference N_I -> 0 -> 6. checkpoint. The continuation must be
stochastic (DDPM, or DDIM with eta > 0): otherwise X_0 is a function of X_{N_I} and the method is
GRAFT again, so eta = 0 is refused.

This file is a deliberate copy of graft.py's round with the P-GRAFT lines changed: at N_I = 0 it
reproduces graft.py's accepted set, weights and summary exactly (tests/test_pgraft.py). It also
writes the Lemma 4.3 diagnostic E[Var(r(X_0) | X_t)] (OUT/lemma43.json/.png) and, for a list of N_I,
OUT/sweep.md/.csv/.png with a sub-folder ni_<N_I> per run. Default OUT: runs/pgraft/<task>-<accept>.
"""

import copy
import os

import torch
from torch.utils.data import TensorDataset

import common
import rewards
from eval import lemma43
from eval.metrics import FID, evaluate_samples
from models import EMA, lr_at, model_from_checkpoint, save_checkpoint
from rewards.acceptance import RULES, AcceptRule, condition_groups, kl_proxy
from tasks import Batches, UsageError, get_task

# Per-task overrides of the defaults in get_args (graft.py's, plus the diagnostic's states).
# fmt: off
IMAGE = dict(prompts=64, rounds=2, sample_steps=100, train_steps=1000, batch_size=16, lr=2e-5,
             ema_decay=0.999, eval_samples=256, sample_batch=32, lemma_states=16)
TASK_DEFAULTS = {
    "toy2d": dict(prompts=1000, rounds=1, sample_steps=200, train_steps=1000, batch_size=512,
                  lr=1e-3, ema_decay=0.99, eval_samples=5000, sample_batch=4000, lemma_states=256),
    "mnist": dict(prompts=200, rounds=2, sample_steps=100, train_steps=600, batch_size=128,
                  lr=1e-4, ema_decay=0.995, eval_samples=1000, sample_batch=800, lemma_states=16),
    "celeba": dict(prompts=256, rounds=4, sample_steps=100, train_steps=2000, batch_size=64,
                   lr=5e-5, ema_decay=0.999, eval_samples=1000, sample_batch=256, lemma_states=16),
    "celebahq": IMAGE, "church": IMAGE,
}
# the digit tasks of the benchmark (experiments/benchmark.py) start from MNIST's settings
TASK_DEFAULTS["mnist16"] = TASK_DEFAULTS["mnist-pairs16"] = TASK_DEFAULTS["mnist"]
TASK_DEFAULTS["mnist-pairs"] = TASK_DEFAULTS["mnist"]
# fmt: on
# Flags that may differ between a run and its --resume (--lr: resume a diverged run with a
# lower one); every other flag must match the checkpoint's.
MAY_CHANGE = (
    "out",
    "device",
    "compile",
    "data_dir",
    "lr",
    "rounds",
    "eval_samples",
    "fid_samples",
    "lemma_levels",
    "lemma_states",
    "lemma_continuations",
)
LOG_EVERY = 100  # fine-tuning steps per logged loss (one host sync each)


def get_args(argv=None):
    p = common.parser(__doc__.splitlines()[0], TASK_DEFAULTS)
    common.add_run_args(p)
    p.add_argument(
        "--base",
        default=None,
        help="reference DDPM checkpoint (None: runs/pretrain/<task>-ddpm/ckpt.pt, "
        "pretrained first with pretrain.py's defaults when absent)",
    )
    p.add_argument(
        "--reward",
        default=None,
        help="reward (None: toy2d linear, mnist digit, celeba attributes or "
        "smiling, others jpeg): linear[:DEG], digit[:K], attributes, <celeba attribute>[+...], "
        "jpeg, "
        "jpeg-incompressibility",
    )
    p.add_argument(
        "--classifier",
        default=None,
        help="reward classifier checkpoint (None: "
        "runs/rewards/<task>-classifier.pt, trained first when absent)",
    )
    p.add_argument(
        "--accept",
        choices=RULES,
        default="topk",
        help="acceptance rule: top-K of M per condition "
        "(RAFT), best-of-N (N = --M), reward >= --tau, or rejection sampling w.p. exp((r - "
        "r_max)/alpha)",
    )
    p.add_argument(
        "--M", type=common.pos_int, default=8, help="samples drawn per condition per round"
    )
    p.add_argument(
        "--K", type=common.pos_int, default=2, help="top-K keeps the K best of each condition's M"
    )
    p.add_argument(
        "--tau",
        type=common.finite_float,
        default=None,
        help="reward threshold of --accept threshold",
    )
    p.add_argument(
        "--alpha",
        type=common.pos_float,
        default=1.0,
        help="temperature: rs accepts w.p. "
        "exp((r - r_max)/alpha); r_hat = alpha log P(accept | x) for every rule",
    )
    p.add_argument(
        "--prompts",
        type=common.pos_int,
        default=1000,
        help="conditions per round (labels cycle 0..9 "
        "on MNIST; real attribute rows on CelebA; toy2d is unconditional)",
    )
    p.add_argument(
        "--rounds", type=common.pos_int, default=1, help="sample -> accept -> fine-tune rounds"
    )
    p.add_argument(
        "--sample-from",
        choices=["ref", "current"],
        default="ref",
        help="ref: every round samples the frozen reference and the pool of kept states grows; "
        "current: each round samples the stitched model so far and trains on that round's states "
        "only",
    )
    p.add_argument(
        "--sampler",
        choices=["ddpm", "ddim"],
        default="ddpm",
        help="ddpm: ancestral (eta = 1); ddim: generalised DDIM with --eta (> 0: P-GRAFT needs "
        "noise)",
    )
    p.add_argument(
        "--eta",
        type=common.nonneg_float,
        default=1.0,
        help="DDIM eta of --sampler ddim (--sampler ddpm is eta = 1 and refuses another --eta)",
    )
    p.add_argument(
        "--sample-steps",
        type=common.pos_int,
        default=200,
        help="sampler steps over the N-step chain",
    )
    p.add_argument(
        "--cfg-scale",
        type=common.nonneg_float,
        default=0.0,
        help="classifier-free guidance weight w: "
        "eps_u + (1 + w)(eps_c - eps_u); needs a base pretrained with --cond-drop > 0",
    )
    p.add_argument(
        "--train-steps",
        type=common.pos_int,
        default=1000,
        help="fine-tuning optimiser steps per round",
    )
    p.add_argument("--batch-size", type=common.pos_int, default=512, help="fine-tuning minibatch")
    p.add_argument(
        "--lr", type=common.pos_float, default=1e-3, help="fine-tuning peak AdamW learning rate"
    )
    p.add_argument(
        "--warmup",
        type=common.nonneg_int,
        default=50,
        help="linear LR warm-up steps of each round (at most half the round's steps)",
    )
    p.add_argument(
        "--ema-decay",
        type=common.unit_float,
        default=0.99,
        help="EMA decay of the fine-tuned weights (warmed up as min(d, (1+s)/(10+s)))",
    )
    p.add_argument(
        "--grad-clip", type=common.nonneg_float, default=1.0, help="clip the gradient norm (0: off)"
    )
    p.add_argument(
        "--eval-samples", type=common.pos_int, default=5000, help="fresh samples per evaluation"
    )
    p.add_argument(
        "--fid-samples",
        type=common.fid_int,
        default=-1,
        help="samples for FID of image tasks (-1: 5000 on CUDA, 0 on CPU; 0: none)",
    )
    p.add_argument(
        "--sample-batch",
        type=common.pos_int,
        default=4000,
        help="samples per sampler call (memory)",
    )
    # P-GRAFT's own flags
    p.add_argument(
        "--n-i",
        default="0.25",
        help="N_I as a fraction of N in [0, 1) or an integer step; a comma list "
        "runs a sweep (table and plot of final reward and FID against N_I). N_I = 0 is plain GRAFT",
    )
    p.add_argument(
        "--loss",
        choices=["bridge", "x0"],
        default="bridge",
        help="bridge: the bridge loss on stored X_{N_I} (P-GRAFT); x0: plain loss on accepted X_0 "
        "restricted to n > N_I (comparison)",
    )
    p.add_argument(
        "--lemma-levels",
        default="0.1,0.25,0.5,1.0",
        help="noise levels t (fractions of N or steps) of "
        "the Lemma 4.3 diagnostic E[Var(r(X_0) | X_t)], plus each N_I; 'none' skips it",
    )
    p.add_argument(
        "--lemma-states", type=common.pos_int, default=256, help="states X_t of the diagnostic"
    )
    p.add_argument(
        "--lemma-continuations",
        type=common.pos_int,
        default=8,
        help="stochastic continuations per state (>= 2)",
    )
    args, given = common.parse(p, argv, TASK_DEFAULTS, MAY_CHANGE)
    if args.sampler == "ddpm" and "eta" in given and args.eta != 1.0:
        p.error(
            f"--eta {args.eta} with --sampler ddpm: ancestral sampling is eta = 1; use --sampler "
            f"ddim --eta "
            f"{args.eta}"
        )
    if args.sampler == "ddim" and args.eta == 0:
        p.error(
            "P-GRAFT needs a stochastic continuation N_I -> 0, but --sampler ddim --eta 0 is "
            "deterministic: X_0 "
            "would be a function of X_{N_I} and P-GRAFT would collapse to GRAFT; use --sampler "
            "ddpm or --eta > 0"
        )
    if args.lemma_continuations < 2:
        p.error("--lemma-continuations must be >= 2 (a variance needs two continuations)")
    return args


def parse_steps(spec, N, flag, allow_n=False):
    """'0.25' or '0,0.1,0.5' or '50': values in [0, 1) are fractions of N, integers >= 1 are
    steps."""
    out = []
    for item in str(spec).split(","):
        try:
            v = float(item)
        except ValueError:
            raise UsageError(
                f"{flag} {spec!r}: expected numbers (fractions of N in [0, 1) or integer steps)"
            ) from None
        if v == 1.0 and allow_n:
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


def bridge_loss(net, x_ni, y, n_i, process, gen, rows=None):
    """ALGORITHM (paper, P-GRAFT, training): the bridge loss on kept states X_{N_I}, n ~ U(N_I, N]:
        x_n = a_n X_{N_I} + s_n eps,  a_n = sqrt(abar_n / abar_{N_I}),  s_n = sqrt(1 - abar_n /
        abar_{N_I}), loss = || (s_n / sqrt(1 - abar_n)) eps_theta(x_n, n) - eps ||^2.
    Its minimiser is the reference's eps-prediction of the tilted law of X_{N_I}; at N_I = 0 it is
    the plain eps loss, draw for draw. ``rows``: as in DDPM.loss (torchrun: this rank's rows)."""
    N = process.N
    n = torch.randint(n_i + 1, N + 1, (x_ni.shape[0],), generator=gen, device=x_ni.device)
    eps = torch.randn(x_ni.shape, generator=gen, device=x_ni.device, dtype=x_ni.dtype)
    if rows is not None:
        x_ni, n, eps, y = x_ni[rows], n[rows], eps[rows], (y[rows] if y is not None else None)
    ab_n = process.abar(n, x_ni)
    ratio = ab_n / process.alpha_bar[n_i].item()
    a_n, s_n = ratio.sqrt(), (1 - ratio).sqrt()
    pred = net(a_n * x_ni + s_n * eps, n.float() / N, y)
    return ((s_n / (1 - ab_n).sqrt()) * pred - eps).pow(2).mean()


def stitched(finetuned, ref_net, N, n_i):
    """ALGORITHM (paper, P-GRAFT, inference): the fine-tuned model runs N -> N_I, the frozen
    reference N_I -> 0."""
    return finetuned if n_i == 0 else [(finetuned, N, n_i), (ref_net, n_i, 0)]


def main(argv=None):
    args = get_args(argv)
    task = get_task(args.task)
    dist = common.Dist(
        common.pick_device(args.device)
    )  # torchrun: this rank; a plain process: rank 0 of 1
    device = dist.device
    dist.check_batch(args.batch_size)
    args.out = args.out or os.path.join("runs", "pgraft", f"{task.name}-{args.accept}")
    common.check_out(args.out)
    rule = AcceptRule(args.accept, args.M, args.K, args.tau, args.alpha)
    args.K = rule.K
    torch.manual_seed(args.seed)

    # ---- the frozen reference and the reward, shared by every N_I; checked before --out is touched
    base_path = common.ensure_base(
        args.base, task, "ddpm", seed=args.seed, device=args.device, data_dir=args.data_dir
    )
    ref, process, base_ckpt = common.load_base(base_path, device, task=task)
    conditional = common.check_ddpm_reference(
        ref, process, base_ckpt, base_path, args.sample_steps, args.cfg_scale, "P-GRAFT"
    )
    n_is = parse_steps(args.n_i, process.N, "--n-i")
    levels = (
        []
        if args.lemma_levels == "none"
        else parse_steps(args.lemma_levels, process.N, "--lemma-levels", True)
    )
    reward = rewards.get_reward(
        args.reward, task, device, conditional, args.data_dir, args.classifier
    )
    args.reward = reward.name
    base = dict(
        path=base_path,
        ref=ref,
        process=process,
        ckpt=base_ckpt,
        conditional=conditional,
        reward=reward,
        data=task.dataset("train", args.data_dir) if ref.config.get("cond_dim") else None,
    )
    # (args, N_I, checkpoint to resume or None) of each run; every resume is checked up front
    runs = []
    for n_i in n_is:
        sub = copy.deepcopy(args)
        if len(n_is) > 1:
            sub.out = os.path.join(args.out, f"ni_{n_i}")
        runs.append(
            (sub, n_i, common.load_resume(os.path.join(sub.out, "ckpt.pt"), sub, MAY_CHANGE))
        )

    for sub, _, ckpt in runs:  # no earlier run is overwritten, not even by the diagnostic below
        common.check_fresh(sub.out, sub.resume)
    top = common.RunLog(args.out, args, write=dist.main) if len(n_is) > 1 else None
    lemma = None
    if (
        levels and dist.main
    ):  # Lemma 4.3: E[Var(r(X_0) | X_t)] of the reference at each level t and each N_I
        levels = sorted(set(levels) | set(n_is))
        eta = 1.0 if args.sampler == "ddpm" else args.eta
        gen = common.generator(args.seed + 31337, device)
        y = (
            task.sample_conditions(args.lemma_states, gen, device, base["data"])
            if conditional
            else None
        )
        res = lemma43.conditional_reward_variance(
            common.wrap_net(ref, args.bf16, args.compile),
            process,
            task,
            reward,
            levels,
            args.lemma_states,
            args.lemma_continuations,
            gen,
            y=y,
            eta=eta,
            sample_steps=args.sample_steps,
            sample_batch=args.sample_batch,
        )
        os.makedirs(args.out, exist_ok=True)
        lemma = lemma43.write(
            res,
            args.out,
            process.N,
            n_is,
            args.lemma_states,
            args.lemma_continuations,
            f"Lemma 4.3 on {task.name}, reward {reward.name}",
        )
        print(
            "Lemma 4.3 diagnostic E[Var(r(X_0) | X_t)]: "
            + ", ".join(f"t={t}: {m:.4g}+-{se:.2g}" for t, (m, se) in res.items())
        )
    rows, base_eval = [], None
    for sub, n_i, ckpt in runs:
        if len(n_is) > 1:
            print(f"== sweep: N_I = {n_i}")
        s = run(sub, n_i, ckpt, task, dist, rule, base, base_eval, lemma)
        base_eval = s.pop("_base_eval")
        rows.append(s)
    if top is None:
        return rows[0]
    if not dist.main:  # torchrun: rank 0 writes the table
        return dict(n_i=n_is, reward_final=[r["reward_final"] for r in rows])
    return sweep_table(top, args, rows, n_is, process.N, lemma)


def run(args, n_i, ckpt, task, dist, rule, base, base_eval, lemma):
    """One P-GRAFT run at N_I = n_i: the round loop of graft.py with the P-GRAFT lines."""
    device = dist.device
    process, ref, reward, conditional, data = (
        base["process"],
        base["ref"],
        base["reward"],
        base["conditional"],
        base["data"],
    )
    N = process.N
    eta = 1.0 if args.sampler == "ddpm" else args.eta
    fid_samples = common.fid_count(args.fid_samples, device, task)
    model = model_from_checkpoint(base["ckpt"], device)[0].requires_grad_(
        True
    )  # the copy that is fine-tuned
    ema = EMA(model, args.ema_decay)
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.0)
    ref_net = common.wrap_net(
        ref, args.bf16, args.compile
    )  # base and fine-tuned models run at one precision
    train_net = common.wrap_net(dist.wrap(model), args.bf16, args.compile)  # DDP under torchrun
    rows = (
        dist.rows(args.batch_size) if dist.world > 1 else None
    )  # this rank's rows of each global batch
    fid = FID(task, fid_samples, device, args.data_dir) if fid_samples else None
    target = (
        None  # toy2d: the exact mode weights P-GRAFT's output has at this N_I (rewards/toy2d.py)
    )
    if task.name == "toy2d" and hasattr(reward, "cdf"):
        from rewards.toy2d import tilted_mode_weights

        target = tilted_mode_weights(
            rule.prob,
            reward,
            float(process.alpha_bar[n_i]),
            args.rounds,
            compound=args.sample_from == "current",
        )

    ckpt_path = os.path.join(args.out, "ckpt.pt")
    done, samples, history, pool = 0, 0, [], None
    if ckpt is not None:
        done, extra = common.restore(ckpt, model, ema, opt)
        samples, history, base_eval = (
            extra["samples_generated"],
            extra["history"],
            extra["base_eval"],
        )
        pool = load_pool(os.path.join(args.out, extra["pool"]))
        print(f"resumed from {ckpt_path} after round {done} ({samples} samples generated)")
    log = common.RunLog(
        args.out, args, resumed_at=("round", done) if ckpt is not None else None, write=dist.main
    )
    per_round = args.prompts * args.M
    ab = process.alpha_bar[n_i].item()
    common.print_derived(
        f"pgraft on {task.name}",
        device=device,
        base=base["path"],
        conditional=conditional,
        reward=f"{reward.name}: {reward.description}",
        accept=f"{args.accept} (M={args.M}, K={args.K}, tau={args.tau}, alpha={args.alpha})",
        samples_per_round=f"{args.prompts} conditions x M={args.M} = {per_round}",
        expected_accepted=f"{args.prompts * args.K} per round"
        if args.accept in ("topk", "bon")
        else "random",
        rounds=args.rounds,
        sample_budget=args.rounds * per_round,
        sample_from=args.sample_from,
        sampler=f"{args.sampler} eta={eta}, {args.sample_steps} steps over N={N}, cfg "
        f"{args.cfg_scale}",
        finetune=f"{args.train_steps} steps/round, batch {args.batch_size}, lr {args.lr}, EMA "
        f"{ema.describe()}",
        n_i=f"{n_i} of N={N} ({n_i / N:.3f} N), abar_NI={ab:.4f}, X_NI = {ab**0.5:.3f} X_0 + "
        f"{(1 - ab) ** 0.5:.3f} eps",
        loss=args.loss,
        trained_steps=f"n in ({n_i}, {N}]; the frozen reference below",
        eval=f"{args.eval_samples} samples" + (f", FID on {fid_samples}" if fid_samples else ""),
        tilt_target=None if target is None else [round(v, 4) for v in target.tolist()],
        out=args.out,
    )

    @torch.no_grad()
    def draw(net, y, n, seed):
        """n samples X_0 and their states X_{N_I}: two segments N -> N_I -> 0, so X_{N_I} is on the
        grid. Batch k draws its noise from its own generator (seed, k): sharding over ranks changes
        nothing."""
        x0s, nis = (
            [torch.zeros((0, *task.shape()), device=device)],
            [torch.zeros((0, *task.shape()), device=device)],
        )
        starts = range(0, n, args.sample_batch)
        lo, hi = dist.shard(len(starts))
        for i in common.progress(starts[lo:hi], "sample"):
            gen = common.generator(seed * 100_003 + i // args.sample_batch, device)
            b = min(args.sample_batch, n - i)
            x = torch.randn((b, *task.shape()), generator=gen, device=device)
            yb = y[i : i + b] if y is not None else None
            if n_i > 0:
                x, _ = process.sample(
                    net,
                    x,
                    None,
                    n_i,
                    yb,
                    gen,
                    eta,
                    args.sample_steps,
                    clip=task.kind == "image",
                    cfg_scale=args.cfg_scale,
                )
                nis.append(x)
                x, _ = process.sample(
                    net,
                    x,
                    n_i,
                    0,
                    yb,
                    gen,
                    eta,
                    args.sample_steps,
                    clip=task.kind == "image",
                    cfg_scale=args.cfg_scale,
                )
            else:
                x, _ = process.sample(
                    net,
                    x,
                    None,
                    0,
                    yb,
                    gen,
                    eta,
                    args.sample_steps,
                    clip=task.kind == "image",
                    cfg_scale=args.cfg_scale,
                )
            x0s.append(x.clamp(-1, 1) if task.kind == "image" else x)
        return dist.gather(torch.cat(x0s)), (dist.gather(torch.cat(nis)) if n_i > 0 else None)

    def evaluate(net, tag):
        n = max(args.eval_samples, fid_samples)
        seed = args.seed + 999_983  # the same conditions and noise for the base and every round
        y = (
            task.sample_conditions(n, common.generator(seed, device), device, data)
            if conditional
            else None
        )
        x = draw(net, y, n, seed)[0]
        ev = evaluate_samples(x, y, reward, task, args.eval_samples, fid, target, args.sample_batch)
        print(
            f"   eval {tag}: "
            + ", ".join(f"{k}={v:.4f}" for k, v in ev.items() if isinstance(v, float)),
            flush=True,
        )
        return ev, x

    x_base = None
    if (
        base_eval is None
    ):  # a sweep evaluates the base once; its tilt_tv is against this N_I's target
        base_eval, x_base = evaluate(ref_net, "base")
    elif target is not None:
        base_eval = dict(
            base_eval,
            tilt_tv=0.5
            * (torch.tensor(base_eval["mode_hist"], dtype=torch.float64) - target)
            .abs()
            .sum()
            .item(),
        )
    last = history[-1]["eval"] if history else base_eval
    warmup = min(args.warmup, args.train_steps // 2)
    with common.StopSignals() as stop:
        for rnd in range(done + 1, args.rounds + 1):
            gen = common.generator(args.seed * 1000 + rnd, device)
            # 1. draw M samples per condition from the reference (or the stitched model so far),
            # keeping X_{N_I}
            current = args.sample_from == "current" and rnd > 1
            sampler = (
                stitched(common.wrap_net(ema.model, args.bf16, args.compile), ref_net, N, n_i)
                if current
                else ref_net
            )
            y = (
                task.sample_conditions(args.prompts, gen, device, data, repeat=args.M)
                if conditional
                else None
            )
            x0, x_ni = draw(sampler, y, per_round, args.seed * 1000 + rnd)
            samples += per_round
            # 2. reward every sample's X_0
            r = rewards.score(reward, x0, y, args.sample_batch)
            # 3. accept by the GRAFT rule on X_0 within each condition's M samples. r_hat and the
            # KL proxy are those
            #    of X_0's acceptance a(X_0); the kept X_{N_I} is accepted w.p. E[a(X_0) | X_{N_I}]
            # (not estimated)
            mask = rule.select(r.view(args.prompts, args.M), gen).reshape(-1)
            acc_prob, r_hat = rule.reshaped(r, condition_groups(y))
            n_acc = int(mask.sum())
            if n_acc == 0:
                raise UsageError(
                    f"round {rnd}: the rule {args.accept} accepted none of {per_round} samples "
                    f"(reward max {r.max().item():.4g}); lower --tau or raise --alpha"
                )
            # ALGORITHM (paper, P-GRAFT): what is kept is the state X_{N_I} of each accepted
            # trajectory
            kept = x_ni[mask] if args.loss == "bridge" and n_i > 0 else x0[mask]
            ky = y[mask] if y is not None else None
            if (
                args.sample_from == "ref" and pool is not None
            ):  # one target every round: the pool grows
                kept = torch.cat([pool["x"].to(device), kept])
                ky = torch.cat([pool["y"].to(device), ky]) if ky is not None else None
            pool = {"x": kept.cpu(), **({"y": ky.cpu()} if ky is not None else {})}
            stats = dict(
                reward_all_mean=r.mean().item(),
                reward_all_std=r.std().item(),
                reward_accepted_mean=r[mask].mean().item(),
                reward_accepted_std=r[mask].std().item() if n_acc > 1 else 0.0,
                acceptance_rate=n_acc / per_round,
                accepted=n_acc,
                pool=len(kept),
                r_hat_x0_mean=r_hat.mean().item(),
                r_hat_x0_accepted_mean=r_hat[mask].mean().item(),
                kl_proxy_x0=kl_proxy(acc_prob),
                samples_generated=samples,
            )
            # 4. fine-tune the copy of the reference on the kept states, steps n in (N_I, N] only
            labels = (
                ky if ky is not None else torch.zeros(len(kept), dtype=torch.long, device=device)
            )
            batches = Batches(
                TensorDataset(kept, labels), args.batch_size, device, seed=args.seed * 1000 + rnd
            )
            loss_gen = common.generator(args.seed * 1000 + 500 + rnd, device)
            model.train()
            window = []
            for step in common.progress(range(args.train_steps), f"round {rnd}"):
                for group in opt.param_groups:
                    group["lr"] = lr_at(step, args.train_steps, args.lr, "cosine", warmup)
                xb, yb = next(batches)
                yb = yb if conditional else None
                if args.loss == "bridge":
                    loss = bridge_loss(train_net, xb, yb, n_i, process, loss_gen, rows=rows)
                else:  # comparison: the plain loss on accepted X_0, only for n in (N_I, N]
                    loss = process.loss(
                        train_net, xb, yb, loss_gen, n_range=(n_i + 1, N), rows=rows
                    )
                opt.zero_grad(set_to_none=True)
                loss.backward()
                if args.grad_clip > 0:
                    torch.nn.utils.clip_grad_norm_(model.parameters(), args.grad_clip)
                opt.step()
                ema.update(model)
                window.append(loss.detach())
                if (step + 1) % LOG_EVERY == 0 or step + 1 == args.train_steps:
                    loss_mean = common.check_loss(
                        window, step + 1, args.lr, dist=dist
                    )  # diverged: stop, keep ckpt
                    window = []
                    log.log(round=rnd, step=step + 1, loss=loss_mean, lr=opt.param_groups[0]["lr"])
                if dist.any(stop.requested):
                    stop.requested = stop.requested or "SIGTERM"
                    stop.stop(
                        f"in round {rnd} at fine-tuning step {step + 1}",
                        f"rerun the same command with --resume: it continues after round {rnd - 1}",
                    )
            model.eval()
            common.check_weights(model, f"{args.train_steps} of round {rnd}", args.lr)
            # 5. evaluate fresh samples: fine-tuned EMA weights N -> N_I, the frozen reference N_I
            # -> 0
            ev, x_final = evaluate(
                stitched(common.wrap_net(ema.model, args.bf16, args.compile), ref_net, N, n_i),
                f"round {rnd}",
            )
            last = ev
            history.append(dict(round=rnd, **stats, loss=loss_mean, eval=ev))
            log.log(
                round=rnd,
                **stats,
                loss=loss_mean,
                **{f"eval_{k}": v for k, v in ev.items() if not isinstance(v, list)},
            )
            print(
                f"round {rnd}/{args.rounds}: reward all {stats['reward_all_mean']:.4f}, accepted "
                f"{stats['reward_accepted_mean']:.4f}, accept rate {stats['acceptance_rate']:.3f}, "
                f"KL proxy (X_0) "
                f"{stats['kl_proxy_x0']:.4f}, loss {loss_mean:.4f}, eval reward "
                f"{ev['reward_mean']:.4f} "
                f"(base {base_eval['reward_mean']:.4f}), samples {samples}",
                flush=True,
            )
            # 6. checkpoint: the pool first, then the checkpoint that names it (a kill between
            # leaves the old pair)
            if dist.main:
                common.atomic_save(pool, log.path(f"pool_round{rnd}.pt"))
                save_checkpoint(
                    ckpt_path,
                    model,
                    process,
                    ema,
                    opt,
                    rnd,
                    args,
                    extra=dict(
                        samples_generated=samples,
                        history=history,
                        pool=f"pool_round{rnd}.pt",
                        base_eval=base_eval,
                        base=base["path"],
                        n_i=n_i,
                    ),
                )
                if os.path.exists(log.path(f"pool_round{rnd - 1}.pt")):
                    os.remove(log.path(f"pool_round{rnd - 1}.pt"))
            if (
                x_base is None
            ):  # resumed, or a later N_I of a sweep: the base's samples again, for the pictures
                x_base = evaluate(ref_net, "base (again, for the pictures)")[1]
            if dist.main:
                common.round_pictures(
                    task,
                    reward,
                    log,
                    x_base,
                    x_final,
                    (f"accepted X_0, round {rnd}", x0[mask]),
                    f"pgraft N_I={n_i}",
                    rnd,
                    ref.config.get("num_classes") or 8,
                )

    summary = dict(
        task=task.name,
        method="pgraft",
        accept=args.accept,
        M=args.M,
        K=args.K,
        tau=args.tau,
        alpha=args.alpha,
        rounds=args.rounds,
        samples_generated=samples,
        reward=reward.name,
        sample_from=args.sample_from,
        sampler=args.sampler,
        sample_steps=args.sample_steps,
        eta=eta,
        cfg_scale=args.cfg_scale,
        ema=ema.describe(),
    )
    summary.update(common.evaluation_summary(base_eval, last, task, fid_samples, target))
    summary.update(n_i=n_i, n_i_frac=n_i / N, loss=args.loss, lemma43=lemma)
    summary = log.summary(**summary, base=base["path"], checkpoint=ckpt_path)
    common.print_done(summary, args.out)
    return dict(summary, _base_eval={k: v for k, v in base_eval.items() if k != "tilt_tv"})


def load_pool(path):
    """The kept states of the rounds so far, saved next to the checkpoint that names them."""
    from models import CheckpointError

    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # missing or truncated
        raise CheckpointError(
            f"cannot resume: the pool of kept states {path} is missing or damaged "
            f"({type(e).__name__}); rerun without --resume into another --out"
        ) from None


def sweep_table(top, args, rows, n_is, N, lemma):
    """OUT/sweep.md, sweep.csv, sweep.png and the sweep's summary. Each N_I has its own exact
    target on toy2d, so both the base's and the fine-tuned model's TV to it are shown."""
    cols = [
        "n_i",
        "n_i_frac",
        "reward_final",
        "accuracy_final",
        "fid_final",
        "tilt_tv_base",
        "tilt_tv",
        "samples_generated",
    ]
    cols = [c for c in cols if any(r.get(c) is not None for r in rows)]

    def fmt(v):
        return "" if v is None else (f"{v:.4f}" if isinstance(v, float) else str(v))

    base_row = dict(
        n_i="base",
        reward_final=rows[0]["reward_base"],
        accuracy_final=rows[0].get("accuracy_base"),
        fid_final=rows[0].get("fid_base"),
        samples_generated=0,
    )
    md = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    md += ["| " + " | ".join(fmt(r.get(c)) for c in cols) + " |" for r in [base_row] + rows]
    with open(top.path("sweep.md"), "w") as f:
        f.write("\n".join(md) + "\n")
    with open(top.path("sweep.csv"), "w") as f:
        f.write(
            ",".join(cols)
            + "\n"
            + "\n".join(",".join(fmt(r.get(c)) for c in cols) for r in [base_row] + rows)
            + "\n"
        )
    print("\n".join(md))
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5.5, 3.8))
    x = [r["n_i"] / N for r in rows]
    ax.plot(x, [r["reward_final"] for r in rows], "o-", label="P-GRAFT reward")
    ax.axhline(rows[0]["reward_base"], color="gray", ls="--", label="base reward")
    ax.set(
        xlabel="N_I / N (0 = GRAFT)",
        ylabel="final mean reward",
        title="P-GRAFT: final reward against N_I",
    )
    if any(r.get("fid_final") is not None for r in rows):
        ax2 = ax.twinx()
        ax2.plot(x, [r.get("fid_final") for r in rows], "s--", color="C3", label="FID")
        ax2.set_ylabel("FID", color="C3")
    ax.legend(loc="best", fontsize=8)
    fig.tight_layout()
    fig.savefig(top.path("sweep.png"), dpi=110)
    plt.close(fig)
    s = top.summary(
        task=rows[0]["task"],
        method="pgraft",
        accept=args.accept,
        M=args.M,
        K=args.K,
        n_i=n_is,
        rounds=args.rounds,
        samples_generated=rows[0]["samples_generated"],
        reward_base=rows[0]["reward_base"],
        reward_final=[r["reward_final"] for r in rows],
        **(
            {
                "tilt_tv": [r["tilt_tv"] for r in rows],
                "tilt_tv_base": [r["tilt_tv_base"] for r in rows],
            }
            if "tilt_tv" in rows[0]
            else {}
        ),
        **(
            {"fid_base": rows[0].get("fid_base"), "fid_final": [r.get("fid_final") for r in rows]}
            if "fid_base" in rows[0]
            else {}
        ),
        sweep={str(r["n_i"]): {c: r.get(c) for c in cols} for r in rows},
        lemma43=lemma,
        N=N,
    )
    print(f"sweep done in {s['wall_time_s']}s; wrote {args.out}/sweep.md, sweep.png")
    return s


if __name__ == "__main__":
    common.run_main(main)
