"""Frozen value types parsed and validated once, where data enters: ``Digest``, ``Descriptor``,
repository names and tags.

Grammar from the OCI Distribution Spec v1.1 ("Pulling manifests", "Pushing manifests") and the
OCI Image Spec ``descriptor.md`` (digests): only registered algorithms are accepted, with their
exact encoded lengths, lowercase hex.
"""

from __future__ import annotations

import functools
import hashlib
import re
from dataclasses import dataclass
from typing import Any, Final

from .errors import InvalidDigest, InvalidName, InvalidReference

__all__ = [
    "Digest",
    "Descriptor",
    "ALGORITHMS",
    "MAX_NAME_LENGTH",
    "validate_name",
    "validate_tag",
    "is_digest_reference",
]

#: algorithm -> length of its hex encoding (image-spec descriptor.md, "Registered algorithms").
ALGORITHMS: Final = {"sha256": 64, "sha512": 128}

#: distribution-spec: a repository name; every path component starts with [a-z0-9], so no
#: component can begin with "_" (our metadata directories) or be "." / "..".
_NAME_RE: Final = re.compile(
    r"[a-z0-9]+(?:(?:\.|_|__|-+)[a-z0-9]+)*(?:/[a-z0-9]+(?:(?:\.|_|__|-+)[a-z0-9]+)*)*"
)
_TAG_RE: Final = re.compile(r"[a-zA-Z0-9_][a-zA-Z0-9._-]{0,127}")
_DIGEST_RE: Final = re.compile(r"([a-z0-9]+(?:[+._-][a-z0-9]+)*):([a-zA-Z0-9=_-]+)")

#: distribution's limit for a whole repository name (hostname-prefixed names fit easily).
MAX_NAME_LENGTH: Final = 255


@functools.lru_cache(maxsize=4096)
def validate_name(name: str) -> str:
    """Return ``name`` if it is a valid repository name, else raise ``InvalidName``.
    (Valid names are remembered: the same few repositories are asked for all day.)"""
    if len(name) > MAX_NAME_LENGTH:
        raise InvalidName(f"repository name longer than {MAX_NAME_LENGTH} characters")
    if not _NAME_RE.fullmatch(name):
        raise InvalidName(f"invalid repository name {name!r}")
    return name


def validate_tag(tag: str) -> str:
    """Return ``tag`` if it matches the OCI tag grammar, else raise ``InvalidReference``."""
    if not _TAG_RE.fullmatch(tag):
        raise InvalidReference(f"invalid tag {tag!r}")
    return tag


def is_digest_reference(reference: str) -> bool:
    """A manifest reference is a digest when it contains ':' (tags cannot)."""
    return ":" in reference


@dataclass(frozen=True, slots=True)
class Digest:
    """A content digest ``algorithm:hex``; construction through ``parse`` validates it."""

    algorithm: str
    hex: str

    @classmethod
    def parse(cls, text: str) -> Digest:
        return _parse_digest(text)

    @classmethod
    def _parse(cls, text: str) -> Digest:
        m = _DIGEST_RE.fullmatch(text)
        if m is None:
            raise InvalidDigest(f"invalid digest {text!r}")
        algorithm, encoded = m.group(1), m.group(2)
        length = ALGORITHMS.get(algorithm)
        if length is None:
            raise InvalidDigest(f"unsupported digest algorithm {algorithm!r}")
        if len(encoded) != length or not re.fullmatch(r"[0-9a-f]+", encoded):
            raise InvalidDigest(f"invalid {algorithm} digest {text!r}")
        return cls(algorithm, encoded)

    @classmethod
    def of(cls, data: bytes, algorithm: str = "sha256") -> Digest:
        return cls(algorithm, hashlib.new(algorithm, data).hexdigest())

    def hasher(self) -> Any:
        """A fresh hashlib object of this digest's algorithm."""
        return hashlib.new(self.algorithm)

    def __str__(self) -> str:
        return f"{self.algorithm}:{self.hex}"


@dataclass(frozen=True, slots=True)
class Descriptor:
    """What the store knows of a piece of content (image-spec descriptor.md field names)."""

    media_type: str
    digest: Digest
    size: int
    artifact_type: str | None = None
    annotations: dict[str, str] | None = None

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "mediaType": self.media_type,
            "digest": str(self.digest),
            "size": self.size,
        }
        if self.artifact_type:
            out["artifactType"] = self.artifact_type
        if self.annotations:
            out["annotations"] = self.annotations
        return out


@functools.lru_cache(maxsize=8192)
def _parse_digest(text: str) -> Digest:
    """``Digest._parse`` remembered: digests are frozen values and the same ones recur."""
    return Digest._parse(text)
