"""The Lemma 4.3 diagnostic of P-GRAFT: E[Var(r(X_0) | X_t)] grows with the noise level t.

Paper, Lemma 4.3: the reward's conditional variance given the state X_t is non-decreasing in t, so
shaping the law of X_{N_I} at a larger N_I sees a noisier reward (the variance side of P-GRAFT's
bias-variance trade-off). Estimated here by stopping reference trajectories at t and continuing each
X_t several times t -> 0 with the stochastic reference sampler.
"""

import json
import math
import os

import torch


@torch.no_grad()
def conditional_reward_variance(
    net,
    process,
    task,
    reward,
    levels,
    n_states,
    n_cont,
    generator,
    y=None,
    eta=1.0,
    sample_steps=None,
    sample_batch=4096,
):
    """E[Var(r(X_0) | X_t)] at each step t of ``levels``: ``n_states`` trajectories of ``net`` are
    stopped at t, each X_t is continued ``n_cont`` times t -> 0, and the unbiased variance of the
    ``n_cont`` rewards is averaged over the states. Returns {t: (mean, stderr)}."""
    from rewards import score

    clip = task.kind == "image"
    dev = generator.device
    x, cur, out = (
        torch.randn((n_states, *task.shape()), generator=generator, device=dev),
        process.N,
        {},
    )
    from tasks import progress

    for t in progress(sorted(set(levels), reverse=True), "Lemma 4.3 levels"):
        if t < cur:
            x, _ = process.sample(net, x, cur, t, y, generator, eta, sample_steps, clip=clip)
            cur = t
        xs = x.repeat_interleave(n_cont, 0)
        ys = y.repeat_interleave(n_cont, 0) if y is not None else None
        x0 = (
            xs
            if t == 0
            else torch.cat(
                [
                    process.sample(
                        net,
                        xs[i : i + sample_batch],
                        t,
                        0,
                        ys[i : i + sample_batch] if ys is not None else None,
                        generator,
                        eta,
                        sample_steps,
                        clip=clip,
                    )[0]
                    for i in range(0, len(xs), sample_batch)
                ]
            )
        )
        r = score(reward, x0.clamp(-1, 1) if clip else x0, ys, sample_batch).view(n_states, n_cont)
        v = r.double().var(1)
        out[t] = (v.mean().item(), v.std().item() / math.sqrt(n_states))
    return dict(sorted(out.items()))


def write(result, out_dir, N, n_is, n_states, n_cont, title):
    """OUT/lemma43.json and OUT/lemma43.png; returns the table {t: {t_frac, var, stderr}}."""
    table = {str(t): dict(t_frac=t / N, var=m, stderr=se) for t, (m, se) in result.items()}
    with open(os.path.join(out_dir, "lemma43.json"), "w") as f:
        json.dump(dict(states=n_states, continuations=n_cont, levels=table), f, indent=2)
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 3.5))
    ts = list(result)
    ax.errorbar(
        [t / N for t in ts],
        [result[t][0] for t in ts],
        yerr=[result[t][1] for t in ts],
        marker="o",
        capsize=3,
    )
    for ni in n_is:
        ax.axvline(ni / N, color="gray", ls=":", lw=1)
    ax.set(xlabel="t / N (dotted: N_I)", ylabel="E[Var(r(X_0) | X_t)]", title=title)
    fig.tight_layout()
    fig.savefig(os.path.join(out_dir, "lemma43.png"), dpi=110)
    plt.close(fig)
    return table



def run(net, process, task, reward, *, levels, n_is, states, continuations, seed, device,
        conditional, data, eta, sample_steps, sample_batch, out_dir):
    """The diagnostic as P-GRAFT runs it: the levels plus each N_I, on the reference ``net``,
    from its own generator (seed + 31337, which draws the conditions first), written to
    OUT/lemma43.json/.png with a printed line. Returns the table of ``write``."""
    gen = torch.Generator(device=device).manual_seed(seed + 31337)
    y = task.sample_conditions(states, gen, device, data) if conditional else None
    res = conditional_reward_variance(net, process, task, reward, sorted(set(levels) | set(n_is)),
                                      states, continuations, gen, y=y, eta=eta,
                                      sample_steps=sample_steps, sample_batch=sample_batch)
    table = write(res, out_dir, process.N, n_is, states, continuations,
                  f"Lemma 4.3 on {task.name}, reward {reward.name}")
    print("Lemma 4.3 diagnostic E[Var(r(X_0) | X_t)]: "
          + ", ".join(f"t={t}: {m:.4g}+-{se:.2g}" for t, (m, se) in res.items()))
    return table


@torch.no_grad()
def one_round_ceiling(net, process, task, reward, rule, *, n_is, prompts, M, generator,
                      conditional, data=None, eta=1.0, sample_steps=None, sample_batch=1000):
    """What one round could reach at each N_I if the fine-tuned first segment were learned
    perfectly: ``prompts`` x ``M`` samples of the reference ``net`` (one round's, conditions as a
    round draws them), their states X_{N_I} kept; ``rule`` accepts on X_0 within each condition;
    each accepted X_{N_I} is continued N_I -> 0 by the reference with fresh noise and scored. At
    N_I = 0 (GRAFT) the accepted X_0 themselves. An N_I off the sampling grid is put on it
    (DDPM.sample), as P-GRAFT does, so each grid is sampled once from the same noise.

    Returns {n_i: dict(reward, prob, reward_all, prob_all, gain, gain_prob, accepted)}: the mean
    reward (and bounded reward p = exp(r) for log-probability rewards) of the continued accepted
    samples, of all the round's samples, and the difference (the ceiling's gain over the base)."""
    from rewards import bounded, score

    clip, dev = task.kind == "image", generator.device
    n = prompts * M
    y = task.sample_conditions(prompts, generator, dev, data, repeat=M) if conditional else None
    z = torch.randn((n, *task.shape()), generator=generator, device=dev)
    # N_I that leave the grid alike share one pass (every on-grid N_I shares GRAFT's)
    passes = {}
    for n_i in sorted(set(n_is)):
        key = tuple(process.grid(process.N, 0, sample_steps, keep=[n_i] if n_i else []))
        passes.setdefault(key, []).append(n_i)

    def mean_p(r):
        p = bounded(reward, r)
        return None if p is None else p.mean().item()

    out = {}
    for group in passes.values():
        keep = [v for v in group if v > 0]
        x0s, states = [], {v: [] for v in keep}
        for i in range(0, n, sample_batch):
            yb = y[i : i + sample_batch] if y is not None else None
            x, at = process.sample(net, z[i : i + sample_batch], y=yb, generator=generator,
                                   eta=eta, num_steps=sample_steps, return_at=keep, clip=clip)
            x0s.append(x.clamp(-1, 1) if clip else x)
            for v in keep:
                states[v].append(at[v])
        x0 = torch.cat(x0s)
        r = score(reward, x0, y, sample_batch)
        mask = rule.select(r.view(prompts, M), generator).reshape(-1)
        ya = y[mask] if y is not None else None
        for n_i in group:
            if n_i == 0:
                ra = r[mask]
            else:
                xs = torch.cat(states[n_i])[mask]
                parts = []
                for i in range(0, len(xs), sample_batch):
                    yb = ya[i : i + sample_batch] if ya is not None else None
                    x, _ = process.sample(net, xs[i : i + sample_batch], n_i, 0, yb, generator,
                                          eta, sample_steps, clip=clip)
                    parts.append(x.clamp(-1, 1) if clip else x)
                ra = score(reward, torch.cat(parts), ya, sample_batch)
            p_all, p_acc = mean_p(r), mean_p(ra)
            out[n_i] = dict(reward=ra.mean().item(), prob=p_acc, reward_all=r.mean().item(),
                            prob_all=p_all, gain=ra.mean().item() - r.mean().item(),
                            gain_prob=None if p_acc is None else p_acc - p_all,
                            accepted=int(mask.sum()))
    return dict(sorted(out.items()))


def flags(args):
    """``run``'s keyword arguments that a script's flags give (--lemma-states, --seed, ...)."""
    return dict(states=args.lemma_states, continuations=args.lemma_continuations, seed=args.seed,
                sample_steps=args.sample_steps, sample_batch=args.sample_batch, out_dir=args.out)
