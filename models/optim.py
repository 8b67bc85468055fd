"""The optimiser-side pieces every training loop shares: the learning-rate schedule and the EMA.

Kept here (not in a script) because pretraining, fine-tuning, the corrector and the reward
classifier all use them; the loops themselves stay visible in each script.
"""

import copy
import math

import torch


def lr_at(step, total, lr, schedule="cosine", warmup=100):
    """Linear warm-up over ``warmup`` steps, then constant or cosine decay to 0 at ``total``."""
    if step < warmup:
        return lr * (step + 1) / warmup
    if schedule == "constant":
        return lr
    return lr * 0.5 * (1 + math.cos(math.pi * min(1.0, (step - warmup) / max(1, total - warmup))))


class EMA:
    """Exponential moving average of a model's parameters (buffers are copied).

    The decay warms up as min(decay, (1 + s) / (10 + s)) after s updates: an EMA that starts at the
    initial weights with a fixed decay d still holds d^S of them after S steps (0.995^200 = 37%),
    which would make a short fine-tune look like its reference. ``warmup=False`` gives the fixed
    decay."""

    WARMUP = "min(decay, (1 + s) / (10 + s))"

    def __init__(self, model, decay=0.999, warmup=True):
        self.decay, self.warmup, self.step = decay, warmup, 0
        self.model = copy.deepcopy(model).eval().requires_grad_(False)

    def decay_at(self, step):
        return min(self.decay, (1 + step) / (10 + step)) if self.warmup else self.decay

    @torch.no_grad()
    def update(self, model):
        d = self.decay_at(self.step)
        ema_p = list(self.model.parameters())
        torch._foreach_lerp_(ema_p, [p.detach() for p in model.parameters()], 1 - d)
        for b_ema, b in zip(self.model.buffers(), model.buffers()):
            b_ema.copy_(b)
        self.step += 1

    def describe(self):
        return (
            f"decay {self.decay}, warm-up {self.WARMUP}"
            if self.warmup
            else f"decay {self.decay} (no warm-up)"
        )

    def state_dict(self):
        return self.model.state_dict()

    def load_state_dict(self, sd, step=None):
        self.model.load_state_dict(sd)
        if step is not None:
            self.step = int(step)
