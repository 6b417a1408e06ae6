"""Coalesced filling of a missing blob from another registry (pull-through), one fetch per
digest for every request in every worker process sharing the root.

Files (filesystem driver; see ``storage.paths``)::

    <root>/proxy/<alg>/<hex>.lock      flock()ed by the one leader for the whole fetch
    <root>/proxy/<alg>/<hex>.state     the state of the latest fetch as JSON {"token", "size",
                                       "state": fetching|verified|done|failed, "error"},
                                       replaced atomically
    <root>/proxy/<alg>/<hex>.<token>   the bytes as they arrive; renamed into blobs/ once the
                                       digest and size are verified, deleted otherwise

The first request takes the lock and starts the fetch as a task of its own (so it survives that
client going away); every request, the first included, streams the growing data file. A
follower in the leader's process sleeps until the bytes it waits for are written; one in
another process polls the file's size. A wrong or truncated body is never committed: its
followers' responses are cut short, which clients detect, and the next request fetches again.
"""

from __future__ import annotations

import asyncio
import errno
import fcntl
import hashlib
import json
import logging
import os
import queue
import threading
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, BinaryIO, Final, Protocol

from . import paths
from .digest import Digest
from .errors import StoreError

__all__ = ["BlobSource", "Fetch", "Fill", "FillFailed", "Fills", "SourceMissing"]

log = logging.getLogger("bastion.fill")

_POLL: Final = 0.02
#: A follower that sees no byte for this long checks whether the leader is still alive.
_LIVENESS_EVERY: Final = 1.0
_READ: Final = 1 << 20
#: Bytes of a blob held back from clients until the whole blob matched its digest.
HOLD_BACK: Final = 64 * 1024
#: A follower that caught up with the fetch sends again once as much more has landed as it
#: has sent so far, up to this much, or after ``FOLLOW_DELAY`` seconds: twenty clients woken
#: for every piece that lands each read a few kilobytes per wakeup (measured: ~15% more
#: client CPU in a 1 GiB stampede). Its first bytes go out as soon as they land.
FOLLOW_BURST: Final = 16 << 20
FOLLOW_DELAY: Final = 0.2
#: Bytes handed to a fill's writer thread and not yet written, beyond which the fill stops
#: taking pieces from the source (which then holds the upstream back: TCP flow control). A
#: source of reused buffers (``server.body``: 8 MiB) stops handing pieces out before that.
MAX_PENDING: Final = 16 << 20


class FillFailed(StoreError):
    """The fetch could not start or did not deliver the right bytes."""


class SourceMissing(FillFailed):
    """No source has the blob (raised by a ``Fetch`` and passed on to every waiter)."""


class BlobSource(Protocol):
    size: int | None

    def chunks(self) -> AsyncIterator[bytes | memoryview]:
        """The body as it arrives. A piece may be one of a few buffers the source reuses: it
        is the consumer's until handed back with ``give_back``. With all of them out, the
        source hands out nothing more."""
        ...

    def give_back(self, piece: bytes | memoryview) -> None:
        """Return a piece from ``chunks`` once its bytes are used (event loop thread)."""
        ...

    def close(self) -> None: ...


Fetch = Callable[[], Awaitable[BlobSource]]


@dataclass
class _Leader:
    """In-process view of a fetch this process leads."""

    started: asyncio.Event = field(default_factory=asyncio.Event)
    finished: asyncio.Event = field(default_factory=asyncio.Event)
    state: dict[str, Any] = field(default_factory=dict)
    #: bytes in the data file
    written: int = 0
    #: followers asleep until ``written`` reaches an offset (None: until the state changes)
    waiters: list[tuple[int | None, asyncio.Future[None]]] = field(default_factory=list)

    def landed(self, count: int) -> None:
        """``count`` more bytes are in the data file: wake the followers that wait for them
        (only those: one piece landing does not wake twenty clients' requests)."""
        self.written += count
        if self.waiters:
            asleep = []
            for until, waiter in self.waiters:
                if until is not None and until <= self.written:
                    _wake(waiter)
                else:
                    asleep.append((until, waiter))
            self.waiters = asleep

    def notify(self) -> None:
        """The state changed: wake every follower."""
        waiters, self.waiters = self.waiters, []
        for _, waiter in waiters:
            _wake(waiter)

    async def wait(self, until: int | None, timeout: float) -> None:
        """Until ``written`` reaches ``until`` (None: only a state change counts), the state
        changes, or ``timeout`` seconds pass."""
        if until is not None and self.written >= until:
            return
        loop = asyncio.get_running_loop()
        waiter = loop.create_future()
        self.waiters.append((until, waiter))
        timer = loop.call_later(timeout, _wake, waiter)
        try:
            await waiter
        finally:
            timer.cancel()
            if not waiter.done():  # cancelled: leave no entry behind
                self.waiters = [(u, w) for u, w in self.waiters if w is not waiter]


def _wake(waiter: asyncio.Future[None]) -> None:
    if not waiter.done():
        waiter.set_result(None)


def _run(func: Callable[..., Any], *args: Any) -> Awaitable[Any]:
    return asyncio.get_running_loop().run_in_executor(None, func, *args)


def _try_lock(path: str) -> int | None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as e:
        os.close(fd)
        if e.errno in (errno.EWOULDBLOCK, errno.EAGAIN):
            return None
        raise
    return fd


def _held(path: str) -> bool:
    """Whether some leader (in any process) holds the lock."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except FileNotFoundError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        return False
    except OSError:
        return True
    finally:
        os.close(fd)


def _write_state(path: str, state: dict[str, Any]) -> None:
    """Replace the state file atomically (temp + rename): a reader sees the old state or the
    new one, never a torn or empty file. No fsync: the state only coordinates live processes;
    after a crash the free lock says what matters."""
    tmp = f"{path}.tmp-{uuid.uuid4().hex}"
    with open(tmp, "wb") as f:
        f.write(json.dumps(state).encode())
    os.replace(tmp, path)


def _create_data(data_path: str, state_path: str, state: dict[str, Any]) -> int:
    """Create a fetch's data file and then announce it in the state file; the data fd."""
    fd = os.open(data_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    try:
        _write_state(state_path, state)
    except BaseException:
        os.close(fd)
        _unlink(data_path)
        raise
    return fd


def _read_state(path: str) -> dict[str, Any] | None:
    try:
        with open(path, "rb") as f:
            doc = json.loads(f.read(65536) or b"null")
    except (FileNotFoundError, ValueError):
        return None
    return doc if isinstance(doc, dict) else None


class Fill:
    """A fetch in progress (or just finished) whose bytes can be streamed."""

    def __init__(self, fills: Fills, digest: Digest, state: dict[str, Any], leader: _Leader | None):
        self._fills = fills
        self.digest = digest
        self.size: int | None = state.get("size")
        self._token = state["token"]
        self._data = fills.data_path(digest, self._token)
        self._leader = leader
        self._checked_alive = time.monotonic()

    async def _status(self) -> tuple[str, dict[str, Any]]:
        """("fetching" | "verified" | "done" | "failed", state) of this fill. The state file holds
        of the latest fetch only: once it names another token (or none), ours has ended, and
        the blob pool says how."""
        lock = self._fills.lock_path(self.digest)
        state_file = self._fills.state_path(self.digest)
        if self._leader is not None:
            state = self._leader.state
        else:
            state = await _run(_read_state, state_file) or {}
        if state.get("token") == self._token:
            status = str(state.get("state"))
            if status not in ("fetching", "verified") or self._leader is not None:
                return status, state
            if time.monotonic() - self._checked_alive < _LIVENESS_EVERY:
                return status, state
            self._checked_alive = time.monotonic()
            if await _run(_held, lock):
                return status, state
            state = await _run(_read_state, state_file) or {}  # the leader may have just finished
            if state.get("token") == self._token and state.get("state") in ("done", "failed"):
                return str(state.get("state")), state
        if await _run(self._fills.blob_path_exists, self.digest):
            size = (await _run(os.stat, self._fills.blob_path(self.digest))).st_size
            return "done", {"size": size}
        return "failed", {"error": f"fetch of {self.digest} was interrupted"}

    async def _wait(self, until: int | None = None, at_most: float = _LIVENESS_EVERY) -> None:
        """Until the data file holds ``until`` bytes or the fetch's state changes (None: only
        the latter), for at most ``at_most`` seconds. A follower in another process cannot be
        woken: it looks again after ``_POLL`` seconds."""
        if self._leader is not None:
            await self._leader.wait(until, min(at_most, _LIVENESS_EVERY))
        else:
            await asyncio.sleep(min(at_most, _POLL))

    def _open(self) -> int:
        try:
            return os.open(self._data, os.O_RDONLY)
        except FileNotFoundError:
            # already committed (renamed into the pool), or failed and removed
            return os.open(self._fills.blob_path(self.digest), os.O_RDONLY)

    async def wait(self, *, committed: bool = True) -> int:
        """Wait until the blob is committed to the pool (or, with ``committed=False``, until
        its bytes matched the digest); its size. Raises ``FillFailed`` if it does not."""
        while True:
            status, state = await self._status()
            if status == "done" or (status == "verified" and not committed):
                return int(state.get("size") or 0)
            if status == "failed":
                raise _failure(state)
            await self._wait()

    def open_file(self) -> BinaryIO:
        """The file being filled (or the committed blob), for ``regions``; the caller closes it."""
        return os.fdopen(self._open(), "rb")

    async def regions(self, file: BinaryIO, start: int, end: int) -> AsyncIterator[tuple[int, int]]:
        """(offset, count) ranges of ``file`` (from ``open_file``) covering ``[start, end)``,
        each yielded once its bytes are written, so they can go out with sendfile(2). The last
        piece (``HOLD_BACK`` bytes) is yielded only after the whole blob matched its digest;
        ``FillFailed`` is raised instead if it does not. Once caught up with the fetch, the
        next range waits for as many bytes as were sent before it (up to ``FOLLOW_BURST``) or
        for ``FOLLOW_DELAY`` seconds."""
        pos = start
        hold = max(end - HOLD_BACK, start)
        sent_at = time.monotonic()
        seen, seen_at = -1, sent_at  # the file's size at the last look, and when
        while pos < hold:
            # the first bytes go as they land (a client waited ~50 ms for 16 MiB from a fast
            # upstream, 0.2 s from a slow one); then the burst grows with what was sent
            burst = min(FOLLOW_BURST, max(pos - start, 1))
            size = os.fstat(file.fileno()).st_size
            available = min(size, hold)
            ready = available - pos
            now = time.monotonic()
            if ready >= burst or available == hold or (ready > 0 and now - sent_at >= FOLLOW_DELAY):
                yield pos, ready
                pos, sent_at = available, time.monotonic()
                continue
            # whether the fetch ended matters only once the file stopped growing (another
            # process's state is a file to read; a growing data file says it goes on)
            if size == seen or self._leader is not None:
                status, state = await self._status()
                if status == "failed":
                    raise _failure(state)
                if status in ("done", "verified"):  # all is written: had it reached hold, it went
                    if os.fstat(file.fileno()).st_size > size:
                        continue  # written between our look and the state change
                    raise FillFailed(f"fetch of {self.digest} ended short")
            if now - sent_at < FOLLOW_DELAY:  # a burst, or what landed by the delay's end
                until, at_most = min(pos + burst, hold), sent_at + FOLLOW_DELAY - now
            else:  # the delay is over: whatever lands next goes out
                until, at_most = pos + 1, _LIVENESS_EVERY
            if self._leader is None and 0 <= seen < size:
                # another process's fetch, growing: look again when, at the rate it grew
                # since the last look, the bytes will be there (not every _POLL seconds)
                eta = (until - size) * (now - seen_at) / (size - seen)
                await asyncio.sleep(max(min(eta, at_most), _POLL))
            else:
                await self._wait(until, at_most)
            seen, seen_at = size, now
        await self.wait(committed=False)  # verified: now the last piece may go
        if os.fstat(file.fileno()).st_size < end:
            raise FillFailed(f"fetch of {self.digest} ended short")
        if end > pos:
            yield pos, end - pos

    async def stream(self, start: int = 0, end: int | None = None) -> AsyncIterator[bytes]:
        """Bytes ``[start, end)`` as they arrive. The last piece is held back until the whole
        blob matched its digest; if it does not, ``FillFailed`` is raised instead, so a client
        never receives a complete wrong body."""
        try:
            fd = await _run(self._open)
        except FileNotFoundError:
            raise FillFailed(f"fetch of {self.digest} failed") from None
        try:
            pos = start
            held = b""
            while end is None or pos < end:
                want = _READ if end is None else min(_READ, end - pos)
                chunk = await _run(os.pread, fd, want, pos)
                if chunk:
                    pos += len(chunk)
                    if held:
                        yield held
                    held = chunk
                    continue
                status, state = await self._status()
                if status == "failed":
                    raise _failure(state)
                if status in ("done", "verified"):
                    if os.fstat(fd).st_size > pos:
                        continue  # written between our read and the state change
                    if end is not None and pos < end:
                        raise FillFailed(f"fetch of {self.digest} ended short")
                    break
                await self._wait(pos + 1)
            await self.wait(committed=False)  # verified: now the last piece may go
            if held:
                yield held
        finally:
            os.close(fd)


class Fills:
    """Every fill of one store (filesystem driver only: it needs ``local_path`` and flock)."""

    def __init__(self, root: str) -> None:
        self._root = root
        self._leaders: dict[Digest, _Leader] = {}
        self._tasks: set[asyncio.Task[None]] = set()

    def state_path(self, digest: Digest) -> str:
        return os.path.join(self._root, "proxy", digest.algorithm, f"{digest.hex}.state")

    def lock_path(self, digest: Digest) -> str:
        return os.path.join(self._root, "proxy", digest.algorithm, f"{digest.hex}.lock")

    def data_path(self, digest: Digest, token: str) -> str:
        return os.path.join(self._root, "proxy", digest.algorithm, f"{digest.hex}.{token}")

    def blob_path(self, digest: Digest) -> str:
        return os.path.join(self._root, *paths.blob(digest).split("/"))

    def blob_path_exists(self, digest: Digest) -> bool:
        return os.path.exists(self.blob_path(digest))

    async def open(
        self,
        digest: Digest,
        fetch: Fetch,
        *,
        on_commit: Callable[[], Awaitable[None]] | None = None,
        start_timeout: float = 30.0,
    ) -> Fill | None:
        """None if the blob is in the pool; else a ``Fill`` to stream, leading the fetch if no
        one (in any process) does. ``on_commit`` runs after this process commits the blob.
        Raises ``FillFailed`` if the fetch fails before its first byte or does not start
        within ``start_timeout``."""
        deadline = time.monotonic() + start_timeout
        while True:
            if await _run(self.blob_path_exists, digest):
                return None
            leader = self._leaders.get(digest)
            if leader is not None:
                if leader.started.is_set() and leader.state.get("state") == "failed":
                    await leader.finished.wait()  # it failed before we came: fetch again
                    continue
                await leader.started.wait()
                if leader.state.get("state") == "failed" and "token" not in leader.state:
                    raise _failure(leader.state)  # the fetch we joined could not start
                return Fill(self, digest, leader.state, leader)
            taken = await _run(self._take_lead, digest)
            if taken == "committed":
                return None
            if taken is not None:
                leader = _Leader()
                self._leaders[digest] = leader
                task = asyncio.ensure_future(self._lead(digest, fetch, taken, leader, on_commit))
                self._tasks.add(task)
                task.add_done_callback(self._tasks.discard)
                continue  # wait for it to start, as any other local follower does
            # another process leads, or is just taking over: follow a fetch that has started.
            # A failed state belongs to an earlier fetch: wait for the lock to come free.
            state = await _run(_read_state, self.state_path(digest))
            if state and state.get("token") and state.get("state") == "fetching":
                return Fill(self, digest, state, None)
            if time.monotonic() > deadline:
                raise FillFailed(f"timed out waiting for the fetch of {digest} to start")
            await asyncio.sleep(_POLL)

    def _take_lead(self, digest: Digest) -> int | str | None:
        """The fetch's lock, its state reset and data files of a leader that died removed, in
        one thread-pool call (each hop delays a cold blob's first byte); None if another leader
        holds it, "committed" if the blob landed meanwhile."""
        fd = _try_lock(self.lock_path(digest))
        if fd is None:
            return None
        try:
            if self.blob_path_exists(digest):
                os.close(fd)
                return "committed"
            _write_state(self.state_path(digest), {})
            self._remove_stale(digest)
        except BaseException:
            os.close(fd)
            raise
        return fd

    def _remove_stale(self, digest: Digest) -> None:
        """Data files left by a leader that died (only the lock holder calls this)."""
        directory = os.path.dirname(self.lock_path(digest))
        prefix = f"{digest.hex}."
        for entry in os.listdir(directory):
            if entry.startswith(prefix) and not entry.endswith((".lock", ".state")):
                _unlink(os.path.join(directory, entry))

    async def _lead(
        self,
        digest: Digest,
        fetch: Fetch,
        lock_fd: int,
        leader: _Leader,
        on_commit: Callable[[], Awaitable[None]] | None,
    ) -> None:
        token = uuid.uuid4().hex
        data_path = self.data_path(digest, token)
        data_fd: int | None = None
        source: BlobSource | None = None
        writer: _Writer | None = None
        try:
            try:
                source = await fetch()
            except Exception as e:
                leader.state = {
                    "state": "failed",
                    "error": str(e) or e.__class__.__name__,
                    "missing": isinstance(e, SourceMissing),
                }
                await _run(_write_state, self.state_path(digest), leader.state)
                raise
            state = {"token": token, "size": source.size, "state": "fetching"}
            data_fd = await _run(_create_data, data_path, self.state_path(digest), state)
            leader.state = state
            leader.started.set()
            hasher = hashlib.new(digest.algorithm)
            total = 0
            # The pieces are written and hashed by a thread of the fill's own, in order, while
            # the event loop receives the next ones: a loop busy serving a stampede does not
            # stall the fetch between pieces. Each piece goes back to the source once written.
            writer = _Writer(data_fd, hasher, source.give_back, leader.landed)
            async for chunk in source.chunks():
                total += len(chunk)
                if source.size is not None and total > source.size:
                    source.give_back(chunk)
                    raise FillFailed(f"upstream sent more than the {source.size} bytes announced")
                await writer.put(chunk)
            await writer.finish()
            if source.size is not None and total != source.size:
                raise FillFailed(
                    f"upstream body of {digest} truncated: {total} of {source.size} bytes"
                )
            actual = Digest(digest.algorithm, hasher.hexdigest())
            if actual != digest:
                raise FillFailed(f"upstream sent content with digest {actual} for {digest}")
            # verified: clients may have their last piece while the bytes are made durable
            leader.state = {**leader.state, "state": "verified", "size": total}
            await _run(_write_state, self.state_path(digest), leader.state)
            leader.notify()
            await _run(os.fsync, data_fd)
            await _run(_commit, data_path, self.blob_path(digest))
            leader.state = {**leader.state, "state": "done", "size": total}
            await _run(_write_state, self.state_path(digest), leader.state)
            if on_commit is not None:
                await on_commit()
        except (Exception, asyncio.CancelledError) as e:
            if writer is not None:
                await writer.finish(abandon=True)  # before the fd closes: it may still write
            if leader.state.get("state") != "failed":
                log.error("fetch of %s failed: %s", digest, e)
                leader.state = {**leader.state, "state": "failed", "error": str(e)}
                await _run(_write_state, self.state_path(digest), leader.state)
            await _run(_unlink, data_path)
        finally:
            leader.started.set()
            leader.finished.set()
            leader.notify()
            if source is not None:
                source.close()
            if data_fd is not None:
                os.close(data_fd)
            self._leaders.pop(digest, None)
            os.close(lock_fd)  # releases the flock: the next request may fetch again

    async def close(self, timeout: float = 5.0) -> None:
        """Let fetches in flight finish for up to ``timeout`` seconds, then cancel them (their
        partial data is removed; nothing unverified is committed)."""
        if not self._tasks:
            return
        _, pending = await asyncio.wait(set(self._tasks), timeout=timeout)
        for task in pending:
            task.cancel()
        if pending:
            await asyncio.gather(*pending, return_exceptions=True)


def _failure(state: dict[str, Any]) -> FillFailed:
    cls = SourceMissing if state.get("missing") else FillFailed
    return cls(state.get("error") or "fetch failed")


class _Writer:
    """Writes and hashes a fill's pieces, in order, in a thread of its own, and hands each
    back to the source (on the event loop) once written. Handing a piece over costs the loop
    nothing but a queue put, where a thread-pool call per piece needs the loop to come round
    before the next write can start: in a 1 GiB 20-client stampede that round trip was
    ~5.7 ms per 1 MiB piece, more than half the fetch's time."""

    def __init__(
        self,
        fd: int,
        hasher: Any,
        give_back: Callable[[bytes | memoryview], None],
        written: Callable[[int], None],
    ) -> None:
        self._loop = asyncio.get_running_loop()
        self._fd, self._hasher = fd, hasher
        self._give_back, self._written = give_back, written
        self._queue: queue.SimpleQueue[bytes | memoryview | None] = queue.SimpleQueue()
        self._pending = 0  # bytes handed over and not yet written
        self._error: BaseException | None = None
        self._room = asyncio.Event()
        self._done = self._loop.create_future()
        self._stopped = False
        self._abandoned = False  # read by the thread: write nothing more
        threading.Thread(target=self._work, name="bastion-fill-writer", daemon=True).start()

    async def put(self, piece: bytes | memoryview) -> None:
        """Hand a piece over; waits while ``MAX_PENDING`` bytes are not yet written. Raises
        the error of an earlier write."""
        if self._error is not None:
            self._give_back(piece)
            raise self._error
        self._pending += len(piece)
        self._queue.put(piece)
        while self._pending > MAX_PENDING and self._error is None:
            self._room.clear()
            await self._room.wait()
        if self._error is not None:
            raise self._error

    async def finish(self, *, abandon: bool = False) -> None:
        """Wait until every piece handed over is written and the thread has ended; then raise
        the error of a failed write. With ``abandon`` (the fill failed), the pieces not yet
        written are only handed back, and nothing is raised; a cancellation meanwhile does
        the same, and still waits for the thread: the fd is about to be closed."""
        if abandon:
            self._abandoned = True
        if not self._stopped:
            self._stopped = True
            self._queue.put(None)
        try:
            await asyncio.shield(self._done)
        except asyncio.CancelledError:
            self._abandoned = True  # the fill fails: only the write under way ends
            await asyncio.wait([self._done])
            raise
        if not abandon and self._error is not None:
            raise self._error

    def _work(self) -> None:  # the writer thread
        failed: BaseException | None = None
        while (piece := self._queue.get()) is not None:
            wrote = False
            if failed is None and not self._abandoned:
                try:
                    _append(self._fd, piece, self._hasher)
                    wrote = True
                except Exception as e:  # a full or failing disk: the fill fails
                    failed = e
            self._call(self._landed, piece, wrote, failed)
        self._call(self._end)

    def _call(self, func: Callable[..., None], *args: Any) -> None:
        try:
            self._loop.call_soon_threadsafe(func, *args)
        except RuntimeError:  # the loop is closed: nobody is waiting any more
            pass

    def _landed(self, piece: bytes | memoryview, wrote: bool, error: BaseException | None) -> None:
        count = len(piece)  # before it goes back: a recycled memoryview is released
        self._pending -= count
        if error is not None and self._error is None:
            self._error = error
        self._give_back(piece)
        if wrote:  # followers only wake for bytes that are in the file
            self._written(count)
        if self._pending <= MAX_PENDING or self._error is not None:
            self._room.set()

    def _end(self) -> None:
        self._room.set()
        if not self._done.done():
            self._done.set_result(None)


def _append(fd: int, data: bytes | memoryview, hasher: Any) -> None:
    view = memoryview(data)
    while view:
        n = os.write(fd, view)
        view = view[n:]
    hasher.update(data)


def _commit(src: str, dst: str) -> None:
    os.makedirs(os.path.dirname(dst), exist_ok=True)
    os.replace(src, dst)
    fd = os.open(os.path.dirname(dst), os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _unlink(path: str) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass
