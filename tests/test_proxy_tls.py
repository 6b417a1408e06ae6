"""TLS to the upstream: verification on by default, an extra CA bundle per upstream, and
``tls_verify: false``. The upstream is our own registry served over HTTPS with a throwaway CA."""

from __future__ import annotations

import datetime
import ipaddress
import os
import ssl
from pathlib import Path

import pytest
from aiohttp import web
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from server import body
from server.app import make_app
from server.config import Config, StorageConfig, UpstreamConfig

from .oci import error_code, push_blob


def _cert(subject: str, key, issuer_name, issuer_key, *, ca: bool):  # type: ignore[no-untyped-def]
    now = datetime.datetime.now(datetime.UTC)
    builder = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)]))
        .issuer_name(issuer_name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
    )
    if not ca:
        builder = builder.add_extension(
            x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
            critical=False,
        )
    return builder.sign(issuer_key, hashes.SHA256())


@pytest.fixture
def pki(tmp_path: Path) -> dict[str, Path]:
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "bastion test CA")])
    ca = _cert("bastion test CA", ca_key, ca_name, ca_key, ca=True)
    key = ec.generate_private_key(ec.SECP256R1())
    cert = _cert("127.0.0.1", key, ca_name, ca_key, ca=False)
    out = {"ca": tmp_path / "ca.pem", "cert": tmp_path / "cert.pem", "key": tmp_path / "key.pem"}
    out["ca"].write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    out["cert"].write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    out["key"].write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return out


@pytest.fixture
async def https_upstream(tmp_path: Path, pki: dict[str, Path], aiohttp_client):  # type: ignore[no-untyped-def]
    app = make_app(Config(storage=StorageConfig(root=str(tmp_path / "up"))))
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.load_cert_chain(pki["cert"], pki["key"])
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0, ssl_context=ctx)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    plain = await aiohttp_client(app)  # to push content without TLS
    yield f"https://127.0.0.1:{port}", plain
    await runner.cleanup()


@pytest.mark.parametrize(
    ("settings", "works"),
    [({}, False), ({"ca_file": "CA"}, True), ({"tls_verify": False}, True)],
    ids=["system-trust-only", "ca-file", "no-verify"],
)
async def test_upstream_tls(
    aiohttp_client, tmp_path: Path, pki, https_upstream, settings, works: bool, caplog
) -> None:  # type: ignore[no-untyped-def]
    url, plain = https_upstream
    digest = await push_blob(plain, "team/app", b"over tls")
    if settings.get("ca_file") == "CA":
        settings = {"ca_file": str(pki["ca"])}
    up = UpstreamConfig(
        host="quay.io", url=url, namespace="quay.io", connect_timeout=2, read_timeout=5, **settings
    )
    cache = await aiohttp_client(
        make_app(
            Config(storage=StorageConfig(root=str(tmp_path / "cache")), upstreams={"quay.io": up})
        )
    )
    r = await cache.get(f"/v2/quay.io/team/app/blobs/{digest}")
    if works:
        assert r.status == 200 and await r.read() == b"over tls"
    else:
        assert r.status == 502 and await error_code(r) == "UNKNOWN"
        assert "quay.io" in (await r.json())["errors"][0]["message"]
        assert "CERTIFICATE_VERIFY_FAILED" in caplog.text  # the cause is in the registry log


async def test_large_blob_over_tls_is_received_into_reused_buffers(
    aiohttp_client, tmp_path: Path, pki, https_upstream, monkeypatch
) -> None:  # type: ignore[no-untyped-def]
    """A body big enough to be taken over (server.body) arrives whole through TLS."""
    taken: list[bool] = []
    real = body.take_over

    def spy(response, max_buffers=8):  # type: ignore[no-untyped-def]
        result = real(response, max_buffers)
        taken.append(result is not None)
        return result

    monkeypatch.setattr(body, "take_over", spy)
    url, plain = https_upstream
    data = os.urandom(5 * body.PIECE + 77)
    digest = await push_blob(plain, "team/big", data)
    up = UpstreamConfig(
        host="quay.io",
        url=url,
        namespace="quay.io",
        connect_timeout=2,
        read_timeout=5,
        ca_file=str(pki["ca"]),
    )
    cache = await aiohttp_client(
        make_app(
            Config(storage=StorageConfig(root=str(tmp_path / "cache")), upstreams={"quay.io": up})
        )
    )
    r = await cache.get(f"/v2/quay.io/team/big/blobs/{digest}")
    assert r.status == 200 and await r.read() == data
    assert taken == [True]
