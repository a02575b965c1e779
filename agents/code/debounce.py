"""Keystroke streams: the newest request for a document wins.

An editor asks for a completion at every pause in typing; by the time an older one would answer,
the text has changed and its suggestion is stale. `Supersede` keeps, per document key (a file URI,
an editor tab), the request that holds it: claiming the document cancels the previous holder, so
its engine slot is freed before the new one is queued. An optional debounce waits a little after a
claim and drops the request if a newer one claimed the document meanwhile (no engine work at all).

The WebSocket API uses it per connection with no debounce (IDE clients debounce themselves); the
UI's Code tab debounces, since its editor sends every change.
"""

from __future__ import annotations

import asyncio
from typing import Protocol


class Cancellable(Protocol):
    def cancel(self) -> None: ...


class Supersede:
    def __init__(self, debounce_ms: int = 0):
        if debounce_ms < 0:
            raise ValueError(f"debounce_ms must be >= 0, got {debounce_ms}")
        self.debounce_s = debounce_ms / 1000
        self._holders: dict[str, Cancellable] = {}

    def claim(self, document: str | None, request: Cancellable) -> None:
        """`request` now holds `document`; the previous holder is cancelled. None = no document
        (the request supersedes nothing and is never superseded)."""
        if document is None:
            return
        old = self._holders.get(document)
        self._holders[document] = request
        if old is not None and old is not request:
            old.cancel()

    def holds(self, document: str | None, request: Cancellable) -> bool:
        return document is None or self._holders.get(document) is request

    def release(self, document: str | None, request: Cancellable) -> None:
        """`request` ended; forget it unless a newer one holds the document already."""
        if document is not None and self._holders.get(document) is request:
            del self._holders[document]

    async def settle(self, document: str | None, request: Cancellable) -> bool:
        """After `claim`: wait out the debounce; False when a newer request took the document."""
        if self.debounce_s > 0 and document is not None:
            await asyncio.sleep(self.debounce_s)
        return self.holds(document, request)

    def __len__(self) -> int:
        return len(self._holders)
