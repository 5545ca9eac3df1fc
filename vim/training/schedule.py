"""Per-step learning-rate schedule: linear warmup, then cosine decay (the DeiT / Vim recipe, stepped per batch)."""

from __future__ import annotations

import math
from dataclasses import dataclass


@dataclass(frozen=True)
class WarmupCosine:
    """Learning rate at an optimizer step, as a factor of the base ``lr`` (what ``LambdaLR`` expects).

    Steps ``0 .. warmup_steps`` rise linearly from ``warmup_lr`` to ``lr``; the remaining steps up to
    ``total_steps`` follow a half cosine from ``lr`` down to ``min_lr`` (held after ``total_steps``).
    """

    lr: float
    total_steps: int
    warmup_steps: int = 0
    warmup_lr: float = 1e-6
    min_lr: float = 1e-5

    def __post_init__(self) -> None:
        if self.lr <= 0:
            raise ValueError(f"lr must be positive, got {self.lr}")
        if not 0 <= self.warmup_steps <= self.total_steps:
            raise ValueError(f"warmup_steps={self.warmup_steps} must lie in [0, total_steps={self.total_steps}]")

    def learning_rate(self, step: int) -> float:
        if step < self.warmup_steps:
            return self.warmup_lr + (self.lr - self.warmup_lr) * step / self.warmup_steps
        progress = min((step - self.warmup_steps) / max(self.total_steps - self.warmup_steps, 1), 1.0)
        return self.min_lr + 0.5 * (self.lr - self.min_lr) * (1 + math.cos(math.pi * progress))

    def __call__(self, step: int) -> float:
        return self.learning_rate(step) / self.lr
