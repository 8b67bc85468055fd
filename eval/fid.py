"""Frechet Inception Distance for pgraft.

    python -m eval.fid samples/ task:celeba             # FID of a folder vs CelebA train
    python -m eval.fid task:celeba --split test --save-stats celeba_test.npz
    python -m eval.fid a.npz b.npz                      # pytorch-fid .npz files interchange

Protocol (see eval/inception.py for the network and its weights):
  - images: [-1, 1] floats are first quantised to uint8 exactly like torchvision's
    ``save_image`` (x -> floor(clamp((x + 1) * 127.5 + 0.5, 0, 255))), so sampling
    straight from a model scores the same as writing PNGs and reading them back;
    1-channel images are repeated to RGB;
  - features: 2048-d pool3 of the TF 2015-12-05 InceptionV3 after a TF1 bilinear
    resize to 299 and (x - 128) / 128, in strict fp32 (no TF32) and channels_last on
    CUDA. ``bf16=True`` / ``--bf16`` runs it under bf16 autocast, 3.5x faster on an
    H200 but it moves FID (0.04 between bf16 and fp32 stats of the same 2,100 images;
    0.7% on a large FID): use it for monitoring, never for reported numbers. The
    precision is part of the cache key;
  - statistics: mean and unbiased covariance (N - 1), accumulated in float64.
    Fewer images than feature dimensions (N < 2048) gives a rank-deficient covariance
    and a biased, unstable FID: we warn (FIDWarning). Papers use 50,000 samples;
  - distance: ||mu1 - mu2||^2 + tr S1 + tr S2 - 2 tr sqrt(S1 S2), with
    tr sqrt(S1 S2) = sum sqrt(eig(L^T S2 L)) for any S1 = L L^T (Cholesky, or the
    symmetric square root when S1 is singular). L^T S2 L is symmetric PSD, so eigvalsh
    applies: no scipy.linalg.sqrtm (whose ``disp`` argument SciPy 1.18 removed), no
    complex numbers. Round-off negatives are clamped to 0; material ones warn;
  - reference statistics of a task (``task:NAME``) are cached in ``cache_dir`` under a
    key of (task, split, image size, number of images (and subset seed), extractor
    weights fingerprint + precision, preprocessing): never under a folder name. A
    capped reference (``num_images`` < split size) uses a fixed random subset (seed 0).
"""

import argparse
import contextlib
import hashlib
import json
import os
import sys
import warnings

import numpy as np
import torch
from tqdm import tqdm

from eval.inception import InceptionWeightsError, load_inception

IMAGE_EXTS = (".png", ".jpg", ".jpeg", ".bmp", ".webp", ".tif", ".tiff")
# an image in an FID folder larger than this (pixels) is refused before it is decoded
MAX_PIXELS = 4096 * 4096
PREPROCESSING = "uint8(save_image)|rgb|tf1-bilinear-299|(x-128)/128|pool3-2048|float64-cov(n-1)"
REFERENCE_SEED = 0


class FIDInputError(ValueError):
    """A source the evaluator cannot use; the message is one user-facing line."""


class FIDWarning(UserWarning):
    """FID computed, but read it with care (too few samples, non-PSD statistics)."""


# ----------------------------------------------------------------------------- statistics


def _check_eigs(w, what):
    """Clamp round-off negatives of a PSD spectrum; warn when they are material."""
    scale = max(float(np.abs(w).max(initial=0.0)), np.finfo(np.float64).tiny)
    if w.min(initial=0.0) < -1e-6 * scale:
        warnings.warn(
            f"{what} has eigenvalue {w.min():.3g} (largest {scale:.3g}): not a valid "
            "covariance, FID is unreliable; clamping to 0",
            FIDWarning,
            stacklevel=3,
        )
    return np.clip(w, 0.0, None)


def frechet_distance(mu1, sigma1, mu2, sigma2):
    """Frechet distance between N(mu1, sigma1) and N(mu2, sigma2), in float64."""
    mu1, mu2 = (
        np.atleast_1d(np.asarray(mu1, np.float64)),
        np.atleast_1d(np.asarray(mu2, np.float64)),
    )
    s1, s2 = (
        np.atleast_2d(np.asarray(sigma1, np.float64)),
        np.atleast_2d(np.asarray(sigma2, np.float64)),
    )
    if not (mu1.shape == mu2.shape and s1.shape == s2.shape == mu1.shape * 2):
        raise ValueError(
            f"shape mismatch: mu {mu1.shape} vs {mu2.shape}, sigma {s1.shape} vs {s2.shape}"
        )
    s1, s2 = (s1 + s1.T) / 2, (s2 + s2.T) / 2
    try:
        L = np.linalg.cholesky(s1)  # S1 = L L^T, fast when S1 is definite
    except np.linalg.LinAlgError:
        w, v = np.linalg.eigh(s1)  # singular S1 (e.g. N < dim): symmetric root
        L = (v * np.sqrt(_check_eigs(w, "sigma1"))) @ v.T
    m = L.T @ s2 @ L  # similar to S1 S2, but symmetric PSD
    ev = _check_eigs(np.linalg.eigvalsh((m + m.T) / 2), "sigma1 * sigma2")
    diff = mu1 - mu2
    d = diff @ diff + np.trace(s1) + np.trace(s2) - 2.0 * np.sqrt(ev).sum()
    return max(float(d), 0.0)  # FID >= 0; only round-off can push it below


def _warn_few(n, dim):
    if n < dim:
        warnings.warn(
            f"FID from {n} images < {dim} feature dims: the covariance is rank-deficient "
            "and the FID biased upward; use >= 10,000 (papers use 50,000)",
            FIDWarning,
            stacklevel=3,
        )


def feature_stats(feats):
    """(mu, sigma) of an (N, D) feature array, float64, unbiased covariance."""
    f = np.asarray(feats, np.float64)
    if f.ndim != 2 or f.shape[0] < 2:
        raise FIDInputError(f"need at least 2 feature vectors, got array of shape {f.shape}")
    _warn_few(*f.shape)
    return f.mean(0), np.cov(f, rowvar=False)


class _Moments:
    """Streaming mean/covariance in float64 on the features' device (no host sync per batch).
    Sums are taken about the first batch's mean, which keeps the Gram update well conditioned."""

    def __init__(self):
        self.n, self.shift, self.s, self.g = 0, None, None, None

    def update(self, f):
        f = f.double()
        if self.shift is None:
            self.shift = f.mean(0)
            self.s = torch.zeros_like(self.shift)
            self.g = torch.zeros(f.shape[1], f.shape[1], dtype=f.dtype, device=f.device)
        d = f - self.shift
        self.n += f.shape[0]
        self.s += d.sum(0)
        self.g.addmm_(d.T, d)

    def finish(self):
        if self.n < 2:
            raise FIDInputError(f"need at least 2 images for a covariance, got {self.n}")
        _warn_few(self.n, self.g.shape[0])
        m = self.s / self.n
        cov = (self.g - self.n * torch.outer(m, m)) / (self.n - 1)
        return (self.shift + m).cpu().numpy(), cov.cpu().numpy()


def load_stats(path):
    """(mu, sigma, n) from a pytorch-fid style .npz (n is None when the file does not say)."""
    if not os.path.isfile(path):
        raise FIDInputError(
            f"{path}: no such file; make one with `python -m eval.fid FOLDER --save-stats {path}`"
        )
    try:
        with np.load(path) as z:
            keys = set(z.files)
            if not {"mu", "sigma"} <= keys:
                raise FIDInputError(
                    f"{path}: lacks 'mu'/'sigma' (has {sorted(keys)}); write stats with "
                    f"`python -m eval.fid FOLDER --save-stats {path}`"
                )
            mu, sigma = z["mu"].astype(np.float64), z["sigma"].astype(np.float64)
            n = int(z["n"]) if "n" in keys else -1
            n = None if n < 0 else n  # save_stats writes -1 for 'unknown'
    except FIDInputError:
        raise
    except Exception as e:
        raise FIDInputError(
            f"{path}: not a readable .npz ({type(e).__name__}); pass a folder, .npz or task:NAME"
        ) from None
    if mu.ndim != 1 or sigma.shape != (mu.shape[0],) * 2:
        raise FIDInputError(f"{path}: mu {mu.shape} and sigma {sigma.shape} do not fit together")
    if not (np.isfinite(mu).all() and np.isfinite(sigma).all()):
        raise FIDInputError(
            f"{path}: mu or sigma holds NaN/inf; recompute the statistics with "
            f"`python -m eval.fid FOLDER --save-stats {path}`"
        )
    # a sigma that is not a covariance (not symmetric, or a material negative eigenvalue) gives a
    # meaningless FID: refused here, not clamped later
    scale = max(float(np.abs(sigma).max(initial=0.0)), np.finfo(np.float64).tiny)
    asym = float(np.abs(sigma - sigma.T).max(initial=0.0))
    low = float(np.linalg.eigvalsh((sigma + sigma.T) / 2).min(initial=0.0)) if sigma.size else 0.0
    if asym > 1e-6 * scale or low < -1e-6 * scale:
        raise FIDInputError(
            f"{path}: sigma is not a covariance (asymmetry {asym:.3g}, smallest eigenvalue "
            f"{low:.3g}, largest entry {scale:.3g}); recompute the statistics with "
            f"`python -m eval.fid FOLDER --save-stats {path}`"
        )
    return mu, sigma, n


def save_stats(path, mu, sigma, n=None, key=None):
    """Write pytorch-fid compatible stats (mu, sigma) plus n and our cache key; atomic."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    extra = {} if key is None else {"key": np.array(key)}
    tmp = f"{path}.tmp{os.getpid()}.npz"
    np.savez(
        tmp,
        mu=np.asarray(mu, np.float64),
        sigma=np.asarray(sigma, np.float64),
        n=np.array(-1 if n is None else n),
        **extra,
    )
    os.replace(tmp, path)


def cache_key(task, split, image_size, num_images, extractor, preprocessing=PREPROCESSING):
    """Canonical JSON of everything reference statistics depend on (but not where the data
    lives)."""
    return json.dumps(
        dict(
            task=task,
            split=split,
            image_size=image_size,
            num_images=num_images,
            extractor=extractor,
            preprocessing=preprocessing,
        ),
        sort_keys=True,
    )


# ----------------------------------------------------------------------------- image sources


def to_uint8(x):
    """NCHW uint8 [0, 255] or float [-1, 1] with 1 or 3 channels -> uint8 RGB (save_image
    rounding)."""
    if x.dim() != 4 or x.shape[1] not in (1, 3):
        raise FIDInputError(f"images must be NCHW with 1 or 3 channels, got shape {tuple(x.shape)}")
    if x.dtype != torch.uint8:
        if not x.is_floating_point():
            raise FIDInputError(f"images must be uint8 [0,255] or float [-1,1], got {x.dtype}")
        x = ((x.float() + 1.0) * 127.5 + 0.5).clamp_(0, 255).to(torch.uint8)
    return x.expand(-1, 3, -1, -1) if x.shape[1] == 1 else x


class ImageFolder(torch.utils.data.Dataset):
    """Every image file under a folder (recursively, sorted), as uint8 CHW RGB."""

    def __init__(self, root):
        self.files = sorted(
            os.path.join(d, f)
            for d, _, fs in os.walk(root)
            for f in fs
            if f.lower().endswith(IMAGE_EXTS)
        )
        if not self.files:
            raise FIDInputError(
                f"{root}: no images ({', '.join(IMAGE_EXTS)}) found; point at the folder of samples"
            )

    def __len__(self):
        return len(self.files)

    def __getitem__(self, i):
        from PIL import Image

        try:
            with Image.open(self.files[i]) as im:
                # the header's size, checked before the pixels are decoded
                if im.width * im.height > MAX_PIXELS:
                    raise FIDInputError(
                        f"{self.files[i]}: {im.width}x{im.height} pixels, more than the "
                        f"{MAX_PIXELS} an FID image may have; resize or remove it")
                return torch.from_numpy(np.array(im.convert("RGB"))).permute(2, 0, 1)
        except Image.DecompressionBombError:
            raise FIDInputError(f"{self.files[i]}: more than the {MAX_PIXELS} pixels an FID image "
                                f"may have; resize or remove it") from None
        except OSError as e:  # PIL's UnidentifiedImageError and truncated files are OSErrors
            raise FIDInputError(
                f"{self.files[i]}: not a readable image ({type(e).__name__}); remove or replace it"
            ) from None


def _stack(items):
    """Collate in the main process, so a size mismatch is one clear error, not a worker
    traceback."""
    xs = [it[0] if isinstance(it, (tuple, list)) else it for it in items]
    shapes = {tuple(x.shape) for x in xs}
    if len(shapes) > 1:
        raise FIDInputError(
            f"images of different sizes {sorted(shapes)[:2]}; FID needs one size: resize them first"
        )
    return torch.stack(xs)


# ----------------------------------------------------------------------------- evaluator


class FIDEvaluator:
    """Features, statistics and FID of image sources.

    A source is: a folder of images; an ``.npz`` of statistics (``stats``/``fid`` only);
    ``'task:NAME'`` (reference statistics of that task, cached); a ``(mu, sigma)`` pair;
    an NCHW tensor (uint8 [0,255] or float [-1,1], 1 or 3 channels, any device);
    a ``torch.utils.data.Dataset`` of such images or ``(image, label)`` pairs; or a callable
    ``fn(batch_size) -> batch`` (then ``num_images`` is required).
    ``num_images`` caps a finite source: the first N, or a random N drawn with ``generator``.
    """

    def __init__(
        self,
        device="cpu",
        inception_path=None,
        batch_size=64,
        cache_dir="runs/fid_cache",
        *,
        model=None,
        bf16=False,
        num_workers=None,
        progress=True,
    ):
        self.device = torch.device(device)
        self.inception_path, self.batch_size, self.cache_dir = inception_path, batch_size, cache_dir
        self.cuda = self.device.type == "cuda"
        self.bf16 = self.cuda and bool(bf16)  # opt-in: bf16 moves FID measurably (module docstring)
        self.num_workers = (
            (min(8, os.cpu_count() or 1) if self.cuda else 0)
            if num_workers is None
            else num_workers
        )
        self.progress = progress
        self._model = model

    @property
    def model(self):
        """The feature extractor, loaded on first use (npz-only comparisons need no weights)."""
        if self._model is None:
            m = load_inception(self.inception_path, self.device)
            self._model = m.to(memory_format=torch.channels_last) if self.cuda else m
        return self._model

    @property
    def extractor(self):
        """What the features depend on: weights fingerprint and numeric precision."""
        fp = getattr(self.model, "fingerprint", type(self.model).__name__)
        return f"{fp}|{'bf16-autocast' if self.bf16 else 'fp32'}"

    # -- batches

    def _subset(self, n_total, num_images, generator):
        if num_images is None or num_images >= n_total:
            return None
        if generator is None:
            return torch.arange(num_images)
        return torch.randperm(n_total, generator=generator)[:num_images].sort().values

    def _batches(self, source, num_images=None, generator=None):
        """(iterator over image batches in any format ``to_uint8`` takes, number of images)."""
        bs = self.batch_size
        if isinstance(source, (str, os.PathLike)):
            path = os.fspath(source)
            if path.startswith("task:"):
                raise FIDInputError(
                    f"{path}: a task gives statistics, not images; use stats() or reference_stats()"
                )
            if path.endswith(".npz"):
                raise FIDInputError(
                    f"{path}: an .npz holds statistics, not images; use stats() or fid()"
                )
            if not os.path.isdir(path):
                what = "is a file, not a folder" if os.path.isfile(path) else "no such folder"
                raise FIDInputError(
                    f"{path}: {what}; pass a folder of images, an .npz or task:NAME"
                )
            source = ImageFolder(path)
        if isinstance(source, torch.Tensor):
            idx = self._subset(source.shape[0], num_images, generator)
            x = source if idx is None else source[idx.to(source.device)]
            return (x[i : i + bs] for i in range(0, x.shape[0], bs)), x.shape[0]
        if isinstance(source, torch.utils.data.Dataset):
            idx = self._subset(len(source), num_images, generator)
            ds = source if idx is None else torch.utils.data.Subset(source, idx.tolist())
            dl = torch.utils.data.DataLoader(
                ds,
                batch_size=bs,
                num_workers=self.num_workers,
                collate_fn=list,
                pin_memory=self.cuda,
            )
            return (_stack(items) for items in dl), len(ds)
        if callable(source):
            if not num_images:
                raise FIDInputError(
                    "a generator source needs num_images (how many samples to draw)"
                )

            def sample():
                left = num_images
                while left > 0:
                    x = source(min(bs, left))
                    if x.shape[0] == 0:
                        raise FIDInputError("the generator source returned an empty batch")
                    yield x[:left]
                    left -= x.shape[0]

            return sample(), num_images
        raise FIDInputError(
            f"unsupported source {type(source).__name__}: pass a folder, tensor, dataset or "
            f"callable"
        )

    def _context(self):
        """Around each Inception forward (and only that: a sampler may need autograd):
        inference_mode, and on CUDA bf16 autocast or strict fp32 (the extractor string records
        which)."""
        ctx = contextlib.ExitStack()
        ctx.enter_context(torch.inference_mode())
        ctx.enter_context(torch.autocast("cuda", torch.bfloat16, enabled=self.cuda and self.bf16))
        if self.cuda:
            # fixed shapes: let cuDNN pick the fastest kernels; and "fp32" must mean IEEE fp32,
            # not TF32 convs (PyTorch's default). Both flags are restored on exit.
            cudnn, saved = (
                torch.backends.cudnn,
                (torch.backends.cudnn.benchmark, torch.backends.cudnn.allow_tf32),
            )
            cudnn.benchmark, cudnn.allow_tf32 = True, self.bf16
            ctx.callback(
                lambda: (
                    setattr(cudnn, "benchmark", saved[0]),
                    setattr(cudnn, "allow_tf32", saved[1]),
                )
            )
        return ctx

    def _features(self, source, num_images=None, generator=None):
        """Yield (B, 2048) float32 feature batches on the device; no host sync inside the loop."""
        batches, total = self._batches(source, num_images, generator)
        model = self.model
        show = self.progress and sys.stderr.isatty()  # a terminal: a bar; a log: a line every 30 s
        if self.progress and not show:
            from tasks import progress

            batches = progress(batches, "FID feature batches")
        with tqdm(
            total=total, unit="img", desc="FID features", disable=not show, leave=False
        ) as bar:
            for i, x in enumerate(batches):
                if i == 0 and x.is_floating_point():
                    # one sync, on the first batch only: catch [0, 255] floats passed as [-1, 1]
                    lo, hi = torch.aminmax(x.detach().float())
                    if lo < -1.5 or hi > 1.5:
                        raise FIDInputError(
                            f"float images must be in [-1, 1], got [{float(lo):.3g}, "
                            f"{float(hi):.3g}]; pass uint8 tensors for [0, 255]"
                        )
                with self._context():
                    x = to_uint8(x.to(self.device, non_blocking=True))
                    f = model(x.float())
                yield f
                bar.update(x.shape[0])

    def features(self, source, num_images=None, generator=None):
        """(N, 2048) float64 pool3 features of an image source."""
        feats = list(self._features(source, num_images, generator))
        if not feats:
            raise FIDInputError("the source yielded no images")
        return (
            torch.cat(feats).double().cpu().numpy()
        )  # widen on the device: cheaper than on the host

    def stats(
        self, source, num_images=None, generator=None, split="train", image_size=None, data_dir=None
    ):
        """(mu, sigma, n) in float64 (n is None for an .npz that does not record it).
        split / image_size / data_dir apply to ``task:NAME`` sources only."""
        if isinstance(source, (tuple, list)) and len(source) == 2:
            mu, sigma = (np.asarray(s, np.float64) for s in source)
            return mu, sigma, None
        if isinstance(source, (str, os.PathLike)):
            path = os.fspath(source)
            if path.startswith("task:"):
                return self._reference(path[5:], split, image_size, num_images, data_dir)
            if path.endswith(".npz"):
                return load_stats(path)
        acc = _Moments()
        for f in self._features(source, num_images, generator):
            acc.update(f)
        mu, sigma = acc.finish()
        return mu, sigma, acc.n

    def fid(self, a, b, num_images=None, generator=None, **task_kwargs):
        """FID between two sources (each anything ``stats`` takes)."""
        mu1, s1, _ = self.stats(a, num_images, generator, **task_kwargs)
        mu2, s2, _ = self.stats(b, num_images, generator, **task_kwargs)
        return frechet_distance(mu1, s1, mu2, s2)

    # -- reference statistics

    def reference_stats(
        self, task_name, split="train", image_size=None, num_images=None, data_dir=None
    ):
        """(mu, sigma) of a task split, cached under ``cache_dir`` (key: module docstring)."""
        mu, sigma, _ = self._reference(task_name, split, image_size, num_images, data_dir)
        return mu, sigma

    def _reference(self, name, split, image_size, num_images, data_dir):
        if split not in ("train", "test"):
            raise FIDInputError(f"--split {split}: must be train or test")
        try:
            from tasks import DataError, get_task
        except ImportError as e:
            raise FIDInputError(
                f"task:{name} needs tasks.py at the repo root ({e}); run from the repo root"
            ) from None
        try:
            task = get_task(name)
            if task.kind != "image":
                raise FIDInputError(f"task:{name} is a {task.kind} task; FID needs an image task")
            ds = task.dataset(split=split, data_dir=data_dir, image_size=image_size)
            size = image_size or task.image_size
            n = len(ds) if num_images is None else min(num_images, len(ds))
            count = n if n == len(ds) else f"{n}/{len(ds)}:seed{REFERENCE_SEED}"
            key = cache_key(name, split, size, count, self.extractor)
            digest = hashlib.sha1(key.encode()).hexdigest()[:16]
            path = os.path.join(self.cache_dir, f"{name}_{split}_{size}px_n{n}_{digest}.npz")
            if os.path.isfile(path):
                with np.load(path) as z:
                    if "key" in z.files and str(z["key"]) == key:
                        return z["mu"], z["sigma"], int(z["n"])
            gen = torch.Generator().manual_seed(REFERENCE_SEED) if n < len(ds) else None
            mu, sigma, n = self.stats(ds, num_images=n, generator=gen)
        except DataError as e:
            # a DataLoader worker re-raises with the worker's traceback: keep the one user-facing
            # line
            raise FIDInputError(
                str(e).strip().splitlines()[-1].split("DataError: ", 1)[-1]
            ) from None
        save_stats(path, mu, sigma, n, key)
        return mu, sigma, n


# ----------------------------------------------------------------------------- CLI


def _count(lo):
    """argparse type: an integer >= lo."""

    def check(text):
        try:
            v = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
        if v < lo:
            raise argparse.ArgumentTypeError(f"must be >= {lo}, got {v}")
        return v

    return check


def main(argv=None):
    p = argparse.ArgumentParser(
        prog="python -m eval.fid",
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument(
        "sources",
        nargs="+",
        metavar="SOURCE",
        help="a folder of images, an .npz of statistics (mu, sigma) or task:NAME; "
        "two to print their FID, one with --save-stats",
    )
    p.add_argument(
        "--split",
        choices=("train", "test"),
        default="train",
        help="split used for task:NAME sources (default: train)",
    )
    p.add_argument(
        "--data-dir", default=None, help="where task data lives (default: the task's own source)"
    )
    p.add_argument(
        "--image-size", type=_count(1), default=None, help="task image size (default: the task's)"
    )
    p.add_argument(
        "--num-images", type=_count(2), default=None, help="use at most this many images per source"
    )
    p.add_argument("--batch-size", type=_count(1), default=64, help="images per Inception batch")
    p.add_argument(
        "--device",
        default="cuda" if torch.cuda.is_available() else "cpu",
        help="torch device (default: cuda if available)",
    )
    p.add_argument(
        "--bf16",
        action="store_true",
        help="on CUDA, run Inception under bf16 autocast: ~3.5x faster, but FID moves; not for "
        "reported numbers",
    )
    p.add_argument(
        "--num-workers",
        type=_count(0),
        default=None,
        help="image decoding workers (default: 8 on CUDA, 0 on CPU)",
    )
    p.add_argument(
        "--inception",
        default=None,
        metavar="PATH",
        help="Inception weights: pytorch-fid pt_inception-2015-12-05-*.pth or NVIDIA TorchScript",
    )
    p.add_argument(
        "--save-stats",
        default=None,
        metavar="PATH",
        help="write the first source's statistics to this .npz",
    )
    p.add_argument(
        "--cache-dir", default="runs/fid_cache", help="where task reference statistics are cached"
    )

    def fail(msg):
        print(f"error: {msg}", file=sys.stderr)
        raise SystemExit(2)

    p.error = lambda msg: fail(f"{msg} (see --help)")  # one line, not argparse's usage block
    args = p.parse_args(argv)
    try:
        device = torch.device(args.device)
    except (RuntimeError, ValueError):
        fail(f"--device {args.device!r} is not a device; use cpu, cuda or cuda:N")
    if device.type not in ("cpu", "cuda"):
        fail(f"--device {args.device}: only cpu and cuda are supported")
    if device.type == "cuda" and not torch.cuda.is_available():
        fail(f"--device {args.device} asked for CUDA but none is available; use --device cpu")
    if len(args.sources) > 2 or (len(args.sources) == 1 and not args.save_stats):
        fail(
            "give two sources to compare (e.g. samples/ task:celeba), or one with --save-stats PATH"
        )
    if args.save_stats and not args.save_stats.endswith(".npz"):
        fail(f"--save-stats {args.save_stats}: the file name must end in .npz")
    if args.save_stats and os.path.isdir(args.save_stats):
        fail(f"--save-stats {args.save_stats} is a folder; give the .npz file's path")
    ev = FIDEvaluator(
        args.device,
        args.inception,
        args.batch_size,
        args.cache_dir,
        bf16=args.bf16,
        num_workers=args.num_workers,
    )
    kw = dict(split=args.split, image_size=args.image_size, data_dir=args.data_dir)
    try:
        stats = [ev.stats(s, args.num_images, **kw) for s in args.sources]
    except (FIDInputError, InceptionWeightsError) as e:
        # a DataLoader worker re-raises with the worker's traceback in the text: keep the one
        # user-facing line
        fail(str(e).strip().splitlines()[-1].split("FIDInputError: ", 1)[-1])
    if args.save_stats:
        save_stats(args.save_stats, *stats[0])
        print(
            f"saved statistics of {args.sources[0]} ({stats[0][2] or '?'} images) to "
            f"{args.save_stats}",
            file=sys.stderr,
        )
    if len(stats) == 2:
        print(f"FID: {frechet_distance(*stats[0][:2], *stats[1][:2]):.4f}")


if __name__ == "__main__":
    main()
