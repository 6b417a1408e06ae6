"""Receiving a large response body straight into reused buffers.

aiohttp hands a body over as a new ``bytes`` object per socket read, which its stream reader
then joins into another one: two copies and two allocations for every piece, on top of the
kernel's copy. For a blob fill that is a third of the worker's CPU besides hashing and
writing. ``BodyReceiver`` takes the connection over once aiohttp has parsed the headers (a
``Content-Length`` body only), as an ``asyncio.BufferedProtocol``: the event loop reads the
socket (or the TLS layer decrypts) directly into one of a few 1 MiB buffers, and the consumer
gets each buffer as a ``memoryview`` that it owns until it gives the piece back with
``recycle``; the buffer is then read into again. A consumer may hold several pieces at once
(a writer thread working through them while the loop receives the next). At most
``max_buffers`` are in use: then the socket is no longer read, so TCP flow control holds the
upstream back and memory stays flat however slow the consumer is.

The connection is closed afterwards (it is not handed back to aiohttp's pool).
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from collections.abc import AsyncIterator
from typing import Final, cast

import aiohttp

__all__ = ["BodyReceiver", "PIECE", "TAKE_OVER_FROM", "take_over"]

#: Size of each receive buffer, and so the largest piece handed on.
PIECE: Final = 1 << 20
#: Bodies at least this large are taken over; smaller ones are not worth a connection.
TAKE_OVER_FROM: Final = PIECE
_MAX_BUFFERS: Final = 8
#: A part of a buffer that has waited this long is handed on without waiting for the rest.
PARTIAL_AFTER: Final = 0.01


class BodyReceiver(asyncio.BufferedProtocol):
    """The protocol of a connection whose remaining ``expected`` bytes are a body."""

    def __init__(self, transport: asyncio.Transport, expected: int, max_buffers: int) -> None:
        self._transport = transport
        self._remaining = expected
        self._max_buffers = max(2, max_buffers)
        self._made = 0
        self._mine: list[bytearray] = []  # every buffer this receiver made
        self._free: list[bytearray] = []
        self._ready: deque[memoryview] = deque()
        self._current: bytearray | None = self._take_buffer()
        self._filled = 0
        self._error: BaseException | None = None
        self._changed: asyncio.Future[None] | None = None
        self._last_data = time.monotonic()
        self._partial_since = self._last_data  # when the current buffer got its first bytes

    @property
    def buffers(self) -> int:
        """Buffers allocated so far."""
        return self._made

    # ---- the protocol side (called by the event loop) -----------------------------------

    def get_buffer(self, sizehint: int) -> memoryview:
        if self._current is None:  # asked once more after pausing: one buffer beyond the bound
            self._current, self._filled = self._new_buffer(), 0
        # never read past the body: whatever follows it is not ours
        end = min(len(self._current), self._filled + self._remaining)
        return memoryview(self._current)[self._filled : end]

    def buffer_updated(self, nbytes: int) -> None:
        if not self._filled:
            self._partial_since = time.monotonic()
            self._wake()  # a consumer waiting for any byte starts its partial-piece clock
        self._filled += nbytes
        self._remaining -= nbytes
        self._last_data = time.monotonic()
        if self._remaining == 0:
            self._seal()
            self._transport.pause_reading()
            self._wake()
        elif self._current is not None and self._filled == len(self._current):
            self._rotate()
            self._wake()

    def eof_received(self) -> bool:
        if self._remaining:
            self._fail(ConnectionResetError(f"connection closed {self._remaining} bytes short"))
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        if self._remaining:
            self._fail(
                exc or ConnectionResetError(f"connection lost {self._remaining} bytes short")
            )

    # ---- the consumer side ------------------------------------------------------------

    async def next_piece(self, timeout: float | None) -> memoryview | None:
        """The next received bytes, None at the end of the body. A piece is a full buffer
        (``PIECE`` bytes), or whatever part of one has waited ``PARTIAL_AFTER`` seconds: a
        slow upstream's bytes still go on at once, a fast one's in few large pieces. Raises
        the connection's error, or ``TimeoutError`` if no byte arrives for ``timeout``."""
        while True:
            if self._ready:
                return self._ready.popleft()
            if not self._remaining:
                return None
            now = time.monotonic()
            if self._filled:
                waited = now - self._partial_since
                if waited >= PARTIAL_AFTER or self._error is not None:  # all it got goes on
                    self._rotate()
                    continue
                delay: float | None = PARTIAL_AFTER - waited
            elif self._error is not None:
                raise self._error
            elif timeout is None:
                delay = None
            else:
                idle = now - self._last_data
                if idle >= timeout:
                    raise TimeoutError(f"no byte of the body for {timeout:g}s")
                delay = timeout - idle
            self._changed = asyncio.get_running_loop().create_future()
            try:
                await asyncio.wait_for(self._changed, delay)
            except TimeoutError:
                pass  # look again: a partial piece is due, or the read timeout is up
            finally:
                self._changed = None

    def recycle(self, piece: bytes | memoryview) -> None:
        """Give back a piece once its bytes are used (in any order; loop thread only). Its
        buffer is read into again. Anything else (bytes, a buffer of another receiver) is
        left to the garbage collector."""
        if not isinstance(piece, memoryview):
            return
        buffer = piece.obj
        try:
            piece.release()
        except BufferError:  # still exported (a write abandoned midway): never reuse it
            return
        if not isinstance(buffer, bytearray) or not any(b is buffer for b in self._mine):
            return
        if (
            self._current is None
            and self._remaining
            and self._error is None
            and not self._transport.is_closing()
        ):
            self._current, self._filled = buffer, 0
            self._transport.resume_reading()
        else:
            self._free.append(buffer)

    # ---- internals ----------------------------------------------------------------------

    def _take_buffer(self) -> bytearray | None:
        if self._free:
            return self._free.pop()
        if self._made < self._max_buffers:
            return self._new_buffer()
        return None

    def _new_buffer(self) -> bytearray:
        buffer = bytearray(PIECE)
        self._made += 1
        self._mine.append(buffer)
        return buffer

    def _rotate(self) -> None:
        """Hand the current buffer on and read into the next; with none free, stop reading
        the socket (TCP then holds the sender back) until a piece is recycled."""
        self._seal()
        self._current = self._take_buffer()
        if self._current is None:
            self._transport.pause_reading()

    def _seal(self) -> None:
        """Move what the current buffer holds to the ready pieces."""
        if self._current is None or not self._filled:
            return
        self._ready.append(memoryview(self._current)[: self._filled])
        self._current, self._filled = None, 0

    def _fail(self, exc: BaseException) -> None:
        if self._error is None:
            self._error = exc
        self._wake()

    def _wake(self) -> None:
        if self._changed is not None and not self._changed.done():
            self._changed.set_result(None)


def take_over(
    response: aiohttp.ClientResponse, max_buffers: int = _MAX_BUFFERS
) -> tuple[bytes, BodyReceiver] | None:
    """Take the connection of ``response`` over for the rest of its body: (the body bytes
    aiohttp has already read, the receiver of the rest). None if the body is not a plain
    ``Content-Length`` body of at least ``TAKE_OVER_FROM`` bytes still being received over
    a transport that can change protocols; then aiohttp keeps reading it."""
    size = response.content_length
    connection = response.connection
    if size is None or size < TAKE_OVER_FROM or connection is None:
        return None
    if "chunked" in response.headers.get("Transfer-Encoding", "").lower():
        return None
    # uvloop's transports are not asyncio.Transport subclasses: ask for what is used
    transport = cast(asyncio.Transport, connection.transport)
    protocol = connection.protocol
    if transport is None or transport.is_closing():
        return None
    if not all(hasattr(transport, m) for m in ("set_protocol", "pause_reading", "resume_reading")):
        return None
    if response.content.at_eof() or response.content.exception() is not None:
        return None
    # no await from here on: nothing may reach aiohttp's protocol in between
    head = response.content.read_nowait(-1)
    receiver = BodyReceiver(transport, size - len(head), max_buffers)
    if protocol is not None:
        protocol.read_timeout = None  # its timer would otherwise fire on a connection it left
        drop = getattr(protocol, "_drop_timeout", None)
        if callable(drop):
            drop()
    transport.set_protocol(receiver)
    transport.resume_reading()
    return head, receiver


async def pieces(receiver: BodyReceiver, timeout: float | None) -> AsyncIterator[memoryview]:
    """The pieces of ``receiver``; the consumer gives each back with ``receiver.recycle``."""
    while (piece := await receiver.next_piece(timeout)) is not None:
        yield piece
