"""Reading an OpenShift release payload (see ../shared/OCP-RELEASE.md).

The release image carries ``release-manifests/image-references`` (an ImageStream of component
images by digest) and ``release-manifests/release-metadata`` (Cincinnati metadata with the
version). As ``oc`` does, layers are read top to bottom and the first copy of a name wins; a
whiteout (``.wh.<name>``) in an upper layer hides lower copies. Layers are streamed through
``tarfile`` from the stored blob (never held whole in memory); only the two small files are
read, each up to ``MAX_FILE``.
"""

from __future__ import annotations

import asyncio
import json
import logging
import tarfile
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, Final

import yaml

from storage import Digest

from .reference import ImageReference, ReferenceError

__all__ = ["ReleaseError", "ReleasePayload", "read_payload", "parse_image_references", "ARCHES"]

log = logging.getLogger("bastion.release")

IMAGE_REFERENCES: Final = "release-manifests/image-references"
RELEASE_METADATA: Final = "release-manifests/release-metadata"
#: Bound on each file read from the payload (real image-references are ~60 KiB).
MAX_FILE: Final = 16 * 1024 * 1024
#: Go architecture names (image config) -> the names release tags use.
ARCHES: Final = {"amd64": "x86_64", "arm64": "aarch64", "ppc64le": "ppc64le", "s390x": "s390x"}


class ReleaseError(Exception):
    """The release payload is missing or malformed (one line naming what)."""


@dataclass(frozen=True)
class ReleasePayload:
    version: str
    components: list[tuple[str, ImageReference]]
    metadata: dict[str, Any]


def _normalise(name: str) -> str:
    while name.startswith("./"):
        name = name[2:]
    return name.lstrip("/")


def _scan_layer(path: str, wanted: set[str], found: dict[str, bytes | None]) -> None:
    """Record in ``found`` the wanted files this layer has (None for a whiteout), for names
    not already found in an upper layer."""
    seen: dict[str, bytes | None] = {}
    try:
        with open(path, "rb") as f, tarfile.open(fileobj=f, mode="r|*") as tar:
            for member in tar:
                name = _normalise(member.name)
                directory, _, base = name.rpartition("/")
                if base.startswith(".wh."):
                    hidden = f"{directory}/{base[4:]}" if directory else base[4:]
                    if hidden in wanted and hidden not in found:
                        seen.setdefault(hidden, None)
                    continue
                if name not in wanted or name in found or name in seen or not member.isfile():
                    continue
                if member.size > MAX_FILE:
                    raise ReleaseError(
                        f"{name} in the release image is larger than {MAX_FILE} bytes"
                    )
                extracted = tar.extractfile(member)
                seen[name] = extracted.read() if extracted is not None else b""
    except (tarfile.TarError, EOFError, OSError) as e:
        raise ReleaseError(f"cannot read release image layer {path}: {e}") from None
    found.update(seen)


LayerPath = Callable[[Digest], Awaitable[str]]


async def read_files(
    path_of: LayerPath, layers: list[Digest], wanted: set[str]
) -> dict[str, bytes]:
    """The wanted files of an image with ``layers`` (bottom first); ``path_of`` gives a local
    file holding a layer's verified bytes. Upper layers are read first and lower ones only
    while something is still missing."""
    found: dict[str, bytes | None] = {}
    loop = asyncio.get_running_loop()
    for digest in reversed(layers):
        if wanted <= found.keys():
            break
        path = await path_of(digest)
        await loop.run_in_executor(None, _scan_layer, path, wanted, found)
    return {k: v for k, v in found.items() if v is not None}


def parse_image_references(data: bytes) -> tuple[str, list[tuple[str, ImageReference]]]:
    """(ImageStream name, [(component, digest reference)]) from ``image-references``."""
    try:
        doc = yaml.safe_load(data)
    except yaml.YAMLError as e:
        raise ReleaseError(f"image-references is not valid JSON or YAML: {e}") from None
    if (
        not isinstance(doc, dict)
        or doc.get("kind") != "ImageStream"
        or doc.get("apiVersion") != "image.openshift.io/v1"
    ):
        raise ReleaseError("image-references is not an image.openshift.io/v1 ImageStream")
    name = (doc.get("metadata") or {}).get("name")
    tags = (doc.get("spec") or {}).get("tags")
    if not isinstance(name, str) or not isinstance(tags, list) or not tags:
        raise ReleaseError("image-references has no metadata.name or no spec.tags")
    components: list[tuple[str, ImageReference]] = []
    for i, tag in enumerate(tags):
        source = tag.get("from") if isinstance(tag, dict) else None
        if not isinstance(source, dict) or source.get("kind") != "DockerImage":
            # not an image to mirror (oc adm release mirror passes over it the same way)
            log.warning("image-references spec.tags[%d] has no from.kind DockerImage: skipped", i)
            continue
        try:
            ref = ImageReference.parse(str(source.get("name", "")))
        except ReferenceError as e:
            raise ReleaseError(f"image-references spec.tags[{i}]: {e}") from None
        if ref.digest is None:
            raise ReleaseError(
                f"image-references spec.tags[{i}] ({tag.get('name')}) is not by digest"
            )
        components.append((str(tag.get("name")), ref))
    return name, components


async def read_payload(path_of: LayerPath, layers: list[Digest]) -> ReleasePayload:
    files = await read_files(path_of, layers, {IMAGE_REFERENCES, RELEASE_METADATA})
    if IMAGE_REFERENCES not in files:
        raise ReleaseError(f"the release image has no {IMAGE_REFERENCES}")
    name, components = parse_image_references(files[IMAGE_REFERENCES])
    metadata: dict[str, Any] = {}
    if RELEASE_METADATA in files:
        try:
            loaded = json.loads(files[RELEASE_METADATA])
        except ValueError as e:
            raise ReleaseError(f"release-metadata is not valid JSON: {e}") from None
        if isinstance(loaded, dict):
            metadata = loaded
    version = str(metadata.get("version") or name)
    return ReleasePayload(version, components, metadata)
