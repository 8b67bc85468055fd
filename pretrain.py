"""Pretrain a reference (base) model for a task: a DDPM or a rectified flow.

    python pretrain.py                          # toy2d DDPM, about a minute on a CPU
    python pretrain.py --model flow             # toy2d rectified flow
    python pretrain.py --task mnist --train-steps 4000
    python pretrain.py --task celeba --data-dir data/celeba --device cuda --bf16

GRAFT and P-GRAFT fine-tune a frozen copy of what this writes (OUT/ckpt.pt); inverse noise
correction inverts data through the flow it writes. Class-conditional tasks train with condition
dropout (--cond-drop) so that the null condition is learned and classifier-free guidance works.
Default OUT: runs/pretrain/<task>-<model>.
"""

import os

import numpy as np
import torch

import common
from models import EMA, drop_conditions, lr_at, save_checkpoint
from tasks import Batches, get_task

# Per-task overrides of the defaults in get_args (the pretraining budget of each task).
# fmt: off
TASK_DEFAULTS = {
    "toy2d": dict(preset="mlp", train_steps=3000, batch_size=512, lr=2e-3, eval_samples=20000),
    "mnist": dict(preset="mnist", train_steps=4000, batch_size=128, lr=5e-4, eval_samples=64),
    "celeba": dict(preset="celeba64", train_steps=200_000, batch_size=128, lr=2e-4,
                   eval_samples=64),
    "celebahq": dict(preset="base256", train_steps=400_000, batch_size=64, lr=1e-4,
                     eval_samples=64),
    "church": dict(preset="base256", train_steps=400_000, batch_size=64, lr=1e-4, eval_samples=64),
}
# fmt: on
# Flags that may differ between a run and its --resume (--lr: resume a diverged run with a
# lower one); every other flag must match the checkpoint's.
MAY_CHANGE = (
    "out",
    "device",
    "compile",
    "data_dir",
    "lr",
    "ckpt_every",
    "eval_every",
    "eval_samples",
    "fid_samples",
)
LOG_EVERY = 100  # steps per logged loss (one host sync each)


def get_args(argv=None):
    p = common.parser(__doc__.splitlines()[0], TASK_DEFAULTS)
    common.add_run_args(p)
    p.add_argument(
        "--model",
        choices=["ddpm", "flow"],
        default="ddpm",
        help="diffusion (eps-prediction DDPM) or rectified flow (noise at t=0, data at t=1)",
    )
    p.add_argument(
        "--preset", default="mlp", help="network preset: models/unet.py PRESETS, or mlp for 2-D"
    )
    p.add_argument("--train-steps", type=common.pos_int, default=3000, help="optimiser steps")
    p.add_argument("--batch-size", type=common.pos_int, default=512, help="training minibatch")
    p.add_argument("--lr", type=common.pos_float, default=2e-3, help="peak AdamW learning rate")
    p.add_argument(
        "--lr-schedule", choices=["cosine", "constant"], default="cosine", help="LR after warm-up"
    )
    p.add_argument("--warmup", type=common.nonneg_int, default=100, help="linear LR warm-up steps")
    p.add_argument(
        "--ema-decay",
        type=common.unit_float,
        default=0.999,
        help="EMA decay of the weights that are sampled from (warmed up as min(d, (1+s)/(10+s)))",
    )
    p.add_argument(
        "--grad-clip", type=common.nonneg_float, default=1.0, help="clip the gradient norm (0: off)"
    )
    p.add_argument(
        "--noise-schedule",
        choices=["linear", "cosine"],
        default="linear",
        help="DDPM noise schedule",
    )
    p.add_argument(
        "--unconditional", action="store_true", help="ignore the task's labels even if it has them"
    )
    p.add_argument(
        "--cond-drop",
        type=common.unit_float,
        default=0.1,
        help="probability of training on the null condition (classifier-free guidance; conditional "
        "only)",
    )
    p.add_argument(
        "--eval-samples", type=common.pos_int, default=20000, help="samples for the final metrics"
    )
    p.add_argument(
        "--fid-samples",
        type=common.fid_int,
        default=-1,
        help="images for FID at the end (-1: 5000 on CUDA, 0 on CPU; 0: none)",
    )
    p.add_argument(
        "--ckpt-every",
        type=common.nonneg_int,
        default=1000,
        help="write OUT/ckpt.pt every this many steps (0: at the end only)",
    )
    p.add_argument(
        "--eval-every",
        type=common.nonneg_int,
        default=0,
        help="sample grid and metrics every this many steps (0: at the end only)",
    )
    p.add_argument(
        "--dry-run",
        action="store_true",
        help="print what the run would do and an estimate of its "
        "time on this device (two timed steps), then exit without writing anything",
    )
    args, _ = common.parse(p, argv, TASK_DEFAULTS, MAY_CHANGE)
    return args


def main(argv=None):
    args = get_args(argv)
    task = get_task(args.task)
    dist = common.Dist(
        common.pick_device(args.device)
    )  # torchrun: this rank; a plain process: rank 0 of 1
    device = dist.device
    dist.check_batch(args.batch_size)
    args.out = args.out or os.path.dirname(common.default_base_path(task.name, args.model))
    common.check_out(args.out)
    conditional = task.conditional and not args.unconditional
    fid_samples = common.fid_count(args.fid_samples, device, task)
    torch.manual_seed(args.seed)

    # ---- everything is built and checked before --out is touched
    data = task.dataset("train", args.data_dir)
    model = common.build_network(task, args.model, args.preset, conditional).to(device)
    process = common.build_process(task, args.model, args.noise_schedule)
    batches = Batches(data, args.batch_size, device, seed=args.seed)
    gen = common.generator(
        args.seed + 1, device
    )  # noise, timesteps and condition dropout of the loss
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.0)
    ema = EMA(model, args.ema_decay)
    ckpt_path = os.path.join(args.out, "ckpt.pt")
    start, window, last_loss = 0, [], None
    ckpt = common.load_resume(ckpt_path, args, MAY_CHANGE)
    if ckpt is not None:
        start, extra = common.restore(ckpt, model, ema, opt)
        batches.set_state(extra["batches"])
        gen.set_state(extra["gen"])
        window = [
            v.to(device) for v in extra.get("loss_window", torch.zeros(0))
        ]  # losses since the last log
        last_loss = extra.get("last_loss")
        print(f"resumed from {ckpt_path} at step {start}")
    if args.dry_run:
        return plan(args, task, device, model, process, batches, gen, conditional, len(data), start)
    # the first minibatch is read now, so that an unreadable data file fails before --out is touched
    first = next(batches) if start < args.train_steps else None
    log = common.RunLog(
        args.out, args, resumed_at=("step", start) if ckpt is not None else None, write=dist.main
    )
    common.print_derived(
        f"pretrain {args.model} on {task.name}",
        device=device,
        parameters=common.n_params(model),
        train_examples=len(data),
        train_steps=args.train_steps,
        batch_size=args.batch_size,
        epochs=f"{args.train_steps * args.batch_size / len(data):.2f}",
        conditional=conditional,
        cond_drop=args.cond_drop if conditional else None,
        process=process.config,
        ema=ema.describe(),
        sampler_NFE_per_sample=task.sample_steps if args.model == "ddpm" else task.flow_steps,
        fid_samples=fid_samples,
        out=args.out,
    )

    net = common.wrap_net(dist.wrap(model), args.bf16, args.compile)  # DDP under torchrun
    rows = (
        dist.rows(args.batch_size) if dist.world > 1 else None
    )  # this rank's rows of each global batch
    autocast = torch.autocast(
        "cuda", dtype=torch.bfloat16, enabled=args.bf16 and device.type == "cuda"
    )

    def checkpoint(step):
        common.check_weights(
            model, step, args.lr
        )  # never replace a good checkpoint with NaN weights
        if dist.main:
            save_checkpoint(
                ckpt_path,
                model,
                process,
                ema,
                opt,
                step,
                args,
                extra=dict(
                    batches=batches.state(),
                    gen=gen.get_state(),
                    last_loss=last_loss,
                    loss_window=torch.stack(window).cpu() if window else torch.zeros(0),
                ),
            )

    def evaluate(step):
        g = common.generator(args.seed + 2, device)
        y = task.sample_conditions(args.eval_samples, g, device, data) if conditional else None
        x = common.generate(
            ema.model,
            process,
            task,
            args.eval_samples,
            g,
            y=y,
            batch_size=min(args.eval_samples, 2000 if task.kind == "points" else 256),
        )
        metrics = task.metrics(x)
        if task.kind == "image":
            common.save_grid(x[:64], log.path(f"samples_{step:07d}.png"), nrow=8)
        else:
            common.plot_points(
                {"data": data.tensors[0][:5000], f"{args.model} step {step}": x},
                log.path(f"samples_{step:07d}.png"),
            )
        if metrics:
            log.log(step=step, **{k: v for k, v in metrics.items() if not isinstance(v, list)})
            print(
                f"step {step}: "
                + ", ".join(f"{k}={v:.4f}" for k, v in metrics.items() if isinstance(v, float))
            )
        return x, metrics

    # ---- the training loop: AdamW with warm-up and cosine decay, gradient clipping, EMA
    model.train()
    with common.StopSignals() as stop:  # SIGTERM / Ctrl-C: finish the step, save, exit
        for step in common.progress(
            range(start, args.train_steps), f"pretrain {args.model}", args.train_steps
        ):
            for group in opt.param_groups:
                group["lr"] = lr_at(step, args.train_steps, args.lr, args.lr_schedule, args.warmup)
            x, y = next(batches) if first is None else first
            first = None
            y = drop_conditions(y, args.cond_drop, gen) if conditional else None
            with autocast:
                loss = process.loss(net, x, y, gen, rows=rows)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            if args.grad_clip > 0:
                torch.nn.utils.clip_grad_norm_(model.parameters(), args.grad_clip)
            opt.step()
            ema.update(model)
            window.append(loss.detach())
            done = step + 1
            if done % LOG_EVERY == 0 or done == args.train_steps:
                last_loss = common.check_loss(
                    window, done, args.lr, dist=dist
                )  # a diverging run stops unsaved
                window = []
                log.log(step=done, loss=last_loss, lr=opt.param_groups[0]["lr"])
            if args.ckpt_every and done % args.ckpt_every == 0 and done < args.train_steps:
                checkpoint(done)
            if (
                args.eval_every
                and done % args.eval_every == 0
                and done < args.train_steps
                and dist.main
            ):
                model.eval()
                evaluate(done)
                model.train()
            if dist.any(stop.requested):
                stop.requested = stop.requested or "SIGTERM"
                checkpoint(done)
                stop.stop(
                    f"at step {done}",
                    f"saved {ckpt_path}; rerun the same command with --resume to continue",
                )
    model.eval()
    checkpoint(args.train_steps)
    if not dist.main:  # torchrun: rank 0 evaluates and writes the summary
        return dict(train_steps=args.train_steps, final_loss=last_loss)

    x, metrics = evaluate(args.train_steps)
    if task.kind == "points":
        np.save(log.path("samples.npy"), x.numpy())
    if task.kind == "image" and fid_samples > 0:
        from eval.fid import FIDEvaluator, frechet_distance

        fid_eval = FIDEvaluator(device=str(device))
        g = common.generator(args.seed + 3, device)
        y = task.sample_conditions(fid_samples, g, device, data) if conditional else None
        xs = common.generate(
            ema.model, process, task, fid_samples, g, y=y, batch_size=256, show_progress=True
        )
        mu_ref, sigma_ref = fid_eval.reference_stats(
            task.name, split="train", data_dir=args.data_dir
        )
        mu, sigma, _ = fid_eval.stats(xs)
        metrics["fid"] = frechet_distance(mu, sigma, mu_ref, sigma_ref)
        metrics["fid_samples"] = fid_samples
        print(f"FID ({fid_samples} samples vs {task.name} train): {metrics['fid']:.2f}")
    summary = log.summary(
        task=task.name,
        model=args.model,
        parameters=sum(p.numel() for p in model.parameters()),
        train_steps=args.train_steps,
        final_loss=last_loss,
        checkpoint=ckpt_path,
        process=process.config,
        ema=ema.describe(),
        cond_drop=args.cond_drop if conditional else None,
        **metrics,
    )
    print(
        f"done: loss {last_loss:.4f}, "
        + ", ".join(f"{k}={v}" for k, v in summary.items() if k in ("mode_tv", "sw2", "fid"))
        + f"; wrote {args.out}"
    )
    return summary


def plan(args, task, device, model, process, batches, gen, conditional, n_data, start):
    """--dry-run: the run's size and its time on this device, estimated from two timed training
    steps."""
    import time

    opt = torch.optim.AdamW(model.parameters(), lr=args.lr)
    model.train()
    times = []
    for _ in range(3):  # the first step warms up; the next two are timed
        t0 = time.time()
        x, y = next(batches)
        loss = process.loss(
            model, x, drop_conditions(y, args.cond_drop, gen) if conditional else None, gen
        )
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.time() - t0)
    per_step = sum(times[1:]) / 2
    left = args.train_steps - start
    common.print_derived(
        f"plan: pretrain {args.model} on {task.name} (dry run, nothing written)",
        device=device,
        parameters=common.n_params(model),
        preset=args.preset,
        train_examples=n_data,
        train_steps=f"{left} of {args.train_steps} left, batch {args.batch_size}",
        seconds_per_step=f"{per_step:.3f} (timed here)",
        estimated_time=f"{per_step * left / 60:.1f} min for training, plus sampling "
        f"{args.eval_samples} "
        f"evaluation samples",
        out=args.out,
    )
    return dict(
        dry_run=True,
        seconds_per_step=per_step,
        estimated_minutes=per_step * left / 60,
        train_steps=args.train_steps,
    )


if __name__ == "__main__":
    common.run_main(main)
