"""Speed of the sampling and training loops, as ratios measured in one run (absolute times on shared
machines are noise; ratios hold).

    python -m eval.bench_speed                         # CPU: eager ratios, small batches
    python -m eval.bench_speed --device cuda --batches 16,256,2048 --presets tiny,mnist,celeba64

Per preset and batch size it reports:
  - forward_ms: one eager forward of the UNet (eval mode, fp32); on CUDA also replayed from a CUDA
  graph
    (``forward_graph_ms``) and their ratio: what launch overhead costs at that size;
  - sampler_ratio = time of the project's DDPM sampler over S steps / (S x one eager forward): the
    sampler's own overhead (target <= 1.03 on the CPU: no host syncs, no per-element Python);
  - train_steps_per_s: eager training steps (forward, backward, AdamW, EMA) at --train-batch.
Writes OUT/bench_speed.json (default runs/bench_speed). Part of issue #12: the CUDA-graph fast path
of the sampler and the training step is not built yet (it needs a GPU session to be measured and
made exact); the graph replay of the bare forward shows what it can gain.
"""

import argparse
import json
import os
import time

import torch

from models import DDPM, EMA, unet_from_preset

SIZES = {
    "tiny": (32, 1, 10),
    "mnist": (32, 1, 10),
    "celeba64": (64, 3, 0),
}  # image size, channels, classes


def timed(fn, repeats, device):
    """Median seconds of ``fn()`` over ``repeats`` calls after one warm-up."""
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return sorted(times)[len(times) // 2]


def graph_forward(net, x, t, y):
    """A CUDA graph of one forward on static inputs; returns a replay callable."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream), torch.no_grad():
        for _ in range(3):  # warm-up outside the graph, as capture requires
            net(x, t, y)
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph), torch.no_grad():
        net(x, t, y)
    return graph.replay


def bench(preset, batch, device, steps, repeats, train_batch):
    size, ch, classes = SIZES[preset]
    net = unet_from_preset(preset, size, ch, num_classes=classes).to(device).eval()
    g = torch.Generator(device=device).manual_seed(0)
    x = torch.randn((batch, ch, size, size), generator=g, device=device)
    t = torch.full((batch,), 0.5, device=device)
    y = torch.arange(batch, device=device) % classes if classes else None
    row = dict(preset=preset, batch=batch, device=str(device))
    with torch.no_grad():
        fwd = timed(lambda: net(x, t, y), repeats, device)
    row["forward_ms"] = 1e3 * fwd
    if device.type == "cuda":
        replay = graph_forward(net, x, t, y)
        row["forward_graph_ms"] = 1e3 * timed(replay, repeats, device)
        row["forward_eager_over_graph"] = row["forward_ms"] / row["forward_graph_ms"]
    process = DDPM(1000)

    def sample():
        process.sample(net, x.clone(), y=y, generator=g, num_steps=steps, clip=True)

    row["sampler_ms"] = 1e3 * timed(sample, max(1, repeats // 3), device)
    row["sampler_ratio"] = row["sampler_ms"] / (steps * row["forward_ms"])
    if train_batch:
        net.train()
        opt = torch.optim.AdamW(net.parameters(), lr=1e-4)
        ema = EMA(net, 0.999)
        xb = torch.randn((train_batch, ch, size, size), generator=g, device=device)
        yb = torch.arange(train_batch, device=device) % classes if classes else None

        def step():
            loss = process.loss(net, xb, yb, g)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            ema.update(net)

        row["train_steps_per_s"] = 1.0 / timed(step, repeats, device)
    return row


def main(argv=None):
    p = argparse.ArgumentParser(
        description=__doc__.splitlines()[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    p.add_argument("--device", default="cpu", help="cpu or cuda")
    p.add_argument(
        "--presets", default="tiny,mnist", help="comma list of UNet presets (tiny, mnist, celeba64)"
    )
    p.add_argument("--batches", default="16,64", help="comma list of batch sizes")
    p.add_argument(
        "--sample-steps", type=int, default=20, help="sampler steps S of the sampler ratio"
    )
    p.add_argument(
        "--train-batch", type=int, default=32, help="batch of the training-step rate (0: skip)"
    )
    p.add_argument("--repeats", type=int, default=5, help="timed repeats per measurement (median)")
    p.add_argument("--out", default=os.path.join("runs", "bench_speed"), help="output folder")
    args = p.parse_args(argv)
    device = torch.device(args.device)
    rows = []
    for preset in args.presets.split(","):
        if preset not in SIZES:
            p.error(f"--presets: unknown preset {preset!r}; choose from {', '.join(SIZES)}")
        for batch in (int(b) for b in args.batches.split(",")):
            row = bench(preset, batch, device, args.sample_steps, args.repeats, args.train_batch)
            rows.append(row)
            print(
                "  ".join(
                    f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in row.items()
                ),
                flush=True,
            )
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "bench_speed.json"), "w") as f:
        json.dump(
            dict(rows=rows, sample_steps=args.sample_steps, torch=torch.__version__), f, indent=2
        )
    worst = max(r["sampler_ratio"] for r in rows)
    print(
        f"largest sampler_ratio {worst:.3f} (target <= 1.03 on the CPU, <= 1.1 over graph replay "
        f"on CUDA)"
    )
    return rows


if __name__ == "__main__":
    main()
