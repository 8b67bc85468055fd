"""The exact target of a class tilt (benchmark task mnist-tilt), sampled by rejection.

An unconditional base p_ref fine-tuned with the reward r(x) = log p(c | x) and GRAFT's rejection
rule at alpha = 1 (accept with probability exp(r - r_max)) targets

    p*(x) = p_ref(x) p(c | x) / Z,        Z = E_{p_ref}[p(c | x)].

Since p(c | x) <= 1, p* is sampled exactly by drawing x ~ p_ref and keeping it with probability
p(c | x): ``rejection_sample``. Its class fractions are the base's, reweighted by p(c | x):
P*(class k) = E_ref[p(c | x) 1{k(x) = k}] / Z (``reweighted_fractions``), which
tests/test_benchmark.py checks the sampler against.
"""

import torch


@torch.no_grad()
def rejection_sample(draw, prob, n, generator, max_draws, batch=1024):
    """Exact samples of p(x) q(x) / Z with q in [0, 1]: ``draw(k)`` returns k samples of p
    (k <= ``batch``), ``prob(x)`` their q (B,); each is kept when u < q, u ~ U(0, 1) from
    ``generator``, until n are kept or ``max_draws`` were drawn. Returns (kept (<= n, in draw
    order), dict(draws, kept, rate, mean_q)). Raises ValueError when q leaves [0, 1]."""
    kept, draws, count, q_sum = [], 0, 0, 0.0
    while count < n and draws < max_draws:
        x = draw(min(batch, max_draws - draws))
        q = prob(x).double()
        if bool(((q < 0) | (q > 1) | ~torch.isfinite(q)).any()):
            raise ValueError("the acceptance probabilities must lie in [0, 1]")
        u = torch.rand(q.shape, generator=generator, device=q.device, dtype=torch.float64)
        keep = u < q
        kept.append(x[keep.to(x.device)])
        draws, count, q_sum = draws + len(x), count + int(keep.sum()), q_sum + q.sum().item()
    x = torch.cat(kept)[:n] if kept else torch.zeros(0)
    return x, dict(draws=draws, kept=len(x), rate=count / max(draws, 1),
                   mean_q=q_sum / max(draws, 1))


def reweighted_fractions(labels, q, num_classes):
    """P*(class k) = sum_i q_i 1{labels_i = k} / sum_i q_i: the class fractions of p q / Z
    estimated from samples of p with labels ``labels`` and weights ``q`` (float64, (num_classes,)).
    """
    q = q.double().cpu()
    w = torch.zeros(num_classes, dtype=torch.float64).index_add_(0, labels.long().cpu(), q)
    return w / q.sum()


def class_fractions(labels, num_classes):
    """The fraction of each class among ``labels`` (float64 (num_classes,))."""
    counts = torch.bincount(labels.long().cpu(), minlength=num_classes).double()
    return counts / max(len(labels), 1)


@torch.no_grad()
def class_tilt_target(net, process, reward, shape, n, *, sample_steps, batch, generator,
                      max_draws, clip=True, eta=1.0):
    """n exact samples of p_ref(x) p(c | x) / Z from the unconditional DDPM ``net`` (sampled as
    the benchmark samples it: ``sample_steps`` steps at ``eta``) by rejection, where p(c | x) =
    exp(reward(x)) for a DigitReward ``reward`` with a target class. Returns (samples, info):
    info has the draws, the acceptance rate, Z (the mean p(c | x) over the draws) and the class
    fractions of the kept samples by the reward classifier."""
    dev = generator.device

    def draw(k):
        z = torch.randn((k, *shape), generator=generator, device=dev)
        x, _ = process.sample(net, z, generator=generator, eta=eta, num_steps=sample_steps,
                              clip=clip)
        return x.clamp(-1, 1) if clip else x

    def prob(x):
        return torch.cat([reward(x[i : i + batch]).exp() for i in range(0, len(x), batch)])

    x, info = rejection_sample(draw, prob, n, generator, max_draws, batch)
    if len(x):
        labels = torch.cat([reward.model(x[i : i + batch]).argmax(1)
                            for i in range(0, len(x), batch)])
        info["class_fractions"] = class_fractions(labels, 10).tolist()
    return x, info
