"""The pull-through fill leader, in process: memory stays flat when the disk is slower than
the upstream, and the bytes committed are the upstream's."""

from __future__ import annotations

import asyncio
import hashlib
import os
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from storage import Digest
from storage import fill as fill_module
from storage.fill import Fills

PIECE = 256 * 1024
PIECES = 160  # 40 MiB
BOUND = 2 << 20  # MAX_PENDING for this test


class FastSource:
    """An upstream that hands over every piece at once (faster than any disk)."""

    def __init__(self, data: bytes) -> None:
        self.data = data
        self.size: int | None = len(data)

    async def chunks(self) -> AsyncIterator[bytes]:
        for i in range(0, len(self.data), PIECE):
            yield self.data[i : i + PIECE]
            await asyncio.sleep(0)

    def close(self) -> None:
        pass


async def test_a_slow_disk_pauses_the_upstream_instead_of_buffering(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    data = os.urandom(PIECE * PIECES)
    digest = Digest("sha256", hashlib.sha256(data).hexdigest())
    batches: list[int] = []
    real_append = fill_module._append

    def slow_append(fd: int, pieces: list[bytes], hasher: Any) -> None:
        batches.append(sum(len(p) for p in pieces))
        time.sleep(0.02)  # a disk slower than the upstream
        real_append(fd, pieces, hasher)

    monkeypatch.setattr(fill_module, "_append", slow_append)
    monkeypatch.setattr(fill_module, "MAX_PENDING", BOUND)
    fills = Fills(str(tmp_path))

    async def fetch() -> FastSource:
        return FastSource(data)

    fill = await fills.open(digest, fetch)
    assert fill is not None
    assert await fill.wait() == len(data)
    await fills.close()
    # what waited for the disk never grew beyond the bound (plus the piece that crossed it)
    assert max(batches) <= BOUND + PIECE, max(batches)
    assert sum(batches) == len(data)
    assert Path(fills.blob_path(digest)).read_bytes() == data
