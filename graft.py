"""GRAFT: fine-tune a diffusion model on the samples of its reference that an acceptance rule keeps.

    python graft.py                          # toy2d, top-2 of 8, one round from the reference
    python graft.py --accept rs --alpha 0.5  # classical rejection sampling, target p exp(r/alpha)
    python graft.py --task mnist --rounds 2  # class-conditional MNIST, reward log p(label | image)
    python graft.py --task celeba --reward smiling --device cuda --bf16

Each round (paper, GRAFT): 1. draw M samples per condition from the sampling model -> 2. reward ->
3. accept by the rule -> 4. fine-tune a copy of the reference on the accepted samples with the
ordinary diffusion loss -> 5. evaluate fresh samples -> 6. checkpoint. For every rule the accepted
law is p(x) a(x) / Z with a(x) = P(accept | x); the reshaped reward r_hat = alpha log a(x) (from the
round's empirical reward CDF) makes that the KL-regularised optimum p exp(r_hat / alpha) / Z.

Writes OUT/args.json, metrics.jsonl, summary.json, ckpt.pt (--resume continues after the last
finished round), pool_round<k>.pt (the accepted samples) and pictures; default OUT
runs/graft/<task>-<accept>. pgraft.py is this file's sibling: at N_I = 0 it reproduces this script
exactly (tests/test_pgraft.py pins the copied round).
"""

import dataclasses
import os

import torch
from torch.utils.data import TensorDataset

import common
import harness
import rewards
from eval.metrics import FID, evaluate_samples
from models import EMA, lr_at, model_from_checkpoint
from rewards.acceptance import AcceptRule, condition_groups
from tasks import Batches, get_task


@dataclasses.dataclass
class Args(harness.FinetuneArgs):
    """GRAFT: fine-tune a diffusion model on the samples of its reference that a rule accepts.
    Flags: harness.FinetuneArgs (the reference, reward, rule, rounds, sampler, fine-tuning)."""


# per-task overrides of those defaults (harness.FINETUNE_DEFAULTS); samples per round = prompts x M
TASK_DEFAULTS = harness.FINETUNE_DEFAULTS


def main(argv=None):
    args, given = harness.parse(Args, argv, task_defaults=TASK_DEFAULTS, doc=__doc__)
    task = get_task(args.task)
    run = harness.Run(args, script="graft", out=os.path.join("runs", "graft",
                      f"{task.name}-{args.accept}"), batch_size=args.batch_size,
                      refuse_held=False)
    device = run.device
    eta = common.sampler_eta(args.sampler, args.eta, "eta" in given)
    rule = AcceptRule(args.accept, args.M, args.K, args.tau, args.alpha)
    args.K = rule.K
    fid_samples = common.fid_count(args.fid_samples, device, task)
    torch.manual_seed(args.seed)

    # the frozen reference, the reward and the copy to fine-tune (checked before --out is touched)
    base_path = common.ensure_base(args.base, task, "ddpm", seed=args.seed, device=args.device,
                                   data_dir=args.data_dir)
    ref, process, base_ckpt = common.load_base(base_path, device, task=task)
    conditional = common.check_ddpm_reference(ref, process, base_ckpt, base_path,
                                              args.sample_steps, args.cfg_scale, "GRAFT")
    # attribute rows to condition on (CelebA); class labels need none
    data = task.dataset("train", args.data_dir) if ref.config.get("cond_dim") else None
    reward = rewards.get_reward(args.reward, task, device, conditional, args.data_dir,
                                args.classifier)
    args.reward = reward.name
    model = model_from_checkpoint(base_ckpt, device)[0].requires_grad_(True)
    ema = EMA(model, args.ema_decay)
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.0)
    # the base and the fine-tuned model run at one precision; DDP under torchrun
    ref_net = common.wrap_net(ref, args.bf16, args.compile)
    train_net = common.wrap_net(run.dist.wrap(model), args.bf16, args.compile)
    fid = FID(task, fid_samples, device, args.data_dir) if fid_samples else None
    # toy2d: the exact mode weights of GRAFT's accepted law (rewards/toy2d.py)
    target = common.toy2d_target(task, reward, rule, 1.0, args.rounds, args.sample_from)

    per_round = args.prompts * args.M
    done, saved = run.begin(model=model, ema=ema, opt=opt,
                            settings=common.finetune_settings(args, task, base_path, reward, ema,
                                                              conditional, eta, process.N,
                                                              fid_samples, target))
    samples, history = saved.get("samples_generated", 0), saved.get("history", [])
    pool = saved.get("pool")

    @torch.no_grad()
    def draw(net, y, n, seed):
        """n samples X_0 of ``net`` over the sampler's grid, this rank's share of the batches."""
        xs = []
        for z, yb, gen in run.noise_batches(n, shape=task.shape(), seed=seed,
                                            batch=args.sample_batch, y=y):
            x, _ = process.sample(net, z, y=yb, generator=gen, eta=eta,
                                  num_steps=args.sample_steps, clip=task.kind == "image",
                                  cfg_scale=args.cfg_scale, progress=run.batch_progress)
            xs.append(x.clamp(-1, 1) if task.kind == "image" else x)
        return run.gather(xs, shape=task.shape())

    def evaluate(net, tag):
        """Reward (and accuracy, FID, mode weights) of fresh samples; the same conditions and noise
        for the base and every round."""
        n, seed = max(args.eval_samples, fid_samples), args.seed + 999_983
        y = task.sample_conditions(n, common.generator(seed, device), device,
                                   data) if conditional else None
        x = draw(net, y, n, seed)
        ev = evaluate_samples(x, y, reward, task, args.eval_samples, fid, target,
                              args.sample_batch)
        common.print_eval(tag, ev)
        return ev, x

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
            # from the model fine-tuned so far)
            current = args.sample_from == "current" and rnd > 1
            sampler = common.wrap_net(ema.model, args.bf16, args.compile) if current else ref_net
            y = task.sample_conditions(args.prompts, gen, device, data,
                                       repeat=args.M) if conditional else None
            x0 = draw(sampler, y, per_round, args.seed * 1000 + rnd)
            samples += per_round
            # 2. reward every sample
            r = rewards.score(reward, x0, y, args.sample_batch)
            # 3. ALGORITHM (paper, GRAFT): accept by the rule within each condition's M samples;
            # the accepted law is p a / Z, the KL-regularised optimum of r_hat = alpha log a,
            # a = P(accept | x)
            mask = rule.select(r.view(args.prompts, args.M), gen).reshape(-1)
            acc_prob, r_hat = rule.reshaped(r, condition_groups(y))
            common.check_accepted(mask, r, rnd, args.accept)
            kept, ky = x0[mask], (y[mask] if y is not None else None)
            # --sample-from ref: one target every round, so the pool grows
            if args.sample_from == "ref" and pool is not None:
                kept = torch.cat([pool["x"].to(device), kept])
                ky = torch.cat([pool["y"].to(device), ky]) if ky is not None else None
            pool = {"x": kept.cpu(), **({"y": ky.cpu()} if ky is not None else {})}
            stats = common.round_stats(r, mask, r_hat, acc_prob, len(kept), samples, "")

            # 4. fine-tune the copy of the reference on the accepted samples: the ordinary loss
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
                loss = process.loss(train_net, xb, yb if conditional else None, loss_gen,
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

            # 5. evaluate fresh samples of the fine-tuned model (EMA weights, the base's noise)
            last, x_final = evaluate(common.wrap_net(ema.model, args.bf16, args.compile),
                                     f"round {rnd}")
            history.append(dict(round=rnd, **stats, loss=loss_mean, eval=last))
            common.print_round(rnd, args.rounds, stats, loss_mean, last, base_eval)
            # 6. checkpoint (the pool first), metrics and pictures
            run.end_round(rnd, model=model, process=process, ema=ema, opt=opt, pool=pool,
                          row=dict(**stats, loss=loss_mean, **common.prefixed("eval_", last)),
                          extra=dict(samples_generated=samples, history=history,
                                     base_eval=base_eval, base_preview=x_base, base=base_path),
                          pictures=dict(task=task, reward=reward, base=x_base, final=x_final,
                                        middle=(f"accepted X_0, round {rnd}", x0[mask]),
                                        name="graft", nrow=ref.config.get("num_classes")))

    summary = common.finetune_summary(args, "graft", samples=samples, reward=reward, eta=eta,
                                      ema=ema)
    summary.update(common.evaluation_summary(base_eval, last, task, fid_samples, target))
    return run.finish(**summary, base=base_path)


if __name__ == "__main__":
    common.run_main(main)
