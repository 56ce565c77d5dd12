"""A resumable on-disk calibration cache: every finished pass is written at once, so a killed
calibration continues where it stopped. One JSON file per (model weights, data, settings)."""
from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterator, MutableMapping
from pathlib import Path


class DiskCache:
    """Sections of key → JSON value, saved atomically (write + rename) on every new entry."""

    def __init__(self, directory: str | os.PathLike, key: dict):
        digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]
        self.path = Path(directory) / f"modes-calibration-{digest}.json"
        self.data = json.loads(self.path.read_text()) if self.path.exists() else {"key": key}

    def section(self, name: str) -> "CacheSection":
        return CacheSection(self, self.data.setdefault(name, {}))

    def save(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.data))
        os.replace(tmp, self.path)


class CacheSection(MutableMapping):
    """A dict view of one section; keys may be strings or tuples of floats (stored as repr text)."""

    def __init__(self, cache: DiskCache, store: dict):
        self.cache, self.store = cache, store

    @staticmethod
    def _text(key) -> str:
        return ",".join(repr(float(k)) for k in key) if isinstance(key, tuple) else key

    def __getitem__(self, key):
        value = self.store[self._text(key)]
        return tuple(value) if isinstance(value, list) else value

    def __setitem__(self, key, value) -> None:
        self.store[self._text(key)] = list(value) if isinstance(value, tuple) else value
        self.cache.save()

    def __delitem__(self, key) -> None:
        del self.store[self._text(key)]
        self.cache.save()

    def __contains__(self, key) -> bool:
        return self._text(key) in self.store

    def __iter__(self) -> Iterator:
        return iter(self.store)

    def __len__(self) -> int:
        return len(self.store)
