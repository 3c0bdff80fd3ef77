from __future__ import annotations

from typing import Any

from events import EventStore, MemoryEventStore
from tests.events.store_contract import StoreContract


class TestMemoryEventStore(StoreContract):
    async def make_store(self, **kw: Any) -> EventStore:
        return MemoryEventStore(**kw)
