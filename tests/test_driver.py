"""The storage driver conformance suite: every backend runs every test (add a fixture id)."""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from pathlib import Path

import pytest

from storage.driver import FilesystemDriver, InvalidOffset, InvalidPath, PathNotFound, StorageDriver

BACKENDS: dict[str, Callable[[Path], StorageDriver]] = {
    "filesystem": lambda tmp: FilesystemDriver(str(tmp / "fs")),
}


@pytest.fixture(params=sorted(BACKENDS))
def driver(request: pytest.FixtureRequest, tmp_path: Path) -> StorageDriver:
    return BACKENDS[request.param](tmp_path)


async def collect(driver: StorageDriver, path: str, offset: int = 0) -> bytes:
    return b"".join([c async for c in driver.reader(path, offset)])


async def test_put_get_content_roundtrip(driver: StorageDriver) -> None:
    await driver.put_content("a/b/c", b"hello")
    assert await driver.get_content("a/b/c", 100) == b"hello"
    await driver.put_content("a/b/c", b"bye")
    assert await driver.get_content("a/b/c", 100) == b"bye"


async def test_get_content_limit_and_missing(driver: StorageDriver) -> None:
    await driver.put_content("x", b"0123456789")
    with pytest.raises(ValueError):
        await driver.get_content("x", 5)
    with pytest.raises(PathNotFound):
        await driver.get_content("nope", 5)


@pytest.mark.parametrize("bad", ["", "/abs", "a//b", "a/../b", "./a", "a/."])
async def test_invalid_paths_are_refused(driver: StorageDriver, bad: str) -> None:
    with pytest.raises(InvalidPath):
        await driver.put_content(bad, b"x")
    with pytest.raises(InvalidPath):
        await driver.stat(bad)


async def test_stat(driver: StorageDriver) -> None:
    await driver.put_content("d/f", b"12345")
    info = await driver.stat("d/f")
    assert (info.size, info.is_dir) == (5, False)
    assert (await driver.stat("d")).is_dir
    with pytest.raises(PathNotFound):
        await driver.stat("d/g")
    with pytest.raises(PathNotFound):
        await driver.stat("d/f/deeper")


async def test_reader_offsets(driver: StorageDriver) -> None:
    data = bytes(range(256)) * 8192  # 2 MiB, more than one chunk
    await driver.put_content("blob", data)
    assert await collect(driver, "blob") == data
    assert await collect(driver, "blob", 1000) == data[1000:]
    assert await collect(driver, "blob", len(data)) == b""
    with pytest.raises(InvalidOffset):
        await collect(driver, "blob", len(data) + 1)
    with pytest.raises(PathNotFound):
        await collect(driver, "missing")


async def test_writer_invisible_until_commit(driver: StorageDriver) -> None:
    hasher = hashlib.sha256()
    async with driver.writer("w/file", hasher=hasher) as w:
        await w.write(b"abc")
        await w.write(b"def")
        assert w.size == 6
        with pytest.raises(PathNotFound):
            await driver.stat("w/file")
        await w.commit()
    assert await driver.get_content("w/file", 100) == b"abcdef"
    assert hasher.hexdigest() == hashlib.sha256(b"abcdef").hexdigest()


async def test_writer_cancel_on_exit_and_idempotent(driver: StorageDriver) -> None:
    await driver.put_content("k/keep", b"old")
    with pytest.raises(RuntimeError):
        async with driver.writer("k/keep") as w:
            await w.write(b"new bytes")
            raise RuntimeError("client went away")
    assert await driver.get_content("k/keep", 100) == b"old"
    w = driver.writer("k/keep")
    await w.write(b"x")
    await w.cancel()
    await w.cancel()
    assert await driver.get_content("k/keep", 100) == b"old"
    assert await driver.list("k") == ["keep"]  # no temporary files visible


async def test_writer_resume_with_append(driver: StorageDriver) -> None:
    w = driver.writer("up/data", append=True)
    await w.open()
    assert w.size == 0
    await w.write(b"first-")
    await w.close()
    w = driver.writer("up/data", append=True)
    await w.open()
    assert w.size == 6
    await w.write(b"second")
    await w.commit()
    assert await driver.get_content("up/data", 100) == b"first-second"
    # a new non-append session starts from nothing
    w = driver.writer("up/data2", append=True)
    await w.write(b"zzz")
    await w.close()
    w = driver.writer("up/data2")
    await w.open()
    assert w.size == 0
    await w.cancel()


async def test_list_move_delete(driver: StorageDriver) -> None:
    await driver.put_content("r/b", b"1")
    await driver.put_content("r/a", b"2")
    await driver.put_content("r/sub/c", b"3")
    assert await driver.list("r") == ["a", "b", "sub"]
    with pytest.raises(PathNotFound):
        await driver.list("nothing")
    await driver.move("r/a", "s/t/moved")
    assert await driver.get_content("s/t/moved", 10) == b"2"
    with pytest.raises(PathNotFound):
        await driver.move("r/a", "s/again")
    await driver.delete("r")
    with pytest.raises(PathNotFound):
        await driver.stat("r/sub/c")
    with pytest.raises(PathNotFound):
        await driver.delete("r")


async def test_walk(driver: StorageDriver) -> None:
    for p in ["t/a/1", "t/a/2", "t/b"]:
        await driver.put_content(p, b"x")
    seen = [(i.path, i.is_dir) async for i in driver.walk("t")]
    assert sorted(seen) == [("t/a", True), ("t/a/1", False), ("t/a/2", False), ("t/b", False)]
    assert [p for p, _ in seen].index("t/a") < [p for p, _ in seen].index("t/a/1")
    with pytest.raises(PathNotFound):
        async for _ in driver.walk("none"):
            pass


async def test_writer_takes_a_list_of_pieces(driver: StorageDriver) -> None:
    pieces = [bytes([i % 251]) * (i % 7 + 1) for i in range(2000)]  # more than one writev batch
    hasher = hashlib.sha256()
    async with driver.writer("v/pieces", hasher=hasher) as w:
        await w.write(pieces)
        await w.write([b"", b"tail"])
        await w.commit()
    whole = b"".join(pieces) + b"tail"
    assert await driver.get_content("v/pieces", len(whole)) == whole
    assert hasher.hexdigest() == hashlib.sha256(whole).hexdigest()
