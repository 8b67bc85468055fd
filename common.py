"""Plumbing shared by the scripts: run folders, clean errors, devices, batches, training, sampling.

Nothing here is an algorithm of the paper; the scripts keep those lines visible in themselves.
"""
import argparse
import json
import math
import os
import sys
import time

import torch

from models import (EMA, DDPM, CheckpointError, RectifiedFlow, TimeMLP, count_params, load_checkpoint,
                    model_from_checkpoint, save_checkpoint, unet_from_preset)
from models.checkpoint import set_rng_state
from tasks import DataError, get_task


class UsageError(ValueError):
    """Bad flag values (K > M, N_I out of range, ...); one line for the user."""


# ---------------------------------------------------------------- errors and run folders ----
def fail(msg):
    print(f"error: {msg}", file=sys.stderr)
    raise SystemExit(2)


def run_main(main):
    """Run ``main()``; bad input becomes one line on stderr and exit code 2."""
    try:
        main()
    except (DataError, CheckpointError, UsageError) as e:
        fail(str(e))


def add_common_args(p, task="toy2d"):
    p.add_argument("--task", default=task, help="task name from tasks.py (toy2d, mnist, celeba, celebahq, church)")
    p.add_argument("--out", default=None, help="output folder (default: runs/<script>/<task>...)")
    p.add_argument("--seed", type=int, default=0, help="seed of every random draw (data order, noise, init)")
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:1, ... (auto: cuda when available)")
    p.add_argument("--resume", action="store_true", help="continue from OUT/ckpt.pt if it exists")
    p.add_argument("--data-dir", default=None, help="where the task's data lies (see README's task table)")
    p.add_argument("--bf16", action="store_true", help="bf16 autocast for network calls (CUDA only)")
    p.add_argument("--compile", action="store_true", help="torch.compile the network (CUDA only)")
    return p


def parser(description):
    return argparse.ArgumentParser(description=description, formatter_class=argparse.ArgumentDefaultsHelpFormatter)


def pick_device(name):
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(name)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise UsageError(f"--device {name} asked for CUDA but none is available; use --device cpu")
    return dev


def generator(seed, device):
    return torch.Generator(device=device).manual_seed(seed)


def _atomic_json(path, obj):
    tmp = f"{path}.tmp"
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=2, default=str)
    os.replace(tmp, path)


class RunLog:
    """OUT/args.json at start, OUT/metrics.jsonl one line per log call, OUT/summary.json at the end."""

    def __init__(self, out, args):
        self.out = out
        os.makedirs(out, exist_ok=True)
        _atomic_json(os.path.join(out, "args.json"), vars(args))
        if not args.resume and os.path.exists(self.path("metrics.jsonl")):
            os.replace(self.path("metrics.jsonl"), self.path("metrics.prev.jsonl"))
        self.t0 = time.time()

    def path(self, name):
        return os.path.join(self.out, name)

    def log(self, **row):
        row = {"time_s": round(time.time() - self.t0, 2), **row}
        with open(self.path("metrics.jsonl"), "a") as f:
            f.write(json.dumps(row, default=float) + "\n")

    def summary(self, **summary):
        summary = {"wall_time_s": round(time.time() - self.t0, 1), **summary}
        _atomic_json(self.path("summary.json"), summary)
        return summary


def print_derived(title, **quantities):
    """Every script prints its derived quantities before it starts working."""
    print(f"== {title}")
    for k, v in quantities.items():
        print(f"   {k:28s} {v}")


# ---------------------------------------------------------------- models ----
def build_network(task, model_kind, preset=None, conditional=None):
    preset = preset or task.presets[model_kind]
    conditional = task.conditional if conditional is None else conditional
    nc = task.num_classes if conditional else 0
    cd = task.cond_dim if conditional else 0
    if preset == "mlp" or task.kind == "points":
        return TimeMLP(dim=2, hidden=256, depth=3, num_classes=nc, cond_dim=cd)
    return unet_from_preset(preset, task.image_size, task.channels, num_classes=nc, cond_dim=cd)


def build_process(task, model_kind, schedule="linear"):
    return DDPM(task.ddpm_steps, schedule) if model_kind == "ddpm" else RectifiedFlow()


def default_base_path(task_name, model_kind):
    return os.path.join("runs", "pretrain", f"{task_name}-{model_kind}", "ckpt.pt")


def load_base(path, device):
    """(model, process, ckpt) of a reference model; EMA weights, frozen."""
    ckpt = load_checkpoint(path)
    model, process = model_from_checkpoint(ckpt, device)
    return model.requires_grad_(False), process, ckpt


def wrap_net(model, bf16=False, compile=False):
    """The network as the samplers call it: optional torch.compile and bf16 autocast (CUDA only)."""
    dev = next(model.parameters()).device
    net = torch.compile(model) if compile and dev.type == "cuda" else model
    if not (bf16 and dev.type == "cuda"):
        return net

    def call(x, t, y=None):
        with torch.autocast("cuda", dtype=torch.bfloat16):
            return net(x, t, y).float()
    return call


# ---------------------------------------------------------------- data ----
class Batches:
    """Endless shuffled minibatches. Tensor datasets are indexed directly on the device (no
    DataLoader overhead); file datasets go through a DataLoader with workers. Resumable."""

    def __init__(self, dataset, batch_size, device, seed=0, workers=2):
        self.device, self.bs = device, batch_size
        self.g = torch.Generator().manual_seed(seed)
        self.tensors = [t.to(device) for t in dataset.tensors] if hasattr(dataset, "tensors") else None
        self.dataset, self.workers = dataset, workers
        if len(dataset) < 1:
            raise DataError("the dataset is empty; check --data-dir")
        self._it = None

    def state(self):
        return self.g.get_state()

    def set_state(self, s):
        self.g.set_state(s)

    def __next__(self):
        if self.tensors is not None:
            idx = torch.randint(len(self.tensors[0]), (self.bs,), generator=self.g).to(self.device)
            return tuple(t[idx] for t in self.tensors)
        if self._it is None:
            sampler = torch.utils.data.RandomSampler(self.dataset, replacement=True, num_samples=10 ** 12,
                                                     generator=self.g)
            loader = torch.utils.data.DataLoader(self.dataset, self.bs, sampler=sampler, num_workers=self.workers,
                                                 drop_last=True, persistent_workers=self.workers > 0)
            self._it = iter(loader)
        return tuple(t.to(self.device, non_blocking=True) for t in next(self._it))


# ---------------------------------------------------------------- training ----
def lr_at(step, total, lr, schedule="cosine", warmup=100):
    if step < warmup:
        return lr * (step + 1) / warmup
    if schedule == "constant":
        return lr
    return lr * 0.5 * (1 + math.cos(math.pi * min(1.0, (step - warmup) / max(1, total - warmup))))


def train(model, loss_fn, steps, lr, out, args, process, start_step=0, ema=None, opt=None, schedule="cosine",
          warmup=100, grad_clip=1.0, ckpt_every=1000, log=None, on_eval=None, eval_every=0, extra_state=None,
          desc="train"):
    """A plain AdamW loop: ``loss_fn(step) -> scalar``; EMA, clipping, LR schedule, periodic
    checkpoints (OUT/ckpt.pt, atomic) and evals. Returns (final smoothed loss, ema, opt)."""
    from tqdm import tqdm
    opt = opt or torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    ema = ema or EMA(model, args.ema_decay if hasattr(args, "ema_decay") else 0.999)
    model.train()
    smooth, losses = None, []
    bar = tqdm(range(start_step, steps), desc=desc, initial=start_step, total=steps, mininterval=2,
               disable=not sys.stderr.isatty() and os.environ.get("PGRAFT_TQDM") != "1")

    def checkpoint(step):
        save_checkpoint(os.path.join(out, "ckpt.pt"), model, process, ema, opt, step, args,
                        extra=extra_state() if extra_state else None)

    for step in bar:
        for group in opt.param_groups:
            group["lr"] = lr_at(step, steps, lr, schedule, warmup)
        loss = loss_fn(step)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if grad_clip:
            torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
        opt.step()
        ema.update(model)
        losses.append(loss.detach())
        if (step + 1) % 100 == 0 or step + 1 == steps:
            mean = torch.stack(losses).mean().item()  # one host sync per 100 steps
            losses.clear()
            smooth = mean
            bar.set_postfix(loss=f"{mean:.4f}")
            if log:
                log(step=step + 1, loss=mean, lr=opt.param_groups[0]["lr"])
        if ckpt_every and (step + 1) % ckpt_every == 0 and step + 1 < steps:
            checkpoint(step + 1)
        if on_eval and eval_every and (step + 1) % eval_every == 0 and step + 1 < steps:
            model.eval()
            on_eval(step + 1, ema.model)
            model.train()
    if losses:
        smooth = torch.stack(losses).mean().item()
    checkpoint(steps)
    model.eval()
    return smooth, ema, opt


def resume_state(path, model, ema, opt):
    """Load weights, EMA, optimiser and RNG from a checkpoint; returns (step, extra)."""
    ckpt = load_checkpoint(path)
    model.load_state_dict(ckpt["model"])
    if ckpt.get("ema") is not None:
        ema.load_state_dict(ckpt["ema"])
    if ckpt.get("optimizer") is not None:
        opt.load_state_dict(ckpt["optimizer"])
    set_rng_state(ckpt["rng"])
    return ckpt["step"], ckpt.get("extra") or {}


# ---------------------------------------------------------------- sampling ----
def generate(model, process, task, n, gen, batch_size=1000, y=None, num_steps=None, eta=1.0, flow_method="euler",
             progress=False):
    """n samples from a model with the task's default sampler: DDPM ancestral (eta=1) over
    ``num_steps`` (default task.sample_steps) or Euler over task.flow_steps. Returns CPU tensor."""
    from tqdm import tqdm
    dev = next(model.parameters()).device if isinstance(model, torch.nn.Module) else gen.device
    out = []
    for i in tqdm(range(0, n, batch_size), desc="sample", disable=not progress, mininterval=2):
        b = min(batch_size, n - i)
        yb = y[i:i + b] if y is not None else None
        z = torch.randn((b, *task.shape()), generator=gen, device=dev)
        if isinstance(process, DDPM):
            x, _ = process.sample(model, z, y=yb, generator=gen, eta=eta, num_steps=num_steps or task.sample_steps,
                                  clip=task.kind == "image")
        else:
            x = process.sample(model, z, num_steps or task.flow_steps, y=yb, method=flow_method)
        out.append(x.clamp(-1, 1).cpu() if task.kind == "image" else x.cpu())
    return torch.cat(out)


def save_grid(images, path, nrow=None):
    import torchvision
    nrow = nrow or int(math.ceil(math.sqrt(len(images))))
    torchvision.utils.save_image(images.float().add(1).div(2).clamp(0, 1), path, nrow=nrow, padding=1)


def plot_points(sets, path, title="", background=None):
    """Scatter one or more 2-D point sets side by side; background=(fn, label) shades a reward."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, len(sets), figsize=(4 * len(sets), 4), squeeze=False)
    for ax, (name, pts) in zip(axes[0], sets.items()):
        if background is not None:
            fn, label = background
            g = torch.linspace(-3, 3, 200)
            xx, yy = torch.meshgrid(g, g, indexing="xy")
            zz = fn(torch.stack([xx.flatten(), yy.flatten()], 1)).reshape(200, 200)
            cs = ax.contourf(xx, yy, zz, levels=20, cmap="viridis", alpha=0.5)
            fig.colorbar(cs, ax=ax, label=label, fraction=0.046)
        p = pts[:5000].cpu()
        ax.scatter(p[:, 0], p[:, 1], s=1, c="k", alpha=0.4)
        ax.set(xlim=(-3, 3), ylim=(-3, 3), aspect="equal", title=name)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def n_params(model):
    return f"{count_params(model) / 1e6:.3f}M"
