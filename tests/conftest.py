"""Fixtures shared by the unit tests: a store on a temporary root and an in-process client."""

from __future__ import annotations

import hashlib
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from aiohttp.test_utils import TestClient

from server.app import make_app
from server.config import Config, StorageConfig
from storage import FilesystemDriver, Store

# the upstream harness's fixtures (token_service, distribution_upstream, lying_upstream, ...)
pytest_plugins = ["tests.upstream"]


def sha256(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


@pytest.fixture
def store(tmp_path: Path) -> Store:
    return Store(FilesystemDriver(str(tmp_path / "root")))


@pytest.fixture
def config(tmp_path: Path) -> Config:
    return Config(storage=StorageConfig(root=str(tmp_path / "root")))


@pytest.fixture
async def client(aiohttp_client, config: Config) -> AsyncIterator[TestClient]:  # type: ignore[no-untyped-def]
    yield await aiohttp_client(make_app(config))
