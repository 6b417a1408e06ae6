"""Shared helpers for the benchmarks in bench/: temporary directories, starting and stopping
the servers under test (bastion, CNCF distribution), reading memory and CPU figures from
/proc, small statistics and one plain-text table printer.

Benchmarks are run as scripts (``python bench/<name>.py``), so ``import common`` resolves to
this file. Nothing here imports the registry itself: the servers are separate processes,
started from their command lines exactly as an operator would.

Memory figures come from ``/proc/<pid>/status``: ``VmHWM`` is the peak resident set size since
the process started, or since the last ``echo 5 > /proc/<pid>/clear_refs`` (Linux >= 4.0),
which is how ``ProcessGroup.measure()`` gets a peak per operation.
"""

from __future__ import annotations

import contextlib
import http.client
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

__all__ = [
    "KiB",
    "MiB",
    "GiB",
    "REPO_ROOT",
    "BenchError",
    "Skip",
    "parse_size",
    "fmt_size",
    "tmpdir",
    "free_port",
    "require",
    "bastion_executable",
    "proc_status",
    "children",
    "cpu_seconds",
    "reset_hwm",
    "hwm_reset_supported",
    "own_peak_rss_kib",
    "Measurement",
    "ProcessGroup",
    "Server",
    "BastionServer",
    "DistributionServer",
    "median",
    "paired_ratio",
    "fmt_num",
    "fmt_ratio",
    "render_table",
]

KiB = 1 << 10
MiB = 1 << 20
GiB = 1 << 30

REPO_ROOT = Path(__file__).resolve().parent.parent


class BenchError(Exception):
    """A benchmark step failed (wrong status, wrong bytes, server died). One line, with the
    facts needed to reproduce it."""


class Skip(Exception):
    """A benchmark cannot run here (a tool is missing); run.py reports it and carries on."""


# --------------------------------------------------------------------------- sizes


_UNITS = {"": 1, "b": 1, "k": KiB, "kib": KiB, "m": MiB, "mib": MiB, "g": GiB, "gib": GiB}


def parse_size(text: str) -> int:
    """``"64MiB"``, ``"1GiB"``, ``"256m"``, ``"4096"`` -> bytes (binary units only)."""
    t = text.strip().lower()
    num = t.rstrip("abcdefghijklmnopqrstuvwxyz")
    unit = t[len(num) :]
    if not num or unit not in _UNITS:
        raise ValueError(f"not a size: {text!r} (use e.g. 64MiB, 1GiB)")
    return int(float(num) * _UNITS[unit])


def fmt_size(n: int) -> str:
    for unit, div in (("GiB", GiB), ("MiB", MiB), ("KiB", KiB)):
        if n >= div and n % div == 0:
            return f"{n // div} {unit}"
    return f"{n} B"


# --------------------------------------------------------------------------- environment


@contextlib.contextmanager
def tmpdir(prefix: str = "bastion-bench-", base: str = "/tmp") -> Iterator[Path]:
    """A fresh directory under /tmp, removed afterwards whatever happens."""
    path = Path(tempfile.mkdtemp(prefix=prefix, dir=base))
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def require(command: str) -> str:
    """Absolute path of ``command`` or ``Skip``."""
    path = shutil.which(command)
    if path is None:
        raise Skip(f"{command} is not installed (make deps)")
    return path


def bastion_executable() -> str:
    """The ``bastion`` console script next to this interpreter, else the repo venv's, else PATH."""
    for candidate in (
        Path(sys.executable).parent / "bastion",
        REPO_ROOT / ".venv" / "bin" / "bastion",
    ):
        if candidate.is_file() and os.access(candidate, os.X_OK):
            return str(candidate)
    return require("bastion")


# --------------------------------------------------------------------------- /proc


def proc_status(pid: int) -> dict[str, int] | None:
    """The ``Vm*``/``Rss*`` lines of /proc/<pid>/status in KiB, or None if the process is gone."""
    try:
        text = Path(f"/proc/{pid}/status").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return None
    out: dict[str, int] = {}
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key.startswith(("Vm", "Rss")) and value.strip().endswith("kB"):
            out[key] = int(value.split()[0])
    return out


def children(pid: int) -> list[int]:
    """Direct children of ``pid`` (from /proc/<pid>/task/*/children, else by scanning ppids)."""
    kids: list[int] = []
    try:
        tasks = list(Path(f"/proc/{pid}/task").iterdir())
    except FileNotFoundError:
        return []
    if all((t / "children").exists() for t in tasks[:1]):  # CONFIG_PROC_CHILDREN
        for task in tasks:
            with contextlib.suppress(FileNotFoundError):
                kids.extend(int(x) for x in (task / "children").read_text().split())
        return sorted(set(kids))
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        with contextlib.suppress(OSError, ValueError, IndexError):
            stat = (entry / "stat").read_text()
            if int(stat.rpartition(")")[2].split()[1]) == pid:
                kids.append(int(entry.name))
    return sorted(kids)


_CLK_TCK = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of ``pid`` (its threads included), 0.0 if gone."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    except (FileNotFoundError, ProcessLookupError):
        return 0.0
    # fields[0] is field 3 (state); utime and stime are fields 14 and 15.
    return (int(fields[11]) + int(fields[12])) / _CLK_TCK


def reset_hwm(pid: int) -> bool:
    """Reset ``VmHWM`` of ``pid`` to its current RSS; False if the kernel does not allow it."""
    try:
        with open(f"/proc/{pid}/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


_hwm_reset: bool | None = None


def hwm_reset_supported() -> bool:
    global _hwm_reset
    if _hwm_reset is None:
        _hwm_reset = reset_hwm(os.getpid())
    return _hwm_reset


def own_peak_rss_kib() -> int:
    """Peak RSS of this (client) process since it started (never reset here)."""
    import resource

    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)


# --------------------------------------------------------------------------- measuring


@dataclass
class Measurement:
    """What one ``ProcessGroup.measure()`` block saw."""

    #: Peak RSS per role in KiB: the largest VmHWM among that role's processes.
    peak_kib: dict[str, int] = field(default_factory=dict)
    #: CPU seconds used per role (summed over its processes) during the block.
    cpu_s: dict[str, float] = field(default_factory=dict)
    #: True if VmHWM was reset at the start (a per-block peak), False if it is since process start.
    per_block: bool = True

    @property
    def peak_total_kib(self) -> int:
        """Sum of the role peaks: an upper bound on the server's footprint (forked processes
        share pages, which this counts once per process)."""
        return sum(self.peak_kib.values())

    @property
    def cpu_total_s(self) -> float:
        return sum(self.cpu_s.values())


class ProcessGroup:
    """The processes making up one server, by role (e.g. ``parent``, ``worker``)."""

    def roles(self) -> dict[str, list[int]]:
        raise NotImplementedError

    def current_rss_kib(self) -> dict[str, int]:
        """Current VmRSS per role (largest process of that role)."""
        out: dict[str, int] = {}
        for role, pids in self.roles().items():
            values = [(proc_status(p) or {}).get("VmRSS", 0) for p in pids]
            out[role] = max(values, default=0)
        return out

    @contextlib.contextmanager
    def measure(self) -> Iterator[Measurement]:
        """Peak RSS and CPU time of this group's processes over the ``with`` block."""
        roles = self.roles()
        per_block = all(reset_hwm(p) for pids in roles.values() for p in pids)
        cpu0 = {p: cpu_seconds(p) for pids in roles.values() for p in pids}
        m = Measurement(per_block=per_block)
        yield m
        for role, pids in roles.items():
            peaks = [(proc_status(p) or {}).get("VmHWM", 0) for p in pids]
            m.peak_kib[role] = max(peaks, default=0)
            m.cpu_s[role] = sum(max(0.0, cpu_seconds(p) - cpu0[p]) for p in pids)


# --------------------------------------------------------------------------- servers


class Server(ProcessGroup):
    """A server process started from a command line, logging to a file in ``workdir``.

    Subclasses set ``name``/``label``, build ``command()``, and may override ``roles()`` and
    ``ready()``. Use as a context manager: ``with BastionServer(dir) as s: s.url``.
    """

    name = "server"
    label = "server"
    host = "127.0.0.1"

    def __init__(self, workdir: Path, port: int | None = None) -> None:
        self.workdir = Path(workdir)
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.port = port or free_port(self.host)
        self.log_path = self.workdir / f"{self.name}.log"
        self.proc: subprocess.Popen[bytes] | None = None

    # -- to override
    def command(self) -> list[str]:
        raise NotImplementedError

    def ready(self) -> bool:
        """True once the server answers ``GET /v2/`` with a non-5xx status."""
        try:
            conn = http.client.HTTPConnection(self.host, self.port, timeout=2)
            try:
                conn.request("GET", "/v2/")
                resp = conn.getresponse()
                resp.read()
                return resp.status < 500
            finally:
                conn.close()
        except OSError:
            return False

    def roles(self) -> dict[str, list[int]]:
        return {"process": [self.pid]}

    # -- common
    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    @property
    def pid(self) -> int:
        assert self.proc is not None, "server not started"
        return self.proc.pid

    def log_tail(self, lines: int = 20, width: int = 200) -> str:
        """The last ``lines`` lines of the server's log, each cut to ``width`` characters."""
        try:
            text = self.log_path.read_text(errors="replace").splitlines()
        except FileNotFoundError:
            return "(no log)"
        tail = [t if len(t) <= width else t[:width] + "..." for t in text[-lines:]]
        return "\n".join(tail) or "(empty log)"

    def check_alive(self) -> None:
        if self.proc is not None and self.proc.poll() is not None:
            raise BenchError(
                f"{self.label} exited with status {self.proc.returncode}; log tail:\n"
                f"{self.log_tail()}"
            )

    def start(self, timeout: float = 30.0) -> Server:
        log = open(self.log_path, "ab")  # handed to the child, closed below
        try:
            self.proc = subprocess.Popen(
                self.command(),
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                cwd=self.workdir,
                start_new_session=True,  # our Ctrl-C does not reach it; we stop it ourselves
            )
        finally:
            log.close()
        deadline = time.monotonic() + timeout
        while not self.ready():
            self.check_alive()
            if time.monotonic() > deadline:
                self.stop()
                raise BenchError(
                    f"{self.label} not ready after {timeout:.0f}s; log tail:\n{self.log_tail()}"
                )
            time.sleep(0.05)
        return self

    def stop(self, timeout: float = 15.0) -> int | None:
        """SIGTERM, then SIGKILL after ``timeout``; returns the exit status."""
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        return self.proc.returncode

    def __enter__(self) -> Server:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


class BastionServer(Server):
    """``bastion serve --workers N``: a parent that forks N workers (roles ``parent``, ``worker``).

    ``worker_pids`` is captured at start; ``check_workers()`` raises if any worker was replaced
    (the parent restarts workers that die, which would otherwise hide a crash)."""

    name = "bastion"

    def __init__(
        self,
        workdir: Path,
        port: int | None = None,
        workers: int = 1,
        extra_args: Sequence[str] = (),
    ) -> None:
        super().__init__(workdir, port)
        self.workers = workers
        self.extra_args = list(extra_args)
        self.root = self.workdir / "root"
        self.worker_pids: list[int] = []
        self.label = f"bastion ({workers} worker{'s' if workers != 1 else ''})"

    def command(self) -> list[str]:
        return [
            bastion_executable(),
            "serve",
            "--root",
            str(self.root),
            "--listen",
            f"{self.host}:{self.port}",
            "--workers",
            str(self.workers),
            *self.extra_args,
        ]

    def start(self, timeout: float = 30.0) -> Server:
        super().start(timeout)
        deadline = time.monotonic() + timeout
        while len(children(self.pid)) < self.workers:
            self.check_alive()
            if time.monotonic() > deadline:
                raise BenchError(
                    f"{self.label}: only {children(self.pid)} workers after {timeout:.0f}s"
                )
            time.sleep(0.05)
        self.worker_pids = children(self.pid)
        return self

    def roles(self) -> dict[str, list[int]]:
        return {"worker": children(self.pid), "parent": [self.pid]}

    def check_workers(self) -> None:
        self.check_alive()
        now = children(self.pid)
        if now != self.worker_pids:
            raise BenchError(
                f"{self.label}: worker processes changed from {self.worker_pids} to {now} "
                f"(a worker died and was restarted); log tail:\n{self.log_tail()}"
            )


DISTRIBUTION_CONFIG = """\
version: 0.1
log:
  level: error
  accesslog:
    disabled: true
storage:
  filesystem:
    rootdirectory: {root}
  delete:
    enabled: true
  maintenance:
    uploadpurging:
      enabled: false
http:
  addr: {host}:{port}
  secret: bastion-bench-not-a-secret
health:
  storagedriver:
    enabled: false
"""


class DistributionServer(Server):
    """CNCF distribution (Debian's ``docker-registry``), filesystem storage in ``workdir``,
    no cache, no auth: the plain reference behaviour to compare with."""

    name = "distribution"

    def __init__(
        self, workdir: Path, port: int | None = None, binary: str = "docker-registry"
    ) -> None:
        super().__init__(workdir, port)
        self.binary = require(binary)
        self.root = self.workdir / "root"
        self.config_path = self.workdir / "config.yml"
        self.label = f"distribution {self.version()}"

    def version(self) -> str:
        try:
            out = subprocess.run(
                [self.binary, "--version"], capture_output=True, text=True, timeout=10
            )
            return out.stdout.split()[-1].split("+")[0]
        except (OSError, IndexError, subprocess.SubprocessError):
            return "?"

    def command(self) -> list[str]:
        self.root.mkdir(parents=True, exist_ok=True)
        self.config_path.write_text(
            DISTRIBUTION_CONFIG.format(root=self.root, host=self.host, port=self.port)
        )
        return [self.binary, "serve", str(self.config_path)]


# --------------------------------------------------------------------------- statistics and tables


def median(values: Sequence[float]) -> float | None:
    return statistics.median(values) if values else None


def paired_ratio(a: Sequence[float], b: Sequence[float]) -> float | None:
    """Median of a[i]/b[i] over rounds present in both (a and b measured back to back)."""
    ratios = [x / y for x, y in zip(a, b, strict=False) if y]
    return statistics.median(ratios) if ratios else None


def fmt_num(value: float | None, digits: int = 2) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def fmt_ratio(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}x"


def render_table(
    header_rows: Sequence[Sequence[str]],
    rows: Sequence[Sequence[Any]],
    *,
    left: int = 1,
    separators: Sequence[int] = (),
    groups: Sequence[tuple[int, str]] = (),
) -> str:
    """A plain-text table.

    ``header_rows`` are printed above a rule; the first ``left`` columns are left-aligned, the
    rest right-aligned; a ``|`` is drawn before each column index in ``separators``; ``groups``
    are (first column, title) pairs printed on a line above the headers, each title starting
    over its first column and spanning up to the next group. ``None`` cells print as ``-``; a
    row that is a 1-tuple of one string is printed as is (a section title or a blank line).
    """

    def cells(r: Sequence[Any]) -> list[str]:
        return ["-" if c is None else str(c) for c in r]

    body = [cells(r) for r in rows if len(r) != 1]
    heads = [cells(h) for h in header_rows]
    ncols = max(len(r) for r in [*heads, *body])
    widths = [0] * ncols
    for r in [*heads, *body]:
        for i, c in enumerate(r):
            widths[i] = max(widths[i], len(c))

    starts: list[int] = []

    def line(cs: Sequence[str]) -> str:
        out = ""
        starts.clear()
        for i in range(ncols):
            c = cs[i] if i < len(cs) else ""
            if i:
                out += " "
            if i in separators:
                out += "| "
            starts.append(len(out))
            out += c.ljust(widths[i]) if i < left else c.rjust(widths[i])
        return out.rstrip()

    lines = [line(h) for h in heads]
    if groups:
        g = ""
        for col, title in groups:
            g = g.ljust(starts[col]) + title + " "
        for i in separators:  # keep the column separators visible on the group line
            pos = starts[i] - 2
            g = g.ljust(pos + 1)
            if g[pos] == " ":
                g = g[:pos] + "|" + g[pos + 1 :]
        lines.insert(0, g.rstrip())
    rule = "-" * max(len(x) for x in lines)
    lines.append(rule)
    for row in rows:
        lines.append(str(row[0]) if len(row) == 1 else line(cells(row)))
    return "\n".join(lines)
