"""Inverse noise correction: invert data through the base flow, learn that noise, sample through both.

    python inverse_noise.py                                    # toy2d on a CPU (pretrains the base if absent)
    python inverse_noise.py --task mnist --device cuda --N 20 --n-fixed 5 --num-invert 10000
    python inverse_noise.py --task celebahq --data-dir data/celebahq --device cuda --N 200 --perturb 1e-3

Paper, section 4 and Table 5. With S_N the base flow's N-step Euler sampler (Algorithm 5):
  1. invert training data through S_N itself by backward Euler, N_b fixed-point iterations per
     step (Algorithm 6, models/flow.py ``invert``): z_i = S_N^{-1}(x_i [+ sigma * noise]);
  2. train the corrector, a small rectified flow from N(0, I) to the inverted noise {z_i};
  3. sample eps ~ N(0, I) -> corrector (N_c Euler steps) -> base S_N;
  4. compare quality against FLOPs/image with the base alone at several N.
If the inversion is exact, S_N pushes the inverted-noise distribution q_N onto the data exactly,
so the corrector only has to learn q_N; a perfect base with an exact ODE solve has q_N = N(0, I).

Outputs in OUT (default runs/inverse_noise/<task>-N<N>): inverted/chunk_*.pt (the inverted noise,
resumable), corrector/ckpt.pt (records base N and base checkpoint), table.csv / table.md,
quality_vs_flops.png, sample plots or grids, metrics.jsonl, summary.json.
"""
import csv
import json
import math
import os
import time

import torch

import common
from eval.flops import flops_per_eval
from eval.metrics import sliced_wasserstein
from models import TimeMLP, unet_from_preset
from tasks import TOY, get_task

MLP_PRESETS = {"mlp": 256, "mlp128": 128, "mlp64": 64}  # TimeMLP hidden width (depth 3) for 2-D tasks


def int_list(s):
    try:
        return sorted({int(v) for v in s.split(",") if v.strip()})
    except ValueError:
        raise common.UsageError(f"expected a comma-separated list of integers, got {s!r}") from None


def get_args(argv=None):
    p = common.parser(__doc__.splitlines()[0])
    common.add_common_args(p)
    p.add_argument("--base", default=None, help="base rectified-flow checkpoint (default: runs/pretrain/<task>-flow/"
                   "ckpt.pt, pretrained first with pretrain.py --model flow and the task's budget if absent)")
    p.add_argument("--N", type=int, default=None, help="base Euler steps used for inversion and for sampling "
                   "(default: the task's flow_steps)")
    p.add_argument("--n-fixed", type=int, default=10, help="N_b: fixed-point iterations per backward-Euler step")
    p.add_argument("--perturb", type=float, default=0.0, help="sigma of Gaussian noise added to the data before "
                   "inversion (paper: 1e-3 for LSUN Church)")
    p.add_argument("--num-invert", type=int, default=None, help="training examples to invert (a seeded random "
                   "subset; default toy2d 10000, images 10000, capped at the dataset size)")
    p.add_argument("--chunk-size", type=int, default=None, help="examples per inverted-noise chunk on disk "
                   "(default toy2d 2000, images 512); a crash loses at most one chunk")
    p.add_argument("--batch-size", type=int, default=None, help="examples per network batch when inverting and "
                   "sampling (default toy2d 20000, images 256)")
    p.add_argument("--corrector-preset", default=None, help="corrector network: a UNet preset of models/unet.py "
                   "or mlp/mlp128/mlp64 for 2-D (default toy2d mlp128, 256px corrector256, other images tiny)")
    p.add_argument("--corrector-steps", type=int, default=None, help="corrector training steps (default: the "
                   "task's pretraining steps)")
    p.add_argument("--corrector-batch-size", type=int, default=None, help="corrector minibatch (default: task's)")
    p.add_argument("--corrector-lr", type=float, default=None, help="corrector peak AdamW LR (default: task's)")
    p.add_argument("--ema-decay", type=float, default=0.999, help="EMA decay of the corrector weights sampled from")
    p.add_argument("--nc", type=int_list, default=None, help="comma list of corrector Euler steps N_c to evaluate "
                   "(default: N/4,N/2,N)")
    p.add_argument("--eval-n", type=int_list, default=None, help="comma list of base step counts for the base-alone "
                   "curve; N is always added (default: N/2,N,2N,4N)")
    p.add_argument("--num-eval", type=int, default=None, help="samples per table row for the cheap metrics "
                   "(toy2d: mode TV, sliced W2; images: pixel sliced W2 vs held-out data; default toy2d 20000, "
                   "images 1000)")
    p.add_argument("--fid-num", type=int, default=-1, help="samples per table row for FID on image tasks "
                   "(-1: 5000 on CUDA, 0 on CPU; 0: no FID)")
    p.add_argument("--fid-ref-num", type=int, default=0, help="training images for the FID reference statistics "
                   "(0: the whole split; cached by eval/fid.py)")
    p.add_argument("--inception", default=None, help="Inception weights file for FID (default: eval/inception.py's "
                   "search order)")
    p.add_argument("--stop-after-chunks", type=int, default=0, help="debug: exit (code 3) after writing this many "
                   "new chunks, to test resuming an interrupted inversion (0: off)")
    return p.parse_args(argv)


# ---------------------------------------------------------------- setup ----
def ensure_base(args, task):
    """The base checkpoint's path; pretrain the default one first if it is absent."""
    if args.base:
        return args.base
    path = common.default_base_path(task.name, "flow")
    if not os.path.isfile(path):
        print(f"no base flow at {path}: pretraining one first with `pretrain.py --task {task.name} --model flow` "
              f"(the task's default budget: {task.train_steps} steps)")
        import pretrain
        argv = ["--task", task.name, "--model", "flow", "--seed", str(args.seed), "--device", args.device]
        argv += (["--data-dir", args.data_dir] if args.data_dir else []) + (["--bf16"] if args.bf16 else [])
        pretrain.main(argv)
    return path


def build_corrector(task, preset, image_size, num_classes, cond_dim):
    if task.kind == "points":
        if preset not in MLP_PRESETS:
            raise common.UsageError(f"--corrector-preset {preset!r} is not a 2-D preset; use one of {sorted(MLP_PRESETS)}")
        return TimeMLP(dim=2, hidden=MLP_PRESETS[preset], depth=3, num_classes=num_classes, cond_dim=cond_dim)
    try:
        return unet_from_preset(preset, image_size, task.channels, num_classes=num_classes, cond_dim=cond_dim)
    except ValueError as e:
        raise common.UsageError(f"--corrector-preset: {e}") from None


def example_condition(num_classes, cond_dim, device):
    if num_classes:
        return torch.zeros(1, dtype=torch.long, device=device)
    if cond_dim:
        return torch.zeros(1, cond_dim, device=device)
    return None


def weights_fingerprint(model):
    return f"{sum(p.detach().double().sum().item() for p in model.parameters()):.10e}"


# ---------------------------------------------------------------- step 2: inversion ----
def chunk_path(chunk_dir, c):
    return os.path.join(chunk_dir, f"chunk_{c:05d}.pt")


def load_chunk(path, n_expected):
    """A finished chunk, or None if it is absent or unreadable (then it is recomputed)."""
    if not os.path.isfile(path):
        return None
    try:
        ch = torch.load(path, map_location="cpu", weights_only=True)
        if not all(len(ch[k]) == n_expected for k in ("index", "z", "y", "residual", "roundtrip")):
            raise ValueError("wrong length")
        return ch
    except Exception as e:  # noqa: BLE001 - a damaged chunk is simply recomputed
        print(f"   {path} is unreadable ({type(e).__name__}); recomputing it")
        return None


def save_chunk(path, chunk):
    tmp = f"{path}.tmp.{os.getpid()}"
    try:
        torch.save(chunk, tmp)
        os.replace(tmp, path)  # atomic: a crash leaves either no chunk or a whole one
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def fetch(data, idx):
    """Items idx of a dataset as two stacked CPU tensors (x, y)."""
    if hasattr(data, "tensors"):
        return data.tensors[0][idx], data.tensors[1][idx]
    loader = torch.utils.data.DataLoader(torch.utils.data.Subset(data, idx.tolist()), batch_size=64,
                                         num_workers=min(4, os.cpu_count() or 1))
    xs, ys = zip(*loader)
    return torch.cat(xs), torch.cat(ys)


def invert_dataset(args, base, process, data, idx, chunk_dir, meta, device, conditional, log=None):
    """Invert data[idx] chunk by chunk through the N-step Euler sampler; chunks already on disk are
    reused. Returns dict of CPU tensors index, z, y, residual, roundtrip and the count computed."""
    os.makedirs(chunk_dir, exist_ok=True)
    meta_path = os.path.join(chunk_dir, "meta.json")
    if os.path.isfile(meta_path):
        with open(meta_path) as f:
            old = json.load(f)
        diff = {k: (old.get(k), v) for k, v in meta.items() if old.get(k) != v}
        if diff:
            raise common.UsageError(f"{chunk_dir} holds inverted noise made with other settings "
                                    f"({', '.join(f'{k}: {a} -> {b}' for k, (a, b) in diff.items())}); "
                                    f"use another --out or delete that folder")
    else:
        common._atomic_json(meta_path, meta)
    N, cs, bs = args.N, args.chunk_size, args.batch_size
    n_chunks = math.ceil(len(idx) / cs)
    parts, computed = [], 0
    for c in range(n_chunks):
        cidx = idx[c * cs:(c + 1) * cs]
        path = chunk_path(chunk_dir, c)
        ch = load_chunk(path, len(cidx))
        if ch is not None:
            parts.append(ch)
            continue
        t0 = time.time()
        x_all, y_all = fetch(data, cidx)
        g = common.generator((args.seed + 1) * 1_000_003 + c, device)  # this chunk's perturbation, resumable
        zs, rs, rts = [], [], []
        for i in range(0, len(cidx), bs):
            x = x_all[i:i + bs].to(device)
            y = y_all[i:i + bs].to(device) if conditional else None
            if args.perturb:
                x = x + args.perturb * torch.randn(x.shape, generator=g, device=device, dtype=x.dtype)
            z, res = process.invert(base, x, N, args.n_fixed, y=y)
            x_back = process.sample(base, z, N, y=y)
            zs.append(z.cpu())
            rs.append(res.cpu())
            rts.append((x_back - x).flatten(1).norm(dim=1).cpu())
        ch = dict(index=cidx.clone(), z=torch.cat(zs), y=y_all.clone(), residual=torch.cat(rs),
                  roundtrip=torch.cat(rts))
        save_chunk(path, ch)
        parts.append(ch)
        computed += 1
        msg = (f"chunk {c + 1}/{n_chunks}: fixed-point residual max {ch['residual'].max().item():.3g}, "
               f"round trip ||S_N(z) - x|| max {ch['roundtrip'].max().item():.3g} ({time.time() - t0:.1f} s)")
        print("   " + msg)
        if log:
            log(phase="invert", chunk=c, residual_max=ch["residual"].max().item(),
                roundtrip_max=ch["roundtrip"].max().item(), seconds=round(time.time() - t0, 2))
        if args.stop_after_chunks and computed >= args.stop_after_chunks and c + 1 < n_chunks:
            print(f"stopping after {computed} new chunks (--stop-after-chunks); rerun to resume")
            raise SystemExit(3)
    out = {k: torch.cat([p[k] for p in parts]) for k in ("index", "z", "y", "residual", "roundtrip")}
    out["computed"] = computed
    return out


# ---------------------------------------------------------------- how Gaussian is the inverted noise ----
def _moments(a):
    """a (n, k) float64: ||mean||, ||cov - I||_F, that over sqrt(k), extreme eigenvalues of cov."""
    n, k = a.shape
    mean = a.mean(0)
    c = a - mean
    cov = c.T @ c / (n - 1)
    eig = torch.linalg.eigvalsh(cov)
    fro = (cov - torch.eye(k, dtype=a.dtype)).norm().item()
    return dict(mean_norm=mean.norm().item(), cov_minus_I_fro=fro, cov_minus_I_rel=fro / math.sqrt(k),
                cov_eig_min=eig[0].item(), cov_eig_max=eig[-1].item())


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
        b = zf[i:i + 4096].double()
        s1 += b.sum(0)
        s2 += b.pow(2).sum(0)
    mean = s1 / n
    var = s2 / n - mean ** 2
    k = min(d, max_dims)
    if k < d:
        q, _ = torch.linalg.qr(torch.randn(d, k, generator=g))
        q = q.to(device)
        proj = torch.cat([(zf[i:i + 4096].to(device).float() @ q).double().cpu() for i in range(0, n, 4096)])
    else:
        proj = zf.double()
    ref1 = torch.randn(n, k, generator=g, dtype=torch.float64)
    ref2 = torch.randn(n, k, generator=g, dtype=torch.float64)
    noise, null = _moments(proj), _moments(ref1)
    noise["sw2"] = sliced_wasserstein(proj, ref1, seed=seed)
    null["sw2"] = sliced_wasserstein(ref2, ref1, seed=seed)
    return dict(n=n, dims=d, dims_used_for_cov_and_sw2=k, full_mean_norm=mean.norm().item(),
                full_mean_norm_null=math.sqrt(d / n), mean_sq_norm_per_dim=(s2.sum() / (n * d)).item(),
                var_mean=var.mean().item(), noise=noise, null=null)


def print_gaussianity(gs):
    print(f"   n={gs['n']}, D={gs['dims']}: ||mean|| {gs['full_mean_norm']:.4g} (null ~{gs['full_mean_norm_null']:.4g}), "
          f"E||z||^2/D {gs['mean_sq_norm_per_dim']:.4g} (null 1)")
    print(f"   {'statistic (k=' + str(gs['dims_used_for_cov_and_sw2']) + ' dims)':28s} {'inverted':>10s} {'N(0,I) null':>12s}")
    for key in gs["noise"]:
        print(f"   {key:28s} {gs['noise'][key]:10.4g} {gs['null'][key]:12.4g}")


# ---------------------------------------------------------------- steps 4-5: sample and evaluate ----
@torch.no_grad()
def sample_pipeline(process, base, corrector, shape, n, N, nc, seed, device, batch_size, y=None, clamp=False):
    """eps ~ N(0, I) -> corrector (nc Euler steps; none if nc == 0) -> base (N Euler steps). The same
    seed gives the same eps for every (N, nc), so rows of the table share their noise."""
    g = common.generator(seed, device)
    out = []
    for i in range(0, n, batch_size):
        b = min(batch_size, n - i)
        yb = y[i:i + b] if y is not None else None
        z = torch.randn((b, *shape), generator=g, device=device)
        if nc:
            z = process.sample(corrector, z, nc, y=yb)
        x = process.sample(base, z, N, y=yb)
        out.append(x.clamp(-1, 1).cpu() if clamp else x.cpu())
    return torch.cat(out)


def claim_check(rows, key):
    """Does some base + corrector row beat every base-alone row of equal or higher FLOPs/image?
    A corrected row with no base row at equal or higher FLOPs proves nothing and is not a witness."""
    base = [r for r in rows if r["method"] == "base"]
    witnesses = []
    for r in rows:
        if r["method"] != "base+corrector" or r.get(key) is None:
            continue
        dearer = [b for b in base if b["flops"] >= r["flops"] and b.get(key) is not None]
        if dearer and all(r[key] < b[key] for b in dearer):
            witnesses.append(dict(N=r["N"], N_c=r["N_c"], flops=r["flops"], quality=r[key],
                                  best_dearer_base=min(b[key] for b in dearer),
                                  dearer_base_N=[b["N"] for b in dearer]))
    best_base = min((b for b in base if b.get(key) is not None), key=lambda b: b[key], default=None)
    return dict(metric=key, lower_is_better=True, holds=bool(witnesses), witnesses=witnesses,
                best_base=dict(N=best_base["N"], flops=best_base["flops"], quality=best_base[key]) if best_base else None)


def write_table(rows, cols, out):
    with open(os.path.join(out, "table.csv"), "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=cols, extrasaction="ignore")
        w.writeheader()
        w.writerows(rows)

    def fmt(v):
        return f"{v:.4g}" if isinstance(v, float) else str(v)
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join(fmt(r.get(c, "")) for c in cols) + " |" for r in rows]
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
        base = sorted([r for r in rows if r["method"] == "base" and r.get(key) is not None], key=lambda r: r["flops"])
        corr = sorted([r for r in rows if r["method"] == "base+corrector" and r.get(key) is not None],
                      key=lambda r: r["flops"])
        ax.plot([r["flops"] for r in base], [r[key] for r in base], "o-", label="base alone (N)")
        for r in base:
            ax.annotate(f"N={r['N']}", (r["flops"], r[key]), textcoords="offset points", xytext=(4, 4), fontsize=8)
        ax.plot([r["flops"] for r in corr], [r[key] for r in corr], "s--", color="C3", label="base + corrector (N, N_c)")
        for r in corr:
            ax.annotate(f"{r['N']},{r['N_c']}", (r["flops"], r[key]), textcoords="offset points", xytext=(4, -10),
                        fontsize=8, color="C3")
        ax.set(xscale="log", xlabel="FLOPs / image (torch.utils.flop_counter)", ylabel=f"{key} (lower is better)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# ---------------------------------------------------------------- main ----
def main(argv=None):
    args = get_args(argv)
    task = get_task(args.task)
    device = common.pick_device(args.device)
    points = task.kind == "points"
    args.N = args.N or task.flow_steps
    args.num_invert = args.num_invert or 10000
    args.chunk_size = args.chunk_size or (2000 if points else 512)
    args.batch_size = args.batch_size or (20000 if points else 256)
    args.corrector_preset = args.corrector_preset or ("mlp128" if points else "corrector256" if task.image_size >= 256 else "tiny")
    args.corrector_steps = args.corrector_steps or task.train_steps
    args.corrector_batch_size = args.corrector_batch_size or task.batch_size
    args.corrector_lr = args.corrector_lr or task.lr
    args.nc = args.nc or sorted({max(1, args.N // 4), max(1, args.N // 2), args.N})
    args.eval_n = sorted(set(args.eval_n or {max(1, args.N // 2), 2 * args.N, 4 * args.N}) | {args.N})
    args.num_eval = args.num_eval or (20000 if points else 1000)
    args.fid_num = args.fid_num if args.fid_num >= 0 else (5000 if device.type == "cuda" and not points else 0)
    for name in ("N", "n_fixed", "num_invert", "chunk_size", "batch_size", "corrector_steps", "num_eval"):
        if getattr(args, name) < 1:
            raise common.UsageError(f"--{name.replace('_', '-')} must be >= 1")
    if min(args.nc) < 1 or min(args.eval_n) < 1:
        raise common.UsageError("--nc and --eval-n take step counts >= 1")
    if args.perturb < 0:
        raise common.UsageError("--perturb is a standard deviation and must be >= 0")
    args.out = args.out or os.path.join("runs", "inverse_noise", f"{task.name}-N{args.N}")
    args.base = ensure_base(args, task)
    torch.manual_seed(args.seed)

    # 1. the base flow
    base, process, base_ckpt = common.load_base(args.base, device)
    if (base_ckpt.get("process") or {}).get("kind") != "flow":
        raise common.UsageError(f"{args.base} is not a rectified flow; pretrain one with `pretrain.py --model flow`")
    cfg = base_ckpt["model_config"]
    num_classes, cond_dim = cfg.get("num_classes", 0), cfg.get("cond_dim", 0)
    conditional = bool(num_classes or cond_dim)
    image_size = cfg.get("image_size") if cfg["kind"] == "unet" else None
    shape = task.shape(image_size)
    data = task.dataset("train", args.data_dir, image_size)
    args.num_invert = min(args.num_invert, len(data))
    log = common.RunLog(args.out, args)

    corrector = build_corrector(task, args.corrector_preset, image_size, num_classes, cond_dim).to(device)
    x_ex = torch.zeros((1, *shape), device=device)
    y_ex = example_condition(num_classes, cond_dim, device)
    f_base, f_corr = flops_per_eval(base, x_ex, y=y_ex), flops_per_eval(corrector, x_ex, y=y_ex)
    n_chunks = math.ceil(args.num_invert / args.chunk_size)
    common.print_derived(
        f"inverse noise correction on {task.name}", device=device,
        base=f"{args.base} (step {base_ckpt['step']}, {common.n_params(base)})", conditional=conditional,
        N_base_steps=args.N, n_fixed_N_b=args.n_fixed, h_step=1.0 / args.N, perturb_sigma=args.perturb,
        inverted_examples=f"{args.num_invert} of {len(data)} in {n_chunks} chunks of {args.chunk_size}",
        NFE_per_inverted_example=f"{args.N * args.n_fixed} (+{args.N} for the round trip)",
        corrector=f"{args.corrector_preset} ({common.n_params(corrector)}), {args.corrector_steps} steps, "
                  f"batch {args.corrector_batch_size}, lr {args.corrector_lr}",
        flops_per_eval=f"base {f_base:.4g}, corrector {f_corr:.4g} (ratio {f_corr / f_base:.3f})",
        base_alone_N=args.eval_n, corrector_N_c=args.nc, samples_per_row=args.num_eval, fid_per_row=args.fid_num,
        out=args.out)
    net_base = common.wrap_net(base, args.bf16, args.compile)

    # 2. invert the training data through S_N (fp32: the fixed point must converge to be an inverse)
    t0 = time.time()
    idx = torch.randperm(len(data), generator=torch.Generator().manual_seed(args.seed))[:args.num_invert]
    meta = dict(task=task.name, base=os.path.abspath(args.base), base_step=int(base_ckpt["step"]),
                base_weights=weights_fingerprint(base), N=args.N, n_fixed=args.n_fixed, perturb=args.perturb,
                seed=args.seed, num_invert=args.num_invert, chunk_size=args.chunk_size, conditional=conditional,
                shape=list(shape))
    inv = invert_dataset(args, base, process, data, idx, os.path.join(args.out, "inverted"), meta, device,
                         conditional, log.log)
    finite = torch.isfinite(inv["z"].flatten(1)).all(1) & torch.isfinite(inv["residual"])
    dim = int(torch.tensor(shape).prod())
    rt = inv["roundtrip"][finite]
    inversion = dict(
        computed_chunks=inv["computed"], reused_chunks=n_chunks - inv["computed"], nonfinite=int((~finite).sum()),
        residual_mean=inv["residual"][finite].mean().item(), residual_max=inv["residual"][finite].max().item(),
        roundtrip_mean=rt.mean().item(), roundtrip_max=rt.max().item(),
        roundtrip_rms_per_dim_max=(rt.max() / math.sqrt(dim)).item(), seconds=round(time.time() - t0, 1))
    print(f"inverted {args.num_invert} examples ({inversion['reused_chunks']} chunks reused, {inv['computed']} computed, "
          f"{inversion['nonfinite']} non-finite dropped): fixed-point residual mean {inversion['residual_mean']:.3g} "
          f"max {inversion['residual_max']:.3g}; round trip ||S_N(invert(x)) - x|| mean {inversion['roundtrip_mean']:.3g} "
          f"max {inversion['roundtrip_max']:.3g}")
    if inversion["nonfinite"] or inversion["roundtrip_rms_per_dim_max"] > 1e-2:
        print("warning: the backward-Euler fixed point did not converge everywhere (h * Lip(v) >= 1?); "
              "raise --N or --n-fixed")
    z_inv, y_inv = inv["z"][finite], inv["y"][finite]
    if len(z_inv) < 2:
        raise common.UsageError("fewer than 2 examples inverted to finite noise; raise --N or --n-fixed")
    print("how far the inverted noise is from N(0, I):")
    gauss = gaussianity(z_inv, seed=args.seed, device=device)
    print_gaussianity(gauss)
    log.log(phase="gaussianity", **{f"noise_{k}": v for k, v in gauss["noise"].items()},
            **{f"null_{k}": v for k, v in gauss["null"].items()})

    # 3. the corrector: a rectified flow from N(0, I) to the inverted noise (one per base N)
    t0 = time.time()
    cdir = os.path.join(args.out, "corrector")
    ckpt_path = os.path.join(cdir, "ckpt.pt")
    store = device if z_inv.numel() * 4 < 2 ** 32 else torch.device("cpu")  # big image sets stay in host memory
    batches = common.Batches(torch.utils.data.TensorDataset(z_inv, y_inv), args.corrector_batch_size, store,
                             seed=args.seed)
    gen = common.generator(args.seed + 1, device)
    opt = torch.optim.AdamW(corrector.parameters(), lr=args.corrector_lr, weight_decay=0.0)
    ema = common.EMA(corrector, args.ema_decay)
    records = dict(base_N=args.N, base_checkpoint=os.path.abspath(args.base), base_step=int(base_ckpt["step"]),
                   n_fixed=args.n_fixed, perturb=args.perturb, num_inverted=len(z_inv))
    start = 0
    if args.resume and os.path.isfile(ckpt_path):
        prev = common.load_checkpoint(ckpt_path).get("extra") or {}
        if prev.get("base_N") != args.N or prev.get("base_checkpoint") != records["base_checkpoint"]:
            raise common.UsageError(f"{ckpt_path} corrects base {prev.get('base_checkpoint')} at N={prev.get('base_N')}, "
                                    f"not {records['base_checkpoint']} at N={args.N}; use another --out")
        start, extra = common.resume_state(ckpt_path, corrector, ema, opt)
        batches.set_state(extra["batches"])
        gen.set_state(extra["gen"])
        print(f"resumed the corrector from {ckpt_path} at step {start}")
    net_corr = common.wrap_net(corrector, args.bf16, args.compile)

    def loss_fn(step):
        z, y = (t.to(device, non_blocking=True) for t in next(batches))
        y = y if conditional else None
        if args.bf16 and device.type == "cuda":
            with torch.autocast("cuda", dtype=torch.bfloat16):
                return process.loss(net_corr, z, y, gen)
        return process.loss(net_corr, z, y, gen)

    extra_state = lambda: {"batches": batches.state(), "gen": gen.get_state(), **records}  # noqa: E731
    corr_loss, ema, opt = common.train(corrector, loss_fn, args.corrector_steps, args.corrector_lr, cdir, args, process,
                                       start, ema, opt, "cosine", 100, 1.0, 1000,
                                       lambda **r: log.log(phase="corrector", **r), extra_state=extra_state,
                                       desc="corrector")
    corr_eval = common.wrap_net(ema.model, args.bf16, args.compile)
    corr_seconds = round(time.time() - t0, 1)
    print(f"corrector trained: final loss {corr_loss if corr_loss is None else round(corr_loss, 5)} ({corr_seconds} s); "
          f"wrote {ckpt_path}")

    # 4-5. sample and evaluate everything on the same footing
    t0 = time.time()
    n_gen = max(args.num_eval, args.fid_num)
    y_eval = task.sample_conditions(n_gen, common.generator(args.seed + 3, device), device, data) if conditional else None
    quality_keys, ref, floor = [], None, {}
    if points:
        quality_keys = ["sw2", "mode_tv"]
        floor = {k: v for k, v in task.metrics(TOY.sample(args.num_eval, torch.Generator().manual_seed(999))).items()
                 if k in quality_keys}
    elif dim <= 4096:
        held = task.dataset("test", args.data_dir, image_size)
        ref = fetch(held, torch.randperm(len(held), generator=torch.Generator().manual_seed(7))[:args.num_eval])[0]
        same = fetch(data, torch.randperm(len(data), generator=torch.Generator().manual_seed(8))[:len(ref)])[0]
        floor = {"pixel_sw2": sliced_wasserstein(same.flatten(1), ref.flatten(1))}
        quality_keys = ["pixel_sw2"]
    fid_eval = fid_ref = None
    if not points and args.fid_num > 0:
        try:
            from eval.fid import FIDEvaluator, frechet_distance
        except ImportError as e:
            raise common.UsageError(f"FID needs eval/fid.py ({e}); pass --fid-num 0 to skip it") from None
        fid_eval = FIDEvaluator(device=str(device), inception_path=args.inception, progress=False)
        fid_ref = fid_eval.reference_stats(task.name, split="train", image_size=image_size, data_dir=args.data_dir,
                                           num_images=args.fid_ref_num or None)
        quality_keys = ["fid"] + quality_keys

    def quality(x):
        q = {}
        if points:
            m = task.metrics(x)
            q.update(sw2=m["sw2"], mode_tv=m["mode_tv"], nonfinite=m["nonfinite"])
        elif ref is not None:
            xe = x[:args.num_eval]
            q["pixel_sw2"] = sliced_wasserstein(xe.flatten(1), ref[:len(xe)].flatten(1))
        if fid_eval is not None:
            mu, sigma, _ = fid_eval.stats(x[:args.fid_num])
            q["fid"] = float(frechet_distance(mu, sigma, *fid_ref))
        return q

    configs = [("base", n, 0) for n in args.eval_n] + [("base+corrector", args.N, nc) for nc in args.nc]
    rows, kept = [], {}
    for method, n, nc in configs:
        ts = time.time()
        x = sample_pipeline(process, net_base, corr_eval, shape, n_gen, n, nc, args.seed + 100, device,
                            args.batch_size, y_eval, clamp=not points)
        row = dict(method=method, N=n, N_c=nc, nfe=n + nc, flops=n * f_base + nc * f_corr,
                   flops_base_part=n * f_base, flops_corrector_part=nc * f_corr, **quality(x),
                   sample_seconds=round(time.time() - ts, 1))
        rows.append(row)
        log.log(phase="eval", **row)
        print(f"   {method:15s} N={n:<4d} N_c={nc:<4d} FLOPs/image {row['flops']:.4g}  "
              + "  ".join(f"{k}={row[k]:.4g}" for k in quality_keys))
        if (method == "base" and n == args.N) or method == "base+corrector":
            kept[(n, nc)] = x[:64] if not points else x[:5000]
    key = quality_keys[0] if quality_keys else None
    claim = claim_check(rows, key) if key else dict(metric=None, holds=None, witnesses=[],
                                                     note="no quality metric for this task on this device")

    # table, plots
    cols = ["method", "N", "N_c", "nfe", "flops"] + quality_keys + ["sample_seconds"]
    text = write_table(rows, cols, args.out)
    print(text, end="")
    if key:
        plot_quality(rows, quality_keys, log.path("quality_vs_flops.png"),
                     f"{task.name}: base S_N alone vs base + inverse-noise corrector (corrector trained at N={args.N})")
    corr_rows = [r for r in rows if r["method"] == "base+corrector"]
    best = min(corr_rows, key=lambda r: r[key]) if key else corr_rows[-1]
    base_row = next(r for r in rows if r["method"] == "base" and r["N"] == args.N)
    if points:
        with torch.no_grad():  # the corrector's output alone, from the same eps as the table rows
            g = common.generator(args.seed + 100, device)
            eps = torch.randn((5000, *shape), generator=g, device=device)
            z_corr = process.sample(corr_eval, eps, best["N_c"]).cpu()
        common.plot_points({"data": data.tensors[0][:5000], f"base N={args.N}": kept[(args.N, 0)],
                            f"base+corrector N_c={best['N_c']}": kept[(args.N, best["N_c"])],
                            "inverted noise": z_inv[:5000], f"corrector samples (N_c={best['N_c']})": z_corr,
                            "N(0, I)": eps.cpu()}, log.path("samples.png"),
                           title=f"{task.name}: data space (first three panels), noise space (last three)")
    else:
        common.save_grid(kept[(args.N, 0)], log.path(f"samples_base_N{args.N}.png"), nrow=8)
        common.save_grid(kept[(args.N, best["N_c"])], log.path(f"samples_corrected_N{args.N}_Nc{best['N_c']}.png"), nrow=8)
    eval_seconds = round(time.time() - t0, 1)

    verdict = ("no quality metric" if claim["holds"] is None else
               f"HOLDS: (N, N_c) = {[(w['N'], w['N_c']) for w in claim['witnesses']]} beat every base-alone point "
               f"of equal or higher FLOPs on {key}" if claim["holds"] else
               f"does NOT hold on {key}: no base + corrector point beats every base-alone point of equal or higher FLOPs")
    print(f"claim: {verdict}")
    summary = log.summary(
        task=task.name, N=args.N, N_c=best["N_c"], flops_base=base_row["flops"], flops_corrected=best["flops"],
        quality_metric=key, quality_base=base_row.get(key) if key else None,
        quality_corrected=best.get(key) if key else None, quality_floor=floor, rows=rows, claim=claim,
        inversion=inversion, gaussianity=gauss, flops_per_eval_base=f_base, flops_per_eval_corrector=f_corr,
        base_checkpoint=args.base, base_step=int(base_ckpt["step"]), corrector_checkpoint=ckpt_path,
        corrector_preset=args.corrector_preset, corrector_final_loss=corr_loss, n_fixed=args.n_fixed,
        perturb=args.perturb, num_inverted=len(z_inv), seconds=dict(invert=inversion["seconds"],
                                                                   corrector=corr_seconds, evaluate=eval_seconds))
    print(f"done in {summary['wall_time_s']} s; wrote {args.out}")
    return summary


if __name__ == "__main__":
    common.run_main(main)
