"""P-GRAFT: the bridge loss, stitching, the Lemma 4.3 diagnostic (theory check 4), the N_I sweep,
the exact toy2d target, resume, refusals, and the image paths on fabricated MNIST and CelebA."""
import json
import math
import os
import types

import pytest
import torch

import pgraft
import pretrain
from models import DDPM
from test_graft import TINY, exits_2, toy_base


@pytest.fixture(scope="session")
def base(tmp_path_factory):
    return toy_base(tmp_path_factory)


def make_run(base, n_i, extra=()):
    args = pgraft.get_args(["--base", base, "--steps", "50", "--out", "/nonexistent"] + list(extra))
    return pgraft.PGraftRun(args, n_i)


# ---------------------------------------------------------------- the bridge loss ----
def test_bridge_loss_at_n_i_zero_is_the_plain_loss():
    proc = DDPM(200)
    net = torch.nn.Linear(2, 2)
    model = lambda x, t, y: net(x) * (1 + t[:, None])  # noqa: E731
    run = types.SimpleNamespace(N=200, n_i=0, process=proc, args=types.SimpleNamespace(loss="bridge"))
    x = torch.randn(64, 2, generator=torch.Generator().manual_seed(0))
    plain = proc.loss(model, x, None, torch.Generator().manual_seed(1))
    bridge = pgraft.PGraftRun.loss(run, model, x, None, torch.Generator().manual_seed(1))
    assert torch.allclose(plain, bridge)


@pytest.mark.parametrize("kind", ["bridge", "x0"])
def test_bridge_loss_minimiser_is_the_exact_eps_prediction(kind):
    """For Gaussian data N(0, v0 I) the exact eps-prediction is sqrt(1-ab) x / (ab v0 + 1 - ab). Scaling it by c,
    the loss (quadratic in c, common random numbers) must be minimised at c = 1, with X_{N_I} = forward states."""
    N, n_i, v0 = 200, 60, 0.5
    proc = DDPM(N)
    g = torch.Generator().manual_seed(0)
    x0 = math.sqrt(v0) * torch.randn(400_000, 2, generator=g)
    ab_i = proc.alpha_bar[n_i].item()
    kept = x0 if kind == "x0" else math.sqrt(ab_i) * x0 + math.sqrt(1 - ab_i) * torch.randn(x0.shape, generator=g)

    def loss(c):
        def net(x, t, y):
            ab = proc.alpha_bar[(t * N).round().long()].float()[:, None]
            return c * (1 - ab).sqrt() * x / (ab * v0 + 1 - ab)
        run = types.SimpleNamespace(N=N, n_i=n_i, process=proc, args=types.SimpleNamespace(loss=kind))
        return pgraft.PGraftRun.loss(run, net, kept, None, torch.Generator().manual_seed(5)).double()
    l0, l1, l2 = loss(0.0), loss(1.0), loss(2.0)
    a = (l2 - 2 * l1 + l0) / 2
    c_star = (l0 - l1 + a) / (2 * a)
    assert abs(c_star - 1) < 0.02, c_star


def test_stitching_with_the_reference_is_the_reference(base):
    run = make_run(base, 50)
    segs = run.sampler(run.ref_net)
    assert segs[0][1:] == (200, 50) and segs[1][1:] == (50, 0) and segs[1][0] is run.ref_net
    a, a_ni = run.draw(segs, None, 64, torch.Generator().manual_seed(3), keep_ni=True)
    b, _ = run.draw(run.ref_net, None, 64, torch.Generator().manual_seed(3))
    assert torch.allclose(a, b) and a_ni.shape == (64, 2)
    assert make_run(base, 0).sampler(run.ref_net) is run.ref_net


# ---------------------------------------------------------------- theory check 4 ----
def test_lemma_4_3_diagnostic_is_nondecreasing_in_noise(base):
    run = make_run(base, 50)
    res = pgraft.conditional_reward_variance(run, [0, 10, 25, 50, 100, 200], n_states=300, n_cont=8, seed=0)
    v = [m for m, _ in res.values()]
    assert list(res) == [0, 10, 25, 50, 100, 200] and v[0] == 0
    assert all(b >= a for a, b in zip(v, v[1:])), res
    assert v[-1] > 1.0  # at t = N the variance is nearly Var(r) under the model (about 1.7)


# ---------------------------------------------------------------- end to end ----
def test_pgraft_toy2d_matches_its_exact_target_and_writes_everything(base, tmp_path):
    out = tmp_path / "p"
    s = pgraft.main(["--base", base, "--out", str(out), "--n-i", "0.25", "--prompts", "500", "--steps", "50",
                     "--train-steps", "600", "--eval-num", "4000", "--lemma-states", "64"])
    assert s["n_i"] == 50 and s["method"] == "pgraft" and s["loss"] == "bridge"
    assert s["tilt_tv"] < 0.05 and s["tilt_tv_base"] > 0.2, s
    assert s["reward_final"] > s["reward_base"] + 0.5
    for f in ("summary.json", "metrics.jsonl", "args.json", "ckpt.pt", "samples.npy", "samples.png", "lemma43.json",
              "lemma43.png"):
        assert (out / f).exists(), f
    lemma = json.loads((out / "lemma43.json").read_text())["levels"]
    assert set(lemma) == {"20", "50", "100", "200"}


def test_sweep_writes_table_and_plot(base, tmp_path):
    out = tmp_path / "sw"
    s = pgraft.main(["--base", base, "--out", str(out), "--n-i", "0,0.5", "--lemma-levels", "none"] + TINY)
    assert s["n_i"] == [0, 100] and len(s["reward_final"]) == 2 and len(s["tilt_tv"]) == 2
    for f in ("sweep.md", "sweep.csv", "sweep.png", "ni_0/summary.json", "ni_100/summary.json"):
        assert (out / f).exists(), f
    table = (out / "sweep.md").read_text()
    assert "| base |" in table and "| 100 |" in table


def test_loss_x0_resume_and_current(base, tmp_path, capsys):
    out = str(tmp_path / "x")
    common = ["--base", base, "--out", out, "--loss", "x0", "--sample-from", "current", "--lemma-levels", "none"] + TINY
    s1 = pgraft.main(common + ["--rounds", "1"])
    s2 = pgraft.main(common + ["--rounds", "2", "--resume"])
    assert "resumed from" in capsys.readouterr().out
    assert s1["loss"] == "x0" and s2["samples_generated"] == 2 * s1["samples_generated"]
    pool = torch.load(os.path.join(out, "pool_round2.pt"), weights_only=True)
    assert pool["x"].shape == (50, 2)  # --sample-from current: only this round's accepted samples


def test_refusals(base, tmp_path, capsys):
    out = ["--out", str(tmp_path / "r")]
    assert "collapse to GRAFT" in exits_2(pgraft.main, ["--base", base, "--sampler", "ddim", "--eta", "0"] + out, capsys)
    assert "out of range" in exits_2(pgraft.main, ["--base", base, "--n-i", "250"] + out, capsys)
    assert "out of range" in exits_2(pgraft.main, ["--base", base, "--n-i", "1.5"] + out, capsys)
    assert "expected numbers" in exits_2(pgraft.main, ["--base", base, "--n-i", "half"] + out, capsys)
    assert "--K 5" in exits_2(pgraft.main, ["--base", base, "--M", "4", "--K", "5"] + out, capsys)
    assert "continuations" in exits_2(pgraft.main, ["--base", base, "--lemma-continuations", "1"] + out, capsys)


# ---------------------------------------------------------------- image paths ----
def test_pgraft_mnist_fabricated(tmp_path):
    from test_rewards import tiny_mnist_setup
    data, base, clf = tiny_mnist_setup(tmp_path)
    s = pgraft.main(["--task", "mnist", "--data-dir", data, "--base", base,
                     "--classifier", clf, "--out", str(tmp_path / "p"), "--prompts", "10", "--M", "2", "--K", "1",
                     "--train-steps", "2", "--batch-size", "4", "--eval-num", "10", "--steps", "4", "--rounds", "1",
                     "--n-i", "0.5", "--lemma-states", "2", "--lemma-continuations", "2", "--fid-num", "0"])
    assert s["n_i"] == 500 and "accuracy_final" in s and s["fid_final"] is None


def test_pgraft_celeba_fabricated(tmp_path):
    from test_rewards import make_celeba_tree
    from rewards.classifier import train_classifier
    root = make_celeba_tree(str(tmp_path / "celeba"))
    pretrain.main(["--task", "celeba", "--data-dir", root, "--preset", "tiny", "--steps", "2", "--batch-size", "2",
                   "--out", str(tmp_path / "base"), "--num-samples", "2", "--fid-num", "0"])
    clf = str(tmp_path / "clf.pt")
    train_classifier("celeba", out=clf, steps=2, batch_size=4, data_dir=root)
    s = pgraft.main(["--task", "celeba", "--data-dir", root, "--base", str(tmp_path / "base" / "ckpt.pt"),
                     "--reward", "smiling", "--classifier", clf, "--out", str(tmp_path / "p"), "--prompts", "2",
                     "--M", "2", "--K", "1", "--train-steps", "2", "--batch-size", "2", "--eval-num", "2",
                     "--steps", "3", "--n-i", "0.5", "--lemma-states", "2", "--lemma-continuations", "2",
                     "--fid-num", "0", "--rounds", "1"])
    assert s["task"] == "celeba" and s["reward"] == "smiling" and math.isfinite(s["reward_final"])
    assert os.path.exists(tmp_path / "p" / "samples_round1.png")
