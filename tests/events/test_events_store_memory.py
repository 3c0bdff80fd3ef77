from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import pytest
from store_contract import StoreContract

from events import EventStore, MemoryEventStore


class TestMemoryEventStore(StoreContract):
    @pytest.fixture
    async def store(self) -> AsyncIterator[EventStore]:  # type: ignore[override]
        s = await self.make_store()
        yield s
        await s.async_close()

    async def make_store(self, **kw: Any) -> EventStore:
        return MemoryEventStore(**kw)
