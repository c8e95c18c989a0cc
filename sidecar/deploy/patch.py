"""RFC 6902 JSON Patch from two versions of an object: what the webhook answers with.

Small on purpose: the webhook only needs `add`, `remove` and `replace`. Lists are patched
element by element when their length is unchanged (a renamed port, a removed probe) and
replaced whole otherwise; appending to a list the API server holds is no safer than
replacing it within one admission call, and replacing is easier to read back.
"""

from __future__ import annotations

from typing import Any

Op = dict[str, Any]


def pointer(path: list[str | int]) -> str:
    """RFC 6901: `~` is `~0`, `/` is `~1` (annotation keys are full of slashes)."""
    return "".join("/" + str(p).replace("~", "~0").replace("/", "~1") for p in path)


def diff(old: Any, new: Any) -> list[Op]:
    ops: list[Op] = []
    _diff(old, new, [], ops)
    return ops


def _diff(old: Any, new: Any, path: list[str | int], ops: list[Op]) -> None:
    if type(old) is type(new) and isinstance(old, dict):
        for key in old:
            if key not in new:
                ops.append({"op": "remove", "path": pointer([*path, key])})
        for key, value in new.items():
            if key in old:
                _diff(old[key], value, [*path, key], ops)
            else:
                ops.append({"op": "add", "path": pointer([*path, key]), "value": value})
    elif type(old) is type(new) and isinstance(old, list) and len(old) == len(new):
        for i, (a, b) in enumerate(zip(old, new, strict=True)):
            _diff(a, b, [*path, i], ops)
    elif type(old) is not type(new) or old != new:
        ops.append({"op": "replace", "path": pointer(path), "value": new})
