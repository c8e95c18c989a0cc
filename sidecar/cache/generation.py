"""What a cached answer depends on besides the request: the model versions served, and reloads seen.

The monitor reports which (model, version) pairs the model server has loaded; a model whose set of
versions changes, or that reloads, or a server restart, moves that model to a new generation, so an
unversioned call never gets an answer of a version that is no longer loaded, and a reload makes
earlier answers unreachable at once (for the in-process tier; the shared tier follows its epoch).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping


class Generations:
    def __init__(self) -> None:
        self.versions: dict[str, str] = {}
        self._epochs: dict[str, int] = {}
        self._all = 0  # bumped on a server restart: every model reloaded
        self._keys: dict[str, bytes] = {}
        # What the control plane has flushed, as absolute counts from its snapshot (restarts, flushes of every
        # model, of each model) and the fleet's epochs: the same in every worker of the pod, a new one included,
        # so workers sharing one tier compute the same keys.
        self._pod = "0.0"
        self._pod_models: Mapping[str, int] = {}
        self._fleet: dict[str, tuple[int, int]] = {}

    def __repr__(self) -> str:
        return f"<Generations models={len(self.versions)} restarts={self._all}>"

    def observe(self, loaded: Iterable[tuple[str, str]]) -> set[str]:
        """The server's loaded (model, version) pairs now; returns the models whose versions changed."""
        now: dict[str, list[str]] = {}
        for model, version in loaded:
            now.setdefault(model, []).append(version)
        current = {m: ",".join(sorted(v)) for m, v in now.items()}
        changed = {m for m in current.keys() | self.versions.keys() if current.get(m) != self.versions.get(m)}
        self.versions = current
        for model in changed:
            self._keys.pop(model, None)
        return changed

    def bump(self, model: str) -> None:
        self._epochs[model] = self._epochs.get(model, 0) + 1
        self._keys.pop(model, None)

    def bump_all(self) -> None:
        self._all += 1
        self._keys.clear()

    def follow(self, restarts: int, flush_all: int, flushes: Mapping[str, int]) -> set[str]:
        """The control plane's flush counts now; returns the models whose answers they made unreachable (every
        model the tier may hold is "*")."""
        pod = f"{restarts}.{flush_all}"
        changed = {"*"} if pod != self._pod else {m for m in flushes.keys() | self._pod_models.keys()
                                                   if flushes.get(m, 0) != self._pod_models.get(m, 0)}
        self._pod, self._pod_models = pod, dict(flushes)
        self._keys.clear()
        return changed

    def follow_fleet(self, model: str, epoch: tuple[int, int]) -> bool:
        """The shared tier's epoch of ``model`` (a flush anywhere in the fleet); True when it moved."""
        if self._fleet.get(model, (0, 0)) == epoch:
            return False
        self._fleet[model] = epoch
        self._keys.pop(model, None)
        return True

    def key(self, model: str) -> bytes:
        """The in-process tier's generation suffix for ``model``."""
        key = self._keys.get(model)
        if key is None:
            fleet = self._fleet.get(model, (0, 0))
            text = (f"|{self.versions.get(model, '')}|{self._epochs.get(model, 0)}|{self._all}|{self._pod}."
                    f"{self._pod_models.get(model, 0)}|{fleet[0]}.{fleet[1]}")
            key = self._keys[model] = text.encode()
        return key
