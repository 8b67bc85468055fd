"""Every script under torchrun (gloo, 2 processes on the CPU) equals one process: the same accepted
set, the same inverted noise, weights to float tolerance after the same global batches; a run
resumes with any P. The peers broke here (gradients synced wrongly, hangs), so this runs the real
launcher."""

import json
import os
import subprocess
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def launch(script, args, procs):
    cmd = (
        [sys.executable]
        + (
            ["-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={procs}"]
            if procs > 1
            else []
        )
        + [script]
        + args
    )
    p = subprocess.run(
        cmd,
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-3000:]
    return p


def max_diff(a, b, part="model"):
    return max((a[part][k] - b[part][k]).abs().max().item() for k in a[part])


@pytest.fixture(scope="module")
def bases(tmp_path_factory):
    root = tmp_path_factory.mktemp("bases")
    common = ["--batch-size", "64", "--eval-samples", "100", "--device", "cpu", "--ckpt-every", "0"]
    launch("pretrain.py", ["--train-steps", "60", "--out", str(root / "ddpm")] + common, 1)
    launch(
        "pretrain.py",
        ["--train-steps", "40", "--model", "flow", "--out", str(root / "flow")] + common,
        1,
    )
    return root


def test_pretrain_two_processes_equal_one(bases, tmp_path):
    args = ["--train-steps", "40", "--batch-size", "64", "--eval-samples", "100", "--device", "cpu"]
    launch("pretrain.py", args + ["--out", str(tmp_path / "one"), "--ckpt-every", "20"], 1)
    launch("pretrain.py", args + ["--out", str(tmp_path / "two"), "--ckpt-every", "20"], 2)
    a, b = (torch.load(tmp_path / d / "ckpt.pt", weights_only=True) for d in ("one", "two"))
    assert max_diff(a, b) < 1e-5 and max_diff(a, b, "ema") < 1e-5
    sa, sb = (json.load(open(tmp_path / d / "summary.json")) for d in ("one", "two"))
    assert abs(sa["final_loss"] - sb["final_loss"]) < 1e-5


def test_graft_and_pgraft_two_processes_equal_one(bases, tmp_path):
    args = [
        "--base",
        str(bases / "ddpm" / "ckpt.pt"),
        "--prompts",
        "50",
        "--M",
        "4",
        "--K",
        "1",
        "--train-steps",
        "20",
        "--batch-size",
        "64",
        "--eval-samples",
        "200",
        "--sample-steps",
        "10",
        "--sample-batch",
        "48",
        "--device",
        "cpu",
    ]
    for script, extra in [
        ("graft.py", []),
        ("pgraft.py", ["--n-i", "0.5", "--lemma-levels", "none"]),
    ]:
        one, two = tmp_path / f"{script}-1", tmp_path / f"{script}-2"
        launch(script, args + extra + ["--out", str(one)], 1)
        p = launch(script, args + extra + ["--out", str(two)], 2)
        assert p.stdout.count("done:") == 1  # rank 0 speaks for both
        pa, pb = (torch.load(d / "pool_round1.pt", weights_only=True) for d in (one, two))
        assert torch.equal(pa["x"], pb["x"])  # the same accepted set
        a, b = (torch.load(d / "ckpt.pt", weights_only=True) for d in (one, two))
        assert max_diff(a, b) < 1e-5 and max_diff(a, b, "ema") < 1e-5
        sa, sb = (json.load(open(d / "summary.json")) for d in (one, two))
        assert sa["samples_generated"] == sb["samples_generated"]
        assert abs(sa["reward_final"] - sb["reward_final"]) < 1e-4
    # resume with another P: round 1 by two processes, round 2 by one, equals two rounds by one
    # process
    g1, g2 = tmp_path / "graft.py-1", tmp_path / "graft.py-2"
    launch("graft.py", args + ["--out", str(g1), "--rounds", "2", "--resume"], 1)
    launch("graft.py", args + ["--out", str(g2), "--rounds", "2", "--resume"], 1)
    a, b = (torch.load(d / "ckpt.pt", weights_only=True) for d in (g1, g2))
    assert a["step"] == b["step"] == 2 and max_diff(a, b) < 1e-5


def test_no_hang_when_almost_nothing_is_accepted(bases, tmp_path):
    """A threshold that keeps a handful of samples, all drawn by one rank: every rank holds the
    gathered set, so both train on the same few samples and finish."""
    args = [
        "--base",
        str(bases / "ddpm" / "ckpt.pt"),
        "--prompts",
        "64",
        "--M",
        "4",
        "--accept",
        "threshold",
        "--tau",
        "2.0",
        "--train-steps",
        "5",
        "--batch-size",
        "4",
        "--eval-samples",
        "100",
        "--sample-steps",
        "10",
        "--sample-batch",
        "32",
        "--device",
        "cpu",
        "--out",
        str(tmp_path / "t"),
    ]
    launch("graft.py", args, 2)
    s = json.load(open(tmp_path / "t" / "summary.json"))
    assert s["samples_generated"] == 256


def test_inverse_noise_two_processes_equal_one(bases, tmp_path):
    args = [
        "--base",
        str(bases / "flow" / "ckpt.pt"),
        "--device",
        "cpu",
        "--sample-steps",
        "5",
        "--invert-samples",
        "600",
        "--chunk-size",
        "200",
        "--train-steps",
        "20",
        "--batch-size",
        "64",
        "--eval-samples",
        "200",
        "--base-sample-steps",
        "5",
        "--corrector-sample-steps",
        "1",
    ]
    launch("inverse_noise.py", args + ["--out", str(tmp_path / "one")], 1)
    launch("inverse_noise.py", args + ["--out", str(tmp_path / "two")], 2)
    for c in range(3):  # chunks 0 and 2 by rank 0, chunk 1 by rank 1
        a, b = (
            torch.load(tmp_path / d / "inverted" / f"chunk_{c:05d}.pt", weights_only=True)
            for d in ("one", "two")
        )
        assert torch.equal(a["z"], b["z"])
    a, b = (
        torch.load(tmp_path / d / "corrector" / "ckpt.pt", weights_only=True)
        for d in ("one", "two")
    )
    assert max_diff(a, b) < 1e-5


def test_batch_that_does_not_split_is_refused(bases, tmp_path):
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node=2",
        "pretrain.py",
        "--batch-size",
        "63",
        "--train-steps",
        "5",
        "--device",
        "cpu",
        "--out",
        str(tmp_path / "x"),
    ]
    p = subprocess.run(
        cmd,
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    assert p.returncode != 0 and "--batch-size 63 must divide by the 2 processes" in p.stderr
    assert p.stderr.count("error: --batch-size 63") == 1  # one line, from rank 0
    assert not (tmp_path / "x").exists()


def test_ddpo_two_processes_equal_one(bases, tmp_path):
    """DDPO's chains are sharded and gathered like GRAFT's samples; each PPO minibatch is split
    over the ranks and weighted so that DDP's average gradient is the whole minibatch's (a 9-row
    minibatch splits 5 + 4)."""
    args = [
        "--base",
        str(bases / "ddpm" / "ckpt.pt"),
        "--prompts",
        "8",
        "--M",
        "4",
        "--rounds",
        "1",
        "--sample-steps",
        "6",
        "--batch-size",
        "9",
        "--inner-epochs",
        "1",
        "--eval-samples",
        "100",
        "--sample-batch",
        "16",
        "--device",
        "cpu",
    ]
    launch("ddpo.py", args + ["--out", str(tmp_path / "one")], 1)
    launch("ddpo.py", args + ["--out", str(tmp_path / "two")], 2)
    a, b = (torch.load(tmp_path / d / "ckpt.pt", weights_only=True) for d in ("one", "two"))
    assert max_diff(a, b) < 1e-5
    sa, sb = (json.load(open(tmp_path / d / "summary.json")) for d in ("one", "two"))
    assert abs(sa["reward_final"] - sb["reward_final"]) < 1e-4 * max(1.0, abs(sa["reward_final"]))
