"""How good an inversion is and how far its noise is from N(0, I): inverse_noise.py's checks.

``inversion_stats``: the backward-Euler fixed-point residual and the round trip ||S_N(z) - x|| of
inverted examples (near 0 when the inversion is exact). ``gaussianity``: each statistic of the noise
next to the same statistic of a fresh N(0, I) sample of the same size (the null level: what
finite-sample noise alone scores), so a reader sees whether the inverted noise is measurably not
Gaussian. A perfect base flow with an exact ODE solve inverts data to N(0, I); the distance measures
the base's model plus discretisation error.
"""

import math

import torch

from eval.metrics import sliced_wasserstein
from tasks import UsageError


def chunk_stats(chunk, c, count, seconds):
    """One inverted chunk's worst fixed-point residual and round trip, printed; the logged row."""
    row = {
        "residual_max": chunk["residual"].max().item(),
        "roundtrip_max": chunk["roundtrip"].max().item(),
        "seconds": round(seconds, 2),
    }
    print(
        f"   chunk {c + 1}/{count}: fixed-point residual max {row['residual_max']:.3g}, round "
        f"trip max {row['roundtrip_max']:.3g} ({row['seconds']} s)"
    )
    return row


def inversion_stats(inv, *, computed, reused, seconds):
    """The examples of ``inv`` (tensors z, residual, roundtrip, ...) that inverted to finite noise
    and the inversion's statistics, printed (with a warning when the fixed point did not converge
    everywhere). Returns (finite mask, stats)."""
    finite = torch.isfinite(inv["z"].flatten(1)).all(1) & torch.isfinite(inv["residual"])
    if finite.sum() < 2:
        raise UsageError(
            "fewer than 2 examples inverted to finite noise; raise --sample-steps or --n-fixed"
        )
    res, rt = inv["residual"][finite], inv["roundtrip"][finite]
    stats = {
        "computed_chunks": computed,
        "reused_chunks": reused,
        "nonfinite": int((~finite).sum()),
        "residual_mean": res.mean().item(),
        "residual_max": res.max().item(),
        "roundtrip_mean": rt.mean().item(),
        "roundtrip_max": rt.max().item(),
        "roundtrip_rms_per_dim_max": (rt.max() / math.sqrt(inv["z"][0].numel())).item(),
        "seconds": seconds,
    }
    print(
        f"inverted {len(finite)} examples ({reused} chunks reused, {computed} "
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
    return finite, stats


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
    """The statistics of ``gaussianity`` as a small table: inverted noise beside the null."""
    print("how far the inverted noise is from N(0, I):")
    print(
        f"   n={gs['n']}, D={gs['dims']}: ||mean|| {gs['full_mean_norm']:.4g} "
        f"(null ~{gs['full_mean_norm_null']:.4g}), E||z||^2/D {gs['mean_sq_norm_per_dim']:.4g} "
        f"(null 1)"
    )
    head = f"statistic (k={gs['dims_used_for_cov_and_sw2']} dims)"
    print(f"   {head:28s} {'inverted':>10s} {'N(0,I) null':>12s}")
    for key in gs["noise"]:
        print(f"   {key:28s} {gs['noise'][key]:10.4g} {gs['null'][key]:12.4g}")


def gaussianity_row(gs):
    """The statistics of ``gaussianity`` as one flat row of metrics.jsonl."""
    return {
        **{f"noise_{k}": v for k, v in gs["noise"].items()},
        **{f"null_{k}": v for k, v in gs["null"].items()},
    }
