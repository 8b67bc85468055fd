"""CUDA-only checks (skipped on CPU machines and in CI): no host syncs, device-side generators,
bf16."""

import pytest
import torch

import common
import pretrain
from models import DDPM, RectifiedFlow, TimeMLP, unet_from_preset

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


@cuda
def test_sampling_has_no_host_sync():
    dev = torch.device("cuda")
    net = unet_from_preset("tiny", 32, 3, num_classes=10).to(dev).eval()
    g = torch.Generator(device=dev).manual_seed(0)
    z = torch.randn(8, 3, 32, 32, generator=g, device=dev)
    y = torch.arange(8, device=dev) % 10
    d = DDPM(100)
    d.sample(net, z, y=y, generator=g, num_steps=10)  # warm-up (allocations, caches)
    torch.cuda.set_sync_debug_mode("error")
    try:
        x, saved = d.sample(
            [(net, 100, 40), (net, 40, 0)],
            z,
            y=y,
            generator=g,
            num_steps=10,
            return_at=[40],
            clip=True,
            cfg_scale=1.0,
        )
        flow = RectifiedFlow()
        zi, res = flow.invert(net, flow.sample(net, z, 5, y=y), 5, n_fixed=3, y=y)
    finally:
        torch.cuda.set_sync_debug_mode(0)
    assert x.device.type == "cuda" and torch.isfinite(x).all() and res.shape == (8,)


@cuda
def test_same_seed_same_samples_on_cuda():
    dev = torch.device("cuda")
    net = TimeMLP().to(dev).eval()

    def run():
        return DDPM(50).sample(
            net,
            torch.randn(16, 2, device=dev, generator=torch.Generator(dev).manual_seed(1)),
            generator=torch.Generator(dev).manual_seed(2),
        )[0]

    assert torch.equal(run(), run())


@cuda
def test_bf16_compile_pretrain_runs(tmp_path):
    s = pretrain.main(
        [
            "--steps",
            "300",
            "--num-samples",
            "2000",
            "--device",
            "cuda",
            "--bf16",
            "--compile",
            "--out",
            str(tmp_path),
        ]
    )
    assert s["steps"] == 300 and s["mode_tv"] < 0.5
    net = common.wrap_net(unet_from_preset("tiny", 32, 1).cuda(), bf16=True)
    out = net(torch.randn(2, 1, 32, 32, device="cuda"), torch.rand(2, device="cuda"))
    assert out.dtype == torch.float32
