"""Scale before the peak: per-model demand history, its forecast at now + lead, and what a pod can serve.

history.py (interface) with history_sqlite.py / history_redis.py behind it, model.py (the forecast and
its error), lead.py (how far ahead), capacity.py (what one pod serves), csvio.py (the CSV format) and
commands.py (``sidecar history import|export``, opening the history), service.py (the periodic refresh),
signals.py (the Prometheus families), feed.py (counts from the data port's per-model totals); its
settings are ``forecast.*`` in ``sidecar/config.py``. Nothing here is on the data path: the feed reads
totals the data port keeps anyway, once per flush interval.
"""

from .history import DAY_MINUTES, MinuteSeries
from .lead import percentile
from .model import ForecastError, ModelSettings, backtest, predict

__all__ = ["DAY_MINUTES", "ForecastError", "MinuteSeries", "ModelSettings", "backtest", "percentile", "predict"]
