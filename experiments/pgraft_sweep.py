"""P-GRAFT over several N_I: one pgraft.py run per N_I, then a table and a plot against N_I.

    python -m experiments.pgraft_sweep --n-i 0,0.1,0.25,0.5       # toy2d, fractions of N
    python -m experiments.pgraft_sweep --n-i abar:0.9,0.7,0.5,0.3 # by noise level
    python -m experiments.pgraft_sweep --task mnist --n-i 0,0.25,0.5 --device cuda

Takes every pgraft.py flag; --n-i is a list here. Runs the Lemma 4.3 diagnostic once for all N_I
(OUT/lemma43.json/.png), then pgraft.py at each N_I into OUT/ni_<N_I>/, and writes OUT/sweep.md,
sweep.csv, sweep.png and summary.json. Every row names N_I, abar_{N_I} and how many continuation
steps N_I -> 0 draw noise (0 only for N_I = 0, which is GRAFT). --resume resumes every N_I.
"""

import os
import sys

import common
import harness
import pgraft
import rewards
from eval import lemma43
from tasks import get_task

COLS = ["n_i", "n_i_frac", "abar_n_i", "random_continuation_steps", "reward_final",
        "accuracy_final", "fid_final", "tilt_tv_base", "tilt_tv", "samples_generated"]


def main(argv=None):
    argv = list(sys.argv[1:] if argv is None else argv)
    args, given = harness.parse(pgraft.Args, argv, task_defaults=pgraft.TASK_DEFAULTS,
                            doc=__doc__)
    task = get_task(args.task)
    run = harness.Run(args, script="pgraft_sweep", out=os.path.join(
        "runs", "pgraft", f"{task.name}-{args.accept}-sweep"))
    # the base and its chain: N_I as steps, each checked before any run starts
    base = common.ensure_base(args.base, task, "ddpm", seed=args.seed, device=args.device,
                              data_dir=args.data_dir)
    ref, process, ckpt = common.load_base(base, run.device, task=task)
    conditional = common.check_ddpm_reference(ref, process, ckpt, base, args.sample_steps,
                                              args.cfg_scale, "P-GRAFT")
    eta = common.sampler_eta(args.sampler, args.eta, "eta" in given)
    n_is = common.parse_steps(args.n_i, process, "--n-i")
    for n_i in n_is:
        common.check_continuation(process, n_i, args.sample_steps, eta)
    levels = [] if args.lemma_levels == "none" else common.parse_steps(
        args.lemma_levels, process, "--lemma-levels", allow_n=True)
    reward = rewards.get_reward(args.reward, task, run.device, conditional, args.data_dir,
                                args.classifier)
    run.begin(settings=dict(base=base, n_i=", ".join(
        f"{n} (abar {float(process.alpha_bar[n]):.3f})" for n in n_is)))
    lemma = None
    if levels and run.main:
        data = task.dataset("train", args.data_dir) if ref.config.get("cond_dim") else None
        lemma = lemma43.run(ref, process, task, reward, levels=levels, n_is=n_is,
                            states=args.lemma_states, continuations=args.lemma_continuations,
                            seed=args.seed, device=run.device, conditional=conditional,
                            data=data, eta=eta, sample_steps=args.sample_steps,
                            sample_batch=args.sample_batch, out_dir=args.out)
    rows = []
    for n_i in n_is:
        print(f"== sweep: N_I = {n_i}", flush=True)
        sub = strip(argv, "--n-i", "--out", "--lemma-levels")
        rows.append(pgraft.main(sub + ["--n-i", str(n_i), "--lemma-levels", "none", "--out",
                                       os.path.join(args.out, f"ni_{n_i}")]))
    # every rank takes part in gathering what the ranks did (each N_I's summary.json has its own)
    run.shares()
    if not run.main:
        return dict(n_i=n_is, reward_final=[r["reward_final"] for r in rows])
    table(run, rows, process.N)
    lists = {k: [r.get(k) for r in rows] for k in ("reward_final", "tilt_tv", "tilt_tv_base",
                                                    "fid_final", "abar_n_i")}
    return run.finish(task=task.name, method="pgraft", accept=args.accept, M=args.M, K=args.K,
                      n_i=n_is, rounds=args.rounds,
                      samples_generated=rows[0]["samples_generated"],
                      reward_base=rows[0]["reward_base"], fid_base=rows[0].get("fid_base"),
                      **{k: v for k, v in lists.items() if any(x is not None for x in v)},
                      sweep={str(r["n_i"]): {c: r.get(c) for c in COLS} for r in rows},
                      lemma43=lemma, N=process.N, base=base)


def strip(argv, *flags):
    """``argv`` without the given flags and their values."""
    out, skip = [], False
    for a in argv:
        if skip:
            skip = False
        elif a in flags:
            skip = True
        elif not any(a.startswith(f + "=") for f in flags):
            out.append(a)
    return out


def table(run, rows, N):
    """OUT/sweep.md, sweep.csv and sweep.png. Each N_I has its own exact target on toy2d, so both
    the base's and the fine-tuned model's TV to it are shown."""
    cols = [c for c in COLS if any(r.get(c) is not None for r in rows)]

    def fmt(v):
        return "" if v is None else (f"{v:.4f}" if isinstance(v, float) else str(v))

    base = dict(n_i="base", reward_final=rows[0]["reward_base"],
                accuracy_final=rows[0].get("accuracy_base"), fid_final=rows[0].get("fid_base"),
                samples_generated=0)
    md = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    md += ["| " + " | ".join(fmt(r.get(c)) for c in cols) + " |" for r in [base] + rows]
    with open(run.path("sweep.md"), "w") as f:
        f.write("\n".join(md) + "\n")
    with open(run.path("sweep.csv"), "w") as f:
        f.write("\n".join(",".join(fmt(r.get(c)) if r is not None else c for c in cols)
                          for r in [None, base] + rows) + "\n")
    print("\n".join(md))
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5.5, 3.8))
    x = [r["n_i"] / N for r in rows]
    ax.plot(x, [r["reward_final"] for r in rows], "o-", label="P-GRAFT reward")
    ax.axhline(rows[0]["reward_base"], color="gray", ls="--", label="base reward")
    ax.set(xlabel="N_I / N (0 = GRAFT)", ylabel="final mean reward",
           title="P-GRAFT: final reward against N_I")
    if any(r.get("fid_final") is not None for r in rows):
        ax2 = ax.twinx()
        ax2.plot(x, [r.get("fid_final") for r in rows], "s--", color="C3", label="FID")
        ax2.set_ylabel("FID", color="C3")
    ax.legend(loc="best", fontsize=8)
    fig.tight_layout()
    fig.savefig(run.path("sweep.png"), dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    common.run_main(main)
