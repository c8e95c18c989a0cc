"""Response cache tiers: the in-process W-TinyLFU tier (``memory.py``), the fleet's Redis tier
(``redis.py``), and the entry both keep (``entry.py``). The request identity they key on is
``sidecar/identity.py``; the stage that uses them is ``pipeline/cache.py``.

What is exported here is the package's entry point for benchmarks and tools.
"""

from .entry import Entry
from .memory import MemoryTier

__all__ = ["Entry", "MemoryTier"]
