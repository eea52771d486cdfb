"""Cumulative wall time per phase of a training step (cheap enough for the step loop)."""

from __future__ import annotations

import time
from collections import defaultdict
from collections.abc import Iterator
from contextlib import contextmanager


class PhaseTimes:
    """Seconds spent per named phase, summed over steps."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = defaultdict(float)
        self.steps = 0

    @contextmanager
    def phase(self, name: str) -> Iterator[None]:
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[name] += time.perf_counter() - t0

    def per_step_ms(self) -> dict[str, float]:
        """Mean milliseconds per step for each phase."""
        n = max(self.steps, 1)
        return {k: round(1000 * v / n, 4) for k, v in self.seconds.items()}
