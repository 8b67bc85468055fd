"""inverse_noise.py on toy2d with a deliberately under-trained base flow (a couple of minutes on a CPU)."""
import json
import os

import pytest
import torch

import inverse_noise
import pretrain
from common import UsageError, load_base
from tasks import TOY


@pytest.fixture(scope="module")
def base_ckpt(tmp_path_factory):
    """A rectified flow trained for only 200 steps: far from the mixture (sliced W2 ~0.6)."""
    out = tmp_path_factory.mktemp("base")
    pretrain.main(["--model", "flow", "--steps", "200", "--batch-size", "256", "--out", str(out),
                   "--num-samples", "1000", "--ckpt-every", "0", "--device", "cpu"])
    return str(out / "ckpt.pt")


def tiny_args(base, out, *extra):
    return ["--base", base, "--out", str(out), "--device", "cpu", "--N", "5", "--num-invert", "800",
            "--chunk-size", "200", "--corrector-steps", "5", "--num-eval", "200", "--eval-n", "5", "--nc", "1",
            *extra]


def test_inversion_round_trip_is_small(base_ckpt):
    model, process, _ = load_base(base_ckpt, "cpu")
    x = TOY.sample(500, torch.Generator().manual_seed(3))
    z, residual = process.invert(model, x, 10, n_fixed=10)
    back = process.sample(model, z, 10)
    assert residual.max() < 1e-4
    assert (back - x).norm(dim=1).max() < 1e-4
    assert (z - x).norm(dim=1).mean() > 0.1  # it did move (this weak base moves points little)


def test_corrector_beats_base_at_same_N_and_writes_outputs(base_ckpt, tmp_path):
    out = tmp_path / "run"
    s = inverse_noise.main(["--base", base_ckpt, "--out", str(out), "--device", "cpu", "--N", "10",
                            "--num-invert", "3000", "--chunk-size", "1000", "--corrector-steps", "600",
                            "--num-eval", "4000", "--eval-n", "10,20", "--nc", "5,10"])
    for name in ("table.csv", "table.md", "quality_vs_flops.png", "samples.png", "summary.json", "args.json",
                 "metrics.jsonl", "corrector/ckpt.pt", "inverted/chunk_00002.pt"):
        assert (out / name).is_file(), name
    on_disk = json.loads((out / "summary.json").read_text())
    for k in ("task", "N", "N_c", "flops_base", "flops_corrected", "quality_base", "quality_corrected", "rows"):
        assert k in on_disk, k
    assert on_disk["task"] == "toy2d" and on_disk["N"] == 10 and len(on_disk["rows"]) == 4
    assert len((out / "table.csv").read_text().strip().splitlines()) == 1 + 4
    # the inversion is an inverse of the base's own 10-step Euler sampler
    assert s["inversion"]["roundtrip_max"] < 1e-4 and s["inversion"]["nonfinite"] == 0
    # the corrector improves the distance to the true mixture over the base at the same N
    rows = {(r["method"], r["N"], r["N_c"]): r for r in s["rows"]}
    base10 = rows[("base", 10, 0)]
    for nc in (5, 10):
        assert rows[("base+corrector", 10, nc)]["sw2"] < 0.8 * base10["sw2"]
    assert s["quality_corrected"] < s["quality_base"] and s["quality_metric"] == "sw2"
    # FLOPs: per-eval counts times steps, corrector plus base
    r = rows[("base+corrector", 10, 5)]
    assert r["flops"] == 10 * s["flops_per_eval_base"] + 5 * s["flops_per_eval_corrector"]
    assert s["flops_per_eval_corrector"] < s["flops_per_eval_base"]
    # with a base this bad, base + corrector at N=10 beats the base alone at N=10 and N=20 (dearer)
    assert s["claim"]["holds"] and s["claim"]["witnesses"]
    # the under-trained base's inverted noise is measurably not N(0, I)
    g = s["gaussianity"]
    assert g["noise"]["sw2"] > 3 * g["null"]["sw2"]
    # the corrector checkpoint records which base and which N it corrects
    extra = torch.load(out / "corrector" / "ckpt.pt", weights_only=True)["extra"]
    assert extra["base_N"] == 10 and extra["base_checkpoint"] == os.path.abspath(base_ckpt)


def read_chunks(out):
    d = out / "inverted"
    names = sorted(n for n in os.listdir(d) if n.startswith("chunk_") and n.endswith(".pt"))
    return names, torch.cat([torch.load(d / n, weights_only=True)["z"] for n in names])


def test_resume_after_interruption_loses_nothing(base_ckpt, tmp_path):
    ref, cut = tmp_path / "ref", tmp_path / "cut"
    s_ref = inverse_noise.main(tiny_args(base_ckpt, ref, "--perturb", "0.01"))
    assert s_ref["inversion"]["computed_chunks"] == 4

    with pytest.raises(SystemExit) as e:
        inverse_noise.main(tiny_args(base_ckpt, cut, "--perturb", "0.01", "--stop-after-chunks", "2"))
    assert e.value.code == 3
    names, _ = read_chunks(cut)
    assert names == ["chunk_00000.pt", "chunk_00001.pt"]
    mtimes = [os.stat(cut / "inverted" / n).st_mtime_ns for n in names]
    (cut / "inverted" / "chunk_00002.pt.tmp.999").write_bytes(b"half a chunk")  # debris of a crash mid-write

    s = inverse_noise.main(tiny_args(base_ckpt, cut, "--perturb", "0.01", "--resume"))
    assert s["inversion"]["computed_chunks"] == 2 and s["inversion"]["reused_chunks"] == 2
    assert [os.stat(cut / "inverted" / n).st_mtime_ns for n in names] == mtimes  # not recomputed
    names, z = read_chunks(cut)
    assert len(names) == 4 and z.shape == (800, 2)
    assert torch.equal(z, read_chunks(ref)[1])  # same noise as the uninterrupted run, perturbation included

    # a damaged chunk is recomputed, identically
    (cut / "inverted" / "chunk_00003.pt").write_bytes(b"not a torch file")
    s = inverse_noise.main(tiny_args(base_ckpt, cut, "--perturb", "0.01", "--resume"))
    assert s["inversion"]["computed_chunks"] == 1
    assert torch.equal(read_chunks(cut)[1], z)

    # other settings must not silently mix with these chunks
    with pytest.raises(UsageError, match="other settings"):
        inverse_noise.main(tiny_args(base_ckpt, cut, "--perturb", "0.02"))
