"""Tests of the upstream harness (tests/upstream.py): the token service, CNCF distribution
behind it, the raw HTTP and skopeo push helpers, and the lying upstream."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import json
import os
import urllib.error
import urllib.request
from pathlib import Path

import aiohttp
import jwt
import pytest

from tests.upstream import (
    DEFAULT_SERVICE,
    PULLER,
    DistributionUpstream,
    LyingUpstream,
    RegistryClient,
    Serve,
    Stall,
    Status,
    TokenService,
    Truncate,
    WrongBytes,
    distribution_upstream,
    generate_rsa_key,
    libtrust_key_id,
    lying_upstream,
    parse_bearer_challenge,
    push_to_upstream,
    skopeo_copy,
    token_service,
    upstream_authfile,
    upstream_client,
    write_authfile,
)

__all__ = [  # the fixtures, imported so that pytest finds them here
    "distribution_upstream",
    "lying_upstream",
    "token_service",
    "upstream_authfile",
    "upstream_client",
]

OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_CONFIG = "application/vnd.oci.image.config.v1+json"
OCI_LAYER = "application/vnd.oci.image.layer.v1.tar+gzip"

_OPENER = urllib.request.build_opener(urllib.request.ProxyHandler({}))


def sha256(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def random_bytes(seed: str, size: int) -> bytes:
    return hashlib.shake_256(seed.encode()).digest(size)


def manifest_for(config: bytes, layers: list[bytes]) -> bytes:
    doc = {
        "schemaVersion": 2,
        "mediaType": OCI_MANIFEST,
        "config": {"mediaType": OCI_CONFIG, "digest": sha256(config), "size": len(config)},
        "layers": [
            {"mediaType": OCI_LAYER, "digest": sha256(layer), "size": len(layer)}
            for layer in layers
        ],
    }
    # Deliberately not compact: a registry that re-serialises would change the digest.
    return (json.dumps(doc, indent=5) + "\n").encode()


def http_get(url: str, headers: dict[str, str] | None = None) -> tuple[int, dict[str, str], bytes]:
    req = urllib.request.Request(url, headers=headers or {})
    try:
        with _OPENER.open(req, timeout=10) as resp:
            return resp.status, dict(resp.headers.items()), resp.read()
    except urllib.error.HTTPError as exc:
        try:
            return exc.code, dict(exc.headers.items()), exc.read()
        finally:
            exc.close()


# --- token service -----------------------------------------------------------------------------


def test_key_id_is_libtrust_format(token_service: TokenService) -> None:
    kid = token_service.kid
    groups = kid.split(":")
    assert len(groups) == 12 and all(len(g) == 4 for g in groups)
    assert set(kid.replace(":", "")) <= set("ABCDEFGHIJKLMNOPQRSTUVWXYZ234567")
    assert kid == libtrust_key_id(token_service.key.public_key())
    assert token_service.cert_path.read_bytes().startswith(b"-----BEGIN CERTIFICATE-----")


def test_token_with_valid_credentials_grants_requested_scope(token_service: TokenService) -> None:
    token_service.expires_in = 123
    client = RegistryClient("http://unused", PULLER)
    answer = client.fetch_token(
        token_service.realm, DEFAULT_SERVICE, "repository:team/app:pull,push"
    )
    assert answer.status == 200
    doc = answer.json()
    assert doc["token"] == doc["access_token"]
    assert doc["expires_in"] == 123
    assert doc["issued_at"].endswith("Z")
    header = jwt.get_unverified_header(doc["token"])
    assert header["alg"] == "RS256" and header["kid"] == token_service.kid
    claims = jwt.decode(
        doc["token"],
        token_service.key.public_key(),
        algorithms=["RS256"],
        audience=DEFAULT_SERVICE,
        issuer=token_service.issuer,
    )
    assert claims["sub"] == "puller"
    assert claims["exp"] - claims["iat"] == 123
    assert claims["jti"]
    assert claims["access"] == [
        {"type": "repository", "name": "team/app", "actions": ["pull", "push"]}
    ]
    [logged] = token_service.requests
    assert logged.account == "puller" and logged.authenticated and logged.status == 200
    assert logged.scopes == ("repository:team/app:pull,push",)


def test_token_denied_for_wrong_credentials(token_service: TokenService) -> None:
    answer = RegistryClient("http://unused", ("puller", "wrong")).fetch_token(
        token_service.realm, DEFAULT_SERVICE, "repository:x:pull"
    )
    assert answer.status == 401
    assert answer.headers["WWW-Authenticate"].startswith("Basic ")
    assert token_service.count(status=401) == 1


def test_anonymous_token_has_no_access_unless_configured(token_service: TokenService) -> None:
    anonymous = RegistryClient("http://unused", None)
    doc = anonymous.fetch_token(token_service.realm, DEFAULT_SERVICE, "repository:x:pull").json()
    assert jwt.decode(doc["token"], options={"verify_signature": False})["access"] == []
    token_service.anonymous_actions = ("pull",)
    doc = anonymous.fetch_token(
        token_service.realm, DEFAULT_SERVICE, "repository:x:pull,push"
    ).json()
    access = jwt.decode(doc["token"], options={"verify_signature": False})["access"]
    assert access == [{"type": "repository", "name": "x", "actions": ["pull"]}]
    token_service.require_auth = True
    assert anonymous.fetch_token(token_service.realm, DEFAULT_SERVICE, None).status == 401


# --- distribution ------------------------------------------------------------------------------


def test_anonymous_v2_gets_bearer_challenge(
    distribution_upstream: DistributionUpstream, token_service: TokenService
) -> None:
    status, headers, _ = http_get(f"{distribution_upstream.url}/v2/")
    assert status == 401
    challenge = parse_bearer_challenge(headers["Www-Authenticate"])
    assert challenge == {"realm": token_service.realm, "service": DEFAULT_SERVICE}
    assert distribution_upstream.url == f"http://{distribution_upstream.host}"


def test_push_and_pull_back_exact_bytes(
    distribution_upstream: DistributionUpstream,
    upstream_client: RegistryClient,
    token_service: TokenService,
) -> None:
    layer = random_bytes("layer", 5 * 1024 * 1024 + 17)
    config = b'{"architecture":"amd64","os":"linux","rootfs":{"type":"layers","diff_ids":[]}}'
    assert upstream_client.push_blob("team/app", layer) == sha256(layer)
    assert upstream_client.push_blob("team/app", config) == sha256(config)
    manifest = manifest_for(config, [layer])
    digest = upstream_client.push_manifest("team/app", "v1", manifest, OCI_MANIFEST)
    assert digest == sha256(manifest)

    by_tag = upstream_client.get_manifest("team/app", "v1")
    assert by_tag.status == 200
    assert by_tag.body == manifest
    assert by_tag.headers["Content-Type"] == OCI_MANIFEST
    assert by_tag.headers["Docker-Content-Digest"] == digest
    assert upstream_client.get_manifest("team/app", digest).body == manifest
    blob = upstream_client.get_blob("team/app", sha256(layer))
    assert blob.status == 200 and blob.body == layer

    # The push token covered pull,push; the pulls needed one more token (then cached).
    fetches = token_service.request_count
    upstream_client.get_blob("team/app", sha256(config))
    assert token_service.request_count == fetches
    assert all(r.authenticated for r in token_service.requests)


def test_wrong_credentials_cannot_push_or_pull(
    distribution_upstream: DistributionUpstream, upstream_client: RegistryClient
) -> None:
    upstream_client.push_blob("team/app", b"hello")
    for creds in (("puller", "nope"), ("nobody", "s3cret"), None):
        client = RegistryClient(distribution_upstream.url, creds)
        assert client.get_blob("team/app", sha256(b"hello")).status == 401
        with pytest.raises(RuntimeError, match="401"):
            client.push_blob("team/app", b"other")


def test_forged_tokens_are_rejected(
    distribution_upstream: DistributionUpstream,
    upstream_client: RegistryClient,
    token_service: TokenService,
    tmp_path: Path,
) -> None:
    """Distribution really checks the signature, audience and expiry (so it really uses the
    certificate and kid the harness produced)."""
    upstream_client.push_blob("team/app", b"hello")
    url = f"{distribution_upstream.url}/v2/team/app/blobs/{sha256(b'hello')}"
    access = [{"type": "repository", "name": "team/app", "actions": ["pull"]}]

    def status_with(token: str) -> int:
        return http_get(url, {"Authorization": f"Bearer {token}"})[0]

    assert status_with(token_service.issue_token("puller", access)) == 200
    assert status_with(token_service.issue_token("puller", access, audience="other")) == 401
    assert status_with(token_service.issue_token("puller", access, expires_in=-600)) == 401
    assert status_with(token_service.issue_token("puller", [])) == 401
    stranger = TokenService(tmp_path / "stranger", key=generate_rsa_key())
    assert status_with(stranger.issue_token("puller", access)) == 401


def test_count_requests_counts_exactly_the_blob_gets(
    distribution_upstream: DistributionUpstream, upstream_client: RegistryClient
) -> None:
    data = random_bytes("counted", 2 * 1024 * 1024)
    other = b"another blob"
    digest = upstream_client.push_blob("team/app", data)
    upstream_client.push_blob("team/app", other)
    # The upload went through POST + PUT on /blobs/uploads/ and is not a blob GET.
    assert distribution_upstream.count_requests("GET", f"/v2/team/app/blobs/{digest}") == 0
    assert distribution_upstream.count_requests("PUT", "/v2/team/app/blobs/uploads/") == 2

    for _ in range(3):
        assert upstream_client.get_blob("team/app", digest).body == data
    upstream_client.get_blob("team/app", sha256(other))
    upstream_client.request("HEAD", f"/v2/team/app/blobs/{digest}")

    path = f"/v2/team/app/blobs/{digest}"
    # The first GET was answered 401 (the client held only a push token) before the token
    # dance; every request is logged, whatever its status.
    assert distribution_upstream.count_requests("GET", path, status=200) == 3
    assert distribution_upstream.count_requests("GET", path, status=401) == 1
    assert distribution_upstream.count_requests("GET", path) == 4
    assert distribution_upstream.count_requests("HEAD", path) == 1
    # Every unauthenticated attempt (the 401 before a token) is logged too.
    assert distribution_upstream.count_requests(None, "/v2/team/app/blobs/sha256:") >= 5
    entry = next(
        e for e in distribution_upstream.access_log() if e.path == path and e.status == 200
    )
    assert entry.method == "GET" and entry.status == 200 and entry.size == len(data)

    distribution_upstream.reset_counts()
    assert distribution_upstream.count_requests("GET", path) == 0
    upstream_client.get_blob("team/app", digest)  # the pull token is cached now
    assert distribution_upstream.count_requests("GET", path) == 1


def test_stop_and_start_keeps_content_and_port(
    distribution_upstream: DistributionUpstream, upstream_client: RegistryClient
) -> None:
    digest = upstream_client.push_blob("team/app", b"survives restarts")
    port = distribution_upstream.port
    distribution_upstream.stop()
    assert not distribution_upstream.running
    with pytest.raises(urllib.error.URLError):
        _OPENER.open(f"{distribution_upstream.url}/v2/", timeout=5).close()
    distribution_upstream.start()
    assert distribution_upstream.port == port
    assert upstream_client.get_blob("team/app", digest).body == b"survives restarts"


def test_distribution_without_auth(tmp_path: Path) -> None:
    if not os.access("/usr/bin/docker-registry", os.X_OK):
        pytest.skip("/usr/bin/docker-registry is not installed")
    with DistributionUpstream(tmp_path) as open_registry:
        client = RegistryClient(open_registry.url, None)
        digest = client.push_blob("free/for/all", b"no auth")
        assert client.get_blob("free/for/all", digest).body == b"no auth"


# --- auth file and skopeo ----------------------------------------------------------------------


def test_write_authfile(tmp_path: Path) -> None:
    path = write_authfile(
        tmp_path / "sub" / "auth.json", {"127.0.0.1:5000": PULLER, "quay.example": ("u", "p:w")}
    )
    doc = json.loads(path.read_text())
    assert doc == {
        "auths": {
            "127.0.0.1:5000": {"auth": base64.b64encode(b"puller:s3cret").decode()},
            "quay.example": {"auth": base64.b64encode(b"u:p:w").decode()},
        }
    }


def test_skopeo_push_of_synthetic_images_keeps_digests(
    distribution_upstream: DistributionUpstream,
    upstream_client: RegistryClient,
    upstream_authfile: Path,
    tmp_path: Path,
) -> None:
    images = pytest.importorskip("tests.images")
    image = images.sample_image("harness")
    digest = push_to_upstream(distribution_upstream, "synthetic/single:v1", image)
    assert digest == image.digest
    assert upstream_client.get_manifest("synthetic/single", "v1").body == image.manifest

    index = images.multi_arch_index("harness-multi", fmt=images.DOCKER)
    assert push_to_upstream(distribution_upstream, "synthetic/multi:v1", index) == index.digest
    for child in index.children:
        got = upstream_client.get_manifest("synthetic/multi", child.digest)
        assert got.body == child.manifest

    # From an on-disk OCI layout by transport reference, and read back with the auth file.
    layout = images.write_oci_layout(tmp_path / "layout", {"latest": image})
    push_to_upstream(distribution_upstream.host, "synthetic/layout:latest", f"oci:{layout}:latest")
    out = tmp_path / "out"
    skopeo_copy(
        f"docker://{distribution_upstream.host}/synthetic/layout:latest",
        f"dir:{out}",
        authfile=upstream_authfile,
    )
    manifest, blobs = images.read_dir_transport(out)
    assert manifest == image.manifest
    assert set(blobs) == {b.digest for b in image.blobs}


def test_skopeo_push_with_wrong_credentials_fails(
    distribution_upstream: DistributionUpstream,
) -> None:
    images = pytest.importorskip("tests.images")
    with pytest.raises(RuntimeError, match=r"unauthorized|401|denied"):
        push_to_upstream(
            distribution_upstream,
            "synthetic/denied:v1",
            images.sample_image("denied"),
            creds=("puller", "wrong"),
        )


# --- lying upstream ----------------------------------------------------------------------------


async def test_lying_upstream_serves_and_counts(lying_upstream: LyingUpstream) -> None:
    data = random_bytes("honest", 100_000)
    digest = lying_upstream.add_blob("lib/app", data)
    manifest = manifest_for(data, [])
    mdigest = lying_upstream.add_manifest("lib/app", manifest, OCI_MANIFEST, tags=("v1",))
    async with aiohttp.ClientSession(lying_upstream.url) as session:
        async with session.get("/v2/") as r:
            assert r.status == 200
        async with session.get(f"/v2/lib/app/blobs/{digest}") as r:
            assert r.status == 200 and await r.read() == data
            assert r.headers["Docker-Content-Digest"] == digest
        async with session.head(f"/v2/lib/app/blobs/{digest}") as r:
            assert r.status == 200 and r.content_length == len(data)
        async with session.get("/v2/lib/app/manifests/v1") as r:
            assert await r.read() == manifest
            assert r.headers["Content-Type"] == OCI_MANIFEST
            assert r.headers["Docker-Content-Digest"] == mdigest
        async with session.get(
            f"/v2/lib/app/blobs/{digest}", headers={"Range": "bytes=10-19"}
        ) as r:
            assert r.status == 206 and await r.read() == data[10:20]
        async with session.get(f"/v2/lib/app/blobs/{sha256(b'missing')}") as r:
            assert r.status == 404
            assert (await r.json())["errors"][0]["code"] == "BLOB_UNKNOWN"
    assert lying_upstream.count("GET", f"/v2/lib/app/blobs/{digest}") == 2
    assert lying_upstream.count("HEAD", "/blobs/") == 1
    assert lying_upstream.count_requests(None, "/v2/lib/app/") == 5
    lying_upstream.reset_counts()
    assert lying_upstream.count() == 0


async def test_lying_upstream_wrong_bytes(lying_upstream: LyingUpstream) -> None:
    data = random_bytes("lie", 4096)
    digest = lying_upstream.add_blob("lib/app", data, WrongBytes())
    async with aiohttp.ClientSession(lying_upstream.url) as session:
        async with session.get(f"/v2/lib/app/blobs/{digest}") as r:
            body = await r.read()
    assert r.status == 200 and r.headers["Docker-Content-Digest"] == digest
    assert len(body) == len(data) and body != data and sha256(body) != digest


async def test_lying_upstream_truncates(lying_upstream: LyingUpstream) -> None:
    data = random_bytes("short", 1_000_000)
    digest = lying_upstream.add_blob("lib/app", data, Truncate(send=1000), Serve())
    async with aiohttp.ClientSession(lying_upstream.url) as session:
        with pytest.raises(aiohttp.ClientPayloadError):
            async with session.get(f"/v2/lib/app/blobs/{digest}") as r:
                assert r.content_length == len(data)
                await r.read()
        # The next request is served correctly (the last behaviour sticks).
        for _ in range(2):
            async with session.get(f"/v2/lib/app/blobs/{digest}") as r:
                assert await r.read() == data


async def test_lying_upstream_stalls(lying_upstream: LyingUpstream) -> None:
    data = random_bytes("slow", 10_000)
    digest = lying_upstream.add_blob("lib/app", data)
    path = lying_upstream.blob_path("lib/app", digest)
    lying_upstream.set_behavior(path, Stall(seconds=30, send=100))
    timeout = aiohttp.ClientTimeout(sock_read=0.5)
    async with aiohttp.ClientSession(lying_upstream.url, timeout=timeout) as session:
        async with session.get(path) as r:
            assert r.status == 200
            assert await r.content.readexactly(100) == data[:100]
            with pytest.raises(asyncio.TimeoutError):
                await r.read()
        lying_upstream.set_behavior(path, Stall(seconds=0.2, send=10, then="finish"))
        async with session.get(path) as r:
            assert await r.read() == data
        lying_upstream.set_behavior(path, Stall(seconds=30, before_headers=True), method="GET")
        with pytest.raises(asyncio.TimeoutError):
            async with session.get(path) as r:
                pass
        async with session.head(path) as r:  # the GET-only plan leaves HEAD alone
            assert r.status == 200


async def test_lying_upstream_status_with_retry_after(lying_upstream: LyingUpstream) -> None:
    data = b"eventually"
    digest = lying_upstream.add_blob(
        "lib/app", data, Status(503, retry_after=2), Status(429, retry_after="1"), Serve()
    )
    async with aiohttp.ClientSession(lying_upstream.url) as session:
        for status, retry_after in ((503, "2"), (429, "1")):
            async with session.get(f"/v2/lib/app/blobs/{digest}") as r:
                assert r.status == status and r.headers["Retry-After"] == retry_after
                assert (await r.json())["errors"]
        async with session.get(f"/v2/lib/app/blobs/{digest}") as r:
            assert r.status == 200 and await r.read() == data


def test_lying_upstream_restart_same_port_and_images(tmp_path: Path) -> None:
    images = pytest.importorskip("tests.images")
    index = images.multi_arch_index("lying", architectures=("amd64", "arm64"))
    with LyingUpstream() as server:
        digest = server.add_image("lib/multi", index, tag="v1")
        port = server.port
        server.stop()
        server.start()
        assert server.port == port
        status, headers, body = http_get(f"{server.url}/v2/lib/multi/manifests/v1")
        assert status == 200 and body == index.manifest
        assert headers["Docker-Content-Digest"] == digest
        child = index.children[0]
        assert http_get(f"{server.url}/v2/lib/multi/manifests/{child.digest}")[2] == child.manifest


def test_no_processes_left_behind(tmp_path: Path) -> None:
    if not os.access("/usr/bin/docker-registry", os.X_OK):
        pytest.skip("/usr/bin/docker-registry is not installed")
    upstream = DistributionUpstream(tmp_path)
    upstream.start()
    process = upstream._process
    assert process is not None
    upstream.stop()
    assert process.returncode is not None
    assert not upstream.running
    upstream.stop()  # idempotent
