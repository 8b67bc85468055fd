"""Every script under torchrun (gloo, 2 processes on the CPU) equals one process: the same accepted
set, the same inverted noise, weights to float tolerance after the same global batches; a run
resumes with any P. The peers broke here (gradients synced wrongly, hangs), so this runs the real
launcher.

Equal results cannot tell sharing the work from repeating it (P ranks that each train on the whole
batch average to the same gradient), so each 2-process run is also checked for what its ranks did:
summary.json's "torchrun" record (harness.Run.shares: the samples each rank drew, the rows its
network trained on) must split the one-process run's work into disjoint shares, and only rank 0 may
write a file (tests/rank_writes.py watches every write) or print the closing ``done:`` line."""

import json
import math
import os
import re
import subprocess
import sys
from collections import Counter

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def launch(script, args, procs, watch=None, others=None):
    """Run ``script`` with ``procs`` processes (> 1: torchrun, through tests/rank_writes.py, which
    reports every write under ROOT and ``watch``); with several, check that rank 0 alone wrote
    files (and did write), but for the paths matching the regex ``others`` (a rank's own chunks),
    and printed the closing line."""
    cmd = [sys.executable] + (
        ["-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={procs}",
         os.path.join("tests", "rank_writes.py")]
        if procs > 1
        else []
    ) + [script] + args
    watched = os.pathsep.join([ROOT] + ([str(watch)] if watch else []))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "RANK_WRITES_WATCH": watched,
           "PYTHONDONTWRITEBYTECODE": "1"}
    p = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600, env=env)
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-3000:]
    if procs > 1:
        writes = [ln.split(maxsplit=4)[1::3] for ln in p.stderr.splitlines()
                  if ln.startswith("rank ") and " writes: " in ln]
        assert any(rank == "0" for rank, _ in writes), "rank 0 wrote nothing"
        wrong = [w for w in writes if w[0] != "0" and not (others and re.search(others, w[1]))]
        assert not wrong, ("only rank 0 may write", wrong)
        # rank 0 speaks for all
        assert [ln[:4] for ln in p.stdout.splitlines()].count("done") == 1, p.stdout[-2000:]
    return p


def items(ranges):
    """The samples of [noise seed, first, end) ranges, as a multiset of (seed, index)."""
    return Counter((seed, i) for seed, lo, hi in ranges for i in range(lo, hi))


def check_shares(one, two, rows, split="sampled"):
    """summary.json's "torchrun" of a 2-process run against a 1-process one: the ranks drew (or
    computed, ``split``) disjoint, non-empty shares whose union is the one process's, and trained
    on ``rows`` = (rank 0's, rank 1's) rows whose counts and squared inputs add up to the one
    process's. Duplication (every rank doing all of it) doubles the rows; two ranks on the same
    share break the sums."""
    t1, t2 = (json.load(open(d / "summary.json"))["torchrun"] for d in (one, two))
    assert t1["world"] == 1 and t2["world"] == 2 and [r["rank"] for r in t2["ranks"]] == [0, 1]
    (whole,), (r0, r1) = t1["ranks"], t2["ranks"]
    for kind in ("sampled", "computed"):
        s0, s1 = items(r0[f"{kind}_ranges"]), items(r1[f"{kind}_ranges"])
        assert not s0.keys() & s1.keys(), f"an item was {kind} by both ranks"
        assert s0 + s1 == items(whole[f"{kind}_ranges"]), f"the ranks' {kind} are not one's"
        assert kind != split or (s0 and s1), f"a rank {kind} nothing"
    assert (r0["sampled"], r1["sampled"]) == tuple(
        items(r["sampled_ranges"]).total() for r in (r0, r1))
    assert (r0["trained_rows"], r1["trained_rows"]) == rows, (r0, r1)
    assert sum(rows) == whole["trained_rows"]
    assert math.isclose(r0["trained_sq"] + r1["trained_sq"], whole["trained_sq"], rel_tol=1e-6)
    assert min(r0["trained_sq"], r1["trained_sq"]) > 0


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
    """The same weights and loss as one process, each rank on its half of every batch. Bugs it
    catches: every rank training on the whole batch (Run.rows None under DDP: the same averaged
    gradient, only the "torchrun" record differs), a launcher that never ran distributed (two
    rank-0 processes: two writers, two closing lines, world 1), a rank other than 0 writing."""
    args = ["--train-steps", "40", "--batch-size", "64", "--eval-samples", "100", "--device", "cpu"]
    launch("pretrain.py", args + ["--out", str(tmp_path / "one"), "--ckpt-every", "20"], 1)
    launch("pretrain.py", args + ["--out", str(tmp_path / "two"), "--ckpt-every", "20"], 2,
           watch=tmp_path)
    # 40 steps of 64 rows: 32 each
    check_shares(tmp_path / "one", tmp_path / "two", rows=(1280, 1280), split=None)
    a, b = (torch.load(tmp_path / d / "ckpt.pt", weights_only=True) for d in ("one", "two"))
    assert max_diff(a, b) < 1e-5 and max_diff(a, b, "ema") < 1e-5
    sa, sb = (json.load(open(tmp_path / d / "summary.json")) for d in ("one", "two"))
    assert abs(sa["final_loss"] - sb["final_loss"]) < 1e-5


def test_graft_and_pgraft_two_processes_equal_one(bases, tmp_path):
    """The same accepted set, weights and reward as one process, each rank on its own half of
    every batch. Bugs it catches: every rank training on the whole batch (Run.rows None under DDP:
    DDP's average is then the same gradient, only the "torchrun" record differs), a sampling shard
    drawn twice or skipped, a rank other than 0 writing or printing, gradients synced wrongly."""
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
        launch(script, args + extra + ["--out", str(two)], 2, watch=tmp_path)
        # 20 steps of 64 rows: 32 each (Run.rows); the 50 x 4 samples and 200 evaluation ones
        # (twice) in batches of 48 split 3 + 2 batches
        check_shares(one, two, rows=(640, 640))
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
    """A threshold that keeps 3 of the 256 samples, all drawn by rank 1: every rank holds the
    gathered set, so both train on the same few samples and finish. The accepted set is checked
    against the reference's samples drawn here (the round's noise, r >= tau by the reward itself)
    and the 2-process weights against one process's. Bugs it catches: a rank keeping only the
    samples it drew (no gather: rank 0 holds none and hangs, or trains on another set), the
    threshold applied wrongly (a kept sample below tau, or one above it dropped), both ranks on
    the whole batch."""
    from common import generator, load_base
    from rewards.toy2d import LinearReward

    base = str(bases / "ddpm" / "ckpt.pt")
    args = ["--base", base, "--prompts", "64", "--M", "4", "--accept", "threshold", "--tau", "4.0",
            "--train-steps", "5", "--batch-size", "4", "--eval-samples", "100", "--sample-steps",
            "10", "--sample-batch", "32", "--device", "cpu"]
    one, two = tmp_path / "one", tmp_path / "two"
    launch("graft.py", args + ["--out", str(one)], 1)
    launch("graft.py", args + ["--out", str(two)], 2, watch=tmp_path)
    # the round's 256 samples of the reference: batch k's noise from generator(seed 1 x 100003 + k)
    ref, process, _ = load_base(base, "cpu")
    xs = []
    for k in range(8):
        gen = generator(1 * 100_003 + k, "cpu")
        z = torch.randn(32, 2, generator=gen)
        xs.append(process.sample(ref, z, generator=gen, eta=1.0, num_steps=10)[0])
    x0 = torch.cat(xs)
    keep = LinearReward()(x0) >= 4.0
    # a handful (3), all in rank 1's batches 4..7: rank 0 drew none of what it trains on
    assert 0 < keep.sum() <= 8 and not keep[:128].any(), keep.nonzero()
    for d in (one, two):
        assert torch.equal(torch.load(d / "pool_round1.pt", weights_only=True)["x"], x0[keep])
        assert json.load(open(d / "summary.json"))["samples_generated"] == 256
    a, b = (torch.load(d / "ckpt.pt", weights_only=True) for d in (one, two))
    start = torch.load(base, weights_only=True)
    assert max_diff(a, b) < 1e-5 and max_diff(a, b, "ema") < 1e-5
    assert max_diff(a, start) > 1e-4  # the few samples were trained on
    # 5 steps of 4 rows: 2 each
    check_shares(one, two, rows=(10, 10))


def test_inverse_noise_two_processes_equal_one(bases, tmp_path):
    """The same inverted noise and corrector weights as one process. Bugs it catches: every rank
    inverting every chunk (ChunkCache ignoring the rank: rank 1 writes chunks 0 and 2 too), every
    rank training on the whole batch (the "torchrun" record), a rank other than 0 writing
    anything but its chunks, or printing."""
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
    # rank 1 writes its own chunk (and makes the folder when it comes first), nothing else
    launch("inverse_noise.py", args + ["--out", str(tmp_path / "two")], 2, watch=tmp_path,
           others=r"two/inverted(/chunk_00001\.pt(\.tmp\.\d+)?)?$")
    # 20 corrector steps of 64 rows: 32 each; the 3 chunks of 200 split 0, 2 | 1
    check_shares(tmp_path / "one", tmp_path / "two", rows=(640, 640), split="computed")
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
    minibatch splits 5 + 4). Bug it catches: every rank training on the whole minibatch at weight
    1 (``a, b = 0, len(i); weight = 1.0``): DDP's average is the same gradient, so the weights
    agree and only the ranks' rows (the "torchrun" record) tell; a rank other than 0 writing."""
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
    launch("ddpo.py", args + ["--out", str(tmp_path / "two")], 2, watch=tmp_path)
    # 32 chains x 5 actions = 160 transitions: 17 minibatches of 9 (5 + 4) and one of 7 (4 + 3)
    check_shares(tmp_path / "one", tmp_path / "two", rows=(17 * 5 + 4, 17 * 4 + 3))
    a, b = (torch.load(tmp_path / d / "ckpt.pt", weights_only=True) for d in ("one", "two"))
    assert max_diff(a, b) < 1e-5
    sa, sb = (json.load(open(tmp_path / d / "summary.json")) for d in ("one", "two"))
    assert abs(sa["reward_final"] - sb["reward_final"]) < 1e-4 * max(1.0, abs(sa["reward_final"]))
