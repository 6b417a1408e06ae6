"""``bastion import DIR --to REGISTRY[/PREFIX]``: push an export (or any OCI image layout, or a
folder of tar volumes) into another registry, for example the site's Quay, over the OCI API
(``server.registry_push``), with credentials from ``--authfile``.

Names: ``PREFIX`` is a prefix under which every repository keeps its original path, as
oc-mirror's diskToMirror does: the export's ``quay.io/openshift-release-dev/ocp-release`` goes to
``REGISTRY/PREFIX/quay.io/openshift-release-dev/ocp-release`` (without a prefix, to
``REGISTRY/quay.io/...``). The mirror configuration the export carries is rendered again for
those locations and written to ``--out-dir``.

Order: every manifest tree is read and verified first (from the layout; manifests an increment
does not carry from the target registry); blobs the layout lacks are looked up in the target,
and an increment whose base is not there is refused before anything is pushed. Then blobs:
``HEAD`` (present: skipped, which is what makes a rerun continue), else a cross-repository
mount from a repository of this import that already holds the blob, else an upload streamed
from the layout and verified on the way. Then manifests, children first, by digest, with their
exact bytes and media type; tags last, so a tag only moves once its whole tree is there.
Bad content is named (digest and repositories) and its images left out; the rest is pushed.
"""

from __future__ import annotations

import asyncio
import functools
import json
import os
import time
from collections.abc import AsyncIterator, Awaitable, Sequence
from dataclasses import dataclass, field
from typing import Any, Final

from storage import Digest, FilesystemDriver, StoreError
from storage import layout as oci
from storage.driver import DriverError

from . import snippets
from .config import Config, UpstreamConfig
from .ferry import (
    FerryError,
    ImportOptions,
    LayoutTrees,
    ListedTag,
    Target,
    gather_limited,
    listed_tags,
    os_error_line,
    read_meta,
    unpacked_volumes,
    volumes_in,
    write_out_dir,
)
from .mirror import _size
from .mirror_commands import MIRROR_MAP
from .progress import Progress
from .registry_push import RegistryPush
from .upstream import UpstreamAuthError, UpstreamError, UpstreamNotFound, UpstreamUnreachable

__all__ = ["PushSummary", "push_layout"]

#: A push waits this long for an answer once a body is sent (a registry may verify and move
#: a large blob before it answers).
_READ_TIMEOUT: Final = 600.0


@dataclass
class PushSummary:
    target: str
    manifests: int = 0
    manifests_present: int = 0
    tags: int = 0
    uploaded: int = 0
    uploaded_bytes: int = 0
    mounted: int = 0
    present: int = 0
    started: float = field(default_factory=time.monotonic)

    def line(self) -> str:
        elapsed = max(time.monotonic() - self.started, 1e-6)
        return (
            f"pushed to {self.target}: {self.manifests} manifests ({self.manifests_present} "
            f"already there), {self.tags} tags; blobs: {self.uploaded} uploaded "
            f"({_size(self.uploaded_bytes)}), {self.mounted} mounted, {self.present} already "
            f"there; {elapsed:.1f}s, {_size(self.uploaded_bytes / elapsed)}/s"
        )


def registry_client(options: ImportOptions) -> RegistryPush:
    assert options.to is not None
    host = options.to.partition("/")[0]
    scheme = "http" if options.plain_http else "https"
    config = UpstreamConfig(
        host=host,
        url=f"{scheme}://{host}",
        authfile=options.authfile,
        ca_file=options.ca_file,
        tls_verify=options.tls_verify,
        read_timeout=_READ_TIMEOUT,
    )
    return RegistryPush(config, options.chunk_size)


async def push_layout(config: Config, options: ImportOptions, progress: Progress) -> str:
    """Push the layout (or folder of volumes) ``options.source`` to ``options.to``; returns the
    summary line. ``FerryError`` with one line per bad digest (the rest is pushed)."""
    meta = read_meta(options.source)
    client = registry_client(options)
    try:
        return await _push(client, config, options, meta, progress)
    except OSError as e:
        raise FerryError(os_error_line(e)) from None
    finally:
        await client.close()


async def _push(
    client: RegistryPush,
    config: Config,
    options: ImportOptions,
    meta: dict[str, Any] | None,
    progress: Progress,
) -> str:
    limit = config.limits.manifest_size
    if not volumes_in(options.source):
        return await _Push(client, options, meta, progress, limit).run(options.source)
    root = FilesystemDriver(config.storage.root)
    async with unpacked_volumes(root, options.source, limit, progress) as (_, local, found):
        layout = os.path.join(local, "layout")
        loop = asyncio.get_running_loop()
        await loop.run_in_executor(None, _place_staged, found.staged, layout)
        push = _Push(client, options, meta, progress, limit)
        return await push.run(layout, found.bad, found.errors)


def _place_staged(staged: dict[Digest, str], layout: str) -> None:
    """Move blobs verified while unpacking into the scratch layout (same filesystem)."""
    for digest, path in staged.items():
        target = os.path.join(layout, *oci.layout_blob(digest).split("/"))
        os.makedirs(os.path.dirname(target), exist_ok=True)
        os.replace(path, target)


class _Push:
    def __init__(
        self,
        client: RegistryPush,
        options: ImportOptions,
        meta: dict[str, Any] | None,
        progress: Progress,
        limit: int,
    ) -> None:
        assert options.to is not None
        self.client = client
        self.options = options
        self.meta = meta
        self.progress = progress
        self.prefix = options.to.partition("/")[2].strip("/")
        self.summary = PushSummary(options.to)
        self.limit = limit  # manifest size
        self.where: dict[Digest, str] = {}  # a repository of the target holding the blob
        self.manifests: dict[tuple[str, Digest], asyncio.Future[bool]] = {}
        self.trees: LayoutTrees

    def dest(self, repository: str) -> str:
        return f"{self.prefix}/{repository}" if self.prefix else repository

    async def from_target(self, repository: str, digest: Digest) -> bytes | None:
        """A manifest the layout lacks (an increment), from the target (``repository`` is
        already a target name); verified by ``LayoutTrees``."""
        try:
            body, _, _ = await self.client.get_manifest(repository, str(digest), self.limit)
        except UpstreamNotFound:
            return None
        except UpstreamError as e:
            raise FerryError(str(e)) from None
        return body

    async def run(
        self,
        directory: str,
        prefailed: dict[Digest, str] | None = None,
        errors: Sequence[str] = (),
    ) -> str:
        reader = oci.LayoutReader(directory)
        self.trees = trees = LayoutTrees(reader, self.limit, self.from_target)
        trees.bad.update(prefailed or {})
        try:
            targets = await trees.targets(self.options.repo, self.dest)
            tags, refused = listed_tags(self.meta, self.dest)
            trees.refused += refused
            self.progress.set_total_images(len(targets))
            blobs = await self.plan_blobs(targets)
            await self.push_blobs(blobs)
            await gather_limited(
                self.options.concurrency,
                [functools.partial(self.push_tree, t) for t in targets if self.good(t)],
            )
            for target in [t for t in targets if self.good(t)]:
                await self.push_tag(target.repository, target.tag, target.tree)
            await self.restore_tags(trees.unwritten_tags(tags, targets))
        except UpstreamError as e:
            raise FerryError(str(e), f"stopped; so far: {self.summary.line()}") from None
        out = await self.extras(reader)
        if trees.failed or errors:
            lines = trees.failure_lines(errors)
            failed = sum(not self.good(t) for t in targets)
            lines.append(
                f"{failed} of {len(targets)} images not pushed; the rest is in "
                f"{self.options.to} ({self.summary.line()})"
            )
            raise FerryError(*lines)
        return self.summary.line() + out

    def good(self, target: Target) -> bool:
        return self.trees.good(target)

    # ---- blobs -------------------------------------------------------------------------------

    async def plan_blobs(self, targets: list[Target]) -> dict[tuple[str, Digest], int]:
        """(repository, digest) -> size of every blob to push; blobs the layout lacks are
        looked up in the target first (``where``); bad ones go to ``trees.bad``."""
        pairs: dict[tuple[str, Digest], int] = {}
        for target in targets:
            if self.good(target):
                assert target.tree is not None
                for node in target.tree.walk():
                    pairs.update({(target.repository, d): s for d, s in node.blobs.items()})
        absent: dict[Digest, set[str]] = {}
        for (repo, digest), size in pairs.items():
            try:
                found = await self.trees.reader.blob_size(digest)
            except DriverError as e:  # a symlink, device or FIFO in the layout
                self.trees.bad[digest] = str(e)
                continue
            if found is None:
                absent.setdefault(digest, set()).add(repo)
            elif size >= 0 and found != size:
                self.trees.bad[digest] = f"blob has {found} bytes in the layout, not {size}"
        repositories = {repo for repo, _ in pairs} | self.listed_repositories()

        async def locate(digest: Digest, wanted: set[str]) -> None:
            for repo in [*sorted(wanted), *sorted(repositories - wanted)]:
                if await self.client.has_blob(repo, digest):
                    self.where[digest] = repo
                    return

        jobs = [functools.partial(locate, d, w) for d, w in absent.items()]
        await gather_limited(self.options.concurrency, jobs)
        unresolved = {d for d in absent if d not in self.where} | self.trees.missing
        if unresolved and self.meta is not None and self.meta.get("base"):
            chain = " -> ".join([*self.meta.get("chain", []), self.meta["id"]])
            raise FerryError(
                f"export {self.meta['id']} is an increment on export {self.meta['base']}, "
                f"whose content is not in {self.options.to}: import the chain in order ({chain})"
            )
        for digest in unresolved:
            self.trees.bad.setdefault(digest, f"missing from the layout and from {self.options.to}")
        return {k: s for k, s in pairs.items() if k[1] not in self.trees.bad}

    def listed_repositories(self) -> set[str]:
        return {self.dest(r) for r in (self.meta or {}).get("repositories", {})}

    async def push_blobs(self, pairs: dict[tuple[str, Digest], int]) -> None:
        """Every blob once per repository; the first repository to get a blob uploads it, the
        others wait for it and then mount it from there. An error a job could not handle
        stops the push once every job has ended."""
        slots = asyncio.Semaphore(self.options.concurrency)
        first: dict[Digest, asyncio.Future[str | None]] = {}
        jobs: list[Awaitable[None]] = []
        loop = asyncio.get_running_loop()
        for (repo, digest), size in pairs.items():
            leader = first.get(digest)
            if leader is None:
                leader = first[digest] = loop.create_future()
                jobs.append(self.lead(slots, repo, digest, size, leader))
            else:
                jobs.append(self.follow(slots, repo, digest, size, leader))
        todo = {d: s for (_, d), s in pairs.items() if d not in self.where}
        self.progress.start_bytes(sum(max(s, 0) for s in todo.values()))
        for result in await asyncio.gather(*jobs, return_exceptions=True):
            if isinstance(result, BaseException):
                raise result

    async def lead(
        self,
        slots: asyncio.Semaphore,
        repo: str,
        digest: Digest,
        size: int,
        done: asyncio.Future[str | None],
    ) -> None:
        holder = None
        try:
            async with slots:
                if await self.blob(repo, digest, size, self.where.get(digest)):
                    holder = repo
        finally:
            done.set_result(holder)

    async def follow(
        self,
        slots: asyncio.Semaphore,
        repo: str,
        digest: Digest,
        size: int,
        leader: asyncio.Future[str | None],
    ) -> None:
        # wait outside the slots, so that leaders always get one
        source = await asyncio.shield(leader)
        if digest in self.trees.bad:
            return
        async with slots:
            await self.blob(repo, digest, size, source or self.where.get(digest))

    async def blob(self, repo: str, digest: Digest, size: int, mount_from: str | None) -> bool:
        """Make ``repo`` hold the blob: present, mounted from ``mount_from``, or uploaded from
        the layout. False (and ``trees.bad`` says why) if it cannot."""
        reader = self.trees.reader
        try:
            if await self.client.has_blob(repo, digest):
                self.summary.present += 1
                return True
            if await reader.blob_size(digest) is None:  # an increment's: mount or nothing
                return await self.mount_only(repo, digest, mount_from)

            def open_at(offset: int) -> AsyncIterator[bytes]:
                return reader.driver.reader(oci.layout_blob(digest), offset, oci.CHUNK)

            mounted = await self.client.push_blob(
                repo, digest, size, open_at, self.progress.advance_bytes, mount_from
            )
        except (UpstreamAuthError, UpstreamUnreachable):
            raise  # the same for every blob: stop
        except (StoreError, UpstreamError) as e:
            self.trees.bad[digest] = str(e)
            return False
        if mounted:
            self.summary.mounted += 1
        else:
            self.summary.uploaded += 1
            self.summary.uploaded_bytes += max(size, 0)
        return True

    async def mount_only(self, repo: str, digest: Digest, source: str | None) -> bool:
        location = await self.client.start_upload(repo, digest, source) if source else ""
        if location is None:
            self.summary.mounted += 1
            return True
        if location:
            await self.client.cancel_upload(repo, location)
        why = f"{source} would not mount it" if source else "no repository to mount it from"
        self.trees.bad[digest] = f"not in the layout, and {why}"
        return False

    # ---- manifests and tags ------------------------------------------------------------------

    async def push_tree(self, target: Target) -> None:
        """Children first, each by digest and once per repository however many trees share
        it; a refused manifest is named in ``trees.bad`` (so the tree is not tagged)."""
        assert target.tree is not None
        for node in target.tree.walk():
            key = (target.repository, node.digest)
            if key not in self.manifests:
                self.manifests[key] = asyncio.ensure_future(self.push_manifest(*key, node))
            if not await asyncio.shield(self.manifests[key]):
                return
        self.progress.image_done(target)

    async def push_manifest(self, repo: str, digest: Digest, node: oci.ManifestTree) -> bool:
        try:
            if await self.client.manifest_digest(repo, str(digest)) is not None:
                self.summary.manifests_present += 1
                return True
            await self.client.put_manifest(repo, str(digest), node.body, node.media_type, digest)
        except UpstreamAuthError:
            raise
        except UpstreamError as e:
            self.trees.bad[digest] = str(e)
            return False
        self.summary.manifests += 1
        return True

    async def push_tag(self, repo: str, tag: str | None, tree: oci.ManifestTree | None) -> None:
        if tag is None or tree is None:
            return
        try:
            if await self.client.manifest_digest(repo, tag) != str(tree.digest):
                await self.client.put_manifest(repo, tag, tree.body, tree.media_type, tree.digest)
        except UpstreamError as e:
            self.trees.bad[tree.digest] = f"tag {tag}: {e}"
            self.trees.owners.setdefault(tree.digest, set()).add(repo)
            return
        self.summary.tags += 1

    async def restore_tags(self, tags: list[ListedTag]) -> None:
        """Tags the export lists without an index entry (on manifests an earlier export
        carried): pointed at those manifests, which must be in the target by now."""
        for repo, tag, digest in tags:
            body = await self.from_target(repo, digest)
            if body is None or Digest.of(body, digest.algorithm) != digest:
                self.trees.bad[digest] = f"tag {tag} points at a manifest not in the target"
                self.trees.owners.setdefault(digest, set()).add(repo)
                continue
            node, _ = oci.tree_from_body(digest, body, None)
            await self.push_tag(repo, tag, node)

    # ---- signatures and mirror configuration ---------------------------------------------------

    async def extras(self, reader: oci.LayoutReader) -> str:
        """With ``--out-dir``: the mirror configuration rendered for the target, and the
        release signatures (registries do not keep them). A note for the summary line."""
        signatures = await reader.signatures()
        configs = await reader.mirror_config()
        if not self.options.out_dir:
            if signatures or configs:
                return "; signatures and mirror configuration not written (give --out-dir)"
            return ""
        rendered = retarget(configs, self.options.to or "", self.options.plain_http)
        await write_out_dir(self.options.out_dir, rendered)
        out = oci.LayoutWriter(self.options.out_dir)
        for rel, data in signatures:
            await oci.put_layout_signature(out, rel, data)
        return f"; wrote {len(signatures)} signatures and {len(rendered)} configuration files"


def retarget(
    configs: list[tuple[str, bytes]], target: str, insecure: bool
) -> list[tuple[str, bytes]]:
    """The mirror configuration files again, each mirror ``<host>/<repo>`` now
    ``<target>/<repo>`` (``target`` is ``REGISTRY[/PREFIX]``); a configuration without its
    ``mirror-map.json`` is kept as it is."""
    by_name: dict[str, dict[str, bytes]] = {}
    for rel, data in configs:
        name, file = oci.check_mirror_config_name(rel)
        by_name.setdefault(name, {})[file] = data
    out: list[tuple[str, bytes]] = []
    for name, files in sorted(by_name.items()):
        try:
            doc = json.loads(files[MIRROR_MAP])
            host = str(doc["host"])
            m = snippets.MirrorMap(str(doc["name"]))
            for key, mapping in (("digests", m.digests), ("tags", m.tags)):
                for source, mirror in dict(doc.get(key) or {}).items():
                    mapping[str(source)] = f"{target}/{str(mirror).removeprefix(host + '/')}"
        except (KeyError, ValueError, TypeError, AttributeError):
            out += [(f"{name}/{file}", data) for file, data in files.items()]
            continue
        rendered = {f: t.encode() for f, t in snippets.render(m, insecure=insecure).items()}
        doc.update(host=target, insecure=insecure, digests=m.digests, tags=m.tags)
        rendered[MIRROR_MAP] = (json.dumps(doc, indent=1, sort_keys=True) + "\n").encode()
        kept = {f: d for f, d in files.items() if f not in rendered}  # e.g. the signature map
        out += [(f"{name}/{f}", d) for f, d in sorted({**kept, **rendered}.items())]
    return out
