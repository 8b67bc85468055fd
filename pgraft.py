"""P-GRAFT: shape the intermediate distribution at step N_I, let the frozen reference finish.

    python pgraft.py                                  # toy2d, N_I = 0.25 N; pretrains the base first if absent (<5 min, 2 CPU cores)
    python pgraft.py --n-i 0,0.1,0.25,0.5,0.75        # sweep: final reward (and FID) against N_I, the bias-variance curve
    python pgraft.py --loss x0                        # plain loss on accepted X_0 restricted to n > N_I, for comparison
    python pgraft.py --task mnist --n-i 0.25,0.5      # class-conditional MNIST, reward log p(label | image)
    python pgraft.py --task celeba --device cuda --bf16   # GPU preset: smiling reward, 4 rounds of 256 x 8 samples

Each round (paper, P-GRAFT): the sampling model runs N -> 0 storing X_{N_I}; the reward is measured on
X_0; the GRAFT rule accepts (graft.AcceptRule, the same rules and r_hat); the kept objects are the
states X_{N_I}. The fine-tuned copy of the reference learns only the steps n in (N_I, N], with the
bridge loss on the stored states; at inference it runs N -> N_I and the frozen reference N_I -> 0.
The continuation must be stochastic (DDPM, or DDIM with eta > 0): otherwise X_0 is a function of
X_{N_I} and the method is GRAFT again, so eta = 0 is refused.

Also writes the Lemma 4.3 diagnostic: E[Var(r(X_0) | X_t)] at several t (OUT/lemma43.json/.png),
estimated from several stochastic continuations of the reference from the same X_t; and for a list
of N_I, OUT/sweep.md/.csv/.png plus one sub-folder ni_<N_I> per run. Default OUT: runs/pgraft/<task>-<accept>.
"""
import copy
import json
import math
import os

import torch

import common
import graft
from common import UsageError
from models import load_checkpoint


class PGraftRun(graft.GraftRun):
    method = "pgraft"

    def sampler(self, model):
        """ALGORITHM (paper, P-GRAFT, inference): fine-tuned model N -> N_I, frozen reference N_I -> 0."""
        if self.n_i == 0:
            return model
        return [(model, self.N, self.n_i), (self.ref_net, self.n_i, 0)]

    def kept_of(self, x0, x_ni):
        """P-GRAFT keeps the accepted trajectories' states X_{N_I} (``--loss x0``: their X_0)."""
        return x0 if self.args.loss == "x0" or self.n_i == 0 else x_ni

    def loss(self, net, kept, y, gen):
        N, ni = self.N, self.n_i
        if self.args.loss == "x0":  # comparison: the plain loss on accepted X_0, only for n in (N_I, N]
            return self.process.loss(net, kept, y, gen, n_range=(ni + 1, N))
        # ALGORITHM (paper, P-GRAFT, training): the bridge loss on the stored states X_{N_I}, n ~ U(N_I, N]:
        #   x_n = a_n X_{N_I} + s_n eps,  a_n = sqrt(abar_n / abar_{N_I}),  s_n = sqrt(1 - abar_n / abar_{N_I}),
        #   loss = || (s_n / sqrt(1 - abar_n)) eps_theta(x_n, n) - eps ||^2
        # (its minimiser is the reference's eps-prediction of the tilted law; N_I = 0 gives the plain loss).
        n = torch.randint(ni + 1, N + 1, (kept.shape[0],), generator=gen, device=kept.device)
        ab_n = self.process.abar(n, kept)
        ratio = ab_n / self.process.alpha_bar[ni].item()
        a_n, s_n = ratio.sqrt(), (1 - ratio).sqrt()
        eps = torch.randn(kept.shape, generator=gen, device=kept.device, dtype=kept.dtype)
        pred = net(a_n * kept + s_n * eps, n.float() / N, y)
        return ((s_n / (1 - ab_n).sqrt()) * pred - eps).pow(2).mean()

    def describe(self):
        ab = self.process.alpha_bar[self.n_i].item()
        return dict(n_i=f"{self.n_i} of N={self.N} ({self.n_i / self.N:.3f} N), abar_NI={ab:.4f}, "
                    f"X_NI = {math.sqrt(ab):.3f} X_0 + {math.sqrt(1 - ab):.3f} eps", loss=self.args.loss,
                    trained_steps=f"n in ({self.n_i}, {self.N}]; reference below")

    def extra_summary(self):
        return dict(n_i_frac=self.n_i / self.N, loss=self.args.loss, lemma43=getattr(self, "lemma", None))


# =============================================================================================
# Lemma 4.3 diagnostic: E[Var(r(X_0) | X_t)] grows with the noise level t.
# =============================================================================================
@torch.no_grad()
def conditional_reward_variance(run, levels, n_states, n_cont, seed):
    """E[Var(r(X_0) | X_t)] at each step t of ``levels``: n_states reference trajectories are stopped
    at t, each X_t is continued n_cont times t -> 0 with the (stochastic) reference sampler, and the
    unbiased variance of the n_cont rewards is averaged over the states. Returns {t: (mean, stderr)}."""
    a, P, task = run.args, run.process, run.task
    gen = common.generator(seed, run.device)
    clip = task.kind == "image"
    y = run.conditions(n_states, gen)
    x, cur, out = torch.randn((n_states, *task.shape()), generator=gen, device=run.device), run.N, {}
    for t in sorted(set(levels), reverse=True):
        if t < cur:
            x, _ = P.sample(run.ref_net, x, cur, t, y, gen, a.eta, a.steps, clip=clip)
            cur = t
        xs = x.repeat_interleave(n_cont, 0)
        ys = y.repeat_interleave(n_cont, 0) if y is not None else None
        x0 = xs if t == 0 else P.sample(run.ref_net, xs, t, 0, ys, gen, a.eta, a.steps, clip=clip)[0]
        r = run.score(x0.clamp(-1, 1) if clip else x0, ys).view(n_states, n_cont)
        v = r.double().var(1)
        out[t] = (v.mean().item(), v.std().item() / math.sqrt(n_states))
    return dict(sorted(out.items()))


def lemma_diagnostic(run, args, out_dir, n_is):
    """Run the diagnostic at --lemma-levels (plus the N_I of the run), log, save json and a plot."""
    if not args.lemma_levels or args.lemma_levels == "none":
        return None
    levels = sorted(set(parse_steps(args.lemma_levels, run.N, "--lemma-levels", allow_n=True) + list(n_is)))
    res = conditional_reward_variance(run, levels, args.lemma_states, args.lemma_continuations, args.seed + 31337)
    table = {str(t): dict(t_frac=t / run.N, var=m, stderr=se) for t, (m, se) in res.items()}
    with open(os.path.join(out_dir, "lemma43.json"), "w") as f:
        json.dump(dict(states=args.lemma_states, continuations=args.lemma_continuations, levels=table), f, indent=2)
    print("Lemma 4.3 diagnostic E[Var(r(X_0) | X_t)]: " + ", ".join(f"t={t}: {m:.4g}+-{se:.2g}" for t, (m, se) in res.items()))
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(5, 3.5))
    ts = list(res)
    ax.errorbar([t / run.N for t in ts], [res[t][0] for t in ts], yerr=[res[t][1] for t in ts], marker="o", capsize=3)
    for ni in n_is:
        ax.axvline(ni / run.N, color="gray", ls=":", lw=1)
    ax.set(xlabel="t / N (dotted: N_I)", ylabel="E[Var(r(X_0) | X_t)]",
           title=f"Lemma 4.3 on {run.task.name}, reward {run.reward.name}")
    fig.tight_layout()
    fig.savefig(os.path.join(out_dir, "lemma43.png"), dpi=110)
    plt.close(fig)
    return table


# =============================================================================================
# Command line, N_I sweep.
# =============================================================================================
def parse_steps(spec, N, flag, allow_n=False):
    """'0.25' or '0,0.1,0.5' or '50': values in [0, 1) are fractions of N, integers >= 1 are steps."""
    out = []
    for item in str(spec).split(","):
        try:
            v = float(item)
        except ValueError:
            raise UsageError(f"{flag} {spec!r}: expected numbers (fractions of N in [0, 1) or integer steps)") from None
        if v == 1.0 and allow_n:
            n = N
        elif 0 <= v < 1:
            n = int(round(v * N))
        elif v >= 1 and v == int(v):
            n = int(v)
        else:
            raise UsageError(f"{flag} {item}: out of range (a fraction of N in [0, 1) or an integer step 1..N-1)")
        if not 0 <= n < N + (1 if allow_n else 0):
            raise UsageError(f"{flag} {item} gives N_I = {n}, out of range: need 0 <= N_I < N = {N}")
        out.append(n)
    return out


def get_args(argv=None):
    p = common.parser(__doc__.splitlines()[0])
    graft.add_args(p, "pgraft")
    p.add_argument("--n-i", default="0.25", help="N_I as a fraction of N in [0, 1) or an integer step; a comma list "
                   "runs a sweep (table and plot of final reward and FID against N_I). N_I = 0 is plain GRAFT")
    p.add_argument("--loss", choices=["bridge", "x0"], default="bridge",
                   help="bridge: the bridge loss on stored X_{N_I} (P-GRAFT); x0: plain loss on accepted X_0 "
                   "restricted to n > N_I (comparison)")
    p.add_argument("--lemma-levels", default="0.1,0.25,0.5,1.0", help="noise levels t (fractions of N or steps) of the "
                   "Lemma 4.3 diagnostic E[Var(r(X_0) | X_t)], plus each N_I; 'none' skips it")
    p.add_argument("--lemma-states", type=int, default=None, help="states X_t of the diagnostic (default: toy2d 256, images 16)")
    p.add_argument("--lemma-continuations", type=int, default=8, help="stochastic continuations per state (>= 2)")
    return p.parse_args(argv)


def main(argv=None):
    args = get_args(argv)
    torch.manual_seed(args.seed)
    task = graft.resolve_defaults(args, "pgraft")
    if args.eta == 0:
        raise UsageError("P-GRAFT needs a stochastic continuation N_I -> 0, but --sampler ddim --eta 0 is "
                         "deterministic: X_0 would be a function of X_{N_I} and P-GRAFT would collapse to GRAFT; "
                         "use --sampler ddpm or --eta > 0")
    if args.lemma_continuations < 2:
        raise UsageError("--lemma-continuations must be >= 2 (a variance needs two continuations)")
    args.lemma_states = args.lemma_states or (256 if task.kind == "points" else 16)
    args.base = graft.ensure_base(args, task)
    N = (load_checkpoint(args.base).get("process") or {}).get("n_steps", 0)
    if not N:
        raise UsageError(f"{args.base} is not a DDPM checkpoint; P-GRAFT fine-tunes DDPMs")
    n_is = parse_steps(args.n_i, N, "--n-i")
    if len(n_is) == 1:
        run = PGraftRun(args, n_is[0])
        os.makedirs(args.out, exist_ok=True)
        run.lemma = lemma_diagnostic(run, args, args.out, n_is)
        return run.run()
    return sweep(args, n_is)


def sweep(args, n_is):
    """One P-GRAFT run per N_I (sub-folders ni_<N_I>, the base evaluated once), then the table and plot."""
    top = common.RunLog(args.out, args)
    rows, base_eval, lemma = [], None, None
    for ni in n_is:
        sub = copy.deepcopy(args)
        sub.out = os.path.join(args.out, f"ni_{ni}")
        print(f"== sweep: N_I = {ni}")
        run = PGraftRun(sub, ni, base_eval=base_eval)
        if lemma is None:
            lemma = run.lemma = lemma_diagnostic(run, args, args.out, n_is)
        s = run.run()
        base_eval = (run.base_eval, run.x_base)
        rows.append(s)
    N = run.N
    cols = ["n_i", "n_i_frac", "reward_final", "accuracy_final", "fid_final", "tilt_tv", "samples_generated"]
    cols = [c for c in cols if any(r.get(c) is not None for r in rows)]
    fmt = lambda v: "" if v is None else (f"{v:.4f}" if isinstance(v, float) else str(v))  # noqa: E731
    base_row = dict(n_i="base", reward_final=rows[0]["reward_base"], accuracy_final=rows[0].get("accuracy_base"),
                    fid_final=rows[0].get("fid_base"), samples_generated=0)  # tilt_tv: each N_I has its own target
    md = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    md += ["| " + " | ".join(fmt(r.get(c)) for c in cols) + " |" for r in [base_row] + rows]
    with open(top.path("sweep.md"), "w") as f:
        f.write("\n".join(md) + "\n")
    with open(top.path("sweep.csv"), "w") as f:
        f.write(",".join(cols) + "\n" + "\n".join(",".join(fmt(r.get(c)) for c in cols) for r in [base_row] + rows) + "\n")
    print("\n".join(md))
    _plot_sweep(rows, N, top.path("sweep.png"))
    s = top.summary(task=rows[0]["task"], method="pgraft", accept=args.accept, M=args.M, K=args.K, n_i=n_is,
                    rounds=args.rounds, samples_generated=rows[0]["samples_generated"],
                    reward_base=rows[0]["reward_base"], reward_final=[r["reward_final"] for r in rows],
                    **({"tilt_tv": [r["tilt_tv"] for r in rows]} if "tilt_tv" in rows[0] else {}),
                    **({"fid_base": rows[0].get("fid_base"), "fid_final": [r.get("fid_final") for r in rows]}
                       if "fid_base" in rows[0] else {}),
                    sweep={str(r["n_i"]): {c: r.get(c) for c in cols} for r in rows}, lemma43=lemma, N=N)
    print(f"sweep done in {s['wall_time_s']}s; wrote {args.out}/sweep.md, sweep.png")
    return s


def _plot_sweep(rows, N, path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(5.5, 3.8))
    x = [r["n_i"] / N for r in rows]
    ax.plot(x, [r["reward_final"] for r in rows], "o-", label="P-GRAFT reward")
    ax.axhline(rows[0]["reward_base"], color="gray", ls="--", label="base reward")
    ax.set(xlabel="N_I / N (0 = GRAFT)", ylabel="final mean reward", title="P-GRAFT: final reward against N_I")
    if any(r.get("fid_final") is not None for r in rows):
        ax2 = ax.twinx()
        ax2.plot(x, [r.get("fid_final") for r in rows], "s--", color="C3", label="FID")
        ax2.set_ylabel("FID", color="C3")
    ax.legend(loc="best", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    common.run_main(main)
