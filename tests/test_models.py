"""Networks, processes and checkpoints: shapes, conventions, identities, determinism, inversion."""

import os

import pytest
import torch

from models import (
    DDPM,
    EMA,
    PRESETS,
    CheckpointError,
    RectifiedFlow,
    TimeMLP,
    count_params,
    load_checkpoint,
    model_from_checkpoint,
    save_checkpoint,
    unet_from_preset,
)


# ---------------------------------------------------------------- networks ----
@pytest.mark.parametrize(
    "preset,res,ch,lo,hi",
    [
        ("tiny", 32, 1, 0.05e6, 1e6),
        ("mnist", 32, 1, 0.5e6, 3e6),
        ("celeba64", 64, 3, 10e6, 40e6),
        ("base256", 256, 3, 60e6, 70e6),
        ("corrector256", 256, 3, 14e6, 18e6),
    ],
)
def test_preset_parameter_counts(preset, res, ch, lo, hi):
    # base256 ~65M and corrector256 ~16M are the paper's sizes (section 4)
    assert lo <= count_params(unet_from_preset(preset, res, ch)) <= hi
    assert set(PRESETS) >= {"tiny", "mnist", "celeba64", "base256", "corrector256"}


@pytest.mark.parametrize(
    "preset,res,ch,cond",
    [
        ("tiny", 32, 1, {}),
        ("tiny", 16, 3, {"num_classes": 10}),
        ("mnist", 32, 1, {"num_classes": 10}),
        ("tiny", 32, 3, {"cond_dim": 40}),
    ],
)
def test_unet_shapes_and_conditions(preset, res, ch, cond):
    net = unet_from_preset(preset, res, ch, **cond)
    x, t = torch.randn(3, ch, res, res), torch.rand(3)
    y = None
    if cond.get("num_classes"):
        y = torch.tensor([0, 9, -1])  # -1 is the null label
    if cond.get("cond_dim"):
        y = torch.randint(-1, 2, (3, 40)).float()
    assert net(x, t, y).shape == x.shape
    assert net(x, t, None).shape == x.shape  # dropping the condition (classifier-free guidance)


def test_condition_changes_output_and_null_label_is_none():
    torch.manual_seed(0)
    net = TimeMLP(num_classes=3)
    for p in net.parameters():  # zero-initialised layers would hide the condition
        torch.nn.init.normal_(p, std=0.3)
    x, t = torch.randn(4, 2), torch.rand(4)
    a = net(x, t, torch.zeros(4, dtype=torch.long))
    b = net(x, t, torch.ones(4, dtype=torch.long))
    assert not torch.allclose(a, b)
    assert torch.allclose(net(x, t, torch.full((4,), -1)), net(x, t, None))


# ---------------------------------------------------------------- DDPM ----
@pytest.mark.parametrize("schedule", ["linear", "cosine"])
def test_schedule_identities(schedule):
    d = DDPM(1000, schedule)
    ab = d.alpha_bar
    assert ab.shape == (1001,) and ab[0] == 1.0  # step 0 is data
    assert torch.all(ab[1:] < ab[:-1])  # monotone: noise grows with n
    assert ab[-1] < 1e-3  # step N is (nearly) pure noise
    assert DDPM(200, schedule).alpha_bar[-1] < 1e-3  # any N reaches noise


def test_q_sample_moments():
    d, g = DDPM(100), torch.Generator().manual_seed(0)
    n = torch.full((200_000,), 40)
    x0 = torch.full((200_000, 1), 0.7)
    xn = d.q_sample(x0, n, torch.randn(x0.shape, generator=g))
    ab = d.alpha_bar[40].item()
    assert abs(xn.mean().item() - ab**0.5 * 0.7) < 0.01
    assert abs(xn.var().item() - (1 - ab)) < 0.01


def test_loss_draws_steps_from_subrange_only():
    d, seen = DDPM(100), []

    def net(x, t, y=None):
        seen.append(t)
        return torch.zeros_like(x)

    d.loss(net, torch.randn(512, 2), generator=torch.Generator().manual_seed(0), n_range=(61, 100))
    n = torch.cat(seen) * 100
    assert n.min() >= 61 - 1e-4 and n.max() <= 100 + 1e-4


def _net():
    torch.manual_seed(0)
    net = TimeMLP(hidden=32, depth=1)
    for p in net.parameters():
        torch.nn.init.normal_(p, std=0.2)
    return net.eval()


@pytest.mark.parametrize("num_steps,eta", [(None, 1.0), (25, 0.5), (25, 0.0)])
def test_segments_stitch_into_full_run(num_steps, eta):
    d, net = DDPM(100), _net()
    z = torch.randn(64, 2, generator=torch.Generator().manual_seed(1))
    full, saved = d.sample(
        net,
        z,
        y=None,
        generator=torch.Generator().manual_seed(2),
        eta=eta,
        num_steps=num_steps,
        return_at=[60],
    )
    g = torch.Generator().manual_seed(2)
    mid, _ = d.sample(net, z, start=100, stop=60, generator=g, eta=eta, num_steps=num_steps)
    end, _ = d.sample(net, mid, start=60, stop=0, generator=g, eta=eta, num_steps=num_steps)
    assert torch.allclose(mid, saved[60]) and torch.allclose(end, full, atol=1e-6)
    # the segment form (network per segment) gives the same with the same network twice
    seg, _ = d.sample(
        [(net, 100, 60), (net, 60, 0)],
        z,
        generator=torch.Generator().manual_seed(2),
        eta=eta,
        num_steps=num_steps,
    )
    assert torch.allclose(seg, full, atol=1e-6)


def test_segments_use_their_own_network():
    d, calls = DDPM(50), []

    def tag(name):
        def f(x, t, y=None):
            calls.append((name, round(t[0].item() * 50)))
            return torch.zeros_like(x)

        return f

    d.sample(
        [(tag("ft"), 50, 20), (tag("ref"), 20, 0)], torch.randn(2, 2), generator=torch.Generator()
    )
    assert all(name == "ft" for name, n in calls if n > 20) and all(
        name == "ref" for name, n in calls if n <= 20
    )
    assert [n for _, n in calls] == list(range(50, 0, -1))  # sampling runs N..1, noise at N


def test_sampling_determinism_under_generator():
    d, net = DDPM(100), _net()

    def run(s):
        return d.sample(
            net,
            torch.randn(16, 2, generator=torch.Generator().manual_seed(s)),
            generator=torch.Generator().manual_seed(s),
        )[0]

    assert torch.equal(run(3), run(3)) and not torch.allclose(run(3), run(4))


def test_ddim_eta0_is_deterministic_and_ancestral_is_not():
    d, net, z = DDPM(100), _net(), torch.randn(8, 2)
    a, _ = d.sample(net, z, generator=torch.Generator().manual_seed(0), eta=0.0, num_steps=20)
    b, _ = d.sample(net, z, generator=torch.Generator().manual_seed(1), eta=0.0, num_steps=20)
    c, _ = d.sample(net, z, generator=torch.Generator().manual_seed(1), eta=1.0)
    e, _ = d.sample(net, z, generator=torch.Generator().manual_seed(2), eta=1.0)
    assert torch.allclose(a, b) and not torch.allclose(c, e)


def test_bad_segment_raises():
    with pytest.raises(ValueError):
        DDPM(100).grid(10, 20)


# ---------------------------------------------------------------- rectified flow ----
def test_flow_convention_noise_at_t0_data_at_t1():
    seen = {}

    def net(x, t, y=None):
        seen["x"], seen["t"] = x, t
        return torch.zeros_like(x)

    x1 = torch.randn(5, 2)
    RectifiedFlow().loss(net, x1, generator=torch.Generator().manual_seed(0))
    g = torch.Generator().manual_seed(0)
    x0 = torch.randn(x1.shape, generator=g)
    t = torch.rand(5, generator=g)
    assert torch.allclose(seen["t"], t)
    assert torch.allclose(seen["x"], t[:, None] * x1 + (1 - t[:, None]) * x0)
    # the exact velocity toward a point mass carries noise at t=0 to the data at t=1
    target = torch.tensor([[1.5, -0.5]])

    def v(x, t, y=None):
        return (target - x) / (1 - t[:, None]).clamp(min=1e-6)

    out = RectifiedFlow().sample(v, torch.randn(4, 2), 10)
    assert torch.allclose(out, target.expand(4, 2), atol=1e-5)


class Smooth(torch.nn.Module):
    """A smooth velocity field with Lipschitz constant about `lip` in x."""

    def __init__(self, lip):
        super().__init__()
        a = torch.tensor([[0.0, -1.0], [1.0, 0.3]])
        self.A = lip * a / torch.linalg.matrix_norm(a, 2)

    def forward(self, x, t, y=None):
        return torch.tanh(x @ self.A.T) + torch.sin(3 * t)[:, None]


def test_flow_inversion_round_trip_and_residual():
    flow, v = RectifiedFlow(), Smooth(0.8)
    z = torch.randn(256, 2, generator=torch.Generator().manual_seed(0))
    x = flow.sample(v, z, 20)
    res = []
    for nb in (1, 3, 10, 30):
        zi, r = flow.invert(v, x, 20, n_fixed=nb)
        res.append(r.max().item())
    assert res[-1] < 1e-6 and all(a >= b for a, b in zip(res, res[1:]))
    assert (zi - z).norm(dim=1).max() < 1e-5  # invert(sample(z)) ~ z
    # Heun is another sampler, not the one inverted; it must still run
    assert flow.sample(v, z, 10, method="heun").shape == z.shape


def test_flow_inversion_reports_divergence_when_hL_ge_1():
    flow, v = RectifiedFlow(), Smooth(6.0)  # h·L = 6/2 = 3 with N = 2
    x = torch.randn(64, 2, generator=torch.Generator().manual_seed(0))
    z, r = flow.invert(v, x, 2, n_fixed=30)
    assert z.shape == x.shape  # no exception: the residual says it failed
    assert not torch.all(r < 1e-3)


# ---------------------------------------------------------------- checkpoints ----
def test_checkpoint_round_trip_rebuilds_model(tmp_path):
    net = unet_from_preset("tiny", 16, 3, num_classes=10)
    ema = EMA(net, 0.5)
    opt = torch.optim.AdamW(net.parameters())
    for p in net.parameters():
        p.data.add_(0.01)
    ema.update(net)
    path = save_checkpoint(
        tmp_path / "c.pt", net, DDPM(50), ema, opt, step=7, args={"lr": 1e-3, "p": tmp_path}
    )
    ckpt = load_checkpoint(path)
    assert ckpt["step"] == 7 and ckpt["args"]["lr"] == 1e-3 and ckpt["process"]["n_steps"] == 50
    assert {"torch", "numpy", "python"} <= set(ckpt["rng"]) and ckpt["optimizer"] is not None
    model, process = model_from_checkpoint(path)  # config alone rebuilds it
    x, t, y = torch.randn(2, 3, 16, 16), torch.rand(2), torch.tensor([1, 2])
    assert torch.allclose(model(x, t, y), ema.model(x, t, y)) and process.N == 50
    raw, _ = model_from_checkpoint(path, use_ema=False)
    assert torch.allclose(raw(x, t, y), net(x, t, y))


def test_checkpoint_write_is_atomic(tmp_path, monkeypatch):
    net = TimeMLP(hidden=8, depth=1)
    path = save_checkpoint(tmp_path / "c.pt", net, step=1)
    before = open(path, "rb").read()

    def broken_save(obj, f, *a, **k):
        with open(f, "wb") as fh:
            fh.write(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", broken_save)
    with pytest.raises(OSError):
        save_checkpoint(path, net, step=2)
    assert open(path, "rb").read() == before  # the old checkpoint survives
    assert os.listdir(tmp_path) == ["c.pt"]  # no temp file left behind


class Evil:
    def __reduce__(self):
        return (os.system, ("echo pwned",))


def test_checkpoint_refuses_pickled_objects_and_garbage(tmp_path):
    torch.save({"format": "pgraft-1", "x": Evil()}, tmp_path / "evil.pt")
    with pytest.raises(CheckpointError, match="cannot be read safely"):
        load_checkpoint(tmp_path / "evil.pt")
    (tmp_path / "trunc.pt").write_bytes(b"PK\x03\x04garbage")
    with pytest.raises(CheckpointError):
        load_checkpoint(tmp_path / "trunc.pt")
    torch.save({"weights": torch.zeros(1)}, tmp_path / "other.pt")
    with pytest.raises(CheckpointError, match="not a pgraft checkpoint"):
        load_checkpoint(tmp_path / "other.pt")
    # a JSON file or a folder passed as a checkpoint: named as such, never "delete it"
    (tmp_path / "args.json").write_text('{"lr": 1}')
    with pytest.raises(CheckpointError, match="is not a PyTorch checkpoint"):
        load_checkpoint(tmp_path / "args.json")
    with pytest.raises(CheckpointError, match="is a folder; pass the checkpoint file"):
        load_checkpoint(tmp_path)
    with pytest.raises(CheckpointError, match="does not exist"):
        load_checkpoint(tmp_path / "missing.pt")


def test_sampling_loops_never_call_item(monkeypatch):
    # a host sync per step would stall a GPU; .item() is the usual culprit
    def boom(self):
        raise AssertionError(".item() inside a sampling loop")

    net = _net()
    monkeypatch.setattr(torch.Tensor, "item", boom)
    DDPM(50).sample(
        [(net, 50, 20), (net, 20, 0)],
        torch.randn(4, 2),
        generator=torch.Generator(),
        return_at=[20],
    )
    flow = RectifiedFlow()
    flow.invert(net, flow.sample(net, torch.randn(4, 2), 5, method="heun"), 5, n_fixed=3)


def test_linear_schedule_refuses_n_at_or_below_20_and_abar_depends_on_n():
    from models.diffusion import make_betas

    for n in (5, 20):
        with pytest.raises(ValueError, match="N > 20"):
            DDPM(n, "linear")
    d21 = DDPM(21)
    assert torch.isfinite(d21.alpha_bar).all() and d21.alpha_bar[-1] > 0
    assert (
        abs(DDPM(1000).alpha_bar[-1].item() - 4.0e-5) < 1e-6
        and abs(DDPM(50).alpha_bar[-1].item() - 7.7e-6) < 1e-6
    )
    assert make_betas(1000, "linear")[-1].item() == pytest.approx(0.02)
    assert torch.isfinite(DDPM(10, "cosine").alpha_bar).all()


def test_flow_heun_nfe_and_invert_needs_a_fixed_point_iteration():
    from models import RectifiedFlow

    calls = []

    def net(x, t, y=None):
        calls.append(1)
        return -x

    flow = RectifiedFlow()
    flow.sample(net, torch.zeros(2, 2), 5, method="heun")
    assert len(calls) == RectifiedFlow.nfe(5, "heun") == 10  # two evaluations per step, 2N
    with pytest.raises(ValueError, match="n_fixed"):
        flow.invert(net, torch.zeros(2, 2), 5, n_fixed=0)


def test_condition_dropout_uses_the_null_condition():
    from models import drop_conditions

    g = torch.Generator().manual_seed(0)
    y = torch.arange(10).repeat(100)
    d = drop_conditions(y, 0.3, g)
    dropped = d == -1
    assert abs(dropped.float().mean().item() - 0.3) < 0.05 and torch.equal(d[~dropped], y[~dropped])
    a = torch.ones(1000, 40)
    da = drop_conditions(a, 0.5, g)
    assert set(da.sum(1).tolist()) == {
        0.0,
        40.0,
    }  # whole rows become the all-zero (null) attribute vector
    assert drop_conditions(y, 0.0, g) is y and drop_conditions(None, 0.5, g) is None
