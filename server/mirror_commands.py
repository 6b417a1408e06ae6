"""``bastion mirror release`` and ``bastion mirror image``: what they mirror where, and what
they print. The copying itself is ``server.mirror``."""

from __future__ import annotations

import errno
import functools
import json
import logging
import socket
import sys
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass

from storage import Digest, FilesystemDriver, Store, StoreError
from storage import layout as oci

from . import signatures as sigs
from . import snippets
from .config import Config, parse_listen
from .mirror import ImageJob, ManifestNode, Mirror, MirrorError, _size
from .progress import Progress
from .reference import ImageReference, ReferenceError
from .release import ARCHES, ReleaseError, read_payload
from .signatures import SignatureError
from .upstream import UpstreamError

__all__ = ["MIRROR_MAP", "MirrorOptions", "mirror_release", "mirror_images", "CommandError"]

log = logging.getLogger("bastion.mirror")

#: Kept beside the configuration files: the map they were rendered from (JSON), so that
#: ``bastion import --to`` can render them again for the registry it pushes to.
MIRROR_MAP = "mirror-map.json"


class CommandError(Exception):
    """A failure to report as one line, exit code 1."""


class UsageError(CommandError):
    """Bad input from the user (a malformed reference, an unreadable list): exit code 2."""


@dataclass
class MirrorOptions:
    to: str | None = None
    authfile: str | None = None
    out_dir: str | None = None
    mirror_host: str | None = None
    concurrency: int = 8
    dry_run: bool = False
    signatures_from: str | None = None
    insecure: bool = False


def default_mirror_host(config: Config) -> str:
    _, port = parse_listen(config.listen)
    return f"{socket.getfqdn()}:{port}"


def _store(config: Config) -> Store:
    return Store(FilesystemDriver(config.storage.root), config.limits.manifest_size)


def _platform_child(root: ManifestNode) -> ManifestNode:
    """The child of a multi-arch release to read the payload from: linux/amd64 if present."""
    doc = json.loads(root.body)
    for entry in doc.get("manifests", []):
        platform = entry.get("platform") or {}
        if platform.get("architecture") == "amd64" and platform.get("os", "linux") == "linux":
            for child in root.children:
                if str(child.digest) == entry.get("digest"):
                    return child
    return root.children[0]


def _layers(node: ManifestNode) -> list[Digest]:
    doc = json.loads(node.body)
    return [Digest.parse(layer["digest"]) for layer in doc.get("layers", [])]


def _architecture(image_config: bytes) -> str:
    try:
        arch = json.loads(image_config).get("architecture", "")
    except ValueError:
        arch = ""
    return ARCHES.get(arch, arch or "unknown")


def _print_dry_run(jobs: list[ImageJob], missing: dict[Digest, tuple[int, ImageJob]]) -> None:
    out = sys.stdout
    total = sum(size for size, _ in missing.values())
    for job in jobs:
        assert job.root is not None
        label = f" ({job.label})" if job.label else ""
        out.write(f"{job.source.name}@{job.root.digest} -> {job.dest}{label}\n")
    out.write(f"would fetch {len(missing)} blobs, {_size(total)}; {len(jobs)} images\n")


def _write_out_dir(options: MirrorOptions, files: dict[str, str]) -> list[str]:
    """Write the configuration files to ``--out-dir`` first: "Success" is printed only after."""
    if not options.out_dir:
        return []
    try:
        return snippets.write(files, options.out_dir)
    except OSError as e:
        raise CommandError(
            f"the mirror is complete, but writing to --out-dir {options.out_dir} failed: "
            f"{e.strerror or e}"
        ) from None


def _emit(options: MirrorOptions, files: dict[str, str], written: list[str]) -> None:
    for name, content in files.items():
        sys.stdout.write(f"\n# {name}\n{content}")
    if written:
        sys.stdout.write(f"\nwrote {len(written)} files to {options.out_dir}\n")


async def _execute(mirror: Mirror, jobs: list[ImageJob], options: MirrorOptions) -> bool:
    """Run the jobs (or print the dry run). False for a dry run."""
    if options.dry_run:
        missing = await mirror.missing(mirror.blobs_of(jobs))
        _print_dry_run(jobs, missing)
        return False
    await mirror.run(jobs)
    return True


def _mirror_map(name: str, host: str, jobs: list[ImageJob]) -> snippets.MirrorMap:
    """Digest mirrors for every source repository; tag mirrors only where the destination
    holds one source repository's tags (a shared one would answer for others' tags too)."""
    m = snippets.MirrorMap(name)
    sources: dict[str, set[str]] = {}
    for job in jobs:
        sources.setdefault(job.dest, set()).add(job.source.name)
    for job in jobs:
        m.digests[job.source.name] = f"{host}/{job.dest}"
        if job.source.tag and job.source.tag in job.tags and len(sources[job.dest]) == 1:
            m.tags[job.source.name] = f"{host}/{job.dest}"
    return m


async def _keep_config(
    store: Store, m: snippets.MirrorMap, host: str, files: dict[str, str], insecure: bool
) -> None:
    """Keep the configuration in the store (``mirror-config/<name>/``, replacing an earlier
    run's) so that ``bastion export`` carries it across the air gap."""
    kept = {name: text.encode() for name, text in files.items()}
    doc = {"name": m.name, "host": host, "insecure": insecure, "digests": m.digests, "tags": m.tags}
    kept[MIRROR_MAP] = (json.dumps(doc, indent=1, sort_keys=True) + "\n").encode()
    await oci.keep_mirror_config(store, m.name, kept)


def _wrap_errors(exc: BaseException) -> CommandError:
    if isinstance(exc, OSError) and exc.errno == errno.ENOSPC:
        return CommandError(f"disk full writing to the store: {exc.filename or ''}".rstrip())
    return CommandError(str(exc))


async def mirror_release(config: Config, source: str, options: MirrorOptions) -> int:
    try:
        ref = ImageReference.parse(source)
    except ReferenceError as e:
        raise UsageError(str(e)) from None
    store = _store(config)
    with Progress(enabled=not options.dry_run) as progress:
        mirror = Mirror(
            config,
            store,
            authfile=options.authfile,
            concurrency=options.concurrency,
            progress=progress,
        )
        try:
            return await _mirror_release(mirror, store, config, ref, options)
        except (MirrorError, ReleaseError, SignatureError, UpstreamError, StoreError, OSError) as e:
            raise _wrap_errors(e) from None
        finally:
            await mirror.close()


async def _mirror_release(
    mirror: Mirror, store: Store, config: Config, ref: ImageReference, options: MirrorOptions
) -> int:
    release_dest = options.to or mirror.local_name(ref)
    release_job = ImageJob(ref, release_dest, label="release")
    await mirror.plan([release_job])
    root = release_job.root
    assert root is not None
    image = _platform_child(root) if root.children else root
    with tempfile.TemporaryDirectory(prefix="bastion-release-") as scratch:
        # a dry run reads the payload from scratch files; a real run fetches the release
        # image's blobs into the store (they are mirrored anyway) and reads them there
        if options.dry_run:
            fetch = functools.partial(mirror.download, ref, scratch)
        else:
            await mirror.fetch_blobs([ImageJob(ref, release_dest, root=image)])
            fetch = functools.partial(_stored_path, store)
        payload = await read_payload(fetch, _layers(image))
        image_config = await fetch(image.blobs[0][0])
        with open(image_config, "rb") as f:
            arch = "multi" if root.children else _architecture(f.read(1 << 20))
    version_tag = f"{payload.version}-{arch}"
    if options.to:
        release_job.tags = [version_tag]
    elif ref.tag:
        release_job.tags = [ref.tag]
    components = []
    for name, component in payload.components:
        dest = options.to or mirror.local_name(component)
        tags = [f"{version_tag}-{name}"] if options.to else []
        components.append(ImageJob(component, dest, tags, label=name))
    # the release last: its tag appears once every image it names is in the store
    jobs = [*components, release_job]
    mirror.progress.set_total_images(len(jobs))
    log.info(
        "release %s (%s): %d components", payload.version, root.digest, len(payload.components)
    )
    await mirror.plan(components)
    # before the copy, as oc verifies first: a missing signature must not cost a whole mirror
    # its configuration output
    signatures = None
    if options.signatures_from:
        signatures = await sigs.fetch_signatures(options.signatures_from, root.digest)
    if not await _execute(mirror, jobs, options):
        return 0
    host = options.mirror_host or default_mirror_host(config)
    sources = _mirror_map(f"release-{payload.version}".replace("_", "-").lower(), host, jobs)
    files = snippets.render(sources, insecure=options.insecure)
    if signatures is not None:
        await sigs.keep(store, root.digest, signatures)
        if options.out_dir:
            sigs.write_files(options.out_dir, root.digest, signatures)
        files["signature-configmap.yaml"] = sigs.configmap(root.digest, signatures)
    await _keep_config(store, sources, host, files, options.insecure)
    written = _write_out_dir(options, files)
    out = sys.stdout
    out.write("Success\n")
    # a reference that can be pulled as it is: by tag, or by digest if the release has none
    pin = f":{release_job.tags[0]}" if release_job.tags else f"@{root.digest}"
    out.write(f"Update image:  {host}/{release_dest}{pin}\n")
    out.write(f"Release digest: {root.digest}\n")
    out.write(f"Mirror prefix: {host}/{release_dest}\n")
    out.write(f"Summary: {mirror.summary.line()}\n")
    _emit(options, files, written)
    return 0


async def _stored_path(store: Store, digest: Digest) -> str:
    path = store.blob_local_path(digest)
    assert path is not None
    return path


def _refuse_shared_tags(jobs: list[ImageJob]) -> None:
    """Two source repositories whose images would get the same tag in one destination (``--to``):
    the second would silently take the first one's tag."""
    owner: dict[tuple[str, str], str] = {}
    for job in jobs:
        for tag in job.tags:
            first = owner.setdefault((job.dest, tag), job.source.name)
            if first != job.source.name:
                raise UsageError(
                    f"{first}:{tag} and {job.source.name}:{tag} would both be tagged {tag} in "
                    f"{job.dest}; mirror them to separate repositories or by digest"
                )


def read_list(path: str) -> list[str]:
    """The references in a ``--from-file`` list: one per line, ``#`` comments and blank lines
    skipped. A malformed line is named with its line number."""
    refs: list[str] = []
    try:
        with open(path, encoding="utf-8") as f:
            for number, line in enumerate(f, 1):
                text = line.strip()
                if not text or text.startswith("#"):
                    continue
                try:
                    ImageReference.parse(text)
                except ReferenceError as e:
                    raise UsageError(f"{path} line {number}: {e}") from None
                refs.append(text)
    except IsADirectoryError:
        raise UsageError(f"--from-file {path} is a directory, not a list of images") from None
    except UnicodeDecodeError:
        raise UsageError(f"--from-file {path} is not UTF-8 text") from None
    except OSError as e:
        raise UsageError(f"cannot read --from-file {path}: {e.strerror}") from None
    return refs


async def mirror_images(config: Config, sources: Sequence[str], options: MirrorOptions) -> int:
    try:
        refs = [ImageReference.parse(s) for s in sources]
    except ReferenceError as e:
        raise UsageError(str(e)) from None
    if not refs:
        raise UsageError("no images given")
    store = _store(config)
    with Progress(enabled=not options.dry_run, total_images=len(refs)) as progress:
        mirror = Mirror(
            config,
            store,
            authfile=options.authfile,
            concurrency=options.concurrency,
            progress=progress,
        )
        try:
            jobs = [
                ImageJob(ref, options.to or mirror.local_name(ref), [ref.tag] if ref.tag else [])
                for ref in refs
            ]
            _refuse_shared_tags(jobs)
            await mirror.plan(jobs)
            if not await _execute(mirror, jobs, options):
                return 0
        except (MirrorError, UpstreamError, StoreError, OSError) as e:
            raise _wrap_errors(e) from None
        finally:
            await mirror.close()
    host = options.mirror_host or default_mirror_host(config)
    mirror_map = _mirror_map("bastion-images", host, jobs)
    files = snippets.render(mirror_map, insecure=options.insecure)
    try:
        await _keep_config(store, mirror_map, host, files, options.insecure)
    except (StoreError, OSError) as e:
        raise _wrap_errors(e) from None
    written = _write_out_dir(options, files)
    sys.stdout.write(f"Success\nSummary: {mirror.summary.line()}\n")
    _emit(options, files, written)
    return 0
