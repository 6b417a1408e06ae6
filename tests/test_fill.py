"""The pull-through fill leader, in process: memory stays flat when the disk is slower than
the upstream, pieces handed over in reused buffers are written before the buffer is reused,
and the bytes committed are the upstream's."""

from __future__ import annotations

import asyncio
import errno
import hashlib
import itertools
import os
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from storage import Digest
from storage import fill as fill_module
from storage.fill import Fill, Fills

PIECE = 256 * 1024
PIECES = 160  # 40 MiB


class FastSource:
    """An upstream that would hand over every piece at once (faster than any disk). With
    ``reuse``, the pieces are lent from a pool of ``POOL`` buffers (as ``server.body`` does):
    each is scribbled over the moment it is given back, so a write after that would commit
    wrong bytes, and with all of them out the source waits for one."""

    POOL = 3

    def __init__(self, data: bytes, reuse: bool = False) -> None:
        self.data = data
        self.size: int | None = len(data)
        self.reuse = reuse
        self.handed = 0  # pieces handed over so far
        self.free = [bytearray(PIECE) for _ in range(self.POOL)]
        self._returned = asyncio.Event()

    async def chunks(self) -> AsyncIterator[bytes | memoryview]:
        for i in range(0, len(self.data), PIECE):
            self.handed += 1
            if self.reuse:
                while not self.free:
                    self._returned.clear()
                    await asyncio.wait_for(self._returned.wait(), 5)
                buffer = self.free.pop()
                piece = self.data[i : i + PIECE]
                buffer[: len(piece)] = piece
                yield memoryview(buffer)[: len(piece)]
            else:
                yield self.data[i : i + PIECE]
            await asyncio.sleep(0)

    def give_back(self, piece: bytes | memoryview) -> None:
        if isinstance(piece, memoryview):
            buffer = piece.obj
            assert isinstance(buffer, bytearray)
            buffer[:] = b"\0" * PIECE  # what a reused buffer looks like later
            self.free.append(buffer)
            self._returned.set()

    def close(self) -> None:
        pass


async def _fill(tmp_path: Path, source: FastSource) -> Fills:
    digest = Digest("sha256", hashlib.sha256(source.data).hexdigest())
    fills = Fills(str(tmp_path))

    async def fetch() -> FastSource:
        return source

    fill = await fills.open(digest, fetch)
    assert fill is not None
    assert await fill.wait() == len(source.data)
    await fills.close()
    assert Path(fills.blob_path(digest)).read_bytes() == source.data
    return fills


async def test_a_slow_disk_holds_the_upstream_back_instead_of_buffering(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(fill_module, "MAX_PENDING", 8 * PIECE)
    source = FastSource(os.urandom(PIECE * PIECES))
    ahead: list[int] = []  # pieces taken from the source but not yet written, at each write
    written = 0
    real_append = fill_module._append

    def slow_append(fd: int, data: bytes | memoryview, hasher: Any) -> None:
        nonlocal written
        ahead.append(source.handed - written)
        time.sleep(0.005)  # a disk slower than the upstream
        real_append(fd, data, hasher)
        written += 1

    monkeypatch.setattr(fill_module, "_append", slow_append)
    await _fill(tmp_path, source)
    assert written == PIECES
    # the writer works through pieces received meanwhile, but never more than MAX_PENDING
    # (and the one being handed over): the rest stays with the source (in the real
    # upstream, in its socket: TCP flow control), whatever the blob size
    assert 1 < max(ahead) <= 8 + 1, ahead


async def test_pieces_in_reused_buffers_are_written_before_they_are_given_back(
    tmp_path: Path,
) -> None:
    source = FastSource(os.urandom(PIECE * 8 + 123), reuse=True)
    await _fill(tmp_path, source)  # committed bytes equal the data: no write after give_back
    assert len(source.free) == FastSource.POOL  # every piece came back


async def test_a_failed_write_fails_the_fill_and_gives_every_piece_back(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    source = FastSource(os.urandom(PIECE * 8), reuse=True)
    digest = Digest("sha256", hashlib.sha256(source.data).hexdigest())
    real_append = fill_module._append
    calls = 0

    def full_disk(fd: int, data: bytes | memoryview, hasher: Any) -> None:
        nonlocal calls
        calls += 1
        if calls == 3:
            raise OSError(errno.ENOSPC, "No space left on device")
        real_append(fd, data, hasher)

    monkeypatch.setattr(fill_module, "_append", full_disk)
    fills, fill = await _start(tmp_path, source, digest)
    with pytest.raises(fill_module.FillFailed, match="No space left"):
        await fill.wait()
    await fills.close()
    assert calls == 3  # nothing written after the failure
    assert len(source.free) == FastSource.POOL
    assert not Path(fills.blob_path(digest)).exists()
    assert _data_files(tmp_path, digest) == []


async def test_a_cancelled_fill_waits_for_its_write_to_end(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    source = FastSource(os.urandom(PIECE * 4))
    digest = Digest("sha256", hashlib.sha256(source.data).hexdigest())
    started, ended = asyncio.Event(), []
    loop = asyncio.get_running_loop()
    real_append = fill_module._append

    def slow_append(fd: int, data: bytes | memoryview, hasher: Any) -> None:
        loop.call_soon_threadsafe(started.set)
        time.sleep(0.3)
        real_append(fd, data, hasher)  # would fail on a closed fd (EBADF)
        ended.append(True)

    monkeypatch.setattr(fill_module, "_append", slow_append)
    fills, _ = await _start(tmp_path, source, digest)
    await started.wait()
    await fills.close(timeout=0)  # cancels the fetch while the write runs
    assert ended == [True]  # the write ended before the fd was closed
    assert not Path(fills.blob_path(digest)).exists()
    assert _data_files(tmp_path, digest) == []


async def _start(tmp_path: Path, source: FastSource, digest: Digest) -> tuple[Fills, Fill]:
    """A fill of ``digest`` from ``source``, just started (this process leads it)."""
    fills = Fills(str(tmp_path))

    async def fetch() -> FastSource:
        return source

    fill = await fills.open(digest, fetch)
    assert fill is not None
    return fills, fill


def _data_files(root: Path, digest: Digest) -> list[Path]:
    return [
        p
        for p in (root / "proxy").rglob("*")
        if p.name.startswith(digest.hex + ".") and not p.name.endswith((".lock", ".state"))
    ]


class TrickleSource:
    """Hands over small pieces with pauses; with ``stall``, stops after the first piece until
    the event is set."""

    def __init__(self, data: bytes, piece: int, stall: asyncio.Event | None = None) -> None:
        self.data, self.piece, self.stall = data, piece, stall
        self.size: int | None = len(data)

    async def chunks(self) -> AsyncIterator[bytes | memoryview]:
        for i in range(0, len(self.data), self.piece):
            yield self.data[i : i + self.piece]
            if self.stall is not None and i == 0:
                await self.stall.wait()
            await asyncio.sleep(0.001)

    def give_back(self, piece: bytes | memoryview) -> None:
        pass

    def close(self) -> None:
        pass


async def _follow(
    fills: Fills, digest: Digest, source: TrickleSource
) -> list[tuple[int, int, float]]:
    """The ranges a follower is handed: (offset, count, seconds since the fill opened)."""

    async def fetch() -> TrickleSource:
        return source

    t0 = time.monotonic()
    fill = await fills.open(digest, fetch)
    assert fill is not None
    regions = []
    with fill.open_file() as f:
        async for offset, count in fill.regions(f, 0, len(source.data)):
            regions.append((offset, count, time.monotonic() - t0))
    return regions


def _bursts_only(monkeypatch: pytest.MonkeyPatch) -> int:
    """Followers send 256 KiB bursts and no delay runs out during a test; the burst size."""
    burst = 256 * 1024
    monkeypatch.setattr(fill_module, "FOLLOW_BURST", burst)
    monkeypatch.setattr(fill_module, "FOLLOW_DELAY", 30.0)
    return burst


async def test_a_follower_that_caught_up_sends_in_bursts(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    burst = _bursts_only(monkeypatch)
    data = os.urandom(2 << 20)
    digest = Digest("sha256", hashlib.sha256(data).hexdigest())
    fills = Fills(str(tmp_path))
    regions = await _follow(fills, digest, TrickleSource(data, 16 * 1024))
    await fills.close()
    # contiguous, the whole blob, and (but for the last range before the held-back tail and
    # the tail itself) never less than what was sent before it, up to a burst: not one
    # sendfile per 16 KiB that landed
    counts = [c for _, c, _ in regions]
    offsets = [0, *itertools.accumulate(counts)]
    assert offsets[:-1] == [o for o, _, _ in regions]
    assert sum(counts) == len(data)
    assert all(
        c >= min(burst, sent) for c, sent in zip(counts[1:-2], offsets[1:-3], strict=True)
    ), counts
    assert len([c for c in counts if c >= burst]) >= 4, counts


async def test_a_followers_first_bytes_go_out_as_they_land(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # a client waited for a whole burst (16 MiB, ~50 ms from a fast upstream) or the delay
    # (0.2 s, from a slow one) before its first byte
    _bursts_only(monkeypatch)
    data = os.urandom(1 << 20)
    digest = Digest("sha256", hashlib.sha256(data).hexdigest())
    stall = asyncio.Event()
    fills = Fills(str(tmp_path))
    follower = asyncio.ensure_future(_follow(fills, digest, TrickleSource(data, 10_000, stall)))
    await asyncio.sleep(1.0)  # the upstream sent 10 000 bytes, then nothing for a second
    stall.set()
    regions = await follower
    await fills.close()
    offset, count, when = regions[0]
    assert (offset, count) == (0, 10_000)
    assert when < 0.5, regions
    assert sum(c for _, c, _ in regions) == len(data)


async def test_a_stalled_fetch_still_reaches_a_follower_within_the_delay(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(fill_module, "FOLLOW_DELAY", 0.1)
    data = os.urandom(1 << 20)
    digest = Digest("sha256", hashlib.sha256(data).hexdigest())
    stall = asyncio.Event()
    fills = Fills(str(tmp_path))
    follower = asyncio.ensure_future(_follow(fills, digest, TrickleSource(data, 10_000, stall)))
    await asyncio.sleep(1.5)  # the upstream sent 10 000 bytes, then nothing for 1.5 s
    stall.set()
    regions = await follower
    await fills.close()
    offset, count, when = regions[0]
    assert (offset, count) == (0, 10_000)
    assert when < 0.75, regions  # not held for a burst until the stall ended
    assert sum(c for _, c, _ in regions) == len(data)


async def test_a_follower_in_the_leaders_process_wakes_per_burst_not_per_piece(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # twenty requests following a fetch each woken for every piece that lands was measurable
    # CPU in a stampede: a follower sleeps until its burst (or the delay) is there
    _bursts_only(monkeypatch)
    waits = 0
    wait = Fill._wait

    async def counted(self: Fill, *args: Any, **kwargs: Any) -> None:
        nonlocal waits
        waits += 1
        await wait(self, *args, **kwargs)

    monkeypatch.setattr(Fill, "_wait", counted)
    data = os.urandom(2 << 20)  # 128 pieces of 16 KiB, 8 bursts
    digest = Digest("sha256", hashlib.sha256(data).hexdigest())
    fills = Fills(str(tmp_path))
    regions = await _follow(fills, digest, TrickleSource(data, 16 * 1024))
    await fills.close()
    assert sum(c for _, c, _ in regions) == len(data)
    assert waits <= 24, waits  # woken for each piece, it was ~128


async def test_a_follower_in_another_process_reads_the_state_only_when_the_file_stalls(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    reads = 0
    read_state = fill_module._read_state

    def counted(path: str) -> dict[str, Any] | None:
        nonlocal reads
        reads += 1
        return read_state(path)

    monkeypatch.setattr(fill_module, "_read_state", counted)
    data = os.urandom(8 << 20)  # 512 pieces of 16 KiB with a pause after each: > 0.5 s
    digest = Digest("sha256", hashlib.sha256(data).hexdigest())
    leading, other = Fills(str(tmp_path)), Fills(str(tmp_path))  # two locks: two processes
    source = TrickleSource(data, 16 * 1024)
    leader = asyncio.ensure_future(_follow(leading, digest, source))
    while not any(p.name.endswith(".state") for p in tmp_path.rglob("*")):
        await asyncio.sleep(0.005)
    await asyncio.sleep(0.05)  # the fetch has started
    reads = 0
    got = bytearray()
    t0 = time.monotonic()
    fill = await other.open(digest, lambda: pytest.fail("the fetch started twice"))
    assert fill is not None and fill._leader is None
    with fill.open_file() as f:
        async for offset, count in fill.regions(f, 0, len(data)):
            assert offset == len(got)
            got += os.pread(f.fileno(), count, offset)
    took = time.monotonic() - t0
    await leader
    await leading.close()
    assert got == data
    # polled every 20 ms for its state it was one read per poll (~took / 0.02); now only the
    # start, a stall and the wait for the verified tail read it
    assert took > 0.3 and reads <= 10, (took, reads)


class ReleasingSource(TrickleSource):
    """Lends memoryviews and releases each when it is given back, as ``server.body`` does
    with its reused buffers: a released view has no length any more."""

    async def chunks(self) -> AsyncIterator[bytes | memoryview]:
        async for piece in super().chunks():
            yield memoryview(bytearray(piece))

    def give_back(self, piece: bytes | memoryview) -> None:
        assert isinstance(piece, memoryview)
        piece.release()


async def test_followers_wake_for_pieces_of_a_source_that_releases_them(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _bursts_only(monkeypatch)
    errors: list[dict[str, Any]] = []
    asyncio.get_running_loop().set_exception_handler(lambda _, context: errors.append(context))
    data = os.urandom(2 << 20)
    digest = Digest("sha256", hashlib.sha256(data).hexdigest())
    fills = Fills(str(tmp_path))
    t0 = time.monotonic()
    regions = await _follow(fills, digest, ReleasingSource(data, 64 * 1024))
    took = time.monotonic() - t0
    await fills.close()
    assert not errors, errors
    assert sum(c for _, c, _ in regions) == len(data)
    # woken by the bytes landing, not by the 1 s liveness look (8 bursts: 8 s)
    assert took < 0.9, (took, regions)
