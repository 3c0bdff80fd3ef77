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

MAX_ENTRIES = 1024
"""Distinct lists kept for one position (every page of 100 of 100,000 VMs; a list holds references only)."""
MAX_ENCODED_ITEMS = 1000
"""Longer lists (every VM) are never encoded as a whole: see :meth:`ViewList.encoded_json`."""
MAX_ENCODED_BYTES = 4 << 20
"""The lists' own spliced JSON kept for one position, in bytes: the pages read most since the last event are
encoded once; past this the cache holds only the lists of views (whose JSON each VM caches), not a second copy
of every VM's JSON."""


def _view_json(view: Any) -> Any:
    encoded = getattr(view, "encoded_json", None)
    if encoded is None:
        raise TypeError(f"not a read-model view: {type(view).__name__}")
    return encoded()


class ViewList(list[Any]):
    """A list of read-model views (``moldd.projection.model.View``), shared read-only like the views themselves:
    do not modify. ``encoded_json()`` is its JSON as an ``orjson.Fragment``, kept while its cache's byte budget
    allows."""

    __slots__ = ("_budget", "_json")
    _budget: ListCache | None

    def encoded_json(self) -> orjson.Fragment | list[Any]:
        """The list's JSON, kept once encoded while its cache's budget allows; past it (or for a list longer
        than MAX_ENCODED_ITEMS) a plain list of the views, which the encoder splices view by view without an
        intermediate copy of the whole."""
        try:
            return self._json
        except AttributeError:
            pass
        budget = getattr(self, "_budget", None)
        if budget is None or len(self) > MAX_ENCODED_ITEMS or budget.encoded_bytes >= MAX_ENCODED_BYTES:
            return list(self)
        raw = orjson.dumps(list(self), default=_view_json, option=orjson.OPT_PASSTHROUGH_SUBCLASS)
        budget.encoded_bytes += len(raw)
        self._json: orjson.Fragment = orjson.Fragment(raw)
        return self._json


class ListCache:
    """The lists built at one position of one read model (see the module docstring)."""

    def __init__(self, position: int) -> None:
        self.position = position
        self.entries: dict[Hashable, Any] = {}
        self.hits = 0
        self.misses = 0
        self.encoded_bytes = 0  # JSON kept by this cache's lists (MAX_ENCODED_BYTES)

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
    try:
        cache = _CACHES.get(model)
    except TypeError:  # a model that cannot be weakly referenced: no cache, every list is built
        return ListCache(position)
    if cache is None or cache.position != position:
        cache = _CACHES[model] = ListCache(position)
    return cache


def view_list(vms: Iterable[Any], cache: ListCache | None = None) -> ViewList:
    """The views of ``vms`` (read-model objects with ``view()``), in order; its JSON is kept within ``cache``'s
    byte budget (not at all without one)."""
    views = ViewList([v.view() for v in vms])
    views._budget = cache
    return views
