"""What following a pull-through fill costs, per follower: in the fill's process and in another.

Every request for a blob the cache is still fetching follows the fill (``storage.fill``): it
is handed the ranges written so far and waits for more. The 20 clients of the stampede in
bench/pullthrough.py are 20 followers split between the workers; the fill's own process
wakes its followers, a follower in another worker polls the data file. This measures that
following alone, with no sockets (a follower only takes the ranges it is handed), as CPU
seconds while a --rate MB/s fetch of --size bytes lands in 1 MiB pieces:

  in the fill's process   the event loop thread of the fetching process. Its writer thread
                          (write and hash) is not counted: what a page-cache write costs
                          swings from run to run on a VM (bench/pagecache.py).
  in another process      a second process following the same fill, the whole process

each with 1 follower and with --followers, and the extra CPU per added follower per GiB.

  .venv/bin/python bench/fill_followers.py [--rounds 5] [--size 256MiB] [--rate 200]
      [--followers 10]
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import json
import os
import resource
import shutil
import sys
import time
from collections.abc import AsyncIterator, Coroutine
from pathlib import Path
from typing import Any, TypeVar

import uvloop
from common import GiB, MiB, fmt_num, fmt_size, median, parse_size, render_table, tmpdir

from storage import Digest
from storage.fill import BlobSource, Fetch, Fills

ROOT = Path(__file__).resolve().parent.parent
T = TypeVar("T")


class _Source:
    """``size`` bytes (one random MiB over and over) in 1 MiB pieces at ``rate`` bytes/s,
    from when ``go`` is set."""

    def __init__(self, block: bytes, size: int, rate: float, go: asyncio.Event) -> None:
        self.block, self.rate, self.go = block, rate, go
        self.size: int | None = size

    async def chunks(self) -> AsyncIterator[bytes | memoryview]:
        await self.go.wait()
        t0 = time.monotonic()
        for sent in range(0, self.size or 0, MiB):
            await asyncio.sleep(max(0.0, t0 + sent / self.rate - time.monotonic()))
            yield self.block

    def give_back(self, piece: bytes | memoryview) -> None:
        pass

    def close(self) -> None:
        pass


async def _take(fills: Fills, digest: Digest, size: int, fetch: Fetch | None = None) -> None:
    """One follower: every range of the blob, as it is handed out."""

    async def refuse() -> BlobSource:
        raise RuntimeError("a follower started a fetch of its own")

    fill = await fills.open(digest, fetch or refuse)
    if fill is None:
        raise RuntimeError("the blob was already there")
    with fill.open_file() as f:
        taken = 0
        async for _, count in fill.regions(f, 0, size):
            taken += count
    if taken != size:
        raise RuntimeError(f"a follower was handed {taken} of {size} bytes")


async def _case(
    root: Path, block: bytes, digest: Digest, size: int, rate: float, here: int, there: int
) -> float:
    """One fill followed by ``here`` followers in this process and ``there`` in a child
    process; the CPU seconds of this loop thread (``there == 0``) or of the child."""
    go = asyncio.Event()

    async def fetch() -> BlobSource:
        return _Source(block, size, rate, go)

    fills = Fills(str(root))
    followers = [asyncio.ensure_future(_take(fills, digest, size, fetch))]
    while not list(root.glob("proxy/*/*.state")):  # the first has taken the lead
        await asyncio.sleep(0.005)
    followers += [asyncio.ensure_future(_take(fills, digest, size)) for _ in range(here - 1)]
    child = None
    if there:
        child = await asyncio.create_subprocess_exec(
            sys.executable,
            __file__,
            "--child",
            json.dumps([str(root), str(digest), size, there]),
            stdout=asyncio.subprocess.PIPE,
            cwd=ROOT,
        )
        assert child.stdout is not None
        if (await child.stdout.readline()).strip() != b"ready":
            raise RuntimeError("the follower process did not start")
    cpu0 = time.thread_time()
    go.set()
    await asyncio.gather(*followers)
    cpu = time.thread_time() - cpu0
    if child is not None:
        out, _ = await child.communicate()
        if child.returncode != 0:
            raise RuntimeError(f"the follower process exited {child.returncode}")
        cpu = float(out)
    await fills.close()
    shutil.rmtree(root)
    return cpu


async def _child(root: str, digest: str, size: int, count: int) -> None:
    fills = Fills(root)
    dg = Digest.parse(digest)
    followers = [asyncio.ensure_future(_take(fills, dg, size)) for _ in range(count)]
    await asyncio.sleep(0)
    print("ready", flush=True)
    r0 = resource.getrusage(resource.RUSAGE_SELF)
    await asyncio.gather(*followers)
    r1 = resource.getrusage(resource.RUSAGE_SELF)
    print(r1.ru_utime - r0.ru_utime + r1.ru_stime - r0.ru_stime)


def _run(coro: Coroutine[Any, Any, T]) -> T:
    return uvloop.run(coro)  # the loop the server runs on


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--child"]:
        root, digest, size, count = json.loads(argv[1])
        _run(_child(root, digest, size, count))
        return 0
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    p.add_argument("--rounds", type=int, default=5, help="rounds (default 5)")
    p.add_argument("--size", default="256MiB", help="bytes fetched per fill (default 256MiB)")
    p.add_argument("--rate", type=float, default=200, help="fetch rate, MB/s (default 200)")
    p.add_argument("--followers", type=int, default=10, help="followers (default 10)")
    p.add_argument("--tmp", default="/tmp", help="where the store goes")
    args = p.parse_args(argv)
    size = parse_size(args.size) // MiB * MiB
    n = args.followers
    if args.rounds < 1 or size < MiB or args.rate <= 0 or n < 2:
        p.error("need --rounds >= 1, --size >= 1MiB, --rate > 0 and --followers >= 2")
    block = os.urandom(MiB)
    h = hashlib.sha256()
    for _ in range(size // MiB):
        h.update(block)
    digest = Digest("sha256", h.hexdigest())
    cases = {("here", 1): (1, 0), ("here", n): (n, 0), ("there", 1): (1, 1), ("there", n): (1, n)}
    cpu: dict[tuple[str, int], list[float]] = {k: [] for k in cases}
    t0 = time.monotonic()
    with tmpdir(prefix="bastion-bench-followers-", base=args.tmp) as tmp:
        for r in range(args.rounds):
            order = list(cases)
            order = order[r % len(order) :] + order[: r % len(order)]
            for key in order:
                here, there = cases[key]
                root = tmp / f"{r}-{key[0]}-{key[1]}"
                cpu[key].append(
                    _run(_case(root, block, digest, size, args.rate * 1e6, here, there))
                )
    rows = []
    for where, label in (("here", "in the fill's process"), ("there", "in another process")):
        one, many = median(cpu[(where, 1)]), median(cpu[(where, n)])
        extra = [
            (m - o) / (n - 1) * GiB / size
            for o, m in zip(cpu[(where, 1)], cpu[(where, n)], strict=True)
        ]
        rows.append([label, fmt_num(one), fmt_num(many), fmt_num(median(extra), 3)])
    print()
    print(
        f"fill followers: {fmt_size(size)} fetched at {args.rate:g} MB/s in 1 MiB pieces, "
        f"{os.cpu_count()} CPUs, {args.rounds} rounds, {time.monotonic() - t0:.0f} s total"
    )
    print(
        render_table(
            [["followers", "1: cpu s", f"{n}: cpu s", "extra per follower, cpu s/GiB"]],
            rows,
            separators=(1, 2, 3),
        )
    )
    print(
        "cpu = median seconds while the fetch lands: the fill's process, its event loop thread"
        " (the writer thread not counted); another process, all of it. extra = the median of"
        f" each round's ({n} - 1 follower) / {n - 1}, per GiB fetched."
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
