"""Inverse noise correction: invert data through a base flow, learn that noise, sample via both.

    python inverse_noise.py                     # toy2d on a CPU (pretrains the base flow if absent)
    python inverse_noise.py --task mnist --device cuda --sample-steps 20 --invert-samples 10000
    python inverse_noise.py --task celebahq --data-dir data/celebahq --device cuda --perturb 1e-3

Paper, section 4 and Table 5, with S_N the base flow's N-step Euler sampler (Algorithm 5):
  1. invert training data through S_N by backward Euler (Algorithm 6): z_i = S_N^{-1}(x_i);
  2. train the corrector, a small rectified flow from N(0, I) to the inverted noise {z_i};
  3. sample eps ~ N(0, I) -> corrector (N_c Euler steps) -> S_N;
  4. compare quality against FLOPs/image with the base alone at several N (Table 5).
If the inversion is exact, S_N pushes the inverted-noise law q_N onto the data, so the corrector
only has to learn q_N. The base always runs in fp32 (the corrector is pushed through the very map
it learned to invert); --bf16 applies to the corrector only.

Writes OUT/inverted/chunk_*.pt (the inverted noise, reused while inverted/meta.json matches),
corrector/ckpt.pt (records the base and N; --resume continues it), table.csv, table.md,
quality_vs_flops.png, samples.png or grids, metrics.jsonl, summary.json; OUT runs/inverse_noise/...
"""

import dataclasses
import os
import time

import torch
from torch.utils.data import TensorDataset

import common
import harness
from eval import quality_flops
from eval.flops import flops_per_eval
from eval.gaussianity import (chunk_stats, gaussianity, gaussianity_row, inversion_stats,
                              print_gaussianity)
from harness import arg
from models import EMA, TimeMLP, lr_at, unet_from_preset
from tasks import Batches, UsageError, get_task


# fmt: off
@dataclasses.dataclass
class Args(harness.RunArgs):
    """Inverse noise correction: invert data through a base flow, learn that noise, sample."""

    # two of the shared flags mean something narrower here
    resume: bool = arg(False, "continue the corrector from OUT/corrector/ckpt.pt (the flags that "
                       "define the run must match the checkpoint's); inverted chunks in "
                       "OUT/inverted are reused with or without it when their settings match")
    bf16: bool = arg(False, "bf16 autocast for the corrector's training and sampling (CUDA only); "
                     "the base flow always runs in fp32, the map that was inverted")
    base: str = arg(None, "base rectified flow (None: runs/pretrain/<task>-flow/ckpt.pt, "
                    "pretrained first by pretrain.py --model flow when absent)")
    sample_steps: int = arg(50, "N: base Euler steps, inverting and sampling", check=common.pos_int)
    n_fixed: int = arg(10, "N_b: fixed-point iterations per inversion step", check=common.pos_int)
    perturb: float = arg(0.0, "sigma of Gaussian noise added to the data before inversion (paper: "
                         "1e-3 for LSUN Church)", check=common.nonneg_float)
    invert_samples: int = arg(10000, "training examples to invert (a seeded random subset, capped "
                              "at the dataset size)", check=common.pos_int)
    chunk_size: int = arg(2000, "examples per inverted-noise chunk on disk", check=common.pos_int)
    sample_batch: int = arg(20000, "network batch (memory)", check=common.pos_int, may_change=True)
    corrector_preset: str = arg("mlp128", "UNet preset (models/unet.py) or mlp/mlp128/mlp64 (2-D)")
    train_steps: int = arg(3000, "corrector optimiser steps", check=common.pos_int)
    batch_size: int = arg(512, "corrector minibatch", check=common.pos_int)
    lr: float = arg(2e-3, "corrector peak AdamW LR", check=common.pos_float, may_change=True)
    warmup: int = arg(100, "linear LR warm-up steps (then cosine decay)", check=common.nonneg_int)
    grad_clip: float = arg(1.0, "clip the gradient norm (0: off)", check=common.nonneg_float)
    ema_decay: float = arg(0.999, "EMA decay of the corrector weights that are sampled from, "
                           "warmed up as min(d, (1+s)/(10+s))", check=common.unit_float)
    ckpt_every: int = arg(1000, "write OUT/corrector/ckpt.pt every this many steps (0: at the end)",
                          check=common.nonneg_int, may_change=True)
    corrector_sample_steps: list = arg(None, "comma list of the table's corrector Euler steps N_c "
                                       "(None: N/4,N/2,N)", check=common.int_list, may_change=True)
    base_sample_steps: list = arg(None, "comma list of the base-alone rows' Euler steps, N always "
                                  "added (None: N/2,2N,4N)", check=common.int_list, may_change=True)
    eval_samples: int = arg(20000, "samples per table row for the cheap metrics (toy2d: sliced W2, "
                            "mode TV; images of <= 4096 values: pixel sliced W2 to held-out data)",
                            check=common.pos_int, may_change=True)
    fid_samples: int = arg(-1, "samples per table row for FID on image tasks (-1: 5000 on CUDA, "
                           "0 on CPU)", check=common.fid_int, may_change=True)
    fid_ref_samples: int = arg(0, "training images for FID's reference statistics (0: the whole "
                               "split)", check=common.nonneg_int, may_change=True)
    inception: str = arg(None, "Inception weights for FID (None: eval/inception.py's search)",
                         may_change=True)
    stop_after_chunks: int = arg(0, "debug: exit (code 3) after this many new chunks, to test "
                                 "resuming (0: off)", check=common.nonneg_int, may_change=True)


# Per-task overrides of the defaults above (which are toy2d's).
IMAGE256 = dict(sample_steps=200, invert_samples=10000, chunk_size=512, sample_batch=64,
                corrector_preset="corrector256", train_steps=400_000, batch_size=64, lr=1e-4,
                eval_samples=1000)
TASK_DEFAULTS = {
    "mnist": dict(sample_steps=50, invert_samples=10000, chunk_size=512, sample_batch=256,
                  corrector_preset="tiny", train_steps=4000, batch_size=128, lr=5e-4,
                  eval_samples=1000),
    "celeba": dict(sample_steps=100, invert_samples=10000, chunk_size=512, sample_batch=256,
                   corrector_preset="tiny", train_steps=200_000, batch_size=128, lr=2e-4,
                   eval_samples=1000),
    "celebahq": IMAGE256, "church": IMAGE256}
# the 16-pixel digit tasks: a corrector of the base's own small size (no smaller UNet preset)
TASK_DEFAULTS.update({t: dict(TASK_DEFAULTS["mnist"], corrector_preset=p) for t, p in (
    ("mnist16", "small16"), ("mnist-pairs16", "small16"), ("mnist-pairs", "tiny"))})
# fmt: on
# the 2-D correctors: TimeMLP hidden width (depth 3)
MLP_PRESETS = {"mlp": 256, "mlp128": 128, "mlp64": 64}


def main(argv=None):
    args, _ = harness.parse(Args, argv, task_defaults=TASK_DEFAULTS, doc=__doc__)
    # the table's rows unless given: N_c in N/4, N/2, N; the base alone at N/2, N, 2N, 4N
    n, half = args.sample_steps, max(1, args.sample_steps // 2)
    args.corrector_sample_steps = args.corrector_sample_steps or sorted({max(1, n // 4), half, n})
    args.base_sample_steps = sorted(set(args.base_sample_steps or {half, 2 * n, 4 * n}) | {n})
    task = get_task(args.task)
    # an --out that holds a run is refused in run.begin, after every input is checked
    run = harness.Run(args, script="inverse_noise", unit="step", batch_size=args.batch_size,
                      out=os.path.join("runs", "inverse_noise", f"{task.name}-N{n}"),
                      ckpt=os.path.join("corrector", "ckpt.pt"), refuse_held=False)
    device = run.device
    fid_samples = common.fid_count(args.fid_samples, device, task)
    torch.manual_seed(args.seed)

    # the base flow, the data and the corrector, all checked before --out is touched
    args.base = common.ensure_base(args.base, task, "flow", seed=args.seed, device=args.device,
                                   data_dir=args.data_dir)
    base, process, base_ckpt = common.load_base(args.base, device, task=task)
    if (base_ckpt.get("process") or {}).get("kind") != "flow":
        raise UsageError(f"{args.base} is not a rectified flow; pretrain one with `python "
                         f"pretrain.py --model flow` or pass another --base")
    cfg = base_ckpt["model_config"]
    num_classes, cond_dim = cfg.get("num_classes", 0), cfg.get("cond_dim", 0)
    conditional = bool(num_classes or cond_dim)
    image_size = cfg.get("image_size") if cfg["kind"] == "unet" else None
    shape = task.shape(image_size)
    data = task.dataset("train", args.data_dir, image_size)
    n_invert = min(args.invert_samples, len(data))
    corrector = build_corrector(task, args.corrector_preset, image_size, num_classes, cond_dim)
    corrector.to(device)
    x1, y1 = torch.zeros((1, *shape), device=device), quality_flops.example_condition(cfg, device)
    f_base, f_corr = flops_per_eval(base, x1, y=y1), flops_per_eval(corrector, x1, y=y1)
    fid = quality_flops.fid_evaluator(args.inception, device) if fid_samples else None
    # the inverted noise is a cache keyed by everything that determines it
    meta = dict(task=task.name, base=os.path.abspath(args.base), base_step=base_ckpt["step"],
                base_weights=harness.fingerprint(base), N=n, n_fixed=args.n_fixed,
                perturb=args.perturb, seed=args.seed, num_invert=n_invert,
                chunk_size=args.chunk_size, conditional=conditional, shape=list(shape))
    cache = harness.ChunkCache(os.path.join(args.out, "inverted"), meta=meta, n=n_invert,
                               size=args.chunk_size, dist=run.dist,
                               keys=("index", "z", "y", "residual", "roundtrip"),
                               what="inverted noise")
    ckpt = run.check_resume()
    if ckpt is not None and (ckpt.get("extra") or {}).get("base_weights") != meta["base_weights"]:
        raise UsageError(f"{run.ckpt_path} corrects other base weights than {args.base}'s; pass "
                         f"another --out, or drop --resume to train a new corrector")
    run.begin(title=f"inverse noise correction on {task.name}", settings=dict(
        base=f"{args.base} (step {base_ckpt['step']}, {common.n_params(base)}, fp32 always)",
        conditional=conditional, N_base_steps=n, n_fixed_N_b=args.n_fixed, h_step=1.0 / n,
        perturb_sigma=args.perturb,
        inverted=f"{n_invert} of {len(data)} in {cache.count} chunks of {args.chunk_size}",
        NFE_per_inverted_example=f"{n * args.n_fixed} (+{n} for the round trip)",
        corrector=f"{args.corrector_preset} ({common.n_params(corrector)}), {args.train_steps} "
        f"steps, batch {args.batch_size}, lr {args.lr}, bf16 {args.bf16}",
        flops_per_eval=f"base {f_base:.4g}, corrector {f_corr:.4g} (ratio {f_corr / f_base:.3f})",
        base_alone_N=args.base_sample_steps, corrector_N_c=args.corrector_sample_steps,
        samples_per_row=args.eval_samples, fid_per_row=fid_samples))

    # one network for the base everywhere: fp32, whatever --bf16 says (the inversion's map)
    base_net = common.wrap_net(base, bf16=False, compile=args.compile)
    # 1. invert a seeded random subset of the training data through S_N, chunk by chunk
    idx = torch.randperm(len(data), generator=torch.Generator().manual_seed(args.seed))[:n_invert]
    z, y, inversion = invert(args, run, cache, base_net, process, data, idx, conditional)
    # how far the inverted noise is from N(0, I) (eval/gaussianity.py)
    gauss = gaussianity(z, seed=args.seed, device=device)
    print_gaussianity(gauss)
    run.log.log(phase="gaussianity", **gaussianity_row(gauss))
    # 2. train the corrector; its checkpoint records which base (and which N) it corrects
    records = dict(base_N=n, base_checkpoint=meta["base"], base_step=meta["base_step"],
                   base_weights=meta["base_weights"], n_fixed=args.n_fixed, perturb=args.perturb,
                   num_inverted=len(z))
    ema, corr_seconds = train_corrector(args, run, corrector, process, z, y, records, conditional)
    # what each rank did (the chunks it inverted, the rows it trained on), every rank taking part
    shares = run.shares()
    # 3-4. sample eps -> corrector -> base S_N, against the base alone (rank 0 under torchrun)
    if not run.main:
        return {"corrector_final_loss": run.loss}
    corr_net = common.wrap_net(ema.model, bf16=args.bf16, compile=args.compile)
    ev = evaluate(args, run, process, base_net, corr_net, task=task, shape=shape, data=data,
                  image_size=image_size, conditional=conditional, flops=(f_base, f_corr),
                  fid=fid, fid_samples=fid_samples, z_inv=z)
    seconds = dict(invert=inversion["seconds"], corrector=corr_seconds, evaluate=ev.pop("seconds"))
    summary = run.log.summary(
        task=task.name, N=n, **ev, inversion=inversion, gaussianity=gauss,
        flops_per_eval_base=f_base, flops_per_eval_corrector=f_corr, base_checkpoint=args.base,
        base_step=meta["base_step"], corrector_checkpoint=run.ckpt_path,
        corrector_preset=args.corrector_preset, corrector_final_loss=run.loss,
        n_fixed=args.n_fixed, perturb=args.perturb, num_inverted=len(z), fid_samples=fid_samples,
        seconds=seconds, torchrun=shares)
    print(f"done in {summary['wall_time_s']} s; wrote {args.out}")
    return summary


def invert(args, run, cache, base_net, process, data, idx, conditional):
    """Step 1: the examples ``idx`` inverted chunk by chunk (harness.ChunkCache: chunks on disk are
    reused). Returns (z, y, stats) of the examples that inverted to finite noise."""
    t0 = time.time()
    with run.stop_signals() as stop:
        for c, rows in cache.todo(stop=stop, stop_after=args.stop_after_chunks):
            ts = time.time()
            chunk = invert_chunk(args, base_net, process, data, idx[rows], c, conditional,
                                 run.device)
            cache.save(c, chunk)
            run.log.log(phase="invert", chunk=c, **chunk_stats(chunk, c, cache.count,
                                                               time.time() - ts))
    inv = cache.gather()
    ok, stats = inversion_stats(inv, computed=cache.computed, reused=cache.count - cache.computed,
                                seconds=round(time.time() - t0, 1))
    return inv["z"][ok], inv["y"][ok], stats


@torch.no_grad()
def invert_chunk(args, base_net, process, data, cidx, c, conditional, device):
    """One chunk's CPU tensors: index, z, y, the fixed-point residual and the round trip
    ||S_N(z_i) - x_i|| that checks the inversion."""
    x_all, y_all = quality_flops.fetch(data, cidx)
    # this chunk's perturbation
    g = common.generator((args.seed + 1) * 1_000_003 + c, device)
    n, bs = args.sample_steps, args.sample_batch
    zs, rs, rts = [], [], []
    for i in range(0, len(cidx), bs):
        x = x_all[i : i + bs].to(device)
        y = y_all[i : i + bs].to(device) if conditional else None
        if args.perturb:
            x = x + args.perturb * torch.randn(x.shape, generator=g, device=device)
        # ALGORITHM (paper, section 4, Algorithm 6): z_i = S_N^{-1}(x_i) by backward Euler through
        # the base's own N-step Euler sampler, --n-fixed fixed-point iterations per step
        z, residual = process.invert(base_net, x, n, n_fixed=args.n_fixed, y=y)
        # the round trip through S_N
        x_back = process.sample(base_net, z, n, y=y)
        zs.append(z.cpu())
        rs.append(residual.cpu())
        rts.append((x_back - x).flatten(1).norm(dim=1).cpu())
    return dict(index=cidx.clone(), z=torch.cat(zs), y=y_all.clone(), residual=torch.cat(rs),
                roundtrip=torch.cat(rts))


def train_corrector(args, run, corrector, process, z, y, records, conditional):
    """Step 2: the corrector, a rectified flow from N(0, I) to the inverted noise, trained with the
    base's loss and pretrain.py's loop. Returns (ema, seconds); the last logged loss: run.loss."""
    t0, device = time.time(), run.device
    # the inverted noise is the data (kept on the host when it is big)
    store = device if z.numel() * 4 < 2**32 else torch.device("cpu")
    batches = Batches(TensorDataset(z, y), args.batch_size, store, seed=args.seed)
    # the loss's noise and times
    gen = common.generator(args.seed + 1, device)
    opt = torch.optim.AdamW(corrector.parameters(), lr=args.lr, weight_decay=0.0)
    ema = EMA(corrector, args.ema_decay)
    start, saved = run.restore(model=corrector, ema=ema, opt=opt)
    if run.ckpt is not None:
        batches.set_state(saved["batches"])
        gen.set_state(saved["gen"])
        print(f"resumed the corrector from {run.ckpt_path} at step {start}")
    # --bf16: the corrector only; DDP under torchrun, each rank on its rows of every global batch
    net = common.wrap_net(run.dist.wrap(corrector), bf16=args.bf16, compile=args.compile)
    bf16 = torch.autocast("cuda", dtype=torch.bfloat16, enabled=args.bf16 and device.type == "cuda")
    corrector.train()
    with run.stop_signals():
        for step in common.progress(range(start, args.train_steps), "corrector", args.train_steps):
            lr = lr_at(step, args.train_steps, args.lr, "cosine", args.warmup)
            for group in opt.param_groups:
                group["lr"] = lr
            zb, yb = (t.to(device, non_blocking=True) for t in next(batches))
            # ALGORITHM (paper, section 4): the base's flow-matching loss, N(0, I) -> inverted noise
            with bf16:
                loss = process.loss(net, zb, yb if conditional else None, gen, rows=run.rows)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            if args.grad_clip > 0:
                torch.nn.utils.clip_grad_norm_(corrector.parameters(), args.grad_clip)
            opt.step()
            ema.update(corrector)
            done = step + 1
            run.step(loss, step=done, steps=args.train_steps, model=corrector, lr=lr,
                     phase="corrector", stop=False)
            if run.stopping or (args.ckpt_every and done % args.ckpt_every == 0
                                and done < args.train_steps):
                run.save(done, model=corrector, process=process, ema=ema, opt=opt,
                         extra=dict(batches=batches.state(), gen=gen.get_state(), **records))
            if run.stopping:
                run.halt(done, where=f"at corrector step {done}", resume_hint=f"saved "
                         f"{run.ckpt_path}; rerun the same command with --resume to continue")
    corrector.eval()
    run.save(args.train_steps, model=corrector, process=process, ema=ema, opt=opt,
             extra=dict(batches=batches.state(), gen=gen.get_state(), **records))
    seconds = round(time.time() - t0, 1)
    print(f"corrector trained: final loss {run.loss:.5f} ({seconds} s); wrote {run.ckpt_path}")
    return ema, seconds


def evaluate(args, run, process, base_net, corr_net, *, task, shape, data, image_size,
             conditional, flops, fid, fid_samples, z_inv):
    """Steps 3-4: quality against FLOPs/image of the base alone at each N and of corrector (N_c
    steps) + base (N steps), every row from the same eps. Returns the summary's entries."""
    t0, n, device = time.time(), args.sample_steps, run.device
    n_gen = max(args.eval_samples, fid_samples)
    gy = common.generator(args.seed + 3, device)
    y = task.sample_conditions(n_gen, gy, device, data) if conditional else None
    keys, quality, floor = quality_flops.quality_metrics(
        task, data, image_size=image_size, eval_samples=args.eval_samples, data_dir=args.data_dir,
        fid=fid, fid_samples=fid_samples, fid_ref_samples=args.fid_ref_samples)
    rows, kept = [], {}
    for method, nb, nc in ([("base", nb, 0) for nb in args.base_sample_steps]
                           + [("base+corrector", n, nc) for nc in args.corrector_sample_steps]):
        ts = time.time()
        x = sample_pipeline(process, base_net, corr_net, shape, n_gen, nb, nc, args.seed + 100,
                            device, args.sample_batch, y, clamp=task.kind == "image")
        rows.append(quality_flops.table_row(method, nb, nc, flops, quality(x), keys,
                                            seconds=time.time() - ts))
        run.log.log(phase="eval", **rows[-1])
        if nb == n:
            kept[nc] = x[:5000] if task.kind == "points" else x[:64]
    # the table, the plot and the claim check (eval/quality_flops.py)
    ev = quality_flops.report(rows, keys, floor, n=n, out=args.out, task=task.name)
    common.correction_pictures(task, args.out, process=process, corr_net=corr_net, kept=kept,
                               best=ev["N_c"], n=n, data=data, z_inv=z_inv, seed=args.seed + 100,
                               device=device)
    return dict(ev, seconds=round(time.time() - t0, 1))


@torch.no_grad()
def sample_pipeline(process, base_net, corr_net, shape, n, n_base, n_c, seed, device, batch_size,
                    y=None, clamp=False):
    """eps ~ N(0, I) -> corrector (n_c Euler steps; none if 0) -> base S_N (n_base Euler steps,
    Algorithm 5). The same seed gives the same eps for every row of the table."""
    g = common.generator(seed, device)
    out = []
    for i in range(0, n, batch_size):
        b = min(batch_size, n - i)
        yb = y[i : i + b] if y is not None else None
        z = torch.randn((b, *shape), generator=g, device=device)
        # ALGORITHM (paper, section 4): noise -> corrector -> base
        if n_c:
            z = process.sample(corr_net, z, n_c, y=yb)
        x = process.sample(base_net, z, n_base, y=yb)
        out.append(x.clamp(-1, 1).cpu() if clamp else x.cpu())
    return torch.cat(out)


def build_corrector(task, preset, image_size, num_classes, cond_dim):
    """The corrector network: a small TimeMLP on 2-D tasks, a UNet preset on images."""
    if task.kind == "points" and preset not in MLP_PRESETS:
        raise UsageError(f"--corrector-preset {preset!r} is not a 2-D preset; use one of "
                         f"{sorted(MLP_PRESETS)}")
    if task.kind == "points":
        return TimeMLP(dim=2, hidden=MLP_PRESETS[preset], depth=3, num_classes=num_classes,
                       cond_dim=cond_dim)
    try:
        return unet_from_preset(preset, image_size, task.channels, num_classes=num_classes,
                                cond_dim=cond_dim)
    except ValueError as e:
        raise UsageError(f"--corrector-preset: {e}") from None


if __name__ == "__main__":
    common.run_main(main)
