"""Lists of VM views answered from a cache that is exact: valid only at the log position it was built at.

A list of 10,000 VMs costs most of its time touching each VM (``vm.view()``: ~1 µs each, memory-bound) and
splicing each VM's cached JSON. Every change of the read model moves ``model.position`` (``ReadModel.apply``
sets it before any handler runs, and nothing changes the model outside the fold), so a list built at position
P is the list for every request answered while the model is still at P, and is dropped at the next event. The
cache never decides anything: a miss builds the list exactly as before.

:class:`ViewList` is a plain ``list`` of views to every reader in the process (the CloudStack layer, the tests);
the API's encoder takes its ``encoded_json()`` instead, so repeated identical lists are encoded once.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable, Hashable, Iterable
from typing import Any

import orjson

MAX_ENTRIES = 64
"""Distinct lists kept for one position (queries with other filters or pages build theirs again)."""
MAX_ENCODED_ITEMS = 1000
"""A list's own spliced JSON is kept up to this many items (a page): a list of every VM keeps only its views
(whose JSON each VM caches), so the cache does not hold a second copy of every VM's JSON."""


def _view_json(view: Any) -> Any:
    encoded = getattr(view, "encoded_json", None)
    if encoded is None:
        raise TypeError(f"not a read-model view: {type(view).__name__}")
    return encoded()


class ViewList(list[Any]):
    """A list of read-model views (``moldd.projection.model.View``), shared read-only like the views themselves:
    do not modify. ``encoded_json()`` is its JSON as an ``orjson.Fragment``."""

    __slots__ = ("_json",)

    def encoded_json(self) -> orjson.Fragment:
        try:
            return self._json
        except AttributeError:
            pass
        fragment = orjson.Fragment(orjson.dumps(list(self), default=_view_json, option=orjson.OPT_PASSTHROUGH_SUBCLASS))
        if len(self) <= MAX_ENCODED_ITEMS:
            self._json: orjson.Fragment = fragment
        return fragment


class ListCache:
    """The lists built at one position of one read model (see the module docstring)."""

    def __init__(self, position: int) -> None:
        self.position = position
        self.entries: dict[Hashable, Any] = {}
        self.hits = 0
        self.misses = 0

    def get(self, key: Hashable, build: Callable[[], Any]) -> Any:
        entries = self.entries
        value = entries.get(key, _MISSING)
        if value is _MISSING:
            self.misses += 1
            value = build()
            if len(entries) >= MAX_ENTRIES:
                entries.pop(next(iter(entries)))
            entries[key] = value
        else:
            self.hits += 1
        return value


_MISSING: Any = object()
_CACHES: weakref.WeakKeyDictionary[Any, ListCache] = weakref.WeakKeyDictionary()


def cache_for(model: Any) -> ListCache:
    """The cache of ``model`` (a ``ReadModel``) at its current position: a fresh one once it has moved."""
    position = model.position
    cache = _CACHES.get(model)
    if cache is None or cache.position != position:
        cache = _CACHES[model] = ListCache(position)
    return cache


def view_list(vms: Iterable[Any]) -> ViewList:
    """The views of ``vms`` (read-model objects with ``view()``), in order."""
    return ViewList([v.view() for v in vms])
