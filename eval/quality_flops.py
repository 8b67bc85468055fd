"""Quality against FLOPs per image (paper, Table 5): inverse_noise.py's table, its claim check and
its plot.

Each row of the table is one way of sampling: the base flow alone at N Euler steps, or the
inverse-noise corrector at N_c steps followed by the base at N steps. Its cost is FLOPs/image =
N * FLOPs(base eval) + N_c * FLOPs(corrector eval) (eval/flops.py, at batch 1); its quality is a
distance to the data (lower is better): FID on image tasks when asked for, else toy2d's sliced W2
and mode TV, or a pixel-space sliced W2 against held-out images (up to 4096 values each).

The claim (Table 5): some base + corrector row beats every base-alone row of equal or higher cost.
"""

import csv
import math
import os

import torch

from eval.metrics import sliced_wasserstein
from tasks import TOY, UsageError


# ---------------------------------------------------------------- setup ----
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


def example_condition(cfg, device):
    """One condition of the kind a network of config ``cfg`` takes, for counting its FLOPs."""
    if cfg.get("num_classes"):
        return torch.zeros(1, dtype=torch.long, device=device)
    if cfg.get("cond_dim"):
        return torch.zeros(1, cfg["cond_dim"], device=device)
    return None


def fid_evaluator(inception, device):
    """The FID network (weights file ``inception``, None: eval/inception.py's search order), loaded
    now so that missing weights are refused before any work."""
    from eval.fid import FIDEvaluator, FIDInputError
    from eval.inception import InceptionWeightsError

    fid = FIDEvaluator(device=str(device), inception_path=inception, progress=False)
    try:
        fid.model.eval()
    except (InceptionWeightsError, FIDInputError) as e:
        raise UsageError(f"FID: {e}; pass --fid-samples 0 to skip it") from None
    return fid


def quality_metrics(task, data, *, image_size, eval_samples, data_dir, fid, fid_samples,
                    fid_ref_samples):
    """(metric names, function of samples -> metrics, floor): toy2d's sliced W2 and mode TV, pixel
    sliced W2 against held-out images (up to 4096 values each), FID when ``fid`` is set. The floor
    is the cheap metric of real data against itself (what a perfect model would score)."""
    keys, ref, floor = [], None, {}
    if task.kind == "points":
        keys = ["sw2", "mode_tv"]
        real = task.metrics(TOY.sample(eval_samples, torch.Generator().manual_seed(999)))
        floor = {k: real[k] for k in keys}
    elif math.prod(task.shape(image_size)) <= 4096:
        held = task.dataset("test", data_dir, image_size)
        pick = torch.randperm(len(held), generator=torch.Generator().manual_seed(7))
        ref = fetch(held, pick[:eval_samples])[0]
        pick = torch.randperm(len(data), generator=torch.Generator().manual_seed(8))
        same = fetch(data, pick[: len(ref)])[0]
        floor = {"pixel_sw2": sliced_wasserstein(same.flatten(1), ref.flatten(1))}
        keys = ["pixel_sw2"]
    if fid is not None:
        from eval.fid import frechet_distance

        fid_ref = fid.reference_stats(task.name, split="train", image_size=image_size,
                                      data_dir=data_dir, num_images=fid_ref_samples or None)
        keys = ["fid"] + keys

    def quality(x):
        q = {}
        if task.kind == "points":
            m = task.metrics(x[:eval_samples])
            q.update(sw2=m["sw2"], mode_tv=m["mode_tv"], nonfinite=m["nonfinite"])
        elif ref is not None:
            xe = x[: min(eval_samples, len(ref))]
            q["pixel_sw2"] = sliced_wasserstein(xe.flatten(1), ref[: len(xe)].flatten(1))
        if fid is not None:
            mu, sigma, _ = fid.stats(x[:fid_samples])
            q["fid"] = float(frechet_distance(mu, sigma, *fid_ref))
        return q

    return keys, quality, floor


# ---------------------------------------------------------------- the table ----
def table_row(method, n, n_c, flops, quality, keys, seconds):
    """One printed row: ``method`` at N base and N_c corrector Euler steps, its FLOPs/image from
    ``flops`` = (per base evaluation, per corrector evaluation) and its ``quality`` metrics."""
    f_base, f_corr = flops
    row = dict(method=method, N=n, N_c=n_c, nfe=n + n_c, flops=n * f_base + n_c * f_corr,
               flops_base_part=n * f_base, flops_corrector_part=n_c * f_corr, **quality,
               sample_seconds=round(seconds, 1))
    print(f"   {method:15s} N={n:<4d} N_c={n_c:<4d} FLOPs/image {row['flops']:.4g}  "
          + "  ".join(f"{k}={row[k]:.4g}" for k in keys))
    return row


def report(rows, keys, floor, *, n, out, task):
    """The table's end: OUT/table.csv and table.md (printed), OUT/quality_vs_flops.png, the claim
    check (printed) and the summary's entries: the best corrected row against the base at N."""
    key = keys[0] if keys else None
    claim = claim_check(rows, key)
    print(write_table(rows, ["method", "N", "N_c", "nfe", "flops"] + keys + ["sample_seconds"],
                      out), end="")
    if key:
        plot_quality(rows, keys, os.path.join(out, "quality_vs_flops.png"), f"{task}: base S_N "
                     f"alone vs base + inverse-noise corrector (corrector trained at N={n})")
    corrected = [r for r in rows if r["method"] == "base+corrector"]
    best = min(corrected, key=lambda r: sort_key(r, key)) if key else corrected[-1]
    base_row = next(r for r in rows if r["method"] == "base" and r["N"] == n)
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
    }


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
            witnesses.append({"N": r["N"], "N_c": r["N_c"], "flops": r["flops"], "quality": r[key],
                              "best_dearer_base": min(b[key] for b in dearer),
                              "dearer_base_N": [b["N"] for b in dearer]})
    best_base = min(base, key=lambda b: b[key], default=None)
    if not any(r["method"] == "base+corrector" for r in usable) or not base:
        holds, verdict = None, f"undecided: no finite {key} to compare"
    elif witnesses:
        holds = True
        verdict = (f"HOLDS: (N, N_c) = {[(w['N'], w['N_c']) for w in witnesses]} beat every "
                   f"base-alone point of equal or higher FLOPs on {key}")
    else:
        holds = False
        verdict = (f"does NOT hold on {key}: no base + corrector point beats every base-alone "
                   f"point of equal or higher FLOPs")
    best = None
    if best_base is not None:
        best = {"N": best_base["N"], "flops": best_base["flops"], "quality": best_base[key]}
    return {"metric": key, "lower_is_better": True, "holds": holds, "witnesses": witnesses,
            "verdict": verdict, "best_base": best}


def write_table(rows, cols, out):
    """OUT/table.csv and OUT/table.md (non-finite values left empty); returns the markdown."""
    rows = [{k: v if is_finite(v) or not isinstance(v, float) else None for k, v in r.items()}
            for r in rows]
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
    """Quality against FLOPs/image (log scale), one panel per metric: the base alone at each N and
    base + corrector at each N_c."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(metrics), figsize=(5.5 * len(metrics), 4.2), squeeze=False)
    for ax, key in zip(axes[0], metrics):
        for method, style, color, label in [
            ("base", "o-", "C0", "base alone (N)"),
            ("base+corrector", "s--", "C3", "base + corrector"),
        ]:
            pts = sorted([r for r in rows if r["method"] == method and is_finite(r.get(key))],
                         key=lambda r: r["flops"])
            ax.plot([r["flops"] for r in pts], [r[key] for r in pts], style, color=color,
                    label=label)
            for r in pts:
                text = f"N={r['N']}" if method == "base" else f"{r['N']},{r['N_c']}"
                ax.annotate(text, (r["flops"], r[key]), textcoords="offset points", fontsize=8,
                            xytext=(4, 4) if method == "base" else (4, -10), color=color)
        ax.set(xscale="log", xlabel="FLOPs / image (torch.utils.flop_counter)",
               ylabel=f"{key} (lower is better)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
