"""Pull-through cache: bastion (serve --workers 2, upstreams: quay.io) vs CNCF distribution in
proxy mode, both in front of the same token-auth upstream, plus direct pulls from the upstream.

The upstream is CNCF distribution 2.8 behind an RS256 token service (``tests.upstream``), seeded
once with a deterministic image set:

  app:1       Docker schema2 image: one --layer-size layer (default 256 MiB payload) and three
              small layers (1 MiB, 256 KiB, 16 KiB), all valid gzip tars
  small:1     three small layers only (latency, not bandwidth)
  stampede    one --stampede-size blob (default 1 GiB, issue 7's setting) that no cache has seen

Every round starts both caches fresh (new processes, empty stores) and runs, each peer back to
back and in a rotating order:

  cold pull   skopeo copy docker://<peer>/<image> dir:<tmp> (nothing cached yet)
  warm pull   the same again
  stampede    --clients (20) concurrent GETs of the cold blob; wall time until all are done;
              also from nginx over a copy of the blob's bytes (nothing to fetch): the floor
              this machine sets for those GETs

After each operation the benchmark waits (untimed) until the cache has committed what it
fetched, then reads the upstream's access log: blob GETs (200/206) and their bytes, and other
served requests (manifests, HEADs). A cache should fetch each blob once, also in the stampede.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from common import (
    BastionServer,
    BenchError,
    DistributionProxyServer,
    GiB,
    KiB,
    Measurement,
    MiB,
    NginxServer,
    Server,
    Skip,
    Skopeo,
    TokenUpstream,
    cpu_seconds,
    fmt_num,
    fmt_ratio,
    fmt_size,
    hwm_reset_supported,
    median,
    own_peak_rss_kib,
    paired_ratio,
    parse_size,
    render_table,
    skipped,
    stream_get,
    tmpdir,
    write_layer_file,
    write_random_file,
)

#: Peak RSS a bastion worker may reach (issue 7's bound, flat in blob size).
WORKER_RSS_LIMIT_KIB = 150 * 1024
NAMESPACE = "quay.io"  # what bastion's config calls the upstream; clients say /v2/quay.io/...
SMALL_LAYERS = (1 * MiB, 256 * KiB, 16 * KiB)
SETTLE_TIMEOUT = 180.0
PEERS = ("bastion", "proxy", "direct")
FLOOR = "nginx"  # the stampede only


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


# --------------------------------------------------------------------------- the image set


@dataclass
class ImageSpec:
    repo: str
    tag: str
    digest: str
    blobs: list[tuple[str, int]]  # config and layers: (digest, size)

    @property
    def size(self) -> int:
        return sum(s for _, s in self.blobs)


def _push_image(
    up: TokenUpstream, repo: str, tag: str, layers: list[tuple[str, int, str]], label: str
) -> ImageSpec:
    """Push a Docker schema2 manifest (and its config) over layers already in ``repo``:
    (digest, size, diff_id) each."""
    config = {
        "architecture": "amd64",
        "os": "linux",
        "created": "2024-01-01T00:00:00Z",
        "config": {"Labels": {"io.bastion.bench": label}},
        "rootfs": {"type": "layers", "diff_ids": [d for _, _, d in layers]},
        "history": [{"created": "2024-01-01T00:00:00Z"} for _ in layers],
    }
    config_bytes = (json.dumps(config, indent=2) + "\n").encode()
    config_digest = up.push_blob(repo, config_bytes)
    doc = {
        "schemaVersion": 2,
        "mediaType": "application/vnd.docker.distribution.manifest.v2+json",
        "config": {
            "mediaType": "application/vnd.docker.container.image.v1+json",
            "digest": config_digest,
            "size": len(config_bytes),
        },
        "layers": [
            {
                "mediaType": "application/vnd.docker.image.rootfs.diff.tar.gzip",
                "digest": d,
                "size": s,
            }
            for d, s, _ in layers
        ],
    }
    manifest = (json.dumps(doc, indent=3) + "\n").encode()
    digest = up.push_manifest(repo, tag, manifest, doc["mediaType"])
    blobs = [(config_digest, len(config_bytes)), *((d, s) for d, s, _ in layers)]
    return ImageSpec(repo, tag, digest, blobs)


def seed_upstream(
    up: TokenUpstream,
    tmp: Path,
    layer_size: int,
    stampede_size: int,
    seed: int,
    docroot: Path | None = None,
) -> tuple[dict[str, ImageSpec], tuple[str, str, int]]:
    """Push app:1, small:1 and the stampede blob. Returns the images by name and
    (repo, digest, size) of the stampede blob. With ``docroot``, the stampede blob's bytes
    are kept there at its ``/v2/<repo>/blobs/<digest>`` path, for nginx."""
    images: dict[str, ImageSpec] = {}
    for name, sizes in (("app", (layer_size, *SMALL_LAYERS)), ("small", SMALL_LAYERS)):
        repo = f"bench/{name}"
        layers = []
        for i, size in enumerate(sizes):
            path = tmp / f"seed-{name}-{i}.tar.gz"
            lf = write_layer_file(path, size, f"{seed}/{name}/{i}/{size}", f"{name}-{i}.bin")
            up.push_blob_file(repo, path, lf.digest)
            path.unlink()
            layers.append((lf.digest, lf.size, lf.diff_id))
        images[name] = _push_image(up, repo, "1", layers, f"{seed}/{name}")
    path = tmp / "seed-stampede"
    digest = write_random_file(path, stampede_size, f"{seed}/stampede/{stampede_size}")
    up.push_blob_file("bench/stampede", path, digest)
    if docroot is None:
        path.unlink()
    else:
        kept = docroot / "v2" / "bench" / "stampede" / "blobs" / digest
        kept.parent.mkdir(parents=True, exist_ok=True)
        path.rename(kept)
    return images, ("bench/stampede", digest, stampede_size)


# --------------------------------------------------------------------------- peers


class Bastion(BastionServer):
    """Each worker its own role, so that the footprint is the sum over processes."""

    def roles(self) -> dict[str, list[int]]:
        from common import children

        kids = children(self.pid)
        return {**{f"worker{i}": [p] for i, p in enumerate(kids)}, "parent": [self.pid]}


@dataclass
class Peer:
    name: str  # bastion | proxy | direct
    label: str
    host: str  # host:port clients talk to
    prefix: str  # repository prefix ("quay.io/" for bastion)
    server: Server | None = None
    blob_file: Callable[[str], Path] | None = None  # where a committed blob lands
    creds: tuple[str, str] | None = None  # for skopeo (direct only)
    headers: dict[str, str] = field(default_factory=dict)  # for raw GETs (direct only)

    def ref(self, image: ImageSpec) -> str:
        return f"docker://{self.host}/{self.prefix}{image.repo}:{image.tag}"

    def blob_path(self, repo: str, digest: str) -> str:
        return f"/v2/{self.prefix}{repo}/blobs/{digest}"

    def settle(self, digests: list[str]) -> str | None:
        """Wait until every blob is committed in the cache; an error text if not in time."""
        if self.blob_file is None:
            return None
        deadline = time.monotonic() + SETTLE_TIMEOUT
        for d in digests:
            while not self.blob_file(d).exists():
                if self.server is not None:
                    self.server.check_alive()
                if time.monotonic() > deadline:
                    return f"{self.label}: blob {d} not in its store {SETTLE_TIMEOUT:.0f}s after the client finished"
                time.sleep(0.02)
        return None

    @contextmanager
    def measure(self) -> Iterator[Measurement]:
        if self.server is None:
            yield Measurement(per_block=False)
        else:
            with self.server.measure() as m:
                yield m


def _bastion_blob(root: Path) -> Callable[[str], Path]:
    def path(digest: str) -> Path:
        alg, _, hex_ = digest.partition(":")
        return root / "blobs" / alg / hex_[:2] / hex_

    return path


def _distribution_blob(root: Path) -> Callable[[str], Path]:
    def path(digest: str) -> Path:
        alg, _, hex_ = digest.partition(":")
        return root / "docker" / "registry" / "v2" / "blobs" / alg / hex_[:2] / hex_ / "data"

    return path


# --------------------------------------------------------------------------- operations


@dataclass
class OpStats:
    times: list[float | None] = field(default_factory=list)  # per round; None: failed
    blob_gets: list[int] = field(default_factory=list)
    other: list[int] = field(default_factory=list)
    up_bytes: list[int] = field(default_factory=list)
    rss_kib: list[int] = field(default_factory=list)
    worker_kib: list[int] = field(default_factory=list)  # bastion: its largest worker's peak
    cpu_s: list[float] = field(default_factory=list)
    up_cpu_s: list[float] = field(default_factory=list)  # the upstream's CPU seconds
    client_cpu_s: list[float] = field(default_factory=list)  # skopeo's CPU seconds (pulls)
    ttfb: list[float] = field(default_factory=list)  # stampede: each client's first byte
    errors: list[str] = field(default_factory=list)

    def ok_times(self) -> list[float]:
        return [t for t in self.times if t is not None]


def traffic(entries: list[Any]) -> tuple[int, int, int]:
    """(blob GETs served, their bytes, other requests served) in access-log entries."""
    gets = size = other = 0
    for e in entries:
        if e.method == "GET" and "/blobs/" in e.path and e.status in (200, 206):
            gets += 1
            size += e.size or 0
        elif e.status < 400 and e.path not in ("/v2/", "/v2"):
            other += 1
    return gets, size, other


def skopeo_pull(
    skopeo: Skopeo, peer: Peer, image: ImageSpec, out: Path, stats: OpStats | None = None
) -> None:
    shutil.rmtree(out, ignore_errors=True)
    try:
        r = skopeo.copy(peer.ref(image), f"dir:{out}", src_creds=peer.creds, timeout=600)
        if stats is not None:
            stats.client_cpu_s.append(r.cpu_s)
        if not r.ok:
            raise BenchError(f"{peer.label}: {r.describe()}")
        got = {p.name for p in out.iterdir()}
        missing = [d for d, _ in image.blobs if d.partition(":")[2] not in got]
        if missing:
            raise BenchError(f"{peer.label}: skopeo wrote no file for {missing}")
    finally:
        shutil.rmtree(out, ignore_errors=True)


def stampede(
    peer: Peer, repo: str, digest: str, size: int, clients: int, ttfb: list[float]
) -> None:
    """``clients`` concurrent GETs of one blob, released together; raises if any failed.
    Client 0 also checks the sha256 (the others count bytes)."""
    barrier = threading.Barrier(clients + 1)
    errors: list[str] = []
    firsts: list[float] = []
    lock = threading.Lock()

    def client(i: int) -> None:
        try:
            barrier.wait()
            _, first = stream_get(
                f"http://{peer.host}",
                peer.blob_path(repo, digest),
                expect_size=size,
                digest=digest if i == 0 else None,
                headers=peer.headers,
            )
            with lock:
                firsts.append(first)
        except Exception as e:
            with lock:
                errors.append(f"client {i}: {type(e).__name__}: {e}")

    threads = [threading.Thread(target=client, args=(i,), daemon=True) for i in range(clients)]
    for t in threads:
        t.start()
    barrier.wait()
    for t in threads:
        t.join()
    ttfb.extend(firsts)
    if errors:
        raise BenchError(
            f"{peer.label}: stampede: {len(errors)} of {clients} GETs failed: "
            + "; ".join(errors[:3])
        )


# --------------------------------------------------------------------------- the run


@dataclass
class Run:
    ops: dict[tuple[str, str], OpStats] = field(default_factory=dict)  # (op, peer)
    labels: dict[str, str] = field(default_factory=dict)
    errors: list[str] = field(default_factory=list)

    def stats(self, op: str, peer: str) -> OpStats:
        return self.ops.setdefault((op, peer), OpStats())


def timed(
    run: Run,
    op: str,
    peer: Peer,
    up: TokenUpstream,
    settle_digests: list[str],
    func: Callable[[OpStats], None],
) -> None:
    stats = run.stats(op, peer.name)
    os.sync()
    up.reset_counts()
    err = ""
    elapsed: float | None = None
    up_cpu0 = cpu_seconds(up.pid) if up.pid else 0.0
    with peer.measure() as m:
        t0 = time.perf_counter()
        try:
            func(stats)
            elapsed = time.perf_counter() - t0
        except (BenchError, OSError) as e:
            err = str(e) if isinstance(e, BenchError) else f"{peer.label}: {op}: {e!r}"
        if not err:
            try:
                err = peer.settle(settle_digests) or ""
            except BenchError as e:
                err = str(e)
    if peer.server is not None:
        try:
            if isinstance(peer.server, BastionServer):
                peer.server.check_workers()
            else:
                peer.server.check_alive()
        except BenchError as e:
            err = f"{err}\n{e}" if err else str(e)
    if up.pid:
        stats.up_cpu_s.append(cpu_seconds(up.pid) - up_cpu0)
    gets, size, other = traffic(up.access_log())
    if err:
        elapsed = None
        if peer.server is not None:
            tail = peer.server.log_tail(8).replace("\n", "\n    | ")
            err += f"\n    {peer.server.name} log tail:\n    | {tail}"
        stats.errors.append(err)
    stats.times.append(elapsed)
    stats.blob_gets.append(gets)
    stats.up_bytes.append(size)
    stats.other.append(other)
    if m.peak_kib:
        stats.rss_kib.append(m.peak_total_kib)
        stats.cpu_s.append(m.cpu_total_s)
        workers = [kib for role, kib in m.peak_kib.items() if role.startswith("worker")]
        stats.worker_kib.append(max(workers, default=0))
    shown = "FAILED" if elapsed is None else f"{elapsed:7.2f} s"
    log(
        f"  {op:<16} {peer.name:<8} {shown}  upstream: {gets} blob GETs "
        f"({size / MiB:.0f} MiB), {other} other"
        + (f"  RSS {m.peak_total_kib / 1024:.0f} MiB" if m.peak_kib else "")
    )
    if err:
        log("    " + err.replace("\n", "\n    "))


def run_round(
    r: int,
    run: Run,
    tmp: Path,
    up: TokenUpstream,
    skopeo: Skopeo,
    images: dict[str, ImageSpec],
    blob: tuple[str, str, int],
    args: argparse.Namespace,
    config_path: Path,
    nginx: NginxServer | None,
) -> None:
    log(f"round {r + 1}/{args.rounds}: fresh caches")
    rdir = tmp / f"round{r}"
    token = up.client.fetch_token(
        up.tokens.realm, up.tokens.service, f"repository:{blob[0]}:pull"
    ).json()["token"]
    with ExitStack() as stack:
        b = Bastion(
            rdir / "bastion", workers=args.workers, extra_args=["--config", str(config_path)]
        )
        d = DistributionProxyServer(rdir / "proxy", up.url, up.credentials)
        stack.enter_context(b)
        stack.enter_context(d)
        peers = {
            "bastion": Peer(
                "bastion",
                b.label,
                f"{b.host}:{b.port}",
                f"{NAMESPACE}/",
                b,
                _bastion_blob(b.root),
            ),
            "proxy": Peer(
                "proxy", d.label, f"{d.host}:{d.port}", "", d, _distribution_blob(d.root)
            ),
            "direct": Peer(
                "direct",
                "direct from the upstream",
                up.host,
                "",
                creds=up.credentials,
                headers={"Authorization": f"Bearer {token}"},
            ),
        }
        for p in peers.values():
            run.labels[p.name] = p.label
        order = [peers[n] for n in PEERS]
        order = order[r % 3 :] + order[: r % 3]
        out = rdir / "pulled"
        for image_name in [n for n in ("app", "small") if n in args.ops]:
            image = images[image_name]
            for phase in ("cold", "warm"):
                op = f"{phase} {image_name}"
                for p in order:
                    timed(
                        run,
                        op,
                        p,
                        up,
                        [dg for dg, _ in image.blobs],
                        lambda st, p=p, image=image: skopeo_pull(skopeo, p, image, out, st),
                    )
        repo, digest, size = blob
        stampeders = [peers[n] for n in PEERS]
        if nginx is not None:
            run.labels[FLOOR] = nginx.label
            stampeders.append(Peer(FLOOR, nginx.label, f"{nginx.host}:{nginx.port}", "", nginx))
        k = r % len(stampeders)
        for p in stampeders[k:] + stampeders[:k] if "stampede" in args.ops else []:
            timed(
                run,
                "stampede",
                p,
                up,
                [digest],
                lambda st, p=p: stampede(p, repo, digest, size, args.clients, st.ttfb),
            )
        for s in (b, d):
            s.stop()
            code = s.proc.returncode if s.proc else None
            if code not in (0, -15, 2, 130, 143):
                run.errors.append(
                    f"{s.label}: exit status {code} on SIGTERM; log tail:\n{s.log_tail()}"
                )
    shutil.rmtree(rdir, ignore_errors=True)


# --------------------------------------------------------------------------- report


def _count(values: list[int]) -> str:
    m = median(values)
    if m is None:
        return "-"
    return f"{m:.0f}" if float(m).is_integer() else f"{m:.1f}"


def report(
    run: Run,
    args: argparse.Namespace,
    images: dict[str, ImageSpec],
    blob: tuple[str, str, int],
    upstream_label: str,
) -> tuple[str, bool]:
    ops = [
        op
        for op in ["cold app", "warm app", "cold small", "warm small", "stampede"]
        if op.split()[-1] in args.ops
    ]
    names = {
        "cold app": f"cold pull app ({images['app'].size / MiB:.0f} MiB)",
        "warm app": "warm pull app",
        "cold small": f"cold pull small ({images['small'].size / MiB:.1f} MiB)",
        "warm small": "warm pull small",
        "stampede": f"stampede {args.clients}x GET {fmt_size(blob[2]).replace(' ', '')}",
    }
    header = [
        [
            "operation",
            "time s",
            "blob GETs",
            "other",
            "up MiB",
            "RSS MiB",
            "time s",
            "blob GETs",
            "other",
            "up MiB",
            "RSS MiB",
            "time s",
            "blob GETs",
            "b/proxy",
            "b/direct",
        ]
    ]
    groups = [
        (1, f"bastion serve --workers {args.workers}"),
        (6, run.labels.get("proxy", "distribution proxy")),
        (11, "direct"),
        (13, "time ratio"),
    ]
    rows: list[list[Any]] = []

    def cell_time(st: OpStats) -> str:
        ok = st.ok_times()
        return fmt_num(median(ok)) + ("!" if st.errors else "")

    def rss(st: OpStats) -> str:
        return "-" if not st.rss_kib else f"{max(st.rss_kib) / 1024:.0f}"

    def mib(st: OpStats) -> str:
        m = median(st.up_bytes)
        return "-" if m is None else f"{m / MiB:.0f}"

    def pair(a: OpStats, b: OpStats) -> float | None:
        xs = [(x, y) for x, y in zip(a.times, b.times, strict=False) if x and y]
        return paired_ratio([x for x, _ in xs], [y for _, y in xs])

    for op in ops:
        b, p, d = run.stats(op, "bastion"), run.stats(op, "proxy"), run.stats(op, "direct")
        rows.append(
            [
                names[op],
                cell_time(b),
                _count(b.blob_gets),
                _count(b.other),
                mib(b),
                rss(b),
                cell_time(p),
                _count(p.blob_gets),
                _count(p.other),
                mib(p),
                rss(p),
                cell_time(d),
                _count(d.blob_gets),
                fmt_ratio(pair(b, p)),
                fmt_ratio(pair(b, d)),
            ]
        )
    table = render_table(header, rows, left=1, separators=(1, 6, 11, 13), groups=groups)

    def cpu(values: list[float]) -> str:
        return fmt_num(median(values))

    cpu_rows: list[list[Any]] = []
    for op in ops:
        b, p, d = run.stats(op, "bastion"), run.stats(op, "proxy"), run.stats(op, "direct")
        cpu_rows.append(
            [
                names[op],
                cpu(b.cpu_s),
                cpu(b.up_cpu_s),
                cpu(b.client_cpu_s),
                cpu(p.cpu_s),
                cpu(p.up_cpu_s),
                cpu(p.client_cpu_s),
                cpu(d.up_cpu_s),
                cpu(d.client_cpu_s),
            ]
        )
    cpu_table = render_table(
        [["CPU seconds", *["server", "upstream", "skopeo"] * 2, "upstream", "skopeo"]],
        cpu_rows,
        left=1,
        separators=(1, 4, 7),
        groups=[(1, "bastion"), (4, "distribution proxy"), (7, "direct")],
    )
    table += "\n\n" + cpu_table

    st_b, st_p, st_d = (run.stats("stampede", n) for n in PEERS)
    notes = [
        "",
        f"{args.rounds} round(s), caches fresh each round; upstream: {upstream_label} behind RS256"
        " token auth.",
        "time s = median wall seconds (pulls: skopeo copy to dir:, whole process; stampede: until"
        " the last GET ended).",
        "blob GETs / up MiB = median over rounds of blob GETs the upstream served (200/206) and"
        " their bytes,",
        "counted from its access log after the cache committed everything (the waiting is not"
        " timed);",
        "other = other upstream requests served (manifest GET/HEAD, blob HEAD; not /v2/, not 401s).",
        "RSS MiB = peak RSS during the operation, max over rounds (bastion: its workers + parent"
        " summed, an upper bound).",
        "ratios: median over rounds of bastion_i / peer_i, measured back to back; < 1: bastion"
        " faster.",
        "direct = skopeo (or the raw GETs) against the upstream itself with the pull credentials"
        " (no cache).",
        "CPU seconds = medians over rounds: the cache's processes (bastion: parent and workers),"
        " the upstream, and skopeo (pulls only).",
    ]
    for name, st in (("bastion", st_b), ("proxy", st_p), ("direct", st_d)):
        if st.blob_gets and st.ttfb:
            ttfb = median(st.ttfb)
            notes.append(
                f"stampede {name}: upstream blob GETs per round {st.blob_gets}; first byte median "
                f"{fmt_num(ttfb)} s, slowest {fmt_num(max(st.ttfb) if st.ttfb else None)} s"
            )
    st_n = run.stats("stampede", FLOOR)
    if st_n.ok_times():
        per_round = [
            f"{b / n:.2f}" for b, n in zip(st_b.times, st_n.times, strict=False) if b and n
        ]
        notes.append(
            f"stampede floor: the same GETs from {run.labels[FLOOR]} over a copy of the blob"
            f" (nothing to fetch): median {fmt_num(median(st_n.ok_times()))} s, first byte"
            f" median {fmt_num(median(st_n.ttfb))} s; bastion / nginx"
            f" {fmt_ratio(pair(st_b, st_n))} (per round {', '.join(per_round)})"
        )
    elif "stampede" in args.ops:
        notes.append("stampede floor: not measured (nginx is not installed)")
    suspicious: list[str] = []
    if any(n > 1 for n in st_b.blob_gets):
        suspicious.append(
            f"bastion fetched the stampede blob {st_b.blob_gets} times from the upstream "
            "(expected 1 per round)"
        )
    for img in [n for n in ("app", "small") if n in args.ops]:
        cold, warm = run.stats(f"cold {img}", "bastion"), run.stats(f"warm {img}", "bastion")
        want = len(images[img].blobs)
        if any(n != want for n in cold.blob_gets):
            suspicious.append(
                f"bastion cold pull of {img}: upstream blob GETs per round {cold.blob_gets}, "
                f"the image has {want} blobs"
            )
        if any(n for n in warm.blob_gets) or any(n for n in warm.other):
            suspicious.append(
                f"bastion warm pull of {img} reached the upstream: blob GETs {warm.blob_gets}, "
                f"other {warm.other}"
            )
    worker_peaks = {
        op: max(st.worker_kib)
        for (op, peer), st in run.ops.items()
        if peer == "bastion" and st.worker_kib
    }
    if worker_peaks:
        op, kib = max(worker_peaks.items(), key=lambda item: item[1])
        notes.append(
            f"bastion peak RSS per worker, max over operations: {kib / 1024:.0f} MiB ({op})"
        )
        if kib > WORKER_RSS_LIMIT_KIB:
            suspicious.append(
                f"a bastion worker peaked at {kib / 1024:.0f} MiB during {op} "
                f"(issue 7: at most {WORKER_RSS_LIMIT_KIB // 1024} MiB, flat in blob size)"
            )
    if suspicious:
        notes.append("")
        notes.append("SUSPICIOUS:")
        notes += [f"  {s}" for s in suspicious]
    errors = [e for st in run.ops.values() for e in st.errors] + run.errors
    if errors:
        notes.append("")
        notes.append(f"ERRORS ({len(errors)}):")
        seen: set[str] = set()
        for e in errors:
            if e not in seen:
                seen.add(e)
                notes.append("  " + e.replace("\n", "\n    "))
    notes.append(f"benchmark process peak RSS: {own_peak_rss_kib() / 1024:.0f} MiB")
    return table + "\n" + "\n".join(notes), bool(errors)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    p.add_argument("--rounds", type=int, default=5, help="rounds (default 5)")
    p.add_argument(
        "--layer-size", default="256MiB", help="payload of app:1's big layer (default 256MiB)"
    )
    p.add_argument(
        "--stampede-size", default="1GiB", help="size of the stampede blob (default 1GiB)"
    )
    p.add_argument("--clients", type=int, default=20, help="stampede GETs at once (default 20)")
    p.add_argument("--workers", type=int, default=2, help="bastion --workers (default 2)")
    p.add_argument("--seed", type=int, default=1, help="seed of the content (default 1)")
    p.add_argument("--tmp", default="/tmp", help="where the temporary directory goes")
    p.add_argument(
        "--ops",
        default="app,small,stampede",
        help="which operations: app (cold and warm pull), small (likewise), stampede; "
        "comma-separated (default all)",
    )
    args = p.parse_args(argv)
    args.ops = [o.strip() for o in args.ops.split(",") if o.strip()]
    unknown = sorted(set(args.ops) - {"app", "small", "stampede"})
    if unknown or not args.ops:
        p.error(f"--ops: unknown {', '.join(unknown) or '(none given)'}")
    try:
        layer_size = parse_size(args.layer_size)
        stampede_size = parse_size(args.stampede_size)
    except ValueError as e:
        p.error(str(e))
    if args.rounds < 1 or args.clients < 1 or layer_size < 1 or stampede_size < 1:
        p.error("need --rounds, --clients and sizes >= 1")
    skip = skipped("pullthrough", "docker-registry", "skopeo")
    if skip is not None:
        return skip
    # upstream copy + per round: two caches + one skopeo output, plus the seed file
    need = (layer_size + stampede_size) * 4 * 1.1 + stampede_size
    free = shutil.disk_usage(args.tmp).free
    if free < need:
        print(f"pullthrough: {args.tmp} has {free / GiB:.1f} GiB free, needs {need / GiB:.1f}")
        return 1
    hwm_reset_supported()
    t0 = time.monotonic()
    run = Run()
    with (
        tmpdir(prefix="bastion-bench-pull-", base=args.tmp) as tmp,
        TokenUpstream(tmp / "upstream") as up,
    ):
        log(f"seeding the upstream ({fmt_size(layer_size)} layer, {fmt_size(stampede_size)} blob)")
        docroot = tmp / "nginx-root"
        images, blob = seed_upstream(up, tmp, layer_size, stampede_size, args.seed, docroot)
        authfile = up.write_authfile(tmp / "pull-secret.json", NAMESPACE)
        config_path = tmp / "bastion.yaml"
        config_path.write_text(
            f"log_level: info\nupstreams:\n  {NAMESPACE}:\n    url: {up.url}\n"
            f"    authfile: {authfile}\n"
        )
        skopeo = Skopeo(tmp / "skopeo")
        with ExitStack() as stack:
            nginx: NginxServer | None = None
            try:
                nginx = NginxServer(tmp / "nginx", docroot, workers=args.workers)
                stack.enter_context(nginx)
            except Skip as e:
                nginx = None
                log(f"stampede floor not measured: {e}")
            for r in range(args.rounds):
                run_round(r, run, tmp, up, skopeo, images, blob, args, config_path, nginx)
        skopeo_label = skopeo.version()
    print()
    print(
        f"pull-through cache, {os.cpu_count()} CPUs, skopeo {skopeo_label}, "
        f"{time.monotonic() - t0:.0f} s total"
    )
    upstream_label = run.labels.get("proxy", "distribution").removesuffix(" proxy")
    text, failed = report(run, args, images, blob, upstream_label)
    print(text)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
