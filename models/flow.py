"""Rectified flow with NOISE AT t=0 and DATA AT t=1 (the paper's convention, section 4).

x_t = t x_1 + (1 - t) x_0, x_0 ~ N(0, I), x_1 ~ data; the network predicts v = x_1 - x_0.
Sampling integrates dx/dt = v(x, t) from t=0 to t=1 over N uniform Euler steps (Algorithm 5);
``invert`` undoes exactly that discrete sampler by backward Euler (Algorithm 6).
"""

import torch

from .diffusion import randn


class RectifiedFlow:
    @property
    def config(self):
        return dict(kind="flow")

    def loss(self, model, x1, y=None, generator=None, rows=None):
        """Velocity loss; ``rows`` as in DDPM.loss (draws for the whole batch, loss on those
        rows)."""
        x0 = randn(x1.shape, generator, x1)
        t = torch.rand((x1.shape[0],), generator=generator, device=x1.device, dtype=x1.dtype)
        if rows is not None:
            x1, x0, t, y = x1[rows], x0[rows], t[rows], (y[rows] if y is not None else None)
        tb = t.reshape(-1, *([1] * (x1.dim() - 1)))
        xt = tb * x1 + (1 - tb) * x0
        return (model(xt, t, y) - (x1 - x0)).pow(2).mean()

    @staticmethod
    def _v(model, x, t, y):
        return model(x, torch.full((x.shape[0],), t, device=x.device, dtype=x.dtype), y)

    @torch.no_grad()
    def sample(self, model, z, n_steps, y=None, method="euler", return_traj=False, progress=None):
        """Algorithm 5 (Euler) or Heun from noise z at t=0 to data at t=1. NFE: N (Euler), 2N
        (Heun: two evaluations per step, the last one at t = 1 included)."""
        h = 1.0 / n_steps
        x, traj = z, [z]
        ks = range(n_steps)
        for k in progress(ks) if progress else ks:
            t = k * h
            v = self._v(model, x, t, y)
            if method == "euler":
                x = x + h * v
            elif method == "heun":
                xe = x + h * v
                x = x + 0.5 * h * (v + self._v(model, xe, t + h, y))
            else:
                raise ValueError(f"unknown method {method!r} (euler or heun)")
            if return_traj:
                traj.append(x)
        return (x, traj) if return_traj else x

    @staticmethod
    def nfe(n_steps, method="euler"):
        return n_steps if method == "euler" else 2 * n_steps

    @torch.no_grad()
    def invert(self, model, x, n_steps, n_fixed=10, y=None, progress=None):
        """Algorithm 6: invert the N-step Euler sampler by backward Euler.

        Forward step k maps x_k -> x_{k+1} = x_k + h v(x_k, t_k) with t_k = k/N. Undoing it means
        solving x_k = x_{k+1} - h v(x_k, t_k): inversion step j undoes forward step k = N-1-j, so it
        queries t = 1 - (j+1)/N. Each solve runs n_fixed fixed-point iterations, which contract
        when h·Lip(v) < 1. Returns (z, residual), residual (B,) = the largest over steps of the last
        iteration's update norm ||y_{i+1} - y_i|| per sample: ~0 when converged, large (or inf/nan)
        when h·L >= 1 and the iteration diverged. No host syncs."""
        if n_fixed < 1:
            raise ValueError(
                f"n_fixed must be >= 1 (fixed-point iterations per step), got {n_fixed}"
            )
        h = 1.0 / n_steps
        residual = torch.zeros(x.shape[0], device=x.device, dtype=x.dtype)
        js = range(n_steps)
        for j in progress(js) if progress else js:
            t = 1.0 - (j + 1) * h
            yk = x
            for _ in range(n_fixed):
                y_new = x - h * self._v(model, yk, t, y)
                step_norm = (y_new - yk).flatten(1).norm(dim=1)
                yk = y_new
            residual = torch.maximum(residual, step_norm)
            x = yk
        return x, residual
