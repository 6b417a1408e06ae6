"""The ``bastion`` command as a user runs it: exit codes, one-line errors, serve and stop."""

from __future__ import annotations

import hashlib
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

BASTION = [sys.executable, "-m", "server.cli"]
REPO = Path(__file__).resolve().parent.parent


def run(*args: str, timeout: float = 30) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*BASTION, *args], capture_output=True, text=True, timeout=timeout, cwd=REPO
    )


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_ready(port: int, proc: subprocess.Popen[str], timeout: float = 20) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert proc.poll() is None, proc.stderr.read() if proc.stderr else ""
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/v2/", timeout=1) as r:
                if r.status == 200:
                    return
        except OSError:
            time.sleep(0.1)
    raise TimeoutError("bastion serve did not answer")


@pytest.mark.parametrize(
    ("args", "fragment"),
    [
        (["serve", "--bogus"], "unrecognized arguments: --bogus"),
        (["nosuchcommand"], "invalid choice"),
        (["serve", "--workers", "x"], "invalid int value"),
        (["serve", "--config", "/nonexistent.yaml"], "config file /nonexistent.yaml not found"),
        (["serve", "--listen", "nope"], "listen: expected HOST:PORT"),
    ],
)
def test_usage_errors_exit_2_with_one_line(args: list[str], fragment: str) -> None:
    p = run(*args)
    assert p.returncode == 2
    assert fragment in p.stderr
    assert len(p.stderr.strip().splitlines()) == 1
    assert "Traceback" not in p.stderr


def one_line(p: subprocess.CompletedProcess[str], code: int, fragment: str) -> None:
    assert p.returncode == code, p.stderr
    assert fragment in p.stderr
    assert len(p.stderr.strip().splitlines()) == 1, p.stderr
    assert "Traceback" not in p.stderr


def test_unusable_storage_roots_are_one_line(tmp_path: Path) -> None:
    a_file = tmp_path / "afile"
    a_file.write_text("x")
    one_line(run("serve", "--root", str(a_file)), 2, f"storage root {a_file} is not a directory")
    one_line(run("serve", "--root", str(a_file / "sub")), 2, "is not writable: Not a directory")
    one_line(run("serve", "--root", ""), 2, "storage root is empty")
    one_line(
        run("mirror", "image", "--root", str(a_file), "quay.io/team/app:v1"),
        2,
        "is not a directory",
    )
    layout = tmp_path / "layout"
    layout.mkdir()
    one_line(run("import", str(layout), "--root", str(a_file)), 2, "is not a directory")


def test_mirror_input_errors_exit_2(tmp_path: Path) -> None:
    root = str(tmp_path / "root")
    binary = tmp_path / "list.bin"
    binary.write_bytes(b"\xff\xfequay.io/a/b:c\n")
    one_line(
        run("mirror", "image", "--root", root, "--from-file", str(binary)), 2, "not UTF-8 text"
    )
    one_line(
        run("mirror", "image", "--root", root, "--from-file", str(tmp_path)), 2, "is a directory"
    )
    junk = tmp_path / "list.txt"
    junk.write_text("# images\nquay.io/team/app:v1\n\nnot a reference\n")
    one_line(
        run("mirror", "image", "--root", root, "--from-file", str(junk)), 2, "list.txt line 4:"
    )
    one_line(run("mirror", "image", "--root", root, "Quay.io/Team/App:v1"), 2, "bastion:")
    a_file = tmp_path / "afile"
    a_file.write_text("x")
    one_line(
        run("mirror", "image", "--root", root, "--out-dir", str(a_file), "quay.io/team/app:v1"),
        2,
        f"--out-dir {a_file} is not a directory",
    )


def test_version_and_mirror_arguments(tmp_path: Path) -> None:
    p = run("--version")
    assert p.returncode == 0 and p.stdout.startswith("bastion ")
    root = str(tmp_path / "root")
    ref = "quay.io/team/app:v1"
    one_line(run("mirror", "image", "--root", root, "--mirror-host", "not a host", ref), 2, "HOST")
    bad = tmp_path / "auth.json"
    bad.write_text('{"auths": {"quay.io": {"auth": "%%%"}}}')
    one_line(
        run("mirror", "image", "--root", root, "--authfile", str(bad), ref), 2, "is not base64"
    )
    assert "%%%" not in run("mirror", "image", "--authfile", str(bad), ref).stderr


def test_an_unreachable_upstream_fails_at_once(tmp_path: Path) -> None:
    cfg = tmp_path / "c.yaml"
    cfg.write_text(f"upstreams:\n  quay.io:\n    url: http://127.0.0.1:{free_port()}\n")
    t0 = time.monotonic()
    p = run("mirror", "image", "--config", str(cfg), "--root", str(tmp_path / "r"), "quay.io/a/b:c")
    one_line(p, 1, "upstream quay.io unreachable")
    assert time.monotonic() - t0 < 10  # no rounds of retries for an upstream never reached


def test_a_second_serve_on_the_same_port_is_refused(tmp_path: Path) -> None:
    port = free_port()
    first = subprocess.Popen(
        [*BASTION, "serve", "--root", str(tmp_path / "one"), "--listen", f"127.0.0.1:{port}"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=REPO,
    )
    try:
        wait_ready(port, first)
        second = run("serve", "--root", str(tmp_path / "two"), "--listen", f"127.0.0.1:{port}")
        one_line(second, 1, "another server is already listening")
        wildcard = run("serve", "--root", str(tmp_path / "two"), "--listen", f"0.0.0.0:{port}")
        assert wildcard.returncode == 1 and "cannot listen" in wildcard.stderr
    finally:
        first.send_signal(signal.SIGTERM)
        first.communicate(timeout=20)


def test_bad_config_key(tmp_path: Path) -> None:
    cfg = tmp_path / "c.yaml"
    cfg.write_text("storage:\n  rot: /x\n")
    p = run("serve", "--config", str(cfg))
    assert p.returncode == 2
    assert p.stderr.strip().startswith("bastion: unknown config key storage.rot")


def test_port_in_use_exits_1(tmp_path: Path) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        p = run("serve", "--root", str(tmp_path), "--listen", f"127.0.0.1:{port}")
    assert p.returncode == 1
    assert "cannot listen on 127.0.0.1" in p.stderr
    assert len(p.stderr.strip().splitlines()) == 1


def test_serve_workers_and_clean_stop(tmp_path: Path) -> None:
    port = free_port()
    proc = subprocess.Popen(
        [
            *BASTION,
            "serve",
            "--root",
            str(tmp_path / "root"),
            "--listen",
            f"127.0.0.1:{port}",
            "--workers",
            "2",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=REPO,
    )
    try:
        wait_ready(port, proc)
        children = Path(f"/proc/{proc.pid}/task/{proc.pid}/children").read_text().split()
        assert len(children) == 2
        # a blob pushed through one connection is visible to every later request (any worker)
        body = b"shared across workers"
        d = "sha256:" + hashlib.sha256(body).hexdigest()
        req = urllib.request.Request(
            f"http://127.0.0.1:{port}/v2/w/blobs/uploads/?digest={d}", data=body, method="POST"
        )
        assert urllib.request.urlopen(req, timeout=5).status == 201
        for _ in range(20):
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/v2/w/blobs/{d}", timeout=5) as r:
                assert r.read() == body
        # a large blob goes out through sendfile(2) on the workers' loop: whole, by range,
        # and after a client that hung up midway
        big = os.urandom(24 * 1024 * 1024)
        bd = "sha256:" + hashlib.sha256(big).hexdigest()
        req = urllib.request.Request(
            f"http://127.0.0.1:{port}/v2/w/blobs/uploads/?digest={bd}", data=big, method="POST"
        )
        assert urllib.request.urlopen(req, timeout=30).status == 201
        url = f"http://127.0.0.1:{port}/v2/w/blobs/{bd}"
        with socket.create_connection(("127.0.0.1", port)) as s:
            s.sendall(f"GET /v2/w/blobs/{bd} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
            s.recv(65536)  # then hang up with most of the body unsent
        with urllib.request.urlopen(url, timeout=30) as r:
            assert r.read() == big
        ranged = urllib.request.Request(url, headers={"Range": "bytes=1000000-9999999"})
        with urllib.request.urlopen(ranged, timeout=30) as r:
            assert r.status == 206 and r.read() == big[1000000:10000000]
    finally:
        proc.send_signal(signal.SIGTERM)
        _out, err = proc.communicate(timeout=20)
    assert proc.returncode == 0, err
    assert "Traceback" not in err
    for pid in children:
        assert (
            not os.path.exists(f"/proc/{pid}")
            or "zombie" in Path(f"/proc/{pid}/status").read_text()
        )
