"""Task metrics that need no network (they live in tasks.py, which must not import eval/;
re-exported here) and the evaluation of a fine-tuned model's samples that GRAFT, P-GRAFT and the
benchmarks share."""

import torch

from tasks import mode_tv, sliced_wasserstein, toy2d_metrics

__all__ = ["mode_tv", "sliced_wasserstein", "toy2d_metrics", "evaluate_samples", "FID"]


@torch.no_grad()
def evaluate_samples(x, y, reward, task, eval_samples, fid=None, target=None, batch_size=1000):
    """Numbers of one evaluation of samples ``x`` (conditions ``y``): reward mean/std over all of x,
    the reward's own metrics (classifier accuracy) on the first ``eval_samples``, toy2d's mode
    metrics and the TV to an exact tilted ``target`` of mode weights, and FID when ``fid`` is an FID
    callable (its sample count is its own)."""
    from rewards import score

    r = score(reward, x, y, batch_size)
    out = dict(reward_mean=r.mean().item(), reward_std=r.std().item() if len(r) > 1 else 0.0)
    out.update(reward.metrics(x[:eval_samples], y[:eval_samples] if y is not None else None))
    if task.name == "toy2d":
        m = task.metrics(x)
        out.update(mode_tv=m["mode_tv"], sw2=m["sw2"], mode_hist=m["mode_hist"])
        if target is not None:
            hist = torch.tensor(m["mode_hist"], dtype=torch.float64)
            out["tilt_tv"] = 0.5 * (hist - target).abs().sum().item()
    if fid is not None:
        out["fid"] = fid(x)
    return out


class FID:
    """FID of image samples against the task's training split; the Inception network and the
    reference statistics load on the first call (cached on disk by eval/fid.py)."""

    def __init__(self, task, samples, device, data_dir=None):
        self.task, self.samples, self.device, self.data_dir = task, samples, device, data_dir
        self._eval = self._ref = None

    def __call__(self, x):
        from eval.fid import FIDEvaluator, frechet_distance

        if self._eval is None:
            self._eval = FIDEvaluator(device=str(self.device))
            self._ref = self._eval.reference_stats(
                self.task.name, split="train", data_dir=self.data_dir
            )
        mu, sigma, _ = self._eval.stats(x[: self.samples])
        return float(frechet_distance(mu, sigma, *self._ref))
