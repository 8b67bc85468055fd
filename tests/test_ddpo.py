"""DDPO (the policy-gradient baseline): the recorded policy log-densities, the PPO-clip objective at
the first inner step, per-condition advantages, the reward rising on toy2d, resume, refusals and
divergence."""

import json
import math
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

import common
import ddpo
from models.diffusion import gaussian_log_prob
from test_graft import exits_2, toy_base

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# 32 x 8 = 256 chains of 9 stochastic steps per round: 2304 transitions, 9 optimiser steps
TINY = [
    "--prompts",
    "32",
    "--M",
    "8",
    "--sample-steps",
    "10",
    "--batch-size",
    "256",
    "--eval-samples",
    "300",
]
ONE = TINY + ["--rounds", "1"]


@pytest.fixture(scope="session")
def base(tmp_path_factory):
    return toy_base(tmp_path_factory)


def chains_of(base, steps=20, eta=1.0, n=300):
    net, process, _ = common.load_base(base, "cpu")
    grid = process.grid(process.N, 0, steps)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, 2, generator=g)
    return net, process, grid, x, ddpo.rollout(process, net, x, None, grid, eta, g)


# ---------------------------------------------------------------- the MDP ----
@pytest.mark.parametrize("eta", [1.0, 0.5])
def test_recorded_log_probs_equal_the_networks(base, eta):
    """log pi(x_m | x_n) recorded while sampling equals the network's recomputation on the stored
    pairs, shuffled into minibatches that mix steps (the training path); the draws are DDPM.sample's
    and the density is the Gaussian's."""
    net, process, grid, x, (states, logp, x0) = chains_of(base, eta=eta)
    T = len(grid) - 2  # every step but the last (to n = 0) is an action
    assert states.shape == (300, T + 1, 2) and logp.shape == (300, T)
    assert logp.dtype == torch.float64
    g = torch.Generator().manual_seed(0)
    same, _ = process.sample(net, torch.randn(300, 2, generator=g), None, 0, None, g, eta, 20)
    assert torch.equal(x0, same)
    n_all, m_all = torch.tensor(grid[:T]), torch.tensor(grid[1 : T + 1])
    i = torch.arange(300).repeat_interleave(T)
    j = torch.arange(T).repeat(300)
    perm = torch.randperm(len(i), generator=torch.Generator().manual_seed(1))
    i, j = i[perm], j[perm]
    actions = list(zip(grid[:T], grid[1 : T + 1]))
    sigma, log_sigma = ddpo.action_sigmas(process, actions, eta, "cpu")
    with torch.no_grad():
        for lo in range(0, len(i), 777):
            a, b = i[lo : lo + 777], j[lo : lo + 777]
            lp, mean = ddpo.transition_logp(
                process,
                net,
                states[a, b],
                states[a, b + 1],
                n_all[b],
                m_all[b],
                sigma[b],
                log_sigma[b],
                None,
                eta,
            )
            assert torch.allclose(lp, logp[a, b], rtol=0, atol=1e-5)
            normal = torch.distributions.Normal(mean.double(), sigma[b, None])
            ref = normal.log_prob(states[a, b + 1].double()).sum(1)
            assert torch.allclose(lp, ref, rtol=0, atol=1e-9)
    assert math.isclose(process.sigma(grid[-2], 0, eta), 0.0)  # the last step has no density


def test_first_inner_step_ratio_is_one_and_clipping_is_inactive(base, tmp_path, monkeypatch):
    """In the run itself: on the first optimiser step the ratio pi_theta / pi_old is exactly 1, so
    the clipped objective's gradient equals the unclipped one (and REINFORCE's -A / B), even at
    DDPO's clip range 1e-4; later steps move the ratio."""
    seen = []
    real = ddpo.ppo_loss

    def spy(logp, logp_old, adv, clip_range):
        loss, ratio = real(logp, logp_old, adv, clip_range)
        g_clip = torch.autograd.grad(loss, logp, retain_graph=True)[0]
        g_plain = torch.autograd.grad(
            (-adv * torch.exp(logp - logp_old)).mean(), logp, retain_graph=True
        )[0]
        seen.append((ratio.detach(), g_clip, g_plain, adv))
        return loss, ratio

    monkeypatch.setattr(ddpo, "ppo_loss", spy)
    ddpo.main(["--base", base, "--out", str(tmp_path / "o"), "--clip-range", "1e-4"] + ONE)
    ratio, g_clip, g_plain, adv = seen[0]
    assert torch.equal(ratio, torch.ones_like(ratio))
    assert torch.equal(g_clip, g_plain) and torch.allclose(g_clip, -adv / len(adv))
    assert (seen[-1][0] - 1).abs().max() > 1e-4  # the policy has moved by the last step


def test_ppo_clip_and_kl_formulas():
    logp_old = torch.zeros(4, dtype=torch.float64)
    logp = torch.tensor([0.5, 0.5, -0.5, -0.5], dtype=torch.float64, requires_grad=True)
    adv = torch.tensor([1.0, -1.0, 1.0, -1.0], dtype=torch.float64)
    loss, ratio = ddpo.ppo_loss(logp, logp_old, adv, 0.2)
    (g,) = torch.autograd.grad(loss, logp)
    # pessimistic bound: a ratio beyond the clip in the advantage's favour gets no gradient
    assert g[0] == 0 and g[3] == 0 and g[1] != 0 and g[2] != 0
    assert math.isclose(loss.item(), (-1.2 + math.exp(0.5) - math.exp(-0.5) + 0.8) / 4)
    mean, mean_ref = torch.randn(5, 2), torch.randn(5, 2)
    sigma = torch.rand(5, 1, dtype=torch.float64) + 0.1
    kl = torch.distributions.kl_divergence(
        torch.distributions.Normal(mean.double(), sigma),
        torch.distributions.Normal(mean_ref.double(), sigma),
    )
    assert torch.allclose(ddpo.kl_to_reference(mean, mean_ref, sigma), kl.sum(1))
    at_mean = -2 * math.log(0.5) - math.log(2 * math.pi)  # two dims, sigma 0.5
    assert torch.allclose(gaussian_log_prob(mean, mean, 0.5), torch.full((5,), at_mean).double())


def test_per_condition_stats_follow_ddpo():
    """DDPO's per-prompt stat tracking: a condition's own buffer (this round included) once it holds
    min_count rewards, the round's statistics before; the buffer keeps the last buffer_size."""
    st = ddpo.PerConditionStats(buffer_size=4, min_count=3)
    r = np.array([1.0, 2.0, 3.0, 10.0, 20.0])
    adv = st.advantages(["a", "a", "b", "b", "b"], r)
    np.testing.assert_allclose(adv[:2], (r[:2] - r.mean()) / (r.std() + 1e-6))  # a: 2 < 3
    b = r[2:]
    np.testing.assert_allclose(adv[2:], (b - b.mean()) / (b.std() + 1e-6))  # b: its own 3
    adv = st.advantages(["a", "a"], np.array([5.0, 7.0]))
    buf = np.array([1.0, 2.0, 5.0, 7.0])
    np.testing.assert_allclose(adv, (np.array([5.0, 7.0]) - buf.mean()) / (buf.std() + 1e-6))
    st.advantages(["a"], np.array([9.0]))
    again = ddpo.PerConditionStats(4, 3, st.state())
    assert list(again.buffers["a"]) == [2.0, 5.0, 7.0, 9.0] and again.buffers["a"].maxlen == 4
    assert ddpo.condition_keys(None, 2) == ["all", "all"]
    assert ddpo.condition_keys(torch.tensor([3, 1]), 2) == ["3", "1"]
    assert ddpo.condition_keys(torch.tensor([[1.0, 0.0], [0.0, 1.0]]), 2) == ["10", "01"]


# ---------------------------------------------------------------- the round loop ----
def test_ddpo_raises_the_toy2d_reward(base, tmp_path):
    """Three rounds of 512 chains: the evaluation reward (fixed noise, 2000 samples) rises every
    round and ends > 0.5 above the base's. Seeds 0-3 gave +0.80 to +0.93 (the noise of the
    evaluation is about 0.03)."""
    out = tmp_path / "d"
    s = ddpo.main(
        [
            "--base",
            base,
            "--out",
            str(out),
            "--prompts",
            "64",
            "--M",
            "8",
            "--sample-steps",
            "20",
            "--batch-size",
            "512",
            "--rounds",
            "3",
            "--eval-samples",
            "2000",
        ]
    )
    assert s["reward_final"] > s["reward_base"] + 0.5, s
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    evals = [s["reward_base"]] + [r["eval_reward_mean"] for r in rows if "eval_reward_mean" in r]
    assert all(b > a for a, b in zip(evals, evals[1:])), evals
    on_disk = json.loads((out / "summary.json").read_text())
    assert on_disk["method"] == "ddpo" and on_disk["samples_generated"] == 3 * 512
    for k in ("task", "rounds", "reward", "reward_base", "reward_final", "mode_hist_final"):
        assert k in on_disk
    rnd = [r for r in rows if "eval_reward_mean" in r][0]
    for k in (
        "reward_all_mean",
        "loss",
        "clipfrac",
        "advantage_abs_mean",
        "optimiser_steps",
        "samples_generated",
    ):
        assert k in rnd
    assert rnd["optimiser_steps"] == 19  # 512 chains x 19 stochastic steps / 512
    assert np.load(out / "samples.npy").shape == (2000, 2) and (out / "samples.png").exists()


def test_resume_continues_after_last_round(base, tmp_path, capsys):
    """Round 1, then --resume to round 2, equals two rounds in one go (weights, tracker, RNG);
    exercised with the KL penalty, two inner epochs and half of the steps per epoch."""
    more = TINY + ["--kl-coef", "0.1", "--inner-epochs", "2", "--timestep-fraction", "0.5"]
    out = str(tmp_path / "r")
    s1 = ddpo.main(["--base", base, "--out", out, "--rounds", "1"] + more)
    assert s1["samples_generated"] == 256
    s2 = ddpo.main(["--base", base, "--out", out, "--rounds", "2", "--resume"] + more)
    assert "resumed from" in capsys.readouterr().out
    assert s2["samples_generated"] == 512 and s2["reward_base"] == s1["reward_base"]
    rows = [json.loads(x) for x in open(os.path.join(out, "metrics.jsonl"))]
    assert [r["round"] for r in rows if "eval_reward_mean" in r] == [1, 2]
    assert all(r["kl_ref"] > 0 for r in rows if "kl_ref" in r)
    straight = ddpo.main(["--base", base, "--out", str(tmp_path / "s"), "--rounds", "2"] + more)
    assert straight["reward_final"] == s2["reward_final"]
    s3 = ddpo.main(["--base", base, "--out", out, "--rounds", "2", "--resume"] + more)
    assert s3["samples_generated"] == 512  # nothing left to do
    ddpo.main(["--base", base, "--out", out, "--rounds", "3", "--resume", "--lr", "1e-4"] + more)
    ckpt = torch.load(os.path.join(out, "ckpt.pt"), weights_only=True)
    assert ckpt["optimizer"]["param_groups"][0]["lr"] == 1e-4  # --lr may change on resume


def test_evaluation_is_graft_s(base, tmp_path):
    """The base is evaluated on graft.py's conditions and noise: the same reward_base."""
    import graft

    flags = ["--base", base, "--sample-steps", "10", "--eval-samples", "300", "--rounds", "1"]
    g = graft.main(flags + ["--out", str(tmp_path / "g"), "--prompts", "8", "--train-steps", "2"])
    d = ddpo.main(flags + ["--out", str(tmp_path / "d"), "--prompts", "8", "--batch-size", "64"])
    assert d["reward_base"] == g["reward_base"]


# ---------------------------------------------------------------- refusals ----
def test_bad_input_exits_2_before_touching_out(base, tmp_path, capsys):
    out = tmp_path / "x"
    cases = [
        (["--sampler", "ddim", "--eta", "0"], "deterministic"),
        (["--clip-range", "0"], "--clip-range"),
        (["--inner-epochs", "0"], "--inner-epochs"),
        (["--timestep-fraction", "1.5"], "--timestep-fraction"),
        (["--eta", "0.5"], "--sampler ddpm"),
        (["--min-count", "40", "--buffer-size", "20"], "--min-count"),
        (["--sample-steps", "1"], "no stochastic step"),
        (["--sample-steps", "201"], "exceeds the chain"),
    ]
    for argv, what in cases:
        err = exits_2(ddpo.main, ["--base", base, "--out", str(out)] + argv, capsys)
        assert what in err, err
        assert not out.exists()


def test_cli_exit_code_2(tmp_path):
    p = subprocess.run(
        [
            sys.executable,
            "ddpo.py",
            "--sampler",
            "ddim",
            "--eta",
            "0",
            "--out",
            str(tmp_path / "o"),
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    assert p.returncode == 2 and p.stderr.strip().count("\n") == 0 and "--eta" in p.stderr
    assert not (tmp_path / "o").exists()


def test_divergence_exits_2_without_nan(base, tmp_path, capsys):
    """Round 1 at a sane --lr, then --resume --rounds 2 --lr 1e8 (--lr may change on resume):
    round 2 diverges, exits 2 naming --lr, and leaves round 1's files as they were: the same
    checkpoint bytes (round 1), metrics.jsonl with round 1's rows and no NaN or Infinity, round
    1's summary. Bugs it catches: a diverged loss logged (as NaN, or at all), the exploded weights
    saved over the good checkpoint, a summary rewritten for a diverged run, and nothing written at
    all (the files are required, not checked only when present)."""
    import hashlib

    out = tmp_path / "dv"
    flags = ["--base", base, "--out", str(out), "--grad-clip", "0"] + TINY
    ddpo.main(flags + ["--rounds", "1"])
    sha = hashlib.sha256((out / "ckpt.pt").read_bytes()).hexdigest()
    rows, summary = (out / "metrics.jsonl").read_text(), (out / "summary.json").read_text()
    err = exits_2(ddpo.main, flags + ["--rounds", "2", "--resume", "--lr", "1e8"], capsys)
    assert "diverged" in err and "--lr 1e+08" in err, err
    assert hashlib.sha256((out / "ckpt.pt").read_bytes()).hexdigest() == sha
    assert torch.load(out / "ckpt.pt", weights_only=True)["step"] == 1
    assert (out / "summary.json").read_text() == summary  # round 1's, not rewritten
    json.loads(summary, parse_constant=lambda c: pytest.fail(f"summary.json: {c}"))
    text = (out / "metrics.jsonl").read_text()
    assert text == rows and "NaN" not in text and "Infinity" not in text
    lines = [json.loads(ln, parse_constant=lambda c: pytest.fail(f"metrics.jsonl: {c}"))
             for ln in text.splitlines()]
    assert [r["round"] for r in lines if "eval_reward_mean" in r] == [1]
    json.loads((out / "args.json").read_text(), parse_constant=lambda c: pytest.fail(c))


# ---------------------------------------------------------------- image path ----
def test_ddpo_mnist_fabricated(tmp_path, monkeypatch):
    """Class-conditional images end to end, 10 labels x M = 4 chains of 3 actions, checked against
    direct computations: every transition's advantage is its chain's reward normalised by its own
    label's mean and std (--min-count 4: every label has its own statistics), clipped; every
    optimiser step's loss is the PPO-clip objective of the recorded and recomputed log-densities
    (at clip range 1e-4 later steps clip, where it differs from REINFORCE's); the logged round
    loss is their mean; the stat buffers hold each label's rewards; the first step's ratio is 1 (a
    sum over 1024 pixels through a UNet). Bugs it catches: advantages normalised over all chains
    (global, not per condition), plain REINFORCE without the clip (in ppo_loss or around it), the
    buffers keyed by the wrong condition, a logged loss that is not the trained one."""
    import rewards
    from test_rewards import tiny_mnist_setup

    data, base, clf = tiny_mnist_setup(tmp_path)
    steps, scored = [], []
    real_loss, real_score = ddpo.ppo_loss, rewards.score

    def spy(logp, logp_old, adv, clip_range):
        loss, ratio = real_loss(logp, logp_old, adv, clip_range)
        steps.append((logp.detach(), logp_old, adv, clip_range, loss.detach(), ratio.detach()))
        return loss, ratio

    def score_spy(reward, x, y=None, batch_size=1000):
        r = real_score(reward, x, y, batch_size)
        scored.append((r, y))
        return r

    monkeypatch.setattr(ddpo, "ppo_loss", spy)
    monkeypatch.setattr(rewards, "score", score_spy)
    out = tmp_path / "d"
    s = ddpo.main(["--task", "mnist", "--data-dir", data, "--base", base, "--classifier", clf,
                   "--out", str(out), "--prompts", "10", "--M", "4", "--min-count", "4",
                   "--sample-steps", "4", "--batch-size", "20", "--clip-range", "1e-4", "--lr",
                   "1e-3", "--eval-samples", "10", "--rounds", "1"])
    assert s["reward"] == "digit" and s["samples_generated"] == 40
    # --fid-samples -1 is 0 on the CPU: no FID; the accuracy is a fraction of 10 samples
    assert s["fid_base"] is None and s["fid_final"] is None
    assert abs(s["accuracy_final"] * 10 - round(s["accuracy_final"] * 10)) < 1e-6
    assert (out / "samples_base.png").exists() and (out / "samples_round1.png").exists()
    (r, y), = [(r, y) for r, y in scored if len(r) == 40]  # the round's chains
    r, y = r.double(), y.cpu()
    assert sorted(y.tolist()) == sorted(list(range(10)) * 4)
    # per-condition advantages, computed here; each chain's 3 actions carry its advantage
    expect = torch.empty(40, dtype=torch.float64)
    for c in range(10):
        rc = r[y == c]
        expect[y == c] = (rc - rc.mean()) / (rc.std(unbiased=False) + 1e-6)
    expect = expect.clamp(-5, 5).repeat_interleave(3).sort().values
    got = torch.cat([a.cpu() for _, _, a, *_ in steps]).sort().values
    assert torch.allclose(got, expect, rtol=0, atol=1e-9), (got - expect).abs().max()
    # every step's loss is the PPO-clip objective; clipping is active on some later step
    assert len(steps) == 6  # 120 transitions / 20
    gaps = []
    for logp, logp_old, adv, c, loss, ratio in steps:
        rho = torch.exp(logp - logp_old)
        ppo = torch.maximum(-adv * rho, -adv * rho.clamp(1 - c, 1 + c)).mean()
        assert torch.allclose(loss, ppo, rtol=0, atol=1e-12) and torch.equal(ratio, rho)
        gaps.append((ppo - (-adv * rho).mean()).abs().item())
    assert gaps[0] == 0 and max(gaps) > 1e-7, gaps
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    (rnd,) = [x for x in rows if "eval_reward_mean" in x]
    mean = sum(step[4].item() * len(step[2]) for step in steps) / 120
    assert math.isclose(rnd["loss"], mean, rel_tol=1e-9, abs_tol=1e-12), (rnd["loss"], mean)
    stats = torch.load(out / "ckpt.pt", weights_only=True)["extra"]["stats"]
    assert {k: v for k, v in stats.items()} == {str(c): r[y == c].tolist() for c in range(10)}
    # exactly 0 on the 2-core CPU; convolutions may pick other kernels for other batch sizes
    assert (steps[0][5] - 1).abs().max() < 1e-6
