"""eval/bench_speed.py runs on the CPU and reports its ratios (no timing assertion: those live in
the benchmark)."""

import json
import math

from eval import bench_speed


def test_bench_speed_cpu_reports_ratios(tmp_path):
    rows = bench_speed.main(
        [
            "--presets",
            "tiny",
            "--batches",
            "2",
            "--sample-steps",
            "3",
            "--repeats",
            "1",
            "--train-batch",
            "2",
            "--out",
            str(tmp_path),
        ]
    )
    assert len(rows) == 1 and rows[0]["preset"] == "tiny"
    for k in ("forward_ms", "sampler_ms", "sampler_ratio", "train_steps_per_s"):
        assert math.isfinite(rows[0][k]) and rows[0][k] > 0, k
    assert "forward_graph_ms" not in rows[0]  # CUDA graphs only on CUDA
    assert json.load(open(tmp_path / "bench_speed.json"))["sample_steps"] == 3
