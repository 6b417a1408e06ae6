"""What writing into the page cache costs on this machine (a yardstick for the other tables).

Every cache fill and every push writes the blob into the page cache before it is fsynced. On
a virtual machine whose free memory the host takes back (virtio-balloon free page reporting),
a page the guest has not touched for a while faults on the host when it is first written: the
same write(2) then costs several times the CPU of one into pages the kernel just recycled.
Which kind a benchmark's writes get depends on what ran just before, so this prints the three
cases side by side, each as CPU seconds (user + system) per GiB written in 1 MiB write(2)s:

  new pages       a new file while the previous ones are kept (pages nobody used lately)
  recycled pages  a file truncated and written again at once (the pages it just freed)
  overwrite       the same file overwritten in place (no page allocated at all)
  sha256          hashing 1 GiB in 1 MiB updates, for scale (what every fill and push must do)

  .venv/bin/python bench/pagecache.py [--rounds 3] [--size 1GiB] [--tmp /tmp]
"""

from __future__ import annotations

import argparse
import hashlib
import os
import resource
import sys
import time
from collections.abc import Callable

from common import GiB, MiB, fmt_num, fmt_size, median, parse_size, render_table, tmpdir


def _cpu() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def _write(path: str, size: int, flags: int, block: bytes) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | flags, 0o600)
    try:
        for _ in range(size // len(block)):
            os.write(fd, block)
    finally:
        os.close(fd)


def _digest(size: int, block: bytes) -> None:
    h = hashlib.sha256()
    for _ in range(size // len(block)):
        h.update(block)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    p.add_argument("--rounds", type=int, default=3, help="rounds (default 3)")
    p.add_argument("--size", default="1GiB", help="bytes written per case (default 1GiB)")
    p.add_argument("--tmp", default="/tmp", help="where the files go")
    args = p.parse_args(argv)
    size = parse_size(args.size) // MiB * MiB
    if args.rounds < 1 or size < MiB:
        p.error("need --rounds >= 1 and --size >= 1MiB")
    block = os.urandom(MiB)
    per_gib: dict[str, list[float]] = {}
    t0 = time.monotonic()
    with tmpdir(prefix="bastion-bench-pagecache-", base=args.tmp) as tmp:

        def case(name: str, run: Callable[..., None], *run_args: object) -> None:
            c0 = _cpu()
            run(*run_args)
            per_gib.setdefault(name, []).append((_cpu() - c0) * GiB / size)

        for r in range(args.rounds):
            fresh = str(tmp / f"new-{r}")  # kept until the end: every round takes new pages
            case("new pages", _write, fresh, size, os.O_EXCL, block)
            case("recycled pages", _write, fresh, size, os.O_TRUNC, block)
            case("overwrite", _write, fresh, size, 0, block)
            case("sha256", _digest, size, block)
    rows = [
        [name, fmt_num(median(values)), fmt_num(min(values)), fmt_num(max(values))]
        for name, values in per_gib.items()
    ]
    print()
    print(
        f"page cache writes, {fmt_size(size)} per case, {os.cpu_count()} CPUs, "
        f"{time.monotonic() - t0:.0f} s total"
    )
    print(render_table([["case", "cpu s/GiB", "min", "max"]], rows, separators=(1,)))
    print(f"{args.rounds} round(s); cpu = user + system seconds of this process per GiB.")
    reporting = _page_reporting()
    if reporting:
        print(f"free page reporting (/sys/module/page_reporting/parameters): {reporting}")
    return 0


def _page_reporting() -> str:
    """The guest's free page reporting settings, if it has any: with them the host takes
    freed memory back (page_reporting_order: from blocks of 2^order pages; on some kernels
    min_free_ms: once free that long, 0 = at once), which is what makes new pages dear."""
    directory = "/sys/module/page_reporting/parameters"
    try:
        names = sorted(os.listdir(directory))
    except OSError:
        return ""
    values = []
    for name in names:
        try:
            with open(os.path.join(directory, name), encoding="utf-8") as f:
                values.append(f"{name}={f.read().strip()}")
        except OSError:
            continue
    return ", ".join(values)


if __name__ == "__main__":
    sys.exit(main())
