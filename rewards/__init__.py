"""Rewards: ``reward(images_or_points, conditions) -> tensor (B,)``, higher is better, no gradients.

    get_reward("linear", task, device)           # toy2d: r(x) = <x, u>, u at 247.5 deg; exact CDF
    get_reward("linear:0", task, device)         # toy2d: u at 0 deg (towards the lightest mode)
    get_reward("digit", task, device)            # MNIST: log p(requested digit | image), classifier
    get_reward("digit:3", task, device)          # MNIST, unconditional model: log p(3 | image)
    get_reward("pairs", task, device)            # mnist-pairs: sum of log p(digit | half)
    get_reward("smiling", task, device)          # CelebA: log p(Smiling | image); "a+b" for several
    get_reward("attributes", task, device)       # CelebA, conditional: log p(requested | image)
    get_reward("jpeg", task, device)             # any image task: JPEG compressibility (-kB), DDPO
    get_reward("jpeg-incompressibility", ...)    # +kB

Every reward is a ``Reward``: call it with (x, y) where y is the batch's conditions (labels,
attribute vectors) or None; ``metrics(x, y)`` gives extra numbers (classifier accuracy). Rewards
run under ``torch.no_grad`` and return float32 on x's device. Classifier rewards load a
checkpoint cached under runs/rewards/ and train it first (saying so) when it is missing.
"""

import math

import torch

from tasks import UsageError


class Reward:
    """Base class: subclasses set ``name``, ``description`` and implement ``score``."""

    name = "reward"
    description = ""
    uses_conditions = False  # whether the value depends on the conditions y
    # whether the value is a log-probability (classifier rewards): exp(r) = p(requested | x)
    log_prob = False

    @torch.no_grad()
    def __call__(self, x, y=None):
        return self.score(x, y).float()

    def score(self, x, y):
        raise NotImplementedError

    def metrics(self, x, y=None):
        """Extra evaluation numbers beyond the reward's mean (e.g. classifier accuracy)."""
        return {}


def default_reward(task_name, conditional):
    """The reward a task uses when --reward is not given."""
    if task_name == "toy2d":
        return "linear"
    if task_name in ("mnist", "mnist16"):
        return "digit" if conditional else "digit:0"
    if task_name.startswith("mnist-pairs"):
        return "pairs"
    if task_name == "celeba":
        return "attributes" if conditional else "smiling"
    return "jpeg"


def reward_names(task_name):
    """The reward names a task accepts (for help texts and error messages)."""
    if task_name == "toy2d":
        return ["linear", "linear:DEG"]
    names = ["jpeg", "jpeg-incompressibility"]
    if task_name in ("mnist", "mnist16"):
        names = ["digit", "digit:K"] + names
    if task_name.startswith("mnist-pairs"):
        names = ["pairs"] + names
    if task_name == "celeba":
        names = [
            "attributes",
            "<attribute>[+<attribute>...] e.g. smiling, eyeglasses+male, "
            "smiling+not-male (not-: absent)",
        ] + names
    return names


def get_reward(name, task, device="cpu", conditional=False, data_dir=None, classifier_path=None):
    """Build the reward ``name`` for ``task`` (a tasks.Task). ``conditional``: whether the model
    that is rewarded takes conditions (then classifier rewards score the requested
    label/attributes)."""
    name = (name or default_reward(task.name, conditional)).strip()
    low = name.lower()
    if low.startswith("linear"):
        if task.name != "toy2d":
            raise UsageError(
                f"reward {name!r} is for toy2d; for {task.name} use one of "
                f"{', '.join(reward_names(task.name))}"
            )
        from .toy2d import LinearReward

        angle = _after_colon(name, float, "linear:DEG (angle of the direction u in degrees)")
        return LinearReward() if angle is None else LinearReward(angle)
    if low in ("jpeg", "jpeg-compressibility", "jpeg-incompressibility"):
        if task.kind != "image":
            raise UsageError(f"reward {name!r} needs an image task, not {task.name}")
        from .jpeg import JPEGReward

        return JPEGReward(incompressible=low == "jpeg-incompressibility")
    if task.name in ("mnist", "mnist16") and low.startswith("digit"):
        from .classifier import DigitReward

        target = _after_colon(name, int, "digit:K with K in 0..9")
        if target is None and not conditional:
            raise UsageError(
                "the MNIST model is unconditional: name the digit to reward, e.g. --reward digit:3"
            )
        if target is not None and not 0 <= target <= 9:
            raise UsageError(f"--reward {name}: the digit must be in 0..9")
        return DigitReward(
            device, target, data_dir=data_dir, path=classifier_path, classifier_task=task.name
        )
    if task.name.startswith("mnist-pairs") and low == "pairs":
        from .classifier import PairReward

        if not conditional:
            raise UsageError(
                "reward 'pairs' scores the requested pair: the mnist-pairs model "
                "must be class-conditional"
            )
        return PairReward(
            device,
            data_dir=data_dir,
            path=classifier_path,
            classifier_task=digit_classifier_task(task),
        )
    if task.name == "celeba":
        from .classifier import AttributeReward

        if low == "attributes":
            if not conditional:
                raise UsageError(
                    "--reward attributes scores the requested attributes, but the CelebA model is "
                    "unconditional: name the attributes instead, e.g. --reward smiling"
                )
            return AttributeReward(device, None, data_dir=data_dir, path=classifier_path)
        return AttributeReward(device, low.split("+"), data_dir=data_dir, path=classifier_path)
    raise UsageError(
        f"unknown reward {name!r} for task {task.name}; choose from "
        f"{', '.join(reward_names(task.name))}"
    )


def digit_classifier_task(task):
    """The digit classifier of a digit task: mnist (32 px digits) or mnist16 (16 px digits)."""
    return "mnist16" if task.image_size == 16 else "mnist"


def _after_colon(name, cast, what):
    if ":" not in name:
        return None
    try:
        value = cast(name.split(":", 1)[1])
    except ValueError:
        raise UsageError(f"cannot read reward {name!r}: expected {what}") from None
    # linear:1e999 or linear:nan would end in a math error later: refused here, in one line
    if isinstance(value, float) and not math.isfinite(value):
        raise UsageError(f"cannot read reward {name!r}: expected {what}, a finite number")
    return value


@torch.no_grad()
def score(reward, x, y=None, batch_size=1000):
    """The reward of every sample, in batches of ``batch_size``; a non-finite value stops
    the run."""
    from tasks import progress

    out = [
        reward(x[i : i + batch_size], y[i : i + batch_size] if y is not None else None)
        for i in progress(range(0, len(x), batch_size), f"reward {reward.name}")
    ]
    return check_finite(torch.cat(out), reward.name)


def bounded(reward, r):
    """The bounded form of a log-probability reward: p = exp(r) in [0, 1], the classifier's
    probability of what was requested (digit, pair, attributes); None for other rewards. A mean of
    p cannot be moved much by a few very unlikely samples, as the mean log-probability can."""
    return r.exp() if reward.log_prob else None


def check_finite(r, name):
    """A NaN/inf reward stops the run with one line (exit 2), never a silent selection."""
    bad = ~torch.isfinite(r)
    n_bad = int(bad.sum())
    if n_bad:
        raise UsageError(
            f"reward {name!r} returned {n_bad} non-finite values (NaN/inf) out of {r.numel()}; "
            f"check the reward, its classifier checkpoint and the samples"
        )
    return r
