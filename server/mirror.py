"""Copying images from upstream registries into the store, directly (no HTTP hop to our own
server), with the same upstream client, auth and blob fills as the pull-through cache, so it is
safe while ``bastion serve`` runs on the same root.

Three phases, so that what is visible is always complete and an interrupted run resumes:

1. plan: fetch every manifest tree (manifests already in the store are read locally), and list
   the blobs each needs with their sizes;
2. blobs: fetch the missing ones (each once, however many images share it) with bounded
   concurrency and retries, verified before they become visible;
3. manifests: write each image's manifests, children before lists, then its tags.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import time
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass, field
from typing import Final, TypeVar

from storage import Digest, ManifestUnknown, Store, StoreError
from storage.fill import BlobSource, FillFailed, Fills, SourceMissing
from storage.manifest import parse_manifest

from .config import Config, UpstreamConfig
from .progress import Progress
from .reference import ImageReference
from .upstream import (
    UpstreamClient,
    UpstreamError,
    UpstreamNotFound,
    UpstreamUnavailable,
    UpstreamUnreachable,
)

__all__ = ["Mirror", "MirrorError", "ImageJob", "ManifestNode", "Summary"]

log = logging.getLogger("bastion.mirror")

_ATTEMPTS: Final = 5
_BACKOFF: Final = 1.0
_T = TypeVar("_T")


class MirrorError(Exception):
    """A mirror step failed for good: a line naming the image and the cause, one per failure
    when several steps failed."""


#: Failures listed one per line at most; the rest are counted.
_MAX_LINES: Final = 50


async def _all(steps: Iterable[Awaitable[object]]) -> None:
    """Run every step to its end, so that a failure does not stop the others (a rerun then
    has less to do); then raise the ``MirrorError``s together, one line each, or else the
    first other error."""
    results = await asyncio.gather(*steps, return_exceptions=True)
    failures = [r for r in results if isinstance(r, BaseException)]
    if not failures:
        return
    for failure in failures:
        if not isinstance(failure, MirrorError):
            raise failure
    lines = list(dict.fromkeys(line for f in failures for line in str(f).splitlines()))
    if len(lines) > _MAX_LINES:
        lines[_MAX_LINES:] = [f"... and {len(lines) - _MAX_LINES} more failures"]
    raise MirrorError("\n".join(lines))


@dataclass
class ManifestNode:
    digest: Digest
    body: bytes
    media_type: str
    children: list[ManifestNode] = field(default_factory=list)
    blobs: list[tuple[Digest, int]] = field(default_factory=list)


@dataclass
class ImageJob:
    """Copy ``source`` into repository ``dest`` and point ``tags`` at it."""

    source: ImageReference
    dest: str
    tags: list[str] = field(default_factory=list)
    label: str = ""
    root: ManifestNode | None = None


@dataclass
class Summary:
    images: int = 0
    manifests: int = 0
    blobs_fetched: int = 0
    blobs_present: int = 0
    bytes_fetched: int = 0
    bytes_present: int = 0
    started: float = field(default_factory=time.monotonic)

    def line(self) -> str:
        elapsed = max(time.monotonic() - self.started, 1e-6)
        rate = self.bytes_fetched / elapsed
        return (
            f"{self.images} images, {self.manifests} manifests; blobs: {self.blobs_fetched} fetched "
            f"({_size(self.bytes_fetched)}), {self.blobs_present} already present "
            f"({_size(self.bytes_present)}); {elapsed:.1f}s, {_size(rate)}/s"
        )


def _size(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024:
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024
    return f"{n:.1f} TiB"


def _descriptor_sizes(body: bytes) -> dict[str, int]:
    doc = json.loads(body)
    out: dict[str, int] = {}
    for d in [doc.get("config"), *doc.get("layers", []), *doc.get("manifests", [])]:
        if isinstance(d, dict) and isinstance(d.get("digest"), str):
            out[d["digest"]] = int(d.get("size") or 0)
    return out


class Mirror:
    def __init__(
        self,
        config: Config,
        store: Store,
        *,
        authfile: str | None = None,
        concurrency: int = 8,
        progress: Progress | None = None,
    ) -> None:
        self.config = config
        self.store = store
        self.authfile = authfile
        self.concurrency = max(1, concurrency)
        self.progress = progress or Progress(enabled=False)
        self.summary = Summary()
        self._clients: dict[str, UpstreamClient] = {}
        root = store.driver.local_path("proxy")
        if root is None:
            raise MirrorError("mirroring needs the filesystem store")
        self.fills = Fills(root.rsplit("/", 1)[0])
        self._fetched: set[Digest] = set()  # blobs counted in the summary this run
        self._blob_slots = asyncio.Semaphore(self.concurrency)
        self._manifest_slots = asyncio.Semaphore(self.concurrency * 2)

    # ---- upstreams ---------------------------------------------------------------------------

    def upstream(self, host: str) -> UpstreamClient:
        client = self._clients.get(host)
        if client is None:
            configured = self.config.upstreams.get(host)
            if configured is None:
                configured = UpstreamConfig(host=host, url=f"https://{host}", namespace=host)
            if self.authfile:
                configured = UpstreamConfig(**{**configured.__dict__, "authfile": self.authfile})
            client = self._clients[host] = UpstreamClient(configured)
        return client

    def local_name(self, ref: ImageReference) -> str:
        """Where the pull-through cache keeps ``ref``'s repository: ``<namespace>/<path>``."""
        configured = self.config.upstreams.get(ref.host)
        namespace = configured.namespace if configured and configured.namespace else ref.host
        return f"{namespace}/{ref.repository}"

    async def close(self) -> None:
        await self.fills.close()
        for client in self._clients.values():
            await client.close()

    async def _retry(self, what: str, attempt: Callable[[], Awaitable[_T]]) -> _T:
        delay = _BACKOFF
        for n in range(1, _ATTEMPTS + 1):
            try:
                return await attempt()
            except (UpstreamUnavailable, FillFailed) as e:
                never_reached = isinstance(e, UpstreamUnreachable) and not e.reached_before
                if isinstance(e, SourceMissing) or never_reached or n == _ATTEMPTS:
                    raise
                log.warning(
                    "%s: %s (attempt %d of %d, retrying in %.0fs)", what, e, n, _ATTEMPTS, delay
                )
                await asyncio.sleep(delay)
                delay *= 2
        raise AssertionError("unreachable")

    # ---- phase 1: plan -----------------------------------------------------------------------

    async def _local_manifest(self, dest: str, reference: str) -> tuple[Digest, bytes, str] | None:
        if ":" not in reference:
            return None  # a tag is always resolved upstream
        try:
            info, body = await self.store.get_manifest(dest, reference)
        except ManifestUnknown:
            return None
        return info.digest, body, info.media_type

    async def _remote_manifest(
        self, ref: ImageReference, reference: str
    ) -> tuple[Digest, bytes, str]:
        client = self.upstream(ref.host)

        async def fetch() -> tuple[bytes, str | None, str | None]:
            async with self._manifest_slots:
                return await client.get_manifest(
                    ref.repository, reference, self.store.manifest_limit
                )

        body, content_type, header_digest = await self._retry(f"{ref.name}@{reference}", fetch)
        if ":" in reference:
            digest = Digest.parse(reference)
            if Digest.of(body, digest.algorithm) != digest:
                raise MirrorError(
                    f"{ref.name}@{reference}: upstream sent a manifest with another digest"
                )
        else:
            digest = Digest.of(body)
            if header_digest and header_digest != str(digest):
                raise MirrorError(f"{ref}: upstream announced {header_digest} but sent {digest}")
        return digest, body, parse_manifest(body, content_type).media_type

    async def _manifest(self, ref: ImageReference, dest: str, reference: str) -> ManifestNode:
        """One manifest and its subtree, from the store if ``dest`` has it, else upstream."""
        found = await self._local_manifest(dest, reference)
        digest, body, media_type = found or await self._remote_manifest(ref, reference)
        parsed = parse_manifest(body, media_type)
        sizes = _descriptor_sizes(body)
        node = ManifestNode(digest, body, media_type)
        node.blobs = [(d, sizes.get(str(d), 0)) for d in dict.fromkeys(parsed.blobs)]
        children = dict.fromkeys(parsed.children)
        node.children = list(
            await asyncio.gather(*(self._manifest(ref, dest, str(c)) for c in children))
        )
        return node

    async def plan(self, jobs: list[ImageJob]) -> None:
        """Resolve every job's manifest tree (``job.root``)."""

        async def one(job: ImageJob) -> None:
            try:
                job.root = await self._manifest(job.source, job.dest, job.source.reference)
            except UpstreamNotFound:
                raise MirrorError(f"{job.source} not found on {job.source.host}") from None
            except UpstreamError as e:
                raise MirrorError(f"{job.source}: {e}") from None
            self.progress.planned(job)

        await _all(one(job) for job in jobs)

    @staticmethod
    def blobs_of(jobs: list[ImageJob]) -> dict[Digest, tuple[int, ImageJob]]:
        """Every blob the jobs need, once, with its size and a job that can fetch it."""
        out: dict[Digest, tuple[int, ImageJob]] = {}

        def walk(node: ManifestNode, job: ImageJob) -> None:
            for digest, size in node.blobs:
                out.setdefault(digest, (size, job))
            for child in node.children:
                walk(child, job)

        for job in jobs:
            assert job.root is not None
            walk(job.root, job)
        return out

    async def missing(
        self, blobs: dict[Digest, tuple[int, ImageJob]]
    ) -> dict[Digest, tuple[int, ImageJob]]:
        sizes = await asyncio.gather(*(self.store.blob_size(d) for d in blobs))
        return {
            d: v
            for d, v, present in zip(blobs, blobs.values(), sizes, strict=True)
            if present is None
        }

    # ---- phase 2: blobs ----------------------------------------------------------------------

    async def fetch_blobs(self, jobs: list[ImageJob]) -> None:
        blobs = self.blobs_of(jobs)
        todo = await self.missing(blobs)
        for digest, (size, _) in blobs.items():
            if digest not in todo and digest not in self._fetched:
                self._fetched.add(digest)  # counted once per run, as present
                self.summary.blobs_present += 1
                self.summary.bytes_present += size
        self.progress.start_bytes(sum(size for size, _ in todo.values()))
        await _all(self._fetch_blob(d, size, job) for d, (size, job) in todo.items())

    async def _fetch_blob(self, digest: Digest, size: int, job: ImageJob) -> None:
        client = self.upstream(job.source.host)
        repository = job.source.repository

        async def fetch() -> BlobSource:
            try:
                return await client.open_blob(repository, str(digest))
            except UpstreamNotFound as e:
                raise SourceMissing(str(e)) from None

        async def attempt() -> int:
            fill = await self.fills.open(
                digest,
                fetch,
                start_timeout=client.config.connect_timeout + client.config.read_timeout,
            )
            return size if fill is None else await fill.wait()

        async with self._blob_slots:
            try:
                fetched = await self._retry(f"{job.source.name}@{digest}", attempt)
            except SourceMissing:
                raise MirrorError(
                    f"blob {digest} of {job.source} not found on {job.source.host}"
                ) from None
            except (UpstreamError, FillFailed) as e:
                raise MirrorError(f"blob {digest} of {job.source}: {e}") from None
        self._fetched.add(digest)
        self.summary.blobs_fetched += 1
        self.summary.bytes_fetched += fetched
        self.progress.advance_bytes(fetched)

    async def download(self, ref: ImageReference, directory: str, digest: Digest) -> str:
        """Fetch one blob of ``ref`` into a file under ``directory`` (not the store), verified;
        its path. For dry runs, which must not write to the store."""
        path = os.path.join(directory, digest.hex)
        if os.path.exists(path):
            return path
        client = self.upstream(ref.host)

        async def attempt() -> None:
            blob = await client.open_blob(ref.repository, str(digest))
            hasher = digest.hasher()
            try:
                with open(path + ".part", "wb") as f:
                    async for chunk in blob.chunks():
                        hasher.update(chunk)
                        f.write(chunk)
                        blob.give_back(chunk)
            finally:
                blob.close()
            if hasher.hexdigest() != digest.hex:
                raise UpstreamUnavailable(f"upstream sent other bytes for {digest}")
            os.replace(path + ".part", path)

        try:
            await self._retry(f"{ref.name}@{digest}", attempt)
        except UpstreamError as e:
            raise MirrorError(f"blob {digest} of {ref}: {e}") from None
        return path

    # ---- phase 3: manifests and tags ---------------------------------------------------------

    async def _write(self, node: ManifestNode, dest: str, written: set[tuple[str, Digest]]) -> None:
        if (dest, node.digest) in written:
            return
        for child in node.children:
            await self._write(child, dest, written)
        for digest, _ in node.blobs:
            if not await self.store.is_linked(dest, digest):
                await self.store.link_blob(dest, digest)
        await self.store.cache_manifest(dest, node.digest, node.body, node.media_type, None)
        written.add((dest, node.digest))
        self.summary.manifests += 1

    async def write_manifests(self, jobs: list[ImageJob]) -> None:
        written: set[tuple[str, Digest]] = set()
        for job in jobs:
            assert job.root is not None
            await self._write(job.root, job.dest, written)
            for tag in job.tags:
                await self.store.touch_tag(job.dest, tag, job.root.digest)
            self.summary.images += 1
            self.progress.image_done(job)

    async def run(self, jobs: list[ImageJob]) -> None:
        """Plan (unless already planned), fetch and write ``jobs``."""
        unplanned = [job for job in jobs if job.root is None]
        if unplanned:
            await self.plan(unplanned)
        try:
            await self.fetch_blobs(jobs)
            await self.write_manifests(jobs)
        except StoreError as e:
            raise MirrorError(str(e)) from None
