"""Large-blob push/pull throughput and server memory: bastion (--workers 1) vs CNCF distribution.

For each blob size (default 256 MiB and 1 GiB) both servers are started fresh, side by side on
two loopback ports, and each operation is run R rounds against each, back to back (the order
of the servers, and of the two pushes, alternates per round), so every bastion measurement has
a distribution partner:

  push-mono     POST /blobs/uploads/, then one PUT ?digest= carrying the whole blob
  push-chunked  POST, then PATCH chunks of --chunk bytes (Content-Range), then PUT ?digest=
  pull          GET /blobs/<digest>, bytes written to /dev/null (byte count checked)

Every push uploads a new blob (the test file plus a 32-byte per-push suffix, so the digest is
new each time without re-hashing the file), and after the pushes one blob per push method is
pulled once more, untimed, and its sha256 compared with what was pushed.

The client streams both ways: request bodies go out with sendfile(2) straight from the file,
responses are read into one 1 MiB buffer. Before each timed operation the client calls sync(2)
so that one server's dirty pages are not written back during the other's measurement, and
resets VmHWM of the server processes (/proc/<pid>/clear_refs), so the reported peak RSS
belongs to that operation.
"""

from __future__ import annotations

import argparse
import hashlib
import http.client
import os
import random
import shutil
import sys
import time
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urljoin, urlsplit

from common import (
    BastionServer,
    BenchError,
    DistributionServer,
    GiB,
    Measurement,
    MiB,
    Server,
    Skip,
    bastion_executable,
    fmt_num,
    fmt_ratio,
    fmt_size,
    hwm_reset_supported,
    median,
    own_peak_rss_kib,
    paired_ratio,
    parse_size,
    render_table,
    require,
    tmpdir,
)

REPO = "bench/blob"
SUFFIX_LEN = 32
IO_BUF = 1 * MiB
HTTP_TIMEOUT = 600.0
PUSH_OPS = ("push-mono", "push-chunked")
OPS = (*PUSH_OPS, "pull")


# --------------------------------------------------------------------------- test blobs


@dataclass
class Blob:
    """A test file of ``size - SUFFIX_LEN`` deterministic bytes; each pushed blob is the file
    plus a 32-byte suffix derived from a tag, so every push has a distinct digest."""

    path: Path
    size: int
    _file_hash: Any  # sha256 state after the file's bytes

    @property
    def file_len(self) -> int:
        return self.size - SUFFIX_LEN

    @staticmethod
    def create(path: Path, size: int, seed: int, content: str = "random") -> Blob:
        """``random``: seeded pseudo-random bytes (like a compressed layer); ``zeros``: all
        zero bytes (no newline anywhere, like a sparse file in an uncompressed layer)."""
        rng = random.Random(f"{seed}:{size}")
        zeros = bytes(IO_BUF)
        h = hashlib.sha256()
        remaining = size - SUFFIX_LEN
        with open(path, "wb") as f:
            while remaining:
                n = min(IO_BUF, remaining)
                block = rng.randbytes(n) if content == "random" else zeros[:n]
                f.write(block)
                h.update(block)
                remaining -= len(block)
        return Blob(path, size, h)

    def variant(self, tag: str) -> tuple[bytes, str]:
        """(suffix, digest) of the blob for ``tag``."""
        suffix = hashlib.sha256(tag.encode()).digest()
        h = self._file_hash.copy()
        h.update(suffix)
        return suffix, f"sha256:{h.hexdigest()}"


# --------------------------------------------------------------------------- streaming client


class Client:
    """Just enough of the distribution API, over http.client, never holding a blob in memory."""

    def __init__(self, base_url: str, label: str) -> None:
        self.base = base_url
        u = urlsplit(base_url)
        self.host, self.port = u.hostname or "127.0.0.1", u.port or 80
        self.label = label

    def _conn(self) -> http.client.HTTPConnection:
        return http.client.HTTPConnection(self.host, self.port, timeout=HTTP_TIMEOUT)

    def _target(self, location: str) -> str:
        u = urlsplit(urljoin(self.base + "/", location))
        return u.path + (f"?{u.query}" if u.query else "")

    def _fail(
        self, what: str, resp: http.client.HTTPResponse | None, detail: str = ""
    ) -> BenchError:
        if resp is None:
            return BenchError(f"{self.label}: {what}: {detail}")
        body = resp.read(600).decode(errors="replace").strip()
        return BenchError(
            f"{self.label}: {what}: HTTP {resp.status} {resp.reason} {body} {detail}".rstrip()
        )

    def _send(
        self,
        conn: http.client.HTTPConnection,
        method: str,
        target: str,
        headers: dict[str, str],
        body: tuple[Blob, bytes, int, int] | None = None,
    ) -> http.client.HTTPResponse:
        """Send a request whose body is bytes [start, start+length) of blob+suffix, streamed
        with sendfile(2); returns the response (status line and headers read)."""
        conn.putrequest(method, target, skip_accept_encoding=True)
        for k, v in headers.items():
            conn.putheader(k, v)
        conn.putheader("Content-Length", str(body[3] if body else 0))
        conn.endheaders()
        if body is not None:
            blob, suffix, start, length = body
            sock = conn.sock
            assert sock is not None
            try:
                in_file = max(0, min(start + length, blob.file_len) - start)
                if in_file:
                    with open(blob.path, "rb") as f:
                        sent = sock.sendfile(f, start, in_file)
                    if sent != in_file:
                        raise BenchError(f"{self.label}: sendfile sent {sent} of {in_file} bytes")
                tail_from = max(start, blob.file_len) - blob.file_len
                tail = suffix[tail_from : tail_from + length - in_file]
                if tail:
                    sock.sendall(tail)
            except (BrokenPipeError, ConnectionResetError) as e:
                # The server answered early (an error) and closed; report its answer if any.
                try:
                    resp = conn.getresponse()
                except (OSError, http.client.HTTPException):
                    raise BenchError(
                        f"{self.label}: {method} {target}: connection lost while sending: {e}"
                    ) from None
                raise self._fail(
                    f"{method} {target} (answered before the body was sent)", resp
                ) from None
        return conn.getresponse()

    def _start_upload(self, conn: http.client.HTTPConnection) -> str:
        resp = self._send(conn, "POST", f"/v2/{REPO}/blobs/uploads/", {})
        if resp.status != 202 or not resp.getheader("Location"):
            raise self._fail("POST /blobs/uploads/", resp, "(expected 202 with Location)")
        resp.read()
        return self._target(resp.getheader("Location", ""))

    def _finish_upload(
        self,
        conn: http.client.HTTPConnection,
        target: str,
        digest: str,
        body: tuple[Blob, bytes, int, int] | None,
    ) -> None:
        sep = "&" if "?" in target else "?"
        headers = {"Content-Type": "application/octet-stream"} if body else {}
        resp = self._send(conn, "PUT", f"{target}{sep}digest={digest}", headers, body)
        if resp.status != 201:
            raise self._fail("PUT ?digest=", resp, "(expected 201)")
        got = resp.getheader("Docker-Content-Digest")
        resp.read()
        if got is not None and got != digest:
            raise BenchError(
                f"{self.label}: PUT answered Docker-Content-Digest {got}, pushed {digest}"
            )

    def push_mono(self, blob: Blob, suffix: bytes, digest: str, chunk: int) -> None:
        conn = self._conn()
        try:
            target = self._start_upload(conn)
            self._finish_upload(conn, target, digest, (blob, suffix, 0, blob.size))
        finally:
            conn.close()

    def push_chunked(self, blob: Blob, suffix: bytes, digest: str, chunk: int) -> None:
        conn = self._conn()
        try:
            target = self._start_upload(conn)
            for start in range(0, blob.size, chunk):
                n = min(chunk, blob.size - start)
                headers = {
                    "Content-Type": "application/octet-stream",
                    "Content-Range": f"{start}-{start + n - 1}",
                }
                resp = self._send(conn, "PATCH", target, headers, (blob, suffix, start, n))
                if resp.status != 202 or not resp.getheader("Location"):
                    raise self._fail(
                        f"PATCH {start}-{start + n - 1}", resp, "(expected 202 with Location)"
                    )
                rng = resp.getheader("Range")
                resp.read()
                if rng != f"0-{start + n - 1}":
                    raise BenchError(
                        f"{self.label}: PATCH {start}-{start + n - 1} answered Range {rng!r}"
                    )
                target = self._target(resp.getheader("Location", ""))
            self._finish_upload(conn, target, digest, None)
        finally:
            conn.close()

    def pull(self, digest: str, size: int, verify: bool = False) -> None:
        """GET the blob into /dev/null; check the byte count (and the sha256 if ``verify``)."""
        conn = self._conn()
        h = hashlib.sha256() if verify else None
        try:
            conn.request(
                "GET", f"/v2/{REPO}/blobs/{digest}", headers={"Accept-Encoding": "identity"}
            )
            resp = conn.getresponse()
            if resp.status != 200:
                raise self._fail(f"GET /blobs/{digest}", resp, "(expected 200)")
            length = resp.getheader("Content-Length")
            if length is not None and int(length) != size:
                raise BenchError(
                    f"{self.label}: GET answered Content-Length {length}, blob has {size}"
                )
            buf = bytearray(IO_BUF)
            view = memoryview(buf)
            total = 0
            fd = os.open(os.devnull, os.O_WRONLY)
            try:
                while n := resp.readinto(view):
                    os.write(fd, view[:n])
                    if h is not None:
                        h.update(view[:n])
                    total += n
            finally:
                os.close(fd)
            if total != size:
                raise BenchError(f"{self.label}: GET returned {total} bytes, blob has {size}")
            if h is not None and f"sha256:{h.hexdigest()}" != digest:
                raise BenchError(
                    f"{self.label}: GET returned content with sha256:{h.hexdigest()}, pushed {digest}"
                )
        finally:
            conn.close()


# --------------------------------------------------------------------------- the run


@dataclass
class OpStats:
    times: list[float] = field(default_factory=list)
    measurements: list[Measurement] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)

    def peak(self, role: str) -> int | None:
        values = [m.peak_kib.get(role, 0) for m in self.measurements]
        return max(values) if values else None

    def cpu(self) -> float | None:
        return median([m.cpu_total_s for m in self.measurements])


@dataclass
class SizeRun:
    size: int
    ops: dict[tuple[str, str], OpStats] = field(default_factory=dict)  # (server, op)
    idle: dict[str, dict[str, int]] = field(default_factory=dict)  # server -> role -> KiB
    after: dict[str, dict[str, int]] = field(default_factory=dict)
    verified: dict[str, list[str]] = field(default_factory=dict)  # server -> ops verified
    errors: list[str] = field(default_factory=list)
    labels: dict[str, str] = field(default_factory=dict)  # server -> label

    def stats(self, server: str, op: str) -> OpStats:
        return self.ops.setdefault((server, op), OpStats())


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def timed_op(server: Server, stats: OpStats, what: str, func: Any, *args: Any) -> bool:
    os.sync()
    err = ""
    with server.measure() as m:
        t0 = time.perf_counter()
        try:
            func(*args)
            ok = True
        except (BenchError, OSError, http.client.HTTPException) as e:
            ok = False
            err = (
                str(e)
                if isinstance(e, BenchError)
                else f"{server.label}: {what}: {type(e).__name__}: {e}"
            )
        elapsed = time.perf_counter() - t0
    try:
        if isinstance(server, BastionServer):
            server.check_workers()
        else:
            server.check_alive()
    except BenchError as e:
        err = f"{err}\n{e}" if err else str(e)
        ok = False
    if ok:
        stats.times.append(elapsed)
        stats.measurements.append(m)
        rss = ", ".join(f"{r} {k / 1024:.0f} MiB" for r, k in m.peak_kib.items())
        log(f"  {what:<44} {elapsed:7.2f} s  peak RSS {rss}  cpu {m.cpu_total_s:.2f} s")
    else:
        tail = server.log_tail(8).replace("\n", "\n    | ")
        err = f"{err}\n    {server.name} log tail:\n    | {tail}"
        stats.errors.append(err)
        log(f"  {what:<44} FAILED: {err}")
    return ok


def run_size(
    tmp: Path, size: int, rounds: int, chunk: int, seed: int, workers: int, content: str
) -> SizeRun:
    run = SizeRun(size)
    log(f"[{fmt_size(size)}] writing test file ...")
    blob = Blob.create(tmp / f"blob-{size}", size, seed, content)
    try:
        with ExitStack() as stack:
            servers: list[Server] = [
                BastionServer(tmp / f"{size}-bastion", workers=workers),
                DistributionServer(tmp / f"{size}-distribution"),
            ]
            for s in servers:
                stack.enter_context(s)
                run.labels[s.name] = s.label
                run.idle[s.name] = s.current_rss_kib()
            clients = {s.name: Client(s.url, s.label) for s in servers}
            pushed: dict[tuple[str, str], str] = {}  # (server, op) -> digest of last good push
            for r in range(rounds):
                order = servers if r % 2 == 0 else servers[::-1]
                # the push methods take turns going first too: whichever runs second would
                # otherwise always write into what the first left of the page cache
                for op in PUSH_OPS if r % 2 == 0 else PUSH_OPS[::-1]:
                    suffix, digest = blob.variant(f"{seed}/{size}/{op}/{r}")
                    for s in order:
                        c = clients[s.name]
                        func = c.push_mono if op == "push-mono" else c.push_chunked
                        what = f"[{fmt_size(size)}] {s.name} {op} round {r + 1}"
                        if timed_op(
                            s, run.stats(s.name, op), what, func, blob, suffix, digest, chunk
                        ):
                            pushed[(s.name, op)] = digest
            # Untimed: pull the last blob of each push method and compare its sha256.
            for s in servers:
                for op in PUSH_OPS:
                    digest = pushed.get((s.name, op), "")
                    if not digest:
                        continue
                    try:
                        clients[s.name].pull(digest, size, verify=True)
                        run.verified.setdefault(s.name, []).append(op)
                    except (BenchError, OSError, http.client.HTTPException) as e:
                        run.errors.append(f"{s.label}: verifying the {op} blob: {e}")
                        log(f"  verify {s.name} {op} FAILED: {e}")
            for r in range(rounds):
                order = servers if r % 2 == 0 else servers[::-1]
                for s in order:
                    digest = pushed.get((s.name, "push-mono")) or pushed.get(
                        (s.name, "push-chunked"), ""
                    )
                    if not digest:
                        run.stats(s.name, "pull").errors.append(
                            f"{s.label}: no pushed blob to pull"
                        )
                        continue
                    what = f"[{fmt_size(size)}] {s.name} pull round {r + 1}"
                    timed_op(s, run.stats(s.name, "pull"), what, clients[s.name].pull, digest, size)
            for s in servers:
                run.after[s.name] = s.current_rss_kib()
                s.stop()
                code = s.proc.returncode if s.proc else None
                log(f"  {s.label} stopped, exit status {code}")
                if code not in (0, -15, 130, 143, 2):  # distribution exits 2 on SIGTERM
                    run.errors.append(
                        f"{s.label}: exit status {code} on SIGTERM; log tail:\n{s.log_tail()}"
                    )
    finally:
        blob.path.unlink(missing_ok=True)
        for name in ("bastion", "distribution"):
            shutil.rmtree(tmp / f"{size}-{name}", ignore_errors=True)
    return run


# --------------------------------------------------------------------------- report


def mib(kib: int | None) -> str:
    return "-" if kib is None else f"{kib / 1024:.0f}"


def report(runs: list[SizeRun], rounds: int, chunk: int, workers: int, dist_label: str) -> str:
    header = [
        [
            "blob",
            "operation",
            "time s",
            "MB/s",
            "cpu s",
            "wkr MiB",
            "par MiB",
            "time s",
            "MB/s",
            "cpu s",
            "RSS MiB",
            "time",
            "RSS",
        ]
    ]
    groups = [(2, f"bastion --workers {workers}"), (7, dist_label), (11, "bastion/distr.")]
    op_names = {
        "push-mono": "push POST+PUT",
        "push-chunked": f"push PATCH {fmt_size(chunk).replace(' ', '')}+PUT",
        "pull": "pull GET",
    }
    rows: list[list[Any]] = []
    for run in runs:
        size = fmt_size(run.size).replace(" ", "")
        b_idle, d_idle = run.idle.get("bastion", {}), run.idle.get("distribution", {})
        b_idle_total = b_idle.get("worker", 0) + b_idle.get("parent", 0)
        rows.append(
            [
                size,
                "idle RSS at start",
                "",
                "",
                "",
                mib(b_idle.get("worker")),
                mib(b_idle.get("parent")),
                "",
                "",
                "",
                mib(d_idle.get("process")),
                "",
                fmt_ratio(b_idle_total / d_idle["process"]) if d_idle.get("process") else "-",
            ]
        )
        for op in OPS:
            b, d = run.stats("bastion", op), run.stats("distribution", op)
            bt, dt = median(b.times), median(d.times)
            bw, bp, dp = b.peak("worker"), b.peak("parent"), d.peak("process")
            rss_ratio = (bw + bp) / dp if bw is not None and bp is not None and dp else None
            rows.append(
                [
                    size,
                    op_names[op],
                    fmt_num(bt) + ("!" if b.errors else ""),
                    fmt_num(run.size / bt / 1e6, 0) if bt else "-",
                    fmt_num(b.cpu()),
                    mib(bw),
                    mib(bp),
                    fmt_num(dt) + ("!" if d.errors else ""),
                    fmt_num(run.size / dt / 1e6, 0) if dt else "-",
                    fmt_num(d.cpu()),
                    mib(dp),
                    fmt_ratio(paired_ratio(b.times, d.times))
                    if len(b.times) == len(d.times)
                    else "-",
                    fmt_ratio(rss_ratio),
                ]
            )
        b_after, d_after = run.after.get("bastion", {}), run.after.get("distribution", {})
        rows.append(
            [
                size,
                "idle RSS at end",
                "",
                "",
                "",
                mib(b_after.get("worker")),
                mib(b_after.get("parent")),
                "",
                "",
                "",
                mib(d_after.get("process")),
                "",
                "",
            ]
        )
    table = render_table(header, rows, left=2, separators=(2, 7, 11), groups=groups)

    notes = [
        "",
        f"{rounds} round(s); time = median wall seconds per operation (client side, whole operation);",
        "MB/s = blob bytes / median time / 10^6; cpu s = median server CPU (user+sys, all processes);",
        "wkr/par MiB = peak RSS (VmHWM, reset before each operation) of the bastion worker / parent,",
        "max over rounds; distribution RSS likewise for its single process.",
        "ratios: time = median over rounds of bastion_i / distribution_i (measured back to back;",
        "< 1 means bastion faster); RSS = (bastion worker + parent) / distribution (< 1: bastion smaller).",
        "'!' after a time: some rounds failed (see below). sync(2) runs before each operation;",
        "pulls are served from the page cache (the blob was just written), so they measure the",
        "server's copy path, not the disk.",
    ]
    if not hwm_reset_supported():
        notes.append(
            "NOTE: VmHWM could not be reset here; peaks are since server start, not per operation."
        )
    if len(runs) >= 2:
        small, big = runs[0], runs[-1]

        def top(run: SizeRun, server: str, role: str) -> int:
            return max((run.stats(server, op).peak(role) or 0) for op in OPS)

        for server, role, what in (
            ("bastion", "worker", "bastion worker"),
            ("distribution", "process", "distribution"),
        ):
            a, z = top(small, server, role), top(big, server, role)
            if a and z:
                notes.append(
                    f"peak RSS {fmt_size(small.size)} -> {fmt_size(big.size)} blob ({what}, any op): "
                    f"{a / 1024:.0f} -> {z / 1024:.0f} MiB ({round((z - a) / 1024):+d} MiB for "
                    f"{(big.size - small.size) // MiB:+d} MiB of blob)"
                )
    for run in runs:  # issue 7: chunked no slower than monolithic by more than 10%
        cells = []
        for server in ("bastion", "distribution"):
            mono, chunked = run.stats(server, "push-mono"), run.stats(server, "push-chunked")
            paired = len(chunked.times) == len(mono.times)  # else a failed round shifts them
            ratio = paired_ratio(chunked.times, mono.times) if paired else None
            cells.append(f"{server} {fmt_ratio(ratio)}")
        notes.append(
            f"chunked / monolithic push time, {fmt_size(run.size)}: median over rounds of "
            f"chunked_i / monolithic_i (the same round): {', '.join(cells)}"
        )
    for run in runs:
        for server in ("bastion", "distribution"):
            ok = run.verified.get(server, [])
            notes.append(
                f"verified {fmt_size(run.size)} {server}: "
                + (
                    ", ".join(f"{op} blob pulled back, sha256 matches" for op in ok)
                    or "NOTHING VERIFIED"
                )
            )
    errors = [e for run in runs for st in run.ops.values() for e in st.errors]
    errors += [e for run in runs for e in run.errors]
    if errors:
        notes.append("")
        notes.append(f"ERRORS ({len(errors)}):")
        seen: set[str] = set()
        for e in errors:
            if e not in seen:
                seen.add(e)
                notes.append("  " + e.replace("\n", "\n    "))
    notes.append(
        f"client peak RSS: {own_peak_rss_kib() / 1024:.0f} MiB (streams; never holds a blob)"
    )
    return table + "\n" + "\n".join(notes)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    p.add_argument("--rounds", type=int, default=5, help="rounds per operation (default 5)")
    p.add_argument(
        "--sizes",
        default="256MiB,1GiB",
        help="comma-separated blob sizes, smallest first (default 256MiB,1GiB)",
    )
    p.add_argument("--chunk", default="64MiB", help="PATCH chunk size (default 64MiB)")
    p.add_argument("--workers", type=int, default=1, help="bastion --workers (default 1)")
    p.add_argument("--seed", type=int, default=1, help="seed of the test content (default 1)")
    p.add_argument(
        "--content",
        choices=("random", "zeros"),
        default="random",
        help="test content: seeded random bytes (default) or zero bytes",
    )
    p.add_argument(
        "--tmp", default="/tmp", help="where the temporary directory goes (default /tmp)"
    )
    args = p.parse_args(argv)
    try:
        sizes = [parse_size(s) for s in args.sizes.split(",") if s.strip()]
        chunk = parse_size(args.chunk)
    except ValueError as e:
        p.error(str(e))
    if args.rounds < 1 or not sizes or min(sizes) <= SUFFIX_LEN or chunk < 1:
        p.error("need --rounds >= 1, sizes > 32 bytes and a positive --chunk")
    try:
        require("docker-registry")
        bastion_executable()
    except Skip as e:
        print(f"blob_rss: skipped: {e}", file=sys.stderr)
        return 77
    hwm_reset_supported()
    t0 = time.monotonic()
    runs: list[SizeRun] = []
    # Per size: the test file plus 2 * rounds pushed blobs and their upload copies, per server.
    need = max(sizes) * (1 + 2 * 2 * args.rounds) * 1.1
    free = shutil.disk_usage(args.tmp).free
    if free < need:
        print(
            f"blob_rss: {args.tmp} has {free / GiB:.1f} GiB free, needs about {need / GiB:.1f}",
            file=sys.stderr,
        )
        return 1
    with tmpdir(prefix="bastion-bench-blob-", base=args.tmp) as tmp:
        for size in sizes:
            runs.append(
                run_size(tmp, size, args.rounds, chunk, args.seed, args.workers, args.content)
            )
    print()
    print(
        f"blob push/pull, {fmt_size(sizes[0])}..{fmt_size(sizes[-1])}, {args.content} content, "
        f"{os.cpu_count()} CPUs, {time.monotonic() - t0:.0f} s total"
    )
    print(
        report(
            runs,
            args.rounds,
            chunk,
            args.workers,
            runs[-1].labels.get("distribution", "distribution"),
        )
    )
    failed = any(st.errors for run in runs for st in run.ops.values()) or any(
        r.errors for r in runs
    )
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
