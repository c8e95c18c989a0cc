"""Scale before the peak: per-model demand history, its forecast at now + lead, and what a pod can serve.

history.py (interface) with history_sqlite.py / history_redis.py behind it, model.py (the forecast and
its error), lead.py (how far ahead), capacity.py (what one pod serves), csvio.py (the CSV format) and
commands.py (``sidecar history import|export``, opening the history), service.py (the periodic refresh),
signals.py (the Prometheus families), feed.py (counts from the data port's per-model totals),
config.py (``forecast.*``). Nothing here is on the data path: the feed reads totals the data port keeps
anyway, once per flush interval.
"""

from __future__ import annotations

# sidecar.config imports ForecastConfig from .config, which imports the key helpers back from
# sidecar.config: importing sidecar.config first makes the cycle resolve whichever module a caller
# imports first (config.py's own import of .forecast.config sits below the helpers it needs).
from .. import config as _config  # noqa: F401
