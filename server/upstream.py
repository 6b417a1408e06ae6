"""The one entry point to an upstream registry: auth challenge, token scope, retries, timeouts.

Behaves like the nodes' client (containers/image ``docker_client.go``): the first request goes
out anonymously (or with a token already cached for its scope); a 401 carries a
``WWW-Authenticate`` challenge (RFC 7235 4.1) answered with Basic credentials or a Bearer token
from the realm (distribution token spec: ``service``, ``scope=repository:NAME:pull``), using
the pull secret entry for the host. Tokens are cached per scope until ``expires_in`` and fetched
again on a 401. 429/502/503/504 and connection errors are retried a bounded number of times,
honouring ``Retry-After``. Every body read is bounded by a named limit.
"""

from __future__ import annotations

import asyncio
import json
import logging
import re
import ssl
import time
import urllib.parse
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import ClassVar, Final

import aiohttp

from . import body
from .authfile import AuthFileError, Credentials, load_authfile, lookup
from .config import UpstreamConfig

__all__ = [
    "UpstreamError",
    "UpstreamNotFound",
    "UpstreamAuthError",
    "UpstreamUnavailable",
    "UpstreamUnreachable",
    "UpstreamClient",
    "UpstreamBlob",
    "MANIFEST_ACCEPT",
    "MAX_RESUMES",
    "read_at_most",
]

log = logging.getLogger("bastion.upstream")

MANIFEST_ACCEPT: Final = ", ".join(
    [
        "application/vnd.oci.image.index.v1+json",
        "application/vnd.oci.image.manifest.v1+json",
        "application/vnd.docker.distribution.manifest.list.v2+json",
        "application/vnd.docker.distribution.manifest.v2+json",
    ]
)
#: Token responses are small JSON documents.
_TOKEN_LIMIT: Final = 1 << 20
_RETRY_STATUSES: Final = frozenset({429, 502, 503, 504})
_MAX_ATTEMPTS: Final = 3
#: Times a blob body that broke off is resumed with a Range request, per fetch.
MAX_RESUMES: Final = 3
_MAX_RETRY_AFTER: Final = 5.0
_DEFAULT_TOKEN_LIFETIME: Final = 60.0
_CHALLENGE_RE: Final = re.compile(r'(\w+)\s*=\s*(?:"([^"]*)"|([^\s,]+))')
#: An upstream tags list, all of its pages together (a quay.io repository can hold many tags).
_TAGS_LIMIT: Final = 16 << 20
_TAGS_MAX_PAGES: Final = 1000
_CONTENT_RANGE_RE: Final = re.compile(r"bytes\s+(\d+)-(\d+)/(\d+|\*)")
_NEXT_LINK_RE: Final = re.compile(r'<([^>]*)>\s*;\s*rel="?next"?')


class UpstreamError(Exception):
    """An upstream request failed; ``str()`` is one line naming the upstream and the cause."""


class UpstreamNotFound(UpstreamError):
    """The upstream answered 404: it does not have the content."""


class UpstreamAuthError(UpstreamError):
    """The upstream refused our credentials (or wants some and the pull secret has none)."""


class UpstreamUnavailable(UpstreamError):
    """Unreachable, timed out, or answered 5xx/429 after retries."""


class UpstreamUnreachable(UpstreamUnavailable):
    """No connection could be made (refused, no route, unknown name, TLS handshake refused).
    ``reached_before``: whether this client ever had an answer from that upstream (then it is
    a blip worth retrying later) or never (a wrong URL, host or CA: retrying will not help)."""

    def __init__(self, message: str, *, reached_before: bool) -> None:
        super().__init__(message)
        self.reached_before = reached_before


@dataclass
class _Token:
    value: str
    expires: float


class UpstreamBlob:
    """An open blob response: ``size`` (None if the upstream sent no length) and ``chunks``.
    The caller must ``close`` it.

    A large body is received into reused buffers (``server.body``): a piece ``chunks`` yields
    belongs to the consumer until it hands it back with ``give_back``, and must not be used
    after that. With all buffers out, receiving waits (TCP holds the upstream back).

    A body that breaks off midway (connection reset or closed early, read timeout) is resumed
    where it stopped with ``Range: bytes=N-``, up to ``MAX_RESUMES`` times, as containers/image
    does: the caller sees one uninterrupted stream and checks the digest of the whole as
    before. An upstream that answers a Range request with the whole body (200) has its first
    N bytes skipped. Without a known size, or if the resumed answer does not fit, the original
    error stands."""

    def __init__(
        self, response: aiohttp.ClientResponse, client: UpstreamClient, repository: str, digest: str
    ) -> None:
        self._response = response
        self._client, self._repository, self._digest = client, repository, digest
        self.size = response.content_length
        self.resumes = 0
        # set while the response's connection is taken over (server.body)
        self._receiver: body.BodyReceiver | None = None

    async def chunks(self) -> AsyncIterator[bytes | memoryview]:
        received = 0
        skip = 0  # bytes to drop from a resumed answer that ignored the Range
        while True:
            try:
                async for chunk in self._body():
                    if skip:
                        dropped = min(skip, len(chunk))
                        skip -= dropped
                        if dropped == len(chunk):
                            self.give_back(chunk)
                            continue
                        chunk = chunk[dropped:]
                    received += len(chunk)
                    yield chunk
                return
            except (aiohttp.ClientError, TimeoutError, OSError) as e:
                if self.size is None or received >= self.size or self.resumes >= MAX_RESUMES:
                    raise
                self.resumes += 1
                log.warning(
                    "upstream %s: blob %s/%s broke off after %d of %d bytes (%s); resuming",
                    self._client.host,
                    self._repository,
                    self._digest,
                    received,
                    self.size,
                    e.__class__.__name__,
                )
                self._response.close()  # a body that broke off: never reuse its connection
                self._receiver = None  # its pieces still out are dropped, not reused
                await asyncio.sleep(0.2 * self.resumes)
                try:
                    skip = await self._resume(received)
                except UpstreamError as refused:
                    log.warning("upstream %s: resuming failed: %s", self._client.host, refused)
                    raise e from None

    async def _body(self) -> AsyncIterator[bytes | memoryview]:
        """The current response's body as it arrives (so clients see the first byte at once)."""
        taken = body.take_over(self._response)
        self._receiver = None if taken is None else taken[1]
        if taken is None:
            async for chunk in self._response.content.iter_any():
                yield chunk
            return
        head, receiver = taken
        if head:
            yield head
        async for piece in body.pieces(receiver, self._client.config.read_timeout):
            yield piece

    async def _resume(self, offset: int) -> int:
        """Ask for the rest from ``offset``; returns the bytes to skip in the answer."""
        response = await self._client.request(
            "GET", self._repository, f"blobs/{self._digest}", {"Range": f"bytes={offset}-"}
        )
        content_range = response.headers.get("Content-Range", "")
        if response.status == 206:
            m = _CONTENT_RANGE_RE.fullmatch(content_range.strip())
            size = self.size or 0
            if m and (int(m[1]), int(m[2])) == (offset, size - 1) and m[3] in ("*", str(size)):
                self._response = response
                return 0
        elif response.status == 200 and response.content_length == self.size:
            self._response = response
            return offset
        response.release()
        raise UpstreamError(
            f"answered {response.status} (Content-Range {content_range or 'none'}) "
            f"to a request for bytes {offset}- of {self.size}"
        )

    def give_back(self, piece: bytes | memoryview) -> None:
        """Return a piece from ``chunks`` once its bytes are used (event loop thread)."""
        if self._receiver is not None:
            self._receiver.recycle(piece)

    def close(self) -> None:
        if self._receiver is not None:
            self._response.close()  # the connection was ours: it goes, not back to the pool
        else:
            self._response.release()


class UpstreamClient:
    """Requests to one upstream registry (one ``upstreams:`` entry)."""

    #: What the messages call the other side.
    role: ClassVar[str] = "upstream"

    def __init__(self, config: UpstreamConfig) -> None:
        self.config = config
        self.host = config.host
        self._session: aiohttp.ClientSession | None = None
        self._tokens: dict[str, _Token] = {}
        self._token_locks: dict[str, asyncio.Lock] = {}
        self._challenge: tuple[str, dict[str, str]] | None = None
        self._credentials: dict[str, Credentials] | None = None
        self._reached = False  # ever had an answer from the upstream

    # ---- plumbing ----------------------------------------------------------------------------

    def _ssl(self) -> ssl.SSLContext | bool:
        if not self.config.url.startswith("https://"):
            return True
        if not self.config.tls_verify:
            return False
        ctx = ssl.create_default_context()
        if self.config.ca_file:
            ctx.load_verify_locations(self.config.ca_file)
        return ctx

    def _get_session(self) -> aiohttp.ClientSession:
        if self._session is None or self._session.closed:
            timeout = aiohttp.ClientTimeout(
                total=None,
                connect=self.config.connect_timeout,
                sock_connect=self.config.connect_timeout,
                sock_read=self.config.read_timeout,
            )
            connector = aiohttp.TCPConnector(ssl=self._ssl(), limit=64)
            self._session = aiohttp.ClientSession(
                timeout=timeout, connector=connector, auto_decompress=False
            )
        return self._session

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()

    def credentials(self, repository: str) -> Credentials | None:
        if self.config.authfile is None:
            return None
        if self._credentials is None:
            try:
                self._credentials = load_authfile(self.config.authfile)
            except AuthFileError as e:
                raise UpstreamAuthError(f"{self.role} {self.host}: {e}") from None
        found = lookup(self._credentials, self.host, repository)
        if found is None:  # an upstream reached under another name: its own entry
            netloc = self.config.url.split("://", 1)[-1].split("/", 1)[0]
            found = lookup(self._credentials, netloc, repository)
        return found

    # ---- auth --------------------------------------------------------------------------------

    @staticmethod
    def _parse_challenge(header: str) -> tuple[str, dict[str, str]] | None:
        scheme, _, rest = header.strip().partition(" ")
        if not scheme:
            return None
        params = {k.lower(): (v1 if v1 else v2) for k, v1, v2 in _CHALLENGE_RE.findall(rest)}
        return scheme.lower(), params

    def scopes(self, repository: str) -> list[str]:
        """The token scopes a request for ``repository`` needs."""
        return [f"repository:{repository}:pull"]

    async def _bearer_token(
        self, repository: str, params: dict[str, str], scopes: list[str]
    ) -> str:
        key = " ".join(scopes)
        cached = self._tokens.get(key)
        if cached is not None and cached.expires > time.monotonic():
            return cached.value
        # one token request per scope however many requests need it at once
        lock = self._token_locks.setdefault(key, asyncio.Lock())
        async with lock:
            cached = self._tokens.get(key)
            if cached is not None and cached.expires > time.monotonic():
                return cached.value
            token, lifetime = await self._fetch_token(repository, params, scopes)
            # renew a little early so a token never expires in flight
            expires = time.monotonic() + max(lifetime - 10, lifetime / 2)
            self._tokens[key] = _Token(token, expires)
            return token

    async def _fetch_token(
        self, repository: str, params: dict[str, str], scopes: list[str]
    ) -> tuple[str, float]:
        """(token, lifetime in seconds) from the challenge's token service: one ``scope``
        parameter per scope (distribution's token spec; Quay's endpoint needs them apart)."""
        realm = params.get("realm")
        if not realm:
            raise UpstreamAuthError(f"{self.role} {self.host}: Bearer challenge without a realm")
        query = [("scope", scope) for scope in scopes]
        if params.get("service"):
            query.append(("service", params["service"]))
        creds = self.credentials(repository)
        headers = {"Authorization": creds.basic()} if creds else {}
        what = f"token service {realm}"
        try:
            r = await self._get_session().get(realm, params=query, headers=headers)
        except (TimeoutError, aiohttp.ClientError) as e:
            raise UpstreamUnavailable(f"{self.role} {self.host}: {what}: {e}") from None
        if r.status != 200:
            r.release()
            if r.status in (401, 403):
                raise UpstreamAuthError(self._auth_refused(repository, r.status))
            raise UpstreamUnavailable(f"{self.role} {self.host}: {what} answered {r.status}")
        try:
            doc = json.loads(await self._read(r, _TOKEN_LIMIT, f"{what} answer"))
        except ValueError as e:
            raise UpstreamUnavailable(f"{self.role} {self.host}: {what}: {e}") from None
        token = doc.get("token") or doc.get("access_token") if isinstance(doc, dict) else None
        if not isinstance(token, str) or not token:
            raise UpstreamAuthError(f"{self.role} {self.host}: token service gave no token")
        lifetime = doc.get("expires_in")
        if not isinstance(lifetime, (int, float)) or lifetime <= 0:
            lifetime = _DEFAULT_TOKEN_LIFETIME
        return token, float(lifetime)

    def _auth_refused(self, repository: str, status: int) -> str:
        creds = self.credentials(repository)
        if creds is None:
            where = (
                f"no credentials for {self.host} in {self.config.authfile}"
                if self.config.authfile
                else "no authfile configured"
            )
            return f"{self.role} {self.host} requires authentication ({status}); {where}"
        return (
            f"{self.role} {self.host} refused the credentials of user {creds.username!r} "
            f"from {self.config.authfile} ({status})"
        )

    async def _authorization(self, repository: str) -> str | None:
        if self._challenge is None:
            return None
        scheme, params = self._challenge
        if scheme == "bearer":
            return f"Bearer {await self._bearer_token(repository, params, self.scopes(repository))}"
        if scheme == "basic":
            creds = self.credentials(repository)
            if creds is not None:
                return creds.basic()
        return None

    # ---- requests ----------------------------------------------------------------------------

    async def request(
        self, method: str, repository: str, path: str, headers: dict[str, str] | None = None
    ) -> aiohttp.ClientResponse:
        """Send ``method`` to ``/v2/<repository>/<path>`` with auth and retries. Returns the
        response for any status below 400 (the caller closes it); raises ``UpstreamError``
        subclasses otherwise."""
        url = f"{self.config.url}/v2/{repository}/{path}"
        authed_retry = False
        attempt = 0
        while True:
            attempt += 1
            # identity: registries hash the bytes as sent; a compressed answer would not match
            hdrs = {"Accept-Encoding": "identity", **(headers or {})}
            authorization = await self._authorization(repository)
            if authorization:
                hdrs["Authorization"] = authorization
            try:
                response = await self._get_session().request(method, url, headers=hdrs)
            except TimeoutError:
                # not retried here: a client waiting on a pull-through miss gets its answer
                # within the configured timeout; callers with time to spare retry themselves
                raise UpstreamUnavailable(
                    f"{self.role} {self.host} at {self.config.url} did not answer {path} within "
                    f"{self.config.read_timeout:g}s (connect {self.config.connect_timeout:g}s)"
                ) from None
            except (aiohttp.ClientError, OSError) as e:
                if attempt < _MAX_ATTEMPTS:
                    await asyncio.sleep(0.2 * attempt)
                    continue
                message = (
                    f"{self.role} {self.host} unreachable at {self.config.url}: "
                    f"{e.__class__.__name__} {e}".rstrip()
                )
                if isinstance(e, aiohttp.ClientConnectorError):
                    raise UpstreamUnreachable(message, reached_before=self._reached) from None
                raise UpstreamUnavailable(message) from None
            self._reached = True
            if response.status == 401 and not authed_retry:
                challenge = self._parse_challenge(response.headers.get("WWW-Authenticate", ""))
                response.release()
                if challenge is None:
                    raise UpstreamAuthError(self._auth_refused(repository, 401))
                self._challenge = challenge
                if authorization:  # the token we sent was refused: fetch a fresh one
                    self._tokens.clear()
                authed_retry = True
                continue
            if response.status in (401, 403):
                response.release()
                self._tokens.pop(" ".join(self.scopes(repository)), None)
                raise UpstreamAuthError(self._auth_refused(repository, response.status))
            if response.status in _RETRY_STATUSES:
                retry_after = _retry_after(response.headers.get("Retry-After"))
                response.release()
                if attempt < _MAX_ATTEMPTS:
                    await asyncio.sleep(min(retry_after or 0.5 * attempt, _MAX_RETRY_AFTER))
                    continue
                raise UpstreamUnavailable(
                    f"{self.role} {self.host} answered {response.status} for {repository}/{path}"
                )
            if response.status == 404:
                response.release()
                raise UpstreamNotFound(f"{self.role} {self.host} has no {repository}/{path}")
            if response.status >= 400:
                response.release()
                raise UpstreamError(
                    f"{self.role} {self.host} answered {response.status} for {repository}/{path}"
                )
            return response

    async def get_manifest(
        self, repository: str, reference: str, limit: int
    ) -> tuple[bytes, str | None, str | None]:
        """(exact body, Content-Type, Docker-Content-Digest) of a manifest, at most ``limit``
        bytes."""
        response = await self.request(
            "GET", repository, f"manifests/{reference}", {"Accept": MANIFEST_ACCEPT}
        )
        body = await self._read(response, limit, f"manifest {reference}")
        return (
            body,
            _media_type(response.headers.get("Content-Type")),
            response.headers.get("Docker-Content-Digest"),
        )

    async def list_tags(self, repository: str) -> list[str]:
        """Every tag of ``repository`` upstream, following ``Link: <...>; rel="next"`` pages
        (only their query is used: the pages are asked of this upstream, for this repository)."""
        tags: list[str] = []
        path = "tags/list"
        budget = _TAGS_LIMIT
        for _ in range(_TAGS_MAX_PAGES):
            response = await self.request("GET", repository, path, {"Accept": "application/json"})
            body = await self._read(response, budget, f"tags list of {repository}")
            budget -= len(body)
            try:
                page = json.loads(body).get("tags") or []
            except (ValueError, AttributeError):
                page = None
            if not isinstance(page, list) or not all(isinstance(t, str) for t in page):
                raise UpstreamError(f"{self.role} {self.host}: malformed tags list of {repository}")
            tags.extend(page)
            match = _NEXT_LINK_RE.search(response.headers.get("Link", ""))
            query = urllib.parse.urlsplit(match.group(1)).query if match else ""
            if not query:
                return tags
            path = f"tags/list?{query}"
        raise UpstreamError(
            f"{self.role} {self.host}: tags list of {repository} longer than {_TAGS_MAX_PAGES} pages"
        )

    async def _read(self, response: aiohttp.ClientResponse, limit: int, what: str) -> bytes:
        """The whole body of ``response`` (released afterwards), at most ``limit`` bytes."""
        try:
            body = await read_at_most(response, limit)
        except (TimeoutError, aiohttp.ClientError) as e:
            raise UpstreamUnavailable(f"{self.role} {self.host}: reading {what}: {e}") from None
        finally:
            response.release()
        if body is None:
            raise UpstreamError(f"{self.role} {self.host}: {what} larger than {limit} bytes")
        return body

    async def head_manifest(self, repository: str, reference: str) -> tuple[str | None, str | None]:
        """(Docker-Content-Digest, Content-Type) of a manifest without its body."""
        response = await self.request(
            "HEAD", repository, f"manifests/{reference}", {"Accept": MANIFEST_ACCEPT}
        )
        response.release()
        return (
            response.headers.get("Docker-Content-Digest"),
            _media_type(response.headers.get("Content-Type")),
        )

    async def head_blob(self, repository: str, digest: str) -> int | None:
        response = await self.request("HEAD", repository, f"blobs/{digest}")
        response.release()
        return response.content_length

    async def open_blob(self, repository: str, digest: str) -> UpstreamBlob:
        response = await self.request("GET", repository, f"blobs/{digest}")
        return UpstreamBlob(response, self, repository, digest)


async def read_at_most(response: aiohttp.ClientResponse, limit: int) -> bytes | None:
    """The whole body of ``response``, or None as soon as it proves longer than ``limit``
    bytes. (``response.content.read(n)`` returns what has arrived so far, which may be any
    part of a body that came in several segments.)"""
    if response.content_length is not None and response.content_length > limit:
        return None
    parts: list[bytes] = []
    total = 0
    async for chunk in response.content.iter_any():
        total += len(chunk)
        if total > limit:
            return None
        parts.append(chunk)
    return b"".join(parts)


def _media_type(value: str | None) -> str | None:
    """A Content-Type without parameters (``; charset=utf-8``), lowercased."""
    if not value:
        return None
    return value.split(";", 1)[0].strip().lower() or None


def _retry_after(value: str | None) -> float | None:
    if not value:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        return None
