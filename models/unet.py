"""A small DDPM-style UNet for images and a time-conditioned MLP for 2-D points.

Both networks take ``(x, t, y=None)``: ``x`` the noisy input, ``t`` a float tensor (B,) in
[0, 1] (the diffusion process passes n/N, the flow passes its time t), ``y`` the condition.
Conditions come in two forms, both with a null value so classifier-free guidance can drop them:
  - class labels: LongTensor (B,) in [0, num_classes); -1 (or num_classes) is the null label;
  - attribute vectors: float (B, cond_dim) in {-1, 0, +1}; 0 means "unspecified", so the all-zero
    vector is the null condition (CelebA's 40 binary attributes).
"""

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

# Named sizes. Parameter counts (printed by `python -m models.unet`) are asserted in tests. The
# small presets norm groups of 8 channels: with gcd(32, c) groups a block of <= 32 channels has one
# channel per group and its GroupNorm erases the time/label embedding (see ``norm``).
# fmt: off
PRESETS = {
    # < 1M parameters, for tests.
    "tiny": dict(ch=16, ch_mult=(1, 2), num_res_blocks=1, attn_res=(8,), dropout=0.0,
                 norm_group_channels=8),
    # 16x16 digits and 16x32 digit pairs on a CPU: three levels, no attention but the middle one
    # (attention dominates the CPU time at these sizes). Any H x W divisible by 4 works: the
    # network is convolutional and image_size (the height) only places attention.
    "small16": dict(ch=16, ch_mult=(1, 2, 2), num_res_blocks=1, attn_res=(), dropout=0.0,
                    norm_group_channels=8),
    # MNIST 32x32: deliberately small so the base model is imperfect and rewards have room.
    "mnist": dict(ch=32, ch_mult=(1, 2, 2), num_res_blocks=1, attn_res=(8,), dropout=0.1,
                  norm_group_channels=8),
    # CelebA 64x64.
    "celeba64": dict(ch=64, ch_mult=(1, 2, 2, 4), num_res_blocks=2, attn_res=(16, 8), dropout=0.1),
    # 256x256, the paper's base flow size (~65M) and corrector size (~16M), section 4 / Table 5.
    "base256": dict(ch=96, ch_mult=(1, 1, 2, 2, 4, 4), num_res_blocks=2, attn_res=(16,),
                    dropout=0.0),
    "corrector256": dict(ch=48, ch_mult=(1, 1, 2, 2, 4, 4), num_res_blocks=2, attn_res=(16,),
                         dropout=0.0),
}
# fmt: on


def timestep_embedding(t, dim, scale=1000.0):
    """Sinusoidal embedding of t in [0, 1] (scaled so that 1/N steps are distinguishable)."""
    half = dim // 2
    freqs = torch.exp(
        -math.log(10000.0) * torch.arange(half, device=t.device, dtype=torch.float32) / half
    )
    args = (t.float() * scale)[:, None] * freqs[None]
    return torch.cat([torch.cos(args), torch.sin(args)], dim=1)


def norm(c, group_channels=0):
    """GroupNorm of c channels: gcd(32, c) groups (the presets' original choice) or, with
    ``group_channels`` k > 0, c / k groups of k channels.

    Why k matters: a ResBlock adds its time/condition embedding as a per-channel bias just before
    norm2, and a group of ONE channel subtracts that bias again. gcd(32, c) gives one channel per
    group for c <= 32, so such blocks cannot see t or the label (tests/test_benchmark.py
    measures it); k = 8 keeps 7/8 of the bias."""
    if group_channels:
        return nn.GroupNorm(c // group_channels, c)
    return nn.GroupNorm(math.gcd(32, c), c)


class CondEmbedding(nn.Module):
    """Embeds labels (with a learned null label) or {-1,0,1} attribute vectors (0 = null)."""

    def __init__(self, dim, num_classes=0, cond_dim=0):
        super().__init__()
        self.num_classes, self.cond_dim = num_classes, cond_dim
        if num_classes:
            self.emb = nn.Embedding(num_classes + 1, dim)  # index num_classes is the null label
        elif cond_dim:
            self.emb = nn.Linear(cond_dim, dim, bias=False)  # zero vector -> zero embedding

    def forward(self, y, batch, device):
        if self.num_classes:
            if y is None:
                y = torch.full((batch,), self.num_classes, device=device, dtype=torch.long)
            y = torch.where(y < 0, torch.full_like(y, self.num_classes), y)
            return self.emb(y)
        if self.cond_dim:
            if y is None:
                return torch.zeros(batch, self.emb.out_features, device=device)
            return self.emb(y.float())
        return 0.0


def drop_conditions(y, p, generator):
    """Replace each condition by the null one with probability p (classifier-free guidance training,
    Ho & Salimans 2022): label -1, or the all-zero attribute vector. No-op for p = 0 or y None."""
    if y is None or p <= 0:
        return y
    drop = torch.rand(y.shape[0], generator=generator, device=y.device) < p
    if y.dtype == torch.long:
        return torch.where(drop, torch.full_like(y, -1), y)
    return y * (~drop).to(y.dtype).reshape(-1, *([1] * (y.dim() - 1)))


class ResBlock(nn.Module):
    def __init__(self, cin, cout, temb, dropout, group_channels=0):
        super().__init__()
        self.norm1 = norm(cin, group_channels)
        self.conv1 = nn.Conv2d(cin, cout, 3, padding=1)
        self.temb = nn.Linear(temb, cout)
        self.norm2 = norm(cout, group_channels)
        self.drop = nn.Dropout(dropout)
        self.conv2 = nn.Conv2d(cout, cout, 3, padding=1)
        nn.init.zeros_(self.conv2.weight)  # each block starts as the identity
        nn.init.zeros_(self.conv2.bias)
        self.skip = nn.Conv2d(cin, cout, 1) if cin != cout else nn.Identity()

    def forward(self, x, emb):
        h = self.conv1(F.silu(self.norm1(x)))
        h = h + self.temb(F.silu(emb))[:, :, None, None]
        h = self.conv2(self.drop(F.silu(self.norm2(h))))
        return self.skip(x) + h


class Attention(nn.Module):
    def __init__(self, c, heads=4, group_channels=0, level=0):
        super().__init__()
        self.heads = heads if c % heads == 0 else 1
        # the UNet level it sits at: it attends over (H / 2^level) x (W / 2^level) positions
        self.level = level
        self.norm = norm(c, group_channels)
        self.qkv = nn.Conv2d(c, 3 * c, 1)
        self.out = nn.Conv2d(c, c, 1)
        nn.init.zeros_(self.out.weight)
        nn.init.zeros_(self.out.bias)

    def forward(self, x):
        b, c, h, w = x.shape
        q, k, v = self.qkv(self.norm(x)).reshape(b, 3, self.heads, c // self.heads, h * w).unbind(1)
        o = F.scaled_dot_product_attention(
            q.transpose(-1, -2), k.transpose(-1, -2), v.transpose(-1, -2)
        )
        return x + self.out(o.transpose(-1, -2).reshape(b, c, h, w))


class UNet(nn.Module):
    def __init__(
        self,
        image_size=32,
        in_ch=3,
        ch=64,
        ch_mult=(1, 2, 2),
        num_res_blocks=2,
        attn_res=(16,),
        dropout=0.1,
        num_classes=0,
        cond_dim=0,
        norm_group_channels=0,
    ):
        super().__init__()
        self.config = dict(
            kind="unet",
            image_size=image_size,
            in_ch=in_ch,
            ch=ch,
            ch_mult=tuple(ch_mult),
            num_res_blocks=num_res_blocks,
            attn_res=tuple(attn_res),
            dropout=dropout,
            num_classes=num_classes,
            cond_dim=cond_dim,
        )
        gc = norm_group_channels  # 0: the original gcd(32, c) groups (see norm)
        if gc:  # recorded only when set, so the original presets' configs are unchanged
            self.config["norm_group_channels"] = gc
        temb = ch * 4
        self.ch = ch
        self.time_mlp = nn.Sequential(nn.Linear(ch, temb), nn.SiLU(), nn.Linear(temb, temb))
        self.cond = CondEmbedding(temb, num_classes, cond_dim)
        self.inp = nn.Conv2d(in_ch, ch, 3, padding=1)
        self.down = nn.ModuleList()
        chans, c, res = [ch], ch, image_size
        for i, m in enumerate(ch_mult):
            for _ in range(num_res_blocks):
                blk = nn.ModuleList([ResBlock(c, ch * m, temb, dropout, gc)])
                c = ch * m
                if res in attn_res:
                    blk.append(Attention(c, group_channels=gc, level=i))
                self.down.append(blk)
                chans.append(c)
            if i < len(ch_mult) - 1:
                self.down.append(nn.ModuleList([nn.Conv2d(c, c, 3, stride=2, padding=1)]))
                chans.append(c)
                res //= 2
        self.mid = nn.ModuleList(
            [
                ResBlock(c, c, temb, dropout, gc),
                Attention(c, group_channels=gc, level=len(ch_mult) - 1),
                ResBlock(c, c, temb, dropout, gc),
            ]
        )
        self.up = nn.ModuleList()
        for i, m in reversed(list(enumerate(ch_mult))):
            for _ in range(num_res_blocks + 1):
                blk = nn.ModuleList([ResBlock(c + chans.pop(), ch * m, temb, dropout, gc)])
                c = ch * m
                if res in attn_res:
                    blk.append(Attention(c, group_channels=gc, level=i))
                self.up.append(blk)
            if i > 0:
                self.up.append(
                    nn.ModuleList(
                        [nn.Upsample(scale_factor=2, mode="nearest"), nn.Conv2d(c, c, 3, padding=1)]
                    )
                )
                res *= 2
        self.out = nn.Sequential(norm(c, gc), nn.SiLU(), nn.Conv2d(c, in_ch, 3, padding=1))
        nn.init.zeros_(self.out[-1].weight)
        nn.init.zeros_(self.out[-1].bias)

    def forward(self, x, t, y=None):
        emb = self.time_mlp(timestep_embedding(t, self.ch)) + self.cond(y, x.shape[0], x.device)
        h = self.inp(x)
        hs = [h]
        for blk in self.down:
            for layer in blk:
                h = layer(h, emb) if isinstance(layer, ResBlock) else layer(h)
            hs.append(h)
        for layer in self.mid:
            h = layer(h, emb) if isinstance(layer, ResBlock) else layer(h)
        for blk in self.up:
            if isinstance(blk[0], ResBlock):
                h = torch.cat([h, hs.pop()], dim=1)
            for layer in blk:
                h = layer(h, emb) if isinstance(layer, ResBlock) else layer(h)
        return self.out(h)


class TimeMLP(nn.Module):
    """Time-conditioned MLP for 2-D data: x (B, dim), t (B,) -> (B, dim)."""

    def __init__(self, dim=2, hidden=256, depth=3, num_classes=0, cond_dim=0):
        super().__init__()
        self.config = dict(
            kind="mlp",
            dim=dim,
            hidden=hidden,
            depth=depth,
            num_classes=num_classes,
            cond_dim=cond_dim,
        )
        self.hidden = hidden
        self.t_mlp = nn.Sequential(nn.Linear(64, hidden), nn.SiLU(), nn.Linear(hidden, hidden))
        self.cond = CondEmbedding(hidden, num_classes, cond_dim)
        self.inp = nn.Linear(dim, hidden)
        self.blocks = nn.ModuleList(
            [
                nn.Sequential(
                    nn.LayerNorm(hidden),
                    nn.Linear(hidden, hidden),
                    nn.SiLU(),
                    nn.Linear(hidden, hidden),
                )
                for _ in range(depth)
            ]
        )
        self.out = nn.Sequential(nn.LayerNorm(hidden), nn.Linear(hidden, dim))

    def forward(self, x, t, y=None):
        emb = self.t_mlp(timestep_embedding(t, 64)) + self.cond(y, x.shape[0], x.device)
        h = self.inp(x) + emb
        for blk in self.blocks:
            h = h + blk(h + emb)
        return self.out(h)


def build_model(config):
    """Rebuild a network from its ``config`` dict (as stored in every checkpoint)."""
    cfg = dict(config)
    kind = cfg.pop("kind")
    if kind == "unet":
        return UNet(**cfg)
    if kind == "mlp":
        return TimeMLP(**cfg)
    if kind == "diffusers":  # optional dependency, imported only for such checkpoints
        from .diffusers_unet import from_config

        return from_config(config)
    raise ValueError(f"unknown model kind {kind!r}")


def unet_from_preset(preset, image_size, in_ch, num_classes=0, cond_dim=0):
    if preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r}; choose from {sorted(PRESETS)}")
    return UNet(
        image_size=image_size,
        in_ch=in_ch,
        num_classes=num_classes,
        cond_dim=cond_dim,
        **PRESETS[preset],
    )


def attention_bytes(model, h, w, batch, grad):
    """The least memory the attention of ``model`` takes on a batch of ``batch`` h x w inputs when
    its score matrices are materialised (the CPU's scaled_dot_product_attention): scores and
    softmax of the largest layer, plus, with ``grad``, the softmax every layer keeps for backward.
    0 for a network without our Attention layers."""
    sizes = [a.heads * ((h >> a.level) * (w >> a.level)) ** 2 * 4 * batch
             for a in model.modules() if isinstance(a, Attention)]
    if not sizes:
        return 0
    return 2 * max(sizes) + (sum(sizes) if grad else 0)


def count_params(model):
    return sum(p.numel() for p in model.parameters())


if __name__ == "__main__":
    sizes = {
        "tiny": (32, 1),
        "small16": (16, 1),
        "mnist": (32, 1),
        "celeba64": (64, 3),
        "base256": (256, 3),
        "corrector256": (256, 3),
    }
    for name, (res, c) in sizes.items():
        print(
            f"{name:14s} {res}x{res}x{c}  "
            f"{count_params(unet_from_preset(name, res, c)) / 1e6:8.2f}M parameters"
        )
