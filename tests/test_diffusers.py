"""--base diffusers:DIR: a tiny UNet2DModel saved with save_pretrained, loaded as the frozen
reference; its eps equals the diffusers model's, our DDPM sampler equals diffusers' DDPMScheduler
loop from the same noise, and one GRAFT and one P-GRAFT round run on it. Offline: everything is
built here."""

import json
import os

import pytest
import torch

diffusers = pytest.importorskip("diffusers")

import common  # noqa: E402
import graft  # noqa: E402
import pgraft  # noqa: E402


def tiny_diffusers_base(root, scheduler_kwargs=None, layout="subfolders"):
    torch.manual_seed(0)
    unet = diffusers.UNet2DModel(
        sample_size=32,
        in_channels=1,
        out_channels=1,
        block_out_channels=(8, 16),
        layers_per_block=1,
        down_block_types=("DownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "UpBlock2D"),
        norm_num_groups=4,
    )
    with (
        torch.no_grad()
    ):  # diffusers zero-initialises nothing here, but make the output clearly non-trivial
        for p in unet.parameters():
            p.add_(0.01 * torch.randn_like(p))
    sched = diffusers.DDPMScheduler(num_train_timesteps=1000, **(scheduler_kwargs or {}))
    if layout == "subfolders":
        unet.save_pretrained(os.path.join(root, "unet"))
        sched.save_pretrained(os.path.join(root, "scheduler"))
    else:  # google/ddpm-* layout: everything at the root
        unet.save_pretrained(root)
        sched.save_pretrained(root)
    return unet.eval(), sched


def test_eps_and_sampler_equal_diffusers(tmp_path):
    unet, sched = tiny_diffusers_base(str(tmp_path / "b"))
    net, process, ckpt = common.load_base(f"diffusers:{tmp_path / 'b'}", "cpu")
    assert process.N == 1000 and ckpt["model_config"]["kind"] == "diffusers"
    x = torch.randn(3, 1, 32, 32, generator=torch.Generator().manual_seed(1))
    for n in (1, 500, 1000):  # our step n is diffusers' timestep n - 1
        ours = net(x, torch.full((3,), n / 1000), None)
        theirs = unet(x, torch.full((3,), n - 1)).sample
        assert torch.allclose(ours, theirs, atol=1e-6), n
    # ancestral sampling over all 1000 steps from the same noise and the same generator stream
    z = torch.randn(2, 1, 32, 32, generator=torch.Generator().manual_seed(2))
    g = torch.Generator().manual_seed(3)
    mine, _ = process.sample(net, z.clone(), generator=g, eta=1.0, clip=True)
    g = torch.Generator().manual_seed(3)
    sched.set_timesteps(1000)
    x = z.clone()
    with torch.no_grad():
        for t in sched.timesteps:
            x = sched.step(unet(x, t).sample, t, x, generator=g).prev_sample
    assert torch.allclose(mine, x, atol=1e-4), (mine - x).abs().max()
    # a rebuilt copy (what graft fine-tunes and checkpoints) computes the same eps
    from models import model_from_checkpoint

    copy, _ = model_from_checkpoint(ckpt)
    assert torch.equal(copy(z, torch.full((2,), 0.3)), net(z, torch.full((2,), 0.3)))


@pytest.mark.parametrize(
    "kwargs,word",
    [
        (dict(prediction_type="v_prediction"), "prediction_type"),
        (dict(beta_schedule="squaredcos_cap_v2"), "beta_schedule"),
        (dict(beta_end=0.012), "betas"),
    ],
)
def test_schedulers_that_do_not_map_are_refused(tmp_path, kwargs, word):
    tiny_diffusers_base(str(tmp_path / "b"), kwargs, layout="root")
    with pytest.raises(common.UsageError, match=word):
        common.load_base(f"diffusers:{tmp_path / 'b'}", "cpu")
    os.makedirs(tmp_path / "empty")
    with pytest.raises(common.UsageError, match="no UNet config"):
        common.load_base(f"diffusers:{tmp_path / 'empty'}", "cpu")
    with pytest.raises(
        common.UsageError, match="cannot fetch"
    ):  # not a folder: a hub id, and we are offline
        common.load_base(f"diffusers:{tmp_path / 'absent'}", "cpu")


def test_graft_and_pgraft_round_on_a_diffusers_base(tmp_path):
    from test_tasks import fake_mnist

    fake_mnist(tmp_path / "mnist.pkl.gz")
    tiny_diffusers_base(str(tmp_path / "b"), layout="root")
    args = [
        "--task",
        "mnist",
        "--data-dir",
        str(tmp_path),
        "--base",
        f"diffusers:{tmp_path / 'b'}",
        "--reward",
        "jpeg",
        "--prompts",
        "4",
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
        "0",
        "--device",
        "cpu",
    ]
    s = graft.main(args + ["--out", str(tmp_path / "g")])
    assert s["samples_generated"] == 8 and s["base"].startswith("diffusers:")
    p = pgraft.main(args + ["--out", str(tmp_path / "p"), "--n-i", "0.5", "--lemma-levels", "none"])
    assert p["n_i"] == 500
    ckpt = torch.load(tmp_path / "g" / "ckpt.pt", weights_only=True)
    assert ckpt["model_config"]["kind"] == "diffusers"
    json.dumps(ckpt["model_config"])  # plain values only
