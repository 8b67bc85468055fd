"""Checkpoints that rebuild their own model, EMA, and process builders.

A checkpoint is a plain dict of tensors, numbers, strings, lists and dicts, so it loads with
``torch.load(weights_only=True)``: a file holding any pickled object is refused. It is written to a
temporary file in the same folder and moved into place with ``os.replace`` so a crash mid-write
never leaves a truncated checkpoint where a good one was.
"""

import argparse
import dataclasses
import glob
import os
import random

import numpy as np
import torch

from .diffusion import DDPM
from .flow import RectifiedFlow
from .optim import EMA  # noqa: F401  (re-exported)
from .unet import build_model


class CheckpointError(RuntimeError):
    """A checkpoint that is missing, truncated, not ours, or holds pickled objects."""


def build_process(config):
    cfg = dict(config)
    kind = cfg.pop("kind")
    if kind == "ddpm":
        return DDPM(**cfg)
    if kind == "flow":
        return RectifiedFlow()
    raise ValueError(f"unknown process kind {kind!r}")


def rng_state():
    np_state = np.random.get_state()
    return dict(
        torch=torch.get_rng_state(),
        cuda=torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        numpy=torch.from_numpy(np_state[1].astype(np.int64)),
        numpy_pos=int(np_state[2]),
        python=list(random.getstate()[1]),
    )


def set_rng_state(state):
    torch.set_rng_state(state["torch"])
    if state.get("cuda") and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    np.random.set_state(("MT19937", state["numpy"].numpy().astype(np.uint32), state["numpy_pos"]))
    random.setstate((3, tuple(state["python"]), None))


def _plain(obj):
    """Args and extras as JSON-like values so that weights_only loading accepts them."""
    # a script's arguments (a Namespace or a config dataclass): kept as a dict so --resume can
    # compare them
    if isinstance(obj, argparse.Namespace) or dataclasses.is_dataclass(obj):
        obj = vars(obj)
    if isinstance(obj, dict):
        return {str(k): _plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_plain(v) for v in obj]
    if isinstance(obj, (int, float, str, bool, type(None), torch.Tensor)):
        return obj
    return str(obj)


def save_checkpoint(
    path, model, process=None, ema=None, optimizer=None, step=0, args=None, extra=None
):
    ckpt = dict(
        format="pgraft-1",
        model_config=dict(model.config),
        model=model.state_dict(),
        ema=ema.state_dict() if ema is not None else None,
        optimizer=optimizer.state_dict() if optimizer is not None else None,
        process=process.config if process is not None else None,
        ema_step=int(ema.step) if ema is not None else 0,
        step=int(step),
        rng=rng_state(),
        args=_plain(args or {}),
        extra=_plain(extra or {}),
    )
    path = os.fspath(path)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = f"{path}.tmp.{os.getpid()}"
    for stale in glob.glob(
        glob.escape(path) + ".tmp.*"
    ):  # left by a writer that was killed mid-write
        if stale != tmp:
            os.remove(stale)
    try:
        torch.save(ckpt, tmp)
        os.replace(tmp, path)  # atomic on POSIX: readers see the old file or the new, never half
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    return path


def load_checkpoint(path, map_location="cpu"):
    path = os.fspath(path)
    if os.path.isdir(path):
        raise CheckpointError(f"checkpoint {path} is a folder; pass the checkpoint file in it "
                              f"(its ckpt.pt)")
    if not os.path.isfile(path):
        raise CheckpointError(
            f"checkpoint {path} does not exist; train one first or pass the right path"
        )
    with open(path, "rb") as f:
        head = f.read(4)
    # torch.save writes a zip archive (older versions a pickle, which starts with 0x80)
    if not (head.startswith(b"PK") or head.startswith(b"\x80")):
        raise CheckpointError(f"{path} is not a PyTorch checkpoint (not a zip archive or a "
                              f"pickle); pass a checkpoint file (ckpt.pt)")
    try:
        ckpt = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:  # truncated file, pickled objects
        first = str(e).strip().splitlines()[0][:200] if str(e).strip() else type(e).__name__
        raise CheckpointError(
            f"checkpoint {path} cannot be read safely ({first}); it may be truncated or hold "
            f"pickled objects: point to a good copy, or retrain"
        ) from None
    if not isinstance(ckpt, dict) or ckpt.get("format") != "pgraft-1":
        raise CheckpointError(
            f"{path} is not a pgraft checkpoint (no format tag); pass a file written by this "
            f"project"
        )
    missing = [k for k in ("model_config", "model", "step") if k not in ckpt]
    if (
        missing
        or not isinstance(ckpt.get("model_config"), dict)
        or "kind" not in ckpt["model_config"]
    ):
        raise CheckpointError(
            f"{path} is an incomplete pgraft checkpoint (missing "
            f"{', '.join(missing) or 'the model kind'}); "
            f"point to a complete checkpoint or retrain"
        )
    return ckpt


def model_from_checkpoint(ckpt, device="cpu", use_ema=True):
    """Rebuild (model, process) from a checkpoint dict or path; EMA weights when present."""
    if not isinstance(ckpt, dict):
        ckpt = load_checkpoint(ckpt)
    weights = ckpt["ema"] if use_ema and ckpt.get("ema") is not None else ckpt["model"]
    try:
        model = build_model(ckpt["model_config"])
        model.load_state_dict(weights)
        process = build_process(ckpt["process"]) if ckpt.get("process") else None
    except (ValueError, TypeError, KeyError, RuntimeError) as e:
        first = str(e).strip().splitlines()[0][:160] if str(e).strip() else type(e).__name__
        raise CheckpointError(
            f"the checkpoint's network or process cannot be rebuilt ({first}); "
            f"it was written by another version or is damaged: retrain it"
        ) from None
    return model.to(device).eval(), process
