"""The event stream shared by the in-process runtimes (process and fake)."""

from __future__ import annotations

import asyncio

from scaler.runtime import RuntimeEvent


class Closed:
    """Put on the queue to end the stream."""


class EventStream:
    """A runtime's one event stream over its queue; cancelling a wait loses no event."""

    def __init__(self, queue: asyncio.Queue[RuntimeEvent | Closed]) -> None:
        self._queue = queue

    def __aiter__(self) -> EventStream:
        return self

    async def __anext__(self) -> RuntimeEvent:
        item = await self._queue.get()
        if isinstance(item, Closed):
            self._queue.put_nowait(item)  # later waiters stop too
            raise StopAsyncIteration
        return item
