"""A pretrained diffusers ``UNet2DModel`` as the project's reference: ``--base
diffusers:PATH_OR_REPO_ID``.

diffusers is optional: it is imported only here, when such a base is asked for. The scheduler must
map onto models/DDPM: linear betas 1e-4..0.02 over N = 1000 steps (our linear schedule at N = 1000
is exactly those betas), epsilon prediction. Our step n in 1..N is diffusers' timestep index n - 1
(its timesteps run 0..N-1 with timestep 0 the least noisy). Anything else (v-prediction, other
schedules, learned variances) is refused in one line.

Layouts read: a folder (or hub repository, e.g. google/ddpm-celebahq-256) holding the UNet's
config.json and weights at its root or in unet/, and scheduler_config.json at its root or in
scheduler/.
"""

import json
import os

import torch.nn as nn

from .diffusion import DDPM

PREFIX = "diffusers:"


class DiffusersError(ValueError):
    """A diffusers base that cannot be used; the message is one line for the user."""


def _diffusers():
    try:
        import diffusers
    except ImportError:
        raise DiffusersError(
            "--base diffusers:... needs the optional package diffusers: pip install diffusers"
        ) from None
    return diffusers


class DiffusersEps(nn.Module):
    """Wraps a UNet2DModel as our eps-network ``net(x, t, y=None)`` with t = n / N."""

    def __init__(self, unet, n_steps=1000, source=""):
        super().__init__()
        self.unet, self.n_steps = unet, n_steps
        cfg = dict(unet.config)
        if cfg.get("num_class_embeds") or cfg.get("class_embed_type"):
            raise DiffusersError(
                f"{source}: class-conditional UNet2DModels are not supported; use an "
                f"unconditional one"
            )
        size = cfg.get("sample_size")
        size = size if isinstance(size, int) else (size or [0])[0]
        # what checkpoints store: enough to rebuild the network without the original folder
        self.config = dict(
            kind="diffusers",
            unet_config={k: v for k, v in cfg.items() if not k.startswith("_")},
            n_steps=n_steps,
            source=source,
            image_size=size,
            in_ch=cfg.get("in_channels", 3),
            num_classes=0,
            cond_dim=0,
        )

    def forward(self, x, t, y=None):
        # our step n = t N (1..N) is diffusers' timestep index n - 1
        timestep = (t * self.n_steps).round().long() - 1
        return self.unet(x, timestep.clamp(min=0)).sample


def from_config(config):
    """Rebuild the wrapper from a checkpoint's model_config (no download, no original folder)."""
    unet = _diffusers().UNet2DModel.from_config(config["unet_config"])
    return DiffusersEps(unet, config["n_steps"], config.get("source", ""))


def _read_scheduler_config(root):
    for rel in ("scheduler_config.json", os.path.join("scheduler", "scheduler_config.json")):
        if os.path.isfile(os.path.join(root, rel)):
            with open(os.path.join(root, rel)) as f:
                return json.load(f)
    return None


def check_scheduler(cfg, source):
    """The DDPM our models/diffusion.py runs for this scheduler config; refuse what does not map."""
    problems = []
    if cfg.get("prediction_type", "epsilon") != "epsilon":
        problems.append(f"prediction_type {cfg.get('prediction_type')!r} (only epsilon maps)")
    if cfg.get("beta_schedule", "linear") != "linear":
        problems.append(f"beta_schedule {cfg.get('beta_schedule')!r} (only linear maps)")
    if cfg.get("trained_betas") is not None:
        problems.append("trained_betas")
    n = int(cfg.get("num_train_timesteps", 1000))
    if (
        n != 1000
        or abs(cfg.get("beta_start", 1e-4) - 1e-4) > 1e-12
        or abs(cfg.get("beta_end", 0.02) - 0.02) > 1e-12
    ):
        problems.append(
            f"betas {cfg.get('beta_start')}..{cfg.get('beta_end')} over {n} steps (only 1e-4..0.02 "
            f"over 1000 maps)"
        )
    if str(cfg.get("variance_type", "fixed_small")).startswith("learned"):
        problems.append(
            f"variance_type {cfg.get('variance_type')!r} (learned variances do not map)"
        )
    if cfg.get("rescale_betas_zero_snr"):
        problems.append("rescale_betas_zero_snr")
    if problems:
        raise DiffusersError(
            f"{source}: its scheduler does not map onto this project's DDPM: {'; '.join(problems)}"
        )
    return DDPM(1000, "linear")


def load(spec, device="cpu"):
    """(wrapper, DDPM, checkpoint-like dict) for ``diffusers:PATH_OR_REPO_ID``."""
    source = spec[len(PREFIX) :] if spec.startswith(PREFIX) else spec
    diffusers = _diffusers()
    root = source
    if not os.path.isdir(
        source
    ):  # a hub repository id: the hub client's cache (downloads where online)
        try:
            from huggingface_hub import snapshot_download

            root = snapshot_download(source, allow_patterns=["*.json", "*.safetensors", "*.bin"])
        except Exception as e:  # noqa: BLE001 - offline, unknown id, ...: one line
            raise DiffusersError(
                f"cannot fetch {source!r} ({type(e).__name__}); pass a local folder "
                f"(diffusers:PATH) holding the UNet and scheduler_config.json"
            ) from None
    sub = "unet" if os.path.isfile(os.path.join(root, "unet", "config.json")) else None
    if not os.path.isfile(os.path.join(root, sub or "", "config.json")):
        raise DiffusersError(f"{source}: no UNet config.json at its root or in unet/")
    sched = _read_scheduler_config(root)
    if sched is None:
        raise DiffusersError(f"{source}: no scheduler_config.json at its root or in scheduler/")
    process = check_scheduler(sched, source)
    try:
        unet = diffusers.UNet2DModel.from_pretrained(root, subfolder=sub)
    except Exception as e:  # noqa: BLE001
        first = str(e).strip().splitlines()[0][:160] if str(e).strip() else type(e).__name__
        raise DiffusersError(f"{source}: cannot load a UNet2DModel ({first})") from None
    net = DiffusersEps(unet, process.N, source).to(device).eval()
    ckpt = dict(
        format="pgraft-1",
        model_config=net.config,
        model=net.state_dict(),
        ema=None,
        process=process.config,
        step=0,
        args={},
        extra=dict(source=source),
    )
    return net, process, ckpt
