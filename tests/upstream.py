"""Upstream registries for pull-through and mirroring tests.

Three kinds of upstream, all on loopback, all usable from sync fixtures and async tests alike
(the Python servers run in a background thread with their own event loop; distribution is a
subprocess):

``TokenService``
    A Docker registry token server (``GET /token?service=...&scope=...`` with HTTP Basic
    credentials; RS256 JWTs whose ``kid`` is the libtrust key ID of the signing key). It
    writes a self-signed certificate for distribution's ``auth.token.rootcertbundle`` and
    keeps a log of every token request so that tests can assert on token caching.

``DistributionUpstream``
    The real CNCF distribution 2.8 (``/usr/bin/docker-registry serve``) behind the token
    service, storing on the filesystem under a temporary directory. It can be stopped and
    started again on the same port and data directory, and counts requests from its access
    log. Distribution writes one Apache *combined* log line per request to stdout, e.g.::

        127.0.0.1 - - [25/Nov/2026:05:04:23 +0000] "GET /v2/team/app/blobs/sha256:44f8.. HTTP/1.1" 200 1000 "" "Python-urllib/3.11"

    next to logrus lines (``time=... level=info msg="authorized request"`` and ``msg="response
    completed" ... http.request.method=GET http.request.uri="/v2/..."``) that are *not*
    counted. Every request gets a line, including the 401 a client receives before it fetches
    a token, so filter on ``status=200`` to count only requests that were served.

``LyingUpstream``
    A minimal registry (no auth) that serves content correctly or, per path, lies: wrong bytes
    with the right length, a truncated body, a stall, or 503/429 with ``Retry-After``.

Plus helpers to put content into an upstream: ``RegistryClient`` (raw HTTP with the token
dance, exact bytes), ``push_to_upstream`` (skopeo from an OCI layout, a ``dir:`` directory or
an in-memory ``tests.images`` artifact) and ``write_authfile`` (containers auth.json).

Fixtures (import them into a conftest): ``token_service``, ``distribution_upstream``,
``upstream_client``, ``upstream_authfile``, ``lying_upstream``. Credentials are
``PULLER = ("puller", "s3cret")``.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import datetime as _dt
import functools
import hashlib
import json
import os
import re
import shutil
import socket
import subprocess
import tempfile
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
import uuid
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final, Literal

import pytest
from aiohttp import web

__all__ = [
    "PULLER",
    "DEFAULT_SERVICE",
    "DEFAULT_ISSUER",
    "DISTRIBUTION_BINARY",
    "SKOPEO_BINARY",
    "libtrust_key_id",
    "generate_rsa_key",
    "TokenRequest",
    "TokenService",
    "AccessLogEntry",
    "DistributionUpstream",
    "RegistryResponse",
    "RegistryClient",
    "parse_bearer_challenge",
    "write_authfile",
    "skopeo_copy",
    "push_to_upstream",
    "push_artifact",
    "Serve",
    "WrongBytes",
    "Truncate",
    "Stall",
    "Status",
    "Behavior",
    "LyingUpstream",
    "token_service",
    "distribution_upstream",
    "upstream_client",
    "upstream_authfile",
    "lying_upstream",
]

#: The user the fixtures configure (user, password).
PULLER: Final = ("puller", "s3cret")
DEFAULT_SERVICE: Final = "test-registry"
DEFAULT_ISSUER: Final = "bastion-test-token-issuer"
DISTRIBUTION_BINARY: Final = "/usr/bin/docker-registry"
SKOPEO_BINARY: Final = "skopeo"

_API_VERSION_HEADER: Final = {"Docker-Distribution-API-Version": "registry/2.0"}

# urllib without proxies from the environment: everything here is on loopback.
_OPENER: Final = urllib.request.build_opener(urllib.request.ProxyHandler({}))


def _digest(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


# --- keys ----------------------------------------------------------------------------------


def libtrust_key_id(public_key: Any) -> str:
    """The libtrust key ID of ``public_key`` (a ``cryptography`` public key), which is what
    distribution 2.x matches a JWT's ``kid`` against: SHA-256 of the DER SubjectPublicKeyInfo,
    first 240 bits, base32 without padding (48 characters), 12 groups of 4 joined by ``:``."""
    from cryptography.hazmat.primitives import serialization

    der = public_key.public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    b32 = base64.b32encode(hashlib.sha256(der).digest()[:30]).decode().rstrip("=")
    return ":".join(b32[i : i + 4] for i in range(0, len(b32), 4))


def generate_rsa_key(bits: int = 2048) -> Any:
    """A fresh RSA private key (``cryptography``)."""
    from cryptography.hazmat.primitives.asymmetric import rsa

    return rsa.generate_private_key(public_exponent=65537, key_size=bits)


@functools.cache
def _shared_rsa_key() -> Any:
    # Key generation costs tens of milliseconds; one key per test process is plenty.
    return generate_rsa_key()


def _self_signed_cert_pem(key: Any, common_name: str) -> bytes:
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.x509.oid import NameOID

    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])
    now = _dt.datetime.now(_dt.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - _dt.timedelta(days=1))
        .not_valid_after(now + _dt.timedelta(days=3650))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    return cert.public_bytes(serialization.Encoding.PEM)


# --- a server in a thread ------------------------------------------------------------------


class _ThreadedServer:
    """An aiohttp application served on 127.0.0.1 from a daemon thread with its own event
    loop. ``start()`` returns once the socket listens; ``stop()`` shuts it down; ``start()``
    again reuses the same port."""

    _thread_name = "upstream"

    def __init__(self, port: int = 0) -> None:
        self.port = port
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop_event: asyncio.Event | None = None
        self._startup_error: BaseException | None = None

    def _make_app(self) -> web.Application:
        raise NotImplementedError

    async def _on_stop(self) -> None:
        """Runs in the server loop before the runner is cleaned up."""

    @property
    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    @property
    def host(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def url(self) -> str:
        return f"http://{self.host}"

    def start(self, timeout: float = 10.0) -> None:
        if self.running:
            return
        ready = threading.Event()
        self._startup_error = None
        self._thread = threading.Thread(
            target=self._run, args=(ready,), name=f"{self._thread_name}-{self.port}", daemon=True
        )
        self._thread.start()
        if not ready.wait(timeout):
            raise RuntimeError(f"{type(self).__name__} did not start within {timeout}s")
        if self._startup_error is not None:
            self._thread.join(timeout)
            raise RuntimeError(f"{type(self).__name__} failed to start") from self._startup_error

    def _run(self, ready: threading.Event) -> None:
        try:
            asyncio.run(self._main(ready))
        except BaseException as exc:  # reported to start() (or lost if after startup)
            self._startup_error = exc
            ready.set()

    async def _main(self, ready: threading.Event) -> None:
        self._loop = asyncio.get_running_loop()
        self._stop_event = asyncio.Event()
        runner = web.AppRunner(self._make_app(), access_log=None, shutdown_timeout=2.0)
        await runner.setup()
        try:
            site = web.TCPSite(runner, "127.0.0.1", self.port)
            await site.start()
            self.port = int(runner.addresses[0][1])
            ready.set()
            await self._stop_event.wait()
            await self._on_stop()
        finally:
            await runner.cleanup()

    def stop(self, timeout: float = 10.0) -> None:
        thread, loop, event = self._thread, self._loop, self._stop_event
        if thread is None:
            return
        if thread.is_alive() and loop is not None and event is not None:
            with contextlib.suppress(RuntimeError):  # loop already closed
                loop.call_soon_threadsafe(event.set)
        thread.join(timeout)
        if thread.is_alive():
            raise RuntimeError(f"{type(self).__name__} did not stop within {timeout}s")
        self._thread = self._loop = self._stop_event = None

    def __enter__(self) -> _ThreadedServer:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


# --- token service ---------------------------------------------------------------------------


@dataclass(frozen=True)
class TokenRequest:
    """One request to the token endpoint, as the token service saw and answered it."""

    method: str
    account: str | None  # user name presented (valid or not); None when anonymous
    authenticated: bool  # credentials were presented and were valid
    service: str | None
    scopes: tuple[str, ...]
    status: int
    granted: tuple[dict[str, Any], ...]  # the token's "access" claim (empty if refused)
    time: float


def _parse_scope(scope: str) -> tuple[str, str, list[str]] | None:
    """``repository:name:pull,push`` -> ("repository", "name", ["pull", "push"]). The name may
    contain ``:`` (``repository:host:5000/x:pull``) so type and actions are split off the
    ends."""
    resource_type, sep, rest = scope.partition(":")
    name, sep2, actions = rest.rpartition(":")
    if not sep or not sep2 or not resource_type or not name:
        return None
    return resource_type, name, [a for a in actions.split(",") if a]


class TokenService(_ThreadedServer):
    """Docker registry token server (https://distribution.github.io/distribution/spec/auth/token/).

    ``users`` maps user name to password. With valid credentials a token grants the actions
    asked for, restricted to ``user_actions[user]`` if given; anonymous requests are granted
    ``anonymous_actions`` (none by default) or, with ``require_auth``, refused with 401; bad
    credentials are always refused with 401. ``expires_in``, ``fail_status`` (answer every
    request with this status) and ``anonymous_actions`` may be changed while running.

    ``realm`` is the URL to configure as ``auth.token.realm``; ``cert_path`` holds the
    certificate for ``auth.token.rootcertbundle``; ``requests`` is the request log.
    """

    _thread_name = "token-service"

    def __init__(
        self,
        workdir: str | os.PathLike[str],
        users: Mapping[str, str] | None = None,
        *,
        service: str = DEFAULT_SERVICE,
        issuer: str = DEFAULT_ISSUER,
        expires_in: int = 300,
        require_auth: bool = False,
        anonymous_actions: Sequence[str] = (),
        user_actions: Mapping[str, Sequence[str]] | None = None,
        key: Any = None,
        port: int = 0,
    ) -> None:
        super().__init__(port)
        self.users = dict(PULLER_USERS if users is None else users)
        self.service = service
        self.issuer = issuer
        self.expires_in = expires_in
        self.require_auth = require_auth
        self.anonymous_actions: tuple[str, ...] = tuple(anonymous_actions)
        self.user_actions = {u: tuple(a) for u, a in (user_actions or {}).items()}
        self.fail_status: int | None = None
        self.key = key if key is not None else _shared_rsa_key()
        self.kid = libtrust_key_id(self.key.public_key())
        self.workdir = Path(workdir)
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.cert_path = self.workdir / "token-signer.pem"
        self.cert_path.write_bytes(_self_signed_cert_pem(self.key, issuer))
        self._log: list[TokenRequest] = []
        self._lock = threading.Lock()

    @property
    def realm(self) -> str:
        return f"{self.url}/token"

    # request log

    @property
    def requests(self) -> list[TokenRequest]:
        with self._lock:
            return list(self._log)

    @property
    def request_count(self) -> int:
        with self._lock:
            return len(self._log)

    def count(self, *, scope_substring: str = "", status: int | None = None) -> int:
        """Token requests asking for a scope containing ``scope_substring`` (any request if
        empty), optionally only those answered with ``status``."""
        return sum(
            1
            for r in self.requests
            if (not scope_substring or any(scope_substring in s for s in r.scopes))
            and (status is None or r.status == status)
        )

    def reset(self) -> None:
        with self._lock:
            self._log.clear()

    # tokens

    def issue_token(
        self,
        account: str,
        access: Sequence[Mapping[str, Any]],
        *,
        audience: str | None = None,
        expires_in: int | None = None,
        issuer: str | None = None,
        not_before: float | None = None,
    ) -> str:
        """A signed token for ``account`` with the given ``access`` claim (for tests that want
        to forge expired, foreign-audience or over-privileged tokens directly)."""
        import jwt

        now = int(time.time())
        lifetime = self.expires_in if expires_in is None else expires_in
        claims = {
            "iss": issuer or self.issuer,
            "sub": account,
            "aud": audience or self.service,
            "exp": now + lifetime,
            "nbf": int(not_before) if not_before is not None else now - 5,
            "iat": now,
            "jti": uuid.uuid4().hex,
            "access": [dict(a) for a in access],
        }
        return jwt.encode(claims, self.key, algorithm="RS256", headers={"kid": self.kid})

    def _grant(self, account: str | None, scopes: Sequence[str]) -> list[dict[str, Any]]:
        if account is None:
            allowed: tuple[str, ...] | None = self.anonymous_actions
        else:
            allowed = self.user_actions.get(account)  # None: everything asked for
        access: list[dict[str, Any]] = []
        for scope in scopes:
            parsed = _parse_scope(scope)
            if parsed is None:
                continue
            resource_type, name, actions = parsed
            if allowed is not None:
                actions = [a for a in actions if a in allowed or "*" in allowed]
            if actions:
                access.append({"type": resource_type, "name": name, "actions": actions})
        return access

    def _make_app(self) -> web.Application:
        app = web.Application()
        app.router.add_get("/token", self._handle_token)
        app.router.add_post("/token", self._handle_token)
        return app

    def _record(
        self,
        request: web.Request,
        account: str | None,
        ok: bool,
        service: str | None,
        scopes: Sequence[str],
        status: int,
        granted: Sequence[dict[str, Any]],
    ) -> None:
        entry = TokenRequest(
            request.method, account, ok, service, tuple(scopes), status, tuple(granted), time.time()
        )
        with self._lock:
            self._log.append(entry)

    async def _handle_token(self, request: web.Request) -> web.Response:
        query = request.query
        scopes: list[str] = [s for raw in query.getall("scope", []) for s in raw.split()]
        service = query.get("service")
        account: str | None = None
        password: str | None = None
        if request.method == "POST":  # OAuth2 password grant (containerd and friends)
            form = await request.post()
            scopes += [s for raw in form.getall("scope", []) for s in str(raw).split()]
            service = str(form.get("service", service or "")) or None
            if form.get("grant_type") == "password":
                account, password = str(form.get("username", "")), str(form.get("password", ""))
        header = request.headers.get("Authorization", "")
        if header.lower().startswith("basic "):
            try:
                decoded = base64.b64decode(header[6:].strip(), validate=True).decode()
                account, _, password = decoded.partition(":")
            except (ValueError, UnicodeDecodeError):
                account, password = "", None

        def deny(status: int, message: str) -> web.Response:
            self._record(request, account, False, service, scopes, status, ())
            return web.json_response(
                {"errors": [{"code": "UNAUTHORIZED", "message": message}]},
                status=status,
                headers={"WWW-Authenticate": f'Basic realm="{self.realm}"'}
                if status == 401
                else None,
            )

        if self.fail_status is not None:
            return deny(self.fail_status, "token service configured to fail")
        authenticated = account is not None and self.users.get(account) == password
        if account is not None and not authenticated:
            return deny(401, "incorrect username or password")
        if account is None and self.require_auth:
            return deny(401, "authentication required")
        granted = self._grant(account, scopes)
        token = self.issue_token(account or "", granted, audience=service)
        self._record(request, account, authenticated, service, scopes, 200, granted)
        now = _dt.datetime.now(_dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
        return web.json_response(
            {"token": token, "access_token": token, "expires_in": self.expires_in, "issued_at": now}
        )

    def __enter__(self) -> TokenService:
        self.start()
        return self


PULLER_USERS: Final = {PULLER[0]: PULLER[1]}


# --- distribution ------------------------------------------------------------------------------

_ACCESS_LOG_LINE: Final = re.compile(
    r"^(?P<remote>\S+) \S+ (?P<user>\S+) \[(?P<time>[^\]]+)\] "
    r'"(?P<method>[A-Z]+) (?P<uri>\S+) (?P<proto>[^"]+)" (?P<status>\d{3}) (?P<size>\d+|-)'
    r'(?: "(?P<referer>[^"]*)" "(?P<agent>[^"]*)")?'
)


@dataclass(frozen=True)
class AccessLogEntry:
    """One access-log line of distribution (Apache combined format)."""

    remote: str
    time: str
    method: str
    uri: str  # path and query string, as requested
    status: int
    size: int | None
    user_agent: str

    @property
    def path(self) -> str:
        return self.uri.partition("?")[0]


def _parse_access_log(text: str) -> list[AccessLogEntry]:
    entries = []
    for line in text.splitlines():
        m = _ACCESS_LOG_LINE.match(line)
        if m:
            size = m["size"]
            entries.append(
                AccessLogEntry(
                    m["remote"],
                    m["time"],
                    m["method"],
                    m["uri"],
                    int(m["status"]),
                    None if size == "-" else int(size),
                    m["agent"] or "",
                )
            )
    return entries


class DistributionUpstream:
    """CNCF distribution (``docker-registry serve``) on ``127.0.0.1:<port>`` storing under
    ``workdir/data``, with token auth against ``token_service`` (no auth if None).

    stdout and stderr go to ``log_path`` (appended across restarts); ``count_requests`` and
    ``access_log`` read the access-log lines from it. ``stop()``/``start()`` keep port and
    data. ``extra_config`` is merged into the generated configuration (top-level keys
    replace, nested dicts merge)."""

    def __init__(
        self,
        workdir: str | os.PathLike[str],
        token_service: TokenService | None = None,
        *,
        port: int | None = None,
        binary: str = DISTRIBUTION_BINARY,
        extra_config: Mapping[str, Any] | None = None,
        start_timeout: float = 20.0,
    ) -> None:
        self.workdir = Path(workdir)
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.data_dir = self.workdir / "data"
        self.config_path = self.workdir / "config.yml"
        self.log_path = self.workdir / "registry.log"
        self.token_service = token_service
        self.port = port or _free_port()
        self.binary = binary
        self.start_timeout = start_timeout
        self._extra_config = dict(extra_config or {})
        self._process: subprocess.Popen[bytes] | None = None
        self._log_offset = 0

    @property
    def host(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def url(self) -> str:
        return f"http://{self.host}"

    @property
    def running(self) -> bool:
        return self._process is not None and self._process.poll() is None

    def config(self) -> dict[str, Any]:
        """The configuration ``start()`` writes (YAML is a superset of JSON)."""
        config: dict[str, Any] = {
            "version": 0.1,
            "log": {"level": "info", "formatter": "text", "accesslog": {"disabled": False}},
            "storage": {
                "filesystem": {"rootdirectory": str(self.data_dir)},
                "delete": {"enabled": True},
                "maintenance": {"uploadpurging": {"enabled": False}},
            },
            "http": {
                "addr": self.host,
                # Fixed, so that upload sessions survive a restart.
                "secret": "bastion-test-upstream-secret",
            },
        }
        if self.token_service is not None:
            config["auth"] = {
                "token": {
                    "realm": self.token_service.realm,
                    "service": self.token_service.service,
                    "issuer": self.token_service.issuer,
                    "rootcertbundle": str(self.token_service.cert_path),
                }
            }
        for key, value in self._extra_config.items():
            if isinstance(value, Mapping) and isinstance(config.get(key), dict):
                config[key] = {**config[key], **value}
            else:
                config[key] = value
        return config

    def start(self) -> None:
        if self.running:
            return
        if not os.access(self.binary, os.X_OK):
            raise FileNotFoundError(f"distribution binary not found: {self.binary}")
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self.config_path.write_text(json.dumps(self.config(), indent=2))
        with open(self.log_path, "ab") as log:
            self._process = subprocess.Popen(
                [self.binary, "serve", str(self.config_path)],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                cwd=self.workdir,
            )
        self._wait_ready()

    def _wait_ready(self) -> None:
        expected = 401 if self.token_service is not None else 200
        deadline = time.monotonic() + self.start_timeout
        last: object = None
        while time.monotonic() < deadline:
            assert self._process is not None
            if self._process.poll() is not None:
                code = self._process.returncode
                self._process = None
                raise RuntimeError(f"docker-registry exited with {code}:\n{self.log_tail()}")
            try:
                with _OPENER.open(f"{self.url}/v2/", timeout=2) as resp:
                    last = resp.status
            except urllib.error.HTTPError as exc:
                last = exc.code
                exc.close()
            except OSError as exc:
                last = exc
            if last == expected:
                return
            time.sleep(0.05)
        self.stop()
        raise RuntimeError(
            f"docker-registry not ready within {self.start_timeout}s (last: {last!r}):\n"
            f"{self.log_tail()}"
        )

    def stop(self, timeout: float = 10.0) -> None:
        process, self._process = self._process, None
        if process is None:
            return
        if process.poll() is None:
            process.terminate()
            try:
                process.wait(timeout)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(timeout)

    def restart(self) -> None:
        self.stop()
        self.start()

    def __enter__(self) -> DistributionUpstream:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # logs

    def log_text(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def log_tail(self, lines: int = 40) -> str:
        return "\n".join(self.log_text().splitlines()[-lines:])

    def _settled_log(self, settle: float) -> bytes:
        # Distribution writes the access-log line after the handler returns, which can be a
        # moment after the client has read the last byte; wait until the log stops growing.
        deadline = time.monotonic() + max(settle * 20, 1.0)
        previous = -1
        while True:
            try:
                size = self.log_path.stat().st_size
            except FileNotFoundError:
                return b""
            if size == previous or time.monotonic() > deadline:
                break
            previous = size
            time.sleep(settle)
        with open(self.log_path, "rb") as f:
            f.seek(self._log_offset)
            return f.read()

    def access_log(self, *, settle: float = 0.05) -> list[AccessLogEntry]:
        """Access-log entries since start (or the last ``reset_counts()``)."""
        return _parse_access_log(self._settled_log(settle).decode(errors="replace"))

    def count_requests(
        self,
        method: str | None,
        path_substring: str = "",
        *,
        status: int | None = None,
        settle: float = 0.05,
    ) -> int:
        """Requests whose method is ``method`` (any if None) and whose URI contains
        ``path_substring``, optionally with response ``status``, since start or the last
        ``reset_counts()``. E.g. ``count_requests("GET", f"/v2/{repo}/blobs/{digest}")``.
        Blocks for about ``settle`` seconds (use it in async tests after the awaits)."""
        return sum(
            1
            for e in self.access_log(settle=settle)
            if (method is None or e.method == method.upper())
            and path_substring in e.uri
            and (status is None or e.status == status)
        )

    def reset_counts(self) -> None:
        """Count only requests after this point."""
        self._settled_log(0.05)
        try:
            self._log_offset = self.log_path.stat().st_size
        except FileNotFoundError:
            self._log_offset = 0


# --- raw HTTP client ---------------------------------------------------------------------------


@dataclass(frozen=True)
class RegistryResponse:
    status: int
    headers: Mapping[str, str]
    body: bytes

    def json(self) -> Any:
        return json.loads(self.body)


_CHALLENGE_PARAM: Final = re.compile(r'(\w+)="([^"]*)"')


def parse_bearer_challenge(header: str) -> dict[str, str] | None:
    """``Bearer realm="...",service="...",scope="..."`` -> its parameters (None if not Bearer)."""
    scheme, _, params = header.strip().partition(" ")
    if scheme.lower() != "bearer":
        return None
    return dict(_CHALLENGE_PARAM.findall(params))


class RegistryClient:
    """A small synchronous registry client (urllib) that follows Bearer challenges: on a 401
    it fetches a token from the challenge's realm (HTTP Basic with ``credentials`` if given)
    for the challenge's scope, caches it per scope, and retries once. Usable from async tests
    too (it blocks, but only briefly and only talks to other threads or processes)."""

    def __init__(
        self,
        base_url: str,
        credentials: tuple[str, str] | None = PULLER,
        *,
        timeout: float = 60.0,
    ) -> None:
        self.base_url = base_url.rstrip("/")
        self.credentials = credentials
        self.timeout = timeout
        self._tokens: dict[str, str] = {}
        self.token_fetches = 0

    def _raw(
        self, method: str, url: str, data: bytes | None, headers: Mapping[str, str]
    ) -> RegistryResponse:
        req = urllib.request.Request(url, data=data, method=method, headers=dict(headers))
        try:
            with _OPENER.open(req, timeout=self.timeout) as resp:
                return RegistryResponse(resp.status, dict(resp.headers.items()), resp.read())
        except urllib.error.HTTPError as exc:
            try:
                return RegistryResponse(exc.code, dict(exc.headers.items()), exc.read())
            finally:
                exc.close()

    def fetch_token(self, realm: str, service: str | None, scope: str | None) -> RegistryResponse:
        """GET the token endpoint (with this client's credentials); the raw answer."""
        params = [(k, v) for k, v in (("service", service), ("scope", scope)) if v]
        url = realm + ("?" + urllib.parse.urlencode(params) if params else "")
        headers = {}
        if self.credentials is not None:
            user, password = self.credentials
            basic = base64.b64encode(f"{user}:{password}".encode()).decode()
            headers["Authorization"] = f"Basic {basic}"
        self.token_fetches += 1
        return self._raw("GET", url, None, headers)

    def request(
        self,
        method: str,
        path_or_url: str,
        *,
        data: bytes | None = None,
        headers: Mapping[str, str] | None = None,
    ) -> RegistryResponse:
        url = urllib.parse.urljoin(self.base_url + "/", path_or_url)
        headers = dict(headers or {})
        repo_path = urllib.parse.urlsplit(url).path.split("/blobs/")[0].split("/manifests/")[0]
        scope_key = ("pull" if method in ("GET", "HEAD") else "push") + ":" + repo_path
        for attempt in range(2):
            token = self._tokens.get(scope_key)
            sent = dict(headers)
            if token:
                sent["Authorization"] = f"Bearer {token}"
            resp = self._raw(method, url, data, sent)
            challenge = parse_bearer_challenge(resp.headers.get("Www-Authenticate", ""))
            if resp.status != 401 or challenge is None or attempt:
                return resp
            answer = self.fetch_token(
                challenge.get("realm", ""), challenge.get("service"), challenge.get("scope")
            )
            if answer.status != 200:
                return resp
            doc = answer.json()
            self._tokens[scope_key] = doc.get("token") or doc["access_token"]
        raise AssertionError("unreachable")

    # pushing

    def push_blob(self, repo: str, data: bytes) -> str:
        """Upload ``data`` (POST then one monolithic PUT ?digest=; distribution 2.8 does not
        do single-POST uploads). Returns its digest."""
        digest = _digest(data)
        resp = self.request("POST", f"/v2/{repo}/blobs/uploads/")
        if resp.status == 201:  # a registry that took it already (unlikely without a body)
            return digest
        if resp.status != 202:
            raise RuntimeError(f"POST upload {repo}: {resp.status} {resp.body[:500]!r}")
        location = urllib.parse.urljoin(self.base_url + "/", resp.headers["Location"])
        sep = "&" if "?" in location else "?"
        resp = self.request(
            "PUT",
            f"{location}{sep}digest={urllib.parse.quote(digest)}",
            data=data,
            headers={"Content-Type": "application/octet-stream"},
        )
        if resp.status != 201:
            raise RuntimeError(f"PUT upload {repo}: {resp.status} {resp.body[:500]!r}")
        return digest

    def push_manifest(self, repo: str, reference: str | None, data: bytes, media_type: str) -> str:
        """PUT ``data`` as a manifest under ``reference`` (a tag, or its digest if None).
        Returns its digest (checked against what the registry says)."""
        digest = _digest(data)
        resp = self.request(
            "PUT",
            f"/v2/{repo}/manifests/{reference or digest}",
            data=data,
            headers={"Content-Type": media_type},
        )
        if resp.status != 201:
            raise RuntimeError(
                f"PUT manifest {repo}:{reference}: {resp.status} {resp.body[:500]!r}"
            )
        said = resp.headers.get("Docker-Content-Digest")
        if said and said != digest:
            raise RuntimeError(f"registry says {said} for a manifest whose digest is {digest}")
        return digest

    def push_artifact(self, repo: str, artifact: Any, tag: str | None = None) -> str:
        """Push a ``tests.images`` Image or Index (blobs, child manifests, then the manifest,
        all exact bytes). Returns the top-level manifest digest."""
        return push_artifact(self, repo, artifact, tag)

    # pulling

    def get_blob(self, repo: str, digest: str) -> RegistryResponse:
        return self.request("GET", f"/v2/{repo}/blobs/{digest}")

    def get_manifest(
        self, repo: str, reference: str, accept: Sequence[str] = ()
    ) -> RegistryResponse:
        accept = tuple(accept) or (
            "application/vnd.oci.image.manifest.v1+json",
            "application/vnd.oci.image.index.v1+json",
            "application/vnd.docker.distribution.manifest.v2+json",
            "application/vnd.docker.distribution.manifest.list.v2+json",
        )
        return self.request(
            "GET", f"/v2/{repo}/manifests/{reference}", headers={"Accept": ", ".join(accept)}
        )

    def delete_manifest(self, repo: str, digest: str) -> RegistryResponse:
        return self.request("DELETE", f"/v2/{repo}/manifests/{digest}")

    def delete_blob(self, repo: str, digest: str) -> RegistryResponse:
        return self.request("DELETE", f"/v2/{repo}/blobs/{digest}")


def push_artifact(client: RegistryClient, repo: str, artifact: Any, tag: str | None = None) -> str:
    """Push a ``tests.images`` ``Image`` or ``Index`` (duck-typed: ``blobs``, ``manifest``,
    ``media_type``, and ``children`` for an index) with ``client``. Returns its digest."""
    for blob in artifact.blobs:
        client.push_blob(repo, blob.data)
    for child in getattr(artifact, "children", ()):
        client.push_manifest(repo, None, child.manifest, child.media_type)
    return client.push_manifest(repo, tag, artifact.manifest, artifact.media_type)


# --- auth file and skopeo -------------------------------------------------------------------


def write_authfile(
    path: str | os.PathLike[str], credentials: Mapping[str, tuple[str, str]]
) -> Path:
    """Write a containers/podman ``auth.json``: ``{"auths": {host: {"auth": b64(user:pw)}}}``."""
    auths = {
        host: {"auth": base64.b64encode(f"{user}:{password}".encode()).decode()}
        for host, (user, password) in credentials.items()
    }
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_text(json.dumps({"auths": auths}, indent=2) + "\n")
    return target


def skopeo_copy(
    source: str,
    destination: str,
    *,
    src_creds: tuple[str, str] | None = None,
    dest_creds: tuple[str, str] | None = None,
    authfile: str | os.PathLike[str] | None = None,
    all_images: bool = True,
    preserve_digests: bool = True,
    extra_args: Sequence[str] = (),
    timeout: float = 300.0,
) -> subprocess.CompletedProcess[str]:
    """``skopeo copy`` with TLS verification off on both sides (loopback registries speak
    plain HTTP), the insecure policy and a private environment (its own HOME, TMPDIR,
    registries.conf and, unless ``authfile`` is given, an empty auth file), so nothing of the
    user's container configuration is read or written. Raises with skopeo's output on
    failure; skips the test if skopeo is not installed."""
    binary = shutil.which(SKOPEO_BINARY)
    if binary is None:
        pytest.skip("skopeo is not installed")
    args = [binary, "--insecure-policy"]
    with tempfile.TemporaryDirectory(prefix="bastion-skopeo-") as tmp:
        base = Path(tmp)
        for sub in ("home", "tmp", "runtime", "registries.d"):
            (base / sub).mkdir()
        (base / "runtime").chmod(0o700)
        (base / "registries.conf").write_text("unqualified-search-registries = []\n")
        if authfile is None:
            authfile = base / "auth.json"
            Path(authfile).write_text('{"auths": {}}\n')
        env = {
            "PATH": os.environ.get("PATH", "/usr/sbin:/usr/bin:/sbin:/bin"),
            "LANG": "C.UTF-8",
            "HOME": str(base / "home"),
            "TMPDIR": str(base / "tmp"),
            "XDG_RUNTIME_DIR": str(base / "runtime"),
            "XDG_CONFIG_HOME": str(base / "home" / ".config"),
            "REGISTRY_AUTH_FILE": str(authfile),
            "CONTAINERS_REGISTRIES_CONF": str(base / "registries.conf"),
        }
        args += [
            "--registries.d",
            str(base / "registries.d"),
            "copy",
            "--src-tls-verify=false",
            "--dest-tls-verify=false",
        ]
        if all_images:
            args.append("--all")
        if preserve_digests:
            args.append("--preserve-digests")
        if src_creds is not None:
            args += ["--src-creds", ":".join(src_creds)]
        if dest_creds is not None:
            args += ["--dest-creds", ":".join(dest_creds)]
        args += [*extra_args, source, destination]
        proc = subprocess.run(
            args,
            capture_output=True,
            text=True,
            timeout=timeout,
            env=env,
            stdin=subprocess.DEVNULL,
            check=False,
        )
    if proc.returncode != 0:
        raise RuntimeError(
            f"{' '.join(args)} failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}"
        )
    return proc


def push_to_upstream(
    upstream: DistributionUpstream | str,
    destination: str,
    source: Any,
    *,
    creds: tuple[str, str] | None = PULLER,
    all_images: bool = True,
    preserve_digests: bool = True,
) -> str:
    """Copy ``source`` with skopeo to ``docker://<upstream host>/<destination>`` (``repo:tag``
    or ``repo@digest``) and return the digest of the pushed manifest.

    ``source`` is a skopeo transport reference (``"oci:/path/layout:ref"``, ``"dir:/path"``),
    a ``Path`` to a ``dir:`` transport directory or an OCI layout holding a single manifest,
    or a ``tests.images`` ``Image``/``Index`` (written to a temporary OCI layout, or ``dir:``
    for Docker-format indexes, which skopeo 1.9 cannot read from an OCI layout)."""
    host = upstream.host if isinstance(upstream, DistributionUpstream) else upstream
    with tempfile.TemporaryDirectory(prefix="bastion-push-") as tmp:
        if isinstance(source, str):
            src = source
        elif isinstance(source, os.PathLike):
            path = Path(source)
            src = f"oci:{path}" if (path / "oci-layout").exists() else f"dir:{path}"
        else:
            from tests import images

            layout = Path(tmp) / "src"
            is_index = isinstance(source, images.Index)
            if source.format is images.DOCKER and is_index:
                images.write_dir_transport(layout, source)
                src = f"dir:{layout}"
            else:
                images.write_oci_layout(layout, {"ref": source})
                src = f"oci:{layout}:ref"
        digest_file = Path(tmp) / "digest"
        skopeo_copy(
            src,
            f"docker://{host}/{destination}",
            dest_creds=creds,
            all_images=all_images,
            preserve_digests=preserve_digests,
            extra_args=["--digestfile", str(digest_file)]
            if creds is not None
            else ["--digestfile", str(digest_file), "--dest-no-creds"],
        )
        return digest_file.read_text().strip()


# --- lying upstream ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Serve:
    """Serve the content correctly (honours ``Range: bytes=N-[M]`` on GET unless ``ranges``
    is False: then the whole content, 200, as registries without Range support answer)."""

    ranges: bool = True


@dataclass(frozen=True)
class WrongBytes:
    """Serve other bytes with the right length and the right ``Docker-Content-Digest``
    (``data``, or the content with every byte inverted)."""

    data: bytes | None = None


@dataclass(frozen=True)
class Truncate:
    """Declare the full ``Content-Length``, send ``send`` bytes (default: half), then close
    the connection."""

    send: int | None = None


@dataclass(frozen=True)
class Stall:
    """Send headers and ``send`` bytes (default: half), then hang for ``seconds`` (cut short
    when the server stops); then either ``"close"`` the connection or ``"finish"`` the body.
    With ``before_headers`` it hangs before sending anything."""

    seconds: float = 30.0
    send: int | None = None
    then: Literal["close", "finish"] = "close"
    before_headers: bool = False


@dataclass(frozen=True)
class Status:
    """Answer with ``status`` (503 by default), an OCI error body and ``Retry-After`` if
    given."""

    status: int = 503
    retry_after: int | str | None = None


Behavior = Serve | WrongBytes | Truncate | Stall | Status

_ERROR_CODES: Final = {
    401: "UNAUTHORIZED",
    403: "DENIED",
    404: "NOT_FOUND",
    429: "TOOMANYREQUESTS",
    500: "UNKNOWN",
    502: "UNAVAILABLE",
    503: "UNAVAILABLE",
    504: "UNAVAILABLE",
}


@dataclass
class _Content:
    data: bytes
    media_type: str
    digest: str


@dataclass
class _Plan:
    behaviors: list[Behavior] = field(default_factory=list)

    def next(self) -> Behavior:
        # Each request takes the next behaviour; the last one sticks.
        return self.behaviors.pop(0) if len(self.behaviors) > 1 else self.behaviors[0]


class LyingUpstream(_ThreadedServer):
    """A registry (no auth) serving ``GET /v2/``, and GET/HEAD of
    ``/v2/<name>/manifests/<tag|digest>`` and ``/v2/<name>/blobs/<digest>`` from content added
    with ``add_blob``/``add_manifest``/``add_image``, each path answered according to its
    behaviours (``set_behavior``; ``Serve()`` if none). Every request is recorded
    (``requests``, ``count``)."""

    _thread_name = "lying-upstream"

    def __init__(self, port: int = 0) -> None:
        super().__init__(port)
        self._blobs: dict[tuple[str, str], _Content] = {}
        self._manifests: dict[tuple[str, str], _Content] = {}
        self._tags: dict[tuple[str, str], str] = {}
        self._plans: dict[tuple[str | None, str], _Plan] = {}
        self._requests: list[tuple[str, str]] = []
        self._ranges: list[tuple[str, str | None]] = []
        self._lock = threading.Lock()
        self._closing: asyncio.Event | None = None

    # content

    @staticmethod
    def blob_path(name: str, digest: str) -> str:
        return f"/v2/{name}/blobs/{digest}"

    @staticmethod
    def manifest_path(name: str, reference: str) -> str:
        return f"/v2/{name}/manifests/{reference}"

    def add_blob(self, name: str, data: bytes, *behaviors: Behavior) -> str:
        """Serve ``data`` as a blob of ``name``; returns its digest."""
        digest = _digest(data)
        with self._lock:
            self._blobs[(name, digest)] = _Content(data, "application/octet-stream", digest)
        if behaviors:
            self.set_behavior(self.blob_path(name, digest), *behaviors)
        return digest

    def add_manifest(
        self,
        name: str,
        data: bytes,
        media_type: str,
        *,
        tags: Sequence[str] = (),
        behaviors: Sequence[Behavior] = (),
    ) -> str:
        """Serve ``data`` as a manifest of ``name`` by digest and by each of ``tags``;
        ``behaviors`` apply to the digest path. Returns its digest."""
        digest = _digest(data)
        with self._lock:
            self._manifests[(name, digest)] = _Content(data, media_type, digest)
            for tag in tags:
                self._tags[(name, tag)] = digest
        if behaviors:
            self.set_behavior(self.manifest_path(name, digest), *behaviors)
        return digest

    def add_image(self, name: str, artifact: Any, tag: str | None = None) -> str:
        """Serve a ``tests.images`` Image or Index (and its children and blobs)."""
        for blob in artifact.blobs:
            self.add_blob(name, blob.data)
        for child in getattr(artifact, "children", ()):
            self.add_manifest(name, child.manifest, child.media_type)
        return self.add_manifest(
            name, artifact.manifest, artifact.media_type, tags=(tag,) if tag else ()
        )

    def set_behavior(self, path: str, *behaviors: Behavior, method: str | None = None) -> None:
        """Answer requests for ``path`` (e.g. ``blob_path(name, digest)``) with
        ``behaviors`` in turn, the last one repeating. With ``method`` only requests of that
        method (GET or HEAD), which then take precedence over a method-less plan."""
        if not behaviors:
            raise ValueError("give at least one behaviour")
        with self._lock:
            self._plans[(method.upper() if method else None, path)] = _Plan(list(behaviors))

    def clear_behaviors(self) -> None:
        with self._lock:
            self._plans.clear()

    # request log

    @property
    def requests(self) -> list[tuple[str, str]]:
        """(method, path) of every request so far."""
        with self._lock:
            return list(self._requests)

    def count(self, method: str | None = None, path_substring: str = "") -> int:
        """Requests with ``method`` (any if None) whose path contains ``path_substring``."""
        return sum(
            1
            for m, p in self.requests
            if (method is None or m == method.upper()) and path_substring in p
        )

    def count_requests(self, method: str | None, path_substring: str = "") -> int:
        """Same as ``count`` (the name ``DistributionUpstream`` uses)."""
        return self.count(method, path_substring)

    def ranges(self, path_substring: str) -> list[str | None]:
        """The ``Range`` header (None if absent) of every GET whose path contains
        ``path_substring``, in order."""
        with self._lock:
            return [r for p, r in self._ranges if path_substring in p]

    def reset_counts(self) -> None:
        with self._lock:
            self._requests.clear()
            self._ranges.clear()

    # server

    def _make_app(self) -> web.Application:
        self._closing = asyncio.Event()
        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", self._handle)
        return app

    async def _on_stop(self) -> None:
        if self._closing is not None:
            self._closing.set()

    def _behavior(self, method: str, path: str) -> Behavior:
        with self._lock:
            plan = self._plans.get((method, path)) or self._plans.get((None, path))
            return plan.next() if plan else Serve()

    @staticmethod
    def _error(
        status: int, code: str, message: str, headers: Mapping[str, str] | None = None
    ) -> web.Response:
        return web.json_response(
            {"errors": [{"code": code, "message": message, "detail": None}]},
            status=status,
            headers={**_API_VERSION_HEADER, **(headers or {})},
        )

    async def _sleep(self, seconds: float) -> None:
        assert self._closing is not None
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._closing.wait(), seconds)

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        method, path = request.method, request.path
        with self._lock:
            self._requests.append((method, path))
            if method == "GET":
                self._ranges.append((path, request.headers.get("Range")))
        if path in ("/v2", "/v2/"):
            return web.json_response({}, headers=_API_VERSION_HEADER)
        m = re.fullmatch(r"/v2/(?P<name>.+)/(?P<kind>blobs|manifests)/(?P<ref>[^/]+)", path)
        if m is None or method not in ("GET", "HEAD"):
            return self._error(
                404 if m is None else 405, "UNSUPPORTED", f"{method} {path} is not served here"
            )
        name, kind, ref = m["name"], m["kind"], m["ref"]
        with self._lock:
            if kind == "blobs":
                content = self._blobs.get((name, ref))
            else:
                content = self._manifests.get((name, self._tags.get((name, ref), ref)))
        behavior = self._behavior(method, path)
        if isinstance(behavior, Status):
            headers = {}
            if behavior.retry_after is not None:
                headers["Retry-After"] = str(behavior.retry_after)
            return self._error(
                behavior.status,
                _ERROR_CODES.get(behavior.status, "UNKNOWN"),
                f"configured to answer {behavior.status}",
                headers,
            )
        if content is None:
            code = "BLOB_UNKNOWN" if kind == "blobs" else "MANIFEST_UNKNOWN"
            return self._error(404, code, f"{kind[:-1]} unknown to registry")
        if isinstance(behavior, Stall) and behavior.before_headers:
            await self._sleep(behavior.seconds)
            if behavior.then == "close":
                self._abort(request)
                return web.Response(status=500)  # not sent: the connection is gone
            behavior = Serve()

        data = content.data
        headers = {
            **_API_VERSION_HEADER,
            "Content-Type": content.media_type,
            "Docker-Content-Digest": content.digest,
            "ETag": f'"{content.digest}"',
        }
        status, start = 200, 0
        if (
            isinstance(behavior, Serve)
            and behavior.ranges
            and method == "GET"
            and "Range" in request.headers
        ):
            rng = re.fullmatch(r"bytes=(\d+)-(\d*)", request.headers["Range"].strip())
            if rng:
                start = int(rng[1])
                end = min(int(rng[2]) if rng[2] else len(data) - 1, len(data) - 1)
                if start > end:
                    return web.Response(
                        status=416,
                        headers={**_API_VERSION_HEADER, "Content-Range": f"bytes */{len(data)}"},
                    )
                headers["Content-Range"] = f"bytes {start}-{end}/{len(data)}"
                data, status = data[start : end + 1], 206
        if method == "HEAD":
            return web.Response(
                status=status, headers={**headers, "Content-Length": str(len(data))}
            )
        if isinstance(behavior, WrongBytes):
            data = behavior.data if behavior.data is not None else bytes(b ^ 0xFF for b in data)
            if len(data) != len(content.data):
                raise ValueError("WrongBytes.data must have the content's length")
        resp = web.StreamResponse(status=status, headers=headers)
        resp.content_length = len(data)
        await resp.prepare(request)
        if isinstance(behavior, Truncate | Stall):
            send = behavior.send if behavior.send is not None else len(data) // 2
            send = min(send, max(len(data) - 1, 0))
            if send:
                await resp.write(data[:send])
            if isinstance(behavior, Truncate):
                self._abort(request)
                return resp
            await self._sleep(behavior.seconds)
            if behavior.then == "close" or self._closing.is_set():  # type: ignore[union-attr]
                self._abort(request)
                return resp
            data = data[send:]
        if data:
            await resp.write(data)
        await resp.write_eof()
        return resp

    @staticmethod
    def _abort(request: web.Request) -> None:
        transport = request.transport
        if transport is not None:
            transport.close()  # flushes what was written, then closes (no EOF chunk)

    def __enter__(self) -> LyingUpstream:
        self.start()
        return self


# --- fixtures ------------------------------------------------------------------------------


@pytest.fixture
def token_service(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TokenService]:
    """A running ``TokenService`` with user ``puller``/``s3cret`` (anonymous: no access)."""
    service = TokenService(tmp_path_factory.mktemp("token-service"))
    service.start()
    try:
        yield service
    finally:
        service.stop()


@pytest.fixture
def distribution_upstream(
    token_service: TokenService, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[DistributionUpstream]:
    """A running distribution 2.8 behind ``token_service`` (skipped without the binary)."""
    if not os.access(DISTRIBUTION_BINARY, os.X_OK):
        pytest.skip(f"{DISTRIBUTION_BINARY} (Debian package docker-registry) is not installed")
    upstream = DistributionUpstream(tmp_path_factory.mktemp("distribution"), token_service)
    upstream.start()
    try:
        yield upstream
    finally:
        upstream.stop()


@pytest.fixture
def upstream_client(distribution_upstream: DistributionUpstream) -> RegistryClient:
    """A ``RegistryClient`` for ``distribution_upstream`` logged in as ``puller``."""
    return RegistryClient(distribution_upstream.url, PULLER)


@pytest.fixture
def upstream_authfile(
    distribution_upstream: DistributionUpstream, tmp_path_factory: pytest.TempPathFactory
) -> Path:
    """An auth.json with ``puller``'s credentials for ``distribution_upstream``."""
    return write_authfile(
        tmp_path_factory.mktemp("auth") / "auth.json", {distribution_upstream.host: PULLER}
    )


@pytest.fixture
def lying_upstream() -> Iterator[LyingUpstream]:
    """A running, empty ``LyingUpstream``."""
    server = LyingUpstream()
    server.start()
    try:
        yield server
    finally:
        server.stop()
