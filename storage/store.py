"""The content-addressed registry store: blobs, repository links, manifests, tags, referrers.

Knows nothing of HTTP. Every piece of content is verified against its digest before it becomes
visible; every metadata write is atomic (the driver's ``put_content``). Uploads live in
``storage.uploads``; this module exposes them through the same ``Store`` object.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any, Final

from . import paths
from .digest import Descriptor, Digest, is_digest_reference, validate_tag
from .driver import PathNotFound, StorageDriver
from .errors import (
    BlobUnknown,
    DigestMismatch,
    InvalidDigest,
    InvalidReference,
    ManifestBlobUnknown,
    ManifestTooLarge,
    ManifestUnknown,
    RepositoryUnknown,
)
from .manifest import ParsedManifest, parse_manifest
from .manifest_cache import ManifestCache, stat_key
from .uploads import Uploads

__all__ = ["Store", "ManifestInfo", "DEFAULT_MANIFEST_LIMIT"]

#: The largest manifest accepted by default (distribution and Quay use 4 MiB).
DEFAULT_MANIFEST_LIMIT: Final = 4 * 1024 * 1024
#: Metadata files (links, tags, referrer descriptors) are small; anything bigger is corrupt.
_META_LIMIT: Final = 64 * 1024


@dataclass(frozen=True, slots=True)
class ManifestInfo:
    digest: Digest
    media_type: str
    size: int


class Store:
    """One registry's content. Safe to share between coroutines and between processes that use
    the same root: all shared state lives in the driver."""

    def __init__(self, driver: StorageDriver, manifest_limit: int = DEFAULT_MANIFEST_LIMIT) -> None:
        self.driver = driver
        self.manifest_limit = manifest_limit
        self.uploads = Uploads(self)
        self._local = driver.local_path(paths.BLOBS) is not None
        self._cache = ManifestCache()

    # ---- blobs -------------------------------------------------------------------------------

    async def blob_size(self, digest: Digest) -> int | None:
        """Size of the blob in the store (any repository), or None."""
        try:
            return (await self.driver.stat(paths.blob(digest))).size
        except PathNotFound:
            return None

    async def is_linked(self, name: str, digest: Digest) -> bool:
        try:
            await self.driver.stat(paths.layer_link(name, digest))
            return True
        except PathNotFound:
            return False

    async def stat_blob(self, name: str, digest: Digest) -> int:
        """Size of a blob linked into ``name``; ``BlobUnknown`` otherwise."""
        if await self.is_linked(name, digest):
            size = await self.blob_size(digest)
            if size is not None:
                return size
        raise BlobUnknown(f"blob {digest} unknown to repository {name}")

    def blob_local_path(self, digest: Digest) -> str | None:
        return self.driver.local_path(paths.blob(digest))

    def read_blob(self, digest: Digest, offset: int = 0) -> AsyncIterator[bytes]:
        return self.driver.reader(paths.blob(digest), offset)

    async def link_blob(self, name: str, digest: Digest) -> None:
        await self.driver.put_content(paths.layer_link(name, digest), str(digest).encode())

    async def delete_blob(self, name: str, digest: Digest) -> None:
        """Unlink the blob from ``name``; the content stays until garbage collection."""
        try:
            await self.driver.delete(paths.layer_link(name, digest))
        except PathNotFound:
            raise BlobUnknown(f"blob {digest} unknown to repository {name}") from None

    async def mount_blob(self, name: str, digest: Digest, source: str | None) -> int | None:
        """Link an existing blob into ``name`` without copying. From ``source`` when given (it
        must hold the blob), else from the store. Returns the size, or None if not mounted."""
        if source is not None and not await self.is_linked(source, digest):
            return None
        size = await self.blob_size(digest)
        if size is None:
            return None
        await self.link_blob(name, digest)
        return size

    async def commit_blob(self, src: str, digest: Digest) -> None:
        """Move verified content at driver path ``src`` into the blob pool. If the digest is
        already there, the existing (identical) copy is kept and ``src`` is removed."""
        if await self.blob_size(digest) is not None:
            await self.driver.delete(src)
            return
        await self.driver.move(src, paths.blob(digest))

    # ---- manifests ---------------------------------------------------------------------------

    async def _resolve(self, name: str, reference: str) -> Digest:
        if is_digest_reference(reference):
            return Digest.parse(reference)
        try:
            validate_tag(reference)
            text = await self.driver.get_content(paths.tag(name, reference), _META_LIMIT)
            return Digest.parse(text.decode())
        except (PathNotFound, ValueError, InvalidDigest, InvalidReference):
            raise ManifestUnknown(f"manifest {reference!r} unknown to repository {name}") from None

    async def stat_manifest(self, name: str, reference: str) -> ManifestInfo:
        """Digest, media type and size of a manifest in ``name`` by tag or digest."""
        if self._local:
            return (await self.get_manifest(name, reference))[0]
        digest = await self._resolve(name, reference)
        try:
            meta = json.loads(
                await self.driver.get_content(paths.manifest_revision(name, digest), _META_LIMIT)
            )
            size = (await self.driver.stat(paths.blob(digest))).size
        except (PathNotFound, ValueError):
            raise ManifestUnknown(f"manifest {reference!r} unknown to repository {name}") from None
        return ManifestInfo(digest, meta["mediaType"], size)

    async def get_manifest(self, name: str, reference: str) -> tuple[ManifestInfo, bytes]:
        """The manifest's exact stored bytes, with its digest and media type."""
        if self._local:
            return await self._get_manifest_local(name, reference)
        info = await self.stat_manifest(name, reference)
        try:
            body = await self.driver.get_content(paths.blob(info.digest), self.manifest_limit * 4)
        except PathNotFound:
            raise ManifestUnknown(f"manifest {reference!r} unknown to repository {name}") from None
        return ManifestInfo(info.digest, info.media_type, len(body)), body

    async def _get_manifest_local(self, name: str, reference: str) -> tuple[ManifestInfo, bytes]:
        """The hot path: a validated cache hit costs one or two stat(2) calls and no thread."""
        by_tag = not is_digest_reference(reference)
        if by_tag:
            try:
                validate_tag(reference)
            except InvalidReference:
                raise ManifestUnknown(
                    f"manifest {reference!r} unknown to repository {name}"
                ) from None
        else:
            reference = str(Digest.parse(reference))
        tag_path = self._full(paths.tag(name, reference)) if by_tag else None
        hit = self._cache.lookup(name, reference, tag_path)
        if hit is None:
            loop = asyncio.get_running_loop()
            hit = await loop.run_in_executor(None, self._load_manifest, name, reference, tag_path)
        digest, media_type, body = hit
        return ManifestInfo(Digest.parse(digest), media_type, len(body)), body

    def _full(self, path: str) -> str:
        full = self.driver.local_path(path)
        assert full is not None
        return full

    def _load_manifest(
        self, name: str, reference: str, tag_path: str | None
    ) -> tuple[str, str, bytes]:
        """Read a manifest from the files (in a worker thread) and remember it. Each file's
        key is taken before it is read (see ``storage.manifest_cache``)."""
        unknown = ManifestUnknown(f"manifest {reference!r} unknown to repository {name}")
        tag = None
        try:
            if tag_path is not None:
                tag_key = stat_key(tag_path)
                with open(tag_path, "rb") as f:
                    digest = str(Digest.parse(f.read(_META_LIMIT).decode()))
                if tag_key is None:
                    raise unknown
                tag = (reference, tag_path, tag_key)
            else:
                digest = reference
            parsed = Digest.parse(digest)
            revision_path = self._full(paths.manifest_revision(name, parsed))
            revision_key = stat_key(revision_path)
            with open(revision_path, "rb") as f:
                media_type = json.loads(f.read(_META_LIMIT))["mediaType"]
            with open(self._full(paths.blob(parsed)), "rb") as f:
                body = f.read(self.manifest_limit * 4 + 1)
        except (FileNotFoundError, NotADirectoryError, ValueError, KeyError, InvalidDigest):
            raise unknown from None
        if revision_key is None:
            raise unknown
        self._cache.remember(name, digest, media_type, body, (revision_path, revision_key), tag)
        return digest, media_type, body

    async def put_manifest(
        self,
        name: str,
        reference: str,
        body: bytes,
        content_type: str | None,
        extra_tags: tuple[str, ...] = (),
    ) -> tuple[Digest, Digest | None]:
        """Store a manifest as the exact bytes received, after checking its digest (when the
        reference is one), that everything it references is in ``name``, and its size; then
        point the tag (and ``extra_tags``) at it. Returns the manifest's digest and its
        subject (for ``OCI-Subject``)."""
        if len(body) > self.manifest_limit:
            raise ManifestTooLarge(
                f"manifest of {len(body)} bytes exceeds the limit of {self.manifest_limit} bytes"
            )
        tags = [validate_tag(t) for t in extra_tags]
        if is_digest_reference(reference):
            expected = Digest.parse(reference)
            digest = Digest.of(body, expected.algorithm)
            if digest != expected:
                raise DigestMismatch(f"manifest body has digest {digest}, not {expected}")
        else:
            tags.insert(0, validate_tag(reference))
            digest = Digest.of(body)
        parsed = parse_manifest(body, content_type)

        async def check_blob(d: Digest) -> None:
            if not await self.is_linked(name, d) or await self.blob_size(d) is None:
                raise ManifestBlobUnknown(f"blob {d} is not in repository {name}", str(d))

        async def check_child(d: Digest) -> None:
            try:
                await self.driver.stat(paths.manifest_revision(name, d))
            except PathNotFound:
                raise ManifestBlobUnknown(
                    f"manifest {d} is not in repository {name}", str(d)
                ) from None

        await asyncio.gather(
            *(check_blob(d) for d in set(parsed.blobs)),
            *(check_child(d) for d in set(parsed.children)),
        )
        await self._store_manifest(name, digest, body, parsed, tags)
        return digest, parsed.subject

    async def cache_manifest(
        self, name: str, digest: Digest, body: bytes, content_type: str | None, tag: str | None
    ) -> ManifestInfo:
        """Store a manifest fetched from an upstream (pull-through) after checking that ``body``
        hashes to ``digest``. Unlike ``put_manifest`` the content it references need not be
        here yet: the cache fetches it on demand."""
        actual = Digest.of(body, digest.algorithm)
        if actual != digest:
            raise DigestMismatch(f"manifest body has digest {actual}, not {digest}")
        parsed = parse_manifest(body, content_type)
        await self._store_manifest(name, digest, body, parsed, [validate_tag(tag)] if tag else [])
        return ManifestInfo(digest, parsed.media_type, len(body))

    async def _store_manifest(
        self, name: str, digest: Digest, body: bytes, parsed: ParsedManifest, tags: list[str]
    ) -> None:
        """Content first, then the revision link, referrers and tags last, so a visible tag
        always points at complete content."""
        if await self.blob_size(digest) is None:
            await self.driver.put_content(paths.blob(digest), body)
        meta = json.dumps({"mediaType": parsed.media_type}).encode()
        await self.driver.put_content(paths.manifest_revision(name, digest), meta)
        if parsed.subject is not None:
            descriptor = parsed.descriptor(digest, len(body))
            await self.driver.put_content(
                paths.referrer(name, parsed.subject, digest),
                json.dumps(descriptor.to_json()).encode(),
            )
        for tag in tags:
            await self.driver.put_content(paths.tag(name, tag), str(digest).encode())

    async def tag_age(self, name: str, tag: str) -> float | None:
        """Seconds since ``tag`` was last written or revalidated, or None if it does not exist."""
        try:
            validate_tag(tag)
            info = await self.driver.stat(paths.tag(name, tag))
        except (PathNotFound, InvalidReference):
            return None
        return max(0.0, time.time() - info.mtime)

    async def touch_tag(self, name: str, tag: str, digest: Digest) -> None:
        """Record that ``tag`` was revalidated now (rewrites it, which updates its mtime)."""
        await self.driver.put_content(paths.tag(name, tag), str(digest).encode())

    async def delete_manifest(self, name: str, reference: str) -> None:
        """By tag: remove the tag only. By digest: remove the manifest from ``name``, every tag
        pointing at it and its entry in its subject's referrers."""
        if not is_digest_reference(reference):
            await self._resolve(name, reference)
            try:
                await self.driver.delete(paths.tag(name, reference))
            except PathNotFound:
                raise ManifestUnknown(f"tag {reference!r} unknown to repository {name}") from None
            return
        info, body = await self.get_manifest(name, reference)
        try:
            parsed = parse_manifest(body, info.media_type)
        except Exception:
            parsed = None
        for tag in await self.list_tags(name):
            try:
                if await self._resolve(name, tag) == info.digest:
                    await self.driver.delete(paths.tag(name, tag))
            except (ManifestUnknown, PathNotFound):
                pass
        if parsed is not None and parsed.subject is not None:
            try:
                await self.driver.delete(paths.referrer(name, parsed.subject, info.digest))
            except PathNotFound:
                pass
        try:
            await self.driver.delete(paths.manifest_revision(name, info.digest))
        except PathNotFound:
            raise ManifestUnknown(f"manifest {reference!r} unknown to repository {name}") from None

    # ---- tags, catalog, referrers ------------------------------------------------------------

    async def repository_exists(self, name: str) -> bool:
        try:
            children = await self.driver.list(paths.repository(name))
        except PathNotFound:
            return False
        return "_manifests" in children or "_layers" in children

    async def list_tags(self, name: str) -> list[str]:
        """Tags of ``name`` in lexical order; ``RepositoryUnknown`` if the repository has none
        and no content either."""
        try:
            return await self.driver.list(paths.tags_dir(name))
        except PathNotFound:
            if await self.repository_exists(name):
                return []
            raise RepositoryUnknown(f"repository {name} not known to registry") from None

    async def list_repositories(self) -> list[str]:
        """Every repository holding content, in lexical order of the full name."""
        found: list[str] = []

        async def visit(prefix: str) -> None:
            try:
                children = await self.driver.list(
                    paths.repository(prefix) if prefix else paths.REPOSITORIES
                )
            except PathNotFound:
                return
            if prefix and ("_manifests" in children or "_layers" in children):
                found.append(prefix)
            for child in children:
                if not child.startswith("_"):
                    await visit(f"{prefix}/{child}" if prefix else child)

        await visit("")
        return sorted(found)

    async def list_referrers(
        self, name: str, subject: Digest, artifact_type: str | None = None
    ) -> list[Descriptor]:
        """Descriptors of the manifests in ``name`` whose subject is ``subject``."""
        docs: dict[str, dict[str, Any]] = {}
        directory = paths.referrers_dir(name, subject)
        try:
            entries = await self.driver.list(directory)
        except PathNotFound:
            entries = []
        for entry in entries:
            try:
                doc = json.loads(await self.driver.get_content(f"{directory}/{entry}", _META_LIMIT))
            except (PathNotFound, ValueError):
                continue
            docs[doc["digest"]] = doc
        # Referrers pushed by clients using the fallback tag schema (<alg>-<hex> pointing at an
        # index) are included too (distribution-spec "Referrers Tag Schema").
        try:
            _, body = await self.get_manifest(name, f"{subject.algorithm}-{subject.hex}")
            for entry in json.loads(body).get("manifests", []):
                if isinstance(entry, dict) and isinstance(entry.get("digest"), str):
                    docs.setdefault(entry["digest"], entry)
        except (ManifestUnknown, ValueError, AttributeError):
            pass
        out = []
        for doc in docs.values():
            if artifact_type is not None and doc.get("artifactType") != artifact_type:
                continue
            try:
                out.append(
                    Descriptor(
                        doc["mediaType"],
                        Digest.parse(doc["digest"]),
                        doc["size"],
                        doc.get("artifactType"),
                        doc.get("annotations"),
                    )
                )
            except (KeyError, InvalidDigest):
                continue
        return out
