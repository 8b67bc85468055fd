"""Inverse noise correction: invert data through a base flow, learn that noise, sample via both.

    python inverse_noise.py                     # toy2d on a CPU (pretrains the base flow if absent)
    python inverse_noise.py --task mnist --device cuda --sample-steps 20 --invert-samples 10000
    python inverse_noise.py --task celebahq --data-dir data/celebahq --device cuda --perturb 1e-3

Paper, section 4 and Table 5. With S_N the base flow's N-step Euler sampler (Algorithm 5):
  1. invert training data through S_N itself by backward Euler, N_b fixed-point iterations per
     step (Algorithm 6, models/flow.py ``invert``): z_i = S_N^{-1}(x_i [+ sigma * noise]);
  2. train the corrector, a small rectified flow from N(0, I) to the inverted noise {z_i};
  3. sample eps ~ N(0, I) -> corrector (N_c Euler steps) -> base S_N;
  4. compare quality against FLOPs/image with the base alone at several N (Table 5).
If the inversion is exact, S_N pushes the inverted-noise law q_N onto the data exactly, so the
corrector only has to learn q_N; a perfect base with an exact ODE solve has q_N = N(0, I).

The base always runs in fp32 (inversion, round trip and every sample of the table): the corrector
learns the inverse of that one map, so it must be pushed through the same map. --bf16 applies to
the corrector's training and sampling only.

Outputs in OUT (default runs/inverse_noise/<task>-N<N>): inverted/chunk_*.pt (the inverted noise, a
cache keyed by inverted/meta.json: reused whenever the settings match), corrector/ckpt.pt (records
base N and base checkpoint; --resume continues it), table.csv / table.md, quality_vs_flops.png,
samples.png (toy2d) or sample grids, metrics.jsonl, summary.json.
"""

import csv
import json
import math
import os
import time

import torch
from torch.utils.data import TensorDataset

import common
from eval.flops import flops_per_eval
from eval.metrics import sliced_wasserstein
from models import EMA, TimeMLP, lr_at, save_checkpoint, unet_from_preset
from tasks import TOY, Batches, UsageError, get_task

# Per-task overrides of the defaults in get_args (which are toy2d's).
# fmt: off
IMAGE256 = {"sample_steps": 200, "invert_samples": 10000, "chunk_size": 512, "sample_batch": 64,
            "corrector_preset": "corrector256", "train_steps": 400_000, "batch_size": 64,
            "lr": 1e-4, "eval_samples": 1000}
TASK_DEFAULTS = {
    "toy2d": {"sample_steps": 50, "invert_samples": 10000, "chunk_size": 2000,
              "sample_batch": 20000, "corrector_preset": "mlp128", "train_steps": 3000,
              "batch_size": 512, "lr": 2e-3, "eval_samples": 20000},
    "mnist": {"sample_steps": 50, "invert_samples": 10000, "chunk_size": 512, "sample_batch": 256,
              "corrector_preset": "tiny", "train_steps": 4000, "batch_size": 128, "lr": 5e-4,
              "eval_samples": 1000},
    "celeba": {"sample_steps": 100, "invert_samples": 10000, "chunk_size": 512, "sample_batch": 256,
               "corrector_preset": "tiny", "train_steps": 200_000, "batch_size": 128, "lr": 2e-4,
               "eval_samples": 1000},
    "celebahq": IMAGE256, "church": IMAGE256,
}
# fmt: on
# Flags that may differ between a run and its --resume; all others must match the checkpoint's.
MAY_CHANGE = (
    "out",
    "device",
    "compile",
    "data_dir",
    "lr",
    "sample_batch",
    "ckpt_every",
    "corrector_sample_steps",
    "base_sample_steps",
    "eval_samples",
    "fid_samples",
    "fid_ref_samples",
    "inception",
    "stop_after_chunks",
)
LOG_EVERY = 100  # corrector steps per logged loss (one host sync each)
MLP_PRESETS = {"mlp": 256, "mlp128": 128, "mlp64": 64}  # TimeMLP hidden width (depth 3), 2-D tasks


def get_args(argv=None):
    p = common.parser(__doc__.splitlines()[0], TASK_DEFAULTS)
    common.add_run_args(p)
    helps = {  # two of the shared flags mean something narrower here
        "bf16": "bf16 autocast for the corrector's training and sampling (CUDA only); the base "
        "flow always runs in fp32, so the table's samples go through the map that was "
        "inverted",
        "resume": "continue the corrector from OUT/corrector/ckpt.pt (flags that define the run "
        "must match the checkpoint's; see 'may change on resume' below). Inverted "
        "chunks in OUT/inverted are reused with or without it when their settings match",
    }
    for action in p._actions:
        action.help = helps.get(action.dest, action.help)
    p.add_argument(
        "--base",
        default=None,
        help="base rectified-flow checkpoint (None: runs/"
        "pretrain/<task>-flow/ckpt.pt, pretrained first by pretrain.py --model flow "
        "when absent)",
    )
    p.add_argument(
        "--sample-steps",
        type=common.pos_int,
        default=50,
        help="N: base Euler steps, for the inversion and for sampling through the base",
    )
    p.add_argument(
        "--n-fixed",
        type=common.pos_int,
        default=10,
        help="N_b: fixed-point iterations per backward-Euler step of the inversion",
    )
    p.add_argument(
        "--perturb",
        type=common.nonneg_float,
        default=0.0,
        help="sigma of Gaussian "
        "noise added to the data before inversion (paper: 1e-3 for LSUN Church)",
    )
    p.add_argument(
        "--invert-samples",
        type=common.pos_int,
        default=10000,
        help="training examples to invert (a seeded random subset, capped at the dataset size)",
    )
    p.add_argument(
        "--chunk-size",
        type=common.pos_int,
        default=2000,
        help="examples per inverted-noise chunk on disk; a crash loses at most one chunk",
    )
    p.add_argument(
        "--sample-batch",
        type=common.pos_int,
        default=20000,
        help="examples per network batch when inverting and sampling (memory)",
    )
    p.add_argument(
        "--corrector-preset",
        default="mlp128",
        help="corrector network: a UNet preset of models/unet.py, or mlp/mlp128/mlp64 for 2-D",
    )
    p.add_argument(
        "--train-steps", type=common.pos_int, default=3000, help="corrector optimiser steps"
    )
    p.add_argument("--batch-size", type=common.pos_int, default=512, help="corrector minibatch")
    p.add_argument(
        "--lr", type=common.pos_float, default=2e-3, help="corrector peak AdamW learning rate"
    )
    p.add_argument(
        "--warmup",
        type=common.nonneg_int,
        default=100,
        help="linear LR warm-up steps (then cosine decay)",
    )
    p.add_argument(
        "--grad-clip",
        type=common.nonneg_float,
        default=1.0,
        help="clip the corrector's gradient norm (0: off)",
    )
    p.add_argument(
        "--ema-decay",
        type=common.unit_float,
        default=0.999,
        help="EMA decay of the "
        "corrector weights that are sampled from (warmed up as min(d, (1+s)/(10+s)))",
    )
    p.add_argument(
        "--ckpt-every",
        type=common.nonneg_int,
        default=1000,
        help="write OUT/corrector/ckpt.pt every this many steps (0: at the end only)",
    )
    p.add_argument(
        "--corrector-sample-steps",
        type=common.int_list,
        default=None,
        help="comma list of corrector Euler steps N_c for the table (None: N/4,N/2,N)",
    )
    p.add_argument(
        "--base-sample-steps",
        type=common.int_list,
        default=None,
        help="comma list of "
        "base Euler steps for the base-alone rows; N is always added (None: N/2,2N,4N)",
    )
    p.add_argument(
        "--eval-samples",
        type=common.pos_int,
        default=20000,
        help="samples per table "
        "row for the cheap metrics (toy2d: mode TV, sliced W2; images up to 4096 "
        "values: pixel sliced W2 against held-out data)",
    )
    p.add_argument(
        "--fid-samples",
        type=common.fid_int,
        default=-1,
        help="samples per table row for FID on image tasks (-1: 5000 on CUDA, 0 on CPU; 0: none)",
    )
    p.add_argument(
        "--fid-ref-samples",
        type=common.nonneg_int,
        default=0,
        help="training images "
        "for the FID reference statistics (0: the whole split; cached by eval/fid.py)",
    )
    p.add_argument(
        "--inception",
        default=None,
        help="Inception weights file for FID (None: eval/inception.py's search order)",
    )
    p.add_argument(
        "--stop-after-chunks",
        type=common.nonneg_int,
        default=0,
        help="debug: exit (code 3) after writing this many new chunks, to test resuming (0: off)",
    )
    args, _ = common.parse(p, argv, TASK_DEFAULTS, MAY_CHANGE)
    n = args.sample_steps
    args.corrector_sample_steps = args.corrector_sample_steps or sorted(
        {max(1, n // 4), max(1, n // 2), n}
    )
    args.base_sample_steps = sorted(
        set(args.base_sample_steps or {max(1, n // 2), 2 * n, 4 * n}) | {n}
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
    n = args.sample_steps
    args.out = args.out or os.path.join("runs", "inverse_noise", f"{task.name}-N{n}")
    common.check_out(args.out)
    fid_samples = common.fid_count(args.fid_samples, device, task)
    torch.manual_seed(args.seed)

    # ---- everything is loaded and checked before --out is touched
    args.base = common.ensure_base(
        args.base, task, "flow", seed=args.seed, device=args.device, data_dir=args.data_dir
    )
    base, process, base_ckpt = common.load_base(args.base, device)
    if (base_ckpt.get("process") or {}).get("kind") != "flow":
        raise UsageError(
            f"{args.base} is not a rectified flow; pretrain one with "
            f"`python pretrain.py --model flow` or pass another --base"
        )
    cfg = base_ckpt["model_config"]
    num_classes, cond_dim = cfg.get("num_classes", 0), cfg.get("cond_dim", 0)
    conditional = bool(num_classes or cond_dim)
    image_size = cfg.get("image_size") if cfg["kind"] == "unet" else None
    shape = task.shape(image_size)
    data = task.dataset("train", args.data_dir, image_size)
    n_invert = min(args.invert_samples, len(data))
    corrector = build_corrector(task, args.corrector_preset, image_size, num_classes, cond_dim)
    corrector = corrector.to(device)
    x_ex, y_ex = torch.zeros((1, *shape), device=device), example_condition(cfg, device)
    f_base, f_corr = flops_per_eval(base, x_ex, y=y_ex), flops_per_eval(corrector, x_ex, y=y_ex)
    fid = fid_evaluator(args, device) if fid_samples else None
    chunk_dir = os.path.join(args.out, "inverted")
    meta = {
        "task": task.name,
        "base": os.path.abspath(args.base),
        "base_step": base_ckpt["step"],
        "base_weights": weights_fingerprint(base),
        "N": n,
        "n_fixed": args.n_fixed,
        "perturb": args.perturb,
        "seed": args.seed,
        "num_invert": n_invert,
        "chunk_size": args.chunk_size,
        "conditional": conditional,
        "shape": list(shape),
    }
    check_chunks(chunk_dir, meta)
    ckpt_path = os.path.join(args.out, "corrector", "ckpt.pt")
    ckpt = common.load_resume(ckpt_path, args, MAY_CHANGE)
    if ckpt is not None and (ckpt.get("extra") or {}).get("base_weights") != meta["base_weights"]:
        raise UsageError(
            f"{ckpt_path} corrects other base weights than {args.base}'s; pass "
            f"another --out, or drop --resume to train a new corrector"
        )
    start = ckpt["step"] if ckpt is not None else 0
    log = common.RunLog(
        args.out,
        args,
        resumed_at=("step", start) if args.resume else None,
        run_files=("summary.json", os.path.join("corrector", "ckpt.pt")),
        write=dist.main,
    )
    n_chunks = math.ceil(n_invert / args.chunk_size)
    common.print_derived(
        f"inverse noise correction on {task.name}",
        device=device,
        base=f"{args.base} (step {base_ckpt['step']}, {common.n_params(base)}, fp32 always)",
        conditional=conditional,
        N_base_steps=n,
        n_fixed_N_b=args.n_fixed,
        h_step=1.0 / n,
        perturb_sigma=args.perturb,
        inverted=f"{n_invert} of {len(data)} in {n_chunks} chunks of {args.chunk_size}",
        NFE_per_inverted_example=f"{n * args.n_fixed} (+{n} for the round trip)",
        corrector=f"{args.corrector_preset} ({common.n_params(corrector)}), {args.train_steps} "
        f"steps, batch {args.batch_size}, lr {args.lr}, bf16 {args.bf16}",
        flops_per_eval=f"base {f_base:.4g}, corrector {f_corr:.4g} (ratio {f_corr / f_base:.3f})",
        base_alone_N=args.base_sample_steps,
        corrector_N_c=args.corrector_sample_steps,
        samples_per_row=args.eval_samples,
        fid_per_row=fid_samples,
        out=args.out,
    )

    # one network for the base everywhere: fp32, whatever --bf16 says (the inversion's map)
    base_net = common.wrap_net(base, bf16=False, compile=args.compile)
    z, y, inversion = invert(
        args, base_net, process, data, n_invert, chunk_dir, meta, conditional, dist, log
    )
    print("how far the inverted noise is from N(0, I):")
    gauss = gaussianity(z, seed=args.seed, device=device)
    print_gaussianity(gauss)
    log.log(
        phase="gaussianity",
        **{f"noise_{k}": v for k, v in gauss["noise"].items()},
        **{f"null_{k}": v for k, v in gauss["null"].items()},
    )
    records = {
        "base_N": n,
        "base_checkpoint": meta["base"],
        "base_step": meta["base_step"],
        "base_weights": meta["base_weights"],
        "n_fixed": args.n_fixed,
        "perturb": args.perturb,
        "num_inverted": len(z),
    }
    ema, corr_loss, corr_seconds = train_corrector(
        args, corrector, process, z, y, ckpt, ckpt_path, records, conditional, dist, log
    )
    if not dist.main:  # torchrun: rank 0 evaluates and writes the table
        return {"corrector_final_loss": corr_loss}
    corr_net = common.wrap_net(ema.model, bf16=args.bf16, compile=args.compile)
    ev = evaluate(
        args,
        task,
        process,
        base_net,
        corr_net,
        shape,
        data,
        image_size,
        conditional,
        device,
        (f_base, f_corr),
        fid,
        fid_samples,
        z,
        log,
    )
    eval_seconds = ev.pop("seconds")
    summary = log.summary(
        task=task.name,
        N=n,
        **ev,
        inversion=inversion,
        gaussianity=gauss,
        flops_per_eval_base=f_base,
        flops_per_eval_corrector=f_corr,
        base_checkpoint=args.base,
        base_step=meta["base_step"],
        corrector_checkpoint=ckpt_path,
        corrector_preset=args.corrector_preset,
        corrector_final_loss=corr_loss,
        n_fixed=args.n_fixed,
        perturb=args.perturb,
        num_inverted=len(z),
        fid_samples=fid_samples,
        seconds={
            "invert": inversion["seconds"],
            "corrector": corr_seconds,
            "evaluate": eval_seconds,
        },
    )
    print(f"done in {summary['wall_time_s']} s; wrote {args.out}")
    return summary


# ---------------------------------------------------------------- step 1: invert the data ----
def invert(args, base_net, process, data, n_invert, chunk_dir, meta, conditional, dist, log):
    """A seeded random subset of the training data inverted chunk by chunk (chunks on disk are
    reused; under torchrun rank r computes the chunks c with c % P = r; a stop signal or
    --stop-after-chunks ends the run between chunks). Returns (z, y, stats) of the examples that
    inverted to finite noise."""
    t0, device = time.time(), dist.device
    os.makedirs(chunk_dir, exist_ok=True)
    if dist.main and not os.path.isfile(os.path.join(chunk_dir, "meta.json")):
        common.atomic_json(os.path.join(chunk_dir, "meta.json"), meta)
    idx = torch.randperm(len(data), generator=torch.Generator().manual_seed(args.seed))[:n_invert]
    n_chunks = math.ceil(n_invert / args.chunk_size)
    parts, computed = [], 0
    with common.StopSignals() as stop:
        for c in range(n_chunks):
            cidx = idx[c * args.chunk_size : (c + 1) * args.chunk_size]
            path = os.path.join(chunk_dir, f"chunk_{c:05d}.pt")
            chunk = load_chunk(path, len(cidx))
            if chunk is None and c % dist.world != dist.rank:  # another rank's chunk: read it below
                parts.append(path)
                continue
            if chunk is None:
                ts = time.time()
                chunk = invert_chunk(args, base_net, process, data, cidx, c, conditional, device)
                common.atomic_save(chunk, path)  # a crash leaves either no chunk or a whole one
                computed += 1
                row = {
                    "residual_max": chunk["residual"].max().item(),
                    "roundtrip_max": chunk["roundtrip"].max().item(),
                    "seconds": round(time.time() - ts, 2),
                }
                print(
                    f"   chunk {c + 1}/{n_chunks}: fixed-point residual max "
                    f"{row['residual_max']:.3g}, round trip max {row['roundtrip_max']:.3g} "
                    f"({row['seconds']} s)"
                )
                log.log(phase="invert", chunk=c, **row)
            parts.append(chunk)
            if c + 1 < n_chunks and args.stop_after_chunks and computed >= args.stop_after_chunks:
                print(
                    f"stopping after {computed} new chunks (--stop-after-chunks); rerun to resume"
                )
                raise SystemExit(3)
            if c + 1 < n_chunks and stop.requested:
                stop.stop(
                    f"after inverted chunk {c + 1}/{n_chunks}",
                    "the chunks so far are kept; rerun the same command to continue",
                )
    dist.barrier()  # every rank's chunks are on disk
    parts = [
        load_chunk(p, len(idx[c * args.chunk_size : (c + 1) * args.chunk_size]))
        if isinstance(p, str)
        else p
        for c, p in enumerate(parts)
    ]
    inv = {k: torch.cat([p[k] for p in parts]) for k in ("z", "y", "residual", "roundtrip")}
    finite = torch.isfinite(inv["z"].flatten(1)).all(1) & torch.isfinite(inv["residual"])
    if finite.sum() < 2:
        raise UsageError(
            "fewer than 2 examples inverted to finite noise; raise --sample-steps or --n-fixed"
        )
    res, rt = inv["residual"][finite], inv["roundtrip"][finite]
    stats = {
        "computed_chunks": computed,
        "reused_chunks": n_chunks - computed,
        "nonfinite": int((~finite).sum()),
        "residual_mean": res.mean().item(),
        "residual_max": res.max().item(),
        "roundtrip_mean": rt.mean().item(),
        "roundtrip_max": rt.max().item(),
        "roundtrip_rms_per_dim_max": (rt.max() / math.sqrt(inv["z"][0].numel())).item(),
        "seconds": round(time.time() - t0, 1),
    }
    print(
        f"inverted {n_invert} examples ({stats['reused_chunks']} chunks reused, {computed} "
        f"computed, {stats['nonfinite']} non-finite dropped): fixed-point residual mean "
        f"{stats['residual_mean']:.3g} max {stats['residual_max']:.3g}; round trip "
        f"||S_N(invert(x)) - x|| mean {stats['roundtrip_mean']:.3g} max "
        f"{stats['roundtrip_max']:.3g}"
    )
    if stats["nonfinite"] or stats["roundtrip_rms_per_dim_max"] > 1e-2:
        print(
            "warning: the backward-Euler fixed point did not converge everywhere "
            "(h * Lip(v) >= 1?); raise --sample-steps or --n-fixed"
        )
    return inv["z"][finite], inv["y"][finite], stats


@torch.no_grad()
def invert_chunk(args, base_net, process, data, cidx, c, conditional, device):
    """Algorithm 6: z_i = S_N^{-1}(x_i [+ sigma noise]) by backward Euler through the base's own
    N-step Euler sampler (--n-fixed fixed-point iterations per step), and the round trip
    ||S_N(z_i) - x_i|| that checks it. One chunk's CPU tensors index, z, y, residual, roundtrip."""
    x_all, y_all = fetch(data, cidx)
    g = common.generator((args.seed + 1) * 1_000_003 + c, device)  # this chunk's perturbation
    n, bs = args.sample_steps, args.sample_batch
    zs, rs, rts = [], [], []
    for i in range(0, len(cidx), bs):
        x = x_all[i : i + bs].to(device)
        y = y_all[i : i + bs].to(device) if conditional else None
        if args.perturb:
            x = x + args.perturb * torch.randn(x.shape, generator=g, device=device)
        z, residual = process.invert(base_net, x, n, n_fixed=args.n_fixed, y=y)
        x_back = process.sample(base_net, z, n, y=y)  # the round trip through S_N
        zs.append(z.cpu())
        rs.append(residual.cpu())
        rts.append((x_back - x).flatten(1).norm(dim=1).cpu())
    return {
        "index": cidx.clone(),
        "z": torch.cat(zs),
        "y": y_all.clone(),
        "residual": torch.cat(rs),
        "roundtrip": torch.cat(rts),
    }


# ---------------------------------------------------------------- step 2: the corrector ----
def train_corrector(
    args, corrector, process, z, y, ckpt, ckpt_path, records, conditional, dist, log
):
    """Section 4: the corrector is a rectified flow from N(0, I) to the inverted noise {z_i},
    trained with the base's own loss and pretrain.py's loop (AdamW, warm-up then cosine decay,
    gradient clipping, EMA). Returns (ema, last logged loss, seconds)."""
    t0, device = time.time(), dist.device
    store = device if z.numel() * 4 < 2**32 else torch.device("cpu")  # big sets stay on the host
    batches = Batches(TensorDataset(z, y), args.batch_size, store, seed=args.seed)
    gen = common.generator(args.seed + 1, device)  # the loss's noise and times
    opt = torch.optim.AdamW(corrector.parameters(), lr=args.lr, weight_decay=0.0)
    ema = EMA(corrector, args.ema_decay)
    start, window, last_loss = 0, [], None
    if ckpt is not None:
        start, extra = common.restore(ckpt, corrector, ema, opt)
        batches.set_state(extra["batches"])
        gen.set_state(extra["gen"])
        window = [v.to(device) for v in extra.get("loss_window", [])]  # losses since the last log
        last_loss = extra.get("last_loss")
        print(f"resumed the corrector from {ckpt_path} at step {start}")
    # --bf16: the corrector only; DDP under torchrun, each rank on its rows of every global batch
    net = common.wrap_net(dist.wrap(corrector), bf16=args.bf16, compile=args.compile)
    rows = dist.rows(args.batch_size) if dist.world > 1 else None
    autocast = torch.autocast(
        "cuda", dtype=torch.bfloat16, enabled=args.bf16 and device.type == "cuda"
    )

    def checkpoint(step):
        common.check_weights(corrector, step, args.lr)  # never replace a good checkpoint with NaN
        if not dist.main:
            return
        save_checkpoint(
            ckpt_path,
            corrector,
            process,
            ema,
            opt,
            step,
            args,
            extra={
                "batches": batches.state(),
                "gen": gen.get_state(),
                "last_loss": last_loss,
                **records,
                "loss_window": torch.stack(window).cpu() if window else torch.zeros(0),
            },
        )

    corrector.train()
    with common.StopSignals() as stop:  # SIGTERM / Ctrl-C: finish the step, save, exit
        for step in common.progress(range(start, args.train_steps), "corrector", args.train_steps):
            for group in opt.param_groups:
                group["lr"] = lr_at(step, args.train_steps, args.lr, "cosine", args.warmup)
            zb, yb = (t.to(device, non_blocking=True) for t in next(batches))
            with autocast:
                loss = process.loss(net, zb, yb if conditional else None, gen, rows=rows)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            if args.grad_clip > 0:
                torch.nn.utils.clip_grad_norm_(corrector.parameters(), args.grad_clip)
            opt.step()
            ema.update(corrector)
            window.append(loss.detach())
            done = step + 1
            if done % LOG_EVERY == 0 or done == args.train_steps:
                last_loss = common.check_loss(
                    window, done, args.lr, dist=dist
                )  # diverged: stop unsaved
                window = []
                log.log(phase="corrector", step=done, loss=last_loss, lr=opt.param_groups[0]["lr"])
            if args.ckpt_every and done % args.ckpt_every == 0 and done < args.train_steps:
                checkpoint(done)
            if dist.any(stop.requested):
                stop.requested = stop.requested or "SIGTERM"
                checkpoint(done)
                stop.stop(
                    f"at corrector step {done}",
                    f"saved {ckpt_path}; rerun the same command with --resume to continue",
                )
    corrector.eval()
    checkpoint(args.train_steps)
    seconds = round(time.time() - t0, 1)
    shown = "unknown" if last_loss is None else f"{last_loss:.5f}"
    print(f"corrector trained: final loss {shown} ({seconds} s); wrote {ckpt_path}")
    return ema, last_loss, seconds


# ---------------------------------------------------------------- steps 3-4: sample, compare ----
def evaluate(
    args,
    task,
    process,
    base_net,
    corr_net,
    shape,
    data,
    image_size,
    conditional,
    device,
    flops,
    fid,
    fid_samples,
    z_inv,
    log,
):
    """Table 5: quality against FLOPs/image of the base alone at each N and of corrector (N_c
    steps) + base (N steps), every row from the same eps; writes table.csv/md, the plot and
    pictures, and checks the claim. Returns the summary's entries."""
    t0 = time.time()
    n, (f_base, f_corr) = args.sample_steps, flops
    n_gen = max(args.eval_samples, fid_samples)
    gy = common.generator(args.seed + 3, device)
    y = task.sample_conditions(n_gen, gy, device, data) if conditional else None
    keys, quality, floor = quality_metrics(args, task, data, image_size, fid, fid_samples)
    configs = [("base", nb, 0) for nb in args.base_sample_steps] + [
        ("base+corrector", n, nc) for nc in args.corrector_sample_steps
    ]
    rows, kept = [], {}
    for method, nb, nc in configs:
        ts = time.time()
        x = sample_pipeline(
            process,
            base_net,
            corr_net,
            shape,
            n_gen,
            nb,
            nc,
            args.seed + 100,
            device,
            args.sample_batch,
            y,
            clamp=task.kind == "image",
        )
        row = dict(
            method=method,
            N=nb,
            N_c=nc,
            nfe=nb + nc,
            flops=nb * f_base + nc * f_corr,
            flops_base_part=nb * f_base,
            flops_corrector_part=nc * f_corr,
            **quality(x),
            sample_seconds=round(time.time() - ts, 1),
        )
        rows.append(row)
        log.log(phase="eval", **row)
        print(
            f"   {method:15s} N={nb:<4d} N_c={nc:<4d} FLOPs/image {row['flops']:.4g}  "
            + "  ".join(f"{k}={row[k]:.4g}" for k in keys)
        )
        if nb == n:
            kept[nc] = x[:5000] if task.kind == "points" else x[:64]
    key = keys[0] if keys else None
    claim = claim_check(rows, key)
    print(
        write_table(
            rows, ["method", "N", "N_c", "nfe", "flops"] + keys + ["sample_seconds"], args.out
        ),
        end="",
    )
    if key:
        plot_quality(
            rows,
            keys,
            log.path("quality_vs_flops.png"),
            f"{task.name}: base S_N alone "
            f"vs base + inverse-noise corrector (corrector trained at N={n})",
        )
    corrected = [r for r in rows if r["method"] == "base+corrector"]
    best = min(corrected, key=lambda r: sort_key(r, key)) if key else corrected[-1]
    base_row = next(r for r in rows if r["method"] == "base" and r["N"] == n)
    pictures(
        task,
        process,
        corr_net,
        shape,
        data,
        kept,
        best["N_c"],
        z_inv,
        n,
        args.seed + 100,
        device,
        log,
    )
    print(f"claim: {claim['verdict']}")
    return {
        "N_c": best["N_c"],
        "flops_base": base_row["flops"],
        "flops_corrected": best["flops"],
        "quality_metric": key,
        "quality_base": base_row.get(key) if key else None,
        "quality_corrected": best.get(key) if key else None,
        "quality_floor": floor,
        "rows": rows,
        "claim": claim,
        "seconds": round(time.time() - t0, 1),
    }


@torch.no_grad()
def sample_pipeline(
    process,
    base_net,
    corr_net,
    shape,
    n,
    n_base,
    n_c,
    seed,
    device,
    batch_size,
    y=None,
    clamp=False,
):
    """eps ~ N(0, I) -> corrector (n_c Euler steps; none if 0) -> base S_N (n_base Euler steps,
    Algorithm 5). The same seed gives the same eps for every row of the table."""
    g = common.generator(seed, device)
    out = []
    for i in range(0, n, batch_size):
        b = min(batch_size, n - i)
        yb = y[i : i + b] if y is not None else None
        z = torch.randn((b, *shape), generator=g, device=device)
        if n_c:
            z = process.sample(corr_net, z, n_c, y=yb)
        x = process.sample(base_net, z, n_base, y=yb)
        out.append(x.clamp(-1, 1).cpu() if clamp else x.cpu())
    return torch.cat(out)


def quality_metrics(args, task, data, image_size, fid, fid_samples):
    """(metric names, function of samples -> metrics, floor): toy2d's sliced W2 and mode TV, pixel
    sliced W2 against held-out images (up to 4096 values each), FID when ``fid`` is set. The floor
    is the cheap metric of real data against itself (what a perfect model would score)."""
    keys, ref, floor = [], None, {}
    if task.kind == "points":
        keys = ["sw2", "mode_tv"]
        real = task.metrics(TOY.sample(args.eval_samples, torch.Generator().manual_seed(999)))
        floor = {k: real[k] for k in keys}
    elif math.prod(task.shape(image_size)) <= 4096:
        held = task.dataset("test", args.data_dir, image_size)
        ref = fetch(
            held,
            torch.randperm(len(held), generator=torch.Generator().manual_seed(7))[
                : args.eval_samples
            ],
        )[0]
        same = fetch(
            data, torch.randperm(len(data), generator=torch.Generator().manual_seed(8))[: len(ref)]
        )[0]
        floor = {"pixel_sw2": sliced_wasserstein(same.flatten(1), ref.flatten(1))}
        keys = ["pixel_sw2"]
    if fid is not None:
        from eval.fid import frechet_distance

        fid_ref = fid.reference_stats(
            task.name,
            split="train",
            image_size=image_size,
            data_dir=args.data_dir,
            num_images=args.fid_ref_samples or None,
        )
        keys = ["fid"] + keys

    def quality(x):
        q = {}
        if task.kind == "points":
            m = task.metrics(x[: args.eval_samples])
            q.update(sw2=m["sw2"], mode_tv=m["mode_tv"], nonfinite=m["nonfinite"])
        elif ref is not None:
            xe = x[: min(args.eval_samples, len(ref))]
            q["pixel_sw2"] = sliced_wasserstein(xe.flatten(1), ref[: len(xe)].flatten(1))
        if fid is not None:
            mu, sigma, _ = fid.stats(x[:fid_samples])
            q["fid"] = float(frechet_distance(mu, sigma, *fid_ref))
        return q

    return keys, quality, floor


def is_finite(v):
    return isinstance(v, (int, float)) and math.isfinite(v)


def sort_key(row, key):
    """Lower is better; a row without a finite value (or with non-finite samples) comes last."""
    ok = is_finite(row.get(key)) and not row.get("nonfinite")
    return (0, row[key]) if ok else (1, 0.0)


def claim_check(rows, key):
    """Table 5's claim: some base + corrector row beats every base-alone row of equal or higher
    FLOPs/image. Only rows with a finite value (and no non-finite samples) count; a corrected row
    with no base row at equal or higher FLOPs proves nothing and is not a witness."""
    if key is None:
        none = "no quality metric for this task on this device"
        return {"metric": None, "holds": None, "witnesses": [], "verdict": none, "note": none}
    usable = [r for r in rows if sort_key(r, key)[0] == 0]
    base = [r for r in usable if r["method"] == "base"]
    witnesses = []
    for r in usable:
        dearer = [b for b in base if b["flops"] >= r["flops"]]
        if r["method"] == "base+corrector" and dearer and all(r[key] < b[key] for b in dearer):
            witnesses.append(
                {
                    "N": r["N"],
                    "N_c": r["N_c"],
                    "flops": r["flops"],
                    "quality": r[key],
                    "best_dearer_base": min(b[key] for b in dearer),
                    "dearer_base_N": [b["N"] for b in dearer],
                }
            )
    best_base = min(base, key=lambda b: b[key], default=None)
    if not any(r["method"] == "base+corrector" for r in usable) or not base:
        holds, verdict = None, f"undecided: no finite {key} to compare"
    elif witnesses:
        holds, verdict = (
            True,
            (
                f"HOLDS: (N, N_c) = {[(w['N'], w['N_c']) for w in witnesses]} "
                f"beat every base-alone point of equal or higher FLOPs on {key}"
            ),
        )
    else:
        holds, verdict = (
            False,
            (
                f"does NOT hold on {key}: no base + corrector point beats every "
                f"base-alone point of equal or higher FLOPs"
            ),
        )
    best = (
        None
        if best_base is None
        else {"N": best_base["N"], "flops": best_base["flops"], "quality": best_base[key]}
    )
    return {
        "metric": key,
        "lower_is_better": True,
        "holds": holds,
        "witnesses": witnesses,
        "verdict": verdict,
        "best_base": best,
    }


# ---------------------------------------------------------------- tables, pictures ----
def write_table(rows, cols, out):
    """OUT/table.csv and OUT/table.md (non-finite values left empty); returns the markdown."""
    rows = common.strict(rows)
    with open(os.path.join(out, "table.csv"), "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=cols, extrasaction="ignore")
        w.writeheader()
        w.writerows(rows)

    def fmt(v):
        return "" if v is None else f"{v:.4g}" if isinstance(v, float) else str(v)

    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join(fmt(r.get(c)) for c in cols) + " |" for r in rows]
    text = "\n".join(lines) + "\n"
    with open(os.path.join(out, "table.md"), "w") as f:
        f.write(text)
    return text


def plot_quality(rows, metrics, path, title):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(metrics), figsize=(5.5 * len(metrics), 4.2), squeeze=False)
    for ax, key in zip(axes[0], metrics):
        for method, style, color, label in [
            ("base", "o-", "C0", "base alone (N)"),
            ("base+corrector", "s--", "C3", "base + corrector"),
        ]:
            pts = sorted(
                [r for r in rows if r["method"] == method and is_finite(r.get(key))],
                key=lambda r: r["flops"],
            )
            ax.plot(
                [r["flops"] for r in pts], [r[key] for r in pts], style, color=color, label=label
            )
            for r in pts:
                text = f"N={r['N']}" if method == "base" else f"{r['N']},{r['N_c']}"
                ax.annotate(
                    text,
                    (r["flops"], r[key]),
                    textcoords="offset points",
                    fontsize=8,
                    xytext=(4, 4) if method == "base" else (4, -10),
                    color=color,
                )
        ax.set(
            xscale="log",
            xlabel="FLOPs / image (torch.utils.flop_counter)",
            ylabel=f"{key} (lower is better)",
        )
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


@torch.no_grad()
def pictures(task, process, corr_net, shape, data, kept, best_nc, z_inv, n, seed, device, log):
    """toy2d: samples.png, data space (data, base, base + corrector) and noise space (inverted
    noise, the corrector's samples, N(0, I)); images: grids of the base and the best corrected
    row."""
    if task.kind == "image":
        common.save_grid(kept[0], log.path(f"samples_base_N{n}.png"), nrow=8)
        common.save_grid(kept[best_nc], log.path(f"samples_corrected_N{n}_Nc{best_nc}.png"), nrow=8)
        return
    eps = torch.randn((5000, *shape), generator=common.generator(seed, device), device=device)
    z_corr = process.sample(corr_net, eps, best_nc).cpu()  # noise drawn as the table's is
    common.plot_points(
        {
            "data": data.tensors[0][:5000],
            f"base N={n}": kept[0],
            f"base+corrector N_c={best_nc}": kept[best_nc],
            "inverted noise": z_inv[:5000],
            f"corrector samples (N_c={best_nc})": z_corr,
            "N(0, I)": eps.cpu(),
        },
        log.path("samples.png"),
        title=f"{task.name}: data space (first three panels), noise space (last three)",
    )


# ---------------------------------------------------------------- setup helpers ----
def build_corrector(task, preset, image_size, num_classes, cond_dim):
    if task.kind == "points":
        if preset not in MLP_PRESETS:
            raise UsageError(
                f"--corrector-preset {preset!r} is not a 2-D preset; use one of "
                f"{sorted(MLP_PRESETS)}"
            )
        return TimeMLP(
            dim=2, hidden=MLP_PRESETS[preset], depth=3, num_classes=num_classes, cond_dim=cond_dim
        )
    try:
        return unet_from_preset(
            preset, image_size, task.channels, num_classes=num_classes, cond_dim=cond_dim
        )
    except ValueError as e:
        raise UsageError(f"--corrector-preset: {e}") from None


def example_condition(cfg, device):
    """One condition of the base's kind, for counting FLOPs."""
    if cfg.get("num_classes"):
        return torch.zeros(1, dtype=torch.long, device=device)
    if cfg.get("cond_dim"):
        return torch.zeros(1, cfg["cond_dim"], device=device)
    return None


def fid_evaluator(args, device):
    """The FID network, loaded now so that missing weights are refused before any work."""
    from eval.fid import FIDEvaluator, FIDInputError
    from eval.inception import InceptionWeightsError

    fid = FIDEvaluator(device=str(device), inception_path=args.inception, progress=False)
    try:
        fid.model.eval()
    except (InceptionWeightsError, FIDInputError) as e:
        raise UsageError(f"FID: {e}; pass --fid-samples 0 to skip it") from None
    return fid


def weights_fingerprint(model):
    return f"{sum(p.detach().cpu().double().sum().item() for p in model.parameters()):.10e}"


# ---------------------------------------------------------------- inverted-noise chunks ----
def check_chunks(chunk_dir, meta):
    """Refuse a folder of inverted noise made with other settings (before anything is written)."""
    path = os.path.join(chunk_dir, "meta.json")
    if not os.path.isfile(path):
        return
    with open(path) as f:
        old = json.load(f)
    diff = {k: (old.get(k), v) for k, v in meta.items() if old.get(k) != v}
    if diff:
        raise UsageError(
            f"{chunk_dir} holds inverted noise made with other settings "
            f"({', '.join(f'{k}: {a} -> {b}' for k, (a, b) in diff.items())}); "
            f"use another --out or delete that folder"
        )


def load_chunk(path, n_expected):
    """A finished chunk, or None if it is absent or unreadable (then it is recomputed)."""
    if not os.path.isfile(path):
        return None
    try:
        chunk = torch.load(path, map_location="cpu", weights_only=True)
        keys = ("index", "z", "y", "residual", "roundtrip")
        if not all(len(chunk[k]) == n_expected for k in keys):
            raise ValueError("wrong length")
        return chunk
    except Exception as e:  # noqa: BLE001 - a damaged chunk is simply recomputed
        print(f"   {path} is unreadable ({type(e).__name__}); recomputing it")
        return None


def fetch(data, idx):
    """Items idx of a dataset as two stacked CPU tensors (x, y)."""
    if hasattr(data, "tensors"):
        return data.tensors[0][idx], data.tensors[1][idx]
    loader = torch.utils.data.DataLoader(
        torch.utils.data.Subset(data, idx.tolist()),
        batch_size=64,
        num_workers=min(4, os.cpu_count() or 1),
    )
    xs, ys = zip(*loader)
    return torch.cat(xs), torch.cat(ys)


# ---------------------------------------------------------------- how Gaussian is the noise ----
def _moments(a):
    """a (n, k) float64: ||mean||, ||cov - I||_F, that over sqrt(k), extreme eigenvalues of cov."""
    n, k = a.shape
    mean = a.mean(0)
    c = a - mean
    cov = c.T @ c / (n - 1)
    eig = torch.linalg.eigvalsh(cov)
    fro = (cov - torch.eye(k, dtype=a.dtype)).norm().item()
    return {
        "mean_norm": mean.norm().item(),
        "cov_minus_I_fro": fro,
        "cov_minus_I_rel": fro / math.sqrt(k),
        "cov_eig_min": eig[0].item(),
        "cov_eig_max": eig[-1].item(),
    }


@torch.no_grad()
def gaussianity(z, seed=0, device="cpu", max_dims=1024):
    """Distance of samples z (n, ...) from N(0, I), next to the same statistics of a fresh N(0, I)
    sample of the same size (the null level: finite-sample noise alone). Mean and per-dimension
    variance use every dimension; covariance and sliced W2 use at most ``max_dims`` random
    orthonormal directions (all dimensions when D <= max_dims)."""
    n = z.shape[0]
    zf = z.reshape(n, -1)
    d = zf.shape[1]
    g = torch.Generator().manual_seed(seed)
    s1 = torch.zeros(d, dtype=torch.float64)
    s2 = torch.zeros(d, dtype=torch.float64)
    for i in range(0, n, 4096):
        b = zf[i : i + 4096].double()
        s1 += b.sum(0)
        s2 += b.pow(2).sum(0)
    mean = s1 / n
    var = s2 / n - mean**2
    k = min(d, max_dims)
    if k < d:
        q = torch.linalg.qr(torch.randn(d, k, generator=g))[0].to(device)
        proj = torch.cat(
            [(zf[i : i + 4096].to(device).float() @ q).double().cpu() for i in range(0, n, 4096)]
        )
    else:
        proj = zf.double()
    ref1 = torch.randn(n, k, generator=g, dtype=torch.float64)
    ref2 = torch.randn(n, k, generator=g, dtype=torch.float64)
    noise, null = _moments(proj), _moments(ref1)
    noise["sw2"] = sliced_wasserstein(proj, ref1, seed=seed)
    null["sw2"] = sliced_wasserstein(ref2, ref1, seed=seed)
    return {
        "n": n,
        "dims": d,
        "dims_used_for_cov_and_sw2": k,
        "full_mean_norm": mean.norm().item(),
        "full_mean_norm_null": math.sqrt(d / n),
        "mean_sq_norm_per_dim": (s2.sum() / (n * d)).item(),
        "var_mean": var.mean().item(),
        "noise": noise,
        "null": null,
    }


def print_gaussianity(gs):
    print(
        f"   n={gs['n']}, D={gs['dims']}: ||mean|| {gs['full_mean_norm']:.4g} "
        f"(null ~{gs['full_mean_norm_null']:.4g}), E||z||^2/D {gs['mean_sq_norm_per_dim']:.4g} "
        f"(null 1)"
    )
    head = f"statistic (k={gs['dims_used_for_cov_and_sw2']} dims)"
    print(f"   {head:28s} {'inverted':>10s} {'N(0,I) null':>12s}")
    for key in gs["noise"]:
        print(f"   {key:28s} {gs['noise'][key]:10.4g} {gs['null'][key]:12.4g}")


if __name__ == "__main__":
    common.run_main(main)
