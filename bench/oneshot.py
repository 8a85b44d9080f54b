"""One HTTP/1.1 request on a fresh connection; its status as a future.

Shared by the bench's connection holder and its TLS churn client.
"""

from __future__ import annotations

import asyncio
from typing import cast

import httptools


class OneRequest(asyncio.Protocol):
    """Sends one request once connected (after the handshake, under TLS);
    `answered` resolves with the status when the response ends."""

    def __init__(self, request: bytes) -> None:
        self.request = request
        self.parser = httptools.HttpResponseParser(self)
        self.answered: asyncio.Future[int] = asyncio.get_running_loop().create_future()
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports are not asyncio.Transport subclasses, only alike.
        self.transport = cast(asyncio.Transport, transport)
        transport.write(self.request)

    def data_received(self, data: bytes) -> None:
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError as exc:
            self._settle(exc)

    def on_message_complete(self) -> None:
        self._settle(self.parser.get_status_code())

    def connection_lost(self, exc: Exception | None) -> None:
        self._settle(exc or ConnectionResetError("closed before the response"))

    def _settle(self, outcome: int | BaseException) -> None:
        if self.answered.done():
            return
        if isinstance(outcome, int):
            self.answered.set_result(outcome)
        else:
            self.answered.set_exception(outcome)
