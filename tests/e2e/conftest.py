"""End-to-end fixtures: a real ``bastion serve`` subprocess and the real clients an OpenShift
site uses against it (skopeo, podman, buildah).

Every client runs with a private environment under the session's temporary directory: its own
``HOME``, ``TMPDIR``, ``registries.conf``, ``storage.conf``, ``containers.conf`` and signature
policy, and podman/buildah with a private vfs store (``--root``/``--runroot``), so nothing in
``/etc/containers``, ``/var/lib/containers/storage`` or ``~/.config`` is read or changed.
(One thing cannot be redirected for root: skopeo and podman 4.3 keep their blob-info cache, a
digest -> location hint database, in ``/var/lib/containers/cache``; it is only a cache.)

The images are synthetic (``tests/images.py``), pushed once per session by ``published`` and
shared by the test modules; each test that changes a repository uses its own.
"""

from __future__ import annotations

import json
import os
import platform
import re
import shlex
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Generator, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Final

import pytest

from tests.images import (
    DOCKER,
    Artifact,
    Image,
    Index,
    multi_arch_index,
    sample_image,
    write_dir_transport,
    write_oci_layout,
)

E2E_DIR: Final = Path(__file__).parent
#: Seconds any one client command may take (images here are a few hundred KB).
COMMAND_TIMEOUT: Final = 120.0
#: Seconds ``bastion serve`` may take to answer ``GET /v2/``.
STARTUP_TIMEOUT: Final = 30.0
#: The nested repository OpenShift release payloads live in (ICSP/IDMS sources).
OCP_ART_DEV: Final = "quay.io/openshift-release-dev/ocp-v4.0-art-dev"
TAG: Final = "e2e"
#: The architecture clients pick from an index on this machine (Go's GOARCH names).
HOST_ARCH: Final = {"x86_64": "amd64", "aarch64": "arm64", "s390x": "s390x"}.get(platform.machine())


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    # This hook sees the whole session's items, not only this directory's.
    for item in items:
        if E2E_DIR in item.path.parents:
            item.add_marker(pytest.mark.e2e)


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(
    item: pytest.Item, call: pytest.CallInfo[None]
) -> Generator[None, pytest.TestReport, pytest.TestReport]:
    """A failed test shows the end of the registry's log next to the client's stderr."""
    report = yield
    server = getattr(item, "funcargs", {}).get("registry_server")
    if report.failed and isinstance(server, RegistryServer):
        report.sections.append(("bastion serve log (last 60 lines)", server.log_tail(60)))
    return report


# --- running commands -------------------------------------------------------------------------


@dataclass(frozen=True)
class Result:
    argv: list[str]
    returncode: int
    stdout: bytes
    stderr: str

    @property
    def text(self) -> str:
        return self.stdout.decode(errors="replace")

    def json(self) -> object:
        return json.loads(self.stdout)


def run(
    argv: list[str],
    *,
    env: dict[str, str] | None = None,
    timeout: float = COMMAND_TIMEOUT,
    check: bool = True,
) -> Result:
    """Run ``argv``; with ``check``, fail the test (showing stdout and stderr) on a non-zero
    exit. A command that outlives ``timeout`` always fails the test."""
    try:
        proc = subprocess.run(
            argv, env=env, capture_output=True, timeout=timeout, stdin=subprocess.DEVNULL
        )
    except subprocess.TimeoutExpired as e:
        stderr = (e.stderr or b"").decode(errors="replace")
        pytest.fail(
            f"timed out after {timeout:.0f}s: {shlex.join(argv)}\n--- stderr\n{stderr[-4000:]}"
        )
    result = Result(argv, proc.returncode, proc.stdout, proc.stderr.decode(errors="replace"))
    if check and result.returncode != 0:
        pytest.fail(
            f"exit {result.returncode}: {shlex.join(argv)}\n"
            f"--- stdout\n{result.text[-4000:]}\n--- stderr\n{result.stderr[-4000:]}",
            pytrace=False,
        )
    return result


@dataclass(frozen=True)
class Tool:
    """A client binary with its global flags and private environment."""

    argv: tuple[str, ...]
    env: dict[str, str] = field(repr=False)

    def __call__(self, *args: str, timeout: float = COMMAND_TIMEOUT, check: bool = True) -> Result:
        return run([*self.argv, *args], env=self.env, timeout=timeout, check=check)

    def fails(self, *args: str, timeout: float = COMMAND_TIMEOUT) -> Result:
        """Run a command that must exit non-zero."""
        result = self(*args, timeout=timeout, check=False)
        assert result.returncode != 0, f"expected failure, got success: {shlex.join(result.argv)}"
        return result

    def with_env(self, **extra: str) -> Tool:
        return Tool(self.argv, {**self.env, **extra})


def _require(binary: str) -> str:
    path = shutil.which(binary)
    if path is None:
        pytest.skip(f"{binary} is not installed (`make deps` installs skopeo, podman and buildah)")
    return path


# --- the registry under test ------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _bastion_command() -> list[str]:
    script = Path(sys.executable).parent / "bastion"
    return [str(script)] if script.exists() else [sys.executable, "-m", "server.cli"]


_LOG_RECORD: Final = re.compile(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d+ (\w+) ")


@dataclass
class RegistryServer:
    addr: str
    root: Path
    log: Path
    proc: subprocess.Popen[bytes] = field(repr=False)

    def log_tail(self, lines: int) -> str:
        """The last ``lines`` lines of the log without DEBUG records (aiohttp logs a traceback
        at DEBUG each time skopeo or podman probe for HTTPS before falling back to HTTP)."""
        text = self.log.read_text(errors="replace") if self.log.exists() else ""
        kept: list[str] = []
        debug = False
        for line in text.splitlines():
            if (m := _LOG_RECORD.match(line)) is not None:
                debug = m.group(1) == "DEBUG"
            if not debug:
                kept.append(line)
        return "\n".join(kept[-lines:])

    def access_log(self) -> list[str]:
        """The access-log lines so far (the server runs with ``log_level: debug``)."""
        return [
            line
            for line in self.log.read_text(errors="replace").splitlines()
            if "aiohttp.access" in line
        ]


def _wait_until_serving(server: RegistryServer) -> None:
    deadline = time.monotonic() + STARTUP_TIMEOUT
    while time.monotonic() < deadline:
        if server.proc.poll() is not None:
            pytest.fail(
                f"bastion serve exited with {server.proc.returncode}:\n{server.log_tail(40)}"
            )
        try:
            with urllib.request.urlopen(f"http://{server.addr}/v2/", timeout=2) as response:
                if response.status == 200:
                    return
        except (urllib.error.URLError, OSError):
            pass
        time.sleep(0.1)
    pytest.fail(
        f"bastion serve did not answer GET /v2/ within {STARTUP_TIMEOUT:.0f}s:\n{server.log_tail(40)}"
    )


def _stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.terminate()  # the parent stops its workers on SIGTERM
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, 9)  # our own session: the parent and its workers
            proc.wait(timeout=5)


def start_registry(
    base: Path,
    config_text: str,
    workers: int = 2,
    addr: str | None = None,
    root: Path | None = None,
) -> RegistryServer:
    """Start ``bastion serve`` with ``config_text`` under ``base``; stop it with
    ``stop_registry``."""
    base.mkdir(parents=True, exist_ok=True)
    config = base / "config.yaml"
    config.write_text(config_text)
    addr = addr or f"127.0.0.1:{_free_port()}"
    root = root or base / "root"
    log = base / "serve.log"
    argv = [
        *_bastion_command(),
        "serve",
        "--config",
        str(config),
        "--root",
        str(root),
        "--listen",
        addr,
        "--workers",
        str(workers),
    ]
    with log.open("wb") as out:
        proc = subprocess.Popen(
            argv,
            stdout=out,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
        )
    server = RegistryServer(addr, root, log, proc)
    try:
        _wait_until_serving(server)
    except BaseException:
        _stop(proc)
        raise
    return server


def free_addr() -> str:
    return f"127.0.0.1:{_free_port()}"


def bastion_command() -> list[str]:
    return _bastion_command()


#: What the server's log must never hold: an exception nothing caught (asyncio's report of
#: a failed callback or task, aiohttp's of a handler that raised instead of answering).
_UNCAUGHT = (
    "Exception in callback",
    "Task exception was never retrieved",
    "Error handling request",
)


def _check_log(server: RegistryServer) -> None:
    text = server.log.read_text(errors="replace") if server.log.exists() else ""
    found = [
        line
        for line in text.splitlines()
        if any(u in line for u in _UNCAUGHT)
        # aiohttp reports at DEBUG what a client probing for HTTPS sends (see log_tail)
        and not ((m := _LOG_RECORD.match(line)) is not None and m.group(1) == "DEBUG")
    ]
    if found:
        pytest.fail(f"bastion serve logged {len(found)} uncaught exception(s), first: {found[0]}")


def stop_registry(server: RegistryServer) -> None:
    _stop(server.proc)
    _check_log(server)


@pytest.fixture(scope="session")
def registry_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RegistryServer]:
    """``bastion serve --workers 2`` on a free 127.0.0.1 port with a fresh root."""
    base = tmp_path_factory.mktemp("registry")
    config = base / "config.yaml"
    config.write_text("log_level: debug\n")  # access log, for the cross-repository mount checks
    addr = f"127.0.0.1:{_free_port()}"
    log = base / "serve.log"
    argv = [
        *_bastion_command(),
        "serve",
        "--config",
        str(config),
        "--root",
        str(base / "root"),
        "--listen",
        addr,
        "--workers",
        "2",
    ]
    with log.open("wb") as out:
        proc = subprocess.Popen(
            argv,
            stdout=out,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
        )
    server = RegistryServer(addr, base / "root", log, proc)
    try:
        _wait_until_serving(server)
        yield server
    finally:
        _stop(proc)
    _check_log(server)


@pytest.fixture(scope="session")
def registry(registry_server: RegistryServer) -> str:
    """The ``127.0.0.1:PORT`` address of the registry under test."""
    return registry_server.addr


# --- clients ----------------------------------------------------------------------------------

_POLICY: Final = '{"default": [{"type": "insecureAcceptAnything"}]}\n'


@dataclass(frozen=True)
class ClientEnv:
    """Private configuration shared by all clients (``env``); ``store_flags`` gives each
    podman or buildah user its own vfs store."""

    base: Path
    short: Path  # a directory with a short path, for run roots
    env: dict[str, str]

    @property
    def policy(self) -> str:
        return str(self.base / "policy.json")

    def registries_conf(self, name: str, text: str) -> str:
        path = self.base / f"registries-{name}.conf"
        path.write_text(text)
        return str(path)

    def store_flags(self, root: Path) -> list[str]:
        """Global flags giving podman or buildah a private vfs store with its graph under
        ``root``. The run root must be short (podman refuses one over 50 characters), so it
        lives in the session's short directory instead."""
        run = Path(tempfile.mkdtemp(prefix="r", dir=self.short))
        return ["--root", str(root / "graph"), "--runroot", str(run), "--storage-driver", "vfs"]


@pytest.fixture(scope="session")
def client_env(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ClientEnv]:
    base = tmp_path_factory.mktemp("clients")
    short = Path(tempfile.mkdtemp(prefix="bastion-e2e-"))
    for sub in ("home", "tmp", "runtime", "net", "registries.d"):
        (base / sub).mkdir()
    (base / "runtime").chmod(0o700)
    (base / "policy.json").write_text(_POLICY)
    (base / "auth.json").write_text('{"auths": {}}\n')
    (base / "registries.conf").write_text("unqualified-search-registries = []\n")
    (base / "storage.conf").write_text(
        '[storage]\ndriver = "vfs"\n'
        f'graphroot = "{base}/default-store/graph"\nrunroot = "{base}/default-store/run"\n'
    )
    # The CNI backend keeps its state in network_config_dir; netavark would create
    # /run/containers/networks even though nothing here uses a network.
    (base / "containers.conf").write_text(
        '[engine]\nevents_logger = "none"\ncgroup_manager = "cgroupfs"\n'
        f'image_copy_tmp_dir = "{base}/tmp"\n'
        f'[network]\nnetwork_backend = "cni"\nnetwork_config_dir = "{base}/net"\n'
    )
    env = {
        "PATH": os.environ.get("PATH", "/usr/sbin:/usr/bin:/sbin:/bin"),
        "LANG": "C.UTF-8",
        "HOME": str(base / "home"),
        "TMPDIR": str(base / "tmp"),
        "XDG_RUNTIME_DIR": str(base / "runtime"),
        "XDG_CONFIG_HOME": str(base / "home" / ".config"),
        "XDG_DATA_HOME": str(base / "home" / ".local" / "share"),
        "REGISTRY_AUTH_FILE": str(base / "auth.json"),
        "CONTAINERS_CONF": str(base / "containers.conf"),
        "CONTAINERS_REGISTRIES_CONF": str(base / "registries.conf"),
        "CONTAINERS_STORAGE_CONF": str(base / "storage.conf"),
    }
    try:
        yield ClientEnv(base, short, env)
    finally:
        shutil.rmtree(short, ignore_errors=True)


@pytest.fixture(scope="session")
def skopeo(client_env: ClientEnv) -> Tool:
    """skopeo with a private policy and registries.d; pass ``--src/--dest-tls-verify=false``
    (or ``--tls-verify=false``) per command, as users of a plain-HTTP registry do."""
    binary = _require("skopeo")
    return Tool(
        (
            binary,
            "--policy",
            client_env.policy,
            "--registries.d",
            str(client_env.base / "registries.d"),
        ),
        client_env.env,
    )


@pytest.fixture
def podman(client_env: ClientEnv, tmp_path: Path) -> Tool:
    """podman with a fresh, empty vfs store for this test (every pull really pulls)."""
    binary = _require("podman")
    libpod = tempfile.mkdtemp(prefix="p", dir=client_env.short)
    flags = [*client_env.store_flags(tmp_path / "podman"), "--tmpdir", libpod]
    return Tool((binary, *flags), client_env.env)


@pytest.fixture
def buildah(client_env: ClientEnv, tmp_path: Path) -> Tool:
    """buildah with a fresh vfs store for this test."""
    binary = _require("buildah")
    return Tool((binary, *client_env.store_flags(tmp_path / "buildah")), client_env.env)


# --- synthetic images, pushed once per session ------------------------------------------------


@dataclass(frozen=True)
class Sample:
    """How a synthetic artifact reaches the registry: from an ``oci:`` layout or a ``dir:``
    directory, into ``repo`` (without the registry address) under ``TAG``."""

    build: Callable[[], Artifact]
    repo: str
    source: str  # "oci" or "dir"


SAMPLES: Final[dict[str, Sample]] = {
    "oci-image": Sample(
        lambda: sample_image("e2e-oci-image", payload_size=2 * 1024 * 1024), "e2e/oci/image", "oci"
    ),
    "docker-image": Sample(
        lambda: sample_image("e2e-docker-image", fmt=DOCKER), "e2e/docker/image", "dir"
    ),
    "oci-index": Sample(lambda: multi_arch_index("e2e-oci-index"), OCP_ART_DEV, "oci"),
    "docker-list": Sample(
        lambda: multi_arch_index("e2e-docker-list", fmt=DOCKER), "e2e/docker/list", "dir"
    ),
}


@dataclass(frozen=True)
class Published:
    """A synthetic artifact as pushed to the registry under test."""

    artifact: Artifact
    registry: str
    repo: str
    tag: str = TAG

    @property
    def is_index(self) -> bool:
        return isinstance(self.artifact, Index)

    @property
    def images(self) -> tuple[Image, ...]:
        """The single-platform images: the artifact itself, or an index's children."""
        return self.artifact.children if isinstance(self.artifact, Index) else (self.artifact,)

    @property
    def name(self) -> str:
        return f"{self.registry}/{self.repo}"

    @property
    def by_tag(self) -> str:
        return f"docker://{self.name}:{self.tag}"

    def by_digest(self, digest: str | None = None) -> str:
        return f"docker://{self.name}@{digest or self.artifact.digest}"


PublishFn = Callable[[str], Published]


def source_reference(artifact: Artifact, source: str, directory: Path) -> str:
    """Write ``artifact`` under ``directory`` for skopeo and return its transport reference."""
    if source == "oci":
        write_oci_layout(directory, {TAG: artifact})
        return f"oci:{directory}:{TAG}"
    write_dir_transport(directory, artifact)
    return f"dir:{directory}"


@pytest.fixture(scope="session")
def published(registry: str, skopeo: Tool, tmp_path_factory: pytest.TempPathFactory) -> PublishFn:
    """``published(sample_id)`` pushes that sample (once per session) with ``skopeo copy``
    (``--all`` for indexes) and describes where it is."""
    done: dict[str, Published] = {}

    def publish(sample_id: str) -> Published:
        if sample_id not in done:
            sample = SAMPLES[sample_id]
            artifact = sample.build()
            src = source_reference(artifact, sample.source, tmp_path_factory.mktemp(sample_id))
            target = Published(artifact, registry, sample.repo)
            all_flag = ["--all"] if target.is_index else []
            skopeo("copy", "--dest-tls-verify=false", *all_flag, src, target.by_tag)
            done[sample_id] = target
        return done[sample_id]

    return publish
