"""experiments/benchmark.py's numbers turned into intervals, tables and pictures.

Every statistic is over the reported seeds: the mean with its 95% Student-t interval, and for each
method the seed-by-seed difference from GRAFT (the same base, conditions and evaluation noise
within a seed) with its 95% t-interval (eval/stats.py), at each budget and for the half-budget
question "does the method at half the samples reach GRAFT with all of them?".
"""

import json
import math
import os

import numpy as np

from eval import stats

# column: (label, higher is better); the tilt task labels some differently (``labels``)
METRICS = {
    "prob": ("p(y|x)", True),
    "accuracy": ("accuracy", True),
    "reward": ("mean log p(y|x)", True),
    "fid": ("feature FID", False),
    "fid_target": ("FID to exact target", False),
    "diversity": ("diversity", True),
    "inception_fid": ("Inception FID", False),
}
TILT_LABELS = {"prob": "p(c|x)", "accuracy": "class-c fraction", "reward": "mean log p(c|x)",
               "fid": "FID to real class c"}


def labels(task):
    return {k: (TILT_LABELS.get(k, v[0]) if task == "mnist-tilt" else v[0])
            for k, v in METRICS.items()}


def columns(evals):
    """The metrics present in the evaluations, in METRICS' order."""
    seen = {k for per_seed in evals.values() for rows in per_seed.values() for m in rows.values()
            for k, v in m.items() if v is not None}
    return [k for k in METRICS if k in seen]


def values(evals, arm, rounds, metric, seeds):
    """One value per reported seed (None where missing) of ``arm`` after ``rounds`` rounds (the
    base: round 0 of arm 'base')."""
    per_seed = evals.get(arm, {})
    return [per_seed.get(str(s), {}).get(str(rounds), {}).get(metric) for s in seeds]


def aggregate(res):
    """Adds to ``res``: ``table`` (per budget, per arm, per metric: t-interval over seeds),
    ``paired`` (per arm but GRAFT, per budget, per metric: paired difference from GRAFT) and
    ``half_budget`` (per arm but GRAFT: its value at half the budget minus GRAFT's at all of it)."""
    ev, seeds, cols = res["evals"], res["reported_seeds"], columns(res["evals"])
    arms = [a["name"] for a in res["arms"]]
    res["columns"] = cols
    table, paired = {}, {}
    for b in res["budgets"]:
        k, key = b["rounds"], b["label"]
        rows = []
        for arm in ["base"] + arms:
            kk = 0 if arm == "base" else k
            rows.append(dict(method=arm, samples=0 if arm == "base" else b["samples"],
                             **{c: stats.t_interval(values(ev, arm, kk, c, seeds)) for c in cols}))
        table[key] = rows
        for arm in arms:
            if arm == "GRAFT":
                continue
            paired.setdefault(arm, {})[key] = {
                c: dict(stats.paired(values(ev, arm, k, c, seeds),
                                     values(ev, "GRAFT", k, c, seeds)),
                        verdict=None) for c in cols}
            for c, d in paired[arm][key].items():
                d["verdict"] = stats.verdict(d, METRICS[c][1])
    res["table"], res["paired"] = table, paired
    full = max(b["rounds"] for b in res["budgets"])
    half = next((b["rounds"] for b in res["budgets"] if 2 * b["rounds"] == full), None)
    res["half_budget"] = []
    for arm in arms:
        if arm == "GRAFT" or half is None:
            continue
        row = dict(method=arm, rounds=half, graft_rounds=full)
        for c in ("prob", "accuracy", "reward"):
            if c in cols:
                d = stats.paired(values(ev, arm, half, c, seeds),
                                 values(ev, "GRAFT", full, c, seeds))
                row[c] = dict(d, verdict=stats.verdict(d, True))
        res["half_budget"].append(row)
    return res


# ---------------------------------------------------------------- the fine-tuning loss ----
def loss_curve(folder):
    """{round: [(step, loss)]} of a run's logged fine-tuning losses (metrics.jsonl rows with a
    step and a loss)."""
    out = {}
    path = os.path.join(folder, "metrics.jsonl")
    if not os.path.isfile(path):
        return out
    with open(path) as f:
        for line in f:
            row = json.loads(line)
            if "step" in row and row.get("loss") is not None and "round" in row:
                out.setdefault(row["round"], []).append((row["step"], row["loss"]))
    return out


def saved_loss_curve(folder):
    """The loss curve the benchmark kept in FOLDER/bench_loss.json after the run's last stage
    (``loss_curve`` of the run's metrics.jsonl when there is none)."""
    path = os.path.join(folder, "bench_loss.json")
    if os.path.isfile(path):
        with open(path) as f:
            return {int(k): [tuple(p) for p in v] for k, v in json.load(f).items()}
    return loss_curve(folder)


def levelling(curves):
    """How much the fine-tuning loss still fell in the last quarter of each round: the mean over
    runs and rounds of (mean loss over the last quarter of the steps - mean over the quarter
    before) / the latter, and the mean curve (step -> mean loss over runs and rounds)."""
    changes, by_step = [], {}
    for c in curves:
        for pts in c.values():
            pts = sorted(pts)
            for s, v in pts:
                by_step.setdefault(s, []).append(v)
            last = pts[-1][0] if pts else 0
            q3 = [v for s, v in pts if 0.5 * last < s <= 0.75 * last]
            q4 = [v for s, v in pts if s > 0.75 * last]
            if q3 and q4:
                changes.append((np.mean(q4) - np.mean(q3)) / np.mean(q3))
    steps = sorted(by_step)
    return dict(change_last_quarter=float(np.mean(changes)) if changes else None,
                steps=steps, loss=[float(np.mean(by_step[s])) for s in steps])


def grid_edges(tuning):
    """{method: ["lr at the smallest value of the grid", ...]}: the settings of each chosen
    config that sit at the smallest or largest value its grid tried (grids of 2+ values)."""
    out = {}
    for fam, f in tuning["families"].items():
        if not f.get("chosen"):
            continue
        for key, v in f["chosen"].items():
            tried = sorted({g["config"][key] for g in f["grid"]})
            if len(tried) > 1 and v in (tried[0], tried[-1]):
                side = "smallest" if v == tried[0] else "largest"
                out.setdefault(fam, []).append(f"{key} {v:g} ({side} tried)")
    return out


# ---------------------------------------------------------------- tables ----
def fmt(v, d=3):
    if v is None or (isinstance(v, float) and not math.isfinite(v)):
        return "-"
    return f"{v:.{d}f}" if abs(v) < 1000 else f"{v:.0f}"


def ci_text(ci, d=3):
    if ci.get("mean") is None:
        return "-"
    if ci.get("half") is None:
        return fmt(ci["mean"], d)
    return f"{fmt(ci['mean'], d)} [{fmt(ci['lo'], d)}, {fmt(ci['hi'], d)}]"


def results_md(res):
    lab = labels(res["task"])
    cols = res["columns"]
    seeds = res["reported_seeds"]
    lines = [
        f"# Benchmark {res['task']} ({res['tasks_task']}), {res['preset']} preset", "",
        f"command: `{res['command']}`  ",
        f"machine: {res['machine']}  ",
        f"wall time: {res['times']['total_s']:.0f} s ({res['times']})  ",
        f"estimated before the run: {res.get('estimate', {}).get('total_s', '-')} s", "",
        f"{len(seeds)} reported seeds over {len(res['bases'])} independently pretrained bases "
        f"(seed s fine-tunes base s mod {len(res['bases'])}); tuning seed {res['tuning']['seed']} "
        "(base 0) is not reported. Within a seed every method is evaluated on the same noise and "
        "conditions. Intervals: 95% Student-t over seeds.",
    ]
    if len(seeds) < 5 or len(res["bases"]) < 2:
        lines += ["", f"**Fewer than 5 seeds or 2 bases ({len(seeds)}, {len(res['bases'])}): "
                  "below what issue 17 asks of a verdict.**"]
    s = res["settings"]
    lines += ["", "## Settings", "",
              f"reward {res['reward']}; accept {s['run']['accept']} (M={s['run']['M']}, "
              f"K={s['run']['K']}, alpha={s['run']['alpha']}), sample-from "
              f"{s['run']['sample_from']}; {s['run']['prompts']} conditions x M per round, "
              f"{s['run']['rounds']} rounds; {s['run']['sample_steps']} sampler steps (every "
              f"method, DDPO included); final evaluation {s['final']['samples']} samples per "
              "model and budget.", "",
              f"GRAFT / P-GRAFT: fine-tuning batch {s['run']['batch_size']}, EMA "
              f"{s['run']['ema_decay']}, warm-up 10% of each round's steps; learning rate and "
              "steps per round tuned (below). DDPO: PPO-clip, "
              f"{s['ddpo']['inner_epochs']} inner epoch(s) per round, minibatch "
              f"{s['ddpo']['batch_size']} transitions, {s['ddpo']['timestep_fraction']:g} of each "
              f"chain's {s['run']['sample_steps'] - 1} random steps per epoch, EMA "
              f"{s['ddpo']['ema_decay']}; learning rate and clip range tuned (below)."]
    lines += ["", "| N_I | N_I / N | abar_{N_I} | random continuation steps | run | one-round "
              "ceiling: reward gain | p gain |", "|---|---|---|---|---|---|---|"]
    for r in res["n_i_table"]:
        lines.append(f"| {r['n_i']} | {fmt(r['frac'])} | {fmt(r['abar'], 4)} | "
                     f"{r['random_steps']} | {'yes' if r['run'] else 'no'} | "
                     f"{fmt(r.get('ceiling_gain'))} | {fmt(r.get('ceiling_gain_prob'))} |")
    lines += ["", "One-round ceiling: one round's reference samples, accepted by the rule on X_0, "
              "their X_{N_I} continued by the reference (a perfectly learned first segment); "
              "N_I = 0 is GRAFT; mean over the bases (eval/lemma43.one_round_ceiling)."]
    t = res["tuning"]
    lines += ["", "## Tuning", "", f"criterion: {t['metric']} ({t['direction']}) of the "
              f"benchmark's evaluation at the full budget, seed {t['seed']} on base 0.", "",
              "| method | config | value |", "|---|---|---|"]
    for fam, f in t["families"].items():
        for g in f["grid"]:
            mark = " (chosen)" if g["config"] == f["chosen"] else ""
            lines.append(f"| {fam} | {g['config']}{mark} | {fmt(g.get('value'))} |")
    edges = grid_edges(t)
    if edges:
        lines += ["", "Chosen at the edge of its grid (a better value may lie beyond it): "
                  + "; ".join(f"{fam}: {', '.join(e)}" for fam, e in edges.items()) + "."]
    lines += ["", "## Results", ""]
    for b in res["budgets"]:
        key = b["label"]
        lines += [f"### {key} ({b['samples']} samples, {b['rounds']} rounds)", "",
                  "| method | samples | " + " | ".join(lab[c] for c in cols) + " |",
                  "|---|---|" + "---|" * len(cols)]
        for row in res["table"][key]:
            lines.append(f"| {row['method']} | {row['samples']} | "
                         + " | ".join(ci_text(row[c]) for c in cols) + " |")
        lines += ["", "Paired difference from GRAFT (method - GRAFT, seed by seed):", "",
                  "| method | " + " | ".join(lab[c] for c in cols) + " |",
                  "|---|" + "---|" * len(cols)]
        for arm, per in res["paired"].items():
            lines.append(f"| {arm} | " + " | ".join(
                f"{ci_text(per[key][c])} {per[key][c]['verdict'] or ''}" for c in cols) + " |")
        lines.append("")
    for r in res.get("extra_rows", []):
        lines.append(f"{r['method']}: " + ", ".join(f"{lab.get(k, k)} {fmt(v)}"
                                                    for k, v in r.items() if k != "method"))
    lines += ["", "## Half the samples", "",
              "Each method after half the budget minus GRAFT after all of it, paired by seed:", "",
              "| method | " + " | ".join(lab[c] for c in ("prob", "accuracy", "reward")) + " |",
              "|---|---|---|---|"]
    for r in res["half_budget"]:
        lines.append(f"| {r['method']} | " + " | ".join(
            f"{ci_text(r[c])} {r[c]['verdict'] or ''}" if c in r else "-"
            for c in ("prob", "accuracy", "reward")) + " |")
    lines += ["", "better / worse: the interval excludes 0; not separable: it holds 0.", "",
              "## Fine-tuning loss", "", "| method | steps per round | warm-up | change of the "
              "mean loss over the last quarter of a round |", "|---|---|---|---|"]
    for arm, d in res["loss"].items():
        ch = d["change_last_quarter"]
        lines.append(f"| {arm} | {d['train_steps']} | {d['warmup']} | "
                     f"{'-' if ch is None else fmt(100 * ch, 1)}% |")
    lines += ["", "Pictures: reward_vs_samples.png (mean and 95% band over seeds), tradeoff.png "
              "(reward against FID per budget), loss_curves.png.", ""]
    return "\n".join(lines)


# ---------------------------------------------------------------- pictures ----
def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_curves(res, path):
    """Bounded reward and accuracy against samples generated: mean and 95% band over seeds."""
    plt = _plt()
    lab = labels(res["task"])
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    ev, seeds = res["evals"], res["reported_seeds"]
    for ax, c in zip(axes, ("prob", "accuracy")):
        for i, a in enumerate(res["arms"]):
            xs, m, lo, hi = [0], [], [], []
            ci0 = stats.t_interval(values(ev, "base", 0, c, seeds))
            pts = [ci0] + [stats.t_interval(values(ev, a["name"], b["rounds"], c, seeds))
                           for b in res["budgets"]]
            xs += [b["samples"] for b in res["budgets"]]
            for ci in pts:
                m.append(np.nan if ci["mean"] is None else ci["mean"])
                lo.append(np.nan if ci["lo"] is None else ci["lo"])
                hi.append(np.nan if ci["hi"] is None else ci["hi"])
            ax.plot(xs, m, "o-" if a["name"] == "GRAFT" else ".-", color=f"C{i}", label=a["name"])
            ax.fill_between(xs, lo, hi, color=f"C{i}", alpha=0.15)
        if res.get("exact_target"):
            # where rejection sampling at alpha = 1 should end: p_ref(x) p(c | x) / Z, sampled
            level = float(np.mean([t[c] for t in res["exact_target"]]))
            ax.axhline(level, color="k", ls="--", lw=1, label="exact target (mean over bases)")
        ax.set(xlabel="samples generated (0: the base)", ylabel=f"{lab[c]} (mean, 95% band)")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=7)
    fig.suptitle(f"{res['task']} ({res['preset']}): {len(seeds)} seeds over "
                 f"{len(res['bases'])} bases", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_tradeoff(res, path):
    """The bounded reward against FID (to the exact target on mnist-tilt) at each budget."""
    plt = _plt()
    lab = labels(res["task"])
    fx = "fid_target" if "fid_target" in res["columns"] else "fid"
    ev, seeds = res["evals"], res["reported_seeds"]
    fig, axes = plt.subplots(1, len(res["budgets"]), figsize=(4.5 * len(res["budgets"]), 4),
                             squeeze=False)
    for ax, b in zip(axes[0], res["budgets"]):
        pts = [("base", "base", 0, "k")] + [(a["name"], a["name"], b["rounds"], f"C{i}")
                                             for i, a in enumerate(res["arms"])]
        for label, arm, k, color in pts:
            cx = stats.t_interval(values(ev, arm, k, fx, seeds))
            cy = stats.t_interval(values(ev, arm, k, "prob", seeds))
            if cx["mean"] is None or cy["mean"] is None:
                continue
            ax.errorbar(cx["mean"], cy["mean"], xerr=cx["half"] or 0, yerr=cy["half"] or 0,
                        fmt="o", color=color, label=label, capsize=3)
        ax.set(xlabel=f"{lab[fx]} (lower is better)", ylabel=lab["prob"],
               title=f"{b['label']}: {b['samples']} samples")
        ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_loss(res, path):
    plt = _plt()
    fig, ax = plt.subplots(figsize=(5.5, 3.8))
    for i, (arm, d) in enumerate(res["loss"].items()):
        ax.plot(d["steps"], d["loss"], ".-", color=f"C{i}", label=arm)
    ax.set(xlabel="fine-tuning step within a round", ylabel="loss (mean over seeds and rounds)",
           title="GRAFT / P-GRAFT fine-tuning loss")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
