"""Issue #9, "never lose a good run", on the CPU at tiny sizes:

1. bad input (flags, devices, folders, checkpoints, data files) exits 2 with one ``error:`` line
   and leaves earlier finished runs byte-identical, for every script and both module commands;
2. a diverging run exits 2 naming the step and the learning rate, and keeps its last good
   checkpoint;
3. --resume refuses a checkpoint made with other defining flags, and a damaged pool of samples;
4. SIGTERM saves a checkpoint and exits 143; --resume then ends with the uninterrupted run's
   weights;
5. every JSON file a run writes is strict JSON (no NaN / Infinity).

Issue #18 (the section at the end): 6. run folders know their owner (OUT/run.json) and the
classifier never replaces a file; 7. one writer per folder (OUT/.lock, a stale lock taken over);
8. no silent fallback; 9. a torn metrics.jsonl line dropped, nothing rewritten before the checks, a
resumed phase row not repeated; 10. OS errors one line naming the path; 11. sizes (seeds, counts
against memory); 12. torchrun usage errors printed once; 13. messages name the real cause;
14. SIGTERM / Ctrl-C outside a training loop (a real pgraft process in its diagnostic): a stopped:
line, 143 / 130; 15. progress lines from within one sampler batch; 16. a non-finite reward spec,
FID statistics that are not a covariance and an image beyond the pixel limit refused; 17. a
network whose attention cannot fit the CPU (a 256-pixel task on the tiny preset) and pgraft's
diagnostic beyond memory refused before work; 18. the reward classifier's training stopped by
SIGTERM / Ctrl-C; 19. a signal during a round's evaluation stops once that round is saved;
20. checkpoints named for what they are (a folder, a non-torch file, a pool without samples, a
finished run without its checkpoint). The benchmark driver's signals: test_benchmark.py.
"""

import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
import types

import numpy as np
import pytest
import torch

import common
import ddpo
import graft
import inverse_noise
import pgraft
import pretrain
from eval import fid as fid_cli
from models import load_checkpoint
from rewards import classifier as classifier_cli
from test_rewards import make_celeba_tree, make_mnist_pickle

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}
CUDA = torch.cuda.is_available()


TINY = [
    "--prompts",
    "50",
    "--M",
    "4",
    "--K",
    "1",
    "--train-steps",
    "20",
    "--eval-samples",
    "200",
    "--sample-steps",
    "10",
    "--device",
    "cpu",
]
LEMMA = ["--lemma-levels", "0.5", "--lemma-states", "16", "--lemma-continuations", "2"]
DDPO_TINY = ["--prompts", "16", "--M", "4", "--sample-steps", "10", "--batch-size", "64",
             "--eval-samples", "100", "--rounds", "1", "--device", "cpu"]
INV_TINY = [
    "--sample-steps",
    "5",
    "--invert-samples",
    "200",
    "--chunk-size",
    "100",
    "--train-steps",
    "5",
    "--eval-samples",
    "200",
    "--corrector-sample-steps",
    "1",
    "--base-sample-steps",
    "5",
    "--device",
    "cpu",
]


# ---------------------------------------------------------------- helpers ----
def _refuse_constant(name):
    raise ValueError(f"non-standard JSON constant {name}")


def strict_json(text):
    """json.loads refusing NaN, Infinity and -Infinity (Python's json module accepts them)."""
    return json.loads(text, parse_constant=_refuse_constant)


def check_strict_json_files(folder):
    """Every .json file and every line of every .jsonl file under ``folder`` parses strictly;
    returns how many files there were."""
    n = 0
    for d, _, files in os.walk(folder):
        for f in files:
            path = os.path.join(d, f)
            if f.endswith(".json"):
                strict_json(open(path).read())
                n += 1
            elif f.endswith(".jsonl"):
                for line in open(path):
                    if line.strip():
                        strict_json(line)
                n += 1
    return n


def file_hash(path):
    with open(path, "rb") as fh:
        return hashlib.sha256(fh.read()).hexdigest()


def tree_hash(folder):
    """{relative path: sha256} of every file under ``folder`` and {relative path/: "folder"} of
    every folder in it: equal means byte-identical, no file or folder (an empty one, a lock
    folder) made or removed."""
    out = {}
    for d, dirs, files in os.walk(folder):
        for name in dirs:
            out[os.path.relpath(os.path.join(d, name), folder) + os.sep] = "folder"
        for name in files:
            out[os.path.relpath(os.path.join(d, name), folder)] = file_hash(os.path.join(d, name))
    return out


def exits_2(main, argv, capsys):
    """Run a main as its command line does (common.run_main): exit code 2 and exactly one line on
    stderr, starting with ``error:`` and free of traceback text. Returns that line."""
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:
        common.run_main(lambda: main(argv))
    err = capsys.readouterr().err.strip()
    assert e.value.code == 2, (argv, e.value.code, err)
    assert err.startswith("error:") and "\n" not in err, (argv, err)
    assert "Traceback" not in err and "DataLoader" not in err, err
    return err


# ---------------------------------------------------------------- finished runs ----
def _pretrain(out, *flags):
    pretrain.main(
        [
            "--train-steps",
            "200",
            "--batch-size",
            "64",
            "--eval-samples",
            "200",
            "--device",
            "cpu",
            "--out",
            str(out),
            *flags,
        ]
    )
    return str(out / "ckpt.pt")


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """One finished tiny run of each script and the bad files the refusals are fed, under root.
    Attributes are the paths the BAD table's {name} fields refer to."""
    root = tmp_path_factory.mktemp("reliability")
    r = types.SimpleNamespace(
        root=root,
        pre=root / "pretrain",
        graft=root / "graft",
        pgraft=root / "pgraft",
        ddpo=root / "ddpo",
        inv=root / "inverse_noise",
        clf=root / "classifier",
        fid=root / "fid",
        bad=root / "bad",
    )
    r.base = _pretrain(r.pre)
    r.flow_dir = root / "flow"
    r.flow = _pretrain(r.flow_dir, "--model", "flow", "--train-steps", "100")
    graft.main(["--base", r.base, "--out", str(r.graft)] + TINY)
    pgraft.main(["--base", r.base, "--out", str(r.pgraft)] + TINY + LEMMA)
    ddpo.main(["--base", r.base, "--out", str(r.ddpo)] + DDPO_TINY)
    inverse_noise.main(["--base", r.flow, "--out", str(r.inv)] + INV_TINY)
    # fabricated MNIST: a tiny class-conditional base (another task's DDPM) and a classifier
    r.mnist = make_mnist_pickle(str(root / "data" / "mnist"), n=60)
    r.mnist_dir = root / "mnist_base"
    r.mnist_base = _pretrain(
        r.mnist_dir,
        "--task",
        "mnist",
        "--data-dir",
        r.mnist,
        "--preset",
        "tiny",
        "--train-steps",
        "2",
        "--batch-size",
        "4",
        "--eval-samples",
        "2",
        "--fid-samples",
        "0",
        "--warmup",
        "1",
    )
    classifier_cli.main(
        [
            "--task",
            "mnist",
            "--data-dir",
            r.mnist,
            "--train-steps",
            "3",
            "--batch-size",
            "8",
            "--eval-samples",
            "10",
            "--device",
            "cpu",
            "--out",
            str(r.clf / "clf.pt"),
        ]
    )
    # FID statistics: a good pair, a finished "run" that saved one of them, and broken ones
    bad = r.bad
    bad.mkdir()
    rng = np.random.default_rng(0)
    for name in ("a", "b"):
        f = rng.normal(size=(50, 4))
        np.savez(bad / f"{name}.npz", mu=f.mean(0), sigma=np.cov(f, rowvar=False))
    fid_cli.main([str(bad / "a.npz"), "--save-stats", str(r.fid / "stats.npz"), "--device", "cpu"])
    mu = rng.normal(size=4)
    mu[1] = np.nan
    np.savez(bad / "nan_mu.npz", mu=mu, sigma=np.eye(4))
    sigma = np.eye(4)
    sigma[2, 2] = np.inf
    np.savez(bad / "inf_sigma.npz", mu=np.zeros(4), sigma=sigma)
    (bad / "folder.npz").mkdir()
    (bad / "pngs").mkdir()
    for i in range(3):
        (bad / "pngs" / f"{i}.png").write_text("not an image")
    # bad checkpoints and data
    (bad / "text.txt").write_text("not a checkpoint\n")
    torch.save({"format": "pgraft-1"}, bad / "format_only.pt")
    raw = bad / "mnist_empty" / "MNIST" / "raw"  # torchvision's four files, the images empty
    raw.mkdir(parents=True)
    for name in (
        "train-images-idx3-ubyte",
        "train-labels-idx1-ubyte",
        "t10k-images-idx3-ubyte",
        "t10k-labels-idx1-ubyte",
    ):
        (raw / name).write_bytes(b"" if "images" in name else b"\x00\x00\x08\x01\x00\x00\x00\x00")
    lone = bad / "mnist_lone" / "MNIST" / "raw"  # only an empty train-images file
    lone.mkdir(parents=True)
    (lone / "train-images-idx3-ubyte").write_bytes(b"")
    r.celeba = make_celeba_tree(str(bad / "celeba"), n=12)
    with open(os.path.join(r.celeba, "img_align_celeba", "000003.jpg"), "wb") as f:
        f.write(b"this is not a JPEG" * 10)
    (root / "cwd").mkdir()  # bad commands run here: what they write by default shows in the hash
    return r


# ---------------------------------------------------------------- 1. bad input ----
MODULES = {
    "pretrain": pretrain,
    "graft": graft,
    "pgraft": pgraft,
    "ddpo": ddpo,
    "inverse_noise": inverse_noise,
    "classifier": classifier_cli,
    "fid": fid_cli,
}
# What every bad command of a script starts with; the case's own flags come after (the last
# one wins). --out is the script's finished run, so that any write to it shows in the hash.
DEFAULTS = {
    "pretrain": ["--device", "cpu", "--out", "{pre}", "--train-steps", "20", "--batch-size", "64"],
    "graft": ["--base", "{base}", "--out", "{graft}"] + TINY,
    "pgraft": ["--base", "{base}", "--out", "{pgraft}"] + TINY + LEMMA,
    "ddpo": ["--base", "{base}", "--out", "{ddpo}"] + DDPO_TINY,
    "inverse_noise": ["--base", "{flow}", "--out", "{inv}"] + INV_TINY,
    "classifier": [
        "--task",
        "mnist",
        "--data-dir",
        "{mnist}",
        "--train-steps",
        "3",
        "--batch-size",
        "8",
        "--device",
        "cpu",
        "--out",
        "{clf}/clf.pt",
    ],
    "fid": [],
}
TINY_MNIST = ["--task", "mnist", "--preset", "tiny", "--data-dir"]

# (script, case, flags ({name} is a path of the finished runs), a word the error line must contain)
BAD = [
    # -- pretrain.py
    ("pretrain", "train-steps-0", ["--train-steps", "0"], "--train-steps"),
    ("pretrain", "batch-size-neg", ["--batch-size", "-5"], "--batch-size"),
    ("pretrain", "eval-samples-neg", ["--eval-samples", "-5"], "--eval-samples"),
    ("pretrain", "lr-inf", ["--lr", "inf"], "--lr"),
    ("pretrain", "lr-nan", ["--lr", "nan"], "--lr"),
    ("pretrain", "lr-neg", ["--lr", "-1"], "--lr"),
    ("pretrain", "ema-decay-1.5", ["--ema-decay", "1.5"], "--ema-decay"),
    ("pretrain", "device-tpu", ["--device", "tpu"], "--device"),
    ("pretrain", "device-cuda", ["--device", "cuda"], "CUDA"),
    ("pretrain", "out-is-file", ["--out", "{pre}/summary.json"], "is a file"),
    ("pretrain", "preset-unknown", ["--preset", "nope"], "--preset"),
    ("pretrain", "preset-unknown-mnist", TINY_MNIST + ["{mnist}", "--preset", "nope"], "--preset"),
    ("pretrain", "task-unknown", ["--task", "nope"], "--task"),
    ("pretrain", "fid-samples-neg", ["--fid-samples", "-2"], "--fid-samples"),
    (
        "pretrain",
        "resume-other-model",
        ["--resume", "--model", "flow", "--train-steps", "200"],
        "--model",
    ),
    ("pretrain", "mnist-raw-empty", TINY_MNIST + ["{bad}/mnist_empty"], "MNIST"),
    ("pretrain", "mnist-raw-incomplete", TINY_MNIST + ["{bad}/mnist_lone"], "MNIST"),
    (
        "pretrain",
        "celeba-missing",
        ["--task", "celeba", "--preset", "tiny", "--data-dir", "{bad}/pngs"],
        "CelebA",
    ),
    # -- graft.py
    ("graft", "train-steps-0", ["--train-steps", "0"], "--train-steps"),
    ("graft", "batch-size-neg", ["--batch-size", "-5"], "--batch-size"),
    ("graft", "eval-samples-neg", ["--eval-samples", "-5"], "--eval-samples"),
    ("graft", "M-0", ["--M", "0"], "--M"),
    ("graft", "prompts-0", ["--prompts", "0"], "--prompts"),
    ("graft", "sample-steps-0", ["--sample-steps", "0"], "--sample-steps"),
    ("graft", "lr-inf", ["--lr", "inf"], "--lr"),
    ("graft", "lr-nan", ["--lr", "nan"], "--lr"),
    ("graft", "lr-neg", ["--lr", "-1"], "--lr"),
    ("graft", "ema-decay-1.5", ["--ema-decay", "1.5"], "--ema-decay"),
    ("graft", "device-tpu", ["--device", "tpu"], "--device"),
    ("graft", "device-cuda", ["--device", "cuda"], "CUDA"),
    ("graft", "out-is-file", ["--out", "{graft}/summary.json"], "is a file"),
    ("graft", "task-unknown", ["--task", "nope"], "--task"),
    ("graft", "K-above-M", ["--K", "9", "--M", "8"], "--K 9"),
    ("graft", "threshold-no-tau", ["--accept", "threshold"], "--tau"),
    ("graft", "sample-steps-above-N", ["--sample-steps", "201"], "--sample-steps"),
    ("graft", "eta-with-ddpm", ["--eta", "0.5", "--sampler", "ddpm"], "--eta"),
    ("graft", "cfg-unconditional", ["--cfg-scale", "2"], "--cfg-scale"),
    ("graft", "reward-unknown", ["--reward", "nope"], "reward"),
    ("graft", "base-missing", ["--base", "{bad}/absent.pt"], "absent.pt"),
    ("graft", "base-text", ["--base", "{bad}/text.txt"], "text.txt"),
    ("graft", "base-format-only", ["--base", "{bad}/format_only.pt"], "format_only.pt"),
    ("graft", "base-flow", ["--base", "{flow}"], "DDPM"),
    ("graft", "base-other-task", ["--base", "{mnist_base}"], "mnist"),
    ("graft", "resume-other-M", ["--resume", "--M", "8"], "--M"),
    ("graft", "resume-other-reward", ["--resume", "--reward", "linear:0"], "--reward"),
    # -- pgraft.py
    ("pgraft", "n-i-above-N", ["--n-i", "250"], "--n-i"),
    ("pgraft", "n-i-list", ["--n-i", "0.25,50"], "experiments.pgraft_sweep"),
    ("pgraft", "n-i-one-step-continuation", ["--n-i", "0.1", "--sample-steps", "10"],
     "deterministic"),
    ("pgraft", "n-i-abar-out-of-range", ["--n-i", "abar:1.5"], "abar"),
    ("pgraft", "ddim-eta-0", ["--sampler", "ddim", "--eta", "0"], "--eta 0"),
    ("pgraft", "M-0", ["--M", "0"], "--M"),
    ("pgraft", "prompts-0", ["--prompts", "0"], "--prompts"),
    ("pgraft", "sample-steps-0", ["--sample-steps", "0"], "--sample-steps"),
    ("pgraft", "sample-steps-above-N", ["--sample-steps", "201"], "--sample-steps"),
    ("pgraft", "lr-nan", ["--lr", "nan"], "--lr"),
    ("pgraft", "lemma-continuations-1", ["--lemma-continuations", "1"], "--lemma-continuations"),
    ("pgraft", "lemma-levels-bad", ["--lemma-levels", "0.5,7000"], "--lemma-levels"),
    ("pgraft", "cfg-unconditional", ["--cfg-scale", "2"], "--cfg-scale"),
    ("pgraft", "base-flow", ["--base", "{flow}"], "DDPM"),
    ("pgraft", "base-other-task", ["--base", "{mnist_base}"], "mnist"),
    ("pgraft", "resume-other-n-i", ["--resume", "--n-i", "0.5"], "--n-i"),
    # -- ddpo.py
    ("ddpo", "clip-range-0", ["--clip-range", "0"], "--clip-range"),
    ("ddpo", "adv-clip-neg", ["--adv-clip", "-1"], "--adv-clip"),
    ("ddpo", "inner-epochs-0", ["--inner-epochs", "0"], "--inner-epochs"),
    ("ddpo", "timestep-fraction-1.5", ["--timestep-fraction", "1.5"], "--timestep-fraction"),
    ("ddpo", "timestep-fraction-0", ["--timestep-fraction", "0"], "--timestep-fraction"),
    ("ddpo", "buffer-size-0", ["--buffer-size", "0"], "--buffer-size"),
    ("ddpo", "min-count-above-buffer", ["--min-count", "40", "--buffer-size", "20"], "--min-count"),
    ("ddpo", "kl-coef-neg", ["--kl-coef", "-0.1"], "--kl-coef"),
    ("ddpo", "kl-coef-nan", ["--kl-coef", "nan"], "--kl-coef"),
    ("ddpo", "lr-nan", ["--lr", "nan"], "--lr"),
    ("ddpo", "batch-size-0", ["--batch-size", "0"], "--batch-size"),
    ("ddpo", "ddim-eta-0", ["--sampler", "ddim", "--eta", "0"], "--eta 0"),
    ("ddpo", "eta-with-ddpm", ["--eta", "0.5", "--sampler", "ddpm"], "--eta"),
    ("ddpo", "sample-steps-1", ["--sample-steps", "1"], "no stochastic step"),
    ("ddpo", "sample-steps-above-N", ["--sample-steps", "201"], "--sample-steps"),
    ("ddpo", "cfg-unconditional", ["--cfg-scale", "2"], "--cfg-scale"),
    ("ddpo", "device-tpu", ["--device", "tpu"], "--device"),
    ("ddpo", "out-is-file", ["--out", "{ddpo}/summary.json"], "is a file"),
    ("ddpo", "base-flow", ["--base", "{flow}"], "DDPM"),
    ("ddpo", "base-text", ["--base", "{bad}/text.txt"], "text.txt"),
    ("ddpo", "base-other-task", ["--base", "{mnist_base}"], "mnist"),
    ("ddpo", "resume-other-clip-range", ["--resume", "--clip-range", "0.2"], "--clip-range"),
    # -- inverse_noise.py
    ("inverse_noise", "train-steps-0", ["--train-steps", "0"], "--train-steps"),
    ("inverse_noise", "sample-steps-0", ["--sample-steps", "0"], "--sample-steps"),
    ("inverse_noise", "invert-samples-0", ["--invert-samples", "0"], "--invert-samples"),
    ("inverse_noise", "lr-inf", ["--lr", "inf"], "--lr"),
    ("inverse_noise", "ema-decay-1.5", ["--ema-decay", "1.5"], "--ema-decay"),
    ("inverse_noise", "device-tpu", ["--device", "tpu"], "--device"),
    ("inverse_noise", "corrector-preset", ["--corrector-preset", "nope"], "--corrector-preset"),
    ("inverse_noise", "base-ddpm", ["--base", "{base}"], "rectified flow"),
    # a flow of another task was a traceback (its network met the task's images)
    ("inverse_noise", "base-other-task", ["--task", "mnist16", "--base", "{flow}"],
     "not of mnist16"),
    ("inverse_noise", "base-format-only", ["--base", "{bad}/format_only.pt"], "format_only.pt"),
    ("inverse_noise", "resume-other-n-fixed", ["--resume", "--n-fixed", "3"], "n_fixed"),
    # -- python -m rewards.classifier
    ("classifier", "train-steps-0", ["--train-steps", "0"], "--train-steps"),
    ("classifier", "batch-size-neg", ["--batch-size", "-5"], "--batch-size"),
    ("classifier", "eval-samples-neg", ["--eval-samples", "-5"], "--eval-samples"),
    ("classifier", "lr-nan", ["--lr", "nan"], "--lr"),
    ("classifier", "lr-inf", ["--lr", "inf"], "--lr"),
    ("classifier", "device-tpu", ["--device", "tpu"], "--device"),
    ("classifier", "device-cuda", ["--device", "cuda"], "CUDA"),
    ("classifier", "out-is-folder", ["--out", "{clf}"], "is a folder"),
    ("classifier", "task-unknown", ["--task", "toy2d"], "--task"),
    ("classifier", "mnist-raw-empty", ["--data-dir", "{bad}/mnist_empty"], "MNIST"),
    # -- python -m eval.fid
    ("fid", "nan-mu", ["{bad}/a.npz", "{bad}/nan_mu.npz"], "nan_mu.npz"),
    (
        "fid",
        "inf-sigma-save",
        ["{bad}/inf_sigma.npz", "--save-stats", "{fid}/stats.npz"],
        "inf_sigma.npz",
    ),
    ("fid", "non-image-pngs", ["{bad}/pngs", "{bad}/a.npz", "--device", "cpu"], "0.png"),
    ("fid", "missing-npz", ["{bad}/absent.npz", "{bad}/a.npz"], "absent.npz"),
    ("fid", "one-source", ["{bad}/a.npz"], "--save-stats"),
    ("fid", "save-stats-not-npz", ["{bad}/a.npz", "--save-stats", "{fid}/s.txt"], ".npz"),
    (
        "fid",
        "save-stats-folder",
        ["{bad}/a.npz", "--save-stats", "{bad}/folder.npz"],
        "is a folder",
    ),
    ("fid", "batch-size-0", ["{bad}/pngs", "{bad}/a.npz", "--batch-size", "0"], "--batch-size"),
    ("fid", "num-images-neg", ["{bad}/a.npz", "{bad}/b.npz", "--num-images", "-5"], "--num-images"),
    ("fid", "device-tpu", ["{bad}/pngs", "{bad}/a.npz", "--device", "tpu"], "--device"),
    ("fid", "unknown-flag", ["{bad}/a.npz", "{bad}/b.npz", "--bogus"], "--bogus"),
]
SUBPROCESS = [  # the real exit code of the real command lines
    (["pretrain.py"], "pretrain", ["--lr", "nan"], "--lr"),
    # an unreadable image read by a DataLoader worker: one line, no worker traceback. Run here, not
    # in-process: collecting the failed loader's workers in-process stalls for ~10 s
    (
        ["pretrain.py"],
        "pretrain",
        ["--task", "celeba", "--data-dir", "{celeba}", "--preset", "tiny", "--batch-size", "64"],
        "000003.jpg",
    ),
    (["graft.py"], "graft", ["--base", "{bad}/text.txt"], "text.txt"),
    (["pgraft.py"], "pgraft", ["--n-i", "250"], "--n-i"),
    (["ddpo.py"], "ddpo", ["--min-count", "40", "--buffer-size", "20"], "--min-count"),
    (["inverse_noise.py"], "inverse_noise", ["--base", "{base}"], "rectified flow"),
    (["-m", "rewards.classifier"], "classifier", ["--out", "{clf}"], "is a folder"),
    (["-m", "eval.fid"], "fid", ["{bad}/a.npz", "{bad}/nan_mu.npz"], "nan_mu.npz"),
]


def command(script, flags, r):
    """The default flags of ``script`` and the case's, with the finished runs' paths filled in."""
    paths = {k: str(v) for k, v in vars(r).items()}
    return [a.format(**paths) for a in DEFAULTS[script] + flags]


def params(cases, cmd=False):
    """pytest params of BAD (script, case, ...) or SUBPROCESS (command, script, ...) rows."""
    out = []
    for case in cases:
        script = case[1] if cmd else case[0]
        marks = []
        if "cuda" in case[2] and CUDA:
            marks.append(pytest.mark.skip(reason="CUDA is available here"))
        name = " ".join(case[0] + case[2]) if cmd else f"{script}-{case[1]}"
        out.append(pytest.param(*case, id=name, marks=marks))
    return out


def test_every_numeric_flag_refuses_a_bad_value(capsys):
    """Every number a script takes (a config field typed int or float) has a check, and a value
    the check refuses (the first of -1, 0, nan, inf, 1.5, nope that it rejects) exits 2 at parsing
    with one error line naming the flag; every script has rows in BAD. Bug it catches: a numeric
    flag declared or edited without its check, which would take a negative batch or a NaN rate
    into a run (counting the table's rows, as this test did, held by construction)."""
    import argparse
    import dataclasses

    import harness

    assert {c[0] for c in BAD} == set(MODULES)
    scripts = [pretrain, graft, pgraft, ddpo, inverse_noise]
    seen = 0
    for mod in scripts:
        for f in dataclasses.fields(mod.Args):
            if f.type not in (int, float) or isinstance(f.default, bool):
                continue
            check, flag = f.metadata.get("check"), "--" + f.name.replace("_", "-")
            assert check is not None, f"{mod.__name__}.py {flag} takes any number"
            bad = None
            for v in ("-1", "0", "nan", "inf", "1.5", "nope"):
                try:
                    check(v)
                except (argparse.ArgumentTypeError, ValueError, TypeError):
                    bad = v
                    break
            assert bad is not None, f"{mod.__name__}.py {flag}: its check refuses nothing"
            capsys.readouterr()
            with pytest.raises(SystemExit) as e:
                harness.parse(mod.Args, [flag, bad], task_defaults=mod.TASK_DEFAULTS)
            err = capsys.readouterr().err.strip()
            assert e.value.code == 2 and err.startswith("error:") and "\n" not in err, err
            assert flag in err, (mod.__name__, flag, err)
            seen += 1
    assert seen >= 60, seen


@pytest.mark.parametrize("script,name,flags,word", params(BAD))
def test_bad_input_exits_2_in_one_line_and_keeps_runs(
    runs, script, name, flags, word, capsys, monkeypatch
):
    monkeypatch.chdir(runs.root / "cwd")
    before = tree_hash(runs.root)
    err = exits_2(MODULES[script].main, command(script, flags, runs), capsys)
    assert word in err, err
    assert tree_hash(runs.root) == before, "a refused command changed a finished run's files"


@pytest.mark.parametrize("cmd,script,flags,word", params(SUBPROCESS, cmd=True))
def test_bad_input_subprocess_exit_code(runs, cmd, script, flags, word):
    """Run from runs.root/cwd (the scripts by their full path, the modules on PYTHONPATH), so that
    what a refused command would write by default, relative to where it runs, shows in the hash."""
    before = tree_hash(runs.root)
    cmd = [os.path.join(ROOT, c) if c.endswith(".py") else c for c in cmd]
    p = subprocess.run(
        [sys.executable, *cmd, *command(script, flags, runs)],
        cwd=runs.root / "cwd",
        env={**ENV, "PYTHONPATH": ROOT},
        capture_output=True,
        text=True,
        timeout=120,
    )
    err = p.stderr.strip()
    assert p.returncode == 2, (p.returncode, err)
    assert err.startswith("error:") and "\n" not in err and word in err, err
    assert "Traceback" not in err and "DataLoader" not in err, err
    assert tree_hash(runs.root) == before


# ---------------------------------------------------------------- 2. divergence ----
def check_kept(folder, ckpt_name, sha, step):
    assert file_hash(folder / ckpt_name) == sha, "the last good checkpoint was replaced"
    assert load_checkpoint(folder / ckpt_name)["step"] == step
    assert check_strict_json_files(folder) >= 2


def tame(real, scale=1e-9, stop_at=None):
    """The LR schedule scaled down, so that a run with a huge --lr saves a good checkpoint first;
    optionally cut short by a KeyboardInterrupt at step ``stop_at``, as a crash would."""

    def lr_at(step, total, lr, *a, **k):
        if stop_at is not None and step == stop_at:
            raise KeyboardInterrupt
        return real(step, total, lr * scale, *a, **k)

    return lr_at


def test_pretrain_divergence_names_step_and_lr_keeps_checkpoint(tmp_path, capsys, monkeypatch):
    huge = [
        "--lr",
        "1e8",
        "--grad-clip",
        "0",
        "--batch-size",
        "64",
        "--eval-samples",
        "100",
        "--device",
        "cpu",
    ]
    err = exits_2(
        pretrain.main, huge + ["--train-steps", "100", "--out", str(tmp_path / "a")], capsys
    )
    assert "step 100" in err and "--lr 1e+08" in err, err
    assert not (tmp_path / "a" / "ckpt.pt").exists()
    assert check_strict_json_files(tmp_path / "a") >= 1
    # a good checkpoint at step 100 made with these very flags; --resume then diverges by step 200
    out = tmp_path / "b"
    args = huge + ["--train-steps", "300", "--ckpt-every", "100", "--out", str(out)]
    real = pretrain.lr_at
    monkeypatch.setattr(pretrain, "lr_at", tame(real, stop_at=150))
    with pytest.raises(KeyboardInterrupt):
        pretrain.main(args)
    monkeypatch.setattr(pretrain, "lr_at", real)
    sha = file_hash(out / "ckpt.pt")
    err = exits_2(pretrain.main, args + ["--resume"], capsys)
    assert "step 200" in err and "--lr 1e+08" in err, err
    check_kept(out, "ckpt.pt", sha, 100)
    # what the message advises: resume the kept checkpoint with a lower learning rate (--lr may
    # change)
    s = pretrain.main(args + ["--resume", "--lr", "1e-3"])
    assert load_checkpoint(out / "ckpt.pt")["step"] == 300 and s["final_loss"] < 10


@pytest.mark.parametrize("script", ["graft", "pgraft"])
def test_finetune_divergence_names_step_and_lr_keeps_checkpoint(
    runs, script, tmp_path, capsys, monkeypatch
):
    mod = {"graft": graft, "pgraft": pgraft}[script]
    flags = (
        ["--base", runs.base]
        + TINY
        + (LEMMA if script == "pgraft" else [])
        + ["--lr", "1e6", "--grad-clip", "0"]
    )
    err = exits_2(mod.main, flags + ["--out", str(tmp_path / "a")], capsys)
    assert "step 20" in err and "--lr 1e+06" in err, err
    assert not (tmp_path / "a" / "ckpt.pt").exists()
    # round 1 saved with these very flags (a tamed schedule); --resume --rounds 2 diverges
    out = tmp_path / "b"
    real = mod.lr_at
    monkeypatch.setattr(mod, "lr_at", tame(real))
    mod.main(flags + ["--out", str(out), "--rounds", "1"])
    monkeypatch.setattr(mod, "lr_at", real)
    sha, pool = file_hash(out / "ckpt.pt"), file_hash(out / "pool_round1.pt")
    err = exits_2(mod.main, flags + ["--out", str(out), "--rounds", "2", "--resume"], capsys)
    assert "step 20" in err and "--lr 1e+06" in err, err
    check_kept(out, "ckpt.pt", sha, 1)
    assert file_hash(out / "pool_round1.pt") == pool


def test_inverse_noise_divergence_keeps_corrector_checkpoint(runs, tmp_path, capsys, monkeypatch):
    out = tmp_path / "inv"
    args = (
        ["--base", runs.flow, "--out", str(out)]
        + INV_TINY
        + ["--lr", "1e8", "--grad-clip", "0", "--train-steps", "300", "--ckpt-every", "100"]
    )
    real = inverse_noise.lr_at
    monkeypatch.setattr(inverse_noise, "lr_at", tame(real, stop_at=150))
    with pytest.raises(KeyboardInterrupt):
        inverse_noise.main(args)
    monkeypatch.setattr(inverse_noise, "lr_at", real)
    sha = file_hash(out / "corrector" / "ckpt.pt")
    err = exits_2(inverse_noise.main, args + ["--resume"], capsys)
    assert "step 200" in err and "--lr 1e+08" in err, err
    check_kept(out, os.path.join("corrector", "ckpt.pt"), sha, 100)


# ---------------------------------------------------------------- 3. resume ----
def test_pretrain_resume_without_checkpoint_starts_fresh(tmp_path, capsys):
    s = pretrain.main(
        [
            "--resume",
            "--train-steps",
            "5",
            "--batch-size",
            "16",
            "--eval-samples",
            "50",
            "--device",
            "cpu",
            "--out",
            str(tmp_path),
        ]
    )
    assert "starting fresh" in capsys.readouterr().out
    assert s["train_steps"] == 5 and load_checkpoint(tmp_path / "ckpt.pt")["step"] == 5


@pytest.mark.parametrize("damage", ["deleted", "truncated", "garbage", "a checkpoint"])
def test_graft_resume_with_damaged_pool_exits_2(runs, tmp_path, damage, capsys):
    out = tmp_path / "g"
    shutil.copytree(runs.graft, out)
    pool = out / "pool_round1.pt"
    if damage == "deleted":
        pool.unlink()
    elif damage == "truncated":
        pool.write_bytes(pool.read_bytes()[:100])
    elif damage == "garbage":
        pool.write_bytes(b"\x00" * 64)
    else:
        # a readable torch file that holds no samples (it ended in a KeyError traceback)
        shutil.copy(out / "ckpt.pt", pool)
    before = tree_hash(out)
    argv = ["--base", runs.base, "--out", str(out), "--resume", "--rounds", "2"] + TINY
    err = exits_2(graft.main, argv, capsys)
    assert "pool_round1.pt" in err and "--resume" in err, err
    assert tree_hash(out) == before


# ---------------------------------------------------------------- 4. SIGTERM ----
def test_sigterm_saves_and_resume_matches_uninterrupted_run(tmp_path):
    args = [
        "--train-steps",
        "600",
        "--batch-size",
        "64",
        "--ckpt-every",
        "0",
        "--eval-samples",
        "200",
        "--device",
        "cpu",
    ]
    cut = tmp_path / "cut"
    cmd = [sys.executable, "pretrain.py", *args, "--out", str(cut)]
    proc = subprocess.Popen(
        cmd, cwd=ROOT, env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True
    )
    try:
        deadline = time.time() + 120
        metrics = cut / "metrics.jsonl"
        while not (metrics.exists() and metrics.read_text().strip()):
            assert proc.poll() is None, "the run ended before it logged a row"
            assert time.time() < deadline, "no metrics row within 120 s"
            time.sleep(0.01)
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 143, (proc.returncode, err)
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("stopped:"), err
    assert "SIGTERM" in lines[0] and "--resume" in lines[0], err
    step = load_checkpoint(cut / "ckpt.pt")["step"]
    assert 100 <= step < 600 and f"at step {step}" in lines[0]
    assert not (cut / "summary.json").exists()
    (cut / "ckpt.pt.tmp.12345").write_bytes(b"debris of a writer killed mid-write")
    p = subprocess.run(
        cmd + ["--resume"], cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=120
    )
    assert p.returncode == 0, p.stderr
    assert f"resumed from {cut / 'ckpt.pt'} at step {step}" in p.stdout
    assert not (cut / "ckpt.pt.tmp.12345").exists()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the subprocesses run (OMP_NUM_THREADS=1)
    try:
        pretrain.main(args + ["--out", str(tmp_path / "whole")])
    finally:
        torch.set_num_threads(threads)
    a, b = load_checkpoint(tmp_path / "whole" / "ckpt.pt"), load_checkpoint(cut / "ckpt.pt")
    assert a["step"] == b["step"] == 600
    for part in ("model", "ema"):
        assert a[part].keys() == b[part].keys()
        for k in a[part]:
            assert torch.equal(a[part][k], b[part][k]), (part, k)
    strict_json((cut / "summary.json").read_text())


# ---------------------------------------------------------------- 5. strict JSON ----
def test_every_json_file_of_finished_runs_is_strict(runs):
    folders = [runs.pre, runs.flow_dir, runs.graft, runs.pgraft, runs.mnist_dir]
    for folder in folders + [runs.inv]:
        strict_json((folder / "summary.json").read_text())
        assert check_strict_json_files(folder) >= 3, folder
    assert (runs.pgraft / "lemma43.json").exists()
    with pytest.raises(ValueError, match="NaN"):
        strict_json('{"loss": NaN}')


# ---------------------------------------------------------------- issue 18 ----
# 6. run folders know their owner (OUT/run.json), one writer per folder (OUT/.lock);
# 7. no silent fallback (empty --out, missing --data-dir, --bf16 on a CPU, --classifier on toy2d);
# 8. a torn metrics.jsonl line is dropped, nothing is rewritten before the checks, a resumed phase
#    row is not repeated; 9. OS errors are one error: line naming the path; 10. sizes (seeds,
#    counts against memory); 11. under torchrun one error line; 12. messages name the cause.
TINY_PRE = ["--train-steps", "20", "--eval-samples", "50"]


def _run_cmd(args, timeout=300, **kw):
    return subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=timeout, env=ENV, **kw)


def test_run_folder_knows_its_owner(tmp_path, capsys):
    out = tmp_path / "pre"
    capsys.readouterr()
    _pretrain(out, *TINY_PRE, "--bf16")
    said = capsys.readouterr().out
    # --bf16 on a CPU is said, not ignored
    assert "note: --bf16 does nothing on cpu" in said
    owner = json.loads((out / "run.json").read_text())
    assert owner == {"script": "pretrain", "kind": "toy2d ddpm"}
    assert not (out / ".lock").exists()
    before = tree_hash(out)
    # another script's --resume into this folder
    err = exits_2(graft.main, [*TINY, "--out", str(out), "--resume", "--base",
                               str(out / "ckpt.pt")], capsys)
    assert "holds a run of pretrain.py (toy2d ddpm), not of graft.py" in err
    # the same script, another kind (a flow into a DDPM's folder)
    err = exits_2(pretrain.main, [*TINY_PRE, "--device", "cpu", "--model", "flow", "--out",
                                  str(out), "--resume"], capsys)
    assert "not of pretrain.py (toy2d flow)" in err
    # the classifier's --out on an existing checkpoint, and an empty --out
    err = exits_2(classifier_cli.main, ["--out", str(out / "ckpt.pt"), "--device", "cpu"], capsys)
    assert "exists (a mlp checkpoint of task toy2d)" in err
    err = exits_2(classifier_cli.main, ["--out", "", "--device", "cpu"], capsys)
    assert "--out is empty" in err
    # a folder without run.json holding files no run recorded
    stray = tmp_path / "stray"
    stray.mkdir()
    (stray / "metrics.jsonl").write_text('{"mine": 1}\n')
    err = exits_2(pretrain.main, [*TINY_PRE, "--device", "cpu", "--out", str(stray)], capsys)
    assert "no run of pretrain.py recorded" in err
    assert tree_hash(out) == before and (stray / "metrics.jsonl").read_text() == '{"mine": 1}\n'


def test_one_writer_per_folder_and_stale_lock_taken_over(tmp_path):
    """Real processes: a live lock holder refuses a second writer; a killed one's lock is taken
    over with a line saying so."""
    out = tmp_path / "locked"
    out.mkdir()
    holder = subprocess.Popen(["sleep", "300"])
    try:
        (out / ".lock").write_text(f"{holder.pid} {__import__('socket').gethostname()}\n")
        cmd = ["pretrain.py", *TINY_PRE, "--device", "cpu", "--out", str(out)]
        p = _run_cmd(cmd)
        assert p.returncode == 2, p.stderr
        assert p.stderr.strip() == (f"error: --out {out} is in use by process {holder.pid} on "
                                    f"{__import__('socket').gethostname()} ({out / '.lock'}); "
                                    f"wait for it to end, or pass another --out")
        assert sorted(os.listdir(out)) == [".lock"]
    finally:
        holder.kill()
        holder.wait()
    p = _run_cmd(cmd)
    assert p.returncode == 0, p.stderr
    assert f"taking over the stale lock {out / '.lock'} of process {holder.pid}" in p.stdout
    assert not (out / ".lock").exists() and (out / "summary.json").exists()


def test_no_silent_fallbacks(tmp_path, capsys):
    err = exits_2(pretrain.main, [*TINY_PRE, "--device", "cpu", "--task", "mnist16", "--data-dir",
                                  str(tmp_path / "absent"), "--out", str(tmp_path / "a")], capsys)
    assert "--data-dir" in err and "is not a folder" in err
    err = exits_2(graft.main, [*TINY, "--classifier", str(tmp_path / "c.pt"), "--out",
                               str(tmp_path / "b")], capsys)
    assert "--classifier: the toy2d rewards are analytic" in err
    err = exits_2(graft.main, [*TINY, "--out", ""], capsys)
    assert "--out is empty" in err
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


def test_resume_of_a_finished_run_without_its_checkpoint_is_refused(runs, tmp_path, capsys):
    """--resume into a finished run whose ckpt.pt is gone used to start afresh over its record."""
    out = tmp_path / "g"
    shutil.copytree(runs.graft, out)
    (out / "ckpt.pt").unlink()
    before = tree_hash(out)
    err = exits_2(graft.main, ["--base", runs.base, "--out", str(out), "--resume", "--rounds",
                               "2"] + TINY, capsys)
    assert "holds a finished run (summary.json) but no checkpoint" in err, err
    assert tree_hash(out) == before


def test_torn_metrics_line_dropped_nothing_rewritten_first(tmp_path, capsys):
    out = tmp_path / "pre"
    _pretrain(out, *TINY_PRE, "--ckpt-every", "10")
    rows = (out / "metrics.jsonl").read_text()
    args_json = (out / "args.json").read_bytes()
    # a damaged middle line: one error: line, args.json and the log untouched
    (out / "metrics.jsonl").write_text('{"step": 1, "lo\n' + rows)
    err = exits_2(pretrain.main, [*TINY_PRE, "--ckpt-every", "10", "--device", "cpu", "--out",
                                  str(out), "--resume", "--batch-size", "64"], capsys)
    assert "metrics.jsonl line 1 is not a JSON row" in err
    assert (out / "args.json").read_bytes() == args_json
    # a torn last line (a kill mid-append): dropped with a line saying so, the run resumes
    (out / "metrics.jsonl").write_text(rows + '{"step": 30, "lo')
    capsys.readouterr()
    _pretrain(out, *TINY_PRE, "--ckpt-every", "10", "--resume")
    assert "dropping its torn last line" in capsys.readouterr().out
    kept = [json.loads(ln) for ln in (out / "metrics.jsonl").read_text().splitlines()]
    assert all(isinstance(r, dict) for r in kept)


def test_resumed_log_does_not_repeat_a_phase_row(tmp_path):
    args = types.SimpleNamespace(resume=False)
    log = common.RunLog(str(tmp_path), args)
    log.log(phase="gaussianity", mean=0.5, seconds=1.0)
    log.log(step=5, loss=1.0)
    log.log(step=10, loss=0.9)
    args.resume = True
    log = common.RunLog(str(tmp_path), args, resumed_at=("step", 5))
    log.log(phase="gaussianity", mean=0.5, seconds=2.0)
    log.log(step=10, loss=0.9)
    rows = [json.loads(ln) for ln in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r.get("phase", r.get("step")) for r in rows] == ["gaussianity", 5, 10]


def test_os_error_is_one_line_naming_the_path(tmp_path):
    """A real process under a 64 KB file-size limit: the checkpoint cannot be written."""
    import resource

    def limit():
        resource.setrlimit(resource.RLIMIT_FSIZE, (64_000, 64_000))

    out = tmp_path / "full"
    p = _run_cmd(["pretrain.py", *TINY_PRE, "--device", "cpu", "--out", str(out)],
                 preexec_fn=limit)
    err = p.stderr.strip()
    assert p.returncode == 2, err
    assert err.startswith(f"error: cannot write or read {out / 'ckpt.pt'}: ") and "\n" not in err
    assert not (out / "ckpt.pt").exists()


def test_sizes_checked_before_work(tmp_path, capsys):
    for flags, word in [(["--seed", str(2**63)], "must be <= 9223372036854775807"),
                        (["--batch-size", str(10**11)], "more than the"),
                        (["--eval-samples", str(10**12)], "use a smaller --eval-samples")]:
        err = exits_2(pretrain.main, [*TINY_PRE, "--device", "cpu", "--out",
                                      str(tmp_path / "s"), *flags], capsys)
        assert word in err, err
    err = exits_2(graft.main, [*TINY, "--M", str(10**9), "--out", str(tmp_path / "s")], capsys)
    assert "--prompts x --M" in err
    # the Lemma 4.3 diagnostic holds every continuation at once (was an OOM traceback)
    err = exits_2(pgraft.main, [*TINY, "--lemma-continuations", str(10**9), "--out",
                                str(tmp_path / "s")], capsys)
    assert "--lemma-states x --lemma-continuations" in err
    err = exits_2(classifier_cli.main, ["--seed", str(2**64), "--out", str(tmp_path / "c.pt")],
                  capsys)
    assert "[0, 2^63)" in err
    assert not (tmp_path / "s").exists()


def test_a_256_pixel_preset_that_cannot_fit_says_so(tmp_path, capsys):
    """The tiny preset's middle attention at 256 pixels attends over 128 x 128 positions: about
    12 GiB per training image on a CPU, refused before any work (it was killed by the kernel)."""
    from PIL import Image

    from models.unet import unet_from_preset

    folder = tmp_path / "faces"
    folder.mkdir()
    for i in range(4):
        Image.fromarray(np.full((256, 256, 3), 40 * i, np.uint8)).save(folder / f"{i}.png")
    out = tmp_path / "big"
    err = exits_2(pretrain.main, ["--task", "celebahq", "--data-dir", str(folder), "--preset",
                                  "tiny", "--batch-size", "4", "--train-steps", "1", "--device",
                                  "cpu", "--out", str(out)], capsys)
    assert "--batch-size 4: this network's attention on 256x256 images needs at least 48 GiB" in err
    assert not out.exists()
    # the 256-pixel presets attend at 16 x 16 and below: a training batch of 64 fits
    base = unet_from_preset("base256", 256, 3)
    common.check_attention_memory(base, (3, 256, 256), {"--batch-size": (64, True)},
                                  torch.device("cpu"))


def test_torchrun_usage_error_printed_once_every_rank_exits_2(tmp_path):
    p = _run_cmd(["-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                  "pretrain.py", "--seed", str(2**64), "--device", "cpu", "--out",
                  str(tmp_path / "t")])
    assert p.returncode != 0
    assert p.stderr.count("error: argument --seed") == 1, p.stderr
    assert "exitcode  : 2" in p.stderr and "exitcode  : 1" not in p.stderr


def test_messages_name_the_real_cause(tmp_path):
    import ddpo
    import harness
    from models import save_checkpoint
    from tasks import get_task

    args, _ = harness.parse(ddpo.Args, ["--kl-coef", "1000", "--device", "cpu", "--out",
                                        str(tmp_path / "d")])
    run = harness.Run(args, script="ddpo", out=None)
    run.log = types.SimpleNamespace(log=lambda **row: None)
    with pytest.raises(common.Diverged, match="KL weight --kl-coef 1000 or --lr"):
        run.step(torch.tensor(1e6), step=100, steps=200, model=None, lr=args.lr)
    # a UNet saved for toy2d: its own task, a network that does not fit it
    net = common.build_network(get_task("mnist16"), "ddpm")
    save_checkpoint(str(tmp_path / "u.pt"), net, step=1, args=dict(task="toy2d"))
    with pytest.raises(common.UsageError) as e:
        common.load_base(str(tmp_path / "u.pt"), "cpu", task=get_task("toy2d"))
    assert "not of toy2d" not in str(e.value) and "does not fit task toy2d" in str(e.value)


# ---------------------------------------------------------------- issue 18, items 7 and 8 ----
# 14. SIGTERM / Ctrl-C outside a training loop (the Lemma 4.3 diagnostic): a stopped: line, 143 /
# 130; 15. progress lines from within one long sampler batch.
@pytest.mark.parametrize("sig,code", [
    (signal.SIGTERM, 143),
    (signal.SIGINT, 130),
])
def test_stop_signal_during_the_diagnostic_says_stopped(tmp_path, sig, code):
    """A real pgraft process with a long Lemma 4.3 diagnostic, signalled once it has begun."""
    base = tmp_path / "base"
    _pretrain(base, *TINY_PRE)
    out = tmp_path / "pg"
    lemma = ["--lemma-levels", "0.5", "--lemma-states", "20000", "--lemma-continuations", "64"]
    # a suite started in the background of a non-interactive shell ignores SIGINT, and a child
    # inherits that (Python then installs no Ctrl-C handler): the child gets a terminal's default
    proc = subprocess.Popen([sys.executable, "pgraft.py", "--base", str(base / "ckpt.pt"),
                             "--out", str(out), *TINY, *lemma], cwd=ROOT, env=ENV,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    try:
        deadline = time.time() + 120
        # run.json is written by Run.begin; the diagnostic follows at once
        while not (out / "run.json").exists():
            assert proc.poll() is None, proc.communicate()[1]
            assert time.time() < deadline, "the run did not begin within 120 s"
            time.sleep(0.01)
        time.sleep(1.0)
        assert proc.poll() is None, "the diagnostic ended before the signal"
        proc.send_signal(sig)
        _, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == code, err
    assert "Traceback" not in err, err
    assert err.strip().splitlines()[-1].startswith("stopped: "), err
    # nothing half-made: no summary, no lock left behind; the run's record kept for --resume
    assert not (out / "summary.json").exists() and not (out / ".lock").exists()
    assert (out / "run.json").exists()


@pytest.mark.parametrize("sig,code", [(signal.SIGTERM, 143), (signal.SIGINT, 130)])
def test_stop_signal_while_training_the_classifier(tmp_path, sig, code):
    """rewards.classifier (no harness: rewards/ sits below it) said nothing on SIGTERM (-15) and
    gave a traceback on Ctrl-C; now a stopped: line, 143 / 130, and no file written."""
    data = make_mnist_pickle(str(tmp_path / "mnist"), n=60)
    out = tmp_path / "clf.pt"
    proc = subprocess.Popen([sys.executable, "-m", "rewards.classifier", "--task", "mnist16",
                             "--data-dir", data, "--device", "cpu", "--train-steps", "1000000",
                             "--out", str(out)], cwd=ROOT, env=ENV, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    try:
        # the settings line comes just before the training loop
        assert proc.stdout.readline().startswith("== reward classifier")
        time.sleep(1.0)
        proc.send_signal(sig)
        _, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == code, err
    assert err.strip().splitlines() == [err.strip().splitlines()[-1]], err
    assert err.strip().startswith("stopped: SIG") and "nothing was written" in err
    assert not out.exists()


def test_sigterm_during_a_rounds_evaluation_stops_after_that_round(runs, tmp_path, monkeypatch,
                                                                   capsys):
    """A real SIGTERM that lands in round 1's evaluation stops the run once round 1 is saved; it
    used to wait through round 2's sampling and stop at its first fine-tuning step."""
    real = common.print_eval

    def print_eval(tag, ev):
        real(tag, ev)
        if tag == "round 1":
            os.kill(os.getpid(), signal.SIGTERM)

    monkeypatch.setattr(common, "print_eval", print_eval)
    out = tmp_path / "g"
    with pytest.raises(SystemExit) as e:
        common.run_main(lambda: graft.main(["--base", runs.base, "--out", str(out), "--rounds",
                                            "3"] + TINY))
    assert e.value.code == 143
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("stopped: SIGTERM after round 1; round 1 is saved"), err
    assert load_checkpoint(out / "ckpt.pt")["step"] == 1
    rows = [json.loads(ln) for ln in (out / "metrics.jsonl").read_text().splitlines()]
    assert max(r.get("round", 0) for r in rows) == 1


def test_stop_signal_after_a_loops_last_check_still_stops():
    """A signal that arrives after a loop's last check (an inversion's last chunk) stops the run
    when the loop's StopSignals scope ends, instead of being forgotten."""
    with pytest.raises(common.Interrupted) as e:
        with common.StopSignals() as stop:
            stop.requested = "SIGTERM"
    assert e.value.code == 143 and "--resume" in str(e.value)


def test_progress_lines_from_within_one_sampler_batch(tmp_path, monkeypatch, capsys):
    """One batch of 50 sampler steps, a progress interval of 0 s: lines from inside the batch."""
    import harness
    import tasks
    from models import DDPM

    monkeypatch.setattr(tasks, "PROGRESS_EVERY_S", 0)
    args, _ = harness.parse(pretrain.Args, ["--device", "cpu", "--out", str(tmp_path / "p")])
    run = harness.Run(args, script="pretrain", out=None)
    process = DDPM(n_steps=50)
    net = lambda x, n, y=None: torch.zeros_like(x)  # noqa: E731
    capsys.readouterr()
    for z, _, gen in run.noise_batches(8, shape=(2,), seed=0, batch=8):
        process.sample(net, z, generator=gen, progress=run.batch_progress)
    lines = [ln for ln in capsys.readouterr().err.splitlines() if "steps of sample batch" in ln]
    assert len(lines) >= 10, lines
    assert lines[-1].startswith("sampler steps of sample batch 1/1: ")


# 16. item 5/6 leftovers: a reward spec that is not a finite number, FID statistics that are not a
# covariance, an image in an FID folder beyond the pixel limit: one error each, before any work
def test_reward_fid_and_image_limits_refused(tmp_path, capsys, monkeypatch):
    from PIL import Image

    import rewards
    from tasks import get_task

    for spec in ("linear:1e999", "linear:nan"):
        with pytest.raises(common.UsageError, match="a finite number"):
            rewards.get_reward(spec, get_task("toy2d"))
    rng = np.random.default_rng(0)
    f = rng.normal(size=(50, 4))
    np.savez(tmp_path / "a.npz", mu=f.mean(0), sigma=np.cov(f, rowvar=False))
    np.savez(tmp_path / "neg.npz", mu=f.mean(0), sigma=-np.eye(4))
    asym = np.eye(4)
    asym[0, 1] = 0.5
    np.savez(tmp_path / "asym.npz", mu=f.mean(0), sigma=asym)
    for bad in ("neg", "asym"):
        err = exits_2(fid_cli.main, [str(tmp_path / "a.npz"), str(tmp_path / f"{bad}.npz"),
                                     "--device", "cpu"], capsys)
        assert f"{bad}.npz: sigma is not a covariance" in err, err
    monkeypatch.setattr(fid_cli, "MAX_PIXELS", 100)
    (tmp_path / "imgs").mkdir()
    Image.new("RGB", (20, 20)).save(tmp_path / "imgs" / "big.png")
    with pytest.raises(fid_cli.FIDInputError, match="20x20 pixels, more than the 100"):
        fid_cli.ImageFolder(str(tmp_path / "imgs"))[0]
