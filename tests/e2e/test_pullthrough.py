"""The pull-through cache with real parts: CNCF distribution behind RS256 token auth as the
upstream "quay.io", reached through a pull secret; podman pulling through a registries.conf
mirror as an OpenShift node does; bastion serving with two workers."""

from __future__ import annotations

import concurrent.futures
import hashlib
import json
import os
import tempfile
import textwrap
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.images import DOCKER, multi_arch_index, sample_image
from tests.upstream import (
    PULLER,
    DistributionUpstream,
    RegistryClient,
    TokenService,
    push_artifact,
    write_authfile,
)

from .conftest import ClientEnv, RegistryServer, Tool, start_registry, stop_registry

ART_DEV = "openshift-release-dev/ocp-v4.0-art-dev"
QUAY_ART_DEV = f"quay.io/{ART_DEV}"


def cache_config(upstream: DistributionUpstream, authfile: Path, **extra: object) -> str:
    settings = {"connect_timeout": 2, "read_timeout": 10, "tag_ttl": 300, **extra}
    lines = "\n".join(f"    {k}: {v}" for k, v in settings.items())
    return (
        textwrap.dedent(
            f"""\
        log_level: info
        upstreams:
          quay.io:
            url: {upstream.url}
            authfile: {authfile}
        """
        )
        + lines
        + "\n"
    )


@pytest.fixture
def pull_secret(tmp_path: Path) -> Path:
    """An OpenShift-style pull secret: credentials keyed by the name clients use (quay.io)."""
    return write_authfile(tmp_path / "pull-secret.json", {"quay.io": PULLER})


@pytest.fixture
def cache(
    tmp_path: Path, distribution_upstream: DistributionUpstream, pull_secret: Path
) -> Iterator[RegistryServer]:
    server = start_registry(tmp_path / "bastion", cache_config(distribution_upstream, pull_secret))
    try:
        yield server
    finally:
        stop_registry(server)


def get(url: str, timeout: float = 30) -> tuple[int, bytes, dict[str, str]]:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as r:
            return r.status, r.read(), dict(r.headers)
    except urllib.error.HTTPError as e:
        return e.code, e.read(), dict(e.headers)


def mirror_conf(client_env: ClientEnv, addr: str) -> str:
    return client_env.registries_conf(
        "pullthrough",
        textwrap.dedent(
            f"""\
            unqualified-search-registries = []

            [[registry]]
            location = "{QUAY_ART_DEV}"
            blocked = true

            [[registry.mirror]]
            location = "{addr}/{QUAY_ART_DEV}"
            insecure = true
            pull-from-mirror = "digest-only"
            """
        ),
    )


def test_node_pulls_through_the_cache_then_offline(
    cache: RegistryServer,
    distribution_upstream: DistributionUpstream,
    upstream_client: RegistryClient,
    podman: Tool,
    client_env: ClientEnv,
    tmp_path: Path,
) -> None:
    index = multi_arch_index("pullthrough-index")
    single = sample_image("pullthrough-docker", fmt=DOCKER)
    index_digest = push_artifact(upstream_client, ART_DEV, index)
    single_digest = push_artifact(upstream_client, ART_DEV, single)
    node = podman.with_env(CONTAINERS_REGISTRIES_CONF=mirror_conf(client_env, cache.addr))
    for digest in (index_digest, single_digest):
        node("pull", "--signature-policy", client_env.policy, f"{QUAY_ART_DEV}@{digest}")
        info = json.loads(node("image", "inspect", f"{QUAY_ART_DEV}@{digest}").stdout)[0]
        assert info["Digest"] == digest
    # the manifests the cache serves are the upstream's exact bytes
    status, body, headers = get(f"http://{cache.addr}/v2/{QUAY_ART_DEV}/manifests/{index_digest}")
    assert status == 200 and hashlib.sha256(body).hexdigest() == index_digest.split(":")[1]
    assert headers["Content-Type"] == index.media_type

    distribution_upstream.stop()
    libpod = tempfile.mkdtemp(prefix="p", dir=client_env.short)
    fresh = Tool(
        (podman.argv[0], *client_env.store_flags(tmp_path / "offline"), "--tmpdir", libpod),
        podman.env,
    ).with_env(CONTAINERS_REGISTRIES_CONF=mirror_conf(client_env, cache.addr))
    for digest in (index_digest, single_digest):
        fresh("pull", "--signature-policy", client_env.policy, f"{QUAY_ART_DEV}@{digest}")
    # something never cached: a prompt OCI error, not a hang
    started = time.monotonic()
    missing = "sha256:" + "0" * 64
    status, body, _ = get(f"http://{cache.addr}/v2/{QUAY_ART_DEV}/manifests/{missing}")
    assert status == 502
    assert json.loads(body)["errors"][0]["code"] == "UNKNOWN"
    assert "quay.io" in json.loads(body)["errors"][0]["message"]
    assert time.monotonic() - started < 10


def test_skopeo_lists_upstream_tags_through_the_cache(
    cache: RegistryServer,
    distribution_upstream: DistributionUpstream,
    upstream_client: RegistryClient,
    skopeo: Tool,
) -> None:
    """``skopeo list-tags`` on a pull-through repository shows the upstream's tags (asked with
    the pull secret's token), not only what happens to be cached; offline, what is cached."""
    push_artifact(upstream_client, ART_DEV, sample_image("tags-a", fmt=DOCKER), "4.99.0-a")
    push_artifact(upstream_client, ART_DEV, sample_image("tags-b", fmt=DOCKER), "4.99.0-b")
    ref = f"docker://{cache.addr}/{QUAY_ART_DEV}"
    listed = skopeo("list-tags", "--tls-verify=false", ref).json()
    assert listed["Tags"] == ["4.99.0-a", "4.99.0-b"]
    status, _, _ = get(f"http://{cache.addr}/v2/{QUAY_ART_DEV}/manifests/4.99.0-b")
    assert status == 200
    distribution_upstream.stop()
    assert skopeo("list-tags", "--tls-verify=false", ref).json()["Tags"] == ["4.99.0-b"]


def test_stampede_one_upstream_fetch_across_workers(
    cache: RegistryServer,
    distribution_upstream: DistributionUpstream,
    upstream_client: RegistryClient,
) -> None:
    blob = os.urandom(16 * 1024 * 1024)
    digest = upstream_client.push_blob(ART_DEV, blob)
    distribution_upstream.reset_counts()
    url = f"http://{cache.addr}/v2/{QUAY_ART_DEV}/blobs/{digest}"
    with concurrent.futures.ThreadPoolExecutor(20) as pool:
        results = list(pool.map(lambda _: get(url, timeout=60), range(20)))
    assert [status for status, _, _ in results] == [200] * 20
    assert all(body == blob for _, body, _ in results)
    assert distribution_upstream.count_requests("GET", f"/blobs/{digest}", status=200) == 1
    # now cached: more clients, no more upstream fetches
    assert get(url)[1] == blob
    assert distribution_upstream.count_requests("GET", f"/blobs/{digest}", status=200) == 1


def test_tokens_are_cached(
    cache: RegistryServer, token_service: TokenService, upstream_client: RegistryClient
) -> None:
    digests = [upstream_client.push_blob(ART_DEV, os.urandom(1000)) for _ in range(10)]
    token_service.reset()
    for d in digests:
        assert get(f"http://{cache.addr}/v2/{QUAY_ART_DEV}/blobs/{d}")[0] == 200
    # one token per worker process at most, not one per request
    assert 1 <= token_service.count(scope_substring=ART_DEV) <= 2


def test_refused_credentials_are_logged_not_shown(
    tmp_path: Path, distribution_upstream: DistributionUpstream, upstream_client: RegistryClient
) -> None:
    digest = upstream_client.push_blob(ART_DEV, b"secret layer")
    bad = write_authfile(tmp_path / "bad.json", {"quay.io": ("puller", "wrong")})
    server = start_registry(tmp_path / "b", cache_config(distribution_upstream, bad), workers=1)
    try:
        status, body, _ = get(f"http://{server.addr}/v2/{QUAY_ART_DEV}/blobs/{digest}")
        message = json.loads(body)["errors"][0]["message"]
        assert status == 502
        # the client learns which upstream failed; the pull secret's details stay in the log
        assert "quay.io" in message and str(bad) not in message and "puller" not in message
        log = server.log.read_text()
        assert str(bad) in log and "puller" in log and "refused the credentials" in log
    finally:
        stop_registry(server)


def test_concurrent_misses_share_one_token_request(
    tmp_path: Path,
    distribution_upstream: DistributionUpstream,
    token_service: TokenService,
    upstream_client: RegistryClient,
    pull_secret: Path,
) -> None:
    digests = [upstream_client.push_blob(ART_DEV, os.urandom(5000)) for _ in range(12)]
    server = start_registry(
        tmp_path / "one", cache_config(distribution_upstream, pull_secret), workers=1
    )
    try:
        token_service.reset()
        url = f"http://{server.addr}/v2/{QUAY_ART_DEV}/blobs/"
        with concurrent.futures.ThreadPoolExecutor(12) as pool:
            statuses = [s for s, _, _ in pool.map(lambda d: get(url + d), digests)]
        assert statuses == [200] * 12
        assert token_service.count(scope_substring=ART_DEV) == 1
    finally:
        stop_registry(server)
