"""FLOPs per network evaluation and per generated image, counted by ``torch.utils.flop_counter``.

    python -m eval.flops                      # the UNet presets at their task sizes, the toy MLPs
    python -m eval.flops --steps 200          # ... times 200 Euler steps

What is counted: ``FlopCounterMode`` counts the matrix products (linear, conv, bmm, attention)
of ONE forward pass at batch 1, as 2 x multiply-adds; element-wise work (norms, activations,
time embeddings) is not counted. A sampler's FLOPs per image are that times its number of
network evaluations (NFE): N for N Euler steps. The count does not depend on the weights, so a
model built under ``torch.device('meta')`` is counted without doing the arithmetic.
"""

import argparse

import torch
from torch.utils.flop_counter import FlopCounterMode


def _batch1(v):
    return None if v is None else v[:1]


def flops_per_eval(model, example_x, example_t=None, y=None):
    """FLOPs of one call ``model(x, t, y)`` on one input (batch 1).

    example_x: an input with a batch dimension (only the first item is used); example_t: (B,)
    times (default 0.5); y: the condition (labels (B,) or vectors (B, D)) or None."""
    x = example_x[:1]
    t = (
        torch.full((1,), 0.5, device=x.device, dtype=x.dtype)
        if example_t is None
        else example_t.reshape(-1)[:1]
    )
    was_training = getattr(model, "training", None)
    if was_training:
        model.eval()
    try:
        with torch.no_grad(), FlopCounterMode(display=False) as counter:
            model(x, t, _batch1(y))
    finally:
        if was_training:
            model.train()
    return int(counter.get_total_flops())


def nfe(n_steps, method="euler"):
    """Network evaluations of the flow sampler (models/flow.py): Euler N, Heun 2N."""
    if method not in ("euler", "heun"):
        raise ValueError(f"unknown method {method!r} (euler or heun)")
    return int(n_steps) if method == "euler" else 2 * int(n_steps)


def flops_per_image(
    model, example_x, n_steps, example_t=None, y=None, method="euler", per_eval=None
):
    """FLOPs to generate one image with ``n_steps`` of the sampler: per-eval FLOPs x NFE.
    Pass ``per_eval`` (from ``flops_per_eval``) to skip recounting."""
    per_eval = flops_per_eval(model, example_x, example_t, y) if per_eval is None else per_eval
    return per_eval * nfe(n_steps, method)


def main(argv=None):
    from models import PRESETS, TimeMLP, count_params, unet_from_preset

    p = argparse.ArgumentParser(
        description="FLOPs per evaluation / per image of the network presets",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--steps", type=int, default=200, help="Euler steps for the per-image column")
    p.add_argument(
        "--presets", nargs="*", default=None, help="UNet presets to count (default: all)"
    )
    args = p.parse_args(argv)
    sizes = {
        "tiny": (32, 1),
        "mnist": (32, 1),
        "celeba64": (64, 3),
        "base256": (256, 3),
        "corrector256": (256, 3),
    }
    rows = []
    for name in args.presets or list(PRESETS):
        res, ch = sizes.get(name, (32, 3))
        with torch.device("meta"):
            model = unet_from_preset(name, res, ch)
            x = torch.zeros(1, ch, res, res)
        rows.append((f"{name} {res}x{res}x{ch}", count_params(model), flops_per_eval(model, x)))
    for hidden in (256, 128):
        model = TimeMLP(hidden=hidden)
        rows.append(
            (
                f"TimeMLP hidden={hidden} (2-D)",
                count_params(model),
                flops_per_eval(model, torch.zeros(1, 2)),
            )
        )
    print(
        f"{'network':32s} {'params':>10s} {'FLOPs/eval':>12s} "
        f"{'FLOPs/image @' + str(args.steps):>18s}"
    )
    for name, n, f in rows:
        print(f"{name:32s} {n / 1e6:9.2f}M {f:12.4g} {f * args.steps:18.4g}")
    return rows


if __name__ == "__main__":
    main()
