"""FID features that the reward cannot game: a second classifier of another architecture.

The classifier FID of eval/classifier_fid.py measures in the reward classifier's own features, so a
method that pleases that classifier moves the proxy too. The benchmark therefore measures FID and
diversity in the features of ``FeatureNet``, trained by rewards.classifier.train_classifier on the
other half of the training split (``part`` 1; the reward classifier gets part 0) with another seed:

  reward classifier   3x3 conv + ReLU + max-pool stages to 4x4, flattened, a 128-unit MLP head
  FeatureNet          3x3 convs, two of them strided, GroupNorm + SiLU, global average pooling to
                      ``dim`` (64) features, a linear head

Its ``dim``-d pooled features (per half on mnist-pairs, side by side) are the feature space of
classifier_fid's Frechet distance and diversity (``FeatureSpace``). On a GPU the Inception FID
(eval/fid.py) is the independent measure; this one is the CPU's.
"""

import torch
import torch.nn as nn

from models import CheckpointError, load_checkpoint
from rewards.classifier import SETTINGS, train_classifier
from tasks import get_task


class FeatureNet(nn.Module):
    """Strided convolutions with GroupNorm and SiLU, global average pooling, a linear head."""

    def __init__(self, in_ch=1, image_size=16, num_outputs=10, width=32, dim=64):
        super().__init__()
        self.config = dict(kind="featurenet", in_ch=in_ch, image_size=image_size,
                           num_outputs=num_outputs, width=width, dim=dim)
        w = width

        def block(c_in, c_out, stride):
            return [nn.Conv2d(c_in, c_out, 3, stride, 1), nn.GroupNorm(8, c_out), nn.SiLU()]

        self.body = nn.Sequential(
            *block(in_ch, w, 1), *block(w, 2 * w, 2), *block(2 * w, 2 * w, 2),
            *block(2 * w, dim, 1), nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.head = nn.Linear(dim, num_outputs)

    def forward(self, x):
        return self.head(self.body(x))

    def embed(self, x):
        """The ``dim``-d pooled features."""
        return self.body(x)


def train(task_name, out, *, steps, batch_size, data_dir=None, device="cpu", seed=1, part=1,
          width=32, dim=64, lr=2e-3):
    """Train a FeatureNet on ``part`` of the task's classifier training split (the reward
    classifier's other half) and save it to ``out``; returns the checkpoint's summary."""
    s, task = SETTINGS[task_name], get_task(task_name)
    net = FeatureNet(task.channels, task.image_size, s["outputs"], width, dim)
    return train_classifier(task_name, out=out, steps=steps, batch_size=batch_size, lr=lr,
                            data_dir=data_dir, device=device, seed=seed, part=part, model=net)


def load(path, device="cpu"):
    """(FeatureNet, info) of a checkpoint written by ``train``, frozen, in eval mode."""
    ckpt = load_checkpoint(path)
    cfg = dict(ckpt["model_config"])
    if cfg.pop("kind", None) != "featurenet":
        raise CheckpointError(f"{path} is not a FeatureNet checkpoint (eval/feature_fid.py)")
    net = FeatureNet(**cfg)
    net.load_state_dict(ckpt["model"])
    return net.to(device).eval().requires_grad_(False), ckpt.get("extra") or {}


class FeatureSpace:
    """What eval/classifier_fid.py needs of a feature space (``model``, ``name``, ``features``):
    the FeatureNet's features of whole images, or of each half side by side when the images are
    ``halves`` (mnist-pairs: two digits the net was trained on)."""

    def __init__(self, net, halves=False, info=None):
        self.model, self.halves, self.info = net, halves, info or {}
        self.name = "featurenet" + ("-halves" if halves else "")

    @torch.no_grad()
    def features(self, x, chunk=1000):
        def emb(v):
            return torch.cat([self.model.embed(v[i : i + chunk]) for i in range(0, len(v), chunk)])

        if not self.halves:
            return emb(x)
        w = x.shape[-1] // 2
        return torch.cat([emb(x[..., :w]), emb(x[..., w:])], 1)
