"""A per-process cache of manifests and tags, validated against the store on every use.

Manifests are immutable by digest, so their bytes can be kept; what can change under us, in any
worker process, is whether a repository still holds the manifest (its revision link) and where
a tag points. Every hit is therefore validated by stat(2) of those metadata files, compared by
(inode, mtime, size): every metadata write is an atomic rename, so any change gives a new
inode. Keys are taken *before* the files are read, so a change racing a load only causes a
miss later, never a stale hit.

These stats run on the event loop, an exception to the rule that file-system calls go to a
thread: they touch only small metadata files whose dentries and inodes are hot in the kernel's
caches, and a thread hop costs some 30 times the syscall on this hot path.
"""

from __future__ import annotations

import os
from collections import OrderedDict
from typing import Final

__all__ = ["ManifestCache", "StatKey", "stat_key"]

StatKey = tuple[int, int, int]

#: Bytes of manifest bodies kept per process.
DEFAULT_MAX_BYTES: Final = 64 * 1024 * 1024


def stat_key(path: str) -> StatKey | None:
    try:
        st = os.stat(path)
    except (FileNotFoundError, NotADirectoryError):
        return None
    return (st.st_ino, st.st_mtime_ns, st.st_size)


class ManifestCache:
    def __init__(self, max_bytes: int = DEFAULT_MAX_BYTES) -> None:
        self._max_bytes = max_bytes
        self._bytes = 0
        # (repository, digest) -> (media type, body, key of the revision link)
        self._manifests: OrderedDict[tuple[str, str], tuple[str, bytes, str, StatKey]] = (
            OrderedDict()
        )
        # (repository, tag) -> (key of the tag file, digest)
        self._tags: dict[tuple[str, str], tuple[str, StatKey, str]] = {}

    def lookup(
        self, name: str, reference: str, tag_path: str | None
    ) -> tuple[str, str, bytes] | None:
        """(digest, media type, body) if cached and still valid, else None. ``tag_path`` is
        the tag file for a tag reference, None for a digest."""
        digest = reference
        if tag_path is not None:
            tag = self._tags.get((name, reference))
            if tag is None:
                return None
            path, key, digest = tag
            if stat_key(path) != key:
                del self._tags[(name, reference)]
                return None
        entry = self._manifests.get((name, digest))
        if entry is None:
            return None
        media_type, body, revision_path, key = entry
        if stat_key(revision_path) != key:
            self._drop((name, digest))
            return None
        self._manifests.move_to_end((name, digest))
        return digest, media_type, body

    def remember(
        self,
        name: str,
        digest: str,
        media_type: str,
        body: bytes,
        revision: tuple[str, StatKey],
        tag: tuple[str, str, StatKey] | None = None,
    ) -> None:
        """Keep a manifest loaded after ``revision`` (path, key) — and ``tag`` (name, path,
        key) — were stat()ed."""
        if len(body) > self._max_bytes // 16:
            return
        key = (name, digest)
        if key in self._manifests:
            self._drop(key)
        self._manifests[key] = (media_type, body, revision[0], revision[1])
        self._bytes += len(body)
        if tag is not None:
            self._tags[(name, tag[0])] = (tag[1], tag[2], digest)
        while self._bytes > self._max_bytes:
            self._drop(next(iter(self._manifests)))

    def _drop(self, key: tuple[str, str]) -> None:
        entry = self._manifests.pop(key, None)
        if entry is not None:
            self._bytes -= len(entry[1])
