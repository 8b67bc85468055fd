"""DDPM (variance-preserving) diffusion: schedules, q_sample, epsilon loss, ancestral and DDIM
samplers.

Conventions (asserted in tests/test_models.py):
  - steps n = 0..N; n = 0 is data, n = N is (nearly) pure noise; sampling runs n = N -> 0.
  - alpha_bar[0] = 1 and alpha_bar decreases in n; x_n = sqrt(abar_n) x_0 + sqrt(1 - abar_n) eps.
  - the network sees t = n / N in [0, 1] and predicts eps.
  - every random draw takes a ``torch.Generator`` on the tensors' device; no host syncs in loops.

The samplers run any segment start -> stop of the chain with any network, so P-GRAFT can stitch a
fine-tuned model for N -> N_I to the frozen reference for N_I -> 0 (paper, section 3).
"""

import math

import torch


def randn(shape, generator, like):
    """Standard normal noise with ``like``'s device and dtype, drawn from ``generator``."""
    return torch.randn(shape, generator=generator, device=like.device, dtype=like.dtype)


def make_betas(n_steps, schedule):
    if schedule == "linear":
        # Ho et al. 2020's betas 1e-4..0.02 at N = 1000, scaled by 1000/N so that the noise per
        # unit of
        # t = n/N is about the same for any N. abar_N still depends on N (4.0e-5 at N = 1000,
        # 7.7e-6 at
        # N = 50), and beta_N = 20/N reaches 1 at N = 20 (abar_N = 0): such N are refused.
        if n_steps <= 20:
            raise ValueError(
                f"the linear schedule needs N > 20 steps (beta_N = 20/N must stay below 1), "
                f"got N = {n_steps}; use more steps or the cosine schedule"
            )
        scale = 1000.0 / n_steps
        return torch.linspace(scale * 1e-4, scale * 0.02, n_steps, dtype=torch.float64)
    if schedule == "cosine":  # Nichol & Dhariwal 2021
        s = 0.008
        f = (
            torch.cos(
                (torch.arange(n_steps + 1, dtype=torch.float64) / n_steps + s)
                / (1 + s)
                * math.pi
                / 2
            )
            ** 2
        )
        return (1 - f[1:] / f[:-1]).clamp(max=0.999)
    raise ValueError(f"unknown schedule {schedule!r} (linear or cosine)")


class DDPM:
    def __init__(self, n_steps=1000, schedule="linear"):
        self.N, self.schedule = int(n_steps), schedule
        betas = make_betas(self.N, schedule)
        # index n holds abar_n; abar_0 = 1 (clean data)
        self.alpha_bar = torch.cat(
            [torch.ones(1, dtype=torch.float64), torch.cumprod(1 - betas, 0)]
        )
        self._abar = self.alpha_bar.tolist()  # python floats: scalar lookups never touch the device
        self._cache = {}

    @property
    def config(self):
        return dict(kind="ddpm", n_steps=self.N, schedule=self.schedule)

    def abar(self, n, like):
        """abar_n for an integer tensor n, on ``like``'s device/dtype, shaped to broadcast with
        it."""
        key = (like.device, like.dtype)
        if key not in self._cache:
            self._cache[key] = self.alpha_bar.to(device=like.device, dtype=like.dtype)
        return self._cache[key][n].reshape(-1, *([1] * (like.dim() - 1)))

    def q_sample(self, x0, n, eps):
        ab = self.abar(n, x0)
        return ab.sqrt() * x0 + (1 - ab).sqrt() * eps

    def loss(self, model, x0, y=None, generator=None, n_range=None, rows=None):
        """Epsilon-prediction loss, n uniform on n_range = (lo, hi) inclusive (default (1, N)).

        A sub-range trains one segment of the chain only (P-GRAFT's ``--loss x0``). ``rows`` (a
        slice): n and eps are drawn for the whole batch, the loss uses only those rows; under
        torchrun each rank takes its rows of one global batch, so P processes draw what one
        would."""
        lo, hi = n_range or (1, self.N)
        n = torch.randint(lo, hi + 1, (x0.shape[0],), generator=generator, device=x0.device)
        eps = randn(x0.shape, generator, x0)
        if rows is not None:
            x0, n, eps, y = x0[rows], n[rows], eps[rows], (y[rows] if y is not None else None)
        pred = model(self.q_sample(x0, n, eps), n.float() / self.N, y)
        return (pred - eps).pow(2).mean()

    def grid(self, start, stop, num_steps=None, keep=()):
        """Decreasing integer steps start -> stop. With num_steps=S the points are those of the
        global S-step grid round(linspace(N, 0, S+1)) that fall inside, plus the two ends, so that
        segment runs stitch into exactly the full run. Steps in ``keep`` (P-GRAFT's N_I) are put on
        the grid too, so a run that stops at N_I and one that passes through it take the same
        steps."""
        if not 0 <= stop < start <= self.N:
            raise ValueError(
                f"need 0 <= stop < start <= N={self.N}, got start={start}, stop={stop}"
            )
        if num_steps is None or num_steps >= self.N:
            return list(range(start, stop - 1, -1))
        full = torch.linspace(self.N, 0, num_steps + 1, dtype=torch.float64).round().long().tolist()
        inside = {n for n in full if stop < n < start} | {n for n in keep if stop < n < start}
        return [start] + sorted(inside, reverse=True) + [stop]

    def stochastic_steps(self, start, stop, num_steps=None, eta=1.0, keep=()):
        """How many steps of the run start -> stop draw noise (sigma > 0). Every step to 0 is
        deterministic (abar_0 = 1), so a continuation N_I -> 0 needs two grid steps to be random."""
        steps = self.grid(start, stop, num_steps, keep) if start > stop else [start]
        return sum(self.sigma(n, m, eta) > 0 for n, m in zip(steps[:-1], steps[1:]))

    def eps(self, model, x, n, y=None, cfg_scale=0.0):
        """eps_theta(x, n) for an int n or a (B,) long tensor n (a step per row)."""
        if isinstance(n, torch.Tensor):
            t = (n.double() / self.N).to(x.dtype)
        else:
            t = torch.full((x.shape[0],), n / self.N, device=x.device, dtype=x.dtype)
        if cfg_scale == 0.0 or y is None:
            return model(x, t, y)
        # classifier-free guidance: eps_u + (1 + w)(eps_c - eps_u), one batched call
        null = torch.full_like(y, -1) if y.dtype == torch.long else torch.zeros_like(y)
        e = model(torch.cat([x, x]), torch.cat([t, t]), torch.cat([y, null]))
        ec, eu = e.chunk(2)
        return eu + (1 + cfg_scale) * (ec - eu)

    def _coefs(self, n, m, eta, like):
        """The coefficients of one generalized DDIM step n -> m (Song et al. 2021, eq. 12), written
        once: python floats for int n, m; float64 tensors shaped to broadcast with ``like`` for (B,)
        long tensors n, m (a step per row)."""
        if isinstance(n, torch.Tensor):
            key = (like.device, torch.float64)
            if key not in self._cache:
                self._cache[key] = self.alpha_bar.to(like.device)
            shape = (-1, *([1] * (like.dim() - 1)))
            ab_n, ab_m = self._cache[key][n].reshape(shape), self._cache[key][m].reshape(shape)
            sqrt, pos = torch.sqrt, lambda v: v.clamp(min=0.0)
        else:
            ab_n, ab_m, sqrt, pos = self._abar[n], self._abar[m], math.sqrt, lambda v: max(v, 0.0)
        sigma = eta * sqrt((1 - ab_m) / (1 - ab_n) * (1 - ab_n / ab_m))
        return sqrt(1 - ab_n), sqrt(ab_n), sqrt(ab_m), sqrt(pos(1 - ab_m - sigma**2)), sigma

    def sigma(self, n, m, eta=1.0):
        """sigma of the step n -> m, a python float: 0 for eta = 0 and for every step to m = 0."""
        return self._coefs(n, m, eta, None)[4]

    def step_mean_std(self, model, x, n, m, y=None, eta=1.0, clip=False, cfg_scale=0.0):
        """(mean, sigma) of the Gaussian step n -> m < n: x_m ~ N(mean, sigma^2 I). The sampler
        (``step``) and DDPO's policy log-density (``gaussian_log_prob``) share this one formula.

        n, m: ints, one step for the whole batch (sigma a python float), or (B,) long tensors, a
        step per row (sigma a float64 tensor that broadcasts with x). The coefficients are
        computed in float64 either way and meet x in its own dtype; torch's float64 sqrt can
        differ from math.sqrt in the last bit, which the cast to float32 almost always hides."""
        s_n, r_n, r_m, d, sigma = self._coefs(n, m, eta, x)
        if isinstance(n, torch.Tensor):
            s_n, r_n, r_m, d = (c.to(x.dtype) for c in (s_n, r_n, r_m, d))
        e = self.eps(model, x, n, y, cfg_scale)
        x0 = (x - s_n * e) / r_n
        if clip:
            x0 = x0.clamp(-1, 1)
            e = (x - r_n * x0) / s_n
        return r_m * x0 + d * e, sigma

    def step(self, model, x, n, m, y=None, eta=1.0, generator=None, clip=False, cfg_scale=0.0):
        """One generalized DDIM step n -> m < n (Song et al. 2021, eq. 12). eta=1 with m = n-1 is
        DDPM ancestral sampling with the posterior variance beta_tilde; eta=0 is deterministic."""
        x, sigma = self.step_mean_std(model, x, n, m, y, eta, clip, cfg_scale)
        if sigma > 0:
            x = x + sigma * randn(x.shape, generator, x)
        return x

    @torch.no_grad()
    def sample(
        self,
        model,
        x,
        start=None,
        stop=0,
        y=None,
        generator=None,
        eta=1.0,
        num_steps=None,
        return_at=(),
        clip=False,
        cfg_scale=0.0,
        progress=None,
    ):
        """Run x (the state at step ``start``, default N) down to ``stop``.

        Returns (x_stop, {n: x_n for n in return_at}). ``model`` is either a network or a list of
        (network, hi, lo) segments covering start..stop, e.g. [(finetuned, N, N_I), (ref, N_I,
        0)]. The steps of ``return_at`` and the segments' ends are always on the grid."""
        start = self.N if start is None else start
        segments = model if isinstance(model, (list, tuple)) else []
        ends = [n for _, hi, lo in segments for n in (hi, lo)]
        steps = self.grid(start, stop, num_steps, keep=[*return_at, *ends])
        saved = {}
        want = set(return_at)
        if start in want:
            saved[start] = x
        pairs = list(zip(steps[:-1], steps[1:]))
        for n, m in progress(pairs) if progress else pairs:
            net = model
            if isinstance(model, (list, tuple)):
                net = next(net_ for net_, hi, lo in model if hi >= n > lo)
            x = self.step(net, x, n, m, y, eta, generator, clip, cfg_scale)
            if m in want:
                saved[m] = x
        missing = want - set(saved)
        if missing:
            raise ValueError(
                f"return_at steps {sorted(missing)} are not on the sampling grid {steps[:3]}..."
            )
        return x, saved

    def prior(self, shape, generator, device, dtype=torch.float32):
        return torch.randn(shape, generator=generator, device=device, dtype=dtype)


def gaussian_log_prob(x, mean, sigma, log_sigma=None):
    """log N(x; mean, sigma^2 I) summed over every dimension but the first: (B,) float64.

    sigma: a python float, or a tensor with one value per row (as ``DDPM.step_mean_std`` returns
    it). This is DDPO's policy log-density of a sampler step x_n -> x_m; float64 keeps a sum over
    many pixels exact enough for a ratio exp(logp_new - logp_old) that is 1 before any update.
    A recomputation that must equal the sampler's value bit for bit passes sigma and ``log_sigma``
    (per row) computed with python's math, as the sampler's are (torch's float64 sqrt and log can
    differ from them in the last bit)."""
    d = x[0].numel()
    sq = (x.double() - mean.double()).flatten(1).pow(2).sum(1)
    if isinstance(sigma, torch.Tensor):
        sigma = sigma.double().reshape(len(x), -1)[:, 0]
        log_sigma = sigma.log() if log_sigma is None else log_sigma
    elif log_sigma is None:
        log_sigma = math.log(sigma)
    return -sq / (2 * sigma**2) - d * log_sigma - 0.5 * d * math.log(2 * math.pi)
