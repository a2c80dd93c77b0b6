"""JSON objects whose keys are unique: Python's reader keeps the last of a repeated key silently.

    json.loads(text, object_pairs_hook=unique_keys)   # raises DuplicateKey naming the key

Used wherever a user's JSON is read: training data lines (trainer/jsonl.py) and request bodies
(service/routes/strict.py).
"""

from __future__ import annotations

from typing import Any


class DuplicateKey(ValueError):
    """A key given twice in one object: ``key``, and ``value``, its second value."""

    def __init__(self, key: str, value: Any):
        super().__init__(key)
        self.key, self.value = key, value


def unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    seen: set[str] = set()
    for key, value in pairs:
        if key in seen:
            raise DuplicateKey(key, value)
        seen.add(key)
    return dict(pairs)
