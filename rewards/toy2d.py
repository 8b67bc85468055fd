"""toy2d reward and the exact targets of GRAFT / P-GRAFT on the known mixture (theory checks).

r(x) = <x, u> with u the unit vector at angle DEG (default 247.5: between modes 5 and 6, weights
6/36 and 7/36; top-2 of 8 moves their weights from 0.36 to 0.91, a total variation of 0.55, and
leaves some on modes 4 and 7). The default points at modes that a DDPM learns well: the tilt
multiplies the base model's own mode errors by up to M/K, and a direction towards the light modes
(e.g. linear:0, mode 0 of weight 1/36) measures mostly those. Under the true mixture r is a mixture
of 1-D normals, so its CDF F is exact, and so is the law that an acceptance rule targets:

  GRAFT   (paper, GRAFT): accepted x ~ p(x) a(x) / Z, a(x) = P(accept | x), a function of r(x) and
  F(r(x)). P-GRAFT (paper, P-GRAFT): the kept states X_{N_I} ~ p_{N_I}(x) h(x) / Z with
          h(x) = E[a(X_0) | X_{N_I} = x]; the output continues with the reference from there.

For the Gaussian mixture both are integrals of Gaussians: per mode j, X_{N_I} ~ N(sqrt(ab) c_j, v I)
with v = ab s^2 + 1 - ab (ab = abar_{N_I}; ab = 1 is GRAFT), the posterior over modes is closed form
and X_0 | X_{N_I}, mode k is N(m_k, tau^2 I). ``tilted_mode_weights`` integrates them by
Gauss-Hermite quadrature (deterministic) and returns the mode weights the fine-tuned model should
have.
"""

import math

import numpy as np
import torch

from tasks import TOY

from . import Reward


def normal_cdf(z):
    return 0.5 * (1 + torch.erf(z / math.sqrt(2)))


DEFAULT_ANGLE = 247.5


class LinearReward(Reward):
    def __init__(self, angle_deg=DEFAULT_ANGLE):
        a = math.radians(angle_deg)
        self.angle = angle_deg
        self.u = torch.tensor([math.cos(a), math.sin(a)], dtype=torch.float64)
        self.name = "linear" if angle_deg == DEFAULT_ANGLE else f"linear:{angle_deg:g}"
        self.description = (
            f"r(x) = <x, u>, u at {angle_deg:g} deg (exact CDF under the true mixture)"
        )

    def score(self, x, y=None):
        return x.double() @ self.u.to(x.device)

    def fn(self, x):
        """Plain function of points, for plots."""
        return self.score(x, None)

    def mode_means(self):
        """E[r | mode k] for the 8 modes (the std of r within a mode is TOY.std)."""
        return TOY.centers @ self.u

    def cdf(self, v):
        """Exact CDF of r(X), X ~ true mixture, at values v (any shape, float64)."""
        v = torch.as_tensor(v, dtype=torch.float64)
        z = (v[..., None] - self.mode_means()) / TOY.std
        return (normal_cdf(z) * TOY.weights).sum(-1)


def _gauss_hermite(n):
    """Nodes/weights for E[f(Z)], Z ~ N(0, 1)."""
    z, w = np.polynomial.hermite_e.hermegauss(n)
    return torch.from_numpy(z), torch.from_numpy(w / w.sum())


def _weighted_cdf(mu, mass, tau, grid):
    """CDF on ``grid`` of sum_i mass_i N(mu_i, tau^2) (a step function when tau = 0)."""
    order = torch.argsort(mu)
    mu, mass = mu[order], mass[order]
    if tau == 0:
        cum = torch.cumsum(mass, 0)
        idx = torch.searchsorted(mu, grid, right=True)
        return torch.where(idx > 0, cum[(idx - 1).clamp(min=0)], torch.zeros_like(grid))
    # bin the atoms onto the grid, then smooth with the normal CDF (bin width << tau)
    idx = torch.searchsorted(grid, mu).clamp(0, len(grid) - 1)
    hist = torch.zeros_like(grid).index_add_(0, idx, mass)
    return (normal_cdf((grid[:, None] - grid[None, :]) / tau) * hist).sum(1)


def tilted_mode_weights(
    accept_prob, reward, abar=1.0, rounds=1, compound=False, nodes_2d=48, nodes_1d=24
):
    """Mode weights of the law a GRAFT (abar = 1) or P-GRAFT (abar = abar_{N_I}) run targets.

    accept_prob(r, F) -> P(accept | reward r, CDF value F) for float64 tensors
    (graft.AcceptRule.prob).
    compound=False: every round samples from the reference, so the target is p a(F_ref) (any
    rounds). compound=True: round t samples from round t-1's target, so the tilts multiply over
    ``rounds`` rounds, each with the CDF of the law it sampled from. Returns (8,) float64 summing
    to 1."""
    s2 = TOY.std**2
    c, w, u = TOY.centers, TOY.weights, reward.u
    v = abar * s2 + 1 - abar  # variance of X_{N_I} within a mode
    z, wz = _gauss_hermite(nodes_2d)
    zz = torch.stack(torch.meshgrid(z, z, indexing="ij"), -1).reshape(-1, 2)  # (Q2, 2)
    wzz = (wz[:, None] * wz[None, :]).reshape(-1)
    # quadrature nodes of X_{N_I}: per mode j, sqrt(abar) c_j + sqrt(v) z, with prior mass w_j * wzz
    x = (math.sqrt(abar) * c[:, None, :] + math.sqrt(v) * zz[None]).reshape(-1, 2)  # (8 Q2, 2)
    mass0 = (w[:, None] * wzz[None]).reshape(-1)
    # posterior over the mode k of X_0 given X_{N_I} = x, and X_0 | x, k ~ N(m_k, tau2 I)
    d2 = ((x[:, None, :] - math.sqrt(abar) * c[None]) ** 2).sum(-1)
    post = torch.softmax(w.log()[None] - d2 / (2 * v), 1)  # (n, 8)
    tau = math.sqrt(max(s2 * (1 - abar) / v, 0.0))
    m = c[None] + (math.sqrt(abar) * s2 / v) * (
        x[:, None, :] - math.sqrt(abar) * c[None]
    )  # (n, 8, 2)
    mu = m @ u  # (n, 8): mean of r(X_0) given x and k
    g1, wg1 = (
        _gauss_hermite(nodes_1d)
        if tau > 0
        else (torch.zeros(1, dtype=torch.float64), torch.ones(1, dtype=torch.float64))
    )
    r_nodes = mu[..., None] + tau * g1  # (n, 8, Q1)
    lo, hi = float(mu.min()) - 6 * TOY.std, float(mu.max()) + 6 * TOY.std
    grid = torch.linspace(lo, hi, 2001, dtype=torch.float64)

    mass = mass0.clone()
    cdf = reward.cdf  # round 1 samples from the reference: the exact CDF
    for t in range(rounds if compound else 1):
        if t > 0:  # the CDF of r(X_0) under the law sampled from in this round
            atoms = (mass[:, None] * post).reshape(-1)
            fg = _weighted_cdf(mu.reshape(-1), atoms / atoms.sum(), tau, grid)

            def cdf(r, fg=fg):
                return torch.from_numpy(np.interp(r.numpy(), grid.numpy(), fg.numpy()))

        a = accept_prob(r_nodes, cdf(r_nodes))
        h = (post * (a * wg1).sum(-1)).sum(-1)  # h(x) = E[a | X_{N_I} = x]
        mass = mass * h
    out = (mass[:, None] * post).sum(0)
    return out / out.sum()
