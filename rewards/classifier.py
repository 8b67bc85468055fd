"""Learned classifier rewards, trained by the project on real labels: the small-scale analogue of
the paper's VQAScore ("does the image show what was asked?").

    python -m rewards.classifier --task mnist     # digits, ~1 min on 2 CPU cores, >98% accuracy
    python -m rewards.classifier --task celeba --device cuda   # 40 attributes, aligned CelebA

Each writes its checkpoint to runs/rewards/<task>-classifier.pt (atomic, weights-only loadable) and
reports its held-out accuracy (MNIST test split, CelebA val split). The rewards:

  DigitReward      r = log p(requested digit | image)  (the condition, or a fixed target digit)
  AttributeReward  r = sum over requested attributes a of log p(a has the requested sign | image)

A reward whose checkpoint is missing trains it first with the defaults below, saying so.
"""

import argparse
import math
import os
import signal
import sys
import time

import torch
import torch.nn as nn
import torch.nn.functional as F

from models import CheckpointError, load_checkpoint, lr_at, save_checkpoint
from tasks import Batches, DataError, UsageError, get_task

from . import Reward

# Per task: training split, held-out split, outputs, network width, optimiser steps, batch, LR.
# fmt: off
SETTINGS = {
    "mnist": dict(train="train", heldout="test", outputs=10, width=16, steps=800, batch_size=128,
                  lr=2e-3),
    "mnist16": dict(train="train", heldout="test", outputs=10, width=16, steps=800, batch_size=128,
                    lr=2e-3),  # the 16x16 digits (mnist16, and each half of mnist-pairs16)
    "celeba": dict(train="train", heldout="val", outputs=40, width=32, steps=6000, batch_size=128,
                   lr=1e-3),
}
# fmt: on


def default_path(task_name):
    return os.path.join("runs", "rewards", f"{task_name}-classifier.pt")


class Classifier(nn.Module):
    """A small CNN: conv-ReLU-maxpool stages down to 4x4, then a 128-unit MLP head."""

    def __init__(self, in_ch=1, image_size=32, num_outputs=10, width=16):
        super().__init__()
        self.config = dict(
            kind="classifier",
            in_ch=in_ch,
            image_size=image_size,
            num_outputs=num_outputs,
            width=width,
        )
        layers, c, res = [], in_ch, image_size
        while res > 4:
            c_out = width * 2 ** min(len(layers) // 3, 3)
            layers += [nn.Conv2d(c, c_out, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2)]
            c, res = c_out, res // 2
        self.features = nn.Sequential(*layers)
        self.head = nn.Sequential(
            nn.Flatten(), nn.Linear(c * res * res, 128), nn.ReLU(), nn.Linear(128, num_outputs)
        )

    def forward(self, x):
        return self.head(self.features(x))

    def embed(self, x):
        """The 128-d penultimate features (the feature space of eval/classifier_fid.py)."""
        return self.head[:-1](self.features(x))


def _logits(model, x, chunk=1000):
    return torch.cat([model(x[i : i + chunk]) for i in range(0, len(x), chunk)])


def _embed(model, x, chunk=1000):
    return torch.cat([model.embed(x[i : i + chunk]) for i in range(0, len(x), chunk)])


@torch.no_grad()
def heldout_accuracy(model, data, device, multilabel, batch_size=500, limit=None):
    """Accuracy on a held-out dataset: top-1 (digits) or mean per-attribute (CelebA)."""
    model.eval()
    n = min(len(data), limit or len(data))
    if hasattr(data, "tensors"):  # slices stop at n: exactly n images are scored and divided by
        batches = (
            (
                data.tensors[0][i : min(i + batch_size, n)],
                data.tensors[1][i : min(i + batch_size, n)],
            )
            for i in range(0, n, batch_size)
        )
    else:
        sub = torch.utils.data.Subset(data, range(n))
        batches = torch.utils.data.DataLoader(sub, batch_size, num_workers=2)
    correct = torch.zeros((), device=device)
    for x, y in batches:
        logits = model(x.to(device))
        y = y.to(device)
        correct += (
            ((logits > 0) == (y > 0)).float().mean(1).sum()
            if multilabel
            else (logits.argmax(1) == y).sum()
        )
    return correct.item() / n, n


def train_classifier(
    task_name,
    out=None,
    steps=None,
    batch_size=None,
    lr=None,
    data_dir=None,
    device="cpu",
    seed=0,
    heldout_limit=None,
    part=None,
    model=None,
):
    """Train the task's reward classifier on its train split; returns the saved checkpoint's
    summary. ``part`` 0 or 1: only the first or the second half of the split (the benchmark trains
    the reward classifier on one half and the network of its FID features on the other);
    ``model``: another network to train in place of ``Classifier`` (its ``config`` is saved)."""
    if task_name not in SETTINGS:
        raise UsageError(
            f"no reward classifier for task {task_name!r}; choose from {', '.join(SETTINGS)}"
        )
    s = SETTINGS[task_name]
    task = get_task(task_name)
    device = torch.device(device)
    out = out or default_path(task_name)
    steps, batch_size, lr = steps or s["steps"], batch_size or s["batch_size"], lr or s["lr"]
    torch.manual_seed(seed)
    data = task.dataset(s["train"], data_dir)
    heldout = task.dataset(s["heldout"], data_dir)
    multilabel = task_name == "celeba"
    attr_names = list(getattr(data, "attr_names", []))
    if part is not None:
        data = half_of(data, part)
    if model is None:
        model = Classifier(task.channels, task.image_size, s["outputs"], s["width"])
    model = model.to(device)
    label = "reward classifier" if model.config["kind"] == "classifier" else model.config["kind"]
    print(
        f"== {label} for {task_name}: device {device}, "
        f"{sum(p.numel() for p in model.parameters()) / 1e6:.3f}M parameters, "
        f"{len(data)} train examples, "
        f"held-out {s['heldout']} ({len(heldout)}), {steps} steps of batch {batch_size} "
        f"({steps * batch_size / len(data):.2f} epochs), out {out}"
    )
    batches = Batches(data, batch_size, device, seed=seed)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    t0 = time.time()
    model.train()
    running = []
    for step in range(steps):
        for group in opt.param_groups:
            group["lr"] = lr_at(step, steps, lr, "cosine", warmup=min(50, steps // 10))
        x, y = next(batches)
        logits = model(x)
        loss = (
            F.binary_cross_entropy_with_logits(logits, (y > 0).float())
            if multilabel
            else F.cross_entropy(logits, y)
        )
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        running.append(loss.detach())
        if (step + 1) % 200 == 0 or step + 1 == steps:
            mean = torch.stack(running).mean().item()  # one host sync per 200 steps
            if not math.isfinite(mean) or mean > 1e3:
                raise UsageError(
                    f"the classifier diverged by step {step + 1} (loss {mean:.4g}); the learning "
                    f"rate --lr {lr} is likely too high: lower it (nothing was written)"
                )
            print(
                f"   step {step + 1}/{steps}: loss {mean:.4f} ({time.time() - t0:.0f}s)", flush=True
            )
            running.clear()
    acc, n = heldout_accuracy(model, heldout, device, multilabel, limit=heldout_limit)
    what = "mean per-attribute accuracy" if multilabel else "accuracy"
    print(
        f"held-out {what}: {acc:.4f} on {task_name} {s['heldout']} ({n} images); "
        f"train time {time.time() - t0:.0f}s"
    )
    info = dict(
        task=task_name,
        part=part,
        accuracy=acc,
        heldout_split=s["heldout"],
        heldout_n=n,
        attr_names=attr_names,
        steps=steps,
        train_time_s=round(time.time() - t0, 1),
    )
    save_checkpoint(
        out,
        model.cpu(),
        step=steps,
        args=dict(task=task_name, steps=steps, batch_size=batch_size, lr=lr, seed=seed),
        extra=info,
    )
    print(f"wrote {out}")
    return info


def half_of(data, part):
    """The first (``part`` 0) or second (1) half of a dataset, by index."""
    if part not in (0, 1):
        raise UsageError(f"part {part!r}: 0 (first half) or 1 (second half)")
    n = len(data)
    lo, hi = (0, n // 2) if part == 0 else (n // 2, n)
    if hasattr(data, "tensors"):
        return torch.utils.data.TensorDataset(*(t[lo:hi] for t in data.tensors))
    return torch.utils.data.Subset(data, range(lo, hi))


def load_classifier(task_name, device="cpu", path=None, data_dir=None, train_if_missing=True):
    """(model, info) of the cached classifier; trains it first (saying so) when the file is
    missing."""
    path = path or default_path(task_name)
    if not os.path.isfile(path):
        if not train_if_missing:
            raise CheckpointError(
                f"reward classifier {path} is missing; train it with "
                f"`python -m rewards.classifier --task {task_name} --out {path}`"
            )
        print(
            f"reward classifier {path} not found: training it now "
            f"(the same as `python -m rewards.classifier --task {task_name} --out {path}`)",
            flush=True,
        )
        dev = "cuda" if torch.device(device).type == "cuda" else "cpu"
        train_classifier(task_name, out=path, data_dir=data_dir, device=dev)
    ckpt = load_checkpoint(path)
    cfg = dict(ckpt["model_config"])
    info = ckpt.get("extra") or {}
    if cfg.pop("kind", None) != "classifier" or info.get("task") != task_name:
        raise CheckpointError(
            f"{path} is not a {task_name} reward classifier ({_what_is(path)}); train one into a "
            f"new file with `python -m rewards.classifier --task {task_name} --out NEW.pt` and "
            f"pass --classifier NEW.pt"
        )
    model = Classifier(**cfg)
    model.load_state_dict(ckpt["model"])
    return model.to(device).eval().requires_grad_(False), info


class DigitReward(Reward):
    """r = log p(digit | image) from the MNIST classifier; the digit is the condition y (class-
    conditional model) or a fixed ``target`` (unconditional model)."""

    log_prob = True

    def __init__(self, device, target=None, data_dir=None, path=None, classifier_task="mnist"):
        self.model, self.info = load_classifier(classifier_task, device, path, data_dir)
        self.target = target
        self.uses_conditions = target is None
        self.name = "digit" if target is None else f"digit:{target}"
        self.description = (
            f"log p({'requested digit' if target is None else target} | image), "
            f"classifier test accuracy {self.info.get('accuracy', float('nan')):.4f}"
        )

    def _labels(self, x, y):
        if self.target is not None:
            return torch.full((len(x),), self.target, dtype=torch.long, device=x.device)
        if y is None:
            raise UsageError(
                "reward 'digit' scores the requested digit but got no conditions; "
                "use --reward digit:K for an unconditional model"
            )
        return y.long()

    def score(self, x, y=None):
        lab = self._labels(x, y)
        return _logits(self.model, x).log_softmax(1).gather(1, lab[:, None])[:, 0]

    @torch.no_grad()
    def metrics(self, x, y=None):
        return {
            "accuracy": (_logits(self.model, x).argmax(1) == self._labels(x, y))
            .float()
            .mean()
            .item()
        }

    @torch.no_grad()
    def features(self, x):
        return _embed(self.model, x)


class PairReward(Reward):
    """Two digits side by side (mnist-pairs): r = log p(left | left half) + log p(right | right
    half) from the project's digit classifier applied to each half, the condition being
    y = 10 * left + right. ``accuracy``: both halves classified as requested."""

    uses_conditions = True
    name = "pairs"
    log_prob = True

    def __init__(self, device, data_dir=None, path=None, classifier_task="mnist"):
        self.model, self.info = load_classifier(classifier_task, device, path, data_dir)
        acc = self.info.get("accuracy", float("nan"))
        self.description = (
            f"log p(left | left half) + log p(right | right half), digit "
            f"classifier test accuracy {acc:.4f}"
        )

    @staticmethod
    def halves(x, y):
        """(left halves, right halves, left digits, right digits)."""
        if y is None:
            raise UsageError(
                "reward 'pairs' scores the requested pair but got no conditions; the "
                "mnist-pairs model must be class-conditional"
            )
        w = x.shape[-1] // 2
        return x[..., :w], x[..., w:], y.long() // 10, y.long() % 10

    def score(self, x, y=None):
        xl, xr, a, b = self.halves(x, y)
        lp_l = _logits(self.model, xl).log_softmax(1).gather(1, a[:, None])[:, 0]
        return lp_l + _logits(self.model, xr).log_softmax(1).gather(1, b[:, None])[:, 0]

    @torch.no_grad()
    def metrics(self, x, y=None):
        xl, xr, a, b = self.halves(x, y)
        ok_l, ok_r = _logits(self.model, xl).argmax(1) == a, _logits(self.model, xr).argmax(1) == b
        return {
            "accuracy": (ok_l & ok_r).float().mean().item(),
            "accuracy_left": ok_l.float().mean().item(),
            "accuracy_right": ok_r.float().mean().item(),
        }

    @torch.no_grad()
    def features(self, x):
        w = x.shape[-1] // 2
        return torch.cat([_embed(self.model, x[..., :w]), _embed(self.model, x[..., w:])], 1)


class AttributeReward(Reward):
    """r = sum_a log p(attribute a has its requested sign | image) from the CelebA classifier; the
    attributes are named (``names``: all requested present, or absent when prefixed ``not-``, e.g.
    eyeglasses+smiling+not-male) or are the nonzero entries of the condition vector y in
    {-1, 0, +1}^40 (attribute-conditional model)."""

    log_prob = True

    def __init__(self, device, names=None, data_dir=None, path=None):
        self.model, self.info = load_classifier("celeba", device, path, data_dir)
        table = self.info.get("attr_names") or []
        lookup = {a.lower(): i for i, a in enumerate(table)}
        self.idx = None
        if names is not None:
            signs = [-1.0 if n.lower().startswith("not-") else 1.0 for n in names]
            names = [n[4:] if n.lower().startswith("not-") else n for n in names]
            unknown = [n for n in names if n.lower() not in lookup]
            if unknown:
                raise UsageError(
                    f"unknown CelebA attribute(s) {', '.join(unknown)}; choose from "
                    f"{', '.join(a.lower() for a in table)} (join several with +)"
                )
            self.idx = torch.tensor([lookup[n.lower()] for n in names], device=device)
            self.sign = torch.tensor(signs, device=device)
        self.uses_conditions = names is None
        self.name = (
            "attributes"
            if names is None
            else "+".join(("not-" if s < 0 else "") + n.lower() for n, s in zip(names, signs))
        )
        self.description = (
            f"log p({'requested attributes' if names is None else self.name} | image), classifier "
            f"val mean attribute accuracy {self.info.get('accuracy', float('nan')):.4f}"
        )

    def _signs(self, x, y):
        """(B, 40) in {-1, 0, +1}: the requested sign of each attribute, 0 when not requested."""
        if self.idx is not None:
            s = torch.zeros(len(x), self.model.config["num_outputs"], device=x.device)
            s[:, self.idx] = self.sign
            return s
        if y is None:
            raise UsageError(
                "reward 'attributes' scores the requested attributes but got no conditions; "
                "name them instead, e.g. --reward smiling"
            )
        return y.float().sign()

    def score(self, x, y=None):
        s = self._signs(x, y)
        return (F.logsigmoid(s * _logits(self.model, x)) * (s != 0)).sum(1)

    @torch.no_grad()
    def metrics(self, x, y=None):
        s = self._signs(x, y)
        ok = ((_logits(self.model, x) > 0).float() * 2 - 1 == s).float()
        req = (s != 0).float()
        per_image = (ok * req).sum(1) / req.sum(1).clamp(min=1)
        return {
            "accuracy": per_image.mean().item(),
            "all_correct": (per_image == 1).float().mean().item(),
        }

    @torch.no_grad()
    def features(self, x):
        return _embed(self.model, x)


def main(argv=None):
    """Command line of the classifier (kept here, not in common.py: rewards/ sits below the
    scripts)."""
    p = argparse.ArgumentParser(
        description=__doc__.splitlines()[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    p.add_argument(
        "--task", default="mnist", choices=sorted(SETTINGS), help="which classifier to train"
    )
    p.add_argument(
        "--out", default=None, help="checkpoint path (None: runs/rewards/<task>-classifier.pt)"
    )
    p.add_argument(
        "--train-steps",
        type=int,
        default=None,
        help="optimiser steps (None: mnist 800, celeba 6000)",
    )
    p.add_argument("--batch-size", type=int, default=128, help="training minibatch")
    p.add_argument(
        "--lr",
        type=float,
        default=None,
        help="peak Adam learning rate (None: mnist 2e-3, celeba 1e-3)",
    )
    p.add_argument("--data-dir", default=None, help="where the task's data lies")
    p.add_argument("--device", default="auto", help="cpu, cuda, ... (auto: cuda when available)")
    p.add_argument("--seed", type=int, default=0, help="seed of the initialisation and data order")
    p.add_argument(
        "--eval-samples",
        type=int,
        default=0,
        help="held-out images scored for the accuracy (0: all)",
    )
    p.error = lambda msg: _fail(f"{msg} (see --help)")
    args = p.parse_args(argv)
    # SIGTERM (a scheduler) stops the training like Ctrl-C: the checkpoint is written only at the
    # end, through a rename, so a stop leaves no file
    old_term = signal.getsignal(signal.SIGTERM)
    try:
        signal.signal(signal.SIGTERM, _on_sigterm)
    except ValueError:
        # not the main thread: leave the default
        old_term = None
    try:
        for name in ("train_steps", "batch_size"):
            v = getattr(args, name)
            if v is not None and v < 1:
                raise UsageError(f"--{name.replace('_', '-')} must be >= 1, got {v}")
        if args.eval_samples < 0:
            raise UsageError(f"--eval-samples must be >= 0 (0: all), got {args.eval_samples}")
        if args.lr is not None and not (math.isfinite(args.lr) and args.lr > 0):
            raise UsageError(f"--lr must be a finite number > 0, got {args.lr}")
        if args.out is not None and not args.out.strip():
            raise UsageError("--out is empty; pass a checkpoint file path")
        if not 0 <= args.seed < 2**63:
            raise UsageError(f"--seed must be an integer in [0, 2^63), got {args.seed}")
        out = args.out or default_path(args.task)
        if os.path.isdir(out):
            raise UsageError(
                f"--out {out} is a folder; give the checkpoint's file path, e.g. "
                f"{out}/classifier.pt"
            )
        if args.device == "auto":
            device = "cuda" if torch.cuda.is_available() else "cpu"
        else:
            try:
                device = torch.device(args.device)
            except RuntimeError:
                raise UsageError(
                    f"--device {args.device!r} is not a device; use cpu, cuda or cuda:N"
                ) from None
            if device.type == "cuda" and not torch.cuda.is_available():
                raise UsageError(
                    f"--device {args.device} asked for CUDA but none is available; use --device cpu"
                )
        # the data is checked before an existing --out is refused, so a data error names the data
        get_task(args.task).dataset("train", args.data_dir)
        if os.path.exists(out):
            # never replace a file (a pretraining checkpoint, an earlier classifier) silently
            raise UsageError(
                f"--out {out} exists ({_what_is(out)}); delete it to retrain, or pass a new path"
            )
        train_classifier(
            args.task,
            out,
            args.train_steps,
            args.batch_size,
            args.lr,
            args.data_dir,
            device,
            args.seed,
            args.eval_samples or None,
        )
    except (DataError, CheckpointError, UsageError) as e:
        _fail(str(e))
    except OSError as e:
        _fail(f"cannot write or read {e.filename or args.out}: {e.strerror or e}; free space, "
              f"fix its permissions or pass another --out")
    except (KeyboardInterrupt, _Stopped) as e:
        name, code = ("SIGTERM", 143) if isinstance(e, _Stopped) else ("SIGINT (Ctrl-C)", 130)
        print(f"stopped: {name} while training the classifier; nothing was written; rerun the "
              f"command to train it", file=sys.stderr)
        raise SystemExit(code) from None
    finally:
        if old_term is not None:
            signal.signal(signal.SIGTERM, old_term)


class _Stopped(Exception):
    """SIGTERM during the classifier's command."""


def _on_sigterm(signum, frame):
    raise _Stopped()


def _what_is(path):
    """A few words on what checkpoint ``path`` holds."""
    try:
        ckpt = load_checkpoint(path)
    except Exception:  # noqa: BLE001 - any unreadable file is just "not a checkpoint"
        return "not a checkpoint of this repository"
    kind = (ckpt.get("model_config") or {}).get("kind", "?")
    task = (ckpt.get("extra") or {}).get("task") or (ckpt.get("args") or {}).get("task", "?")
    return f"a {kind} checkpoint of task {task}"


def _fail(msg):
    print(f"error: {msg}", file=sys.stderr)
    raise SystemExit(2)


if __name__ == "__main__":
    main()
