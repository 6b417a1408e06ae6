"""``bastion serve``: N worker processes on one port (SO_REUSEPORT), each an aiohttp app on
uvloop. Shared state lives in the store, so any worker can answer any request.

The parent binds the address first (without listening) so that a port already in use is
reported at once, forks the workers, restarts any that die, and forwards SIGINT/SIGTERM.
"""

from __future__ import annotations

import asyncio
import logging
import multiprocessing
import os
import signal
import socket
import ssl
import sys
import time
from typing import Final

from aiohttp import web

from .app import make_app
from .config import Config, parse_listen
from .loop import new_event_loop

__all__ = ["serve", "ServeError"]

log = logging.getLogger("bastion.serve")

_RESTART_BACKOFF: Final = 1.0


class ServeError(Exception):
    """The server could not start (one line for the user)."""


def _bind(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    try:
        sock.bind((host, port))
    except OSError as e:
        sock.close()
        raise ServeError(f"cannot listen on {host}:{port}: {e.strerror}") from None
    sock.set_inheritable(False)
    return sock


def _claim(host: str, port: int) -> socket.socket:
    """Make sure no other server answers on ``host:port``, and hold a machine-wide claim on
    it for as long as this process lives. SO_REUSEPORT would otherwise let a second
    ``bastion serve`` (same user) join the first one's port, and the kernel would split the
    clients between two different stores."""
    probe_host = {"0.0.0.0": "127.0.0.1", "::": "::1", "": "127.0.0.1"}.get(host, host)
    try:
        with socket.create_connection((probe_host, port), timeout=0.5):
            pass
    except OSError:
        pass  # nobody listening: good
    else:
        raise ServeError(f"cannot listen on {host}:{port}: another server is already listening")
    claim = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        claim.bind(f"\0bastion-registry serve {host}:{port}")  # abstract: gone with the process
    except OSError:
        claim.close()
        raise ServeError(
            f"cannot listen on {host}:{port}: another bastion serve is starting there"
        ) from None
    claim.set_inheritable(False)
    return claim


def _ssl_context(config: Config) -> ssl.SSLContext | None:
    if not config.tls.cert:
        return None
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    try:
        ctx.load_cert_chain(config.tls.cert, config.tls.key)
    except (OSError, ssl.SSLError) as e:
        raise ServeError(f"cannot load TLS certificate {config.tls.cert}: {e}") from None
    return ctx


async def _run_worker(config: Config, sock: socket.socket, ssl_ctx: ssl.SSLContext | None) -> None:
    app = make_app(config)
    access_log = logging.getLogger("aiohttp.access") if config.log_level == "debug" else None
    runner = web.AppRunner(app, access_log=access_log, handle_signals=False)
    await runner.setup()
    site = web.SockSite(runner, sock, ssl_context=ssl_ctx, backlog=1024)
    await site.start()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    try:
        await stop.wait()
    finally:
        await runner.cleanup()


def _worker_main(config: Config, host: str, port: int, ssl_ctx: ssl.SSLContext | None) -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent decides when to stop
    sock = _bind(host, port)
    sock.listen(1024)
    with asyncio.Runner(loop_factory=new_event_loop) as runner:
        runner.run(_run_worker(config, sock, ssl_ctx))


def serve(config: Config) -> None:
    """Serve until SIGINT/SIGTERM. Raises ``ServeError`` if it cannot start."""
    host, port = parse_listen(config.listen)
    workers = config.workers or os.cpu_count() or 1
    ssl_ctx = _ssl_context(config)
    claim = _claim(host, port)
    guard = _bind(host, port)  # held (not listening) while workers run: the port is ours
    scheme = "https" if ssl_ctx else "http"
    log.info(
        "bastion-registry serving on %s://%s:%d (store %s, %d worker%s)",
        scheme,
        f"[{host}]" if ":" in host else host,
        port,
        os.path.abspath(config.storage.root),
        workers,
        "s" if workers > 1 else "",
    )
    ctx = multiprocessing.get_context("fork")
    procs: list[multiprocessing.process.BaseProcess] = []
    stopping = False

    def stop(signum: int, frame: object) -> None:
        nonlocal stopping
        stopping = True

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)

    def spawn() -> multiprocessing.process.BaseProcess:
        p = ctx.Process(target=_worker_main, args=(config, host, port, ssl_ctx), daemon=True)
        p.start()
        return p

    procs = [spawn() for _ in range(workers)]
    try:
        while not stopping:
            time.sleep(0.2)
            for i, p in enumerate(procs):
                if not p.is_alive() and not stopping:
                    log.error("worker %d exited with %s; restarting", p.pid, p.exitcode)
                    time.sleep(_RESTART_BACKOFF)
                    procs[i] = spawn()
    finally:
        for p in procs:
            if p.is_alive() and p.pid is not None:
                os.kill(p.pid, signal.SIGTERM)
        deadline = time.monotonic() + 10
        for p in procs:
            p.join(max(0.0, deadline - time.monotonic()))
            if p.is_alive():
                p.kill()
        guard.close()
        claim.close()
        log.info("stopped")
        sys.stdout.flush()
