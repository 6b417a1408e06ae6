"""Taking a response's connection over to receive its body into reused buffers
(``server.body``), with a real aiohttp client and server, on asyncio's loop and on uvloop
(see conftest.py)."""

from __future__ import annotations

import asyncio
import os
from collections.abc import AsyncIterator, Awaitable, Callable

import aiohttp
import pytest
from aiohttp import web

from server import body

DATA = os.urandom(3 * body.PIECE + 12345)
BIG = os.urandom(8 * body.PIECE + 12345)


async def _serve(request: web.Request) -> web.StreamResponse:
    """/full, /short (closes halfway), /stall (stops halfway), /small: the first 64 KiB,
    /big: 8 MiB and more."""
    how = request.match_info["how"]
    data = DATA[: 64 * 1024] if how == "small" else BIG if how == "big" else DATA
    response = web.StreamResponse(headers={"Content-Type": "application/octet-stream"})
    response.content_length = len(data)
    await response.prepare(request)
    half = len(data) // 2 if how in ("short", "stall") else len(data)
    for i in range(0, half, 256 * 1024):
        await response.write(data[i : min(i + 256 * 1024, half)])
    if how == "short":
        assert request.transport is not None
        request.transport.close()
    elif how == "stall":
        await asyncio.sleep(5)
    await response.write_eof()
    return response


Get = Callable[[str], Awaitable[aiohttp.ClientResponse]]


@pytest.fixture
async def get(aiohttp_server) -> AsyncIterator[Get]:  # type: ignore[no-untyped-def]
    app = web.Application()
    app.router.add_get("/{how}", _serve)
    server = await aiohttp_server(app)
    async with aiohttp.ClientSession() as session:

        async def fetch(how: str) -> aiohttp.ClientResponse:
            return await session.get(server.make_url(f"/{how}"))

        yield fetch


async def _receive(
    response: aiohttp.ClientResponse, timeout: float = 5.0, slow: float = 0.0, hold: int = 0
) -> tuple[bytes, body.BodyReceiver]:
    """The body through ``body.pieces``; each piece is given back once copied, or (``hold``)
    only once that many later pieces have arrived, newest first, as a writer thread might."""
    taken = body.take_over(response, max_buffers=3)
    assert taken is not None
    head, receiver = taken
    out = bytearray(head)
    held: list[memoryview] = []
    try:
        async for piece in body.pieces(receiver, timeout):
            assert 0 < len(piece) <= body.PIECE
            out += piece
            held.append(piece)
            if len(held) > hold:
                while held:
                    receiver.recycle(held.pop())
            if slow:
                await asyncio.sleep(slow)  # a consumer slower than the network
    finally:
        response.close()
    return bytes(out), receiver


async def test_a_large_body_arrives_whole_in_reused_buffers(get: Get) -> None:
    data, _ = await _receive(await get("full"))
    assert data == DATA


async def test_a_slow_consumer_holds_the_sender_back_within_the_buffer_bound(get: Get) -> None:
    data, receiver = await _receive(await get("full"), slow=0.05)
    assert data == DATA
    # 3 MiB and more went through no more than the three buffers allowed (one more at most
    # if the loop asked for a buffer after the pause)
    assert receiver.buffers <= 4


async def test_pieces_held_and_given_back_out_of_order_stay_intact(get: Get) -> None:
    data, receiver = await _receive(await get("full"), hold=1, slow=0.01)
    assert data == DATA
    assert receiver.buffers <= 4


async def test_a_consumer_that_keeps_every_piece_stops_the_receiver(get: Get) -> None:
    response = await get("big")
    taken = body.take_over(response, max_buffers=2)
    assert taken is not None
    head, receiver = taken
    out, kept = bytearray(head), []
    try:
        # nothing given back: reading stops (no byte for the read timeout) well short of the
        # 8 MiB body, with no more buffers than allowed (one extra after the pause at most)
        with pytest.raises(TimeoutError):
            while (piece := await receiver.next_piece(0.5)) is not None:
                out += piece
                kept.append(piece)
        assert len(out) < len(BIG) - body.PIECE
        assert receiver.buffers <= 3
        for piece in kept:  # given back: the body goes on, whole
            receiver.recycle(piece)
        while (piece := await receiver.next_piece(5.0)) is not None:
            out += piece
            receiver.recycle(piece)
        assert out == BIG
    finally:
        response.close()


async def test_a_body_cut_short_raises_a_connection_error(get: Get) -> None:
    with pytest.raises(ConnectionError):
        await _receive(await get("short"))


async def test_a_stalled_body_raises_timeout(get: Get) -> None:
    with pytest.raises(TimeoutError):
        await _receive(await get("stall"), timeout=0.3)


async def test_a_small_body_is_left_to_aiohttp(get: Get) -> None:
    response = await get("small")
    assert body.take_over(response) is None
    assert await response.read() == DATA[: 64 * 1024]
