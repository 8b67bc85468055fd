"""eval/flops.py: FLOPs per network evaluation (torch.utils.flop_counter) and per image."""

import torch

from eval.flops import flops_per_eval, flops_per_image, nfe
from models import TimeMLP, unet_from_preset


class OneConv(torch.nn.Module):
    def __init__(self, cin=3, cout=8, k=3):
        super().__init__()
        self.conv = torch.nn.Conv2d(cin, cout, k, padding=k // 2)

    def forward(self, x, t, y=None):
        return self.conv(x)


def test_conv_count_is_exact_and_per_image():
    m = OneConv()
    x = torch.zeros(5, 3, 16, 16)  # a batch: only one item is counted
    expected = 2 * 8 * 3 * 3 * 3 * 16 * 16
    assert flops_per_eval(m, x) == expected
    assert flops_per_image(m, x, 7) == 7 * expected
    assert flops_per_image(m, x, 7, method="heun") == 14 * expected
    assert flops_per_image(m, x, 7, per_eval=10) == 70


def test_timemlp_count_matches_its_linear_layers():
    for h in (256, 128):
        m = TimeMLP(hidden=h)
        macs = (
            64 * h + h * h + 2 * h + 3 * 2 * h * h + 2 * h
        )  # t_mlp, inp, 3 blocks of 2 linears, out
        assert flops_per_eval(m, torch.randn(9, 2)) == 2 * macs


def test_counting_restores_train_mode_and_takes_conditions():
    m = TimeMLP(hidden=64, num_classes=10).train()
    f = flops_per_eval(m, torch.zeros(3, 2), y=torch.tensor([1, 2, 3]))
    assert f > 0 and m.training
    assert nfe(5) == 5 and nfe(5, "heun") == 10


def test_paper_256_presets_on_meta_device():
    """The paper (Table 5) implies 1.374e12 / 200 steps ~ 6.9e9 FLOPs per base evaluation; we
    report what flop_counter measures for our base256 preset (about 2.8e11: it counts 2 x MACs of
    every conv at 256x256, see README) and check the order of magnitude and the corrector/base
    ratio."""
    with torch.device("meta"):
        base = unet_from_preset("base256", 256, 3)
        corr = unet_from_preset("corrector256", 256, 3)
        x = torch.zeros(1, 3, 256, 256)
    fb, fc = flops_per_eval(base, x), flops_per_eval(corr, x)
    print(
        f"base256 {fb:.4g} FLOPs/eval, corrector256 {fc:.4g}, x200 steps: {200 * fb:.4g} / "
        f"{200 * (fb + fc):.4g}"
    )
    assert 1e9 < fb < 1e12
    assert 0.15 < fc / fb < 0.4  # channels 48 vs 96: ~1/4 of the conv work
