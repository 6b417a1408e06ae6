"""Release mirror: ``bastion mirror release`` vs a loop of ``skopeo copy --all
--preserve-digests`` (release image and every component by digest) into a local CNCF
distribution, both from the same token-auth upstream.

The release is synthetic (``tests.release.build_release``: --components images, default 190,
two of them multi-arch, every image sharing a base layer; --payload-size scales the layers,
default 1 MiB, about 200 MiB in all), built and pushed once to CNCF distribution 2.8 behind an
RS256 token service as ``openshift-release-dev/ocp-release:<tag>`` and
``openshift-release-dev/ocp-v4.0-art-dev@<digest>``, which bastion reaches as ``quay.io``
through its ``upstreams:`` config and a pull secret.

Each round both start from an empty store (bastion: a new --root; skopeo: a new distribution
process with empty storage) and run back to back, the order alternating per round:

  bastion   bastion mirror release quay.io/openshift-release-dev/ocp-release:<tag>
            --config C --root R  (one process: reads the payload, fetches every blob once)
  skopeo    skopeo copy --all --preserve-digests docker://<upstream>/<release>:<tag>
            docker://<local>/<release>:<tag>, then the same for each component by digest,
            --skopeo-jobs at a time (default 1: a plain shell loop); the list of components is
            given (no time is spent reading image-references, which bastion's time includes)

Per round: wall time, the upstream's blob GETs and bytes (its access log), peak RSS of the
mirroring process(es) (wait4), CPU seconds, and the destination registry's peak RSS and CPU.
Afterwards every blob and manifest of the release is checked to be in each store.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import os
import shutil
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from common import (
    BenchError,
    DistributionServer,
    GiB,
    MiB,
    RunResult,
    Skopeo,
    TokenUpstream,
    bastion_executable,
    fmt_num,
    fmt_ratio,
    hwm_reset_supported,
    median,
    own_peak_rss_kib,
    paired_ratio,
    parse_size,
    render_table,
    run_measured,
    skipped,
    tmpdir,
)

NAMESPACE = "quay.io"
VERSION = "4.99.1"
PEERS = ("bastion", "skopeo")


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


# --------------------------------------------------------------------------- results


@dataclass
class PeerStats:
    times: list[float | None] = field(default_factory=list)  # per round; None: failed
    blob_gets: list[int] = field(default_factory=list)
    up_bytes: list[int] = field(default_factory=list)
    manifest_gets: list[int] = field(default_factory=list)
    other: list[int] = field(default_factory=list)
    rss_kib: list[int] = field(default_factory=list)  # mirroring process(es): max
    cpu_s: list[float] = field(default_factory=list)  # mirroring process(es): sum
    dest_rss_kib: list[int] = field(default_factory=list)
    dest_cpu_s: list[float] = field(default_factory=list)
    invocations: list[int] = field(default_factory=list)
    verified: list[str] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)

    def ok_times(self) -> list[float]:
        return [t for t in self.times if t is not None]


def traffic(entries: list[Any]) -> tuple[int, int, int, int]:
    """(blob GETs served, their bytes, manifest GETs served, other requests served)."""
    gets = size = manifests = other = 0
    for e in entries:
        if e.status >= 400 or e.path in ("/v2/", "/v2"):
            continue
        if e.method == "GET" and "/blobs/" in e.path:
            gets += 1
            size += e.size or 0
        elif e.method == "GET" and "/manifests/" in e.path:
            manifests += 1
        else:
            other += 1
    return gets, size, manifests, other


# --------------------------------------------------------------------------- the two ways


def content_digests(release: Any) -> set[str]:
    return set(release.blobs) | {m.digest for m in release.manifests}


def missing_in(files: set[str], release: Any) -> list[str]:
    return sorted(d for d in content_digests(release) if d.partition(":")[2] not in files)


def run_bastion(tmp: Path, rdir: Path, config_path: Path, release: Any, stats: PeerStats) -> float:
    root = rdir / "bastion-root"
    source = f"{NAMESPACE}/{release.release_repo}:{release.release_tag}"
    r = run_measured(
        [
            bastion_executable(),
            "mirror",
            "release",
            source,
            "--config",
            str(config_path),
            "--root",
            str(root),
            "--mirror-host",
            "mirror.bench.invalid:5000",  # no DNS lookup of our own name
        ],
        out_dir=rdir / "logs",
        name="bastion-mirror",
        timeout=1800,
    )
    if not r.ok:
        raise BenchError(f"bastion mirror: {r.describe()}")
    stats.rss_kib.append(r.maxrss_kib)
    stats.cpu_s.append(r.cpu_s)
    stats.invocations.append(1)
    summary = [line for line in r.stdout().splitlines() if line.startswith("Summary:")]
    if summary:
        log(f"    bastion {summary[0]}")
    files = {p.name for p in (root / "blobs" / "sha256").glob("*/*")}
    missing = missing_in(files, release)
    if missing:
        raise BenchError(
            f"bastion mirror: {len(missing)} blobs/manifests missing, e.g. {missing[0]}"
        )
    stats.verified.append("bastion")
    return r.elapsed


def run_skopeo(
    rdir: Path,
    up: TokenUpstream,
    skopeo: Skopeo,
    release: Any,
    jobs: int,
    stats: PeerStats,
) -> float:
    dest = DistributionServer(rdir / "skopeo-dest")
    with dest:
        host = f"{dest.host}:{dest.port}"
        copies = [
            (
                f"docker://{up.host}/{release.release_repo}:{release.release_tag}",
                f"docker://{host}/{release.release_repo}:{release.release_tag}",
            )
        ] + [
            (
                f"docker://{up.host}/{release.component_repo}@{digest}",
                f"docker://{host}/{release.component_repo}@{digest}",
            )
            for digest in release.components.values()
        ]
        results: list[RunResult] = []

        def one(pair: tuple[str, str]) -> RunResult:
            return skopeo.copy(
                pair[0],
                pair[1],
                "--all",
                "--preserve-digests",
                src_creds=up.credentials,
                timeout=600,
            )

        with dest.measure() as m:
            t0 = time.perf_counter()
            if jobs == 1:
                for pair in copies:
                    r = one(pair)
                    results.append(r)
                    if not r.ok:
                        break
            else:
                with concurrent.futures.ThreadPoolExecutor(jobs) as pool:
                    results = list(pool.map(one, copies))
            elapsed = time.perf_counter() - t0
        dest.check_alive()
        failed = [r for r in results if not r.ok]
        if failed:
            raise BenchError(
                f"skopeo loop: {len(failed)} copies failed; first: {failed[0].describe()}"
            )
        stats.rss_kib.append(max(r.maxrss_kib for r in results))
        stats.cpu_s.append(sum(r.cpu_s for r in results))
        stats.dest_rss_kib.append(m.peak_total_kib)
        stats.dest_cpu_s.append(m.cpu_total_s)
        stats.invocations.append(len(results))
    blobs = dest.root / "docker" / "registry" / "v2" / "blobs" / "sha256"
    files = {p.name for p in blobs.glob("*/*")}
    missing = missing_in(files, release)
    if missing:
        raise BenchError(f"skopeo loop: {len(missing)} blobs/manifests missing, e.g. {missing[0]}")
    stats.verified.append("skopeo")
    return elapsed


# --------------------------------------------------------------------------- the run


def run_round(
    r: int,
    tmp: Path,
    up: TokenUpstream,
    skopeo: Skopeo,
    release: Any,
    config_path: Path,
    jobs: int,
    stats: dict[str, PeerStats],
) -> None:
    rdir = tmp / f"round{r}"
    order = list(PEERS) if r % 2 == 0 else list(PEERS)[::-1]
    for name in order:
        st = stats[name]
        os.sync()
        up.reset_counts()
        tokens_before = up.tokens.request_count
        elapsed: float | None = None
        try:
            if name == "bastion":
                elapsed = run_bastion(tmp, rdir, config_path, release, st)
            else:
                elapsed = run_skopeo(rdir, up, skopeo, release, jobs, st)
        except (BenchError, OSError) as e:
            st.errors.append(str(e))
            log(f"  round {r + 1} {name}: FAILED: {e}")
        gets, size, manifests, other = traffic(up.access_log())
        st.times.append(elapsed)
        st.blob_gets.append(gets)
        st.up_bytes.append(size)
        st.manifest_gets.append(manifests)
        st.other.append(other)
        tokens = up.tokens.request_count - tokens_before
        unauthorized = sum(1 for e in up.access_log() if e.status == 401)
        if elapsed is not None:
            log(
                f"  round {r + 1} {name:<8} {elapsed:7.2f} s  upstream: {gets} blob GETs "
                f"({size / MiB:.0f} MiB), {manifests} manifest GETs, {other} other, "
                f"{unauthorized} answered 401, {tokens} token requests; peak RSS {st.rss_kib[-1] / 1024:.0f} MiB, "
                f"cpu {st.cpu_s[-1]:.1f} s"
            )
        shutil.rmtree(rdir / ("bastion-root" if name == "bastion" else "skopeo-dest"), True)
    shutil.rmtree(rdir, ignore_errors=True)


def _count(values: list[int]) -> str:
    m = median(values)
    if m is None:
        return "-"
    return f"{m:.0f}" if float(m).is_integer() else f"{m:.1f}"


def report(
    stats: dict[str, PeerStats], args: argparse.Namespace, release: Any, labels: dict[str, str]
) -> tuple[str, bool]:
    header = [
        [
            "",
            "time s",
            "MB/s",
            "blob GETs",
            "up MiB",
            "mf GETs",
            "other",
            "RSS MiB",
            "cpu s",
            "dest RSS",
            "dest cpu",
        ]
    ]
    rows: list[list[Any]] = []
    total = release.total_bytes
    for name in PEERS:
        st = stats[name]
        t = median(st.ok_times())
        up = median(st.up_bytes)
        rows.append(
            [
                labels[name],
                fmt_num(t) + ("!" if st.errors else ""),
                fmt_num(total / t / 1e6, 0) if t else "-",
                _count(st.blob_gets),
                "-" if up is None else f"{up / MiB:.0f}",
                _count(st.manifest_gets),
                _count(st.other),
                "-" if not st.rss_kib else f"{max(st.rss_kib) / 1024:.0f}",
                fmt_num(median(st.cpu_s), 1),
                "-" if not st.dest_rss_kib else f"{max(st.dest_rss_kib) / 1024:.0f}",
                fmt_num(median(st.dest_cpu_s), 1),
            ]
        )
    b, s = stats["bastion"], stats["skopeo"]
    pairs = [(x, y) for x, y in zip(b.times, s.times, strict=False) if x and y]
    time_ratio = paired_ratio([x for x, _ in pairs], [y for _, y in pairs])
    rss_ratio = (
        max(b.rss_kib) / max(s.rss_kib) if b.rss_kib and s.rss_kib and max(s.rss_kib) else None
    )
    cpu_pairs = [
        (x, y + z) for x, y, z in zip(b.cpu_s, s.cpu_s, s.dest_cpu_s, strict=False) if y + z
    ]
    cpu_ratio = paired_ratio([x for x, _ in cpu_pairs], [y for _, y in cpu_pairs])
    bytes_ratio = (
        median(b.up_bytes) / median(s.up_bytes)  # type: ignore[operator]
        if b.up_bytes and s.up_bytes and median(s.up_bytes)
        else None
    )
    rows.append(("",))
    rows.append(
        [
            "bastion/skopeo",
            fmt_ratio(time_ratio),
            "",
            "",
            fmt_ratio(bytes_ratio),
            "",
            "",
            fmt_ratio(rss_ratio),
            fmt_ratio(cpu_ratio),
            "",
            "",
        ]
    )
    table = render_table(header, rows, left=1, separators=(1, 3, 7, 9))
    notes = [
        "",
        f"release: {release.release_reference}, {len(release.component_images)} components "
        f"({len(release.multi_arch)} multi-arch), {release.manifest_count} manifests, "
        f"{release.blob_count} blobs, {release.total_bytes / MiB:.0f} MiB in all "
        f"(payload size {args.payload_size}).",
        f"{args.rounds} round(s), empty stores each round, bastion and skopeo back to back (order"
        " alternating).",
        "time s = median wall seconds of the whole mirror; MB/s = release bytes / that / 10^6.",
        "blob GETs / up MiB / mf GETs / other = medians of what the upstream served (200/206) per"
        " round, from its access log",
        f"(the release has {release.blob_count} distinct blobs; other = HEADs and the like, not"
        " /v2/ or 401s).",
        "RSS MiB = peak RSS of the mirroring process (wait4 ru_maxrss; skopeo: the largest of its"
        " invocations),",
        "max over rounds; cpu s = median CPU seconds of the mirroring process(es) (skopeo: summed"
        " over invocations).",
        "dest RSS / dest cpu = the local distribution skopeo pushes into (bastion writes its store"
        " itself).",
        "ratios: time = median over rounds of bastion_i / skopeo_i (< 1: bastion faster); up MiB"
        " and RSS: of the medians/maxima;",
        "cpu = bastion / (skopeo + its destination registry).",
        f"skopeo: {_count(s.invocations)} invocations per round, --skopeo-jobs {args.skopeo_jobs}"
        " at a time; the component list is given to it (bastion reads image-references itself).",
    ]
    for name in PEERS:
        st = stats[name]
        notes.append(
            f"verified {name}: every blob and manifest of the release in the store in "
            f"{len(st.verified)} of {args.rounds} round(s)"
        )
    suspicious = []
    if any(n != release.blob_count for n in b.blob_gets):
        suspicious.append(
            f"bastion fetched {b.blob_gets} blobs per round; the release has {release.blob_count}"
        )
    if suspicious:
        notes += ["", "SUSPICIOUS:", *(f"  {x}" for x in suspicious)]
    errors = b.errors + s.errors
    if errors:
        notes += ["", f"ERRORS ({len(errors)}):"]
        notes += ["  " + e.replace("\n", "\n    ") for e in dict.fromkeys(errors)]
    notes.append(f"benchmark process peak RSS: {own_peak_rss_kib() / 1024:.0f} MiB")
    return table + "\n" + "\n".join(notes), bool(errors)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    p.add_argument("--rounds", type=int, default=3, help="rounds (default 3)")
    p.add_argument("--components", type=int, default=190, help="release components (default 190)")
    p.add_argument(
        "--payload-size",
        default="1MiB",
        help="build_release payload_size: app layers 0.5-1.5x, shared layers 2-4x (default 1MiB)",
    )
    p.add_argument(
        "--skopeo-jobs", type=int, default=1, help="skopeo copies at once (default 1: a loop)"
    )
    p.add_argument("--tmp", default="/tmp", help="where the temporary directory goes")
    args = p.parse_args(argv)
    try:
        payload = parse_size(args.payload_size)
    except ValueError as e:
        p.error(str(e))
    if args.rounds < 1 or args.components < 6 or payload < 1 or args.skopeo_jobs < 1:
        p.error("need --rounds >= 1, --components >= 6, --payload-size > 0, --skopeo-jobs >= 1")
    skip = skipped("mirror", "docker-registry", "skopeo")
    if skip is not None:
        return skip
    from tests.release import build_release, push_release

    hwm_reset_supported()
    t0 = time.monotonic()
    log(f"building a release of {args.components} components, payload {args.payload_size} ...")
    release = build_release(VERSION, components=args.components, payload_size=payload)
    need = release.total_bytes * 4 * 1.2
    free = shutil.disk_usage(args.tmp).free
    if free < need:
        print(f"mirror: {args.tmp} has {free / GiB:.1f} GiB free, needs {need / GiB:.1f}")
        return 1
    log(f"  {release.summary()} ({time.monotonic() - t0:.0f} s)")
    stats = {name: PeerStats() for name in PEERS}
    with (
        tmpdir(prefix="bastion-bench-mirror-", base=args.tmp) as tmp,
        TokenUpstream(tmp / "upstream") as up,
    ):
        t1 = time.monotonic()
        pushed = push_release(release, up.client)
        log(
            f"  pushed to the upstream: {pushed.blobs_uploaded} blobs, {pushed.manifests} "
            f"manifests ({time.monotonic() - t1:.0f} s)"
        )
        authfile = up.write_authfile(tmp / "pull-secret.json", NAMESPACE)
        config_path = tmp / "bastion.yaml"
        config_path.write_text(
            f"log_level: info\nupstreams:\n  {NAMESPACE}:\n    url: {up.url}\n"
            f"    authfile: {authfile}\n"
        )
        skopeo = Skopeo(tmp / "skopeo")
        labels = {
            "bastion": "bastion mirror release",
            "skopeo": f"skopeo {skopeo.version()} loop -> {DistributionServer(tmp / 'x').label}",
        }
        shutil.rmtree(tmp / "x", ignore_errors=True)
        for r in range(args.rounds):
            log(f"round {r + 1}/{args.rounds}")
            run_round(r, tmp, up, skopeo, release, config_path, args.skopeo_jobs, stats)
    print()
    print(f"release mirror, {os.cpu_count()} CPUs, {time.monotonic() - t0:.0f} s total")
    text, failed = report(stats, args, release, labels)
    print(text)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
