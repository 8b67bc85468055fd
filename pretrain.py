"""Pretrain a reference (base) model for a task: a DDPM or a rectified flow.

    python pretrain.py                          # toy2d DDPM, about a minute on a CPU
    python pretrain.py --model flow             # toy2d rectified flow
    python pretrain.py --task mnist --train-steps 4000
    python pretrain.py --task celeba --data-dir data/celeba --device cuda --bf16

GRAFT and P-GRAFT fine-tune a frozen copy of what this writes (OUT/ckpt.pt); inverse noise
correction inverts data through the flow it writes. Class-conditional tasks train with condition
dropout (--cond-drop) so that the null condition is learned and classifier-free guidance works.

Writes OUT/args.json, metrics.jsonl, summary.json, ckpt.pt (every --ckpt-every steps, on SIGTERM /
Ctrl-C and at the end; --resume continues from it exactly), samples_<step>.png and, on toy2d,
samples.npy. Default OUT: runs/pretrain/<task>-<model>.
"""

import dataclasses
import os

import numpy as np
import torch

import common
import harness
from eval.metrics import FID
from harness import arg
from models import EMA, drop_conditions, lr_at
from tasks import Batches, get_task


# fmt: off
@dataclasses.dataclass
class Args(harness.RunArgs):
    """Pretrain a reference (base) model for a task: a DDPM or a rectified flow."""

    model: str = arg("ddpm", "diffusion (eps-prediction DDPM) or rectified flow (noise at t=0, "
                     "data at t=1)", choices=["ddpm", "flow"])
    preset: str = arg("mlp", "network preset: models/unet.py PRESETS, or mlp for 2-D")
    train_steps: int = arg(3000, "optimiser steps", check=common.pos_int)
    batch_size: int = arg(512, "training minibatch", check=common.pos_int)
    lr: float = arg(2e-3, "peak AdamW learning rate", check=common.pos_float, may_change=True)
    lr_schedule: str = arg("cosine", "LR after warm-up", choices=["cosine", "constant"])
    warmup: int = arg(100, "linear LR warm-up steps", check=common.nonneg_int)
    ema_decay: float = arg(0.999, "EMA decay of the weights that are sampled from (warmed up as "
                           "min(d, (1+s)/(10+s)))", check=common.unit_float)
    grad_clip: float = arg(1.0, "clip the gradient norm (0: off)", check=common.nonneg_float)
    noise_schedule: str = arg("linear", "DDPM noise schedule", choices=["linear", "cosine"])
    unconditional: bool = arg(False, "ignore the task's labels even if it has them")
    cond_drop: float = arg(0.1, "probability of training on the null condition (classifier-free "
                           "guidance; conditional only)", check=common.unit_float)
    eval_samples: int = arg(20000, "samples for the final metrics", check=common.pos_int,
                            may_change=True)
    fid_samples: int = arg(-1, "images for FID at the end (-1: 5000 on CUDA, 0 on CPU; 0: none)",
                           check=common.fid_int, may_change=True)
    ckpt_every: int = arg(1000, "write OUT/ckpt.pt every this many steps (0: at the end only)",
                          check=common.nonneg_int, may_change=True)
    eval_every: int = arg(0, "sample grid and metrics every this many steps (0: at the end only)",
                          check=common.nonneg_int, may_change=True)
    dry_run: bool = arg(False, "print what the run would do and an estimate of its time on this "
                        "device (two timed steps), then exit without writing anything")


# Per-task overrides of the defaults above (the pretraining budget of each task).
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


def get_args(argv=None):
    return harness.parse(Args, argv, task_defaults=TASK_DEFAULTS, doc=__doc__)[0]


def main(argv=None):
    args = get_args(argv)
    task = get_task(args.task)
    # an --out that holds a run is refused in run.begin, after the flags and the data are checked
    run = harness.Run(args, script="pretrain", unit="step", batch_size=args.batch_size,
                      out=os.path.dirname(common.default_base_path(task.name, args.model)),
                      refuse_held=False)
    device = run.device
    conditional = task.conditional and not args.unconditional
    fid_samples = common.fid_count(args.fid_samples, device, task)
    torch.manual_seed(args.seed)

    # the data, the network, the process, the optimiser and the EMA (all checked before --out is
    # touched)
    data = task.dataset("train", args.data_dir)
    model = common.build_network(task, args.model, args.preset, conditional).to(device)
    process = common.build_process(task, args.model, args.noise_schedule)
    batches = Batches(data, args.batch_size, device, seed=args.seed)
    # the noise, timesteps and condition dropout of the loss
    gen = common.generator(args.seed + 1, device)
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.0)
    ema = EMA(model, args.ema_decay)
    start, saved = run.resume(model=model, ema=ema, opt=opt)
    if saved:
        batches.set_state(saved["batches"])
        gen.set_state(saved["gen"])
    if args.dry_run:
        return run.dry_run(model=model, process=process, batches=batches, gen=gen,
                           cond_drop=args.cond_drop if conditional else None,
                           steps=args.train_steps, done=start,
                           title=f"pretrain {args.model} on {task.name}",
                           settings=dict(preset=args.preset, train_examples=len(data)),
                           then=f"sampling {args.eval_samples} evaluation samples")
    # the first minibatch is read now, so that an unreadable data file fails before --out is touched
    first = next(batches) if start < args.train_steps else None
    nfe = task.sample_steps if args.model == "ddpm" else task.flow_steps
    run.begin(title=f"pretrain {args.model} on {task.name}", settings=dict(
        parameters=common.n_params(model), train_examples=len(data),
        train_steps=args.train_steps, batch_size=args.batch_size,
        epochs=f"{args.train_steps * args.batch_size / len(data):.2f}", conditional=conditional,
        cond_drop=args.cond_drop if conditional else None, process=process.config,
        ema=ema.describe(), sampler_NFE_per_sample=nfe, fid_samples=fid_samples))
    # DDP under torchrun; bf16 autocast on CUDA with --bf16
    net = common.wrap_net(run.dist.wrap(model), args.bf16, args.compile)
    autocast = torch.autocast("cuda", dtype=torch.bfloat16,
                              enabled=args.bf16 and device.type == "cuda")

    def save(step):
        """OUT/ckpt.pt with the data order and the loss noise, so that --resume is exact."""
        run.save(step, model=model, process=process, ema=ema, opt=opt,
                 extra=dict(batches=batches.state(), gen=gen.get_state()))

    def due(every, step):
        """--ckpt-every / --eval-every: at the multiples of ``every`` before the last step."""
        return every > 0 and step % every == 0 and step < args.train_steps

    def evaluate(step):
        """Metrics and a picture of fresh samples of the EMA weights (the same noise each time)."""
        g = common.generator(args.seed + 2, device)
        y = task.sample_conditions(args.eval_samples, g, device, data) if conditional else None
        batch = min(args.eval_samples, 2000 if task.kind == "points" else common.EVAL_BATCH)
        x = common.generate(ema.model, process, task, args.eval_samples, g, y=y, batch_size=batch)
        metrics, png = task.metrics(x), run.path(f"samples_{step:07d}.png")
        if task.kind == "image":
            common.save_grid(x[:64], png, nrow=8)
        else:
            sets = {"data": data.tensors[0][:5000], f"{args.model} step {step}": x}
            common.plot_points(sets, png)
        if metrics:
            run.log.log(step=step, **{k: v for k, v in metrics.items() if not isinstance(v, list)})
            print(f"step {step}: " + ", ".join(f"{k}={v:.4f}" for k, v in metrics.items()
                                              if isinstance(v, float)))
        return x, metrics

    # ---- the training loop: AdamW with warm-up and cosine decay, gradient clipping, EMA
    model.train()
    with run.stop_signals():
        for step in common.progress(range(start, args.train_steps), f"pretrain {args.model}",
                                    args.train_steps):
            lr = lr_at(step, args.train_steps, args.lr, args.lr_schedule, args.warmup)
            for group in opt.param_groups:
                group["lr"] = lr
            x, y = next(batches) if first is None else first
            first = None
            # conditional: the null condition with probability --cond-drop (classifier-free
            # guidance)
            y = drop_conditions(y, args.cond_drop, gen) if conditional else None
            with autocast:
                loss = process.loss(net, x, y, gen, rows=run.rows)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            if args.grad_clip > 0:
                torch.nn.utils.clip_grad_norm_(model.parameters(), args.grad_clip)
            opt.step()
            ema.update(model)
            # log the loss window (a diverging run stops unsaved); SIGTERM / Ctrl-C only noted
            run.step(loss, step=step + 1, steps=args.train_steps, model=model, lr=lr, stop=False)
            if due(args.ckpt_every, step + 1):
                save(step + 1)
            if due(args.eval_every, step + 1) and run.main:
                evaluate(step + 1)
            # SIGTERM / Ctrl-C: the step is finished; save it and exit
            if run.stopping:
                save(step + 1)
                run.halt(step + 1, resume_hint=f"saved {run.ckpt_path}; rerun the same command "
                         "with --resume to continue")
    save(args.train_steps)
    # what each rank did (every rank takes part; summary.json's "torchrun"); then rank 0 alone
    # evaluates and writes the summary
    run.shares()
    if not run.main:
        return dict(train_steps=args.train_steps, final_loss=run.loss)

    x, metrics = evaluate(args.train_steps)
    if task.kind == "points":
        np.save(run.path("samples.npy"), x.numpy())
    if fid_samples > 0:
        g = common.generator(args.seed + 3, device)
        y = task.sample_conditions(fid_samples, g, device, data) if conditional else None
        xs = common.generate(ema.model, process, task, fid_samples, g, y=y, batch_size=256,
                             show_progress=True)
        metrics.update(fid=FID(task, fid_samples, device, args.data_dir)(xs),
                       fid_samples=fid_samples)
        print(f"FID ({fid_samples} samples vs {task.name} train): {metrics['fid']:.2f}")
    return run.finish(task=task.name, model=args.model,
                      parameters=sum(p.numel() for p in model.parameters()),
                      train_steps=args.train_steps, final_loss=run.loss, checkpoint=run.ckpt_path,
                      process=process.config, ema=ema.describe(),
                      cond_drop=args.cond_drop if conditional else None, **metrics,
                      shown=("final_loss", "mode_tv", "sw2", "fid"))


if __name__ == "__main__":
    common.run_main(main)
