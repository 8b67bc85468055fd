"""Benchmark of eval/: the Frechet distance and the feature extraction. Not a test.

    python -m eval.bench_fid                                   # CPU defaults, ~2 min on 2 cores
    python -m eval.bench_fid --device cuda --images 5000 --batch-size 250

1. Frechet distance on two sets of --n random 2048-d features (Inception-like: ReLU of
   correlated Gaussians): ours (Cholesky + eigvalsh, float64) vs the scipy.linalg.sqrtm
   route pytorch-fid uses (without its removed ``disp`` argument): times, ratio, values.
2. Feature extraction on --images random uint8 images (on the device already):
   ``FIDEvaluator.features`` and ``.stats`` vs a bare forward of the same network on the
   same batches under the same inference_mode/precision; images/s and time ratios. On CUDA
   for fp32 (the default) and bf16 autocast, and how far bf16 moves features and FID.
BLAS threads matter a lot for part 1 on a shared machine: set OPENBLAS_NUM_THREADS to compare.
"""

import argparse
import os
import time
import warnings

import numpy as np
import scipy.linalg
import torch

from eval.fid import FIDEvaluator, FIDWarning, feature_stats, frechet_distance


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def fake_features(n, d, shift, seed):
    rng = np.random.default_rng(seed)
    a = rng.standard_normal((d, d)) / np.sqrt(d)
    return np.maximum(rng.standard_normal((n, d)) @ a + 0.3 + shift, 0.0)


def scipy_route(mu1, s1, mu2, s2):
    covmean = scipy.linalg.sqrtm(s1 @ s2)
    imag = float(np.abs(covmean.imag).max()) if np.iscomplexobj(covmean) else 0.0
    diff = mu1 - mu2
    return float(diff @ diff + np.trace(s1) + np.trace(s2) - 2 * np.trace(covmean.real)), imag


def bench_frechet(n):
    print(
        f"Frechet distance: 2 x {n} random 2048-d features, float64 "
        f"(OPENBLAS_NUM_THREADS={os.environ.get('OPENBLAS_NUM_THREADS', 'unset')})"
    )
    mu1, s1 = feature_stats(fake_features(n, 2048, 0.0, 0))
    mu2, s2 = feature_stats(fake_features(n, 2048, 0.05, 1))
    t = time.perf_counter()
    ours = frechet_distance(mu1, s1, mu2, s2)
    t_ours = time.perf_counter() - t
    t = time.perf_counter()
    ref, imag = scipy_route(mu1, s1, mu2, s2)
    t_ref = time.perf_counter() - t
    print(f"  ours (Cholesky + eigvalsh)  {t_ours:8.2f} s   FID = {ours:.9f}")
    print(
        f"  scipy.linalg.sqrtm route    {t_ref:8.2f} s   FID = {ref:.9f}   (max |imag| of sqrtm "
        f"{imag:.1e})"
    )
    print(
        f"  time ratio sqrtm/ours {t_ref / t_ours:.2f}x   relative difference "
        f"{abs(ours - ref) / abs(ref):.1e}"
    )


def timed(fns, device, repeats):
    """Best wall time of each function, run interleaved so drifts in machine load hit both."""
    best = [float("inf")] * len(fns)
    for _ in range(repeats):
        for i, fn in enumerate(fns):
            sync(device)
            t = time.perf_counter()
            fn()
            sync(device)
            best[i] = min(best[i], time.perf_counter() - t)
    return best


def bench_features(args):
    device = torch.device(args.device)
    g = torch.Generator().manual_seed(0)
    x = torch.randint(
        0, 256, (args.images, 3, args.image_size, args.image_size), generator=g, dtype=torch.uint8
    ).to(device)
    bs = args.batch_size
    where = (
        torch.cuda.get_device_name(device)
        if device.type == "cuda"
        else f"{torch.get_num_threads()} threads"
    )
    print(
        f"Feature extraction: {args.images} uint8 images {args.image_size}x{args.image_size} -> "
        f"299, "
        f"batch {bs}, {device} ({where}), best of {args.repeats}, interleaved"
    )
    model, feats = None, {}
    for bf16 in [False, True] if device.type == "cuda" else [False]:
        ev = FIDEvaluator(device, args.inception, bs, model=model, bf16=bf16, progress=False)
        model = ev.model  # one network for every measurement

        def bare():
            with ev._context():
                for i in range(0, x.shape[0], bs):
                    model(x[i : i + bs].float())

        with ev._context():
            model(x[:bs].float())  # warm-up (cuDNN autotune, allocator)
        t_bare, t_feat, t_stats = timed(
            [bare, lambda: ev.features(x), lambda: ev.stats(x)], device, args.repeats
        )
        name = "bf16 autocast" if bf16 else "fp32"
        print(
            f"  [{name}] bare forward {args.images / t_bare:8.1f} img/s | FIDEvaluator.features "
            f"{args.images / t_feat:8.1f} img/s (time ratio {t_feat / t_bare:.3f}) | .stats "
            f"{args.images / t_stats:8.1f} img/s (ratio {t_stats / t_bare:.3f})"
        )
        feats[bf16] = ev

    if True in feats:
        # how far does bf16 move the numbers? features, and FID between two different image sets
        y = torch.nn.functional.interpolate(x[:, :, ::4, ::4].float(), scale_factor=4).to(
            torch.uint8
        )
        (f32, f16) = (feats[False].features(x), feats[True].features(x))
        fid = {k: frechet_distance(*feats[k].stats(x)[:2], *feats[k].stats(y)[:2]) for k in feats}
        same = frechet_distance(*feats[False].stats(x)[:2], *feats[True].stats(x)[:2])
        print(
            f"  bf16 vs fp32: max |feature diff| {np.abs(f16 - f32).max():.3g} (features up to "
            f"{np.abs(f32).max():.3g}); "
            f"FID(set A, set B) {fid[True]:.4f} vs {fid[False]:.4f} (relative "
            f"{abs(fid[True] - fid[False]) / fid[False]:.1e}); "
            f"FID(A in bf16, A in fp32) {same:.4f}"
        )


def main():
    p = argparse.ArgumentParser(
        prog="python -m eval.bench_fid", description=__doc__.split("\n\n")[0]
    )
    p.add_argument(
        "--device",
        default="cuda" if torch.cuda.is_available() else "cpu",
        help="torch device for part 2",
    )
    p.add_argument(
        "--n", type=int, default=10000, help="random features per set for part 1 (0 skips it)"
    )
    p.add_argument(
        "--images",
        type=int,
        default=None,
        help="images for part 2 (default 64 on CPU, 5000 on CUDA; 0 skips it)",
    )
    p.add_argument(
        "--image-size",
        type=int,
        default=32,
        help="side of the random input images (resized to 299)",
    )
    p.add_argument(
        "--batch-size",
        type=int,
        default=None,
        help="Inception batch size (default 32 on CPU, 250 on CUDA)",
    )
    p.add_argument(
        "--repeats",
        type=int,
        default=None,
        help="timed passes, best kept (default 2 on CPU, 3 on CUDA)",
    )
    p.add_argument(
        "--inception",
        default=None,
        metavar="PATH",
        help="Inception weights (default: the usual search)",
    )
    args = p.parse_args()
    cuda = args.device.startswith("cuda")
    args.images = (5000 if cuda else 64) if args.images is None else args.images
    args.batch_size = args.batch_size or (250 if cuda else 32)
    args.repeats = args.repeats or (3 if cuda else 2)
    t0 = time.perf_counter()
    if args.n:
        bench_frechet(args.n)
    if args.images:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FIDWarning)  # few images is fine for timing
            bench_features(args)
    print(f"total wall time {time.perf_counter() - t0:.1f} s")


if __name__ == "__main__":
    main()
