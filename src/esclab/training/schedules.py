"""Learning-rate schedules that torch has no single class for.

A scheduler config with `interval: step` is stepped after every optimizer step
and is built with `total_steps` (the run's optimizer steps, from the trainer),
as torch's OneCycleLR is; the functions here follow the same contract.
"""

import math

from torch.optim import Optimizer
from torch.optim.lr_scheduler import LambdaLR


def warmup_cosine(optimizer: Optimizer, *, total_steps: int, warmup_fraction: float) -> LambdaLR:
    """Linear warmup to the optimizer's lr, then half a cosine towards 0 (SGDR's decay, without restarts).

    Step s (0-based) trains with lr * (s + 1) / warmup during the warmup, so no step
    is wasted at lr 0; the last step still has a small positive lr.
    """
    warmup = max(1, round(warmup_fraction * total_steps))
    decay = max(1, total_steps - warmup + 1)

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        return 0.5 * (1 + math.cos(math.pi * min(1.0, (step - warmup + 1) / decay)))

    return LambdaLR(optimizer, factor)
