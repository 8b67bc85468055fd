"""P-GRAFT: shape the intermediate distribution at step N_I, let the frozen reference finish.

    python pgraft.py                              # toy2d, N_I = 0.25 N; pretrains a missing base
    python pgraft.py --n-i abar:0.5               # N_I by noise level: the step with abar nearest
    python pgraft.py --loss x0                    # plain loss on accepted X_0, n > N_I (comparison)
    python pgraft.py --task mnist --n-i 0.25      # class-conditional MNIST, reward log p(label | x)
    python pgraft.py --task celeba --device cuda --bf16   # GPU preset: 4 rounds of 256 x 8 samples
    python -m experiments.pgraft_sweep --n-i 0,0.1,0.25,0.5   # a sweep over N_I, table and plot

Each round (paper, P-GRAFT): 1. the sampling model runs N -> 0 keeping X_{N_I} -> 2. reward on
X_0 -> 3. accept by the GRAFT rule -> 4. fine-tune a copy of the reference on the kept states
X_{N_I} with the bridge loss, steps n in (N_I, N] only -> 5. evaluate: the fine-tuned model runs
N -> N_I, the frozen reference N_I -> 0 -> 6. checkpoint. The continuation must draw noise
(otherwise X_0 is a function of X_{N_I} and this is GRAFT again): --eta 0, and an N_I whose
continuation on the sampling grid is one deterministic step, are refused.

This file is graft.py's round with the P-GRAFT lines changed: at N_I = 0 it reproduces graft.py's
accepted set, weights and summary exactly (tests/test_pgraft.py). It also writes the Lemma 4.3
diagnostic E[Var(r(X_0) | X_t)] (OUT/lemma43.json/.png). Default OUT: runs/pgraft/<task>-<accept>.
"""

import dataclasses
import os

import torch
from torch.utils.data import TensorDataset

import common
import harness
import rewards
from eval import lemma43
from eval.metrics import FID
from harness import arg
from models import EMA, lr_at, model_from_checkpoint
from rewards.acceptance import AcceptRule, condition_groups
from tasks import Batches, get_task


# fmt: off
@dataclasses.dataclass
class Args(harness.FinetuneArgs):
    """P-GRAFT: shape the distribution at step N_I, let the frozen reference finish. Flags:
    harness.FinetuneArgs (as graft.py's) and these."""

    n_i: str = arg("0.25", "N_I: a fraction of N in [0, 1), an integer step, or abar:A (the step "
                   "whose abar is nearest A); 0 is GRAFT")
    loss: str = arg("bridge", "bridge: the bridge loss on kept X_{N_I} (P-GRAFT); x0: the plain "
                    "loss on accepted X_0 for n > N_I (comparison)", choices=["bridge", "x0"])
    lemma_levels: str = arg("0.1,0.25,0.5,1.0", "levels t (fractions of N or steps) of the Lemma "
                            "4.3 diagnostic E[Var(r(X_0) | X_t)], plus N_I; none: skip it",
                            may_change=True)
    lemma_states: int = arg(256, "states X_t of the diagnostic", check=common.pos_int,
                            may_change=True)
    lemma_continuations: int = arg(8, "random continuations per state (>= 2)",
                                   check=common.pos_int, may_change=True)



# per-task overrides: graft.py's (harness.FINETUNE_DEFAULTS) and the diagnostic's states
TASK_DEFAULTS = {t: dict(d, lemma_states=256 if t == "toy2d" else 16)
                 for t, d in harness.FINETUNE_DEFAULTS.items()}
# fmt: on


def main(argv=None):
    args, given = harness.parse(Args, argv, task_defaults=TASK_DEFAULTS, doc=__doc__)
    task = get_task(args.task)
    run = harness.Run(args, script="pgraft", out=os.path.join("runs", "pgraft",
                      f"{task.name}-{args.accept}"), batch_size=args.batch_size,
                      refuse_held=False)
    device = run.device
    eta = check_flags(args, given)
    rule = AcceptRule(args.accept, args.M, args.K, args.tau, args.alpha)
    args.K = rule.K
    fid_samples = common.fid_count(args.fid_samples, device, task)
    torch.manual_seed(args.seed)

    # the frozen reference, the reward and the copy to fine-tune (checked before --out is touched)
    base_path = common.ensure_base(args.base, task, "ddpm", seed=args.seed, device=args.device,
                                   data_dir=args.data_dir)
    ref, process, base_ckpt = common.load_base(base_path, device, task=task)
    conditional = common.check_ddpm_reference(ref, process, base_ckpt, base_path,
                                              args.sample_steps, args.cfg_scale, "P-GRAFT")
    # attribute rows to condition on (CelebA); class labels need none
    data = task.dataset("train", args.data_dir) if ref.config.get("cond_dim") else None
    reward = rewards.get_reward(args.reward, task, device, conditional, args.data_dir,
                                args.classifier)
    args.reward = reward.name
    N = process.N
    # ALGORITHM (paper, P-GRAFT): N_I on the chain, with a random continuation N_I -> 0
    n_i = common.parse_steps(args.n_i, process, "--n-i")[0]
    random_steps = common.check_continuation(process, n_i, args.sample_steps, eta)
    abar_ni = float(process.alpha_bar[n_i])
    levels = [] if args.lemma_levels == "none" else common.parse_steps(
        args.lemma_levels, process, "--lemma-levels", allow_n=True)
    model = model_from_checkpoint(base_ckpt, device)[0].requires_grad_(True)
    ema = EMA(model, args.ema_decay)
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.0)
    # the base and the fine-tuned model run at one precision; DDP under torchrun
    ref_net = common.wrap_net(ref, args.bf16, args.compile)
    train_net = common.wrap_net(run.dist.wrap(model), args.bf16, args.compile)
    fid = FID(task, fid_samples, device, args.data_dir) if fid_samples else None
    # toy2d: the exact mode weights of P-GRAFT's output at this N_I (rewards/toy2d.py)
    target = common.toy2d_target(task, reward, rule, abar_ni, args.rounds, args.sample_from)

    per_round = args.prompts * args.M
    done, saved = run.begin(model=model, ema=ema, opt=opt,
                            settings=dict(
                                common.finetune_settings(args, task, base_path, reward, ema,
                                                         conditional, eta, N, fid_samples, target),
                                n_i=f"{n_i} of N={N} ({n_i / N:.3f} N), abar_NI={abar_ni:.4f}, "
                                f"{random_steps} random continuation steps",
                                loss=args.loss, trained_steps=f"n in ({n_i}, {N}]"))
    samples, history = saved.get("samples_generated", 0), saved.get("history", [])
    pool = saved.get("pool")
    lemma = saved.get("lemma43")
    if levels and run.main and not done:
        # Lemma 4.3: E[Var(r(X_0) | X_t)] of the reference at each level t and at N_I
        lemma = lemma43.run(ref_net, process, task, reward, levels=levels, n_is=[n_i],
                            device=device, conditional=conditional, data=data, eta=eta,
                            **lemma43.flags(args))
    def evaluate(net, tag):
        """Fresh samples on fixed noise (the base's and every round's): ``net`` N -> N_I, the
        frozen reference N_I -> 0; reward, accuracy, FID, mode weights."""
        return run.evaluate([(net, N, n_i), (ref_net, n_i, 0)], tag, process=process, task=task,
                            reward=reward, eta=eta, conditional=conditional, data=data, fid=fid,
                            fid_samples=fid_samples, target=target)

    base_eval, x_base = saved.get("base_eval"), saved.get("base_preview")
    if base_eval is None:
        base_eval, x_base = evaluate(ref_net, "base")
        x_base = common.preview(x_base, task)
    last = history[-1]["eval"] if history else base_eval
    warmup = min(args.warmup, args.train_steps // 2)
    with run.stop_signals():
        for rnd in range(done + 1, args.rounds + 1):
            gen = common.generator(args.seed * 1000 + rnd, device)
            # 1. draw M samples per condition from the frozen reference (--sample-from current:
            # the stitched model so far), keeping X_{N_I}
            current = args.sample_from == "current" and rnd > 1
            sampler = common.wrap_net(ema.model, args.bf16, args.compile) if current else ref_net
            y = task.sample_conditions(args.prompts, gen, device, data,
                                       repeat=args.M) if conditional else None
            x0, x_ni = draw(run, process, [(sampler, N, n_i), (ref_net, n_i, 0)], y, per_round,
                            args.seed * 1000 + rnd, n_i=n_i, eta=eta, task=task)
            samples += per_round
            # 2. reward every sample's X_0
            r = rewards.score(reward, x0, y, args.sample_batch)
            # 3. accept by the GRAFT rule on X_0 within each condition's M samples; r_hat and the
            # KL proxy are X_0's, the kept X_{N_I} is accepted w.p. E[a(X_0) | X_{N_I}]
            mask = rule.select(r.view(args.prompts, args.M), gen).reshape(-1)
            acc_prob, r_hat = rule.reshaped(r, condition_groups(y))
            common.check_accepted(mask, r, rnd, args.accept)
            # ALGORITHM (paper, P-GRAFT): what is kept is the state X_{N_I} of each accepted
            # trajectory
            kept = x_ni[mask] if args.loss == "bridge" and n_i > 0 else x0[mask]
            ky = y[mask] if y is not None else None
            # --sample-from ref: one target every round, so the pool grows
            if args.sample_from == "ref" and pool is not None:
                kept = torch.cat([pool["x"].to(device), kept])
                ky = torch.cat([pool["y"].to(device), ky]) if ky is not None else None
            pool = {"x": kept.cpu(), **({"y": ky.cpu()} if ky is not None else {})}
            stats = common.round_stats(r, mask, r_hat, acc_prob, len(kept), samples, "_x0")

            # 4. fine-tune the copy of the reference on the kept states, steps n in (N_I, N] only
            labels = ky if ky is not None else torch.zeros(len(kept), dtype=torch.long,
                                                           device=device)
            batches = Batches(TensorDataset(kept, labels), args.batch_size, device,
                              seed=args.seed * 1000 + rnd)
            loss_gen = common.generator(args.seed * 1000 + 500 + rnd, device)
            model.train()
            for step in common.progress(range(args.train_steps), f"round {rnd}"):
                lr = lr_at(step, args.train_steps, args.lr, "cosine", warmup)
                for group in opt.param_groups:
                    group["lr"] = lr
                xb, yb = next(batches)
                yb = yb if conditional else None
                if args.loss == "bridge":
                    loss = bridge_loss(train_net, xb, yb, n_i, process, loss_gen, rows=run.rows)
                else:
                    # comparison: the plain loss on accepted X_0, only for n in (N_I, N]
                    loss = process.loss(train_net, xb, yb, loss_gen, n_range=(n_i + 1, N),
                                        rows=run.rows)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                if args.grad_clip > 0:
                    torch.nn.utils.clip_grad_norm_(model.parameters(), args.grad_clip)
                opt.step()
                ema.update(model)
                loss_mean = run.step(loss, step=step + 1, steps=args.train_steps, model=model,
                                     lr=lr, round=rnd)
            model.eval()
            # 5. evaluate: fine-tuned EMA weights N -> N_I, the frozen reference N_I -> 0
            last, x_final = evaluate(common.wrap_net(ema.model, args.bf16, args.compile),
                                     f"round {rnd}")
            history.append(dict(round=rnd, **stats, loss=loss_mean, eval=last))
            common.print_round(rnd, args.rounds, stats, loss_mean, last, base_eval)
            # 6. checkpoint (the pool first), metrics and pictures
            run.end_round(rnd, model=model, process=process, ema=ema, opt=opt, pool=pool,
                          row=dict(**stats, loss=loss_mean, **common.prefixed("eval_", last)),
                          extra=dict(samples_generated=samples, history=history,
                                     base_eval=base_eval, base_preview=x_base, base=base_path,
                                     n_i=n_i, lemma43=lemma),
                          pictures=dict(task=task, reward=reward, base=x_base, final=x_final,
                                        middle=(f"accepted X_0, round {rnd}", x0[mask]),
                                        name=f"pgraft N_I={n_i}",
                                        nrow=ref.config.get("num_classes")))

    summary = common.finetune_summary(args, "pgraft", samples=samples, reward=reward, eta=eta,
                                      ema=ema)
    summary.update(common.evaluation_summary(base_eval, last, task, fid_samples, target))
    summary.update(n_i=n_i, n_i_frac=n_i / N, abar_n_i=abar_ni,
                   random_continuation_steps=random_steps, loss=args.loss, lemma43=lemma)
    return run.finish(**summary, base=base_path)


@torch.no_grad()
def draw(run, process, segments, y, n, seed, *, n_i, eta, task):
    """n samples X_0 and their states X_{N_I}, this rank's share of the batches. ALGORITHM (paper,
    P-GRAFT, inference): ``segments`` = [(net, N, N_I), (reference, N_I, 0)]."""
    args, x0s, xnis = run.args, [], []
    for z, yb, gen in run.noise_batches(n, shape=task.shape(), seed=seed, batch=args.sample_batch,
                                        y=y):
        x, at = process.sample(segments, z, y=yb, generator=gen, eta=eta,
                               num_steps=args.sample_steps, return_at=[n_i],
                               clip=task.kind == "image", cfg_scale=args.cfg_scale,
                               progress=run.batch_progress)
        x0s.append(x.clamp(-1, 1) if task.kind == "image" else x)
        xnis.append(at[n_i])
    return run.gather(x0s, shape=task.shape()), run.gather(xnis, shape=task.shape())


def check_flags(args, given):
    """P-GRAFT's own refusals before any work; returns the sampler's eta."""
    eta = common.sampler_eta(args.sampler, args.eta, "eta" in given)
    if eta == 0:
        harness.refuse("P-GRAFT needs a random continuation N_I -> 0, but --sampler ddim --eta 0 "
                       "is deterministic: X_0 would be a function of X_{N_I} and P-GRAFT would "
                       "collapse to GRAFT; use --sampler ddpm or --eta > 0")
    if args.lemma_continuations < 2:
        harness.refuse("--lemma-continuations must be >= 2 (a variance needs two continuations)")
    if "," in args.n_i:
        harness.refuse(f"--n-i {args.n_i}: pgraft.py runs one N_I; sweep a list with python -m "
                       f"experiments.pgraft_sweep --n-i {args.n_i}")
    return eta


def bridge_loss(net, x_ni, y, n_i, process, gen, rows=None):
    """ALGORITHM (paper, P-GRAFT, training): the bridge loss on kept states X_{N_I}, n ~ U(N_I, N]:
        x_n = a_n X_{N_I} + s_n eps,  a_n = sqrt(abar_n / abar_{N_I}),  s_n = sqrt(1 - abar_n /
        abar_{N_I}),  loss = || (s_n / sqrt(1 - abar_n)) eps_theta(x_n, n) - eps ||^2.
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


if __name__ == "__main__":
    common.run_main(main)
