"""DDPO: fine-tune a diffusion model by policy gradient on its own denoising chain (the baseline).

    python ddpo.py                 # toy2d: 8 rounds of PPO-clip on the 50-step DDPM chain
    python ddpo.py --kl-coef 1     # plus a per-step KL penalty to the frozen reference
    python ddpo.py --task mnist    # class-conditional MNIST, reward log p(label | x)

DDPO (Black et al. 2023), the paper's policy-gradient baseline, makes the sampler an MDP: state
(x_n, n, condition), action x_m ~ N(mean_theta(x_n, n), sigma_n^2 I) (a DDPM or DDIM eta > 0 step;
the last, to n = 0, has sigma = 0 and is none), reward r(x_0, condition) at the end. Writes
graft.py's files but no pool (OUT: runs/ddpo/<task>).
"""

import dataclasses
import math
from collections import deque

import numpy as np
import torch

import common
import harness
import rewards
from harness import arg
from models import EMA, model_from_checkpoint
from models.diffusion import gaussian_log_prob, randn
from tasks import get_task


# fmt: off
@dataclasses.dataclass
class Args(harness.RunArgs):
    """DDPO: fine-tune a diffusion model by policy gradient on its own denoising chain."""

    base: str = arg(None, "reference DDPM (None: runs/pretrain/<task>-ddpm/ckpt.pt, or made)")
    reward: str = arg(
        None, "reward (None: the task's own): linear[:DEG], digit[:K], pair or attributes; "
        "ATTR[+ATTR...] (CelebA attributes); jpeg or jpeg-incompressibility")
    classifier: str = arg(None, "reward classifier (None: runs/rewards/<task>-classifier.pt)")
    prompts: int = arg(256, "conditions per round (MNIST labels cycle 0..9)", check=common.pos_int)
    M: int = arg(8, "chains per condition per round", check=common.pos_int)
    rounds: int = arg(8, "sample -> PPO rounds", check=common.pos_int, may_change=True)
    sampler: str = arg("ddpm", "ddpm: ancestral (eta = 1); ddim: generalised DDIM with --eta > 0",
                       choices=["ddpm", "ddim"])
    eta: float = arg(1.0, "DDIM eta of --sampler ddim (0: deterministic; ddpm is eta = 1)",
                     check=common.nonneg_float)
    sample_steps: int = arg(50, "sampler steps over the N-step chain", check=common.pos_int)
    cfg_scale: float = arg(0.0, "guidance w: eps_u + (1 + w)(eps_c - eps_u); needs --cond-drop",
                           check=common.nonneg_float)
    # PPO; DDPO's defaults for Stable Diffusion in brackets
    inner_epochs: int = arg(1, "passes over each round's transitions [1]", check=common.pos_int)
    batch_size: int = arg(2048, "transitions per optimiser step", check=common.pos_int)
    timestep_fraction: float = arg(1.0, "random fraction of each chain's steps per epoch [1.0]",
                                   check=common.pos_unit_float)
    clip_range: float = arg(0.1, "PPO clips the ratio to 1 +- c [1e-4]", check=common.pos_float)
    adv_clip: float = arg(5.0, "clip the advantages to [-A, A] [5]", check=common.pos_float)
    buffer_size: int = arg(2048, "rewards kept per condition [16]", check=common.pos_int)
    min_count: int = arg(16, "rewards for a condition's own statistics [16]", check=common.pos_int)
    kl_coef: float = arg(0.0, "weight of a per-step KL to pi_ref [0]", check=common.nonneg_float)
    lr: float = arg(3e-4, "AdamW learning rate, constant [3e-4 with LoRA]", check=common.pos_float,
                    may_change=True)
    grad_clip: float = arg(1.0, "clip the gradient norm (0: off) [1.0]", check=common.nonneg_float)
    ema_decay: float = arg(0.9, "EMA decay, warmed up as min(d, (1+s)/(10+s))",
                           check=common.unit_float)
    eval_samples: int = arg(5000, "fresh samples per evaluation", check=common.pos_int,
                            may_change=True)
    fid_samples: int = arg(-1, "FID samples on image tasks (-1: 5000 on CUDA, 0 on CPU)",
                           check=common.fid_int, may_change=True)
    sample_batch: int = arg(4000, "chains per sampler call (memory)", check=common.pos_int)


# Per-task overrides of the defaults above (toy2d's: docs/ddpo.md); the image ones are untuned.
MNIST = dict(M=8, rounds=20, sample_steps=50, batch_size=256, ema_decay=0.9, buffer_size=160)
MNIST16 = dict(MNIST, prompts=50, lr=1e-4, eval_samples=400, sample_batch=400)
IMAGE = dict(prompts=32, M=4, rounds=10, sample_steps=50, batch_size=64, lr=1e-5, ema_decay=0.99,
             buffer_size=128, eval_samples=256, sample_batch=32)
TASK_DEFAULTS = {"mnist": dict(MNIST, prompts=100, lr=1e-5, eval_samples=1000, sample_batch=800),
                 "mnist16": MNIST16, "mnist-pairs": MNIST16, "mnist-pairs16": MNIST16,
                 "celeba": IMAGE, "celebahq": IMAGE, "church": IMAGE}
# fmt: on


class PerConditionStats:
    """DDPO's per-prompt stat tracking: advantage (r - mean) / (std + 1e-6) over the last
    ``buffer_size`` rewards of r's condition (this round's included; the round's if < min_count)."""

    def __init__(self, buffer_size, min_count, state=None):
        self.buffer_size, self.min_count = buffer_size, min_count
        self.buffers = {k: deque(v, maxlen=buffer_size) for k, v in (state or {}).items()}

    def advantages(self, keys, r):
        """keys: one string per sample naming its condition; r: (n,) float64 numpy."""
        adv, keys = np.empty_like(r), np.asarray(keys)
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
    """A string naming each sample's condition: "all", the label, or the attribute row."""
    if y is None:
        return ["all"] * n
    return [str(v) if y.dim() == 1 else "".join(str(int(u)) for u in v) for v in y.cpu().tolist()]


def ppo_loss(logp, logp_old, adv, clip_range):
    """ALGORITHM (DDPO_IS, Black et al. 2023: PPO-clip, Schulman et al. 2017): per transition
    rho = pi_theta(x_m | x_n) / pi_old(x_m | x_n), loss = max(-A rho, -A clip(rho, 1 - c, 1 + c));
    at rho = 1 (before any update) its gradient is REINFORCE's. Returns (loss, rho)."""
    ratio = torch.exp(logp - logp_old)
    clipped = -adv * ratio.clamp(1 - clip_range, 1 + clip_range)
    return torch.maximum(-adv * ratio, clipped).mean(), ratio


@torch.no_grad()
def rollout(process, net, x, y, grid, eta, gen, clip=False, cfg_scale=0.0):
    """ALGORITHM (DDPO, sampling): the policy ``net`` from the noise x over ``grid``: the states
    before and after each stochastic step (B, T + 1, ...), their log pi(x_m | x_n) (B, T) float64,
    and X_0 (DDPM.sample's from the same noise and generator; clipped like graft.py's)."""
    xs, lps = [x], []
    for n, m in zip(grid[:-1], grid[1:]):
        mean, sigma = process.step_mean_std(net, x, n, m, y, eta, clip, cfg_scale)
        if sigma > 0:
            # an action: x_m ~ N(mean_theta(x_n, n), sigma_n^2 I) and its log-density
            x = mean + sigma * randn(x.shape, gen, mean)
            lps.append(gaussian_log_prob(x, mean, sigma))
            xs.append(x)
        else:
            # the last step, to n = 0: deterministic, not an action
            x = mean
    return torch.stack(xs, 1), torch.stack(lps, 1), x.clamp(-1, 1) if clip else x


def action_sigmas(process, actions, eta, device):
    """sigma and log sigma (T,) float64 of each action n -> m, with python's math as the sampler
    (torch's float64 sqrt and log can differ from it in the last bit)."""
    sig = [process.sigma(n, m, eta) for n, m in actions]
    return torch.tensor([sig, [math.log(v) for v in sig]], dtype=torch.float64, device=device)


def transition_logp(process, net, x_n, x_m, n, m, sigma, log_sigma, y, eta, clip=False,
                    cfg_scale=0.0):
    """(log pi_theta(x_m | x_n), mean) of stored transitions, a step n -> m per row, by the
    sampler's formula: before any update it equals the recorded value bit for bit."""
    mean, _ = process.step_mean_std(net, x_n, n, m, y, eta, clip, cfg_scale)
    return gaussian_log_prob(x_m, mean, sigma, log_sigma), mean


def kl_to_reference(mean, mean_ref, sigma):
    """KL(pi_theta || pi_ref) of a step, (B,) float64: ||mean - mean_ref||^2 / (2 sigma^2)."""
    return (mean.double() - mean_ref.double()).pow(2).flatten(1).sum(1) / (2 * sigma.reshape(-1)**2)


def mdp_actions(process, sample_steps, eta, device):
    """ALGORITHM (DDPO, the MDP): actions are the steps n -> m with sigma > 0 (all but the last):
    the grid and, per action, n, m, sigma, log sigma."""
    grid = process.grid(process.N, 0, sample_steps)
    actions = [(n, m) for n, m in zip(grid[:-1], grid[1:]) if process.sigma(n, m, eta) > 0]
    if not actions:
        harness.refuse(f"--sample-steps {sample_steps}: the chain has no stochastic step (the step "
                       "to n = 0 is deterministic); use --sample-steps >= 2")
    n, m = (torch.tensor(v, device=device) for v in zip(*actions))
    return (grid, n, m, *action_sigmas(process, actions, eta, device))


def settings(args, *, base_path, reward, conditional, eta, N, T, k_steps, n_trans, opt_steps, ema,
             fid_samples, shape):
    """The run's derived quantities, printed before it starts."""
    a, per_round = args, args.prompts * args.M
    mib = per_round * (T + 1) * math.prod(shape) * 4 / 2**20
    return dict(
        base=base_path, conditional=conditional, reward=f"{reward.name}: {reward.description}",
        samples_per_round=f"{a.prompts} conditions x M={a.M} = {per_round}", rounds=a.rounds,
        sample_budget=a.rounds * per_round, sampler=f"{a.sampler} eta={eta}, "
        f"{a.sample_steps} steps over N={N}, cfg {a.cfg_scale}",
        mdp=f"{T} stochastic steps per chain (+1 deterministic to n = 0); states kept {mib:.1f} "
        "MiB per round",
        ppo=f"clip {a.clip_range}, {a.inner_epochs} inner epoch(s) x {k_steps} of {T} steps per "
        f"chain = {n_trans} transitions per epoch, minibatch {a.batch_size}",
        optimiser_steps_per_round=opt_steps,
        advantages=f"per condition, buffer {a.buffer_size}, min count {a.min_count}, clipped to "
        f"+-{a.adv_clip}", kl_to_reference=a.kl_coef,
        optimiser=f"AdamW lr {a.lr} (constant), grad clip {a.grad_clip}, EMA {ema.describe()}",
        eval=f"{a.eval_samples} samples" + (f", FID on {fid_samples}" if fid_samples else ""))


def main(argv=None):
    args, given = harness.parse(Args, argv, task_defaults=TASK_DEFAULTS, doc=__doc__)
    eta = common.sampler_eta(args.sampler, args.eta, "eta" in given)
    if eta == 0:
        harness.refuse("--sampler ddim --eta 0 is deterministic: its steps have no density, so "
                       "DDPO has no policy log-probability; use --sampler ddpm or --eta > 0")
    if args.min_count > args.buffer_size:
        harness.refuse(f"--min-count {args.min_count} exceeds --buffer-size {args.buffer_size}: no "
                       "condition could ever use its own statistics")
    task = get_task(args.task)
    # a held --out is refused in run.begin, after the flags and the base are checked
    run = harness.Run(args, script="ddpo", out=f"runs/ddpo/{task.name}", refuse_held=False)
    device, dist, clip = run.device, run.dist, task.kind == "image"
    fid_samples = common.fid_count(args.fid_samples, device, task)
    torch.manual_seed(args.seed)

    # the frozen reference, the reward and the policy (checked before --out is touched)
    ref, process, base_ckpt, base_path, conditional, data = common.load_reference(
        args, task, device, method="DDPO")
    reward = rewards.get_reward(args.reward, task, device, conditional, args.data_dir,
                                args.classifier)
    args.reward = reward.name
    # the policy pi_theta: a copy of the reference, in eval mode (no dropout) while it is trained,
    # so that the policy the PPO ratio compares is the one that sampled
    model = model_from_checkpoint(base_ckpt, device)[0].requires_grad_(True)
    ema = EMA(model, args.ema_decay)
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.0)
    # the reference and the policy run at one precision; DDP under torchrun
    ref_net = common.wrap_net(ref, args.bf16, args.compile)
    train_net = common.wrap_net(dist.wrap(model), args.bf16, args.compile)
    grid, step_n, step_m, sigma, log_sigma = mdp_actions(process, args.sample_steps, eta, device)
    # a round: per_round chains of T actions; an epoch trains k_steps of each chain's T
    per_round, T = args.prompts * args.M, len(step_n)
    k_steps = max(1, math.ceil(args.timestep_fraction * T))
    n_trans = per_round * k_steps
    opt_steps = args.inner_epochs * math.ceil(n_trans / args.batch_size)

    done, saved = run.begin(model=model, ema=ema, opt=opt, settings=settings(
        args, base_path=base_path, reward=reward, conditional=conditional, eta=eta, N=process.N,
        T=T, k_steps=k_steps, n_trans=n_trans, opt_steps=opt_steps, ema=ema,
        fid_samples=fid_samples, shape=task.shape()))
    # the learning rate is constant; --lr may change on resume (the restored state holds the old)
    for group in opt.param_groups:
        group["lr"] = args.lr
    samples, history = saved.get("samples_generated", 0), saved.get("history", [])
    tracker = PerConditionStats(args.buffer_size, args.min_count, saved.get("stats"))

    def evaluate(net, tag):
        # graft.py's evaluation: its conditions and noise, the same for the base and every round
        return run.evaluate(net, tag, process=process, task=task, reward=reward, eta=eta,
                            conditional=conditional, data=data, fid_samples=fid_samples)

    base_eval, x_base = saved.get("base_eval"), saved.get("base_preview")
    if base_eval is None:
        base_eval, x_base = evaluate(ref_net, "base")
        x_base = common.preview(x_base, task)
    last = history[-1]["eval"] if history else base_eval
    with run.stop_signals():
        for rnd in range(done + 1, args.rounds + 1):
            gen = common.generator(args.seed * 1000 + rnd, device)
            # 1. M chains per condition from the current policy (never through DDP), recording
            # every step's (x_n, x_m, log pi_old(x_m | x_n)); this rank's batches, then gathered
            policy = common.wrap_net(model, args.bf16, args.compile)
            y = task.sample_conditions(args.prompts, gen, device, data,
                                       repeat=args.M) if conditional else None
            batches = run.noise_batches(per_round, shape=task.shape(), seed=args.seed * 1000 + rnd,
                                        batch=args.sample_batch, y=y)
            parts = [rollout(process, policy, z, y=yb, grid=grid, eta=eta, gen=g, clip=clip,
                             cfg_scale=args.cfg_scale) for z, yb, g in batches]
            states, logps, x0s = zip(*parts) if parts else ((), (), ())
            chains = run.gather(states, shape=(T + 1, *task.shape()))
            logp_old = run.gather(logps, shape=(T,), dtype=torch.float64)
            x0 = run.gather(x0s, shape=task.shape())
            samples += per_round
            # 2. the reward of every chain's X_0
            r = rewards.score(reward, x0, y, args.sample_batch)
            # 3. ALGORITHM (DDPO, per-prompt stat tracking): advantages normalised per condition,
            # clipped; every step of a chain gets its chain's advantage
            adv = tracker.advantages(condition_keys(y, per_round), r.double().cpu().numpy())
            adv = torch.from_numpy(adv).to(device).clamp(-args.adv_clip, args.adv_clip)
            # 4. ALGORITHM (DDPO, PPO): inner epochs over the shuffled transitions, one optimiser
            # step per minibatch; this rank's sums of the loss, KL to ref, clipped ratios and rows
            step, sums = 0, torch.zeros(4, dtype=torch.float64, device=device)
            for epoch in range(args.inner_epochs):
                # each chain's own random k_steps of its T steps, all (chain, step) pairs shuffled
                pick = torch.rand(per_round, T, generator=gen, device=device).argsort(1)
                order = torch.randperm(n_trans, generator=gen, device=device)
                rows = torch.arange(per_round, device=device).repeat_interleave(k_steps)[order]
                cols = pick[:, :k_steps].reshape(-1)[order]
                for lo in common.progress(range(0, n_trans, args.batch_size),
                                          f"round {rnd} epoch {epoch + 1}"):
                    i, j = rows[lo : lo + args.batch_size], cols[lo : lo + args.batch_size]
                    # torchrun: this rank's share, weighted so that DDP's average of the ranks'
                    # gradients is the whole minibatch's (a rank with no row runs one at weight 0)
                    a, b = dist.shard(len(i))
                    weight = (b - a) * dist.world / len(i)
                    i, j = (i[a:b], j[a:b]) if b > a else (i[:1], j[:1])
                    x_n, x_m, n, m = chains[i, j], chains[i, j + 1], step_n[j], step_m[j]
                    yb = y[i] if y is not None else None
                    logp, mean = transition_logp(process, train_net, x_n, x_m, n, m, sigma[j],
                                                 log_sigma[j], yb, eta, clip, args.cfg_scale)
                    # ALGORITHM (DDPO_IS, Black et al. 2023): PPO-clip, the chain's advantage
                    loss, ratio = ppo_loss(logp, logp_old[i, j], adv[i], args.clip_range)
                    if args.kl_coef > 0:
                        # plus kl_coef KL(pi_theta || pi_ref) per step, the frozen reference's
                        # mean (not in DDPO: the per-step KL regulariser of DPOK, Fan et al. 2023)
                        mean_ref, _ = process.step_mean_std(ref_net, x_n, n, m, yb, eta, clip,
                                                            args.cfg_scale)
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
                    clipped = ((ratio.detach() - 1).abs() > args.clip_range).double().mean()
                    sums[0] += loss.detach() * (b - a)
                    sums[2] += clipped * (b - a)
                    sums[3] += b - a
                    # logged: the loss and DDPO's approx_kl of the policy from the sampling one
                    log_ratio = (logp - logp_old[i, j]).detach()
                    run.step(loss, step=step, steps=opt_steps, model=model, lr=args.lr, round=rnd,
                             approx_kl=0.5 * log_ratio.pow(2).mean(), clipfrac=clipped)

            # 5. evaluate fresh samples of the EMA weights (the same noise as the base's evaluation)
            last, x_final = evaluate(common.wrap_net(ema.model, args.bf16, args.compile),
                                     f"round {rnd}")
            stats = round_stats(rnd, args, r, adv, dist, sums, step, samples, last, base_eval)
            history.append(dict(round=rnd, **stats, eval=last))
            # 6. checkpoint (the stat tracker's buffers travel in it), metrics and pictures
            run.end_round(rnd, model=model, process=process, ema=ema, opt=opt,
                          row=dict(**stats, **common.prefixed("eval_", last)),
                          extra=dict(samples_generated=samples, history=history,
                                     base_eval=base_eval, base=base_path, stats=tracker.state(),
                                     base_preview=x_base),
                          pictures=dict(task=task, reward=reward, base=x_base, final=x_final,
                                        middle=(f"policy chains, round {rnd}", x0),
                                        name="ddpo (EMA)", nrow=ref.config.get("num_classes")))

    return run.finish(task=task.name, method="ddpo", M=args.M, prompts=args.prompts,
                      rounds=args.rounds, samples_generated=samples, reward=reward.name,
                      sampler=args.sampler, sample_steps=args.sample_steps, eta=eta,
                      cfg_scale=args.cfg_scale, clip_range=args.clip_range,
                      inner_epochs=args.inner_epochs, kl_coef=args.kl_coef, ema=ema.describe(),
                      **common.evaluation_summary(base_eval, last, task, fid_samples),
                      base=base_path)


def round_stats(rnd, args, r, adv, dist, sums, steps, samples, ev, base_eval):
    """A round's numbers, printed in one line: the chains' rewards and advantages, and per
    transition over all ranks' rows the loss, the clipped fraction and the KL to the reference."""
    loss, kl, clipped, rows = (dist.mean(sums) * dist.world).tolist()
    s = dict(reward_all_mean=r.mean().item(), reward_all_std=r.std().item(),
             advantage_abs_mean=adv.abs().mean().item(), loss=loss / rows, clipfrac=clipped / rows,
             kl_ref=kl / rows if args.kl_coef else None, optimiser_steps=steps,
             samples_generated=samples)
    kl = f", KL to ref {s['kl_ref']:.4f}/step" if args.kl_coef else ""
    print(f"round {rnd}/{args.rounds}: reward of the chains {s['reward_all_mean']:.4f}, loss "
          f"{s['loss']:.4f}, clipfrac {s['clipfrac']:.3f}{kl}, eval reward {ev['reward_mean']:.4f} "
          f"(base {base_eval['reward_mean']:.4f}), samples {samples}", flush=True)
    return s


if __name__ == "__main__":
    common.run_main(main)
