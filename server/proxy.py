"""The pull-through cache: repositories mapped to upstream registries.

A repository is proxied when its name starts with an upstream's namespace (``quay.io/...``, the
host unless ``namespace:`` says otherwise; the rest of the name is the upstream repository) or
when it is the ``local`` name of a ``mappings:`` entry (its ``sources`` are tried in order, as
an ImageContentSourcePolicy does). The proxy wraps the store and keeps its interface: whatever
is cached is served from the store exactly as pushed content is; a miss is fetched, verified
against its digest and committed before it is visible.

- Manifests by digest: from the store, else fetched and cached.
- Manifests by tag: served from the store for ``tag_ttl`` seconds, then revalidated with a HEAD;
  if the upstream is unreachable, times out, answers 5xx/429 or refuses auth, the cached copy is
  served and the failure logged.
- Blobs: one upstream fetch per missing blob across all workers (``storage.fill``); bytes reach
  clients as they arrive; HEAD on an uncached blob asks the upstream without downloading.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Final, TypeVar

from aiohttp import web

from storage import Digest, ManifestInfo, ManifestUnknown, Store, validate_tag
from storage.digest import is_digest_reference
from storage.fill import BlobSource, Fetch, Fills, SourceMissing

from .config import Config
from .context import PROXY
from .errors import OCIError
from .upstream import (
    UpstreamAuthError,
    UpstreamClient,
    UpstreamError,
    UpstreamNotFound,
    UpstreamUnavailable,
)

__all__ = ["Proxy", "Source"]

log = logging.getLogger("bastion.proxy")

_T = TypeVar("_T")

#: Status for an upstream that failed (not a "not found"): 502 Bad Gateway (RFC 9110 15.6.3).
_UPSTREAM_FAILED: Final = 502


@dataclass(frozen=True, slots=True)
class Source:
    upstream: UpstreamClient
    repository: str

    def __str__(self) -> str:
        return f"{self.upstream.host}/{self.repository}"


class _CountingBlob:
    """Wraps an upstream blob: counts bytes and logs the fetch when it ends."""

    def __init__(self, blob: BlobSource, source: Source, digest: Digest, stats: Counter[str]):
        self._blob, self._source, self._digest, self._stats = blob, source, digest, stats
        self.size = blob.size
        self._started = time.monotonic()

    async def chunks(self) -> AsyncIterator[bytes | memoryview]:
        total = 0
        try:
            async for chunk in self._blob.chunks():
                total += len(chunk)
                self._stats["upstream_bytes"] += len(chunk)
                yield chunk
        finally:
            elapsed = time.monotonic() - self._started
            log.info(
                "upstream fetch %s %s: %d bytes in %.2fs",
                self._source,
                self._digest,
                total,
                elapsed,
            )

    def give_back(self, piece: bytes | memoryview) -> None:
        self._blob.give_back(piece)

    def close(self) -> None:
        self._blob.close()


class Proxy:
    def __init__(self, config: Config, store: Store) -> None:
        self.store = store
        self.clients = {host: UpstreamClient(up) for host, up in config.upstreams.items()}
        self._namespaces = sorted(
            ((up.namespace or host, self.clients[host]) for host, up in config.upstreams.items()),
            key=lambda item: -len(item[0]),
        )
        self._mappings: dict[str, list[Source]] = {}
        for m in config.mappings:
            self._mappings[m.local] = [self._source_for(s, m.local) for s in m.sources]
        root = store.driver.local_path("proxy")
        if root is None:
            raise ValueError("the pull-through cache needs the filesystem storage driver")
        self.fills = Fills(root.rsplit("/", 1)[0])
        self.stats: Counter[str] = Counter()
        self._inflight: dict[tuple[str, str], asyncio.Future[ManifestInfo]] = {}

    def _source_for(self, ref: str, local: str) -> Source:
        host, _, repository = ref.partition("/")
        client = self.clients.get(host)
        if client is None or not repository:
            raise ValueError(f"mappings: source {ref!r} of {local!r} names no configured upstream")
        return Source(client, repository)

    def sources(self, name: str) -> list[Source] | None:
        """Where ``name`` is fetched from, or None if it is an ordinary (pushed) repository."""
        mapped = self._mappings.get(name)
        if mapped is not None:
            return mapped
        for namespace, client in self._namespaces:
            if name.startswith(namespace + "/"):
                return [Source(client, name[len(namespace) + 1 :])]
        return None

    async def close(self) -> None:
        await self.fills.close()
        for client in self.clients.values():
            await client.close()

    # ---- manifests ---------------------------------------------------------------------------

    async def manifest(self, name: str, reference: str, sources: list[Source]) -> ManifestInfo:
        """Make sure the manifest is in the store (fetching or revalidating it) and describe it."""
        key = (name, reference)
        pending = self._inflight.get(key)
        if pending is not None:  # coalesce concurrent misses in this worker
            return await asyncio.shield(pending)
        future: asyncio.Future[ManifestInfo] = asyncio.get_running_loop().create_future()
        self._inflight[key] = future
        try:
            info = await self._manifest(name, reference, sources)
            future.set_result(info)
            return info
        except BaseException as e:
            future.set_exception(e)
            future.exception()  # retrieved: no "never retrieved" warning if nobody waits
            raise
        finally:
            del self._inflight[key]

    async def _manifest(self, name: str, reference: str, sources: list[Source]) -> ManifestInfo:
        store = self.store
        if is_digest_reference(reference):
            digest = Digest.parse(reference)
            try:
                info = await store.stat_manifest(name, reference)
                self.stats["manifest_hits"] += 1
                return info
            except ManifestUnknown:
                pass
            self.stats["manifest_misses"] += 1
            body, content_type, _ = await self._fetch_manifest(sources, reference)
            return await store.cache_manifest(name, digest, body, content_type, None)

        validate_tag(reference)  # never forward a malformed reference upstream
        cached: ManifestInfo | None = None
        try:
            cached = await store.stat_manifest(name, reference)
        except ManifestUnknown:
            pass
        if cached is not None:
            age = await store.tag_age(name, reference)
            if age is not None and age < sources[0].upstream.config.tag_ttl:
                self.stats["manifest_hits"] += 1
                return cached
        try:
            if cached is not None:
                upstream_digest = await self._head_manifest(sources, reference)
                if upstream_digest == str(cached.digest):
                    await store.touch_tag(name, reference, cached.digest)
                    self.stats["manifest_hits"] += 1
                    return cached
            self.stats["manifest_misses"] += 1
            body, content_type, header_digest = await self._fetch_manifest(sources, reference)
        except UpstreamNotFound:
            raise
        except UpstreamError as e:
            if cached is None:
                raise
            log.warning("serving cached %s:%s: %s", name, reference, e)
            self.stats["stale_served"] += 1
            # back off: the next check of this tag waits another tag_ttl, so an unreachable
            # upstream does not slow every pull down by its timeouts
            await store.touch_tag(name, reference, cached.digest)
            return cached
        algorithm = header_digest.split(":", 1)[0] if header_digest else "sha256"
        digest = Digest.of(body, algorithm if algorithm in ("sha256", "sha512") else "sha256")
        if header_digest and header_digest != str(digest):
            raise OCIError(
                "UNKNOWN",
                f"upstream served {name}:{reference} with digest {digest} but announced "
                f"{header_digest}",
                status=_UPSTREAM_FAILED,
            )
        return await store.cache_manifest(name, digest, body, content_type, reference)

    async def _fetch_manifest(
        self, sources: list[Source], reference: str
    ) -> tuple[bytes, str | None, str | None]:
        limit = self.store.manifest_limit

        async def one(source: Source) -> tuple[bytes, str | None, str | None]:
            started = time.monotonic()
            result = await source.upstream.get_manifest(source.repository, reference, limit)
            self.stats["upstream_bytes"] += len(result[0])
            log.info(
                "upstream fetch %s manifest %s: %d bytes in %.2fs",
                source,
                reference,
                len(result[0]),
                time.monotonic() - started,
            )
            if is_digest_reference(reference):
                digest = Digest.parse(reference)
                actual = Digest.of(result[0], digest.algorithm)
                if actual != digest:
                    log.error("upstream %s sent %s for manifest %s", source, actual, digest)
                    raise UpstreamError(
                        f"upstream {source} sent a manifest with digest {actual}, not {digest}"
                    )
            return result

        return await _first(sources, one)

    async def _head_manifest(self, sources: list[Source], reference: str) -> str | None:
        async def one(source: Source) -> str | None:
            digest, _ = await source.upstream.head_manifest(source.repository, reference)
            return digest

        return await _first(sources, one)

    # ---- blobs -------------------------------------------------------------------------------

    async def head_blob(self, name: str, digest: Digest, sources: list[Source]) -> int | None:
        """Size of a blob the store lacks, asking the upstream without downloading."""

        async def one(source: Source) -> int | None:
            return await source.upstream.head_blob(source.repository, str(digest))

        return await _first(sources, one)

    async def list_tags(self, name: str, sources: list[Source]) -> list[str]:
        """The tags of the upstream repositories behind ``name``, merged over every source that
        answers. If none does: the last failure (logged), or ``UpstreamNotFound`` if every
        source lacks the repository."""
        found: set[str] = set()
        answered = False
        failure: UpstreamError | None = None
        for source in sources:
            t0 = time.monotonic()
            try:
                tags = await source.upstream.list_tags(source.repository)
            except UpstreamNotFound:
                continue
            except UpstreamError as e:
                log.warning("tags list of %s from %s failed: %s", name, source, e)
                failure = e
                continue
            log.info(
                "listed %d tags of %s from %s in %.3fs",
                len(tags),
                name,
                source,
                time.monotonic() - t0,
            )
            found.update(tags)
            answered = True
        if answered:
            return sorted(found)
        if failure is not None:
            raise failure
        raise UpstreamNotFound(f"no upstream of {name} has that repository")

    def fetcher(self, digest: Digest, sources: list[Source]) -> Fetch:
        async def fetch() -> BlobSource:
            async def one(source: Source) -> BlobSource:
                blob = await source.upstream.open_blob(source.repository, str(digest))
                return _CountingBlob(blob, source, digest, self.stats)

            try:
                return await _first(sources, one)
            except UpstreamNotFound as e:
                raise SourceMissing(str(e)) from None

        return fetch


async def _first(sources: list[Source], attempt: Callable[[Source], Awaitable[_T]]) -> _T:
    """The first source that answers; a source that lacks the content passes to the next.
    If every source lacks it: ``UpstreamNotFound``; else the last other failure."""
    failure: UpstreamError | None = None
    not_found: UpstreamNotFound | None = None
    for source in sources:
        try:
            return await attempt(source)
        except UpstreamNotFound as e:
            not_found = e
        except UpstreamError as e:
            log.warning("%s", e)
            failure = e
    if failure is not None:
        raise failure
    assert not_found is not None
    raise not_found


def upstream_error(exc: UpstreamError, what: str, sources: list[Source]) -> OCIError:
    """The OCI error a client sees for an upstream failure. The details (user names, the
    authfile, internal URLs) go to the log only; the client learns which upstream failed."""
    hosts = ", ".join(dict.fromkeys(s.upstream.host for s in sources))
    if isinstance(exc, UpstreamNotFound):
        code = "MANIFEST_UNKNOWN" if what == "manifest" else "BLOB_UNKNOWN"
        return OCIError(code, f"{what} unknown to upstream {hosts}")
    log.error("%s", exc)
    if isinstance(exc, UpstreamAuthError):
        message = f"upstream {hosts} refused authentication (see the registry log)"
    elif isinstance(exc, UpstreamUnavailable):
        message = f"upstream {hosts} unavailable (see the registry log)"
    else:
        message = f"upstream {hosts} sent an invalid answer (see the registry log)"
    return OCIError("UNKNOWN", message, status=_UPSTREAM_FAILED)


def refuse_write(name: str, sources: list[Source]) -> OCIError:
    where = ", ".join(str(s) for s in sources)
    return OCIError(
        "UNSUPPORTED",
        f"repository {name} is a read-only pull-through cache of {where}; "
        "push to a repository outside the upstream namespaces",
    )


def proxied(request: web.Request, name: str) -> tuple[Proxy, list[Source]] | None:
    """The proxy and the sources of ``name`` if it is a pull-through repository."""
    proxy = request.app.get(PROXY)
    if proxy is None:
        return None
    sources = proxy.sources(name)
    return None if sources is None else (proxy, sources)
