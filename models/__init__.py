"""Networks and processes. Imports nothing of the project above it."""

from .checkpoint import (
    EMA,
    CheckpointError,
    build_process,
    load_checkpoint,
    model_from_checkpoint,
    save_checkpoint,
)
from .diffusion import DDPM
from .flow import RectifiedFlow
from .optim import lr_at
from .unet import (
    PRESETS,
    TimeMLP,
    UNet,
    build_model,
    count_params,
    drop_conditions,
    unet_from_preset,
)

__all__ = [
    "EMA",
    "CheckpointError",
    "build_process",
    "load_checkpoint",
    "model_from_checkpoint",
    "save_checkpoint",
    "DDPM",
    "RectifiedFlow",
    "lr_at",
    "PRESETS",
    "TimeMLP",
    "UNet",
    "build_model",
    "count_params",
    "drop_conditions",
    "unet_from_preset",
]
