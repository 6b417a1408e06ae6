"""``bastion import DIR``: load an export (or any OCI image layout, or a folder of tar volumes)
into the store, every blob and manifest verified while it is copied, content visible only once
verified, good content kept when some is bad. With ``--to`` the layout is pushed into another
registry instead (``server.import_registry``)."""

from __future__ import annotations

import functools
import os
import time
from dataclasses import dataclass, field
from typing import Any

from storage import Digest, ManifestInvalid, Store, StoreError, paths
from storage import layout as oci
from storage.driver import DriverError

from .config import Config
from .ferry import (
    EXPORT_JSON,
    Fallback,
    FerryError,
    ImportOptions,
    LayoutTrees,
    ListedTag,
    Target,
    gather_limited,
    listed_tags,
    open_store,
    os_error_line,
    read_meta,
    unpacked_volumes,
    volumes_in,
    write_out_dir,
)
from .mirror import _size
from .progress import Progress

__all__ = ["ImportSummary", "import_layout"]


@dataclass
class ImportSummary:
    manifests: int = 0
    tags: int = 0
    imported: int = 0
    imported_bytes: int = 0
    present: int = 0
    signatures: int = 0
    configs: int = 0
    started: float = field(default_factory=time.monotonic)

    def line(self) -> str:
        elapsed = max(time.monotonic() - self.started, 1e-6)
        return (
            f"imported {self.manifests} manifests, {self.tags} tags; blobs: {self.imported} "
            f"verified and stored ({_size(self.imported_bytes)}), {self.present} already "
            f"present; {self.signatures} signatures, {self.configs} mirror configurations; "
            f"{elapsed:.1f}s, {_size(self.imported_bytes / elapsed)}/s"
        )


async def import_layout(config: Config, options: ImportOptions, progress: Progress) -> str:
    """Import an OCI layout (or a folder of volumes) into the store, or push it to the registry
    ``options.to``; returns the summary line. Raises ``FerryError`` with one line per bad
    digest (good content is kept, nothing bad becomes visible)."""
    if options.to is not None:
        from .import_registry import push_layout

        return await push_layout(config, options, progress)
    try:
        return await _import_store(config, options, progress)
    except OSError as e:
        raise FerryError(os_error_line(e)) from None


async def _import_store(config: Config, options: ImportOptions, progress: Progress) -> str:
    store = open_store(config)
    meta = read_meta(options.source)
    if meta is not None:
        _check_meta(meta, os.path.join(options.source, EXPORT_JSON))
        try:
            await _check_base(store, meta, config.storage.root)
        except StoreError as e:  # an invalid export id or digest in the description
            raise FerryError(f"{os.path.join(options.source, EXPORT_JSON)}: {e}") from None
    if not volumes_in(options.source):
        return await _import_dir(store, options.source, meta, options, progress)
    async with unpacked_volumes(store.driver, options.source, store.manifest_limit, progress) as (
        work,
        local,
        unpacked,
    ):
        # large blobs were verified while unpacked: from staging straight into the pool
        staged = {d: f"{work}/staging/{os.path.basename(p)}" for d, p in unpacked.staged.items()}
        layout = os.path.join(local, "layout")
        return await _import_dir(
            store, layout, meta, options, progress, _Unpacked(staged, unpacked.bad, unpacked.errors)
        )


def _check_meta(meta: dict[str, Any], path: str) -> None:
    """Refuse, before anything is written, an export description this program could not have
    written: the fields an import reads, of the types it reads them as."""
    try:
        oci.check_export_id(meta.get("id"))
        if meta.get("base") is not None:
            oci.check_export_id(meta["base"])
    except StoreError as e:
        raise FerryError(f"{path}: {e}") from None
    lists = {"blobs": dict, "carried": str, "chain": str}
    for key, kind in lists.items():
        value = meta.get(key, [])
        if not isinstance(value, list) or not all(isinstance(v, kind) for v in value):
            raise FerryError(f"{path}: {key} is not a list of {kind.__name__}")
    if not all(isinstance(b.get("digest"), str) for b in meta.get("blobs", [])):
        raise FerryError(f"{path}: an entry of blobs has no digest")


async def _check_base(store: Store, meta: dict[str, Any], root: str) -> None:
    base = meta.get("base")
    if not base or await oci.import_done(store, str(base)):
        return
    own = {b["digest"] for b in meta.get("blobs", [])}
    for text in meta.get("carried", []):
        if text in own:
            continue
        if await store.blob_size(Digest.parse(text)) is None:
            chain = " -> ".join([*meta.get("chain", []), meta["id"]])
            raise FerryError(
                f"export {meta['id']} is an increment on export {base}, which was not imported "
                f"into {root}: import the chain in order ({chain})"
            )


@dataclass
class _Unpacked:
    """What unpacking volumes gave besides the layout: large blobs verified into the store's
    staging area (digest -> driver path), bad digests, and errors of the volumes."""

    staged: dict[Digest, str] = field(default_factory=dict)
    bad: dict[Digest, str] = field(default_factory=dict)
    errors: list[str] = field(default_factory=list)


class _Import:
    """Copies what ``LayoutTrees`` read into the store."""

    def __init__(
        self, store: Store, trees: LayoutTrees, options: ImportOptions, staged: dict[Digest, str]
    ) -> None:
        self.store = store
        self.trees = trees
        self.options = options
        self.staged = staged
        self.summary = ImportSummary()

    async def blobs(self, progress: Progress) -> None:
        bad = self.trees.bad
        todo: dict[Digest, int] = {}
        for digest, size in self.trees.blob_sizes.items():
            if digest in bad:
                continue
            present = await self.store.blob_size(digest)
            if present is not None:
                # the store's copy is verified; the descriptor must agree with it all the same
                if (wrong := _wrong_size(digest, present, size)) is not None:
                    bad[digest] = wrong
                else:
                    self.summary.present += 1
                continue
            if digest in self.staged:
                await self.commit_staged(digest, size)
                continue
            try:
                found = await self.trees.reader.blob_size(digest)
            except DriverError as e:  # a symlink, device or FIFO in the layout
                bad[digest] = str(e)
                continue
            if found is None:
                bad[digest] = "blob missing from the layout"
            elif (wrong := _wrong_size(digest, found, size)) is not None:
                bad[digest] = wrong  # not copied at all (it could be anything, any size)
            else:
                todo[digest] = size
        progress.start_bytes(sum(max(s, 0) for s in todo.values()))

        async def one(digest: Digest, size: int) -> None:
            source = self.trees.reader.read_blob(digest)
            try:
                await oci.import_blob(self.store, source, digest, size, progress.advance_bytes)
            except (StoreError, DriverError) as e:
                bad[digest] = str(e)
                return
            self.summary.imported += 1
            self.summary.imported_bytes += max(size, 0)

        jobs = [functools.partial(one, d, s) for d, s in todo.items()]
        await gather_limited(self.options.concurrency, jobs)

    async def commit_staged(self, digest: Digest, size: int) -> None:
        """A blob verified while unpacked from volumes: into the pool, counted as imported."""
        try:
            stored = await oci.commit_staged(self.store, self.staged[digest], digest, size)
        except StoreError as e:
            self.trees.bad[digest] = str(e)
            return
        self.summary.imported += 1
        self.summary.imported_bytes += stored

    async def write(self, repo: str, tree: oci.ManifestTree, done: set[tuple[str, Digest]]) -> None:
        """Children first, each manifest after its blobs are linked into ``repo``."""
        for node in tree.walk():
            if (repo, node.digest) in done:
                continue
            for blob in node.blobs:
                if not await self.store.is_linked(repo, blob):
                    await self.store.link_blob(repo, blob)
            await self.store.put_manifest(repo, str(node.digest), node.body, node.media_type)
            done.add((repo, node.digest))
            self.summary.manifests += 1

    async def write_targets(self, targets: list[Target], progress: Progress) -> int:
        """Write every complete target; returns how many were not written."""
        done: set[tuple[str, Digest]] = set()
        failed = 0
        for target in targets:
            if target.tree is None or not self.trees.good(target):
                failed += 1
                continue
            try:
                await self.write(target.repository, target.tree, done)
            except StoreError as e:
                self.trees.bad[target.tree.digest] = str(e)
                failed += 1
                continue
            if target.tag is not None:
                await self.store.touch_tag(target.repository, target.tag, target.tree.digest)
                self.summary.tags += 1
            progress.image_done(target)
        return failed

    async def read_extras(self) -> tuple[list[tuple[str, bytes]], list[tuple[str, bytes]]]:
        """The layout's signatures and mirror configuration files, read (and their names
        checked) before anything is written: a bad one stops the import before it starts."""
        reader = self.trees.reader
        return await reader.signatures(), await reader.mirror_config()

    async def extras(
        self, signatures: list[tuple[str, bytes]], configs: list[tuple[str, bytes]]
    ) -> None:
        """Keep the signatures and the mirror configuration (each configuration replaced
        whole); with ``--out-dir`` the configuration is also written there."""
        for rel, data in signatures:
            await oci.put_signature(self.store, rel, data)
            self.summary.signatures += 1
        by_name: dict[str, dict[str, bytes]] = {}
        for rel, data in configs:
            name, file = oci.check_mirror_config_name(rel)
            by_name.setdefault(name, {})[file] = data
        for name, files in by_name.items():
            await oci.keep_mirror_config(self.store, name, files)
        self.summary.configs = len(by_name)
        if self.options.out_dir and configs:
            await write_out_dir(self.options.out_dir, configs)


def _wrong_size(digest: Digest, actual: int, size: int) -> str | None:
    """Why a blob of ``actual`` bytes does not fit its descriptor's ``size``, or None."""
    try:
        oci.check_described_size(size, actual, f"blob {digest}")
    except StoreError as e:
        return str(e)
    return None


def _manifest_source(store: Store, staged: dict[Digest, str]) -> Fallback:
    """Where a manifest the layout lacks is read: unpacked into staging (a manifest cut
    across volumes), else the store (an increment's)."""

    async def read(repo: str, digest: Digest) -> bytes | None:
        path = staged.get(digest)
        if path is None and await store.blob_size(digest) is not None:
            path = paths.blob(digest)
        if path is None:
            return None
        try:
            return await store.driver.get_content(path, store.manifest_limit)
        except ValueError:
            raise ManifestInvalid(
                f"manifest {digest} is larger than {store.manifest_limit} bytes"
            ) from None

    return read


async def _import_dir(
    store: Store,
    directory: str,
    meta: dict[str, Any] | None,
    options: ImportOptions,
    progress: Progress,
    unpacked: _Unpacked | None = None,
) -> str:
    """Import the layout in ``directory`` (with what unpacking its volumes gave)."""
    unpacked = unpacked or _Unpacked()
    source = _manifest_source(store, unpacked.staged)
    trees = LayoutTrees(oci.LayoutReader(directory), store.manifest_limit, source)
    trees.bad.update(unpacked.bad)
    targets = await trees.targets(options.repo)
    tags, refused = listed_tags(meta)
    trees.refused += refused
    progress.set_total_images(len(targets))
    job = _Import(store, trees, options, unpacked.staged)
    extras = await job.read_extras()
    await job.blobs(progress)
    failed = await job.write_targets(targets, progress)
    await _restore_tags(store, trees.unwritten_tags(tags, targets), job)
    await job.extras(*extras)
    if trees.failed or unpacked.errors:
        lines = trees.failure_lines(unpacked.errors)
        lines.append(
            f"{failed} of {len(targets)} images not imported; the rest is in the store "
            f"({job.summary.line()})"
        )
        raise FerryError(*lines)
    if meta is not None:
        await oci.mark_import_done(store, str(meta["id"]), {"source": options.source})
    return job.summary.line()


async def _restore_tags(store: Store, tags: list[ListedTag], job: _Import) -> None:
    """Tags the export lists without an index entry (they point at manifests an earlier
    export carried) are pointed at those manifests, which must be in the store by now."""
    for repo, tag, digest in tags:
        try:
            await store.stat_manifest(repo, str(digest))
        except StoreError:
            job.trees.bad[digest] = f"tag {tag} points at a manifest not in the store"
            job.trees.owners.setdefault(digest, set()).add(repo)
            continue
        await store.touch_tag(repo, tag, digest)
        job.summary.tags += 1
