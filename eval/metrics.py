"""Task metrics that need no network (toy2d): exact mode weights and a distribution distance."""
import torch


def mode_tv(x, toy):
    """Total-variation distance between the model's mode-assignment histogram and the true weights."""
    k = toy.assign(x)
    hist = torch.bincount(k, minlength=len(toy.weights)).double() / len(k)
    return 0.5 * (hist - toy.weights).abs().sum().item(), hist


def sliced_wasserstein(x, y, n_proj=256, seed=0):
    """Sliced 2-Wasserstein distance between two equal-size point clouds (exact per projection)."""
    g = torch.Generator().manual_seed(seed)
    d = torch.randn(x.shape[1], n_proj, generator=g, dtype=torch.float64)
    d = d / d.norm(dim=0, keepdim=True)
    px, _ = (x.double().cpu() @ d).sort(0)
    py, _ = (y.double().cpu() @ d).sort(0)
    return (px - py).pow(2).mean().sqrt().item()


def toy2d_metrics(x, toy, seed=12345):
    """mode_tv and sliced W2 against a fresh sample of the true mixture of the same size."""
    x = x.detach().double().cpu()
    finite = torch.isfinite(x).all(1)
    tv, hist = mode_tv(x[finite], toy)
    ref = toy.sample(len(x), torch.Generator().manual_seed(seed)).double()
    return dict(mode_tv=tv, sw2=sliced_wasserstein(x[finite], ref[: int(finite.sum())]),
                mode_hist=[round(v, 4) for v in hist.tolist()], nonfinite=int((~finite).sum()))
