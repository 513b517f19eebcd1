"""The learning-rate schedule both training scripts use."""
from __future__ import annotations

import math
from typing import Callable


def warmup_cosine(warmup: int, total: int, floor: float = 0.1) -> Callable[[int], float]:
    """Multiplier of the base rate after ``step`` optimizer steps: linear warm-up over ``warmup`` steps, then
    cosine decay to ``floor`` at ``total`` (for ``torch.optim.lr_scheduler.LambdaLR``)."""

    def f(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = min(1.0, (step - warmup) / max(1, total - warmup))
        return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress))

    return f
