"""What a cached answer depends on besides the request: the model versions served, and reloads seen.

The monitor reports which (model, version) pairs the model server has loaded; a model whose set of
versions changes, or that reloads, or a server restart, moves that model to a new generation, so an
unversioned call never gets an answer of a version that is no longer loaded, and a reload makes
earlier answers unreachable at once (for the in-process tier; the shared tier follows its epoch).
"""

from __future__ import annotations

from collections.abc import Iterable


class Generations:
    def __init__(self) -> None:
        self.versions: dict[str, str] = {}
        self._epochs: dict[str, int] = {}
        self._all = 0  # bumped on a server restart: every model reloaded
        self._keys: dict[str, bytes] = {}

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

    def key(self, model: str) -> bytes:
        """The in-process tier's generation suffix for ``model``."""
        key = self._keys.get(model)
        if key is None:
            text = f"|{self.versions.get(model, '')}|{self._epochs.get(model, 0)}|{self._all}"
            key = self._keys[model] = text.encode()
        return key
