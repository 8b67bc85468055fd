"""pretrain.py end to end: toy2d quality with the default settings, resume, image smoke test."""
import json
import os

import numpy as np
import pytest
import torch

import common
import pretrain
from models import load_checkpoint, model_from_checkpoint
from test_tasks import fake_mnist


@pytest.mark.parametrize("model", ["ddpm", "flow"])
def test_toy2d_default_pretrain_reaches_mode_tv(tmp_path, model):
    # the bar: both kinds reach mode TV < 0.05 with the default settings (~a minute on a CPU)
    s = pretrain.main(["--model", model, "--out", str(tmp_path), "--device", "cpu"])
    assert s["mode_tv"] < 0.05, s
    assert s["sw2"] < 0.2, s
    summary = json.load(open(tmp_path / "summary.json"))
    for key in ("task", "model", "parameters", "steps", "final_loss", "mode_tv", "sw2", "checkpoint"):
        assert key in summary
    samples = np.load(tmp_path / "samples.npy")
    assert samples.shape == (20000, 2) and np.isfinite(samples).all()
    assert (tmp_path / "args.json").exists() and (tmp_path / "metrics.jsonl").exists()
    assert any(f.startswith("samples_") and f.endswith(".png") for f in os.listdir(tmp_path))
    net, process = model_from_checkpoint(summary["checkpoint"])
    assert process.config["kind"] == model


def test_resume_continues_exactly(tmp_path, monkeypatch):
    args = ["--steps", "300", "--ckpt-every", "100", "--num-samples", "200", "--device", "cpu"]
    pretrain.main(args + ["--out", str(tmp_path / "a")])

    real_lr = common.lr_at

    def crash_at_250(step, *a, **k):
        if step == 250:
            raise KeyboardInterrupt  # the run dies after its step-200 checkpoint
        return real_lr(step, *a, **k)
    monkeypatch.setattr(common, "lr_at", crash_at_250)
    with pytest.raises(KeyboardInterrupt):
        pretrain.main(args + ["--out", str(tmp_path / "b")])
    assert load_checkpoint(tmp_path / "b" / "ckpt.pt")["step"] == 200
    monkeypatch.setattr(common, "lr_at", real_lr)
    pretrain.main(args + ["--out", str(tmp_path / "b"), "--resume"])
    a, b = load_checkpoint(tmp_path / "a" / "ckpt.pt"), load_checkpoint(tmp_path / "b" / "ckpt.pt")
    assert b["step"] == 300
    for k in a["model"]:  # same data order, same noise: the same weights as the uninterrupted run
        assert torch.allclose(a["model"][k], b["model"][k], atol=1e-6), k
    for k in a["ema"]:
        assert torch.allclose(a["ema"][k], b["ema"][k], atol=1e-6), k


def test_image_task_smoke(tmp_path):
    fake_mnist(tmp_path / "mnist.pkl.gz")
    out = tmp_path / "run"
    s = pretrain.main(["--task", "mnist", "--data-dir", str(tmp_path), "--preset", "tiny", "--steps", "4",
                       "--batch-size", "4", "--num-samples", "4", "--out", str(out), "--device", "cpu", "--warmup", "2"])
    assert s["steps"] == 4 and np.isfinite(s["final_loss"])
    assert (out / "samples_0000004.png").exists()
    net, process = model_from_checkpoint(out / "ckpt.pt")
    assert net.config["num_classes"] == 10  # MNIST models are class-conditional by default
