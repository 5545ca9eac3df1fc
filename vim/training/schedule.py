"""Per-step learning-rate schedules: linear warmup, then cosine decay (the DeiT / Vim recipe) or linear "poly" decay
(mmseg's and mmdet's ``PolyLR`` of power 1, the segmentation recipes of Vim, VMamba and MambaVision), stepped per batch."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from torch.optim import Optimizer
from torch.optim.lr_scheduler import LambdaLR


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
        return self.min_lr + (self.lr - self.min_lr) * self.decay(self.progress(step))

    def progress(self, step: int) -> float:
        """How far ``step`` is through the decay after warmup, from 0 to 1 (held at 1 after ``total_steps``)."""
        return min((step - self.warmup_steps) / max(self.total_steps - self.warmup_steps, 1), 1.0)

    @staticmethod
    def decay(progress: float) -> float:
        """The share of ``lr - min_lr`` left at ``progress``: a half cosine from 1 to 0."""
        return 0.5 * (1 + math.cos(math.pi * progress))

    def __call__(self, step: int) -> float:
        return self.learning_rate(step) / self.lr


@dataclass(frozen=True)
class WarmupPoly(WarmupCosine):
    """As :class:`WarmupCosine`, with a linear decay from ``lr`` to ``min_lr`` after warmup (mmseg's ``PolyLR`` with
    ``power=1``, ``eta_min=min_lr``)."""

    @staticmethod
    def decay(progress: float) -> float:
        return 1.0 - progress


SCHEDULES: dict[str, type[WarmupCosine]] = {"cosine": WarmupCosine, "poly": WarmupPoly}
"""The schedules a task module's ``schedule`` names."""


class ScheduledLR(LambdaLR):
    """``LambdaLR`` stepping a :class:`WarmupCosine` (or :class:`WarmupPoly`) whose checkpoint holds where the run is,
    not the schedule's plan.

    ``LambdaLR`` saves a callable object's ``__dict__`` and writes it back on load, so a run resumed with a raised
    ``max_epochs`` or ``max_steps`` would keep the ``total_steps`` of the run it continues and take every added step at
    ``min_lr``. Here the plan is always the one built from the current settings (``trainer.estimated_stepping_batches``)
    and the checkpoint gives only the position (``last_epoch``, the base rates): resumed with the same settings, the
    schedule continues exactly; with a larger total, the cosine of a run planned for that length takes over at the step
    reached (past warmup, so no second warmup).
    """

    def __init__(self, optimizer: Optimizer, schedule: WarmupCosine) -> None:
        super().__init__(optimizer, schedule)

    def state_dict(self) -> dict[str, Any]:
        return {key: value for key, value in super().state_dict().items() if key != "lr_lambdas"}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Continue at the saved step on the current plan (a saved plan, from a checkpoint written by a plain
        ``LambdaLR``, is ignored), and give the optimizer the plan's rates at that step: the rates restored with the
        optimizer's state were computed on the saved plan."""
        super().load_state_dict({**state_dict, "lr_lambdas": [None] * len(self.lr_lambdas)})
        for group, base_lr, schedule in zip(self.optimizer.param_groups, self.base_lrs, self.lr_lambdas, strict=True):
            group["lr"] = base_lr * schedule(self.last_epoch)
        self._last_lr = [group["lr"] for group in self.optimizer.param_groups]
