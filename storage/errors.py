"""Domain errors of the store. They carry no HTTP: ``server.errors`` maps them at the edge.

Exception tree::

    StoreError
    ├── InvalidName          repository name fails the OCI regex or length limit
    ├── InvalidReference     tag fails the OCI tag regex
    ├── InvalidDigest        not ``algorithm:hex`` or an unsupported algorithm
    ├── DigestMismatch       content does not hash to the digest it claims
    ├── SizeMismatch         content length differs from the size it claims
    ├── BlobUnknown          blob not in the store or not linked into the repository
    ├── ManifestUnknown      manifest (by digest or tag) not in the repository
    ├── RepositoryUnknown    repository has no content at all
    ├── UploadUnknown        no such upload session in this repository
    ├── UploadOffsetInvalid  a chunk does not start where the upload ends
    ├── UploadBusy           another request is using the upload session
    ├── ManifestInvalid      manifest body is malformed or of an unsupported type
    ├── ManifestTooLarge     manifest body exceeds the configured limit
    └── ManifestBlobUnknown  manifest references content missing from the repository
"""

from __future__ import annotations

__all__ = [
    "StoreError",
    "InvalidName",
    "InvalidReference",
    "InvalidDigest",
    "DigestMismatch",
    "SizeMismatch",
    "BlobUnknown",
    "ManifestUnknown",
    "RepositoryUnknown",
    "UploadUnknown",
    "UploadOffsetInvalid",
    "UploadBusy",
    "ManifestInvalid",
    "ManifestTooLarge",
    "ManifestBlobUnknown",
]


class StoreError(Exception):
    """Base of every error the store raises on bad input or missing content."""


class InvalidName(StoreError):
    pass


class InvalidReference(StoreError):
    pass


class InvalidDigest(StoreError):
    pass


class DigestMismatch(StoreError):
    pass


class SizeMismatch(StoreError):
    pass


class BlobUnknown(StoreError):
    pass


class ManifestUnknown(StoreError):
    pass


class RepositoryUnknown(StoreError):
    pass


class UploadUnknown(StoreError):
    pass


class UploadBusy(StoreError):
    pass


class UploadOffsetInvalid(StoreError):
    def __init__(self, message: str, size: int) -> None:
        super().__init__(message)
        self.size = size


class ManifestInvalid(StoreError):
    pass


class ManifestTooLarge(StoreError):
    pass


class ManifestBlobUnknown(StoreError):
    def __init__(self, message: str, digest: str) -> None:
        super().__init__(message)
        self.digest = digest
