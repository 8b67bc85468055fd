"""The acceptance rules of GRAFT and P-GRAFT, P(accept | x) and the reshaped reward r_hat.

Paper, section 3 (GRAFT): a rule that keeps x with probability a(x) = P(accept | x) turns samples of
p into samples of p(x) a(x) / Z, which is the KL-regularised optimum p exp(r_hat / alpha) / Z of the
reshaped reward r_hat = alpha log a(x). For the rules that rank samples (top-K of M, best-of-N) a(x)
depends on x only through F = F(r(x)), the reward's CDF under the sampling law; it is estimated
from the round's own samples (the empirical CDF within each condition).

Both graft.py and pgraft.py import this module; P-GRAFT selects with the same rules on X_0.
"""

import math

import torch

from tasks import UsageError

RULES = ("topk", "bon", "threshold", "rs")


def empirical_cdf(r, groups=None):
    """The round's empirical reward CDF at each sample's own reward, F_i = (midrank_i - 1/2) / n
    within its group (the samples of one condition), so 0 < F < 1. Tied rewards share their mid-rank
    (the mean of the ranks they occupy), so F never depends on the samples' order. r (n,), groups
    (n,) long or None."""
    n = r.numel()
    groups = torch.zeros(n, dtype=torch.long, device=r.device) if groups is None else groups
    by_r = torch.argsort(r, stable=True)
    order = by_r[torch.argsort(groups[by_r], stable=True)]  # sorted by group, then by reward
    g, rs = groups[order], r[order]
    counts = torch.bincount(g)
    starts = torch.cumsum(counts, 0) - counts
    pos = (torch.arange(n, device=r.device) - starts[g]).double()
    new_run = torch.ones(n, dtype=torch.bool, device=r.device)  # a run = equal (group, reward)
    new_run[1:] = (g[1:] != g[:-1]) | (rs[1:] != rs[:-1])
    run = torch.cumsum(new_run.long(), 0) - 1
    run_len = torch.bincount(run).double()
    run_first = torch.zeros_like(run_len).scatter_reduce(0, run, pos, "amin", include_self=False)
    mid = run_first[run] + (run_len[run] - 1) / 2
    F = torch.empty(n, dtype=torch.float64, device=r.device)
    F[order] = (mid + 0.5) / counts[g].double()
    return F


def topk_accept_prob(F, M, K):
    """Top-K of M: x is kept iff fewer than K of the other M-1 samples beat it, so
    P(accept | x) = sum_{j<K} C(M-1, j) F^(M-1-j) (1-F)^j with F = F(r(x))."""
    j = torch.arange(K, dtype=torch.float64, device=F.device)
    log_binom = math.lgamma(M) - torch.lgamma(j + 1) - torch.lgamma(M - j)
    F = F.double()[..., None]
    return (log_binom.exp() * F ** (M - 1 - j) * (1 - F) ** j).sum(-1)


class AcceptRule:
    """topk (RAFT: the K best of each condition's M), bon (best-of-N: K = 1), threshold (r >= tau),
    rs (classical rejection sampling: accept with probability exp((r - r_max) / alpha))."""

    def __init__(self, kind, M, K=1, tau=None, alpha=1.0):
        if kind not in RULES:
            raise UsageError(f"--accept {kind!r} is not a rule; choose from {', '.join(RULES)}")
        if M < 1:
            raise UsageError(f"--M must be >= 1, got {M}")
        if kind == "bon":
            K = 1
        if kind == "topk" and not 1 <= K <= M:
            raise UsageError(
                f"--K {K} must be in 1..--M ({M}): top-K of M keeps K of each condition's M samples"
            )
        if kind == "threshold" and tau is None:
            raise UsageError("--accept threshold needs --tau (keep samples whose reward is >= tau)")
        if tau is not None and not math.isfinite(tau):
            raise UsageError(f"--tau must be a finite number, got {tau}")
        if not (alpha > 0 and math.isfinite(alpha)):
            raise UsageError(f"--alpha must be a finite number > 0, got {alpha}")
        self.kind, self.M, self.K, self.tau, self.alpha = kind, M, K, tau, alpha

    def select(self, r, generator):
        """r (P, M): the rewards of P conditions' M samples -> bool mask of the accepted ones."""
        if self.kind in ("topk", "bon"):
            idx = r.topk(self.K, dim=1).indices
            return torch.zeros_like(r, dtype=torch.bool).scatter_(1, idx, True)
        if self.kind == "threshold":
            return r >= self.tau
        u = torch.rand(r.shape, generator=generator, device=r.device, dtype=torch.float64)
        return u < torch.exp(
            (r.double() - r.max()) / self.alpha
        )  # rs: accepted law p exp(r / alpha) / Z

    def prob(self, r, F, r_max=None):
        """a(x) = P(accept | x) from x's reward r and CDF value F = F(r) under the sampling law."""
        if self.kind in ("topk", "bon"):
            return topk_accept_prob(F, self.M, self.K)
        if self.kind == "threshold":
            return (r >= self.tau).double()
        r_max = r.max() if r_max is None else r_max
        return torch.exp((r.double() - r_max) / self.alpha)

    def reshaped(self, r, groups=None):
        """(a, r_hat): a = P(accept | x) with the round's empirical CDF, r_hat = alpha log a
        (floored at alpha log 1e-12 where a = 0, e.g. below a threshold). Paper, GRAFT: r_hat is
        the reward whose KL-regularised optimum the accepted samples follow."""
        a = self.prob(r, empirical_cdf(r, groups), r.max())
        return a, self.alpha * torch.log(a.clamp(min=1e-12))


def kl_proxy(a):
    """KL(accepted law || sampling law) implied by P(accept | x) = a: E_q[log a] - log E_p[a], q =
    p a / Z."""
    return (torch.special.xlogy(a, a).sum() / a.sum() - torch.log(a.mean())).item()


def condition_groups(y):
    """Condition index of each sample (labels, or rows of attribute vectors), for the per-condition
    CDF."""
    if y is None:
        return None
    if y.dim() == 1:
        return y.long()
    return torch.unique(y, dim=0, return_inverse=True)[1]
