"""The memory budget of request bodies in flight: past it, a new call is refused, never an OOM kill."""

from __future__ import annotations

from ..errors import Overloaded


class MemoryBudget:
    def __init__(self, limit: int, retry_after: float = 1.0) -> None:
        self.limit = limit
        self.retry_after = retry_after
        self.used = 0

    def __repr__(self) -> str:
        return f"<MemoryBudget {self.used}/{self.limit} bytes>"

    def take(self, n: int) -> None:
        """Account ``n`` more bytes, or raise Overloaded (503 with Retry-After) leaving nothing taken."""
        if self.used + n > self.limit:
            raise Overloaded(f"the sidecar holds {self.used} bytes of request bodies, its limit is {self.limit}; "
                             "retry later", self.retry_after)
        self.used += n

    def give(self, n: int) -> None:
        self.used -= n


class Lease:
    """The bytes one call holds; ``release`` gives them all back, once."""

    __slots__ = ("_budget", "held")

    def __init__(self, budget: MemoryBudget) -> None:
        self._budget = budget
        self.held = 0

    def __call__(self, n: int) -> None:
        self._budget.take(n)
        self.held += n

    def release(self) -> None:
        self._budget.give(self.held)
        self.held = 0
