"""pretrain.py end to end: toy2d quality with the default settings, resume, image smoke test."""

import json
import os

import numpy as np
import pytest
import torch

import pretrain
from models import load_checkpoint, model_from_checkpoint
from test_tasks import fake_mnist


@pytest.mark.parametrize("model", ["ddpm", "flow"])
def test_toy2d_default_pretrain_reaches_mode_tv(tmp_path, model):
    # the bar: both kinds reach mode TV < 0.05 with the default settings (~a minute on a
    # CPU)
    s = pretrain.main(["--model", model, "--out", str(tmp_path), "--device", "cpu"])
    assert s["mode_tv"] < 0.05, s
    assert s["sw2"] < 0.2, s
    summary = json.load(open(tmp_path / "summary.json"))
    for key in (
        "task",
        "model",
        "parameters",
        "train_steps",
        "final_loss",
        "mode_tv",
        "sw2",
        "checkpoint",
    ):
        assert key in summary
    samples = np.load(tmp_path / "samples.npy")
    assert samples.shape == (20000, 2) and np.isfinite(samples).all()
    assert (tmp_path / "args.json").exists() and (tmp_path / "metrics.jsonl").exists()
    assert any(f.startswith("samples_") and f.endswith(".png") for f in os.listdir(tmp_path))
    net, process = model_from_checkpoint(summary["checkpoint"])
    assert process.config["kind"] == model


def test_resume_continues_exactly(tmp_path, monkeypatch):
    """A run killed after its step-150 checkpoint (off the 100-step logging boundary) and resumed
    gives the same weights, EMA, optimiser state, metrics.jsonl rows and final loss as the
    uninterrupted run."""
    args = [
        "--train-steps",
        "300",
        "--ckpt-every",
        "50",
        "--eval-samples",
        "200",
        "--device",
        "cpu",
    ]
    sa = pretrain.main(args + ["--out", str(tmp_path / "a")])

    real_lr = pretrain.lr_at

    def crash_at_170(step, *a, **k):
        if step == 170:
            raise KeyboardInterrupt  # the run dies after its step-150 checkpoint
        return real_lr(step, *a, **k)

    monkeypatch.setattr(pretrain, "lr_at", crash_at_170)
    with pytest.raises(KeyboardInterrupt):
        pretrain.main(args + ["--out", str(tmp_path / "b")])
    assert load_checkpoint(tmp_path / "b" / "ckpt.pt")["step"] == 150
    monkeypatch.setattr(pretrain, "lr_at", real_lr)
    sb = pretrain.main(args + ["--out", str(tmp_path / "b"), "--resume"])
    a, b = load_checkpoint(tmp_path / "a" / "ckpt.pt"), load_checkpoint(tmp_path / "b" / "ckpt.pt")
    assert b["step"] == 300 and b["ema_step"] == 300
    for part in (
        "model",
        "ema",
    ):  # same data order, same noise: the same weights as the uninterrupted run
        for k in a[part]:
            assert torch.equal(a[part][k], b[part][k]), (part, k)
    assert sa["final_loss"] == sb["final_loss"]

    def rows(d):
        return [
            {k: v for k, v in json.loads(line).items() if k != "time_s"}
            for line in open(d / "metrics.jsonl")
        ]

    assert rows(tmp_path / "a") == rows(tmp_path / "b")


def test_ema_warms_up_and_is_recorded(tmp_path):
    """With decay 0.999 and 300 steps a fixed-decay EMA would still be 74% the random
    initialisation; the warm-up min(d, (1+s)/(10+s)) makes it track the trained weights."""
    from models import EMA

    net = torch.nn.Linear(3, 3)
    ema = EMA(net, 0.999)
    with torch.no_grad():
        net.weight.add_(1.0)
    for _ in range(200):
        ema.update(net)
    frac_init = (
        (net.weight - ema.model.weight).abs().mean() / 1.0
    ).item()  # share of the initial weights left
    assert frac_init < 0.1 and ema.decay_at(0) == 0.1 and ema.decay_at(10**6) == 0.999
    fixed = EMA(torch.nn.Linear(3, 3), 0.999, warmup=False)
    assert fixed.decay_at(0) == 0.999
    s = pretrain.main(
        [
            "--train-steps",
            "5",
            "--eval-samples",
            "50",
            "--out",
            str(tmp_path),
            "--device",
            "cpu",
            "--warmup",
            "1",
        ]
    )
    assert "warm-up" in s["ema"]


def test_image_task_smoke(tmp_path):
    fake_mnist(tmp_path / "mnist.pkl.gz")
    out = tmp_path / "run"
    s = pretrain.main(
        [
            "--task",
            "mnist",
            "--data-dir",
            str(tmp_path),
            "--preset",
            "tiny",
            "--train-steps",
            "4",
            "--batch-size",
            "4",
            "--eval-samples",
            "4",
            "--out",
            str(out),
            "--device",
            "cpu",
            "--warmup",
            "2",
        ]
    )
    assert s["train_steps"] == 4 and np.isfinite(s["final_loss"]) and s["cond_drop"] == 0.1
    assert (out / "samples_0000004.png").exists()
    net, process = model_from_checkpoint(out / "ckpt.pt")
    assert net.config["num_classes"] == 10  # MNIST models are class-conditional by default
