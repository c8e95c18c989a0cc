"""A circuit breaker: after consecutive failures Redis is not even tried for a cooldown."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

log = logging.getLogger("sidecar.redis")

_MAX_COOLDOWN = 60.0


class Breaker:
    """Closed (calls go), open (calls skipped until the cooldown ends), half-open (one probe goes)."""

    def __init__(self, failures: int, cooldown: float, clock: Callable[[], float] = time.monotonic,
                 name: str = "Redis") -> None:
        self.threshold = failures
        self.base_cooldown = cooldown
        self.cooldown = cooldown
        self.clock = clock
        self.name = name
        self.consecutive = 0
        self.open_until = 0.0
        self.probing = False
        self.opened = 0  # times it opened, for metrics

    def __repr__(self) -> str:
        return f"<Breaker {self.state} consecutive={self.consecutive}>"

    @property
    def state(self) -> str:
        if self.open_until == 0.0:
            return "closed"
        return "half-open" if self.clock() >= self.open_until else "open"

    def allow(self) -> bool:
        if self.open_until == 0.0:
            return True
        if self.clock() < self.open_until or self.probing:
            return False
        self.probing = True  # one probe at a time decides
        return True

    def release(self) -> None:
        """The probe ended without an outcome (its caller left): the next call may probe."""
        self.probing = False

    def success(self) -> None:
        if self.open_until:
            log.info("%s reachable again; breaker closed", self.name)
        self.consecutive = 0
        self.open_until = 0.0
        self.probing = False
        self.cooldown = self.base_cooldown

    def failure(self) -> None:
        self.consecutive += 1
        if self.probing or (self.open_until == 0.0 and self.consecutive >= self.threshold):
            if self.open_until == 0.0:
                log.warning("%s failing (%d in a row); skipping it for %.1f s", self.name, self.consecutive,
                            self.cooldown)
            else:
                self.cooldown = min(self.cooldown * 2, _MAX_COOLDOWN)
            self.open_until = self.clock() + self.cooldown
            self.probing = False
            self.opened += 1
