"""Image references as users write them: ``host[:port]/path[:tag][@digest]``.

Docker's reference grammar (distribution ``reference/regexp.go``): the first component is a
registry host if it contains ``.`` or ``:`` or is ``localhost``; a reference with no host is
refused here (a mirror tool must know which registry it reads from).
"""

from __future__ import annotations

from dataclasses import dataclass

from storage import (
    Digest,
    InvalidDigest,
    InvalidName,
    InvalidReference,
    validate_name,
    validate_tag,
)

__all__ = ["ImageReference", "ReferenceError"]


class ReferenceError(ValueError):
    """An image reference that cannot be parsed (one line naming it)."""


@dataclass(frozen=True, slots=True)
class ImageReference:
    host: str
    repository: str
    tag: str | None = None
    digest: Digest | None = None

    @classmethod
    def parse(cls, text: str) -> ImageReference:
        rest = text.strip()
        for scheme in ("docker://", "//"):
            rest = rest.removeprefix(scheme)
        digest = None
        if "@" in rest:
            rest, _, raw = rest.partition("@")
            try:
                digest = Digest.parse(raw)
            except InvalidDigest as e:
                raise ReferenceError(f"{text}: {e}") from None
        host, sep, path = rest.partition("/")
        if not sep or not ("." in host or ":" in host or host == "localhost"):
            raise ReferenceError(f"{text}: a registry host is required (e.g. quay.io/org/repo:tag)")
        tag = None
        last = path.rsplit("/", 1)[-1]
        if ":" in last:
            path, _, tag = path.rpartition(":")
            try:
                validate_tag(tag)
            except InvalidReference as e:
                raise ReferenceError(f"{text}: {e}") from None
        try:
            validate_name(path)
        except InvalidName as e:
            raise ReferenceError(f"{text}: {e}") from None
        if tag is None and digest is None:
            tag = "latest"
        return cls(host, path, tag, digest)

    @property
    def reference(self) -> str:
        """What to ask the registry for: the digest if known, else the tag."""
        return str(self.digest) if self.digest else str(self.tag)

    @property
    def name(self) -> str:
        return f"{self.host}/{self.repository}"

    def __str__(self) -> str:
        out = self.name
        if self.tag:
            out += f":{self.tag}"
        if self.digest:
            out += f"@{self.digest}"
        return out
