"""Air-gap ferry throughput: ``bastion export`` and ``bastion import`` of a synthetic release vs
plain ``cp -r`` and ``tar`` of the same bytes, side by side in the same run.

The release (``tests.release.build_release``: --components images, --payload-size scaling the
layers; the defaults give about 210 MiB) is put into a store once, as ``bastion mirror release``
leaves it (blobs, repository links, manifests, the release tag), through the storage API. Then
each round runs, back to back and in an order that alternates per round:

  export  bastion export --root S --to E    cp -r S/blobs C       tar cf T -C S blobs
  import  bastion import E --root R         cp -r E C2            tar xf T -C X

so every bastion time has partners measured under the same machine conditions. The baselines
move the same bytes (the store's blob pool holds exactly the blobs and manifests the export
writes) but neither hash nor fsync anything, which bastion does for every file (export and
import verify every digest; every file is fsynced before its rename). To compare like with
like every command is followed by ``sync`` inside its timed span (the baselines' dirty pages are
written there), and ``sync`` also runs, untimed, before each command. Reads come from the page
cache after the first round (the content fits in memory): this measures the copy, hash and
write path, not the source disk.

After each bastion run the files are counted (the export's blobs and the imported store's
blobs must both equal the seeded blobs plus manifests).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from common import (
    BenchError,
    MiB,
    RunResult,
    Skip,
    bastion_executable,
    fmt_num,
    fmt_ratio,
    import_tests,
    median,
    paired_ratio,
    parse_size,
    render_table,
    require,
    run_measured,
    tmpdir,
)

PEERS = ("bastion", "cp -r", "tar")
OPERATIONS = ("export", "import")


def log(msg: str) -> None:
    print(f"ferry: {msg}", file=sys.stderr, flush=True)


@dataclass
class Samples:
    """Per (operation, peer): time (command + sync) and CPU per round, peak RSS."""

    times: list[float] = field(default_factory=list)
    cpu: list[float] = field(default_factory=list)
    rss_kib: int = 0


def seed_store(root: Path, components: int, payload_size: int) -> tuple[int, int]:
    """Build the release and put it into the store at ``root``; (files, bytes) of its pool."""
    import_tests()
    from storage import Digest, FilesystemDriver, Store, paths
    from tests.release import build_release

    release = build_release("4.99.1", components=components, payload_size=payload_size)
    repos = {
        "openshift-release-dev/ocp-release": "quay.io/openshift-release-dev/ocp-release",
        "openshift-release-dev/ocp-v4.0-art-dev": "quay.io/openshift-release-dev/ocp-v4.0-art-dev",
    }
    store = Store(FilesystemDriver(str(root)))

    async def load() -> None:
        for digest, data in release.blobs.items():
            await store.driver.put_content(paths.blob(Digest.parse(digest)), data)
        for m in release.manifests:
            for blob in m.blobs:
                await store.link_blob(repos[m.repo], Digest.parse(blob))
            await store.put_manifest(repos[m.repo], m.tag or m.digest, m.data, m.media_type)

    asyncio.run(load())
    return release.blob_count + release.manifest_count, release.total_bytes


def count_files(directory: Path) -> tuple[int, int]:
    files = size = 0
    for d, _, names in os.walk(directory):
        for n in names:
            if not n.startswith("."):
                files += 1
                size += os.path.getsize(os.path.join(d, n))
    return files, size


def timed(argv: list[str], out: Path, name: str) -> tuple[float, RunResult]:
    """Run ``argv`` then ``sync``; (seconds for both, the command's result)."""
    subprocess.run(["sync"], check=True)
    r = run_measured(argv, out_dir=out, name=name)
    if not r.ok:
        raise BenchError(r.describe())
    t0 = time.perf_counter()
    subprocess.run(["sync"], check=True)
    return r.elapsed + time.perf_counter() - t0, r


def run_round(
    n: int, work: Path, store: Path, expect: int, concurrency: int, samples: dict[Any, Samples]
) -> None:
    rd = work / f"round-{n}"
    rd.mkdir()
    logs = work / "logs"
    bastion = bastion_executable()
    export, tarball = rd / "export", rd / "pool.tar"
    commands = {
        ("export", "bastion"): [
            bastion, "export", "--root", str(store), "--to", str(export),
            "--concurrency", str(concurrency),
        ],
        ("export", "cp -r"): ["cp", "-r", str(store / "blobs"), str(rd / "cp-export")],
        ("export", "tar"): ["tar", "cf", str(tarball), "-C", str(store), "blobs"],
        ("import", "bastion"): [
            bastion, "import", str(export), "--root", str(rd / "imported"),
            "--concurrency", str(concurrency),
        ],
        ("import", "cp -r"): ["cp", "-r", str(export), str(rd / "cp-import")],
        ("import", "tar"): ["tar", "xf", str(tarball), "-C", str(rd / "untar")],
    }  # fmt: skip
    (rd / "untar").mkdir()
    for op in OPERATIONS:  # import reads what export wrote: the operations stay in order
        peers = PEERS if n % 2 else tuple(reversed(PEERS))
        for peer in peers:
            seconds, r = timed(commands[op, peer], logs, f"{op}-{peer.split()[0]}")
            s = samples[op, peer]
            s.times.append(seconds)
            s.cpu.append(r.cpu_s)
            s.rss_kib = max(s.rss_kib, r.maxrss_kib)
            log(f"round {n} {op:6} {peer:7} {seconds:6.2f}s  cpu {r.cpu_s:5.2f}s")
    exported = count_files(export / "blobs")[0]
    imported = count_files(rd / "imported" / "blobs")[0]
    if exported != expect or imported != expect:
        raise BenchError(f"round {n}: export has {exported} blobs, import {imported}, not {expect}")
    log(f"round {n}: verified {expect} blobs and manifests in the export and the imported store")
    shutil.rmtree(rd)


def report(samples: dict[Any, Samples], size: int, notes: list[str]) -> str:
    header = [
        ["", "bastion", "", "", "", "cp -r", "", "tar", "", "bastion/", ""],
        ["operation", "time s", "MB/s", "cpu s", "RSS MiB", "time s", "MB/s", "time s", "MB/s",
         "cp", "tar"],
    ]  # fmt: skip
    rows: list[list[Any]] = []
    for op in OPERATIONS:
        row: list[Any] = [op]
        for peer in PEERS:
            s = samples[op, peer]
            t = median(s.times)
            row += [fmt_num(t), fmt_num(size / t / 1e6, 0) if t else None]
            if peer == "bastion":
                row += [fmt_num(median(s.cpu)), fmt_num(s.rss_kib / 1024, 0)]
        b = samples[op, "bastion"].times
        row += [
            fmt_ratio(paired_ratio(b, samples[op, "cp -r"].times)),
            fmt_ratio(paired_ratio(b, samples[op, "tar"].times)),
        ]
        rows.append(row)
    table = render_table(header, rows, separators=(1, 5, 7, 9))
    return table + "\n" + "\n".join(notes)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    p.add_argument("--rounds", type=int, default=3, help="rounds per operation (default 3)")
    p.add_argument("--components", type=int, default=40, help="release components (default 40)")
    p.add_argument(
        "--payload-size", default="4MiB", help="layer scale (default 4MiB: about 210 MiB)"
    )
    p.add_argument("--concurrency", type=int, default=4, help="bastion --concurrency (default 4)")
    p.add_argument("--tmp", default="/tmp", help="where the temporary directory goes")
    args = p.parse_args(argv)
    try:
        payload = parse_size(args.payload_size)
    except ValueError as e:
        p.error(str(e))
    if args.rounds < 1 or args.components < 6 or payload < 1:
        p.error("need --rounds >= 1, --components >= 6 and a positive --payload-size")
    try:
        bastion_executable()
        require("tar")
    except Skip as e:
        log(f"skipped: {e}")
        return 77
    with tmpdir(base=args.tmp) as work:
        t0 = time.monotonic()
        store = work / "store"
        expect, total = seed_store(store, args.components, payload)
        files, size = count_files(store / "blobs")
        if (files, size) != (expect, total):
            raise BenchError(f"seeded {files} files of {size} bytes, expected {expect}, {total}")
        free = shutil.disk_usage(work).free
        if free < size * 6:
            raise BenchError(f"need about {size * 6 // MiB} MiB free in {args.tmp}")
        log(
            f"store: {files} blobs and manifests, {size / MiB:.1f} MiB ({time.monotonic() - t0:.1f}s)"
        )
        startup = median(
            [timed([bastion_executable(), "--help"], work / "logs", "help")[0] for _ in range(3)]
        )
        samples = {(op, peer): Samples() for op in OPERATIONS for peer in PEERS}
        for n in range(1, args.rounds + 1):
            run_round(n, work, store, expect, args.concurrency, samples)
    notes = [
        f"content: {args.components} components, payload {args.payload_size}: {expect} blobs "
        f"and manifests, {size / MiB:.1f} MiB; MB/s = content bytes / median time / 10^6",
        f"time = command + sync, median of {args.rounds} rounds; ratios: median of paired "
        "bastion/baseline (< 1: bastion faster)",
        "RSS: bastion's peak (wait4), max over rounds; bastion --concurrency "
        f"{args.concurrency}; its start-up alone (bastion --help): {startup:.2f}s",
        "bastion hashes and fsyncs every file, cp and tar do neither (the sync writes theirs)",
    ]
    print(report(samples, size, notes))
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except BenchError as e:
        log(f"FAILED: {e}")
        sys.exit(1)
    except KeyboardInterrupt:
        sys.exit(130)
