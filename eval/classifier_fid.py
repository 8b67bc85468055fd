"""A cheap FID proxy and a diversity measure in the reward classifier's feature space.

The Inception FID (eval/fid.py) needs >= 10,000 samples through a 24M-parameter network: too much
for a CPU benchmark. This module measures the same two things in the feature space of the
project's own reward classifier (rewards/classifier.py, ``Reward.features``: the 128-d
penultimate layer; on mnist-pairs the two halves' features side by side, 256-d):

  classifier FID  ||mu1 - mu2||^2 + tr S1 + tr S2 - 2 tr sqrt(S1 S2) of the features of samples
                  and of real images (the task's test split, or val on CelebA), in float64 with
                  eval/fid.py's frechet_distance. Lower is better; it is not comparable to an
                  Inception FID, only to itself at the same number of samples and classifier.
  diversity       the mean pairwise L2 distance between the features of samples that share a
                  condition, averaged over conditions: it falls when fine-tuning collapses each
                  condition onto few images (real data gives the value to compare with).

Reference statistics are cached under ``runs/`` keyed by task, split, number of images, the
classifier's weights fingerprint and this file's protocol string.
"""

import hashlib
import json
import os

import numpy as np
import torch

from eval.fid import frechet_distance

PROTOCOL = "classifier-penultimate|float64|cov(n-1)|v1"


@torch.no_grad()
def features(reward, x, batch_size=1000):
    """(N, D) float64 features of images x (on x's device) from ``reward.features``."""
    if not hasattr(reward, "features"):
        raise ValueError(
            f"reward {reward.name!r} has no classifier features; the classifier FID "
            f"needs a classifier reward (digit, pairs, CelebA attributes)"
        )
    return torch.cat(
        [reward.features(x[i : i + batch_size]).double() for i in range(0, len(x), batch_size)]
    )


def stats(feats):
    """(mu, sigma) as float64 numpy arrays; sigma is the unbiased covariance."""
    f = feats.double().cpu().numpy()
    if f.shape[0] < 2:
        raise ValueError(f"need at least 2 feature vectors, got {f.shape[0]}")
    return f.mean(0), np.cov(f, rowvar=False)


def fid_from_features(feats, ref):
    """Frechet distance between the Gaussian of ``feats`` and reference (mu, sigma)."""
    return frechet_distance(*stats(feats), *ref)


def diversity(feats, groups=None):
    """Mean over conditions of the mean pairwise L2 distance of features within the condition.
    ``groups`` (N,) long: the condition index of each row (None: one group). Conditions with a
    single sample are skipped; None when no condition has two."""
    f = feats.double()
    groups = torch.zeros(len(f), dtype=torch.long, device=f.device) if groups is None else groups
    vals = []
    for g in torch.unique(groups):
        fg = f[groups == g]
        n = len(fg)
        if n < 2:
            continue
        d = torch.cdist(fg, fg)
        vals.append(d.sum() / (n * (n - 1)))  # the diagonal is zero
    return torch.stack(vals).mean().item() if vals else None


def fingerprint(model):
    """sha1 of a network's weights (names, shapes and bytes), 16 hex digits."""
    h = hashlib.sha1()
    for k, v in sorted(model.state_dict().items()):
        h.update(k.encode())
        h.update(str(tuple(v.shape)).encode())
        h.update(v.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


def reference_stats(
    reward, images, tag, cache_dir=os.path.join("runs", "classifier_fid_cache"), batch_size=1000
):
    """(mu, sigma) of the real ``images`` in the reward's feature space, cached on disk under a
    key of (``tag``: task, split and count of the images; the classifier's fingerprint;
    PROTOCOL). ``images`` is a tensor or a zero-argument callable returning one (only called on a
    cache miss)."""
    key = json.dumps(
        dict(tag=tag, classifier=fingerprint(reward.model), protocol=PROTOCOL), sort_keys=True
    )
    path = os.path.join(cache_dir, f"{hashlib.sha1(key.encode()).hexdigest()[:16]}.npz")
    if os.path.isfile(path):
        with np.load(path) as z:
            if str(z["key"]) == key:
                return z["mu"], z["sigma"]
    x = images() if callable(images) else images
    dev = next(reward.model.parameters()).device
    mu, sigma = stats(features(reward, x.to(dev), batch_size))
    os.makedirs(cache_dir, exist_ok=True)
    tmp = f"{path}.tmp.{os.getpid()}.npz"
    np.savez(tmp, mu=mu, sigma=sigma, key=np.array(key))
    os.replace(tmp, path)
    return mu, sigma
