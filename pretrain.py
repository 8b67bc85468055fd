"""Pretrain a reference (base) model for a task: a DDPM or a rectified flow.

    python pretrain.py                          # toy2d DDPM, about a minute on a CPU
    python pretrain.py --model flow             # toy2d rectified flow
    python pretrain.py --task mnist --steps 4000
    python pretrain.py --task celeba --data-dir data/celeba --device cuda --bf16

GRAFT and P-GRAFT fine-tune a frozen copy of what this writes (OUT/ckpt.pt); inverse noise
correction inverts data through the flow it writes. Default OUT: runs/pretrain/<task>-<model>.
"""
import os

import numpy as np
import torch

import common
from tasks import get_task


def get_args(argv=None):
    p = common.parser(__doc__.splitlines()[0])
    common.add_common_args(p)
    p.add_argument("--model", choices=["ddpm", "flow"], default="ddpm", help="diffusion (eps-prediction DDPM) or rectified flow")
    p.add_argument("--preset", default=None, help="network preset (models/unet.py PRESETS, or mlp); default: the task's")
    p.add_argument("--steps", type=int, default=None, help="optimiser steps (default: the task's)")
    p.add_argument("--batch-size", type=int, default=None, help="minibatch size (default: the task's)")
    p.add_argument("--lr", type=float, default=None, help="peak AdamW learning rate (default: the task's)")
    p.add_argument("--lr-schedule", choices=["cosine", "constant"], default="cosine", help="LR after warm-up")
    p.add_argument("--warmup", type=int, default=100, help="linear LR warm-up steps")
    p.add_argument("--ema-decay", type=float, default=0.999, help="EMA decay of the weights that are sampled from")
    p.add_argument("--grad-clip", type=float, default=1.0, help="clip the gradient norm to this (0: off)")
    p.add_argument("--schedule", choices=["linear", "cosine"], default="linear", help="DDPM noise schedule")
    p.add_argument("--unconditional", action="store_true", help="ignore the task's labels even if it has them")
    p.add_argument("--num-samples", type=int, default=None, help="samples for the final metrics (toy2d 20000, images 64)")
    p.add_argument("--fid-num", type=int, default=-1, help="images for FID at the end (-1: 5000 on CUDA, 0 on CPU)")
    p.add_argument("--ckpt-every", type=int, default=1000, help="write OUT/ckpt.pt every this many steps")
    p.add_argument("--eval-every", type=int, default=0, help="sample grid / metrics every this many steps (0: end only)")
    return p.parse_args(argv)


def main(argv=None):
    args = get_args(argv)
    task = get_task(args.task)
    device = common.pick_device(args.device)
    args.steps = args.steps or task.train_steps
    args.batch_size = args.batch_size or task.batch_size
    args.lr = args.lr or task.lr
    args.out = args.out or os.path.dirname(common.default_base_path(task.name, args.model))
    conditional = task.conditional and not args.unconditional
    torch.manual_seed(args.seed)

    data = task.dataset("train", args.data_dir)
    model = common.build_network(task, args.model, args.preset, conditional).to(device)
    process = common.build_process(task, args.model, args.schedule)
    batches = common.Batches(data, args.batch_size, device, seed=args.seed)
    gen = common.generator(args.seed + 1, device)  # noise and timesteps of the loss
    log = common.RunLog(args.out, args)
    ckpt_path = os.path.join(args.out, "ckpt.pt")

    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.0)
    ema = common.EMA(model, args.ema_decay)
    start = 0
    if args.resume and os.path.exists(ckpt_path):
        start, extra = common.resume_state(ckpt_path, model, ema, opt)
        if "batches" in extra:
            batches.set_state(extra["batches"])
            gen.set_state(extra["gen"])
        print(f"resumed from {ckpt_path} at step {start}")
    steps_per_sample = task.sample_steps if args.model == "ddpm" else task.flow_steps
    common.print_derived(
        f"pretrain {args.model} on {task.name}", device=device, parameters=common.n_params(model),
        train_examples=len(data), steps=args.steps, batch_size=args.batch_size,
        epochs=f"{args.steps * args.batch_size / len(data):.2f}", conditional=conditional,
        process=process.config, sampler_NFE_per_sample=steps_per_sample, out=args.out)

    net = common.wrap_net(model, args.bf16, args.compile)

    def loss_fn(step):
        x, y = next(batches)
        y = y if conditional else None
        if args.bf16 and device.type == "cuda":
            with torch.autocast("cuda", dtype=torch.bfloat16):
                return process.loss(net, x, y, gen)
        return process.loss(net, x, y, gen)

    n_eval = args.num_samples or (20000 if task.kind == "points" else 64)

    def evaluate(step, ema_model):
        g = common.generator(args.seed + 2, device)
        y = task.sample_conditions(n_eval, g, device, data) if conditional else None
        x = common.generate(ema_model, process, task, n_eval, g, y=y, batch_size=min(n_eval, 2000 if task.kind == "points" else 256))
        metrics = task.metrics(x)
        if task.kind == "image":
            common.save_grid(x[:64], log.path(f"samples_{step:07d}.png"), nrow=8)
        else:
            common.plot_points({"data": data.tensors[0][:5000], f"{args.model} step {step}": x}, log.path(f"samples_{step:07d}.png"))
        if metrics:
            log.log(step=step, **{k: v for k, v in metrics.items() if not isinstance(v, list)})
            print(f"step {step}: " + ", ".join(f"{k}={v:.4f}" for k, v in metrics.items() if isinstance(v, float)))
        return x, metrics

    extra_state = lambda: {"batches": batches.state(), "gen": gen.get_state()}  # noqa: E731
    final_loss, ema, opt = common.train(model, loss_fn, args.steps, args.lr, args.out, args, process, start, ema, opt,
                                        args.lr_schedule, args.warmup, args.grad_clip, args.ckpt_every, log.log,
                                        evaluate, args.eval_every, extra_state, desc=f"pretrain {args.model}")
    x, metrics = evaluate(args.steps, ema.model)
    if task.kind == "points":
        np.save(log.path("samples.npy"), x.numpy())
    fid_num = args.fid_num if args.fid_num >= 0 else (5000 if device.type == "cuda" else 0)
    if task.kind == "image" and fid_num > 0:
        from eval.fid import FIDEvaluator
        fid_eval = FIDEvaluator(device=str(device))
        g = common.generator(args.seed + 3, device)
        y = task.sample_conditions(fid_num, g, device, data) if conditional else None
        xs = common.generate(ema.model, process, task, fid_num, g, y=y, batch_size=256, progress=True)
        from eval.fid import frechet_distance
        mu_ref, sigma_ref = fid_eval.reference_stats(task.name, split="train", data_dir=args.data_dir)
        mu, sigma, _ = fid_eval.stats(xs)
        metrics["fid"] = frechet_distance(mu, sigma, mu_ref, sigma_ref)
        metrics["fid_num"] = fid_num
        print(f"FID ({fid_num} samples vs {task.name} train): {metrics['fid']:.2f}")
    summary = log.summary(task=task.name, model=args.model, parameters=sum(p.numel() for p in model.parameters()),
                          steps=args.steps, final_loss=final_loss, checkpoint=ckpt_path, process=process.config,
                          **metrics)
    print(f"done: loss {final_loss:.4f}, " + ", ".join(f"{k}={v}" for k, v in summary.items()
                                                       if k in ("mode_tv", "sw2", "fid")) + f"; wrote {args.out}")
    return summary


if __name__ == "__main__":
    common.run_main(main)
