"""Learning-rate multipliers for ``torch.optim.lr_scheduler.LambdaLR``, with the CompVis config names."""

from __future__ import annotations

import logging
from typing import Sequence

logger = logging.getLogger(__name__)


class LambdaLinearScheduler:
    """Per-cycle linear warm-up from ``f_start`` to ``f_max``, then linear decay to ``f_min`` at the cycle's end.

    Used as ``LambdaLR(optimizer, lr_lambda=scheduler.schedule)``; the value multiplies ``base_learning_rate``.
    """

    def __init__(
        self,
        warm_up_steps: Sequence[int],
        f_min: Sequence[float],
        f_max: Sequence[float],
        f_start: Sequence[float],
        cycle_lengths: Sequence[int],
        verbosity_interval: int = 0,
    ) -> None:
        lengths = {len(warm_up_steps), len(f_min), len(f_max), len(f_start), len(cycle_lengths)}
        if len(lengths) != 1:
            raise ValueError("warm_up_steps, f_min, f_max, f_start and cycle_lengths must have the same length")
        if any(c <= 0 for c in cycle_lengths):
            raise ValueError(f"cycle_lengths must be positive, got {list(cycle_lengths)}")
        self.warm_up_steps = list(warm_up_steps)
        self.f_min, self.f_max, self.f_start = list(f_min), list(f_max), list(f_start)
        self.cycle_lengths = list(cycle_lengths)
        self.cum_cycles = [0]
        for length in self.cycle_lengths:
            self.cum_cycles.append(self.cum_cycles[-1] + length)
        self.verbosity_interval = verbosity_interval

    def find_in_interval(self, n: int) -> int:
        """Index of the cycle that step ``n`` falls in (the last one past the end)."""
        for cycle, end in enumerate(self.cum_cycles[1:]):
            if n < end:
                return cycle
        return len(self.cycle_lengths) - 1

    def schedule(self, n: int, **kwargs: object) -> float:
        """LR multiplier at step ``n``."""
        cycle = self.find_in_interval(n)
        n = n - self.cum_cycles[cycle]
        if self.verbosity_interval > 0 and n % self.verbosity_interval == 0:
            logger.info("lr multiplier at step %d of cycle %d", n, cycle)
        warm_up = self.warm_up_steps[cycle]
        if n < warm_up:
            return (self.f_max[cycle] - self.f_start[cycle]) / warm_up * n + self.f_start[cycle]
        span = self.cycle_lengths[cycle] - n
        return self.f_min[cycle] + (self.f_max[cycle] - self.f_min[cycle]) * span / self.cycle_lengths[cycle]

    def __call__(self, n: int, **kwargs: object) -> float:
        return self.schedule(n, **kwargs)
