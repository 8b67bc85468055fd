"""P-GRAFT: the bridge loss, stitching, the Lemma 4.3 diagnostic (theory check 4), the N_I sweep,
the exact toy2d target, resume, refusals, and the image paths on fabricated MNIST and CelebA."""

import json
import math
import os

import pytest
import torch

import pgraft
import pretrain
from models import DDPM
from test_graft import TINY, exits_2, toy_base


@pytest.fixture(scope="session")
def base(tmp_path_factory):
    return toy_base(tmp_path_factory)


# ---------------------------------------------------------------- the bridge loss ----
def test_bridge_loss_at_n_i_zero_is_the_plain_loss():
    proc = DDPM(200)
    net = torch.nn.Linear(2, 2)

    def model(x, t, y):
        return net(x) * (1 + t[:, None])

    x = torch.randn(64, 2, generator=torch.Generator().manual_seed(0))
    plain = proc.loss(model, x, None, torch.Generator().manual_seed(1))
    bridge = pgraft.bridge_loss(model, x, None, 0, proc, torch.Generator().manual_seed(1))
    assert torch.equal(
        plain, bridge
    )  # draw for draw: what makes pgraft --n-i 0 reproduce graft exactly


@pytest.mark.parametrize("v0", [0.05, 4.0])
def test_bridge_loss_minimiser_is_the_exact_eps_prediction(v0):
    """Data N(0, v0 I), v0 far from 1: the exact eps-prediction is sqrt(1-ab) x / (ab v0 + 1 - ab).
    Scaled by c, the bridge loss on forward states X_{N_I} (quadratic in c, common random numbers)
    is minimised at c = 1 within 0.005, the x0 loss on X_0 too; the naive loss (plain eps loss on
    X_{N_I} with full-chain coefficients) is not."""
    N, n_i = 200, 60
    proc = DDPM(N)
    g = torch.Generator().manual_seed(0)
    x0 = math.sqrt(v0) * torch.randn(400_000, 2, generator=g)
    ab_i = proc.alpha_bar[n_i].item()
    x_ni = math.sqrt(ab_i) * x0 + math.sqrt(1 - ab_i) * torch.randn(x0.shape, generator=g)

    def c_star(kind):
        def loss(c):
            def net(x, t, y):
                ab = proc.alpha_bar[(t * N).round().long()].float()[:, None]
                return c * (1 - ab).sqrt() * x / (ab * v0 + 1 - ab)

            gen = torch.Generator().manual_seed(5)
            if kind == "bridge":
                return pgraft.bridge_loss(net, x_ni, None, n_i, proc, gen).double()
            return proc.loss(
                net, x0 if kind == "x0" else x_ni, None, gen, n_range=(n_i + 1, N)
            ).double()

        l0, l1, l2 = loss(0.0), loss(1.0), loss(2.0)
        a = (l2 - 2 * l1 + l0) / 2
        return ((l0 - l1 + a) / (2 * a)).item()

    assert abs(c_star("bridge") - 1) < 0.005
    assert abs(c_star("x0") - 1) < 0.005
    assert abs(c_star("naive") - 1) > 0.03


def test_stitched_sampler_switches_networks_at_n_i(base):
    """Two different networks: the stitched run equals net A for N -> N_I then net B for N_I -> 0,
    and differs from a switch one step early or late (an off-by-one at N_I shows)."""
    from common import load_base

    ref, proc, _ = load_base(base, "cpu")
    other = torch.nn.Linear(2, 2)

    def net_b(x, t, y):
        return ref(x, t, y) + other(x) * 0.5

    N, n_i = proc.N, 50
    z = torch.randn(64, 2, generator=torch.Generator().manual_seed(3))

    def run(segments):
        return proc.sample(segments, z, generator=torch.Generator().manual_seed(4), num_steps=None)[
            0
        ]

    stitched = run([(ref, N, n_i), (net_b, n_i, 0)])
    g = torch.Generator().manual_seed(4)
    mid, _ = proc.sample(ref, z, None, n_i, None, g)
    manual, _ = proc.sample(net_b, mid, n_i, 0, None, g)
    assert torch.equal(stitched, manual)
    for k in (n_i - 1, n_i + 1):
        assert not torch.allclose(stitched, run([(ref, N, k), (net_b, k, 0)]))


def test_n_i_off_the_grid_is_put_on_it_the_same_way_everywhere(base):
    """N_I = 37 is not on the 10-step grid (200, 180, ..., 20, 0): a run that stops at N_I, a
    stitched run through it and a run that only asks for X_{N_I} take the same steps, so training
    (which keeps X_{N_I}) and every evaluation (stitched) sample one chain. Bug it catches: the
    final table sampling on the plain grid while training inserted N_I (issue 17, item 4)."""
    from common import load_base

    ref, proc, _ = load_base(base, "cpu")
    N, n_i, S = proc.N, 37, 10
    z = torch.randn(64, 2, generator=torch.Generator().manual_seed(3))

    def gen():
        return torch.Generator().manual_seed(4)

    stitched, at = proc.sample([(ref, N, n_i), (ref, n_i, 0)], z, generator=gen(), num_steps=S,
                               return_at=[n_i])
    asked, at2 = proc.sample(ref, z, generator=gen(), num_steps=S, return_at=[n_i])
    g = gen()
    mid, _ = proc.sample(ref, z, None, n_i, None, g, num_steps=S)
    two, _ = proc.sample(ref, mid, n_i, 0, None, g, num_steps=S)
    assert torch.equal(stitched, two) and torch.equal(asked, two)
    assert torch.equal(at[n_i], mid) and torch.equal(at2[n_i], mid)
    plain, _ = proc.sample(ref, z, generator=gen(), num_steps=S)
    assert not torch.allclose(plain, two)
    assert proc.grid(N, 0, S, keep=[n_i])[-3:] == [n_i, 20, 0]


def test_one_step_continuation_is_refused_naming_the_nearest_good_n_i(base, tmp_path, capsys):
    """On toy2d (N = 200) with 10 sampler steps the continuation 20 -> 0 is one deterministic step
    (sigma = 0 into step 0): that P-GRAFT is GRAFT. Refused in one line naming 40, the nearest N_I
    whose continuation draws noise; 40 itself runs and records 1 random continuation step."""
    out = ["--out", str(tmp_path / "r"), "--sample-steps", "10", "--lemma-levels", "none"]
    for spec in ("0.1", "20", "5"):
        msg = exits_2(pgraft.main, ["--base", base, "--n-i", spec] + out, capsys)
        assert "deterministic" in msg and "--n-i 40" in msg, msg
    assert not os.path.exists(tmp_path / "r")
    s = pgraft.main(["--base", base, "--n-i", "0.2"] + out + TINY)
    assert s["n_i"] == 40 and s["random_continuation_steps"] == 1


def test_n_i_by_noise_level(base, tmp_path):
    """abar:A picks the step whose abar is nearest A, and the summary records N_I and abar_{N_I}."""
    from common import load_base, parse_steps

    _, proc, _ = load_base(base, "cpu")
    n = parse_steps("abar:0.5,0.9", proc, "--n-i")
    ab = proc.alpha_bar
    for target, step in zip((0.5, 0.9), n):
        assert abs(ab[step] - target) <= (ab - target).abs().min() + 1e-12
        assert abs(ab[step] - target) < 0.01
    assert n[0] > n[1]
    s = pgraft.main(["--base", base, "--out", str(tmp_path / "a"), "--n-i", "abar:0.5",
                     "--lemma-levels", "none"] + TINY)
    assert s["n_i"] == n[0] and abs(s["abar_n_i"] - float(ab[n[0]])) < 1e-12


# ---------------------------------------------------------------- theory check 4 ----
def test_lemma_4_3_diagnostic_is_nondecreasing_in_noise(base):
    from common import load_base
    from eval.lemma43 import conditional_reward_variance
    from rewards.toy2d import LinearReward
    from tasks import get_task

    ref, proc, _ = load_base(base, "cpu")
    res = conditional_reward_variance(
        ref,
        proc,
        get_task("toy2d"),
        LinearReward(),
        [0, 10, 25, 50, 100, 200],
        n_states=300,
        n_cont=8,
        generator=torch.Generator().manual_seed(0),
        sample_steps=50,
    )
    v = [m for m, _ in res.values()]
    assert list(res) == [0, 10, 25, 50, 100, 200] and v[0] == 0
    assert all(b >= a for a, b in zip(v, v[1:])), res
    assert v[-1] > 1.0  # at t = N the variance is nearly Var(r) under the model (about 1.7)


# ---------------------------------------------------------------- the deliberate copy of graft.py
# ----
def test_pgraft_at_n_i_zero_reproduces_graft_exactly(base, tmp_path):
    """The round loop is copied in pgraft.py on purpose; at N_I = 0 (default flags otherwise) it
    must give graft.py's accepted set, fine-tuned weights, EMA and summary exactly, over two
    rounds."""
    import graft

    args = ["--base", base] + TINY + ["--rounds", "2"]
    sg = graft.main(args + ["--out", str(tmp_path / "g")])
    sp = pgraft.main(args + ["--out", str(tmp_path / "p"), "--n-i", "0", "--lemma-levels", "none"])
    pg, pp = (torch.load(tmp_path / d / "pool_round2.pt", weights_only=True) for d in ("g", "p"))
    assert torch.equal(pg["x"], pp["x"])
    cg, cp = (torch.load(tmp_path / d / "ckpt.pt", weights_only=True) for d in ("g", "p"))
    for part in ("model", "ema"):
        for k in cg[part]:
            assert torch.equal(cg[part][k], cp[part][k]), (part, k)
    skip = {"wall_time_s", "method", "checkpoint"}
    assert {k: v for k, v in sg.items() if k not in skip} == {
        k: v for k, v in sp.items() if k in sg and k not in skip
    }
    assert {k: v for k, v in pgraft.TASK_DEFAULTS.items()} == {
        t: dict(d, lemma_states=pgraft.TASK_DEFAULTS[t]["lemma_states"])
        for t, d in graft.TASK_DEFAULTS.items()
    }


# ---------------------------------------------------------------- end to end ----
def test_pgraft_toy2d_matches_its_exact_target_and_writes_everything(base, tmp_path):
    out = tmp_path / "p"
    s = pgraft.main(
        [
            "--base",
            base,
            "--out",
            str(out),
            "--n-i",
            "0.25",
            "--prompts",
            "1000",
            "--sample-steps",
            "50",
            "--train-steps",
            "600",
            "--eval-samples",
            "8000",
            "--lemma-states",
            "64",
        ]
    )
    assert s["n_i"] == 50 and s["method"] == "pgraft" and s["loss"] == "bridge"
    assert s["tilt_tv"] < 0.05 and s["tilt_tv_base"] > 0.2, s
    assert s["reward_final"] > s["reward_base"] + 0.5
    for f in (
        "summary.json",
        "metrics.jsonl",
        "args.json",
        "ckpt.pt",
        "samples.npy",
        "samples.png",
        "lemma43.json",
        "lemma43.png",
    ):
        assert (out / f).exists(), f
    lemma = json.loads((out / "lemma43.json").read_text())["levels"]
    assert set(lemma) == {"20", "50", "100", "200"}


def test_sweep_writes_table_and_plot(base, tmp_path, capsys):
    """The sweep's table and summary hold each N_I's run: its numbers are those runs' summaries,
    abar_{N_I} and the random continuation steps are the chain's (computed here), and the N_I = 0
    row is GRAFT's run with the same flags, reward for reward. Bugs it catches: N_I not handed to
    the runs (equal rows), rows or columns mixed up, a table written from stale numbers."""
    import graft
    from common import load_base
    from experiments import pgraft_sweep

    out = tmp_path / "sw"
    s = pgraft_sweep.main(
        ["--base", base, "--out", str(out), "--n-i", "0,0.5", "--lemma-levels", "none"] + TINY
    )
    assert s["n_i"] == [0, 100]
    runs = [json.loads((out / f"ni_{n}" / "summary.json").read_text()) for n in (0, 100)]
    for k in ("reward_final", "tilt_tv", "tilt_tv_base", "abar_n_i"):
        assert s[k] == [r[k] for r in runs], k
    g = graft.main(["--base", base, "--out", str(tmp_path / "g")] + TINY)
    assert runs[0]["reward_final"] == g["reward_final"] != runs[1]["reward_final"]
    _, proc, _ = load_base(base, "cpu")
    grid = proc.grid(proc.N, 0, 10)
    random = [sum(proc.sigma(a, b, 1.0) > 0 for a, b in zip(grid, grid[1:]) if a <= n)
              for n in (0, 100)]
    assert random == [0, 4]
    for n, r, steps in zip((0, 100), runs, random):
        row = s["sweep"][str(n)]
        assert row["abar_n_i"] == float(proc.alpha_bar[n]) and row["n_i_frac"] == n / 200
        assert row["random_continuation_steps"] == steps
        assert row["reward_final"] == r["reward_final"]
    csv = [line.split(",") for line in (out / "sweep.csv").read_text().splitlines()]
    col = csv[0].index("reward_final")
    assert [float(c[col]) for c in csv[1:]] == [
        round(v, 4) for v in [runs[0]["reward_base"]] + s["reward_final"]]
    for f in ("sweep.md", "sweep.png"):
        assert (out / f).exists(), f
    table = (out / "sweep.md").read_text()
    assert "| base |" in table and "| 100 |" in table and "tilt_tv_base" in table
    # one target per N_I
    assert s["tilt_tv_base"][0] != s["tilt_tv_base"][1]
    # a list is the sweep's, not pgraft.py's; a repeated N_I is refused before any run
    capsys.readouterr()
    assert "experiments.pgraft_sweep" in exits_2(
        pgraft.main, ["--base", base, "--n-i", "0,0.5", "--out", str(tmp_path / "l")], capsys
    )
    assert "twice" in exits_2(
        pgraft_sweep.main, ["--base", base, "--n-i", "0.25,50", "--out", str(tmp_path / "t")],
        capsys,
    )
    assert not os.path.exists(tmp_path / "l") and not os.path.exists(tmp_path / "t")


def test_loss_x0_resume_and_current(base, tmp_path, capsys, monkeypatch):
    """--loss x0 keeps the accepted X_0 (the pool: their reward, computed here, is the round's
    logged accepted mean) and trains them with the plain eps loss at n in (N_I, N] only: every
    training loss is recomputed here from its batch and the generator's state (n above N_I, eps,
    x_n = sqrt(abar) X_0 + sqrt(1 - abar) eps, the network), and the bridge loss is never called.
    Stopped after round 1 and resumed, it ends with the uninterrupted 2-round run's weights, pool
    and rewards (--sample-from current: round 2 samples the model so far; the pool holds only that
    round's). Bugs it catches: --loss x0 ignored (the bridge loss on X_{N_I}), the x0 loss over
    the whole chain, a resume that loses the model or the EMA."""
    from rewards.toy2d import LinearReward

    real, calls = DDPM.loss, []

    def spy(self, model, x0, y=None, generator=None, n_range=None, rows=None):
        state = generator.get_state()
        loss = real(self, model, x0, y, generator, n_range, rows)
        g = torch.Generator().set_state(state)
        n = torch.randint(n_range[0], n_range[1] + 1, (len(x0),), generator=g)
        eps = torch.randn(x0.shape, generator=g)
        ab = self.alpha_bar[n].float()[:, None]
        with torch.no_grad():
            pred = model(ab.sqrt() * x0 + (1 - ab).sqrt() * eps, n.float() / self.N, y)
        assert torch.allclose(loss.detach(), (pred - eps).pow(2).mean(), rtol=1e-5, atol=1e-7)
        calls.append(n_range)
        return loss

    def no_bridge(*a, **k):
        raise AssertionError("the bridge loss under --loss x0")

    monkeypatch.setattr(DDPM, "loss", spy)
    monkeypatch.setattr(pgraft, "bridge_loss", no_bridge)
    flags = ["--base", base, "--loss", "x0", "--sample-from", "current", "--lemma-levels",
             "none"] + TINY
    out = tmp_path / "x"
    s1 = pgraft.main(flags + ["--out", str(out), "--rounds", "1"])
    s2 = pgraft.main(flags + ["--out", str(out), "--rounds", "2", "--resume"])
    assert "resumed from" in capsys.readouterr().out
    straight = pgraft.main(flags + ["--out", str(tmp_path / "s"), "--rounds", "2"])
    n_i, N = s1["n_i"], 200
    assert n_i == 50 and calls == [(n_i + 1, N)] * 20 * 4  # 20 steps, 4 rounds in all
    assert s2["samples_generated"] == 2 * s1["samples_generated"] == 400
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    rounds = [r for r in rows if "reward_accepted_mean" in r]
    assert [r["round"] for r in rounds] == [1, 2]
    pool = torch.load(out / "pool_round2.pt", weights_only=True)["x"]
    assert pool.shape == (50, 2)  # --sample-from current: only this round's accepted samples
    assert math.isclose(LinearReward()(pool).mean().item(), rounds[1]["reward_accepted_mean"],
                        rel_tol=1e-5)
    a, b = (torch.load(d / "ckpt.pt", weights_only=True) for d in (out, tmp_path / "s"))
    for part in ("model", "ema"):
        for k in a[part]:
            assert torch.equal(a[part][k], b[part][k]), (part, k)
    assert torch.equal(pool, torch.load(tmp_path / "s" / "pool_round2.pt")["x"])
    assert s2["reward_final"] == straight["reward_final"]


def test_refusals(base, tmp_path, capsys):
    out = ["--out", str(tmp_path / "r")]
    assert "collapse to GRAFT" in exits_2(
        pgraft.main, ["--base", base, "--sampler", "ddim", "--eta", "0"] + out, capsys
    )
    assert "out of range" in exits_2(pgraft.main, ["--base", base, "--n-i", "250"] + out, capsys)
    assert "out of range" in exits_2(pgraft.main, ["--base", base, "--n-i", "1.5"] + out, capsys)
    assert "expected numbers" in exits_2(
        pgraft.main, ["--base", base, "--n-i", "half"] + out, capsys
    )
    assert "--sample-steps" in exits_2(
        pgraft.main, ["--base", base, "--sample-steps", "500"] + out, capsys
    )
    assert "--sampler ddpm" in exits_2(pgraft.main, ["--base", base, "--eta", "0.5"] + out, capsys)
    assert "--cond-drop" in exits_2(pgraft.main, ["--base", base, "--cfg-scale", "2"] + out, capsys)
    assert not os.path.exists(tmp_path / "r")  # refused before anything was written
    assert "--K 5" in exits_2(pgraft.main, ["--base", base, "--M", "4", "--K", "5"] + out, capsys)
    assert "continuations" in exits_2(
        pgraft.main, ["--base", base, "--lemma-continuations", "1"] + out, capsys
    )


# ---------------------------------------------------------------- image paths ----
def kept_states_check(out, base, n_i, s):
    """The pool of a P-GRAFT image run holds the kept states X_{N_I}: still noisy (beyond the
    [-1, 1] of a clipped X_0) and as spread as abar_{N_I} says; abar_{N_I} is the base's own."""
    from common import load_base

    _, proc, _ = load_base(base, "cpu")
    ab = float(proc.alpha_bar[n_i])
    assert s["n_i"] == n_i and s["abar_n_i"] == ab
    pool = torch.load(out / "pool_round1.pt", weights_only=True)
    x = pool["x"]
    # X_{N_I} = sqrt(ab) X_0 + sqrt(1 - ab) eps with |X_0| <= 1: at ab < 0.5 most of it is noise
    assert ab < 0.5 and x.abs().max() > 1.5
    assert abs(x.std().item() - 1) < 0.25, x.std()
    return pool


def test_pgraft_mnist_fabricated(tmp_path):
    """Class-conditional MNIST at N_I = 0.5 N, checked against direct computations: the pool holds
    the kept states X_{N_I} (kept_states_check), one per label (K = 1 of each label's M = 2), the
    accuracy is a fraction of the 10 evaluation samples, no FID at --fid-samples 0. Bugs it
    catches: the pool keeping X_0 (or clamped states) instead of X_{N_I}, accepted samples paired
    with the wrong labels, N_I or abar_{N_I} taken from another schedule."""
    from test_rewards import tiny_mnist_setup

    data, base, clf = tiny_mnist_setup(tmp_path)
    s = pgraft.main(
        [
            "--task",
            "mnist",
            "--data-dir",
            data,
            "--base",
            base,
            "--classifier",
            clf,
            "--out",
            str(tmp_path / "p"),
            "--prompts",
            "10",
            "--M",
            "2",
            "--K",
            "1",
            "--train-steps",
            "2",
            "--batch-size",
            "4",
            "--eval-samples",
            "10",
            "--sample-steps",
            "4",
            "--rounds",
            "1",
            "--n-i",
            "0.5",
            "--lemma-states",
            "2",
            "--lemma-continuations",
            "2",
            "--fid-samples",
            "0",
        ]
    )
    pool = kept_states_check(tmp_path / "p", base, 500, s)
    assert pool["x"].shape == (10, 1, 32, 32) and sorted(pool["y"].tolist()) == list(range(10))
    assert s["fid_final"] is None and s["fid_base"] is None
    assert abs(s["accuracy_final"] * 10 - round(s["accuracy_final"] * 10)) < 1e-6


def test_pgraft_celeba_fabricated(tmp_path):
    """CelebA (an unconditional base, the classifier's smiling reward) at N_I = 0.5 N: the pool
    holds the kept 64 x 64 states X_{N_I} (kept_states_check), K = 1 of M = 2 for each of the 2
    prompts, and no conditions. Bugs it catches: the pool keeping X_0 (or clamped states), N_I or
    abar_{N_I} taken from another schedule."""
    from rewards.classifier import train_classifier
    from test_rewards import make_celeba_tree

    root = make_celeba_tree(str(tmp_path / "celeba"))
    pretrain.main(
        [
            "--task",
            "celeba",
            "--data-dir",
            root,
            "--preset",
            "tiny",
            "--train-steps",
            "2",
            "--batch-size",
            "2",
            "--out",
            str(tmp_path / "base"),
            "--eval-samples",
            "2",
            "--fid-samples",
            "0",
        ]
    )
    clf = str(tmp_path / "clf.pt")
    train_classifier("celeba", out=clf, steps=2, batch_size=4, data_dir=root)
    s = pgraft.main(
        [
            "--task",
            "celeba",
            "--data-dir",
            root,
            "--base",
            str(tmp_path / "base" / "ckpt.pt"),
            "--reward",
            "smiling",
            "--classifier",
            clf,
            "--out",
            str(tmp_path / "p"),
            "--prompts",
            "2",
            "--M",
            "2",
            "--K",
            "1",
            "--train-steps",
            "2",
            "--batch-size",
            "2",
            "--eval-samples",
            "2",
            "--sample-steps",
            "3",
            "--n-i",
            "0.5",
            "--lemma-states",
            "2",
            "--lemma-continuations",
            "2",
            "--fid-samples",
            "0",
            "--rounds",
            "1",
        ]
    )
    assert s["task"] == "celeba" and s["reward"] == "smiling" and math.isfinite(s["reward_final"])
    assert os.path.exists(tmp_path / "p" / "samples_round1.png")
    base = str(tmp_path / "base" / "ckpt.pt")
    pool = kept_states_check(tmp_path / "p", base, torch.load(base)["process"]["n_steps"] // 2, s)
    assert pool["x"].shape == (2, 3, 64, 64) and "y" not in pool
