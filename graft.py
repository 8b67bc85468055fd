"""GRAFT: fine-tune a diffusion model on the samples of its reference that an acceptance rule keeps.

    python graft.py                                   # toy2d, top-2 of 8, one round from the frozen reference
    python graft.py --accept rs --alpha 0.5           # classical rejection sampling, target p exp(r / alpha)
    python graft.py --task mnist --rounds 2           # class-conditional MNIST, reward log p(label | image)
    python graft.py --task celeba --reward smiling --device cuda --bf16

Each round (paper, GRAFT): draw M samples per condition from the sampling model -> reward -> accept
by the rule -> fine-tune a copy of the reference on the accepted samples with the ordinary diffusion
loss -> evaluate fresh samples -> checkpoint. For every rule the accepted law is p(x) a(x) / Z with
a(x) = P(accept | x), and the reshaped reward r_hat = alpha log a(x) (computed from the round's
empirical reward CDF) makes that the KL-regularised optimum p exp(r_hat / alpha) / Z: it is logged.

Writes OUT/args.json, metrics.jsonl (one line per round and per 100 fine-tuning steps),
summary.json, ckpt.pt (the fine-tuned model; --resume continues after the last finished round) and
pictures (toy2d: samples over the reward; images: sample grids). Default OUT: runs/graft/<task>-<accept>.
"""
import math
import os
import shutil

import numpy as np
import torch
from torch.utils.data import TensorDataset

import common
import rewards
from common import UsageError
from models import DDPM, EMA, save_checkpoint
from tasks import get_task

# Per-task defaults of the flags left unset (None). Budget per round = prompts x M samples.
DEFAULTS = {
    "toy2d": dict(M=8, K=2, prompts=1000, rounds=1, train_steps=1000, batch_size=512, lr=1e-3, ema_decay=0.99,
                  eval_num=5000, sample_batch=4000),
    "mnist": dict(M=8, K=2, prompts=200, rounds=2, train_steps=600, batch_size=128, lr=1e-4, ema_decay=0.995,
                  eval_num=1000, sample_batch=800),
    "celeba": dict(M=8, K=2, prompts=256, rounds=4, train_steps=2000, batch_size=64, lr=5e-5, ema_decay=0.999,
                   eval_num=1000, sample_batch=256),
}
DEFAULTS_IMAGE = dict(M=8, K=2, prompts=64, rounds=2, train_steps=1000, batch_size=16, lr=2e-5, ema_decay=0.999,
                      eval_num=256, sample_batch=32)


# =============================================================================================
# ALGORITHM (paper, GRAFT): the acceptance rules, P(accept | x) and the reshaped reward r_hat.
# =============================================================================================
def empirical_cdf(r, groups=None):
    """The round's empirical reward CDF at each sample's own reward: F_i = (rank_i - 1/2) / n within
    its group (samples of one condition), so 0 < F < 1. r (n,), groups (n,) long or None."""
    n = r.numel()
    groups = torch.zeros(n, dtype=torch.long, device=r.device) if groups is None else groups
    by_r = torch.argsort(r, stable=True)
    order = by_r[torch.argsort(groups[by_r], stable=True)]  # sorted by group, then by reward
    g = groups[order]
    counts = torch.bincount(g)
    starts = torch.cumsum(counts, 0) - counts
    pos = torch.arange(n, device=r.device) - starts[g]
    F = torch.empty(n, dtype=torch.float64, device=r.device)
    F[order] = (pos.double() + 0.5) / counts[g].double()
    return F


def topk_accept_prob(F, M, K):
    """Top-K of M: x is kept iff fewer than K of the other M-1 samples beat it, so
    P(accept | x) = sum_{j<K} C(M-1, j) F^(M-1-j) (1-F)^j with F = F(r(x))."""
    j = torch.arange(K, dtype=torch.float64, device=F.device)
    log_binom = math.lgamma(M) - torch.lgamma(j + 1) - torch.lgamma(M - j)
    F = F.double()[..., None]
    return (log_binom.exp() * F ** (M - 1 - j) * (1 - F) ** j).sum(-1)


class AcceptRule:
    """topk (RAFT: the K best of each condition's M), bon (best-of-N: K = 1), threshold (r >= tau),
    rs (classical rejection sampling: accept with probability exp((r - r_max) / alpha))."""

    def __init__(self, kind, M, K=1, tau=None, alpha=1.0):
        if M < 1:
            raise UsageError(f"--M must be >= 1, got {M}")
        if kind == "bon":
            K = 1
        if kind == "topk" and not 1 <= K <= M:
            raise UsageError(f"--K {K} must be in 1..--M ({M}): top-K of M keeps K of each condition's M samples")
        if kind == "threshold" and tau is None:
            raise UsageError("--accept threshold needs --tau (keep samples whose reward is >= tau)")
        if kind == "rs" and not alpha > 0:
            raise UsageError(f"--accept rs needs --alpha > 0, got {alpha}")
        self.kind, self.M, self.K, self.tau, self.alpha = kind, M, K, tau, alpha

    def select(self, r, generator):
        """r (P, M): the rewards of P conditions' M samples -> bool mask of the accepted ones."""
        if self.kind in ("topk", "bon"):
            idx = r.topk(self.K, dim=1).indices
            return torch.zeros_like(r, dtype=torch.bool).scatter_(1, idx, True)
        if self.kind == "threshold":
            return r >= self.tau
        u = torch.rand(r.shape, generator=generator, device=r.device, dtype=torch.float64)
        return u < torch.exp((r.double() - r.max()) / self.alpha)  # rs: accepted law p exp(r / alpha) / Z

    def prob(self, r, F, r_max=None):
        """a(x) = P(accept | x) from x's reward r and CDF value F = F(r) under the sampling law."""
        if self.kind in ("topk", "bon"):
            return topk_accept_prob(F, self.M, self.K)
        if self.kind == "threshold":
            return (r >= self.tau).double()
        r_max = r.max() if r_max is None else r_max
        return torch.exp((r.double() - r_max) / self.alpha)

    def reshaped(self, r, groups=None):
        """(a, r_hat): a = P(accept | x) with the round's empirical CDF, r_hat = alpha log a (floored at
        alpha log 1e-12 where a = 0, e.g. below a threshold)."""
        a = self.prob(r, empirical_cdf(r, groups), r.max())
        return a, self.alpha * torch.log(a.clamp(min=1e-12))


def kl_proxy(a):
    """KL(accepted law || sampling law) implied by P(accept | x) = a: E_q[log a] - log E_p[a], q = p a / Z."""
    return (torch.special.xlogy(a, a).sum() / a.sum() - torch.log(a.mean())).item()


# =============================================================================================
# Shared round loop (GRAFT here; P-GRAFT subclasses it in pgraft.py): plumbing around the rules.
# =============================================================================================
def _d(key):
    """'default: toy2d X, mnist Y, celeba Z' for a help text, read off DEFAULTS."""
    return "default: " + ", ".join(f"{t} {d[key]}" for t, d in DEFAULTS.items())


def add_args(p, method):
    common.add_common_args(p)
    p.add_argument("--reward", default=None, help="reward name (default: toy2d linear, mnist digit, celeba smiling; "
                   "see rewards/__init__.py): linear[:DEG], digit[:K], attributes, <celeba attribute>[+...], jpeg, "
                   "jpeg-incompressibility")
    p.add_argument("--base", default=None, help="reference DDPM checkpoint (default runs/pretrain/<task>-ddpm/ckpt.pt, "
                   "pretrained first with the task's default budget when absent)")
    p.add_argument("--accept", choices=["topk", "bon", "threshold", "rs"], default="topk",
                   help="acceptance rule: top-K of M per condition (RAFT), best-of-N (N = --M), reward >= --tau, "
                   "or rejection sampling with probability exp((r - r_max) / --alpha)")
    p.add_argument("--M", type=int, default=None, help=f"samples drawn per condition per round ({_d('M')})")
    p.add_argument("--K", type=int, default=None, help=f"top-K keeps the K best of each condition's M ({_d('K')})")
    p.add_argument("--tau", type=float, default=None, help="reward threshold of --accept threshold")
    p.add_argument("--alpha", type=float, default=1.0, help="temperature: rs accepts w.p. exp((r - r_max)/alpha); "
                   "r_hat = alpha log P(accept | x) for every rule")
    p.add_argument("--prompts", type=int, default=None, help="conditions drawn per round (labels cycle 0..9 on MNIST; "
                   "the one unconditional 'prompt' repeated on toy2d); samples per round = prompts x M "
                   f"({_d('prompts')})")
    p.add_argument("--rounds", type=int, default=None, help=f"sample -> accept -> fine-tune rounds ({_d('rounds')})")
    p.add_argument("--sample-from", choices=["ref", "current"], default="ref",
                   help="ref: every round samples the frozen reference and the pool of accepted samples grows, so the "
                   "target stays p_ref x P(accept); current: each round samples the model fine-tuned so far and "
                   "trains on that round's accepted samples only, so the tilts compound round after round")
    p.add_argument("--sampler", choices=["ddpm", "ddim"], default="ddpm",
                   help="ddpm: ancestral (eta = 1); ddim: generalised DDIM with --eta")
    p.add_argument("--steps", type=int, default=None, help="sampler steps over the N-step chain (default: the task's, "
                   "toy2d 200, mnist/celeba 100)")
    p.add_argument("--eta", type=float, default=None, help="DDIM eta for --sampler ddim (default: graft 0, pgraft 1; "
                   "P-GRAFT refuses 0)")
    p.add_argument("--train-steps", type=int, default=None, help=f"fine-tuning optimiser steps per round ({_d('train_steps')})")
    p.add_argument("--batch-size", type=int, default=None, help=f"fine-tuning minibatch ({_d('batch_size')})")
    p.add_argument("--lr", type=float, default=None, help=f"fine-tuning peak AdamW learning rate ({_d('lr')})")
    p.add_argument("--warmup", type=int, default=50, help="linear LR warm-up steps of each round")
    p.add_argument("--ema-decay", type=float, default=None, help=f"EMA decay of the fine-tuned weights ({_d('ema_decay')})")
    p.add_argument("--eval-num", type=int, default=None, help=f"fresh samples per evaluation ({_d('eval_num')})")
    p.add_argument("--fid-num", type=int, default=-1, help="samples for FID of image tasks (-1: 5000 on CUDA, 0 on CPU)")
    p.add_argument("--sample-batch", type=int, default=None, help=f"samples per sampler call, memory ({_d('sample_batch')})")
    p.add_argument("--classifier", default=None, help="reward classifier checkpoint (default runs/rewards/<task>-classifier.pt)")
    return p


def resolve_defaults(args, method):
    task = get_task(args.task)
    d = DEFAULTS.get(task.name, DEFAULTS_IMAGE)
    for k, v in d.items():
        if getattr(args, k, None) is None:
            setattr(args, k, v)
    args.steps = args.steps or task.sample_steps
    args.out = args.out or os.path.join("runs", method, f"{task.name}-{args.accept}")
    if args.sampler == "ddpm":
        args.eta = 1.0
    elif args.eta is None:
        args.eta = 0.0 if method == "graft" else 1.0
    for name in ("prompts", "rounds", "train_steps", "batch_size", "eval_num", "sample_batch", "steps"):
        if getattr(args, name) < 1:
            raise UsageError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if args.eta < 0:
        raise UsageError(f"--eta must be >= 0, got {args.eta}")
    args.K = AcceptRule(args.accept, args.M, args.K, args.tau, args.alpha).K  # refuse K > M etc. before any work
    return task


def ensure_base(args, task):
    """The reference checkpoint: --base, else the task's default, pretrained first when absent."""
    if args.base:
        return args.base
    path = common.default_base_path(task.name, "ddpm")
    if os.path.isfile(path):
        return path
    import pretrain
    argv = ["--task", task.name, "--out", os.path.dirname(path), "--seed", str(args.seed), "--device", args.device,
            "--fid-num", "0"] + (["--num-samples", "4000"] if task.kind == "points" else [])
    argv += ["--data-dir", args.data_dir] if args.data_dir else []
    print(f"no reference model at {path}: pretraining it first with {task.name}'s default budget "
          f"(python pretrain.py {' '.join(argv)})", flush=True)
    pretrain.main(argv)
    return path


def _atomic_save(obj, path):
    tmp = f"{path}.tmp"
    torch.save(obj, tmp)
    os.replace(tmp, path)


class GraftRun:
    """One GRAFT run. P-GRAFT overrides ``n_i`` (the step whose states are kept), ``loss`` and ``sampler``."""
    method = "graft"

    def __init__(self, args, n_i=0, base_eval=None):
        self.args = args
        self.task = task = resolve_defaults(args, self.method)
        self.device = common.pick_device(args.device)
        self.rule = AcceptRule(args.accept, args.M, args.K, args.tau, args.alpha)
        self.base_path = ensure_base(args, task)
        self.ref, self.process, ckpt = common.load_base(self.base_path, self.device)
        if not isinstance(self.process, DDPM):
            raise UsageError(f"{self.base_path} is not a DDPM (process {ckpt.get('process')}); GRAFT fine-tunes DDPMs")
        self.N = self.process.N
        if not 0 <= n_i < self.N:
            raise UsageError(f"N_I = {n_i} is out of range: need 0 <= N_I < N = {self.N}")
        self.n_i = n_i
        cfg = self.ref.config
        self.num_classes, self.cond_dim = cfg.get("num_classes", 0), cfg.get("cond_dim", 0)
        self.conditional = bool(self.num_classes or self.cond_dim)
        self.attr_table = None
        if self.cond_dim:  # attribute-conditional model: conditions are real attribute rows of the data
            self.attr_table = task.dataset("train", args.data_dir).attrs.to(self.device)
        self.reward = rewards.get_reward(args.reward, task, self.device, self.conditional, args.data_dir, args.classifier)
        args.reward = self.reward.name
        self.ref_net = common.wrap_net(self.ref, args.bf16, args.compile)
        self.model = self._copy_of_ref(ckpt)  # the copy of the reference that is fine-tuned
        self.ema = EMA(self.model, args.ema_decay)
        self.opt = torch.optim.AdamW(self.model.parameters(), lr=args.lr, weight_decay=0.0)
        self.fid_num = args.fid_num if args.fid_num >= 0 else (5000 if self.device.type == "cuda" else 0)
        if task.kind != "image":
            self.fid_num = 0
        self.base_eval, self.x_base = base_eval if base_eval else (None, None)  # (eval dict, samples) of a sweep
        self.target = None
        if task.name == "toy2d" and hasattr(self.reward, "cdf"):
            from rewards.toy2d import tilted_mode_weights
            abar = float(self.process.alpha_bar[n_i])
            self.target = tilted_mode_weights(self.rule.prob, self.reward, abar, args.rounds,
                                              compound=args.sample_from == "current")

    def _copy_of_ref(self, ckpt):
        from models import model_from_checkpoint
        model, _ = model_from_checkpoint(ckpt, self.device)
        return model.requires_grad_(True)

    # ------------------------------------------------------------------ hooks ----
    def sampler(self, model):
        """The network (or stitched segments) that samples X_0 with fine-tuned weights ``model``."""
        return model

    def loss(self, net, kept, y, gen):
        """GRAFT: the ordinary epsilon loss over all steps on the accepted X_0 (paper, GRAFT)."""
        return self.process.loss(net, kept, y, gen)

    def kept_of(self, x0, x_ni):
        """What the fine-tuning keeps of an accepted trajectory: GRAFT keeps X_0."""
        return x0

    def describe(self):
        return {}

    def nfe(self):
        segments = [(self.N, self.n_i), (self.n_i, 0)] if self.n_i else [(self.N, 0)]
        return sum(len(self.process.grid(hi, lo, self.args.steps)) - 1 for hi, lo in segments)

    # ------------------------------------------------------------------ plumbing ----
    def conditions(self, n, gen, repeat=1):
        """n conditions (labels cycling 0..C-1, or real attribute rows), each repeated ``repeat`` times."""
        if not self.conditional:
            return None
        if self.num_classes:
            y = torch.arange(n, device=self.device) % self.num_classes
        else:
            y = self.attr_table[torch.randint(len(self.attr_table), (n,), generator=gen, device=self.device)]
        return y.repeat_interleave(repeat, 0)

    @torch.no_grad()
    def draw(self, sampler, y, n, gen, keep_ni=False):
        """n samples X_0 (and, with keep_ni and N_I > 0, their states X_{N_I}) from ``sampler``."""
        a, task = self.args, self.task
        x0s, nis = [], []
        clip = task.kind == "image"
        for i in range(0, n, a.sample_batch):
            b = min(a.sample_batch, n - i)
            yb = y[i:i + b] if y is not None else None
            x = torch.randn((b, *task.shape()), generator=gen, device=self.device)
            if self.n_i > 0:  # two segments N -> N_I -> 0 so that X_{N_I} is on the grid whatever --steps
                x, _ = self.process.sample(sampler, x, None, self.n_i, yb, gen, a.eta, a.steps, clip=clip)
                if keep_ni:
                    nis.append(x)
                x, _ = self.process.sample(sampler, x, self.n_i, 0, yb, gen, a.eta, a.steps, clip=clip)
            else:
                x, _ = self.process.sample(sampler, x, None, 0, yb, gen, a.eta, a.steps, clip=clip)
            x0s.append(x.clamp(-1, 1) if clip else x)
        return torch.cat(x0s), (torch.cat(nis) if nis else None)

    @torch.no_grad()
    def score(self, x, y):
        out = []
        for i in range(0, len(x), self.args.sample_batch):
            out.append(self.reward(x[i:i + self.args.sample_batch], y[i:i + self.args.sample_batch] if y is not None else None))
        return rewards.check_finite(torch.cat(out), self.reward.name)

    def groups(self, y):
        """Condition index of each sample, for the per-condition empirical CDF."""
        if y is None:
            return None
        if y.dim() == 1:
            return y.long()
        return torch.unique(y, dim=0, return_inverse=True)[1]

    @torch.no_grad()
    def evaluate(self, sampler, tag):
        a = self.args
        n = max(a.eval_num, self.fid_num)
        gen = common.generator(a.seed + 999_983, self.device)  # the same noise for the base and every round
        y = self.conditions(n, gen)
        x, _ = self.draw(sampler, y, n, gen)
        r = self.score(x, y)
        out = dict(reward_mean=r.mean().item(), reward_std=r.std().item())
        out.update(self.reward.metrics(x[:a.eval_num], y[:a.eval_num] if y is not None else None))
        if self.task.name == "toy2d":
            m = self.task.metrics(x)
            out.update(mode_tv=m["mode_tv"], sw2=m["sw2"], mode_hist=m["mode_hist"])
            if self.target is not None:
                hist = torch.tensor(m["mode_hist"], dtype=torch.float64)
                out["tilt_tv"] = 0.5 * (hist - self.target).abs().sum().item()
        if self.fid_num > 0:
            out["fid"] = self.fid(x[:self.fid_num])
        print(f"   eval {tag}: " + ", ".join(f"{k}={v:.4f}" for k, v in out.items() if isinstance(v, float)), flush=True)
        return out, x

    def fid(self, x):
        from eval.fid import FIDEvaluator, frechet_distance
        if not hasattr(self, "_fid"):
            self._fid = FIDEvaluator(device=str(self.device))
            self._fid_ref = self._fid.reference_stats(self.task.name, split="train", data_dir=self.args.data_dir)
        mu, sigma, _ = self._fid.stats(x)
        return float(frechet_distance(mu, sigma, *self._fid_ref))

    def finetune(self, kept, y, rnd):
        """Fine-tune the copy of the reference on the accepted pool (common.train: AdamW, EMA, cosine)."""
        a = self.args
        data = TensorDataset(kept, y if y is not None else torch.zeros(len(kept), dtype=torch.long, device=kept.device))
        batches = common.Batches(data, a.batch_size, self.device, seed=a.seed * 1000 + rnd)
        gen = common.generator(a.seed * 1000 + 500 + rnd, self.device)
        net = common.wrap_net(self.model, a.bf16, a.compile)

        def loss_fn(step):
            xb, yb = next(batches)
            return self.loss(net, xb, yb if y is not None else None, gen)

        scratch = os.path.join(a.out, "finetune_tmp")
        loss, self.ema, self.opt = common.train(
            self.model, loss_fn, a.train_steps, a.lr, scratch, a, self.process, 0, self.ema, self.opt, "cosine",
            min(a.warmup, a.train_steps // 2), 1.0, 0, lambda **kw: self.log.log(round=rnd, **kw), desc=f"round {rnd}")
        shutil.rmtree(scratch, ignore_errors=True)
        return loss

    def pictures(self, x_base, x_final, accepted, rnd):
        log, task = self.log, self.task
        if task.kind == "points":
            np.save(log.path("samples.npy"), x_final.numpy() if isinstance(x_final, torch.Tensor) else x_final)
            sets = {"base (reference)": x_base.cpu(), f"accepted X_0, round {rnd}": accepted.cpu(),
                    f"{self.method} round {rnd}": x_final.cpu()}
            common.plot_points(sets, log.path("samples.png"), title=f"{self.method} on toy2d, reward {self.reward.name} "
                               f"(shaded), {self.args.accept}", background=(self.reward.fn, "reward"))
        else:
            nrow = self.num_classes or 8
            common.save_grid(x_base[:nrow * 8].cpu(), log.path("samples_base.png"), nrow=nrow)
            common.save_grid(x_final[:nrow * 8].cpu(), log.path(f"samples_round{rnd}.png"), nrow=nrow)

    # ------------------------------------------------------------------ the round loop ----
    def run(self):
        a, task = self.args, self.task
        self.log = common.RunLog(a.out, a)
        ckpt_path = self.log.path("ckpt.pt")
        done, samples, history, pool = 0, 0, [], None
        if a.resume and os.path.exists(ckpt_path):
            done, extra = common.resume_state(ckpt_path, self.model, self.ema, self.opt)
            samples, history = extra.get("samples_generated", 0), extra.get("history", [])
            self.base_eval = self.base_eval or extra.get("base_eval")
            pool = torch.load(self.log.path(extra["pool"]), weights_only=True) if extra.get("pool") else None
            print(f"resumed from {ckpt_path} after round {done} ({samples} samples generated)")
        per_round = a.prompts * a.M
        common.print_derived(
            f"{self.method} on {task.name}", device=self.device, base=self.base_path, conditional=self.conditional,
            reward=f"{self.reward.name}: {self.reward.description}", accept=f"{a.accept} (M={a.M}, K={a.K}, tau={a.tau}, "
            f"alpha={a.alpha})", samples_per_round=f"{a.prompts} conditions x M={a.M} = {per_round}",
            expected_accepted=(f"{a.prompts * a.K} per round" if a.accept in ("topk", "bon") else "random"),
            rounds=a.rounds, sample_budget=a.rounds * per_round, sample_from=a.sample_from,
            sampler=f"{a.sampler} eta={a.eta}, {a.steps} steps over N={self.N} (NFE/sample {self.nfe()})",
            finetune=f"{a.train_steps} steps/round, batch {a.batch_size}, lr {a.lr}, EMA {a.ema_decay}",
            **self.describe(), eval=f"{a.eval_num} samples" + (f", FID on {self.fid_num}" if self.fid_num else ""),
            tilt_target=(None if self.target is None else [round(v, 4) for v in self.target.tolist()]), out=a.out)

        if self.base_eval is None:
            self.base_eval, self.x_base = self.evaluate(self.ref_net, "base")
        last = history[-1]["eval"] if history else self.base_eval
        for rnd in range(done + 1, a.rounds + 1):
            gen = common.generator(a.seed * 1000 + rnd, self.device)
            current = a.sample_from == "current" and rnd > 1
            sampler = self.sampler(common.wrap_net(self.ema.model, a.bf16, a.compile)) if current else self.ref_net
            y = self.conditions(a.prompts, gen, repeat=a.M)
            x0, x_ni = self.draw(sampler, y, per_round, gen, keep_ni=True)
            samples += per_round
            r = self.score(x0, y)
            # ALGORITHM (paper, GRAFT): accept by the rule within each condition's M samples ...
            mask = self.rule.select(r.view(a.prompts, a.M), gen).reshape(-1)
            # ... and log the reshaped reward r_hat = alpha log P(accept | x) from the round's empirical CDF.
            acc_prob, r_hat = self.rule.reshaped(r, self.groups(y))
            n_acc = int(mask.sum())
            if n_acc == 0:
                raise UsageError(f"round {rnd}: the rule {a.accept} accepted none of {per_round} samples "
                                 f"(reward max {r.max().item():.4g}); lower --tau or raise --alpha")
            kept = self.kept_of(x0, x_ni)[mask]
            ky = y[mask] if y is not None else None
            if a.sample_from == "ref" and pool is not None:  # same target every round: the pool grows
                kept, ky = torch.cat([pool["x"].to(self.device), kept]), (torch.cat([pool["y"].to(self.device), ky])
                                                                          if ky is not None else None)
            pool = {"x": kept.cpu(), **({"y": ky.cpu()} if ky is not None else {})}
            accepted_x0 = x0[mask]
            stats = dict(reward_all_mean=r.mean().item(), reward_all_std=r.std().item(),
                         reward_accepted_mean=r[mask].mean().item(),
                         reward_accepted_std=r[mask].std().item() if n_acc > 1 else 0.0,
                         acceptance_rate=n_acc / per_round, accepted=n_acc, pool=len(kept),
                         r_hat_mean=r_hat.mean().item(), r_hat_accepted_mean=r_hat[mask].mean().item(),
                         kl_proxy=kl_proxy(acc_prob), samples_generated=samples)
            loss = self.finetune(kept, ky, rnd)
            ev, x_final = self.evaluate(self.sampler(self.ema.model), f"round {rnd}")
            last = ev
            row = dict(round=rnd, **stats, loss=loss, eval=ev)
            history.append(row)
            self.log.log(**{k: v for k, v in row.items() if k != "eval"},
                         **{f"eval_{k}": v for k, v in ev.items() if not isinstance(v, list)})
            print(f"round {rnd}/{a.rounds}: reward all {stats['reward_all_mean']:.4f}+-{stats['reward_all_std']:.4f}, "
                  f"accepted {stats['reward_accepted_mean']:.4f}+-{stats['reward_accepted_std']:.4f}, accept rate "
                  f"{stats['acceptance_rate']:.3f}, KL proxy {stats['kl_proxy']:.4f}, loss {loss:.4f}, eval reward "
                  f"{ev['reward_mean']:.4f} (base {self.base_eval['reward_mean']:.4f}), samples {samples}", flush=True)
            pool_name = f"pool_round{rnd}.pt"
            _atomic_save(pool, self.log.path(pool_name))
            save_checkpoint(ckpt_path, self.model, self.process, self.ema, self.opt, rnd, a,
                            extra=dict(rounds_done=rnd, samples_generated=samples, history=history, pool=pool_name,
                                       base_eval=self.base_eval, base=self.base_path, n_i=self.n_i, method=self.method))
            old = self.log.path(f"pool_round{rnd - 1}.pt")
            if os.path.exists(old):
                os.remove(old)
            if self.x_base is None:  # resumed: the base's samples again, for the pictures
                self.x_base = self.evaluate(self.ref_net, "base")[1]
            self.pictures(self.x_base, x_final, accepted_x0, rnd)
        return self.finish(samples, last)

    def finish(self, samples, last):
        a = self.args
        s = dict(task=self.task.name, method=self.method, accept=a.accept, M=a.M, K=a.K, tau=a.tau, alpha=a.alpha,
                 n_i=self.n_i if self.method == "pgraft" else None, rounds=a.rounds, samples_generated=samples,
                 reward=self.reward.name, sample_from=a.sample_from, sampler=a.sampler, steps=a.steps, eta=a.eta,
                 reward_base=self.base_eval["reward_mean"], reward_final=last["reward_mean"])
        if self.method != "pgraft":
            s.pop("n_i")
        for k in ("accuracy", "all_correct"):
            if k in self.base_eval:
                s[f"{k}_base"], s[f"{k}_final"] = self.base_eval[k], last.get(k)
        if self.task.name == "toy2d":
            s.update(tilt_tv=last.get("tilt_tv"), tilt_tv_base=self.base_eval.get("tilt_tv"),
                     tilt_target=[round(v, 4) for v in self.target.tolist()] if self.target is not None else None,
                     mode_hist_base=self.base_eval["mode_hist"], mode_hist_final=last["mode_hist"])
        if self.task.kind == "image":
            s.update(fid_base=self.base_eval.get("fid"), fid_final=last.get("fid"), fid_num=self.fid_num)
        s.update(self.extra_summary())
        s.update(base=self.base_path, checkpoint=self.log.path("ckpt.pt"))
        out = self.log.summary(**s)
        print("done: " + ", ".join(f"{k}={v:.4f}" if isinstance(v, float) else f"{k}={v}" for k, v in out.items()
                                   if k in ("reward_base", "reward_final", "tilt_tv", "fid_base", "fid_final",
                                            "accuracy_base", "accuracy_final", "samples_generated", "wall_time_s"))
              + f"; wrote {a.out}")
        return out

    def extra_summary(self):
        return {}


def get_args(argv=None):
    p = common.parser(__doc__.splitlines()[0])
    add_args(p, "graft")
    return p.parse_args(argv)


def main(argv=None):
    args = get_args(argv)
    torch.manual_seed(args.seed)
    return GraftRun(args).run()


if __name__ == "__main__":
    common.run_main(main)
