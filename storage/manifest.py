"""Reading manifests without changing them: media type, the content they reference, subject.

The bytes are never re-serialised; this module only parses them to learn what a PUT must check
(image-spec ``manifest.md``, ``image-index.md``; Docker schema2 and manifest list).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any, Final

from .digest import Descriptor, Digest
from .errors import InvalidDigest, ManifestInvalid

__all__ = [
    "OCI_MANIFEST",
    "OCI_INDEX",
    "DOCKER_MANIFEST",
    "DOCKER_LIST",
    "SCHEMA1_TYPES",
    "IMAGE_TYPES",
    "INDEX_TYPES",
    "MANIFEST_TYPES",
    "ParsedManifest",
    "parse_manifest",
]

OCI_MANIFEST: Final = "application/vnd.oci.image.manifest.v1+json"
OCI_INDEX: Final = "application/vnd.oci.image.index.v1+json"
DOCKER_MANIFEST: Final = "application/vnd.docker.distribution.manifest.v2+json"
DOCKER_LIST: Final = "application/vnd.docker.distribution.manifest.list.v2+json"
SCHEMA1_TYPES: Final = frozenset(
    {
        "application/vnd.docker.distribution.manifest.v1+json",
        "application/vnd.docker.distribution.manifest.v1+prettyjws",
    }
)
IMAGE_TYPES: Final = frozenset({OCI_MANIFEST, DOCKER_MANIFEST})
INDEX_TYPES: Final = frozenset({OCI_INDEX, DOCKER_LIST})
MANIFEST_TYPES: Final = IMAGE_TYPES | INDEX_TYPES

#: Layers that may live elsewhere (``urls``) and need not be in the registry.
_FOREIGN_LAYER_TYPES: Final = frozenset(
    {
        "application/vnd.docker.image.rootfs.foreign.diff.tar.gzip",
        "application/vnd.oci.image.layer.nondistributable.v1.tar",
        "application/vnd.oci.image.layer.nondistributable.v1.tar+gzip",
        "application/vnd.oci.image.layer.nondistributable.v1.tar+zstd",
    }
)


#: Content-Types that say nothing about which manifest format the body is.
_GENERIC_TYPES: Final = frozenset({"application/json", "application/octet-stream", "text/plain"})


@dataclass(frozen=True)
class ParsedManifest:
    media_type: str
    blobs: tuple[Digest, ...] = ()  # config and layers that must be in the repository
    children: tuple[Digest, ...] = ()  # index entries that must be in the repository
    subject: Digest | None = None
    artifact_type: str | None = None  # for the referrers API
    annotations: dict[str, str] | None = field(default=None, hash=False)

    def descriptor(self, digest: Digest, size: int) -> Descriptor:
        return Descriptor(self.media_type, digest, size, self.artifact_type, self.annotations)


def _descriptor_digest(obj: Any, where: str) -> Digest:
    if not isinstance(obj, dict) or not isinstance(obj.get("digest"), str):
        raise ManifestInvalid(f"{where}: descriptor without a digest")
    if not isinstance(obj.get("size"), int) or obj["size"] < 0:
        raise ManifestInvalid(f"{where}: descriptor without a valid size")
    try:
        return Digest.parse(obj["digest"])
    except InvalidDigest as e:
        raise ManifestInvalid(f"{where}: {e}") from None


def _descriptors(doc: dict[str, Any], key: str) -> list[dict[str, Any]]:
    value = doc.get(key, [])
    if not isinstance(value, list):
        raise ManifestInvalid(f"{key!r} must be a list")
    return value


def parse_manifest(body: bytes, content_type: str | None) -> ParsedManifest:
    """Parse a pushed manifest. ``content_type`` is the request's Content-Type (without
    parameters) or None; it wins over the body's ``mediaType``, and the two must agree when both
    are present. Raises ``ManifestInvalid`` for anything that cannot be stored."""
    try:
        doc = json.loads(body)
    except (ValueError, UnicodeDecodeError) as e:
        raise ManifestInvalid(f"manifest is not valid JSON: {e}") from None
    if not isinstance(doc, dict):
        raise ManifestInvalid("manifest is not a JSON object")
    body_type = doc.get("mediaType")
    if body_type is not None and not isinstance(body_type, str):
        raise ManifestInvalid("mediaType must be a string")
    if content_type in _GENERIC_TYPES:
        content_type = None  # a client that did not say; the body decides
    media_type = content_type or body_type
    if content_type and body_type and content_type != body_type:
        raise ManifestInvalid(
            f"Content-Type {content_type!r} does not match the manifest's mediaType {body_type!r}"
        )
    if media_type is None:
        # image-spec: mediaType SHOULD be set; infer the OCI type from the shape.
        media_type = OCI_INDEX if "manifests" in doc else OCI_MANIFEST
    if media_type in SCHEMA1_TYPES or doc.get("schemaVersion") == 1:
        raise ManifestInvalid(
            "Docker schema1 manifests are not supported (deprecated; push schema2 or OCI)"
        )
    if media_type not in MANIFEST_TYPES:
        raise ManifestInvalid(f"unsupported manifest media type {media_type!r}")
    if doc.get("schemaVersion") != 2:
        raise ManifestInvalid("schemaVersion must be 2")

    subject = None
    if "subject" in doc:
        subject = _descriptor_digest(doc["subject"], "subject")
    annotations = doc.get("annotations")
    if annotations is not None and not isinstance(annotations, dict):
        raise ManifestInvalid("annotations must be an object")
    artifact_type = doc.get("artifactType")
    if artifact_type is not None and not isinstance(artifact_type, str):
        raise ManifestInvalid("artifactType must be a string")

    if media_type in IMAGE_TYPES:
        config = doc.get("config")
        blobs = [_descriptor_digest(config, "config")]
        if artifact_type is None and isinstance(config, dict):
            artifact_type = config.get("mediaType")
        for i, layer in enumerate(_descriptors(doc, "layers")):
            digest = _descriptor_digest(layer, f"layers[{i}]")
            if layer.get("mediaType") in _FOREIGN_LAYER_TYPES and layer.get("urls"):
                continue
            blobs.append(digest)
        return ParsedManifest(media_type, tuple(blobs), (), subject, artifact_type, annotations)

    children = tuple(
        _descriptor_digest(m, f"manifests[{i}]")
        for i, m in enumerate(_descriptors(doc, "manifests"))
    )
    return ParsedManifest(media_type, (), children, subject, artifact_type, annotations)
