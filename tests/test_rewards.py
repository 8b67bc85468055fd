"""Rewards: registry, exact toy2d CDF and targets, classifier training/caching, JPEG, clean
errors."""

import gzip
import math
import os
import pickle

import numpy as np
import pytest
import torch

import common
import rewards
from rewards.acceptance import AcceptRule
from rewards.toy2d import LinearReward, tilted_mode_weights
from tasks import TOY, get_task


def test_linear_reward_and_exact_cdf():
    rew = rewards.get_reward("linear", get_task("toy2d"))
    x = TOY.sample(200_000, torch.Generator().manual_seed(0))
    r = rew(x)
    assert r.shape == (200_000,) and r.dtype == torch.float32
    a = math.radians(247.5)
    assert torch.allclose(r, x[:, 0] * math.cos(a) + x[:, 1] * math.sin(a), atol=1e-5)
    assert torch.allclose(rewards.get_reward("linear:0", get_task("toy2d"))(x), x[:, 0])
    v = torch.linspace(-2.5, 2.5, 11, dtype=torch.float64)
    emp = (r.double()[None] <= v[:, None]).double().mean(1)
    assert (emp - rew.cdf(v)).abs().max() < 0.005
    rot = rewards.get_reward("linear:90", get_task("toy2d"))
    assert torch.allclose(rot(x), x[:, 1], atol=1e-5)


@pytest.mark.parametrize("angle", [0.0, 247.5])
def test_tilted_weights_match_monte_carlo(angle):
    """The analytic GRAFT target equals top-K selection applied to exact mixture samples."""
    rew, rule = LinearReward(angle), AcceptRule("topk", 8, 2)
    g = torch.Generator().manual_seed(1)
    x, k = TOY.sample(100_000 * 8, g, return_modes=True)
    mask = rule.select(rew(x).view(-1, 8), g).reshape(-1)
    hist = torch.bincount(k[mask], minlength=8).double() / mask.sum()
    target = tilted_mode_weights(rule.prob, rew)
    assert abs(target.sum().item() - 1) < 1e-9
    assert 0.5 * (hist - target).abs().sum() < 0.01
    assert 0.5 * (target - TOY.weights).abs().sum() > 0.3  # the tilt is substantial ...
    assert (target > 0.03).sum() >= 4  # ... and leaves mass on several modes


def test_unknown_and_wrong_task_rewards_are_usage_errors():
    with pytest.raises(common.UsageError, match="unknown reward"):
        rewards.get_reward("nope", get_task("toy2d"))
    with pytest.raises(common.UsageError, match="image task"):
        rewards.get_reward("jpeg", get_task("toy2d"))
    with pytest.raises(common.UsageError, match="toy2d"):
        rewards.get_reward("linear", get_task("mnist"))
    with pytest.raises(common.UsageError, match="unconditional"):
        rewards.get_reward("digit", get_task("mnist"), conditional=False)
    with pytest.raises(common.UsageError, match="NaN"):
        rewards.check_finite(torch.tensor([0.0, float("nan")]), "x")


def test_jpeg_rewards_order_smooth_and_noisy_images():
    task = get_task("mnist")
    g = torch.Generator().manual_seed(0)
    flat = torch.full((2, 1, 32, 32), -1.0)
    noisy = torch.rand((2, 1, 32, 32), generator=g) * 2 - 1
    x = torch.cat([flat, noisy])
    comp, incomp = (
        rewards.get_reward("jpeg", task),
        rewards.get_reward("jpeg-incompressibility", task),
    )
    rc, ri = comp(x), incomp(x)
    assert rc.shape == (4,) and torch.allclose(rc, -ri)
    assert rc[:2].min() > rc[2:].max()  # the flat image compresses better
    rgb = torch.rand((3, 3, 64, 64), generator=g) * 2 - 1
    assert rewards.get_reward("jpeg", get_task("celeba"))(rgb).shape == (3,)


# ---------------------------------------------------------------- fabricated data ----
def make_mnist_pickle(folder, n=300, seed=0):
    """A tiny mnist.pkl.gz whose digits are learnable: class c lights up a block at a c-dependent
    place."""
    rng = np.random.default_rng(seed)

    def split(m):
        y = rng.integers(0, 10, m)
        x = rng.uniform(0, 0.1, (m, 28, 28)).astype(np.float32)
        for i, c in enumerate(y):
            r0, c0 = 2 + 8 * (c // 4), 2 + 6 * (c % 4)
            x[i, r0 : r0 + 6, c0 : c0 + 6] = 1.0
        return x.reshape(m, 784), y.astype(np.int64)

    os.makedirs(folder, exist_ok=True)
    with gzip.open(os.path.join(folder, "mnist.pkl.gz"), "wb") as f:
        pickle.dump((split(n), split(n // 3), split(n // 3)), f)
    return folder


def make_celeba_tree(root, n=12, seed=0):
    """A fabricated aligned-CelebA layout: JPEGs, the 40-attribute list and the partition file."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    names = [
        "5_o_Clock_Shadow",
        "Arched_Eyebrows",
        "Attractive",
        "Bags_Under_Eyes",
        "Bald",
        "Bangs",
        "Big_Lips",
        "Big_Nose",
        "Black_Hair",
        "Blond_Hair",
        "Blurry",
        "Brown_Hair",
        "Bushy_Eyebrows",
        "Chubby",
        "Double_Chin",
        "Eyeglasses",
        "Goatee",
        "Gray_Hair",
        "Heavy_Makeup",
        "High_Cheekbones",
        "Male",
        "Mouth_Slightly_Open",
        "Mustache",
        "Narrow_Eyes",
        "No_Beard",
        "Oval_Face",
        "Pale_Skin",
        "Pointy_Nose",
        "Receding_Hairline",
        "Rosy_Cheeks",
        "Sideburns",
        "Smiling",
        "Straight_Hair",
        "Wavy_Hair",
        "Wearing_Earrings",
        "Wearing_Hat",
        "Wearing_Lipstick",
        "Wearing_Necklace",
        "Wearing_Necktie",
        "Young",
    ]
    os.makedirs(os.path.join(root, "img_align_celeba"), exist_ok=True)
    attr_lines, part_lines = [str(n), " ".join(names)], []
    for i in range(n):
        fn = f"{i + 1:06d}.jpg"
        Image.fromarray(rng.integers(0, 255, (218, 178, 3), dtype=np.uint8)).save(
            os.path.join(root, "img_align_celeba", fn)
        )
        attr_lines.append(fn + " " + " ".join(str(v) for v in rng.choice([-1, 1], 40)))
        part_lines.append(f"{fn} {0 if i < n - 4 else (1 if i < n - 2 else 2)}")
    with open(os.path.join(root, "list_attr_celeba.txt"), "w") as f:
        f.write("\n".join(attr_lines) + "\n")
    with open(os.path.join(root, "list_eval_partition.txt"), "w") as f:
        f.write("\n".join(part_lines) + "\n")
    return root


def test_mnist_classifier_trains_caches_and_scores(tmp_path, capsys):
    from rewards import classifier

    data = make_mnist_pickle(str(tmp_path / "mnist"))
    path = str(tmp_path / "clf.pt")
    info = classifier.train_classifier("mnist", out=path, steps=60, batch_size=32, data_dir=data)
    assert (
        os.path.isfile(path) and info["accuracy"] > 0.5
    )  # held-out accuracy reported and learnable
    assert "held-out accuracy" in capsys.readouterr().out
    mtime = os.path.getmtime(path)
    rew = rewards.get_reward(
        "digit", get_task("mnist"), conditional=True, data_dir=data, classifier_path=path
    )
    assert os.path.getmtime(path) == mtime  # reused, not retrained
    ds = get_task("mnist").dataset("test", data)
    x, y = ds.tensors[0][:50], ds.tensors[1][:50]
    r = rew(x, y)
    assert r.shape == (50,) and (r <= 0).all()
    assert rew.metrics(x, y)["accuracy"] > 0.5
    r3 = rewards.get_reward("digit:3", get_task("mnist"), data_dir=data, classifier_path=path)(x)
    assert torch.allclose(r3, rew(x, torch.full((50,), 3)))


def test_missing_classifier_is_trained_first(tmp_path, capsys, monkeypatch):
    from rewards import classifier

    data = make_mnist_pickle(str(tmp_path / "mnist"))
    monkeypatch.setitem(classifier.SETTINGS, "mnist", dict(classifier.SETTINGS["mnist"], steps=10))
    monkeypatch.chdir(tmp_path)
    rewards.get_reward("digit:1", get_task("mnist"), data_dir=data)
    assert "training it now" in capsys.readouterr().out
    assert os.path.isfile(tmp_path / "runs" / "rewards" / "mnist-classifier.pt")
    with pytest.raises(Exception, match="is missing; train it with"):
        classifier.load_classifier(
            "mnist", path=str(tmp_path / "absent.pt"), train_if_missing=False
        )


def test_celeba_attribute_classifier_and_rewards(tmp_path):
    from rewards import classifier

    root = make_celeba_tree(str(tmp_path / "celeba"))
    path = str(tmp_path / "celeba-clf.pt")
    info = classifier.train_classifier("celeba", out=path, steps=3, batch_size=4, data_dir=root)
    assert info["attr_names"][31] == "Smiling" and 0 <= info["accuracy"] <= 1
    task = get_task("celeba")
    x = torch.rand(3, 3, 64, 64) * 2 - 1
    smile = rewards.get_reward("smiling", task, data_dir=root, classifier_path=path)
    both = rewards.get_reward("smiling+eyeglasses", task, data_dir=root, classifier_path=path)
    assert smile(x).shape == (3,) and (both(x) <= smile(x) + 1e-6).all()
    cond = rewards.get_reward(
        "attributes", task, conditional=True, data_dir=root, classifier_path=path
    )
    y = torch.zeros(3, 40)
    y[:, 31] = 1
    assert torch.allclose(cond(x, y), smile(x), atol=1e-6)
    assert set(cond.metrics(x, y)) == {"accuracy", "all_correct"}
    with pytest.raises(common.UsageError, match="unknown CelebA attribute"):
        rewards.get_reward("smirking", task, data_dir=root, classifier_path=path)


def test_classifier_cli_runs(tmp_path):
    from rewards import classifier

    data = make_mnist_pickle(str(tmp_path / "mnist"))
    out = str(tmp_path / "c.pt")
    classifier.main(
        [
            "--task",
            "mnist",
            "--data-dir",
            data,
            "--train-steps",
            "5",
            "--out",
            out,
            "--device",
            "cpu",
        ]
    )
    assert os.path.isfile(out)
    assert math.isfinite(classifier.load_classifier("mnist", path=out)[1]["accuracy"])


def test_heldout_accuracy_scores_exactly_the_limit(tmp_path):
    """--eval-samples 100 used to score every image of each 500-batch but divide by 100
    (accuracy 1.11)."""
    from rewards import classifier

    data = make_mnist_pickle(str(tmp_path / "mnist"))
    ds = get_task("mnist").dataset("test", data)
    model = classifier.Classifier()
    full, n_full = classifier.heldout_accuracy(model, ds, "cpu", False, batch_size=7)
    acc, n = classifier.heldout_accuracy(model, ds, "cpu", False, batch_size=7, limit=10)
    assert n == 10 and 0 <= acc <= 1 and n_full == len(ds)
    x, y = ds.tensors[0][:10], ds.tensors[1][:10]
    assert acc == pytest.approx((model(x).argmax(1) == y).float().mean().item())


def test_classifier_cli_refuses_bad_input_and_divergence(tmp_path, capsys):
    from rewards import classifier

    data = make_mnist_pickle(str(tmp_path / "mnist"))
    out = str(tmp_path / "c.pt")
    for argv, words in [
        (["--lr", "inf"], "--lr"),
        (["--train-steps", "0"], "--train-steps"),
        (["--out", str(tmp_path)], "is a folder"),
        (["--device", "tpu9"], "--device"),
        (["--lr", "1e9", "--train-steps", "200"], "diverged"),
    ]:
        base = ["--task", "mnist", "--data-dir", data, "--out", out] + (
            [] if "--device" in argv else ["--device", "cpu"]
        )
        with pytest.raises(SystemExit) as e:
            classifier.main(base + argv)
        err = capsys.readouterr().err.strip()
        assert (
            e.value.code == 2 and err.startswith("error:") and "\n" not in err and words in err
        ), (argv, err)
    assert not os.path.exists(out)  # nothing was written, the diverged run included


def tiny_mnist_setup(tmp_path, n=120, clf_steps=10):
    """Fabricated MNIST, a 3-step tiny base and a briefly trained classifier: (data_dir, base,
    classifier)."""
    import pretrain
    from rewards.classifier import train_classifier

    data = make_mnist_pickle(str(tmp_path / "mnist"), n=n)
    pretrain.main(
        [
            "--task",
            "mnist",
            "--data-dir",
            data,
            "--preset",
            "tiny",
            "--train-steps",
            "3",
            "--batch-size",
            "8",
            "--out",
            str(tmp_path / "base"),
            "--eval-samples",
            "4",
            "--fid-samples",
            "0",
        ]
    )
    clf = str(tmp_path / "clf.pt")
    train_classifier("mnist", out=clf, steps=clf_steps, batch_size=16, data_dir=data)
    return data, str(tmp_path / "base" / "ckpt.pt"), clf
