"""DDPO: fine-tune a diffusion model by policy gradient on its own denoising chain (the baseline).

    python ddpo.py                            # toy2d: 8 rounds of PPO-clip, 50-step DDPM chain
    python ddpo.py --kl-coef 1                # plus a per-step KL penalty to the frozen reference
    python ddpo.py --task mnist               # class-conditional MNIST, reward log p(label | x)
    python ddpo.py --task celeba --reward smiling --device cuda --bf16

DDPO (Black et al. 2023, "Training Diffusion Models with Reinforcement Learning") is the
policy-gradient method the paper compares GRAFT and P-GRAFT against. The sampler is an MDP: the
state is (x_n, n, condition), the action x_m ~ pi_theta(. | x_n) = N(mean_theta(x_n, n),
sigma_n^2 I) is one DDPM ancestral or DDIM (eta > 0) step, and the only reward r(x_0, condition)
comes at the end. Each round: 1. sample M chains per condition with the current model, recording
every step's (x_n, x_m, log pi_old(x_m | x_n)) -> 2. reward -> 3. advantages normalised per
condition (DDPO's per-prompt stat tracking) -> 4. inner epochs of PPO-clip over the shuffled
transitions, with an optional KL penalty to the frozen reference -> 5. evaluate (EMA weights, the
same noise as graft.py) -> 6. checkpoint. The last step to n = 0 has sigma = 0 here (abar_0 = 1):
it is deterministic, has no density and is not an action (DDPO's Stable Diffusion scheduler ends
at abar = 0.99915, where that step keeps a small sigma). eta = 0 makes every step deterministic
and is refused.

Writes OUT/args.json, metrics.jsonl (a line per round and per 100 optimiser steps), summary.json
(graft.py's fields, method "ddpo"), ckpt.pt after every round (--resume continues after the last
finished round) and pictures. Default OUT: runs/ddpo/<task>.
"""

import argparse
import math
import os
from collections import deque

import numpy as np
import torch

import common
import rewards
from eval.metrics import FID, evaluate_samples
from models import EMA, model_from_checkpoint, save_checkpoint
from models.diffusion import gaussian_log_prob, randn
from tasks import UsageError, get_task

# Per-task overrides of the defaults in get_args. Samples per round = prompts x M. toy2d's were
# chosen on the 2-core CPU (README); the image ones are untuned starting points.
# fmt: off
IMAGE = dict(prompts=32, M=4, rounds=10, sample_steps=50, batch_size=64, lr=1e-5, ema_decay=0.99,
             buffer_size=128, eval_samples=256, sample_batch=32)
TASK_DEFAULTS = {
    "toy2d": dict(prompts=256, M=8, rounds=8, sample_steps=50, batch_size=2048, lr=3e-4,
                  ema_decay=0.9, buffer_size=2048, eval_samples=5000, sample_batch=4000),
    "mnist": dict(prompts=100, M=8, rounds=20, sample_steps=50, batch_size=256, lr=1e-5,
                  ema_decay=0.9, buffer_size=160, eval_samples=1000, sample_batch=800),
    "mnist16": dict(prompts=50, M=8, rounds=20, sample_steps=50, batch_size=256, lr=1e-4,
                    ema_decay=0.9, buffer_size=160, eval_samples=400, sample_batch=400),
    "celeba": IMAGE, "celebahq": IMAGE, "church": IMAGE,
}
TASK_DEFAULTS["mnist-pairs16"] = TASK_DEFAULTS["mnist-pairs"] = TASK_DEFAULTS["mnist16"]
# fmt: on
# Flags that may differ between a run and its --resume (--lr: resume a diverged run with a lower
# one); all others must match the checkpoint's.
MAY_CHANGE = ("out", "device", "compile", "data_dir", "lr", "rounds", "eval_samples", "fid_samples")
LOG_EVERY = 100  # optimiser steps per logged loss (one host sync each)
KL_LIMIT = 1e3  # approx KL (nats per step) from the sampling policy beyond which the run exploded


def fraction(text):
    v = common.pos_float(text)
    if v > 1:
        raise argparse.ArgumentTypeError(f"must be in (0, 1], got {text}")
    return v


def get_args(argv=None):
    p = common.parser(__doc__.splitlines()[0], TASK_DEFAULTS)
    common.add_run_args(p)
    p.add_argument(
        "--base",
        default=None,
        help="reference DDPM checkpoint (None: "
        "runs/pretrain/<task>-ddpm/ckpt.pt, pretrained first when absent)",
    )
    p.add_argument(
        "--reward",
        default=None,
        help="reward (None: toy2d linear, mnist digit, celeba "
        "attributes or smiling, others jpeg): linear[:DEG], digit[:K], attributes, "
        "<celeba attribute>[+...], jpeg, jpeg-incompressibility",
    )
    p.add_argument(
        "--classifier",
        default=None,
        help="reward classifier checkpoint (None: "
        "runs/rewards/<task>-classifier.pt, trained first when absent)",
    )
    p.add_argument(
        "--prompts",
        type=common.pos_int,
        default=256,
        help="conditions per round "
        "(labels cycle 0..9 on MNIST; real attribute rows on CelebA; toy2d has one)",
    )
    p.add_argument("--M", type=common.pos_int, default=8, help="chains per condition per round")
    p.add_argument("--rounds", type=common.pos_int, default=8, help="sample -> PPO rounds")
    p.add_argument(
        "--sampler",
        choices=["ddpm", "ddim"],
        default="ddpm",
        help="ddpm: ancestral (eta = 1); ddim: generalised DDIM with --eta > 0",
    )
    p.add_argument(
        "--eta",
        type=common.nonneg_float,
        default=1.0,
        help="DDIM eta of --sampler "
        "ddim (> 0: a policy needs a density; --sampler ddpm is eta = 1)",
    )
    p.add_argument(
        "--sample-steps",
        type=common.pos_int,
        default=50,
        help="sampler steps over the N-step chain (the MDP's horizon)",
    )
    p.add_argument(
        "--cfg-scale",
        type=common.nonneg_float,
        default=0.0,
        help="classifier-free "
        "guidance weight w: eps_u + (1 + w)(eps_c - eps_u); needs a base pretrained "
        "with --cond-drop > 0",
    )
    # PPO (DDPO's defaults for Stable Diffusion in brackets)
    p.add_argument(
        "--inner-epochs",
        type=common.pos_int,
        default=1,
        help="passes over each round's transitions [1]",
    )
    p.add_argument(
        "--batch-size",
        type=common.pos_int,
        default=2048,
        help="transitions per PPO minibatch (one optimiser step each)",
    )
    p.add_argument(
        "--timestep-fraction",
        type=fraction,
        default=1.0,
        help="train a random fraction of each chain's steps per inner epoch [1.0]",
    )
    p.add_argument(
        "--clip-range",
        type=common.pos_float,
        default=0.1,
        help="PPO clips the ratio "
        "to [1 - c, 1 + c] [1e-4 on a ratio averaged over latent dims; see README]",
    )
    p.add_argument(
        "--adv-clip",
        type=common.pos_float,
        default=5.0,
        help="clip the normalised advantages to [-A, A] [5]",
    )
    p.add_argument(
        "--buffer-size",
        type=common.pos_int,
        default=2048,
        help="per-condition stat tracking: recent rewards kept for each condition [16]",
    )
    p.add_argument(
        "--min-count",
        type=common.pos_int,
        default=16,
        help="rewards a condition needs before its own statistics replace the round's [16]",
    )
    p.add_argument(
        "--kl-coef",
        type=common.nonneg_float,
        default=0.0,
        help="weight of the "
        "per-step KL(pi_theta || pi_ref) = ||mean_theta - mean_ref||^2 / (2 sigma^2) "
        "[0]",
    )
    p.add_argument(
        "--lr",
        type=common.pos_float,
        default=3e-4,
        help="AdamW learning rate, constant [3e-4 for LoRA]",
    )
    p.add_argument(
        "--grad-clip",
        type=common.nonneg_float,
        default=1.0,
        help="clip the gradient norm (0: off) [1.0]",
    )
    p.add_argument(
        "--ema-decay",
        type=common.unit_float,
        default=0.9,
        help="EMA decay of the weights that are evaluated (warmed up as min(d, (1+s)/(10+s)))",
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
        "--sample-batch", type=common.pos_int, default=4000, help="chains per sampler call (memory)"
    )
    args, given = common.parse(p, argv, TASK_DEFAULTS, MAY_CHANGE)
    if args.sampler == "ddpm" and "eta" in given and args.eta != 1.0:
        p.error(
            f"--eta {args.eta} with --sampler ddpm: ancestral sampling is eta = 1; use "
            f"--sampler ddim --eta {args.eta}"
        )
    if args.eta == 0:
        p.error(
            "--sampler ddim --eta 0 is deterministic: its steps have no density, so there is "
            "no policy log-probability for DDPO; use --sampler ddpm or --eta > 0"
        )
    if args.min_count > args.buffer_size:
        p.error(
            f"--min-count {args.min_count} exceeds --buffer-size {args.buffer_size}: no "
            f"condition could ever use its own statistics"
        )
    return args


class PerConditionStats:
    """DDPO's per-prompt stat tracking (Black et al. 2023; PerPromptStatTracker of ddpo-pytorch):
    each condition keeps its last ``buffer_size`` rewards; a reward's advantage is
    (r - mean) / (std + 1e-6) over its condition's buffer, this round's rewards included, or over
    the whole round while the buffer holds fewer than ``min_count``. Host-side, once per round."""

    def __init__(self, buffer_size, min_count, state=None):
        self.buffer_size, self.min_count = buffer_size, min_count
        self.buffers = {k: deque(v, maxlen=buffer_size) for k, v in (state or {}).items()}

    def advantages(self, keys, r):
        """keys: one string per sample naming its condition; r: (n,) float64 numpy."""
        adv = np.empty_like(r)
        keys = np.asarray(keys)
        for key in np.unique(keys):
            idx = keys == key
            buf = self.buffers.setdefault(str(key), deque(maxlen=self.buffer_size))
            buf.extend(r[idx].tolist())
            pool = np.asarray(buf) if len(buf) >= self.min_count else r
            adv[idx] = (r[idx] - pool.mean()) / (pool.std() + 1e-6)
        return adv

    def state(self):
        return {k: list(v) for k, v in self.buffers.items()}


def condition_keys(y, n):
    """A string naming each sample's condition: one for unconditional tasks, the label, or the
    attribute row."""
    if y is None:
        return ["all"] * n
    y = y.cpu()
    if y.dim() == 1:
        return [str(v) for v in y.tolist()]
    return ["".join(str(int(v)) for v in row) for row in y.tolist()]


def ppo_loss(logp, logp_old, adv, clip_range):
    """ALGORITHM (DDPO_IS, Black et al. 2023: PPO-clip, Schulman et al. 2017): per transition
    rho = pi_theta(x_m | x_n) / pi_old(x_m | x_n), loss = max(-A rho, -A clip(rho, 1 - c, 1 + c)).
    Before any update rho = 1 and the loss's gradient is the REINFORCE one, -A grad log pi.
    Returns (loss, ratio)."""
    ratio = torch.exp(logp - logp_old)
    unclipped = -adv * ratio
    clipped = -adv * ratio.clamp(1 - clip_range, 1 + clip_range)
    return torch.maximum(unclipped, clipped).mean(), ratio


@torch.no_grad()
def rollout(process, net, x, y, grid, eta, gen, clip=False, cfg_scale=0.0):
    """ALGORITHM (DDPO, sampling): run the policy ``net`` from the noise x over the sampler's
    ``grid``, recording the MDP. Returns the states before and after each stochastic step
    (B, T + 1, ...), log pi(x_m | x_n) of each of those T steps (B, T) float64, and X_0. The draws
    are DDPM.step's, so X_0 equals DDPM.sample's from the same noise and generator. No host sync."""
    xs, lps = [x], []
    for n, m in zip(grid[:-1], grid[1:]):
        mean, sigma = process.step_mean_std(net, x, n, m, y, eta, clip, cfg_scale)
        if sigma > 0:  # an action: x_m ~ N(mean_theta(x_n, n), sigma_n^2 I) and its log-density
            x = mean + sigma * randn(x.shape, gen, mean)
            lps.append(gaussian_log_prob(x, mean, sigma))
            xs.append(x)
        else:  # the last step, to n = 0: deterministic, not an action
            x = mean
    return torch.stack(xs, 1), torch.stack(lps, 1), x


def action_sigmas(process, actions, eta, device):
    """sigma and log sigma of each action n -> m, computed as the sampler computes them (python
    math: torch's float64 sqrt and log can differ from it in the last bit), as (T,) float64."""
    sig = [process.sigma(n, m, eta) for n, m in actions]
    return (
        torch.tensor(sig, dtype=torch.float64, device=device),
        torch.tensor([math.log(v) for v in sig], dtype=torch.float64, device=device),
    )


def transition_logp(
    process, net, x_n, x_m, n, m, sigma, log_sigma, y, eta, clip=False, cfg_scale=0.0
):
    """log pi_theta(x_m | x_n) of a minibatch of stored transitions, each row at its own step
    n -> m ((B,) long tensors; sigma, log_sigma (B,) rows of ``action_sigmas``), by the sampler's
    own formula (DDPM.step_mean_std), so that before any update it equals the recorded value bit
    for bit. Returns (logp, mean)."""
    mean, _ = process.step_mean_std(net, x_n, n, m, y, eta, clip, cfg_scale)
    return gaussian_log_prob(x_m, mean, sigma, log_sigma), mean


def kl_to_reference(mean, mean_ref, sigma):
    """KL(pi_theta || pi_ref) of one step: two Gaussians with the same sigma, so
    ||mean_theta - mean_ref||^2 / (2 sigma^2) (B,), float64."""
    sq = (mean.double() - mean_ref.double()).pow(2).flatten(1).sum(1)
    return sq / (2 * sigma.reshape(-1) ** 2)


def main(argv=None):
    args = get_args(argv)
    task = get_task(args.task)
    dist = common.Dist(
        common.pick_device(args.device)
    )  # torchrun: this rank; a plain process: rank 0 of 1
    device = dist.device
    args.out = args.out or os.path.join("runs", "ddpo", task.name)
    common.check_out(args.out)
    eta = 1.0 if args.sampler == "ddpm" else args.eta
    fid_samples = common.fid_count(args.fid_samples, device, task)
    clip = task.kind == "image"
    torch.manual_seed(args.seed)

    # ---- the frozen reference, the reward and the policy; checked before --out is touched
    base_path = common.ensure_base(
        args.base, task, "ddpm", seed=args.seed, device=args.device, data_dir=args.data_dir
    )
    ref, process, base_ckpt = common.load_base(base_path, device, task=task)
    conditional = common.check_ddpm_reference(
        ref, process, base_ckpt, base_path, args.sample_steps, args.cfg_scale, "DDPO"
    )
    cfg = ref.config
    data = task.dataset("train", args.data_dir) if cfg.get("cond_dim") else None
    reward = rewards.get_reward(
        args.reward, task, device, conditional, args.data_dir, args.classifier
    )
    args.reward = reward.name
    # the policy pi_theta: a copy of the reference. It stays in eval mode (no dropout) while it is
    # trained, so that the policy the PPO ratio compares is the one that sampled.
    model = model_from_checkpoint(base_ckpt, device)[0].requires_grad_(True)
    ema = EMA(model, args.ema_decay)
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.0)
    ref_net = common.wrap_net(ref, args.bf16, args.compile)
    train_net = common.wrap_net(dist.wrap(model), args.bf16, args.compile)  # DDP under torchrun
    fid = FID(task, fid_samples, device, args.data_dir) if fid_samples else None
    # the MDP's actions: the sampler's steps with sigma > 0, i.e. every step but the last (to n = 0)
    grid = process.grid(process.N, 0, args.sample_steps)
    actions = [(n, m) for n, m in zip(grid[:-1], grid[1:]) if process.sigma(n, m, eta) > 0]
    T = len(actions)
    if T == 0:
        raise UsageError(
            f"--sample-steps {args.sample_steps}: the chain has no stochastic step "
            f"(the step to n = 0 is deterministic); use --sample-steps >= 2"
        )
    step_n = torch.tensor([n for n, _ in actions], device=device)
    step_m = torch.tensor([m for _, m in actions], device=device)
    sigma, log_sigma = action_sigmas(process, actions, eta, device)
    per_round = args.prompts * args.M
    k_steps = max(1, math.ceil(args.timestep_fraction * T))  # steps trained per chain per epoch
    n_trans = per_round * k_steps
    opt_steps = args.inner_epochs * math.ceil(n_trans / args.batch_size)

    ckpt_path = os.path.join(args.out, "ckpt.pt")
    done, samples, history, base_eval, stat_state = 0, 0, [], None, None
    ckpt = common.load_resume(ckpt_path, args, MAY_CHANGE)
    if ckpt is not None:
        done, extra = common.restore(ckpt, model, ema, opt)
        for group in opt.param_groups:  # --lr may change on resume (the state holds the old one)
            group["lr"] = args.lr
        samples, history = extra["samples_generated"], extra["history"]
        base_eval, stat_state = extra["base_eval"], extra["stats"]
        print(f"resumed from {ckpt_path} after round {done} ({samples} samples generated)")
    tracker = PerConditionStats(args.buffer_size, args.min_count, stat_state)
    log = common.RunLog(
        args.out, args, resumed_at=("round", done) if ckpt is not None else None, write=dist.main
    )
    state_mb = per_round * (T + 1) * math.prod(task.shape()) * 4 / 2**20
    common.print_derived(
        f"ddpo on {task.name}",
        device=device,
        base=base_path,
        conditional=conditional,
        reward=f"{reward.name}: {reward.description}",
        samples_per_round=f"{args.prompts} conditions x M={args.M} = {per_round}",
        rounds=args.rounds,
        sample_budget=args.rounds * per_round,
        sampler=f"{args.sampler} eta={eta}, {args.sample_steps} steps over N={process.N}, "
        f"cfg {args.cfg_scale}",
        mdp=f"{T} stochastic steps per chain (+1 deterministic to n = 0); states kept "
        f"{state_mb:.1f} MiB per round",
        ppo=f"clip {args.clip_range}, {args.inner_epochs} inner epoch(s) x {k_steps} of {T} steps "
        f"per chain = {n_trans} transitions per epoch, minibatch {args.batch_size}",
        optimiser_steps_per_round=opt_steps,
        advantages=f"per condition, buffer {args.buffer_size}, min count {args.min_count}, "
        f"clipped to +-{args.adv_clip}",
        kl_to_reference=args.kl_coef,
        optimiser=f"AdamW lr {args.lr} (constant), grad clip {args.grad_clip}, "
        f"EMA {ema.describe()}",
        eval=f"{args.eval_samples} samples" + (f", FID on {fid_samples}" if fid_samples else ""),
        out=args.out,
    )

    def sample_chains(net, y, n, seed):
        """1. n chains of the policy ``net``, in batches: (states, log pi_old, X_0). Batch k draws
        from its own generator (seed, k); under torchrun each rank runs its share, then all
        gather."""
        states = [torch.zeros((0, T + 1, *task.shape()), device=device)]
        logps = [torch.zeros((0, T), dtype=torch.float64, device=device)]
        x0s = [torch.zeros((0, *task.shape()), device=device)]
        starts = range(0, n, args.sample_batch)
        lo, hi = dist.shard(len(starts))
        for i in common.progress(starts[lo:hi], "sample"):
            gen = common.generator(seed * 100_003 + i // args.sample_batch, device)
            b = min(args.sample_batch, n - i)
            x = torch.randn((b, *task.shape()), generator=gen, device=device)
            yb = y[i : i + b] if y is not None else None
            xs, lp, x0 = rollout(process, net, x, yb, grid, eta, gen, clip, args.cfg_scale)
            states.append(xs)
            logps.append(lp)
            x0s.append(x0.clamp(-1, 1) if clip else x0)
        return (
            dist.gather(torch.cat(states)),
            dist.gather(torch.cat(logps)),
            dist.gather(torch.cat(x0s)),
        )

    @torch.no_grad()
    def draw(net, y, n, seed):
        """n samples X_0 of ``net`` (conditions y) over the sampler's grid; batch k draws its noise
        from its own generator (seed, k), as graft.py's evaluation does."""
        xs = [torch.zeros((0, *task.shape()), device=device)]
        starts = range(0, n, args.sample_batch)
        lo, hi = dist.shard(len(starts))
        for i in common.progress(starts[lo:hi], "sample"):
            gen = common.generator(seed * 100_003 + i // args.sample_batch, device)
            b = min(args.sample_batch, n - i)
            x = torch.randn((b, *task.shape()), generator=gen, device=device)
            yb = y[i : i + b] if y is not None else None
            x, _ = process.sample(
                net,
                x,
                None,
                0,
                yb,
                gen,
                eta,
                args.sample_steps,
                clip=clip,
                cfg_scale=args.cfg_scale,
            )
            xs.append(x.clamp(-1, 1) if clip else x)
        return dist.gather(torch.cat(xs))

    def evaluate(net, tag):
        n = max(args.eval_samples, fid_samples)
        seed = args.seed + 999_983  # graft.py's conditions and noise, for the base and every round
        y = (
            task.sample_conditions(n, common.generator(seed, device), device, data)
            if conditional
            else None
        )
        x = draw(net, y, n, seed)
        ev = evaluate_samples(x, y, reward, task, args.eval_samples, fid, None, args.sample_batch)
        print(
            f"   eval {tag}: "
            + ", ".join(f"{k}={v:.4f}" for k, v in ev.items() if isinstance(v, float)),
            flush=True,
        )
        return ev, x

    x_base = None
    if base_eval is None:
        base_eval, x_base = evaluate(ref_net, "base")
    last = history[-1]["eval"] if history else base_eval
    with common.StopSignals() as stop:
        for rnd in range(done + 1, args.rounds + 1):
            gen = common.generator(args.seed * 1000 + rnd, device)
            # 1. M chains per condition from the current policy (on-policy), every step recorded
            policy = common.wrap_net(model, args.bf16, args.compile)  # samples (never through DDP)
            y = (
                task.sample_conditions(args.prompts, gen, device, data, repeat=args.M)
                if conditional
                else None
            )
            chains, logp_old, x0 = sample_chains(policy, y, per_round, args.seed * 1000 + rnd)
            samples += per_round
            # 2. the reward of every chain's X_0
            r = rewards.score(reward, x0, y, args.sample_batch)
            # 3. ALGORITHM (DDPO, per-prompt stat tracking): advantages normalised per condition,
            #    clipped; every step of a chain gets its chain's advantage
            adv_np = tracker.advantages(condition_keys(y, per_round), r.double().cpu().numpy())
            adv = torch.from_numpy(adv_np).to(device).clamp(-args.adv_clip, args.adv_clip)
            # 4. ALGORITHM (DDPO, PPO): inner epochs over the transitions, shuffled over chains
            #    and steps, minibatches of --batch-size transitions, one optimiser step each
            window, kls, clips, step = [], [], [], 0
            sums = torch.zeros(4, dtype=torch.float64, device=device)  # loss, kl, clipfrac, count
            for epoch in range(args.inner_epochs):
                # each chain's own random --timestep-fraction of its steps, then all in random order
                pick = torch.rand(per_round, T, generator=gen, device=device).argsort(1)
                pick = pick[:, :k_steps]
                rows = torch.arange(per_round, device=device).repeat_interleave(k_steps)
                cols = pick.reshape(-1)
                order = torch.randperm(n_trans, generator=gen, device=device)
                rows, cols = rows[order], cols[order]
                for lo in common.progress(
                    range(0, n_trans, args.batch_size), f"round {rnd} epoch {epoch + 1}"
                ):
                    i, j = rows[lo : lo + args.batch_size], cols[lo : lo + args.batch_size]
                    # torchrun: this rank's share of the minibatch, weighted so that DDP's average
                    # of
                    # the ranks' gradients is the whole minibatch's (a rank with no row runs one at
                    # 0)
                    size = len(i)
                    a, b = dist.shard(size)
                    weight = (b - a) * dist.world / size
                    i, j = (i[a:b], j[a:b]) if b > a else (i[:1], j[:1])
                    x_n, x_m = chains[i, j], chains[i, j + 1]
                    n, m = step_n[j], step_m[j]
                    yb = y[i] if y is not None else None
                    logp, mean = transition_logp(
                        process,
                        train_net,
                        x_n,
                        x_m,
                        n,
                        m,
                        sigma[j],
                        log_sigma[j],
                        yb,
                        eta,
                        clip,
                        args.cfg_scale,
                    )
                    loss, ratio = ppo_loss(logp, logp_old[i, j], adv[i], args.clip_range)
                    if args.kl_coef > 0:  # plus kl_coef KL(pi_theta || pi_ref) per step (not
                        # in DDPO: the per-step KL regulariser of DPOK, Fan et al. 2023)
                        with torch.no_grad():
                            mean_ref, _ = process.step_mean_std(
                                ref_net, x_n, n, m, yb, eta, clip, args.cfg_scale
                            )
                        kl_ref = kl_to_reference(mean, mean_ref, sigma[j])
                        loss = loss + args.kl_coef * kl_ref.mean()
                        sums[1] += kl_ref.detach().sum() * (b > a)
                    opt.zero_grad(set_to_none=True)
                    (loss * weight if dist.world > 1 else loss).backward()
                    if args.grad_clip > 0:
                        torch.nn.utils.clip_grad_norm_(model.parameters(), args.grad_clip)
                    opt.step()
                    ema.update(model)
                    step += 1
                    log_ratio = (logp - logp_old[i, j]).detach()
                    window.append(loss.detach().float())
                    kls.append(0.5 * log_ratio.pow(2).mean())  # DDPO's approx_kl
                    clips.append(((ratio.detach() - 1).abs() > args.clip_range).double().mean())
                    sums[0] += loss.detach() * (b - a)
                    sums[2] += clips[-1] * (b - a)
                    sums[3] += b - a
                    if step % LOG_EVERY == 0 or step == opt_steps:
                        loss_mean = common.check_loss(window, step, args.lr, dist=dist)
                        approx_kl = check_policy(kls, step, args.lr, dist)
                        log.log(
                            round=rnd,
                            step=step,
                            loss=loss_mean,
                            approx_kl=approx_kl,
                            clipfrac=torch.stack(clips).mean().item(),
                        )
                        window, kls, clips = [], [], []
                    if dist.any(stop.requested):
                        stop.requested = stop.requested or "SIGTERM"
                        stop.stop(
                            f"in round {rnd} at optimiser step {step}",
                            "rerun the same "
                            f"command with --resume: it continues after round {rnd - 1}",
                        )
            common.check_weights(model, f"{step} of round {rnd}", args.lr)
            tot = (dist.mean(sums) * dist.world).tolist()  # totals over all ranks' rows
            stats = dict(
                reward_all_mean=r.mean().item(),
                reward_all_std=r.std().item(),
                advantage_abs_mean=adv.abs().mean().item(),
                loss=tot[0] / tot[3],
                clipfrac=tot[2] / tot[3],
                kl_ref=tot[1] / tot[3] if args.kl_coef else None,
                optimiser_steps=step,
                samples_generated=samples,
            )
            # 5. evaluate fresh samples of the EMA weights (the same noise as the base's evaluation)
            ev, x_final = evaluate(
                common.wrap_net(ema.model, args.bf16, args.compile), f"round {rnd}"
            )
            last = ev
            history.append(dict(round=rnd, **stats, eval=ev))
            log.log(
                round=rnd,
                **stats,
                **{f"eval_{k}": v for k, v in ev.items() if not isinstance(v, list)},
            )
            kl_text = f", KL to ref {stats['kl_ref']:.4f}/step" if args.kl_coef else ""
            print(
                f"round {rnd}/{args.rounds}: reward of the chains "
                f"{stats['reward_all_mean']:.4f}, loss {stats['loss']:.4f}, clipfrac "
                f"{stats['clipfrac']:.3f}{kl_text}, eval reward {ev['reward_mean']:.4f} (base "
                f"{base_eval['reward_mean']:.4f}), samples {samples}",
                flush=True,
            )
            # 6. checkpoint (the stat tracker's buffers travel in it)
            if dist.main:
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
                        base_eval=base_eval,
                        base=base_path,
                        stats=tracker.state(),
                    ),
                )
            if x_base is None:  # resumed: the base's samples again, for the pictures
                x_base = evaluate(ref_net, "base (again, for the pictures)")[1]
            if dist.main:
                common.round_pictures(
                    task,
                    reward,
                    log,
                    x_base,
                    x_final,
                    (f"policy chains, round {rnd}", x0),
                    "ddpo (EMA)",
                    rnd,
                    cfg.get("num_classes") or 8,
                )

    summary = dict(
        task=task.name,
        method="ddpo",
        M=args.M,
        prompts=args.prompts,
        rounds=args.rounds,
        samples_generated=samples,
        reward=reward.name,
        sampler=args.sampler,
        sample_steps=args.sample_steps,
        eta=eta,
        cfg_scale=args.cfg_scale,
        clip_range=args.clip_range,
        inner_epochs=args.inner_epochs,
        kl_coef=args.kl_coef,
        ema=ema.describe(),
    )
    summary.update(common.evaluation_summary(base_eval, last, task, fid_samples, None))
    summary = log.summary(**summary, base=base_path, checkpoint=ckpt_path)
    common.print_done(summary, args.out)
    return summary


def check_policy(kls, step, lr, dist=None):
    """DDPO's approx_kl over the logged window (one host sync): non-finite or beyond KL_LIMIT nats
    per step means the updates left any trust region (a loss clipped by PPO can stay small while the
    policy explodes); raises Diverged before anything is written."""
    v = torch.stack(kls).mean()
    v = (dist.mean(v) if dist is not None else v).item()  # every rank decides alike under torchrun
    if not math.isfinite(v) or v > KL_LIMIT:
        raise common.Diverged(
            f"the policy diverged by step {step} (approx KL {v:.4g} per step "
            f"from the sampling policy); the learning rate --lr {lr:g} is likely "
            f"too high: lower it. The last good checkpoint was kept"
        )
    return v


if __name__ == "__main__":
    common.run_main(main)
