"""Serving: bastion (serve --workers 2) vs CNCF distribution vs nginx over the same bytes.

Three servers run side by side on loopback for the whole benchmark:

  bastion       ``bastion serve --workers N`` (default 2, one per CPU), filesystem store
  distribution  CNCF distribution (Debian ``docker-registry``), filesystem storage, no auth
  nginx         the same bytes as static files (``sendfile on``, ``worker_processes`` N),
                laid out so that the registry URL paths work: ``<root>/v2/<repo>/blobs/<digest>``,
                ``<root>/v2/<repo>/manifests/<tag>`` and ``.../manifests/<digest>``: the
                raw-file ceiling (it speaks no registry API: no /v2/ ping, no negotiation)

The content is deterministic (seeded random bytes in valid gzip tar layers): ``bench/big:1``, one
--blob-size layer (default 1 GiB) and its config, and ``bench/small:1`` (three small layers) for
the manifest tests, both Docker schema2. The files are written once into nginx's tree and pushed
from there to bastion and distribution through their HTTP APIs (POST + PUT, manifest PUT by tag).

Each round, every operation runs against each server back to back, in the order distribution,
bastion, nginx, reversed every other round (bastion is always next to both of its partners):

  blob GET xN     N concurrent clients (threads of this process on raw sockets), each GETs the
                  whole big layer and discards it (256 KiB receive buffer); aggregate MB/s
  manifest GET    wrk -t2 -c64 -d<duration>s --latency, Accept: the manifest's media type,
  by digest/tag   /v2/bench/small/manifests/<digest> and .../manifests/1
  manifest HEAD   the same URL by digest, HEAD; wrk 4.x cannot do HEAD (it waits for the body a
  by digest       Content-Length announces), so this one uses a small uvloop load generator
                  (2 processes x 32 connections), not wrk: compare its rows across servers only
  skopeo pull     skopeo copy docker://<server>/bench/big:1 dir:<tmp> (registries only)

Around each operation the servers' CPU time and per-process peak RSS (VmHWM reset first) are read
from /proc, giving CPU seconds per GiB served / per 10k requests and the peak RSS per worker.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import gc
import hashlib
import json
import multiprocessing
import os
import resource
import shutil
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from common import (
    REPO_ROOT,
    BastionServer,
    BenchError,
    DistributionServer,
    GiB,
    KiB,
    Measurement,
    MiB,
    NginxServer,
    PlainRegistry,
    Server,
    Skip,
    Skopeo,
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
    run_wrk,
    stream_get,
    tmpdir,
    write_layer_file,
)

MANIFEST_TYPE = "application/vnd.docker.distribution.manifest.v2+json"
CONFIG_TYPE = "application/vnd.docker.container.image.v1+json"
LAYER_TYPE = "application/vnd.docker.image.rootfs.diff.tar.gzip"
BIG_REPO, SMALL_REPO, TAG = "bench/big", "bench/small", "1"
SMALL_LAYERS = (16 * KiB, 64 * KiB, 256 * KiB)
SERVERS = ("bastion", "distribution", "nginx")
BASE_ORDER = ("distribution", "bastion", "nginx")  # reversed on odd rounds
RECV_BUF = 256 * KiB
HEAD_PROCS, WRK_THREADS = 2, 2


def log(msg: str) -> None:
    stamp = datetime.datetime.now().strftime("%H:%M:%S")
    print(f"{stamp} {msg}", file=sys.stderr, flush=True)


# --------------------------------------------------------------------------- content


@dataclass
class Image:
    repo: str
    tag: str
    manifest: bytes
    digest: str
    blobs: list[tuple[str, Path]]  # (digest, file in nginx's tree), config first
    sizes: list[int]  # of the blobs, in the same order

    @property
    def size(self) -> int:
        return sum(self.sizes)


def _write_image(tree: Path, repo: str, layer_sizes: tuple[int, ...], seed: str) -> Image:
    """Write an image's layers, config and manifest into nginx's tree under the registry URL
    layout: v2/<repo>/blobs/<digest>, v2/<repo>/manifests/<tag> and .../manifests/<digest>."""
    blob_dir = tree / "v2" / repo / "blobs"
    man_dir = tree / "v2" / repo / "manifests"
    blob_dir.mkdir(parents=True, exist_ok=True)
    man_dir.mkdir(parents=True, exist_ok=True)
    layers = []
    for i, size in enumerate(layer_sizes):
        tmp = blob_dir / f".layer-{i}"
        lf = write_layer_file(tmp, size, f"{seed}/{repo}/{i}/{size}", f"layer-{i}.bin")
        final = blob_dir / lf.digest
        tmp.rename(final)
        layers.append((lf.digest, lf.size, lf.diff_id, final))
    config = {
        "architecture": "amd64",
        "os": "linux",
        "created": "2024-01-01T00:00:00Z",
        "config": {"Labels": {"io.bastion.bench": f"{seed}/{repo}"}},
        "rootfs": {"type": "layers", "diff_ids": [d for _, _, d, _ in layers]},
        "history": [{"created": "2024-01-01T00:00:00Z"} for _ in layers],
    }
    config_bytes = (json.dumps(config, indent=2) + "\n").encode()
    config_digest = f"sha256:{hashlib.sha256(config_bytes).hexdigest()}"
    (blob_dir / config_digest).write_bytes(config_bytes)
    doc = {
        "schemaVersion": 2,
        "mediaType": MANIFEST_TYPE,
        "config": {"mediaType": CONFIG_TYPE, "digest": config_digest, "size": len(config_bytes)},
        "layers": [{"mediaType": LAYER_TYPE, "digest": d, "size": s} for d, s, _, _ in layers],
    }
    manifest = (json.dumps(doc, indent=3) + "\n").encode()
    digest = f"sha256:{hashlib.sha256(manifest).hexdigest()}"
    (man_dir / TAG).write_bytes(manifest)
    (man_dir / digest).write_bytes(manifest)
    blobs = [(config_digest, blob_dir / config_digest), *((d, p) for d, _, _, p in layers)]
    return Image(repo, TAG, manifest, digest, blobs, [p.stat().st_size for _, p in blobs])


def seed_registry(server: Server, images: list[Image]) -> float:
    """Push every image through the registry API (blobs, then the manifest by tag)."""
    reg = PlainRegistry(server.url, server.label)
    t0 = time.perf_counter()
    for image in images:
        for digest, path in image.blobs:
            reg.push_blob_file(image.repo, path, digest)
        got = reg.push_manifest(image.repo, image.tag, image.manifest, MANIFEST_TYPE)
        if got != image.digest:
            raise BenchError(f"{server.label}: manifest digest {got}, expected {image.digest}")
    return time.perf_counter() - t0


def verify(server: Server, name: str, images: list[Image], big: tuple[str, int]) -> str:
    """Untimed: every manifest by tag and digest (GET and HEAD) and the big layer (sha256)
    come back as pushed. Also puts the big layer in the page cache for each server."""
    reg = PlainRegistry(server.url, server.label)
    accept = {"Accept": MANIFEST_TYPE}
    for image in images:
        for ref in (image.tag, image.digest):
            path = f"/v2/{image.repo}/manifests/{ref}"
            status, headers, body = reg.request("GET", path, headers=accept)
            if status != 200 or body != image.manifest:
                raise BenchError(
                    f"{server.label}: GET {path}: HTTP {status}, {len(body)} bytes "
                    f"(expected 200 and the {len(image.manifest)} pushed bytes)"
                )
            if name != "nginx":
                ctype = headers.get("content-type", "")
                dcd = headers.get("docker-content-digest", "")
                if ctype != MANIFEST_TYPE or dcd != image.digest:
                    raise BenchError(
                        f"{server.label}: GET {path}: Content-Type {ctype!r}, "
                        f"Docker-Content-Digest {dcd!r}"
                    )
        path = f"/v2/{image.repo}/manifests/{image.digest}"
        status, headers, body = reg.request("HEAD", path, headers=accept)
        if status != 200 or headers.get("content-length") != str(len(image.manifest)):
            raise BenchError(
                f"{server.label}: HEAD {path}: HTTP {status}, "
                f"Content-Length {headers.get('content-length')!r}"
            )
    digest, size = big
    stream_get(server.url, f"/v2/{BIG_REPO}/blobs/{digest}", expect_size=size, digest=digest)
    return "manifests by tag and digest (GET, HEAD) and the big layer's sha256 match"


# --------------------------------------------------------------------------- blob GET clients


@dataclass
class BlobResult:
    wall: float  # until the last client finished
    client_times: list[float]
    client_cpu: float  # this process, all its threads


def _read_blob(host: str, port: int, path: str, size: int, start: threading.Barrier | None) -> None:
    """One client: connect, wait for the others (``start``), GET, read the body into a reused
    buffer."""
    with socket.create_connection((host, port), timeout=600) as sock:
        if start is not None:
            start.wait()
        sock.sendall(
            f"GET {path} HTTP/1.1\r\nHost: {host}:{port}\r\nAccept-Encoding: identity\r\n"
            "Connection: close\r\n\r\n".encode()
        )
        buf = bytearray(RECV_BUF)
        view = memoryview(buf)
        head = bytearray()
        while (end := head.find(b"\r\n\r\n")) < 0:
            n = sock.recv_into(view)
            if not n or len(head) > 64 * KiB:
                raise BenchError(f"GET {path}: no complete response header ({len(head)} bytes)")
            head += view[:n]
        lines = bytes(head[:end]).decode("latin-1").split("\r\n")
        status = lines[0].split(" ", 2)
        if len(status) < 2 or status[1] != "200":
            raise BenchError(f"GET {path}: {lines[0]!r}")
        length = next(
            (
                v.strip()
                for k, _, v in (x.partition(":") for x in lines[1:])
                if k.strip().lower() == "content-length"
            ),
            None,
        )
        if length is None or int(length) != size:
            raise BenchError(f"GET {path}: Content-Length {length!r}, the blob has {size}")
        got = len(head) - end - 4
        while got < size:
            n = sock.recv_into(view)
            if not n:
                break
            got += n
        if got != size:
            raise BenchError(f"GET {path}: {got} bytes, the blob has {size}")


def blob_get(url: str, path: str, size: int, clients: int, repeat: int = 1) -> BlobResult:
    """``clients`` threads, connected first, released together, each GETting the blob
    ``repeat`` times in a row (a new connection each time); raises if any failed. Client
    times: from the release to each client's end, or with ``repeat`` > 1 each GET's own."""
    host, _, port = url.removeprefix("http://").partition(":")
    start = threading.Barrier(clients + 1)
    times: list[float] = []
    errors: list[str] = []
    lock = threading.Lock()
    t0 = 0.0

    def client(i: int) -> None:
        try:
            _read_blob(host, int(port), path, size, start)
            took = [time.perf_counter() - t0]
            for _ in range(repeat - 1):
                t1 = time.perf_counter()
                _read_blob(host, int(port), path, size, None)
                took.append(time.perf_counter() - t1)
            with lock:
                times.extend(took)
        except (OSError, BenchError, threading.BrokenBarrierError, ValueError) as e:
            start.abort()
            with lock:
                errors.append(f"client {i}: {type(e).__name__}: {e}")

    threads = [threading.Thread(target=client, args=(i,), daemon=True) for i in range(clients)]
    for t in threads:
        t.start()
    ru0 = resource.getrusage(resource.RUSAGE_SELF)
    t0 = time.perf_counter()
    try:
        start.wait(timeout=60)
    except threading.BrokenBarrierError:
        pass
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    ru1 = resource.getrusage(resource.RUSAGE_SELF)
    if errors:
        raise BenchError(f"{len(errors)} of {clients} GETs failed: " + "; ".join(errors[:3]))
    cpu = (ru1.ru_utime - ru0.ru_utime) + (ru1.ru_stime - ru0.ru_stime)
    return BlobResult(wall, sorted(times), cpu)


# --------------------------------------------------------------------------- HEAD load generator


@dataclass
class RateResult:
    rps: float
    requests: int
    p50_ms: float
    p99_ms: float
    errors: str  # "" when every answer was 2xx/3xx and no connection failed


def _head_worker(
    job: tuple[str, int, str, dict[str, str], int, float],
) -> tuple[list[int], dict[int, int], int]:
    """One load process: ``conns`` kept-alive connections, each sending the next HEAD as soon
    as the previous answer's header is complete, for ``duration`` seconds. Returns the
    latencies (ns) of the answers completed in time, the count per status, failed connections."""
    host, port, path, headers, conns, duration = job
    gc.disable()
    try:
        import uvloop

        new_loop: Callable[[], asyncio.AbstractEventLoop] = uvloop.new_event_loop
    except ImportError:
        new_loop = asyncio.new_event_loop
    extra = "".join(f"{k}: {v}\r\n" for k, v in headers.items())
    request = f"HEAD {path} HTTP/1.1\r\nHost: {host}:{port}\r\n{extra}\r\n".encode()
    latencies: list[int] = []
    statuses: dict[int, int] = {}
    failed = [0]
    clock = time.perf_counter_ns

    async def main() -> None:
        loop = asyncio.get_running_loop()
        done = loop.create_future()
        open_conns = [0]
        end = [0]

        class Head(asyncio.Protocol):
            def connection_made(self, transport: Any) -> None:
                self.transport = transport
                self.buf = b""
                self.t0 = 0
                self.finished = False

            def send(self) -> None:
                self.t0 = clock()
                self.transport.write(request)

            def data_received(self, data: bytes) -> None:
                self.buf += data
                while (i := self.buf.find(b"\r\n\r\n")) >= 0:
                    now = clock()
                    status = int(self.buf[9:12])
                    self.buf = self.buf[i + 4 :]
                    if now > end[0]:
                        self.close()
                        return
                    latencies.append(now - self.t0)
                    statuses[status] = statuses.get(status, 0) + 1
                    self.send()

            def close(self) -> None:
                if not self.finished:
                    self.finished = True
                    self.transport.close()
                    open_conns[0] -= 1
                    if not open_conns[0] and not done.done():
                        done.set_result(None)

            def connection_lost(self, exc: Exception | None) -> None:
                if not self.finished:
                    failed[0] += 1
                    self.close()

        protos = []
        for _ in range(conns):
            _, proto = await loop.create_connection(Head, host, port)
            protos.append(proto)
        open_conns[0] = len(protos)
        end[0] = clock() + int(duration * 1e9)
        for p in protos:
            p.send()
        await asyncio.wait_for(done, duration + 30)

    loop = new_loop()
    try:
        loop.run_until_complete(main())
    finally:
        loop.close()
    return latencies, statuses, failed[0]


def head_load(
    url: str, path: str, headers: dict[str, str], connections: int, duration: float
) -> RateResult:
    host, _, port = url.removeprefix("http://").partition(":")
    per = [connections // HEAD_PROCS + (i < connections % HEAD_PROCS) for i in range(HEAD_PROCS)]
    jobs = [(host, int(port), path, headers, n, duration) for n in per if n]
    with multiprocessing.get_context("fork").Pool(len(jobs)) as pool:
        results = pool.map(_head_worker, jobs)
    lat = sorted(x for r in results for x in r[0])
    statuses: dict[int, int] = {}
    for r in results:
        for k, v in r[1].items():
            statuses[k] = statuses.get(k, 0) + v
    failed = sum(r[2] for r in results)
    if not lat:
        raise BenchError(f"HEAD {path}: no answer in {duration} s")
    bad = sum(v for k, v in statuses.items() if not 200 <= k < 400)
    errors = []
    if bad:
        errors.append(f"{bad} non-2xx/3xx answers {statuses}")
    if failed:
        errors.append(f"{failed} connections lost")
    n = len(lat)
    return RateResult(
        rps=n / duration,
        requests=n,
        p50_ms=lat[n // 2] / 1e6,
        p99_ms=lat[min(n - 1, int(n * 0.99))] / 1e6,
        errors=(", ".join(errors) + f" of {n} requests") if errors else "",
    )


def wrk_get(
    url: str, path: str, headers: dict[str, str], connections: int, duration: float
) -> RateResult:
    w = run_wrk(
        url + path,
        threads=WRK_THREADS,
        connections=connections,
        duration=duration,
        headers=headers,
    )
    return RateResult(
        rps=w.rps,
        requests=w.requests,
        p50_ms=w.latency_ms[50],
        p99_ms=w.latency_ms[99],
        errors="" if not w.errors else w.describe_errors(),
    )


# --------------------------------------------------------------------------- the run


@dataclass
class Sample:
    """One operation on one server in one round."""

    rate: float  # MB/s or requests/s
    p50: float  # blob: median client seconds; manifests: ms; skopeo: -
    p99: float  # blob and skopeo: wall seconds; manifests: ms
    cpu_per_unit: float  # s per GiB served or per 10k requests
    rss_worker_kib: int  # peak VmHWM among the worker processes
    rss_other_kib: int  # peak of the other role (bastion parent, nginx master)
    client_cpu: float = 0.0
    spread: tuple[float, float] = (0.0, 0.0)  # fastest, slowest client (blob GETs)


@dataclass
class OpStats:
    samples: list[Sample | None] = field(default_factory=list)  # per round; None: failed
    errors: list[str] = field(default_factory=list)

    def ok(self) -> list[Sample]:
        return [s for s in self.samples if s is not None]

    def med(self, attr: str) -> float | None:
        return median([getattr(s, attr) for s in self.ok()])

    def peak(self, attr: str) -> int | None:
        values = [getattr(s, attr) for s in self.ok()]
        return max(values) if values else None


@dataclass
class Op:
    key: str
    label: str
    kind: str  # blob | manifest | pull
    servers: tuple[str, ...]
    run: Callable[[Server], tuple[float, float, float, float, Any]]
    # -> rate, p50, p99, units of work (GiB or 10k requests), extra


@dataclass
class Run:
    ops: dict[tuple[str, str], OpStats] = field(default_factory=dict)
    labels: dict[str, str] = field(default_factory=dict)
    errors: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    idle: dict[str, dict[str, int]] = field(default_factory=dict)
    after: dict[str, dict[str, int]] = field(default_factory=dict)

    def stats(self, op: str, server: str) -> OpStats:
        return self.ops.setdefault((op, server), OpStats())


def split_roles(server: Server, m: Measurement) -> tuple[int, int]:
    worker = m.peak_kib.get("worker", m.peak_kib.get("process", 0))
    other = max((v for k, v in m.peak_kib.items() if k not in ("worker", "process")), default=0)
    return worker, other


def measure_op(run: Run, op: Op, server: Server, name: str, r: int) -> None:
    stats = run.stats(op.key, name)
    os.sync()  # one server's dirty pages (skopeo output) are not written during another's turn
    err = ""
    result: tuple[float, float, float, float, Any] | None = None
    with server.measure() as m:
        try:
            result = op.run(server)
        except Exception as e:  # a failed round is reported, the others still run
            err = f"{server.label}: {op.label}: {e if isinstance(e, BenchError) else repr(e)}"
    try:
        if isinstance(server, BastionServer):
            server.check_workers()
        else:
            server.check_alive()
    except BenchError as e:
        err = f"{err}\n{e}" if err else str(e)
    if result is not None and not err:
        rate, p50, p99, units, extra = result
        if isinstance(extra, RateResult) and extra.errors:
            err = f"{server.label}: {op.label}: {extra.errors}"
    what = f"round {r + 1} {op.label:<24} {name:<12}"
    if err or result is None:
        tail = server.log_tail(8).replace("\n", "\n    | ")
        stats.errors.append(f"round {r + 1}: {err}\n    {server.name} log tail:\n    | {tail}")
        stats.samples.append(None)
        log(f"{what} FAILED: {err}")
        return
    rate, p50, p99, units, extra = result
    worker, other = split_roles(server, m)
    sample = Sample(rate, p50, p99, m.cpu_total_s / units, worker, other)
    if isinstance(extra, BlobResult):
        sample.client_cpu = extra.client_cpu / units
        sample.spread = (extra.client_times[0], extra.client_times[-1])
    stats.samples.append(sample)
    unit = {"blob": "MB/s", "manifest": "req/s", "pull": "MB/s"}[op.kind]
    lat = f"p50 {p50:.2f} ms p99 {p99:.2f} ms" if op.kind == "manifest" else f"wall {p99:.2f} s"
    log(
        f"{what} {rate:9.0f} {unit}  {lat}  server cpu {m.cpu_total_s:.2f} s"
        f"  peak RSS/worker {worker / 1024:.0f} MiB"
    )


#: Every blob GET measurement moves at least this many layers: fewer than this many clients
#: each GET the layer several times in a row. A single 1 GiB GET takes ~0.5 s here, and alone
#: it gave bastion/nginx ratios of 0.84-1.38 between the rounds of one run.
MIN_LAYERS_MOVED = 4


def _gets_each(clients: int) -> int:
    return -(-MIN_LAYERS_MOVED // clients)


def make_ops(
    args: argparse.Namespace, big: Image, small: Image, skopeo: Skopeo | None, tmp: Path
) -> list[Op]:
    layer_digest, size = big.blobs[1][0], big.sizes[1]
    blob_path = f"/v2/{BIG_REPO}/blobs/{layer_digest}"
    accept = {"Accept": MANIFEST_TYPE}
    ops: list[Op] = []

    def blob_op(n: int) -> Callable[[Server], tuple[float, float, float, float, Any]]:
        def go(s: Server) -> tuple[float, float, float, float, Any]:
            repeat = _gets_each(n)
            res = blob_get(s.url, blob_path, size, n, repeat)
            total = n * repeat * size
            return (
                total / res.wall / 1e6,
                median(res.client_times) or 0.0,
                res.wall,
                total / GiB,
                res,
            )

        return go

    for n in args.clients:
        ops.append(Op(f"blob{n}", f"blob GET x{n}", "blob", SERVERS, blob_op(n)))

    def manifest_op(
        path: str, head: bool
    ) -> Callable[[Server], tuple[float, float, float, float, Any]]:
        def go(s: Server) -> tuple[float, float, float, float, Any]:
            f = head_load if head else wrk_get
            res = f(s.url, path, accept, args.connections, args.duration)
            return res.rps, res.p50_ms, res.p99_ms, res.requests / 1e4, res

        return go

    by_digest = f"/v2/{SMALL_REPO}/manifests/{small.digest}"
    by_tag = f"/v2/{SMALL_REPO}/manifests/{small.tag}"
    ops.append(
        Op("mdigest", "manifest GET by digest", "manifest", SERVERS, manifest_op(by_digest, False))
    )
    ops.append(Op("mtag", "manifest GET by tag", "manifest", SERVERS, manifest_op(by_tag, False)))
    ops.append(
        Op("mhead", "manifest HEAD by digest", "manifest", SERVERS, manifest_op(by_digest, True))
    )

    if skopeo is not None:
        image_size = big.size
        out = tmp / "pulled"

        def pull(s: Server) -> tuple[float, float, float, float, Any]:
            shutil.rmtree(out, ignore_errors=True)
            try:
                host = s.url.removeprefix("http://")
                r = skopeo.copy(f"docker://{host}/{big.repo}:{big.tag}", f"dir:{out}", timeout=900)
                if not r.ok:
                    raise BenchError(r.describe())
                got = {p.name for p in out.iterdir()}
                missing = [d for d, _ in big.blobs if d.partition(":")[2] not in got]
                if missing or "manifest.json" not in got:
                    raise BenchError(f"skopeo wrote no file for {missing or 'the manifest'}")
            finally:
                shutil.rmtree(out, ignore_errors=True)
            return image_size / r.elapsed / 1e6, 0.0, r.elapsed, image_size / GiB, r

        ops.append(Op("pull", "skopeo pull big:1", "pull", ("bastion", "distribution"), pull))
    return ops


def code_state() -> str:
    """The bastion code the servers were started from: commit and uncommitted files."""
    try:
        head = subprocess.run(
            ["git", "-C", str(REPO_ROOT), "log", "-1", "--format=%h %cd", "--date=format:%H:%M"],
            capture_output=True,
            text=True,
            timeout=10,
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "-C", str(REPO_ROOT), "status", "--porcelain", "--", "server", "storage"],
            capture_output=True,
            text=True,
            timeout=10,
        ).stdout.split("\n")
        files = sorted({line[3:] for line in dirty if line.strip()})
    except (OSError, subprocess.SubprocessError):
        return "?"
    return head + (f" + uncommitted: {', '.join(files)}" if files else " (clean)")


# --------------------------------------------------------------------------- report


def report(
    run: Run, args: argparse.Namespace, ops: list[Op], big: Image, small: Image
) -> tuple[str, bool]:
    layer_size = big.sizes[1]
    header = [
        ["operation"] + ["rate", "p50", "p99", "cpu", "MiB/w"] * 3 + ["rate", "p99", "rate", "p99"]
    ]
    groups = [
        (1, run.labels.get("bastion", "bastion")),
        (6, run.labels.get("distribution", "distribution")),
        (11, run.labels.get("nginx", "nginx")),
        (16, "b/nginx"),
        (18, "b/distr."),
    ]
    rows: list[Any] = []
    sections = {
        "blob": (
            f"-- blob GET, every client the whole {layer_size / MiB:.1f} MiB layer"
            f" (x1: {_gets_each(1)} times in a row): MB/s of all clients | median client s"
            " (x1: per GET) | wall s | server cpu s/GiB"
        ),
        "manifest": (
            f"-- manifest {len(small.manifest)} B, {args.connections} connections"
            f" {args.duration:g} s: requests/s | p50 ms | p99 ms | server cpu s/10k requests"
        ),
        "pull": (
            f"-- skopeo copy docker:// -> dir:, big:1 {big.size / MiB:.1f} MiB: MB/s | | wall s"
            " | server cpu s/GiB"
        ),
    }
    shown: set[str] = set()

    def pair(a: OpStats, b: OpStats, attr: str) -> float | None:
        xs = [
            (getattr(x, attr), getattr(y, attr))
            for x, y in zip(a.samples, b.samples, strict=False)
            if x is not None and y is not None
        ]
        return paired_ratio([x for x, _ in xs], [y for _, y in xs])

    for op in ops:
        if op.kind not in shown:
            shown.add(op.kind)
            rows.append((sections[op.kind],))
        cells: list[Any] = [op.label + (" *" if op.key == "mhead" else "")]
        for name in ("bastion", "distribution", "nginx"):
            st = run.stats(op.key, name)
            if name not in op.servers:
                cells += ["", "", "", "", ""]
                continue
            bang = "!" if st.errors else ""
            if op.kind == "manifest":
                p50, p99 = fmt_num(st.med("p50")), fmt_num(st.med("p99"))
            elif op.kind == "blob":
                p50, p99 = fmt_num(st.med("p50")), fmt_num(st.med("p99"))
            else:
                p50, p99 = "", fmt_num(st.med("p99"))
            rss = st.peak("rss_worker_kib")
            cells += [
                fmt_num(st.med("rate"), 0) + bang,
                p50,
                p99,
                fmt_num(st.med("cpu_per_unit")),
                "-" if rss is None else f"{rss / 1024:.0f}",
            ]
        b = run.stats(op.key, "bastion")
        for peer in ("nginx", "distribution"):
            if peer not in op.servers:
                cells += ["", ""]
                continue
            p = run.stats(op.key, peer)
            cells.append(fmt_ratio(pair(b, p, "rate")))
            cells.append(fmt_ratio(pair(b, p, "p99")) if op.kind == "manifest" else "")
        rows.append(cells)
    table = render_table(header, rows, left=1, separators=(1, 6, 11, 16, 18), groups=groups)

    notes = [
        "",
        f"{args.rounds} round(s); each cell is the median over rounds; ratios are the median over"
        " rounds of bastion_i / peer_i (b/nginx, b/distr.), measured back to back",
        "(order distribution, bastion, nginx, reversed every other round). rate ratio > 1: bastion"
        " faster; p99 ratio < 1: bastion's tail shorter.",
        "MiB/w = peak RSS per worker process (VmHWM reset before each operation), max over rounds:"
        " bastion and nginx workers, distribution's single process.",
        f"manifest GETs: wrk -t{WRK_THREADS} -c{args.connections} -d{args.duration:g}s --latency"
        f" --timeout=10s -H 'Accept: {MANIFEST_TYPE}'.",
        f"* HEAD: wrk 4.x cannot measure HEAD (its parser waits for the body Content-Length"
        f" announces), so a uvloop load generator ({HEAD_PROCS} processes, {args.connections}"
        " connections)",
        "  does it; it costs more client CPU than wrk: compare that row across servers, not with"
        " the GET rows.",
        "blob GETs: this process's threads on raw sockets, 256 KiB receive buffer, body discarded;"
        " clients and servers share the machine's CPUs.",
    ]
    client_cpu = [
        (name, run.stats(f"blob{n}", name).med("client_cpu"))
        for n in args.clients[-1:]
        for name in SERVERS
    ]
    notes.append(
        f"client CPU at {args.clients[-1]} clients, s per GiB: "
        + ", ".join(f"{n} {fmt_num(v)}" for n, v in client_cpu)
    )
    notes.append(
        "reference, distribution/nginx blob rate (paired): "
        + ", ".join(
            f"x{n} "
            + fmt_ratio(
                pair(run.stats(f"blob{n}", "distribution"), run.stats(f"blob{n}", "nginx"), "rate")
            )
            for n in args.clients
        )
    )
    for n in args.clients:
        if n < 2:
            continue
        parts = []
        for name in SERVERS:
            ok = run.stats(f"blob{n}", name).ok()
            if ok:
                fast = median([s.spread[0] for s in ok]) or 0.0
                slow = median([s.spread[1] for s in ok]) or 0.0
                parts.append(f"{name} {fast:.2f}-{slow:.2f} s")
        notes.append(f"blob GET x{n}: fastest-slowest client: " + ", ".join(parts))
    for name, role in (("bastion", "parent"), ("nginx", "master")):
        values = [s.rss_other_kib for op in ops for s in run.stats(op.key, name).ok()]
        if values:
            notes.append(f"{name} {role} peak RSS: {max(values) / 1024:.0f} MiB")
    for name in SERVERS:
        i, a = run.idle.get(name, {}), run.after.get(name, {})
        if i:
            notes.append(
                f"idle RSS {name}: "
                + ", ".join(f"{role} {kib / 1024:.0f}" for role, kib in i.items())
                + " MiB at start; "
                + ", ".join(f"{role} {kib / 1024:.0f}" for role, kib in a.items())
                + " MiB at end"
            )
    notes += run.notes
    if not hwm_reset_supported():
        notes.append("NOTE: VmHWM could not be reset; peaks are since server start.")

    # --- issue 7 targets
    def ratio(op: str, peer: str, attr: str) -> float | None:
        return pair(run.stats(op, "bastion"), run.stats(op, peer), attr)

    def verdict(value: float | None, ok: Callable[[float], bool]) -> str:
        if value is None:
            return "not measured (failed)"
        return f"{fmt_ratio(value)} -> {'met' if ok(value) else 'NOT met'}"

    notes += ["", "issue 7 targets (this run):"]
    for n in args.clients:
        r = ratio(f"blob{n}", "nginx", "rate")
        notes.append(
            f"  Blob GET >= 0.9x nginx, {n} client{'s' if n > 1 else ''}: "
            + verdict(r, lambda x: x >= 0.9)
        )
    for key, what in (("mdigest", "by digest"), ("mtag", "by tag")):
        rr = ratio(key, "distribution", "rate")
        rp = ratio(key, "distribution", "p99")
        notes.append(
            f"  Manifest GET {what}: >= 5x distribution's requests/s: "
            + verdict(rr, lambda x: x >= 5)
            + "; p99 <= 0.2x distribution's: "
            + verdict(rp, lambda x: x <= 0.2)
        )
    pulls = [
        s.rss_worker_kib
        for op in ops
        if op.kind in ("blob", "pull")
        for s in run.stats(op.key, "bastion").ok()
    ]
    if pulls:
        peak = max(pulls) / 1024
        notes.append(
            f"  Peak RSS per worker <= 150 MiB, pulls ({fmt_size(layer_size - layer_size % MiB)}"
            f" layer): {peak:.0f} MiB -> {'met' if peak <= 150 else 'NOT met'}"
            " (pushes and flatness in blob size: bench/blob_rss.py)"
        )
    notes.append(
        "  Push 256 MiB >= 1.2x distribution, chunked within 10% of monolithic: not measured"
        " here, see bench/blob_rss.py"
    )
    notes.append(
        "  Pull-through stampede (1 upstream fetch, <= 0.5x distribution proxy) and cold pull"
        " <= 1.1x direct: not measured here, see bench/pullthrough.py"
    )

    errors = [e for st in run.ops.values() for e in st.errors] + run.errors
    if errors:
        notes += ["", f"ERRORS ({len(errors)}):"]
        notes += ["  " + e.replace("\n", "\n    ") for e in errors]
    notes.append(f"benchmark process peak RSS: {own_peak_rss_kib() / 1024:.0f} MiB")
    return table + "\n" + "\n".join(notes), bool(errors)


# --------------------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    p.add_argument("--rounds", type=int, default=5, help="rounds (default 5)")
    p.add_argument("--blob-size", default="1GiB", help="payload of the big layer (default 1GiB)")
    p.add_argument(
        "--clients", default="1,8,32", help="concurrent blob GETs, comma-separated (default 1,8,32)"
    )
    p.add_argument(
        "--duration", type=float, default=5.0, help="seconds per manifest measurement (default 5)"
    )
    p.add_argument("--connections", type=int, default=64, help="manifest connections (default 64)")
    p.add_argument(
        "--workers",
        type=int,
        default=os.cpu_count() or 2,
        help="bastion --workers and nginx worker_processes (default: one per CPU)",
    )
    p.add_argument("--seed", type=int, default=1, help="seed of the content (default 1)")
    p.add_argument("--tmp", default="/tmp", help="where the temporary directory goes")
    args = p.parse_args(argv)
    try:
        blob_size = parse_size(args.blob_size)
        args.clients = sorted({int(x) for x in args.clients.split(",") if x.strip()})
    except ValueError as e:
        p.error(str(e))
    if args.rounds < 1 or blob_size < 1 or not args.clients or min(args.clients) < 1:
        p.error("need --rounds >= 1, a positive --blob-size and --clients >= 1")
    try:
        require("docker-registry")
        require("wrk")
        bastion_executable()
        if not (shutil.which("nginx") or os.access("/usr/sbin/nginx", os.X_OK)):
            raise Skip("nginx is not installed (Debian: nginx-light)")
    except Skip as e:
        print(f"serving: skipped: {e}", file=sys.stderr)
        return 77
    have_skopeo = shutil.which("skopeo") is not None
    # nginx's tree + bastion's and distribution's stores (+ upload temp) + a skopeo copy
    need = blob_size * 5 * 1.1
    free = shutil.disk_usage(args.tmp).free
    if free < need:
        print(f"serving: {args.tmp} has {free / GiB:.1f} GiB free, needs {need / GiB:.1f}")
        return 1
    hwm_reset_supported()
    started = datetime.datetime.now(datetime.UTC)
    t0 = time.monotonic()
    run = Run()
    code_before = code_state()
    with tmpdir(prefix="bastion-bench-serving-", base=args.tmp) as tmp, ExitStack() as stack:
        tree = tmp / "nginx-root"
        log(f"writing the image set ({fmt_size(blob_size)} layer) into {tree}")
        big = _write_image(tree, BIG_REPO, (blob_size,), f"{args.seed}")
        small = _write_image(tree, SMALL_REPO, SMALL_LAYERS, f"{args.seed}")
        layer_digest, layer_size = big.blobs[1][0], big.sizes[1]
        servers: dict[str, Server] = {
            "bastion": BastionServer(tmp / "bastion", workers=args.workers),
            "distribution": DistributionServer(tmp / "distribution"),
            "nginx": NginxServer(tmp / "nginx", tree, workers=args.workers),
        }
        for name, s in servers.items():
            stack.enter_context(s)
            run.labels[name] = s.label
        run.labels["bastion"] = f"bastion --workers {args.workers}"
        run.labels["nginx"] += " sendfile"
        for name in ("bastion", "distribution"):
            took = seed_registry(servers[name], [big, small])
            log(f"seeded {name} through its API in {took:.1f} s ({big.size / took / 1e6:.0f} MB/s)")
        for name, s in servers.items():
            what = verify(s, name, [big, small], (layer_digest, layer_size))
            run.notes.append(f"verified {name}: {what}")
            run.idle[name] = s.current_rss_kib()
        skopeo = Skopeo(tmp / "skopeo") if have_skopeo else None
        if skopeo is None:
            run.notes.append("skopeo is not installed: no pull row")
        ops = make_ops(args, big, small, skopeo, tmp)
        # Warm-up, untimed: one second of each manifest GET per server (caches, lazy imports).
        for s in servers.values():
            for path in (
                f"/v2/{SMALL_REPO}/manifests/{small.digest}",
                f"/v2/{SMALL_REPO}/manifests/{TAG}",
            ):
                run_wrk(
                    s.url + path,
                    connections=args.connections,
                    duration=1,
                    headers={"Accept": MANIFEST_TYPE},
                )
        log(f"bastion code: {code_before}")
        for r in range(args.rounds):
            order = BASE_ORDER if r % 2 == 0 else BASE_ORDER[::-1]
            for op in ops:
                for name in order:
                    if name in op.servers:
                        measure_op(run, op, servers[name], name, r)
        for name, s in servers.items():
            run.after[name] = s.current_rss_kib()
        for s in servers.values():
            code = s.stop()
            if code not in (0, -15, 2, 130, 143):
                run.errors.append(
                    f"{s.label}: exit status {code} on SIGTERM; log tail:\n{s.log_tail()}"
                )
    ended = datetime.datetime.now(datetime.UTC)
    code_after = code_state()
    run.notes.append(
        f"measured {started:%Y-%m-%d %H:%M:%S}-{ended:%H:%M:%S} UTC; bastion code at start: {code_before}"
    )
    if code_after != code_before:
        run.notes.append(
            f"bastion code changed during the run (now: {code_after}); the server kept the code it"
            " started with"
        )
    print()
    print(
        f"serving: {fmt_size(blob_size)} layer, {os.cpu_count()} CPUs, "
        f"{time.monotonic() - t0:.0f} s total"
        + (f", skopeo {skopeo.version()}" if skopeo is not None else "")
    )
    text, failed = report(run, args, ops, big, small)
    print(text)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
