"""GRAFT: fine-tune a diffusion model on the samples of its reference that an acceptance rule keeps.

    python graft.py                          # toy2d, top-2 of 8, one round from the frozen
    reference
    python graft.py --accept rs --alpha 0.5  # classical rejection sampling, target p exp(r/alpha)
    python graft.py --task mnist --rounds 2  # class-conditional MNIST, reward log p(label | image)
    python graft.py --task celeba --reward smiling --device cuda --bf16

Each round (paper, GRAFT): 1. draw M samples per condition from the sampling model -> 2. reward ->
3. accept by the rule -> 4. fine-tune a copy of the reference on the accepted samples with the
ordinary diffusion loss -> 5. evaluate fresh samples -> 6. checkpoint. For every rule the accepted
law is p(x) a(x) / Z with a(x) = P(accept | x); the reshaped reward r_hat = alpha log a(x) (from the
round's empirical reward CDF) makes that the KL-regularised optimum p exp(r_hat / alpha) / Z:
logged.

Writes OUT/args.json, metrics.jsonl (a line per round and per 100 fine-tuning steps), summary.json,
ckpt.pt (--resume continues after the last finished round), pool_round<k>.pt (the accepted samples)
and pictures. Default OUT: runs/graft/<task>-<accept>. pgraft.py is this file's sibling: at N_I = 0
it reproduces this script exactly (tests/test_pgraft.py pins the copied lines).
"""

import os

import torch
from torch.utils.data import TensorDataset

import common
import rewards
from eval.metrics import FID, evaluate_samples
from models import EMA, lr_at, model_from_checkpoint, save_checkpoint
from rewards.acceptance import RULES, AcceptRule, condition_groups, kl_proxy
from tasks import Batches, UsageError, get_task

# Per-task overrides of the defaults in get_args. Samples per round = prompts x M.
# fmt: off
IMAGE = dict(prompts=64, rounds=2, sample_steps=100, train_steps=1000, batch_size=16, lr=2e-5,
             ema_decay=0.999, eval_samples=256, sample_batch=32)
TASK_DEFAULTS = {
    "toy2d": dict(prompts=1000, rounds=1, sample_steps=200, train_steps=1000, batch_size=512,
                  lr=1e-3, ema_decay=0.99, eval_samples=5000, sample_batch=4000),
    "mnist": dict(prompts=200, rounds=2, sample_steps=100, train_steps=600, batch_size=128,
                  lr=1e-4, ema_decay=0.995, eval_samples=1000, sample_batch=800),
    "celeba": dict(prompts=256, rounds=4, sample_steps=100, train_steps=2000, batch_size=64,
                   lr=5e-5, ema_decay=0.999, eval_samples=1000, sample_batch=256),
    "celebahq": IMAGE, "church": IMAGE,
}
# the digit tasks of the benchmark (experiments/benchmark.py) start from MNIST's settings
TASK_DEFAULTS["mnist16"] = TASK_DEFAULTS["mnist-pairs16"] = TASK_DEFAULTS["mnist"]
TASK_DEFAULTS["mnist-pairs"] = TASK_DEFAULTS["mnist"]
# fmt: on
# Flags that may differ between a run and its --resume (--lr: resume a diverged run with a
# lower one); every other flag must match the checkpoint's.
MAY_CHANGE = ("out", "device", "compile", "data_dir", "lr", "rounds", "eval_samples", "fid_samples")
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
        help="ref: every round samples the frozen reference and the pool of accepted samples "
        "grows, so "
        "the target stays p_ref x P(accept); current: each round samples the model fine-tuned so "
        "far and "
        "trains on that round's accepted samples only, so the tilts compound",
    )
    p.add_argument(
        "--sampler",
        choices=["ddpm", "ddim"],
        default="ddpm",
        help="ddpm: ancestral (eta = 1); ddim: generalised DDIM with --eta",
    )
    p.add_argument(
        "--eta",
        type=common.nonneg_float,
        default=0.0,
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
    args, given = common.parse(p, argv, TASK_DEFAULTS, MAY_CHANGE)
    if args.sampler == "ddpm" and "eta" in given and args.eta != 1.0:
        p.error(
            f"--eta {args.eta} with --sampler ddpm: ancestral sampling is eta = 1; use --sampler "
            f"ddim --eta "
            f"{args.eta}"
        )
    return args


def main(argv=None):
    args = get_args(argv)
    task = get_task(args.task)
    dist = common.Dist(
        common.pick_device(args.device)
    )  # torchrun: this rank; a plain process: rank 0 of 1
    device = dist.device
    dist.check_batch(args.batch_size)
    args.out = args.out or os.path.join("runs", "graft", f"{task.name}-{args.accept}")
    common.check_out(args.out)
    eta = 1.0 if args.sampler == "ddpm" else args.eta
    rule = AcceptRule(args.accept, args.M, args.K, args.tau, args.alpha)
    args.K = rule.K
    fid_samples = common.fid_count(args.fid_samples, device, task)
    torch.manual_seed(args.seed)

    # ---- the frozen reference, the reward and the copy to fine-tune; checked before --out is
    # touched
    base_path = common.ensure_base(
        args.base, task, "ddpm", seed=args.seed, device=args.device, data_dir=args.data_dir
    )
    ref, process, base_ckpt = common.load_base(base_path, device, task=task)
    conditional = common.check_ddpm_reference(
        ref, process, base_ckpt, base_path, args.sample_steps, args.cfg_scale, "GRAFT"
    )
    cfg = ref.config
    data = (
        task.dataset("train", args.data_dir) if cfg.get("cond_dim") else None
    )  # attribute rows to condition on
    reward = rewards.get_reward(
        args.reward, task, device, conditional, args.data_dir, args.classifier
    )
    args.reward = reward.name
    model = model_from_checkpoint(base_ckpt, device)[0].requires_grad_(
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
    target = None  # toy2d: the exact mode weights GRAFT's accepted law has (rewards/toy2d.py)
    if task.name == "toy2d" and hasattr(reward, "cdf"):
        from rewards.toy2d import tilted_mode_weights

        target = tilted_mode_weights(
            rule.prob, reward, 1.0, args.rounds, compound=args.sample_from == "current"
        )

    ckpt_path = os.path.join(args.out, "ckpt.pt")
    done, samples, history, pool, base_eval = 0, 0, [], None, None
    ckpt = common.load_resume(ckpt_path, args, MAY_CHANGE)
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
    common.print_derived(
        f"graft on {task.name}",
        device=device,
        base=base_path,
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
        sampler=f"{args.sampler} eta={eta}, {args.sample_steps} steps over N={process.N}, cfg "
        f"{args.cfg_scale}",
        finetune=f"{args.train_steps} steps/round, batch {args.batch_size}, lr {args.lr}, EMA "
        f"{ema.describe()}",
        eval=f"{args.eval_samples} samples" + (f", FID on {fid_samples}" if fid_samples else ""),
        tilt_target=None if target is None else [round(v, 4) for v in target.tolist()],
        out=args.out,
    )

    @torch.no_grad()
    def draw(net, y, n, seed):
        """n samples X_0 of ``net`` (conditions y) over the sampler's grid. Batch k draws its noise
        from its own generator (seed, k), so sharding the batches over torchrun's ranks changes
        nothing."""
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
                clip=task.kind == "image",
                cfg_scale=args.cfg_scale,
            )
            xs.append(x.clamp(-1, 1) if task.kind == "image" else x)
        return dist.gather(torch.cat(xs))

    def evaluate(net, tag):
        n = max(args.eval_samples, fid_samples)
        seed = args.seed + 999_983  # the same conditions and noise for the base and every round
        y = (
            task.sample_conditions(n, common.generator(seed, device), device, data)
            if conditional
            else None
        )
        x = draw(net, y, n, seed)
        ev = evaluate_samples(x, y, reward, task, args.eval_samples, fid, target, args.sample_batch)
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
    warmup = min(args.warmup, args.train_steps // 2)
    with common.StopSignals() as stop:
        for rnd in range(done + 1, args.rounds + 1):
            gen = common.generator(args.seed * 1000 + rnd, device)
            # 1. draw M samples per condition from the frozen reference (or, --sample-from current,
            # the model so far)
            current = args.sample_from == "current" and rnd > 1
            sampler = common.wrap_net(ema.model, args.bf16, args.compile) if current else ref_net
            y = (
                task.sample_conditions(args.prompts, gen, device, data, repeat=args.M)
                if conditional
                else None
            )
            x0 = draw(sampler, y, per_round, args.seed * 1000 + rnd)
            samples += per_round
            # 2. reward every sample
            r = rewards.score(reward, x0, y, args.sample_batch)
            # 3. ALGORITHM (paper, GRAFT): accept by the rule within each condition's M samples;
            # the accepted law
            #    is p a / Z, the KL-regularised optimum of r_hat = alpha log a, a = P(accept | x)
            # (logged)
            mask = rule.select(r.view(args.prompts, args.M), gen).reshape(-1)
            acc_prob, r_hat = rule.reshaped(r, condition_groups(y))
            n_acc = int(mask.sum())
            if n_acc == 0:
                raise UsageError(
                    f"round {rnd}: the rule {args.accept} accepted none of {per_round} samples "
                    f"(reward max {r.max().item():.4g}); lower --tau or raise --alpha"
                )
            kept, ky = x0[mask], (y[mask] if y is not None else None)
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
                r_hat_mean=r_hat.mean().item(),
                r_hat_accepted_mean=r_hat[mask].mean().item(),
                kl_proxy=kl_proxy(acc_prob),
                samples_generated=samples,
            )
            # 4. fine-tune the copy of the reference on the accepted samples: the ordinary
            # diffusion loss
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
                loss = process.loss(
                    train_net, xb, yb if conditional else None, loss_gen, rows=rows
                )  # all n
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
            # 5. evaluate fresh samples of the fine-tuned model (EMA weights, same noise as the
            # base's evaluation)
            ev, x_final = evaluate(
                common.wrap_net(ema.model, args.bf16, args.compile), f"round {rnd}"
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
                f"KL proxy "
                f"{stats['kl_proxy']:.4f}, loss {loss_mean:.4f}, eval reward "
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
                        base=base_path,
                    ),
                )
                if os.path.exists(log.path(f"pool_round{rnd - 1}.pt")):
                    os.remove(log.path(f"pool_round{rnd - 1}.pt"))
            if x_base is None:  # resumed: the base's samples again, for the pictures
                x_base = evaluate(ref_net, "base (again, for the pictures)")[1]
            if dist.main:
                common.round_pictures(
                    task,
                    reward,
                    log,
                    x_base,
                    x_final,
                    (f"accepted X_0, round {rnd}", x0[mask]),
                    "graft",
                    rnd,
                    cfg.get("num_classes") or 8,
                )

    summary = dict(
        task=task.name,
        method="graft",
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
    summary = log.summary(**summary, base=base_path, checkpoint=ckpt_path)
    common.print_done(summary, args.out)
    return summary


def load_pool(path):
    """The accepted samples of the rounds so far, saved next to the checkpoint that names them."""
    from models import CheckpointError

    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # missing or truncated
        raise CheckpointError(
            f"cannot resume: the pool of accepted samples {path} is missing or damaged "
            f"({type(e).__name__}); rerun without --resume into another --out"
        ) from None


if __name__ == "__main__":
    common.run_main(main)
