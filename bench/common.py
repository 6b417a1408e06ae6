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
        self.env: dict[str, str] = {}  # added to this process's environment for the server

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
                env={**os.environ, **self.env} if self.env else None,
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


# =========================================================================== added for
# pullthrough.py and mirror.py: measured subprocesses, skopeo, a token-auth upstream, a
# distribution pull-through proxy, and streaming blob transfer helpers.

import hashlib  # noqa: E402
import json  # noqa: E402
import random  # noqa: E402
import urllib.parse  # noqa: E402
import zlib  # noqa: E402

__all__ += [
    "RunResult",
    "run_measured",
    "rusage_wrapper",
    "Skopeo",
    "DistributionProxyServer",
    "TokenUpstream",
    "blob_traffic",
    "stream_get",
    "LayerFile",
    "write_layer_file",
    "write_random_file",
    "import_tests",
    "skipped",
    "SKIPPED",
]


def import_tests() -> None:
    """Make ``import tests.upstream`` / ``tests.release`` / ``tests.images`` work from a
    benchmark script (they live in the repository root, next to bench/)."""
    root = str(REPO_ROOT)
    if root not in sys.path:
        sys.path.insert(0, root)


#: The exit status of a benchmark that cannot run here (``run.py`` reports it as skipped).
SKIPPED = 77


def skipped(name: str, *commands: str) -> int | None:
    """None if ``commands``, the project's ``bastion`` and the tests' harness (PyJWT and
    cryptography, from the test extras) are all there; else why not, printed as the
    benchmark ``name``'s one line, and ``SKIPPED`` to exit with."""
    try:
        for command in commands:
            require(command)
        bastion_executable()
        import_tests()
        import tests.upstream  # noqa: F401
    except Skip as e:
        print(f"{name}: skipped: {e}", file=sys.stderr)
        return SKIPPED
    except ImportError as e:
        print(f"{name}: skipped: {e} (pip install -e '.[test]')", file=sys.stderr)
        return SKIPPED
    return None


@dataclass
class RunResult:
    """One finished subprocess: exit status, wall time, its own peak RSS (``ru_maxrss``) and
    CPU seconds (user + system, its waited-for descendants included)."""

    argv: list[str]
    returncode: int
    elapsed: float
    maxrss_kib: int
    cpu_s: float
    stdout_path: Path
    stderr_path: Path
    timed_out: bool = False

    @property
    def ok(self) -> bool:
        return self.returncode == 0 and not self.timed_out

    def stdout(self) -> str:
        return self.stdout_path.read_text(errors="replace")

    def stderr_tail(self, lines: int = 12, width: int = 300) -> str:
        try:
            text = self.stderr_path.read_text(errors="replace").splitlines()
        except FileNotFoundError:
            return "(no stderr)"
        tail = [t if len(t) <= width else t[:width] + "..." for t in text[-lines:]]
        return "\n".join(tail) or "(empty stderr)"

    def describe(self) -> str:
        what = "timed out" if self.timed_out else f"exit status {self.returncode}"
        return f"{' '.join(self.argv)}: {what}; stderr tail:\n{self.stderr_tail()}"


# Why a trampoline: Linux carries the RSS high-water mark of the address space a process had
# before execve(2) into its ru_maxrss (exec_mmap -> setmax_mm_hiwater_rss), so a command
# forked straight from this (large) benchmark process reports at least our RSS. A small
# process forks the command instead and reports its wait4() usage: GNU time (`/usr/bin/time
# -f`, Debian package "time", ~1 ms per command, 10 ms CPU resolution, RSS floor ~1 MiB) if
# installed, else this Python script (~15 ms per command, RSS floor ~5 MiB).
_RUSAGE_TRAMPOLINE = r"""
import os, sys
pid = os.fork()
if pid == 0:
    try:
        os.execvp(sys.argv[2], sys.argv[2:])
    finally:
        os._exit(127)
while True:
    try:
        _, status, ru = os.wait4(pid, 0)
        break
    except InterruptedError:
        continue
with open(sys.argv[1], "w") as f:
    f.write("%d %f %f\n" % (ru.ru_maxrss, ru.ru_utime, ru.ru_stime))
code = os.waitstatus_to_exitcode(status)
os._exit(code if code >= 0 else 128 - code)
"""


_gnu_time: str | bool | None = False  # False: not looked up yet


def _trampoline(usage_path: Path) -> list[str]:
    global _gnu_time
    if _gnu_time is False:
        _gnu_time = None
        path = shutil.which("time") or (
            "/usr/bin/time" if os.path.exists("/usr/bin/time") else None
        )
        if path is not None:
            with contextlib.suppress(OSError, subprocess.SubprocessError):
                out = subprocess.run(
                    [path, "--version"], capture_output=True, text=True, timeout=10
                )
                if "GNU" in out.stdout + out.stderr:
                    _gnu_time = path
    if isinstance(_gnu_time, str):
        return [_gnu_time, "-f", "%M %U %S", "-o", str(usage_path)]
    return [sys.executable, "-I", "-S", "-c", _RUSAGE_TRAMPOLINE, str(usage_path)]


def rusage_wrapper() -> str:
    """What ``run_measured`` reads a command's peak RSS and CPU with."""
    _trampoline(Path("/dev/null"))
    return "GNU time" if isinstance(_gnu_time, str) else "a Python wait4 trampoline"


def run_measured(
    argv: Sequence[str],
    *,
    out_dir: Path,
    name: str,
    env: dict[str, str] | None = None,
    cwd: Path | None = None,
    timeout: float = 900.0,
) -> RunResult:
    """Run ``argv`` to completion, stdout/stderr to ``out_dir/<name>.out|.err`` (overwritten),
    and report its own peak RSS and CPU time (``wait4``, through a small trampoline process:
    see ``_RUSAGE_TRAMPOLINE``; the floor of the RSS figure is about 5 MiB). The command runs
    in its own session; on timeout or Ctrl-C the whole group is killed. A command killed by a
    signal gets returncode 128 + signal."""
    out_dir.mkdir(parents=True, exist_ok=True)
    out_path, err_path = out_dir / f"{name}.out", out_dir / f"{name}.err"
    usage_path = out_dir / f"{name}.rusage"
    usage_path.unlink(missing_ok=True)
    wrapped = [*_trampoline(usage_path), *argv]
    with open(out_path, "wb") as out, open(err_path, "wb") as err:
        t0 = time.perf_counter()
        proc = subprocess.Popen(
            wrapped,
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=err,
            env=env,
            cwd=cwd,
            start_new_session=True,
        )

    def kill_group() -> None:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, signal.SIGKILL)

    try:
        try:
            proc.wait(timeout)
            timed_out = False
        except subprocess.TimeoutExpired:
            timed_out = True
            kill_group()
            proc.wait()
    except BaseException:
        kill_group()
        proc.wait()
        raise
    elapsed = time.perf_counter() - t0
    maxrss, cpu = 0, 0.0
    with contextlib.suppress(OSError, ValueError, IndexError):
        # GNU time puts "Command exited with non-zero status N" on a line before the figures
        fields = usage_path.read_text().strip().splitlines()[-1].split()
        maxrss, cpu = int(fields[0]), float(fields[1]) + float(fields[2])
    return RunResult(
        list(argv), proc.returncode, elapsed, maxrss, cpu, out_path, err_path, timed_out
    )


class Skopeo:
    """``skopeo`` with a private environment (its own HOME, TMPDIR, registries.conf,
    registries.d and auth file, the insecure signature policy, TLS verification off for
    ``docker://`` references: everything here is plain HTTP on loopback), so nothing of the
    user's container configuration is read or written. As in ``tests.upstream.skopeo_copy``."""

    def __init__(self, workdir: Path) -> None:
        self.binary = require("skopeo")
        self.workdir = Path(workdir)
        for sub in ("home", "tmp", "runtime", "registries.d", "logs"):
            (self.workdir / sub).mkdir(parents=True, exist_ok=True)
        (self.workdir / "runtime").chmod(0o700)
        (self.workdir / "registries.conf").write_text("unqualified-search-registries = []\n")
        self.authfile = self.workdir / "auth.json"
        self.authfile.write_text('{"auths": {}}\n')
        self.env = {
            "PATH": os.environ.get("PATH", "/usr/sbin:/usr/bin:/sbin:/bin"),
            "LANG": "C.UTF-8",
            "HOME": str(self.workdir / "home"),
            "TMPDIR": str(self.workdir / "tmp"),
            "XDG_RUNTIME_DIR": str(self.workdir / "runtime"),
            "XDG_CONFIG_HOME": str(self.workdir / "home" / ".config"),
            "REGISTRY_AUTH_FILE": str(self.authfile),
            "CONTAINERS_REGISTRIES_CONF": str(self.workdir / "registries.conf"),
        }
        self._n = 0

    def version(self) -> str:
        try:
            out = subprocess.run(
                [self.binary, "--version"], capture_output=True, text=True, timeout=10
            )
            return out.stdout.split()[-1]
        except (OSError, IndexError, subprocess.SubprocessError):
            return "?"

    def copy(
        self,
        source: str,
        destination: str,
        *args: str,
        src_creds: tuple[str, str] | None = None,
        timeout: float = 900.0,
    ) -> RunResult:
        """``skopeo copy [args] SOURCE DESTINATION``; see ``RunResult``."""
        argv = [
            self.binary,
            "--insecure-policy",
            "--registries.d",
            str(self.workdir / "registries.d"),
            "copy",
        ]
        if source.startswith("docker://"):
            argv.append("--src-tls-verify=false")
        if destination.startswith("docker://"):
            argv.append("--dest-tls-verify=false")
        if src_creds is not None:
            argv += ["--src-creds", ":".join(src_creds)]
        argv += [*args, source, destination]
        self._n += 1
        return run_measured(
            argv,
            out_dir=self.workdir / "logs",
            name=f"copy-{self._n % 4}",  # keep the last few
            env=self.env,
            timeout=timeout,
        )


#: The plain configuration plus a ``proxy:`` section (warnings logged: its upstream traffic).
DISTRIBUTION_PROXY_CONFIG = DISTRIBUTION_CONFIG.replace("level: error", "level: warn") + (
    "proxy:\n  remoteurl: {remote}\n  username: {username}\n  password: {password}\n"
)


class DistributionProxyServer(DistributionServer):
    """CNCF distribution as a pull-through cache (``proxy: remoteurl``) of ``remote``,
    authenticating to it with ``credentials`` (it runs the token flow itself). Clients address
    the upstream repositories by their own names (``/v2/<repo>/...``)."""

    name = "distribution-proxy"

    def __init__(
        self,
        workdir: Path,
        remote: str,
        credentials: tuple[str, str],
        port: int | None = None,
        binary: str = "docker-registry",
    ) -> None:
        super().__init__(workdir, port, binary)
        self.remote = remote
        self.credentials = credentials
        self.label = f"distribution {self.version()} proxy"

    def command(self) -> list[str]:
        self.root.mkdir(parents=True, exist_ok=True)
        user, password = self.credentials
        self.config_path.write_text(
            DISTRIBUTION_PROXY_CONFIG.format(
                root=self.root,
                host=self.host,
                port=self.port,
                remote=self.remote,
                username=json.dumps(user),
                password=json.dumps(password),
            )
        )
        return [self.binary, "serve", str(self.config_path)]


def blob_traffic(entries: Sequence[Any], digest: str = "") -> tuple[int, int]:
    """(count, bytes) of the blob GETs served (200/206) in distribution access-log entries
    (``tests.upstream.AccessLogEntry``), only those of ``digest`` if given."""
    count = size = 0
    for e in entries:
        if e.method == "GET" and "/blobs/" in e.path and e.status in (200, 206):
            if digest and not e.path.endswith(f"/blobs/{digest}"):
                continue
            count += 1
            size += e.size or 0
    return count, size


class TokenUpstream:
    """The upstream of the pull-through and mirror benchmarks: ``tests.upstream``'s
    ``TokenService`` (RS256 tokens, user ``puller``, in a thread of this process) and
    ``DistributionUpstream`` (CNCF distribution 2.8 behind it, access log on) under
    ``workdir``. A context manager; ``url``, ``host``, ``credentials``, ``access_log()``,
    ``reset_counts()``, and ``push_blob_file`` / ``push_manifest`` to seed it."""

    def __init__(self, workdir: Path) -> None:
        import_tests()
        require("docker-registry")
        from tests import upstream as up

        self._up = up
        self.workdir = Path(workdir)
        self.credentials: tuple[str, str] = up.PULLER
        self.tokens = up.TokenService(self.workdir / "token")
        self.registry = up.DistributionUpstream(
            self.workdir / "upstream", self.tokens, binary=shutil.which("docker-registry") or ""
        )
        self.client = up.RegistryClient("http://127.0.0.1:1", self.credentials)  # url set later
        self.label = "distribution upstream"

    def __enter__(self) -> TokenUpstream:
        self.tokens.start()
        try:
            self.registry.start()
        except BaseException:
            self.tokens.stop()
            raise
        self.client = self._up.RegistryClient(self.registry.url, self.credentials, timeout=600)
        return self

    def __exit__(self, *exc: object) -> None:
        try:
            self.registry.stop()
        finally:
            self.tokens.stop()

    @property
    def url(self) -> str:
        return str(self.registry.url)

    @property
    def host(self) -> str:
        return str(self.registry.host)

    @property
    def pid(self) -> int | None:
        proc = self.registry._process
        return proc.pid if proc is not None else None

    def write_authfile(self, path: Path, host: str) -> Path:
        """An auth.json with the credentials filed under ``host`` (e.g. ``quay.io``)."""
        return Path(self._up.write_authfile(path, {host: self.credentials}))

    def reset_counts(self) -> None:
        self.registry.reset_counts()

    def access_log(self) -> list[Any]:
        return list(self.registry.access_log())

    def log_tail(self, lines: int = 20) -> str:
        return str(self.registry.log_tail(lines))

    def _token(self, repo: str) -> str:
        answer = self.client.fetch_token(
            self.tokens.realm, self.tokens.service, f"repository:{repo}:pull,push"
        )
        if answer.status != 200:
            raise BenchError(f"token service answered {answer.status} for a push token")
        doc = answer.json()
        return str(doc.get("token") or doc["access_token"])

    def push_blob_file(self, repo: str, path: Path, digest: str) -> None:
        """Upload the file at ``path`` (whose digest is ``digest``) to ``repo``, streamed with
        sendfile(2): POST, then one PUT ?digest=. Skipped if the upstream has it."""
        if self.client.request("HEAD", f"/v2/{repo}/blobs/{digest}").status == 200:
            return
        auth = {"Authorization": f"Bearer {self._token(repo)}"}
        conn = http.client.HTTPConnection("127.0.0.1", self.registry.port, timeout=600)
        try:
            conn.request("POST", f"/v2/{repo}/blobs/uploads/", headers=auth)
            resp = conn.getresponse()
            resp.read()
            if resp.status != 202:
                raise BenchError(f"upstream: POST upload to {repo}: HTTP {resp.status}")
            loc = urllib.parse.urlsplit(resp.getheader("Location", ""))
            target = loc.path + "?" + (loc.query + "&" if loc.query else "")
            target += "digest=" + urllib.parse.quote(digest)
            size = path.stat().st_size
            conn.putrequest("PUT", target, skip_accept_encoding=True)
            for k, v in {
                **auth,
                "Content-Type": "application/octet-stream",
                "Content-Length": str(size),
            }.items():
                conn.putheader(k, v)
            conn.endheaders()
            assert conn.sock is not None
            with open(path, "rb") as f:
                conn.sock.sendfile(f, 0, size)
            resp = conn.getresponse()
            body = resp.read(500)
            if resp.status != 201:
                raise BenchError(f"upstream: PUT {digest} to {repo}: HTTP {resp.status} {body!r}")
        finally:
            conn.close()

    def push_blob(self, repo: str, data: bytes) -> str:
        return str(self.client.push_blob(repo, data))

    def push_manifest(self, repo: str, reference: str | None, data: bytes, media_type: str) -> str:
        return str(self.client.push_manifest(repo, reference, data, media_type))


def stream_get(
    base_url: str,
    path: str,
    *,
    expect_size: int | None = None,
    digest: str | None = None,
    timeout: float = 600.0,
    headers: dict[str, str] | None = None,
) -> tuple[int, float]:
    """GET ``base_url + path`` into a 1 MiB buffer (nothing kept); (bytes, seconds to the first
    body byte). Raises ``BenchError`` on a non-200 answer, a byte count other than
    ``expect_size``, or (if ``digest`` is given) content with another sha256."""
    u = urllib.parse.urlsplit(base_url)
    conn = http.client.HTTPConnection(u.hostname or "127.0.0.1", u.port or 80, timeout=timeout)
    h = hashlib.sha256() if digest else None
    t0 = time.perf_counter()
    first = 0.0
    try:
        conn.request("GET", path, headers={"Accept-Encoding": "identity", **(headers or {})})
        resp = conn.getresponse()
        if resp.status != 200:
            body = resp.read(400).decode(errors="replace").strip()
            raise BenchError(f"GET {base_url}{path}: HTTP {resp.status} {body}")
        view = memoryview(bytearray(MiB))
        total = 0
        while n := resp.readinto(view):
            if not total:
                first = time.perf_counter() - t0
            total += n
            if h is not None:
                h.update(view[:n])
    finally:
        conn.close()
    if expect_size is not None and total != expect_size:
        raise BenchError(f"GET {base_url}{path}: {total} bytes, expected {expect_size}")
    if h is not None and digest is not None and f"sha256:{h.hexdigest()}" != digest:
        raise BenchError(f"GET {base_url}{path}: content has sha256:{h.hexdigest()}")
    return total, first


def write_random_file(path: Path, size: int, seed: str) -> str:
    """``size`` seeded pseudo-random bytes (incompressible, like a compressed layer) at
    ``path``, written in 1 MiB pieces; returns the sha256 digest."""
    rng = random.Random(seed)
    h = hashlib.sha256()
    with open(path, "wb") as f:
        remaining = size
        while remaining:
            block = rng.randbytes(min(MiB, remaining))
            f.write(block)
            h.update(block)
            remaining -= len(block)
    return f"sha256:{h.hexdigest()}"


@dataclass(frozen=True)
class LayerFile:
    """A gzip tar layer written to a file: its digest, size and ``diff_id``."""

    path: Path
    digest: str
    size: int
    diff_id: str


def write_layer_file(
    path: Path, payload_size: int, seed: str, name: str = "payload.bin"
) -> LayerFile:
    """A valid gzip-compressed tar layer holding one file of ``payload_size`` seeded
    pseudo-random bytes, streamed to ``path`` (deflate level 0: random bytes do not compress,
    and level 0 writes at memory speed). Deterministic for (payload_size, seed, name)."""
    import tarfile

    info = tarfile.TarInfo(f"opt/bench/{name}")
    info.size, info.mode, info.mtime, info.uid, info.gid = payload_size, 0o644, 1704067200, 0, 0
    info.uname = info.gname = "root"
    header = info.tobuf(format=tarfile.USTAR_FORMAT)
    tar_len = len(header) + payload_size + (-payload_size % 512) + 1024
    trailer_len = -tar_len % tarfile.RECORDSIZE + 1024 + (-payload_size % 512)
    diff = hashlib.sha256()
    comp = hashlib.sha256()
    gz = zlib.compressobj(0, zlib.DEFLATED, 31)  # gzip wrapper, mtime 0
    size = 0
    rng = random.Random(seed)
    with open(path, "wb") as f:

        def put(raw: bytes) -> None:
            nonlocal size
            diff.update(raw)
            out = gz.compress(raw)
            if out:
                comp.update(out)
                f.write(out)
                size += len(out)

        put(header)
        remaining = payload_size
        while remaining:
            block = rng.randbytes(min(MiB, remaining))
            put(block)
            remaining -= len(block)
        put(bytes(trailer_len))
        out = gz.flush()
        comp.update(out)
        f.write(out)
        size += len(out)
    return LayerFile(path, f"sha256:{comp.hexdigest()}", size, f"sha256:{diff.hexdigest()}")


# =========================================================================== added for
# serving.py: nginx over a directory (the static-file ceiling), wrk, and a push client for
# registries without auth.

import re  # noqa: E402

__all__ += [
    "NginxServer",
    "WrkResult",
    "parse_wrk",
    "run_wrk",
    "PlainRegistry",
]


NGINX_CONFIG = """\
{user}worker_processes {workers};
daemon off;
pid {pid};
error_log {log} warn;
events {{
    worker_connections 4096;
}}
http {{
    access_log off;
    types {{ }}
    default_type application/octet-stream;
    sendfile on;
    tcp_nopush on;
    keepalive_requests 1000000;
    client_body_temp_path {tmp}/body;
    proxy_temp_path {tmp}/proxy;
    fastcgi_temp_path {tmp}/fastcgi;
    uwsgi_temp_path {tmp}/uwsgi;
    scgi_temp_path {tmp}/scgi;
    server {{
        listen {host}:{port};
        root {docroot};
        location / {{ }}
    }}
}}
"""


class NginxServer(Server):
    """nginx serving the files under ``docroot`` as they are (``GET /a/b`` is
    ``docroot/a/b``): ``sendfile on``, ``tcp_nopush on``, ``worker_processes`` ``workers``,
    every file ``application/octet-stream`` (an empty ``types`` map), no access log,
    ``keepalive_requests`` 1000000 (a kept-alive connection is never closed by count). Runs
    in the foreground (``daemon off``) with its pid file, temp paths and error log in
    ``workdir``; as root it keeps ``user root`` so that its workers can read a 0700 temp
    directory. Roles: ``worker`` (the workers) and ``master``."""

    name = "nginx"

    def __init__(
        self,
        workdir: Path,
        docroot: Path,
        port: int | None = None,
        workers: int = 2,
        binary: str = "nginx",
    ) -> None:
        super().__init__(workdir, port)
        found = shutil.which(binary) or next(
            (p for p in (f"/usr/sbin/{binary}", f"/sbin/{binary}") if os.access(p, os.X_OK)),
            None,
        )
        if found is None:
            raise Skip(f"{binary} is not installed (Debian: nginx-light)")
        self.binary = found
        self.docroot = Path(docroot)
        self.workers = workers
        self.config_path = self.workdir / "nginx.conf"
        self.label = f"nginx {self.version()}"

    def version(self) -> str:
        try:
            out = subprocess.run([self.binary, "-v"], capture_output=True, text=True, timeout=10)
            return (out.stderr + out.stdout).strip().rpartition("/")[2] or "?"
        except (OSError, subprocess.SubprocessError):
            return "?"

    def command(self) -> list[str]:
        tmp = self.workdir / "tmp"
        tmp.mkdir(parents=True, exist_ok=True)
        self.config_path.write_text(
            NGINX_CONFIG.format(
                user="user root;\n" if os.geteuid() == 0 else "",
                workers=self.workers,
                pid=self.workdir / "nginx.pid",
                log=self.log_path,
                tmp=tmp,
                host=self.host,
                port=self.port,
                docroot=self.docroot,
            )
        )
        return [
            self.binary,
            "-p",
            f"{self.workdir}/",
            "-e",
            str(self.log_path),  # before the configuration is read (nginx >= 1.19.5)
            "-c",
            str(self.config_path),
        ]

    def start(self, timeout: float = 30.0) -> Server:
        super().start(timeout)
        deadline = time.monotonic() + timeout
        while len(children(self.pid)) < self.workers:
            self.check_alive()
            if time.monotonic() > deadline:
                raise BenchError(f"{self.label}: only {children(self.pid)} workers")
            time.sleep(0.05)
        return self

    def roles(self) -> dict[str, list[int]]:
        return {"worker": children(self.pid), "master": [self.pid]}


@dataclass
class WrkResult:
    """What ``wrk --latency`` printed: requests/s, the latency percentiles in ms (keys 50,
    75, 90, 99), the request count, non-2xx/3xx answers and socket errors."""

    rps: float
    requests: int
    seconds: float
    latency_ms: dict[int, float]
    non_2xx_3xx: int
    socket_errors: dict[str, int]  # connect, read, write, timeout
    output: str

    @property
    def errors(self) -> int:
        return self.non_2xx_3xx + sum(self.socket_errors.values())

    def describe_errors(self) -> str:
        parts = []
        if self.non_2xx_3xx:
            parts.append(f"{self.non_2xx_3xx} non-2xx/3xx answers")
        parts += [f"{n} socket {kind} errors" for kind, n in self.socket_errors.items() if n]
        return ", ".join(parts) + f" of {self.requests} requests" if parts else "none"


_WRK_UNITS_MS = {"us": 1e-3, "ms": 1.0, "s": 1e3, "m": 60e3, "h": 3600e3}


def _wrk_ms(text: str) -> float:
    m = re.fullmatch(r"([\d.]+)(us|ms|s|m|h)", text.strip())
    if not m:
        raise ValueError(f"not a wrk duration: {text!r}")
    return float(m.group(1)) * _WRK_UNITS_MS[m.group(2)]


def parse_wrk(output: str) -> WrkResult:
    """Parse the text ``wrk --latency`` prints (wrk 4.x). ``ValueError`` if a figure is missing."""
    rps = re.search(r"^Requests/sec:\s+([\d.]+)", output, re.MULTILINE)
    total = re.search(r"^\s*(\d+) requests in ([\d.]+\w+),", output, re.MULTILINE)
    if not rps or not total:
        raise ValueError("no Requests/sec or request count in wrk's output")
    latency: dict[int, float] = {}
    for pct, value in re.findall(r"^\s+(50|75|90|99)%\s+(\S+)\s*$", output, re.MULTILINE):
        latency[int(pct)] = _wrk_ms(value)
    if 99 not in latency or 50 not in latency:
        raise ValueError("no latency distribution in wrk's output (run it with --latency)")
    non = re.search(r"Non-2xx or 3xx responses:\s+(\d+)", output)
    sock = re.search(
        r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", output
    )
    errors = dict.fromkeys(("connect", "read", "write", "timeout"), 0)
    if sock:
        errors = dict(zip(errors, (int(x) for x in sock.groups()), strict=True))
    return WrkResult(
        rps=float(rps.group(1)),
        requests=int(total.group(1)),
        seconds=_wrk_ms(total.group(2)) / 1e3,
        latency_ms=latency,
        non_2xx_3xx=int(non.group(1)) if non else 0,
        socket_errors=errors,
        output=output,
    )


def run_wrk(
    url: str,
    *,
    threads: int = 2,
    connections: int = 64,
    duration: float = 8.0,
    headers: dict[str, str] | None = None,
    script: Path | None = None,
    timeout: float = 10.0,
) -> WrkResult:
    """``wrk -t -c -d --latency --timeout [-H ...] [-s script] URL``, parsed. ``timeout``
    (wrk's per-request timeout, default 2 s there) is raised to 10 s so that slow answers
    count in the latency figures instead of only as ``timeout`` socket errors. Raises
    ``BenchError`` if wrk fails or prints no figures. Note wrk 4.x cannot measure HEAD: its
    response parser waits for the body a Content-Length announces."""
    argv = [
        require("wrk"),
        f"-t{threads}",
        f"-c{connections}",
        f"-d{duration:g}s",
        f"--timeout={timeout:g}s",
        "--latency",
    ]
    for k, v in (headers or {}).items():
        argv += ["-H", f"{k}: {v}"]
    if script is not None:
        argv += ["-s", str(script)]
    argv.append(url)
    out = subprocess.run(argv, capture_output=True, text=True, timeout=duration + 60)
    if out.returncode != 0:
        raise BenchError(f"{' '.join(argv)}: exit status {out.returncode}: {out.stderr.strip()}")
    try:
        return parse_wrk(out.stdout)
    except ValueError as e:
        raise BenchError(f"{' '.join(argv)}: {e}; output:\n{out.stdout}{out.stderr}") from None


class PlainRegistry:
    """The push side of the distribution API for a registry without auth, over http.client,
    never holding a large blob in memory (files go out with sendfile(2))."""

    def __init__(self, base_url: str, label: str = "registry", timeout: float = 600.0) -> None:
        u = urllib.parse.urlsplit(base_url)
        self.host, self.port = u.hostname or "127.0.0.1", u.port or 80
        self.label = label
        self.timeout = timeout

    def _conn(self) -> http.client.HTTPConnection:
        return http.client.HTTPConnection(self.host, self.port, timeout=self.timeout)

    def request(
        self,
        method: str,
        path: str,
        body: bytes | None = None,
        headers: dict[str, str] | None = None,
    ) -> tuple[int, dict[str, str], bytes]:
        """(status, headers with lower-case names, body) of one request."""
        conn = self._conn()
        try:
            conn.request(method, path, body=body, headers=headers or {})
            resp = conn.getresponse()
            data = resp.read()
            return resp.status, {k.lower(): v for k, v in resp.getheaders()}, data
        finally:
            conn.close()

    def _upload_target(self, conn: http.client.HTTPConnection, repo: str, digest: str) -> str:
        conn.request("POST", f"/v2/{repo}/blobs/uploads/")
        resp = conn.getresponse()
        body = resp.read(500)
        if resp.status != 202 or not resp.getheader("Location"):
            raise BenchError(f"{self.label}: POST upload to {repo}: HTTP {resp.status} {body!r}")
        loc = urllib.parse.urlsplit(resp.getheader("Location", ""))
        target = loc.path + "?" + (loc.query + "&" if loc.query else "")
        return target + "digest=" + urllib.parse.quote(digest)

    def _finish(self, resp: http.client.HTTPResponse, what: str, digest: str) -> None:
        body = resp.read(500)
        if resp.status != 201:
            raise BenchError(f"{self.label}: {what}: HTTP {resp.status} {body!r}")
        got = resp.getheader("Docker-Content-Digest")
        if got is not None and got != digest:
            raise BenchError(f"{self.label}: {what}: answered Docker-Content-Digest {got}")

    def push_blob_file(self, repo: str, path: Path, digest: str) -> None:
        """POST, then one PUT ?digest= with the file's bytes, streamed with sendfile(2)."""
        conn = self._conn()
        try:
            target = self._upload_target(conn, repo, digest)
            size = Path(path).stat().st_size
            conn.putrequest("PUT", target, skip_accept_encoding=True)
            conn.putheader("Content-Type", "application/octet-stream")
            conn.putheader("Content-Length", str(size))
            conn.endheaders()
            assert conn.sock is not None
            with open(path, "rb") as f:
                conn.sock.sendfile(f, 0, size)
            self._finish(conn.getresponse(), f"PUT blob {digest} to {repo}", digest)
        finally:
            conn.close()

    def push_blob(self, repo: str, data: bytes) -> str:
        digest = f"sha256:{hashlib.sha256(data).hexdigest()}"
        conn = self._conn()
        try:
            target = self._upload_target(conn, repo, digest)
            conn.request(
                "PUT", target, body=data, headers={"Content-Type": "application/octet-stream"}
            )
            self._finish(conn.getresponse(), f"PUT blob {digest} to {repo}", digest)
        finally:
            conn.close()
        return digest

    def push_manifest(self, repo: str, reference: str, data: bytes, media_type: str) -> str:
        digest = f"sha256:{hashlib.sha256(data).hexdigest()}"
        conn = self._conn()
        try:
            conn.request(
                "PUT",
                f"/v2/{repo}/manifests/{reference}",
                body=data,
                headers={"Content-Type": media_type},
            )
            self._finish(conn.getresponse(), f"PUT manifest {repo}:{reference}", digest)
        finally:
            conn.close()
        return digest
