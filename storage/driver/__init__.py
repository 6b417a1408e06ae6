"""Storage drivers: bytes at paths (see ``base`` for the contract)."""

from .base import (
    DriverError,
    FileInfo,
    FileWriter,
    InvalidOffset,
    InvalidPath,
    NotRegularFile,
    PathNotFound,
    StorageDriver,
)
from .filesystem import FilesystemDriver

__all__ = [
    "DriverError",
    "FileInfo",
    "FileWriter",
    "InvalidOffset",
    "InvalidPath",
    "NotRegularFile",
    "PathNotFound",
    "StorageDriver",
    "FilesystemDriver",
]
