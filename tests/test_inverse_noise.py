"""inverse_noise.py on toy2d with a deliberately under-trained base flow (under a minute on a CPU):
the inversion, the corrector's gain, resumable chunks, one fp32 base, divergence, resume checks."""

import json
import os
import shutil

import pytest
import torch

import common
import inverse_noise
import pretrain
from common import UsageError, load_base
from models import RectifiedFlow
from tasks import TOY


@pytest.fixture(scope="module")
def base_ckpt(tmp_path_factory):
    """A rectified flow trained for only 15 steps (still in its LR warm-up): far from the mixture
    (sliced W2 ~0.4), smooth enough that its 10-step Euler sampler inverts exactly."""
    out = tmp_path_factory.mktemp("base")
    pretrain.main(
        [
            "--model",
            "flow",
            "--train-steps",
            "15",
            "--batch-size",
            "256",
            "--out",
            str(out),
            "--eval-samples",
            "1000",
            "--ckpt-every",
            "0",
            "--device",
            "cpu",
        ]
    )
    return str(out / "ckpt.pt")


def tiny_args(base, out, *extra):
    return [
        "--base",
        base,
        "--out",
        str(out),
        "--device",
        "cpu",
        "--sample-steps",
        "5",
        "--invert-samples",
        "800",
        "--chunk-size",
        "200",
        "--train-steps",
        "5",
        "--eval-samples",
        "200",
        "--base-sample-steps",
        "5",
        "--corrector-sample-steps",
        "1",
        *extra,
    ]


@pytest.fixture(scope="module")
def good_run(base_ckpt, tmp_path_factory):
    """A finished tiny run; tests copy it before changing anything in it."""
    out = tmp_path_factory.mktemp("good") / "run"
    inverse_noise.main(tiny_args(base_ckpt, out))
    return out


def exits_2(argv, capsys):
    """Run the script as the command line does: exit code 2 and one error line, returned."""
    with pytest.raises(SystemExit) as e:
        common.run_main(lambda: inverse_noise.main(argv))
    assert e.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error:") and "\n" not in err, err
    return err


def test_inversion_round_trip_is_small(base_ckpt):
    model, process, _ = load_base(base_ckpt, "cpu")
    x = TOY.sample(500, torch.Generator().manual_seed(3))
    z, residual = process.invert(model, x, 10, n_fixed=10)
    back = process.sample(model, z, 10)
    assert residual.max() < 1e-4
    assert (back - x).norm(dim=1).max() < 1e-4
    assert (z - x).norm(dim=1).mean() > 0.1  # it did move


def test_corrector_beats_base_at_same_N_and_writes_outputs(base_ckpt, tmp_path):
    out = tmp_path / "run"
    s = inverse_noise.main(
        [
            "--base",
            base_ckpt,
            "--out",
            str(out),
            "--device",
            "cpu",
            "--sample-steps",
            "10",
            "--invert-samples",
            "2000",
            "--chunk-size",
            "700",
            "--train-steps",
            "400",
            "--eval-samples",
            "3000",
            "--base-sample-steps",
            "10,20",
            "--corrector-sample-steps",
            "5,10",
        ]
    )
    for name in (
        "table.csv",
        "table.md",
        "quality_vs_flops.png",
        "samples.png",
        "summary.json",
        "args.json",
        "metrics.jsonl",
        "corrector/ckpt.pt",
        "inverted/chunk_00002.pt",
    ):
        assert (out / name).is_file(), name
    on_disk = json.loads((out / "summary.json").read_text())
    for k in (
        "task",
        "N",
        "N_c",
        "flops_base",
        "flops_corrected",
        "quality_base",
        "quality_corrected",
        "rows",
        "claim",
    ):
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


def test_resume_after_interruption_loses_nothing(base_ckpt, good_run, tmp_path):
    ref, cut = tmp_path / "ref", tmp_path / "cut"
    s_ref = inverse_noise.main(tiny_args(base_ckpt, ref, "--perturb", "0.01"))
    assert s_ref["inversion"]["computed_chunks"] == 4

    with pytest.raises(SystemExit) as e:
        inverse_noise.main(
            tiny_args(base_ckpt, cut, "--perturb", "0.01", "--stop-after-chunks", "2")
        )
    assert e.value.code == 3
    names, _ = read_chunks(cut)
    assert names == ["chunk_00000.pt", "chunk_00001.pt"]
    mtimes = [os.stat(cut / "inverted" / n).st_mtime_ns for n in names]
    (cut / "inverted" / "chunk_00002.pt.tmp.999").write_bytes(b"half a chunk")  # a crash mid-write

    s = inverse_noise.main(tiny_args(base_ckpt, cut, "--perturb", "0.01", "--resume"))
    assert s["inversion"]["computed_chunks"] == 2 and s["inversion"]["reused_chunks"] == 2
    assert [os.stat(cut / "inverted" / n).st_mtime_ns for n in names] == mtimes  # not recomputed
    names, z = read_chunks(cut)
    assert len(names) == 4 and z.shape == (800, 2)
    assert torch.equal(z, read_chunks(ref)[1])  # the uninterrupted run's noise, perturbation too
    assert s["corrector_final_loss"] == s_ref["corrector_final_loss"]

    # a damaged chunk is recomputed, identically; the finished corrector resumes with its loss
    (cut / "inverted" / "chunk_00003.pt").write_bytes(b"not a torch file")
    s = inverse_noise.main(tiny_args(base_ckpt, cut, "--perturb", "0.01", "--resume"))
    assert s["inversion"]["computed_chunks"] == 1
    assert torch.equal(read_chunks(cut)[1], z)
    assert s["corrector_final_loss"] == s_ref["corrector_final_loss"]

    # other settings must not silently mix with these chunks
    with pytest.raises(UsageError, match="other settings"):
        inverse_noise.main(tiny_args(base_ckpt, cut, "--perturb", "0.02"))


def test_base_is_one_fp32_network_for_inversion_and_every_sample(base_ckpt, tmp_path, monkeypatch):
    """The --bf16 bug: the table's samples must go through the very map that was inverted. A GPU
    cannot be assumed here, so wrap_net is replaced by a wrapper that records its bf16 flag, and
    every network the flow's invert and sample are called with is recorded."""

    class Wrapped:
        def __init__(self, model, bf16=False, compile=False):
            self.model, self.bf16 = model, bf16

        def __call__(self, x, t, y=None):
            return self.model(x, t, y)

    monkeypatch.setattr(common, "wrap_net", Wrapped)
    inverted, sampled = [], []
    real_invert, real_sample = RectifiedFlow.invert, RectifiedFlow.sample

    def invert(self, model, *a, **k):
        inverted.append(model)
        return real_invert(self, model, *a, **k)

    def sample(self, model, *a, **k):
        sampled.append(model)
        return real_sample(self, model, *a, **k)

    monkeypatch.setattr(RectifiedFlow, "invert", invert)
    monkeypatch.setattr(RectifiedFlow, "sample", sample)
    inverse_noise.main(
        tiny_args(
            base_ckpt,
            tmp_path / "run",
            "--bf16",
            "--base-sample-steps",
            "2,5",
            "--corrector-sample-steps",
            "1,2",
        )
    )
    base_net = inverted[0]
    assert all(m is base_net for m in inverted) and isinstance(base_net, Wrapped)
    assert not base_net.bf16  # the base runs in fp32 whatever --bf16 says
    assert sum(m is base_net for m in sampled) == 4 + 2 + 2  # round trips of 4 chunks, 4 table rows
    others = [m for m in sampled if m is not base_net]
    assert others and all(isinstance(m, Wrapped) and m.bf16 for m in others)  # corrector only
    assert all(m.model is not base_net.model for m in others)


def test_divergence_exits_2_and_keeps_the_good_checkpoint(good_run, base_ckpt, tmp_path, capsys):
    out = tmp_path / "run"
    shutil.copytree(good_run, out)
    ckpt = (out / "corrector" / "ckpt.pt").read_bytes()
    summary = (out / "summary.json").read_bytes()
    assert "--lr" in exits_2(tiny_args(base_ckpt, out, "--lr", "inf"), capsys)  # refused at parse
    # a rerun into the finished run without --resume is refused before it can replace anything
    err = exits_2(tiny_args(base_ckpt, out, "--lr", "1e8", "--grad-clip", "0"), capsys)
    assert "already holds a run" in err
    assert (out / "corrector" / "ckpt.pt").read_bytes() == ckpt  # the last good one, byte for byte
    assert (out / "summary.json").read_bytes() == summary  # no verdict from NaN
    out = tmp_path / "fresh"  # a fresh run that diverges: one line naming the step and the rate
    err = exits_2(tiny_args(base_ckpt, out, "--lr", "1e8", "--grad-clip", "0"), capsys)
    assert "diverged by step 5" in err and "--lr 1e+08" in err
    assert not (out / "summary.json").exists() and not (out / "corrector" / "ckpt.pt").exists()

    def no_nan(text):
        raise AssertionError(f"non-finite {text} in JSON")

    for root, _, files in os.walk(out):
        for f in files:
            if f.endswith(".json"):
                json.loads(open(os.path.join(root, f)).read(), parse_constant=no_nan)
            elif f.endswith(".jsonl"):
                for line in open(os.path.join(root, f)):
                    json.loads(line, parse_constant=no_nan)


def test_resume_with_other_defining_flags_is_refused(good_run, base_ckpt, tmp_path, capsys):
    out = tmp_path / "run"
    shutil.copytree(good_run, out)
    before = {f: (out / f).read_bytes() for f in ("args.json", "metrics.jsonl", "summary.json")}
    err = exits_2(tiny_args(base_ckpt, out, "--resume", "--train-steps", "7"), capsys)
    assert "--train-steps 5 -> 7" in err
    assert {f: (out / f).read_bytes() for f in before} == before  # nothing in --out was touched
    # flags that may change on resume are accepted: more evaluation samples
    s = inverse_noise.main(tiny_args(base_ckpt, out, "--resume", "--eval-samples", "300"))
    assert s["corrector_final_loss"] == json.loads(before["summary.json"])["corrector_final_loss"]


def test_bad_flags_are_refused_before_any_work(base_ckpt, tmp_path, capsys):
    out = tmp_path / "run"
    assert "--n-fixed" in exits_2(tiny_args(base_ckpt, out, "--n-fixed", "0"), capsys)
    assert "--fid-samples" in exits_2(tiny_args(base_ckpt, out, "--fid-samples", "-2"), capsys)
    assert "--corrector-sample-steps" in exits_2(
        tiny_args(base_ckpt, out, "--corrector-sample-steps", "0,2"), capsys
    )
    assert "2-D preset" in exits_2(tiny_args(base_ckpt, out, "--corrector-preset", "tiny"), capsys)
    assert not out.exists()


def test_interrupted_corrector_resumes_with_the_same_loss(
    good_run, base_ckpt, tmp_path, monkeypatch
):
    """Killed after its step-24 checkpoint, the resumed corrector logs and reports the same loss
    (a mean over all 30 steps: the window since the last log is in the checkpoint) and weights."""
    ref, cut = tmp_path / "ref", tmp_path / "cut"
    shutil.copytree(good_run / "inverted", ref / "inverted")  # the inverted chunks are reused
    shutil.copytree(good_run / "inverted", cut / "inverted")
    steps = ["--train-steps", "30", "--ckpt-every", "12"]
    s_ref = inverse_noise.main(tiny_args(base_ckpt, ref, *steps))
    real_lr = inverse_noise.lr_at

    def crash_at_27(step, *a, **k):
        if step == 27:
            raise KeyboardInterrupt
        return real_lr(step, *a, **k)

    monkeypatch.setattr(inverse_noise, "lr_at", crash_at_27)
    with pytest.raises(KeyboardInterrupt):
        inverse_noise.main(tiny_args(base_ckpt, cut, *steps))
    assert torch.load(cut / "corrector" / "ckpt.pt", weights_only=True)["step"] == 24
    monkeypatch.setattr(inverse_noise, "lr_at", real_lr)
    s = inverse_noise.main(tiny_args(base_ckpt, cut, *steps, "--resume"))
    assert s["corrector_final_loss"] == s_ref["corrector_final_loss"]

    def losses(out):
        rows = [json.loads(line) for line in open(out / "metrics.jsonl")]
        return [(r["step"], r["loss"]) for r in rows if r.get("phase") == "corrector"]

    assert losses(cut) == losses(ref) == [(30, s_ref["corrector_final_loss"])]
    a, b = (torch.load(o / "corrector" / "ckpt.pt", weights_only=True) for o in (ref, cut))
    for k in a["ema"]:
        assert torch.equal(a["ema"][k], b["ema"][k]), k
