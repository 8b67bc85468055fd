"""JPEG compressibility / incompressibility (the DDPO rewards, Black et al. 2023): weight-free.

r(x) = -(size of x as a quality-95 JPEG in kB) for compressibility, +size for incompressibility.
Images in [-1, 1] are quantised to uint8 the way torchvision's save_image does; the encoder is
torchvision's libjpeg (batched list call, on the CPU).
"""

import torch
from torchvision.io import encode_jpeg

from . import Reward


def jpeg_kb(x, quality=95):
    """Size in kB of each image of x (B, C, H, W) in [-1, 1] as a JPEG; float64 (B,) on x's
    device."""
    u8 = x.detach().float().add(1).mul(127.5).add(0.5).clamp(0, 255).to(torch.uint8).cpu()
    sizes = [t.numel() for t in encode_jpeg(list(u8.unbind(0)), quality=quality)]
    return torch.tensor(sizes, dtype=torch.float64, device=x.device) / 1000.0


class JPEGReward(Reward):
    def __init__(self, incompressible=False, quality=95):
        self.sign = 1.0 if incompressible else -1.0
        self.quality = quality
        self.name = "jpeg-incompressibility" if incompressible else "jpeg"
        self.description = f"{'+' if incompressible else '-'}JPEG size (kB, quality {quality})"

    def score(self, x, y=None):
        return self.sign * jpeg_kb(x, self.quality)
